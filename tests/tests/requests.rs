//! Bad input, cancel rules, etags and request_id idempotency over gRPC.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use switchyard::domain::TenantId;
use switchyard_proto::v1::{self as pb, ActionState, Command, ConflictStrategy as S};
use switchyard_tests::{TestServer, action, details, expect_error, push, window};
use tonic::Code;

const H: i64 = 3600;
const DAY: i64 = 86_400;

fn kw(v: f64) -> Option<pb::Quantity> {
    Some(pb::Quantity {
        value: v,
        unit: pb::Unit::Kilowatt as i32,
    })
}

#[tokio::test]
async fn bad_fields_are_invalid_argument_naming_each_field() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let cases: Vec<(pb::Action, &str, Vec<&str>)> = vec![
        (
            window(Command::Charge, 2 * H, H),
            "INVALID_WINDOW",
            vec!["action.end_time"],
        ),
        (
            window(Command::Charge, -60, H),
            "START_IN_PAST",
            vec!["action.start_time"],
        ),
        (
            action(Command::Charge, Some(31 * DAY), None),
            "START_BEYOND_HORIZON",
            vec!["action.start_time"],
        ),
        (
            action(Command::EvPowerLimit, Some(H), None),
            "UNSUPPORTED_COMMAND",
            vec!["action.command"],
        ),
        (
            action(Command::Unspecified, Some(H), None),
            "MISSING_FIELD",
            vec!["action.command"],
        ),
        (
            pb::Action {
                power: kw(6.0),
                ..action(Command::Charge, Some(H), None)
            },
            "PARAMETER_OUT_OF_RANGE",
            vec!["action.power.value"],
        ),
        (
            pb::Action {
                power: Some(pb::Quantity {
                    value: 50.0,
                    unit: pb::Unit::Percent as i32,
                }),
                ..action(Command::Charge, Some(H), None)
            },
            "UNSUPPORTED_UNIT",
            vec!["action.power.unit"],
        ),
        (
            pb::Action {
                power: kw(1.0),
                ..action(Command::AutoBalanced, Some(H), None)
            },
            "UNSUPPORTED_PARAMETER",
            vec!["action.power"],
        ),
        (
            pb::Action {
                power: kw(9.0),
                target_soc: Some(pb::Quantity {
                    value: 101.0,
                    unit: pb::Unit::Percent as i32,
                }),
                ..action(Command::Charge, Some(-1), Some(-2))
            },
            "START_IN_PAST",
            vec![
                "action.start_time",
                "action.end_time",
                "action.power.value",
                "action.target_soc.value",
            ],
        ),
    ];
    for (a, reason, fields) in cases {
        let st = srv.refused(push("b", a.clone(), S::Unspecified)).await;
        assert_eq!(st.code(), Code::InvalidArgument, "{a:?}: {st:?}");
        let d = details(&st);
        assert_eq!(d.reason(), reason, "{a:?}");
        assert_eq!(d.fields(), fields, "{a:?}");
        assert!(
            d.bad_request
                .unwrap()
                .field_violations
                .iter()
                .all(|v| !v.description.is_empty())
        );
    }
    // Nothing was booked by any of them.
    assert!(srv.list("b").await.is_empty());
}

