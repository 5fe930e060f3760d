//! Idempotency keys: a request_id claimed, completed with its response in
//! the transaction that makes the change, replayed, released or swept.

use crate::domain::{Error, TenantId, Ts};

use super::{Store, db_err, rows};

/// How long an idempotency key is kept.
pub const IDEMPOTENCY_TTL_NANOS: i64 = 24 * 3600 * Ts::SECOND;
/// How long a request may hold its key "in progress" before a retry may
/// take it over (a crashed server never completes it). Longer than the
/// write connection's 30 s acquire timeout, so a request queued under load
/// keeps its claim.
pub const IDEMPOTENCY_LEASE_NANOS: i64 = 60 * Ts::SECOND;

/// Encodes a mutation's outcome as the response bytes to replay.
pub type EncodeResponse<T> = Box<dyn FnOnce(&T) -> Vec<u8> + Send>;

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
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let row = sqlx::query(
            "SELECT method, request_body, response_body, lease_until_ns, expire_ns FROM idempotency_keys WHERE tenant_id = ? AND request_id = ?",
        )
        .bind(tenant.as_str())
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
        if let Some(row) = row {
            let expire: i64 = rows::col(&row, "expire_ns")?;
            let lease: Option<i64> = rows::col(&row, "lease_until_ns")?;
            let response: Option<Vec<u8>> = rows::col(&row, "response_body")?;
            let first_method: String = rows::col(&row, "method")?;
            let first_body: Vec<u8> = rows::col(&row, "request_body")?;
            let same = first_method == method && first_body == body;
            let live_lease = lease.filter(|l| *l > now.0);
            // A completed key, or one still being worked on, binds its
            // body. One abandoned by a crashed request (lease expired, no
            // response) is free again, whatever the body.
            if expire > now.0 && (response.is_some() || live_lease.is_some()) {
                if !same {
                    return Err(Error::RequestIdReused {
                        request_id: request_id.to_owned(),
                        first_method,
                    });
                }
                if let Some(resp) = response {
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
        // New, expired, or abandoned by a crashed request: take it.
        sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, request_id, method, request_body, response_body, lease_until_ns, claim, create_ns, expire_ns)
             VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?)
             ON CONFLICT (tenant_id, request_id) DO UPDATE SET method = excluded.method,
               request_body = excluded.request_body, response_body = NULL,
               lease_until_ns = excluded.lease_until_ns, claim = excluded.claim,
               create_ns = excluded.create_ns, expire_ns = excluded.expire_ns",
        )
        .bind(tenant.as_str())
        .bind(request_id)
        .bind(method)
        .bind(body)
        .bind(now.0 + IDEMPOTENCY_LEASE_NANOS)
        .bind(claim)
        .bind(now.0)
        .bind(now.0 + IDEMPOTENCY_TTL_NANOS)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
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
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE tenant_id = ? AND request_id = ? AND claim = ? AND response_body IS NULL",
        )
        .bind(tenant.as_str())
        .bind(request_id)
        .bind(claim)
        .execute(&self.write)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// Deletes expired keys; returns how many.
    pub async fn idem_sweep(&self) -> Result<u64, Error> {
        let r = sqlx::query("DELETE FROM idempotency_keys WHERE expire_ns <= ?")
            .bind(self.clock.now().0)
            .execute(&self.write)
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }

    pub(super) async fn idem_complete<T>(
        tx: &mut sqlx::SqliteConnection,
        tenant: &TenantId,
        idem: Option<IdemCommit<T>>,
        outcome: &T,
    ) -> Result<(), Error> {
        if let Some(idem) = idem {
            let body = (idem.encode)(outcome);
            let done = sqlx::query(
                "UPDATE idempotency_keys SET response_body = ?, lease_until_ns = NULL
                 WHERE tenant_id = ? AND request_id = ? AND claim = ? AND response_body IS NULL",
            )
            .bind(body)
            .bind(tenant.as_str())
            .bind(&idem.request_id)
            .bind(&idem.claim)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            if done.rows_affected() == 0 {
                // This request outlived its lease and a retry took the key
                // over: the retry applies the change, so this one must not
                // (its transaction rolls back).
                return Err(Error::RequestInProgress {
                    request_id: idem.request_id,
                    retry_after_nanos: Ts::SECOND,
                });
            }
        }
        Ok(())
    }
}
