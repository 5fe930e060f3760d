//! The driver conformance suite: one set of behaviour checks that every
//! driver must pass, picked by what its capabilities declare (a driver
//! without a native scheduler skips the scheduler checks, and so on).
//!
//! Each driver plugs in through a [`Harness`] that can build its driver
//! and steer the device behind it (a simulated device, an OEM emulator).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use switchyard_drivers::{
    ApplyRequest, Command, DeviceSpec, Driver, DriverFactory, ErrorKind, Family, Params, Quantity,
    RevertRequest, RowOwner, TimingShape, Unit,
    foxess::{
        FoxessFactory,
        emulator::{Emulator, EmulatorConfig, EmulatorHandle},
        wire::Group,
    },
    simulated::SimulatedFactory,
};

/// Steers one driver's device for the suite.
#[async_trait]
trait Harness: Send + Sync {
    /// A driver for the device as it is now.
    fn driver(&self) -> Arc<dyn Driver>;
    /// Turns a foreign, enabled native schedule covering the test window
    /// on (or off). Only called when the driver declares a native
    /// scheduler.
    async fn set_foreign_schedule(&self, on: bool);
    /// Makes the next calls fail as a temporary OEM outage (or stops
    /// that).
    async fn set_outage(&self, on: bool);
    /// A secret the driver holds, which must never show.
    fn secret(&self) -> Option<String>;
}

/// The next whole minute, for an hour: what the dispatcher would apply
/// now.
fn window() -> (jiff::Timestamp, jiff::Timestamp) {
    let now = jiff::Timestamp::now().as_second();
    let start = now - now.rem_euclid(60) + 60;
    (
        jiff::Timestamp::from_second(start).unwrap(),
        jiff::Timestamp::from_second(start + 3600).unwrap(),
    )
}

fn request(id: &str, command: Command, power_w: Option<f64>, clear: bool) -> ApplyRequest {
    let (start, end) = window();
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
    }
}

/// The suite.
async fn conformance(h: &dyn Harness) {
    let d = h.driver();
    let caps = d.capabilities().clone();

    // Capabilities are coherent.
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

    // Every windowed command applies, reverts, and reverts again
    // (idempotent), each answered with the OEM's raw words.
    for (i, c) in caps.commands.iter().enumerate() {
        if !c.timing.contains(&TimingShape::Windowed) {
            continue;
        }
        let power = c
            .params
            .iter()
            .find(|p| p.param == switchyard_drivers::Param::Power)
            .map(|p| p.min.max(1.0).max(p.max / 2.0));
        let req = request(&format!("conf-{i}"), c.command, power, false);
        let out = d
            .apply(&req)
            .await
            .unwrap_or_else(|e| panic!("apply {:?}: {e}", c.command));
        assert!(!out.raw.is_empty(), "the OEM's answer is kept");
        let rev = RevertRequest {
            applied: req.clone(),
        };
        d.revert(&rev)
            .await
            .unwrap_or_else(|e| panic!("revert {:?}: {e}", c.command));
        d.revert(&rev)
            .await
            .unwrap_or_else(|e| panic!("second revert {:?}: {e}", c.command));
    }
    let state = d.read_state().await.unwrap();
    if caps.native_scheduler {
        let (_, rows) = state
            .native_scheduler
            .clone()
            .expect("native scheduler state");
        assert!(
            rows.iter().all(|r| r.owner != RowOwner::Ours),
            "every row we wrote was reverted: {rows:?}"
        );
    }

    // A native scheduler blocks a plain apply with SchedulerActive and the
    // rows; CANCEL_AND_REPLACE's authorisation clears it.
    if caps.native_scheduler {
        h.set_foreign_schedule(true).await;
        let d = h.driver();
        let state = d.read_state().await.unwrap();
        assert!(state.scheduler_active(), "{state:?}");
        let req = request("conf-native", Command::Charge, Some(1000.0), false);
        let e = d.apply(&req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::SchedulerActive, "{e}");
        assert!(!e.rows.is_empty(), "the native rows are named");
        assert!(e.rows.iter().any(|r| r.owner == RowOwner::Foreign));
        let req = request("conf-native", Command::Charge, Some(1000.0), true);
        d.apply(&req).await.unwrap();
        d.revert(&RevertRequest { applied: req }).await.unwrap();
        h.set_foreign_schedule(false).await;
    }

    // An outage is a retryable failure, and the driver works again after.
    h.set_outage(true).await;
    let d = h.driver();
    let e = d
        .apply(&request(
            "conf-outage",
            Command::Charge,
            Some(1000.0),
            false,
        ))
        .await
        .unwrap_err();
    assert!(e.retryable(), "{e:?}");
    assert_eq!(e.code(), "OEM_UNAVAILABLE");
    h.set_outage(false).await;
    let d = h.driver();
    let req = request("conf-after", Command::Idle, None, false);
    d.apply(&req).await.unwrap();
    d.revert(&RevertRequest { applied: req }).await.unwrap();

    // Secrets never show.
    if let Some(secret) = h.secret() {
        assert!(!format!("{d:?}").contains(&secret));
        let e = d
            .apply(&request("conf-bad", Command::Charge, Some(1e12), false))
            .await
            .err();
        if let Some(e) = e {
            assert!(!format!("{e:?}").contains(&secret));
        }
    }
}

