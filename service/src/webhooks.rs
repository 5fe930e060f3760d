//! Webhook building blocks: Standard Webhooks signatures, the check of a
//! target URL against what the operator allows, and the HTTP sender.
//! Endpoints are `api/webhooks.rs` and `store/webhooks.rs`; delivery is
//! `delivery.rs`.
//!
//! - A signing secret is `whsec_` + base64 of 24 random bytes, as Standard
//!   Webhooks spells it; its `Debug` never shows it.
//! - A signature is `v1,` + base64 HMAC-SHA256 over `id.timestamp.body`;
//!   while a secret is rotated, a delivery carries one signature per live
//!   secret, space-separated, and receivers accept any.
//! - A target is `http` or `https`, with a host and no user info. An
//!   address that is loopback, private, link-local, unique-local,
//!   carrier-grade NAT, multicast, unspecified or broadcast is refused
//!   unless the URL lies under a prefix the operator allowed
//!   (`--webhook-url-allow`); the check is made on the URL's literal
//!   address and again on every address a host name resolves to when
//!   connecting, so DNS cannot point an allowed name at the server's
//!   network.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use tonic::codegen::http::Uri;

use crate::domain::Error;

/// The prefix of a signing secret as shown to its owner.
pub const SECRET_PREFIX: &str = "whsec_";

/// Random bytes in a new signing secret.
const SECRET_BYTES: usize = 24;

/// A webhook signing secret. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

impl SigningSecret {
    /// A new random secret, and its `whsec_…` text (shown to its owner
    /// once).
    pub fn generate() -> Result<(Self, String), Error> {
        use ring::rand::SecureRandom as _;
        let mut bytes = vec![0u8; SECRET_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::Internal("the system's random source failed".into()))?;
        let text = format!("{SECRET_PREFIX}{}", STANDARD.encode(&bytes));
        Ok((Self(bytes), text))
    }

    /// A secret from its `whsec_…` text.
    pub fn parse(text: &str) -> Option<Self> {
        let b64 = text.strip_prefix(SECRET_PREFIX)?;
        let bytes = STANDARD.decode(b64).ok()?;
        (!bytes.is_empty()).then_some(Self(bytes))
    }

    /// The secret's bytes, to store (the store keeps them only as written
    /// here, and never logs them).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A secret read back from storage.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

/// The `webhook-signature` of one secret: `v1,` + base64 HMAC-SHA256 of
/// `{id}.{timestamp}.{body}`.
pub fn sign(secret: &SigningSecret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

/// The `webhook-signature` header of a delivery: one signature per live
/// secret (two while one is rotated), space-separated.
pub fn signature_header(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|s| sign(s, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether an address is one a webhook may not reach unless the operator
/// allowed it: this host, its networks, or no one in particular.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local
                || (s[0] & 0xfe00) == 0xfc00
                // fe80::/10 link-local
                || (s[0] & 0xffc0) == 0xfe80
                // fec0::/10 site-local (deprecated, still routed by some)
                || (s[0] & 0xffc0) == 0xfec0
                // ::ffff:0:0/96 handled above; 64:ff9b::/96 and
                // 64:ff9b:1::/48 (NAT64) may reach anything the gateway can
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0])
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
                // ::a.b.c.d (IPv4-compatible, deprecated) as its IPv4
                || (s[..6] == [0; 6] && internal_v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                )))
                // 2002::/16 (6to4) as the IPv4 it embeds
                || (s[0] == 0x2002
                    && internal_v4(Ipv4Addr::new(
                        (s[1] >> 8) as u8,
                        s[1] as u8,
                        (s[2] >> 8) as u8,
                        s[2] as u8,
                    )))
        }
    }
}

fn internal_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        // 0.0.0.0/8: "this network"
        || o[0] == 0
        // 100.64.0.0/10: carrier-grade NAT
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        // 192.0.0.0/24: protocol assignments
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        // 198.18.0.0/15: benchmarking
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        // 240.0.0.0/4: reserved
        || o[0] >= 240
}

/// Where a webhook may be delivered: the operator's allowed prefixes (for
/// receivers on internal addresses, e.g. tests on loopback).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// URL prefixes (`--webhook-url-allow`) under which internal addresses
    /// are allowed.
    pub allow: Vec<String>,
}

/// A webhook target that passed [`TargetPolicy::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Whether the operator allowed this URL to reach internal addresses.
    pub internal_allowed: bool,
}

