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

// ---- etags, request_id replays, update_mask and field checks ----

/// An UpdateDevice renaming `id` to `name`, conditional on `etag`.
fn rename(id: &str, name: &str, etag: &str) -> pb::UpdateDeviceRequest {
    pb::UpdateDeviceRequest {
        device: Some(pb::Device {
            device_id: id.into(),
            display_name: name.into(),
            etag: etag.into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["display_name".into()],
        }),
        request_id: String::new(),
    }
}

/// A DeleteDevice of `id`, conditional on `etag`.
fn delete(id: &str, etag: &str, force: bool) -> pb::DeleteDeviceRequest {
    pb::DeleteDeviceRequest {
        device_id: id.into(),
        etag: etag.into(),
        force,
        request_id: String::new(),
    }
}

/// Asserts `st` is ABORTED / ETAG_MISMATCH on `devices/{id}` naming the
/// `current` etag, and that it repeats nowhere the etag `given`.
fn assert_stale_etag(st: &tonic::Status, id: &str, given: &str, current: &str) {
    let d = expect_error(st, Code::Aborted, "ETAG_MISMATCH");
    assert_eq!(d.meta("resource"), format!("devices/{id}"));
    assert_eq!(d.meta("current_etag"), current);
    let info = d.info.as_ref().unwrap();
    assert!(
        !info.metadata.contains_key("etag"),
        "the etag given is not repeated: {info:?}"
    );
    assert!(
        info.metadata.values().all(|v| !v.contains(given)),
        "{info:?}"
    );
    assert!(!st.message().contains(given), "{}", st.message());
    assert_eq!(
        d.type_urls,
        ["type.googleapis.com/google.rpc.ErrorInfo"],
        "nothing beyond ErrorInfo"
    );
}

#[tokio::test]
async fn etags_of_a_deleted_device_do_not_match_its_re_creation_under_the_same_id() {
    let srv = TestServer::start().await;
    let mut d = srv.devices();
    let old = d
        .create_device(create("again", &[]))
        .await
        .unwrap()
        .into_inner();
    d.delete_device(delete("again", &old.etag, false))
        .await
        .unwrap();
    let new = d
        .create_device(create("again", &[]))
        .await
        .unwrap()
        .into_inner();
    // Same id, same revision, same creation time: only the incarnation
    // tells them apart.
    assert_eq!(new.create_time, old.create_time, "the clock has not moved");
    assert_ne!(new.etag, old.etag, "a re-created device has new etags");

    let st = d
        .update_device(rename("again", "Renamed", &old.etag))
        .await
        .unwrap_err();
    assert_stale_etag(&st, "again", &old.etag, &new.etag);
    let st = d
        .delete_device(delete("again", &old.etag, false))
        .await
        .unwrap_err();
    assert_stale_etag(&st, "again", &old.etag, &new.etag);
    assert_eq!(srv.get_device("again").await, new, "nothing changed");

    // The current etag works, for both.
    let renamed = d
        .update_device(rename("again", "Renamed", &new.etag))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.display_name, "Renamed");
    d.delete_device(delete("again", &renamed.etag, false))
        .await
        .unwrap();
    let st = srv.get_device_err("again").await;
    expect_error(&st, Code::NotFound, "DEVICE_NOT_FOUND");
}

