//! Webhook delivery (docs/events.md, ADR 0014): each enabled endpoint is
//! sent the events its types select, one at a time, in cursor order, as
//! Standard Webhooks messages signed with its live secrets.
//!
//! - **Claims.** A replica claims an endpoint that has events after its
//!   `delivered_cursor` with a lease (store/webhooks.rs); every write it
//!   then makes for the endpoint is conditional on still holding the
//!   lease. The lease is renewed before each attempt to outlast it, so two
//!   replicas never deliver to one endpoint at once unless one stalls for
//!   longer than the lease minus the timeout; a stalled one's record is
//!   refused and it stops.
//! - **At least once.** `delivered_cursor` moves past an event only once a
//!   2xx answer is recorded. A replica that dies between the answer and
//!   the record leaves the event to be sent again, with the same
//!   `webhook-id`.
//! - **Order.** An endpoint's events are sent in cursor order and the next
//!   only after the previous was delivered: a failing event holds back the
//!   ones after it (for that endpoint only) until it is delivered or the
//!   endpoint is disabled.
//! - **Retries.** The n-th consecutive failure waits `retry_min × 3^(n-1)`,
//!   at most `retry_max`, times a random factor in [0.8, 1.2]; an endpoint
//!   failing for `give_up` (a day) is disabled with an event, and one
//!   answering 410 Gone at once.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use switchyard_proto::v1 as pb;

use crate::{
    domain::{Clock, Error, TenantId, Ts},
    store::{AttemptEffect, AttemptRecord, EndpointRecord, EventRecord, Store},
    webhooks::{self, TargetPolicy},
};

/// How webhooks are delivered; the operator's flags (`--webhook-*`).
#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Where internal addresses may be reached (`--webhook-url-allow`).
    pub policy: TargetPolicy,
    /// How long a receiver has to answer.
    pub timeout: Duration,
    /// The wait after a first failure.
    pub retry_min: Duration,
    /// The longest wait between attempts.
    pub retry_max: Duration,
    /// How long an endpoint may fail before it is disabled.
    pub give_up: Duration,
    /// Endpoints delivered to at once by one replica.
    pub concurrency: usize,
    /// Most endpoints per tenant.
    pub max_endpoints: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            policy: TargetPolicy::default(),
            timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(4 * 3600),
            give_up: Duration::from_secs(24 * 3600),
            concurrency: 64,
            max_endpoints: 100,
        }
    }
}

impl DeliveryConfig {
    /// How long a claim lasts: renewed before each attempt, it outlasts
    /// the attempt (at most the timeout) by the timeout and 5 s more. A
    /// replica that dies holding one delays its endpoint by this long.
    pub fn lease(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(5)
    }

    /// The wait before the attempt after `failures` consecutive failures,
    /// with `unit` in [0, 1) choosing the jitter.
    pub fn backoff(&self, failures: i64, unit: f64) -> Duration {
        let n = i32::try_from(failures.clamp(1, 30) - 1).unwrap_or(0);
        let base = self.retry_min.as_secs_f64() * 3f64.powi(n);
        let capped = base.min(self.retry_max.as_secs_f64());
        Duration::from_secs_f64(capped * (0.8 + 0.4 * unit.clamp(0.0, 1.0)))
    }
}

/// A uniform number in [0, 1) from the system's random source (0.5 if
/// it fails: the jitter is not a secret).
fn unit_random() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// Events read per step of an endpoint's queue.
const PAGE: u32 = 100;

/// Longest error text logged per attempt.
const MAX_ERROR: usize = 300;

/// The Standard Webhooks `type` of an event: `action.failed`,
/// `device.created`, `webhook_endpoint.disabled`, ...
pub fn message_type(t: pb::EventType) -> String {
    let name = t.as_str_name();
    let name = name.strip_prefix("EVENT_TYPE_").unwrap_or(name);
    let lower = name.to_ascii_lowercase();
    match lower.rfind('_') {
        Some(i) => format!("{}.{}", &lower[..i], &lower[i + 1..]),
        None => lower,
    }
}

