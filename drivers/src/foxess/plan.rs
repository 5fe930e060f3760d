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
    device_max_power_w: Option<i64>,
) -> Result<Template, DriverError> {
    // The device's own maximum, where the cloud reports it, bounds the
    // settings' one.
    let max = device_max_power_w.map_or(i64::from(s.max_power_w), |d| {
        d.min(i64::from(s.max_power_w))
    });
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

/// Turns covered minutes into groups that never cross midnight. Ends are
/// inclusive on the wire: a run of minutes `[a, b)` is written
/// `a`..`b − 1`, so a run reaching midnight ends 23:59 and loses nothing.
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
        let last = i - 1;
        out.push(Group::new(
            true,
            ((a / 60) as i64, (a % 60) as i64),
            ((last / 60) as i64, (last % 60) as i64),
            t.mode.as_str(),
            t.min_soc_on_grid,
            t.fd_soc,
            t.fd_pwr,
        ));
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
/// cloud may disable a group whose window has passed today) and extra
/// fields aside.
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

/// Whether two lists hold the same groups by content, order, `enable`
/// and placeholders aside.
pub fn same_groups(a: &[Group], b: &[Group]) -> bool {
    let mut rest: Vec<&Group> = b.iter().filter(|g| !g.is_placeholder()).collect();
    for g in a.iter().filter(|g| !g.is_placeholder()) {
        match rest.iter().position(|r| same_content(r, g)) {
            Some(i) => {
                rest.swap_remove(i);
            }
            None => return false,
        }
    }
    rest.is_empty()
}

/// Who owns `g`, given every group switchyard wrote that may be in force.
pub fn owner(g: &Group, switchyards: &[Group]) -> RowOwner {
    if switchyards.iter().any(|o| same_content(o, g)) {
        RowOwner::Ours
    } else if g.mode() == Some(WorkMode::Backup) {
        RowOwner::Protected
    } else {
        RowOwner::Foreign
    }
}

/// A group as a [`NativeRow`]: times as users write windows (the end
/// exclusive, `24:00` for a group through 23:59).
pub fn row(g: &Group, owner: RowOwner) -> NativeRow {
    NativeRow {
        start: g.start_hhmm(),
        end: g.end_excl_hhmm(),
        mode: g.work_mode.clone(),
        enabled: g.enable == 1,
        owner,
    }
}

/// What an apply works with besides the device's groups.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    /// This action's groups.
    pub ours: &'a [Group],
    /// Groups switchyard wrote for other actions that may be in force
    /// (their memos), or that this process remembers writing.
    pub switchyards: &'a [Group],
    /// The push authorised clearing foreign groups (CANCEL_AND_REPLACE).
    pub clear: bool,
    /// The device's slot count.
    pub max_slots: usize,
    /// The device's largest `fdPwr`, W, as the cloud reports it (foreign
    /// groups are judged by it; `i64::MAX` when not reported).
    pub max_power_w: i64,
}

/// What to write for an apply.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyPlan {
    /// The whole list to write.
    pub list: Vec<Group>,
    /// Whether it differs from what is on the device (else no write).
    pub write: bool,
    /// Groups not ours kept as read (foreign ones, and switchyard's for
    /// other actions).
    pub kept: Vec<Group>,
    /// Foreign groups removed (authorised by CANCEL_AND_REPLACE).
    pub removed: Vec<Group>,
    /// switchyard's own groups of other actions that this one supersedes
    /// (they share minutes with it).
    pub superseded: Vec<Group>,
}

fn named(groups: &[&Group]) -> String {
    let parts: Vec<String> = groups
        .iter()
        .map(|g| format!("{} {}-{}", g.work_mode, g.start_hhmm(), g.end_excl_hhmm()))
        .collect();
    parts.join(", ")
}

