//! The `foxess` driver against the FoxESS emulator, over real HTTP on
//! 127.0.0.1. The drivers' clock is pinned to each action's start so the
//! tests do not depend on the time of day they run at.
//!
//! Every rig runs under an operator policy, as a server would: the key is a
//! file in a secrets directory (`file:<name>`), and the emulator's URL is on
//! the operator's allow-list.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use jiff::{Timestamp, civil::date, tz::TimeZone};
use switchyard_drivers::{
    Applied, ApplyRequest, Command, ConfigError, DeviceSpec, Driver, DriverError, DriverFactory,
    ErrorKind, Family, OperatorPolicy, Params, Quantity, RevertRequest, RowOwner, TimingShape,
    Unit,
    foxess::{
        FoxessFactory,
        emulator::{Emulator, EmulatorConfig, EmulatorHandle, ReadOrder},
        settings::FOXESS_CLOUD,
        wire::{self, Group, PATH_GET, PATH_GET_FLAG, PATH_SET, PATH_SET_FLAG, WorkMode},
    },
    operator::SECRET_REF_REFUSED,
};

const KEY: &str = "fx-SECRET-key-7d1e9a";
const SN: &str = "SN1";
const TZ: &str = "Europe/Berlin";
/// The key's file name in the operator's secrets directory.
const KEY_FILE: &str = "foxess-key";

/// An operator secrets directory holding `key` as [`KEY_FILE`] (a file,
/// since edition 2024 makes `set_var` unsafe and this workspace forbids
/// unsafe).
fn secrets_with(key: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(KEY_FILE), format!("{key}\n")).unwrap();
    dir
}

/// The operator policy of a server with `secrets` and `urls` allowed.
fn policy(secrets: &Path, urls: &[String]) -> OperatorPolicy {
    OperatorPolicy {
        secrets_dir: Some(secrets.to_path_buf()),
        url_allow: urls.to_vec(),
    }
}

/// The one refusal of every unusable secret reference.
fn refused() -> ConfigError {
    ConfigError::InvalidSetting {
        key: "api_key_ref".to_owned(),
        reason: SECRET_REF_REFUSED.to_owned(),
    }
}

/// A key longer than the 200 characters of an answer the driver keeps: if
/// an echo of it were cut before being redacted, a piece of it would show.
fn long_key() -> String {
    const ALPHABET: &[u8; 32] = b"ghjkmnpqrstvwxyzGHJKMNPQRSTVWXYZ";
    let mut x: u32 = 0x9e37_79b9;
    (0..240)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(ALPHABET[x as usize % ALPHABET.len()])
        })
        .collect()
}

/// The first piece of `secret` found in `text`: the whole of it, or any
/// 12 characters of it (a truncated echo leaks a prefix, not the key).
fn trace_of(text: &str, secret: &str) -> Option<String> {
    const PIECE: usize = 12;
    if text.contains(secret) {
        return Some(secret.to_owned());
    }
    let chars: Vec<char> = secret.chars().collect();
    chars
        .windows(PIECE.min(chars.len()))
        .map(String::from_iter)
        .find(|piece| text.contains(piece.as_str()))
}

fn assert_no_trace(text: &str, secret: &str) {
    if let Some(piece) = trace_of(text, secret) {
        panic!("the API key leaked ({piece:?}) into: {text}");
    }
}

/// Local wall-clock time on 2030-01-15 (+ `day` days) in Berlin.
fn at(day: i8, h: i8, m: i8) -> Timestamp {
    TimeZone::get(TZ)
        .unwrap()
        .to_timestamp(date(2030, 1, 15 + day).at(h, m, 0, 0))
        .unwrap()
}

struct Rig {
    emu: EmulatorHandle,
    factory: FoxessFactory,
    policy: OperatorPolicy,
    settings: BTreeMap<String, String>,
    _secrets: tempfile::TempDir,
}

impl Rig {
    async fn new() -> Self {
        Self::with(EmulatorConfig::new(KEY, &[SN]), KEY).await
    }

    async fn with(mut config: EmulatorConfig, driver_key: &str) -> Self {
        // Tests space writes themselves where they test spacing.
        config.min_write_interval = Duration::ZERO;
        config.query_interval = Duration::ZERO;
        config.write_interval = Duration::ZERO;
        let emu = Emulator::start(config).await.unwrap();
        let secrets = secrets_with(driver_key);
        let policy = policy(secrets.path(), &[emu.base_url()]);
        let settings = BTreeMap::from([
            ("base_url".to_owned(), emu.base_url()),
            ("api_key_ref".to_owned(), format!("file:{KEY_FILE}")),
            ("min_write_interval_ms".to_owned(), "0".to_owned()),
            ("min_query_interval_ms".to_owned(), "0".to_owned()),
            ("min_update_interval_ms".to_owned(), "0".to_owned()),
            ("request_timeout_ms".to_owned(), "2000".to_owned()),
        ]);
        Self {
            emu,
            factory: pinned(
                FoxessFactory::default().with_policy(policy.clone()),
                at(0, 0, 0),
            ),
            policy,
            settings,
            _secrets: secrets,
        }
    }

    /// The operator also allows `url` (the factory keeps what its drivers
    /// remember).
    fn allow(&mut self, url: &str) {
        self.policy.url_allow.push(url.to_owned());
        self.factory = self.factory.clone().with_policy(self.policy.clone());
    }

    fn set(&mut self, k: &str, v: &str) {
        self.settings.insert(k.to_owned(), v.to_owned());
    }

    fn spec(&self) -> DeviceSpec<'_> {
        DeviceSpec {
            device_id: "dev-1",
            family: Family::Battery,
            oem_device_id: SN,
            timezone: TZ,
            settings: &self.settings,
        }
    }

    /// A driver whose clock reads `now`; the emulator's clock (for the
    /// groups whose time has passed today) reads it too.
    fn driver_at(&self, now: Timestamp) -> Arc<dyn Driver> {
        self.emu.set_now(Some(now));
        pinned(self.factory.clone(), now)
            .build(&self.spec())
            .unwrap()
    }

    /// A driver whose clock reads the action's start.
    fn driver_for(&self, req: &ApplyRequest) -> Arc<dyn Driver> {
        self.driver_at(req.start)
    }

    fn groups(&self) -> Vec<Group> {
        self.emu.groups(SN)
    }
}

fn pinned(f: FoxessFactory, now: Timestamp) -> FoxessFactory {
    f.with_clock(Arc::new(move || now))
}

fn req(id: &str, command: Command, start: Timestamp, end: Option<Timestamp>) -> ApplyRequest {
    ApplyRequest {
        action_id: id.to_owned(),
        command,
        params: Params::default(),
        start,
        end,
        clear_native_scheduler: false,
        live: Vec::new(),
        memo: None,
        fence: 0,
    }
}

/// A group for the window `sh:sm`-`eh:em`, the end exclusive as users
/// write windows (the wire's end is the minute before).
fn g(sh: i64, sm: i64, eh: i64, em: i64, mode: WorkMode) -> Group {
    let last = eh * 60 + em - 1;
    Group::new(
        true,
        (sh, sm),
        (last / 60, last % 60),
        mode.as_str(),
        10,
        20,
        3000,
    )
}

fn windows(groups: &[Group]) -> Vec<(String, String, String)> {
    let mut w: Vec<_> = groups
        .iter()
        .map(|g| (g.start_hhmm(), g.end_excl_hhmm(), g.work_mode.clone()))
        .collect();
    w.sort();
    w
}

fn w(s: &str, e: &str, m: WorkMode) -> (String, String, String) {
    (s.to_owned(), e.to_owned(), m.as_str().to_owned())
}

fn assert_no_key(text: &str) {
    assert_no_trace(text, KEY);
}

fn assert_err_has_no_key(e: &DriverError) {
    assert_no_key(&format!("{e:?}"));
    assert_no_key(&e.to_string());
}

// ---------------------------------------------------------------- signature

#[test]
fn signature_is_md5_of_path_token_timestamp_with_literal_backslash_separators() {
    let input = wire::signature_input("/op/v1/device/scheduler/get", "abc", 1_700_000_000_000);
    // Backslash, r, backslash, n: four characters, not CR LF.
    assert_eq!(
        input,
        "/op/v1/device/scheduler/get\\r\\nabc\\r\\n1700000000000"
    );
    assert!(!input.contains('\r') && !input.contains('\n'));
    // Expected digests computed independently (Python hashlib).
    assert_eq!(
        wire::signature("/op/v1/device/scheduler/get", "abc", 1_700_000_000_000),
        "43bee9636d0425bcd1215f26401aab50"
    );
    // The same with real CR LF bytes would be this: the wrong one.
    assert_ne!(
        wire::signature("/op/v1/device/scheduler/get", "abc", 1_700_000_000_000),
        "dccaf5da7f17f99445bcfd2502a4512d"
    );
}

#[tokio::test]
async fn a_wrong_key_is_refused_by_signature_check() {
    let rig = Rig::with(EmulatorConfig::new(KEY, &[SN]), "not-the-key").await;
    let err = rig
        .driver_at(at(0, 0, 0))
        .read_state(&[])
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected);
    assert!(
        err.raw.as_deref().unwrap().contains("errno 40256"),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- apply

#[tokio::test]
async fn a_window_across_midnight_becomes_two_groups() {
    let rig = Rig::new().await;
    let mut r = req("a1", Command::Charge, at(0, 22, 0), Some(at(1, 6, 0)));
    r.params.power = Some(Quantity {
        value: 2.5,
        unit: Unit::Kilowatt,
    });
    r.params.target_soc = Some(Quantity {
        value: 90.0,
        unit: Unit::Percent,
    });
    let out = rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    let groups = rig.groups();
    assert_eq!(
        windows(&groups),
        vec![
            w("00:00", "06:00", WorkMode::ForceCharge),
            w("22:00", "24:00", WorkMode::ForceCharge),
        ]
    );
    assert!(
        groups
            .iter()
            .all(|g| g.fd_pwr == 2500 && g.fd_soc == 90 && g.enable == 1)
    );
    assert!(rig.emu.flag(SN), "apply must enable the scheduler flag");
}

#[tokio::test]
async fn discharge_maps_target_and_reserve_to_fd_soc_and_min_soc_on_grid() {
    let rig = Rig::new().await;
    let mut r = req("d1", Command::Discharge, at(0, 17, 0), Some(at(0, 19, 30)));
    r.params.power = Some(Quantity {
        value: 4000.0,
        unit: Unit::Watt,
    });
    r.params.target_soc = Some(Quantity {
        value: 30.0,
        unit: Unit::Percent,
    });
    r.params.reserve_soc = Some(Quantity {
        value: 15.0,
        unit: Unit::Percent,
    });
    assert!(rig.driver_for(&r).apply(&r).await.unwrap().verified);
    let groups = rig.groups();
    assert_eq!(groups.len(), 1);
    let d = &groups[0];
    assert_eq!(
        (d.work_mode.as_str(), d.fd_pwr, d.fd_soc, d.min_soc_on_grid),
        ("ForceDischarge", 4000, 30, Some(15))
    );
    // The wire's end is inclusive: the last minute, 19:29.
    assert_eq!(
        (d.start_hhmm(), d.end_hhmm()),
        ("17:00".into(), "19:29".into())
    );

    // fdSoc below 11, or a reserve above the target, never reaches the OEM.
    for (target, reserve) in [(10.0, 10.0), (20.0, 25.0)] {
        let mut bad = req("d2", Command::Discharge, at(0, 20, 0), Some(at(0, 21, 0)));
        bad.params.target_soc = Some(Quantity {
            value: target,
            unit: Unit::Percent,
        });
        bad.params.reserve_soc = Some(Quantity {
            value: reserve,
            unit: Unit::Percent,
        });
        let err = rig.driver_for(&bad).apply(&bad).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Rejected, "{err:?}");
    }
    assert_eq!(rig.emu.successful_calls(PATH_SET), 1);
}