#[tokio::test]
async fn missing_and_malformed_identifiers_and_unknown_resources() {
    let srv = TestServer::start().await;
    srv.battery("b").await;

    let st = srv.refused(pb::PushActionRequest::default()).await;
    expect_error(&st, Code::InvalidArgument, "MISSING_FIELD");
    let st = srv
        .refused(pb::PushActionRequest {
            device_id: "b".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(details(&st).fields(), ["action"]);
    let charge = || action(Command::Charge, Some(H), None);
    let st = srv.refused(push("nope", charge(), S::Unspecified)).await;
    expect_error(&st, Code::NotFound, "DEVICE_NOT_FOUND");
    assert_eq!(details(&st).meta("device_id"), "nope");
    let long_id = "x".repeat(10_000);
    let st = srv.refused(push(&long_id, charge(), S::Unspecified)).await;
    expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    let mut bad = push("b", charge(), S::Unspecified);
    bad.on_conflict = 99;
    let st = srv.refused(bad).await;
    assert_eq!(details(&st).fields(), ["on_conflict"]);
    let mut bad = push("b", charge(), S::Unspecified);
    bad.action
        .as_mut()
        .unwrap()
        .start_time
        .as_mut()
        .unwrap()
        .nanos = -5;
    let st = srv.refused(bad).await;
    assert_eq!(details(&st).reason(), "INVALID_WINDOW");
    let mut bad = push("b", charge(), S::Unspecified);
    bad.request_id = "r".repeat(129);
    let st = srv.refused(bad).await;
    assert_eq!(details(&st).fields(), ["request_id"]);

    let st = srv.get_err("b", "garbage").await;
    expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    let st = srv
        .get_err("b", "01900000-0000-7000-8000-000000000000")
        .await;
    expect_error(&st, Code::NotFound, "ACTION_NOT_FOUND");
    assert!(details(&st).resource.is_some());
}

#[tokio::test]
async fn an_action_is_not_found_under_another_device() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    srv.battery("c").await;
    let r = srv.book("b", action(Command::Charge, Some(H), None)).await;
    let st = srv.get_err("c", &r.action_id).await;
    assert_eq!(details(&st).reason(), "ACTION_NOT_FOUND");
}

#[tokio::test]
async fn cancel_rules_per_state_and_etag() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let mut a = srv.actions();
    let sched = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    let cancel = |id: &str, etag: &str| pb::CancelActionRequest {
        device_id: "b".into(),
        action_id: id.into(),
        etag: etag.into(),
        request_id: String::new(),
    };
    // A stale etag is ABORTED / ETAG_MISMATCH and changes nothing.
    let st = a
        .cancel_action(cancel(&sched.action_id, "a999"))
        .await
        .unwrap_err();
    expect_error(&st, Code::Aborted, "ETAG_MISMATCH");
    assert_eq!(details(&st).meta("current_etag"), sched.etag);

    let c = a
        .cancel_action(cancel(&sched.action_id, &sched.etag))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.state, ActionState::Cancelled as i32);
    assert_eq!(c.error_code, "CANCELLED_BY_CLIENT");
    assert_ne!(c.etag, sched.etag);

    // Already cancelled: answered as such, distinctly.
    let st = a
        .cancel_action(cancel(&sched.action_id, ""))
        .await
        .unwrap_err();
    expect_error(&st, Code::FailedPrecondition, "ACTION_ALREADY_CANCELLED");

    // In flight (ACKNOWLEDGED): not cancellable, and the state is named.
    let now = srv.book("b", action(Command::Idle, None, None)).await;
    let st = a
        .cancel_action(cancel(&now.action_id, ""))
        .await
        .unwrap_err();
    let d = expect_error(&st, Code::FailedPrecondition, "ACTION_NOT_CANCELLABLE");
    assert_eq!(d.meta("state"), "ACTION_STATE_ACKNOWLEDGED");
}

#[tokio::test]
async fn request_id_replays_the_original_answer_and_refuses_another_body() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let mut req = push("b", window(Command::Charge, H, 2 * H), S::Unspecified);
    req.request_id = "push-1".into();
    let first = srv.push_ok(req.clone()).await;
    let again = srv.push_ok(req.clone()).await;
    assert_eq!(first, again, "the replay is the original answer");

    assert_eq!(srv.list("b").await.len(), 1, "no second action");

    let mut other = req.clone();
    other.action.as_mut().unwrap().command = Command::Discharge as i32;
    let st = srv.refused(other).await;
    expect_error(&st, Code::FailedPrecondition, "REQUEST_ID_REUSED");
    assert!(details(&st).retry.is_none());
}

