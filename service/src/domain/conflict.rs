//! The conflict rules (SPEC §4), as a pure function of the actions that
//! hold a channel and the push.
//!
//! Invariants:
//! - Intervals are half-open `[start, end)`; `end = None` is `+∞`.
//! - Only actions that hold the channel (SCHEDULED, ACKNOWLEDGED, ACTIVE,
//!   and CANCELLED ones whose early revert is still owed) are passed in;
//!   the caller reads them under the write lock, so the decision and the
//!   insert are atomic.
//! - Everything but SCHEDULED is in flight: no strategy cancels it.
//! - If [`decide`] returns a plan, booking it (and cancelling the plan's
//!   `cancel` set) leaves no two holding actions overlapping.

use super::{
    ActionId, ActionState, Command, Strategy, Ts,
    error::{Collider, Conflict, ConflictKind},
};

/// How long a client is told to wait before retrying a push that only
/// settling actions block: a revert or an apply the dispatcher is making
/// takes a driver call or two.
pub const SETTLE_RETRY_NANOS: i64 = 2 * Ts::SECOND;

/// An action that holds the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub id: ActionId,
    /// SCHEDULED, ACKNOWLEDGED, ACTIVE, or CANCELLED / FAILED while a
    /// revert is owed.
    pub state: ActionState,
    pub command: Command,
    pub start: Ts,
    /// `None` = open-ended.
    pub end: Option<Ts>,
}

impl Holder {
    /// The OEM has it (or is undoing it): no strategy can cancel it.
    fn in_flight(&self) -> bool {
        self.state != ActionState::Scheduled
    }

    /// It stops holding by itself, soon: a cancelled or failed action once
    /// its revert is done, an open-ended one once it is applied (it is then
    /// COMPLETED).
    fn settling(&self) -> bool {
        match self.state {
            ActionState::Cancelled | ActionState::Failed => true,
            ActionState::Acknowledged => self.end.is_none(),
            ActionState::Scheduled | ActionState::Active | ActionState::Completed => false,
        }
    }
}

/// What to do to book the push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Start of the new action (moved by QUEUE_AFTER).
    pub start: Ts,
    /// End of the new action.
    pub end: Option<Ts>,
    /// SCHEDULED actions to cancel (CANCEL_AND_REPLACE).
    pub cancel: Vec<ActionId>,
    /// Actions it was queued after (QUEUE_AFTER).
    pub queued_after: Vec<ActionId>,
}

/// Whether `[a_start, a_end)` and `[b_start, b_end)` overlap.
pub fn overlaps(a_start: Ts, a_end: Option<Ts>, b_start: Ts, b_end: Option<Ts>) -> bool {
    b_end.is_none_or(|be| a_start < be) && a_end.is_none_or(|ae| b_start < ae)
}

fn colliders(start: Ts, end: Option<Ts>, holders: &[Holder]) -> Vec<&Holder> {
    let mut c: Vec<&Holder> = holders
        .iter()
        .filter(|h| overlaps(start, end, h.start, h.end))
        .collect();
    c.sort_by_key(|h| (h.start, h.id));
    c
}

/// Moves `[start, end)` past every collider, keeping its duration, until it
/// collides with nothing. Fails with the open-ended colliders in the way.
fn queue(
    start: Ts,
    end: Option<Ts>,
    holders: &[Holder],
) -> Result<(Ts, Option<Ts>, Vec<ActionId>), Vec<ActionId>> {
    let duration = end.map(|e| e.0 - start.0);
    let mut s = start;
    let mut passed = Vec::new();
    // Each round moves `s` strictly forward past at least one holder, so
    // this ends within `holders.len()` rounds.
    loop {
        let e = duration.map(|d| s.plus_nanos(d));
        let cs = colliders(s, e, holders);
        if cs.is_empty() {
            return Ok((s, e, passed));
        }
        let open: Vec<ActionId> = cs
            .iter()
            .filter(|h| h.end.is_none())
            .map(|h| h.id)
            .collect();
        if !open.is_empty() {
            return Err(open);
        }
        s = cs.iter().filter_map(|h| h.end).max().unwrap_or(s);
        for h in cs {
            if !passed.contains(&h.id) {
                passed.push(h.id);
            }
        }
    }
}

