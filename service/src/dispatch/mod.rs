//! The dispatcher: turns due work into driver calls and records the
//! outcome through the store.
//!
//! Invariants:
//! - An action is applied at its start (immediate ones at once) and a
//!   windowed one reverted at its end; both are claimed from the database
//!   with a lease, so the work survives restarts and a revert is never
//!   lost: it is retried with exponential backoff until confirmed, or
//!   recorded as FAILED / REVERT_FAILED.
//! - Retryable driver failures (rate limits, OEM outages) back off —
//!   by the OEM's retry-after when it gives one — instead of failing.
//! - Calls to an OEM account stay within the driver's rate budget (one
//!   token bucket per account, shared by every action on it, and by the
//!   observations the API makes on CreateDevice and UpdateDevice).
//! - After every apply and revert the device's state is recorded (as the
//!   driver read it back, or read again within the budget), so pushes are
//!   checked against what the device holds now.
//! - A driver that panics fails that attempt, like any persistent driver
//!   failure: an apply ends FAILED (DRIVER_FAULT) and, since what it wrote
//!   before panicking is unknown, is reverted at once (holding its channel
//!   until then); a revert is retried and may end REVERT_FAILED. The
//!   dispatcher itself keeps running.
//! - Time comes from the [`Clock`]; tests drive it and call [`Dispatcher::drain`].

mod budget;

use std::{
    collections::HashMap,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};
use tracing::Instrument as _;

use futures::FutureExt as _;
use switchyard_drivers::{
    Applied, ApplyRequest, DeviceState, Driver, MAX_MEMO_BYTES, Outcome, Registry, RevertRequest,
};
use tokio::sync::Notify;

use crate::{
    domain::{Clock, Device, Error, Observed, TenantId, Ts, Work, codes},
    store::{Finish, Job, Store},
};

pub use budget::Budgets;

/// Dispatcher tuning.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Longest sleep between looks at the database (the embedded default
    /// wakes at least once a second, and at once when a push is due before
    /// its next look: [`Wake`]).
    pub poll: Duration,
    /// Most actions claimed at once.
    pub batch: u32,
    /// Most jobs (driver calls) in flight at once.
    pub concurrency: usize,
    /// Most driver calls in flight at once to one OEM account.
    pub per_account: usize,
    /// How long a claim lasts before another dispatcher may take the work
    /// (a replica that died or stalled). Renewed every sixth of it while
    /// the round runs; a driver call is cut off after half of it.
    pub lease_nanos: i64,
    /// Tries of a retryable apply before it fails.
    pub max_apply_attempts: i64,
    /// Tries of a revert before it is REVERT_FAILED.
    pub max_revert_attempts: i64,
    /// First retry delay; doubles per try.
    pub backoff_base_nanos: i64,
    /// Longest retry delay.
    pub backoff_max_nanos: i64,
    /// How often each device's state is read.
    pub observe_every_nanos: i64,
    /// How far ahead of its due time work is claimed (prefetched, with
    /// its device), so that a burst due at one instant (a tariff
    /// boundary) starts on time instead of being claimed then. Work
    /// claimed ahead stays SCHEDULED, and cancellable, until it is due.
    /// 30 s: a burst of 100,000 took about 15 s to claim on PostgreSQL
    /// on a 2-core machine (docs/performance.md).
    pub horizon_nanos: i64,
    /// Most claimed jobs held at once, prefetched or running (bounds the
    /// memory a burst takes).
    pub max_held: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            batch: 2048,
            concurrency: 1024,
            per_account: 32,
            lease_nanos: 60 * Ts::SECOND,
            max_apply_attempts: 5,
            max_revert_attempts: 10,
            backoff_base_nanos: 2 * Ts::SECOND,
            backoff_max_nanos: 600 * Ts::SECOND,
            observe_every_nanos: 300 * Ts::SECOND,
            horizon_nanos: 30 * Ts::SECOND,
            max_held: 200_000,
        }
    }
}

/// Turns due actions into driver calls.
#[derive(Clone, Debug)]
pub struct Dispatcher {
    store: Store,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    budgets: Arc<Budgets>,
    wake: Arc<Wake>,
    config: DispatchConfig,
    /// Rounds of [`Dispatcher::run`] completed (shared by clones).
    rounds: Arc<std::sync::atomic::AtomicU64>,
    /// One job per device at a time in this process.
    devices: Arc<DeviceLocks>,
    /// The bounds on driver calls in flight.
    calls: Arc<Calls>,
    /// Starts due work of several claims at once.
    starter: Arc<Starter>,
    /// Set when [`Dispatcher::run`] is told to stop: no more jobs start.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

fn apply_request(
    a: &crate::store::Planned,
    clear_native: bool,
    live: Vec<Applied>,
    memo: Option<String>,
    fence: u64,
) -> ApplyRequest {
    ApplyRequest {
        action_id: a.id.to_string(),
        command: a.command,
        params: a.params,
        start: a.start.to_jiff(),
        end: a.end.map(Ts::to_jiff),
        clear_native_scheduler: clear_native,
        live,
        memo,
        fence,
    }
}

/// A driver's memo, if it fits [`MAX_MEMO_BYTES`] (a larger one is
/// dropped, logged: the revert then works from the request).
fn bounded_memo(memo: Option<String>, action: &crate::domain::ActionId) -> Option<String> {
    memo.filter(|m| {
        let fits = m.len() <= MAX_MEMO_BYTES;
        if !fits {
            tracing::warn!(action_id = %action, bytes = m.len(), "the driver's memo is too large to keep");
        }
        fits
    })
}

/// The memos of the job's device's actions whose writes may be in force
/// (`known`, or read now), split into the job's own and the others'.
async fn memos_of(
    store: &Store,
    job: &Job,
    known: Option<Vec<Applied>>,
) -> Result<(Option<String>, Vec<Applied>), Error> {
    let memos = match known {
        Some(m) => m,
        None => store.memos(&job.tenant, &job.action.device_id).await?,
    };
    let action = job.action.id.to_string();
    let (own, others): (Vec<Applied>, Vec<Applied>) =
        memos.into_iter().partition(|a| a.action_id == action);
    Ok((own.into_iter().next().map(|a| a.memo), others))
}

/// What a job came to, and what to observe once it is recorded.
struct Done {
    finish: Finish,
    observe: Option<Observe>,
}

impl Done {
    fn just(finish: Finish) -> Self {
        Self {
            finish,
            observe: None,
        }
    }
}

/// What a job runs with, read for its whole claim at once: its device as
/// claimed, and the memos on record when it was started (`None`: read
/// them now).
struct Context {
    device: Option<Arc<Device>>,
    /// The device's driver, built before the job's turn on its account.
    driver: Option<Result<Arc<dyn Driver>, String>>,
    memos: Option<Vec<Applied>>,
}

/// A device state to record after a round.
enum Observe {
    /// Read it through the device's driver (within the read budget), a
    /// driver built for the read: an outcome waiting to be recorded holds
    /// no driver (a storm's outcomes wait by the thousand).
    Read(TenantId, Arc<Device>),
    /// Already known (read back by the driver, or from its error), with
    /// the configuration it was seen under: the device itself is let go
    /// when its job ends (a `Read` keeps it until the read).
    Known(crate::store::Configured, Observed),
}

/// Most native rows kept of one observation (the largest OEM scheduler
/// known has 96 slots).
pub const MAX_OBSERVED_ROWS: usize = 96;

/// A driver's view of a device, as recorded. It comes from the OEM, so it
/// is bounded: at most [`MAX_OBSERVED_ROWS`] rows, the ones that matter
/// to a push first (enabled protected, then enabled foreign rows), and
/// short strings.
fn observed(s: DeviceState, at: Ts) -> Observed {
    use switchyard_drivers::RowOwner;
    let DeviceState {
        native_scheduler,
        soc_percent,
        mode,
    } = s;
    let (scheduler_active, mut rows) = native_scheduler.unwrap_or((false, vec![]));
    if rows.len() > MAX_OBSERVED_ROWS {
        rows.sort_by_key(|r| match (r.enabled, r.owner) {
            (true, RowOwner::Protected) => 0,
            (true, RowOwner::Foreign) => 1,
            (true, RowOwner::Ours) => 2,
            (false, _) => 3,
        });
        rows.truncate(MAX_OBSERVED_ROWS);
    }
    for r in &mut rows {
        r.start = crate::domain::cap(std::mem::take(&mut r.start), 16);
        r.end = crate::domain::cap(std::mem::take(&mut r.end), 16);
        r.mode = crate::domain::cap(std::mem::take(&mut r.mode), 64);
    }
    Observed {
        scheduler_active,
        rows,
        soc_percent: soc_percent.filter(|v| v.is_finite()),
        mode: mode.map(|m| crate::domain::cap(m, 64)),
        at,
    }
}

/// Most devices read in one observation pass.
pub const OBSERVE_BATCH: usize = 1024;

/// Most device reads in flight at once in an observation pass (each may
/// hold a database connection for its memos and its read budget).
const OBSERVE_CONCURRENCY: usize = 16;

/// Longest a device read may take.
const READ_LIMIT: Duration = Duration::from_secs(30);

/// Reads a device's state through `driver`, within the account's read
/// budget. `None` when the budget is spent or the device cannot be read.
pub async fn read_state(
    budgets: &Budgets,
    clock: &dyn Clock,
    driver: &dyn Driver,
    live: &[Applied],
) -> Option<Observed> {
    let now = clock.now();
    if budgets
        .take_read(&driver.account(), &driver.capabilities().rate_budget, now)
        .await
        .is_err()
    {
        return None;
    }
    // A read that hangs must not hold up what waits for it (a claim's
    // end, an observation pass).
    let read = AssertUnwindSafe(driver.read_state(live)).catch_unwind();
    match tokio::time::timeout(READ_LIMIT, read).await {
        Ok(Ok(Ok(s))) => Some(observed(s, clock.now())),
        Ok(Ok(Err(e))) => {
            tracing::debug!(account = %driver.account(), error = %e, "could not read device state");
            None
        }
        Ok(Err(_)) => {
            tracing::error!(account = %driver.account(), "the driver panicked reading a device");
            None
        }
        Err(_) => {
            tracing::warn!(account = %driver.account(), "a device read did not answer within {} s", READ_LIMIT.as_secs());
            None
        }
    }
}

/// [`read_state`], then recorded on `device` (if its configuration is
/// still the one read).
pub async fn observe_now(
    store: &Store,
    budgets: &Budgets,
    clock: &dyn Clock,
    tenant: &TenantId,
    device: &Device,
    driver: &dyn Driver,
) -> Option<Observed> {
    let live = match store.memos(tenant, &device.id).await {
        Ok(live) => live,
        Err(e) => {
            tracing::warn!(device_id = %device.id, error = %e, "could not read the device's memos");
            return None;
        }
    };
    let o = read_state(budgets, clock, driver, &live).await?;
    match store.observe(tenant, device, &o).await {
        Ok(true) => Some(o),
        Ok(false) => None,
        Err(e) => {
            tracing::warn!(device_id = %device.id, error = %e, "could not record observed state");
            None
        }
    }
}

impl Dispatcher {
    /// A dispatcher over `store`; `wake` is notified by the API when work
    /// falls due at once.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        clock: Arc<dyn Clock>,
        budgets: Arc<Budgets>,
        wake: Arc<Wake>,
        config: DispatchConfig,
    ) -> Self {
        Self {
            store,
            registry,
            budgets,
            clock,
            wake,
            rounds: Arc::default(),
            devices: Arc::default(),
            calls: Arc::new(Calls::new(config.concurrency, config.per_account)),
            stopping: Arc::default(),
            starter: Arc::default(),
            config,
        }
    }

