//! switchyard-bench: measures the service from outside, over gRPC.
//!
//! `switchyard-bench push` sends N pushes from C concurrent clients to a
//! switchyard server on SQLite, or on PostgreSQL with `--database` (a
//! spawned release binary, or `--addr`),
//! and prints pushes/s and latency percentiles next to a baseline measured
//! in the same run: bare single-row INSERT transactions on SQLite with the
//! same durability settings (WAL, synchronous=FULL, BEGIN IMMEDIATE, one
//! writer), so the cost of the service over the database is visible.
//!
//! Not a test: it asserts nothing about speed. Every push must be
//! accepted, though (the workload has no collisions), or it exits non-zero.

use std::{
    process::{Child, Command as Proc, Stdio},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use switchyard_proto::v1::{
    self as pb, action_service_client::ActionServiceClient,
    device_service_client::DeviceServiceClient,
};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(
    name = "switchyard-bench",
    about = "Benchmarks a switchyard server over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// W watchers on WatchEvents (each its own connection) while C clients
    /// push N actions: events delivered per second, and each event's delay
    /// from its push's answer to each watcher's receipt.
    Events {
        /// Number of pushes (each one event).
        #[arg(long, default_value_t = 2_000, value_parser = at_least_one())]
        n: usize,
        /// Watchers.
        #[arg(long, default_value_t = 100, value_parser = at_least_one())]
        watchers: usize,
        /// Concurrent pushing clients.
        #[arg(long, default_value_t = 16, value_parser = at_least_one())]
        c: usize,
        /// The switchyard binary to spawn (default: `switchyard` next to
        /// this binary).
        #[arg(long, value_name = "PATH")]
        server_bin: Option<std::path::PathBuf>,
        /// The spawned server's database (default: a fresh SQLite file).
        #[arg(long, value_name = "URL")]
        database: Option<String>,
    },
    /// E webhook endpoints (each its own loopback receiver) while C
    /// clients push N actions: messages delivered per second, and each
    /// message's delay from its push's answer to its receiver's receipt.
    Webhooks {
        /// Number of pushes (each one ACTION_SCHEDULED event per endpoint).
        #[arg(long, default_value_t = 2_000, value_parser = at_least_one())]
        n: usize,
        /// Endpoints.
        #[arg(long, default_value_t = 4, value_parser = at_least_one())]
        endpoints: usize,
        /// Concurrent pushing clients.
        #[arg(long, default_value_t = 4, value_parser = at_least_one())]
        c: usize,
        /// The switchyard binary to spawn (default: `switchyard` next to
        /// this binary).
        #[arg(long, value_name = "PATH")]
        server_bin: Option<std::path::PathBuf>,
        /// The spawned server's database (default: a fresh SQLite file).
        #[arg(long, value_name = "URL")]
        database: Option<String>,
    },
    /// N non-colliding pushes from C concurrent clients, plus the SQLite
    /// baseline.
    Push {
        /// Number of pushes.
        #[arg(long, default_value_t = 20_000, value_parser = at_least_one())]
        n: usize,
        /// Concurrent clients (each its own HTTP/2 connection).
        #[arg(long, default_value_t = 32, value_parser = at_least_one())]
        c: usize,
        /// Devices the pushes are spread over.
        #[arg(long, default_value_t = 100, value_parser = at_least_one())]
        devices: usize,
        /// Use a running server instead of spawning one (default: spawn
        /// --server-bin on a free port and a fresh database).
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// The switchyard binary to spawn (default: `switchyard` next to
        /// this binary).
        #[arg(long, value_name = "PATH")]
        server_bin: Option<std::path::PathBuf>,
        /// The database of the spawned server (default: a fresh SQLite
        /// file), e.g. an empty PostgreSQL database:
        /// `postgres://postgres@127.0.0.1:5432/bench`.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Push without request_ids (by default each push carries a
        /// unique one, so each is also an idempotency claim).
        #[arg(long)]
        no_request_ids: bool,
        /// Rounds of pushes, each followed by a phase of Checks from the
        /// same process (as many as the round's pushes, but at least
        /// 20,000 or ten times as many, whichever is fewer); the ratio
        /// reported is the median of the rounds'.
        #[arg(long, default_value_t = 1, value_parser = at_least_one())]
        rounds: usize,
    },
    /// N windowed actions on N simulated devices, all due in the same
    /// second: how late does the dispatcher apply them?
    Dispatch {
        /// Number of actions (and devices).
        #[arg(long, default_value_t = 10_000, value_parser = at_least_one())]
        n: usize,
        /// Concurrent clients for the set-up pushes.
        #[arg(long, default_value_t = 32, value_parser = at_least_one())]
        c: usize,
        /// How long each simulated device takes to answer (`latency_ms`).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Clients polling GetAction and ListActions through the storm
        /// (each its own connection).
        #[arg(long, default_value_t = 0)]
        readers: usize,
        /// The switchyard binary to spawn (default: `switchyard` next to
        /// this binary).
        #[arg(long, value_name = "PATH")]
        server_bin: Option<std::path::PathBuf>,
        /// The database of the spawned server (default: a fresh SQLite
        /// file), e.g. an empty PostgreSQL database.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
    },
    /// Every figure of docs/performance.md in one run, one section after
    /// the other: push ÷ health on SQLite, dispatch storms at 10,000 and
    /// 100,000 (the OEM answering at once and in 200 ms, and with 32
    /// polling readers), and push and ListActions p99 on a fresh database
    /// and at 1,000,000 actions; with `--postgres`, push ÷ health, the
    /// storms at 10,000 and 100,000 (the OEM answering at once) and the
    /// scale check on PostgreSQL too.
    All {
        /// A PostgreSQL server to measure too, as an URL whose user may
        /// create databases (e.g. `postgres://postgres@127.0.0.1:5432/postgres`):
        /// a database of the run's own is created there and dropped.
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// Divide every size by this (1: the sizes documented).
        #[arg(long, default_value_t = 1, value_parser = at_least_one())]
        smaller: usize,
        /// The switchyard binary to spawn (default: `switchyard` next to
        /// this binary).
        #[arg(long, value_name = "PATH")]
        server_bin: Option<std::path::PathBuf>,
    },
    /// Push and ListActions latency on a fresh database, then again once
    /// it holds ACTIONS finished actions on DEVICES devices (written
    /// straight into the database between two runs of the server), with
    /// the query plans of the hot queries.
    Scale {
        /// Finished actions stored for the second run.
        #[arg(long, default_value_t = 1_000_000, value_parser = at_least_one())]
        actions: usize,
        /// Devices stored for the second run.
        #[arg(long, default_value_t = 100_000, value_parser = at_least_one())]
        devices: usize,
        /// Pushes (and ListActions calls of each kind) measured per run.
        #[arg(long, default_value_t = 5_000, value_parser = at_least_one())]
        n: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32, value_parser = at_least_one())]
        c: usize,
        /// The switchyard binary to spawn (default: `switchyard` next to
        /// this binary).
        #[arg(long, value_name = "PATH")]
        server_bin: Option<std::path::PathBuf>,
        /// An empty PostgreSQL database to run on instead of a fresh SQLite
        /// file, e.g. `postgres://postgres@127.0.0.1:5432/bench_scale`.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
    },
}

