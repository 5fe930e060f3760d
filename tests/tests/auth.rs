//! API keys, scopes, tenants and rate limits, over real gRPC
//! (docs/security.md): each refusal is its own typed answer, decided before
//! the request is looked at, and no tenant ever sees another's data.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::{Duration, Instant};

use switchyard_proto::v1::{
    self as pb, Command, ConflictStrategy as Strat, action_service_client::ActionServiceClient,
    admin_service_client::AdminServiceClient, device_service_client::DeviceServiceClient,
};
use switchyard_tests::{
    Keyed, Seed, ServerProcess, T0, TestServer, battery_request, details, expect_error, keyed,
    push, window,
};
use tonic::{Code, Status};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

const ALL: &[&str] = &[
    "devices:read",
    "devices:write",
    "actions:read",
    "actions:write",
    "admin",
    "events:read",
    "webhooks:manage",
];

fn devices(s: &TestServer, key: &str) -> DeviceServiceClient<Keyed> {
    DeviceServiceClient::new(keyed(s.channel.clone(), key))
}

fn actions(s: &TestServer, key: &str) -> ActionServiceClient<Keyed> {
    ActionServiceClient::new(keyed(s.channel.clone(), key))
}

fn admin(s: &TestServer, key: &str) -> AdminServiceClient<Keyed> {
    AdminServiceClient::new(keyed(s.channel.clone(), key))
}

/// Calls `rpc` with a minimal request (whatever its answer, the point is
/// whether the auth layer let it through).
fn webhooks(
    s: &TestServer,
    key: &str,
) -> switchyard_proto::v1::webhook_service_client::WebhookServiceClient<Keyed> {
    switchyard_proto::v1::webhook_service_client::WebhookServiceClient::new(keyed(
        s.channel.clone(),
        key,
    ))
}

