//! A call that is cancelled, or runs past its deadline, before its write
//! has run (here: while CreateDevice observes a slow OEM) writes nothing,
//! its request_id included: a retry with the same key is served at once
//! (a request_id is written only with the answer of the change it guards,
//! ADR 0011).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use switchyard_drivers::foxess::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use switchyard_proto::v1 as pb;
use switchyard_tests::{TestServer, details};
use tonic::Code;

const KEY: &str = "fx-cancel-key";
const SN: &str = "SN-CANCEL";

/// A server whose CreateDevice for a FoxESS device is slow: it observes
/// the device through an emulator that answers after `latency`.
async fn slow_rig() -> (TestServer, EmulatorHandle) {
    let mut config = EmulatorConfig::new(KEY, &[SN]);
    config.min_write_interval = Duration::ZERO;
    let emu = Emulator::start(config).await.unwrap();
    let srv = TestServer::start_allowing(&[emu.base_url()]).await;
    srv.write_secret("k", KEY);
    emu.set_latency(Duration::from_secs(3));
    (srv, emu)
}

fn create(request_id: &str) -> pb::CreateDeviceRequest {
    pb::CreateDeviceRequest {
        device_id: "slow".into(),
        device: Some(pb::Device {
            family: pb::DeviceFamily::Battery as i32,
            driver: "foxess".into(),
            oem_device_id: SN.into(),
            timezone: "UTC".into(),
            settings: BTreeMap::from([
                ("base_url".to_owned(), String::new()),
                ("api_key_ref".to_owned(), "file:k".to_owned()),
            ])
            .into_iter()
            .collect(),
            ..Default::default()
        }),
        request_id: request_id.into(),
    }
}

fn with_url(mut r: pb::CreateDeviceRequest, url: &str) -> pb::CreateDeviceRequest {
    if let Some(d) = r.device.as_mut() {
        d.settings.insert("base_url".into(), url.into());
    }
    r
}

/// Retries the same request until it is no longer REQUEST_IN_PROGRESS;
/// how long that took.
async fn retry_until_served(srv: &TestServer, req: pb::CreateDeviceRequest) -> Duration {
    let started = Instant::now();
    loop {
        match srv.devices().create_device(req.clone()).await {
            Ok(d) => {
                assert_eq!(d.into_inner().device_id, "slow");
                return started.elapsed();
            }
            Err(st) if details(&st).reason() == "REQUEST_IN_PROGRESS" => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the key is still held: {st:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(st) => panic!("retry refused: {st:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_releases_its_request_id_at_once() {
    let (srv, emu) = slow_rig().await;
    let req = with_url(create("deadline-1"), &emu.base_url());
    let mut r = tonic::Request::new(req.clone());
    r.set_timeout(Duration::from_millis(300));
    let st = srv.devices().create_device(r).await.unwrap_err();
    assert!(
        matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{st:?}"
    );
    // Nothing was registered: the call was dropped before its transaction.
    let missing = srv.get_device_err("slow").await;
    assert_eq!(missing.code(), Code::NotFound);
    emu.set_latency(Duration::ZERO);
    let waited = retry_until_served(&srv, req).await;
    assert!(waited < Duration::from_secs(2), "released after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_client_gives_up_on_releases_its_request_id_at_once() {
    let (srv, emu) = slow_rig().await;
    let req = with_url(create("cancel-1"), &emu.base_url());
    // No deadline sent: the client just stops waiting (the stream is reset).
    let mut client = srv.devices();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client.create_device(req.clone()),
    )
    .await;
    assert!(gave_up.is_err(), "still running when abandoned");
    emu.set_latency(Duration::ZERO);
    let waited = retry_until_served(&srv, req).await;
    assert!(waited < Duration::from_secs(2), "released after {waited:?}");
}
