//! What the operator lets drivers use: secrets and OEM endpoints.
//!
//! A device's settings come from API callers, who are not trusted with
//! the server's environment, files or network. So a setting can name only
//! what the operator put there on purpose:
//! - a secret (`api_key_ref`) is `env:SWITCHYARD_SECRET_<NAME>` (an
//!   environment variable with that prefix) or `file:<name>` (a plain file
//!   name inside the operator's secrets directory — a Kubernetes Secret
//!   mounted as a directory); nothing else resolves;
//! - an endpoint (`base_url`) must lie under the OEM's own cloud or a
//!   prefix the operator allowed (`--oem-url-allow`).
//!
//! Every refusal of a secret reference says the same thing, whether or not
//! such a variable or file exists, so settings cannot be used to probe the
//! server.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use crate::factory::ConfigError;

/// The prefix every environment variable named by `env:` must carry.
pub const SECRET_ENV_PREFIX: &str = "SWITCHYARD_SECRET_";

/// The one answer to a secret reference that cannot be used.
pub const SECRET_REF_REFUSED: &str = "must name a secret the operator provided: \
     env:SWITCHYARD_SECRET_<NAME> or file:<name> in the secrets directory";

/// The operator's configuration that bounds what device settings may name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorPolicy {
    /// Where `file:` secrets live; `None` refuses every `file:` reference.
    pub secrets_dir: Option<PathBuf>,
    /// Endpoint prefixes allowed besides each driver's own cloud, e.g.
    /// `http://127.0.0.1:8099` for an emulator. `PREFIX=REF` pairs the
    /// prefix with one secret reference: an endpoint that has pairings
    /// receives only the secrets paired with it; a bare prefix receives
    /// any (see [`OperatorPolicy::check_secret_for`]).
    pub url_allow: Vec<String>,
}

/// A reference to a secret that the policy allows.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable whose name starts with [`SECRET_ENV_PREFIX`].
    Env(String),
    /// A file name and the secrets directory it lives in.
    File { dir: PathBuf, name: String },
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SecretRef {
    /// The reference as the device stores it (never the secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File { name, .. } => write!(f, "file:{name}"),
        }
    }
}

