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
use serde_json::{Value, json};

use self::{
    client::{Api, HttpsClient, new_client},
    plan::{ApplyPlan, check_timing, coverage, groups_for, owner, plan_apply, plan_revert, row},
    settings::FoxessSettings,
    wire::{Group, PATH_GET, PATH_GET_FLAG, PATH_SET, PATH_SET_FLAG, as_flag, parse_groups},
};
use crate::{
    driver::{ApplyRequest, DeviceState, Driver, DriverError, ErrorKind, Outcome, RevertRequest},
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

/// What this process remembers about one inverter. Drivers are built per
/// dispatch, so this lives in the factory.
#[derive(Debug, Default)]
struct DeviceMemory {
    /// When this process last wrote to the device (write spacing).
    last_write: Option<Instant>,
    /// The groups written per action id, to label rows `Ours` in
    /// `read_state` (apply and revert recompute them from the request, so
    /// they do not need this after a restart).
    ours: BTreeMap<String, Vec<Group>>,
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
        let timing = vec![
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
            timing: timing.clone(),
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

    fn build(&self, device: &DeviceSpec<'_>) -> Result<Arc<dyn Driver>, ConfigError> {
        let capabilities = self.capabilities(device)?;
        let settings = self.settings(device).map_err(ConfigError::first)?;
        let key = self.policy.resolve("api_key_ref", &settings.api_key_ref)?;
        let account = format!("foxess:{}#{}", settings.base_url, settings.api_key_ref);
        let sn = device.oem_device_id.trim().to_owned();
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
            memory: self.memory(&format!("{account}/{sn}")),
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

    /// This action's groups, recomputed from the request alone (so a
    /// revert after a restart finds exactly what the apply wrote).
    fn compile(&self, req: &ApplyRequest) -> Result<Vec<Group>, DriverError> {
        let t = plan::template(req.command, &req.params, &self.settings)?;
        let bits = coverage(req.start, req.end, &self.tz)?;
        let groups = groups_for(&bits, &t);
        if groups.is_empty() {
            return Err(DriverError::new(
                ErrorKind::Rejected,
                "the window cannot be expressed as FoxESS groups (only 23:59-24:00)",
            ));
        }
        Ok(groups)
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

    async fn get_groups(&self) -> Result<(Vec<Group>, String), DriverError> {
        let (result, raw) = self
            .api
            .call(PATH_GET, &json!({ "deviceSN": self.sn }))
            .await?;
        parse_groups(&result)
            .map(|g| (g, raw.clone()))
            .map_err(|why| malformed(&raw, &why))
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
        let res = self.api.call(path, &body).await;
        // Any attempt counts against the OEM's spacing, failed or not.
        mem.last_write = Some(Instant::now());
        res.map(|(_, raw)| raw)
    }

    async fn write_groups(
        &self,
        mem: &mut DeviceMemory,
        groups: &[Group],
    ) -> Result<String, DriverError> {
        self.write(
            mem,
            PATH_SET,
            json!({ "deviceSN": self.sn, "groups": groups }),
        )
        .await
    }

    /// The device's state from its flag and groups, each row labelled
    /// with who wrote it.
    async fn state(&self, flag: bool, groups: &[Group]) -> DeviceState {
        let ours = Self::recorded_ours(&*self.memory.lock().await, None);
        let rows = groups
            .iter()
            .filter(|g| !g.is_placeholder())
            .map(|g| row(g, owner(g, &ours)))
            .collect();
        DeviceState {
            native_scheduler: Some((flag, rows)),
            soc_percent: None,
            mode: None,
        }
    }

    fn recorded_ours(mem: &DeviceMemory, except: Option<&str>) -> Vec<Group> {
        mem.ours
            .iter()
            .filter(|(id, _)| Some(id.as_str()) != except)
            .flat_map(|(_, g)| g.iter().cloned())
            .collect()
    }
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

#[async_trait]
impl Driver for Foxess {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn account(&self) -> String {
        self.account.clone()
    }

    async fn read_state(&self) -> Result<DeviceState, DriverError> {
        let (flag, _, _) = self.get_flag().await?;
        let (groups, _) = self.get_groups().await?;
        Ok(self.state(flag, &groups).await)
    }

    async fn apply(&self, req: &ApplyRequest) -> Result<Outcome, DriverError> {
        let ours = self.compile(req)?;
        check_timing(&ours, req.start, req.end, self.now(), &self.tz)?;
        // One read-modify-write at a time per inverter in this process: two
        // writers of the whole list wipe each other's groups.
        let mut mem = self.memory.lock().await;
        let (flag_on, support, _) = self.get_flag().await?;
        if !support {
            return Err(DriverError::new(
                ErrorKind::Rejected,
                "this inverter does not support the FoxESS scheduler",
            )
            .with_raw("scheduler/get/flag: support=false"));
        }
        let (current, _) = self.get_groups().await?;
        let other_ours = Self::recorded_ours(&mem, Some(&req.action_id));
        let ApplyPlan {
            list,
            write,
            kept,
            removed,
        } = plan_apply(
            &current,
            &ours,
            &other_ours,
            flag_on,
            req.clear_native_scheduler,
            self.settings.max_slots,
        )?;
        // Recorded before writing: a write that times out may still land.
        mem.ours.insert(req.action_id.clone(), ours.clone());
        let mut log = Vec::new();
        if write {
            log.push(self.write_groups(&mut mem, &list).await?);
        }
        if !flag_on {
            log.push(
                self.write(
                    &mut mem,
                    PATH_SET_FLAG,
                    json!({ "deviceSN": self.sn, "enable": 1 }),
                )
                .await?,
            );
        }
        drop(mem);
        let summary = format!(
            "{} group(s) for {} ({} foreign kept, {} removed){}",
            ours.len(),
            req.command,
            kept,
            removed.len(),
            if write { "" } else { "; already in place" }
        );
        // The write was accepted; a failed read-back makes it unverified,
        // not failed.
        let mut state = None;
        let verified = match (self.get_groups().await, self.get_flag().await) {
            (Ok((back, raw)), Ok((flag, _, _))) => {
                state = Some(self.state(flag, &back).await);
                let seen = ours.iter().all(|o| back.iter().any(|b| b == o));
                log.push(format!(
                    "read back: {}; scheduler flag {}; {raw}",
                    if seen {
                        "all groups present"
                    } else {
                        "groups MISSING"
                    },
                    if flag { "on" } else { "off" }
                ));
                seen && flag
            }
            (Err(e), _) | (_, Err(e)) => {
                log.push(format!(
                    "read back failed: {}: {}",
                    e.message,
                    e.raw.unwrap_or_default()
                ));
                false
            }
        };
        Ok(Outcome {
            verified,
            raw: format!("{summary}; {}", log.join("; ")),
            state,
        })
    }

    async fn revert(&self, req: &RevertRequest) -> Result<Outcome, DriverError> {
        let applied = &req.applied;
        let ours = self.compile(applied)?;
        let mut mem = self.memory.lock().await;
        let (current, raw) = self.get_groups().await?;
        let Some(list) = plan_revert(&current, &ours) else {
            mem.ours.remove(&applied.action_id);
            return Ok(Outcome {
                verified: true,
                raw: format!("none of the action's groups is on the device; {raw}"),
                ..Default::default()
            });
        };
        // The scheduler flag is left as it is, even with no group left: it
        // may be the homeowner's, and an enabled empty scheduler runs the
        // inverter's base work mode.
        let wrote = self.write_groups(&mut mem, &list).await?;
        mem.ours.remove(&applied.action_id);
        drop(mem);
        let (verified, back) = match self.get_groups().await {
            Ok((back, raw)) => {
                let gone = !back
                    .iter()
                    .any(|b| ours.iter().any(|o| plan::same_content(o, b)));
                let what = if gone {
                    "groups gone"
                } else {
                    "groups STILL THERE"
                };
                (gone, format!("read back: {what}; {raw}"))
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
                "removed {} group(s), {} kept; {wrote}; {back}",
                ours.len(),
                list.len()
            ),
            ..Default::default()
        })
    }
}
