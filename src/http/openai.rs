//! OpenAI-compatible routes (`/v1/models`, `/v1/completions`, `/v1/chat/completions`), so
//! LangChain, LiteLLM, gateways and the `openai` client can call finserve. They map onto the same
//! generation as `/v1/generate`: `temperature: 0` is greedy decoding, any other temperature
//! samples (OpenAI's default is 1), `top_p: 1` means no nucleus cut. mt0 has no chat template,
//! so a chat's prompt is its messages' contents joined by newlines. Only `n: 1` exists, and
//! log-probabilities are those of the chosen tokens (no top alternatives).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::AppState;
use super::audited::{Facts, StreamOutputs};
use super::common::{
    engine, error_event, inference_headers, model_names, priority, record_input_tokens,
    record_timing, with_digest,
};
use super::error::{ApiError, Dialect};
use super::extract::JsonBody;
use super::route::Route;
use super::routes::scored_facts;
use super::types::{ErrorResponse, Label, StopSequence, Text};
use crate::engine::generate::FinishReason;
use crate::engine::infer::{GenerateQuery, Generation, LongInput, ScoreQuery, Scored};
use crate::engine::validation::{self, GenerateOptions};
use crate::engine::{GenerateEvent, TokenInfo};
use crate::error::Error;

/// OpenAI's error body, which its SDKs and LangChain read: every error of the OpenAI routes
/// (a refusal of the middleware or the handler) comes in this shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiError {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// finserve's `error_type` (e.g. `validation`, `model_not_found`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when the message names one.
    pub param: Option<String>,
    /// Also the `error_type`.
    pub code: Option<String>,
}

/// Whether `path` is an OpenAI route.
fn is_openai(path: &str) -> bool {
    matches!(
        path,
        "/v1/completions" | "/v1/chat/completions" | "/v1/models"
    )
}

/// Rewrites the error responses of the OpenAI routes from finserve's `{"error", "error_type"}`
/// into OpenAI's `{"error": {"message", "type", "param", "code"}}`.
pub(super) async fn errors_in_openai_shape(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let openai = is_openai(req.uri().path());
    let response = next.run(req).await;
    if !openai || !(response.status().is_client_error() || response.status().is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    // finserve's error bodies are a few hundred bytes.
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return Response::from_parts(parts, axum::body::Body::empty());
    };
    let Ok(e) = serde_json::from_slice::<ErrorResponse>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let param = e
        .error
        .strip_prefix('`')
        .and_then(|rest| rest.split_once("`:"))
        .map(|(field, _)| field.to_string());
    let body = OpenAiError {
        error: OpenAiErrorDetail {
            message: e.error,
            kind: e.error_type.clone(),
            param,
            code: Some(e.error_type),
        },
    };
    let mut response = (parts.status, Json(body)).into_response();
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_LENGTH && name != axum::http::header::CONTENT_TYPE {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

/// One served model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<Model>,
}

/// A prompt: one text, or a list holding one text.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    One(Text),
    List(OnePrompt),
}

/// A list of exactly one prompt (only `n: 1` is served).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_items = 1, max_items = 1)]
pub struct OnePrompt(Vec<Text>);

/// `stop`: one sequence or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(StopSequence),
    Many(StopList),
}

/// Stop sequences (at most the server's `max_stop_sequences`, see `/info`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct StopList(Vec<StopSequence>);

/// The sampling fields both OpenAI routes share (repeated in each request type: serde cannot
/// refuse unknown fields of a struct with a flattened member).
struct Sampling {
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    /// Whether the answer reports log-probabilities (each route has its own field for it).
    logprobs: bool,
}

