//! `finserve serve`: listens at once (answering 503 until ready), loads and merges the model off
//! the async runtime, starts the engine, warms every variant up, then serves until SIGTERM or
//! SIGINT and lets in-flight requests finish.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use crate::audit::{Audit, AuditConfig};
use crate::engine::infer::{GenerateQuery, LongInput, ScoreQuery};
use crate::engine::prompt::TruncationDirection;
use crate::engine::validation::GenerateOptions;
use crate::engine::{Engine, EngineConfig};
use crate::http::types::{InfoResponse, Limits, ServedLabels};
use crate::http::{AppState, HttpConfig};
use crate::metrics::METRICS;
use crate::served::{Loaded, ModelJob};
use crate::variants::{RuntimeVariants, StartupModel, Variants, asked_of};

/// One `finserve serve` run, as the command line resolved it.
pub struct ServeJob {
    pub model: ModelJob,
    /// The default model's name (`--served-model-name`).
    pub name: String,
    /// The device as the user named it (`/info`).
    pub device: String,
    pub host: String,
    pub port: u16,
    pub metrics_port: Option<u16>,
    pub engine: EngineConfig,
    pub http: HttpConfig,
    /// How variants may change while serving, if they may.
    pub runtime: Option<RuntimeJob>,
    /// The audit log, if on.
    pub audit: Option<AuditConfig>,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
}

/// Runtime variants: their limits and the file that declares them, if any.
pub struct RuntimeJob {
    pub config: RuntimeVariants,
    pub variants_file: Option<PathBuf>,
    /// How often the variants file is checked for changes.
    pub poll: Duration,
}

pub fn run(job: ServeJob) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(serve(job))
}