    /// How many rounds [`Dispatcher::run`] has completed: each claims due
    /// work, runs it, and then sleeps until work is due or a push wakes
    /// it.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(std::sync::atomic::Ordering::Acquire)
    }

    fn backoff(&self, attempts: i64) -> i64 {
        let shift = attempts.clamp(0, 30) as u32;
        self.config
            .backoff_base_nanos
            .saturating_mul(1i64 << shift)
            .min(self.config.backoff_max_nanos)
    }

    fn driver(&self, d: &Device) -> Result<Arc<dyn Driver>, String> {
        let factory = self
            .registry
            .get(&d.driver)
            .ok_or_else(|| format!("no driver {:?} in this build", d.driver))?;
        factory.build(&d.spec()).map_err(|e| e.to_string())
    }

    /// Claims the work due now and runs it; returns how many jobs ran.
    pub async fn run_due(&self) -> Result<usize, Error> {
        let now = self.clock.now();
        let claim = self
            .store
            .claim_ahead(now, now, self.config.batch, self.config.lease_nanos)
            .await?;
        self.run_claim(claim).await
    }

    /// Runs a claim's jobs as they fall due, each device's one at a time,
    /// and records their outcomes as they come (in groups, with the device
    /// states seen); returns how many jobs were started.
    ///
    /// The heartbeat: while the claim is held (jobs waiting for their
    /// time or queued behind the concurrency bound included), its lease is
    /// renewed, so no other replica takes the work up; if this process
    /// stops, the renewals stop and the lease runs out. A job that would
    /// start with less than half a lease known to be held (the renewals
    /// failed) is not started, for another dispatcher may take the work up
    /// meanwhile.
    async fn run_claim(&self, claim: crate::store::Claim) -> Result<usize, Error> {
        // Every row of the claim: a renewal checks that some is still
        // held under it (recorded ones are not).
        let all = claim.due();
        let crate::store::Claim {
            owner,
            jobs,
            devices,
        } = claim;
        if jobs.is_empty() {
            return Ok(0);
        }
        let lease = self.config.lease_nanos;
        let now = self.clock.now();
        let held_until = Arc::new(std::sync::atomic::AtomicI64::new(now.0 + lease));
        let heartbeat = {
            let (store, clock, claim) = (self.store.clone(), self.clock.clone(), all);
            let held_until = held_until.clone();
            let every = heartbeat_every(lease);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let until = clock.now().plus_nanos(lease);
                    match store.renew(&claim, until).await {
                        // Nothing renewed: every job is recorded or let
                        // go, or the claim lapsed (some of its work may be
                        // another claim's by now); not held either way,
                        // so no job of it starts any more.
                        Ok(false) => {
                            held_until.store(i64::MIN, std::sync::atomic::Ordering::Release)
                        }
                        Ok(true) => held_until.store(until.0, std::sync::atomic::Ordering::Release),
                        Err(e) => tracing::warn!(error = %e, "could not renew the dispatch lease"),
                    }
                }
            })
        };
        let _stop_heartbeat = AbortOnDrop(Some(heartbeat));
        // Each claimed device with the number of its jobs still to
        // start: its snapshot goes with the last of them.
        let mut devices: HashMap<DeviceKey, (Arc<Device>, usize)> = devices
            .into_iter()
            .map(|(k, d)| (k, (Arc::new(d), 0)))
            .collect();
        for j in &jobs {
            let key = (
                j.tenant.as_str().to_owned(),
                j.action.device_id.as_str().to_owned(),
            );
            if let Some((_, n)) = devices.get_mut(&key) {
                *n += 1;
            }
        }
        // Outcomes go to the recorder as they come; it records whatever
        // has gathered while it was recording the last group, and what
        // comes shortly after while jobs still run ([`gather`]).
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel::<Ran>();
        // Jobs of this claim running (holding their device) and not yet
        // ended: the recorder waits a little for their outcomes rather
        // than record one at a time.
        let running = Arc::new(Runs::default());
        let recorder = tokio::spawn(self.clone().recorder(done_rx, running.clone()));
        // Each job boxed: a job moves from here to its task, then to the
        // recorder, and a burst holds 100,000 of them at once. The claim's
        // vector (sized by the stored rows it was decoded from) is let go:
        // extended into a new queue, not collected, which would keep its
        // buffer for the pointers.
        let mut pending = std::collections::VecDeque::with_capacity(jobs.len());
        pending.extend(jobs.into_iter().map(Box::new));
        let mut started = 0;
        let mut unstarted = Vec::new();
        while let Some(first) = pending.front() {
            let now = self.clock.now();
            if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
                unstarted.extend(pending.drain(..).map(|j| j.action.id.to_string()));
                break;
            }
            if first.due > now {
                let wait = Duration::from_nanos(u64::try_from(first.due.0 - now.0).unwrap_or(0));
                tokio::time::sleep(wait.min(Duration::from_millis(250))).await;
                continue;
            }
            let seen = Instant::now();
            // What of the claim is due, by id (see `Due`).
            let due = crate::store::Due {
                claim: owner.clone(),
                action_ids: pending
                    .iter()
                    .take_while(|j| j.due <= now)
                    .map(|j| j.action.id.to_string())
                    .collect(),
            };
            let ready = match self.start(due).await {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(error = %e, "could not start due work; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            tracing::debug!(
                claim = %owner,
                ready = ready.ready.len(),
                late_ms = self.clock.now().0.saturating_sub(first.due.0) / 1_000_000,
                took_ms = seen.elapsed().as_millis() as u64,
                "started due work"
            );
            let (ready, memos) = (&ready.ready, &ready.memos);
            let mut skipped = Vec::new();
            while pending.front().is_some_and(|j| j.due <= now) {
                let Some(job) = pending.pop_front() else {
                    break;
                };
                // Cancelled or replaced before it started, or given up to
                // a device change: nothing to do; let go of it (below) if
                // it is still held.
                if ready.get(&job.action.id.to_string()).map(String::as_str) != Some(&*job.claim) {
                    skipped.push(job.action.id.to_string());
                    continue;
                }
                let key = (
                    job.tenant.as_str().to_owned(),
                    job.action.device_id.as_str().to_owned(),
                );
                // The device's snapshot goes with its last job of the
                // claim (memory is freed as jobs end).
                let device = match devices.get_mut(&key) {
                    Some((d, n)) if *n > 1 => {
                        *n -= 1;
                        Some(d.clone())
                    }
                    _ => devices.remove(&key).map(|(d, _)| d),
                };
                let ctx = Context {
                    device,
                    driver: None,
                    memos: Some(memos.get(&key).cloned().unwrap_or_default()),
                };
                // A job is spawned once it has a slot: a burst waits as
                // claimed jobs, not as tasks.
                let Ok(spawned) = self.calls.spawned.clone().acquire_owned().await else {
                    break;
                };
                started += 1;
                let this = self.clone();
                let (held_until, done_tx) = (held_until.clone(), done_tx.clone());
                let running = running.clone();
                tokio::spawn(async move {
                    let _spawned = spawned;
                    let (guard, mut ctx) = this.devices.lock(key, seen, ctx).await;
                    // Counted once it holds its device: a job waiting for
                    // its device's last outcome to be recorded is not
                    // waited for by the recorder holding that outcome.
                    // Dropped at the end, after the outcome is sent.
                    let _running = Running::new(&running);
                    // The device and its driver, then the job's turn on
                    // the OEM account and a call slot: waiting for them
                    // does not count against the call's time limit.
                    let device = match ctx.device.take() {
                        Some(d) => d,
                        // Boxed, as every database call here: a spawned
                        // job waiting its turn holds only what it needs.
                        None => match Box::pin(
                            this.store.device_for(&job.tenant, &job.action.device_id),
                        )
                        .await
                        {
                            Ok(Some(d)) => Arc::new(d),
                            Ok(None) => {
                                tracing::warn!(action_id = %job.action.id, "the action's device is gone");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(action_id = %job.action.id, error = %e, "dispatch failed; will retry");
                                return;
                            }
                        },
                    };
                    let driver = this.driver(&device);
                    let _account = match &driver {
                        Ok(d) => this.calls.account(&d.account()).await,
                        Err(_) => None,
                    };
                    let Ok(_call) = this.calls.all.clone().acquire_owned().await else {
                        return;
                    };
                    ctx.device = Some(device);
                    ctx.driver = Some(driver);
                    let left =
                        held_until.load(std::sync::atomic::Ordering::Acquire) - this.clock.now().0;
                    if left < this.config.lease_nanos / 2 {
                        tracing::warn!(action_id = %job.action.id, "the claim's lease could not be renewed; the work is left to the next claim");
                        return;
                    }
                    // Boxed: a job waiting its turn takes little memory.
                    if let Some((done, at)) = Box::pin(this.run_one(&job, ctx)).await {
                        // The job (its planned action) is let go here:
                        // what waits to be recorded keeps only what the
                        // record needs.
                        let _ = done_tx.send(Ran {
                            job: crate::store::Recorded::from(*job),
                            done,
                            at,
                            guard,
                        });
                    }
                });
            }
            // Let go of what is not ready at once: held, it would wait for
            // the lease to run out before another claim could take it.
            if !skipped.is_empty()
                && let Err(e) = self.store.release(&owner, &skipped).await
            {
                tracing::warn!(error = %e, "could not let go of work that was not ready; it waits for its lease");
            }
        }
        drop(done_tx);
        if !unstarted.is_empty()
            && let Err(e) = self.store.release(&owner, &unstarted).await
        {
            tracing::warn!(error = %e, "could not let go of unstarted work; it waits for its lease");
        }
        match recorder.await {
            Ok(r) => r?,
            Err(e) => return Err(Error::Internal(format!("the recorder failed: {e}"))),
        }
        Ok(started)
    }

    /// Starts the due work of `claim` ([`Store::start_claims`], then
    /// [`Store::started`]) together with
    /// that of every other claim of this dispatcher that falls due
    /// meanwhile: claims queue while a start is written and go together
    /// in the next one. A claim returns as soon as its start is read
    /// back, whichever claim's turn wrote it; the turn passes on once the
    /// start is committed, so the next start is written while this one
    /// is read back.
    async fn start(&self, claim: crate::store::Due) -> Result<Arc<crate::store::Started>, Error> {
        let (store, clock) = (&self.store, &self.clock);
        self.starter
            .start(
                claim,
                |claims| async move {
                    let now = clock.now();
                    store
                        .start_claims(&claims, now)
                        .await
                        .map(|()| (claims, now))
                },
                |(claims, now)| async move { store.started(&claims, now).await },
            )
            .await
    }

    /// Runs one job within half a lease (a job that runs longer would be
    /// taken up again by another dispatcher while still running); what
    /// came of it, and when (`None`: nothing to record, the claim runs
    /// out and the work is tried again).
    async fn run_one(&self, job: &Job, ctx: Context) -> Option<(Done, Ts)> {
        let limit = Duration::from_nanos(
            u64::try_from(self.config.lease_nanos / 2)
                .unwrap_or(0)
                .max(1_000_000_000),
        );
        let run = AssertUnwindSafe(self.process(job, ctx)).catch_unwind();
        let done = match tokio::time::timeout(limit, run).await {
            Ok(Ok(Ok(done))) => done,
            // The claim expires and the work is tried again.
            Ok(Ok(Err(e))) => {
                tracing::warn!(action_id = %job.action.id, error = %e, "dispatch failed; will retry");
                return None;
            }
            Ok(Err(_)) => self.panicked(job),
            Err(_) => self.timed_out(job, limit),
        };
        Some((done, self.clock.now()))
    }

    /// Records what jobs came to, in groups: whatever has come in while
    /// the last group was being recorded, and what comes within
    /// [`RECORD_LINGER`] while jobs of the claim still run ([`gather`]).
    /// A device's next job waits until its last one is recorded (its guard
    /// is let go then; such a job is not counted as running).
    async fn recorder(
        self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Ran>,
        running: Arc<Runs>,
    ) -> Result<(), Error> {
        let mut failed = None;
        let mut readers = tokio::task::JoinSet::new();
        while let Some(first) = rx.recv().await {
            // Outcomes wait while the starts queued before them are
            // written (the writer is the storm's bottleneck); what comes
            // in meanwhile goes in the same record. Gathered before the
            // wait, a burst's first outcome was recorded alone, one write
            // transaction per claim for a single row.
            self.starter.quiet().await;
            let batch = gather(&mut rx, first, &running, RECORD_LINGER, RECORD_BATCH).await;
            // Every outcome of the batch came in before this: the starts
            // queued meanwhile are written first, as for the first.
            self.starter.quiet().await;
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut reads = Vec::new();
            let mut guards = Vec::with_capacity(batch.len());
            for Ran {
                job,
                done,
                at,
                guard,
            } in batch
            {
                let observed = match done.observe {
                    Some(Observe::Known(device, o)) => Some((device, o)),
                    Some(Observe::Read(tenant, device)) => {
                        reads.push((tenant, device));
                        None
                    }
                    None => None,
                };
                outcomes.push(crate::store::Outcome {
                    job,
                    finish: done.finish,
                    at,
                    observed,
                });
                guards.push(guard);
            }
            // Recorded while the heartbeat still holds the claim: a
            // database that failed for a moment gets a few more tries
            // before the work is left to be done again.
            let mut tries = 0;
            let took = Instant::now();
            let recorded = loop {
                match self.store.record(&mut outcomes).await {
                    Ok(()) => break Ok(()),
                    Err(Error::StorageUnavailable(e)) if tries < 3 => {
                        tries += 1;
                        tracing::warn!(error = %e, tries, "could not record dispatch outcomes; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            let keys: Vec<_> = outcomes
                .iter()
                .map(|o| {
                    (
                        o.job.tenant.as_str().to_owned(),
                        o.job.device_id.as_str().to_owned(),
                    )
                })
                .collect();
            tracing::debug!(
                outcomes = outcomes.len(),
                took_ms = took.elapsed().as_millis() as u64,
                "recorded dispatch outcomes"
            );
            self.devices.recorded(keys);
            drop(guards);
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "dispatch outcomes not recorded; the work is taken up again when its claim runs out");
                failed = Some(e);
                continue;
            }
            // States read after the outcome is on record, off the way of
            // the next group (the claim ends when they are done).
            if !reads.is_empty() {
                let this = self.clone();
                readers.spawn(async move {
                    for (tenant, device) in reads {
                        // A driver that panics while being built costs
                        // this device's read, not the others'.
                        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            this.driver(&device)
                        }))
                        .unwrap_or_else(|_| Err("the driver panicked while being built".into()));
                        match built {
                            Ok(driver) => {
                                this.record_observed(&tenant, &device, driver.as_ref())
                                    .await;
                            }
                            Err(e) => {
                                tracing::warn!(device_id = %device.id, error = %e, "could not read the device's state");
                            }
                        }
                    }
                });
            }
        }
        while let Some(read) = readers.join_next().await {
            if let Err(e) = read {
                tracing::warn!(error = %e, "reading devices' states after a round stopped");
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Runs work until nothing is due at the clock's now (tests).
    pub async fn drain(&self) -> Result<usize, Error> {
        let mut total = 0;
        loop {
            let n = self.run_due().await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    async fn process(&self, job: &Job, ctx: Context) -> Result<Done, Error> {
        match job.work {
            Work::Apply => self.apply(job, ctx).await,
            Work::Revert => self.revert(job, ctx).await,
        }
    }

    async fn record_observed(&self, tenant: &TenantId, d: &Device, driver: &dyn Driver) {
        observe_now(
            &self.store,
            &self.budgets,
            self.clock.as_ref(),
            tenant,
            d,
            driver,
        )
        .await;
    }

    /// What a write the OEM accepted comes to: applied or reverted, and
    /// the device's state recorded (as read back, or read again).
    fn written(&self, job: &Job, device: &Arc<Device>, out: Outcome, work: Work) -> Done {
        let Outcome {
            verified,
            raw,
            state,
            memo,
        } = out;
        let memo = bounded_memo(memo, &job.action.id);
        let observe = match state {
            Some(s) => Observe::Known(device.as_ref().into(), observed(s, self.clock.now())),
            None => Observe::Read(job.tenant.clone(), device.clone()),
        };
        let finish = match work {
            Work::Apply => Finish::Applied {
                raw,
                verified,
                memo,
            },
            Work::Revert => Finish::Reverted { raw, verified },
        };
        Done {
            finish,
            observe: Some(observe),
        }
    }

    /// What a job whose driver panicked comes to: a failed attempt. An
    /// apply fails for good (the driver is broken, retrying will not mend
    /// it); a revert is retried, as any failed revert, until it is
    /// REVERT_FAILED.
    fn panicked(&self, job: &Job) -> Done {
        tracing::error!(action_id = %job.action.id, work = job.work.as_str(), "the driver panicked; the attempt counts as failed");
        let message =
            "the driver failed unexpectedly (it panicked); the server log has the details";
        Done::just(match job.work {
            // It may have written part of the command before it
            // panicked: undo whatever it did.
            Work::Apply => Finish::Failed {
                code: codes::DRIVER_FAULT.to_owned(),
                message: message.to_owned(),
                raw: None,
                revert: true,
                memo: None,
            },
            Work::Revert => {
                self.revert_retry_or_fail(job, self.clock.now(), message.to_owned(), None, 0)
            }
        })
    }

    /// What a job whose driver did not answer within `limit` comes to: a
    /// failed try, retried like an OEM outage.
    fn timed_out(&self, job: &Job, limit: Duration) -> Done {
        let message = format!("the driver did not answer within {} s", limit.as_secs());
        tracing::warn!(action_id = %job.action.id, work = job.work.as_str(), "{message}");
        let now = self.clock.now();
        Done::just(match job.work {
            Work::Apply if job.attempts + 1 < self.config.max_apply_attempts => Finish::Retry {
                due: now.plus_nanos(self.backoff(job.attempts)),
                message,
                raw: None,
                memo: None,
            },
            // Cut short, it may have written part of the command: undo
            // whatever it did, as after a panic.
            Work::Apply => Finish::Failed {
                code: "OEM_UNAVAILABLE".to_owned(),
                message,
                raw: None,
                revert: true,
                memo: None,
            },
            Work::Revert => self.revert_retry_or_fail(job, now, message, None, 0),
        })
    }

    /// A failed revert: tried again later, or REVERT_FAILED once the tries
    /// are spent.
    fn revert_retry_or_fail(
        &self,
        job: &Job,
        now: Ts,
        message: String,
        raw: Option<String>,
        retry_after: i64,
    ) -> Finish {
        if job.attempts + 1 >= self.config.max_revert_attempts {
            tracing::error!(action_id = %job.action.id, error = %message, "revert failed for good: the override may still be in force");
            Finish::Failed {
                code: codes::REVERT_FAILED.to_owned(),
                message: format!(
                    "the revert kept failing after {} tries: {message}",
                    job.attempts + 1
                ),
                raw,
                revert: false,
                memo: None,
            }
        } else {
            Finish::Retry {
                due: now.plus_nanos(self.backoff(job.attempts).max(retry_after)),
                message,
                raw,
                memo: None,
            }
        }
    }

    /// The device and driver `job` runs on, with a token of the OEM
    /// account's rate budget taken; or what to record instead: the driver
    /// cannot be built (`misconfigured`), or the budget is spent (the work
    /// is postponed until a token is free).
    async fn prepare(
        &self,
        job: &Job,
        device: Option<Arc<Device>>,
        driver: Option<Result<Arc<dyn Driver>, String>>,
        now: Ts,
        misconfigured: impl FnOnce(String) -> Finish,
    ) -> Result<Result<(Arc<Device>, Arc<dyn Driver>), Finish>, Error> {
        let device = match device {
            Some(d) => Some(d),
            None => self
                .store
                .device_for(&job.tenant, &job.action.device_id)
                .await?
                .map(Arc::new),
        };
        let Some(device) = device else {
            return Err(Error::Internal(format!(
                "device of action {} is gone",
                job.action.id
            )));
        };
        let driver = match driver.unwrap_or_else(|| self.driver(&device)) {
            Ok(d) => d,
            Err(why) => return Ok(Err(misconfigured(why))),
        };
        if let Err(at) = self
            .budgets
            .take(
                &driver.account(),
                device.id.as_str(),
                &driver.capabilities().rate_budget,
                now,
            )
            .await
        {
            return Ok(Err(Finish::Postpone { due: at }));
        }
        Ok(Ok((device, driver)))
    }

    async fn apply(&self, job: &Job, ctx: Context) -> Result<Done, Error> {
        let action = &job.action;
        let now = self.clock.now();
        let fail = |code: &str, message: String, raw: Option<String>| Finish::Failed {
            code: code.to_owned(),
            message,
            raw,
            revert: false,
            memo: None,
        };
        if action.end.is_some_and(|end| end <= now) {
            crate::metrics::dispatch_missed();
            return Ok(Done::just(fail(
                codes::WINDOW_MISSED,
                "the window ended before the action could be applied".into(),
                None,
            )));
        }
        let (device, driver) = match self
            .prepare(job, ctx.device, ctx.driver, now, |why| {
                fail(codes::DEVICE_MISCONFIGURED, why, None)
            })
            .await?
        {
            Ok(ready) => ready,
            Err(instead) => return Ok(Done::just(instead)),
        };
        let (own, live) = memos_of(&self.store, job, ctx.memos).await?;
        let req = apply_request(action, job.clear_native, live, own, job.fence);
        crate::metrics::dispatch_lateness(action.start.0, self.clock.now().0);
        let began = std::time::Instant::now();
        let applied = driver
            .apply(&req)
            .instrument(driver_span(
                "driver.apply",
                &job.tenant,
                &device,
                &action.id.to_string(),
            ))
            .await;
        crate::metrics::driver_call(&device.driver, "apply", began.elapsed(), applied.is_ok());
        Ok(match applied {
            Ok(out) => self.written(job, &device, out, Work::Apply),
            Err(e) if e.retryable() && job.attempts + 1 < self.config.max_apply_attempts => {
                let wait = self
                    .backoff(job.attempts)
                    .max(e.retry_after.map_or(0, |d| d.as_nanos() as i64));
                Done::just(Finish::Retry {
                    due: self.clock.now().plus_nanos(wait),
                    message: e.message.clone(),
                    raw: e.raw.clone(),
                    // A write that may have landed is kept on record.
                    memo: bounded_memo(e.memo.clone(), &action.id),
                })
            }
            Err(e) => {
                tracing::info!(action_id = %action.id, code = e.code(), error = %e, "action failed at dispatch");
                let observe =
                    (e.kind == switchyard_drivers::ErrorKind::SchedulerActive).then(|| {
                        // Later pushes are refused up front until it is cleared.
                        // Bounded like every observation.
                        Observe::Known(
                            device.as_ref().into(),
                            observed(
                                DeviceState {
                                    native_scheduler: Some((true, e.rows.clone())),
                                    soc_percent: device
                                        .observed
                                        .as_ref()
                                        .and_then(|o| o.soc_percent),
                                    mode: device.observed.as_ref().and_then(|o| o.mode.clone()),
                                },
                                self.clock.now(),
                            ),
                        )
                    });
                // A failure after a write that may have landed owes a revert:
                // the driver's memo says what to undo.
                let finish = match bounded_memo(e.memo.clone(), &action.id) {
                    Some(memo) => Finish::Failed {
                        code: e.code().to_owned(),
                        message: e.message.clone(),
                        raw: e.raw.clone(),
                        revert: true,
                        memo: Some(memo),
                    },
                    None => fail(e.code(), e.message.clone(), e.raw.clone()),
                };
                Done { finish, observe }
            }
        })
    }

    async fn revert(&self, job: &Job, ctx: Context) -> Result<Done, Error> {
        let now = self.clock.now();
        let action = &job.action;
        let (device, driver) = match self
            .prepare(job, ctx.device, ctx.driver, now, |why| {
                self.revert_retry_or_fail(job, now, why, None, 0)
            })
            .await?
        {
            Ok(ready) => ready,
            Err(instead) => return Ok(Done::just(instead)),
        };
        let (memo, live) = memos_of(&self.store, job, ctx.memos).await?;
        let req = RevertRequest {
            applied: apply_request(action, job.clear_native, live, memo.clone(), job.fence),
            memo,
        };
        let began = std::time::Instant::now();
        let reverted = driver
            .revert(&req)
            .instrument(driver_span(
                "driver.revert",
                &job.tenant,
                &device,
                &job.action.id.to_string(),
            ))
            .await;
        crate::metrics::driver_call(&device.driver, "revert", began.elapsed(), reverted.is_ok());
        Ok(match reverted {
            Ok(out) => self.written(job, &device, out, Work::Revert),
            Err(e) => Done::just(self.revert_retry_or_fail(
                job,
                now,
                e.to_string(),
                e.raw.clone(),
                e.retry_after.map_or(0, |d| d.as_nanos() as i64),
            )),
        })
    }

    /// Reads the state of devices not observed for a while (all of them
    /// with `force`), at most [`OBSERVE_BATCH`] of them, the oldest
    /// first, [`OBSERVE_CONCURRENCY`] at once, each within its account's
    /// read budget, and records what was read in one transaction (an
    /// observation never replaces a later one); returns how many were due
    /// and how many were recorded.
    pub async fn observe_due(&self, force: bool) -> Result<(usize, usize), Error> {
        self.observe_due_within(force, Duration::MAX).await
    }

    /// [`Dispatcher::observe_due`], the reads cut off after `limit`
    /// (what was read by then is recorded).
    async fn observe_due_within(
        &self,
        force: bool,
        limit: Duration,
    ) -> Result<(usize, usize), Error> {
        use futures::StreamExt as _;
        let now = self.clock.now();
        let before = if force {
            now.plus_nanos(1)
        } else {
            now.plus_nanos(-self.config.observe_every_nanos)
        };
        let devices = self
            .store
            .devices_to_observe(before, OBSERVE_BATCH as u32)
            .await?;
        let n = devices.len();
        let seen: Vec<(TenantId, Device, Observed)> = futures::stream::iter(devices)
            .map(|(tenant, d)| async move {
                let driver = self.driver(&d).ok()?;
                let live = match self.store.memos(&tenant, &d.id).await {
                    Ok(live) => live,
                    Err(e) => {
                        tracing::warn!(device_id = %d.id, error = %e, "could not read the device's memos");
                        return None;
                    }
                };
                let o = read_state(&self.budgets, self.clock.as_ref(), driver.as_ref(), &live)
                    .await?;
                Some((tenant, d, o))
            })
            .buffer_unordered(OBSERVE_CONCURRENCY)
            .filter_map(std::future::ready)
            .take_until(tokio::time::sleep(limit.min(Duration::from_secs(3600))))
            .collect()
            .await;
        let recorded = self.store.observe_many(&seen).await?;
        Ok((n, usize::try_from(recorded).unwrap_or(usize::MAX)))
    }

    /// Observation passes until no device is due, or until a pass records
    /// nothing (the devices left cannot be read now: budgets spent,
    /// offline), within `limit`.
    async fn observe_all_due(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                return;
            }
            match self.observe_due_within(false, left).await {
                Ok((due, recorded)) if due == OBSERVE_BATCH && recorded > 0 => {}
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "observing devices failed");
                    return;
                }
            }
        }
    }

    /// Runs until `shutdown` resolves: claims work as it comes within
    /// [`DispatchConfig::horizon_nanos`] of falling due (looking at most
    /// `poll` apart, at once when notified), and runs each claim beside the
    /// others. When told to stop, no more work starts: what was claimed
    /// and not started is let go, what runs is recorded.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Observation passes run beside the rounds, not between them: a
        // slow OEM read (or an account's paced queries) never holds up
        // work that falls due. Gone with this loop.
        let observer = self.clone();
        let _observer = AbortOnDrop(Some(tokio::spawn(async move {
            let mut last_observe = Ts(i64::MIN);
            loop {
                let now = observer.clock.now();
                if now.0.saturating_sub(last_observe.0) >= 10 * Ts::SECOND {
                    last_observe = now;
                    observer.observe_all_due(Duration::from_secs(10)).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })));
        let batch = self.config.batch.max(1);
        let held = Arc::new(tokio::sync::Semaphore::new(
            self.config.max_held.max(batch as usize),
        ));
        let mut claims = tokio::task::JoinSet::new();
        loop {
            while let Some(r) = claims.try_join_next() {
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "dispatch round failed");
                }
            }
            let mut full = false;
            // Room for a claim: a burst larger than max_held is claimed as
            // the earlier work is done.
            let room = tokio::select! {
                () = &mut shutdown => break,
                room = held.clone().acquire_many_owned(batch) => room,
            };
            let Ok(mut room) = room else { break };
            let now = self.clock.now();
            let until = now.plus_nanos(self.config.horizon_nanos.max(0));
            match self
                .store
                .claim_ahead(now, until, batch, self.config.lease_nanos)
                .await
            {
                Ok(claim) if !claim.jobs.is_empty() => {
                    let n = claim.jobs.len();
                    tracing::debug!(claim = %claim.owner, jobs = n, took_ms = (self.clock.now().0 - now.0) / 1_000_000, "claimed work");
                    full = n >= batch as usize;
                    let keep = room.split(n);
                    drop(room);
                    let this = self.clone();
                    claims.spawn(async move {
                        let _held = keep;
                        this.run_claim(claim).await
                    });
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not claim due work"),
            }
            self.rounds
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            if full {
                continue;
            }
            // The next look: when the next work not claimed comes within
            // the horizon (claimed work counts from when its lease runs
            // out, so a dispatcher never spins on work another one holds).
            let next = self.store.next_due().await.ok().flatten();
            let now = self.clock.now();
            let wait = match next {
                Some(due) => {
                    let ahead = due
                        .0
                        .saturating_sub(self.config.horizon_nanos.max(0))
                        .saturating_sub(now.0);
                    Duration::from_nanos(u64::try_from(ahead).unwrap_or(0))
                        .max(Duration::from_millis(20))
                        .min(self.config.poll)
                }
                None => self.config.poll,
            };
            self.wake.planned(
                now.plus_nanos(i64::try_from(wait.as_nanos()).unwrap_or(i64::MAX))
                    .plus_nanos(self.config.horizon_nanos.max(0)),
            );
            tokio::select! {
                () = &mut shutdown => break,
                () = self.wake.notify.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        // No more work starts; what runs is recorded.
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        while let Some(r) = claims.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "dispatch round failed");
            }
        }
    }
}

