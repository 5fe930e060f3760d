//! Row ⇄ domain mapping and the statements shared by the store's
//! transactions, built from the entities for whichever backend runs them.

use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Select,
    sea_query::{Alias, Expr, ExprTrait},
};

use super::{db_err, entity, parse_settings};
use crate::domain::{
    Action, ActionId, ActionState, Command, Device, DeviceId, Error, Family, Params, Quantity,
    TenantId, Transition, Ts, Unit,
};
use entity::{action, audit, device};

pub(super) fn settings_json(s: &std::collections::BTreeMap<String, String>) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "{}".to_owned())
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("stored row has an invalid {what}"))
}

pub(super) fn device_from_model(m: device::Model) -> Result<Device, Error> {
    device_sharing_settings(m, &mut Settings::default())
}

/// Settings already read, by their stored form: devices configured alike
/// share one copy.
pub(super) type Settings =
    std::collections::HashMap<String, std::sync::Arc<std::collections::BTreeMap<String, String>>>;

/// A device from its row, its settings shared with those of `seen` that
/// are stored alike.
pub(super) fn device_sharing_settings(
    m: device::Model,
    seen: &mut Settings,
) -> Result<Device, Error> {
    let settings = match seen.get(&m.settings) {
        Some(s) => s.clone(),
        None => {
            let s = std::sync::Arc::new(parse_settings(&m.settings)?);
            seen.insert(m.settings.clone(), s.clone());
            s
        }
    };
    Ok(Device {
        id: DeviceId::parse(&m.device_id).map_err(|_| corrupt("device_id"))?,
        display_name: m.display_name,
        family: Family::parse(&m.family).ok_or_else(|| corrupt("family"))?,
        driver: m.driver,
        oem_device_id: m.oem_device_id,
        timezone: m.timezone,
        settings,
        revision: m.revision,
        created: Ts(m.create_ns),
        updated: Ts(m.update_ns),
        observed: match m.observed {
            None => None,
            Some(j) => Some(observed_from_json(&j, Ts(m.observed_ns.unwrap_or(0)))?),
        },
        incarnation: m.incarnation,
    })
}

/// The stored form of an observation (the `observed` column).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredObserved {
    scheduler_active: bool,
    rows: Vec<StoredRow>,
    soc_percent: Option<f64>,
    mode: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredRow {
    start: String,
    end: String,
    mode: String,
    enabled: bool,
    owner: String,
}

