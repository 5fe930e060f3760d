//! Pure planning: an action → the scheduler groups that express it, and a
//! device's current groups + ours → the list to write. No I/O here, so all
//! the FoxESS rules can be tested without a server.

use std::time::Duration;

use jiff::{Timestamp, tz::TimeZone};

use super::{
    settings::FoxessSettings,
    wire::{Group, WorkMode},
};
use crate::{
    driver::{DriverError, ErrorKind, NativeRow, RowOwner},
    model::{Command, Params, Quantity, Unit},
};

const MINUTES_PER_DAY: usize = 1440;
/// How early an apply may come before the action's start without the
/// daily-recurring groups taking effect noticeably early.
pub const EARLY_TOLERANCE: Duration = Duration::from_secs(120);

fn rejected(msg: impl Into<String>) -> DriverError {
    DriverError::new(ErrorKind::Rejected, msg)
}

/// The per-group values of an action (everything but the times).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Template {
    pub mode: WorkMode,
    /// `minSocOnGrid`.
    pub min_soc_on_grid: i64,
    /// `fdSoc`.
    pub fd_soc: i64,
    /// `fdPwr`.
    pub fd_pwr: i64,
}

fn percent(q: Option<Quantity>, name: &str, min: i64) -> Result<Option<i64>, DriverError> {
    let Some(q) = q else { return Ok(None) };
    if q.unit != Unit::Percent || !q.value.is_finite() {
        return Err(rejected(format!("{name} must be a percentage")));
    }
    let v = q.value.round();
    if v < min as f64 || v > 100.0 {
        return Err(rejected(format!(
            "{name} must be from {min} to 100 % on FoxESS"
        )));
    }
    Ok(Some(v as i64))
}

/// The group values for `command` with `params`.
pub fn template(
    command: Command,
    params: &Params,
    s: &FoxessSettings,
) -> Result<Template, DriverError> {
    let max = i64::from(s.max_power_w);
    let power = match params.power {
        None => max,
        Some(q) => {
            let w = q
                .unit
                .convert(q.value, Unit::Watt)
                .filter(|w| w.is_finite())
                .ok_or_else(|| rejected("power must be in W or kW"))?
                .round();
            if w < 1.0 || w > max as f64 {
                return Err(rejected(format!(
                    "power must be from 1 W to the device's {max} W (fdPwr)"
                )));
            }
            w as i64
        }
    };
    let min_soc = i64::from(s.min_soc_on_grid);
    let fd_soc = i64::from(s.fd_soc);
    // Modes that take no parameters still carry all fields: the API
    // validates them whatever the mode, so use the device's defaults.
    let rest = |mode| Template {
        mode,
        min_soc_on_grid: min_soc,
        fd_soc,
        fd_pwr: max,
    };
    Ok(match command {
        Command::Charge => {
            let target = percent(params.target_soc, "target_soc", 11)?.unwrap_or(100);
            Template {
                mode: WorkMode::ForceCharge,
                min_soc_on_grid: min_soc.min(target),
                fd_soc: target,
                fd_pwr: power,
            }
        }
        Command::Discharge => {
            let target = percent(params.target_soc, "target_soc", 11)?.unwrap_or(fd_soc);
            let reserve =
                percent(params.reserve_soc, "reserve_soc", 10)?.unwrap_or(min_soc.min(target));
            if reserve > target {
                return Err(rejected(
                    "reserve_soc must not be above target_soc (FoxESS requires minSocOnGrid <= fdSoc)",
                ));
            }
            Template {
                mode: WorkMode::ForceDischarge,
                min_soc_on_grid: reserve,
                fd_soc: target,
                fd_pwr: power,
            }
        }
        // FoxESS's scheduler has no idle mode; Backup holds the battery
        // (no discharge, PV may still charge it), the closest there is.
        Command::Idle | Command::AutoReserve => rest(WorkMode::Backup),
        Command::AutoBalanced => rest(WorkMode::SelfUse),
        Command::AutoExport => rest(WorkMode::Feedin),
        Command::EvPowerLimit => {
            return Err(rejected("FoxESS inverters have no EV power limit"));
        }
    })
}

fn round_minute(t: Timestamp) -> Result<Timestamp, DriverError> {
    t.round(jiff::Unit::Minute)
        .map_err(|_| rejected("the action's time is out of range"))
}

