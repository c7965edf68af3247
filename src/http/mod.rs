//! The HTTP layer: axum router, middleware (request ids, metrics, API keys, concurrency limit),
//! the OpenAPI document, and serving with graceful shutdown. It talks to the model only through
//! [`crate::engine::Engine`].

pub mod error;
pub mod routes;
pub mod types;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

use crate::engine::Engine;
use crate::metrics::METRICS;
use error::ApiError;
use types::InfoResponse;

/// Limits enforced by the HTTP layer itself.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_client_batch_size: usize,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub cors_allow_origin: Vec<String>,
}

/// Shared by every handler. The engine and info appear once the model is loaded.
pub struct AppState {
    pub engine: OnceLock<Engine>,
    pub info: OnceLock<InfoResponse>,
    pub ready: AtomicBool,
    pub shutting_down: AtomicBool,
    pub limits: HttpLimits,
    in_flight: AtomicUsize,
}

impl AppState {
    pub fn new(limits: HttpLimits) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            info: OnceLock::new(),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            limits,
            in_flight: AtomicUsize::new(0),
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "finserve",
        description = "Financial-sentiment inference for mt0/mT5 models with merged LoRA adapters."
    ),
    paths(
        routes::sentiment,
        routes::generate,
        routes::health,
        routes::ready,
        routes::info,
        routes::metrics
    ),
    modifiers(&Security),
    tags(
        (name = "inference", description = "Model inference"),
        (name = "operations", description = "Health, readiness, info and metrics")
    )
)]
pub struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as served at `/openapi.json`.
fn api_doc() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The served document as JSON, what `openapi/openapi.json` must contain.
pub fn openapi_json() -> String {
    api_doc().to_pretty_json().unwrap_or_default()
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

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.limits.api_key {
        let h = req.headers();
        let bearer = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let given = bearer.or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Refuses requests over `--max-concurrent-requests` with 429 and tracks the in-flight gauge.
async fn limit_concurrency(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let max = state.limits.max_concurrent_requests;
    if state.in_flight.fetch_add(1, Ordering::SeqCst) >= max {
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        return ApiError::from(crate::error::Error::Overloaded).into_response();
    }
    METRICS.in_flight.inc();
    struct Release(Arc<AppState>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
            METRICS.in_flight.dec();
        }
    }
    let release = Release(state.clone());
    // A streamed body outlives the handler: keep the slot until the body is done or dropped.
    let (parts, body) = next.run(req).await.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _slot = &release;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

pub fn router(state: Arc<AppState>) -> Router {
    let inference = Router::new()
        .route("/v1/sentiment", post(routes::sentiment))
        .route("/v1/generate", post(routes::generate))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ));
    let protected = inference
        .route("/info", get(routes::info))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    let mut app = Router::new()
        .merge(protected)
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api_doc()))
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
    app
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, marks the server
/// not ready, and lets in-flight requests finish for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let flag = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        flag.shutting_down.store(true, Ordering::SeqCst);
        tracing::info!("shutdown requested: refusing new requests, finishing in-flight ones");
        let _ = started_tx.send(());
    });
    let server = tokio::spawn(async move { server.await });
    tokio::pin!(server);
    tokio::select! {
        done = &mut server => return done.map_err(std::io::Error::other)?,
        _ = started_rx => {}
    }
    match tokio::time::timeout(grace, &mut server).await {
        Ok(done) => done.map_err(std::io::Error::other)?,
        Err(_) => {
            tracing::warn!(
                ?grace,
                "shutdown timeout reached with requests still in flight"
            );
            server.abort();
            Ok(())
        }
    }
}