/// Observed state → JSON.
pub(super) fn observed_json(o: &crate::domain::Observed) -> String {
    let stored = StoredObserved {
        scheduler_active: o.scheduler_active,
        rows: o
            .rows
            .iter()
            .map(|r| StoredRow {
                start: r.start.clone(),
                end: r.end.clone(),
                mode: r.mode.clone(),
                enabled: r.enabled,
                owner: r.owner.as_str().to_owned(),
            })
            .collect(),
        soc_percent: o.soc_percent,
        mode: o.mode.clone(),
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

/// JSON → observed state. An unreadable observation is an error, not
/// "never observed": that would let pushes past an active native
/// scheduler.
fn observed_from_json(j: &str, at: Ts) -> Result<crate::domain::Observed, Error> {
    use crate::domain::device::{NativeRow, RowOwner};
    let v: StoredObserved = serde_json::from_str(j).map_err(|_| corrupt("observed state"))?;
    let rows = v
        .rows
        .into_iter()
        .map(|r| {
            let owner = match r.owner.as_str() {
                "OURS" => RowOwner::Ours,
                "FOREIGN" => RowOwner::Foreign,
                "PROTECTED" => RowOwner::Protected,
                _ => return Err(corrupt("native row owner")),
            };
            Ok(NativeRow {
                start: r.start,
                end: r.end,
                mode: r.mode,
                enabled: r.enabled,
                owner,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(crate::domain::Observed {
        scheduler_active: v.scheduler_active,
        rows,
        soc_percent: v.soc_percent,
        mode: v.mode,
        at,
    })
}

/// A statement every push runs, rendered by sea-query once per backend
/// and kept; each run binds its own values to the kept text. Rendering
/// one (its expression tree built, cloned, walked and dropped) cost the
/// SQLite writer about as much as SQLite took to run it: an eighth of the
/// writer's time per push (docs/performance.md).
///
/// A kept statement's text must not depend on its values, and the values
/// a caller binds must be the ones sea-query would have bound, in its
/// order. Builds with debug assertions (every test run) render the
/// statement afresh at every use and compare the two, text and values;
/// other builds render it afresh whenever the number of values differs
/// from the kept text's, rather than bind them to the wrong placeholders.
pub(super) struct Kept([std::sync::OnceLock<(String, usize)>; 2]);

impl Kept {
    pub(super) const fn new() -> Self {
        Self([std::sync::OnceLock::new(), std::sync::OnceLock::new()])
    }

    /// The statement `fresh` renders, from the text kept for `backend`
    /// with `values` bound.
    pub(super) fn statement(
        &self,
        backend: sea_orm::DbBackend,
        values: Vec<sea_orm::Value>,
        fresh: impl Fn() -> sea_orm::Statement,
    ) -> sea_orm::Statement {
        let cell = match backend {
            sea_orm::DbBackend::Postgres => &self.0[1],
            _ => &self.0[0],
        };
        let bound = |s: &sea_orm::Statement| s.values.as_ref().map_or(0, |v| v.0.len());
        let (sql, n) = cell.get_or_init(|| {
            let f = fresh();
            let n = bound(&f);
            (f.sql, n)
        });
        if values.len() != *n {
            tracing::error!(
                sql,
                "a kept statement was given {} values for {n}",
                values.len()
            );
            return fresh();
        }
        let kept = sea_orm::Statement::from_sql_and_values(backend, sql.as_str(), values);
        #[cfg(debug_assertions)]
        {
            let f = fresh();
            let bound =
                |s: &sea_orm::Statement| s.values.as_ref().map(|v| v.0.clone()).unwrap_or_default();
            assert_eq!(
                kept.sql, f.sql,
                "a kept statement's text changed with its values"
            );
            assert_eq!(
                bound(&kept),
                bound(&f),
                "a kept statement bound other values than sea-query would: {}",
                f.sql
            );
        }
        kept
    }
}

/// The values an insert of `row` binds: those of the columns it sets, in
/// the entity's column order (as sea-orm's insert renders them).
pub(super) fn set_values<A: sea_orm::ActiveModelTrait>(row: &A) -> Vec<sea_orm::Value> {
    use sea_orm::Iterable;
    <A::Entity as EntityTrait>::Column::iter()
        .filter_map(|c| row.get(c).into_value())
        .collect()
}

/// Runs `select`, kept in `kept` (see [`Kept`]) with `values` bound.
pub(super) async fn all_kept<E, C>(
    conn: &C,
    kept: &Kept,
    values: Vec<sea_orm::Value>,
    select: impl Fn() -> Select<E>,
) -> Result<Vec<E::Model>, Error>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    let backend = conn.get_database_backend();
    let stmt = kept.statement(backend, values, || select().build(backend));
    // Not `E::find().from_raw_sql`: that builds a select of every column
    // only to drop it.
    <E::Model as FromQueryResult>::find_by_statement(stmt)
        .all(conn)
        .await
        .map_err(db_err)
}

/// The insert of `row` that `insert` renders, kept in `kept`.
pub(super) fn kept_insert<A>(
    backend: sea_orm::DbBackend,
    kept: &Kept,
    row: A,
    insert: impl Fn(A) -> sea_orm::Insert<A>,
) -> sea_orm::Statement
where
    A: sea_orm::ActiveModelTrait + Clone,
{
    let values = set_values(&row);
    kept.statement(backend, values, || insert(row.clone()).build(backend))
}

/// PostgreSQL: runs `statements` (each rendered with its own `$1`…) as one
/// statement, each but the last a data-modifying `WITH` of the last: one
/// round trip and one execution instead of one each. PostgreSQL runs each
/// exactly once and to completion, in an order of its own (the last
/// first); unique and exclusion constraints are checked row by row as
/// they would be statement by statement, foreign keys at the statement's
/// end, so the statements must not depend on each other's rows. The text
/// is kept in `kept` (the same statements in the same order each time).
/// Answers the rows the last statement wrote. Statements whose text
/// [`renumber`] cannot read are run one by one instead.
/// Answers the database's own error (`db_err` makes it the service's).
pub(super) async fn execute_together<C: ConnectionTrait>(
    conn: &C,
    kept: &Kept,
    statements: Vec<sea_orm::Statement>,
) -> Result<u64, sea_orm::DbErr> {
    let backend = conn.get_database_backend();
    if statements.iter().any(|s| !renumbers(&s.sql)) {
        let mut last = 0;
        for s in statements {
            last = conn.execute_raw(s).await?.rows_affected();
        }
        return Ok(last);
    }
    let values = || -> Vec<sea_orm::Value> {
        statements
            .iter()
            .flat_map(|s| s.values.iter().flat_map(|v| v.0.iter().cloned()))
            .collect()
    };
    // Rendered only when the text is not kept yet (and in debug builds,
    // to check the kept text).
    let together = || {
        let mut sql = String::new();
        let mut bound = 0;
        let last = statements.len().saturating_sub(1);
        for (i, s) in statements.iter().enumerate() {
            if i < last {
                sql.push_str(if i == 0 { "WITH " } else { ", " });
                sql.push_str(&format!("w{i} AS ("));
            }
            sql.push_str(&renumber(&s.sql, bound));
            if i < last {
                sql.push_str(") ");
            }
            bound += s.values.as_ref().map_or(0, |v| v.0.len());
        }
        sea_orm::Statement::from_sql_and_values(backend, sql, values())
    };
    let stmt = kept.statement(backend, values(), together);
    Ok(conn.execute_raw(stmt).await?.rows_affected())
}

/// Whether [`renumber`] reads `sql` right: no backslash (an `E''`
/// literal's escape), dollar quote or comment, which it does not parse.
fn renumbers(sql: &str) -> bool {
    let unread = ["\\", "$$", "--", "/*"];
    let tagged = sql
        .split('$')
        .skip(1)
        .any(|t| t.starts_with(|c: char| c.is_alphabetic() || c == '_'));
    !tagged && !unread.iter().any(|u| sql.contains(u))
}

/// `sql` with each PostgreSQL placeholder `$n` made `$(n + by)`; text in
/// quotes (literals, identifiers) is left as it is. Only for text
/// [`renumbers`] accepts.
fn renumber(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    n.push(d);
                    chars.next();
                }
                match n.parse::<usize>() {
                    Ok(n) => out.push_str(&format!("${}", n + by)),
                    Err(_) => {
                        out.push('$');
                        out.push_str(&n);
                    }
                }
            }
            None => out.push(c),
        }
    }
    out
}

/// Runs `select` and decodes every row: a row that does not decode is
/// INTERNAL (never a panic), reported by itself.
pub(super) async fn all<E, C>(conn: &C, select: Select<E>) -> Result<Vec<E::Model>, Error>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    select.all(conn).await.map_err(db_err)
}

