//! The ONE mapping from domain errors to gRPC statuses.
//!
//! Every status carries a `google.rpc.ErrorInfo` (domain "switchyard", a
//! reason from `switchyard.v1.ErrorReason`) plus the standard detail that
//! fits; collisions carry a `switchyard.v1.ConflictDetail`. [`classify`]
//! is the table from error to (code, reason); one helper per kind builds
//! the details. Both matches are exhaustive: a new error variant does not
//! compile until it is mapped.
//!
//! Every status is bounded: lists stop at [`MAX_LISTED`] entries (with the
//! total and a `truncated` marker), descriptions at
//! [`MAX_DESCRIPTION_BYTES`], the message at [`MAX_MESSAGE_BYTES`], and no
//! caller-supplied value of unbounded size is repeated. gRPC clients
//! (grpcio, grpc-java) refuse trailers above 8 KiB, and then the client
//! sees RESOURCE_EXHAUSTED instead of the error.

#![deny(clippy::wildcard_enum_match_arm)]

use std::collections::HashMap;

use prost::{Message, Name};
use switchyard_proto::v1::{self as pb, ErrorReason as R};
use tonic::{Code, Status};
use tonic_types::pb as rpc;

use super::convert::{command_to_proto, state_to_proto, strategy_to_proto, ts_to_proto};
pub use crate::domain::cap;
use crate::domain::{
    ActionId, ConflictKind, Error, FieldViolation, Reason, Ts,
    device::NativeRow,
    error::{Conflict, MAX_LISTED},
};

pub const DOMAIN: &str = "switchyard";
/// Longest status message, in bytes (longer ones end in "…").
pub const MAX_MESSAGE_BYTES: usize = 400;
/// Longest description of one field violation or precondition, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 160;
/// Longest field path, in bytes (paths name caller-chosen keys).
pub const MAX_FIELD_BYTES: usize = 96;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        to_status(e)
    }
}

/// The code (what the client should do next) and reason of every error.
pub fn classify(e: &Error) -> (Code, R) {
    match e {
        Error::Invalid(v) => (
            Code::InvalidArgument,
            field_reason(v.first().map_or(Reason::InvalidField, |v| v.reason)),
        ),
        Error::DeviceNotFound { .. } => (Code::NotFound, R::DeviceNotFound),
        Error::ActionNotFound { .. } => (Code::NotFound, R::ActionNotFound),
        Error::DeviceAlreadyExists { .. } => (Code::AlreadyExists, R::DeviceAlreadyExists),
        Error::DeviceHasActiveActions { .. } | Error::WritesInForce { .. } => {
            (Code::FailedPrecondition, R::DeviceHasActiveActions)
        }
        Error::Conflict(c) => (
            Code::FailedPrecondition,
            match c.kind {
                ConflictKind::ActionConflict => R::ActionConflict,
                ConflictKind::InFlight => R::ActionInFlight,
                ConflictKind::OpenEnded => R::OpenEndedConflict,
            },
        ),
        Error::SchedulerActive { .. } => (Code::FailedPrecondition, R::SchedulerActive),
        Error::NotCancellable { .. } => (Code::FailedPrecondition, R::ActionNotCancellable),
        Error::AlreadyCancelled { .. } => (Code::FailedPrecondition, R::ActionAlreadyCancelled),
        Error::EtagMismatch { .. } => (Code::Aborted, R::EtagMismatch),
        Error::RequestIdReused { .. } => (Code::FailedPrecondition, R::RequestIdReused),
        Error::RequestInProgress { .. } => (Code::Aborted, R::RequestInProgress),
        Error::StorageUnavailable(_) | Error::StorageContention(_) => {
            (Code::Unavailable, R::StorageUnavailable)
        }
        Error::Internal(_) => (Code::Internal, R::Internal),
        Error::InvalidApiKey { .. } => (Code::Unauthenticated, R::InvalidApiKey),
        Error::MissingScope { .. } => (Code::PermissionDenied, R::MissingScope),
        Error::RateLimited { .. } => (Code::ResourceExhausted, R::RateLimited),
        Error::TenantNotFound { .. } => (Code::NotFound, R::TenantNotFound),
        Error::TenantAlreadyExists { .. } => (Code::AlreadyExists, R::TenantAlreadyExists),
        Error::ApiKeyNotFound { .. } => (Code::NotFound, R::ApiKeyNotFound),
        Error::OperatorOnly { .. } => (Code::PermissionDenied, R::OperatorOnly),
        Error::CursorExpired { .. } => (Code::FailedPrecondition, R::CursorExpired),
        Error::WebhookEndpointNotFound { .. } => (Code::NotFound, R::WebhookEndpointNotFound),
        Error::TooManyWebhookEndpoints { .. } => {
            (Code::FailedPrecondition, R::TooManyWebhookEndpoints)
        }
    }
}

