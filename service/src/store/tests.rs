//! Storage faults are classified by the database's error code: what a retry
//! may cure is STORAGE_UNAVAILABLE, provoked here for real.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::{collections::BTreeMap, io::BufRead as _, sync::Arc, time::Duration};

use sea_orm::ConnectionTrait;

use super::{Store, StoreOptions};
use crate::domain::{Device, DeviceId, Error, Family, ManualClock, TenantId, Ts};

fn device(id: &str, settings: BTreeMap<String, String>) -> Device {
    Device {
        id: DeviceId::parse(id).unwrap(),
        display_name: String::new(),
        family: Family::Battery,
        driver: "simulated".into(),
        oem_device_id: String::new(),
        timezone: "UTC".into(),
        settings: settings.into(),
        revision: 0,
        created: Ts(0),
        updated: Ts(0),
        observed: None,
        incarnation: String::new(),
    }
}

async fn open(path: &std::path::Path, busy: Duration) -> Store {
    let url = format!("sqlite://{}", path.display());
    Store::open_with(
        &url,
        Arc::new(ManualClock::new(Ts(0))),
        &StoreOptions {
            busy_timeout: busy,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Another process (Python's sqlite3) takes the write lock and keeps it
/// past the busy timeout.
#[tokio::test]
async fn a_write_lock_held_by_another_process_is_storage_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path, Duration::from_millis(200)).await;
    let tenant = TenantId::default_tenant();
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('locked', flush=True)\n\
             time.sleep(30)\n",
        )
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");

    let refused = store
        .create_device(&tenant, device("d1", BTreeMap::new()), None)
        .await
        .expect_err("the lock is held");
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        matches!(refused, Error::StorageUnavailable(_)),
        "busy is a retryable storage fault: {refused:?}"
    );
    // Once the lock is gone, the same write succeeds.
    store
        .create_device(&tenant, device("d1", BTreeMap::new()), None)
        .await
        .unwrap();
}

/// The database file may not grow: a write that needs room is
/// SQLITE_FULL, a retryable storage fault, and nothing is half-written.
#[tokio::test]
async fn a_full_database_is_storage_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let tenant = TenantId::default_tenant();
    let pages: i64 = scalar(&store.write, "PRAGMA page_count").await;
    store
        .write
        .execute_unprepared(&format!("PRAGMA max_page_count = {pages}"))
        .await
        .unwrap();
    let big: BTreeMap<String, String> = (0..64)
        .map(|i| (format!("k{i}"), "v".repeat(2048)))
        .collect();
    let refused = store
        .create_device(&tenant, device("big", big), None)
        .await
        .expect_err("no room");
    assert!(
        matches!(refused, Error::StorageUnavailable(_)),
        "disk full is a retryable storage fault: {refused:?}"
    );
    assert_eq!(store.count_devices(&tenant).await.unwrap(), 0);
}

/// A stored observation that cannot be read is an error, never "not
/// observed" (which would let pushes past an active native scheduler).
#[tokio::test]
async fn an_unreadable_observation_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let tenant = TenantId::default_tenant();
    let d = store
        .create_device(&tenant, device("d", BTreeMap::new()), None)
        .await
        .unwrap();
    store
        .write
        .execute_unprepared(
            "UPDATE devices SET observed = '{\"scheduler_active\": tru', observed_ns = 1",
        )
        .await
        .unwrap();
    let e = store
        .get_device(&tenant, &d.id)
        .await
        .expect_err("unreadable");
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
    // A column of the wrong type is an error too, not a panic.
    store
        .write
        .execute_unprepared("UPDATE devices SET observed = NULL, revision = 'x'")
        .await
        .unwrap();
    let e = store
        .get_device(&tenant, &d.id)
        .await
        .expect_err("bad column");
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
}

#[test]
fn codes_a_retry_may_cure_are_transient() {
    for c in [
        "5", "6", "7", "10", "13", "14", "15", "261", "517", "266", "3850",
    ] {
        assert!(super::sqlite_transient(c), "{c}");
    }
    for c in ["1", "11", "19", "26", "2067", "787", "x", ""] {
        assert!(!super::sqlite_transient(c), "{c}");
    }
}