/// The row a lookup by key finds, if any. Not `Select::one`: that adds
/// `LIMIT ?`, which a lookup by key does not need, and which SQLite,
/// before its connections planned each statement once (`plan_once`),
/// prepared afresh as the bound limit changed (measured then: one extra
/// prepare per push).
pub(super) async fn first<E, C>(conn: &C, select: Select<E>) -> Result<Option<E::Model>, Error>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    Ok(select.all(conn).await.map_err(db_err)?.into_iter().next())
}

/// Rows of `select`, each decoded on its own: one that does not decode
/// does not hide the others.
pub(super) async fn each<E, C>(
    conn: &C,
    select: Select<E>,
) -> Result<Vec<Result<E::Model, Error>>, Error>
where
    E: EntityTrait,
    C: ConnectionTrait,
{
    let stmt = select.build(conn.get_database_backend());
    let rows = conn.query_all_raw(stmt).await.map_err(db_err)?;
    Ok(rows
        .iter()
        .map(|r| E::Model::from_query_result(r, "").map_err(db_err))
        .collect())
}

/// One device. `lock`: inside a write transaction, lock its row until the
/// transaction ends (PostgreSQL's `FOR UPDATE`; SQLite's `BEGIN IMMEDIATE`
/// already holds the whole database): every write to a device's actions
/// takes this lock first, so writers of one device queue on it in one
/// order.
pub(super) async fn fetch_device<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    id: &DeviceId,
    lock: bool,
) -> Result<Option<Device>, Error> {
    static LOCKED: Kept = Kept::new();
    static READ: Kept = Kept::new();
    let select = || {
        let q = device::Entity::find()
            .filter(device::Column::TenantId.eq(tenant.as_str()))
            .filter(device::Column::DeviceId.eq(id.as_str()));
        if lock { q.lock_exclusive() } else { q }
    };
    let values = vec![tenant.as_str().into(), id.as_str().into()];
    let kept = if lock { &LOCKED } else { &READ };
    all_kept(conn, kept, values, select)
        .await?
        .into_iter()
        .next()
        .map(device_from_model)
        .transpose()
}

