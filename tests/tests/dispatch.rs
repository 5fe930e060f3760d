//! Dispatch over the simulated driver: actions happen at their start, are
//! reverted at their end, survive crashes, and every failure is typed.
//! The clock is driven; nothing sleeps waiting for a schedule.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use switchyard::domain::Ts;
use switchyard_proto::v1::{self as pb, ActionState as St, Command, ConflictStrategy as S};
use switchyard_tests::{TestServer, action, details, expect_error, push, window};
use tonic::Code;

const H: i64 = 3600;
const SEC: i64 = Ts::SECOND;

fn mode(srv: &TestServer, device: &str) -> String {
    srv.sim
        .observe(device)
        .map(|(m, _, _)| m)
        .unwrap_or_else(|| "AUTO_BALANCED".into())
}

/// A server with a simulated battery `b` on which `action` is booked.
async fn booked_on_b(action: pb::Action) -> (TestServer, pb::Action) {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[]).await;
    let a = srv.book("b", action).await;
    (srv, a)
}

/// Claims what is due now (at most 10, for 120 s), as a dispatcher would.
async fn claim_due(srv: &TestServer) -> Vec<switchyard::store::Job> {
    srv.app
        .store
        .claim_due(srv.clock_now(), 10, 120 * SEC)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_windowed_action_is_applied_at_its_start_and_reverted_at_its_end() {
    let (srv, a) = booked_on_b(window(Command::Charge, H, 2 * H)).await;
    assert_eq!(a.state, St::Scheduled as i32);
    assert!(!a.verified, "nothing has been read back yet");

    srv.dispatch().await;
    assert_eq!(
        srv.get("b", &a.action_id).await.state,
        St::Scheduled as i32,
        "not before its start"
    );
    assert_eq!(mode(&srv, "b"), "AUTO_BALANCED");

    srv.dispatch_at(H).await;
    let active = srv.get("b", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32);
    assert_eq!(mode(&srv, "b"), "CHARGE");
    assert!(active.oem_response.contains("CHARGE"));
    assert!(
        active.verified,
        "the simulated device reads back what it was told"
    );

    // In flight: no strategy can cancel it; QUEUE_AFTER still can queue.
    let late = || window(Command::Discharge, H + 60, 2 * H + 60);
    let st = srv.refused(push("b", late(), S::CancelAndReplace)).await;
    assert_eq!(details(&st).reason(), "ACTION_IN_FLIGHT");
    let q = srv.pushed(push("b", late(), S::QueueAfter)).await;
    assert_eq!(q.start_time, Some(switchyard_tests::at(2 * H)));

    srv.dispatch_at(2 * H - 1).await;
    assert_eq!(
        srv.get("b", &a.action_id).await.state,
        St::Active as i32,
        "not reverted early"
    );

    srv.dispatch_at(2 * H).await;
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Completed as i32);
    assert_eq!(
        srv.history(&a.action_id).await,
        ["SCHEDULED", "ACKNOWLEDGED", "ACTIVE", "COMPLETED"]
    );
    // The queued discharge took over at 2 h.
    assert_eq!(srv.get("b", &q.action_id).await.state, St::Active as i32);
    assert_eq!(mode(&srv, "b"), "DISCHARGE");
}

#[tokio::test]
async fn an_immediate_action_completes_once_applied() {
    let (srv, a) = booked_on_b(action(Command::AutoReserve, None, None)).await;
    assert_eq!(a.state, St::Acknowledged as i32);
    srv.dispatch().await;
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Completed as i32);
    assert_eq!(mode(&srv, "b"), "AUTO_RESERVE");
    // Completed: it no longer holds the channel.
    srv.book("b", window(Command::Charge, H, 2 * H)).await;
}

#[tokio::test]
async fn cancelling_an_active_action_reverts_it_now_and_it_holds_until_reverted() {
    let (srv, a) = booked_on_b(window(Command::Charge, H, 3 * H)).await;
    srv.dispatch_at(H).await;
    assert_eq!(mode(&srv, "b"), "CHARGE");

    let c = srv.cancel("b", &a.action_id).await;
    assert_eq!(c.state, St::Cancelled as i32);
    // Until the revert is done, nothing else may be applied on the channel.
    let idle = || window(Command::Idle, H + 60, H + 120);
    let st = srv.refused(push("b", idle(), S::CancelAndReplace)).await;
    assert_eq!(details(&st).reason(), "ACTION_IN_FLIGHT");

    srv.dispatch().await;
    assert_eq!(mode(&srv, "b"), "AUTO_BALANCED", "reverted early");
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Cancelled as i32);
    srv.book("b", idle()).await;
}

