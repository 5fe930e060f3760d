//! The driver contract: what the dispatcher asks of a device's driver.

use std::{fmt, time::Duration};

use async_trait::async_trait;

use crate::model::{Capabilities, Command, Params};

/// One command to put into force on a device.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyRequest {
    /// The switchyard action id (drivers may tag what they write with it).
    pub action_id: String,
    pub command: Command,
    /// Its parameters, as booked.
    pub params: Params,
    /// When the action starts (now, for an immediate one).
    pub start: jiff::Timestamp,
    /// When it ends; `None` = open-ended.
    pub end: Option<jiff::Timestamp>,
    /// The client pushed with CANCEL_AND_REPLACE: the driver may clear the
    /// device's native scheduler (never a protected row) to apply.
    pub clear_native_scheduler: bool,
    /// The other actions on the device whose writes may still be in force,
    /// with what their drivers recorded ([`Outcome::memo`]): what
    /// switchyard wrote for them is switchyard's, not foreign, and a
    /// revert leaves it in place.
    pub live: Vec<Applied>,
    /// What an earlier try of this action recorded ([`Outcome::memo`] or
    /// [`DriverError::memo`]): its write may be in force already.
    pub memo: Option<String>,
    /// The fencing token of the dispatch claim this call runs under: it
    /// grows with every claim of the action's work (0: not fenced). A
    /// driver, or an OEM that can check it, that has seen a larger token
    /// for the action refuses a smaller one with [`ErrorKind::StaleFence`]:
    /// the call comes from a dispatcher that stalled past its lease while
    /// another took the work over.
    pub fence: u64,
}

/// An action whose write may still be in force on a device, and what the
/// driver recorded about that write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The switchyard action id.
    pub action_id: String,
    /// The driver's record of the write ([`Outcome::memo`]), opaque to the
    /// service.
    pub memo: String,
}

/// Undo a command applied earlier (the end of its window, or an early
/// cancel).
#[derive(Clone, Debug, PartialEq)]
pub struct RevertRequest {
    /// What was applied (its `live`: the device's other live actions).
    pub applied: ApplyRequest,
    /// What the apply recorded ([`Outcome::memo`]), when it did: the revert
    /// removes exactly that, whatever changed in the device's settings
    /// since.
    pub memo: Option<String>,
}

/// What the OEM said to a write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The driver read the device back and saw the change in force ("device
    /// verified"), not only the OEM's acceptance.
    pub verified: bool,
    /// The OEM's raw answer, for diagnostics.
    pub raw: String,
    /// The device's state as read back after the write, when the driver
    /// read all of it; `None` makes the service read it again.
    pub state: Option<DeviceState>,
    /// What the driver needs to undo this write later, exactly (e.g. the
    /// rows it wrote and the settings it found): kept durably with the
    /// action until it is reverted, and handed back in
    /// [`RevertRequest::memo`] and, to the device's other actions, in
    /// [`ApplyRequest::live`]. At most [`MAX_MEMO_BYTES`].
    pub memo: Option<String>,
}

/// The largest [`Outcome::memo`] the service keeps; a larger one is
/// dropped (and the revert works from the request alone).
pub const MAX_MEMO_BYTES: usize = 16 * 1024;

/// Who wrote a native scheduler row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOwner {
    /// switchyard wrote it.
    Ours,
    /// Someone else (the homeowner's app, another optimiser, a forgotten
    /// write).
    Foreign,
    /// A protected row (e.g. backup/outage protection): never cleared
    /// without saying so.
    Protected,
}

impl RowOwner {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            RowOwner::Ours => "OURS",
            RowOwner::Foreign => "FOREIGN",
            RowOwner::Protected => "PROTECTED",
        }
    }
}

/// One row of a device's native scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeRow {
    /// Local start, `HH:MM`.
    pub start: String,
    /// Local end, `HH:MM`.
    pub end: String,
    /// The OEM's mode name.
    pub mode: String,
    /// Whether the row is enabled.
    pub enabled: bool,
    /// Who wrote it.
    pub owner: RowOwner,
}

