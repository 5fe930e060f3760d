//! Actions: a push decided and booked in one transaction, reads, pages,
//! a client's cancel, and the audit trail.

use super::{IdemCommit, Store, check_etag, db_err, not_found, rows};
use crate::domain::{
    Action, ActionId, ActionState, Device, DeviceId, Error, Strategy, TenantId, Transition, Ts,
    conflict::{self, Holder},
    lifecycle,
    validate::ValidPush,
};

/// The outcome of a push.
#[derive(Clone, Debug, PartialEq)]
pub struct PushOutcome {
    /// The booked (or, for validate_only, would-be) action.
    pub action: Action,
    /// Actions cancelled by CANCEL_AND_REPLACE.
    pub cancelled: Vec<Action>,
    /// Actions it was queued after.
    pub queued_after: Vec<ActionId>,
}

/// A page request over actions.
#[derive(Clone, Debug)]
pub struct ActionQuery<'a> {
    /// One device, or all.
    pub device: Option<&'a DeviceId>,
    /// States to include; empty = all.
    pub states: &'a [ActionState],
    /// Continue strictly before this id (newest first).
    pub before: Option<ActionId>,
    /// Page size.
    pub limit: u32,
}

impl Store {
    /// Books a push. `prepare` validates it against the device as stored
    /// now, at the transaction's `now`; the collision is decided from the
    /// channel's holders read in the same transaction. With
    /// `validate_only`, the answer is computed the same way and nothing is
    /// written.
    pub async fn push(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        prepare: impl FnOnce(&Device, Ts) -> Result<ValidPush, Error>,
        strategy: Strategy,
        validate_only: bool,
        idem: Option<IdemCommit<PushOutcome>>,
    ) -> Result<PushOutcome, Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let device = rows::fetch_device(&mut *tx, tenant, device_id)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: device_id.to_string(),
            })?;
        let push = prepare(&device, now)?;
        // Only holders that can matter: those still holding after the push
        // starts. Later ones are needed too, even without a strategy: the
        // error must say whether QUEUE_AFTER would resolve the collision.
        let holding = rows::holding_actions(
            &mut tx,
            tenant,
            device_id,
            rows::HoldingFilter {
                channel: Some(&push.channel),
                ending_after: Some(push.start),
            },
        )
        .await?;
        let holders: Vec<Holder> = holding
            .iter()
            .map(|a| Holder {
                id: a.id,
                // A cancelled one here is still being reverted: in flight.
                state: a.state,
                command: a.command,
                start: a.start,
                end: a.end,
            })
            .collect();
        let plan = conflict::decide(
            device_id.as_str(),
            &push.channel,
            push.start,
            push.end,
            &holders,
            strategy,
        )
        .map_err(Error::Conflict)?;

        let moved = plan.start != push.start;
        let immediate = push.immediate && !moved;
        let action = Action {
            id: ActionId::generate(),
            device_id: device_id.clone(),
            channel: push.channel.clone(),
            command: push.command,
            params: push.params,
            start: plan.start,
            end: plan.end,
            immediate,
            state: if immediate {
                ActionState::Acknowledged
            } else {
                ActionState::Scheduled
            },
            replaced_by: None,
            queued_after: plan.queued_after.clone(),
            error_code: None,
            error_message: None,
            oem_response: None,
            verified: false,
            revision: 1,
            created: now,
            updated: now,
        };
        let replaced: Vec<lifecycle::Change> = holding
            .iter()
            .filter(|a| plan.cancel.contains(&a.id))
            .map(|a| lifecycle::replace(a, action.id, now))
            .collect();
        let cancelled: Vec<Action> = replaced.iter().map(|c| c.action.clone()).collect();
        let outcome = PushOutcome {
            action,
            cancelled,
            queued_after: plan.queued_after,
        };
        if validate_only {
            return Ok(outcome);
        }

        let request_id = idem.as_ref().map(|i| i.request_id.clone());
        for c in &replaced {
            rows::update_action_state(&mut tx, tenant, &c.action).await?;
            let (work, due) = c.work.map_or((None, None), |(w, at)| (Some(w), Some(at)));
            rows::set_work(&mut tx, tenant, &c.action.id, work, due, 0).await?;
            if let Some(t) = &c.transition {
                rows::audit(&mut tx, tenant, t, request_id.as_deref(), now).await?;
            }
        }
        rows::insert_action(
            &mut tx,
            tenant,
            &outcome.action,
            strategy == Strategy::CancelAndReplace,
        )
        .await?;
        let reason = lifecycle::push_reason(
            strategy,
            !outcome.cancelled.is_empty(),
            !outcome.queued_after.is_empty(),
        );
        rows::audit(
            &mut tx,
            tenant,
            &Transition {
                action_id: outcome.action.id,
                device_id: device_id.clone(),
                from: None,
                to: outcome.action.state,
                reason: reason.to_owned(),
            },
            request_id.as_deref(),
            now,
        )
        .await?;
        Self::idem_complete(&mut tx, tenant, idem, &outcome).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(outcome)
    }

    /// One action of a device.
    pub async fn get_action(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        action_id: &ActionId,
    ) -> Result<Action, Error> {
        rows::fetch_action(&self.read, tenant, device_id, action_id)
            .await?
            .ok_or_else(|| not_found(device_id, action_id))
    }

    /// Actions, newest first.
    pub async fn list_actions(
        &self,
        tenant: &TenantId,
        q: ActionQuery<'_>,
    ) -> Result<Vec<Action>, Error> {
        let states: String = if q.states.is_empty() {
            String::new()
        } else {
            let mut s = String::from(",");
            for st in q.states {
                s.push_str(st.as_str());
                s.push(',');
            }
            s
        };
        let before = q
            .before
            .map(|b| b.to_string())
            .unwrap_or_else(|| "~".to_owned());
        let rs = sqlx::query(
            "SELECT * FROM actions WHERE tenant_id = ?1
               AND (?2 = '' OR device_id = ?2)
               AND (?3 = '' OR instr(?3, ',' || state || ',') > 0)
               AND action_id < ?4
             ORDER BY action_id DESC LIMIT ?5",
        )
        .bind(tenant.as_str())
        .bind(q.device.map(DeviceId::as_str).unwrap_or(""))
        .bind(states)
        .bind(before)
        .bind(i64::from(q.limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_err)?;
        rs.iter().map(rows::action_from_row).collect()
    }

    /// Cancels a SCHEDULED action, or stops an ACTIVE one early (its revert
    /// is left to the dispatcher).
    pub async fn cancel_action(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        action_id: &ActionId,
        etag: Option<&str>,
        idem: Option<IdemCommit<Action>>,
    ) -> Result<Action, Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let mut action = rows::fetch_action(&mut *tx, tenant, device_id, action_id)
            .await?
            .ok_or_else(|| not_found(device_id, action_id))?;
        // An already-cancelled action is answered as such even when the
        // etag is stale: a retried conditional cancel learns it succeeded.
        if action.state != ActionState::Cancelled {
            check_etag(etag, &action.etag(), || {
                format!("devices/{device_id}/actions/{action_id}")
            })?;
        }
        // A SCHEDULED action was never applied; an ACTIVE one is reverted
        // now, and holds its channel until that is done.
        let change = lifecycle::cancel_by_client(&action, now)?;
        action = change.action;
        rows::update_action_state(&mut tx, tenant, &action).await?;
        let (work, due) = change
            .work
            .map_or((None, None), |(w, at)| (Some(w), Some(at)));
        rows::set_work(&mut tx, tenant, &action.id, work, due, 0).await?;
        if let Some(t) = &change.transition {
            rows::audit(
                &mut tx,
                tenant,
                t,
                idem.as_ref().map(|i| i.request_id.as_str()),
                now,
            )
            .await?;
        }
        Self::idem_complete(&mut tx, tenant, idem, &action).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(action)
    }

    /// The audit trail of an action: (from, to, reason), oldest first.
    pub async fn action_history(
        &self,
        tenant: &TenantId,
        action_id: &ActionId,
    ) -> Result<Vec<(Option<String>, String, String)>, Error> {
        let rs = sqlx::query(
            "SELECT from_state, to_state, reason FROM audit_log WHERE tenant_id = ? AND action_id = ? ORDER BY seq",
        )
        .bind(tenant.as_str())
        .bind(action_id.to_string())
        .fetch_all(&self.read)
        .await
        .map_err(db_err)?;
        rs.iter()
            .map(|r| {
                Ok((
                    rows::col(r, "from_state")?,
                    rows::col(r, "to_state")?,
                    rows::col(r, "reason")?,
                ))
            })
            .collect()
    }
}
