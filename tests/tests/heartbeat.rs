//! The dispatch lease's heartbeat: a round that runs longer than its lease
//! (jobs queued behind the concurrency bound) keeps its claim, so another
//! replica on the database never takes up work that is still being done,
//! and each action is applied once.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use switchyard::{
    dispatch::DispatchConfig,
    domain::{
        Clock, Command, Device, DeviceId, Family, Params, Strategy, SystemClock, TenantId, Ts,
        validate::ValidPush,
    },
    server,
    store::Store,
};
use switchyard_drivers::{Registry, simulated::SimulatedFactory};

const JOBS: usize = 8;
const LEASE: i64 = 3 * Ts::SECOND;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_longer_than_its_lease_keeps_its_claim() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("h.db").display());
    let sim = SimulatedFactory::default();
    let mut registry = Registry::builtin();
    registry.register(Arc::new(sim.clone()));
    let app = server::build_app(&url, Arc::new(SystemClock), registry, 30)
        .await
        .unwrap();
    let tenant = TenantId::default_tenant();
    let now = SystemClock.now();
    let mut booked = Vec::new();
    for i in 0..JOBS {
        let id = DeviceId::parse(&format!("d{i}")).unwrap();
        let device = Device {
            id: id.clone(),
            display_name: String::new(),
            family: Family::Battery,
            driver: "simulated".into(),
            oem_device_id: String::new(),
            timezone: "UTC".into(),
            // Each call takes 0.6 s: one at a time, the round lasts about
            // 4.8 s, longer than the 3 s lease (a job is cut off at 1.5 s).
            settings: BTreeMap::from([("latency_ms".to_owned(), "600".to_owned())]).into(),
            revision: 0,
            created: Ts(0),
            updated: Ts(0),
            observed: None,
            incarnation: String::new(),
        };
        app.store
            .create_device(&tenant, device, None)
            .await
            .unwrap();
        let out = app
            .store
            .push(
                &tenant,
                &id,
                move |_, _| {
                    Ok(ValidPush {
                        command: Command::Charge,
                        channel: "mode".into(),
                        params: Params::default(),
                        start: now,
                        end: Some(now.plus_nanos(3600 * Ts::SECOND)),
                        immediate: false,
                    })
                },
                Strategy::Reject,
                false,
                None,
            )
            .await
            .unwrap();
        booked.push((id, out.action.id));
    }
    // Another replica: its own connections to the same database, trying
    // to claim all the while.
    let replica = Store::open(&url, Arc::new(SystemClock)).await.unwrap();
    let d = server::dispatcher(
        &app,
        DispatchConfig {
            concurrency: 1,
            lease_nanos: LEASE,
            ..Default::default()
        },
    );
    let started = std::time::Instant::now();
    let round = tokio::spawn(async move { d.run_due().await });
    // The round's claim is taken (every action in flight) before the other
    // replica starts trying.
    for (id, action) in &booked {
        while app
            .store
            .get_action(&tenant, id, action)
            .await
            .unwrap()
            .state
            == switchyard::domain::ActionState::Scheduled
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut stolen = Vec::new();
    while !round.is_finished() {
        let jobs = replica
            .claim_due(SystemClock.now(), 64, LEASE)
            .await
            .unwrap();
        stolen.extend(jobs.into_iter().map(|j| j.action.id));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ran = round.await.unwrap().unwrap();
    let took = started.elapsed();
    assert_eq!(ran, JOBS);
    assert!(
        took > Duration::from_nanos(LEASE as u64),
        "the round ({took:?}) did not outlast its lease: this proves nothing"
    );
    assert!(
        stolen.is_empty(),
        "another replica took up work still being done: {stolen:?}"
    );
    for (id, action) in booked {
        let (applies, _) = sim.applies(id.as_str(), &action.to_string());
        assert_eq!(applies, 1, "{id}");
        let a = app.store.get_action(&tenant, &id, &action).await.unwrap();
        assert_eq!(a.state, switchyard::domain::ActionState::Active, "{a:?}");
    }
    replica.close().await;
}
