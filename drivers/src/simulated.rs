//! The `simulated` driver: a virtual battery or EV charger, the embedded
//! default for demos and tests. Its behaviour is set by device settings
//! (a public contract):
//!
//! | key | values | default |
//! |---|---|---|
//! | `latency_ms` | delay of every apply/revert, 0..=600000 | 200 |
//! | `native_scheduler_active` | `true` / `false` | `false` |
//! | `fail_mode` | `none`, `reject`, `unavailable`, `offline`, `revert_fails` | `none` |
//! | `max_power_w` | maximum charge/discharge power in watts, 1..=1000000 | 5000 (battery), 11000 (EV) |
//! | `capacity_wh` | battery capacity in watt-hours, 1..=10000000 | 10000 |
//! | `initial_soc` | starting state of charge in percent, 0..=100 | 50 |

use std::collections::BTreeMap;

use crate::model::{
    Capabilities, Command, CommandSpec, Family, Param, ParamSpec, RateBudget, TimingShape, Unit,
    WindowLimits,
};
use crate::registry::{ConfigError, DeviceSpec, DriverFactory};

/// The channel every mode command controls.
pub const MODE_CHANNEL: &str = "mode";
/// The channel of an EV charger's power limit.
pub const POWER_LIMIT_CHANNEL: &str = "power_limit";

const KNOWN: &[&str] = &[
    "latency_ms",
    "native_scheduler_active",
    "fail_mode",
    "max_power_w",
    "capacity_wh",
    "initial_soc",
];

/// How a simulated device misbehaves (setting `fail_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Behaves.
    None,
    /// Every apply is rejected (OEM_REJECTED).
    Reject,
    /// Every call fails as retryable (OEM_UNAVAILABLE).
    Unavailable,
    /// The device is offline (DEVICE_OFFLINE).
    Offline,
    /// Applies succeed, reverts fail.
    RevertFails,
}

/// Parsed settings of a simulated device.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatedSettings {
    /// Delay of every apply/revert in milliseconds.
    pub latency_ms: u64,
    /// Whether the native scheduler is on (one foreign row).
    pub native_scheduler_active: bool,
    /// Fault injection.
    pub fail_mode: FailMode,
    /// Maximum power in watts.
    pub max_power_w: f64,
    /// Battery capacity in watt-hours.
    pub capacity_wh: f64,
    /// Initial state of charge, percent.
    pub initial_soc: f64,
}

impl SimulatedSettings {
    /// Parses and validates settings for a device of `family`.
    pub fn parse(family: Family, s: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        if let Some(key) = s.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ConfigError::UnknownSetting {
                key: key.clone(),
                known: KNOWN.join(", "),
            });
        }
        let default_power = if family == Family::EvCharger {
            11000.0
        } else {
            5000.0
        };
        Ok(Self {
            latency_ms: number(s, "latency_ms", 200.0, 0.0, 600_000.0)? as u64,
            native_scheduler_active: match s.get("native_scheduler_active").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(invalid("native_scheduler_active", "must be true or false")),
            },
            fail_mode: match s.get("fail_mode").map(String::as_str) {
                None | Some("none") => FailMode::None,
                Some("reject") => FailMode::Reject,
                Some("unavailable") => FailMode::Unavailable,
                Some("offline") => FailMode::Offline,
                Some("revert_fails") => FailMode::RevertFails,
                Some(_) => {
                    return Err(invalid(
                        "fail_mode",
                        "must be one of none, reject, unavailable, offline, revert_fails",
                    ));
                }
            },
            max_power_w: number(s, "max_power_w", default_power, 1.0, 1_000_000.0)?,
            capacity_wh: number(s, "capacity_wh", 10_000.0, 1.0, 10_000_000.0)?,
            initial_soc: number(s, "initial_soc", 50.0, 0.0, 100.0)?,
        })
    }
}

fn invalid(key: &str, reason: &str) -> ConfigError {
    ConfigError::InvalidSetting {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

fn number(
    s: &BTreeMap<String, String>,
    key: &str,
    default: f64,
    min: f64,
    max: f64,
) -> Result<f64, ConfigError> {
    let Some(raw) = s.get(key) else {
        return Ok(default);
    };
    match raw.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v),
        _ => Err(invalid(
            key,
            &format!("must be a number from {min} to {max}"),
        )),
    }
}

