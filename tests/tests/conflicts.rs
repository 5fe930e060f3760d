//! The conflict rules and strategies of SPEC §4, end to end over gRPC.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use switchyard_proto::v1::{self as pb, ActionState, Command, ConflictStrategy as S};
use switchyard_tests::{TestServer, action, at, details, push};
use tonic::Code;

const H: i64 = 3600;

async fn ok(srv: &TestServer, req: pb::PushActionRequest) -> pb::PushActionResponse {
    srv.actions()
        .push_action(req)
        .await
        .expect("push accepted")
        .into_inner()
}

async fn refused(srv: &TestServer, req: pb::PushActionRequest) -> tonic::Status {
    srv.actions()
        .push_action(req)
        .await
        .expect_err("push refused")
}

fn id(r: &pb::PushActionResponse) -> String {
    r.action.as_ref().expect("action").action_id.clone()
}

async fn state(srv: &TestServer, device: &str, action_id: &str) -> i32 {
    srv.actions()
        .get_action(pb::GetActionRequest {
            device_id: device.into(),
            action_id: action_id.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .state
}

#[tokio::test]
async fn collision_without_strategy_is_rejected_listing_every_collider() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    let a2 = ok(
        &srv,
        push(
            "b",
            action(Command::Idle, Some(2 * H), Some(3 * H)),
            S::Unspecified,
        ),
    )
    .await;
    let _far = ok(
        &srv,
        push(
            "b",
            action(Command::Idle, Some(10 * H), Some(11 * H)),
            S::Unspecified,
        ),
    )
    .await;

    let st = refused(
        &srv,
        push(
            "b",
            action(Command::Discharge, Some(H + 600), Some(2 * H + 600)),
            S::Unspecified,
        ),
    )
    .await;
    assert_eq!(st.code(), Code::FailedPrecondition);
    let d = details(&st);
    assert_eq!(d.reason(), "ACTION_CONFLICT");
    assert_eq!(d.meta("device_id"), "b");
    assert_eq!(
        d.meta("conflicting_action_ids"),
        format!("{},{}", id(&a1), id(&a2))
    );
    let c = d.conflict.expect("ConflictDetail");
    let ids: Vec<_> = c.conflicts.iter().map(|x| x.action_id.clone()).collect();
    assert_eq!(ids, [id(&a1), id(&a2)]);
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
    let list = srv
        .actions()
        .list_actions(pb::ListActionsRequest {
            device_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.actions.len(), 3);
}

#[tokio::test]
async fn back_to_back_windows_other_channels_and_other_devices_coexist() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    srv.battery("c").await;
    srv.create_device("ev", pb::DeviceFamily::EvCharger).await;
    ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    ok(
        &srv,
        push(
            "b",
            action(Command::Discharge, Some(2 * H), Some(3 * H)),
            S::Unspecified,
        ),
    )
    .await;
    ok(
        &srv,
        push("b", action(Command::Idle, Some(0), Some(H)), S::Unspecified),
    )
    .await;
    ok(
        &srv,
        push(
            "c",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    // An EV charger's power limit has its own channel: it combines with CHARGE.
    ok(
        &srv,
        push(
            "ev",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    let mut limit = action(Command::EvPowerLimit, Some(H), Some(2 * H));
    limit.power = Some(pb::Quantity {
        value: 7.4,
        unit: pb::Unit::Kilowatt as i32,
    });
    let r = ok(&srv, push("ev", limit, S::Unspecified)).await;
    assert_eq!(r.action.unwrap().channel, "power_limit");
}

#[tokio::test]
async fn cancel_and_replace_cancels_colliders_atomically_and_records_the_replacement() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    let a2 = ok(
        &srv,
        push(
            "b",
            action(Command::Idle, Some(2 * H), Some(3 * H)),
            S::Unspecified,
        ),
    )
    .await;
    let keep = ok(
        &srv,
        push(
            "b",
            action(Command::Idle, Some(5 * H), Some(6 * H)),
            S::Unspecified,
        ),
    )
    .await;

    let r = ok(
        &srv,
        push(
            "b",
            action(Command::Discharge, Some(H), Some(3 * H)),
            S::CancelAndReplace,
        ),
    )
    .await;
    let new_id = id(&r);
    assert_eq!(
        r.action.as_ref().unwrap().state,
        ActionState::Scheduled as i32
    );
    let cancelled: Vec<_> = r
        .cancelled_actions
        .iter()
        .map(|a| a.action_id.clone())
        .collect();
    assert_eq!(cancelled, [id(&a1), id(&a2)]);
    for a in &r.cancelled_actions {
        assert_eq!(a.state, ActionState::Cancelled as i32);
        assert_eq!(a.replaced_by_action_id, new_id);
        assert_eq!(a.error_code, "REPLACED");
    }
    assert_eq!(
        state(&srv, "b", &id(&a1)).await,
        ActionState::Cancelled as i32
    );
    assert_eq!(
        state(&srv, "b", &id(&keep)).await,
        ActionState::Scheduled as i32
    );

    // The audit trail holds both transitions.
    let a1_id = switchyard::domain::ActionId::parse(&id(&a1)).unwrap();
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
    let now = ok(
        &srv,
        push(
            "b",
            action(Command::Charge, None, Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    assert_eq!(
        now.action.as_ref().unwrap().state,
        ActionState::Acknowledged as i32
    );
    assert_eq!(now.action.as_ref().unwrap().start_time, Some(at(0)));

    for strategy in [S::Unspecified, S::CancelAndReplace] {
        let st = refused(
            &srv,
            push(
                "b",
                action(Command::Discharge, Some(H), Some(3 * H)),
                strategy,
            ),
        )
        .await;
        assert_eq!(st.code(), Code::FailedPrecondition);
        let d = details(&st);
        assert_eq!(d.reason(), "ACTION_IN_FLIGHT", "{strategy:?}");
        assert_eq!(d.meta("in_flight_action_ids"), id(&now));
        let c = d.conflict.unwrap();
        assert_eq!(c.in_flight_action_ids, [id(&now)]);
        assert_eq!(
            c.strategies,
            [S::QueueAfter as i32],
            "only QUEUE_AFTER can resolve it"
        );
    }
    assert_eq!(
        state(&srv, "b", &id(&now)).await,
        ActionState::Acknowledged as i32
    );

    // QUEUE_AFTER still works against an in-flight action with an end.
    let q = ok(
        &srv,
        push(
            "b",
            action(Command::Discharge, Some(H), Some(3 * H)),
            S::QueueAfter,
        ),
    )
    .await;
    let a = q.action.unwrap();
    assert_eq!(
        (a.start_time, a.end_time),
        (Some(at(2 * H)), Some(at(4 * H)))
    );
    assert_eq!(q.queued_after_action_ids, [id(&now)]);
}

#[tokio::test]
async fn queue_after_moves_the_start_past_every_collision_keeping_duration() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    let a2 = ok(
        &srv,
        push(
            "b",
            action(Command::Idle, Some(2 * H + 600), Some(3 * H)),
            S::Unspecified,
        ),
    )
    .await;

    let r = ok(
        &srv,
        push(
            "b",
            action(Command::Discharge, Some(H + 60), Some(2 * H + 60)),
            S::QueueAfter,
        ),
    )
    .await;
    let a = r.action.as_ref().unwrap();
    assert_eq!(
        a.start_time,
        Some(at(3 * H)),
        "a 1 h window does not fit in the 10 min gap"
    );
    assert_eq!(a.end_time, Some(at(4 * H)));
    assert_eq!(a.state, ActionState::Scheduled as i32);
    assert_eq!(r.queued_after_action_ids, [id(&a1), id(&a2)]);
    assert_eq!(a.queued_after_action_ids, r.queued_after_action_ids);
    assert!(r.cancelled_actions.is_empty());
}

#[tokio::test]
async fn queue_after_is_refused_against_open_ended_actions_with_its_own_reason() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let open = ok(
        &srv,
        push(
            "b",
            action(Command::AutoBalanced, Some(H), None),
            S::Unspecified,
        ),
    )
    .await;
    let st = refused(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(5 * H), Some(6 * H)),
            S::QueueAfter,
        ),
    )
    .await;
    assert_eq!(st.code(), Code::FailedPrecondition);
    let d = details(&st);
    assert_eq!(d.reason(), "OPEN_ENDED_CONFLICT");
    assert_eq!(d.meta("open_ended_action_ids"), id(&open));
    assert_eq!(d.conflict.unwrap().strategies, [S::CancelAndReplace as i32]);
    // Before the open-ended start there is room.
    ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(0), Some(H)),
            S::Unspecified,
        ),
    )
    .await;
}

