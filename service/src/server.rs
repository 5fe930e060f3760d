//! Composition: builds the gRPC server (switchyard services, health,
//! reflection v1 and v1alpha) on a listener and runs it until shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use switchyard_drivers::{Family, Registry};
use switchyard_proto::v1::{
    action_service_server::ActionServiceServer, admin_service_server::AdminServiceServer,
    device_service_server::DeviceServiceServer, event_service_server::EventServiceServer,
    webhook_service_server::WebhookServiceServer,
};
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::{
    api::{
        App, actions::Actions, admin::Admin, devices::Devices, events::Events, webhooks::Webhooks,
    },
    auth::AuthLayer,
    dispatch::{DispatchConfig, Dispatcher},
    domain::{Clock, Device, DeviceId, Error, Ts},
    limits::{self, GuardLayer, Limits},
    store::Store,
};

/// The span of an RPC: an exported one when OTLP export is on, none
/// otherwise (no cost per call).
fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    if crate::telemetry::instruments().is_some() {
        crate::telemetry::rpc_span(request)
    } else {
        tracing::Span::none()
    }
}

/// The health check name that answers SERVING for as long as the process
/// runs and is not shutting down, whether the database answers or not:
/// for a liveness probe (a restart does not bring a database back).
/// Readiness uses the whole server's status (""), which follows the
/// database.
pub const LIVENESS: &str = "liveness";

/// Default booking horizon.
pub const DEFAULT_HORIZON_DAYS: u32 = 30;

/// Default retention of finished actions.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;

/// How often a PostgreSQL replica stamps committed audit entries with their
/// event cursors (the most an event waits before watchers can see it).
const STAMP_EVERY: Duration = Duration::from_millis(100);

/// Finished actions forgotten per write transaction of the retention sweep.
const PRUNE_BATCH: u32 = 500;

/// PostgreSQL: how often, by default, the busiest tables' statistics are
/// checked and refreshed (`--analyze-every-seconds`).
pub const DEFAULT_ANALYZE_EVERY_SECONDS: u64 = 10;

/// How often a store on `backend` refreshes its tables' statistics, given
/// `--analyze-every-seconds` as `every`: on PostgreSQL, unless zero.
fn statistics_every(backend: sea_orm::DbBackend, every: Duration) -> Option<Duration> {
    (backend == sea_orm::DbBackend::Postgres && !every.is_zero()).then_some(every)
}

