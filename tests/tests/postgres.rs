//! The PostgreSQL test harness (`switchyard_tests::postgres`): each test
//! gets a database of its own on a reachable server, and a CI run never
//! passes without one.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use sqlx::{Connection, Executor, PgConnection, Row};
use switchyard_tests::postgres;

#[tokio::test]
async fn each_test_gets_a_postgres_database_of_its_own() {
    let (Some(a), Some(b)) = (postgres::database().await, postgres::database().await) else {
        return; // said loudly by the harness (and impossible under CI=true)
    };
    assert_ne!(a.url, b.url);
    let mut ca = PgConnection::connect(&a.url).await.unwrap();
    ca.execute("CREATE TABLE mine (x INT)").await.unwrap();
    let mut cb = PgConnection::connect(&b.url).await.unwrap();
    let seen: i64 = sqlx::query("SELECT count(*) FROM pg_tables WHERE tablename = 'mine'")
        .fetch_one(&mut cb)
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 0, "another test's table is not in this database");
    // btree_gist, which the store's exclusion constraint will need, is
    // available to a database owner.
    ca.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        .await
        .unwrap();
    drop((ca, cb));
    let url = a.url.clone();
    a.drop_database().await;
    b.drop_database().await;
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "the test database is gone"
    );
}

mod store_on_postgres {
    //! What only PostgreSQL does for the store: the migrations under an
    //! advisory lock, and the exclusion constraint behind the application's
    //! collision check.

    use std::{collections::BTreeMap, sync::Arc};

    use sqlx::{Connection, Executor, PgConnection, Row};
    use switchyard::{
        domain::{
            Command, DeviceId, Error, ManualClock, Params, Strategy, TenantId, Ts,
            validate::ValidPush,
        },
        store::Store,
    };
    use switchyard_tests::postgres;

    const T0: Ts = Ts(1_893_456_000 * Ts::SECOND);
    const H: i64 = 3600 * Ts::SECOND;

    use switchyard::store::contract::device;

