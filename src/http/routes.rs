//! The route handlers: parse and check the request, tokenize off the async runtime, hand the work
//! to the engine, and shape its results into the client-facing formats.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;

use super::AppState;
use super::error::ApiError;
use super::types::*;
use crate::engine::generate::FinishReason as CoreFinish;
use crate::engine::validation::{RawGenerateParams, validate_generate};
use crate::engine::{Engine, GenerateEvent, GenerateOutput, Timing};
use crate::error::Error;
use crate::metrics::METRICS;

/// JSON body extractor whose rejections use our error shape (400 malformed, 413 too large).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large("request body is larger than --max-body-bytes")
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn engine(state: &AppState) -> Result<Engine, ApiError> {
    match state.engine.get() {
        Some(e) if !state.shutting_down.load(Ordering::SeqCst) => Ok(e.clone()),
        _ => Err(ApiError::not_ready()),
    }
}

fn ms(d: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1000.0))
        .unwrap_or(HeaderValue::from_static("0"))
}

fn timing_headers(t: Timing) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-queue-time", ms(t.queue));
    h.insert("x-inference-time", ms(t.inference));
    h
}

fn record_timing(route: &str, t: Timing) {
    METRICS
        .queue_duration
        .with_label_values(&[route])
        .observe(t.queue.as_secs_f64());
    METRICS
        .inference_duration
        .with_label_values(&[route])
        .observe(t.inference.as_secs_f64());
}

/// Runs CPU-bound tokenization on the blocking pool.
async fn tokenize<T: Send + 'static>(
    route: &'static str,
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::from(Error::Inference(format!("tokenizer task failed: {e}"))))??;
    METRICS
        .tokenization_duration
        .with_label_values(&[route])
        .observe(start.elapsed().as_secs_f64());
    Ok(out)
}

