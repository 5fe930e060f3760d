//! API keys, scopes and per-key rate limits: one tower layer in front of
//! every service (docs/security.md, ADR 0012).
//!
//! For each call, before its body is read or anything in it is checked:
//! the key (UNAUTHENTICATED, INVALID_API_KEY), then the method's scope
//! (PERMISSION_DENIED, MISSING_SCOPE), then the key's token bucket
//! (RESOURCE_EXHAUSTED, RATE_LIMITED). Health and reflection are exempt.
//! The caller ([`Caller`]) then travels in the request's extensions: the
//! handlers scope every read and write by its tenant.
//!
//! A key is `sy_<key_id>_<secret>`: found by its id, then the SHA-256 of
//! the whole key compared with the stored one in constant time. Lookups
//! are kept for [`CACHE_FOR`], so a revocation reaches every replica
//! within it.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter, clock::Clock as _};
use tonic::{body::Body, codegen::http};

use crate::{
    domain::{Clock, Error, TenantId, Ts},
    store::{KeyRecord, Store},
};

/// How long a key lookup (and "is there any key") is trusted: the most a
/// revocation takes to reach a replica.
pub const CACHE_FOR: Duration = Duration::from_secs(2);

/// Database lookups per second, per replica, of key ids not among those
/// last read (a key just made, or a made-up one).
const MISSES_PER_SECOND: NonZeroU32 = NonZeroU32::new(20).expect("non-zero");

/// A read of every key id, or why it failed.
type IdsRead = Result<Arc<HashSet<String>>, Error>;

/// How long a failed read of the key ids is the answer of the calls that
/// waited for it.
const FAILED_FOR: Duration = Duration::from_secs(1);

/// How often a key's last use is written, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// A key's rate when its tenant sets none: requests per second, per
/// replica.
pub const DEFAULT_RATE_PER_SECOND: u32 = 50;
/// A key's burst when its tenant sets none.
pub const DEFAULT_RATE_BURST: u32 = 100;

/// Characters of a key id, and of a secret (lower-case base32: no
/// ambiguity in a terminal, no escaping in a header).
const KEY_ID_LEN: usize = 16;
const SECRET_LEN: usize = 52;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// What a key may do. Each RPC needs exactly one; none implies another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    EventsRead,
    DevicesRead,
    DevicesWrite,
    ActionsRead,
    ActionsWrite,
    Admin,
    WebhooksManage,
}

impl Scope {
    /// Every scope a key can be given today.
    pub const ALL: [Scope; 7] = [
        Scope::DevicesRead,
        Scope::DevicesWrite,
        Scope::ActionsRead,
        Scope::ActionsWrite,
        Scope::Admin,
        Scope::EventsRead,
        Scope::WebhooksManage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::DevicesRead => "devices:read",
            Scope::DevicesWrite => "devices:write",
            Scope::ActionsRead => "actions:read",
            Scope::ActionsWrite => "actions:write",
            Scope::Admin => "admin",
            Scope::EventsRead => "events:read",
            Scope::WebhooksManage => "webhooks:manage",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Parses a list of scope names: at least one, each known; duplicates
    /// merged. The error names what is wrong.
    pub fn parse_list<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<Scope>, String> {
        let mut out = Vec::new();
        for n in names.into_iter().map(str::trim).filter(|n| !n.is_empty()) {
            let Some(s) = Scope::parse(n) else {
                let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                let n = crate::domain::cap(n.to_owned(), 40);
                return Err(format!("unknown scope {n:?}; known: {}", known.join(", ")));
            };
            if !out.contains(&s) {
                out.push(s);
            }
        }
        if out.is_empty() {
            return Err("at least one scope is needed".to_owned());
        }
        Ok(out)
    }
}

/// What a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Nothing: health checks and reflection.
    Nothing,
    /// A valid key with this scope.
    Scope(Scope),
    /// A valid key (a method this server does not have: answered
    /// UNIMPLEMENTED once the caller is known).
    AnyKey,
}