/// Which minutes of the (local, daily-recurring) day the action covers.
///
/// Start and end are rounded to the nearest minute (so two actions that
/// meet at a boundary still meet after rounding); a window of 24 h or more,
/// or an open-ended one, covers the whole day.
pub fn coverage(
    start: Timestamp,
    end: Option<Timestamp>,
    tz: &TimeZone,
) -> Result<Vec<bool>, DriverError> {
    let s = round_minute(start)?;
    let Some(end) = end else {
        return Ok(vec![true; MINUTES_PER_DAY]);
    };
    let e = round_minute(end)?;
    if e <= s {
        return Err(rejected(
            "the window is shorter than a minute (FoxESS groups have minute granularity)",
        ));
    }
    let mut bits = vec![false; MINUTES_PER_DAY];
    if e.duration_since(s).as_secs() >= 86_400 {
        bits.fill(true);
        return Ok(bits);
    }
    // Walking minute by minute (at most 1,440 steps) turns the window into
    // local wall-clock minutes, DST shifts and midnight included.
    let mut t = s;
    while t < e {
        let local = tz.to_datetime(t);
        bits[minute_of_day(local.hour(), local.minute())] = true;
        t = t
            .checked_add(jiff::SignedDuration::from_mins(1))
            .map_err(|_| rejected("the action's time is out of range"))?;
    }
    Ok(bits)
}

fn minute_of_day(h: i8, m: i8) -> usize {
    (h.max(0) as usize) * 60 + (m.max(0) as usize)
}

/// Turns covered minutes into groups that never cross midnight. A run
/// that reaches midnight ends at 23:59 (the API has no 24:00), so the last
/// minute of the day is lost; a run that is only that minute is dropped.
pub fn groups_for(bits: &[bool], t: &Template) -> Vec<Group> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bits.len() {
        if !bits[i] {
            i += 1;
            continue;
        }
        let a = i;
        while i < bits.len() && bits[i] {
            i += 1;
        }
        let b = i.min(MINUTES_PER_DAY - 1);
        if b > a {
            out.push(Group {
                enable: 1,
                start_hour: (a / 60) as i64,
                start_minute: (a % 60) as i64,
                end_hour: (b / 60) as i64,
                end_minute: (b % 60) as i64,
                work_mode: t.mode.as_str().to_owned(),
                min_soc_on_grid: t.min_soc_on_grid,
                fd_soc: t.fd_soc,
                fd_pwr: t.fd_pwr,
            });
        }
    }
    out
}

/// Refuses an apply that would put the groups in force before the action
/// starts (groups recur daily from the moment they are written) or after
/// it has ended.
pub fn check_timing(
    groups: &[Group],
    start: Timestamp,
    end: Option<Timestamp>,
    now: Timestamp,
    tz: &TimeZone,
) -> Result<(), DriverError> {
    if let Some(end) = end
        && round_minute(end)? <= now
    {
        return Err(rejected(
            "the window is over: writing it now would put it in force tomorrow",
        ));
    }
    let limit = round_minute(start)?
        .checked_sub(jiff::SignedDuration::try_from(EARLY_TOLERANCE).unwrap_or_default())
        .map_err(|_| rejected("the action's time is out of range"))?;
    if now >= limit {
        return Ok(());
    }
    let covered = |m: i64| groups.iter().any(|g| g.start_min() <= m && m < g.end_min());
    let early = if limit.duration_since(now).as_secs() >= 86_400 {
        !groups.is_empty()
    } else {
        let mut t = now;
        let mut hit = false;
        while t < limit && !hit {
            let local = tz.to_datetime(t);
            hit = covered(minute_of_day(local.hour(), local.minute()) as i64);
            t = t
                .checked_add(jiff::SignedDuration::from_mins(1))
                .map_err(|_| rejected("the action's time is out of range"))?;
        }
        hit
    };
    if early {
        return Err(rejected(
            "too early: FoxESS groups recur daily and would take effect before the action's \
             start; apply at the start",
        ));
    }
    Ok(())
}

/// Whether two groups are the same slot content, `enable` aside (the
/// cloud may disable a group whose window has passed).
pub fn same_content(a: &Group, b: &Group) -> bool {
    a.start_hour == b.start_hour
        && a.start_minute == b.start_minute
        && a.end_hour == b.end_hour
        && a.end_minute == b.end_minute
        && a.work_mode == b.work_mode
        && a.min_soc_on_grid == b.min_soc_on_grid
        && a.fd_soc == b.fd_soc
        && a.fd_pwr == b.fd_pwr
}

/// Who owns `g`, given every group switchyard recorded writing.
pub fn owner(g: &Group, recorded_ours: &[Group]) -> RowOwner {
    if recorded_ours.iter().any(|o| same_content(o, g)) {
        RowOwner::Ours
    } else if g.mode() == Some(WorkMode::Backup) {
        RowOwner::Protected
    } else {
        RowOwner::Foreign
    }
}

