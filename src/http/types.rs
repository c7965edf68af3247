//! Request and response bodies of the REST API, in the formats existing clients already speak:
//! Hugging Face text-classification for `/v1/sentiment`, text-generation-inference for
//! `/v1/generate`. The OpenAPI schemas are derived from these types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::TokenInfo;
use crate::lora::MergeReport;

/// One string or a list of strings.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Inputs {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SentimentParameters {
    /// Keep only the `top_k` best labels per input.
    #[schema(minimum = 1)]
    pub top_k: Option<i64>,
    /// Accepted for Hugging Face client compatibility; only `softmax` (what the scores are) is allowed.
    pub function_to_apply: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"inputs": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."}))]
pub struct SentimentRequest {
    pub inputs: Inputs,
    #[serde(default)]
    pub parameters: Option<SentimentParameters>,
    /// Cut inputs longer than the server's `max_input_tokens` instead of refusing them.
    #[serde(default)]
    pub truncate: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LabelScore {
    pub label: String,
    /// Probability of the label, renormalised over the label set.
    pub score: f64,
}

/// One entry per input, in input order; each lists the labels by descending score.
pub type SentimentResponse = Vec<Vec<LabelScore>>;

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct GenerateParameters {
    #[schema(minimum = 1)]
    pub max_new_tokens: Option<u32>,
    pub do_sample: Option<bool>,
    #[schema(exclusive_minimum = 0.0)]
    pub temperature: Option<f64>,
    #[schema(minimum = 1)]
    pub top_k: Option<i64>,
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    pub top_p: Option<f64>,
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    pub truncate: Option<u64>,
    /// TGI parameters finserve does not implement; accepted only when unset.
    #[serde(default)]
    #[schema(ignore)]
    pub best_of: Option<u32>,
    #[serde(default)]
    #[schema(ignore)]
    pub typical_p: Option<f64>,
    #[serde(default)]
    #[schema(ignore)]
    pub watermark: Option<bool>,
    #[serde(default)]
    #[schema(ignore)]
    pub top_n_tokens: Option<u32>,
    #[serde(default)]
    #[schema(ignore)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    #[schema(ignore)]
    pub return_full_text: Option<bool>,
    #[serde(default)]
    #[schema(ignore)]
    pub grammar: Option<serde_json::Value>,
    #[serde(default)]
    #[schema(ignore)]
    pub adapter_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"inputs": "Profit rose 20 % .", "parameters": {"max_new_tokens": 5, "details": true}}))]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Option<GenerateParameters>,
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    /// Natural log-probability under the model; null for input tokens.
    pub logprob: Option<f32>,
    pub special: bool,
}

impl From<&TokenInfo> for Token {
    fn from(t: &TokenInfo) -> Self {
        Self {
            id: t.id,
            text: t.text.clone(),
            logprob: Some(t.logprob),
            special: t.special,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    /// Encoder input tokens when `decoder_input_details` is set, else empty.
    pub prefill: Vec<Token>,
    pub tokens: Vec<Token>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
}

/// One server-sent event of a streaming generation.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    /// Set on the last event only.
    pub generated_text: Option<String>,
    /// Set on the last event only.
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, `loading` or `engine_down`.
    pub status: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_new_tokens: usize,
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_batch_wait_ms: u64,
    pub max_client_batch_size: usize,
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoResponse {
    pub model_id: String,
    pub model_revision: Option<String>,
    pub model_dir: String,
    pub model_type: String,
    pub adapters: Vec<MergeReport>,
    pub dtype: String,
    /// Weight quantization of the linear layers: `none` or `q8`.
    pub quantize: String,
    pub device: String,
    pub labels: Vec<String>,
    pub prompt_template: String,
    pub limits: Limits,
    pub load_seconds: f64,
    pub version: String,
}
