//! Group commit: the requests' writes (pushes, cancels, device changes,
//! idempotency claims) are queued to a writer ("lane") that runs them one
//! after the other inside one transaction, each in a savepoint of its own,
//! and commits them together: one transaction and one fsync for many
//! requests. Every answer is sent only after its group is durable.
//!
//! - **In order, as if alone.** Members run one at a time, in arrival
//!   order; each reads what the members before it wrote, so it is decided
//!   exactly as if it had run alone after them (same conflicts, strategies
//!   and idempotency).
//! - **One failure fails one.** A member that fails is rolled back to its
//!   savepoint and answered its own error; the others are not touched. A
//!   member failing for a reason of the database (not a decision of the
//!   request's) ends the group there: on SQLite such an error may have
//!   rolled back the whole transaction, and nothing more is run in it.
//! - **Commit decides.** If the group's COMMIT fails, every member is told
//!   so (STORAGE_UNAVAILABLE): nothing of the group was written.
//! - **Bounded.** A group closes when no more work is queued, at
//!   [`MAX_MEMBERS`] members, or [`MAX_OPEN`] after it began: a group
//!   held open longer would keep another process's writes (SQLite) or
//!   another replica's (PostgreSQL row locks) waiting.
//! - **Cut-short calls.** A request whose caller went away before its turn
//!   is not run; one already run is committed with its group (a retry with
//!   the same request_id finds its answer).
//! - **Lanes.** SQLite has one writer connection, so one lane, run on a
//!   thread of its own: each statement is a hand-off to SQLite's worker
//!   thread and back, and that round trip must not queue behind the
//!   server's request handling. PostgreSQL has several lanes (half the
//!   pool's connections), a request's lane chosen by its device (or key),
//!   so one device's writes queue in one lane and do not wait on each
//!   other's row locks across lanes.

use std::{
    hash::{Hash, Hasher},
    time::{Duration, Instant},
};

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;
use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, RuntimeErr, TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Store, db_err,
    direct::{self, Direct, Slot},
};
use crate::domain::Error;

/// At most this many requests in one group.
pub const MAX_MEMBERS: usize = 512;
/// A group stops taking members this long after it began.
pub const MAX_OPEN: Duration = Duration::from_millis(10);

/// What a member's run leaves for after the commit: its answer, to be sent
/// with the group's fate, and whether the group must close after it.
struct Ran {
    answer: Box<dyn FnOnce(Result<(), Error>) + Send>,
    ends_group: bool,
}

/// A queued request: runs its operation in a savepoint of the group's
/// transaction, or is told why it cannot be run.
trait Member: Send {
    fn run<'t>(self: Box<Self>, tx: &'t DatabaseTransaction) -> BoxFuture<'t, Ran>;
    fn fail(self: Box<Self>, e: Error);
    /// Whether the lane is to let go of what it keeps of the connection
    /// (SQLite: its prepared statements) after this member's group, before
    /// answering it.
    fn flushes(&self) -> bool {
        false
    }
}

/// Asks a lane to let go of its prepared statements: the store is about to
/// close its pools, and sqlx cannot close a connection that has some.
struct Flush(oneshot::Sender<()>);

impl Member for Flush {
    fn run<'t>(self: Box<Self>, _: &'t DatabaseTransaction) -> BoxFuture<'t, Ran> {
        let Flush(done) = *self;
        Box::pin(async move {
            Ran {
                ends_group: true,
                answer: Box::new(move |_| {
                    let _ = done.send(());
                }),
            }
        })
    }

    fn fail(self: Box<Self>, _: Error) {
        let _ = self.0.send(());
    }

    fn flushes(&self) -> bool {
        true
    }
}

type Job = Box<dyn Member>;

/// A request's operation and where its answer goes.
struct Request<T, F> {
    op: F,
    reply: oneshot::Sender<Result<T, Error>>,
}

impl<T, F> Member for Request<T, F>
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, Error>> + Send + 'static,
{
    fn run<'t>(self: Box<Self>, tx: &'t DatabaseTransaction) -> BoxFuture<'t, Ran> {
        let Request { op, reply } = *self;
        Box::pin(async move {
            // Gone before its turn: not run.
            if reply.is_closed() {
                return Ran {
                    answer: Box::new(|_| {}),
                    ends_group: false,
                };
            }
            let result = match tx.begin().await.map_err(db_err) {
                Err(e) => Err(e),
                Ok(savepoint) => match op(&savepoint).await {
                    Ok(v) => savepoint.commit().await.map_err(db_err).map(|()| v),
                    Err(e) => match savepoint.rollback().await {
                        Ok(()) => Err(e),
                        // The group's transaction is in doubt.
                        Err(r) => Err(db_err(r)),
                    },
                },
            };
            let ends_group = result.as_ref().err().is_some_and(of_the_database);
            Ran {
                ends_group,
                answer: Box::new(move |committed: Result<(), Error>| {
                    let _ = reply.send(committed.and(result));
                }),
            }
        })
    }

    fn fail(self: Box<Self>, e: Error) {
        let _ = self.reply.send(Err(e));
    }
}

