//! The handlers of the Hugging Face / TGI / TEI routes and the operational ones: parse the
//! request, make one engine call, shape its answer into the client's format.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

use super::AppState;
use super::audited::{Facts, StreamOutputs};
use super::common::{
    engine, error_event, inference_headers, json_event, off_runtime, priority, record_input_tokens,
    record_timing, texts, with_digest,
};
use super::error::{ApiError, Dialect};
use super::extract::JsonBody;
use super::route::Route;
use super::types::*;
use crate::engine::GenerateEvent;
use crate::engine::infer::{GenerateQuery, Generation, LongInput, Occluded, ScoreQuery, Scored};
use crate::engine::sentiment::LabelScores;
use crate::engine::validation::GenerateOptions;
use crate::error::Error;
use crate::metrics::METRICS;

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
    let params = req.parameters.unwrap_or_default();
    let top_k = sentiment_top_k(params.top_k)?;
    let function = params.function_to_apply.unwrap_or_default();
    let long_input = match (params.long_input.unwrap_or_default(), req.truncate) {
        (super::types::LongInput::Chunk, _) => LongInput::Chunk,
        (super::types::LongInput::Sentences, _) => LongInput::Sentences,
        (super::types::LongInput::Error, Some(true)) => LongInput::Truncate(
            req.truncation_direction
                .unwrap_or(state.config.default_truncation_direction),
        ),
        (super::types::LongInput::Error, _) => LongInput::Refuse,
    };
    let shape = Shape {
        function,
        top_k,
        chunks: params.return_chunks.unwrap_or(false),
        sentences: long_input == LongInput::Sentences,
        explain: params.explain.unwrap_or(false),
    };
    if params.targets.is_some() && (shape.chunks || params.prompt_template.is_some()) {
        return Err(ApiError::validation(
            "`parameters.targets`: a target is shown through the model's target template and \
             scored in the windows that hold its mentions: `prompt_template` and `return_chunks` \
             do not apply",
        ));
    }
    let targets = match (&req.inputs, params.targets) {
        (_, None) => None,
        (Inputs::One(_), Some(Targets::One(list))) => Some(vec![engine_targets(list)]),
        (Inputs::Many(_), Some(Targets::Many(lists))) => {
            Some(lists.into_iter().map(engine_targets).collect())
        }
        (Inputs::One(_), Some(Targets::Many(_))) => {
            return Err(ApiError::validation(
                "`parameters.targets`: for one input, give a list of targets (names or spans)",
            ));
        }
        (Inputs::Many(_), Some(Targets::One(_))) => {
            return Err(ApiError::validation(
                "`parameters.targets`: for a list of inputs, give a list of target lists, one \
                 per input",
            ));
        }
    };
    let query = ScoreQuery {
        texts: texts(req.inputs),
        variant: params.adapter_id,
        labels: params
            .candidate_labels
            .map(|l| l.0.into_iter().map(|l| l.0).collect()),
        template: params.prompt_template.map(|t| t.0),
        long_input,
        priority: priority(params.priority)?,
        targets,
        text_scores_with_targets: false,
        explain: shape.explain,
    };
    let request = tracing::Span::current();
    let scored = engine
        .score(query, Some(state.config.request_timeout))
        .await
        .map_err(|e| Dialect::Sentiment.error(e))?;
    let _response = tracing::info_span!("response").entered();
    record_timing(Route::Sentiment, scored.timing, &request, scored.submitted);
    let body = sentiment_body(&scored, shape);
    let response = (inference_headers(scored.timing, &scored.digest), Json(body)).into_response();
    Ok(scored_facts(&scored).on(response))
}

fn engine_targets(list: Vec<Target>) -> Vec<crate::engine::targets::Target> {
    list.into_iter().map(Into::into).collect()
}

/// What a /v1/sentiment answer holds besides each input's ranked labels.
#[derive(Clone, Copy)]
struct Shape {
    function: FunctionToApply,
    top_k: usize,
    chunks: bool,
    sentences: bool,
    explain: bool,
}

/// What answered a scoring request, for its audit record.
pub(super) fn scored_facts(scored: &Scored) -> Facts {
    Facts::new(&scored.variant, &scored.digest, scored.prompt_tokens())
}

