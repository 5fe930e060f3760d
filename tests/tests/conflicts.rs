//! The conflict rules and strategies of SPEC §4, end to end over gRPC.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use switchyard_proto::v1::{self as pb, ActionState, Command, ConflictStrategy as S};
use switchyard_tests::{TestServer, action, at, details, expect_error, push, window};
use tonic::Code;

const H: i64 = 3600;

/// A server with battery `b`, and on it CHARGE booked from 1 h to 2 h and
/// IDLE from 2 h to 3 h.
async fn back_to_back() -> (TestServer, pb::Action, pb::Action) {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    let a2 = srv.book("b", window(Command::Idle, 2 * H, 3 * H)).await;
    (srv, a1, a2)
}

#[tokio::test]
async fn collision_without_strategy_is_rejected_listing_every_collider() {
    let (srv, a1, a2) = back_to_back().await;
    let _far = srv.book("b", window(Command::Idle, 10 * H, 11 * H)).await;

    let clash = window(Command::Discharge, H + 600, 2 * H + 600);
    let st = srv.refused(push("b", clash, S::Unspecified)).await;
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_CONFLICT");
    assert_eq!(d.meta("device_id"), "b");
    assert_eq!(
        d.meta("conflicting_action_ids"),
        format!("{},{}", a1.action_id, a2.action_id)
    );
    let c = d.conflict.expect("ConflictDetail");
    let ids: Vec<_> = c.conflicts.iter().map(|x| x.action_id.clone()).collect();
    assert_eq!(ids, [a1.action_id, a2.action_id]);
    assert_eq!(c.conflicts[0].state, ActionState::Scheduled as i32);
    assert_eq!(c.conflicts[0].command, Command::Charge as i32);
    assert_eq!(c.conflicts[0].channel, "mode");
    assert_eq!(c.conflicts[0].start_time, Some(at(H)));
    assert_eq!(c.conflicts[0].end_time, Some(at(2 * H)));
    assert_eq!(
        c.strategies,
        [S::CancelAndReplace as i32, S::QueueAfter as i32]
    );
    assert!(c.in_flight_action_ids.is_empty());
    // Nothing was booked by the refused push.
    assert_eq!(srv.list("b").await.len(), 3);
}

#[tokio::test]
async fn back_to_back_windows_other_channels_and_other_devices_coexist() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    srv.battery("c").await;
    srv.create_device("ev", pb::DeviceFamily::EvCharger).await;
    srv.book("b", window(Command::Charge, H, 2 * H)).await;
    srv.book("b", window(Command::Discharge, 2 * H, 3 * H))
        .await;
    srv.book("b", window(Command::Idle, 0, H)).await;
    srv.book("c", window(Command::Charge, H, 2 * H)).await;
    // An EV charger's power limit has its own channel: it combines with CHARGE.
    srv.book("ev", window(Command::Charge, H, 2 * H)).await;
    let mut limit = window(Command::EvPowerLimit, H, 2 * H);
    limit.power = Some(pb::Quantity {
        value: 7.4,
        unit: pb::Unit::Kilowatt as i32,
    });
    let r = srv.book("ev", limit).await;
    assert_eq!(r.channel, "power_limit");
}

