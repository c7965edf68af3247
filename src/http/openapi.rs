//! The OpenAPI document: paths and schemas come from the utoipa annotations on the handlers and
//! types; this module adds the security schemes and the limits of the running server, so the
//! served `/openapi.json` states exactly what this server accepts (`finserve openapi` prints it
//! for the default limits, which is what `openapi/openapi.json` holds).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::common::model_names;
use super::error::ApiError;
use super::{AppState, admin, compat, openai, routes};
use crate::engine::{Engine, RequestLimits};

/// The OpenAI routes' name for the bundled demo model.
pub const DEMO_MODEL_NAME: &str = "finserve-demo";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "finserve",
        description = "Financial-sentiment inference for mt0/mT5 models with merged LoRA adapters."
    ),
    paths(
        routes::sentiment,
        routes::generate,
        routes::tokenize,
        routes::decode,
        openai::models,
        openai::completions,
        openai::chat,
        routes::playground,
        routes::health,
        routes::ready,
        routes::info,
        routes::metrics,
        admin::list,
        admin::load,
        admin::unload,
        compat::predict,
        compat::classify,
        compat::score_pairs,
        compat::ping,
        compat::invocations,
        compat::tgi_generate,
        compat::tgi_generate_stream,
        compat::tgi_root
    ),
    modifiers(&Security),
    tags(
        (name = "inference", description = "Model inference"),
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "operations", description = "Health, readiness, info and metrics"),
        (name = "admin", description = "Variants at runtime (with --admin-api-key)"),
        (name = "compat", description = "The routes of TEI, vLLM, TGI and SageMaker clients")
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components.add_security_scheme(
            "admin_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Request bodies whose unknown members are refused unless null (see `http::extract`).
const REQUEST_OBJECTS: [&str; 16] = [
    "PredictRequest",
    "ClassifyRequest",
    "ScoreRequest",
    "TextPart",
    "StructuredOutputs",
    "AdapterLoadRequest",
    "AdapterPath",
    "SentimentRequest",
    "SentimentParameters",
    "GenerateRequest",
    "GenerateParameters",
    "TokenizeRequest",
    "DecodeRequest",
    "CompletionRequest",
    "ChatRequest",
    "Message",
];

/// Which optional routes a server has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Optional {
    /// `/metrics` on the API listener.
    pub metrics: bool,
    /// The admin routes (`--admin-api-key`).
    pub admin: bool,
    /// SageMaker's `/ping` and `/invocations` (`--sagemaker`).
    pub sagemaker: bool,
}