#[tokio::test]
async fn delete_with_a_stale_etag_is_aborted_and_deletes_nothing() {
    let srv = TestServer::start().await;
    let mut d = srv.devices();
    let d0 = d
        .create_device(create("keep", &[("latency_ms", "0")]))
        .await
        .unwrap()
        .into_inner();
    let booked = srv.book("keep", window(Command::Charge, H, 2 * H)).await;
    let d1 = d
        .update_device(rename("keep", "Renamed", &d0.etag))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(d1.etag, d0.etag);

    // Even with force, which would cancel the SCHEDULED action: the etag
    // is checked first and nothing is touched.
    for (given, force) in [(d0.etag.as_str(), true), (d0.etag.as_str(), false)] {
        let st = d
            .delete_device(delete("keep", given, force))
            .await
            .unwrap_err();
        assert_stale_etag(&st, "keep", given, &d1.etag);
    }
    // An etag that never was one is stale too, and not echoed either.
    let forged = "forged-etag-0123456789";
    let st = d
        .delete_device(delete("keep", forged, true))
        .await
        .unwrap_err();
    assert_stale_etag(&st, "keep", forged, &d1.etag);

    assert_eq!(
        srv.get_device("keep").await,
        d1,
        "the device is still there"
    );
    let still = srv.get("keep", &booked.action_id).await;
    assert_eq!(still.state, pb::ActionState::Scheduled as i32);
    assert_eq!(still.etag, booked.etag, "its action is untouched");
    assert_eq!(srv.list("keep").await.len(), 1);
    let history = srv
        .app
        .store
        .action_history(
            &srv.app.tenant(),
            &switchyard::domain::ActionId::parse(&booked.action_id).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        history.len(),
        1,
        "no DEVICE_DELETED transition: {history:?}"
    );

    // With the current etag it goes.
    d.delete_device(delete("keep", &d1.etag, true))
        .await
        .unwrap();
    let st = srv.get_device_err("keep").await;
    expect_error(&st, Code::NotFound, "DEVICE_NOT_FOUND");
}

#[tokio::test]
async fn a_retried_create_with_output_only_fields_filled_in_replays() {
    let srv = TestServer::start().await;
    let mut req = create("echo", &[("latency_ms", "0")]);
    req.request_id = "create-echo".into();
    let first = srv
        .devices()
        .create_device(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.capabilities.is_some() && first.create_time.is_some());

    // A client that sends back the device it was given...
    let mut echoed = req.clone();
    echoed.device = Some(first.clone());
    // ... or made-up values in every output-only field.
    let mut filled = req.clone();
    filled.device = Some(pb::Device {
        capabilities: Some(pb::DeviceCapabilities {
            native_scheduler: true,
            ..Default::default()
        }),
        etag: "0badf00d-41".into(),
        create_time: Some(switchyard_tests::at(-86_400)),
        update_time: Some(switchyard_tests::at(-H)),
        observed_state: Some(pb::ObservedState {
            scheduler_active: true,
            soc_percent: Some(12.5),
            mode: "FORCE_CHARGE".into(),
            ..Default::default()
        }),
        ..req.device.clone().unwrap()
    });
    for (what, retry) in [("echoed", echoed), ("filled", filled)] {
        let again = srv
            .devices()
            .create_device(retry)
            .await
            .unwrap_or_else(|st| panic!("{what}: the same request, refused: {st:?}"))
            .into_inner();
        assert_eq!(again, first, "{what}: the original answer");
    }
    assert_eq!(
        srv.app
            .store
            .count_devices(&srv.app.tenant())
            .await
            .unwrap(),
        1
    );
    assert_eq!(srv.get_device("echo").await, first, "created once");

    // A field the server reads is another request.
    let mut other = req.clone();
    other.device.as_mut().unwrap().display_name = "Shed battery".into();
    let st = srv.devices().create_device(other).await.unwrap_err();
    let d = expect_error(&st, Code::FailedPrecondition, "REQUEST_ID_REUSED");
    assert_eq!(d.meta("first_method"), "CreateDevice");
}

