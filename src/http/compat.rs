//! Routes that other servers' clients already speak, mapped onto the same exact label scoring
//! and generation as finserve's own: TEI's `POST /predict`, vLLM's `POST /classify` and
//! `POST /score`, SageMaker's `GET /ping` and `POST /invocations` (with `--sagemaker`), and
//! TGI's `POST /generate` and `POST /generate_stream`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::AppState;
use super::common::{engine, inference_headers, priority, texts};
use super::error::{ApiError, Dialect};
use super::extract::JsonBody;
use super::routes::{self, scored_facts};
use super::types::{ErrorResponse, GenerateRequest, Inputs, Label, LabelScore, SentimentRequest};
use crate::engine::infer::{LongInput, ScoreQuery, Scored};
use crate::engine::prompt::TruncationDirection;

/// TEI's classification request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"inputs": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."}))]
pub struct PredictRequest {
    #[serde(deserialize_with = "super::types::inputs")]
    pub inputs: Inputs,
    /// Cut inputs over the server's `max_input_tokens` instead of refusing them.
    pub truncate: Option<bool>,
    pub truncation_direction: Option<TruncationDirection>,
    /// The labels' log-likelihoods instead of their probabilities.
    pub raw_scores: Option<bool>,
}

/// One input's labels, best first; a list of inputs gets a list of these.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PredictResponse {
    One(Vec<LabelScore>),
    Many(Vec<Vec<LabelScore>>),
}

/// Scores `texts` with `variant` (`None`: the default model), naming refusals in `dialect`.
async fn score(
    state: &AppState,
    variant: Option<String>,
    texts: Vec<String>,
    labels: Option<Vec<String>>,
    long_input: LongInput,
    dialect: Dialect,
) -> Result<Scored, ApiError> {
    let query = ScoreQuery {
        texts,
        variant,
        labels,
        long_input,
        priority: priority(None)?,
        ..Default::default()
    };
    engine(state)?
        .score(query, Some(state.config.request_timeout))
        .await
        .map_err(|e| dialect.error(e))
}

/// The scored labels of one text, best first: probabilities, or log-likelihoods with `raw`.
fn ranked(scored: &Scored, text: usize, raw: bool) -> Vec<LabelScore> {
    let t = &scored.texts[text];
    let values = if raw { &t.log_probs } else { &t.probs };
    routes::ranked(&scored.labels.names, values, usize::MAX)
}

/// vLLM's `truncate_prompt_tokens`: any positive value cuts inputs to the server's limit.
fn long_input_of(truncate: Option<i64>, state: &AppState) -> Result<LongInput, ApiError> {
    match truncate {
        Some(n) if n < 1 => Err(ApiError::validation(format!(
            "`truncate_prompt_tokens`: must be >= 1 (got {n})"
        ))),
        Some(_) => Ok(LongInput::Truncate(
            state.config.default_truncation_direction,
        )),
        None => Ok(LongInput::Refuse),
    }
}