#[tokio::test]
async fn a_revert_that_keeps_failing_ends_in_revert_failed() {
    let (srv, a) = booked_on_b(window(Command::Charge, H, 2 * H)).await;
    srv.dispatch_at(H).await;
    srv.set_settings("b", &[("fail_mode", "revert_fails")])
        .await;

    srv.at_secs(2 * H);
    let mut now = 2 * H;
    for _ in 0..20 {
        srv.dispatch().await;
        if srv.get("b", &a.action_id).await.state != St::Active as i32 {
            break;
        }
        let retrying = srv.get("b", &a.action_id).await;
        assert!(
            retrying.error_message.starts_with("retrying"),
            "{retrying:?}"
        );
        now += 700; // past the longest backoff (10 min)
        srv.at_secs(now);
    }
    let failed = srv.get("b", &a.action_id).await;
    assert_eq!(failed.state, St::Failed as i32);
    assert_eq!(failed.error_code, "REVERT_FAILED");
    assert!(failed.oem_response.contains("revert failed"), "{failed:?}");
    assert_eq!(
        srv.history(&a.action_id).await.last().map(String::as_str),
        Some("FAILED")
    );
}

#[tokio::test]
async fn a_revert_survives_a_dispatcher_that_crashed_holding_it() {
    let (srv, a) = booked_on_b(window(Command::Discharge, H, 2 * H)).await;
    srv.dispatch_at(H).await;
    assert_eq!(mode(&srv, "b"), "DISCHARGE");

    // At the end a dispatcher claims the revert and dies before doing it.
    srv.at_secs(2 * H);
    let claimed = claim_due(&srv).await;
    assert_eq!(claimed.len(), 1);
    // While its claim lasts, nobody else takes the work ...
    assert_eq!(srv.dispatcher().drain().await.unwrap(), 0);
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Active as i32);
    // ... and once it has lapsed, a new dispatcher (a restarted process
    // keeps nothing but the database) reverts on time.
    srv.at_secs(2 * H + 121);
    assert_eq!(srv.dispatcher().drain().await.unwrap(), 1);
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Completed as i32);
    assert_eq!(mode(&srv, "b"), "AUTO_BALANCED");
}

#[tokio::test]
async fn a_dispatcher_whose_claim_lapsed_records_nothing() {
    let (srv, a) = booked_on_b(window(Command::Discharge, H, 2 * H)).await;
    srv.dispatch_at(H).await;

    // A dispatcher claims the revert and stalls past its lease ...
    srv.at_secs(2 * H);
    let stalled = claim_due(&srv).await;
    assert_eq!(stalled.len(), 1);
    srv.at_secs(2 * H + 121);
    // ... while another claims it again, and that revert fails for good.
    let fresh = claim_due(&srv).await;
    assert_eq!(fresh.len(), 1);
    let store = &srv.app.store;
    store
        .finish(
            &fresh[0],
            switchyard::store::Finish::Failed {
                code: "REVERT_FAILED".into(),
                message: "rejected".into(),
                raw: None,
                revert: false,
                memo: None,
            },
        )
        .await
        .unwrap();
    // The stalled one wakes up with a success: it must not overwrite the
    // outcome recorded under the live claim.
    store
        .finish(
            &stalled[0],
            switchyard::store::Finish::Reverted {
                raw: "late".into(),
                verified: true,
            },
        )
        .await
        .unwrap();
    let f = srv.get("b", &a.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "REVERT_FAILED")
    );
    assert_ne!(f.oem_response, "late");
    assert_eq!(
        srv.history(&a.action_id).await.last().map(String::as_str),
        Some("FAILED"),
        "no second transition from the stalled claim"
    );
}

/// A fleet is observed in batches: a pass reads at most
/// `OBSERVE_BATCH` devices, the least recently observed first, and
/// records them together; the next pass takes the rest.
#[tokio::test]
async fn a_fleet_is_observed_in_batches_the_stalest_first() {
    const BATCH: usize = switchyard::dispatch::OBSERVE_BATCH;
    let srv = TestServer::start().await;
    let n = BATCH + 6;
    for i in 0..n {
        srv.sim_device(&format!("s{i}"), &[]).await;
    }
    let d = srv.dispatcher();
    // The last six are observed later than the others: the others go
    // first.
    srv.at_secs(10);
    for i in BATCH..n {
        srv.set_settings(&format!("s{i}"), &[("capacity_wh", "13000")])
            .await;
    }
    srv.at_secs(3600);
    assert_eq!(d.observe_due(false).await.unwrap(), (BATCH, BATCH));
    let observed_at = |dev: pb::Device| dev.observed_state.and_then(|o| o.observe_time);
    assert_eq!(
        observed_at(srv.get_device("s0").await),
        Some(switchyard_tests::at(3600))
    );
    assert_ne!(
        observed_at(srv.get_device(&format!("s{}", n - 1)).await),
        Some(switchyard_tests::at(3600)),
        "observed more recently: left for the next pass"
    );
    assert_eq!(d.observe_due(false).await.unwrap(), (6, 6));
    assert_eq!(d.observe_due(false).await.unwrap(), (0, 0));
    assert_eq!(
        observed_at(srv.get_device(&format!("s{}", n - 1)).await),
        Some(switchyard_tests::at(3600))
    );
}