/// The lanes of a store.
#[derive(Debug)]
pub(super) struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    stats: Arc<Stats>,
}

/// What the lanes have done, for metrics and tests.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Requests queued.
    pub(super) queued: AtomicU64,
    /// Groups ended (committed or not).
    pub(super) groups: AtomicU64,
    /// Requests run in those groups.
    pub(super) members: AtomicU64,
}

/// What the group-commit writers have done since the store opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteGroups {
    /// Requests queued to a writer.
    pub queued: u64,
    /// Groups (transactions) they ran in.
    pub groups: u64,
    /// Requests run in those groups.
    pub members: u64,
}

impl Lanes {
    /// Starts the lanes writing through `write`: on SQLite one, on its own
    /// thread, running statements itself; on PostgreSQL `lanes` tasks.
    pub(super) fn start(write: &DatabaseConnection, lanes: usize) -> Result<Self, Error> {
        let stats = Arc::new(Stats::default());
        if write.get_database_backend() == DbBackend::Sqlite {
            let counts = stats.clone();
            let (tx, rx) = mpsc::unbounded_channel();
            let pool = write.get_sqlite_connection_pool().clone();
            std::thread::Builder::new()
                .name("switchyard-writer".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match rt {
                        Ok(rt) => rt.block_on(sqlite_lane(pool, rx, counts)),
                        Err(e) => tracing::error!(error = %e, "the writer's runtime did not start"),
                    }
                })
                .map_err(|e| Error::Internal(format!("the writer's thread did not start: {e}")))?;
            return Ok(Self {
                senders: vec![tx],
                stats,
            });
        }
        let senders = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(pool_lane(write.clone(), rx, stats.clone()));
                tx
            })
            .collect();
        Ok(Self { senders, stats })
    }

    /// What the lanes have done so far.
    pub(super) fn counts(&self) -> WriteGroups {
        WriteGroups {
            queued: self.stats.queued.load(Ordering::Relaxed),
            groups: self.stats.groups.load(Ordering::Relaxed),
            members: self.stats.members.load(Ordering::Relaxed),
        }
    }

    /// Has every lane let go of what it keeps of its connection; for
    /// [`Store::close`], before the pools close.
    pub(super) async fn quiesce(&self) {
        for lane in &self.senders {
            let (done, flushed) = oneshot::channel();
            if lane.send(Box::new(Flush(done))).is_ok() {
                let _ = flushed.await;
            }
        }
    }

    fn lane(&self, key: &str) -> &mpsc::UnboundedSender<Job> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.senders[(h.finish() % self.senders.len() as u64) as usize]
    }
}

/// Whether an error is the database's rather than the request's own
/// decision: after it, the group's transaction is not trusted further.
fn of_the_database(e: &Error) -> bool {
    matches!(
        e,
        Error::StorageUnavailable(_) | Error::StorageContention(_) | Error::Internal(_)
    )
}

impl Store {
    /// What the group-commit writers have done since the store opened.
    pub fn write_groups(&self) -> WriteGroups {
        self.lanes.counts()
    }

    /// Holds the writer of `key`'s lane inside a group until `release`
    /// fires, having told `entered` it is there: requests queued meanwhile
    /// join that group. For the contract's group-commit rules.
    #[cfg(feature = "contract")]
    pub async fn hold_writer(
        &self,
        key: &str,
        entered: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    ) -> Result<(), Error> {
        self.grouped(key, move |_| {
            Box::pin(async move {
                let _ = entered.send(());
                let _ = release.await;
                Ok(())
            })
        })
        .await
    }

    /// Runs `op` as a member of a group in the lane of `key` (a device id,
    /// or another key whose writes should queue together), and answers
    /// once the group is committed. A lost race is answered
    /// [`Error::StorageContention`], for [`Store::retrying`] to run again.
    pub(super) async fn grouped<T, F>(&self, key: &str, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, Error>>
            + Send
            + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, Error>>();
        let job: Job = Box::new(Request { op, reply });
        self.lanes
            .lane(key)
            .send(job)
            .map_err(|_| Error::StorageUnavailable("the store's writer has stopped".into()))?;
        self.lanes.stats.queued.fetch_add(1, Ordering::Relaxed);
        answer.await.unwrap_or_else(|_| {
            Err(Error::Internal(
                "the store's writer dropped a request".into(),
            ))
        })
    }
}