/// Classifies texts (text-embeddings-inference's format): every label with its score, best first.
#[utoipa::path(post, path = "/predict", tag = "compat",
    request_body = PredictRequest,
    responses(
        (status = 200, description = "Per input, every label with its score, best first", body = PredictResponse),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 504, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn predict(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<PredictRequest>,
) -> Result<Response, ApiError> {
    let one = matches!(req.inputs, Inputs::One(_));
    let long_input = if req.truncate.unwrap_or(false) {
        LongInput::Truncate(
            req.truncation_direction
                .unwrap_or(state.config.default_truncation_direction),
        )
    } else {
        LongInput::Refuse
    };
    let scored = score(
        &state,
        None,
        texts(req.inputs),
        None,
        long_input,
        Dialect::Sentiment,
    )
    .await?;
    let raw = req.raw_scores.unwrap_or(false);
    let mut all: Vec<Vec<LabelScore>> = (0..scored.texts.len())
        .map(|i| ranked(&scored, i, raw))
        .collect();
    let body = match (one, all.pop()) {
        (true, Some(only)) => PredictResponse::One(only),
        (_, last) => {
            all.extend(last);
            PredictResponse::Many(all)
        }
    };
    let response = (inference_headers(scored.timing, &scored.digest), Json(body)).into_response();
    Ok(scored_facts(&scored).on(response))
}

/// vLLM's classification request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "finserve-demo", "input": ["Profit rose .", "Sales fell ."]}))]
pub struct ClassifyRequest {
    /// A name from `/v1/models` (default: the default model).
    pub model: Option<String>,
    #[serde(deserialize_with = "super::types::inputs")]
    pub input: Inputs,
    /// Cut inputs to the server's `max_input_tokens` (any positive value; vLLM's token count is
    /// not used, the server's limit is).
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1)]
    pub truncate_prompt_tokens: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClassifyData {
    pub index: usize,
    /// The most probable label.
    pub label: String,
    /// Every label's probability, in `/info`'s `labels` order.
    pub probs: Vec<f64>,
    pub num_classes: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoringUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClassifyResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<ClassifyData>,
    pub usage: ScoringUsage,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage(scored: &Scored) -> ScoringUsage {
    let tokens = scored.prompt_tokens();
    ScoringUsage {
        prompt_tokens: tokens,
        total_tokens: tokens,
    }
}

/// Scores with the variant named by an OpenAI-style `model`.
async fn score_with(
    state: &AppState,
    model: Option<String>,
    texts: Vec<String>,
    labels: Option<Vec<String>>,
    long_input: LongInput,
) -> Result<(String, Scored), ApiError> {
    let engine = engine(state)?;
    if let Some(m) = &model {
        engine
            .variant(Some(m))
            .map_err(|e| Dialect::OpenAi.error(e))?;
    }
    let name = model.unwrap_or_else(|| state.config.model_name.clone());
    let variant = (name != state.config.model_name).then(|| name.clone());
    let scored = score(state, variant, texts, labels, long_input, Dialect::OpenAi).await?;
    Ok((name, scored))
}

/// Classifies texts (vLLM's format): each input's most probable label and every label's
/// probability.
#[utoipa::path(post, path = "/classify", tag = "compat",
    request_body = ClassifyRequest,
    responses(
        (status = 200, body = ClassifyResponse),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 504, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ClassifyRequest>,
) -> Result<Response, ApiError> {
    let long_input = long_input_of(req.truncate_prompt_tokens, &state)?;
    let (model, scored) = score_with(&state, req.model, texts(req.input), None, long_input).await?;
    let names = &scored.labels.names;
    let data = scored
        .texts
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let best = t
                .probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            ClassifyData {
                index,
                label: names[best].clone(),
                probs: t.probs.clone(),
                num_classes: names.len(),
            }
        })
        .collect();
    let body = ClassifyResponse {
        id: format!("classify-{}", uuid::Uuid::new_v4().simple()),
        object: "list".into(),
        created: now(),
        model,
        data,
        usage: usage(&scored),
    };
    let response = (inference_headers(scored.timing, &scored.digest), Json(body)).into_response();
    Ok(scored_facts(&scored).on(response))
}

/// One label or several (vLLM's `text_2`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ScoreLabels {
    One(Label),
    Many(ScoreLabelList),
}

/// Labels to score texts against (repeats allowed: pairs may share a label).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_items = 1)]
pub struct ScoreLabelList(Vec<Label>);

/// vLLM's scoring request, read as zero-shot classification: `text_1` is the text (or texts),
/// `text_2` the labels. As many texts as labels (more than one) are scored in pairs; otherwise
/// every text against every label, text by text. Each score is the exact probability of the
/// label for the text among the request's distinct labels, or, when it names only one, among
/// that label and the served labels.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "finserve-demo", "text_1": "Profit rose .", "text_2": ["positive", "negative", "neutral"]}))]
pub struct ScoreRequest {
    /// A name from `/v1/models` (default: the default model).
    pub model: Option<String>,
    #[serde(deserialize_with = "super::types::inputs")]
    pub text_1: Inputs,
    pub text_2: ScoreLabels,
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1)]
    pub truncate_prompt_tokens: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreData {
    pub index: usize,
    pub object: String,
    pub score: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<ScoreData>,
    pub usage: ScoringUsage,
}

/// Scores texts against labels (vLLM's format): in pairs, or every text against every label;
/// each score is the label's exact probability among the request's labels (see the request).
#[utoipa::path(post, path = "/score", tag = "compat",
    request_body = ScoreRequest,
    responses(
        (status = 200, body = ScoreResponse),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 504, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn score_pairs(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ScoreRequest>,
) -> Result<Response, ApiError> {
    let texts = texts(req.text_1);
    let labels: Vec<String> = match req.text_2 {
        ScoreLabels::One(l) => vec![l.0],
        ScoreLabels::Many(ScoreLabelList(v)) => v.into_iter().map(|l| l.0).collect(),
    };
    if labels.is_empty() {
        return Err(ApiError::validation(
            "`text_2`: the list of labels is empty",
        ));
    }
    let pairs = texts.len() > 1 && texts.len() == labels.len();
    let mut candidates: Vec<String> = Vec::new();
    for l in &labels {
        if !candidates.contains(l) {
            candidates.push(l.clone());
        }
    }
    if candidates.len() < 2 {
        let engine = engine(&state)?;
        let served = &engine.labels().names;
        candidates.extend(served.iter().filter(|l| !labels.contains(l)).cloned());
    }
    let long_input = long_input_of(req.truncate_prompt_tokens, &state)?;
    let (model, scored) = score_with(
        &state,
        req.model,
        texts,
        Some(candidates.clone()),
        long_input,
    )
    .await?;
    let prob = |text: usize, label: &str| {
        let at = candidates.iter().position(|c| c == label).unwrap_or(0);
        scored.texts[text].probs[at]
    };
    let scores: Vec<f64> = if pairs {
        labels.iter().enumerate().map(|(i, l)| prob(i, l)).collect()
    } else {
        (0..scored.texts.len())
            .flat_map(|t| labels.iter().map(move |l| (t, l)))
            .map(|(t, l)| prob(t, l))
            .collect()
    };
    let body = ScoreResponse {
        id: format!("score-{}", uuid::Uuid::new_v4().simple()),
        object: "list".into(),
        created: now(),
        model,
        data: scores
            .into_iter()
            .enumerate()
            .map(|(index, score)| ScoreData {
                index,
                object: "score".into(),
                score,
            })
            .collect(),
        usage: usage(&scored),
    };
    let response = (inference_headers(scored.timing, &scored.digest), Json(body)).into_response();
    Ok(scored_facts(&scored).on(response))
}

/// SageMaker's health check: 200 once the model is loaded and serving, 503 before.
#[utoipa::path(get, path = "/ping", tag = "compat",
    responses((status = 200, description = "Ready"), (status = 503, description = "Not ready")))]
