//! Both built-in drivers against the conformance suite
//! (`switchyard_drivers::conformance`): one test per rule and driver, e.g.
//! `foxess::outage_is_retryable`. Each driver plugs in through a
//! [`Harness`] that builds its driver, steers the device behind it (a
//! simulated device, the FoxESS emulator) and pins the time.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use jiff::Timestamp;
use switchyard_drivers::{
    DeviceSpec, Driver, DriverFactory, Family, OperatorPolicy,
    conformance::Harness,
    foxess::{
        FoxessFactory,
        emulator::{Emulator, EmulatorConfig, EmulatorHandle},
        wire::Group,
    },
    simulated::SimulatedFactory,
};

/// The time it is for both drivers: a morning, so the suite's hour-long
/// window stays within one local day in London and Berlin.
fn pinned_now() -> Timestamp {
    "2030-01-15T09:00:30Z".parse().unwrap()
}

switchyard_drivers::conformance_suite!(simulated, Sim::new());
switchyard_drivers::conformance_suite!(foxess, Fox::new().await);

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

    fn now(&self) -> Timestamp {
        // The simulated driver does not read the time.
        pinned_now()
    }

    async fn set_foreign_schedule(&self, on: bool) {
        self.set("native_scheduler_active", on.then_some("true"));
    }

    async fn set_outage(&self, on: bool) {
        self.set("fail_mode", on.then_some("unavailable"));
    }

    async fn set_refusal(&self, on: bool) {
        self.set("fail_mode", on.then_some("reject"));
    }

    fn secret(&self) -> Option<String> {
        None
    }

    fn checks_fences(&self) -> bool {
        true
    }
}

// --- foxess, against the emulator --------------------------------------------

/// The API key: longer than the part of an answer the driver keeps, so an
/// echo cut before redaction would leak its first part.
fn fox_key() -> String {
    const ALPHABET: &[u8; 32] = b"ghjkmnpqrstvwxyzGHJKMNPQRSTVWXYZ";
    let mut x: u32 = 0x2545_f491;
    (0..240)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(ALPHABET[x as usize % ALPHABET.len()])
        })
        .collect()
}

struct Fox {
    emu: EmulatorHandle,
    factory: FoxessFactory,
    settings: BTreeMap<String, String>,
    _secrets: tempfile::TempDir,
}

impl Fox {
    async fn new() -> Self {
        let mut config = EmulatorConfig::new(fox_key(), &["CONF-SN"]);
        config.min_write_interval = std::time::Duration::ZERO;
        config.query_interval = std::time::Duration::ZERO;
        config.write_interval = std::time::Duration::ZERO;
        // Like an OEM that echoes the key in every answer, successes
        // included: what the driver hands out must still not hold it.
        config.echo_token = true;
        let emu = Emulator::start(config).await.unwrap();
        // The operator's secrets directory and allow-list.
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(
            secrets.path().join("foxess-key"),
            format!("{}\n", fox_key()),
        )
        .unwrap();
        let policy = OperatorPolicy {
            secrets_dir: Some(secrets.path().to_path_buf()),
            url_allow: vec![emu.base_url()],
        };
        let settings = BTreeMap::from([
            ("base_url".to_owned(), emu.base_url()),
            ("api_key_ref".to_owned(), "file:foxess-key".to_owned()),
            ("min_write_interval_ms".to_owned(), "0".to_owned()),
            ("min_query_interval_ms".to_owned(), "0".to_owned()),
            ("min_update_interval_ms".to_owned(), "0".to_owned()),
            ("request_timeout_ms".to_owned(), "2000".to_owned()),
        ]);
        Self {
            emu,
            // The driver's clock reads the suite's time.
            factory: FoxessFactory::default()
                .with_policy(policy)
                .with_clock(Arc::new(pinned_now)),
            settings,
            _secrets: secrets,
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

    fn now(&self) -> Timestamp {
        pinned_now()
    }

    async fn set_foreign_schedule(&self, on: bool) {
        // The homeowner's app: self-use all day, scheduler on.
        let groups = if on {
            vec![Group::new(true, (0, 0), (23, 59), "SelfUse", 10, 20, 3000)]
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

    async fn set_refusal(&self, on: bool) {
        if on {
            self.emu
                .fail_next_errno(1000, 40257, "parameters do not meet expectations");
        } else {
            self.emu.clear_faults();
        }
    }

    fn secret(&self) -> Option<String> {
        Some(fox_key())
    }

    fn checks_fences(&self) -> bool {
        true
    }

    fn redacted_echo(&self) -> Option<String> {
        // The emulator echoes the key; what the driver hands out shows it
        // redacted.
        Some("(token <redacted>)".to_owned())
    }
}
