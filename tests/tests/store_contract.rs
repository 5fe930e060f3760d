//! The storage contract suite (`switchyard::store::contract`) against
//! SQLite: each rule on a fresh database file of its own.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::Arc;

use switchyard::{
    domain::ManualClock,
    store::{
        Store,
        contract::{Fixture, T0},
    },
};

/// An empty store on a fresh SQLite file, and a replica on the same file.
async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("contract.db").display());
    let clock = ManualClock::new(T0);
    let store = Store::open(&url, Arc::new(clock.clone())).await.unwrap();
    // Another replica: its own connections to the same file.
    let replica = Store::open(&url, Arc::new(clock.clone())).await.unwrap();
    Fixture {
        store,
        replica,
        clock,
        keep: Box::new(dir),
    }
}

switchyard::storage_contract_suite!(on_sqlite, sqlite().await);
