//! The dispatcher's side of the store: claiming due work and recording what
//! the driver answered, each in one transaction with its audit entry.
//!
//! Invariants:
//! - Work is claimed with a lease; a claim that outlives its lease (a
//!   crashed dispatcher) is claimed again, so every APPLY and REVERT is
//!   eventually attempted, and a revert survives any restart.
//! - Results are recorded against the row as it is at that moment: an
//!   ACTIVE action cancelled while its end-of-window revert ran stays
//!   CANCELLED.
//! - A result is recorded only under the claim it was taken with: a
//!   dispatcher that stalled past its lease, while another claimed the
//!   work again, records nothing (the new claim's outcome stands).

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
    sea_query::{Alias, Expr, ExprTrait, Func, IntoIden, LockBehavior, LockType, Query},
};

use super::{
    Store, db_err,
    entity::{action, audit, device},
    rows,
};
use crate::domain::{
    Action, ActionId, ActionState, Command, Device, DeviceId, Error, Observed, Params, TenantId,
    Ts, Work, lifecycle,
};

pub use crate::domain::lifecycle::Finish;

/// Actions that owe work, as a literal condition: the partial index
/// `actions_owed` (migration 3) is chosen only when the query states its
/// predicate, which a bound parameter would hide from the planner.
fn owed() -> Expr {
    Expr::cust(rows::OWED_SQL)
}

/// `dispatch_leases` (migration 21): one lease per claim, renewed by the
/// claim's heartbeat ([`Store::renew`]) instead of the lease of every row
/// it holds.
fn leases() -> Alias {
    Alias::new("dispatch_leases")
}

fn lease_col(c: &str) -> Expr {
    Expr::col((leases(), Alias::new(c)))
}

/// Whether the claim named by the row's `lease_owner` (of table `t`) has
/// a lease in `dispatch_leases` still running at `now`.
fn claim_live<T: IntoIden + Clone>(t: T, now: Ts) -> Expr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(leases())
            .and_where(lease_col("owner").equals((t, action::Column::LeaseOwner)))
            .and_where(lease_col("until_ns").gt(now.0))
            .to_owned(),
    )
}

/// Whether the row of table `t` is held by its claim at `now`: its own
/// lease (written with the claim) or its claim's (renewed since) runs on.
/// A claim's lease is never shorter than its rows', so a row whose claim
/// lease has run out is free.
fn held<T: IntoIden + Clone>(t: T, now: Ts) -> Expr {
    Expr::col((t.clone(), action::Column::LeaseUntilNs))
        .gt(now.0)
        .or(claim_live(t, now))
}

/// Whether a row may be claimed at `now`: never claimed, let go, or held
/// by neither its own lease nor its claim's.
fn claimable(now: Ts) -> Expr {
    let lease = || Expr::col((action::Entity, action::Column::LeaseUntilNs));
    lease().is_null().or(lease()
        .lte(now.0)
        .and(claim_live(action::Entity, now).not()))
}

/// Work a dispatcher has claimed.
#[derive(Clone, Debug)]
pub struct Job {
    /// The action's tenant.
    pub tenant: TenantId,
    /// What the job holds of its action: what the driver is asked to do.
    pub action: Planned,
    /// What is owed.
    pub work: Work,
    /// Failed tries so far.
    pub attempts: i64,
    /// Pushed with CANCEL_AND_REPLACE.
    pub clear_native: bool,
    /// The claim this job was taken under: its outcome is recorded only
    /// while the row still carries it. Shared by the claim's jobs.
    pub claim: std::sync::Arc<str>,
    /// The claim's fencing token: larger than every earlier claim's of the
    /// action, handed to the driver ([`switchyard_drivers::ApplyRequest::fence`]).
    pub fence: u64,
    /// When the work falls due.
    pub due: Ts,
}

/// What a claimed job holds of its action: what its driver is asked to
/// put in force, and when. The rest of the action (its state, its trail,
/// its errors) is on record and read by whatever needs it: a burst holds
/// 100,000 claimed jobs at once, and the whole action has a dozen more
/// fields, some with strings of their own.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The action's id.
    pub id: ActionId,
    /// Its device.
    pub device_id: DeviceId,
    /// What to put in force.
    pub command: Command,
    /// With what.
    pub params: Params,
    /// From when.
    pub start: Ts,
    /// Until when; `None` = open-ended.
    pub end: Option<Ts>,
}

impl From<&Action> for Planned {
    fn from(a: &Action) -> Self {
        Self {
            id: a.id,
            device_id: a.device_id.clone(),
            command: a.command,
            params: a.params,
            start: a.start,
            end: a.end,
        }
    }
}

/// Work claimed by [`Store::claim_ahead`].
#[derive(Debug)]
pub struct Claim {
    /// The claim's owner token (every job's [`Job::claim`]).
    pub owner: String,
    /// The claimed work, earliest due first.
    pub jobs: Vec<Job>,
    /// The devices it runs on, by (tenant, device id), as they were when
    /// claimed.
    pub devices: HashMap<(String, String), Device>,
}

impl Claim {
    /// Everything the claim holds, to start as it falls due
    /// ([`Store::start_due`] starts only what is due by then).
    pub fn due(&self) -> Due {
        Due {
            claim: self.owner.clone(),
            action_ids: self.jobs.iter().map(|j| j.action.id.to_string()).collect(),
        }
    }
}

/// Work of one claim to start ([`Store::start_due`]): the claim, and the
/// actions it holds that fall due. A start names its rows by id, not by
/// claim: `lease_owner` is not indexed (migration 26), so that a claim
/// (every row of a burst, ahead of its time) writes no index entry on
/// PostgreSQL (a heap-only update, as the start itself).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Due {
    /// The claim's owner token ([`Claim::owner`]).
    pub claim: String,
    /// Actions the claim holds, to start if due (those not due at the
    /// start, not held under the claim any more, or owing nothing are
    /// left as they are).
    pub action_ids: Vec<String>,
}

/// Most action ids named by one statement: a start of the dispatcher's
/// usual batch (3 claims of 2,048) in one, well within the bound
/// parameters either backend takes (SQLite 32,766; PostgreSQL 65,535).
pub(super) const IDS_PER_STATEMENT: usize = 8192;

/// The rows of table `t` that `due` names under their claims, as
/// conditions of at most `most` ids each (one statement each; the
/// store's `ids_per_statement`, [`IDS_PER_STATEMENT`] but in tests).
/// Claims naming nothing add nothing.
fn held_by<T: IntoIden + Clone>(t: T, due: &[Due], most: usize) -> Vec<sea_orm::Condition> {
    let most = most.max(1);
    let mut parts = Vec::new();
    let mut part = sea_orm::Condition::any();
    let mut named = 0;
    for d in due {
        for ids in d.action_ids.chunks(most) {
            if named > 0 && named + ids.len() > most {
                parts.push(std::mem::replace(&mut part, sea_orm::Condition::any()));
                named = 0;
            }
            part = part.add(
                sea_orm::Condition::all()
                    .add(Expr::col((t.clone(), action::Column::LeaseOwner)).eq(d.claim.as_str()))
                    .add(
                        Expr::col((t.clone(), action::Column::ActionId))
                            .is_in(ids.iter().map(String::as_str)),
                    ),
            );
            named += ids.len();
        }
    }
    if named > 0 {
        parts.push(part);
    }
    parts
}

