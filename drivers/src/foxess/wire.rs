//! The FoxESS Open API on the wire: endpoint paths, the request
//! signature, the scheduler group and the `{errno, msg, result}` envelope.
//! Shared by the driver and the emulator so both speak the same dialect.

use std::fmt::{self, Write as _};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Reads the scheduler master flag: `{deviceSN}` → `{enable, support}`.
pub const PATH_GET_FLAG: &str = "/op/v1/device/scheduler/get/flag";
/// Sets the scheduler master flag: `{deviceSN, enable: 0|1}`.
pub const PATH_SET_FLAG: &str = "/op/v1/device/scheduler/set/flag";
/// Reads the groups: `{deviceSN}` → `{enable, groups}`.
pub const PATH_GET: &str = "/op/v1/device/scheduler/get";
/// Replaces the whole group list: `{deviceSN, groups}`.
pub const PATH_SET: &str = "/op/v1/device/scheduler/enable";

/// Device detail (GET `?sn=`): `{stationID, …}`, the plant it belongs to.
pub const PATH_DEVICE_DETAIL: &str = "/op/v0/device/detail";
/// Plant detail (GET `?id=`): `{ianaTimezone, …}`.
pub const PATH_PLANT_DETAIL: &str = "/op/v0/plant/detail";

pub const ERRNO_OK: i64 = 0;
/// Bad or missing request headers (token, timestamp, signature, lang,
/// User-Agent): "Missing request header parameters", and "illegal
/// signature" for a signature that does not match.
pub const ERRNO_AUTH: i64 = 40256;
/// "Parameters do not meet expectations" (any broken group invariant).
pub const ERRNO_BAD_PARAMS: i64 = 40257;
/// "Request frequency too high": the per-interface spacing (1 query a
/// second, 1 update per 2 s, per path) or the per-device write spacing.
pub const ERRNO_RATE_LIMITED: i64 = 40400;
/// "Your request exceeds the limit": the daily call budget is used up.
pub const ERRNO_DAILY_LIMIT: i64 = 40402;
/// Token (API key) refused; reported as "wrong user name or password".
pub const ERRNO_TOKEN_REFUSED: i64 = 41807;
/// Token (API key) invalid or expired.
pub const ERRNO_TOKEN_INVALID: i64 = 41808;
/// Signature or timestamp expired: the `timestamp` header is too far from
/// the cloud's clock. A fresh timestamp may pass.
pub const ERRNO_SIGNATURE_EXPIRED: i64 = 41809;
/// Settings refused while the scheduler is active.
pub const ERRNO_SCHEDULER_ACTIVE: i64 = 44096;
/// Groups overlap in time.
pub const ERRNO_OVERLAP: i64 = 42023;
/// Emulator only: a write's fencing token (`x-switchyard-fence`) is older
/// than one already seen for the action.
pub const ERRNO_STALE_FENCE: i64 = 49901;
/// Emulator only: the deviceSN is not known to the emulator.
pub const ERRNO_UNKNOWN_DEVICE: i64 = 41930;

/// The exact string that is hashed for the `signature` header:
/// `path + "\r\n" + token + "\r\n" + timestamp`, where each separator is
/// the four literal characters backslash, `r`, backslash, `n` (FoxESS's
/// reference client builds it with a raw string, so no CR LF bytes).
pub fn signature_input(path: &str, token: &str, timestamp_ms: i64) -> String {
    format!(r"{path}\r\n{token}\r\n{timestamp_ms}")
}

