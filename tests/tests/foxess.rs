//! The `foxess` driver through the whole service: devices created over
//! gRPC with an `api_key_ref`, actions pushed over gRPC, the dispatcher
//! (driven by the manual clock) writing the FoxESS emulator's scheduler on
//! 127.0.0.1. Nothing sleeps waiting for a schedule.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, time::Duration};

use switchyard_drivers::foxess::{
    emulator::{Emulator, EmulatorConfig, EmulatorHandle},
    wire::{Group, PATH_SET, WorkMode},
};
use switchyard_proto::v1::{self as pb, ActionState as St, Command, ConflictStrategy as S};
use switchyard_tests::{TestServer, action, expect_error, push, window};
use tonic::Code;

const KEY: &str = "fx-e2e-SECRET-4f1c";
const SN: &str = "SN-E2E-1";
const H: i64 = 3600;

/// The test server's T0 (2030-01-01T00:00Z) is 01:00 in Berlin, so an
/// offset of `h` hours from T0 is local hour `h + 1`.
const TZ: &str = "Europe/Berlin";

struct Rig {
    srv: TestServer,
    emu: EmulatorHandle,
}

/// Another allowed endpoint (see [`Rig::with`]).
const OTHER_ENDPOINT: &str = "http://127.0.0.2:8";

/// The secret's name in the operator's secrets directory.
const KEY_FILE: &str = "foxess-key";

impl Rig {
    /// Passed groups read as stored: the emulator's clock is the real one,
    /// not the server's manual clock (the tests of that rule pin it).
    async fn new() -> Self {
        let mut config = EmulatorConfig::new(KEY, &[SN]);
        config.disable_passed = false;
        Self::with(config).await
    }