// --- simulated --------------------------------------------------------------

struct Sim {
    factory: SimulatedFactory,
    settings: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Sim {
    fn new() -> Self {
        Self {
            factory: SimulatedFactory::default(),
            settings: std::sync::Mutex::new(BTreeMap::from([("latency_ms".into(), "0".into())])),
        }
    }

    fn set(&self, key: &str, value: Option<&str>) {
        let mut s = self.settings.lock().unwrap();
        match value {
            Some(v) => s.insert(key.into(), v.into()),
            None => s.remove(key),
        };
    }
}

#[async_trait]
impl Harness for Sim {
    fn driver(&self) -> Arc<dyn Driver> {
        let settings = self.settings.lock().unwrap().clone();
        self.factory
            .build(&DeviceSpec {
                device_id: "conformance",
                family: Family::Battery,
                oem_device_id: "SIM-1",
                timezone: "Europe/London",
                settings: &settings,
            })
            .unwrap()
    }

    async fn set_foreign_schedule(&self, on: bool) {
        self.set("native_scheduler_active", on.then_some("true"));
    }

    async fn set_outage(&self, on: bool) {
        self.set("fail_mode", on.then_some("unavailable"));
    }

    fn secret(&self) -> Option<String> {
        None
    }
}

#[tokio::test]
async fn simulated_passes_the_conformance_suite() {
    conformance(&Sim::new()).await;
}

// --- foxess, against the emulator --------------------------------------------

const FOX_KEY: &str = "conformance-secret-4b7e";

struct Fox {
    emu: EmulatorHandle,
    factory: FoxessFactory,
    settings: BTreeMap<String, String>,
    _key: tempfile::NamedTempFile,
}

impl Fox {
    async fn new() -> Self {
        use std::io::Write as _;
        let mut config = EmulatorConfig::new(FOX_KEY, &["CONF-SN"]);
        config.min_write_interval = std::time::Duration::ZERO;
        let emu = Emulator::start(config).await.unwrap();
        let mut key = tempfile::NamedTempFile::new().unwrap();
        writeln!(key, "{FOX_KEY}").unwrap();
        let settings = BTreeMap::from([
            ("base_url".to_owned(), emu.base_url()),
            (
                "api_key_ref".to_owned(),
                format!("file:{}", key.path().display()),
            ),
            ("min_write_interval_ms".to_owned(), "0".to_owned()),
            ("request_timeout_ms".to_owned(), "2000".to_owned()),
        ]);
        Self {
            emu,
            factory: FoxessFactory::default(),
            settings,
            _key: key,
        }
    }
}

#[async_trait]
impl Harness for Fox {
    fn driver(&self) -> Arc<dyn Driver> {
        self.factory
            .build(&DeviceSpec {
                device_id: "conformance",
                family: Family::Battery,
                oem_device_id: "CONF-SN",
                timezone: "Europe/Berlin",
                settings: &self.settings,
            })
            .unwrap()
    }

    async fn set_foreign_schedule(&self, on: bool) {
        // The homeowner's app: self-use all day, scheduler on.
        let groups = if on {
            vec![Group {
                enable: 1,
                start_hour: 0,
                start_minute: 0,
                end_hour: 23,
                end_minute: 59,
                work_mode: "SelfUse".into(),
                min_soc_on_grid: 10,
                fd_soc: 20,
                fd_pwr: 3000,
            }]
        } else {
            vec![]
        };
        self.emu.seed_groups("CONF-SN", groups);
        self.emu.set_flag("CONF-SN", on);
    }

    async fn set_outage(&self, on: bool) {
        if on {
            self.emu.fail_next_status(1000, 503);
        } else {
            self.emu.clear_faults();
        }
    }

    fn secret(&self) -> Option<String> {
        Some(FOX_KEY.to_owned())
    }
}

#[tokio::test]
async fn foxess_passes_the_conformance_suite_against_the_emulator() {
    conformance(&Fox::new().await).await;
}
