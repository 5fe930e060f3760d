//! Idempotency keys: a request_id claimed, completed with its response in
//! the transaction that makes the change, replayed, released or swept.

use crate::domain::{Error, TenantId, Ts};

use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::{Expr, ExprTrait, OnConflict},
};

use super::{Store, db_err, entity::idem_key, rows};

/// How long an idempotency key is kept.
pub const IDEMPOTENCY_TTL_NANOS: i64 = 24 * 3600 * Ts::SECOND;
/// How long a request may hold its key "in progress" before a retry may
/// take it over (a crashed server never completes it). Longer than the
/// write connection's 30 s acquire timeout, so a request queued under load
/// keeps its claim.
pub const IDEMPOTENCY_LEASE_NANOS: i64 = 60 * Ts::SECOND;

/// Encodes a mutation's outcome as the response bytes to replay.
pub type EncodeResponse<T> = Box<dyn Fn(&T) -> Vec<u8> + Send + Sync>;

/// Records the response of an idempotent request in the transaction that
/// makes its change, so a retry after a crash can never apply it twice.
pub struct IdemCommit<T> {
    pub request_id: String,
    /// The claim [`Store::idem_begin`] handed out; the response is recorded
    /// only while this claim still holds the key.
    pub claim: String,
    /// Encodes the response from the outcome.
    pub encode: EncodeResponse<T>,
}

/// What the idempotency check found.
#[derive(Debug, PartialEq, Eq)]
pub enum IdemBegin {
    /// First use (or a take-over of an abandoned one): go ahead, holding
    /// this claim.
    Fresh(String),
    /// Same request done before: this is its response.
    Replay(Vec<u8>),
}

impl Store {
    /// Claims `request_id` for a request of `method` with `body`, or finds
    /// its earlier outcome.
    pub async fn idem_begin(
        &self,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
    ) -> Result<IdemBegin, Error> {
        let claim = uuid::Uuid::now_v7().to_string();
        self.idem_begin_as(tenant, request_id, method, body, &claim)
            .await
    }

    /// [`Store::idem_begin`] with the claim chosen by the caller, so that
    /// it can release the key even when the call is dropped while this
    /// runs (releasing a key held under another claim does nothing).
    pub async fn idem_begin_as(
        &self,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
        claim: &str,
    ) -> Result<IdemBegin, Error> {
        let ctx = std::sync::Arc::new((
            self.clone(),
            tenant.clone(),
            request_id.to_owned(),
            method.to_owned(),
            body.to_vec(),
            claim.to_owned(),
        ));
        self.retrying(|| {
            let ctx = ctx.clone();
            self.grouped(request_id, move |tx| {
                Box::pin(async move {
                    let (store, tenant, request_id, method, body, claim) = &*ctx;
                    store
                        .idem_begin_in(tx, tenant, request_id, method, body, claim)
                        .await
                })
            })
        })
        .await
    }