macro_rules! sampling {
    ($req:expr, $logprobs:expr) => {
        Sampling {
            temperature: $req.temperature,
            top_p: $req.top_p,
            seed: $req.seed,
            stop: $req.stop.clone(),
            n: $req.n,
            logprobs: $logprobs,
        }
    };
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "finserve", "prompt": "Profit rose 20 % . Sentiment:", "max_tokens": 3, "temperature": 0}))]
pub struct CompletionRequest {
    /// A name from `/v1/models`.
    pub model: String,
    pub prompt: PromptInput,
    /// Default 16 (at most the server's `max_new_tokens`).
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// 0 returns the chosen tokens' log-probabilities; top alternatives are not available.
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 0, maximum = 0)]
    pub logprobs: Option<i64>,
    /// 0 is greedy decoding; default 1 (sampling), as OpenAI.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 0)]
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    /// Only 1.
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<i64>,
    pub stream: Option<bool>,
    /// Only with `stream`.
    pub stream_options: Option<StreamOptions>,
    /// Only 0 (no frequency penalty is applied).
    pub frequency_penalty: Option<f64>,
    /// Only 0 (no presence penalty is applied).
    pub presence_penalty: Option<f64>,
    /// Answer with the most probable of these texts, by exact scoring (vLLM's guided choice);
    /// not with `stream`.
    pub guided_choice: Option<Choices>,
    /// vLLM's newer spelling of `guided_choice`: `{"choice": [...]}`.
    pub structured_outputs: Option<StructuredOutputs>,
}

/// A chat message; only its `content` reaches the model.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    #[serde(deserialize_with = "content")]
    pub content: Content,
}

/// A message's content: a text, or a list of text parts (what current SDKs send), joined by
/// newlines.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(Text),
    Parts(TextParts),
}

/// A non-empty list of text parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_items = 1)]
pub struct TextParts(Vec<TextPart>);

/// One part of a message's content; only text parts exist here.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextPart {
    #[serde(rename = "type")]
    pub kind: PartKind,
    pub text: Text,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    Text,
}

/// `content`, read by hand rather than through `untagged` so the error says what is wrong with
/// a part.
fn content<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Content, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        v @ Value::String(_) => Text::deserialize(v)
            .map(Content::Text)
            .map_err(|e| e.to_string()),
        Value::Array(parts) if parts.is_empty() => Err("the list of parts is empty".into()),
        Value::Array(parts) => parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let kind = p
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                TextPart::deserialize(p).map_err(|e| {
                    if kind != "text" {
                        format!("part {i} is of type `{kind}`: only text parts are served")
                    } else {
                        format!("part {i}: {e}")
                    }
                })
            })
            .collect::<Result<Vec<_>, String>>()
            .map(|parts| Content::Parts(TextParts(parts))),
        _ => Err("expected a string or a list of text parts".into()),
    }
    .map_err(D::Error::custom)
}

impl Content {
    fn text(&self) -> String {
        match self {
            Self::Text(t) => t.0.clone(),
            Self::Parts(TextParts(parts)) => parts
                .iter()
                .map(|p| p.text.0.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// The texts a guided choice picks from.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_items = 2)]
pub struct Choices(pub Vec<Label>);

/// `structured_outputs`: only `choice` is served.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    pub choice: Choices,
}

/// `stream_options`: with `include_usage`, a streamed answer's last chunk (empty `choices`)
/// carries `usage` (an answer that is not streamed always does).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "finserve", "messages": [{"role": "user", "content": "Profit rose 20 % ."}], "max_tokens": 3}))]
pub struct ChatRequest {
    /// A name from `/v1/models`.
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<Message>,
    /// Default 16 (at most the server's `max_new_tokens`).
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// OpenAI's newer name for `max_tokens`; it wins when both are set.
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    /// Return the chosen tokens' log-probabilities.
    pub logprobs: Option<bool>,
    /// Only 0: top alternatives are not available.
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 0, maximum = 0)]
    pub top_logprobs: Option<i64>,
    /// 0 is greedy decoding; default 1 (sampling), as OpenAI.
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 0)]
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    /// Only 1.
    #[serde(default, deserialize_with = "super::types::integer")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<i64>,
    pub stream: Option<bool>,
    /// Only with `stream`.
    pub stream_options: Option<StreamOptions>,
    /// Only 0 (no frequency penalty is applied).
    pub frequency_penalty: Option<f64>,
    /// Only 0 (no presence penalty is applied).
    pub presence_penalty: Option<f64>,
    /// Answer with the most probable of these texts, by exact scoring (vLLM's guided choice);
    /// not with `stream`.
    pub guided_choice: Option<Choices>,
    /// vLLM's newer spelling of `guided_choice`: `{"choice": [...]}`.
    pub structured_outputs: Option<StructuredOutputs>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// What both routes set up before generating.