/// What [`Store::start_due`] found ready.
#[derive(Debug, Default)]
pub struct Started {
    /// The actions that may run now, each with the claim it may run
    /// under.
    pub ready: HashMap<String, String>,
    /// The drivers' memos on record for their devices, by (tenant, device
    /// id), oldest first (as [`Store::memos`]).
    pub memos: HashMap<(String, String), Vec<switchyard_drivers::Applied>>,
}

/// What recording a job's outcome needs of the job: the row it settles
/// is read afresh, so the action as claimed is not kept. A storm's
/// outcomes wait to be recorded by the tens of thousands; each lets go
/// of its job (its planned action) once the driver has answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The action's tenant.
    pub tenant: TenantId,
    /// The action's id.
    pub action_id: ActionId,
    /// Its device's id.
    pub device_id: DeviceId,
    /// The claim the job was taken under ([`Job::claim`]).
    pub claim: std::sync::Arc<str>,
    /// What was owed.
    pub work: Work,
    /// Failed tries before this one.
    pub attempts: i64,
}

impl From<&Job> for Recorded {
    fn from(job: &Job) -> Self {
        Self {
            tenant: job.tenant.clone(),
            action_id: job.action.id,
            device_id: job.action.device_id.clone(),
            claim: job.claim.clone(),
            work: job.work,
            attempts: job.attempts,
        }
    }
}

impl From<Job> for Recorded {
    /// Moves what is kept out of the job; the rest is freed.
    fn from(job: Job) -> Self {
        let Job {
            tenant,
            action,
            work,
            attempts,
            claim,
            ..
        } = job;
        Self {
            tenant,
            action_id: action.id,
            device_id: action.device_id,
            claim,
            work,
            attempts,
        }
    }
}

/// What came of one job, to record.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The job, as recording needs it.
    pub job: Recorded,
    /// Its result.
    pub finish: Finish,
    /// When the driver answered: the time of the transition.
    pub at: Ts,
    /// The device's state seen with it, and the configuration it was
    /// seen under (the device as claimed), recorded in the same
    /// transaction.
    pub observed: Option<(Configured, Observed)>,
}

/// What recording an observation checks of the device it was made on:
/// that it is still configured as it was then (its revision and
/// incarnation, see [`Store::observe`]). An outcome waiting to be
/// recorded keeps this, not the whole device: a burst's outcomes wait by
/// the thousand, and their devices are let go as their jobs end.
#[derive(Clone, Debug, PartialEq)]
pub struct Configured {
    /// The device's id.
    pub id: DeviceId,
    /// Its revision when observed.
    pub revision: i64,
    /// Its incarnation when observed.
    pub incarnation: String,
}

impl From<&Device> for Configured {
    fn from(d: &Device) -> Self {
        Self {
            id: d.id.clone(),
            revision: d.revision,
            incarnation: d.incarnation.clone(),
        }
    }
}

/// Most outcomes recorded in one transaction.
const RECORD_TX: usize = 1024;

/// Most rows written by one statement (parameters: 15 per row).
const RECORD_CHUNK: usize = 256;

fn work_of(s: &str) -> Option<Work> {
    match s {
        "APPLY" => Some(Work::Apply),
        "REVERT" => Some(Work::Revert),
        _ => None,
    }
}

impl Store {
    /// Claims up to `limit` actions whose work is due at `now`, for
    /// `lease_nanos`, in one transaction; SCHEDULED actions due to be
    /// applied become ACKNOWLEDGED (in flight, no longer cancellable) in the
    /// same transaction.
    pub async fn claim_due(
        &self,
        now: Ts,
        limit: u32,
        lease_nanos: i64,
    ) -> Result<Vec<Job>, Error> {
        Ok(self.claim_ahead(now, now, limit, lease_nanos).await?.jobs)
    }

    /// Claims up to `limit` actions whose work is due by `until` (`now`
    /// or later: work prefetched before it is due), earliest first, for
    /// `lease_nanos` from `now`, with the devices they run on. What is
    /// due at `now` is sent on its way as by [`Store::claim_due`]; what
    /// falls due later stays SCHEDULED (cancellable) until
    /// [`Store::start_due`] starts it.
    pub async fn claim_ahead(
        &self,
        now: Ts,
        until: Ts,
        limit: u32,
        lease_nanos: i64,
    ) -> Result<Claim, Error> {
        let owner = uuid::Uuid::now_v7().to_string();
        let shared_owner: std::sync::Arc<str> = owner.as_str().into();
        let until = Ts(Ord::max(until.0, now.0));
        let (rows, devices) = self
            .retrying(|| async {
                let tx = self.begin().await?;
                let (rows, devices) = claim_in(
                    &tx,
                    now,
                    until,
                    limit,
                    lease_nanos,
                    &owner,
                    self.ids_per_statement,
                )
                .await?;
                tx.commit().await.map_err(db_err)?;
                Ok((rows, devices))
            })
            .await?;
        // At most once a lease, beside the claim (not in its way).
        let last = &self.recording.counts.leases_forgotten_ns;
        let before = last.load(Ordering::Acquire);
        if !rows.is_empty()
            && now.0.saturating_sub(before) >= lease_nanos
            && last
                .compare_exchange(before, now.0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let store = self.clone();
            tokio::spawn(async move { store.forget_leases(now, lease_nanos).await });
        }
        let job = |m: action::Model| -> Result<Job, Error> {
            Ok(Job {
                tenant: TenantId::from_stored(m.tenant_id.clone()),
                action: rows::planned_from_model(&m)?,
                work: work_of(&m.work).ok_or_else(|| Error::Internal("claimed no work".into()))?,
                attempts: m.attempts,
                clear_native: m.clear_native,
                claim: shared_owner.clone(),
                fence: u64::try_from(m.fence)
                    .map_err(|_| Error::Internal("a negative fencing token is stored".into()))?,
                due: Ts(m.due_ns.unwrap_or(now.0)),
            })
        };
        // A row that does not decode is reported and left to its lease; it
        // must not stop the others.
        let jobs = rows
            .into_iter()
            .filter_map(|r| {
                r.and_then(job)
                    .map_err(|e| tracing::error!(error = %e, "a claimed action cannot be read"))
                    .ok()
            })
            .collect();
        // A fleet's devices are mostly configured alike: their settings
        // are held once for the claim, not once per device.
        let mut settings = rows::Settings::default();
        let devices = devices
            .into_iter()
            .filter_map(|r| {
                r.and_then(|m| {
                    let key = (m.tenant_id.clone(), m.device_id.clone());
                    Ok((key, rows::device_sharing_settings(m, &mut settings)?))
                })
                .map_err(
                    |e| tracing::error!(error = %e, "a claimed action's device cannot be read"),
                )
                .ok()
            })
            .collect();
        Ok(Claim {
            owner,
            jobs,
            devices,
        })
    }