/// PostgreSQL SQLSTATEs: a lost race is run again, an unreachable or
/// overloaded server is a retryable fault, the rest is INTERNAL.
#[test]
fn sqlstates_are_classified() {
    use super::{Class, postgres_class};
    for c in ["40001", "40P01", "23P01", "55P03"] {
        assert_eq!(postgres_class(c), Class::Contention, "{c}");
    }
    for c in [
        "08000", "08006", "08001", "57P01", "57P02", "57P03", "53300", "53100", "58030", "57014",
        "25006",
    ] {
        assert_eq!(postgres_class(c), Class::Transient, "{c}");
    }
    for c in ["23505", "23503", "42P01", "22P02", "XX000", ""] {
        assert_eq!(postgres_class(c), Class::Internal, "{c}");
    }
}

/// An observation made of a device that was since deleted and created
/// again under the same id (revision 1 once more) is not recorded on the
/// new device: it could hide the new device's native scheduler.
#[tokio::test]
async fn an_observation_of_a_deleted_device_does_not_land_on_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let tenant = TenantId::default_tenant();
    let old = store
        .create_device(&tenant, device("d", BTreeMap::new()), None)
        .await
        .unwrap();
    store
        .delete_device(&tenant, &old.id, None, false, None)
        .await
        .unwrap();
    let new = store
        .create_device(&tenant, device("d", BTreeMap::new()), None)
        .await
        .unwrap();
    assert_eq!((old.revision, new.revision), (1, 1));
    let seen = crate::domain::Observed {
        scheduler_active: false,
        rows: vec![],
        soc_percent: None,
        mode: None,
        at: Ts(5),
    };
    assert!(!store.observe(&tenant, &old, &seen).await.unwrap());
    assert!(
        store
            .get_device(&tenant, &new.id)
            .await
            .unwrap()
            .observed
            .is_none()
    );
    assert!(store.observe(&tenant, &new, &seen).await.unwrap());
}

/// Releasing a request_id never discards a recorded answer: a call
/// dropped just after its commit keeps its answer for the retry.
#[tokio::test]
async fn releasing_a_request_id_after_its_commit_keeps_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let tenant = TenantId::default_tenant();
    let super::IdemBegin::Fresh(claim) = store
        .idem_begin(&tenant, "r1", "CreateDevice", b"body")
        .await
        .unwrap()
    else {
        panic!("a fresh key")
    };
    let commit = super::IdemCommit {
        request_id: "r1".into(),
        claim: claim.clone(),
        unwritten: None,
        at_ns: 0,
        encode: Box::new(|_: &Device| b"answer".to_vec()),
    };
    store
        .create_device(&tenant, device("d", BTreeMap::new()), Some(commit))
        .await
        .unwrap();
    // The drop guard's release, arriving after the commit.
    store.idem_abort(&tenant, "r1", &claim).await.unwrap();
    assert_eq!(
        store
            .idem_begin(&tenant, "r1", "CreateDevice", b"body")
            .await
            .unwrap(),
        super::IdemBegin::Replay(b"answer".to_vec())
    );
}

/// Rows are stored under the tenant they belong to.
#[tokio::test]
async fn rows_carry_their_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let tenant = TenantId::default_tenant();
    assert_eq!(tenant.as_str(), "default");
    store
        .create_device(&tenant, device("d", BTreeMap::new()), None)
        .await
        .unwrap();
    let stored: String = scalar(&store.read, "SELECT tenant_id FROM devices").await;
    assert_eq!(stored, "default");
}

/// Each connection keeps the page cache it was sized for: the writer
/// 8 MiB and its savepoints' journal in memory, each reader 2 MiB
/// (docs/performance.md). Swapped or lost, a storm's memory or its
/// writes change with nothing else failing.
#[tokio::test]
async fn the_writer_and_readers_keep_their_page_caches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let writer: i64 = scalar(&store.write, "PRAGMA cache_size").await;
    assert_eq!(writer, -8192);
    let temp: i64 = scalar(&store.write, "PRAGMA temp_store").await;
    assert_eq!(temp, 2, "the writer's temporary pages are kept in memory");
    let reader: i64 = scalar(&store.read, "PRAGMA cache_size").await;
    assert_eq!(reader, -2048);
}

/// How often SQLite prepared a statement again while it was run on `conn`
/// with one value, another, and the first again (its own counter).
fn reprepares(conn: &rusqlite::Connection) -> i32 {
    let mut st = conn
        .prepare("SELECT count(*) FROM skewed WHERE k = ?1")
        .unwrap();
    for k in [0, 995, 0] {
        let _: i64 = st.query_row([k], |r| r.get(0)).unwrap();
    }
    st.get_status(rusqlite::StatementStatus::RePrepare)
}