struct Run {
    dialect: Dialect,
    id: String,
    created: u64,
    model: String,
    route: Route,
    generation: Generation,
    deadline: Instant,
    /// The request's span, for its queue and inference spans.
    request: tracing::Span,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// The generation options of the OpenAI sampling fields, refusing what OpenAI does not allow.
fn options(max_tokens: Option<i64>, s: &Sampling) -> Result<GenerateOptions, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::validation("`n` must be 1"));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::validation(format!(
            "`temperature` must be between 0 and 2 (got {temperature})"
        )));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::validation(format!(
            "`top_p` must be > 0 and <= 1 (got {top_p})"
        )));
    }
    let greedy = temperature == 0.0;
    Ok(GenerateOptions {
        max_new_tokens: Some(max_tokens.unwrap_or(16)),
        do_sample: Some(!greedy),
        temperature: (!greedy).then_some(temperature),
        top_p: (!greedy && top_p < 1.0).then_some(top_p),
        seed: s.seed,
        stop: match s.stop.clone() {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.0],
            Some(Stop::Many(StopList(v))) => v.into_iter().map(|s| s.0).collect(),
        },
        logprobs: s.logprobs,
        ..Default::default()
    })
}

/// Checks the model name and sampling fields, tokenizes and queues the generation.
async fn start(
    state: &Arc<AppState>,
    model: String,
    prompt: String,
    max_tokens: Option<i64>,
    s: &Sampling,
    route: Route,
) -> Result<Run, ApiError> {
    let engine = engine(state)?;
    let dialect = match route {
        Route::ChatCompletions => Dialect::Chat,
        _ => Dialect::OpenAi,
    };
    // An unknown model is a 404 whatever else the request gets wrong.
    engine.variant(Some(&model)).map_err(|e| dialect.error(e))?;
    let query = GenerateQuery {
        text: prompt,
        variant: Some(model.clone()),
        truncate: None,
        options: options(max_tokens, s)?,
        priority: priority(None)?,
    };
    let generation = engine
        .generate_text(query)
        .await
        .map_err(|e| dialect.error(e))?;
    record_input_tokens(route, generation.prompt_ids.len());
    let prefix = match route {
        Route::ChatCompletions => "chatcmpl",
        _ => "cmpl",
    };
    Ok(Run {
        dialect,
        id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
        created: now(),
        model,
        route,
        generation,
        deadline: Instant::now() + state.config.request_timeout,
        request: tracing::Span::current(),
    })
}

impl Run {
    /// What answers this run, for its audit record.
    fn facts(&self) -> Facts {
        let g = &self.generation;
        Facts::new(&g.variant, &g.digest, g.prompt_ids.len())
    }
}

/// Waits for `run`'s generation and records its timing.
async fn finish_run(run: Run) -> Result<(usize, crate::engine::GenerateOutput), ApiError> {
    let prompt_tokens = run.generation.prompt_ids.len();
    let submitted = run.generation.submitted;
    let out = run
        .generation
        .collect(Some(run.deadline))
        .await
        .map_err(|e| run.dialect.error(e))?;
    record_timing(run.route, out.timing, &run.request, submitted);
    Ok((prompt_tokens, out))
}

fn prompt_of(p: PromptInput) -> Result<String, ApiError> {
    match p {
        PromptInput::One(s) => Ok(s.0),
        PromptInput::List(OnePrompt(mut v)) if v.len() == 1 => Ok(v.remove(0).0),
        PromptInput::List(_) => Err(ApiError::validation(
            "`prompt` must be one text (or a list of one): only `n: 1` is served",
        )),
    }
}