    /// An action row written past the store (channel holders on device
    /// `d`), for what the database itself must refuse or accept.
    /// An action row as the service writes it: a holder owes its work
    /// (SCHEDULED and ACKNOWLEDGED the apply at its start, ACTIVE the
    /// revert at its end).
    fn raw_action(id: &str, state: &str, channel: &str, start: i64, end: Option<i64>) -> String {
        // Finished rows as this version writes them: stamped when they
        // came to owe nothing (here their last change, 0).
        let (work, due, finished) = match state {
            "SCHEDULED" | "ACKNOWLEDGED" => ("APPLY", start.to_string(), "NULL"),
            "ACTIVE" => (
                "REVERT",
                end.map_or("NULL".to_owned(), |e| e.to_string()),
                "NULL",
            ),
            _ => ("NONE", "NULL".to_owned(), "0"),
        };
        let end = end.map_or("NULL".to_owned(), |e| e.to_string());
        format!(
            "INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns,
               immediate, state, queued_after, revision, create_ns, update_ns, work, due_ns, finished_ns)
             VALUES ('default', '{id}', 'd', '{channel}', 'CHARGE', {start}, {end}, FALSE, '{state}', '', 1, 0, 0,
               '{work}', {due}, {finished})"
        )
    }

    /// A dispatch claim (lease_owner, lease_until_ns and fence of every
    /// row of a burst) and its start (state, revision and update_ns) can
    /// be heap-only updates: no index of `actions` names a column they
    /// change, in its keys or its predicate (the exclusion constraint's
    /// among them, over owed rows), and pages keep room for the new
    /// versions.
    #[tokio::test]
    async fn no_index_names_what_a_claim_or_a_start_changes() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let defs: Vec<String> =
            sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = 'actions'")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert!(defs.len() >= 8, "{defs:?}");
        // A start's columns, then a claim's (migration 26).
        for def in &defs {
            for column in [
                "state",
                "revision",
                "update_ns",
                "lease_owner",
                "lease_until_ns",
                "fence",
            ] {
                assert!(!def.contains(column), "{column} in {def}");
            }
        }
        let overlap: String = sqlx::query_scalar(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'actions_no_overlap'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(
            overlap.starts_with("EXCLUDE USING gist")
                && overlap.ends_with("WHERE ((work <> 'NONE'::text))"),
            "{overlap}"
        );
        let options: Vec<String> =
            sqlx::query_scalar("SELECT unnest(reloptions) FROM pg_class WHERE relname = 'actions'")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(options, ["fillfactor=50"]);
        drop(conn);
        store.close().await;
        db.drop_database().await;
    }

    /// Migration 24 states the exclusion constraint over owed rows, the
    /// same as the holding ones only while nothing owes work without
    /// holding its channel: a database with such a row (hand-edited) is
    /// refused, naming it, and left as it was.
    #[tokio::test]
    async fn the_constraint_over_owed_rows_refuses_a_row_owing_without_holding() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        store
            .create_device(&TenantId::default_tenant(), device("d"), None)
            .await
            .unwrap();
        store.close().await;
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        // Back to migration 23, with the constraint as migration 7 made
        // it, and a COMPLETED row still owing its apply.
        conn.execute(
            "ALTER TABLE actions DROP CONSTRAINT actions_no_overlap;
             ALTER TABLE actions ADD CONSTRAINT actions_no_overlap EXCLUDE USING gist (
                 tenant_id WITH =, device_id WITH =, channel WITH =,
                 int8range(start_ns, end_ns) WITH &&
             ) WHERE (state IN ('SCHEDULED', 'ACKNOWLEDGED', 'ACTIVE') OR work = 'REVERT');
             DELETE FROM schema_migrations WHERE version >= 24;",
        )
        .await
        .unwrap();
        conn.execute(sqlx::AssertSqlSafe(raw_action(
            "a-held",
            "SCHEDULED",
            "mode",
            H,
            Some(2 * H),
        )))
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns,
               immediate, state, queued_after, revision, create_ns, update_ns, work, due_ns)
             VALUES ('default', 'a-stray', 'd', 'mode', 'CHARGE', 3600000000000, 7200000000000,
               FALSE, 'COMPLETED', '', 1, 0, 0, 'APPLY', 0)",
        )
        .await
        .unwrap();
        let Err(refused) = Store::open(&db.url, Arc::new(ManualClock::new(T0))).await else {
            panic!("migration 24 refuses the database");
        };
        let text = refused.to_string();
        assert!(
            text.contains("owe work without holding their channel: a-stray"),
            "{text}"
        );
        // Rolled back: the constraint is still the one of migration 7.
        let overlap: String = sqlx::query_scalar(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'actions_no_overlap'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(overlap.contains("state"), "{overlap}");
        // Mended, it goes through.
        conn.execute("UPDATE actions SET work = 'NONE', due_ns = NULL WHERE action_id = 'a-stray'")
            .await
            .unwrap();
        Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap()
            .close()
            .await;
        drop(conn);
        db.drop_database().await;
    }

    /// An audit entry that commits after a later-numbered one is not
    /// skipped by a watcher that read the later one first: events are read
    /// by the cursor stamped once they are committed, not by the number
    /// taken at insert.
    #[tokio::test]
    async fn an_event_committed_late_is_not_skipped() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d1"), None)
            .await
            .unwrap();
        // A transaction that takes its number now and commits last.
        let mut late = PgConnection::connect(&db.url).await.unwrap();
        late.execute("BEGIN").await.unwrap();
        late.execute(
            "INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, at_ns)
             VALUES ('default', 'd1', 'late-action', NULL, 'SCHEDULED', 'PUSHED', 1)",
        )
        .await
        .unwrap();
        store
            .create_device(&tenant, device("d2"), None)
            .await
            .unwrap();
        store.stamp_events().await.unwrap();
        let seen = store.events_after(&tenant, 0, None, 100).await.unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[1].device_id, "d2");
        let last = seen[1].cursor;
        late.execute("COMMIT").await.unwrap();
        store.stamp_events().await.unwrap();
        let next = store.events_after(&tenant, last, None, 100).await.unwrap();
        assert_eq!(next.len(), 1, "{next:?}");
        assert_eq!(next[0].action_id.as_deref(), Some("late-action"));
        assert!(next[0].cursor > last);
        // Stamped once: stamping again changes nothing.
        assert_eq!(store.stamp_events().await.unwrap(), 0);
        store.close().await;
        drop(late);
        db.drop_database().await;
    }

    /// A cursor forgotten with its action (the newest there was) is never
    /// given to another event: numbering goes on past the horizon.
    #[tokio::test]
    async fn a_forgotten_cursor_is_never_given_again() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d"), None)
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        conn.execute(sqlx::AssertSqlSafe(raw_action(
            "a-old",
            "CANCELLED",
            "mode",
            H,
            Some(2 * H),
        )))
        .await
        .unwrap();
        conn.execute(
            "INSERT INTO audit_log (tenant_id, device_id, action_id, from_state, to_state, reason, at_ns)
             VALUES ('default', 'd', 'a-old', NULL, 'SCHEDULED', 'PUSHED', 1),
                    ('default', 'd', 'a-old', 'SCHEDULED', 'CANCELLED', 'CANCELLED_BY_CLIENT', 2)",
        )
        .await
        .unwrap();
        assert_eq!(store.stamp_events().await.unwrap(), 3);
        let all = store.events_after(&tenant, 0, None, 10).await.unwrap();
        let top = all.last().unwrap().cursor;
        assert_eq!(all.last().unwrap().action_id.as_deref(), Some("a-old"));
        assert_eq!(store.prune_finished(T0, 10).await.unwrap(), 1);
        assert_eq!(store.event_horizon(&tenant).await.unwrap(), top);
        store
            .create_device(&tenant, device("d2"), None)
            .await
            .unwrap();
        assert_eq!(store.stamp_events().await.unwrap(), 1);
        let next = store.events_after(&tenant, top, None, 10).await.unwrap();
        assert_eq!(next.len(), 1, "{next:?}");
        assert!(next[0].cursor > top, "{} reused", next[0].cursor);
        assert_eq!(next[0].device_id, "d2");
        store.close().await;
        drop(conn);
        db.drop_database().await;
    }

    /// Replicas started together on an empty database: every one opens,
    /// and each migration is applied once.
    #[tokio::test]
    async fn replicas_started_together_migrate_once() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let clock = || Arc::new(ManualClock::new(T0)) as Arc<dyn switchyard::domain::Clock>;
        let (a, b, c, d) = tokio::join!(
            Store::open(&db.url, clock()),
            Store::open(&db.url, clock()),
            Store::open(&db.url, clock()),
            Store::open(&db.url, clock()),
        );
        for s in [a, b, c, d] {
            s.unwrap().close().await;
        }
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let rows = sqlx::query(
            "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version ORDER BY version",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let versions: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(versions.len() >= 8, "{versions:?}");
        assert!(versions.iter().all(|(_, n)| *n == 1), "{versions:?}");
        // Opening again applies nothing.
        assert_eq!(
            Store::migrate_only(&db.url, clock()).await.unwrap(),
            Vec::<i64>::new()
        );
        drop(conn);
        db.drop_database().await;
    }

    /// A storm's claims are recorded at most two at a time on a pool of
    /// sixteen (one per eight connections): the rest wait their turn in
    /// the process rather than hold every connection of the pool (their
    /// lease renewals then timed out and the claims lapsed). Every
    /// outcome is still recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dispatch_records_take_turns_for_the_pool() {
        use switchyard::store::{Finish, Outcome};
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        let tenant = TenantId::default_tenant();
        const DEVICES: usize = 40;
        for i in 0..DEVICES {
            let id = format!("r{i}");
            store
                .create_device(&tenant, device(&id), None)
                .await
                .unwrap();
            push_window(&store, &id, H, 2 * H).await.unwrap();
        }
        let jobs = store
            .claim_due(T0.plus_nanos(H), 1000, 4 * H)
            .await
            .unwrap();
        assert_eq!(jobs.len(), DEVICES);
        assert_eq!(store.records_at_once(), 0);
        // Twenty claims' records at once, two outcomes each.
        let records = jobs.chunks(2).map(|pair| {
            let store = store.clone();
            let mut outcomes: Vec<Outcome> = pair
                .iter()
                .map(|job| Outcome {
                    job: job.into(),
                    finish: Finish::Applied {
                        raw: "ok".into(),
                        verified: true,
                        memo: None,
                    },
                    at: T0.plus_nanos(H),
                    observed: None,
                })
                .collect();
            tokio::spawn(async move { store.record(&mut outcomes).await })
        });
        for r in futures::future::join_all(records).await {
            r.unwrap().unwrap();
        }
        assert_eq!(store.records_at_once(), 2);
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM actions WHERE state = 'ACTIVE' AND device_id LIKE 'r%'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(active, DEVICES as i64);
        drop(conn);
        store.close().await;
        db.drop_database().await;
    }

    /// The database itself refuses a second holding action overlapping a
    /// first on the same channel, whatever wrote it: the guarantee does not
    /// rest on the application's check alone. Not holding, another channel,
    /// or back to back: accepted.
    #[tokio::test]
    async fn the_database_refuses_an_overlap_the_application_did_not_check() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d"), None)
            .await
            .unwrap();
        let booked = store
            .push(
                &tenant,
                &DeviceId::parse("d").unwrap(),
                |_, _| {
                    Ok(ValidPush {
                        command: Command::Charge,
                        channel: "mode".into(),
                        params: Params::default(),
                        start: T0.plus_nanos(H),
                        end: Some(T0.plus_nanos(3 * H)),
                        immediate: false,
                    })
                },
                Strategy::Reject,
                false,
                None,
            )
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        // Rows written past the store, each under an id of its own.
        let ids: BTreeMap<&str, String> = [
            "overlap",
            "inside",
            "open",
            "cancelled",
            "other-channel",
            "after",
            "before",
        ]
        .into_iter()
        .map(|n| (n, switchyard::domain::ActionId::generate().to_string()))
        .collect();
        let copy = |name: &str, state: &str, channel: &str, start: i64, end: Option<i64>| {
            raw_action(&ids[name], state, channel, start, end)
        };
        let (t1, t2, t3) = (
            T0.plus_nanos(H).0,
            T0.plus_nanos(2 * H).0,
            T0.plus_nanos(3 * H).0,
        );
        for (id, state, channel, start, end) in [
            ("overlap", "SCHEDULED", "mode", t2, Some(t3 + H)),
            ("inside", "ACTIVE", "mode", t2, Some(t2 + 1)),
            ("open", "ACKNOWLEDGED", "mode", 0, None),
        ] {
            let e = conn
                .execute(sqlx::AssertSqlSafe(copy(id, state, channel, start, end)))
                .await
                .expect_err(id);
            let code = e
                .as_database_error()
                .and_then(|d| d.code())
                .unwrap_or_default();
            assert_eq!(code, "23P01", "{id}: {e}");
        }
        for (id, state, channel, start, end) in [
            ("cancelled", "CANCELLED", "mode", t2, Some(t3)),
            ("other-channel", "SCHEDULED", "power", t1, Some(t3)),
            ("after", "SCHEDULED", "mode", t3, Some(t3 + H)),
            ("before", "SCHEDULED", "mode", 0, Some(t1)),
        ] {
            conn.execute(sqlx::AssertSqlSafe(copy(id, state, channel, start, end)))
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        // A cancelled action whose revert is owed still holds its channel.
        let e = conn
            .execute(sqlx::AssertSqlSafe(format!(
                "UPDATE actions SET work = 'REVERT' WHERE action_id = '{}'",
                ids["cancelled"]
            )))
            .await
            .expect_err("a revert owed holds the channel");
        assert_eq!(
            e.as_database_error()
                .and_then(|d| d.code())
                .unwrap_or_default(),
            "23P01"
        );
        // The store, going through its own check, names the holder.
        let refused = store
            .push(
                &tenant,
                &DeviceId::parse("d").unwrap(),
                |_, _| {
                    Ok(ValidPush {
                        command: Command::Discharge,
                        channel: "mode".into(),
                        params: Params::default(),
                        start: T0.plus_nanos(2 * H),
                        end: Some(T0.plus_nanos(2 * H + 60 * Ts::SECOND)),
                        immediate: false,
                    })
                },
                Strategy::Reject,
                false,
                None,
            )
            .await
            .expect_err("overlaps the booked action");
        match refused {
            Error::Conflict(c) => assert!(
                c.colliders.iter().any(|h| h.id == booked.action.id),
                "{c:?}"
            ),
            other => panic!("{other:?}"),
        }
        store.close().await;
        drop(conn);
        db.drop_database().await;
    }

    /// Nothing listens: opening is a retryable storage fault, not a hang.
    #[tokio::test]
    async fn an_unreachable_server_is_storage_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        let e = Store::open(
            &format!("postgres://postgres@127.0.0.1:{port}/x"),
            Arc::new(ManualClock::new(T0)),
        )
        .await
        .expect_err("nothing listens");
        assert!(matches!(e, Error::StorageUnavailable(_)), "{e:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(15));
    }

    /// `write_lanes` sets how many writers the pool has: with one, every
    /// device's writes queue in it; by default (a quarter of the pool), not.
    #[tokio::test]
    async fn the_writers_are_as_many_as_set() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let ids: Vec<String> = (0..64).map(|i| format!("d{i}")).collect();
        let lanes_apart = |store: &Store| ids.iter().any(|d| !store.same_lane("d0", d));
        let one = Store::open_with(
            &db.url,
            Arc::new(ManualClock::new(T0)),
            &switchyard::store::StoreOptions {
                write_lanes: 1,
                ..switchyard::store::StoreOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(!lanes_apart(&one), "one writer");
        let default = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        assert!(lanes_apart(&default), "a quarter of the pool");
        one.close().await;
        default.close().await;
        db.drop_database().await;
    }

    /// A push under `request_id` as the API sends it, its answer the
    /// action's id.
    async fn push_keyed(
        store: Store,
        dev: String,
        start: i64,
        request_id: Option<&'static str>,
    ) -> Result<switchyard::store::Written<switchyard::store::PushOutcome>, Error> {
        store
            .push_once(
                &TenantId::default_tenant(),
                &DeviceId::parse(&dev).unwrap(),
                move |_, _| {
                    Ok(ValidPush {
                        command: Command::Charge,
                        channel: "mode".into(),
                        params: Params::default(),
                        start: T0.plus_nanos(start),
                        end: Some(T0.plus_nanos(start + H)),
                        immediate: false,
                    })
                },
                Strategy::Reject,
                request_id.map(|r| switchyard::store::IdemRequest {
                    request_id: r.to_owned(),
                    method: "PushAction",
                    body: b"the same request".to_vec(),
                    encode: Arc::new(|o: &switchyard::store::PushOutcome| {
                        o.action.id.to_string().into_bytes()
                    }),
                }),
            )
            .await
    }

    /// A batch of pushes (ADR 0016) racing another replica's copy of one
    /// of its requests, written but not yet committed when the batch
    /// reads. `copy_on`: the device the copy books. On the batch's own
    /// device, the batch waits for the device's lock, then reads the
    /// copy's action among the holders: the member is refused there and
    /// runs alone, where its key replays the copy's answer; the other
    /// member is written by the batch. On another device, the batch waits
    /// at writing the key, which the copy took: the batch is rolled back
    /// and both run alone, the one replaying, the other booked.
    async fn a_batch_races_a_copy_on_another_replica(same_device: bool) {
        let Some(db) = postgres::database().await else {
            return;
        };
        let clock = Arc::new(ManualClock::new(T0));
        let store = Store::open(&db.url, clock.clone()).await.unwrap();
        // The replica's group stays open while its writer is held.
        let replica = Store::open_with(
            &db.url,
            clock,
            &switchyard::store::StoreOptions {
                group_open: std::time::Duration::from_secs(60),
                ..switchyard::store::StoreOptions::default()
            },
        )
        .await
        .unwrap();
        let mut lane: Vec<String> = (2..400)
            .map(|i| format!("d{i}"))
            .filter(|d| store.same_lane("d1", d))
            .take(2)
            .collect();
        lane.insert(0, "d1".into());
        for d in lane.iter().chain(["z1".to_owned()].iter()) {
            store
                .create_device(&TenantId::default_tenant(), device(d), None)
                .await
                .unwrap();
        }
        let (mine, other) = (lane[1].clone(), lane[2].clone());
        let copy_on = if same_device {
            mine.clone()
        } else {
            "z1".to_owned()
        };

        // The replica writes the copy and holds its group open.
        let (entered, inside) = tokio::sync::oneshot::channel();
        let (release_first, released) = tokio::sync::oneshot::channel();
        let r = replica.clone();
        let key = copy_on.clone();
        let first = tokio::spawn(async move { r.hold_writer(&key, entered, released).await });
        inside.await.unwrap();
        let q = replica.write_groups().queued;
        let copy = tokio::spawn(push_keyed(
            replica.clone(),
            copy_on.clone(),
            H,
            Some("raced"),
        ));
        switchyard::store::contract::wait_queued(&replica, q + 1).await;
        let (entered, after_copy) = tokio::sync::oneshot::channel();
        let (release_copy, released) = tokio::sync::oneshot::channel();
        let r = replica.clone();
        let key = copy_on.clone();
        let second = tokio::spawn(async move { r.hold_writer(&key, entered, released).await });
        switchyard::store::contract::wait_queued(&replica, q + 2).await;
        release_first.send(()).unwrap();
        after_copy.await.unwrap();

        // The batch: the same request on `mine`, a plain push on `other`.
        let before = store.write_groups();
        let (entered, inside) = tokio::sync::oneshot::channel();
        let (release, released) = tokio::sync::oneshot::channel();
        let s = store.clone();
        let held = tokio::spawn(async move { s.hold_writer("d1", entered, released).await });
        inside.await.unwrap();
        let raced = tokio::spawn(push_keyed(store.clone(), mine.clone(), H, Some("raced")));
        switchyard::store::contract::wait_queued(&store, before.queued + 2).await;
        let plain = tokio::spawn(push_keyed(store.clone(), other.clone(), H, None));
        switchyard::store::contract::wait_queued(&store, before.queued + 3).await;
        release.send(()).unwrap();
        // The batch waits for a lock the copy's group holds (in the held
        // member's group, or the next).
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap();
                if waiting > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the batch waits for the copy's lock");
        release_copy.send(()).unwrap();
        second.await.unwrap().unwrap();
        first.await.unwrap().unwrap();
        held.await.unwrap().unwrap();

        use switchyard::store::Written;
        let copied = match copy.await.unwrap() {
            Ok(Written::Fresh(o)) => o,
            other => panic!("the copy is booked: {other:?}"),
        };
        match raced.await.unwrap() {
            Ok(Written::Replayed(bytes)) => {
                assert_eq!(bytes, copied.action.id.to_string().into_bytes());
            }
            other => panic!("the batch's copy replays: {other:?}"),
        }
        let booked = match plain.await.unwrap() {
            Ok(Written::Fresh(o)) => o,
            other => panic!("the plain push is booked: {other:?}"),
        };
        assert_eq!(booked.action.device_id.as_str(), other);
        let after = store.write_groups();
        assert_eq!(
            after.batched - before.batched,
            u64::from(same_device),
            "written by the batch: {before:?} → {after:?}"
        );
        let tenant = TenantId::default_tenant();
        let on = |d| switchyard::store::contract::actions_on(&store, &tenant, d);
        assert_eq!(on(&copy_on).await, 1, "the copy's action alone");
        if !same_device {
            assert_eq!(on(&mine).await, 0, "nothing of the batch's copy");
        }
        assert_eq!(on(&other).await, 1);
        drop(conn);
        store.close().await;
        replica.close().await;
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_meeting_a_copy_of_its_request_on_its_device_replays_it() {
        a_batch_races_a_copy_on_another_replica(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_meeting_a_copy_of_its_request_at_its_key_falls_back_and_replays_it() {
        a_batch_races_a_copy_on_another_replica(false).await;
    }

    async fn push_window(
        store: &Store,
        dev: &str,
        start: i64,
        end: i64,
    ) -> Result<switchyard::store::PushOutcome, Error> {
        store
            .push(
                &TenantId::default_tenant(),
                &DeviceId::parse(dev).unwrap(),
                move |_, _| {
                    Ok(ValidPush {
                        command: Command::Charge,
                        channel: "mode".into(),
                        params: Params::default(),
                        start: T0.plus_nanos(start),
                        end: Some(T0.plus_nanos(end)),
                        immediate: false,
                    })
                },
                Strategy::Reject,
                false,
                None,
            )
            .await
    }

    /// The store's connections to PostgreSQL have TCP_NODELAY: sqlx
    /// 0.9.0 leaves Nagle's algorithm on, and `store::nodelay` sets it as
    /// each connection is made (a statement larger than a segment would
    /// otherwise wait for the server's delayed ACK). The store's sockets
    /// are told from any other of the process by their local ports, which
    /// the server lists as its connections' `client_port` in the test's
    /// own database.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_stores_connections_have_tcp_nodelay() {
        use std::str::FromStr;
        let Some(db) = postgres::database().await else {
            return;
        };
        let options = sqlx::postgres::PgConnectOptions::from_str(&db.url).expect("the test's URL");
        let (host, port) = (options.get_host().to_owned(), options.get_port());
        let store = opened(&db.url).await;
        store
            .create_device(&TenantId::default_tenant(), device("d"), None)
            .await
            .unwrap();
        // A connection of the test's own, to list the store's. (Whether it
        // has TCP_NODELAY is not asserted: another test's store, connecting
        // meanwhile in this process, sets it on every socket towards the
        // server.)
        let mut own = PgConnection::connect(&db.url).await.unwrap();
        let stores: Vec<i32> = sqlx::query_scalar(
            "SELECT client_port FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND client_port > 0",
        )
        .fetch_all(&mut own)
        .await
        .unwrap();
        let sockets: std::collections::HashMap<i32, bool> =
            switchyard::store::sockets_towards(&host, port)
                .await
                .into_iter()
                .map(|(p, nodelay)| (i32::from(p), nodelay))
                .collect();
        assert!(
            !stores.is_empty(),
            "the store is connected to {host}:{port} over TCP (the test needs a TCP URL without a proxy: the server's client_port must be this process's)"
        );
        for p in &stores {
            assert_eq!(
                sockets.get(p),
                Some(&true),
                "the store's connection from port {p} has TCP_NODELAY (sockets: {sockets:?})"
            );
        }
        drop(own);
        drop(store);
        db.drop_database().await;
    }

    async fn opened(url: &str) -> Store {
        Store::open(url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap()
    }

    /// A push locks its device's row before it decides: while another
    /// transaction holds that row, the push waits, and goes on when it is
    /// released.
    #[tokio::test]
    async fn a_push_waits_for_the_devices_row() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = opened(&db.url).await;
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d"), None)
            .await
            .unwrap();
        let mut raw = PgConnection::connect(&db.url).await.unwrap();
        raw.execute("BEGIN").await.unwrap();
        // NO KEY UPDATE: the lock the push must wait for, but not the one
        // its insert's foreign-key check waits for (KEY SHARE), so the
        // push is held here only by its own lock on the device.
        raw.execute("SELECT 1 FROM devices WHERE device_id = 'd' FOR NO KEY UPDATE")
            .await
            .unwrap();
        let s = store.clone();
        let mut push = tokio::spawn(async move { push_window(&s, "d", H, 2 * H).await });
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(400), &mut push)
                .await
                .is_err(),
            "the push went ahead while the device's row was locked"
        );
        raw.execute("COMMIT").await.unwrap();
        push.await.unwrap().unwrap();
        store.close().await;
        drop(raw);
        db.drop_database().await;
    }

    /// A claim skips the rows another transaction holds instead of waiting
    /// for them, and takes the rest.
    #[tokio::test]
    async fn a_claim_skips_rows_another_replica_holds() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = opened(&db.url).await;
        let tenant = TenantId::default_tenant();
        let mut ids = Vec::new();
        for i in 0..4 {
            let id = format!("d{i}");
            store
                .create_device(&tenant, device(&id), None)
                .await
                .unwrap();
            ids.push(push_window(&store, &id, 0, H).await.unwrap().action.id);
        }
        let mut raw = PgConnection::connect(&db.url).await.unwrap();
        raw.execute("BEGIN").await.unwrap();
        raw.execute(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM actions WHERE action_id = '{}' FOR UPDATE",
            ids[0]
        )))
        .await
        .unwrap();
        let jobs = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            store.claim_due(T0.plus_nanos(1), 10, 60 * Ts::SECOND),
        )
        .await
        .expect("the claim waited for a locked row")
        .unwrap();
        let claimed: Vec<_> = jobs.iter().map(|j| j.action.id).collect();
        assert_eq!(claimed.len(), 3, "{claimed:?}");
        assert!(!claimed.contains(&ids[0]));
        raw.execute("ROLLBACK").await.unwrap();
        // Released: the next claim takes it.
        let jobs = store
            .claim_due(T0.plus_nanos(1), 10, 60 * Ts::SECOND)
            .await
            .unwrap();
        assert_eq!(
            jobs.iter().map(|j| j.action.id).collect::<Vec<_>>(),
            vec![ids[0]]
        );
        store.close().await;
        drop(raw);
        db.drop_database().await;
    }

    /// A booking that loses its race at the exclusion constraint (the
    /// winner's row was not yet committed when the push read the channel)
    /// is decided again, and answered with the typed conflict naming the
    /// winner: never INTERNAL.
    #[tokio::test]
    async fn a_push_that_loses_at_the_constraint_names_the_winner() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = opened(&db.url).await;
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d"), None)
            .await
            .unwrap();
        let winner = switchyard::domain::ActionId::generate();
        let mut raw = PgConnection::connect(&db.url).await.unwrap();
        raw.execute("BEGIN").await.unwrap();
        raw.execute(sqlx::AssertSqlSafe(raw_action(
            &winner.to_string(),
            "SCHEDULED",
            "mode",
            T0.plus_nanos(H).0,
            Some(T0.plus_nanos(2 * H).0),
        )))
        .await
        .unwrap();
        let s = store.clone();
        let mut push = tokio::spawn(async move { push_window(&s, "d", H, 2 * H).await });
        // The push has read no holder and now waits at the constraint.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(400), &mut push)
                .await
                .is_err()
        );
        raw.execute("COMMIT").await.unwrap();
        match push.await.unwrap() {
            Err(Error::Conflict(c)) => assert!(c.colliders.iter().any(|h| h.id == winner), "{c:?}"),
            other => panic!("expected the conflict naming the winner: {other:?}"),
        }
        store.close().await;
        drop(raw);
        db.drop_database().await;
    }

    /// Several replicas migrating an empty database at once apply each
    /// migration exactly once between them.
    #[tokio::test]
    async fn concurrent_migrations_apply_each_version_once() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let clock = || Arc::new(ManualClock::new(T0)) as Arc<dyn switchyard::domain::Clock>;
        let (a, b, c, d) = tokio::join!(
            Store::migrate_only(&db.url, clock()),
            Store::migrate_only(&db.url, clock()),
            Store::migrate_only(&db.url, clock()),
            Store::migrate_only(&db.url, clock()),
        );
        let mut all: Vec<i64> = [a, b, c, d].into_iter().flat_map(Result::unwrap).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a migration was applied twice");
        assert_eq!(all, (1..=all.len() as i64).collect::<Vec<_>>());
        db.drop_database().await;
    }

    /// One device id created through two replicas at once: one creates it,
    /// the others are told it exists (never INTERNAL).
    #[tokio::test]
    async fn concurrent_creates_of_one_device_create_it_once() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let (one, two) = (opened(&db.url).await, opened(&db.url).await);
        let tenant = TenantId::default_tenant();
        let tries = (0..8).map(|i| {
            let s = if i % 2 == 0 { one.clone() } else { two.clone() };
            let tenant = tenant.clone();
            tokio::spawn(async move { s.create_device(&tenant, device("same"), None).await })
        });
        let mut created = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(_) => created += 1,
                Err(Error::DeviceAlreadyExists { .. }) => {}
                Err(e) => panic!("neither created nor exists: {e:?}"),
            }
        }
        assert_eq!(created, 1);
        one.close().await;
        two.close().await;
        db.drop_database().await;
    }

    /// A retarget and a dispatch claim of the device's action at once:
    /// whichever commits first, the other sees it. Here the claim holds the
    /// row (uncommitted, the action started) when the retarget reads: the
    /// retarget waits, then finds the lease and refuses (WRITES_IN_FORCE).
    #[tokio::test]
    async fn a_retarget_racing_a_claim_sees_the_claim() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = opened(&db.url).await;
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d"), None)
            .await
            .unwrap();
        let booked = push_window(&store, "d", H, 2 * H).await.unwrap().action.id;
        let mut raw = PgConnection::connect(&db.url).await.unwrap();
        raw.execute("BEGIN").await.unwrap();
        raw.execute(sqlx::AssertSqlSafe(format!(
            "UPDATE actions SET state = 'ACKNOWLEDGED', due_ns = {}, lease_owner = 'another-replica', lease_until_ns = {} WHERE action_id = '{booked}'",
            T0.0,
            T0.plus_nanos(3 * H).0
        )))
        .await
        .unwrap();
        let s = store.clone();
        let mut update = tokio::spawn(async move {
            s.update_device(
                &TenantId::default_tenant(),
                &DeviceId::parse("d").unwrap(),
                None,
                |d| {
                    d.oem_device_id = "another-inverter".into();
                    Ok(switchyard::store::Retarget::Yes)
                },
                None,
                None,
            )
            .await
        });
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(400), &mut update)
                .await
                .is_err(),
            "the retarget decided without waiting for the claim"
        );
        raw.execute("COMMIT").await.unwrap();
        match update.await.unwrap() {
            Err(Error::WritesInForce { action_ids, .. }) => assert_eq!(action_ids, vec![booked]),
            other => panic!("expected WRITES_IN_FORCE: {other:?}"),
        }
        store.close().await;
        drop(raw);
        db.drop_database().await;
    }

    /// Two replicas' rate budgets on one database spend from one bucket,
    /// even when they take from it at the same moment.
    /// A write has the store's deadline on PostgreSQL: a group whose member
    /// runs past it is rolled back and its members are told
    /// STORAGE_UNAVAILABLE (not INTERNAL: nothing was written, a retry is
    /// right); a write still waiting for its turn by then is given up
    /// unrun or run after; either way its answer says what was stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_past_the_deadline_is_answered_unavailable_and_writes_nothing() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open_with(
            &db.url,
            Arc::new(ManualClock::new(T0)),
            &switchyard::store::StoreOptions {
                deadline: std::time::Duration::from_millis(300),
                group_open: std::time::Duration::from_secs(60),
                ..switchyard::store::StoreOptions::default()
            },
        )
        .await
        .unwrap();
        store
            .create_device(&TenantId::default_tenant(), device("d1"), None)
            .await
            .unwrap();
        let (entered, inside) = tokio::sync::oneshot::channel();
        let (_release, released) = tokio::sync::oneshot::channel();
        let holder = store.clone();
        let started = std::time::Instant::now();
        let hold = tokio::spawn(async move { holder.hold_writer("d1", entered, released).await });
        inside.await.unwrap();
        let push = push_window(&store, "d1", H, 2 * H).await;
        let held = hold.await.unwrap();
        assert!(
            matches!(held, Err(Error::StorageUnavailable(_))),
            "a member past the deadline: {held:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let stored = store
            .list_actions(
                &TenantId::default_tenant(),
                switchyard::store::ActionQuery {
                    device: None,
                    states: &[],
                    before: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        match push {
            Ok(o) => assert_eq!(
                stored.iter().map(|a| a.id).collect::<Vec<_>>(),
                [o.action.id]
            ),
            Err(Error::StorageUnavailable(_)) => assert!(stored.is_empty(), "{stored:?}"),
            other => panic!("answered unavailable, or booked: {other:?}"),
        }
        store.close().await;
        db.drop_database().await;
    }

    #[tokio::test]
    async fn replicas_spend_one_budget_between_them() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let (one, two) = (opened(&db.url).await, opened(&db.url).await);
        let budgets = [
            Arc::new(switchyard::dispatch::Budgets::new(one.clone())),
            Arc::new(switchyard::dispatch::Budgets::new(two.clone())),
        ];
        // 48 a day: a burst of 2.
        let budget = switchyard_drivers::RateBudget {
            calls_per_day: 48,
            min_write_interval_seconds: 0,
        };
        let takes = (0..20).map(|i| {
            let (b, budget) = (budgets[i % 2].clone(), budget.clone());
            tokio::spawn(async move { b.take_read("account", &budget, T0).await.is_ok() })
        });
        let mut granted = 0;
        for t in takes {
            granted += usize::from(t.await.unwrap());
        }
        assert_eq!(
            granted, 2,
            "two replicas together spent more than the bucket held"
        );
        one.close().await;
        two.close().await;
        db.drop_database().await;
    }
    /// A push whose request_id another replica takes between the push's
    /// check of the key and its write (the action, its audit entry and the
    /// key are one statement on PostgreSQL) is rolled back whole, in its
    /// member savepoint, and run again: it replays that replica's answer
    /// and leaves no action and no audit entry of its own.
    #[tokio::test]
    async fn a_push_whose_key_is_taken_meanwhile_leaves_nothing_behind() {
        use switchyard::store::{IdemRequest, Written};
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = Store::open(&db.url, Arc::new(ManualClock::new(T0)))
            .await
            .unwrap();
        let tenant = TenantId::default_tenant();
        store
            .create_device(&tenant, device("d1"), None)
            .await
            .unwrap();
        // The other replica has written the key with its answer, and not
        // yet committed.
        let mut other = PgConnection::connect(&db.url).await.unwrap();
        other.execute("BEGIN").await.unwrap();
        sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, request_id, method, request_body,
               response_body, lease_until_ns, claim, create_ns, expire_ns)
             VALUES ('default', 'k1', 'PushAction', $1, $2, NULL, NULL, $3, $4)",
        )
        .bind(b"the body".to_vec())
        .bind(b"the other replica's answer".to_vec())
        .bind(T0.0)
        .bind(T0.0 + 3600 * Ts::SECOND)
        .execute(&mut other)
        .await
        .unwrap();
        let pushing = {
            let (store, tenant) = (store.clone(), tenant.clone());
            tokio::spawn(async move {
                store
                    .push_once(
                        &tenant,
                        &DeviceId::parse("d1").unwrap(),
                        |_, _| {
                            Ok(ValidPush {
                                command: Command::Charge,
                                channel: "mode".into(),
                                params: Params::default(),
                                start: T0.plus_nanos(H),
                                end: Some(T0.plus_nanos(2 * H)),
                                immediate: false,
                            })
                        },
                        Strategy::Reject,
                        Some(IdemRequest {
                            request_id: "k1".into(),
                            method: "PushAction",
                            body: b"the body".to_vec(),
                            encode: Arc::new(|o: &switchyard::store::PushOutcome| {
                                o.action.id.to_string().into_bytes()
                            }),
                        }),
                    )
                    .await
            })
        };
        // The push checked the key (none committed) and waits on the
        // other's row to write its own.
        let mut watch = PgConnection::connect(&db.url).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'
                       AND query LIKE '%idempotency_keys%'",
                )
                .fetch_one(&mut watch)
                .await
                .unwrap();
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the push waits for the other replica's key");
        other.execute("COMMIT").await.unwrap();
        match pushing.await.unwrap() {
            Ok(Written::Replayed(bytes)) => assert_eq!(bytes, b"the other replica's answer"),
            other => panic!("the push replays the other replica's answer: {other:?}"),
        }
        let counted = |table: &str| format!("SELECT count(*) FROM {table} WHERE device_id = 'd1'");
        let actions: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(counted("actions")))
            .fetch_one(&mut watch)
            .await
            .unwrap();
        let audited: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "{} AND action_id IS NOT NULL",
            counted("audit_log")
        )))
        .fetch_one(&mut watch)
        .await
        .unwrap();
        assert_eq!((actions, audited), (0, 0), "the push's own writes stayed");
        store.close().await;
        drop((other, watch));
        db.drop_database().await;
    }

    /// Finished rows written past the store on `conn`, numbered from
    /// `first`; their changes made visible to `pg_stat_user_tables`
    /// before it returns (a backend reports them when idle, up to 10 s
    /// later otherwise).
    async fn finished_rows(conn: &mut PgConnection, first: i64, n: i64) {
        let before = modified_since_analyze(conn).await;
        sqlx::query(
            "INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns,
               end_ns, immediate, state, queued_after, revision, create_ns, update_ns, work,
               finished_ns)
             SELECT 'default', 'a' || i, 'd', 'mode', 'CHARGE', i, i + 1, FALSE, 'COMPLETED', '',
               1, 0, 0, 'NONE', 0 FROM generate_series($1::bigint, $2::bigint) i",
        )
        .bind(first)
        .bind(first + n - 1)
        .execute(&mut *conn)
        .await
        .unwrap();
        conn.execute("SELECT pg_stat_force_next_flush()")
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while modified_since_analyze(conn).await < before + n {
            assert!(
                std::time::Instant::now() < deadline,
                "the inserts never showed in pg_stat_user_tables"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn reltuples(conn: &mut PgConnection) -> f32 {
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'actions'::regclass")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    async fn modified_since_analyze(conn: &mut PgConnection) -> i64 {
        // A fresh snapshot of the statistics each time, not the
        // transaction's cached one.
        conn.execute("SELECT pg_stat_clear_snapshot()")
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT n_mod_since_analyze FROM pg_stat_user_tables
             WHERE schemaname = current_schema() AND relname = 'actions'",
        )
        .fetch_one(conn)
        .await
        .unwrap()
    }

    /// The store analyses a table once it changed by more than autovacuum's
    /// threshold (50 rows + a tenth of the table) since its statistics were
    /// last taken, and only then: on this machine autovacuum is off, and
    /// a table never analysed is planned from guesses.
    #[tokio::test]
    async fn tables_that_changed_enough_are_analysed() {
        let Some((db, store, mut conn)) = statistics_case().await else {
            return;
        };
        assert_eq!(reltuples(&mut conn).await, -1.0, "never analysed");
        finished_rows(&mut conn, 0, 300).await;
        assert_eq!(analysed(&store).await, ["actions"]);
        assert_eq!(reltuples(&mut conn).await, 300.0);
        assert_eq!(modified_since_analyze(&mut conn).await, 0);
        assert!(
            statistics_rows(&mut conn).await > 0,
            "the ANALYZE was committed"
        );
        assert!(analysed(&store).await.is_empty(), "nothing changed since");
        // 60 rows: past the fixed part (50), not past 50 + 300 / 10.
        finished_rows(&mut conn, 300, 60).await;
        assert!(analysed(&store).await.is_empty(), "60 of 300 rows changed");
        finished_rows(&mut conn, 360, 40).await;
        assert_eq!(analysed(&store).await, ["actions"], "100 of 300 changed");
        assert_eq!(reltuples(&mut conn).await, 400.0);
        store.close().await;
        drop(conn);
        db.drop_database().await;
    }

    /// A table another transaction holds (autovacuum's VACUUM, another
    /// replica's ANALYZE, a migration) is skipped at once, not waited for
    /// (a wait would cancel autovacuum), and analysed next time; an
    /// ANALYZE rolled back (which leaves the table counted as analysed,
    /// without statistics) is done again.
    #[tokio::test]
    async fn a_table_held_elsewhere_is_skipped_and_a_lost_analyze_redone() {
        let Some((db, store, mut conn)) = statistics_case().await else {
            return;
        };
        finished_rows(&mut conn, 0, 300).await;
        let mut other = PgConnection::connect(&db.url).await.unwrap();
        // Counted as analysed (reltuples, the counter), but its statistics
        // rolled back.
        other
            .execute("BEGIN; ANALYZE actions; ROLLBACK")
            .await
            .unwrap();
        assert_eq!(reltuples(&mut conn).await, 300.0);
        assert_eq!(modified_since_analyze(&mut conn).await, 0);
        assert_eq!(statistics_rows(&mut conn).await, 0);
        assert_eq!(analysed(&store).await, ["actions"]);
        assert!(statistics_rows(&mut conn).await > 0);
        // Due again, and held by another transaction.
        finished_rows(&mut conn, 300, 100).await;
        other.execute("BEGIN").await.unwrap();
        other
            .execute("LOCK TABLE actions IN SHARE UPDATE EXCLUSIVE MODE")
            .await
            .unwrap();
        let skipped = tokio::time::timeout(std::time::Duration::from_secs(2), analysed(&store))
            .await
            .expect("the store waited for the table's lock");
        assert!(skipped.is_empty(), "{skipped:?}");
        other.execute("COMMIT").await.unwrap();
        assert_eq!(analysed(&store).await, ["actions"]);
        assert_eq!(reltuples(&mut conn).await, 400.0);
        drop(other);
        store.close().await;
        drop(conn);
        db.drop_database().await;
    }

    /// A role that may write the tables but owns neither them nor the
    /// database may not analyse them: the store leaves them alone, says
    /// which, and keeps counting them due (PostgreSQL would only warn,
    /// analyse nothing and reset nothing).
    #[tokio::test]
    async fn tables_the_role_may_not_analyse_are_left_alone() {
        let Some((db, store, mut conn)) = statistics_case().await else {
            return;
        };
        finished_rows(&mut conn, 0, 300).await;
        let name = db.url.rsplit('/').next().unwrap().to_owned();
        let role = format!("{name}_writer");
        conn.execute(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {role}; \
                 GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
                 GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        )))
        .await
        .unwrap();
        // The same login, acting as the role from the start of each
        // session. (CREATE on the schema: opening a store checks the
        // migrations' own table with `CREATE TABLE IF NOT EXISTS`.)
        let url = format!("{}?options=-c%20role%3D{role}", db.url);
        let writer = opened(&url).await;
        let done = writer.refresh_statistics().await.unwrap();
        assert_eq!(
            (done.analysed, done.not_owned),
            (vec![], vec!["actions"]),
            "as {role}"
        );
        assert_eq!(statistics_rows(&mut conn).await, 0);
        assert_eq!(modified_since_analyze(&mut conn).await, 300);
        writer.close().await;
        // The owner may.
        assert_eq!(analysed(&store).await, ["actions"]);
        store.close().await;
        conn.execute(sqlx::AssertSqlSafe(format!(
            "DROP OWNED BY {role}; DROP ROLE {role}"
        )))
        .await
        .unwrap();
        drop(conn);
        db.drop_database().await;
    }

    /// The store's sessions are given what it relies on: no JIT
    /// compilation (a burst's look for owed work was compiled with
    /// inlining, 410-620 ms a run), and the timeouts.
    #[tokio::test]
    async fn the_stores_sessions_have_jit_off_and_timeouts() {
        let Some(db) = postgres::database().await else {
            return;
        };
        let store = opened(&db.url).await;
        for (setting, value) in [
            ("jit", "off"),
            ("lock_timeout", "4s"),
            ("idle_in_transaction_session_timeout", "30s"),
        ] {
            assert_eq!(
                store.session_setting(setting).await.unwrap(),
                value,
                "{setting}"
            );
        }
        store.close().await;
        db.drop_database().await;
    }

    /// A store on a database of its own with a device `d`, autovacuum
    /// kept off `actions` (where the server runs it), and a connection
    /// past the store.
    async fn statistics_case() -> Option<(postgres::TestDatabase, Store, PgConnection)> {
        let db = postgres::database().await?;
        let store = opened(&db.url).await;
        store
            .create_device(&TenantId::default_tenant(), device("d"), None)
            .await
            .unwrap();
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        conn.execute("ALTER TABLE actions SET (autovacuum_enabled = off)")
            .await
            .unwrap();
        Some((db, store, conn))
    }

    async fn analysed(store: &Store) -> Vec<&'static str> {
        let done = store.refresh_statistics().await.unwrap();
        assert!(done.not_owned.is_empty(), "{done:?}");
        done.analysed
    }

    async fn statistics_rows(conn: &mut PgConnection) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stats WHERE tablename = 'actions'")
            .fetch_one(conn)
            .await
            .unwrap()
    }
}