/// A group as a [`NativeRow`].
pub fn row(g: &Group, owner: RowOwner) -> NativeRow {
    NativeRow {
        start: g.start_hhmm(),
        end: g.end_hhmm(),
        mode: g.work_mode.clone(),
        enabled: g.enable == 1,
        owner,
    }
}

/// What to write for an apply.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyPlan {
    /// The whole list to write.
    pub list: Vec<Group>,
    /// Whether it differs from what is on the device (else no write).
    pub write: bool,
    /// Foreign groups kept.
    pub kept: usize,
    /// Foreign groups removed (CANCEL_AND_REPLACE).
    pub removed: Vec<Group>,
}

/// Merges `ours` (this action's groups) into `current`.
///
/// - `Invalid` placeholder slots are dropped (they only pad reads).
/// - Groups with our content are ours (a retry finds them in place).
/// - Every other enabled group overlapping ours is a conflict: without
///   `clear` → SchedulerActive; with `clear` → removed, unless it is a
///   Backup group not ours → ProtectedRow.
/// - Everything else is kept as read (minus `id`/`properties`).
pub fn plan_apply(
    current: &[Group],
    ours: &[Group],
    recorded_ours: &[Group],
    flag_on: bool,
    clear: bool,
    max_slots: u32,
) -> Result<ApplyPlan, DriverError> {
    let real: Vec<&Group> = current.iter().filter(|g| !g.is_placeholder()).collect();
    let (mine, others): (Vec<&Group>, Vec<&Group>) = real
        .iter()
        .partition(|g| ours.iter().any(|o| same_content(o, g)));
    let (conflicts, kept): (Vec<&Group>, Vec<&Group>) = others
        .iter()
        .partition(|g| g.is_active() && ours.iter().any(|o| o.overlaps(g)));
    if !conflicts.is_empty() {
        let rows: Vec<NativeRow> = conflicts
            .iter()
            .map(|g| row(g, owner(g, recorded_ours)))
            .collect();
        if !clear {
            let state = if flag_on {
                "the native scheduler is enabled with"
            } else {
                "the native scheduler (currently disabled) holds"
            };
            return Err(DriverError::new(
                ErrorKind::SchedulerActive,
                format!(
                    "{state} {} group(s) overlapping the window; push with CANCEL_AND_REPLACE \
                     to clear them",
                    rows.len()
                ),
            )
            .with_raw(describe(&conflicts))
            .with_rows(rows));
        }
        let protected: Vec<NativeRow> = rows
            .iter()
            .filter(|r| r.owner == RowOwner::Protected)
            .cloned()
            .collect();
        if !protected.is_empty() {
            let names: Vec<String> = protected
                .iter()
                .map(|r| format!("{} {}-{}", r.mode, r.start, r.end))
                .collect();
            return Err(DriverError::new(
                ErrorKind::ProtectedRow,
                format!(
                    "protected FoxESS group(s) overlap the window and are never cleared: {}",
                    names.join(", ")
                ),
            )
            .with_raw(describe(&conflicts))
            .with_rows(protected));
        }
    }
    let mut list: Vec<Group> = kept.iter().map(|g| (*g).clone()).collect();
    list.extend(ours.iter().cloned());
    let active: Vec<&Group> = list.iter().filter(|g| g.is_active()).collect();
    for (i, a) in active.iter().enumerate() {
        if let Some(b) = active[i + 1..].iter().find(|b| a.overlaps(b)) {
            return Err(rejected(format!(
                "groups on the device overlap each other ({} and {}); FoxESS would refuse the \
                 list (errno 42023)",
                a.start_hhmm() + "-" + &a.end_hhmm(),
                b.start_hhmm() + "-" + &b.end_hhmm()
            ))
            .with_raw(describe(&[*a, *b])));
        }
    }
    if list.len() > max_slots as usize {
        return Err(rejected(format!(
            "no free slot: the device has {max_slots} scheduler slots, {} are taken by other \
             groups and this action needs {}",
            kept.len(),
            ours.len()
        )));
    }
    let all_in_place = ours
        .iter()
        .all(|o| mine.iter().any(|m| m.enable == 1 && *m == o));
    Ok(ApplyPlan {
        write: !(all_in_place && conflicts.is_empty() && mine.len() == ours.len()),
        kept: kept.len(),
        removed: conflicts.iter().map(|g| (*g).clone()).collect(),
        list,
    })
}