/// Refuses the penalties finserve does not apply unless they are 0.
fn check_penalties(frequency: Option<f64>, presence: Option<f64>) -> Result<(), ApiError> {
    for (name, v) in [
        ("frequency_penalty", frequency),
        ("presence_penalty", presence),
    ] {
        if let Some(v) = v.filter(|&v| v != 0.0) {
            return Err(ApiError::validation(format!(
                "`{name}` must be 0: no penalty is applied (got {v})"
            )));
        }
    }
    Ok(())
}

/// The texts of a guided choice (`guided_choice`, or `structured_outputs.choice`), if asked for.
fn guided(
    choice: Option<Choices>,
    structured: Option<StructuredOutputs>,
) -> Result<Option<Vec<String>>, ApiError> {
    let choices = match (choice, structured) {
        (Some(_), Some(_)) => {
            return Err(ApiError::validation(
                "`guided_choice` and `structured_outputs` are the same request: give one",
            ));
        }
        (Some(c), None) | (None, Some(StructuredOutputs { choice: c })) => c,
        (None, None) => return Ok(None),
    };
    Ok(Some(choices.0.into_iter().map(|l| l.0).collect()))
}

/// A guided choice's `choices` entry as one route shapes it: the whole answer, and as a stream
/// the chunk with the text and the last one with the finish reason.
struct ChoiceShapes {
    whole: Value,
    text: Value,
    end: Value,
}

/// The answer of a guided choice: one body, or with `stream` (`Some(with_usage)`) the same as
/// server-sent chunks (the choice, the finish, the usage when asked for, `[DONE]`).
fn choice_response(
    c: &Chosen,
    base: Value,
    stream: Option<bool>,
    shapes: ChoiceShapes,
) -> Response {
    let usage = json!(usage(c.prompt_tokens, c.completion_tokens));
    let with = |choices: Value, usage: Option<&Value>| {
        let mut body = base.clone();
        body["choices"] = choices;
        if let Some(u) = usage {
            body["usage"] = u.clone();
        }
        body
    };
    let headers = inference_headers(c.scored.timing, &c.scored.digest);
    let mut facts = scored_facts(&c.scored);
    let Some(with_usage) = stream else {
        let body = with(json!([shapes.whole]), Some(&usage));
        return facts.on((headers, Json(body)).into_response());
    };
    let mut chunks = vec![
        with(json!([shapes.text]), None),
        with(json!([shapes.end]), None),
    ];
    if with_usage {
        chunks.push(with(json!([]), Some(&usage)));
    }
    let outputs = with(json!([shapes.whole]), Some(&usage));
    facts.streamed = Some(Arc::new(std::sync::Mutex::new(Some(outputs))));
    let events = chunks
        .iter()
        .map(|c| Event::default().data(c.to_string()))
        .chain([Event::default().data("[DONE]")])
        .map(Ok::<_, Infallible>)
        .collect::<Vec<_>>();
    let sse = Sse::new(futures::stream::iter(events));
    facts.on((headers, sse).into_response())
}

/// A guided choice answered: `prompt` (as the model reads it when generating) scored against
/// `choices`, the most probable first.
struct Chosen {
    text: String,
    logprob: f64,
    prompt_tokens: usize,
    completion_tokens: usize,
    scored: Scored,
}

async fn choose(
    state: &AppState,
    model: String,
    prompt: String,
    choices: Vec<String>,
    dialect: Dialect,
) -> Result<Chosen, ApiError> {
    let engine = engine(state)?;
    engine.variant(Some(&model)).map_err(|e| dialect.error(e))?;
    let query = ScoreQuery {
        texts: vec![prompt],
        variant: Some(model),
        labels: Some(choices),
        template: Some("{text}".into()),
        long_input: LongInput::Refuse,
        priority: priority(None)?,
        ..ScoreQuery::default()
    };
    let scored = engine
        .score(query, Some(state.config.request_timeout))
        .await
        .map_err(|e| dialect.error(e))?;
    let text = scored
        .texts
        .first()
        .ok_or_else(|| ApiError::internal("no scores for the prompt"))?;
    let (best, p) = text
        .probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .ok_or_else(|| ApiError::internal("no choices were scored"))?;
    Ok(Chosen {
        text: scored.labels.names[best].clone(),
        logprob: p.ln(),
        prompt_tokens: scored.prompt_tokens(),
        completion_tokens: scored.labels.targets[best].len(),
        scored,
    })
}