    async fn with(mut config: EmulatorConfig) -> Self {
        config.min_write_interval = Duration::ZERO;
        config.query_interval = Duration::ZERO;
        config.write_interval = Duration::ZERO;
        let emu = Emulator::start(config).await.unwrap();
        // The operator allows the emulator and provides the key.
        // A second endpoint the operator allows (nothing listens there):
        // a device can be pointed at it.
        let srv = TestServer::start_allowing(&[emu.base_url(), OTHER_ENDPOINT.to_owned()]).await;
        srv.write_secret(KEY_FILE, KEY);
        let settings = BTreeMap::from([
            ("base_url".to_owned(), emu.base_url()),
            ("api_key_ref".to_owned(), format!("file:{KEY_FILE}")),
            ("min_write_interval_ms".to_owned(), "0".to_owned()),
            ("min_query_interval_ms".to_owned(), "0".to_owned()),
            ("min_update_interval_ms".to_owned(), "0".to_owned()),
            ("request_timeout_ms".to_owned(), "5000".to_owned()),
        ]);
        srv.devices()
            .create_device(pb::CreateDeviceRequest {
                device_id: "fox".into(),
                device: Some(pb::Device {
                    family: pb::DeviceFamily::Battery as i32,
                    driver: "foxess".into(),
                    oem_device_id: SN.into(),
                    timezone: TZ.into(),
                    settings,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap();
        Self { srv, emu }
    }

    /// The native rows of the device's observed state, as the API shows
    /// them.
    async fn observed_rows(&self) -> Vec<pb::NativeScheduleRow> {
        self.srv
            .get_device("fox")
            .await
            .observed_state
            .expect("observed")
            .native_rows
    }

    /// The emulator's groups as (start, end, mode), sorted.
    fn windows(&self) -> Vec<(String, String, String)> {
        let mut w: Vec<_> = self
            .emu
            .groups(SN)
            .iter()
            .filter(|g| !g.is_placeholder())
            .map(|g| (g.start_hhmm(), g.end_excl_hhmm(), g.work_mode.clone()))
            .collect();
        w.sort();
        w
    }
}

fn w(s: &str, e: &str, m: WorkMode) -> (String, String, String) {
    (s.to_owned(), e.to_owned(), m.as_str().to_owned())
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

#[tokio::test]
async fn a_window_across_local_midnight_is_written_as_two_groups_and_removed_at_its_end() {
    let rig = Rig::new().await;
    let keep = g(10, 0, 11, 0, WorkMode::Feedin);
    rig.emu.seed_groups(SN, vec![keep.clone()]);
    // 23:00 → 01:00 local.
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 22 * H, 24 * H))
        .await;
    assert_eq!(a.state, St::Scheduled as i32);
    // Before its start nothing is written.
    rig.srv.dispatch_at(22 * H - 60).await;
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);

    rig.srv.dispatch_at(22 * H).await;
    let active = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert!(!active.oem_response.is_empty(), "the OEM's answer is kept");
    assert!(active.verified, "the groups were read back as written");
    assert_eq!(
        rig.windows(),
        vec![
            w("00:00", "01:00", WorkMode::ForceCharge),
            w("10:00", "11:00", WorkMode::Feedin),
            w("23:00", "24:00", WorkMode::ForceCharge),
        ]
    );

    rig.srv.dispatch_at(24 * H).await;
    let done = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(done.state, St::Completed as i32, "{done:?}");
    assert_eq!(
        rig.windows(),
        vec![w("10:00", "11:00", WorkMode::Feedin)],
        "the revert removes only our groups"
    );
    assert!(rig.emu.groups(SN).contains(&keep));
}

#[tokio::test]
async fn a_write_the_cloud_accepts_but_does_not_keep_is_active_yet_unverified() {
    let rig = Rig::new().await;
    rig.emu.set_ignore_writes(true);
    let a = rig
        .srv
        .book("fox", window(Command::Discharge, 2 * H, 3 * H))
        .await;
    rig.srv.dispatch_at(2 * H).await;
    let active = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert!(
        !active.verified,
        "accepted but not read back: the action must say so"
    );
    assert!(rig.windows().is_empty(), "the emulator kept nothing");

    rig.emu.set_ignore_writes(false);
    rig.srv.dispatch_at(3 * H).await;
    let done = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(done.state, St::Completed as i32, "{done:?}");
    assert!(done.verified, "the revert read back clean");
}

#[tokio::test]
async fn cancel_and_replace_clears_the_foxess_scheduler_keeping_what_does_not_collide() {
    let rig = Rig::new().await;
    let foreign = g(3, 0, 4, 0, WorkMode::SelfUse);
    let keep = g(10, 0, 11, 0, WorkMode::Feedin);
    rig.emu.seed_groups(SN, vec![foreign.clone(), keep.clone()]);
    rig.emu.set_flag(SN, true);
    rig.srv.dispatch().await; // observe: the scheduler is on

    let dev = rig.srv.get_device("fox").await;
    let observed = dev.observed_state.unwrap();
    assert!(observed.scheduler_active);
    assert_eq!(observed.native_rows.len(), 2);

    // 02:00 → 05:00 local, over the foreign 03:00-04:00 group.
    let charge = || window(Command::Charge, H, 4 * H);
    let st = rig.srv.refused(push("fox", charge(), S::Unspecified)).await;
    let d = expect_error(&st, Code::FailedPrecondition, "SCHEDULER_ACTIVE");
    let detail = d.scheduler.expect("SchedulerDetail");
    assert_eq!(detail.rows.len(), 2);
    assert!(
        detail
            .rows
            .iter()
            .all(|r| r.owner == pb::NativeRowOwner::Foreign as i32)
    );
    assert_eq!(detail.strategies, [S::CancelAndReplace as i32]);
    assert_eq!(rig.emu.groups(SN), vec![foreign.clone(), keep.clone()]);

    let a = rig
        .srv
        .pushed(push("fox", charge(), S::CancelAndReplace))
        .await;
    rig.srv.dispatch_at(H).await;
    let active = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert_eq!(
        rig.windows(),
        vec![
            w("02:00", "05:00", WorkMode::ForceCharge),
            w("10:00", "11:00", WorkMode::Feedin),
        ],
        "the colliding foreign group is cleared, the other kept"
    );
    // The device was observed again after clearing.
    let rows = rig.observed_rows().await;
    assert!(
        rows.iter()
            .any(|r| r.owner == pb::NativeRowOwner::Ours as i32 && r.start_time_of_day == "02:00"),
        "{rows:?}"
    );

    rig.srv.dispatch_at(4 * H).await;
    assert_eq!(
        rig.srv.get("fox", &a.action_id).await.state,
        St::Completed as i32
    );
    assert_eq!(rig.emu.groups(SN), vec![keep]);
    // A FoxESS revert hands back no state: the device is read again once
    // the revert is recorded (the observation pass ran before it, while
    // our group was still there), and our row is gone from what is shown.
    let rows = rig.observed_rows().await;
    assert!(
        rows.iter()
            .all(|r| r.owner != pb::NativeRowOwner::Ours as i32),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.start_time_of_day == "10:00"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_protected_backup_group_is_named_up_front_and_never_cleared() {
    let rig = Rig::new().await;
    let backup = g(3, 0, 4, 0, WorkMode::Backup);
    rig.emu.seed_groups(SN, vec![backup.clone()]);
    rig.emu.set_flag(SN, true);
    rig.srv.dispatch().await;
    // Even CANCEL_AND_REPLACE cannot clear it: refused at push, saying so.
    let over_backup = window(Command::Charge, H, 4 * H);
    let st = rig
        .srv
        .refused(push("fox", over_backup, S::CancelAndReplace))
        .await;
    let d = expect_error(&st, Code::FailedPrecondition, "SCHEDULER_ACTIVE");
    assert_eq!(d.meta("protected_row_count"), "1");
    let detail = d.scheduler.expect("SchedulerDetail");
    assert!(detail.strategies.is_empty(), "no strategy can clear it");
    assert_eq!(detail.rows[0].owner, pb::NativeRowOwner::Protected as i32);
    // A window clear of it can still clear the scheduler.
    let clear_of_backup = window(Command::Charge, 5 * H, 6 * H);
    let a = rig
        .srv
        .pushed(push("fox", clear_of_backup, S::CancelAndReplace))
        .await;
    rig.srv.dispatch_at(5 * H).await;
    assert_eq!(
        rig.srv.get("fox", &a.action_id).await.state,
        St::Active as i32
    );
    assert!(rig.emu.groups(SN).contains(&backup));
}

#[tokio::test]
async fn a_rate_limited_answer_backs_off_by_its_retry_after_then_applies() {
    let rig = Rig::new().await;
    rig.srv.dispatch().await;
    let a = rig.srv.book("fox", window(Command::Charge, H, 3 * H)).await;
    // The first call (the plant's time zone lookup) gives up quietly and
    // is asked again next time; the second (the flag) is the apply's.
    rig.emu.fail_next_errno(2, 40400, "request too frequent");
    rig.srv.at_secs(H);
    rig.srv.dispatcher().drain().await.unwrap();
    let waiting = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(waiting.state, St::Acknowledged as i32, "{waiting:?}");
    assert!(waiting.error_message.starts_with("retrying"), "{waiting:?}");
    assert!(waiting.error_code.is_empty());
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);

    // FoxESS gives no retry-after; the driver's is 60 s, longer than the
    // dispatcher's first backoff (2 s): nothing is tried before it.
    rig.srv.at_secs(H + 30);
    rig.srv.dispatcher().drain().await.unwrap();
    assert_eq!(rig.emu.successful_calls(PATH_SET), 0);
    assert_eq!(
        rig.srv.get("fox", &a.action_id).await.state,
        St::Acknowledged as i32
    );

    rig.srv.at_secs(H + 60);
    rig.srv.dispatcher().drain().await.unwrap();
    let active = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert!(active.error_message.is_empty());
    assert_eq!(
        rig.windows(),
        vec![w("02:00", "04:00", WorkMode::ForceCharge)]
    );
}

#[tokio::test]
/// A secret the operator removed after the device was created. (That the
/// key itself never shows is proved where it can show: tests/secrets.rs has
/// the OEM echo it.)
async fn a_key_removed_after_create_fails_the_action_as_misconfigured() {
    let rig = Rig::new().await;
    std::fs::remove_file(rig.srv.secrets.join(KEY_FILE)).unwrap();
    let a = rig.srv.book("fox", window(Command::Charge, 0, H)).await;
    rig.srv.dispatcher().drain().await.unwrap();
    let f = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(
        (f.state, f.error_code.as_str()),
        (St::Failed as i32, "DEVICE_MISCONFIGURED"),
        "{f:?}"
    );
    assert!(f.error_message.contains("api_key_ref"), "{f:?}");
    // One message whatever happened to the secret: nothing about files.
    assert!(
        f.error_message
            .contains(switchyard_drivers::operator::SECRET_REF_REFUSED),
        "{f:?}"
    );
    assert!(!f.error_message.contains(KEY_FILE), "{f:?}");
}

#[tokio::test]
async fn refused_or_unchanged_device_changes_make_no_oem_call() {
    let rig = Rig::new().await;
    let before = rig.emu.calls().len();
    let observed = rig.srv.get_device("fox").await.observed_state;
    assert!(observed.is_some(), "observed on create");
    // Creating it again: refused before any call to the OEM.
    let again = rig
        .srv
        .devices()
        .create_device(pb::CreateDeviceRequest {
            device_id: "fox".into(),
            device: rig.srv.get_device("fox").await.into(),
            request_id: String::new(),
        })
        .await
        .expect_err("exists");
    expect_error(&again, Code::AlreadyExists, "DEVICE_ALREADY_EXISTS");
    // A stale etag: refused before any call.
    let stale = rig
        .srv
        .devices()
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                device_id: "fox".into(),
                display_name: "x".into(),
                etag: "00000000-9".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .expect_err("stale");
    expect_error(&stale, Code::Aborted, "ETAG_MISMATCH");
    // A rename reaches the device the same way: it keeps what was observed
    // and reads nothing.
    let renamed = rig
        .srv
        .devices()
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                device_id: "fox".into(),
                display_name: "Garage inverter".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.observed_state, observed);
    assert_eq!(rig.emu.calls().len(), before, "{:?}", rig.emu.calls());
    // A settings change is a new configuration: read at once.
    let mut settings = renamed.settings.clone();
    settings.insert("fd_soc".into(), "25".into());
    rig.srv
        .devices()
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                device_id: "fox".into(),
                settings,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["settings".into()],
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();
    assert!(rig.emu.calls().len() > before, "read after the change");
}

// ---------------------------------------------------------------- field rules, end to end

/// The emulator's clock at `secs` after T0 (the server's manual clock).
fn emu_time(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(switchyard_tests::T0 + secs).unwrap()
}

#[tokio::test]
async fn an_overnight_window_is_verified_though_the_cloud_disables_its_passed_half() {
    let mut config = EmulatorConfig::new(KEY, &[SN]);
    config.disable_passed = true;
    config.plant_timezone = Some(TZ.to_owned());
    let rig = Rig::with(config).await;
    // 23:00 → 06:00 local.
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 22 * H, 29 * H))
        .await;
    rig.emu.set_now(Some(emu_time(22 * H)));
    rig.srv.dispatch_at(22 * H).await;
    let active = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert!(active.verified, "{active:?}");
    // What the cloud reports: the 00:00-06:00 half disabled (it has
    // passed today), both halves switchyard's.
    let rows = rig.observed_rows().await;
    assert!(
        rows.iter()
            .any(|r| r.start_time_of_day == "00:00" && !r.enabled),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.owner == pb::NativeRowOwner::Ours as i32),
        "{rows:?}"
    );
    rig.emu.set_now(Some(emu_time(29 * H)));
    rig.srv.dispatch_at(29 * H).await;
    let done = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(done.state, St::Completed as i32, "{done:?}");
    assert!(done.verified, "{done:?}");
    assert!(rig.windows().is_empty());
    assert!(!rig.emu.flag(SN), "the flag is left as it was found");
}

