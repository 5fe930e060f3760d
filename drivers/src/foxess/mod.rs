//! The `foxess` driver: FoxESS hybrid inverters through the FoxESS Open
//! API (cloud), driven through the inverter's native scheduler.
//!
//! Every command becomes one or more scheduler groups (time slots) that
//! switchyard writes by read-modify-write of the whole group list, keeping
//! every group it does not own, and then verifies by reading the list back
//! and finding its groups by content. See `docs/drivers/foxess.md` for the
//! settings, the rules and the quirks absorbed.
//!
//! | key | values | default |
//! |---|---|---|
//! | `base_url` | the Open API: `https://www.foxesscloud.com` or a prefix the operator allows | — |
//! | `api_key_ref` | `env:SWITCHYARD_SECRET_<NAME>` or `file:<name>` in the secrets directory (required) | — |
//! | `max_slots` | scheduler slots of the inverter, 1..=96 | 8 |
//! | `max_power_w` | largest `fdPwr`, 1..=100000 | 6000 |
//! | `min_soc_on_grid` | `minSocOnGrid` written, 10..=100, ≤ `fd_soc` | 10 |
//! | `fd_soc` | `fdSoc` of DISCHARGE without `target_soc`, 11..=100 | 20 |
//! | `min_write_interval_ms` | spacing between two writes, 0..=600000 | 5000 |
//! | `min_query_interval_ms` | spacing between two calls to one read path of the account, 0..=60000 | 1000 |
//! | `min_update_interval_ms` | spacing between two calls to one write path of the account, 0..=60000 | 2000 |
//! | `request_timeout_ms` | timeout of one HTTP call, 100..=120000 | 15000 |

pub mod client;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod plan;
pub mod settings;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

use async_trait::async_trait;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::{
    client::{Api, HttpsClient, new_client},
    plan::{
        ApplyPlan, Context, check_timing, coverage, groups_for, owner, plan_apply, plan_revert,
        row, same_content, same_groups,
    },
    settings::FoxessSettings,
    wire::{
        Group, GroupsRead, PATH_DEVICE_DETAIL, PATH_GET, PATH_GET_FLAG, PATH_PLANT_DETAIL,
        PATH_SET, PATH_SET_FLAG, as_flag, parse_groups,
    },
};
use crate::{
    driver::{
        Applied, ApplyRequest, DeviceState, Driver, DriverError, ErrorKind, Outcome, RevertRequest,
    },
    factory::{ConfigError, DeviceSpec, DriverFactory},
    model::{
        Capabilities, Command, CommandSpec, Family, Param, ParamSpec, RateBudget, TimingShape,
        Unit, WindowLimits,
    },
    operator::OperatorPolicy,
};

/// The channel every command controls.
pub const MODE_CHANNEL: &str = "mode";

/// The time source of the drivers (tests pin it).
pub type Clock = Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>;

/// What this process remembers about one inverter (keyed by endpoint and
/// serial, whatever key reference reaches it). Drivers are built per
/// dispatch, so this lives in the factory. Nothing here is needed for
/// correctness after a restart: what was written is in each action's memo.
#[derive(Debug, Default)]
struct DeviceMemory {
    /// When this process last wrote to the device (write spacing).
    last_write: Option<Instant>,
    /// The groups written per action id since this process started (a
    /// cache of the memos, which the service keeps durably).
    ours: BTreeMap<String, Vec<Group>>,
    /// The plant's time zone as the cloud reported it, and when it was
    /// read (`None` inside: not reported).
    plant_tz: Option<(Instant, Option<String>)>,
    /// Groups last read enabled (by content, at most 96): a foreign group
    /// that reads disabled only because its time has passed today is
    /// written back enabled when it was seen enabled before.
    seen_enabled: Vec<Group>,
    /// The scheduler flag as switchyard first found it, while this process
    /// has groups of its own on the inverter (same-round applies whose
    /// memos are not recorded yet inherit it).
    flag_found: Option<bool>,
    /// This inverter's cloud has shown an enabled group after its time had
    /// passed today: it does not disable passed groups, so a disabled
    /// one was disabled by someone, and is never revived.
    keeps_passed_enabled: bool,
    /// The fencing token (`<action id>:<token>`) of the call that holds
    /// the inverter's lock: sent with each of its writes.
    fence: Option<String>,
}

/// Most groups remembered as seen enabled per inverter.
const MAX_SEEN: usize = 96;

/// How long a plant's time zone read from the cloud is trusted.
const PLANT_TZ_TTL: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// What an apply records (the action's memo, JSON): the groups it wrote,
/// and the scheduler flag as the homeowner left it before switchyard's
/// first write, so the last revert restores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Memo {
    /// Format version (1).
    pub v: u32,
    /// The inverter written to.
    pub sn: String,
    /// The groups written, as on the wire.
    pub groups: Vec<Group>,
    /// The scheduler flag before switchyard first turned it on (inherited
    /// from the device's other live actions).
    pub flag_before: bool,
}

impl Memo {
    /// Parses a memo of inverter `sn`; `None` for anything else.
    pub fn parse(memo: &str, sn: &str) -> Option<Self> {
        serde_json::from_str::<Memo>(memo)
            .ok()
            .filter(|m| m.v == 1 && m.sn == sn)
    }
}