/// The models this server serves (OpenAI's format).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = ModelList), (status = 401, body = OpenAiError)),
    security((), ("api_key" = [])))]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let created = state.started;
    Json(ModelList {
        object: "list".into(),
        data: model_names(&state)
            .into_iter()
            .map(|id| Model {
                id,
                object: "model".into(),
                created,
                owned_by: "finserve".into(),
            })
            .collect(),
    })
}

/// Text completion (OpenAI's legacy completions format; `stream: true` for server-sent events
/// ending with `data: [DONE]`).
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, chunks of it as server-sent events",
         content((Value = "application/json"), (Value = "text/event-stream"))),
        (status = 400, body = OpenAiError), (status = 401, body = OpenAiError),
        (status = 404, description = "Unknown model", body = OpenAiError),
        (status = 413, body = OpenAiError), (status = 422, body = OpenAiError),
        (status = 429, body = OpenAiError), (status = 503, body = OpenAiError),
        (status = 504, body = OpenAiError),
    ),
    security((), ("api_key" = [])))]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    if req.logprobs.is_some_and(|n| n != 0) {
        return Err(ApiError::validation(
            "`logprobs` must be 0: only the chosen tokens' log-probabilities are available",
        ));
    }
    let with_logprobs = req.logprobs.is_some();
    let prompt = prompt_of(req.prompt)?;
    let stream = req.stream.unwrap_or(false);
    check_penalties(req.frequency_penalty, req.presence_penalty)?;
    let with_usage = include_usage(stream, &req.stream_options);
    if let Some(choices) = guided(req.guided_choice, req.structured_outputs)? {
        // Nothing is sampled, but what the request says must still be valid.
        let options = options(req.max_tokens, &sampling!(req, with_logprobs))?;
        validation::generate_params(&options, 0, &state.config.limits)
            .map_err(|e| Dialect::OpenAi.error(e))?;
        let c = choose(&state, req.model.clone(), prompt, choices, Dialect::OpenAi).await?;
        let logprobs = with_logprobs.then(|| {
            json!({"tokens": [c.text], "token_logprobs": [c.logprob], "top_logprobs": null,
                   "text_offset": [0]})
        });
        let base = json!({"id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
            "object": "text_completion", "created": now(), "model": req.model,
            "system_fingerprint": c.scored.digest});
        let shapes = ChoiceShapes {
            whole: json!({"index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": "stop"}),
            text: json!({"index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": null}),
            end: json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "stop"}),
        };
        return Ok(choice_response(
            &c,
            base,
            stream.then_some(with_usage),
            shapes,
        ));
    }
    let sampling = sampling!(req, with_logprobs);
    let run = start(
        &state,
        req.model,
        prompt,
        req.max_tokens,
        &sampling,
        Route::Completions,
    )
    .await?;
    let digest = run.generation.digest.clone();
    let mut facts = run.facts();
    let base = json!({"id": run.id, "object": "text_completion", "created": run.created,
                      "model": run.model, "system_fingerprint": digest});
    if stream {
        let slot = StreamOutputs::default();
        facts.streamed = Some(slot.clone());
        let events = sse(run, base, with_usage, slot, |t, end| {
            json!([{"index": 0, "text": t.map_or("", |t| t.text.as_str()),
                     "logprobs": null, "finish_reason": end.map(finish)}])
        });
        return Ok(facts.on(with_digest(events.into_response(), &digest)));
    }
    let mut base = base;
    let (prompt_tokens, out) = finish_run(run).await?;
    let logprobs = with_logprobs.then(|| {
        let mut offset = 0;
        let offsets: Vec<usize> = out
            .tokens
            .iter()
            .map(|t| {
                let at = offset;
                offset += t.text.len();
                at
            })
            .collect();
        json!({"tokens": out.tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
               "token_logprobs": out.tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
               "top_logprobs": null, "text_offset": offsets})
    });
    base["choices"] = json!([{"index": 0, "text": out.generated_text, "logprobs": logprobs,
                               "finish_reason": finish(out.finish_reason)}]);
    base["usage"] = json!(usage(prompt_tokens, out.tokens.len()));
    Ok(facts.on(with_digest(Json(base).into_response(), &digest)))
}

