//! `finserve serve`: listens at once (answering 503 until ready), loads and merges the model off
//! the async runtime, starts the engine, warms every variant up, then serves until SIGTERM or
//! SIGINT and lets in-flight requests finish.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;

use crate::engine::infer::{GenerateQuery, LongInput, ScoreQuery};
use crate::engine::prompt::TruncationDirection;
use crate::engine::validation::GenerateOptions;
use crate::engine::{Engine, EngineConfig};
use crate::http::types::{InfoResponse, Limits, ServedLabels};
use crate::http::{AppState, HttpConfig};
use crate::metrics::METRICS;
use crate::served::ModelJob;

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
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
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

    let loading = tokio::task::spawn_blocking(move || start_engine(&job));
    let mut stopped = stop_rx.clone();
    tokio::select! {
        loaded = loading => {
            let (engine, info) = loaded.context("model loading task failed")??;
            let _ = state.info.set(info);
            let _ = state.engine.set(engine);
            state.ready.store(true, Ordering::SeqCst);
            tracing::info!("ready");
        }
        _ = stopped.wait_for(|s| *s) => {
            tracing::info!("stopped while loading");
        }
    }
    server.await.context("server task failed")??;
    signal.abort();
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
/// per variant. Runs on a blocking thread.
fn start_engine(job: &ServeJob) -> anyhow::Result<(Engine, InfoResponse)> {
    let loaded = job.model.load()?;
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
    let (served, tokenizer) = loaded.served(job.name.clone());
    let engine = Engine::start(served, Arc::new(tokenizer), job.engine.clone())?;
    crate::served::check_chunk_overlap(&engine)?;
    for v in engine.variants() {
        warm_up(&engine, &v.name)?;
    }
    Ok((engine, info))
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
