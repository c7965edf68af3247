//! The route handlers: parse and check the request, tokenize off the async runtime, hand the work
//! to the engine, and shape its results into the client-facing formats.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::types::*;
use super::validation;
use crate::engine::prompt::{Template, Window};
use crate::engine::{Engine, GenerateEvent, GenerateOutput, Timing};
use crate::error::Error;
use crate::metrics::METRICS;

pub(super) fn engine(state: &AppState) -> Result<Engine, ApiError> {
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

/// Records a request's engine time: the queue and inference metrics of `route`, and the `queue`
/// and `inference` trace spans under `request`, which was submitted at `submitted`.
pub(super) fn record_timing(
    route: &str,
    t: Timing,
    request: &tracing::Span,
    submitted: std::time::SystemTime,
) {
    crate::telemetry::record_engine_spans(request, submitted, t.queue, t.inference);
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
pub(super) async fn off_runtime<T: Send + 'static>(
    route: &'static str,
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let start = Instant::now();
    let span = tracing::info_span!("tokenize", route);
    let out = tokio::task::spawn_blocking(move || span.in_scope(f))
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
        (status = 200, description = "Per input, every label with its score, best first (with `return_chunks`, also each window's)", body = Vec<InputScores>,
         example = json!([[{"label": "positive", "score": 0.93}, {"label": "neutral", "score": 0.05}, {"label": "negative", "score": 0.02}]])),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body larger than --max-body-bytes", body = ErrorResponse),
        (status = 422, description = "Invalid input, unknown field or a limit exceeded", body = ErrorResponse),
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
    let limits = &state.limits.request;
    let texts: Vec<String> = match req.inputs {
        Inputs::One(t) => vec![t.0],
        Inputs::Many(v) => v.0.into_iter().map(|t| t.0).collect(),
    };
    let max = limits.max_client_batch_size;
    if texts.len() > max {
        return Err(ApiError::validation(format!(
            "{} inputs is more than --max-client-batch-size ({max})",
            texts.len()
        )));
    }
    let params = req.parameters.unwrap_or_default();
    let top_k = validation::sentiment_top_k(params.top_k)?;
    let function = params.function_to_apply.unwrap_or_default();
    let chunk = params.long_input.unwrap_or_default() == LongInput::Chunk;
    let return_chunks = params.return_chunks.unwrap_or(false);
    let candidates = params
        .candidate_labels
        .map(|l| validation::candidate_labels(l, limits))
        .transpose()?;
    let template = match &params.prompt_template {
        Some(t) => Arc::new(Template::new(&t.0)?),
        None => engine.template().clone(),
    };
    let truncate = req.truncate.unwrap_or(false).then(|| {
        req.truncation_direction
            .unwrap_or(limits.truncation_direction)
    });
    let (max_tokens, overlap, max_chunks) = (
        engine.config().max_input_tokens,
        limits.chunk_overlap,
        limits.max_chunks_per_input,
    );
    let variant = engine.variant(params.adapter_id.as_deref())?;
    let variant_name = engine.variants()[variant].name.clone();
    let tokenizer_engine = engine.clone();
    let (labels, windows) = off_runtime("sentiment", move || {
        let e = tokenizer_engine;
        let labels = match candidates {
            Some(names) => e.label_set(&names)?,
            None => e.variants()[variant].labels.clone(),
        };
        let windows = texts
            .iter()
            .map(|t| {
                if chunk {
                    e.prompt(t, &template)?
                        .windows(max_tokens, overlap, max_chunks)
                } else {
                    let ids = e.tokenize_sentiment(t, &template, truncate)?;
                    let tokens = ids.len();
                    Ok(vec![Window {
                        ids,
                        span: (0, t.len()),
                        tokens,
                    }])
                }
                .map(|w| (t.clone(), w))
            })
            .collect::<crate::error::Result<Vec<_>>>()?;
        Ok((labels, windows))
    })
    .await?;
    let (request, submitted) = (tracing::Span::current(), std::time::SystemTime::now());
    let inputs: Vec<Vec<u32>> = windows
        .iter()
        .flat_map(|(_, ws)| ws.iter().map(|w| w.ids.clone()))
        .collect();
    for ids in &inputs {
        METRICS
            .input_tokens
            .with_label_values(&["sentiment"])
            .observe(ids.len() as f64);
    }
    let receivers = engine.sentiment_all(inputs, labels.clone(), variant)?;
    let results = tokio::time::timeout(
        state.limits.request_timeout,
        futures::future::join_all(receivers),
    )
    .await
    .map_err(|_| ApiError::timeout())?;

    let _response = tracing::info_span!("response").entered();
    let mut results = results.into_iter();
    let mut timing = Timing::default();
    let mut body: Vec<InputScores> = Vec::with_capacity(windows.len());
    for (text, ws) in windows {
        let mut chunks = Vec::with_capacity(ws.len());
        let mut total = vec![0.0; labels.names.len()];
        let weight: usize = ws.iter().map(|w| w.tokens.max(1)).sum();
        for w in ws {
            let out = results
                .next()
                .ok_or_else(|| Error::Inference("a window's result is missing".into()))?
                .map_err(|_| Error::EngineDown)??;
            timing.queue = timing.queue.max(out.timing.queue);
            timing.inference = timing.inference.max(out.timing.inference);
            let values = match function {
                FunctionToApply::Softmax => &out.scores.probs,
                FunctionToApply::None => &out.scores.log_probs,
            };
            for (t, v) in total.iter_mut().zip(values) {
                *t += v * w.tokens.max(1) as f64 / weight as f64;
            }
            if return_chunks {
                let chars = |b: usize| text[..b].chars().count();
                chunks.push(ChunkScores {
                    start: chars(w.span.0),
                    end: chars(w.span.1),
                    tokens: w.tokens,
                    scores: ranked(&labels.names, values, usize::MAX),
                });
            }
        }
        let scores = ranked(&labels.names, &total, top_k);
        if let Some(best) = scores.first() {
            let metric = [variant_name.as_str(), best.label.as_str()];
            METRICS.predictions.with_label_values(&metric).inc();
            if function == FunctionToApply::Softmax {
                METRICS
                    .top_score
                    .with_label_values(&metric)
                    .observe(best.score);
            }
        }
        body.push(if return_chunks {
            InputScores::Chunked(ChunkedScores { scores, chunks })
        } else {
            InputScores::Labels(scores)
        });
    }
    record_timing("sentiment", timing, &request, submitted);
    Ok((timing_headers(timing), Json(body)).into_response())
}

/// The labels with their scores, best first, the first `top_k`.
fn ranked(names: &[String], values: &[f64], top_k: usize) -> Vec<LabelScore> {
    let mut scores: Vec<LabelScore> = names
        .iter()
        .zip(values)
        .map(|(label, &score)| LabelScore {
            label: label.clone(),
            score,
        })
        .collect();
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    scores.truncate(top_k);
    scores
}

/// Generates text (text-generation-inference format; `stream: true` for server-sent events).
#[utoipa::path(
    post, path = "/v1/generate", tag = "inference",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text; with `stream`, server-sent events, one StreamResponse per token",
         content(
            (GenerateResponse = "application/json", example = json!({"generated_text": "positive"})),
            (StreamResponse = "text/event-stream")
         )),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body larger than --max-body-bytes", body = ErrorResponse),
        (status = 422, description = "Invalid input or parameters, unknown field or a limit exceeded", body = ErrorResponse),
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
    let variant = engine.variant(p.adapter_id.as_deref())?;
    let truncate = validation::generate_truncate(p.truncate)?;
    let text = req.inputs.0;
    let prefix = p.return_full_text.unwrap_or(false).then(|| text.clone());
    let tokenizer_engine = engine.clone();
    let ids = off_runtime("generate", move || {
        tokenizer_engine.tokenize(&text, truncate)
    })
    .await?;
    let params = validation::generate_params(&p, ids.len(), &state.limits.request)?;
    METRICS
        .input_tokens
        .with_label_values(&["generate"])
        .observe(ids.len() as f64);
    let details = p.details.unwrap_or(false);
    let prefill = if details && p.decoder_input_details.unwrap_or(false) {
        let texts = engine.token_texts(&ids)?;
        ids.iter()
            .zip(texts)
            .map(|(&id, text)| Token {
                id,
                text,
                logprob: None,
                special: false,
            })
            .collect()
    } else {
        Vec::new()
    };
    let (request, submitted) = (tracing::Span::current(), std::time::SystemTime::now());
    let rx = engine.generate(ids, params, variant)?;
    let deadline = Instant::now() + state.limits.request_timeout;
    if req.stream.unwrap_or(false) {
        let trace = (request, submitted);
        return Ok(stream_response(rx, deadline, prefix, trace).into_response());
    }
    let out = collect(rx, deadline).await?;
    record_timing("generate", out.timing, &request, submitted);
    let _response = tracing::info_span!("response").entered();
    let details = details.then(|| Details {
        finish_reason: out.finish_reason,
        generated_tokens: out.tokens.len() as u32,
        seed: out.seed,
        prefill,
        tokens: out.tokens.iter().map(Token::from).collect(),
    });
    let body = GenerateResponse {
        generated_text: prefix.unwrap_or_default() + &out.generated_text,
        details,
    };
    Ok((timing_headers(out.timing), Json(body)).into_response())
}