#[tokio::test]
async fn a_device_is_observed_again_once_its_observation_is_stale() {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[]).await;
    let d = srv.dispatcher();
    let observed_at = |dev: pb::Device| dev.observed_state.and_then(|o| o.observe_time);
    d.observe_due(true).await.unwrap();
    let first = observed_at(srv.get_device("b").await).expect("observed");

    // Until its last observation is more than 300 s old the device is left
    // alone ...
    srv.at_secs(300);
    assert_eq!(d.observe_due(false).await.unwrap(), (0, 0));
    assert_eq!(observed_at(srv.get_device("b").await), Some(first));
    // ... and then it is read again.
    srv.at_secs(301);
    assert_eq!(d.observe_due(false).await.unwrap(), (1, 1));
    assert_eq!(
        observed_at(srv.get_device("b").await),
        Some(switchyard_tests::at(301))
    );
}

#[tokio::test]
async fn a_window_that_passed_while_down_is_reported_missed() {
    let (srv, a) = booked_on_b(window(Command::Charge, H, 2 * H)).await;
    srv.dispatch_at(3 * H).await;
    let f = srv.get("b", &a.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "WINDOW_MISSED")
    );
    assert_eq!(mode(&srv, "b"), "AUTO_BALANCED", "never applied");
}

#[tokio::test]
async fn oem_failures_are_typed_on_the_action() {
    let srv = TestServer::start().await;
    for (id, fail, code) in [
        ("r", "reject", "OEM_REJECTED"),
        ("o", "offline", "DEVICE_OFFLINE"),
    ] {
        srv.sim_device(id, &[("fail_mode", fail)]).await;
        let a = srv.book(id, action(Command::Charge, None, None)).await;
        srv.dispatch().await;
        let f = srv.get(id, &a.action_id).await;
        assert_eq!(
            (f.state, f.error_code.as_str()),
            (St::Failed as i32, code),
            "{f:?}"
        );
        assert!(
            f.oem_response.starts_with("simulated:"),
            "the raw answer is kept: {f:?}"
        );
    }
}

#[tokio::test]
async fn a_retryable_failure_backs_off_then_fails_after_its_tries() {
    let srv = TestServer::start().await;
    srv.sim_device("u", &[("fail_mode", "unavailable")]).await;
    let a = srv.book("u", action(Command::Charge, None, None)).await;
    srv.dispatch().await;
    let r = srv.get("u", &a.action_id).await;
    assert_eq!(r.state, St::Acknowledged as i32, "retried, not failed");
    // Backing off: nothing is due at the same instant.
    assert_eq!(srv.dispatcher().drain().await.unwrap(), 0);
    let mut t = 0;
    for _ in 0..10 {
        t += 700;
        srv.dispatch_at(t).await;
    }
    let f = srv.get("u", &a.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "OEM_UNAVAILABLE")
    );

    // The OEM recovers: a new action goes through.
    srv.set_settings("u", &[]).await;
    let b = srv.book("u", action(Command::Idle, None, None)).await;
    srv.dispatch().await;
    assert_eq!(srv.get("u", &b.action_id).await.state, St::Completed as i32);
}