#[tokio::test]
async fn modes_map_to_foxess_work_modes() {
    let rig = Rig::new().await;
    let cases: [(Command, WorkMode, i8); 4] = [
        (Command::AutoBalanced, WorkMode::SelfUse, 1),
        (Command::AutoExport, WorkMode::Feedin, 3),
        (Command::AutoReserve, WorkMode::Backup, 5),
        (Command::Idle, WorkMode::Backup, 7),
    ];
    for (c, mode, h) in cases {
        let r = req(&format!("m{h}"), c, at(0, h, 0), Some(at(0, h + 1, 0)));
        assert!(rig.driver_for(&r).apply(&r).await.unwrap().verified);
        assert!(
            rig.groups()
                .iter()
                .any(|g| g.start_hour == i64::from(h) && g.work_mode == mode.as_str()),
            "{c} should be {mode:?}"
        );
    }
}

#[tokio::test]
async fn sub_minute_windows_are_rejected_and_times_round_to_the_minute() {
    let rig = Rig::new().await;
    let s = at(0, 10, 0);
    let tiny = req(
        "t1",
        Command::Idle,
        s + Duration::from_secs(5),
        Some(s + Duration::from_secs(25)),
    );
    let err = rig.driver_for(&tiny).apply(&tiny).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected);
    let r = req(
        "t2",
        Command::Idle,
        s + Duration::from_secs(40),
        Some(s + Duration::from_secs(3600 + 20)),
    );
    assert!(rig.driver_for(&r).apply(&r).await.unwrap().verified);
    assert_eq!(
        windows(&rig.groups()),
        vec![w("10:01", "11:00", WorkMode::Backup)]
    );
}

#[tokio::test]
async fn open_ended_commands_leave_nothing_behind() {
    let rig = Rig::new().await;
    // A forced mode without an end would recur every day for ever: refused
    // before any call.
    for command in [Command::AutoExport, Command::Charge, Command::Idle] {
        let r = req("o1", command, at(0, 14, 3), None);
        let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Rejected, "{command:?}");
        assert!(err.message.contains("window with an end"), "{err:?}");
    }
    assert!(rig.emu.calls().is_empty());
    // AUTO_BALANCED without an end hands the inverter back: nothing is
    // written, a foreign group and a windowed action's group (applied
    // moments earlier, its memo not recorded yet) stay.
    let foreign = g(20, 0, 21, 0, WorkMode::Feedin);
    rig.emu.seed_groups(SN, vec![foreign.clone()]);
    let c = req("c1", Command::Charge, at(0, 14, 3), Some(at(0, 15, 0)));
    let d = rig.driver_for(&c);
    let applied_c = d.apply(&c).await.unwrap();
    let before = rig.groups();
    assert_eq!(before.len(), 2);
    let writes = rig.emu.successful_calls(PATH_SET);
    let auto = req("a1", Command::AutoBalanced, at(0, 14, 10), None);
    let out = d.apply(&auto).await.unwrap();
    // Not verified: a group of switchyard's is still in force.
    assert!(!out.verified, "{out:?}");
    assert!(out.memo.is_none(), "nothing to undo later");
    assert!(
        out.raw.contains("1 group(s) of 0 live action(s)"),
        "{}",
        out.raw
    );
    assert_eq!(rig.groups(), before);
    assert_eq!(
        rig.emu.successful_calls(PATH_SET),
        writes,
        "nothing written"
    );
    // The windowed action's revert removes its group as usual.
    d.revert(&RevertRequest {
        applied: c,
        memo: applied_c.memo,
    })
    .await
    .unwrap();
    assert_eq!(rig.groups(), vec![foreign]);
    // Handing back now verifies: nothing of switchyard's is in force.
    let auto = req("a2", Command::AutoBalanced, at(0, 14, 20), None);
    assert!(d.apply(&auto).await.unwrap().verified);
    // The capabilities say so up front.
    for c in &d.capabilities().commands {
        let open = c.timing.contains(&TimingShape::Immediate);
        assert_eq!(open, c.command == Command::AutoBalanced, "{:?}", c.command);
        assert!(c.timing.contains(&TimingShape::Windowed));
    }
}

#[tokio::test]
async fn an_early_apply_that_would_take_effect_before_the_start_is_rejected() {
    let rig = Rig::new().await;
    let r = req("e1", Command::Charge, at(1, 2, 0), Some(at(1, 5, 0)));
    // A day ahead: today's 02:00-05:00 would run the charge a day early.
    let err = rig.driver_at(at(0, 1, 0)).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected);
    assert!(err.message.contains("too early"), "{err:?}");
    assert!(rig.groups().is_empty());
    // An hour ahead on the day: nothing covered before the start: fine.
    assert!(rig.driver_at(at(1, 1, 0)).apply(&r).await.unwrap().verified);
    // After the end: refused (it would run tomorrow).
    let late = req("e2", Command::Charge, at(1, 6, 0), Some(at(1, 7, 0)));
    let err = rig.driver_at(at(1, 8, 0)).apply(&late).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected);
}

// ---------------------------------------------------------------- foreign groups

#[tokio::test]
async fn foreign_groups_survive_apply_and_revert() {
    let rig = Rig::new().await;
    let mut off = g(20, 0, 21, 0, WorkMode::ForceDischarge);
    off.enable = 0;
    let foreign = vec![
        g(12, 0, 13, 0, WorkMode::SelfUse),
        g(18, 0, 19, 0, WorkMode::Backup),
        off,
    ];
    rig.emu.seed_groups(SN, foreign.clone());
    rig.emu.set_flag(SN, true);
    let r = req("f1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&r);
    assert!(d.apply(&r).await.unwrap().verified);
    let after = rig.groups();
    assert_eq!(after.len(), 4);
    for f in &foreign {
        assert!(after.contains(f), "foreign group {f} lost on apply");
    }
    let out = d
        .revert(&RevertRequest {
            applied: r,
            memo: None,
        })
        .await
        .unwrap();
    assert!(out.verified, "{out:?}");
    let mut left = rig.groups();
    left.sort_by_key(Group::start_min);
    let mut want = foreign;
    want.sort_by_key(Group::start_min);
    assert_eq!(left, want, "revert must remove exactly our groups");
}

#[tokio::test]
async fn reordered_reads_are_verified_by_content() {
    for order in [ReadOrder::Reversed, ReadOrder::ByMode, ReadOrder::AsWritten] {
        let rig = Rig::new().await;
        rig.emu.set_read_order(order);
        rig.emu.seed_groups(
            SN,
            vec![
                g(12, 0, 13, 0, WorkMode::SelfUse),
                g(14, 0, 15, 0, WorkMode::Feedin),
            ],
        );
        let r = req("r1", Command::Discharge, at(0, 22, 30), Some(at(1, 1, 0)));
        let out = rig.driver_for(&r).apply(&r).await.unwrap();
        assert!(out.verified, "{order:?}: {out:?}");
    }
}

#[tokio::test]
async fn a_write_accepted_but_not_applied_is_not_verified() {
    let rig = Rig::new().await;
    rig.emu.set_ignore_writes(true);
    let r = req("v1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let out = rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(!out.verified, "{out:?}");
}

#[tokio::test]
async fn an_overlapping_foreign_group_with_the_flag_on_is_scheduler_active() {
    let rig = Rig::new().await;
    let before = vec![
        g(3, 0, 4, 0, WorkMode::SelfUse),
        g(10, 0, 11, 0, WorkMode::Feedin),
    ];
    rig.emu.seed_groups(SN, before.clone());
    rig.emu.set_flag(SN, true);
    let r = req("s1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::SchedulerActive, "{err:?}");
    assert_eq!(err.rows.len(), 1);
    assert_eq!(
        (err.rows[0].start.as_str(), err.rows[0].owner),
        ("03:00", RowOwner::Foreign)
    );
    assert_eq!(rig.groups(), before, "nothing may be written");
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);
}

#[tokio::test]
async fn clearing_removes_only_overlapping_foreign_groups() {
    let rig = Rig::new().await;
    // The cloud checks disabled groups for overlaps too (and a group whose
    // time has passed today reads disabled): one in the window is cleared
    // like an enabled one; one outside it is kept.
    let mut in_window = g(4, 0, 4, 30, WorkMode::ForceDischarge);
    in_window.enable = 0;
    let mut outside = g(6, 0, 6, 30, WorkMode::ForceDischarge);
    outside.enable = 0;
    let keep = g(10, 0, 11, 0, WorkMode::Feedin);
    rig.emu.seed_groups(
        SN,
        vec![
            g(3, 0, 4, 0, WorkMode::SelfUse),
            keep.clone(),
            in_window,
            outside.clone(),
        ],
    );
    rig.emu.set_flag(SN, true);
    let mut r = req("c1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    r.clear_native_scheduler = true;
    let out = rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    assert!(
        out.raw.contains("cleared 2 foreign group(s)"),
        "{}",
        out.raw
    );
    assert_eq!(
        windows(&rig.groups()),
        vec![
            w("02:00", "05:00", WorkMode::ForceCharge),
            w("06:00", "06:30", WorkMode::ForceDischarge),
            w("10:00", "11:00", WorkMode::Feedin),
        ]
    );
    assert!(rig.groups().contains(&outside) && rig.groups().contains(&keep));
}

#[tokio::test]
async fn backup_groups_are_never_cleared() {
    let rig = Rig::new().await;
    let before = vec![
        g(3, 0, 4, 0, WorkMode::Backup),
        g(4, 0, 4, 30, WorkMode::SelfUse),
    ];
    rig.emu.seed_groups(SN, before.clone());
    rig.emu.set_flag(SN, true);
    let mut r = req("p1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&r);
    // Without clearing: SchedulerActive, listing the Backup row as
    // protected.
    let err = d.apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::SchedulerActive);
    assert!(
        err.rows
            .iter()
            .any(|row| row.mode == "Backup" && row.owner == RowOwner::Protected)
    );
    // With clearing: ProtectedRow naming it, and nothing touched (not even
    // the SelfUse group that could have been cleared).
    r.clear_native_scheduler = true;
    let err = d.apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ProtectedRow, "{err:?}");
    assert_eq!(err.rows.len(), 1);
    assert_eq!(err.rows[0].mode, "Backup");
    assert!(err.message.contains("Backup 03:00-04:00"), "{err:?}");
    assert_eq!(rig.groups(), before);
}

#[tokio::test]
async fn read_state_labels_owners() {
    let rig = Rig::new().await;
    rig.emu.seed_groups(
        SN,
        vec![
            g(12, 0, 13, 0, WorkMode::SelfUse),
            g(18, 0, 19, 0, WorkMode::Backup),
        ],
    );
    let r = req("o1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&r);
    d.apply(&r).await.unwrap();
    let state = d.read_state(&[]).await.unwrap();
    let (flag, rows) = state.native_scheduler.unwrap();
    assert!(flag);
    let mut owners: Vec<(String, RowOwner)> =
        rows.iter().map(|r| (r.start.clone(), r.owner)).collect();
    owners.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        owners,
        vec![
            ("02:00".into(), RowOwner::Ours),
            ("12:00".into(), RowOwner::Foreign),
            ("18:00".into(), RowOwner::Protected),
        ],
        "Invalid padding must not appear as rows"
    );
}

// ---------------------------------------------------------------- limits

#[tokio::test]
async fn no_free_slot_is_rejected_before_writing() {
    let rig = Rig::new().await;
    // Seven one-hour foreign groups from 08:00; the window needs two more.
    let foreign: Vec<Group> = (8..15)
        .map(|h| g(h, 0, h + 1, 0, WorkMode::SelfUse))
        .collect();
    rig.emu.seed_groups(SN, foreign.clone());
    let r = req("n1", Command::Charge, at(0, 22, 0), Some(at(1, 6, 0)));
    let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected);
    assert!(err.message.contains("no free slot"), "{err:?}");
    assert_eq!(rig.groups(), foreign);
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);
    // One group still fits.
    let one = req("n2", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    assert!(rig.driver_for(&one).apply(&one).await.unwrap().verified);
}

#[tokio::test]
async fn the_daily_budget_gives_rate_limited_with_retry_after() {
    let rig = Rig::new().await;
    rig.emu.set_calls_per_day(1);
    let d = rig.driver_at(at(0, 0, 0));
    d.read_state(&[]).await.unwrap_err(); // flag read passes, groups read is over budget
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::RateLimited);
    assert!(err.retryable());
    // Until the budget's reset (see the 40402 test at the end).
    assert!(err.retry_after.is_some());
    assert!(err.raw.as_deref().unwrap().contains("40402"));
}