/// One job of a device at a time in this process, from its start until
/// its outcome is recorded (its memos, the writes in force on the device,
/// change with that record); and when each device's last job was
/// recorded, so a job whose memos were read before that reads them again.
#[derive(Debug, Default)]
struct DeviceLocks {
    held: std::sync::Mutex<HashMap<DeviceKey, Arc<tokio::sync::Mutex<()>>>>,
    recorded: std::sync::Mutex<HashMap<DeviceKey, Instant>>,
}

type DeviceKey = (String, String);

/// How long a device's last record is remembered; memos read longer ago
/// than half of it are read again in any case.
const RECORDED_MEMORY: Duration = Duration::from_secs(120);

impl DeviceLocks {
    /// Waits for `key`'s turn; `ctx`'s memos (read at `seen`) are dropped,
    /// to be read again, if a job of the device was recorded since.
    async fn lock(
        self: &Arc<Self>,
        key: DeviceKey,
        seen: Instant,
        mut ctx: Context,
    ) -> (DeviceGuard, Context) {
        let m = shared(&self.held, &key, Arc::default);
        let guard = m.lock_owned().await;
        let stale = seen.elapsed() > RECORDED_MEMORY / 2
            || self
                .recorded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&key)
                .is_some_and(|at| *at >= seen);
        if stale {
            ctx.memos = None;
        }
        (
            DeviceGuard {
                locks: self.clone(),
                key,
                guard: Some(guard),
            },
            ctx,
        )
    }

    /// Jobs of these devices were recorded just now.
    fn recorded(&self, keys: Vec<DeviceKey>) {
        let now = Instant::now();
        let mut recorded = self
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recorded.len() > 100_000 {
            recorded.retain(|_, at| now.duration_since(*at) < RECORDED_MEMORY);
        }
        for k in keys {
            recorded.insert(k, now);
        }
    }
}

