//! The gRPC edge: each handler parses its request ([`convert`]), delegates
//! to the store, and converts the answer back; errors become statuses in
//! one place ([`status`]), so handlers just use `?`.

pub mod actions;
pub mod admin;
pub mod convert;
pub mod devices;
pub mod events;
pub mod status;
pub mod webhooks;

#[cfg(test)]
mod fuzz_tests;

use std::{future::Future, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use prost::Message;
use switchyard_drivers::{Capabilities, Registry};

use crate::{
    auth::Caller,
    domain::{Clock, Device, DeviceId, Error, Reason, TenantId},
    store::{IdemRequest, Store, Written},
};

/// Longest accepted request_id.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Default page size.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page size; larger requests are coerced down.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// How long CreateDevice and UpdateDevice wait to observe the device before
/// answering without an observation (the dispatcher observes it later).
pub const OBSERVE_ON_CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct App {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    /// How far ahead a start may be, in nanoseconds.
    pub horizon_nanos: i64,
    /// How long finished actions are kept (after their last change), in
    /// nanoseconds; 0 keeps them for ever.
    pub retention_nanos: i64,
    /// PostgreSQL: how often the busiest tables' statistics are checked,
    /// and those changed enough analysed (`Store::refresh_statistics`);
    /// zero never.
    pub analyze_every: std::time::Duration,
    /// Wakes the dispatcher: work may be due now.
    pub wake: Arc<crate::dispatch::Wake>,
    /// The OEM accounts' rate budgets, shared with the dispatcher: the
    /// observations made on CreateDevice and UpdateDevice count too.
    pub budgets: Arc<crate::dispatch::Budgets>,
    /// Who the call being served comes from ([`App::for_call`]); the
    /// default tenant outside calls (the demo devices).
    pub caller: Caller,
    /// Webhook delivery's configuration (`--webhook-*`), which
    /// WebhookService checks endpoints against.
    pub webhooks: Arc<crate::delivery::DeliveryConfig>,
}

impl App {
    /// The tenant whose data the call being served reads and writes.
    pub fn tenant(&self) -> TenantId {
        self.caller.tenant.clone()
    }

    /// The state for serving `request`, as its caller: the auth layer
    /// names the caller of every call it lets through. A call it did not
    /// see is refused (never served as some default tenant).
    pub fn for_call<T>(&self, request: &tonic::Request<T>) -> Result<App, tonic::Status> {
        let Some(caller) = request.extensions().get::<Caller>() else {
            return Err(status::to_status(Error::Internal(
                "a call reached a handler without passing the auth layer".into(),
            )));
        };
        let mut app = self.clone();
        app.caller = caller.clone();
        tracing::Span::current().record("tenant_id", caller.tenant.as_str());
        Ok(app)
    }

    /// What the device's driver can do with it; `None` if its driver or
    /// settings are no longer valid.
    pub fn capabilities(&self, d: &Device) -> Option<Capabilities> {
        let f = self.registry.get(&d.driver)?;
        f.capabilities(&d.spec()).ok()
    }

    /// Reads the state of a device about to be registered or
    /// reconfigured as `device`, so that the answer (and the first push)
    /// already sees its native scheduler. Within the OEM account's rate
    /// budget and [`OBSERVE_ON_CHANGE_TIMEOUT`]; `None` when it cannot be
    /// read (the dispatcher tries again later).
    pub async fn observe(&self, device: &Device) -> Option<crate::domain::Observed> {
        let driver = self
            .registry
            .get(&device.driver)?
            .build(&device.spec())
            .ok()?;
        // A device being created has none; one being reconfigured keeps
        // its actions' memos.
        let live = self
            .store
            .memos(&self.tenant(), &device.id)
            .await
            .unwrap_or_default();
        let read =
            crate::dispatch::read_state(&self.budgets, self.clock.as_ref(), driver.as_ref(), &live);
        tokio::time::timeout(OBSERVE_ON_CHANGE_TIMEOUT, read)
            .await
            .ok()
            .flatten()
    }

    /// Runs a mutation under `request_id` idempotency: the same key with the
    /// same body returns the stored answer; another body is refused. The
    /// key is checked, the change made and the key written with its answer
    /// in one savepoint of one group commit (`store/idem.rs`,
    /// `Store::write_once`), so a duplicate, even a concurrent one, is
    /// decided after it and replays its answer, and a mutation that fails,
    /// or a call dropped before its turn, writes no key.
    pub async fn idempotent<T, Resp, Conv, Run, Fut>(
        &self,
        method: &'static str,
        prework: Prework,
        idem: &convert::Idem,
        to_resp: Conv,
        run: Run,
    ) -> Result<Ran<T, Resp>, Error>
    where
        Resp: Message + Default,
        Conv: Fn(&T) -> Resp + Send + Sync + 'static,
        Run: FnOnce(Option<IdemRequest<T>>) -> Fut,
        Fut: Future<Output = Result<Written<T>, Error>>,
    {
        let request = if idem.request_id.is_empty() {
            None
        } else {
            check_request_id(&idem.request_id)?;
            // A retry of a finished request is answered from its record,
            // before any check or OEM call the mutation would make.
            if prework == Prework::ReadsAndOemCalls {
                let recorded = self
                    .store
                    .idem_recorded(&self.tenant(), &idem.request_id, method, &idem.body)
                    .await?;
                if let Some(bytes) = recorded {
                    return decode(&bytes).map(Ran::Replayed);
                }
            }
            Some(IdemRequest {
                request_id: idem.request_id.clone(),
                method,
                body: idem.body.clone(),
                encode: Arc::new(move |t: &T| to_resp(t).encode_to_vec()),
            })
        };
        let key = request.as_ref().map(|r| r.request_id.clone());
        match run(request).await {
            Ok(Written::Fresh(t)) => Ok(Ran::Fresh(t)),
            Ok(Written::Replayed(bytes)) => decode(&bytes).map(Ran::Replayed),
            // Refused before its write (a device that exists, a stale
            // etag): the original request may have committed since this
            // one looked its key up, and be what refused it. Then its
            // answer is this one's.
            Err(e) => match key {
                Some(key) if !e.is_storage() => {
                    match self
                        .store
                        .idem_recorded(&self.tenant(), &key, method, &idem.body)
                        .await
                    {
                        Ok(Some(bytes)) => decode(&bytes).map(Ran::Replayed),
                        _ => Err(e),
                    }
                }
                _ => Err(e),
            },
        }
    }
}

/// A recorded answer as its message.
fn decode<Resp: Message + Default>(bytes: &[u8]) -> Result<Resp, Error> {
    Resp::decode(bytes).map_err(|e| Error::Internal(format!("stored response: {e}")))
}

/// What a mutation does before its write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prework {
    /// Nothing: its write finds a replay itself.
    None,
    /// Reads and OEM calls a retry of a finished request must not repeat:
    /// its record is looked up first.
    ReadsAndOemCalls,
}

/// What an idempotent mutation came to.
#[derive(Debug)]
pub enum Ran<T, Resp> {
    /// It ran now.
    Fresh(T),
    /// It had run before: its stored answer.
    Replayed(Resp),
}

impl<T, Resp> Ran<T, Resp> {
    /// The answer: a fresh outcome converted, or the stored one.
    pub fn answer(self, convert: impl FnOnce(T) -> Resp) -> Resp {
        match self {
            Ran::Fresh(t) => convert(t),
            Ran::Replayed(r) => r,
        }
    }
}

/// Checks a request_id's form (also of calls that record none).
pub fn check_request_id(id: &str) -> Result<(), Error> {
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

/// Decodes a page token; it must have been issued for `scope`. `rule`
/// says what must stay the same between pages of this listing.
pub fn decode_token(token: &str, scope: &str, rule: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        Error::invalid(
            "page_token",
            Reason::InvalidPageToken,
            format!(
                "page_token is not a next_page_token this server issued for this listing{rule}"
            ),
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
