//! What a hostile client can make the server hold is bounded: streams
//! that never send a body, connections that never send the HTTP/2
//! preface, more connections than allowed. Raw HTTP/2 frames are written
//! by hand, so the client ignores every limit the server announces.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use switchyard_proto::v1::{self as pb, device_service_client::DeviceServiceClient};
use switchyard_tests::ServerProcess;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

/// The documented bound (docs/operations.md): what one connection flooded
/// with streams may add to the server's resident memory. Without the
/// per-connection stream limit the same flood adds about 30 MiB (and
/// without any limit, hundreds).
const STREAM_FLOOD_BOUND_BYTES: u64 = 16 << 20;

/// A `/proc/PID/status` field in bytes (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header as "literal without indexing": by static-table name index, or
/// with a new name when `index` is 0.
fn literal(out: &mut Vec<u8>, index: usize, name: &str, value: &str) {
    hpack_int(out, 0x00, 4, index);
    if index == 0 {
        hpack_int(out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
    }
    hpack_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// A HEADERS frame opening `stream` for a unary call, with END_HEADERS and
/// without END_STREAM: the body never comes.
fn headers_frame(stream: u32, authority: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    literal(
        &mut block,
        4,
        ":path",
        "/switchyard.v1.DeviceService/ListDevices",
    );
    literal(&mut block, 1, ":authority", authority);
    literal(&mut block, 31, "content-type", "application/grpc");
    literal(&mut block, 0, "te", "trailers");
    let mut f = Vec::with_capacity(9 + block.len());
    let len = block.len() as u32;
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(0x1); // HEADERS
    f.push(0x4); // END_HEADERS
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(&block);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

async fn list_devices(server: &ServerProcess) -> Duration {
    let started = Instant::now();
    let ch = server.channel().await;
    tokio::time::timeout(
        Duration::from_secs(5),
        DeviceServiceClient::new(ch).list_devices(pb::ListDevicesRequest::default()),
    )
    .await
    .expect("answered in time")
    .expect("listed");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_streams_that_never_send_a_body_stay_within_the_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("l.db").display());
    let server = ServerProcess::spawn_with(BIN, &db, &["--client-timeout-ms", "2000"], &[]);
    list_devices(&server).await;
    let pid = server.pid();
    let before = proc_kib(pid, "VmRSS:");

    let tcp = TcpStream::connect(&server.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // Read whatever the server answers (SETTINGS, RST_STREAM, GOAWAY) so
    // its writes never stall on us.
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    wr.write_all(PREFACE).await.unwrap();
    wr.write_all(&EMPTY_SETTINGS).await.unwrap();
    let mut sent = 0u32;
    let mut batch = Vec::new();
    for i in 0..20_000u32 {
        batch.extend(headers_frame(2 * i + 1, &server.addr));
        if batch.len() > 64 * 1024 {
            if wr.write_all(&batch).await.is_err() {
                break; // the server closed the connection: also fine
            }
            batch.clear();
        }
        sent = i + 1;
    }
    let _ = wr.write_all(&batch).await;
    let _ = wr.flush().await;
    // Let the server take in everything it will (it refuses streams over
    // its limit, and may close the connection).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peak = proc_kib(pid, "VmHWM:");
    let grown = peak.saturating_sub(before);
    eprintln!(
        "sent {sent} HEADERS frames; server RSS before {} KiB, peak {} KiB (+{} KiB)",
        before / 1024,
        peak / 1024,
        grown / 1024
    );
    assert!(
        grown < STREAM_FLOOD_BOUND_BYTES,
        "the flood grew the server by {grown} bytes"
    );
    // Meanwhile, others are served.
    let took = list_devices(&server).await;
    assert!(took < Duration::from_secs(2), "a normal call took {took:?}");
    drop(wr);
    let answered = reader.await.unwrap();
    assert!(answered > 0, "the server answered the flood (refusals)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_preface_are_closed_and_extra_connections_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("p.db").display());
    let server = ServerProcess::spawn_with(
        BIN,
        &db,
        &["--client-timeout-ms", "500", "--max-connections", "8"],
        &[],
    );
    // Eight silent connections take every slot…
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    // …so a ninth is closed at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(&server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(400), extra.read(&mut buf))
        .await
        .expect("the extra connection is closed before the preface timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer: {:?}", server.log());
    // The silent ones (which got the server's SETTINGS, nothing else) are
    // closed once the preface timeout passes.
    let started = Instant::now();
    for mut c in silent {
        tokio::time::timeout(Duration::from_secs(3), async {
            while c.read(&mut buf).await.unwrap_or(0) > 0 {}
        })
        .await
        .expect("closed by the server");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "closed after about the 500 ms timeout, not {waited:?}"
    );
    // Their slots are free again.
    list_devices(&server).await;
}

/// One unary call over raw HTTP/2: the request headers, then `body` (or
/// nothing, ever, when `None`); the gRPC status and ErrorInfo reason.
async fn raw_unary(server: &ServerProcess, body: Option<Vec<u8>>) -> (String, String) {
    use prost::Message;
    let tcp = TcpStream::connect(&server.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!(
        "http://{}/switchyard.v1.DeviceService/ListDevices",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    if let Some(b) = body {
        send.send_data(b.into(), true).unwrap();
    }
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("answered")
        .unwrap();
    let (parts, mut recv) = resp.into_parts();
    // Trailers-only when there is no message; trailers otherwise.
    let headers = if parts.headers.contains_key("grpc-status") {
        parts.headers
    } else {
        while recv.data().await.is_some() {}
        recv.trailers().await.unwrap().expect("trailers")
    };
    let status = headers["grpc-status"].to_str().unwrap().to_owned();
    let details = headers
        .get("grpc-status-details-bin")
        .map(|v| {
            use base64::Engine as _;
            let trimmed: Vec<u8> = v
                .as_bytes()
                .iter()
                .copied()
                .filter(|b| *b != b'=')
                .collect();
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(trimmed)
                .unwrap()
        })
        .unwrap_or_default();
    let st = tonic_types::pb::Status::decode(details.as_slice()).unwrap();
    let reason = st
        .details
        .first()
        .map(|a| {
            tonic_types::pb::ErrorInfo::decode(a.value.as_slice())
                .unwrap()
                .reason
        })
        .unwrap_or_default();
    (status, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_cut_short_and_missing_bodies_are_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let server = ServerProcess::spawn_with(BIN, &db, &["--client-timeout-ms", "500"], &[]);
    let malformed = ("3".to_owned(), "MALFORMED_REQUEST".to_owned());
    // No message at all.
    assert_eq!(raw_unary(&server, Some(vec![])).await, malformed);
    // Cut short inside the 5-byte message header, and inside the message.
    assert_eq!(raw_unary(&server, Some(vec![0, 0, 0])).await, malformed);
    assert_eq!(
        raw_unary(&server, Some(vec![0, 0, 0, 0, 10, 8, 1])).await,
        malformed
    );
    // Two messages where a unary call takes one.
    assert_eq!(
        raw_unary(&server, Some(vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0])).await,
        malformed
    );
    // A body that never arrives is answered once the client timeout passes.
    let started = Instant::now();
    assert_eq!(raw_unary(&server, None).await, malformed);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
    // A well-formed empty message is a valid (all-default) request.
    assert_eq!(
        raw_unary(&server, Some(vec![0, 0, 0, 0, 0])).await.0,
        "0",
        "an empty ListDevicesRequest lists devices"
    );
    // Over 1 MiB: refused as too large, without reading it all.
    let patient = ServerProcess::spawn_with(BIN, &db, &[], &[]);
    let mut big = vec![0, 0, 0x20, 0, 0];
    big.resize(5 + (2 << 20), 0);
    let started = Instant::now();
    assert_eq!(
        raw_unary(&patient, Some(big)).await,
        ("3".to_owned(), "REQUEST_TOO_LARGE".to_owned())
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_limit_are_server_busy_at_once_and_the_health_check_still_answers() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("f.db").display());
    let server = std::sync::Arc::new(ServerProcess::spawn_with(
        BIN,
        &db,
        &["--max-in-flight", "2", "--client-timeout-ms", "1500"],
        &[],
    ));
    // Two calls whose bodies never come hold both receiving slots.
    let stalled: Vec<_> = (0..2)
        .map(|_| {
            let s = server.clone();
            tokio::spawn(async move { raw_unary(&s, None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third is refused at once, typed and retryable.
    let started = Instant::now();
    assert_eq!(
        raw_unary(&server, Some(vec![0, 0, 0, 0, 0])).await,
        ("14".to_owned(), "SERVER_BUSY".to_owned())
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    // Probes are answered all the same.
    let health = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers under load");
    assert_eq!(health.into_inner().status, 1, "SERVING");
    // Once the stalled ones time out, their slots are free again.
    for s in stalled {
        assert_eq!(s.await.unwrap().1, "MALFORMED_REQUEST");
    }
    assert_eq!(raw_unary(&server, Some(vec![0, 0, 0, 0, 0])).await.0, "0");
}