#[tokio::test]
async fn writes_are_spaced_as_the_oem_requires() {
    let mut rig = Rig::new().await;
    rig.emu.set_min_write_interval(Duration::from_millis(400));
    // Flag off: an apply writes the groups, then the flag. Back to back,
    // the second write is refused.
    let r = req("w1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::RateLimited, "{err:?}");
    // Spaced by the driver, both writes land.
    rig.emu.seed_groups(SN, vec![]);
    tokio::time::sleep(Duration::from_millis(450)).await;
    rig.set("min_write_interval_ms", "450");
    let t = std::time::Instant::now();
    let out = rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    assert!(rig.emu.flag(SN));
    assert!(t.elapsed() >= Duration::from_millis(400));
}

// ---------------------------------------------------------------- errors

#[tokio::test]
async fn errnos_and_http_failures_are_classified() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    let cases: [(i64, &str, ErrorKind); 4] = [
        (
            40257,
            "parameters do not meet expectations",
            ErrorKind::Rejected,
        ),
        (42023, "time overlap", ErrorKind::Rejected),
        (40400, "too frequent", ErrorKind::RateLimited),
        (44444, "something new", ErrorKind::Rejected),
    ];
    for (errno, msg, kind) in cases {
        rig.emu.fail_next_errno(1, errno, msg);
        let err = d.read_state(&[]).await.unwrap_err();
        assert_eq!(err.kind, kind, "errno {errno}: {err:?}");
        let raw = err.raw.clone().unwrap();
        assert!(
            raw.contains(&format!("errno {errno}")) && raw.contains(msg),
            "{raw}"
        );
        assert_eq!(err.retryable(), kind == ErrorKind::RateLimited);
        if kind == ErrorKind::RateLimited {
            assert!(err.retry_after.is_some());
        }
    }
    for status in [502, 503] {
        rig.emu.fail_next_status(1, status);
        let err = d.read_state(&[]).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
        assert!(err.retryable());
        assert!(err.raw.unwrap().contains(&format!("HTTP {status}")));
    }
    rig.emu.fail_next_body(1, "<html>maintenance</html>");
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
    assert!(err.raw.unwrap().contains("malformed"));
    // After all the failures the device still works.
    assert!(d.read_state(&[]).await.is_ok());
}

#[tokio::test]
async fn a_malformed_group_list_is_rejected_not_a_panic() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    rig.emu
        .fail_next_body(1, r#"{"errno":0,"msg":"ok","result":{"enable":1}}"#); // flag ok
    rig.emu
        .fail_next_body(1, r#"{"errno":0,"msg":"ok","result":{"groups":"none"}}"#);
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected, "{err:?}");
    assert!(err.raw.is_some());
}

