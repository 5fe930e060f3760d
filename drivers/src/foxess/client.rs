//! Signed calls to the FoxESS Open API and the classification of every
//! answer into the driver's closed error set.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

use super::wire::{
    ERRNO_BAD_PARAMS, ERRNO_DAILY_LIMIT, ERRNO_OK, ERRNO_OVERLAP, ERRNO_RATE_LIMITED,
    ERRNO_SCHEDULER_ACTIVE, ERRNO_SIGNATURE_EXPIRED, ERRNO_STALE_FENCE, ERRNO_TOKEN_INVALID,
    ERRNO_TOKEN_REFUSED, Envelope, PATH_SET, PATH_SET_FLAG, signature,
};
use crate::{
    driver::{DriverError, ErrorKind},
    operator::Secret,
};

/// How long to wait after errno 40400. FoxESS does not say; a minute
/// matches its polling guidance and lets the per-minute spacing recover.
pub const RATE_LIMIT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The `User-Agent` of every call: FoxESS's Open API document asks script
/// callers to set their own.
pub const USER_AGENT: &str = concat!("switchyard/", env!("CARGO_PKG_VERSION"));

/// How long to wait before resending a query (a read) refused with errno
/// 41809: FoxESS allows one call a second per query interface, and the
/// refused call may have counted.
pub const QUERY_RETRY_SPACING: Duration = Duration::from_secs(1);

/// The same for an update (a write): one call per 2 s per interface.
pub const WRITE_RETRY_SPACING: Duration = Duration::from_secs(2);

/// Largest answer body read (a scheduler answer is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// Most characters of an answer (its `msg`, or the start of a body that is
/// not the envelope) kept in a raw description.
const MAX_SNIPPET: usize = 200;

/// The HTTP(S) client, shared by every driver a factory builds.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for http:// and https:// with rustls on ring and the bundled
/// Mozilla roots (no system certificate store needed).
pub fn new_client() -> Result<HttpsClient, rustls::Error> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        // Calls come in bursts of a few per apply, minutes apart: keep a
        // connection for the burst, not longer.
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

/// When each path of each account may next be called: the cloud allows
/// about one query a second and one update every 2 s per interface, and
/// calls past that are refused (errno 40400). Shared by every driver a
/// factory builds, so devices on one account pace together.
#[derive(Debug, Default)]
pub struct Pacer {
    next: std::sync::Mutex<std::collections::HashMap<(String, String), std::time::Instant>>,
}

