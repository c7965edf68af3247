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
use super::{AppState, openai, routes};
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
        routes::metrics
    ),
    modifiers(&Security),
    tags(
        (name = "inference", description = "Model inference"),
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "operations", description = "Health, readiness, info and metrics")
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
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Request bodies whose unknown members are refused unless null (see `http::extract`).
const REQUEST_OBJECTS: [&str; 9] = [
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

/// The document of a server with `limits` serving `models` (the OpenAI routes' `model`
/// values); `metrics` says whether `/metrics` is on this listener, `vocab_size` (known once the
/// model is loaded) bounds token ids.
pub fn document(
    limits: &RequestLimits,
    models: &[String],
    metrics: bool,
    vocab_size: Option<usize>,
) -> Result<Value, String> {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    if !metrics {
        doc.paths.paths.remove("/metrics");
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
    // An event stream's schema describes one event, whose `data` carries the JSON; utoipa has no
    // attribute for `contentSchema`, so the shape is stated here.
    set(
        &mut value,
        "/paths/~1v1~1generate/post/responses/200/content/text~1event-stream",
        "schema",
        json!({
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
        }),
    )?;
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
    serde_json::to_string_pretty(&document(&RequestLimits::default(), &models, true, None)?)
        .map_err(|e| e.to_string())
}

/// The OpenAPI document of this server: its limits as schema bounds (and, once the model is
/// loaded, its vocabulary size as the bound of token ids).
pub async fn openapi(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let config = &state.config;
    let vocab = state.engine.get().map(Engine::vocab_size);
    let models = model_names(&state);
    document(&config.limits, &models, config.metrics_on_api, vocab)
        .map(Json)
        .map_err(|e| ApiError::internal(format!("cannot build the OpenAPI document: {e}")))
}