#[tokio::test]
async fn a_retried_update_is_compared_on_the_masked_fields_only() {
    let srv = TestServer::start().await;
    let d0 = srv
        .devices()
        .create_device(create("u", &[("latency_ms", "0")]))
        .await
        .unwrap()
        .into_inner();
    // The device as read, renamed: every other field (output-only ones
    // included) rides along, outside the mask.
    let upd = |dev: pb::Device, paths: &[&str]| pb::UpdateDeviceRequest {
        device: Some(dev),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        request_id: "upd-1".into(),
    };
    let renamed = pb::Device {
        display_name: "Renamed".into(),
        ..d0.clone()
    };
    let first = srv
        .devices()
        .update_device(upd(renamed.clone(), &["display_name"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.display_name, "Renamed");
    assert_ne!(first.etag, d0.etag);

    let unmasked_changes: Vec<(&str, pb::Device, Vec<&str>)> = vec![
        (
            "timezone",
            pb::Device {
                timezone: "Europe/Paris".into(),
                ..renamed.clone()
            },
            vec!["display_name"],
        ),
        (
            "settings",
            pb::Device {
                settings: BTreeMap::from([("fail_mode".into(), "offline".into())]),
                ..renamed.clone()
            },
            vec!["display_name"],
        ),
        (
            "oem_device_id, family, driver",
            pb::Device {
                oem_device_id: "SN-1".into(),
                family: DeviceFamily::EvCharger as i32,
                driver: "acme".into(),
                ..renamed.clone()
            },
            vec!["display_name"],
        ),
        (
            "output-only fields",
            pb::Device {
                capabilities: None,
                create_time: Some(switchyard_tests::at(-86_400)),
                update_time: None,
                observed_state: Some(pb::ObservedState {
                    scheduler_active: true,
                    ..Default::default()
                }),
                ..renamed.clone()
            },
            vec!["display_name"],
        ),
        (
            "a repeated path",
            renamed.clone(),
            vec!["display_name", "display_name"],
        ),
    ];
    for (what, dev, paths) in unmasked_changes {
        let again = srv
            .devices()
            .update_device(upd(dev, &paths))
            .await
            .unwrap_or_else(|st| panic!("{what}: the same request: {st:?}"))
            .into_inner();
        assert_eq!(again, first, "{what}: the original answer");
    }
    assert_eq!(srv.get_device("u").await, first, "applied once");

    let masked_changes: Vec<(&str, pb::Device, Vec<&str>)> = vec![
        (
            "display_name",
            pb::Device {
                display_name: "Other".into(),
                ..renamed.clone()
            },
            vec!["display_name"],
        ),
        (
            "the mask",
            renamed.clone(),
            vec!["display_name", "timezone"],
        ),
        (
            "the etag",
            pb::Device {
                etag: String::new(),
                ..renamed.clone()
            },
            vec!["display_name"],
        ),
    ];
    for (what, dev, paths) in masked_changes {
        let st = srv
            .devices()
            .update_device(upd(dev, &paths))
            .await
            .unwrap_err();
        let d = expect_error(&st, Code::FailedPrecondition, "REQUEST_ID_REUSED");
        assert_eq!(d.meta("first_method"), "UpdateDevice", "{what}");
        assert_eq!(d.meta("request_id"), "upd-1", "{what}");
    }
    assert_eq!(srv.get_device("u").await, first, "nothing else applied");
}

#[tokio::test]
async fn every_bad_update_mask_path_is_one_invalid_field_violation_on_update_mask() {
    let srv = TestServer::start().await;
    let d0 = srv
        .devices()
        .create_device(create("m", &[]))
        .await
        .unwrap()
        .into_inner();
    let upd = |mask: Option<Vec<&str>>| pb::UpdateDeviceRequest {
        device: Some(pb::Device {
            display_name: "Renamed".into(),
            ..d0.clone()
        }),
        update_mask: mask.map(|paths| prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        request_id: String::new(),
    };
    let refused = |mask: Vec<&str>| {
        let req = upd(Some(mask));
        let mut client = srv.devices();
        async move { client.update_device(req).await.unwrap_err() }
    };
    let bad = [
        ("device_id", "immutable"),
        ("family", "immutable"),
        ("driver", "immutable"),
        ("capabilities", "output only"),
        ("etag", "output only"),
        ("create_time", "output only"),
        ("update_time", "output only"),
        ("observed_state", "output only"),
        ("nope", "unknown"),
        ("settings.fail_mode", "unknown"),
        ("displayName", "unknown"),
    ];
    for (path, why) in bad {
        // Alone, and beside a good path (which does not rescue it).
        for mask in [vec![path], vec!["display_name", path]] {
            let st = refused(mask.clone()).await;
            let d = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
            let v = &d.bad_request.as_ref().unwrap().field_violations;
            assert_eq!(v.len(), 1, "{mask:?}: {v:?}");
            assert_eq!(
                (v[0].field.as_str(), v[0].reason.as_str()),
                ("update_mask", "INVALID_FIELD"),
                "{mask:?}"
            );
            assert!(v[0].description.contains(path), "{path}: {v:?}");
            if why != "unknown" {
                assert!(v[0].description.contains(why), "{path}: {v:?}");
            }
            assert_eq!(d.meta("fields"), "update_mask", "{mask:?}");
        }
    }

    // A repeated bad path is reported once.
    let st = refused(vec!["etag", "etag", "etag"]).await;
    let d = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(d.fields(), ["update_mask"]);

    // Several bad paths: one violation each, all on update_mask, which the
    // metadata names once; repeats are not counted.
    let st = refused(vec![
        "driver",
        "etag",
        "nope",
        "driver",
        "create_time",
        "etag",
        "family",
    ])
    .await;
    let d = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    let v = &d.bad_request.as_ref().unwrap().field_violations;
    assert_eq!(v.len(), 5, "{v:?}");
    assert!(
        v.iter()
            .all(|x| x.field == "update_mask" && x.reason == "INVALID_FIELD")
    );
    assert_eq!(d.meta("fields"), "update_mask");
    assert_eq!(d.meta("truncated"), "");

    // Every one of them at once (and again): the list is cut at its
    // maximum, the count is of distinct paths.
    let mut all: Vec<&str> = bad.iter().map(|(p, _)| *p).collect();
    all.extend(bad.iter().map(|(p, _)| *p));
    let st = refused(all).await;
    let d = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    let v = &d.bad_request.as_ref().unwrap().field_violations;
    assert_eq!(v.len(), 8, "at most 8 are listed: {v:?}");
    assert!(v.iter().all(|x| x.field == "update_mask"));
    assert_eq!(d.meta("fields"), "update_mask");
    assert_eq!(d.meta("field_violation_count"), bad.len().to_string());
    assert_eq!(d.meta("truncated"), "true");

    // No mask, or an empty one: MISSING_FIELD on update_mask.
    for mask in [None, Some(vec![])] {
        let st = srv
            .devices()
            .update_device(upd(mask.clone()))
            .await
            .unwrap_err();
        let d = expect_error(&st, Code::InvalidArgument, "MISSING_FIELD");
        let v = &d.bad_request.as_ref().unwrap().field_violations;
        assert_eq!(
            v.iter()
                .map(|x| (x.field.as_str(), x.reason.as_str()))
                .collect::<Vec<_>>(),
            [("update_mask", "MISSING_FIELD")],
            "{mask:?}"
        );
        assert_eq!(d.meta("fields"), "update_mask");
    }
    assert_eq!(srv.get_device("m").await, d0, "nothing was applied");
}

#[tokio::test]
async fn display_names_are_counted_in_characters_not_bytes() {
    let srv = TestServer::start().await;
    let mut d = srv.devices();
    let named = |id: &str, n: usize| {
        let mut req = create(id, &[]);
        req.device.as_mut().unwrap().display_name = "é".repeat(n);
        req
    };
    let ok = d
        .create_device(named("e200", 200))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.display_name.len(), 400, "400 bytes");
    assert_eq!(ok.display_name.chars().count(), 200);

    let st = d.create_device(named("e201", 201)).await.unwrap_err();
    let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(dd.fields(), ["device.display_name"]);
    assert_eq!(
        dd.bad_request.unwrap().field_violations[0].reason,
        "INVALID_FIELD"
    );
    srv.get_device_err("e201").await;

    // UpdateDevice counts the same way.
    let renamed = d
        .update_device(rename("e200", &"ü".repeat(200), &ok.etag))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.display_name.chars().count(), 200);
    let st = d
        .update_device(rename("e200", &"ü".repeat(201), ""))
        .await
        .unwrap_err();
    let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(dd.fields(), ["device.display_name"]);
}

/// Names are printed in consoles and logs: control characters there
/// could forge or hide what is shown, so they are refused on create and
/// on update, in either text field, and nothing is written.
#[tokio::test]
async fn names_with_control_characters_are_refused() {
    let srv = TestServer::start().await;
    let mut d = srv.devices();
    for (i, bad) in [
        "a\0b",
        "a\x1b[31mb",
        "a\r\nb",
        "tab\there",
        "\u{85}",
        "del\x7f",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("c{i}");
        let mut req = create(&id, &[]);
        req.device.as_mut().unwrap().display_name = bad.into();
        let st = d.create_device(req).await.unwrap_err();
        let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(dd.fields(), ["device.display_name"], "{bad:?}");
        assert!(!st.message().contains(bad), "not echoed: {bad:?}");
        srv.get_device_err(&id).await;

        let mut req = create(&id, &[]);
        req.device.as_mut().unwrap().oem_device_id = bad.into();
        let st = d.create_device(req).await.unwrap_err();
        let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(dd.fields(), ["device.oem_device_id"], "{bad:?}");
        srv.get_device_err(&id).await;
    }
    let ok = d
        .create_device(create("plain", &[]))
        .await
        .unwrap()
        .into_inner();
    let st = d
        .update_device(rename("plain", "new\nline", ""))
        .await
        .unwrap_err();
    let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(dd.fields(), ["device.display_name"]);
    let mut both = create("both", &[]);
    let dev = both.device.as_mut().unwrap();
    (dev.display_name, dev.oem_device_id) = ("x\ty".into(), "SN\n".into());
    let st = d.create_device(both).await.unwrap_err();
    let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(dd.fields(), ["device.display_name", "device.oem_device_id"]);
    let st = d
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                device_id: "plain".into(),
                oem_device_id: "SN\r\n".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["oem_device_id".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let dd = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(dd.fields(), ["device.oem_device_id"]);
    assert_eq!(srv.get_device("plain").await, ok, "nothing was applied");
    // Printable text of any script is a name.
    let renamed = d
        .update_device(rename("plain", "Wärmepumpe 東京 — ünït 2", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.display_name, "Wärmepumpe 東京 — ünït 2");
}

#[tokio::test]
async fn every_bad_setting_is_reported_at_once_on_its_own_field() {
    let srv = TestServer::start().await;
    let req = create(
        "s",
        &[
            ("fail_mode", "bogus"),
            ("latency_ms", "-1"),
            ("colour", "blue"),
            ("max_power_w", "3000"),
        ],
    );
    let st = srv.devices().create_device(req).await.unwrap_err();
    let d = expect_error(&st, Code::InvalidArgument, "INVALID_SETTINGS");
    let v = &d.bad_request.as_ref().unwrap().field_violations;
    let mut got: Vec<(&str, &str)> = v
        .iter()
        .map(|x| (x.field.as_str(), x.reason.as_str()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("device.settings.colour", "INVALID_SETTINGS"),
            ("device.settings.fail_mode", "INVALID_SETTINGS"),
            ("device.settings.latency_ms", "INVALID_SETTINGS"),
        ]
    );
    let mut listed: Vec<&str> = d.meta("fields").split(',').collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "device.settings.colour",
            "device.settings.fail_mode",
            "device.settings.latency_ms"
        ]
    );
    assert!(
        !format!("{st:?}").contains("bogus"),
        "values are never echoed"
    );
    srv.get_device_err("s").await;
}

#[tokio::test]
async fn a_foxess_device_without_its_serial_number_is_refused_on_oem_device_id() {
    let srv = TestServer::start().await;
    srv.write_secret("fox-key", "fx-key-0123");
    let fox = |oem_device_id: &str| pb::CreateDeviceRequest {
        device_id: "fox".into(),
        device: Some(pb::Device {
            family: DeviceFamily::Battery as i32,
            driver: "foxess".into(),
            oem_device_id: oem_device_id.into(),
            timezone: "Europe/Berlin".into(),
            settings: BTreeMap::from([
                ("base_url".into(), "https://www.foxesscloud.com".into()),
                ("api_key_ref".into(), "file:fox-key".into()),
            ]),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    for sn in ["", "   "] {
        let st = srv.devices().create_device(fox(sn)).await.unwrap_err();
        let d = expect_error(&st, Code::InvalidArgument, "INVALID_FIELD");
        let v = &d.bad_request.as_ref().unwrap().field_violations;
        assert_eq!(
            v.iter()
                .map(|x| (x.field.as_str(), x.reason.as_str()))
                .collect::<Vec<_>>(),
            [("device.oem_device_id", "INVALID_FIELD")],
            "{sn:?}"
        );
        assert_eq!(d.meta("fields"), "device.oem_device_id");
    }
    srv.get_device_err("fox").await;
}