pub(super) async fn collect(
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
            Some(GenerateEvent::Error(e)) => return Err(e.into()),
            None => return Err(Error::EngineDown.into()),
        }
    }
}

/// TGI-style server-sent events: one per token; the last carries `generated_text` and `details`.
fn stream_response(
    rx: UnboundedReceiver<GenerateEvent>,
    deadline: Instant,
    prefix: Option<String>,
    (request, submitted): (tracing::Span, std::time::SystemTime),
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct S {
        rx: UnboundedReceiver<GenerateEvent>,
        index: u32,
        done: bool,
        prefix: Option<String>,
        request: tracing::Span,
    }
    let init = S {
        rx,
        index: 0,
        done: false,
        prefix,
        request,
    };
    let stream = futures::stream::unfold(init, move |mut s| async move {
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
        s.index += 1;
        let item = match event {
            Some(GenerateEvent::Token(t)) => json_event(&StreamResponse {
                index: s.index,
                token: Token::from(&t),
                generated_text: None,
                details: None,
            }),
            Some(GenerateEvent::End(out)) => {
                s.done = true;
                record_timing("generate", out.timing, &s.request, submitted);
                match out.tokens.last() {
                    Some(last) => json_event(&StreamResponse {
                        index: s.index,
                        token: Token::from(last),
                        details: Some(StreamDetails {
                            finish_reason: out.finish_reason,
                            generated_tokens: out.tokens.len() as u32,
                            seed: out.seed,
                        }),
                        generated_text: Some(
                            s.prefix.take().unwrap_or_default() + &out.generated_text,
                        ),
                    }),
                    None => error_event(
                        &Error::Inference("the generation ended without a token".into()).into(),
                    ),
                }
            }
            Some(GenerateEvent::Error(e)) => {
                s.done = true;
                error_event(&e.into())
            }
            None => {
                s.done = true;
                error_event(&Error::EngineDown.into())
            }
        };
        Some((item, s))
    });
    Sse::new(stream.map(Ok)).keep_alive(KeepAlive::default())
}

