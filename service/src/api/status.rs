//! The ONE mapping from domain errors to gRPC statuses. Every status
//! carries a `google.rpc.ErrorInfo` (domain "switchyard", a reason from
//! `switchyard.v1.ErrorReason`) plus the standard detail that fits, and
//! collisions carry a `switchyard.v1.ConflictDetail`. The match is
//! exhaustive: a new error variant does not compile until it is mapped.

use std::collections::HashMap;

use prost::{Message, Name};
use switchyard_proto::v1::{self as pb, ErrorReason as R};
use tonic::{Code, Status};
use tonic_types::pb as rpc;

use super::convert::{command_to_proto, state_to_proto, strategy_to_proto, ts_to_proto};
use crate::domain::{ConflictKind, Error, Reason, Ts};

/// The ErrorInfo domain.
pub const DOMAIN: &str = "switchyard";

fn any<M: Message>(type_name: &str, m: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: m.encode_to_vec(),
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

fn join<T: ToString>(xs: &[T]) -> String {
    xs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn retry(nanos: i64) -> prost_types::Any {
    let d = prost_types::Duration {
        seconds: nanos / Ts::SECOND,
        nanos: (nanos % Ts::SECOND) as i32,
    };
    any(
        "google.rpc.RetryInfo",
        &rpc::RetryInfo {
            retry_delay: Some(d),
        },
    )
}

fn precondition(kind: &str, subject: String, description: String) -> prost_types::Any {
    any(
        "google.rpc.PreconditionFailure",
        &rpc::PreconditionFailure {
            violations: vec![rpc::precondition_failure::Violation {
                r#type: kind.to_owned(),
                subject,
                description,
            }],
        },
    )
}

fn resource(resource_type: &str, resource_name: String, description: String) -> prost_types::Any {
    any(
        "google.rpc.ResourceInfo",
        &rpc::ResourceInfo {
            resource_type: resource_type.to_owned(),
            resource_name,
            owner: String::new(),
            description,
        },
    )
}

/// Maps a domain error to a rich gRPC status.
pub fn to_status(e: Error) -> Status {
    let mut message = e.to_string();
    let mut meta: HashMap<String, String> = HashMap::new();
    let mut details: Vec<prost_types::Any> = Vec::new();
    let (code, reason) = match e {
        Error::Invalid(violations) => {
            let first = violations
                .first()
                .map(|v| v.reason)
                .unwrap_or(Reason::InvalidField);
            meta.insert(
                "fields".into(),
                join(
                    &violations
                        .iter()
                        .map(|v| v.field.clone())
                        .collect::<Vec<_>>(),
                ),
            );
            details.push(any(
                "google.rpc.BadRequest",
                &rpc::BadRequest {
                    field_violations: violations
                        .into_iter()
                        .map(|v| rpc::bad_request::FieldViolation {
                            field: v.field,
                            description: v.description,
                            reason: field_reason(v.reason).reason().to_owned(),
                            localized_message: None,
                        })
                        .collect(),
                },
            ));
            (Code::InvalidArgument, field_reason(first))
        }
        Error::DeviceNotFound { device_id } => {
            details.push(resource(
                "switchyard.v1.Device",
                format!("devices/{device_id}"),
                "no such device".into(),
            ));
            meta.insert("device_id".into(), device_id);
            (Code::NotFound, R::DeviceNotFound)
        }
        Error::ActionNotFound {
            device_id,
            action_id,
        } => {
            details.push(resource(
                "switchyard.v1.Action",
                format!("devices/{device_id}/actions/{action_id}"),
                "no such action on this device".into(),
            ));
            meta.insert("device_id".into(), device_id);
            meta.insert("action_id".into(), action_id);
            (Code::NotFound, R::ActionNotFound)
        }
        Error::DeviceAlreadyExists { device_id } => {
            details.push(resource(
                "switchyard.v1.Device",
                format!("devices/{device_id}"),
                "already exists".into(),
            ));
            meta.insert("device_id".into(), device_id);
            (Code::AlreadyExists, R::DeviceAlreadyExists)
        }
        Error::DeviceHasActiveActions {
            device_id,
            action_ids,
            in_flight,
        } => {
            details.push(precondition(
                R::DeviceHasActiveActions.reason(),
                format!("devices/{device_id}"),
                if in_flight.is_empty() {
                    "cancel its actions first, or delete with force".into()
                } else {
                    "some actions are in flight or owe a revert; wait for them to finish".into()
                },
            ));
            meta.insert("device_id".into(), device_id);
            meta.insert("action_ids".into(), join(&action_ids));
            if !in_flight.is_empty() {
                meta.insert("in_flight_action_ids".into(), join(&in_flight));
            }
            (Code::FailedPrecondition, R::DeviceHasActiveActions)
        }
        Error::Conflict(c) => {
            let reason = match c.kind {
                ConflictKind::ActionConflict => R::ActionConflict,
                ConflictKind::InFlight => R::ActionInFlight,
                ConflictKind::OpenEnded => R::OpenEndedConflict,
            };
            let ids: Vec<String> = c.colliders.iter().map(|x| x.id.to_string()).collect();
            meta.insert("device_id".into(), c.device_id.clone());
            meta.insert("channel".into(), c.channel.clone());
            meta.insert("conflicting_action_ids".into(), ids.join(","));
            meta.insert("requested_start_time".into(), c.requested_start.rfc3339());
            if let Some(e) = c.requested_end {
                meta.insert("requested_end_time".into(), e.rfc3339());
            }
            if !c.in_flight.is_empty() {
                meta.insert("in_flight_action_ids".into(), join(&c.in_flight));
            }
            if !c.open_ended.is_empty() {
                meta.insert("open_ended_action_ids".into(), join(&c.open_ended));
            }
            meta.insert(
                "strategies".into(),
                c.strategies
                    .iter()
                    .map(|s| strategy_to_proto(*s).as_str_name())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            details.push(any(
                &pb::ConflictDetail::full_name(),
                &pb::ConflictDetail {
                    conflicts: c
                        .colliders
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
                    in_flight_action_ids: c.in_flight.iter().map(ToString::to_string).collect(),
                    open_ended_action_ids: c.open_ended.iter().map(ToString::to_string).collect(),
                },
            ));
            details.push(any(
                "google.rpc.PreconditionFailure",
                &rpc::PreconditionFailure {
                    violations: c
                        .colliders
                        .iter()
                        .map(|x| rpc::precondition_failure::Violation {
                            r#type: reason.reason().to_owned(),
                            subject: format!("devices/{}/actions/{}", c.device_id, x.id),
                            description: format!(
                                "{} {} on channel {:?} from {} to {}",
                                x.state.as_str(),
                                x.command,
                                x.channel,
                                x.start.rfc3339(),
                                x.end.map(Ts::rfc3339).unwrap_or_else(|| "open end".into())
                            ),
                        })
                        .collect(),
                },
            ));
            (Code::FailedPrecondition, reason)
        }
        Error::SchedulerActive {
            device_id,
            rows,
            protected,
            observed_at,
        } => {
            details.push(any(
                &pb::SchedulerDetail::full_name(),
                &pb::SchedulerDetail {
                    rows: super::convert::native_rows_to_proto(&rows),
                    observe_time: Some(ts_to_proto(observed_at)),
                    // Exactly what preflight would accept: clearing, unless
                    // a protected row is in force during the window.
                    strategies: if protected.is_empty() {
                        vec![pb::ConflictStrategy::CancelAndReplace as i32]
                    } else {
                        vec![]
                    },
                },
            ));
            let description = if protected.is_empty() {
                "the device's native scheduler is enabled; push with CANCEL_AND_REPLACE to clear it"
                    .to_owned()
            } else {
                let names: Vec<String> = protected
                    .iter()
                    .map(|r| format!("{} {}-{}", r.mode, r.start, r.end))
                    .collect();
                format!(
                    "the device's native scheduler is enabled with protected row(s) in force \
                     during the window, which are never cleared: {}",
                    names.join(", ")
                )
            };
            details.push(precondition(
                R::SchedulerActive.reason(),
                format!("devices/{device_id}"),
                description,
            ));
            meta.insert("device_id".into(), device_id);
            meta.insert("native_row_count".into(), rows.len().to_string());
            meta.insert("protected_row_count".into(), protected.len().to_string());
            meta.insert("observe_time".into(), observed_at.rfc3339());
            (Code::FailedPrecondition, R::SchedulerActive)
        }
        Error::NotCancellable {
            device_id,
            action_id,
            state,
        } => {
            details.push(precondition(
                R::ActionNotCancellable.reason(),
                format!("devices/{device_id}/actions/{action_id}"),
                format!("the action is {}", state.as_str()),
            ));
            meta.insert("device_id".into(), device_id);
            meta.insert("action_id".into(), action_id.to_string());
            meta.insert(
                "state".into(),
                state_to_proto(state).as_str_name().to_owned(),
            );
            (Code::FailedPrecondition, R::ActionNotCancellable)
        }
        Error::AlreadyCancelled {
            device_id,
            action_id,
            cancelled_at,
            replaced_by,
        } => {
            details.push(precondition(
                R::ActionAlreadyCancelled.reason(),
                format!("devices/{device_id}/actions/{action_id}"),
                "the action is already cancelled".into(),
            ));
            meta.insert("device_id".into(), device_id);
            meta.insert("action_id".into(), action_id.to_string());
            meta.insert("state".into(), "ACTION_STATE_CANCELLED".into());
            meta.insert("cancel_time".into(), cancelled_at.rfc3339());
            if let Some(r) = replaced_by {
                meta.insert("replaced_by_action_id".into(), r.to_string());
            }
            (Code::FailedPrecondition, R::ActionAlreadyCancelled)
        }
        Error::EtagMismatch {
            resource,
            given,
            current,
        } => {
            meta.insert("resource".into(), resource);
            meta.insert("etag".into(), given);
            meta.insert("current_etag".into(), current);
            (Code::Aborted, R::EtagMismatch)
        }
        Error::RequestIdReused {
            request_id,
            first_method,
        } => {
            details.push(precondition(
                R::RequestIdReused.reason(),
                format!("request_id/{request_id}"),
                format!("first used with {first_method} and a different body"),
            ));
            meta.insert("request_id".into(), request_id);
            meta.insert("first_method".into(), first_method);
            (Code::FailedPrecondition, R::RequestIdReused)
        }
        Error::RequestInProgress {
            request_id,
            retry_after_nanos,
        } => {
            details.push(retry(retry_after_nanos));
            meta.insert("request_id".into(), request_id);
            (Code::Aborted, R::RequestInProgress)
        }
        Error::StorageUnavailable(msg) => {
            tracing::warn!(error = %msg, "storage unavailable");
            // The database's own words stay in the server log.
            message = "storage is unavailable; retry later".to_owned();
            details.push(retry(Ts::SECOND));
            (Code::Unavailable, R::StorageUnavailable)
        }
        Error::Internal(msg) => {
            tracing::error!(error = %msg, "internal error");
            // Internals stay in the server log.
            message = "internal error; the server log has the details".to_owned();
            (Code::Internal, R::Internal)
        }
    };
    let mut all = vec![any(
        "google.rpc.ErrorInfo",
        &rpc::ErrorInfo {
            reason: reason.reason().to_owned(),
            domain: DOMAIN.to_owned(),
            metadata: meta,
        },
    )];
    all.append(&mut details);
    let body = rpc::Status {
        code: code as i32,
        message: message.clone(),
        details: all,
    };
    Status::with_details(code, message, body.encode_to_vec().into())
}