/// `top_k` of `/v1/sentiment`: how many labels to return (all by default).
fn sentiment_top_k(top_k: Option<i64>) -> Result<usize, ApiError> {
    match top_k {
        Some(k) if k < 1 => Err(ApiError::validation(format!(
            "`parameters.top_k`: must be >= 1 (got {k})"
        ))),
        Some(k) => Ok(usize::try_from(k).unwrap_or(usize::MAX)),
        None => Ok(usize::MAX),
    }
}

/// Per text, its labels ranked, with the parts `shape` asks for (or, with targets, each
/// target's); counts each top label in the prediction metrics.
fn sentiment_body(scored: &Scored, shape: Shape) -> Vec<InputScores> {
    let names = &scored.labels.names;
    // Request-chosen label texts never become metric label values.
    let label_of = |label: &str| {
        if scored.custom_labels {
            "custom"
        } else {
            label
        }
        .to_string()
    };
    let values = |s: &LabelScores| -> Vec<f64> {
        match shape.function {
            FunctionToApply::Softmax => s.probs.clone(),
            FunctionToApply::None => s.log_probs.clone(),
        }
    };
    // Every ranking here is a prediction: an input's, or a target's.
    let rank = |s: &LabelScores| {
        let scores = ranked(names, &values(s), shape.top_k);
        if let Some(best) = scores.first() {
            let metric = [scored.variant.clone(), label_of(&best.label)];
            METRICS.predictions.with_label_values(&metric).inc();
            if shape.function == FunctionToApply::Softmax {
                METRICS
                    .top_score
                    .with_label_values(&metric)
                    .observe(best.score);
            }
        }
        scores
    };
    let explanation = |whole: &LabelScores, words: &[Occluded]| -> Option<Vec<WordAttribution>> {
        shape.explain.then(|| {
            let with = values(whole);
            words
                .iter()
                .map(|w| WordAttribution {
                    word: w.word.clone(),
                    start: w.span.0,
                    end: w.span.1,
                    attributions: names
                        .iter()
                        .zip(with.iter().zip(values(&w.scores)))
                        .map(|(label, (with, without))| LabelScore {
                            label: label.clone(),
                            score: with - without,
                        })
                        .collect(),
                })
                .collect()
        })
    };
    scored
        .texts
        .iter()
        .map(|text| {
            record_input_tokens(Route::Sentiment, text.prompt_tokens);
            if !text.targets.is_empty() {
                return InputScores::Targets(
                    text.targets
                        .iter()
                        .map(|t| TargetScores {
                            target: t.name.clone(),
                            spans: t.spans.iter().map(|&(s, e)| [s, e]).collect(),
                            scores: rank(&t.scores),
                            explanation: explanation(&t.scores, &t.words),
                        })
                        .collect(),
                );
            }
            let whole = LabelScores {
                probs: text.probs.clone(),
                log_probs: text.log_probs.clone(),
            };
            let scores = rank(&whole);
            if !(shape.chunks || shape.sentences || shape.explain) {
                return InputScores::Labels(scores);
            }
            InputScores::Detailed(DetailedScores {
                scores,
                chunks: shape.chunks.then(|| {
                    text.windows
                        .iter()
                        .map(|w| ChunkScores {
                            start: w.span.0,
                            end: w.span.1,
                            tokens: w.tokens,
                            scores: ranked(names, &values(&w.scores), usize::MAX),
                        })
                        .collect()
                }),
                sentences: shape.sentences.then(|| {
                    text.sentences
                        .iter()
                        .map(|s| SentenceScores {
                            start: s.span.0,
                            end: s.span.1,
                            tokens: s.windows.iter().map(|w| w.tokens).sum(),
                            scores: ranked(names, &values(&s.scores), usize::MAX),
                        })
                        .collect()
                }),
                explanation: explanation(&whole, &text.words),
            })
        })
        .collect()
}