/// The scope each gRPC method path needs.
pub fn needs(path: &str) -> Needs {
    if path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return Needs::Nothing;
    }
    let scope =
        match path {
            "/switchyard.v1.DeviceService/GetDevice"
            | "/switchyard.v1.DeviceService/ListDevices" => Scope::DevicesRead,
            "/switchyard.v1.DeviceService/CreateDevice"
            | "/switchyard.v1.DeviceService/UpdateDevice"
            | "/switchyard.v1.DeviceService/DeleteDevice" => Scope::DevicesWrite,
            "/switchyard.v1.ActionService/GetAction"
            | "/switchyard.v1.ActionService/ListActions"
            | "/switchyard.v1.ActionService/ListActionHistory" => Scope::ActionsRead,
            "/switchyard.v1.ActionService/PushAction"
            | "/switchyard.v1.ActionService/CancelAction" => Scope::ActionsWrite,
            "/switchyard.v1.AdminService/CreateTenant"
            | "/switchyard.v1.AdminService/ListTenants"
            | "/switchyard.v1.AdminService/CreateApiKey"
            | "/switchyard.v1.AdminService/ListApiKeys"
            | "/switchyard.v1.AdminService/RevokeApiKey" => Scope::Admin,
            "/switchyard.v1.EventService/WatchEvents" => Scope::EventsRead,
            "/switchyard.v1.WebhookService/CreateWebhookEndpoint"
            | "/switchyard.v1.WebhookService/GetWebhookEndpoint"
            | "/switchyard.v1.WebhookService/ListWebhookEndpoints"
            | "/switchyard.v1.WebhookService/UpdateWebhookEndpoint"
            | "/switchyard.v1.WebhookService/DeleteWebhookEndpoint"
            | "/switchyard.v1.WebhookService/RotateWebhookSecret"
            | "/switchyard.v1.WebhookService/ListWebhookDeliveries" => Scope::WebhooksManage,
            _ => return Needs::AnyKey,
        };
    Needs::Scope(scope)
}

/// Who is calling: put in each call's extensions by the auth layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    /// The key's id; `None` when auth is off (loopback, no key yet).
    pub key_id: Option<String>,
}

impl Caller {
    /// The caller when auth is off: the default tenant.
    pub fn local() -> Self {
        Self {
            tenant: TenantId::default_tenant(),
            key_id: None,
        }
    }

    /// Whether this is the operator's tenant (the one named `default`).
    pub fn is_operator(&self) -> bool {
        self.tenant == TenantId::default_tenant()
    }
}

/// A new key: what the caller is shown once, and what is stored. Its
/// `Debug` shows neither the key nor its hash.
pub struct NewKey {
    pub key_id: String,
    /// `sy_<key_id>_<secret>`.
    pub key: String,
    /// Its SHA-256.
    pub hash: Vec<u8>,
}

fn random_text(n: usize) -> Result<String, Error> {
    use ring::rand::SecureRandom as _;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("the system's random source failed".into()))?;
    // 32 symbols: each byte's low five bits, uniformly.
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect())
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Whether a server listening on `addr` is reachable from this host only
/// (127.0.0.0/8 or ::1): only then may it run without auth while no key
/// exists. `0.0.0.0` and `::` listen everywhere.
pub fn listens_on_loopback(addr: std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// A new random key: a 16-character id and 260 bits of secret (52 base32
/// characters).
pub fn generate_key() -> Result<NewKey, Error> {
    let key_id = random_text(KEY_ID_LEN)?;
    let key = format!("sy_{key_id}_{}", random_text(SECRET_LEN)?);
    let hash = hash_key(&key);
    Ok(NewKey { key_id, key, hash })
}

/// A new tenant id: `tn_` and 26 random base32 characters.
pub fn new_tenant_id() -> Result<TenantId, Error> {
    Ok(TenantId::from_stored(format!("tn_{}", random_text(26)?)))
}

/// The SHA-256 of a whole key.
pub fn hash_key(key: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .to_vec()
}

/// The key id of a well-formed `sy_<key_id>_<secret>`.
pub fn key_id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("sy_")?;
    let (id, secret) = rest.split_once('_')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
    (ok(id, KEY_ID_LEN) && ok(secret, SECRET_LEN)).then_some(id)
}