    async fn idem_begin_in(
        &self,
        tx: &sea_orm::DatabaseTransaction,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
        claim: &str,
    ) -> Result<IdemBegin, Error> {
        let now = self.clock.now();
        let key = || {
            sea_orm::Condition::all()
                .add(idem_key::Column::TenantId.eq(tenant.as_str()))
                .add(idem_key::Column::RequestId.eq(request_id))
        };
        let row = rows::first(tx, idem_key::Entity::find().filter(key()).lock_exclusive()).await?;
        if let Some(row) = row {
            let same = row.method == method && row.request_body == body;
            let live_lease = row.lease_until_ns.filter(|l| *l > now.0);
            // A completed key, or one still being worked on, binds its
            // body. One abandoned by a crashed request (lease expired, no
            // response) is free again, whatever the body.
            if row.expire_ns > now.0 && (row.response_body.is_some() || live_lease.is_some()) {
                if !same {
                    return Err(Error::RequestIdReused {
                        request_id: request_id.to_owned(),
                        first_method: row.method,
                    });
                }
                if let Some(resp) = row.response_body {
                    return Ok(IdemBegin::Replay(resp));
                }
                if let Some(lease) = live_lease {
                    return Err(Error::RequestInProgress {
                        request_id: request_id.to_owned(),
                        retry_after_nanos: (lease - now.0).clamp(Ts::SECOND / 10, Ts::SECOND),
                    });
                }
            }
        }
        // New, expired, or abandoned by a crashed request: take it — but
        // only if it still is when the write lands. Another replica may
        // have taken a new key between the read and this write (PostgreSQL
        // locks no row that does not exist yet); then nothing is written,
        // and the read, run again, finds that request's key.
        let existing = |c: idem_key::Column| Expr::col((idem_key::Entity, c));
        let free = existing(idem_key::Column::ExpireNs).lte(now.0).or(existing(
            idem_key::Column::ResponseBody,
        )
        .is_null()
        .and(
            existing(idem_key::Column::LeaseUntilNs)
                .is_null()
                .or(existing(idem_key::Column::LeaseUntilNs).lte(now.0)),
        ));
        let taken = idem_key::Entity::insert(idem_key::ActiveModel {
            tenant_id: Set(tenant.as_str().to_owned()),
            request_id: Set(request_id.to_owned()),
            method: Set(method.to_owned()),
            request_body: Set(body.to_vec()),
            response_body: Set(None),
            lease_until_ns: Set(Some(now.0 + IDEMPOTENCY_LEASE_NANOS)),
            claim: Set(Some(claim.to_owned())),
            create_ns: Set(now.0),
            expire_ns: Set(now.0 + IDEMPOTENCY_TTL_NANOS),
        })
        .on_conflict(
            OnConflict::columns([idem_key::Column::TenantId, idem_key::Column::RequestId])
                .update_columns([
                    idem_key::Column::Method,
                    idem_key::Column::RequestBody,
                    idem_key::Column::ResponseBody,
                    idem_key::Column::LeaseUntilNs,
                    idem_key::Column::Claim,
                    idem_key::Column::CreateNs,
                    idem_key::Column::ExpireNs,
                ])
                .action_and_where(free)
                .to_owned(),
        )
        .exec_without_returning(tx)
        .await
        .map_err(db_err)?;
        if taken == 0 {
            return Err(Error::StorageContention(format!(
                "request_id {request_id:?} was taken by another request meanwhile"
            )));
        }
        Ok(IdemBegin::Fresh(claim.to_owned()))
    }

    /// Releases a key whose request failed: a failed request changed
    /// nothing, so the same key may be retried. Only the holder of `claim`
    /// releases it.
    pub async fn idem_abort(
        &self,
        tenant: &TenantId,
        request_id: &str,
        claim: &str,
    ) -> Result<(), Error> {
        self.bounded(async {
            idem_key::Entity::delete_many()
                .filter(idem_key::Column::TenantId.eq(tenant.as_str()))
                .filter(idem_key::Column::RequestId.eq(request_id))
                .filter(idem_key::Column::Claim.eq(claim))
                .filter(idem_key::Column::ResponseBody.is_null())
                .exec(&self.write)
                .await
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Deletes expired keys; returns how many.
    pub async fn idem_sweep(&self) -> Result<u64, Error> {
        self.bounded(async {
            let r = idem_key::Entity::delete_many()
                .filter(idem_key::Column::ExpireNs.lte(self.clock.now().0))
                .exec(&self.write)
                .await
                .map_err(db_err)?;
            Ok(r.rows_affected)
        })
        .await
    }

    pub(super) async fn idem_complete<T, C: ConnectionTrait>(
        conn: &C,
        tenant: &TenantId,
        idem: Option<&IdemCommit<T>>,
        outcome: &T,
    ) -> Result<(), Error> {
        if let Some(idem) = idem {
            let body = (idem.encode)(outcome);
            let done = idem_key::Entity::update_many()
                .col_expr(idem_key::Column::ResponseBody, Expr::value(Some(body)))
                .col_expr(
                    idem_key::Column::LeaseUntilNs,
                    Expr::value(Option::<i64>::None),
                )
                .filter(idem_key::Column::TenantId.eq(tenant.as_str()))
                .filter(idem_key::Column::RequestId.eq(idem.request_id.as_str()))
                .filter(idem_key::Column::Claim.eq(idem.claim.as_str()))
                .filter(idem_key::Column::ResponseBody.is_null())
                .exec(conn)
                .await
                .map_err(db_err)?;
            if done.rows_affected == 0 {
                // This request outlived its lease and a retry took the key
                // over: the retry applies the change, so this one must not
                // (its transaction rolls back).
                return Err(Error::RequestInProgress {
                    request_id: idem.request_id.clone(),
                    retry_after_nanos: Ts::SECOND,
                });
            }
        }
        Ok(())
    }
}