pub(super) fn device_row(tenant: &TenantId, d: &Device) -> device::ActiveModel {
    device::ActiveModel {
        tenant_id: Set(tenant.as_str().to_owned()),
        device_id: Set(d.id.as_str().to_owned()),
        display_name: Set(d.display_name.clone()),
        family: Set(d.family.as_str().to_owned()),
        driver: Set(d.driver.clone()),
        oem_device_id: Set(d.oem_device_id.clone()),
        timezone: Set(d.timezone.clone()),
        settings: Set(settings_json(&d.settings)),
        revision: Set(d.revision),
        create_ns: Set(d.created.0),
        update_ns: Set(d.updated.0),
        observed: Set(d.observed.as_ref().map(observed_json)),
        observed_ns: Set(d.observed.as_ref().map(|o| o.at.0)),
        incarnation: Set(d.incarnation.clone()),
    }
}

/// Inserts a device; `false` (nothing written) when its id is taken.
pub(super) async fn insert_device<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    d: &Device,
) -> Result<bool, Error> {
    let n = device::Entity::insert(device_row(tenant, d))
        .on_conflict(
            sea_orm::sea_query::OnConflict::columns([
                device::Column::TenantId,
                device::Column::DeviceId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(conn)
        .await
        .map_err(db_err)?;
    Ok(n == 1)
}

fn quantity(value: Option<f64>, unit: Option<&str>, what: &str) -> Result<Option<Quantity>, Error> {
    match (value, unit) {
        (Some(value), Some(u)) => Ok(Some(Quantity {
            value,
            unit: Unit::parse(u).ok_or_else(|| corrupt(what))?,
        })),
        _ => Ok(None),
    }
}

pub(super) fn action_from_model(m: &action::Model) -> Result<Action, Error> {
    let super::Planned {
        id,
        device_id,
        command,
        params,
        start,
        end,
    } = planned_from_model(m)?;
    Ok(Action {
        id,
        device_id,
        channel: m.channel.clone(),
        command,
        params,
        start,
        end,
        immediate: m.immediate,
        state: ActionState::parse(&m.state).ok_or_else(|| corrupt("state"))?,
        replaced_by: m
            .replaced_by
            .as_deref()
            .map(|s| ActionId::parse(s).map_err(|_| corrupt("replaced_by")))
            .transpose()?,
        queued_after: m
            .queued_after
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| ActionId::parse(s).map_err(|_| corrupt("queued_after")))
            .collect::<Result<_, _>>()?,
        error_code: m.error_code.clone(),
        error_message: m.error_message.clone(),
        oem_response: m.oem_raw.clone(),
        verified: m.verified,
        revision: m.revision,
        created: Ts(m.create_ns),
        updated: Ts(m.update_ns),
    })
}

/// What a claimed job holds of its action's row
/// ([`super::dispatch::Planned`]); [`action_from_model`] reads the rest.
pub(super) fn planned_from_model(m: &action::Model) -> Result<super::Planned, Error> {
    Ok(super::Planned {
        id: ActionId::parse(&m.action_id).map_err(|_| corrupt("action_id"))?,
        device_id: DeviceId::parse(&m.device_id).map_err(|_| corrupt("device_id"))?,
        command: Command::parse(&m.command).ok_or_else(|| corrupt("command"))?,
        params: Params {
            power: quantity(m.power_value, m.power_unit.as_deref(), "power_unit")?,
            target_soc: quantity(m.target_value, m.target_unit.as_deref(), "target_unit")?,
            reserve_soc: quantity(m.reserve_value, m.reserve_unit.as_deref(), "reserve_unit")?,
        },
        start: Ts(m.start_ns),
        end: m.end_ns.map(Ts),
    })
}

/// The actions of a tenant matching `cond`.
pub(super) fn actions_of(tenant: &TenantId) -> Select<action::Entity> {
    action::Entity::find().filter(action::Column::TenantId.eq(tenant.as_str()))
}

/// One action of a device; `lock` as in [`fetch_device`].
pub(super) async fn fetch_action<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    device_id: &DeviceId,
    action_id: &ActionId,
    lock: bool,
) -> Result<Option<Action>, Error> {
    let mut q = actions_of(tenant)
        .filter(action::Column::DeviceId.eq(device_id.as_str()))
        .filter(action::Column::ActionId.eq(action_id.to_string()));
    if lock {
        q = q.lock_exclusive();
    }
    first(conn, q)
        .await?
        .as_ref()
        .map(action_from_model)
        .transpose()
}

/// An UPDATE that lets go of the claims on the rows it is filtered to
/// (their lease and owner cleared).
pub(super) fn release_claims() -> sea_orm::UpdateMany<action::Entity> {
    action::Entity::update_many()
        .col_expr(
            action::Column::LeaseUntilNs,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(
            action::Column::LeaseOwner,
            Expr::value(Option::<String>::None),
        )
}

/// Which holding actions to read.
#[derive(Clone, Copy, Debug)]
pub(super) struct HoldingFilter<'a> {
    /// One channel, or all.
    pub channel: Option<&'a str>,
    /// Only those still holding at or after this instant (their end is
    /// later, or they have none): nothing that ends before a push starts
    /// can collide with it, wherever a strategy moves it.
    pub ending_after: Option<Ts>,
}

/// The holding condition: [`lifecycle::holds_channel`] in SQL, built from
/// the domain's states, as literals. A bound parameter here would make
/// SQLite prepare the statement afresh at every push: its value decides
/// whether the partial index of owed work applies.
///
/// [`lifecycle::holds_channel`]: crate::domain::lifecycle::holds_channel
pub(super) fn holding() -> sea_orm::sea_query::Expr {
    Expr::cust(holding_sql())
}

/// Rows that owe work, as SQL text: the predicate of the partial indexes
/// of owed work (`actions_owed`, `actions_holding_owed`), which a query
/// must state literally for the index to be chosen.
pub(super) const OWED_SQL: &str = "work <> 'NONE'";

/// When an action came to owe nothing (migration 22; NULL while it owes
/// work, and on rows finished before it or by an earlier version until
/// the retention sweep stamps them). Not in the entity: only written
/// with the work, and read by the retention sweep.
pub(super) const FINISHED_NS: &str = "finished_ns";

/// [`holding`] as SQL text: owed ([`OWED_SQL`], the predicate of the
/// partial index `actions_holding_owed`, migration 18: every holder owes
/// work), then holding.
pub(super) fn holding_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let states: Vec<String> = ActionState::ALL
            .iter()
            .filter(|s| crate::domain::lifecycle::holds_channel(**s, None))
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!(
            "{OWED_SQL} AND (state IN ({}) OR work = '{}')",
            states.join(", "),
            crate::domain::Work::Revert.as_str()
        )
    });
    SQL.as_str()
}

