//! proto ⇄ domain conversions. Conversions out of the domain destructure
//! every field, so a new field cannot be silently dropped.

use switchyard_drivers::{
    Capabilities, CommandSpec, ParamSpec, RateBudget, TimingShape, WindowLimits,
};
use switchyard_proto::v1 as pb;

use crate::domain::{
    Action, ActionState, Command, Device, Error, Family, Observed, Quantity, Reason, Strategy, Ts,
    Unit,
    device::{NativeRow, RowOwner},
    validate::RawQuantity,
};

/// Domain instant → protobuf Timestamp.
pub fn ts_to_proto(t: Ts) -> prost_types::Timestamp {
    let (seconds, nanos) = t.parts();
    prost_types::Timestamp { seconds, nanos }
}

/// protobuf Timestamp → domain instant, or an INVALID_WINDOW violation for
/// `field`.
pub fn ts_from_proto(t: &prost_types::Timestamp, field: &str) -> Result<Ts, Error> {
    Ts::from_parts(t.seconds, t.nanos).ok_or_else(|| {
        Error::invalid(
            field,
            Reason::InvalidWindow,
            "timestamp is out of range (nanos must be 0..1e9, years up to 2262)",
        )
    })
}

/// Domain command → proto.
pub fn command_to_proto(c: Command) -> pb::Command {
    match c {
        Command::Charge => pb::Command::Charge,
        Command::Discharge => pb::Command::Discharge,
        Command::Idle => pb::Command::Idle,
        Command::AutoBalanced => pb::Command::AutoBalanced,
        Command::AutoReserve => pb::Command::AutoReserve,
        Command::AutoExport => pb::Command::AutoExport,
        Command::EvPowerLimit => pb::Command::EvPowerLimit,
    }
}

/// proto command number → domain; `Ok(None)` for unspecified.
pub fn command_from_proto(n: i32) -> Result<Option<Command>, Error> {
    Ok(Some(match pb::Command::try_from(n) {
        Ok(pb::Command::Unspecified) => return Ok(None),
        Ok(pb::Command::Charge) => Command::Charge,
        Ok(pb::Command::Discharge) => Command::Discharge,
        Ok(pb::Command::Idle) => Command::Idle,
        Ok(pb::Command::AutoBalanced) => Command::AutoBalanced,
        Ok(pb::Command::AutoReserve) => Command::AutoReserve,
        Ok(pb::Command::AutoExport) => Command::AutoExport,
        Ok(pb::Command::EvPowerLimit) => Command::EvPowerLimit,
        Err(_) => {
            return Err(Error::invalid(
                "action.command",
                Reason::UnsupportedCommand,
                format!("unknown command number {n}"),
            ));
        }
    }))
}

/// Domain state → proto.
pub fn state_to_proto(s: ActionState) -> pb::ActionState {
    match s {
        ActionState::Scheduled => pb::ActionState::Scheduled,
        ActionState::Acknowledged => pb::ActionState::Acknowledged,
        ActionState::Active => pb::ActionState::Active,
        ActionState::Completed => pb::ActionState::Completed,
        ActionState::Failed => pb::ActionState::Failed,
        ActionState::Cancelled => pb::ActionState::Cancelled,
    }
}

/// proto state number → domain, for filters.
pub fn state_from_proto(n: i32, field: &str) -> Result<ActionState, Error> {
    match pb::ActionState::try_from(n) {
        Ok(pb::ActionState::Scheduled) => Ok(ActionState::Scheduled),
        Ok(pb::ActionState::Acknowledged) => Ok(ActionState::Acknowledged),
        Ok(pb::ActionState::Active) => Ok(ActionState::Active),
        Ok(pb::ActionState::Completed) => Ok(ActionState::Completed),
        Ok(pb::ActionState::Failed) => Ok(ActionState::Failed),
        Ok(pb::ActionState::Cancelled) => Ok(ActionState::Cancelled),
        Ok(pb::ActionState::Unspecified) | Err(_) => Err(Error::invalid(
            field,
            Reason::InvalidField,
            format!("{n} is not a valid action state"),
        )),
    }
}

/// Domain strategy → proto.
pub fn strategy_to_proto(s: Strategy) -> pb::ConflictStrategy {
    match s {
        Strategy::Reject => pb::ConflictStrategy::Unspecified,
        Strategy::CancelAndReplace => pb::ConflictStrategy::CancelAndReplace,
        Strategy::QueueAfter => pb::ConflictStrategy::QueueAfter,
    }
}