/// Most claims started in one transaction: a burst's first jobs run
/// while the rest is being started. A 100,000 storm (49 claims) with 12,
/// 6 and 3 in alternating runs: p50 0.84–0.87, 0.62–0.70 and 0.53–0.59 s,
/// p99 about the same (1.03–1.16 s): smaller starts let jobs begin
/// sooner, and the last job ends when the two cores have done it all.
/// The SQLite writer's page cache (8 MiB, `Store::open_with`) is sized
/// for starts this small: raising it means measuring that cache again.
const START_BATCH: usize = 3;

/// Claims waiting for their due work to be started, and the turn to start
/// it ([`Dispatcher::start`]).
type StartResult = Result<Arc<crate::store::Started>, String>;

#[derive(Debug)]
struct Starter<C = crate::store::Due> {
    /// Claims waiting for a start: (ticket, claim, where to answer).
    queue: std::sync::Mutex<Vec<(u64, C, tokio::sync::oneshot::Sender<StartResult>)>>,
    running: tokio::sync::Mutex<()>,
    /// Claims queued for a start, ever.
    queued: std::sync::atomic::AtomicU64,
    /// Claims whose start was written and read back (or failed), ever.
    written: std::sync::atomic::AtomicU64,
    /// Told whenever `written` grows.
    wrote: Notify,
}

