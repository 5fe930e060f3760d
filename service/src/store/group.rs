//! Group commit: the requests' writes (pushes, cancels, device changes,
//! each with its idempotency key) are queued to a writer ("lane") that
//! runs them one after the other inside one transaction, each in a
//! savepoint of its own (on SQLite only when it must be: see below), and
//! commits them together: one transaction and one fsync for many
//! requests. Every answer is sent only after its group is durable (ADR
//! 0011).
//!
//! - **In order, as if alone.** Members run one at a time, in arrival
//!   order; each reads what the members before it wrote, so it is decided
//!   exactly as if it had run alone after them (same conflicts, strategies
//!   and idempotency).
//! - **One failure fails one.** A member that fails is rolled back to its
//!   savepoint and answered its own error; the others are not touched. A
//!   member failing for a reason of the database (not a decision of the
//!   request's) ends the group there. A member after which the transaction
//!   cannot be trusted (a savepoint that could not be rolled back, SQLite
//!   having rolled the whole transaction back itself, a panic, a member
//!   past its time) rolls the whole group back: each of its members is
//!   told STORAGE_UNAVAILABLE, and nothing of the group was written.
//! - **PostgreSQL: a savepoint, one round trip.** A member's savepoint
//!   is released by the next member's in the same round trip, the last
//!   one's before the COMMIT (`member_savepoint!`).
//! - **SQLite: no savepoint unless needed.** On SQLite a member runs
//!   without a savepoint (`direct.rs`): refusals are decided before
//!   anything is written. One that fails after it changed rows rolls the
//!   group back; every member is told STORAGE_CONTENTION
//!   ([`is_undone`]), and the store runs each again in a savepoint of its
//!   own ([`CAREFUL`]), as every member after it in its group.
//! - **Commit decides.** If the group's COMMIT fails, every member is told
//!   so (STORAGE_UNAVAILABLE): nothing of the group was written. (On
//!   PostgreSQL a COMMIT that does not answer within the deadline is
//!   answered the same way, though it may have committed: a retry with the
//!   same request_id finds the answer.)
//! - **Bounded.** A group closes when no more work is queued, at
//!   [`GroupLimits::members`] members, or [`GroupLimits::open`] after it
//!   began: a group held open longer would keep another process's writes
//!   (SQLite) or another replica's (PostgreSQL row locks) waiting. On
//!   PostgreSQL each member, and the commit, has the store's deadline.
//! - **Cut-short calls.** A request whose caller went away, or whose wait
//!   for its turn outlasted the store's deadline, before its turn is not
//!   run; one already started is committed with its group (a retry with
//!   the same request_id finds its answer).
//! - **Lanes.** SQLite has one writer connection, so one lane, run on a
//!   thread of its own that runs the statements itself (`direct.rs`): a
//!   hand-off to sqlx's worker thread and back per statement bounded the
//!   push rate more than the disk did. PostgreSQL has several lanes (half
//!   the pool's connections), a request's lane chosen by its device (or
//!   key), so one device's writes queue in one lane and do not wait on
//!   each other's row locks across lanes.

use std::{
    hash::{Hash, Hasher},
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};
use tracing::Instrument as _;

use futures::{FutureExt as _, future::BoxFuture};
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, RuntimeErr,
    TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Store,
    batch::{self, PushJob, PushSpec},
    db_err,
    direct::{self, Direct, Slot},
};
use crate::domain::Error;

/// How large and how long a group may grow.
#[derive(Clone, Copy, Debug)]
pub struct GroupLimits {
    /// At most this many requests in one group.
    pub members: usize,
    /// A group stops taking members this long after it began.
    pub open: Duration,
    /// PostgreSQL: how long a member, or a commit, may take before the
    /// group is given up (rolled back, its connection dropped).
    pub deadline: Option<Duration>,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            members: 512,
            open: Duration::from_millis(10),
            deadline: None,
        }
    }
}

/// What a member's run leaves for after the commit: its answer, to be sent
/// with the group's fate; whether the group must close after it; whether
/// the group's transaction can still be trusted.
pub(super) struct Ran {
    pub(super) answer: Answer,
    pub(super) ends_group: bool,
    pub(super) in_doubt: bool,
}