/// proto strategy number → domain.
pub fn strategy_from_proto(n: i32) -> Result<Strategy, Error> {
    match pb::ConflictStrategy::try_from(n) {
        Ok(pb::ConflictStrategy::Unspecified) => Ok(Strategy::Reject),
        Ok(pb::ConflictStrategy::CancelAndReplace) => Ok(Strategy::CancelAndReplace),
        Ok(pb::ConflictStrategy::QueueAfter) => Ok(Strategy::QueueAfter),
        Err(_) => Err(Error::invalid(
            "on_conflict",
            Reason::InvalidField,
            format!("{n} is not a valid conflict strategy"),
        )),
    }
}

/// Domain unit → proto.
pub fn unit_to_proto(u: Unit) -> pb::Unit {
    match u {
        Unit::Watt => pb::Unit::Watt,
        Unit::Kilowatt => pb::Unit::Kilowatt,
        Unit::Percent => pb::Unit::Percent,
    }
}

/// proto unit number → domain; `None` for unspecified or unknown.
pub fn unit_from_proto(n: i32) -> Option<Unit> {
    match pb::Unit::try_from(n) {
        Ok(pb::Unit::Watt) => Some(Unit::Watt),
        Ok(pb::Unit::Kilowatt) => Some(Unit::Kilowatt),
        Ok(pb::Unit::Percent) => Some(Unit::Percent),
        Ok(pb::Unit::Unspecified) | Err(_) => None,
    }
}

/// proto quantity → raw domain quantity.
pub fn raw_quantity(q: &pb::Quantity) -> RawQuantity {
    RawQuantity {
        value: q.value,
        unit: unit_from_proto(q.unit),
    }
}

fn quantity_to_proto(q: Quantity) -> pb::Quantity {
    pb::Quantity {
        value: q.value,
        unit: unit_to_proto(q.unit) as i32,
    }
}

/// Domain family → proto.
pub fn family_to_proto(f: Family) -> pb::DeviceFamily {
    match f {
        Family::Battery => pb::DeviceFamily::Battery,
        Family::EvCharger => pb::DeviceFamily::EvCharger,
        Family::SolarInverter => pb::DeviceFamily::SolarInverter,
    }
}

/// proto family number → domain; `Ok(None)` for unspecified.
pub fn family_from_proto(n: i32) -> Result<Option<Family>, Error> {
    match pb::DeviceFamily::try_from(n) {
        Ok(pb::DeviceFamily::Unspecified) => Ok(None),
        Ok(pb::DeviceFamily::Battery) => Ok(Some(Family::Battery)),
        Ok(pb::DeviceFamily::EvCharger) => Ok(Some(Family::EvCharger)),
        Ok(pb::DeviceFamily::SolarInverter) => Ok(Some(Family::SolarInverter)),
        Err(_) => Err(Error::invalid(
            "device.family",
            Reason::InvalidField,
            format!("{n} is not a valid device family"),
        )),
    }
}

fn timing_to_proto(t: TimingShape) -> pb::TimingShape {
    match t {
        TimingShape::Immediate => pb::TimingShape::Immediate,
        TimingShape::Scheduled => pb::TimingShape::Scheduled,
        TimingShape::Windowed => pb::TimingShape::Windowed,
    }
}

/// Capabilities → proto.
pub fn capabilities_to_proto(c: &Capabilities) -> pb::DeviceCapabilities {
    let Capabilities {
        commands,
        native_scheduler,
        window_limits,
        rate_budget,
    } = c;
    let WindowLimits {
        granularity_seconds,
        may_cross_midnight,
        max_slots,
    } = window_limits;
    let RateBudget {
        calls_per_day,
        min_write_interval_seconds,
    } = rate_budget;
    pb::DeviceCapabilities {
        commands: commands
            .iter()
            .map(|cs| {
                let CommandSpec {
                    command,
                    channel,
                    params,
                    timing,
                } = cs;
                pb::CommandCapability {
                    command: command_to_proto(*command) as i32,
                    channel: channel.clone(),
                    parameters: params
                        .iter()
                        .map(|p| {
                            let ParamSpec {
                                param,
                                required,
                                units,
                                min,
                                max,
                                bound_unit,
                            } = p;
                            pb::ParameterCapability {
                                name: param.name().to_owned(),
                                required: *required,
                                units: units.iter().map(|u| unit_to_proto(*u) as i32).collect(),
                                min: *min,
                                max: *max,
                                bound_unit: unit_to_proto(*bound_unit) as i32,
                            }
                        })
                        .collect(),
                    timing_shapes: timing.iter().map(|t| timing_to_proto(*t) as i32).collect(),
                }
            })
            .collect(),
        native_scheduler: *native_scheduler,
        window_limits: Some(pb::WindowLimits {
            granularity_seconds: *granularity_seconds,
            may_cross_midnight: *may_cross_midnight,
            max_slots: *max_slots,
        }),
        rate_budget: Some(pb::RateBudget {
            calls_per_day: *calls_per_day,
            min_write_interval_seconds: *min_write_interval_seconds,
        }),
    }
}