/// Chat completion (OpenAI's format; `stream: true` for server-sent events ending with
/// `data: [DONE]`). The prompt is the messages' contents joined by newlines.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The reply; with `stream`, chunks of it as server-sent events",
         content((Value = "application/json"), (Value = "text/event-stream"))),
        (status = 400, body = OpenAiError), (status = 401, body = OpenAiError),
        (status = 404, description = "Unknown model", body = OpenAiError),
        (status = 413, body = OpenAiError), (status = 422, body = OpenAiError),
        (status = 429, body = OpenAiError), (status = 503, body = OpenAiError),
        (status = 504, body = OpenAiError),
    ),
    security((), ("api_key" = [])))]
pub async fn chat(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    if req.top_logprobs.is_some_and(|n| n != 0) {
        return Err(ApiError::validation(
            "`top_logprobs` must be 0: only the chosen tokens' log-probabilities are available",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::validation("`messages` must not be empty"));
    }
    let prompt = req
        .messages
        .iter()
        .map(|m| m.content.text())
        .collect::<Vec<_>>()
        .join("\n");
    let with_logprobs = req.logprobs.unwrap_or(false);
    let stream = req.stream.unwrap_or(false);
    check_penalties(req.frequency_penalty, req.presence_penalty)?;
    let with_usage = include_usage(stream, &req.stream_options);
    // Both are checked even though the newer name wins.
    if let (Some(_), Some(old)) = (req.max_completion_tokens, req.max_tokens) {
        let options = GenerateOptions {
            max_new_tokens: Some(old),
            ..Default::default()
        };
        validation::generate_params(&options, 0, &state.config.limits)
            .map_err(|e| Dialect::Chat.error(e))?;
    }
    if let Some(choices) = guided(req.guided_choice, req.structured_outputs)? {
        // Nothing is sampled, but what the request says must still be valid.
        let max = req.max_completion_tokens.or(req.max_tokens);
        let options = options(max, &sampling!(req, with_logprobs))?;
        validation::generate_params(&options, 0, &state.config.limits)
            .map_err(|e| Dialect::Chat.error(e))?;
        let c = choose(&state, req.model.clone(), prompt, choices, Dialect::Chat).await?;
        let logprobs = with_logprobs.then(|| {
            json!({"content": [{"token": c.text, "logprob": c.logprob,
                                "bytes": c.text.as_bytes(), "top_logprobs": []}]})
        });
        let object = if stream {
            "chat.completion.chunk"
        } else {
            "chat.completion"
        };
        let base = json!({"id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            "object": object, "created": now(), "model": req.model,
            "system_fingerprint": c.scored.digest});
        let shapes = ChoiceShapes {
            whole: json!({"index": 0, "message": {"role": "assistant", "content": c.text},
                          "logprobs": logprobs, "finish_reason": "stop"}),
            text: json!({"index": 0, "delta": {"role": "assistant", "content": c.text},
                         "logprobs": logprobs, "finish_reason": null}),
            end: json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}),
        };
        return Ok(choice_response(
            &c,
            base,
            stream.then_some(with_usage),
            shapes,
        ));
    }
    let max = req.max_completion_tokens.or(req.max_tokens);
    let sampling = sampling!(req, with_logprobs);
    let run = start(
        &state,
        req.model,
        prompt,
        max,
        &sampling,
        Route::ChatCompletions,
    )
    .await?;
    let digest = run.generation.digest.clone();
    let mut facts = run.facts();
    let base = json!({"id": run.id, "object": if stream { "chat.completion.chunk" } else { "chat.completion" },
                      "created": run.created, "model": run.model, "system_fingerprint": digest});
    if stream {
        let slot = StreamOutputs::default();
        facts.streamed = Some(slot.clone());
        let events = sse(run, base, with_usage, slot, |t, end| {
            let delta = match (t, end) {
                (Some(t), _) => json!({"role": "assistant", "content": t.text}),
                (None, _) => json!({}),
            };
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": end.map(finish)}])
        });
        return Ok(facts.on(with_digest(events.into_response(), &digest)));
    }
    let mut base = base;
    let (prompt_tokens, out) = finish_run(run).await?;
    let logprobs = with_logprobs.then(|| {
        json!({"content": out.tokens.iter().map(|t| json!({
            "token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes(), "top_logprobs": []
        })).collect::<Vec<_>>()})
    });
    base["choices"] = json!([{"index": 0,
        "message": {"role": "assistant", "content": out.generated_text},
        "logprobs": logprobs, "finish_reason": finish(out.finish_reason)}]);
    base["usage"] = json!(usage(prompt_tokens, out.tokens.len()));
    Ok(facts.on(with_digest(Json(base).into_response(), &digest)))
}

