//! The storage contract: what every backend of [`Store`] must do, as one
//! named check per rule. A backend runs all of them with
//! [`storage_contract_suite!`](crate::storage_contract_suite), supplying a
//! fresh [`Fixture`] (an empty store on its own database) per check:
//!
//! ```text
//! switchyard::storage_contract_suite!(sqlite, sqlite_fixture().await);
//! ```
//!
//! A failure names the rule it broke. The checks speak only the store's
//! API, never SQL, so the same suite holds every backend to the same
//! contract.

// Checks, not service code: a broken rule fails loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{any::Any, collections::BTreeMap};

use super::{ActionQuery, Finish, IdemBegin, IdemCommit, Retarget, Store};
use crate::domain::{
    Action, ActionId, ActionState, Command, Device, DeviceId, Error, Family, ManualClock, Observed,
    Params, Strategy, TenantId, Ts, Work, validate::ValidPush,
};

/// An empty store on a database of its own, and the clock it reads.
pub struct Fixture {
    /// The store under test.
    pub store: Store,
    /// A second store on the same database, as another replica would open
    /// it (its own connections), reading the same clock.
    pub replica: Store,
    /// Its clock (starts at [`T0`]).
    pub clock: ManualClock,
    /// Whatever must live as long as the store (a temporary directory, a
    /// database to drop).
    pub keep: Box<dyn Any + Send + Sync>,
}

/// What a backend's fixture expression may give: a [`Fixture`], or
/// `Option<Fixture>` when the backend may be out of reach (the rule then
/// passes without running; the backend's harness must say so loudly).
pub trait IntoFixture {
    /// The fixture, if there is one.
    fn into_fixture(self) -> Option<Fixture>;
}

impl IntoFixture for Fixture {
    fn into_fixture(self) -> Option<Fixture> {
        Some(self)
    }
}

impl IntoFixture for Option<Fixture> {
    fn into_fixture(self) -> Option<Fixture> {
        self
    }
}

/// Checked after every rule: no action holds its channel while owing no
/// work (the conflict check looks for holders among owed rows), and none
/// owes work without holding its channel (PostgreSQL's exclusion
/// constraint covers the owed rows).
pub async fn holders_owe_work(f: &Fixture) {
    assert_eq!(
        f.store.holders_owing_nothing().await.unwrap(),
        0,
        "an action holds its channel but owes no work"
    );
    assert_eq!(
        f.store.owed_not_holding().await.unwrap(),
        0,
        "an action owes work but does not hold its channel"
    );
    assert_eq!(
        f.store.stamped_while_owed().await.unwrap(),
        0,
        "an action owes work but is stamped as finished"
    );
}

/// The fixtures' start time: 2030-01-01T00:00:00Z.
pub const T0: Ts = Ts(1_893_456_000 * Ts::SECOND);
const H: i64 = 3600 * Ts::SECOND;

fn tenant() -> TenantId {
    TenantId::default_tenant()
}

fn device_id(id: &str) -> DeviceId {
    DeviceId::parse(id).expect("a valid device id")
}

/// A simulated battery `id` as a fixture registers it (for backends'
/// own tests too).
pub fn device(id: &str) -> Device {
    Device {
        id: device_id(id),
        display_name: format!("device {id}"),
        family: Family::Battery,
        driver: "simulated".into(),
        oem_device_id: format!("oem-{id}"),
        timezone: "UTC".into(),
        settings: BTreeMap::from([("latency_ms".to_owned(), "0".to_owned())]).into(),
        revision: 0,
        created: Ts(0),
        updated: Ts(0),
        observed: None,
        incarnation: String::new(),
    }
}

async fn with_device(f: &Fixture, id: &str) -> Device {
    f.store
        .create_device(&tenant(), device(id), None)
        .await
        .expect("create_device")
}

fn window(start: i64, end: Option<i64>) -> ValidPush {
    ValidPush {
        command: Command::Charge,
        channel: "mode".into(),
        params: Params::default(),
        start: T0.plus_nanos(start),
        end: end.map(|e| T0.plus_nanos(e)),
        immediate: false,
    }
}

async fn push(
    f: &Fixture,
    id: &str,
    p: ValidPush,
    strategy: Strategy,
) -> Result<super::PushOutcome, Error> {
    f.store
        .push(
            &tenant(),
            &device_id(id),
            move |_, _| Ok(p.clone()),
            strategy,
            false,
            None,
        )
        .await
}

async fn get(f: &Fixture, id: &str, a: &Action) -> Action {
    get_id(f, id, &a.id).await
}

async fn get_id(f: &Fixture, id: &str, a: &ActionId) -> Action {
    f.store
        .get_action(&tenant(), &device_id(id), a)
        .await
        .expect("get_action")
}

