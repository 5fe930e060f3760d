//! Fuzz-style properties of the gRPC edge: whatever a client sends, as raw
//! bytes or as decodable but hostile field values, is read without a
//! panic, and every refusal is a bounded INVALID_ARGUMENT status.
//!
//! For every request message the services accept (DeviceService,
//! ActionService and AdminService), these properties check that:
//!
//! - `prost` decoding of arbitrary bytes (up to 2 KiB, and
//!   protobuf-shaped bytes that mostly decode) never panics, and a decoded
//!   message re-encodes to bytes that decode and re-encode to themselves
//!   (idempotency compares request bytes);
//! - the proto → domain conversion of a decoded message (`convert`; for
//!   AdminService, which has no conversion, the checks its handlers run
//!   before the store: tenant names, scope lists, key ids) never panics.
//!   What it accepts keeps the values sent (ids, timestamps, quantities,
//!   settings, page sizes), its page tokens round-trip, and its
//!   idempotency body is canonical: converting that body again gives the
//!   same bytes, and output-only fields do not change it;
//! - what it refuses is an `Error::Invalid`, whose status is
//!   INVALID_ARGUMENT with a `google.rpc.ErrorInfo` (domain `switchyard`,
//!   the reason `classify` gives) and a `google.rpc.BadRequest` of at most
//!   `MAX_LISTED` violations with bounded field paths and descriptions, a
//!   message of at most `MAX_MESSAGE_BYTES`, and trailers under the 8 KiB
//!   that gRPC clients accept;
//! - API key parsing (`auth::key_id_of`, `auth::is_key_id`) and scope
//!   lists (`auth::Scope::parse_list`) never panic on any string; a key id
//!   they yield is 16 characters of the key alphabet, and every
//!   well-formed key yields its id.
//!
//! Inputs are random, not coverage-guided: 256 cases per property, so CI
//! stays fast. The `proptest!` macro applies `PROPTEST_CASES` over the
//! config written here, so run them longer with
//!
//! ```text
//! PROPTEST_CASES=200000 cargo test -p switchyard --lib fuzz_tests --release
//! ```
//!
//! A failing input is shrunk to a minimal one and saved under
//! `proptest-regressions/`, and replayed first on the next run.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::ops::Range;

use proptest::prelude::{
    ProptestConfig, TestCaseError, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest,
};
use proptest::strategy::{BoxedStrategy, Just, Strategy};
use prost::Message;
use switchyard_proto::v1 as pb;
use tonic::{Code, Status};
use tonic_types::pb as rpc;

use super::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, admin, convert, encode_token, status};
use crate::{
    auth::{self, Scope},
    domain::{ActionId, DeviceId, Error, Reason, Ts, error::MAX_LISTED},
};

/// 256 cases per property; `PROPTEST_CASES` overrides it at run time.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// The characters of a key id and a secret (lower-case base32).
const KEY_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The largest trailer block any refusal may produce: what grpc-core and
/// grpc-java accept by default.
const MAX_TRAILER_BYTES: usize = 8 * 1024;

/// The update_mask paths a client might try: the four writable ones and
/// the immutable and output-only ones.
const MASK_PATHS: [&str; 12] = [
    "display_name",
    "oem_device_id",
    "timezone",
    "settings",
    "device_id",
    "family",
    "driver",
    "capabilities",
    "etag",
    "create_time",
    "update_time",
    "observed_state",
];