#[tokio::test]
async fn odd_slots_and_a_null_result_are_read_without_failing_the_device() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    // A slot without times, one that is not an object, an unknown mode and
    // a null minSocOnGrid: read, the unknown mode as a foreign row.
    rig.emu
        .fail_next_body(1, r#"{"errno":0,"msg":"ok","result":{"enable":1}}"#);
    rig.emu.fail_next_body(
        1,
        r#"{"errno":0,"msg":"ok","result":{"groups":[{"enable":1}, null, 7,
            {"enable":1,"startHour":9,"startMinute":0,"endHour":9,"endMinute":59,
             "workMode":"PeakShaving","minSocOnGrid":null,"fdSoc":20,"fdPwr":100}]}}"#,
    );
    let state = d.read_state(&[]).await.unwrap();
    let (on, rows) = state.native_scheduler.unwrap();
    assert!(on);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].mode.as_str(),
            rows[0].start.as_str(),
            rows[0].end.as_str()
        ),
        ("PeakShaving", "09:00", "10:00")
    );
    assert_eq!(rows[0].owner, RowOwner::Foreign);
    // `result: null` (the mode was set in the app): no groups.
    rig.emu
        .fail_next_body(1, r#"{"errno":0,"msg":"ok","result":{"enable":0}}"#);
    rig.emu
        .fail_next_body(1, r#"{"errno":0,"msg":"ok","result":null}"#);
    let state = d.read_state(&[]).await.unwrap();
    assert_eq!(state.native_scheduler, Some((false, vec![])));
}

#[tokio::test]
async fn a_slow_cloud_times_out_as_unavailable() {
    let mut rig = Rig::new().await;
    rig.set("request_timeout_ms", "200");
    rig.emu.set_latency(Duration::from_millis(1000));
    let err = rig
        .driver_at(at(0, 0, 0))
        .read_state(&[])
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn an_unreachable_cloud_is_unavailable() {
    let mut rig = Rig::new().await;
    // A port nobody listens on: bind, read the port, drop.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    rig.allow(&url);
    rig.set("base_url", &url);
    let err = rig
        .driver_at(at(0, 0, 0))
        .read_state(&[])
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
}

// ---------------------------------------------------------------- revert

#[tokio::test]
async fn revert_is_idempotent_and_survives_a_restart() {
    let rig = Rig::new().await;
    rig.emu
        .seed_groups(SN, vec![g(12, 0, 13, 0, WorkMode::SelfUse)]);
    let r = req("i1", Command::Discharge, at(0, 22, 0), Some(at(1, 2, 0)));
    rig.driver_for(&r).apply(&r).await.unwrap();
    assert_eq!(rig.groups().len(), 3);
    // A fresh factory (a restart) knows nothing but the request.
    let d = pinned(
        FoxessFactory::default().with_policy(rig.policy.clone()),
        at(1, 2, 0),
    )
    .build(&rig.spec())
    .unwrap();
    let revert = RevertRequest {
        applied: r,
        memo: None,
    };
    assert!(d.revert(&revert).await.unwrap().verified);
    assert_eq!(
        windows(&rig.groups()),
        vec![w("12:00", "13:00", WorkMode::SelfUse)]
    );
    let writes = rig.emu.successful_calls(PATH_SET);
    assert!(d.revert(&revert).await.unwrap().verified);
    assert_eq!(
        rig.emu.successful_calls(PATH_SET),
        writes,
        "nothing to write twice"
    );
}

#[tokio::test]
async fn a_retried_apply_writes_nothing_new() {
    let rig = Rig::new().await;
    let r = req("x1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&r);
    d.apply(&r).await.unwrap();
    d.apply(&r).await.unwrap();
    assert_eq!(rig.emu.successful_calls(PATH_SET), 1);
    assert_eq!(rig.emu.successful_calls(PATH_SET_FLAG), 1);
    assert_eq!(rig.groups().len(), 1);
    assert!(rig.emu.successful_calls(PATH_GET) >= 4);
}

#[tokio::test]
async fn concurrent_applies_on_one_inverter_do_not_wipe_each_other() {
    let rig = Rig::new().await;
    rig.emu.set_latency(Duration::from_millis(20));
    let a = req("k1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let b = req("k2", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let mut b = b;
    b.start = at(0, 3, 0);
    b.end = Some(at(0, 4, 0));
    let (da, db) = (rig.driver_for(&a), rig.driver_at(a.start));
    let (ra, rb) = tokio::join!(da.apply(&a), db.apply(&b));
    ra.unwrap();
    rb.unwrap();
    assert_eq!(rig.groups().len(), 2, "{:?}", rig.groups());
}

#[tokio::test]
async fn one_inverter_reached_through_two_key_references_is_locked_once() {
    let mut rig = Rig::new().await;
    rig.emu.set_latency(Duration::from_millis(20));
    // A second file holding the same key: another reference, same inverter.
    std::fs::write(rig._secrets.path().join("foxess-key-2"), format!("{KEY}\n")).unwrap();
    let a = req("k1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let mut b = req("k2", Command::Charge, at(0, 3, 0), Some(at(0, 4, 0)));
    b.start = at(0, 3, 0);
    let da = rig.driver_for(&a);
    rig.set("api_key_ref", "file:foxess-key-2");
    let db = rig.driver_at(a.start);
    assert_ne!(da.account(), db.account(), "two accounts by key reference");
    let (ra, rb) = tokio::join!(da.apply(&a), db.apply(&b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(rig.groups().len(), 2, "{:?}", rig.groups());
    // One lock: the second read-modify-write began after the first ended,
    // so neither had to merge with the other's write.
    for out in [&ra, &rb] {
        assert!(!out.raw.contains("another writer"), "{}", out.raw);
    }
    assert_eq!(rig.emu.successful_calls(PATH_SET), 2);
}

// ---------------------------------------------------------------- field rules

/// A foreign group as the v1 API returns it: with `maxSoc` and a field a
/// newer firmware added.
fn v1_group(sh: i64, eh: i64, mode: WorkMode) -> Group {
    let mut g = g(sh, 0, eh, 0, mode);
    g.extra.insert("maxSoc".into(), serde_json::json!(95));
    g.extra.insert(
        "extraParam".into(),
        serde_json::json!({"importLimit": 3000}),
    );
    g
}

fn applied(id: &str, out: &switchyard_drivers::Outcome) -> Applied {
    Applied {
        action_id: id.to_owned(),
        memo: out.memo.clone().expect("an apply records a memo"),
    }
}

#[tokio::test]
async fn foreign_groups_are_written_back_with_every_field_they_had() {
    let rig = Rig::new().await;
    let foreign = v1_group(10, 11, WorkMode::Feedin);
    rig.emu.seed_groups(SN, vec![foreign.clone()]);
    let r = req("v1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    let kept = rig
        .groups()
        .into_iter()
        .find(|g| g.work_mode == "Feedin")
        .expect("kept");
    assert_eq!(kept, foreign, "maxSoc and extraParam survive the write");
    d.revert(&RevertRequest {
        applied: r,
        memo: out.memo,
    })
    .await
    .unwrap();
    assert_eq!(rig.groups(), vec![foreign]);
}

#[tokio::test]
async fn a_foreign_group_the_cloud_would_refuse_is_never_rewritten_silently() {
    let rig = Rig::new().await;
    // Set in the app: fdSoc 10 and fdPwr 0, which the write endpoint
    // refuses.
    let mut app_only = g(6, 0, 7, 0, WorkMode::SelfUse);
    app_only.fd_soc = 10;
    app_only.fd_pwr = 0;
    rig.emu.seed_groups(SN, vec![app_only.clone()]);
    let mut r = req("u1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let err = d.apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ForeignUnwritable, "{err:?}");
    assert_eq!(err.code(), "FOREIGN_SCHEDULE_UNWRITABLE");
    assert!(!err.retryable());
    assert!(err.message.contains("SelfUse 06:00-07:00"), "{err:?}");
    assert!(err.message.contains("fdSoc 10"), "{err:?}");
    assert_eq!(err.rows.len(), 1);
    assert_eq!(rig.groups(), vec![app_only.clone()], "nothing written");
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);
    // CANCEL_AND_REPLACE authorises clearing it.
    r.clear_native_scheduler = true;
    let out = d.apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    assert!(
        out.raw.contains("cleared 1 foreign group(s)"),
        "{}",
        out.raw
    );
    assert_eq!(
        windows(&rig.groups()),
        vec![w("02:00", "03:00", WorkMode::ForceCharge)]
    );
}

#[tokio::test]
async fn back_to_back_actions_never_share_a_minute_on_the_wire() {
    let rig = Rig::new().await;
    let a = req("b1", Command::Charge, at(0, 10, 0), Some(at(0, 11, 0)));
    let b = req("b2", Command::Discharge, at(0, 11, 0), Some(at(0, 12, 0)));
    let d = rig.driver_for(&a);
    let out_a = d.apply(&a).await.unwrap();
    let mut b = b;
    b.live = vec![applied("b1", &out_a)];
    let out_b = rig.driver_at(at(0, 10, 59)).apply(&b).await.unwrap();
    assert!(out_b.verified, "{out_b:?}");
    let mut wire: Vec<(String, String)> = rig
        .groups()
        .iter()
        .map(|g| (g.start_hhmm(), g.end_hhmm()))
        .collect();
    wire.sort();
    assert_eq!(
        wire,
        vec![
            ("10:00".into(), "10:59".into()),
            ("11:00".into(), "11:59".into())
        ]
    );
    // Read back accordingly: the rows end where the windows end.
    let state = d.read_state(&[]).await.unwrap();
    let mut rows: Vec<(String, String)> = state
        .native_scheduler
        .unwrap()
        .1
        .into_iter()
        .map(|r| (r.start, r.end))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("10:00".into(), "11:00".into()),
            ("11:00".into(), "12:00".into())
        ]
    );
}

#[tokio::test]
async fn the_scheduler_flag_is_left_as_found_by_the_last_revert() {
    let rig = Rig::new().await;
    assert!(!rig.emu.flag(SN));
    let a = req("f1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let b = req("f2", Command::Charge, at(0, 4, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&a);
    let out_a = d.apply(&a).await.unwrap();
    assert!(
        rig.emu.flag(SN),
        "on while switchyard's groups are in force"
    );
    let mut b = b;
    b.live = vec![applied("f1", &out_a)];
    let out_b = d.apply(&b).await.unwrap();
    // The first revert leaves the flag on: the other action still needs it.
    let mut a_rev = a.clone();
    a_rev.live = vec![applied("f2", &out_b)];
    d.revert(&RevertRequest {
        applied: a_rev,
        memo: out_a.memo.clone(),
    })
    .await
    .unwrap();
    assert!(rig.emu.flag(SN));
    // The last one turns it off again, as it was found; b had found it on
    // (a had turned it on) and still restores the homeowner's "off". (No
    // other action is live any more.)
    b.live = Vec::new();
    let out = d
        .revert(&RevertRequest {
            applied: b,
            memo: out_b.memo,
        })
        .await
        .unwrap();
    assert!(!rig.emu.flag(SN), "{out:?}");
    assert!(out.raw.contains("turned off again"), "{}", out.raw);
    assert!(rig.groups().is_empty());

    // A homeowner's flag that was on stays on.
    rig.emu.set_flag(SN, true);
    let c = req("f3", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let out_c = d.apply(&c).await.unwrap();
    d.revert(&RevertRequest {
        applied: c,
        memo: out_c.memo,
    })
    .await
    .unwrap();
    assert!(rig.emu.flag(SN));
}

#[tokio::test]
async fn turning_the_flag_on_says_which_dormant_foreign_groups_it_wakes() {
    let rig = Rig::new().await;
    let dormant = g(18, 0, 19, 0, WorkMode::ForceDischarge);
    rig.emu.seed_groups(SN, vec![dormant.clone()]);
    let r = req("w1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    assert!(
        out.raw
            .contains("1 dormant foreign group(s) in force (ForceDischarge 18:00-19:00)"),
        "{}",
        out.raw
    );
    d.revert(&RevertRequest {
        applied: r,
        memo: out.memo,
    })
    .await
    .unwrap();
    assert!(!rig.emu.flag(SN), "dormant again after the revert");
    assert_eq!(rig.groups(), vec![dormant]);
    // With the flag already on nothing is woken, and nothing is said.
    rig.emu.set_flag(SN, true);
    let r = req("w2", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let out = d.apply(&r).await.unwrap();
    assert!(!out.raw.contains("dormant"), "{}", out.raw);
}

/// Two actions with identical groups: `first` applied, then `second`
/// (its groups already in place). Returns both outcomes.
async fn identical_pair(
    rig: &Rig,
    d: &Arc<dyn Driver>,
) -> (
    ApplyRequest,
    switchyard_drivers::Outcome,
    ApplyRequest,
    switchyard_drivers::Outcome,
) {
    let first = req("i1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let out1 = d.apply(&first).await.unwrap();
    let mut second = req("i2", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    second.live = vec![applied("i1", &out1)];
    let out2 = d.apply(&second).await.unwrap();
    assert!(
        out2.verified && out2.raw.contains("already in place"),
        "{out2:?}"
    );
    assert_eq!(rig.groups().len(), 1);
    (first, out1, second, out2)
}

#[tokio::test]
async fn identical_groups_of_two_actions_outlive_the_first_revert_in_either_order() {
    // Order 1: the second applies, then the first reverts.
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 2, 0));
    let (mut first, out1, second, out2) = identical_pair(&rig, &d).await;
    first.live = vec![applied("i2", &out2)];
    let out = d
        .revert(&RevertRequest {
            applied: first,
            memo: out1.memo,
        })
        .await
        .unwrap();
    assert!(out.verified, "{out:?}");
    assert!(
        out.raw.contains("left in place for another live action"),
        "{}",
        out.raw
    );
    assert_eq!(rig.groups().len(), 1, "the second action's group stays");
    assert!(rig.emu.flag(SN));
    let mut second = second;
    second.live = Vec::new();
    d.revert(&RevertRequest {
        applied: second,
        memo: out2.memo,
    })
    .await
    .unwrap();
    assert!(rig.groups().is_empty());

    // Order 2: the first reverts (the second still live), then the second
    // applies again (a retry) and finds its group in place.
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 2, 0));
    let (mut first, out1, second, _) = identical_pair(&rig, &d).await;
    first.live = vec![applied("i2", &out1)];
    d.revert(&RevertRequest {
        applied: first,
        memo: out1.memo,
    })
    .await
    .unwrap();
    assert_eq!(rig.groups().len(), 1);
    let mut retry = second;
    retry.live = Vec::new();
    assert!(d.apply(&retry).await.unwrap().verified);
    assert_eq!(rig.groups().len(), 1);
}

#[tokio::test]
async fn a_revert_removes_what_the_memo_says_even_after_the_timezone_changed() {
    let mut rig = Rig::new().await;
    let r = req("t1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let out = rig.driver_for(&r).apply(&r).await.unwrap();
    assert_eq!(rig.groups().len(), 1);
    // The device is now said to be in UTC: recomputing "our" groups would
    // look for 01:00-02:00 and find nothing.
    rig.set("max_power_w", "5000");
    let spec = DeviceSpec {
        timezone: "UTC",
        ..rig.spec()
    };
    // Another process (a restart): nothing remembered but the memo.
    let moved = pinned(
        FoxessFactory::default().with_policy(rig.policy.clone()),
        r.start,
    )
    .build(&spec)
    .unwrap();
    let recomputed = moved
        .revert(&RevertRequest {
            applied: r.clone(),
            memo: None,
        })
        .await
        .unwrap();
    assert_eq!(
        rig.groups().len(),
        1,
        "recomputed from the request: missed ({recomputed:?})"
    );
    let out = moved
        .revert(&RevertRequest {
            applied: r,
            memo: out.memo,
        })
        .await
        .unwrap();
    assert!(out.verified, "{out:?}");
    assert!(rig.groups().is_empty(), "{:?}", rig.groups());
}

#[tokio::test]
async fn the_devices_own_power_limit_and_slot_count_come_from_the_cloud() {
    let mut config = EmulatorConfig::new(KEY, &[SN]);
    config.max_power_w = 5000;
    config.max_slots = 2;
    let rig = Rig::with(config, KEY).await;
    // Settings say 6000 W and 8 slots; the cloud says 5000 W and 2.
    let r = req("p1", Command::Charge, at(0, 10, 0), Some(at(0, 11, 0)));
    let out = rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    assert_eq!(rig.groups()[0].fd_pwr, 5000, "full power is the device's");
    let mut big = req("p2", Command::Discharge, at(0, 4, 0), Some(at(0, 5, 0)));
    big.params.power = Some(Quantity {
        value: 5500.0,
        unit: Unit::Watt,
    });
    let err = rig.driver_for(&big).apply(&big).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Rejected);
    assert!(err.message.contains("5000 W"), "{err:?}");
    // Two slots: one taken, an overnight window needs two more.
    let mut night = req("p3", Command::Charge, at(0, 22, 0), Some(at(1, 6, 0)));
    night.live = vec![applied("p1", &out)];
    let err = rig.driver_for(&night).apply(&night).await.unwrap_err();
    assert!(err.message.contains("no free slot"), "{err:?}");
    assert!(err.message.contains("2 scheduler slots"), "{err:?}");
    assert_eq!(rig.groups().len(), 1, "nothing written");
}

#[tokio::test]
async fn a_plant_in_another_time_zone_refuses_the_device_as_misconfigured() {
    let rig = Rig::new().await;
    rig.emu.set_plant_timezone(Some("Europe/London".to_owned()));
    let r = req("z1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misconfigured, "{err:?}");
    assert_eq!(err.code(), "DEVICE_MISCONFIGURED");
    assert!(
        err.message.contains("Europe/London") && err.message.contains(TZ),
        "{err:?}"
    );
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);
    // A name this server cannot resolve is not a reason to refuse.
    let rig = Rig::new().await;
    rig.emu
        .set_plant_timezone(Some("Mars/Olympus_Mons".to_owned()));
    assert!(rig.driver_for(&r).apply(&r).await.unwrap().verified);
    // The same zone passes (a fresh factory: the answer is cached).
    let rig = Rig::new().await;
    rig.emu.set_plant_timezone(Some(TZ.to_owned()));
    assert!(rig.driver_for(&r).apply(&r).await.unwrap().verified);
}

#[tokio::test]
async fn an_overnight_window_verifies_though_its_passed_half_reads_disabled() {
    let rig = Rig::new().await;
    let r = req("n1", Command::Charge, at(0, 22, 0), Some(at(1, 6, 0)));
    // The cloud's clock: 22:00 local, so 00:00-05:59 has passed today.
    rig.emu.set_plant_timezone(Some(TZ.to_owned()));
    rig.emu.set_now(Some(r.start));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    let state = d.read_state(&[applied("n1", &out)]).await.unwrap();
    let rows = state.native_scheduler.unwrap().1;
    assert!(
        rows.iter().any(|r| r.start == "00:00" && !r.enabled),
        "the passed half reads disabled: {rows:?}"
    );
    assert!(out.verified, "{out:?}");
    assert!(rows.iter().all(|r| r.owner == RowOwner::Ours), "{rows:?}");
    // Another action written the next evening keeps switchyard's passed
    // half enabled (written back disabled, it would not run tomorrow).
    let mut r2 = req("n2", Command::Discharge, at(1, 20, 0), Some(at(1, 21, 0)));
    r2.live = vec![applied("n1", &out)];
    rig.emu.set_now(Some(r2.start));
    rig.driver_for(&r2).apply(&r2).await.unwrap();
    assert!(
        rig.groups().iter().all(|g| g.enable == 1),
        "switchyard's own passed group is written back enabled: {:?}",
        rig.groups()
    );
}

#[tokio::test]
async fn a_concurrent_writer_is_merged_once_then_reported_retryable() {
    let rig = Rig::new().await;
    let theirs = serde_json::json!({
        "enable": 1, "startHour": 5, "startMinute": 0, "endHour": 5, "endMinute": 29,
        "workMode": "Feedin", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 1000
    });
    rig.emu.set_concurrent_writer(1, theirs.clone());
    let r = req("cw1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    assert!(
        out.raw.contains("another writer changed the groups"),
        "{}",
        out.raw
    );
    assert_eq!(
        windows(&rig.groups()),
        vec![
            w("02:00", "03:00", WorkMode::ForceCharge),
            w("05:00", "05:30", WorkMode::Feedin)
        ],
        "ours and theirs both survive"
    );
    // A writer that keeps interfering: one redo, then a retryable error.
    let rig = Rig::new().await;
    rig.emu.set_concurrent_writer(2, theirs);
    let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Contended, "{err:?}");
    assert!(err.retryable());
    // Its writes may have landed: the error says what to undo.
    let memo: serde_json::Value = serde_json::from_str(err.memo.as_deref().unwrap()).unwrap();
    assert_eq!(memo["groups"][0]["startHour"], 2, "{memo}");
    assert_eq!(err.code(), "OEM_CONCURRENT_WRITE");
    assert_eq!(
        rig.emu.successful_calls(PATH_SET),
        2,
        "one write and one redo"
    );
}

#[tokio::test]
async fn an_unknown_mode_from_a_newer_firmware_is_kept_verbatim_and_blocks_nothing() {
    let rig = Rig::new().await;
    let newer = serde_json::json!({
        "enable": 1, "startHour": 12, "startMinute": 0, "endHour": 12, "endMinute": 59,
        "workMode": "PeakShaving", "minSocOnGrid": 10, "fdSoc": 10, "fdPwr": 0,
        "maxSoc": 90, "peakLimit": 4000
    });
    let placeholder = serde_json::json!({
        "enable": 0, "startHour": 0, "startMinute": 0, "endHour": 0, "endMinute": 0,
        "workMode": "", "minSocOnGrid": null, "fdSoc": 10, "fdPwr": 0
    });
    rig.emu.seed_raw(SN, vec![newer.clone(), placeholder]);
    let r = req("m1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    let stored = rig.emu.raw_groups(SN);
    assert_eq!(
        stored.len(),
        2,
        "the placeholder is not written back: {stored:?}"
    );
    assert!(stored.contains(&newer), "kept verbatim: {stored:?}");
    d.revert(&RevertRequest {
        applied: r,
        memo: out.memo,
    })
    .await
    .unwrap();
    assert_eq!(rig.emu.raw_groups(SN), vec![newer]);
}

#[tokio::test]
async fn a_revert_blocked_by_an_app_only_group_says_which_and_clears_it_only_if_authorised() {
    let rig = Rig::new().await;
    let mut r = req("rv1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    // While the action is in force, the homeowner adds a group in the app
    // that the write endpoint would refuse.
    rig.emu.seed_app_only_group(SN);
    let rev = |r: &ApplyRequest| RevertRequest {
        applied: r.clone(),
        memo: out.memo.clone(),
    };
    let err = d.revert(&rev(&r)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ForeignUnwritable, "{err:?}");
    assert!(err.message.contains("SelfUse 06:00-07:00"), "{err:?}");
    assert_eq!(rig.groups().len(), 2, "nothing written");
    // Pushed with CANCEL_AND_REPLACE: the revert may clear it.
    r.clear_native_scheduler = true;
    let out = d.revert(&rev(&r)).await.unwrap();
    assert!(out.verified, "{out:?}");
    assert!(
        out.raw.contains("cleared 1 foreign group(s)"),
        "{}",
        out.raw
    );
    assert!(rig.groups().is_empty());
}

#[tokio::test]
async fn a_daily_window_lands_on_the_same_wall_clock_minutes_across_both_dst_sundays() {
    let berlin = TimeZone::get(TZ).unwrap();
    let local =
        |y: i16, mo: i8, d: i8, h: i8| berlin.to_timestamp(date(y, mo, d).at(h, 0, 0, 0)).unwrap();
    // 2027-03-28 and 2027-10-31: the last Sundays of March and October.
    for (mo, d) in [(3, 27), (3, 28), (3, 29), (10, 30), (10, 31), (11, 1)] {
        let rig = Rig::new().await;
        let r = req(
            "dst",
            Command::Charge,
            local(2027, mo, d, 17),
            Some(local(2027, mo, d, 19)),
        );
        let out = rig.driver_for(&r).apply(&r).await.unwrap();
        assert!(out.verified, "{out:?}");
        assert_eq!(
            windows(&rig.groups()),
            vec![w("17:00", "19:00", WorkMode::ForceCharge)],
            "2027-{mo}-{d}"
        );
    }
    // The nights the clocks change: 01:00-04:00 local.
    let rig = Rig::new().await;
    let r = req(
        "dst",
        Command::Charge,
        local(2027, 3, 28, 1),
        Some(local(2027, 3, 28, 4)),
    );
    rig.driver_for(&r).apply(&r).await.unwrap();
    assert_eq!(
        windows(&rig.groups()),
        vec![
            w("01:00", "02:00", WorkMode::ForceCharge),
            w("03:00", "04:00", WorkMode::ForceCharge)
        ],
        "02:00-03:00 does not exist that night"
    );
    let rig = Rig::new().await;
    let r = req(
        "dst",
        Command::Charge,
        local(2027, 10, 31, 1),
        Some(local(2027, 10, 31, 4)),
    );
    rig.driver_for(&r).apply(&r).await.unwrap();
    assert_eq!(
        windows(&rig.groups()),
        vec![w("01:00", "04:00", WorkMode::ForceCharge)],
        "02:00-03:00 happens twice that night, written once"
    );
}

#[tokio::test]
async fn two_applies_of_one_round_both_remember_the_homeowners_flag() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 2, 0));
    // Same round: neither memo is recorded when the other runs.
    let a = req("r1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let b = req("r2", Command::Discharge, at(0, 4, 0), Some(at(0, 5, 0)));
    let out_a = d.apply(&a).await.unwrap();
    let out_b = rig.driver_at(at(0, 4, 0)).apply(&b).await.unwrap();
    let flag_before = |o: &switchyard_drivers::Outcome| {
        serde_json::from_str::<serde_json::Value>(o.memo.as_deref().unwrap()).unwrap()["flag_before"]
            .clone()
    };
    assert_eq!(flag_before(&out_a), false);
    assert_eq!(flag_before(&out_b), false, "b found the flag a turned on");
    let mut a_rev = a.clone();
    a_rev.live = vec![applied("r2", &out_b)];
    d.revert(&RevertRequest {
        applied: a_rev,
        memo: out_a.memo,
    })
    .await
    .unwrap();
    assert!(rig.emu.flag(SN));
    d.revert(&RevertRequest {
        applied: b,
        memo: out_b.memo,
    })
    .await
    .unwrap();
    assert!(!rig.emu.flag(SN), "the homeowner's flag was off");
}

#[tokio::test]
async fn a_foreign_group_disabled_only_because_its_time_passed_stays_enabled() {
    let rig = Rig::new().await;
    let morning = g(6, 0, 7, 0, WorkMode::Feedin);
    rig.emu.seed_groups(SN, vec![morning.clone()]);
    // Seen enabled in the morning (an observation), then an apply at 22:00
    // reads it disabled: it has passed today.
    rig.driver_at(at(0, 5, 0)).read_state(&[]).await.unwrap();
    let r = req("pg1", Command::Charge, at(0, 22, 0), Some(at(0, 23, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    assert!(
        out.raw.contains("kept 1 foreign group(s) enabled"),
        "{}",
        out.raw
    );
    assert!(
        rig.groups().contains(&morning),
        "written back enabled: {:?}",
        rig.groups()
    );
    d.revert(&RevertRequest {
        applied: r,
        memo: out.memo,
    })
    .await
    .unwrap();
    assert_eq!(rig.groups(), vec![morning.clone()]);
    // Never seen enabled (a fresh process): written back as read.
    let rig = Rig::new().await;
    rig.emu.seed_groups(SN, vec![morning.clone()]);
    let r = req("pg2", Command::Charge, at(0, 22, 0), Some(at(0, 23, 0)));
    rig.driver_for(&r).apply(&r).await.unwrap();
    let stored = rig.groups();
    let kept = stored.iter().find(|g| g.work_mode == "Feedin").unwrap();
    assert_eq!(kept.enable, 0, "as read: {stored:?}");
    // A group the homeowner disabled before its time is forgotten as
    // enabled, and stays disabled.
    let rig = Rig::new().await;
    rig.emu.seed_groups(SN, vec![morning.clone()]);
    rig.driver_at(at(0, 5, 0)).read_state(&[]).await.unwrap();
    let mut off = morning.clone();
    off.enable = 0;
    rig.emu.seed_groups(SN, vec![off.clone()]);
    rig.driver_at(at(0, 5, 30)).read_state(&[]).await.unwrap();
    let r = req("pg3", Command::Charge, at(0, 22, 0), Some(at(0, 23, 0)));
    rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(rig.groups().contains(&off), "{:?}", rig.groups());
}

#[tokio::test]
async fn plant_time_zones_compare_by_their_rules_not_their_names() {
    let rig = Rig::new().await;
    let spec_in = |tz: &'static str| DeviceSpec {
        timezone: tz,
        ..rig.spec()
    };
    let r = req("al1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    // Aliases agree.
    for (device, plant) in [("UTC", "Etc/UTC"), ("Asia/Kolkata", "Asia/Calcutta")] {
        let rig = Rig::new().await;
        rig.emu.set_plant_timezone(Some(plant.to_owned()));
        let d = pinned(rig.factory.clone(), r.start)
            .build(&DeviceSpec {
                timezone: device,
                ..rig.spec()
            })
            .unwrap();
        rig.emu.set_now(Some(r.start));
        assert!(d.apply(&r).await.is_ok(), "{device} / {plant}");
    }
    // UTC+1 all year is not Europe/Berlin (summer time differs).
    rig.emu.set_plant_timezone(Some("Etc/GMT-1".to_owned()));
    let err = pinned(rig.factory.clone(), r.start)
        .build(&spec_in(TZ))
        .unwrap()
        .apply(&r)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misconfigured, "{err:?}");
}

#[tokio::test]
async fn a_revert_merges_once_with_a_concurrent_writer() {
    let rig = Rig::new().await;
    let r = req("rc1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    let theirs = serde_json::json!({
        "enable": 1, "startHour": 5, "startMinute": 0, "endHour": 5, "endMinute": 29,
        "workMode": "Feedin", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 1000
    });
    rig.emu.set_concurrent_writer(1, theirs);
    let out = d
        .revert(&RevertRequest {
            applied: r,
            memo: out.memo,
        })
        .await
        .unwrap();
    assert!(out.verified, "{out:?}");
    assert!(
        out.raw.contains("another writer changed the groups"),
        "{}",
        out.raw
    );
    assert_eq!(
        windows(&rig.groups()),
        vec![w("05:00", "05:30", WorkMode::Feedin)],
        "ours gone, theirs kept"
    );
}

#[tokio::test]
async fn absurd_times_from_the_cloud_neither_panic_nor_get_written_back() {
    let rig = Rig::new().await;
    rig.emu.seed_raw(
        SN,
        vec![serde_json::json!({
            "enable": 1, "startHour": 0, "startMinute": 0,
            "endHour": i64::MAX, "endMinute": i64::MIN,
            "workMode": "SelfUse", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 100
        })],
    );
    let r = req("ab1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let state = d.read_state(&[]).await.unwrap();
    assert_eq!(state.native_scheduler.unwrap().1.len(), 1);
    let err = d.apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ForeignUnwritable, "{err:?}");
    assert!(err.message.contains("out of range"), "{err:?}");
}

#[tokio::test]
async fn a_40400_that_says_the_limit_is_exceeded_waits_for_the_daily_reset() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    rig.emu.fail_next_errno(
        1,
        40400,
        "Your request exceeds the limit. Please try again later",
    );
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::RateLimited);
    assert!(err.message.contains("daily call budget"), "{err:?}");
    assert!(
        err.retry_after.unwrap() > Duration::from_secs(60)
            || to_utc_midnight(Timestamp::now()) <= Duration::from_secs(60)
    );
    // Plain frequency: a minute.
    rig.emu.fail_next_errno(1, 40400, "request too frequent");
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.retry_after, Some(Duration::from_secs(60)));
}

#[tokio::test]
async fn a_retry_takes_over_what_an_earlier_try_wrote_and_the_flag_it_found() {
    let rig = Rig::new().await;
    // The first try wrote (and turned the flag on) but its answer was
    // lost: only its memo came back.
    let r = req("t1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let first = rig.driver_for(&r).apply(&r).await.unwrap();
    assert!(rig.emu.flag(SN));
    // The device's time zone changes before the retry: the retry writes
    // other minutes, and takes over the first try's group.
    let mut retry = r.clone();
    retry.memo = first.memo.clone();
    let spec = DeviceSpec {
        timezone: "UTC",
        ..rig.spec()
    };
    let moved = pinned(rig.factory.clone(), r.start).build(&spec).unwrap();
    let out = moved.apply(&retry).await.unwrap();
    let memo: serde_json::Value = serde_json::from_str(out.memo.as_deref().unwrap()).unwrap();
    assert_eq!(
        memo["flag_before"], false,
        "the homeowner's flag, not the first try's"
    );
    assert_eq!(memo["groups"].as_array().unwrap().len(), 2, "{memo}");
    assert_eq!(rig.groups().len(), 2);
    moved
        .revert(&RevertRequest {
            applied: retry,
            memo: out.memo,
        })
        .await
        .unwrap();
    assert!(
        rig.groups().is_empty(),
        "both tries' groups removed: {:?}",
        rig.groups()
    );
    assert!(!rig.emu.flag(SN));
}

#[tokio::test]
async fn a_revert_the_cloud_accepts_but_does_not_keep_is_a_failed_try() {
    let rig = Rig::new().await;
    let r = req("k1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = rig.driver_for(&r);
    let out = d.apply(&r).await.unwrap();
    rig.emu.set_ignore_writes(true);
    let rev = RevertRequest {
        applied: r,
        memo: out.memo,
    };
    let err = d.revert(&rev).await.unwrap_err();
    assert!(err.retryable(), "{err:?}");
    assert!(err.message.contains("still there"), "{err:?}");
    rig.emu.set_ignore_writes(false);
    assert!(d.revert(&rev).await.unwrap().verified);
    assert!(rig.groups().is_empty());
}

#[tokio::test]
async fn zones_with_other_transition_times_are_not_the_same_plant_zone() {
    let rig = Rig::new().await;
    rig.emu
        .set_plant_timezone(Some("America/Havana".to_owned()));
    let r = req("hv1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let d = pinned(rig.factory.clone(), r.start)
        .build(&DeviceSpec {
            timezone: "America/New_York",
            ..rig.spec()
        })
        .unwrap();
    let err = d.apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misconfigured, "{err:?}");
}

#[tokio::test]
async fn a_disabled_group_with_absurd_times_is_not_taken_for_an_empty_slot() {
    let rig = Rig::new().await;
    let odd = serde_json::json!({
        "enable": 0, "startHour": 99, "startMinute": 0, "endHour": 0, "endMinute": 0,
        "workMode": "SelfUse", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 100
    });
    rig.emu.seed_raw(SN, vec![odd.clone()]);
    let r = req("bt1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    let err = rig.driver_for(&r).apply(&r).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ForeignUnwritable, "{err:?}");
    assert_eq!(rig.emu.raw_groups(SN), vec![odd], "not deleted silently");
}

#[tokio::test]
async fn the_emulator_counts_fenced_writes_and_refuses_a_stale_token() {
    let rig = Rig::new().await;
    let mut r = req("fz1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    r.fence = 5;
    let d = rig.driver_for(&r);
    d.apply(&r).await.unwrap();
    assert_eq!(rig.emu.writes_for(SN, "fz1"), 1);
    // A retry under a newer claim finds its group in place: no write.
    r.fence = 6;
    assert!(d.apply(&r).await.unwrap().raw.contains("already in place"));
    assert_eq!(rig.emu.writes_for(SN, "fz1"), 1);
    // Reverted under a newer claim still; then the dispatcher that lost
    // the work writes late: refused.
    let mut rev = r.clone();
    rev.fence = 7;
    d.revert(&RevertRequest {
        applied: rev,
        memo: None,
    })
    .await
    .unwrap();
    let mut stale = r.clone();
    stale.fence = 4;
    let err = d.apply(&stale).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::StaleFence, "{err:?}");
    assert_eq!(
        rig.emu.writes_for(SN, "fz1"),
        2,
        "the apply and the revert only"
    );
    assert!(rig.groups().is_empty());
}

// ---------------------------------------------------------------- settings & secrets

fn spec<'a>(settings: &'a BTreeMap<String, String>, family: Family) -> DeviceSpec<'a> {
    DeviceSpec {
        device_id: "d",
        family,
        oem_device_id: SN,
        timezone: TZ,
        settings,
    }
}

/// Settings that pass every syntax and policy check; the variable named is
/// not set, so only `validate` and `build` (which read it) refuse them.
fn base_settings() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("base_url".to_owned(), FOXESS_CLOUD.to_owned()),
        (
            "api_key_ref".to_owned(),
            "env:SWITCHYARD_SECRET_FOXESS_TESTS_UNSET".to_owned(),
        ),
    ])
}

#[test]
fn capabilities_declare_the_foxess_limits() {
    let mut s = base_settings();
    s.insert("max_slots".into(), "10".into());
    let caps = FoxessFactory::default()
        .capabilities(&spec(&s, Family::Battery))
        .unwrap();
    assert!(caps.native_scheduler);
    assert_eq!(caps.window_limits.granularity_seconds, 60);
    assert!(!caps.window_limits.may_cross_midnight);
    assert_eq!(caps.window_limits.max_slots, 10);
    assert_eq!(caps.rate_budget.calls_per_day, 1440);
    assert_eq!(caps.rate_budget.min_write_interval_seconds, 5);
    for c in [
        Command::Charge,
        Command::Discharge,
        Command::Idle,
        Command::AutoBalanced,
        Command::AutoReserve,
        Command::AutoExport,
    ] {
        assert_eq!(caps.command(c).unwrap().channel, "mode");
    }
    assert!(caps.command(Command::EvPowerLimit).is_none());
    let e = FoxessFactory::default()
        .capabilities(&spec(&s, Family::EvCharger))
        .unwrap_err();
    assert!(matches!(e, ConfigError::UnsupportedFamily(_)));
}

#[test]
fn settings_are_validated_without_echoing_values() {
    let f = FoxessFactory::default();
    let mut s = base_settings();
    s.insert("max_slot".into(), "8".into());
    assert_eq!(
        f.capabilities(&spec(&s, Family::Battery))
            .unwrap_err()
            .key(),
        Some("max_slot")
    );
    let cases = [
        ("base_url", "ftp://h0st-s3cret"),
        ("base_url", "http://169.254.169.254/latest"), // not allowed
        ("api_key_ref", KEY),                          // the key pasted instead of a reference
        ("api_key_ref", "env:1BAD-name"),
        ("api_key_ref", "env:DATABASE_PASSWORD"), // no SWITCHYARD_SECRET_
        ("api_key_ref", "file:/etc/passwd"),
        ("api_key_ref", "file:foxess-key"), // no secrets directory here
        ("fd_soc", "7"),
        ("min_soc_on_grid", "57"), // above fd_soc 20
        ("max_power_w", "lots"),
    ];
    for (k, v) in cases {
        let mut s = base_settings();
        s.insert(k.into(), v.into());
        let err = f.capabilities(&spec(&s, Family::Battery)).unwrap_err();
        assert_eq!(err.key(), Some(k), "{k}={v}");
        assert!(matches!(err, ConfigError::InvalidSetting { .. }));
        assert!(!err.to_string().contains(v), "{err} echoes {v}");
        assert!(!format!("{err:?}").contains(v), "{err:?} echoes {v}");
        if k == "api_key_ref" {
            assert_eq!(err, refused(), "{v}");
        }
    }
    for missing in ["base_url", "api_key_ref"] {
        let mut s = base_settings();
        s.remove(missing);
        let err = f.capabilities(&spec(&s, Family::Battery)).unwrap_err();
        assert_eq!(err.key(), Some(missing));
    }
}

#[test]
fn an_unset_key_variable_fails_the_build_not_capabilities() {
    let name = "SWITCHYARD_SECRET_SURELY_UNSET_7C1";
    assert!(std::env::var(name).is_err(), "{name} must not be set");
    let f = FoxessFactory::default();
    let mut s = base_settings();
    s.insert("api_key_ref".into(), format!("env:{name}"));
    // A well-formed reference: capabilities (no I/O) accepts it ...
    f.capabilities(&spec(&s, Family::Battery)).unwrap();
    // ... and reading it, in validate and build, refuses it.
    assert_eq!(f.validate(&spec(&s, Family::Battery)), vec![refused()]);
    let err = f.build(&spec(&s, Family::Battery)).unwrap_err();
    assert_eq!(err, refused());
}

#[test]
fn forbidden_and_unreadable_secret_references_all_get_the_same_refusal() {
    // Every forbidden reference names something that exists, so a refusal
    // that differed by existence would show here.
    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    std::fs::create_dir_all(secrets.join("a")).unwrap();
    std::fs::write(secrets.join(KEY_FILE), KEY).unwrap();
    std::fs::write(secrets.join("a").join("b"), KEY).unwrap();
    std::fs::write(secrets.join("..data"), KEY).unwrap();
    std::fs::write(root.path().join("x"), KEY).unwrap();
    assert!(std::env::var("HOME").is_ok(), "HOME is set for this test");
    assert!(std::env::var("SWITCHYARD_SECRET_UNSET_XYZ").is_err());
    let f = FoxessFactory::default().with_policy(policy(&secrets, &[]));
    let with_ref = |r: &str| {
        let mut s = base_settings();
        s.insert("api_key_ref".into(), r.to_owned());
        s
    };
    // The control: the key's own file is accepted.
    let ok = with_ref(&format!("file:{KEY_FILE}"));
    assert_eq!(f.validate(&spec(&ok, Family::Battery)), vec![]);
    f.build(&spec(&ok, Family::Battery)).unwrap();

    let forbidden = [
        "env:DATABASE_PASSWORD",
        "env:HOME",
        "file:/etc/passwd",
        "file:../x",
        "file:a/b",
        "file:..data",
        KEY,
    ];
    let unreadable = ["file:nope", "env:SWITCHYARD_SECRET_UNSET_XYZ"];
    for r in forbidden.iter().chain(&unreadable) {
        let s = with_ref(r);
        let device = spec(&s, Family::Battery);
        let errors = f.validate(&device);
        assert_eq!(errors, vec![refused()], "validate {r}");
        let built = f.build(&device).unwrap_err();
        assert_eq!(built, refused(), "build {r}");
        // capabilities reads nothing: it refuses what the policy forbids
        // and lets a well-formed reference through.
        let caps = f.capabilities(&device);
        if unreadable.contains(r) {
            assert!(caps.is_ok(), "capabilities {r}: {caps:?}");
        } else {
            assert_eq!(caps.unwrap_err(), refused(), "capabilities {r}");
        }
        let name = r.split_once(':').map_or(*r, |(_, n)| n);
        for e in errors.iter().chain([&built]) {
            for text in [e.to_string(), format!("{e:?}")] {
                assert!(
                    !text.contains(r) && !text.contains(name),
                    "{text} echoes {r}"
                );
                assert_no_key(&text);
            }
        }
    }
}

#[test]
fn validate_reports_every_bad_setting_at_once() {
    let f = FoxessFactory::default();
    let mut s = base_settings();
    s.insert("max_slot".into(), "8".into());
    s.insert("fd_soc".into(), "7".into());
    s.insert("base_url".into(), "http://169.254.169.254".into());
    let keys = |errors: &[ConfigError]| {
        let mut k: Vec<String> = errors
            .iter()
            .map(|e| e.key().unwrap_or("-").to_owned())
            .collect();
        k.sort();
        k
    };
    // The base settings name an unset variable: the unreadable secret is
    // reported along with the rest, not in a second round.
    let errors = f.validate(&spec(&s, Family::Battery));
    assert_eq!(
        keys(&errors),
        ["api_key_ref", "base_url", "fd_soc", "max_slot"],
        "{errors:?}"
    );
    assert!(matches!(
        errors.iter().find(|e| e.key() == Some("max_slot")),
        Some(ConfigError::UnknownSetting { .. })
    ));
    // capabilities reports one of them.
    let first = f.capabilities(&spec(&s, Family::Battery)).unwrap_err();
    assert!(errors.contains(&first), "{first:?}");

    // The device's own fields are reported with the settings, as device
    // fields (no settings key).
    let device = DeviceSpec {
        device_id: "d",
        family: Family::Battery,
        oem_device_id: "  ",
        timezone: "Mars/Olympus_Mons",
        settings: &s,
    };
    let errors = f.validate(&device);
    assert_eq!(errors.len(), 6, "{errors:?}");
    let mut fields: Vec<&str> = errors
        .iter()
        .filter_map(|e| match e {
            ConfigError::InvalidDeviceField { field, .. } => Some(*field),
            _ => None,
        })
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["oem_device_id", "timezone"], "{errors:?}");
    for e in &errors {
        let text = e.to_string();
        assert!(
            !text.contains("169.254") && !text.contains("Mars"),
            "{text}"
        );
    }
    // Each device field alone is an InvalidDeviceField too (with a secret
    // that can be read, so that nothing else is wrong).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k"), KEY).unwrap();
    let f = FoxessFactory::default().with_policy(OperatorPolicy {
        secrets_dir: Some(dir.path().to_path_buf()),
        url_allow: vec![],
    });
    for (sn, tz, field) in [("", TZ, "oem_device_id"), (SN, "Not/AZone", "timezone")] {
        let mut good = base_settings();
        good.insert("api_key_ref".into(), "file:k".into());
        let device = DeviceSpec {
            device_id: "d",
            family: Family::Battery,
            oem_device_id: sn,
            timezone: tz,
            settings: &good,
        };
        let errors = f.validate(&device);
        assert!(
            matches!(errors.as_slice(), [ConfigError::InvalidDeviceField { field: f, .. }] if *f == field),
            "{field}: {errors:?}"
        );
        assert_eq!(f.capabilities(&device).unwrap_err(), errors[0], "{field}");
    }
}

#[tokio::test]
async fn base_urls_outside_the_allow_list_are_refused() {
    let rig = Rig::new().await;
    let port = rig.emu.addr().port();
    let other_port = if port == u16::MAX { port - 1 } else { port + 1 };
    // The control: the emulator's URL, allowed by the operator.
    rig.factory.capabilities(&rig.spec()).unwrap();
    for url in [
        "http://169.254.169.254".to_owned(),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "https://www.foxesscloud.com.evil.example".to_owned(),
        "http://www.foxesscloud.com".to_owned(),
        format!("http://127.0.0.1:{other_port}"),
        format!("http://localhost:{port}"),
    ] {
        let mut s = rig.settings.clone();
        s.insert("base_url".into(), url.clone());
        let device = spec(&s, Family::Battery);
        let err = rig.factory.capabilities(&device).unwrap_err();
        assert_eq!(err.key(), Some("base_url"), "{url}: {err:?}");
        assert!(matches!(err, ConfigError::InvalidSetting { .. }));
        assert!(!err.to_string().contains(&url), "{err} echoes {url}");
        assert_eq!(rig.factory.validate(&device), vec![err.clone()], "{url}");
        assert_eq!(rig.factory.build(&device).unwrap_err(), err, "{url}");
    }
    // Without the operator's word, the emulator is refused too; the
    // FoxESS cloud itself needs no permission.
    let default = FoxessFactory::default();
    let err = default.capabilities(&rig.spec()).unwrap_err();
    assert_eq!(err.key(), Some("base_url"));
    for url in [
        FOXESS_CLOUD,
        "https://www.foxesscloud.com/",
        "https://WWW.foxesscloud.com:443",
    ] {
        let mut s = base_settings();
        s.insert("base_url".into(), url.to_owned());
        default
            .capabilities(&spec(&s, Family::Battery))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[tokio::test]
async fn the_api_key_never_appears_in_debug_or_errors() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    assert_no_key(&format!("{d:?}"));
    assert_no_key(&format!("{:?}", rig.factory));
    assert!(!d.account().contains(KEY));
    assert!(d.account().contains(&rig.emu.base_url()));
    // An OEM that echoes the token in its message.
    rig.emu
        .fail_next_errno(1, 40256, &format!("bad token {KEY} for request"));
    let err = d.read_state(&[]).await.unwrap_err();
    assert!(
        err.raw.as_deref().unwrap().contains("<redacted>"),
        "{err:?}"
    );
    assert_err_has_no_key(&err);
    for status in [502, 503] {
        rig.emu.fail_next_status(1, status);
        assert_err_has_no_key(&d.read_state(&[]).await.unwrap_err());
    }
    let wrong = Rig::with(EmulatorConfig::new("other", &[SN]), KEY).await;
    assert_err_has_no_key(
        &wrong
            .driver_at(at(0, 0, 0))
            .read_state(&[])
            .await
            .unwrap_err(),
    );
    let ok = rig
        .driver_for(&req("s1", Command::Idle, at(0, 1, 0), Some(at(0, 2, 0))))
        .apply(&req("s1", Command::Idle, at(0, 1, 0), Some(at(0, 2, 0))))
        .await
        .unwrap();
    assert_no_key(&format!("{ok:?}"));
}

#[tokio::test]
async fn devices_on_one_account_share_the_account_name() {
    let rig = Rig::new().await;
    let a = rig.driver_at(at(0, 0, 0));
    let other = DeviceSpec {
        device_id: "dev-2",
        family: Family::Battery,
        oem_device_id: "SN2",
        timezone: TZ,
        settings: &rig.settings,
    };
    let b = rig.factory.build(&other).unwrap();
    assert_eq!(a.account(), b.account());
}

#[test]
fn an_https_base_url_builds_a_tls_client() {
    let secrets = secrets_with(KEY);
    let mut s = base_settings();
    s.insert("api_key_ref".into(), format!("file:{KEY_FILE}"));
    // Building sets up rustls (ring, bundled roots); no network needed. The
    // FoxESS cloud needs no operator allow-list entry.
    let d = FoxessFactory::default()
        .with_policy(policy(secrets.path(), &[]))
        .build(&spec(&s, Family::Battery))
        .unwrap();
    assert_eq!(
        d.account(),
        format!("foxess:{FOXESS_CLOUD}#file:{KEY_FILE}")
    );
}

// ---------------------------------------------------------------- redirects & echoes

#[tokio::test]
async fn a_redirect_is_never_followed() {
    // Where a follower would go: an emulator that accepts the same key.
    let elsewhere = Emulator::start(EmulatorConfig::new(KEY, &[SN]))
        .await
        .unwrap();
    let mut config = EmulatorConfig::new(KEY, &[SN]);
    config.redirect_to = Some(format!("{}{PATH_GET_FLAG}", elsewhere.base_url()));
    let rig = Rig::with(config, KEY).await;
    let r = req("rd1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&r);
    let errors = [
        d.read_state(&[]).await.unwrap_err(),
        d.apply(&r).await.unwrap_err(),
        d.revert(&RevertRequest {
            applied: r,
            memo: None,
        })
        .await
        .unwrap_err(),
    ];
    for err in &errors {
        assert_eq!(err.kind, ErrorKind::Rejected, "{err:?}");
        assert!(!err.retryable());
        assert!(err.message.contains("redirect"), "{err:?}");
        assert!(err.raw.as_deref().unwrap().contains("HTTP 307"), "{err:?}");
        assert_err_has_no_key(err);
    }
    // One call per driver call reached the first emulator (the apply's
    // plant time zone lookup first, which gives up on the redirect), each
    // answered with the redirect; the second one heard nothing at all.
    let calls = rig.emu.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls.iter().all(|c| c.status == 307), "{calls:?}");
    assert_eq!(elsewhere.calls(), vec![], "a redirect was followed");
}

#[tokio::test]
async fn an_echoed_key_is_redacted_from_outcomes_state_and_errors() {
    // A short key, and one longer than the part of an answer the driver
    // keeps (a key cut before redaction would leak its first part).
    for key in [KEY.to_owned(), long_key()] {
        let mut config = EmulatorConfig::new(key.clone(), &[SN]);
        config.echo_token = true;
        let rig = Rig::with(config, &key).await;
        rig.emu
            .seed_groups(SN, vec![g(12, 0, 13, 0, WorkMode::SelfUse)]);
        let r = req("e1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
        let d = rig.driver_for(&r);

        let out = d.apply(&r).await.unwrap();
        assert!(out.verified, "{out:?}");
        // The emulator echoed the key in every answer; it shows redacted.
        assert!(out.raw.contains("(token <redacted>)"), "{out:?}");
        assert_no_trace(&format!("{out:?}"), &key);
        let state = out.state.clone().expect("apply read the state back");
        assert_eq!(state.native_scheduler.as_ref().unwrap().1.len(), 2);
        assert_no_trace(&format!("{state:?}"), &key);

        let read = d.read_state(&[]).await.unwrap();
        assert_eq!(read, state);
        assert_no_trace(&format!("{read:?}"), &key);

        let back = d
            .revert(&RevertRequest {
                applied: r,
                memo: None,
            })
            .await
            .unwrap();
        assert!(back.raw.contains("(token <redacted>)"), "{back:?}");
        assert_no_trace(&format!("{back:?}"), &key);

        // Refusals echo it too, and a long message is cut where the key
        // was (176 + " (token " puts the cut 16 characters into it).
        for msg in [
            "parameters do not meet expectations".to_owned(),
            "x".repeat(176),
        ] {
            rig.emu.fail_next_errno(1, 40257, &msg);
            let err = d.read_state(&[]).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Rejected, "{err:?}");
            for text in [format!("{err:?}"), err.to_string()] {
                assert_no_trace(&text, &key);
            }
        }
    }
}

// ---------------------------------------------------------------- errnos, headers, pacing

/// The `User-Agent` the driver sends.
fn user_agent() -> String {
    format!("switchyard/{}", env!("CARGO_PKG_VERSION"))
}

/// The emulator's answers to `path`, in order: (errno, timestamp header).
fn answers(emu: &EmulatorHandle, path: &str) -> Vec<(Option<i64>, Option<i64>)> {
    emu.calls()
        .into_iter()
        .filter(|c| c.path == path)
        .map(|c| (c.errno, c.timestamp))
        .collect()
}

#[tokio::test]
async fn an_expired_signature_is_signed_again_once_with_a_fresh_timestamp() {
    let rig = Rig::new().await;
    rig.emu.fail_next_errno(1, 41809, "invalid token");
    let state = rig.driver_at(at(0, 0, 0)).read_state(&[]).await.unwrap();
    assert_eq!(state.native_scheduler, Some((false, vec![])));
    let flag = answers(&rig.emu, PATH_GET_FLAG);
    assert_eq!(flag.len(), 2, "{flag:?}");
    assert_eq!((flag[0].0, flag[1].0), (Some(41809), Some(0)));
    // Signed again with a new timestamp, taken after the interface's
    // one-second spacing.
    let (first, again) = (flag[0].1.unwrap(), flag[1].1.unwrap());
    assert!(again - first >= 1000, "{first} then {again}");
}

#[tokio::test]
async fn an_expired_signature_twice_is_a_retryable_failure() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    rig.emu.fail_next_errno(2, 41809, "invalid token");
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err:?}");
    assert!(err.retryable());
    assert_eq!(err.code(), "OEM_UNAVAILABLE");
    let raw = err.raw.as_deref().unwrap();
    assert!(
        raw.contains("errno 41809") && raw.contains("fresh timestamp"),
        "{raw}"
    );
    // Signed again once, not more.
    let flag: Vec<_> = answers(&rig.emu, PATH_GET_FLAG)
        .into_iter()
        .map(|(errno, _)| errno)
        .collect();
    assert_eq!(flag, [Some(41809); 2]);
    assert_eq!(rig.emu.calls().len(), 2);
    d.read_state(&[]).await.unwrap();
}

