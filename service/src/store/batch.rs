//! PostgreSQL: a lane's pushes on distinct devices decided together
//! ([ADR 0016](../../../docs/adr/0016-set-wise-push-groups.md)).
//!
//! A lane that finds pushes queued takes, from the front, those that are
//! the first of their device and of their request_id among the requests
//! it looks through, up to the first request that is not a push (at most
//! [`MOST`], [`gather`]); a push on a device or under a key met before is
//! passed over and runs after the batch, in its order. Pushes on distinct
//! devices under distinct keys cannot change each other's decisions:
//! holders, conflicts and strategies are per device and channel, a key is
//! per tenant and request_id, and a push locks and writes only rows of its
//! own. So a batch member decided before a push passed over that came
//! earlier decides as it would have after it, and the batch reads for all
//! of them at once, in one savepoint:
//!
//! 1. the keys (`FOR UPDATE`), each checked as alone;
//! 2. the devices (`FOR UPDATE`), each request prepared against its own;
//! 3. the channels' holders (`FOR UPDATE`), in a statement of their own
//!    after the devices' locks, each push decided against its own.
//!
//! Only a plain acceptance (booked, or moved by `QUEUE_AFTER`, cancelling
//! nothing) is written by the batch, with the statement a push alone
//! writes. Every other member (a replay, a key bound to another body or
//! in progress, a device not found, a refusal, a `CANCEL_AND_REPLACE` that
//! cancels) runs alone right after the batch, in its order, by the path it
//! would have taken anyway: a refusal must look at its key again
//! (`Store::once_in`). If any statement of the batch fails, or a key was
//! taken meanwhile by another replica, the batch is rolled back to its
//! savepoint and every member runs alone: correctness never rests on the
//! batch, and the exclusion constraint stays the backstop.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::future::BoxFuture;
use sea_orm::{
    ConnectionTrait as _, DatabaseTransaction, DbBackend, FromQueryResult as _, Statement,
};
use tokio::sync::mpsc;

use super::{
    IdemRequest, PushOutcome, Store, Written,
    actions::{Decided, decide_push},
    db_err,
    entity::{action, device, idem_key},
    group::{
        Answer, Fate, Job, Member, NEXT_MEMBER, OPEN_MEMBER, Ran, Request, UNDO_MEMBER, start,
        unstart,
    },
    idem::WriteOp,
    rows,
};
use crate::domain::{Device, DeviceId, Error, Strategy, TenantId, Ts, validate::ValidPush};

/// Most pushes a batch decides together: it runs under one member's
/// deadline.
pub(super) const MOST: usize = 64;

/// How a push is prepared against its device, at the write's `now`.
pub(super) type Prepare = Arc<dyn Fn(&Device, Ts) -> Result<ValidPush, Error> + Send + Sync>;

/// What a batch needs to know of a push.
pub(super) struct PushSpec {
    pub(super) store: Store,
    pub(super) tenant: TenantId,
    pub(super) device_id: DeviceId,
    pub(super) prepare: Prepare,
    pub(super) strategy: Strategy,
    /// Its request_id, if it has one.
    pub(super) request: Option<IdemRequest<PushOutcome>>,
}

/// A push as it runs alone: [`Store::once_in`] (or the bare write).
type AloneOp = Box<
    dyn for<'t> FnOnce(
            &'t DatabaseTransaction,
        ) -> BoxFuture<'t, Result<Written<PushOutcome>, Error>>
        + Send,
>;

/// A push queued to a PostgreSQL lane: run alone as any request, or with
/// others by a batch.
pub(super) struct PushJob {
    spec: Arc<PushSpec>,
    request: Request<Written<PushOutcome>, AloneOp>,
    /// Left by a batch to run alone: not batched again.
    alone: bool,
}

impl PushJob {
    /// The job of `request`, pushing `spec` (`op` as it runs alone).
    pub(super) fn new(
        spec: Arc<PushSpec>,
        op: WriteOp<PushOutcome>,
        request: Request<Written<PushOutcome>, ()>,
    ) -> Self {
        let alone_spec = spec.clone();
        let alone: AloneOp = Box::new(move |tx| {
            Box::pin(async move {
                let spec = &*alone_spec;
                match &spec.request {
                    Some(r) => spec.store.once_in(tx, &spec.tenant, r, &op).await,
                    None => op(tx, None).await.map(Written::Fresh),
                }
            })
        });
        Self {
            spec,
            request: request.with(alone),
            alone: false,
        }
    }

    /// Left by a batch (which wrote nothing of it) to run alone: its
    /// turn given back ([`unstart`]).
    fn left_alone(mut self) -> Job {
        unstart(&self.request.state);
        self.alone = true;
        Box::new(self)
    }
}

