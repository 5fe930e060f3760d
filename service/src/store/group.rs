//! Group commit on SQLite: concurrent writes share one transaction, and
//! so one fsync.
//!
//! A write takes a [`Slot`]: the group's lock, the group's transaction
//! (opened by the first writer of a group with `BEGIN IMMEDIATE`) and a
//! savepoint of its own. It makes its change inside the savepoint, exactly
//! as it would alone (it sees every earlier member's change, in order);
//! [`Slot::end`] releases the savepoint, or rolls it back if the write
//! failed, so one request's failure never fails the others. The group is
//! committed when no other writer is waiting for the lock (or it has
//! [`MAX_MEMBERS`]); every member is answered only after that COMMIT, with
//! its own outcome, or the COMMIT's failure. On PostgreSQL (parallel
//! connections, row locks) every write keeps a transaction of its own.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use sea_orm::{DatabaseTransaction, TransactionTrait};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use super::{Store, db_err};
use crate::domain::Error;

/// Most writes in one group: a steady stream of writers still commits.
const MAX_MEMBERS: usize = 256;

/// The outcome of a group's COMMIT: `None` until it is known.
type Committed = Option<Result<(), String>>;

#[derive(Debug, Default)]
pub(super) struct State {
    /// The open group's transaction, if a group is open.
    tx: Option<DatabaseTransaction>,
    /// Counts groups.
    epoch: u64,
    /// Writes made in the open group.
    members: usize,
    /// Whether a task is queued to commit the open group should every
    /// writer waiting for it go away.
    backstop: bool,
    /// Where the open group's COMMIT outcome is announced.
    done: Option<watch::Sender<Committed>>,
}

/// The group writer of a SQLite store.
#[derive(Debug, Default)]
pub(super) struct Group {
    state: Arc<Mutex<State>>,
    /// Writers waiting for the lock.
    waiting: AtomicUsize,
    /// Groups committed, and the writes they held (for tests and the
    /// benchmark's account of how well writes group).
    committed: Arc<(AtomicUsize, AtomicUsize)>,
}

/// A write's place: in a group (a savepoint of the group's transaction),
/// or a transaction of its own.
pub(super) enum Slot {
    Alone(Option<DatabaseTransaction>),
    Grouped {
        group: Arc<Group>,
        guard: Option<OwnedMutexGuard<State>>,
        savepoint: Option<DatabaseTransaction>,
        epoch: u64,
        done: watch::Receiver<Committed>,
    },
}

impl Store {
    /// A place for one write: in the open group on SQLite, alone
    /// elsewhere.
    pub(super) async fn slot(&self) -> Result<Slot, Error> {
        let Some(group) = &self.group else {
            return Ok(Slot::Alone(Some(self.begin().await?)));
        };
        group.waiting.fetch_add(1, Ordering::AcqRel);
        let mut guard = group.state.clone().lock_owned().await;
        group.waiting.fetch_sub(1, Ordering::AcqRel);
        if guard.tx.is_none() {
            guard.tx = Some(self.begin().await?);
            guard.epoch += 1;
            guard.members = 0;
            guard.backstop = false;
            guard.done = Some(watch::channel(None).0);
        }
        let epoch = guard.epoch;
        let done = guard
            .done
            .as_ref()
            .map(watch::Sender::subscribe)
            .ok_or_else(|| Error::Internal("a group without its announcement".into()))?;
        // The slot exists before its savepoint does: if the savepoint
        // cannot be made (or this call goes away meanwhile), the slot's
        // drop still sees that the group gets committed.
        let mut slot = Slot::Grouped {
            group: group.clone(),
            guard: Some(guard),
            savepoint: None,
            epoch,
            done,
        };
        if let Slot::Grouped {
            guard: Some(guard),
            savepoint,
            ..
        } = &mut slot
        {
            let tx = guard
                .tx
                .as_ref()
                .ok_or_else(|| Error::Internal("a group without its transaction".into()))?;
            *savepoint = Some(tx.begin().await.map_err(db_err)?);
        }
        Ok(slot)
    }
}

impl Slot {
    /// Where the write makes its change.
    pub(super) fn tx(&self) -> &DatabaseTransaction {
        match self {
            Slot::Alone(tx) | Slot::Grouped { savepoint: tx, .. } => tx
                .as_ref()
                .unwrap_or_else(|| unreachable!("a slot's transaction lives until its end")),
        }
    }

