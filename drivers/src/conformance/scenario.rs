//! The steps the rules are made of. Each step asserts its own rule and
//! records everything that came out of the driver in a [`Seen`], so the
//! secrets rule can run them all and look for the secret in what they saw.
//! Each step leaves the device as it found it (steering switched off).

use crate::{
    conformance::Harness,
    driver::{ApplyRequest, DeviceState, DriverError, ErrorKind, Outcome, RevertRequest, RowOwner},
    model::{Capabilities, Command, CommandSpec, Param, Params, Quantity, TimingShape, Unit},
};

/// Everything the suite saw come out of a driver, as text: the `Debug` of
/// every outcome, state and error, and every error's `Display`.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) outcomes: usize,
    pub(super) states: usize,
    pub(super) errors: usize,
    pub(super) texts: Vec<String>,
}

impl Seen {
    pub(super) fn outcome(&mut self, o: &Outcome) {
        self.outcomes += 1;
        self.texts.push(format!("{o:?}"));
        if let Some(s) = &o.state {
            self.state(s);
        }
    }

    pub(super) fn state(&mut self, s: &DeviceState) {
        self.states += 1;
        self.texts.push(format!("{s:?}"));
    }

    pub(super) fn error(&mut self, e: &DriverError) {
        self.errors += 1;
        self.texts.push(format!("{e:?}"));
        self.texts.push(e.to_string());
    }

    fn result<T>(&mut self, r: &Result<T, DriverError>, ok: impl FnOnce(&mut Self, &T)) {
        match r {
            Ok(v) => ok(self, v),
            Err(e) => self.error(e),
        }
    }

    /// A piece of `secret` in anything seen: the whole of it, or any 12
    /// characters of it (an echo cut short leaks a prefix, not the key).
    pub(super) fn trace_of(&self, secret: &str) -> Option<(String, &str)> {
        const PIECE: usize = 12;
        let chars: Vec<char> = secret.chars().collect();
        let pieces: Vec<String> = std::iter::once(secret.to_owned())
            .chain(chars.windows(PIECE.min(chars.len())).map(String::from_iter))
            .collect();
        self.texts.iter().find_map(|t| {
            pieces
                .iter()
                .find(|p| t.contains(p.as_str()))
                .map(|p| (p.clone(), t.as_str()))
        })
    }
}

/// Notes that `rule` did not run, and why.
pub(super) fn skip(rule: &str, why: &str) {
    eprintln!("conformance: {rule} skipped: {why}");
}

/// The commands the driver accepts as a window.
pub(super) fn windowed(caps: &Capabilities) -> impl Iterator<Item = &CommandSpec> {
    caps.commands
        .iter()
        .filter(|c| c.timing.contains(&TimingShape::Windowed))
}

/// `watts` within the command's power bounds, if it takes a power.
fn power_near(c: &CommandSpec, watts: f64) -> Option<f64> {
    c.params
        .iter()
        .find(|p| p.param == Param::Power)
        .map(|p| watts.max(p.min).min(p.max))
}

/// The command the steps send where any will do: CHARGE at 1 kW, or the
/// first windowed command if the driver has no windowed CHARGE.
pub(super) fn probe(caps: &Capabilities) -> Option<(Command, Option<f64>)> {
    let c = windowed(caps)
        .find(|c| c.command == Command::Charge)
        .or_else(|| windowed(caps).next())?;
    Some((c.command, power_near(c, 1000.0)))
}

/// The command that shows the driver works again: IDLE, else the probe.
pub(super) fn plain(caps: &Capabilities) -> Option<(Command, Option<f64>)> {
    windowed(caps)
        .find(|c| c.command == Command::Idle)
        .map(|c| (c.command, None))
        .or_else(|| probe(caps))
}

/// The next whole minute after `now`, for an hour: what the dispatcher
/// would apply at `now`.
fn window(now: jiff::Timestamp) -> (jiff::Timestamp, jiff::Timestamp) {
    let now = now.as_second();
    let start = now - now.rem_euclid(60) + 60;
    (
        jiff::Timestamp::from_second(start).unwrap(),
        jiff::Timestamp::from_second(start + 3600).unwrap(),
    )
}