fn field_reason(r: Reason) -> R {
    match r {
        Reason::MissingField => R::MissingField,
        Reason::InvalidField => R::InvalidField,
        Reason::InvalidWindow => R::InvalidWindow,
        Reason::StartInPast => R::StartInPast,
        Reason::StartBeyondHorizon => R::StartBeyondHorizon,
        Reason::UnsupportedCommand => R::UnsupportedCommand,
        Reason::ParameterOutOfRange => R::ParameterOutOfRange,
        Reason::UnsupportedUnit => R::UnsupportedUnit,
        Reason::UnsupportedParameter => R::UnsupportedParameter,
        Reason::UnsupportedTiming => R::UnsupportedTiming,
        Reason::UnknownDriver => R::UnknownDriver,
        Reason::InvalidSettings => R::InvalidSettings,
        Reason::InvalidPageToken => R::InvalidPageToken,
    }
}

/// Maps a domain error to a rich gRPC status.
pub fn to_status(e: Error) -> Status {
    let (code, reason) = classify(&e);
    let mut message = e.to_string();
    let mut d = Rich::default();
    match e {
        Error::Invalid(violations) => d.invalid(&violations),
        Error::DeviceNotFound { device_id } => {
            d.resource(
                "switchyard.v1.Device",
                format!("devices/{device_id}"),
                "no such device",
            );
            d.meta("device_id", device_id);
        }
        Error::ActionNotFound {
            device_id,
            action_id,
        } => {
            d.resource(
                "switchyard.v1.Action",
                format!("devices/{device_id}/actions/{action_id}"),
                "no such action on this device",
            );
            d.meta("device_id", device_id);
            d.meta("action_id", action_id);
        }
        Error::DeviceAlreadyExists { device_id } => {
            d.resource(
                "switchyard.v1.Device",
                format!("devices/{device_id}"),
                "already exists",
            );
            d.meta("device_id", device_id);
        }
        Error::DeviceHasActiveActions {
            device_id,
            action_ids,
            in_flight,
        } => d.has_active_actions(device_id, &action_ids, &in_flight),
        Error::WritesInForce {
            device_id,
            action_ids,
        } => {
            d.precondition(
                R::DeviceHasActiveActions,
                format!("devices/{device_id}"),
                "what its actions wrote is still in force: the change would strand it; wait \
                 for them to end, or cancel them"
                    .into(),
            );
            d.meta("device_id", device_id);
            d.meta("action_ids", ids(&action_ids).join(","));
            d.id_list("in_flight_action_ids", &action_ids);
            d.truncated("action_count", action_ids.len());
        }
        Error::Conflict(c) => d.conflict(&c, reason),
        Error::SchedulerActive {
            device_id,
            rows,
            protected,
            observed_at,
        } => d.scheduler_active(device_id, &rows, &protected, observed_at),
        Error::NotCancellable {
            device_id,
            action_id,
            state,
        } => {
            d.precondition(
                R::ActionNotCancellable,
                format!("devices/{device_id}/actions/{action_id}"),
                format!("the action is {}", state.as_str()),
            );
            d.meta("device_id", device_id);
            d.meta("action_id", action_id.to_string());
            d.meta("state", state_to_proto(state).as_str_name());
        }
        Error::AlreadyCancelled {
            device_id,
            action_id,
            cancelled_at,
            replaced_by,
        } => {
            d.precondition(
                R::ActionAlreadyCancelled,
                format!("devices/{device_id}/actions/{action_id}"),
                "the action is already cancelled".into(),
            );
            d.meta("device_id", device_id);
            d.meta("action_id", action_id.to_string());
            d.meta("state", "ACTION_STATE_CANCELLED");
            d.meta("cancel_time", cancelled_at.rfc3339());
            if let Some(r) = replaced_by {
                d.meta("replaced_by_action_id", r.to_string());
            }
        }
        Error::EtagMismatch { resource, current } => {
            d.meta("resource", resource);
            d.meta("current_etag", current);
        }
        Error::RequestIdReused {
            request_id,
            first_method,
        } => {
            d.precondition(
                R::RequestIdReused,
                format!("request_id/{request_id}"),
                format!("first used with {first_method} and a different body"),
            );
            d.meta("request_id", request_id);
            d.meta("first_method", first_method);
        }
        Error::RequestInProgress {
            request_id,
            retry_after_nanos,
        } => {
            d.retry(retry_after_nanos);
            d.meta("request_id", request_id);
        }
        Error::StorageUnavailable(msg) | Error::StorageContention(msg) => {
            tracing::warn!(error = %msg, "storage unavailable");
            // The database's own words stay in the server log.
            message = "storage is unavailable; retry later".to_owned();
            d.retry(Ts::SECOND);
        }
        Error::InvalidApiKey { why, key_id } => {
            d.meta("why", why);
            if let Some(k) = key_id {
                d.meta("key_id", k);
            }
        }
        Error::MissingScope {
            scope,
            method,
            key_id,
        } => {
            d.meta("required_scope", scope);
            d.meta("method", method);
            d.meta("key_id", key_id);
        }
        Error::RateLimited {
            key_id,
            per_second,
            burst,
            retry_after_nanos,
        } => {
            d.retry(retry_after_nanos);
            d.details.push(any(
                "google.rpc.QuotaFailure",
                &rpc::QuotaFailure {
                    violations: vec![rpc::quota_failure::Violation {
                        subject: format!("api_key:{key_id}"),
                        description: format!(
                            "{per_second} requests per second per API key, burst {burst}, on this replica"
                        ),
                        ..Default::default()
                    }],
                },
            ));
            d.meta("key_id", key_id);
            d.meta("rate_per_second", per_second.to_string());
            d.meta("burst", burst.to_string());
            d.meta(
                "retry_after_ms",
                ((retry_after_nanos.saturating_add(999_999)) / 1_000_000).to_string(),
            );
        }
        Error::TenantNotFound { tenant } | Error::TenantAlreadyExists { tenant } => {
            d.meta("tenant", tenant);
        }
        Error::ApiKeyNotFound { key_id } => d.meta("key_id", key_id),
        Error::OperatorOnly { method } => d.meta("method", method),
        Error::WebhookEndpointNotFound { endpoint_id } => d.meta("endpoint_id", endpoint_id),
        Error::TooManyWebhookEndpoints { limit } => d.meta("limit", limit.to_string()),
        Error::CursorExpired {
            after_cursor,
            oldest_cursor,
        } => {
            d.meta("after_cursor", after_cursor.to_string());
            d.meta("oldest_cursor", oldest_cursor.to_string());
        }
        Error::Internal(msg) => {
            tracing::error!(error = %msg, "internal error");
            message = "internal error; the server log has the details".to_owned();
        }
    }
    d.into_status(code, reason, cap(message, MAX_MESSAGE_BYTES))
}