#[tokio::test]
async fn cancel_and_replace_cancels_colliders_atomically_and_records_the_replacement() {
    let (srv, a1, a2) = back_to_back().await;
    let keep = srv.book("b", window(Command::Idle, 5 * H, 6 * H)).await;

    let replacement = window(Command::Discharge, H, 3 * H);
    let r = srv
        .push_ok(push("b", replacement, S::CancelAndReplace))
        .await;
    let new = r.action.as_ref().expect("action");
    assert_eq!(new.state, ActionState::Scheduled as i32);
    let cancelled: Vec<_> = r
        .cancelled_actions
        .iter()
        .map(|a| a.action_id.clone())
        .collect();
    assert_eq!(cancelled, [a1.action_id.clone(), a2.action_id.clone()]);
    for a in &r.cancelled_actions {
        assert_eq!(a.state, ActionState::Cancelled as i32);
        assert_eq!(a.replaced_by_action_id, new.action_id);
        assert_eq!(a.error_code, "REPLACED");
    }
    assert_eq!(
        srv.get("b", &a1.action_id).await.state,
        ActionState::Cancelled as i32
    );
    assert_eq!(
        srv.get("b", &keep.action_id).await.state,
        ActionState::Scheduled as i32
    );

    // The audit trail holds both transitions.
    let a1_id = switchyard::domain::ActionId::parse(&a1.action_id).unwrap();
    let history = srv
        .app
        .store
        .action_history(&srv.app.tenant(), &a1_id)
        .await
        .unwrap();
    assert_eq!(
        history,
        [
            (None, "SCHEDULED".to_owned(), "PUSHED".to_owned()),
            (
                Some("SCHEDULED".to_owned()),
                "CANCELLED".to_owned(),
                "REPLACED".to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn in_flight_colliders_cannot_be_replaced_and_no_cancel_strategy_is_offered() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    // An immediate push is accepted as ACKNOWLEDGED (in flight).
    let now = srv
        .book("b", action(Command::Charge, None, Some(2 * H)))
        .await;
    assert_eq!(now.state, ActionState::Acknowledged as i32);
    assert_eq!(now.start_time, Some(at(0)));

    let discharge = || window(Command::Discharge, H, 3 * H);
    for strategy in [S::Unspecified, S::CancelAndReplace] {
        let st = srv.refused(push("b", discharge(), strategy)).await;
        assert_eq!(st.code(), Code::FailedPrecondition);
        let d = details(&st);
        assert_eq!(d.reason(), "ACTION_IN_FLIGHT", "{strategy:?}");
        assert_eq!(d.meta("in_flight_action_ids"), now.action_id);
        let c = d.conflict.unwrap();
        assert_eq!(c.in_flight_action_ids, [now.action_id.as_str()]);
        assert_eq!(
            c.strategies,
            [S::QueueAfter as i32],
            "only QUEUE_AFTER can resolve it"
        );
    }
    assert_eq!(
        srv.get("b", &now.action_id).await.state,
        ActionState::Acknowledged as i32
    );

    // QUEUE_AFTER still works against an in-flight action with an end.
    let q = srv.push_ok(push("b", discharge(), S::QueueAfter)).await;
    let a = q.action.unwrap();
    assert_eq!(
        (a.start_time, a.end_time),
        (Some(at(2 * H)), Some(at(4 * H)))
    );
    assert_eq!(q.queued_after_action_ids, [now.action_id]);
}

#[tokio::test]
async fn queue_after_moves_the_start_past_every_collision_keeping_duration() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    let a2 = srv
        .book("b", window(Command::Idle, 2 * H + 600, 3 * H))
        .await;

    let late = window(Command::Discharge, H + 60, 2 * H + 60);
    let r = srv.push_ok(push("b", late, S::QueueAfter)).await;
    let a = r.action.as_ref().unwrap();
    assert_eq!(
        a.start_time,
        Some(at(3 * H)),
        "a 1 h window does not fit in the 10 min gap"
    );
    assert_eq!(a.end_time, Some(at(4 * H)));
    assert_eq!(a.state, ActionState::Scheduled as i32);
    assert_eq!(r.queued_after_action_ids, [a1.action_id, a2.action_id]);
    assert_eq!(a.queued_after_action_ids, r.queued_after_action_ids);
    assert!(r.cancelled_actions.is_empty());
}

#[tokio::test]
async fn queue_after_is_refused_against_open_ended_actions_with_its_own_reason() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let open = srv
        .book("b", action(Command::AutoBalanced, Some(H), None))
        .await;
    let later = window(Command::Charge, 5 * H, 6 * H);
    let st = srv.refused(push("b", later, S::QueueAfter)).await;
    let d = expect_error(&st, Code::FailedPrecondition, "OPEN_ENDED_CONFLICT");
    assert_eq!(d.meta("open_ended_action_ids"), open.action_id);
    assert_eq!(d.conflict.unwrap().strategies, [S::CancelAndReplace as i32]);
    // Before the open-ended start there is room.
    srv.book("b", window(Command::Charge, 0, H)).await;
}

#[tokio::test]
async fn validate_only_answers_what_the_push_would_do_and_changes_nothing() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = srv.book("b", window(Command::Charge, H, 2 * H)).await;

    let mut probe = push(
        "b",
        window(Command::Discharge, H, 2 * H),
        S::CancelAndReplace,
    );
    probe.validate_only = true;
    let r = srv.push_ok(probe.clone()).await;
    assert_eq!(
        r.action.as_ref().unwrap().action_id,
        "",
        "no id: nothing was booked"
    );
    assert_eq!(r.cancelled_actions[0].action_id, a1.action_id);
    assert_eq!(r.cancelled_actions[0].state, ActionState::Cancelled as i32);
    assert_eq!(
        srv.get("b", &a1.action_id).await.state,
        ActionState::Scheduled as i32
    );

    probe.on_conflict = S::QueueAfter as i32;
    let r = srv.push_ok(probe.clone()).await;
    assert_eq!(r.action.as_ref().unwrap().start_time, Some(at(2 * H)));
    assert_eq!(r.queued_after_action_ids, [a1.action_id]);

    probe.on_conflict = S::Unspecified as i32;
    let st = srv.refused(probe).await;
    assert_eq!(details(&st).reason(), "ACTION_CONFLICT");

    assert_eq!(srv.list("b").await.len(), 1, "validate_only booked nothing");
}