/// Actions of a device that hold their channel, by start, locked for the
/// transaction (PostgreSQL): a dispatcher's claim of one of them waits, or
/// skips it. A cancelled action whose early revert is still owed holds its
/// channel too (reported as in flight), so nothing new is applied before
/// the old command is undone.
pub(super) async fn holding_actions<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    device_id: &DeviceId,
    f: HoldingFilter<'_>,
) -> Result<Vec<Action>, Error> {
    let select = || holding_select(tenant, device_id, f);
    // A push's: kept (it runs for every push).
    if let (Some(c), Some(t)) = (f.channel, f.ending_after) {
        static KEPT: Kept = Kept::new();
        let (tenant, device) = (tenant.as_str(), device_id.as_str());
        let values = vec![
            tenant.into(),
            device.into(),
            c.into(),
            t.0.into(),
            tenant.into(),
            device.into(),
            c.into(),
            t.0.into(),
            i64::MIN.into(),
        ];
        return all_kept(conn, &KEPT, values, select)
            .await?
            .iter()
            .map(action_from_model)
            .collect();
    }
    all(conn, select())
        .await?
        .iter()
        .map(action_from_model)
        .collect()
}

/// The holders [`holding_actions`] reads.
pub(super) fn holding_select(
    tenant: &TenantId,
    device_id: &DeviceId,
    f: HoldingFilter<'_>,
) -> Select<action::Entity> {
    let mut q = actions_of(tenant)
        .filter(action::Column::DeviceId.eq(device_id.as_str()))
        .filter(holding());
    if let Some(c) = f.channel {
        q = q.filter(action::Column::Channel.eq(c));
    }
    if let Some(t) = f.ending_after {
        q = q.filter(
            action::Column::EndNs
                .is_null()
                .or(action::Column::EndNs.gt(t.0)),
        );
        // Holders of one channel never overlap (the decision keeps them
        // apart; on PostgreSQL the exclusion constraint too), so of those
        // starting at or before `t` only the last can still hold at `t`:
        // the scan starts there, not at the channel's first holder, and a
        // device with a long schedule costs a push no more than a short one.
        if let Some(c) = f.channel {
            let floor = sea_orm::sea_query::Query::select()
                .expr(Expr::col(action::Column::StartNs).max())
                .from(action::Entity)
                .and_where(action::Column::TenantId.eq(tenant.as_str()))
                .and_where(action::Column::DeviceId.eq(device_id.as_str()))
                .and_where(action::Column::Channel.eq(c))
                .and_where(holding())
                .and_where(action::Column::StartNs.lte(t.0))
                .to_owned();
            // None starts at or before `t`: no floor.
            let floor = sea_orm::sea_query::Func::coalesce([
                Expr::SubQuery(
                    None,
                    Box::new(
                        sea_orm::sea_query::QueryStatementBuilder::into_sub_query_statement(floor),
                    ),
                ),
                Expr::val(i64::MIN),
            ]);
            q = q.filter(Expr::col(action::Column::StartNs).gte(floor));
        }
    }
    q.order_by_asc(action::Column::StartNs)
        .order_by_asc(action::Column::ActionId)
        .lock_exclusive()
}

