//! A FoxESS Open API emulator: the scheduler endpoints and the device and
//! plant detail with the cloud's rules and quirks, for tests, the
//! conformance suite and demos. It is meant to be at least as strict as
//! the real cloud.
//!
//! Endpoints: signed POSTs with a JSON body to `scheduler/get/flag`,
//! `scheduler/set/flag`, `scheduler/get` and `scheduler/enable`; signed
//! GETs to `/op/v0/device/detail?sn=SN` (`{deviceSN, stationID:
//! "plant-SN", …}`, errno 41930 for an unknown device) and
//! `/op/v0/plant/detail?id=plant-SN` (`{stationID, name}` plus
//! `ianaTimezone` when [`EmulatorConfig::plant_timezone`] is set). The
//! other method on any of these paths is HTTP 405, an unknown path 404.
//!
//! Enforced on every call, in this order:
//! - the `token`, `timestamp`, `signature`, `lang` headers and (unless
//!   [`EmulatorConfig::require_user_agent`] is off) a `User-Agent`, and
//!   the signature over the path alone, never the query (errno 40256);
//! - the timestamp within [`EmulatorConfig::max_clock_skew`] of the real
//!   clock, either way (errno 41809);
//! - a daily call budget per API key (errno 40402);
//! - one call per [`EmulatorConfig::query_interval`] to each query path
//!   (GETs included) and per [`EmulatorConfig::write_interval`] to each
//!   update path, whatever the device (errno 40400), and
//!   [`EmulatorConfig::min_write_interval`] between writes to one device
//!   (errno 40400).
//!
//! Writes (`scheduler/enable`, errno 40257 unless said otherwise): body
//! keys only `deviceSN` and `groups`; at most `max_slots` groups; each
//! with all nine fields of a group and `enable` 0 or 1; `id` or
//! `properties` refused, any other field (`maxSoc`, `extraParam`, …)
//! accepted and stored verbatim; modes `Invalid`, `""` and unknown ones
//! refused; what [`Group::write_problem`] refuses (minute times with an
//! **inclusive** end not before the start, so no midnight crossing and
//! 10:00–10:00 is one valid minute; `fdSoc` 11..=100; `minSocOnGrid`
//! 10..=`fdSoc`, not `null`; `fdPwr` 1..=`max_power_w`); and any two
//! groups sharing a minute, disabled ones too, give errno 42023 ("time
//! overlap": 10:00–11:00 and 11:00–12:00 overlap). A write replaces the
//! whole list.
//!
//! Reads (`scheduler/get`): `{enable, maxGroupCount, groups}`, each stored
//! group verbatim plus `id` and `properties` (`{"fdpwr": {"unit": "W",
//! "range": {"min": 0, "max": max_power_w}}}`), in
//! [`EmulatorConfig::read_order`], padded up to the slot count as
//! [`EmulatorConfig::placeholders`] says (`Invalid` slots by default).
//! With [`EmulatorConfig::disable_passed`] (on by default) an enabled group
//! whose last minute is before the current minute of the day in the plant
//! time zone (UTC without one) reads `enable: 0`, the stored group
//! unchanged; [`EmulatorHandle::set_now`] pins that "now".
//!
//! Test switches on [`EmulatorConfig`], off by default, most with a
//! setter on [`EmulatorHandle`]: `null_min_soc_on_grid` (padding reads
//! `minSocOnGrid: null`), `max_soc` (every group read carries a `maxSoc`),
//! `result_null` (`result: null` for a device without groups),
//! `app_only_group` (devices start with a group the write refuses,
//! [`app_only_group`]), `concurrent_writer` (another client puts back the
//! list as it was before each of our next N writes, plus its group),
//! `echo_token` (every answer echoes the API key) and `redirect_to`
//! (every request is redirected). Knobs on [`EmulatorHandle`] also seed
//! groups (typed or raw JSON) and the flag, inject HTTP failures, errnos
//! and latency, ignore writes, and change the limits at run time.
//!
//! Behind the crate's `emulator` feature: tests and demos enable it, the
//! server does not contain it.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

use super::client::FENCE_HEADER;
use super::wire::{
    ERRNO_AUTH, ERRNO_BAD_PARAMS, ERRNO_DAILY_LIMIT, ERRNO_OK, ERRNO_OVERLAP, ERRNO_RATE_LIMITED,
    ERRNO_SIGNATURE_EXPIRED, ERRNO_STALE_FENCE, ERRNO_UNKNOWN_DEVICE, GROUP_FIELDS, Group,
    PATH_DEVICE_DETAIL, PATH_GET, PATH_GET_FLAG, PATH_PLANT_DETAIL, PATH_SET, PATH_SET_FLAG,
    READ_ONLY_FIELDS, WorkMode, as_int, signature,
};

/// The paths answered to a signed POST with a JSON body.
const POST_PATHS: [&str; 4] = [PATH_GET_FLAG, PATH_SET_FLAG, PATH_GET, PATH_SET];
/// The paths answered to a signed GET with a query string.
const GET_PATHS: [&str; 2] = [PATH_DEVICE_DETAIL, PATH_PLANT_DETAIL];

/// How reads order the groups (the real cloud may reorder after a write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOrder {
    /// As last written.
    AsWritten,
    /// The last written first (the default).
    Reversed,
    /// Sorted by work mode name, then start time.
    ByMode,
}

/// What a read pads the group list with, up to the slot count: the
/// cloud has been seen answering each of these for unused slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placeholders {
    /// Disabled 00:00–00:00 slots in mode `Invalid` (`minSocOnGrid` 10,
    /// `fdSoc` 10, `fdPwr` 0), which the write endpoint refuses.
    Invalid,
    /// The same with mode `""`.
    EmptyMode,
    /// Disabled zero-length 00:00–00:00 `SelfUse` slots (`minSocOnGrid`
    /// 10, `fdSoc` 10, `fdPwr` 0): a real mode, values the write refuses.
    DisabledSelfUse,
    /// No padding: reads return the stored groups only.
    None,
}

impl Placeholders {
    /// The placeholder group, without `id` and `properties`; `None` for
    /// [`Placeholders::None`].
    fn group(self, null_min_soc_on_grid: bool) -> Option<Value> {
        let mode = match self {
            Placeholders::Invalid => WorkMode::Invalid.as_str(),
            Placeholders::EmptyMode => "",
            Placeholders::DisabledSelfUse => WorkMode::SelfUse.as_str(),
            Placeholders::None => return None,
        };
        let min_soc = if null_min_soc_on_grid {
            Value::Null
        } else {
            json!(10)
        };
        Some(json!({
            "enable": 0, "startHour": 0, "startMinute": 0, "endHour": 0, "endMinute": 0,
            "workMode": mode, "minSocOnGrid": min_soc, "fdSoc": 10, "fdPwr": 0
        }))
    }
}

/// The group [`EmulatorConfig::app_only_group`] and
/// [`EmulatorHandle::seed_app_only_group`] give a device, as set in the
/// app: `SelfUse` 06:00–06:59, enabled, `minSocOnGrid` 10, `fdSoc` 10,
/// `fdPwr` 0. The write endpoint refuses it (`fdSoc` below 11, `fdPwr`
/// 0), so writing it back unchanged fails with errno 40257.
pub fn app_only_group() -> Value {
    json!({
        "enable": 1, "startHour": 6, "startMinute": 0, "endHour": 6, "endMinute": 59,
        "workMode": "SelfUse", "minSocOnGrid": 10, "fdSoc": 10, "fdPwr": 0
    })
}

/// The group the concurrent writer of [`EmulatorConfig::concurrent_writer`]
/// adds: `Feedin` 05:00–05:29, enabled, `minSocOnGrid` 10, `fdSoc` 20,
/// `fdPwr` 1000.
pub fn concurrent_writer_group() -> Value {
    json!({
        "enable": 1, "startHour": 5, "startMinute": 0, "endHour": 5, "endMinute": 29,
        "workMode": "Feedin", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 1000
    })
}

/// The emulator's start-up configuration.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The one API key accepted.
    pub api_key: String,
    /// Known inverter serials (deviceSN).
    pub devices: Vec<String>,
    /// Slots per device.
    pub max_slots: usize,
    /// Largest `fdPwr`, W.
    pub max_power_w: i64,
    /// Calls accepted per API key in any 24 h.
    pub calls_per_day: usize,
    /// Minimum time between two writes to one device.
    pub min_write_interval: Duration,
    /// Minimum time between two calls to one query path (a read), per API
    /// key; the cloud allows one a second per query interface.
    pub query_interval: Duration,
    /// Minimum time between two calls to one update path (a write), per
    /// API key, whatever the device; the cloud allows one per 2 s per
    /// update interface.
    pub write_interval: Duration,
    /// Largest difference, either way, between a request's `timestamp`
    /// header and the emulator's clock; beyond it errno 41809.
    pub max_clock_skew: Duration,
    /// Whether a request without a `User-Agent` header is refused (errno
    /// 40256); FoxESS asks script callers to set their own.
    pub require_user_agent: bool,
    /// Order of groups on read.
    pub read_order: ReadOrder,
    /// What reads pad the list with, up to `max_slots`; `Invalid` slots by
    /// default.
    pub placeholders: Placeholders,
    /// Test switch, off by default: padding slots read with
    /// `minSocOnGrid: null` (stored groups read as stored).
    pub null_min_soc_on_grid: bool,
    /// Test switch, `None` by default: reads carry `maxSoc` on every group,
    /// padding included, as v1 answers do: the stored value where the
    /// group was written (or seeded) with one, else this one. The stored
    /// groups are not changed.
    pub max_soc: Option<i64>,
    /// Test switch, off by default: `scheduler/get` answers `result: null`
    /// while the device stores no group, as the cloud does when the mode
    /// was set in the app.
    pub result_null: bool,
    /// Test switch, off by default: every device starts with the foreign
    /// [`app_only_group`], set in the app with values the write endpoint
    /// refuses.
    pub app_only_group: bool,
    /// Test switch, 0 by default: models another read-modify-write client
    /// that read before our write and writes after it. For the next this
    /// many accepted `scheduler/enable` writes (errno 0, whatever the
    /// device), right after the write the stored list is replaced by the
    /// list as it was before that write plus [`concurrent_writer_group`]
    /// (unchecked), its group of the previous time replaced and its
    /// `fdPwr` one watt higher each time (each of its writes changes the
    /// list); each such write uses one up. The write itself still
    /// answers errno 0. Under [`EmulatorHandle::set_ignore_writes`]
    /// neither write is applied, but the write still uses one up.
    /// [`EmulatorHandle::set_concurrent_writer`] sets the count again and
    /// the group.
    pub concurrent_writer: usize,
    /// Test switch, off by default: every JSON answer, errno 0 included,
    /// carries the `token` header it received in its `msg` (`"success
    /// (token …)"`), the way some OEM clouds echo the API key. Lets a test
    /// prove the key never travels from an answer to clients or logs.
    pub echo_token: bool,
    /// Test switch, off by default: every request is answered HTTP 307
    /// with `Location:` this URL, before any other check. Lets a test prove
    /// the driver never follows a redirect (which would carry the signed
    /// headers to another host).
    pub redirect_to: Option<String>,
    /// The IANA time zone of every device's plant (e.g.
    /// `Europe/London`), reported as `ianaTimezone` by the plant detail
    /// and the "local" time of the passed-group rule; `None` (the
    /// default): the plant detail has no `ianaTimezone` and local time is
    /// UTC. A name jiff does not know is reported as given and counts as
    /// UTC.
    pub plant_timezone: Option<String>,
    /// Whether a read reports an enabled group whose window has passed
    /// for today (its last, inclusive, minute is before the current
    /// minute of the day in the plant's time zone) with `enable: 0`, as
    /// the cloud does; the stored group keeps `enable: 1`. On by default.
    /// "Now" is the real clock unless [`EmulatorHandle::set_now`] says
    /// otherwise.
    pub disable_passed: bool,
}