fn descriptors() -> Option<&'static prost_reflect::DescriptorPool> {
    static POOL: std::sync::OnceLock<Option<prost_reflect::DescriptorPool>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(switchyard_proto::FILE_DESCRIPTOR_SET).ok()
    })
    .as_ref()
}

/// The body of an event's message: `{"type", "timestamp", "data"}`, with
/// `data` the Event in the proto3 JSON mapping under the .proto's field
/// names (what `google.protobuf.json_format.ParseDict` reads back into the
/// Event WatchEvents streams).
pub fn message_body(event: &pb::Event) -> Result<Bytes, Error> {
    use prost::Message as _;
    let internal = |what: &str| Error::Internal(format!("webhook body: {what}"));
    let pool = descriptors().ok_or_else(|| internal("descriptors do not decode"))?;
    let desc = pool
        .get_message_by_name("switchyard.v1.Event")
        .ok_or_else(|| internal("no switchyard.v1.Event"))?;
    let dynamic = prost_reflect::DynamicMessage::decode(desc, event.encode_to_vec().as_slice())
        .map_err(|e| internal(&e.to_string()))?;
    let data = dynamic
        .serialize_with_options(
            serde_json::value::Serializer,
            &prost_reflect::SerializeOptions::new().use_proto_field_name(true),
        )
        .map_err(|e| internal(&e.to_string()))?;
    let t = pb::EventType::try_from(event.r#type).unwrap_or(pb::EventType::Unspecified);
    let timestamp = event
        .time
        .as_ref()
        .and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map(|t| t.to_string())
        .unwrap_or_default();
    let body = serde_json::json!({
        "type": message_type(t),
        "timestamp": timestamp,
        "data": data,
    });
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| internal(&e.to_string()))
}

/// Delivers webhooks from one replica: [`Deliverer::run`] in the server,
/// [`Deliverer::deliver_due`] in tests.
#[derive(Clone, Debug)]
pub struct Deliverer {
    store: Store,
    clock: Arc<dyn Clock>,
    config: Arc<DeliveryConfig>,
    slots: Arc<tokio::sync::Semaphore>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Events up to this cursor have woken their tenants' parked
    /// endpoints (-1: not yet started).
    scanned: Arc<std::sync::atomic::AtomicI64>,
}

/// What one endpoint's turn came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Turn {
    /// Events delivered (2xx).
    pub delivered: usize,
    /// Attempts that failed (the endpoint then waits for its retry).
    pub failed: usize,
}

