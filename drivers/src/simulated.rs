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

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;

use crate::driver::{
    ApplyRequest, DeviceState, Driver, DriverError, ErrorKind, NativeRow, Outcome, RevertRequest,
    RowOwner,
};
use crate::factory::{ConfigError, ConfigErrors, DeviceSpec, DriverFactory};
use crate::model::{
    Capabilities, Command, CommandSpec, Family, Param, ParamSpec, RateBudget, TimingShape, Unit,
    WindowLimits,
};

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
    None,
    /// Every apply is rejected (OEM_REJECTED).
    Reject,
    /// Every call fails as retryable (OEM_UNAVAILABLE).
    Unavailable,
    /// The device is offline (DEVICE_OFFLINE).
    Offline,
    /// Applies succeed, reverts fail.
    RevertFails,
    /// Every apply and revert panics: a driver bug, to show that the
    /// service survives one (the attempt fails; reads still work).
    Panic,
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
    /// Parses and validates settings for a device of `family`; every bad
    /// setting is reported.
    pub fn parse(family: Family, s: &BTreeMap<String, String>) -> Result<Self, Vec<ConfigError>> {
        let mut errors = ConfigErrors::unknown_keys(s, KNOWN);
        let default_power = if family == Family::EvCharger {
            11000.0
        } else {
            5000.0
        };
        let latency_ms = errors.take(number(s, "latency_ms", 200.0, 0.0, 600_000.0));
        let native_scheduler_active =
            errors.take(match s.get("native_scheduler_active").map(String::as_str) {
                None | Some("false") => Ok(false),
                Some("true") => Ok(true),
                Some(_) => Err(invalid("native_scheduler_active", "must be true or false")),
            });
        let fail_mode = errors.take(match s.get("fail_mode").map(String::as_str) {
            None | Some("none") => Ok(FailMode::None),
            Some("reject") => Ok(FailMode::Reject),
            Some("unavailable") => Ok(FailMode::Unavailable),
            Some("offline") => Ok(FailMode::Offline),
            Some("revert_fails") => Ok(FailMode::RevertFails),
            Some("panic") => Ok(FailMode::Panic),
            Some(_) => Err(invalid(
                "fail_mode",
                "must be one of none, reject, unavailable, offline, revert_fails, panic",
            )),
        });
        let max_power_w = errors.take(number(s, "max_power_w", default_power, 1.0, 1_000_000.0));
        let capacity_wh = errors.take(number(s, "capacity_wh", 10_000.0, 1.0, 10_000_000.0));
        let initial_soc = errors.take(number(s, "initial_soc", 50.0, 0.0, 100.0));
        match (
            latency_ms,
            native_scheduler_active,
            fail_mode,
            max_power_w,
            capacity_wh,
            initial_soc,
        ) {
            (
                Some(latency_ms),
                Some(native_scheduler_active),
                Some(fail_mode),
                Some(max_power_w),
                Some(capacity_wh),
                Some(initial_soc),
            ) if errors.0.is_empty() => Ok(Self {
                latency_ms: latency_ms as u64,
                native_scheduler_active,
                fail_mode,
                max_power_w,
                capacity_wh,
                initial_soc,
            }),
            _ => Err(errors.0),
        }
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

/// The virtual device behind a simulated driver; it outlives driver
/// instances (one is built per dispatch).
#[derive(Debug)]
struct SimDevice {
    /// Mode in force: a command name, or AUTO_BALANCED at rest.
    mode: &'static str,
    /// The action whose command is in force, if any.
    applied_by: Option<String>,
    /// An EV charger's power limit (its own channel, independent of the
    /// mode): the action that set it and the limit in watts.
    power_limit: Option<(String, f64)>,
    /// Signed power in watts (charge > 0).
    power_w: f64,
    soc: f64,
    at: Instant,
    /// The foreign native-scheduler row was cleared (CANCEL_AND_REPLACE).
    native_cleared: bool,
    /// Calls made (apply + revert + read), for tests and the conformance
    /// suite.
    calls: u64,
    /// Per action: the largest fencing token seen (a call with a smaller
    /// one lands too late: a newer claim owns the work, and it is refused)
    /// and the applies that took effect (for tests: exactly once). Sorted
    /// by action id (`SimDevice::seen_mut`): a fleet of 100,000 simulated
    /// devices lives in the server's memory, most with one action, for
    /// which a hash map's table took about 160 bytes and this takes 32.
    seen: Vec<(Box<str>, Seen)>,
    /// Calls refused for a stale fencing token.
    stale_refused: u64,
}

/// What a simulated device remembers of one action.
#[derive(Debug, Default)]
struct Seen {
    fence: u64,
    applies: u32,
}

impl SimDevice {
    /// What the device remembers of `action`.
    fn seen(&self, action: &str) -> Option<&Seen> {
        self.seen
            .binary_search_by(|(id, _)| (**id).cmp(action))
            .ok()
            .map(|i| &self.seen[i].1)
    }

    /// What the device remembers of `action`, remembered afresh if it was
    /// not. Action ids grow with time, so a new one is mostly appended.
    fn seen_mut(&mut self, action: &str) -> &mut Seen {
        let i = match self.seen.binary_search_by(|(id, _)| (**id).cmp(action)) {
            Ok(i) => i,
            Err(i) => {
                if self.seen.capacity() == 0 {
                    self.seen.reserve_exact(1);
                }
                self.seen.insert(i, (action.into(), Seen::default()));
                i
            }
        };
        &mut self.seen[i].1
    }

    /// Refuses a call whose fencing token is older than one seen for the
    /// action; remembers a newer one. Checked when the call lands (after
    /// its latency), as a device would.
    fn fenced(&mut self, action: &str, fence: u64) -> Result<(), DriverError> {
        // Unfenced (0) is accepted only until a token was seen for the
        // action: then it is as stale as any smaller token.
        if fence == 0 && self.seen(action).is_none_or(|s| s.fence == 0) {
            return Ok(());
        }
        let seen = &mut self.seen_mut(action).fence;
        if fence < *seen {
            let seen = *seen;
            self.stale_refused += 1;
            return Err(DriverError::new(
                ErrorKind::StaleFence,
                format!(
                    "stale fencing token {fence} for action {action}: token {seen} already seen"
                ),
            )
            .with_raw("simulated: stale fencing token"));
        }
        *seen = fence;
        Ok(())
    }
}

impl SimDevice {
    /// Moves the state of charge on by the time passed.
    fn settle(&mut self, capacity_wh: f64) {
        let hours = self.at.elapsed().as_secs_f64() / 3600.0;
        self.at = Instant::now();
        self.soc = (self.soc + self.power_w * hours / capacity_wh * 100.0).clamp(0.0, 100.0);
    }
}

/// Factory of the `simulated` driver. Clones share the virtual devices.
#[derive(Clone, Debug, Default)]
pub struct SimulatedFactory {
    /// Each device boxed: the map's table (grown by doubling, both tables
    /// held while it grows) then holds a pointer per device, not the whole
    /// device, which at 100,000 devices was a 26 MB table.
    devices: Arc<Mutex<HashMap<String, Box<SimDevice>>>>,
    /// Capabilities by what decides them (the family and `max_power_w`'s
    /// bits), shared by the drivers built: a dispatch storm builds one
    /// driver per action, and each held its own copy.
    shared: Arc<Mutex<SharedCapabilities>>,
}

/// Capabilities by family and `max_power_w`'s bits.
type SharedCapabilities = HashMap<(Family, u64), Arc<Capabilities>>;

/// Most capabilities [`SimulatedFactory`] keeps shared; past it, it starts
/// over (any number of distinct `max_power_w` values can be configured).
const SHARED_CAPABILITIES: usize = 64;

impl SimulatedFactory {
    /// The power limit in force on a simulated EV charger (watts) and the
    /// action that set it, as the device sees it (for tests).
    pub fn power_limit(&self, device_id: &str) -> Option<(f64, String)> {
        let devices = self.devices.lock().ok()?;
        let (id, w) = devices.get(device_id)?.power_limit.clone()?;
        Some((w, id))
    }

    /// How many applies of `action` took effect on `device_id`, and how
    /// many calls the device refused for a stale fencing token (for tests).
    pub fn applies(&self, device_id: &str, action: &str) -> (u32, u64) {
        let Ok(devices) = self.devices.lock() else {
            return (0, 0);
        };
        devices.get(device_id).map_or((0, 0), |d| {
            (d.seen(action).map_or(0, |s| s.applies), d.stale_refused)
        })
    }

    /// The mode in force on a simulated device and the action that put it
    /// there, as the device sees it (for tests).
    pub fn observe(&self, device_id: &str) -> Option<(String, Option<String>, u64)> {
        let devices = self.devices.lock().ok()?;
        devices
            .get(device_id)
            .map(|d| (d.mode.to_owned(), d.applied_by.clone(), d.calls))
    }
}

impl DriverFactory for SimulatedFactory {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn build(&self, device: &DeviceSpec<'_>) -> Result<Arc<dyn Driver>, ConfigError> {
        let settings =
            SimulatedSettings::parse(device.family, device.settings).map_err(ConfigError::first)?;
        let key = (device.family, settings.max_power_w.to_bits());
        let known = self
            .shared
            .lock()
            .ok()
            .and_then(|shared| shared.get(&key).cloned());
        let capabilities = match known {
            Some(c) => c,
            None => {
                let c = Arc::new(self.capabilities(device)?);
                if let Ok(mut shared) = self.shared.lock() {
                    if shared.len() >= SHARED_CAPABILITIES {
                        shared.clear();
                    }
                    shared.insert(key, c.clone());
                }
                c
            }
        };
        Ok(Arc::new(Simulated {
            device_id: device.device_id.to_owned(),
            settings,
            capabilities,
            devices: self.devices.clone(),
        }))
    }

    fn validate(&self, device: &DeviceSpec<'_>) -> Vec<ConfigError> {
        match SimulatedSettings::parse(device.family, device.settings) {
            Ok(_) => self.capabilities(device).err().into_iter().collect(),
            Err(errors) => errors,
        }
    }

    fn capabilities(&self, device: &DeviceSpec<'_>) -> Result<Capabilities, ConfigError> {
        let settings =
            SimulatedSettings::parse(device.family, device.settings).map_err(ConfigError::first)?;
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

/// A simulated device's driver.
#[derive(Debug)]
pub struct Simulated {
    device_id: String,
    settings: SimulatedSettings,
    capabilities: Arc<Capabilities>,
    devices: Arc<Mutex<HashMap<String, Box<SimDevice>>>>,
}

const REST_MODE: &str = "AUTO_BALANCED";

impl Simulated {
    fn with<T>(&self, f: impl FnOnce(&mut SimDevice) -> T) -> Result<T, DriverError> {
        let mut devices = self
            .devices
            .lock()
            .map_err(|_| DriverError::new(ErrorKind::Unavailable, "simulator state poisoned"))?;
        let d = devices.entry(self.device_id.clone()).or_insert_with(|| {
            Box::new(SimDevice {
                mode: REST_MODE,
                applied_by: None,
                power_limit: None,
                power_w: 0.0,
                soc: self.settings.initial_soc,
                at: Instant::now(),
                native_cleared: false,
                calls: 0,
                seen: Vec::new(),
                stale_refused: 0,
            })
        });
        if !self.settings.native_scheduler_active {
            // Turning the setting off and on again brings a fresh row back.
            d.native_cleared = false;
        }
        d.calls += 1;
        d.settle(self.settings.capacity_wh);
        Ok(f(d))
    }

    /// The whole state of the virtual device, as a read shows it; also
    /// handed back with every write (the simulator always knows it, so the
    /// service need not read it again).
    fn state_of(&self, d: &SimDevice) -> DeviceState {
        DeviceState {
            native_scheduler: self.native_rows(d),
            soc_percent: Some(d.soc),
            mode: Some(d.mode.to_owned()),
        }
    }

    fn native_rows(&self, d: &SimDevice) -> Option<(bool, Vec<NativeRow>)> {
        let active = self.settings.native_scheduler_active && !d.native_cleared;
        Some((
            active,
            if active {
                // The whole day: it stands in the way of every window.
                vec![NativeRow {
                    start: "00:00".into(),
                    end: "24:00".into(),
                    mode: "SelfUse".into(),
                    enabled: true,
                    owner: RowOwner::Foreign,
                }]
            } else {
                vec![]
            },
        ))
    }

    async fn latency(&self) {
        if self.settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.settings.latency_ms)).await;
        }
    }

    fn fault(&self, revert: bool) -> Option<DriverError> {
        let raw = |s: &str| format!("simulated: {s}");
        match self.settings.fail_mode {
            FailMode::None => None,
            FailMode::Reject if !revert => Some(
                DriverError::new(
                    ErrorKind::Rejected,
                    "the simulated OEM rejected the command",
                )
                .with_raw(raw("rejected (fail_mode=reject)")),
            ),
            FailMode::Reject => None,
            FailMode::Unavailable => Some(
                DriverError::new(ErrorKind::Unavailable, "the simulated OEM is unavailable")
                    .with_raw(raw("503 (fail_mode=unavailable)")),
            ),
            FailMode::Offline => Some(
                DriverError::new(ErrorKind::Offline, "the simulated device is offline")
                    .with_raw(raw("offline (fail_mode=offline)")),
            ),
            FailMode::RevertFails if revert => Some(
                DriverError::new(ErrorKind::Unavailable, "the simulated revert failed")
                    .with_raw(raw("revert failed (fail_mode=revert_fails)")),
            ),
            FailMode::RevertFails => None,
            #[allow(clippy::panic)] // the point of this fault
            FailMode::Panic => panic!("simulated driver bug (fail_mode=panic)"),
        }
    }
}