#[tokio::test]
async fn a_failed_request_releases_its_request_id() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let blocker = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    let mut req = push("b", window(Command::Discharge, H, 2 * H), S::Unspecified);
    req.request_id = "push-2".into();
    let st = srv.refused(req.clone()).await;
    assert_eq!(details(&st).reason(), "ACTION_CONFLICT");
    srv.cancel("b", &blocker.action_id).await;
    // The same request, same id, now succeeds: the conflict booked nothing.
    let ok = srv.pushed(req).await;
    assert_eq!(ok.state, ActionState::Scheduled as i32);
}

#[tokio::test]
async fn a_concurrent_duplicate_is_told_to_retry() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let mut req = push("b", window(Command::Charge, H, 2 * H), S::Unspecified);
    req.request_id = "push-3".into();
    // Another replica (or handler) holds the key, mid-request.
    let mut body = req.clone();
    body.request_id.clear();
    let claimed = srv
        .app
        .store
        .idem_begin(
            &TenantId::default_tenant(),
            "push-3",
            "PushAction",
            &prost::Message::encode_to_vec(&body),
        )
        .await
        .unwrap();
    assert!(matches!(claimed, switchyard::store::IdemBegin::Fresh(_)));
    let st = srv.refused(req.clone()).await;
    let d = expect_error(&st, Code::Aborted, "REQUEST_IN_PROGRESS");
    assert!(d.retry.is_some(), "RetryInfo says when");

    // An abandoned claim (its holder crashed) expires with its lease.
    srv.clock.advance(61 * 1_000_000_000);
    let ok = srv.pushed(req).await;
    assert_eq!(ok.state, ActionState::Scheduled as i32);
}

#[tokio::test]
async fn request_ids_are_kept_for_a_day() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let mut req = push(
        "b",
        window(Command::Charge, 2 * DAY, 2 * DAY + H),
        S::Unspecified,
    );
    req.request_id = "push-4".into();
    let first = srv.push_ok(req.clone()).await;
    srv.clock.advance((DAY - 60) * 1_000_000_000);
    let replay = srv.push_ok(req.clone()).await;
    assert_eq!(first, replay);
    srv.clock.advance(120 * 1_000_000_000);
    assert_eq!(srv.app.store.idem_sweep().await.unwrap(), 1);
    // After expiry the key is new again: the same body now collides with
    // the action it booked a day ago.
    let st = srv.refused(req).await;
    assert_eq!(details(&st).reason(), "ACTION_CONFLICT");
}

