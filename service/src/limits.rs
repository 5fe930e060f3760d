//! Bounds on what clients can make the server hold, whatever they send.
//!
//! Invariants (docs/operations.md has the figures):
//! - At most `max_connections` connections; more are closed at once.
//! - A connection must send the HTTP/2 preface within `preface_timeout`,
//!   or it is closed; dead peers are found by HTTP/2 and TCP keep-alive.
//! - At most `max_streams_per_connection` streams per connection (HTTP/2
//!   refuses more). At most `max_in_flight` requests being received and at
//!   most `max_in_flight` calls being handled in the whole server, counted
//!   apart so that slow senders never take handler capacity: beyond either
//!   a call is answered UNAVAILABLE / SERVER_BUSY at once instead of being
//!   held. The health check counts against neither, so probes are
//!   answered under load.
//! - A unary request body must arrive whole within `body_timeout` and be at
//!   most `max_request_bytes`; all bodies being received share
//!   `max_buffered_bytes`. An empty, truncated or oversized body is
//!   answered INVALID_ARGUMENT with a typed reason, never INTERNAL.
//!
//! So one client's memory footprint on the server is bounded by these
//! numbers, not by how many streams or bytes it sends.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http_body_util::{BodyExt, Full};
use switchyard_proto::v1::ErrorReason;

use crate::api::status::transport_status;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{
    Code,
    body::Body,
    codegen::http,
    transport::server::{Connected, TcpConnectInfo},
};

/// The server's resource bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    /// Calls being handled at once, across all connections.
    pub max_in_flight: usize,
    /// Largest request message (gRPC frame included).
    pub max_request_bytes: usize,
    /// Request bytes held at once, across all calls.
    pub max_buffered_bytes: usize,
    pub preface_timeout: Duration,
    /// From the request's headers to its last body byte.
    pub body_timeout: Duration,
    /// How long one call may run before it is cancelled (its work is
    /// rolled back, and its request_id released).
    pub request_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_streams_per_connection: 100,
            max_in_flight: 1024,
            max_request_bytes: 1 << 20,
            max_buffered_bytes: 64 << 20,
            preface_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// The HTTP/2 client preface a connection must send first.
const PREFACE_LEN: usize = 24;

/// Accepted connections, at most `max_connections` at once; each must
/// send its preface within `preface_timeout`.
pub fn incoming(
    listener: TcpListener,
    limits: &Limits,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let preface = limits.preface_timeout;
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "connection limit reached; closing a new connection");
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    // Dead peers that never answer HTTP/2 pings either (the
                    // connection gone without a FIN) are found by TCP too.
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(Duration::from_secs(60))
                        .with_interval(Duration::from_secs(10));
                    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
                    let io = Guarded {
                        tcp,
                        _slot: slot,
                        preface_left: PREFACE_LEN,
                        deadline: Some(Box::pin(tokio::time::sleep(preface))),
                    };
                    return Some((Ok(io), (listener, slots)));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// A connection holding one of the connection slots, closed when its