/// Every connection of the store, the writer's and the readers', plans a
/// statement once, whatever its values (`plan_once`). Without that, once
/// `ANALYZE` has written STAT4 samples, a kept statement is prepared
/// again whenever the values bound to it change: at a million actions a
/// push took twice as long, the writer planning its conflict checks over
/// and over (docs/performance.md).
#[tokio::test]
#[allow(unsafe_code)]
async fn every_connection_plans_a_statement_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path, Duration::from_secs(1)).await;
    {
        // A skewed column and its statistics, as ANALYZE writes them.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE skewed (k INTEGER); CREATE INDEX skewed_k ON skewed (k);
             WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999)
             INSERT INTO skewed SELECT CASE WHEN i < 990 THEN 0 ELSE i END FROM n;
             ANALYZE;",
        )
        .unwrap();
        let samples: i64 = c
            .query_row("SELECT count(*) FROM sqlite_stat4", [], |r| r.get(0))
            .unwrap();
        assert!(samples > 0, "the bundled SQLite writes STAT4 samples");
        // A connection of its own, without the guarantee, plans again.
        assert!(reprepares(&c) > 0);
    }
    for (what, pool) in [("writer", &store.write), ("reader", &store.read)] {
        let mut conn = pool.get_sqlite_connection_pool().acquire().await.unwrap();
        let mut handle = conn.lock_handle().await.unwrap();
        // SAFETY: the handle is open and locked for the test; a connection
        // made from it does not close it.
        let c =
            unsafe { rusqlite::Connection::from_handle(handle.as_raw_handle().as_ptr()) }.unwrap();
        assert_eq!(reprepares(&c), 0, "the {what} planned a statement again");
    }
}

/// SQLite's readers are one per core, within 2..=8: on this machine's
/// cores, not a fixed eight that take the cores from the writer and the
/// dispatcher (`sqlite_readers`).
#[tokio::test]
async fn the_readers_are_one_per_core() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("db.sqlite"), Duration::from_secs(1)).await;
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    let readers = store
        .read
        .get_sqlite_connection_pool()
        .options()
        .get_max_connections();
    assert_eq!(readers, cores.clamp(2, 8));
    assert_eq!(super::sqlite_readers(), readers);
    let n = |c: usize| super::readers_for(std::num::NonZeroUsize::new(c));
    assert_eq!(super::readers_for(None), 2, "unknown");
    assert_eq!(
        [n(1), n(2), n(3), n(8), n(9), n(64), n(usize::MAX)],
        [2, 2, 3, 8, 8, 8, 8]
    );
}

/// The first column of the first row of `sql`.
async fn scalar<T: sea_orm::TryGetable>(conn: &sea_orm::DatabaseConnection, sql: &str) -> T {
    use sea_orm::ConnectionTrait;
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            sql,
        ))
        .await
        .unwrap()
        .expect("a row");
    row.try_get_by_index(0).unwrap()
}

#[test]
fn a_database_password_is_never_repeated() {
    use super::redact_url;
    assert_eq!(
        redact_url("postgres://sy:hunter2@db:5432/switchyard"),
        "postgres://sy:<redacted>@db:5432/switchyard"
    );
    assert_eq!(
        redact_url("postgres://sy@db:5432/switchyard"),
        "postgres://sy@db:5432/switchyard"
    );
    assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    assert_eq!(
        redact_url("postgres://sy@db/x?password=hunter2&sslmode=require"),
        "postgres://sy@db/x?password=<redacted>&sslmode=require"
    );
    assert_eq!(
        redact_url("postgresql://sy:p@ss/w@db:5432/x"),
        "postgresql://sy:<redacted>@db:5432/x"
    );
    assert_eq!(
        redact_url("error with configuration: postgres://sy:hunter2@db/x"),
        "error with configuration: postgres://sy:<redacted>@db/x"
    );
}

/// Group commit on SQLite: what a group does with members that fail in
/// the database, and how large it grows.
mod groups {
    use super::*;
    use crate::domain::{Command, Params, Strategy, validate::ValidPush};
    use crate::store::{ActionQuery, PushOutcome};
    use tokio::{sync::oneshot, task::JoinHandle};

    const H: i64 = 3600 * Ts::SECOND;

    async fn store(path: &std::path::Path, members: usize) -> Store {
        store_open_for(path, members, Duration::from_secs(60)).await
    }

    async fn store_open_for(path: &std::path::Path, members: usize, open: Duration) -> Store {
        let url = format!("sqlite://{}", path.display());
        let store = Store::open_with(
            &url,
            Arc::new(ManualClock::new(Ts(0))),
            &StoreOptions {
                group_members: members,
                group_open: open,
                ..StoreOptions::default()
            },
        )
        .await
        .unwrap();
        store
            .create_device(
                &TenantId::default_tenant(),
                device("d1", BTreeMap::new()),
                None,
            )
            .await
            .unwrap();
        store
    }