#[tokio::test]
async fn a_refused_token_is_oem_credentials_invalid_and_not_retried() {
    let rig = Rig::new().await;
    let d = rig.driver_at(at(0, 0, 0));
    for errno in [41807, 41808] {
        let before = rig.emu.calls().len();
        rig.emu.fail_next_errno(1, errno, "invalid token");
        let err = d.read_state(&[]).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Credentials, "{errno}: {err:?}");
        assert_eq!(err.code(), "OEM_CREDENTIALS_INVALID");
        assert!(!err.retryable() && err.retry_after.is_none(), "{err:?}");
        assert!(
            err.raw
                .as_deref()
                .unwrap()
                .contains(&format!("errno {errno}")),
            "{err:?}"
        );
        assert_err_has_no_key(&err);
        // One call, not signed again like 41809.
        assert_eq!(rig.emu.calls().len(), before + 1, "{errno}");
    }
}

#[tokio::test]
async fn settings_refused_while_the_scheduler_is_active_are_scheduler_active() {
    let rig = Rig::new().await;
    rig.emu
        .fail_next_errno(1, 44096, "cannot update settings when schedule is active");
    let err = rig
        .driver_at(at(0, 0, 0))
        .read_state(&[])
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::SchedulerActive, "{err:?}");
    assert_eq!(err.code(), "SCHEDULER_ACTIVE");
    assert!(!err.retryable());
    assert!(
        err.raw.as_deref().unwrap().contains("errno 44096"),
        "{err:?}"
    );
}