impl<C> Default for Starter<C> {
    fn default() -> Self {
        Self {
            queue: std::sync::Mutex::default(),
            running: tokio::sync::Mutex::default(),
            queued: std::sync::atomic::AtomicU64::default(),
            written: std::sync::atomic::AtomicU64::default(),
            wrote: Notify::default(),
        }
    }
}

impl<C: Clone> Starter<C> {
    /// [`Dispatcher::start`], with the start's `write` (its turn held)
    /// and its `read` (the turn passed on) given.
    async fn start<T, W, WF, R, RF>(
        &self,
        claim: C,
        write: W,
        read: R,
    ) -> Result<Arc<crate::store::Started>, Error>
    where
        W: Fn(Vec<C>) -> WF,
        WF: Future<Output = Result<T, Error>>,
        R: Fn(T) -> RF,
        RF: Future<Output = Result<crate::store::Started, Error>>,
    {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let ticket = {
            let mut queue = self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ticket = self
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            queue.push((ticket, claim, tx));
            ticket
        };
        // A claim that stops waiting (its task is dropped) leaves the
        // queue, counted as written, so that no recording waits for it.
        let _leave = Leave {
            starter: self,
            ticket,
        };
        let answer = |r: Result<StartResult, _>| {
            r.unwrap_or_else(|_| Err("the start was abandoned".into()))
                .map_err(Error::StorageUnavailable)
        };
        loop {
            // Started in another claim's turn meanwhile, or a turn.
            let turn = tokio::select! {
                biased;
                started = &mut rx => return answer(started),
                turn = self.running.lock() => turn,
            };
            let batch: Vec<_> = {
                let mut queue = self
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let n = queue.len().min(START_BATCH);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                // This claim is in a batch being read back.
                drop(turn);
                return answer(rx.await);
            }
            let claims: Vec<C> = batch.iter().map(|(_, c, _)| c.clone()).collect();
            // Counted as written however the write ends (this future may
            // be dropped, or the write panic): no record waits for it.
            let counted = Written {
                starter: self,
                claims: batch.len() as u64,
            };
            let written = write(claims).await;
            drop(turn);
            let result = match written {
                Ok(w) => read(w).await.map(Arc::new),
                Err(e) => Err(e),
            }
            .map_err(|e| e.to_string());
            // Records wait for the read too: its claims' jobs cannot run
            // before it, and it shares the two cores with the records.
            drop(counted);
            for (_, _, tx) in batch {
                let _ = tx.send(result.clone());
            }
            // This claim may not have been in the batch its turn wrote
            // (the first START_BATCH queued go first): it waits again.
        }
    }

