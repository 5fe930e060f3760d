//! The device settings of the `foxess` driver (a public contract). The
//! API key and the endpoint are only what the operator allows
//! ([`OperatorPolicy`]).

use std::{collections::BTreeMap, time::Duration};

use crate::{
    factory::{ConfigError, ConfigErrors},
    operator::{OperatorPolicy, SecretRef},
};

/// The FoxESS Open API cloud: the one endpoint allowed without operator
/// configuration.
pub const FOXESS_CLOUD: &str = "https://www.foxesscloud.com";

/// Every settings key the driver knows.
pub const KNOWN: &[&str] = &[
    "base_url",
    "api_key_ref",
    "max_slots",
    "max_power_w",
    "min_soc_on_grid",
    "fd_soc",
    "min_write_interval_ms",
    "min_query_interval_ms",
    "min_update_interval_ms",
    "request_timeout_ms",
];

/// Parsed settings of a FoxESS device.
#[derive(Clone, Debug, PartialEq)]
pub struct FoxessSettings {
    /// The Open API base, without a trailing `/`.
    pub base_url: String,
    /// Where the key lives.
    pub api_key_ref: SecretRef,
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
    /// Spacing between two calls to one query (read) path of the account:
    /// the cloud allows about one a second.
    pub min_query_interval: Duration,
    /// Spacing between two calls to one update (write) path of the
    /// account: the cloud allows about one every 2 s.
    pub min_update_interval: Duration,
    /// Timeout of one HTTP request (connect + answer).
    pub request_timeout: Duration,
}

impl FoxessSettings {
    /// Parses and validates the settings against the operator's policy;
    /// every bad setting is reported. Errors never echo values.
    pub fn parse(
        s: &BTreeMap<String, String>,
        policy: &OperatorPolicy,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors = ConfigErrors::unknown_keys(s, KNOWN);
        let base_url = errors.take(
            s.get("base_url")
                .ok_or_else(|| invalid("base_url", "is required (the Open API's https URL)"))
                .and_then(|raw| parse_base_url(raw))
                .and_then(|url| {
                    policy
                        .check_url("base_url", &url, &[FOXESS_CLOUD])
                        .map(|()| url)
                }),
        );
        let api_key_ref = errors.take(
            s.get("api_key_ref")
                .ok_or_else(|| {
                    invalid(
                        "api_key_ref",
                        "is required (env:SWITCHYARD_SECRET_<NAME> or file:<name> naming the API key)",
                    )
                })
                .and_then(|r| policy.secret_ref("api_key_ref", r)),
        );
        // A secret goes only where the operator lets it go.
        if let (Some(url), Some(_), Some(raw)) = (&base_url, &api_key_ref, s.get("api_key_ref")) {
            errors.take(policy.check_secret_for("api_key_ref", url, raw, &[FOXESS_CLOUD]));
        }
        let min_soc_on_grid = errors.take(int(s, "min_soc_on_grid", 10, 10, 100));
        let fd_soc = errors.take(int(s, "fd_soc", 20, 11, 100));
        let max_slots = errors.take(int(s, "max_slots", 8, 1, 96));
        let max_power_w = errors.take(int(s, "max_power_w", 6000, 1, 100_000));
        let write_ms = errors.take(int(s, "min_write_interval_ms", 5000, 0, 600_000));
        let query_ms = errors.take(int(s, "min_query_interval_ms", 1000, 0, 60_000));
        let update_ms = errors.take(int(s, "min_update_interval_ms", 2000, 0, 60_000));
        let timeout_ms = errors.take(int(s, "request_timeout_ms", 15_000, 100, 120_000));
        if let (Some(m), Some(f)) = (min_soc_on_grid, fd_soc)
            && m > f
        {
            errors.0.push(invalid(
                "min_soc_on_grid",
                "must not be above fd_soc (FoxESS requires minSocOnGrid <= fdSoc)",
            ));
        }
        match (
            base_url,
            api_key_ref,
            min_soc_on_grid,
            fd_soc,
            max_slots,
            max_power_w,
            write_ms,
            timeout_ms,
            query_ms,
            update_ms,
        ) {
            (
                Some(base_url),
                Some(api_key_ref),
                Some(min_soc_on_grid),
                Some(fd_soc),
                Some(max_slots),
                Some(max_power_w),
                Some(write_ms),
                Some(timeout_ms),
                Some(query_ms),
                Some(update_ms),
            ) if errors.0.is_empty() => Ok(Self {
                base_url,
                api_key_ref,
                max_slots,
                max_power_w,
                min_soc_on_grid,
                fd_soc,
                min_write_interval: Duration::from_millis(write_ms.into()),
                min_query_interval: Duration::from_millis(query_ms.into()),
                min_update_interval: Duration::from_millis(update_ms.into()),
                request_timeout: Duration::from_millis(timeout_ms.into()),
            }),
            _ => Err(errors.0),
        }
    }
}

/// The base URL in its one spelling (so spellings of one endpoint share
/// one OEM account and rate budget).
fn parse_base_url(raw: &str) -> Result<String, ConfigError> {
    crate::operator::canonical_url(raw).ok_or_else(|| {
        invalid(
            "base_url",
            "must be an http:// or https:// URL, scheme://host[:port][/prefix], without \
             credentials, query, fragment, dot segments or percent-escapes",
        )
    })
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