pub(super) async fn insert_action<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    a: &Action,
    clear_native: bool,
) -> Result<(), Error> {
    let stmt = action_insert(conn.get_database_backend(), tenant, a, clear_native);
    conn.execute_raw(stmt).await.map_err(db_err)?;
    Ok(())
}

/// The insert of a new action ([`insert_action`]).
pub(super) fn action_insert(
    backend: sea_orm::DbBackend,
    tenant: &TenantId,
    a: &Action,
    clear_native: bool,
) -> sea_orm::Statement {
    let p = &a.params;
    let queued: Vec<String> = a.queued_after.iter().map(ToString::to_string).collect();
    let row = action::ActiveModel {
        tenant_id: Set(tenant.as_str().to_owned()),
        action_id: Set(a.id.to_string()),
        device_id: Set(a.device_id.as_str().to_owned()),
        channel: Set(a.channel.clone()),
        command: Set(a.command.as_str().to_owned()),
        power_value: Set(p.power.map(|q| q.value)),
        power_unit: Set(p.power.map(|q| q.unit.as_str().to_owned())),
        target_value: Set(p.target_soc.map(|q| q.value)),
        target_unit: Set(p.target_soc.map(|q| q.unit.as_str().to_owned())),
        reserve_value: Set(p.reserve_soc.map(|q| q.value)),
        reserve_unit: Set(p.reserve_soc.map(|q| q.unit.as_str().to_owned())),
        start_ns: Set(a.start.0),
        end_ns: Set(a.end.map(|e| e.0)),
        immediate: Set(a.immediate),
        state: Set(a.state.as_str().to_owned()),
        replaced_by: Set(a.replaced_by.map(|r| r.to_string())),
        queued_after: Set(queued.join(",")),
        error_code: Set(a.error_code.clone()),
        error_message: Set(a.error_message.clone()),
        revision: Set(a.revision),
        create_ns: Set(a.created.0),
        update_ns: Set(a.updated.0),
        work: Set(crate::domain::Work::Apply.as_str().to_owned()),
        due_ns: Set(Some(a.start.0)),
        lease_until_ns: Set(None),
        lease_owner: Set(None),
        attempts: Set(0),
        clear_native: Set(clear_native),
        oem_raw: Set(None),
        verified: Set(false),
        driver_memo: Set(None),
        fence: Set(0),
    };
    static KEPT: Kept = Kept::new();
    kept_insert(backend, &KEPT, row, action::Entity::insert)
}

/// The row of one action of a tenant.
fn one_action(tenant: &TenantId, id: &ActionId) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(action::Column::TenantId.eq(tenant.as_str()))
        .add(action::Column::ActionId.eq(id.to_string()))
}

