//! Actions: a push decided and booked in one transaction, reads, pages,
//! a client's cancel, and the audit trail.

use std::sync::Arc;

use sea_orm::{
    ColumnTrait, ConnectionTrait as _, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};

use super::{
    IdemCommit, IdemRequest, Store, Written, batch, check_etag, db_err,
    entity::action,
    entity::audit,
    idem::{WriteOp, write_op},
    not_found, rows,
};
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

/// One recorded transition of an action (its audit entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitionRecord {
    /// Its place in the audit log: increasing in the order of recording.
    pub seq: i64,
    /// `None` when the action was created by it.
    pub from: Option<ActionState>,
    pub to: ActionState,
    pub reason: String,
    pub request_id: Option<String>,
    pub at: Ts,
}

impl Store {
    /// Books a push. `prepare` validates it against the device as stored
    /// now, at the transaction's `now`; the collision is decided from the
    /// channel's holders read in the same transaction (a member of a group
    /// commit, `group.rs`). With `validate_only`, the answer is computed
    /// the same way from a read transaction and nothing is written.
    pub async fn push(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        prepare: impl Fn(&Device, Ts) -> Result<ValidPush, Error> + Send + Sync + 'static,
        strategy: Strategy,
        validate_only: bool,
        idem: Option<IdemCommit<PushOutcome>>,
    ) -> Result<PushOutcome, Error> {
        if validate_only {
            // A read: it does not queue behind writes, and is rolled back.
            return self
                .bounded(async {
                    let tx = self.read.begin().await.map_err(db_err)?;
                    self.push_in(&tx, tenant, device_id, &prepare, strategy, true, None)
                        .await
                })
                .await;
        }
        let op = self.push_op(tenant, device_id, prepare, strategy);
        self.write(device_id.as_str(), op, idem).await
    }

    /// [`Store::push`] (never `validate_only`) under `request_id`
    /// idempotency: the key checked, then written with the answer, in the
    /// push's own savepoint.
    ///
    /// On PostgreSQL it may be decided and written with the pushes queued
    /// beside it on other devices (`batch.rs`, ADR 0016), exactly as alone.
    pub async fn push_once(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        prepare: impl Fn(&Device, Ts) -> Result<ValidPush, Error> + Send + Sync + 'static,
        strategy: Strategy,
        idem: Option<IdemRequest<PushOutcome>>,
    ) -> Result<Written<PushOutcome>, Error> {
        if self.backend() != DbBackend::Postgres {
            let op = self.push_op(tenant, device_id, prepare, strategy);
            return self.write_once(device_id.as_str(), tenant, op, idem).await;
        }
        let prepare: batch::Prepare = Arc::new(prepare);
        let alone = prepare.clone();
        let op = self.push_op(tenant, device_id, move |d, now| alone(d, now), strategy);
        let spec = Arc::new(batch::PushSpec {
            store: self.clone(),
            tenant: tenant.clone(),
            device_id: device_id.clone(),
            prepare,
            strategy,
            request: idem,
        });
        self.retrying_grouped(|| {
            let (spec, op) = (spec.clone(), op.clone());
            self.queued(device_id.as_str(), move |request| {
                Box::new(batch::PushJob::new(spec, op, request))
            })
        })
        .await
    }