    /// Holds the writer inside a group until the returned sender fires.
    async fn hold(store: &Store) -> (oneshot::Sender<()>, JoinHandle<Result<(), Error>>) {
        let (entered, inside) = oneshot::channel();
        let (release, released) = oneshot::channel::<()>();
        let s = store.clone();
        let held = tokio::spawn(async move {
            s.grouped("d1", move |_| {
                Box::pin(async move {
                    let _ = entered.send(());
                    let _ = released.await;
                    Ok(())
                })
            })
            .await
        });
        inside.await.unwrap();
        (release, held)
    }

    /// Queues a push of [start, end) hours, waiting until it is queued.
    async fn queue_push(
        store: &Store,
        start: i64,
        end: i64,
    ) -> JoinHandle<Result<PushOutcome, Error>> {
        let queued = store.write_groups().queued;
        let s = store.clone();
        let push = ValidPush {
            command: Command::Charge,
            channel: "mode".into(),
            params: Params::default(),
            start: Ts(start * H),
            end: Some(Ts(end * H)),
            immediate: false,
        };
        let task = tokio::spawn(async move {
            s.push(
                &TenantId::default_tenant(),
                &DeviceId::parse("d1").unwrap(),
                move |_, _| Ok(push.clone()),
                Strategy::Reject,
                false,
                None,
            )
            .await
        });
        wait_queued(store, queued + 1).await;
        task
    }

    /// Queues raw SQL as a member of its own.
    async fn queue_sql(store: &Store, sql: &'static str) -> JoinHandle<Result<(), Error>> {
        let queued = store.write_groups().queued;
        let s = store.clone();
        let task = tokio::spawn(async move {
            s.grouped("d1", move |tx| {
                Box::pin(async move {
                    tx.execute_unprepared(sql)
                        .await
                        .map_err(super::super::db_err)?;
                    Ok(())
                })
            })
            .await
        });
        wait_queued(store, queued + 1).await;
        task
    }

