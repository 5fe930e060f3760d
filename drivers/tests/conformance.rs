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
    ApplyRequest, Command, DeviceSpec, DeviceState, Driver, DriverError, DriverFactory, ErrorKind,
    Family, OperatorPolicy, Outcome, Params, Quantity, RevertRequest, RowOwner, TimingShape, Unit,
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
    /// Makes the OEM refuse the next calls for good (or stops that).
    async fn set_refusal(&self, on: bool);
    /// A secret the driver holds, which must never show.
    fn secret(&self) -> Option<String>;
}

/// Everything the suite saw come out of a driver, as text: the `Debug` of
/// every outcome, state and error, and every error's `Display`.
#[derive(Debug, Default)]
struct Seen {
    outcomes: usize,
    states: usize,
    errors: usize,
    texts: Vec<String>,
}

impl Seen {
    fn outcome(&mut self, o: &Outcome) {
        self.outcomes += 1;
        self.texts.push(format!("{o:?}"));
        if let Some(s) = &o.state {
            self.state(s);
        }
    }

    fn state(&mut self, s: &DeviceState) {
        self.states += 1;
        self.texts.push(format!("{s:?}"));
    }

    fn error(&mut self, e: &DriverError) {
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
    fn trace_of(&self, secret: &str) -> Option<(String, &str)> {
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

/// The suite. Returns everything it saw, for a harness's own checks.
async fn conformance(h: &dyn Harness) -> Seen {
    let mut seen = Seen::default();
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
        seen.outcome(&out);
        let rev = RevertRequest {
            applied: req.clone(),
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
    let state = d.read_state().await.unwrap();
    seen.state(&state);
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
        seen.state(&state);
        assert!(state.scheduler_active(), "{state:?}");
        let req = request("conf-native", Command::Charge, Some(1000.0), false);
        let e = d.apply(&req).await.unwrap_err();
        seen.error(&e);
        assert_eq!(e.kind, ErrorKind::SchedulerActive, "{e}");
        assert!(!e.rows.is_empty(), "the native rows are named");
        assert!(e.rows.iter().any(|r| r.owner == RowOwner::Foreign));
        let req = request("conf-native", Command::Charge, Some(1000.0), true);
        seen.outcome(&d.apply(&req).await.unwrap());
        seen.outcome(&d.revert(&RevertRequest { applied: req }).await.unwrap());
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
    seen.error(&e);
    assert!(e.retryable(), "{e:?}");
    assert_eq!(e.code(), "OEM_UNAVAILABLE");
    h.set_outage(false).await;

    // A refusal is final: not retryable.
    h.set_refusal(true).await;
    let d = h.driver();
    let req = request("conf-refused", Command::Charge, Some(1000.0), false);
    let e = d.apply(&req).await.unwrap_err();
    seen.error(&e);
    assert!(!e.retryable(), "{e:?}");
    assert_eq!(e.code(), "OEM_REJECTED", "{e:?}");
    seen.result(&d.read_state().await, Seen::state);
    h.set_refusal(false).await;

    let d = h.driver();
    let req = request("conf-after", Command::Idle, None, false);
    seen.outcome(&d.apply(&req).await.unwrap());
    seen.outcome(&d.revert(&RevertRequest { applied: req }).await.unwrap());
    // A command the device cannot carry out, whichever way it fails.
    let bad = d
        .apply(&request("conf-bad", Command::Charge, Some(1e12), false))
        .await;
    seen.result(&bad, Seen::outcome);
    seen.result(&d.read_state().await, Seen::state);

    // Secrets never show: not in the driver's Debug or account, nor in any
    // outcome, state or error above. The suite must have seen all three.
    assert!(
        seen.outcomes > 0 && seen.states > 0 && seen.errors > 0,
        "{seen:?}"
    );
    seen.texts.push(format!("{d:?}"));
    seen.texts.push(d.account());
    if let Some(secret) = h.secret()
        && let Some((piece, text)) = seen.trace_of(&secret)
    {
        panic!("the secret leaked ({piece:?}) into: {text}");
    }
    seen
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

    async fn set_refusal(&self, on: bool) {
        self.set("fail_mode", on.then_some("reject"));
    }

    fn secret(&self) -> Option<String> {
        None
    }
}

#[tokio::test]
async fn simulated_passes_the_conformance_suite() {
    let seen = conformance(&Sim::new()).await;
    assert!(seen.errors > 0);
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
            ("request_timeout_ms".to_owned(), "2000".to_owned()),
        ]);
        Self {
            emu,
            factory: FoxessFactory::default().with_policy(policy),
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
}

#[tokio::test]
async fn foxess_passes_the_conformance_suite_against_the_emulator() {
    let seen = conformance(&Fox::new().await).await;
    // The emulator did echo the key, and the driver redacted it: the secret
    // check above was not vacuous.
    assert!(
        seen.texts.iter().any(|t| t.contains("(token <redacted>)")),
        "{seen:?}"
    );
}
