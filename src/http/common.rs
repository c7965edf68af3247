//! What every route file shares: the engine handle of a request, its timing headers, metrics and
//! trace spans, CPU-bound work off the runtime, and server-sent error events.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::response::sse::Event;

use super::AppState;
use super::error::ApiError;
use super::route::Route;
use super::types::{Inputs, PriorityName};
use crate::engine::{Engine, Priority, Timing};
use crate::metrics::METRICS;

/// The engine, once the model is loaded and while the server is not shutting down.
pub(super) fn engine(state: &AppState) -> Result<Engine, ApiError> {
    match state.engine.get() {
        Some(e) if !state.shutting_down.load(Ordering::SeqCst) => Ok(e.clone()),
        _ => Err(ApiError::not_ready()),
    }
}

/// The served model names: the default model's, then each variant's.
pub(super) fn model_names(state: &AppState) -> Vec<String> {
    match state.engine.get() {
        Some(engine) => engine.variants().iter().map(|v| v.name.clone()).collect(),
        None => vec![state.config.model_name.clone()],
    }
}

/// The texts of a request's `inputs`.
pub(super) fn texts(inputs: Inputs) -> Vec<String> {
    match inputs {
        Inputs::One(t) => vec![t.0],
        Inputs::Many(v) => v.0.into_iter().map(|t| t.0).collect(),
    }
}

fn ms(d: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0))
        .unwrap_or(HeaderValue::from_static("0"))
}

/// The header that names the digest of the model that answered.
pub(super) const MODEL_DIGEST: &str = "x-finserve-model-digest";

/// `response` with the digest of the model that answered.
pub(super) fn with_digest(mut response: Response, digest: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(digest) {
        response.headers_mut().insert(MODEL_DIGEST, v);
    }
    response
}

/// The engine's timing, and the digest of the model that answered.
pub(super) fn inference_headers(t: Timing, digest: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-queue-time", ms(t.queue));
    h.insert("x-inference-time", ms(t.inference));
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert(MODEL_DIGEST, v);
    }
    h
}

/// Records a request's engine time: the tokenization, queue and inference metrics of `route`,
/// and the `queue` and `inference` trace spans under `request`, which was queued at `submitted`.
pub(super) fn record_timing(
    route: Route,
    t: Timing,
    request: &tracing::Span,
    submitted: SystemTime,
) {
    crate::telemetry::record_engine_spans(request, submitted, t.queue, t.inference);
    let route = [route.as_str()];
    METRICS
        .tokenization_duration
        .with_label_values(&route)
        .observe(t.tokenize.as_secs_f64());
    METRICS
        .queue_duration
        .with_label_values(&route)
        .observe(t.queue.as_secs_f64());
    METRICS
        .inference_duration
        .with_label_values(&route)
        .observe(t.inference.as_secs_f64());
}

/// Input tokens of one encoder input of `route`.
pub(super) fn record_input_tokens(route: Route, tokens: usize) {
    METRICS
        .input_tokens
        .with_label_values(&[route.as_str()])
        .observe(tokens as f64);
}

/// Runs CPU-bound tokenizer work of `route` off the runtime (the engine's way), timing it.
pub(super) async fn off_runtime<T: Send + 'static>(
    route: Route,
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let start = Instant::now();
    let out = crate::engine::infer::off_runtime(f).await?;
    METRICS
        .tokenization_duration
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    Ok(out)
}

/// An item of a server-sent stream as JSON (or, if it cannot be serialised, an error event).
pub(super) fn json_event<T: serde::Serialize>(item: &T) -> Event {
    Event::default().json_data(item).unwrap_or_else(|e| {
        error_event(&ApiError::internal(format!(
            "cannot serialise the event: {e}"
        )))
    })
}

/// An error as a stream's last event, in the same shape as error responses.
pub(super) fn error_event(e: &ApiError) -> Event {
    METRICS
        .errors
        .with_label_values(&[e.error_type.as_str()])
        .inc();
    let body = serde_json::json!({"error": e.message, "error_type": e.error_type.as_str()});
    Event::default().data(body.to_string())
}

/// The header that asks for a priority on any inference route, the OpenAI ones included.
pub(super) const PRIORITY_HEADER: &str = "x-finserve-priority";

tokio::task_local! {
    /// The priority the request's header asked for, set around its handler by
    /// [`read_priority`] (a task-local, so the routes that call other routes' handlers pass it on
    /// without a parameter).
    static ASKED: Option<PriorityName>;
}

/// Reads `x-finserve-priority` (refusing a value other than `interactive` or `batch`) for the
/// handler.
pub(super) async fn read_priority(
    State(state): State<std::sync::Arc<super::AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let asked = match req.headers().get(PRIORITY_HEADER) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(PriorityName::parse) {
            Some(p) => Some(p),
            None => {
                let e = ApiError::validation(format!(
                    "header `{PRIORITY_HEADER}` must be `interactive` or `batch`"
                ));
                return super::refuse(req, e, &state).await;
            }
        },
    };
    ASKED.scope(asked, next.run(req)).await
}

/// The request's priority: `parameters.priority` where the route has it, else the header;
/// the two must agree when both are given.
pub(super) fn priority(param: Option<PriorityName>) -> Result<Priority, ApiError> {
    let header = ASKED.try_with(|p| *p).ok().flatten();
    match (param, header) {
        (Some(a), Some(b)) if a != b => Err(ApiError::validation(format!(
            "`parameters.priority` and the `{PRIORITY_HEADER}` header disagree"
        ))),
        (Some(p), _) | (None, Some(p)) => Ok(p.into()),
        (None, None) => Ok(Priority::Interactive),
    }
}