fn fail(why: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(why.into())
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

// ---- what every refusal must be --------------------------------------------

/// What grpc-core counts against its 8 KiB default: every trailer's name
/// and value plus 32 bytes each (the HPACK entry size). As in `status.rs`.
fn metadata_bytes(s: Status) -> usize {
    let http = s.into_http::<tonic::body::Body>();
    http.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum()
}

/// A conversion's refusal: a field error, sent as a bounded
/// INVALID_ARGUMENT with its ErrorInfo and BadRequest.
fn check_refusal(e: Error) -> Result<(), TestCaseError> {
    let what = format!("{e:?}");
    prop_assert!(
        matches!(&e, Error::Invalid(v) if !v.is_empty()),
        "a request was refused with something other than field violations: {}",
        what
    );
    let (code, reason) = status::classify(&e);
    prop_assert_eq!(code, Code::InvalidArgument, "{}", what);
    let s = status::to_status(e);
    prop_assert_eq!(s.code(), Code::InvalidArgument, "{}", what);
    prop_assert!(
        s.message().len() <= status::MAX_MESSAGE_BYTES,
        "a {}-byte status message for {}",
        s.message().len(),
        what
    );
    let body = rpc::Status::decode(s.details())
        .map_err(|err| fail(format!("status details do not decode: {err}")))?;
    prop_assert_eq!(body.code, Code::InvalidArgument as i32);
    prop_assert_eq!(body.message.as_str(), s.message());
    let Some(first) = body.details.first() else {
        return Err(fail(format!("no details for {what}")));
    };
    prop_assert!(
        first.type_url.ends_with("google.rpc.ErrorInfo"),
        "first detail is {}",
        first.type_url
    );
    let info = rpc::ErrorInfo::decode(first.value.as_slice())
        .map_err(|err| fail(format!("ErrorInfo does not decode: {err}")))?;
    prop_assert_eq!(info.domain.as_str(), status::DOMAIN);
    prop_assert_eq!(info.reason.as_str(), reason.reason());
    let Some(bad) = body
        .details
        .iter()
        .find(|a| a.type_url.ends_with("google.rpc.BadRequest"))
    else {
        return Err(fail(format!("no BadRequest for {what}")));
    };
    let bad = rpc::BadRequest::decode(bad.value.as_slice())
        .map_err(|err| fail(format!("BadRequest does not decode: {err}")))?;
    prop_assert!(
        !bad.field_violations.is_empty() && bad.field_violations.len() <= MAX_LISTED,
        "{} field violations listed",
        bad.field_violations.len()
    );
    for v in &bad.field_violations {
        prop_assert!(
            v.field.len() <= status::MAX_FIELD_BYTES,
            "a {}-byte field path",
            v.field.len()
        );
        prop_assert!(
            v.description.len() <= status::MAX_DESCRIPTION_BYTES,
            "a {}-byte description",
            v.description.len()
        );
    }
    let size = metadata_bytes(s);
    prop_assert!(
        size < MAX_TRAILER_BYTES,
        "{} bytes of trailers for {}",
        size,
        what
    );
    Ok(())
}

/// A decoded message re-encodes to bytes that decode and re-encode to
/// themselves.
fn check_reencode<M: Message + Default>(m: &M) -> Result<(), TestCaseError> {
    let once = m.encode_to_vec();
    let again = M::decode(once.as_slice()).map_err(|e| fail(format!("its own encoding: {e}")))?;
    prop_assert_eq!(again.encode_to_vec(), once, "re-encoding changed the bytes");
    Ok(())
}

/// An accepted request's idempotency body is canonical: it decodes, is
/// accepted again, and gives the same body.
fn canonical_is_fixed<M, F>(body: &[u8], convert_again: F) -> Result<(), TestCaseError>
where
    M: Message + Default,
    F: FnOnce(M) -> Result<Vec<u8>, Error>,
{
    let canonical =
        M::decode(body).map_err(|e| fail(format!("the idempotency body does not decode: {e}")))?;
    match convert_again(canonical) {
        Ok(again) => {
            prop_assert_eq!(
                again.as_slice(),
                body,
                "the idempotency body is not canonical"
            );
        }
        Err(e) => {
            return Err(fail(format!(
                "the canonical form of an accepted request is refused: {e:?}"
            )));
        }
    }
    Ok(())
}

fn check_page_size(asked: i32, size: u32) -> Result<(), TestCaseError> {
    let expected = if asked == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        u32::try_from(asked).unwrap_or(0).min(MAX_PAGE_SIZE)
    };
    prop_assert_eq!(size, expected, "page_size {}", asked);
    prop_assert!((1..=MAX_PAGE_SIZE).contains(&size));
    Ok(())
}

// ---- one check per request type ----------------------------------------------