/// The `signature` header: lowercase hex MD5 of [`signature_input`].
pub fn signature(path: &str, token: &str, timestamp_ms: i64) -> String {
    let digest = Md5::digest(signature_input(path, token, timestamp_ms).as_bytes());
    let mut out = String::with_capacity(32);
    for b in digest {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// FoxESS work modes a scheduler group can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkMode {
    /// Self-consumption.
    SelfUse,
    /// Export first.
    Feedin,
    /// Keep the battery for outages; the homeowner's protection.
    Backup,
    /// Charge from the grid.
    ForceCharge,
    /// Discharge to the grid.
    ForceDischarge,
    Invalid,
}

impl WorkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkMode::SelfUse => "SelfUse",
            WorkMode::Feedin => "Feedin",
            WorkMode::Backup => "Backup",
            WorkMode::ForceCharge => "ForceCharge",
            WorkMode::ForceDischarge => "ForceDischarge",
            WorkMode::Invalid => "Invalid",
        }
    }

    /// Inverse of [`WorkMode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "SelfUse" => WorkMode::SelfUse,
            "Feedin" => WorkMode::Feedin,
            "Backup" => WorkMode::Backup,
            "ForceCharge" => WorkMode::ForceCharge,
            "ForceDischarge" => WorkMode::ForceDischarge,
            "Invalid" => WorkMode::Invalid,
            _ => return None,
        })
    }
}

/// One scheduler group (time slot) as the cloud returns it.
///
/// The nine v0 fields are parsed; every other field a read carries
/// (`maxSoc` on v1, `extraParam`, `isDefault`, …) is kept verbatim in
/// [`Group::extra`] and written back unchanged, except the read-only
/// metadata in [`READ_ONLY_FIELDS`]. Reads are tolerant: a missing or
/// `null` number reads as 0 (and marks the group [`Group::incomplete`]),
/// `minSocOnGrid: null` reads as `None`, and the mode stays a string so an
/// unknown mode from a newer firmware is preserved.
///
/// End times are **inclusive** on the wire: a window ending at 20:00 is
/// written `endHour 19, endMinute 59`, and two groups meeting at 20:00
/// overlap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Group {
    /// 1 = enabled.
    pub enable: i64,
    /// Local start hour, 0..=23.
    pub start_hour: i64,
    /// Local start minute, 0..=59.
    pub start_minute: i64,
    /// Local end hour, 0..=23 (inclusive).
    pub end_hour: i64,
    /// Local end minute, 0..=59 (inclusive: the group runs through it).
    pub end_minute: i64,
    /// The work mode's wire name.
    pub work_mode: String,
    /// Minimum state of charge on grid, percent (`None`: the cloud said
    /// `null`).
    pub min_soc_on_grid: Option<i64>,
    /// Force-discharge (stop) state of charge, percent.
    pub fd_soc: i64,
    /// Force charge/discharge power, watts.
    pub fd_pwr: i64,
    /// Every other field, kept verbatim (`maxSoc`, …).
    pub extra: Map<String, Value>,
    /// A field of the nine was missing, `null` (other than
    /// `minSocOnGrid`) or not a number as read, or a time was out of range
    /// (then all four read 0): the group cannot be written back as it is.
    pub incomplete: bool,
    /// A time was out of range as read (so the four read 0): never taken
    /// for an empty slot.
    pub bad_times: bool,
}

/// The field names of a v0 group (all required on write).
pub const GROUP_FIELDS: [&str; 9] = [
    "enable",
    "startHour",
    "startMinute",
    "endHour",
    "endMinute",
    "workMode",
    "minSocOnGrid",
    "fdSoc",
    "fdPwr",
];

/// Fields reads carry that the write endpoint refuses: dropped from every
/// group read (after the facts in them are taken).
pub const READ_ONLY_FIELDS: [&str; 2] = ["id", "properties"];

/// Minutes in a day.
pub const DAY_MINUTES: i64 = 1440;

/// A JSON number as an integer: integers, integral floats and numeric
/// strings (the cloud is not consistent).
pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

impl Group {
    /// A complete group: `start` and `end_incl` as (hour, minute), the end
    /// inclusive.
    pub fn new(
        enable: bool,
        start: (i64, i64),
        end_incl: (i64, i64),
        mode: &str,
        min_soc_on_grid: i64,
        fd_soc: i64,
        fd_pwr: i64,
    ) -> Self {
        Self {
            enable: i64::from(enable),
            start_hour: start.0,
            start_minute: start.1,
            end_hour: end_incl.0,
            end_minute: end_incl.1,
            work_mode: mode.to_owned(),
            min_soc_on_grid: Some(min_soc_on_grid),
            fd_soc,
            fd_pwr,
            extra: Map::new(),
            incomplete: false,
            bad_times: false,
        }
    }

