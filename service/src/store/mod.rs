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

mod actions;
#[cfg(feature = "contract")]
pub mod contract;
mod devices;
mod dispatch;
mod idem;
mod rows;
mod schema;
#[cfg(test)]
mod tests;

pub use actions::{ActionQuery, PushOutcome};
pub use devices::Retarget;
pub use dispatch::{Finish, Job};
pub use idem::{
    EncodeResponse, IDEMPOTENCY_LEASE_NANOS, IDEMPOTENCY_TTL_NANOS, IdemBegin, IdemCommit,
};

use std::{collections::BTreeMap, str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use crate::domain::{ActionId, Clock, DeviceId, Error};

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

    pub(super) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, Error> {
        self.write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)
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
