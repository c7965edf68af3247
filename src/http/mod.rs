//! The HTTP layer: axum router, middleware (request ids, metrics, API keys, concurrency limit),
//! the OpenAPI document, and serving with graceful shutdown. It talks to the model only through
//! [`crate::engine::Engine`].

pub mod error;
pub mod extract;
pub mod openai;
pub mod openapi;
pub mod routes;
pub mod types;
pub mod validation;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::Instrument;
use utoipa_swagger_ui::SwaggerUi;

use crate::engine::Engine;
use crate::engine::prompt::TruncationDirection;
use crate::metrics::METRICS;
use error::ApiError;
use types::InfoResponse;

/// Limits on what one request may ask. `/info` reports them and the served OpenAPI document
/// states them as schema bounds.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_new_tokens: usize,
    /// Input tokens plus `max_new_tokens` of one generation.
    pub max_total_tokens: usize,
    pub max_stop_sequences: usize,
    /// In characters.
    pub max_stop_length: usize,
    pub max_client_batch_size: usize,
    pub max_candidate_labels: usize,
    /// In characters.
    pub max_label_length: usize,
    /// Input tokens shared by consecutive windows of a long input.
    pub chunk_overlap: usize,
    pub max_chunks_per_input: usize,
    /// The end `truncate` cuts when a request does not say.
    pub truncation_direction: TruncationDirection,
}

impl Default for RequestLimits {
    /// The `finserve serve` defaults.
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            max_total_tokens: 768,
            max_stop_sequences: 4,
            max_stop_length: 128,
            max_client_batch_size: 64,
            max_candidate_labels: 10,
            max_label_length: 64,
            chunk_overlap: 32,
            max_chunks_per_input: 16,
            truncation_direction: TruncationDirection::Right,
        }
    }
}

/// An API key, kept only as its SHA-256 digest: comparing digests takes the same time
/// whatever the key's length or where a guess differs, and the key itself never sits in
/// memory that a `Debug` print or a log line could show.
#[derive(Clone)]
pub struct ApiKey([u8; 32]);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    fn matches(&self, given: &str) -> bool {
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        given
            .iter()
            .zip(&self.0)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Limits and policies enforced by the HTTP layer itself.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub api_key: Option<ApiKey>,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub cors_allow_origin: Vec<String>,
    /// `/health` turns 503 after this many failed engine batches in a row.
    pub max_failed_batches: usize,
    /// Whether `/metrics` is served by the API listener (false with `--metrics-port`).
    pub metrics_on_api: bool,
    /// The model's name in the OpenAI routes (`--served-model-name`).
    pub model_name: String,
    pub request: RequestLimits,
}

/// Shared by every handler. The engine and info appear once the model is loaded.
pub struct AppState {
    pub engine: OnceLock<Engine>,
    pub info: OnceLock<InfoResponse>,
    pub ready: AtomicBool,
    pub shutting_down: AtomicBool,
    pub limits: HttpLimits,
    /// When the server started, in Unix seconds (`created` of `/v1/models`).
    pub started: u64,
    permits: Arc<Semaphore>,
}

impl AppState {
    pub fn new(limits: HttpLimits) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            info: OnceLock::new(),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests.max(1))),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            limits,
        })
    }
}

/// Request id, tracing span, timing header and request metrics for every routed request.
async fn observe(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), String::from);
    let span =
        tracing::info_span!("request", request_id = %id, method = %req.method(), route = %route);
    let start = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", elapsed.as_secs_f64() * 1000.0)) {
        headers.insert("x-total-time", v);
    }
    METRICS
        .requests
        .with_label_values(&[route.as_str(), status.as_str()])
        .inc();
    METRICS
        .request_duration
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            ms = elapsed.as_secs_f64() * 1000.0,
            "handled"
        )
    });
    response
}

async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.limits.api_key {
        let h = req.headers();
        let bearer = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let given = bearer.or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
        if !given.is_some_and(|g| key.matches(g)) {
            return refuse(req, ApiError::unauthorized(), &state).await;
        }
    }
    next.run(req).await
}