    /// Reads one group tolerantly; `None` only for a list entry that is
    /// not an object. [`READ_ONLY_FIELDS`] are dropped.
    pub fn from_wire(v: &Value) -> Option<Self> {
        let o = v.as_object()?;
        let mut incomplete = false;
        let mut int = |k: &str| match o.get(k).and_then(as_int) {
            Some(n) => n,
            None => {
                incomplete = true;
                0
            }
        };
        let enable = match o.get("enable").and_then(as_flag) {
            Some(b) => i64::from(b),
            None => int("enable"),
        };
        let (start_hour, start_minute) = (int("startHour"), int("startMinute"));
        let (end_hour, end_minute) = (int("endHour"), int("endMinute"));
        let (fd_soc, fd_pwr) = (int("fdSoc"), int("fdPwr"));
        // Times out of range (a hostile or broken answer) cannot be
        // reasoned about: read as 00:00 and marked incomplete, so no
        // arithmetic on them can overflow and the group is never written
        // back as it is.
        let hours = 0..=23;
        let minutes = 0..=59;
        let in_range = hours.contains(&start_hour)
            && hours.contains(&end_hour)
            && minutes.contains(&start_minute)
            && minutes.contains(&end_minute);
        let (start_hour, start_minute, end_hour, end_minute) = if in_range {
            (start_hour, start_minute, end_hour, end_minute)
        } else {
            incomplete = true;
            (0, 0, 0, 0)
        };
        let bad_times = !in_range;
        let min_soc_on_grid = match o.get("minSocOnGrid") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let n = as_int(v);
                incomplete |= n.is_none();
                n
            }
        };
        let work_mode = match o.get("workMode") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let extra = o
            .iter()
            .filter(|(k, _)| {
                !GROUP_FIELDS.contains(&k.as_str()) && !READ_ONLY_FIELDS.contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Some(Self {
            enable,
            start_hour,
            start_minute,
            end_hour,
            end_minute,
            work_mode,
            min_soc_on_grid,
            fd_soc,
            fd_pwr,
            extra,
            incomplete,
            bad_times,
        })
    }

    /// The group as written: the nine fields (`minSocOnGrid` `null` when
    /// it was read so) and every kept extra field.
    pub fn to_wire(&self) -> Value {
        let mut o = self.extra.clone();
        o.insert("enable".into(), Value::from(self.enable));
        o.insert("startHour".into(), Value::from(self.start_hour));
        o.insert("startMinute".into(), Value::from(self.start_minute));
        o.insert("endHour".into(), Value::from(self.end_hour));
        o.insert("endMinute".into(), Value::from(self.end_minute));
        o.insert("workMode".into(), Value::from(self.work_mode.clone()));
        o.insert(
            "minSocOnGrid".into(),
            self.min_soc_on_grid.map_or(Value::Null, Value::from),
        );
        o.insert("fdSoc".into(), Value::from(self.fd_soc));
        o.insert("fdPwr".into(), Value::from(self.fd_pwr));
        Value::Object(o)
    }

    /// Minute of the day the group starts.
    pub fn start_min(&self) -> i64 {
        self.start_hour * 60 + self.start_minute
    }

    /// Minute of the day the group ends, **exclusive** (the wire's end is
    /// inclusive: 19:59 → 1200, 23:59 → 1440).
    pub fn end_min(&self) -> i64 {
        self.end_hour * 60 + self.end_minute + 1
    }

    /// The parsed mode, if known.
    pub fn mode(&self) -> Option<WorkMode> {
        WorkMode::parse(&self.work_mode)
    }

    /// Whether the group is an unused slot placeholder: mode `Invalid` or
    /// empty, or a disabled 00:00–00:00 slot.
    pub fn is_placeholder(&self) -> bool {
        let mode = self.work_mode.trim();
        mode.is_empty()
            || mode == WorkMode::Invalid.as_str()
            || (self.enable != 1
                && !self.bad_times
                && self.start_min() == 0
                && self.end_hour == 0
                && self.end_minute == 0)
    }

    /// Whether the group is enabled and a real slot.
    pub fn is_active(&self) -> bool {
        self.enable == 1 && !self.is_placeholder()
    }

    /// Whether the time ranges of two groups share a minute (ends are
    /// inclusive; groups recur daily and never cross midnight).
    pub fn overlaps(&self, other: &Group) -> bool {
        self.start_min() < other.end_min() && other.start_min() < self.end_min()
    }

    /// Why the cloud would refuse this group on write, if it would:
    /// unknown or `Invalid` mode, a missing field, times out of range or
    /// crossing midnight, `fdSoc` < 11, `minSocOnGrid` outside 10..=100 or
    /// above `fdSoc`, `fdPwr` outside 1..=`max_power_w`.
    pub fn write_problem(&self, max_power_w: i64) -> Option<String> {
        let mode = self.mode();
        let p = if mode.is_none() || mode == Some(WorkMode::Invalid) {
            format!("work mode {:?} cannot be written", self.work_mode)
        } else if self.incomplete {
            "a field is missing, not a number or out of range".to_owned()
        } else if !matches!(self.enable, 0 | 1)
            || !(0..=23).contains(&self.start_hour)
            || !(0..=23).contains(&self.end_hour)
            || !(0..=59).contains(&self.start_minute)
            || !(0..=59).contains(&self.end_minute)
            || self.end_min() <= self.start_min()
        {
            "its times are out of range".to_owned()
        } else if !(11..=100).contains(&self.fd_soc) {
            format!("fdSoc {} is outside 11..=100", self.fd_soc)
        } else if let Some(m) = self.min_soc_on_grid.filter(|m| !(10..=100).contains(m)) {
            format!("minSocOnGrid {m} is outside 10..=100")
        } else if self.min_soc_on_grid.is_none() {
            "minSocOnGrid is null".to_owned()
        } else if self.min_soc_on_grid.is_some_and(|m| m > self.fd_soc) {
            "minSocOnGrid is above fdSoc".to_owned()
        } else if !(1..=max_power_w).contains(&self.fd_pwr) {
            format!("fdPwr {} is outside 1..={max_power_w} W", self.fd_pwr)
        } else {
            return None;
        };
        Some(p)
    }

    /// `HH:MM` of the start.
    pub fn start_hhmm(&self) -> String {
        format!("{:02}:{:02}", self.start_hour, self.start_minute)
    }

    /// `HH:MM` of the end as on the wire (inclusive).
    pub fn end_hhmm(&self) -> String {
        format!("{:02}:{:02}", self.end_hour, self.end_minute)
    }

    /// `HH:MM` of the exclusive end (`24:00` for a group through 23:59),
    /// as users write windows.
    pub fn end_excl_hhmm(&self) -> String {
        let e = self.end_min();
        format!("{:02}:{:02}", e.div_euclid(60), e.rem_euclid(60))
    }
}