async fn update(rig: &Rig, device: pb::Device, path: &str) -> Result<pb::Device, tonic::Status> {
    rig.srv
        .devices()
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                device_id: "fox".into(),
                ..device
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![path.into()],
            }),
            request_id: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_device_change_while_a_write_is_in_force_is_carried_through_or_refused() {
    let rig = Rig::new().await;
    // 03:00 → 04:00 local.
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 2 * H, 3 * H))
        .await;
    rig.srv.dispatch_at(2 * H).await;
    assert_eq!(
        rig.srv.get("fox", &a.action_id).await.state,
        St::Active as i32
    );
    assert_eq!(
        rig.windows(),
        vec![w("03:00", "04:00", WorkMode::ForceCharge)]
    );
    // Another inverter: the revert could not reach this one. Refused,
    // naming the action.
    let st = update(
        &rig,
        pb::Device {
            oem_device_id: "SN-OTHER".into(),
            ..Default::default()
        },
        "oem_device_id",
    )
    .await
    .unwrap_err();
    let d = expect_error(&st, Code::FailedPrecondition, "DEVICE_HAS_ACTIVE_ACTIONS");
    assert!(d.meta("action_ids").contains(&a.action_id), "{d:?}");
    assert!(st.message().contains("still in force"), "{}", st.message());
    assert_eq!(rig.srv.get_device("fox").await.oem_device_id, SN);
    // Another endpoint: refused likewise. Another reference to the same
    // key (a rotated key file): accepted, the same inverter.
    let stored = rig.srv.get_device("fox").await.settings;
    let settings = |k: &str, v: &str| {
        let mut s = stored.clone();
        s.insert(k.to_owned(), v.to_owned());
        pb::Device {
            settings: s,
            ..Default::default()
        }
    };
    let st = update(&rig, settings("base_url", OTHER_ENDPOINT), "settings")
        .await
        .unwrap_err();
    expect_error(&st, Code::FailedPrecondition, "DEVICE_HAS_ACTIVE_ACTIONS");
    rig.srv.write_secret("foxess-key-2", KEY);
    let moved = update(
        &rig,
        settings("api_key_ref", "file:foxess-key-2"),
        "settings",
    )
    .await
    .unwrap();
    assert_eq!(moved.settings["api_key_ref"], "file:foxess-key-2");
    // Another time zone: carried through. The revert removes what was
    // written, not what the new zone would compute (02:00-03:00 UTC).
    update(
        &rig,
        pb::Device {
            timezone: "UTC".into(),
            ..Default::default()
        },
        "timezone",
    )
    .await
    .unwrap();
    rig.srv.dispatch_at(3 * H).await;
    let done = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(done.state, St::Completed as i32, "{done:?}");
    assert!(done.verified, "{done:?}");
    assert!(rig.windows().is_empty(), "{:?}", rig.windows());
    // Nothing in force now: the change is accepted.
    rig.emu.add_device("SN-OTHER");
    update(
        &rig,
        pb::Device {
            oem_device_id: "SN-OTHER".into(),
            ..Default::default()
        },
        "oem_device_id",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_daily_repeat_keeps_its_group_when_the_first_revert_runs_late() {
    let rig = Rig::new().await;
    // The same charge, 03:00 → 04:00 local, today and tomorrow: the same
    // group.
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 2 * H, 3 * H))
        .await;
    let b = rig
        .srv
        .book("fox", window(Command::Charge, 26 * H, 27 * H))
        .await;
    rig.srv.dispatch_at(2 * H).await;
    // Today's revert meets an outage and is retried ... (the first failure
    // is the observation that precedes the round.)
    rig.emu.fail_next_status(2, 503);
    rig.srv.dispatch_at(3 * H).await;
    let late = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(late.state, St::Active as i32, "{late:?}");
    assert!(late.error_message.starts_with("retrying"), "{late:?}");
    // ... and is still owed when tomorrow's apply is due: both are due in
    // one round and run in no set order (one takes the device's write
    // spacing and the other follows 5 s later). Either way tomorrow's
    // group must survive; the driver tests force each order.
    rig.srv.dispatch_at(26 * H).await;
    rig.srv.dispatch_at(26 * H + 10).await;
    let done = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(done.state, St::Completed as i32, "{done:?}");
    let active = rig.srv.get("fox", &b.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert!(active.verified, "{active:?}");
    assert_eq!(
        rig.windows(),
        vec![w("03:00", "04:00", WorkMode::ForceCharge)],
        "tomorrow's group survives today's revert"
    );
    assert!(rig.emu.flag(SN));
    rig.srv.dispatch_at(27 * H).await;
    assert_eq!(
        rig.srv.get("fox", &b.action_id).await.state,
        St::Completed as i32
    );
    assert!(rig.windows().is_empty());
    assert!(!rig.emu.flag(SN), "the homeowner's flag was off");
}

