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

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, TransactionTrait,
    sea_query::{Expr, ExprTrait, Func, LockBehavior, LockType, Query},
};

use super::{
    Store, db_err,
    entity::{action, audit, device},
    rows,
};
use crate::domain::{
    Action, ActionState, Device, DeviceId, Error, Observed, TenantId, Ts, Work, lifecycle,
};

pub use crate::domain::lifecycle::Finish;

/// Actions that owe work, as a literal condition: the partial index
/// `actions_owed` (migration 3) is chosen only when the query states its
/// predicate, which a bound parameter would hide from the planner.
fn owed() -> Expr {
    Expr::cust("work <> 'NONE'")
}

/// Work a dispatcher has claimed.
#[derive(Clone, Debug)]
pub struct Job {
    /// The action's tenant.
    pub tenant: TenantId,
    /// The action as claimed.
    pub action: Action,
    /// What is owed.
    pub work: Work,
    /// Failed tries so far.
    pub attempts: i64,
    /// Pushed with CANCEL_AND_REPLACE.
    pub clear_native: bool,
    /// The claim this job was taken under: its outcome is recorded only
    /// while the row still carries it.
    pub claim: String,
    /// The claim's fencing token: larger than every earlier claim's of the
    /// action, handed to the driver ([`switchyard_drivers::ApplyRequest::fence`]).
    pub fence: u64,
}

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
        let owner = uuid::Uuid::now_v7().to_string();
        let rows = self
            .retrying(|| async {
                let tx = self.begin().await?;
                let rows = claim_in(&tx, now, limit, lease_nanos, &owner).await?;
                tx.commit().await.map_err(db_err)?;
                Ok(rows)
            })
            .await?;
        let job = |m: action::Model| -> Result<Job, Error> {
            Ok(Job {
                tenant: TenantId::from_stored(m.tenant_id.clone()),
                action: rows::action_from_model(&m)?,
                work: work_of(&m.work).ok_or_else(|| Error::Internal("claimed no work".into()))?,
                attempts: m.attempts,
                clear_native: m.clear_native,
                claim: owner.clone(),
                fence: u64::try_from(m.fence)
                    .map_err(|_| Error::Internal("a negative fencing token is stored".into()))?,
            })
        };
        // A row that does not decode is reported and left to its lease; it
        // must not stop the others.
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                r.and_then(job)
                    .map_err(|e| tracing::error!(error = %e, "a claimed action cannot be read"))
                    .ok()
            })
            .collect())
    }

    /// Extends the lease of every job still held under `claim` to
    /// `until` (the dispatcher's heartbeat while a round runs); returns
    /// how many. Jobs already recorded hold no claim and are untouched; a
    /// claim that lapsed and was taken again is not this one any more.
    pub async fn renew(&self, claim: &str, until: Ts) -> Result<u64, Error> {
        self.bounded(async {
            // Rows being recorded right now (locked by the round's own
            // finish, or a push) are skipped, not waited for: renewing in
            // one order while they lock in another would deadlock.
            let mine = action::Entity::find()
                .select_only()
                .column(action::Column::ActionId)
                .filter(action::Column::LeaseOwner.eq(claim))
                .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                .into_query();
            let done = action::Entity::update_many()
                .col_expr(action::Column::LeaseUntilNs, Expr::value(until.0))
                .filter(action::Column::ActionId.in_subquery(mine))
                .filter(action::Column::LeaseOwner.eq(claim))
                .exec(&self.write)
                .await
                .map_err(db_err)?;
            Ok(done.rows_affected)
        })
        .await
    }

    /// When the next work can be claimed, if any (for the dispatcher's
    /// sleep): claimed work counts from when its lease runs out, so a
    /// dispatcher never spins on work another one holds.
    pub async fn next_due(&self) -> Result<Option<Ts>, Error> {
        self.bounded(async {
            let lease = || Expr::col(action::Column::LeaseUntilNs);
            let due = || Expr::col(action::Column::DueNs);
            let free_at = Expr::case(lease().gt(due()), lease()).finally(due());
            let q = Query::select()
                .expr_as(Func::min(free_at), "next_ns")
                .from(action::Entity)
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

    /// Records what came of several jobs, in one transaction.
    ///
    /// One record that cannot be written (its action was deleted
    /// meanwhile, say) must not lose the others. The batch is first
    /// written straight through; if a record fails, the transaction is
    /// rolled back and written again with each record in its own
    /// savepoint, and a failed one is left to its lease.
    pub async fn finish_many(&self, results: Vec<(Job, Finish)>) -> Result<(), Error> {
        if results.is_empty() {
            return Ok(());
        }
        let mut results = results;
        // Devices in one order in every transaction, so two dispatchers'
        // batches never wait on each other in a cycle.
        results.sort_by(|(a, _), (b, _)| {
            (a.tenant.as_str(), a.action.device_id.as_str(), a.action.id).cmp(&(
                b.tenant.as_str(),
                b.action.device_id.as_str(),
                b.action.id,
            ))
        });
        self.retrying(|| self.finish_batch(&results)).await
    }

    async fn finish_batch(&self, results: &[(Job, Finish)]) -> Result<(), Error> {
        let now = self.clock.now();
        let tx = self.begin().await?;
        let mut clean = true;
        for (job, result) in results {
            match finish_one(&tx, job, result.clone(), now).await {
                Ok(()) => {}
                Err(e @ (Error::StorageUnavailable(_) | Error::StorageContention(_))) => {
                    return Err(e);
                }
                Err(_) => {
                    clean = false;
                    break;
                }
            }
        }
        if clean {
            return tx.commit().await.map_err(db_err);
        }
        tx.rollback().await.map_err(db_err)?;
        let tx = self.begin().await?;
        for (job, result) in results {
            let one = tx.begin().await.map_err(db_err)?;
            match finish_one(&one, job, result.clone(), now).await {
                Ok(()) => one.commit().await.map_err(db_err)?,
                Err(e @ (Error::StorageUnavailable(_) | Error::StorageContention(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(action_id = %job.action.id, error = %e, "dispatch outcome not recorded");
                    one.rollback().await.map_err(db_err)?;
                }
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }
}

/// Claims due work under `owner` (see [`Store::claim_due`]); the claimed
/// rows, each decoded on its own.
async fn claim_in(
    tx: &DatabaseTransaction,
    now: Ts,
    limit: u32,
    lease_nanos: i64,
    owner: &str,
) -> Result<Vec<Result<action::Model, Error>>, Error> {
    // Due and unclaimed (or its claim lapsed). On PostgreSQL rows another
    // replica is claiming right now are skipped, not waited for.
    let due = action::Entity::find()
        .select_only()
        .column(action::Column::ActionId)
        .filter(owed())
        .filter(action::Column::DueNs.lte(now.0))
        .filter(
            action::Column::LeaseUntilNs
                .is_null()
                .or(action::Column::LeaseUntilNs.lte(now.0)),
        )
        .order_by_asc(action::Column::DueNs)
        .limit(u64::from(limit))
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .into_query();
    action::Entity::update_many()
        .col_expr(
            action::Column::LeaseUntilNs,
            Expr::value(now.0 + lease_nanos),
        )
        .col_expr(action::Column::LeaseOwner, Expr::value(owner))
        .col_expr(
            action::Column::Fence,
            Expr::col(action::Column::Fence).add(1),
        )
        .filter(action::Column::ActionId.in_subquery(due))
        // Again here: the claim never takes a row another claim holds,
        // however the database runs the subquery.
        .filter(owed())
        .filter(
            action::Column::LeaseUntilNs
                .is_null()
                .or(action::Column::LeaseUntilNs.lte(now.0)),
        )
        .exec(tx)
        .await
        .map_err(db_err)?;
    // The claim sends SCHEDULED applies on their way (the lifecycle's
    // DISPATCHED step), in bulk: states and reason from the domain.
    let (from, to) = (
        ActionState::Scheduled.as_str(),
        ActionState::Acknowledged.as_str(),
    );
    let dispatched = || {
        sea_orm::Condition::all()
            .add(action::Column::LeaseOwner.eq(owner))
            .add(action::Column::State.eq(from))
            .add(action::Column::Work.eq(Work::Apply.as_str()))
    };
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
    rows::each(
        tx,
        action::Entity::find()
            .filter(action::Column::LeaseOwner.eq(owner))
            .order_by_asc(action::Column::DueNs),
    )
    .await
}

async fn finish_one<C: ConnectionTrait>(
    tx: &C,
    job: &Job,
    result: Finish,
    now: Ts,
) -> Result<(), Error> {
    let vanished = || {
        Error::Internal(format!(
            "action {} vanished while dispatched",
            job.action.id
        ))
    };
    // The device's row, then the action's: the order every writer of a
    // device takes them in.
    rows::fetch_device(tx, &job.tenant, &job.action.device_id, true)
        .await?
        .ok_or_else(vanished)?;
    let row = rows::first(
        tx,
        rows::actions_of(&job.tenant)
            .filter(action::Column::ActionId.eq(job.action.id.to_string()))
            .lock_exclusive(),
    )
    .await?
    .ok_or_else(vanished)?;
    let a = rows::action_from_model(&row)?;
    // A write of an earlier try may be in force (its memo is on record):
    // a final failure then owes a revert too.
    let written_before = result.needs_written_before(job.work) && row.driver_memo.is_some();
    let lifecycle::Settled {
        change,
        attempts,
        raw,
        memo,
    } = lifecycle::settle(&a, job.work, job.attempts, result, written_before, now);
    let a = change.action;
    let (work, due) = match change.work {
        Some((w, at)) => (Some(w), Some(at)),
        None => (None, None),
    };
    // One statement: the outcome, what is owed next, and the claim
    // released — only if it is still ours.
    let mut update = action::Entity::update_many()
        .col_expr(action::Column::State, Expr::value(a.state.as_str()))
        .col_expr(action::Column::ErrorCode, Expr::value(a.error_code.clone()))
        .col_expr(
            action::Column::ErrorMessage,
            Expr::value(a.error_message.clone()),
        )
        .col_expr(action::Column::Revision, Expr::value(a.revision))
        .col_expr(action::Column::UpdateNs, Expr::value(a.updated.0))
        .col_expr(action::Column::Verified, Expr::value(a.verified))
        .col_expr(
            action::Column::Work,
            Expr::value(work.map_or("NONE", |w| w.as_str())),
        )
        .col_expr(action::Column::DueNs, Expr::value(due.map(|d| d.0)))
        .col_expr(action::Column::Attempts, Expr::value(attempts))
        .col_expr(
            action::Column::LeaseUntilNs,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(
            action::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        );
    if let Some(raw) = raw {
        update = update.col_expr(action::Column::OemRaw, Expr::value(raw));
    }
    if let Some(memo) = memo {
        update = update.col_expr(action::Column::DriverMemo, Expr::value(memo));
    }
    let done = update
        .filter(action::Column::TenantId.eq(job.tenant.as_str()))
        .filter(action::Column::ActionId.eq(a.id.to_string()))
        .filter(action::Column::LeaseOwner.eq(job.claim.as_str()))
        .exec(tx)
        .await
        .map_err(db_err)?;
    if done.rows_affected == 0 {
        return Err(Error::Internal(format!(
            "the claim on action {} lapsed and was taken again",
            job.action.id
        )));
    }
    if let Some(t) = &change.transition {
        rows::audit(tx, &job.tenant, t, None, now).await?;
    }
    Ok(())
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
        self.bounded(async {
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
                .exec(&self.write)
                .await
                .map_err(db_err)?;
            Ok(done.rows_affected == 1)
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
