//! Events: the audit log, written in the same transaction as every change
//! it records, read back in commit order (docs/events.md, ADR 0013).
//!
//! An event's cursor must only grow in the order readers can see entries,
//! or a watcher resuming from the last cursor it saw would skip one that
//! committed later with a smaller number.
//! - SQLite: writers take turns (one write transaction at a time, across
//!   processes too), so an entry's `seq` is its commit order: the cursor.
//! - PostgreSQL: a sequence value is taken at insert, and transactions
//!   commit in any order. Committed entries are stamped with
//!   `event_cursor` afterwards ([`Store::stamp_events`]), by one stamping
//!   transaction at a time (an advisory lock), numbering on from the
//!   largest cursor given: a watcher sees a stamp only once its
//!   transaction has committed, and every smaller cursor committed with it
//!   or before.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Statement, sea_query::Expr,
};

use super::{
    Store, db_err,
    entity::{audit, event_horizon},
    rows,
};
use crate::domain::{DeviceId, Error, TenantId, Ts};

/// Entries stamped per PostgreSQL stamping transaction.
const STAMP_BATCH: i64 = 5_000;

/// Key of the advisory lock the PostgreSQL stamping holds.
const STAMP_LOCK: i64 = 7_317_402_964_115_318_009;

/// One event: an audit entry read in commit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// Increasing in commit order, per store (so per tenant too).
    pub cursor: i64,
    pub device_id: String,
    /// `None` for a device's own change.
    pub action_id: Option<String>,
    /// The state left (`None`: created) and entered; for a device's change,
    /// `None` and `CREATED`, `UPDATED` or `DELETED`.
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    pub request_id: Option<String>,
    pub at: Ts,
    /// For an event about a webhook endpoint (its disabling): its id.
    pub endpoint_id: Option<String>,
}

impl Store {
    /// Whether committed audit entries need stamping with their event
    /// cursor ([`Store::stamp_events`]): on PostgreSQL.
    pub fn stamps_events(&self) -> bool {
        self.backend() == DbBackend::Postgres
    }

