//! The domain error: every failure a request can meet, closed. The API
//! layer maps it to a gRPC status in exactly one place.

use super::{ActionId, ActionState, Command, Strategy, Ts};

/// Why one request field is bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A required field is missing.
    MissingField,
    /// A field is malformed or too long.
    InvalidField,
    /// end not after start, or a malformed timestamp.
    InvalidWindow,
    /// start in the past.
    StartInPast,
    /// start beyond the horizon.
    StartBeyondHorizon,
    /// Command not supported by the device.
    UnsupportedCommand,
    /// Parameter out of bounds.
    ParameterOutOfRange,
    /// Parameter in a unit the command does not accept.
    UnsupportedUnit,
    /// Parameter the command does not take.
    UnsupportedParameter,
    /// Timing shape the command does not accept.
    UnsupportedTiming,
    /// No such driver.
    UnknownDriver,
    /// Settings the driver refuses.
    InvalidSettings,
    /// A page token not issued for this listing.
    InvalidPageToken,
}

/// One bad field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `action.power.unit`.
    pub field: String,
    pub reason: Reason,
    /// Human-readable explanation (never echoes secret values).
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, reason: Reason, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason,
            description: description.into(),
        }
    }
}

/// Which collision rule refused a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// Collision and no strategy.
    ActionConflict,
    /// A colliding action is in flight and the strategy cannot cancel it.
    InFlight,
    /// QUEUE_AFTER against an open-ended action.
    OpenEnded,
}

/// One colliding action, as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collider {
    pub id: ActionId,
    pub state: ActionState,
    pub command: Command,
    pub channel: String,
    pub start: Ts,
    /// Its end, if any.
    pub end: Option<Ts>,
}

/// How many ids, colliders, rows or violations one error lists. The rest
/// are counted, not listed: an error must stay well inside the 8 KiB of
/// metadata that gRPC clients accept by default (docs/errors.md).
pub const MAX_LISTED: usize = 8;

/// A refused push, with everything a client needs to resolve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Which rule refused it.
    pub kind: ConflictKind,
    pub device_id: String,
    pub channel: String,
    pub requested_start: Ts,
    pub requested_end: Option<Ts>,
    /// Every colliding action, by start.
    pub colliders: Vec<Collider>,
    /// Strategies that would resolve this collision.
    pub strategies: Vec<Strategy>,
    /// Colliders already with the OEM.
    pub in_flight: Vec<ActionId>,
    /// For OpenEnded: the open-ended actions in the way.
    pub open_ended: Vec<ActionId>,
    /// Set when every collider that blocks this push is only settling (a
    /// cancelled action finishing its revert, an open-ended action being
    /// applied): the same push will pass once they have, so retrying after
    /// this many nanoseconds is useful. A transitional state is not a
    /// conflict to resolve.
    pub retry_after_nanos: Option<i64>,
}