/// Sets what the dispatcher owes an action (`None`: nothing), due at `due`,
/// with `attempts` tries made. A claim on the row is kept: an ACTIVE action
/// cancelled while its end-of-window revert is in flight is recorded by
/// that revert (or reverted again once the claim lapses), never twice at
/// once.
pub(super) async fn set_work<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    id: &ActionId,
    work: Option<crate::domain::Work>,
    due: Option<Ts>,
    attempts: i64,
    now: Ts,
) -> Result<(), Error> {
    // A dispatcher's claim on work not started (claimed ahead of a due
    // time still more than the clock skew allowed between replicas
    // away), or on a row that owes nothing any more, is let go: what is
    // owed now is claimed afresh (a revert owed at once is not kept
    // waiting for the old due time). A claim on work that may be in
    // flight stays, for its outcome to be recorded.
    let released = |col: action::Column, none: sea_orm::Value| -> Expr {
        if work.is_none() {
            Expr::value(none)
        } else {
            Expr::case(
                action::Column::DueNs.gt(now.0.saturating_add(super::CLOCK_SKEW_NANOS)),
                Expr::value(none),
            )
            .finally(Expr::col(col))
            .into()
        }
    };
    action::Entity::update_many()
        .col_expr(
            action::Column::LeaseOwner,
            released(action::Column::LeaseOwner, sea_orm::Value::String(None)),
        )
        .col_expr(
            action::Column::LeaseUntilNs,
            released(action::Column::LeaseUntilNs, sea_orm::Value::BigInt(None)),
        )
        .col_expr(
            action::Column::Work,
            Expr::value(work.map_or("NONE", |w| w.as_str())),
        )
        .col_expr(action::Column::DueNs, Expr::value(due.map(|d| d.0)))
        .col_expr(action::Column::Attempts, Expr::value(attempts))
        .col_expr(
            Alias::new(FINISHED_NS),
            Expr::value(work.is_none().then_some(now.0)),
        )
        .filter(one_action(tenant, id))
        .exec(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Writes an action's state, outcome fields, revision and update time.
pub(super) async fn update_action_state<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    a: &Action,
) -> Result<(), Error> {
    action::Entity::update_many()
        .col_expr(action::Column::State, Expr::value(a.state.as_str()))
        .col_expr(
            action::Column::ReplacedBy,
            Expr::value(a.replaced_by.map(|r| r.to_string())),
        )
        .col_expr(action::Column::ErrorCode, Expr::value(a.error_code.clone()))
        .col_expr(
            action::Column::ErrorMessage,
            Expr::value(a.error_message.clone()),
        )
        .col_expr(action::Column::Revision, Expr::value(a.revision))
        .col_expr(action::Column::UpdateNs, Expr::value(a.updated.0))
        .filter(one_action(tenant, &a.id))
        .exec(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one per column
fn audit_row(
    tenant: &TenantId,
    device_id: &DeviceId,
    action_id: Option<String>,
    from: Option<&str>,
    to: &str,
    reason: &str,
    request_id: Option<&str>,
    at: Ts,
) -> audit::ActiveModel {
    audit::ActiveModel {
        seq: NotSet,
        tenant_id: Set(tenant.as_str().to_owned()),
        device_id: Set(device_id.as_str().to_owned()),
        action_id: Set(action_id),
        from_state: Set(from.map(str::to_owned)),
        to_state: Set(to.to_owned()),
        reason: Set(reason.to_owned()),
        request_id: Set(request_id.map(str::to_owned)),
        at_ns: Set(at.0),
        event_cursor: NotSet,
        endpoint_id: NotSet,
    }
}

/// The audit entry of an action's transition.
pub(super) fn transition_row(
    tenant: &TenantId,
    t: &Transition,
    request_id: Option<&str>,
    at: Ts,
) -> audit::ActiveModel {
    audit_row(
        tenant,
        &t.device_id,
        Some(t.action_id.to_string()),
        t.from.map(ActionState::as_str),
        t.to.as_str(),
        &t.reason,
        request_id,
        at,
    )
}

pub(super) async fn audit<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    t: &Transition,
    request_id: Option<&str>,
    at: Ts,
) -> Result<(), Error> {
    let stmt = audit_insert(conn.get_database_backend(), tenant, t, request_id, at);
    conn.execute_raw(stmt).await.map_err(db_err)?;
    Ok(())
}

/// The insert of a transition's audit entry ([`audit`]).
pub(super) fn audit_insert(
    backend: sea_orm::DbBackend,
    tenant: &TenantId,
    t: &Transition,
    request_id: Option<&str>,
    at: Ts,
) -> sea_orm::Statement {
    static KEPT: Kept = Kept::new();
    let row = transition_row(tenant, t, request_id, at);
    kept_insert(backend, &KEPT, row, audit::Entity::insert)
}

/// Records a device-level change (no action).
pub(super) async fn audit_device<C: ConnectionTrait>(
    conn: &C,
    tenant: &TenantId,
    device_id: &DeviceId,
    change: &str,
    request_id: Option<&str>,
    at: Ts,
) -> Result<(), Error> {
    let row = audit_row(
        tenant, device_id, None, None, change, "DEVICE", request_id, at,
    );
    audit::Entity::insert(row)
        .exec_without_returning(conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements run together number their placeholders on from the
    /// statements before them; quoted text is not touched.
    #[test]
    fn placeholders_are_numbered_on_and_quotes_kept() {
        assert_eq!(
            renumber(
                r#"INSERT INTO "a$1" (x, y) VALUES ($1, $12) WHERE z = '$2' AND w = $2"#,
                3
            ),
            r#"INSERT INTO "a$1" (x, y) VALUES ($4, $15) WHERE z = '$2' AND w = $5"#
        );
        assert_eq!(renumber("SELECT $1", 0), "SELECT $1");
        assert_eq!(
            renumber("SELECT 'it''s $1', $1", 1),
            "SELECT 'it''s $1', $2"
        );
        assert_eq!(renumber("SELECT $a, $", 9), "SELECT $a, $");
        // What it does not parse is run statement by statement instead.
        assert!(renumbers(
            r#"INSERT INTO "t" ("a") VALUES ($1) WHERE x = 'y'"#
        ));
        for unread in [
            r"SELECT E'it\'s $1', $1",
            "SELECT $$ $1 $$, $1",
            "SELECT $tag$ $1 $tag$, $1",
            "SELECT $1 -- $2",
            "SELECT /* $2 */ $1",
        ] {
            assert!(!renumbers(unread), "{unread}");
        }
    }

    /// A claimed job's action is the row's own, field by field: each
    /// quantity with its unit, the window's two ends, the command.
    #[test]
    fn a_planned_action_is_its_rows_own() {
        let m = action::Model {
            tenant_id: "t".into(),
            action_id: ActionId::from_u128(9).to_string(),
            device_id: "dev-3".into(),
            channel: "battery".into(),
            command: Command::Discharge.as_str().into(),
            power_value: Some(2.5),
            power_unit: Some("kW".into()),
            target_value: Some(40.0),
            target_unit: Some("%".into()),
            reserve_value: Some(15.0),
            reserve_unit: Some("%".into()),
            start_ns: 1_000,
            end_ns: Some(5_000),
            immediate: false,
            state: "ACKNOWLEDGED".into(),
            replaced_by: None,
            queued_after: String::new(),
            error_code: None,
            error_message: None,
            revision: 2,
            create_ns: 10,
            update_ns: 20,
            work: "APPLY".into(),
            due_ns: Some(1_000),
            lease_until_ns: Some(9_000),
            lease_owner: Some("claim".into()),
            attempts: 0,
            clear_native: false,
            oem_raw: None,
            verified: false,
            driver_memo: None,
            fence: 1,
        };
        let planned = planned_from_model(&m).unwrap();
        assert_eq!(
            planned,
            super::super::Planned::from(&action_from_model(&m).unwrap())
        );
        assert_eq!(planned.id, ActionId::from_u128(9));
        assert_eq!(planned.device_id.as_str(), "dev-3");
        assert_eq!(planned.command, Command::Discharge);
        assert_eq!((planned.start, planned.end), (Ts(1_000), Some(Ts(5_000))));
        let q = |q: Option<switchyard_drivers::Quantity>| q.map(|q| (q.value, q.unit.as_str()));
        assert_eq!(q(planned.params.power), Some((2.5, "kW")));
        assert_eq!(q(planned.params.target_soc), Some((40.0, "%")));
        assert_eq!(q(planned.params.reserve_soc), Some((15.0, "%")));
    }
}