    async fn wait_queued(store: &Store, n: u64) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while store.write_groups().queued < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("queued");
    }

    async fn stored(store: &Store) -> usize {
        store
            .list_actions(
                &TenantId::default_tenant(),
                ActionQuery {
                    device: None,
                    states: &[],
                    before: None,
                    limit: 100,
                },
            )
            .await
            .unwrap()
            .len()
    }

    /// A group takes at most its member limit; the rest wait for the next.
    #[tokio::test]
    async fn a_group_takes_no_more_than_its_member_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 2).await;
        let before = store.write_groups();
        let (release, held) = hold(&store).await;
        let mut pushes = Vec::new();
        for h in 0..5 {
            pushes.push(queue_push(&store, 2 * h + 1, 2 * h + 2).await);
        }
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        for p in pushes {
            p.await.unwrap().unwrap();
        }
        let after = store.write_groups();
        assert_eq!(after.members - before.members, 6);
        assert_eq!(after.groups - before.groups, 3, "6 members, 2 a group");
        assert_eq!(stored(&store).await, 5);
    }

    /// A group takes no more members once its time is up, however much is
    /// queued (here no time at all: one member a group).
    #[tokio::test]
    async fn a_group_takes_no_more_members_once_its_time_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_open_for(&dir.path().join("db.sqlite"), 512, Duration::ZERO).await;
        let before = store.write_groups();
        let (release, held) = hold(&store).await;
        let mut pushes = Vec::new();
        for h in 0..3 {
            pushes.push(queue_push(&store, 2 * h + 1, 2 * h + 2).await);
        }
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        for p in pushes {
            p.await.unwrap().unwrap();
        }
        let after = store.write_groups();
        assert_eq!(after.members - before.members, 4);
        assert_eq!(after.groups - before.groups, 4, "one member a group");
    }

    /// A statement that fails (here: a table that does not exist) fails
    /// its own request and ends the group: the members before it are
    /// committed, the ones after it run in the next group.
    #[tokio::test]
    async fn a_failing_statement_fails_its_request_and_ends_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 512).await;
        let before = store.write_groups();
        let (release, held) = hold(&store).await;
        let first = queue_push(&store, 1, 2).await;
        let failing = queue_sql(&store, "INSERT INTO no_such_table VALUES (1)").await;
        let after_it = queue_push(&store, 3, 4).await;
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        first.await.unwrap().expect("committed with its group");
        assert!(
            matches!(failing.await.unwrap(), Err(Error::Internal(_))),
            "a statement no retry cures"
        );
        after_it.await.unwrap().expect("run in the next group");
        let after = store.write_groups();
        assert_eq!(after.groups - before.groups, 2);
        assert_eq!(stored(&store).await, 2);
    }

    /// A member runs without a savepoint of its own; one that fails after
    /// it has written cannot be undone alone, so its group is rolled back
    /// and every member run again (their stores retry), the failing one in
    /// a savepoint this time: it fails alone, with its own error, and the
    /// others commit once each.
    #[tokio::test]
    async fn a_write_that_fails_after_writing_fails_alone() {
        fails_after_writing(false).await;
    }

    /// The same, the write made by a statement that returns rows (run as
    /// a query, not an execute).
    #[tokio::test]
    async fn a_write_returning_rows_that_fails_after_fails_alone() {
        fails_after_writing(true).await;
    }

    async fn fails_after_writing(returning: bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 512).await;
        scratch_table(&store).await;
        let before = store.write_groups();
        let (release, held) = hold(&store).await;
        let first = queue_push(&store, 1, 2).await;
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let queued = store.write_groups().queued;
        let (s, counted) = (store.clone(), runs.clone());
        let failing = tokio::spawn(async move {
            s.retrying_grouped(|| {
                let counted = counted.clone();
                s.grouped("d1", move |tx| {
                    Box::pin(async move {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        write_then_refuse(tx, 1, returning).await
                    })
                })
            })
            .await
        });
        wait_queued(&store, queued + 1).await;
        let after_it = queue_push(&store, 3, 4).await;
        release.send(()).unwrap();
        // The holder is not run through the store's retries: it is told
        // to run again.
        assert!(matches!(
            held.await.unwrap(),
            Err(Error::StorageContention(_))
        ));
        first.await.unwrap().expect("run again and committed");
        assert!(
            matches!(failing.await.unwrap(), Err(Error::Invalid(_))),
            "its own error, not its group's"
        );
        after_it.await.unwrap().expect("committed");
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(stored(&store).await, 2, "each push once");
        let scratch = scratch_rows(&store).await;
        assert_eq!(scratch, 0, "the failed write's row is undone");
        let after = store.write_groups();
        assert!(
            after.groups - before.groups >= 2,
            "rolled back, then run again"
        );
    }

    /// A table for members to write to.
    async fn scratch_table(store: &Store) {
        store
            .write
            .execute_unprepared("CREATE TABLE scratch (x INTEGER)")
            .await
            .unwrap();
    }

    /// The rows in the scratch table.
    async fn scratch_rows(store: &Store) -> usize {
        store
            .write
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Sqlite,
                "SELECT x FROM scratch",
            ))
            .await
            .unwrap()
            .len()
    }

    /// A member's work that writes `x` to the scratch table (through a
    /// statement returning rows if `returning`), then refuses.
    async fn write_then_refuse(
        tx: &sea_orm::DatabaseTransaction,
        x: i64,
        returning: bool,
    ) -> Result<(), Error> {
        let insert = format!(
            "INSERT INTO scratch VALUES ({x}){}",
            if returning { " RETURNING x" } else { "" }
        );
        if returning {
            tx.query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Sqlite,
                insert,
            ))
            .await
            .map_err(super::super::db_err)?;
        } else {
            tx.execute_unprepared(&insert)
                .await
                .map_err(super::super::db_err)?;
        }
        Err(Error::invalid(
            "x",
            crate::domain::error::Reason::InvalidField,
            "refused after writing",
        ))
    }

    /// A request run again after its group was undone takes a savepoint,
    /// and so does every member after it in its group: one of them that
    /// fails after writing fails alone, and the group commits the rest.
    #[tokio::test]
    async fn members_after_a_careful_one_take_savepoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 512).await;
        scratch_table(&store).await;
        let before = store.write_groups();
        let (release, held) = hold(&store).await;
        let queued = store.write_groups().queued;
        let s = store.clone();
        let careful = tokio::spawn(async move {
            super::super::group::CAREFUL
                .scope(
                    true,
                    s.grouped("d1", |tx| {
                        Box::pin(async move {
                            tx.execute_unprepared("INSERT INTO scratch VALUES (1)")
                                .await
                                .map_err(super::super::db_err)?;
                            Ok(())
                        })
                    }),
                )
                .await
        });
        wait_queued(&store, queued + 1).await;
        let queued = store.write_groups().queued;
        let s = store.clone();
        let failing = tokio::spawn(async move {
            s.grouped("d1", |tx| Box::pin(write_then_refuse(tx, 2, false)))
                .await
        });
        wait_queued(&store, queued + 1).await;
        release.send(()).unwrap();
        held.await.unwrap().expect("not undone");
        careful.await.unwrap().expect("committed");
        assert!(matches!(failing.await.unwrap(), Err(Error::Invalid(_))));
        let after = store.write_groups();
        assert_eq!(after.groups - before.groups, 1, "one transaction");
        let scratch = scratch_rows(&store).await;
        assert_eq!(scratch, 1, "the careful one's row, not the failed one's");
    }

    /// A refusal is decided before anything is written: the group goes on
    /// around it, in one transaction, with no savepoint and nothing run
    /// again. So does a create of a device that exists (its upsert takes
    /// nothing: no row changes).
    #[tokio::test]
    async fn a_refusal_before_writing_leaves_its_group_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 512).await;
        let before = store.write_groups();
        let (release, held) = hold(&store).await;
        let first = queue_push(&store, 1, 2).await;
        let colliding = queue_push(&store, 1, 2).await;
        let queued = store.write_groups().queued;
        let s = store.clone();
        let existing = tokio::spawn(async move {
            s.create_device(
                &TenantId::default_tenant(),
                device("d1", BTreeMap::new()),
                None,
            )
            .await
        });
        wait_queued(&store, queued + 1).await;
        let after_it = queue_push(&store, 3, 4).await;
        release.send(()).unwrap();
        held.await.unwrap().expect("not run again");
        first.await.unwrap().expect("booked");
        assert!(matches!(colliding.await.unwrap(), Err(Error::Conflict(_))));
        assert!(matches!(
            existing.await.unwrap(),
            Err(Error::DeviceAlreadyExists { .. })
        ));
        after_it.await.unwrap().expect("booked");
        let after = store.write_groups();
        assert_eq!(after.groups - before.groups, 1, "one transaction");
        assert_eq!(after.members - before.members, 5, "each run once");
        assert_eq!(stored(&store).await, 2);
    }

    /// A write that panics (a bug) rolls back its group and is answered
    /// INTERNAL; the writer lives on and the next group commits.
    #[tokio::test]
    async fn a_panicking_write_rolls_back_its_group_not_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 512).await;
        let (release, held) = hold(&store).await;
        let first = queue_push(&store, 1, 2).await;
        let queued = store.write_groups().queued;
        let s = store.clone();
        let panicking = tokio::spawn(async move {
            s.grouped(
                "d1",
                |_| -> futures::future::BoxFuture<'_, Result<(), Error>> {
                    Box::pin(async { panic!("a bug in a write") })
                },
            )
            .await
        });
        wait_queued(&store, queued + 1).await;
        let after_it = queue_push(&store, 3, 4).await;
        release.send(()).unwrap();
        let _ = held.await.unwrap();
        assert!(matches!(
            first.await.unwrap(),
            Err(Error::StorageUnavailable(_))
        ));
        assert!(matches!(panicking.await.unwrap(), Err(Error::Internal(_))));
        after_it.await.unwrap().expect("the writer lives on");
        assert_eq!(stored(&store).await, 1);
    }

    /// A member after which SQLite has rolled back the whole transaction
    /// itself (`RAISE(ROLLBACK)` in a trigger; SQLITE_FULL and I/O errors
    /// do the same) rolls back its group: every member of it is told
    /// STORAGE_UNAVAILABLE and nothing of it is stored; the next group is
    /// a transaction of its own.
    #[tokio::test]
    async fn a_member_that_rolls_back_the_transaction_rolls_back_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir.path().join("db.sqlite"), 512).await;
        store
            .write
            .execute_unprepared(
                "CREATE TABLE boom (x INTEGER); \
                 CREATE TRIGGER boom_rolls_back BEFORE INSERT ON boom \
                 BEGIN SELECT RAISE(ROLLBACK, 'boom'); END;",
            )
            .await
            .unwrap();
        let (release, held) = hold(&store).await;
        let first = queue_push(&store, 1, 2).await;
        let failing = queue_sql(&store, "INSERT INTO boom VALUES (1)").await;
        let after_it = queue_push(&store, 3, 4).await;
        release.send(()).unwrap();
        assert!(matches!(
            held.await.unwrap(),
            Err(Error::StorageUnavailable(_))
        ));
        assert!(
            matches!(first.await.unwrap(), Err(Error::StorageUnavailable(_))),
            "rolled back with its group"
        );
        assert!(failing.await.unwrap().is_err());
        after_it.await.unwrap().expect("a transaction of its own");
        assert_eq!(stored(&store).await, 1, "only the one after the group");
    }
}