impl Member for PushJob {
    fn run<'t>(
        self: Box<Self>,
        tx: &'t DatabaseTransaction,
        open: &'t AtomicBool,
    ) -> BoxFuture<'t, Ran> {
        Box::new(self.request).run(tx, open)
    }

    fn fail(self: Box<Self>, e: Error) {
        let _ = self.request.reply.send(Err(e));
    }

    fn fate(&self) -> Option<Fate> {
        Some(self.request.fate.clone())
    }

    fn push(&self) -> Option<&PushSpec> {
        (!self.alone).then_some(&*self.spec)
    }

    fn into_push(self: Box<Self>) -> Result<Box<PushJob>, Job> {
        Ok(self)
    }
}

/// Most requests a batch looks through for its members (those it passes
/// over run after it).
const LOOK: usize = 4 * MOST;

/// From `first` on, through `pending` and then the queue, the pushes whose
/// (tenant, device) and (tenant, request_id) no request before them in
/// the look has: at most `room`. A push on a device or under a key met
/// before is passed over (it runs after the batch, in its order, as does
/// every later push on that device or under that key); a request that is
/// not a push ends the look. Left in `pending`, in order: the pushes
/// passed over, the request that ended the look, then what was there.
pub(super) fn gather(
    first: PushJob,
    pending: &mut VecDeque<Job>,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    room: usize,
) -> Vec<PushJob> {
    let mut devices = HashSet::new();
    let mut keys = HashSet::new();
    // Whether `p` is the first of its device and of its key in the look.
    let mut first_of = |p: &PushSpec| {
        let tenant = p.tenant.as_str();
        let device = (tenant.to_owned(), p.device_id.as_str().to_owned());
        let key = p
            .request
            .as_ref()
            .map(|r| (tenant.to_owned(), r.request_id.clone()));
        let new_key = key.is_none_or(|k| keys.insert(k));
        devices.insert(device) && new_key
    };
    first_of(&first.spec);
    let mut members = vec![first];
    let mut passed = Vec::new();
    let mut ended = None;
    let mut looked = 1;
    while members.len() < room && looked < LOOK {
        let Some(next) = pending.pop_front().or_else(|| rx.try_recv().ok()) else {
            break;
        };
        looked += 1;
        let Some(spec) = next.push() else {
            ended = Some(next);
            break;
        };
        let joins = first_of(spec);
        match next.into_push() {
            Ok(p) if joins => members.push(*p),
            Ok(p) => passed.push(p as Job),
            Err(other) => {
                ended = Some(other);
                break;
            }
        }
    }
    for j in ended.into_iter().chain(passed.into_iter().rev()) {
        pending.push_front(j);
    }
    members
}

/// What a batch came to: the answers of the pushes it wrote, or of all
/// its members when the database failed it (sent with the group's fate),
/// the members left to run alone (in order), whether the group must close
/// after it, and whether the group's transaction can still be trusted.
#[derive(Default)]
pub(super) struct BatchRan {
    pub(super) answers: Vec<Answer>,
    pub(super) alone: Vec<Job>,
    pub(super) ends_group: bool,
    pub(super) in_doubt: bool,
    /// Pushes written by the batch.
    pub(super) written: u64,
}

/// Runs `members` as a batch in the group's transaction `tx` (`open`: as
/// for a member, whether the savepoint before is open).
pub(super) async fn run(
    tx: &DatabaseTransaction,
    open: &AtomicBool,
    members: Vec<PushJob>,
) -> BatchRan {
    // Each member's turn is taken before the first read: one whose caller
    // went away, or gave up waiting, is not run.
    let members: Vec<PushJob> = members
        .into_iter()
        .filter(|m| start(&m.request.state, m.request.reply.is_closed()))
        .collect();
    let mut out = BatchRan::default();
    if members.len() < 2 {
        out.alone = members.into_iter().map(PushJob::left_alone).collect();
        return out;
    }
    let begin = if open.swap(true, Ordering::Relaxed) {
        NEXT_MEMBER
    } else {
        OPEN_MEMBER
    };
    if let Err(e) = tx.execute_unprepared(begin).await {
        out.in_doubt = true;
        let e = db_err(e);
        out.answers = members
            .into_iter()
            .map(|m| told(m, Err(e.clone())))
            .collect();
        return out;
    }
    let now = members[0].spec.store.clock.now();
    let specs: Vec<&PushSpec> = members.iter().map(|m| &*m.spec).collect();
    match decide_and_write(tx, &specs, now).await {
        Ok(booked) => {
            for (m, b) in members.into_iter().zip(booked) {
                match b {
                    Some(outcome) => {
                        out.written += 1;
                        out.answers.push(told(m, Ok(Written::Fresh(outcome))));
                    }
                    None => out.alone.push(m.left_alone()),
                }
            }
        }
        Err(failed) => {
            if let Err(r) = tx.execute_unprepared(UNDO_MEMBER).await {
                out.in_doubt = true;
                let r = db_err(r);
                out.answers = members
                    .into_iter()
                    .map(|m| told(m, Err(r.clone())))
                    .collect();
                return out;
            }
            match failed {
                // A race lost to another replica, or a decision the
                // constraints refused: each runs alone, as it would have.
                Failed::Alone(why) => {
                    tracing::debug!(why, members = members.len(), "a batch of pushes runs alone");
                    out.alone = members.into_iter().map(PushJob::left_alone).collect();
                }
                // The database's failure (a deadlock, a timeout, a lost
                // connection): as for a member alone, each is told so (and
                // retried by its caller where a retry may cure it), and
                // no more members join the group, which keeps its locks.
                Failed::Database(e) => {
                    out.ends_group = true;
                    out.answers = members
                        .into_iter()
                        .map(|m| told(m, Err(e.clone())))
                        .collect();
                }
            }
        }
    }
    out
}