/// Whether `s` could be a key id (checked before it is looked up or
/// repeated in an error).
pub fn is_key_id(s: &str) -> bool {
    s.len() == KEY_ID_LEN && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// The key sent with a call: the `authorization: Bearer ...` metadata.
/// `Ok(None)` when there is none.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, ()> {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| ())?;
    let (scheme, token) = v.trim().split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(());
    }
    Ok(Some(token.trim()))
}

/// A key as the layer knows it: the stored record and its tenant's rate.
#[derive(Clone, Debug)]
struct Known {
    record: KeyRecord,
    per_second: u32,
    burst: u32,
}

type Limiter = (u32, u32, Arc<DefaultDirectRateLimiter>);

/// The auth layer's state, shared by every connection.
struct State {
    store: Store,
    clock: Arc<dyn Clock>,
    /// Whether the server listens on loopback only (auth may then be off).
    loopback: bool,
    /// Every key id in the database (revoked ones too), read again once
    /// older than [`CACHE_FOR`]: a key id nobody made is answered without
    /// a database read, so a flood of made-up keys costs one read per
    /// [`CACHE_FOR`]. One call at a time refreshes it.
    ids: tokio::sync::Mutex<Option<(Instant, IdsRead)>>,
    /// Lookups of key ids outside `ids`.
    misses: DefaultDirectRateLimiter,
    keys: Mutex<HashMap<String, (Instant, Option<Known>)>>,
    /// What [`State::required`] last found: 0 not yet asked, 1 no key,
    /// 2 a key (for the one log line when auth turns on).
    any_key: std::sync::atomic::AtomicU8,
    limiters: Mutex<HashMap<String, Limiter>>,
    touched: Mutex<HashMap<String, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Entries kept in a cache before expired ones are dropped.
const CACHE_SWEEP_AT: usize = 10_000;

impl State {
    /// Whether calls need a key now: always off loopback; on loopback once
    /// any key exists.
    async fn required(&self) -> Result<bool, Error> {
        if !self.loopback {
            return Ok(true);
        }
        // The set of key ids counts revoked keys too: once any key was
        // made, calls need one.
        let any = !self.key_ids().await?.is_empty();
        let before = self
            .any_key
            .swap(u8::from(any) + 1, std::sync::atomic::Ordering::Relaxed);
        if any && before == 1 {
            tracing::info!("auth is now on: an API key exists, so every call needs one");
        }
        Ok(any)
    }

    /// The key ids in the database, at most [`CACHE_FOR`] old.
    /// A failed read is kept [`FAILED_FOR`]: the calls that queued behind
    /// it (one read at a time) get its answer, rather than each wait out a
    /// read of its own against a database that does not answer.
    async fn key_ids(&self) -> Result<Arc<HashSet<String>>, Error> {
        let mut ids = self.ids.lock().await;
        match ids.as_ref() {
            Some((at, Ok(set))) if at.elapsed() < CACHE_FOR => return Ok(set.clone()),
            Some((at, Err(e))) if at.elapsed() < FAILED_FOR => return Err(e.clone()),
            _ => {}
        }
        let read = self
            .store
            .key_ids()
            .await
            .map(|v| Arc::new(v.into_iter().collect::<HashSet<String>>()));
        *ids = Some((Instant::now(), read.clone()));
        read
    }