impl EmulatorConfig {
    /// Defaults like the real cloud: 127.0.0.1 on a free port, 8 slots,
    /// 6000 W, 1,440 calls a day, 5 s between writes to a device, 1 s
    /// between calls to a query path and 2 s to an update path, timestamps
    /// within 10 minutes, a `User-Agent` required, reads reversed and
    /// padded, no plant time zone, passed groups read disabled; no test
    /// switch on.
    pub fn new(api_key: impl Into<String>, devices: &[&str]) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: api_key.into(),
            devices: devices.iter().map(|d| (*d).to_owned()).collect(),
            max_slots: 8,
            max_power_w: 6000,
            calls_per_day: 1440,
            min_write_interval: Duration::from_secs(5),
            query_interval: Duration::from_secs(1),
            write_interval: Duration::from_secs(2),
            max_clock_skew: Duration::from_secs(600),
            require_user_agent: true,
            read_order: ReadOrder::Reversed,
            placeholders: Placeholders::Invalid,
            null_min_soc_on_grid: false,
            max_soc: None,
            result_null: false,
            app_only_group: false,
            concurrent_writer: 0,
            echo_token: false,
            redirect_to: None,
            plant_timezone: None,
            disable_passed: true,
        }
    }
}

/// One call the emulator answered (for tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// Request path.
    pub path: String,
    /// HTTP status sent.
    pub status: u16,
    /// errno sent (None for a non-JSON failure).
    pub errno: Option<i64>,
    /// The `deviceSN` of the body, or the `sn` query parameter, if any.
    pub device: Option<String>,
    /// The `timestamp` header, if it was a number.
    pub timestamp: Option<i64>,
    /// The `User-Agent` header, if any.
    pub user_agent: Option<String>,
}

#[derive(Clone, Debug)]
enum Fault {
    Status(u16),
    Errno(i64, String),
    Body(String),
}

#[derive(Clone, Debug, Default)]
struct Inverter {
    flag: bool,
    support: bool,
    /// The groups as written: whole JSON objects, every field kept.
    groups: Vec<Value>,
    last_write: Option<Instant>,
    /// The largest fencing token seen per action (`x-switchyard-fence`).
    fences: HashMap<String, u64>,
    /// Accepted `scheduler/enable` writes per action (fenced writes only).
    writes: HashMap<String, u32>,
}

impl Inverter {
    /// A new device: flag off, scheduler supported, no groups but the
    /// app-only one when that switch is on.
    fn new(config: &EmulatorConfig) -> Self {
        Self {
            support: true,
            groups: if config.app_only_group {
                vec![app_only_group()]
            } else {
                Vec::new()
            },
            ..Self::default()
        }
    }
}

#[derive(Debug)]
struct State {
    config: EmulatorConfig,
    devices: HashMap<String, Inverter>,
    calls: VecDeque<Instant>,
    /// When each path last took a call (one API key, so per path).
    last_call: HashMap<String, Instant>,
    faults: VecDeque<Fault>,
    latency: Duration,
    ignore_writes: bool,
    /// Accepted writes the concurrent writer still follows.
    concurrent_left: usize,
    /// The group the concurrent writer adds.
    concurrent_group: Value,
    /// Accepted writes still to be answered HTTP 502 (applied, the answer
    /// lost on the way back).
    lose_write_answers: usize,
    /// How many times the concurrent writer has written, and its last
    /// group.
    concurrent_writes: usize,
    concurrent_last: Option<Value>,
    /// The "now" of the passed-group rule; `None`: the real clock.
    now: Option<jiff::Timestamp>,
    log: Vec<CallRecord>,
}

/// A running emulator. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts emulators: see [`Emulator::start`].
#[derive(Debug)]
pub struct Emulator;