    /// Waits until every start queued before now is written and read
    /// back. Recording
    /// outcomes waits for this: a start is late work (applied − due grows
    /// with it), an outcome's record is not (the time of its transition
    /// is when the driver answered), and both take turns on the one
    /// writer (SQLite), so a burst's starts would otherwise queue behind
    /// the records of the jobs started before them. Starts queued later
    /// are not waited for: recording is never held off for good.
    async fn quiet(&self) {
        let target = self.queued.load(std::sync::atomic::Ordering::Acquire);
        loop {
            let wrote = self.wrote.notified();
            tokio::pin!(wrote);
            wrote.as_mut().enable();
            if self.written.load(std::sync::atomic::Ordering::Acquire) >= target {
                return;
            }
            wrote.await;
        }
    }
}

/// Counts a batch's claims as written when dropped.
struct Written<'a, C> {
    starter: &'a Starter<C>,
    claims: u64,
}

impl<C> Drop for Written<'_, C> {
    fn drop(&mut self) {
        self.starter
            .written
            .fetch_add(self.claims, std::sync::atomic::Ordering::AcqRel);
        self.starter.wrote.notify_waiters();
    }
}

/// Takes a claim that stops waiting out of the start queue.
struct Leave<'a, C> {
    starter: &'a Starter<C>,
    ticket: u64,
}

impl<C> Drop for Leave<'_, C> {
    fn drop(&mut self) {
        let mut queue = self
            .starter
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = queue.len();
        queue.retain(|(t, _, _)| *t != self.ticket);
        if queue.len() < before {
            drop(queue);
            drop(Written {
                starter: self.starter,
                claims: 1,
            });
        }
    }
}

/// The bounds on driver calls in flight: in all, and per OEM account.
#[derive(Debug)]
struct Calls {
    /// Jobs spawned (waiting for their device, account or a call slot, or
    /// running): what bounds the memory of a burst.
    spawned: Arc<tokio::sync::Semaphore>,
    all: Arc<tokio::sync::Semaphore>,
    per_account: usize,
    accounts: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Calls {
    fn new(all: usize, per_account: usize) -> Self {
        Self {
            spawned: Arc::new(tokio::sync::Semaphore::new(all.max(1).saturating_mul(8))),
            all: Arc::new(tokio::sync::Semaphore::new(all.max(1))),
            per_account: per_account.max(1),
            accounts: std::sync::Mutex::default(),
        }
    }

    /// A call's turn on `account`.
    async fn account(&self, account: &str) -> Option<AccountTurn<'_>> {
        let sem = shared(&self.accounts, account, || {
            Arc::new(tokio::sync::Semaphore::new(self.per_account))
        });
        let permit = sem.acquire_owned().await.ok()?;
        Some(AccountTurn {
            calls: self,
            account: account.to_owned(),
            permit: Some(permit),
        })
    }
}

