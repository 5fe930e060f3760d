//! The action lifecycle as pure functions: what a client's cancel, a
//! replacement and each dispatch outcome make of an action, what work is
//! then owed, and the audit entry. The store only persists what these
//! decide, so every backend applies the same rules.
//!
//! ```text
//! push ──► SCHEDULED ──dispatch──► ACKNOWLEDGED ──applied──► ACTIVE ──reverted──► COMPLETED
//!  │ (immediate: ACKNOWLEDGED)            │  └─applied, no end──► COMPLETED
//!  │                                      └─failed──► FAILED (revert owed if a write may be in force)
//!  SCHEDULED/ACTIVE ──CancelAction──► CANCELLED (ACTIVE: revert owed)
//!  SCHEDULED ──CANCEL_AND_REPLACE──► CANCELLED (REPLACED)
//! ```

use super::{Action, ActionId, ActionState, Error, Transition, Ts, Work, cap, codes};

/// How a note of a failed try that will be retried starts.
pub const RETRYING: &str = "retrying: ";
/// Most bytes of an OEM's raw answer kept on an action.
pub const MAX_OEM_RESPONSE_BYTES: usize = 2048;
/// Most bytes of a driver's error message kept on an action.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// A change decided for an action: the action as it becomes, the work then
/// owed (and when), and the audit entry when its state changes.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The action after the change (revision and update time advanced).
    pub action: Action,
    /// What is owed next, and when; `None`: nothing.
    pub work: Option<(Work, Ts)>,
    /// The audit entry (`None` when the state did not change).
    pub transition: Option<Transition>,
}

fn transition(a: &Action, from: ActionState, reason: &str) -> Option<Transition> {
    (a.state != from).then(|| Transition {
        action_id: a.id,
        device_id: a.device_id.clone(),
        from: Some(from),
        to: a.state,
        reason: reason.to_owned(),
    })
}

/// The audit reason of a claim that sends a SCHEDULED action's apply on
/// its way (SCHEDULED → ACKNOWLEDGED).
pub const DISPATCHED: &str = "DISPATCHED";

/// Whether an action holds its channel: it is booked or in force
/// ([`ActionState::holds`]), or a revert of what it wrote is still owed
/// (a cancelled or failed one: nothing new may be applied before that is
/// undone). Stores select holders by exactly this.
pub fn holds_channel(state: ActionState, work: Option<Work>) -> bool {
    state.holds() || work == Some(Work::Revert)
}

/// What DeleteDevice may do with the device's `holding` actions (those for
/// which [`holds_channel`]): without `force` none may exist; with it, only
/// SCHEDULED ones, which are cancelled (`DEVICE_DELETED`). An action the
/// OEM is executing, or one whose revert is owed, always blocks: deleting
/// it would leave its command in force. Returns the cancellations to
/// record.
pub fn delete_device(
    device_id: &super::DeviceId,
    holding: &[Action],
    force: bool,
    now: Ts,
) -> Result<Vec<Change>, Error> {
    // Held but not in a holding state: a revert is owed.
    let in_flight: Vec<ActionId> = holding
        .iter()
        .filter(|a| !a.state.holds() || a.state.in_flight())
        .map(|a| a.id)
        .collect();
    if !holding.is_empty() && (!force || !in_flight.is_empty()) {
        return Err(Error::DeviceHasActiveActions {
            device_id: device_id.to_string(),
            action_ids: holding.iter().map(|a| a.id).collect(),
            in_flight,
        });
    }
    Ok(holding
        .iter()
        .map(|held| {
            let mut a = held.clone();
            a.state = ActionState::Cancelled;
            a.error_code = Some(codes::DEVICE_DELETED.to_owned());
            a.revision += 1;
            a.updated = now;
            let transition = transition(&a, held.state, codes::DEVICE_DELETED);
            Change {
                action: a,
                work: None,
                transition,
            }
        })
        .collect())
}

