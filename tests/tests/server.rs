//! The server as a whole: reflection, health, malformed bytes, a push
//! storm, durability across kill -9, graceful shutdown.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::HashSet, time::Duration};

use switchyard_proto::v1::{self as pb, Command, ConflictStrategy as S};
use switchyard_tests::{ServerProcess, TestServer, action, details, expect_error, push, window};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

const H: i64 = 3600;

#[tokio::test]
async fn reflection_v1_and_v1alpha_serve_our_services_and_the_error_detail_types() {
    use tonic_reflection::pb::{v1, v1alpha};
    let srv = TestServer::start().await;

    // v1alpha (what grpcurl 1.8 speaks).
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(srv.channel.clone());
    let reqs = vec![
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        },
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "switchyard.v1.ConflictDetail".into(),
                ),
            ),
        },
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "google.rpc.ErrorInfo".into(),
                ),
            ),
        },
    ];
    let mut out = c
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    while let Some(r) = out.next().await {
        answers.push(r.unwrap().message_response.unwrap());
    }
    use v1alpha::server_reflection_response::MessageResponse as M;
    let M::ListServicesResponse(list) = &answers[0] else {
        panic!("{:?}", answers[0])
    };
    let names: HashSet<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for s in [
        "switchyard.v1.ActionService",
        "switchyard.v1.DeviceService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(s), "{s} missing from {names:?}");
    }
    for a in &answers[1..] {
        let M::FileDescriptorResponse(f) = a else {
            panic!("{a:?}")
        };
        assert!(!f.file_descriptor_proto.is_empty());
    }

    // v1.
    let mut c = v1::server_reflection_client::ServerReflectionClient::new(srv.channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut out = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let first = out.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        first.message_response
    else {
        panic!("no list")
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "switchyard.v1.ActionService")
    );
}

#[tokio::test]
async fn health_reports_serving_overall_and_per_service() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let srv = TestServer::start().await;
    let mut h = HealthClient::new(srv.channel.clone());
    for service in [
        "",
        "switchyard.v1.ActionService",
        "switchyard.v1.DeviceService",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
}

/// Sends raw bytes as the request message.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;
#[derive(Clone, Copy, Debug, Default)]
struct RawEncoder;
#[derive(Clone, Copy, Debug, Default)]
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes_buf::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes_buf::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

mod bytes_buf {
    pub use bytes::{Buf, BufMut};
}

