//! EventService.WatchEvents: the caller's tenant's events, from a cursor,
//! then as they are committed (docs/events.md).
//!
//! Each watch is a task reading the audit log a page at a time, on the
//! read pool, into a small channel: a slow consumer holds only its own
//! task, never a writer or a transaction.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};

use futures::Stream;
use switchyard_proto::v1::{self as pb, event_service_server::EventService};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{App, convert, parse_device_id};
use crate::{
    domain::{ActionState, DeviceId, Error, Reason, TenantId},
    store::EventRecord,
};

/// How often a watch that has caught up looks for new events written by
/// other processes (this process's commits wake it at once).
pub const POLL: Duration = Duration::from_millis(200);

/// The least time between two reads of a watch woken by commits.
const READ_EVERY: Duration = Duration::from_millis(20);

/// Events read per page.
const PAGE: u32 = 500;

/// Events a watch holds for its client before it stops reading.
const BUFFERED: usize = 64;

/// Implements `switchyard.v1.EventService`.
#[derive(Clone, Debug)]
pub struct Events {
    pub app: App,
    /// Turns true when the server shuts down: every watch ends, answered
    /// UNAVAILABLE with RetryInfo (resume on another replica, or after
    /// the restart).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Watches this server runs at once, at most (each polls the
    /// database); past it a watch is refused SERVER_BUSY, to be retried
    /// (or sent to another replica).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Page reads shared by the watches.
    pub pages: Arc<Pages>,
}

/// Watches a server runs at once by default.
pub const MAX_WATCHES: usize = 1024;

/// How often a watch checks that its key still works (revoked or expired
/// keys end it).
const KEY_CHECK: Duration = Duration::from_secs(2);

/// The type of an audit entry's event.
pub fn event_type(e: &EventRecord) -> pb::EventType {
    use pb::EventType as T;
    if e.endpoint_id.is_some() {
        return if e.to == crate::store::WEBHOOK_DISABLED {
            T::WebhookEndpointDisabled
        } else {
            T::Unspecified
        };
    }
    if e.action_id.is_none() {
        return match e.to.as_str() {
            "CREATED" => T::DeviceCreated,
            "DELETED" => T::DeviceDeleted,
            _ => T::DeviceUpdated,
        };
    }
    match ActionState::parse(&e.to) {
        Some(ActionState::Scheduled) => T::ActionScheduled,
        Some(ActionState::Acknowledged) => T::ActionAcknowledged,
        Some(ActionState::Active) => T::ActionActive,
        Some(ActionState::Completed) => T::ActionCompleted,
        Some(ActionState::Failed) => T::ActionFailed,
        Some(ActionState::Cancelled) => T::ActionCancelled,
        None => T::Unspecified,
    }
}

fn state(s: Option<&str>) -> i32 {
    s.and_then(ActionState::parse)
        .map_or(pb::ActionState::Unspecified, convert::state_to_proto) as i32
}

/// The event as clients receive it (WatchEvents, and webhooks' `data`).
pub fn to_proto(e: &EventRecord, action: Option<&crate::domain::Action>) -> pb::Event {
    let t = event_type(e);
    let failed = matches!(
        t,
        pb::EventType::ActionFailed | pb::EventType::ActionCancelled
    );
    let is_action = e.action_id.is_some();
    pb::Event {
        event_id: format!("ev-{}", e.cursor),
        cursor: e.cursor,
        r#type: t as i32,
        time: Some(convert::ts_to_proto(e.at)),
        device_id: e.device_id.clone(),
        action: action.map(convert::action_to_proto),
        from_state: if is_action {
            state(e.from.as_deref())
        } else {
            0
        },
        to_state: if is_action { state(Some(&e.to)) } else { 0 },
        reason: e.reason.clone(),
        error_code: if failed {
            e.reason.clone()
        } else {
            String::new()
        },
        request_id: e.request_id.clone().unwrap_or_default(),
        action_id: e.action_id.clone().unwrap_or_default(),
        webhook_endpoint_id: e.endpoint_id.clone().unwrap_or_default(),
    }
}

/// A watch's stream: what its task reads, unless the server is shutting
/// down: then SHUTTING_DOWN comes next, ahead of anything still buffered,
/// so a client never sees a watch end as if it were complete.
struct Watching {
    rx: mpsc::Receiver<Result<pb::Event, Status>>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Its last item was sent.
    done: bool,
}

impl Stream for Watching {
    type Item = Result<pb::Event, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        if *self.stopping.borrow() {
            self.done = true;
            return std::task::Poll::Ready(Some(Err(shutting_down())));
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(Err(e))) => {
                self.done = true;
                std::task::Poll::Ready(Some(Err(e)))
            }
            // A watch never ends by itself: its task gone without an
            // error (it panicked) is not a complete stream.
            std::task::Poll::Ready(None) => {
                self.done = true;
                std::task::Poll::Ready(Some(Err(super::status::to_status(Error::Internal(
                    "the event watch stopped; resume it from the last cursor".into(),
                )))))
            }
            other => other,
        }
    }
}

