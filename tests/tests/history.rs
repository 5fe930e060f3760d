//! ActionService.ListActionHistory: an action's recorded transitions,
//! oldest first, through pushes, strategies, dispatch and reverts.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use switchyard_proto::v1::{
    self as pb, ActionState as St, Command, ConflictStrategy as S,
    action_service_client::ActionServiceClient,
};
use switchyard_tests::{T0, TestServer, expect_error, push, window};
use tonic::{Code, transport::Channel};

const H: i64 = 3600;

async fn history(
    c: &mut ActionServiceClient<Channel>,
    a: &pb::Action,
    page_size: i32,
) -> Vec<pb::ActionTransition> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_action_history(pb::ListActionHistoryRequest {
                device_id: a.device_id.clone(),
                action_id: a.action_id.clone(),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.transitions.len() <= page_size as usize);
        out.extend(page.transitions);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

fn steps(ts: &[pb::ActionTransition]) -> Vec<(St, St, &str, &str)> {
    ts.iter()
        .map(|t| {
            (
                St::try_from(t.from_state).unwrap(),
                St::try_from(t.to_state).unwrap(),
                t.reason.as_str(),
                t.error_code.as_str(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actions_history_is_each_transition_oldest_first() {
    let s = TestServer::start().await;
    s.battery("h1").await;
    let mut c = s.actions();
    let mut first = push("h1", window(Command::Charge, H, 2 * H), S::Unspecified);
    first.request_id = "req-first".into();
    let first = c
        .push_action(first)
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    s.at_secs(60);
    let second = c
        .push_action(push(
            "h1",
            window(Command::Discharge, H, 2 * H),
            S::CancelAndReplace,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    s.dispatch_at(H).await;
    s.dispatch_at(2 * H).await;
    let now = c
        .get_action(pb::GetActionRequest {
            device_id: "h1".into(),
            action_id: second.action_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.state, St::Completed as i32, "{now:?}");

    let replaced = history(&mut c, &first, 50).await;
    assert_eq!(
        steps(&replaced),
        [
            (St::Unspecified, St::Scheduled, "PUSHED", ""),
            (St::Scheduled, St::Cancelled, "REPLACED", "REPLACED"),
        ]
    );
    assert_eq!(replaced[0].request_id, "req-first");
    assert_eq!(replaced[0].time.unwrap().seconds, T0);
    assert_eq!(replaced[1].time.unwrap().seconds, T0 + 60);
    assert_eq!(replaced[1].request_id, "");

    // One at a time, the same as all at once; the last is where it is now.
    let ran = history(&mut c, &second, 1).await;
    assert_eq!(ran, history(&mut c, &second, 1000).await);
    let states: Vec<(St, St)> = steps(&ran).iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(states.first().unwrap(), &(St::Unspecified, St::Scheduled));
    assert_eq!(states.last().unwrap().1 as i32, now.state);
    assert!(states.contains(&(St::Acknowledged, St::Active)), "{ran:?}");
    for w in ran.windows(2) {
        // Each starts where the one before ended, no earlier than it.
        assert_eq!(w[0].to_state, w[1].from_state, "{ran:?}");
        assert!(w[0].time.unwrap().seconds <= w[1].time.unwrap().seconds);
    }
    assert!(ran.iter().all(|t| t.error_code.is_empty()), "{ran:?}");

    // A page token is bound to its action.
    let page = c
        .list_action_history(pb::ListActionHistoryRequest {
            device_id: "h1".into(),
            action_id: second.action_id.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = c
        .list_action_history(pb::ListActionHistoryRequest {
            device_id: "h1".into(),
            action_id: first.action_id.clone(),
            page_size: 1,
            page_token: page.next_page_token,
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    // An action of another device, or none, is not found.
    s.battery("h2").await;
    for (device, action) in [
        ("h2", first.action_id.as_str()),
        ("h1", "01890a5d-ac96-774b-bcce-b302099a8057"),
    ] {
        let e = c
            .list_action_history(pb::ListActionHistoryRequest {
                device_id: device.into(),
                action_id: action.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
}

/// A failure's error code is on the transition that recorded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cancel_or_failure_carries_its_error_code() {
    let s = TestServer::start().await;
    s.battery("h3").await;
    let mut c = s.actions();
    let a = c
        .push_action(push(
            "h3",
            window(Command::Charge, H, 2 * H),
            S::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    let mut cancel = pb::CancelActionRequest {
        device_id: "h3".into(),
        action_id: a.action_id.clone(),
        ..Default::default()
    };
    cancel.request_id = "req-cancel".into();
    c.cancel_action(cancel).await.unwrap();
    let ts = history(&mut c, &a, 50).await;
    assert_eq!(
        steps(&ts),
        [
            (St::Unspecified, St::Scheduled, "PUSHED", ""),
            (
                St::Scheduled,
                St::Cancelled,
                "CANCELLED_BY_CLIENT",
                "CANCELLED_BY_CLIENT"
            ),
        ]
    );
    assert_eq!(ts[1].request_id, "req-cancel");
}