pub(super) type Answer = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// A queued request: runs its operation in a savepoint of the group's
/// transaction, or is told why it cannot be run.
pub(super) trait Member: Send {
    /// `open`: PostgreSQL, whether the member before it left its
    /// savepoint open (see `member_savepoint!`).
    fn run<'t>(
        self: Box<Self>,
        tx: &'t DatabaseTransaction,
        open: &'t AtomicBool,
    ) -> BoxFuture<'t, Ran>;
    fn fail(self: Box<Self>, e: Error);
    /// Whether this is a [`Flush`] rather than a request.
    fn flushes(&self) -> bool {
        false
    }
    /// Where the lane says why it dropped the member midway, if it must
    /// (its answer is in the run it dropped).
    fn fate(&self) -> Option<Fate> {
        None
    }
    /// Whether it must run in a savepoint of its own (SQLite: a request
    /// run again after its group was undone).
    fn careful(&self) -> bool {
        false
    }
    /// A push a PostgreSQL lane may decide with others (`batch.rs`).
    fn push(&self) -> Option<&PushSpec> {
        None
    }
    /// The push itself, if it is one.
    fn into_push(self: Box<Self>) -> Result<Box<PushJob>, Job>;
}

/// PostgreSQL: the savepoint each member runs in. A member's savepoint is
/// left open when it succeeds and released by the next member's in the
/// same round trip (`RELEASE …; SAVEPOINT …`, one simple query), the last
/// one's once the group closes ([`RELEASE_MEMBER`], before the COMMIT):
/// one round trip a member instead of two (a SAVEPOINT and a RELEASE
/// each). One that fails is rolled back to it
/// (`ROLLBACK TO`, which keeps it, empty, for the next member to
/// release). Named apart from sqlx's own (`_sqlx_savepoint_N`), which an
/// operation's nested transactions use.
macro_rules! member_savepoint {
    () => {
        "switchyard_member"
    };
}

/// Opens the first member's savepoint.
pub(super) const OPEN_MEMBER: &str = concat!("SAVEPOINT ", member_savepoint!());

/// Releases the member before's savepoint and opens the next's, in one
/// simple query.
pub(super) const NEXT_MEMBER: &str = concat!(
    "RELEASE SAVEPOINT ",
    member_savepoint!(),
    "; SAVEPOINT ",
    member_savepoint!()
);

/// Rolls a failed member back to its savepoint (which stays, empty).
pub(super) const UNDO_MEMBER: &str = concat!("ROLLBACK TO SAVEPOINT ", member_savepoint!());

/// Releases the last member's savepoint. It fails if the transaction was
/// left aborted, where a COMMIT would roll it back without an error.
const RELEASE_MEMBER: &str = concat!("RELEASE SAVEPOINT ", member_savepoint!());

/// Runs `op` in a member savepoint of the group's transaction `tx`
/// (`member_savepoint!`); `in_doubt` is set when the transaction can no
/// longer be trusted (a savepoint statement failed: PostgreSQL then
/// leaves it aborted).
pub(super) async fn pg_member<'t, T, F>(
    tx: &'t DatabaseTransaction,
    open: &AtomicBool,
    op: F,
    in_doubt: &mut bool,
) -> Result<T, Error>
where
    F: FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, Error>>,
{
    let begin = if open.swap(true, Ordering::Relaxed) {
        NEXT_MEMBER
    } else {
        OPEN_MEMBER
    };
    if let Err(e) = tx.execute_unprepared(begin).await {
        *in_doubt = true;
        return Err(db_err(e));
    }
    match op(tx).await {
        Ok(v) => Ok(v),
        Err(e) => match tx.execute_unprepared(UNDO_MEMBER).await {
            Ok(_) => Err(e),
            Err(r) => {
                *in_doubt = true;
                Err(db_err(r))
            }
        },
    }
}

/// Why a request was dropped midway; read by its caller.
pub(super) type Fate = Arc<Mutex<Option<Error>>>;

/// Asks a lane to let go of what it keeps of its connection (SQLite: its
/// prepared statements, which sqlx cannot close a connection with) and to
/// take no more work: the store is closing.
struct Flush(oneshot::Sender<()>);

impl Member for Flush {
    fn run<'t>(
        self: Box<Self>,
        _: &'t DatabaseTransaction,
        _: &'t AtomicBool,
    ) -> BoxFuture<'t, Ran> {
        // Never run in a group: the lanes take it apart.
        let Flush(done) = *self;
        Box::pin(async move {
            Ran {
                answer: Box::new(move |_| {
                    let _ = done.send(());
                }),
                ends_group: true,
                in_doubt: false,
            }
        })
    }

    fn fail(self: Box<Self>, _: Error) {
        let _ = self.0.send(());
    }

    fn flushes(&self) -> bool {
        true
    }

    fn into_push(self: Box<Self>) -> Result<Box<PushJob>, Job> {
        Err(self)
    }
}

pub(super) type Job = Box<dyn Member>;

/// Where a request stands: queued, started by the writer, or given up by
/// its caller before it started.
const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

