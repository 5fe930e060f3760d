//! Row ⇄ domain mapping and the statements shared by the store's
//! transactions.

use sqlx::{Row, SqliteConnection, sqlite::SqliteRow};

use super::{db_err, parse_settings};
use crate::domain::{
    Action, ActionId, ActionState, Command, Device, DeviceId, Error, Family, Params, Quantity,
    TenantId, Transition, Ts, Unit,
};

pub(super) fn settings_json(s: &std::collections::BTreeMap<String, String>) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "{}".to_owned())
}

fn corrupt(what: &str) -> Error {
    Error::Internal(format!("stored row has an invalid {what}"))
}

/// A column of a row; a value that does not decode is INTERNAL, never a
/// panic.
pub(super) fn col<'r, T>(r: &'r SqliteRow, name: &str) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    r.try_get(name)
        .map_err(|e| Error::Internal(format!("stored row: column {name}: {e}")))
}

pub(super) fn device_from_row(r: &SqliteRow) -> Result<Device, Error> {
    let id: String = col(r, "device_id")?;
    let family: String = col(r, "family")?;
    let settings: String = col(r, "settings")?;
    Ok(Device {
        id: DeviceId::parse(&id).map_err(|_| corrupt("device_id"))?,
        display_name: col(r, "display_name")?,
        family: Family::parse(&family).ok_or_else(|| corrupt("family"))?,
        driver: col(r, "driver")?,
        oem_device_id: col(r, "oem_device_id")?,
        timezone: col(r, "timezone")?,
        settings: parse_settings(&settings)?,
        revision: col(r, "revision")?,
        created: Ts(col(r, "create_ns")?),
        updated: Ts(col(r, "update_ns")?),
        observed: match col::<Option<String>>(r, "observed")? {
            None => None,
            Some(j) => Some(observed_from_json(
                &j,
                Ts(col::<Option<i64>>(r, "observed_ns")?.unwrap_or(0)),
            )?),
        },
        incarnation: col(r, "incarnation")?,
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

pub(super) async fn fetch_device<'e, E>(
    exec: E,
    tenant: &TenantId,
    id: &DeviceId,
) -> Result<Option<Device>, Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let row = sqlx::query("SELECT * FROM devices WHERE tenant_id = ? AND device_id = ?")
        .bind(tenant.as_str())
        .bind(id.as_str())
        .fetch_optional(exec)
        .await
        .map_err(db_err)?;
    row.as_ref().map(device_from_row).transpose()
}

pub(super) async fn insert_device(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    d: &Device,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id, timezone, settings, revision, create_ns, update_ns, incarnation, observed, observed_ns)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(tenant.as_str())
    .bind(d.id.as_str())
    .bind(&d.display_name)
    .bind(d.family.as_str())
    .bind(&d.driver)
    .bind(&d.oem_device_id)
    .bind(&d.timezone)
    .bind(settings_json(&d.settings))
    .bind(d.revision)
    .bind(d.created.0)
    .bind(d.updated.0)
    .bind(&d.incarnation)
    .bind(d.observed.as_ref().map(observed_json))
    .bind(d.observed.as_ref().map(|o| o.at.0))
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

fn quantity(r: &SqliteRow, value: &str, unit: &str) -> Result<Option<Quantity>, Error> {
    let v: Option<f64> = col(r, value)?;
    let u: Option<String> = col(r, unit)?;
    match (v, u) {
        (Some(value), Some(u)) => Ok(Some(Quantity {
            value,
            unit: Unit::parse(&u).ok_or_else(|| corrupt(unit))?,
        })),
        _ => Ok(None),
    }
}

pub(super) fn action_from_row(r: &SqliteRow) -> Result<Action, Error> {
    let id: String = col(r, "action_id")?;
    let device: String = col(r, "device_id")?;
    let command: String = col(r, "command")?;
    let state: String = col(r, "state")?;
    let replaced_by: Option<String> = col(r, "replaced_by")?;
    let queued_after: String = col(r, "queued_after")?;
    let immediate: i64 = col(r, "immediate")?;
    Ok(Action {
        id: ActionId::parse(&id).map_err(|_| corrupt("action_id"))?,
        device_id: DeviceId::parse(&device).map_err(|_| corrupt("device_id"))?,
        channel: col(r, "channel")?,
        command: Command::parse(&command).ok_or_else(|| corrupt("command"))?,
        params: Params {
            power: quantity(r, "power_value", "power_unit")?,
            target_soc: quantity(r, "target_value", "target_unit")?,
            reserve_soc: quantity(r, "reserve_value", "reserve_unit")?,
        },
        start: Ts(col(r, "start_ns")?),
        end: col::<Option<i64>>(r, "end_ns")?.map(Ts),
        immediate: immediate != 0,
        state: ActionState::parse(&state).ok_or_else(|| corrupt("state"))?,
        replaced_by: replaced_by
            .map(|s| ActionId::parse(&s).map_err(|_| corrupt("replaced_by")))
            .transpose()?,
        queued_after: queued_after
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| ActionId::parse(s).map_err(|_| corrupt("queued_after")))
            .collect::<Result<_, _>>()?,
        error_code: col(r, "error_code")?,
        error_message: col(r, "error_message")?,
        oem_response: col(r, "oem_raw")?,
        verified: col::<i64>(r, "verified")? != 0,
        revision: col(r, "revision")?,
        created: Ts(col(r, "create_ns")?),
        updated: Ts(col(r, "update_ns")?),
    })
}