/// A push's conflict check reads holders through the partial index of
/// owed holders, never the device's history: the check states the
/// index's predicate literally (a bound value, or a predicate spelt
/// otherwise, and SQLite would pass the index by). So it does with
/// statistics too, on a store opened after them.
#[tokio::test]
async fn the_conflict_check_reads_holders_through_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path, Duration::from_secs(5)).await;
    holders_read_through_their_index(&store).await;
    // The same with statistics (`ANALYZE`, as `PRAGMA optimize` gathers
    // them) of a fleet whose devices have a history, mostly finished.
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 49)
         INSERT INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id,
             timezone, settings, revision, create_ns, update_ns)
         SELECT 'default', 'd' || i, '', 'battery', 'simulated', '', 'UTC', '{}', 1, 0, 0 FROM n;
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 4999)
         INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns,
             immediate, state, queued_after, revision, create_ns, update_ns, work, due_ns)
         SELECT 'default', printf('00000000-0000-7000-8000-%012d', i), 'd' || (i % 50), 'mode',
             'CHARGE', i * 10, i * 10 + 5, 0,
             CASE WHEN (i / 50) % 10 = 0 THEN 'SCHEDULED' ELSE 'COMPLETED' END, '', 1, 0, 0,
             CASE WHEN (i / 50) % 10 = 0 THEN 'APPLY' ELSE 'NONE' END,
             CASE WHEN (i / 50) % 10 = 0 THEN i * 10 ELSE NULL END FROM n;
         ANALYZE;",
    )
    .unwrap();
    let samples: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_stat4 WHERE idx = 'actions_holding_owed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(samples > 0, "the holders' index has STAT4 samples");
    drop(c);
    store.close().await;
    let store = open(&path, Duration::from_secs(5)).await;
    holders_read_through_their_index(&store).await;
}