    /// PostgreSQL: stamps committed, unstamped audit entries with their
    /// event cursor, a batch at a time, unless another stamping holds the
    /// lock; returns how many. SQLite: nothing to do (the cursor is `seq`).
    pub async fn stamp_events(&self) -> Result<u64, Error> {
        if !self.stamps_events() {
            return Ok(0);
        }
        self.retrying(|| async {
            let tx = self.begin().await?;
            let locked = tx
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT pg_try_advisory_xact_lock({STAMP_LOCK}) AS locked"),
                ))
                .await
                .map_err(db_err)?
                .map(|r| r.try_get::<bool>("", "locked"))
                .transpose()
                .map_err(db_err)?
                .unwrap_or(false);
            if !locked {
                return Ok(0);
            }
            let stamped = tx
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "UPDATE audit_log a SET event_cursor = b.m + n.rn \
                     FROM (SELECT seq, row_number() OVER (ORDER BY seq) AS rn \
                           FROM (SELECT seq FROM audit_log WHERE event_cursor IS NULL \
                                 ORDER BY seq LIMIT $1) t) n, \
                          (SELECT GREATEST( \
                             (SELECT COALESCE(MAX(event_cursor), 0) FROM audit_log \
                              WHERE event_cursor IS NOT NULL), \
                             (SELECT COALESCE(MAX(pruned_through), 0) FROM event_horizon)) AS m) b \
                     WHERE a.seq = n.seq",
                    [STAMP_BATCH.into()],
                ))
                .await
                .map_err(db_err)?
                .rows_affected();
            tx.commit().await.map_err(db_err)?;
            Ok(stamped)
        })
        .await
        .inspect(|n| {
            if *n > 0 {
                self.lanes.changed().notify_waiters();
            }
        })
    }

    /// Woken when this process commits changes that may be events (on
    /// PostgreSQL: when it stamps some); other processes' are found by
    /// polling.
    pub fn changed(&self) -> &tokio::sync::Notify {
        self.lanes.changed()
    }

    /// Tells this process's event watchers that a commit may have written
    /// events.
    pub(super) fn wrote_events(&self) {
        if self.backend() != DbBackend::Postgres {
            self.lanes.changed().notify_waiters();
        }
    }

    /// The tenant's entries, as events are read: by `audit_by_tenant
    /// (tenant_id, seq)` on SQLite (migration 17) and `audit_events
    /// (tenant_id, event_cursor)` on PostgreSQL, so a watch, however quiet
    /// its tenant, reads only its tenant's rows after its cursor.
    fn of_tenant(&self, tenant: &TenantId) -> sea_orm::sea_query::SimpleExpr {
        audit::Column::TenantId.eq(tenant.as_str())
    }

    pub(super) fn cursor_column(&self) -> audit::Column {
        match self.backend() {
            DbBackend::Postgres => audit::Column::EventCursor,
            _ => audit::Column::Seq,
        }
    }

    /// The tenant's events after `after`, oldest first, at most `limit`;
    /// only `device`'s when given.
    pub async fn events_after(
        &self,
        tenant: &TenantId,
        after: i64,
        device: Option<&DeviceId>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, Error> {
        let cursor = self.cursor_column();
        let postgres = self.backend() == DbBackend::Postgres;
        self.bounded(async {
            let mut select = audit::Entity::find()
                .filter(self.of_tenant(tenant))
                .filter(cursor.gt(after));
            if let Some(d) = device {
                select = select.filter(audit::Column::DeviceId.eq(d.as_str()));
            }
            let select = select.order_by_asc(cursor).limit(u64::from(limit));
            Ok(rows::all(&self.read, select)
                .await?
                .into_iter()
                .map(|r| EventRecord {
                    cursor: if postgres {
                        r.event_cursor.unwrap_or_default()
                    } else {
                        r.seq
                    },
                    device_id: r.device_id,
                    action_id: r.action_id,
                    from: r.from_state,
                    to: r.to_state,
                    reason: r.reason,
                    request_id: r.request_id,
                    at: Ts(r.at_ns),
                    endpoint_id: r.endpoint_id,
                })
                .collect())
        })
        .await
    }

    /// The tenant's actions of these ids (those still stored), by id.
    pub async fn actions_by_ids(
        &self,
        tenant: &TenantId,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, crate::domain::Action>, Error> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        self.bounded(async {
            let select = rows::actions_of(tenant)
                .filter(super::entity::action::Column::ActionId.is_in(ids.iter().cloned()));
            rows::all(&self.read, select)
                .await?
                .iter()
                .map(|m| rows::action_from_model(m).map(|a| (m.action_id.clone(), a)))
                .collect()
        })
        .await
    }

    /// The cursor of the tenant's newest event readers can see (0: none).
    pub async fn latest_event(&self, tenant: &TenantId) -> Result<i64, Error> {
        let cursor = self.cursor_column();
        self.bounded(async {
            let newest: Vec<Option<i64>> = audit::Entity::find()
                .select_only()
                .column(cursor)
                .filter(self.of_tenant(tenant))
                .filter(cursor.is_not_null())
                .order_by_desc(cursor)
                .limit(1)
                .into_tuple()
                .all(&self.read)
                .await
                .map_err(db_err)?;
            Ok(newest.into_iter().flatten().next().unwrap_or(0))
        })
        .await
    }

    /// The cursor of the tenant's last event forgotten with its action
    /// (0: none): a watcher must resume at or after it.
    pub async fn event_horizon(&self, tenant: &TenantId) -> Result<i64, Error> {
        self.bounded(async {
            let row = rows::first(
                &self.read,
                event_horizon::Entity::find()
                    .filter(event_horizon::Column::TenantId.eq(tenant.as_str())),
            )
            .await?;
            Ok(row.map_or(0, |r| r.pruned_through))
        })
        .await
    }

    /// Records, in the pruning transaction `tx`, that events of `tenant`
    /// up to `through` may be gone.
    pub(super) async fn raise_event_horizon<C: ConnectionTrait>(
        tx: &C,
        tenant: &str,
        through: i64,
    ) -> Result<(), Error> {
        let row = event_horizon::ActiveModel {
            tenant_id: sea_orm::ActiveValue::Set(tenant.to_owned()),
            pruned_through: sea_orm::ActiveValue::Set(through),
        };
        event_horizon::Entity::insert(row)
            .on_conflict(
                sea_orm::sea_query::OnConflict::column(event_horizon::Column::TenantId)
                    .value(
                        event_horizon::Column::PrunedThrough,
                        Expr::cust(
                            "CASE WHEN event_horizon.pruned_through > excluded.pruned_through \
                             THEN event_horizon.pruned_through ELSE excluded.pruned_through END",
                        ),
                    )
                    .to_owned(),
            )
            .exec_without_returning(tx)
            .await
            .map_err(db_err)?;
        Ok(())
    }
}