/// Classifies financial text as negative / neutral / positive (or the configured labels).
#[utoipa::path(
    post, path = "/v1/sentiment", tag = "inference",
    request_body = SentimentRequest,
    responses(
        (status = 200, description = "Per input, every label with its probability, best first", body = Vec<Vec<LabelScore>>,
         example = json!([[{"label": "positive", "score": 0.93}, {"label": "neutral", "score": 0.05}, {"label": "negative", "score": 0.02}]])),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body or batch too large", body = ErrorResponse),
        (status = 422, description = "Invalid input", body = ErrorResponse),
        (status = 429, description = "Too many concurrent requests", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse),
        (status = 504, description = "Timed out", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn sentiment(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<SentimentRequest>,
) -> Result<Response, ApiError> {
    let engine = engine(&state)?;
    let texts = match req.inputs {
        Inputs::One(t) => vec![t],
        Inputs::Many(v) => v,
    };
    if texts.is_empty() {
        return Err(ApiError::validation("`inputs` must not be an empty list"));
    }
    let max = state.limits.max_client_batch_size;
    if texts.len() > max {
        return Err(ApiError::too_large(format!(
            "{} inputs is more than --max-client-batch-size ({max})",
            texts.len()
        )));
    }
    let params = req.parameters.unwrap_or_default();
    let top_k = match params.top_k {
        Some(k) if k <= 0 => return Err(ApiError::validation("`top_k` must be strictly positive")),
        Some(k) => k as usize,
        None => usize::MAX,
    };
    if let Some(f) = params.function_to_apply.as_deref()
        && f != "softmax"
    {
        return Err(ApiError::validation(format!(
            "function_to_apply `{f}` is not supported: scores are label probabilities (softmax)"
        )));
    }
    let truncate = req.truncate.unwrap_or(false);
    let tokenizer_engine = engine.clone();
    let ids = tokenize("sentiment", move || {
        texts
            .iter()
            .map(|t| tokenizer_engine.tokenize_sentiment(t, truncate))
            .collect::<crate::error::Result<Vec<_>>>()
    })
    .await?;
    for i in &ids {
        METRICS
            .input_tokens
            .with_label_values(&["sentiment"])
            .observe(i.len() as f64);
    }
    let receivers = ids
        .into_iter()
        .map(|i| engine.sentiment(i))
        .collect::<crate::error::Result<Vec<_>>>()?;
    let results = tokio::time::timeout(
        state.limits.request_timeout,
        futures::future::join_all(receivers),
    )
    .await
    .map_err(|_| ApiError::timeout())?;

    let labels = &engine.labels().names;
    let mut timing = Timing::default();
    let mut body: SentimentResponse = Vec::with_capacity(results.len());
    for r in results {
        let out = r.map_err(|_| ApiError::from(Error::EngineDown))??;
        timing.queue = timing.queue.max(out.timing.queue);
        timing.inference = timing.inference.max(out.timing.inference);
        let mut scores: Vec<LabelScore> = labels
            .iter()
            .zip(&out.scores.probs)
            .map(|(label, p)| LabelScore {
                label: label.clone(),
                score: *p,
            })
            .collect();
        scores.sort_by(|a, b| b.score.total_cmp(&a.score));
        if let Some(best) = scores.first() {
            METRICS
                .predictions
                .with_label_values(&[best.label.as_str()])
                .inc();
        }
        scores.truncate(top_k);
        body.push(scores);
    }
    record_timing("sentiment", timing);
    Ok((timing_headers(timing), Json(body)).into_response())
}

/// Rejects TGI parameters finserve does not implement, rather than silently ignoring them.
fn check_unsupported(p: &GenerateParameters) -> Result<(), ApiError> {
    let unsupported = [
        ("best_of", p.best_of.is_some_and(|b| b > 1)),
        ("typical_p", p.typical_p.is_some()),
        ("watermark", p.watermark == Some(true)),
        ("top_n_tokens", p.top_n_tokens.is_some_and(|n| n > 0)),
        ("frequency_penalty", p.frequency_penalty.is_some()),
        ("return_full_text", p.return_full_text == Some(true)),
        ("grammar", p.grammar.as_ref().is_some_and(|g| !g.is_null())),
        ("adapter_id", p.adapter_id.is_some()),
    ];
    match unsupported.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(ApiError::validation(format!(
            "parameter `{name}` is not supported"
        ))),
        None => Ok(()),
    }
}

fn finish_reason(r: CoreFinish) -> FinishReason {
    match r {
        CoreFinish::Length => FinishReason::Length,
        CoreFinish::EosToken => FinishReason::EosToken,
        CoreFinish::StopSequence => FinishReason::StopSequence,
    }
}

/// Generates text (text-generation-inference format; `stream: true` for server-sent events).
#[utoipa::path(
    post, path = "/v1/generate", tag = "inference",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text", body = GenerateResponse,
         example = json!({"generated_text": "positive"})),
        (status = 200, description = "With `stream`: a text/event-stream of StreamResponse events", body = StreamResponse,
         content_type = "text/event-stream"),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 422, description = "Invalid input or parameters", body = ErrorResponse),
        (status = 429, description = "Too many concurrent requests", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse),
        (status = 504, description = "Timed out", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn generate(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    let engine = engine(&state)?;
    let p = req.parameters.unwrap_or_default();
    check_unsupported(&p)?;
    let params = validate_generate(
        RawGenerateParams {
            max_new_tokens: p.max_new_tokens,
            do_sample: p.do_sample,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            stop: p.stop.clone(),
        },
        engine.config(),
    )?;
    if p.truncate == Some(0) {
        return Err(ApiError::validation("`truncate` must be strictly positive"));
    }
    let truncate = p.truncate.map(|n| n as usize);
    let text = req.inputs;
    let tokenizer_engine = engine.clone();
    let ids = tokenize("generate", move || {
        tokenizer_engine.tokenize(&text, truncate)
    })
    .await?;
    METRICS
        .input_tokens
        .with_label_values(&["generate"])
        .observe(ids.len() as f64);
    let prefill: Vec<Token> = if p.decoder_input_details {
        ids.iter()
            .map(|&id| Token {
                id,
                text: engine.token_text(id),
                logprob: None,
                special: false,
            })
            .collect()
    } else {
        Vec::new()
    };
    let rx = engine.generate(ids, params)?;
    let deadline = Instant::now() + state.limits.request_timeout;
    if req.stream {
        return Ok(stream_response(rx, deadline).into_response());
    }
    let out = collect(rx, deadline).await?;
    record_timing("generate", out.timing);
    let details = p.details.then(|| Details {
        finish_reason: finish_reason(out.finish_reason),
        generated_tokens: out.tokens.len() as u32,
        seed: out.seed,
        prefill,
        tokens: out.tokens.iter().map(Token::from).collect(),
    });
    let body = GenerateResponse {
        generated_text: out.generated_text,
        details,
    };
    Ok((timing_headers(out.timing), Json(body)).into_response())
}

async fn collect(
    mut rx: UnboundedReceiver<GenerateEvent>,
    deadline: Instant,
) -> Result<GenerateOutput, ApiError> {
    loop {
        let event = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .map_err(|_| ApiError::timeout())?;
        match event {
            Some(GenerateEvent::Token(_)) => {}
            Some(GenerateEvent::End(out)) => return Ok(out),
            Some(GenerateEvent::Error(e)) => return Err(Error::Inference(e).into()),
            None => return Err(Error::EngineDown.into()),
        }
    }
}

/// TGI-style server-sent events: one per token; the last carries `generated_text` and `details`.
fn stream_response(
    rx: UnboundedReceiver<GenerateEvent>,
    deadline: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct S {
        rx: UnboundedReceiver<GenerateEvent>,
        pending: Option<Token>,
        index: u32,
        done: bool,
    }
    let init = S {
        rx,
        pending: None,
        index: 0,
        done: false,
    };
    let stream = futures::stream::unfold(init, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let event = match tokio::time::timeout_at(deadline.into(), s.rx.recv()).await {
                Ok(e) => e,
                Err(_) => {
                    s.done = true;
                    return Some((error_event(&ApiError::timeout()), s));
                }
            };
            match event {
                Some(GenerateEvent::Token(t)) => {
                    // Hold each token back by one so the last can carry the final fields.
                    if let Some(prev) = s.pending.replace(Token::from(&t)) {
                        s.index += 1;
                        let item = StreamResponse {
                            index: s.index,
                            token: prev,
                            generated_text: None,
                            details: None,
                        };
                        return Some((json_event(&item), s));
                    }
                }
                Some(GenerateEvent::End(out)) => {
                    s.done = true;
                    record_timing("generate", out.timing);
                    let token = s.pending.take().unwrap_or(Token {
                        id: 0,
                        text: String::new(),
                        logprob: None,
                        special: true,
                    });
                    let item = StreamResponse {
                        index: s.index + 1,
                        token,
                        details: Some(StreamDetails {
                            finish_reason: finish_reason(out.finish_reason),
                            generated_tokens: out.tokens.len() as u32,
                            seed: out.seed,
                        }),
                        generated_text: Some(out.generated_text),
                    };
                    return Some((json_event(&item), s));
                }
                Some(GenerateEvent::Error(e)) => {
                    s.done = true;
                    return Some((error_event(&Error::Inference(e).into()), s));
                }
                None => {
                    s.done = true;
                    return Some((error_event(&Error::EngineDown.into()), s));
                }
            }
        }
    });
    Sse::new(stream.map(Ok)).keep_alive(KeepAlive::default())
}