/// The status of a failure met before a request reaches a handler (the
/// transport guard in `limits`): an ErrorInfo with `reason`, and a
/// RetryInfo when `retry_after_nanos` is given.
pub fn transport_status(
    code: Code,
    reason: R,
    message: String,
    retry_after_nanos: Option<i64>,
) -> Status {
    let mut d = Rich::default();
    if let Some(n) = retry_after_nanos {
        d.retry(n);
    }
    d.into_status(code, reason, cap(message, MAX_MESSAGE_BYTES))
}

fn any<M: Message>(type_name: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: m.encode_to_vec(),
    }
}

fn ids(xs: &[ActionId]) -> Vec<String> {
    xs.iter()
        .take(MAX_LISTED)
        .map(ToString::to_string)
        .collect()
}

/// The ErrorInfo metadata and the other details of one status.
#[derive(Default)]
struct Rich {
    meta: HashMap<String, String>,
    details: Vec<prost_types::Any>,
}

impl Rich {
    fn meta(&mut self, key: &str, value: impl Into<String>) {
        self.meta.insert(key.to_owned(), value.into());
    }

    /// At most [`MAX_LISTED`] ids under `key`, if there are any.
    fn id_list(&mut self, key: &str, xs: &[ActionId]) {
        if !xs.is_empty() {
            self.meta(key, ids(xs).join(","));
        }
    }

