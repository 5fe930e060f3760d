//! A PostgreSQL outage seen by a running server, and its recovery, with no
//! restart: the server reaches its database through a TCP relay in this
//! test, which can cut every connection and refuse new ones (as a database
//! that went away, or a network that dropped it) and restore service.
//!
//! What must hold:
//! - during the outage every call is answered within its deadline with
//!   UNAVAILABLE, ErrorInfo reason STORAGE_UNAVAILABLE and a RetryInfo:
//!   no hang, no INTERNAL;
//! - grpc.health.v1 turns NOT_SERVING within seconds (a load balancer then
//!   sends calls elsewhere), and SERVING again once the database is back;
//! - once the database is back the server serves again by itself;
//! - every push acknowledged (before, during or after the outage) is
//!   stored;
//! - no connection of the server is left idle inside a transaction (which
//!   would hold row locks against every other replica).
//!
//! Two kinds of outage: the connections closed (a database restarted or
//! gone: the client sees the end of its connections at once), and the
//! network gone silent (a partition: nothing arrives and nothing is
//! closed, so only the client's own time limits end a call).
//!
//! The relay is what makes this testable: stopping the shared PostgreSQL
//! server would disturb every other test, and only a real network path
//! breaks the server's pooled connections mid-use.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sqlx::{Connection, PgConnection, Row};
use switchyard_proto::v1::{
    self as pb, Command, ConflictStrategy as S, action_service_client::ActionServiceClient,
    device_service_client::DeviceServiceClient,
};
use switchyard_tests::{ServerProcess, details, postgres, push};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

/// The deadline every call is made with.
const CALL_DEADLINE: Duration = Duration::from_secs(15);

/// A TCP relay to PostgreSQL that can be cut (connections closed, new ones
/// refused) or frozen (nothing passes either way, nothing is closed), and
/// restored.
struct Relay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
    task: tokio::task::JoinHandle<()>,
}

struct RelayShared {
    /// Cut: new connections are accepted and closed at once. Read and
    /// written under `conns`' lock, so that no connection slips past a
    /// cut.
    cut: AtomicBool,
    /// The connections being relayed.
    conns: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Connections closed at once while cut.
    refused: AtomicU64,
    /// Frozen: bytes are held (not lost) until thawed.
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(RelayShared {
            cut: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            refused: AtomicU64::new(0),
            frozen: tokio::sync::watch::channel(false).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut conns = s.conns.lock().unwrap();
                if s.cut.load(Ordering::SeqCst) {
                    s.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let up = upstream.clone();
                let frozen = s.frozen.subscribe();
                conns.retain(|t| !t.is_finished());
                conns.push(tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&up).await else {
                        return;
                    };
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    // One task for both directions: aborting it closes both
                    // ends of both connections.
                    tokio::join!(
                        pipe(from_client, to_server, frozen.clone()),
                        pipe(from_server, to_client, frozen),
                    );
                }));
            }
        });
        Self { addr, shared, task }
    }

    /// Closes every relayed connection (both ends) and refuses new ones.
    fn cut(&self) {
        let mut conns = self.shared.conns.lock().unwrap();
        self.shared.cut.store(true, Ordering::SeqCst);
        for t in conns.drain(..) {
            t.abort();
        }
    }

    /// Relays new connections again.
    fn restore(&self) {
        let _conns = self.shared.conns.lock().unwrap();
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Nothing passes, either way, on any connection, new ones included;
    /// nothing is closed.
    fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// What was held passes, and everything after it.
    fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.thaw();
        self.cut();
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding what it read while `frozen`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its host and port replaced by `addr`; and the host:port it
/// named.
fn through(url: &str, addr: SocketAddr) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, hp)) => (format!("{user}@"), hp),
        None => (String::new(), authority),
    };
    (
        format!("{scheme}://{user}{addr}{path}"),
        host_port.to_owned(),
    )
}