/// Creates the demo devices on an empty database. Returns how many.
pub async fn seed_demo(app: &App) -> Result<usize, Error> {
    let tenant = app.tenant();
    if app.store.count_devices(&tenant).await? > 0 {
        return Ok(0);
    }
    let demo = [
        (
            "demo-battery",
            "Demo home battery",
            Family::Battery,
            "Europe/London",
        ),
        (
            "demo-battery-2",
            "Demo hybrid inverter",
            Family::Battery,
            "Europe/Berlin",
        ),
        (
            "demo-ev-charger",
            "Demo EV charger",
            Family::EvCharger,
            "Europe/London",
        ),
    ];
    let mut created = 0;
    for (id, name, family, tz) in demo {
        let device = Device {
            id: DeviceId::parse(id).map_err(|e| Error::Internal(e.to_owned()))?,
            display_name: name.to_owned(),
            family,
            driver: "simulated".to_owned(),
            oem_device_id: format!("SIM-{}", id.to_uppercase()),
            timezone: tz.to_owned(),
            settings: Default::default(),
            revision: 0,
            created: Ts(0),
            updated: Ts(0),
            observed: None,
            incarnation: String::new(),
        };
        // Replicas started together on one empty database all try: the
        // first creates each device, the others find it there.
        match app.store.create_device(&tenant, device, None).await {
            Ok(_) => created += 1,
            Err(Error::DeviceAlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Opens the store and assembles the handlers' state.
pub async fn build_app(
    database_url: &str,
    clock: Arc<dyn Clock>,
    registry: Registry,
    horizon_days: u32,
) -> Result<App, Error> {
    build_app_with(
        database_url,
        clock,
        registry,
        horizon_days,
        &crate::store::StoreOptions::default(),
    )
    .await
}

/// [`build_app`] with the store's options (the PostgreSQL pool's size).
pub async fn build_app_with(
    database_url: &str,
    clock: Arc<dyn Clock>,
    registry: Registry,
    horizon_days: u32,
    options: &crate::store::StoreOptions,
) -> Result<App, Error> {
    let store = Store::open_with(database_url, clock.clone(), options).await?;
    Ok(App {
        budgets: Arc::new(crate::dispatch::Budgets::new(store.clone())),
        store,
        registry: Arc::new(registry),
        clock,
        horizon_nanos: i64::from(horizon_days) * 86_400 * Ts::SECOND,
        retention_nanos: i64::from(DEFAULT_RETENTION_DAYS) * 86_400 * Ts::SECOND,
        analyze_every: Duration::from_secs(DEFAULT_ANALYZE_EVERY_SECONDS),
        wake: Arc::default(),
        caller: crate::auth::Caller::local(),
        webhooks: Arc::default(),
    })
}

/// The dispatcher of `app`'s store and drivers.
pub fn dispatcher(app: &App, config: DispatchConfig) -> Dispatcher {
    Dispatcher::new(
        app.store.clone(),
        app.registry.clone(),
        app.clock.clone(),
        app.budgets.clone(),
        app.wake.clone(),
        config,
    )
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves,
/// then drains in-flight calls for at most `grace`. With a `dispatcher`,
/// runs it and webhook delivery too (tests drive their own).
pub async fn serve(
    app: App,
    listener: TcpListener,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    dispatcher: Option<Dispatcher>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<DeviceServiceServer<Devices>>().await;
    reporter.set_serving::<ActionServiceServer<Actions>>().await;
    reporter.set_serving::<AdminServiceServer<Admin>>().await;
    reporter.set_serving::<EventServiceServer<Events>>().await;
    reporter
        .set_serving::<WebhookServiceServer<Webhooks>>()
        .await;
    reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;

    let sets: [&[u8]; 3] = [
        switchyard_proto::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    for s in sets {
        v1 = v1.register_encoded_file_descriptor_set(s);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(s);
    }
    let v1 = v1.build_v1()?;
    let v1alpha = v1alpha.build_v1alpha()?;

    // Retention: finished actions older than the retention period are
    // forgotten, a batch per short transaction, with a pause between
    // batches so that writers are not kept waiting.
    let prune_store = app.store.clone();
    let (prune_clock, retention) = (app.clock.clone(), app.retention_nanos);
    let pruner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let cut = prune_clock.now().plus_nanos(-retention);
            let mut total = 0;
            // Retention 0 keeps actions for ever (the delivery log is
            // still swept).
            let mut more = retention > 0;
            // Rows finished before migration 22, or by a replica of an
            // earlier version, are stamped first (a batch at a time).
            let mut stamping = more;
            while stamping {
                match prune_store.stamp_finished(PRUNE_BATCH).await {
                    Ok(n) => {
                        stamping = n >= u64::from(PRUNE_BATCH);
                        if stamping {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention sweep failed");
                        (stamping, more) = (false, false);
                    }
                }
            }
            while more {
                match prune_store.prune_finished(cut, PRUNE_BATCH).await {
                    Ok(n) => {
                        total += n;
                        more = n >= u64::from(PRUNE_BATCH);
                        if more {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention sweep failed");
                        more = false;
                    }
                }
            }
            if total > 0 {
                tracing::info!(
                    actions = total,
                    "forgot finished actions past their retention"
                );
            }
            let log_cut = prune_clock.now().plus_nanos(
                -i64::try_from(crate::api::webhooks::ATTEMPT_RETENTION.as_nanos())
                    .unwrap_or(i64::MAX / 2),
            );
            loop {
                match prune_store
                    .prune_webhook_attempts(log_cut, PRUNE_BATCH)
                    .await
                {
                    Ok(n) if n >= u64::from(PRUNE_BATCH) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook delivery log sweep failed");
                        break;
                    }
                }
            }
            if let Err(e) = prune_store
                .cap_webhook_attempts(crate::api::webhooks::ATTEMPTS_KEPT, PRUNE_BATCH)
                .await
            {
                tracing::warn!(error = %e, "webhook delivery log sweep failed");
            }
        }
    });

    // PostgreSQL: the busiest tables' statistics kept fresh, so that the
    // planner does not guess (`store/stats.rs`), also where autovacuum is
    // off or has not come round yet.
    let stats_store = app.store.clone();
    let analyze_every = app.analyze_every;
    let statistics = tokio::spawn(async move {
        let Some(every) = statistics_every(stats_store.backend(), analyze_every) else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut told = false;
        loop {
            tick.tick().await;
            match stats_store.refresh_statistics().await {
                Ok(done) => {
                    if !done.analysed.is_empty() {
                        tracing::debug!(tables = ?done.analysed, "analysed tables that changed");
                    }
                    if !done.not_owned.is_empty() && !told {
                        told = true;
                        tracing::warn!(
                            tables = ?done.not_owned,
                            "cannot analyse tables this role neither owns nor may maintain: \
                             their statistics are left to autovacuum (or set \
                             --analyze-every-seconds 0)"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not refresh table statistics"),
            }
        }
    });

    // Health follows the database: NOT_SERVING while it does not answer
    // (a load balancer then sends calls to a replica that can serve them),
    // SERVING again as soon as it does.
    let health_store = app.store.clone();
    let health_reporter = reporter.clone();
    let health_watch = tokio::spawn(async move {
        let mut serving = true;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let up = matches!(
                tokio::time::timeout(Duration::from_secs(2), health_store.ping()).await,
                Ok(Ok(()))
            );
            if up == serving {
                continue;
            }
            serving = up;
            let status = if up {
                tracing::info!("the database answers again: SERVING");
                tonic_health::ServingStatus::Serving
            } else {
                tracing::warn!("the database does not answer: NOT_SERVING");
                tonic_health::ServingStatus::NotServing
            };
            for service in [
                "",
                <DeviceServiceServer<Devices> as tonic::server::NamedService>::NAME,
                <ActionServiceServer<Actions> as tonic::server::NamedService>::NAME,
                <AdminServiceServer<Admin> as tonic::server::NamedService>::NAME,
                <EventServiceServer<Events> as tonic::server::NamedService>::NAME,
                <WebhookServiceServer<Webhooks> as tonic::server::NamedService>::NAME,
            ] {
                health_reporter.set_service_status(service, status).await;
            }
        }
    });

    // PostgreSQL: committed audit entries get their event cursors, in the
    // order they become visible (store/events.rs); one replica at a time.
    let stamp_store = app.store.clone();
    let stamper = tokio::spawn(async move {
        // SQLite needs no stamping (the cursor is the entry's seq).
        if !stamp_store.stamps_events() {
            return;
        }
        let mut tick = tokio::time::interval(STAMP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match stamp_store.stamp_events().await {
                    Ok(n) if n >= 1_000 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "stamping events failed");
                        break;
                    }
                }
            }
        }
    });

    // Background upkeep: expired idempotency keys.
    let sweeper_store = app.store.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            if let Err(e) = sweeper_store.idem_sweep().await {
                tracing::warn!(error = %e, "idempotency sweep failed");
            }
        }
    });

    let (stop_dispatch, dispatch_stopped) = tokio::sync::watch::channel(false);
    // Webhook delivery runs beside the dispatcher (tests drive their own);
    // it stops with it.
    let delivery_task = dispatcher.is_some().then(|| {
        let deliverer = crate::delivery::Deliverer::new(
            app.store.clone(),
            app.clock.clone(),
            app.webhooks.clone(),
        );
        tokio::spawn(deliverer.run(dispatch_stopped.clone()))
    });
    let dispatch_task = dispatcher.map(|d| {
        let mut stopped = dispatch_stopped.clone();
        tokio::spawn(d.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }))
    });

    // Keys, scopes and rate limits, before anything else looks at a call.
    // On loopback with no key yet, calls act as the default tenant.
    let loopback = crate::auth::listens_on_loopback(listener.local_addr()?);
    let auth = AuthLayer::new(app.store.clone(), app.clock.clone(), loopback);
    auth.log_mode().await;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Event watches never end by themselves: shutting down ends them.
    let (stop_watches, stop_watches_rx) = tokio::sync::watch::channel(false);
    let router = Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_max_header_list_size(16 * 1024)
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // What a connection may send before the server reads it: small,
        // since requests are small, so idle buffers stay small too.
        .initial_connection_window_size(256 * 1024)
        .initial_stream_window_size(64 * 1024)
        .timeout(limits.request_timeout)
        .trace_fn(rpc_span)
        .layer(auth)
        .layer(GuardLayer::new(limits))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(DeviceServiceServer::new(Devices(app.clone())))
        .add_service(ActionServiceServer::new(Actions(app.clone())))
        .add_service(AdminServiceServer::new(Admin(app.clone())))
        .add_service(EventServiceServer::new(Events {
            app: app.clone(),
            stopping: stop_watches_rx,
            slots: Arc::new(tokio::sync::Semaphore::new(crate::api::events::MAX_WATCHES)),
            pages: Arc::default(),
        }))
        .add_service(WebhookServiceServer::new(Webhooks(app.clone())));
    let incoming = limits::incoming(listener, limits);
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));

    tokio::select! {
        r = &mut server => {
            stamper.abort();
            sweeper.abort();
            pruner.abort();
            statistics.abort();
            health_watch.abort();
            return Ok(r??);
        }
        () = shutdown => {}
    }
    // Shutting down is NOT_SERVING for good: the watcher is gone before
    // the status is set.
    health_watch.abort();
    let _ = health_watch.await;
    tracing::info!(
        grace_seconds = grace.as_secs_f64(),
        "shutting down: draining calls"
    );
    reporter
        .set_not_serving::<DeviceServiceServer<Devices>>()
        .await;
    reporter
        .set_not_serving::<ActionServiceServer<Actions>>()
        .await;
    reporter
        .set_not_serving::<AdminServiceServer<Admin>>()
        .await;
    reporter
        .set_not_serving::<EventServiceServer<Events>>()
        .await;
    reporter
        .set_not_serving::<WebhookServiceServer<Webhooks>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(());
    let _ = stop_watches.send(true);
    let _ = stop_dispatch.send(true);
    let drained = tokio::time::timeout(grace, &mut server).await;
    if let Some(t) = dispatch_task {
        // A driver call in progress finishes or is abandoned; its claim
        // expires and the work is taken up again after a restart.
        let _ = tokio::time::timeout(grace, t).await;
    }
    if let Some(t) = delivery_task {
        // Deliveries in progress end with their attempt (its answer is
        // recorded, or the event is sent again by the next claim).
        let _ = tokio::time::timeout(grace, t).await;
    }
    sweeper.abort();
    pruner.abort();
    statistics.abort();
    stamper.abort();
    match drained {
        Ok(r) => r??,
        Err(_) => {
            tracing::warn!("calls still running after the grace period; stopping anyway");
            server.abort();
        }
    }
    app.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_refreshed_on_postgresql_unless_zero() {
        let ten = Duration::from_secs(10);
        let pg = sea_orm::DbBackend::Postgres;
        assert_eq!(statistics_every(pg, ten), Some(ten));
        assert_eq!(statistics_every(pg, Duration::ZERO), None);
        assert_eq!(statistics_every(sea_orm::DbBackend::Sqlite, ten), None);
    }
}