impl Serialize for Group {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_wire().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Group::from_wire(&v).ok_or_else(|| serde::de::Error::custom("a group is a JSON object"))
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{} {} enable={} minSocOnGrid={} fdSoc={} fdPwr={}",
            self.start_hhmm(),
            self.end_hhmm(),
            self.work_mode,
            self.enable,
            self.min_soc_on_grid
                .map_or_else(|| "null".to_owned(), |m| m.to_string()),
            self.fd_soc,
            self.fd_pwr
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// 0 = success.
    pub errno: i64,
    /// Human-readable message.
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub result: Value,
}

/// Reads a 0/1 or boolean JSON value leniently (the API is not consistent
/// about which it uses).
pub fn as_flag(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        Value::String(s) => match s.as_str() {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A `scheduler/get` answer: the groups and the per-device facts it
/// reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupsRead {
    /// The groups, placeholders included, in the order read.
    pub groups: Vec<Group>,
    /// List entries that were not groups at all (dropped).
    pub dropped: usize,
    /// `maxGroupCount`, when reported: the device's slot count.
    pub max_group_count: Option<i64>,
    /// The largest `properties.fdpwr.range.max` of any group, when
    /// reported: the device's `fdPwr` maximum.
    pub max_power_w: Option<i64>,
    /// Read from an answer (`false`: a stand-in for a read that failed).
    pub answered: bool,
}

/// The least `fdPwr` maximum believed: below it a reported value is taken
/// for a unit mix-up or garbage and ignored.
pub const MIN_PLAUSIBLE_MAX_POWER_W: i64 = 100;

fn fd_pwr_max(group: &Value) -> Option<i64> {
    let props = group.get("properties")?.as_object()?;
    let (_, fd) = props
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("fdpwr"))?;
    // Watts (`fdPwr` is written in watts): a maximum in any other unit
    // says nothing sure about what may be written, and is ignored.
    let watts = match fd.get("unit").and_then(Value::as_str) {
        None => true,
        Some(u) => u.trim().eq_ignore_ascii_case("w"),
    };
    let w = as_int(fd.get("range")?.get("max")?)?;
    (watts && (MIN_PLAUSIBLE_MAX_POWER_W..=1_000_000_000).contains(&w)).then_some(w)
}

