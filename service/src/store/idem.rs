//! Idempotency keys. A request's key is checked and written once, with its
//! response, in the savepoint of the change it guards ([`Store::write_once`],
//! ADR 0011); replayed; swept when expired. Claims with a lease
//! ([`Store::idem_begin`], [`IdemCommit::claim`]) are how servers of an
//! earlier version held a key while they worked: still honoured when met
//! (REQUEST_IN_PROGRESS within the lease), and kept for the contract's
//! checks.

use crate::domain::{Error, TenantId, Ts};

use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, QueryTrait,
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
    /// Set when the key was only checked, not written (a write of
    /// [`Store::write_once`]): the method and request it is bound to, for
    /// the key to be written once, with its answer.
    pub unwritten: Option<(&'static str, Vec<u8>)>,
    /// When the key was checked (nanoseconds), for an unwritten one.
    pub at_ns: i64,
    /// Encodes the response from the outcome.
    pub encode: EncodeResponse<T>,
}

/// How a key is written.
enum Taking {
    /// Claimed by a request in progress (as servers of an earlier version
    /// did; for the checks that play one).
    #[cfg(any(test, feature = "contract"))]
    Claim(String),
    /// With its answer.
    Answered(Vec<u8>),
}

/// What the idempotency check found.
#[cfg(any(test, feature = "contract"))]
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
    /// its earlier outcome: a key held the way servers of an earlier
    /// version held it while they worked. The service no longer claims
    /// keys ([`Store::write_once`]); the checks use this to play such a
    /// server.
    #[cfg(any(test, feature = "contract"))]
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
    #[cfg(any(test, feature = "contract"))]
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
        self.retrying_grouped(|| {
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

    #[cfg(any(test, feature = "contract"))]
    async fn idem_begin_in(
        &self,
        tx: &sea_orm::DatabaseTransaction,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
        claim: &str,
    ) -> Result<IdemBegin, Error> {
        if let Some(resp) = self
            .idem_check_in(tx, tenant, request_id, method, body)
            .await?
        {
            return Ok(IdemBegin::Replay(resp));
        }
        Self::idem_take_in(
            tx,
            tenant,
            request_id,
            method,
            body,
            Taking::Claim(claim.to_owned()),
            self.clock.now(),
        )
        .await?;
        Ok(IdemBegin::Fresh(claim.to_owned()))
    }

    /// The key's recorded answer (`Some`), or `None` if it is free to
    /// take; refuses a key bound to another body, or being worked on.
    async fn idem_check_in(
        &self,
        tx: &sea_orm::DatabaseTransaction,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, Error> {
        let now = self.clock.now();
        static KEPT: rows::Kept = rows::Kept::new();
        let select = || {
            idem_key::Entity::find()
                .filter(idem_key::Column::TenantId.eq(tenant.as_str()))
                .filter(idem_key::Column::RequestId.eq(request_id))
                .lock_exclusive()
        };
        let values = vec![tenant.as_str().into(), request_id.into()];
        let row = rows::all_kept(tx, &KEPT, values, select)
            .await?
            .into_iter()
            .next();
        Self::idem_found(row, request_id, method, body, now)
    }

    /// What the key's row (`None`: no row) says of a request of `method`
    /// with `body` at `now`: its recorded answer (`Some`), or `None` if
    /// the key is free to take; refuses a key bound to another body, or
    /// being worked on.
    pub(super) fn idem_found(
        row: Option<idem_key::Model>,
        request_id: &str,
        method: &str,
        body: &[u8],
        now: Ts,
    ) -> Result<Option<Vec<u8>>, Error> {
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
                    return Ok(Some(resp));
                }
                if let Some(lease) = live_lease {
                    return Err(Error::RequestInProgress {
                        request_id: request_id.to_owned(),
                        retry_after_nanos: (lease - now.0).clamp(Ts::SECOND / 10, Ts::SECOND),
                    });
                }
            }
        }
        Ok(None)
    }

    /// Writes the key: claimed (in progress) or with its answer. New,
    /// expired, or abandoned by a crashed request, it is taken — but only
    /// if it still is when the write lands. Another replica may have taken
    /// it between the check and this write (PostgreSQL locks no row that
    /// does not exist yet; the insert waits for that replica's commit);
    /// then nothing is written, and the request, run again, finds that
    /// request's key.
    async fn idem_take_in<C: ConnectionTrait>(
        tx: &C,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
        taking: Taking,
        now: Ts,
    ) -> Result<(), Error> {
        let backend = tx.get_database_backend();
        let stmt =
            Self::idem_take_statement(backend, tenant, request_id, method, body, taking, now);
        let taken = tx.execute_raw(stmt).await.map_err(db_err)?.rows_affected();
        Self::idem_taken(request_id, taken)
    }

    /// What writing a key ([`Store::idem_take_in`]) came to, from the rows
    /// its statement wrote.
    pub(super) fn idem_taken(request_id: &str, taken: u64) -> Result<(), Error> {
        if taken == 0 {
            return Err(Error::StorageContention(format!(
                "request_id {request_id:?} was taken by another request meanwhile"
            )));
        }
        Ok(())
    }

    /// The statement of [`Store::idem_take_in`].
    fn idem_take_statement(
        backend: sea_orm::DbBackend,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
        taking: Taking,
        now: Ts,
    ) -> sea_orm::Statement {
        let (claim, response, lease) = match taking {
            #[cfg(any(test, feature = "contract"))]
            Taking::Claim(c) => (Some(c), None, Some(now.0 + IDEMPOTENCY_LEASE_NANOS)),
            Taking::Answered(r) => (None, Some(r), None),
        };
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
        let row = idem_key::ActiveModel {
            tenant_id: Set(tenant.as_str().to_owned()),
            request_id: Set(request_id.to_owned()),
            method: Set(method.to_owned()),
            request_body: Set(body.to_vec()),
            response_body: Set(response),
            lease_until_ns: Set(lease),
            claim: Set(claim),
            create_ns: Set(now.0),
            expire_ns: Set(now.0 + IDEMPOTENCY_TTL_NANOS),
        };
        let insert = || {
            idem_key::Entity::insert(row.clone())
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
                        .action_and_where(free.clone())
                        .to_owned(),
                )
                .build(backend)
        };
        // Kept (every push with a request_id writes its key): the row's
        // values, then those of `free`.
        static KEPT: rows::Kept = rows::Kept::new();
        let mut values = rows::set_values(&row);
        values.extend([now.0.into(), now.0.into()]);
        KEPT.statement(backend, values, insert)
    }

    /// The statement that writes `idem`'s key with `outcome` as its answer,
    /// when the key is written with the answer (`unwritten`, as
    /// [`Store::idem_complete`] would); `None` for a key claimed before.
    pub(super) fn idem_answer_statement<T>(
        backend: sea_orm::DbBackend,
        tenant: &TenantId,
        idem: &IdemCommit<T>,
        outcome: &T,
    ) -> Option<sea_orm::Statement> {
        let (method, request) = idem.unwritten.as_ref()?;
        Some(Self::idem_take_statement(
            backend,
            tenant,
            &idem.request_id,
            method,
            request,
            Taking::Answered((idem.encode)(outcome)),
            Ts(idem.at_ns),
        ))
    }

    /// The recorded answer of `request_id`, read without a write: a retry
    /// of a finished request is answered at once (no OEM call, no place in
    /// a group); another body under the key is refused. `None`: not
    /// finished (or never seen, or expired): the write decides.
    pub async fn idem_recorded(
        &self,
        tenant: &TenantId,
        request_id: &str,
        method: &str,
        body: &[u8],
    ) -> Result<Option<Vec<u8>>, Error> {
        self.bounded(async {
            let now = self.clock.now();
            let row = rows::first(
                &self.read,
                idem_key::Entity::find()
                    .filter(idem_key::Column::TenantId.eq(tenant.as_str()))
                    .filter(idem_key::Column::RequestId.eq(request_id)),
            )
            .await?;
            let Some(row) = row.filter(|r| r.expire_ns > now.0) else {
                return Ok(None);
            };
            let Some(response) = row.response_body else {
                return Ok(None);
            };
            if row.method != method || row.request_body != body {
                return Err(Error::RequestIdReused {
                    request_id: request_id.to_owned(),
                    first_method: row.method,
                });
            }
            Ok(Some(response))
        })
        .await
    }

    /// Releases a key whose request failed: a failed request changed
    /// nothing, so the same key may be retried. Only the holder of `claim`
    /// releases it.
    #[cfg(any(test, feature = "contract"))]
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
            if let Some((method, request)) = &idem.unwritten {
                let now = Ts(idem.at_ns);
                return Self::idem_take_in(
                    conn,
                    tenant,
                    &idem.request_id,
                    method,
                    request,
                    Taking::Answered(body),
                    now,
                )
                .await;
            }
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