fn check_create_device(req: pb::CreateDeviceRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::create_device(req) {
        Ok(c) => {
            let Some(dev) = asked.device.as_ref() else {
                return Err(fail("accepted a create without a device"));
            };
            let requested = if asked.device_id.is_empty() {
                dev.device_id.as_str()
            } else {
                asked.device_id.as_str()
            };
            if requested.is_empty() {
                prop_assert!(
                    DeviceId::parse(c.device.id.as_str()).is_ok(),
                    "generated id {} does not parse",
                    c.device.id
                );
            } else {
                prop_assert_eq!(c.device.id.as_str(), requested);
            }
            prop_assert_eq!(&c.device.display_name, &dev.display_name);
            prop_assert_eq!(&c.device.driver, &dev.driver);
            prop_assert_eq!(&c.device.oem_device_id, &dev.oem_device_id);
            prop_assert_eq!(&*c.device.settings, &dev.settings);
            prop_assert!(!c.device.timezone.is_empty(), "no time zone");
            if !dev.timezone.is_empty() {
                prop_assert_eq!(&c.device.timezone, &dev.timezone);
            }
            prop_assert_eq!(&c.idem.request_id, &asked.request_id);
            // The handler refuses these (with the driver's) as one error.
            if !c.violations.is_empty() {
                check_refusal(Error::Invalid(c.violations.clone()))?;
            }
            canonical_is_fixed(&c.idem.body, |m: pb::CreateDeviceRequest| {
                convert::create_device(m).map(|c| c.idem.body)
            })?;
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_get_device(req: pb::GetDeviceRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.device_id.clone();
    match convert::get_device(req) {
        Ok(id) => {
            prop_assert_eq!(id.as_str(), asked.as_str());
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_list_devices(req: pb::ListDevicesRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::list_devices(req) {
        Ok(page) => {
            prop_assert!(
                asked.page_size >= 0,
                "page_size {} accepted",
                asked.page_size
            );
            check_page_size(asked.page_size, page.size)?;
            prop_assert_eq!(page.after.is_some(), !asked.page_token.is_empty());
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_update_device(req: pb::UpdateDeviceRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::update_device(req) {
        Ok(u) => {
            let Some(dev) = asked.device.as_ref() else {
                return Err(fail("accepted an update without a device"));
            };
            prop_assert_eq!(u.id.as_str(), dev.device_id.as_str());
            prop_assert_eq!(u.etag.as_deref(), non_empty(&dev.etag));
            prop_assert!(!u.fields.is_empty(), "accepted an update of no field");
            prop_assert!(
                u.fields.windows(2).all(|w| w[0] < w[1]),
                "fields not sorted and unique: {:?}",
                u.fields
            );
            prop_assert_eq!(&u.idem.request_id, &asked.request_id);
            canonical_is_fixed(&u.idem.body, |m: pb::UpdateDeviceRequest| {
                convert::update_device(m).map(|u| u.idem.body)
            })?;
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_delete_device(req: pb::DeleteDeviceRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::delete_device(req) {
        Ok(d) => {
            prop_assert_eq!(d.id.as_str(), asked.device_id.as_str());
            prop_assert_eq!(d.etag.as_deref(), non_empty(&asked.etag));
            prop_assert_eq!(d.force, asked.force);
            prop_assert_eq!(&d.idem.request_id, &asked.request_id);
            canonical_is_fixed(&d.idem.body, |m: pb::DeleteDeviceRequest| {
                convert::delete_device(m).map(|d| d.idem.body)
            })?;
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_push_action(req: pb::PushActionRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::push_action(req) {
        Ok(p) => {
            let Some(action) = asked.action.as_ref() else {
                return Err(fail("accepted a push without an action"));
            };
            prop_assert_eq!(p.device_id.as_str(), asked.device_id.as_str());
            prop_assert_eq!(p.validate_only, asked.validate_only);
            prop_assert_eq!(
                Some(p.strategy),
                convert::strategy_from_proto(asked.on_conflict).ok()
            );
            prop_assert_eq!(
                p.input.command,
                convert::command_from_proto(action.command).ok().flatten()
            );
            // Timestamps are exact both ways.
            prop_assert_eq!(
                p.input.start.map(Ts::parts),
                action.start_time.as_ref().map(|t| (t.seconds, t.nanos))
            );
            prop_assert_eq!(
                p.input.end.map(Ts::parts),
                action.end_time.as_ref().map(|t| (t.seconds, t.nanos))
            );
            // Quantities are passed on as sent (NaN included: validation,
            // not parsing, refuses them).
            prop_assert_eq!(
                p.input.power.map(|q| q.value.to_bits()),
                action.power.as_ref().map(|q| q.value.to_bits())
            );
            prop_assert_eq!(
                p.input.target_soc.map(|q| q.value.to_bits()),
                action.target_soc.as_ref().map(|q| q.value.to_bits())
            );
            prop_assert_eq!(
                p.input.reserve_soc.map(|q| q.value.to_bits()),
                action.reserve_soc.as_ref().map(|q| q.value.to_bits())
            );
            prop_assert_eq!(&p.idem.request_id, &asked.request_id);
            canonical_is_fixed(&p.idem.body, |m: pb::PushActionRequest| {
                convert::push_action(m).map(|p| p.idem.body)
            })?;
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_get_action(req: pb::GetActionRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::get_action(req) {
        Ok((device, action)) => {
            prop_assert_eq!(device.as_str(), asked.device_id.as_str());
            prop_assert!(
                action.to_string().eq_ignore_ascii_case(&asked.action_id),
                "{:?} read as {}",
                asked.action_id,
                action
            );
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_list_action_history(req: pb::ListActionHistoryRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::list_action_history(req) {
        Ok(page) => {
            prop_assert_eq!(page.device_id.as_str(), asked.device_id.as_str());
            prop_assert!(page.size >= 1 && page.size <= 1000, "{}", page.size);
            // Only a token this listing issued is read, and it names an
            // entry of the log.
            prop_assert!(page.after.is_none() || !asked.page_token.is_empty());
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_list_actions(req: pb::ListActionsRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::list_actions(req) {
        Ok(page) => {
            match &page.device {
                None => {
                    prop_assert_eq!(asked.device_id.as_str(), "-");
                }
                Some(d) => {
                    prop_assert_eq!(d.as_str(), asked.device_id.as_str());
                }
            }
            prop_assert!(
                page.states.windows(2).all(|w| w[0] < w[1]),
                "states not sorted and unique: {:?}",
                page.states
            );
            prop_assert!(
                page.states
                    .iter()
                    .all(|s| asked.states.contains(&(convert::state_to_proto(*s) as i32))),
                "states {:?} from {:?}",
                page.states,
                asked.states
            );
            prop_assert!(
                asked.page_size >= 0,
                "page_size {} accepted",
                asked.page_size
            );
            check_page_size(asked.page_size, page.size)?;
            prop_assert_eq!(page.before.is_some(), !asked.page_token.is_empty());
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

fn check_cancel_action(req: pb::CancelActionRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let asked = req.clone();
    match convert::cancel_action(req) {
        Ok(c) => {
            prop_assert_eq!(c.device_id.as_str(), asked.device_id.as_str());
            prop_assert!(
                c.action_id
                    .to_string()
                    .eq_ignore_ascii_case(&asked.action_id),
                "{:?} read as {}",
                asked.action_id,
                c.action_id
            );
            prop_assert_eq!(c.etag.as_deref(), non_empty(&asked.etag));
            prop_assert_eq!(&c.idem.request_id, &asked.request_id);
            canonical_is_fixed(&c.idem.body, |m: pb::CancelActionRequest| {
                convert::cancel_action(m).map(|c| c.idem.body)
            })?;
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

/// A tenant name as AdminService checks it before any lookup.
fn check_tenant(name: &str) -> Result<(), TestCaseError> {
    match admin::check_tenant_name(name) {
        Ok(()) => {
            prop_assert!(
                !name.is_empty()
                    && name.len() <= 63
                    && name.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'-'
                        || b == b'_'),
                "tenant name {:?} accepted",
                name
            );
        }
        Err(e) => check_refusal(e)?,
    }
    Ok(())
}

/// A scope list, against a model of its documented rule: every non-blank
/// name (trimmed) is a known scope, duplicates merged in first-seen order,
/// at least one. A refusal is reported as CreateApiKey reports it.
fn check_scope_list(names: &[&str]) -> Result<(), TestCaseError> {
    let mut expected: Vec<Scope> = Vec::new();
    let mut unknown = false;
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        match Scope::parse(n) {
            Some(s) => {
                if !expected.contains(&s) {
                    expected.push(s);
                }
            }
            None => unknown = true,
        }
    }
    match Scope::parse_list(names.iter().copied()) {
        Ok(scopes) => {
            prop_assert!(
                !unknown && !expected.is_empty(),
                "accepted {:?} as {:?}",
                names,
                scopes
            );
            prop_assert_eq!(scopes, expected);
        }
        Err(why) => {
            prop_assert!(
                unknown || expected.is_empty(),
                "refused {:?}: {}",
                names,
                why
            );
            // The name repeated is cut to 40 bytes: even escaped, the
            // reason stays short.
            prop_assert!(why.len() <= 512, "a {}-byte reason", why.len());
            check_refusal(Error::invalid("scopes", Reason::InvalidField, why))?;
        }
    }
    Ok(())
}

fn check_key_id(s: &str) -> Result<(), TestCaseError> {
    if auth::is_key_id(s) {
        prop_assert!(
            s.len() == 16 && s.bytes().all(|b| KEY_ALPHABET.contains(&b)),
            "{:?} taken for a key id",
            s
        );
    }
    Ok(())
}

fn check_key_id_of(key: &str) -> Result<(), TestCaseError> {
    if let Some(id) = auth::key_id_of(key) {
        prop_assert_eq!(id.len(), 16, "key id {:?} of {:?}", id, key);
        prop_assert!(
            id.bytes().all(|b| KEY_ALPHABET.contains(&b)),
            "key id {:?} outside the alphabet",
            id
        );
        prop_assert!(auth::is_key_id(id), "key id {:?} is not a key id", id);
        prop_assert!(
            key.strip_prefix("sy_")
                .is_some_and(|rest| rest.starts_with(id)),
            "key id {:?} is not the start of {:?}",
            id,
            key
        );
        prop_assert_eq!(key.len(), 3 + 16 + 1 + 52, "{:?}", key);
    }
    check_key_id(key)
}

fn check_create_tenant(req: pb::CreateTenantRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let pb::CreateTenantRequest {
        name,
        rate_per_second: _,
        rate_burst: _,
    } = req;
    check_tenant(&name)
}

fn check_list_tenants(req: pb::ListTenantsRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    // Nothing to read; a field added here must be checked above.
    let pb::ListTenantsRequest {} = req;
    Ok(())
}

fn check_create_api_key(req: pb::CreateApiKeyRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let pb::CreateApiKeyRequest {
        tenant,
        scopes,
        expires_in: _,
        description: _,
    } = req;
    if !tenant.is_empty() {
        check_tenant(&tenant)?;
    }
    let names: Vec<&str> = scopes.iter().map(String::as_str).collect();
    check_scope_list(&names)
}

fn check_list_api_keys(req: pb::ListApiKeysRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let pb::ListApiKeysRequest { tenant } = req;
    if !tenant.is_empty() {
        check_tenant(&tenant)?;
    }
    Ok(())
}

fn check_revoke_api_key(req: pb::RevokeApiKeyRequest) -> Result<(), TestCaseError> {
    check_reencode(&req)?;
    let pb::RevokeApiKeyRequest { key_id } = req;
    check_key_id(&key_id)
}

/// Decodes `bytes` as `M` and, when they decode, checks the message.
fn decoded<M: Message + Default>(
    bytes: &[u8],
    check: impl Fn(M) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    match M::decode(bytes) {
        Ok(m) => check(m),
        Err(_) => Ok(()),
    }
}

// ---- strategies: bytes -------------------------------------------------------

fn raw_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(field: u32, wire: u32) -> Vec<u8> {
    let mut b = Vec::new();
    put_varint(&mut b, u64::from((field << 3) | wire));
    b
}

fn len_field(field: u32, body: &[u8]) -> Vec<u8> {
    let mut b = tag(field, 2);
    put_varint(&mut b, body.len() as u64);
    b.extend_from_slice(body);
    b
}

/// Mostly the field numbers the requests use (1 to 19), some unknown.
fn field_number() -> impl Strategy<Value = u32> {
    prop_oneof![5 => 1u32..8, 2 => 8u32..20, 1 => 20u32..1000]
}

fn varint_values() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..16,
        2 => any::<u64>(),
        // Negative int32s, as protobuf sends them: ten bytes.
        1 => any::<i32>().prop_map(|i| i64::from(i) as u64),
        1 => Just(u64::MAX),
    ]
}

fn short_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9-]{0,20}",
        1 => any::<u128>().prop_map(|n| ActionId::from_u128(n).to_string()),
        1 => Just("-".to_owned()),
        2 => chars(0..12),
    ]
}

/// One protobuf field of any wire type, the length-delimited ones holding
/// text, raw bytes or packed varints.
fn scalar_field() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => (field_number(), varint_values()).prop_map(|(n, v)| {
            let mut b = tag(n, 0);
            put_varint(&mut b, v);
            b
        }),
        1 => (field_number(), any::<u64>()).prop_map(|(n, v)| {
            let mut b = tag(n, 1);
            b.extend_from_slice(&v.to_le_bytes());
            b
        }),
        1 => (field_number(), any::<u32>()).prop_map(|(n, v)| {
            let mut b = tag(n, 5);
            b.extend_from_slice(&v.to_le_bytes());
            b
        }),
        3 => (field_number(), short_text()).prop_map(|(n, s)| len_field(n, s.as_bytes())),
        1 => (field_number(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(n, raw)| len_field(n, &raw)),
        1 => (field_number(), prop::collection::vec(varint_values(), 0..6)).prop_map(|(n, vs)| {
            let mut body = Vec::new();
            for v in vs {
                put_varint(&mut body, v);
            }
            len_field(n, &body)
        }),
    ]
    .boxed()
}

/// Bytes shaped like protobuf, nested up to three messages deep (a push's
/// action's quantity), so that many of them decode.
fn proto_shaped() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop::collection::vec(scalar_field(), 0..6).prop_map(|fs| fs.concat());
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop::collection::vec(
            prop_oneof![
                3 => scalar_field(),
                2 => (field_number(), inner).prop_map(|(n, body)| len_field(n, &body)),
            ],
            0..6,
        )
        .prop_map(|fs| fs.concat())
    })
}

/// Byte edits to a valid encoding: overwritten bytes, then a cut.
type Edits = (Vec<(usize, u8)>, Option<usize>);

fn edits() -> impl Strategy<Value = Edits> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        prop::option::of(any::<usize>()),
    )
}

fn mutate(mut bytes: Vec<u8>, edits: &Edits) -> Vec<u8> {
    let (changes, cut) = edits;
    if !bytes.is_empty() {
        for (at, b) in changes {
            let i = at % bytes.len();
            bytes[i] = *b;
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c % (bytes.len() + 1));
    }
    bytes
}

// ---- strategies: hostile field values ---------------------------------------

/// Any characters: controls, combining marks, unassigned code points.
fn chars(len: Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), len).prop_map(|cs| cs.into_iter().collect::<String>())
}

/// Text of any characters, mostly short; some around the 200-character
/// limits, some of thousands.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => chars(0..40),
        2 => "[a-z0-9_.:/ -]{0,40}",
        1 => chars(190..260),
        1 => chars(1000..3000),
        1 => Just(String::new()),
    ]
    .boxed()
}

fn device_id_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        1 => "[a-z0-9-]{60,70}",
        1 => Just(String::new()),
        2 => text(),
    ]
    .boxed()
}

fn action_id_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => any::<u128>().prop_map(|n| ActionId::from_u128(n).to_string()),
        1 => any::<u128>().prop_map(|n| ActionId::from_u128(n).to_string().to_uppercase()),
        1 => "[0-9a-fA-F-]{30,40}",
        1 => Just(String::new()),
        2 => text(),
    ]
    .boxed()
}

fn request_id() -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => "[A-Za-z0-9-]{1,140}",
        1 => text(),
    ]
    .boxed()
}

/// Enum numbers: the known ones, just outside them, and any.
fn enum_int() -> impl Strategy<Value = i32> {
    prop_oneof![
        6 => -1i32..12,
        1 => any::<i32>(),
        1 => Just(i32::MIN),
        1 => Just(i32::MAX),
    ]
}

fn page_sizes() -> impl Strategy<Value = i32> {
    prop_oneof![3 => -2i32..1100, 1 => any::<i32>()]
}

/// Timestamp seconds: plausible, any, and both edges of what nanoseconds
/// in an i64 can hold (1677 and 2262).
fn seconds() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..4_000_000_000,
        2 => any::<i64>(),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        2 => -9_223_372_038i64..-9_223_372_035,
        2 => 9_223_372_035i64..9_223_372_038,
    ]
}

fn nanos() -> impl Strategy<Value = i32> {
    prop_oneof![
        4 => 0i32..1_000_000_000,
        2 => any::<i32>(),
        1 => Just(-1i32),
        1 => Just(1_000_000_000i32),
        1 => Just(999_999_999i32),
        // Around the last nanosecond of 2262.
        1 => 854_775_800i32..854_775_815,
    ]
}

fn timestamp() -> impl Strategy<Value = prost_types::Timestamp> {
    (seconds(), nanos()).prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos })
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1.0e6f64..1.0e6,
        2 => any::<f64>(),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(-0.0f64),
        1 => Just(f64::MAX),
    ]
}

fn quantity() -> impl Strategy<Value = pb::Quantity> {
    (float(), enum_int()).prop_map(|(value, unit)| pb::Quantity { value, unit })
}

/// An action with every field hostile, the output-only ones included.
fn action() -> impl Strategy<Value = pb::Action> {
    // Boxed in parts: as one nested tuple, a debug build's value tree
    // overflows the test thread's 2 MiB stack while generating.
    let read = (
        enum_int(),
        prop::option::of(quantity()),
        prop::option::of(quantity()),
        prop::option::of(quantity()),
        prop::option::of(timestamp()),
        prop::option::of(timestamp()),
    )
        .boxed();
    let output_only = (
        (
            action_id_text(),
            device_id_text(),
            enum_int(),
            action_id_text(),
        ),
        prop::collection::vec(action_id_text(), 0..4),
        (
            text(),
            text(),
            prop::option::of(timestamp()),
            prop::option::of(timestamp()),
        ),
        (text(), text(), text(), any::<bool>()),
    )
        .boxed();
    (read, output_only).prop_map(
        |(
            (command, power, target_soc, reserve_soc, start_time, end_time),
            (
                (action_id, device_id, state, replaced_by_action_id),
                queued_after_action_ids,
                (error_code, error_message, create_time, update_time),
                (etag, channel, oem_response, verified),
            ),
        )| pb::Action {
            action_id,
            device_id,
            command,
            power,
            target_soc,
            reserve_soc,
            start_time,
            end_time,
            state,
            replaced_by_action_id,
            queued_after_action_ids,
            error_code,
            error_message,
            create_time,
            update_time,
            etag,
            channel,
            oem_response,
            verified,
        },
    )
}

/// The action as the server reads it: its output-only fields cleared.
fn without_output_only(a: pb::Action) -> pb::Action {
    let pb::Action {
        command,
        power,
        target_soc,
        reserve_soc,
        start_time,
        end_time,
        ..
    } = a;
    pb::Action {
        command,
        power,
        target_soc,
        reserve_soc,
        start_time,
        end_time,
        ..Default::default()
    }
}

fn push_request() -> impl Strategy<Value = pb::PushActionRequest> {
    (
        device_id_text(),
        prop::option::weighted(0.9, action()),
        enum_int(),
        any::<bool>(),
        request_id(),
    )
        .prop_map(
            |(device_id, action, on_conflict, validate_only, request_id)| pb::PushActionRequest {
                device_id,
                action,
                on_conflict,
                validate_only,
                request_id,
            },
        )
}

fn settings_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z0-9_.-]{1,20}",
        1 => "[a-z]{60,80}",
        2 => text(),
    ]
}