    async fn lookup(&self, key_id: &str) -> Result<Option<Known>, Error> {
        if let Some((at, known)) = lock(&self.keys).get(key_id)
            && at.elapsed() < CACHE_FOR
        {
            return Ok(known.clone());
        }
        // A key made since the set was read is found by its lookup; ids
        // outside the set are looked up at most MISSES_PER_SECOND times a
        // second, so made-up keys cannot keep the database busy.
        if !self.key_ids().await?.contains(key_id) && self.misses.check().is_err() {
            return Ok(None);
        }
        let known = match self.store.key_by_id(key_id).await? {
            None => None,
            Some(record) => {
                let t = self.store.tenant_by_id(&record.tenant).await?;
                Some(Known {
                    per_second: t
                        .as_ref()
                        .and_then(|t| t.rate_per_second)
                        .unwrap_or(DEFAULT_RATE_PER_SECOND),
                    burst: t
                        .as_ref()
                        .and_then(|t| t.rate_burst)
                        .unwrap_or(DEFAULT_RATE_BURST),
                    record,
                })
            }
        };
        let mut keys = lock(&self.keys);
        if keys.len() >= CACHE_SWEEP_AT {
            keys.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
        }
        keys.insert(key_id.to_owned(), (Instant::now(), known.clone()));
        Ok(known)
    }

    /// The caller of a call presenting `key`.
    async fn authenticate(&self, key: &str) -> Result<Known, Error> {
        let invalid = |why, key_id: Option<&str>| Error::InvalidApiKey {
            why,
            key_id: key_id.map(str::to_owned),
        };
        let Some(key_id) = key_id_of(key) else {
            return Err(invalid("malformed", None));
        };
        let Some(known) = self.lookup(key_id).await? else {
            return Err(invalid("unknown", None));
        };
        let hash = hash_key(key);
        let same: bool =
            subtle::ConstantTimeEq::ct_eq(hash.as_slice(), known.record.hash.as_slice()).into();
        if !same {
            return Err(invalid("unknown", None));
        }
        // Revoked from the moment it is written, whatever the revoker's
        // clock said.
        if known.record.revoked.is_some() {
            return Err(invalid("revoked", Some(key_id)));
        }
        if known.record.expires.is_some_and(|e| e <= self.clock.now()) {
            return Err(invalid("expired", Some(key_id)));
        }
        Ok(known)
    }

    /// Writes the key's last use, at most every [`TOUCH_EVERY`], off the
    /// call's path.
    fn touch(&self, key_id: &str, now: Ts) {
        {
            let mut touched = lock(&self.touched);
            if touched
                .get(key_id)
                .is_some_and(|at| at.elapsed() < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() >= CACHE_SWEEP_AT {
                touched.retain(|_, at| at.elapsed() < TOUCH_EVERY);
            }
            touched.insert(key_id.to_owned(), Instant::now());
        }
        let store = self.store.clone();
        let key_id = key_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = store.touch_key(&key_id, now).await {
                tracing::debug!(key_id, error = %e, "recording a key's last use failed");
            }
        });
    }