#[tokio::test]
async fn list_actions_filters_by_state_and_pages() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    srv.battery("c").await;
    let mut a = srv.actions();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = srv
            .book("b", window(Command::Charge, (i + 1) * H, (i + 2) * H))
            .await;
        ids.push(r.action_id);
    }
    srv.book("c", action(Command::Charge, Some(H), None)).await;
    srv.cancel("b", &ids[0]).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = a
            .list_actions(pb::ListActionsRequest {
                device_id: "b".into(),
                states: vec![ActionState::Scheduled as i32],
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.actions.len() <= 2);
        seen.extend(page.actions.into_iter().map(|x| x.action_id));
        if page.next_page_token.is_empty() {
            break;
        }
        // A token is bound to its filter.
        let st = a
            .list_actions(pb::ListActionsRequest {
                device_id: "b".into(),
                page_token: page.next_page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(details(&st).reason(), "INVALID_PAGE_TOKEN");
        token = page.next_page_token;
    }
    let expected: Vec<_> = ids[1..].iter().rev().cloned().collect();
    assert_eq!(seen, expected, "newest first, cancelled filtered out");

    assert_eq!(srv.list("-").await.len(), 6);
    let st = a
        .list_actions(pb::ListActionsRequest {
            device_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(details(&st).reason(), "DEVICE_NOT_FOUND");
}

#[tokio::test]
async fn a_read_only_device_accepts_no_commands() {
    let srv = TestServer::start().await;
    srv.create_device("pv", pb::DeviceFamily::SolarInverter)
        .await;
    let idle = action(Command::Idle, Some(H), None);
    let st = srv.refused(push("pv", idle, S::Unspecified)).await;
    assert_eq!(details(&st).reason(), "UNSUPPORTED_COMMAND");
}

#[tokio::test]
async fn storage_outage_is_unavailable_with_retry_info_never_a_conflict() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    srv.app.store.close().await;
    let charge = action(Command::Charge, Some(H), None);
    let st = srv.refused(push("b", charge, S::Unspecified)).await;
    let d = expect_error(&st, Code::Unavailable, "STORAGE_UNAVAILABLE");
    assert!(d.retry.is_some());
    let st = srv.get_device_err("b").await;
    assert_eq!(details(&st).reason(), "STORAGE_UNAVAILABLE");
}

#[tokio::test]
async fn a_request_that_outlived_its_lease_cannot_apply_after_a_retry_took_over() {
    use switchyard::store::{IdemBegin, IdemCommit};
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let tenant = TenantId::default_tenant();
    let store = &srv.app.store;
    let IdemBegin::Fresh(slow) = store
        .idem_begin(&tenant, "k", "PushAction", b"body")
        .await
        .unwrap()
    else {
        panic!("fresh")
    };
    srv.clock.advance(61 * 1_000_000_000);
    let IdemBegin::Fresh(retry) = store
        .idem_begin(&tenant, "k", "PushAction", b"body")
        .await
        .unwrap()
    else {
        panic!("an expired lease is taken over")
    };
    let device = switchyard::domain::DeviceId::parse("b").unwrap();
    let push_with = |claim: String| {
        let caps_app = srv.app.clone();
        let input = switchyard::domain::validate::PushInput {
            command: Some(switchyard::domain::Command::Idle),
            start: Some(switchyard::domain::Ts(
                (switchyard_tests::T0 + 40 * H) * 1_000_000_000,
            )),
            ..Default::default()
        };
        let horizon = srv.app.horizon_nanos;
        store.push(
            &tenant,
            &device,
            move |d, now| {
                let caps = caps_app.capabilities(d).unwrap();
                switchyard::domain::validate::validate_push(&input, &caps, now, horizon)
            },
            switchyard::domain::Strategy::Reject,
            false,
            Some(IdemCommit {
                request_id: "k".into(),
                claim,
                unwritten: None,
                at_ns: 0,
                encode: Box::new(|_| b"resp".to_vec()),
            }),
        )
    };
    let late = push_with(slow).await;
    assert!(
        matches!(
            late,
            Err(switchyard::domain::Error::RequestInProgress { .. })
        ),
        "{late:?}"
    );
    push_with(retry).await.expect("the retry applies");
    assert_eq!(srv.list("b").await.len(), 1, "applied once");
    assert_eq!(
        store
            .idem_begin(&tenant, "k", "PushAction", b"body")
            .await
            .unwrap(),
        IdemBegin::Replay(b"resp".to_vec())
    );
}

#[tokio::test]
async fn a_key_abandoned_by_a_crashed_request_is_free_for_any_body() {
    use switchyard::store::IdemBegin;
    let srv = TestServer::start().await;
    let tenant = TenantId::default_tenant();
    let store = &srv.app.store;
    assert!(matches!(
        store
            .idem_begin(&tenant, "k", "PushAction", b"one")
            .await
            .unwrap(),
        IdemBegin::Fresh(_)
    ));
    let err = store
        .idem_begin(&tenant, "k", "PushAction", b"two")
        .await
        .unwrap_err();
    assert!(
        matches!(err, switchyard::domain::Error::RequestIdReused { .. }),
        "bound while in progress"
    );
    srv.clock.advance(61 * 1_000_000_000);
    assert!(matches!(
        store
            .idem_begin(&tenant, "k", "PushAction", b"two")
            .await
            .unwrap(),
        IdemBegin::Fresh(_)
    ));
}

#[tokio::test]
async fn a_retried_conditional_cancel_learns_it_already_succeeded() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let a = srv.book("b", window(Command::Charge, H, 2 * H)).await;
    let req = pb::CancelActionRequest {
        device_id: "b".into(),
        action_id: a.action_id.clone(),
        etag: a.etag.clone(),
        request_id: String::new(),
    };
    srv.actions().cancel_action(req.clone()).await.unwrap();
    let st = srv.actions().cancel_action(req).await.unwrap_err();
    assert_eq!(details(&st).reason(), "ACTION_ALREADY_CANCELLED");
}

// ---- retries that echo output-only fields, cancel of finished actions,
// ---- validate_only and request_id

/// `a` with every output-only field set to a value the server never
/// returned for it, as a client sends when it echoes an Action it read
/// (or fills them in carelessly). Every field is named, so a new one must
/// be sorted here.
fn with_output_only_fields(a: pb::Action) -> pb::Action {
    let pb::Action {
        command,
        power,
        target_soc,
        reserve_soc,
        start_time,
        end_time,
        ..
    } = a;
    pb::Action {
        action_id: "01900000-0000-7000-8000-000000000001".into(),
        device_id: "some-other-device".into(),
        command,
        power,
        target_soc,
        reserve_soc,
        start_time,
        end_time,
        state: ActionState::Failed as i32,
        replaced_by_action_id: "01900000-0000-7000-8000-000000000002".into(),
        queued_after_action_ids: vec!["01900000-0000-7000-8000-000000000003".into()],
        error_code: "OEM_REJECTED".into(),
        error_message: "made up".into(),
        create_time: Some(switchyard_tests::at(-DAY)),
        update_time: Some(switchyard_tests::at(-H)),
        etag: "0badf00d-9".into(),
        channel: "power_limit".into(),
        oem_response: "{\"errno\":0}".into(),
        verified: true,
    }
}

#[tokio::test]
async fn a_retried_push_with_output_only_fields_filled_in_is_the_same_request() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let mut req = push(
        "b",
        pb::Action {
            power: kw(2.5),
            target_soc: Some(pb::Quantity {
                value: 80.0,
                unit: pb::Unit::Percent as i32,
            }),
            ..window(Command::Charge, H, 2 * H)
        },
        S::Unspecified,
    );
    req.request_id = "echo-1".into();
    let first = srv.push_ok(req.clone()).await;
    let booked = first.action.clone().unwrap();

    // Made-up output-only values, and the booked action exactly as the
    // server answered it (its own output-only values).
    let mut filled = req.clone();
    filled.action = Some(with_output_only_fields(req.action.clone().unwrap()));
    let mut echoed = req.clone();
    echoed.action = Some(booked.clone());
    for (what, retry) in [("filled", filled), ("echoed", echoed)] {
        let again = srv
            .actions()
            .push_action(retry)
            .await
            .unwrap_or_else(|st| panic!("{what}: the same request: {st:?}"))
            .into_inner();
        assert_eq!(again, first, "{what}: the original answer");
        assert_eq!(again.action.unwrap().action_id, booked.action_id);
    }
    let listed = srv.list("b").await;
    assert_eq!(listed.len(), 1, "booked once");
    assert_eq!(listed[0].action_id, booked.action_id);

    // A field the server reads makes it another request.
    let mut later_end = req.clone();
    later_end.action.as_mut().unwrap().end_time = Some(switchyard_tests::at(3 * H));
    let mut more_power = req.clone();
    more_power.action.as_mut().unwrap().power = kw(3.0);
    let mut strategy = req.clone();
    strategy.on_conflict = S::QueueAfter as i32;
    for (what, other) in [
        ("end_time", later_end),
        ("power", more_power),
        ("on_conflict", strategy),
    ] {
        let st = srv.refused(other).await;
        let d = expect_error(&st, Code::FailedPrecondition, "REQUEST_ID_REUSED");
        assert_eq!(d.meta("request_id"), "echo-1", "{what}");
        assert_eq!(d.meta("first_method"), "PushAction", "{what}");
    }
    assert_eq!(srv.list("b").await.len(), 1, "still booked once");
}

