//! Parses a push into a valid booking request against the device's
//! capabilities ("parse, don't validate"). Collects every bad field, so a
//! client fixes them all in one round.

use switchyard_drivers::{Capabilities, Param, ParamSpec, TimingShape};

use super::{Command, Error, FieldViolation, Params, Quantity, Reason, Ts, Unit};

/// A quantity as received: the unit may be missing or unknown.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawQuantity {
    pub value: f64,
    /// The unit; `None` when unspecified or unknown.
    pub unit: Option<Unit>,
}

/// A push as received, before validation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PushInput {
    /// The command; `None` when unspecified or unknown.
    pub command: Option<Command>,
    pub power: Option<RawQuantity>,
    /// Target state of charge.
    pub target_soc: Option<RawQuantity>,
    /// Reserve state of charge.
    pub reserve_soc: Option<RawQuantity>,
    /// Requested start; `None` = now.
    pub start: Option<Ts>,
    /// Requested end; `None` = open-ended.
    pub end: Option<Ts>,
}

/// A push that the device can take, timed against the server clock.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidPush {
    pub command: Command,
    /// The channel it controls.
    pub channel: String,
    /// Its parameters, in the units given.
    pub params: Params,
    /// Start (now, for an immediate push).
    pub start: Ts,
    /// End, if any.
    pub end: Option<Ts>,
    /// Whether it was pushed without a start.
    pub immediate: bool,
}