impl Deliverer {
    pub fn new(store: Store, clock: Arc<dyn Clock>, config: Arc<DeliveryConfig>) -> Self {
        let slots = Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1)));
        Self {
            store,
            clock,
            config,
            slots,
            stopping: tokio::sync::watch::channel(false).1,
            scanned: Arc::new(std::sync::atomic::AtomicI64::new(-1)),
        }
    }

    /// Wakes the parked endpoints of the tenants that have events since
    /// the last look (every parked endpoint on the first).
    async fn wake(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.clock.now();
        let scanned = self.scanned.load(SeqCst);
        let head = self.store.event_head().await?;
        if scanned < 0 {
            self.store.unpark_webhooks(None, now).await?;
        } else if head > scanned {
            self.store
                .unpark_webhooks(Some((scanned, head)), now)
                .await?;
        }
        self.scanned.fetch_max(head, SeqCst);
        Ok(())
    }

    fn lease_until(&self) -> Ts {
        let lease = i64::try_from(self.config.lease().as_nanos()).unwrap_or(i64::MAX / 2);
        self.clock.now().plus_nanos(lease)
    }

    /// Endpoints due now that have events to deliver, claimed; at most
    /// `limit`.
    async fn claim(&self, limit: usize) -> Result<Vec<(String, String)>, Error> {
        self.wake().await?;
        let now = self.clock.now();
        let due = self
            .store
            .due_webhooks(now, u32::try_from(limit).unwrap_or(u32::MAX))
            .await?;
        let mut latest: std::collections::HashMap<TenantId, i64> = Default::default();
        let mut claimed = Vec::new();
        for d in due {
            let newest = match latest.get(&d.tenant) {
                Some(n) => *n,
                None => {
                    let n = self.store.latest_event(&d.tenant).await?;
                    latest.insert(d.tenant.clone(), n);
                    n
                }
            };
            if newest <= d.delivered_cursor {
                // Caught up: parked until its tenant has new events, so
                // idle endpoints never crowd out busy ones.
                self.store
                    .park_webhook(&d.tenant, &d.id, None, d.delivered_cursor, now)
                    .await?;
                continue;
            }
            let owner = uuid::Uuid::now_v7().to_string();
            if self
                .store
                .claim_webhook(&d.id, &owner, now, self.lease_until())
                .await?
            {
                claimed.push((d.id, owner));
            }
        }
        Ok(claimed)
    }

    /// Delivers to every endpoint due at the clock's now until each is
    /// caught up or waiting for a retry; what the turns came to.
    pub async fn deliver_due(&self) -> Result<Turn, Error> {
        let mut total = Turn::default();
        loop {
            let claimed = self.claim(self.config.concurrency.max(1)).await?;
            if claimed.is_empty() {
                return Ok(total);
            }
            let turns = futures::future::join_all(
                claimed.into_iter().map(|(id, owner)| self.turn(id, owner)),
            )
            .await;
            for t in turns {
                let t = t?;
                total.delivered += t.delivered;
                total.failed += t.failed;
            }
            if total.failed > 0 {
                // A failed endpoint waits for its retry; others were
                // caught up.
                return Ok(total);
            }
        }
    }

    /// Runs until `stop`: claims due endpoints when events are committed
    /// (this replica's, at once; others', within a quarter second) and
    /// delivers to each in a task of its own.
    pub async fn run(mut self, stop: tokio::sync::watch::Receiver<bool>) {
        self.stopping = stop.clone();
        let mut stop = stop;
        let store = self.store.clone();
        let mut turns = tokio::task::JoinSet::new();
        loop {
            while turns.try_join_next().is_some() {}
            if *stop.borrow() {
                // Each turn records what it delivered and gives up its
                // claim at its next step.
                while turns.join_next().await.is_some() {}
                return;
            }
            let changed = store.changed().notified();
            let free = self.slots.available_permits();
            if free > 0 {
                match self.claim(free).await {
                    Ok(claimed) => {
                        for (id, owner) in claimed {
                            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                                // Over the bound: give it back for later.
                                let _ = self.store.release_webhook(&id, &owner, None).await;
                                continue;
                            };
                            let me = self.clone();
                            turns.spawn(async move {
                                if let Err(e) = me.turn(id.clone(), owner).await {
                                    tracing::warn!(endpoint_id = %id, error = %e, "webhook delivery stopped");
                                }
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming webhook deliveries failed"),
                }
            }
            // At most a hundred claims a second however often events are
            // committed (a notification that comes meanwhile is kept).
            tokio::time::sleep(Duration::from_millis(10)).await;
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One endpoint's turn under claim `owner`: delivers its events in
    /// order until it is caught up, an attempt fails, or the claim is lost
    /// or stopped.
    pub async fn turn(&self, id: String, owner: String) -> Result<Turn, Error> {
        let mut turn = Turn::default();
        let outcome = self.turn_inner(&id, &owner, &mut turn).await;
        // (A lost claim releases nothing: every write is fenced by it.)
        match outcome {
            Ok(Step::Released) => {}
            Ok(Step::CaughtUp(ref tenant, cursor)) => {
                let _ = self
                    .store
                    .park_webhook(tenant, &id, Some(&owner), cursor, self.clock.now())
                    .await;
            }
            Ok(Step::Stop) => {
                let _ = self.store.release_webhook(&id, &owner, None).await;
            }
            Err(_) => {
                // Not the receiver's doing (the database, say): tried
                // again after the shortest wait, not at once.
                let wait = i64::try_from(self.config.retry_min.as_nanos()).unwrap_or(i64::MAX / 2);
                let _ = self
                    .store
                    .release_webhook(&id, &owner, Some(self.clock.now().plus_nanos(wait)))
                    .await;
            }
        }
        outcome.map(|_| turn)
    }

    async fn turn_inner(&self, id: &str, owner: &str, turn: &mut Turn) -> Result<Step, Error> {
        let Some(mut ep) = self
            .store
            .renew_webhook(id, owner, self.lease_until())
            .await?
        else {
            return Ok(Step::Stop);
        };
        let mut progress = Progress::new(ep.delivered_cursor);
        let mut read_at = std::time::Instant::now();
        let mut lease_until = self.lease_until();
        let mut sender: Option<webhooks::Sender> = None;
        loop {
            if *self.stopping.borrow() {
                self.flush(&ep, owner, &mut progress).await?;
                return Ok(Step::Stop);
            }
            if read_at.elapsed() >= REFRESH || self.lease_short(lease_until) {
                // The owner's changes (disabled, a new URL or secret) reach
                // a running turn here, and the claim is renewed.
                if !self.flush(&ep, owner, &mut progress).await? {
                    return Ok(Step::Stop);
                }
                match self
                    .store
                    .renew_webhook(id, owner, self.lease_until())
                    .await?
                {
                    Some(fresh) => ep = fresh,
                    None => return Ok(Step::Stop),
                }
                read_at = std::time::Instant::now();
                lease_until = self.lease_until();
            }
            let page = self
                .store
                .events_after(&ep.tenant, progress.cursor, None, PAGE)
                .await?;
            if page.is_empty() {
                if !self.flush(&ep, owner, &mut progress).await? {
                    return Ok(Step::Stop);
                }
                return Ok(Step::CaughtUp(ep.tenant.clone(), progress.cursor));
            }
            let selected: Vec<&EventRecord> = page
                .iter()
                .filter(|e| ep.selects(crate::api::events::event_type(e).as_str_name()))
                .collect();
            let ids: Vec<String> = selected
                .iter()
                .filter_map(|e| e.action_id.clone())
                .collect();
            let actions = self.store.actions_by_ids(&ep.tenant, &ids).await?;
            for event in &page {
                if !selected.iter().any(|e| e.cursor == event.cursor) {
                    progress.cursor = event.cursor;
                    continue;
                }
                if self.lease_short(lease_until) {
                    // Renewed before the send, never during it.
                    break;
                }
                if sender.as_ref().is_none_or(|s| s.url() != ep.url) {
                    sender =
                        webhooks::Sender::new(&self.config.policy, &ep.url, self.config.timeout)
                            .ok();
                }
                let action = event.action_id.as_ref().and_then(|a| actions.get(a));
                let (record, answered) = self.send(&ep, sender.as_ref(), event, action).await?;
                if answered {
                    progress.cursor = event.cursor;
                    progress.delivered.push(record);
                    turn.delivered += 1;
                    // The next event starts with a clean slate.
                    ep.attempts = 0;
                    ep.failing_since = None;
                    if (progress.delivered.len() >= RECORD_BATCH
                        || progress.flushed_at.elapsed() >= RECORD_EVERY)
                        && !self.flush(&ep, owner, &mut progress).await?
                    {
                        return Ok(Step::Stop);
                    }
                    if read_at.elapsed() >= REFRESH || self.lease_short(lease_until) {
                        break;
                    }
                    continue;
                }
                // A failure: what was delivered before it is recorded
                // first, then the failure, which gives up the claim.
                if !self.flush(&ep, owner, &mut progress).await? {
                    return Ok(Step::Stop);
                }
                turn.failed += 1;
                return self.failed(&ep, owner, record, progress.cursor).await;
            }
        }
    }

    /// Whether a claim that lasts until `until` might run out during the
    /// next attempt (it is renewed first).
    fn lease_short(&self, until: Ts) -> bool {
        let margin = i64::try_from((self.config.timeout + Duration::from_secs(2)).as_nanos())
            .unwrap_or(i64::MAX / 2);
        until.0 - self.clock.now().0 < margin
    }

    /// Records the deliveries made since the last record, and the events
    /// skipped among them; false if the claim was lost.
    async fn flush(
        &self,
        ep: &EndpointRecord,
        owner: &str,
        progress: &mut Progress,
    ) -> Result<bool, Error> {
        if progress.delivered.is_empty() && progress.cursor == progress.recorded {
            return Ok(true);
        }
        let ok = self
            .store
            .record_webhook_deliveries(
                &ep.tenant,
                &ep.id,
                owner,
                &progress.delivered,
                progress.cursor,
                self.clock.now(),
            )
            .await?;
        progress.delivered.clear();
        progress.recorded = progress.cursor;
        progress.flushed_at = std::time::Instant::now();
        Ok(ok)
    }

    /// Sends `event` to `ep` once: the attempt as logged, and whether it
    /// was delivered (2xx).
    async fn send(
        &self,
        ep: &EndpointRecord,
        sender: Option<&webhooks::Sender>,
        event: &EventRecord,
        action: Option<&crate::domain::Action>,
    ) -> Result<(AttemptRecord, bool), Error> {
        let message = crate::api::events::to_proto(event, action);
        let body = message_body(&message)?;
        let sent = self.clock.now();
        let began = std::time::Instant::now();
        let answered = match sender {
            Some(s) => {
                let span = if crate::telemetry::instruments().is_some() {
                    tracing::info_span!(
                        "webhook.deliver",
                        tenant_id = ep.tenant.as_str(),
                        endpoint_id = ep.id.as_str(),
                        event_id = message.event_id.as_str(),
                        device_id = message.device_id.as_str(),
                        action_id = message.action_id.as_str(),
                    )
                } else {
                    tracing::Span::none()
                };
                tracing::Instrument::instrument(
                    s.send(
                        &ep.live_secrets(sent),
                        &message.event_id,
                        sent.0.div_euclid(Ts::SECOND),
                        body,
                    ),
                    span,
                )
                .await
            }
            // The URL no longer passes the operator's check.
            None => Err(self
                .config
                .policy
                .check(&ep.url)
                .err()
                .unwrap_or_else(|| "the URL cannot be sent to".into())),
        };
        let (status, latency, error) = match &answered {
            Ok(a) => (a.status, a.latency, String::new()),
            Err(why) => (0, began.elapsed(), why.chars().take(MAX_ERROR).collect()),
        };
        let ok = (200..300).contains(&status);
        crate::metrics::webhook_attempt(match status {
            200..=299 => "DELIVERED",
            410 => "GONE",
            _ => "FAILED",
        });
        Ok((
            AttemptRecord {
                endpoint_id: ep.id.clone(),
                cursor: event.cursor,
                event_type: crate::api::events::event_type(event)
                    .as_str_name()
                    .to_owned(),
                attempt: ep.attempts + 1,
                at: self.clock.now(),
                outcome: if ok { "DELIVERED" } else { "FAILED" }.into(),
                http_status: status,
                latency_us: i64::try_from(latency.as_micros()).unwrap_or(i64::MAX),
                error,
                next_attempt: None,
            },
            ok,
        ))
    }

    /// Records a failed attempt, with everything before it (up to
    /// `cursor`) done: a retry after the backoff, or the endpoint disabled
    /// (410 Gone, or failing for the give-up period). The claim is given
    /// up.
    async fn failed(
        &self,
        ep: &EndpointRecord,
        owner: &str,
        mut record: AttemptRecord,
        cursor: i64,
    ) -> Result<Step, Error> {
        let at = record.at;
        let since = ep.failing_since.unwrap_or(at);
        let effect = if record.http_status == 410 {
            record.outcome = "GONE".into();
            tracing::warn!(endpoint_id = %ep.id, "webhook receiver answered 410 Gone: endpoint disabled");
            AttemptEffect {
                delivered_cursor: cursor,
                attempts: record.attempt,
                failing_since: Some(since),
                next_attempt: at,
                disable: Some("GONE"),
                release: true,
            }
        } else {
            let give_up = i64::try_from(self.config.give_up.as_nanos()).unwrap_or(i64::MAX);
            let disable = (at.0 - since.0 >= give_up).then_some("FAILING");
            let wait = self.config.backoff(record.attempt, unit_random());
            let next = at.plus_nanos(i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX / 2));
            if disable.is_some() {
                tracing::warn!(endpoint_id = %ep.id, "webhook receiver failed for the give-up period: endpoint disabled");
            } else {
                record.next_attempt = Some(next);
            }
            AttemptEffect {
                delivered_cursor: cursor,
                attempts: record.attempt,
                failing_since: Some(since),
                next_attempt: next,
                disable,
                release: true,
            }
        };
        if !self
            .store
            .record_webhook_attempt(&ep.tenant, owner, &record, &effect, ep.updated)
            .await?
        {
            return Ok(Step::Stop);
        }
        Ok(Step::Released)
    }
}

/// How often a turn re-reads its endpoint and renews its claim: an
/// owner's change (disabled, a new URL or secret) reaches a running turn
/// within this.
const REFRESH: Duration = Duration::from_secs(1);
/// Most deliveries recorded per write.
const RECORD_BATCH: usize = 100;
/// The longest a delivery waits to be recorded while a turn runs.
const RECORD_EVERY: Duration = Duration::from_millis(100);

/// A turn's progress through its endpoint's events.
#[derive(Debug)]
struct Progress {
    /// Every event up to it was delivered or skipped.
    cursor: i64,
    /// What the store has as `delivered_cursor`.
    recorded: i64,
    /// Deliveries not yet recorded.
    delivered: Vec<AttemptRecord>,
    flushed_at: std::time::Instant,
}

impl Progress {
    fn new(cursor: i64) -> Self {
        Self {
            cursor,
            recorded: cursor,
            delivered: Vec::new(),
            flushed_at: std::time::Instant::now(),
        }
    }
}

/// How an endpoint's turn ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    /// Every event of the tenant up to this cursor is done and none is
    /// newer: the endpoint may be parked.
    CaughtUp(TenantId, i64),
    /// An attempt failed and was recorded, lease given up.
    Released,
    /// Claim lost, endpoint disabled or server stopping.
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_types_are_dotted() {
        assert_eq!(message_type(pb::EventType::ActionFailed), "action.failed");
        assert_eq!(message_type(pb::EventType::DeviceCreated), "device.created");
        assert_eq!(
            message_type(pb::EventType::WebhookEndpointDisabled),
            "webhook_endpoint.disabled"
        );
    }

    #[test]
    fn backoff_grows_by_three_within_its_jitter_and_cap() {
        let c = DeliveryConfig::default();
        assert_eq!(c.backoff(1, 0.5), Duration::from_secs(5));
        assert_eq!(c.backoff(2, 0.5), Duration::from_secs(15));
        assert_eq!(c.backoff(3, 0.5), Duration::from_secs(45));
        assert_eq!(c.backoff(1, 0.0), Duration::from_secs(4));
        assert!((5_999..=6_000).contains(&c.backoff(1, 0.999_999_9).as_millis()));
        assert_eq!(c.backoff(20, 0.5), Duration::from_secs(4 * 3600));
        // Over a day: the attempts until give-up span about 24 hours.
        let mut elapsed = Duration::ZERO;
        let mut n = 0;
        while elapsed < c.give_up {
            n += 1;
            elapsed += c.backoff(n, 0.5);
        }
        assert!((10..=16).contains(&n), "{n} attempts");
    }

    #[test]
    fn a_body_holds_the_event_under_proto_field_names() {
        let e = pb::Event {
            event_id: "ev-7".into(),
            cursor: 7,
            r#type: pb::EventType::ActionFailed as i32,
            time: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            device_id: "bat-1".into(),
            error_code: "SCHEDULER_ACTIVE".into(),
            action_id: "a-1".into(),
            ..Default::default()
        };
        let body: serde_json::Value = serde_json::from_slice(&message_body(&e).unwrap()).unwrap();
        assert_eq!(body["type"], "action.failed");
        assert_eq!(body["timestamp"], "2027-01-15T08:00:00Z");
        assert_eq!(body["data"]["event_id"], "ev-7");
        assert_eq!(body["data"]["cursor"], "7");
        assert_eq!(body["data"]["type"], "EVENT_TYPE_ACTION_FAILED");
        assert_eq!(body["data"]["error_code"], "SCHEDULER_ACTIVE");
        assert_eq!(body["data"]["time"], "2027-01-15T08:00:00Z");
    }
}
