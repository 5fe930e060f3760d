//! The storage contract suite (`switchyard::store::contract`) against
//! SQLite (each rule on a fresh database file of its own) and PostgreSQL
//! (each rule on a fresh database of its own).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;

use switchyard::{
    domain::ManualClock,
    store::{
        Store, StoreOptions,
        contract::{Fixture, T0},
    },
};

/// The store under test: a group commit stays open while work is queued
/// (not cut at its usual 10 ms), so a rule that queues requests behind a
/// held writer sees them in one group however slow the machine.
fn options() -> StoreOptions {
    StoreOptions {
        group_open: std::time::Duration::from_secs(60),
        ..StoreOptions::default()
    }
}

/// An empty store on a fresh SQLite file, and a replica on the same file.
async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("contract.db").display());
    let clock = ManualClock::new(T0);
    let store = Store::open_with(&url, Arc::new(clock.clone()), &options())
        .await
        .unwrap();
    // Another replica: its own connections to the same file.
    let replica = Store::open(&url, Arc::new(clock.clone())).await.unwrap();
    Fixture {
        store,
        replica,
        clock,
        keep: Box::new(dir),
    }
}

/// An empty store on a fresh PostgreSQL database, and a replica on it;
/// `None` (said loudly, a failure under CI=true) without PostgreSQL.
async fn postgres() -> Option<Fixture> {
    let db = switchyard_tests::postgres::database().await?;
    let clock = ManualClock::new(T0);
    let store = Store::open_with(&db.url, Arc::new(clock.clone()), &options())
        .await
        .unwrap();
    let replica = Store::open(&db.url, Arc::new(clock.clone())).await.unwrap();
    Some(Fixture {
        store,
        replica,
        clock,
        keep: Box::new(db.drop_on_drop()),
    })
}

switchyard::storage_contract_suite!(on_sqlite, sqlite().await);
switchyard::storage_contract_suite!(on_postgres, postgres().await);