fn request(
    h: &dyn Harness,
    id: &str,
    (command, power_w): (Command, Option<f64>),
    clear: bool,
) -> ApplyRequest {
    let (start, end) = window(h.now());
    ApplyRequest {
        action_id: id.to_owned(),
        command,
        params: Params {
            power: power_w.map(|value| Quantity {
                value,
                unit: Unit::Watt,
            }),
            target_soc: None,
            reserve_soc: None,
        },
        start,
        end: Some(end),
        clear_native_scheduler: clear,
        live: Vec::new(),
        memo: None,
        fence: 0,
    }
}

/// Capabilities are coherent: commands declared, each with a channel and
/// timing shapes, parameter bounds in order, units; an account.
pub(super) fn capabilities_are_coherent(h: &dyn Harness) {
    let d = h.driver();
    let caps = d.capabilities();
    assert!(
        !caps.commands.is_empty(),
        "a controllable device declares commands"
    );
    for c in &caps.commands {
        assert!(!c.channel.is_empty(), "{:?} has a channel", c.command);
        assert!(!c.timing.is_empty(), "{:?} has timing shapes", c.command);
        for p in &c.params {
            assert!(p.min <= p.max, "{:?}.{:?} bounds", c.command, p.param);
            assert!(!p.units.is_empty());
        }
    }
    assert!(!d.account().is_empty());
}

/// Every windowed command applies, reverts, and reverts again
/// (idempotent), each answered with the OEM's raw words.
pub(super) async fn apply_then_revert_twice(h: &dyn Harness, seen: &mut Seen) {
    let d = h.driver();
    for (i, c) in d.capabilities().commands.iter().enumerate() {
        if !c.timing.contains(&TimingShape::Windowed) {
            continue;
        }
        let power = c
            .params
            .iter()
            .find(|p| p.param == Param::Power)
            .map(|p| p.min.max(1.0).max(p.max / 2.0));
        let req = request(h, &format!("conf-{i}"), (c.command, power), false);
        let out = d
            .apply(&req)
            .await
            .unwrap_or_else(|e| panic!("apply {:?}: {e}", c.command));
        assert!(!out.raw.is_empty(), "the OEM's answer is kept");
        seen.outcome(&out);
        // The service hands the apply's memo back to the revert.
        let rev = RevertRequest {
            applied: req.clone(),
            memo: out.memo.clone(),
        };
        let out = d
            .revert(&rev)
            .await
            .unwrap_or_else(|e| panic!("revert {:?}: {e}", c.command));
        seen.outcome(&out);
        let out = d
            .revert(&rev)
            .await
            .unwrap_or_else(|e| panic!("second revert {:?}: {e}", c.command));
        seen.outcome(&out);
    }
}

/// The device's state, read; with a native scheduler, no row of ours is
/// left in it (run after [`apply_then_revert_twice`]: every row we wrote
/// was reverted).
pub(super) async fn no_rows_of_ours(h: &dyn Harness, seen: &mut Seen) {
    let d = h.driver();
    let state = d.read_state(&[]).await.unwrap();
    seen.state(&state);
    if d.capabilities().native_scheduler {
        let (_, rows) = state
            .native_scheduler
            .clone()
            .expect("native scheduler state");
        assert!(
            rows.iter().all(|r| r.owner != RowOwner::Ours),
            "every row we wrote was reverted: {rows:?}"
        );
    }
}

/// With a foreign schedule on, the state shows the native scheduler
/// active. Needs a native scheduler.
pub(super) async fn scheduler_shows_active(h: &dyn Harness, seen: &mut Seen) {
    h.set_foreign_schedule(true).await;
    let state = h.driver().read_state(&[]).await.unwrap();
    seen.state(&state);
    assert!(state.scheduler_active(), "{state:?}");
    h.set_foreign_schedule(false).await;
}

/// With a foreign schedule on, a plain apply of `cmd` fails with
/// SchedulerActive and names the foreign rows. Needs a native scheduler.
pub(super) async fn scheduler_blocks_plain_apply(
    h: &dyn Harness,
    cmd: (Command, Option<f64>),
    seen: &mut Seen,
) {
    h.set_foreign_schedule(true).await;
    let d = h.driver();
    let req = request(h, "conf-native", cmd, false);
    let e = d.apply(&req).await.unwrap_err();
    seen.error(&e);
    assert_eq!(e.kind, ErrorKind::SchedulerActive, "{e}");
    assert!(!e.rows.is_empty(), "the native rows are named");
    assert!(e.rows.iter().any(|r| r.owner == RowOwner::Foreign));
    h.set_foreign_schedule(false).await;
}