#[tokio::test]
async fn immediate_commands_hand_back_control_and_leave_nothing_behind() {
    let rig = Rig::new().await;
    // A forced mode has no end to remove it at: refused up front.
    for command in [Command::Charge, Command::AutoExport, Command::Idle] {
        let st = rig
            .srv
            .refused(push("fox", action(command, None, None), S::Unspecified))
            .await;
        expect_error(&st, Code::InvalidArgument, "UNSUPPORTED_TIMING");
    }
    // A window, cancelled while in force: its revert removes its group.
    let a = rig
        .srv
        .book("fox", window(Command::Discharge, H, 2 * H))
        .await;
    rig.srv.dispatch_at(H).await;
    assert_eq!(rig.windows().len(), 1);
    assert!(rig.emu.flag(SN));
    rig.srv.cancel("fox", &a.action_id).await;
    rig.srv.dispatch_at(H + 60).await;
    // AUTO_BALANCED now: the inverter follows its own schedule; nothing
    // is written, and the action completes.
    let auto = rig
        .srv
        .book("fox", action(Command::AutoBalanced, None, None))
        .await;
    rig.srv.dispatch_at(H + 120).await;
    let done = rig.srv.get("fox", &auto.action_id).await;
    assert_eq!(done.state, St::Completed as i32, "{done:?}");
    assert!(done.verified, "{done:?}");
    assert!(done.oem_response.contains("own schedule"), "{done:?}");
    assert!(rig.windows().is_empty(), "{:?}", rig.windows());
    assert!(!rig.emu.flag(SN), "the flag is back as it was found");
    // A later plain push needs no CANCEL_AND_REPLACE.
    let later = rig
        .srv
        .book("fox", window(Command::Charge, 3 * H, 4 * H))
        .await;
    assert_eq!(later.state, St::Scheduled as i32);
}

