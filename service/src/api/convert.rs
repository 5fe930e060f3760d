//! proto ⇄ domain conversions, both ways. Every conversion destructures
//! the whole message, naming the fields it ignores (output-only ones), so
//! a new proto field breaks the build here instead of being silently
//! dropped.
//!
//! Incoming requests become the values the handlers act on. Each mutation
//! also yields its idempotency key body: the request re-encoded from what
//! the server read, so a retry that differs only in ignored fields
//! (output-only values, fields outside the update mask) is the same
//! request.

use switchyard_drivers::{
    Capabilities, CommandSpec, ParamSpec, RateBudget, TimingShape, WindowLimits,
};
use switchyard_proto::v1 as pb;

use super::{decode_token, page_size, parse_device_id};
use crate::domain::{
    Action, ActionId, ActionState, Command, Device, DeviceId, Error, Family, FieldViolation,
    Observed, Quantity, Reason, Strategy, Ts, Unit, cap,
    device::{NativeRow, RowOwner},
    validate::{PushInput, RawQuantity},
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
            "timestamp is out of range: it must lie from 1677-09-21T00:12:44Z to \
             2262-04-11T23:47:16Z, with nanos from 0 to 999999999",
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
        incarnation: _,
    } = d;
    pb::Device {
        device_id: id.to_string(),
        display_name: display_name.clone(),
        family: family_to_proto(*family) as i32,
        driver: driver.clone(),
        oem_device_id: oem_device_id.clone(),
        timezone: timezone.clone(),
        settings: (**settings).clone(),
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
            // These come from the OEM: bounded like everything repeated
            // from elsewhere.
            pb::NativeScheduleRow {
                start_time_of_day: cap(start.clone(), 16),
                end_time_of_day: cap(end.clone(), 16),
                mode: cap(mode.clone(), 64),
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

// ---- incoming ------------------------------------------------------------

/// Longest display_name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest oem_device_id, in characters.
pub const MAX_OEM_ID_CHARS: usize = 200;

/// The fields of a device that UpdateDevice can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceField {
    DisplayName,
    OemDeviceId,
    Timezone,
    Settings,
}

impl DeviceField {
    const ALL: [(&'static str, DeviceField); 4] = [
        ("display_name", DeviceField::DisplayName),
        ("oem_device_id", DeviceField::OemDeviceId),
        ("timezone", DeviceField::Timezone),
        ("settings", DeviceField::Settings),
    ];

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("", |(n, _)| n)
    }
}

/// A request's idempotency key and the bytes a retry must repeat.
#[derive(Clone, Debug)]
pub struct Idem {
    /// Empty: no idempotency asked for.
    pub request_id: String,
    pub body: Vec<u8>,
}

impl Idem {
    fn new(request_id: String, canonical: &impl prost::Message) -> Self {
        Self {
            request_id,
            body: canonical.encode_to_vec(),
        }
    }
}

fn etag_opt(etag: String) -> Option<String> {
    (!etag.is_empty()).then_some(etag)
}

fn missing(field: &str) -> Error {
    Error::invalid(field, Reason::MissingField, format!("{field} is required"))
}

/// An empty time zone is UTC.
fn timezone_or_utc(tz: String) -> String {
    if tz.is_empty() { "UTC".to_owned() } else { tz }
}

/// The writable fields of a device as sent, output-only ones dropped.
fn device_input(d: pb::Device) -> pb::Device {
    let pb::Device {
        device_id,
        display_name,
        family,
        driver,
        oem_device_id,
        timezone,
        settings,
        capabilities: _,
        etag,
        create_time: _,
        update_time: _,
        observed_state: _,
    } = d;
    pb::Device {
        device_id,
        display_name,
        family,
        driver,
        oem_device_id,
        timezone,
        settings,
        etag,
        ..Default::default()
    }
}

/// Checks the length of a string field, in characters.
fn check_chars(out: &mut Vec<FieldViolation>, field: &str, value: &str, max: usize) {
    // Control characters (NUL, ESC, line breaks) are refused as in every
    // other free text the API keeps: a name is shown in consoles and logs,
    // where they could forge or hide what is printed.
    if value.chars().count() > max || value.chars().any(char::is_control) {
        out.push(FieldViolation::new(
            field,
            Reason::InvalidField,
            format!("{field} must be at most {max} characters, without control characters"),
        ));
    }
}

/// CreateDevice as the server reads it.
#[derive(Debug)]
pub struct CreateDevice {
    /// The device to register; its id is generated when none was given.
    pub device: Device,
    /// What was wrong with the request itself; the handler adds what the
    /// driver says, so every bad field is reported at once.
    pub violations: Vec<FieldViolation>,
    pub idem: Idem,
}

/// Parses a CreateDeviceRequest.
pub fn create_device(req: pb::CreateDeviceRequest) -> Result<CreateDevice, Error> {
    let pb::CreateDeviceRequest {
        device_id,
        device,
        request_id,
    } = req;
    let dev = device_input(device.ok_or_else(|| missing("device"))?);
    // The id may be given in either place (AIP-133's `device_id` beside
    // the resource); both set and different is refused rather than one
    // silently winning. The key body keeps the id as asked, so a retry of
    // a create without id replays instead of generating another.
    let requested = match (device_id.as_str(), dev.device_id.as_str()) {
        ("", "") => None,
        (a, "") => Some((a.to_owned(), "device_id")),
        ("", b) => Some((b.to_owned(), "device.device_id")),
        (a, b) if a == b => Some((a.to_owned(), "device_id")),
        _ => {
            return Err(Error::invalid(
                "device.device_id",
                Reason::InvalidField,
                "device_id and device.device_id differ",
            ));
        }
    };
    let id = match &requested {
        None => DeviceId::generate(),
        Some((s, field)) => parse_device_id(s, field)?,
    };
    let mut violations = Vec::new();
    let family = family_from_proto(dev.family)?;
    if family.is_none() {
        violations.push(FieldViolation::new(
            "device.family",
            Reason::MissingField,
            "family is required",
        ));
    }
    if dev.driver.is_empty() {
        violations.push(FieldViolation::new(
            "device.driver",
            Reason::MissingField,
            "driver is required",
        ));
    }
    check_chars(
        &mut violations,
        "device.display_name",
        &dev.display_name,
        MAX_NAME_CHARS,
    );
    check_chars(
        &mut violations,
        "device.oem_device_id",
        &dev.oem_device_id,
        MAX_OEM_ID_CHARS,
    );
    let timezone = timezone_or_utc(dev.timezone);
    let canonical = pb::CreateDeviceRequest {
        device_id: requested.map(|(s, _)| s).unwrap_or_default(),
        device: Some(pb::Device {
            display_name: dev.display_name.clone(),
            family: dev.family,
            driver: dev.driver.clone(),
            oem_device_id: dev.oem_device_id.clone(),
            timezone: timezone.clone(),
            settings: dev.settings.clone(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    Ok(CreateDevice {
        device: Device {
            id,
            display_name: dev.display_name,
            // A placeholder only: a missing family is already a recorded
            // violation, so this device is refused before it is used;
            // parsing goes on to report every other bad field too.
            family: family.unwrap_or(Family::Battery),
            driver: dev.driver,
            oem_device_id: dev.oem_device_id,
            timezone,
            settings: std::sync::Arc::new(dev.settings.into_iter().collect()),
            revision: 0,
            created: Ts(0),
            updated: Ts(0),
            observed: None,
            incarnation: String::new(),
        },
        violations,
        idem: Idem::new(request_id, &canonical),
    })
}

/// UpdateDevice as the server reads it.
#[derive(Clone, Debug)]
pub struct UpdateDevice {
    pub id: DeviceId,
    pub etag: Option<String>,
    /// The fields to change, each once, in a fixed order.
    pub fields: Vec<DeviceField>,
    /// The new values (only `fields` of it are read).
    pub new: pb::Device,
    pub idem: Idem,
}

impl UpdateDevice {
    /// Applies the new values of the masked fields to `d`.
    pub fn apply_to(&self, d: &mut Device) {
        for f in &self.fields {
            match f {
                DeviceField::DisplayName => d.display_name = self.new.display_name.clone(),
                DeviceField::OemDeviceId => d.oem_device_id = self.new.oem_device_id.clone(),
                DeviceField::Timezone => d.timezone = timezone_or_utc(self.new.timezone.clone()),
                DeviceField::Settings => {
                    d.settings =
                        std::sync::Arc::new(self.new.settings.clone().into_iter().collect());
                }
            }
        }
    }
}

/// Parses an UpdateDeviceRequest. Every bad update_mask path is reported,
/// each once.
pub fn update_device(req: pb::UpdateDeviceRequest) -> Result<UpdateDevice, Error> {
    let pb::UpdateDeviceRequest {
        device,
        update_mask,
        request_id,
    } = req;
    let dev = device_input(device.ok_or_else(|| missing("device"))?);
    let id = parse_device_id(&dev.device_id, "device.device_id")?;
    let paths = update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(Error::invalid(
            "update_mask",
            Reason::MissingField,
            "update_mask must name the fields to change: display_name, oem_device_id, timezone, settings",
        ));
    }
    let mut fields = Vec::new();
    let mut bad: Vec<FieldViolation> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for p in &paths {
        // Each bad path once, however often it is repeated.
        if seen.contains(&p.as_str()) {
            continue;
        }
        seen.push(p);
        if let Some((_, f)) = DeviceField::ALL.iter().find(|(n, _)| n == p) {
            fields.push(*f);
            continue;
        }
        let why = match p.as_str() {
            "device_id" | "family" | "driver" => format!("{p} is immutable"),
            "capabilities" | "etag" | "create_time" | "update_time" | "observed_state" => {
                format!("{p} is output only")
            }
            _ => format!(
                "unknown field {:?}; the fields are display_name, oem_device_id, timezone, settings",
                p.chars().take(64).collect::<String>()
            ),
        };
        bad.push(FieldViolation::new(
            "update_mask",
            Reason::InvalidField,
            why,
        ));
    }
    if !bad.is_empty() {
        return Err(Error::Invalid(bad));
    }
    fields.sort();
    fields.dedup();
    let mut violations = Vec::new();
    if fields.contains(&DeviceField::DisplayName) {
        check_chars(
            &mut violations,
            "device.display_name",
            &dev.display_name,
            MAX_NAME_CHARS,
        );
    }
    if fields.contains(&DeviceField::OemDeviceId) {
        check_chars(
            &mut violations,
            "device.oem_device_id",
            &dev.oem_device_id,
            MAX_OEM_ID_CHARS,
        );
    }
    if !violations.is_empty() {
        return Err(Error::Invalid(violations));
    }
    // Only what the mask selects is read, so only that is compared.
    let mut masked = pb::Device {
        device_id: dev.device_id.clone(),
        etag: dev.etag.clone(),
        ..Default::default()
    };
    for f in &fields {
        match f {
            DeviceField::DisplayName => masked.display_name = dev.display_name.clone(),
            DeviceField::OemDeviceId => masked.oem_device_id = dev.oem_device_id.clone(),
            DeviceField::Timezone => masked.timezone = timezone_or_utc(dev.timezone.clone()),
            DeviceField::Settings => masked.settings = dev.settings.clone(),
        }
    }
    let canonical = pb::UpdateDeviceRequest {
        device: Some(masked),
        update_mask: Some(prost_types::FieldMask {
            paths: fields.iter().map(|f| f.name().to_owned()).collect(),
        }),
        request_id: String::new(),
    };
    Ok(UpdateDevice {
        id,
        etag: etag_opt(dev.etag.clone()),
        fields,
        new: dev,
        idem: Idem::new(request_id, &canonical),
    })
}

/// DeleteDevice as the server reads it.
#[derive(Debug)]
pub struct DeleteDevice {
    pub id: DeviceId,
    pub etag: Option<String>,
    pub force: bool,
    pub idem: Idem,
}

/// Parses a DeleteDeviceRequest.
pub fn delete_device(req: pb::DeleteDeviceRequest) -> Result<DeleteDevice, Error> {
    let pb::DeleteDeviceRequest {
        device_id,
        etag,
        force,
        request_id,
    } = req;
    let id = parse_device_id(&device_id, "device_id")?;
    let canonical = pb::DeleteDeviceRequest {
        device_id,
        etag: etag.clone(),
        force,
        request_id: String::new(),
    };
    Ok(DeleteDevice {
        id,
        etag: etag_opt(etag),
        force,
        idem: Idem::new(request_id, &canonical),
    })
}

/// Parses a GetDeviceRequest.
pub fn get_device(req: pb::GetDeviceRequest) -> Result<DeviceId, Error> {
    let pb::GetDeviceRequest { device_id } = req;
    parse_device_id(&device_id, "device_id")
}

/// A page of a listing: its size and where it continues.
#[derive(Debug)]
pub struct Page {
    pub size: u32,
    /// The last key of the previous page.
    pub after: Option<String>,
}

/// Parses a ListDevicesRequest.
pub fn list_devices(req: pb::ListDevicesRequest) -> Result<Page, Error> {
    let pb::ListDevicesRequest {
        page_size: size,
        page_token,
    } = req;
    Ok(Page {
        size: page_size(size)?,
        after: decode_token(&page_token, "devices", "")?,
    })
}

/// PushAction as the server reads it.
#[derive(Debug)]
pub struct PushAction {
    pub device_id: DeviceId,
    pub input: PushInput,
    pub strategy: Strategy,
    pub validate_only: bool,
    pub idem: Idem,
}

/// Parses a PushActionRequest. Output-only fields of the action are
/// ignored, as the API promises.
pub fn push_action(req: pb::PushActionRequest) -> Result<PushAction, Error> {
    let pb::PushActionRequest {
        device_id,
        action,
        on_conflict,
        validate_only,
        request_id,
    } = req;
    let device = parse_device_id(&device_id, "device_id")?;
    let pb::Action {
        action_id: _,
        device_id: _,
        command,
        power,
        target_soc,
        reserve_soc,
        start_time,
        end_time,
        state: _,
        replaced_by_action_id: _,
        queued_after_action_ids: _,
        error_code: _,
        error_message: _,
        create_time: _,
        update_time: _,
        etag: _,
        channel: _,
        oem_response: _,
        verified: _,
    } = action.ok_or_else(|| missing("action"))?;
    let strategy = strategy_from_proto(on_conflict)?;
    let input = PushInput {
        command: command_from_proto(command)?,
        power: power.as_ref().map(raw_quantity),
        target_soc: target_soc.as_ref().map(raw_quantity),
        reserve_soc: reserve_soc.as_ref().map(raw_quantity),
        start: start_time
            .as_ref()
            .map(|t| ts_from_proto(t, "action.start_time"))
            .transpose()?,
        end: end_time
            .as_ref()
            .map(|t| ts_from_proto(t, "action.end_time"))
            .transpose()?,
    };
    let canonical = pb::PushActionRequest {
        device_id,
        action: Some(pb::Action {
            command,
            power,
            target_soc,
            reserve_soc,
            start_time,
            end_time,
            ..Default::default()
        }),
        on_conflict,
        validate_only,
        request_id: String::new(),
    };
    Ok(PushAction {
        device_id: device,
        input,
        strategy,
        validate_only,
        idem: Idem::new(request_id, &canonical),
    })
}

fn parse_action_id(s: &str) -> Result<ActionId, Error> {
    if s.is_empty() {
        return Err(missing("action_id"));
    }
    ActionId::parse(s).map_err(|why| {
        Error::invalid(
            "action_id",
            Reason::InvalidField,
            format!("action_id {why}"),
        )
    })
}

/// Parses a GetActionRequest.
pub fn get_action(req: pb::GetActionRequest) -> Result<(DeviceId, ActionId), Error> {
    let pb::GetActionRequest {
        device_id,
        action_id,
    } = req;
    Ok((
        parse_device_id(&device_id, "device_id")?,
        parse_action_id(&action_id)?,
    ))
}

/// ListActions as the server reads it.
#[derive(Debug)]
pub struct ListActions {
    /// `None`: every device ("-").
    pub device: Option<DeviceId>,
    /// Sorted, each once; empty: every state.
    pub states: Vec<ActionState>,
    pub size: u32,
    /// Continue strictly before this action (newest first).
    pub before: Option<ActionId>,
    /// What a page token of this listing is bound to.
    pub scope: String,
}

/// Parses a ListActionsRequest.
pub fn list_actions(req: pb::ListActionsRequest) -> Result<ListActions, Error> {
    let pb::ListActionsRequest {
        device_id,
        states,
        page_size: size,
        page_token,
    } = req;
    let device = if device_id == "-" {
        None
    } else {
        Some(parse_device_id(&device_id, "device_id")?)
    };
    let mut states: Vec<ActionState> = states
        .iter()
        .map(|s| state_from_proto(*s, "states"))
        .collect::<Result<_, _>>()?;
    states.sort();
    states.dedup();
    let scope = format!(
        "actions:{device_id}:{}",
        states
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let before = decode_token(
        &page_token,
        &scope,
        " (device_id and states must stay the same from page to page)",
    )?
    .map(|s| {
        ActionId::parse(&s).map_err(|_| {
            Error::invalid(
                "page_token",
                Reason::InvalidPageToken,
                "page_token is malformed",
            )
        })
    })
    .transpose()?;
    Ok(ListActions {
        device,
        states,
        size: page_size(size)?,
        before,
        scope,
    })
}

/// ListActionHistory as the server reads it.
#[derive(Debug)]
pub struct ListActionHistory {
    pub device_id: DeviceId,
    pub action_id: ActionId,
    pub size: u32,
    /// Continue after this audit entry.
    pub after: Option<i64>,
    /// What a page token of this listing is bound to.
    pub scope: String,
}

/// Parses a ListActionHistoryRequest.
pub fn list_action_history(req: pb::ListActionHistoryRequest) -> Result<ListActionHistory, Error> {
    let pb::ListActionHistoryRequest {
        device_id,
        action_id,
        page_size: size,
        page_token,
    } = req;
    let device_id = parse_device_id(&device_id, "device_id")?;
    let action_id = parse_action_id(&action_id)?;
    let scope = format!("history:{device_id}:{action_id}");
    let after = decode_token(
        &page_token,
        &scope,
        " (device_id and action_id must stay the same from page to page)",
    )?
    .map(|s| {
        s.parse::<i64>().map_err(|_| {
            Error::invalid(
                "page_token",
                Reason::InvalidPageToken,
                "page_token is malformed",
            )
        })
    })
    .transpose()?;
    Ok(ListActionHistory {
        device_id,
        action_id,
        size: page_size(size)?,
        after,
        scope,
    })
}

/// The proto of a recorded transition.
pub fn transition_to_proto(t: &crate::store::TransitionRecord) -> pb::ActionTransition {
    let failed = matches!(t.to, ActionState::Failed | ActionState::Cancelled);
    pb::ActionTransition {
        from_state: t.from.map_or(pb::ActionState::Unspecified, state_to_proto) as i32,
        to_state: state_to_proto(t.to) as i32,
        reason: t.reason.clone(),
        time: Some(ts_to_proto(t.at)),
        request_id: t.request_id.clone().unwrap_or_default(),
        error_code: if failed {
            t.reason.clone()
        } else {
            String::new()
        },
    }
}

/// CancelAction as the server reads it.
#[derive(Debug)]
pub struct CancelAction {
    pub device_id: DeviceId,
    pub action_id: ActionId,
    pub etag: Option<String>,
    pub idem: Idem,
}

/// Parses a CancelActionRequest.
pub fn cancel_action(req: pb::CancelActionRequest) -> Result<CancelAction, Error> {
    let pb::CancelActionRequest {
        device_id,
        action_id,
        etag,
        request_id,
    } = req;
    let canonical = pb::CancelActionRequest {
        device_id: device_id.clone(),
        action_id: action_id.clone(),
        etag: etag.clone(),
        request_id: String::new(),
    };
    Ok(CancelAction {
        device_id: parse_device_id(&device_id, "device_id")?,
        action_id: parse_action_id(&action_id)?,
        etag: etag_opt(etag),
        idem: Idem::new(request_id, &canonical),
    })
}
