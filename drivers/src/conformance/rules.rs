//! The rules of the suite, one function each, named for what it checks.
//! [`conformance_suite!`](crate::conformance_suite) runs every one of them
//! as its own test (a rule added here is listed there too). A rule whose
//! needs the driver's capabilities do not declare returns early with a
//! note.

use super::{
    Harness,
    scenario::{self, Seen, plain, probe, skip},
};

/// The driver's capabilities are coherent: it declares commands, each
/// with a channel and timing shapes, parameter bounds in order and units;
/// and it names its account.
pub async fn capabilities_are_coherent(h: &dyn Harness) {
    scenario::capabilities_are_coherent(h);
}

/// Every windowed command applies, reverts, and reverts again (revert is
/// idempotent), each answered with the OEM's raw words. Needs a windowed
/// command.
pub async fn apply_then_revert_twice_succeeds(h: &dyn Harness) {
    let d = h.driver();
    if scenario::windowed(d.capabilities()).next().is_none() {
        return skip(
            "apply_then_revert_twice_succeeds",
            "no windowed command declared",
        );
    }
    scenario::apply_then_revert_twice(h, &mut Seen::default()).await;
}

/// Once every windowed command was applied and reverted, no row of ours
/// is left in the native scheduler. Needs a native scheduler.
pub async fn reverted_actions_leave_no_rows_of_ours(h: &dyn Harness) {
    if !h.driver().capabilities().native_scheduler {
        return skip(
            "reverted_actions_leave_no_rows_of_ours",
            "no native scheduler declared",
        );
    }
    let mut seen = Seen::default();
    scenario::apply_then_revert_twice(h, &mut seen).await;
    scenario::no_rows_of_ours(h, &mut seen).await;
}

/// A foreign, enabled native schedule shows in the state as an active
/// native scheduler. Needs a native scheduler.
pub async fn read_state_shows_an_active_native_scheduler(h: &dyn Harness) {
    if !h.driver().capabilities().native_scheduler {
        return skip(
            "read_state_shows_an_active_native_scheduler",
            "no native scheduler declared",
        );
    }
    scenario::scheduler_shows_active(h, &mut Seen::default()).await;
}

/// An active native scheduler blocks a plain apply: SchedulerActive,
/// naming the foreign rows. Needs a native scheduler and a windowed
/// command.
pub async fn native_scheduler_blocks_plain_apply(h: &dyn Harness) {
    let caps = h.driver().capabilities().clone();
    let Some(cmd) = probe(&caps).filter(|_| caps.native_scheduler) else {
        return skip(
            "native_scheduler_blocks_plain_apply",
            "no native scheduler or no windowed command declared",
        );
    };
    scenario::scheduler_blocks_plain_apply(h, cmd, &mut Seen::default()).await;
}

/// An apply authorised to clear the native scheduler (CANCEL_AND_REPLACE)
/// goes through an active one, and reverts. Needs a native scheduler and a
/// windowed command.
pub async fn clearing_native_scheduler_lets_apply_through(h: &dyn Harness) {
    let caps = h.driver().capabilities().clone();
    let Some(cmd) = probe(&caps).filter(|_| caps.native_scheduler) else {
        return skip(
            "clearing_native_scheduler_lets_apply_through",
            "no native scheduler or no windowed command declared",
        );
    };
    scenario::clearing_lets_apply_through(h, cmd, &mut Seen::default()).await;
}

/// An OEM outage is a retryable failure, OEM_UNAVAILABLE. Needs a
/// windowed command.
pub async fn outage_is_retryable(h: &dyn Harness) {
    let Some(cmd) = probe(h.driver().capabilities()) else {
        return skip("outage_is_retryable", "no windowed command declared");
    };
    scenario::outage_is_retryable(h, cmd, &mut Seen::default()).await;
}

/// An OEM refusal is final: OEM_REJECTED, not retryable. Needs a windowed
/// command.
pub async fn refusal_is_not_retryable(h: &dyn Harness) {
    let Some(cmd) = probe(h.driver().capabilities()) else {
        return skip("refusal_is_not_retryable", "no windowed command declared");
    };
    scenario::refusal_is_final(h, cmd, &mut Seen::default()).await;
}

/// After an outage and a refusal, once they stop, the driver applies and
/// reverts again. Needs a windowed command.
pub async fn the_driver_works_again_once_faults_clear(h: &dyn Harness) {
    let caps = h.driver().capabilities().clone();
    let (Some(fault), Some(after)) = (probe(&caps), plain(&caps)) else {
        return skip(
            "the_driver_works_again_once_faults_clear",
            "no windowed command declared",
        );
    };
    let mut seen = Seen::default();
    scenario::outage_is_retryable(h, fault, &mut seen).await;
    scenario::refusal_is_final(h, fault, &mut seen).await;
    scenario::works(h, after, &mut seen).await;
}

/// A call whose fencing token is older than one the device has seen for
/// the action (a dispatcher that lost its claim) is refused, STALE_CLAIM,
/// not retryable; calls with the current token work. Needs a device that
/// checks fences and a windowed command.
pub async fn a_stale_fencing_token_is_refused(h: &dyn Harness) {
    let caps = h.driver().capabilities().clone();
    let Some(cmd) = plain(&caps).filter(|_| h.checks_fences()) else {
        return skip(
            "a_stale_fencing_token_is_refused",
            "the device checks no fencing tokens, or no windowed command declared",
        );
    };
    scenario::stale_fence_is_refused(h, cmd, &mut Seen::default()).await;
}

/// Secrets never show: not in the driver's `Debug` or account, nor in any
/// outcome, state or error of every step of the other rules (those the
/// capabilities allow) and of a command the device cannot carry out. The
/// steps must have shown outcomes, states and errors; and where the
/// harness names how a redacted echo shows, it did show. Without a secret
/// from the harness, only what was shown is checked.
pub async fn secrets_never_show(h: &dyn Harness) {
    let mut seen = Seen::default();
    let caps = h.driver().capabilities().clone();
    scenario::apply_then_revert_twice(h, &mut seen).await;
    scenario::no_rows_of_ours(h, &mut seen).await;
    let probe = probe(&caps);
    if caps.native_scheduler {
        scenario::scheduler_shows_active(h, &mut seen).await;
        if let Some(cmd) = probe {
            scenario::scheduler_blocks_plain_apply(h, cmd, &mut seen).await;
            scenario::clearing_lets_apply_through(h, cmd, &mut seen).await;
        }
    }
    if let (Some(fault), Some(after)) = (probe, plain(&caps)) {
        scenario::outage_is_retryable(h, fault, &mut seen).await;
        scenario::refusal_is_final(h, fault, &mut seen).await;
        scenario::works(h, after, &mut seen).await;
        scenario::impossible(h, fault.0, &mut seen).await;
    }

    assert!(
        seen.outcomes > 0 && seen.states > 0 && seen.errors > 0,
        "{seen:?}"
    );
    let d = h.driver();
    seen.texts.push(format!("{d:?}"));
    seen.texts.push(d.account());
    let Some(secret) = h.secret() else {
        return skip(
            "secrets_never_show",
            "the harness names no secret: only checked that outcomes, states and errors showed",
        );
    };
    if let Some((piece, text)) = seen.trace_of(&secret) {
        panic!("the secret leaked ({piece:?}) into: {text}");
    }
    if let Some(marker) = h.redacted_echo() {
        assert!(
            seen.texts.iter().any(|t| t.contains(&marker)),
            "the device echoed the secret and the driver redacted it ({marker:?}): {seen:?}"
        );
    }
}