    /// Takes a token from the key's bucket.
    fn admit(&self, known: &Known) -> Result<(), Error> {
        let key_id = &known.record.key_id;
        let (per_second, burst) = (known.per_second.max(1), known.burst.max(1));
        let limiter = {
            let mut limiters = lock(&self.limiters);
            match limiters.get(key_id) {
                Some((p, b, l)) if *p == per_second && *b == burst => l.clone(),
                _ => {
                    let quota =
                        Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
                            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                    let l = Arc::new(RateLimiter::direct(quota));
                    if limiters.len() >= CACHE_SWEEP_AT {
                        // Only as many keys as were created can be here;
                        // past this many, the buckets start again full.
                        limiters.clear();
                    }
                    limiters.insert(key_id.clone(), (per_second, burst, l.clone()));
                    l
                }
            }
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            Error::RateLimited {
                key_id: key_id.clone(),
                per_second,
                burst,
                retry_after_nanos: i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX).max(1),
            }
        })
    }

    /// Decides a call: its caller, or the error it is answered with.
    async fn decide(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Caller>, Error> {
        let needs = needs(path);
        if needs == Needs::Nothing {
            return Ok(None);
        }
        let key = match bearer(headers) {
            Ok(k) => k,
            Err(()) => {
                return Err(Error::InvalidApiKey {
                    why: "malformed",
                    key_id: None,
                });
            }
        };
        let Some(key) = key else {
            if self.required().await? {
                return Err(Error::InvalidApiKey {
                    why: "missing",
                    key_id: None,
                });
            }
            return Ok(Some(Caller::local()));
        };
        let known = self.authenticate(key).await?;
        if let Needs::Scope(scope) = needs
            && !known.record.scopes.iter().any(|s| s == scope.as_str())
        {
            return Err(Error::MissingScope {
                scope: scope.as_str(),
                method: path.trim_start_matches('/').to_owned(),
                key_id: known.record.key_id.clone(),
            });
        }
        self.admit(&known)?;
        self.touch(&known.record.key_id, self.clock.now());
        Ok(Some(Caller {
            tenant: known.record.tenant.clone(),
            key_id: Some(known.record.key_id.clone()),
        }))
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("loopback", &self.loopback)
            .finish_non_exhaustive()
    }
}

/// The layer: put in front of every service.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    state: Arc<State>,
}

impl AuthLayer {
    /// Checks calls against `store`'s keys; `loopback`: the server listens
    /// on loopback only, so it runs without auth until a key exists.
    pub fn new(store: Store, clock: Arc<dyn Clock>, loopback: bool) -> Self {
        Self {
            state: Arc::new(State {
                store,
                clock,
                loopback,
                ids: tokio::sync::Mutex::default(),
                misses: RateLimiter::direct(Quota::per_second(MISSES_PER_SECOND)),
                keys: Mutex::default(),
                any_key: std::sync::atomic::AtomicU8::new(0),
                limiters: Mutex::default(),
                touched: Mutex::default(),
            }),
        }
    }