/// A request's operation and where its answer goes.
pub(super) struct Request<T, F> {
    pub(super) op: F,
    pub(super) reply: oneshot::Sender<Result<T, Error>>,
    pub(super) state: Arc<AtomicU8>,
    pub(super) fate: Fate,
    pub(super) careful: bool,
}

impl<T> Request<T, ()> {
    /// This request, running `op`.
    pub(super) fn with<F>(self, op: F) -> Request<T, F> {
        let Request {
            reply,
            state,
            fate,
            careful,
            ..
        } = self;
        Request {
            op,
            reply,
            state,
            fate,
            careful,
        }
    }
}

/// Takes a request's turn: whether it is to run (not given up by its
/// caller, who still waits).
pub(super) fn start(state: &AtomicU8, reply_closed: bool) -> bool {
    state
        .compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
        && !reply_closed
}

/// Gives back a request's turn, taken by a batch that left it to run
/// alone and wrote nothing of it: until it runs, its caller may give up
/// waiting for it, as for any request queued.
pub(super) fn unstart(state: &AtomicU8) {
    let _ = state.compare_exchange(STARTED, QUEUED, Ordering::AcqRel, Ordering::Acquire);
}

impl<T, F> Member for Request<T, F>
where
    T: Send + 'static,
    F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, Error>> + Send + 'static,
{
    fn run<'t>(
        self: Box<Self>,
        tx: &'t DatabaseTransaction,
        open: &'t AtomicBool,
    ) -> BoxFuture<'t, Ran> {
        let Request {
            op, reply, state, ..
        } = *self;
        Box::pin(async move {
            // Gone, or given up, before its turn: not run.
            if !start(&state, reply.is_closed()) {
                return Ran {
                    answer: Box::new(|_| {}),
                    ends_group: false,
                    in_doubt: false,
                };
            }
            let mut in_doubt = false;
            let result = if tx.get_database_backend() == DbBackend::Postgres {
                pg_member(tx, open, op, &mut in_doubt).await
            } else {
                match tx.begin().await {
                    // SQLite (`direct.rs`: a savepoint only when careful).
                    Err(e) => {
                        in_doubt = true;
                        Err(db_err(e))
                    }
                    Ok(savepoint) => match op(&savepoint).await {
                        Ok(v) => savepoint.commit().await.map(|()| v).map_err(|e| {
                            in_doubt = true;
                            db_err(e)
                        }),
                        Err(e) => match savepoint.rollback().await {
                            Ok(()) => Err(e),
                            Err(r) => {
                                in_doubt = true;
                                Err(db_err(r))
                            }
                        },
                    },
                }
            };
            // The database's failure, not the request's decision: no more
            // members join the group.
            let ends_group = result.as_ref().err().is_some_and(Error::is_storage);
            Ran {
                ends_group,
                in_doubt,
                answer: Box::new(move |committed: Result<(), Error>| {
                    let _ = reply.send(committed.and(result));
                }),
            }
        })
    }

    fn fail(self: Box<Self>, e: Error) {
        let _ = self.reply.send(Err(e));
    }

    fn fate(&self) -> Option<Fate> {
        Some(self.fate.clone())
    }

    fn careful(&self) -> bool {
        self.careful
    }

    fn into_push(self: Box<Self>) -> Result<Box<PushJob>, Job> {
        Err(self)
    }
}

/// The lanes of a store.
#[derive(Debug)]
pub(super) struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    stats: Arc<Stats>,
    /// How long a request may wait for its turn (PostgreSQL).
    deadline: Option<Duration>,
}

/// What the lanes have done, for metrics and tests.
#[derive(Debug, Default)]
struct Stats {
    queued: AtomicU64,
    groups: AtomicU64,
    members: AtomicU64,
    batched: AtomicU64,
    /// Woken after each commit that may have written events (event
    /// watchers of this process look at once instead of at their next
    /// poll).
    changed: tokio::sync::Notify,
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
    /// PostgreSQL: pushes of those written by a batch, decided with
    /// others on other devices (`batch.rs`, ADR 0016).
    pub batched: u64,
}

