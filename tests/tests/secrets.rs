//! A caller cannot reach the server's secrets or network: device settings
//! name only what the operator provided, and the OEM's echo of the API key
//! reaches no answer, error, audit row or log line. Against the real
//! binary (its log is read) and the FoxESS emulator on loopback.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, time::Duration};

use switchyard_drivers::foxess::emulator::{Emulator, EmulatorConfig};
use switchyard_proto::v1::{
    self as pb, ActionState as St, Command, action_service_client::ActionServiceClient,
    device_service_client::DeviceServiceClient,
};
use switchyard_tests::{Keyed, keyed};
use switchyard_tests::{ServerProcess, expect_error, push};
use tonic::Code;

const KEY: &str = "fx-SECRET-9d2e-never-shown";
const SN: &str = "SN-SEC-1";
const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

fn foxess(settings: &[(&str, &str)]) -> pb::CreateDeviceRequest {
    pb::CreateDeviceRequest {
        device_id: String::new(),
        device: Some(pb::Device {
            family: pb::DeviceFamily::Battery as i32,
            driver: "foxess".into(),
            oem_device_id: SN.into(),
            timezone: "Europe/Berlin".into(),
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

struct Rig {
    server: ServerProcess,
    /// Every call carries `api_key`.
    channel: Keyed,
    /// An API key of the default tenant with every scope but `admin`,
    /// made with the command line before the server started (so every
    /// call needs it).
    api_key: String,
    emu: switchyard_drivers::foxess::emulator::EmulatorHandle,
    _dir: tempfile::TempDir,
}

/// The server binary with a secrets directory holding the key, the
/// emulator allowed (paired with the key file's secret only, when
/// `paired`), and a variable that must never be reachable.
async fn rig(mut config: EmulatorConfig, paired: bool) -> Rig {
    config.query_interval = Duration::ZERO;
    config.write_interval = Duration::ZERO;
    let emu = Emulator::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("foxess-key"), format!("{KEY}\n")).unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let api_key = api_key(&db);
    let server = ServerProcess::spawn_with(
        BIN,
        &db,
        &[
            "--secrets-dir",
            secrets.to_str().unwrap(),
            "--oem-url-allow",
            &if paired {
                // The emulator may receive the key file's secret, no other.
                format!("{}=file:foxess-key", emu.base_url())
            } else {
                emu.base_url()
            },
        ],
        &[
            ("SWITCHYARD_LOG", "debug"),
            ("DATABASE_PASSWORD", KEY),
            ("SWITCHYARD_SECRET_FOX", KEY),
        ],
    );
    let channel = keyed(server.channel().await, &api_key);
    Rig {
        server,
        channel,
        api_key,
        emu,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_cannot_name_the_servers_secrets_or_hosts_and_refusals_reveal_nothing() {
    let mut r = rig(EmulatorConfig::new(KEY, &[SN]), false).await;
    let mut devices = DeviceServiceClient::new(r.channel.clone());
    let emu = r.emu.base_url();
    // Another local port: an attacker's listener, say.
    let elsewhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut descriptions = Vec::new();
    for key_ref in [
        "env:DATABASE_PASSWORD", // set on the server
        "env:NO_SUCH_VARIABLE",  // not set
        "env:HOME",
        "file:/etc/passwd",            // exists
        "file:/etc/no-such-file-here", // does not
        "file:../s.db",
        "file:..data",
        "file:nope", // allowed shape, but no such secret
        KEY,         // the key pasted itself
    ] {
        let st = devices
            .create_device(foxess(&[("base_url", &emu), ("api_key_ref", key_ref)]))
            .await
            .expect_err(key_ref);
        let d = expect_error(&st, Code::InvalidArgument, "INVALID_SETTINGS");
        let v = &d.bad_request.as_ref().unwrap().field_violations;
        assert_eq!(d.fields(), ["device.settings.api_key_ref"], "{key_ref}");
        let shown = format!("{st:?}");
        let named = key_ref.split_once(':').map_or(key_ref, |(_, name)| name);
        for part in [named].into_iter().filter(|p| p.len() > 3) {
            assert!(
                !shown.contains(part),
                "{key_ref}: the refusal repeats it: {shown}"
            );
        }
        assert!(!shown.contains(KEY));
        descriptions.push(v[0].description.clone());
    }
    descriptions.dedup();
    assert_eq!(
        descriptions.len(),
        1,
        "one message whatever exists: {descriptions:?}"
    );
    for url in [
        elsewhere.as_str(),
        "http://169.254.169.254/latest",
        "https://www.foxesscloud.com.evil.example",
    ] {
        let st = devices
            .create_device(foxess(&[
                ("base_url", url),
                ("api_key_ref", "file:foxess-key"),
            ]))
            .await
            .expect_err(url);
        let d = expect_error(&st, Code::InvalidArgument, "INVALID_SETTINGS");
        assert_eq!(d.fields(), ["device.settings.base_url"], "{url}");
    }
    // Nothing was created, and the emulator saw no request with the key
    // from any of this.
    let listed = devices
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.devices.is_empty());
    assert_eq!(r.emu.calls().len(), 0);
    // What the operator did provide works, both ways.
    for key_ref in ["file:foxess-key", "env:SWITCHYARD_SECRET_FOX"] {
        devices
            .create_device(foxess(&[("base_url", &emu), ("api_key_ref", key_ref)]))
            .await
            .unwrap_or_else(|e| panic!("{key_ref}: {e:?}"));
    }
    assert_no_secret_in_log(&mut r.server, &[KEY, &r.api_key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_goes_only_to_the_endpoints_the_operator_paired_it_with() {
    let mut r = rig(EmulatorConfig::new(KEY, &[SN]), true).await;
    let mut devices = DeviceServiceClient::new(r.channel.clone());
    let emu = r.emu.base_url();
    // The server holds SWITCHYARD_SECRET_FOX and allows the emulator, but
    // has not paired the two: a caller cannot send one to the other.
    let st = devices
        .create_device(foxess(&[
            ("base_url", &emu),
            ("api_key_ref", "env:SWITCHYARD_SECRET_FOX"),
        ]))
        .await
        .expect_err("not paired");
    let d = expect_error(&st, Code::InvalidArgument, "INVALID_SETTINGS");
    assert_eq!(d.fields(), ["device.settings.api_key_ref"]);
    assert_eq!(r.emu.calls().len(), 0, "nothing was sent to the emulator");
    // The paired secret goes to the emulator.
    devices
        .create_device(foxess(&[
            ("base_url", &emu),
            ("api_key_ref", "file:foxess-key"),
        ]))
        .await
        .unwrap();
    assert!(!r.emu.calls().is_empty(), "observed through the emulator");
    assert_no_secret_in_log(&mut r.server, &[KEY, &r.api_key]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oem_that_echoes_the_key_never_gets_it_shown_anywhere() {
    let mut config = EmulatorConfig::new(KEY, &[SN]);
    config.min_write_interval = Duration::ZERO;
    // Every answer, successes included, carries the token it received.
    config.echo_token = true;
    let mut r = rig(config, true).await;
    let mut devices = DeviceServiceClient::new(r.channel.clone());
    let mut actions = ActionServiceClient::new(r.channel.clone());
    let created = devices
        .create_device(foxess(&[
            ("base_url", &r.emu.base_url()),
            ("api_key_ref", "file:foxess-key"),
            ("min_write_interval_ms", "0"),
            ("min_query_interval_ms", "0"),
            ("min_update_interval_ms", "0"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let id = created.device_id.clone();
    assert!(
        created.observed_state.is_some(),
        "observed on create through the echoing emulator"
    );
    let done = push_and_settle(&mut actions, &id, Command::Charge).await;
    assert_eq!(done.state, St::Active as i32, "{done:?}");
    // The emulator really echoed the key, and what was kept says so.
    assert!(
        r.emu
            .calls()
            .iter()
            .all(|c| c.errno.is_some_and(|e| e != 40256)),
        "the key reached the allowed endpoint: {:?}",
        r.emu.calls()
    );
    assert!(
        done.oem_response.contains("<redacted>"),
        "{}",
        done.oem_response
    );
    // An error answer that echoes it too, on a second inverter (the first
    // one's channel is taken for the hour). Its apply's first call, the
    // plant lookup, gives up on a refusal; the second, the flag, fails it.
    r.emu.add_device("SN-SEC-2");
    let mut second = foxess(&[
        ("base_url", &r.emu.base_url()),
        ("api_key_ref", "file:foxess-key"),
        ("min_write_interval_ms", "0"),
        ("min_query_interval_ms", "0"),
        ("min_update_interval_ms", "0"),
    ]);
    if let Some(d) = second.device.as_mut() {
        d.oem_device_id = "SN-SEC-2".into();
    }
    let id2 = devices
        .create_device(second)
        .await
        .unwrap()
        .into_inner()
        .device_id;
    r.emu
        .fail_next_errno(2, 40257, &format!("bad request from {KEY}"));
    let failed = push_and_settle(&mut actions, &id2, Command::Idle).await;
    assert_eq!(failed.error_code, "OEM_REJECTED", "{failed:?}");

    // Nowhere: answers, listings, the device, errors.
    let everything = [
        format!("{done:?}{failed:?}"),
        format!(
            "{:?}",
            actions
                .list_actions(pb::ListActionsRequest {
                    device_id: "-".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
        ),
        format!(
            "{:?}",
            devices
                .get_device(pb::GetDeviceRequest {
                    device_id: id.clone(),
                })
                .await
                .unwrap()
        ),
    ];
    // A refusal of the API key names its id, never the key.
    let refused =
        switchyard_proto::v1::admin_service_client::AdminServiceClient::new(r.channel.clone())
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await
            .unwrap_err();
    let d = switchyard_tests::expect_error(&refused, Code::PermissionDenied, "MISSING_SCOPE");
    assert!(r.api_key.contains(d.meta("key_id")));
    let everything = everything.into_iter().chain([format!("{refused:?}{d:?}")]);
    let secret_part = r.api_key.rsplit('_').next().unwrap().to_owned();
    for text in everything {
        for secret in [KEY, &r.api_key, &secret_part] {
            assert!(!text.contains(secret), "a secret leaked: {text}");
        }
    }
    // Nor the audit trail or anything else in the database file.
    let db_bytes = std::fs::read(r._dir.path().join("s.db")).unwrap();
    let wal = std::fs::read(r._dir.path().join("s.db-wal")).unwrap_or_default();
    for bytes in [db_bytes, wal] {
        for secret in [KEY, &r.api_key, &secret_part] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is stored in the database"
            );
        }
    }
    assert_no_secret_in_log(&mut r.server, &[KEY, &r.api_key]);
}

/// Pushes `command` for the hour from now and waits for the server's own
/// dispatcher to apply it (within about a second: it is due at once); the
/// action as it was applied (ACTIVE) or failed.
async fn push_and_settle(
    actions: &mut ActionServiceClient<Keyed>,
    device: &str,
    command: Command,
) -> pb::Action {
    let a = actions
        .push_action(push(
            device,
            {
                // No start: from now, until the end.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                pb::Action {
                    command: command as i32,
                    end_time: Some(prost_types::Timestamp {
                        seconds: now + 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                }
            },
            Default::default(),
        ))
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = actions
            .get_action(pb::GetActionRequest {
                device_id: device.to_owned(),
                action_id: a.action_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if got.state == St::Active as i32 || got.state == St::Failed as i32 {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not dispatched: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the server and reads its whole log (up to its last line).
/// A key made by `switchyard admin key create` on `db`: what it printed.
fn api_key(db: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args([
            "admin",
            "--database",
            db,
            "key",
            "create",
            "--tenant",
            "default",
        ])
        .args([
            "--scopes",
            "devices:read,devices:write,actions:read,actions:write",
        ])
        .env("SWITCHYARD_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("sy_") && !key.contains('\n'), "{key}");
    // Shown once, on stdout alone: the diagnostics never repeat it.
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&key));
    key
}

fn assert_no_secret_in_log(server: &mut ServerProcess, secrets: &[&str]) {
    server.terminate();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.try_wait().is_none() {
        assert!(std::time::Instant::now() < deadline, "no exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The log thread reads to EOF once the process is gone.
    std::thread::sleep(Duration::from_millis(100));
    let log = server.log();
    assert!(
        log.iter().any(|l| l.contains("\"stopped\"")),
        "the whole log, up to its last line: {log:?}"
    );
    assert!(log.len() > 3, "the server logged: {log:?}");
    for line in log {
        for secret in secrets {
            assert!(
                !line.contains(secret),
                "a secret is in the server's log: {line}"
            );
        }
    }
}