fn json_event<T: serde::Serialize>(item: &T) -> Event {
    Event::default().json_data(item).unwrap_or_else(|e| {
        error_event(&Error::Inference(format!("cannot serialise the event: {e}")).into())
    })
}

/// An error as the stream's last event, in the same shape as error responses.
pub(super) fn error_event(e: &ApiError) -> Event {
    METRICS.errors.with_label_values(&[e.error_type]).inc();
    let body = serde_json::json!({"error": e.message, "error_type": e.error_type});
    Event::default().data(body.to_string())
}

/// Liveness: 200 while loading or while the engine works; 503 if the engine thread died
/// (`engine_down`) or its last `--max-failed-batches` batches all failed (`failing`).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn health(State(state): State<Arc<AppState>>) -> (StatusCode, Json<HealthResponse>) {
    let (status, text) = match engine_health(&state) {
        None => (StatusCode::OK, "loading"),
        Some(Ok(())) => (StatusCode::OK, "ok"),
        Some(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, why),
    };
    (
        status,
        Json(HealthResponse {
            status: text.into(),
        }),
    )
}

/// None while loading; otherwise whether the engine is healthy, or why not.
fn engine_health(state: &AppState) -> Option<Result<(), &'static str>> {
    let engine = state.engine.get()?;
    Some(if !engine.is_alive() {
        Err("engine_down")
    } else if engine.failed_batches_in_a_row() >= state.limits.max_failed_batches {
        Err("failing")
    } else {
        Ok(())
    })
}