async fn holders_read_through_their_index(store: &Store) {
    use sea_orm::{DbBackend, QueryTrait as _, Statement};
    let built = super::rows::holding_select(
        &TenantId::default_tenant(),
        &DeviceId::parse("d1").unwrap(),
        super::rows::HoldingFilter {
            channel: Some("mode"),
            ending_after: Some(Ts(5)),
        },
    )
    .build(DbBackend::Sqlite);
    let values = built.values.map(|v| v.0).unwrap_or_default();
    let plan = store
        .read
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            format!("EXPLAIN QUERY PLAN {}", built.sql),
            values,
        ))
        .await
        .unwrap();
    let steps: Vec<String> = plan
        .iter()
        .map(|r| r.try_get::<String>("", "detail").unwrap())
        .collect();
    let reads: Vec<&String> = steps
        .iter()
        .filter(|s| s.starts_with("SEARCH actions") || s.starts_with("SCAN actions"))
        .collect();
    // The holders, and the last holder starting before the push.
    assert_eq!(reads.len(), 2, "{steps:#?}");
    for r in reads {
        assert!(
            r.starts_with("SEARCH actions USING INDEX actions_holding_owed (tenant_id=? AND device_id=? AND channel=?"),
            "{steps:#?}"
        );
    }
}

/// Migration 18 makes holders that owe nothing impossible: a row stored
/// ACTIVE without an end by a version before migration 2 (it owes no
/// revert) becomes COMPLETED with an entry in its trail; a windowed
/// ACTIVE action and a cancelled one whose revert is owed keep holding,
/// through the new index.
#[tokio::test]
async fn migration_18_completes_what_holds_owing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path, Duration::from_secs(5)).await;
    store.close().await;
    // Back to migration 17, with three rows as an older version left them.
    let rewind = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.executescript('''\n\
             DROP INDEX actions_holding_owed; DROP INDEX actions_in_force;\n\
             DROP TABLE dispatch_leases;\n\
             DROP INDEX actions_finished_at; ALTER TABLE actions DROP COLUMN finished_ns;\n\
             CREATE INDEX actions_finished ON actions (update_ns) WHERE work = 'NONE';\n\
             CREATE INDEX actions_holding ON actions (tenant_id, device_id, channel, start_ns)\n\
               WHERE (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT');\n\
             DELETE FROM schema_migrations WHERE version >= 18;\n\
             INSERT INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id,\n\
               timezone, settings, revision, create_ns, update_ns)\n\
               VALUES ('default', 'd1', '', 'battery', 'simulated', '', 'UTC', '{}', 1, 0, 0);\n\
             INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns,\n\
               immediate, state, queued_after, revision, create_ns, update_ns, work, due_ns) VALUES\n\
               ('default', '00000000-0000-7000-8000-000000000001', 'd1', 'mode', 'CHARGE', 10, NULL,\n\
                 0, 'ACTIVE', '', 2, 0, 7, 'NONE', NULL),\n\
               ('default', '00000000-0000-7000-8000-000000000002', 'd1', 'limit', 'CHARGE', 10, 20,\n\
                 0, 'ACTIVE', '', 2, 0, 7, 'REVERT', 20),\n\
               ('default', '00000000-0000-7000-8000-000000000003', 'd1', 'other', 'CHARGE', 10, 20,\n\
                 0, 'CANCELLED', '', 3, 0, 7, 'REVERT', 8);\n\
             ''')\n",
        )
        .arg(&path)
        .status()
        .unwrap();
    assert!(rewind.success());
    let store = open(&path, Duration::from_secs(5)).await;
    let rows = store
        .read
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            "SELECT action_id, state, revision, \
               (SELECT count(*) FROM audit_log l WHERE l.action_id = a.action_id \
                  AND l.reason = 'MIGRATED' AND l.from_state = 'ACTIVE' \
                  AND l.to_state = 'COMPLETED' AND l.at_ns = 7) AS trail \
             FROM actions a ORDER BY action_id",
        ))
        .await
        .unwrap();
    let got: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get::<String>("", "state").unwrap(),
                r.try_get::<i64>("", "revision").unwrap(),
                r.try_get::<i64>("", "trail").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("COMPLETED".into(), 3, 1),
            ("ACTIVE".into(), 2, 0),
            ("CANCELLED".into(), 3, 0)
        ]
    );
    assert_eq!(store.holders_owing_nothing().await.unwrap(), 0);
    let holders = super::rows::holding_actions(
        &store.read,
        &TenantId::default_tenant(),
        &DeviceId::parse("d1").unwrap(),
        super::rows::HoldingFilter {
            channel: None,
            ending_after: None,
        },
    )
    .await
    .unwrap();
    let mut ids: Vec<String> = holders.iter().map(|a| a.id.to_string()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            "00000000-0000-7000-8000-000000000002".to_owned(),
            "00000000-0000-7000-8000-000000000003".to_owned()
        ]
    );
    store.close().await;
}