fn settings() -> impl Strategy<Value = std::collections::BTreeMap<String, String>> {
    prop::collection::btree_map(settings_key(), text(), 0..12)
}

fn device() -> impl Strategy<Value = pb::Device> {
    let drivers = prop_oneof![
        1 => Just(String::new()),
        2 => Just("simulated".to_owned()),
        2 => text(),
    ];
    let timezones = prop_oneof![
        2 => Just(String::new()),
        1 => Just("Europe/London".to_owned()),
        2 => text(),
    ];
    (
        (
            device_id_text(),
            text(),
            enum_int(),
            drivers,
            text(),
            timezones,
        ),
        settings(),
        (
            prop::option::of(Just(pb::DeviceCapabilities {
                native_scheduler: true,
                ..Default::default()
            })),
            text(),
            prop::option::of(timestamp()),
            prop::option::of(timestamp()),
            prop::option::of(Just(pb::ObservedState {
                scheduler_active: true,
                ..Default::default()
            })),
        ),
    )
        .prop_map(
            |(
                (device_id, display_name, family, driver, oem_device_id, timezone),
                settings,
                (capabilities, etag, create_time, update_time, observed_state),
            )| pb::Device {
                device_id,
                display_name,
                family,
                driver,
                oem_device_id,
                timezone,
                settings,
                capabilities,
                etag,
                create_time,
                update_time,
                observed_state,
            },
        )
}