#[tokio::test]
async fn scheduler_active_is_refused_at_the_first_push_and_fails_at_dispatch_when_it_appears_later()
{
    let srv = TestServer::start().await;
    srv.sim_device("n", &[("native_scheduler_active", "true")])
        .await;
    // CreateDevice observed the device: the very first push without
    // CANCEL_AND_REPLACE is refused up front, with the native rows.
    for strategy in [S::Unspecified, S::QueueAfter] {
        for a in [
            action(Command::Charge, None, None),
            window(Command::Charge, H, 2 * H),
        ] {
            let st = srv.refused(push("n", a, strategy)).await;
            expect_error(&st, Code::FailedPrecondition, "SCHEDULER_ACTIVE");
            let detail = details(&st).scheduler.expect("SchedulerDetail");
            assert_eq!(detail.rows.len(), 1);
            assert_eq!(detail.rows[0].owner, pb::NativeRowOwner::Foreign as i32);
            assert_eq!(detail.strategies, [S::CancelAndReplace as i32]);
        }
    }
    let dev = srv.get_device("n").await;
    assert!(dev.observed_state.unwrap().scheduler_active);

    // A scheduler switched on after a push was booked fails that action at
    // dispatch. UpdateDevice observes the new configuration at once.
    srv.sim_device("m", &[]).await;
    let a = srv.book("m", window(Command::Charge, H, 2 * H)).await;
    srv.set_settings("m", &[("native_scheduler_active", "true")])
        .await;
    assert!(
        srv.get_device("m")
            .await
            .observed_state
            .expect("observed on update")
            .scheduler_active
    );
    srv.at_secs(H);
    srv.dispatcher().drain().await.unwrap();
    let f = srv.get("m", &a.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "SCHEDULER_ACTIVE")
    );
}

#[tokio::test]
async fn cancel_and_replace_authorises_clearing_the_native_scheduler() {
    let srv = TestServer::start().await;
    srv.sim_device("n", &[("native_scheduler_active", "true")])
        .await;
    srv.dispatch().await; // observe: the scheduler is on
    let charge = window(Command::Charge, H, 2 * H);
    let a = srv.pushed(push("n", charge, S::CancelAndReplace)).await;
    srv.dispatch_at(H).await;
    assert_eq!(srv.get("n", &a.action_id).await.state, St::Active as i32);
    assert_eq!(mode(&srv, "n"), "CHARGE");
    let dev = srv.get_device("n").await;
    assert!(
        !dev.observed_state.unwrap().scheduler_active,
        "cleared, and observed so"
    );
    // Later pushes are no longer refused up front.
    srv.book("n", window(Command::Idle, 3 * H, 4 * H)).await;
}

#[tokio::test]
async fn claimed_work_is_next_due_when_its_lease_runs_out() {
    let (srv, _) = booked_on_b(window(Command::Charge, H, 2 * H)).await;
    let store = &srv.app.store;
    assert_eq!(
        store.next_due().await.unwrap(),
        Some(Ts((switchyard_tests::T0 + H) * SEC))
    );
    srv.at_secs(H);
    assert_eq!(claim_due(&srv).await.len(), 1);
    // Due since H, but held: a dispatcher sleeps until the lease lapses
    // instead of spinning on it.
    assert_eq!(
        store.next_due().await.unwrap(),
        Some(Ts((switchyard_tests::T0 + H + 120) * SEC))
    );
}

#[tokio::test]
async fn one_outcome_that_cannot_be_recorded_does_not_lose_the_others() {
    let (srv, a) = booked_on_b(action(Command::Charge, None, None)).await;
    let jobs = claim_due(&srv).await;
    assert_eq!(jobs.len(), 1);
    let mut ghost = jobs[0].clone();
    ghost.action.id = switchyard::domain::ActionId::generate();
    let applied = || switchyard::store::Finish::Applied {
        raw: "ok".into(),
        verified: true,
        memo: None,
    };
    srv.app
        .store
        .finish_many(vec![(ghost, applied()), (jobs[0].clone(), applied())])
        .await
        .unwrap();
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Completed as i32);
}

#[tokio::test]
async fn a_forced_delete_waits_for_an_owed_revert() {
    let (srv, a) = booked_on_b(window(Command::Charge, H, 2 * H)).await;
    srv.dispatch_at(H).await;
    srv.cancel("b", &a.action_id).await;
    assert_eq!(mode(&srv, "b"), "CHARGE", "the revert has not run yet");
    let delete = || pb::DeleteDeviceRequest {
        device_id: "b".into(),
        force: true,
        ..Default::default()
    };
    let st = srv.devices().delete_device(delete()).await.unwrap_err();
    let d = expect_error(&st, Code::FailedPrecondition, "DEVICE_HAS_ACTIVE_ACTIONS");
    assert!(d.meta("in_flight_action_ids").contains(&a.action_id));
    // Once reverted, the forced delete goes through.
    srv.dispatch().await;
    assert_ne!(mode(&srv, "b"), "CHARGE");
    srv.devices().delete_device(delete()).await.unwrap();
}