impl Pacer {
    /// Reserves the next slot of `path` on `account`, `interval` (and a
    /// tenth) after the one before, and waits for it. The lock is never held while waiting.
    pub async fn wait(&self, account: &str, path: &str, interval: Duration) {
        if interval.is_zero() {
            return;
        }
        let now = std::time::Instant::now();
        let at = {
            let mut next = match self.next.lock() {
                Ok(n) => n,
                // Inserts and reads only: a panic elsewhere leaves it usable.
                Err(poisoned) => poisoned.into_inner(),
            };
            let slot = next
                .get(&(account.to_owned(), path.to_owned()))
                .copied()
                .filter(|t| *t > now)
                .unwrap_or(now);
            // A tenth more than the cloud's spacing: the cloud measures
            // arrivals, and two requests sent `interval` apart can arrive
            // closer (a slower connect for the first, say).
            next.insert(
                (account.to_owned(), path.to_owned()),
                slot + interval + interval / 10,
            );
            // Old entries of quiet paths go, so the map stays small.
            if next.len() > 4096 {
                next.retain(|_, t| *t > now);
            }
            slot
        };
        if at > now {
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

/// How one device's calls are paced.
#[derive(Clone, Debug)]
pub struct Pacing {
    pub(crate) pacer: Arc<Pacer>,
    /// The account the spacing is kept for (endpoint and key reference).
    pub(crate) account: String,
    pub(crate) query: Duration,
    pub(crate) update: Duration,
}

/// One device's view of the Open API.
#[derive(Clone, Debug)]
pub struct Api {
    pub(crate) base_url: String,
    pub(crate) key: Secret,
    pub(crate) timeout: Duration,
    pub(crate) client: HttpsClient,
    pub(crate) pacing: Pacing,
}

impl Api {
    /// POSTs `body` to `path`, signed, and returns the envelope's `result`
    /// on errno 0 plus a short raw description of the answer. Whatever the
    /// OEM echoes, the key is redacted from the answer before it is read,
    /// so it reaches neither results, errors nor raw descriptions.
    pub async fn call(&self, path: &str, body: &Value) -> Result<(Value, String), DriverError> {
        self.redacted(self.call_inner(path, "", Some(body), None).await)
    }

    /// [`Api::call`] carrying the dispatch claim's fencing token in the
    /// [`FENCE_HEADER`] header (`<action id>:<token>`): the real cloud
    /// ignores it; the emulator refuses a token older than one it has seen
    /// for the action.
    pub async fn call_fenced(
        &self,
        path: &str,
        body: &Value,
        fence: Option<&str>,
    ) -> Result<(Value, String), DriverError> {
        self.redacted(self.call_inner(path, "", Some(body), fence).await)
    }

    /// GETs `path` with the query `params` (percent-encoded), signed over
    /// the path alone; otherwise as [`Api::call`].
    pub async fn get(
        &self,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<(Value, String), DriverError> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let query = format!("?{}", query.join("&"));
        self.redacted(self.call_inner(path, &query, None, None).await)
    }

    fn redacted(
        &self,
        result: Result<(Value, String), DriverError>,
    ) -> Result<(Value, String), DriverError> {
        // Belt and braces for what was built from elsewhere (transport
        // errors may quote the request).
        match result {
            Ok((v, raw)) => Ok((v, self.key.redact(&raw))),
            Err(mut e) => {
                e.message = self.key.redact(&e.message);
                e.raw = e.raw.map(|r| self.key.redact(&r));
                Err(e)
            }
        }
    }

    async fn call_inner(
        &self,
        path: &str,
        query: &str,
        body: Option<&Value>,
        fence: Option<&str>,
    ) -> Result<(Value, String), DriverError> {
        let (mut status, mut bytes) = self.send(path, query, body, fence).await?;
        // 41809: the signature's timestamp was out of the cloud's window.
        // Signed again with a fresh timestamp, once, after the interface's
        // spacing; a second 41809 is classified (retryable) below.
        let retried = signature_expired(status, &bytes);
        if retried {
            let is_write = path == PATH_SET || path == PATH_SET_FLAG;
            tokio::time::sleep(if is_write {
                WRITE_RETRY_SPACING
            } else {
                QUERY_RETRY_SPACING
            })
            .await;
            (status, bytes) = self.send(path, query, body, fence).await?;
        }
        let note = if retried {
            "; signed again with a fresh timestamp after errno 41809"
        } else {
            ""
        };
        let text = self.key.redact(&String::from_utf8_lossy(&bytes));
        let mut env = classify(
            &format!("{} {path}", if body.is_some() { "POST" } else { "GET" }),
            status,
            text.as_bytes(),
            Some(&self.key),
        )
        .map_err(|mut e| {
            if let Some(raw) = &mut e.raw {
                raw.push_str(note);
            }
            e
        })?;
        // A key escaped in the JSON (\u0041…) is only seen once decoded.
        redact_strings(&mut env.result, &self.key);
        let raw = format!(
            "{} {path}: HTTP {}; errno {}; msg {:?}{note}",
            if body.is_some() { "POST" } else { "GET" },
            status.as_u16(),
            env.errno,
            snippet(&env.msg)
        );
        Ok((env.result, raw))
    }

    /// One signed POST, with a timestamp taken now; the answer's status
    /// and body, unclassified.
    async fn send(
        &self,
        path: &str,
        query: &str,
        body: Option<&Value>,
        fence: Option<&str>,
    ) -> Result<(StatusCode, Bytes), DriverError> {
        let p = &self.pacing;
        let interval = if path == PATH_SET || path == PATH_SET_FLAG {
            p.update
        } else {
            p.query
        };
        p.pacer.wait(&p.account, path, interval).await;
        let ts = jiff::Timestamp::now().as_millisecond();
        let token = self.key.expose();
        let method = if body.is_some() { "POST" } else { "GET" };
        let mut req = Request::builder();
        if let Some(f) = fence {
            req = req.header(FENCE_HEADER, f);
        }
        let req = req
            .method(method)
            .uri(format!("{}{path}{query}", self.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .header("token", token)
            .header("timestamp", ts.to_string())
            .header("signature", signature(path, token, ts))
            .header("lang", "en")
            .body(Full::new(
                body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
            ))
            .map_err(|e| {
                DriverError::new(ErrorKind::Rejected, "cannot build the FoxESS request")
                    .with_raw(format!("{method} {path}: {e}"))
            })?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                DriverError::new(ErrorKind::Unavailable, "cannot reach the FoxESS cloud")
                    .with_raw(format!("{method} {path}: {}", error_chain(&e)))
            })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    DriverError::new(ErrorKind::Unavailable, "FoxESS answer cut short").with_raw(
                        format!("{method} {path}: HTTP {}; body: {e}", status.as_u16()),
                    )
                })?
                .to_bytes();
            Ok::<_, DriverError>((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                DriverError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "FoxESS did not answer within {} ms",
                        self.timeout.as_millis()
                    ),
                )
                .with_raw(format!("{method} {path}: timeout"))
            })?
    }
}