/// Why a batch was rolled back to its savepoint.
enum Failed {
    /// Its members are to run alone.
    Alone(&'static str),
    /// The database failed it.
    Database(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed::Database(e)
    }
}

/// `m`'s answer, sent once its group's fate is known.
fn told(m: PushJob, result: Result<Written<PushOutcome>, Error>) -> Answer {
    let reply = m.request.reply;
    Box::new(move |committed: Result<(), Error>| {
        let _ = reply.send(committed.and(result));
    })
}

/// Reads for every member, decides each as if alone, and writes those it
/// books cancelling nothing: for each member its outcome, or `None` if it
/// must run alone. An error: the batch must be rolled back.
async fn decide_and_write(
    tx: &DatabaseTransaction,
    specs: &[&PushSpec],
    now: Ts,
) -> Result<Vec<Option<PushOutcome>>, Failed> {
    let n = specs.len();
    // Who is still in the running.
    let mut running = vec![true; n];

    // 1. The keys, locked; each checked as `idem_check_in` checks it.
    let keyed: Vec<serde_json::Value> = specs
        .iter()
        .filter_map(|s| {
            s.request
                .as_ref()
                .map(|r| serde_json::json!({"t": s.tenant.as_str(), "r": r.request_id.as_str()}))
        })
        .collect();
    if !keyed.is_empty() {
        let rows = query(
            tx,
            "SELECT k.* FROM idempotency_keys k \
             JOIN json_to_recordset($1::json) AS m(t text, r text) \
               ON k.tenant_id = m.t AND k.request_id = m.r \
             ORDER BY k.tenant_id, k.request_id FOR UPDATE OF k",
            &keyed,
        )
        .await?;
        let mut found: HashMap<(String, String), idem_key::Model> = HashMap::new();
        for row in rows {
            let k = idem_key::Model::from_query_result(&row, "").map_err(db_err)?;
            found.insert((k.tenant_id.clone(), k.request_id.clone()), k);
        }
        for (i, s) in specs.iter().enumerate() {
            if let Some(r) = &s.request {
                let row = found.remove(&(s.tenant.as_str().to_owned(), r.request_id.clone()));
                let free = Store::idem_found(row, &r.request_id, r.method, &r.body, now);
                // Answered before, bound to another body, or in progress:
                // alone (it replays or is refused there).
                running[i] = matches!(free, Ok(None));
            }
        }
    }

    // 2. The devices, locked in one order; each request prepared.
    let wanted: Vec<serde_json::Value> = specs
        .iter()
        .zip(&running)
        .filter(|(_, r)| **r)
        .map(|(s, _)| serde_json::json!({"t": s.tenant.as_str(), "d": s.device_id.as_str()}))
        .collect();
    let mut devices: HashMap<(String, String), Device> = HashMap::new();
    if !wanted.is_empty() {
        let rows = query(
            tx,
            "SELECT d.* FROM devices d \
             JOIN json_to_recordset($1::json) AS m(t text, d text) \
               ON d.tenant_id = m.t AND d.device_id = m.d \
             ORDER BY d.tenant_id, d.device_id FOR UPDATE OF d",
            &wanted,
        )
        .await?;
        for row in rows {
            let m = device::Model::from_query_result(&row, "").map_err(db_err)?;
            let key = (m.tenant_id.clone(), m.device_id.clone());
            devices.insert(key, rows::device_from_model(m)?);
        }
    }
    let mut pushes: Vec<Option<ValidPush>> = Vec::with_capacity(n);
    for (i, s) in specs.iter().enumerate() {
        let key = (
            s.tenant.as_str().to_owned(),
            s.device_id.as_str().to_owned(),
        );
        // A request its device refuses (or that panics there) runs alone.
        let prepared = running[i]
            .then(|| devices.get(&key))
            .flatten()
            .and_then(|d| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (s.prepare)(d, now)))
                    .ok()?
                    .ok()
            });
        running[i] = prepared.is_some();
        pushes.push(prepared);
    }

    // 3. The holders of each push's channel from its start on, locked,
    // read after the devices' locks (a snapshot of its own).
    let asked: Vec<serde_json::Value> = specs
        .iter()
        .zip(&pushes)
        .enumerate()
        .filter_map(|(i, (s, p))| {
            p.as_ref().map(|p| {
                serde_json::json!({
                    "i": i,
                    "t": s.tenant.as_str(),
                    "d": s.device_id.as_str(),
                    "c": p.channel,
                    "s": p.start.0,
                })
            })
        })
        .collect();
    let mut holding: Vec<Vec<crate::domain::Action>> = vec![Vec::new(); n];
    if !asked.is_empty() {
        for row in query(tx, holders_sql(), &asked).await? {
            let i: i32 = row.try_get("", "i").map_err(db_err)?;
            let a = action::Model::from_query_result(&row, "").map_err(db_err)?;
            let slot = usize::try_from(i)
                .ok()
                .and_then(|i| holding.get_mut(i))
                .ok_or_else(|| Error::Internal(format!("a batch's holder of member {i}")))?;
            slot.push(rows::action_from_model(&a)?);
        }
    }

    // 4. Each decided as alone; plain acceptances written, in order.
    let mut booked: Vec<Option<PushOutcome>> = Vec::with_capacity(n);
    for ((s, push), holding) in specs.iter().zip(pushes).zip(&holding) {
        let decided: Option<Decided> = push
            .and_then(|p| decide_push(&s.device_id, p, holding, s.strategy, now).ok())
            .filter(|d| d.replaced.is_empty());
        let Some(Decided { outcome, .. }) = decided else {
            booked.push(None);
            continue;
        };
        let commit = s.request.as_ref().map(|r| r.commit(now));
        match Store::write_born(tx, &s.tenant, &outcome, s.strategy, commit.as_ref(), now).await {
            Ok(Some(0)) => return Err(Failed::Alone("a key was taken meanwhile")),
            Ok(_) => booked.push(Some(outcome)),
            // exclusion_violation, unique_violation: a booking or a key
            // the batch did not see (another replica's, committed since
            // its reads); alone, each is decided again.
            Err(e) if matches!(sqlstate(&e).as_deref(), Some("23P01" | "23505")) => {
                return Err(Failed::Alone("a write was refused by a constraint"));
            }
            Err(e) => return Err(Failed::Database(db_err(e))),
        }
    }
    Ok(booked)
}