/// With a foreign schedule on, CANCEL_AND_REPLACE's authorisation
/// (`clear_native_scheduler`) clears it: `cmd` applies, and reverts.
/// Needs a native scheduler.
pub(super) async fn clearing_lets_apply_through(
    h: &dyn Harness,
    cmd: (Command, Option<f64>),
    seen: &mut Seen,
) {
    h.set_foreign_schedule(true).await;
    let d = h.driver();
    let req = request(h, "conf-native", cmd, true);
    let out = d.apply(&req).await.unwrap();
    seen.outcome(&out);
    let memo = out.memo;
    seen.outcome(
        &d.revert(&RevertRequest { applied: req, memo })
            .await
            .unwrap(),
    );
    h.set_foreign_schedule(false).await;
}

/// During an outage, applying `cmd` is a retryable failure,
/// OEM_UNAVAILABLE.
pub(super) async fn outage_is_retryable(
    h: &dyn Harness,
    cmd: (Command, Option<f64>),
    seen: &mut Seen,
) {
    h.set_outage(true).await;
    let d = h.driver();
    let e = d
        .apply(&request(h, "conf-outage", cmd, false))
        .await
        .unwrap_err();
    seen.error(&e);
    assert!(e.retryable(), "{e:?}");
    assert_eq!(e.code(), "OEM_UNAVAILABLE");
    h.set_outage(false).await;
}

/// While the OEM refuses, applying `cmd` is a final failure,
/// OEM_REJECTED, not retryable. (The state is read too, for what it
/// shows.)
pub(super) async fn refusal_is_final(
    h: &dyn Harness,
    cmd: (Command, Option<f64>),
    seen: &mut Seen,
) {
    h.set_refusal(true).await;
    let d = h.driver();
    let req = request(h, "conf-refused", cmd, false);
    let e = d.apply(&req).await.unwrap_err();
    seen.error(&e);
    assert!(!e.retryable(), "{e:?}");
    assert_eq!(e.code(), "OEM_REJECTED", "{e:?}");
    seen.result(&d.read_state(&[]).await, Seen::state);
    h.set_refusal(false).await;
}

/// `cmd` applies and reverts (run after the faults were switched off).
pub(super) async fn works(h: &dyn Harness, cmd: (Command, Option<f64>), seen: &mut Seen) {
    let d = h.driver();
    let req = request(h, "conf-after", cmd, false);
    let out = d.apply(&req).await.unwrap();
    seen.outcome(&out);
    let memo = out.memo;
    seen.outcome(
        &d.revert(&RevertRequest { applied: req, memo })
            .await
            .unwrap(),
    );
}

/// `cmd` applied under fencing token 2 and reverted under 3; then an apply
/// under token 1 (a stale claim) is refused.
pub(super) async fn stale_fence_is_refused(
    h: &dyn Harness,
    cmd: (Command, Option<f64>),
    seen: &mut Seen,
) {
    let d = h.driver();
    let mut req = request(h, "conf-fence", cmd, false);
    req.fence = 2;
    let out = d.apply(&req).await.unwrap();
    seen.outcome(&out);
    let mut rev = req.clone();
    rev.fence = 3;
    seen.outcome(
        &d.revert(&RevertRequest {
            applied: rev,
            memo: out.memo,
        })
        .await
        .unwrap(),
    );
    let mut stale = req;
    stale.fence = 1;
    let e = d.apply(&stale).await.unwrap_err();
    seen.error(&e);
    assert_eq!(e.kind, ErrorKind::StaleFence, "{e:?}");
    assert_eq!(e.code(), "STALE_CLAIM");
    assert!(!e.retryable());
}

/// A command the device cannot carry out (`cmd` at 1 TW), whichever way
/// it fails, and the state after it: only for what they show.
pub(super) async fn impossible(h: &dyn Harness, cmd: Command, seen: &mut Seen) {
    let d = h.driver();
    let bad = d
        .apply(&request(h, "conf-bad", (cmd, Some(1e12)), false))
        .await;
    seen.result(&bad, Seen::outcome);
    seen.result(&d.read_state(&[]).await, Seen::state);
}
