//! SQLite statements run on the group-commit writer's own thread.
//!
//! sqlx runs each statement of a SQLite connection on that connection's
//! worker thread: a hand-off there and back per statement, two context
//! switches, which bounded the push rate more than the disk did. The
//! writer of a group instead locks the write connection's handle out of
//! its worker (`LockedSqliteHandle`) for the group's length and runs the
//! group's statements itself, through a sea-orm connection of its own
//! ([`Direct`], on sea-orm's mock-connection interface; the proxy one does
//! not build with sqlx-sqlite in sea-orm 2.0.4), so the store's code (entities, sea-query statements) is
//! the same whichever way a statement is run.
//!
//! Values cross as sea-query values: a result column is typed by the
//! entity column of its name ([`column_kinds`]; the names are unique in
//! kind across the tables, a test holds them so), else by what SQLite
//! stored.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
};

use rusqlite::types::ValueRef;
use sea_orm::{
    ColumnTrait, ColumnType, DbBackend, DbErr, EntityTrait, ExecResult, Iterable, MockDatabase,
    MockDatabaseTrait, MockExecResult, QueryResult, RuntimeErr, Statement, Value,
};

use super::entity;

/// How a column's values are given to sea-orm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Int,
    Float,
    Bool,
    Text,
    Bytes,
}

fn kind_of(t: &ColumnType) -> Option<Kind> {
    Some(match t {
        ColumnType::BigInteger
        | ColumnType::Integer
        | ColumnType::SmallInteger
        | ColumnType::TinyInteger => Kind::Int,
        ColumnType::Double | ColumnType::Float | ColumnType::Decimal(_) => Kind::Float,
        ColumnType::Boolean => Kind::Bool,
        ColumnType::String(_) | ColumnType::Text | ColumnType::Char(_) => Kind::Text,
        ColumnType::Binary(_) | ColumnType::VarBinary(_) | ColumnType::Blob => Kind::Bytes,
        _ => return None,
    })
}

fn kinds_of<E: EntityTrait>(out: &mut Vec<(String, Kind)>) {
    for c in E::Column::iter() {
        if let Some(k) = kind_of(c.def().get_column_type()) {
            out.push((sea_orm::IdenStatic::as_str(&c).to_owned(), k));
        }
    }
}

/// Every entity column's name with its kind (a name may appear in several
/// tables).
pub(super) fn all_columns() -> Vec<(String, Kind)> {
    let mut out = Vec::new();
    kinds_of::<entity::device::Entity>(&mut out);
    kinds_of::<entity::action::Entity>(&mut out);
    kinds_of::<entity::audit::Entity>(&mut out);
    kinds_of::<entity::idem_key::Entity>(&mut out);
    kinds_of::<entity::migration::Entity>(&mut out);
    kinds_of::<entity::rate_bucket::Entity>(&mut out);
    kinds_of::<entity::device_write::Entity>(&mut out);
    out
}

/// The kind of each column name.
pub(super) fn column_kinds() -> &'static HashMap<String, Kind> {
    static KINDS: LazyLock<HashMap<String, Kind>> =
        LazyLock::new(|| all_columns().into_iter().collect());
    &KINDS
}

/// The connection a group's statements run on, while its writer holds it.
pub(super) type Slot = Arc<Mutex<Option<rusqlite::Connection>>>;