pub async fn ping(State(state): State<Arc<AppState>>) -> StatusCode {
    routes::ready(State(state)).await.0
}

/// SageMaker's inference route: the body's shape picks the route that answers it. `messages`:
/// chat completion; `prompt`: completion; `text_1`: `/score`; `input`: `/classify`; `inputs`
/// with a generation parameter (`max_new_tokens`, `do_sample`, ...) or `stream`: `/v1/generate`;
/// other `inputs`: `/v1/sentiment`.
#[utoipa::path(post, path = "/invocations", tag = "compat",
    request_body(content = Value, description = "A request of any of the routes above"),
    responses(
        (status = 200, description = "The answer of the route the body's shape picked", body = Value),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 504, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn invocations(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<serde_json::Map<String, Value>>,
) -> Result<Response, ApiError> {
    let has = |k: &str| body.contains_key(k);
    let generation_keys = [
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "repetition_penalty",
        "seed",
        "stop",
        "details",
        "decoder_input_details",
        "return_full_text",
        "watermark",
    ];
    let generates = has("stream")
        || body
            .get("parameters")
            .and_then(Value::as_object)
            .is_some_and(|p| generation_keys.iter().any(|k| p.contains_key(*k)));
    let value = Value::Object(body.clone());
    let state = State(state);
    if has("messages") {
        super::openai::chat(state, JsonBody(parse_as(value)?)).await
    } else if has("prompt") {
        super::openai::completions(state, JsonBody(parse_as(value)?)).await
    } else if has("text_1") {
        score_pairs(state, JsonBody(parse_as(value)?)).await
    } else if has("input") {
        classify(state, JsonBody(parse_as(value)?)).await
    } else if generates {
        let req: GenerateRequest = parse_as(value)?;
        routes::generate(state, JsonBody(req)).await
    } else if has("inputs") {
        let req: SentimentRequest = parse_as(value)?;
        routes::sentiment(state, JsonBody(req)).await
    } else {
        Err(ApiError::validation(
            "the body has none of `inputs`, `input`, `text_1`, `prompt` or `messages`, so no \
             route can answer it",
        ))
    }
}

/// `value` as the request type `T`, with the errors the route itself would give.
fn parse_as<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    super::extract::from_value(value)
}

/// TGI's generation route (the same as `/v1/generate`).
#[utoipa::path(post, path = "/generate", tag = "compat",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text", body = super::types::GenerateResponse),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 504, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn tgi_generate(
    state: State<Arc<AppState>>,
    JsonBody(mut req): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    req.stream = Some(false);
    routes::generate(state, JsonBody(req)).await
}

/// TGI's streaming route: server-sent events, one per token (as `/v1/generate` with `stream`).
#[utoipa::path(post, path = "/generate_stream", tag = "compat",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Server-sent events, one StreamResponse per token",
         content((super::types::StreamResponse = "text/event-stream"))),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn tgi_generate_stream(
    state: State<Arc<AppState>>,
    JsonBody(mut req): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    req.stream = Some(true);
    routes::generate(state, JsonBody(req)).await
}

/// TGI's own route: what its Python client posts to the server's base URL. Without `stream`
/// the answer is a list of one generation, as TGI answers there; with it, server-sent events.
#[utoipa::path(post, path = "/", tag = "compat",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "A list of one generation; with `stream`, server-sent events",
         content(
            (Vec<super::types::GenerateResponse> = "application/json"),
            (super::types::StreamResponse = "text/event-stream")
         )),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 422, body = ErrorResponse),
        (status = 429, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 504, body = ErrorResponse)),
    security((), ("api_key" = [])))]
pub async fn tgi_root(
    state: State<Arc<AppState>>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    let stream = req.stream == Some(true);
    let response = routes::generate(state, JsonBody(req)).await?;
    if stream {
        return Ok(response);
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read the generation: {e}")))?;
    let one: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::internal(format!("cannot read the generation: {e}")))?;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let list = Value::Array(vec![one]).to_string();
    Ok(Response::from_parts(parts, axum::body::Body::from(list)))
}
