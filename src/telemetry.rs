//! Logs and traces: the `tracing` subscriber (text or JSON lines on stderr, filtered by
//! `FINSERVE_LOG`) and, with `--otlp-endpoint`, an OpenTelemetry layer that exports every span
//! over OTLP/HTTP (protobuf) in batches from its own thread. Each request's span (`request`,
//! with its `request_id`) gets `tokenize`, `queue`, `inference` and `response` children; the
//! engine measures queue and inference time on its own thread, so those two are recorded
//! afterwards with their measured start and end ([`record_engine_spans`]). An `https://`
//! collector is reached over TLS (rustls with the system's roots, plus `--otlp-ca-file`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::Registry;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const SERVICE: &str = "finserve";

/// Keeps the exporter alive; dropping it flushes the spans not sent yet.
pub struct Telemetry(Option<SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("finserve: flushing traces failed: {e}");
        }
    }
}

/// Where spans go: an OTLP/HTTP collector's base URL (`/v1/traces` is added), and a PEM file of
/// CA certificates it may be signed by besides the system's.
#[derive(Debug, Clone)]
pub struct Otlp {
    pub endpoint: String,
    pub ca_file: Option<PathBuf>,
}

/// Installs the global subscriber, exporting spans to `otlp` if given.
pub fn init(json: bool, otlp: Option<&Otlp>) -> anyhow::Result<Telemetry> {
    let spec = std::env::var("FINSERVE_LOG").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .with_context(|| format!("FINSERVE_LOG=`{spec}` is not a valid log filter"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    }];
    let provider = otlp.map(exporter).transpose()?;
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer(SERVICE))
                .boxed(),
        );
    }
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .context("cannot install the log subscriber")?;
    if let Some(o) = otlp {
        tracing::info!(endpoint = o.endpoint, "exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry(provider))
}

/// The HTTP client of the exporter: rustls (ring) trusting the system's roots and `ca_file`'s.
fn http_client(ca_file: Option<&Path>) -> anyhow::Result<reqwest::blocking::Client> {
    // One provider for the process; a second install (tests) finds it already there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read --otlp-ca-file {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--otlp-ca-file {}: not PEM certificates", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("--otlp-ca-file {} holds no certificate", path.display());
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().context("cannot build the OTLP HTTP client")
}

fn exporter(otlp: &Otlp) -> anyhow::Result<SdkTracerProvider> {
    let base = otlp.endpoint.trim_end_matches('/');
    let endpoint = if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(http_client(otlp.ca_file.as_deref())?)
        .build()
        .with_context(|| format!("--otlp-endpoint {base}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(SERVICE).build())
        .build())
}

/// Records `queue` then `inference` as children of `parent`, starting at `submitted` and
/// lasting what the engine measured. A no-op without an exporter.
pub fn record_engine_spans(
    parent: &tracing::Span,
    submitted: SystemTime,
    queue: Duration,
    inference: Duration,
) {
    let parent = parent.context();
    if !parent.span().span_context().is_valid() {
        return;
    }
    let tracer = opentelemetry::global::tracer(SERVICE);
    let mut start = submitted;
    for (name, took) in [("queue", queue), ("inference", inference)] {
        let mut span = tracer
            .span_builder(name)
            .with_start_time(start)
            .start_with_context(&tracer, &parent);
        start += took;
        span.end_with_timestamp(start);
    }
}