/// Device → proto, with the capabilities the driver declares for it.
pub fn device_to_proto(d: &Device, caps: Option<&Capabilities>) -> pb::Device {
    let Device {
        id,
        display_name,
        family,
        driver,
        oem_device_id,
        timezone,
        settings,
        revision: _,
        created,
        updated,
        observed,
    } = d;
    pb::Device {
        device_id: id.to_string(),
        display_name: display_name.clone(),
        family: family_to_proto(*family) as i32,
        driver: driver.clone(),
        oem_device_id: oem_device_id.clone(),
        timezone: timezone.clone(),
        settings: settings.clone(),
        capabilities: caps.map(capabilities_to_proto),
        etag: d.etag(),
        create_time: Some(ts_to_proto(*created)),
        update_time: Some(ts_to_proto(*updated)),
        observed_state: observed.as_ref().map(observed_to_proto),
    }
}

/// Native scheduler rows → proto.
pub fn native_rows_to_proto(rows: &[NativeRow]) -> Vec<pb::NativeScheduleRow> {
    rows.iter()
        .map(|r| {
            let NativeRow {
                start,
                end,
                mode,
                enabled,
                owner,
            } = r;
            pb::NativeScheduleRow {
                start_time_of_day: start.clone(),
                end_time_of_day: end.clone(),
                mode: mode.clone(),
                enabled: *enabled,
                owner: match owner {
                    RowOwner::Ours => pb::NativeRowOwner::Ours,
                    RowOwner::Foreign => pb::NativeRowOwner::Foreign,
                    RowOwner::Protected => pb::NativeRowOwner::Protected,
                } as i32,
            }
        })
        .collect()
}

fn observed_to_proto(o: &Observed) -> pb::ObservedState {
    let Observed {
        scheduler_active,
        rows,
        soc_percent,
        mode,
        at,
    } = o;
    pb::ObservedState {
        scheduler_active: *scheduler_active,
        native_rows: native_rows_to_proto(rows),
        soc_percent: *soc_percent,
        mode: mode.clone().unwrap_or_default(),
        observe_time: Some(ts_to_proto(*at)),
    }
}

/// Action → proto.
pub fn action_to_proto(a: &Action) -> pb::Action {
    let Action {
        id,
        device_id,
        channel,
        command,
        params,
        start,
        end,
        immediate: _,
        state,
        replaced_by,
        queued_after,
        error_code,
        error_message,
        oem_response,
        verified,
        revision: _,
        created,
        updated,
    } = a;
    pb::Action {
        action_id: id.to_string(),
        device_id: device_id.to_string(),
        command: command_to_proto(*command) as i32,
        power: params.power.map(quantity_to_proto),
        target_soc: params.target_soc.map(quantity_to_proto),
        reserve_soc: params.reserve_soc.map(quantity_to_proto),
        start_time: Some(ts_to_proto(*start)),
        end_time: end.map(ts_to_proto),
        state: state_to_proto(*state) as i32,
        replaced_by_action_id: replaced_by.map(|r| r.to_string()).unwrap_or_default(),
        queued_after_action_ids: queued_after.iter().map(ToString::to_string).collect(),
        error_code: error_code.clone().unwrap_or_default(),
        error_message: error_message.clone().unwrap_or_default(),
        create_time: Some(ts_to_proto(*created)),
        update_time: Some(ts_to_proto(*updated)),
        etag: a.etag(),
        channel: channel.clone(),
        oem_response: oem_response.clone().unwrap_or_default(),
        verified: *verified,
    }
}