#[tokio::test]
async fn cancelled_actions_stop_holding_their_channel() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    srv.cancel("b", &a1.action_id).await;
    srv.book("b", window(Command::Discharge, H, 2 * H)).await;
}

#[tokio::test]
async fn only_a_collision_that_settles_by_itself_carries_retry_info() {
    let srv = TestServer::start().await;
    srv.sim_device("c", &[]).await;
    srv.sim_device("a", &[]).await;
    let stopped = srv.book("c", window(Command::Charge, H, 3 * H)).await;
    let later = srv.book("c", window(Command::Idle, 4 * H, 5 * H)).await;
    let running = srv.book("a", window(Command::Charge, H, 3 * H)).await;
    srv.dispatch_at(H).await;
    for (device, a) in [("c", &stopped), ("a", &running)] {
        assert_eq!(
            srv.get(device, &a.action_id).await.state,
            ActionState::Active as i32
        );
    }
    // Stopped while ACTIVE: its revert is owed until the next dispatch,
    // and it holds its channel until then.
    let c = srv.cancel("c", &stopped.action_id).await;
    assert_eq!(c.state, ActionState::Cancelled as i32);

    // Only that settling action in the way: the same push will pass once
    // it is reverted, so the client is told when to retry.
    let clash = || {
        push(
            "c",
            window(Command::Discharge, H + 600, 2 * H),
            S::Unspecified,
        )
    };
    let st = srv.refused(clash()).await;
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_IN_FLIGHT");
    let delay = d
        .retry
        .as_ref()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo with a delay");
    assert!(delay.seconds > 0 || delay.nanos > 0, "{delay:?}");
    let cd = d.conflict.as_ref().expect("ConflictDetail");
    assert_eq!(cd.conflicts.len(), 1);
    assert_eq!(cd.conflicts[0].action_id, stopped.action_id);
    assert_eq!(cd.conflicts[0].state, ActionState::Cancelled as i32);
    assert_eq!(cd.in_flight_action_ids, [stopped.action_id.as_str()]);
    assert_eq!(d.meta("in_flight_action_ids"), stopped.action_id);

    // An ACTIVE collider does not go away by itself: no RetryInfo.
    let st = srv
        .refused(push(
            "a",
            window(Command::Discharge, H + 600, 2 * H),
            S::Unspecified,
        ))
        .await;
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_IN_FLIGHT");
    assert!(d.retry.is_none(), "{:?}", d.retry);
    let cd = d.conflict.expect("ConflictDetail");
    assert_eq!(cd.conflicts[0].action_id, running.action_id);
    assert_eq!(cd.conflicts[0].state, ActionState::Active as i32);

    // The settling action and a SCHEDULED one, without a strategy: the
    // SCHEDULED one still blocks after the revert, so no RetryInfo.
    let both = push(
        "c",
        window(Command::Discharge, 2 * H, 4 * H + 600),
        S::Unspecified,
    );
    let st = srv.refused(both.clone()).await;
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_IN_FLIGHT");
    assert!(d.retry.is_none(), "{:?}", d.retry);
    let cd = d.conflict.expect("ConflictDetail");
    let listed: Vec<_> = cd
        .conflicts
        .iter()
        .map(|x| (x.action_id.clone(), x.state))
        .collect();
    assert_eq!(
        listed,
        [
            (stopped.action_id.clone(), ActionState::Cancelled as i32),
            (later.action_id.clone(), ActionState::Scheduled as i32),
        ]
    );
    // With CANCEL_AND_REPLACE only the settling one blocks (the SCHEDULED
    // one would be replaced): retrying that is useful.
    let mut replace = both.clone();
    replace.on_conflict = S::CancelAndReplace as i32;
    let st = srv.refused(replace.clone()).await;
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_IN_FLIGHT");
    assert!(d.retry.is_some(), "only a settling action blocks it");
    assert_eq!(
        srv.list("c").await.len(),
        2,
        "nothing was booked or replaced"
    );

    // The revert done, each answer proves right.
    srv.dispatch().await;
    let ok = srv.pushed(clash()).await;
    assert_eq!(ok.state, ActionState::Scheduled as i32);
    let st = srv.refused(both).await;
    expect_error(&st, Code::FailedPrecondition, "ACTION_CONFLICT");
    let r = srv.push_ok(replace).await;
    assert_eq!(
        r.cancelled_actions
            .iter()
            .map(|a| a.action_id.as_str())
            .collect::<Vec<_>>(),
        [later.action_id.as_str()]
    );
}
