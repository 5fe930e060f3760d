//! The gRPC edge: handlers convert proto ⇄ domain and delegate to the
//! store; errors become statuses in one place ([`status::to_status`]).

pub mod actions;
pub mod convert;
pub mod devices;
pub mod status;

use std::{future::Future, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use prost::Message;
use switchyard_drivers::{Capabilities, Registry};

use crate::{
    domain::{Clock, Device, DeviceId, Error, FieldViolation, Reason, TenantId, Ts},
    store::{IdemBegin, IdemCommit, Store},
};

/// Longest accepted request_id.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Default page size.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page size; larger requests are coerced down.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct App {
    /// The database.
    pub store: Store,
    /// The drivers.
    pub registry: Arc<Registry>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// How far ahead a start may be, in nanoseconds.
    pub horizon_nanos: i64,
    /// Wakes the dispatcher: work may be due now.
    pub wake: Arc<tokio::sync::Notify>,
}

impl App {
    /// The tenant of a request (one default tenant until API keys exist).
    pub fn tenant(&self) -> TenantId {
        TenantId::default_tenant()
    }

    /// What the device's driver can do with it; `None` if its driver or
    /// settings are no longer valid.
    pub fn capabilities(&self, d: &Device) -> Option<Capabilities> {
        let f = self.registry.get(&d.driver)?;
        f.capabilities(&d.spec()).ok()
    }

    /// Runs a mutation under `request_id` idempotency: the same key with the
    /// same body returns the stored answer; another body is refused; a
    /// concurrent duplicate is told to retry. A failed mutation releases
    /// the key (it changed nothing).
    pub async fn idempotent<T, Resp, Conv, Run, Fut>(
        &self,
        method: &'static str,
        request_id: &str,
        body: Vec<u8>,
        to_resp: Conv,
        run: Run,
    ) -> Result<Resp, Error>
    where
        Resp: Message + Default,
        Conv: Fn(&T) -> Resp + Clone + Send + 'static,
        Run: FnOnce(Option<IdemCommit<T>>) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        if request_id.is_empty() {
            return run(None).await.map(|t| to_resp(&t));
        }
        check_request_id(request_id)?;
        let tenant = self.tenant();
        match self
            .store
            .idem_begin(&tenant, request_id, method, &body)
            .await?
        {
            IdemBegin::Replay(bytes) => Resp::decode(bytes.as_slice())
                .map_err(|e| Error::Internal(format!("stored response: {e}"))),
            IdemBegin::Fresh(claim) => {
                let conv = to_resp.clone();
                let commit = IdemCommit {
                    request_id: request_id.to_owned(),
                    claim: claim.clone(),
                    encode: Box::new(move |t: &T| conv(t).encode_to_vec()),
                };
                match run(Some(commit)).await {
                    Ok(t) => Ok(to_resp(&t)),
                    Err(e) => {
                        if let Err(abort) = self.store.idem_abort(&tenant, request_id, &claim).await
                        {
                            tracing::warn!(error = %abort, "could not release request_id");
                        }
                        Err(e)
                    }
                }
            }
        }
    }
}

fn check_request_id(id: &str) -> Result<(), Error> {
    if id.len() > MAX_REQUEST_ID_LEN || id.chars().any(char::is_control) {
        return Err(Error::invalid(
            "request_id",
            Reason::InvalidField,
            format!(
                "request_id must be at most {MAX_REQUEST_ID_LEN} bytes with no control characters"
            ),
        ));
    }
    Ok(())
}

/// Parses a device id from a request field.
pub fn parse_device_id(s: &str, field: &str) -> Result<DeviceId, Error> {
    if s.is_empty() {
        return Err(Error::invalid(
            field,
            Reason::MissingField,
            format!("{field} is required"),
        ));
    }
    DeviceId::parse(s)
        .map_err(|why| Error::invalid(field, Reason::InvalidField, format!("{field} {why}")))
}

/// Checks a string field's length.
pub fn check_len(out: &mut Vec<FieldViolation>, field: &str, value: &str, max: usize) {
    if value.len() > max {
        out.push(FieldViolation::new(
            field,
            Reason::InvalidField,
            format!("{field} must be at most {max} bytes"),
        ));
    }
}

/// Page size from a request: 0 → default; larger than the maximum →
/// coerced; negative → invalid.
pub fn page_size(n: i32) -> Result<u32, Error> {
    match n {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::invalid(
            "page_size",
            Reason::InvalidField,
            "page_size must not be negative",
        )),
        n => Ok((n as u32).min(MAX_PAGE_SIZE)),
    }
}

/// Encodes a page token bound to the listing's `scope`.
pub fn encode_token(scope: &str, last: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{scope}|{last}"))
}

/// Decodes a page token; it must have been issued for `scope`.
pub fn decode_token(token: &str, scope: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::invalid(
            "page_token",
            Reason::InvalidPageToken,
            "page_token was not issued for this listing (filters must not change between pages)",
        )
    };
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let (sc, last) = s.rsplit_once('|').ok_or_else(bad)?;
    if sc != scope {
        return Err(bad());
    }
    Ok(Some(last.to_owned()))
}

/// Request bytes with the idempotency key cleared, for comparing retries.
pub fn body_without_key<M: Message + Clone>(m: &M, clear: impl FnOnce(&mut M)) -> Vec<u8> {
    let mut c = m.clone();
    clear(&mut c);
    c.encode_to_vec()
}

/// `now` of the app's clock.
pub fn now(app: &App) -> Ts {
    app.clock.now()
}
