//! Commands, units and capabilities: what a driver declares about a device.

use std::fmt;

/// The kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// A home battery or hybrid inverter.
    Battery,
    EvCharger,
    /// A solar inverter without storage (read-only).
    SolarInverter,
}

impl Family {
    /// Stable lower-case name, used in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Battery => "battery",
            Family::EvCharger => "ev_charger",
            Family::SolarInverter => "solar_inverter",
        }
    }

    /// Inverse of [`Family::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "battery" => Family::Battery,
            "ev_charger" => Family::EvCharger,
            "solar_inverter" => Family::SolarInverter,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Command {
    /// Charge (battery or vehicle).
    Charge,
    /// Discharge the battery.
    Discharge,
    /// Neither charge nor discharge.
    Idle,
    /// The device's self-consumption mode.
    AutoBalanced,
    /// The device's backup mode.
    AutoReserve,
    /// The device's export mode.
    AutoExport,
    /// Limit an EV charger's power.
    EvPowerLimit,
}

impl Command {
    /// Every command, in declaration order.
    pub const ALL: [Command; 7] = [
        Command::Charge,
        Command::Discharge,
        Command::Idle,
        Command::AutoBalanced,
        Command::AutoReserve,
        Command::AutoExport,
        Command::EvPowerLimit,
    ];

    /// Stable upper-case name, used in storage and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Charge => "CHARGE",
            Command::Discharge => "DISCHARGE",
            Command::Idle => "IDLE",
            Command::AutoBalanced => "AUTO_BALANCED",
            Command::AutoReserve => "AUTO_RESERVE",
            Command::AutoExport => "AUTO_EXPORT",
            Command::EvPowerLimit => "EV_POWER_LIMIT",
        }
    }

    /// Inverse of [`Command::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Command::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unit of a quantity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Watt,
    Kilowatt,
    /// Percent, 0 to 100.
    Percent,
}

impl Unit {
    /// Stable short name, used in storage and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Watt => "W",
            Unit::Kilowatt => "kW",
            Unit::Percent => "%",
        }
    }

    /// Inverse of [`Unit::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "W" => Unit::Watt,
            "kW" => Unit::Kilowatt,
            "%" => Unit::Percent,
            _ => return None,
        })
    }

    /// Converts `value` in `self` into `to`, when both measure the same
    /// thing.
    pub fn convert(self, value: f64, to: Unit) -> Option<f64> {
        match (self, to) {
            (a, b) if a == b => Some(value),
            (Unit::Kilowatt, Unit::Watt) => Some(value * 1000.0),
            (Unit::Watt, Unit::Kilowatt) => Some(value / 1000.0),
            _ => None,
        }
    }
}

/// A value with its unit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantity {
    pub value: f64,
    pub unit: Unit,
}

/// The parameters of an action, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Params {
    pub power: Option<Quantity>,
    /// Target state of charge.
    pub target_soc: Option<Quantity>,
    /// Reserve state of charge.
    pub reserve_soc: Option<Quantity>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Param {
    Power,
    /// Target state of charge.
    TargetSoc,
    /// Reserve (floor) state of charge.
    ReserveSoc,
}

impl Param {
    /// The API field name of the parameter.
    pub fn name(self) -> &'static str {
        match self {
            Param::Power => "power",
            Param::TargetSoc => "target_soc",
            Param::ReserveSoc => "reserve_soc",
        }
    }
}

/// How an action is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimingShape {
    /// No start: now.
    Immediate,
    /// A start, no end.
    Scheduled,
    /// A start and an end; reverted at the end.
    Windowed,
}

/// One parameter a command accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Which parameter.
    pub param: Param,
    /// Whether it must be given.
    pub required: bool,
    /// Units accepted.
    pub units: Vec<Unit>,
    /// Inclusive bounds, in `bound_unit`.
    pub min: f64,
    /// Inclusive upper bound, in `bound_unit`.
    pub max: f64,
    /// Unit of `min` and `max`.
    pub bound_unit: Unit,
}

/// One command a device accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandSpec {
    pub command: Command,
    /// The channel it controls; actions collide only within a channel.
    pub channel: String,
    /// Its parameters; any other is rejected.
    pub params: Vec<ParamSpec>,
    /// Timing shapes accepted.
    pub timing: Vec<TimingShape>,
}

/// Limits on windows the device can execute.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowLimits {
    /// Granularity of start/end in seconds; 0 = any.
    pub granularity_seconds: u32,
    /// Whether one native window may cross local midnight.
    pub may_cross_midnight: bool,
    /// Native slot count; 0 = unlimited.
    pub max_slots: u32,
}

/// An OEM request budget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateBudget {
    /// Calls per day per OEM account; 0 = unlimited.
    pub calls_per_day: u32,
    /// Minimum seconds between two writes to one device.
    pub min_write_interval_seconds: u32,
}

/// What a driver can do with one device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    /// Commands accepted.
    pub commands: Vec<CommandSpec>,
    /// Whether the device has a native scheduler of its own.
    pub native_scheduler: bool,
    /// Window limits.
    pub window_limits: WindowLimits,
    /// Rate budget.
    pub rate_budget: RateBudget,
}

impl Capabilities {
    /// The spec of `command`, if the device accepts it.
    pub fn command(&self, command: Command) -> Option<&CommandSpec> {
        self.commands.iter().find(|c| c.command == command)
    }
}

impl Params {
    /// Power in watts, if given.
    pub fn power_watts(&self) -> Option<f64> {
        self.power.and_then(|q| q.unit.convert(q.value, Unit::Watt))
    }
}