/// A sea-orm connection whose statements run on the SQLite connection in
/// its slot, on the calling thread. Transactions: the outermost is the
/// group's, begun and committed by the writer itself (so their errors are
/// seen); nested ones are savepoints. A savepoint statement that fails is
/// kept in `failed` for the writer to see, since sea-orm's proxy
/// transactions cannot report one.
///
/// A member's own transaction (depth 2) is not a savepoint unless the
/// member is run carefully (`careful`): SQLite copies
/// every page a savepoint's statements first touch into its journal, and
/// with the SAVEPOINT and RELEASE statements that was a tenth of the
/// writer's time per push. A member that fails before it has written
/// anything (a conflict, a stale etag, a replayed key: every refusal
/// decides before writing) leaves nothing to undo: it changed no row
/// (SQLite's `total_changes`, which an upsert that took nothing leaves
/// alone) and ran no DDL. One that fails after
/// writing cannot be undone alone: the writer is told (`undone`), rolls
/// the whole group back and has every member run again (their callers
/// are answered STORAGE_CONTENTION, which the store retries); each of
/// them is run again in a savepoint, so that a request that fails after
/// writing fails alone on its retry.
#[derive(Debug)]
pub(super) struct Direct {
    pub(super) slot: Slot,
    /// Nesting: 0 outside the group's transaction, 1 in it, 2.. in
    /// savepoints.
    depth: u32,
    pub(super) failed: Arc<Mutex<Option<String>>>,
    /// Set when a member without a savepoint failed after writing.
    pub(super) undone: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the member about to run takes a savepoint (set by the
    /// lane for a request run again after its group was undone).
    pub(super) careful: Arc<std::sync::atomic::AtomicBool>,
    /// Statements run so far that change the database other than by rows
    /// (DDL: `total_changes` does not count them).
    other_writes: u64,
    /// The open member's, when it runs without a savepoint: what it
    /// began at (rows changed on the connection, `other_writes`).
    bare_since: Option<(u64, u64)>,
}

/// Whether `sql` changes rows only (SQLite counts what it changes in
/// `total_changes`), as opposed to DDL.
fn changes_rows(sql: &str) -> bool {
    let first = sql.split_whitespace().next().unwrap_or("");
    [
        "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "SELECT", "VALUES",
    ]
    .iter()
    .any(|k| first.eq_ignore_ascii_case(k))
}

impl Direct {
    pub(super) fn new(slot: Slot) -> Self {
        Self {
            slot,
            depth: 0,
            failed: Arc::new(Mutex::new(None)),
            undone: Arc::default(),
            careful: Arc::default(),
            other_writes: 0,
            bare_since: None,
        }
    }

    /// Where the connection stands, for a member without a savepoint:
    /// rows changed so far, other writes so far.
    fn mark(&self) -> (u64, u64) {
        let rows = self.with(|c| Ok(c.total_changes())).unwrap_or(u64::MAX);
        (rows, self.other_writes)
    }

    /// Whether SQLite has ended the group's transaction itself (some I/O
    /// errors and a full disk do, as does `RAISE(ROLLBACK)`): then later
    /// statements would each commit on their own, so the writer is told
    /// (`failed`).
    fn transaction_gone(&self) -> bool {
        let gone = self.with(|c| Ok(c.is_autocommit())).unwrap_or(true);
        if gone {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                Some("SQLite rolled the transaction back".into());
        }
        gone
    }

    fn careful(&self) -> bool {
        self.careful.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, DbErr> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let conn = slot.as_ref().ok_or_else(|| {
            DbErr::Conn(RuntimeErr::Internal(
                "the writer holds no connection".into(),
            ))
        })?;
        f(conn).map_err(to_db_err)
    }

    /// Runs a savepoint statement (prepared once, like the others).
    fn batch(&self, sql: &str) {
        let run = self.with(|c| {
            for one in sql.split("; ") {
                c.prepare_cached(one)?.execute([])?;
            }
            Ok(())
        });
        if let Err(e) = run {
            tracing::warn!(error = %e, sql, "savepoint statement failed");
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
    }

    /// Ends a savepoint (or, at depth 1, leaves the group's transaction to
    /// the writer).
    fn end(&mut self, sql: impl Fn(u32) -> String) {
        if self.depth > 1 {
            self.batch(&sql(self.depth - 1));
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

/// A rusqlite error as sqlx would have reported it, so that the store
/// classifies it the same way (`db_err`): a failed statement carries
/// SQLite's extended result code.
pub(super) fn to_db_err(e: rusqlite::Error) -> DbErr {
    match &e {
        rusqlite::Error::SqliteFailure(f, msg) => DbErr::Exec(RuntimeErr::SqlxError(Arc::new(
            sqlx::Error::Database(Box::new(SqliteCodeError {
                code: f.extended_code,
                message: msg.clone().unwrap_or_else(|| f.to_string()),
            })),
        ))),
        _ => DbErr::Exec(RuntimeErr::Internal(e.to_string())),
    }
}

/// A SQLite failure with its result code, for [`super::db_err`].
#[derive(Debug)]
pub(super) struct SqliteCodeError {
    pub(super) code: i32,
    pub(super) message: String,
}

impl std::fmt::Display for SqliteCodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLite code {})", self.message, self.code)
    }
}

impl std::error::Error for SqliteCodeError {}

impl sqlx::error::DatabaseError for SqliteCodeError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        sqlx::error::ErrorKind::Other
    }
}