/// The background loop over `srv`, polling at most every `poll`; stops
/// when the returned sender is dropped or fires.
fn run_loop(
    srv: &TestServer,
    poll: std::time::Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    switchyard::dispatch::Dispatcher,
) {
    let config = switchyard::dispatch::DispatchConfig {
        poll,
        ..Default::default()
    };
    let d = switchyard::server::dispatcher(&srv.app, config);
    let probe = d.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(d.run(async {
        let _ = stopped.await;
    }));
    (stop, task, probe)
}

/// Waits (bounded, in real time) until the loop has completed `n` rounds.
async fn until_rounds(d: &switchyard::dispatch::Dispatcher, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while d.rounds() < n {
        assert!(std::time::Instant::now() < deadline, "the loop is stuck");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Waits (bounded, in real time) until the action is in `want`.
async fn until_state(srv: &TestServer, device: &str, id: &str, want: St) -> pb::Action {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = srv.get(device, id).await;
        if a.state == want as i32 {
            return a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {want:?} after 10 s: {a:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_loop_applies_an_immediate_push_at_once_when_woken() {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[("latency_ms", "0")]).await;
    // A poll far longer than the test, and the push only once the loop has
    // finished its first round and gone to sleep: only the push's wake-up
    // can explain the action being applied.
    let (stop, task, probe) = run_loop(&srv, std::time::Duration::from_secs(3600));
    until_rounds(&probe, 1).await;
    let a = srv
        .book("b", action(Command::AutoReserve, None, None))
        .await;
    until_state(&srv, "b", &a.action_id, St::Completed).await;
    assert_eq!(mode(&srv, "b"), "AUTO_RESERVE");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A push due before the loop's next look wakes it; one due after does
/// not (the look finds it; a wake would cost a claim transaction).
#[tokio::test]
async fn the_loop_is_woken_only_for_work_due_before_its_next_look() {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[("latency_ms", "0")]).await;
    srv.sim_device("c", &[("latency_ms", "0")]).await;
    // Asleep for an hour after its first round.
    let (stop, task, probe) = run_loop(&srv, std::time::Duration::from_secs(3600));
    until_rounds(&probe, 1).await;
    // Due in two hours: after the next look, so no wake.
    srv.book("c", window(Command::Charge, 2 * H, 3 * H)).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(probe.rounds(), 1, "woken for work its next look finds");
    // Due in a second: long before the next look, so woken, and applied.
    let a = srv.book("b", window(Command::Charge, 1, H)).await;
    srv.at_secs(1);
    until_state(&srv, "b", &a.action_id, St::Active).await;
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn the_loop_applies_at_the_start_and_reverts_at_the_end() {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[("latency_ms", "0")]).await;
    srv.sim_device("c", &[("latency_ms", "0")]).await;
    let (stop, task, _) = run_loop(&srv, std::time::Duration::from_millis(20));
    let a = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    // Once a later immediate push is done, the loop has had its chance at
    // the windowed one: still waiting for its start.
    let marker = srv
        .book("c", action(Command::AutoReserve, None, None))
        .await;
    until_state(&srv, "c", &marker.action_id, St::Completed).await;
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Scheduled as i32);

    srv.at_secs(H);
    until_state(&srv, "b", &a.action_id, St::Active).await;
    assert_eq!(mode(&srv, "b"), "CHARGE");
    srv.at_secs(2 * H);
    until_state(&srv, "b", &a.action_id, St::Completed).await;
    assert_eq!(mode(&srv, "b"), "AUTO_BALANCED");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// The loop claims work ahead of its start (here 5 s ahead, within the
/// horizon); told to stop before the start, it lets the claim go, so
/// another dispatcher takes the work up at once rather than after the
/// lease; nothing was started.
#[tokio::test]
async fn a_stopping_loop_lets_go_of_work_it_claimed_ahead() {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[]).await;
    let a = srv.book("b", window(Command::Charge, 5, H)).await;
    let (stop, task, probe) = run_loop(&srv, std::time::Duration::from_millis(20));
    until_rounds(&probe, 2).await;
    let now = srv.clock_now();
    let store = &srv.app.store;
    stop.send(()).unwrap();
    task.await.unwrap();
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Scheduled as i32);
    assert_eq!(mode(&srv, "b"), "AUTO_BALANCED");
    let again = store
        .claim_ahead(now, now.plus_nanos(10 * SEC), 10, 60 * SEC)
        .await
        .unwrap();
    assert_eq!(
        again
            .jobs
            .iter()
            .map(|j| j.action.id.to_string())
            .collect::<Vec<_>>(),
        vec![a.action_id.clone()],
        "let go when the loop stopped"
    );
}

#[tokio::test]
async fn a_driver_that_panics_fails_its_attempt_and_the_dispatcher_goes_on() {
    let srv = TestServer::start().await;
    srv.sim_device("p", &[("fail_mode", "panic")]).await;
    srv.sim_device("b", &[]).await;
    let bad = srv.book("p", action(Command::Charge, None, None)).await;
    let good = srv.book("b", action(Command::Charge, None, None)).await;
    // Both in one round: the panic costs only its own action.
    srv.dispatch().await;
    let f = srv.get("p", &bad.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "DRIVER_FAULT"),
        "{f:?}"
    );
    assert!(f.error_message.contains("panicked"), "{f:?}");
    assert_eq!(
        srv.get("b", &good.action_id).await.state,
        St::Completed as i32
    );
    // What the driver wrote before panicking is unknown: a revert is owed,
    // and until it is done the action holds its channel (a push is told to
    // retry: it settles by itself).
    let st = srv
        .refused(push(
            "p",
            action(Command::Idle, None, None),
            S::CancelAndReplace,
        ))
        .await;
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_IN_FLIGHT");
    assert!(d.retry.is_some(), "{st:?}");
    // (The owed revert panicked too, in the same drain: a failed try.)
    srv.set_settings("p", &[]).await;
    srv.dispatch_at(60).await;
    let reverted = srv.get("p", &bad.action_id).await;
    assert_eq!(
        (reverted.state, reverted.error_code.as_str()),
        (St::Failed as i32, "DRIVER_FAULT"),
        "still failed, and why: {reverted:?}"
    );
    assert!(reverted.error_message.contains("panicked"), "{reverted:?}");
    assert!(reverted.verified, "the revert was read back");
    srv.book("p", action(Command::Idle, None, None)).await;

    // A revert whose driver panics is a failed try: retried with backoff,
    // then REVERT_FAILED, like any revert that keeps failing.
    srv.sim_device("r", &[]).await;
    let w = srv.book("r", window(Command::Charge, H, 2 * H)).await;
    srv.dispatch_at(H).await;
    assert_eq!(srv.get("r", &w.action_id).await.state, St::Active as i32);
    srv.set_settings("r", &[("fail_mode", "panic")]).await;
    let mut now = 2 * H;
    let mut tries = 0;
    loop {
        srv.dispatch_at(now).await;
        tries += 1;
        let a = srv.get("r", &w.action_id).await;
        if a.state != St::Active as i32 {
            assert_eq!(
                (a.state, a.error_code.as_str()),
                (St::Failed as i32, "REVERT_FAILED"),
                "{a:?}"
            );
            break;
        }
        assert!(a.error_message.starts_with("retrying"), "{a:?}");
        assert!(tries < 20, "never gave up");
        now += 700; // past the longest backoff
    }
    assert_eq!(tries, 10, "every panic counted as one of the 10 tries");
    // The dispatcher still serves other work.
    let later = srv.book("b", action(Command::Idle, None, None)).await;
    srv.dispatch().await;
    assert_eq!(
        srv.get("b", &later.action_id).await.state,
        St::Completed as i32
    );
}

#[tokio::test]
async fn a_driver_call_that_outlives_half_the_lease_is_a_failed_try_not_a_stalled_round() {
    let srv = TestServer::start().await;
    srv.sim_device("slow", &[("latency_ms", "5000")]).await;
    srv.sim_device("b", &[]).await;
    let slow = srv.book("slow", action(Command::Charge, None, None)).await;
    let quick = srv.book("b", action(Command::Charge, None, None)).await;
    // A 2 s lease: a job gets 1 s before it is cut off.
    let d = switchyard::server::dispatcher(
        &srv.app,
        switchyard::dispatch::DispatchConfig {
            lease_nanos: 2 * SEC,
            ..Default::default()
        },
    );
    let started = std::time::Instant::now();
    d.run_due().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3),
        "the round took {took:?}"
    );
    let s = srv.get("slow", &slow.action_id).await;
    assert_eq!(s.state, St::Acknowledged as i32, "{s:?}");
    assert!(s.error_message.starts_with("retrying"), "{s:?}");
    assert!(s.error_message.contains("did not answer"), "{s:?}");
    assert_eq!(
        srv.get("b", &quick.action_id).await.state,
        St::Completed as i32
    );
}