/// The list after removing `ours`, or `None` when none of them is there.
pub fn plan_revert(current: &[Group], ours: &[Group]) -> Option<Vec<Group>> {
    let real: Vec<&Group> = current.iter().filter(|g| !g.is_placeholder()).collect();
    let (mine, rest): (Vec<&Group>, Vec<&Group>) = real
        .into_iter()
        .partition(|g| ours.iter().any(|o| same_content(o, g)));
    if mine.is_empty() {
        None
    } else {
        Some(rest.into_iter().cloned().collect())
    }
}

fn describe(groups: &[&Group]) -> String {
    let parts: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(sh: i64, eh: i64, mode: WorkMode) -> Group {
        Group {
            enable: 1,
            start_hour: sh,
            start_minute: 0,
            end_hour: eh,
            end_minute: 0,
            work_mode: mode.as_str().into(),
            min_soc_on_grid: 10,
            fd_soc: 20,
            fd_pwr: 1000,
        }
    }

    #[test]
    fn window_reaching_midnight_ends_at_2359() {
        let tz = TimeZone::UTC;
        let s: Timestamp = "2030-01-01T22:00:00Z".parse().unwrap();
        let e: Timestamp = "2030-01-02T00:00:00Z".parse().unwrap();
        let bits = coverage(s, Some(e), &tz).unwrap();
        let t = Template {
            mode: WorkMode::SelfUse,
            min_soc_on_grid: 10,
            fd_soc: 20,
            fd_pwr: 1,
        };
        let gs = groups_for(&bits, &t);
        assert_eq!(gs.len(), 1);
        assert_eq!(
            (gs[0].start_hhmm(), gs[0].end_hhmm()),
            ("22:00".into(), "23:59".into())
        );
    }

    #[test]
    fn rounding_keeps_adjacent_windows_adjacent() {
        let tz = TimeZone::UTC;
        let a: Timestamp = "2030-01-01T10:00:31Z".parse().unwrap();
        let b: Timestamp = "2030-01-01T11:00:31Z".parse().unwrap();
        let c: Timestamp = "2030-01-01T12:00:00Z".parse().unwrap();
        let t = Template {
            mode: WorkMode::SelfUse,
            min_soc_on_grid: 10,
            fd_soc: 20,
            fd_pwr: 1,
        };
        let g1 = groups_for(&coverage(a, Some(b), &tz).unwrap(), &t);
        let g2 = groups_for(&coverage(b, Some(c), &tz).unwrap(), &t);
        assert!(!g1[0].overlaps(&g2[0]));
        assert_eq!(g1[0].end_hhmm(), g2[0].start_hhmm());
    }

    #[test]
    fn sub_minute_window_is_rejected() {
        let s: Timestamp = "2030-01-01T10:00:10Z".parse().unwrap();
        let e: Timestamp = "2030-01-01T10:00:25Z".parse().unwrap();
        let err = coverage(s, Some(e), &TimeZone::UTC).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Rejected);
    }

    #[test]
    fn early_apply_is_refused_but_on_time_is_fine() {
        let tz = TimeZone::UTC;
        let s: Timestamp = "2030-01-01T10:00:00Z".parse().unwrap();
        let e: Timestamp = "2030-01-01T11:00:00Z".parse().unwrap();
        let gs = vec![g(10, 11, WorkMode::SelfUse)];
        let at = |t: &str| check_timing(&gs, s, Some(e), t.parse().unwrap(), &tz);
        assert!(at("2030-01-01T09:59:00Z").is_ok());
        assert!(at("2030-01-01T09:00:00Z").is_ok()); // nothing covered before the start
        assert!(at("2029-12-31T10:30:00Z").is_err()); // yesterday's 10:30 is covered
        assert!(at("2030-01-01T11:00:00Z").is_err()); // over
    }

    #[test]
    fn backup_conflict_is_protected_under_clear() {
        let current = vec![g(1, 3, WorkMode::Backup), g(5, 6, WorkMode::SelfUse)];
        let ours = vec![g(2, 4, WorkMode::ForceCharge)];
        let err = plan_apply(&current, &ours, &[], true, true, 8).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ProtectedRow);
        assert_eq!(err.rows.len(), 1);
        assert_eq!(err.rows[0].owner, RowOwner::Protected);
    }

    #[test]
    fn retry_finds_ours_in_place_and_writes_nothing() {
        let ours = vec![g(2, 4, WorkMode::ForceCharge)];
        let current = vec![g(5, 6, WorkMode::SelfUse), ours[0].clone()];
        let plan = plan_apply(&current, &ours, &[], true, false, 8).unwrap();
        assert!(!plan.write);
        assert_eq!(plan.list.len(), 2);
    }
}