/// A sea-query value as SQLite stores it.
fn to_sql(v: &Value) -> Result<rusqlite::types::Value, DbErr> {
    use rusqlite::types::Value as S;
    let int = |i: Option<i64>| i.map_or(S::Null, S::Integer);
    Ok(match v {
        Value::Bool(b) => int(b.map(i64::from)),
        Value::TinyInt(i) => int(i.map(i64::from)),
        Value::SmallInt(i) => int(i.map(i64::from)),
        Value::Int(i) => int(i.map(i64::from)),
        Value::BigInt(i) => int(*i),
        Value::TinyUnsigned(i) => int(i.map(i64::from)),
        Value::SmallUnsigned(i) => int(i.map(i64::from)),
        Value::Unsigned(i) => int(i.map(i64::from)),
        Value::BigUnsigned(i) => match i {
            None => S::Null,
            Some(u) => S::Integer(
                i64::try_from(*u)
                    .map_err(|_| DbErr::Type(format!("{u} does not fit a SQLite integer")))?,
            ),
        },
        Value::Float(f) => f.map_or(S::Null, |f| S::Real(f64::from(f))),
        Value::Double(f) => f.map_or(S::Null, S::Real),
        Value::String(s) => s.as_ref().map_or(S::Null, |s| S::Text(s.to_string())),
        Value::Char(c) => c.map_or(S::Null, |c| S::Text(c.to_string())),
        Value::Bytes(b) => b.as_ref().map_or(S::Null, |b| S::Blob(b.to_vec())),
        other => return Err(DbErr::Type(format!("no SQLite form for {other:?}"))),
    })
}

/// A stored value as sea-orm expects the column of `name`.
fn from_sql(name: &str, v: ValueRef<'_>) -> Result<Value, DbErr> {
    let kind = column_kinds().get(name).copied().unwrap_or(match v {
        ValueRef::Real(_) => Kind::Float,
        ValueRef::Text(_) => Kind::Text,
        ValueRef::Blob(_) => Kind::Bytes,
        ValueRef::Null | ValueRef::Integer(_) => Kind::Int,
    });
    let bad = || DbErr::Type(format!("column {name}: unexpected {:?}", v.data_type()));
    Ok(match (kind, v) {
        (Kind::Int, ValueRef::Null) => Value::BigInt(None),
        (Kind::Int, ValueRef::Integer(i)) => Value::BigInt(Some(i)),
        (Kind::Bool, ValueRef::Null) => Value::Bool(None),
        (Kind::Bool, ValueRef::Integer(i)) => Value::Bool(Some(i != 0)),
        (Kind::Float, ValueRef::Null) => Value::Double(None),
        (Kind::Float, ValueRef::Real(f)) => Value::Double(Some(f)),
        (Kind::Float, ValueRef::Integer(i)) => Value::Double(Some(i as f64)),
        (Kind::Text, ValueRef::Null) => Value::String(None),
        (Kind::Text, ValueRef::Text(t)) => {
            Value::String(Some(std::str::from_utf8(t).map_err(|_| bad())?.to_owned()))
        }
        (Kind::Bytes, ValueRef::Null) => Value::Bytes(None),
        (Kind::Bytes, ValueRef::Blob(b)) => Value::Bytes(Some(b.to_vec())),
        _ => return Err(bad()),
    })
}

fn params(stmt: &Statement) -> Result<Vec<rusqlite::types::Value>, DbErr> {
    stmt.values
        .as_ref()
        .map_or(Ok(Vec::new()), |vs| vs.0.iter().map(to_sql).collect())
}

impl MockDatabaseTrait for Direct {
    fn execute(&mut self, _: usize, statement: Statement) -> Result<ExecResult, DbErr> {
        let values = params(&statement)?;
        let mut ddl = false;
        let done = self.with(|c| {
            let mut st = c.prepare_cached(&statement.sql)?;
            // DDL is counted whether it fails or not.
            ddl = !st.readonly() && !changes_rows(&statement.sql);
            let changed = st.execute(rusqlite::params_from_iter(values.iter()))?;
            Ok(MockExecResult {
                last_insert_id: u64::try_from(c.last_insert_rowid()).unwrap_or(0),
                rows_affected: changed as u64,
            })
        });
        if ddl {
            self.other_writes += 1;
        }
        let done = done?;
        // sea-orm's results are made only by its connections: this one
        // is handed over through a mock database.
        MockDatabase::new(DbBackend::Sqlite)
            .append_exec_results([done])
            .execute(0, statement)
    }

