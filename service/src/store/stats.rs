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
//! analyses them itself, by autovacuum's rule with the server's settings
//! of it (not a table's own: `autovacuum_enabled = off` or thresholds set
//! on a table change nothing here): a table is analysed once more rows
//! changed since it was last analysed (by anyone) than
//! `autovacuum_analyze_threshold` + `autovacuum_analyze_scale_factor` ×
//! its rows. Where autovacuum runs
//! too, whichever comes first does it and the other finds nothing to do:
//! each table is locked `NOWAIT` first, so the service never waits for
//! (and so never cancels) autovacuum's VACUUM or ANALYZE, another
//! replica's, or a migration; a table busy is tried again next time.
//! Each is analysed in a transaction of its own, committed at once. An
//! ANALYZE rolled back (its commit failed, or the process stopped) leaves
//! the table counted as analysed (`reltuples` and `n_mod_since_analyze`
//! are not transactional) with the statistics it had before: a table's
//! first, lost, leaves it with rows and no statistics, and it is analysed
//! again at the next check; a later one, lost, leaves the statistics
//! before it until the table is due again. After taking the lock the
//! table is checked again, so that two replicas do not analyse it one
//! after the other (PostgreSQL 15 and later reset the count when an
//! ANALYZE ends, and a transaction reads the counts once, at its first
//! read of them).

use sea_orm::{ConnectionTrait as _, DbBackend, Statement};

use super::{Store, db_err};
use crate::domain::Error;

/// The tables whose statistics the service keeps: those its hot statements
/// read (pushes, claims, starts, records, events).
const ANALYZED_TABLES: [&str; 4] = ["actions", "audit_log", "devices", "idempotency_keys"];

/// What [`Store::refresh_statistics`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// The tables analysed.
    pub analysed: Vec<&'static str>,
    /// Tables due, but owned by another role than the service's: only
    /// their owner, the database's, a superuser or (PostgreSQL 17 and
    /// later) a role with MAINTAIN on them may analyse them.
    pub not_owned: Vec<&'static str>,
}

/// The tables of [`ANALYZED_TABLES`] (`only` one) due an ANALYZE, and
/// whether the session's role may run it. Each name is resolved as the
/// service's own statements resolve it (`to_regclass`, through the
/// `search_path`). Due: changed since last analysed by more than
/// autovacuum's threshold (a table never analysed has `reltuples` -1: the
/// fixed part alone), or holding rows without statistics. May run it: the
/// table's owner, the database's, or (PostgreSQL 17 and later) a role
/// granted MAINTAIN on it, or `pg_maintain`; the privilege is asked only
/// of a server that knows it (`CASE`: before 17 the name is an error).
fn due_sql(only: Option<&str>) -> String {
    let names = only.map_or_else(|| ANALYZED_TABLES.join("', '"), str::to_owned);
    format!(
        "SELECT t.name, (pg_has_role(c.relowner, 'USAGE') OR pg_has_role((SELECT datdba \
           FROM pg_database WHERE datname = current_database()), 'USAGE') \
           OR CASE WHEN current_setting('server_version_num')::int >= 170000 \
                THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE false END) AS owned \
         FROM unnest(ARRAY['{names}']) AS t(name) \
         JOIN pg_class c ON c.oid = to_regclass(t.name) \
         JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE s.n_mod_since_analyze > \
               current_setting('autovacuum_analyze_threshold')::float8 \
               + current_setting('autovacuum_analyze_scale_factor')::float8 \
                 * GREATEST(c.reltuples, 0) \
            OR (c.reltuples > 0 AND NOT EXISTS (SELECT 1 FROM pg_stats p \
                WHERE p.schemaname = s.schemaname AND p.tablename = s.relname)) \
         ORDER BY 1"
    )
}

impl Store {
    /// PostgreSQL: `ANALYZE`s each of [`ANALYZED_TABLES`] that is due
    /// (changed by more than autovacuum's analyse threshold since its
    /// statistics were last taken, or without statistics), each in a
    /// transaction of its own, skipping a table another transaction
    /// holds (a VACUUM, an ANALYZE, a migration). SQLite: nothing (its
    /// planner uses these indexes without statistics).
    pub async fn refresh_statistics(&self) -> Result<Refreshed, Error> {
        let mut done = Refreshed::default();
        if self.backend() != DbBackend::Postgres {
            return Ok(done);
        }
        let due = self
            .write
            .query_all_raw(Statement::from_string(DbBackend::Postgres, due_sql(None)))
            .await
            .map_err(db_err)?;
        for row in due {
            let name: String = row.try_get("", "name").map_err(db_err)?;
            let owned: bool = row.try_get("", "owned").map_err(db_err)?;
            // Only a name of the list is ever written into a statement.
            let Some(table) = ANALYZED_TABLES.iter().copied().find(|t| *t == name) else {
                continue;
            };
            if !owned {
                done.not_owned.push(table);
                continue;
            }
            // One table's failure (a timeout, a lock another holds that
            // ANALYZE itself needs) does not keep the others from theirs.
            match self.analyse(table).await {
                Ok(true) => done.analysed.push(table),
                Ok(false) | Err(Error::StorageContention(_)) => {}
                Err(e) => tracing::warn!(table, error = %e, "could not analyse a table"),
            }
        }
        Ok(done)
    }

    /// Analyses `table` unless another transaction holds it, or another
    /// replica has just analysed it; whether it did.
    async fn analyse(&self, table: &'static str) -> Result<bool, Error> {
        let tx = self.begin().await?;
        // Never waits: a wait longer than `deadlock_timeout` would cancel
        // autovacuum's VACUUM of the table.
        let lock = format!("LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE NOWAIT");
        match tx.execute_unprepared(&lock).await.map_err(db_err) {
            Ok(_) => {}
            // 55P03: held by another; rolled back as `tx` is dropped.
            Err(Error::StorageContention(_)) => return Ok(false),
            Err(e) => return Err(e),
        }
        let still = tx
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                due_sql(Some(table)),
            ))
            .await
            .map_err(db_err)?;
        if still.is_empty() {
            return Ok(false);
        }
        // It reads a bounded sample (300 rows per unit of
        // `default_statistics_target`), but of a big table on a slow disk
        // it may take longer than requests' statement_timeout (8 s).
        tx.execute_unprepared("SET LOCAL statement_timeout = '60s'")
            .await
            .map_err(db_err)?;
        tx.execute_unprepared(&format!("ANALYZE {table}"))
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(true)
    }
}