/// Waits, 10 s at most, until `queued` requests have been queued to
/// `store`'s writers: how a check lines requests up, in order, behind a
/// held writer ([`Store::hold_writer`]).
pub async fn wait_queued(store: &Store, queued: u64) {
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while store.write_groups().queued < queued {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the requests are queued");
}

/// How many actions `tenant`'s device `id` has, read through `store`.
pub async fn actions_on(store: &Store, tenant: &TenantId, id: &str) -> usize {
    store
        .list_actions(
            tenant,
            ActionQuery {
                device: Some(&device_id(id)),
                states: &[],
                before: None,
                limit: 100,
            },
        )
        .await
        .expect("list_actions")
        .len()
}

/// A device reads back as created; its id is unique per tenant.
pub async fn a_device_round_trips_and_its_id_is_unique(f: &Fixture) {
    let created = with_device(f, "d1").await;
    assert_eq!(created.revision, 1);
    let read = f
        .store
        .get_device(&tenant(), &device_id("d1"))
        .await
        .expect("get_device");
    assert_eq!(read, created);
    assert_eq!(read.oem_device_id, "oem-d1");
    let again = f.store.create_device(&tenant(), device("d1"), None).await;
    assert!(
        matches!(again, Err(Error::DeviceAlreadyExists { .. })),
        "{again:?}"
    );
    let missing = f.store.get_device(&tenant(), &device_id("nope")).await;
    assert!(
        matches!(missing, Err(Error::DeviceNotFound { .. })),
        "{missing:?}"
    );
}

/// An update with a stale etag is refused and changes nothing; one with the
/// current etag advances the revision.
pub async fn a_stale_etag_changes_nothing(f: &Fixture) {
    let d = with_device(f, "d1").await;
    let stale = "stale-etag";
    let r = f
        .store
        .update_device(
            &tenant(),
            &d.id,
            Some(stale),
            |d| {
                d.display_name = "changed".into();
                Ok(Retarget::No)
            },
            None,
            None,
        )
        .await;
    assert!(matches!(r, Err(Error::EtagMismatch { .. })), "{r:?}");
    let etag = d.etag();
    let updated = f
        .store
        .update_device(
            &tenant(),
            &d.id,
            Some(&etag),
            |d| {
                d.display_name = "changed".into();
                Ok(Retarget::No)
            },
            None,
            None,
        )
        .await
        .expect("update_device");
    assert_eq!(
        (updated.revision, updated.display_name.as_str()),
        (2, "changed")
    );
    assert_ne!(updated.etag(), etag);
}

/// A push is stored as decided, SCHEDULED, and audited.
pub async fn a_push_round_trips_and_is_audited(f: &Fixture) {
    with_device(f, "d1").await;
    let out = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    let a = get(f, "d1", &out.action).await;
    assert_eq!(a, out.action);
    assert_eq!(a.state, ActionState::Scheduled);
    let history = f
        .store
        .action_history(&tenant(), &a.id)
        .await
        .expect("history");
    assert_eq!(
        history,
        vec![(None, "SCHEDULED".to_owned(), "PUSHED".to_owned())]
    );
}

/// A push under a request_id stores each value where it belongs: the
/// action as answered, field by field; its audit entry with its reason,
/// request_id and time; the key bound to its method and body, answered
/// with its encoded outcome (on PostgreSQL the three are written by one
/// statement, each numbering its placeholders on from the one before).
/// Text that reads as SQL (placeholders, quotes, a backslash) is stored
/// as given.
pub async fn a_push_under_a_request_id_stores_each_value_in_its_place(f: &Fixture) {
    use super::{IdemRequest, TransitionRecord, Written};
    use crate::domain::{Quantity, Unit, lifecycle};
    with_device(f, "d1").await;
    // Replaced by the push: its cancellation is audited under the
    // request_id too.
    let old = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    let request_id = r#"r$1 '$2' "$3" \$4 E'\'' $$5$$ -- /*"#;
    let body = br#"body $1 ' " \"#.to_vec();
    let answer = |o: &super::PushOutcome| format!("answer $1 ' {}", o.action.id).into_bytes();
    let params = Params {
        power: Some(Quantity {
            value: -2.5,
            unit: Unit::Kilowatt,
        }),
        target_soc: Some(Quantity {
            value: 80.0,
            unit: Unit::Percent,
        }),
        reserve_soc: Some(Quantity {
            value: 20.0,
            unit: Unit::Percent,
        }),
    };
    let (t, d1) = (tenant(), device_id("d1"));
    let send = |method: &'static str, body: Vec<u8>| {
        f.store.push_once(
            &t,
            &d1,
            move |_, _| {
                Ok(ValidPush {
                    command: Command::Discharge,
                    params,
                    ..window(H + H / 2, Some(3 * H))
                })
            },
            Strategy::CancelAndReplace,
            Some(IdemRequest {
                request_id: request_id.to_owned(),
                method,
                body,
                encode: std::sync::Arc::new(answer),
            }),
        )
    };
    let o = match send("PushAction", body.clone()).await {
        Ok(Written::Fresh(o)) => o,
        other => panic!("booked: {other:?}"),
    };
    assert_eq!(o.cancelled.len(), 1);
    assert_eq!(o.cancelled[0].id, old.action.id);
    assert_eq!(o.action.params, params);
    // The action, every field.
    assert_eq!(get(f, "d1", &o.action).await, o.action);
    // Its audit entry.
    let trail: Vec<TransitionRecord> = f
        .store
        .action_transitions(&tenant(), &o.action.id, None, 10)
        .await
        .expect("transitions");
    let seen: Vec<_> = trail
        .iter()
        .map(|t| {
            (
                t.from,
                t.to,
                t.reason.as_str(),
                t.request_id.as_deref(),
                t.at,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![(
            None,
            ActionState::Scheduled,
            lifecycle::push_reason(Strategy::CancelAndReplace, true, false),
            Some(request_id),
            T0
        )]
    );
    // The replaced action's trail: booked without a request_id, cancelled
    // under this one.
    let replaced = f
        .store
        .action_transitions(&tenant(), &old.action.id, None, 10)
        .await
        .expect("transitions");
    let ids: Vec<Option<&str>> = replaced.iter().map(|t| t.request_id.as_deref()).collect();
    assert_eq!(ids, vec![None, Some(request_id)]);
    assert!(replaced[0].seq < replaced[1].seq && replaced[1].seq < trail[0].seq);
    // The key: its answer, bound to the method and the body.
    assert_eq!(
        f.replica
            .idem_recorded(&tenant(), request_id, "PushAction", &body)
            .await
            .expect("recorded"),
        Some(answer(&o))
    );
    match send("PushAction", body.clone()).await {
        Ok(Written::Replayed(bytes)) => assert_eq!(bytes, answer(&o)),
        other => panic!("replayed: {other:?}"),
    }
    for (method, other) in [
        ("PushAction", b"another body".to_vec()),
        ("CancelAction", body.clone()),
    ] {
        match send(method, other).await {
            Err(Error::RequestIdReused { first_method, .. }) => {
                assert_eq!(first_method, "PushAction");
            }
            r => panic!("{method}: the key is bound to its method and body: {r:?}"),
        }
    }
    // The replay and the refusals wrote nothing.
    let stored = f
        .replica
        .list_actions(
            &tenant(),
            ActionQuery {
                device: Some(&device_id("d1")),
                states: &[],
                before: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
}

/// Overlapping holders of a channel collide with a typed conflict naming
/// the holder; back-to-back windows do not.
pub async fn overlapping_holders_collide(f: &Fixture) {
    with_device(f, "d1").await;
    let first = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    let clash = push(
        f,
        "d1",
        window(H + 60 * Ts::SECOND, Some(3 * H)),
        Strategy::Reject,
    )
    .await;
    match clash {
        Err(Error::Conflict(c)) => {
            assert_eq!(c.colliders.len(), 1);
            assert_eq!(c.colliders[0].id, first.action.id);
        }
        other => panic!("expected a conflict: {other:?}"),
    }
    push(f, "d1", window(2 * H, Some(3 * H)), Strategy::Reject)
        .await
        .expect("back to back");
    // Another device's channel is its own.
    with_device(f, "d2").await;
    push(f, "d2", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("another device");
}

/// Pushes that meet in one group commit (one transaction) are each
/// decided in order as if alone: one that collides with a booked action,
/// or with a push before it in the same group, is answered its conflict;
/// one that fails after it has written (its request_id's claim is not
/// held) is rolled back (PostgreSQL: to its savepoint; SQLite: with its
/// group, whose members are run again, it in a savepoint) and answered
/// its own error; the others are booked, and durable once answered.
pub async fn a_group_commits_its_successes_around_its_failures(f: &Fixture) {
    with_device(f, "d1").await;
    let first = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    let before = f.store.write_groups();
    // The writer is held inside a group while the pushes queue, so they
    // all join it.
    let (entered, inside) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel();
    let holder = f.store.clone();
    let hold = tokio::spawn(async move { holder.hold_writer("d1", entered, released).await });
    inside.await.expect("the writer is held");
    let windows = [
        // Collides with `first`, booked before the group.
        window(H + H / 2, Some(5 * H / 2)),
        // Free.
        window(3 * H, Some(4 * H)),
        // Collides with the one before it, in the same group.
        window(3 * H + H / 2, Some(9 * H / 2)),
        // Free.
        window(5 * H, Some(6 * H)),
        // Free, but its request_id's claim is lost: it fails after writing
        // its action and audit entry.
        window(7 * H, Some(8 * H)),
    ];
    let mut pushes = Vec::new();
    for (i, w) in windows.into_iter().enumerate() {
        let store = f.store.clone();
        let idem = (i == 4).then(|| IdemCommit {
            request_id: "lost-claim".into(),
            claim: "not-held".into(),
            unwritten: None,
            at_ns: 0,
            encode: Box::new(|_: &super::PushOutcome| b"answer".to_vec()),
        });
        pushes.push(tokio::spawn(async move {
            (
                i,
                store
                    .push(
                        &tenant(),
                        &device_id("d1"),
                        move |_, _| Ok(w.clone()),
                        Strategy::Reject,
                        false,
                        idem,
                    )
                    .await,
            )
        }));
        // Queued in this order: the third is decided after the second.
        let queued = before.queued + 2 + i as u64;
        wait_queued(&f.store, queued).await;
    }
    release.send(()).expect("the holder waits");
    // SQLite's members have no savepoints: the group is rolled back and
    // run again (the holder, run without the store's retries, is told to
    // run again), so the order the pushes are decided in is theirs anew.
    let rerun = f.store.backend() == sea_orm::DbBackend::Sqlite;
    let held = hold.await.unwrap();
    if rerun {
        assert!(matches!(held, Err(Error::StorageContention(_))), "{held:?}");
    } else {
        held.expect("the held member");
    }
    let mut results = Vec::new();
    for p in pushes {
        results.push(p.await.unwrap());
    }
    results.sort_by_key(|(i, _)| *i);
    let after = f.store.write_groups();
    if rerun {
        assert!(after.groups - before.groups >= 2, "run again: {after:?}");
    } else {
        assert_eq!(
            after.groups - before.groups,
            1,
            "one transaction: {after:?}"
        );
        assert_eq!(after.members - before.members, 6, "the holder and 5 pushes");
    }

    let booked: Vec<Action> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|o| o.action.clone()))
        .collect();
    match &results[0].1 {
        Err(Error::Conflict(c)) => assert_eq!(c.colliders[0].id, first.action.id),
        other => panic!("the first collides with the booked action: {other:?}"),
    }
    match (&results[1].1, &results[2].1) {
        (Ok(second), Err(Error::Conflict(c))) => {
            assert_eq!(c.colliders.len(), 1);
            assert_eq!(c.colliders[0].id, second.action.id);
        }
        // Run again, the third may be decided first.
        (Err(Error::Conflict(c)), Ok(third)) if rerun => {
            assert_eq!(c.colliders.len(), 1);
            assert_eq!(c.colliders[0].id, third.action.id);
        }
        other => panic!("the third collides with the second, in its group: {other:?}"),
    }
    assert!(results[3].1.is_ok(), "{:?}", results[3].1);
    assert!(
        matches!(results[4].1, Err(Error::RequestInProgress { .. })),
        "{:?}",
        results[4].1
    );
    assert_eq!(booked.len(), 2);
    // Durable and whole: another connection reads exactly what was booked.
    let mut stored: Vec<ActionId> = f
        .replica
        .list_actions(
            &tenant(),
            ActionQuery {
                device: Some(&device_id("d1")),
                states: &[],
                before: None,
                limit: 10,
            },
        )
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    stored.sort();
    let mut want: Vec<ActionId> = booked.iter().map(|a| a.id).collect();
    want.push(first.action.id);
    want.sort();
    assert_eq!(stored, want);
    for a in &booked {
        assert_eq!(
            f.replica
                .action_history(&tenant(), &a.id)
                .await
                .unwrap()
                .len(),
            1,
            "each booked push has its own audit entry"
        );
    }
}

/// A push under `request_id` (with `body`), or without one, as the API
/// sends it ([`Store::push_once`]).
async fn push_once(
    store: Store,
    tenant: TenantId,
    id: DeviceId,
    prepared: Result<ValidPush, Error>,
    strategy: Strategy,
    key: Option<(String, Vec<u8>)>,
) -> Result<super::Written<super::PushOutcome>, Error> {
    store
        .push_once(
            &tenant,
            &id,
            move |_, _| prepared.clone(),
            strategy,
            key.map(|(request_id, body)| super::IdemRequest {
                request_id,
                method: "PushAction",
                body,
                encode: std::sync::Arc::new(|o: &super::PushOutcome| {
                    o.action.id.to_string().into_bytes()
                }),
            }),
        )
        .await
}

/// Pushes queued together in one writer's lane (on PostgreSQL, decided
/// as a batch where they are on distinct devices under distinct
/// request_ids, ADR 0016) are each answered, and stored, exactly as if
/// they had run alone one after the other: a plain push and one moved by
/// QUEUE_AFTER are booked with their own audit entries and keys; a
/// refusal, a replay, a request_id bound to another body or being worked
/// on, a request its device refuses and a CANCEL_AND_REPLACE that
/// cancels are answered as alone; a device or a request_id met twice is
/// decided after the first; another tenant's device of the same id is its
/// own; a push whose caller went away before its turn is not run.
pub async fn pushes_queued_together_are_decided_as_if_alone(f: &Fixture) {
    use super::Written;
    let other = TenantId::from_stored("other-tenant".to_owned());
    // Devices whose writes queue in the lane of d1.
    let ids: Vec<String> = (2..400)
        .map(|i| format!("d{i}"))
        .filter(|d| f.store.same_lane("d1", d))
        .take(11)
        .collect();
    assert_eq!(ids.len(), 11, "devices in d1's lane");
    let d = |i: usize| {
        if i == 0 {
            "d1".to_owned()
        } else {
            ids[i - 1].clone()
        }
    };
    for i in 0..=11 {
        with_device(f, &d(i)).await;
    }
    // A request being worked on (a claim, as a server of an earlier
    // version held its key).
    assert!(matches!(
        f.store
            .idem_begin(&tenant(), "claimed", "PushAction", b"claimed")
            .await,
        Ok(IdemBegin::Fresh(_))
    ));
    f.store
        .create_device(&other, device("d1"), None)
        .await
        .expect("the other tenant's d1");
    let key = |k: &str, body: &[u8]| Some((k.to_owned(), body.to_vec()));
    let once = |t: &TenantId, i: usize, p: Result<ValidPush, Error>, s, k| {
        push_once(f.store.clone(), t.clone(), device_id(&d(i)), p, s, k)
    };
    let booked = window(H, Some(2 * H));
    // Booked before the group: what the pushes meet.
    let on_d2 = once(&tenant(), 1, Ok(booked.clone()), Strategy::Reject, None)
        .await
        .unwrap();
    let answered = once(
        &tenant(),
        2,
        Ok(window(5 * H, Some(6 * H))),
        Strategy::Reject,
        key("answered", b"body"),
    )
    .await
    .unwrap();
    let on_d4 = once(&tenant(), 3, Ok(booked.clone()), Strategy::Reject, None)
        .await
        .unwrap();
    let on_d5 = once(&tenant(), 4, Ok(booked.clone()), Strategy::Reject, None)
        .await
        .unwrap();
    once(
        &tenant(),
        5,
        Ok(window(7 * H, Some(8 * H))),
        Strategy::Reject,
        key("bound", b"first body"),
    )
    .await
    .unwrap();
    let Written::Fresh(answered) = answered else {
        panic!("fresh: {answered:?}")
    };
    let (Written::Fresh(on_d2), Written::Fresh(on_d4), Written::Fresh(on_d5)) =
        (on_d2, on_d4, on_d5)
    else {
        panic!("fresh pushes")
    };

    let before = f.store.write_groups();
    let (entered, inside) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel();
    let holder = f.store.clone();
    let hold = tokio::spawn(async move { holder.hold_writer("d1", entered, released).await });
    inside.await.expect("the writer is held");
    let overlap = window(H + H / 2, Some(5 * H / 2));
    let refused = Error::invalid(
        "start",
        crate::domain::Reason::InvalidWindow,
        "refused by its device",
    );
    let requests = vec![
        // 0: plain, under a key.
        (
            tenant(),
            0,
            Ok(booked.clone()),
            Strategy::Reject,
            key("k0", b"k0"),
        ),
        // 1: collides with d2's action.
        (
            tenant(),
            1,
            Ok(overlap.clone()),
            Strategy::Reject,
            key("k1", b"k1"),
        ),
        // 2: answered before: replays.
        (
            tenant(),
            2,
            Ok(window(5 * H, Some(6 * H))),
            Strategy::Reject,
            key("answered", b"body"),
        ),
        // 3: queued after d4's action.
        (
            tenant(),
            3,
            Ok(overlap.clone()),
            Strategy::QueueAfter,
            key("k3", b"k3"),
        ),
        // 4: replaces d5's action.
        (
            tenant(),
            4,
            Ok(overlap.clone()),
            Strategy::CancelAndReplace,
            key("k4", b"k4"),
        ),
        // 5: its request_id is bound to another body.
        (
            tenant(),
            5,
            Ok(booked.clone()),
            Strategy::Reject,
            key("bound", b"another body"),
        ),
        // 6: refused by its device.
        (
            tenant(),
            6,
            Err(refused.clone()),
            Strategy::Reject,
            key("k6", b"k6"),
        ),
        // 7: plain, no key.
        (tenant(), 7, Ok(booked.clone()), Strategy::Reject, None),
        // 8: another tenant's d1.
        (
            other.clone(),
            0,
            Ok(booked.clone()),
            Strategy::Reject,
            key("k0", b"k0"),
        ),
        // 9: d1 again: collides with 0.
        (
            tenant(),
            0,
            Ok(overlap.clone()),
            Strategy::Reject,
            key("k9", b"k9"),
        ),
        // 10: k0 again, on d9: replays 0.
        (
            tenant(),
            8,
            Ok(window(9 * H, Some(10 * H))),
            Strategy::Reject,
            key("k0", b"k0"),
        ),
        // 11: plain, in the first batch (behind 9 and 10, passed over).
        (
            tenant(),
            9,
            Ok(booked.clone()),
            Strategy::Reject,
            key("k11", b"k11"),
        ),
        // 12: its request_id is being worked on.
        (
            tenant(),
            10,
            Ok(booked.clone()),
            Strategy::Reject,
            key("claimed", b"claimed"),
        ),
        // 13: its caller goes away before its turn.
        (
            tenant(),
            11,
            Ok(booked.clone()),
            Strategy::Reject,
            key("k13", b"k13"),
        ),
    ];
    let mut pushes = Vec::new();
    for (n, (t, i, p, s, k)) in requests.into_iter().enumerate() {
        pushes.push(tokio::spawn(once(&t, i, p, s, k)));
        let queued = before.queued + 2 + n as u64;
        wait_queued(&f.store, queued).await;
    }
    let gone = pushes.pop().unwrap();
    gone.abort();
    let _ = gone.await;
    release.send(()).expect("the holder waits");
    let _ = hold.await.unwrap();
    let mut results = Vec::new();
    for p in pushes {
        results.push(p.await.unwrap());
    }
    let fresh = |n: usize| match &results[n] {
        Ok(Written::Fresh(o)) => o.clone(),
        other => panic!("{n}: booked: {other:?}"),
    };
    let first = fresh(0);
    assert_eq!(first.action.start, booked.start);
    match &results[1] {
        Err(Error::Conflict(c)) => assert_eq!(c.colliders[0].id, on_d2.action.id),
        other => panic!("1: collides: {other:?}"),
    }
    match &results[2] {
        Ok(Written::Replayed(b)) => assert_eq!(b, &answered.action.id.to_string().into_bytes()),
        other => panic!("2: replays: {other:?}"),
    }
    let queued = fresh(3);
    assert_eq!(queued.queued_after, vec![on_d4.action.id]);
    assert_eq!(queued.action.start, booked.end.unwrap());
    let replacing = fresh(4);
    assert_eq!(replacing.cancelled.len(), 1);
    assert_eq!(replacing.cancelled[0].id, on_d5.action.id);
    assert!(
        matches!(&results[5], Err(Error::RequestIdReused { .. })),
        "5: {:?}",
        results[5]
    );
    assert_eq!(results[6].as_ref().err(), Some(&refused), "6");
    let plain = fresh(7);
    let theirs = fresh(8);
    match &results[9] {
        Err(Error::Conflict(c)) => assert_eq!(c.colliders[0].id, first.action.id),
        other => panic!("9: collides with 0: {other:?}"),
    }
    match &results[10] {
        Ok(Written::Replayed(b)) => assert_eq!(b, &first.action.id.to_string().into_bytes()),
        other => panic!("10: replays 0: {other:?}"),
    }
    let last = fresh(11);
    assert!(
        matches!(&results[12], Err(Error::RequestInProgress { .. })),
        "12: {:?}",
        results[12]
    );

    // Stored as answered, each with its own audit entry and reason.
    for (o, t, reason) in [
        (&first, tenant(), "PUSHED"),
        (&queued, tenant(), "PUSHED_QUEUE_AFTER"),
        (&replacing, tenant(), "PUSHED_CANCEL_AND_REPLACE"),
        (&plain, tenant(), "PUSHED"),
        (&theirs, other.clone(), "PUSHED"),
        (&last, tenant(), "PUSHED"),
    ] {
        let stored = f
            .replica
            .get_action(&t, &o.action.device_id, &o.action.id)
            .await
            .expect("stored");
        assert_eq!(stored.start, o.action.start);
        assert_eq!(stored.state, ActionState::Scheduled);
        let history = f.replica.action_history(&t, &o.action.id).await.unwrap();
        assert_eq!(history.len(), 1, "{reason}: {history:?}");
        assert_eq!(history[0].2, reason);
    }
    assert_eq!(
        get(f, &d(4), &on_d5.action).await.state,
        ActionState::Cancelled
    );
    // The keys hold their answers: a retry replays each.
    for (n, t, i, k, o) in [
        (0, tenant(), 0, "k0", &first),
        (3, tenant(), 3, "k3", &queued),
        (8, other.clone(), 0, "k0", &theirs),
        (11, tenant(), 9, "k11", &last),
    ] {
        let again = once(
            &t,
            i,
            Ok(booked.clone()),
            Strategy::Reject,
            key(k, k.as_bytes()),
        )
        .await;
        match again {
            Ok(Written::Replayed(b)) => assert_eq!(b, o.action.id.to_string().into_bytes()),
            other => panic!("{n}: replays: {other:?}"),
        }
    }
    // Nothing of the push whose caller went away, nor of the refused.
    for i in [1, 5, 6, 10, 11] {
        let n = actions_on(&f.replica, &tenant(), &d(i)).await;
        let want = match i {
            1 | 5 => 1,
            _ => 0,
        };
        assert_eq!(n, want, "device {i}");
    }
    let after = f.store.write_groups();
    if f.store.backend() == sea_orm::DbBackend::Postgres {
        // Written by batches: 0, 3, 7, 8 and 11 (9 and 10, passed over as
        // a device and a key met before, run after them).
        assert_eq!(
            after.batched - before.batched,
            5,
            "batched: {before:?} → {after:?}"
        );
    } else {
        assert_eq!(after.batched, 0, "SQLite's one writer batches nothing");
    }
}

/// Requests on many devices, each sent at once to two replicas (on
/// PostgreSQL, where each replica's lanes decide pushes queued together
/// as batches, the two racing for the same keys and devices), are each
/// applied once: one replica answers it fresh, the other replays that
/// answer, and every device holds exactly the actions of its requests.
pub async fn requests_on_many_devices_sent_to_two_replicas_are_applied_once(f: &Fixture) {
    use super::Written;
    let devices = 16;
    for i in 0..devices {
        with_device(f, &format!("m{i}")).await;
    }
    // PostgreSQL: both replicas' writers are held while the requests
    // queue, so that each lane finds several queued at once. (SQLite's
    // one writer of a file cannot be held by two stores at once.)
    let mut holds = Vec::new();
    let mut releases = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    for i in 0..devices {
        let d = format!("m{i}");
        if f.store.backend() == sea_orm::DbBackend::Postgres
            && !keys.iter().any(|k| f.store.same_lane(k, &d))
        {
            keys.push(d);
        }
    }
    let before = (f.store.write_groups(), f.replica.write_groups());
    for store in [&f.store, &f.replica] {
        for k in &keys {
            let (entered, inside) = tokio::sync::oneshot::channel();
            let (release, released) = tokio::sync::oneshot::channel();
            let (store, k) = (store.clone(), k.clone());
            holds.push(tokio::spawn(async move {
                store.hold_writer(&k, entered, released).await
            }));
            inside.await.expect("the writer is held");
            releases.push(release);
        }
    }
    let per_device = 4;
    let mut sent = Vec::new();
    for round in 0..per_device {
        for i in 0..devices {
            let strategy = [Strategy::Reject, Strategy::QueueAfter][(i + round) % 2];
            let w = window((2 * round as i64 + 1) * H, Some((2 * round as i64 + 2) * H));
            let k = format!("many-{i}-{round}");
            let send = |store: Store| {
                push_once(
                    store,
                    tenant(),
                    device_id(&format!("m{i}")),
                    Ok(w.clone()),
                    strategy,
                    Some((k.clone(), k.clone().into_bytes())),
                )
            };
            let (a, b) = (send(f.store.clone()), send(f.replica.clone()));
            sent.push((k, tokio::spawn(a), tokio::spawn(b)));
        }
    }
    let holders = keys.len() as u64;
    let all = (devices * per_device) as u64;
    wait_queued(&f.store, before.0.queued + holders + all).await;
    wait_queued(&f.replica, before.1.queued + holders + all).await;
    for r in releases {
        r.send(()).expect("the holder waits");
    }
    for h in holds {
        // A holder may be told to run again (SQLite undoes a group).
        let _ = h.await.unwrap();
    }
    let mut ids = Vec::new();
    for (k, a, b) in sent {
        match (a.await.unwrap(), b.await.unwrap()) {
            (Ok(Written::Fresh(o)), Ok(Written::Replayed(bytes)))
            | (Ok(Written::Replayed(bytes)), Ok(Written::Fresh(o))) => {
                assert_eq!(bytes, o.action.id.to_string().into_bytes(), "{k}");
                assert!(o.cancelled.is_empty() && o.queued_after.is_empty(), "{k}");
                ids.push(o.action.id);
            }
            other => panic!("{k}: one fresh, one replay: {other:?}"),
        }
    }
    for i in 0..devices {
        let stored = f
            .replica
            .list_actions(
                &tenant(),
                ActionQuery {
                    device: Some(&device_id(&format!("m{i}"))),
                    states: &[],
                    before: None,
                    limit: 100,
                },
            )
            .await
            .unwrap();
        assert_eq!(stored.len(), per_device, "m{i}: one action per request");
        assert!(stored.iter().all(|a| ids.contains(&a.id)), "m{i}");
    }
    let batched = f.store.write_groups().batched - before.0.batched
        + f.replica.write_groups().batched
        - before.1.batched;
    if f.store.backend() == sea_orm::DbBackend::Postgres {
        assert!(batched > 0, "batches ran");
    } else {
        assert_eq!(batched, 0);
    }
}

/// Pushes a batch passes over (a device or a request_id met before in the
/// queue) keep their order: a push on a device met before is decided
/// after the earlier push on it (after its replacement too), and one under
/// a request_id met before replays the answer of the earlier one, not
/// the other way round; a holder of another tenant's device of the same
/// id, or of another channel, does not move a QUEUE_AFTER push; a push on
/// a device that does not exist is refused as alone.
pub async fn pushes_passed_over_keep_their_order(f: &Fixture) {
    use super::Written;
    let other = TenantId::from_stored("other-tenant".to_owned());
    let lane: Vec<String> = (2..400)
        .map(|i| format!("e{i}"))
        .filter(|d| f.store.same_lane("d1", d))
        .take(5)
        .collect();
    assert_eq!(lane.len(), 5, "devices in d1's lane");
    let (a, b, x, q, missing) = (&lane[0], &lane[1], &lane[2], &lane[3], &lane[4]);
    for d in [a, b, x, q] {
        with_device(f, d).await;
    }
    f.store
        .create_device(&other, device(q), None)
        .await
        .expect("the other tenant's device");
    let once = |t: &TenantId, d: &str, p: ValidPush, s, k: &str, body: &[u8]| {
        push_once(
            f.store.clone(),
            t.clone(),
            device_id(d),
            Ok(p),
            s,
            Some((k.to_owned(), body.to_vec())),
        )
    };
    let first = window(H, Some(2 * H));
    let overlap = window(H + H / 2, Some(5 * H / 2));
    let held_x = match once(&tenant(), x, first.clone(), Strategy::Reject, "x0", b"x0").await {
        Ok(Written::Fresh(o)) => o,
        other => panic!("booked: {other:?}"),
    };
    // Holders q's push must not see: another tenant's, another channel's.
    once(&other, q, first.clone(), Strategy::Reject, "q0", b"q0")
        .await
        .unwrap();
    let mut limit = first.clone();
    limit.channel = "limit".into();
    once(&tenant(), q, limit, Strategy::Reject, "q1", b"q1")
        .await
        .unwrap();

    let before = f.store.write_groups();
    let (entered, inside) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel();
    let holder = f.store.clone();
    let hold = tokio::spawn(async move { holder.hold_writer("d1", entered, released).await });
    inside.await.expect("the writer is held");
    let later = window(3 * H, Some(4 * H));
    let requests = [
        // 0: plain.
        (a, first.clone(), Strategy::Reject, "ka", &b"a"[..]),
        // 1: a's device again (passed over).
        (a, later.clone(), Strategy::Reject, "kb", b"b"),
        // 2: 1's request_id and body, on b (passed over): replays 1.
        (b, later.clone(), Strategy::Reject, "kb", b"b"),
        // 3: replaces x's holder (alone).
        (x, overlap.clone(), Strategy::CancelAndReplace, "kc", b"c"),
        // 4: x again (passed over): collides with 3's action.
        (x, overlap.clone(), Strategy::Reject, "kd", b"d"),
        // 5: QUEUE_AFTER meeting no holder of its own.
        (q, overlap.clone(), Strategy::QueueAfter, "ke", b"e"),
        // 6: no such device.
        (missing, first.clone(), Strategy::Reject, "kf", b"f"),
    ];
    let mut pushes = Vec::new();
    for (n, (d, p, s, k, body)) in requests.into_iter().enumerate() {
        pushes.push(tokio::spawn(once(&tenant(), d, p, s, k, body)));
        let queued = before.queued + 2 + n as u64;
        wait_queued(&f.store, queued).await;
    }
    release.send(()).expect("the holder waits");
    let _ = hold.await.unwrap();
    let mut results = Vec::new();
    for p in pushes {
        results.push(p.await.unwrap());
    }
    let fresh = |n: usize| match &results[n] {
        Ok(Written::Fresh(o)) => o.clone(),
        other => panic!("{n}: booked: {other:?}"),
    };
    fresh(0);
    let second = fresh(1);
    match &results[2] {
        Ok(Written::Replayed(bytes)) => {
            assert_eq!(bytes, &second.action.id.to_string().into_bytes());
        }
        other => panic!("2: replays 1: {other:?}"),
    }
    let replacing = fresh(3);
    assert_eq!(replacing.cancelled.len(), 1);
    assert_eq!(replacing.cancelled[0].id, held_x.action.id);
    match &results[4] {
        Err(Error::Conflict(c)) => assert_eq!(c.colliders[0].id, replacing.action.id),
        other => panic!("4: collides with 3: {other:?}"),
    }
    let unmoved = fresh(5);
    assert_eq!(unmoved.action.start, overlap.start);
    assert!(unmoved.queued_after.is_empty());
    assert!(
        matches!(&results[6], Err(Error::DeviceNotFound { .. })),
        "6: {:?}",
        results[6]
    );
    assert_eq!(actions_on(&f.replica, &tenant(), a).await, 2);
    assert_eq!(
        actions_on(&f.replica, &tenant(), b).await,
        0,
        "2 replayed, booked nothing"
    );
    assert_eq!(
        actions_on(&f.replica, &tenant(), x).await,
        2,
        "the replaced and its replacement"
    );
    let after = f.store.write_groups();
    if f.store.backend() == sea_orm::DbBackend::Postgres {
        // 0 and 5 by the first batch, 1 by the second (with 4, refused
        // there); 2 ran alone.
        assert_eq!(
            after.batched - before.batched,
            3,
            "batched: {before:?} → {after:?}"
        );
    } else {
        assert_eq!(after.batched, 0);
    }
}

/// A member that hid a failed statement (answered success) is never
/// answered success for a change that was not written: on PostgreSQL the
/// failure left the transaction aborted, and its group is rolled back and
/// told so (a COMMIT there would roll back silently); on SQLite the
/// failed statement changed nothing, and the change before it is written.
/// Either way the answer and what is stored agree, for it and for the
/// member queued after it.
pub async fn a_group_never_answers_success_for_what_it_did_not_write(f: &Fixture) {
    with_device(f, "d1").await;
    with_device(f, "d2").await;
    let (entered, inside) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel();
    let holder = f.store.clone();
    let hold = tokio::spawn(async move { holder.hold_writer("d1", entered, released).await });
    inside.await.expect("the writer is held");
    let queued = f.store.write_groups().queued;
    let faulty = {
        let store = f.store.clone();
        tokio::spawn(async move {
            store
                .hide_a_failed_statement("d1", &tenant(), &device_id("d1"), "hidden failure")
                .await
        })
    };
    wait_queued(&f.store, queued + 1).await;
    release.send(()).expect("the holder waits");
    let _ = hold.await.unwrap();
    let answered = faulty.await.unwrap();
    let stored = f
        .replica
        .get_device(&tenant(), &device_id("d1"))
        .await
        .unwrap();
    assert_eq!(
        answered.is_ok(),
        stored.display_name == "hidden failure",
        "answered {answered:?}, stored {:?}",
        stored.display_name
    );
    // The lane writes on afterwards.
    let after = f
        .store
        .hide_a_failed_statement("d1", &tenant(), &device_id("d2"), "later")
        .await;
    let d2 = f
        .replica
        .get_device(&tenant(), &device_id("d2"))
        .await
        .unwrap();
    assert_eq!(after.is_ok(), d2.display_name == "later", "{after:?}");
}

/// The same request sent at once to two replicas is applied once: one
/// gets the fresh answer, the other replays it, and one action is stored;
/// whichever the strategy (REJECT: the second is refused by the first's
/// action; QUEUE_AFTER: it would queue after it; CANCEL_AND_REPLACE: it
/// would replace it).
pub async fn a_request_sent_to_two_replicas_at_once_is_applied_once(f: &Fixture) {
    use super::{IdemRequest, Written};
    with_device(f, "d1").await;
    let pairs = 12;
    for k in 0..pairs {
        let strategy = [
            Strategy::Reject,
            Strategy::QueueAfter,
            Strategy::CancelAndReplace,
        ][k as usize % 3];
        let w = window((2 * k + 1) * H, Some((2 * k + 2) * H));
        let send = |store: Store| {
            let w = w.clone();
            async move {
                store
                    .push_once(
                        &tenant(),
                        &device_id("d1"),
                        move |_, _| Ok(w.clone()),
                        strategy,
                        Some(IdemRequest {
                            request_id: format!("twice-{k}"),
                            method: "PushAction",
                            body: b"the same body".to_vec(),
                            encode: std::sync::Arc::new(|o: &super::PushOutcome| {
                                o.action.id.to_string().into_bytes()
                            }),
                        }),
                    )
                    .await
            }
        };
        let (a, b) = tokio::join!(send(f.store.clone()), send(f.replica.clone()));
        match (a, b) {
            (Ok(Written::Fresh(o)), Ok(Written::Replayed(bytes)))
            | (Ok(Written::Replayed(bytes)), Ok(Written::Fresh(o))) => {
                assert_eq!(bytes, o.action.id.to_string().into_bytes(), "pair {k}");
            }
            other => panic!("pair {k} ({strategy:?}): one fresh, one replay: {other:?}"),
        }
    }
    let stored = f
        .store
        .list_actions(
            &tenant(),
            ActionQuery {
                device: Some(&device_id("d1")),
                states: &[],
                before: None,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), pairs as usize, "one action per request");
    assert!(stored.iter().all(|a| a.state == ActionState::Scheduled));
}

/// A push collides with a long holder that starts before a shorter action
/// that no longer holds (the push's look at the channel starts at the last
/// holder starting before it, not at the last action).
pub async fn a_long_holder_is_seen_past_a_later_action_that_gave_way(f: &Fixture) {
    with_device(f, "d1").await;
    let short = push(f, "d1", window(2 * H, Some(3 * H)), Strategy::Reject)
        .await
        .expect("push");
    let long = push(f, "d1", window(H, Some(10 * H)), Strategy::CancelAndReplace)
        .await
        .expect("replaces the short one");
    assert_eq!(long.cancelled[0].id, short.action.id);
    match push(f, "d1", window(5 * H, Some(6 * H)), Strategy::Reject).await {
        Err(Error::Conflict(c)) => assert_eq!(c.colliders[0].id, long.action.id),
        other => panic!("the long holder collides: {other:?}"),
    }
    // And after it, the channel is free.
    push(f, "d1", window(10 * H, Some(11 * H)), Strategy::Reject)
        .await
        .expect("after the long holder");
}

/// CANCEL_AND_REPLACE cancels the colliders and books the push in one
/// transaction; the replaced action names its replacement.
pub async fn cancel_and_replace_replaces_atomically(f: &Fixture) {
    with_device(f, "d1").await;
    let old = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let new = push(f, "d1", window(H, Some(3 * H)), Strategy::CancelAndReplace)
        .await
        .expect("replace");
    assert_eq!(new.cancelled.len(), 1);
    let old = get(f, "d1", &old).await;
    assert_eq!(old.state, ActionState::Cancelled);
    assert_eq!(old.replaced_by, Some(new.action.id));
    assert_eq!(old.error_code.as_deref(), Some("REPLACED"));
    let history = f
        .store
        .action_history(&tenant(), &new.action.id)
        .await
        .unwrap();
    assert_eq!(history[0].2, "PUSHED_CANCEL_AND_REPLACE");
}

/// QUEUE_AFTER starts the push when the last collider ends; the window
/// keeps its length.
pub async fn queue_after_starts_at_the_holders_end(f: &Fixture) {
    with_device(f, "d1").await;
    let first = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let queued = push(f, "d1", window(H, Some(3 * H)), Strategy::QueueAfter)
        .await
        .expect("queue");
    assert_eq!(queued.action.start, T0.plus_nanos(2 * H));
    assert_eq!(queued.queued_after, vec![first.id]);
    let stored = get(f, "d1", &queued.action).await;
    assert_eq!(stored, queued.action);
    assert_eq!(stored.end, Some(T0.plus_nanos(4 * H)));
}

/// validate_only answers as a push would and writes nothing, not even the
/// replacement a CANCEL_AND_REPLACE would make.
pub async fn validate_only_writes_nothing(f: &Fixture) {
    with_device(f, "d1").await;
    let holder = push(f, "d1", window(3 * H, Some(4 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let would = f
        .store
        .push(
            &tenant(),
            &device_id("d1"),
            |_, _| Ok(window(3 * H, Some(5 * H))),
            Strategy::CancelAndReplace,
            true,
            None,
        )
        .await
        .expect("validate_only");
    assert_eq!(would.cancelled.len(), 1);
    assert_eq!(get(f, "d1", &holder).await, holder, "untouched");
    let r = f
        .store
        .get_action(&tenant(), &device_id("d1"), &would.action.id)
        .await;
    assert!(matches!(r, Err(Error::ActionNotFound { .. })), "{r:?}");
}

/// A request_id completed with its response replays it; the same key with
/// another body is refused; an aborted key is free again.
pub async fn idempotency_replays_and_refuses_another_body(f: &Fixture) {
    with_device(f, "d1").await;
    let claim = match f
        .store
        .idem_begin(&tenant(), "req-1", "PushAction", b"body")
        .await
    {
        Ok(IdemBegin::Fresh(c)) => c,
        other => panic!("fresh: {other:?}"),
    };
    let commit = IdemCommit {
        request_id: "req-1".to_owned(),
        claim,
        unwritten: None,
        at_ns: 0,
        encode: Box::new(|o: &super::PushOutcome| o.action.id.to_string().into_bytes()),
    };
    let out = f
        .store
        .push(
            &tenant(),
            &device_id("d1"),
            |_, _| Ok(window(H, Some(2 * H))),
            Strategy::Reject,
            false,
            Some(commit),
        )
        .await
        .expect("push");
    match f
        .store
        .idem_begin(&tenant(), "req-1", "PushAction", b"body")
        .await
    {
        Ok(IdemBegin::Replay(bytes)) => assert_eq!(bytes, out.action.id.to_string().into_bytes()),
        other => panic!("replay: {other:?}"),
    }
    let other = f
        .store
        .idem_begin(&tenant(), "req-1", "PushAction", b"other")
        .await;
    assert!(
        matches!(other, Err(Error::RequestIdReused { .. })),
        "{other:?}"
    );
    // A key claimed and released (the request failed) is free again.
    let claim = match f
        .store
        .idem_begin(&tenant(), "req-2", "PushAction", b"b")
        .await
    {
        Ok(IdemBegin::Fresh(c)) => c,
        other => panic!("fresh: {other:?}"),
    };
    f.store
        .idem_abort(&tenant(), "req-2", &claim)
        .await
        .expect("abort");
    assert!(matches!(
        f.store
            .idem_begin(&tenant(), "req-2", "PushAction", b"b")
            .await,
        Ok(IdemBegin::Fresh(_))
    ));
}

async fn claim(f: &Fixture) -> Vec<super::Job> {
    f.store
        .claim_due(f.clock_now(), 10, 120 * Ts::SECOND)
        .await
        .expect("claim_due")
}

/// Records `job` as applied, with `memo`.
async fn applied(f: &Fixture, job: &super::Job, memo: Option<&str>) {
    f.store
        .finish(
            job,
            Finish::Applied {
                raw: "ok".into(),
                verified: true,
                memo: memo.map(str::to_owned),
            },
        )
        .await
        .expect("finish as applied");
}

/// Records `job` as reverted.
async fn reverted(f: &Fixture, job: &super::Job) {
    f.store
        .finish(
            job,
            Finish::Reverted {
                raw: "ok".into(),
                verified: true,
            },
        )
        .await
        .expect("finish as reverted");
}

impl Fixture {
    fn clock_now(&self) -> Ts {
        use crate::domain::Clock as _;
        self.clock.now()
    }
}

/// Due work is claimed once (the apply makes the action ACKNOWLEDGED) and
/// again only after its lease has run out.
pub async fn due_work_is_claimed_once_per_lease(f: &Fixture) {
    with_device(f, "d1").await;
    push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    f.clock.set(T0.plus_nanos(H - Ts::SECOND));
    assert!(claim(f).await.is_empty(), "not due yet");
    f.clock.set(T0.plus_nanos(H));
    let jobs = claim(f).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].work, Work::Apply);
    assert_eq!(
        get_id(f, "d1", &jobs[0].action.id).await.state,
        ActionState::Acknowledged
    );
    assert!(claim(f).await.is_empty(), "claimed");
    f.clock.set(T0.plus_nanos(H + 121 * Ts::SECOND));
    assert_eq!(claim(f).await.len(), 1, "the lease ran out");
}

/// An outcome is recorded only under the claim it was taken with.
pub async fn an_outcome_counts_only_under_its_claim(f: &Fixture) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(H));
    let stale = claim(f).await.remove(0);
    f.clock.set(T0.plus_nanos(H + 121 * Ts::SECOND));
    let fresh = claim(f).await.remove(0);
    let applied = || Finish::Applied {
        raw: "ok".into(),
        verified: true,
        memo: None,
    };
    // Recorded nowhere (the batch it is in still commits the others).
    f.store.finish(&stale, applied()).await.expect("finish");
    assert_eq!(
        get(f, "d1", &a).await.state,
        ActionState::Acknowledged,
        "the lapsed claim recorded nothing"
    );
    f.store.finish(&fresh, applied()).await.expect("finish");
    assert_eq!(get(f, "d1", &a).await.state, ActionState::Active);
}

/// Applied, a windowed action is ACTIVE with its revert due at its end;
/// the driver's memo is on record until the revert is.
pub async fn a_memo_is_on_record_until_the_revert(f: &Fixture) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(H));
    let job = claim(f).await.remove(0);
    applied(f, &job, Some("what was written")).await;
    let memos = f.store.memos(&tenant(), &device_id("d1")).await.unwrap();
    assert_eq!(memos.len(), 1);
    assert_eq!(
        (memos[0].action_id.as_str(), memos[0].memo.as_str()),
        (a.id.to_string().as_str(), "what was written")
    );
    f.clock.set(T0.plus_nanos(2 * H - Ts::SECOND));
    assert!(claim(f).await.is_empty(), "the revert is due at the end");
    f.clock.set(T0.plus_nanos(2 * H));
    let job = claim(f).await.remove(0);
    assert_eq!(job.work, Work::Revert);
    reverted(f, &job).await;
    assert_eq!(get(f, "d1", &a).await.state, ActionState::Completed);
    assert!(
        f.store
            .memos(&tenant(), &device_id("d1"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A client's cancel of an ACTIVE action owes its revert at once; of an
/// in-flight one is refused.
pub async fn a_client_cancel_follows_the_lifecycle(f: &Fixture) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(H));
    let job = claim(f).await.remove(0);
    let refused = f
        .store
        .cancel_action(&tenant(), &device_id("d1"), &a.id, None, None)
        .await;
    assert!(
        matches!(refused, Err(Error::NotCancellable { .. })),
        "{refused:?}"
    );
    applied(f, &job, None).await;
    let c = f
        .store
        .cancel_action(&tenant(), &device_id("d1"), &a.id, None, None)
        .await
        .expect("cancel");
    assert_eq!(c.state, ActionState::Cancelled);
    let owed = claim(f).await;
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].work, Work::Revert);
}