    fn query(&mut self, _: usize, statement: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let values = params(&statement)?;
        let mut out = Vec::new();
        let mut failure = None;
        let mut ddl = false;
        let ran = self.with(|c| {
            let mut st = c.prepare_cached(&statement.sql)?;
            ddl = !st.readonly() && !changes_rows(&statement.sql);
            let names: Vec<String> = st.column_names().iter().map(|n| (*n).to_owned()).collect();
            let mut rows = st.query(rusqlite::params_from_iter(values.iter()))?;
            while let Some(row) = rows.next()? {
                let mut map = std::collections::BTreeMap::new();
                for (i, name) in names.iter().enumerate() {
                    match from_sql(name, row.get_ref(i)?) {
                        Ok(v) => {
                            map.insert(name.clone(), v);
                        }
                        Err(e) => {
                            failure = Some(e);
                            return Ok(());
                        }
                    }
                }
                out.push(map);
            }
            Ok(())
        });
        if ddl {
            self.other_writes += 1;
        }
        ran?;
        if let Some(e) = failure {
            return Err(e);
        }
        MockDatabase::new(DbBackend::Sqlite)
            .append_query_results([out])
            .query(0, statement)
    }

    fn begin(&mut self) {
        if self.depth == 1 && !self.careful() {
            self.bare_since = Some(self.mark());
        } else if self.depth >= 1 {
            self.batch(&format!("SAVEPOINT sy{}", self.depth));
        }
        self.depth += 1;
    }

    fn commit(&mut self) {
        if self.depth == 2 && self.bare_since.take().is_some() {
            self.depth = 1;
            self.transaction_gone();
            return;
        }
        self.end(|n| format!("RELEASE SAVEPOINT sy{n}"));
    }

    fn rollback(&mut self) {
        if self.depth == 2
            && let Some(since) = self.bare_since.take()
        {
            self.depth = 1;
            if !self.transaction_gone() && self.mark() != since {
                self.undone
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
        self.end(|n| format!("ROLLBACK TO SAVEPOINT sy{n}; RELEASE SAVEPOINT sy{n}"));
    }

    fn drain_transaction_log(&mut self) -> Vec<sea_orm::Transaction> {
        Vec::new()
    }

    fn get_database_backend(&self) -> DbBackend {
        DbBackend::Sqlite
    }

    fn ping(&self) -> Result<(), DbErr> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result column is typed by its name alone, so a name shared by
    /// several tables must mean one kind in all of them.
    #[test]
    fn a_column_name_means_one_kind_in_every_table() {
        let mut seen: HashMap<String, Kind> = HashMap::new();
        let all = all_columns();
        assert!(all.len() > 40, "every entity's columns: {}", all.len());
        for (name, kind) in all {
            if let Some(before) = seen.insert(name.clone(), kind) {
                assert_eq!(before, kind, "column {name}");
            }
        }
        assert_eq!(column_kinds().get("immediate"), Some(&Kind::Bool));
        assert_eq!(column_kinds().get("request_body"), Some(&Kind::Bytes));
        assert_eq!(column_kinds().get("tokens"), Some(&Kind::Float));
    }

    /// What SQLite stores comes back as the entity column's kind; a value
    /// of another kind is an error, not a guess.
    #[test]
    fn stored_values_come_back_as_their_columns_kind() {
        assert_eq!(
            from_sql("immediate", ValueRef::Integer(1)).unwrap(),
            Value::Bool(Some(true))
        );
        assert_eq!(
            from_sql("end_ns", ValueRef::Null).unwrap(),
            Value::BigInt(None)
        );
        assert_eq!(
            from_sql("observed", ValueRef::Null).unwrap(),
            Value::String(None)
        );
        assert_eq!(
            from_sql("next_ns", ValueRef::Integer(7)).unwrap(),
            Value::BigInt(Some(7))
        );
        assert!(from_sql("device_id", ValueRef::Integer(7)).is_err());
    }
}