/// From `t` to the next midnight UTC.
fn to_utc_midnight(t: Timestamp) -> Duration {
    let utc = TimeZone::UTC;
    let next = utc
        .to_timestamp(utc.to_datetime(t).date().tomorrow().unwrap().at(0, 0, 0, 0))
        .unwrap();
    Duration::try_from(t.duration_until(next)).unwrap()
}

#[tokio::test]
async fn a_spent_daily_budget_backs_off_until_the_next_utc_midnight() {
    let rig = Rig::new().await;
    rig.emu.set_calls_per_day(0);
    let before = Timestamp::now();
    // The emulator's own answer, not an injected one.
    let err = rig
        .driver_at(at(0, 0, 0))
        .read_state(&[])
        .await
        .unwrap_err();
    let after = Timestamp::now();
    assert_eq!(err.kind, ErrorKind::RateLimited, "{err:?}");
    assert!(err.retryable());
    assert!(
        err.raw.as_deref().unwrap().contains("errno 40402"),
        "{err:?}"
    );
    let wait = err.retry_after.unwrap();
    let (most, least) = (to_utc_midnight(before), to_utc_midnight(after));
    // (A run straddling midnight UTC proves nothing: skip the bounds.)
    if least <= most {
        let ms = Duration::from_millis(1);
        assert!(
            least.saturating_sub(ms) <= wait && wait <= most + ms,
            "{wait:?} not within {least:?}..={most:?}"
        );
    }
    assert_eq!(rig.emu.calls().len(), 1, "not retried");
}