/// Merges this action's groups into the device's `current` list.
///
/// - Placeholder slots are dropped (they only pad reads).
/// - Groups with our content are ours (a retry finds them in place).
/// - switchyard's groups of other actions are kept, unless they share a
///   minute with ours: then this action supersedes them.
/// - A foreign group sharing a minute with ours (enabled or not: the cloud
///   checks disabled groups too, and a passed group reads disabled) is a
///   conflict: SchedulerActive, or removed under `clear` unless it is a
///   Backup group (ProtectedRow).
/// - A foreign group the cloud would refuse on rewrite (or that overlaps
///   another one) is never rewritten silently: ForeignUnwritable naming
///   it, or removed under `clear` (never a Backup group).
/// - Everything else is kept exactly as read, extra fields included.
pub fn plan_apply(current: &[Group], cx: &Context<'_>) -> Result<ApplyPlan, DriverError> {
    let real: Vec<&Group> = current.iter().filter(|g| !g.is_placeholder()).collect();
    let mut mine: Vec<&Group> = Vec::new();
    let mut superseded: Vec<&Group> = Vec::new();
    let mut kept: Vec<&Group> = Vec::new();
    let mut conflicts: Vec<&Group> = Vec::new();
    for g in real {
        let meets_ours = cx.ours.iter().any(|o| o.overlaps(g));
        if cx.ours.iter().any(|o| same_content(o, g)) && !mine.iter().any(|m| same_content(m, g)) {
            mine.push(g);
        } else if cx.switchyards.iter().any(|o| same_content(o, g))
            || cx.ours.iter().any(|o| same_content(o, g))
        {
            if meets_ours {
                superseded.push(g);
            } else {
                kept.push(g);
            }
        } else if meets_ours {
            conflicts.push(g);
        } else {
            kept.push(g);
        }
    }
    let is_protected = |g: &Group| g.mode() == Some(WorkMode::Backup);
    if !conflicts.is_empty() {
        let rows: Vec<NativeRow> = conflicts
            .iter()
            .map(|g| row(g, owner(g, cx.switchyards)))
            .collect();
        if !cx.clear {
            return Err(DriverError::new(
                ErrorKind::SchedulerActive,
                format!(
                    "the FoxESS scheduler holds {} group(s) switchyard does not own in the \
                     window ({}); push with CANCEL_AND_REPLACE to clear them",
                    rows.len(),
                    named(&conflicts)
                ),
            )
            .with_raw(describe(&conflicts))
            .with_rows(rows));
        }
        let protected: Vec<&Group> = conflicts
            .iter()
            .copied()
            .filter(|g| is_protected(g))
            .collect();
        if !protected.is_empty() {
            return Err(DriverError::new(
                ErrorKind::ProtectedRow,
                format!(
                    "protected FoxESS group(s) overlap the window and are never cleared: {}",
                    named(&protected)
                ),
            )
            .with_raw(describe(&protected))
            .with_rows(
                protected
                    .iter()
                    .map(|g| row(g, RowOwner::Protected))
                    .collect(),
            ));
        }
    }
    // Foreign groups that cannot be written back as they are: values the
    // cloud refuses, or overlapping each other.
    let foreign = |g: &Group| !cx.switchyards.iter().any(|o| same_content(o, g));
    let unwritable = unwritable(&kept, cx.switchyards, cx.max_power_w);
    let mut removed: Vec<&Group> = conflicts.clone();
    let cleared = clear_or_refuse(&unwritable, cx.clear, cx.switchyards)?;
    kept.retain(|g| !cleared.iter().any(|r| std::ptr::eq(*r, *g)));
    removed.extend(cleared);
    // Foreign groups go back exactly as read. switchyard's own groups of
    // other actions go back enabled: one whose time has passed today may
    // read back disabled, and writing that back would drop it tomorrow.
    let mut list: Vec<Group> = kept
        .iter()
        .map(|g| {
            let mut g = (*g).clone();
            if !foreign(&g) {
                g.enable = 1;
            }
            g
        })
        .collect();
    list.extend(cx.ours.iter().cloned());
    for (i, a) in list.iter().enumerate() {
        if let Some(b) = list[i + 1..].iter().find(|b| a.overlaps(b)) {
            return Err(rejected(format!(
                "groups would overlap ({} and {}); FoxESS would refuse the list (errno 42023)",
                a.start_hhmm() + "-" + &a.end_excl_hhmm(),
                b.start_hhmm() + "-" + &b.end_excl_hhmm()
            ))
            .with_raw(describe(&[a, b])));
        }
    }
    if list.len() > cx.max_slots {
        return Err(rejected(format!(
            "no free slot: the device has {} scheduler slots, {} are taken by other groups and \
             this action needs {}",
            cx.max_slots,
            kept.len(),
            cx.ours.len()
        )));
    }
    let all_in_place = cx.ours.iter().all(|o| {
        mine.iter()
            .any(|m| m.enable == 1 && same_content(m, o) && m.extra == o.extra)
    });
    Ok(ApplyPlan {
        write: !(all_in_place && removed.is_empty() && superseded.is_empty()),
        kept: kept.iter().map(|g| (*g).clone()).collect(),
        removed: removed.iter().map(|g| (*g).clone()).collect(),
        superseded: superseded.iter().map(|g| (*g).clone()).collect(),
        list,
    })
}