/// The device with its output-only fields cleared (`etag` too when
/// `keep_etag` is false: a create does not read it).
fn device_without_output_only(d: pb::Device, keep_etag: bool) -> pb::Device {
    pb::Device {
        capabilities: None,
        create_time: None,
        update_time: None,
        observed_state: None,
        etag: if keep_etag {
            d.etag.clone()
        } else {
            String::new()
        },
        ..d
    }
}

fn create_request() -> impl Strategy<Value = pb::CreateDeviceRequest> {
    (
        0u8..4,
        device_id_text(),
        prop::option::weighted(0.9, device()),
        request_id(),
    )
        .prop_map(|(mode, id, device, request_id)| {
            let mut device = device;
            let device_id = match mode {
                // The id beside the device only.
                0 => {
                    if let Some(d) = device.as_mut() {
                        d.device_id.clear();
                    }
                    id
                }
                // Inside the device only.
                1 => String::new(),
                // In both places, the same.
                2 => {
                    if let Some(d) = device.as_mut() {
                        d.device_id = id.clone();
                    }
                    id
                }
                // In both places as drawn: mostly different.
                _ => id,
            };
            pb::CreateDeviceRequest {
                device_id,
                device,
                request_id,
            }
        })
}

fn mask_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0..MASK_PATHS.len()).prop_map(|i| MASK_PATHS[i].to_owned()),
        1 => text(),
    ]
}