impl TargetPolicy {
    /// Checks a webhook URL as a client gave it; the error says what is
    /// wrong, never what the server's network holds.
    pub fn check(&self, url: &str) -> Result<Target, String> {
        if url.len() > 2048 {
            return Err("is longer than 2048 bytes".into());
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| "is not a URL (http://HOST[:PORT]/PATH or https://…)".to_owned())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must be an http:// or https:// URL".into()),
        };
        let Some(authority) = uri.authority() else {
            return Err("must name a host".into());
        };
        if authority.as_str().contains('@') {
            return Err("must not carry user information (user:password@)".into());
        }
        let bracketed = authority.host();
        let host = match bracketed.strip_prefix('[') {
            // An IPv6 literal is an address and nothing else: a zone
            // (`[fe80::1%25eth0]`) or a future form (`[v1.x]`) would not
            // parse as one, and would be taken for a host name and let
            // through.
            Some(inner) => match inner.strip_suffix(']') {
                Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
                _ => return Err("must name an IPv6 address in brackets without a zone".into()),
            },
            None if bracketed.contains(['[', ']']) => {
                return Err("must name a host without brackets, or an IPv6 address in them".into());
            }
            None => bracketed,
        };
        if host.is_empty() {
            return Err("must name a host".into());
        }
        // The port exactly as written, after the host and nothing else
        // (`http` takes `[::1]x:8080` with the host `[::1]`, and reads a
        // port it cannot parse, `:99999` or `:0x50`, as none, which would
        // fall back to the scheme's); and never 0.
        let port = match &authority.as_str()[bracketed.len()..] {
            "" => {
                if https {
                    443
                } else {
                    80
                }
            }
            rest => {
                let text = rest.strip_prefix(':').ok_or_else(|| {
                    "is not a URL (http://HOST[:PORT]/PATH or https://…)".to_owned()
                })?;
                text.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| text.parse::<u16>().ok())
                    .flatten()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| "must name a port from 1 to 65535".to_owned())?
            }
        };
        let internal_allowed = self.allow.iter().any(|p| under(url, p));
        let literal = host
            .parse::<IpAddr>()
            .ok()
            .or_else(|| numeric_ipv4(host).map(IpAddr::V4));
        if let Some(ip) = literal
            && is_internal(ip)
            && !internal_allowed
        {
            return Err(
                "must not point at a loopback, private, link-local or otherwise internal address"
                    .into(),
            );
        }
        Ok(Target {
            https,
            host: host.to_owned(),
            port,
            internal_allowed,
        })
    }

    /// Checks an address the target's host resolved to, when connecting.
    pub fn check_resolved(target: &Target, ip: IpAddr) -> Result<(), String> {
        if is_internal(ip) && !target.internal_allowed {
            return Err(
                "resolves to a loopback, private, link-local or otherwise internal address".into(),
            );
        }
        Ok(())
    }
}

/// A host the system's resolver reads as an IPv4 address although it is
/// not in dotted-quad form (`127.1`, `2130706433`, `0x7f.0.0.1`,
/// `0177.0.0.1`, with or without a trailing dot): refused at once, as the
/// address it names, rather than only when connecting.
fn numeric_ipv4(host: &str) -> Option<Ipv4Addr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"))
        {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let v = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        values.push(v);
    }
    let (last, init) = values.split_last()?;
    if init.iter().any(|v| *v > 255) {
        return None;
    }
    let room = 32 - 8 * init.len() as u32;
    if room < 32 && *last >= 1u32 << room {
        return None;
    }
    let mut n = *last;
    for (i, v) in init.iter().enumerate() {
        n |= v << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(n))
}

/// Whether `url` lies under `prefix`, compared as `--oem-url-allow`
/// prefixes are (the same scheme, host and port, and a path at or below
/// the prefix's, made of unreserved characters without dot segments or
/// percent-escapes, so it cannot climb out of the prefix at a server that
/// normalises it); a query string is allowed and not compared.
fn under(url: &str, prefix: &str) -> bool {
    let without_query = url.split_once('?').map_or(url, |(u, _)| u);
    switchyard_drivers::operator::url_under(without_query, prefix)
}