fn json_event<T: serde::Serialize>(item: &T) -> Event {
    Event::default()
        .json_data(item)
        .unwrap_or_else(|_| Event::default().data("{}"))
}

fn error_event(e: &ApiError) -> Event {
    METRICS.errors.with_label_values(&[e.error_type]).inc();
    json_event(&e.body())
}

/// Liveness: 200 while loading or when the engine thread is running; 503 if it died.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn health(State(state): State<Arc<AppState>>) -> (StatusCode, Json<HealthResponse>) {
    let (status, text) = match state.engine.get() {
        None => (StatusCode::OK, "loading"),
        Some(e) if e.is_alive() => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "engine_down"),
    };
    (
        status,
        Json(HealthResponse {
            status: text.into(),
        }),
    )
}

/// Readiness: 200 once the model is loaded, merged and warmed up; 503 before, while shutting
/// down, or if the engine died.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<HealthResponse>) {
    let ready = state.ready.load(Ordering::SeqCst)
        && !state.shutting_down.load(Ordering::SeqCst)
        && state.engine.get().is_some_and(Engine::is_alive);
    let (status, text) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (
        status,
        Json(HealthResponse {
            status: text.into(),
        }),
    )
}

/// The served model, its merged adapters, labels and limits.
#[utoipa::path(get, path = "/info", tag = "operations",
    responses((status = 200, body = InfoResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn info(State(state): State<Arc<AppState>>) -> Result<Json<InfoResponse>, ApiError> {
    state
        .info
        .get()
        .cloned()
        .map(Json)
        .ok_or_else(ApiError::not_ready)
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}
