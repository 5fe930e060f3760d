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
            Command, Device, DeviceId, Error, Family, ManualClock, Params, Strategy, TenantId, Ts,
            validate::ValidPush,
        },
        store::Store,
    };
    use switchyard_tests::postgres;

    const T0: Ts = Ts(1_893_456_000 * Ts::SECOND);
    const H: i64 = 3600 * Ts::SECOND;

    fn device(id: &str) -> Device {
        Device {
            id: DeviceId::parse(id).unwrap(),
            display_name: String::new(),
            family: Family::Battery,
            driver: "simulated".into(),
            oem_device_id: String::new(),
            timezone: "UTC".into(),
            settings: BTreeMap::new(),
            revision: 0,
            created: Ts(0),
            updated: Ts(0),
            observed: None,
            incarnation: String::new(),
        }
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
            let id = &ids[name];
            let end = end.map_or("NULL".to_owned(), |e| e.to_string());
            format!(
                "INSERT INTO actions (tenant_id, action_id, device_id, channel, command, start_ns, end_ns,
                   immediate, state, queued_after, revision, create_ns, update_ns)
                 VALUES ('default', '{id}', 'd', '{channel}', 'CHARGE', {start}, {end}, FALSE, '{state}', '', 1, 0, 0)"
            )
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
}
