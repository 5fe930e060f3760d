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

use super::{Store, db_err, rows};
use crate::domain::{
    Action, ActionState, Device, DeviceId, Error, Observed, TenantId, Ts, Work, lifecycle,
};

pub use crate::domain::lifecycle::Finish;

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
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE actions SET lease_until_ns = ?1, lease_owner = ?2, fence = fence + 1
             WHERE action_id IN (
               SELECT action_id FROM actions
               WHERE work != 'NONE' AND due_ns <= ?3 AND (lease_until_ns IS NULL OR lease_until_ns <= ?3)
               ORDER BY due_ns LIMIT ?4)",
        )
        .bind(now.0 + lease_nanos)
        .bind(&owner)
        .bind(now.0)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        // The claim sends SCHEDULED applies on their way (the lifecycle's
        // DISPATCHED step), in bulk: states and reason from the domain.
        let (from, to) = (
            ActionState::Scheduled.as_str(),
            ActionState::Acknowledged.as_str(),
        );
        sqlx::query(
            "INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, request_id, at_ns)
             SELECT tenant_id, device_id, action_id, ?3, ?4, ?5, NULL, ?1
             FROM actions WHERE lease_owner = ?2 AND state = ?3 AND work = ?6",
        )
        .bind(now.0)
        .bind(&owner)
        .bind(from)
        .bind(to)
        .bind(lifecycle::DISPATCHED)
        .bind(Work::Apply.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query(
            "UPDATE actions SET state = ?4, revision = revision + 1, update_ns = ?1
             WHERE lease_owner = ?2 AND state = ?3 AND work = ?5",
        )
        .bind(now.0)
        .bind(&owner)
        .bind(from)
        .bind(to)
        .bind(Work::Apply.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let rs = sqlx::query("SELECT * FROM actions WHERE lease_owner = ? ORDER BY due_ns")
            .bind(&owner)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        let job = |r: &sqlx::sqlite::SqliteRow| -> Result<Job, Error> {
            let work: String = rows::col(r, "work")?;
            Ok(Job {
                tenant: TenantId::from_stored(rows::col(r, "tenant_id")?),
                action: rows::action_from_row(r)?,
                work: work_of(&work).ok_or_else(|| Error::Internal("claimed no work".into()))?,
                attempts: rows::col(r, "attempts")?,
                clear_native: rows::col::<i64>(r, "clear_native")? != 0,
                claim: owner.clone(),
                fence: u64::try_from(rows::col::<i64>(r, "fence")?)
                    .map_err(|_| Error::Internal("a negative fencing token is stored".into()))?,
            })
        };
        // A row that does not decode is reported and left to its lease; it
        // must not stop the others.
        Ok(rs
            .iter()
            .filter_map(|r| {
                job(r)
                    .map_err(|e| tracing::error!(error = %e, "a claimed action cannot be read"))
                    .ok()
            })
            .collect())
    }

    /// When the next work can be claimed, if any (for the dispatcher's
    /// sleep): claimed work counts from when its lease runs out, so a
    /// dispatcher never spins on work another one holds.
    pub async fn next_due(&self) -> Result<Option<Ts>, Error> {
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(MAX(due_ns, COALESCE(lease_until_ns, due_ns))) FROM actions WHERE work != 'NONE'",
        )
                .fetch_one(&self.read)
                .await
                .map_err(db_err)?;
        Ok(due.map(Ts))
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
        let now = self.clock.now();
        let mut tx = self.begin().await?;
        let mut clean = true;
        for (job, result) in &results {
            match finish_one(&mut tx, job, result.clone(), now).await {
                Ok(()) => {}
                Err(e @ Error::StorageUnavailable(_)) => return Err(e),
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
        let mut tx = self.begin().await?;
        for (job, result) in results {
            sqlx::query("SAVEPOINT finish_one")
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            match finish_one(&mut tx, &job, result, now).await {
                Ok(()) => {}
                Err(e @ Error::StorageUnavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(action_id = %job.action.id, error = %e, "dispatch outcome not recorded");
                    sqlx::query("ROLLBACK TO finish_one")
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
            }
            sqlx::query("RELEASE finish_one")
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }
}

async fn finish_one(
    tx: &mut sqlx::SqliteConnection,
    job: &Job,
    result: Finish,
    now: Ts,
) -> Result<(), Error> {
    let a = rows::fetch_action(&mut *tx, &job.tenant, &job.action.device_id, &job.action.id)
        .await?
        .ok_or_else(|| {
            Error::Internal(format!(
                "action {} vanished while dispatched",
                job.action.id
            ))
        })?;
    // A write of an earlier try may be in force (its memo is on record):
    // a final failure then owes a revert too.
    let written_before: bool = if result.needs_written_before(job.work) {
        sqlx::query_scalar(
            "SELECT driver_memo IS NOT NULL FROM actions WHERE tenant_id = ? AND action_id = ?",
        )
        .bind(job.tenant.as_str())
        .bind(job.action.id.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?
    } else {
        false
    };
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
    let done = sqlx::query(
        "UPDATE actions SET state = ?, error_code = ?, error_message = ?, revision = ?, update_ns = ?,
           verified = ?, work = ?, due_ns = ?, attempts = ?, lease_until_ns = NULL, lease_owner = NULL,
           oem_raw = COALESCE(?, oem_raw),
           driver_memo = CASE WHEN ? THEN ? ELSE driver_memo END
         WHERE tenant_id = ? AND action_id = ? AND lease_owner = ?",
    )
    .bind(a.state.as_str())
    .bind(&a.error_code)
    .bind(&a.error_message)
    .bind(a.revision)
    .bind(a.updated.0)
    .bind(i64::from(a.verified))
    .bind(work.map_or("NONE", |w| w.as_str()))
    .bind(due.map(|d| d.0))
    .bind(attempts)
    .bind(raw)
    .bind(memo.is_some())
    .bind(memo.flatten())
    .bind(job.tenant.as_str())
    .bind(a.id.to_string())
    .bind(&job.claim)
    .execute(&mut *tx)
    .await
    .map_err(db_err)?;
    if done.rows_affected() == 0 {
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
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT action_id, driver_memo FROM actions
             WHERE tenant_id = ? AND device_id = ? AND driver_memo IS NOT NULL
             ORDER BY start_ns, action_id",
        )
        .bind(tenant.as_str())
        .bind(device.as_str())
        .fetch_all(&self.read)
        .await
        .map_err(db_err)?;
        Ok(rows
            .into_iter()
            .map(|(action_id, memo)| switchyard_drivers::Applied { action_id, memo })
            .collect())
    }

    /// The OEM's last raw answer for an action.
    pub async fn oem_raw(
        &self,
        tenant: &TenantId,
        action: &crate::domain::ActionId,
    ) -> Result<Option<String>, Error> {
        sqlx::query_scalar("SELECT oem_raw FROM actions WHERE tenant_id = ? AND action_id = ?")
            .bind(tenant.as_str())
            .bind(action.to_string())
            .fetch_optional(&self.read)
            .await
            .map_err(db_err)
            .map(Option::flatten)
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
        // Revision and incarnation: a device deleted and created again
        // starts at revision 1 once more.
        let done = sqlx::query(
            "UPDATE devices SET observed = ?, observed_ns = ?
             WHERE tenant_id = ? AND device_id = ? AND revision = ? AND incarnation = ?",
        )
        .bind(rows::observed_json(o))
        .bind(o.at.0)
        .bind(tenant.as_str())
        .bind(device.id.as_str())
        .bind(device.revision)
        .bind(&device.incarnation)
        .execute(&self.write)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    /// Devices last observed before `before` (or never), oldest first.
    pub async fn devices_to_observe(
        &self,
        before: Ts,
        limit: u32,
    ) -> Result<Vec<(TenantId, Device)>, Error> {
        let rs = sqlx::query(
            "SELECT * FROM devices WHERE observed_ns IS NULL OR observed_ns < ? ORDER BY COALESCE(observed_ns, 0) LIMIT ?",
        )
        .bind(before.0)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_err)?;
        rs.iter()
            .map(|r| {
                Ok((
                    TenantId::from_stored(rows::col(r, "tenant_id")?),
                    rows::device_from_row(r)?,
                ))
            })
            .collect()
    }

    /// A device by tenant and id (for the dispatcher).
    pub async fn device_for(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<Device>, Error> {
        rows::fetch_device(&self.read, tenant, id).await
    }
}