    fn truncated(&mut self, count_key: &str, total: usize) -> bool {
        self.meta(count_key, total.to_string());
        let truncated = total > MAX_LISTED;
        if truncated {
            self.meta("truncated", "true");
        }
        truncated
    }

    fn retry(&mut self, nanos: i64) {
        let delay = prost_types::Duration {
            seconds: nanos / Ts::SECOND,
            nanos: (nanos % Ts::SECOND) as i32,
        };
        self.details.push(any(
            "google.rpc.RetryInfo",
            &rpc::RetryInfo {
                retry_delay: Some(delay),
            },
        ));
    }

    fn precondition(&mut self, kind: R, subject: String, description: String) {
        self.details.push(any(
            "google.rpc.PreconditionFailure",
            &rpc::PreconditionFailure {
                violations: vec![rpc::precondition_failure::Violation {
                    r#type: kind.reason().to_owned(),
                    subject,
                    description: cap(description, MAX_DESCRIPTION_BYTES),
                }],
            },
        ));
    }

    fn resource(&mut self, resource_type: &str, resource_name: String, description: &str) {
        self.details.push(any(
            "google.rpc.ResourceInfo",
            &rpc::ResourceInfo {
                resource_type: resource_type.to_owned(),
                resource_name,
                owner: String::new(),
                description: description.to_owned(),
            },
        ));
    }

    fn invalid(&mut self, violations: &[FieldViolation]) {
        let listed = &violations[..violations.len().min(MAX_LISTED)];
        let field = |v: &FieldViolation| cap(v.field.clone(), MAX_FIELD_BYTES);
        let mut fields: Vec<String> = Vec::new();
        for v in listed {
            let f = field(v);
            if !fields.contains(&f) {
                fields.push(f);
            }
        }
        self.meta("fields", fields.join(","));
        self.truncated("field_violation_count", violations.len());
        self.details.push(any(
            "google.rpc.BadRequest",
            &rpc::BadRequest {
                field_violations: listed
                    .iter()
                    .map(|v| rpc::bad_request::FieldViolation {
                        field: field(v),
                        description: cap(v.description.clone(), MAX_DESCRIPTION_BYTES),
                        reason: field_reason(v.reason).reason().to_owned(),
                        localized_message: None,
                    })
                    .collect(),
            },
        ));
    }

    fn has_active_actions(&mut self, device_id: String, all: &[ActionId], in_flight: &[ActionId]) {
        self.precondition(
            R::DeviceHasActiveActions,
            format!("devices/{device_id}"),
            if in_flight.is_empty() {
                "cancel its actions first, or delete with force".into()
            } else {
                "some actions are in flight or owe a revert; wait for them to finish".into()
            },
        );
        self.meta("device_id", device_id);
        self.meta("action_ids", ids(all).join(","));
        self.id_list("in_flight_action_ids", in_flight);
        self.truncated("action_count", all.len());
    }