fn usage(prompt: usize, completion: usize) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
    }
}

/// Whether a streamed answer ends with a `usage` chunk (`stream_options.include_usage`). Without
/// `stream` the answer's body carries `usage` anyway, so the option asks for nothing more.
fn include_usage(stream: bool, options: &Option<StreamOptions>) -> bool {
    stream
        && options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
}

/// Server-sent chunks: one per token (`choices` built by `choices(token, finish)`), then a last
/// chunk with the finish reason, with `usage` a chunk of it (and no choices), then `data: [DONE]`.
fn sse(
    run: Run,
    base: Value,
    with_usage: bool,
    outputs: StreamOutputs,
    choices: impl Fn(Option<&TokenInfo>, Option<FinishReason>) -> Value + Send + Sync + 'static,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let usage_chunk = {
        let mut c = base.clone();
        c["choices"] = json!([]);
        c
    };
    let choices = Arc::new(choices);
    let chunk = move |t: Option<&TokenInfo>, end: Option<FinishReason>| {
        let mut c = base.clone();
        c["choices"] = choices(t, end);
        Event::default().data(c.to_string())
    };
    let Run {
        generation,
        deadline,
        request,
        route,
        dialect,
        ..
    } = run;
    let submitted = generation.submitted;
    let prompt_tokens = generation.prompt_ids.len();
    let stream = futures::stream::unfold((generation, false), move |(mut generation, done)| {
        let chunk = chunk.clone();
        let request = request.clone();
        let usage_chunk = usage_chunk.clone();
        let outputs = outputs.clone();
        async move {
            if done {
                return None;
            }
            let next = tokio::time::timeout_at(deadline.into(), generation.events.recv()).await;
            let events: Vec<Event> = match next {
                Err(_) => vec![error_event(&ApiError::timeout())],
                Ok(Some(GenerateEvent::Token(t))) => {
                    return Some((vec![chunk(Some(&t), None)], (generation, false)));
                }
                Ok(Some(GenerateEvent::End(out))) => {
                    record_timing(route, out.timing, &request, submitted);
                    if let Ok(mut slot) = outputs.lock() {
                        *slot = Some(json!({"text": out.generated_text,
                            "finish_reason": finish(out.finish_reason),
                            "usage": usage(prompt_tokens, out.tokens.len())}));
                    }
                    let mut v: Vec<Event> = out
                        .tokens
                        .last()
                        .map(|t| chunk(Some(t), None))
                        .into_iter()
                        .collect();
                    v.push(chunk(None, Some(out.finish_reason)));
                    if with_usage {
                        let mut c = usage_chunk;
                        c["usage"] = json!(usage(prompt_tokens, out.tokens.len()));
                        v.push(Event::default().data(c.to_string()));
                    }
                    v.push(Event::default().data("[DONE]"));
                    v
                }
                Ok(Some(GenerateEvent::Error(e))) => vec![error_event(&dialect.error(e))],
                Ok(None) => vec![error_event(&Error::EngineDown.into())],
            };
            Some((events, (generation, true)))
        }
    });
    Sse::new(
        stream
            .flat_map(futures::stream::iter)
            .map(Ok::<_, Infallible>),
    )
    .keep_alive(KeepAlive::default())
}