/// The foreign groups among `kept` that the cloud would refuse if they were
/// written back as they are, and why: values the write endpoint refuses
/// (`fdSoc` 10 or `fdPwr` 0 set in the app, `minSocOnGrid: null`, a
/// missing field), or an overlap with another kept group. A mode this
/// driver does not know (a newer firmware's) is not judged: the group is
/// written back verbatim, as the cloud gave it.
pub fn unwritable<'a>(
    kept: &[&'a Group],
    switchyards: &[Group],
    max_power_w: i64,
) -> Vec<(&'a Group, String)> {
    let mut out = Vec::new();
    for (i, g) in kept.iter().enumerate() {
        if switchyards.iter().any(|o| same_content(o, g)) {
            continue;
        }
        let problem = match g.mode() {
            None if !g.incomplete => None,
            _ => g.write_problem(max_power_w),
        };
        if let Some(p) = problem {
            out.push((*g, p));
        } else if let Some(other) = kept
            .iter()
            .enumerate()
            .find(|(j, o)| *j != i && o.overlaps(g))
            .map(|(_, o)| *o)
        {
            out.push((
                *g,
                format!(
                    "it overlaps {} {}-{}",
                    other.work_mode,
                    other.start_hhmm(),
                    other.end_excl_hhmm()
                ),
            ));
        }
    }
    out
}

/// What to do about foreign groups that cannot be written back: with
/// `clear` (CANCEL_AND_REPLACE authorised clearing foreign groups) they
/// are removed — returned — unless one is a Backup group; otherwise
/// ForeignUnwritable naming each one and why.
pub fn clear_or_refuse<'a>(
    unwritable: &[(&'a Group, String)],
    clear: bool,
    switchyards: &[Group],
) -> Result<Vec<&'a Group>, DriverError> {
    let blocked: Vec<&Group> = unwritable
        .iter()
        .map(|(g, _)| *g)
        .filter(|g| !clear || g.mode() == Some(WorkMode::Backup))
        .collect();
    if blocked.is_empty() {
        return Ok(unwritable.iter().map(|(g, _)| *g).collect());
    }
    let why: Vec<String> = unwritable
        .iter()
        .map(|(g, p)| {
            format!(
                "{} {}-{} ({p})",
                g.work_mode,
                g.start_hhmm(),
                g.end_excl_hhmm()
            )
        })
        .collect();
    Err(DriverError::new(
        ErrorKind::ForeignUnwritable,
        format!(
            "FoxESS writes the whole group list, and {} foreign group(s) hold values the cloud \
             refuses on write: {}; they are never changed silently{}",
            unwritable.len(),
            why.join("; "),
            if clear {
                " (Backup groups are never cleared)"
            } else {
                ": correct them in the FoxESS app, or push with CANCEL_AND_REPLACE to clear them"
            }
        ),
    )
    .with_raw(describe(&blocked))
    .with_rows(
        blocked
            .iter()
            .map(|g| row(g, owner(g, switchyards)))
            .collect(),
    ))
}

