//! OpenTelemetry (docs/operations.md, "Traces and OTLP metrics"): spans and
//! metrics exported over OTLP/gRPC when the standard `OTEL_*` variables
//! name a collector, nothing otherwise.
//!
//! - On when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces or metrics one)
//!   is set and `OTEL_SDK_DISABLED` is not `true`; the exporters read the
//!   other `OTEL_*` variables themselves (headers, timeouts, intervals).
//! - Spans: one per RPC (`rpc`, named by its method, its parent taken from
//!   an incoming W3C `traceparent`), per group commit, per driver call and
//!   per webhook delivery, with tenant, device and action ids as
//!   attributes where known.
//! - Metrics: the same measurements as the Prometheus endpoint
//!   ([`crate::metrics`]), under dotted names (`switchyard.push`,
//!   `switchyard.dispatch.lateness`, ...).

use std::sync::OnceLock;

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Histogram, UpDownCounter},
    trace::TracerProvider as _,
};
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider, trace::SdkTracerProvider};

/// The exporters' providers, to flush at exit.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Whether spans are exported (the RPC layer makes its spans then).
    pub fn traces(&self) -> bool {
        self.tracer.is_some()
    }

    /// Sends what is buffered and stops the exporters, within about 2 s
    /// each (a collector that does not answer does not hold up the exit).
    pub fn shutdown(self) {
        let wait = std::time::Duration::from_secs(2);
        if let Some(t) = self.tracer {
            let _ = t.shutdown_with_timeout(wait);
        }
        if let Some(m) = self.meter {
            let _ = m.shutdown_with_timeout(wait);
        }
    }
}

fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the `OTEL_*` variables ask for export.
pub fn configured() -> bool {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
}

/// The instruments [`crate::metrics`] also records to, once export is on.
pub(crate) struct Instruments {
    pub push: Counter<u64>,
    pub conflicts: Counter<u64>,
    pub group_commit: Histogram<f64>,
    pub lateness: Histogram<f64>,
    pub missed: Counter<u64>,
    pub driver_call: Histogram<f64>,
    pub driver_errors: Counter<u64>,
    pub webhooks: Counter<u64>,
    pub watches: UpDownCounter<f64>,
    pub budget: Histogram<f64>,
    pub watch_backlog: Histogram<f64>,
    pub watch_lag: Histogram<f64>,
}

static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();

/// The OTLP instruments, when export is on.
pub(crate) fn instruments() -> Option<&'static Instruments> {
    INSTRUMENTS.get()
}

/// Starts the OTLP exporters if [`configured`], and the W3C trace-context
/// propagator; returns the providers and, for traces, the layer that
/// turns `tracing` spans into OpenTelemetry spans. Call inside the Tokio
/// runtime (the gRPC channels are made here).
pub fn init() -> Result<
    (
        Telemetry,
        Option<
            tracing_opentelemetry::OpenTelemetryLayer<
                tracing_subscriber::Registry,
                opentelemetry_sdk::trace::Tracer,
            >,
        >,
    ),
    String,
> {
    if !configured() {
        return Ok((Telemetry::default(), None));
    }
    global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let resource = Resource::builder().with_service_name("switchyard").build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTLP trace exporter: {e}"))?;
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer("switchyard"));
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| format!("OTLP metric exporter: {e}"))?;
    let meter = SdkMeterProvider::builder()
        .with_periodic_exporter(metrics)
        .with_resource(resource)
        .build();
    global::set_meter_provider(meter.clone());
    let m = global::meter("switchyard");
    let _ = INSTRUMENTS.set(Instruments {
        push: m
            .u64_counter("switchyard.push")
            .with_description("PushAction calls answered, by outcome and reason.")
            .build(),
        conflicts: m
            .u64_counter("switchyard.conflicts")
            .with_description("Pushes refused by a collision, by reason.")
            .build(),
        group_commit: m
            .f64_histogram("switchyard.group_commit.size")
            .with_description("Writes committed per group commit.")
            .build(),
        lateness: m
            .f64_histogram("switchyard.dispatch.lateness")
            .with_unit("s")
            .with_description("When an action's command was sent minus its start.")
            .build(),
        missed: m
            .u64_counter("switchyard.dispatch.missed")
            .with_description("Actions whose window ended before their command was sent.")
            .build(),
        driver_call: m
            .f64_histogram("switchyard.driver.call.duration")
            .with_unit("s")
            .with_description("Driver calls' duration, by driver and operation.")
            .build(),
        driver_errors: m
            .u64_counter("switchyard.driver.errors")
            .with_description("Driver calls that failed.")
            .build(),
        webhooks: m
            .u64_counter("switchyard.webhook.deliveries")
            .with_description("Webhook delivery attempts, by outcome.")
            .build(),
        watches: m
            .f64_up_down_counter("switchyard.event.watches")
            .with_description("Event watches open on this server.")
            .build(),
        budget: m
            .f64_histogram("switchyard.oem.budget.remaining")
            .with_description("Fraction of an OEM account's rate budget left after each write.")
            .build(),
        watch_backlog: m
            .f64_histogram("switchyard.watch.backlog")
            .with_description("Events a watch found to send per read.")
            .build(),
        watch_lag: m
            .f64_histogram("switchyard.watch.lag")
            .with_unit("s")
            .with_description("How old the first event of a watch's read was.")
            .build(),
    });
    Ok((
        Telemetry {
            tracer: Some(tracer),
            meter: Some(meter),
        },
        Some(layer),
    ))
}

/// Attributes from label pairs.
pub(crate) fn attrs(pairs: &[(&'static str, &str)]) -> Vec<KeyValue> {
    pairs
        .iter()
        .map(|(k, v)| KeyValue::new(*k, (*v).to_owned()))
        .collect()
}

/// The span of one RPC: named by its method, its parent the W3C trace
/// context of the request's metadata, if any; `tenant_id`, `device_id`
/// and `action_id` are recorded by the handler once known.
pub fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    // The path is the client's: only a method of this server names a span
    // (anything else is answered UNIMPLEMENTED anyway).
    let raw = request.uri().path();
    let known = raw.len() <= 100
        && (raw.starts_with("/switchyard.v1.")
            || raw.starts_with("/grpc.health.v1.")
            || raw.starts_with("/grpc.reflection."))
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/' || b == b'_');
    let path = if known { raw } else { "unknown" };
    let span = tracing::info_span!(
        "rpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = path,
        tenant_id = tracing::field::Empty,
        device_id = tracing::field::Empty,
        action_id = tracing::field::Empty,
    );
    let parent = global::get_text_map_propagator(|p| p.extract(&Headers(request.headers())));
    let _ = span.set_parent(parent);
    span
}

/// A request's headers as the propagator reads them.
struct Headers<'a>(&'a tonic::codegen::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}