/// Readiness: 200 once the model is loaded, merged and warmed up; 503 before, while shutting
/// down, or while `/health` is 503.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = HealthResponse), (status = 503, body = HealthResponse)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<HealthResponse>) {
    let ready = state.ready.load(Ordering::SeqCst)
        && !state.shutting_down.load(Ordering::SeqCst)
        && engine_health(&state) == Some(Ok(()));
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

/// Tokenizes texts as the model sees them (TEI's format), with each token's span in the input.
#[utoipa::path(
    post, path = "/tokenize", tag = "inference",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "Per input, its tokens", body = Vec<Vec<SimpleToken>>),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body larger than --max-body-bytes", body = ErrorResponse),
        (status = 422, description = "Invalid input or unknown field", body = ErrorResponse),
        (status = 429, description = "Too many concurrent requests", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<Vec<Vec<SimpleToken>>>, ApiError> {
    let engine = engine(&state)?;
    let texts: Vec<String> = match req.inputs {
        Inputs::One(t) => vec![t.0],
        Inputs::Many(v) => v.0.into_iter().map(|t| t.0).collect(),
    };
    let max = state.limits.request.max_client_batch_size;
    if texts.len() > max {
        return Err(ApiError::validation(format!(
            "{} inputs is more than --max-client-batch-size ({max})",
            texts.len()
        )));
    }
    let special = req.add_special_tokens.unwrap_or(true);
    let template = req.prompt_template.unwrap_or(false);
    let body = off_runtime("tokenize", move || {
        let t = template.then(|| engine.template().clone());
        texts
            .iter()
            .map(|text| {
                let pieces = engine.pieces(text, special, t.as_deref())?;
                let chars = |b: usize| text[..b].chars().count();
                Ok(pieces
                    .into_iter()
                    .map(|p| match p.span {
                        Some((a, b)) => SimpleToken {
                            id: p.id,
                            text: text[a..b].to_string(),
                            special: p.special,
                            start: Some(chars(a)),
                            stop: Some(chars(b)),
                        },
                        None => SimpleToken {
                            id: p.id,
                            text: p.token,
                            special: p.special,
                            start: None,
                            stop: None,
                        },
                    })
                    .collect())
            })
            .collect::<crate::error::Result<Vec<_>>>()
    })
    .await?;
    Ok(Json(body))
}

/// Turns token ids back into text (TEI's format): one string per id sequence.
#[utoipa::path(
    post, path = "/decode", tag = "inference",
    request_body = DecodeRequest,
    responses(
        (status = 200, description = "One text per id sequence", body = Vec<String>),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 413, description = "Body larger than --max-body-bytes", body = ErrorResponse),
        (status = 422, description = "An id outside the vocabulary or an unknown field", body = ErrorResponse),
        (status = 429, description = "Too many concurrent requests", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn decode(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<DecodeRequest>,
) -> Result<Json<Vec<String>>, ApiError> {
    let engine = engine(&state)?;
    let seqs: Vec<Vec<u32>> = match req.ids {
        InputIds::One(ids) => vec![ids.into_iter().map(|t| t.0).collect()],
        InputIds::Many(v) => {
            v.0.into_iter()
                .map(|ids| ids.into_iter().map(|t| t.0).collect())
                .collect()
        }
    };
    let skip = req.skip_special_tokens.unwrap_or(true);
    let texts = off_runtime("decode", move || {
        seqs.iter()
            .map(|ids| engine.decode(ids, skip))
            .collect::<crate::error::Result<Vec<_>>>()
    })
    .await?;
    Ok(Json(texts))
}

/// The OpenAPI document of this server: its limits as schema bounds (and, once the model is
/// loaded, its vocabulary size as the bound of token ids).
pub async fn openapi(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let limits = &state.limits;
    let vocab = state.engine.get().map(Engine::vocab_size);
    let models = super::openai::names(&state);
    let doc = super::openapi::document(&limits.request, &models, limits.metrics_on_api, vocab)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("cannot build the OpenAPI document: {e}"),
            )
        })?;
    Ok(Json(doc).into_response())
}

/// The playground: one self-contained page (no CDN) to score and generate from a browser.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The playground page", body = String, content_type = "text/html")))]
pub async fn playground() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("playground.html"))
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
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 500, description = "The metrics could not be rendered", body = ErrorResponse)))]
pub async fn metrics() -> Result<Response, ApiError> {
    let text = crate::metrics::render().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot render the metrics: {e}"),
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
