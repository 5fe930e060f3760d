//! The store: the only place that speaks SQL.
//!
//! Invariants:
//! - Every mutation runs in one write transaction (`BEGIN IMMEDIATE` on
//!   SQLite, so the decision and the write are serialised across processes
//!   too) and is answered only after COMMIT.
//! - Collisions are decided inside that transaction from the rows it reads,
//!   so no channel ever holds two overlapping actions, however many clients
//!   push at once.
//! - Every action transition is appended to `audit_log` in the same
//!   transaction.
//! - In-process writers queue on a single write connection, so SQLITE_BUSY
//!   is never met in-process; `busy_timeout` covers other processes.

mod dispatch;
mod rows;
mod schema;
#[cfg(test)]
mod tests;

pub use dispatch::{Finish, Job};

use std::{collections::BTreeMap, str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::domain::{
    Action, ActionId, ActionState, Clock, Device, DeviceId, Error, Strategy, TenantId, Transition,
    Ts, codes,
    conflict::{self, Holder},
    lifecycle,
    validate::ValidPush,
};

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

/// Whether a device change points its driver at another physical device
/// ([`switchyard_drivers::DriverFactory::target`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retarget {
    /// Same target.
    No,
    /// Another target.
    Yes,
}

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

/// How the store uses its database.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a write waits for another process's write lock before it
    /// is answered STORAGE_UNAVAILABLE.
    pub busy_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            busy_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    write: SqlitePool,
    read: SqlitePool,
    clock: Arc<dyn Clock>,
}

/// Classifies a database error by its code: what a retry may cure
/// (the database is busy, locked, out of space or unreachable) is
/// STORAGE_UNAVAILABLE; what it cannot (corruption, a constraint the code
/// did not expect) is INTERNAL.
pub(crate) fn db_err(e: sqlx::Error) -> Error {
    let transient = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| transient_code(&c)),
        _ => false,
    };
    if transient {
        Error::StorageUnavailable(e.to_string())
    } else {
        Error::Internal(format!("database: {e}"))
    }
}

