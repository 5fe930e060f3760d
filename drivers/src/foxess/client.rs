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
    ERRNO_BAD_PARAMS, ERRNO_OK, ERRNO_OVERLAP, ERRNO_RATE_LIMITED, Envelope, signature,
};
use crate::{
    driver::{DriverError, ErrorKind},
    operator::Secret,
};

/// How long to wait after errno 40400. FoxESS does not say; a minute
/// matches its polling guidance and lets the per-minute spacing recover.
pub const RATE_LIMIT_RETRY_AFTER: Duration = Duration::from_secs(60);

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

/// One device's view of the Open API.
#[derive(Clone, Debug)]
pub struct Api {
    pub(crate) base_url: String,
    pub(crate) key: Secret,
    pub(crate) timeout: Duration,
    pub(crate) client: HttpsClient,
}

impl Api {
    /// POSTs `body` to `path`, signed, and returns the envelope's `result`
    /// on errno 0 plus a short raw description of the answer. Whatever the
    /// OEM echoes, the key is redacted from the answer before it is read,
    /// so it reaches neither results, errors nor raw descriptions.
    pub async fn call(&self, path: &str, body: &Value) -> Result<(Value, String), DriverError> {
        let result = self.call_inner(path, body).await;
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

    async fn call_inner(&self, path: &str, body: &Value) -> Result<(Value, String), DriverError> {
        let ts = jiff::Timestamp::now().as_millisecond();
        let token = self.key.expose();
        let req = Request::post(format!("{}{path}", self.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .header("token", token)
            .header("timestamp", ts.to_string())
            .header("signature", signature(path, token, ts))
            .header("lang", "en")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| {
                DriverError::new(ErrorKind::Rejected, "cannot build the FoxESS request")
                    .with_raw(format!("POST {path}: {e}"))
            })?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                DriverError::new(ErrorKind::Unavailable, "cannot reach the FoxESS cloud")
                    .with_raw(format!("POST {path}: {}", error_chain(&e)))
            })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    DriverError::new(ErrorKind::Unavailable, "FoxESS answer cut short")
                        .with_raw(format!("POST {path}: HTTP {}; body: {e}", status.as_u16()))
                })?
                .to_bytes();
            Ok::<_, DriverError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                DriverError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "FoxESS did not answer within {} ms",
                        self.timeout.as_millis()
                    ),
                )
                .with_raw(format!("POST {path}: timeout"))
            })??;
        let text = self.key.redact(&String::from_utf8_lossy(&bytes));
        let mut env = classify(path, status, text.as_bytes(), Some(&self.key))?;
        // A key escaped in the JSON (\u0041…) is only seen once decoded.
        redact_strings(&mut env.result, &self.key);
        let raw = format!(
            "POST {path}: HTTP {}; errno {}; msg {:?}",
            status.as_u16(),
            env.errno,
            snippet(&env.msg)
        );
        Ok((env.result, raw))
    }
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

/// Classifies one HTTP answer. `Ok` only for HTTP 2xx with errno 0.
pub fn classify(
    path: &str,
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
        .with_raw(format!("POST {path}: HTTP {code}")));
    }
    if status.is_server_error() {
        // 502/503 are the cloud's everyday outages; any 5xx is treated the
        // same (the request may well succeed later).
        return Err(DriverError::new(
            ErrorKind::Unavailable,
            format!("the FoxESS cloud is unavailable (HTTP {code})"),
        )
        .with_raw(format!(
            "POST {path}: HTTP {code}; body: {}",
            body_snippet()
        )));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(DriverError::new(
            ErrorKind::RateLimited,
            "the FoxESS cloud rate-limited the call (HTTP 429)",
        )
        .with_retry_after(RATE_LIMIT_RETRY_AFTER)
        .with_raw(format!(
            "POST {path}: HTTP {code}; body: {}",
            body_snippet()
        )));
    }
    if !status.is_success() {
        return Err(DriverError::new(
            ErrorKind::Rejected,
            format!("the FoxESS cloud refused the call (HTTP {code})"),
        )
        .with_raw(format!(
            "POST {path}: HTTP {code}; body: {}",
            body_snippet()
        )));
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
                "POST {path}: HTTP {code}; malformed body ({e}): {}",
                body_snippet()
            )));
        }
    };
    let raw = format!(
        "POST {path}: HTTP {code}; errno {}; msg {:?}",
        env.errno,
        snippet(&env.msg)
    );
    let err = |kind, message: &str| Err(DriverError::new(kind, message).with_raw(raw.clone()));
    match env.errno {
        ERRNO_OK => Ok(env),
        ERRNO_RATE_LIMITED => Err(DriverError::new(
            ErrorKind::RateLimited,
            "FoxESS rate limit reached (errno 40400)",
        )
        .with_retry_after(RATE_LIMIT_RETRY_AFTER)
        .with_raw(raw)),
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
        let e = classify("/p", StatusCode::INTERNAL_SERVER_ERROR, body, Some(&key)).unwrap_err();
        let raw = e.raw.unwrap_or_default();
        assert!(
            !raw.contains(key.expose()) && raw.contains("<redacted>"),
            "{raw}"
        );
        // Not JSON: described, never quoted.
        let page = format!("<html>proxy error for token {}</html>", key.expose());
        let e = classify("/p", StatusCode::BAD_GATEWAY, page.as_bytes(), Some(&key)).unwrap_err();
        let raw = e.raw.unwrap_or_default();
        assert!(
            raw.contains("bytes, not JSON") && !raw.contains("token"),
            "{raw}"
        );
        // An envelope's msg is redacted once decoded, on success too.
        let ok = br#"{"errno":0,"msg":"hello k\/e&y","result":{"x":"k\/e&y"}}"#;
        let env = classify("/p", StatusCode::OK, ok, Some(&key)).unwrap();
        assert!(!env.msg.contains(key.expose()), "{}", env.msg);
    }
}