#[async_trait]
impl Driver for Simulated {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn account(&self) -> String {
        format!("simulated/{}", self.device_id)
    }

    async fn read_state(
        &self,
        _live: &[crate::driver::Applied],
    ) -> Result<DeviceState, DriverError> {
        if self.settings.fail_mode == FailMode::Offline {
            return Err(self
                .fault(false)
                .unwrap_or_else(|| DriverError::new(ErrorKind::Offline, "offline")));
        }
        self.with(|d| self.state_of(d))
    }

    async fn apply(&self, req: &ApplyRequest) -> Result<Outcome, DriverError> {
        self.latency().await;
        if let Some(e) = self.fault(false) {
            self.with(|_| ())?;
            return Err(e);
        }
        let max = self.settings.max_power_w;
        self.with(|d| {
            d.fenced(&req.action_id, req.fence)?;
            if let Some((true, rows)) = self.native_rows(d) {
                if !req.clear_native_scheduler {
                    return Err(DriverError::new(
                        ErrorKind::SchedulerActive,
                        "the native scheduler is enabled and blocks direct mode writes",
                    )
                    .with_raw("simulated: scheduler flag enabled")
                    .with_rows(rows));
                }
                d.native_cleared = true;
            }
            d.seen_mut(req.action_id.as_str()).applies += 1;
            // One line per apply that took effect: several replicas'
            // logs together show whether any action was applied twice.
            tracing::info!(
                target: "switchyard::simulated",
                action_id = %req.action_id,
                fence = req.fence,
                "simulated apply took effect"
            );
            if req.command == Command::EvPowerLimit {
                let w = req.params.power_watts().unwrap_or(max).min(max);
                d.power_limit = Some((req.action_id.clone(), w));
                return Ok(Outcome {
                    verified: true,
                    raw: format!("simulated: power limit {w} W in force"),
                    state: Some(self.state_of(d)),
                    ..Default::default()
                });
            }
            d.mode = req.command.as_str();
            d.applied_by = Some(req.action_id.clone());
            let p = req.params.power_watts().unwrap_or(max).min(max);
            d.power_w = match req.command {
                crate::model::Command::Charge => p,
                crate::model::Command::Discharge => -p,
                _ => 0.0,
            };
            Ok(Outcome {
                verified: true,
                raw: format!("simulated: mode {} in force", d.mode),
                state: Some(self.state_of(d)),
                ..Default::default()
            })
        })?
    }