/// Answers `req` with `error` without handling it. The body is read first: hyper closes a
/// keep-alive connection whose request body was left unread, which a client reusing its
/// connection after a 429 would see as a broken pipe. A body too large to drain closes it anyway.
async fn refuse(req: Request, error: ApiError, state: &AppState) -> Response {
    let _ = axum::body::to_bytes(req.into_body(), state.limits.max_body_bytes).await;
    error.into_response()
}

/// Refuses requests over `--max-concurrent-requests` with 429 and tracks the in-flight gauge.
async fn limit_concurrency(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(permit) = state.permits.clone().try_acquire_owned() else {
        return refuse(req, crate::error::Error::Overloaded.into(), &state).await;
    };
    METRICS.in_flight.inc();
    struct Slot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);
    impl Drop for Slot {
        fn drop(&mut self) {
            METRICS.in_flight.dec();
        }
    }
    let slot = Slot(permit);
    // A streamed body outlives the handler: keep the slot until the body is done or dropped.
    let (parts, body) = next.run(req).await.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _slot = &slot;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// `/metrics` alone, for `--metrics-port`.
pub fn metrics_router() -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics))
        .route_layer(middleware::from_fn(observe))
}

/// The API router. Fails only if the OpenAPI document cannot be built.
pub fn router(state: Arc<AppState>) -> Result<Router, String> {
    let inference = Router::new()
        .route("/v1/sentiment", post(routes::sentiment))
        .route("/v1/generate", post(routes::generate))
        .route("/tokenize", post(routes::tokenize))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/decode", post(routes::decode))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ));
    let protected = inference
        .route("/info", get(routes::info))
        .route("/v1/models", get(openai::models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    let limits = &state.limits;
    // Checked here so a broken document fails at startup, not on the first request.
    openapi::document(&limits.request, &[], limits.metrics_on_api, None)?;
    let mut app = Router::new()
        .merge(protected)
        .route("/", get(routes::playground))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/openapi.json", get(routes::openapi));
    if limits.metrics_on_api {
        app = app.route("/metrics", get(routes::metrics));
    }
    let mut app = app
        .merge(SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json")))
        .route_layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state.clone());
    let origins = &state.limits.cors_allow_origin;
    if !origins.is_empty() {
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::from(Any)
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::CONTENT_TYPE,
                    header::AUTHORIZATION,
                    HeaderName::from_static("x-api-key"),
                    HeaderName::from_static("x-request-id"),
                ])
                .expose_headers([
                    HeaderName::from_static("x-request-id"),
                    HeaderName::from_static("x-queue-time"),
                    HeaderName::from_static("x-inference-time"),
                    HeaderName::from_static("x-total-time"),
                ]),
        );
    }
    Ok(app)
}

/// Serves the API on `listener` (and `/metrics` on `metrics`, if given) until `shutdown`
/// resolves; then stops accepting, marks the server not ready, and lets in-flight requests
/// finish for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(state.clone()).map_err(std::io::Error::other)?;
    // Metrics stay scrapeable while requests drain; the task ends with this function.
    let metrics_server =
        metrics.map(|l| tokio::spawn(axum::serve(l, metrics_router()).into_future()));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let flag = state.clone();
    // Without TCP_NODELAY, a streamed event that follows an earlier response on a keep-alive
    // connection waits ~40 ms for the client's delayed ACK (Nagle).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        flag.shutting_down.store(true, Ordering::SeqCst);
        tracing::info!("shutdown requested: refusing new requests, finishing in-flight ones");
        let _ = started_tx.send(());
    });
    let server = tokio::spawn(async move { server.await });
    tokio::pin!(server);
    let result = tokio::select! {
        done = &mut server => done.map_err(std::io::Error::other).and_then(|r| r),
        _ = started_rx => match tokio::time::timeout(grace, &mut server).await {
            Ok(done) => done.map_err(std::io::Error::other).and_then(|r| r),
            Err(_) => {
                tracing::warn!(?grace, "shutdown timeout reached with requests still in flight");
                server.abort();
                Ok(())
            }
        },
    };
    if let Some(m) = metrics_server {
        m.abort();
    }
    result
}