    fn conflict(&mut self, c: &Conflict, reason: R) {
        let listed = &c.colliders[..c.colliders.len().min(MAX_LISTED)];
        let listed_ids: Vec<ActionId> = listed.iter().map(|x| x.id).collect();
        self.meta("device_id", c.device_id.clone());
        self.meta("channel", c.channel.clone());
        self.meta("conflicting_action_ids", ids(&listed_ids).join(","));
        self.meta("requested_start_time", c.requested_start.rfc3339());
        if let Some(e) = c.requested_end {
            self.meta("requested_end_time", e.rfc3339());
        }
        self.id_list("in_flight_action_ids", &c.in_flight);
        self.id_list("open_ended_action_ids", &c.open_ended);
        self.meta(
            "strategies",
            c.strategies
                .iter()
                .map(|s| strategy_to_proto(*s).as_str_name())
                .collect::<Vec<_>>()
                .join(","),
        );
        let longest = c
            .colliders
            .len()
            .max(c.in_flight.len())
            .max(c.open_ended.len());
        let truncated = longest > MAX_LISTED;
        self.meta("conflicting_action_count", c.colliders.len().to_string());
        if truncated {
            self.meta("truncated", "true");
        }
        self.details.push(any(
            &pb::ConflictDetail::full_name(),
            &pb::ConflictDetail {
                conflicts: listed
                    .iter()
                    .map(|x| pb::ConflictingAction {
                        action_id: x.id.to_string(),
                        state: state_to_proto(x.state) as i32,
                        command: command_to_proto(x.command) as i32,
                        channel: x.channel.clone(),
                        start_time: Some(ts_to_proto(x.start)),
                        end_time: x.end.map(ts_to_proto),
                    })
                    .collect(),
                strategies: c
                    .strategies
                    .iter()
                    .map(|s| strategy_to_proto(*s) as i32)
                    .collect(),
                in_flight_action_ids: ids(&c.in_flight),
                open_ended_action_ids: ids(&c.open_ended),
                conflict_count: i32::try_from(c.colliders.len()).unwrap_or(i32::MAX),
                truncated,
            },
        ));
        self.details.push(any(
            "google.rpc.PreconditionFailure",
            &rpc::PreconditionFailure {
                violations: listed
                    .iter()
                    .map(|x| rpc::precondition_failure::Violation {
                        r#type: reason.reason().to_owned(),
                        subject: format!("devices/{}/actions/{}", c.device_id, x.id),
                        // The channel is the push's, in the metadata.
                        description: format!(
                            "{} {} from {} to {}",
                            x.state.as_str(),
                            x.command,
                            x.start.rfc3339(),
                            x.end.map(Ts::rfc3339).unwrap_or_else(|| "open end".into())
                        ),
                    })
                    .collect(),
            },
        ));
        if let Some(wait) = c.retry_after_nanos {
            self.retry(wait);
        }
    }