    async fn revert(&self, req: &RevertRequest) -> Result<Outcome, DriverError> {
        self.latency().await;
        if let Some(e) = self.fault(true) {
            self.with(|_| ())?;
            return Err(e);
        }
        self.with(|d| {
            d.fenced(&req.applied.action_id, req.applied.fence)?;
            // Undo only our own write: a later action may have replaced
            // it. Each channel is undone on its own.
            if req.applied.command == Command::EvPowerLimit {
                if d.power_limit.as_ref().map(|(id, _)| id) == Some(&req.applied.action_id) {
                    d.power_limit = None;
                }
                return Ok(Outcome {
                    verified: true,
                    raw: "simulated: no power limit in force".to_owned(),
                    state: Some(self.state_of(d)),
                    ..Default::default()
                });
            }
            if d.applied_by.as_deref() == Some(req.applied.action_id.as_str()) {
                d.mode = REST_MODE;
                d.applied_by = None;
                d.power_w = 0.0;
            }
            Ok(Outcome {
                verified: true,
                raw: format!("simulated: mode {} in force", d.mode),
                state: Some(self.state_of(d)),
                ..Default::default()
            })
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(family: Family, settings: &BTreeMap<String, String>) -> DeviceSpec<'_> {
        DeviceSpec {
            device_id: "d",
            family,
            oem_device_id: "",
            timezone: "UTC",
            settings,
        }
    }

    #[test]
    fn unknown_settings_are_rejected_by_name() {
        let s = BTreeMap::from([("latency".to_owned(), "5".to_owned())]);
        let err = SimulatedFactory::default()
            .capabilities(&spec(Family::Battery, &s))
            .unwrap_err();
        assert_eq!(err.key(), Some("latency"));
    }

    #[test]
    fn invalid_values_do_not_echo_the_value() {
        let s = BTreeMap::from([("fail_mode".to_owned(), "s3cr3t".to_owned())]);
        let err = SimulatedFactory::default()
            .capabilities(&spec(Family::Battery, &s))
            .unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"));
    }

    #[test]
    fn max_power_setting_bounds_power() {
        let s = BTreeMap::from([("max_power_w".to_owned(), "3000".to_owned())]);
        let caps = SimulatedFactory::default()
            .capabilities(&spec(Family::Battery, &s))
            .unwrap();
        let charge = caps.command(Command::Charge).unwrap();
        assert_eq!(charge.params[0].max, 3000.0);
        assert_eq!(charge.channel, MODE_CHANNEL);
    }

    #[test]
    fn ev_power_limit_has_its_own_channel() {
        let s = BTreeMap::new();
        let caps = SimulatedFactory::default()
            .capabilities(&spec(Family::EvCharger, &s))
            .unwrap();
        assert_eq!(
            caps.command(Command::EvPowerLimit).unwrap().channel,
            POWER_LIMIT_CHANNEL
        );
        assert!(caps.command(Command::Discharge).is_none());
    }

    fn apply_request(id: &str, command: Command, power_w: Option<f64>) -> ApplyRequest {
        ApplyRequest {
            action_id: id.to_owned(),
            command,
            params: crate::model::Params {
                power: power_w.map(|value| crate::model::Quantity {
                    value,
                    unit: Unit::Watt,
                }),
                target_soc: None,
                reserve_soc: None,
            },
            start: jiff::Timestamp::UNIX_EPOCH,
            end: None,
            clear_native_scheduler: false,
            live: Vec::new(),
            memo: None,
            fence: 0,
        }
    }

    /// A simulated device of `family` that answers at once, and its
    /// factory (which shows what the device remembers).
    fn instant(family: Family) -> (SimulatedFactory, Arc<dyn Driver>) {
        let s = BTreeMap::from([("latency_ms".to_owned(), "0".to_owned())]);
        let f = SimulatedFactory::default();
        let d = f.build(&spec(family, &s)).unwrap();
        (f, d)
    }

    #[tokio::test]
    async fn fencing_is_per_action_and_an_unfenced_call_is_stale_once_a_token_was_seen() {
        let (f, d) = instant(Family::Battery);
        let mut a = apply_request("a1", Command::Charge, Some(1000.0));
        // Remembering an apply does not fence the action.
        d.apply(&a).await.unwrap();
        d.apply(&a).await.unwrap();
        a.fence = 5;
        d.apply(&a).await.unwrap();
        // The same token again is not stale.
        d.revert(&RevertRequest {
            applied: a.clone(),
            memo: None,
        })
        .await
        .unwrap();
        // A fenced call kept the count of applies.
        assert_eq!(f.applies("d", "a1"), (3, 0));
        for stale in [0, 4] {
            let mut late = a.clone();
            late.fence = stale;
            let err = d.apply(&late).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::StaleFence, "token {stale}");
        }
        // Refused calls take no effect and are counted as refused.
        assert_eq!(f.applies("d", "a1"), (3, 2));
        assert_eq!(f.observe("d").unwrap().0, REST_MODE);
        // Another action's tokens are its own.
        let mut b = apply_request("a2", Command::Idle, None);
        d.apply(&b).await.unwrap();
        b.fence = 1;
        d.apply(&b).await.unwrap();
        assert_eq!(f.applies("d", "a2"), (2, 2));
        assert_eq!(f.observe("d").unwrap().0, "IDLE");
    }

    /// A device remembers each action on its own, whatever the order in
    /// which their ids first reach it (kept sorted: a new id goes first,
    /// last or between).
    #[tokio::test]
    async fn actions_met_out_of_order_are_each_remembered() {
        let (f, d) = instant(Family::Battery);
        for (id, times) in [("m", 1), ("c", 2), ("x", 3), ("a", 4), ("e", 5)] {
            for _ in 0..times {
                d.apply(&apply_request(id, Command::Charge, Some(1000.0)))
                    .await
                    .unwrap();
            }
        }
        for (id, times) in [("a", 4), ("c", 2), ("e", 5), ("m", 1), ("x", 3), ("z", 0)] {
            assert_eq!(f.applies("d", id), (times, 0), "action {id}");
        }
        // A token seen for one action fences that action only.
        let mut c = apply_request("c", Command::Charge, Some(1000.0));
        c.fence = 9;
        d.apply(&c).await.unwrap();
        c.fence = 8;
        assert_eq!(d.apply(&c).await.unwrap_err().kind, ErrorKind::StaleFence);
        let mut e = apply_request("e", Command::Charge, Some(1000.0));
        e.fence = 1;
        d.apply(&e).await.unwrap();
        assert_eq!(f.applies("d", "c"), (3, 1));
        assert_eq!(f.applies("d", "e"), (6, 1));
        // Kept in ascending order of id (ids grow with time: a new one is
        // appended, nothing shifts).
        d.apply(&apply_request("y", Command::Charge, Some(1000.0)))
            .await
            .unwrap();
        let devices = f.devices.lock().unwrap();
        let ids: Vec<&str> = devices["d"].seen.iter().map(|(id, _)| &**id).collect();
        assert_eq!(ids, ["a", "c", "e", "m", "x", "y"]);
    }

    /// A device that met one action keeps room for that one only.
    #[tokio::test]
    async fn a_device_that_met_one_action_keeps_room_for_one() {
        let (f, d) = instant(Family::Battery);
        let mut a = apply_request("a", Command::Charge, Some(1000.0));
        a.fence = 3;
        d.apply(&a).await.unwrap();
        let devices = f.devices.lock().unwrap();
        assert_eq!(devices["d"].seen.len(), 1);
        assert_eq!(devices["d"].seen.capacity(), 1);
    }

    #[tokio::test]
    async fn an_ev_power_limit_and_the_mode_are_applied_and_reverted_on_their_own() {
        let (f, d) = instant(Family::EvCharger);
        let charge = apply_request("a1", Command::Charge, Some(7000.0));
        let limit = apply_request("a2", Command::EvPowerLimit, Some(3600.0));
        d.apply(&charge).await.unwrap();
        d.apply(&limit).await.unwrap();
        assert_eq!(f.observe("d").unwrap().0, "CHARGE");
        assert_eq!(f.power_limit("d"), Some((3600.0, "a2".to_owned())));

        // Undoing the limit leaves the mode in force, and the other way round.
        d.revert(&RevertRequest {
            applied: limit,
            memo: None,
        })
        .await
        .unwrap();
        assert_eq!(f.power_limit("d"), None);
        assert_eq!(f.observe("d").unwrap().0, "CHARGE");
        let limit = apply_request("a3", Command::EvPowerLimit, Some(2000.0));
        d.apply(&limit).await.unwrap();
        d.revert(&RevertRequest {
            applied: charge,
            memo: None,
        })
        .await
        .unwrap();
        assert_eq!(f.observe("d").unwrap().0, REST_MODE);
        assert_eq!(f.power_limit("d"), Some((2000.0, "a3".to_owned())));
    }

    /// Drivers of devices configured alike share one copy of their
    /// capabilities; a different power limit gets its own.
    #[test]
    fn drivers_configured_alike_share_their_capabilities() {
        let f = SimulatedFactory::default();
        let s = BTreeMap::from([("max_power_w".to_owned(), "4000".to_owned())]);
        let (a, b) = (
            f.build(&spec(Family::Battery, &s)).unwrap(),
            f.build(&spec(Family::Battery, &s)).unwrap(),
        );
        assert!(std::ptr::eq(a.capabilities(), b.capabilities()));
        let other = BTreeMap::from([("max_power_w".to_owned(), "6000".to_owned())]);
        let c = f.build(&spec(Family::Battery, &other)).unwrap();
        assert!(!std::ptr::eq(a.capabilities(), c.capabilities()));
        let max =
            |d: &Arc<dyn Driver>| d.capabilities().command(Command::Charge).unwrap().params[0].max;
        assert_eq!((max(&a), max(&c)), (4000.0, 6000.0));
        // The other family's commands are its own.
        let ev = f.build(&spec(Family::EvCharger, &s)).unwrap();
        assert!(ev.capabilities().command(Command::EvPowerLimit).is_some());
        assert!(a.capabilities().command(Command::EvPowerLimit).is_none());
        // However many limits are configured, the shared ones stay few.
        for w in 1..=200 {
            let s = BTreeMap::from([("max_power_w".to_owned(), w.to_string())]);
            f.build(&spec(Family::Battery, &s)).unwrap();
        }
        assert!(f.shared.lock().unwrap().len() <= SHARED_CAPABILITIES);
    }

    /// Every write hands back the state a read would show right after it,
    /// so the service records it without reading again.
    #[tokio::test]
    async fn each_write_hands_back_the_state_a_read_shows() {
        let s = BTreeMap::from([
            ("latency_ms".to_owned(), "0".to_owned()),
            ("native_scheduler_active".to_owned(), "true".to_owned()),
        ]);
        let f = SimulatedFactory::default();
        let d = f.build(&spec(Family::Battery, &s)).unwrap();
        let mut charge = apply_request("a1", Command::Charge, Some(3000.0));
        charge.clear_native_scheduler = true;
        let applied = d.apply(&charge).await.unwrap().state.expect("state");
        let read = d.read_state(&[]).await.unwrap();
        assert_eq!(applied.mode.as_deref(), Some("CHARGE"));
        assert_eq!(applied.mode, read.mode);
        // The foreign row was cleared by this write: the state says so.
        assert_eq!(applied.native_scheduler, Some((false, vec![])));
        assert_eq!(applied.native_scheduler, read.native_scheduler);
        let (soc, read_soc) = (applied.soc_percent.unwrap(), read.soc_percent.unwrap());
        assert!((0.0..=100.0).contains(&soc), "{soc}");
        // Charging moves it on a little between the two.
        assert!((read_soc - soc).abs() < 1.0, "{soc} then {read_soc}");

        let reverted = d
            .revert(&RevertRequest {
                applied: charge,
                memo: None,
            })
            .await
            .unwrap()
            .state
            .expect("state");
        assert_eq!(reverted.mode.as_deref(), Some(REST_MODE));
        assert_eq!(reverted.mode, d.read_state(&[]).await.unwrap().mode);

        // An EV charger's power limit is its own channel: its write and
        // its revert hand back the state too, the mode untouched.
        let s = BTreeMap::from([("latency_ms".to_owned(), "0".to_owned())]);
        let ev = SimulatedFactory::default()
            .build(&spec(Family::EvCharger, &s))
            .unwrap();
        let charge = apply_request("e1", Command::Charge, Some(7000.0));
        ev.apply(&charge).await.unwrap();
        let limit = apply_request("e2", Command::EvPowerLimit, Some(3600.0));
        let limited = ev.apply(&limit).await.unwrap().state.expect("state");
        assert_eq!(limited.mode.as_deref(), Some("CHARGE"));
        let unlimited = ev
            .revert(&RevertRequest {
                applied: limit,
                memo: None,
            })
            .await
            .unwrap()
            .state
            .expect("state");
        assert_eq!(unlimited.mode.as_deref(), Some("CHARGE"));
    }
}
