//! Identifiers. They parse, so a value of these types is always valid.

use std::fmt;

/// The tenant that owns a resource. One default tenant until auth exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// The tenant every request belongs to until API keys exist.
    pub fn default_tenant() -> Self {
        Self("default".to_owned())
    }

    /// The id as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A tenant id read back from storage.
    pub fn from_stored(s: String) -> Self {
        Self(s)
    }
}

/// A device id: lower-case letters, digits and '-', 1..=63 characters,
/// starting and ending with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Parses a device id.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if s.is_empty() || s.len() > 63 {
            return Err("must be 1 to 63 characters");
        }
        if !s.chars().all(ok_char) {
            return Err("may contain only lower-case letters, digits and '-'");
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err("must start and end with a letter or digit");
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh server-generated id.
    pub fn generate() -> Self {
        Self(format!("dev-{}", uuid::Uuid::now_v7().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An action id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionId(uuid::Uuid);

impl ActionId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// Parses the hyphenated form.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        if s.len() != 36 {
            return Err("must be a UUID in hyphenated form");
        }
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| "must be a UUID in hyphenated form")
    }
}

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

#[cfg(test)]
impl ActionId {
    /// A fixed id, for tests.
    pub fn from_u128(n: u128) -> Self {
        Self(uuid::Uuid::from_u128(n))
    }

    /// The id as a number, for tests.
    pub fn as_u128(self) -> u128 {
        self.0.as_u128()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_parse_strictly() {
        assert!(DeviceId::parse("home-battery-1").is_ok());
        assert!(
            DeviceId::parse(&"x".repeat(63)).is_ok(),
            "63 characters are allowed"
        );
        for bad in ["", "-a", "a-", "A", "a_b", "a b", &"x".repeat(64), "ü"] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DeviceId::parse(DeviceId::generate().as_str()).is_ok());
    }

    #[test]
    fn action_ids_sort_by_creation_and_round_trip() {
        let a = ActionId::generate();
        let b = ActionId::generate();
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(ActionId::parse(&a.to_string()), Ok(a));
        assert!(ActionId::parse("not-a-uuid").is_err());
    }
}