/// `switchyard migrate` and `serve` on PostgreSQL, with a password in the
/// URL (trust authentication ignores it here): the database is migrated
/// once, the second `migrate` finds nothing to do, and the password
/// appears in no output or log line.
#[tokio::test]
async fn migrate_and_serve_on_postgres_never_show_the_password() {
    let Some(db) = postgres::database().await else {
        return;
    };
    const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");
    let url = db
        .url
        .replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    assert_ne!(url, db.url, "the URL carries a password");
    let migrate = || {
        std::process::Command::new(BIN)
            .args(["migrate", "--database", &url])
            .env_remove("SWITCHYARD_DATABASE_URL")
            .output()
            .unwrap()
    };
    let first = migrate();
    let out = String::from_utf8_lossy(&first.stdout).into_owned()
        + &String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{out}");
    assert!(
        out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8"),
        "{out}"
    );
    let again = migrate();
    let out2 = String::from_utf8_lossy(&again.stdout).into_owned()
        + &String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{out2}");
    assert!(out2.contains("up to date"), "{out2}");
    let server = switchyard_tests::ServerProcess::spawn_with(BIN, &url, &[], &[]);
    let log = server.log();
    drop(server);
    let listening = log
        .iter()
        .find(|l| l.contains("\"listening\""))
        .expect("a listening line");
    assert!(listening.contains("<redacted>"), "{listening}");
    for text in log.iter().chain([&out, &out2]) {
        assert!(!text.contains("hunter2"), "the password was shown: {text}");
    }
    db.drop_database().await;
}