/// `key`'s entry of a map of things shared by whoever holds or waits for
/// them (made with `make` if there is none).
fn shared<K, Q, T>(
    map: &std::sync::Mutex<HashMap<K, Arc<T>>>,
    key: &Q,
    make: impl FnOnce() -> Arc<T>,
) -> Arc<T>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
{
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(t) = map.get(key) {
        return t.clone();
    }
    let t = make();
    map.insert(key.to_owned(), t.clone());
    t
}

/// Forgets `key`'s entry of a [`shared`] map once nobody else holds or
/// waits for it (its last holder let it go).
fn forget_unused<K, Q, T>(map: &std::sync::Mutex<HashMap<K, Arc<T>>>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if map.get(key).is_some_and(|t| Arc::strong_count(t) == 1) {
        map.remove(key);
    }
}

/// A call's turn on an account; an account nobody calls is forgotten.
struct AccountTurn<'a> {
    calls: &'a Calls,
    account: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for AccountTurn<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        forget_unused(&self.calls.accounts, self.account.as_str());
    }
}

/// A device's turn; the next job of the device goes when it is dropped.
struct DeviceGuard {
    locks: Arc<DeviceLocks>,
    key: DeviceKey,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        forget_unused(&self.locks.held, &self.key);
    }
}

/// Most outcomes a recorder records at once.
const RECORD_BATCH: usize = 4096;

/// Longest a recorder waits for the outcomes of jobs still running before
/// it records what it has.
const RECORD_LINGER: Duration = Duration::from_millis(100);

/// The jobs of a claim that are running, and a signal when none is.
#[derive(Debug, Default)]
struct Runs {
    count: std::sync::atomic::AtomicUsize,
    /// Notified (a permit kept if nobody waits) when the count falls to 0.
    idle: Notify,
}

/// Counts a job as running until it is dropped.
struct Running(Arc<Runs>);

impl Running {
    fn new(runs: &Arc<Runs>) -> Self {
        runs.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(runs.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_one();
        }
    }
}

/// A batch for the recorder: `first`, what else has come in, and, while
/// jobs still run, what comes within `linger` of now, until none runs,
/// the channel closes or `cap` is reached. A burst's jobs answer within
/// milliseconds of each other, and each record is a write transaction on
/// the one writer the starts need too.
async fn gather<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    first: T,
    runs: &Runs,
    linger: Duration,
    cap: usize,
) -> Vec<T> {
    // What has come in, up to the cap.
    fn take<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, batch: &mut Vec<T>, cap: usize) {
        while batch.len() < cap {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
    }
    let mut batch = vec![first];
    let until = tokio::time::Instant::now() + linger;
    loop {
        take(rx, &mut batch, cap);
        if batch.len() >= cap || runs.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return batch;
        }
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => batch.push(r),
                None => return batch,
            },
            // The last job ended (with or without an outcome): take what
            // it sent, if anything, and go.
            () = runs.idle.notified() => {}
            () = tokio::time::sleep_until(until) => {
                take(rx, &mut batch, cap);
                return batch;
            }
        }
    }
}

/// A job that ran, on its way to be recorded.
struct Ran {
    job: crate::store::Recorded,
    done: Done,
    at: Ts,
    guard: DeviceGuard,
}

/// How the API wakes the dispatcher: at once for work due before the
/// dispatcher's next look (it says when that is), and not for work due
/// later, which that look finds anyway (a wake costs a claim transaction).
#[derive(Debug)]
pub struct Wake {
    notify: Notify,
    /// When the dispatcher looks next, in nanoseconds (`i64::MAX` until it
    /// has said: every due time is before it).
    next_look: std::sync::atomic::AtomicI64,
}

impl Default for Wake {
    fn default() -> Self {
        Self {
            notify: Notify::new(),
            next_look: std::sync::atomic::AtomicI64::new(i64::MAX),
        }
    }
}

impl Wake {
    /// Work is due at `at`: wakes the dispatcher if that is before its
    /// next look.
    pub fn due(&self, at: Ts) {
        if at.0 < self.next_look.load(std::sync::atomic::Ordering::Acquire) {
            self.notify.notify_one();
        }
    }

    /// Work may be due now: wakes the dispatcher.
    pub fn now(&self) {
        self.notify.notify_one();
    }

    /// The dispatcher's next look is at `at`.
    fn planned(&self, at: Ts) {
        self.next_look
            .store(at.0, std::sync::atomic::Ordering::Release);
    }
}

/// How often a claim's heartbeat renews its lease: every sixth of the
/// lease (10 s of the default 60 s), at least every 100 ms. Work claimed
/// a whole horizon ahead (30 s by default, half the default lease) has
/// its claim's lease renewed at least twice before it is due, and a job
/// starts only with half a lease held: one renewal that fails, or comes
/// late in a burst, still leaves two thirds of a lease at the due time
/// (every third, the default until 2026-12-03, left exactly half).
fn heartbeat_every(lease_nanos: i64) -> Duration {
    Duration::from_nanos(u64::try_from(lease_nanos / 6).unwrap_or(0))
        .max(Duration::from_millis(100))
}

/// Aborts its task when dropped (the lease heartbeat ends with its round,
/// however the round ends).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// A driver call's span, when traces are exported (none otherwise).
fn driver_span(
    name: &'static str,
    tenant: &crate::domain::TenantId,
    device: &crate::domain::Device,
    action_id: &str,
) -> tracing::Span {
    if crate::telemetry::instruments().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "driver",
        otel.name = name,
        driver = %device.driver,
        tenant_id = tenant.as_str(),
        device_id = device.id.as_str(),
        action_id = action_id,
    )
}

#[cfg(test)]
mod tests {
    /// With the default lease and horizon, work claimed a whole horizon
    /// ahead is still held for half a lease at its due time when the
    /// renewal before it failed: the last one that succeeded came at most
    /// two heartbeats before.
    #[test]
    fn a_claim_taken_a_horizon_ahead_survives_one_failed_renewal() {
        let c = super::DispatchConfig::default();
        let every = i64::try_from(super::heartbeat_every(c.lease_nanos).as_nanos()).unwrap();
        // The renewals strictly before the due time of work due a horizon
        // after its claim; the last of them failed, so the last that
        // succeeded came two heartbeats or less before the due time.
        let renewals = (c.horizon_nanos - 1) / every;
        assert!(renewals >= 2, "{renewals} renewals before the due time");
        let left = c.lease_nanos - (c.horizon_nanos - (renewals - 1) * every);
        assert!(
            left - c.lease_nanos / 2 >= every,
            "{left} ns held at the due time: a job starts only with half a lease, and the next renewal is {every} ns away"
        );
    }

    use switchyard_drivers::{NativeRow, RowOwner};

    use super::*;

    /// A gather that should end at once must not wait for the linger.
    const LONG: Duration = Duration::from_secs(30);

