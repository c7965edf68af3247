//! The HTTP layer: axum router, middleware (request ids, metrics, API keys, body reading with a
//! client timeout, concurrency limit),
//! the OpenAPI document, and serving with graceful shutdown. It talks to the model only through
//! [`crate::engine::Engine`]'s request-level calls; its request types never reach the engine.

mod admin;
mod audited;
pub mod auth;
mod common;
mod compat;
pub mod error;
pub mod extract;
pub mod openai;
pub mod openapi;
pub mod route;
pub mod routes;
mod serve;
pub mod types;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::Instrument;
use utoipa_swagger_ui::SwaggerUi;

use crate::audit::Audit;
use crate::engine::prompt::TruncationDirection;
use crate::engine::{Engine, RequestLimits};
use crate::metrics::METRICS;
use crate::variants::Variants;
pub use auth::ApiKeys;
use error::ApiError;
use route::Route;
pub use serve::serve;
use types::InfoResponse;

/// How the HTTP layer serves: its own limits and policies, and what it tells clients.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The keys clients must send, if any.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// How often a key file is checked for changes.
    pub api_key_file_poll: Duration,
    /// Longest a client may take to send a request's headers, or its body.
    pub client_timeout: Duration,
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
    /// The end `truncate` cuts when a request does not say.
    pub default_truncation_direction: TruncationDirection,
    /// The engine's request limits, stated by the OpenAPI document before the engine exists.
    pub limits: RequestLimits,
    /// The key of the admin routes (`--admin-api-key`); none: the routes are absent.
    pub admin_api_keys: Option<Arc<ApiKeys>>,
    /// Serve SageMaker's `/ping` and `/invocations`.
    pub sagemaker: bool,
}

impl HttpConfig {
    /// The optional routes this configuration serves.
    pub fn optional_routes(&self) -> openapi::Optional {
        openapi::Optional {
            metrics: self.metrics_on_api,
            admin: self.admin_api_keys.is_some(),
            sagemaker: self.sagemaker,
        }
    }
}

impl Default for HttpConfig {
    /// The `finserve serve` defaults, without an API key or CORS.
    fn default() -> Self {
        Self {
            api_keys: None,
            api_key_file_poll: Duration::from_secs(2),
            client_timeout: Duration::from_secs(30),
            max_body_bytes: 2 * 1024 * 1024,
            max_concurrent_requests: 512,
            request_timeout: Duration::from_secs(60),
            cors_allow_origin: Vec::new(),
            max_failed_batches: 5,
            metrics_on_api: true,
            model_name: openapi::DEMO_MODEL_NAME.into(),
            default_truncation_direction: TruncationDirection::Right,
            limits: RequestLimits::default(),
            admin_api_keys: None,
            sagemaker: false,
        }
    }
}

/// Shared by every handler. The engine and info appear once the model is loaded.
pub struct AppState {
    pub engine: OnceLock<Engine>,
    /// The served variants and their merging, when they may change at runtime.
    pub variants: OnceLock<Arc<Variants>>,
    /// The audit log (`--audit-log`), if on.
    pub audit: OnceLock<Arc<Audit>>,
    pub info: OnceLock<InfoResponse>,
    pub ready: AtomicBool,
    pub shutting_down: AtomicBool,
    pub config: HttpConfig,
    /// When the server started, in Unix seconds (`created` of `/v1/models`).
    pub started: u64,
    permits: Arc<Semaphore>,
    /// Body bytes held by requests in progress, and the most there may be.
    body_bytes: AtomicUsize,
    body_budget: usize,
}

impl AppState {
    pub fn new(config: HttpConfig) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            variants: OnceLock::new(),
            audit: OnceLock::new(),
            info: OnceLock::new(),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            body_bytes: AtomicUsize::new(0),
            body_budget: config
                .max_concurrent_requests
                .saturating_mul(config.max_body_bytes),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            config,
        })
    }
}

/// Request id, tracing span, timing header and request metrics for every routed request.
async fn observe(matched: Option<MatchedPath>, mut req: Request, next: Next) -> Response {
    let route = Route::of_path(matched.as_ref().map(MatchedPath::as_str)).as_str();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), String::from);
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), route);
    req.extensions_mut().insert(audited::RequestId(id.clone()));
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
        .with_label_values(&[route, status.as_str()])
        .inc();
    METRICS
        .request_duration
        .with_label_values(&[route])
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

/// Answers `req` with `error` without handling it. The body is read first: hyper closes a
/// keep-alive connection whose request body was left unread, which a client reusing its
/// connection after a 429 would see as a broken pipe. A body too large to drain closes it anyway.
async fn refuse(req: Request, error: ApiError, state: &AppState) -> Response {
    let config = &state.config;
    let drain = axum::body::to_bytes(req.into_body(), config.max_body_bytes);
    let _ = tokio::time::timeout(config.client_timeout, drain).await;
    error.into_response()
}