/// CancelAction: a SCHEDULED action is cancelled (never applied); an
/// ACTIVE one is cancelled with its revert owed at once (it holds its
/// channel until that is done). Anything else is refused with the error
/// that says why.
pub fn cancel_by_client(action: &Action, now: Ts) -> Result<Change, Error> {
    let owed = match action.state {
        ActionState::Scheduled => None,
        ActionState::Active => Some((Work::Revert, now)),
        ActionState::Cancelled => {
            return Err(Error::AlreadyCancelled {
                device_id: action.device_id.to_string(),
                action_id: action.id,
                cancelled_at: action.updated,
                replaced_by: action.replaced_by,
            });
        }
        state @ (ActionState::Acknowledged | ActionState::Completed | ActionState::Failed) => {
            return Err(Error::NotCancellable {
                device_id: action.device_id.to_string(),
                action_id: action.id,
                state,
            });
        }
    };
    let mut a = action.clone();
    a.state = ActionState::Cancelled;
    a.error_code = Some(codes::CANCELLED_BY_CLIENT.to_owned());
    a.error_message = Some("cancelled by CancelAction".to_owned());
    a.revision += 1;
    a.updated = now;
    let transition = transition(&a, action.state, codes::CANCELLED_BY_CLIENT);
    Ok(Change {
        action: a,
        work: owed,
        transition,
    })
}

/// CANCEL_AND_REPLACE: a holder the push replaces (only SCHEDULED ones can
/// be: the collision rules refuse the others) is cancelled, naming its
/// replacement; nothing is owed.
pub fn replace(holder: &Action, by: ActionId, now: Ts) -> Change {
    debug_assert_eq!(
        holder.state,
        ActionState::Scheduled,
        "only SCHEDULED holders are replaced"
    );
    let mut a = holder.clone();
    a.state = ActionState::Cancelled;
    a.replaced_by = Some(by);
    a.error_code = Some(codes::REPLACED.to_owned());
    a.error_message = Some(format!("replaced by action {by}"));
    a.revision += 1;
    a.updated = now;
    let transition = transition(&a, holder.state, codes::REPLACED);
    Change {
        action: a,
        work: None,
        transition,
    }
}

/// The audit reason of a push: how it was booked.
pub fn push_reason(
    strategy: super::Strategy,
    cancelled_any: bool,
    queued_any: bool,
) -> &'static str {
    match (strategy, cancelled_any, queued_any) {
        (super::Strategy::CancelAndReplace, true, _) => "PUSHED_CANCEL_AND_REPLACE",
        (super::Strategy::QueueAfter, _, true) => "PUSHED_QUEUE_AFTER",
        _ => "PUSHED",
    }
}

/// What came of a dispatched job.
#[derive(Clone, Debug)]
pub enum Finish {
    /// The command is in force: ACTIVE until `end` (then reverted), or
    /// COMPLETED when it has no end.
    Applied {
        /// The OEM's answer.
        raw: String,
        /// Read back and found in force.
        verified: bool,
        /// What the driver recorded to undo it (kept until the revert).
        memo: Option<String>,
    },
    /// The command was undone: ACTIVE → COMPLETED (a cancelled one stays
    /// CANCELLED).
    Reverted {
        /// The OEM's answer.
        raw: String,
        /// Read back and found undone.
        verified: bool,
    },
    /// Try again at `due` (attempts counted).
    Retry {
        due: Ts,
        /// What failed.
        message: String,
        /// The OEM's answer.
        raw: Option<String>,
        /// A write that may have landed despite the failure: what the
        /// driver needs to undo it (kept until a revert).
        memo: Option<String>,
    },
    /// Not now (e.g. the rate budget): try at `due`, no attempt counted.
    Postpone { due: Ts },
    /// Give up: FAILED with `code`.
    Failed {
        /// The action error code.
        code: String,
        message: String,
        /// The OEM's answer.
        raw: Option<String>,
        /// What the driver did is unknown (it panicked midway), or a write
        /// may have landed: a revert is owed at once, and the action holds
        /// its channel until it is done.
        revert: bool,
        /// What the driver needs to undo a write that may have landed.
        memo: Option<String>,
    },
}

/// What a dispatch outcome makes of an action.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    /// The change: the action, the work owed next, the audit entry.
    pub change: Change,
    /// Failed tries so far.
    pub attempts: i64,
    /// The OEM's answer to keep (capped), if any.
    pub raw: Option<String>,
    /// The driver's memo: `Some(Some(m))` sets it, `Some(None)` clears it,
    /// `None` keeps what is on record.
    pub memo: Option<Option<String>>,
}

