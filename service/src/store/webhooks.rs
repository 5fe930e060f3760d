//! Webhook endpoints and their delivery log (migration 15, docs/events.md).
//!
//! Delivery to an endpoint is claimed like dispatch work: a replica sets
//! `lease_owner` to a fresh token and `lease_until_ns` ahead, and every
//! write it then makes for the endpoint is conditional on still holding
//! that token. A replica that stalls past its lease finds its writes
//! refused and stops; the next claimant starts from the last recorded
//! `delivered_cursor`. Short transactions of their own, outside the
//! group-commit lanes.

use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
    sea_query::Expr,
};

use super::{
    Store, db_err,
    entity::{audit, webhook_attempt, webhook_endpoint as ep},
    rows,
};
use crate::{
    domain::{Error, TenantId, Ts},
    webhooks::SigningSecret,
};

/// A webhook endpoint as stored. Its `Debug` shows no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    pub id: String,
    pub tenant: TenantId,
    pub url: String,
    /// EventType names (`EVENT_TYPE_...`); empty: every type.
    pub event_types: Vec<String>,
    pub description: String,
    pub enabled: bool,
    /// `BY_USER`, `GONE` or `FAILING` while not enabled.
    pub disabled_reason: Option<String>,
    pub secret: SigningSecret,
    /// A rotated-out secret that still signs, and until when.
    pub previous: Option<(SigningSecret, Ts)>,
    pub delivered_cursor: i64,
    /// Failed attempts at the event after `delivered_cursor`.
    pub attempts: i64,
    pub failing_since: Option<Ts>,
    pub next_attempt: Ts,
    pub created: Ts,
    pub updated: Ts,
}

impl EndpointRecord {
    /// The secrets that sign a message sent at `now`: the current one,
    /// and a rotated-out one until its overlap ends.
    pub fn live_secrets(&self, now: Ts) -> Vec<SigningSecret> {
        let mut s = vec![self.secret.clone()];
        if let Some((old, until)) = &self.previous
            && until.0 > now.0
        {
            s.push(old.clone());
        }
        s
    }

    /// Whether the endpoint is sent events of type `name`.
    pub fn selects(&self, name: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == name)
    }
}

fn record(m: ep::Model) -> EndpointRecord {
    EndpointRecord {
        id: m.endpoint_id,
        tenant: TenantId::from_stored(m.tenant_id),
        url: m.url,
        event_types: m
            .event_types
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        description: m.description,
        enabled: m.enabled,
        disabled_reason: m.disabled_reason,
        secret: SigningSecret::from_bytes(m.secret),
        previous: match (m.previous_secret, m.previous_until_ns) {
            (Some(s), Some(until)) => Some((SigningSecret::from_bytes(s), Ts(until))),
            _ => None,
        },
        delivered_cursor: m.delivered_cursor,
        attempts: m.attempts,
        failing_since: m.failing_since_ns.map(Ts),
        next_attempt: Ts(m.next_attempt_ns),
        created: Ts(m.create_ns),
        updated: Ts(m.update_ns),
    }
}

/// One delivery attempt, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    pub endpoint_id: String,
    pub cursor: i64,
    /// The event's type name.
    pub event_type: String,
    /// 1 for the first attempt at this event.
    pub attempt: i64,
    pub at: Ts,
    /// `DELIVERED`, `FAILED` or `GONE`.
    pub outcome: String,
    /// 0: no answer.
    pub http_status: u16,
    pub latency_us: i64,
    pub error: String,
    pub next_attempt: Option<Ts>,
}

/// What an attempt does to its endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptEffect {
    pub delivered_cursor: i64,
    pub attempts: i64,
    pub failing_since: Option<Ts>,
    pub next_attempt: Ts,
    /// Disables the endpoint with this reason (`GONE`, `FAILING`), and
    /// writes its EVENT_TYPE_WEBHOOK_ENDPOINT_DISABLED event.
    pub disable: Option<&'static str>,
    /// Gives up the lease (after a failure: the retry is claimed anew).
    pub release: bool,
}