/// Zero pushes, clients or devices measures nothing (and zero devices
/// would divide by zero): refuse it as a usage error.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

struct Server {
    child: Option<Child>,
    addr: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_server(bin: Option<std::path::PathBuf>, database: Option<String>) -> Server {
    start_server_on(bin, tempfile::tempdir().expect("tempdir"), database).await
}

async fn start_server_on(
    bin: Option<std::path::PathBuf>,
    dir: tempfile::TempDir,
    database: Option<String>,
) -> Server {
    start_server_with(bin, dir, database, &[]).await
}

/// [`start_server_on`] with more `serve` arguments.
async fn start_server_with(
    bin: Option<std::path::PathBuf>,
    dir: tempfile::TempDir,
    database: Option<String>,
    extra: &[String],
) -> Server {
    let bin = bin.unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("switchyard")
    });
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p switchyard`",
        bin.display()
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let db =
        database.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let child = Proc::new(&bin)
        .args([
            "serve",
            "--listen",
            &addr,
            "--database",
            &db,
            "--no-demo",
            "--horizon-days",
            "3650",
        ])
        .args(extra)
        // The server's log level: warnings, unless the bench is run with
        // SWITCHYARD_LOG set (say `switchyard::dispatch=debug`).
        .env(
            "SWITCHYARD_LOG",
            std::env::var("SWITCHYARD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server");
    let server = Server {
        child: Some(child),
        addr,
        _dir: Some(dir),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while connect(&server.addr).await.is_err() {
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A push of a CHARGE window on `device_id` from `start` to `end` (Unix
/// seconds).
fn charge(device_id: String, start: i64, end: i64) -> pb::PushActionRequest {
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    pb::PushActionRequest {
        device_id,
        action: Some(pb::Action {
            command: pb::Command::Charge as i32,
            start_time: at(start),
            end_time: at(end),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Registers simulated batteries `{prefix}-0` .. `{prefix}-{n-1}`.
async fn create_batteries(ch: &Channel, prefix: &str, n: usize) {
    for d in 0..n {
        DeviceServiceClient::new(ch.clone())
            .create_device(pb::CreateDeviceRequest {
                device_id: format!("{prefix}-{d}"),
                device: Some(pb::Device {
                    family: pb::DeviceFamily::Battery as i32,
                    driver: "simulated".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .expect("create device");
    }
}

async fn bench_events(
    n: usize,
    watchers: usize,
    c: usize,
    bin: Option<std::path::PathBuf>,
    database: Option<String>,
) {
    use switchyard_proto::v1::event_service_client::EventServiceClient;
    let server = start_server(bin, database).await;
    let ch = connect(&server.addr).await.expect("connect");
    let devices = 50;
    create_batteries(&ch, "ev", devices).await;
    let mut watching = Vec::new();
    for _ in 0..watchers {
        let wch = connect(&server.addr).await.expect("connect watcher");
        let mut stream = EventServiceClient::new(wch)
            .watch_events(pb::WatchEventsRequest {
                from_now: true,
                event_types: vec![pb::EventType::ActionScheduled as i32],
                ..Default::default()
            })
            .await
            .expect("watch")
            .into_inner();
        watching.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
                    Ok(Ok(Some(e))) => got.push((e.action_id, Instant::now())),
                    other => panic!("watch ended after {} events: {other:?}", got.len()),
                }
            }
            got
        }));
    }
    let began = Instant::now();
    let answered = push_timed(&ch, "ev", devices, n, c).await;
    let pushed = began.elapsed();
    let mut delays = Vec::with_capacity(n * watchers);
    for w in watching {
        for (id, at) in w.await.expect("watcher") {
            let sent = answered[&id];
            delays.push(at.saturating_duration_since(sent));
        }
    }
    let all = began.elapsed();
    delays.sort();
    println!(
        "switchyard events: {n} pushes ({:.0}/s) to {watchers} watchers: {} events delivered in {:.2} s = {:.0} events/s; delay push answer -> watcher p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        n as f64 / pushed.as_secs_f64(),
        delays.len(),
        all.as_secs_f64(),
        delays.len() as f64 / all.as_secs_f64(),
        pct(&delays, 0.50).as_secs_f64() * 1000.0,
        pct(&delays, 0.99).as_secs_f64() * 1000.0,
        delays.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
}

/// Pushes `n` one-window charges over `devices` batteries `{prefix}-*`
/// from `c` clients; each action's id with when its push was answered.
async fn push_timed(
    ch: &Channel,
    prefix: &'static str,
    devices: usize,
    n: usize,
    c: usize,
) -> std::collections::HashMap<String, Instant> {
    let answered: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Arc::default();
    let base = unix_now() + 86_400;
    let pushes = ch.clone();
    let times = answered.clone();
    fan_out(n, c, move |i| {
        let mut client = ActionServiceClient::new(pushes.clone());
        let times = times.clone();
        async move {
            let start = base + (i / devices) as i64 * 600;
            let a = client
                .push_action(charge(
                    format!("{prefix}-{}", i % devices),
                    start,
                    start + 600,
                ))
                .await
                .expect("push")
                .into_inner()
                .action
                .expect("action");
            times
                .lock()
                .expect("times")
                .insert(a.action_id, Instant::now());
        }
    })
    .await;
    answered.lock().expect("times").clone()
}

async fn bench_webhooks(
    n: usize,
    endpoints: usize,
    c: usize,
    bin: Option<std::path::PathBuf>,
    database: Option<String>,
) {
    use switchyard_proto::v1::webhook_service_client::WebhookServiceClient;
    use switchyard_tests::receiver::Receiver;
    let mut receivers = Vec::new();
    for _ in 0..endpoints {
        receivers.push(Receiver::start().await);
    }
    let mut extra = Vec::new();
    for r in &receivers {
        extra.push("--webhook-url-allow".to_owned());
        extra.push(r.origin.clone());
    }
    let server =
        start_server_with(bin, tempfile::tempdir().expect("tempdir"), database, &extra).await;
    let ch = connect(&server.addr).await.expect("connect");
    let devices = 50;
    create_batteries(&ch, "wh", devices).await;
    for r in &receivers {
        WebhookServiceClient::new(ch.clone())
            .create_webhook_endpoint(pb::CreateWebhookEndpointRequest {
                url: r.url.clone(),
                event_types: vec![pb::EventType::ActionScheduled as i32],
                description: "bench".into(),
            })
            .await
            .expect("create endpoint");
    }
    let began = Instant::now();
    let answered = push_timed(&ch, "wh", devices, n, c).await;
    let pushed = began.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while receivers.iter().any(|r| r.accepted().len() < n) {
        assert!(
            Instant::now() < deadline,
            "messages still missing after 300 s: {:?}",
            receivers
                .iter()
                .map(|r| r.accepted().len())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = began.elapsed();
    let mut delays = Vec::with_capacity(n * endpoints);
    for r in &receivers {
        let mut seen = std::collections::HashSet::new();
        for m in r.accepted() {
            let body = m.json();
            let id = body["data"]["action_id"]
                .as_str()
                .expect("action_id")
                .to_owned();
            if seen.insert(id.clone()) {
                delays.push(m.at.saturating_duration_since(answered[&id]));
            }
        }
    }
    delays.sort();
    println!(
        "switchyard webhooks: {n} pushes ({:.0}/s) to {endpoints} endpoints: {} messages delivered in {:.2} s = {:.0} messages/s; delay push answer -> receiver p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        n as f64 / pushed.as_secs_f64(),
        delays.len(),
        all.as_secs_f64(),
        delays.len() as f64 / all.as_secs_f64(),
        ms(pct(&delays, 0.50)),
        ms(pct(&delays, 0.99)),
        ms(delays.last().copied().unwrap_or_default()),
    );
}

#[allow(clippy::too_many_arguments)]
async fn bench_push(
    n: usize,
    c: usize,
    devices: usize,
    addr: Option<String>,
    bin: Option<std::path::PathBuf>,
    database: Option<String>,
    request_ids: bool,
    rounds: usize,
) {
    let server = match addr {
        Some(addr) => Server {
            child: None,
            addr,
            _dir: None,
        },
        None => start_server(bin, database).await,
    };
    let ch = connect(&server.addr).await.expect("connect");
    let run = format!("{:x}", std::process::id());
    create_batteries(&ch, &format!("bench-{run}"), devices).await;
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        + 3600;
    let mut clients = Vec::with_capacity(c);
    for _ in 0..c {
        clients.push(ActionServiceClient::new(
            connect(&server.addr).await.expect("connect"),
        ));
    }
    // Pushes and Checks alternate, round by round, so that both see the
    // machine as it is at the time (on shared cores it drifts from one
    // minute to the next); each round's ratio is its own.
    let rounds = rounds.clamp(1, n);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut lat = Vec::with_capacity(n);
    let mut failed = 0;
    let mut pushing = Duration::ZERO;
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Pushes 0..upto of the whole run are made by the end of this round.
        let upto = n * (round + 1) / rounds;
        let from = next.load(std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .iter()
            .map(|client| {
                let mut client = client.clone();
                let next = next.clone();
                let run = run.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut failed = 0usize;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= upto {
                            break;
                        }
                        // Device i % D, slot i / D: windows never collide.
                        let start = base + (i / devices) as i64 * 120;
                        let mut req =
                            charge(format!("bench-{run}-{}", i % devices), start, start + 60);
                        if request_ids {
                            req.request_id = format!("bench-{run}-{i}");
                        }
                        if let Some(a) = req.action.as_mut() {
                            a.power = Some(pb::Quantity {
                                value: 2.5,
                                unit: pb::Unit::Kilowatt as i32,
                            });
                        }
                        let t = Instant::now();
                        match client.push_action(req).await {
                            Ok(_) => lat.push(t.elapsed()),
                            Err(e) => {
                                failed += 1;
                                if failed < 3 {
                                    eprintln!("push failed: {e:?}");
                                }
                            }
                        }
                    }
                    (lat, failed)
                })
            })
            .collect();
        let mut accepted = 0;
        for t in tasks {
            let (l, f) = t.await.expect("client task");
            accepted += l.len();
            lat.extend(l);
            failed += f;
        }
        let took = started.elapsed();
        pushing += took;
        // The counter overshoots by one per client: the next round starts
        // where this one's pushes ended.
        next.store(upto, std::sync::atomic::Ordering::Relaxed);
        let rate = accepted as f64 / took.as_secs_f64();
        let health = health_rate(&server.addr, c, upto - from).await;
        ratios.push((rate / health, health));
        if rounds > 1 {
            println!(
                "  round {}: {accepted} pushes at {rate:.0}/s, then Checks at {health:.0}/s; ratio {:.3}",
                round + 1,
                rate / health
            );
        }
    }
    lat.sort();
    let rss = server.child.as_ref().and_then(|c| peak_rss_kib(c.id()));
    let rate = lat.len() as f64 / pushing.as_secs_f64();
    println!(
        "switchyard push: {n} pushes, {c} clients, {devices} devices, {}",
        if request_ids {
            "each with a unique request_id"
        } else {
            "no request_ids"
        }
    );
    println!(
        "  accepted {} failed {failed} in {:.2} s = {rate:.0} pushes/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        pushing.as_secs_f64(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0)),
    );
    if let Some(kib) = rss {
        println!("  server peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
    // The same client process's rate of the cheapest call the server
    // answers: what the transport and the runtime allow, against which
    // pushes are set.
    let checks: Vec<f64> = ratios.iter().map(|(_, health)| *health).collect();
    let mut ratios: Vec<f64> = ratios.iter().map(|(ratio, _)| *ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    let median = if ratios.len().is_multiple_of(2) {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    } else {
        ratios[mid]
    };
    if rounds > 1 {
        println!(
            "grpc.health.v1 Check from {c} clients of the same process, alternating with the pushes: ratio pushes/s ÷ checks/s median {median:.3} of {rounds} rounds (lowest {:.3}, highest {:.3})",
            ratios[0],
            ratios[ratios.len() - 1]
        );
    } else {
        println!(
            "grpc.health.v1 Check from {c} clients of the same process: {:.0} calls/s; ratio pushes/s ÷ checks/s = {median:.3}",
            checks[0]
        );
    }
    drop(server);

    let (base_rate, base_lat) = baseline(n, c).await;
    println!(
        "baseline (SQLite INSERT transactions, WAL, synchronous=FULL, BEGIN IMMEDIATE, one writer, {c} tasks): {base_rate:.0} tx/s; latency p50 {:.2} ms, p99 {:.2} ms",
        ms(pct(&base_lat, 0.5)),
        ms(pct(&base_lat, 0.99)),
    );
    println!(
        "ratio: switchyard pushes/s ÷ baseline tx/s = {:.2}",
        rate / base_rate
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Calls per second of `grpc.health.v1.Health/Check` from `c` clients
/// (each its own connection), `n` calls in all (at least 20,000, or ten
/// times `n` if that is less).
async fn health_rate(addr: &str, c: usize, n: usize) -> f64 {
    let n = n.max(20_000.min(n.saturating_mul(10)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::with_capacity(c);
    for _ in 0..c {
        clients.push(connect(addr).await.expect("connect"));
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|ch| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    client
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .expect("health check");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("health client");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn baseline(n: usize, c: usize) -> (f64, Vec<Duration>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("baseline.db").display());
    let opts = SqliteConnectOptions::from_str(&url)
        .expect("url")
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with(opts)
        .await
        .expect("baseline db");
    sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, device TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER, state TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("create table");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let pool = pool.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
                sqlx::query("INSERT INTO t VALUES (?, ?, ?, ?, 'SCHEDULED')")
                    .bind(format!("{i:016}"))
                    .bind(format!("d{}", i % 100))
                    .bind(i as i64)
                    .bind(i as i64 + 60)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                tx.commit().await.expect("commit");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await.expect("baseline task"));
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    (rate, lat)
}

/// Runs `f(i)` for i in 0..n from `c` concurrent workers.
async fn fan_out<F, Fut>(n: usize, c: usize, f: F)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..c {
        let next = next.clone();
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// The bench's own view of the server's database (read-only use).
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    async fn open(url: &str) -> Self {
        if url.starts_with("postgres") {
            Db::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .expect("open the database"),
            )
        } else {
            let url = format!("{url}?mode=ro");
            Db::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(SqliteConnectOptions::from_str(&url).expect("url"))
                    .await
                    .expect("open the database read-only"),
            )
        }
    }

    /// (ACTIVE, FAILED) actions: one read of the table (it has no index
    /// on `state`, so each count reads every row; on PostgreSQL about 65
    /// ms of a 100,000 storm's table, on the cores the server shares).
    async fn active_and_failed(&self) -> (i64, i64) {
        let q = "SELECT COALESCE(SUM(CASE WHEN state = 'ACTIVE' THEN 1 ELSE 0 END), 0), \
                 COALESCE(SUM(CASE WHEN state = 'FAILED' THEN 1 ELSE 0 END), 0) FROM actions";
        match self {
            Db::Sqlite(p) => sqlx::query_as(q).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_as(q).fetch_one(p).await,
        }
        .expect("count")
    }

    /// (due, applied) of every action that became ACTIVE: the transition's
    /// time is when the driver answered.
    async fn applied(&self) -> Vec<(i64, i64)> {
        let q = "SELECT a.start_ns, l.at_ns FROM audit_log l JOIN actions a ON a.action_id = l.action_id
                 WHERE l.to_state = 'ACTIVE'";
        match self {
            Db::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await,
            Db::Postgres(p) => sqlx::query_as(q).fetch_all(p).await,
        }
        .expect("audit")
    }
}

/// Clients reading through the storm: each polls GetAction and
/// ListActions of the storm's devices until `stop`; the latency of each
/// call.
fn spawn_readers(
    channels: &[Channel],
    ids: Arc<Vec<String>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Duration>>> {
    channels
        .iter()
        .enumerate()
        .map(|(r, ch)| {
            let (ch, ids, stop) = (ch.clone(), ids.clone(), stop.clone());
            tokio::spawn(async move {
                let mut client = ActionServiceClient::new(ch);
                let mut lat = Vec::new();
                let mut k = r;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Spread over the devices (a stride coprime with most n).
                    k = (k + 7919) % ids.len();
                    let device_id = format!("d{k}");
                    let t = Instant::now();
                    let got = client
                        .get_action(pb::GetActionRequest {
                            device_id: device_id.clone(),
                            action_id: ids[k].clone(),
                        })
                        .await;
                    lat.push(t.elapsed());
                    let t = Instant::now();
                    let listed = client
                        .list_actions(pb::ListActionsRequest {
                            device_id,
                            page_size: 10,
                            ..Default::default()
                        })
                        .await;
                    lat.push(t.elapsed());
                    if got.is_err() || listed.is_err() {
                        eprintln!("a read failed: {:?} {:?}", got.err(), listed.err());
                    }
                }
                lat
            })
        })
        .collect()
}

async fn bench_dispatch(
    n: usize,
    c: usize,
    latency_ms: u64,
    readers: usize,
    bin: Option<std::path::PathBuf>,
    database: Option<String>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let server = start_server_on(bin, dir, Some(url.clone())).await;
    let pid = server.child.as_ref().map(Child::id);
    let mut channels = Vec::new();
    for _ in 0..c {
        channels.push(connect(&server.addr).await.expect("connect"));
    }
    let channels = Arc::new(channels);
    let t = Instant::now();
    let chs = channels.clone();
    let latency = latency_ms.to_string();
    fan_out(n, c, move |i| {
        let ch = chs[i % chs.len()].clone();
        let latency = latency.clone();
        async move {
            DeviceServiceClient::new(ch)
                .create_device(pb::CreateDeviceRequest {
                    device_id: format!("d{i}"),
                    device: Some(pb::Device {
                        family: pb::DeviceFamily::Battery as i32,
                        driver: "simulated".into(),
                        settings: [("latency_ms".to_owned(), latency)].into_iter().collect(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
                .expect("create device");
        }
    })
    .await;
    let create_secs = t.elapsed().as_secs_f64();
    // All due in the same second, far enough ahead for the pushes.
    let due = unix_now() + 15 + (create_secs * 3.0) as i64;
    let t = Instant::now();
    let chs = channels.clone();
    let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); n]));
    let pushed = ids.clone();
    fan_out(n, c, move |i| {
        let ch = chs[i % chs.len()].clone();
        let pushed = pushed.clone();
        async move {
            let a = ActionServiceClient::new(ch)
                .push_action(charge(format!("d{i}"), due, due + 3600))
                .await
                .expect("push")
                .into_inner();
            let id = a.action.map(|a| a.action_id).unwrap_or_default();
            pushed.lock().expect("ids")[i] = id;
        }
    })
    .await;
    let push_secs = t.elapsed().as_secs_f64();
    assert!(
        unix_now() < due,
        "set-up took longer than planned ({create_secs:.0} s + {push_secs:.0} s)"
    );
    let ids = Arc::new(std::mem::take(&mut *ids.lock().expect("ids")));
    // Readers from a few seconds before the storm until it is over.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut reader_channels = Vec::new();
    for _ in 0..readers {
        reader_channels.push(connect(&server.addr).await.expect("connect"));
    }
    while unix_now() < due - 5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reading = Instant::now();
    let reader_tasks = spawn_readers(&reader_channels, ids, stop.clone());
    // Wait until every action is ACTIVE (bounded). Looked at once a
    // second: each look reads the whole table on the cores the server
    // uses, and when the bench notices the end changes no lateness
    // figure (read from the audit log afterwards). Two counts every
    // 200 ms were 15 % of the statements' time in PostgreSQL through a
    // 100,000 storm (2026-12-03). With readers, every 200 ms as before:
    // they stop when the end is noticed, and their figures are of the
    // storm.
    let look_every = if readers > 0 {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let db = Db::open(&url).await;
    let mut server = server;
    loop {
        let (active, failed) = db.active_and_failed().await;
        if active as usize >= n {
            break;
        }
        // A storm that cannot complete fails now, not at the deadline.
        assert!(failed == 0, "{failed} actions FAILED during the storm");
        if let Some(child) = server.child.as_mut() {
            assert!(
                child.try_wait().ok().flatten().is_none(),
                "the server exited during the storm"
            );
        }
        assert!(
            Instant::now() < deadline,
            "only {active} of {n} actions applied after 10 minutes"
        );
        tokio::time::sleep(look_every).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let read_secs = reading.elapsed().as_secs_f64();
    let mut read_lat = Vec::new();
    for t in reader_tasks {
        read_lat.extend(t.await.expect("reader"));
    }
    read_lat.sort();
    let rss = pid.and_then(peak_rss_kib);
    let mut late: Vec<Duration> = db
        .applied()
        .await
        .iter()
        .map(|(start, at)| Duration::from_nanos((at - start).max(0) as u64))
        .collect();
    late.sort();
    let backend = if url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "switchyard dispatch storm on {backend}: {n} actions on {n} simulated devices (latency {latency_ms} ms), all due in the same second"
    );
    println!("  set-up: {n} devices in {create_secs:.1} s, {n} pushes in {push_secs:.1} s");
    println!(
        "  lateness (applied - due): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms(pct(&late, 0.5)),
        ms(pct(&late, 0.99)),
        ms(pct(&late, 1.0))
    );
    if readers > 0 {
        println!(
            "  {readers} readers (GetAction + ListActions) through the storm: {:.0} reads/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            read_lat.len() as f64 / read_secs,
            ms(pct(&read_lat, 0.5)),
            ms(pct(&read_lat, 0.99)),
            ms(pct(&read_lat, 1.0)),
        );
    }
    if let Some(kib) = rss {
        println!("  server peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
}

/// Devices each scale run pushes to and lists.
const SCALE_DEVICES: usize = 100;

/// The first run's devices (on a fresh file) and the second's (a fleet of
/// its own, seeded with a history of up to a hundred finished actions
/// each). The second run does not reuse the first's devices: they carry
/// the first run's live actions (5,500 at the default size), which is not
/// what the second run measures
/// (with a variant stopping after the pushes, the ratio was 1.21–1.22 on
/// them where a fleet of its own had 0.93–0.96, docs/performance.md).
const FRESH_FLEET: &str = "m";
const SEEDED_FLEET: &str = "h";

/// Latencies of `n` calls of `call(i)` from `c` clients.
async fn timed<F, Fut>(n: usize, c: usize, call: F) -> Vec<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let lat = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let out = lat.clone();
    fan_out(n, c, move |i| {
        let (call, lat) = (call.clone(), lat.clone());
        async move {
            let t = Instant::now();
            call(i).await;
            lat.lock().expect("latencies").push(t.elapsed());
        }
    })
    .await;
    let mut lat = std::mem::take(&mut *out.lock().expect("latencies"));
    lat.sort();
    lat
}

/// (p50, p99) of pushes, of device ListActions first pages and of
/// tenant-wide ListActions first pages (in ms), against a server on
/// `url`, on the devices `{fleet}0`…; `round` keeps each run's windows
/// apart.
async fn scale_run(
    bin: Option<std::path::PathBuf>,
    url: &str,
    n: usize,
    c: usize,
    round: i64,
    fleet: &'static str,
) -> [(f64, f64); 3] {
    let server = start_server_on(
        bin,
        tempfile::tempdir().expect("tempdir"),
        Some(url.to_owned()),
    )
    .await;
    let mut channels = Vec::new();
    for _ in 0..c {
        channels.push(connect(&server.addr).await.expect("connect"));
    }
    let channels = Arc::new(channels);
    for d in 0..SCALE_DEVICES {
        // Already there on the second run.
        let _ = DeviceServiceClient::new(channels[0].clone())
            .create_device(pb::CreateDeviceRequest {
                device_id: format!("{fleet}{d}"),
                device: Some(pb::Device {
                    family: pb::DeviceFamily::Battery as i32,
                    driver: "simulated".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await;
    }
    // A warm-up, not measured, on both runs alike: the server has just
    // started on the file, its caches are empty.
    let warm = (n / 10).max(1);
    let chs = channels.clone();
    let early = unix_now() + round * 86_400 - 43_200;
    timed(warm, c, move |i| {
        let ch = chs[i % chs.len()].clone();
        async move {
            let start = early + (i / SCALE_DEVICES) as i64 * 120;
            ActionServiceClient::new(ch)
                .push_action(charge(
                    format!("{fleet}{}", i % SCALE_DEVICES),
                    start,
                    start + 60,
                ))
                .await
                .expect("push");
        }
    })
    .await;
    let base = unix_now() + round * 86_400;
    let chs = channels.clone();
    let push = timed(n, c, move |i| {
        let ch = chs[i % chs.len()].clone();
        async move {
            let start = base + (i / SCALE_DEVICES) as i64 * 120;
            ActionServiceClient::new(ch)
                .push_action(charge(
                    format!("{fleet}{}", i % SCALE_DEVICES),
                    start,
                    start + 60,
                ))
                .await
                .expect("push");
        }
    })
    .await;
    let list = |device: Option<usize>| {
        let chs = channels.clone();
        move |i: usize| {
            let ch = chs[i % chs.len()].clone();
            async move {
                ActionServiceClient::new(ch)
                    .list_actions(pb::ListActionsRequest {
                        device_id: device.map_or_else(
                            || "-".to_owned(),
                            |_| format!("{fleet}{}", i % SCALE_DEVICES),
                        ),
                        page_size: 50,
                        ..Default::default()
                    })
                    .await
                    .expect("list");
            }
        }
    };
    timed(warm, c, list(Some(0))).await;
    timed(warm, c, list(None)).await;
    let by_device = timed(n, c, list(Some(0))).await;
    let all = timed(n, c, list(None)).await;
    drop(server);
    [push, by_device, all].map(|l| (ms(pct(&l, 0.5)), ms(pct(&l, 0.99))))
}

/// Writes `devices` devices (observed just now) and `actions` finished
/// actions (COMPLETED, nothing owed, finished a day ago, each with the
/// four audit entries of its life) straight into the database at `url`
/// (SQLite or PostgreSQL); the first hundred for each of the second run's
/// devices (made here, with the same settings as the fleet's). Statistics
/// are gathered last, as `PRAGMA optimize` or autovacuum would: the plans
/// must hold with them too.
async fn seed(url: &str, devices: usize, actions: usize) {
    let pg = url.starts_with("postgres");
    let day_ago = (unix_now() - 86_400) * 1_000_000_000;
    // Observed just now: the server does not spend the measured run
    // observing the seeded fleet (a state seen is not needed to push).
    let now_ns = unix_now() * 1_000_000_000;
    // The numbers 0…count-1 as `n(i)`, and the dialect's words.
    let numbers = |count: usize| {
        if pg {
            format!("WITH n(i) AS (SELECT generate_series(0, {count} - 1))")
        } else {
            format!(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {count} - 1)"
            )
        }
    };
    let (insert_new, if_new, no, yes) = if pg {
        ("INSERT", "ON CONFLICT DO NOTHING", "false", "true")
    } else {
        ("INSERT OR IGNORE", "", "0", "1")
    };
    let action_id = if pg {
        "'00000000-0000-7000-8000-' || lpad(i::text, 12, '0')"
    } else {
        "printf('00000000-0000-7000-8000-%012d', i)"
    };
    // `count` devices named `{prefix}0`…, all alike.
    let fleet = |prefix: &str, count: usize| {
        format!(
            "{} {insert_new} INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id,
                 timezone, settings, revision, create_ns, update_ns, incarnation, observed_ns)
             SELECT 'default', '{prefix}' || i, '', 'battery', 'simulated', '', 'UTC', '{{}}', 1, {day_ago}, {day_ago},
                 '{prefix}' || i, {now_ns} FROM n {if_new}",
            numbers(count)
        )
    };
    let stmts = [
        fleet("seed", devices),
        fleet(SEEDED_FLEET, SCALE_DEVICES),
        format!(
            "{} INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns, immediate,
                 state, queued_after, revision, create_ns, update_ns, work, attempts, clear_native, verified, fence,
                 finished_ns)
             SELECT 'default', {action_id},
                 CASE WHEN i < {SCALE_DEVICES} * 100 THEN '{SEEDED_FLEET}' || (i % {SCALE_DEVICES}) ELSE 'seed' || (i % {devices}) END,
                 'mode', 'CHARGE', {day_ago} - 3600000000000, {day_ago}, {no}, 'COMPLETED', '', 4,
                 {day_ago} - 7200000000000, {day_ago}, 'NONE', 0, {no}, {yes}, 2, {day_ago} FROM n",
            numbers(actions)
        ),
        // PostgreSQL: stamped with their event cursors, as a live
        // database's entries are moments after they are written (SQLite's
        // cursor is the entry's `seq`). Left unstamped, the server would
        // spend the measured run stamping millions of them.
        format!(
            "INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, request_id, at_ns{})
             SELECT a.tenant_id, a.device_id, a.action_id, t.f, t.t, t.r, NULL, a.update_ns{} FROM actions a,
               (SELECT NULL AS f, 'SCHEDULED' AS t, 'PUSHED' AS r UNION ALL SELECT 'SCHEDULED', 'ACKNOWLEDGED', 'DISPATCHED'
                UNION ALL SELECT 'ACKNOWLEDGED', 'ACTIVE', 'APPLIED' UNION ALL SELECT 'ACTIVE', 'COMPLETED', 'REVERTED') t
             WHERE a.action_id LIKE '00000000-0000-7000-8000-%'",
            if pg { ", event_cursor" } else { "" },
            if pg {
                ", GREATEST((SELECT COALESCE(MAX(event_cursor), 0) FROM audit_log), \
                   (SELECT COALESCE(MAX(pruned_through), 0) FROM event_horizon)) + row_number() OVER ()"
            } else {
                ""
            },
        ),
        // PostgreSQL: vacuumed too, as autovacuum would have done to
        // rows written long ago (visibility map, hint bits), and
        // checkpointed, so that the second run does not share the disk
        // with the seed's write-back.
        if pg { "VACUUM ANALYZE" } else { "ANALYZE" }.to_owned(),
    ];
    if pg {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("open the database");
        for sql in stmts {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .expect("seed");
        }
        // Needs superuser or `pg_checkpoint`; without it the run goes on
        // (sharing the disk with the seed's write-back).
        if let Err(e) = sqlx::query("CHECKPOINT").execute(&pool).await {
            eprintln!("  no CHECKPOINT after the seed ({e}); measuring anyway");
        }
        // Every entry of the seed has its cursor before any server sees
        // it (a server would stamp what is left, in the measured run).
        let unstamped: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE event_cursor IS NULL \
                 AND action_id LIKE '00000000-0000-7000-8000-%'",
        )
        .fetch_one(&pool)
        .await
        .expect("count unstamped entries");
        println!("  audit entries the seed left unstamped: {unstamped}");
        pool.close().await;
        return;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::from_str(url)
                .expect("url")
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal),
        )
        .await
        .expect("open the database");
    for sql in stmts {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect("seed");
    }
    pool.close().await;
}

/// The plans SQLite chooses for the hot queries, as the store writes them.
async fn plans(url: &str) -> Vec<(&'static str, String)> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::from_str(url).expect("url"))
        .await
        .expect("open the database");
    let queries: [(&'static str, &str); 7] = [
        (
            "push: actions holding the channel",
            "SELECT * FROM actions WHERE tenant_id = 'default' AND device_id = 'h1' AND work <> 'NONE' AND (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT') AND channel = 'mode' AND (end_ns IS NULL OR end_ns > 0) AND start_ns >= COALESCE((SELECT MAX(start_ns) FROM actions WHERE tenant_id = 'default' AND device_id = 'h1' AND channel = 'mode' AND work <> 'NONE' AND (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT') AND start_ns <= 0), -9223372036854775808) ORDER BY start_ns, action_id",
        ),
        (
            "ListActions of a device, first page",
            "SELECT * FROM actions WHERE tenant_id = 'default' AND device_id = 'h1' ORDER BY action_id DESC LIMIT 51",
        ),
        (
            "ListActions of every device, first page",
            "SELECT * FROM actions WHERE tenant_id = 'default' ORDER BY action_id DESC LIMIT 51",
        ),
        (
            "GetAction",
            "SELECT * FROM actions WHERE tenant_id = 'default' AND device_id = 'h1' AND action_id = 'x'",
        ),
        (
            "dispatch: claim due work",
            "SELECT action_id, lease_owner FROM actions WHERE work <> 'NONE' AND due_ns <= 0 AND (lease_until_ns IS NULL OR (lease_until_ns <= 0 AND NOT EXISTS (SELECT 1 FROM dispatch_leases WHERE dispatch_leases.owner = actions.lease_owner AND dispatch_leases.until_ns > 0))) ORDER BY due_ns LIMIT 2048",
        ),
        (
            "dispatch: next due",
            "SELECT MIN(CASE WHEN (CASE WHEN dispatch_leases.until_ns > actions.lease_until_ns THEN dispatch_leases.until_ns ELSE actions.lease_until_ns END) > actions.due_ns THEN (CASE WHEN dispatch_leases.until_ns > actions.lease_until_ns THEN dispatch_leases.until_ns ELSE actions.lease_until_ns END) ELSE actions.due_ns END) FROM actions LEFT JOIN dispatch_leases ON dispatch_leases.owner = actions.lease_owner WHERE work <> 'NONE'",
        ),
        (
            "retention: finished actions",
            "SELECT action_id FROM actions WHERE work = 'NONE' AND finished_ns < 0 AND lease_owner IS NULL AND driver_memo IS NULL ORDER BY finished_ns LIMIT 500",
        ),
    ];
    let mut out = Vec::new();
    for (what, q) in queries {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {q}")))
                .fetch_all(&pool)
                .await
                .expect("explain");
        let plan = rows
            .into_iter()
            .map(|(_, _, _, d)| d)
            .collect::<Vec<_>>()
            .join("; ");
        out.push((what, plan));
    }
    pool.close().await;
    out
}

/// The plans PostgreSQL chooses for the same hot queries: each prepared
/// with parameters, as the store sends it, and explained as the generic
/// plan (`plan_cache_mode = force_generic_plan`), the one a statement
/// kept on a pooled connection may settle on after its first executions.
async fn plans_postgres(url: &str) -> Vec<(&'static str, String)> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("open the database");
    let holding =
        "work <> 'NONE' AND (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT')";
    let queries: [(&'static str, String, &str); 7] = [
        (
            "push: actions holding the channel",
            format!(
                "SELECT * FROM actions WHERE tenant_id = $1 AND device_id = $2 AND {holding} AND channel = $3 \
                 AND (end_ns IS NULL OR end_ns > $4) AND start_ns >= COALESCE((SELECT MAX(start_ns) FROM actions \
                 WHERE tenant_id = $5 AND device_id = $6 AND channel = $7 AND {holding} AND start_ns <= $8), $9) \
                 ORDER BY start_ns, action_id FOR UPDATE"
            ),
            "('default', 'h1', 'mode', 0, 'default', 'h1', 'mode', 0, -9223372036854775808)",
        ),
        (
            "ListActions of a device, first page",
            "SELECT * FROM actions WHERE tenant_id = $1 AND device_id = $2 ORDER BY action_id DESC LIMIT $3".into(),
            "('default', 'h1', 51)",
        ),
        (
            "ListActions of every device, first page",
            "SELECT * FROM actions WHERE tenant_id = $1 ORDER BY action_id DESC LIMIT $2".into(),
            "('default', 51)",
        ),
        (
            "GetAction",
            "SELECT * FROM actions WHERE tenant_id = $1 AND device_id = $2 AND action_id = $3".into(),
            "('default', 'h1', 'x')",
        ),
        (
            "dispatch: claim due work",
            "SELECT action_id, lease_owner FROM actions WHERE work <> 'NONE' AND due_ns <= $1 \
             AND (lease_until_ns IS NULL OR (lease_until_ns <= $2 AND NOT EXISTS (SELECT 1 FROM dispatch_leases \
             WHERE dispatch_leases.owner = actions.lease_owner AND dispatch_leases.until_ns > $2))) \
             ORDER BY due_ns LIMIT $3 FOR UPDATE SKIP LOCKED"
                .into(),
            "(0, 0, 2048)",
        ),
        (
            "dispatch: next due",
            "SELECT MIN(CASE WHEN (CASE WHEN l.until_ns > a.lease_until_ns THEN l.until_ns ELSE a.lease_until_ns END) > a.due_ns \
             THEN (CASE WHEN l.until_ns > a.lease_until_ns THEN l.until_ns ELSE a.lease_until_ns END) ELSE a.due_ns END) \
             FROM actions a LEFT JOIN dispatch_leases l ON l.owner = a.lease_owner WHERE a.work <> 'NONE'"
                .into(),
            "",
        ),
        (
            "retention: finished actions",
            "SELECT action_id FROM actions WHERE work = 'NONE' AND finished_ns < $1 AND lease_owner IS NULL \
             AND driver_memo IS NULL ORDER BY finished_ns LIMIT $2"
                .into(),
            "(0, 500)",
        ),
    ];
    let mut conn = pool.acquire().await.expect("a connection");
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .expect("generic plans");
    let mut out = Vec::new();
    for (i, (what, q, args)) in queries.into_iter().enumerate() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE hot{i} AS {q}")))
            .execute(&mut *conn)
            .await
            .expect("prepare");
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (COSTS OFF) EXECUTE hot{i}{args}"
        )))
        .fetch_all(&mut *conn)
        .await
        .expect("explain");
        let plan = lines
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join("; ");
        out.push((what, plan));
    }
    drop(conn);
    pool.close().await;
    out
}

/// A database of the run's own on the PostgreSQL server of `admin` (a URL
/// whose user may create databases): its name and URL.
async fn create_run_database(admin: &str, what: &str) -> (sqlx::PgPool, String, String) {
    let name = format!("sy_bench_{what}_{}", std::process::id());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin)
        .await
        .expect("the PostgreSQL server answers");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create the run's database");
    // The same server, user and options (`?sslmode=…`, `?host=…`), the
    // run's database.
    let authority_end = admin
        .find("://")
        .map(|i| i + 3)
        .and_then(|from| admin[from..].find(['/', '?']).map(|j| from + j))
        .unwrap_or(admin.len());
    let options = admin[authority_end..]
        .find('?')
        .map_or("", |q| &admin[authority_end + q..]);
    let url = format!("{}/{name}{options}", &admin[..authority_end]);
    println!("  (a database of the run's own: {name}, dropped at the end)");
    (pool, name, url)
}

async fn drop_run_database(pool: sqlx::PgPool, name: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await
    .expect("drop the run's database");
    pool.close().await;
}

/// Every benchmark, one after the other, each printing its section.
async fn bench_all(postgres: Option<String>, smaller: usize, bin: Option<std::path::PathBuf>) {
    let started = Instant::now();
    let size = |n: usize| (n / smaller).max(1);
    let section = |title: &str| {
        println!();
        println!(
            "=== {title} ({:.0} s into the run)",
            started.elapsed().as_secs_f64()
        );
    };
    section("push ÷ health, SQLite");
    bench_push(size(20_000), 64, 100, None, bin.clone(), None, true, 5).await;
    if let Some(admin) = &postgres {
        section("push ÷ health, PostgreSQL");
        let (pool, name, url) = create_run_database(admin, "push").await;
        bench_push(size(20_000), 64, 100, None, bin.clone(), Some(url), true, 5).await;
        drop_run_database(pool, &name).await;
    }
    for (n, latency, readers) in [
        (10_000, 0, 0),
        (10_000, 200, 0),
        (100_000, 0, 0),
        (100_000, 200, 0),
        (100_000, 0, 32),
    ] {
        section(&format!(
            "dispatch storm, {} actions, OEM latency {latency} ms, {readers} readers",
            size(n)
        ));
        bench_dispatch(size(n), 32, latency, readers, bin.clone(), None).await;
    }
    if let Some(admin) = &postgres {
        for n in [10_000, 100_000] {
            section(&format!(
                "dispatch storm, PostgreSQL, {} actions, OEM latency 0 ms",
                size(n)
            ));
            let (pool, name, url) = create_run_database(admin, "storm").await;
            bench_dispatch(size(n), 32, 0, 0, bin.clone(), Some(url)).await;
            drop_run_database(pool, &name).await;
        }
    }
    section("scale, SQLite");
    let scale = (size(1_000_000), size(100_000), size(5_000));
    bench_scale(scale.0, scale.1, scale.2, 32, bin.clone(), None).await;
    if let Some(admin) = &postgres {
        section("scale, PostgreSQL");
        let (pool, name, url) = create_run_database(admin, "scale").await;
        bench_scale(scale.0, scale.1, scale.2, 32, bin, Some(url)).await;
        drop_run_database(pool, &name).await;
    }
    println!();
    println!("=== done in {:.0} s", started.elapsed().as_secs_f64());
}

async fn bench_scale(
    actions: usize,
    devices: usize,
    n: usize,
    c: usize,
    bin: Option<std::path::PathBuf>,
    database: Option<String>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let fresh = scale_run(bin.clone(), &url, n, c, 1, FRESH_FLEET).await;
    let t = Instant::now();
    seed(&url, devices, actions).await;
    let seeded = t.elapsed().as_secs_f64();
    let size = match &database {
        Some(url) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .expect("open the database");
            let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                .fetch_one(&pool)
                .await
                .expect("database size");
            pool.close().await;
            u64::try_from(bytes).unwrap_or(0)
        }
        None => std::fs::metadata(dir.path().join("bench.db")).map_or(0, |m| m.len()),
    };
    let full = scale_run(bin, &url, n, c, 2, SEEDED_FLEET).await;
    let backend = if database.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "switchyard scale: {n} pushes and {n} ListActions of each kind, {c} clients, {backend}"
    );
    println!(
        "  seeded {actions} finished actions (4 audit entries each) on {devices} devices in {seeded:.0} s; database {:.0} MiB",
        size as f64 / 1_048_576.0
    );
    for (what, a, b) in [
        ("push", fresh[0], full[0]),
        ("ListActions (device)", fresh[1], full[1]),
        ("ListActions (all devices)", fresh[2], full[2]),
    ] {
        println!(
            "  {what} p99: fresh {:.2} ms, at {actions} actions {:.2} ms, ratio {:.2} (p50 {:.2} → {:.2} ms, ratio {:.2})",
            a.1,
            b.1,
            b.1 / a.1,
            a.0,
            b.0,
            b.0 / a.0
        );
    }
    println!("  query plans:");
    let plans = if database.is_some() {
        plans_postgres(&url).await
    } else {
        plans(&url).await
    };
    for (what, plan) in plans {
        println!("    {what}: {plan}");
    }
}

#[tokio::main]
async fn main() {
    match Cli::parse().cmd {
        Cmd::Push {
            n,
            c,
            devices,
            addr,
            server_bin,
            database,
            no_request_ids,
            rounds,
        } => {
            bench_push(
                n,
                c,
                devices.max(1),
                addr,
                server_bin,
                database,
                !no_request_ids,
                rounds,
            )
            .await
        }
        Cmd::Events {
            n,
            watchers,
            c,
            server_bin,
            database,
        } => bench_events(n, watchers, c, server_bin, database).await,
        Cmd::Webhooks {
            n,
            endpoints,
            c,
            server_bin,
            database,
        } => bench_webhooks(n, endpoints, c, server_bin, database).await,
        Cmd::Scale {
            actions,
            devices,
            n,
            c,
            server_bin,
            database,
        } => bench_scale(actions, devices, n, c, server_bin, database).await,
        Cmd::All {
            postgres,
            smaller,
            server_bin,
        } => bench_all(postgres, smaller, server_bin).await,
        Cmd::Dispatch {
            n,
            c,
            latency_ms,
            readers,
            server_bin,
            database,
        } => {
            bench_dispatch(
                n.max(1),
                c.max(1),
                latency_ms,
                readers,
                server_bin,
                database,
            )
            .await
        }
    }
}