    /// Starts what `due` names (each under its claim) that is due at `now`: their SCHEDULED
    /// applies become ACKNOWLEDGED (no longer cancellable), in bulk; rows
    /// they hold that owe nothing any more (cancelled or replaced before
    /// they started) are let go. One write transaction for every claim of
    /// a dispatcher whose work falls due together, since a transaction's
    /// cost is mostly in the pages it writes, and rows claimed apart share
    /// pages.
    ///
    /// Then, read once the start is committed (on a reader: the writer
    /// goes on to the next start meanwhile), the ids of the actions the
    /// claims may run now, and the memos on record for their devices. A
    /// read after the commit sees the start and whatever was committed
    /// since: work started stays ready (an ACKNOWLEDGED action cannot be
    /// cancelled, nor its device changed), and work let go meanwhile (a
    /// cancel, a device change) is not ready, as if the start had come
    /// after it.
    pub async fn start_due(&self, due: &[Due], now: Ts) -> Result<Started, Error> {
        self.start_claims(due, now).await?;
        for part in held_by(action::Entity, due, self.ids_per_statement) {
            self.retrying(|| async {
                rows::release_claims()
                    .filter(part.clone())
                    .filter(Expr::cust("work = 'NONE'"))
                    .exec(&self.write)
                    .await
                    .map_err(db_err)?;
                Ok(())
            })
            .await?;
        }
        self.started(due, now).await
    }

    /// The write of [`Store::start_due`], alone: the SCHEDULED applies
    /// `due` names (under their claims) that are due at `now` become ACKNOWLEDGED. What they
    /// hold that owes nothing any more stays held: the dispatcher lets go
    /// of it with [`Store::release`] once it sees it is not ready, so the
    /// start (at the due time, every row of a burst) writes nothing else.
    pub async fn start_claims(&self, due: &[Due], now: Ts) -> Result<(), Error> {
        let parts = held_by(action::Entity, due, self.ids_per_statement);
        if parts.is_empty() {
            return Ok(());
        }
        let took = std::time::Instant::now();
        self.retrying(|| async {
            let tx = self.begin().await?;
            for part in &parts {
                dispatched(&tx, part.clone(), now).await?;
            }
            tx.commit().await.map_err(db_err)?;
            self.wrote_events();
            Ok(())
        })
        .await?;
        tracing::debug!(
            claims = due.len(),
            took_ms = took.elapsed().as_millis() as u64,
            "started claims"
        );
        Ok(())
    }

    /// The read of [`Store::start_due`], once its write is committed.
    pub async fn started(&self, due: &[Due], now: Ts) -> Result<Started, Error> {
        use sea_orm::sea_query::JoinType;
        let took = std::time::Instant::now();
        let (r, m) = (Alias::new("r"), Alias::new("m"));
        let col = |t: &Alias, c: action::Column| Expr::col((t.clone(), c));
        // Held, owed, due, and under a claim still live (one that lapsed
        // may be another dispatcher's by now); with each, the memos of its
        // device's actions in force (the partial index `actions_in_force`
        // answers for a device that has none without reading a row).
        let q = |part: sea_orm::Condition| {
            Query::select()
                .expr_as(col(&r, action::Column::ActionId), Alias::new("action_id"))
                .expr_as(
                    col(&r, action::Column::LeaseOwner),
                    Alias::new("lease_owner"),
                )
                .expr_as(col(&r, action::Column::TenantId), Alias::new("tenant_id"))
                .expr_as(col(&r, action::Column::DeviceId), Alias::new("device_id"))
                .expr_as(col(&m, action::Column::ActionId), Alias::new("memo_of"))
                .expr_as(col(&m, action::Column::DriverMemo), Alias::new("memo"))
                .expr_as(
                    col(&m, action::Column::StartNs),
                    Alias::new("memo_start_ns"),
                )
                .from_as(action::Entity, r.clone())
                .join_as(
                    JoinType::LeftJoin,
                    action::Entity,
                    m.clone(),
                    sea_orm::Condition::all()
                        .add(
                            col(&m, action::Column::TenantId)
                                .equals((r.clone(), action::Column::TenantId)),
                        )
                        .add(
                            col(&m, action::Column::DeviceId)
                                .equals((r.clone(), action::Column::DeviceId)),
                        )
                        .add(col(&m, action::Column::DriverMemo).is_not_null()),
                )
                .cond_where(part)
                .and_where(col(&r, action::Column::Work).ne("NONE"))
                // An apply still SCHEDULED was not started (its lease had
                // lapsed at the start: it may be renewed since), and is
                // cancellable: it must not run.
                .and_where(col(&r, action::Column::State).ne(ActionState::Scheduled.as_str()))
                .and_where(col(&r, action::Column::DueNs).lte(now.0))
                .and_where(held(r.clone(), now))
                .to_owned()
        };
        let parts = held_by(r.clone(), due, self.ids_per_statement);
        self.bounded(async {
            let mut rows = Vec::new();
            for part in parts {
                rows.extend(self.read.query_all(&q(part)).await.map_err(db_err)?);
            }
            let mut started = Started::default();
            // By device: (start, action id, memo) of its actions in force.
            type InForce = Vec<(i64, String, String)>;
            let mut memos: HashMap<(String, String), InForce> = HashMap::new();
            for row in rows {
                let get = |c: &str| row.try_get::<String>("", c).map_err(db_err);
                let key = (get("tenant_id")?, get("device_id")?);
                started.ready.insert(get("action_id")?, get("lease_owner")?);
                let memo: Option<String> = row.try_get("", "memo").map_err(db_err)?;
                if let Some(memo) = memo {
                    let start: i64 = row.try_get("", "memo_start_ns").map_err(db_err)?;
                    let of = get("memo_of")?;
                    let known = memos.entry(key).or_default();
                    // A device with several ready rows has its memos once
                    // per row.
                    if !known.iter().any(|(_, id, _)| *id == of) {
                        known.push((start, of, memo));
                    }
                }
            }
            for (key, mut known) in memos {
                known.sort();
                started.memos.insert(
                    key,
                    known
                        .into_iter()
                        .map(|(_, action_id, memo)| switchyard_drivers::Applied { action_id, memo })
                        .collect(),
                );
            }
            tracing::debug!(
                claims = due.len(),
                ready = started.ready.len(),
                took_ms = took.elapsed().as_millis() as u64,
                "read started claims back"
            );
            Ok(started)
        })
        .await
    }