/// A change to an endpoint by its owner; `None` keeps a field.
#[derive(Clone, Debug, Default)]
pub struct EndpointChange {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub enabled: Option<bool>,
    pub description: Option<String>,
}

/// An endpoint due for delivery: not leased, enabled, no retry pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DueEndpoint {
    pub id: String,
    pub tenant: TenantId,
    pub delivered_cursor: i64,
}

fn attempt_row(tenant: &TenantId, a: &AttemptRecord) -> webhook_attempt::ActiveModel {
    webhook_attempt::ActiveModel {
        attempt_id: NotSet,
        endpoint_id: Set(a.endpoint_id.clone()),
        tenant_id: Set(tenant.as_str().to_owned()),
        event_cursor: Set(a.cursor),
        event_type: Set(a.event_type.clone()),
        attempt: Set(a.attempt),
        at_ns: Set(a.at.0),
        outcome: Set(a.outcome.clone()),
        http_status: Set(i64::from(a.http_status)),
        latency_us: Set(a.latency_us),
        error: Set(a.error.clone()),
        next_attempt_ns: Set(a.next_attempt.map(|t| t.0)),
    }
}

fn of_tenant(tenant: &TenantId, id: &str) -> Condition {
    Condition::all()
        .add(ep::Column::TenantId.eq(tenant.as_str()))
        .add(ep::Column::EndpointId.eq(id))
}

fn held_by(id: &str, owner: &str) -> Condition {
    Condition::all()
        .add(ep::Column::EndpointId.eq(id))
        .add(ep::Column::LeaseOwner.eq(owner))
}