/// The SQLSTATE of a database error, if it has one.
fn sqlstate(e: &sea_orm::DbErr) -> Option<String> {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Exec(RuntimeErr::SqlxError(s)) | DbErr::Query(RuntimeErr::SqlxError(s)) => {
            match &**s {
                sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Runs `sql` with the JSON array of `rows` as its one parameter.
async fn query(
    tx: &DatabaseTransaction,
    sql: &str,
    rows: &[serde_json::Value],
) -> Result<Vec<sea_orm::QueryResult>, Error> {
    let json = serde_json::Value::Array(rows.to_vec()).to_string();
    tx.query_all_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [json.into()],
    ))
    .await
    .map_err(db_err)
}

/// The holders' read of a batch: `rows::holding_select` for each member
/// (`i`: its place) under a `LATERAL` join, locked.
fn holders_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let holding = rows::holding_sql();
        format!(
            "SELECT m.i, h.* FROM json_to_recordset($1::json) \
               AS m(i int4, t text, d text, c text, s int8) \
             CROSS JOIN LATERAL ( \
               SELECT a.* FROM actions a \
               WHERE a.tenant_id = m.t AND a.device_id = m.d AND {holding} \
                 AND a.channel = m.c AND (a.end_ns IS NULL OR a.end_ns > m.s) \
                 AND a.start_ns >= COALESCE(( \
                   SELECT MAX(f.start_ns) FROM actions f \
                   WHERE f.tenant_id = m.t AND f.device_id = m.d AND f.channel = m.c \
                     AND {holding} AND f.start_ns <= m.s), '-9223372036854775808'::int8) \
               ORDER BY a.start_ns, a.action_id FOR UPDATE) h \
             ORDER BY m.i, h.start_ns, h.action_id"
        )
    });
    SQL.as_str()
}
