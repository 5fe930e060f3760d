//! The store: the only place that speaks SQL, through sea-orm, to SQLite
//! or PostgreSQL (ADR 0009). Its statements are built with sea-query from
//! the entities (`entity.rs`) and rendered for the backend; sea-orm types
//! never leave this module.
//!
//! Invariants:
//! - Every mutation runs in one write transaction (`BEGIN IMMEDIATE` on
//!   SQLite, so the decision and the write are serialised across processes
//!   too; on PostgreSQL the device's row is locked first) and is answered
//!   only after COMMIT.
//! - Collisions are decided inside that transaction from the rows it reads,
//!   so no channel ever holds two overlapping actions, however many clients
//!   push at once; on PostgreSQL an exclusion constraint makes an overlap
//!   impossible even so, and a write that loses a race is run again.
//! - Every action transition is appended to `audit_log` in the same
//!   transaction.
//! - In-process writers queue on a single write connection, so SQLITE_BUSY
//!   is never met in-process; `busy_timeout` covers other processes.

mod actions;
mod batch;
mod budget;
#[cfg(feature = "contract")]
pub mod contract;
mod devices;
mod direct;
mod dispatch;
mod entity;
mod events;
mod group;
mod idem;
mod keys;
mod nodelay;
#[cfg(feature = "contract")]
pub use nodelay::sockets_towards;
mod prune;
mod rows;
mod schema;
mod stats;
#[cfg(test)]
mod tests;
mod webhooks;

pub use actions::{ActionQuery, PushOutcome, TransitionRecord};
pub use budget::{Bucket, Spend};
pub use devices::Retarget;
pub use dispatch::{Claim, Configured, Due, Finish, Job, Outcome, Planned, Recorded, Started};
pub use events::EventRecord;
pub use group::{GroupLimits, WriteGroups};
pub use keys::{KeyRecord, TenantRecord};
pub use stats::Refreshed;
pub use webhooks::{
    AttemptEffect, AttemptRecord, DueEndpoint, EndpointChange, EndpointRecord, WEBHOOK_DISABLED,
};

/// How far apart the clocks of replicas sharing a database may be: work
/// due later than this from a writer's now cannot have been started by
/// any replica, so a claim on it may be let go (a cancel, a device
/// change); nearer, it is treated as in flight.
pub const CLOCK_SKEW_NANOS: i64 = 5 * crate::domain::Ts::SECOND;
#[cfg(any(test, feature = "contract"))]
pub use idem::IdemBegin;
pub use idem::{
    EncodeResponse, IDEMPOTENCY_LEASE_NANOS, IDEMPOTENCY_TTL_NANOS, IdemCommit, IdemRequest,
    Written,
};

use std::{collections::BTreeMap, str::FromStr, sync::Arc, time::Duration};

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, QueryFilter, RuntimeErr, SqlxPostgresConnector, SqlxSqliteConnector,
    TransactionOptions, TransactionTrait,
};
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::domain::{ActionId, Clock, DeviceId, Error};

/// Makes a SQLite connection plan each statement once, whatever values it
/// is run with: the query planner stability guarantee (QPSG).
///
/// The bundled SQLite is built with STAT4. Once `ANALYZE` or `PRAGMA
/// optimize` has written `sqlite_stat4` (an operator's maintenance, or a
/// copy of a file that had it), a statement with a parameter compared to
/// an indexed column is otherwise prepared again, plan and all, whenever
/// the values bound to it change: every push's conflict check and every
/// kept read, every time. On a file analysed at a million actions, the
/// writer spent most of its time planning (`perf`) and push p99 was 1.5
/// to 4 times the fresh file's, median 2.2 (docs/performance.md). The
/// plans the store relies on do not need the values: each hot query has
/// an index for its filter (`store::tests` checks the conflict check's
/// plan after `ANALYZE`).
///
/// A connection that refuses it is still used, with a warning: only speed
/// is at stake, and the pool would otherwise retry the connection until
/// its acquire timeout.
#[allow(unsafe_code)]
async fn plan_once(conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let raw = handle.as_raw_handle().as_ptr();
    // SAFETY: the handle is open and locked for the call; the option takes
    // an int (1: on) and an optional int pointer (not wanted here).
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_config(
            raw,
            rusqlite::ffi::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::ffi::c_int,
            std::ptr::null_mut::<std::ffi::c_int>(),
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::warn!(
            code = rc,
            "SQLite refused its query planner stability guarantee; statements may be planned again as their values change"
        );
    }
    Ok(())
}