/// Two replicas started together on one empty database, both seeding the
/// demo devices: both come up, and the devices exist once.
#[tokio::test]
async fn replicas_seeding_the_demo_devices_together_both_start() {
    use std::io::{BufRead, BufReader};
    let Some(db) = postgres::database().await else {
        return;
    };
    const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");
    let mut children: Vec<std::process::Child> = (0..2)
        .map(|_| {
            std::process::Command::new(BIN)
                .args(["serve", "--listen", "127.0.0.1:0", "--database", &db.url])
                .args(["--log-format", "json"])
                .env("SWITCHYARD_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let lines = BufReader::new(c.stderr.take().unwrap()).lines();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for line in lines.map_while(Result::ok) {
                    let listening = line.contains("\"listening\"");
                    seen.push(line);
                    if listening {
                        return (true, seen);
                    }
                }
                (false, seen)
            })
        })
        .collect();
    let outcomes: Vec<(bool, Vec<String>)> =
        readers.into_iter().map(|r| r.join().unwrap()).collect();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    for (up, log) in &outcomes {
        assert!(up, "a replica did not start: {log:#?}");
    }
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query("SELECT count(*) FROM devices")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    drop(conn);
    db.drop_database().await;
}

/// The scale benchmark on PostgreSQL, at a tiny size (CI proves it
/// works; the figures are in docs/performance.md): it seeds the
/// finished history straight into the database, with its audit trail,
/// measures both runs and prints PostgreSQL's plans of the hot queries.
#[tokio::test]
async fn the_scale_bench_runs_on_postgres() {
    let Some(db) = postgres::database().await else {
        return;
    };
    const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");
    const BENCH: &str = env!("CARGO_BIN_EXE_switchyard-bench");
    let out = std::process::Command::new(BENCH)
        // 3,000 finished actions: with 300, the rows the runs leave owed
        // were a quarter of the table, and once PostgreSQL's autovacuum
        // had analyzed it (when it ran was a matter of load) a scan of
        // the table was the right plan for the dispatcher's next-due
        // read. At 3,000 they are 3 %, as a stored history makes them.
        .args(["scale", "--actions", "3000", "--devices", "30", "--n", "40"])
        .args(["--c", "4", "--server-bin", BIN, "--database", &db.url])
        .env_remove("SWITCHYARD_DATABASE_URL")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("4 clients, PostgreSQL"), "{text}");
    for what in ["push", "ListActions (device)", "ListActions (all devices)"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{what} p99: fresh"))),
            "{what}: {text}"
        );
    }
    // PostgreSQL's own plans (generic, as a kept statement's): each hot
    // read through an index, none through the whole table.
    for (what, indexes) in [
        (
            "push: actions holding the channel",
            &["actions_holding_owed", "actions_no_overlap"][..],
        ),
        (
            "ListActions of a device, first page",
            &["actions_by_device"],
        ),
        (
            "ListActions of every device, first page",
            &["actions_pkey", "actions_by_tenant"],
        ),
        (
            "GetAction",
            &["actions_by_device", "actions_by_tenant", "actions_pkey"],
        ),
        ("dispatch: claim due work", &["actions_owed"]),
        ("dispatch: next due", &["actions_owed"]),
        ("retention: finished actions", &["actions_finished_at"]),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{what}:")))
            .unwrap_or_else(|| panic!("no plan for {what}: {text}"));
        assert!(indexes.iter().any(|i| line.contains(i)), "{line}");
        // (A claim's leases, one row per live claim, may be scanned.)
        assert!(!line.contains("Seq Scan on actions"), "{line}");
    }
    // Generic plans: the parameters are still there, not values.
    let claim = text
        .lines()
        .find(|l| l.trim_start().starts_with("dispatch: claim due work:"))
        .unwrap();
    assert!(claim.contains("$1"), "{claim}");
    // The seed stamped its own entries: none was left for a server.
    assert!(
        text.contains("audit entries the seed left unstamped: 0"),
        "{text}"
    );
    // The seed is in the database: 3,000 finished actions, each with the
    // four audit entries of its life, each with an event cursor of its
    // own, on the 30 devices.
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
    let actions = count(
        "SELECT count(*) FROM actions WHERE action_id LIKE '00000000-0000-7000-8000-%' \
         AND state = 'COMPLETED' AND work = 'NONE'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(actions, 3000);
    let audit = count(
        "SELECT count(DISTINCT event_cursor) FROM audit_log \
         WHERE action_id LIKE '00000000-0000-7000-8000-%'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(audit, 12_000);
    let devices = count("SELECT count(*) FROM devices WHERE device_id LIKE 'seed%'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(devices, 30);
    drop(conn);
    db.drop_database().await;
}

/// `--database-max-connections` bounds the connections a replica opens
/// to PostgreSQL (its pool, beside the health check's own): under 64
/// concurrent calls, a server given 4 never holds more than 5 and answers
/// every call, where the default pool of 16 opens more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_opens_at_most_its_pool_of_connections() {
    use switchyard_proto::v1::{
        ListActionsRequest, action_service_client::ActionServiceClient,
        device_service_client::DeviceServiceClient,
    };
    let Some(db) = postgres::database().await else {
        return;
    };
    const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");
    // The server's own connections (its pool and its health check's).
    const SERVERS_CONNECTIONS: &str = "SELECT count(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND backend_type = 'client backend' \
        AND application_name = 'switchyard'";
    let connections = || async {
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let n: i64 = sqlx::query_scalar(SERVERS_CONNECTIONS)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        n
    };
    let mut most = std::collections::BTreeMap::new();
    for pool in ["4", "16"] {
        let server = switchyard_tests::ServerProcess::spawn_with(
            BIN,
            &db.url,
            &["--database-max-connections", pool],
            &[],
        );
        let channel = server.channel().await;
        DeviceServiceClient::new(channel.clone())
            .create_device(switchyard_tests::battery_request(&format!("p{pool}")))
            .await
            .unwrap();
        // Windows a day ahead, each of its own.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 86_400;
        let (seen, stop) = (
            std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0)),
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let watch = {
            let (seen, stop) = (seen.clone(), stop.clone());
            let url = db.url.clone();
            tokio::spawn(async move {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let n: i64 = sqlx::query_scalar(SERVERS_CONNECTIONS)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap();
                    seen.fetch_max(n, std::sync::atomic::Ordering::AcqRel);
                }
            })
        };
        let device = format!("p{pool}");
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let calls = (0..64).map(|i| {
            let answered = answered.clone();
            let channel = channel.clone();
            let device = device.clone();
            let slot = move |k: i64| prost_types::Timestamp {
                seconds: base + k * 120,
                nanos: 0,
            };
            tokio::spawn(async move {
                let mut client = ActionServiceClient::new(channel);
                for j in 0..10 {
                    if (i + j) % 2 == 0 {
                        let ok = client
                            .list_actions(ListActionsRequest {
                                device_id: device.clone(),
                                page_size: 50,
                                ..Default::default()
                            })
                            .await
                            .is_ok();
                        answered.fetch_add(usize::from(ok), std::sync::atomic::Ordering::AcqRel);
                    } else {
                        let k = i64::from(i * 10 + j);
                        let ok = client
                            .push_action(switchyard_tests::push(
                                &device,
                                switchyard_proto::v1::Action {
                                    command: switchyard_proto::v1::Command::Charge as i32,
                                    start_time: Some(slot(k)),
                                    end_time: Some(slot(k)).map(|t| prost_types::Timestamp {
                                        seconds: t.seconds + 60,
                                        nanos: 0,
                                    }),
                                    ..Default::default()
                                },
                                switchyard_proto::v1::ConflictStrategy::Unspecified,
                            ))
                            .await
                            .is_ok();
                        answered.fetch_add(usize::from(ok), std::sync::atomic::Ordering::AcqRel);
                    }
                }
            })
        });
        for c in futures::future::join_all(calls).await {
            c.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        watch.await.unwrap();
        most.insert(pool, seen.load(std::sync::atomic::Ordering::Acquire));
        // Every call answered: a pool that small still serves.
        assert_eq!(
            answered.load(std::sync::atomic::Ordering::Acquire),
            640,
            "pool {pool}"
        );
        drop(server);
        // The replica's connections close with it, before the next one
        // is counted.
        let mut left = connections().await;
        for _ in 0..100 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            left = connections().await;
        }
        assert_eq!(left, 0, "the stopped replica's connections are gone");
    }
    assert!(most["4"] <= 5, "{most:?}");
    assert!(most["16"] > 5, "the default pool opened no more: {most:?}");
    db.drop_database().await;
}
