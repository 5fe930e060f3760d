//! Metrics: the names and labels docs/operations.md promises, recorded
//! where they happen, and the `/metrics` endpoint `--metrics-listen` serves.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use switchyard_proto::v1::{Command, ConflictStrategy as S};
use switchyard_tests::{ServerProcess, TestServer, battery_request, push, window};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const H: i64 = 3600;
const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

/// The value of the sample `name{labels}` (labels as rendered), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Pushes, a conflict, a group commit and a dispatch are counted under
/// their documented names (this test's process has the recorder to itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_conflicts_commits_and_dispatch_are_recorded() {
    let handle = switchyard::metrics::install().expect("the recorder");
    let s = TestServer::start().await;
    s.battery("m1").await;
    let mut c = s.actions();
    c.push_action(push(
        "m1",
        window(Command::Charge, H, 2 * H),
        S::Unspecified,
    ))
    .await
    .unwrap();
    let e = c
        .push_action(push(
            "m1",
            window(Command::Discharge, H, 2 * H),
            S::Unspecified,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    s.dispatch_at(H + 3).await;
    let text = handle.render();
    let got = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        got(r#"switchyard_push_total{outcome="accepted",reason=""}"#),
        1.0
    );
    assert_eq!(
        got(r#"switchyard_push_total{outcome="refused",reason="ACTION_CONFLICT"}"#),
        1.0
    );
    assert_eq!(
        got(r#"switchyard_conflicts_total{reason="ACTION_CONFLICT"}"#),
        1.0
    );
    assert!(got("switchyard_group_commit_size_count") >= 1.0);
    // The action was applied 3 s after it was due.
    assert_eq!(got("switchyard_dispatch_lateness_seconds_count"), 1.0);
    assert_eq!(
        got(r#"switchyard_dispatch_lateness_seconds_bucket{le="2"}"#),
        0.0
    );
    assert_eq!(
        got(r#"switchyard_dispatch_lateness_seconds_bucket{le="5"}"#),
        1.0
    );
    assert_eq!(
        got(r#"switchyard_driver_call_seconds_count{driver="simulated",op="apply"}"#),
        1.0
    );
    assert!(text.contains("# TYPE switchyard_dispatch_lateness_seconds histogram"));
    // An OEM account's budget, labelled by its driver alone: 1,440 calls a
    // day is a bucket of 60, and two calls leave 58/60 of it.
    let budget = switchyard_drivers::RateBudget {
        calls_per_day: 1440,
        min_write_interval_seconds: 0,
    };
    for device in ["d1", "d2"] {
        s.app
            .budgets
            .take(
                "foxess:http://cloud.example#file:key",
                device,
                &budget,
                s.clock_now(),
            )
            .await
            .unwrap();
    }
    // A watch that reads the events so far is behind by all of them.
    let mut watch =
        switchyard_proto::v1::event_service_client::EventServiceClient::new(s.channel.clone())
            .watch_events(switchyard_proto::v1::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
    watch.message().await.unwrap().unwrap();
    let text = handle.render();
    let got = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        got(r#"switchyard_oem_budget_remaining_ratio_count{driver="foxess"}"#),
        2.0
    );
    assert_eq!(
        got(r#"switchyard_oem_budget_remaining_ratio_bucket{driver="foxess",le="0.75"}"#),
        0.0
    );
    assert!(
        !text.contains("cloud.example"),
        "an account is never a label"
    );
    assert_eq!(got("switchyard_watch_backlog_events_count"), 1.0);
    assert!(got("switchyard_watch_backlog_events_sum") >= 4.0, "{text}");
    assert_eq!(got("switchyard_event_watches"), 1.0);
}

/// A charge from this time tomorrow, for an hour (the server reads the
/// system clock).
fn tomorrow() -> switchyard_proto::v1::Action {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    switchyard_proto::v1::Action {
        command: Command::Charge as i32,
        start_time: at(now + 24 * H),
        end_time: at(now + 25 * H),
        ..Default::default()
    }
}

async fn http(addr: &str, request: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// `--metrics-listen` serves GET /metrics in the Prometheus text format,
/// and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_prometheus_text() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("m.db").display());
    let p = ServerProcess::spawn_with(BIN, &db, &["--metrics-listen", "127.0.0.1:0"], &[]);
    let line = p
        .log()
        .into_iter()
        .find(|l| l.contains(r#""message":"listening""#))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = v["fields"]["metrics_addr"].as_str().unwrap().to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let ch = p.channel().await;
    switchyard_proto::v1::device_service_client::DeviceServiceClient::new(ch.clone())
        .create_device(battery_request("p1"))
        .await
        .unwrap();
    switchyard_proto::v1::action_service_client::ActionServiceClient::new(ch)
        .push_action(push("p1", tomorrow(), S::Unspecified))
        .await
        .unwrap();
    let ok = http(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("content-type: text/plain; version=0.0.4"),
        "{ok}"
    );
    let body = ok.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        sample(
            body,
            r#"switchyard_push_total{outcome="accepted",reason=""}"#
        ),
        Some(1.0),
        "{body}"
    );
    let missing = http(&addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = http(&addr, "POST /metrics HTTP/1.1\r\ncontent-length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    // A scraper that sends a huge head is cut off, and the server goes on.
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        if let Ok(mut c) = tokio::net::TcpStream::connect(&addr).await {
            let _ = c.write_all(big.as_bytes()).await;
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink).await;
        }
    })
    .await;
    let again = http(&addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");
}