/// How the store uses its database.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a write waits for another process's write lock (SQLite),
    /// or for a connection (PostgreSQL), before it is answered
    /// STORAGE_UNAVAILABLE.
    pub busy_timeout: Duration,
    /// PostgreSQL: connections in the pool.
    pub max_connections: u32,
    /// PostgreSQL: the pool's connections that write requests in groups
    /// (lanes); 0: a quarter of the pool (at least one); never more than
    /// half of it.
    pub write_lanes: u32,
    /// PostgreSQL: how long one store operation may take (see
    /// `Store::deadline`).
    pub deadline: Duration,
    /// At most this many requests' writes are committed together.
    pub group_members: usize,
    /// A group commit takes no more members this long after it began.
    pub group_open: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            busy_timeout: Duration::from_secs(10),
            max_connections: 16,
            write_lanes: 0,
            deadline: Duration::from_secs(8),
            group_members: group::GroupLimits::default().members,
            group_open: group::GroupLimits::default().open,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    /// Where writes go: on SQLite one connection (in-process writers
    /// queue here); on PostgreSQL the pool.
    write: DatabaseConnection,
    /// Where reads go: on SQLite a pool of readers beside the writer; on
    /// PostgreSQL the same pool.
    read: DatabaseConnection,
    /// Where the health check asks: on PostgreSQL a connection of its own.
    health: DatabaseConnection,
    clock: Arc<dyn Clock>,
    /// How long one operation (a transaction, a read) may take before it is
    /// abandoned as STORAGE_UNAVAILABLE: on PostgreSQL, where a network
    /// that went silent would otherwise hold a call until its client gives
    /// up; none on SQLite (its busy timeout bounds the waits).
    deadline: Option<Duration>,
    /// The group-commit writers of requests' writes (`group.rs`).
    lanes: Arc<group::Lanes>,
    /// PostgreSQL: the dispatch records that may run at once
    /// ([`Store::record`]); SQLite's records already queue for its one
    /// write connection.
    recording: Recording,
    /// Most action ids a dispatch statement names
    /// (`dispatch::IDS_PER_STATEMENT`; fewer in tests, to run every
    /// statement of a start more than once).
    ids_per_statement: usize,
}

/// Dispatch records running at once, and the most there have been.
#[derive(Debug, Default)]
pub(super) struct RecordingCounts {
    pub(super) now: std::sync::atomic::AtomicUsize,
    pub(super) most: std::sync::atomic::AtomicUsize,
    /// When this process last deleted old dispatch leases.
    pub(super) leases_forgotten_ns: std::sync::atomic::AtomicI64,
}

/// The bound on dispatch records running at once (PostgreSQL), and what
/// they have done.
#[derive(Clone, Debug, Default)]
pub(super) struct Recording {
    pub(super) slots: Option<Arc<tokio::sync::Semaphore>>,
    pub(super) counts: Arc<RecordingCounts>,
}

/// PostgreSQL: at most one dispatch record per this many pooled
/// connections runs at once (at least one). A 100,000 storm's claims each
/// recorded on their own, up to about fifty at once, held every
/// connection of the pool, waiting on each other's row locks; the lease
/// renewals and the records themselves then timed out waiting for a
/// connection, claims lapsed and their work was done again a lease
/// later (p99 93 s; with two at a time, 13.3–13.6 s: docs/performance.md).
const PG_CONNECTIONS_PER_RECORD: u32 = 8;

/// At most this many members in a group on PostgreSQL (see
/// `Store::connect`).
const PG_GROUP_MEMBERS: usize = 32;

/// How many times a write that lost a race with another writer
/// ([`Error::StorageContention`]) is run again before the caller is told
/// STORAGE_UNAVAILABLE.
const CONTENTION_TRIES: u32 = 6;

