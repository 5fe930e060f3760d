//! Retention: finished actions are forgotten once old enough, with their
//! audit trail, a small batch per short write transaction, so writers
//! never wait long behind the sweep.

use sea_orm::{
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{Alias, Expr, ExprTrait, LockBehavior, LockType},
};

use super::{
    Store, db_err,
    entity::{action, audit},
    rows,
};
use crate::domain::{ActionState, Error, Ts, codes, lifecycle};

/// The column `finished_ns` (not in the entity: [`rows::FINISHED_NS`]).
fn finished() -> Expr {
    Expr::col(Alias::new(rows::FINISHED_NS))
}

impl Store {
    /// Stamps up to `batch` actions that owe nothing and have no
    /// `finished_ns` (finished before migration 22, or by a replica of an
    /// earlier version) with their last change, as
    /// [`Store::prune_finished`] needs; returns how many. Each batch is a
    /// short write of its own, so writers never wait long behind it.
    pub async fn stamp_finished(&self, batch: u32) -> Result<u64, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            // The partial index `actions_finished_at` holds them (its key
            // NULL). Read first, then written by id: a LIMIT in the
            // UPDATE's subquery may be evaluated more than once.
            let ids: Vec<String> = action::Entity::find()
                .select_only()
                .column(action::Column::ActionId)
                .filter(Expr::cust("work = 'NONE'"))
                .filter(finished().is_null())
                .limit(u64::from(batch))
                .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                .into_tuple()
                .all(&tx)
                .await
                .map_err(db_err)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let done = action::Entity::update_many()
                .col_expr(
                    Alias::new(rows::FINISHED_NS),
                    Expr::col(action::Column::UpdateNs),
                )
                .filter(action::Column::ActionId.is_in(ids.iter().map(String::as_str)))
                .filter(finished().is_null())
                .exec(&tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            Ok(done.rows_affected)
        })
        .await
    }

    /// How many actions owe work yet carry a `finished_ns` (none, ever:
    /// the stamp is cleared whenever work is owed again). For the storage
    /// contract.
    #[cfg(feature = "contract")]
    pub(crate) async fn stamped_while_owed(&self) -> Result<u64, Error> {
        use sea_orm::PaginatorTrait as _;
        action::Entity::find()
            .filter(Expr::cust(rows::OWED_SQL))
            .filter(finished().is_not_null())
            .count(&self.read)
            .await
            .map_err(db_err)
    }

    /// Clears every `finished_ns`, as a version before migration 22 left
    /// its finished rows (for the storage contract); returns how many
    /// rows had one.
    #[cfg(feature = "contract")]
    pub(crate) async fn unstamp_finished(&self) -> Result<u64, Error> {
        let done = action::Entity::update_many()
            .col_expr(
                Alias::new(rows::FINISHED_NS),
                Expr::value(Option::<i64>::None),
            )
            .filter(finished().is_not_null())
            .exec(&self.write)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected)
    }

    /// Deletes up to `batch` finished actions that came to owe nothing
    /// before `before` (stamped: [`Store::stamp_finished`]), with their
    /// audit entries; returns how many. Finished: not
    /// holding a channel ([`lifecycle::holds_channel`]), no work owed, no
    /// claim, no driver memo on record, and not a revert that failed for
    /// good (a write that may still be in force is never forgotten).
    /// Device-level audit entries are kept.
    pub async fn prune_finished(&self, before: Ts, batch: u32) -> Result<u64, Error> {
        let holding: Vec<&'static str> = ActionState::ALL
            .iter()
            .filter(|s| lifecycle::holds_channel(**s, None))
            .map(|s| s.as_str())
            .collect();
        self.retrying(|| async {
            let tx = self.begin().await?;
            let old: Vec<(String, String)> = action::Entity::find()
                .select_only()
                .column(action::Column::TenantId)
                .column(action::Column::ActionId)
                // The partial index `actions_finished_at` (migration 23).
                .filter(Expr::cust("work = 'NONE'"))
                .filter(finished().lt(before.0))
                .filter(action::Column::State.is_not_in(holding.clone()))
                .filter(action::Column::LeaseOwner.is_null())
                .filter(action::Column::DriverMemo.is_null())
                // A revert that failed for good: its command may still be
                // in force, memo or not.
                .filter(
                    action::Column::ErrorCode
                        .is_null()
                        .or(action::Column::ErrorCode.ne(codes::REVERT_FAILED)),
                )
                .order_by_asc(finished())
                .limit(u64::from(batch))
                .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                .into_tuple()
                .all(&tx)
                .await
                .map_err(db_err)?;
            if old.is_empty() {
                return Ok(0);
            }
            let mut by_tenant: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for (tenant, id) in &old {
                by_tenant.entry(tenant).or_default().push(id);
            }
            let mut pruned = 0;
            let cursor = self.cursor_column();
            for (tenant, ids) in by_tenant {
                // Watchers resuming before the last event forgotten are
                // told they missed some (CURSOR_EXPIRED).
                // The rows are locked as read (PostgreSQL): one stamped
                // meanwhile cannot be deleted without raising the horizon
                // to it. One never stamped was never seen by a watcher.
                let cursors: Vec<Option<i64>> = audit::Entity::find()
                    .select_only()
                    .column(cursor)
                    .filter(audit::Column::TenantId.eq(tenant))
                    .filter(audit::Column::ActionId.is_in(ids.iter().copied()))
                    .lock_exclusive()
                    .into_tuple()
                    .all(&tx)
                    .await
                    .map_err(db_err)?;
                if let Some(through) = cursors.into_iter().flatten().max() {
                    Self::raise_event_horizon(&tx, tenant, through).await?;
                }
                audit::Entity::delete_many()
                    .filter(audit::Column::TenantId.eq(tenant))
                    .filter(audit::Column::ActionId.is_in(ids.iter().copied()))
                    .exec(&tx)
                    .await
                    .map_err(db_err)?;
                pruned += action::Entity::delete_many()
                    .filter(action::Column::TenantId.eq(tenant))
                    .filter(action::Column::ActionId.is_in(ids.iter().copied()))
                    .exec(&tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected;
            }
            tx.commit().await.map_err(db_err)?;
            Ok(pruned)
        })
        .await
    }
}