fn update_request() -> impl Strategy<Value = pb::UpdateDeviceRequest> {
    (
        prop::option::weighted(0.9, device()),
        prop::option::weighted(0.9, prop::collection::vec(mask_path(), 0..8)),
        request_id(),
    )
        .prop_map(|(device, paths, request_id)| pb::UpdateDeviceRequest {
            device,
            update_mask: paths.map(|paths| prost_types::FieldMask { paths }),
            request_id,
        })
}

fn page_token() -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(String::new()),
        2 => (text(), text()).prop_map(|(scope, last)| encode_token(&scope, &last)),
        1 => "[A-Za-z0-9_-]{1,80}",
        1 => text(),
    ]
    .boxed()
}

fn list_actions_request() -> impl Strategy<Value = pb::ListActionsRequest> {
    (
        prop_oneof![1 => Just("-".to_owned()), 3 => device_id_text()],
        prop::collection::vec(enum_int(), 0..6),
        page_sizes(),
        page_token(),
    )
        .prop_map(
            |(device_id, states, page_size, page_token)| pb::ListActionsRequest {
                device_id,
                states,
                page_size,
                page_token,
            },
        )
}

fn scope_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0..Scope::ALL.len(), "[ \t]{0,2}", "[ \t]{0,2}")
            .prop_map(|(i, before, after)| format!("{before}{}{after}", Scope::ALL[i].as_str())),
        1 => Just("webhooks:*".to_owned()),
        1 => Just(String::new()),
        2 => text(),
    ]
}