async fn call(s: &TestServer, key: &str, rpc: &str) -> Result<(), Status> {
    let (mut d, mut a, mut m) = (devices(s, key), actions(s, key), admin(s, key));
    let dev = || "scope-dev".to_owned();
    match rpc {
        "GetDevice" => d
            .get_device(pb::GetDeviceRequest { device_id: dev() })
            .await
            .map(drop),
        "ListDevices" => d
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .map(drop),
        "CreateDevice" => d
            .create_device(battery_request("scope-new"))
            .await
            .map(drop),
        "UpdateDevice" => d
            .update_device(pb::UpdateDeviceRequest::default())
            .await
            .map(drop),
        "DeleteDevice" => d
            .delete_device(pb::DeleteDeviceRequest {
                device_id: "scope-none".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "GetAction" => a
            .get_action(pb::GetActionRequest {
                device_id: dev(),
                action_id: "x".into(),
            })
            .await
            .map(drop),
        "ListActions" => a
            .list_actions(pb::ListActionsRequest::default())
            .await
            .map(drop),
        "ListActionHistory" => a
            .list_action_history(pb::ListActionHistoryRequest {
                device_id: dev(),
                action_id: "x".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "PushAction" => a
            .push_action(push(
                &dev(),
                window(Command::Charge, 7200, 9000),
                Strat::Unspecified,
            ))
            .await
            .map(drop),
        "CancelAction" => a
            .cancel_action(pb::CancelActionRequest {
                device_id: dev(),
                action_id: "x".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "CreateTenant" => m
            .create_tenant(pb::CreateTenantRequest::default())
            .await
            .map(drop),
        "ListTenants" => m.list_tenants(pb::ListTenantsRequest {}).await.map(drop),
        "CreateApiKey" => m
            .create_api_key(pb::CreateApiKeyRequest::default())
            .await
            .map(drop),
        "ListApiKeys" => m
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await
            .map(drop),
        "RevokeApiKey" => m
            .revoke_api_key(pb::RevokeApiKeyRequest::default())
            .await
            .map(drop),
        "WatchEvents" => switchyard_proto::v1::event_service_client::EventServiceClient::new(
            keyed(s.channel.clone(), key),
        )
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .map(drop),
        "CreateWebhookEndpoint" => webhooks(s, key)
            .create_webhook_endpoint(pb::CreateWebhookEndpointRequest::default())
            .await
            .map(drop),
        "GetWebhookEndpoint" => webhooks(s, key)
            .get_webhook_endpoint(pb::GetWebhookEndpointRequest::default())
            .await
            .map(drop),
        "ListWebhookEndpoints" => webhooks(s, key)
            .list_webhook_endpoints(pb::ListWebhookEndpointsRequest::default())
            .await
            .map(drop),
        "UpdateWebhookEndpoint" => webhooks(s, key)
            .update_webhook_endpoint(pb::UpdateWebhookEndpointRequest::default())
            .await
            .map(drop),
        "DeleteWebhookEndpoint" => webhooks(s, key)
            .delete_webhook_endpoint(pb::DeleteWebhookEndpointRequest::default())
            .await
            .map(drop),
        "RotateWebhookSecret" => webhooks(s, key)
            .rotate_webhook_secret(pb::RotateWebhookSecretRequest::default())
            .await
            .map(drop),
        "ListWebhookDeliveries" => webhooks(s, key)
            .list_webhook_deliveries(pb::ListWebhookDeliveriesRequest::default())
            .await
            .map(drop),
        other => panic!("no such rpc {other}"),
    }
}

/// Every RPC and the one scope that allows it, written out here (not read
/// from the server's table).
const RPCS: &[(&str, &str)] = &[
    ("GetDevice", "devices:read"),
    ("ListDevices", "devices:read"),
    ("CreateDevice", "devices:write"),
    ("UpdateDevice", "devices:write"),
    ("DeleteDevice", "devices:write"),
    ("GetAction", "actions:read"),
    ("ListActions", "actions:read"),
    ("ListActionHistory", "actions:read"),
    ("PushAction", "actions:write"),
    ("CancelAction", "actions:write"),
    ("CreateTenant", "admin"),
    ("ListTenants", "admin"),
    ("CreateApiKey", "admin"),
    ("ListApiKeys", "admin"),
    ("RevokeApiKey", "admin"),
    ("WatchEvents", "events:read"),
    ("CreateWebhookEndpoint", "webhooks:manage"),
    ("GetWebhookEndpoint", "webhooks:manage"),
    ("ListWebhookEndpoints", "webhooks:manage"),
    ("UpdateWebhookEndpoint", "webhooks:manage"),
    ("DeleteWebhookEndpoint", "webhooks:manage"),
    ("RotateWebhookSecret", "webhooks:manage"),
    ("ListWebhookDeliveries", "webhooks:manage"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_allows_exactly_its_rpcs() {
    let seed = Seed {
        keys: ALL.iter().map(|s| ("default", vec![*s], None)).collect(),
        ..Default::default()
    };
    let s = TestServer::start_with_keys(&seed).await;
    let mut allowed = 0;
    for (scope, key) in ALL.iter().zip(&s.keys) {
        for (rpc, needs) in RPCS {
            let got = call(&s, key, rpc).await;
            if needs == scope {
                allowed += 1;
                if let Err(e) = &got {
                    assert!(
                        !matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied),
                        "{rpc} with {scope}: {e:?}"
                    );
                    // Past the auth layer: the handler's own typed answer.
                    details(e);
                }
            } else {
                let e = got.expect_err(&format!("{rpc} with {scope} must be refused"));
                let d = expect_error(&e, Code::PermissionDenied, "MISSING_SCOPE");
                assert_eq!(d.meta("required_scope"), *needs, "{rpc}");
                assert!(d.meta("method").ends_with(rpc), "{:?}", d.meta("method"));
                assert!(key.contains(d.meta("key_id")) && !d.meta("key_id").is_empty());
            }
        }
    }
    assert_eq!(allowed, RPCS.len(), "each RPC allowed by exactly one scope");
    // Missing or bad keys are refused before any scope, on every RPC.
    for (rpc, _) in RPCS {
        let e = call(&s, "", rpc).await.unwrap_err();
        let d = expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY");
        assert_eq!(d.meta("why"), "malformed", "{rpc}");
    }
    let mut plain = DeviceServiceClient::new(s.channel.clone());
    let e = plain
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY").meta("why"),
        "missing"
    );
    // A well-formed key nobody made; and a real key's id with another
    // secret.
    let forged = format!("sy_{}_{}", "a".repeat(16), "b".repeat(52));
    let mut twisted = s.keys[0].clone();
    let last = twisted.pop().unwrap();
    twisted.push(if last == 'a' { 'b' } else { 'a' });
    for bad in [forged, twisted] {
        let e = call(&s, &bad, "ListDevices").await.unwrap_err();
        let d = expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY");
        assert_eq!(d.meta("why"), "unknown");
        assert_eq!(d.meta("key_id"), "", "an unknown key names nothing");
    }
    // Health and reflection need no key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_other() {
    let s = TestServer::start_with_keys(&Seed::keys(&[("alpha", ALL), ("beta", ALL)])).await;
    let (ka, kb) = (&s.keys[0], &s.keys[1]);
    let (mut da, mut db) = (devices(&s, ka), devices(&s, kb));
    let (mut aa, mut ab) = (actions(&s, ka), actions(&s, kb));
    // The same device id in both; one only alpha has.
    for d in [&mut da, &mut db] {
        d.create_device(battery_request("shared")).await.unwrap();
    }
    da.create_device(battery_request("only-a")).await.unwrap();
    let mut mine = Vec::new();
    for dev in ["shared", "only-a"] {
        let mut req = push(dev, window(Command::Charge, 3600, 7200), Strat::Unspecified);
        req.request_id = format!("same-request-id-{dev}");
        let a = aa.push_action(req).await.unwrap().into_inner();
        mine.push(a.action.unwrap());
    }
    let not_found = |e: Status| assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Gets, by every path.
    for a in &mine {
        let e = ab
            .list_action_history(pb::ListActionHistoryRequest {
                device_id: a.device_id.clone(),
                action_id: a.action_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        not_found(e);
        let e = ab
            .get_action(pb::GetActionRequest {
                device_id: a.device_id.clone(),
                action_id: a.action_id.clone(),
            })
            .await
            .unwrap_err();
        not_found(e);
        let e = ab
            .cancel_action(pb::CancelActionRequest {
                device_id: a.device_id.clone(),
                action_id: a.action_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        not_found(e);
    }
    let e = db
        .get_device(pb::GetDeviceRequest {
            device_id: "only-a".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "DEVICE_NOT_FOUND");
    let e = db
        .update_device(pb::UpdateDeviceRequest {
            device: Some(pb::Device {
                device_id: "only-a".into(),
                display_name: "mine now".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "DEVICE_NOT_FOUND");
    let e = db
        .delete_device(pb::DeleteDeviceRequest {
            device_id: "only-a".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "DEVICE_NOT_FOUND");
    let e = ab
        .push_action(push(
            "only-a",
            window(Command::Discharge, 3600, 7200),
            Strat::CancelAndReplace,
        ))
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "DEVICE_NOT_FOUND");
    let e = ab
        .list_actions(pb::ListActionsRequest {
            device_id: "only-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "DEVICE_NOT_FOUND");
    // Lists show only one's own rows.
    let listed = db
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(ids, ["shared"]);
    for device_id in ["shared", "-"] {
        let listed = ab
            .list_actions(pb::ListActionsRequest {
                device_id: device_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(listed.actions.is_empty(), "{listed:?}");
    }
    // Beta's push on its own "shared", over alpha's window, with alpha's
    // request_id: neither a conflict nor a replay.
    let mut req = push(
        "shared",
        window(Command::Discharge, 3600, 7200),
        Strat::Unspecified,
    );
    req.request_id = "same-request-id-shared".into();
    let theirs = ab
        .push_action(req)
        .await
        .unwrap()
        .into_inner()
        .action
        .unwrap();
    assert_ne!(theirs.action_id, mine[0].action_id);
    assert_eq!(theirs.command, Command::Discharge as i32);
    // Alpha's rows are as they were.
    for a in &mine {
        let now = aa
            .get_action(pb::GetActionRequest {
                device_id: a.device_id.clone(),
                action_id: a.action_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((now.state, &now.etag), (a.state, &a.etag));
    }
    let listed = da
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.devices.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_keys_are_refused() {
    let mut seed = Seed::keys(&[("default", ALL), ("default", &["devices:read"])]);
    seed.keys[1].2 = Some(60);
    let s = TestServer::start_with_keys(&seed).await;
    let (admin_key, short) = (s.keys[0].clone(), s.keys[1].clone());
    call(&s, &short, "ListDevices").await.unwrap();
    s.at_secs(59);
    call(&s, &short, "ListDevices").await.unwrap();
    // Its lifetime ends on the server's clock, at exactly 60 s.
    s.at_secs(60);
    let e = call(&s, &short, "ListDevices").await.unwrap_err();
    let d = expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY");
    assert_eq!(d.meta("why"), "expired");
    assert!(short.contains(d.meta("key_id")) && !d.meta("key_id").is_empty());
    // Revoked over the API, by id; the listing says when.
    let mut m = admin(&s, &admin_key);
    // Its use is recorded, off the call's path: seen soon after.
    let since = Instant::now();
    let me = loop {
        let listed = m
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.api_keys.len(), 2);
        let me = listed
            .api_keys
            .into_iter()
            .find(|k| admin_key.contains(&k.key_id))
            .unwrap();
        if me.last_use_time.is_some() {
            break me;
        }
        assert!(since.elapsed() < Duration::from_secs(5), "{me:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(me.last_use_time.unwrap().seconds, T0 + 60);
    let e = m
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: "not-a-key-id".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    let revoked = m
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: me.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoke_time.is_some());
    let since = Instant::now();
    loop {
        match call(&s, &admin_key, "ListDevices").await {
            Ok(()) => assert!(since.elapsed() < Duration::from_secs(5), "still accepted"),
            Err(e) => {
                let d = expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY");
                assert_eq!(d.meta("why"), "revoked");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_key_is_told_when_to_come_back() {
    let mut seed = Seed::keys(&[
        ("slow", &["devices:read"]),
        ("slow", &["devices:read"]),
        ("other", &["devices:read"]),
    ]);
    seed.tenants[0] = ("slow", Some(5), Some(2));
    let s = TestServer::start_with_keys(&seed).await;
    let key = &s.keys[0];
    // Calls refused for their scope take no token.
    for _ in 0..5 {
        let e = call(&s, key, "PushAction").await.unwrap_err();
        expect_error(&e, Code::PermissionDenied, "MISSING_SCOPE");
    }
    let mut refused = None;
    for i in 0..10 {
        match call(&s, key, "ListDevices").await {
            Ok(()) => assert!(i < 2 + 1, "call {i} let through past the burst"),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = refused.expect("the burst of 2 runs out");
    assert!(i >= 2, "refused within the burst, at call {i}");
    let d = expect_error(&e, Code::ResourceExhausted, "RATE_LIMITED");
    let retry = d
        .retry
        .as_ref()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    let wait = Duration::new(retry.seconds as u64, retry.nanos as u32);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{wait:?}"
    );
    let q = d.quota.as_ref().expect("QuotaFailure");
    assert_eq!(q.violations.len(), 1);
    assert!(key.contains(q.violations[0].subject.trim_start_matches("api_key:")));
    assert_eq!(d.meta("rate_per_second"), "5");
    assert_eq!(d.meta("burst"), "2");
    // The bucket is the key's: another key of the tenant, and another
    // tenant's key, go on.
    call(&s, &s.keys[1], "ListDevices").await.unwrap();
    call(&s, &s.keys[2], "ListDevices").await.unwrap();
    // A refusal for scope is still a refusal for scope when out of tokens.
    let e = call(&s, key, "PushAction").await.unwrap_err();
    expect_error(&e, Code::PermissionDenied, "MISSING_SCOPE");
    // Health is never limited.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    for _ in 0..20 {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
    }
    // After the advertised wait, the key is let through again.
    tokio::time::sleep(wait).await;
    call(&s, key, "ListDevices").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_manage_their_own_tenant_and_the_operator_all() {
    let s =
        TestServer::start_with_keys(&Seed::keys(&[("default", ALL), ("acme", &["admin"])])).await;
    let (op, acme) = (admin(&s, &s.keys[0]), admin(&s, &s.keys[1]));
    let (mut op, mut acme) = (op, acme);
    // A tenant's admin: its own keys only.
    for e in [
        acme.create_tenant(pb::CreateTenantRequest {
            name: "mine".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        acme.list_tenants(pb::ListTenantsRequest {})
            .await
            .unwrap_err(),
    ] {
        expect_error(&e, Code::PermissionDenied, "OPERATOR_ONLY");
    }
    let e = acme
        .list_api_keys(pb::ListApiKeysRequest {
            tenant: "default".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "TENANT_NOT_FOUND");
    let op_key_id = s.keys[0][3..19].to_owned();
    let e = acme
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: op_key_id.clone(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "API_KEY_NOT_FOUND");
    // ... and it was not revoked all the same.
    let ops_keys = op
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(ops_keys.api_keys.iter().all(|k| k.revoke_time.is_none()));
    // Nor can it make keys for another tenant, existing or not.
    for tenant in ["default", "newco"] {
        let e = acme
            .create_api_key(pb::CreateApiKeyRequest {
                tenant: tenant.into(),
                scopes: vec!["admin".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        expect_error(&e, Code::NotFound, "TENANT_NOT_FOUND");
    }
    let e = acme
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: vec!["devices:read".into()],
            description: "line\n\u{1b}[31mred".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    let made = acme
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: vec!["devices:write".into(), "devices:read".into()],
            description: "made by acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let info = made.api_key.unwrap();
    assert_eq!(info.tenant, "acme");
    assert!(made.key.starts_with(&format!("sy_{}_", info.key_id)));
    // The new key works, as acme.
    let mut d = devices(&s, &made.key);
    d.create_device(battery_request("acme-1")).await.unwrap();
    // Its second scope counts as much as its first.
    d.list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    let mut opd = devices(&s, &s.keys[0]);
    let e = opd
        .get_device(pb::GetDeviceRequest {
            device_id: "acme-1".into(),
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::NotFound, "DEVICE_NOT_FOUND");
    // Unknown scopes are refused by name.
    for bad in ["webhooks:*", "everything"] {
        let e = acme
            .create_api_key(pb::CreateApiKeyRequest {
                scopes: vec![bad.into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        expect_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    }
    // The operator: tenants, and any tenant's keys.
    let e = op
        .create_tenant(pb::CreateTenantRequest {
            name: "newco".into(),
            rate_per_second: 2_000_000_000,
            rate_burst: 9,
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::InvalidArgument, "INVALID_FIELD");
    let t = op
        .create_tenant(pb::CreateTenantRequest {
            name: "newco".into(),
            rate_per_second: 7,
            rate_burst: 9,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.tenant_id.starts_with("tn_"), "{t:?}");
    let e = op
        .create_tenant(pb::CreateTenantRequest {
            name: "newco".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_error(&e, Code::AlreadyExists, "TENANT_ALREADY_EXISTS");
    let names: Vec<String> = op
        .list_tenants(pb::ListTenantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tenants
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme", "default", "newco"]);
    let listed = op
        .list_api_keys(pb::ListApiKeysRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.api_keys.len(), 2);
    assert!(format!("{listed:?}").contains(&info.key_id));
    assert!(
        !format!("{listed:?}").contains(&made.key),
        "a listing never shows a key"
    );
    op.revoke_api_key(pb::RevokeApiKeyRequest {
        key_id: info.key_id.clone(),
    })
    .await
    .unwrap();
}

/// Auth is off on loopback until a key exists; the first key turns it on
/// for a running server, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_key_turns_auth_on() {
    let s = TestServer::start().await;
    let mut plain = DeviceServiceClient::new(s.channel.clone());
    plain
        .create_device(battery_request("before-keys"))
        .await
        .unwrap();
    let key = Seed::keys(&[("default", &["devices:read"])])
        .apply(&s.app)
        .await
        .remove(0);
    let since = Instant::now();
    loop {
        match plain.list_devices(pb::ListDevicesRequest::default()).await {
            Ok(_) => assert!(since.elapsed() < Duration::from_secs(5), "still open"),
            Err(e) => {
                let d = expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY");
                assert_eq!(d.meta("why"), "missing");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The data of before is the default tenant's.
    let listed = devices(&s, &key)
        .list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.devices[0].device_id, "before-keys");
}

fn admin_cli(db: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .args(["admin", "--database", db])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A key revoked with the command line, by another process, is refused by
/// a running server within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_running_server_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("s.db").display());
    let tenant_id = admin_cli(&db, &["tenant", "create", "field-co"]);
    assert!(tenant_id.starts_with("tn_"), "{tenant_id}");
    let key = admin_cli(
        &db,
        &[
            "key",
            "create",
            "--tenant",
            "field-co",
            "--scopes",
            "devices:read,devices:write",
            "--expires-in",
            "1d",
        ],
    );
    assert!(
        key.starts_with("sy_") && !key.contains(char::is_whitespace),
        "{key}"
    );
    let listed = admin_cli(&db, &["key", "list", "--tenant", "field-co"]);
    let key_id = &key[3..19];
    assert!(
        listed.contains(key_id) && !listed.contains(&key),
        "{listed}"
    );
    let operator = admin_cli(
        &db,
        &["key", "create", "--tenant", "default", "--scopes", "admin"],
    );
    let second = admin_cli(
        &db,
        &[
            "key",
            "create",
            "--tenant",
            "field-co",
            "--scopes",
            "devices:read",
        ],
    );
    let (a, b) = (
        ServerProcess::spawn(BIN, &db),
        ServerProcess::spawn(BIN, &db),
    );
    let channel = b.channel().await;
    let mut d = DeviceServiceClient::new(keyed(channel.clone(), &key));
    d.create_device(battery_request("field-1")).await.unwrap();
    // Revoked through server A's AdminService, with the operator's key ...
    let revoked = AdminServiceClient::new(keyed(a.channel().await, &operator))
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.tenant, "field-co");
    assert!(revoked.revoke_time.is_some());
    // ... refused by server B within 5 s.
    refused_within_5_s(&mut d).await;
    // The same for a key revoked with the command line.
    let mut d2 = DeviceServiceClient::new(keyed(channel, &second));
    d2.list_devices(pb::ListDevicesRequest::default())
        .await
        .unwrap();
    assert_eq!(
        admin_cli(&db, &["key", "revoke", &second[3..19]]),
        format!("revoked {}", &second[3..19])
    );
    refused_within_5_s(&mut d2).await;
    let listed = admin_cli(&db, &["key", "list", "--tenant", "field-co"]);
    assert_eq!(listed.matches("revoked 20").count(), 2, "{listed}");
    // An unknown id is not found.
    let out = std::process::Command::new(BIN)
        .args([
            "admin",
            "--database",
            &db,
            "key",
            "revoke",
            "aaaaaaaaaaaaaaaa",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

/// Polls with a revoked key until it is refused as revoked; fails if that
/// takes 5 s or more.
async fn refused_within_5_s(d: &mut DeviceServiceClient<Keyed>) {
    let since = Instant::now();
    loop {
        match d.list_devices(pb::ListDevicesRequest::default()).await {
            Ok(_) => assert!(
                since.elapsed() < Duration::from_secs(5),
                "the revoked key still works after {:?}",
                since.elapsed()
            ),
            Err(e) => {
                let det = expect_error(&e, Code::Unauthenticated, "INVALID_API_KEY");
                assert_eq!(det.meta("why"), "revoked");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The operator's secrets are not every tenant's: a tenant's device names
/// only the secret files the operator provided for that tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_names_only_the_secrets_provided_for_it() {
    let s = TestServer::start_with_keys(&Seed::keys(&[("default", ALL), ("acme", ALL)])).await;
    s.write_secret("foxess-key", "operator-secret-value");
    let acme_id = s
        .app
        .store
        .tenant_by_name("acme")
        .await
        .unwrap()
        .unwrap()
        .id;
    s.write_secret(
        &format!("{}.foxess-key", acme_id.as_str()),
        "acme-secret-value",
    );
    let fox = |reference: &str| pb::CreateDeviceRequest {
        device_id: "fox-1".into(),
        device: Some(pb::Device {
            family: pb::DeviceFamily::Battery as i32,
            driver: "foxess".into(),
            oem_device_id: "SN-1".into(),
            timezone: "Europe/Berlin".into(),
            settings: [("api_key_ref".to_owned(), reference.to_owned())].into(),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let tenant_refusal = |e: &Status| {
        let d = details(e);
        d.bad_request
            .as_ref()
            .map(|b| {
                b.field_violations.iter().any(|v| {
                    v.field == "device.settings.api_key_ref"
                        && v.description.contains("for this tenant")
                })
            })
            .unwrap_or(false)
    };
    let mut acme = devices(&s, &s.keys[1]);
    for reference in [
        "file:foxess-key".to_owned(),
        "env:SWITCHYARD_SECRET_FOX".to_owned(),
        format!("file:{}.", acme_id.as_str()),
        "file:tn_someone-else.foxess-key".to_owned(),
    ] {
        let e = acme.create_device(fox(&reference)).await.unwrap_err();
        expect_error(&e, Code::InvalidArgument, "INVALID_SETTINGS");
        assert!(tenant_refusal(&e), "{reference}: {e:?}");
        assert!(!format!("{e:?}").contains("secret-value"));
    }
    // Its own file passes the tenant's check (whatever the driver says of
    // the rest); the operator may name any.
    let own = format!("file:{}.foxess-key", acme_id.as_str());
    if let Err(e) = acme.create_device(fox(&own)).await {
        assert!(!tenant_refusal(&e), "{e:?}");
    }
    let mut op = devices(&s, &s.keys[0]);
    if let Err(e) = op.create_device(fox("file:foxess-key")).await {
        assert!(!tenant_refusal(&e), "{e:?}");
    }
}