#[tokio::test]
async fn a_cancelled_action_keeps_saying_why_through_retried_reverts() {
    let (srv, a) = booked_on_b(window(Command::Charge, H, 3 * H)).await;
    srv.dispatch_at(H).await;
    srv.set_settings("b", &[("fail_mode", "revert_fails")])
        .await;
    let c = srv.cancel("b", &a.action_id).await;
    assert_eq!(c.error_code, "CANCELLED_BY_CLIENT");
    let why = c.error_message.clone();
    // The early revert fails and is retried: the action still says it was
    // cancelled, and why (the failed tries are in oem_response).
    srv.dispatch().await;
    let retried = srv.get("b", &a.action_id).await;
    assert_eq!(retried.state, St::Cancelled as i32);
    assert_eq!(retried.error_message, why);
    assert!(
        retried.oem_response.contains("revert failed"),
        "{retried:?}"
    );
    srv.set_settings("b", &[]).await;
    srv.dispatch_at(H + 700).await;
    let done = srv.get("b", &a.action_id).await;
    assert_eq!(
        (done.state, done.error_message),
        (St::Cancelled as i32, why)
    );
}

/// The memos on record for device `b`.
async fn memos_of_b(srv: &TestServer) -> Vec<(String, String)> {
    srv.app
        .store
        .memos(
            &switchyard::domain::TenantId::default_tenant(),
            &switchyard::domain::DeviceId::parse("b").unwrap(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.action_id, a.memo))
        .collect()
}