/// Request body bytes held in memory by requests not yet answered, released when the request is.
struct Buffered {
    state: Arc<AppState>,
    bytes: usize,
}

impl Buffered {
    /// Counts `n` more bytes; false when the server's budget is spent.
    fn add(&mut self, n: usize) -> bool {
        self.bytes += n;
        let total = self.state.body_bytes.fetch_add(n, Ordering::SeqCst) + n;
        total <= self.state.body_budget
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.state
            .body_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// The whole of `body`, within `--max-body-bytes` and the server's budget of buffered bytes.
async fn collect_body(body: &mut Body, held: &mut Buffered) -> Result<Bytes, ApiError> {
    let max = held.state.config.max_body_bytes;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            return Err(ApiError::too_large(
                "request body is larger than --max-body-bytes",
            ));
        }
        if !held.add(data.len()) {
            return Err(ApiError::too_many_bodies());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// Reads the whole request body, within `--client-timeout-ms` and `--max-body-bytes`, before the
/// request takes a concurrency slot: a client that stalls mid-body holds no slot, and is answered
/// 408 and disconnected when its time is up. The bodies held at once are bounded by the budget
/// the slots implied before (`--max-concurrent-requests` x `--max-body-bytes`).
async fn read_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let config = state.config.clone();
    let deadline = tokio::time::Instant::now() + config.client_timeout;
    let (parts, mut body) = req.into_parts();
    let mut held = Buffered { state, bytes: 0 };
    let collected = tokio::time::timeout_at(deadline, collect_body(&mut body, &mut held)).await;
    let refused = match collected {
        Ok(Ok(bytes)) => {
            let response = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            drop(held);
            return response;
        }
        Ok(Err(e)) => e,
        Err(_) => ApiError::client_timeout(),
    };
    drop(held);
    // Read what is left of a refused body (up to --max-body-bytes more, in the time left), so
    // the client reads the answer instead of a reset; past that the connection is closed.
    let drained = refused.error_type != error::ErrorType::ClientTimeout
        && matches!(
            tokio::time::timeout_at(deadline, axum::body::to_bytes(body, config.max_body_bytes))
                .await,
            Ok(Ok(_))
        );
    let mut response = refused.into_response();
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Refuses requests over `--max-concurrent-requests` with 429 and tracks the in-flight gauge.
async fn limit_concurrency(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(permit) = state.permits.clone().try_acquire_owned() else {
        return refuse(req, ApiError::too_many_requests(), &state).await;
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
        .route("/predict", post(compat::predict))
        .route("/classify", post(compat::classify))
        .route("/score", post(compat::score_pairs))
        .route("/generate", post(compat::tgi_generate))
        .route("/generate_stream", post(compat::tgi_generate_stream))
        .route("/", post(compat::tgi_root));
    let inference = if state.config.sagemaker {
        inference.route("/invocations", post(compat::invocations))
    } else {
        inference
    };
    let inference = inference
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            common::read_priority,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            audited::audit,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body));
    let protected = inference
        .route("/info", get(routes::info))
        .route("/v1/models", get(openai::models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ));
    let mut protected = protected;
    if state.config.admin_api_keys.is_some() {
        let admin = Router::new()
            .route("/v1/adapters", get(admin::list).post(admin::load))
            .route("/v1/adapters/{name}", axum::routing::delete(admin::unload))
            .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                admin::authorize_admin,
            ));
        protected = protected.merge(admin);
    }
    let config = &state.config;
    // Checked here so a broken document fails at startup, not on the first request.
    openapi::document(&config.limits, &[], config.optional_routes(), None)?;
    let mut app = Router::new()
        .merge(protected)
        .route("/", get(routes::playground))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/openapi.json", get(openapi::openapi));
    if config.metrics_on_api {
        app = app.route("/metrics", get(routes::metrics));
    }
    if config.sagemaker {
        app = app.route("/ping", get(compat::ping));
    }
    let mut app = app
        .merge(SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json")))
        .route_layer(middleware::from_fn(observe))
        .layer(middleware::from_fn(openai::errors_in_openai_shape))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state.clone());
    let origins = &state.config.cors_allow_origin;
    if !origins.is_empty() {
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::from(Any)
        } else {
            AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([
                    header::CONTENT_TYPE,
                    header::AUTHORIZATION,
                    HeaderName::from_static("x-api-key"),
                    HeaderName::from_static("x-request-id"),
                    HeaderName::from_static(common::PRIORITY_HEADER),
                ])
                .expose_headers([
                    HeaderName::from_static("x-request-id"),
                    HeaderName::from_static("x-queue-time"),
                    HeaderName::from_static("x-inference-time"),
                    HeaderName::from_static("x-total-time"),
                    HeaderName::from_static("x-finserve-model-digest"),
                ]),
        );
    }
    Ok(app)
}