#[derive(Default)]
struct Shared {
    pacer: Arc<client::Pacer>,
    client: OnceLock<Result<HttpsClient, String>>,
    devices: Mutex<HashMap<String, Arc<tokio::sync::Mutex<DeviceMemory>>>>,
}

/// Factory of the `foxess` driver. Clones share the HTTP client and what
/// the drivers remember (write times, groups written).
#[derive(Clone, Default)]
pub struct FoxessFactory {
    shared: Arc<Shared>,
    clock: Option<Clock>,
    policy: OperatorPolicy,
}

impl fmt::Debug for FoxessFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FoxessFactory")
            .field("pinned_clock", &self.clock.is_some())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl FoxessFactory {
    /// A factory whose drivers read the time from `clock` (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// A factory that lets devices use only the secrets and endpoints
    /// `policy` allows (by default: none, and the FoxESS cloud).
    pub fn with_policy(mut self, policy: OperatorPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn settings(&self, device: &DeviceSpec<'_>) -> Result<FoxessSettings, Vec<ConfigError>> {
        let mut errors = Vec::new();
        if device.family != Family::Battery {
            errors.push(ConfigError::UnsupportedFamily(device.family.as_str()));
        }
        if device.oem_device_id.trim().is_empty() {
            errors.push(ConfigError::InvalidDeviceField {
                field: "oem_device_id",
                reason: "must be the inverter's serial number (deviceSN)".to_owned(),
            });
        }
        if let Err(e) = timezone(device) {
            errors.push(e);
        }
        match FoxessSettings::parse(device.settings, &self.policy) {
            Ok(s) if errors.is_empty() => Ok(s),
            Ok(_) => Err(errors),
            Err(more) => {
                errors.extend(more);
                Err(errors)
            }
        }
    }

    fn client(&self) -> Result<HttpsClient, ConfigError> {
        self.shared
            .client
            .get_or_init(|| new_client().map_err(|e| e.to_string()))
            .clone()
            .map_err(|_| ConfigError::InvalidSetting {
                key: "base_url".to_owned(),
                reason: "the TLS client cannot be set up on this server".to_owned(),
            })
    }

    fn memory(&self, key: &str) -> Arc<tokio::sync::Mutex<DeviceMemory>> {
        let mut devices = match self.shared.devices.lock() {
            Ok(d) => d,
            // A panic elsewhere while holding the map cannot leave it
            // inconsistent (inserts only): keep going.
            Err(poisoned) => poisoned.into_inner(),
        };
        devices.entry(key.to_owned()).or_default().clone()
    }
}

fn timezone(device: &DeviceSpec<'_>) -> Result<TimeZone, ConfigError> {
    TimeZone::get(device.timezone).map_err(|_| ConfigError::InvalidDeviceField {
        field: "timezone",
        reason: "is not an IANA time zone known to the server".to_owned(),
    })
}

impl DriverFactory for FoxessFactory {
    fn kind(&self) -> &'static str {
        "foxess"
    }

    fn capabilities(&self, device: &DeviceSpec<'_>) -> Result<Capabilities, ConfigError> {
        let s = self.settings(device).map_err(ConfigError::first)?;
        // Every command is a daily-recurring group: only a window has an
        // end at which switchyard removes it. AUTO_BALANCED without an end
        // hands the inverter back to the homeowner's own schedule (see
        // `Foxess::release`).
        let windowed = vec![TimingShape::Windowed];
        let any = vec![
            TimingShape::Immediate,
            TimingShape::Scheduled,
            TimingShape::Windowed,
        ];
        let power = ParamSpec {
            param: Param::Power,
            required: false,
            units: vec![Unit::Watt, Unit::Kilowatt],
            min: 1.0,
            max: f64::from(s.max_power_w),
            bound_unit: Unit::Watt,
        };
        let soc = |param, min| ParamSpec {
            param,
            required: false,
            units: vec![Unit::Percent],
            min,
            max: 100.0,
            bound_unit: Unit::Percent,
        };
        let cmd = |command, params| CommandSpec {
            command,
            channel: MODE_CHANNEL.to_owned(),
            params,
            timing: if command == Command::AutoBalanced {
                any.clone()
            } else {
                windowed.clone()
            },
        };
        Ok(Capabilities {
            commands: vec![
                cmd(
                    Command::Charge,
                    vec![power.clone(), soc(Param::TargetSoc, 11.0)],
                ),
                cmd(
                    Command::Discharge,
                    vec![
                        power,
                        soc(Param::TargetSoc, 11.0),
                        soc(Param::ReserveSoc, 10.0),
                    ],
                ),
                cmd(Command::Idle, vec![]),
                cmd(Command::AutoBalanced, vec![]),
                cmd(Command::AutoReserve, vec![]),
                cmd(Command::AutoExport, vec![]),
            ],
            native_scheduler: true,
            window_limits: WindowLimits {
                granularity_seconds: 60,
                may_cross_midnight: false,
                max_slots: s.max_slots,
            },
            rate_budget: RateBudget {
                calls_per_day: 1440,
                min_write_interval_seconds: 5,
            },
        })
    }

    fn validate(&self, device: &DeviceSpec<'_>) -> Vec<ConfigError> {
        let mut errors = self.settings(device).err().unwrap_or_default();
        // The secret is read whatever else is wrong, so that every problem
        // is reported in one round (unless its reference is refused).
        if !errors.iter().any(|e| e.key() == Some("api_key_ref"))
            && let Some(r) = device.settings.get("api_key_ref")
            && let Ok(r) = self.policy.secret_ref("api_key_ref", r)
            && let Err(e) = self.policy.resolve("api_key_ref", &r)
        {
            errors.push(e);
        }
        errors
    }

    /// The endpoint and serial: another key reference (a rotated key) still
    /// reaches the same inverter; another `base_url` or serial does not.
    fn target(&self, device: &DeviceSpec<'_>) -> String {
        let base = match FoxessSettings::parse(device.settings, &self.policy) {
            Ok(s) => s.base_url,
            // Settings the policy refuses now (a key file removed, say) still
            // name their endpoint: canonical, as a valid one would be.
            Err(_) => device.settings.get("base_url").map_or_else(
                || settings::FOXESS_CLOUD.to_owned(),
                |u| crate::operator::canonical_url(u).unwrap_or_else(|| u.clone()),
            ),
        };
        // Structured, so no serial or URL can make two targets spell alike.
        serde_json::json!([base, device.oem_device_id.trim()]).to_string()
    }

    fn build(&self, device: &DeviceSpec<'_>) -> Result<Arc<dyn Driver>, ConfigError> {
        let capabilities = self.capabilities(device)?;
        let settings = self.settings(device).map_err(ConfigError::first)?;
        let key = self.policy.resolve("api_key_ref", &settings.api_key_ref)?;
        let account = format!("foxess:{}#{}", settings.base_url, settings.api_key_ref);
        let sn = device.oem_device_id.trim().to_owned();
        // One read-modify-write at a time per inverter: keyed by endpoint
        // and serial, so two key references to one inverter share it.
        let inverter = serde_json::json!(["foxess", settings.base_url, sn]).to_string();
        Ok(Arc::new(Foxess {
            api: Api {
                base_url: settings.base_url.clone(),
                key,
                timeout: settings.request_timeout,
                client: self.client()?,
                pacing: client::Pacing {
                    pacer: self.shared.pacer.clone(),
                    account: account.clone(),
                    query: settings.min_query_interval,
                    update: settings.min_update_interval,
                },
            },
            memory: self.memory(&inverter),
            tz: timezone(device)?,
            clock: self.clock.clone(),
            account,
            sn,
            settings,
            capabilities,
        }))
    }
}

