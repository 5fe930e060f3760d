//! The FoxESS Open API on the wire: endpoint paths, the request
//! signature, the scheduler group and the `{errno, msg, result}` envelope.
//! Shared by the driver and the emulator so both speak the same dialect.

use std::fmt::{self, Write as _};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Reads the scheduler master flag: `{deviceSN}` → `{enable, support}`.
pub const PATH_GET_FLAG: &str = "/op/v1/device/scheduler/get/flag";
/// Sets the scheduler master flag: `{deviceSN, enable: 0|1}`.
pub const PATH_SET_FLAG: &str = "/op/v1/device/scheduler/set/flag";
/// Reads the groups: `{deviceSN}` → `{enable, groups}`.
pub const PATH_GET: &str = "/op/v1/device/scheduler/get";
/// Replaces the whole group list: `{deviceSN, groups}`.
pub const PATH_SET: &str = "/op/v1/device/scheduler/enable";

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

/// The nine fields a group has on write. Reads may carry more (`id`,
/// `properties`); deserialising into this type drops them, which is what
/// a write needs (the API rejects them). The mode stays a string so an
/// unknown mode from a newer firmware is preserved verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// 1 = enabled.
    pub enable: i64,
    /// Local start hour, 0..=23.
    pub start_hour: i64,
    /// Local start minute, 0..=59.
    pub start_minute: i64,
    /// Local end hour, 0..=23.
    pub end_hour: i64,
    /// Local end minute, 0..=59 (23:59 stands for midnight).
    pub end_minute: i64,
    /// The work mode's wire name.
    pub work_mode: String,
    /// Minimum state of charge on grid, percent.
    pub min_soc_on_grid: i64,
    /// Force-discharge (stop) state of charge, percent.
    pub fd_soc: i64,
    /// Force charge/discharge power, watts.
    pub fd_pwr: i64,
}

/// The field names a written group must have, and may only have.
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

impl Group {
    /// Minute of the day the group starts.
    pub fn start_min(&self) -> i64 {
        self.start_hour * 60 + self.start_minute
    }

    /// Minute of the day the group ends (exclusive; 23:59 = 1439).
    pub fn end_min(&self) -> i64 {
        self.end_hour * 60 + self.end_minute
    }

    /// The parsed mode, if known.
    pub fn mode(&self) -> Option<WorkMode> {
        WorkMode::parse(&self.work_mode)
    }

    /// Whether the group is an unused slot placeholder.
    pub fn is_placeholder(&self) -> bool {
        self.mode() == Some(WorkMode::Invalid)
    }

    /// Whether the group is enabled and a real slot.
    pub fn is_active(&self) -> bool {
        self.enable == 1 && !self.is_placeholder()
    }

    /// Whether the time ranges of two groups intersect (groups recur
    /// daily and never cross midnight, so plain interval arithmetic on
    /// minutes of the day is enough).
    pub fn overlaps(&self, other: &Group) -> bool {
        self.start_min() < other.end_min() && other.start_min() < self.end_min()
    }

    /// `HH:MM` of the start.
    pub fn start_hhmm(&self) -> String {
        format!("{:02}:{:02}", self.start_hour, self.start_minute)
    }

    /// `HH:MM` of the end.
    pub fn end_hhmm(&self) -> String {
        format!("{:02}:{:02}", self.end_hour, self.end_minute)
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
            self.min_soc_on_grid,
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

/// Parses the group list out of a `scheduler/get` result: either
/// `{groups: [...]}` or a bare array. `Err` names what is wrong.
pub fn parse_groups(result: &Value) -> Result<Vec<Group>, String> {
    let list = match result {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("groups") {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => return Ok(Vec::new()),
            Some(_) => return Err("`groups` is not a list".to_owned()),
        },
        Value::Null => return Ok(Vec::new()),
        _ => return Err("result is neither an object nor a list".to_owned()),
    };
    list.iter()
        .enumerate()
        .map(|(i, g)| {
            Group::deserialize(g).map_err(|e| format!("group #{i} has an unexpected shape: {e}"))
        })
        .collect()
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
    fn reads_drop_extra_fields() {
        let v = serde_json::json!({"groups": [{
            "enable": 1, "startHour": 1, "startMinute": 0, "endHour": 2, "endMinute": 0,
            "workMode": "SelfUse", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 100,
            "id": "x", "properties": {}
        }]});
        let g = parse_groups(&v).unwrap();
        let back = serde_json::to_value(&g[0]).unwrap();
        assert!(back.get("id").is_none() && back.get("properties").is_none());
        assert_eq!(back.as_object().unwrap().len(), GROUP_FIELDS.len());
    }
}
