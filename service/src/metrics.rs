//! Metrics (docs/operations.md, "Metrics"): recorded through the `metrics`
//! facade wherever they happen, and served in the Prometheus text format
//! at `/metrics` on `--metrics-listen` (off unless configured).
//!
//! Every name starts `switchyard_`. Labels take only values the server
//! chooses (outcomes, error reasons, driver names, operations), never a
//! tenant's, device's or caller's: their number stays bounded.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    domain::Error,
    telemetry::{attrs, instruments as otel},
};

/// PushAction calls answered (not `validate_only` ones), by `outcome`
/// (`accepted`, also a replay of an accepted push; `refused`: the caller's
/// request or a conflict; `failed`: the server could not) and `reason`
/// (the error reason; empty when accepted).
pub const PUSH_TOTAL: &str = "switchyard_push_total";
/// Pushes refused by a collision, by `reason` (ACTION_CONFLICT,
/// ACTION_IN_FLIGHT, OPEN_ENDED_CONFLICT, ...).
pub const CONFLICTS_TOTAL: &str = "switchyard_conflicts_total";
/// Writes committed together per group commit.
pub const GROUP_COMMIT_SIZE: &str = "switchyard_group_commit_size";
/// How late an action's command was sent: when the driver was called
/// minus the action's start, in seconds (retries and rate-budget waits
/// included).
pub const DISPATCH_LATENESS: &str = "switchyard_dispatch_lateness_seconds";
/// Driver calls' duration, by `driver` and `op` (apply, revert).
pub const DRIVER_CALL_SECONDS: &str = "switchyard_driver_call_seconds";
/// Driver calls that failed, by `driver` and `op`.
pub const DRIVER_ERRORS_TOTAL: &str = "switchyard_driver_errors_total";
/// Webhook delivery attempts, by `outcome` (delivered, failed, gone).
pub const WEBHOOK_DELIVERIES_TOTAL: &str = "switchyard_webhook_deliveries_total";
/// Event watches open on this server.
pub const EVENT_WATCHES: &str = "switchyard_event_watches";
/// What is left of an OEM account's rate budget after each write call, as
/// a fraction of its bucket (an hour of its daily allowance), by `driver`.
pub const OEM_BUDGET_REMAINING: &str = "switchyard_oem_budget_remaining_ratio";
/// Events a watch found to send per read (a full page, 500, means it is at
/// least that far behind).
pub const WATCH_BACKLOG: &str = "switchyard_watch_backlog_events";
/// How old the first event of a watch's read was: how far behind, in
/// seconds, the watch is.
pub const WATCH_LAG: &str = "switchyard_watch_lag_seconds";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same
/// handle). `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(DISPATCH_LATENESS.into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(DRIVER_CALL_SECONDS.into()), &seconds)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(GROUP_COMMIT_SIZE.into()), &sizes)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WATCH_LAG.into()), &seconds))
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(WATCH_BACKLOG.into()),
                        &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(OEM_BUDGET_REMAINING.into()),
                        &[0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0],
                    )
                })
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(PUSH_TOTAL, "Durable pushes by outcome and reason.");
    metrics::describe_counter!(CONFLICTS_TOTAL, "Pushes refused by a collision, by reason.");
    metrics::describe_histogram!(GROUP_COMMIT_SIZE, "Writes committed per group commit.");
    metrics::describe_histogram!(
        DISPATCH_LATENESS,
        metrics::Unit::Seconds,
        "How late each action's command was sent after it was due."
    );
    metrics::describe_histogram!(
        DRIVER_CALL_SECONDS,
        metrics::Unit::Seconds,
        "Driver calls' duration by driver and operation."
    );
    metrics::describe_counter!(DRIVER_ERRORS_TOTAL, "Driver calls that failed.");
    metrics::describe_counter!(
        DISPATCH_MISSED_TOTAL,
        "Actions whose window ended before their command could be sent."
    );
    metrics::describe_counter!(
        WEBHOOK_DELIVERIES_TOTAL,
        "Webhook delivery attempts by outcome."
    );
    metrics::describe_gauge!(EVENT_WATCHES, "Event watches open on this server.");
    metrics::describe_histogram!(
        OEM_BUDGET_REMAINING,
        "Fraction of an OEM account's rate budget left after each write call, by driver."
    );
    metrics::describe_histogram!(WATCH_BACKLOG, "Events a watch found to send per read.");
    metrics::describe_histogram!(
        WATCH_LAG,
        metrics::Unit::Seconds,
        "How old the first event of a watch's read was."
    );
}

/// Records a push's outcome.
pub fn push<T>(outcome: &Result<T, Error>) {
    let (outcome, reason) = match outcome {
        Ok(_) => ("accepted", ""),
        Err(e) => {
            let (code, reason) = crate::api::status::classify(e);
            let server_side = matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::Internal
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Unknown
            );
            if matches!(e, Error::Conflict(_)) {
                metrics::counter!(CONFLICTS_TOTAL, "reason" => reason.reason()).increment(1);
                if let Some(i) = otel() {
                    i.conflicts.add(1, &attrs(&[("reason", reason.reason())]));
                }
            }
            (
                if server_side { "failed" } else { "refused" },
                reason.reason(),
            )
        }
    };
    metrics::counter!(PUSH_TOTAL, "outcome" => outcome, "reason" => reason).increment(1);
    if let Some(i) = otel() {
        i.push
            .add(1, &attrs(&[("outcome", outcome), ("reason", reason)]));
    }
}