impl Lanes {
    /// Starts the lanes writing through `write`: on SQLite one, on its own
    /// thread, running statements itself; on PostgreSQL `lanes` tasks.
    pub(super) fn start(
        write: &DatabaseConnection,
        lanes: usize,
        limits: GroupLimits,
    ) -> Result<Self, Error> {
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
                        Ok(rt) => rt.block_on(sqlite_lane(pool, rx, counts, limits)),
                        Err(e) => tracing::error!(error = %e, "the writer's runtime did not start"),
                    }
                })
                .map_err(|e| Error::Internal(format!("the writer's thread did not start: {e}")))?;
            return Ok(Self {
                senders: vec![tx],
                stats,
                deadline: None,
            });
        }
        let senders = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(pool_lane(write.clone(), rx, stats.clone(), limits));
                tx
            })
            .collect();
        Ok(Self {
            senders,
            stats,
            deadline: limits.deadline,
        })
    }

    /// Woken after each commit of this process that may have written
    /// events.
    pub(super) fn changed(&self) -> &tokio::sync::Notify {
        &self.stats.changed
    }

    /// What the lanes have done so far.
    fn counts(&self) -> WriteGroups {
        WriteGroups {
            queued: self.stats.queued.load(Ordering::Relaxed),
            groups: self.stats.groups.load(Ordering::Relaxed),
            members: self.stats.members.load(Ordering::Relaxed),
            batched: self.stats.batched.load(Ordering::Relaxed),
        }
    }

    /// Has every lane let go of what it keeps of its connection and stop
    /// taking work; for [`Store::close`], before the pools close.
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

    /// Whether the writes of `a` and `b` queue in one lane (on SQLite,
    /// always: it has one). For the contract's group-commit rules.
    #[cfg(feature = "contract")]
    pub fn same_lane(&self, a: &str, b: &str) -> bool {
        std::ptr::eq(self.lanes.lane(a), self.lanes.lane(b))
    }

    /// Runs, as one member of a group in the lane of `key`, an operation
    /// that changes device `device_id`'s display name to `name`, then
    /// runs a statement that fails and hides the failure (answers `Ok`),
    /// as a faulty operation would. For the contract's group-commit rules:
    /// whatever the answer, it must match what is stored.
    #[cfg(feature = "contract")]
    pub async fn hide_a_failed_statement(
        &self,
        key: &str,
        tenant: &crate::domain::TenantId,
        device_id: &crate::domain::DeviceId,
        name: &str,
    ) -> Result<(), Error> {
        use super::entity::device;
        use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _, sea_query::Expr};
        let (tenant, device_id, name) = (
            tenant.as_str().to_owned(),
            device_id.as_str().to_owned(),
            name.to_owned(),
        );
        self.grouped(key, move |tx| {
            Box::pin(async move {
                device::Entity::update_many()
                    .col_expr(device::Column::DisplayName, Expr::value(name))
                    .filter(device::Column::TenantId.eq(tenant))
                    .filter(device::Column::DeviceId.eq(device_id))
                    .exec(tx)
                    .await
                    .map_err(db_err)?;
                let _hidden = tx
                    .execute_unprepared("SELECT * FROM switchyard_no_such_table")
                    .await;
                Ok(())
            })
        })
        .await
    }

    /// Runs `op` as a member of a group in the lane of `key` (a device id,
    /// or another key whose writes should queue together), and answers
    /// once the group is committed. A lost race is answered
    /// [`Error::StorageContention`], for [`Store::retrying`] to run again.
    /// A request still waiting for its turn after the store's deadline is
    /// given up (STORAGE_UNAVAILABLE, never run); one that has started is
    /// waited for (the lane bounds it).
    pub(super) async fn grouped<T, F>(&self, key: &str, op: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> BoxFuture<'t, Result<T, Error>>
            + Send
            + 'static,
    {
        self.queued(key, |request| Box::new(request.with(op))).await
    }

    /// Queues the job `make` makes of a request in the lane of `key`, and
    /// waits for its answer ([`Store::grouped`]).
    pub(super) async fn queued<T>(
        &self,
        key: &str,
        make: impl FnOnce(Request<T, ()>) -> Job,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
    {
        let (reply, mut answer) = oneshot::channel::<Result<T, Error>>();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let fate: Fate = Arc::new(Mutex::new(None));
        let job = make(Request {
            op: (),
            reply,
            state: state.clone(),
            fate: fate.clone(),
            careful: CAREFUL.try_with(|c| *c).unwrap_or(false),
        });
        self.lanes
            .lane(key)
            .send(job)
            .map_err(|_| Error::StorageUnavailable("the store's writer has stopped".into()))?;
        self.lanes.stats.queued.fetch_add(1, Ordering::Relaxed);
        let dropped = || {
            lock(&fate)
                .take()
                .unwrap_or_else(|| Error::Internal("the store's writer dropped a request".into()))
        };
        if let Some(d) = self.lanes.deadline
            && let Ok(answered) = tokio::time::timeout(d, &mut answer).await
        {
            return answered.unwrap_or_else(|_| Err(dropped()));
        }
        if self.lanes.deadline.is_some()
            && state
                .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Err(Error::StorageUnavailable(format!(
                "the write waited more than {} s for its turn",
                self.lanes.deadline.unwrap_or_default().as_secs_f64()
            )));
        }
        answer.await.unwrap_or_else(|_| Err(dropped()))
    }
}