/// The last item of every watch when the server shuts down.
fn shutting_down() -> Status {
    super::status::transport_status(
        tonic::Code::Unavailable,
        pb::ErrorReason::ShuttingDown,
        "the server is shutting down: resume the watch from the last cursor, on another replica or after the restart".into(),
        Some(crate::domain::Ts::SECOND),
    )
}

/// A page of a tenant's events, with the actions they concern as they
/// stand.
#[derive(Debug)]
pub struct Page {
    events: Vec<EventRecord>,
    actions: HashMap<String, crate::domain::Action>,
}

type PageRead = Shared<BoxFuture<'static, Result<Arc<Page>, Error>>>;

/// Reads of event pages shared by the watches that ask for the same page
/// at once (watches that have caught up sit at the same cursor and are
/// woken by the same commit): one read of the database for all of them.
/// A read is shared while it runs, and until [`SHARE_FOR`] after it began.
#[derive(Debug, Default)]
pub struct Pages {
    reads: Mutex<HashMap<(String, i64), (Instant, PageRead)>>,
}

/// How long a finished page read is still handed to watches asking for it.
const SHARE_FOR: Duration = Duration::from_millis(5);

impl Pages {
    /// The page after `after`, and when the read that found it began.
    async fn get(
        &self,
        app: &App,
        tenant: &TenantId,
        after: i64,
    ) -> Result<(Arc<Page>, Instant), Error> {
        let key = (tenant.as_str().to_owned(), after);
        let read = {
            let mut reads = self
                .reads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Running, or finished a moment ago; a failure is not handed
            // on (but running reads are shared, whatever they end with).
            let fresh = |(at, r): &(Instant, PageRead)| match r.peek() {
                None => true,
                Some(Ok(_)) => at.elapsed() < SHARE_FOR,
                Some(Err(_)) => false,
            };
            reads.retain(|_, e| fresh(e));
            match reads.get(&key) {
                Some((began, r)) => (*began, r.clone()),
                None => {
                    let read = read_page(app.clone(), tenant.clone(), after);
                    let r = async move {
                        std::panic::AssertUnwindSafe(read)
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| {
                                Err(Error::Internal("reading a page of events panicked".into()))
                            })
                    }
                    .boxed()
                    .shared();
                    let began = Instant::now();
                    reads.insert(key, (began, r.clone()));
                    (began, r)
                }
            }
        };
        let (began, read) = read;
        read.await.map(|p| (p, began))
    }
}

async fn read_page(app: App, tenant: TenantId, after: i64) -> Result<Arc<Page>, Error> {
    // Every event of the tenant, the device filtered by each watch: a watch
    // moves through the whole stream, so the horizon check below compares
    // like with like.
    let events = app.store.events_after(&tenant, after, None, PAGE).await?;
    // Read after the page: retention deletes events and raises the horizon
    // in one transaction, so events forgotten before the page was read
    // show here, and the page is not trusted.
    let horizon = app.store.event_horizon(&tenant).await?;
    if after < horizon {
        return Err(Error::CursorExpired {
            after_cursor: after,
            oldest_cursor: horizon,
        });
    }
    let ids: Vec<String> = events
        .iter()
        .filter_map(|e| e.action_id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let actions = app.store.actions_by_ids(&tenant, &ids).await?;
    Ok(Arc::new(Page { events, actions }))
}

/// Whether the key the watch was opened with still works: a key revoked
/// or expired since ends the watches it opened, as it would any new call.
async fn key_still_works(app: &App) -> Result<(), Error> {
    let Some(key_id) = &app.caller.key_id else {
        return Ok(());
    };
    let why = match app.store.key_by_id(key_id).await? {
        None => Some("unknown"),
        Some(k) if k.revoked.is_some() => Some("revoked"),
        Some(k) if k.expires.is_some_and(|e| e <= app.clock.now()) => Some("expired"),
        Some(_) => None,
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::InvalidApiKey {
            why,
            key_id: Some(key_id.clone()),
        }),
    }
}

/// A watch as the server reads it.
struct Watch {
    device: Option<DeviceId>,
    /// Empty: every type.
    types: HashSet<i32>,
    after: i64,
    from_now: bool,
}