#[tokio::test]
async fn a_drivers_memo_is_kept_from_the_first_write_until_the_revert() {
    use switchyard::store::Finish;
    let (srv, a) = booked_on_b(window(Command::Charge, 0, H)).await;
    let memo = |m: &str| Some(m.to_owned());
    // A try that failed after a write that may have landed: kept.
    let job = claim_due(&srv).await.remove(0);
    srv.app
        .store
        .finish(
            &job,
            Finish::Retry {
                due: srv.clock_now().plus_nanos(SEC),
                message: "lost answer".into(),
                raw: None,
                memo: memo("first"),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        memos_of_b(&srv).await,
        [(a.action_id.clone(), "first".into())]
    );
    // A later try that failed before writing keeps it; the apply replaces
    // it.
    srv.at_secs(2);
    let job = claim_due(&srv).await.remove(0);
    let retry = Finish::Retry {
        due: srv.clock_now().plus_nanos(SEC),
        message: "outage".into(),
        raw: None,
        memo: None,
    };
    srv.app.store.finish(&job, retry).await.unwrap();
    assert_eq!(memos_of_b(&srv).await.len(), 1);
    srv.at_secs(4);
    let job = claim_due(&srv).await.remove(0);
    let applied = Finish::Applied {
        raw: "ok".into(),
        verified: true,
        memo: memo("applied"),
    };
    srv.app.store.finish(&job, applied).await.unwrap();
    assert_eq!(
        memos_of_b(&srv).await,
        [(a.action_id.clone(), "applied".into())]
    );
    // The revert clears it.
    srv.at_secs(H);
    let job = claim_due(&srv).await.remove(0);
    let reverted = Finish::Reverted {
        raw: "ok".into(),
        verified: true,
    };
    srv.app.store.finish(&job, reverted).await.unwrap();
    assert!(memos_of_b(&srv).await.is_empty());
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Completed as i32);
}

#[tokio::test]
async fn a_final_failure_after_a_write_owes_a_revert_and_an_endless_action_keeps_no_memo() {
    use switchyard::store::Finish;
    let (srv, a) = booked_on_b(window(Command::Charge, 0, H)).await;
    let job = claim_due(&srv).await.remove(0);
    let retry = Finish::Retry {
        due: srv.clock_now().plus_nanos(SEC),
        message: "lost answer".into(),
        raw: None,
        memo: Some("written".into()),
    };
    srv.app.store.finish(&job, retry).await.unwrap();
    // The next try fails for good before writing: the earlier write may
    // still be in force, so a revert is owed at once, with the memo.
    srv.at_secs(2);
    let job = claim_due(&srv).await.remove(0);
    let failed = Finish::Failed {
        code: "OEM_REJECTED".into(),
        message: "refused".into(),
        raw: None,
        revert: false,
        memo: None,
    };
    srv.app.store.finish(&job, failed).await.unwrap();
    let f = srv.get("b", &a.action_id).await;
    assert_eq!(f.state, St::Failed as i32);
    let owed = claim_due(&srv).await;
    assert_eq!(owed.len(), 1, "a revert is owed");
    assert_eq!(owed[0].work, switchyard::domain::Work::Revert);
    assert_eq!(memos_of_b(&srv).await.len(), 1);

    // An action without an end is complete once applied: no memo kept.
    let (srv, b) = booked_on_b(action(Command::AutoBalanced, None, None)).await;
    let job = claim_due(&srv).await.remove(0);
    let applied = Finish::Applied {
        raw: "ok".into(),
        verified: true,
        memo: Some("never reverted".into()),
    };
    srv.app.store.finish(&job, applied).await.unwrap();
    assert_eq!(srv.get("b", &b.action_id).await.state, St::Completed as i32);
    assert!(memos_of_b(&srv).await.is_empty());
}