impl NativeRow {
    /// Whether this daily row (local `start`..`end`, wrapping past midnight
    /// when `end` ≤ `start`) is in force at some minute of the window
    /// `[start, end)` in zone `tz`. An open-ended window, or one of a day
    /// or more, meets every row. Rows whose times cannot be read are
    /// assumed to meet it (the cautious answer).
    pub fn meets(
        &self,
        start: jiff::Timestamp,
        end: Option<jiff::Timestamp>,
        tz: &jiff::tz::TimeZone,
    ) -> bool {
        const DAY: i64 = 24 * 60;
        let (Some(rs), Some(re)) = (minute_of_day(&self.start), minute_of_day(&self.end)) else {
            return true;
        };
        let in_row = |m: i64| {
            if rs < re {
                rs <= m && m < re
            } else {
                m >= rs || m < re
            }
        };
        let Some(end) = end else { return true };
        let span = end.duration_since(start).as_secs();
        if span >= DAY * 60 {
            return true;
        }
        // At most 1,440 steps; local minutes, so DST shifts are honoured.
        let mut t = start;
        while t < end {
            let local = tz.to_datetime(t);
            if in_row(i64::from(local.hour()) * 60 + i64::from(local.minute())) {
                return true;
            }
            match t.checked_add(jiff::SignedDuration::from_mins(1)) {
                Ok(next) => t = next,
                Err(_) => return true,
            }
        }
        false
    }
}

/// `HH:MM` → minute of the day (`24:00` is 1,440).
fn minute_of_day(hhmm: &str) -> Option<i64> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=24).contains(&h) && (0..60).contains(&m) && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

/// What a driver observed on a device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceState {
    /// The native scheduler, if the device has one: whether it is enabled
    /// (and so blocks direct writes) and its rows.
    pub native_scheduler: Option<(bool, Vec<NativeRow>)>,
    /// State of charge, percent.
    pub soc_percent: Option<f64>,
    /// The mode in force, in the driver's words.
    pub mode: Option<String>,
}

impl DeviceState {
    /// Whether an enabled native scheduler blocks direct writes.
    pub fn scheduler_active(&self) -> bool {
        matches!(self.native_scheduler, Some((true, _)))
    }
}

/// The closed set of driver failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The native scheduler is on and blocks direct writes.
    SchedulerActive,
    /// The OEM refused the command (not retryable).
    Rejected,
    /// The device is offline.
    Offline,
    /// The OEM's rate limit: retry after `retry_after`.
    RateLimited,
    /// The OEM is temporarily unavailable (5xx, timeouts): retryable.
    Unavailable,
    /// A protected native row stands in the way and may not be cleared.
    ProtectedRow,
    /// The OEM refused the account's credentials (an API key that is
    /// invalid or expired): not retryable, the operator must replace them.
    Credentials,
    /// A row switchyard does not own holds values the OEM would refuse if
    /// it were written back unchanged (the OEM's API replaces whole lists),
    /// and the push did not authorise clearing it: not retryable.
    ForeignUnwritable,
    /// Another writer changed the device's schedule between switchyard's
    /// read and write, again after one redo: retryable.
    Contended,
    /// The OEM reports facts that contradict the device as configured in
    /// switchyard (e.g. another time zone): not retryable until the device
    /// is corrected.
    Misconfigured,
    /// The call carried a fencing token older than one already seen for
    /// the action ([`ApplyRequest::fence`]): a newer claim owns the work.
    StaleFence,
}

/// A classified driver failure.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct DriverError {
    /// What kind.
    pub kind: ErrorKind,
    /// Human-readable detail (no secrets).
    pub message: String,
    /// When a retry may succeed, if the OEM said.
    pub retry_after: Option<Duration>,
    /// The OEM's raw answer (status, errno, msg), for diagnostics.
    pub raw: Option<String>,
    /// The native rows involved (SchedulerActive, ProtectedRow).
    pub rows: Vec<NativeRow>,
    /// The apply failed after a write that may have landed: what to undo
    /// (as [`Outcome::memo`]). The service keeps it with the action and
    /// owes a revert when the failure is final.
    pub memo: Option<String>,
}