/// A FoxESS inverter's driver.
pub struct Foxess {
    api: Api,
    sn: String,
    tz: TimeZone,
    account: String,
    settings: FoxessSettings,
    capabilities: Capabilities,
    memory: Arc<tokio::sync::Mutex<DeviceMemory>>,
    clock: Option<Clock>,
}

impl fmt::Debug for Foxess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `api` carries the key: show only what is safe (Secret's Debug
        // redacts it anyway).
        f.debug_struct("Foxess")
            .field("account", &self.account)
            .field("device_sn", &self.sn)
            .field("timezone", &self.tz.iana_name())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Foxess {
    fn now(&self) -> jiff::Timestamp {
        self.clock
            .as_ref()
            .map_or_else(jiff::Timestamp::now, |c| c())
    }

    /// The current minute of the day in the device's zone.
    fn local_minute(&self) -> i64 {
        let local = self.tz.to_datetime(self.now());
        i64::from(local.hour()) * 60 + i64::from(local.minute())
    }

    /// Remembers which groups read enabled; with `revive`, a foreign group
    /// that reads disabled while its time has passed today, and that was
    /// seen enabled before, is set enabled again in `read` (the cloud may
    /// report passed groups disabled; written back so, the homeowner's
    /// daily group would stop). Returns the groups set enabled.
    fn note_seen(
        &self,
        mem: &mut DeviceMemory,
        read: &mut GroupsRead,
        switchyards: &[Group],
        revive: bool,
    ) -> Vec<Group> {
        let now = self.local_minute();
        let mut revived = Vec::new();
        for g in read.groups.iter_mut().filter(|g| !g.is_placeholder()) {
            let known = mem.seen_enabled.iter().position(|s| same_content(s, g));
            let passed = g.end_min() <= now;
            if g.enable == 1 && passed {
                mem.keeps_passed_enabled = true;
            }
            match (g.enable == 1, known) {
                (true, None) => {
                    if mem.seen_enabled.len() >= MAX_SEEN {
                        mem.seen_enabled.remove(0);
                    }
                    mem.seen_enabled.push(g.clone());
                }
                (false, Some(_))
                    if revive
                        && passed
                        && !mem.keeps_passed_enabled
                        && !switchyards.iter().any(|o| same_content(o, g)) =>
                {
                    g.enable = 1;
                    revived.push(g.clone());
                }
                // Disabled before its time: the homeowner turned it off.
                (false, Some(i)) if !passed => {
                    mem.seen_enabled.remove(i);
                }
                _ => {}
            }
        }
        revived
    }

    /// This action's groups, from the request and the device's `fdPwr`
    /// maximum (when the cloud reports it).
    fn compile(
        &self,
        req: &ApplyRequest,
        max_power_w: Option<i64>,
    ) -> Result<Vec<Group>, DriverError> {
        let t = plan::template(req.command, &req.params, &self.settings, max_power_w)?;
        let bits = coverage(req.start, req.end, &self.tz)?;
        let groups = groups_for(&bits, &t);
        if groups.is_empty() {
            return Err(DriverError::new(
                ErrorKind::Rejected,
                "the window cannot be expressed as FoxESS groups",
            ));
        }
        Ok(groups)
    }

    /// The memos of the device's other live actions (memos of another
    /// inverter, or unreadable ones, are ignored).
    fn memos(&self, live: &[Applied]) -> Vec<Memo> {
        live.iter()
            .filter_map(|a| Memo::parse(&a.memo, &self.sn))
            .collect()
    }

    /// Every group switchyard wrote that may be in force: the live
    /// actions' memos, and what this process wrote (except for `except`).
    fn switchyards(mem: &DeviceMemory, memos: &[Memo], except: Option<&str>) -> Vec<Group> {
        let mut all: Vec<Group> = memos
            .iter()
            .flat_map(|m| m.groups.iter().cloned())
            .collect();
        all.extend(
            mem.ours
                .iter()
                .filter(|(id, _)| Some(id.as_str()) != except)
                .flat_map(|(_, g)| g.iter().cloned()),
        );
        all
    }

    async fn get_flag(&self) -> Result<(bool, bool, String), DriverError> {
        let (result, raw) = self
            .api
            .call(PATH_GET_FLAG, &json!({ "deviceSN": self.sn }))
            .await?;
        let enable = result.get("enable").and_then(as_flag);
        // Older answers omit `support`; assume support unless told not.
        let support = result.get("support").and_then(as_flag).unwrap_or(true);
        match enable {
            Some(e) => Ok((e, support, raw)),
            None => Err(malformed(&raw, "the scheduler flag answer has no `enable`")),
        }
    }

    async fn get_groups(&self) -> Result<(GroupsRead, String), DriverError> {
        let (result, raw) = self
            .api
            .call(PATH_GET, &json!({ "deviceSN": self.sn }))
            .await?;
        parse_groups(&result)
            .map(|g| (g, raw.clone()))
            .map_err(|why| malformed(&raw, &why))
    }

    /// The device's slot count and `fdPwr` maximum: the cloud's where it
    /// reports them, else the settings'.
    fn limits(&self, read: &GroupsRead) -> (usize, i64) {
        let slots = read
            .max_group_count
            .map_or(self.settings.max_slots as usize, |n| {
                n.clamp(1, 96) as usize
            });
        let power = read
            .max_power_w
            .map_or(i64::from(self.settings.max_power_w), |p| {
                p.min(i64::from(self.settings.max_power_w))
            });
        (slots, power)
    }

    /// Refuses to write when the cloud reports the plant in another time
    /// zone than the device's: every group would land hours off. Read at
    /// most every few hours; a cloud that does not report it (or cannot
    /// be asked) is not a reason to refuse.
    async fn check_plant_timezone(&self, mem: &mut DeviceMemory) -> Result<(), DriverError> {
        let fresh = mem
            .plant_tz
            .as_ref()
            .filter(|(at, _)| at.elapsed() < PLANT_TZ_TTL);
        let reported = match fresh {
            Some((_, tz)) => tz.clone(),
            None => match self.read_plant_timezone().await {
                Ok(tz) => {
                    mem.plant_tz = Some((Instant::now(), tz.clone()));
                    tz
                }
                // Asked again at the next apply.
                Err(()) => None,
            },
        };
        let Some(name) = reported else { return Ok(()) };
        // A name this server's time-zone database does not know cannot be
        // compared: no refusal on a guess.
        let Ok(plant) = TimeZone::get(&name) else {
            return Ok(());
        };
        // By the rules, not the name: aliases (`Asia/Calcutta`,
        // `Europe/Kiev`, `Etc/UTC`) agree with their canonical names.
        if same_rules(&plant, &self.tz, self.now()) {
            return Ok(());
        }
        Err(DriverError::new(
            ErrorKind::Misconfigured,
            format!(
                "the FoxESS cloud reports this inverter's plant in time zone {:?}, but the device \
                 is configured with {:?}: every group would land at the wrong hours; correct the \
                 device's timezone",
                name.chars().take(64).collect::<String>(),
                self.tz.iana_name().unwrap_or("?")
            ),
        ))
    }

    /// The plant's time zone as the cloud reports it; `Ok(None)` when it
    /// does not, `Err` when it could not be asked now (an outage, the rate
    /// limit).
    async fn read_plant_timezone(&self) -> Result<Option<String>, ()> {
        let transient = |e: DriverError| if e.retryable() { Err(()) } else { Ok(None) };
        let detail = match self.api.get(PATH_DEVICE_DETAIL, &[("sn", &self.sn)]).await {
            Ok((detail, _)) => detail,
            Err(e) => return transient(e),
        };
        let plant = ["stationID", "plantID", "stationId", "plantId"]
            .iter()
            .find_map(|k| match detail.get(*k) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            });
        let Some(plant) = plant else { return Ok(None) };
        let plant = match self.api.get(PATH_PLANT_DETAIL, &[("id", &plant)]).await {
            Ok((plant, _)) => plant,
            Err(e) => return transient(e),
        };
        // `ianaTimezone` in the answers public clients show; `timezone` in
        // FoxESS's document.
        Ok(["ianaTimezone", "timezone"]
            .iter()
            .find_map(|k| plant.get(*k).and_then(Value::as_str))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    }

    /// Writes with the device's write spacing kept.
    async fn write(
        &self,
        mem: &mut DeviceMemory,
        path: &str,
        body: Value,
    ) -> Result<String, DriverError> {
        if let Some(last) = mem.last_write {
            let wait = self
                .settings
                .min_write_interval
                .saturating_sub(last.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let res = self
            .api
            .call_fenced(path, &body, mem.fence.as_deref())
            .await;
        // Any attempt counts against the OEM's spacing, failed or not.
        mem.last_write = Some(Instant::now());
        res.map(|(_, raw)| raw)
    }

    async fn write_groups(
        &self,
        mem: &mut DeviceMemory,
        groups: &[Group],
    ) -> Result<String, DriverError> {
        let groups: Vec<Value> = groups.iter().map(Group::to_wire).collect();
        self.write(
            mem,
            PATH_SET,
            json!({ "deviceSN": self.sn, "groups": groups }),
        )
        .await
    }

    async fn set_flag(&self, mem: &mut DeviceMemory, on: bool) -> Result<String, DriverError> {
        self.write(
            mem,
            PATH_SET_FLAG,
            json!({ "deviceSN": self.sn, "enable": i64::from(on) }),
        )
        .await
    }

    /// The device's state from its flag and groups, each row labelled
    /// with who wrote it.
    fn state(flag: bool, groups: &[Group], switchyards: &[Group]) -> DeviceState {
        let rows = groups
            .iter()
            .filter(|g| !g.is_placeholder())
            .map(|g| row(g, owner(g, switchyards)))
            .collect();
        DeviceState {
            native_scheduler: Some((flag, rows)),
            soc_percent: None,
            mode: None,
        }
    }

    /// Writes `list` and reads it back: `Ok(Err(back))` when the list
    /// read back is neither what was written nor `before` (what was there
    /// before the write): another writer changed it in between. A failed
    /// read-back is `Ok(Ok(empty))`, logged (the write was accepted;
    /// unverified, not failed).
    async fn write_and_read_back(
        &self,
        mem: &mut DeviceMemory,
        before: &[Group],
        list: &[Group],
        write: bool,
        memo: Option<&str>,
        log: &mut Vec<String>,
    ) -> Result<Result<GroupsRead, GroupsRead>, DriverError> {
        if write {
            // The write may land even if its answer is lost (a transport
            // failure, a timeout, a 5xx): then the error says what to undo.
            // A refusal in the cloud's own words wrote nothing.
            let wrote = self.write_groups(mem, list).await.map_err(|e| {
                if e.kind == ErrorKind::Unavailable {
                    e.with_memo(memo.map(str::to_owned))
                } else {
                    e
                }
            })?;
            log.push(wrote);
        }
        let back = match self.get_groups().await {
            Ok((back, raw)) => {
                log.push(format!("read back: {raw}"));
                back
            }
            Err(e) => {
                log.push(format!(
                    "read back failed: {}: {}",
                    e.message,
                    e.raw.unwrap_or_default()
                ));
                return Ok(Ok(GroupsRead::default()));
            }
        };
        let changed_by_another =
            !same_groups(&back.groups, list) && !same_groups(&back.groups, before);
        Ok(if changed_by_another {
            Err(back)
        } else {
            Ok(back)
        })
    }

    /// One read-modify-write of the group list for `ours`: plans against
    /// `current`, writes, and reads back (see
    /// [`Foxess::write_and_read_back`]).
    #[allow(clippy::too_many_arguments)]
    async fn merge_and_write(
        &self,
        mem: &mut DeviceMemory,
        current: &GroupsRead,
        ours: &[Group],
        switchyards: &[Group],
        clear: bool,
        memo: &str,
        log: &mut Vec<String>,
    ) -> Result<(ApplyPlan, Result<GroupsRead, GroupsRead>), DriverError> {
        let (max_slots, _) = self.limits(current);
        let plan = plan_apply(
            &current.groups,
            &Context {
                ours,
                switchyards,
                clear,
                max_slots,
                // Foreign groups are judged by the device's own limit (the
                // settings bound only what switchyard writes).
                max_power_w: current.max_power_w.unwrap_or(i64::MAX),
            },
        )?;
        let back = self
            .write_and_read_back(
                mem,
                &current.groups,
                &plan.list,
                plan.write,
                Some(memo),
                log,
            )
            .await?;
        Ok((plan, back))
    }

    /// The list a revert writes: `current` without `mine` (except what
    /// `keep` holds), switchyard's other groups enabled, foreign groups as
    /// read — unless the cloud would refuse one: then ForeignUnwritable, or
    /// cleared when `clear`. `None` when there is nothing to remove.
    fn revert_list(
        &self,
        current: &GroupsRead,
        mine: &[Group],
        keep: &[Group],
        clear: bool,
        log: &mut Vec<String>,
    ) -> Result<Option<Vec<Group>>, DriverError> {
        let Some(list) = plan_revert(&current.groups, mine, keep) else {
            return Ok(None);
        };
        let rest: Vec<&Group> = list.iter().collect();
        let bad = plan::unwritable(&rest, keep, current.max_power_w.unwrap_or(i64::MAX));
        let cleared: Vec<Group> = plan::clear_or_refuse(&bad, clear, keep)?
            .into_iter()
            .cloned()
            .collect();
        if !cleared.is_empty() {
            log.push(format!(
                "cleared {} foreign group(s) the cloud would refuse, as CANCEL_AND_REPLACE \
                 authorised ({})",
                cleared.len(),
                describe(&cleared)
            ));
        }
        // switchyard's own groups of other actions go back enabled (one
        // whose time has passed today may read disabled).
        Ok(Some(
            list.into_iter()
                .filter(|g| !cleared.contains(g))
                .map(|mut g| {
                    if keep.iter().any(|k| same_content(k, &g)) {
                        g.enable = 1;
                    }
                    g
                })
                .collect(),
        ))
    }

    /// AUTO_BALANCED without an end: switchyard hands the inverter back to
    /// the homeowner's own schedule. Nothing is written: the live actions'
    /// groups stay until their reverts remove them (the service cancels
    /// what collides with this action first). The groups are read to
    /// report what is on the inverter.
    async fn release(&self, req: &ApplyRequest) -> Result<Outcome, DriverError> {
        let memos = self.memos(&req.live);
        let (read, raw) = self.get_groups().await?;
        let (flag, _, _) = self.get_flag().await?;
        let switchyards = {
            let mem = self.memory.lock().await;
            Self::switchyards(&mem, &memos, Some(&req.action_id))
        };
        let ours_left = read
            .groups
            .iter()
            .filter(|g| !g.is_placeholder() && switchyards.iter().any(|o| same_content(o, g)))
            .count();
        Ok(Outcome {
            // Verified when nothing of switchyard's is left in force.
            verified: ours_left == 0,
            raw: format!(
                "AUTO_BALANCED without an end: the inverter follows its own schedule; nothing \
                 written; {ours_left} group(s) of {} live action(s) stay until their end; {raw}",
                memos.len()
            ),
            state: Some(Self::state(flag, &read.groups, &switchyards)),
            memo: None,
        })
    }
}

/// The fencing token a request's writes carry, if it has one.
fn fence_of(req: &ApplyRequest) -> Option<String> {
    (req.fence > 0).then(|| format!("{}:{}", req.action_id, req.fence))
}

fn malformed(raw: &str, why: &str) -> DriverError {
    // `why` may quote the answer (a parse error names what it found).
    let why: String = why.chars().take(200).collect();
    DriverError::new(
        ErrorKind::Rejected,
        format!("unexpected FoxESS answer: {why}"),
    )
    .with_raw(raw.to_owned())
}

fn describe(groups: &[Group]) -> String {
    let parts: Vec<String> = groups
        .iter()
        .map(|g| format!("{} {}-{}", g.work_mode, g.start_hhmm(), g.end_excl_hhmm()))
        .collect();
    parts.join(", ")
}

/// Whether two zones keep the same offsets from `from` for two years (so
/// `Asia/Calcutta` and `Asia/Kolkata`, `Etc/UTC` and `UTC` agree). Offsets
/// only change at a zone's transitions: comparing them at `from` and at
/// every transition of either zone in the span is exact.
fn same_rules(a: &TimeZone, b: &TimeZone, from: jiff::Timestamp) -> bool {
    let until = from
        .checked_add(jiff::SignedDuration::from_hours(24 * 731))
        .unwrap_or(jiff::Timestamp::MAX);
    let at = |t: jiff::Timestamp| a.to_offset(t) == b.to_offset(t);
    at(from)
        && [a, b].iter().all(|z| {
            z.following(from)
                .map(|tr| tr.timestamp())
                .take_while(|t| *t <= until)
                .take(1000)
                .all(at)
        })
}

#[async_trait]
impl Driver for Foxess {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn account(&self) -> String {
        self.account.clone()
    }

    async fn read_state(&self, live: &[Applied]) -> Result<DeviceState, DriverError> {
        let (flag, _, _) = self.get_flag().await?;
        let (mut read, _) = self.get_groups().await?;
        let mut mem = self.memory.lock().await;
        let switchyards = Self::switchyards(&mem, &self.memos(live), None);
        self.note_seen(&mut mem, &mut read, &switchyards, false);
        Ok(Self::state(flag, &read.groups, &switchyards))
    }

    async fn apply(&self, req: &ApplyRequest) -> Result<Outcome, DriverError> {
        if req.end.is_none() {
            if req.command != Command::AutoBalanced {
                return Err(DriverError::new(
                    ErrorKind::Rejected,
                    "FoxESS groups recur daily: this command needs a window with an end",
                ));
            }
            return self.release(req).await;
        }
        // The times do not depend on the device's power limit: refuse an
        // early or late apply before any call.
        check_timing(
            &self.compile(req, None)?,
            req.start,
            req.end,
            self.now(),
            &self.tz,
        )?;
        // One read-modify-write at a time per inverter in this process: two
        // writers of the whole list wipe each other's groups.
        let mut mem = self.memory.lock().await;
        mem.fence = fence_of(req);
        self.check_plant_timezone(&mut mem).await?;
        let (flag_on, support, _) = self.get_flag().await?;
        if !support {
            return Err(DriverError::new(
                ErrorKind::Rejected,
                "this inverter does not support the FoxESS scheduler",
            )
            .with_raw("scheduler/get/flag: support=false"));
        }
        // Re-read just before the write.
        let (mut current, _) = self.get_groups().await?;
        let ours = self.compile(req, self.limits(&current).1.into())?;
        let memos = self.memos(&req.live);
        // An earlier try of this action may have written already (its memo
        // came back): those groups are switchyard's, and this memo takes
        // them over so that the revert removes them too.
        let earlier = req.memo.as_deref().and_then(|m| Memo::parse(m, &self.sn));
        let mut switchyards = Self::switchyards(&mem, &memos, Some(&req.action_id));
        let mut memo_groups = ours.clone();
        // (So are the groups this process wrote for an earlier try.)
        let earlier_groups: Vec<Group> = earlier
            .iter()
            .flat_map(|e| e.groups.iter().cloned())
            .chain(mem.ours.get(&req.action_id).into_iter().flatten().cloned())
            .collect();
        for g in &earlier_groups {
            switchyards.push(g.clone());
            if !memo_groups.iter().any(|m| same_content(m, g)) {
                memo_groups.push(g.clone());
            }
        }
        let mut not_foreign = switchyards.clone();
        not_foreign.extend(ours.iter().cloned());
        let mut revived = self.note_seen(&mut mem, &mut current, &not_foreign, true);
        // The homeowner's flag: as the oldest live action recorded it, or
        // as this process found it for an action of the same round, or as
        // it is now.
        let others_here = mem.ours.keys().any(|k| *k != req.action_id);
        let flag_before = earlier
            .as_ref()
            .or(memos.first())
            .map(|m| m.flag_before)
            .or(if others_here { mem.flag_found } else { None })
            .unwrap_or(flag_on);
        mem.flag_found = Some(flag_before);
        let memo = Memo {
            v: 1,
            sn: self.sn.clone(),
            groups: memo_groups,
            flag_before,
        };
        let memo_json = serde_json::to_string(&memo).unwrap_or_default();
        // Recorded before writing: a write that times out may still land.
        mem.ours.insert(req.action_id.clone(), ours.clone());
        let mut log = Vec::new();
        let first = self
            .merge_and_write(
                &mut mem,
                &current,
                &ours,
                &switchyards,
                req.clear_native_scheduler,
                &memo_json,
                &mut log,
            )
            .await;
        let (mut plan, mut back) = match first {
            Ok(done) => done,
            Err(e) => {
                // Refused before writing: nothing of this action is there.
                if e.memo.is_none() && !e.retryable() {
                    mem.ours.remove(&req.action_id);
                }
                return Err(e);
            }
        };
        // From here a write has landed (or may have): a failure carries
        // the memo, so that the service owes a revert.
        let with_memo = |e: DriverError| e.with_memo(Some(memo_json.clone()));
        if let Err(mut changed) = back {
            // Another writer changed the list between our read and our
            // write (or right after): merge once more with what it wrote.
            log.push("another writer changed the groups meanwhile; merged again".to_owned());
            for g in self.note_seen(&mut mem, &mut changed, &not_foreign, true) {
                if !revived.iter().any(|r| same_content(r, &g)) {
                    revived.push(g);
                }
            }
            let again = self
                .merge_and_write(
                    &mut mem,
                    &changed,
                    &ours,
                    &switchyards,
                    req.clear_native_scheduler,
                    &memo_json,
                    &mut log,
                )
                .await
                .map_err(with_memo)?;
            (plan, back) = again;
            if back.is_err() {
                return Err(with_memo(
                    DriverError::new(
                        ErrorKind::Contended,
                        "another writer keeps changing this inverter's FoxESS schedule between \
                         switchyard's read and write; retrying later",
                    )
                    .with_raw(log.join("; ")),
                ));
            }
        }
        let back = back.unwrap_or_default();
        let mut notes = Vec::new();
        if !flag_on {
            log.push(self.set_flag(&mut mem, true).await.map_err(with_memo)?);
            let dormant: Vec<Group> = plan
                .kept
                .iter()
                .filter(|g| g.is_active() && !switchyards.iter().any(|o| same_content(o, g)))
                .cloned()
                .collect();
            if !dormant.is_empty() {
                notes.push(format!(
                    "the scheduler was off: turning it on also put {} dormant foreign group(s) in \
                     force ({}); the revert turns it off again",
                    dormant.len(),
                    describe(&dormant)
                ));
            }
        }
        drop(mem);
        if !revived.is_empty() && plan.write {
            notes.push(format!(
                "kept {} foreign group(s) enabled that read disabled only because their time has \
                 passed today ({})",
                revived.len(),
                describe(&revived)
            ));
        }
        if !plan.removed.is_empty() {
            notes.push(format!(
                "cleared {} foreign group(s) as CANCEL_AND_REPLACE authorised ({})",
                plan.removed.len(),
                describe(&plan.removed)
            ));
        }
        if !plan.superseded.is_empty() {
            notes.push(format!(
                "superseded {} group(s) switchyard wrote for another action ({})",
                plan.superseded.len(),
                describe(&plan.superseded)
            ));
        }
        let flag = match self.get_flag().await {
            Ok((f, _, _)) => Some(f),
            Err(_) => None,
        };
        // By content: a group whose time has passed today may read back
        // disabled, and the cloud may reorder. (That the rest of the list
        // survived was checked against the write: `back` is the list
        // written or, if the write did not take, the one before.)
        let seen = !back.groups.is_empty()
            && ours
                .iter()
                .all(|o| back.groups.iter().any(|b| same_content(b, o)));
        let verified = seen && flag == Some(true);
        let mut switchyards_now = switchyards;
        switchyards_now.extend(ours.iter().cloned());
        // Only a complete reading is returned: a failed read-back leaves
        // the service to read the device again.
        let state = flag
            .filter(|_| back.answered)
            .map(|f| Self::state(f, &back.groups, &switchyards_now));
        let summary = format!(
            "{} group(s) for {} ({} other kept){}; read back: {}; scheduler flag {}",
            ours.len(),
            req.command,
            plan.kept.len(),
            if plan.write { "" } else { "; already in place" },
            if seen {
                "all groups present"
            } else {
                "groups MISSING"
            },
            match flag {
                Some(true) => "on",
                Some(false) => "OFF",
                None => "unread",
            }
        );
        notes.insert(0, summary);
        notes.extend(log);
        Ok(Outcome {
            verified,
            raw: notes.join("; "),
            state,
            memo: Some(memo_json),
        })
    }

    async fn revert(&self, req: &RevertRequest) -> Result<Outcome, DriverError> {
        let applied = &req.applied;
        let memo = req.memo.as_deref().and_then(|m| Memo::parse(m, &self.sn));
        let mut mem = self.memory.lock().await;
        mem.fence = fence_of(applied);
        // What the apply wrote, as it recorded it; else as this process
        // remembers writing it (an apply cut short before its memo was
        // recorded); else, for an action applied before memos existed,
        // recomputed from the request.
        let mine = match (&memo, mem.ours.get(&applied.action_id)) {
            (Some(m), _) => m.groups.clone(),
            (None, Some(written)) => written.clone(),
            (None, None) if applied.end.is_none() => Vec::new(),
            (None, None) => self.compile(applied, None)?,
        };
        // Groups another action may still need: the live actions' memos,
        // and what this process applied for actions not yet reverted (an
        // apply in the same dispatch round is not recorded yet).
        let keep = Self::switchyards(&mem, &self.memos(&applied.live), Some(&applied.action_id));
        let (mut current, raw) = self.get_groups().await?;
        self.note_seen(&mut mem, &mut current, &keep, true);
        let mut log = Vec::new();
        let clear = applied.clear_native_scheduler;
        let removed = match self.revert_list(&current, &mine, &keep, clear, &mut log)? {
            Some(list) => {
                let back = self
                    .write_and_read_back(&mut mem, &current.groups, &list, true, None, &mut log)
                    .await?;
                if let Err(mut changed) = back {
                    // Another writer changed the list meanwhile: remove ours
                    // from what it wrote, once.
                    log.push(
                        "another writer changed the groups meanwhile; merged again".to_owned(),
                    );
                    self.note_seen(&mut mem, &mut changed, &keep, true);
                    if let Some(list) = self.revert_list(&changed, &mine, &keep, clear, &mut log)? {
                        let again = self
                            .write_and_read_back(
                                &mut mem,
                                &changed.groups,
                                &list,
                                true,
                                None,
                                &mut log,
                            )
                            .await?;
                        if again.is_err() {
                            return Err(DriverError::new(
                                ErrorKind::Contended,
                                "another writer keeps changing this inverter's FoxESS schedule \
                                 between switchyard's read and write; retrying later",
                            )
                            .with_raw(log.join("; ")));
                        }
                    }
                }
                true
            }
            None => {
                log.push(format!(
                    "none of the action's groups to remove is on the device; {raw}"
                ));
                false
            }
        };
        // The last of switchyard's actions on the device gives the
        // scheduler flag back as the homeowner left it.
        let mut flag_note = String::new();
        if let Some(m) = &memo
            && keep.is_empty()
            && !m.flag_before
        {
            let (flag, _, _) = self.get_flag().await?;
            if flag {
                log.push(self.set_flag(&mut mem, false).await?);
                flag_note = "; scheduler flag turned off again, as it was found".to_owned();
            }
        }
        mem.ours.remove(&applied.action_id);
        if mem.ours.is_empty() {
            mem.flag_found = None;
        }
        drop(mem);
        let gone: Vec<&Group> = mine
            .iter()
            .filter(|g| !keep.iter().any(|k| same_content(k, g)))
            .collect();
        let (verified, back) = match self.get_groups().await {
            Ok((back, raw)) => {
                let clean = !back
                    .groups
                    .iter()
                    .any(|b| gone.iter().any(|o| same_content(o, b)));
                if !clean && removed {
                    // Accepted but not kept: the groups would recur every
                    // day. A failed try: the memo stays, the revert is
                    // tried again.
                    return Err(DriverError::new(
                        ErrorKind::Unavailable,
                        "FoxESS accepted the revert's write but the action's groups are still \
                         there; retrying",
                    )
                    .with_raw(format!("{}; read back: {raw}", log.join("; "))));
                }
                let what = if clean {
                    "groups gone"
                } else {
                    "groups STILL THERE"
                };
                (clean, format!("read back: {what}; {raw}"))
            }
            Err(e) => (
                false,
                format!(
                    "read back failed: {}: {}",
                    e.message,
                    e.raw.unwrap_or_default()
                ),
            ),
        };
        Ok(Outcome {
            verified,
            raw: format!(
                "{} {} group(s){}{}{flag_note}; {}; {back}",
                if removed {
                    "removed"
                } else {
                    "nothing to remove of"
                },
                gone.len(),
                if mine.len() > gone.len() {
                    format!(
                        ", {} left in place for another live action",
                        mine.len() - gone.len()
                    )
                } else {
                    String::new()
                },
                if memo.is_none() && applied.end.is_some() {
                    " (recomputed: no memo)"
                } else {
                    ""
                },
                log.join("; ")
            ),
            ..Default::default()
        })
    }
}