/// A group run: its members' answers, whether its transaction can still be
/// trusted, and a flush met while it ran (left for after it).
struct Group {
    answers: Vec<Answer>,
    trusted: bool,
    flush: Option<Job>,
}

/// Awaits a member's (or a batch's) pinned run within `deadline`: `None`
/// if it ran out of time, `Some(Err)` if it panicked.
async fn within<F: std::future::Future + Unpin>(
    run: &mut F,
    deadline: Option<Duration>,
) -> Option<F::Output> {
    match deadline {
        None => Some(run.await),
        Some(d) => tokio::time::timeout(d, run).await.ok(),
    }
}

/// Runs queued members in `tx`, from `first` on, while the group is open;
/// `in_doubt` is asked after each whether the transaction can still be
/// trusted (SQLite: a savepoint statement failed). `pending` holds the
/// requests taken from the queue but not run yet, in order (those a batch
/// left to run alone, those it passed over, and the one that ended its
/// look): they run before the queue, in this group or the next. `batches`: PostgreSQL, whose
/// pushes queued one after the other on distinct devices run as a batch
/// (`batch.rs`), counted there.
#[allow(clippy::too_many_arguments)]
async fn run_members(
    tx: &DatabaseTransaction,
    first: Job,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    pending: &mut std::collections::VecDeque<Job>,
    limits: &GroupLimits,
    in_doubt: impl Fn() -> bool,
    careful: impl Fn(bool),
    batches: Option<&Stats>,
) -> Group {
    let opened = Instant::now();
    let open = AtomicBool::new(false);
    let mut group = Group {
        answers: Vec::new(),
        trusted: true,
        flush: None,
    };
    let mut job = Some(first);
    while let Some(mut j) = job.take() {
        if j.flushes() {
            group.flush = Some(j);
            break;
        }
        if let Some(stats) = batches
            && j.push().is_some()
        {
            match j.into_push() {
                Ok(push) => {
                    let room = limits
                        .members
                        .saturating_sub(group.answers.len())
                        .clamp(1, batch::MOST);
                    let mut members = batch::gather(*push, pending, rx, room);
                    if members.len() == 1
                        && let Some(one) = members.pop()
                    {
                        j = Box::new(one);
                    } else {
                        let fates: Vec<Fate> = members.iter().filter_map(|m| m.fate()).collect();
                        let mut run = std::pin::pin!(
                            AssertUnwindSafe(batch::run(tx, &open, members)).catch_unwind()
                        );
                        let dropped = |e: Error| {
                            for f in &fates {
                                *lock(f) = Some(e.clone());
                            }
                        };
                        match within(&mut run, limits.deadline).await {
                            Some(Ok(ran)) => {
                                stats.batched.fetch_add(ran.written, Ordering::Relaxed);
                                group.answers.extend(ran.answers);
                                for alone in ran.alone.into_iter().rev() {
                                    pending.push_front(alone);
                                }
                                if ran.in_doubt {
                                    group.trusted = false;
                                    return group;
                                }
                                if ran.ends_group {
                                    break;
                                }
                            }
                            Some(Err(_)) => {
                                tracing::error!(
                                    "a batch of pushes panicked; its group is rolled back"
                                );
                                dropped(Error::Internal("a write panicked".into()));
                                group.trusted = false;
                                return group;
                            }
                            None => {
                                tracing::warn!(
                                    "a batch of pushes ran out of time; its group is rolled back"
                                );
                                dropped(Error::StorageUnavailable(
                                    "the database did not answer in time; nothing was written"
                                        .into(),
                                ));
                                group.trusted = false;
                                return group;
                            }
                        }
                        if group.answers.len() >= limits.members || opened.elapsed() >= limits.open
                        {
                            break;
                        }
                        job = pending.pop_front().or_else(|| rx.try_recv().ok());
                        continue;
                    }
                }
                Err(other) => j = other,
            }
        }
        careful(j.careful());
        let fate = j.fate();
        let dropped = |e: Error| {
            if let Some(f) = &fate {
                *lock(f) = Some(e);
            }
        };
        // Pinned here, so that a run cut off is dropped only after its
        // caller has been told why (its answer is in the run).
        let mut run = std::pin::pin!(AssertUnwindSafe(j.run(tx, &open)).catch_unwind());
        match within(&mut run, limits.deadline).await {
            Some(Ok(ran)) => {
                group.answers.push(ran.answer);
                if ran.in_doubt || in_doubt() {
                    group.trusted = false;
                    return group;
                }
                if ran.ends_group {
                    break;
                }
            }
            // A member that panicked (its caller is told the writer
            // dropped it) or ran out of time leaves the transaction in
            // doubt.
            Some(Err(_)) => {
                tracing::error!("a write panicked; its group is rolled back");
                dropped(Error::Internal("a write panicked".into()));
                group.trusted = false;
                return group;
            }
            None => {
                tracing::warn!("a write ran out of time; its group is rolled back");
                dropped(Error::StorageUnavailable(
                    "the database did not answer in time; nothing was written".into(),
                ));
                group.trusted = false;
                return group;
            }
        }
        if group.answers.len() >= limits.members || opened.elapsed() >= limits.open {
            break;
        }
        job = pending.pop_front().or_else(|| rx.try_recv().ok());
    }
    // PostgreSQL: the last member's savepoint is released here, not left
    // to the COMMIT. A transaction an operation left aborted (a failed
    // statement it did not report) fails this RELEASE, and the group is
    // rolled back and told so; a COMMIT would roll it back silently and
    // answer success.
    if open.load(Ordering::Relaxed) {
        let release = tx.execute_unprepared(RELEASE_MEMBER);
        let released = match limits.deadline {
            None => Some(release.await),
            Some(d) => tokio::time::timeout(d, release).await.ok(),
        };
        if !matches!(released, Some(Ok(_))) {
            tracing::warn!("a group's last savepoint could not be released; it is rolled back");
            group.trusted = false;
        }
    }
    group
}

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