    /// Lets go of work `claim` holds and did not start (it was not ready
    /// when its start was read back, or the dispatcher is stopping): it
    /// can be claimed again at once, instead of when the lease runs out.
    pub async fn release(&self, claim: &str, action_ids: &[String]) -> Result<(), Error> {
        for ids in action_ids.chunks(512) {
            self.retrying(|| async {
                rows::release_claims()
                    .filter(action::Column::LeaseOwner.eq(claim))
                    .filter(action::Column::ActionId.is_in(ids.iter().map(String::as_str)))
                    .exec(&self.write)
                    .await
                    .map_err(db_err)?;
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Extends the lease of `claim` to `until` (the dispatcher's
    /// heartbeat while a round runs), for every job still held under it;
    /// returns whether any is (its rows named by id, as the claim's
    /// `Due`). Jobs already recorded hold no claim; a claim whose lease
    /// ran out is not renewed (false: it holds nothing any more, whether
    /// or not its work was claimed again), nor is one whose rows were all
    /// taken by another claim meanwhile (a renewal whose clock lags the
    /// claim's, or that waited for it).
    ///
    /// One row is written, the claim's in `dispatch_leases`: the rows the
    /// claim holds keep the lease they were claimed with, and are held
    /// while either runs ([`held`]). A storm's claims hold 100,000 rows
    /// until their outcomes are recorded; renewing each of them every
    /// third of a lease wrote them several times over on a database that
    /// could not keep up.
    pub async fn renew(&self, due: &Due, until: Ts) -> Result<bool, Error> {
        let claim = due.claim.as_str();
        self.bounded(async {
            // Written with the claim. A lease that ran out is not renewed:
            // another claim may have taken some of its rows since, and
            // the rest would be held again beside them.
            let renew = Query::update()
                .table(leases())
                .value(Alias::new("until_ns"), until.0)
                .and_where(lease_col("owner").eq(claim))
                .and_where(lease_col("until_ns").gt(self.clock.now().0))
                .to_owned();
            let renewed = self.write.execute(&renew).await.map_err(db_err)?;
            if renewed.rows_affected() == 0 {
                return Ok(false);
            }
            // After the renewal: a claim that took rows of this one while
            // it renewed had their lease row locked (`live_claims`), so
            // its commit came first and is seen here.
            for part in held_by(
                action::Entity,
                std::slice::from_ref(due),
                self.ids_per_statement,
            ) {
                let one: Option<String> = action::Entity::find()
                    .select_only()
                    .column(action::Column::ActionId)
                    .filter(part)
                    .into_tuple()
                    .one(&self.read)
                    .await
                    .map_err(db_err)?;
                if one.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await
    }

    /// Deletes the leases of claims that ran out more than a lease (at
    /// least the clocks' allowed skew) before `now`: whatever they held
    /// is free either way, and a heartbeat that late finds its claim gone
    /// ([`Store::renew`] answers false). Best effort, outside any claim's
    /// transaction.
    pub(super) async fn forget_leases(&self, now: Ts, lease_nanos: i64) {
        let margin = Ord::max(lease_nanos, super::CLOCK_SKEW_NANOS);
        // The rows a claim is reading under a lock (`live_claims`) are
        // passed by, not waited for: locking them in another order
        // could deadlock with it.
        let old = Query::select()
            .expr(lease_col("owner"))
            .from(leases())
            .and_where(lease_col("until_ns").lt(now.0.saturating_sub(margin)))
            .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
            .to_owned();
        let q = Query::delete()
            .from_table(leases())
            .and_where(lease_col("owner").in_subquery(old))
            .to_owned();
        if let Err(e) = self
            .bounded(async { self.write.execute(&q).await.map_err(db_err) })
            .await
        {
            tracing::debug!(error = %e, "could not delete old dispatch leases");
        }
    }

    /// When the next work can be claimed, if any (for the dispatcher's
    /// sleep): claimed work counts from when its lease runs out, so a
    /// dispatcher never spins on work another one holds.
    pub async fn next_due(&self) -> Result<Option<Ts>, Error> {
        self.bounded(async {
            use sea_orm::sea_query::JoinType;
            // The later of the row's lease and its claim's.
            let row_lease = || Expr::col((action::Entity, action::Column::LeaseUntilNs));
            let lease = || {
                Expr::case(lease_col("until_ns").gt(row_lease()), lease_col("until_ns"))
                    .finally(row_lease())
            };
            let due = || Expr::col((action::Entity, action::Column::DueNs));
            let free_at = Expr::case(lease().gt(due()), lease()).finally(due());
            let q = Query::select()
                .expr_as(Func::min(free_at), "next_ns")
                .from(action::Entity)
                .join(
                    JoinType::LeftJoin,
                    leases(),
                    lease_col("owner").equals((action::Entity, action::Column::LeaseOwner)),
                )
                .and_where(owed())
                .to_owned();
            let row = self.read.query_one(&q).await.map_err(db_err)?;
            let next: Option<i64> = match row {
                Some(r) => r.try_get("", "next_ns").map_err(db_err)?,
                None => None,
            };
            Ok(next.map(Ts))
        })
        .await
    }

    /// Records what came of a job.
    pub async fn finish(&self, job: &Job, result: Finish) -> Result<(), Error> {
        self.finish_many(vec![(job.clone(), result)]).await
    }

    /// Records what came of several jobs, at the clock's now.
    pub async fn finish_many(&self, results: Vec<(Job, Finish)>) -> Result<(), Error> {
        let at = self.clock.now();
        let mut outcomes: Vec<Outcome> = results
            .into_iter()
            .map(|(job, finish)| Outcome {
                job: job.into(),
                finish,
                at,
                observed: None,
            })
            .collect();
        self.record(&mut outcomes).await
    }

    /// Records outcomes, up to [`RECORD_TX`] per transaction: the
    /// devices and actions of a chunk are locked and read with one
    /// statement each, then each action written, and the audit entries
    /// inserted together.
    ///
    /// An outcome that cannot be recorded (its action was deleted
    /// meanwhile, or its claim lapsed and was taken again) is reported and
    /// left out; it must not lose the others. A chunk that fails otherwise
    /// is rolled back and written again with each outcome in its own
    /// savepoint.
    pub async fn record(&self, outcomes: &mut [Outcome]) -> Result<(), Error> {
        // Devices in one order in every transaction, so two dispatchers'
        // batches never wait on each other in a cycle.
        outcomes.sort_by(|a, b| {
            let key = |o: &Outcome| {
                (
                    o.job.tenant.as_str().to_owned(),
                    o.job.device_id.as_str().to_owned(),
                    o.job.action_id,
                )
            };
            key(a).cmp(&key(b))
        });
        // PostgreSQL: the records of every claim would otherwise run at
        // once and hold the whole pool (`PG_CONNECTIONS_PER_RECORD`).
        let _slot = match &self.recording.slots {
            Some(slots) => Some(
                slots
                    .acquire()
                    .await
                    .map_err(|_| Error::StorageUnavailable("the store is closing".into()))?,
            ),
            None => None,
        };
        let counts = &self.recording.counts;
        let now = counts.now.fetch_add(1, Ordering::AcqRel) + 1;
        counts.most.fetch_max(now, Ordering::AcqRel);
        let _running = Leave(&counts.now);
        for chunk in outcomes.chunks(RECORD_TX) {
            self.retrying(|| self.record_chunk(chunk)).await?;
        }
        Ok(())
    }

    /// The most dispatch records that have run at once since the store
    /// opened (on SQLite, counting those waiting for the write
    /// connection).
    pub fn records_at_once(&self) -> usize {
        self.recording.counts.most.load(Ordering::Acquire)
    }

    async fn record_chunk(&self, chunk: &[Outcome]) -> Result<(), Error> {
        let tx = self.begin().await?;
        match record_in(&tx, chunk).await {
            Ok(()) => {
                tx.commit().await.map_err(db_err)?;
                self.wrote_events();
                return Ok(());
            }
            Err(e @ (Error::StorageUnavailable(_) | Error::StorageContention(_))) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "recording dispatch outcomes together failed; recording them one by one");
            }
        }
        tx.rollback().await.map_err(db_err)?;
        let tx = self.begin().await?;
        for o in chunk {
            let one = tx.begin().await.map_err(db_err)?;
            match record_in(&one, std::slice::from_ref(o)).await {
                Ok(()) => one.commit().await.map_err(db_err)?,
                Err(e @ (Error::StorageUnavailable(_) | Error::StorageContention(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(action_id = %o.job.action_id, error = %e, "dispatch outcome not recorded");
                    one.rollback().await.map_err(db_err)?;
                }
            }
        }
        tx.commit().await.map_err(db_err)?;
        self.wrote_events();
        Ok(())
    }
}

/// Counts a record out of those running when it ends, however it ends.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Records `chunk` (sorted by tenant, device, action) in `tx`.
async fn record_in<C: ConnectionTrait>(tx: &C, chunk: &[Outcome]) -> Result<(), Error> {
    let mut audits = Vec::new();
    for group in chunk.chunk_by(|a, b| a.job.tenant == b.job.tenant) {
        let tenant = &group[0].job.tenant;
        let mut devices: Vec<&str> = group.iter().map(|o| o.job.device_id.as_str()).collect();
        devices.dedup();
        // The devices' rows, then the actions': the order every writer
        // of a device takes them in.
        let _locked: Vec<String> = device::Entity::find()
            .select_only()
            .column(device::Column::DeviceId)
            .filter(device::Column::TenantId.eq(tenant.as_str()))
            .filter(device::Column::DeviceId.is_in(devices))
            .order_by_asc(device::Column::DeviceId)
            .lock_exclusive()
            .into_tuple()
            .all(tx)
            .await
            .map_err(db_err)?;
        let ids: Vec<String> = group.iter().map(|o| o.job.action_id.to_string()).collect();
        let rows: HashMap<String, action::Model> = rows::all(
            tx,
            rows::actions_of(tenant)
                .filter(action::Column::ActionId.is_in(ids))
                .order_by_asc(action::Column::ActionId)
                .lock_exclusive(),
        )
        .await?
        .into_iter()
        .map(|m| (m.action_id.clone(), m))
        .collect();
        let mut settled = Vec::with_capacity(group.len());
        // The latest state seen of each device.
        let mut seen: HashMap<&str, (&Configured, &Observed)> = HashMap::new();
        for o in group {
            let job = &o.job;
            let Some(row) = rows.get(&job.action_id.to_string()) else {
                tracing::warn!(action_id = %job.action_id, "dispatch outcome not recorded: the action vanished while dispatched");
                continue;
            };
            if row.lease_owner.as_deref() != Some(&*job.claim) {
                tracing::warn!(action_id = %job.action_id, "dispatch outcome not recorded: the claim lapsed and was taken again");
                continue;
            }
            let (s, transition) = settle_row(job, row, o.finish.clone(), o.at)?;
            let at = s.a.updated;
            settled.push(s);
            if let Some(t) = transition {
                audits.push(rows::transition_row(tenant, &t, None, at));
            }
            if let Some((device, o)) = &o.observed {
                let key = device.id.as_str();
                if seen.get(key).is_none_or(|(_, before)| before.at <= o.at) {
                    seen.insert(key, (device, o));
                }
            }
        }
        for part in settled.chunks(RECORD_CHUNK) {
            write_settled(tx, tenant, part).await?;
        }
        let seen: Vec<_> = seen.into_values().collect();
        for part in seen.chunks(RECORD_CHUNK) {
            write_observed(tx, tenant, part).await?;
        }
    }
    if !audits.is_empty() {
        audit::Entity::insert_many(audits)
            .exec_without_returning(tx)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// The rows `part` names, on `devices`' side of a join: the devices they
/// run on.
fn devices_of(part: sea_orm::Condition) -> Expr {
    let claimed = Query::select()
        .column(action::Column::TenantId)
        .column(action::Column::DeviceId)
        .from(action::Entity)
        .cond_where(part)
        .to_owned();
    Expr::tuple([
        Expr::col(device::Column::TenantId),
        Expr::col(device::Column::DeviceId),
    ])
    .in_subquery(claimed)
}

/// Rows decoded one by one: one that does not decode must not stop the
/// others.
type Decoded<M> = Vec<Result<M, Error>>;

/// Claims work due by `until` under `owner` (see [`Store::claim_ahead`]);
/// the claimed rows, earliest due first, and the devices they run on,
/// each decoded on its own.
async fn claim_in(
    tx: &DatabaseTransaction,
    now: Ts,
    until: Ts,
    limit: u32,
    lease_nanos: i64,
    owner: &str,
    ids_per_statement: usize,
) -> Result<(Decoded<action::Model>, Decoded<device::Model>), Error> {
    // Due and unclaimed (or its claim lapsed), locked, with the claims
    // that held them. On PostgreSQL rows another replica is claiming
    // right now are skipped, not waited for.
    let due: Vec<(String, Option<String>)> = action::Entity::find()
        .select_only()
        .column(action::Column::ActionId)
        .column(action::Column::LeaseOwner)
        .filter(owed())
        .filter(action::Column::DueNs.lte(until.0))
        .filter(claimable(now))
        .order_by_asc(action::Column::DueNs)
        .limit(u64::from(limit))
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .into_tuple()
        .all(tx)
        .await
        .map_err(db_err)?;
    let live = if tx.get_database_backend() == sea_orm::DbBackend::Postgres {
        live_claims(tx, &due, now).await?
    } else {
        // SQLite: no renewal can commit while this write transaction runs.
        std::collections::HashSet::new()
    };
    let ids: Vec<&str> = due
        .iter()
        .filter(|(_, held_by)| held_by.as_ref().is_none_or(|c| !live.contains(c)))
        .map(|(id, _)| id.as_str())
        .collect();
    if ids.is_empty() {
        return Ok((vec![], vec![]));
    }
    let claimed = action::Entity::update_many()
        .col_expr(
            action::Column::LeaseUntilNs,
            Expr::value(now.0 + lease_nanos),
        )
        .col_expr(action::Column::LeaseOwner, Expr::value(owner))
        .col_expr(
            action::Column::Fence,
            Expr::col(action::Column::Fence).add(1),
        )
        .filter(action::Column::ActionId.is_in(ids.iter().copied()))
        // Again here: the claim never takes a row another claim holds.
        .filter(owed())
        .filter(claimable(now))
        .exec(tx)
        .await
        .map_err(db_err)?;
    if claimed.rows_affected == 0 {
        return Ok((vec![], vec![]));
    }
    // The claim's own lease, as long as its rows': its heartbeat renews
    // this one ([`Store::renew`]).
    let lease = Query::insert()
        .into_table(leases())
        .columns([Alias::new("owner"), Alias::new("until_ns")])
        .values([owner.into(), (now.0 + lease_nanos).into()])
        .map_err(|e| Error::Internal(format!("lease statement: {e}")))?
        .to_owned();
    tx.execute(&lease).await.map_err(db_err)?;
    // By id, under this claim (those the claim passed by after all are
    // not): `lease_owner` is not indexed.
    let mine = [Due {
        claim: owner.to_owned(),
        action_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
    }];
    let (mut claimed, mut devices) = (Vec::new(), Vec::new());
    for part in held_by(action::Entity, &mine, ids_per_statement) {
        dispatched(tx, part.clone(), now).await?;
        claimed.extend(
            rows::each(
                tx,
                action::Entity::find()
                    .filter(part.clone())
                    .order_by_asc(action::Column::DueNs),
            )
            .await?,
        );
        devices.extend(rows::each(tx, device::Entity::find().filter(devices_of(part))).await?);
    }
    Ok((claimed, devices))
}

/// PostgreSQL: of the claims that held the rows `due` (locked by a claim
/// in progress, their own leases run out), those whose lease runs at
/// `now`, read again with their lease rows locked. The first read's
/// snapshot may predate a renewal: one committed since is seen here, one
/// in progress is waited for, and one that comes later waits for this
/// claim's commit and then counts none of its rows still held.
async fn live_claims(
    tx: &DatabaseTransaction,
    due: &[(String, Option<String>)],
    now: Ts,
) -> Result<std::collections::HashSet<String>, Error> {
    let mut previous: Vec<&str> = due.iter().filter_map(|(_, c)| c.as_deref()).collect();
    previous.sort_unstable();
    previous.dedup();
    if previous.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    let q = Query::select()
        .expr_as(lease_col("owner"), Alias::new("owner"))
        .expr_as(lease_col("until_ns"), Alias::new("until_ns"))
        .from(leases())
        .and_where(lease_col("owner").is_in(previous))
        .order_by(Alias::new("owner"), sea_orm::Order::Asc)
        .lock(LockType::Share)
        .to_owned();
    let mut live = std::collections::HashSet::new();
    for row in tx.query_all(&q).await.map_err(db_err)? {
        let until: i64 = row.try_get("", "until_ns").map_err(db_err)?;
        if until > now.0 {
            live.insert(row.try_get::<String>("", "owner").map_err(db_err)?);
        }
    }
    Ok(live)
}

/// Sends the SCHEDULED applies held by the claims `owner` selects that are
/// due at `now` on their way (the lifecycle's DISPATCHED step), in bulk:
/// states and reason from the domain.
async fn dispatched(
    tx: &DatabaseTransaction,
    owner: sea_orm::Condition,
    now: Ts,
) -> Result<(), Error> {
    let (from, to) = (
        ActionState::Scheduled.as_str(),
        ActionState::Acknowledged.as_str(),
    );
    let dispatched = || {
        sea_orm::Condition::all()
            .add(owner.clone())
            .add(held(action::Entity, now))
            .add(action::Column::State.eq(from))
            .add(action::Column::Work.eq(Work::Apply.as_str()))
            .add(action::Column::DueNs.lte(now.0))
    };
    // PostgreSQL: one statement, the change and its audit entries (from
    // the rows it changed, as RETURNING gives them), so both see the same
    // rows (a cancel committed meanwhile is seen by both; one in progress
    // is waited for), and the rows a start names (thousands, by id) are
    // found once. SQLite's write transaction already excludes every other
    // writer, and it takes no change in a WITH: the entries, then the
    // change.
    if tx.get_database_backend() == sea_orm::DbBackend::Postgres {
        use sea_orm::sea_query::PostgresQueryBuilder;
        let update = Query::update()
            .table(action::Entity)
            .value(action::Column::State, to)
            .value(
                action::Column::Revision,
                Expr::col(action::Column::Revision).add(1),
            )
            .value(action::Column::UpdateNs, now.0)
            .cond_where(dispatched())
            .returning(Query::returning().columns([
                action::Column::TenantId,
                action::Column::DeviceId,
                action::Column::ActionId,
            ]))
            .to_owned();
        let (update, mut values) = update.build(PostgresQueryBuilder);
        let n = values.0.len();
        // In the order of the index of an action's trail, as below.
        let sql = format!(
            "WITH started AS ({update}) \
             INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, request_id, at_ns) \
             SELECT tenant_id, device_id, action_id, ${}, ${}, ${}, NULL, ${} FROM started \
             ORDER BY tenant_id, action_id",
            n + 1,
            n + 2,
            n + 3,
            n + 4
        );
        values.0.extend([
            from.into(),
            to.into(),
            lifecycle::DISPATCHED.into(),
            now.0.into(),
        ]);
        tx.execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            sql,
            values,
        ))
        .await
        .map_err(db_err)?;
        return Ok(());
    }
    // In the order of the index of an action's trail: a storm's entries
    // go in page by page, rather than at random across it.
    let select = Query::select()
        .column(action::Column::TenantId)
        .column(action::Column::DeviceId)
        .column(action::Column::ActionId)
        .expr(Expr::value(from))
        .expr(Expr::value(to))
        .expr(Expr::value(lifecycle::DISPATCHED))
        .expr(Expr::value(Option::<String>::None))
        .expr(Expr::value(now.0))
        .from(action::Entity)
        .cond_where(dispatched())
        .order_by(action::Column::TenantId, sea_orm::Order::Asc)
        .order_by(action::Column::ActionId, sea_orm::Order::Asc)
        .to_owned();
    let insert = Query::insert()
        .into_table(audit::Entity)
        .columns([
            audit::Column::TenantId,
            audit::Column::DeviceId,
            audit::Column::ActionId,
            audit::Column::FromState,
            audit::Column::ToState,
            audit::Column::Reason,
            audit::Column::RequestId,
            audit::Column::AtNs,
        ])
        .select_from(select)
        .map_err(|e| Error::Internal(format!("audit statement: {e}")))?
        .to_owned();
    tx.execute(&insert).await.map_err(db_err)?;
    action::Entity::update_many()
        .col_expr(action::Column::State, Expr::value(to))
        .col_expr(
            action::Column::Revision,
            Expr::col(action::Column::Revision).add(1),
        )
        .col_expr(action::Column::UpdateNs, Expr::value(now.0))
        .filter(dispatched())
        .exec(tx)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// What an outcome makes of its action's row, to write.
struct Settled {
    action_id: String,
    claim: String,
    a: Action,
    work: Option<Work>,
    due: Option<Ts>,
    attempts: i64,
    raw: Option<String>,
    memo: Option<Option<String>>,
}

/// What `result` makes of the action in `row` (locked, and held under
/// `job`'s claim) at `now`; the transition to audit, if the state changed.
fn settle_row(
    job: &Recorded,
    row: &action::Model,
    result: Finish,
    now: Ts,
) -> Result<(Settled, Option<crate::domain::Transition>), Error> {
    let a = rows::action_from_model(row)?;
    // Never before the row's last change (a cancel recorded while the
    // driver answered).
    let now = Ts(Ord::max(now.0, row.update_ns));
    // A write of an earlier try may be in force (its memo is on record):
    // a final failure then owes a revert too.
    let written_before = result.needs_written_before(job.work) && row.driver_memo.is_some();
    let lifecycle::Settled {
        change,
        attempts,
        raw,
        memo,
    } = lifecycle::settle(&a, job.work, job.attempts, result, written_before, now);
    let (work, due) = match change.work {
        Some((w, at)) => (Some(w), Some(at)),
        None => (None, None),
    };
    Ok((
        Settled {
            action_id: row.action_id.clone(),
            claim: job.claim.to_string(),
            a: change.action,
            work,
            due,
            attempts,
            raw,
            memo,
        },
        change.transition,
    ))
}

/// The placeholders of a `VALUES` list of `rows` rows of `cols` columns,
/// then of the one parameter bound after them, as `backend` spells them.
fn values_placeholders(backend: sea_orm::DbBackend, rows: usize, cols: usize) -> (String, String) {
    let param = |n: usize| match backend {
        sea_orm::DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    };
    let list = (0..rows)
        .map(|r| {
            let row: Vec<String> = (1..=cols).map(|c| param(r * cols + c)).collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    (list, param(rows * cols + 1))
}

/// Columns of one row of [`write_settled`]'s VALUES list.
const SETTLED_COLUMNS: usize = 15;

/// Writes settled rows of `tenant` in one statement: the outcome, what is
/// owed next, and the claim released — only where it is still the one
/// the outcome was taken under (checked already under the row lock, so
/// every row is written, or the statement fails).
async fn write_settled<C: ConnectionTrait>(
    tx: &C,
    tenant: &TenantId,
    settled: &[Settled],
) -> Result<(), Error> {
    use sea_orm::{Statement, Value};
    if settled.is_empty() {
        return Ok(());
    }
    let backend = tx.get_database_backend();
    let mut values: Vec<Value> = Vec::with_capacity(settled.len() * SETTLED_COLUMNS + 1);
    for r in settled {
        let a = &r.a;
        values.extend([
            Value::from(r.action_id.clone()),
            Value::from(r.claim.clone()),
            Value::from(a.state.as_str()),
            Value::from(a.error_code.clone()),
            Value::from(a.error_message.clone()),
            Value::from(a.revision),
            Value::from(a.updated.0),
            Value::from(a.verified),
            Value::from(r.work.map_or("NONE", |w| w.as_str())),
            Value::from(r.due.map(|d| d.0)),
            Value::from(r.attempts),
            Value::from(r.raw.is_some()),
            Value::from(r.raw.clone()),
            Value::from(r.memo.is_some()),
            Value::from(r.memo.clone().flatten()),
        ]);
    }
    values.push(Value::from(tenant.as_str()));
    let (rows, tenant_param) = values_placeholders(backend, settled.len(), SETTLED_COLUMNS);
    // VALUES columns are column1, column2, ... on both SQLite and
    // PostgreSQL; each parameter is bound with its type.
    let sql = format!(
        "UPDATE actions SET state = v.column3, error_code = v.column4, error_message = v.column5, \
         revision = v.column6, update_ns = v.column7, verified = v.column8, work = v.column9, \
         due_ns = v.column10, attempts = v.column11, lease_until_ns = NULL, lease_owner = NULL, \
         finished_ns = CASE WHEN v.column9 = 'NONE' THEN v.column7 ELSE NULL END, \
         oem_raw = CASE WHEN v.column12 THEN v.column13 ELSE actions.oem_raw END, \
         driver_memo = CASE WHEN v.column14 THEN v.column15 ELSE actions.driver_memo END \
         FROM (VALUES {rows}) AS v \
         WHERE actions.action_id = v.column1 AND actions.lease_owner = v.column2 \
         AND actions.tenant_id = {tenant_param}"
    );
    let done = tx
        .execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
        .map_err(db_err)?;
    if done.rows_affected() != settled.len() as u64 {
        return Err(Error::Internal(format!(
            "{} of {} outcomes written: a claim lapsed while they were recorded",
            done.rows_affected(),
            settled.len()
        )));
    }
    Ok(())
}

/// Records observations of `tenant`'s devices, each as the device was
/// configured then (see [`Store::observe`]), in one statement.
async fn write_observed<C: ConnectionTrait>(
    tx: &C,
    tenant: &TenantId,
    seen: &[(&Configured, &Observed)],
) -> Result<u64, Error> {
    use sea_orm::{Statement, Value};
    if seen.is_empty() {
        return Ok(0);
    }
    let backend = tx.get_database_backend();
    let mut values: Vec<Value> = Vec::with_capacity(seen.len() * 5 + 1);
    for (device, o) in seen {
        values.extend([
            Value::from(device.id.as_str()),
            Value::from(rows::observed_json(o)),
            Value::from(o.at.0),
            Value::from(device.revision),
            Value::from(device.incarnation.as_str()),
        ]);
    }
    values.push(Value::from(tenant.as_str()));
    let (rows, tenant_param) = values_placeholders(backend, seen.len(), 5);
    // Revision and incarnation: a device reconfigured since, or deleted
    // and created again (revision 1 once more), keeps what it has; so
    // does one with a later observation (read after this one, recorded
    // first).
    let sql = format!(
        "UPDATE devices SET observed = v.column2, observed_ns = v.column3 \
         FROM (VALUES {rows}) AS v \
         WHERE devices.device_id = v.column1 AND devices.revision = v.column4 \
         AND devices.incarnation = v.column5 AND devices.tenant_id = {tenant_param} \
         AND (devices.observed_ns IS NULL OR devices.observed_ns <= v.column3)"
    );
    let done = tx
        .execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
        .map_err(db_err)?;
    Ok(done.rows_affected())
}

/// Records an observation of `device` as it was configured then (see
/// [`Store::observe`]); whether it was recorded.
async fn observe_in<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    device: &Device,
    o: &Observed,
) -> Result<bool, Error> {
    // Revision and incarnation: a device deleted and created again
    // starts at revision 1 once more.
    let done = device::Entity::update_many()
        .col_expr(
            device::Column::Observed,
            Expr::value(rows::observed_json(o)),
        )
        .col_expr(device::Column::ObservedNs, Expr::value(o.at.0))
        .filter(device::Column::TenantId.eq(tenant.as_str()))
        .filter(device::Column::DeviceId.eq(device.id.as_str()))
        .filter(device::Column::Revision.eq(device.revision))
        .filter(device::Column::Incarnation.eq(device.incarnation.as_str()))
        // Never over a later one (read after this one, recorded first).
        .filter(
            device::Column::ObservedNs
                .is_null()
                .or(device::Column::ObservedNs.lte(o.at.0)),
        )
        .exec(conn)
        .await
        .map_err(db_err)?;
    Ok(done.rows_affected == 1)
}

impl Store {
    /// The drivers' memos of `device`'s actions whose writes may be in
    /// force (applied and not yet reverted): (action id, memo), oldest
    /// first.
    pub async fn memos(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Vec<switchyard_drivers::Applied>, Error> {
        self.bounded(async {
            let rows: Vec<(String, Option<String>)> = rows::actions_of(tenant)
                .select_only()
                .column(action::Column::ActionId)
                .column(action::Column::DriverMemo)
                .filter(action::Column::DeviceId.eq(device.as_str()))
                .filter(action::Column::DriverMemo.is_not_null())
                .order_by_asc(action::Column::StartNs)
                .order_by_asc(action::Column::ActionId)
                .into_tuple()
                .all(&self.read)
                .await
                .map_err(db_err)?;
            Ok(rows
                .into_iter()
                .filter_map(|(action_id, memo)| {
                    memo.map(|memo| switchyard_drivers::Applied { action_id, memo })
                })
                .collect())
        })
        .await
    }

    /// How many actions hold their channel while owing no work: none,
    /// ever. Holders are found among the owed rows (migration 18), so a
    /// holder owing nothing would be missed by the conflict check. A
    /// consistency check, for the storage contract and for operators.
    pub async fn holders_owing_nothing(&self) -> Result<u64, Error> {
        use sea_orm::PaginatorTrait as _;
        let states: Vec<&str> = ActionState::ALL
            .iter()
            .filter(|s| lifecycle::holds_channel(**s, None))
            .map(|s| s.as_str())
            .collect();
        self.bounded(async {
            action::Entity::find()
                .filter(Expr::cust("work = 'NONE'"))
                .filter(action::Column::State.is_in(states))
                .count(&self.read)
                .await
                .map_err(db_err)
        })
        .await
    }

    /// How many actions owe work while not holding their channel: none,
    /// ever. On PostgreSQL the exclusion constraint covers the owed rows
    /// (migration 24) as the holding ones, so an owed row that did not
    /// hold would still keep other actions off its window. A consistency
    /// check, for the storage contract and for operators.
    pub async fn owed_not_holding(&self) -> Result<u64, Error> {
        use sea_orm::PaginatorTrait as _;
        self.bounded(async {
            action::Entity::find()
                .filter(Expr::cust(rows::OWED_SQL))
                .filter(Expr::cust(format!("NOT ({})", rows::holding_sql())))
                .count(&self.read)
                .await
                .map_err(db_err)
        })
        .await
    }

    /// The OEM's last raw answer for an action.
    pub async fn oem_raw(
        &self,
        tenant: &TenantId,
        action: &crate::domain::ActionId,
    ) -> Result<Option<String>, Error> {
        self.bounded(async {
            let row = rows::first(
                &self.read,
                rows::actions_of(tenant).filter(action::Column::ActionId.eq(action.to_string())),
            )
            .await?;
            Ok(row.and_then(|m| m.oem_raw))
        })
        .await
    }

    /// Records what a driver observed on `device` as it was configured
    /// then; an observation of a configuration changed since (or of a
    /// device deleted and created again) is
    /// dropped (the change cleared the old one, and the new configuration
    /// is observed afresh). Returns whether it was recorded.
    pub async fn observe(
        &self,
        tenant: &TenantId,
        device: &Device,
        o: &Observed,
    ) -> Result<bool, Error> {
        self.bounded(observe_in(&self.write, tenant, device, o))
            .await
    }

    /// Records observations of several devices (each as it was
    /// configured when read, see [`Store::observe`]) in one transaction;
    /// returns how many were recorded.
    pub async fn observe_many(&self, seen: &[(TenantId, Device, Observed)]) -> Result<u64, Error> {
        if seen.is_empty() {
            return Ok(0);
        }
        let mut seen: Vec<&(TenantId, Device, Observed)> = seen.iter().collect();
        seen.sort_by(|a, b| (a.0.as_str(), a.1.id.as_str()).cmp(&(b.0.as_str(), b.1.id.as_str())));
        self.retrying(|| async {
            let tx = self.begin().await?;
            let mut recorded = 0;
            for group in seen.chunk_by(|a, b| a.0 == b.0) {
                let configured: Vec<Configured> =
                    group.iter().map(|(_, d, _)| Configured::from(d)).collect();
                let rows: Vec<(&Configured, &Observed)> = configured
                    .iter()
                    .zip(group.iter().map(|(_, _, o)| o))
                    .collect();
                for part in rows.chunks(RECORD_CHUNK) {
                    recorded += write_observed(&tx, &group[0].0, part).await?;
                }
            }
            tx.commit().await.map_err(db_err)?;
            Ok(recorded)
        })
        .await
    }

    /// Devices last observed before `before` (or never), oldest first.
    pub async fn devices_to_observe(
        &self,
        before: Ts,
        limit: u32,
    ) -> Result<Vec<(TenantId, Device)>, Error> {
        self.bounded(async {
            let select = device::Entity::find()
                .filter(
                    device::Column::ObservedNs
                        .is_null()
                        .or(device::Column::ObservedNs.lt(before.0)),
                )
                .order_by_asc(Func::coalesce([
                    Expr::col(device::Column::ObservedNs),
                    Expr::value(0i64),
                ]))
                .limit(u64::from(limit));
            rows::all(&self.read, select)
                .await?
                .into_iter()
                .map(|m| {
                    let tenant = TenantId::from_stored(m.tenant_id.clone());
                    Ok((tenant, rows::device_from_model(m)?))
                })
                .collect()
        })
        .await
    }

    /// A device by tenant and id (for the dispatcher).
    pub async fn device_for(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<Device>, Error> {
        self.bounded(async { rows::fetch_device(&self.read, tenant, id, false).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What recording an observation checks is the device's own: its id,
    /// revision and incarnation.
    #[test]
    fn a_configuration_is_the_devices_own() {
        let d = Device {
            id: DeviceId::parse("dev-4").unwrap(),
            display_name: "four".into(),
            family: crate::domain::Family::Battery,
            driver: "simulated".into(),
            oem_device_id: "oem-4".into(),
            timezone: "UTC".into(),
            settings: Default::default(),
            revision: 6,
            created: Ts(1),
            updated: Ts(2),
            observed: None,
            incarnation: "inc-8".into(),
        };
        assert_eq!(
            Configured::from(&d),
            Configured {
                id: DeviceId::parse("dev-4").unwrap(),
                revision: 6,
                incarnation: "inc-8".into(),
            }
        );
    }

    /// What a record needs of a job is the job's own, field by field,
    /// whether the job is borrowed or given up.
    #[test]
    fn a_recorded_job_keeps_its_own_fields() {
        let job = Job {
            tenant: TenantId::from_stored("t1".into()),
            action: Planned::from(&Action {
                id: ActionId::from_u128(7),
                device_id: DeviceId::parse("dev-2").unwrap(),
                ..Action::for_tests(ActionState::Active, None)
            }),
            work: Work::Revert,
            attempts: 4,
            clear_native: false,
            claim: "claim-9".into(),
            fence: 11,
            due: Ts(5),
        };
        for r in [Recorded::from(&job), Recorded::from(job.clone())] {
            assert_eq!(r.tenant.as_str(), "t1");
            assert_eq!(r.action_id, ActionId::from_u128(7));
            assert_eq!(r.device_id.as_str(), "dev-2");
            assert_eq!(&*r.claim, "claim-9");
            assert_eq!(r.work, Work::Revert);
            assert_eq!(r.attempts, 4);
        }
    }

    /// A start's rows are named in statements of at most so many ids,
    /// each id once, under its own claim; a claim naming nothing adds no
    /// statement.
    #[test]
    fn a_start_names_its_rows_in_bounded_statements() {
        use sea_orm::sea_query::SqliteQueryBuilder;
        let due = |claim: &str, from: usize, n: usize| Due {
            claim: claim.into(),
            action_ids: (from..from + n).map(|i| format!("id-{i:03}")).collect(),
        };
        let claims = [
            due("c1", 0, 3),
            due("c2", 3, 2),
            due("none", 0, 0),
            due("c3", 5, 6),
        ];
        let parts: Vec<String> = held_by(action::Entity, &claims, 4)
            .into_iter()
            .map(|part| {
                Query::select()
                    .expr(Expr::val(1))
                    .from(action::Entity)
                    .cond_where(part)
                    .to_string(SqliteQueryBuilder)
            })
            .collect();
        let named: Vec<usize> = parts.iter().map(|p| p.matches("'id-").count()).collect();
        assert_eq!(named, [3, 2, 4, 2], "{parts:#?}");
        for (claim, from, n) in [("c1", 0, 3), ("c2", 3, 2), ("c3", 5, 6)] {
            for i in from..from + n {
                let id = format!("'id-{i:03}'");
                let with: Vec<&String> = parts.iter().filter(|p| p.contains(&id)).collect();
                assert_eq!(with.len(), 1, "{id} in {with:#?}");
                assert!(
                    with[0].contains(&format!("\"lease_owner\" = '{claim}'")),
                    "{}",
                    with[0]
                );
            }
        }
        assert!(!parts.iter().any(|p| p.contains("'none'")));
        assert!(held_by(action::Entity, &[due("c", 0, 0)], IDS_PER_STATEMENT).is_empty());
    }
}