    fn scheduler_active(
        &mut self,
        device_id: String,
        rows: &[NativeRow],
        protected: &[NativeRow],
        observed_at: Ts,
    ) {
        let listed = &rows[..rows.len().min(MAX_LISTED)];
        self.details.push(any(
            &pb::SchedulerDetail::full_name(),
            &pb::SchedulerDetail {
                rows: super::convert::native_rows_to_proto(listed),
                observe_time: Some(ts_to_proto(observed_at)),
                // Exactly what preflight would accept: clearing, unless
                // a protected row is in force during the window.
                strategies: if protected.is_empty() {
                    vec![pb::ConflictStrategy::CancelAndReplace as i32]
                } else {
                    vec![]
                },
                row_count: i32::try_from(rows.len()).unwrap_or(i32::MAX),
                truncated: rows.len() > listed.len(),
            },
        ));
        let description = if protected.is_empty() {
            "the device's native scheduler is enabled; push with CANCEL_AND_REPLACE to clear it"
                .to_owned()
        } else {
            let names: Vec<String> = protected
                .iter()
                .take(MAX_LISTED)
                .map(|r| format!("{} {}-{}", r.mode, r.start, r.end))
                .collect();
            format!(
                "the device's native scheduler is enabled with protected row(s) in force \
                 during the window, which are never cleared: {}",
                names.join(", ")
            )
        };
        self.precondition(
            R::SchedulerActive,
            format!("devices/{device_id}"),
            description,
        );
        self.meta("device_id", device_id);
        self.meta("native_row_count", rows.len().to_string());
        self.meta("protected_row_count", protected.len().to_string());
        self.meta("observe_time", observed_at.rfc3339());
        if rows.len() > MAX_LISTED {
            self.meta("truncated", "true");
        }
    }