/// The list after removing `mine` (this action's groups), except those
/// other live actions also hold (`keep`, by content: two actions with
/// identical groups never remove each other's); `None` when there is
/// nothing to remove.
pub fn plan_revert(current: &[Group], mine: &[Group], keep: &[Group]) -> Option<Vec<Group>> {
    let real: Vec<&Group> = current.iter().filter(|g| !g.is_placeholder()).collect();
    let (gone, rest): (Vec<&Group>, Vec<&Group>) = real.into_iter().partition(|g| {
        mine.iter().any(|o| same_content(o, g)) && !keep.iter().any(|k| same_content(k, g))
    });
    if gone.is_empty() {
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
        // [sh:00, eh:00) as the wire writes it: the end inclusive.
        Group::new(true, (sh, 0), (eh - 1, 59), mode.as_str(), 10, 20, 1000)
    }

    fn t(mode: WorkMode) -> Template {
        Template {
            mode,
            min_soc_on_grid: 10,
            fd_soc: 20,
            fd_pwr: 1,
        }
    }

    fn cx<'a>(ours: &'a [Group], switchyards: &'a [Group], clear: bool) -> Context<'a> {
        Context {
            ours,
            switchyards,
            clear,
            max_slots: 8,
            max_power_w: 6000,
        }
    }

    #[test]
    fn window_reaching_midnight_ends_at_2359_inclusive_and_loses_no_minute() {
        let tz = TimeZone::UTC;
        let s: Timestamp = "2030-01-01T22:00:00Z".parse().unwrap();
        let e: Timestamp = "2030-01-02T00:00:00Z".parse().unwrap();
        let gs = groups_for(&coverage(s, Some(e), &tz).unwrap(), &t(WorkMode::SelfUse));
        assert_eq!(gs.len(), 1);
        assert_eq!(
            (gs[0].start_hhmm(), gs[0].end_hhmm()),
            ("22:00".into(), "23:59".into())
        );
        assert_eq!(gs[0].end_min(), 1440);
        // A one-minute window is one inclusive minute.
        let e: Timestamp = "2030-01-01T22:01:00Z".parse().unwrap();
        let gs = groups_for(&coverage(s, Some(e), &tz).unwrap(), &t(WorkMode::SelfUse));
        assert_eq!(
            (gs[0].start_hhmm(), gs[0].end_hhmm()),
            ("22:00".into(), "22:00".into())
        );
    }

    #[test]
    fn back_to_back_windows_never_share_a_minute() {
        let tz = TimeZone::UTC;
        let a: Timestamp = "2030-01-01T10:00:31Z".parse().unwrap();
        let b: Timestamp = "2030-01-01T11:00:31Z".parse().unwrap();
        let c: Timestamp = "2030-01-01T12:00:00Z".parse().unwrap();
        let g1 = groups_for(&coverage(a, Some(b), &tz).unwrap(), &t(WorkMode::SelfUse));
        let g2 = groups_for(&coverage(b, Some(c), &tz).unwrap(), &t(WorkMode::SelfUse));
        assert!(!g1[0].overlaps(&g2[0]));
        assert_eq!(g1[0].end_hhmm(), "11:00");
        assert_eq!(g2[0].start_hhmm(), "11:01");
        assert_eq!(g1[0].end_min(), g2[0].start_min());
    }

    #[test]
    fn sub_minute_window_is_rejected() {
        let s: Timestamp = "2030-01-01T10:00:10Z".parse().unwrap();
        let e: Timestamp = "2030-01-01T10:00:25Z".parse().unwrap();
        let err = coverage(s, Some(e), &TimeZone::UTC).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Rejected);
    }

    #[test]
    fn daily_windows_across_both_berlin_dst_sundays_land_on_wall_clock_minutes() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let local = |s: &str| {
            berlin
                .to_timestamp(s.parse::<jiff::civil::DateTime>().unwrap())
                .unwrap()
        };
        let hhmm = |gs: &[Group]| -> Vec<(String, String)> {
            gs.iter().map(|g| (g.start_hhmm(), g.end_hhmm())).collect()
        };
        let groups = |a: &str, b: &str| {
            groups_for(
                &coverage(local(a), Some(local(b)), &berlin).unwrap(),
                &t(WorkMode::ForceCharge),
            )
        };
        // 2027-03-28 and 2027-10-31 are the last Sundays of March and October.
        for day in [
            "2027-03-27",
            "2027-03-28",
            "2027-03-29",
            "2027-10-30",
            "2027-10-31",
            "2027-11-01",
        ] {
            let gs = groups(&format!("{day}T17:00"), &format!("{day}T19:00"));
            assert_eq!(hhmm(&gs), vec![("17:00".into(), "18:59".into())], "{day}");
        }
        // The night the clocks go forward: 01:00-04:00 local has no 02:xx.
        let gs = groups("2027-03-28T01:00", "2027-03-28T04:00");
        assert_eq!(
            hhmm(&gs),
            vec![
                ("01:00".into(), "01:59".into()),
                ("03:00".into(), "03:59".into())
            ]
        );
        // The night they go back: 01:00-04:00 local lasts four hours and
        // covers 02:xx twice, written once.
        let gs = groups("2027-10-31T01:00", "2027-10-31T04:00");
        assert_eq!(hhmm(&gs), vec![("01:00".into(), "03:59".into())]);
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
        let err = plan_apply(&current, &cx(&ours, &[], true)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ProtectedRow);
        assert_eq!(err.rows.len(), 1);
        assert_eq!(err.rows[0].owner, RowOwner::Protected);
    }

    #[test]
    fn a_foreign_group_meeting_ours_at_one_minute_is_a_conflict_even_disabled() {
        let mut foreign = Group::new(false, (11, 0), (11, 30), "Feedin", 10, 20, 1000);
        let ours = vec![g(10, 12, WorkMode::ForceCharge)];
        let err = plan_apply(&[foreign.clone()], &cx(&ours, &[], false)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::SchedulerActive);
        assert_eq!(err.rows[0].owner, RowOwner::Foreign);
        // Ending at 09:59 inclusive it does not meet 10:00.
        foreign.start_hour = 9;
        foreign.end_hour = 9;
        foreign.end_minute = 59;
        assert!(plan_apply(&[foreign], &cx(&ours, &[], false)).is_ok());
    }

    #[test]
    fn retry_finds_ours_in_place_and_writes_nothing() {
        let ours = vec![g(2, 4, WorkMode::ForceCharge)];
        let current = vec![g(5, 6, WorkMode::SelfUse), ours[0].clone()];
        let plan = plan_apply(&current, &cx(&ours, &[], false)).unwrap();
        assert!(!plan.write);
        assert_eq!(plan.list.len(), 2);
    }

    #[test]
    fn foreign_groups_are_kept_verbatim_with_their_extra_fields() {
        let mut foreign = g(5, 6, WorkMode::SelfUse);
        foreign.extra.insert("maxSoc".into(), 95.into());
        let ours = vec![g(2, 4, WorkMode::ForceCharge)];
        let plan = plan_apply(&[foreign.clone()], &cx(&ours, &[], false)).unwrap();
        assert!(plan.list.contains(&foreign));
        assert_eq!(plan.list[0].to_wire()["maxSoc"], 95);
    }

    #[test]
    fn an_unwritable_foreign_group_is_named_or_cleared_when_authorised() {
        let mut app_only = g(5, 6, WorkMode::SelfUse);
        app_only.fd_soc = 10;
        let ours = vec![g(2, 4, WorkMode::ForceCharge)];
        let err = plan_apply(&[app_only.clone()], &cx(&ours, &[], false)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ForeignUnwritable);
        assert!(
            err.message.contains("SelfUse 05:00-06:00") && err.message.contains("fdSoc 10"),
            "{}",
            err.message
        );
        let plan = plan_apply(&[app_only.clone()], &cx(&ours, &[], true)).unwrap();
        assert_eq!(plan.removed, vec![app_only]);
        assert_eq!(plan.list, ours);
        // A Backup group is never cleared, even unwritable.
        let mut backup = g(5, 6, WorkMode::Backup);
        backup.fd_pwr = 0;
        let err = plan_apply(&[backup], &cx(&ours, &[], true)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::ForeignUnwritable);
    }

    #[test]
    fn placeholders_are_dropped_and_never_block() {
        let mut placeholder = Group::new(false, (0, 0), (0, 0), "SelfUse", 10, 10, 0);
        placeholder.min_soc_on_grid = None;
        let invalid = Group::new(false, (0, 0), (0, 0), "Invalid", 10, 10, 0);
        let ours = vec![g(0, 1, WorkMode::ForceCharge)];
        let plan = plan_apply(&[placeholder, invalid], &cx(&ours, &[], false)).unwrap();
        assert_eq!(plan.list, ours);
    }

    #[test]
    fn switchyards_groups_of_another_action_are_superseded_where_they_meet_ours() {
        let other = vec![g(0, 24, WorkMode::SelfUse), g(1, 2, WorkMode::Feedin)];
        let ours = vec![g(10, 11, WorkMode::ForceCharge)];
        let current = vec![other[0].clone(), g(20, 21, WorkMode::Feedin)];
        let plan = plan_apply(&current, &cx(&ours, &other, false)).unwrap();
        assert_eq!(plan.superseded, vec![other[0].clone()]);
        assert!(plan.removed.is_empty() && plan.write);
        assert_eq!(plan.list.len(), 2);
    }

    #[test]
    fn a_revert_leaves_groups_another_live_action_also_holds() {
        let shared = g(10, 11, WorkMode::ForceCharge);
        let mine = vec![shared.clone(), g(12, 13, WorkMode::ForceCharge)];
        let current = vec![shared.clone(), mine[1].clone(), g(5, 6, WorkMode::SelfUse)];
        let left = plan_revert(&current, &mine, std::slice::from_ref(&shared)).unwrap();
        assert_eq!(left, vec![shared.clone(), g(5, 6, WorkMode::SelfUse)]);
        assert_eq!(
            plan_revert(
                std::slice::from_ref(&shared),
                std::slice::from_ref(&shared),
                std::slice::from_ref(&shared)
            ),
            None
        );
    }

    #[test]
    fn lists_compare_by_content_whatever_the_order_enable_and_padding() {
        let a = g(1, 2, WorkMode::SelfUse);
        let mut a_off = a.clone();
        a_off.enable = 0;
        let b = g(3, 4, WorkMode::SelfUse);
        let pad = Group::new(false, (0, 0), (0, 0), "Invalid", 10, 10, 0);
        assert!(same_groups(
            &[a.clone(), b.clone()],
            &[b.clone(), pad, a_off]
        ));
        assert!(!same_groups(
            &[a.clone(), b.clone()],
            std::slice::from_ref(&a)
        ));
        assert!(!same_groups(
            std::slice::from_ref(&a),
            &[a.clone(), a.clone()]
        ));
    }
}