/// Runs queued members in `tx`, from `first` on, while the group is open;
/// `in_doubt` is asked after each whether the transaction can still be
/// trusted.
async fn run_members(
    tx: &DatabaseTransaction,
    first: Job,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    in_doubt: impl Fn() -> bool,
) -> Group {
    let opened = Instant::now();
    let mut group = Group {
        answers: Vec::new(),
        trusted: true,
        flush: false,
    };
    let mut job = Some(first);
    while let Some(j) = job.take() {
        group.flush |= j.flushes();
        let ran = j.run(tx).await;
        group.answers.push(ran.answer);
        if in_doubt() {
            group.trusted = false;
            return group;
        }
        if ran.ends_group || group.answers.len() >= MAX_MEMBERS || opened.elapsed() >= MAX_OPEN {
            break;
        }
        job = rx.try_recv().ok();
    }
    group
}

/// A group run: its members' answers, whether its transaction can still be
/// trusted, and whether the lane is to flush after it.
struct Group {
    answers: Vec<Answer>,
    trusted: bool,
    flush: bool,
}

type Answer = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// A commit's failure as the members are told it: nothing was written,
/// try again.
fn not_committed(e: Error) -> Error {
    match e {
        Error::StorageContention(m) | Error::StorageUnavailable(m) | Error::Internal(m) => {
            Error::StorageUnavailable(format!("the write could not be committed: {m}"))
        }
        other => other,
    }
}

fn answer_all(answers: Vec<Answer>, committed: &Result<(), Error>, stats: &Stats) {
    stats.groups.fetch_add(1, Ordering::Relaxed);
    stats
        .members
        .fetch_add(answers.len() as u64, Ordering::Relaxed);
    tracing::trace!(
        members = answers.len(),
        ok = committed.is_ok(),
        "group done"
    );
    for a in answers {
        a(committed.clone());
    }
}

/// The next request: one already queued, or the next to come (`None`: the
/// store is gone).
async fn next_job(rx: &mut mpsc::UnboundedReceiver<Job>) -> Option<Job> {
    match rx.try_recv() {
        Ok(j) => Some(j),
        Err(_) => rx.recv().await,
    }
}

/// A PostgreSQL lane: groups on a pooled connection.
async fn pool_lane(
    conn: DatabaseConnection,
    mut rx: mpsc::UnboundedReceiver<Job>,
    stats: Arc<Stats>,
) {
    while let Some(first) = next_job(&mut rx).await {
        let tx = match Store::begin_on(&conn, DbBackend::Postgres).await {
            Ok(tx) => tx,
            Err(e) => {
                fail_queued(first, &mut rx, &e);
                continue;
            }
        };
        let Group {
            answers, trusted, ..
        } = run_members(&tx, first, &mut rx, || false).await;
        let committed = if trusted {
            tx.commit().await.map_err(|e| not_committed(db_err(e)))
        } else {
            Err(Error::StorageUnavailable(
                "the write was rolled back".into(),
            ))
        };
        answer_all(answers, &committed, &stats);
    }
}