fn parse(req: pb::WatchEventsRequest) -> Result<Watch, Error> {
    let device = if req.device_id.is_empty() {
        None
    } else {
        Some(parse_device_id(&req.device_id, "device_id")?)
    };
    let mut types = HashSet::new();
    for t in req.event_types {
        match pb::EventType::try_from(t) {
            Ok(pb::EventType::Unspecified) | Err(_) => {
                return Err(Error::invalid(
                    "event_types",
                    Reason::InvalidField,
                    format!("{t} is not an event type"),
                ));
            }
            Ok(_) => {
                types.insert(t);
            }
        }
    }
    if req.after_cursor < 0 {
        return Err(Error::invalid(
            "after_cursor",
            Reason::InvalidField,
            "a cursor is 0 or the cursor of an event",
        ));
    }
    if req.from_now && req.after_cursor != 0 {
        return Err(Error::invalid(
            "after_cursor",
            Reason::InvalidField,
            "from_now starts after the newest event: after_cursor must be 0 with it",
        ));
    }
    Ok(Watch {
        device,
        types,
        after: req.after_cursor,
        from_now: req.from_now,
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// Reads events after `after` into `tx` until the client leaves or a read
/// fails (the error is the stream's last item).
async fn run(
    app: App,
    tenant: TenantId,
    w: Watch,
    mut after: i64,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    pages: Arc<Pages>,
) {
    let mut key_checked = Instant::now();
    loop {
        if *stopping.borrow() {
            let _ = tx.try_send(Err(shutting_down()));
            return;
        }
        if key_checked.elapsed() >= KEY_CHECK {
            key_checked = Instant::now();
            if let Err(e) = key_still_works(&app).await {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
        // Armed before reading, so a commit made while reading is not
        // missed.
        let changed = app.store.changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let armed = Instant::now();
        let (page, began) = match pages.get(&app, &tenant, after).await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let (events, actions) = (&page.events, &page.actions);
        if events.is_empty() && began < armed {
            // A read shared with a watch that began it before this one
            // listened for commits: one made in between would wake
            // nothing. Look again soon rather than wait for the next.
            tokio::select! {
                () = tx.closed() => return,
                Ok(()) = stopping.changed() => continue,
                () = tokio::time::sleep(READ_EVERY) => continue,
            }
        }
        if events.is_empty() {
            let read = Instant::now();
            tokio::select! {
                () = tx.closed() => return,
                Ok(()) = stopping.changed() => continue,
                () = &mut changed => {
                    // Commits come in bursts: one read per READ_EVERY
                    // takes in many, however many watchers wake.
                    tokio::time::sleep_until((read + READ_EVERY).into()).await;
                    continue;
                }
                () = tokio::time::sleep(POLL) => continue,
            }
        }
        if let Some(first) = events.first() {
            crate::metrics::watch_read(events.len(), first.at.0, app.clock.now().0);
        }
        for e in events {
            after = e.cursor;
            if w.device.as_ref().is_some_and(|d| d.as_str() != e.device_id) {
                continue;
            }
            let ev = to_proto(e, e.action_id.as_ref().and_then(|id| actions.get(id)));
            if !w.types.is_empty() && !w.types.contains(&ev.r#type) {
                continue;
            }
            // A client that stopped reading still lets the server stop.
            tokio::select! {
                sent = tx.send(Ok(ev)) => if sent.is_err() {
                    return;
                },
                _ = stopping.changed() => {
                    let _ = tx.try_send(Err(shutting_down()));
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl EventService for Events {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let app = self.app.for_call(&request)?;
        let w = parse(request.into_inner())?;
        let tenant = app.tenant();
        let horizon = app.store.event_horizon(&tenant).await?;
        let after = if w.from_now {
            // The newest event left may be older than the last forgotten.
            app.store.latest_event(&tenant).await?.max(horizon)
        } else {
            if w.after == 0 {
                // From the oldest retained.
                horizon
            } else if w.after < horizon {
                return Err(Error::CursorExpired {
                    after_cursor: w.after,
                    oldest_cursor: horizon,
                }
                .into());
            } else {
                // A cursor past the tenant's newest event was never sent
                // to it (a cursor is read after its event is committed):
                // a corrupt or foreign cursor is refused, not answered
                // with a silence that lasts until the stream catches up.
                if w.after > horizon {
                    let newest = app.store.latest_event(&tenant).await?;
                    if w.after > newest {
                        // Retention may have forgotten the newest event
                        // (the cursor) since the horizon was read: the
                        // horizon, read again, covers it (it only grows).
                        let horizon = app.store.event_horizon(&tenant).await?;
                        if w.after > horizon {
                            return Err(Error::invalid(
                                "after_cursor",
                                Reason::InvalidField,
                                format!(
                                    "{} is past the newest event ({}): not a cursor of this stream",
                                    w.after,
                                    newest.max(horizon)
                                ),
                            )
                            .into());
                        }
                    }
                }
                w.after
            }
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Err(super::status::transport_status(
                tonic::Code::Unavailable,
                pb::ErrorReason::ServerBusy,
                format!(
                    "this server runs {MAX_WATCHES} event watches at once already; retry shortly or watch through another replica"
                ),
                Some(crate::domain::Ts::SECOND),
            ));
        };
        let (tx, rx) = mpsc::channel(BUFFERED);
        let stream = Watching {
            rx,
            stopping: self.stopping.clone(),
            done: false,
        };
        let stopping = self.stopping.clone();
        let pages = self.pages.clone();
        crate::metrics::watch(1.0);
        tokio::spawn(async move {
            run(app, tenant, w, after, tx, stopping, pages).await;
            crate::metrics::watch(-1.0);
            drop(slot);
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