#[tokio::test]
async fn validate_only_answers_what_the_push_would_do_and_changes_nothing() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;

    let mut probe = push(
        "b",
        action(Command::Discharge, Some(H), Some(2 * H)),
        S::CancelAndReplace,
    );
    probe.validate_only = true;
    let r = ok(&srv, probe.clone()).await;
    assert_eq!(
        r.action.as_ref().unwrap().action_id,
        "",
        "no id: nothing was booked"
    );
    assert_eq!(r.cancelled_actions[0].action_id, id(&a1));
    assert_eq!(r.cancelled_actions[0].state, ActionState::Cancelled as i32);
    assert_eq!(
        state(&srv, "b", &id(&a1)).await,
        ActionState::Scheduled as i32
    );

    probe.on_conflict = S::QueueAfter as i32;
    let r = ok(&srv, probe.clone()).await;
    assert_eq!(r.action.as_ref().unwrap().start_time, Some(at(2 * H)));
    assert_eq!(r.queued_after_action_ids, [id(&a1)]);

    probe.on_conflict = S::Unspecified as i32;
    let st = refused(&srv, probe).await;
    assert_eq!(details(&st).reason(), "ACTION_CONFLICT");

    let list = srv
        .actions()
        .list_actions(pb::ListActionsRequest {
            device_id: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.actions.len(), 1, "validate_only booked nothing");
}

#[tokio::test]
async fn cancelled_actions_stop_holding_their_channel() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a1 = ok(
        &srv,
        push(
            "b",
            action(Command::Charge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
    srv.actions()
        .cancel_action(pb::CancelActionRequest {
            device_id: "b".into(),
            action_id: id(&a1),
            ..Default::default()
        })
        .await
        .expect("cancel");
    ok(
        &srv,
        push(
            "b",
            action(Command::Discharge, Some(H), Some(2 * H)),
            S::Unspecified,
        ),
    )
    .await;
}
