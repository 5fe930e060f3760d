//! Test harness: a real switchyard server on a loopback port with a fresh
//! database, gRPC clients for it, and a decoder for rich error details.

pub mod postgres;
pub mod receiver;

use std::{sync::Arc, time::Duration};

use prost::Message;
use switchyard::{
    api::App,
    domain::{Clock, ManualClock, SystemClock, Ts},
    server,
};
use switchyard_drivers::Registry;
use switchyard_proto::v1::{
    self as pb, action_service_client::ActionServiceClient,
    device_service_client::DeviceServiceClient,
};
use tonic::transport::{Channel, Endpoint};
use tonic_types::pb as rpc;

/// Tenants and API keys to make before a server serves.
#[derive(Clone, Debug, Default)]
pub struct Seed {
    /// Tenants to create: name, per-key rate per second and burst (`None`:
    /// the defaults). `default` exists already.
    pub tenants: Vec<(&'static str, Option<u32>, Option<u32>)>,
    /// Keys to create: tenant name, scopes, lifetime in seconds.
    pub keys: Vec<(&'static str, Vec<&'static str>, Option<u64>)>,
    /// Webhook URL prefixes the operator allows on internal addresses
    /// (`--webhook-url-allow`): test receivers on loopback.
    pub webhook_url_allow: Vec<String>,
}

impl Seed {
    /// One key per (tenant, scopes); tenants other than `default` are
    /// created with the default rates.
    pub fn keys(keys: &[(&'static str, &[&'static str])]) -> Self {
        let mut tenants: Vec<(&'static str, Option<u32>, Option<u32>)> = Vec::new();
        for (t, _) in keys {
            if *t != "default" && !tenants.iter().any(|x| x.0 == *t) {
                tenants.push((t, None, None));
            }
        }
        Self {
            tenants,
            keys: keys.iter().map(|(t, s)| (*t, s.to_vec(), None)).collect(),
            ..Default::default()
        }
    }

    /// Makes them in `app`'s store; returns the keys.
    pub async fn apply(&self, app: &App) -> Vec<String> {
        use switchyard::api::admin;
        for (name, rate, burst) in &self.tenants {
            admin::create_tenant(&app.store, app.clock.as_ref(), name, *rate, *burst)
                .await
                .expect("create tenant");
        }
        let mut out = Vec::new();
        for (tenant, scopes, secs) in &self.keys {
            let t = app
                .store
                .tenant_by_name(tenant)
                .await
                .expect("read tenant")
                .expect("tenant exists");
            let scopes =
                switchyard::auth::Scope::parse_list(scopes.iter().copied()).expect("scopes");
            let (_, key) = admin::create_key(
                &app.store,
                app.clock.as_ref(),
                &t,
                &scopes,
                secs.map(Duration::from_secs),
                "test",
            )
            .await
            .expect("create key");
            out.push(key);
        }
        out
    }
}

/// Adds `authorization: Bearer <key>` to every call of a client.
#[derive(Clone, Debug)]
pub struct BearerKey(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerKey {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// A channel whose every call carries `key`.
pub type Keyed = tonic::service::interceptor::InterceptedService<Channel, BearerKey>;

/// `channel`, with every call carrying `key`.
pub fn keyed(channel: Channel, key: &str) -> Keyed {
    let value = format!("Bearer {key}").parse().expect("ascii key");
    tonic::service::interceptor::InterceptedService::new(channel, BearerKey(value))
}

/// A CreateDeviceRequest for a simulated battery `id` (the device
/// [`TestServer::battery`] registers), for clients of any key.
pub fn battery_request(id: &str) -> pb::CreateDeviceRequest {
    pb::CreateDeviceRequest {
        device_id: id.into(),
        device: Some(pb::Device {
            family: pb::DeviceFamily::Battery as i32,
            driver: "simulated".into(),
            timezone: "Europe/London".into(),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

/// `request` with `authorization: Bearer key`.
pub fn with_key<T>(key: &str, request: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(request);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii key"),
    );
    r
}

/// 2030-01-01T00:00:00Z: where the manual clock of [`TestServer::start`]
/// stands.
pub const T0: i64 = 1_893_456_000;

/// A server under test, stopped on drop.
pub struct TestServer {
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// A channel to it.
    pub channel: Channel,
    /// Its state (store access for checks that gRPC cannot express).
    pub app: App,
    /// The clock the server reads; tests move it.
    pub clock: ManualClock,
    /// The simulated driver's factory (its virtual devices can be
    /// inspected).
    pub sim: switchyard_drivers::simulated::SimulatedFactory,
    /// The operator's secrets directory (`file:<name>` references).
    pub secrets: std::path::PathBuf,
    /// The API keys made before it started ([`TestServer::start_with_keys`]),
    /// in the order asked for.
    pub keys: Vec<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server on a fresh SQLite file, with a manual clock at [`T0`].
    pub async fn start() -> Self {
        Self::start_allowing(&[]).await
    }

    /// [`TestServer::start`], whose operator also allows OEM endpoints
    /// under `urls` (an emulator's base URL).
    pub async fn start_allowing(urls: &[String]) -> Self {
        let clock = ManualClock::new(Ts(T0 * Ts::SECOND));
        Self::start_with_clock(clock.clone(), Arc::new(clock), urls, &Seed::default()).await
    }

    /// A server on a fresh SQLite file reading the system clock.
    pub async fn start_real_time() -> Self {
        let clock = ManualClock::new(Ts(0));
        Self::start_with_clock(clock, Arc::new(SystemClock), &[], &Seed::default()).await
    }

    /// [`TestServer::start`] with tenants and API keys made before it
    /// serves (so auth is on from the first call): `seed.keys[i]` becomes
    /// `self.keys[i]`.
    pub async fn start_with_keys(seed: &Seed) -> Self {
        let clock = ManualClock::new(Ts(T0 * Ts::SECOND));
        Self::start_with_clock(clock.clone(), Arc::new(clock), &[], seed).await
    }

    async fn start_with_clock(
        manual: ManualClock,
        clock: Arc<dyn Clock>,
        urls: &[String],
        seed: &Seed,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("switchyard.db").display());
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).expect("secrets dir");
        let policy = switchyard_drivers::OperatorPolicy {
            secrets_dir: Some(secrets.clone()),
            url_allow: urls.to_vec(),
        };
        let sim = switchyard_drivers::simulated::SimulatedFactory::default();
        let mut registry = Registry::builtin_with(&policy);
        registry.register(Arc::new(sim.clone()));
        // FoxESS drivers read the server's clock, so their timing checks
        // agree with the manual clock.
        let fox_clock = clock.clone();
        registry.register(Arc::new(
            switchyard_drivers::foxess::FoxessFactory::default()
                .with_policy(policy)
                .with_clock(Arc::new(move || fox_clock.now().to_jiff())),
        ));
        let mut app = server::build_app(&url, clock, registry, server::DEFAULT_HORIZON_DAYS)
            .await
            .expect("open store");
        app.webhooks = Arc::new(switchyard::delivery::DeliveryConfig {
            policy: switchyard::webhooks::TargetPolicy {
                allow: seed.webhook_url_allow.clone(),
            },
            timeout: Duration::from_secs(2),
            ..Default::default()
        });
        let keys = seed.apply(&app).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = app.clone();
        let task = tokio::spawn(async move {
            server::serve(
                serving,
                listener,
                &switchyard::limits::Limits::default(),
                async {
                    let _ = stopped.await;
                },
                Duration::from_secs(5),
                None,
            )
            .await
            .expect("server");
        });
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect");
        Self {
            addr,
            channel,
            app,
            clock: manual,
            sim,
            secrets,
            keys,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// [`TestServer::start`], whose operator allows webhook receivers
    /// under `urls` (loopback [`receiver::Receiver`]s).
    pub async fn start_with_receivers(urls: &[String]) -> Self {
        Self::start_with_keys(&Seed {
            webhook_url_allow: urls.to_vec(),
            ..Default::default()
        })
        .await
    }

    /// A webhook deliverer over this server's store and clock; tests drive
    /// it (no background delivery runs in a test server).
    pub fn deliverer(&self) -> switchyard::delivery::Deliverer {
        switchyard::delivery::Deliverer::new(
            self.app.store.clone(),
            self.app.clock.clone(),
            self.app.webhooks.clone(),
        )
    }

    /// Writes secret `name` into the operator's secrets directory, for a
    /// device to name as `file:<name>`.
    pub fn write_secret(&self, name: &str, value: &str) {
        std::fs::write(self.secrets.join(name), format!("{value}\n")).expect("write secret");
    }

    /// A dispatcher over this server's store and drivers; tests drive it
    /// (no background loop runs in a test server).
    pub fn dispatcher(&self) -> switchyard::dispatch::Dispatcher {
        server::dispatcher(&self.app, switchyard::dispatch::DispatchConfig::default())
    }

    /// Runs every dispatch that is due at the clock's now, after observing
    /// every device.
    pub async fn dispatch(&self) -> usize {
        let d = self.dispatcher();
        d.observe_due(true).await.expect("observe");
        d.drain().await.expect("dispatch")
    }

    /// The server's now.
    pub fn clock_now(&self) -> Ts {
        use switchyard::domain::Clock as _;
        self.clock.now()
    }

    /// DeviceService client.
    pub fn devices(&self) -> DeviceServiceClient<Channel> {
        DeviceServiceClient::new(self.channel.clone())
    }

    /// ActionService client.
    pub fn actions(&self) -> ActionServiceClient<Channel> {
        ActionServiceClient::new(self.channel.clone())
    }

    /// Registers a simulated device of `family`.
    pub async fn create_device(&self, id: &str, family: pb::DeviceFamily) -> pb::Device {
        self.register(
            id,
            pb::Device {
                family: family as i32,
                driver: "simulated".into(),
                timezone: "Europe/London".into(),
                ..Default::default()
            },
        )
        .await
    }

    /// CreateDevice `id` as `device`, expecting success.
    async fn register(&self, id: &str, device: pb::Device) -> pb::Device {
        self.devices()
            .create_device(pb::CreateDeviceRequest {
                device_id: id.to_owned(),
                device: Some(device),
                request_id: String::new(),
            })
            .await
            .expect("create device")
            .into_inner()
    }

    /// Registers a simulated battery.
    pub async fn battery(&self, id: &str) -> pb::Device {
        self.create_device(id, pb::DeviceFamily::Battery).await
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A protobuf timestamp `secs` seconds after [`T0`].
pub fn at(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: T0 + secs,
        nanos: 0,
    }
}

/// An action on the mode channel: `command` from `start` to `end`
/// (seconds after [`T0`]; `None` = unset).
pub fn action(command: pb::Command, start: Option<i64>, end: Option<i64>) -> pb::Action {
    pb::Action {
        command: command as i32,
        start_time: start.map(at),
        end_time: end.map(at),
        ..Default::default()
    }
}

/// [`action`] with both ends set: `command` from `start` to `end`
/// (seconds after [`T0`]).
pub fn window(command: pb::Command, start: i64, end: i64) -> pb::Action {
    action(command, Some(start), Some(end))
}

/// A push request.
pub fn push(
    device: &str,
    action: pb::Action,
    on_conflict: pb::ConflictStrategy,
) -> pb::PushActionRequest {
    pb::PushActionRequest {
        device_id: device.to_owned(),
        action: Some(action),
        on_conflict: on_conflict as i32,
        validate_only: false,
        request_id: String::new(),
    }
}

/// The rich details of an error status, decoded.
#[derive(Debug, Default)]
pub struct Details {
    /// The ErrorInfo (always present on switchyard errors).
    pub info: Option<rpc::ErrorInfo>,
    /// BadRequest, if any.
    pub bad_request: Option<rpc::BadRequest>,
    /// ConflictDetail, if any.
    pub conflict: Option<pb::ConflictDetail>,
    /// RetryInfo, if any.
    pub retry: Option<rpc::RetryInfo>,
    /// SchedulerDetail, if any.
    pub scheduler: Option<pb::SchedulerDetail>,
    /// PreconditionFailure, if any.
    pub precondition: Option<rpc::PreconditionFailure>,
    /// ResourceInfo, if any.
    pub resource: Option<rpc::ResourceInfo>,
    /// QuotaFailure, if any.
    pub quota: Option<rpc::QuotaFailure>,
    /// Type URLs in order.
    pub type_urls: Vec<String>,
}

impl Details {
    /// The ErrorInfo reason.
    pub fn reason(&self) -> &str {
        self.info.as_ref().map(|i| i.reason.as_str()).unwrap_or("")
    }

    /// An ErrorInfo metadata value.
    pub fn meta(&self, key: &str) -> &str {
        self.info
            .as_ref()
            .and_then(|i| i.metadata.get(key))
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Fields named by BadRequest, in order.
    pub fn fields(&self) -> Vec<String> {
        self.bad_request
            .as_ref()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default()
    }
}

/// Decodes the details of `status`; panics if they are not a valid
/// google.rpc.Status or carry an unknown type.
pub fn details(status: &tonic::Status) -> Details {
    let body = rpc::Status::decode(status.details()).expect("details are a google.rpc.Status");
    assert_eq!(
        body.code,
        status.code() as i32,
        "details code matches the status code"
    );
    let mut d = Details::default();
    for any in body.details {
        d.type_urls.push(any.type_url.clone());
        let (url, v) = (any.type_url.as_str(), any.value.as_slice());
        match url {
            "type.googleapis.com/google.rpc.ErrorInfo" => d.info = decode(url, v),
            "type.googleapis.com/google.rpc.BadRequest" => d.bad_request = decode(url, v),
            "type.googleapis.com/switchyard.v1.ConflictDetail" => d.conflict = decode(url, v),
            "type.googleapis.com/switchyard.v1.SchedulerDetail" => d.scheduler = decode(url, v),
            "type.googleapis.com/google.rpc.RetryInfo" => d.retry = decode(url, v),
            "type.googleapis.com/google.rpc.PreconditionFailure" => d.precondition = decode(url, v),
            "type.googleapis.com/google.rpc.ResourceInfo" => d.resource = decode(url, v),
            "type.googleapis.com/google.rpc.QuotaFailure" => d.quota = decode(url, v),
            other => panic!("unexpected detail type {other}"),
        }
    }
    let info = d.info.as_ref().expect("every error carries ErrorInfo");
    assert_eq!(info.domain, "switchyard");
    d
}

/// One detail of type `url`, decoded; panics if it does not decode.
fn decode<M: Message + Default>(url: &str, value: &[u8]) -> Option<M> {
    Some(M::decode(value).expect(url))
}

/// Decodes the details of `status` (see [`details`]), asserting its code
/// and ErrorInfo reason.
pub fn expect_error(status: &tonic::Status, code: tonic::Code, reason: &str) -> Details {
    let d = details(status);
    assert_eq!((status.code(), d.reason()), (code, reason), "{status:?}");
    d
}

// ---- shorthands for the RPCs the tests repeat ----

/// `latency_ms` 0 plus `settings`: a simulated device's settings.
fn sim_settings(settings: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    let mut all = std::collections::BTreeMap::from([("latency_ms".into(), "0".into())]);
    for (k, v) in settings {
        all.insert((*k).into(), (*v).into());
    }
    all
}

impl TestServer {
    /// Sets the server's clock `secs` seconds after [`T0`].
    pub fn at_secs(&self, secs: i64) {
        self.clock.set(Ts((T0 + secs) * Ts::SECOND));
    }

    /// Sets the clock `secs` seconds after [`T0`], then runs what is due
    /// (see [`TestServer::dispatch`]).
    pub async fn dispatch_at(&self, secs: i64) -> usize {
        self.at_secs(secs);
        self.dispatch().await
    }

    /// Creates a simulated battery `id` with `latency_ms` 0 and `settings`.
    pub async fn sim_device(&self, id: &str, settings: &[(&str, &str)]) {
        self.register(
            id,
            pb::Device {
                family: pb::DeviceFamily::Battery as i32,
                driver: "simulated".into(),
                settings: sim_settings(settings),
                ..Default::default()
            },
        )
        .await;
    }

    /// Replaces a device's settings (`latency_ms` 0 plus `settings`).
    pub async fn set_settings(&self, id: &str, settings: &[(&str, &str)]) {
        self.devices()
            .update_device(pb::UpdateDeviceRequest {
                device: Some(pb::Device {
                    device_id: id.into(),
                    settings: sim_settings(settings),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["settings".into()],
                }),
                request_id: String::new(),
            })
            .await
            .expect("rpc");
    }

    /// A device, expecting it to exist.
    pub async fn get_device(&self, id: &str) -> pb::Device {
        self.get_device_result(id).await.expect("rpc")
    }

    /// GetDevice, expecting it to be refused; the status.
    pub async fn get_device_err(&self, id: &str) -> tonic::Status {
        self.get_device_result(id).await.expect_err("get refused")
    }

    async fn get_device_result(&self, id: &str) -> Result<pb::Device, tonic::Status> {
        self.devices()
            .get_device(pb::GetDeviceRequest {
                device_id: id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Pushes, expecting success; the whole answer.
    pub async fn push_ok(&self, req: pb::PushActionRequest) -> pb::PushActionResponse {
        self.actions()
            .push_action(req)
            .await
            .expect("push accepted")
            .into_inner()
    }

    /// Pushes, expecting success; the booked action.
    pub async fn pushed(&self, req: pb::PushActionRequest) -> pb::Action {
        self.push_ok(req).await.action.expect("rpc")
    }

    /// Pushes `action` to `device` with no conflict strategy, expecting
    /// success; the booked action.
    pub async fn book(&self, device: &str, action: pb::Action) -> pb::Action {
        self.pushed(push(device, action, pb::ConflictStrategy::Unspecified))
            .await
    }

    /// Pushes, expecting it to be refused; the status.
    pub async fn refused(&self, req: pb::PushActionRequest) -> tonic::Status {
        self.actions()
            .push_action(req)
            .await
            .expect_err("push refused")
    }

    /// An action, expecting it to exist.
    pub async fn get(&self, device: &str, id: &str) -> pb::Action {
        self.get_result(device, id).await.expect("rpc")
    }

    /// GetAction, expecting it to be refused; the status.
    pub async fn get_err(&self, device: &str, id: &str) -> tonic::Status {
        self.get_result(device, id).await.expect_err("get refused")
    }

    async fn get_result(&self, device: &str, id: &str) -> Result<pb::Action, tonic::Status> {
        self.actions()
            .get_action(pb::GetActionRequest {
                device_id: device.into(),
                action_id: id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The first page of a device's actions (every state; device `-`: of
    /// every device), expecting success.
    pub async fn list(&self, device: &str) -> Vec<pb::Action> {
        self.actions()
            .list_actions(pb::ListActionsRequest {
                device_id: device.into(),
                ..Default::default()
            })
            .await
            .expect("rpc")
            .into_inner()
            .actions
    }

    /// Cancels an action (no etag, no request id), expecting success; the
    /// cancelled action.
    pub async fn cancel(&self, device: &str, id: &str) -> pb::Action {
        self.actions()
            .cancel_action(pb::CancelActionRequest {
                device_id: device.into(),
                action_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("cancel")
            .into_inner()
    }

    /// The states an action went through, oldest first, from the audit log.
    pub async fn history(&self, id: &str) -> Vec<String> {
        self.app
            .store
            .action_history(
                &switchyard::domain::TenantId::default_tenant(),
                &switchyard::domain::ActionId::parse(id).expect("action id"),
            )
            .await
            .expect("rpc")
            .into_iter()
            .map(|(_, to, _)| to)
            .collect()
    }
}

// ---- server processes ----

/// A `switchyard serve` process on a loopback port, for tests that need
/// more than one process (or a real crash). Killed (SIGKILL) on drop, so a
/// failing test never leaves a server behind.
pub struct ServerProcess {
    /// The address it listens on (`127.0.0.1:PORT`).
    pub addr: String,
    child: std::process::Child,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Spawns `exe serve --no-demo` on `database`, listening on a free
    /// port, and waits until it serves. `exe` is the test's
    /// `env!("CARGO_BIN_EXE_switchyard-under-test")`: only integration tests
    /// see that variable, so it cannot be read here.
    pub fn spawn(exe: &str, database: &str) -> Self {
        Self::spawn_with(exe, database, &[], &[])
    }

    /// [`ServerProcess::spawn`] with more `serve` arguments and environment
    /// variables. The server logs JSON at `SWITCHYARD_LOG` (default info);
    /// every line is kept for [`ServerProcess::log`].
    pub fn spawn_with(exe: &str, database: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--database", database])
            .args(["--no-demo", "--log-format", "json"])
            .args(["--shutdown-grace-seconds", "3"])
            .args(args)
            .env("SWITCHYARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn server");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Port 0 is chosen by the OS; the `listening` line names it.
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("server exited before listening: {:?}", log))
                .expect("read server log");
            log.lock().expect("log").push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == "listening" {
                break v["fields"]["addr"].as_str().expect("addr").to_owned();
            }
        };
        // Keep draining (and keeping) the log so the server never blocks on
        // a full pipe.
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(mut l) = keep.lock() {
                    l.push(line);
                }
            }
        });
        Self { addr, child, log }
    }

    /// Every line the server logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -TERM {pid}");
    }

    /// The exit status, once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// A channel to it.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