async fn raw_call(
    ch: Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    g.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn garbage_bytes_are_invalid_argument_never_internal() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    for body in [
        vec![0xff, 0xff, 0xff],
        vec![0x0a, 0x80],
        b"\x12\x05ab".to_vec(),
        vec![0x08; 7],
    ] {
        for path in [
            "/switchyard.v1.ActionService/PushAction",
            "/switchyard.v1.DeviceService/CreateDevice",
            "/switchyard.v1.ActionService/CancelAction",
        ] {
            let st = raw_call(srv.channel.clone(), path, body.clone())
                .await
                .unwrap_err();
            assert_eq!(st.code(), Code::InvalidArgument, "{path} {body:?}: {st:?}");
            assert_eq!(details(&st).reason(), "MALFORMED_REQUEST");
        }
    }
    // The server is still fine.
    srv.book("b", action(Command::Charge, Some(H), None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_overlapping_pushes_books_exactly_one() {
    let srv = TestServer::start().await;
    srv.battery("b").await;
    let n = 240;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut client = srv.actions();
        // Every window overlaps every other: all start within 40 min of
        // each other and last an hour.
        tasks.push(tokio::spawn(async move {
            let start = H + (i as i64 * 10);
            client
                .push_action(push(
                    "b",
                    window(Command::Charge, start, start + H),
                    S::Unspecified,
                ))
                .await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => winners.push(r.into_inner().action.unwrap().action_id),
            Err(st) => losers.push(st),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one push holds the channel");
    assert_eq!(losers.len(), n - 1);
    for st in &losers {
        let d = expect_error(st, Code::FailedPrecondition, "ACTION_CONFLICT");
        assert_eq!(d.meta("conflicting_action_ids"), winners[0]);
        assert_eq!(
            d.conflict.as_ref().unwrap().conflicts[0].action_id,
            winners[0]
        );
    }
    assert_eq!(srv.list("b").await.len(), 1);
}

const BIN: &str = env!("CARGO_BIN_EXE_switchyard-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_push_survives_kill_9() {
    use pb::{
        action_service_client::ActionServiceClient, device_service_client::DeviceServiceClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("crash.db").display());
    let s = ServerProcess::spawn(BIN, &db);
    let ch = s.channel().await;
    DeviceServiceClient::new(ch.clone())
        .create_device(pb::CreateDeviceRequest {
            device_id: "k".into(),
            device: Some(pb::Device {
                family: 1,
                driver: "simulated".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap();

    // Writers push disjoint windows as fast as they can; the process is
    // killed while they are mid-flight.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let mut c = ActionServiceClient::new(ch.clone());
        let tx = acked_tx.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..10_000i64 {
                // Start times far enough ahead for a real clock.
                let start = chrono_free_now() + 86_400 + (w * 10_000 + i) * 120;
                let unix = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
                let charge = pb::Action {
                    command: Command::Charge as i32,
                    start_time: unix(start),
                    end_time: unix(start + 60),
                    ..Default::default()
                };
                let req = push("k", charge, S::Unspecified);
                match c.push_action(req).await {
                    Ok(r) => {
                        let _ = tx.send(r.into_inner().action.unwrap().action_id);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acked = Vec::new();
    while acked.len() < 150 {
        acked.push(acked_rx.recv().await.expect("acks"));
    }
    drop(s); // SIGKILL, and waits for the process
    for w in writers {
        let _ = w.await;
    }
    while let Ok(id) = acked_rx.try_recv() {
        acked.push(id);
    }

    let s2 = ServerProcess::spawn(BIN, &db);
    let mut c = ActionServiceClient::new(s2.channel().await);
    for id in &acked {
        let a = c
            .get_action(pb::GetActionRequest {
                device_id: "k".into(),
                action_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("acknowledged action {id} lost: {e:?}"));
        assert_eq!(a.into_inner().state, pb::ActionState::Scheduled as i32);
    }
    eprintln!(
        "{} acknowledged actions all present after kill -9",
        acked.len()
    );
}

fn chrono_free_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// SIGTERM while a call is running: health turns NOT_SERVING at once, the
/// call completes, and the process exits as soon as it has — well inside
/// its 3 s grace period, which it would wait out if draining were broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_call_finish_reports_not_serving_and_exits_promptly() {
    use pb::device_service_client::DeviceServiceClient;
    use switchyard_drivers::foxess::emulator::{Emulator, EmulatorConfig};
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    // A slow OEM makes CreateDevice slow: it observes the device first
    // (two calls, 700 ms each).
    let emu = Emulator::start(EmulatorConfig::new("k3y-term", &["SN-T"]))
        .await
        .unwrap();
    emu.set_latency(Duration::from_millis(700));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "k3y-term").unwrap();
    let db = format!("sqlite://{}", dir.path().join("term.db").display());
    let mut s = ServerProcess::spawn_with(
        BIN,
        &db,
        &[
            "--secrets-dir",
            dir.path().to_str().unwrap(),
            "--oem-url-allow",
            &emu.base_url(),
        ],
        &[],
    );
    let ch = s.channel().await;
    let mut watch = HealthClient::new(ch.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut live = HealthClient::new(ch.clone())
        .watch(HealthCheckRequest {
            service: switchyard::server::LIVENESS.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let alive = live.next().await.unwrap().unwrap();
    assert_eq!(alive.status, ServingStatus::Serving as i32);

    let create = tokio::spawn({
        let ch = ch.clone();
        let url = emu.base_url();
        async move {
            DeviceServiceClient::new(ch)
                .create_device(pb::CreateDeviceRequest {
                    device_id: "slow".into(),
                    device: Some(pb::Device {
                        family: 1,
                        driver: "foxess".into(),
                        oem_device_id: "SN-T".into(),
                        settings: [
                            ("base_url".to_owned(), url),
                            ("api_key_ref".to_owned(), "file:key".to_owned()),
                        ]
                        .into_iter()
                        .collect(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
        }
    });
    // The call is with the emulator by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = std::time::Instant::now();
    s.terminate();

    // Health says NOT_SERVING while the call is still running.
    let next = tokio::time::timeout(Duration::from_secs(1), watch.next())
        .await
        .expect("health changes at once")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // Liveness too: the process is going away.
    let dying = tokio::time::timeout(Duration::from_secs(1), live.next())
        .await
        .expect("liveness changes at once")
        .unwrap()
        .unwrap();
    assert_eq!(dying.status, ServingStatus::NotServing as i32);
    assert!(!create.is_finished(), "the call is still running");
    drop(watch);
    drop(live);

    // The running call completes, with its answer.
    let created = create.await.unwrap().expect("the running call completes");
    let done = term.elapsed();
    assert_eq!(created.into_inner().device_id, "slow");
    // And the process exits right after: well before the 3 s grace.
    let exited = loop {
        if let Some(status) = s.try_wait() {
            assert!(status.success(), "exit status {status:?}");
            break term.elapsed();
        }
        assert!(
            term.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        exited < done + Duration::from_millis(1000) && exited < Duration::from_millis(2700),
        "call done {done:?} after SIGTERM, exit {exited:?}"
    );
    // New calls are refused once draining began (the listener is closed).
    assert!(
        tokio::net::TcpStream::connect(&s.addr).await.is_err(),
        "no longer listening"
    );
}