async fn serve(job: ServeJob) -> anyhow::Result<()> {
    std::sync::LazyLock::force(&METRICS);
    if let Some(keys) = &job.http.api_keys {
        keys.clone().watch(job.http.api_key_file_poll);
    }
    let state = AppState::new(job.http.clone());
    if let Some(config) = job.audit.clone() {
        let audit = Audit::start(config).context("--audit-log")?;
        let _ = state.audit.set(Arc::new(audit));
    }
    let listener = tokio::net::TcpListener::bind((job.host.as_str(), job.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", job.host, job.port))?;
    tracing::info!(address = %listener.local_addr()?, "listening (not ready until the model is loaded)");
    let metrics_listener = match job.metrics_port {
        Some(port) => {
            let l = tokio::net::TcpListener::bind((job.host.as_str(), port))
                .await
                .with_context(|| {
                    format!("cannot listen on {}:{port} (--metrics-port)", job.host)
                })?;
            tracing::info!(metrics_address = %l.local_addr()?, "serving /metrics");
            Some(l)
        }
        None => None,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_wait = stop_rx.clone();
    let server = tokio::spawn(crate::http::serve(
        listener,
        metrics_listener,
        state.clone(),
        async move {
            let _ = stop_wait.wait_for(|s| *s).await;
        },
        job.shutdown_timeout,
    ));
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let watch = job
        .runtime
        .as_ref()
        .and_then(|r| r.variants_file.clone().map(|f| (f, r.poll)));
    let loading = tokio::task::spawn_blocking(move || start_engine(&job));
    let mut stopped = stop_rx.clone();
    let starting = async {
        let (engine, info, variants) = loading.await.context("model loading task failed")??;
        if let Some(variants) = &variants {
            // The declared variants serve before the replica says it is ready.
            if let Some((file, poll)) = watch {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read --variants-file {}", file.display()))?;
                let failed = variants.reconcile(&text).await;
                tracing::info!(file = %file.display(), failed, "variants file applied");
                tokio::spawn(variants.clone().watch(file, poll, Some(text)));
            }
        }
        anyhow::Ok((engine, info, variants))
    };
    tokio::select! {
        started = starting => {
            let (engine, info, variants) = started?;
            let _ = state.info.set(info);
            let _ = state.engine.set(engine);
            if let Some(v) = variants {
                let _ = state.variants.set(v);
            }
            state.ready.store(true, Ordering::SeqCst);
            tracing::info!("ready");
        }
        _ = stopped.wait_for(|s| *s) => {
            tracing::info!("stopped while loading");
        }
    }
    server.await.context("server task failed")??;
    signal.abort();
    if let Some(audit) = state.audit.get() {
        // The last answers' records are in the queue still.
        audit.sync(Duration::from_secs(10)).await;
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Loads and merges the model, starts the engine and warms it up with one request of each kind
/// per variant; with runtime variants, keeps the base to merge from. Runs on a blocking thread.
fn start_engine(job: &ServeJob) -> anyhow::Result<(Engine, InfoResponse, Option<Arc<Variants>>)> {
    let mut loaded = job.model.load(job.runtime.is_some())?;
    let m = &loaded.model;
    METRICS.model_load_seconds.set(m.load_seconds);
    METRICS.merge_seconds.set(m.merge_seconds);
    tracing::info!(
        seconds = m.load_seconds,
        merge_seconds = m.merge_seconds,
        adapters = m.reports.len(),
        variants = m.variants.len(),
        weight_bytes = m.weight_bytes,
        quantize = job.model.spec.quantize.as_str(),
        "model loaded"
    );
    let labels: Vec<_> = loaded.labels.iter().map(|(l, c)| (l, c)).collect();
    let labels: &ServedLabels<'_> = &labels;
    let info = InfoResponse::new(
        job.name.clone(),
        &job.model.spec,
        m,
        &job.device,
        labels,
        &loaded.digests,
        &job.model.prompt_template,
        Limits::new(&job.engine, &job.http),
    );
    let runtime = match (&job.runtime, loaded.model.base.take()) {
        (Some(r), Some(base)) => Some((r.config.clone(), base, startup_models(job, &loaded))),
        _ => None,
    };
    let files = loaded.model.files.clone();
    let (served, tokenizer) = loaded.served(job.name.clone());
    let tokenizer = Arc::new(tokenizer);
    let engine = Engine::start(served, tokenizer.clone(), job.engine.clone())?;
    crate::served::check_chunk_overlap(&engine)?;
    for v in engine.variants() {
        warm_up(&engine, &v.name)?;
    }
    let variants = runtime.map(|(config, base, startup)| {
        Arc::new(Variants::new(
            engine.clone(),
            job.model.clone(),
            config,
            base,
            files,
            tokenizer,
            startup,
        ))
    });
    Ok((engine, info, variants))
}

/// The models start-up serves, as the runtime variants' list starts.
fn startup_models(job: &ServeJob, loaded: &Loaded) -> Vec<StartupModel> {
    let m = &loaded.model;
    let spec = &job.model.spec;
    let default = (job.name.clone(), &spec.adapters, &m.model, &m.reports);
    let others = spec
        .variants
        .iter()
        .zip(&m.variants)
        .map(|(s, v)| (v.name.clone(), &s.adapters, &v.model, &v.reports));
    std::iter::once(default)
        .chain(others)
        .zip(&loaded.labels)
        .zip(&loaded.digests)
        .map(
            |(((name, adapters, model, reports), (_, calibration)), digest)| StartupModel {
                name,
                asked: asked_of(adapters),
                model: model.clone(),
                reports: reports.clone(),
                digest: digest.clone(),
                calibration: calibration.clone(),
            },
        )
        .collect()
}

/// One sentiment request and one short generation through the request-level calls.
fn warm_up(engine: &Engine, variant: &str) -> anyhow::Result<()> {
    let text = "Operating profit rose .";
    let scored = engine.score_blocking(ScoreQuery {
        texts: vec![text.into()],
        variant: Some(variant.into()),
        long_input: LongInput::Truncate(TruncationDirection::Right),
        ..Default::default()
    })?;
    let probs = scored.texts.first().map(|t| t.probs.clone());
    tracing::info!(variant, ?probs, "warm-up sentiment done");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("cannot start the warm-up runtime")?;
    let query = GenerateQuery {
        text: text.into(),
        variant: Some(variant.into()),
        options: GenerateOptions {
            max_new_tokens: Some(2),
            ..Default::default()
        },
        ..Default::default()
    };
    rt.block_on(async {
        let generation = engine.generate_text(query).await?;
        generation.collect(None).await
    })
    .context("warm-up generation failed")?;
    Ok(())
}