#[tokio::test]
async fn a_query_a_second_per_path_and_frequency_too_high_waits_a_minute() {
    let rig = Rig::new().await;
    rig.emu.set_query_interval(Duration::from_secs(1));
    let d = rig.driver_at(at(0, 0, 0));
    // The flag and the groups are two paths: one call each passes.
    d.read_state(&[]).await.unwrap();
    // The flag again at once: 40400 from the emulator.
    let err = d.read_state(&[]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::RateLimited, "{err:?}");
    assert!(err.retryable());
    assert_eq!(err.retry_after, Some(Duration::from_secs(60)));
    assert!(
        err.raw.as_deref().unwrap().contains("errno 40400"),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(1050)).await;
    d.read_state(&[]).await.unwrap();

    // Updates: one per 2 s per path, whatever the device's own spacing.
    rig.emu.set_query_interval(Duration::ZERO);
    rig.emu.set_write_interval(Duration::from_secs(2));
    let a = req("q1", Command::Charge, at(0, 2, 0), Some(at(0, 3, 0)));
    rig.driver_for(&a).apply(&a).await.unwrap();
    let b = req("q2", Command::Charge, at(0, 4, 0), Some(at(0, 5, 0)));
    let err = rig.driver_for(&b).apply(&b).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::RateLimited, "{err:?}");
    assert!(
        err.raw.as_deref().unwrap().contains("errno 40400"),
        "{err:?}"
    );
}