/// Keys close to `sy_<16>_<52>`: each part well-formed or not.
fn near_key() -> impl Strategy<Value = String> {
    let id = prop_oneof![
        3 => "[a-z2-7]{16}",
        1 => "[a-z0-9A-Z_]{0,20}",
        1 => text(),
    ];
    let sep = prop_oneof![4 => Just("_".to_owned()), 1 => "[-_. ]{0,2}"];
    let secret = prop_oneof![
        3 => "[a-z2-7]{52}",
        1 => "[a-z2-7]{50,54}",
        1 => "[a-z0-9A-Z_]{0,60}",
        1 => text(),
    ];
    (id, sep, secret).prop_map(|(id, sep, secret)| format!("sy_{id}{sep}{secret}"))
}

// ---- properties: arbitrary bytes, every request type ---------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn create_device_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_create_device)?;
        decoded(&shaped, check_create_device)?;
    }

    #[test]
    fn get_device_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_get_device)?;
        decoded(&shaped, check_get_device)?;
    }

    #[test]
    fn list_devices_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_list_devices)?;
        decoded(&shaped, check_list_devices)?;
    }

    #[test]
    fn update_device_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_update_device)?;
        decoded(&shaped, check_update_device)?;
    }

    #[test]
    fn delete_device_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_delete_device)?;
        decoded(&shaped, check_delete_device)?;
    }

    #[test]
    fn push_action_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_push_action)?;
        decoded(&shaped, check_push_action)?;
    }

    #[test]
    fn get_action_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_get_action)?;
        decoded(&shaped, check_get_action)?;
    }

    #[test]
    fn list_action_history_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_list_action_history)?;
        decoded(&shaped, check_list_action_history)?;
    }

    #[test]
    fn list_actions_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_list_actions)?;
        decoded(&shaped, check_list_actions)?;
    }

    #[test]
    fn cancel_action_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_cancel_action)?;
        decoded(&shaped, check_cancel_action)?;
    }

    #[test]
    fn create_tenant_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_create_tenant)?;
        decoded(&shaped, check_create_tenant)?;
    }

    #[test]
    fn list_tenants_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_list_tenants)?;
        decoded(&shaped, check_list_tenants)?;
    }

    #[test]
    fn create_api_key_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_create_api_key)?;
        decoded(&shaped, check_create_api_key)?;
    }

    #[test]
    fn list_api_keys_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_list_api_keys)?;
        decoded(&shaped, check_list_api_keys)?;
    }

    #[test]
    fn revoke_api_key_request_bytes(bytes in raw_bytes(), shaped in proto_shaped()) {
        decoded(&bytes, check_revoke_api_key)?;
        decoded(&shaped, check_revoke_api_key)?;
    }
}

// ---- properties: valid encodings with bytes changed ------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn push_action_encodings_with_bytes_changed(req in push_request(), edits in edits()) {
        decoded(&mutate(req.encode_to_vec(), &edits), check_push_action)?;
    }

    #[test]
    fn create_device_encodings_with_bytes_changed(req in create_request(), edits in edits()) {
        decoded(&mutate(req.encode_to_vec(), &edits), check_create_device)?;
    }

    #[test]
    fn update_device_encodings_with_bytes_changed(req in update_request(), edits in edits()) {
        decoded(&mutate(req.encode_to_vec(), &edits), check_update_device)?;
    }
}

// ---- properties: decodable but hostile field values --------------------------