/// Factory of the `simulated` driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimulatedFactory;

impl DriverFactory for SimulatedFactory {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn capabilities(&self, device: &DeviceSpec<'_>) -> Result<Capabilities, ConfigError> {
        let settings = SimulatedSettings::parse(device.family, device.settings)?;
        let all_timing = vec![
            TimingShape::Immediate,
            TimingShape::Scheduled,
            TimingShape::Windowed,
        ];
        let power = |required| ParamSpec {
            param: Param::Power,
            required,
            units: vec![Unit::Watt, Unit::Kilowatt],
            min: 1.0,
            max: settings.max_power_w,
            bound_unit: Unit::Watt,
        };
        let soc = |param| ParamSpec {
            param,
            required: false,
            units: vec![Unit::Percent],
            min: 0.0,
            max: 100.0,
            bound_unit: Unit::Percent,
        };
        let cmd = |command, channel: &str, params| CommandSpec {
            command,
            channel: channel.to_owned(),
            params,
            timing: all_timing.clone(),
        };
        let commands = match device.family {
            Family::Battery => vec![
                cmd(
                    Command::Charge,
                    MODE_CHANNEL,
                    vec![power(false), soc(Param::TargetSoc)],
                ),
                cmd(
                    Command::Discharge,
                    MODE_CHANNEL,
                    vec![power(false), soc(Param::TargetSoc), soc(Param::ReserveSoc)],
                ),
                cmd(Command::Idle, MODE_CHANNEL, vec![]),
                cmd(Command::AutoBalanced, MODE_CHANNEL, vec![]),
                cmd(Command::AutoReserve, MODE_CHANNEL, vec![]),
                cmd(Command::AutoExport, MODE_CHANNEL, vec![]),
            ],
            Family::EvCharger => vec![
                cmd(Command::Charge, MODE_CHANNEL, vec![power(false)]),
                cmd(Command::Idle, MODE_CHANNEL, vec![]),
                cmd(
                    Command::EvPowerLimit,
                    POWER_LIMIT_CHANNEL,
                    vec![power(true)],
                ),
            ],
            Family::SolarInverter => vec![],
        };
        Ok(Capabilities {
            commands,
            native_scheduler: true,
            window_limits: WindowLimits {
                granularity_seconds: 0,
                may_cross_midnight: true,
                max_slots: 0,
            },
            rate_budget: RateBudget::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(family: Family, settings: &BTreeMap<String, String>) -> DeviceSpec<'_> {
        DeviceSpec {
            family,
            oem_device_id: "",
            timezone: "UTC",
            settings,
        }
    }

    #[test]
    fn unknown_settings_are_rejected_by_name() {
        let s = BTreeMap::from([("latency".to_owned(), "5".to_owned())]);
        let err = SimulatedFactory
            .capabilities(&spec(Family::Battery, &s))
            .unwrap_err();
        assert_eq!(err.key(), Some("latency"));
    }

    #[test]
    fn invalid_values_do_not_echo_the_value() {
        let s = BTreeMap::from([("fail_mode".to_owned(), "s3cr3t".to_owned())]);
        let err = SimulatedFactory
            .capabilities(&spec(Family::Battery, &s))
            .unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"));
    }

    #[test]
    fn max_power_setting_bounds_power() {
        let s = BTreeMap::from([("max_power_w".to_owned(), "3000".to_owned())]);
        let caps = SimulatedFactory
            .capabilities(&spec(Family::Battery, &s))
            .unwrap();
        let charge = caps.command(Command::Charge).unwrap();
        assert_eq!(charge.params[0].max, 3000.0);
        assert_eq!(charge.channel, MODE_CHANNEL);
    }

    #[test]
    fn ev_power_limit_has_its_own_channel() {
        let s = BTreeMap::new();
        let caps = SimulatedFactory
            .capabilities(&spec(Family::EvCharger, &s))
            .unwrap();
        assert_eq!(
            caps.command(Command::EvPowerLimit).unwrap().channel,
            POWER_LIMIT_CHANNEL
        );
        assert!(caps.command(Command::Discharge).is_none());
    }
}
