//! Time. Instants are nanoseconds since the Unix epoch (UTC) in an `i64`,
//! exact for protobuf timestamps until the year 2262. All "now" comes from a
//! [`Clock`] so tests can drive time.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

/// An instant, in nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ts(pub i64);

impl Ts {
    /// Nanoseconds in one second.
    pub const SECOND: i64 = 1_000_000_000;

    /// From whole seconds and nanoseconds, as in a protobuf Timestamp.
    /// `None` when out of the representable range.
    pub fn from_parts(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        seconds
            .checked_mul(Self::SECOND)?
            .checked_add(i64::from(nanos))
            .map(Ts)
    }

    /// Seconds and nanoseconds, as in a protobuf Timestamp.
    pub fn parts(self) -> (i64, i32) {
        let secs = self.0.div_euclid(Self::SECOND);
        let nanos = self.0.rem_euclid(Self::SECOND) as i32;
        (secs, nanos)
    }

    /// `self + nanos`, saturating.
    pub fn plus_nanos(self, nanos: i64) -> Self {
        Ts(self.0.saturating_add(nanos))
    }

    /// As a jiff timestamp (the epoch if out of jiff's range, which no
    /// stored time is).
    pub fn to_jiff(self) -> jiff::Timestamp {
        jiff::Timestamp::from_nanosecond(i128::from(self.0)).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// RFC 3339 rendering, for messages.
    pub fn rfc3339(self) -> String {
        match jiff::Timestamp::from_nanosecond(i128::from(self.0)) {
            Ok(t) => t.to_string(),
            Err(_) => format!("{}ns", self.0),
        }
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Ts;
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Ts {
        let ns = jiff::Timestamp::now().as_nanosecond();
        Ts(i64::try_from(ns).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to. Cloning shares the time.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn new(at: Ts) -> Self {
        Self(Arc::new(AtomicI64::new(at.0)))
    }

    /// Moves the clock forward by `nanos`.
    pub fn advance(&self, nanos: i64) {
        self.0.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, at: Ts) {
        self.0.store(at.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Ts {
        Ts(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn instants_render_as_rfc_3339_in_utc() {
        assert_eq!(Ts(0).rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Ts(1_893_456_000 * Ts::SECOND + 500_000_000).rfc3339(),
            "2030-01-01T00:00:00.5Z"
        );
    }

    use super::*;

    #[test]
    fn parts_round_trip_including_before_epoch() {
        for ts in [0, 1, -1, 1_700_000_000_123_456_789, -1_500_000_001] {
            let (s, n) = Ts(ts).parts();
            assert_eq!(Ts::from_parts(s, n), Some(Ts(ts)));
        }
    }

    #[test]
    fn out_of_range_parts_are_refused() {
        assert_eq!(Ts::from_parts(i64::MAX, 0), None);
        assert_eq!(Ts::from_parts(0, -1), None);
        assert_eq!(Ts::from_parts(0, 1_000_000_000), None);
    }
}
