//! The device settings of the `foxess` driver (a public contract) and the
//! API-key reference they point at.

use std::{collections::BTreeMap, fmt, time::Duration};

use crate::registry::ConfigError;

/// Every settings key the driver knows.
pub const KNOWN: &[&str] = &[
    "base_url",
    "api_key_ref",
    "max_slots",
    "max_power_w",
    "min_soc_on_grid",
    "fd_soc",
    "min_write_interval_ms",
    "request_timeout_ms",
];

/// Where the API key lives. The reference is stored on the device; the key
/// itself only ever lives in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRef {
    /// `env:NAME`: an environment variable of the server.
    Env(String),
    /// `file:/path`: a file readable by the server (trailing whitespace
    /// trimmed).
    File(String),
}

impl KeyRef {
    /// Parses `env:NAME` or `file:/path`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        if let Some(name) = s.strip_prefix("env:") {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if ok {
                return Ok(KeyRef::Env(name.to_owned()));
            }
            return Err(invalid(
                "api_key_ref",
                "env: must be followed by an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.starts_with('/') && path.len() > 1 {
                return Ok(KeyRef::File(path.to_owned()));
            }
            return Err(invalid(
                "api_key_ref",
                "file: must be followed by an absolute path",
            ));
        }
        // Most likely someone pasted the key itself here: say so without
        // repeating it.
        Err(invalid(
            "api_key_ref",
            "must be a reference to the key, env:VAR_NAME or file:/path (never the key itself)",
        ))
    }

    /// Reads the key. Errors never contain the key (nor the file's
    /// contents).
    pub fn resolve(&self) -> Result<ApiKey, ConfigError> {
        let raw = match self {
            KeyRef::Env(name) => std::env::var(name).map_err(|_| {
                invalid(
                    "api_key_ref",
                    "the referenced environment variable is not set (or not UTF-8) on the server",
                )
            })?,
            KeyRef::File(path) => std::fs::read_to_string(path).map_err(|_| {
                invalid(
                    "api_key_ref",
                    "the referenced file cannot be read as UTF-8 by the server",
                )
            })?,
        };
        let key = raw.trim();
        if key.is_empty() {
            return Err(invalid("api_key_ref", "the referenced key is empty"));
        }
        // Header values must be visible ASCII; refuse anything else here
        // rather than failing on every request.
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "api_key_ref",
                "the referenced key contains characters not allowed in an HTTP header",
            ));
        }
        Ok(ApiKey(key.to_owned()))
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Env(n) => write!(f, "env:{n}"),
            KeyRef::File(p) => write!(f, "file:{p}"),
        }
    }
}

/// The API key. Its `Debug` never shows it; only the request code reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A key from its text (tests, the emulator).
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the `token` header and the signature only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces every occurrence of the key in `s` (an OEM message might
    /// echo request headers).
    pub(crate) fn redact(&self, s: &str) -> String {
        if self.0.is_empty() {
            s.to_owned()
        } else {
            s.replace(&self.0, "<redacted>")
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Parsed settings of a FoxESS device.
#[derive(Clone, Debug, PartialEq)]
pub struct FoxessSettings {
    /// The Open API base, without a trailing `/`.
    pub base_url: String,
    /// Where the key lives.
    pub api_key_ref: KeyRef,
    /// Native slots (groups) of the inverter.
    pub max_slots: u32,
    /// The inverter's maximum charge/discharge power, W.
    pub max_power_w: u32,
    /// `minSocOnGrid` of every group switchyard writes (DISCHARGE's
    /// `reserve_soc` overrides it).
    pub min_soc_on_grid: u32,
    /// `fdSoc` of a DISCHARGE without `target_soc`, and of the non-forced
    /// modes (where the inverter ignores it but the API validates it).
    pub fd_soc: u32,
    /// Spacing this process keeps between two writes to the device.
    pub min_write_interval: Duration,
    /// Timeout of one HTTP request (connect + answer).
    pub request_timeout: Duration,
}

impl FoxessSettings {
    /// Parses and validates the settings. Errors never echo values.
    pub fn parse(s: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        if let Some(key) = s.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ConfigError::UnknownSetting {
                key: key.clone(),
                known: KNOWN.join(", "),
            });
        }
        let base_url = parse_base_url(
            s.get("base_url")
                .ok_or_else(|| invalid("base_url", "is required (the Open API's http(s) URL)"))?,
        )?;
        let api_key_ref = KeyRef::parse(s.get("api_key_ref").ok_or_else(|| {
            invalid(
                "api_key_ref",
                "is required (env:VAR_NAME or file:/path holding the API key)",
            )
        })?)?;
        let min_soc_on_grid = int(s, "min_soc_on_grid", 10, 10, 100)?;
        let fd_soc = int(s, "fd_soc", 20, 11, 100)?;
        if min_soc_on_grid > fd_soc {
            return Err(invalid(
                "min_soc_on_grid",
                "must not be above fd_soc (FoxESS requires minSocOnGrid <= fdSoc)",
            ));
        }
        Ok(Self {
            base_url,
            api_key_ref,
            max_slots: int(s, "max_slots", 8, 1, 96)?,
            max_power_w: int(s, "max_power_w", 6000, 1, 100_000)?,
            min_soc_on_grid,
            fd_soc,
            min_write_interval: Duration::from_millis(
                int(s, "min_write_interval_ms", 5000, 0, 600_000)?.into(),
            ),
            request_timeout: Duration::from_millis(
                int(s, "request_timeout_ms", 15_000, 100, 120_000)?.into(),
            ),
        })
    }
}

fn parse_base_url(raw: &str) -> Result<String, ConfigError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    let Some(rest) = rest else {
        return Err(invalid("base_url", "must start with http:// or https://"));
    };
    // Credentials in the URL would end up in account names and logs.
    if rest.is_empty() || rest.contains('@') || rest.contains('?') || rest.contains('#') {
        return Err(invalid(
            "base_url",
            "must be scheme://host[:port][/prefix], without credentials, query or fragment",
        ));
    }
    match trimmed.parse::<hyper::Uri>() {
        Ok(u) if u.host().is_some() => Ok(trimmed.to_owned()),
        _ => Err(invalid("base_url", "is not a valid URL")),
    }
}

fn invalid(key: &str, reason: &str) -> ConfigError {
    ConfigError::InvalidSetting {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

fn int(
    s: &BTreeMap<String, String>,
    key: &str,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, ConfigError> {
    let Some(raw) = s.get(key) else {
        return Ok(default);
    };
    match raw.trim().parse::<u32>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(invalid(
            key,
            &format!("must be a whole number from {min} to {max}"),
        )),
    }
}