/// preface does not arrive in time.
pub struct Guarded {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    preface_left: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if self.deadline.is_some() {
            let got = buf.filled().len() - before;
            self.preface_left = self.preface_left.saturating_sub(got);
            if self.preface_left == 0 {
                self.deadline = None;
            } else if let Some(d) = self.deadline.as_mut()
                && std::future::Future::poll(d.as_mut(), cx).is_ready()
            {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the preface timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Checks and buffers unary requests before tonic sees them (see the
/// module docs).
#[derive(Clone, Debug)]
pub struct GuardLayer {
    limits: Arc<Limits>,
    receiving: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl GuardLayer {
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: Arc::new(limits.clone()),
            receiving: Arc::new(Semaphore::new(limits.max_in_flight)),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            bytes: Arc::new(Semaphore::new(limits.max_buffered_bytes)),
        }
    }
}

/// A slot of `pool`, or none needed (`None` pool: the health check).
fn slot(pool: Option<&Arc<Semaphore>>) -> Result<Option<OwnedSemaphorePermit>, ()> {
    match pool {
        None => Ok(None),
        Some(p) => p.clone().try_acquire_owned().map(Some).map_err(|_| ()),
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GuardLayer`] wraps around the router.
#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

/// Unary methods: the switchyard API and the health check. Streaming ones
/// (reflection, health watch) pass through untouched.
fn unary(path: &str) -> bool {
    path.starts_with("/switchyard.v1.") || path == "/grpc.health.v1.Health/Check"
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Guard<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The ready service goes with this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !unary(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        let layer = self.layer.clone();
        let probe = req.uri().path() == "/grpc.health.v1.Health/Check";
        Box::pin(async move {
            let Ok(receiving) = slot((!probe).then_some(&layer.receiving)) else {
                return Ok(busy());
            };
            let (parts, body) = req.into_parts();
            let limits = &layer.limits;
            let collected = tokio::time::timeout(
                limits.body_timeout,
                // A probe is a few bytes: exempt from the counts, but not
                // a way round them.
                collect(
                    body,
                    if probe {
                        1024
                    } else {
                        limits.max_request_bytes
                    },
                    (!probe).then_some(&layer.bytes),
                ),
            )
            .await;
            let (bytes, _held) = match collected {
                Ok(Ok(ok)) => ok,
                Ok(Err(refusal)) => return Ok(refusal),
                Err(_) => {
                    return Ok(refuse(
                        ErrorReason::MalformedRequest,
                        format!(
                            "the request body did not arrive within {} ms",
                            limits.body_timeout.as_millis()
                        ),
                    ));
                }
            };
            drop(receiving);
            if let Some(why) = framing_error(&bytes) {
                return Ok(refuse(ErrorReason::MalformedRequest, why));
            }
            // Handler capacity is taken only once the request is here.
            let Ok(_handling) = slot((!probe).then_some(&layer.in_flight)) else {
                return Ok(busy());
            };
            let req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
            inner.call(req).await
        })
    }
}

/// Reads a whole body, at most `max` bytes, each byte counted against the
/// server-wide `budget` (none for probes) while the call lasts.
async fn collect(
    mut body: Body,
    max: usize,
    budget: Option<&Arc<Semaphore>>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), http::Response<Body>> {
    let mut buf = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(refuse(
                ErrorReason::MalformedRequest,
                "the request body was cut short".to_owned(),
            ));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            return Err(refuse(
                ErrorReason::RequestTooLarge,
                format!("the request is larger than {max} bytes"),
            ));
        }
        if let Some(budget) = budget {
            let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
            // Bytes beyond the budget are refused, not waited for: waiting
            // would let slow senders hold everyone else's requests back.
            let Ok(permit) = budget.clone().try_acquire_many_owned(n) else {
                return Err(busy());
            };
            match held.as_mut() {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), held))
}

/// What is wrong with the gRPC framing of a unary request, if anything:
/// exactly one length-prefixed message.
fn framing_error(b: &[u8]) -> Option<String> {
    if b.is_empty() {
        return Some(
            "the request has no message (a gRPC request body is one length-prefixed message)"
                .to_owned(),
        );
    }
    if b.len() < 5 {
        return Some("the request body is cut short inside the message header".to_owned());
    }
    let declared = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    let got = b.len() - 5;
    if got < declared {
        return Some(format!(
            "the request message is cut short: {got} of its {declared} bytes arrived"
        ));
    }
    if got > declared {
        return Some("the request body holds more than the one message of a unary call".to_owned());
    }
    None
}

fn busy() -> http::Response<Body> {
    transport_status(
        Code::Unavailable,
        ErrorReason::ServerBusy,
        "the server is handling as many calls as it allows; retry shortly".to_owned(),
        Some(crate::domain::Ts::SECOND),
    )
    .into_http()
}

fn refuse(reason: ErrorReason, message: String) -> http::Response<Body> {
    transport_status(Code::InvalidArgument, reason, message, None).into_http()
}

#[cfg(test)]
mod tests {
    use super::framing_error;

    #[test]
    fn only_exactly_one_whole_message_is_well_framed() {
        assert!(framing_error(&[]).is_some());
        assert!(framing_error(&[0, 0, 0]).is_some());
        assert!(framing_error(&[0, 0, 0, 0, 3, 1, 2]).is_some());
        assert!(framing_error(&[0, 0, 0, 0, 1, 1, 2]).is_some());
        assert_eq!(framing_error(&[0, 0, 0, 0, 2, 1, 2]), None);
        assert_eq!(framing_error(&[0, 0, 0, 0, 0]), None);
    }
}