pub(super) async fn fetch_action<'e, E>(
    exec: E,
    tenant: &TenantId,
    device_id: &DeviceId,
    action_id: &ActionId,
) -> Result<Option<Action>, Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    let row = sqlx::query(
        "SELECT * FROM actions WHERE tenant_id = ? AND device_id = ? AND action_id = ?",
    )
    .bind(tenant.as_str())
    .bind(device_id.as_str())
    .bind(action_id.to_string())
    .fetch_optional(exec)
    .await
    .map_err(db_err)?;
    row.as_ref().map(action_from_row).transpose()
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

/// The holders of a device's channel(s): the SQL form of
/// [`lifecycle::holds_channel`], built from the domain's states.
static HOLDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let states: Vec<String> = crate::domain::ActionState::ALL
        .iter()
        .filter(|s| crate::domain::lifecycle::holds_channel(**s, None))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!(
        "SELECT * FROM actions WHERE tenant_id = ?1 AND device_id = ?2 AND (?3 = '' OR channel = ?3)
           AND (state IN ({}) OR work = '{}')
           AND (end_ns IS NULL OR end_ns > ?4)
         ORDER BY start_ns, action_id",
        states.join(", "),
        crate::domain::Work::Revert.as_str()
    )
});

/// Actions of a device that hold their channel, by start. A cancelled
/// action whose early revert is still owed holds it too (reported as in
/// flight), so nothing new is applied before the old command is undone.
pub(super) async fn holding_actions(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    device_id: &DeviceId,
    f: HoldingFilter<'_>,
) -> Result<Vec<Action>, Error> {
    let rs = sqlx::query(sqlx::AssertSqlSafe(HOLDING_SQL.as_str()))
        .bind(tenant.as_str())
        .bind(device_id.as_str())
        .bind(f.channel.unwrap_or(""))
        .bind(f.ending_after.map_or(i64::MIN, |t| t.0))
        .fetch_all(tx)
        .await
        .map_err(db_err)?;
    rs.iter().map(action_from_row).collect()
}

pub(super) async fn insert_action(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    a: &Action,
    clear_native: bool,
) -> Result<(), Error> {
    let p = &a.params;
    let queued: Vec<String> = a.queued_after.iter().map(ToString::to_string).collect();
    sqlx::query(
        "INSERT INTO actions (tenant_id, action_id, device_id, channel, command,
            power_value, power_unit, target_value, target_unit, reserve_value, reserve_unit,
            start_ns, end_ns, immediate, state, replaced_by, queued_after, error_code, error_message,
            revision, create_ns, update_ns, work, due_ns, clear_native)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'APPLY', ?, ?)",
    )
    .bind(tenant.as_str())
    .bind(a.id.to_string())
    .bind(a.device_id.as_str())
    .bind(&a.channel)
    .bind(a.command.as_str())
    .bind(p.power.map(|q| q.value))
    .bind(p.power.map(|q| q.unit.as_str()))
    .bind(p.target_soc.map(|q| q.value))
    .bind(p.target_soc.map(|q| q.unit.as_str()))
    .bind(p.reserve_soc.map(|q| q.value))
    .bind(p.reserve_soc.map(|q| q.unit.as_str()))
    .bind(a.start.0)
    .bind(a.end.map(|e| e.0))
    .bind(i64::from(a.immediate))
    .bind(a.state.as_str())
    .bind(a.replaced_by.map(|r| r.to_string()))
    .bind(queued.join(","))
    .bind(&a.error_code)
    .bind(&a.error_message)
    .bind(a.revision)
    .bind(a.created.0)
    .bind(a.updated.0)
    .bind(a.start.0)
    .bind(i64::from(clear_native))
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Sets what the dispatcher owes an action (`None`: nothing), due at `due`,
/// with `attempts` tries made. A claim on the row is kept: an ACTIVE action
/// cancelled while its end-of-window revert is in flight is recorded by
/// that revert (or reverted again once the claim lapses), never twice at
/// once.
pub(super) async fn set_work(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    id: &ActionId,
    work: Option<crate::domain::Work>,
    due: Option<Ts>,
    attempts: i64,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE actions SET work = ?, due_ns = ?, attempts = ?
         WHERE tenant_id = ? AND action_id = ?",
    )
    .bind(work.map_or("NONE", |w| w.as_str()))
    .bind(due.map(|d| d.0))
    .bind(attempts)
    .bind(tenant.as_str())
    .bind(id.to_string())
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Writes an action's state, outcome fields, revision and update time.
pub(super) async fn update_action_state(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    a: &Action,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE actions SET state = ?, replaced_by = ?, error_code = ?, error_message = ?, revision = ?, update_ns = ?
         WHERE tenant_id = ? AND action_id = ?",
    )
    .bind(a.state.as_str())
    .bind(a.replaced_by.map(|r| r.to_string()))
    .bind(&a.error_code)
    .bind(&a.error_message)
    .bind(a.revision)
    .bind(a.updated.0)
    .bind(tenant.as_str())
    .bind(a.id.to_string())
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

pub(super) async fn audit(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    t: &Transition,
    request_id: Option<&str>,
    at: Ts,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, request_id, at_ns)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(tenant.as_str())
    .bind(t.device_id.as_str())
    .bind(t.action_id.to_string())
    .bind(t.from.map(ActionState::as_str))
    .bind(t.to.as_str())
    .bind(&t.reason)
    .bind(request_id)
    .bind(at.0)
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Records a device-level change (no action).
pub(super) async fn audit_device(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    device_id: &DeviceId,
    change: &str,
    request_id: Option<&str>,
    at: Ts,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, request_id, at_ns)
         VALUES (?, ?, NULL, NULL, ?, 'DEVICE', ?, ?)",
    )
    .bind(tenant.as_str())
    .bind(device_id.as_str())
    .bind(change)
    .bind(request_id)
    .bind(at.0)
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}