/// Every way a request can fail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// One or more bad fields.
    #[error("invalid request: {}", invalid_message(.0))]
    Invalid(Vec<FieldViolation>),
    /// No such device.
    #[error("device {device_id:?} not found")]
    DeviceNotFound {
        /// The id asked for.
        device_id: String,
    },
    /// No such action on the device.
    #[error("action {action_id:?} not found on device {device_id:?}")]
    ActionNotFound {
        device_id: String,
        /// The action asked for.
        action_id: String,
    },
    /// Device id taken.
    #[error("device {device_id:?} already exists")]
    DeviceAlreadyExists { device_id: String },
    /// Device has holding actions.
    #[error("device {device_id:?} has actions that hold a channel: {}", join(.action_ids))]
    DeviceHasActiveActions {
        device_id: String,
        action_ids: Vec<ActionId>,
        /// Those in flight (not cancellable even with force).
        in_flight: Vec<ActionId>,
    },
    /// A change that points the device's driver at another physical device
    /// (another OEM device id or endpoint) while actions' writes may still
    /// be in force there: their reverts could not reach them.
    #[error("changing device {device_id:?} this way would point it at another physical device while what these actions wrote is still in force on this one: {}; wait until they end, or cancel them and let their reverts finish", join(.action_ids))]
    WritesInForce {
        device_id: String,
        /// The actions whose writes may be in force.
        action_ids: Vec<ActionId>,
    },
    #[error("{}", conflict_message(.0))]
    Conflict(Box<Conflict>),
    /// The device's native scheduler blocks direct writes.
    #[error("the native scheduler of device {device_id:?} is enabled and blocks direct writes ({} row(s)); push with CANCEL_AND_REPLACE to clear it", .rows.len())]
    SchedulerActive {
        device_id: String,
        /// The native rows observed.
        rows: Vec<switchyard_drivers::NativeRow>,
        /// The protected rows in force during the push's window: no
        /// strategy can clear them.
        protected: Vec<switchyard_drivers::NativeRow>,
        /// When they were observed.
        observed_at: Ts,
    },
    /// Cancel not possible in this state.
    #[error("action {action_id} is {} and cannot be cancelled", .state.as_str())]
    NotCancellable {
        device_id: String,
        action_id: ActionId,
        state: ActionState,
    },
    /// Already cancelled.
    #[error("action {action_id} is already cancelled")]
    AlreadyCancelled {
        device_id: String,
        action_id: ActionId,
        /// When it was cancelled.
        cancelled_at: Ts,
        /// The action that replaced it, if any.
        replaced_by: Option<ActionId>,
    },
    /// Stale etag. The etag the client sent is not repeated: it is the
    /// caller's value, of any size.
    #[error("the etag given does not match the current etag {current:?} of {resource}")]
    EtagMismatch {
        /// `devices/{id}` or `devices/{id}/actions/{id}`.
        resource: String,
        current: String,
    },
    /// request_id reused with another body.
    #[error("request_id {request_id:?} was already used for a different request")]
    RequestIdReused {
        request_id: String,
        /// The RPC it was first used with.
        first_method: String,
    },
    /// request_id still being processed.
    #[error("a request with request_id {request_id:?} is still being processed")]
    RequestInProgress {
        request_id: String,
        /// How long to wait before retrying, in nanoseconds.
        retry_after_nanos: i64,
    },
    /// No usable API key. Neither the key nor its secret is ever kept
    /// here: only why, and the public key id when the key was known.
    #[error("{}", api_key_message(why))]
    InvalidApiKey {
        /// `missing`, `malformed`, `unknown`, `expired` or `revoked`.
        why: &'static str,
        /// The key's public id, when a stored key matched.
        key_id: Option<String>,
    },
    /// A valid key without the scope the method needs.
    #[error("the API key lacks the scope {scope:?} that {method} needs")]
    MissingScope {
        scope: &'static str,
        /// The gRPC method, e.g. `switchyard.v1.ActionService/PushAction`.
        method: String,
        key_id: String,
    },
    /// The key's token bucket is empty.
    #[error("rate limit of API key {key_id} reached ({per_second} requests per second, burst {burst}); retry in {} ms", retry_after_nanos.saturating_add(999_999) / 1_000_000)]
    RateLimited {
        key_id: String,
        per_second: u32,
        burst: u32,
        /// When the next request would be allowed, in nanoseconds.
        retry_after_nanos: i64,
    },
    /// No tenant of that name visible to the caller.
    #[error("tenant {tenant:?} not found")]
    TenantNotFound { tenant: String },
    /// A tenant of that name exists.
    #[error("tenant {tenant:?} already exists")]
    TenantAlreadyExists { tenant: String },
    /// No API key of that id visible to the caller.
    #[error("API key {key_id:?} not found")]
    ApiKeyNotFound { key_id: String },
    /// A watcher asked to resume before events that were forgotten.
    #[error(
        "events after cursor {after_cursor} up to {oldest_cursor} were forgotten with their actions (retention); resume after {oldest_cursor}"
    )]
    CursorExpired {
        after_cursor: i64,
        oldest_cursor: i64,
    },
    /// Only an admin key of the operator's tenant may do this.
    #[error("{method} is for admin keys of the operator's tenant (default) only")]
    OperatorOnly { method: String },
    /// No webhook endpoint of that id in the caller's tenant.
    #[error("webhook endpoint {endpoint_id:?} not found")]
    WebhookEndpointNotFound { endpoint_id: String },
    /// The tenant has as many webhook endpoints as it may.
    #[error("a tenant may have at most {limit} webhook endpoints; delete one first")]
    TooManyWebhookEndpoints { limit: u32 },
    /// Database unreachable or overloaded.
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    /// A write lost a race with another writer on the same database (a
    /// serialization failure, a deadlock, the no-overlap constraint). The
    /// store runs such a write again; one that keeps losing reaches the
    /// caller as STORAGE_UNAVAILABLE.
    #[error("storage contended: {0}")]
    StorageContention(String),
    /// A bug or corrupt data.
    #[error("internal error: {0}")]
    Internal(String),
}

/// At most [`MAX_LISTED`] ids, then how many more there are.
pub fn join(ids: &[ActionId]) -> String {
    let mut s = ids
        .iter()
        .take(MAX_LISTED)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > MAX_LISTED {
        s.push_str(&format!(" and {} more", ids.len() - MAX_LISTED));
    }
    s
}

fn invalid_message(vs: &[FieldViolation]) -> String {
    let mut s = vs
        .iter()
        .take(MAX_LISTED)
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    if vs.len() > MAX_LISTED {
        s.push_str(&format!("; and {} more", vs.len() - MAX_LISTED));
    }
    s
}