/// A group's span, when traces are exported (none otherwise).
fn group_span() -> tracing::Span {
    if crate::telemetry::instruments().is_some() {
        tracing::info_span!("store.group_commit")
    } else {
        tracing::Span::none()
    }
}

fn rolled_back(why: &str) -> Error {
    Error::StorageUnavailable(format!("the write was rolled back: {why}"))
}

fn answer_all(answers: Vec<Answer>, committed: &Result<(), Error>, stats: &Stats) {
    stats.groups.fetch_add(1, Ordering::Relaxed);
    crate::metrics::group_commit(answers.len());
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
    if committed.is_ok() {
        stats.changed.notify_waiters();
    }
}

/// The next request: one left over from the last group, one already
/// queued, or the next to come (`None`: the store is gone).
async fn next_job(left: &mut Option<Job>, rx: &mut mpsc::UnboundedReceiver<Job>) -> Option<Job> {
    if let Some(j) = left.take() {
        return Some(j);
    }
    match rx.try_recv() {
        Ok(j) => Some(j),
        Err(_) => rx.recv().await,
    }
}

/// After a flush: every request is told the store is closing.
async fn refuse_all(mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(j) = rx.recv().await {
        j.fail(Error::StorageUnavailable("the store is closing".into()));
    }
}

/// A PostgreSQL lane: groups on a pooled connection.
async fn pool_lane(
    conn: DatabaseConnection,
    mut rx: mpsc::UnboundedReceiver<Job>,
    stats: Arc<Stats>,
    limits: GroupLimits,
) {
    // Taken from the queue, not run yet, in order (`run_members`).
    let mut pending = std::collections::VecDeque::new();
    loop {
        let first = match pending.pop_front() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        if first.flushes() {
            first.fail(rolled_back("closing"));
            return refuse_all(rx).await;
        }
        let begun = match limits.deadline {
            None => Store::begin_on(&conn, DbBackend::Postgres).await,
            Some(d) => tokio::time::timeout(d, Store::begin_on(&conn, DbBackend::Postgres))
                .await
                .unwrap_or_else(|_| Err(Error::StorageUnavailable("BEGIN timed out".into()))),
        };
        let tx = match begun {
            Ok(tx) => tx,
            Err(e) => {
                let mut waiting = std::mem::take(&mut pending);
                waiting.push_front(first);
                pending.extend(fail_all(waiting, &mut rx, &e));
                continue;
            }
        };
        let group = run_members(
            &tx,
            first,
            &mut rx,
            &mut pending,
            &limits,
            || false,
            |_| {},
            Some(&stats),
        )
        .instrument(group_span())
        .await;
        // A flush is met only once nothing is pending.
        pending.extend(group.flush);
        let committed = if group.trusted {
            let commit = tx.commit();
            match limits.deadline {
                None => commit.await.map_err(|e| not_committed(db_err(e))),
                Some(d) => match tokio::time::timeout(d, commit).await {
                    Ok(c) => c.map_err(|e| not_committed(db_err(e))),
                    // Whether it committed is unknown: the members are told
                    // to retry (those with a request_id find their answer).
                    Err(_) => Err(Error::StorageUnavailable(
                        "the commit did not answer in time".into(),
                    )),
                },
            }
        } else {
            // Dropped: rolled back (a connection that does not answer is
            // closed by the pool).
            drop(tx);
            Err(rolled_back("a member left the transaction in doubt"))
        };
        answer_all(group.answers, &committed, &stats);
    }
}