/// SQLite result codes (extended codes carry the primary one in their low
/// byte) that a retry may cure.
fn transient_code(code: &str) -> bool {
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    const NOMEM: i64 = 7;
    const IOERR: i64 = 10;
    const FULL: i64 = 13;
    const CANTOPEN: i64 = 14;
    const PROTOCOL: i64 = 15;
    code.parse::<i64>().is_ok_and(|c| {
        matches!(
            c & 0xff,
            BUSY | LOCKED | NOMEM | IOERR | FULL | CANTOPEN | PROTOCOL
        )
    })
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies the
    /// migrations. `sqlite://path` and `sqlite::memory:` are accepted.
    pub async fn open(url: &str, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        Self::open_with(url, clock, &StoreOptions::default()).await
    }

    /// [`Store::open`] with `options`.
    pub async fn open_with(
        url: &str,
        clock: Arc<dyn Clock>,
        options: &StoreOptions,
    ) -> Result<Self, Error> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::Internal(format!("database url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        // One writer: in-process writers queue here instead of spinning on
        // SQLITE_BUSY.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await
            .map_err(db_err)?;
        // An in-memory database lives in its one connection.
        let read = if in_memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await
                .map_err(db_err)?
        };
        let store = Self { write, read, clock };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), Error> {
        let mut conn = self.write.acquire().await.map_err(db_err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ns INTEGER NOT NULL)",
        )
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        drop(conn);
        for (version, sql) in schema::MIGRATIONS {
            let mut tx = self
                .write
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(db_err)?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_ns) VALUES (?, ?)")
                .bind(version)
                .bind(self.clock.now().0)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
        }
        Ok(())
    }

    /// Closes the pools.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    /// The clock the store stamps changes with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, Error> {
        self.write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)
    }

    // ---- idempotency ------------------------------------------------------

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

    async fn idem_complete<T>(
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

    // ---- devices ----------------------------------------------------------

    /// Registers a device; `device.revision`, `created` and `updated` are
    /// set here.
    pub async fn create_device(
        &self,
        tenant: &TenantId,
        mut device: Device,
        idem: Option<IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        device.revision = 1;
        device.created = now;
        device.updated = now;
        device.incarnation = uuid::Uuid::now_v7().simple().to_string();
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM devices WHERE tenant_id = ? AND device_id = ?")
                .bind(tenant.as_str())
                .bind(device.id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if exists.is_some() {
            return Err(Error::DeviceAlreadyExists {
                device_id: device.id.to_string(),
            });
        }
        rows::insert_device(&mut tx, tenant, &device).await?;
        rows::audit_device(
            &mut tx,
            tenant,
            &device.id,
            "CREATED",
            idem.as_ref().map(|i| i.request_id.as_str()),
            now,
        )
        .await?;
        Self::idem_complete(&mut tx, tenant, idem, &device).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(device)
    }

    /// Whether a device exists (read outside any transaction: a hint to
    /// spare work, the write decides).
    pub async fn device_exists(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, Error> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM devices WHERE tenant_id = ? AND device_id = ?")
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_optional(&self.read)
                .await
                .map_err(db_err)?;
        Ok(found.is_some())
    }

    /// One device.
    pub async fn get_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<Device, Error> {
        rows::fetch_device(&self.read, tenant, id)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })
    }

    /// Devices in id order, after `after`.
    pub async fn list_devices(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, Error> {
        let rs = sqlx::query(
            "SELECT * FROM devices WHERE tenant_id = ? AND device_id > ? ORDER BY device_id LIMIT ?",
        )
        .bind(tenant.as_str())
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_err)?;
        rs.iter().map(rows::device_from_row).collect()
    }

    /// Number of devices of the tenant.
    pub async fn count_devices(&self, tenant: &TenantId) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE tenant_id = ?")
            .bind(tenant.as_str())
            .fetch_one(&self.read)
            .await
            .map_err(db_err)
    }

    /// Changes a device with `apply`, if `etag` (when given) matches; a
    /// change `apply` says retargets the device is refused while any of its
    /// actions' writes may be in force: a driver memo on record, an apply
    /// in flight or retrying, an ACTIVE action, or a revert owed. What
    /// was observed under the old configuration is dropped; `observed`, a
    /// reading of the configuration `apply` sets up (made before the
    /// transaction, so no OEM call holds the write lock), is kept if the
    /// configuration is still the one it was made for.
    pub async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        apply: impl FnOnce(&mut Device) -> Result<Retarget, Error>,
        observed: Option<(Device, crate::domain::Observed)>,
        idem: Option<IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let mut device = rows::fetch_device(&mut *tx, tenant, id)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })?;
        check_etag(etag, &device.etag(), || format!("devices/{id}"))?;
        if apply(&mut device)? == Retarget::Yes {
            // A revert owed under the old target could not reach the
            // device under the new one.
            // A memo on record (a write that may be in force), an apply in
            // flight (a dispatch lease), an ACTIVE action (one applied
            // before memos existed has none), or a revert owed. An apply
            // waiting to be retried that never wrote does not count.
            let held: Vec<(String,)> = sqlx::query_as(
                "SELECT action_id FROM actions
                 WHERE tenant_id = ? AND device_id = ?
                   AND (driver_memo IS NOT NULL OR state = 'ACTIVE'
                        OR work = 'REVERT' OR lease_owner IS NOT NULL)
                 ORDER BY start_ns, action_id",
            )
            .bind(tenant.as_str())
            .bind(id.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let ids: Vec<ActionId> = held
                .iter()
                .filter_map(|(a,)| ActionId::parse(a).ok())
                .collect();
            if !ids.is_empty() {
                return Err(Error::WritesInForce {
                    device_id: id.to_string(),
                    action_ids: ids,
                });
            }
        }
        device.revision += 1;
        device.updated = now;
        device.observed = observed
            .filter(|(seen, _)| seen.same_config(&device))
            .map(|(_, o)| o);
        sqlx::query(
            "UPDATE devices SET display_name = ?, oem_device_id = ?, timezone = ?, settings = ?, revision = ?, update_ns = ?,
               observed = ?, observed_ns = ?
             WHERE tenant_id = ? AND device_id = ?",
        )
        .bind(&device.display_name)
        .bind(&device.oem_device_id)
        .bind(&device.timezone)
        .bind(rows::settings_json(&device.settings))
        .bind(device.revision)
        .bind(now.0)
        .bind(device.observed.as_ref().map(rows::observed_json))
        .bind(device.observed.as_ref().map(|o| o.at.0))
        .bind(tenant.as_str())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        rows::audit_device(
            &mut tx,
            tenant,
            id,
            "UPDATED",
            idem.as_ref().map(|i| i.request_id.as_str()),
            now,
        )
        .await?;
        Self::idem_complete(&mut tx, tenant, idem, &device).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(device)
    }

    /// Deletes a device and its actions. Refused while actions hold a
    /// channel, unless `force` (which cancels the SCHEDULED ones); in-flight
    /// actions, and cancelled ones whose revert is still owed, always block.
    pub async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        force: bool,
        idem: Option<IdemCommit<()>>,
    ) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let device = rows::fetch_device(&mut *tx, tenant, id)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })?;
        check_etag(etag, &device.etag(), || format!("devices/{id}"))?;
        let holding = rows::holding_actions(
            &mut tx,
            tenant,
            id,
            rows::HoldingFilter {
                channel: None,
                ending_after: None,
            },
        )
        .await?;
        // A cancelled or failed action still listed here has a revert owed:
        // deleting it would leave its override in force, so it blocks like
        // one the OEM is executing.
        let in_flight: Vec<ActionId> = holding
            .iter()
            .filter(|a| !a.state.holds() || a.state.in_flight())
            .map(|a| a.id)
            .collect();
        if !holding.is_empty() && (!force || !in_flight.is_empty()) {
            return Err(Error::DeviceHasActiveActions {
                device_id: id.to_string(),
                action_ids: holding.iter().map(|a| a.id).collect(),
                in_flight,
            });
        }
        let request_id = idem.as_ref().map(|i| i.request_id.clone());
        for a in &holding {
            rows::audit(
                &mut tx,
                tenant,
                &Transition {
                    action_id: a.id,
                    device_id: id.clone(),
                    from: Some(a.state),
                    to: ActionState::Cancelled,
                    reason: codes::DEVICE_DELETED.to_owned(),
                },
                request_id.as_deref(),
                now,
            )
            .await?;
        }
        sqlx::query("DELETE FROM devices WHERE tenant_id = ? AND device_id = ?")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        rows::audit_device(&mut tx, tenant, id, "DELETED", request_id.as_deref(), now).await?;
        Self::idem_complete(&mut tx, tenant, idem, &()).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }

    // ---- actions ----------------------------------------------------------

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

fn not_found(device_id: &DeviceId, action_id: &ActionId) -> Error {
    Error::ActionNotFound {
        device_id: device_id.to_string(),
        action_id: action_id.to_string(),
    }
}

fn check_etag(
    given: Option<&str>,
    current: &str,
    resource: impl FnOnce() -> String,
) -> Result<(), Error> {
    match given {
        Some(g) if g != current => Err(Error::EtagMismatch {
            resource: resource(),
            current: current.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Parses stored settings JSON.
pub(crate) fn parse_settings(s: &str) -> Result<BTreeMap<String, String>, Error> {
    serde_json::from_str(s).map_err(|e| Error::Internal(format!("stored settings: {e}")))
}