    fn push_op(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        prepare: impl Fn(&Device, Ts) -> Result<ValidPush, Error> + Send + Sync + 'static,
        strategy: Strategy,
    ) -> WriteOp<PushOutcome> {
        let ctx = Arc::new((self.clone(), tenant.clone(), device_id.clone(), prepare));
        write_op(move |tx, idem| {
            let ctx = ctx.clone();
            Box::pin(async move {
                let (store, tenant, device_id, prepare) = &*ctx;
                store
                    .push_in(tx, tenant, device_id, prepare, strategy, false, idem)
                    .await
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_in(
        &self,
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        device_id: &DeviceId,
        prepare: &impl Fn(&Device, Ts) -> Result<ValidPush, Error>,
        strategy: Strategy,
        validate_only: bool,
        idem: Option<&IdemCommit<PushOutcome>>,
    ) -> Result<PushOutcome, Error> {
        let now = self.clock.now();
        let device = rows::fetch_device(tx, tenant, device_id, true)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: device_id.to_string(),
            })?;
        let push = prepare(&device, now)?;
        // Only holders that can matter: those still holding after the push
        // starts. Later ones are needed too, even without a strategy: the
        // error must say whether QUEUE_AFTER would resolve the collision.
        let holding = rows::holding_actions(
            tx,
            tenant,
            device_id,
            rows::HoldingFilter {
                channel: Some(&push.channel),
                ending_after: Some(push.start),
            },
        )
        .await?;
        let decided = decide_push(device_id, push, &holding, strategy, now)?;
        if validate_only {
            return Ok(decided.outcome);
        }
        Self::write_push(tx, tenant, decided, strategy, idem, now).await
    }

    /// Writes a decided push: the holders it replaces, then the action,
    /// its audit entry and the request_id's key with the answer.
    async fn write_push(
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        decided: Decided,
        strategy: Strategy,
        idem: Option<&IdemCommit<PushOutcome>>,
        now: Ts,
    ) -> Result<PushOutcome, Error> {
        let Decided { outcome, replaced } = decided;
        let request_id = idem.map(|i| i.request_id.clone());
        for c in &replaced {
            rows::update_action_state(tx, tenant, &c.action).await?;
            let (work, due) = c.work.map_or((None, None), |(w, at)| (Some(w), Some(at)));
            rows::set_work(tx, tenant, &c.action.id, work, due, 0, now).await?;
            if let Some(t) = &c.transition {
                rows::audit(tx, tenant, t, request_id.as_deref(), now).await?;
            }
        }
        let backend = tx.get_database_backend();
        if backend == DbBackend::Postgres {
            let taken = Self::write_born(tx, tenant, &outcome, strategy, idem, now)
                .await
                .map_err(db_err)?;
            match (taken, idem) {
                (Some(taken), Some(i)) => Self::idem_taken(&i.request_id, taken)?,
                _ => Self::idem_complete(tx, tenant, idem, &outcome).await?,
            }
            return Ok(outcome);
        }
        let born = born(&outcome, strategy);
        let clear_native = strategy == Strategy::CancelAndReplace;
        rows::insert_action(tx, tenant, &outcome.action, clear_native).await?;
        rows::audit(tx, tenant, &born, request_id.as_deref(), now).await?;
        Self::idem_complete(tx, tenant, idem, &outcome).await?;
        Ok(outcome)
    }

    /// PostgreSQL: writes a pushed action, its audit entry and, when it is
    /// written with the answer, the request_id's key, as one statement:
    /// one round trip (a push's statements cost PostgreSQL more each than
    /// their rows do). `Some(rows)`: the key was to be written, and the
    /// rows its upsert took (0: another request took it meanwhile).
    /// The database's own error, for a batch to tell a lost race from a
    /// failure (`batch.rs`).
    pub(super) async fn write_born(
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        outcome: &PushOutcome,
        strategy: Strategy,
        idem: Option<&IdemCommit<PushOutcome>>,
        now: Ts,
    ) -> Result<Option<u64>, sea_orm::DbErr> {
        let backend = DbBackend::Postgres;
        let request_id = idem.map(|i| i.request_id.as_str());
        let clear_native = strategy == Strategy::CancelAndReplace;
        let mut together = vec![
            rows::action_insert(backend, tenant, &outcome.action, clear_native),
            rows::audit_insert(backend, tenant, &born(outcome, strategy), request_id, now),
        ];
        static WITH_KEY: rows::Kept = rows::Kept::new();
        static WITHOUT_KEY: rows::Kept = rows::Kept::new();
        match idem.and_then(|i| Self::idem_answer_statement(backend, tenant, i, outcome)) {
            Some(key) => {
                together.push(key);
                Ok(Some(rows::execute_together(tx, &WITH_KEY, together).await?))
            }
            None => {
                rows::execute_together(tx, &WITHOUT_KEY, together).await?;
                Ok(None)
            }
        }
    }

    /// One action of a device.
    pub async fn get_action(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        action_id: &ActionId,
    ) -> Result<Action, Error> {
        self.bounded(async {
            rows::fetch_action(&self.read, tenant, device_id, action_id, false)
                .await?
                .ok_or_else(|| not_found(device_id, action_id))
        })
        .await
    }

    /// Actions, newest first.
    pub async fn list_actions(
        &self,
        tenant: &TenantId,
        q: ActionQuery<'_>,
    ) -> Result<Vec<Action>, Error> {
        self.bounded(async {
            let mut select = rows::actions_of(tenant);
            if let Some(d) = q.device {
                select = select.filter(action::Column::DeviceId.eq(d.as_str()));
            }
            if !q.states.is_empty() {
                select =
                    select.filter(action::Column::State.is_in(q.states.iter().map(|s| s.as_str())));
            }
            if let Some(b) = q.before {
                select = select.filter(action::Column::ActionId.lt(b.to_string()));
            }
            let select = select
                .order_by_desc(action::Column::ActionId)
                .limit(u64::from(q.limit));
            rows::all(&self.read, select)
                .await?
                .iter()
                .map(rows::action_from_model)
                .collect()
        })
        .await
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
        let op = self.cancel_op(tenant, device_id, action_id, etag);
        self.write(device_id.as_str(), op, idem).await
    }

    /// [`Store::cancel_action`] under `request_id` idempotency: the key
    /// checked, then written with the answer, in the cancel's own
    /// savepoint.
    pub async fn cancel_action_once(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        action_id: &ActionId,
        etag: Option<&str>,
        idem: Option<IdemRequest<Action>>,
    ) -> Result<Written<Action>, Error> {
        let op = self.cancel_op(tenant, device_id, action_id, etag);
        self.write_once(device_id.as_str(), tenant, op, idem).await
    }

    fn cancel_op(
        &self,
        tenant: &TenantId,
        device_id: &DeviceId,
        action_id: &ActionId,
        etag: Option<&str>,
    ) -> WriteOp<Action> {
        let ctx = Arc::new((
            self.clone(),
            tenant.clone(),
            device_id.clone(),
            *action_id,
            etag.map(str::to_owned),
        ));
        write_op(move |tx, idem| {
            let ctx = ctx.clone();
            Box::pin(async move {
                let (store, tenant, device_id, action_id, etag) = &*ctx;
                store
                    .cancel_in(tx, tenant, device_id, action_id, etag.as_deref(), idem)
                    .await
            })
        })
    }

    async fn cancel_in(
        &self,
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        device_id: &DeviceId,
        action_id: &ActionId,
        etag: Option<&str>,
        idem: Option<&IdemCommit<Action>>,
    ) -> Result<Action, Error> {
        let now = self.clock.now();
        // The device's row first: every writer of a device's actions
        // takes it before theirs.
        rows::fetch_device(tx, tenant, device_id, true).await?;
        let mut action = rows::fetch_action(tx, tenant, device_id, action_id, true)
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
        rows::update_action_state(tx, tenant, &action).await?;
        let (work, due) = change
            .work
            .map_or((None, None), |(w, at)| (Some(w), Some(at)));
        rows::set_work(tx, tenant, &action.id, work, due, 0, now).await?;
        if let Some(t) = &change.transition {
            rows::audit(tx, tenant, t, idem.map(|i| i.request_id.as_str()), now).await?;
        }
        Self::idem_complete(tx, tenant, idem, &action).await?;
        Ok(action)
    }

    /// A page of an action's transitions, oldest first: those recorded
    /// after `after` (a [`TransitionRecord::seq`]), at most `limit`.
    pub async fn action_transitions(
        &self,
        tenant: &TenantId,
        action_id: &ActionId,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TransitionRecord>, Error> {
        self.bounded(async {
            let mut select = audit::Entity::find()
                .filter(audit::Column::TenantId.eq(tenant.as_str()))
                .filter(audit::Column::ActionId.eq(action_id.to_string()));
            if let Some(after) = after {
                select = select.filter(audit::Column::Seq.gt(after));
            }
            let select = select
                .order_by_asc(audit::Column::Seq)
                .limit(u64::from(limit));
            rows::all(&self.read, select)
                .await?
                .into_iter()
                .map(|r| {
                    let state = |s: &str| {
                        ActionState::parse(s).ok_or_else(|| {
                            Error::Internal(format!("audit entry {} has state {s:?}", r.seq))
                        })
                    };
                    Ok(TransitionRecord {
                        seq: r.seq,
                        from: r.from_state.as_deref().map(state).transpose()?,
                        to: state(&r.to_state)?,
                        reason: r.reason.clone(),
                        request_id: r.request_id.clone(),
                        at: Ts(r.at_ns),
                    })
                })
                .collect()
        })
        .await
    }

    /// The audit trail of an action: (from, to, reason), oldest first.
    pub async fn action_history(
        &self,
        tenant: &TenantId,
        action_id: &ActionId,
    ) -> Result<Vec<(Option<String>, String, String)>, Error> {
        self.bounded(async {
            let select = audit::Entity::find()
                .filter(audit::Column::TenantId.eq(tenant.as_str()))
                .filter(audit::Column::ActionId.eq(action_id.to_string()))
                .order_by_asc(audit::Column::Seq);
            Ok(rows::all(&self.read, select)
                .await?
                .into_iter()
                .map(|r| (r.from_state, r.to_state, r.reason))
                .collect())
        })
        .await
    }
}

/// A push decided against its channel's holders, not yet written.
pub(super) struct Decided {
    /// The answer: the new action, what it cancels, what it waits for.
    pub(super) outcome: PushOutcome,
    /// The holders it replaces (CANCEL_AND_REPLACE), as they become.
    pub(super) replaced: Vec<lifecycle::Change>,
}

/// Decides `push` on `device_id` against `holding`, the holders of its
/// channel still holding after it starts (read locked), at `now`.
pub(super) fn decide_push(
    device_id: &DeviceId,
    push: ValidPush,
    holding: &[Action],
    strategy: Strategy,
    now: Ts,
) -> Result<Decided, Error> {
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
    Ok(Decided {
        outcome: PushOutcome {
            action,
            cancelled,
            queued_after: plan.queued_after,
        },
        replaced,
    })
}

/// The audit entry that records a push's action coming into being.
fn born(outcome: &PushOutcome, strategy: Strategy) -> Transition {
    let reason = lifecycle::push_reason(
        strategy,
        !outcome.cancelled.is_empty(),
        !outcome.queued_after.is_empty(),
    );
    Transition {
        action_id: outcome.action.id,
        device_id: outcome.action.device_id.clone(),
        from: None,
        to: outcome.action.state,
        reason: reason.to_owned(),
    }
}