/// The header that carries a write's fencing token (`<action id>:<token>`).
pub const FENCE_HEADER: &str = "x-switchyard-fence";

/// Percent-encodes a query component (unreserved characters pass).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether an answer is the envelope with errno 41809 (signature or
/// timestamp expired).
fn signature_expired(status: StatusCode, body: &[u8]) -> bool {
    status.is_success()
        && serde_json::from_slice::<Envelope>(body)
            .is_ok_and(|env| env.errno == ERRNO_SIGNATURE_EXPIRED)
}

/// How long from `now` to the next midnight UTC, at least a second. FoxESS
/// does not document when the daily budget resets: midnight UTC is the
/// assumption.
pub fn until_next_utc_midnight(now: jiff::Timestamp) -> Duration {
    // Unix time has no leap seconds: every UTC day is 86,400,000 ms.
    const DAY_MS: i64 = 86_400_000;
    let ms = now.as_millisecond();
    let left = DAY_MS - ms.rem_euclid(DAY_MS);
    Duration::from_millis(u64::try_from(left).unwrap_or(0)).max(Duration::from_secs(1))
}

/// Redacts `secret` from every string inside `v`.
fn redact_strings(v: &mut Value, secret: &Secret) {
    match v {
        Value::String(s) => {
            if s.contains(secret.expose()) {
                *s = secret.redact(s);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| redact_strings(x, secret)),
        Value::Object(o) => {
            if o.keys().any(|k| k.contains(secret.expose())) {
                *o = std::mem::take(o)
                    .into_iter()
                    .map(|(k, v)| (secret.redact(&k), v))
                    .collect();
            }
            o.values_mut().for_each(|x| redact_strings(x, secret));
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// At most [`MAX_SNIPPET`] characters of `s` on one line, control
/// characters replaced.
fn snippet(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_SNIPPET)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > MAX_SNIPPET {
        out.push('…');
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Classifies one HTTP answer to `request` (`"POST /op/…"`, as `raw`
/// names it). `Ok` only for HTTP 2xx with errno 0.
pub fn classify(
    request: &str,
    status: StatusCode,
    body: &[u8],
    secret: Option<&Secret>,
) -> Result<Envelope, DriverError> {
    // Only JSON is quoted, and only once its strings are decoded and
    // redacted: a key the OEM echoed in some escaped form (\/, \u0026)
    // is plain again after decoding. Anything else is described, not
    // quoted.
    let body_snippet = || match serde_json::from_slice::<Value>(body) {
        Ok(mut v) => {
            if let Some(s) = secret {
                redact_strings(&mut v, s);
            }
            snippet(&v.to_string())
        }
        Err(_) => format!("{} bytes, not JSON", body.len()),
    };
    let code = status.as_u16();
    if status.is_redirection() {
        // Following it would send the signed request, key included, to
        // wherever the answer points.
        return Err(DriverError::new(
            ErrorKind::Rejected,
            format!(
                "the FoxESS endpoint answered with a redirect (HTTP {code}), which is not followed"
            ),
        )
        .with_raw(format!("{request}: HTTP {code}")));
    }
    if status.is_server_error() {
        // 502/503 are the cloud's everyday outages; any 5xx is treated the
        // same (the request may well succeed later).
        return Err(DriverError::new(
            ErrorKind::Unavailable,
            format!("the FoxESS cloud is unavailable (HTTP {code})"),
        )
        .with_raw(format!("{request}: HTTP {code}; body: {}", body_snippet())));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(DriverError::new(
            ErrorKind::RateLimited,
            "the FoxESS cloud rate-limited the call (HTTP 429)",
        )
        .with_retry_after(RATE_LIMIT_RETRY_AFTER)
        .with_raw(format!("{request}: HTTP {code}; body: {}", body_snippet())));
    }
    if !status.is_success() {
        return Err(DriverError::new(
            ErrorKind::Rejected,
            format!("the FoxESS cloud refused the call (HTTP {code})"),
        )
        .with_raw(format!("{request}: HTTP {code}; body: {}", body_snippet())));
    }
    let env: Envelope = match serde_json::from_slice::<Envelope>(body) {
        Ok(mut env) => {
            if let Some(s) = secret {
                env.msg = s.redact(&env.msg);
            }
            env
        }
        // A 200 with a body that is not the envelope is a gateway or
        // maintenance page far more often than a protocol change.
        Err(e) => {
            return Err(DriverError::new(
                ErrorKind::Unavailable,
                "the FoxESS cloud sent an answer that is not its JSON envelope",
            )
            .with_raw(format!(
                "{request}: HTTP {code}; malformed body ({e}): {}",
                body_snippet()
            )));
        }
    };
    let raw = format!(
        "{request}: HTTP {code}; errno {}; msg {:?}",
        env.errno,
        snippet(&env.msg)
    );
    let err = |kind, message: &str| Err(DriverError::new(kind, message).with_raw(raw.clone()));
    // Some answers report the spent daily budget under 40400 with the
    // budget's own words ("exceeds the limit"): wait for its reset then.
    let daily = env.errno == ERRNO_DAILY_LIMIT
        || (env.errno == ERRNO_RATE_LIMITED
            && env.msg.to_ascii_lowercase().contains("exceeds the limit"));
    match env.errno {
        ERRNO_OK => Ok(env),
        _ if daily => Err(DriverError::new(
            ErrorKind::RateLimited,
            "FoxESS daily call budget used up (errno 40402, or 40400 saying the limit is exceeded); waiting for its reset, assumed at midnight UTC",
        )
        .with_retry_after(until_next_utc_midnight(jiff::Timestamp::now()))
        .with_raw(raw)),
        ERRNO_RATE_LIMITED => Err(DriverError::new(
            ErrorKind::RateLimited,
            "FoxESS rate limit reached (errno 40400: request frequency too high)",
        )
        .with_retry_after(RATE_LIMIT_RETRY_AFTER)
        .with_raw(raw)),
        ERRNO_TOKEN_REFUSED | ERRNO_TOKEN_INVALID => err(
            ErrorKind::Credentials,
            &format!(
                "FoxESS refused the API key (errno {}: token invalid); replace the secret the device's api_key_ref names",
                env.errno
            ),
        ),
        // Reached only when a call signed again with a fresh timestamp got
        // it too (see `Api::call`): a clock far off, or the cloud's.
        ERRNO_SIGNATURE_EXPIRED => err(
            ErrorKind::Unavailable,
            "FoxESS refused the request's timestamp, also when signed again with a fresh one (errno 41809: signature or timestamp expired); check the server's clock",
        ),
        ERRNO_STALE_FENCE => err(
            ErrorKind::StaleFence,
            "the write's fencing token is older than one already used for the action (a newer dispatch claim owns it)",
        ),
        ERRNO_SCHEDULER_ACTIVE => err(
            ErrorKind::SchedulerActive,
            "FoxESS refused the settings while the inverter's scheduler is active (errno 44096)",
        ),
        ERRNO_BAD_PARAMS => err(
            ErrorKind::Rejected,
            "FoxESS rejected the parameters (errno 40257: parameters do not meet expectations)",
        ),
        ERRNO_OVERLAP => err(
            ErrorKind::Rejected,
            "FoxESS rejected overlapping scheduler groups (errno 42023)",
        ),
        n => err(
            ErrorKind::Rejected,
            &format!("FoxESS refused the call (errno {n})"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_quote_only_json_and_only_redacted() {
        let key = Secret::new(r#"k/e&y"#);
        // PHP escapes '/', Go escapes '&': the raw text never holds the key
        // as such, the decoded JSON does.
        let body = br#"{"msg":"bad token k\/e&y","k\/e&y":1}"#;
        let e = classify(
            "POST /p",
            StatusCode::INTERNAL_SERVER_ERROR,
            body,
            Some(&key),
        )
        .unwrap_err();
        let raw = e.raw.unwrap_or_default();
        assert!(
            !raw.contains(key.expose()) && raw.contains("<redacted>"),
            "{raw}"
        );
        // Not JSON: described, never quoted.
        let page = format!("<html>proxy error for token {}</html>", key.expose());
        let e = classify(
            "POST /p",
            StatusCode::BAD_GATEWAY,
            page.as_bytes(),
            Some(&key),
        )
        .unwrap_err();
        let raw = e.raw.unwrap_or_default();
        assert!(
            raw.contains("bytes, not JSON") && !raw.contains("token"),
            "{raw}"
        );
        // An envelope's msg is redacted once decoded, on success too.
        let ok = br#"{"errno":0,"msg":"hello k\/e&y","result":{"x":"k\/e&y"}}"#;
        let env = classify("POST /p", StatusCode::OK, ok, Some(&key)).unwrap();
        assert!(!env.msg.contains(key.expose()), "{}", env.msg);
    }

    #[test]
    fn the_daily_budget_is_waited_out_until_the_next_utc_midnight() {
        let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let cases = [
            ("2030-01-15T23:00:00Z", 3_600),
            ("2030-01-15T00:00:00Z", 86_400),
            // Midnight UTC whatever the offset the instant is written in.
            ("2030-01-15T21:30:00-02:00", 1_800),
            ("1969-12-31T23:59:00Z", 60),
            // Never less than a second.
            ("2030-01-15T23:59:59.9995Z", 1),
        ];
        for (now, secs) in cases {
            assert_eq!(
                until_next_utc_midnight(t(now)),
                Duration::from_secs(secs),
                "{now}"
            );
        }
    }
}