/// The document of a server with `limits` serving `models` (the OpenAI routes' `model`
/// values) with the `optional` routes; `vocab_size` (known once the model is loaded) bounds
/// token ids.
pub fn document(
    limits: &RequestLimits,
    models: &[String],
    optional: Optional,
    vocab_size: Option<usize>,
) -> Result<Value, String> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    if !optional.metrics {
        doc.paths.paths.remove("/metrics");
    }
    if !optional.admin {
        doc.paths
            .paths
            .retain(|path, _| !path.starts_with("/v1/adapters"));
    }
    if !optional.sagemaker {
        doc.paths
            .paths
            .retain(|path, _| path != "/ping" && path != "/invocations");
    }
    let mut value = serde_json::to_value(&doc).map_err(|e| e.to_string())?;
    let schemas = "/components/schemas";
    for name in REQUEST_OBJECTS {
        set(
            &mut value,
            &format!("{schemas}/{name}"),
            "additionalProperties",
            json!({"type": "null"}),
        )?;
    }
    let patches = [
        (
            "GenerateParameters/properties/max_new_tokens",
            "maximum",
            limits.max_new_tokens,
        ),
        (
            "GenerateParameters/properties/stop",
            "maxItems",
            limits.max_stop_sequences,
        ),
        ("StopSequence", "maxLength", limits.max_stop_length),
        ("StopList", "maxItems", limits.max_stop_sequences),
        ("Texts", "maxItems", limits.max_client_batch_size),
        ("Labels", "maxItems", limits.max_candidate_labels),
        ("Label", "maxLength", limits.max_label_length),
        (
            "CompletionRequest/properties/max_tokens",
            "maximum",
            limits.max_new_tokens,
        ),
        (
            "ChatRequest/properties/max_tokens",
            "maximum",
            limits.max_new_tokens,
        ),
        (
            "ChatRequest/properties/max_completion_tokens",
            "maximum",
            limits.max_new_tokens,
        ),
    ];
    for (path, key, limit) in patches {
        set(&mut value, &format!("{schemas}/{path}"), key, json!(limit))?;
    }
    set(
        &mut value,
        &format!("{schemas}/Labels"),
        "uniqueItems",
        json!(true),
    )?;
    // Parameters other servers have and finserve does not, accepted at their no-op value only.
    let no_ops = [
        ("GenerateParameters/properties/watermark", json!([false])),
        ("CompletionRequest/properties/frequency_penalty", json!([0])),
        ("CompletionRequest/properties/presence_penalty", json!([0])),
        ("ChatRequest/properties/frequency_penalty", json!([0])),
        ("ChatRequest/properties/presence_penalty", json!([0])),
    ];
    for (path, only) in no_ops {
        set(&mut value, &format!("{schemas}/{path}"), "enum", only)?;
    }
    for request in ["CompletionRequest", "ChatRequest"] {
        let path = format!("{schemas}/{request}/properties/model");
        set(&mut value, &path, "enum", json!(models))?;
    }
    // null means unset here as everywhere, so it stays a valid `adapter_id`.
    let adapter_ids: Vec<Value> = models
        .iter()
        .map(|m| json!(m))
        .chain([Value::Null])
        .collect();
    for params in ["SentimentParameters", "GenerateParameters"] {
        let path = format!("{schemas}/{params}/properties/adapter_id");
        set(&mut value, &path, "enum", json!(adapter_ids))?;
    }
    if let Some(vocab) = vocab_size {
        let max = json!(vocab.saturating_sub(1));
        set(&mut value, &format!("{schemas}/TokenId"), "maximum", max)?;
    }
    set(
        &mut value,
        &format!("{schemas}/Choices"),
        "uniqueItems",
        json!(true),
    )?;
    // `guided_choice` and `structured_outputs` are one request spelt two ways: not both.
    for request in ["CompletionRequest", "ChatRequest"] {
        set(
            &mut value,
            &format!("{schemas}/{request}"),
            "if",
            json!({"required": ["structured_outputs"],
                   "properties": {"structured_outputs": {"type": "object"}}}),
        )?;
        set(
            &mut value,
            &format!("{schemas}/{request}"),
            "then",
            json!({"properties": {"guided_choice": {"type": "null"}}}),
        )?;
    }
    set(
        &mut value,
        &format!("{schemas}/Choices"),
        "maxItems",
        json!(limits.max_candidate_labels),
    )?;
    set(
        &mut value,
        &format!("{schemas}/ScoreLabelList"),
        "maxItems",
        json!(limits.max_candidate_labels),
    )?;
    // An event stream's schema describes one event, whose `data` carries the JSON; utoipa has no
    // attribute for `contentSchema`, so the shape is stated here.
    let event = json!({
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "data": {
                "type": "string",
                "description": "One StreamResponse per token; an ErrorResponse if the generation fails",
                "contentMediaType": "application/json",
                "contentSchema": {"oneOf": [
                    {"$ref": "#/components/schemas/StreamResponse"},
                    {"$ref": "#/components/schemas/ErrorResponse"}
                ]}
            }
        }
    });
    for path in ["~1v1~1generate", "~1generate_stream", "~1"] {
        let pointer = format!("/paths/{path}/post/responses/200/content/text~1event-stream");
        set(&mut value, &pointer, "schema", event.clone())?;
    }
    Ok(value)
}

/// Sets `key` on the schema object at `pointer`, which must exist: a change in how the schemas
/// are generated must fail loudly, not leave a limit out of the document.
fn set(doc: &mut Value, pointer: &str, key: &str, v: Value) -> Result<(), String> {
    doc.pointer_mut(pointer)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("OpenAPI document has no schema object at {pointer}"))?
        .insert(key.to_string(), v);
    Ok(())
}

/// The document for the default limits and the demo model as pretty JSON: what
/// `openapi/openapi.json` holds.
pub fn default_json() -> Result<String, String> {
    let models = [DEMO_MODEL_NAME.to_string()];
    let optional = Optional {
        metrics: true,
        admin: false,
        sagemaker: false,
    };
    serde_json::to_string_pretty(&document(
        &RequestLimits::default(),
        &models,
        optional,
        None,
    )?)
    .map_err(|e| e.to_string())
}

/// The OpenAPI document of this server: its limits as schema bounds (and, once the model is
/// loaded, its vocabulary size as the bound of token ids).
pub async fn openapi(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let config = &state.config;
    let vocab = state.engine.get().map(Engine::vocab_size);
    let models = model_names(&state);
    document(&config.limits, &models, config.optional_routes(), vocab)
        .map(Json)
        .map_err(|e| ApiError::internal(format!("cannot build the OpenAPI document: {e}")))
}