/// Resolves a webhook target's host name, keeping only the addresses it
/// may reach: checked at connect time, so a name that resolves (or is
/// rebound) to the server's own network is refused.
#[derive(Clone, Debug)]
pub struct CheckedResolver {
    internal_allowed: bool,
}

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for CheckedResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let allowed = self.internal_allowed;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<std::net::SocketAddr> = found
                .into_iter()
                .filter(|a| allowed || !is_internal(a.ip()))
                .collect();
            if usable.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the host resolves only to internal addresses",
                ));
            }
            Ok(usable.into_iter())
        })
    }
}

/// What a receiver answered one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    pub status: u16,
    pub latency: std::time::Duration,
}

/// Most bytes of a receiver's answer read (the rest is not waited for).
const MAX_ANSWER: usize = 64 * 1024;

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<
        hyper_util::client::legacy::connect::HttpConnector<CheckedResolver>,
    >,
    http_body_util::Full<bytes::Bytes>,
>;

/// Sends signed events to one webhook URL (checked by the policy when it
/// is made), keeping its connection open between deliveries. Redirects
/// are not followed (a 3xx is an answer like any other), so a receiver
/// cannot send a delivery on to an address the check refused.
#[derive(Clone, Debug)]
pub struct Sender {
    url: String,
    client: HttpsClient,
    timeout: std::time::Duration,
}

impl Sender {
    /// A sender to `url`, if `policy` allows it; each delivery waits at
    /// most `timeout` for its answer.
    pub fn new(
        policy: &TargetPolicy,
        url: &str,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        let target = policy.check(url)?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(
            CheckedResolver {
                internal_allowed: target.internal_allowed,
            },
        );
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .map_err(|e| format!("TLS: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .pool_idle_timeout(std::time::Duration::from_secs(30))
                .build::<_, http_body_util::Full<bytes::Bytes>>(https);
        Ok(Self {
            url: url.to_owned(),
            client,
            timeout,
        })
    }

    /// The URL it sends to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// POSTs one event signed with `secrets`; the error says why nothing
    /// was answered.
    pub async fn send(
        &self,
        secrets: &[SigningSecret],
        id: &str,
        timestamp: i64,
        body: bytes::Bytes,
    ) -> Result<Answered, String> {
        use http_body_util::BodyExt as _;
        let request = tonic::codegen::http::Request::post(self.url.as_str())
            .header("content-type", "application/json")
            .header(
                "user-agent",
                concat!("switchyard/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature_header(secrets, id, timestamp, &body),
            )
            .body(http_body_util::Full::new(body))
            .map_err(|e| format!("the request could not be built: {e}"))?;
        let began = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await.map_err(|e| {
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                why
            })?;
            let status = response.status().as_u16();
            // The answer's body is read, within bounds, so the connection
            // can be used again; its content does not matter.
            let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await;
            Ok::<u16, String>(status)
        })
        .await
        .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))??;
        Ok(Answered {
            status: answer,
            latency: began.elapsed(),
        })
    }
}