/// Parses the group list out of a `scheduler/get` result: either
/// `{groups: [...]}` or a bare array; `null` (the mode was set in the app)
/// and a missing list read as no groups. `Err` names what is wrong.
pub fn parse_groups(result: &Value) -> Result<GroupsRead, String> {
    let empty = Vec::new();
    let list = match result {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("groups") {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => &empty,
            Some(_) => return Err("`groups` is not a list".to_owned()),
        },
        Value::Null => &empty,
        _ => return Err("result is neither an object nor a list".to_owned()),
    };
    let mut read = GroupsRead {
        max_group_count: result
            .get("maxGroupCount")
            .and_then(as_int)
            .filter(|n| *n > 0),
        // Some answers carry `properties` once, next to the groups.
        max_power_w: fd_pwr_max(result).filter(|m| *m > 0),
        answered: true,
        ..GroupsRead::default()
    };
    for v in list {
        if let Some(m) = fd_pwr_max(v).filter(|m| *m > 0) {
            read.max_power_w = Some(read.max_power_w.map_or(m, |x| x.max(m)));
        }
        if read.max_group_count.is_none() {
            read.max_group_count = v.get("maxGroupCount").and_then(as_int).filter(|n| *n > 0);
        }
        match Group::from_wire(v) {
            Some(g) => read.groups.push(g),
            None => read.dropped += 1,
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_separator_is_literal_backslash_r_backslash_n() {
        let s = signature_input("/p", "t", 1);
        assert_eq!(s, "/p\\r\\nt\\r\\n1");
        assert!(!s.contains('\r') && !s.contains('\n'));
    }

    #[test]
    fn reads_keep_every_field_but_the_read_only_ones() {
        let v = serde_json::json!({"maxGroupCount": 16, "groups": [{
            "enable": 1, "startHour": 1, "startMinute": 0, "endHour": 1, "endMinute": 59,
            "workMode": "SelfUse", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 100,
            "maxSoc": 95, "extraParam": {"x": 1},
            "id": "x", "properties": {"fdpwr": {"range": {"min": 0, "max": 5000}}}
        }]});
        let read = parse_groups(&v).unwrap();
        assert_eq!(read.max_group_count, Some(16));
        assert_eq!(read.max_power_w, Some(5000));
        let back = read.groups[0].to_wire();
        let o = back.as_object().unwrap();
        assert!(o.get("id").is_none() && o.get("properties").is_none());
        assert_eq!(o["maxSoc"], 95);
        assert_eq!(o["extraParam"]["x"], 1);
        assert_eq!(o.len(), GROUP_FIELDS.len() + 2);
        assert!(!read.groups[0].incomplete);
        // Inclusive end: 01:00-01:59 covers minutes 60..120.
        assert_eq!(
            (read.groups[0].start_min(), read.groups[0].end_min()),
            (60, 120)
        );
        assert_eq!(read.groups[0].end_excl_hhmm(), "02:00");
    }

    #[test]
    fn the_power_limit_is_read_where_the_answer_puts_it() {
        let top = serde_json::json!({"groups": [],
            "properties": {"fdPwr": {"range": {"min": 0, "max": 4600}}}});
        assert_eq!(parse_groups(&top).unwrap().max_power_w, Some(4600));
        // Any unit but watts: ignored (what would `fdPwr` be written in?).
        let kw = serde_json::json!({"groups": [{"enable": 0,
            "properties": {"fdpwr": {"unit": "kW", "range": {"max": 5.5}}}}]});
        assert_eq!(parse_groups(&kw).unwrap().max_power_w, None);
        let text = serde_json::json!({"groups": [{"enable": 0,
            "properties": {"fdpwr": {"unit": "W", "range": {"max": "8000"}}}}]});
        assert_eq!(parse_groups(&text).unwrap().max_power_w, Some(8000));
        // 10 "W" is no inverter's maximum: a unit mix-up, ignored.
        let tiny = serde_json::json!({"groups": [{"enable": 0,
            "properties": {"fdpwr": {"unit": "W", "range": {"max": 10}}}}]});
        assert_eq!(parse_groups(&tiny).unwrap().max_power_w, None);
        let none = serde_json::json!({"groups": [{"enable": 0, "properties": {}}]});
        assert_eq!(parse_groups(&none).unwrap().max_power_w, None);
        assert_eq!(parse_groups(&none).unwrap().max_group_count, None);
    }

    #[test]
    fn odd_slots_read_without_failing() {
        let v = serde_json::json!({"groups": [
            {"enable": 0, "startHour": 0, "startMinute": 0, "endHour": 0, "endMinute": 0,
             "workMode": "SelfUse", "minSocOnGrid": null, "fdSoc": 10, "fdPwr": 0},
            {"enable": 0, "workMode": "", "startHour": null},
            {"enable": 1, "startHour": "3", "startMinute": 0.0, "endHour": 4, "endMinute": 0,
             "workMode": "PeakShaving", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 100},
            null
        ]});
        let read = parse_groups(&v).unwrap();
        assert_eq!(read.dropped, 1);
        let g = &read.groups;
        assert!(g[0].is_placeholder() && g[0].min_soc_on_grid.is_none());
        assert!(g[1].is_placeholder() && g[1].incomplete);
        assert!(!g[2].is_placeholder() && g[2].start_hour == 3 && !g[2].incomplete);
        assert!(
            g[2].write_problem(6000).is_some(),
            "an unknown mode cannot be written"
        );
        assert_eq!(parse_groups(&Value::Null).unwrap().groups.len(), 0);
    }

    #[test]
    fn groups_meeting_at_a_minute_overlap() {
        let a = Group::new(true, (10, 0), (11, 0), "SelfUse", 10, 20, 100);
        let b = Group::new(true, (11, 0), (12, 0), "SelfUse", 10, 20, 100);
        let c = Group::new(true, (11, 1), (12, 0), "SelfUse", 10, 20, 100);
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&a));
    }

    #[test]
    fn write_problems_name_what_the_cloud_refuses() {
        let ok = Group::new(true, (10, 0), (10, 59), "ForceCharge", 10, 20, 100);
        assert_eq!(ok.write_problem(6000), None);
        let with = |f: &dyn Fn(&mut Group)| {
            let mut g = ok.clone();
            f(&mut g);
            g.write_problem(6000).expect("refused")
        };
        assert!(with(&|g| g.fd_soc = 10).contains("fdSoc 10"));
        assert!(with(&|g| g.fd_pwr = 0).contains("fdPwr 0"));
        assert!(with(&|g| g.fd_pwr = 6001).contains("fdPwr 6001"));
        assert!(with(&|g| g.min_soc_on_grid = Some(9)).contains("minSocOnGrid 9"));
        assert!(with(&|g| g.min_soc_on_grid = None).contains("null"));
        assert!(with(&|g| g.min_soc_on_grid = Some(30)).contains("above fdSoc"));
        assert!(with(&|g| g.work_mode = "Invalid".into()).contains("Invalid"));
        assert!(with(&|g| g.end_hour = 9).contains("times"));
    }
}
