//! Actions and their lifecycle.

pub use switchyard_drivers::{Command, Family, Params, Quantity, Unit};

use super::{ActionId, DeviceId, Ts};

/// Lifecycle state of an action. See SPEC §3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionState {
    /// Stored, waiting for its start.
    Scheduled,
    /// Sent to the OEM; outcome unknown (in flight).
    Acknowledged,
    /// A windowed command accepted by the OEM; the window is running.
    Active,
    Completed,
    Failed,
    /// Cancelled or replaced.
    Cancelled,
}

impl ActionState {
    /// Every state.
    pub const ALL: [ActionState; 6] = [
        ActionState::Scheduled,
        ActionState::Acknowledged,
        ActionState::Active,
        ActionState::Completed,
        ActionState::Failed,
        ActionState::Cancelled,
    ];

    /// Whether an action in this state holds its channel.
    pub fn holds(self) -> bool {
        matches!(
            self,
            ActionState::Scheduled | ActionState::Acknowledged | ActionState::Active
        )
    }

    /// Whether the OEM is already executing it (it cannot be cancelled by a
    /// replacement).
    pub fn in_flight(self) -> bool {
        matches!(self, ActionState::Acknowledged | ActionState::Active)
    }

    /// Stable upper-case name, used in storage and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionState::Scheduled => "SCHEDULED",
            ActionState::Acknowledged => "ACKNOWLEDGED",
            ActionState::Active => "ACTIVE",
            ActionState::Completed => "COMPLETED",
            ActionState::Failed => "FAILED",
            ActionState::Cancelled => "CANCELLED",
        }
    }

    /// Inverse of [`ActionState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        ActionState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// How a push resolves a collision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// Reject the push.
    Reject,
    /// Cancel colliding SCHEDULED actions and book the new one.
    CancelAndReplace,
    /// Move the new action after the colliding ones.
    QueueAfter,
}

/// Error codes recorded on actions that end other than COMPLETED.
pub mod codes {
    /// Cancelled by CANCEL_AND_REPLACE.
    pub const REPLACED: &str = "REPLACED";
    /// Cancelled by CancelAction.
    pub const CANCELLED_BY_CLIENT: &str = "CANCELLED_BY_CLIENT";
    /// Cancelled because its device was deleted with force.
    pub const DEVICE_DELETED: &str = "DEVICE_DELETED";
    /// The revert at the end of the window kept failing: the override may
    /// still be in force on the device.
    pub const REVERT_FAILED: &str = "REVERT_FAILED";
    /// The window had ended before the action could be applied (the
    /// service was down, or retries ran out of window).
    pub const WINDOW_MISSED: &str = "WINDOW_MISSED";
    /// The device's driver configuration is no longer accepted by its
    /// driver.
    pub const DEVICE_MISCONFIGURED: &str = "DEVICE_MISCONFIGURED";
    /// The driver failed in a way it did not classify (it panicked): a bug
    /// in the driver, reported rather than retried.
    pub const DRIVER_FAULT: &str = "DRIVER_FAULT";
}

/// What the dispatcher owes an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Put the command in force.
    Apply,
    /// Undo it.
    Revert,
}

impl Work {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Work::Apply => "APPLY",
            Work::Revert => "REVERT",
        }
    }
}

/// A booked action, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub id: ActionId,
    pub device_id: DeviceId,
    /// The channel its command controls.
    pub channel: String,
    pub command: Command,
    pub params: Params,
    /// Start of its occupancy (for an immediate action, when it was booked).
    pub start: Ts,
    /// End; `None` = open-ended.
    pub end: Option<Ts>,
    /// Whether it was pushed without a start.
    pub immediate: bool,
    pub state: ActionState,
    /// The action that replaced it.
    pub replaced_by: Option<ActionId>,
    /// The actions it was queued after.
    pub queued_after: Vec<ActionId>,
    /// Why it failed or was cancelled.
    pub error_code: Option<String>,
    /// Detail for `error_code`.
    pub error_message: Option<String>,
    /// The OEM's last raw answer (diagnostics).
    pub oem_response: Option<String>,
    /// The driver read the device back after the last write for this
    /// action (its apply, then its revert) and found it as intended.
    pub verified: bool,
    /// Incremented on every change; the etag.
    pub revision: i64,
    /// Booking time.
    pub created: Ts,
    /// Last change.
    pub updated: Ts,
}

impl Action {
    /// The action's etag: its revision, tagged with its identity so that
    /// another action's etag never matches by accident.
    pub fn etag(&self) -> String {
        super::etag(&self.id.to_string(), self.revision)
    }
}

#[cfg(test)]
impl Action {
    /// A charge on device `d` (id 1, revision 3, starting at 0) in
    /// `state`, ending at `end`: for tests to start from.
    pub(crate) fn for_tests(state: ActionState, end: Option<Ts>) -> Self {
        Self {
            id: ActionId::from_u128(1),
            device_id: DeviceId::parse("d").unwrap(),
            channel: "mode".into(),
            command: Command::Charge,
            params: Params::default(),
            start: Ts(0),
            end,
            immediate: false,
            state,
            replaced_by: None,
            queued_after: vec![],
            error_code: None,
            error_message: None,
            oem_response: None,
            verified: false,
            revision: 3,
            created: Ts(0),
            updated: Ts(0),
        }
    }
}

/// A transition to record in the audit trail.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub action_id: ActionId,
    pub device_id: DeviceId,
    /// Previous state; `None` when created.
    pub from: Option<ActionState>,
    /// New state.
    pub to: ActionState,
    /// Why (an error code, a strategy, "PUSHED").
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holding_and_in_flight_states() {
        let holding: Vec<_> = ActionState::ALL.into_iter().filter(|s| s.holds()).collect();
        assert_eq!(
            holding,
            [
                ActionState::Scheduled,
                ActionState::Acknowledged,
                ActionState::Active
            ]
        );
        assert!(!ActionState::Scheduled.in_flight());
        assert!(ActionState::Active.in_flight());
        for s in ActionState::ALL {
            assert_eq!(ActionState::parse(s.as_str()), Some(s));
        }
    }
}