/// The SQLite lane: for each group, locks the write connection's handle
/// out of its worker thread and runs the group's statements here
/// (`direct.rs`). What it prepares is kept from group to group (the handle
/// is the same while the pool keeps its one connection) until a flush
/// ([`Lanes::quiesce`]) or the store's end.
async fn sqlite_lane(
    pool: sqlx::SqlitePool,
    mut rx: mpsc::UnboundedReceiver<Job>,
    stats: Arc<Stats>,
    limits: GroupLimits,
) {
    let slot: Slot = Arc::new(Mutex::new(None));
    let direct = Direct::new(slot.clone());
    let failed = direct.failed.clone();
    let undone = direct.undone.clone();
    let careful = direct.careful.clone();
    let proxy: DatabaseConnection = sea_orm::DatabaseConnectionType::MockDatabaseConnection(
        Arc::new(sea_orm::MockDatabaseConnection::new(direct)),
    )
    .into();
    // The handle the connection in `slot` was made on.
    let mut made_on: Option<usize> = None;
    let mut since_checkpoint = 0;
    let mut next: Option<Job> = None;
    loop {
        let Some(first) = next_job(&mut next, &mut rx).await else {
            break;
        };
        if first.flushes() {
            finalize(&pool, &slot).await;
            first.fail(rolled_back("closing"));
            return refuse_all(rx).await;
        }
        let mut pooled = match pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let e = db_err(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))));
                next = fail_queued(first, &mut rx, &e);
                continue;
            }
        };
        let mut locked = match pooled.lock_handle().await {
            Ok(l) => l,
            Err(e) => {
                let e = db_err(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))));
                next = fail_queued(first, &mut rx, &e);
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
                    next = fail_queued(first, &mut rx, &db_err(direct::to_db_err(e)));
                    continue;
                }
            }
        }
        let begun = run_on(&slot, "BEGIN IMMEDIATE");
        if let Err(e) = begun {
            next = fail_queued(first, &mut rx, &e);
            continue;
        }
        *lock(&failed) = None;
        undone.store(false, Ordering::Relaxed);
        let group = match proxy.begin().await {
            Ok(tx) => {
                let in_doubt = || lock(&failed).is_some() || undone.load(Ordering::Relaxed);
                // From a careful member on, the rest of its group takes
                // savepoints too: none of them can undo the group it was
                // run again in.
                careful.store(false, Ordering::Relaxed);
                // One writer: nothing is batched, so nothing is left
                // pending (checked below).
                let mut pending = std::collections::VecDeque::new();
                let ran = run_members(
                    &tx,
                    first,
                    &mut rx,
                    &mut pending,
                    &limits,
                    in_doubt,
                    |c| {
                        if c {
                            careful.store(true, Ordering::Relaxed);
                        }
                    },
                    None,
                )
                .instrument(group_span())
                .await;
                debug_assert!(pending.is_empty(), "SQLite batches nothing");
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
                    flush: None,
                }
            }
        };
        next = group.flush;
        let committed = if group.trusted {
            run_on(&slot, "COMMIT").map_err(not_committed)
        } else if undone.load(Ordering::Relaxed) && lock(&failed).is_none() {
            // A member without a savepoint failed after writing: the group
            // is rolled back and every member run again, in a savepoint
            // (`Direct`).
            tracing::debug!("a write failed after writing; its group is rolled back and run again");
            Err(undone_error())
        } else {
            Err(rolled_back(&lock(&failed).take().unwrap_or_else(|| {
                "a member left the transaction in doubt".into()
            })))
        };
        // Whatever did not commit is rolled back; a connection that cannot
        // even do that is closed (the pool opens another).
        let mut wedged = false;
        if let Some(conn) = lock(&slot).as_ref()
            && !conn.is_autocommit()
            && let Err(e) = run_on_conn(conn, "ROLLBACK")
        {
            tracing::error!(error = %e, "rolling back a group failed; closing the write connection");
            wedged = true;
        }
        if wedged {
            drop(lock(&slot).take());
            made_on = None;
            drop(locked);
            let _ = pooled.close().await;
            answer_all(group.answers, &committed, &stats);
            continue;
        }
        let checkpoint = committed.is_ok();
        answer_all(group.answers, &committed, &stats);
        // The WAL is copied back into the database file here, after the
        // answers are out, while their clients send their next requests;
        // left to SQLite, it happens inside a COMMIT, before the group is
        // answered (every 1,000 pages: every few groups).
        if checkpoint {
            since_checkpoint += 1;
            if since_checkpoint >= CHECKPOINT_EVERY {
                since_checkpoint = 0;
                if let Some(conn) = lock(&slot).as_ref()
                    && let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::debug!(error = %e, "checkpoint after a group failed");
                }
            }
        }
        drop(locked);
        drop(pooled);
    }
    finalize(&pool, &slot).await;
}