/// A secret's value. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from its text (tests, emulators).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `s` with every occurrence of the secret, and of its JSON-escaped
    /// form, replaced (an OEM may echo request headers back).
    pub fn redact(&self, s: &str) -> String {
        if self.0.is_empty() {
            return s.to_owned();
        }
        let mut out = s.replace(&self.0, "<redacted>");
        let escaped = serde_json::to_string(&self.0).unwrap_or_default();
        let escaped = escaped.trim_matches('"');
        if escaped != self.0 && !escaped.is_empty() {
            out = out.replace(escaped, "<redacted>");
        }
        out
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn refused(key: &str) -> ConfigError {
    ConfigError::InvalidSetting {
        key: key.to_owned(),
        reason: SECRET_REF_REFUSED.to_owned(),
    }
}

impl OperatorPolicy {
    /// Parses a secret reference in setting `key` and checks it against
    /// the policy. Does not read the secret.
    pub fn secret_ref(&self, key: &str, s: &str) -> Result<SecretRef, ConfigError> {
        if let Some(name) = s.strip_prefix("env:") {
            let suffix = name.strip_prefix(SECRET_ENV_PREFIX).unwrap_or_default();
            let ok = !suffix.is_empty()
                && name.len() <= 128
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            return if ok {
                Ok(SecretRef::Env(name.to_owned()))
            } else {
                Err(refused(key))
            };
        }
        if let Some(name) = s.strip_prefix("file:") {
            // A plain name: no directories, no parent, no hidden entries
            // (a mounted Secret keeps its bookkeeping in `..data`).
            let plain = !name.is_empty()
                && name.len() <= 255
                && !name.starts_with('.')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            return match (&self.secrets_dir, plain) {
                (Some(dir), true) => Ok(SecretRef::File {
                    dir: dir.clone(),
                    name: name.to_owned(),
                }),
                _ => Err(refused(key)),
            };
        }
        Err(refused(key))
    }

    /// Reads the secret `r` names (setting `key`). Every failure is the
    /// same refusal: it does not tell whether the secret exists.
    pub fn resolve(&self, key: &str, r: &SecretRef) -> Result<Secret, ConfigError> {
        let raw = match r {
            SecretRef::Env(name) => std::env::var(name).map_err(|_| refused(key))?,
            SecretRef::File { dir, name } => read_inside(dir, name).ok_or_else(|| refused(key))?,
        };
        let value = raw.trim();
        // Header values must be visible ASCII.
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(refused(key));
        }
        Ok(Secret(value.to_owned()))
    }

    /// The allowed prefixes and what each is paired with.
    fn entries(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.url_allow.iter().map(|e| match e.split_once('=') {
            Some((prefix, secret)) => (prefix, Some(secret)),
            None => (e.as_str(), None),
        })
    }

    /// Checks that `url` (normalised by [`canonical_url`]) lies under
    /// `defaults` (the OEM's cloud) or an operator prefix: same scheme,
    /// host and port, and a path that is the prefix's or below it.
    pub fn check_url(&self, key: &str, url: &str, defaults: &[&str]) -> Result<(), ConfigError> {
        let allowed = defaults
            .iter()
            .copied()
            .chain(self.entries().map(|(p, _)| p))
            .any(|prefix| url_under(url, prefix));
        if allowed {
            return Ok(());
        }
        // The operator's own prefixes are not listed: callers are not told
        // about the server's network.
        Err(ConfigError::InvalidSetting {
            key: key.to_owned(),
            reason: format!(
                "is not an endpoint this server may call: {} or a prefix its operator allows",
                defaults.join(", ")
            ),
        })
    }

    /// Checks that the secret `secret` (a reference, as the device names
    /// it) may be sent to `url`: always to the OEM's own cloud; to an
    /// operator prefix only if no pairing of that prefix excludes it.
    /// Without this a caller could pair any operator secret with any
    /// allowed endpoint, e.g. one it controls.
    pub fn check_secret_for(
        &self,
        key: &str,
        url: &str,
        secret: &str,
        defaults: &[&str],
    ) -> Result<(), ConfigError> {
        if defaults.iter().any(|d| url_under(url, d)) {
            return Ok(());
        }
        let covering: Vec<Option<&str>> = self
            .entries()
            .filter(|(p, _)| url_under(url, p))
            .map(|(_, s)| s)
            .collect();
        let paired = covering.iter().any(Option::is_some);
        let ok = if paired {
            covering.contains(&Some(secret))
        } else {
            !covering.is_empty()
        };
        if ok {
            Ok(())
        } else {
            Err(ConfigError::InvalidSetting {
                key: key.to_owned(),
                reason: "is not a secret the operator lets this server send to that base_url"
                    .to_owned(),
            })
        }
    }

    /// Checks an operator's `--oem-url-allow` entry: `PREFIX` or
    /// `PREFIX=REF`, the prefix an http(s) URL prefix in canonical form.
    pub fn check_entry(entry: &str) -> Result<(), String> {
        let (prefix, secret) = match entry.split_once('=') {
            Some((p, s)) => (p, Some(s)),
            None => (entry, None),
        };
        if canonical_url(prefix).is_none() {
            return Err(format!(
                "{prefix:?} must be an http:// or https:// URL prefix, scheme://host[:port][/path], \
                 without credentials, query, fragment, dot segments or percent-escapes"
            ));
        }
        if let Some(s) = secret
            && !(s.starts_with("env:") || s.starts_with("file:"))
        {
            return Err(format!(
                "{s:?} must be a secret reference, env:SWITCHYARD_SECRET_<NAME> or file:<name>"
            ));
        }
        Ok(())
    }
}

/// Reads `dir/name` if, once every link is followed, it is a regular file
/// inside `dir`.
fn read_inside(dir: &Path, name: &str) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let path = dir.join(name).canonicalize().ok()?;
    if !path.starts_with(&dir) || !path.is_file() {
        return None;
    }
    // A secret is small; anything big is not one.
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > 64 * 1024 {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

struct Parts {
    scheme: String,
    host: String,
    port: u16,
    path: String,
}

/// Splits an http(s) URL into its parts; `None` for anything but
/// scheme://host[:port][/path] whose path is made of unreserved characters
/// and '/' only (no percent-escapes, no dot segments, no empty segments):
/// such a path cannot climb out of a prefix at a server or proxy that
/// normalises it.
fn parts(url: &str) -> Option<Parts> {
    let uri: hyper::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = match (uri.port_u16(), scheme.as_str()) {
        (Some(p), "http" | "https") => p,
        (None, "https") => 443,
        (None, "http") => 80,
        _ => return None,
    };
    let authority = uri.authority()?.as_str();
    if authority.contains('@') || uri.query().is_some() || url.contains('#') {
        return None;
    }
    let host = uri.host()?.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host).to_owned();
    if host.is_empty() {
        return None;
    }
    let path = uri.path().trim_end_matches('/');
    let unreserved =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '/');
    if !path.chars().all(unreserved)
        || path
            .split('/')
            .skip(1)
            .any(|seg| seg.is_empty() || seg.starts_with(".."))
        || path.split('/').any(|seg| seg == ".")
    {
        return None;
    }
    Some(Parts {
        scheme,
        host,
        port,
        path: path.to_owned(),
    })
}