impl Emulator {
    /// Binds and serves in the background on the current tokio runtime.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<EmulatorHandle> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let devices = config
            .devices
            .iter()
            .map(|sn| (sn.clone(), Inverter::new(&config)))
            .collect();
        let state = Arc::new(Mutex::new(State {
            concurrent_left: config.concurrent_writer,
            concurrent_group: concurrent_writer_group(),
            lose_write_answers: 0,
            concurrent_writes: 0,
            concurrent_last: None,
            config,
            devices,
            calls: VecDeque::new(),
            last_call: HashMap::new(),
            faults: VecDeque::new(),
            latency: Duration::ZERO,
            ignore_writes: false,
            now: None,
            log: Vec::new(),
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors and the like: back off, retry.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    // A client hanging up mid-request is not our problem.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(EmulatorHandle { addr, state, task })
    }
}

impl EmulatorHandle {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for a device's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds an inverter if it is not known yet: flag off, no groups (but
    /// the [`app_only_group`] when [`EmulatorConfig::app_only_group`] is
    /// on).
    pub fn add_device(&self, sn: &str) {
        let mut st = self.state();
        let dev = Inverter::new(&st.config);
        st.devices.entry(sn.to_owned()).or_insert(dev);
    }

    /// Adds the foreign [`app_only_group`] to a device's stored groups
    /// (adding the device if needed), unless it already holds it.
    pub fn seed_app_only_group(&self, sn: &str) {
        self.add_device(sn);
        let g = app_only_group();
        if let Some(d) = self.state().devices.get_mut(sn)
            && !d.groups.contains(&g)
        {
            d.groups.push(g);
        }
    }

    /// Replaces a device's groups without any validation (seed foreign,
    /// Backup, disabled or overlapping groups); each is stored as
    /// [`Group::to_wire`] gives it, its extra fields included.
    pub fn seed_groups(&self, sn: &str, groups: Vec<Group>) {
        self.seed_raw(sn, groups.iter().map(Group::to_wire).collect());
    }

    /// Replaces a device's groups with these JSON values verbatim, without
    /// any validation: values the write endpoint would refuse (`null`
    /// fields, unknown modes, `id`, even non-objects) are stored and read
    /// back as they are, plus the read's `id` and `properties`.
    pub fn seed_raw(&self, sn: &str, groups: Vec<Value>) {
        self.add_device(sn);
        if let Some(d) = self.state().devices.get_mut(sn) {
            d.groups = groups;
        }
    }

    /// A device's groups in stored (written) order, parsed with
    /// [`Group::from_wire`] (extra fields in [`Group::extra`]; stored
    /// values that are not objects are left out).
    pub fn groups(&self, sn: &str) -> Vec<Group> {
        self.raw_groups(sn)
            .iter()
            .filter_map(Group::from_wire)
            .collect()
    }

    /// A device's groups exactly as stored (written or seeded), in that
    /// order: without the `id` and `properties` reads add, and with the
    /// stored `enable` even where a read reports a passed group disabled.
    pub fn raw_groups(&self, sn: &str) -> Vec<Value> {
        self.state()
            .devices
            .get(sn)
            .map(|d| d.groups.clone())
            .unwrap_or_default()
    }

    /// Sets a device's scheduler flag.
    pub fn set_flag(&self, sn: &str, on: bool) {
        self.add_device(sn);
        if let Some(d) = self.state().devices.get_mut(sn) {
            d.flag = on;
        }
    }

    /// A device's scheduler flag.
    pub fn flag(&self, sn: &str) -> bool {
        self.state().devices.get(sn).is_some_and(|d| d.flag)
    }

    /// Whether `get/flag` reports scheduler support.
    pub fn set_support(&self, sn: &str, support: bool) {
        self.add_device(sn);
        if let Some(d) = self.state().devices.get_mut(sn) {
            d.support = support;
        }
    }

    /// The next `n` calls fail with HTTP `status` (e.g. 502, 503) and an
    /// HTML body, before any other check.
    pub fn fail_next_status(&self, n: usize, status: u16) {
        let mut s = self.state();
        s.faults
            .extend(std::iter::repeat_n(Fault::Status(status), n));
    }

    /// Drops every injected fault not yet served.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// The next `n` calls answer HTTP 200 with `errno` and `msg`.
    pub fn fail_next_errno(&self, n: usize, errno: i64, msg: &str) {
        let mut s = self.state();
        s.faults
            .extend(std::iter::repeat_n(Fault::Errno(errno, msg.to_owned()), n));
    }

    /// The next `n` calls answer HTTP 200 with `body` verbatim (e.g. a
    /// maintenance page instead of the JSON envelope).
    pub fn fail_next_body(&self, n: usize, body: &str) {
        let mut s = self.state();
        s.faults
            .extend(std::iter::repeat_n(Fault::Body(body.to_owned()), n));
    }

    /// Delay before every answer.
    pub fn set_latency(&self, d: Duration) {
        self.state().latency = d;
    }

    /// Calls accepted per API key in any 24 h (resets nothing).
    pub fn set_calls_per_day(&self, n: usize) {
        self.state().config.calls_per_day = n;
    }

    /// Forgets the calls counted so far.
    pub fn reset_budget(&self) {
        self.state().calls.clear();
    }

    /// Minimum time between two writes to one device.
    pub fn set_min_write_interval(&self, d: Duration) {
        self.state().config.min_write_interval = d;
    }

    /// Minimum time between two calls to one query path.
    pub fn set_query_interval(&self, d: Duration) {
        self.state().config.query_interval = d;
    }

    /// Minimum time between two calls to one update path.
    pub fn set_write_interval(&self, d: Duration) {
        self.state().config.write_interval = d;
    }

    /// Largest accepted difference between a `timestamp` and the clock.
    pub fn set_max_clock_skew(&self, d: Duration) {
        self.state().config.max_clock_skew = d;
    }

    /// Whether a request without a `User-Agent` is refused.
    pub fn set_require_user_agent(&self, on: bool) {
        self.state().config.require_user_agent = on;
    }

    /// Order of groups on read.
    pub fn set_read_order(&self, o: ReadOrder) {
        self.state().config.read_order = o;
    }

    /// Whether reads pad with `Invalid` slots: `true` sets
    /// [`Placeholders::Invalid`], `false` [`Placeholders::None`].
    pub fn set_pad_with_invalid(&self, on: bool) {
        self.set_placeholders(if on {
            Placeholders::Invalid
        } else {
            Placeholders::None
        });
    }

    /// What reads pad the list with.
    pub fn set_placeholders(&self, p: Placeholders) {
        self.state().config.placeholders = p;
    }

    /// Whether padding slots read with `minSocOnGrid: null`.
    pub fn set_null_min_soc_on_grid(&self, on: bool) {
        self.state().config.null_min_soc_on_grid = on;
    }

    /// The `maxSoc` reads give groups stored without one (`None`: none).
    pub fn set_max_soc(&self, max_soc: Option<i64>) {
        self.state().config.max_soc = max_soc;
    }

    /// Whether `scheduler/get` answers `result: null` for a device without
    /// groups.
    pub fn set_result_null(&self, on: bool) {
        self.state().config.result_null = on;
    }

    /// The next `n` accepted `scheduler/enable` writes are followed by
    /// another client's write of the list as it was before each plus
    /// `group` (see [`EmulatorConfig::concurrent_writer`]); 0 stops it.
    pub fn set_concurrent_writer(&self, n: usize, group: Value) {
        let mut st = self.state();
        st.concurrent_left = n;
        st.concurrent_group = group;
        st.concurrent_writes = 0;
        st.concurrent_last = None;
    }

    /// The next `n` accepted `scheduler/enable` writes are applied but
    /// answered HTTP 502, as when the answer is lost on the way back: the
    /// client cannot tell whether its write landed.
    pub fn lose_next_write_answers(&self, n: usize) {
        self.state().lose_write_answers = n;
    }

    /// Accepted `scheduler/enable` writes of `action` on `sn` (writes that
    /// carried its fencing token).
    pub fn writes_for(&self, sn: &str, action: &str) -> u32 {
        self.state()
            .devices
            .get(sn)
            .and_then(|d| d.writes.get(action).copied())
            .unwrap_or(0)
    }

    /// Accepted writes the concurrent writer still follows.
    pub fn concurrent_writes_left(&self) -> usize {
        self.state().concurrent_left
    }

    /// Slots per device.
    pub fn set_max_slots(&self, n: usize) {
        self.state().config.max_slots = n;
    }

    /// Largest `fdPwr`.
    pub fn set_max_power_w(&self, w: i64) {
        self.state().config.max_power_w = w;
    }

    /// The plant time zone (see [`EmulatorConfig::plant_timezone`]).
    pub fn set_plant_timezone(&self, zone: Option<String>) {
        self.state().config.plant_timezone = zone;
    }

    /// Whether reads report passed groups disabled (see
    /// [`EmulatorConfig::disable_passed`]).
    pub fn set_disable_passed(&self, on: bool) {
        self.state().config.disable_passed = on;
    }

    /// The "now" reads judge passed groups by (`None`: the real clock).
    /// Only that rule: the `timestamp` header is always checked against
    /// the real clock (errno 41809), and the rate limits use it too.
    pub fn set_now(&self, now: Option<jiff::Timestamp>) {
        self.state().now = now;
    }

    /// Accept writes with errno 0 but do not apply them (the "success that
    /// is never applied" failure).
    pub fn set_ignore_writes(&self, on: bool) {
        self.state().ignore_writes = on;
    }

    /// Every call answered so far.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.state().log.clone()
    }

    /// Calls to `path` answered with errno 0.
    pub fn successful_calls(&self, path: &str) -> usize {
        self.state()
            .log
            .iter()
            .filter(|c| c.path == path && c.errno == Some(ERRNO_OK))
            .count()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is plain data updated in small steps: a panic in another
    // handler cannot leave it torn, so keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn json_response(errno: i64, msg: &str, result: Value) -> Response<Full<Bytes>> {
    let body = json!({ "errno": errno, "msg": msg, "result": result }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn redirect_response(location: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    // A URL that cannot be a header value still gets its 307: the point is
    // that the client must not follow, wherever the redirect points.
    if let Ok(v) = header::HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn status_response(status: u16) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!(
        "<html><body><h1>{status}</h1>emulated gateway failure</body></html>"
    ))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let latency = lock(&state).latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let body = Limited::new(body, 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let device = parsed
        .as_ref()
        .and_then(|v| v.get("deviceSN"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| query_param(parts.uri.query(), "sn"));
    let timestamp = header_str(&parts, "timestamp").and_then(|t| t.parse::<i64>().ok());
    let user_agent = header_str(&parts, header::USER_AGENT.as_str()).map(str::to_owned);
    let mut st = lock(&state);
    let (resp, errno) = answer(&mut st, &parts, &path, parsed, device.as_deref());
    st.log.push(CallRecord {
        path,
        status: resp.status().as_u16(),
        errno,
        device,
        timestamp,
        user_agent,
    });
    Ok(resp)
}

fn header_str<'a>(parts: &'a hyper::http::request::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Answers one call; returns the response and the errno sent.
fn answer(
    st: &mut State,
    parts: &hyper::http::request::Parts,
    path: &str,
    body: Option<Value>,
    sn: Option<&str>,
) -> (Response<Full<Bytes>>, Option<i64>) {
    if let Some(url) = &st.config.redirect_to {
        return (redirect_response(url), None);
    }
    let echo = st
        .config
        .echo_token
        .then(|| parts.headers.get("token"))
        .flatten()
        .map(|t| format!(" (token {})", String::from_utf8_lossy(t.as_bytes())));
    let reply = |errno: i64, msg: &str, result: Value| {
        let msg = match &echo {
            Some(e) => format!("{msg}{e}"),
            None => msg.to_owned(),
        };
        (json_response(errno, &msg, result), Some(errno))
    };
    if let Some(f) = st.faults.pop_front() {
        return match f {
            Fault::Status(code) => (status_response(code), None),
            Fault::Errno(n, msg) => reply(n, &msg, Value::Null),
            Fault::Body(b) => (Response::new(Full::new(Bytes::from(b))), None),
        };
    }
    let method = if POST_PATHS.contains(&path) {
        Method::POST
    } else if GET_PATHS.contains(&path) {
        Method::GET
    } else {
        let mut r = status_response(404);
        *r.status_mut() = StatusCode::NOT_FOUND;
        return (r, None);
    };
    if parts.method != method {
        let mut r = status_response(405);
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return (r, None);
    }
    // Headers: token, timestamp (ms), signature, lang and (unless switched
    // off) a User-Agent, all present; then the signature over the path
    // with literal "\r\n" separators.
    let token = header_str(parts, "token");
    let ts = header_str(parts, "timestamp").and_then(|t| t.parse::<i64>().ok());
    let sig = header_str(parts, "signature");
    let user_agent = header_str(parts, header::USER_AGENT.as_str()).filter(|ua| !ua.is_empty());
    let (Some(token), Some(ts), Some(sig), Some(_)) = (token, ts, sig, header_str(parts, "lang"))
    else {
        return reply(ERRNO_AUTH, "Missing request header parameters", Value::Null);
    };
    if st.config.require_user_agent && user_agent.is_none() {
        return reply(
            ERRNO_AUTH,
            "Missing request header parameters (User-Agent)",
            Value::Null,
        );
    }
    if token != st.config.api_key || sig != signature(path, token, ts) {
        return reply(ERRNO_AUTH, "illegal signature", Value::Null);
    }
    // The timestamp, within the skew of the emulator's clock either way.
    let skew_ms = i64::try_from(st.config.max_clock_skew.as_millis()).unwrap_or(i64::MAX);
    let clock_ms = jiff::Timestamp::now().as_millisecond();
    if clock_ms.abs_diff(ts) > skew_ms.unsigned_abs() {
        return reply(
            ERRNO_SIGNATURE_EXPIRED,
            "invalid token (the signature's timestamp is out of the accepted clock skew)",
            Value::Null,
        );
    }
    // Daily budget per key (one key here), over a sliding 24 h.
    let now = Instant::now();
    while st
        .calls
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(86_400))
    {
        st.calls.pop_front();
    }
    if st.calls.len() >= st.config.calls_per_day {
        return reply(
            ERRNO_DAILY_LIMIT,
            "Your request exceeds the limit. Please try again later",
            Value::Null,
        );
    }
    // Frequency per interface (path) and key: a refused call neither
    // counts against the budget nor restarts the interval.
    let is_write = path == PATH_SET_FLAG || path == PATH_SET;
    let interval = if is_write {
        st.config.write_interval
    } else {
        st.config.query_interval
    };
    if st
        .last_call
        .get(path)
        .is_some_and(|t| now.duration_since(*t) < interval)
    {
        return reply(
            ERRNO_RATE_LIMITED,
            "The number of requests is too frequent, please try again later",
            Value::Null,
        );
    }
    st.last_call.insert(path.to_owned(), now);
    st.calls.push_back(now);
    if method == Method::GET {
        return match detail(st, path, parts.uri.query()) {
            Ok(result) => reply(ERRNO_OK, "success", result),
            Err((errno, msg)) => reply(errno, msg, Value::Null),
        };
    }
    let Some(body) = body.filter(Value::is_object) else {
        return reply(
            ERRNO_BAD_PARAMS,
            "parameters do not meet expectations",
            Value::Null,
        );
    };
    let Some(sn) = sn else {
        return reply(
            ERRNO_BAD_PARAMS,
            "parameters do not meet expectations",
            Value::Null,
        );
    };
    let config = st.config.clone();
    let ignore_writes = st.ignore_writes;
    let minute_now = local_minute(
        st.now.unwrap_or_else(jiff::Timestamp::now),
        config.plant_timezone.as_deref(),
    );
    let Some(dev) = st.devices.get_mut(sn) else {
        return reply(ERRNO_UNKNOWN_DEVICE, "device not found", Value::Null);
    };
    // A write fenced by a dispatch claim older than one already seen for
    // its action comes from a dispatcher that lost the work: refused.
    let fence = header_str(parts, FENCE_HEADER).and_then(|f| {
        let (action, n) = f.rsplit_once(':')?;
        Some((action.to_owned(), n.parse::<u64>().ok()?))
    });
    if is_write && let Some((action, n)) = &fence {
        let seen = dev.fences.entry(action.clone()).or_insert(0);
        if *n < *seen {
            return reply(ERRNO_STALE_FENCE, "stale fencing token", Value::Null);
        }
        *seen = *n;
    }
    if is_write {
        if dev
            .last_write
            .is_some_and(|t| now.duration_since(t) < config.min_write_interval)
        {
            return reply(
                ERRNO_RATE_LIMITED,
                "The number of requests is too frequent, please try again later",
                Value::Null,
            );
        }
        dev.last_write = Some(now);
    }

    match path {
        PATH_GET_FLAG => reply(
            ERRNO_OK,
            "success",
            json!({ "enable": i64::from(dev.flag), "support": dev.support }),
        ),
        PATH_SET_FLAG => match body.get("enable").and_then(Value::as_i64) {
            Some(e @ (0 | 1)) => {
                if !ignore_writes {
                    dev.flag = e == 1;
                }
                reply(ERRNO_OK, "success", Value::Null)
            }
            _ => reply(
                ERRNO_BAD_PARAMS,
                "parameters do not meet expectations",
                Value::Null,
            ),
        },
        PATH_GET if config.result_null && dev.groups.is_empty() => {
            reply(ERRNO_OK, "success", Value::Null)
        }
        PATH_GET => reply(
            ERRNO_OK,
            "success",
            json!({
                "enable": i64::from(dev.flag),
                "maxGroupCount": config.max_slots,
                "groups": read_view(sn, dev, &config, minute_now),
            }),
        ),
        _ => match validate_write(&body, &config, &firmware_modes(dev)) {
            Ok(groups) => {
                if let Some((action, _)) = &fence {
                    *dev.writes.entry(action.clone()).or_insert(0) += 1;
                }
                // The other client read the list before this write and
                // writes it back, plus its group, right after.
                let other = (st.concurrent_left > 0).then(|| {
                    st.concurrent_left -= 1;
                    st.concurrent_group.clone()
                });
                if !ignore_writes {
                    match other {
                        // It replaces the group it wrote last time, and
                        // each of its writes changes something (`fdPwr` one
                        // watt up), as another optimiser's would.
                        Some(g) => {
                            let n = st.concurrent_writes;
                            st.concurrent_writes += 1;
                            let mut g = g;
                            if let Some(p) = g.get("fdPwr").and_then(Value::as_i64) {
                                g["fdPwr"] = json!(p + i64::try_from(n).unwrap_or(0));
                            }
                            if let Some(last) = st.concurrent_last.take() {
                                dev.groups.retain(|x| *x != last);
                            }
                            st.concurrent_last = Some(g.clone());
                            dev.groups.push(g);
                        }
                        None => dev.groups = groups,
                    }
                }
                if st.lose_write_answers > 0 {
                    st.lose_write_answers -= 1;
                    return (status_response(502), None);
                }
                reply(ERRNO_OK, "success", Value::Null)
            }
            Err(errno) => reply(
                errno,
                if errno == ERRNO_OVERLAP {
                    "time overlap"
                } else {
                    "parameters do not meet expectations"
                },
                Value::Null,
            ),
        },
    }
}

/// The value of query parameter `name`, percent-decoded (`+` is a
/// space); `None` when absent or not UTF-8 once decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k).as_deref() == Some(name))
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = b.get(i + 1).copied().and_then(hex)?;
                let lo = b.get(i + 2).copied().and_then(hex)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The plant id the emulator gives a device: one plant per device.
fn plant_id(sn: &str) -> String {
    format!("plant-{sn}")
}

/// Answers the GET endpoints: the device detail (`?sn=`) and the plant
/// detail (`?id=`). `Err` is the errno and message.
fn detail(st: &State, path: &str, query: Option<&str>) -> Result<Value, (i64, &'static str)> {
    const BAD: (i64, &str) = (ERRNO_BAD_PARAMS, "parameters do not meet expectations");
    if path == PATH_DEVICE_DETAIL {
        let sn = query_param(query, "sn").ok_or(BAD)?;
        let dev = st
            .devices
            .get(&sn)
            .ok_or((ERRNO_UNKNOWN_DEVICE, "device not found"))?;
        return Ok(json!({
            "deviceSN": sn,
            "stationID": plant_id(&sn),
            "stationName": format!("Emulated plant {sn}"),
            "deviceType": "emulated",
            "hasBattery": true,
            "function": { "scheduler": dev.support },
        }));
    }
    let id = query_param(query, "id").ok_or(BAD)?;
    let sn = id
        .strip_prefix("plant-")
        .filter(|sn| st.devices.contains_key(*sn))
        .ok_or((ERRNO_UNKNOWN_DEVICE, "plant not found"))?;
    let mut plant = json!({ "stationID": id, "name": format!("Emulated plant {sn}") });
    if let (Some(zone), Some(o)) = (&st.config.plant_timezone, plant.as_object_mut()) {
        o.insert("ianaTimezone".into(), json!(zone));
    }
    Ok(plant)
}

/// The `properties` a read attaches to every group: the `fdPwr` range,
/// under the lowercase key the real cloud uses.
fn properties(max_power_w: i64) -> Value {
    json!({ "fdpwr": { "unit": "W", "range": { "min": 0, "max": max_power_w } } })
}

/// The minute of the day `now` is in `zone` (UTC when none or unknown).
fn local_minute(now: jiff::Timestamp, zone: Option<&str>) -> i64 {
    let tz = zone
        .and_then(|z| jiff::tz::TimeZone::get(z).ok())
        .unwrap_or(jiff::tz::TimeZone::UTC);
    let t = tz.to_datetime(now);
    i64::from(t.hour()) * 60 + i64::from(t.minute())
}

/// The groups as a read returns them: reordered, each stored object with
/// `id` and `properties` added and, when `disable_passed` is on, `enable:
/// 0` if its last minute is before `minute_now`; padded with `Invalid`
/// slots.
fn read_view(sn: &str, dev: &Inverter, config: &EmulatorConfig, minute_now: i64) -> Vec<Value> {
    let mut indexed: Vec<(usize, &Value, Option<Group>)> = dev
        .groups
        .iter()
        .enumerate()
        .map(|(i, v)| (i, v, Group::from_wire(v)))
        .collect();
    match config.read_order {
        ReadOrder::AsWritten => {}
        ReadOrder::Reversed => indexed.reverse(),
        ReadOrder::ByMode => indexed
            .sort_by_key(|(_, _, g)| g.as_ref().map(|g| (g.work_mode.clone(), g.start_min()))),
    }
    let mut out: Vec<Value> = indexed
        .into_iter()
        .map(|(i, v, g)| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                // `end_min` is exclusive: the last minute is end_min - 1.
                let passed =
                    g.is_some_and(|g| g.enable == 1 && !g.incomplete && g.end_min() <= minute_now);
                if config.disable_passed && passed {
                    o.insert("enable".into(), json!(0));
                }
                decorate(o, format!("{sn}-{i}"), config);
            }
            v
        })
        .collect();
    if let Some(pad) = config.placeholders.group(config.null_min_soc_on_grid) {
        while out.len() < config.max_slots {
            let mut p = pad.clone();
            if let Some(o) = p.as_object_mut() {
                decorate(o, format!("{sn}-{}", out.len()), config);
            }
            out.push(p);
        }
    }
    out
}

/// Adds what a read adds to every group: `id`, `properties` and, when
/// [`EmulatorConfig::max_soc`] is set, a `maxSoc` the group lacks.
fn decorate(group: &mut serde_json::Map<String, Value>, id: String, config: &EmulatorConfig) {
    group.insert("id".into(), json!(id));
    group.insert("properties".into(), properties(config.max_power_w));
    if let Some(m) = config.max_soc {
        group.entry("maxSoc").or_insert(json!(m));
    }
}

/// Work modes this emulator does not know that the device's stored groups
/// already use: a newer firmware's modes (seeded by a test), which the
/// cloud accepts back as they are.
fn firmware_modes(dev: &Inverter) -> Vec<String> {
    dev.groups
        .iter()
        .filter_map(Group::from_wire)
        .filter(|g| g.mode().is_none() && !g.work_mode.trim().is_empty())
        .map(|g| g.work_mode)
        .collect()
}

/// Checks a `scheduler/enable` body the way the cloud does and returns
/// the groups to store, verbatim; `Err` is the errno. A group in one of
/// `firmware_modes` (the device's own, unknown here) is not judged by the
/// rules of the known modes.
fn validate_write(
    body: &Value,
    config: &EmulatorConfig,
    firmware_modes: &[String],
) -> Result<Vec<Value>, i64> {
    let obj = body.as_object().ok_or(ERRNO_BAD_PARAMS)?;
    if obj.keys().any(|k| k != "deviceSN" && k != "groups") {
        return Err(ERRNO_BAD_PARAMS);
    }
    let list = obj
        .get("groups")
        .and_then(Value::as_array)
        .ok_or(ERRNO_BAD_PARAMS)?;
    if list.len() > config.max_slots {
        return Err(ERRNO_BAD_PARAMS);
    }
    let mut groups = Vec::with_capacity(list.len());
    for v in list {
        let fields = v.as_object().ok_or(ERRNO_BAD_PARAMS)?;
        // All nine fields; the read-only `id` and `properties` copied from
        // a read are refused; any other field (`maxSoc`, `extraParam`, …)
        // is kept.
        if !GROUP_FIELDS.iter().all(|f| fields.contains_key(*f))
            || READ_ONLY_FIELDS.iter().any(|f| fields.contains_key(*f))
            // Parsing reads any non-zero `enable` as 1: the write wants 0|1.
            || !matches!(fields.get("enable").and_then(as_int), Some(0 | 1))
        {
            return Err(ERRNO_BAD_PARAMS);
        }
        // `Invalid`, "" and unknown modes, bad times, fdSoc, minSocOnGrid
        // (null included) and fdPwr.
        let g = Group::from_wire(v).ok_or(ERRNO_BAD_PARAMS)?;
        let firmwares = g.mode().is_none() && firmware_modes.contains(&g.work_mode);
        if !firmwares && g.write_problem(config.max_power_w).is_some() {
            return Err(ERRNO_BAD_PARAMS);
        }
        groups.push(g);
    }
    // Every pair, disabled groups too, with inclusive end minutes.
    for (i, a) in groups.iter().enumerate() {
        if groups[i + 1..].iter().any(|b| a.overlaps(b)) {
            return Err(ERRNO_OVERLAP);
        }
    }
    Ok(list.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An enabled SelfUse group from `start` through `end_incl` (the wire's
    /// inclusive end), both (hour, minute).
    fn span(start: (i64, i64), end_incl: (i64, i64)) -> Value {
        json!({
            "enable": 1, "startHour": start.0, "startMinute": start.1,
            "endHour": end_incl.0, "endMinute": end_incl.1,
            "workMode": "SelfUse", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 1000
        })
    }

    /// The window [sh:00, eh:00): written sh:00–(eh-1):59.
    fn group(sh: i64, eh: i64) -> Value {
        span((sh, 0), (eh - 1, 59))
    }

    fn write(groups: Vec<Value>) -> Result<Vec<Value>, i64> {
        let config = EmulatorConfig::new("k", &["SN"]);
        validate_write(&json!({ "deviceSN": "SN", "groups": groups }), &config, &[])
    }

    fn with(field: &str, v: Value) -> Value {
        let mut g = group(1, 2);
        g[field] = v;
        g
    }

    fn without(field: &str) -> Value {
        let mut g = group(1, 2);
        g.as_object_mut().expect("an object").remove(field);
        g
    }

    #[test]
    fn accepts_a_valid_list() {
        let list = vec![group(1, 2), group(2, 3), span((10, 0), (10, 0))];
        assert_eq!(write(list.clone()), Ok(list));
        assert_eq!(write(vec![]), Ok(vec![]));
    }

    #[test]
    fn a_group_ending_the_minute_it_starts_is_one_minute_and_valid() {
        // 10:00–10:00 inclusive is one minute: valid, and it overlaps a
        // group through 10:00 but not one ending 09:59.
        assert!(write(vec![span((10, 0), (10, 0))]).is_ok());
        assert!(write(vec![span((9, 0), (9, 59)), span((10, 0), (10, 0))]).is_ok());
        assert_eq!(
            write(vec![span((9, 0), (10, 0)), span((10, 0), (10, 0))]),
            Err(ERRNO_OVERLAP)
        );
        // Ending before it starts is refused.
        assert_eq!(write(vec![span((10, 1), (10, 0))]), Err(ERRNO_BAD_PARAMS));
    }

    #[test]
    fn refuses_broken_invariants_with_40257() {
        let cases = [
            with("id", json!("x")),
            with("properties", json!({})),
            without("fdPwr"),
            without("minSocOnGrid"),
            without("enable"),
            group(22, 6),                      // crosses midnight
            group(3, 3),                       // ends before it starts
            span((24, 0), (24, 30)),           // no such hour
            span((1, 0), (1, 60)),             // no such minute
            with("fdSoc", json!(10)),          // below 11
            with("fdSoc", json!(101)),         // above 100
            with("minSocOnGrid", json!(30)),   // above fdSoc 20
            with("minSocOnGrid", json!(9)),    // below 10
            with("minSocOnGrid", Value::Null), // the cloud's placeholder value
            with("fdPwr", json!(0)),
            with("fdPwr", json!(6001)),
            with("fdPwr", json!("lots")),
            with("workMode", json!("Turbo")),
            with("workMode", json!("Invalid")),
            with("workMode", json!("")),
            with("enable", json!(2)),
            json!("not a group"),
        ];
        for (i, g) in cases.into_iter().enumerate() {
            assert_eq!(
                write(vec![g.clone()]),
                Err(ERRNO_BAD_PARAMS),
                "case {i}: {g}"
            );
        }
        let nine: Vec<Value> = (1..10).map(|h| group(h, h + 1)).collect();
        assert_eq!(write(nine[..8].to_vec()).map(|l| l.len()), Ok(8));
        assert_eq!(write(nine), Err(ERRNO_BAD_PARAMS), "more than max_slots");
        let config = EmulatorConfig::new("k", &["SN"]);
        for body in [
            json!({ "deviceSN": "SN", "groups": [group(1, 2)], "enable": 1 }),
            json!({ "deviceSN": "SN" }),
            json!({ "deviceSN": "SN", "groups": group(1, 2) }),
            json!([group(1, 2)]),
        ] {
            assert_eq!(
                validate_write(&body, &config, &[]),
                Err(ERRNO_BAD_PARAMS),
                "{body}"
            );
        }
    }

    #[test]
    fn extra_group_fields_are_accepted_and_kept_verbatim() {
        let mut g = group(1, 2);
        g["maxSoc"] = json!(95);
        g["extraParam"] = json!({ "pvLimit": 3000, "nested": [1, null] });
        g["isDefault"] = json!(false);
        assert_eq!(write(vec![g.clone()]), Ok(vec![g]));
    }

    #[test]
    fn refuses_overlaps_with_inclusive_ends_disabled_groups_included() {
        // Meeting at 11:00 (both include the minute) overlaps.
        assert_eq!(
            write(vec![span((10, 0), (11, 0)), span((11, 0), (12, 0))]),
            Err(ERRNO_OVERLAP)
        );
        assert!(write(vec![span((10, 0), (10, 59)), span((11, 0), (11, 59))]).is_ok());
        // A disabled group counts, either way round and both disabled.
        let mut off = span((10, 30), (10, 45));
        off["enable"] = json!(0);
        for list in [
            vec![span((10, 0), (10, 59)), off.clone()],
            vec![off.clone(), span((10, 0), (10, 59))],
            vec![off.clone(), off.clone()],
        ] {
            assert_eq!(write(list.clone()), Err(ERRNO_OVERLAP), "{list:?}");
        }
        // Not only neighbours in the list: the first and the last.
        assert_eq!(
            write(vec![group(1, 3), group(5, 6), group(2, 4)]),
            Err(ERRNO_OVERLAP)
        );
    }

    /// One request over a plain TCP socket, so no client library can hide
    /// a redirect or rewrite the answer; returns the raw HTTP answer.
    async fn raw_post(addr: SocketAddr, path: &str, token: &str, signed: bool) -> String {
        let ts = jiff::Timestamp::now().as_millisecond();
        raw_post_at(addr, path, token, signed, ts, Some("emulator-test")).await
    }

    /// [`raw_post`] with the `timestamp` and `User-Agent` (none: no such
    /// header) given, and the body `{"deviceSN":"SN"}`.
    async fn raw_post_at(
        addr: SocketAddr,
        path: &str,
        token: &str,
        signed: bool,
        ts: i64,
        user_agent: Option<&str>,
    ) -> String {
        let sig = if signed {
            signature(path, token, ts)
        } else {
            "bad".to_owned()
        };
        let headers = headers(token, ts, &sig, user_agent);
        raw_http(addr, "POST", path, &headers, r#"{"deviceSN":"SN"}"#).await
    }

    /// The FoxESS headers, with `signature` as given.
    fn headers(token: &str, ts: i64, sig: &str, user_agent: Option<&str>) -> String {
        let ua = user_agent.map_or_else(String::new, |ua| format!("User-Agent: {ua}\r\n"));
        format!("token: {token}\r\ntimestamp: {ts}\r\nsignature: {sig}\r\nlang: en\r\n{ua}")
    }

    /// One request over a plain TCP socket: `target` is the path and any
    /// query, `headers` whole lines; returns the raw HTTP answer.
    async fn raw_http(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &str,
        body: &str,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    /// A correctly signed request with API key `k`; `target` is the path
    /// and any query, signed over the path alone. The raw answer.
    async fn signed(addr: SocketAddr, method: &str, target: &str, body: &str) -> String {
        let path = target.split('?').next().unwrap_or(target);
        let ts = jiff::Timestamp::now().as_millisecond();
        let h = headers("k", ts, &signature(path, "k", ts), Some("emulator-test"));
        raw_http(addr, method, target, &h, body).await
    }

    /// The JSON envelope of a raw answer (which must be HTTP 200).
    fn envelope(answer: &str) -> Value {
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        serde_json::from_str(body).expect("json")
    }

    /// A signed POST of `body` with key `k`: its envelope.
    async fn post(emu: &EmulatorHandle, path: &str, body: Value) -> Value {
        envelope(&signed(emu.addr(), "POST", path, &body.to_string()).await)
    }

    /// A signed GET of `target` (path and query) with key `k`: its
    /// envelope.
    async fn get(emu: &EmulatorHandle, target: &str) -> Value {
        envelope(&signed(emu.addr(), "GET", target, "").await)
    }

    /// Key `k`, device `SN`, no spacing between calls, reads as written
    /// and with the stored `enable` whatever the time of day (the passed
    /// rule has tests of its own).
    fn quick_config() -> EmulatorConfig {
        let mut c = EmulatorConfig::new("k", &["SN"]);
        c.min_write_interval = Duration::ZERO;
        c.query_interval = Duration::ZERO;
        c.write_interval = Duration::ZERO;
        c.read_order = ReadOrder::AsWritten;
        c.disable_passed = false;
        c
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().expect("a timestamp")
    }

    /// The `enable` of each group read, in stored order.
    async fn enables(emu: &EmulatorHandle) -> Vec<i64> {
        let n = emu.raw_groups("SN").len();
        read(emu).await["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .take(n)
            .map(|g| g["enable"].as_i64().expect("enable"))
            .collect()
    }

    #[tokio::test]
    async fn groups_whose_last_minute_has_passed_read_disabled_but_stay_stored() {
        let mut config = quick_config();
        config.disable_passed = EmulatorConfig::new("k", &[]).disable_passed;
        assert!(config.disable_passed, "on by default");
        let emu = Emulator::start(config).await.expect("start");
        let mut off = span((6, 0), (6, 59));
        off["enable"] = json!(0);
        let stored = vec![
            span((10, 0), (12, 29)),  // last minute 12:29: passed at 12:30
            span((12, 30), (12, 30)), // the current minute: not passed
            span((13, 0), (13, 59)),
            off,
        ];
        assert_eq!(write_groups(&emu, stored.clone()).await, ERRNO_OK);
        emu.set_now(Some(at("2026-03-10T12:30:59Z")));
        assert_eq!(enables(&emu).await, [0, 1, 1, 0]);
        assert_eq!(emu.raw_groups("SN"), stored, "reads change nothing stored");
        assert_eq!(emu.raw_groups("SN")[3]["enable"], 0, "a written 0 stays 0");
        emu.set_now(Some(at("2026-03-10T12:31:00Z")));
        assert_eq!(enables(&emu).await, [0, 0, 1, 0]);
        // Local is the plant's time zone: 12:31 UTC is 21:31 in Tokyo.
        emu.set_plant_timezone(Some("Asia/Tokyo".to_owned()));
        assert_eq!(enables(&emu).await, [0, 0, 0, 0]);
        // 05:00 in Tokyo: nothing has passed yet today.
        emu.set_now(Some(at("2026-03-09T20:00:00Z")));
        assert_eq!(enables(&emu).await, [1, 1, 1, 0]);
        // An unknown zone counts as UTC (20:00).
        emu.set_plant_timezone(Some("Mars/Olympus_Mons".to_owned()));
        assert_eq!(enables(&emu).await, [0, 0, 0, 0]);
        emu.set_disable_passed(false);
        assert_eq!(enables(&emu).await, [1, 1, 1, 0]);
        assert_eq!(emu.raw_groups("SN"), stored);
    }

    #[tokio::test]
    async fn without_a_set_now_the_passed_rule_follows_the_real_clock() {
        let mut config = quick_config();
        config.disable_passed = true;
        let emu = Emulator::start(config).await.expect("start");
        emu.seed_raw("SN", vec![span((0, 0), (0, 0)), span((0, 0), (23, 59))]);
        let before = local_minute(jiff::Timestamp::now(), None);
        let read = enables(&emu).await;
        let after = local_minute(jiff::Timestamp::now(), None);
        // Through 23:59 never passes; 00:00 has passed from 00:01 on.
        assert_eq!(read[1], 1);
        if before >= 1 && after >= before {
            assert_eq!(read[0], 0, "{before}..{after}");
        }
        // A fixed "now" and back to the real clock.
        emu.set_now(Some(at("2026-03-10T00:00:30Z")));
        assert_eq!(enables(&emu).await, [1, 1]);
        emu.set_now(None);
        let before = local_minute(jiff::Timestamp::now(), None);
        let read = enables(&emu).await;
        if before >= 1 {
            assert_eq!(read[0], 0, "{before}");
        }
    }

    #[tokio::test]
    async fn set_now_leaves_the_timestamp_check_on_the_real_clock() {
        let emu = quick().await;
        let fake = at("2020-01-01T00:00:00Z");
        emu.set_now(Some(fake));
        let now = jiff::Timestamp::now().as_millisecond();
        for (ts, errno) in [
            (now, ERRNO_OK),
            (fake.as_millisecond(), ERRNO_SIGNATURE_EXPIRED),
        ] {
            let a = raw_post_at(emu.addr(), PATH_GET_FLAG, "k", true, ts, Some("t")).await;
            assert_eq!(errno_of(&a), errno, "{a}");
        }
    }

    async fn quick() -> EmulatorHandle {
        Emulator::start(quick_config()).await.expect("start")
    }

    /// `scheduler/get` of `SN`: the result.
    async fn read(emu: &EmulatorHandle) -> Value {
        let e = post(emu, PATH_GET, json!({ "deviceSN": "SN" })).await;
        assert_eq!(e["errno"], 0, "{e}");
        e["result"].clone()
    }

    /// `scheduler/enable` of `SN`: the errno.
    async fn write_groups(emu: &EmulatorHandle, groups: Vec<Value>) -> i64 {
        let e = post(emu, PATH_SET, json!({ "deviceSN": "SN", "groups": groups })).await;
        e["errno"].as_i64().expect("an errno")
    }

    #[tokio::test]
    async fn written_groups_are_stored_verbatim_and_read_with_id_properties_and_slot_count() {
        let emu = quick().await;
        let mut a = group(1, 2);
        a["maxSoc"] = json!(90);
        a["extraParam"] = json!({ "exportLimit": 2500 });
        let b = span((3, 15), (3, 44));
        assert_eq!(
            write_groups(&emu, vec![a.clone(), b.clone()]).await,
            ERRNO_OK
        );
        assert_eq!(emu.raw_groups("SN"), vec![a.clone(), b.clone()]);
        let parsed = emu.groups("SN");
        assert_eq!(parsed[0].extra["maxSoc"], 90);
        assert_eq!(parsed[0].to_wire(), a);
        assert_eq!(
            parsed[1],
            Group::new(true, (3, 15), (3, 44), "SelfUse", 10, 20, 1000)
        );

        let r = read(&emu).await;
        assert_eq!(r["enable"], 0);
        assert_eq!(r["maxGroupCount"], 8);
        let groups = r["groups"].as_array().expect("groups");
        assert_eq!(groups.len(), 8, "padded to the slot count: {r}");
        for (read, written) in groups.iter().zip([&a, &b]) {
            let o = read.as_object().expect("an object");
            for (k, v) in written.as_object().expect("an object") {
                assert_eq!(o.get(k), Some(v), "{k} in {read}");
            }
            assert_eq!(o.len(), written.as_object().map_or(0, |w| w.len()) + 2);
            assert!(o["id"].is_string(), "{read}");
            assert_eq!(o["properties"]["fdpwr"]["range"]["max"], 6000, "{read}");
            assert_eq!(o["properties"]["fdpwr"]["range"]["min"], 0, "{read}");
            assert_eq!(o["properties"]["fdpwr"]["unit"], "W", "{read}");
        }
        assert_eq!(groups[2]["workMode"], "Invalid");
        // What a read returns cannot be written back as it is.
        assert_eq!(
            write_groups(&emu, groups[..2].to_vec()).await,
            ERRNO_BAD_PARAMS
        );
        assert_eq!(emu.raw_groups("SN"), vec![a, b]);
        emu.set_max_power_w(5000);
        assert_eq!(
            read(&emu).await["groups"][0]["properties"]["fdpwr"]["range"]["max"],
            5000
        );
    }

    #[tokio::test]
    async fn device_and_plant_detail_name_the_plant_and_its_time_zone() {
        let emu = quick().await;
        emu.add_device("A B/1");
        let d = get(&emu, "/op/v0/device/detail?sn=SN").await;
        assert_eq!(d["errno"], 0, "{d}");
        assert_eq!(d["result"]["deviceSN"], "SN", "{d}");
        assert_eq!(d["result"]["stationID"], "plant-SN", "{d}");
        // Percent-encoded as the driver sends it, among other parameters.
        let d = get(&emu, "/op/v0/device/detail?x=1&sn=A%20B%2F1").await;
        assert_eq!(d["result"]["stationID"], "plant-A B/1", "{d}");
        for (target, errno) in [
            ("/op/v0/device/detail?sn=NOPE", ERRNO_UNKNOWN_DEVICE),
            ("/op/v0/device/detail", ERRNO_BAD_PARAMS),
            ("/op/v0/device/detail?sn=%zz", ERRNO_BAD_PARAMS),
            ("/op/v0/plant/detail?id=plant-NOPE", ERRNO_UNKNOWN_DEVICE),
            ("/op/v0/plant/detail?id=SN", ERRNO_UNKNOWN_DEVICE),
            ("/op/v0/plant/detail?sn=SN", ERRNO_BAD_PARAMS),
        ] {
            assert_eq!(get(&emu, target).await["errno"], errno, "{target}");
        }

        let p = get(&emu, "/op/v0/plant/detail?id=plant-SN").await;
        assert_eq!(p["errno"], 0, "{p}");
        assert_eq!(p["result"]["stationID"], "plant-SN", "{p}");
        assert!(p["result"]["name"].is_string(), "{p}");
        assert!(p["result"].get("ianaTimezone").is_none(), "{p}");
        emu.set_plant_timezone(Some("Europe/Berlin".to_owned()));
        let p = get(&emu, "/op/v0/plant/detail?id=plant-SN").await;
        assert_eq!(p["result"]["ianaTimezone"], "Europe/Berlin", "{p}");
        let mut config = quick_config();
        config.plant_timezone = Some("Australia/Sydney".to_owned());
        let emu = Emulator::start(config).await.expect("start");
        let p = get(&emu, "/op/v0/plant/detail?id=plant-SN").await;
        assert_eq!(p["result"]["ianaTimezone"], "Australia/Sydney", "{p}");
        assert_eq!(emu.calls()[0].path, PATH_PLANT_DETAIL);
    }

    #[tokio::test]
    async fn gets_are_signed_over_the_path_alone_and_paced_and_counted_like_posts() {
        let mut config = EmulatorConfig::new("k", &["SN"]);
        config.calls_per_day = 3;
        let emu = Emulator::start(config).await.expect("start");
        let target = "/op/v0/device/detail?sn=SN";
        let ts = jiff::Timestamp::now().as_millisecond();
        // Signed over the path and query: refused.
        let h = headers("k", ts, &signature(target, "k", ts), Some("t"));
        let a = raw_http(emu.addr(), "GET", target, &h, "").await;
        assert_eq!(envelope(&a)["errno"], ERRNO_AUTH, "{a}");
        // No User-Agent, or a timestamp beyond the skew.
        let h = headers("k", ts, &signature(PATH_DEVICE_DETAIL, "k", ts), None);
        let a = raw_http(emu.addr(), "GET", target, &h, "").await;
        assert_eq!(envelope(&a)["errno"], ERRNO_AUTH, "{a}");
        let old = ts - 3_600_000;
        let h = headers(
            "k",
            old,
            &signature(PATH_DEVICE_DETAIL, "k", old),
            Some("t"),
        );
        let a = raw_http(emu.addr(), "GET", target, &h, "").await;
        assert_eq!(envelope(&a)["errno"], ERRNO_SIGNATURE_EXPIRED, "{a}");
        // One query a second per path.
        assert_eq!(get(&emu, target).await["errno"], ERRNO_OK);
        assert_eq!(get(&emu, target).await["errno"], ERRNO_RATE_LIMITED);
        let plant = "/op/v0/plant/detail?id=plant-SN";
        assert_eq!(get(&emu, plant).await["errno"], ERRNO_OK);
        // The daily budget counts GETs: two taken, one left.
        let r = post(&emu, PATH_GET_FLAG, json!({ "deviceSN": "SN" })).await;
        assert_eq!(r["errno"], ERRNO_OK, "{r}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(get(&emu, target).await["errno"], ERRNO_DAILY_LIMIT);
        assert_eq!(emu.successful_calls(PATH_DEVICE_DETAIL), 1);
        assert_eq!(emu.calls()[3].device.as_deref(), Some("SN"));
    }

    #[tokio::test]
    async fn each_path_takes_its_own_method_only() {
        let emu = quick().await;
        let status = |a: String| a.split(' ').nth(1).unwrap_or_default().to_owned();
        let body = r#"{"deviceSN":"SN"}"#;
        for path in [PATH_GET_FLAG, PATH_SET_FLAG, PATH_GET, PATH_SET] {
            let a = signed(emu.addr(), "GET", &format!("{path}?sn=SN"), "").await;
            assert_eq!(status(a), "405", "GET {path}");
            let a = signed(emu.addr(), "PUT", path, body).await;
            assert_eq!(status(a), "405", "PUT {path}");
        }
        for target in [
            "/op/v0/device/detail?sn=SN",
            "/op/v0/plant/detail?id=plant-SN",
        ] {
            let a = signed(emu.addr(), "POST", target, body).await;
            assert_eq!(status(a), "405", "POST {target}");
        }
        for method in ["GET", "POST"] {
            let a = signed(emu.addr(), method, "/op/v0/device/list", body).await;
            assert_eq!(status(a), "404", "{method}");
        }
        // The right method gets an answer.
        let a = signed(emu.addr(), "GET", "/op/v0/device/detail?sn=SN", "").await;
        assert_eq!(envelope(&a)["errno"], ERRNO_OK, "{a}");
        assert_eq!(emu.successful_calls(PATH_DEVICE_DETAIL), 1);
        assert_eq!(emu.calls().len(), 13);
    }

    /// The padding of a read of `SN` (everything after the stored groups).
    async fn padding(emu: &EmulatorHandle) -> Vec<Value> {
        let n = emu.raw_groups("SN").len();
        read(emu).await["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .skip(n)
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn placeholders_pad_reads_with_each_kind_of_unused_slot() {
        let emu = quick().await;
        emu.seed_raw("SN", vec![group(1, 2)]);
        assert_eq!(
            EmulatorConfig::new("k", &[]).placeholders,
            Placeholders::Invalid
        );
        for (p, mode) in [
            (Placeholders::Invalid, "Invalid"),
            (Placeholders::EmptyMode, ""),
            (Placeholders::DisabledSelfUse, "SelfUse"),
        ] {
            emu.set_placeholders(p);
            let pad = padding(&emu).await;
            assert_eq!(pad.len(), 7, "{p:?}: up to 8 slots");
            for slot in &pad {
                assert_eq!(slot["workMode"], mode, "{p:?}: {slot}");
                assert_eq!(slot["enable"], 0, "{p:?}: {slot}");
                assert_eq!(slot["minSocOnGrid"], 10, "{p:?}: {slot}");
                assert_eq!((&slot["fdSoc"], &slot["fdPwr"]), (&json!(10), &json!(0)));
                for f in ["startHour", "startMinute", "endHour", "endMinute"] {
                    assert_eq!(slot[f], 0, "{p:?}: {slot}");
                }
                assert!(slot["id"].is_string() && slot["properties"].is_object());
                let g = Group::from_wire(slot).expect("a group");
                assert!(g.is_placeholder() && !g.incomplete, "{p:?}: {slot}");
            }
        }
        emu.set_placeholders(Placeholders::None);
        assert_eq!(read(&emu).await["groups"].as_array().map(Vec::len), Some(1));
        // The older switch still works.
        emu.set_pad_with_invalid(true);
        assert_eq!(padding(&emu).await[0]["workMode"], "Invalid");
        emu.set_pad_with_invalid(false);
        assert!(padding(&emu).await.is_empty());
    }

    #[tokio::test]
    async fn null_min_soc_on_grid_nulls_the_padding_only() {
        let mut config = quick_config();
        config.null_min_soc_on_grid = true;
        let emu = Emulator::start(config).await.expect("start");
        emu.seed_raw("SN", vec![group(1, 2)]);
        let r = read(&emu).await;
        assert_eq!(r["groups"][0]["minSocOnGrid"], 10, "{r}");
        let pad = padding(&emu).await;
        assert_eq!(pad.len(), 7);
        assert!(pad.iter().all(|g| g["minSocOnGrid"].is_null()), "{pad:?}");
        emu.set_null_min_soc_on_grid(false);
        assert!(padding(&emu).await.iter().all(|g| g["minSocOnGrid"] == 10));
    }

    #[tokio::test]
    async fn max_soc_gives_every_group_read_a_max_soc_the_stored_one_first() {
        let mut config = quick_config();
        config.max_soc = Some(95);
        let emu = Emulator::start(config).await.expect("start");
        let mut own = group(3, 4);
        own["maxSoc"] = json!(80);
        let stored = vec![group(1, 2), own];
        assert_eq!(write_groups(&emu, stored.clone()).await, ERRNO_OK);
        let r = read(&emu).await;
        let groups = r["groups"].as_array().expect("groups");
        assert_eq!(groups[0]["maxSoc"], 95, "{r}");
        assert_eq!(groups[1]["maxSoc"], 80, "{r}");
        assert!(groups[2..].iter().all(|g| g["maxSoc"] == 95), "{r}");
        assert_eq!(emu.raw_groups("SN"), stored, "reads add, storage does not");
        emu.set_max_soc(None);
        let r = read(&emu).await;
        assert!(r["groups"][0].get("maxSoc").is_none(), "{r}");
        assert_eq!(r["groups"][1]["maxSoc"], 80, "{r}");
    }

    #[tokio::test]
    async fn result_null_answers_null_while_the_device_has_no_group() {
        let mut config = quick_config();
        config.result_null = true;
        let emu = Emulator::start(config).await.expect("start");
        let e = post(&emu, PATH_GET, json!({ "deviceSN": "SN" })).await;
        assert_eq!(e["errno"], 0, "{e}");
        assert!(e["result"].is_null(), "{e}");
        assert_eq!(write_groups(&emu, vec![group(1, 2)]).await, ERRNO_OK);
        assert_eq!(read(&emu).await["groups"][0]["startHour"], 1);
        assert_eq!(write_groups(&emu, vec![]).await, ERRNO_OK);
        assert!(read(&emu).await.is_null());
        emu.set_result_null(false);
        assert_eq!(read(&emu).await["groups"].as_array().map(Vec::len), Some(8));
    }

    #[tokio::test]
    async fn app_only_group_starts_every_device_with_a_group_the_write_refuses() {
        let mut config = quick_config();
        config.app_only_group = true;
        let emu = Emulator::start(config).await.expect("start");
        emu.add_device("LATER");
        for sn in ["SN", "LATER"] {
            assert_eq!(emu.raw_groups(sn), vec![app_only_group()], "{sn}");
        }
        let g = &emu.groups("SN")[0];
        assert_eq!(*g, Group::new(true, (6, 0), (6, 59), "SelfUse", 10, 10, 0));
        assert_eq!(read(&emu).await["groups"][0]["fdPwr"], 0);
        // Written back as read (less id and properties): refused.
        assert_eq!(
            write_groups(&emu, vec![app_only_group()]).await,
            ERRNO_BAD_PARAMS
        );
        assert_eq!(emu.raw_groups("SN"), vec![app_only_group()]);

        let plain = quick().await;
        assert!(plain.raw_groups("SN").is_empty());
        plain.seed_raw("SN", vec![group(1, 2)]);
        plain.seed_app_only_group("SN");
        plain.seed_app_only_group("SN");
        assert_eq!(plain.raw_groups("SN"), vec![group(1, 2), app_only_group()]);
    }

    #[tokio::test]
    async fn a_concurrent_writer_puts_back_the_list_before_our_write_plus_its_group() {
        let mut config = quick_config();
        config.concurrent_writer = 1;
        let emu = Emulator::start(config).await.expect("start");
        let before = vec![group(1, 2)];
        emu.seed_raw("SN", before.clone());
        assert_eq!(emu.concurrent_writes_left(), 1);
        // Refused writes are not followed.
        assert_eq!(
            write_groups(&emu, vec![group(3, 2)]).await,
            ERRNO_BAD_PARAMS
        );
        assert_eq!(emu.concurrent_writes_left(), 1);
        // Ours is accepted, then overwritten.
        assert_eq!(write_groups(&emu, vec![group(8, 9)]).await, ERRNO_OK);
        assert_eq!(
            emu.raw_groups("SN"),
            vec![group(1, 2), concurrent_writer_group()]
        );
        assert_eq!(emu.concurrent_writes_left(), 0);
        // Used up: the next write stands.
        assert_eq!(write_groups(&emu, vec![group(8, 9)]).await, ERRNO_OK);
        assert_eq!(emu.raw_groups("SN"), vec![group(8, 9)]);

        let theirs = span((23, 0), (23, 59));
        emu.set_concurrent_writer(2, theirs.clone());
        assert_eq!(write_groups(&emu, vec![group(10, 11)]).await, ERRNO_OK);
        assert_eq!(emu.raw_groups("SN"), vec![group(8, 9), theirs.clone()]);
        assert_eq!(write_groups(&emu, vec![]).await, ERRNO_OK);
        // Its second write replaces its first, and differs from it.
        let mut theirs_again = theirs.clone();
        theirs_again["fdPwr"] = json!(theirs["fdPwr"].as_i64().unwrap() + 1);
        assert_eq!(emu.raw_groups("SN"), vec![group(8, 9), theirs_again]);
        assert_eq!(write_groups(&emu, vec![]).await, ERRNO_OK);
        assert!(emu.raw_groups("SN").is_empty());
        assert_eq!(emu.successful_calls(PATH_SET), 5);
    }

    #[tokio::test]
    async fn seeded_groups_are_stored_as_given() {
        let emu = quick().await;
        let mut g = Group::new(false, (4, 0), (4, 29), "Backup", 30, 20, 0);
        g.extra.insert("maxSoc".into(), json!(100));
        emu.seed_groups("SN", vec![g.clone()]);
        assert_eq!(emu.raw_groups("SN"), vec![g.to_wire()]);
        assert_eq!(emu.groups("SN"), vec![g]);
        // Raw seeds skip every check and survive a read unchanged.
        let odd = vec![
            json!({ "workMode": "", "minSocOnGrid": null, "id": "mine", "fdSoc": "x" }),
            json!(7),
        ];
        emu.seed_raw("SN", odd.clone());
        assert_eq!(emu.raw_groups("SN"), odd);
        assert_eq!(emu.groups("SN").len(), 1, "the number is no group");
        let r = read(&emu).await;
        assert_eq!(r["groups"][0]["minSocOnGrid"], Value::Null, "{r}");
        assert_eq!(r["groups"][0]["fdSoc"], "x", "{r}");
        assert_eq!(r["groups"][1], 7, "{r}");
        assert_eq!(emu.raw_groups("SN"), odd);
        emu.seed_raw("NEW", vec![group(1, 2)]);
        assert_eq!(emu.raw_groups("NEW"), vec![group(1, 2)]);
    }

    #[tokio::test]
    async fn echo_token_puts_the_token_in_every_msg_success_included() {
        let mut config = EmulatorConfig::new("k-echo", &["SN"]);
        config.echo_token = true;
        let emu = Emulator::start(config).await.expect("start");
        let ok = raw_post(emu.addr(), PATH_GET_FLAG, "k-echo", true).await;
        assert!(ok.contains(r#""errno":0"#), "{ok}");
        assert!(ok.contains("success (token k-echo)"), "{ok}");
        let refused = raw_post(emu.addr(), PATH_GET_FLAG, "k-wrong", false).await;
        assert!(refused.contains("\"errno\":40256"), "{refused}");
        assert!(refused.contains("(token k-wrong)"), "{refused}");

        let plain = Emulator::start(EmulatorConfig::new("k-echo", &["SN"]))
            .await
            .expect("start");
        let ok = raw_post(plain.addr(), PATH_GET_FLAG, "k-echo", true).await;
        assert!(
            ok.contains(r#""errno":0"#) && !ok.contains("k-echo"),
            "{ok}"
        );
    }

    #[tokio::test]
    async fn redirect_to_answers_every_request_with_307() {
        let mut config = EmulatorConfig::new("k", &["SN"]);
        config.redirect_to = Some("http://127.0.0.1:9/elsewhere".to_owned());
        let emu = Emulator::start(config).await.expect("start");
        for (signed, path) in [(true, PATH_GET), (false, PATH_SET), (true, "/nowhere")] {
            let a = raw_post(emu.addr(), path, "k", signed).await;
            assert!(a.starts_with("HTTP/1.1 307"), "{a}");
            assert!(
                a.to_ascii_lowercase()
                    .contains("location: http://127.0.0.1:9/elsewhere\r\n"),
                "{a}"
            );
        }
        assert!(emu.calls().iter().all(|c| c.status == 307));
        assert_eq!(emu.successful_calls(PATH_GET), 0);
    }

    fn errno_of(answer: &str) -> i64 {
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        serde_json::from_str::<Value>(body).expect("json")["errno"]
            .as_i64()
            .expect("errno")
    }

    #[tokio::test]
    async fn timestamps_beyond_the_clock_skew_either_way_get_41809() {
        let mut config = EmulatorConfig::new("k", &["SN"]);
        config.query_interval = Duration::ZERO;
        let emu = Emulator::start(config).await.expect("start");
        let now = jiff::Timestamp::now().as_millisecond();
        let min = 60_000;
        for (ts, errno) in [
            (now - 11 * min, ERRNO_SIGNATURE_EXPIRED),
            (now + 11 * min, ERRNO_SIGNATURE_EXPIRED),
            (now - 9 * min, ERRNO_OK),
            (now + 9 * min, ERRNO_OK),
        ] {
            let a = raw_post_at(emu.addr(), PATH_GET_FLAG, "k", true, ts, Some("t")).await;
            assert_eq!(errno_of(&a), errno, "{} min: {a}", (ts - now) / min);
        }
        // The window is a knob.
        emu.set_max_clock_skew(Duration::from_secs(30));
        let a = raw_post_at(emu.addr(), PATH_GET_FLAG, "k", true, now - min, Some("t")).await;
        assert_eq!(errno_of(&a), ERRNO_SIGNATURE_EXPIRED, "{a}");
    }

    #[tokio::test]
    async fn a_request_without_a_user_agent_gets_40256_unless_switched_off() {
        let emu = Emulator::start(EmulatorConfig::new("k", &["SN"]))
            .await
            .expect("start");
        let now = jiff::Timestamp::now().as_millisecond();
        for ua in [None, Some("")] {
            let a = raw_post_at(emu.addr(), PATH_GET_FLAG, "k", true, now, ua).await;
            assert_eq!(errno_of(&a), ERRNO_AUTH, "{ua:?}: {a}");
            assert!(a.contains("User-Agent"), "{a}");
        }
        let ok = raw_post_at(emu.addr(), PATH_GET_FLAG, "k", true, now, Some("me/1")).await;
        assert_eq!(errno_of(&ok), ERRNO_OK, "{ok}");
        assert_eq!(emu.calls()[2].user_agent.as_deref(), Some("me/1"));
        emu.set_require_user_agent(false);
        emu.set_query_interval(Duration::ZERO);
        let a = raw_post_at(emu.addr(), PATH_GET_FLAG, "k", true, now, None).await;
        assert_eq!(errno_of(&a), ERRNO_OK, "{a}");
    }

    #[tokio::test]
    async fn each_path_takes_one_query_a_second_and_one_update_per_2_s() {
        let mut config = EmulatorConfig::new("k", &["SN"]);
        // Only the per-path spacing here, not the per-device one.
        config.min_write_interval = Duration::ZERO;
        let emu = Emulator::start(config).await.expect("start");
        let post = |path: &'static str| raw_post(emu.addr(), path, "k", true);
        // A first call to each path passes (the write's body is refused
        // as a write, after the frequency check).
        assert_eq!(errno_of(&post(PATH_GET_FLAG).await), ERRNO_OK);
        assert_eq!(errno_of(&post(PATH_GET).await), ERRNO_OK);
        assert_eq!(errno_of(&post(PATH_SET).await), ERRNO_BAD_PARAMS);
        // A second one at once is too frequent, on every path.
        for path in [PATH_GET_FLAG, PATH_GET, PATH_SET] {
            assert_eq!(errno_of(&post(path).await), ERRNO_RATE_LIMITED, "{path}");
        }
        // A query a second later passes; an update needs 2 s.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(errno_of(&post(PATH_GET_FLAG).await), ERRNO_OK);
        assert_eq!(errno_of(&post(PATH_SET).await), ERRNO_RATE_LIMITED);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(errno_of(&post(PATH_SET).await), ERRNO_BAD_PARAMS);
        // The four refused calls did not count against the budget: five
        // taken, a sixth passes, a seventh is over.
        emu.set_calls_per_day(6);
        assert_eq!(errno_of(&post(PATH_SET_FLAG).await), ERRNO_BAD_PARAMS);
        assert_eq!(errno_of(&post(PATH_GET).await), ERRNO_DAILY_LIMIT);
    }

    #[tokio::test]
    async fn a_spent_daily_budget_gets_40402() {
        let mut config = EmulatorConfig::new("k", &["SN"]);
        config.calls_per_day = 1;
        let emu = Emulator::start(config).await.expect("start");
        assert_eq!(
            errno_of(&raw_post(emu.addr(), PATH_GET_FLAG, "k", true).await),
            ERRNO_OK
        );
        let a = raw_post(emu.addr(), PATH_GET, "k", true).await;
        assert_eq!(errno_of(&a), ERRNO_DAILY_LIMIT, "{a}");
        assert!(a.contains("exceeds the limit"), "{a}");
    }
}