/// What the members of a group the SQLite writer undid are told: run
/// again, each in a savepoint of its own ([`Store::retrying_grouped`]
/// runs them so).
const UNDONE: &str = "a write of its group failed after writing; the group is run again";

fn undone_error() -> Error {
    Error::StorageContention(UNDONE.into())
}

/// Whether `e` says the request's group was undone ([`undone_error`]).
pub(super) fn is_undone(e: &Error) -> bool {
    matches!(e, Error::StorageContention(m) if m == UNDONE)
}

tokio::task_local! {
    /// Set while a request whose group was undone is run again: it runs
    /// in a savepoint of its own.
    pub(super) static CAREFUL: bool;
}

/// Groups between the SQLite writer's own checkpoints.
const CHECKPOINT_EVERY: u32 = 4;

/// Statements the SQLite writer keeps prepared (the mutations' own, and
/// the savepoints').
const STATEMENTS_KEPT: usize = 64;

fn run_on_conn(conn: &rusqlite::Connection, sql: &str) -> Result<(), Error> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.execute([]))
        .map(|_| ())
        .map_err(|e| db_err(direct::to_db_err(e)))
}

fn run_on(slot: &Slot, sql: &str) -> Result<(), Error> {
    match lock(slot).as_ref() {
        Some(c) => run_on_conn(c, sql),
        None => Err(Error::Internal("the writer holds no connection".into())),
    }
}

/// Finalizes the SQLite writer's prepared statements, with the handle
/// locked out of sqlx's worker (never from two threads at once); if the
/// handle cannot be had, they are leaked rather than touched.
async fn finalize(pool: &sqlx::SqlitePool, slot: &Slot) {
    let Some(conn) = lock(slot).take() else {
        return;
    };
    match pool.acquire().await {
        Ok(mut pooled) => match pooled.lock_handle().await {
            Ok(locked) => {
                drop(conn);
                drop(locked);
            }
            Err(_) => std::mem::forget(conn),
        },
        Err(_) => std::mem::forget(conn),
    }
}

/// A rusqlite connection on the locked handle of sqlx's connection.
///
/// Sound (the package's other `unsafe` sets up SQLite's memory and its
/// connections' planning) because:
/// - it is used only while the handle is locked out of sqlx's worker
///   thread (inside a group of [`sqlite_lane`], or in [`finalize`]), so one
///   thread at a time uses the handle;
/// - it does not own the handle (rusqlite's `from_handle` never closes it);
///   between groups it only keeps statements prepared on it, reset (SQLite
///   allows any number per connection, and sqlx's own are beside them);
/// - the handle stays open while they exist: the lane holds a clone of the
///   pool, so its one connection is not dropped while the lane lives; the
///   lane finalizes them (handle locked) when it ends, when the store
///   closes ([`Lanes::quiesce`], before the pool closes) and before it
///   closes a connection it could not roll back; a handle that changed
///   anyway, or that cannot be locked when they are to be finalized, is
///   never touched through the old connection: they are leaked (sqlx then
///   fails to close that connection and panics in its worker thread, which
///   is logged and harms no memory);
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
/// can be written now. A flush met among them is handed back, for the
/// lane to do.
#[must_use]
fn fail_queued(first: Job, rx: &mut mpsc::UnboundedReceiver<Job>, e: &Error) -> Option<Job> {
    fail_all(std::collections::VecDeque::from([first]), rx, e)
}

/// Tells `jobs`, then what is queued, that their transaction could not
/// begin, up to a flush (returned, for the lane to stop at).
fn fail_all(
    jobs: std::collections::VecDeque<Job>,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    e: &Error,
) -> Option<Job> {
    let mut failed = Vec::new();
    let mut flush = None;
    let mut jobs = jobs.into_iter();
    while let Some(j) = jobs.next().or_else(|| rx.try_recv().ok()) {
        if j.flushes() {
            flush = Some(j);
            break;
        }
        failed.push(j);
    }
    tracing::warn!(error = %e, requests = failed.len(), "could not begin a write transaction");
    for j in failed {
        j.fail(e.clone());
    }
    flush
}