#[tokio::test]
async fn completed_and_failed_actions_are_not_cancellable_and_the_state_is_named() {
    let srv = TestServer::start().await;
    srv.sim_device("ok", &[]).await;
    srv.sim_device("bad", &[("fail_mode", "reject")]).await;
    let done = srv
        .book("ok", action(Command::AutoReserve, None, None))
        .await;
    let failed = srv
        .book("bad", action(Command::AutoReserve, None, None))
        .await;
    assert_eq!(done.state, ActionState::Acknowledged as i32);
    srv.dispatch().await;
    let done = srv.get("ok", &done.action_id).await;
    assert_eq!(done.state, ActionState::Completed as i32);
    let failed = srv.get("bad", &failed.action_id).await;
    assert_eq!(failed.state, ActionState::Failed as i32);
    assert_eq!(failed.error_code, "OEM_REJECTED");

    for (device, a, state) in [
        ("ok", &done, "ACTION_STATE_COMPLETED"),
        ("bad", &failed, "ACTION_STATE_FAILED"),
    ] {
        // With its current etag and without one: the state refuses it.
        for etag in [a.etag.clone(), String::new()] {
            let st = srv
                .actions()
                .cancel_action(pb::CancelActionRequest {
                    device_id: device.into(),
                    action_id: a.action_id.clone(),
                    etag,
                    request_id: String::new(),
                })
                .await
                .unwrap_err();
            let d = expect_error(&st, Code::FailedPrecondition, "ACTION_NOT_CANCELLABLE");
            assert_eq!(d.meta("state"), state);
            assert_eq!(d.meta("device_id"), device);
            assert_eq!(d.meta("action_id"), a.action_id);
            let p = d.precondition.expect("PreconditionFailure");
            assert_eq!(p.violations[0].r#type, "ACTION_NOT_CANCELLABLE");
            assert_eq!(
                p.violations[0].subject,
                format!("devices/{device}/actions/{}", a.action_id)
            );
            assert!(d.retry.is_none());
        }
        assert_eq!(&srv.get(device, &a.action_id).await, a, "unchanged");
    }
}

#[tokio::test]
async fn validate_only_with_a_request_id_leaves_no_idempotency_record() {
    use switchyard::store::IdemBegin;
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let mut probe = push("b", window(Command::Charge, H, 2 * H), S::Unspecified);
    probe.validate_only = true;
    probe.request_id = "vo-1".into();
    let answered = srv.push_ok(probe.clone()).await;
    assert_eq!(answered.action.unwrap().action_id, "", "nothing booked");
    assert!(srv.list("b").await.is_empty());

    // The store holds nothing under the key: a claim for another method
    // and body is fresh (a completed or running key would bind its body).
    let tenant = TenantId::default_tenant();
    let store = &srv.app.store;
    match store
        .idem_begin(&tenant, "vo-1", "CancelAction", b"another body")
        .await
    {
        Ok(IdemBegin::Fresh(claim)) => store.idem_abort(&tenant, "vo-1", &claim).await.unwrap(),
        other => panic!("validate_only left a record under its request_id: {other:?}"),
    }

    // A real push with another body may take the key.
    let mut real = push(
        "b",
        window(Command::Discharge, 3 * H, 4 * H),
        S::Unspecified,
    );
    real.request_id = "vo-1".into();
    let booked = srv.pushed(real.clone()).await;
    assert_eq!(booked.state, ActionState::Scheduled as i32);
    assert_eq!(
        srv.push_ok(real).await.action.unwrap(),
        booked,
        "now it replays"
    );

    // And validate_only neither reads nor takes a key that is held: it
    // answers for its own body, without an id.
    let answered = srv.push_ok(probe).await;
    let a = answered.action.unwrap();
    assert_eq!(
        (a.action_id.as_str(), a.command),
        ("", Command::Charge as i32)
    );
    assert_eq!(srv.list("b").await.len(), 1);
}
