//! The no-double-booking guarantee across processes.
//!
//! The in-process storm (server.rs) sends every push through one server,
//! whose single write connection already serialises them: it would pass
//! even if the store decided collisions from rows read outside its write
//! transaction. Here two server processes share one SQLite file, so only
//! the database's write lock (`BEGIN IMMEDIATE`) keeps one process from
//! booking on a stale view of the other's writes. A checker then reads the
//! file itself, so the verdict does not rest on what the servers report:
//! no two holding actions overlap on a channel, now or at any commit in
//! the audit log's history.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    collections::{BTreeMap, HashMap},
    str::FromStr,
    sync::Arc,
    time::Instant,
};

use sqlx::{Connection, Row, sqlite::SqliteConnectOptions};
use switchyard_proto::v1::{
    self as pb, Command, ConflictStrategy as S, action_service_client::ActionServiceClient,
    device_service_client::DeviceServiceClient,
};
use switchyard_tests::{ServerProcess, details, push};
use tonic::Code;

const MIN: i64 = 60;
const H: i64 = 3600;
const SECOND_NS: i64 = 1_000_000_000;
/// Devices the storm spreads over; each has one "mode" channel.
const DEVICES: usize = 3;
/// Pushes in the storm, half to each process.
const PUSHES: usize = 400;

/// What one push asked for.
#[derive(Clone, Debug)]
struct Ask {
    server: usize,
    device: String,
    strategy: S,
    start: i64,
    end: Option<i64>,
}

/// An accepted push, as its client saw it.
#[derive(Debug)]
struct Booked {
    server: usize,
    start_ns: i64,
    end_ns: Option<i64>,
}

/// splitmix64: a seeded sequence is enough here, and the tests crate needs
/// no `rand` for it.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ts(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

fn ns(t: &prost_types::Timestamp) -> i64 {
    t.seconds * SECOND_NS + i64::from(t.nanos)
}