fn conflict_message(c: &Conflict) -> String {
    let ids = join(&c.colliders.iter().map(|x| x.id).collect::<Vec<_>>());
    match c.kind {
        ConflictKind::ActionConflict => format!(
            "the action collides on channel {:?} of device {:?} with: {ids}",
            c.channel, c.device_id
        ),
        ConflictKind::InFlight => format!(
            "the action collides on channel {:?} of device {:?} with actions already sent to the device ({}); they cannot be cancelled",
            c.channel,
            c.device_id,
            join(&c.in_flight)
        ),
        ConflictKind::OpenEnded => format!(
            "cannot queue after open-ended action(s) {} on channel {:?} of device {:?}",
            join(&c.open_ended),
            c.channel,
            c.device_id
        ),
    }
}

impl Error {
    /// Whether the database (not the request) failed: STORAGE_UNAVAILABLE,
    /// a lost race, or INTERNAL. Every database error maps to one of
    /// these; a write refused otherwise (a decision of the request's) may
    /// run more statements in its transaction (`Store::write_once` looks
    /// its key up again), which on PostgreSQL only a transaction no
    /// statement has failed in allows.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            Error::StorageUnavailable(_) | Error::StorageContention(_) | Error::Internal(_)
        )
    }

    /// A single-field validation error.
    pub fn invalid(
        field: impl Into<String>,
        reason: Reason,
        description: impl Into<String>,
    ) -> Self {
        Error::Invalid(vec![FieldViolation::new(field, reason, description)])
    }
}

fn api_key_message(why: &str) -> String {
    match why {
        "missing" => "this call needs an API key: send metadata `authorization: Bearer sy_...` (docs/security.md)".to_owned(),
        "malformed" => "the authorization metadata is not `Bearer sy_...` with a well-formed key".to_owned(),
        "expired" => "the API key has expired".to_owned(),
        "revoked" => "the API key has been revoked".to_owned(),
        _ => "the API key is not known to this server".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_id_lists_are_listed_up_to_the_maximum_then_counted() {
        let ids: Vec<ActionId> = (0..MAX_LISTED as u128 + 3)
            .map(ActionId::from_u128)
            .collect();
        let s = join(&ids);
        assert_eq!(s.matches(", ").count(), MAX_LISTED - 1, "{s}");
        assert!(s.ends_with(" and 3 more"), "{s}");
        assert!(!join(&ids[..MAX_LISTED]).contains("more"));
        let vs: Vec<FieldViolation> = (0..MAX_LISTED + 2)
            .map(|i| FieldViolation::new(format!("f{i}"), Reason::InvalidField, "bad"))
            .collect();
        let m = Error::Invalid(vs.clone()).to_string();
        assert!(
            m.ends_with("; and 2 more") && !m.contains(&format!("f{}", MAX_LISTED)),
            "{m}"
        );
        // Exactly the maximum: all listed, nothing "more".
        let m = Error::Invalid(vs[..MAX_LISTED].to_vec()).to_string();
        assert!(
            !m.contains("more") && m.contains(&format!("f{}", MAX_LISTED - 1)),
            "{m}"
        );
    }

    #[test]
    fn conflict_messages_name_the_channel_the_device_and_the_actions() {
        let collider = Collider {
            id: ActionId::from_u128(7),
            state: ActionState::Scheduled,
            command: Command::Charge,
            channel: "mode".into(),
            start: Ts(0),
            end: Some(Ts(10)),
        };
        let conflict = |kind, open_ended: Vec<ActionId>| {
            Error::Conflict(Box::new(Conflict {
                kind,
                device_id: "bat".into(),
                channel: "mode".into(),
                requested_start: Ts(0),
                requested_end: Some(Ts(5)),
                colliders: vec![collider.clone()],
                strategies: vec![],
                in_flight: vec![ActionId::from_u128(7)],
                open_ended,
                retry_after_nanos: None,
            }))
            .to_string()
        };
        let id = ActionId::from_u128(7).to_string();
        assert_eq!(
            conflict(ConflictKind::ActionConflict, vec![]),
            format!("the action collides on channel \"mode\" of device \"bat\" with: {id}")
        );
        let in_flight = conflict(ConflictKind::InFlight, vec![]);
        assert!(
            in_flight.contains("already sent to the device") && in_flight.contains(&id),
            "{in_flight}"
        );
        let open = conflict(ConflictKind::OpenEnded, vec![ActionId::from_u128(7)]);
        assert!(
            open.starts_with(&format!("cannot queue after open-ended action(s) {id}")),
            "{open}"
        );
    }
}