/// POSTs one signed event to `url` (checked by `policy`) and waits at most
/// `timeout` for the answer ([`Sender`], for one delivery).
pub async fn deliver(
    policy: &TargetPolicy,
    url: &str,
    secrets: &[SigningSecret],
    id: &str,
    timestamp: i64,
    body: bytes::Bytes,
    timeout: std::time::Duration,
) -> Result<Answered, String> {
    Sender::new(policy, url, timeout)?
        .send(secrets, id, timestamp, body)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_hosts_are_read_as_the_resolver_reads_them() {
        for (host, ip) in [
            ("127.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("10.1.2", "10.1.0.2"),
            ("169.254.169.254.", "169.254.169.254"),
            ("0", "0.0.0.0"),
        ] {
            assert_eq!(numeric_ipv4(host), Some(ip.parse().unwrap()), "{host}");
        }
        for host in [
            "example.com",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "08.1.1.1",
            "a.1",
        ] {
            assert_eq!(numeric_ipv4(host), None, "{host}");
        }
        let p = TargetPolicy::default();
        for url in [
            "http://127.1/h",
            "http://2130706433/h",
            "http://0x7f.1/h",
            "http://0251.0376.0251.0376/h",
        ] {
            assert!(p.check(url).is_err(), "{url}");
        }
        assert!(p.check("http://8.8.8.8/h").is_ok());
        assert!(p.check("http://134744072/h").is_ok(), "8.8.8.8, public");
    }

    /// A URL is delivered where it reads: a port that does not read as
    /// one from 1 to 65535, or an IPv6 literal with a zone, is refused
    /// when the endpoint is made, not fallen back from.
    #[test]
    fn ports_and_ipv6_literals_are_read_strictly() {
        let p = TargetPolicy::default();
        for url in [
            "http://example.com:0/h",
            "http://example.com:65536/h",
            "http://example.com:99999/h",
            "http://example.com:4294967297/h",
            "http://example.com:+80/h",
            "http://example.com:0x50/h",
            "http://example.com:/h",
            "http://[::1%25lo]:18099/h",
            "http://[fe80::1%25eth0]/h",
            "http://[fd00::1%25lo]/h",
            "http://[::ffff:127.0.0.1%25lo]/h",
            "http://[2001:4860:4860::8888%25eth0]/h",
            // Text between the host and the port, or brackets elsewhere.
            "http://[2001:db8::1]x:8080/h",
            "http://[2001:db8::1]evil/h",
            "http://example.com[]/h",
            "http://a[b]/h",
        ] {
            assert!(p.check(url).is_err(), "{url}");
        }
        for (url, port) in [
            ("http://example.com/h", 80),
            ("https://example.com/h", 443),
            ("https://example.com:1/h", 1),
            ("https://example.com:08443/h", 8443),
            ("http://example.com:65535/h", 65535),
            ("http://[2001:4860:4860::8888]:8080/h", 8080),
        ] {
            let t = p.check(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(t.port, port, "{url}");
        }
        assert_eq!(
            p.check("http://[2001:4860:4860::8888]/h").unwrap().host,
            "2001:4860:4860::8888"
        );
    }

    /// The example of the Standard Webhooks specification, as its
    /// reference library (PyPI `standardwebhooks`) signs it.
    #[test]
    fn signs_as_standard_webhooks_does() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_rotated_secret_signs_beside_the_new_one() {
        let (old, old_text) = SigningSecret::generate().unwrap();
        let (new, new_text) = SigningSecret::generate().unwrap();
        assert_ne!(old_text, new_text);
        assert!(old_text.starts_with(SECRET_PREFIX));
        assert_eq!(SigningSecret::parse(&old_text), Some(old.clone()));
        let header = signature_header(&[old.clone(), new.clone()], "m", 1, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(
            parts,
            [sign(&old, "m", 1, b"{}"), sign(&new, "m", 1, b"{}")]
        );
        // Any change of id, time or body changes the signature.
        assert_ne!(sign(&new, "m", 1, b"{}"), sign(&new, "n", 1, b"{}"));
        assert_ne!(sign(&new, "m", 1, b"{}"), sign(&new, "m", 2, b"{}"));
        assert_ne!(sign(&new, "m", 1, b"{}"), sign(&new, "m", 1, b"{ }"));
        assert!(!format!("{new:?}").contains(&new_text[SECRET_PREFIX.len()..]));
        assert_eq!(format!("{new:?}"), "SigningSecret(<redacted>)");
        for bad in ["", "whsec_", "MfKQ9r8G", "whsec_!!!"] {
            assert_eq!(SigningSecret::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn internal_addresses_are_known() {
        let internal = [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.8",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "fec0::1",
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:a00:1::1",
            "2002:7f00:1::",
        ];
        for a in internal {
            assert!(is_internal(a.parse().unwrap()), "{a} is internal");
        }
        let public = [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.2.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "2002:808:808::1",
            "64:ff9b:2::1",
        ];
        for a in public {
            assert!(!is_internal(a.parse().unwrap()), "{a} is public");
        }
    }

    /// A receiver on loopback: answers 204 and hands over each request's
    /// head and body.
    async fn receiver() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| {
                                    l.to_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if body.len() >= len {
                                let _ = tx.send(text.clone());
                                let _ = sock
                                    .write_all(
                                        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
                                    )
                                    .await;
                                break;
                            }
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    /// A delivery reaches an allowed receiver, signed; a host name that
    /// resolves to loopback is refused at connect time unless allowed.
    #[tokio::test]
    async fn deliveries_are_signed_and_refused_at_internal_addresses() {
        let (port, mut got) = receiver().await;
        let (secret, _) = SigningSecret::generate().unwrap();
        let body = bytes::Bytes::from_static(br#"{"type":"ACTION_FAILED"}"#);
        let url = format!("http://localhost:{port}/hooks/a");
        let second = std::time::Duration::from_secs(5);
        // Not allowed: `localhost` resolves to loopback.
        let refused = deliver(
            &TargetPolicy::default(),
            &url,
            std::slice::from_ref(&secret),
            "ev-1",
            7,
            body.clone(),
            second,
        )
        .await;
        assert!(refused.is_err(), "{refused:?}");
        assert!(refused.unwrap_err().contains("internal"));
        // Allowed under the operator's prefix.
        let policy = TargetPolicy {
            allow: vec![format!("http://localhost:{port}/hooks")],
        };
        let answered = deliver(
            &policy,
            &url,
            std::slice::from_ref(&secret),
            "ev-1",
            7,
            body.clone(),
            second,
        )
        .await
        .unwrap();
        assert_eq!(answered.status, 204);
        let request = got.recv().await.unwrap();
        assert!(request.starts_with("POST /hooks/a HTTP/1.1"), "{request}");
        let header = |name: &str| {
            request
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        assert_eq!(header("webhook-id"), "ev-1");
        assert_eq!(header("webhook-timestamp"), "7");
        assert_eq!(header("webhook-signature"), sign(&secret, "ev-1", 7, &body));
        assert!(request.ends_with(r#"{"type":"ACTION_FAILED"}"#));
        // Only the first refusal reached nothing.
        assert!(got.try_recv().is_err());
        // A literal internal address is refused before connecting.
        let literal = deliver(
            &TargetPolicy::default(),
            &format!("http://127.0.0.1:{port}/x"),
            &[secret],
            "ev-2",
            7,
            body,
            second,
        )
        .await;
        assert!(literal.is_err());
        assert!(got.try_recv().is_err());
    }

    #[test]
    fn targets_are_checked_against_the_operators_prefixes() {
        let open = TargetPolicy::default();
        let t = open.check("https://hooks.example.com/switchyard").unwrap();
        assert_eq!(
            (t.https, t.host.as_str(), t.port),
            (true, "hooks.example.com", 443)
        );
        assert!(!t.internal_allowed);
        assert_eq!(open.check("http://example.com:8080/x").unwrap().port, 8080);
        for bad in [
            "ftp://example.com/x",
            "file:///etc/passwd",
            "example.com/x",
            "http://user:pw@example.com/x",
            "http:///x",
            "http://127.0.0.1:9000/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.5/x",
            "http://[::ffff:127.0.0.1]/x",
        ] {
            assert!(open.check(bad).is_err(), "{bad} accepted");
        }
        let long = format!("https://example.com/{}", "a".repeat(3000));
        assert!(open.check(&long).is_err());
        // The operator lets tests reach a receiver on loopback, and only
        // under its prefix.
        let tests = TargetPolicy {
            allow: vec!["http://127.0.0.1:9000/hooks".into()],
        };
        assert!(
            tests
                .check("http://127.0.0.1:9000/hooks/a")
                .unwrap()
                .internal_allowed
        );
        assert!(tests.check("http://127.0.0.1:9000/hooks").is_ok());
        assert!(tests.check("http://127.0.0.1:9000/hooksx").is_err());
        assert!(tests.check("http://127.0.0.1:9001/hooks/a").is_err());
        // The path cannot climb out of the prefix; a query is not compared.
        for out in [
            "http://127.0.0.1:9000/hooks/../admin",
            "http://127.0.0.1:9000/hooks/%2e%2e/admin",
            "http://127.0.0.1:9000/hooks/./a",
            "http://127.0.0.1:9000.evil.example/hooks",
            "http://127.0.0.1:90001/hooks",
        ] {
            assert!(tests.check(out).is_err(), "{out} accepted");
        }
        assert!(
            tests
                .check("http://127.0.0.1:9000/hooks/a?token=x")
                .unwrap()
                .internal_allowed
        );
        // A host name is checked again on what it resolves to.
        let named = open.check("https://rebind.example/x").unwrap();
        assert!(TargetPolicy::check_resolved(&named, "127.0.0.1".parse().unwrap()).is_err());
        assert!(TargetPolicy::check_resolved(&named, "8.8.8.8".parse().unwrap()).is_ok());
        let allowed = tests.check("http://127.0.0.1:9000/hooks/a").unwrap();
        assert!(TargetPolicy::check_resolved(&allowed, "127.0.0.1".parse().unwrap()).is_ok());
    }
}