    fn into_status(self, code: Code, reason: R, message: String) -> Status {
        let mut details = vec![any(
            "google.rpc.ErrorInfo",
            &rpc::ErrorInfo {
                reason: reason.reason().to_owned(),
                domain: DOMAIN.to_owned(),
                metadata: self.meta,
            },
        )];
        details.extend(self.details);
        let body = rpc::Status {
            code: code as i32,
            message: message.clone(),
            details,
        };
        Status::with_details(code, message, body.encode_to_vec().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        ActionState, Command, Strategy,
        device::RowOwner,
        error::{Collider, Conflict},
    };

    /// What grpc-core counts against its 8 KiB default: every trailer's
    /// name and value plus 32 bytes each (the HPACK entry size).
    fn metadata_bytes(s: Status) -> usize {
        let http = s.into_http::<tonic::body::Body>();
        http.headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum()
    }

    fn long_id() -> String {
        format!("d{}", "x".repeat(62))
    }

    fn many_ids(n: usize) -> Vec<ActionId> {
        (0..n).map(|_| ActionId::generate()).collect()
    }

    fn row(i: usize) -> NativeRow {
        NativeRow {
            start: "00:00".into(),
            end: "23:59".into(),
            mode: format!("ForceDischarge{i}{}", "é".repeat(40)),
            enabled: true,
            owner: RowOwner::Protected,
        }
    }

    /// The largest error each kind can produce.
    fn worst_cases() -> Vec<Error> {
        let id = long_id();
        let colliders: Vec<Collider> = many_ids(600)
            .into_iter()
            .enumerate()
            .map(|(i, a)| Collider {
                id: a,
                state: ActionState::Active,
                command: Command::Discharge,
                channel: "power_limit".into(),
                start: Ts(i as i64 * Ts::SECOND),
                end: Some(Ts((i as i64 + 1) * Ts::SECOND)),
            })
            .collect();
        let ids = many_ids(600);
        let field = |i: usize| format!("device.settings[\"{}{i}\"]", "k".repeat(60));
        // Escaped control characters: six bytes each in a field path.
        let escaped = |i: usize| format!("device.settings[{:?}]", format!("\u{7f}{i}").repeat(30));
        vec![
            Error::Invalid(
                (0..100)
                    .map(|i| {
                        FieldViolation::new(field(i), Reason::InvalidSettings, "é".repeat(400))
                    })
                    .collect(),
            ),
            Error::Invalid(
                (0..64)
                    .map(|i| {
                        FieldViolation::new(escaped(i), Reason::InvalidSettings, "ü".repeat(300))
                    })
                    .collect(),
            ),
            Error::Conflict(Box::new(Conflict {
                kind: ConflictKind::InFlight,
                device_id: id.clone(),
                channel: "power_limit".into(),
                requested_start: Ts(0),
                requested_end: Some(Ts(Ts::SECOND)),
                colliders,
                strategies: vec![Strategy::CancelAndReplace, Strategy::QueueAfter],
                in_flight: ids.clone(),
                open_ended: ids.clone(),
                retry_after_nanos: Some(Ts::SECOND),
            })),
            Error::DeviceHasActiveActions {
                device_id: id.clone(),
                action_ids: ids.clone(),
                in_flight: ids.clone(),
            },
            Error::WritesInForce {
                device_id: id.clone(),
                action_ids: ids.clone(),
            },
            Error::SchedulerActive {
                device_id: id.clone(),
                rows: (0..96).map(row).collect(),
                protected: (0..96).map(row).collect(),
                observed_at: Ts(0),
            },
            Error::RequestIdReused {
                request_id: "é".repeat(64),
                first_method: "CancelAction".into(),
            },
            Error::EtagMismatch {
                resource: format!("devices/{id}/actions/{}", ids[0]),
                current: "ffffffff-9223372036854775807".into(),
            },
        ]
    }

    #[test]
    fn the_largest_error_of_every_kind_fits_the_8_kib_clients_accept() {
        for e in worst_cases() {
            let what = format!("{:?}", classify(&e));
            let size = metadata_bytes(to_status(e));
            assert!(size < 7 * 1024, "{what}: {size} bytes of metadata");
        }
    }

    #[test]
    fn long_lists_are_cut_to_the_listed_maximum_with_their_total() {
        for e in worst_cases() {
            let status = to_status(e);
            let body = rpc::Status::decode(status.details()).expect("status");
            let info = rpc::ErrorInfo::decode(body.details[0].value.as_slice()).expect("info");
            let truncated = info.metadata.get("truncated").map(String::as_str);
            for (k, v) in &info.metadata {
                if k.ends_with("_ids") {
                    assert!(v.split(',').count() <= MAX_LISTED, "{k} lists too many");
                }
            }
            match info.reason.as_str() {
                "ACTION_IN_FLIGHT" => {
                    assert_eq!(truncated, Some("true"));
                    assert_eq!(info.metadata["conflicting_action_count"], "600");
                    let cd = body
                        .details
                        .iter()
                        .find(|a| a.type_url.ends_with("ConflictDetail"))
                        .map(|a| pb::ConflictDetail::decode(a.value.as_slice()).expect("cd"))
                        .expect("conflict detail");
                    assert_eq!(cd.conflicts.len(), MAX_LISTED);
                    assert!(
                        body.details[3].type_url.ends_with("RetryInfo"),
                        "settling colliders: retry"
                    );
                    assert_eq!((cd.conflict_count, cd.truncated), (600, true));
                    assert_eq!(cd.in_flight_action_ids.len(), MAX_LISTED);
                    assert!(status.message().len() <= MAX_MESSAGE_BYTES);
                }
                "INVALID_SETTINGS" => {
                    assert_eq!(truncated, Some("true"));
                    assert!(
                        ["100", "64"].contains(&info.metadata["field_violation_count"].as_str())
                    );
                    let br = rpc::BadRequest::decode(body.details[1].value.as_slice()).expect("br");
                    assert_eq!(br.field_violations.len(), MAX_LISTED);
                    assert!(
                        br.field_violations
                            .iter()
                            .all(|v| v.description.len() <= MAX_DESCRIPTION_BYTES
                                && v.field.len() <= MAX_FIELD_BYTES)
                    );
                    assert!(status.message().len() <= MAX_MESSAGE_BYTES);
                }
                "DEVICE_HAS_ACTIVE_ACTIONS" => {
                    assert_eq!(truncated, Some("true"));
                    assert_eq!(info.metadata["action_count"], "600");
                }
                "SCHEDULER_ACTIVE" => {
                    assert_eq!(truncated, Some("true"));
                    assert_eq!(info.metadata["native_row_count"], "96");
                    let sd =
                        pb::SchedulerDetail::decode(body.details[1].value.as_slice()).expect("sd");
                    assert_eq!(
                        (sd.rows.len(), sd.row_count, sd.truncated),
                        (MAX_LISTED, 96, true)
                    );
                }
                other => assert_eq!(truncated, None, "{other}"),
            }
        }
    }

    /// The ErrorInfo metadata of a status.
    fn meta(status: &Status) -> HashMap<String, String> {
        let body = rpc::Status::decode(status.details()).expect("status");
        rpc::ErrorInfo::decode(body.details[0].value.as_slice())
            .expect("info")
            .metadata
    }

    #[test]
    fn a_list_of_exactly_the_maximum_is_whole_and_one_more_is_cut() {
        let colliders = |n: usize| {
            Error::Conflict(Box::new(Conflict {
                kind: ConflictKind::ActionConflict,
                device_id: "d".into(),
                channel: "mode".into(),
                requested_start: Ts(0),
                requested_end: None,
                colliders: (0..n)
                    .map(|i| Collider {
                        id: ActionId::generate(),
                        state: ActionState::Scheduled,
                        command: Command::Charge,
                        channel: "mode".into(),
                        start: Ts(i as i64),
                        end: None,
                    })
                    .collect(),
                strategies: vec![],
                in_flight: vec![],
                open_ended: vec![],
                retry_after_nanos: None,
            }))
        };
        let rows = |n: usize| Error::SchedulerActive {
            device_id: "d".into(),
            rows: (0..n).map(row).collect(),
            protected: vec![],
            observed_at: Ts(0),
        };
        let fields = |n: usize| {
            Error::Invalid(
                (0..n)
                    .map(|i| FieldViolation::new(format!("f{i}"), Reason::InvalidField, "bad"))
                    .collect(),
            )
        };
        for e in [colliders(MAX_LISTED), rows(MAX_LISTED), fields(MAX_LISTED)] {
            let m = meta(&to_status(e));
            assert_eq!(m.get("truncated"), None, "{m:?}");
        }
        for e in [
            colliders(MAX_LISTED + 1),
            rows(MAX_LISTED + 1),
            fields(MAX_LISTED + 1),
        ] {
            let m = meta(&to_status(e));
            assert_eq!(
                m.get("truncated").map(String::as_str),
                Some("true"),
                "{m:?}"
            );
        }
        let s = to_status(rows(MAX_LISTED));
        let body = rpc::Status::decode(s.details()).expect("status");
        let sd = pb::SchedulerDetail::decode(body.details[1].value.as_slice()).expect("sd");
        assert!(!sd.truncated && sd.rows.len() == MAX_LISTED);
    }

    #[test]
    fn a_refusal_that_only_settling_actions_cause_says_retry_in_2_s() {
        // docs/errors.md promises 2 s.
        assert_eq!(crate::domain::conflict::SETTLE_RETRY_NANOS, 2_000_000_000);
    }

    #[test]
    fn retry_info_carries_the_delay_in_seconds_and_nanos() {
        let status = to_status(Error::RequestInProgress {
            request_id: "r".into(),
            retry_after_nanos: 2 * Ts::SECOND + 250_000_000,
        });
        let body = rpc::Status::decode(status.details()).expect("status");
        let retry = body
            .details
            .iter()
            .find(|a| a.type_url.ends_with("RetryInfo"))
            .map(|a| rpc::RetryInfo::decode(a.value.as_slice()).expect("retry"))
            .expect("RetryInfo");
        let d = retry.retry_delay.expect("delay");
        assert_eq!((d.seconds, d.nanos), (2, 250_000_000));
    }

    #[test]
    fn a_stale_etag_is_not_repeated_back() {
        let status = to_status(Error::EtagMismatch {
            resource: "devices/d".into(),
            current: "0000abcd-2".into(),
        });
        let body = rpc::Status::decode(status.details()).expect("status");
        let info = rpc::ErrorInfo::decode(body.details[0].value.as_slice()).expect("info");
        assert_eq!(info.metadata.get("etag"), None);
        assert_eq!(info.metadata["current_etag"], "0000abcd-2");
    }
}