/// A request_id to honour in the write it guards: the key is claimed, the
/// change made and its answer recorded in one savepoint of one group
/// commit ([`Store::write_once`]), so a duplicate is decided after it
/// (and replays its answer), and a failed change leaves no claim behind.
pub struct IdemRequest<T> {
    pub request_id: String,
    /// The RPC, which a reuse of the key by another is told.
    pub method: &'static str,
    /// The request as received, which a retry must repeat.
    pub body: Vec<u8>,
    /// Encodes the response from the outcome.
    pub encode: SharedEncode<T>,
}

/// [`EncodeResponse`], shared by a write's tries.
pub type SharedEncode<T> = std::sync::Arc<dyn Fn(&T) -> Vec<u8> + Send + Sync>;

/// What an idempotent write came to.
#[derive(Debug, PartialEq)]
pub enum Written<T> {
    /// Made now.
    Fresh(T),
    /// Made before under the same request_id: its recorded answer.
    Replayed(Vec<u8>),
}

/// A mutation as a group member runs it: in the member's savepoint, under
/// the request_id claim it is given (if any), which it completes with its
/// answer.
pub(super) type WriteOp<T> = std::sync::Arc<
    dyn for<'a> Fn(
            &'a sea_orm::DatabaseTransaction,
            Option<&'a IdemCommit<T>>,
        ) -> futures::future::BoxFuture<'a, Result<T, Error>>
        + Send
        + Sync,
