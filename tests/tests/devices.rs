//! DeviceService over gRPC.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use switchyard_proto::v1::{self as pb, Command, ConflictStrategy as S, DeviceFamily};
use switchyard_tests::{TestServer, action, details, expect_error, push, window};
use tonic::Code;

const H: i64 = 3600;

fn create(id: &str, settings: &[(&str, &str)]) -> pb::CreateDeviceRequest {
    pb::CreateDeviceRequest {
        device_id: id.into(),
        device: Some(pb::Device {
            display_name: "Garage battery".into(),
            family: DeviceFamily::Battery as i32,
            driver: "simulated".into(),
            timezone: "Europe/London".into(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn create_returns_capabilities_from_the_driver_and_get_reads_it_back() {
    let srv = TestServer::start().await;
    let d = srv
        .devices()
        .create_device(create("garage", &[("max_power_w", "3000")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.device_id, "garage");
    assert!(!d.etag.is_empty());
    let caps = d.capabilities.clone().expect("capabilities");
    let charge = caps
        .commands
        .iter()
        .find(|c| c.command == Command::Charge as i32)
        .expect("charge");
    assert_eq!(charge.channel, "mode");
    assert_eq!(charge.parameters[0].name, "power");
    assert_eq!(charge.parameters[0].max, 3000.0);
    let got = srv.get_device("garage").await;
    assert_eq!(got, d);

    // The driver's bound is enforced on pushes.
    let mut a = action(Command::Charge, Some(H), None);
    a.power = Some(pb::Quantity {
        value: 3.5,
        unit: pb::Unit::Kilowatt as i32,
    });
    let st = srv.refused(push("garage", a, S::Unspecified)).await;
    assert_eq!(details(&st).reason(), "PARAMETER_OUT_OF_RANGE");
}

#[tokio::test]
async fn create_validates_every_field() {
    let srv = TestServer::start().await;
    let mut d = srv.devices();
    let st = d
        .create_device(pb::CreateDeviceRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (st.code(), details(&st).fields()),
        (Code::InvalidArgument, vec!["device".to_owned()])
    );

    let mut req = create("x", &[]);
    req.device.as_mut().unwrap().driver = "acme".into();
    req.device.as_mut().unwrap().family = 0;
    let st = d.create_device(req).await.unwrap_err();
    let dd = details(&st);
    assert_eq!(dd.fields(), ["device.family", "device.driver"]);
    assert_eq!(
        dd.bad_request.unwrap().field_violations[1].reason,
        "UNKNOWN_DRIVER"
    );

    let req = create("x", &[("fail_mode", "sometimes")]);
    let st = d.create_device(req).await.unwrap_err();
    assert_eq!(details(&st).reason(), "INVALID_SETTINGS");
    assert_eq!(details(&st).fields(), ["device.settings.fail_mode"]);
    assert!(
        !st.message().contains("sometimes"),
        "setting values are never echoed"
    );
    let req = create("x", &[("api_key", "hunter2")]);
    let st = d.create_device(req).await.unwrap_err();
    assert_eq!(details(&st).reason(), "INVALID_SETTINGS");
    assert!(!format!("{st:?}").contains("hunter2"));

    let mut req = create("x", &[]);
    req.device.as_mut().unwrap().timezone = "Mars/Olympus".into();
    let st = d.create_device(req).await.unwrap_err();
    assert_eq!(details(&st).fields(), ["device.timezone"]);

    let mut req = create("x", &[]);
    req.device.as_mut().unwrap().display_name = "n".repeat(201);
    let st = d.create_device(req).await.unwrap_err();
    assert_eq!(details(&st).fields(), ["device.display_name"]);

    let st = d.create_device(create("Bad_Id", &[])).await.unwrap_err();
    assert_eq!(details(&st).fields(), ["device_id"]);

    d.create_device(create("x", &[])).await.unwrap();
    let st = d.create_device(create("x", &[])).await.unwrap_err();
    expect_error(&st, Code::AlreadyExists, "DEVICE_ALREADY_EXISTS");

    // No id: the server picks one.
    let generated = d.create_device(create("", &[])).await.unwrap().into_inner();
    assert!(generated.device_id.starts_with("dev-"));
}

#[tokio::test]
async fn create_with_request_id_replays() {
    let srv = TestServer::start().await;
    let mut req = create("r", &[]);
    req.request_id = "create-r".into();
    let a = srv
        .devices()
        .create_device(req.clone())
        .await
        .unwrap()
        .into_inner();
    let b = srv.devices().create_device(req).await.unwrap().into_inner();
    assert_eq!(a, b);
}

#[tokio::test]
async fn update_applies_the_mask_and_honours_the_etag() {
    let srv = TestServer::start().await;
    let d0 = srv
        .devices()
        .create_device(create("u", &[]))
        .await
        .unwrap()
        .into_inner();
    let mut d = srv.devices();
    let upd = |dev: pb::Device, paths: &[&str]| pb::UpdateDeviceRequest {
        device: Some(dev),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        request_id: String::new(),
    };
    let mut change = d0.clone();
    change.display_name = "Renamed".into();
    change.timezone = "Europe/Paris".into(); // not in the mask: untouched
    let d1 = d
        .update_device(upd(change.clone(), &["display_name"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d1.display_name, "Renamed");
    assert_eq!(d1.timezone, "Europe/London");
    assert_ne!(d1.etag, d0.etag);

    // The old etag is stale now.
    let st = d
        .update_device(upd(change.clone(), &["timezone"]))
        .await
        .unwrap_err();
    expect_error(&st, Code::Aborted, "ETAG_MISMATCH");

    let mut s = d1.clone();
    s.settings.insert("fail_mode".into(), "offline".into());
    let d2 = d
        .update_device(upd(s, &["settings"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        d2.settings.get("fail_mode").map(String::as_str),
        Some("offline")
    );

    for (paths, why) in [
        (vec![], "empty"),
        (vec!["driver"], "immutable"),
        (vec!["etag"], "output only"),
        (vec!["nope"], "unknown"),
    ] {
        let st = d.update_device(upd(d2.clone(), &paths)).await.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{why}");
    }
    let mut bad = d2.clone();
    bad.settings.insert("latency_ms".into(), "-5".into());
    let st = d.update_device(upd(bad, &["settings"])).await.unwrap_err();
    assert_eq!(details(&st).reason(), "INVALID_SETTINGS");
    let after = srv.get_device("u").await;
    assert_eq!(after, d2, "a refused update changes nothing");
}

#[tokio::test]
async fn list_pages_through_every_device_once() {
    let srv = TestServer::start().await;
    for i in 0..7 {
        srv.battery(&format!("d{i}")).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = srv
            .devices()
            .list_devices(pb::ListDevicesRequest {
                page_size: 3,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.devices.into_iter().map(|d| d.device_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("d{i}")).collect::<Vec<_>>());
    let st = srv
        .devices()
        .list_devices(pb::ListDevicesRequest {
            page_size: 3,
            page_token: "garbage!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(details(&st).reason(), "INVALID_PAGE_TOKEN");
    let st = srv
        .devices()
        .list_devices(pb::ListDevicesRequest {
            page_size: -1,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(details(&st).fields(), ["page_size"]);
}

#[tokio::test]
async fn delete_refuses_while_actions_hold_unless_forced() {
    let srv = TestServer::start().await;
    srv.battery("del").await;
    srv.book("del", window(Command::Charge, H, 2 * H)).await;
    let req = |force| pb::DeleteDeviceRequest {
        device_id: "del".into(),
        force,
        ..Default::default()
    };
    let st = srv.devices().delete_device(req(false)).await.unwrap_err();
    expect_error(&st, Code::FailedPrecondition, "DEVICE_HAS_ACTIVE_ACTIONS");
    srv.devices().delete_device(req(true)).await.unwrap();
    let st = srv.get_device_err("del").await;
    assert_eq!(details(&st).reason(), "DEVICE_NOT_FOUND");

    // In-flight actions block even a forced delete.
    srv.battery("busy").await;
    srv.book("busy", action(Command::Idle, None, None)).await;
    let st = srv
        .devices()
        .delete_device(pb::DeleteDeviceRequest {
            device_id: "busy".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(details(&st).reason(), "DEVICE_HAS_ACTIVE_ACTIONS");
    assert!(!details(&st).meta("in_flight_action_ids").is_empty());
}