#[tokio::test]
async fn an_apply_cut_short_on_its_last_try_owes_a_revert() {
    let srv = TestServer::start().await;
    srv.sim_device("slow", &[("latency_ms", "5000")]).await;
    let slow = srv.book("slow", window(Command::Charge, 0, H)).await;
    // One try, a 2 s lease: the job is cut off after 1 s, for good.
    let d = switchyard::server::dispatcher(
        &srv.app,
        switchyard::dispatch::DispatchConfig {
            lease_nanos: 2 * SEC,
            max_apply_attempts: 1,
            ..Default::default()
        },
    );
    d.run_due().await.unwrap();
    let f = srv.get("slow", &slow.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "OEM_UNAVAILABLE"),
        "{f:?}"
    );
    // It may have written part of the command: a revert is owed at once.
    let owed = claim_due(&srv).await;
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[0].work, switchyard::domain::Work::Revert);
}

#[tokio::test]
async fn a_revert_that_failed_for_good_is_not_owed_again_though_its_memo_stays() {
    use switchyard::store::Finish;
    let (srv, a) = booked_on_b(window(Command::Charge, 0, H)).await;
    let job = claim_due(&srv).await.remove(0);
    let applied = Finish::Applied {
        raw: "ok".into(),
        verified: true,
        memo: Some("written".into()),
    };
    srv.app.store.finish(&job, applied).await.unwrap();
    srv.at_secs(H);
    let job = claim_due(&srv).await.remove(0);
    let failed = Finish::Failed {
        code: "REVERT_FAILED".into(),
        message: "kept failing".into(),
        raw: None,
        revert: false,
        memo: None,
    };
    srv.app.store.finish(&job, failed).await.unwrap();
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Failed as i32);
    assert!(claim_due(&srv).await.is_empty(), "REVERT_FAILED stands");
    assert_eq!(
        memos_of_b(&srv).await.len(),
        1,
        "what may be in force stays on record"
    );
}

#[tokio::test]
async fn a_dispatcher_that_lost_its_claim_cannot_apply_what_another_took_over() {
    let srv = TestServer::start().await;
    srv.sim_device("b", &[]).await;
    let a = srv.book("b", action(Command::Charge, None, None)).await;
    // A dispatcher claims the apply, then stalls past its lease before its
    // driver call goes out.
    let stalled = claim_due(&srv).await.remove(0);
    assert_eq!(stalled.fence, 1);
    srv.clock.advance(121 * SEC);
    // Another dispatcher takes the work over (a newer fencing token) and
    // applies it.
    switchyard::server::dispatcher(&srv.app, switchyard::dispatch::DispatchConfig::default())
        .run_due()
        .await
        .unwrap();
    assert_eq!(srv.get("b", &a.action_id).await.state, St::Completed as i32);
    // The stalled dispatcher's call lands late, with its old token: the
    // device refuses it; its outcome is recorded nowhere.
    let device = srv
        .app
        .store
        .get_device(
            &switchyard::domain::TenantId::default_tenant(),
            &stalled.action.device_id,
        )
        .await
        .unwrap();
    let driver = srv
        .app
        .registry
        .get("simulated")
        .unwrap()
        .build(&device.spec())
        .unwrap();
    let late = switchyard_drivers::ApplyRequest {
        action_id: stalled.action.id.to_string(),
        command: stalled.action.command,
        params: stalled.action.params,
        start: stalled.action.start.to_jiff(),
        end: None,
        clear_native_scheduler: false,
        live: Vec::new(),
        memo: None,
        fence: stalled.fence,
    };
    let err = driver.apply(&late).await.unwrap_err();
    assert_eq!(
        err.kind,
        switchyard_drivers::ErrorKind::StaleFence,
        "{err:?}"
    );
    let failed = switchyard::store::Finish::Failed {
        code: err.code().to_owned(),
        message: err.message.clone(),
        raw: None,
        revert: false,
        memo: None,
    };
    srv.app.store.finish(&stalled, failed).await.unwrap();
    let (applies, stale) = srv.sim.applies("b", &a.action_id);
    assert_eq!(
        (applies, stale),
        (1, 1),
        "applied once; the stale call refused"
    );
    let done = srv.get("b", &a.action_id).await;
    assert_eq!(
        done.state,
        St::Completed as i32,
        "the late outcome changed nothing"
    );
    assert!(done.error_code.is_empty(), "{done:?}");
}
