//! EventService.WatchEvents: every transition, in commit order, resumable
//! from a cursor with no gap and no duplicate, on SQLite and across
//! PostgreSQL replicas; a cursor older than the retention is refused.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::HashSet, time::Duration};

use switchyard::domain::Ts;
use switchyard_proto::v1::{
    self as pb, Command, ConflictStrategy as S, EventType as E,
    action_service_client::ActionServiceClient, device_service_client::DeviceServiceClient,
    event_service_client::EventServiceClient,
};
use switchyard_tests::{
    Seed, ServerProcess, TestServer, battery_request, expect_error, keyed, postgres, push, window,
};
use tonic::{Code, Streaming, transport::Channel};

const H: i64 = 3600;
const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

async fn watch(channel: Channel, after: i64) -> Streaming<pb::Event> {
    EventServiceClient::new(channel)
        .watch_events(pb::WatchEventsRequest {
            after_cursor: after,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next `n` events, within 20 s.
async fn take(s: &mut Streaming<pb::Event>, n: usize) -> Vec<pb::Event> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events came: {out:?}", out.len()))
            .unwrap()
            .expect("the stream does not end");
        out.push(next);
    }
    out
}

/// The events without the action as read.
fn bare(events: &[pb::Event]) -> Vec<pb::Event> {
    events
        .iter()
        .map(|e| pb::Event {
            action: None,
            ..e.clone()
        })
        .collect()
}

fn increasing(events: &[pb::Event]) {
    for w in events.windows(2) {
        assert!(w[0].cursor < w[1].cursor, "{:?} then {:?}", w[0], w[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_is_an_event_in_order_and_a_watch_resumes_exactly() {
    let s = TestServer::start().await;
    let mut from_start = watch(s.channel.clone(), 0).await;
    s.battery("w1").await;
    let mut c = s.actions();
    let first = c
        .push_action(push(
            "w1",
            window(Command::Charge, H, 2 * H),
            S::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    let second = c
        .push_action(push(
            "w1",
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

    // Every transition of each action, as its history lists it.
    let mut expected = 1; // the device's creation
    let mut histories = Vec::new();
    for a in [&first, &second] {
        let h = c
            .list_action_history(pb::ListActionHistoryRequest {
                device_id: "w1".into(),
                action_id: a.action_id.clone(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .transitions;
        expected += h.len();
        histories.push((a.action_id.clone(), h));
    }
    let all = take(&mut from_start, expected).await;
    increasing(&all);
    assert_eq!(all[0].r#type, E::DeviceCreated as i32, "{:?}", all[0]);
    assert_eq!(all[0].device_id, "w1");
    for (id, h) in &histories {
        let mine: Vec<&pb::Event> = all.iter().filter(|e| &e.action_id == id).collect();
        assert_eq!(mine.len(), h.len(), "one event per transition of {id}");
        for (e, t) in mine.iter().zip(h) {
            assert_eq!(
                (e.from_state, e.to_state, &e.reason, &e.error_code),
                (t.from_state, t.to_state, &t.reason, &t.error_code)
            );
            assert_eq!(e.time, t.time);
            assert_eq!(e.action.as_ref().unwrap().action_id, *id);
        }
    }
    let types: Vec<i32> = all.iter().map(|e| e.r#type).collect();
    for t in [
        E::ActionScheduled,
        E::ActionCancelled,
        E::ActionAcknowledged,
        E::ActionActive,
        E::ActionCompleted,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?} in {types:?}");
    }
    let replaced = all
        .iter()
        .find(|e| e.r#type == E::ActionCancelled as i32)
        .unwrap();
    assert_eq!(replaced.error_code, "REPLACED");
    assert_eq!(replaced.action_id, first.action_id);

    // Resumed after any event: exactly the rest.
    for k in [0, 2, all.len() - 1] {
        let mut resumed = watch(s.channel.clone(), all[k].cursor).await;
        let rest = take(&mut resumed, all.len() - k - 1).await;
        // The action is as it stands when read: the first watch read some
        // while they were changing.
        assert_eq!(bare(&rest), bare(&all[k + 1..]));
        // And nothing more until something happens.
        assert!(
            tokio::time::timeout(Duration::from_millis(600), resumed.message())
                .await
                .is_err(),
            "an event more than there were"
        );
    }
    // Filters: one device, some types; from now.
    let mut only = EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            device_id: "w2".into(),
            event_types: vec![E::ActionScheduled as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut now = EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            from_now: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    s.battery("w2").await;
    let pushed = c
        .push_action(push(
            "w2",
            window(Command::Charge, 3 * H, 4 * H),
            S::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    let got = take(&mut only, 1).await;
    assert_eq!(got[0].action_id, pushed.action_id);
    let got = take(&mut now, 2).await;
    assert_eq!(got[0].r#type, E::DeviceCreated as i32);
    assert_eq!(got[1].action_id, pushed.action_id);
    assert!(got[0].cursor > all.last().unwrap().cursor);
    // Bad requests are typed.
    for bad in [
        pb::WatchEventsRequest {
            event_types: vec![0],
            ..Default::default()
        },
        pb::WatchEventsRequest {
            after_cursor: -1,
            ..Default::default()
        },
        pb::WatchEventsRequest {
            after_cursor: 3,
            from_now: true,
            ..Default::default()
        },
        // Past the newest event: never a cursor of this stream.
        pb::WatchEventsRequest {
            after_cursor: got[1].cursor + 1,
            ..Default::default()
        },
        pb::WatchEventsRequest {
            after_cursor: i64::MAX,
            ..Default::default()
        },
    ] {
        let field = if bad.event_types.is_empty() {
            "after_cursor"
        } else {
            "event_types"
        };
        let after = bad.after_cursor;
        let e = EventServiceClient::new(s.channel.clone())
            .watch_events(bad)
            .await
            .unwrap_err();
        let d = expect_error(&e, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(d.fields(), [field], "{after}");
        if after > got[1].cursor {
            assert!(
                e.message()
                    .contains(&format!("newest event ({})", got[1].cursor)),
                "names the newest: {e:?}"
            );
        }
    }
    // The newest cursor itself is where a caught-up watcher resumes.
    EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            after_cursor: got[1].cursor,
            ..Default::default()
        })
        .await
        .expect("resuming after the newest event");
}

/// Writers busy on many devices at once: a watch sees each change once,
/// in increasing cursors, and one cut off and resumed misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_writers_lose_no_event_and_repeat_none() {
    let s = TestServer::start().await;
    for d in 0..8 {
        s.battery(&format!("busy-{d}")).await;
    }
    let mut w = watch(s.channel.clone(), 0).await;
    let created = take(&mut w, 8).await;
    let mut tasks = Vec::new();
    for d in 0..8 {
        let mut c = s.actions();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let start = H + i * 600;
                c.push_action(push(
                    &format!("busy-{d}"),
                    window(Command::Charge, start, start + 600),
                    S::Unspecified,
                ))
                .await
                .unwrap();
            }
        }));
    }
    // Cut off part-way, then resumed from the last cursor seen.
    let mut seen = take(&mut w, 60).await;
    drop(w);
    let mut resumed = watch(s.channel.clone(), seen.last().unwrap().cursor).await;
    for t in tasks {
        t.await.unwrap();
    }
    seen.extend(take(&mut resumed, 200 - 60).await);
    increasing(&seen);
    let ids: HashSet<&str> = seen.iter().map(|e| e.action_id.as_str()).collect();
    assert_eq!(ids.len(), 200, "each push seen once");
    assert!(seen.iter().all(|e| e.r#type == E::ActionScheduled as i32));
    assert!(created[7].cursor < seen[0].cursor);
}

/// Battery `id`, with an action booked on it and cancelled (three
/// events: the device's creation, SCHEDULED, CANCELLED).
async fn booked_and_cancelled(s: &TestServer, id: &str) {
    s.battery(id).await;
    let mut c = s.actions();
    let a = c
        .push_action(push(id, window(Command::Charge, H, 2 * H), S::Unspecified))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    c.cancel_action(pb::CancelActionRequest {
        device_id: id.into(),
        action_id: a.action_id,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// 91 days on: the one cancelled action is forgotten with its trail.
async fn forget_after_91_days(s: &TestServer) {
    s.at_secs(91 * 86_400);
    let cut = Ts(s.clock_now().0 - 90 * 86_400 * Ts::SECOND);
    assert_eq!(s.app.store.prune_finished(cut, 100).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_behind_the_retention_is_told_where_to_resume() {
    let s = TestServer::start().await;
    let mut c = s.actions();
    booked_and_cancelled(&s, "old").await;
    let mut w = watch(s.channel.clone(), 0).await;
    let before = take(&mut w, 3).await;
    drop(w);
    forget_after_91_days(&s).await;
    for after in [before[0].cursor, before[2].cursor - 1] {
        let e = EventServiceClient::new(s.channel.clone())
            .watch_events(pb::WatchEventsRequest {
                after_cursor: after,
                ..Default::default()
            })
            .await
            .unwrap_err();
        let d = expect_error(&e, Code::FailedPrecondition, "CURSOR_EXPIRED");
        assert_eq!(d.meta("oldest_cursor"), before[2].cursor.to_string());
        assert_eq!(d.meta("after_cursor"), after.to_string());
    }
    // From the start is from the horizon: nothing before it is served,
    // not even the device's creation (the device is kept).
    let mut from_start = watch(s.channel.clone(), 0).await;
    // Resuming where it says works, and finds what is left.
    let mut w = watch(s.channel.clone(), before[2].cursor).await;
    c.push_action(push(
        "old",
        window(Command::Charge, 92 * 86_400, 92 * 86_400 + H),
        S::Unspecified,
    ))
    .await
    .unwrap();
    let next = take(&mut w, 1).await;
    assert_eq!(next[0].r#type, E::ActionScheduled as i32);
    assert_eq!(take(&mut from_start, 1).await, next);
    assert!(
        next[0].cursor > before[2].cursor,
        "a forgotten cursor given again"
    );
}

/// A watch from now on a tenant whose newest events were forgotten starts
/// after them, not before (where it would be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_now_after_retention_starts_after_the_forgotten() {
    let s = TestServer::start().await;
    let mut c = s.actions();
    booked_and_cancelled(&s, "quiet").await;
    forget_after_91_days(&s).await;
    // The horizon, as CURSOR_EXPIRED tells it, is past the newest event
    // left: a cursor up to it is no stranger, one past it is.
    let expired = EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            after_cursor: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let d = expect_error(&expired, Code::FailedPrecondition, "CURSOR_EXPIRED");
    let horizon: i64 = d.meta("oldest_cursor").parse().unwrap();
    let past = EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            after_cursor: horizon + 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let d = expect_error(&past, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(d.fields(), ["after_cursor"]);
    assert!(
        past.message()
            .contains(&format!("newest event ({horizon})")),
        "names the horizon: {past:?}"
    );
    EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            after_cursor: horizon,
            ..Default::default()
        })
        .await
        .expect("after the horizon");
    let mut now = EventServiceClient::new(s.channel.clone())
        .watch_events(pb::WatchEventsRequest {
            from_now: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let b = c
        .push_action(push(
            "quiet",
            window(Command::Charge, 92 * 86_400, 92 * 86_400 + H),
            S::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    let got = take(&mut now, 1).await;
    assert_eq!(got[0].action_id, b.action_id);
}

/// Shutting down ends every watch at once, answered UNAVAILABLE with
/// RetryInfo: the client resumes elsewhere, and the server does not wait
/// out its grace period for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_ends_watches_at_once() {
    let s = TestServer::start().await;
    let mut w = watch(s.channel.clone(), 0).await;
    let began = std::time::Instant::now();
    let stopping = tokio::spawn(s.stop());
    let end = tokio::time::timeout(Duration::from_secs(4), w.message())
        .await
        .expect("the watch ended")
        .unwrap_err();
    let d = expect_error(&end, Code::Unavailable, "SHUTTING_DOWN");
    assert!(end.message().contains("shutting down"), "{end:?}");
    assert!(d.retry.is_some());
    stopping.await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
}

/// A tenant sees only its own events, and only with `events:read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_watches_only_its_own_events() {
    let s = TestServer::start_with_keys(&Seed::keys(&[
        ("alpha", &["events:read", "devices:write", "actions:write"]),
        ("beta", &["events:read", "devices:write"]),
        ("beta", &["devices:read"]),
    ]))
    .await;
    let mut wa = watch_keyed(&s, &s.keys[0]).await;
    let mut wb = watch_keyed(&s, &s.keys[1]).await;
    let e = EventServiceClient::new(keyed(s.channel.clone(), &s.keys[2]))
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap_err();
    let d = expect_error(&e, Code::PermissionDenied, "MISSING_SCOPE");
    assert_eq!(d.meta("required_scope"), "events:read");
    for (key, id) in [
        (&s.keys[0], "a-1"),
        (&s.keys[1], "b-1"),
        (&s.keys[0], "shared"),
        (&s.keys[1], "shared"),
    ] {
        DeviceServiceClient::new(keyed(s.channel.clone(), key))
            .create_device(battery_request(id))
            .await
            .unwrap();
    }
    ActionServiceClient::new(keyed(s.channel.clone(), &s.keys[0]))
        .push_action(push(
            "a-1",
            window(Command::Charge, H, 2 * H),
            S::Unspecified,
        ))
        .await
        .unwrap();
    let a = take(&mut wa, 3).await;
    assert_eq!(
        a.iter().map(|e| e.device_id.as_str()).collect::<Vec<_>>(),
        ["a-1", "shared", "a-1"],
        "{a:?}"
    );
    let b = take(&mut wb, 2).await;
    assert_eq!(b[0].device_id, "b-1");
    assert_eq!(b[1].device_id, "shared");
    // A device filter is the tenant's device of that id.
    let mut shared = EventServiceClient::new(keyed(s.channel.clone(), &s.keys[1]))
        .watch_events(pb::WatchEventsRequest {
            device_id: "shared".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(take(&mut shared, 1).await[0].cursor, b[1].cursor);
    assert!(
        tokio::time::timeout(Duration::from_millis(600), shared.message())
            .await
            .is_err(),
        "beta's filter saw alpha's device"
    );
    // A revoked key's watch ends.
    let beta_key_id = s.keys[1][3..19].to_owned();
    s.app
        .store
        .revoke_key(&beta_key_id, None, s.clock_now())
        .await
        .unwrap()
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(6), wb.message())
        .await
        .expect("the revoked key's watch ended")
        .unwrap_err();
    let d = expect_error(&end, Code::Unauthenticated, "INVALID_API_KEY");
    assert_eq!(d.meta("why"), "revoked");
}

async fn watch_keyed(s: &TestServer, key: &str) -> Streaming<pb::Event> {
    EventServiceClient::new(keyed(s.channel.clone(), key))
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// Two PostgreSQL replicas written at once: a watch on one and a watch
/// resumed on the other see the same events, each once, in the same
/// order, with nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_postgres_stream_the_same_events_without_gaps() {
    let Some(db) = postgres::database().await else {
        return; // said loudly by the harness (and impossible under CI=true)
    };
    let (a, b) = (
        ServerProcess::spawn(BIN, &db.url),
        ServerProcess::spawn(BIN, &db.url),
    );
    let (ca, cb) = (a.channel().await, b.channel().await);
    let mut devices = DeviceServiceClient::new(ca.clone());
    for d in 0..6 {
        devices
            .create_device(battery_request(&format!("pg-{d}")))
            .await
            .unwrap();
    }
    let mut on_b = watch(cb.clone(), 0).await;
    // Both replicas write at once, six hours ahead (nothing is due).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut tasks = Vec::new();
    for d in 0..6 {
        let ch = if d % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            let mut c = ActionServiceClient::new(ch);
            for i in 0..20 {
                let start = now + 6 * H + i * 600;
                c.push_action(pb::PushActionRequest {
                    device_id: format!("pg-{d}"),
                    action: Some(pb::Action {
                        command: Command::Charge as i32,
                        start_time: Some(prost_types::Timestamp {
                            seconds: start,
                            nanos: 0,
                        }),
                        end_time: Some(prost_types::Timestamp {
                            seconds: start + 600,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    let mut seen = take(&mut on_b, 6 + 40).await;
    drop(on_b);
    // Resumed on the other replica.
    let mut on_a = watch(ca.clone(), seen.last().unwrap().cursor).await;
    for t in tasks {
        t.await.unwrap();
    }
    seen.extend(take(&mut on_a, 120 - 40).await);
    increasing(&seen);
    let ids: HashSet<&str> = seen[6..].iter().map(|e| e.action_id.as_str()).collect();
    assert_eq!(ids.len(), 120, "each push seen once");
    // Read again from the start on either replica: the very same stream.
    for ch in [ca, cb] {
        let mut again = watch(ch, 0).await;
        assert_eq!(bare(&take(&mut again, seen.len()).await), bare(&seen));
    }
    drop((a, b));
    db.drop_database().await;
}