impl Store {
    /// Stores a new endpoint, unless its tenant has `limit` already.
    pub async fn create_webhook(&self, e: &EndpointRecord, limit: u32) -> Result<(), Error> {
        let row = ep::ActiveModel {
            endpoint_id: Set(e.id.clone()),
            tenant_id: Set(e.tenant.as_str().to_owned()),
            url: Set(e.url.clone()),
            event_types: Set(e.event_types.join(",")),
            description: Set(e.description.clone()),
            enabled: Set(e.enabled),
            disabled_reason: Set(e.disabled_reason.clone()),
            secret: Set(e.secret.bytes().to_vec()),
            previous_secret: Set(None),
            previous_until_ns: Set(None),
            delivered_cursor: Set(e.delivered_cursor),
            attempts: Set(0),
            failing_since_ns: Set(None),
            next_attempt_ns: Set(e.next_attempt.0),
            lease_owner: Set(None),
            lease_until_ns: Set(None),
            create_ns: Set(e.created.0),
            update_ns: Set(e.updated.0),
        };
        self.retrying(|| async {
            let tx = self.begin().await?;
            if self.backend() == sea_orm::DbBackend::Postgres {
                // Creates of one tenant take turns, so two cannot both
                // count one below the cap.
                tx.execute_raw(sea_orm::Statement::from_sql_and_values(
                    sea_orm::DbBackend::Postgres,
                    "SELECT pg_advisory_xact_lock(hashtext('webhooks:' || $1))",
                    [e.tenant.as_str().into()],
                ))
                .await
                .map_err(db_err)?;
            }
            let n = ep::Entity::find()
                .filter(ep::Column::TenantId.eq(e.tenant.as_str()))
                .count(&tx)
                .await
                .map_err(db_err)?;
            if n >= u64::from(limit) {
                return Err(Error::TooManyWebhookEndpoints { limit });
            }
            ep::Entity::insert(row.clone())
                .exec_without_returning(&tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
        .await
    }

    /// The tenant's endpoint of that id.
    pub async fn get_webhook(&self, tenant: &TenantId, id: &str) -> Result<EndpointRecord, Error> {
        let row = self
            .bounded(rows::first(
                &self.read,
                ep::Entity::find().filter(of_tenant(tenant, id)),
            ))
            .await?;
        row.map(record)
            .ok_or_else(|| Error::WebhookEndpointNotFound {
                endpoint_id: id.to_owned(),
            })
    }

    /// The tenant's endpoints with ids after `after`, by id (ids grow with
    /// time), at most `limit`.
    pub async fn list_webhooks(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<EndpointRecord>, Error> {
        let mut select = ep::Entity::find().filter(ep::Column::TenantId.eq(tenant.as_str()));
        if let Some(a) = after {
            select = select.filter(ep::Column::EndpointId.gt(a));
        }
        let select = select
            .order_by_asc(ep::Column::EndpointId)
            .limit(u64::from(limit));
        let rows = self.bounded(rows::all(&self.read, select)).await?;
        Ok(rows.into_iter().map(record).collect())
    }

    /// Applies its owner's `change` to an endpoint at `now`. Enabling a
    /// disabled endpoint resets its retry state; disabling one ends any
    /// delivery in progress at its next step.
    pub async fn update_webhook(
        &self,
        tenant: &TenantId,
        id: &str,
        change: &EndpointChange,
        now: Ts,
    ) -> Result<EndpointRecord, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let Some(row) =
                rows::first(&tx, ep::Entity::find().filter(of_tenant(tenant, id))).await?
            else {
                return Err(Error::WebhookEndpointNotFound {
                    endpoint_id: id.to_owned(),
                });
            };
            let mut m: ep::ActiveModel = row.clone().into();
            if let Some(u) = &change.url
                && *u != row.url
            {
                // A new receiver starts with a clean slate.
                m.url = Set(u.clone());
                m.attempts = Set(0);
                m.failing_since_ns = Set(None);
                m.next_attempt_ns = Set(now.0);
            }
            if let Some(t) = &change.event_types {
                m.event_types = Set(t.join(","));
            }
            if let Some(d) = &change.description {
                m.description = Set(d.clone());
            }
            match change.enabled {
                Some(true) if !row.enabled => {
                    m.enabled = Set(true);
                    m.disabled_reason = Set(None);
                    m.attempts = Set(0);
                    m.failing_since_ns = Set(None);
                    m.next_attempt_ns = Set(now.0);
                }
                Some(false) if row.enabled => {
                    m.enabled = Set(false);
                    m.disabled_reason = Set(Some("BY_USER".into()));
                }
                _ => {}
            }
            m.update_ns = Set(now.0);
            ep::Entity::update(m).exec(&tx).await.map_err(db_err)?;
            let row = rows::first(&tx, ep::Entity::find().filter(of_tenant(tenant, id))).await?;
            tx.commit().await.map_err(db_err)?;
            row.map(record)
                .ok_or_else(|| Error::Internal("an updated webhook endpoint vanished".into()))
        })
        .await
    }

    /// Gives an endpoint a new secret; the current one keeps signing until
    /// `old_until` (not at all when that is not after `now`).
    pub async fn rotate_webhook_secret(
        &self,
        tenant: &TenantId,
        id: &str,
        new: &SigningSecret,
        old_until: Ts,
        now: Ts,
    ) -> Result<EndpointRecord, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let Some(row) =
                rows::first(&tx, ep::Entity::find().filter(of_tenant(tenant, id))).await?
            else {
                return Err(Error::WebhookEndpointNotFound {
                    endpoint_id: id.to_owned(),
                });
            };
            let overlap = old_until.0 > now.0;
            let mut m: ep::ActiveModel = row.clone().into();
            m.previous_secret = Set(overlap.then(|| row.secret.clone()));
            m.previous_until_ns = Set(overlap.then_some(old_until.0));
            m.secret = Set(new.bytes().to_vec());
            m.update_ns = Set(now.0);
            ep::Entity::update(m).exec(&tx).await.map_err(db_err)?;
            let row = rows::first(&tx, ep::Entity::find().filter(of_tenant(tenant, id))).await?;
            tx.commit().await.map_err(db_err)?;
            row.map(record)
                .ok_or_else(|| Error::Internal("a rotated webhook endpoint vanished".into()))
        })
        .await
    }

    /// Deletes an endpoint and its delivery log.
    pub async fn delete_webhook(&self, tenant: &TenantId, id: &str) -> Result<(), Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let n = ep::Entity::delete_many()
                .filter(of_tenant(tenant, id))
                .exec(&tx)
                .await
                .map_err(db_err)?
                .rows_affected;
            if n == 0 {
                return Err(Error::WebhookEndpointNotFound {
                    endpoint_id: id.to_owned(),
                });
            }
            tx.commit().await.map_err(db_err)
        })
        .await
    }

    /// Forgets, oldest first, at most `batch` of endpoint `id`'s logged
    /// attempts (only those before attempt `before`, when given); returns
    /// how many. Short transactions: a long log is forgotten a batch at a
    /// time, without holding writers up.
    pub async fn forget_webhook_attempts(
        &self,
        id: &str,
        before: Option<i64>,
        batch: u32,
    ) -> Result<u64, Error> {
        let mut which = Condition::all().add(webhook_attempt::Column::EndpointId.eq(id));
        if let Some(b) = before {
            which = which.add(webhook_attempt::Column::AttemptId.lt(b));
        }
        self.forget_attempts(which, webhook_attempt::Column::AttemptId, batch)
            .await
    }

    /// Forgets, in one short transaction, at most `batch` of the logged
    /// attempts `which` selects, the first by `oldest_first`; returns how
    /// many.
    async fn forget_attempts(
        &self,
        which: Condition,
        oldest_first: webhook_attempt::Column,
        batch: u32,
    ) -> Result<u64, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let ids: Vec<i64> = webhook_attempt::Entity::find()
                .select_only()
                .column(webhook_attempt::Column::AttemptId)
                .filter(which.clone())
                .order_by_asc(oldest_first)
                .limit(u64::from(batch))
                .into_tuple()
                .all(&tx)
                .await
                .map_err(db_err)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let n = webhook_attempt::Entity::delete_many()
                .filter(webhook_attempt::Column::AttemptId.is_in(ids))
                .exec(&tx)
                .await
                .map_err(db_err)?
                .rows_affected;
            tx.commit().await.map_err(db_err)?;
            Ok(n)
        })
        .await
    }

    /// Every endpoint's attempts beyond its newest `keep` are forgotten, a
    /// batch per transaction; returns how many.
    pub async fn cap_webhook_attempts(&self, keep: u64, batch: u32) -> Result<u64, Error> {
        let ids: Vec<String> = self
            .bounded(async {
                ep::Entity::find()
                    .select_only()
                    .column(ep::Column::EndpointId)
                    .into_tuple()
                    .all(&self.read)
                    .await
                    .map_err(db_err)
            })
            .await?;
        let mut total = 0;
        for id in ids {
            let oldest_kept: Option<i64> = self
                .bounded(async {
                    webhook_attempt::Entity::find()
                        .select_only()
                        .column(webhook_attempt::Column::AttemptId)
                        .filter(webhook_attempt::Column::EndpointId.eq(id.as_str()))
                        .order_by_desc(webhook_attempt::Column::AttemptId)
                        .offset(keep.saturating_sub(1))
                        .limit(1)
                        .into_tuple()
                        .one(&self.read)
                        .await
                        .map_err(db_err)
                })
                .await?;
            let Some(oldest_kept) = oldest_kept else {
                continue;
            };
            loop {
                let n = self
                    .forget_webhook_attempts(&id, Some(oldest_kept), batch)
                    .await?;
                total += n;
                if n < u64::from(batch) {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// An endpoint's attempts before attempt `before` (the newest with
    /// `None`), newest first, at most `limit`; with each, its id.
    pub async fn list_webhook_attempts(
        &self,
        tenant: &TenantId,
        id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(i64, AttemptRecord)>, Error> {
        let mut select = webhook_attempt::Entity::find()
            .filter(webhook_attempt::Column::EndpointId.eq(id))
            .filter(webhook_attempt::Column::TenantId.eq(tenant.as_str()));
        if let Some(b) = before {
            select = select.filter(webhook_attempt::Column::AttemptId.lt(b));
        }
        let select = select
            .order_by_desc(webhook_attempt::Column::AttemptId)
            .limit(u64::from(limit));
        let rows = self.bounded(rows::all(&self.read, select)).await?;
        Ok(rows
            .into_iter()
            .map(|m| {
                (
                    m.attempt_id,
                    AttemptRecord {
                        endpoint_id: m.endpoint_id,
                        cursor: m.event_cursor,
                        event_type: m.event_type,
                        attempt: m.attempt,
                        at: Ts(m.at_ns),
                        outcome: m.outcome,
                        http_status: u16::try_from(m.http_status).unwrap_or(0),
                        latency_us: m.latency_us,
                        error: m.error,
                        next_attempt: m.next_attempt_ns.map(Ts),
                    },
                )
            })
            .collect())
    }

    /// Endpoints that may have events to deliver at `now`: enabled, no
    /// retry pending after `now`, not leased; oldest claim first, at most
    /// `limit`.
    pub async fn due_webhooks(&self, now: Ts, limit: u32) -> Result<Vec<DueEndpoint>, Error> {
        let select = ep::Entity::find()
            .filter(ep::Column::Enabled.eq(true))
            .filter(ep::Column::NextAttemptNs.lte(now.0))
            .filter(
                Condition::any()
                    .add(ep::Column::LeaseUntilNs.is_null())
                    .add(ep::Column::LeaseUntilNs.lt(now.0)),
            )
            .order_by_asc(ep::Column::NextAttemptNs)
            .limit(u64::from(limit));
        let rows = self.bounded(rows::all(&self.read, select)).await?;
        Ok(rows
            .into_iter()
            .map(|m| DueEndpoint {
                id: m.endpoint_id,
                tenant: TenantId::from_stored(m.tenant_id),
                delivered_cursor: m.delivered_cursor,
            })
            .collect())
    }

    /// Claims delivery to endpoint `id` for `owner` until `until`, if it is
    /// still enabled, due and not leased at `now`.
    pub async fn claim_webhook(
        &self,
        id: &str,
        owner: &str,
        now: Ts,
        until: Ts,
    ) -> Result<bool, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let n = ep::Entity::update_many()
                .col_expr(ep::Column::LeaseOwner, Expr::value(owner))
                .col_expr(ep::Column::LeaseUntilNs, Expr::value(until.0))
                .filter(ep::Column::EndpointId.eq(id))
                .filter(ep::Column::Enabled.eq(true))
                .filter(ep::Column::NextAttemptNs.lte(now.0))
                .filter(
                    Condition::any()
                        .add(ep::Column::LeaseUntilNs.is_null())
                        .add(ep::Column::LeaseUntilNs.lt(now.0)),
                )
                .exec(&tx)
                .await
                .map_err(db_err)?
                .rows_affected;
            tx.commit().await.map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    /// Extends `owner`'s lease on endpoint `id` to `until` and reads the
    /// endpoint; `None` if the lease was lost or the endpoint disabled or
    /// deleted (delivery must stop).
    pub async fn renew_webhook(
        &self,
        id: &str,
        owner: &str,
        until: Ts,
    ) -> Result<Option<EndpointRecord>, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let n = ep::Entity::update_many()
                .col_expr(ep::Column::LeaseUntilNs, Expr::value(until.0))
                .filter(held_by(id, owner))
                .filter(ep::Column::Enabled.eq(true))
                .exec(&tx)
                .await
                .map_err(db_err)?
                .rows_affected;
            let row = if n == 1 {
                rows::first(&tx, ep::Entity::find().filter(held_by(id, owner))).await?
            } else {
                None
            };
            tx.commit().await.map_err(db_err)?;
            Ok(row.map(record))
        })
        .await
    }

    /// Gives up `owner`'s lease on endpoint `id`; it is claimable again at
    /// `next` (at once with `None`).
    pub async fn release_webhook(
        &self,
        id: &str,
        owner: &str,
        next: Option<Ts>,
    ) -> Result<(), Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let mut update = ep::Entity::update_many()
                .col_expr(ep::Column::LeaseOwner, Expr::value(Option::<String>::None))
                .col_expr(ep::Column::LeaseUntilNs, Expr::value(Option::<i64>::None));
            if let Some(t) = next {
                update = update.col_expr(ep::Column::NextAttemptNs, Expr::value(t.0));
            }
            update
                .filter(held_by(id, owner))
                .exec(&tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
        .await
    }

    /// Parks endpoint `id` of `tenant` (claimed by `owner`, or by no one
    /// with `None`) if it has delivered every event of its tenant up to
    /// `cursor` and none after it is visible: it is then left out of
    /// [`Store::due_webhooks`] until [`Store::unpark_webhooks`] wakes it.
    /// With nothing left to send, a retry pending is moot: its state is
    /// reset. Releases `owner`'s lease either way.
    ///
    /// Checked and written in one statement: on SQLite writers take turns,
    /// so an event commits before it (and is seen) or after it (and finds
    /// the endpoint parked). On PostgreSQL an event stamped while the
    /// statement commits could be missed by both it and a concurrent wake,
    /// so the tenant's newest event is read again once it has committed,
    /// and the endpoint woken if there is one after `cursor`.
    pub async fn park_webhook(
        &self,
        tenant: &TenantId,
        id: &str,
        owner: Option<&str>,
        cursor: i64,
        now: Ts,
    ) -> Result<bool, Error> {
        let column = match self.backend() {
            sea_orm::DbBackend::Postgres => "event_cursor",
            _ => "seq",
        };
        let none_newer = Expr::cust(format!(
            "NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.tenant_id = webhook_endpoints.tenant_id \
             AND a.{column} > webhook_endpoints.delivered_cursor)"
        ));
        let parked = self
            .retrying(|| async {
                let tx = self.begin().await?;
                let mut update = ep::Entity::update_many()
                    .col_expr(ep::Column::NextAttemptNs, Expr::value(PARKED))
                    .col_expr(ep::Column::Attempts, Expr::value(0i64))
                    .col_expr(ep::Column::FailingSinceNs, Expr::value(Option::<i64>::None))
                    .col_expr(ep::Column::LeaseOwner, Expr::value(Option::<String>::None))
                    .col_expr(ep::Column::LeaseUntilNs, Expr::value(Option::<i64>::None))
                    .filter(ep::Column::EndpointId.eq(id))
                    .filter(ep::Column::DeliveredCursor.eq(cursor))
                    .filter(ep::Column::Enabled.eq(true))
                    .filter(none_newer.clone());
                update = match owner {
                    Some(o) => update.filter(ep::Column::LeaseOwner.eq(o)),
                    None => update.filter(ep::Column::NextAttemptNs.lte(now.0)).filter(
                        Condition::any()
                            .add(ep::Column::LeaseUntilNs.is_null())
                            .add(ep::Column::LeaseUntilNs.lt(now.0)),
                    ),
                };
                let n = update.exec(&tx).await.map_err(db_err)?.rows_affected;
                tx.commit().await.map_err(db_err)?;
                Ok(n == 1)
            })
            .await?;
        if !parked {
            if let Some(o) = owner {
                self.release_webhook(id, o, None).await?;
            }
            return Ok(false);
        }
        if self.backend() == sea_orm::DbBackend::Postgres
            && self.latest_event(tenant).await? > cursor
        {
            self.retrying(|| async {
                let tx = self.begin().await?;
                ep::Entity::update_many()
                    .col_expr(ep::Column::NextAttemptNs, Expr::value(now.0))
                    .filter(ep::Column::EndpointId.eq(id))
                    .filter(ep::Column::NextAttemptNs.eq(PARKED))
                    .exec(&tx)
                    .await
                    .map_err(db_err)?;
                tx.commit().await.map_err(db_err)
            })
            .await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// The newest event cursor of every tenant (0: none).
    pub async fn event_head(&self) -> Result<i64, Error> {
        let cursor = self.cursor_column();
        self.bounded(async {
            let newest: Vec<Option<i64>> = audit::Entity::find()
                .select_only()
                .column_as(cursor.max(), "newest")
                .into_tuple()
                .all(&self.read)
                .await
                .map_err(db_err)?;
            Ok(newest.into_iter().flatten().next().unwrap_or(0))
        })
        .await
    }

    /// Wakes the parked endpoints of the tenants with events after
    /// `after` and up to `through` (every parked endpoint with `None`):
    /// they have events to look at. One statement, whatever the number of
    /// tenants or endpoints; the write is skipped when a read finds
    /// nothing to wake.
    pub async fn unpark_webhooks(
        &self,
        between: Option<(i64, i64)>,
        now: Ts,
    ) -> Result<u64, Error> {
        let column = match self.backend() {
            sea_orm::DbBackend::Postgres => "event_cursor",
            _ => "seq",
        };
        let (lo, hi) = between.unwrap_or((0, 0));
        // (Two numbers, not input: written into the statement.)
        let active = Expr::cust(format!(
            "tenant_id IN (SELECT DISTINCT a.tenant_id FROM audit_log a \
             WHERE a.{column} > {lo} AND a.{column} <= {hi})"
        ));
        let parked = || {
            let q = ep::Entity::find().filter(ep::Column::NextAttemptNs.eq(PARKED));
            if between.is_some() {
                q.filter(active.clone())
            } else {
                q
            }
        };
        let any: Option<String> = self
            .bounded(async {
                parked()
                    .select_only()
                    .column(ep::Column::EndpointId)
                    .limit(1)
                    .into_tuple()
                    .one(&self.read)
                    .await
                    .map_err(db_err)
            })
            .await?;
        if any.is_none() {
            return Ok(0);
        }
        self.retrying(|| async {
            let tx = self.begin().await?;
            let mut update = ep::Entity::update_many()
                .col_expr(ep::Column::NextAttemptNs, Expr::value(now.0))
                .filter(ep::Column::NextAttemptNs.eq(PARKED));
            if between.is_some() {
                update = update.filter(active.clone());
            }
            let n = update.exec(&tx).await.map_err(db_err)?.rows_affected;
            tx.commit().await.map_err(db_err)?;
            Ok(n)
        })
        .await
    }

    /// Logs an attempt and applies its effect, in one transaction, if
    /// `owner` still holds the endpoint's lease; false (nothing written)
    /// if it does not.
    /// `seen` is the endpoint's `updated` as the deliverer last read it: an
    /// owner's change since (disabled, enabled again, a new URL) makes the
    /// attempt's effect stale, and nothing is written.
    pub async fn record_webhook_attempt(
        &self,
        tenant: &TenantId,
        owner: &str,
        a: &AttemptRecord,
        effect: &AttemptEffect,
        seen: Ts,
    ) -> Result<bool, Error> {
        let written = self
            .retrying(|| async {
                let tx = self.begin().await?;
                let mut update = ep::Entity::update_many()
                    .col_expr(
                        ep::Column::DeliveredCursor,
                        Expr::value(effect.delivered_cursor),
                    )
                    .col_expr(ep::Column::Attempts, Expr::value(effect.attempts))
                    .col_expr(
                        ep::Column::FailingSinceNs,
                        Expr::value(effect.failing_since.map(|t| t.0)),
                    )
                    .col_expr(
                        ep::Column::NextAttemptNs,
                        Expr::value(effect.next_attempt.0),
                    );
                if effect.release || effect.disable.is_some() {
                    update = update
                        .col_expr(ep::Column::LeaseOwner, Expr::value(Option::<String>::None))
                        .col_expr(ep::Column::LeaseUntilNs, Expr::value(Option::<i64>::None));
                }
                if let Some(why) = effect.disable {
                    update = update
                        .col_expr(ep::Column::Enabled, Expr::value(false))
                        .col_expr(ep::Column::DisabledReason, Expr::value(why))
                        .col_expr(ep::Column::UpdateNs, Expr::value(a.at.0));
                }
                let n = update
                    .filter(held_by(&a.endpoint_id, owner))
                    .filter(ep::Column::Enabled.eq(true))
                    .filter(ep::Column::UpdateNs.eq(seen.0))
                    .exec(&tx)
                    .await
                    .map_err(db_err)?
                    .rows_affected;
                if n != 1 {
                    return Ok(false);
                }
                webhook_attempt::Entity::insert(attempt_row(tenant, a))
                    .exec_without_returning(&tx)
                    .await
                    .map_err(db_err)?;
                if let Some(why) = effect.disable {
                    audit::Entity::insert(audit::ActiveModel {
                        seq: NotSet,
                        tenant_id: Set(tenant.as_str().to_owned()),
                        device_id: Set(String::new()),
                        action_id: Set(None),
                        from_state: Set(None),
                        to_state: Set(WEBHOOK_DISABLED.to_owned()),
                        reason: Set(why.to_owned()),
                        request_id: Set(None),
                        at_ns: Set(a.at.0),
                        event_cursor: NotSet,
                        endpoint_id: Set(Some(a.endpoint_id.clone())),
                    })
                    .exec_without_returning(&tx)
                    .await
                    .map_err(db_err)?;
                }
                tx.commit().await.map_err(db_err)?;
                Ok(true)
            })
            .await?;
        if written && effect.disable.is_some() {
            self.wrote_events();
        }
        Ok(written)
    }

    /// Records deliveries `owner` made (every attempt DELIVERED) and moves
    /// the endpoint to `cursor` (past them and the events skipped among
    /// them), in one transaction, if `owner` still holds the lease; false
    /// (nothing written) if it does not.
    pub async fn record_webhook_deliveries(
        &self,
        tenant: &TenantId,
        id: &str,
        owner: &str,
        delivered: &[AttemptRecord],
        cursor: i64,
        now: Ts,
    ) -> Result<bool, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let n = ep::Entity::update_many()
                // Only the lease holder moves it, and only forward.
                .col_expr(ep::Column::DeliveredCursor, Expr::value(cursor))
                .col_expr(ep::Column::Attempts, Expr::value(0i64))
                .col_expr(ep::Column::FailingSinceNs, Expr::value(Option::<i64>::None))
                .col_expr(ep::Column::NextAttemptNs, Expr::value(now.0))
                .filter(held_by(id, owner))
                .exec(&tx)
                .await
                .map_err(db_err)?
                .rows_affected;
            if n != 1 {
                return Ok(false);
            }
            if !delivered.is_empty() {
                webhook_attempt::Entity::insert_many(
                    delivered.iter().map(|a| attempt_row(tenant, a)),
                )
                .exec_without_returning(&tx)
                .await
                .map_err(db_err)?;
            }
            tx.commit().await.map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    /// Forgets delivery attempts made before `cut`, at most `batch`;
    /// returns how many.
    pub async fn prune_webhook_attempts(&self, cut: Ts, batch: u32) -> Result<u64, Error> {
        self.forget_attempts(
            Condition::all().add(webhook_attempt::Column::AtNs.lt(cut.0)),
            webhook_attempt::Column::AtNs,
            batch,
        )
        .await
    }
}

/// `next_attempt_ns` of a parked endpoint: caught up, and left out of
/// [`Store::due_webhooks`] until its tenant has new events.
pub const PARKED: i64 = i64::MAX;

/// The `to_state` of the audit entry that records an endpoint disabled
/// by delivery.
pub const WEBHOOK_DISABLED: &str = "WEBHOOK_DISABLED";