    /// Says in one line at startup whether calls need a key.
    pub async fn log_mode(&self) {
        match self.state.required().await {
            Ok(false) => tracing::info!(
                "auth is off: listening on loopback and no API key exists; \
                 calls act as tenant \"default\" (the first `switchyard admin key create` turns it on)"
            ),
            Ok(true) if self.state.loopback => {
                tracing::info!("auth is on: every call needs an API key")
            }
            Ok(true) => match self.state.store.any_key().await {
                Ok(false) => tracing::warn!(
                    "auth is on (not listening on loopback) and no API key exists: every call is \
                     refused until one is created with `switchyard admin tenant create NAME` and \
                     `switchyard admin key create --tenant NAME --scopes ...` against this database"
                ),
                _ => tracing::info!("auth is on: every call needs an API key"),
            },
            Err(e) => tracing::warn!(error = %e, "could not tell whether any API key exists"),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the router.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    state: Arc<State>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Auth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            match state.decide(req.uri().path(), req.headers()).await {
                Ok(Some(caller)) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Ok(None) => inner.call(req).await,
                Err(e) => Ok(crate::api::status::to_status(e).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_well_formed_and_hashed_whole() {
        let k = generate_key().unwrap();
        assert_eq!(key_id_of(&k.key), Some(k.key_id.as_str()));
        assert_eq!(k.hash, hash_key(&k.key));
        assert_eq!(k.hash.len(), 32);
        let other = generate_key().unwrap();
        assert_ne!(k.key, other.key);
        assert_ne!(k.key_id, other.key_id);
        // One character off in the secret: same id, another hash.
        let mut tampered = k.key.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'a' { 'b' } else { 'a' });
        assert_eq!(key_id_of(&tampered), Some(k.key_id.as_str()));
        assert_ne!(hash_key(&tampered), k.hash);
    }

    #[test]
    fn malformed_keys_have_no_id() {
        let k = generate_key().unwrap();
        for bad in [
            "",
            "sy_",
            &k.key[1..],
            &k.key[..k.key.len() - 1],
            &k.key.to_uppercase(),
            &format!("{}x", k.key),
            &k.key.replace('_', "-"),
        ] {
            assert_eq!(key_id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_method_needs_its_own_scope() {
        use Scope::*;
        let table = [
            ("/switchyard.v1.DeviceService/GetDevice", DevicesRead),
            ("/switchyard.v1.DeviceService/ListDevices", DevicesRead),
            ("/switchyard.v1.DeviceService/CreateDevice", DevicesWrite),
            ("/switchyard.v1.DeviceService/UpdateDevice", DevicesWrite),
            ("/switchyard.v1.DeviceService/DeleteDevice", DevicesWrite),
            ("/switchyard.v1.ActionService/GetAction", ActionsRead),
            ("/switchyard.v1.ActionService/ListActions", ActionsRead),
            (
                "/switchyard.v1.ActionService/ListActionHistory",
                ActionsRead,
            ),
            ("/switchyard.v1.ActionService/PushAction", ActionsWrite),
            ("/switchyard.v1.ActionService/CancelAction", ActionsWrite),
            ("/switchyard.v1.AdminService/CreateApiKey", Admin),
            (
                "/switchyard.v1.WebhookService/RotateWebhookSecret",
                WebhooksManage,
            ),
            (
                "/switchyard.v1.WebhookService/ListWebhookDeliveries",
                WebhooksManage,
            ),
        ];
        for (path, scope) in table {
            assert_eq!(needs(path), Needs::Scope(scope), "{path}");
        }
        assert_eq!(needs("/grpc.health.v1.Health/Check"), Needs::Nothing);
        assert_eq!(
            needs("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Needs::Nothing
        );
        assert_eq!(
            needs("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Needs::Nothing
        );
        assert_eq!(needs("/switchyard.v1.Nope/Nope"), Needs::AnyKey);
        assert_eq!(needs("/switchyard.v1.AdminService/Nope"), Needs::AnyKey);
        assert_eq!(
            needs("/switchyard.v1.DeviceService/GetDevice/"),
            Needs::AnyKey
        );
        assert_eq!(
            needs("/Switchyard.v1.DeviceService/GetDevice"),
            Needs::AnyKey
        );
        assert_eq!(needs("/grpc.health.v1.HealthX/Check"), Needs::AnyKey);
    }

    #[test]
    fn scope_lists_parse_strictly() {
        assert_eq!(
            Scope::parse_list("actions:read, actions:read,admin".split(',')).unwrap(),
            vec![Scope::ActionsRead, Scope::Admin]
        );
        assert!(Scope::parse_list("".split(',')).is_err());
        assert!(Scope::parse_list(["actions:*"]).is_err());
        assert_eq!(
            Scope::parse_list(["webhooks:manage"]).unwrap(),
            [Scope::WebhooksManage]
        );
        assert_eq!(
            Scope::parse_list(["events:read"]).unwrap(),
            [Scope::EventsRead]
        );
    }

    async fn state(loopback: bool) -> State {
        let clock: Arc<dyn Clock> = Arc::new(crate::domain::ManualClock::new(Ts(0)));
        let store = Store::open("sqlite::memory:", clock.clone()).await.unwrap();
        let layer = AuthLayer::new(store, clock, loopback);
        Arc::try_unwrap(layer.state).unwrap()
    }

    fn why(r: Result<Option<Caller>, Error>) -> &'static str {
        match r {
            Err(Error::InvalidApiKey { why, .. }) => why,
            other => panic!("{other:?}"),
        }
    }

    /// Off loopback, a call without a key is refused even when no key
    /// exists; on loopback it acts as the default tenant until one does.
    #[tokio::test]
    async fn auth_is_off_only_on_loopback_without_keys() {
        let none = http::HeaderMap::new();
        let path = "/switchyard.v1.DeviceService/ListDevices";
        let open = state(false).await;
        assert_eq!(why(open.decide(path, &none).await), "missing");
        // Health needs nothing anywhere.
        assert_eq!(
            open.decide("/grpc.health.v1.Health/Check", &none)
                .await
                .unwrap(),
            None
        );
        let local = state(true).await;
        assert_eq!(
            local.decide(path, &none).await.unwrap(),
            Some(Caller::local())
        );
        // A key sent anyway is checked.
        let mut bad = http::HeaderMap::new();
        bad.insert(
            http::header::AUTHORIZATION,
            "Bearer sy_nope".parse().unwrap(),
        );
        assert_eq!(why(local.decide(path, &bad).await), "malformed");
        // The first key turns it on (once the cached answer lapses).
        let k = generate_key().unwrap();
        local
            .store
            .create_key(&KeyRecord {
                key_id: k.key_id.clone(),
                tenant: TenantId::default_tenant(),
                hash: k.hash,
                scopes: vec!["devices:read".into()],
                description: String::new(),
                created: Ts(0),
                expires: None,
                revoked: None,
                last_used: None,
            })
            .await
            .unwrap();
        *local.ids.lock().await = None;
        assert_eq!(why(local.decide(path, &none).await), "missing");
        let mut good = http::HeaderMap::new();
        good.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {}", k.key).parse().unwrap(),
        );
        let caller = local.decide(path, &good).await.unwrap().unwrap();
        assert_eq!(caller.key_id.as_deref(), Some(k.key_id.as_str()));
        // Revoked, it is refused once the cached lookup lapses; and a
        // revoked key still counts as a key: auth stays on.
        assert!(
            local
                .store
                .revoke_key(&k.key_id, None, Ts(1))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            local.decide(path, &good).await.is_ok(),
            "cached for CACHE_FOR"
        );
        lock(&local.keys).clear();
        assert_eq!(why(local.decide(path, &good).await), "revoked");
        *local.ids.lock().await = None;
        assert_eq!(why(local.decide(path, &none).await), "missing");
        // A made-up key of a well-formed id is unknown without a lookup.
        let mut forged = http::HeaderMap::new();
        let other = generate_key().unwrap();
        forged.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {}", other.key).parse().unwrap(),
        );
        assert_eq!(why(local.decide(path, &forged).await), "unknown");
        // Made-up ids are looked up at most MISSES_PER_SECOND a second:
        // past that, answered without a lookup (and nothing cached).
        let mut looked_up = 0;
        for _ in 0..100 {
            let k = generate_key().unwrap();
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {}", k.key).parse().unwrap(),
            );
            assert_eq!(why(local.decide(path, &h).await), "unknown");
            looked_up += usize::from(lock(&local.keys).contains_key(&k.key_id));
        }
        assert!(looked_up < 40, "{looked_up} lookups");
    }

    #[test]
    fn only_loopback_addresses_may_run_without_auth() {
        for (addr, local) in [
            ("127.0.0.1:50051", true),
            ("127.0.0.2:1", true),
            ("[::1]:50051", true),
            ("0.0.0.0:50051", false),
            ("[::]:50051", false),
            ("10.0.0.7:50051", false),
            ("[fe80::1]:50051", false),
        ] {
            assert_eq!(listens_on_loopback(addr.parse().unwrap()), local, "{addr}");
        }
    }

    #[test]
    fn bearer_is_read_from_authorization() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        h.insert(http::header::AUTHORIZATION, "Bearer sy_x".parse().unwrap());
        assert_eq!(bearer(&h), Ok(Some("sy_x")));
        h.insert(
            http::header::AUTHORIZATION,
            "bearer  sy_y ".parse().unwrap(),
        );
        assert_eq!(bearer(&h), Ok(Some("sy_y")));
        h.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), Err(()));
        h.insert(http::header::AUTHORIZATION, "sy_x".parse().unwrap());
        assert_eq!(bearer(&h), Err(()));
    }
}