impl DriverError {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
            raw: None,
            rows: Vec::new(),
            memo: None,
        }
    }

    /// With what a write that may have landed needs undone.
    pub fn with_memo(mut self, memo: Option<String>) -> Self {
        self.memo = memo;
        self
    }

    /// With the OEM's raw answer.
    pub fn with_raw(mut self, raw: impl Into<String>) -> Self {
        self.raw = Some(raw.into());
        self
    }

    /// With a retry hint.
    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// With the native rows involved.
    pub fn with_rows(mut self, rows: Vec<NativeRow>) -> Self {
        self.rows = rows;
        self
    }

    /// Whether sending the same call later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::RateLimited | ErrorKind::Unavailable | ErrorKind::Contended
        )
    }

    /// The action error code this failure is recorded as.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::SchedulerActive => "SCHEDULER_ACTIVE",
            ErrorKind::Rejected => "OEM_REJECTED",
            ErrorKind::Offline => "DEVICE_OFFLINE",
            ErrorKind::RateLimited => "OEM_RATE_LIMITED",
            ErrorKind::Unavailable => "OEM_UNAVAILABLE",
            ErrorKind::ProtectedRow => "PROTECTED_SCHEDULE",
            ErrorKind::Credentials => "OEM_CREDENTIALS_INVALID",
            ErrorKind::ForeignUnwritable => "FOREIGN_SCHEDULE_UNWRITABLE",
            ErrorKind::Contended => "OEM_CONCURRENT_WRITE",
            ErrorKind::Misconfigured => "DEVICE_MISCONFIGURED",
            ErrorKind::StaleFence => "STALE_CLAIM",
        }
    }
}

/// A driver bound to one device.
///
/// Contract (the conformance suite checks it):
/// - `apply` MUST put the command in force or fail with a classified
///   [`DriverError`]; it MUST NOT report success for a write the OEM
///   refused. Where the OEM can be read back, `Outcome::verified` says
///   whether the change was seen.
/// - While an enabled native scheduler blocks direct writes, `apply` MUST
///   fail with `SchedulerActive` (listing the rows) unless
///   `clear_native_scheduler` is set; then it MUST clear the scheduler
///   first, except protected rows, which it MUST NOT remove (it fails with
///   `ProtectedRow` instead).
/// - A driver MUST NOT remove or change native rows it does not own, except
///   as above.
/// - `revert` MUST undo exactly what `apply` put in force for that action
///   and MUST be safe to call again after a failure or a restart
///   (idempotent).
/// - Errors MUST NOT contain secrets.
#[async_trait]
pub trait Driver: Send + Sync + fmt::Debug {
    /// What the device can do.
    fn capabilities(&self) -> &Capabilities;

    /// The OEM account the device belongs to: devices with the same
    /// account share one rate budget.
    fn account(&self) -> String;

    /// Reads the device's state, including its native scheduler; `live`
    /// are the device's actions whose writes may be in force (their rows
    /// are labelled [`RowOwner::Ours`]).
    async fn read_state(&self, live: &[Applied]) -> Result<DeviceState, DriverError>;

    /// Puts a command in force.
    async fn apply(&self, req: &ApplyRequest) -> Result<Outcome, DriverError>;

    /// Undoes an applied command.
    async fn revert(&self, req: &RevertRequest) -> Result<Outcome, DriverError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start: &str, end: &str) -> NativeRow {
        NativeRow {
            start: start.into(),
            end: end.into(),
            mode: "Backup".into(),
            enabled: true,
            owner: RowOwner::Protected,
        }
    }

    fn utc(h: i8, m: i8) -> jiff::Timestamp {
        jiff::tz::TimeZone::UTC
            .to_timestamp(jiff::civil::date(2030, 1, 15).at(h, m, 0, 0))
            .unwrap()
    }

    #[test]
    fn a_row_meets_a_window_only_where_their_local_minutes_overlap() {
        let berlin = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        let r = row("03:00", "04:00");
        // 02:00-03:00 Berlin (01:00-02:00 UTC): back to back, no overlap.
        assert!(!r.meets(utc(1, 0), Some(utc(2, 0)), &berlin));
        // 02:00-03:01 Berlin: one shared minute.
        assert!(r.meets(utc(1, 0), Some(utc(2, 1)), &berlin));
        // The same UTC window seen from UTC misses it.
        assert!(!r.meets(utc(1, 0), Some(utc(2, 1)), &jiff::tz::TimeZone::UTC));
        // Open-ended and day-long windows meet every row.
        assert!(r.meets(utc(5, 0), None, &berlin));
        assert!(r.meets(
            utc(5, 0),
            Some(utc(5, 0) + jiff::SignedDuration::from_hours(24)),
            &berlin
        ));
        // A row wrapping past midnight.
        let night = row("23:00", "01:00");
        assert!(night.meets(utc(23, 30), Some(utc(23, 45)), &jiff::tz::TimeZone::UTC));
        assert!(!night.meets(utc(2, 0), Some(utc(22, 0)), &jiff::tz::TimeZone::UTC));
        // Unreadable times: assume the worst.
        assert!(row("x", "04:00").meets(utc(10, 0), Some(utc(11, 0)), &berlin));
    }
}