fn unit_list(units: &[Unit]) -> String {
    units
        .iter()
        .map(|u| u.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_param(
    spec: &ParamSpec,
    q: RawQuantity,
    out: &mut Vec<FieldViolation>,
) -> Option<Quantity> {
    let field = format!("action.{}", spec.param.name());
    let Some(unit) = q.unit.filter(|u| spec.units.contains(u)) else {
        out.push(FieldViolation::new(
            format!("{field}.unit"),
            Reason::UnsupportedUnit,
            format!(
                "{} must be given in one of: {}",
                spec.param.name(),
                unit_list(&spec.units)
            ),
        ));
        return None;
    };
    if !q.value.is_finite() {
        out.push(FieldViolation::new(
            format!("{field}.value"),
            Reason::ParameterOutOfRange,
            format!("{} must be finite", spec.param.name()),
        ));
        return None;
    }
    match unit.convert(q.value, spec.bound_unit) {
        Some(v) if v >= spec.min && v <= spec.max => Some(Quantity {
            value: q.value,
            unit,
        }),
        _ => {
            out.push(FieldViolation::new(
                format!("{field}.value"),
                Reason::ParameterOutOfRange,
                format!(
                    "{} {} is outside the accepted range {} to {} {}",
                    number(q.value),
                    unit.as_str(),
                    spec.min,
                    spec.max,
                    spec.bound_unit.as_str()
                ),
            ));
            None
        }
    }
}

/// A number as a person would write it: plain when short, in scientific
/// notation when huge or tiny (1e308 is not 309 digits).
fn number(v: f64) -> String {
    let plain = v.to_string();
    if plain.len() <= 16 {
        plain
    } else {
        format!("{v:e}")
    }
}

/// Refuses a push up front when the device's last observed state shows an
/// enabled native scheduler with rows that are not switchyard's own in
/// force during the push's window `[start, end)` (rows of its own actions
/// are ordered by the conflict rules; foreign rows at other times of day
/// do not stand in the way), unless the push authorises clearing them
/// (CANCEL_AND_REPLACE) and none of them is protected (which no driver
/// clears).
pub fn preflight(
    device: &super::Device,
    strategy: super::Strategy,
    start: Ts,
    end: Option<Ts>,
) -> Result<(), Error> {
    use super::device::RowOwner;
    let Some(o) = device.observed.as_ref().filter(|o| o.scheduler_active) else {
        return Ok(());
    };
    let tz = jiff::tz::TimeZone::get(&device.timezone).unwrap_or(jiff::tz::TimeZone::UTC);
    let in_the_way: Vec<_> = o
        .rows
        .iter()
        .filter(|r| {
            r.enabled
                && r.owner != RowOwner::Ours
                && r.meets(start.to_jiff(), end.map(Ts::to_jiff), &tz)
        })
        .collect();
    if in_the_way.is_empty() {
        return Ok(());
    }
    let protected: Vec<_> = in_the_way
        .iter()
        .filter(|r| r.owner == RowOwner::Protected)
        .map(|r| (*r).clone())
        .collect();
    if strategy == super::Strategy::CancelAndReplace && protected.is_empty() {
        return Ok(());
    }
    Err(Error::SchedulerActive {
        device_id: device.id.to_string(),
        rows: o.rows.clone(),
        protected,
        observed_at: o.at,
    })
}

/// Validates `input` for a device with `caps`, at `now`, with starts
/// allowed up to `horizon_nanos` ahead.
pub fn validate_push(
    input: &PushInput,
    caps: &Capabilities,
    now: Ts,
    horizon_nanos: i64,
) -> Result<ValidPush, Error> {
    let mut out = Vec::new();

    // Timing first: it does not depend on the command.
    let start = input.start.unwrap_or(now);
    if let Some(s) = input.start {
        if s < now {
            out.push(FieldViolation::new(
                "action.start_time",
                Reason::StartInPast,
                format!(
                    "start_time {} is before the server's now {}; omit it to start immediately",
                    s.rfc3339(),
                    now.rfc3339()
                ),
            ));
        } else if s > now.plus_nanos(horizon_nanos) {
            out.push(FieldViolation::new(
                "action.start_time",
                Reason::StartBeyondHorizon,
                format!(
                    "start_time {} is beyond the booking horizon ({} days from now)",
                    s.rfc3339(),
                    horizon_nanos / (86_400 * Ts::SECOND)
                ),
            ));
        }
    }
    if let Some(e) = input.end
        && e <= start
    {
        out.push(FieldViolation::new(
            "action.end_time",
            Reason::InvalidWindow,
            format!(
                "end_time {} must be after the start {}",
                e.rfc3339(),
                start.rfc3339()
            ),
        ));
    }
    let shape = match (input.start, input.end) {
        (None, None) => TimingShape::Immediate,
        (Some(_), None) => TimingShape::Scheduled,
        (_, Some(_)) => TimingShape::Windowed,
    };

    let spec = match input.command {
        None => {
            out.push(FieldViolation::new(
                "action.command",
                Reason::MissingField,
                "command is required",
            ));
            None
        }
        Some(c) => match caps.command(c) {
            Some(spec) => Some(spec),
            None => {
                let supported: Vec<&str> =
                    caps.commands.iter().map(|c| c.command.as_str()).collect();
                out.push(FieldViolation::new(
                    "action.command",
                    Reason::UnsupportedCommand,
                    if supported.is_empty() {
                        format!("the device accepts no commands (read-only), not {c}")
                    } else {
                        format!(
                            "the device does not support {c}; it supports: {}",
                            supported.join(", ")
                        )
                    },
                ));
                None
            }
        },
    };

    let mut params = Params::default();
    if let Some(spec) = spec {
        if !spec.timing.contains(&shape) {
            out.push(FieldViolation::new(
                if shape == TimingShape::Immediate {
                    "action.start_time"
                } else {
                    "action.end_time"
                },
                Reason::UnsupportedTiming,
                format!(
                    "{} does not accept {} timing on this device; it accepts: {}",
                    spec.command,
                    timing_words(shape),
                    spec.timing
                        .iter()
                        .map(|t| timing_words(*t))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let given = [
            (Param::Power, input.power),
            (Param::TargetSoc, input.target_soc),
            (Param::ReserveSoc, input.reserve_soc),
        ];
        for (param, raw) in given {
            let p = spec.params.iter().find(|p| p.param == param);
            let checked = match (p, raw) {
                (Some(p), Some(q)) => check_param(p, q, &mut out),
                (None, Some(_)) => {
                    out.push(FieldViolation::new(
                        format!("action.{}", param.name()),
                        Reason::UnsupportedParameter,
                        format!("{} takes no {} parameter", spec.command, param.name()),
                    ));
                    None
                }
                (Some(p), None) if p.required => {
                    out.push(FieldViolation::new(
                        format!("action.{}", param.name()),
                        Reason::MissingField,
                        format!("{} requires {}", spec.command, param.name()),
                    ));
                    None
                }
                _ => None,
            };
            match param {
                Param::Power => params.power = checked,
                Param::TargetSoc => params.target_soc = checked,
                Param::ReserveSoc => params.reserve_soc = checked,
            }
        }
    }

    match spec {
        Some(spec) if out.is_empty() => Ok(ValidPush {
            command: spec.command,
            channel: spec.channel.clone(),
            params,
            start,
            end: input.end,
            immediate: input.start.is_none(),
        }),
        _ => Err(Error::Invalid(out)),
    }
}

/// A timing shape as a client writes it.
fn timing_words(t: TimingShape) -> &'static str {
    match t {
        TimingShape::Immediate => "immediate (no start_time, no end_time)",
        TimingShape::Scheduled => "scheduled (a start_time, no end_time)",
        TimingShape::Windowed => "windowed (an end_time; start_time now when omitted)",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use switchyard_drivers::{DeviceSpec, DriverFactory, Family, simulated::SimulatedFactory};

    use super::*;

    const NOW: Ts = Ts(1_800_000_000 * Ts::SECOND);
    const DAY: i64 = 86_400 * Ts::SECOND;

    fn battery() -> Capabilities {
        let settings = BTreeMap::new();
        SimulatedFactory::default()
            .capabilities(&DeviceSpec {
                device_id: "d",
                family: Family::Battery,
                oem_device_id: "",
                timezone: "UTC",
                settings: &settings,
            })
            .unwrap()
    }

    fn reasons(r: Result<ValidPush, Error>) -> Vec<(String, Reason)> {
        match r {
            Err(Error::Invalid(v)) => v.into_iter().map(|v| (v.field, v.reason)).collect(),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn charge() -> PushInput {
        PushInput {
            command: Some(Command::Charge),
            ..Default::default()
        }
    }

    fn observed_device(rows: Vec<super::super::device::NativeRow>) -> super::super::Device {
        super::super::Device {
            id: super::super::DeviceId::parse("d").unwrap(),
            display_name: String::new(),
            family: Family::Battery,
            driver: "foxess".into(),
            oem_device_id: "SN".into(),
            timezone: "UTC".into(),
            settings: Default::default(),
            revision: 1,
            created: Ts(0),
            updated: Ts(0),
            observed: Some(super::super::Observed {
                scheduler_active: true,
                rows,
                soc_percent: None,
                mode: None,
                at: NOW,
            }),
            incarnation: String::new(),
        }
    }

    fn native(
        start: &str,
        end: &str,
        owner: super::super::device::RowOwner,
    ) -> super::super::device::NativeRow {
        super::super::device::NativeRow {
            start: start.into(),
            end: end.into(),
            mode: "ForceCharge".into(),
            enabled: true,
            owner,
        }
    }

    fn ev_charger() -> Capabilities {
        let settings = BTreeMap::new();
        SimulatedFactory::default()
            .capabilities(&DeviceSpec {
                device_id: "ev",
                family: Family::EvCharger,
                oem_device_id: "",
                timezone: "UTC",
                settings: &settings,
            })
            .unwrap()
    }

    #[test]
    fn a_timing_the_command_does_not_take_names_the_field_to_change() {
        let mut caps = battery();
        for c in &mut caps.commands {
            c.timing = vec![TimingShape::Scheduled];
        }
        // Immediate: a start is what is missing.
        assert_eq!(
            reasons(validate_push(&charge(), &caps, NOW, DAY)),
            [("action.start_time".to_owned(), Reason::UnsupportedTiming)]
        );
        // Windowed: the end is what is too much.
        let windowed = PushInput {
            start: Some(NOW.plus_nanos(60 * Ts::SECOND)),
            end: Some(NOW.plus_nanos(120 * Ts::SECOND)),
            ..charge()
        };
        assert_eq!(
            reasons(validate_push(&windowed, &caps, NOW, DAY)),
            [("action.end_time".to_owned(), Reason::UnsupportedTiming)]
        );
        // The message says what the device takes instead.
        let Err(Error::Invalid(v)) = validate_push(&windowed, &caps, NOW, DAY) else {
            panic!("refused")
        };
        assert!(
            v[0].description.contains("windowed")
                && v[0]
                    .description
                    .contains("it accepts: scheduled (a start_time, no end_time)"),
            "{}",
            v[0].description
        );
    }

    #[test]
    fn the_horizon_admits_a_start_exactly_at_its_end() {
        let caps = battery();
        let at = |t: Ts| PushInput {
            start: Some(t),
            ..charge()
        };
        assert!(validate_push(&at(NOW.plus_nanos(DAY)), &caps, NOW, DAY).is_ok());
        assert_eq!(
            reasons(validate_push(&at(NOW.plus_nanos(DAY + 1)), &caps, NOW, DAY)),
            [("action.start_time".to_owned(), Reason::StartBeyondHorizon)]
        );
        // Now itself is not in the past.
        assert!(validate_push(&at(NOW), &caps, NOW, DAY).is_ok());
    }

    #[test]
    fn a_required_parameter_left_out_is_a_missing_field_and_units_are_listed() {
        let caps = ev_charger();
        let limit = PushInput {
            command: Some(Command::EvPowerLimit),
            ..Default::default()
        };
        assert_eq!(
            reasons(validate_push(&limit, &caps, NOW, DAY)),
            [("action.power".to_owned(), Reason::MissingField)]
        );
        let in_percent = PushInput {
            power: Some(RawQuantity {
                value: 3.0,
                unit: Some(Unit::Percent),
            }),
            ..limit
        };
        match validate_push(&in_percent, &caps, NOW, DAY) {
            Err(Error::Invalid(v)) => {
                assert_eq!(v[0].reason, Reason::UnsupportedUnit);
                assert!(v[0].description.ends_with("one of: W, kW"), "{:?}", v[0]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_foreign_rows_in_force_during_the_window_refuse_a_push() {
        use super::super::{Strategy, device::RowOwner};
        // NOW is 2027-01-15T08:00:00Z.
        let at = |h: i64| NOW.plus_nanos(h * 3600 * Ts::SECOND);
        let device = observed_device(vec![
            native("14:00", "15:00", RowOwner::Foreign),
            native("09:00", "10:00", RowOwner::Ours),
            native("20:00", "21:00", RowOwner::Protected),
        ]);
        let push = |from: i64, to: i64, s| preflight(&device, s, at(from), Some(at(to)));
        // Our own row, and foreign rows at other times: no refusal.
        assert!(push(1, 2, Strategy::Reject).is_ok(), "09:00-10:00 is ours");
        assert!(
            push(2, 5, Strategy::Reject).is_ok(),
            "10:00-13:00 meets nothing"
        );
        // A foreign row in the window refuses; CANCEL_AND_REPLACE clears it.
        assert!(matches!(
            push(5, 7, Strategy::Reject),
            Err(Error::SchedulerActive { .. })
        ));
        assert!(push(5, 7, Strategy::CancelAndReplace).is_ok());
        // A protected one refuses even CANCEL_AND_REPLACE, and is named.
        match push(11, 13, Strategy::CancelAndReplace) {
            Err(Error::SchedulerActive { protected, .. }) => assert_eq!(protected.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_finite_and_huge_powers_are_refused_in_words_a_person_reads() {
        let caps = battery();
        let message = |value: f64| {
            let input = PushInput {
                power: Some(RawQuantity {
                    value,
                    unit: Some(Unit::Kilowatt),
                }),
                ..charge()
            };
            match validate_push(&input, &caps, NOW, DAY) {
                Err(Error::Invalid(v)) => {
                    assert_eq!(v[0].reason, Reason::ParameterOutOfRange);
                    assert_eq!(v[0].field, "action.power.value");
                    v[0].description.clone()
                }
                other => panic!("{value}: {other:?}"),
            }
        };
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(message(v), "power must be finite", "{v}");
        }
        let huge = message(1e308);
        assert!(huge.starts_with("1e308 kW is outside"), "{huge}");
        assert!(huge.len() < 100, "{huge}");
        assert!(message(-3.5).starts_with("-3.5 kW"));
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let input = PushInput {
            power: Some(RawQuantity {
                value: 9.0,
                unit: Some(Unit::Kilowatt),
            }),
            target_soc: Some(RawQuantity {
                value: 50.0,
                unit: Some(Unit::Watt),
            }),
            start: Some(Ts(NOW.0 - 1)),
            end: Some(Ts(NOW.0 - 10)),
            ..charge()
        };
        let got = reasons(validate_push(&input, &battery(), NOW, 30 * DAY));
        assert_eq!(
            got,
            [
                ("action.start_time".to_owned(), Reason::StartInPast),
                ("action.end_time".to_owned(), Reason::InvalidWindow),
                ("action.power.value".to_owned(), Reason::ParameterOutOfRange),
                ("action.target_soc.unit".to_owned(), Reason::UnsupportedUnit),
            ]
        );
    }

    #[test]
    fn units_convert_before_bounds_are_checked() {
        let input = PushInput {
            power: Some(RawQuantity {
                value: 4.5,
                unit: Some(Unit::Kilowatt),
            }),
            ..charge()
        };
        let v = validate_push(&input, &battery(), NOW, 30 * DAY).unwrap();
        assert_eq!(
            v.params.power,
            Some(Quantity {
                value: 4.5,
                unit: Unit::Kilowatt
            })
        );
        assert!(v.immediate);
        assert_eq!(v.start, NOW);
    }

    #[test]
    fn auto_modes_take_no_parameters_and_missing_command_is_named() {
        let input = PushInput {
            command: Some(Command::AutoBalanced),
            power: Some(RawQuantity {
                value: 1.0,
                unit: Some(Unit::Watt),
            }),
            ..Default::default()
        };
        assert_eq!(
            reasons(validate_push(&input, &battery(), NOW, 30 * DAY)),
            [("action.power".to_owned(), Reason::UnsupportedParameter)]
        );
        assert_eq!(
            reasons(validate_push(
                &PushInput::default(),
                &battery(),
                NOW,
                30 * DAY
            )),
            [("action.command".to_owned(), Reason::MissingField)]
        );
    }

    #[test]
    fn horizon_and_unsupported_command() {
        let input = PushInput {
            command: Some(Command::EvPowerLimit),
            start: Some(NOW.plus_nanos(31 * DAY)),
            ..Default::default()
        };
        assert_eq!(
            reasons(validate_push(&input, &battery(), NOW, 30 * DAY)),
            [
                ("action.start_time".to_owned(), Reason::StartBeyondHorizon),
                ("action.command".to_owned(), Reason::UnsupportedCommand),
            ]
        );
    }

    #[test]
    fn nan_and_infinite_values_are_out_of_range() {
        for value in [f64::NAN, f64::INFINITY, -1.0] {
            let input = PushInput {
                power: Some(RawQuantity {
                    value,
                    unit: Some(Unit::Watt),
                }),
                ..charge()
            };
            assert_eq!(
                reasons(validate_push(&input, &battery(), NOW, 30 * DAY)),
                [("action.power.value".to_owned(), Reason::ParameterOutOfRange)]
            );
        }
    }
}