/// Deleting a device is refused while its actions hold a channel; with
/// force only while one is in flight; a forced delete cancels the rest
/// (audited: the history outlives the device).
pub async fn delete_is_refused_while_actions_hold_a_channel(f: &Fixture) {
    with_device(f, "d1").await;
    let held = push(f, "d1", window(3 * H, Some(4 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let r = f
        .store
        .delete_device(&tenant(), &device_id("d1"), None, false, None)
        .await;
    assert!(
        matches!(r, Err(Error::DeviceHasActiveActions { .. })),
        "{r:?}"
    );
    // An action in flight blocks even a forced delete.
    with_device(f, "d2").await;
    push(f, "d2", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    f.clock.set(T0.plus_nanos(H));
    assert_eq!(claim(f).await.len(), 1);
    let r = f
        .store
        .delete_device(&tenant(), &device_id("d2"), None, true, None)
        .await;
    assert!(
        matches!(&r, Err(Error::DeviceHasActiveActions { in_flight, .. }) if !in_flight.is_empty()),
        "{r:?}"
    );
    f.store
        .delete_device(&tenant(), &device_id("d1"), None, true, None)
        .await
        .expect("forced delete");
    assert!(matches!(
        f.store.get_device(&tenant(), &device_id("d1")).await,
        Err(Error::DeviceNotFound { .. })
    ));
    assert!(matches!(
        f.store
            .get_action(&tenant(), &device_id("d1"), &held.id)
            .await,
        Err(Error::ActionNotFound { .. })
    ));
    let history = f.store.action_history(&tenant(), &held.id).await.unwrap();
    assert_eq!(
        history.last().map(|h| (h.1.as_str(), h.2.as_str())),
        Some(("CANCELLED", "DEVICE_DELETED"))
    );
}

/// Actions page newest first, across devices or for one.
pub async fn actions_page_newest_first(f: &Fixture) {
    with_device(f, "d1").await;
    let mut ids: Vec<ActionId> = Vec::new();
    for i in 0..5 {
        let out = push(
            f,
            "d1",
            window((i + 1) * H, Some((i + 2) * H)),
            Strategy::Reject,
        )
        .await
        .expect("push");
        ids.push(out.action.id);
    }
    let page = |before: Option<ActionId>| ActionQuery {
        device: None,
        states: &[],
        before,
        limit: 2,
    };
    let first = f.store.list_actions(&tenant(), page(None)).await.unwrap();
    assert_eq!(
        first.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![ids[4], ids[3]]
    );
    let next = f
        .store
        .list_actions(&tenant(), page(Some(ids[3])))
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1]]
    );
}

/// An observation is kept only for the configuration it was read under.
pub async fn an_observation_is_kept_only_for_its_configuration(f: &Fixture) {
    let d = with_device(f, "d1").await;
    let seen = Observed {
        scheduler_active: true,
        rows: vec![],
        soc_percent: Some(50.0),
        mode: Some("IDLE".into()),
        at: T0,
    };
    assert!(f.store.observe(&tenant(), &d, &seen).await.unwrap());
    let now = f.store.get_device(&tenant(), &d.id).await.unwrap();
    assert_eq!(
        now.observed.as_ref().and_then(|o| o.soc_percent),
        Some(50.0)
    );
    // Reconfigured since: an observation of the old configuration is
    // dropped.
    f.store
        .update_device(
            &tenant(),
            &d.id,
            None,
            |d| {
                d.timezone = "Europe/Berlin".into();
                Ok(Retarget::No)
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert!(!f.store.observe(&tenant(), &d, &seen).await.unwrap());
}

/// Every claim of an action's work takes a larger fencing token: a
/// claimed-again apply, then its revert.
pub async fn each_claim_takes_a_larger_fencing_token(f: &Fixture) {
    with_device(f, "d1").await;
    push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    f.clock.set(T0.plus_nanos(H));
    let first = claim(f).await.remove(0);
    f.clock.set(T0.plus_nanos(H + 121 * Ts::SECOND));
    let again = claim(f).await.remove(0);
    assert!(
        again.fence > first.fence && first.fence > 0,
        "{} then {}",
        first.fence,
        again.fence
    );
    applied(f, &again, None).await;
    f.clock.set(T0.plus_nanos(2 * H));
    let revert = claim(f).await.remove(0);
    assert_eq!(revert.work, Work::Revert);
    assert!(revert.fence > again.fence);
}

/// A retry counts a failed try; a postponement does not.
pub async fn retries_count_and_postponements_do_not(f: &Fixture) {
    with_device(f, "d1").await;
    push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push");
    f.clock.set(T0.plus_nanos(H));
    let job = claim(f).await.remove(0);
    assert_eq!(job.attempts, 0);
    let due = T0.plus_nanos(H + Ts::SECOND);
    f.store
        .finish(
            &job,
            Finish::Retry {
                due,
                message: "outage".into(),
                raw: None,
                memo: None,
            },
        )
        .await
        .unwrap();
    f.clock.set(due);
    let job = claim(f).await.remove(0);
    assert_eq!(job.attempts, 1);
    assert_eq!(
        get_id(f, "d1", &job.action.id)
            .await
            .error_message
            .as_deref(),
        Some("retrying: outage")
    );
    let later = T0.plus_nanos(H + 2 * Ts::SECOND);
    f.store
        .finish(&job, Finish::Postpone { due: later })
        .await
        .unwrap();
    f.clock.set(later);
    assert_eq!(claim(f).await.remove(0).attempts, 1);
}

/// A replaced action owes nothing: at its start only its replacement is
/// due; the trail shows REPLACED, and DISPATCHED at the claim.
pub async fn a_replaced_action_owes_no_work(f: &Fixture) {
    with_device(f, "d1").await;
    let old = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let new = push(f, "d1", window(H, Some(2 * H)), Strategy::CancelAndReplace)
        .await
        .expect("replace")
        .action;
    f.clock.set(T0.plus_nanos(H));
    let jobs = claim(f).await;
    assert_eq!(
        jobs.iter().map(|j| j.action.id).collect::<Vec<_>>(),
        vec![new.id]
    );
    let old_trail = f.store.action_history(&tenant(), &old.id).await.unwrap();
    assert_eq!(
        old_trail,
        vec![
            (None, "SCHEDULED".to_owned(), "PUSHED".to_owned()),
            (
                Some("SCHEDULED".to_owned()),
                "CANCELLED".to_owned(),
                "REPLACED".to_owned()
            ),
        ]
    );
    let new_trail = f.store.action_history(&tenant(), &new.id).await.unwrap();
    assert_eq!(
        new_trail.last().cloned(),
        Some((
            Some("SCHEDULED".to_owned()),
            "ACKNOWLEDGED".to_owned(),
            "DISPATCHED".to_owned()
        ))
    );
}

/// The memos of a device's actions come oldest (earliest start) first.
pub async fn memos_come_oldest_first(f: &Fixture) {
    with_device(f, "d1").await;
    // Both in force at once: the later one on another channel.
    let mut later = window(3 * H, Some(4 * H));
    later.channel = "power_limit".into();
    let late = push(f, "d1", later, Strategy::Reject)
        .await
        .expect("push")
        .action;
    let early = push(f, "d1", window(H, Some(5 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    for (at, id, memo) in [(H, early.id, "early"), (3 * H, late.id, "late")] {
        f.clock.set(T0.plus_nanos(at));
        let job = claim(f)
            .await
            .into_iter()
            .find(|j| j.action.id == id)
            .expect("its apply is due");
        applied(f, &job, Some(memo)).await;
    }
    let memos = f.store.memos(&tenant(), &device_id("d1")).await.unwrap();
    let ids: Vec<String> = memos.iter().map(|m| m.action_id.clone()).collect();
    assert_eq!(ids, vec![early.id.to_string(), late.id.to_string()]);
}

/// What holds a channel: a cancelled action whose revert is owed does; a
/// failed one without a revert and a reverted one do not; another channel
/// of the device is free.
pub async fn what_holds_a_channel(f: &Fixture) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(3 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(H));
    let job = claim(f).await.remove(0);
    applied(f, &job, None).await;
    f.store
        .cancel_action(&tenant(), &device_id("d1"), &a.id, None, None)
        .await
        .unwrap();
    let clash = push(f, "d1", window(2 * H, Some(4 * H)), Strategy::Reject).await;
    assert!(matches!(clash, Err(Error::Conflict(_))), "{clash:?}");
    let mut other = window(2 * H, Some(4 * H));
    other.channel = "power_limit".into();
    push(f, "d1", other, Strategy::Reject)
        .await
        .expect("another channel");
    let job = claim(f).await.remove(0);
    assert_eq!(job.work, Work::Revert);
    reverted(f, &job).await;
    push(f, "d1", window(2 * H, Some(4 * H)), Strategy::Reject)
        .await
        .expect("free once reverted");
    with_device(f, "d2").await;
    push(f, "d2", window(5 * H, Some(6 * H)), Strategy::Reject)
        .await
        .expect("push");
    f.clock.set(T0.plus_nanos(5 * H));
    let job = claim(f)
        .await
        .into_iter()
        .find(|j| j.action.device_id.as_str() == "d2")
        .unwrap();
    f.store
        .finish(
            &job,
            Finish::Failed {
                code: "OEM_REJECTED".into(),
                message: "no".into(),
                raw: None,
                revert: false,
                memo: None,
            },
        )
        .await
        .unwrap();
    push(f, "d2", window(5 * H, Some(6 * H)), Strategy::Reject)
        .await
        .expect("a failed action holds nothing");
}

/// Tenants and API keys round-trip (a key's hash byte for byte); a name
/// is taken once; a revocation limited to a tenant touches no other's key,
/// and is seen by another replica.
pub async fn tenants_and_keys_round_trip(f: &Fixture) {
    use crate::{
        domain::Clock as _,
        store::{KeyRecord, TenantRecord},
    };
    let acme = TenantRecord {
        id: TenantId::from_stored("tn_acme".to_owned()),
        name: "acme".to_owned(),
        created: f.clock.now(),
        rate_per_second: Some(7),
        rate_burst: None,
    };
    f.store.create_tenant(&acme).await.expect("create tenant");
    let mut again = acme.clone();
    again.id = TenantId::from_stored("tn_other".to_owned());
    assert!(matches!(
        f.store.create_tenant(&again).await,
        Err(Error::TenantAlreadyExists { .. })
    ));
    assert_eq!(
        f.replica.tenant_by_name("acme").await.expect("read"),
        Some(acme.clone())
    );
    let names: Vec<String> = f
        .store
        .list_tenants()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme", "default"], "migration 12 made `default`");
    f.store
        .set_tenant_rate(&acme.id, Some(3), Some(4))
        .await
        .expect("set rate");
    let t = f
        .store
        .tenant_by_id(&acme.id)
        .await
        .expect("read")
        .expect("there");
    assert_eq!((t.rate_per_second, t.rate_burst), (Some(3), Some(4)));
    assert!(!f.store.any_key().await.expect("any"));
    let key = |id: &str, tenant: &TenantId| KeyRecord {
        key_id: id.to_owned(),
        tenant: tenant.clone(),
        hash: (0..=255u8).step_by(8).collect(),
        scopes: vec!["actions:read".to_owned(), "admin".to_owned()],
        description: "d".to_owned(),
        created: f.clock.now(),
        expires: Some(Ts(f.clock.now().0 + 60 * Ts::SECOND)),
        revoked: None,
        last_used: None,
    };
    let (mine, theirs) = (
        key("aaaaaaaaaaaaaaaa", &acme.id),
        key("bbbbbbbbbbbbbbbb", &tenant()),
    );
    for k in [&mine, &theirs] {
        f.store.create_key(k).await.expect("create key");
    }
    assert!(f.replica.any_key().await.expect("any"));
    assert_eq!(
        f.replica.key_by_id(&mine.key_id).await.expect("read"),
        Some(mine.clone())
    );
    let mut ids = f.store.key_ids().await.expect("ids");
    ids.sort();
    assert_eq!(ids, [mine.key_id.clone(), theirs.key_id.clone()]);
    assert_eq!(
        f.store.list_keys(&acme.id).await.expect("list"),
        std::slice::from_ref(&mine)
    );
    // Limited to acme: the other tenant's key is not found, and not revoked.
    assert_eq!(
        f.store
            .revoke_key(&theirs.key_id, Some(&acme.id), Ts(5))
            .await
            .expect("revoke"),
        None
    );
    assert_eq!(
        f.store
            .key_by_id(&theirs.key_id)
            .await
            .expect("read")
            .and_then(|k| k.revoked),
        None
    );
    let revoked = f
        .store
        .revoke_key(&mine.key_id, Some(&acme.id), Ts(5))
        .await
        .expect("revoke")
        .expect("found");
    assert_eq!(revoked.revoked, Some(Ts(5)));
    // Revoking again keeps the first time.
    let again = f
        .store
        .revoke_key(&mine.key_id, None, Ts(9))
        .await
        .expect("revoke");
    assert_eq!(again.and_then(|k| k.revoked), Some(Ts(5)));
    f.store
        .touch_key(&theirs.key_id, Ts(77))
        .await
        .expect("touch");
    assert_eq!(
        f.replica
            .key_by_id(&theirs.key_id)
            .await
            .expect("read")
            .and_then(|k| k.last_used),
        Some(Ts(77))
    );
}

/// Another tenant's devices and actions do not exist for this one; the
/// same device id may exist in both.
pub async fn tenants_see_only_their_own(f: &Fixture) {
    let other = TenantId::from_stored("other-tenant".to_owned());
    f.store
        .create_device(&other, device("d1"), None)
        .await
        .expect("create in the other tenant");
    assert!(matches!(
        f.store.get_device(&tenant(), &device_id("d1")).await,
        Err(Error::DeviceNotFound { .. })
    ));
    with_device(f, "d1").await;
    let mine = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    assert!(matches!(
        f.store.get_action(&other, &device_id("d1"), &mine.id).await,
        Err(Error::ActionNotFound { .. })
    ));
    let theirs = f
        .store
        .list_actions(
            &other,
            ActionQuery {
                device: None,
                states: &[],
                before: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert!(theirs.is_empty());
}

/// Two replicas pushing overlapping windows at once: exactly one is
/// booked, the others get the typed conflict.
pub async fn concurrent_overlapping_pushes_book_one(f: &Fixture) {
    with_device(f, "d1").await;
    let mut tries = Vec::new();
    for i in 0..16_i64 {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            f.replica.clone()
        };
        tries.push(tokio::spawn(async move {
            store
                .push(
                    &tenant(),
                    &device_id("d1"),
                    move |_, _| Ok(window(H + i * Ts::SECOND, Some(2 * H))),
                    Strategy::Reject,
                    false,
                    None,
                )
                .await
        }));
    }
    let mut booked = 0;
    for t in tries {
        match t.await.unwrap() {
            Ok(_) => booked += 1,
            Err(Error::Conflict(_)) => {}
            Err(e) => panic!("neither booked nor a conflict: {e:?}"),
        }
    }
    assert_eq!(booked, 1);
}

/// Two replicas claiming at once never share a job, and together take
/// everything due.
pub async fn concurrent_claims_never_share_work(f: &Fixture) {
    for d in 0..12 {
        let id = format!("d{d}");
        with_device(f, &id).await;
        push(f, &id, window(H, Some(2 * H)), Strategy::Reject)
            .await
            .expect("push");
    }
    f.clock.set(T0.plus_nanos(H));
    let now = f.clock_now();
    let (a, b) = (f.store.clone(), f.replica.clone());
    let ta = tokio::spawn(async move { a.claim_due(now, 8, 120 * Ts::SECOND).await });
    let tb = tokio::spawn(async move { b.claim_due(now, 8, 120 * Ts::SECOND).await });
    let mut ids: Vec<ActionId> = ta
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|j| j.action.id)
        .collect();
    let from_b: Vec<ActionId> = tb
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|j| j.action.id)
        .collect();
    let before = ids.len() + from_b.len();
    ids.extend(from_b);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), before, "a job claimed twice");
    assert_eq!(ids.len(), 12, "everything due was taken");
}

/// Two replicas beginning the same request_id at once: one goes ahead,
/// the other is told it is in progress.
pub async fn concurrent_requests_with_one_id_run_once(f: &Fixture) {
    let (a, b) = (f.store.clone(), f.replica.clone());
    let ta = tokio::spawn(async move { a.idem_begin(&tenant(), "same", "PushAction", b"x").await });
    let tb = tokio::spawn(async move { b.idem_begin(&tenant(), "same", "PushAction", b"x").await });
    let results = [ta.await.unwrap(), tb.await.unwrap()];
    let fresh = results
        .iter()
        .filter(|r| matches!(r, Ok(IdemBegin::Fresh(_))))
        .count();
    let busy = results
        .iter()
        .filter(|r| matches!(r, Err(Error::RequestInProgress { .. })))
        .count();
    assert_eq!((fresh, busy), (1, 1), "{results:?}");
}

/// Actions finished without a `finished_ns` (before migration 22, or by a
/// replica of an earlier version) are stamped with their last change, a
/// batch at a time, and only then forgotten once old enough.
pub async fn finished_actions_of_an_earlier_version_are_stamped_then_forgotten(f: &Fixture) {
    with_device(f, "d1").await;
    let mut cancelled = Vec::new();
    for (i, at) in [(0, 0), (1, 5 * H)] {
        let a = push(
            f,
            "d1",
            window((i + 1) * 10 * H, Some((i + 1) * 10 * H + H)),
            Strategy::Reject,
        )
        .await
        .expect("push")
        .action;
        f.clock.set(T0.plus_nanos(at));
        f.store
            .cancel_action(&tenant(), &device_id("d1"), &a.id, None, None)
            .await
            .expect("cancel");
        cancelled.push(a);
    }
    let booked = push(f, "d1", window(40 * H, Some(41 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(9 * H));
    // Stamped when they finished: nothing to stamp.
    assert_eq!(f.store.stamp_finished(10).await.unwrap(), 0);
    // As an earlier version leaves them: unstamped, never forgotten.
    assert_eq!(f.store.unstamp_finished().await.unwrap(), 2);
    assert_eq!(
        f.store
            .prune_finished(T0.plus_nanos(9 * H), 10)
            .await
            .unwrap(),
        0
    );
    assert_eq!(f.store.stamp_finished(1).await.unwrap(), 1);
    assert_eq!(f.store.stamp_finished(10).await.unwrap(), 1);
    assert_eq!(f.store.stamp_finished(10).await.unwrap(), 0);
    // Stamped with their last change (the cancels at T0 and 5H), not the
    // stamp's time (9H).
    let cut = T0.plus_nanos(H);
    assert_eq!(f.store.prune_finished(cut, 10).await.unwrap(), 1);
    assert!(matches!(
        f.store
            .get_action(&tenant(), &device_id("d1"), &cancelled[0].id)
            .await,
        Err(Error::ActionNotFound { .. })
    ));
    get(f, "d1", &cancelled[1]).await;
    assert_eq!(
        f.store
            .prune_finished(T0.plus_nanos(6 * H), 10)
            .await
            .unwrap(),
        1
    );
    get(f, "d1", &booked).await;
}

/// Finished actions older than the cut-off are forgotten with their audit
/// trail, a batch at a time; booked, in-force and newer ones stay, and so
/// does an action whose driver memo is on record.
pub async fn old_finished_actions_are_forgotten_with_their_trail(f: &Fixture) {
    with_device(f, "d1").await;
    // Completed: applied at H, reverted at 2H.
    let done = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    // Cancelled by the client before it started.
    let cancelled = push(f, "d1", window(3 * H, Some(4 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.store
        .cancel_action(&tenant(), &device_id("d1"), &cancelled.id, None, None)
        .await
        .expect("cancel");
    f.clock.set(T0.plus_nanos(H));
    let job = claim(f).await.remove(0);
    applied(f, &job, None).await;
    f.clock.set(T0.plus_nanos(2 * H));
    let job = claim(f).await.remove(0);
    reverted(f, &job).await;
    // In force with a memo on record until 30H.
    let active = push(f, "d1", window(5 * H, Some(30 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(5 * H));
    let job = claim(f).await.remove(0);
    applied(f, &job, Some("written")).await;
    // Reverts that failed for good, with a memo and without: the command
    // may still be in force, so neither is ever forgotten.
    with_device(f, "d2").await;
    with_device(f, "d3").await;
    let mut revert_failed = Vec::new();
    for (i, memo) in [(0, Some("written")), (1, None)] {
        let start = 9 * H + 2 * i * H;
        let a = push(f, "d2", window(start, Some(start + H)), Strategy::Reject)
            .await
            .expect("push")
            .action;
        f.clock.set(T0.plus_nanos(start));
        let job = claim(f).await.remove(0);
        applied(f, &job, memo).await;
        f.clock.set(T0.plus_nanos(start + H));
        let job = claim(f).await.remove(0);
        f.store
            .finish(
                &job,
                Finish::Failed {
                    code: crate::domain::codes::REVERT_FAILED.into(),
                    message: "gave up".into(),
                    raw: None,
                    revert: false,
                    memo: None,
                },
            )
            .await
            .expect("finish as failed");
        assert_eq!(get(f, "d2", &a).await.state, ActionState::Failed);
        revert_failed.push(a);
    }
    // Still booked.
    let booked = push(f, "d3", window(20 * H, Some(21 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    assert_eq!(get(f, "d1", &done).await.state, ActionState::Completed);
    assert!(
        !f.store
            .action_history(&tenant(), &done.id)
            .await
            .unwrap()
            .is_empty()
    );

    // A cut-off before they finished forgets nothing.
    assert_eq!(f.store.prune_finished(T0, 10).await.unwrap(), 0);
    // Later: the two finished ones go, one per batch.
    let cut = T0.plus_nanos(19 * H);
    assert_eq!(f.store.prune_finished(cut, 1).await.unwrap(), 1);
    assert_eq!(f.store.prune_finished(cut, 1).await.unwrap(), 1);
    assert_eq!(f.store.prune_finished(cut, 1).await.unwrap(), 0);
    for gone in [&done, &cancelled] {
        assert!(matches!(
            f.store
                .get_action(&tenant(), &device_id("d1"), &gone.id)
                .await,
            Err(Error::ActionNotFound { .. })
        ));
        assert!(
            f.store
                .action_history(&tenant(), &gone.id)
                .await
                .unwrap()
                .is_empty(),
            "its audit trail went with it"
        );
    }
    for (device, kept) in [
        ("d1", &active),
        ("d3", &booked),
        ("d2", &revert_failed[0]),
        ("d2", &revert_failed[1]),
    ] {
        get(f, device, kept).await;
        assert!(
            !f.store
                .action_history(&tenant(), &kept.id)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// Work claimed ahead of its start stays SCHEDULED, and cancellable,
/// until it is due; started then, in bulk, only if still owed; a
/// cancelled one is let go (nothing holds it any more). An outcome is
/// recorded at the time the driver answered, with the device state seen.
pub async fn work_claimed_ahead_starts_when_due_if_still_owed(f: &Fixture) {
    with_device(f, "d1").await;
    let d2 = with_device(f, "d2").await;
    let kept = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let gone = push(f, "d2", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let later = push(f, "d2", window(3 * H, Some(4 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let claim = f
        .store
        .claim_ahead(T0, T0.plus_nanos(H), 10, 4 * H)
        .await
        .expect("claim_ahead");
    let mut ids: Vec<ActionId> = claim.jobs.iter().map(|j| j.action.id).collect();
    ids.sort();
    let mut want = vec![kept.id, gone.id];
    want.sort();
    assert_eq!(ids, want, "due within the horizon, and nothing later");
    assert_eq!(claim.devices.len(), 2, "with their devices");
    // Configured alike, the claim's devices hold one copy of their
    // settings (a storm claims a fleet's devices by the thousand).
    let mut devices = claim.devices.values();
    let (a, b) = (devices.next().unwrap(), devices.next().unwrap());
    assert_eq!(a.settings, device("x").settings);
    assert!(std::sync::Arc::ptr_eq(&a.settings, &b.settings));
    assert_eq!(get(f, "d1", &kept).await.state, ActionState::Scheduled);
    assert!(
        f.replica
            .claim_ahead(T0, T0.plus_nanos(H), 10, 4 * H)
            .await
            .expect("claim_ahead")
            .jobs
            .is_empty(),
        "held by the first claim"
    );
    let c = f
        .store
        .cancel_action(&tenant(), &device_id("d2"), &gone.id, None, None)
        .await
        .expect("a claim taken ahead does not stop a cancel");
    assert_eq!(c.state, ActionState::Cancelled);
    let early = f
        .store
        .start_due(&[claim.due()], T0)
        .await
        .expect("start_due");
    assert!(early.ready.is_empty(), "nothing is due yet");
    assert_eq!(get(f, "d1", &kept).await.state, ActionState::Scheduled);

    f.clock.set(T0.plus_nanos(H));
    let started = f
        .store
        .start_due(&[claim.due()], T0.plus_nanos(H))
        .await
        .expect("start_due");
    assert_eq!(
        started.ready,
        std::collections::HashMap::from([(kept.id.to_string(), claim.owner.clone())])
    );
    assert_eq!(get(f, "d1", &kept).await.state, ActionState::Acknowledged);
    assert_eq!(get(f, "d2", &gone).await.state, ActionState::Cancelled);
    // Let go: a finished action nobody holds is forgotten in time (a
    // claimed one never is).
    assert_eq!(
        f.store
            .prune_finished(T0.plus_nanos(2 * H), 10)
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        f.store
            .get_action(&tenant(), &device_id("d2"), &gone.id)
            .await,
        Err(Error::ActionNotFound { .. })
    ));

    // Recorded later than the driver answered: the transition keeps the
    // answer's time, and the state seen is recorded with it.
    let answered = T0.plus_nanos(H + Ts::SECOND);
    f.clock.set(T0.plus_nanos(H + 5 * Ts::SECOND));
    let job = claim
        .jobs
        .into_iter()
        .find(|j| j.action.id == kept.id)
        .expect("kept was claimed");
    let d1 = claim
        .devices
        .get(&(tenant().as_str().to_owned(), "d1".to_owned()))
        .expect("its device")
        .clone();
    let seen = Observed {
        scheduler_active: false,
        rows: vec![],
        soc_percent: Some(61.0),
        mode: Some("CHARGE".into()),
        at: answered,
    };
    f.store
        .record(&mut [super::Outcome {
            job: job.into(),
            finish: Finish::Applied {
                raw: "ok".into(),
                verified: true,
                memo: None,
            },
            at: answered,
            observed: Some(((&d1).into(), seen)),
        }])
        .await
        .expect("record");
    let active = get(f, "d1", &kept).await;
    assert_eq!(active.state, ActionState::Active);
    assert_eq!(active.updated, answered);
    let d1 = f
        .store
        .get_device(&tenant(), &device_id("d1"))
        .await
        .unwrap();
    assert_eq!(d1.observed.and_then(|o| o.soc_percent), Some(61.0));
    // The later action on d2 is untouched.
    assert_eq!(get(f, "d2", &later).await.state, ActionState::Scheduled);
    assert_eq!(d2.id, device_id("d2"));
}

/// A device change takes back work claimed ahead of its start (it would
/// run under the old target): the change goes through, the claim starts
/// nothing, and the work is claimed again with the device as it is now.
pub async fn a_device_change_takes_back_work_claimed_ahead(f: &Fixture) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let claim = f
        .store
        .claim_ahead(T0, T0.plus_nanos(H), 10, 4 * H)
        .await
        .expect("claim_ahead");
    assert_eq!(claim.jobs.len(), 1);
    f.store
        .update_device(
            &tenant(),
            &device_id("d1"),
            None,
            |d| {
                d.oem_device_id = "another-inverter".into();
                Ok(Retarget::Yes)
            },
            None,
            None,
        )
        .await
        .expect("work not started does not hold the device to its target");
    f.clock.set(T0.plus_nanos(H));
    let started = f
        .store
        .start_due(&[claim.due()], T0.plus_nanos(H))
        .await
        .expect("start_due");
    assert!(started.ready.is_empty(), "the claim was taken back");
    assert_eq!(get(f, "d1", &a).await.state, ActionState::Scheduled);
    let again = f
        .replica
        .claim_ahead(T0.plus_nanos(H), T0.plus_nanos(H), 10, 4 * H)
        .await
        .expect("claim_ahead");
    assert_eq!(again.jobs.len(), 1);
    assert_eq!(
        get_id(f, "d1", &again.jobs[0].action.id).await.state,
        ActionState::Acknowledged
    );
    let d = again
        .devices
        .get(&(tenant().as_str().to_owned(), "d1".to_owned()))
        .expect("its device");
    assert_eq!(d.oem_device_id, "another-inverter");
}

async fn claim_ahead(store: &Store, now: Ts, until: Ts) -> super::Claim {
    store
        .claim_ahead(now, until, 10, 4 * H)
        .await
        .expect("claim_ahead")
}

/// An action of d1 due from H to 2 H, claimed ahead at T0 for 4 H.
async fn claimed_at_t0(f: &Fixture) -> (Action, super::Claim) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let c = claim_ahead(&f.store, T0, T0.plus_nanos(H)).await;
    assert_eq!(c.jobs.len(), 1);
    (a, c)
}

/// Work whose claim had lapsed when its start was written is not
/// started, and is not ready when read back: it is still SCHEDULED, and
/// cancellable, so it must not run; a heartbeat that comes back too late
/// renews nothing, and the work is claimed again.
pub async fn work_not_started_in_time_is_not_ready(f: &Fixture) {
    // Claimed for 4 H from T0; started at 5 H.
    let (a, c) = claimed_at_t0(f).await;
    let at = T0.plus_nanos(5 * H);
    f.clock.set(at);
    f.store
        .start_claims(&[c.due()], at)
        .await
        .expect("start_claims");
    assert_eq!(get(f, "d1", &a).await.state, ActionState::Scheduled);
    // A heartbeat that comes back after the lease ran out renews nothing:
    // another dispatcher may have taken some of the claim's work by then.
    assert!(
        !f.store
            .renew(&c.due(), at.plus_nanos(4 * H))
            .await
            .expect("renew")
    );
    let started = f.store.started(&[c.due()], at).await.expect("started");
    assert!(started.ready.is_empty(), "{:?}", started.ready);
    // The work is free: claimed again, and started under the new claim
    // only.
    let again = claim_ahead(&f.store, at, at).await;
    assert_eq!(again.jobs.len(), 1, "free once its claim lapsed");
    // A heartbeat of the first claim whose clock lags (still within its
    // lease by it) renews its lease row, but holds nothing: its only row
    // is the new claim's.
    f.clock.set(T0.plus_nanos(3 * H));
    assert!(
        !f.store
            .renew(&c.due(), T0.plus_nanos(7 * H))
            .await
            .expect("renew"),
        "every row of the claim was taken by another"
    );
    f.clock.set(at);
    let started = f
        .store
        .started(&[c.due(), again.due()], at)
        .await
        .expect("started");
    assert_eq!(
        started.ready.get(&a.id.to_string()),
        Some(&again.owner),
        "started under the live claim"
    );
    assert_eq!(get(f, "d1", &a).await.state, ActionState::Acknowledged);
}

/// A heartbeat renews its claim's lease, not each row the claim holds:
/// the work stays held (not claimed again, not in the way of other work,
/// and the next due time waits for the renewed lease) past the lease its
/// rows were claimed with, for as long as the renewals go on, and is free
/// once the last renewed lease has run out; a renewal after that revives
/// nothing. Leases long run out are deleted.
pub async fn a_renewed_claim_holds_its_work_past_its_rows_lease(f: &Fixture) {
    use super::entity::action;
    use sea_orm::{ConnectionTrait as _, EntityTrait as _};
    // Claimed at T0 for 4 H, renewed at 3 H until 7 H.
    let (a, c) = claimed_at_t0(f).await;
    with_device(f, "d2").await;
    let row_lease = || async {
        action::Entity::find_by_id(a.id.to_string())
            .one(&f.store.read)
            .await
            .expect("read")
            .expect("the row")
            .lease_until_ns
    };
    assert_eq!(row_lease().await, Some(T0.0 + 4 * H));
    let due = c.due();
    let renew = |at: i64, until: i64| {
        f.clock.set(T0.plus_nanos(at));
        f.store.renew(&due, T0.plus_nanos(until))
    };
    assert!(renew(3 * H, 7 * H).await.expect("renew"), "renewed");
    assert_eq!(
        row_lease().await,
        Some(T0.0 + 4 * H),
        "the row keeps the lease it was claimed with"
    );
    // At 5 H the row's own lease has run out, its claim's has not: a
    // claim of one passes it by for later work that is free.
    let at = T0.plus_nanos(5 * H);
    f.clock.set(at);
    let b = push(f, "d2", window(6 * H, Some(7 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let other = f
        .store
        .claim_ahead(at, T0.plus_nanos(6 * H), 1, 4 * H)
        .await
        .expect("claim_ahead");
    let taken: Vec<String> = other.jobs.iter().map(|j| j.action.id.to_string()).collect();
    assert_eq!(taken, vec![b.id.to_string()], "held work is passed by");
    assert_eq!(
        f.store.next_due().await.expect("next_due"),
        Some(T0.plus_nanos(7 * H)),
        "free when the claim's lease runs out"
    );
    f.store
        .start_claims(&[c.due()], at)
        .await
        .expect("start_claims");
    assert_eq!(get(f, "d1", &a).await.state, ActionState::Acknowledged);
    let started = f.store.started(&[c.due()], at).await.expect("started");
    assert_eq!(started.ready.get(&a.id.to_string()), Some(&c.owner));
    // Renewed again at 6 H until 10 H: still held at 8 H, after the
    // leases run out long ago are deleted.
    assert!(renew(6 * H, 10 * H).await.expect("renew"));
    let at = T0.plus_nanos(8 * H);
    f.clock.set(at);
    f.store.forget_leases(at, 4 * H).await;
    assert!(
        claim_ahead(&f.store, at, at).await.jobs.is_empty(),
        "held by the claim renewed twice"
    );
    // Past 10 H nothing holds it: claimed again, under a new claim.
    let later = T0.plus_nanos(10 * H + Ts::SECOND);
    f.clock.set(later);
    let again = claim_ahead(&f.store, later, later).await;
    let taken: Vec<String> = again.jobs.iter().map(|j| j.action.id.to_string()).collect();
    // (b's claim, never renewed, ran out at 9 H: b is free too.)
    assert!(
        taken.contains(&a.id.to_string()),
        "free once the claim's lease ran out: {taken:?}"
    );
    assert_ne!(again.owner, c.owner);
    // The old claim, renewed too late, is not revived.
    assert!(
        !f.store
            .renew(&c.due(), later.plus_nanos(4 * H))
            .await
            .expect("renew")
    );
    // A lease run out more than a lease ago is deleted, and its claim
    // renews nothing any more; live ones stay.
    let leases = |owner: String| async move {
        let q = sea_orm::Statement::from_sql_and_values(
            f.store.read.get_database_backend(),
            if f.store.read.get_database_backend() == sea_orm::DbBackend::Postgres {
                "SELECT COUNT(*) AS n FROM dispatch_leases WHERE owner = $1"
            } else {
                "SELECT COUNT(*) AS n FROM dispatch_leases WHERE owner = ?"
            },
            [owner.into()],
        );
        let row = f
            .store
            .read
            .query_one_raw(q)
            .await
            .expect("count")
            .expect("a row");
        row.try_get::<i64>("", "n").expect("n")
    };
    assert_eq!(leases(c.owner.clone()).await, 1);
    let much_later = later.plus_nanos(8 * H + Ts::SECOND);
    f.store.forget_leases(later, 4 * H).await;
    assert_eq!(
        leases(c.owner.clone()).await,
        1,
        "ran out at 10 H, less than a lease before {later:?}"
    );
    f.store.forget_leases(much_later, 4 * H).await;
    assert_eq!(
        leases(c.owner.clone()).await,
        0,
        "ran out at 10 H, deleted at 18 H"
    );
    assert_eq!(leases(again.owner.clone()).await, 0);
    assert!(!f.store.renew(&c.due(), much_later).await.expect("renew"));
}

/// One action on each of `devices`, from H to 2 H, in order.
async fn pushed_from_h_to_2h(f: &Fixture, devices: &[&str]) -> Vec<Action> {
    let mut pushed = Vec::new();
    for d in devices {
        pushed.push(
            push(f, d, window(H, Some(2 * H)), Strategy::Reject)
                .await
                .expect("push")
                .action,
        );
    }
    pushed
}

/// A start starts what it names, under the claim it names it with, and
/// nothing else: an action its claim holds but the start leaves out (the
/// dispatcher names what is due by its clock), or names under another
/// claim, stays SCHEDULED and is not ready; one it names that owes
/// nothing any more (cancelled) is not ready either.
pub async fn a_start_starts_only_the_actions_it_names(f: &Fixture) {
    with_device(f, "d1").await;
    with_device(f, "d2").await;
    with_device(f, "d3").await;
    let pushed = pushed_from_h_to_2h(f, &["d1", "d2", "d3"]).await;
    let (a, b, c) = (&pushed[0], &pushed[1], &pushed[2]);
    // One id a statement: every statement of the claim, the starts, the
    // reads back and the renewals runs once per id.
    let store = f.store.clone().with_ids_per_statement(1);
    let claim = claim_ahead(&store, T0, T0.plus_nanos(H)).await;
    assert_eq!(claim.jobs.len(), 3);
    // c is cancelled before its start: it owes nothing, but is held.
    f.store
        .cancel_action(&tenant(), &device_id("d3"), &c.id, None, None)
        .await
        .expect("cancel");
    f.clock.set(T0.plus_nanos(H));
    let named = super::Due {
        claim: claim.owner.clone(),
        action_ids: vec![a.id.to_string(), c.id.to_string()],
    };
    let elsewhere = super::Due {
        claim: "another claim".into(),
        action_ids: vec![b.id.to_string()],
    };
    let started = store
        .start_due(&[named, elsewhere], T0.plus_nanos(H))
        .await
        .expect("start_due");
    assert_eq!(
        started.ready,
        std::collections::HashMap::from([(a.id.to_string(), claim.owner.clone())])
    );
    assert_eq!(get(f, "d1", a).await.state, ActionState::Acknowledged);
    assert_eq!(
        get(f, "d2", b).await.state,
        ActionState::Scheduled,
        "held by the claim, but not named under it"
    );
    // c was let go by its cancel; b is still held.
    let held = |id: ActionId| async move {
        use super::entity::action;
        use sea_orm::EntityTrait as _;
        action::Entity::find_by_id(id.to_string())
            .one(&f.store.read)
            .await
            .expect("read")
            .expect("the row")
            .lease_owner
    };
    assert_eq!(held(c.id).await, None, "let go by the cancel");
    assert_eq!(held(b.id).await, Some(claim.owner.clone()));
    // Each started action's trail gains one DISPATCHED entry; the others
    // none.
    let trail = |id: ActionId| async move {
        f.store
            .action_history(&tenant(), &id)
            .await
            .expect("history")
            .into_iter()
            .filter(|(_, _, reason)| reason == "DISPATCHED")
            .collect::<Vec<_>>()
    };
    let dispatched = vec![(
        Some("SCHEDULED".to_owned()),
        "ACKNOWLEDGED".to_owned(),
        "DISPATCHED".to_owned(),
    )];
    assert_eq!(trail(a.id).await, dispatched);
    assert!(trail(b.id).await.is_empty());
    assert!(trail(c.id).await.is_empty());
    // Named under its own claim, b starts too.
    let started = store
        .start_due(&[claim.due()], T0.plus_nanos(H))
        .await
        .expect("start_due");
    assert_eq!(started.ready.len(), 2, "{:?}", started.ready);
    assert_eq!(get(f, "d2", b).await.state, ActionState::Acknowledged);
    assert_eq!(trail(a.id).await, dispatched, "started once");
    assert_eq!(trail(b.id).await, dispatched);
    // While any of its rows is held the claim is renewed, the one held
    // named last (its own statement here); once none is (recorded, or
    // let go), a renewal holds nothing and says so.
    let mine = super::Due {
        claim: claim.owner.clone(),
        action_ids: vec![c.id.to_string(), a.id.to_string(), b.id.to_string()],
    };
    f.store
        .release(&claim.owner, &[a.id.to_string()])
        .await
        .expect("release");
    assert!(
        store
            .renew(&mine, T0.plus_nanos(3 * H))
            .await
            .expect("renew"),
        "b is still held"
    );
    f.store
        .release(&claim.owner, &[b.id.to_string()])
        .await
        .expect("release");
    assert!(
        !store
            .renew(&mine, T0.plus_nanos(3 * H))
            .await
            .expect("renew"),
        "nothing held"
    );
}

/// An action claimed twice (the first claim let go by a device change,
/// the second taken afterwards) and started with both claims at once runs
/// under the second claim only.
pub async fn a_start_names_the_claim_each_action_runs_under(f: &Fixture) {
    with_device(f, "d1").await;
    let a = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let first = claim_ahead(&f.store, T0, T0.plus_nanos(H)).await;
    f.store
        .update_device(
            &tenant(),
            &device_id("d1"),
            None,
            |d| {
                d.display_name = "renamed".into();
                Ok(Retarget::No)
            },
            None,
            None,
        )
        .await
        .expect("update_device");
    let second = claim_ahead(&f.store, T0, T0.plus_nanos(H)).await;
    assert_eq!(second.jobs.len(), 1, "let go by the device change");
    assert_eq!(
        second
            .devices
            .values()
            .next()
            .map(|d| d.display_name.as_str()),
        Some("renamed"),
        "claimed again with the device as it is now"
    );
    f.clock.set(T0.plus_nanos(H));
    let started = f
        .store
        .start_due(&[first.due(), second.due()], T0.plus_nanos(H))
        .await
        .expect("start_due");
    assert_eq!(started.ready.len(), 1);
    assert_eq!(
        started.ready.get(&a.id.to_string()),
        Some(&second.owner),
        "only the live claim may run it"
    );

    // A claim whose lease ran out before its work fell due starts
    // nothing (another dispatcher may hold the work by then).
    with_device(f, "d2").await;
    let b = push(f, "d2", window(2 * H, Some(3 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let short = f
        .store
        .claim_ahead(
            T0.plus_nanos(2 * H - 5 * Ts::SECOND),
            T0.plus_nanos(2 * H),
            10,
            Ts::SECOND,
        )
        .await
        .expect("claim_ahead");
    assert_eq!(short.jobs.len(), 1);
    f.clock.set(T0.plus_nanos(2 * H));
    let lapsed = f
        .store
        .start_due(&[short.due()], T0.plus_nanos(2 * H))
        .await
        .expect("start_due");
    assert!(lapsed.ready.is_empty(), "{:?}", lapsed.ready);
    assert_eq!(get(f, "d2", &b).await.state, ActionState::Scheduled);
}

/// An observation never replaces a later one: a pass that read a device
/// before a dispatch recorded what it read back leaves the later state.
pub async fn an_older_observation_never_replaces_a_later_one(f: &Fixture) {
    let d = with_device(f, "d1").await;
    let seen = |soc: f64, at: Ts| Observed {
        scheduler_active: false,
        rows: vec![],
        soc_percent: Some(soc),
        mode: None,
        at,
    };
    let later = T0.plus_nanos(10 * Ts::SECOND);
    assert!(
        f.store
            .observe(&tenant(), &d, &seen(70.0, later))
            .await
            .unwrap()
    );
    let earlier = T0.plus_nanos(5 * Ts::SECOND);
    assert!(
        !f.store
            .observe(&tenant(), &d, &seen(10.0, earlier))
            .await
            .unwrap()
    );
    assert_eq!(
        f.store
            .observe_many(&[(tenant(), d.clone(), seen(20.0, earlier))])
            .await
            .unwrap(),
        0
    );
    let now = f.store.get_device(&tenant(), &d.id).await.unwrap();
    assert_eq!(
        now.observed.map(|o| (o.soc_percent, o.at)),
        Some((Some(70.0), later))
    );
    assert_eq!(
        f.store
            .observe_many(&[(tenant(), d, seen(30.0, T0.plus_nanos(20 * Ts::SECOND)))])
            .await
            .unwrap(),
        1
    );
}

/// A claim on work in flight (started when due) still holds the device
/// to its target; a cancel lets go of a claim taken ahead at once (its
/// row owes nothing: forgotten in time, and no device change is refused
/// over it); a cancel of an ACTIVE action whose revert was claimed ahead
/// lets that claim go too, so the revert owed now is claimed at once; a
/// cancel of one whose revert is in flight does not.
pub async fn claims_are_let_go_when_their_work_changes(f: &Fixture) {
    with_device(f, "d1").await;
    with_device(f, "d2").await;
    with_device(f, "d3").await;
    let retarget = |d: &mut Device| {
        d.oem_device_id = format!("{}-moved", d.oem_device_id);
        Ok(Retarget::Yes)
    };
    // Started: in flight, the retarget is refused.
    let flying = push(f, "d1", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    // Claimed ahead, then cancelled without a start.
    let dropped = push(f, "d2", window(H, Some(2 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    // ACTIVE, its revert claimed ahead, then cancelled.
    let active = push(
        f,
        "d3",
        window(H - Ts::SECOND, Some(H + 5 * Ts::SECOND)),
        Strategy::Reject,
    )
    .await
    .expect("push")
    .action;
    // ACTIVE, its revert in flight (claimed when due), then cancelled.
    with_device(f, "d4").await;
    let flight = push(
        f,
        "d4",
        window(H - 3 * Ts::SECOND, Some(H - Ts::SECOND)),
        Strategy::Reject,
    )
    .await
    .expect("push")
    .action;
    f.clock.set(T0.plus_nanos(H - Ts::SECOND));
    let jobs = claim(f).await;
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        applied(f, job, Some("m")).await;
    }
    let reverting = claim(f).await;
    assert_eq!(
        reverting
            .iter()
            .map(|j| (j.action.id, j.work))
            .collect::<Vec<_>>(),
        vec![(flight.id, Work::Revert)]
    );
    let ahead = claim_ahead(
        &f.store,
        T0.plus_nanos(H - Ts::SECOND),
        T0.plus_nanos(H + 10 * Ts::SECOND),
    )
    .await;
    let mut ids: Vec<ActionId> = ahead.jobs.iter().map(|j| j.action.id).collect();
    ids.sort();
    let mut want = vec![flying.id, dropped.id, active.id];
    want.sort();
    assert_eq!(ids, want);
    f.store
        .cancel_action(&tenant(), &device_id("d2"), &dropped.id, None, None)
        .await
        .expect("cancel");
    f.store
        .cancel_action(&tenant(), &device_id("d3"), &active.id, None, None)
        .await
        .expect("cancel");
    f.store
        .cancel_action(&tenant(), &device_id("d4"), &flight.id, None, None)
        .await
        .expect("cancel");
    f.store
        .update_device(&tenant(), &device_id("d2"), None, retarget, None, None)
        .await
        .expect("a cancelled action holds nothing");
    let owed = f
        .replica
        .claim_due(T0.plus_nanos(H - Ts::SECOND), 10, 4 * H)
        .await
        .expect("claim_due");
    assert_eq!(
        owed.len(),
        1,
        "the revert owed now is claimed at once; the one in flight keeps its claim"
    );
    assert_eq!((owed[0].action.id, owed[0].work), (active.id, Work::Revert));
    assert_eq!(
        f.store
            .prune_finished(T0.plus_nanos(2 * H), 10)
            .await
            .unwrap(),
        1,
        "the cancelled action is forgotten in time: nothing holds it"
    );
    f.clock.set(T0.plus_nanos(H));
    let started = f
        .store
        .start_due(&[ahead.due()], T0.plus_nanos(H))
        .await
        .expect("start_due");
    assert_eq!(
        started.ready.keys().collect::<Vec<_>>(),
        vec![&flying.id.to_string()]
    );
    assert!(matches!(
        f.store
            .update_device(&tenant(), &device_id("d1"), None, retarget, None, None)
            .await,
        Err(Error::WritesInForce { .. })
    ));
}

/// A start hands over the memos on record for the devices it starts
/// work on (and only those), oldest first; releasing a claim's unstarted
/// work leaves other claims alone.
pub async fn a_start_carries_its_devices_memos(f: &Fixture) {
    for d in ["d1", "d2"] {
        with_device(f, d).await;
    }
    let mut later = window(3 * H, Some(6 * H));
    later.channel = "power_limit".into();
    let mut held = vec![];
    // The later-starting one is pushed first: memos come by start, not
    // by booking.
    for (d, p) in [
        ("d1", later.clone()),
        ("d1", window(H, Some(6 * H))),
        ("d2", window(H, Some(20 * H))),
    ] {
        held.push(push(f, d, p, Strategy::Reject).await.expect("push").action);
    }
    held.swap(0, 1);
    for (at, done) in [
        (H, vec![(&held[0], "d1-early"), (&held[2], "d2")]),
        (3 * H, vec![(&held[1], "d1-late")]),
    ] {
        f.clock.set(T0.plus_nanos(at));
        let jobs = claim(f).await;
        assert_eq!(jobs.len(), done.len());
        for (a, memo) in done {
            let job = jobs.iter().find(|j| j.action.id == a.id).expect("due");
            applied(f, job, Some(memo)).await;
        }
    }
    // d1's windows end at 6 H, d2's at 20 H.
    let d1_next = push(f, "d1", window(7 * H, Some(8 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    f.clock.set(T0.plus_nanos(7 * H));
    let c = claim_ahead(&f.store, T0.plus_nanos(7 * H), T0.plus_nanos(7 * H)).await;
    // Everything due by 7 H: d1's two reverts and its next apply (d2's
    // window runs on).
    assert_eq!(c.jobs.len(), 3);
    let started = f
        .store
        .start_due(&[c.due()], T0.plus_nanos(7 * H))
        .await
        .expect("start_due");
    let memos = |d: &str| -> Vec<String> {
        started
            .memos
            .get(&(tenant().as_str().to_owned(), d.to_owned()))
            .map(|m| m.iter().map(|a| a.memo.clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(memos("d1"), vec!["d1-early", "d1-late"]);
    assert!(memos("d2").is_empty(), "no work of d2 starts");
    assert!(started.ready.contains_key(&d1_next.id.to_string()));

    // Release: of two claims taken ahead, only the released one's work
    // can be claimed again at once.
    with_device(f, "d3").await;
    with_device(f, "d4").await;
    let a3 = push(f, "d3", window(9 * H, Some(10 * H)), Strategy::Reject)
        .await
        .expect("push")
        .action;
    let c3 = claim_ahead(
        &f.store,
        T0.plus_nanos(9 * H - 5 * Ts::SECOND),
        T0.plus_nanos(9 * H),
    )
    .await;
    push(f, "d4", window(9 * H, Some(10 * H)), Strategy::Reject)
        .await
        .expect("push");
    let c4 = claim_ahead(
        &f.store,
        T0.plus_nanos(9 * H - 5 * Ts::SECOND),
        T0.plus_nanos(9 * H),
    )
    .await;
    assert_eq!((c3.jobs.len(), c4.jobs.len()), (1, 1));
    f.store
        .release(
            &c3.owner,
            &[a3.id.to_string(), c4.jobs[0].action.id.to_string()],
        )
        .await
        .expect("release");
    let again = claim_ahead(
        &f.replica,
        T0.plus_nanos(9 * H - 4 * Ts::SECOND),
        T0.plus_nanos(9 * H),
    )
    .await;
    assert_eq!(
        again.jobs.iter().map(|j| j.action.id).collect::<Vec<_>>(),
        vec![a3.id],
        "the other claim's work is still held"
    );
}

/// Outcomes recorded together are each written as if alone: every
/// column, per tenant, an answer without a raw body keeping the last one,
/// a revert clearing the memo; device states seen are kept only for the
/// configuration they were seen under; more than a statement's worth is
/// all recorded.
pub async fn outcomes_recorded_together_are_each_written_alone(f: &Fixture) {
    let other = TenantId::from_stored("other-tenant".to_owned());
    for d in ["d1", "d2", "d3"] {
        with_device(f, d).await;
    }
    let theirs_device = f
        .store
        .create_device(&other, device("d1"), None)
        .await
        .expect("create in the other tenant");
    let pushed = pushed_from_h_to_2h(f, &["d1", "d2", "d3"]).await;
    let theirs = f
        .store
        .push(
            &other,
            &device_id("d1"),
            |_, _| Ok(window(H, Some(2 * H))),
            Strategy::Reject,
            false,
            None,
        )
        .await
        .expect("push as the other tenant")
        .action;
    f.clock.set(T0.plus_nanos(H));
    let jobs = f
        .store
        .claim_due(T0.plus_nanos(H), 10, 4 * H)
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 4);
    let job = |id: ActionId| {
        jobs.iter()
            .find(|j| j.action.id == id)
            .expect("claimed")
            .clone()
    };
    let at = T0.plus_nanos(H + Ts::SECOND);
    let seen = |soc: f64, at: Ts| Observed {
        scheduler_active: false,
        rows: vec![],
        soc_percent: Some(soc),
        mode: None,
        at,
    };
    let d2 = f
        .store
        .get_device(&tenant(), &device_id("d2"))
        .await
        .unwrap();
    let d3 = f
        .store
        .get_device(&tenant(), &device_id("d3"))
        .await
        .unwrap();
    // d3 changes after the job was claimed: its state seen is stale.
    f.store
        .update_device(
            &tenant(),
            &device_id("d3"),
            None,
            |d| {
                d.timezone = "Europe/Berlin".into();
                Ok(Retarget::No)
            },
            None,
            None,
        )
        .await
        .unwrap();
    let mut outcomes = vec![
        super::Outcome {
            job: job(pushed[0].id).into(),
            finish: Finish::Applied {
                raw: "raw-1".into(),
                verified: true,
                memo: Some("memo-1".into()),
            },
            at,
            observed: None,
        },
        super::Outcome {
            job: job(pushed[1].id).into(),
            finish: Finish::Retry {
                due: T0.plus_nanos(H + 60 * Ts::SECOND),
                message: "later".into(),
                raw: Some("raw-2".into()),
                memo: None,
            },
            at,
            observed: Some(((&d2).into(), seen(20.0, at))),
        },
        super::Outcome {
            job: job(pushed[2].id).into(),
            finish: Finish::Failed {
                code: "OEM_REJECTED".into(),
                message: "no".into(),
                raw: Some("raw-3".into()),
                revert: false,
                memo: None,
            },
            at,
            observed: Some(((&d3).into(), seen(30.0, at))),
        },
        super::Outcome {
            job: job(theirs.id).into(),
            finish: Finish::Applied {
                raw: "raw-theirs".into(),
                verified: false,
                memo: None,
            },
            at,
            observed: Some(((&theirs_device).into(), seen(40.0, at))),
        },
    ];
    f.store.record(&mut outcomes).await.expect("record");
    let a1 = get(f, "d1", &pushed[0]).await;
    assert_eq!(
        (
            a1.state,
            a1.verified,
            a1.oem_response.as_deref(),
            a1.updated,
            a1.revision
        ),
        (
            ActionState::Active,
            true,
            Some("raw-1"),
            at,
            pushed[0].revision + 2
        )
    );
    let a2 = get(f, "d2", &pushed[1]).await;
    assert_eq!(
        (a2.state, a2.oem_response.as_deref()),
        (ActionState::Acknowledged, Some("raw-2"))
    );
    // Tried again, and failing again without a raw answer: the last one
    // is kept; the tries and the message are the new ones.
    f.clock.set(T0.plus_nanos(H + 60 * Ts::SECOND));
    let again = f
        .store
        .claim_due(T0.plus_nanos(H + 60 * Ts::SECOND), 10, 4 * H)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    f.store
        .record(&mut [super::Outcome {
            job: (&again[0]).into(),
            finish: Finish::Retry {
                due: T0.plus_nanos(H + 180 * Ts::SECOND),
                message: "again".into(),
                raw: None,
                memo: None,
            },
            at: T0.plus_nanos(H + 61 * Ts::SECOND),
            observed: None,
        }])
        .await
        .unwrap();
    let a2 = get(f, "d2", &pushed[1]).await;
    assert_eq!(
        a2.oem_response.as_deref(),
        Some("raw-2"),
        "no raw answer: the last kept"
    );
    assert!(
        a2.error_message
            .as_deref()
            .is_some_and(|m| m.contains("again")),
        "{a2:?}"
    );
    assert_eq!(a2.updated, T0.plus_nanos(H + 61 * Ts::SECOND));
    let a3 = get(f, "d3", &pushed[2]).await;
    assert_eq!(
        (
            a3.state,
            a3.error_code.as_deref(),
            a3.oem_response.as_deref()
        ),
        (ActionState::Failed, Some("OEM_REJECTED"), Some("raw-3"))
    );
    let t = f
        .store
        .get_action(&other, &device_id("d1"), &theirs.id)
        .await
        .unwrap();
    assert_eq!(
        (t.state, t.oem_response.as_deref()),
        (ActionState::Active, Some("raw-theirs"))
    );
    let soc = |tenant: TenantId, d: &'static str| {
        let store = f.store.clone();
        async move {
            store
                .get_device(&tenant, &device_id(d))
                .await
                .unwrap()
                .observed
                .and_then(|o| o.soc_percent)
        }
    };
    assert_eq!(soc(tenant(), "d2").await, Some(20.0));
    assert_eq!(
        soc(tenant(), "d3").await,
        None,
        "seen under a configuration changed since"
    );
    assert_eq!(soc(other.clone(), "d1").await, Some(40.0));
    // The memo is on record until the revert, which clears it and keeps
    // the raw answer of the revert.
    assert_eq!(
        f.store
            .memos(&tenant(), &device_id("d1"))
            .await
            .unwrap()
            .len(),
        1
    );
    f.clock.set(T0.plus_nanos(2 * H));
    let revert = f
        .store
        .claim_due(T0.plus_nanos(2 * H), 10, 4 * H)
        .await
        .unwrap()
        .into_iter()
        .find(|j| j.action.id == pushed[0].id)
        .expect("its revert");
    f.store
        .record(&mut [super::Outcome {
            job: revert.into(),
            finish: Finish::Reverted {
                raw: "raw-undo".into(),
                verified: true,
            },
            at: T0.plus_nanos(2 * H),
            observed: None,
        }])
        .await
        .unwrap();
    assert!(
        f.store
            .memos(&tenant(), &device_id("d1"))
            .await
            .unwrap()
            .is_empty()
    );
    let done = get(f, "d1", &pushed[0]).await;
    assert_eq!(
        (done.state, done.oem_response.as_deref()),
        (ActionState::Completed, Some("raw-undo"))
    );
    let trail: Vec<String> = f
        .store
        .action_history(&tenant(), &pushed[0].id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, to, _)| to)
        .collect();
    assert_eq!(
        trail,
        vec!["SCHEDULED", "ACKNOWLEDGED", "ACTIVE", "COMPLETED"]
    );

    // More than one statement's worth (256 rows), all recorded.
    const MANY: usize = 300;
    let start = 10 * H;
    for i in 0..MANY {
        let id = format!("m{i}");
        with_device(f, &id).await;
        push(f, &id, window(start, Some(start + H)), Strategy::Reject)
            .await
            .expect("push");
    }
    f.clock.set(T0.plus_nanos(start));
    let jobs: Vec<super::Job> = f
        .store
        .claim_due(T0.plus_nanos(start), 1000, 4 * H)
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.action.device_id.as_str().starts_with('m'))
        .collect();
    assert_eq!(jobs.len(), MANY);
    let mut outcomes: Vec<super::Outcome> = jobs
        .into_iter()
        .map(|job| super::Outcome {
            job: job.into(),
            finish: Finish::Applied {
                raw: "ok".into(),
                verified: true,
                memo: None,
            },
            at: T0.plus_nanos(start),
            observed: None,
        })
        .collect();
    f.store.record(&mut outcomes).await.unwrap();
    let active = f
        .store
        .list_actions(
            &tenant(),
            ActionQuery {
                device: None,
                states: &[ActionState::Active],
                before: None,
                limit: 1000,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        active
            .iter()
            .filter(|a| a.device_id.as_str().starts_with('m'))
            .count(),
        MANY
    );
}

/// Registers one `#[tokio::test]` per contract rule in a module named
/// `$backend`, each on a fresh fixture: `$fixture` is an expression
/// evaluated inside each (async) test, so it may end in `.await`; it gives a
/// [`Fixture`] or an `Option<Fixture>` ([`IntoFixture`]).
#[macro_export]
macro_rules! storage_contract_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            $crate::storage_contract_suite!(@rules $fixture;
                a_device_round_trips_and_its_id_is_unique,
                a_stale_etag_changes_nothing,
                a_push_round_trips_and_is_audited,
                a_push_under_a_request_id_stores_each_value_in_its_place,
                overlapping_holders_collide,
                a_group_commits_its_successes_around_its_failures,
                a_group_never_answers_success_for_what_it_did_not_write,
                pushes_queued_together_are_decided_as_if_alone,
                pushes_passed_over_keep_their_order,
                requests_on_many_devices_sent_to_two_replicas_are_applied_once,
                a_long_holder_is_seen_past_a_later_action_that_gave_way,
                a_request_sent_to_two_replicas_at_once_is_applied_once,
                cancel_and_replace_replaces_atomically,
                queue_after_starts_at_the_holders_end,
                validate_only_writes_nothing,
                idempotency_replays_and_refuses_another_body,
                due_work_is_claimed_once_per_lease,
                an_outcome_counts_only_under_its_claim,
                a_memo_is_on_record_until_the_revert,
                a_client_cancel_follows_the_lifecycle,
                delete_is_refused_while_actions_hold_a_channel,
                actions_page_newest_first,
                an_observation_is_kept_only_for_its_configuration,
                each_claim_takes_a_larger_fencing_token,
                retries_count_and_postponements_do_not,
                a_replaced_action_owes_no_work,
                memos_come_oldest_first,
                what_holds_a_channel,
                tenants_see_only_their_own,
                tenants_and_keys_round_trip,
                concurrent_overlapping_pushes_book_one,
                concurrent_claims_never_share_work,
                concurrent_requests_with_one_id_run_once,
                old_finished_actions_are_forgotten_with_their_trail,
                finished_actions_of_an_earlier_version_are_stamped_then_forgotten,
                work_claimed_ahead_starts_when_due_if_still_owed,
                a_device_change_takes_back_work_claimed_ahead,
                a_start_names_the_claim_each_action_runs_under,
                a_start_starts_only_the_actions_it_names,
                work_not_started_in_time_is_not_ready,
                a_renewed_claim_holds_its_work_past_its_rows_lease,
                claims_are_let_go_when_their_work_changes,
                a_start_carries_its_devices_memos,
                outcomes_recorded_together_are_each_written_alone,
                an_older_observation_never_replaces_a_later_one,
            );
        }
    };
    (@rules $fixture:expr; $($rule:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $rule() {
                // `None`: the backend is not reachable here (its harness
                // has said so loudly, and fails the run under CI=true).
                let Some(fixture) = $crate::store::contract::IntoFixture::into_fixture($fixture)
                else {
                    return;
                };
                $crate::store::contract::$rule(&fixture).await;
                $crate::store::contract::holders_owe_work(&fixture).await;
            }
        )*
    };
}