/// Decides a push of `[start, end)` on a channel whose holders are
/// `holders`, under `strategy`.
pub fn decide(
    device_id: &str,
    channel: &str,
    start: Ts,
    end: Option<Ts>,
    holders: &[Holder],
    strategy: Strategy,
) -> Result<Plan, Box<Conflict>> {
    let cs = colliders(start, end, holders);
    if cs.is_empty() {
        return Ok(Plan {
            start,
            end,
            cancel: vec![],
            queued_after: vec![],
        });
    }
    let in_flight: Vec<ActionId> = cs.iter().filter(|h| h.in_flight()).map(|h| h.id).collect();
    let queued = queue(start, end, holders);
    let mut strategies = Vec::new();
    if in_flight.is_empty() {
        strategies.push(Strategy::CancelAndReplace);
    }
    if queued.is_ok() {
        strategies.push(Strategy::QueueAfter);
    }
    // Without a strategy every collider blocks; with CANCEL_AND_REPLACE
    // only the in-flight ones do.
    let blocked_only_by_settling = |all: bool| {
        cs.iter()
            .filter(|h| all || h.in_flight())
            .all(|h| h.settling())
    };
    let refuse = |kind, open_ended: Vec<ActionId>| {
        let retry = kind == ConflictKind::InFlight
            && blocked_only_by_settling(strategy == Strategy::Reject);
        Box::new(Conflict {
            kind,
            device_id: device_id.to_owned(),
            channel: channel.to_owned(),
            requested_start: start,
            requested_end: end,
            colliders: cs
                .iter()
                .map(|h| Collider {
                    id: h.id,
                    state: h.state,
                    command: h.command,
                    channel: channel.to_owned(),
                    start: h.start,
                    end: h.end,
                })
                .collect(),
            strategies: strategies.clone(),
            in_flight: in_flight.clone(),
            open_ended,
            retry_after_nanos: retry.then_some(SETTLE_RETRY_NANOS),
        })
    };
    match strategy {
        Strategy::Reject if in_flight.is_empty() => {
            Err(refuse(ConflictKind::ActionConflict, vec![]))
        }
        Strategy::Reject => Err(refuse(ConflictKind::InFlight, vec![])),
        Strategy::CancelAndReplace if in_flight.is_empty() => Ok(Plan {
            start,
            end,
            cancel: cs.iter().map(|h| h.id).collect(),
            queued_after: vec![],
        }),
        Strategy::CancelAndReplace => Err(refuse(ConflictKind::InFlight, vec![])),
        Strategy::QueueAfter => match queued {
            Ok((s, e, passed)) => Ok(Plan {
                start: s,
                end: e,
                cancel: vec![],
                queued_after: passed,
            }),
            Err(open) => Err(refuse(ConflictKind::OpenEnded, open)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as _;

    fn h(n: u128, state: ActionState, start: i64, end: Option<i64>) -> Holder {
        Holder {
            id: ActionId::from_u128(n),
            state,
            command: Command::Charge,
            start: Ts(start),
            end: end.map(Ts),
        }
    }

    const S: ActionState = ActionState::Scheduled;
    const A: ActionState = ActionState::Active;

    const C: ActionState = ActionState::Cancelled;
    const K: ActionState = ActionState::Acknowledged;

    fn retry(hs: &[Holder], strategy: Strategy) -> Option<i64> {
        match decide("d", "mode", Ts(10), Some(Ts(20)), hs, strategy) {
            Err(c) => {
                assert_eq!(c.kind, ConflictKind::InFlight, "{c:?}");
                c.retry_after_nanos
            }
            Ok(p) => panic!("booked: {p:?}"),
        }
    }

    #[test]
    fn only_colliders_that_settle_by_themselves_make_a_refusal_worth_retrying() {
        // A cancelled action finishing its revert, an open-ended one being
        // applied: retry.
        for settling in [h(1, C, 0, Some(30)), h(1, K, 0, None)] {
            for strategy in [Strategy::Reject, Strategy::CancelAndReplace] {
                assert_eq!(
                    retry(std::slice::from_ref(&settling), strategy),
                    Some(SETTLE_RETRY_NANOS),
                    "{settling:?} {strategy:?}"
                );
            }
        }
        // An action the OEM is executing holds until its end: no retry.
        assert_eq!(retry(&[h(1, A, 0, Some(30))], Strategy::Reject), None);
        assert_eq!(retry(&[h(1, K, 0, Some(30))], Strategy::Reject), None);
        // Settling plus a scheduled one: without a strategy the scheduled
        // one would still collide; CANCEL_AND_REPLACE would cancel it.
        let both = [h(1, C, 0, Some(12)), h(2, S, 12, Some(30))];
        assert_eq!(retry(&both, Strategy::Reject), None);
        assert_eq!(
            retry(&both, Strategy::CancelAndReplace),
            Some(SETTLE_RETRY_NANOS)
        );
        // A cancelled holder is in flight: never cancelled again, and
        // reported as it is.
        let c = decide("d", "mode", Ts(10), Some(Ts(20)), &both, Strategy::Reject).unwrap_err();
        assert_eq!(c.in_flight, [ActionId::from_u128(1)]);
        assert_eq!(c.colliders[0].state, C);
        assert_eq!(c.strategies, [Strategy::QueueAfter]);
    }

    #[test]
    fn half_open_intervals_overlap_only_where_they_share_an_instant() {
        let t = Ts;
        assert!(overlaps(t(0), Some(t(10)), t(5), Some(t(15))));
        assert!(overlaps(t(5), Some(t(15)), t(0), Some(t(10))));
        assert!(overlaps(t(0), Some(t(10)), t(2), Some(t(3))));
        assert!(!overlaps(t(0), Some(t(10)), t(10), Some(t(20))));
        assert!(!overlaps(t(10), Some(t(20)), t(0), Some(t(10))));
        assert!(!overlaps(t(0), Some(t(10)), t(11), Some(t(20))));
        // Open ends reach +infinity.
        assert!(overlaps(t(0), None, t(100), Some(t(101))));
        assert!(overlaps(t(100), Some(t(101)), t(0), None));
        assert!(!overlaps(t(100), None, t(0), Some(t(100))));
        assert!(overlaps(t(0), None, t(5), None));
    }

    #[test]
    fn queue_after_stops_at_an_open_ended_collider() {
        let hs = [h(1, S, 10, Some(20)), h(2, S, 20, None)];
        let c = decide("d", "mode", Ts(12), Some(Ts(14)), &hs, Strategy::QueueAfter)
            .expect_err("cannot queue behind an open end");
        assert_eq!(c.kind, ConflictKind::OpenEnded);
        assert_eq!(c.open_ended, [ActionId::from_u128(2)]);
        // Without the open-ended one, it queues after the other.
        let p = decide(
            "d",
            "mode",
            Ts(12),
            Some(Ts(14)),
            &hs[..1],
            Strategy::QueueAfter,
        )
        .unwrap();
        assert_eq!((p.start, p.end), (Ts(20), Some(Ts(22))));
    }

    #[test]
    fn back_to_back_windows_do_not_collide() {
        let hs = [h(1, S, 10, Some(20))];
        assert!(decide("d", "mode", Ts(20), Some(Ts(30)), &hs, Strategy::Reject).is_ok());
        assert!(decide("d", "mode", Ts(0), Some(Ts(10)), &hs, Strategy::Reject).is_ok());
    }

    #[test]
    fn rejection_lists_every_collider_and_the_strategies_that_help() {
        let hs = [
            h(1, S, 10, Some(20)),
            h(2, S, 25, Some(30)),
            h(3, S, 40, Some(50)),
        ];
        let c = decide("d", "mode", Ts(15), Some(Ts(27)), &hs, Strategy::Reject).unwrap_err();
        assert_eq!(c.kind, ConflictKind::ActionConflict);
        let ids: Vec<_> = c.colliders.iter().map(|x| x.id).collect();
        assert_eq!(ids, [ActionId::from_u128(1), ActionId::from_u128(2)]);
        assert_eq!(
            c.strategies,
            [Strategy::CancelAndReplace, Strategy::QueueAfter]
        );
        assert!(c.in_flight.is_empty());
    }

    #[test]
    fn open_ended_holder_blocks_everything_after_its_start() {
        let hs = [h(1, S, 10, None)];
        let c = decide(
            "d",
            "mode",
            Ts(1000),
            Some(Ts(1010)),
            &hs,
            Strategy::QueueAfter,
        )
        .unwrap_err();
        assert_eq!(c.kind, ConflictKind::OpenEnded);
        assert_eq!(c.open_ended, [ActionId::from_u128(1)]);
        assert_eq!(c.strategies, [Strategy::CancelAndReplace]);
        assert!(decide("d", "mode", Ts(0), Some(Ts(10)), &hs, Strategy::Reject).is_ok());
    }

    #[test]
    fn cancel_and_replace_is_refused_against_in_flight_with_no_cancel_offered() {
        let hs = [h(1, A, 10, Some(20)), h(2, S, 20, Some(30))];
        let c = decide(
            "d",
            "mode",
            Ts(15),
            Some(Ts(25)),
            &hs,
            Strategy::CancelAndReplace,
        )
        .unwrap_err();
        assert_eq!(c.kind, ConflictKind::InFlight);
        assert_eq!(c.in_flight, [ActionId::from_u128(1)]);
        assert_eq!(c.strategies, [Strategy::QueueAfter]);
        let c = decide("d", "mode", Ts(15), Some(Ts(25)), &hs, Strategy::Reject).unwrap_err();
        assert_eq!(c.kind, ConflictKind::InFlight);
    }

    #[test]
    fn queue_after_chains_past_later_collisions_and_keeps_duration() {
        let hs = [h(1, A, 10, Some(20)), h(2, S, 22, Some(30))];
        let p = decide("d", "mode", Ts(15), Some(Ts(20)), &hs, Strategy::QueueAfter).unwrap();
        assert_eq!((p.start, p.end), (Ts(30), Some(Ts(35))));
        assert_eq!(
            p.queued_after,
            [ActionId::from_u128(1), ActionId::from_u128(2)]
        );
    }

    #[test]
    fn cancel_and_replace_cancels_exactly_the_colliders() {
        let hs = [h(1, S, 10, Some(20)), h(2, S, 30, Some(40))];
        let p = decide(
            "d",
            "mode",
            Ts(15),
            Some(Ts(25)),
            &hs,
            Strategy::CancelAndReplace,
        )
        .unwrap();
        assert_eq!(p.cancel, [ActionId::from_u128(1)]);
        assert_eq!((p.start, p.end), (Ts(15), Some(Ts(25))));
    }

    // --- property test against a reference model -------------------------

    /// The reference: written from the SPEC's words, differently from the
    /// engine. Queue-after is "the earliest start at or after the requested
    /// one, among the requested start and the holders' ends, at which the
    /// window is free".
    fn reference(
        start: i64,
        end: Option<i64>,
        holders: &[(u128, bool, i64, Option<i64>)],
        strategy: Strategy,
    ) -> Result<(i64, Option<i64>, Vec<u128>), ConflictKind> {
        let inf = i64::MAX;
        let ov = |s: i64, e: Option<i64>, hs: i64, he: Option<i64>| {
            s < he.unwrap_or(inf) && hs < e.unwrap_or(inf)
        };
        let hit: Vec<_> = holders
            .iter()
            .filter(|h| ov(start, end, h.2, h.3))
            .collect();
        if hit.is_empty() {
            return Ok((start, end, vec![]));
        }
        match strategy {
            Strategy::Reject => Err(if hit.iter().any(|h| h.1) {
                ConflictKind::InFlight
            } else {
                ConflictKind::ActionConflict
            }),
            Strategy::CancelAndReplace => {
                if hit.iter().any(|h| h.1) {
                    Err(ConflictKind::InFlight)
                } else {
                    let mut ids: Vec<u128> = hit.iter().map(|h| h.0).collect();
                    ids.sort();
                    Ok((start, end, ids))
                }
            }
            Strategy::QueueAfter => {
                let mut candidates: Vec<i64> = holders
                    .iter()
                    .filter_map(|h| h.3)
                    .filter(|&e| e >= start)
                    .collect();
                candidates.push(start);
                candidates.sort();
                for s in candidates {
                    let e = end.map(|e| e - start + s);
                    if holders.iter().all(|h| !ov(s, e, h.2, h.3)) {
                        return Ok((s, e, vec![]));
                    }
                }
                Err(ConflictKind::OpenEnded)
            }
        }
    }

    #[derive(Clone, Debug)]
    struct Op {
        start: i64,
        len: Option<i64>,
        strategy: Strategy,
        promote: bool,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        (
            0i64..100,
            prop_oneof![4 => (1i64..30).prop_map(Some), 1 => Just(None)],
            prop_oneof![
                Just(Strategy::Reject),
                Just(Strategy::CancelAndReplace),
                Just(Strategy::QueueAfter)
            ],
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(start, len, strategy, promote)| Op {
                start,
                len,
                strategy,
                promote,
            })
    }

    proptest! {
        #[test]
        fn engine_matches_reference_and_never_double_books(ops in proptest::collection::vec(op(), 1..40)) {
            let mut holders: Vec<Holder> = Vec::new();
            for (i, o) in ops.iter().enumerate() {
                let end = o.len.map(|l| Ts(o.start + l));
                let model: Vec<_> = holders.iter()
                    .map(|h| (h.id.as_u128(), h.state.in_flight(), h.start.0, h.end.map(|e| e.0)))
                    .collect();
                let expected = reference(o.start, end.map(|e| e.0), &model, o.strategy);
                let got = decide("d", "mode", Ts(o.start), end, &holders, o.strategy);
                match (&expected, &got) {
                    (Ok((s, e, cancelled)), Ok(plan)) => {
                        prop_assert_eq!(plan.start, Ts(*s));
                        prop_assert_eq!(plan.end, e.map(Ts));
                        if o.strategy == Strategy::CancelAndReplace {
                            let mut got_ids: Vec<u128> = plan.cancel.iter().map(|c| c.as_u128()).collect();
                            got_ids.sort();
                            prop_assert_eq!(&got_ids, cancelled);
                        }
                    }
                    (Err(kind), Err(conflict)) => prop_assert_eq!(*kind, conflict.kind),
                    _ => prop_assert!(false, "engine {:?} vs reference {:?}", got, expected),
                }
                if let Ok(plan) = got {
                    holders.retain(|h| !plan.cancel.contains(&h.id));
                    holders.push(Holder {
                        id: ActionId::from_u128(i as u128 + 1),
                        state: if o.promote { ActionState::Active } else { ActionState::Scheduled },
                        command: Command::Charge,
                        start: plan.start,
                        end: plan.end,
                    });
                }
                for (a, x) in holders.iter().enumerate() {
                    for y in &holders[a + 1..] {
                        prop_assert!(!overlaps(x.start, x.end, y.start, y.end), "{:?} overlaps {:?}", x, y);
                    }
                }
            }
        }
    }
}