/// Records a group commit of `members` writes.
pub fn group_commit(members: usize) {
    metrics::histogram!(GROUP_COMMIT_SIZE).record(members as f64);
    if let Some(i) = otel() {
        i.group_commit.record(members as f64, &[]);
    }
}

/// Actions whose window ended before their command could be sent.
pub const DISPATCH_MISSED_TOTAL: &str = "switchyard_dispatch_missed_total";

/// Records that an action starting at `due_nanos` was sent at `now_nanos`.
pub fn dispatch_lateness(due_nanos: i64, now_nanos: i64) {
    let late = (now_nanos.saturating_sub(due_nanos)).max(0) as f64 / 1e9;
    metrics::histogram!(DISPATCH_LATENESS).record(late);
    if let Some(i) = otel() {
        i.lateness.record(late, &[]);
    }
}

/// Records an action whose window was missed.
pub fn dispatch_missed() {
    metrics::counter!(DISPATCH_MISSED_TOTAL).increment(1);
    if let Some(i) = otel() {
        i.missed.add(1, &[]);
    }
}

/// Records what is left of an OEM account's budget after a write call
/// (`remaining`: tokens over the bucket's capacity, 0 to 1), by driver.
pub fn oem_budget(account: &str, remaining: f64) {
    // Accounts name their driver first (`foxess:…`, `simulated/…`); the
    // account itself is not a label (one per device for some drivers).
    let driver = account
        .split([':', '/'])
        .next()
        .unwrap_or("")
        .chars()
        .take(32)
        .collect::<String>();
    let remaining = remaining.clamp(0.0, 1.0);
    if let Some(i) = otel() {
        i.budget.record(remaining, &attrs(&[("driver", &driver)]));
    }
    metrics::histogram!(OEM_BUDGET_REMAINING, "driver" => driver).record(remaining);
}

/// Records a watch's read: how many events it found to send (a full page
/// means at least that many behind), and how old the first of them is.
pub fn watch_read(events: usize, oldest_nanos: i64, now_nanos: i64) {
    let lag = (now_nanos.saturating_sub(oldest_nanos)).max(0) as f64 / 1e9;
    metrics::histogram!(WATCH_BACKLOG).record(events as f64);
    metrics::histogram!(WATCH_LAG).record(lag);
    if let Some(i) = otel() {
        i.watch_backlog.record(events as f64, &[]);
        i.watch_lag.record(lag, &[]);
    }
}

/// Records a driver call.
pub fn driver_call(driver: &str, op: &'static str, took: Duration, ok: bool) {
    if let Some(i) = otel() {
        let labels = attrs(&[("driver", driver), ("op", op)]);
        i.driver_call.record(took.as_secs_f64(), &labels);
        if !ok {
            i.driver_errors.add(1, &labels);
        }
    }
    let driver = driver.to_owned();
    metrics::histogram!(DRIVER_CALL_SECONDS, "driver" => driver.clone(), "op" => op)
        .record(took.as_secs_f64());
    if !ok {
        metrics::counter!(DRIVER_ERRORS_TOTAL, "driver" => driver, "op" => op).increment(1);
    }
}

/// Records a webhook delivery attempt (`DELIVERED`, `FAILED`, `GONE`).
pub fn webhook_attempt(outcome: &str) {
    let outcome = match outcome {
        "DELIVERED" => "delivered",
        "GONE" => "gone",
        _ => "failed",
    };
    metrics::counter!(WEBHOOK_DELIVERIES_TOTAL, "outcome" => outcome).increment(1);
    if let Some(i) = otel() {
        i.webhooks.add(1, &attrs(&[("outcome", outcome)]));
    }
}

/// Records that an event watch opened (+1) or closed (-1).
pub fn watch(delta: f64) {
    metrics::gauge!(EVENT_WATCHES).increment(delta);
    if let Some(i) = otel() {
        i.watches.add(delta, &[]);
    }
}

/// Longest request head a scraper may send.
const MAX_HEAD: usize = 8 * 1024;
/// Scrapes served at once.
const MAX_SCRAPES: usize = 16;
/// How long a scraper has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves `GET /metrics` on `listener` until the task is dropped: a small
/// HTTP/1.1 responder (one request per connection, bounded in size and
/// time), enough for Prometheus and `curl`.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    // Scrapers are few: more connections at once than this are closed at
    // once, so this port cannot hold the process's file handles.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(conn);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, &handle)).await;
            drop(slot);
        });
    }
}

async fn answer(mut conn: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut chunk).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok(true)
    };
    if !matches!(
        tokio::time::timeout(HEAD_TIMEOUT, read_head).await,
        Ok(Ok(true))
    ) {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}
