//! OpenTelemetry: with the standard `OTEL_*` variables naming a collector,
//! the server exports its spans (the caller's W3C trace continued) and its
//! metrics over OTLP/gRPC to a real collector, rotel (installed by
//! scripts/install-test-tools.sh, which puts `rotel-agent` on PATH).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    process::{Command as Process, Stdio},
    time::{Duration, Instant},
};

use switchyard_proto::v1::{
    Command, ConflictStrategy as S, action_service_client::ActionServiceClient,
    device_service_client::DeviceServiceClient,
};
use switchyard_tests::{ServerProcess, battery_request, push};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

/// A collector that is killed when the test ends.
struct Collector(std::process::Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_a_real_collector() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rotel.log");
    let port = free_port();
    let collector = Process::new("rotel-agent")
        .args([
            "start",
            "--otlp-grpc-endpoint",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--exporter",
            "blackhole",
            "--debug-log",
            "traces",
            "--debug-log",
            "metrics",
        ])
        .args(["--debug-log-verbosity", "detailed"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("rotel.err")).unwrap(),
        ))
        .spawn();
    let collector = match collector {
        Ok(c) => c,
        Err(e) => {
            let why = format!(
                "rotel-agent could not start ({e}): `eval \"$(bash scripts/install-test-tools.sh)\"` puts it on PATH"
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and no collector: {why}");
            }
            eprintln!("\n*** SKIPPING the telemetry test: {why} ***\n");
            return;
        }
    };
    let _collector = Collector(collector);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rotel-agent does not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let endpoint = format!("http://127.0.0.1:{port}");
    let p = ServerProcess::spawn_with(
        BIN,
        &db,
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ],
    );
    let ch = p.channel().await;
    DeviceServiceClient::new(ch.clone())
        .create_device(battery_request("t1"))
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let mut req = tonic::Request::new(push(
        "t1",
        switchyard_proto::v1::Action {
            command: Command::Charge as i32,
            start_time: at(now + 86_400),
            end_time: at(now + 90_000),
            ..Default::default()
        },
        S::Unspecified,
    ));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    ActionServiceClient::new(ch).push_action(req).await.unwrap();
    // Spans and metrics arrive within their export intervals.
    let want = [
        "/switchyard.v1.ActionService/PushAction",
        // The caller's trace continued: its id, and its span as the parent.
        TRACE_ID,
        "Parent ID      : b7ad6b7169203331",
        "tenant_id: Str(default)",
        "device_id: Str(t1)",
        "store.group_commit",
        "switchyard.push",
        "switchyard.group_commit.size",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = std::fs::read_to_string(&out).unwrap_or_default();
        let missing: Vec<&str> = want.iter().copied().filter(|w| !seen.contains(w)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not at the collector within 30 s: {missing:?}\n--- collector output (tail) ---\n{}",
            seen.chars()
                .rev()
                .take(4000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The server said it exports.
    assert!(
        p.log()
            .iter()
            .any(|l| l.contains("exporting traces and metrics over OTLP"))
    );
}