#[tokio::test]
async fn an_app_only_foreign_group_fails_the_action_with_a_typed_code_unless_cleared() {
    let rig = Rig::new().await;
    let mut app_only = g(6, 0, 7, 0, WorkMode::SelfUse);
    app_only.fd_soc = 10;
    app_only.fd_pwr = 0;
    rig.emu.seed_groups(SN, vec![app_only.clone()]);
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 2 * H, 3 * H))
        .await;
    rig.srv.dispatch_at(2 * H).await;
    let failed = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(failed.state, St::Failed as i32, "{failed:?}");
    assert_eq!(failed.error_code, "FOREIGN_SCHEDULE_UNWRITABLE");
    assert!(
        failed.error_message.contains("SelfUse 06:00-07:00"),
        "{failed:?}"
    );
    assert_eq!(rig.emu.groups(SN), vec![app_only]);
    let b = rig
        .srv
        .pushed(push(
            "fox",
            window(Command::Charge, 2 * H, 3 * H),
            S::CancelAndReplace,
        ))
        .await;
    // Past the device's write spacing.
    rig.srv.dispatch_at(2 * H + 10).await;
    let active = rig.srv.get("fox", &b.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert_eq!(
        rig.windows(),
        vec![w("03:00", "04:00", WorkMode::ForceCharge)]
    );
}