/// Classifies a database error by its code (SQLite's result code,
/// PostgreSQL's SQLSTATE): what a retry may cure (the database is busy,
/// locked, out of space or unreachable) is STORAGE_UNAVAILABLE; a lost
/// race with another writer (a serialization failure, a deadlock, the
/// no-overlap constraint) is [`Error::StorageContention`], run again by the
/// store; what no retry cures (corruption, a constraint the code did not
/// expect, a row that does not decode) is INTERNAL.
pub(crate) fn db_err(e: DbErr) -> Error {
    let class = match &e {
        DbErr::ConnectionAcquire(_) => Class::Transient,
        DbErr::Conn(RuntimeErr::SqlxError(s))
        | DbErr::Exec(RuntimeErr::SqlxError(s))
        | DbErr::Query(RuntimeErr::SqlxError(s)) => sqlx_class(s),
        DbErr::Conn(_) => Class::Transient,
        _ => Class::Internal,
    };
    match class {
        Class::Transient => Error::StorageUnavailable(e.to_string()),
        Class::Contention => Error::StorageContention(e.to_string()),
        Class::Internal => Error::Internal(format!("database: {e}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Transient,
    Contention,
    Internal,
}

fn sqlx_class(e: &sqlx::Error) -> Class {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => Class::Transient,
        sqlx::Error::Database(d) => {
            let code = d.code().unwrap_or_default();
            if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                || d.try_downcast_ref::<direct::SqliteCodeError>().is_some()
            {
                if sqlite_transient(&code) {
                    Class::Transient
                } else {
                    Class::Internal
                }
            } else {
                postgres_class(&code)
            }
        }
        _ => Class::Internal,
    }
}

/// SQLite result codes (extended codes carry the primary one in their low
/// byte) that a retry may cure.
fn sqlite_transient(code: &str) -> bool {
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    const NOMEM: i64 = 7;
    const IOERR: i64 = 10;
    const FULL: i64 = 13;
    const CANTOPEN: i64 = 14;
    const PROTOCOL: i64 = 15;
    code.parse::<i64>().is_ok_and(|c| {
        matches!(
            c & 0xff,
            BUSY | LOCKED | NOMEM | IOERR | FULL | CANTOPEN | PROTOCOL
        )
    })
}

/// PostgreSQL SQLSTATEs by what a retry may do.
fn postgres_class(sqlstate: &str) -> Class {
    match sqlstate {
        // serialization_failure, deadlock_detected, exclusion_violation
        // (the no-overlap constraint: another replica booked first; run
        // again, the application's check names the winner),
        // lock_not_available.
        "40001" | "40P01" | "23P01" | "55P03" => Class::Contention,
        // admin_shutdown, crash_shutdown, cannot_connect_now,
        // idle_in_transaction_session_timeout, query_canceled (a
        // statement timeout), read_only_sql_transaction (a failover in
        // progress).
        "57P01" | "57P02" | "57P03" | "25P03" | "57014" | "25006" => Class::Transient,
        // Class 08 (connection exception), 53 (insufficient resources:
        // disk full, out of memory, too many connections), 58 (system
        // error: I/O).
        s if s.starts_with("08") || s.starts_with("53") || s.starts_with("58") => Class::Transient,
        _ => Class::Internal,
    }
}

/// SQLite readers: one per core, two at least and eight at most
/// ([`readers_for`]).
fn sqlite_readers() -> u32 {
    readers_for(std::thread::available_parallelism().ok())
}

/// SQLite readers for `cores`: one per core, two at least (two when
/// unknown) and eight at most. Reader threads beyond the cores take them
/// from the writer and the dispatcher (whose read-back of every start
/// goes through this pool too): on two cores, a 100,000 storm read
/// through by 32 polling clients was 1.16-1.45 s late at p99 with eight
/// readers, 0.83-0.97 s with two; the clients' reads were answered more
/// slowly in exchange (5,500-6,150 a second at p99 18-20 ms, against
/// 6,950-8,300 at 13-15 ms; docs/performance.md).
fn readers_for(cores: Option<std::num::NonZeroUsize>) -> u32 {
    cores
        .map_or(2, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .clamp(2, 8)
}

/// Which database a URL names.
fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// Opens the database at `url` and applies the migrations.
    /// `sqlite://path` (created if missing), `sqlite::memory:` and
    /// `postgres://user@host:port/db` (an existing database) are accepted.
    pub async fn open(url: &str, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        Self::open_with(url, clock, &StoreOptions::default()).await
    }

    /// [`Store::open`] with `options`.
    pub async fn open_with(
        url: &str,
        clock: Arc<dyn Clock>,
        options: &StoreOptions,
    ) -> Result<Self, Error> {
        let store = Self::connect(url, clock, options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without migrating.
    async fn connect(
        url: &str,
        clock: Arc<dyn Clock>,
        options: &StoreOptions,
    ) -> Result<Self, Error> {
        let sqlx_err = |e: sqlx::Error| db_err(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))));
        if is_postgres(url) {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| {
                    Error::Internal(format!("database url: {}", redact_url(&e.to_string())))
                })?
                .application_name("switchyard")
                // A session left idle inside a transaction (a caller gone
                // mid-request) is ended by the server, never left holding
                // locks.
                .options([
                    ("idle_in_transaction_session_timeout", "30000"),
                    // Notices ("already exists, skipping") are not news.
                    ("client_min_messages", "warning"),
                    // A lock held elsewhere (a stalled replica) is waited
                    // for 4 s, then the write is run again (55P03); no
                    // statement outlives the operation's deadline on the
                    // server either, so a connection given up on is soon
                    // free again.
                    ("lock_timeout", "4000"),
                    // No JIT compilation: once `actions` has statistics,
                    // the dispatcher's look for owed work through a burst
                    // (every row due and claimed, 100,000 read to find
                    // none) is costed past `jit_inline_above_cost`, and
                    // compiling it with inlining and optimisation made
                    // it 410-620 ms a run; its expressions are simple
                    // and each plan runs once.
                    ("jit", "off"),
                    (
                        "statement_timeout",
                        &options.deadline.as_millis().to_string(),
                    ),
                ]);
            // Nagle's algorithm off on every connection (`nodelay`).
            let nodelay = nodelay::hook(
                opts.get_host(),
                opts.get_port(),
                opts.get_socket().is_some(),
            );
            let pool_options = PgPoolOptions::new()
                .after_connect(nodelay.clone())
                .max_connections(options.max_connections.max(1))
                .min_connections(0)
                // An unreachable server is answered STORAGE_UNAVAILABLE
                // within a client's usual deadline, not after it.
                .acquire_timeout(options.busy_timeout.min(Duration::from_secs(5)))
                .idle_timeout(Some(Duration::from_secs(60)))
                .test_before_acquire(true);
            // The health check's own connection: a pool busy with
            // requests (or waiting on locks) is not a database that is down.
            let health = PgPoolOptions::new()
                .after_connect(nodelay)
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(2))
                .connect_lazy_with(opts.clone());
            let pool = pool_options.connect_lazy_with(opts);
            let conn = SqlxPostgresConnector::from_sqlx_postgres_pool(pool);
            // Fail at start, not at the first request, when it is not there.
            conn.execute_unprepared("SELECT 1").await.map_err(db_err)?;
            // Up to half the pool writes in groups; the rest is left to
            // reads, the dispatcher and the sweeps.
            // A quarter of the pool by default: fewer writers gather larger
            // batches of pushes (ADR 0016; docs/performance.md).
            let lanes = match options.write_lanes {
                0 => options.max_connections / 4,
                n => n.min(options.max_connections / 2),
            }
            .max(1) as usize;
            let recording = Recording {
                slots: Some(Arc::new(tokio::sync::Semaphore::new(
                    (options.max_connections / PG_CONNECTIONS_PER_RECORD).max(1) as usize,
                ))),
                counts: Arc::default(),
            };
            return Ok(Self {
                recording,
                ids_per_statement: dispatch::IDS_PER_STATEMENT,
                lanes: Arc::new(group::Lanes::start(
                    &conn,
                    lanes,
                    group::GroupLimits {
                        // Each member is a subtransaction: past 64 in one
                        // transaction PostgreSQL's per-backend cache of
                        // them overflows, and every session's snapshot
                        // checks slow down.
                        members: options.group_members.clamp(1, PG_GROUP_MEMBERS),
                        open: options.group_open,
                        deadline: Some(options.deadline),
                    },
                )?),
                write: conn.clone(),
                read: conn,
                health: SqlxPostgresConnector::from_sqlx_postgres_pool(health),
                clock,
                deadline: Some(options.deadline),
            });
        }
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Internal(format!("database url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        // One writer: in-process writers queue here instead of spinning on
        // SQLITE_BUSY.
        let write = SqlitePoolOptions::new()
            .after_connect(|c, _| Box::pin(plan_once(c)))
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(None)
            .max_lifetime(None)
            // A ping per transaction is a round trip to the connection's
            // worker thread for nothing: a local file does not go away.
            .test_before_acquire(false)
            // The writer's page cache: 8 MiB (SQLite's default is 2 MiB):
            // bulk dispatch writes (a burst of starts, a round's outcomes)
            // touch pages all over the actions table and its indexes.
            // Pages it misses come from the operating system's file
            // cache. A transaction that changes more pages than the
            // cache holds writes them to the WAL before it commits
            // (ADR 0010: one start of 100,000 rows took 1.05 s at 2 MiB,
            // 0.62 s at 32 MiB); a start is now 3 claims, about 6,000
            // rows (`START_BATCH`), and a record at most 4,096 outcomes.
            // With those, 32 MiB made no measured difference to a storm's
            // lateness, pushes or the scale runs, and cost about 50 MiB
            // of a 100,000 storm's peak RSS (docs/performance.md).
            // A group commit's savepoints journal the pages they change:
            // in memory, not in a temporary file (a write per page).
            .connect_with(
                opts.clone()
                    .pragma("cache_size", "-8192")
                    .pragma("temp_store", "memory"),
            )
            .await
            .map_err(sqlx_err)?;
        // An in-memory database lives in its one connection.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .after_connect(|c, _| Box::pin(plan_once(c)))
                .max_connections(sqlite_readers())
                .acquire_timeout(Duration::from_secs(30))
                // Each reader's page cache: 2 MiB, about SQLite's default.
                // Pages a reader misses come from the operating system's
                // file cache, shared by every connection; eight private
                // caches of 8 MiB filled up to 48 MiB more of a storm's
                // peak, and reads were no slower without them
                // (docs/performance.md).
                .connect_with(opts.pragma("cache_size", "-2048"))
                .await
                .map_err(sqlx_err)?
        };
        let read = SqlxSqliteConnector::from_sqlx_sqlite_pool(read);
        let write = SqlxSqliteConnector::from_sqlx_sqlite_pool(write);
        Ok(Self {
            lanes: Arc::new(group::Lanes::start(
                &write,
                1,
                group::GroupLimits {
                    members: options.group_members.max(1),
                    open: options.group_open,
                    deadline: None,
                },
            )?),
            write,
            health: read.clone(),
            read,
            clock,
            deadline: None,
            recording: Recording::default(),
            ids_per_statement: dispatch::IDS_PER_STATEMENT,
        })
    }

    /// This store naming at most `n` action ids in a dispatch statement,
    /// so that a test runs each statement of a claim, a start and a
    /// renewal more than once.
    #[cfg(any(test, feature = "contract"))]
    pub fn with_ids_per_statement(mut self, n: usize) -> Self {
        self.ids_per_statement = n.max(1);
        self
    }

    /// Applies pending migrations (`switchyard migrate`): what
    /// [`Store::open`] does, without serving.
    pub async fn migrate_only(url: &str, clock: Arc<dyn Clock>) -> Result<Vec<i64>, Error> {
        let store = Self::connect(url, clock, &StoreOptions::default()).await?;
        let applied = store.migrate().await?;
        store.close().await;
        Ok(applied)
    }

    /// Applies pending migrations, each in its own transaction; returns the
    /// versions applied. On PostgreSQL every step holds a transaction-level
    /// advisory lock, so replicas started together migrate once (the others
    /// wait, then find each version applied).
    async fn migrate(&self) -> Result<Vec<i64>, Error> {
        use entity::migration;
        let backend = self.backend();
        let mut applied = Vec::new();
        let create = match backend {
            DbBackend::Postgres => {
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ns BIGINT NOT NULL)"
            }
            _ => {
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ns INTEGER NOT NULL)"
            }
        };
        let tx = self.begin().await?;
        Self::migration_lock(&tx).await?;
        tx.execute_unprepared(create).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        for (version, only, sql) in schema::MIGRATIONS {
            let tx = self.begin().await?;
            Self::migration_lock(&tx).await?;
            let done = rows::first(
                &tx,
                migration::Entity::find().filter(migration::Column::Version.eq(*version)),
            )
            .await?;
            if done.is_some() {
                continue;
            }
            if let Some(sql) = schema::render(backend, *only, sql) {
                tx.execute_unprepared(&sql).await.map_err(db_err)?;
            }
            migration::Entity::insert(migration::ActiveModel {
                version: sea_orm::Set(*version),
                applied_ns: sea_orm::Set(self.clock.now().0),
            })
            .exec_without_returning(&tx)
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            applied.push(*version);
        }
        Ok(applied)
    }

    /// PostgreSQL: the migrations' advisory lock, held until the
    /// transaction ends. (SQLite's `BEGIN IMMEDIATE` already serialises.)
    async fn migration_lock(tx: &DatabaseTransaction) -> Result<(), Error> {
        if tx.get_database_backend() == DbBackend::Postgres {
            // An arbitrary key of switchyard's own ("switchya" in ASCII).
            // A migration may rebuild a large table, and another replica's
            // may be running: neither is cut short by the request limits.
            tx.execute_unprepared("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
                .await
                .map_err(db_err)?;
            tx.execute_unprepared("SELECT pg_advisory_xact_lock(8319683406441506657)")
                .await
                .map_err(db_err)?;
        }
        Ok(())
    }

    /// Which backend this store runs on.
    pub fn backend(&self) -> DbBackend {
        self.write.get_database_backend()
    }

    /// Whether the database answers (for the health check).
    pub async fn ping(&self) -> Result<(), Error> {
        self.bounded(async {
            self.health
                .execute_unprepared("SELECT 1")
                .await
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Closes the pools.
    pub async fn close(&self) {
        // The writers first: the SQLite one keeps statements prepared on
        // the write connection, which sqlx cannot close with them.
        self.lanes.quiesce().await;
        // Records waiting for their turn are told the store is closing.
        if let Some(slots) = &self.recording.slots {
            slots.close();
        }
        // Closing a pool twice (read and write share one on PostgreSQL and
        // in memory) is harmless.
        let _ = self.write.clone().close().await;
        let _ = self.read.clone().close().await;
        let _ = self.health.clone().close().await;
    }

    /// The clock the store stamps changes with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// PostgreSQL: the value of `setting` in a session of the store's
    /// pool (`current_setting`). For the tests of what its sessions are given.
    #[cfg(feature = "contract")]
    pub async fn session_setting(&self, setting: &str) -> Result<String, Error> {
        let name: String = setting
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let row = self
            .write
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT current_setting('{name}') AS value"),
            ))
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::Internal("current_setting answered no row".into()))?;
        row.try_get("", "value").map_err(db_err)
    }

    /// A write transaction: `BEGIN IMMEDIATE` on SQLite (the write lock
    /// taken before anything is read, so every decision is serialised
    /// across processes too); on PostgreSQL READ COMMITTED, with the rows a
    /// decision reads locked by the statements that read them.
    pub(super) async fn begin(&self) -> Result<DatabaseTransaction, Error> {
        Self::begin_on(&self.write, self.backend()).await
    }

    /// [`Store::begin`] on `conn`.
    pub(super) async fn begin_on(
        conn: &DatabaseConnection,
        backend: DbBackend,
    ) -> Result<DatabaseTransaction, Error> {
        let options = match backend {
            DbBackend::Sqlite => TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            },
            _ => TransactionOptions::default(),
        };
        conn.begin_with_options(options).await.map_err(db_err)
    }

    /// Runs `op` (one write transaction) again while it loses races with
    /// other writers, up to [`CONTENTION_TRIES`] times with a jittered,
    /// growing pause (up to 2, 4, … 32 ms); after that, or past the store's
    /// deadline for all the tries together, the caller is told
    /// STORAGE_UNAVAILABLE (retry later).
    pub(super) async fn retrying<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        self.bounded(Self::retried(op)).await
    }

    /// [`Store::retrying`] for group members, without the overall
    /// deadline: a member is given up only before it starts, never while
    /// its group may still commit it (`group.rs` bounds both).
    pub(super) async fn retrying_grouped<T, F, Fut>(&self, op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        Self::retried(op).await
    }

    async fn retried<T, F, Fut>(mut op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut tries = 0;
        let mut careful = false;
        loop {
            let ran = if careful {
                group::CAREFUL.scope(true, op()).await
            } else {
                op().await
            };
            // Its group was undone (SQLite): run again in a savepoint of
            // its own, so that it fails alone if it was the one that
            // failed after writing.
            careful |= ran.as_ref().err().is_some_and(group::is_undone);
            match ran {
                Err(Error::StorageContention(msg)) => {
                    tries += 1;
                    if tries >= CONTENTION_TRIES {
                        return Err(Error::StorageUnavailable(format!(
                            "still contended after {tries} tries: {msg}"
                        )));
                    }
                    tracing::debug!(tries, error = %msg, "write contended, running it again");
                    tokio::time::sleep(jitter(tries)).await;
                }
                other => return other,
            }
        }
    }
}

