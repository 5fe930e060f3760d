//! PostgreSQL: the planner's statistics of the service's busiest tables,
//! kept fresh by the service itself.
//!
//! PostgreSQL plans each statement from the statistics `ANALYZE` last
//! took of its tables. Autovacuum takes them once enough of a table has
//! changed, but only where it runs, and only once a minute at most
//! (`autovacuum_naptime`). A database where it is off never has any: the
//! planner then guesses, and its guesses for these tables are bad. In a
//! 100,000 dispatch storm on a database never analysed, each record of
//! 256 outcomes read the whole `actions` table into a hash join (a bitmap
//! scan of `actions_by_tenant`, guessed at 375 rows, read 100,000), about
//! 150 ms each instead of about 2 ms by the primary key. So the service
//! analyses them itself, with autovacuum's own rule and settings: a table
//! is analysed once more rows changed since it was last analysed (by
//! anyone) than `autovacuum_analyze_threshold` +
//! `autovacuum_analyze_scale_factor` × its rows. Where autovacuum runs
//! too, whichever comes first does it and the other finds nothing to do.

use sea_orm::{ConnectionTrait as _, DbBackend, Statement};

use super::{Store, db_err};
use crate::domain::Error;

/// The tables whose statistics the service keeps: those its hot statements
/// read (pushes, claims, starts, records, events).
pub const ANALYZED_TABLES: [&str; 4] = ["actions", "audit_log", "devices", "idempotency_keys"];

/// Key of the advisory lock held while analysing: one replica at a time.
const ANALYZE_LOCK: i64 = 4_108_337_512_940_226_481;

impl Store {
    /// PostgreSQL: `ANALYZE`s each of [`ANALYZED_TABLES`] that changed by
    /// more than autovacuum's analyse threshold since its statistics were
    /// last taken, unless another replica is doing so; returns the tables
    /// analysed. SQLite: nothing (its planner needs no statistics to use
    /// these indexes), an empty list.
    pub async fn refresh_statistics(&self) -> Result<Vec<&'static str>, Error> {
        if self.backend() != DbBackend::Postgres {
            return Ok(Vec::new());
        }
        let tx = self.begin().await?;
        let locked = tx
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_try_advisory_xact_lock({ANALYZE_LOCK}) AS locked"),
            ))
            .await
            .map_err(db_err)?
            .map(|r| r.try_get::<bool>("", "locked"))
            .transpose()
            .map_err(db_err)?
            .unwrap_or(false);
        if !locked {
            return Ok(Vec::new());
        }
        // Never analysed: `reltuples` is -1, and the threshold is the
        // fixed part alone.
        let stale = tx
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT s.relname::text AS name FROM pg_stat_user_tables s \
                     JOIN pg_class c ON c.oid = s.relid \
                     WHERE s.schemaname = current_schema() AND s.relname IN ('{}') \
                     AND s.n_mod_since_analyze > \
                         current_setting('autovacuum_analyze_threshold')::float8 \
                         + current_setting('autovacuum_analyze_scale_factor')::float8 \
                           * GREATEST(c.reltuples, 0) \
                     ORDER BY 1",
                    ANALYZED_TABLES.join("', '")
                ),
            ))
            .await
            .map_err(db_err)?;
        let mut analysed = Vec::new();
        for row in stale {
            let name: String = row.try_get("", "name").map_err(db_err)?;
            // Only a name of the list is ever written into the statement.
            let Some(table) = ANALYZED_TABLES.iter().find(|t| **t == name) else {
                continue;
            };
            analysed.push(*table);
        }
        if analysed.is_empty() {
            return Ok(analysed);
        }
        // ANALYZE waits for a table's SHARE UPDATE EXCLUSIVE lock (held by
        // autovacuum or a migration): not for long.
        tx.execute_unprepared("SET LOCAL lock_timeout = '5s'")
            .await
            .map_err(db_err)?;
        tx.execute_unprepared(&format!("ANALYZE {}", analysed.join(", ")))
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(analysed)
    }
}