    async fn promptly<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("returned before the linger ran out")
    }

    #[tokio::test]
    async fn a_batch_with_no_job_running_is_what_has_come_in() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runs = Runs::default();
        tx.send(2).unwrap();
        let batch = promptly(gather(&mut rx, 1, &runs, LONG, 10)).await;
        assert_eq!(batch, [1, 2]);
        // The channel is still open: it did not wait for it to close.
        tx.send(3).unwrap();
        assert_eq!(rx.try_recv().ok(), Some(3));
    }

    #[tokio::test]
    async fn a_batch_waits_for_running_jobs_until_the_last_ends() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runs = Arc::new(Runs::default());
        let (one, two) = (Running::new(&runs), Running::new(&runs));
        assert_eq!(runs.count.load(std::sync::atomic::Ordering::Acquire), 2);
        let job = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(2).unwrap();
            drop(one);
            // The last job ends without an outcome; the channel stays open.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(two);
            tx
        });
        let batch = promptly(gather(&mut rx, 1, &runs, LONG, 10)).await;
        assert_eq!(batch, [1, 2]);
        assert_eq!(runs.count.load(std::sync::atomic::Ordering::Acquire), 0);
        let _tx = job.await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_cap_and_at_the_linger() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runs = Arc::new(Runs::default());
        let _running = Running::new(&runs);
        for i in 2..=6 {
            tx.send(i).unwrap();
        }
        let batch = promptly(gather(&mut rx, 1, &runs, LONG, 4)).await;
        assert_eq!(batch, [1, 2, 3, 4]);
        // A job still runs and nothing more comes: the linger ends it,
        // with what had come in.
        let linger = Duration::from_millis(50);
        let began = std::time::Instant::now();
        let batch = promptly(gather(&mut rx, 0, &runs, linger, 10)).await;
        assert!(began.elapsed() >= linger);
        assert_eq!(batch, [0, 5, 6]);
    }

    #[tokio::test]
    async fn a_job_counts_as_running_until_its_task_ends_even_by_a_panic() {
        let runs = Arc::new(Runs::default());
        let running = Running::new(&runs);
        let task = tokio::spawn(async move {
            let _running = running;
            panic!("the job panicked");
        });
        assert!(task.await.is_err());
        assert_eq!(runs.count.load(std::sync::atomic::Ordering::Acquire), 0);
        // And the end was signalled.
        promptly(runs.idle.notified()).await;
    }

    fn ready_all(claims: Vec<String>) -> crate::store::Started {
        crate::store::Started {
            ready: claims.into_iter().map(|c| (c.clone(), c)).collect(),
            memos: HashMap::new(),
        }
    }

    /// A claim whose turn comes while a full batch of others is queued
    /// ahead of it writes theirs, then takes another turn for its own;
    /// and a claim that stops waiting leaves the queue, so a record
    /// waits for no start that will never be written.
    #[tokio::test]
    async fn a_claim_behind_a_full_batch_is_started_in_a_turn_of_its_own() {
        let starter = Starter::<String>::default();
        let mut ahead = vec![];
        for i in 0..START_BATCH {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ticket = starter
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            starter
                .queue
                .lock()
                .unwrap()
                .push((ticket, format!("ahead{i}"), tx));
            ahead.push(rx);
        }
        let writes = std::sync::atomic::AtomicUsize::new(0);
        let started = tokio::time::timeout(
            Duration::from_secs(10),
            starter.start(
                "mine".to_owned(),
                |claims: Vec<String>| {
                    writes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    async move { Ok(claims) }
                },
                |claims: Vec<String>| async move { Ok(ready_all(claims)) },
            ),
        )
        .await
        .expect("the claim is started")
        .unwrap();
        assert!(started.ready.contains_key("mine"));
        assert_eq!(writes.load(std::sync::atomic::Ordering::Acquire), 2);
        for rx in ahead {
            assert_eq!(rx.await.unwrap().unwrap().ready.len(), START_BATCH);
        }
        // A claim queued and then dropped while another holds the turn.
        let turn = starter.running.lock().await;
        let gone = starter.start(
            "gone".to_owned(),
            |claims: Vec<String>| async move { Ok(claims) },
            |claims: Vec<String>| async move { Ok(ready_all(claims)) },
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(10), gone)
                .await
                .is_err()
        );
        drop(turn);
        assert!(starter.queue.lock().unwrap().is_empty());
        tokio::time::timeout(Duration::from_secs(10), starter.quiet())
            .await
            .expect("no record waits for a claim that stopped waiting");
        // A turn dropped while it writes: its batch counts as written.
        let dropped = starter.start(
            "dropped".to_owned(),
            |claims: Vec<String>| async move {
                std::future::pending::<()>().await;
                Ok(claims)
            },
            |claims: Vec<String>| async move { Ok(ready_all(claims)) },
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(10), dropped)
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(10), starter.quiet())
            .await
            .expect("no record waits for a write that was dropped");
    }

    /// A claim started in another claim's turn runs once its start is
    /// read back, not when a turn of its own comes round: a burst's later
    /// starts must not hold up the work already started. Here the second
    /// batch's write never ends, and the first batch's claims all return
    /// (and outcomes may be recorded only once no start is pending).
    #[tokio::test]
    async fn a_claim_runs_once_its_start_is_read_back_whoever_wrote_it() {
        let starter = Arc::new(Starter::<String>::default());
        let stuck = Arc::new(Notify::new());
        let turn = starter.running.lock().await;
        let n = START_BATCH + 1;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..n {
            let (starter, stuck, done) = (starter.clone(), stuck.clone(), done_tx.clone());
            tokio::spawn(async move {
                let claim = format!("c{i}");
                let started = starter
                    .start(
                        claim.clone(),
                        |claims: Vec<String>| {
                            let stuck = stuck.clone();
                            async move {
                                if claims.len() < START_BATCH {
                                    stuck.notified().await;
                                }
                                Ok(claims)
                            }
                        },
                        |claims: Vec<String>| async move {
                            Ok(crate::store::Started {
                                ready: claims.into_iter().map(|c| (c.clone(), c)).collect(),
                                memos: HashMap::new(),
                            })
                        },
                    )
                    .await
                    .unwrap();
                assert!(started.ready.contains_key(&claim));
                let _ = done.send(claim);
            });
        }
        // Every claim queued before the first turn is taken.
        while starter.queue.lock().unwrap().len() < n {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            starter.queued.load(std::sync::atomic::Ordering::Acquire),
            n as u64
        );
        drop(turn);
        let mut returned = std::collections::BTreeSet::new();
        while returned.len() < START_BATCH {
            let claim = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
                .await
                .expect("the first batch's claims return while the second is written")
                .unwrap();
            returned.insert(claim);
        }
        // The one left is in the start that has not ended: a record waits.
        assert_eq!(
            starter.written.load(std::sync::atomic::Ordering::Acquire),
            START_BATCH as u64
        );
        let mut quiet =
            still_quieting(&starter, "a record waits while an earlier start is written").await;
        stuck.notify_one();
        let last = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!returned.contains(&last));
        tokio::time::timeout(Duration::from_secs(10), &mut quiet)
            .await
            .expect("recording goes on once no start is pending")
            .unwrap();
    }

    /// `Starter::quiet` in a task of its own, checked still waiting 50 ms
    /// later.
    async fn still_quieting<C: Clone + Send + 'static>(
        starter: &Arc<Starter<C>>,
        why: &str,
    ) -> tokio::task::JoinHandle<()> {
        let mut quiet = tokio::spawn({
            let starter = starter.clone();
            async move { starter.quiet().await }
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut quiet)
                .await
                .is_err(),
            "{why}"
        );
        quiet
    }

    #[tokio::test]
    async fn a_record_waits_while_an_earlier_start_is_read_back() {
        let starter = Arc::new(Starter::<String>::default());
        let reading = Arc::new(Notify::new());
        let go_on = Arc::new(Notify::new());
        let start = tokio::spawn({
            let (starter, reading, go_on) = (starter.clone(), reading.clone(), go_on.clone());
            async move {
                starter
                    .start(
                        "c".to_owned(),
                        |claims: Vec<String>| async move { Ok(claims) },
                        |claims: Vec<String>| {
                            let (reading, go_on) = (reading.clone(), go_on.clone());
                            async move {
                                reading.notify_one();
                                go_on.notified().await;
                                Ok(crate::store::Started {
                                    ready: claims.into_iter().map(|c| (c.clone(), c)).collect(),
                                    memos: HashMap::new(),
                                })
                            }
                        },
                    )
                    .await
            }
        });
        // Written, and being read back.
        tokio::time::timeout(Duration::from_secs(10), reading.notified())
            .await
            .expect("the start is read back");
        let mut quiet = still_quieting(
            &starter,
            "a record waits while an earlier start is read back",
        )
        .await;
        go_on.notify_one();
        tokio::time::timeout(Duration::from_secs(10), &mut quiet)
            .await
            .expect("recording goes on once the start is read back")
            .unwrap();
        assert!(start.await.unwrap().unwrap().ready.contains_key("c"));
    }

    fn row(i: usize, enabled: bool, owner: RowOwner) -> NativeRow {
        NativeRow {
            start: "00:00".into(),
            end: format!("{i}{}", "9".repeat(100)),
            mode: "m".repeat(10_000),
            enabled,
            owner,
        }
    }

    #[test]
    fn an_observation_is_bounded_and_keeps_the_rows_that_block_pushes() {
        let mut rows: Vec<NativeRow> = (0..5000)
            .map(|i| row(i, i % 2 == 0, RowOwner::Ours))
            .collect();
        rows.push(row(1, true, RowOwner::Protected));
        rows.push(row(2, true, RowOwner::Foreign));
        let o = observed(
            DeviceState {
                native_scheduler: Some((true, rows)),
                soc_percent: Some(f64::NAN),
                mode: Some("x".repeat(1000)),
            },
            Ts(0),
        );
        assert_eq!(o.rows.len(), MAX_OBSERVED_ROWS);
        assert_eq!(o.rows[0].owner, RowOwner::Protected);
        assert_eq!(o.rows[1].owner, RowOwner::Foreign);
        assert!(
            o.rows
                .iter()
                .all(|r| r.mode.len() <= 64 && r.end.len() <= 16)
        );
        assert!(o.mode.is_some_and(|m| m.len() <= 64));
        assert_eq!(o.soc_percent, None);
    }
}