#[tokio::test]
async fn the_flag_switchyard_turned_on_never_refuses_a_later_push() {
    let rig = Rig::new().await;
    let foreign = g(10, 0, 11, 0, WorkMode::Feedin);
    rig.emu.seed_groups(SN, vec![foreign]);
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 2 * H, 3 * H))
        .await;
    rig.srv.dispatch_at(2 * H).await;
    rig.srv.dispatcher().observe_due(true).await.unwrap();
    let observed = rig.srv.get_device("fox").await.observed_state.unwrap();
    assert!(observed.scheduler_active, "the flag is on");
    // switchyard's own group, and a foreign one at another time of day:
    // neither refuses a push.
    let b = rig
        .srv
        .book("fox", window(Command::Discharge, 5 * H, 6 * H))
        .await;
    assert_eq!(b.state, St::Scheduled as i32);
    // A foreign group in the window does.
    let st = rig
        .srv
        .refused(push(
            "fox",
            window(Command::Charge, 9 * H, 10 * H),
            S::Unspecified,
        ))
        .await;
    expect_error(&st, Code::FailedPrecondition, "SCHEDULER_ACTIVE");
    assert_eq!(
        rig.srv.get("fox", &a.action_id).await.state,
        St::Active as i32
    );
}

#[tokio::test]
async fn a_write_whose_answer_was_lost_is_on_record_until_reverted() {
    let rig = Rig::new().await;
    // The group write lands, but its answer is a 502: the try fails
    // (retryable), and what it may have written is kept on record.
    rig.emu.lose_next_write_answers(1);
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 2 * H, 3 * H))
        .await;
    rig.srv.dispatch_at(2 * H).await;
    let trying = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(trying.state, St::Acknowledged as i32, "{trying:?}");
    assert!(trying.error_message.starts_with("retrying"), "{trying:?}");
    assert_eq!(
        rig.windows(),
        vec![w("03:00", "04:00", WorkMode::ForceCharge)],
        "the write landed"
    );
    // On record: the device cannot be pointed elsewhere meanwhile.
    let st = update(
        &rig,
        pb::Device {
            oem_device_id: "SN-OTHER".into(),
            ..Default::default()
        },
        "oem_device_id",
    )
    .await
    .unwrap_err();
    expect_error(&st, Code::FailedPrecondition, "DEVICE_HAS_ACTIVE_ACTIONS");
    // The retry finds the group in place; the revert removes it.
    rig.srv.dispatch_at(2 * H + 10).await;
    let active = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(active.state, St::Active as i32, "{active:?}");
    assert!(active.verified);
    rig.srv.dispatch_at(3 * H).await;
    assert!(rig.windows().is_empty());
    assert_eq!(
        rig.srv.get("fox", &a.action_id).await.state,
        St::Completed as i32
    );
}