proptest! {
    #![proptest_config(config())]

    /// Unicode, huge and negative numbers, NaN, out-of-range timestamps,
    /// unknown enum numbers; and the action's output-only fields are
    /// ignored, as the API promises.
    #[test]
    fn push_action_from_hostile_field_values(req in push_request()) {
        check_push_action(req.clone())?;
        let read = pb::PushActionRequest {
            action: req.action.clone().map(without_output_only),
            ..req.clone()
        };
        prop_assert_eq!(
            convert::push_action(req).map(|p| p.idem.body),
            convert::push_action(read).map(|p| p.idem.body),
            "output-only fields of the action changed how the push is read"
        );
    }

    /// Arbitrary settings maps (any keys and values, long ones), names
    /// around their limits, the id in either place or both; output-only
    /// fields of the device are ignored.
    #[test]
    fn create_device_from_hostile_field_values(req in create_request()) {
        check_create_device(req.clone())?;
        let read = pb::CreateDeviceRequest {
            device: req.device.clone().map(|d| device_without_output_only(d, false)),
            ..req.clone()
        };
        prop_assert_eq!(
            convert::create_device(req).map(|c| (c.idem.body, c.violations)),
            convert::create_device(read).map(|c| (c.idem.body, c.violations)),
            "output-only fields of the device changed how the create is read"
        );
    }

    /// Masks naming writable, immutable, output-only, unknown and repeated
    /// paths; output-only fields of the device are ignored.
    #[test]
    fn update_device_from_hostile_field_values(req in update_request()) {
        check_update_device(req.clone())?;
        let read = pb::UpdateDeviceRequest {
            device: req.device.clone().map(|d| device_without_output_only(d, true)),
            ..req.clone()
        };
        prop_assert_eq!(
            convert::update_device(req).map(|u| u.idem.body),
            convert::update_device(read).map(|u| u.idem.body),
            "output-only fields of the device changed how the update is read"
        );
    }

    /// Listings of any device and states, any page size and token; a token
    /// the server issues for a listing continues it, and one for it whose
    /// key is not an action id is INVALID_PAGE_TOKEN.
    #[test]
    fn list_actions_from_hostile_field_values(
        req in list_actions_request(),
        n in any::<u128>(),
        last in text(),
    ) {
        check_list_actions(req.clone())?;
        let first = pb::ListActionsRequest { page_token: String::new(), ..req };
        if let Ok(page) = convert::list_actions(first.clone()) {
            let id = ActionId::from_u128(n);
            let next = pb::ListActionsRequest {
                page_token: encode_token(&page.scope, &id.to_string()),
                ..first.clone()
            };
            match convert::list_actions(next) {
                Ok(p) => {
                    prop_assert_eq!(p.before, Some(id));
                }
                Err(e) => {
                    return Err(fail(format!("refused its own page token: {e:?}")));
                }
            }
            if ActionId::parse(&last).is_err() {
                let bad = pb::ListActionsRequest {
                    page_token: encode_token(&page.scope, &last),
                    ..first
                };
                match convert::list_actions(bad) {
                    Ok(p) => {
                        return Err(fail(format!(
                            "a token for {last:?} was accepted as {:?}",
                            p.before
                        )));
                    }
                    Err(e) => {
                        prop_assert!(
                            matches!(&e, Error::Invalid(v)
                                if v.iter().any(|v| v.reason == Reason::InvalidPageToken)),
                            "{:?}",
                            e
                        );
                        check_refusal(e)?;
                    }
                }
            }
        }
    }

    /// Device listings: any page size and token; the token the handler
    /// issues (scope "devices", as in devices.rs) continues after its key.
    #[test]
    fn list_devices_page_tokens_round_trip(
        size in page_sizes(),
        token in page_token(),
        last in text(),
    ) {
        check_list_devices(pb::ListDevicesRequest { page_size: size, page_token: token })?;
        let req = pb::ListDevicesRequest {
            page_size: size,
            page_token: encode_token("devices", &last),
        };
        match convert::list_devices(req) {
            Ok(page) => {
                prop_assert!(size >= 0 && !last.contains('|'), "accepted {} {:?}", size, last);
                prop_assert_eq!(page.after, Some(last));
            }
            Err(e) => {
                // A key with '|' is not one the server issues (device ids
                // have none): its token does not parse as this listing's.
                prop_assert!(size < 0 || last.contains('|'), "refused its own token: {:?}", e);
                check_refusal(e)?;
            }
        }
    }
}

// ---- properties: AdminService and API key parsing ----------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn key_ids_of_any_string_are_well_formed(s in any::<String>(), t in text()) {
        check_key_id_of(&s)?;
        check_key_id_of(&t)?;
    }

    #[test]
    fn key_ids_of_sy_strings_are_well_formed(rest in text(), near in near_key()) {
        check_key_id_of(&format!("sy_{rest}"))?;
        check_key_id_of(&near)?;
    }

    #[test]
    fn every_well_formed_key_yields_its_id(id in "[a-z2-7]{16}", secret in "[a-z2-7]{52}") {
        let key = format!("sy_{id}_{secret}");
        prop_assert_eq!(auth::key_id_of(&key), Some(id.as_str()));
        prop_assert!(auth::is_key_id(&id));
    }

    #[test]
    fn scope_lists_parse_or_refuse_without_panicking(
        names in prop::collection::vec(scope_name(), 0..6),
        s in any::<String>(),
    ) {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        check_scope_list(&names)?;
        // As the command line splits them.
        let split: Vec<&str> = s.split(',').collect();
        check_scope_list(&split)?;
        check_scope_list(&[s.as_str()])?;
    }

    #[test]
    fn tenant_names_are_checked_without_panicking(
        name in prop_oneof![
            2 => "[a-z0-9_-]{0,70}",
            1 => "[a-zA-Z0-9_. -]{0,70}",
            2 => text(),
        ],
    ) {
        check_tenant(&name)?;
    }
}