/// The labels with their scores, best first, the first `top_k`.
pub(super) fn ranked(names: &[String], values: &[f64], top_k: usize) -> Vec<LabelScore> {
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
    if p.watermark == Some(true) {
        return Err(ApiError::validation(
            "`parameters.watermark`: watermarking is not available; only false is accepted",
        ));
    }
    let text = req.inputs.0;
    let prefix = p.return_full_text.unwrap_or(false).then(|| text.clone());
    let details = p.details.unwrap_or(false);
    let prefill_details = details && p.decoder_input_details.unwrap_or(false);
    let query = GenerateQuery {
        text,
        variant: p.adapter_id,
        priority: priority(p.priority)?,
        truncate: p.truncate,
        options: GenerateOptions {
            max_new_tokens: p.max_new_tokens,
            do_sample: p.do_sample,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            stop: p.stop.into_iter().flatten().map(|s| s.0).collect(),
            // TGI reports them with `details` and in every streamed token.
            logprobs: details || req.stream.unwrap_or(false),
        },
    };
    let request = tracing::Span::current();
    let generation = engine.generate_text(query).await?;
    record_input_tokens(Route::Generate, generation.prompt_ids.len());
    let prefill = if prefill_details {
        let texts = engine.token_texts(&generation.prompt_ids)?;
        generation
            .prompt_ids
            .iter()
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
    let deadline = Instant::now() + state.config.request_timeout;
    let mut facts = Facts::new(
        &generation.variant,
        &generation.digest,
        generation.prompt_ids.len(),
    );
    if req.stream.unwrap_or(false) {
        let digest = generation.digest.clone();
        let slot = StreamOutputs::default();
        facts.streamed = Some(slot.clone());
        let response = stream_response(generation, deadline, prefix, request, slot).into_response();
        return Ok(facts.on(with_digest(response, &digest)));
    }
    let digest = generation.digest.clone();
    let submitted = generation.submitted;
    let out = generation.collect(Some(deadline)).await?;
    record_timing(Route::Generate, out.timing, &request, submitted);
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
    Ok(facts.on((inference_headers(out.timing, &digest), Json(body)).into_response()))
}

/// TGI-style server-sent events: one per token; the last carries `generated_text` and `details`.
fn stream_response(
    generation: Generation,
    deadline: Instant,
    prefix: Option<String>,
    request: tracing::Span,
    outputs: StreamOutputs,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct S {
        generation: Generation,
        index: u32,
        done: bool,
        prefix: Option<String>,
        request: tracing::Span,
        outputs: StreamOutputs,
    }
    let submitted: SystemTime = generation.submitted;
    let init = S {
        generation,
        index: 0,
        done: false,
        prefix,
        request,
        outputs,
    };
    let stream = futures::stream::unfold(init, move |mut s| async move {
        if s.done {
            return None;
        }
        let event = match tokio::time::timeout_at(deadline.into(), s.generation.events.recv()).await
        {
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
                record_timing(Route::Generate, out.timing, &s.request, submitted);
                match out.tokens.last() {
                    Some(last) => {
                        let last = StreamResponse {
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
                        };
                        if let Ok(mut slot) = s.outputs.lock() {
                            *slot = serde_json::to_value(&last).ok();
                        }
                        json_event(&last)
                    }
                    None => error_event(&ApiError::from(Error::Inference(
                        "the generation ended without a token".into(),
                    ))),
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
    } else if engine.failed_batches_in_a_row() >= state.config.max_failed_batches {
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
    let texts = texts(req.inputs);
    engine.check_text_count(texts.len())?;
    let special = req.add_special_tokens.unwrap_or(true);
    let template = req.prompt_template.unwrap_or(false);
    let body = off_runtime(Route::Tokenize, move || {
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
    let texts = off_runtime(Route::Decode, move || {
        seqs.iter()
            .map(|ids| engine.decode(ids, skip))
            .collect::<crate::error::Result<Vec<_>>>()
    })
    .await?;
    Ok(Json(texts))
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
    let mut info = state.info.get().cloned().ok_or_else(ApiError::not_ready)?;
    // Variants that change at runtime are listed as they are now.
    if let Some(variants) = state.variants.get() {
        let listed = variants.list();
        if let Some((default, others)) = listed.split_first() {
            info.unshared_bytes = default.unshared_bytes;
            info.variants = others.iter().map(VariantInfo::new).collect();
        }
        info.weight_bytes = variants.weight_bytes();
    }
    Ok(Json(info))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 500, description = "The metrics could not be rendered", body = ErrorResponse)))]
pub async fn metrics() -> Result<Response, ApiError> {
    let text = crate::metrics::render()
        .map_err(|e| ApiError::internal(format!("cannot render the metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