#[tokio::test]
async fn an_apply_that_fails_for_good_after_writing_is_reverted() {
    let rig = Rig::new().await;
    // Another client rewrites the list after each of the apply's writes (a
    // write and a redo per try, five tries): OEM_CONCURRENT_WRITE in the
    // end; the writes may have landed, so a revert is owed and runs.
    let theirs = serde_json::json!({
        "enable": 1, "startHour": 5, "startMinute": 0, "endHour": 5, "endMinute": 29,
        "workMode": "Feedin", "minSocOnGrid": 10, "fdSoc": 20, "fdPwr": 1000
    });
    rig.emu.set_concurrent_writer(10, theirs);
    let a = rig
        .srv
        .book("fox", window(Command::Charge, 2 * H, 3 * H))
        .await;
    let mut t = 2 * H;
    while rig.srv.get("fox", &a.action_id).await.state != St::Failed as i32 {
        assert!(t < 2 * H + 600, "still not failed");
        rig.srv.dispatch_at(t).await;
        t += 20;
    }
    let failed = rig.srv.get("fox", &a.action_id).await;
    assert_eq!(failed.error_code, "OEM_CONCURRENT_WRITE", "{failed:?}");
    assert_eq!(rig.emu.concurrent_writes_left(), 0);
    // Our group is back on the inverter (the last clobber kept what was
    // there before our write, which by then included it) until the owed
    // revert removes it; theirs stays.
    rig.srv.dispatch_at(t + 20).await;
    let windows = rig.windows();
    assert!(windows.iter().all(|(_, _, m)| m == "Feedin"), "{windows:?}");
    assert_eq!(windows.len(), 1, "{windows:?}");
}