/// The database name in a PostgreSQL URL.
fn database_name(url: &str) -> String {
    let path = url.split_once("://").unwrap().1;
    let name = &path[path.find('/').unwrap() + 1..];
    name.split('?').next().unwrap().to_owned()
}

fn unix_secs() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// A request with the call deadline set.
fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_DEADLINE);
    r
}

/// Runs a call with the deadline, and fails the test if it has not been
/// answered a second after it (the server hung).
async fn bounded<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> (Result<T, tonic::Status>, Duration) {
    let t = Instant::now();
    let r = tokio::time::timeout(CALL_DEADLINE + Duration::from_secs(1), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within its {CALL_DEADLINE:?} deadline"));
    (r.map(tonic::Response::into_inner), t.elapsed())
}

/// The n-th push: a one-minute CHARGE window of its own, days ahead (never
/// due during the test).
fn nth_push(n: i64, base: i64) -> pb::PushActionRequest {
    let start = base + n * 120;
    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    push(
        "bat",
        pb::Action {
            command: Command::Charge as i32,
            start_time: ts(start),
            end_time: ts(start + 60),
            ..Default::default()
        },
        S::Unspecified,
    )
}

/// Asserts `status` is what an outage must answer: UNAVAILABLE,
/// STORAGE_UNAVAILABLE, with a RetryInfo.
fn assert_storage_unavailable(what: &str, status: &tonic::Status) {
    let d = details(status);
    assert_eq!(
        (status.code(), d.reason()),
        (Code::Unavailable, "STORAGE_UNAVAILABLE"),
        "{what}: {status:?}"
    );
    let retry = d
        .retry
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no RetryInfo: {status:?}"));
    assert!(
        retry
            .retry_delay
            .as_ref()
            .is_some_and(|r| r.seconds > 0 || r.nanos > 0),
        "{what}: RetryInfo without a delay: {retry:?}"
    );
}

async fn health(ch: &Channel) -> Result<i32, tonic::Status> {
    health_of(ch, "").await
}

/// The health check of `service` ("": the whole server).
async fn health_of(ch: &Channel, service: &str) -> Result<i32, tonic::Status> {
    let mut h = HealthClient::new(ch.clone());
    let mut r = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    r.set_timeout(Duration::from_secs(5));
    tokio::time::timeout(Duration::from_secs(6), h.check(r))
        .await
        .expect("health answers within its deadline")
        .map(|r| r.into_inner().status)
}

/// Backends of `database` idle inside a transaction: (pid, transaction
/// start, application, last statement).
async fn idle_in_transaction(
    pg: &mut PgConnection,
    database: &str,
) -> Vec<(i32, String, String, String)> {
    sqlx::query(
        "SELECT pid, xact_start::text, application_name, left(query, 200) \
         FROM pg_stat_activity \
         WHERE datname = $1 AND state = 'idle in transaction' AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(pg)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// A relay to the test's database, a server reaching the database
/// through it, and a channel to the server; the server has a simulated
/// battery `bat`.
async fn start(db: &postgres::TestDatabase) -> (Relay, ServerProcess, Channel) {
    let placeholder: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (_, upstream) = through(&db.url, placeholder);
    let relay = Relay::start(upstream).await;
    let (url, _) = through(&db.url, relay.addr);
    let server = ServerProcess::spawn(BIN, &url);
    let ch = server.channel().await;
    DeviceServiceClient::new(ch.clone())
        .create_device(req(pb::CreateDeviceRequest {
            device_id: "bat".into(),
            device: Some(pb::Device {
                family: pb::DeviceFamily::Battery as i32,
                driver: "simulated".into(),
                settings: [("latency_ms".to_owned(), "0".to_owned())].into(),
                ..Default::default()
            }),
            request_id: String::new(),
        }))
        .await
        .unwrap();
    (relay, server, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_and_not_serving_then_recovers_without_a_restart() {
    let Some(db) = postgres::database().await else {
        return; // said loudly by the harness (and impossible under CI=true)
    };
    let (relay, mut server, ch) = start(&db).await;
    let base = unix_secs() + 2 * 86_400;
    let mut acked = Vec::new();
    let mut actions = ActionServiceClient::new(ch.clone());
    for n in 0..20 {
        let (r, _) = bounded("push", actions.push_action(req(nth_push(n, base)))).await;
        acked.push(r.unwrap().action.unwrap().action_id);
    }
    assert_eq!(health(&ch).await.unwrap(), ServingStatus::Serving as i32);

    // A client keeps pushing through the outage: every answer is a success
    // or STORAGE_UNAVAILABLE, and every success is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (stop, mut c) = (stop.clone(), actions.clone());
        tokio::spawn(async move {
            let (mut ok, mut refused) = (Vec::new(), Vec::new());
            let mut n = 1000;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (r, took) = bounded("push", c.push_action(req(nth_push(n, base)))).await;
                match r {
                    Ok(a) => ok.push(a.action.unwrap().action_id),
                    Err(st) => refused.push((st, took)),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The outage.
    relay.cut();
    let cut = Instant::now();
    let (r, push_took) = bounded("push", actions.push_action(req(nth_push(100, base)))).await;
    assert_storage_unavailable("push during the outage", &r.unwrap_err());
    let (r, get_took) = bounded(
        "get",
        actions.get_action(req(pb::GetActionRequest {
            device_id: "bat".into(),
            action_id: acked[0].clone(),
        })),
    )
    .await;
    assert_storage_unavailable("get during the outage", &r.unwrap_err());
    let (r, list_took) = bounded(
        "list",
        actions.list_actions(req(pb::ListActionsRequest {
            device_id: "bat".into(),
            ..Default::default()
        })),
    )
    .await;
    assert_storage_unavailable("list during the outage", &r.unwrap_err());
    let not_serving = loop {
        if health(&ch).await.unwrap() == ServingStatus::NotServing as i32 {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "health still SERVING 10 s into the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "outage: push refused in {push_took:?}, get in {get_took:?}, list in {list_took:?}; \
         health NOT_SERVING {not_serving:?} after the cut"
    );
    // Liveness stays SERVING: restarting the process brings no database
    // back.
    assert_eq!(
        health_of(&ch, switchyard::server::LIVENESS).await.unwrap(),
        ServingStatus::Serving as i32
    );
    // Still so a while later (no pooled connection came back somehow).
    let (r, _) = bounded("push", actions.push_action(req(nth_push(101, base)))).await;
    assert_storage_unavailable("push later in the outage", &r.unwrap_err());
    assert!(relay.refused() > 0, "the server tried to reconnect");

    // The database is back: the same process serves again by itself.
    relay.restore();
    let restored = Instant::now();
    let mut n = 200;
    let (mut push_back, mut health_back) = (None, None);
    let (push_back, health_back) = loop {
        if push_back.is_none() {
            n += 1;
            let (r, _) = bounded("push", actions.push_action(req(nth_push(n, base)))).await;
            match r {
                Ok(a) => {
                    acked.push(a.action.unwrap().action_id);
                    push_back = Some(restored.elapsed());
                }
                Err(st) => assert_storage_unavailable("push while recovering", &st),
            }
        }
        if health_back.is_none() && health(&ch).await.unwrap() == ServingStatus::Serving as i32 {
            health_back = Some(restored.elapsed());
        }
        if let (Some(p), Some(h)) = (push_back, health_back) {
            break (p, h);
        }
        assert!(
            restored.elapsed() < Duration::from_secs(20),
            "not recovered 20 s after the database came back (push: {push_back:?}, SERVING: {health_back:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        server.try_wait().is_none(),
        "the server is the same process"
    );
    eprintln!(
        "recovery: first push accepted {push_back:?}, health SERVING {health_back:?} after the restore"
    );

    stop.store(true, Ordering::SeqCst);
    let (ok, refused) = pusher.await.unwrap();
    for (st, took) in &refused {
        assert_storage_unavailable("background push", st);
        assert!(*took < CALL_DEADLINE, "{took:?}");
    }
    let slowest = refused.iter().map(|(_, t)| *t).max().unwrap_or_default();
    eprintln!(
        "background pusher: {} acknowledged, {} refused STORAGE_UNAVAILABLE (slowest refusal {slowest:?})",
        ok.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "the pusher met the outage");
    acked.extend(ok);

    // Every acknowledged push is there.
    for id in &acked {
        let (r, _) = bounded(
            "get",
            actions.get_action(req(pb::GetActionRequest {
                device_id: "bat".into(),
                action_id: id.clone(),
            })),
        )
        .await;
        let a = r.unwrap_or_else(|e| panic!("acknowledged push {id} lost: {e:?}"));
        assert_eq!(a.state, pb::ActionState::Scheduled as i32, "{a:?}");
    }

    // No connection left idle inside a transaction: a backend seen idle in
    // one transaction in two looks a second apart (the dispatcher's own
    // short transactions pass in milliseconds).
    let mut pg = PgConnection::connect(&db.url).await.unwrap();
    let name = database_name(&db.url);
    let first = idle_in_transaction(&mut pg, &name).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = idle_in_transaction(&mut pg, &name).await;
    let stuck: Vec<_> = first
        .iter()
        .filter(|a| second.iter().any(|b| (b.0, &b.1) == (a.0, &a.1)))
        .collect();
    assert!(
        stuck.is_empty(),
        "connections left idle in transaction: {stuck:#?}"
    );
    let backends: i64 = sqlx::query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_one(&mut pg)
    .await
    .unwrap()
    .get(0);
    eprintln!(
        "{} acknowledged pushes all kept; the server holds {backends} connections, none idle in a transaction",
        acked.len()
    );
    let log = server.log();
    let said = |m: &str| {
        log.iter().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["fields"]["message"] == m)
        })
    };
    assert!(said("the database does not answer: NOT_SERVING"));
    assert!(said("the database answers again: SERVING"));
    drop((pg, server, relay));
    db.drop_database().await;
}

/// One push of a client that keeps pushing: when it was sent, how long
/// its answer took, and the answer.
type Sent = (Instant, Duration, Result<String, tonic::Status>);

/// The network to the database goes silent (a partition: nothing arrives,
/// nothing is closed) while clients keep pushing, so that calls are in the
/// middle of a transaction when it does. Each call must still be answered
/// before its deadline, UNAVAILABLE with STORAGE_UNAVAILABLE and a
/// RetryInfo (or OK), health must turn NOT_SERVING, and once the network
/// is back the server must serve again by itself, with every acknowledged
/// push kept and no session left idle in a transaction.
///
/// Without a deadline on each store operation (8 s on PostgreSQL), a call
/// whose statement is in flight when the network goes silent waits until
/// the client's deadline and is answered CANCELLED ("Timeout expired", no
/// details), while its session stays idle in a transaction holding row
/// locks against every other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_mid_transaction_is_still_answered_unavailable_before_the_deadline() {
    let Some(db) = postgres::database().await else {
        return; // said loudly by the harness (and impossible under CI=true)
    };
    let (relay, server, ch) = start(&db).await;
    let base = unix_secs() + 2 * 86_400;
    let actions = ActionServiceClient::new(ch.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<Vec<Sent>>>> = Arc::new(Mutex::new(vec![Vec::new(); 8]));
    let pushers: Vec<_> = (0..8i64)
        .map(|w| {
            let (stop, sent, mut c) = (stop.clone(), sent.clone(), actions.clone());
            tokio::spawn(async move {
                let mut n = 1000 * (w + 1); // slots of its own, within the horizon
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let at = Instant::now();
                    let (r, took) = bounded("push", c.push_action(req(nth_push(n, base)))).await;
                    let r = r.map(|a| a.action.unwrap().action_id);
                    sent.lock().unwrap()[usize::try_from(w).unwrap()].push((at, took, r));
                }
            })
        })
        .collect();
    // Every client has pushed: calls are flowing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sent.lock().unwrap().iter().any(Vec::is_empty) {
        assert!(Instant::now() < deadline, "the clients could not push");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    relay.freeze();
    let frozen = Instant::now();
    // Until every client has had the answer to the call it had in flight
    // (it has sent one after the freeze), and health has turned.
    let mut not_serving = None;
    loop {
        if not_serving.is_none() && health(&ch).await.unwrap() == ServingStatus::NotServing as i32 {
            not_serving = Some(frozen.elapsed());
        }
        let answered = sent
            .lock()
            .unwrap()
            .iter()
            .all(|calls| calls.iter().any(|(at, _, _)| *at > frozen));
        if answered && not_serving.is_some() {
            break;
        }
        assert!(
            frozen.elapsed() < CALL_DEADLINE + Duration::from_secs(10),
            "calls or health still unanswered {:?} into the silence",
            frozen.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    relay.thaw();
    let thawed = Instant::now();
    let (mut push_back, mut serving) = (false, false);
    let mut n = 0;
    while !(push_back && serving) {
        if !push_back {
            n += 1;
            let (r, _) = bounded("push", actions.clone().push_action(req(nth_push(n, base)))).await;
            push_back = r.is_ok();
        }
        serving = serving || health(&ch).await.unwrap() == ServingStatus::Serving as i32;
        assert!(
            thawed.elapsed() < Duration::from_secs(20),
            "not recovered 20 s after the network came back (push: {push_back}, SERVING: {serving})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for p in pushers {
        p.await.unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let calls: Vec<&Sent> = sent.iter().flatten().collect();
    let wrong: Vec<String> = calls
        .iter()
        .filter_map(|(at, took, r)| {
            let late = *took >= CALL_DEADLINE - Duration::from_secs(1);
            let refused_right = r.as_ref().err().is_none_or(|st| {
                st.code() == Code::Unavailable
                    && !st.details().is_empty()
                    && details(st).reason() == "STORAGE_UNAVAILABLE"
                    && details(st).retry.is_some()
            });
            (late || !refused_right).then(|| {
                format!(
                    "sent {:+.2} s from the freeze, answered in {took:.2?}: {:?}",
                    at.saturating_duration_since(frozen).as_secs_f64()
                        - frozen.saturating_duration_since(*at).as_secs_f64(),
                    r.as_ref()
                        .map_err(|st| (st.code(), st.message().to_owned()))
                )
            })
        })
        .collect();
    eprintln!(
        "{} calls; health NOT_SERVING {not_serving:?} into the silence; {} answered wrong or late",
        calls.len(),
        wrong.len()
    );
    let mut c = actions.clone();
    for (_, _, r) in &calls {
        if let Ok(id) = r {
            let (got, _) = bounded(
                "get",
                c.get_action(req(pb::GetActionRequest {
                    device_id: "bat".into(),
                    action_id: id.clone(),
                })),
            )
            .await;
            got.unwrap_or_else(|e| panic!("acknowledged push {id} lost: {e:?}"));
        }
    }
    let mut pg = PgConnection::connect(&db.url).await.unwrap();
    let name = database_name(&db.url);
    let first = idle_in_transaction(&mut pg, &name).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = idle_in_transaction(&mut pg, &name).await;
    let stuck: Vec<_> = first
        .iter()
        .filter(|a| second.iter().any(|b| (b.0, &b.1) == (a.0, &a.1)))
        .collect();
    assert!(stuck.is_empty(), "left idle in transaction: {stuck:#?}");
    drop((pg, server, relay));
    db.drop_database().await;
    assert!(
        wrong.is_empty(),
        "calls not answered STORAGE_UNAVAILABLE before their deadline: {wrong:#?}"
    );
}