    /// Ends the write with its outcome: committed (alone), or kept in or
    /// removed from its group, and answered once the group is durable.
    pub(super) async fn end<T>(mut self, outcome: Result<T, Error>) -> Result<T, Error> {
        match &mut self {
            Slot::Alone(tx) => {
                let tx = tx
                    .take()
                    .unwrap_or_else(|| unreachable!("a slot ends once"));
                let value = outcome?;
                tx.commit().await.map_err(db_err)?;
                Ok(value)
            }
            Slot::Grouped {
                group,
                guard,
                savepoint,
                epoch,
                done,
            } => {
                let sp = savepoint
                    .take()
                    .unwrap_or_else(|| unreachable!("a slot ends once"));
                let kept = match &outcome {
                    Ok(_) => sp.commit().await,
                    Err(_) => sp.rollback().await,
                };
                let mut state = guard
                    .take()
                    .unwrap_or_else(|| unreachable!("a slot ends once"));
                if let Err(e) = kept {
                    // The group's transaction is in doubt: it ends here,
                    // rolled back, and every member is told.
                    fail(&mut state, &db_err(e));
                } else {
                    state.members += 1;
                    let last =
                        group.waiting.load(Ordering::Acquire) == 0 || state.members >= MAX_MEMBERS;
                    if last {
                        commit(&mut state, &group.committed);
                    } else if !state.backstop {
                        state.backstop = true;
                        backstop(group.clone(), *epoch);
                    }
                }
                drop(state);
                let committed = done
                    .wait_for(Option::is_some)
                    .await
                    .map(|c| c.clone())
                    .map_err(|_| Error::StorageUnavailable("the group commit was lost".into()))?;
                match (outcome, committed) {
                    (Err(e), _) => Err(e),
                    (Ok(v), Some(Ok(()))) => Ok(v),
                    (Ok(_), Some(Err(e))) => Err(Error::StorageUnavailable(e)),
                    (Ok(_), None) => Err(Error::Internal("a group ended unannounced".into())),
                }
            }
        }
    }
}

impl Drop for Slot {
    /// A write abandoned before its end (its caller went away): its
    /// savepoint is rolled back as it is dropped, and the group is left
    /// to be committed by the others, or by a backstop.
    fn drop(&mut self) {
        if let Slot::Grouped {
            group,
            guard,
            savepoint,
            epoch,
            ..
        } = self
        {
            // Its rollback is queued on the connection while the group's
            // lock is still held, so no other member is using it.
            drop(savepoint.take());
            if let Some(mut state) = guard.take()
                && !state.backstop
            {
                state.backstop = true;
                backstop(group.clone(), *epoch);
            }
        }
    }
}

/// Commits the open group in a task of its own (no caller going away can
/// cut it short) and announces the outcome to its members.
fn commit(state: &mut State, counts: &Arc<(AtomicUsize, AtomicUsize)>) {
    let (Some(tx), Some(done)) = (state.tx.take(), state.done.take()) else {
        return;
    };
    let (counts, members) = (counts.clone(), state.members);
    tokio::spawn(async move {
        let outcome = tx.commit().await.map_err(|e| db_err(e).to_string());
        if outcome.is_ok() {
            counts.0.fetch_add(1, Ordering::AcqRel);
            counts.1.fetch_add(members, Ordering::AcqRel);
        }
        let _ = done.send(Some(outcome));
    });
}

/// Ends the open group without committing it.
fn fail(state: &mut State, why: &Error) {
    let (Some(tx), Some(done)) = (state.tx.take(), state.done.take()) else {
        return;
    };
    let why = why.to_string();
    tokio::spawn(async move {
        let _ = tx.rollback().await;
        let _ = done.send(Some(Err(why)));
    });
}

/// Queues behind the writers waiting now and commits group `epoch` if it
/// is still open then: a group is never left open when its last writer
/// goes away.
fn backstop(group: Arc<Group>, epoch: u64) {
    tokio::spawn(async move {
        let mut state = group.state.clone().lock_owned().await;
        if state.epoch == epoch && state.tx.is_some() {
            commit(&mut state, &group.committed);
        }
    });
}

impl Store {
    /// Groups committed so far, and the writes they held (SQLite; `None`
    /// on PostgreSQL, where writes are not grouped).
    pub fn group_counts(&self) -> Option<(usize, usize)> {
        self.group.as_ref().map(|g| {
            (
                g.committed.0.load(Ordering::Acquire),
                g.committed.1.load(Ordering::Acquire),
            )
        })
    }
}