#[tokio::test]
async fn every_call_carries_the_switchyard_user_agent() {
    let rig = Rig::new().await;
    // The rig's emulator refuses a call without one (errno 40256).
    assert!(EmulatorConfig::new(KEY, &[SN]).require_user_agent);
    let r = req("u1", Command::Charge, at(0, 2, 0), Some(at(0, 5, 0)));
    let d = rig.driver_for(&r);
    assert!(d.apply(&r).await.unwrap().verified);
    d.revert(&RevertRequest {
        applied: r,
        memo: None,
    })
    .await
    .unwrap();
    let calls = rig.emu.calls();
    assert!(calls.len() >= 6, "{calls:?}");
    for c in &calls {
        assert_eq!(c.errno, Some(0), "{c:?}");
        assert_eq!(
            c.user_agent.as_deref(),
            Some(user_agent().as_str()),
            "{c:?}"
        );
    }
}

#[tokio::test]
async fn the_driver_paces_each_path_as_the_cloud_allows_so_nothing_is_refused_for_frequency() {
    let mut rig = Rig::new().await;
    // The cloud's limits: one query a second and one update every 2 s per
    // path, per key; the driver's defaults keep to them.
    rig.emu.set_query_interval(Duration::from_secs(1));
    rig.emu.set_write_interval(Duration::from_secs(2));
    rig.settings.remove("min_query_interval_ms");
    rig.settings.remove("min_update_interval_ms");
    let started = std::time::Instant::now();
    let d = rig.driver_at(at(0, 1, 0));
    d.read_state(&[]).await.unwrap();
    let r = req("p1", Command::Charge, at(0, 1, 0), Some(at(0, 2, 0)));
    // An apply reads the flag and the groups again right after the read
    // above, writes, and reads back: each path waits its turn.
    let out = d.apply(&r).await.unwrap();
    assert!(out.verified, "{out:?}");
    let refused: Vec<_> = rig
        .emu
        .calls()
        .into_iter()
        .filter(|c| c.errno != Some(0))
        .collect();
    assert!(refused.is_empty(), "refused for frequency: {refused:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the second read of a path waited"
    );
}