/// The SQLite lane: for each group, locks the write connection's handle
/// out of its worker thread and runs the group's statements here
/// (`direct.rs`). What it prepares is kept from group to group (the handle
/// is the same while the pool keeps its one connection) until
/// [`Lanes::quiesce`].
async fn sqlite_lane(
    pool: sqlx::SqlitePool,
    mut rx: mpsc::UnboundedReceiver<Job>,
    stats: Arc<Stats>,
) {
    let slot: Slot = Arc::new(Mutex::new(None));
    let direct = Direct::new(slot.clone());
    let failed = direct.failed.clone();
    let proxy: DatabaseConnection = sea_orm::DatabaseConnectionType::MockDatabaseConnection(
        Arc::new(sea_orm::MockDatabaseConnection::new(direct)),
    )
    .into();
    // The handle the connection in `slot` was made on.
    let mut made_on: Option<usize> = None;
    while let Some(first) = next_job(&mut rx).await {
        let mut pooled = match pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let e = db_err(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))));
                fail_queued(first, &mut rx, &e);
                continue;
            }
        };
        let mut locked = match pooled.lock_handle().await {
            Ok(l) => l,
            Err(e) => {
                let e = db_err(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))));
                fail_queued(first, &mut rx, &e);
                continue;
            }
        };
        let handle = locked.as_raw_handle().as_ptr() as usize;
        if made_on != Some(handle) {
            if let Some(stale) = lock(&slot).take() {
                // The pool's connection was replaced (it never is while
                // the store is open): the old one's statements are not
                // finalized against a handle that may be gone.
                tracing::error!("the write connection changed under the writer");
                std::mem::forget(stale);
            }
            match borrow_handle(&mut locked) {
                Ok(c) => {
                    c.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
                    *lock(&slot) = Some(c);
                    made_on = Some(handle);
                }
                Err(e) => {
                    fail_queued(first, &mut rx, &db_err(direct::to_db_err(e)));
                    continue;
                }
            }
        }
        let begun = match lock(&slot).as_ref() {
            Some(c) => c
                .prepare_cached("BEGIN IMMEDIATE")
                .and_then(|mut st| st.execute([]))
                .map_err(|e| db_err(direct::to_db_err(e))),
            None => Err(Error::Internal("the writer holds no connection".into())),
        };
        if let Err(e) = begun {
            fail_queued(first, &mut rx, &e);
            continue;
        }
        *lock(&failed) = None;
        let group = match proxy.begin().await {
            Ok(tx) => {
                let ran = run_members(&tx, first, &mut rx, || lock(&failed).is_some()).await;
                // The group's own transaction is ended below, on the
                // connection itself.
                let _ = tx.commit().await;
                ran
            }
            Err(e) => {
                tracing::warn!(error = %e, "the writer could not begin a group");
                first.fail(Error::StorageUnavailable(e.to_string()));
                Group {
                    answers: Vec::new(),
                    trusted: false,
                    flush: false,
                }
            }
        };
        let committed = {
            let slot = lock(&slot);
            match slot.as_ref() {
                None => Err(Error::Internal("the writer lost its connection".into())),
                Some(conn) => end_group(conn, group.trusted, &failed),
            }
        };
        if group.flush {
            // Finalizes the prepared statements (the handle stays open).
            drop(lock(&slot).take());
            made_on = None;
        }
        drop(locked);
        drop(pooled);
        answer_all(group.answers, &committed, &stats);
    }
    drop(lock(&slot).take());
}

/// Statements the SQLite writer keeps prepared (the mutations' own, and
/// the savepoints').
const STATEMENTS_KEPT: usize = 64;

/// Commits a group's transaction, or rolls it back when it cannot be
/// trusted or the commit fails.
fn end_group(
    conn: &rusqlite::Connection,
    trusted: bool,
    failed: &Mutex<Option<String>>,
) -> Result<(), Error> {
    let run = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut st| st.execute([]))
            .map(|_| ())
    };
    let outcome = if trusted {
        run("COMMIT").map_err(|e| not_committed(db_err(direct::to_db_err(e))))
    } else {
        Err(Error::StorageUnavailable(format!(
            "the write was rolled back: {}",
            lock(failed).take().unwrap_or_default()
        )))
    };
    if outcome.is_err()
        && !conn.is_autocommit()
        && let Err(e) = run("ROLLBACK")
    {
        tracing::error!(error = %e, "rolling back a group failed");
    }
    outcome
}

/// A rusqlite connection on the locked handle of sqlx's connection.
///
/// The only `unsafe` of switchyard. Sound because:
/// - it is used only inside a group, while the handle is locked out of
///   sqlx's worker thread (`locked` in [`sqlite_lane`]), so one thread at a
///   time uses the handle;
/// - it does not own the handle (rusqlite's `from_handle` never closes it);
///   between groups it only keeps statements prepared on it, reset (SQLite
///   allows any number per connection, and sqlx's own are beside them);
/// - the handle stays open while they exist: the lane holds a clone of the
///   pool, so its one connection is not dropped; [`Store::close`] has the
///   lane finalize them ([`Lanes::quiesce`]) before it closes the pool; and
///   a handle that changed anyway is never touched through the old
///   connection (it is leaked, not finalized);
/// - rusqlite and sqlx-sqlite link the same libsqlite3-sys (rusqlite is
///   pinned in Cargo.toml to the version that uses it), so the handle is of
///   the SQLite they both call.
#[allow(unsafe_code)]
fn borrow_handle(
    locked: &mut sqlx::sqlite::LockedSqliteHandle<'_>,
) -> Result<rusqlite::Connection, rusqlite::Error> {
    let raw = locked.as_raw_handle().as_ptr();
    // SAFETY: see above.
    unsafe { rusqlite::Connection::from_handle(raw) }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers `first` and every request queued behind it with `e`: nothing
/// can be written now.
fn fail_queued(first: Job, rx: &mut mpsc::UnboundedReceiver<Job>, e: &Error) {
    let mut failed = vec![first];
    while let Ok(j) = rx.try_recv() {
        failed.push(j);
    }
    tracing::warn!(error = %e, requests = failed.len(), "could not begin a write transaction");
    for j in failed {
        j.fail(e.clone());
    }
}