impl Store {
    /// Runs one operation within the store's deadline, if it has one. An
    /// operation cut off there is dropped mid-flight: its transaction is
    /// rolled back (the connection, if it answers again, is reset before
    /// reuse; one that does not is closed when the pool tests it).
    pub(super) async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match self.deadline {
            None => op.await,
            Some(d) => tokio::time::timeout(d, op).await.unwrap_or_else(|_| {
                Err(Error::StorageUnavailable(format!(
                    "the database did not answer within {} s",
                    d.as_secs_f64()
                )))
            }),
        }
    }
}

/// A pause of up to 2^tries milliseconds (at least 1 ms), drawn afresh each
/// time so that writers which collided do not collide again in step.
fn jitter(tries: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(tries);
    let ceiling = 1u64 << tries.min(8);
    Duration::from_millis(1 + h.finish() % ceiling)
}

/// A database URL (or a message quoting one) with its password replaced,
/// for messages and logs: the password of `scheme://user:password@host`
/// (up to the last `@` of the authority, so a password containing `@` is
/// hidden whole) and any `password=` query parameter.
pub fn redact_url(s: &str) -> String {
    let mut out = s.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let start = scheme_end + 3;
        let rest = &out[start..];
        // The authority ends at the query; its last `@` ends the user
        // information (a password may contain `@` or `/`).
        let before_query = rest.find('?').unwrap_or(rest.len());
        if let Some(at) = rest[..before_query].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            out = format!(
                "{}{}:<redacted>{}",
                &out[..start],
                &rest[..colon],
                &rest[at..]
            );
        }
    }
    let mut redacted = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let value = i + "password=".len();
        redacted.push_str(&rest[..value]);
        redacted.push_str("<redacted>");
        let end = rest[value..]
            .find(['&', ' ', '"', '\''])
            .map_or(rest.len(), |e| value + e);
        rest = &rest[end..];
    }
    redacted.push_str(rest);
    redacted
}

fn not_found(device_id: &DeviceId, action_id: &ActionId) -> Error {
    Error::ActionNotFound {
        device_id: device_id.to_string(),
        action_id: action_id.to_string(),
    }
}

fn check_etag(
    given: Option<&str>,
    current: &str,
    resource: impl FnOnce() -> String,
) -> Result<(), Error> {
    match given {
        Some(g) if g != current => Err(Error::EtagMismatch {
            resource: resource(),
            current: current.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Parses stored settings JSON.
pub(crate) fn parse_settings(s: &str) -> Result<BTreeMap<String, String>, Error> {
    serde_json::from_str(s).map_err(|e| Error::Internal(format!("stored settings: {e}")))
}