/// The one spelling of an http(s) URL: lower-case scheme and host, no
/// default port, no trailing '/' (so spellings of one endpoint are one
/// OEM account); `None` when [`parts`] refuses it.
pub fn canonical_url(url: &str) -> Option<String> {
    let p = parts(url.trim())?;
    let default = if p.scheme == "https" { 443 } else { 80 };
    let host = if p.host.contains(':') {
        format!("[{}]", p.host.trim_matches(['[', ']']))
    } else {
        p.host
    };
    let port = if p.port == default {
        String::new()
    } else {
        format!(":{}", p.port)
    };
    Some(format!("{}://{host}{port}{}", p.scheme, p.path))
}

/// Whether `url` is `prefix` or below it, compared part by part (so
/// `https://cloud.example` does not admit `https://cloud.example.evil`).
pub fn url_under(url: &str, prefix: &str) -> bool {
    let (Some(u), Some(p)) = (parts(url), parts(prefix.trim_end_matches('/'))) else {
        return false;
    };
    u.scheme == p.scheme
        && u.host == p.host
        && u.port == p.port
        && (p.path.is_empty()
            || u.path == p.path
            || u.path
                .strip_prefix(&p.path)
                .is_some_and(|rest| rest.starts_with('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: Option<&Path>) -> OperatorPolicy {
        OperatorPolicy {
            secrets_dir: dir.map(Path::to_path_buf),
            url_allow: vec!["http://127.0.0.1:8099".into()],
        }
    }

    #[test]
    fn only_prefixed_variables_and_plain_names_in_the_secrets_dir_are_references() {
        let dir = tempfile::tempdir().expect("dir");
        let p = policy(Some(dir.path()));
        assert!(p.secret_ref("k", "env:SWITCHYARD_SECRET_FOX").is_ok());
        assert!(p.secret_ref("k", "file:foxess-key").is_ok());
        for bad in [
            "env:DATABASE_PASSWORD",
            "env:SWITCHYARD_SECRET_",
            "env:SWITCHYARD_SECRET_A-B",
            "env:HOME",
            "file:/etc/passwd",
            "file:../etc/passwd",
            "file:a/b",
            "file:..data",
            "file:.hidden",
            "file:",
            "the-key-itself",
        ] {
            let e = p.secret_ref("api_key_ref", bad).expect_err(bad);
            assert_eq!(
                e,
                refused("api_key_ref"),
                "{bad:?} is refused with the one message"
            );
        }
        // No secrets directory: no file reference at all.
        assert!(policy(None).secret_ref("k", "file:foxess-key").is_err());
    }

    #[test]
    fn a_missing_secret_and_a_forbidden_one_are_refused_alike() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("key"), "s3cret\n").expect("write");
        let outside = tempfile::tempdir().expect("dir");
        std::fs::write(outside.path().join("other"), "x").expect("write");
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.path().join("other"), dir.path().join("link"))
            .expect("link");
        let p = policy(Some(dir.path()));
        let key = p.secret_ref("k", "file:key").expect("ref");
        assert_eq!(p.resolve("k", &key).expect("read").expose(), "s3cret");
        let missing = p.secret_ref("k", "file:nope").expect("ref");
        assert_eq!(p.resolve("k", &missing), Err(refused("k")));
        // A link that leads out of the directory is not followed.
        #[cfg(unix)]
        {
            let link = p.secret_ref("k", "file:link").expect("ref");
            assert_eq!(p.resolve("k", &link), Err(refused("k")));
        }
        let unset = p
            .secret_ref("k", "env:SWITCHYARD_SECRET_UNSET_IN_TESTS")
            .expect("ref");
        assert_eq!(p.resolve("k", &unset), Err(refused("k")));
    }

    #[test]
    fn urls_must_lie_under_an_allowed_prefix_part_by_part() {
        let cloud = ["https://www.foxesscloud.com"];
        let p = policy(None);
        for ok in [
            "https://www.foxesscloud.com",
            "https://WWW.FOXESSCLOUD.COM",
            "https://www.foxesscloud.com:443/op",
            "http://127.0.0.1:8099",
            "http://127.0.0.1:8099/v1",
        ] {
            assert!(p.check_url("base_url", ok, &cloud).is_ok(), "{ok}");
        }
        for bad in [
            "https://www.foxesscloud.com.evil.example",
            "http://www.foxesscloud.com",
            "https://www.foxesscloud.com:8443",
            "http://127.0.0.1:80990",
            "http://127.0.0.1",
            "http://localhost:8099",
            "http://169.254.169.254/latest",
        ] {
            assert!(p.check_url("base_url", bad, &cloud).is_err(), "{bad}");
        }
        let scoped = OperatorPolicy {
            secrets_dir: None,
            url_allow: vec!["https://gw.example/fox/".into()],
        };
        assert!(scoped.check_url("b", "https://gw.example/fox", &[]).is_ok());
        assert!(
            scoped
                .check_url("b", "https://gw.example/fox/eu", &[])
                .is_ok()
        );
        assert!(
            scoped
                .check_url("b", "https://gw.example/foxy", &[])
                .is_err()
        );
        assert!(scoped.check_url("b", "https://gw.example", &[]).is_err());
    }

    #[test]
    fn spellings_of_one_endpoint_are_one_canonical_url() {
        for same in [
            "https://www.foxesscloud.com",
            "HTTPS://WWW.FoxessCloud.COM/",
            "https://www.foxesscloud.com:443",
            "https://www.foxesscloud.com.",
        ] {
            assert_eq!(
                canonical_url(same).as_deref(),
                Some("https://www.foxesscloud.com"),
                "{same}"
            );
        }
        assert_eq!(
            canonical_url("http://127.0.0.1:8099/v1/").as_deref(),
            Some("http://127.0.0.1:8099/v1")
        );
        assert_eq!(
            canonical_url("http://[::1]:80").as_deref(),
            Some("http://[::1]")
        );
        for bad in ["ftp://x", "https://", "https://a/%41", "https://a/b/../c"] {
            assert_eq!(canonical_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_paired_endpoint_receives_only_its_own_secrets() {
        let cloud = ["https://www.foxesscloud.com"];
        let p = OperatorPolicy {
            secrets_dir: None,
            url_allow: vec![
                "http://127.0.0.1:8099=env:SWITCHYARD_SECRET_DEMO".into(),
                "http://127.0.0.1:8098".into(),
            ],
        };
        let ok = |url: &str, s: &str| p.check_secret_for("k", url, s, &cloud).is_ok();
        // The OEM's own cloud takes every secret.
        assert!(ok(
            "https://www.foxesscloud.com",
            "env:SWITCHYARD_SECRET_PROD"
        ));
        // A paired prefix takes only its own.
        assert!(ok("http://127.0.0.1:8099", "env:SWITCHYARD_SECRET_DEMO"));
        assert!(ok("http://127.0.0.1:8099/v1", "env:SWITCHYARD_SECRET_DEMO"));
        assert!(!ok("http://127.0.0.1:8099", "env:SWITCHYARD_SECRET_PROD"));
        assert!(!ok("http://127.0.0.1:8099", "file:prod"));
        // A bare prefix takes any; an endpoint not allowed takes none.
        assert!(ok("http://127.0.0.1:8098", "env:SWITCHYARD_SECRET_PROD"));
        assert!(!ok("http://127.0.0.1:8097", "env:SWITCHYARD_SECRET_DEMO"));
        // The pairing also allows the endpoint itself.
        assert!(p.check_url("b", "http://127.0.0.1:8099", &cloud).is_ok());
        assert!(
            OperatorPolicy::check_entry("http://127.0.0.1:8099=env:SWITCHYARD_SECRET_DEMO").is_ok()
        );
        assert!(OperatorPolicy::check_entry("http://127.0.0.1:8099=DEMO").is_err());
        assert!(OperatorPolicy::check_entry("http://127.0.0.1:8099/../x").is_err());
    }

    #[test]
    fn redaction_covers_the_plain_and_the_json_escaped_secret() {
        let s = Secret::new(r#"a"b\c"#);
        let echoed = format!("msg {} and {}", s.expose(), r#"a\"b\\c"#);
        let out = s.redact(&echoed);
        assert!(
            !out.contains(s.expose()) && !out.contains(r#"a\"b\\c"#),
            "{out}"
        );
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }
}
