//! The scheduler core: identifiers, time, actions and their lifecycle, the
//! conflict rules and strategies, and the domain error. Pure: no gRPC, no
//! SQL. Everything here is testable with plain values and a manual clock.

pub mod action;
pub mod clock;
pub mod conflict;
pub mod device;
pub mod error;
pub mod ids;
pub mod lifecycle;
pub mod validate;

pub use action::*;
pub use clock::{Clock, ManualClock, SystemClock, Ts};
pub use device::{Device, Observed};
pub use error::{Conflict, ConflictKind, Error, FieldViolation, Reason};
pub use ids::{ActionId, DeviceId, TenantId};

/// An opaque etag: a stable 32-bit FNV-1a hash of the resource's identity
/// and its revision. Stable across builds (it is compared with etags clients
/// kept), unequal for different resources in practice.
pub fn etag(identity: &str, revision: i64) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in identity.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}-{revision}")
}

/// `s` cut to at most `max` bytes on a character boundary, ending in "…"
/// when cut. Everything the service repeats from elsewhere (an OEM's
/// answer, a driver's message) is bounded this way.
pub fn cap(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_fnv_1a_of_the_identity_and_the_revision() {
        // FNV-1a (32 bit) of "abc" is 0x1a47e90b; clients keep etags, so
        // the hash must never change.
        assert_eq!(etag("abc", 7), "1a47e90b-7");
        assert_eq!(etag("", 1), "811c9dc5-1");
        assert_ne!(etag("abd", 7), etag("abc", 7));
    }

    #[test]
    fn cap_cuts_on_a_character_boundary() {
        assert_eq!(cap("abc".into(), 3), "abc");
        let cut = cap("ééééé".into(), 6);
        assert!(cut.len() <= 6 && cut.ends_with('…'), "{cut}");
        assert_eq!(cap("abcdef".into(), 4), "a…");
    }
}
