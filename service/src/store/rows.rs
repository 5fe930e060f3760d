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

pub(super) fn device_from_row(r: &SqliteRow) -> Result<Device, Error> {
    let id: String = r.get("device_id");
    let family: String = r.get("family");
    let settings: String = r.get("settings");
    Ok(Device {
        id: DeviceId::parse(&id).map_err(|_| corrupt("device_id"))?,
        display_name: r.get("display_name"),
        family: Family::parse(&family).ok_or_else(|| corrupt("family"))?,
        driver: r.get("driver"),
        oem_device_id: r.get("oem_device_id"),
        timezone: r.get("timezone"),
        settings: parse_settings(&settings)?,
        revision: r.get("revision"),
        created: Ts(r.get("create_ns")),
        updated: Ts(r.get("update_ns")),
        observed: r.get::<Option<String>, _>("observed").and_then(|j| {
            observed_from_json(&j, Ts(r.get::<Option<i64>, _>("observed_ns").unwrap_or(0)))
        }),
    })
}

/// Observed state → JSON.
pub(super) fn observed_json(o: &crate::domain::Observed) -> String {
    let rows: Vec<serde_json::Value> = o
        .rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "start": r.start, "end": r.end, "mode": r.mode,
                "enabled": r.enabled, "owner": r.owner.as_str(),
            })
        })
        .collect();
    serde_json::json!({
        "scheduler_active": o.scheduler_active,
        "rows": rows,
        "soc_percent": o.soc_percent,
        "mode": o.mode,
    })
    .to_string()
}

/// JSON → observed state; `None` if unreadable (treated as never observed).
fn observed_from_json(j: &str, at: Ts) -> Option<crate::domain::Observed> {
    use crate::domain::device::{NativeRow, RowOwner};
    let v: serde_json::Value = serde_json::from_str(j).ok()?;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    Some(crate::domain::Observed {
        scheduler_active: v["scheduler_active"].as_bool().unwrap_or(false),
        rows: v["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| NativeRow {
                        start: s(&r["start"]),
                        end: s(&r["end"]),
                        mode: s(&r["mode"]),
                        enabled: r["enabled"].as_bool().unwrap_or(false),
                        owner: match r["owner"].as_str() {
                            Some("OURS") => RowOwner::Ours,
                            Some("PROTECTED") => RowOwner::Protected,
                            _ => RowOwner::Foreign,
                        },
                    })
                    .collect()
            })
            .unwrap_or_default(),
        soc_percent: v["soc_percent"].as_f64(),
        mode: v["mode"].as_str().map(str::to_owned),
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
        "INSERT INTO devices (tenant_id, device_id, display_name, family, driver, oem_device_id, timezone, settings, revision, create_ns, update_ns)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(tx)
    .await
    .map_err(db_err)?;
    Ok(())
}

fn quantity(r: &SqliteRow, value: &str, unit: &str) -> Result<Option<Quantity>, Error> {
    let v: Option<f64> = r.get(value);
    let u: Option<String> = r.get(unit);
    match (v, u) {
        (Some(value), Some(u)) => Ok(Some(Quantity {
            value,
            unit: Unit::parse(&u).ok_or_else(|| corrupt(unit))?,
        })),
        _ => Ok(None),
    }
}

pub(super) fn action_from_row(r: &SqliteRow) -> Result<Action, Error> {
    let id: String = r.get("action_id");
    let device: String = r.get("device_id");
    let command: String = r.get("command");
    let state: String = r.get("state");
    let replaced_by: Option<String> = r.get("replaced_by");
    let queued_after: String = r.get("queued_after");
    let immediate: i64 = r.get("immediate");
    Ok(Action {
        id: ActionId::parse(&id).map_err(|_| corrupt("action_id"))?,
        device_id: DeviceId::parse(&device).map_err(|_| corrupt("device_id"))?,
        channel: r.get("channel"),
        command: Command::parse(&command).ok_or_else(|| corrupt("command"))?,
        params: Params {
            power: quantity(r, "power_value", "power_unit")?,
            target_soc: quantity(r, "target_value", "target_unit")?,
            reserve_soc: quantity(r, "reserve_value", "reserve_unit")?,
        },
        start: Ts(r.get("start_ns")),
        end: r.get::<Option<i64>, _>("end_ns").map(Ts),
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
        error_code: r.get("error_code"),
        error_message: r.get("error_message"),
        oem_response: r.get("oem_raw"),
        verified: r.get::<i64, _>("verified") != 0,
        revision: r.get("revision"),
        created: Ts(r.get("create_ns")),
        updated: Ts(r.get("update_ns")),
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

/// Actions of a device that hold their channel, by start. A cancelled
/// action whose early revert is still owed holds it too (reported as in
/// flight), so nothing new is applied before the old command is undone.
pub(super) async fn holding_actions(
    tx: &mut SqliteConnection,
    tenant: &TenantId,
    device_id: &DeviceId,
    f: HoldingFilter<'_>,
) -> Result<Vec<Action>, Error> {
    let rs = sqlx::query(
        "SELECT * FROM actions WHERE tenant_id = ?1 AND device_id = ?2 AND (?3 = '' OR channel = ?3)
           AND (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT')
           AND (end_ns IS NULL OR end_ns > ?4)
         ORDER BY start_ns, action_id",
    )
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