impl Finish {
    /// Whether a final failure of an apply must also owe a revert because
    /// an earlier try's write may be in force (its memo is on record): the
    /// store asks only then.
    pub fn needs_written_before(&self, work: Work) -> bool {
        matches!(self, Finish::Failed { revert: false, .. }) && work == Work::Apply
    }
}

/// What `result` of a `work` job (after `attempts` failed tries) makes of
/// `action` at `now`. `written_before`: an earlier try's memo is on record
/// (asked only when [`Finish::needs_written_before`]).
pub fn settle(
    action: &Action,
    work: Work,
    attempts: i64,
    result: Finish,
    written_before: bool,
    now: Ts,
) -> Settled {
    let mut a = action.clone();
    let from = a.state;
    let settled = matches!(result, Finish::Applied { .. } | Finish::Reverted { .. });
    let memo: Option<Option<String>> = match &result {
        // An action without an end is done once applied: it is never
        // reverted, so nothing of it is kept as in force.
        Finish::Applied { memo, .. } if a.end.is_some() => memo.clone().map(Some),
        Finish::Retry { memo, .. } | Finish::Failed { memo, .. } => memo.clone().map(Some),
        Finish::Reverted { .. } => Some(None),
        _ => None,
    };
    let (to, owed, attempts, reason, raw): (
        ActionState,
        Option<(Work, Ts)>,
        i64,
        String,
        Option<String>,
    ) = match result {
        Finish::Applied { raw, verified, .. } => {
            a.verified = verified;
            // A windowed action is reverted at its end; one without an
            // end is done once applied.
            match a.end {
                Some(end) => (
                    ActionState::Active,
                    Some((Work::Revert, end)),
                    0,
                    "APPLIED".into(),
                    Some(raw),
                ),
                None => (ActionState::Completed, None, 0, "APPLIED".into(), Some(raw)),
            }
        }
        Finish::Reverted { raw, verified } => {
            a.verified = verified;
            // A cancelled or failed action stays so once undone.
            let to = match from {
                ActionState::Cancelled | ActionState::Failed => from,
                ActionState::Scheduled
                | ActionState::Acknowledged
                | ActionState::Active
                | ActionState::Completed => ActionState::Completed,
            };
            (to, None, 0, "REVERTED".into(), Some(raw))
        }
        Finish::Retry {
            due, message, raw, ..
        } => {
            // A cancelled or failed action keeps saying why it is so.
            if !matches!(from, ActionState::Cancelled | ActionState::Failed) {
                a.error_message = Some(format!("{RETRYING}{message}"));
            }
            (from, Some((work, due)), attempts + 1, "RETRY".into(), raw)
        }
        Finish::Postpone { due } => (from, Some((work, due)), attempts, "POSTPONED".into(), None),
        Finish::Failed {
            code,
            message,
            raw,
            revert,
            ..
        } => {
            a.error_code = Some(code.clone());
            a.error_message = Some(message);
            // (Not for a revert that failed for good: REVERT_FAILED
            // stands.)
            let owed =
                (revert || (written_before && work == Work::Apply)).then_some((Work::Revert, now));
            (ActionState::Failed, owed, 0, code, raw)
        }
    };
    if settled
        && a.error_message
            .as_deref()
            .is_some_and(|m| m.starts_with(RETRYING))
    {
        // An earlier "retrying" note no longer applies (why an action was
        // cancelled or failed still does).
        a.error_message = None;
    }
    let raw = raw.map(|r| cap(r, MAX_OEM_RESPONSE_BYTES));
    a.error_message = a.error_message.map(|m| cap(m, MAX_ERROR_MESSAGE_BYTES));
    if raw.is_some() {
        a.oem_response = raw.clone();
    }
    a.state = to;
    a.revision += 1;
    a.updated = now;
    let transition = transition(&a, from, &reason);
    Settled {
        change: Change {
            action: a,
            work: owed,
            transition,
        },
        attempts,
        raw,
        memo,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceId;

    fn action(state: ActionState, end: Option<Ts>) -> Action {
        Action::for_tests(state, end)
    }

    const NOW: Ts = Ts(50);

    #[test]
    fn a_client_cancel_owes_a_revert_only_for_what_is_in_force() {
        let c = cancel_by_client(&action(ActionState::Scheduled, Some(Ts(100))), NOW).unwrap();
        assert_eq!(c.action.state, ActionState::Cancelled);
        assert_eq!(c.work, None);
        assert_eq!(
            c.action.error_code.as_deref(),
            Some(codes::CANCELLED_BY_CLIENT)
        );
        assert_eq!((c.action.revision, c.action.updated), (4, NOW));
        let t = c.transition.unwrap();
        assert_eq!(
            (t.from, t.to, t.reason.as_str()),
            (
                Some(ActionState::Scheduled),
                ActionState::Cancelled,
                codes::CANCELLED_BY_CLIENT
            )
        );
        let c = cancel_by_client(&action(ActionState::Active, Some(Ts(100))), NOW).unwrap();
        assert_eq!(c.work, Some((Work::Revert, NOW)));
        for s in [
            ActionState::Acknowledged,
            ActionState::Completed,
            ActionState::Failed,
        ] {
            assert!(
                matches!(cancel_by_client(&action(s, None), NOW), Err(Error::NotCancellable { state, .. }) if state == s)
            );
        }
        assert!(matches!(
            cancel_by_client(&action(ActionState::Cancelled, None), NOW),
            Err(Error::AlreadyCancelled { .. })
        ));
    }

    /// Every change leaves an action that holds its channel owing work:
    /// the stores look for holders among owed rows only.
    #[test]
    fn every_change_leaves_holders_owing_work() {
        let finishes = || {
            let failed = |revert| Finish::Failed {
                code: "X".into(),
                message: "m".into(),
                raw: None,
                revert,
                memo: None,
            };
            [
                applied(None),
                applied(Some("m")),
                Finish::Reverted {
                    raw: "ok".into(),
                    verified: false,
                },
                Finish::Retry {
                    due: Ts(70),
                    message: "m".into(),
                    raw: None,
                    memo: None,
                },
                Finish::Postpone { due: Ts(70) },
                failed(false),
                failed(true),
            ]
        };
        let owes = |c: &Change| {
            assert!(
                !holds_channel(c.action.state, c.work.map(|(w, _)| w)) || c.work.is_some(),
                "{:?} holds its channel owing nothing",
                c.action.state
            );
        };
        // And the other way (PostgreSQL's exclusion constraint covers
        // the owed rows): whatever owes work holds its channel, from any
        // row that did so before.
        let holds = |c: &Change| {
            if let Some((w, _)) = c.work {
                assert!(
                    holds_channel(c.action.state, Some(w)),
                    "{:?} owes {w:?} without holding its channel",
                    c.action.state
                );
            }
        };
        let (mut settled, mut owing) = (0, 0);
        for state in ActionState::ALL {
            for end in [None, Some(Ts(100))] {
                let a = action(state, end);
                for work in [Work::Apply, Work::Revert] {
                    for written in [false, true] {
                        for f in finishes() {
                            let s = settle(&a, work, 0, f, written, NOW);
                            owes(&s.change);
                            if holds_channel(state, Some(work)) {
                                holds(&s.change);
                                owing += 1;
                            }
                            settled += 1;
                        }
                    }
                }
                if let Ok(c) = cancel_by_client(&a, NOW) {
                    owes(&c);
                    holds(&c);
                }
                if state == ActionState::Scheduled {
                    owes(&replace(&a, ActionId::from_u128(9), NOW));
                    holds(&replace(&a, ActionId::from_u128(9), NOW));
                    for c in
                        delete_device(&a.device_id, std::slice::from_ref(&a), true, NOW).unwrap()
                    {
                        owes(&c);
                        holds(&c);
                    }
                }
            }
        }
        assert_eq!(settled, ActionState::ALL.len() * 2 * 2 * 2 * 7);
        assert!(owing > 0 && owing < settled, "{owing} of {settled}");
    }

    #[test]
    fn a_replaced_action_is_cancelled_naming_its_replacement() {
        let by = ActionId::from_u128(9);
        let c = replace(&action(ActionState::Scheduled, None), by, NOW);
        assert_eq!(c.action.state, ActionState::Cancelled);
        assert_eq!(c.action.replaced_by, Some(by));
        assert_eq!(c.action.error_code.as_deref(), Some(codes::REPLACED));
        assert_eq!(c.work, None);
        assert_eq!(c.transition.unwrap().reason, codes::REPLACED);
    }

    #[test]
    fn push_reasons_name_the_strategy_only_when_it_did_something() {
        use crate::domain::Strategy as S;
        assert_eq!(
            push_reason(S::CancelAndReplace, true, false),
            "PUSHED_CANCEL_AND_REPLACE"
        );
        assert_eq!(push_reason(S::CancelAndReplace, false, false), "PUSHED");
        assert_eq!(
            push_reason(S::QueueAfter, false, true),
            "PUSHED_QUEUE_AFTER"
        );
        assert_eq!(push_reason(S::QueueAfter, false, false), "PUSHED");
        assert_eq!(push_reason(S::Reject, false, false), "PUSHED");
    }

    fn applied(memo: Option<&str>) -> Finish {
        Finish::Applied {
            raw: "ok".into(),
            verified: true,
            memo: memo.map(str::to_owned),
        }
    }

    #[test]
    fn applied_is_active_until_its_end_or_complete_without_one() {
        let s = settle(
            &action(ActionState::Acknowledged, Some(Ts(100))),
            Work::Apply,
            2,
            applied(Some("m")),
            false,
            NOW,
        );
        assert_eq!(s.change.action.state, ActionState::Active);
        assert_eq!(s.change.work, Some((Work::Revert, Ts(100))));
        assert_eq!((s.attempts, s.memo), (0, Some(Some("m".into()))));
        assert!(s.change.action.verified);
        assert_eq!(s.change.transition.unwrap().reason, "APPLIED");
        let s = settle(
            &action(ActionState::Acknowledged, None),
            Work::Apply,
            0,
            applied(Some("m")),
            false,
            NOW,
        );
        assert_eq!(s.change.action.state, ActionState::Completed);
        assert_eq!(
            (s.change.work, s.memo),
            (None, None),
            "never reverted: no memo kept"
        );
    }

    #[test]
    fn a_revert_completes_an_active_action_and_keeps_a_cancelled_one_cancelled() {
        let reverted = || Finish::Reverted {
            raw: "ok".into(),
            verified: true,
        };
        let s = settle(
            &action(ActionState::Active, Some(Ts(10))),
            Work::Revert,
            0,
            reverted(),
            false,
            NOW,
        );
        assert_eq!(s.change.action.state, ActionState::Completed);
        assert_eq!(s.memo, Some(None), "the memo is cleared");
        for stays in [ActionState::Cancelled, ActionState::Failed] {
            let s = settle(
                &action(stays, Some(Ts(10))),
                Work::Revert,
                0,
                reverted(),
                false,
                NOW,
            );
            assert_eq!(s.change.action.state, stays);
            assert_eq!(s.change.transition, None);
        }
    }

    #[test]
    fn a_retry_counts_the_attempt_and_notes_why_then_a_success_clears_the_note() {
        let retry = Finish::Retry {
            due: Ts(70),
            message: "outage".into(),
            raw: Some("x".repeat(5000)),
            memo: None,
        };
        let s = settle(
            &action(ActionState::Acknowledged, Some(Ts(100))),
            Work::Apply,
            1,
            retry,
            false,
            NOW,
        );
        assert_eq!(s.change.work, Some((Work::Apply, Ts(70))));
        assert_eq!(s.attempts, 2);
        assert_eq!(
            s.change.action.error_message.as_deref(),
            Some("retrying: outage")
        );
        assert!(s.raw.unwrap().len() <= MAX_OEM_RESPONSE_BYTES);
        assert_eq!(s.memo, None, "kept as on record");
        let s = settle(&s.change.action, Work::Apply, 2, applied(None), false, NOW);
        assert_eq!(s.change.action.error_message, None);
        // A cancelled action keeps saying why, through retried reverts.
        let mut cancelled = action(ActionState::Cancelled, Some(Ts(100)));
        cancelled.error_message = Some("cancelled by CancelAction".into());
        let retry = Finish::Retry {
            due: Ts(70),
            message: "outage".into(),
            raw: None,
            memo: None,
        };
        let s = settle(&cancelled, Work::Revert, 0, retry, false, NOW);
        assert_eq!(
            s.change.action.error_message.as_deref(),
            Some("cancelled by CancelAction")
        );
    }

    #[test]
    fn a_final_failure_owes_a_revert_when_a_write_may_be_in_force_but_never_after_a_revert() {
        let failed = |revert: bool, memo: Option<&str>| Finish::Failed {
            code: "OEM_REJECTED".into(),
            message: "no".into(),
            raw: None,
            revert,
            memo: memo.map(str::to_owned),
        };
        let a = action(ActionState::Acknowledged, Some(Ts(100)));
        let owes =
            |f: Finish, written: bool, work: Work| settle(&a, work, 0, f, written, NOW).change.work;
        assert_eq!(owes(failed(false, None), false, Work::Apply), None);
        assert_eq!(
            owes(failed(true, None), false, Work::Apply),
            Some((Work::Revert, NOW))
        );
        assert_eq!(
            owes(failed(false, None), true, Work::Apply),
            Some((Work::Revert, NOW))
        );
        assert_eq!(
            owes(failed(false, None), true, Work::Revert),
            None,
            "REVERT_FAILED stands"
        );
        assert!(failed(false, None).needs_written_before(Work::Apply));
        assert!(!failed(true, None).needs_written_before(Work::Apply));
        assert!(!failed(false, None).needs_written_before(Work::Revert));
        let s = settle(&a, Work::Apply, 0, failed(false, Some("m")), false, NOW);
        assert_eq!(s.change.action.state, ActionState::Failed);
        assert_eq!(s.change.action.error_code.as_deref(), Some("OEM_REJECTED"));
        assert_eq!(s.memo, Some(Some("m".into())));
    }

    #[test]
    fn a_channel_is_held_while_booked_in_force_or_owing_a_revert() {
        for s in ActionState::ALL {
            let booked = matches!(
                s,
                ActionState::Scheduled | ActionState::Acknowledged | ActionState::Active
            );
            assert_eq!(holds_channel(s, None), booked, "{s:?}");
            assert!(holds_channel(s, Some(Work::Revert)), "{s:?} owing a revert");
            assert_eq!(holds_channel(s, Some(Work::Apply)), booked, "{s:?}");
        }
    }

    #[test]
    fn a_device_is_deleted_only_without_holders_or_forced_over_scheduled_ones() {
        let d = DeviceId::parse("d").unwrap();
        assert_eq!(delete_device(&d, &[], false, NOW).unwrap(), vec![]);
        let scheduled = action(ActionState::Scheduled, Some(Ts(100)));
        let refused = delete_device(&d, std::slice::from_ref(&scheduled), false, NOW);
        assert!(
            matches!(refused, Err(Error::DeviceHasActiveActions { ref in_flight, .. }) if in_flight.is_empty())
        );
        let forced = delete_device(&d, std::slice::from_ref(&scheduled), true, NOW).unwrap();
        assert_eq!(forced[0].action.state, ActionState::Cancelled);
        assert_eq!(
            forced[0].transition.as_ref().unwrap().reason,
            codes::DEVICE_DELETED
        );
        // In force, or cancelled with its revert owed: blocks even forced.
        for blocking in [
            ActionState::Acknowledged,
            ActionState::Active,
            ActionState::Cancelled,
        ] {
            let a = action(blocking, Some(Ts(100)));
            let r = delete_device(&d, &[scheduled.clone(), a.clone()], true, NOW);
            assert!(
                matches!(r, Err(Error::DeviceHasActiveActions { ref in_flight, .. }) if *in_flight == vec![a.id]),
                "{blocking:?}: {r:?}"
            );
        }
    }

    #[test]
    fn a_postponed_job_counts_no_attempt_and_changes_no_state() {
        let a = action(ActionState::Acknowledged, Some(Ts(100)));
        let s = settle(
            &a,
            Work::Apply,
            3,
            Finish::Postpone { due: Ts(60) },
            false,
            NOW,
        );
        assert_eq!(
            (s.attempts, s.change.work),
            (3, Some((Work::Apply, Ts(60))))
        );
        assert_eq!(s.change.transition, None);
        assert_eq!(s.change.action.state, ActionState::Acknowledged);
    }
}