/// The consistency checks the storage contract runs after every rule
/// find what they look for: an action holding its channel while owing
/// nothing, and one owing work without holding its channel (the two
/// ways holding and owing could part, on which PostgreSQL's exclusion
/// constraint and the conflict check would disagree).
#[tokio::test]
async fn the_holding_checks_find_rows_that_part_holding_from_owing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    let store = open(&path, Duration::from_secs(5)).await;
    let row = |id: u32, state: &str, work: &str| {
        format!(
            "INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns,
               immediate, state, queued_after, revision, create_ns, update_ns, work, due_ns)
             VALUES ('default', '00000000-0000-7000-8000-{id:012}', 'd1', 'mode', 'CHARGE', 10, 20,
               0, '{state}', '', 1, 0, 0, '{work}', NULL)"
        )
    };
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "INSERT INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id,
           timezone, settings, revision, create_ns, update_ns)
           VALUES ('default', 'd1', '', 'battery', 'simulated', '', 'UTC', '{}', 1, 0, 0);",
    )
    .unwrap();
    // Consistent pairs: neither check counts them.
    for (id, state, work) in [
        (1, "SCHEDULED", "APPLY"),
        (2, "ACTIVE", "REVERT"),
        (3, "CANCELLED", "REVERT"),
        (4, "COMPLETED", "NONE"),
    ] {
        c.execute_batch(&row(id, state, work)).unwrap();
    }
    assert_eq!(store.holders_owing_nothing().await.unwrap(), 0);
    assert_eq!(store.owed_not_holding().await.unwrap(), 0);
    c.execute_batch(&row(5, "ACTIVE", "NONE")).unwrap();
    assert_eq!(store.holders_owing_nothing().await.unwrap(), 1);
    assert_eq!(store.owed_not_holding().await.unwrap(), 0);
    c.execute_batch(&row(6, "CANCELLED", "APPLY")).unwrap();
    c.execute_batch(&row(7, "FAILED", "APPLY")).unwrap();
    assert_eq!(store.owed_not_holding().await.unwrap(), 2);
    assert_eq!(store.holders_owing_nothing().await.unwrap(), 1);
    drop(c);
    store.close().await;
}