>;

/// Makes a [`WriteOp`] of a closure.
pub(super) fn write_op<T, F>(f: F) -> WriteOp<T>
where
    F: for<'a> Fn(
            &'a sea_orm::DatabaseTransaction,
            Option<&'a IdemCommit<T>>,
        ) -> futures::future::BoxFuture<'a, Result<T, Error>>
        + Send
        + Sync
        + 'static,
{
    std::sync::Arc::new(f)
}

impl Store {
    /// Runs `op` in a group, under a claim already held (or none).
    pub(super) async fn write<T: Send + 'static>(
        &self,
        key: &str,
        op: WriteOp<T>,
        idem: Option<IdemCommit<T>>,
    ) -> Result<T, Error> {
        let idem = std::sync::Arc::new(idem);
        self.retrying_grouped(|| {
            let (op, idem) = (op.clone(), idem.clone());
            self.grouped(key, move |tx| {
                Box::pin(async move { op(tx, idem.as_ref().as_ref()).await })
            })
        })
        .await
    }

    /// Runs `op` in a group under `request_id` idempotency: in one
    /// savepoint the key is claimed (or its recorded answer found), the
    /// change is made and the answer recorded. A failed change is rolled
    /// back with its claim.
    pub(super) async fn write_once<T: Send + 'static>(
        &self,
        key: &str,
        tenant: &TenantId,
        op: WriteOp<T>,
        idem: Option<IdemRequest<T>>,
    ) -> Result<Written<T>, Error> {
        let Some(request) = idem else {
            return self.write(key, op, None).await.map(Written::Fresh);
        };
        let ctx = std::sync::Arc::new((self.clone(), tenant.clone(), request));
        self.retrying_grouped(|| {
            let (op, ctx) = (op.clone(), ctx.clone());
            self.grouped(key, move |tx| {
                Box::pin(async move {
                    let (store, tenant, request) = &*ctx;
                    store.once_in(tx, tenant, request, &op).await
                })
            })
        })
        .await
    }

    /// One try of [`Store::write_once`], in the member's savepoint `tx`:
    /// the key checked (its recorded answer replayed), the change made
    /// and its answer written with the key.
    pub(super) async fn once_in<T: 'static>(
        &self,
        tx: &sea_orm::DatabaseTransaction,
        tenant: &TenantId,
        request: &IdemRequest<T>,
        op: &WriteOp<T>,
    ) -> Result<Written<T>, Error> {
        let check = || {
            self.idem_check_in(
                tx,
                tenant,
                &request.request_id,
                request.method,
                &request.body,
            )
        };
        let at = self.clock.now();
        if let Some(bytes) = check().await? {
            return Ok(Written::Replayed(bytes));
        }
        // Free: written once, with the answer, by the change.
        let commit = request.commit(at);
        match op(tx, Some(&commit)).await {
            Ok(outcome) => Ok(Written::Fresh(outcome)),
            // Refused (a conflict, a stale etag): a duplicate of this
            // request on another replica may have committed since the
            // check, and be what refused it (PostgreSQL: this change
            // waited for its locks). Then this one is run again, and
            // replays.
            Err(e) if !e.is_storage() => match check().await? {
                Some(_) => Err(Error::StorageContention(format!(
                    "request_id {:?} was answered meanwhile",
                    request.request_id
                ))),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

impl<T: 'static> IdemRequest<T> {
    /// The key to write once, with the answer, as checked free at `at`.
    pub(super) fn commit(&self, at: Ts) -> IdemCommit<T> {
        let encode = self.encode.clone();
        IdemCommit {
            request_id: self.request_id.clone(),
            claim: String::new(),
            unwritten: Some((self.method, self.body.clone())),
            at_ns: at.0,
            encode: Box::new(move |t: &T| encode(t)),
        }
    }
}