/// The storm's pushes; both processes push to every device. Windows start
/// on 5-minute slots over 3 hours and last 30 minutes to 2 hours, so most
/// pairs on a device overlap and a push decided on a stale view nearly
/// always collides with what it missed. Most pushes have no strategy; a
/// quarter CANCEL_AND_REPLACE, which is always accepted here (nothing is
/// in flight), so each is a decision a stale read would get wrong. A few
/// open-ended pushes start after that span, so QUEUE_AFTER sometimes meets
/// one (OPEN_ENDED_CONFLICT).
fn asks(seed: u64, base: i64) -> Vec<Ask> {
    let mut rng = Rng(seed);
    (0..PUSHES)
        .map(|i| {
            let strategy = match rng.below(100) {
                0..60 => S::Unspecified,
                60..85 => S::CancelAndReplace,
                _ => S::QueueAfter,
            };
            let (start, end) = if rng.below(100) < 3 {
                (base + 4 * H + rng.below(24) as i64 * 5 * MIN, None)
            } else {
                let start = base + rng.below(36) as i64 * 5 * MIN;
                (start, Some(start + (6 + rng.below(19) as i64) * 5 * MIN))
            };
            Ask {
                server: i % 2,
                device: format!("storm-{}", (i / 2) % DEVICES),
                strategy,
                start,
                end,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_server_processes_on_one_sqlite_file_never_double_book() {
    let seed = std::env::var("STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    // Every storm must keep every rule. The scheduler decides how often the
    // two processes take turns at the write lock: a storm in which one
    // process booked (nearly) all before the other raced little, so it is
    // run again, a few times at most, until the two really interleaved.
    let mut turns = Vec::new();
    for attempt in 0..4_u64 {
        // STORM_SEED replays the same pushes (not the same interleaving).
        let seed = seed.wrapping_add(attempt);
        eprintln!("storm seed {seed}");
        let handovers = storm(seed).await;
        turns.push(handovers);
        if handovers >= 2 {
            return;
        }
    }
    panic!("the write lock never changed process more than once in 4 storms: {turns:?}");
}

/// One storm on a fresh file: every rule checked; returns how often the
/// write lock changed process between bookings.
async fn storm(seed: u64) -> usize {
    let began = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let db = format!("sqlite://{}", path.display());
    let exe = env!("CARGO_BIN_EXE_switchyard-under-test");
    // One after the other: the second finds the schema already migrated.
    let servers = [
        ServerProcess::spawn(exe, &db),
        ServerProcess::spawn(exe, &db),
    ];
    let channels = [servers[0].channel().await, servers[1].channel().await];

    let mut devices = DeviceServiceClient::new(channels[0].clone());
    for d in 0..DEVICES {
        devices
            .create_device(pb::CreateDeviceRequest {
                device_id: format!("storm-{d}"),
                device: Some(pb::Device {
                    family: pb::DeviceFamily::Battery as i32,
                    driver: "simulated".into(),
                    settings: BTreeMap::from([("latency_ms".into(), "0".into())]),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap();
    }

    // The servers read the system clock; six hours ahead nothing is due
    // during the test, so every booking stays SCHEDULED and the dispatcher
    // changes nothing the checker reads.
    let asks = asks(seed, unix_now() + 6 * H);
    let storm = Instant::now();
    // In two waves, the second sent once the first is answered: on a busy
    // machine one process's group commit can take a whole wave before the
    // other gets the write lock, and a second wave makes the lock change
    // hands again on the devices the first booked.
    let mut results = Vec::with_capacity(asks.len());
    for wave in asks.chunks(asks.len().div_ceil(2)) {
        let gate = Arc::new(tokio::sync::Barrier::new(wave.len()));
        let tasks: Vec<_> = wave
            .iter()
            .cloned()
            .map(|ask| {
                let mut client = ActionServiceClient::new(channels[ask.server].clone());
                let gate = gate.clone();
                tokio::spawn(async move {
                    let action = pb::Action {
                        command: Command::Charge as i32,
                        start_time: Some(ts(ask.start)),
                        end_time: ask.end.map(ts),
                        ..Default::default()
                    };
                    let req = push(&ask.device, action, ask.strategy);
                    // A wave's pushes leave together, so the two processes
                    // contend.
                    gate.wait().await;
                    client.push_action(req).await
                })
            })
            .collect();
        for task in tasks {
            results.push(task.await.unwrap());
        }
    }

    let mut booked: HashMap<String, Booked> = HashMap::new();
    // Cancelled action -> the push that reported cancelling it.
    let mut cancelled: HashMap<String, String> = HashMap::new();
    // (action, first replacer, second replacer)
    let mut cancelled_twice: Vec<(String, String, String)> = Vec::new();
    let mut refused: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut accepted_by = [0usize; 2];
    for (ask, result) in asks.iter().zip(results) {
        match result {
            Ok(r) => {
                let r = r.into_inner();
                let a = r.action.unwrap();
                accepted_by[ask.server] += 1;
                for c in &r.cancelled_actions {
                    assert_eq!(c.replaced_by_action_id, a.action_id);
                    // An action is cancelled once: two pushes that both
                    // replace it decided on the same stale state. Checked
                    // after the database checker has had its say.
                    if let Some(first) = cancelled.get(&c.action_id) {
                        cancelled_twice.push((
                            c.action_id.clone(),
                            first.clone(),
                            a.action_id.clone(),
                        ));
                    } else {
                        cancelled.insert(c.action_id.clone(), a.action_id.clone());
                    }
                }
                booked.insert(
                    a.action_id.clone(),
                    Booked {
                        server: ask.server,
                        start_ns: ns(a.start_time.as_ref().unwrap()),
                        end_ns: a.end_time.as_ref().map(ns),
                    },
                );
            }
            Err(st) => {
                // Only typed refusals: a collision, or the database busy
                // beyond the busy timeout under the other process's lock.
                let reason = match (st.code(), details(&st).reason()) {
                    (Code::FailedPrecondition, "ACTION_CONFLICT") => "ACTION_CONFLICT",
                    (Code::FailedPrecondition, "ACTION_IN_FLIGHT") => "ACTION_IN_FLIGHT",
                    (Code::FailedPrecondition, "OPEN_ENDED_CONFLICT") => "OPEN_ENDED_CONFLICT",
                    (Code::Unavailable, "STORAGE_UNAVAILABLE") => {
                        eprintln!("storage unavailable: {}", st.message());
                        "STORAGE_UNAVAILABLE"
                    }
                    _ => panic!("untyped refusal of {ask:?}: {st:?}"),
                };
                *refused.entry(reason).or_default() += 1;
            }
        }
    }
    let storm_time = storm.elapsed();
    eprintln!(
        "{PUSHES} pushes in {storm_time:.2?}: accepted {} by process A, {} by process B, {} cancelled by replacement; refused {refused:?}",
        accepted_by[0],
        accepted_by[1],
        cancelled.len()
    );
    assert!(
        accepted_by.iter().all(|n| *n > 0),
        "both processes must book, or only one writer was tested: {accepted_by:?}"
    );
    let unavailable = refused.get("STORAGE_UNAVAILABLE").copied().unwrap_or(0);
    assert!(
        unavailable * 2 < PUSHES,
        "{unavailable} of {PUSHES} pushes found storage unavailable"
    );

    // Killed, not stopped: every acknowledged push was committed before it
    // was answered, so the file holds all of them without a clean shutdown.
    drop(servers);
    let census = census(&path).await;
    // Commit order, by process: how often the write lock changed hands
    // between the two (1 would mean one process booked all before the
    // other began, and the storm tested little).
    let order: Vec<usize> = census
        .booking_order
        .iter()
        .filter_map(|id| booked.get(id).map(|b| b.server))
        .collect();
    let handovers = order.windows(2).filter(|w| w[0] != w[1]).count();
    eprintln!(
        "checked {} action rows: {} holding, {} overlapping pairs now, {} ever; the write lock changed process {handovers} times; {:.2?} overall",
        census.rows.len(),
        census.holding,
        census.overlaps.len(),
        census.overlapped.len(),
        began.elapsed()
    );
    assert!(
        census.overlaps.is_empty(),
        "holding actions overlap on one channel: {:#?}",
        census.overlaps
    );
    assert!(
        census.overlapped.is_empty(),
        "actions booked over a holding action (since replaced): {:#?}",
        census.overlapped
    );
    assert!(
        cancelled_twice.is_empty(),
        "actions replaced by two pushes: {cancelled_twice:#?}"
    );

    // The file holds exactly what clients were told: each booked action,
    // still holding or cancelled by the push that said so, and nothing from
    // a refused push.
    for (id, b) in &booked {
        let row = census
            .rows
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged action {id} (process {}) missing", b.server));
        assert_eq!(
            (row.start_ns, row.end_ns),
            (b.start_ns, b.end_ns),
            "{id}: stored window differs from the one answered"
        );
        match cancelled.get(id) {
            None => assert!(row.holding, "{id} is {} but was never replaced", row.state),
            Some(by) => {
                assert_eq!(
                    (row.state.as_str(), row.replaced_by.as_deref()),
                    ("CANCELLED", Some(by.as_str())),
                    "{id} was reported replaced"
                );
                assert!(booked.contains_key(by), "replacer {by} was acknowledged");
            }
        }
    }
    for id in census.rows.keys() {
        assert!(booked.contains_key(id), "row {id} no client was told about");
    }
    assert_eq!(census.holding, booked.len() - cancelled.len());
    handovers
}

/// One row of `actions`, as the checker reads it.
#[derive(Debug)]
struct Stored {
    state: String,
    replaced_by: Option<String>,
    start_ns: i64,
    end_ns: Option<i64>,
    holding: bool,
}

/// What the checker found in the database file.
#[derive(Debug)]
struct Census {
    rows: HashMap<String, Stored>,
    holding: usize,
    /// (device, channel, action, action) of each overlapping holding pair.
    overlaps: Vec<(String, String, String, String)>,
    /// (device, channel, holder, newcomer): actions booked, by the audit
    /// log's commit order, while an overlapping one still held the channel.
    /// A later CANCEL_AND_REPLACE can clear a double booking from the final
    /// state; it stays in the history.
    overlapped: Vec<(String, String, String, String)>,
    /// Booked actions in commit order (from the audit log).
    booking_order: Vec<String>,
}

/// Whether a row (of table alias `t`, e.g. "a.") holds its channel, as the
/// store defines it: a cancelled action whose revert is owed holds it too.
fn holding(t: &str) -> String {
    format!("({t}state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR {t}work = 'REVERT')")
}

/// Reads the database file directly: every action row, and every pair of
/// holding actions on one channel whose half-open windows [start_ns,
/// end_ns) overlap (no end: until forever). Opened read-write though it
/// only reads: after SIGKILL the write-ahead log may need recovering,
/// which a read-only connection cannot do (SQLITE_READONLY_RECOVERY).
async fn census(path: &std::path::Path) -> Census {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap();
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    let (a_holding, b_holding) = (holding("a."), holding("b."));
    let overlaps = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT a.device_id, a.channel, a.action_id, b.action_id
           FROM actions a JOIN actions b
             ON a.tenant_id = b.tenant_id AND a.device_id = b.device_id
            AND a.channel = b.channel AND a.rowid < b.rowid
            AND a.start_ns < COALESCE(b.end_ns, 9223372036854775807)
            AND b.start_ns < COALESCE(a.end_ns, 9223372036854775807)
          WHERE {a_holding} AND {b_holding}"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    let rows: HashMap<String, Stored> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT action_id, state, replaced_by, start_ns, end_ns, {} AS holding FROM actions",
        holding("")
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get("action_id"),
            Stored {
                state: r.get("state"),
                replaced_by: r.get("replaced_by"),
                start_ns: r.get("start_ns"),
                end_ns: r.get("end_ns"),
                holding: r.get::<i64, _>("holding") != 0,
            },
        )
    })
    .collect();
    // Each action holds its channel from the audit row that booked it to
    // the first that ended it. (Nothing is applied in this storm, so a
    // cancelled action owes no revert and stops holding at once.)
    let overlapped = sqlx::query(
        "WITH life AS (
           SELECT x.tenant_id, x.device_id, x.channel, x.action_id, x.start_ns, x.end_ns,
             (SELECT MIN(seq) FROM audit_log l WHERE l.tenant_id = x.tenant_id
                AND l.action_id = x.action_id AND l.from_state IS NULL) AS born,
             (SELECT MIN(seq) FROM audit_log l WHERE l.tenant_id = x.tenant_id
                AND l.action_id = x.action_id
                AND l.to_state IN ('CANCELLED', 'COMPLETED', 'FAILED')) AS died
           FROM actions x)
         SELECT a.device_id, a.channel, a.action_id, b.action_id
           FROM life a JOIN life b
             ON a.tenant_id = b.tenant_id AND a.device_id = b.device_id
            AND a.channel = b.channel
            AND a.born < b.born AND b.born < COALESCE(a.died, 9223372036854775807)
            AND a.start_ns < COALESCE(b.end_ns, 9223372036854775807)
            AND b.start_ns < COALESCE(a.end_ns, 9223372036854775807)",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    let booking_order =
        sqlx::query_scalar("SELECT action_id FROM audit_log WHERE action_id IS NOT NULL AND from_state IS NULL ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let holding = rows.values().filter(|r| r.holding).count();
    Census {
        rows,
        holding,
        overlaps,
        overlapped,
        booking_order,
    }
}
