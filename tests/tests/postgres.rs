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
