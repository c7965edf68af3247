//! Request and response bodies of the REST API, in the formats existing clients already speak:
//! Hugging Face text-classification for `/v1/sentiment`, text-generation-inference for
//! `/v1/generate`. The OpenAPI schemas are derived from these types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use std::path::Path;

use super::HttpConfig;
use crate::calibration::Calibration;
use crate::engine::generate::FinishReason;
pub use crate::engine::prompt::TruncationDirection;
use crate::engine::sentiment::LabelSet;
use crate::engine::{EngineConfig, TokenInfo};
use crate::model::digest::FileDigest;
use crate::model::lora::MergeReport;
use crate::model::{LoadedModel, ModelSpec};
use crate::variants::{Listing, Origin};

/// JSON Schema's `integer` is any number without a fractional part, so `20.0` is as valid as
/// `20`; serde's integers accept only the latter. Used with `deserialize_with` on integer fields.
pub(super) fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 => {
            Ok(Some(f as i64))
        }
        _ => Err(D::Error::custom(format!(
            "expected an integer between {} and {}, got {n}",
            i64::MIN,
            i64::MAX
        ))),
    }
}

/// A text to classify or continue: at least one non-blank character.
#[derive(Debug, Clone, ToSchema)]
#[schema(
    min_length = 1,
    pattern = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if crate::engine::is_blank(&text) {
            return Err(serde::de::Error::custom(
                "a text must contain a non-blank character",
            ));
        }
        Ok(Self(text))
    }
}

/// A list of texts: at least one, at most the server's `max_client_batch_size` (see `/info`).
#[derive(Debug, Clone, ToSchema)]
#[schema(min_items = 1)]
pub struct Texts(pub Vec<Text>);

impl<'de> Deserialize<'de> for Texts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let texts = Vec::<Text>::deserialize(d)?;
        if texts.is_empty() {
            return Err(serde::de::Error::custom("the list of texts is empty"));
        }
        Ok(Self(texts))
    }
}

/// One text or a list of texts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Inputs {
    One(Text),
    Many(Texts),
}

/// `inputs`, read by hand rather than through `untagged` (used with `deserialize_with`) so the
/// error says what is wrong with the text(s).
pub(super) fn inputs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Inputs, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        v @ serde_json::Value::String(_) => Text::deserialize(v).map(Inputs::One),
        v @ serde_json::Value::Array(_) => Texts::deserialize(v).map(Inputs::Many),
        _ => {
            return Err(D::Error::custom(
                "expected a string or a non-empty list of strings",
            ));
        }
    }
    .map_err(D::Error::custom)
}

/// A stop sequence (at most the server's `max_stop_length` characters, see `/info`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_length = 1)]
pub struct StopSequence(pub String);

/// What a label's score is (the name Hugging Face clients send).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FunctionToApply {
    /// The probability of the label: the softmax of the label log-likelihoods over the label
    /// set (with the server's calibration temperature, for its own labels).
    #[default]
    Softmax,
    /// The label's log-likelihood under the model (sum of its tokens' log-probabilities),
    /// unnormalised.
    None,
}

/// What happens to an input longer than `max_input_tokens` with the prompt template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LongInput {
    /// Refused (422), unless `truncate` is set.
    #[default]
    Error,
    /// Scored in overlapping windows of the input (each with the whole template); the input's
    /// scores are the token-weighted mean of its windows' scores.
    Chunk,
    /// Scored sentence by sentence (Unicode sentence boundaries, finance abbreviations kept
    /// whole; a sentence longer than a window is windowed as `chunk`); the answer carries every
    /// sentence's span and scores, and the input's scores are the token-weighted mean of its
    /// sentences'.
    Sentences,
}

/// A target of entity-level sentiment: an entity name (every whole-word, case-sensitive
/// occurrence of it) or a character span `{"start", "end"}` (Unicode code points, end
/// exclusive).
#[derive(Debug, Clone, ToSchema)]
#[serde(untagged)]
#[schema(example = json!("Siemens"))]
pub enum Target {
    Name(String),
    Span(TargetSpan),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetSpan {
    pub start: usize,
    pub end: usize,
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(name) => Ok(Self::Name(name)),
            v @ serde_json::Value::Object(_) => TargetSpan::deserialize(v)
                .map(Self::Span)
                .map_err(D::Error::custom),
            _ => Err(D::Error::custom(
                "a target is a name (string) or a span {\"start\", \"end\"}",
            )),
        }
    }
}

impl From<Target> for crate::engine::targets::Target {
    fn from(t: Target) -> Self {
        match t {
            Target::Name(name) => Self::Name(name),
            Target::Span(s) => Self::Span {
                start: s.start,
                end: s.end,
            },
        }
    }
}

/// `targets`: for one input a list of targets, for a list of inputs a list of such lists.
#[derive(Debug, Clone, ToSchema)]
#[serde(untagged)]
pub enum Targets {
    One(Vec<Target>),
    Many(Vec<Vec<Target>>),
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(d)?;
        let nested = match &value {
            serde_json::Value::Array(items) => {
                items.first().is_some_and(serde_json::Value::is_array)
            }
            _ => return Err(D::Error::custom("expected a list of targets")),
        };
        if nested {
            Vec::<Vec<Target>>::deserialize(value).map(Self::Many)
        } else {
            Vec::<Target>::deserialize(value).map(Self::One)
        }
        .map_err(D::Error::custom)
    }
}

/// A label to score (at most the server's `max_label_length` characters, see `/info`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(
    min_length = 1,
    pattern = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)]
pub struct Label(pub String);

/// Labels of one request: at least two, distinct, at most the server's `max_candidate_labels`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_items = 2)]
pub struct Labels(pub Vec<Label>);

/// A prompt template: `{text}` exactly once, where the input goes.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(pattern = r"^(?:[^{]|\{(?!text\}))*\{text\}(?:[^{]|\{(?!text\}))*$")]
pub struct PromptTemplate(pub String);

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SentimentParameters {
    /// Keep only the `top_k` best labels per input.
    #[serde(default, deserialize_with = "integer")]
    #[schema(minimum = 1)]
    pub top_k: Option<i64>,
    pub function_to_apply: Option<FunctionToApply>,
    /// Score these labels instead of the server's (multi-token labels welcome).
    pub candidate_labels: Option<Labels>,
    /// Use this prompt template instead of the server's.
    pub prompt_template: Option<PromptTemplate>,
    pub long_input: Option<LongInput>,
    /// Also return each window's character span and scores.
    pub return_chunks: Option<bool>,
    /// The merged variant to score with (see `/info`); default: the default model.
    pub adapter_id: Option<String>,
    /// `batch` for a backfill: scored after interactive work (also the `x-finserve-priority`
    /// header).
    pub priority: Option<PriorityName>,
    /// Entity-level sentiment: score each input once per target (a name or a span) instead of
    /// as a whole; the answer is, per input, one entry per target in request order.
    pub targets: Option<Targets>,
    /// Also return, per input (or per target), each word's attribution to each label: the
    /// label's score with the word minus without it (occlusion; at most `max_explain_words`
    /// words).
    pub explain: Option<bool>,
}

/// A request's priority: `interactive` (the default) or `batch`, which fills batches only after
/// interactive work and is not counted in the queue gauges the autoscaler reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PriorityName {
    Interactive,
    Batch,
}

impl PriorityName {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

impl From<PriorityName> for crate::engine::Priority {
    fn from(p: PriorityName) -> Self {
        match p {
            PriorityName::Interactive => Self::Interactive,
            PriorityName::Batch => Self::Batch,
        }
    }
}

/// Unknown fields are refused (422) unless their value is null; null means "unset" everywhere.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"inputs": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn ."}))]
pub struct SentimentRequest {
    #[serde(deserialize_with = "inputs")]
    pub inputs: Inputs,
    pub parameters: Option<SentimentParameters>,
    /// Cut inputs longer than the server's `max_input_tokens` instead of refusing them (only the
    /// input is cut, never the prompt template).
    pub truncate: Option<bool>,
    /// Which end of the input `truncate` cuts (default: the server's `--truncation-direction`).
    pub truncation_direction: Option<TruncationDirection>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LabelScore {
    pub label: String,
    /// The label's probability over the label set, or its log-likelihood with
    /// `function_to_apply: none`.
    pub score: f64,
}

/// One window of a long input (`return_chunks`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkScores {
    /// Character span of the input that the window covers: `[start, end)`.
    pub start: usize,
    pub end: usize,
    /// Input tokens in the window (its weight in the input's scores).
    pub tokens: usize,
    pub scores: Vec<LabelScore>,
}

/// One sentence of an input (`long_input: sentences`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SentenceScores {
    /// Character span of the sentence: `[start, end)`.
    pub start: usize,
    pub end: usize,
    /// Input tokens of its windows (its weight in the input's scores).
    pub tokens: usize,
    pub scores: Vec<LabelScore>,
}

/// One word's attribution (`explain`): per label, the score with the word minus the score
/// without it (positive: the word raised the label), every label in the label set's order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WordAttribution {
    pub word: String,
    /// Character span of the word: `[start, end)`.
    pub start: usize,
    pub end: usize,
    pub attributions: Vec<LabelScore>,
}

/// An input's scores with its windows (`return_chunks`), sentences (`long_input: sentences`)
/// or word attributions (`explain`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetailedScores {
    pub scores: Vec<LabelScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkScores>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentences: Option<Vec<SentenceScores>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Vec<WordAttribution>>,
}

/// One target's scores (`targets`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TargetScores {
    /// The name, or the span's text.
    pub target: String,
    /// Character spans of its mentions: `[start, end)` each.
    pub spans: Vec<[usize; 2]>,
    pub scores: Vec<LabelScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Vec<WordAttribution>>,
}

/// One input's labels by descending score; with `return_chunks`, `long_input: sentences` or
/// `explain`, an object with the parts asked for; with `targets`, one entry per target.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum InputScores {
    Labels(Vec<LabelScore>),
    Detailed(DetailedScores),
    Targets(Vec<TargetScores>),
}

/// TGI's generation parameters. Those TGI has and finserve does not (`best_of`, `typical_p`,
/// `top_n_tokens`, `frequency_penalty`, `grammar`) are unknown fields: refused unless null;
/// `watermark` is accepted as `false` (TGI's client always sends it).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParameters {
    /// At most the server's `max_new_tokens` (see `/info`); default 20, or less when
    /// `max_total_tokens` leaves less room.
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "integer")]
    pub max_new_tokens: Option<i64>,
    /// Sample instead of greedy decoding (also implied by temperature, top_k or top_p).
    pub do_sample: Option<bool>,
    #[schema(exclusive_minimum = 0.0)]
    pub temperature: Option<f64>,
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "integer")]
    pub top_k: Option<i64>,
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    pub top_p: Option<f64>,
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f64>,
    /// Seed of the sampler; the same seed gives the same text.
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integer")]
    pub seed: Option<i64>,
    /// Stop when the generated text contains one of these (at most `max_stop_sequences`, each at
    /// most `max_stop_length` characters; see `/info`).
    pub stop: Option<Vec<StopSequence>>,
    /// Return `details` (finish reason, tokens with log-probabilities).
    pub details: Option<bool>,
    /// With `details`, also return the encoder input tokens as `prefill`.
    pub decoder_input_details: Option<bool>,
    /// Keep only the first `truncate` input tokens (at most `max_input_tokens`) instead of
    /// refusing a longer input.
    #[schema(minimum = 1)]
    #[serde(default, deserialize_with = "integer")]
    pub truncate: Option<i64>,
    /// Prefix `generated_text` with the input text.
    pub return_full_text: Option<bool>,
    /// The merged variant to generate with (see `/info`); default: the default model.
    pub adapter_id: Option<String>,
    /// `batch` for a backfill: its sequences join after interactive ones and never take the
    /// decode slots reserved for them (also the `x-finserve-priority` header).
    pub priority: Option<PriorityName>,
    /// Only `false`: watermarking is not available.
    pub watermark: Option<bool>,
}

/// Unknown fields are refused (422) unless their value is null; null means "unset" everywhere.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"inputs": "Profit rose 20 % .", "parameters": {"max_new_tokens": 5, "details": true}}))]
pub struct GenerateRequest {
    pub inputs: Text,
    pub parameters: Option<GenerateParameters>,
    /// Answer with server-sent events, one per token.
    pub stream: Option<bool>,
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
            logprob: t.logprob,
            special: t.special,
        }
    }
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

/// TEI's `/tokenize` request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"inputs": "Operating profit rose .", "add_special_tokens": true}))]
pub struct TokenizeRequest {
    #[serde(deserialize_with = "inputs")]
    pub inputs: Inputs,
    /// Add the special tokens the model sees (the final EOS); default true.
    pub add_special_tokens: Option<bool>,
    /// Place each input in the server's sentiment prompt template first (the tokens the
    /// sentiment route scores); offsets stay relative to the input, template tokens have none.
    pub prompt_template: Option<bool>,
}

/// One token of a tokenized input.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    /// The input text the token covers, or the token itself for special and template tokens.
    pub text: String,
    pub special: bool,
    /// Character span `[start, stop)` in the input; null for special and template tokens.
    pub start: Option<usize>,
    pub stop: Option<usize>,
}

/// Token ids, one sequence or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = "`ids` must be a list of token ids or a list of such lists"
)]
pub enum InputIds {
    One(Vec<TokenId>),
    Many(IdLists),
}

/// Several id sequences (at least one, so that `[]` reads as one empty sequence).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(min_items = 1)]
pub struct IdLists(pub Vec<Vec<TokenId>>);

/// A token id (below the tokenizer's vocabulary size, see `/info`).
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(minimum = 0)]
pub struct TokenId(pub u32);

impl<'de> Deserialize<'de> for TokenId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = integer(d)?.unwrap_or(-1);
        u32::try_from(n)
            .map(Self)
            .map_err(|_| serde::de::Error::custom(format!("{n} is not a token id")))
    }
}

/// TEI's `/decode` request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"ids": [313, 1], "skip_special_tokens": true}))]
pub struct DecodeRequest {
    pub ids: InputIds,
    /// Leave out special tokens (EOS, padding); default true.
    pub skip_special_tokens: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, `loading`, `engine_down` or `failing` (health); `ready` or `not_ready` (readiness).
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
    pub max_total_tokens: usize,
    pub max_stop_sequences: usize,
    pub max_stop_length: usize,
    pub max_failed_batches: usize,
    pub max_candidate_labels: usize,
    pub max_label_length: usize,
    pub chunk_overlap: usize,
    pub max_chunks_per_input: usize,
    pub max_targets_per_input: usize,
    pub max_explain_words: usize,
    pub max_sentences_per_input: usize,
    pub max_windows_per_request: usize,
    pub truncation_direction: TruncationDirection,
}

impl Limits {
    /// The limits of a server whose engine runs with `engine` and whose HTTP layer with `http`.
    pub fn new(engine: &EngineConfig, http: &HttpConfig) -> Self {
        let request = &engine.limits;
        Self {
            max_input_tokens: engine.max_input_tokens,
            max_new_tokens: request.max_new_tokens,
            max_batch_size: engine.max_batch_size,
            max_batch_tokens: engine.max_batch_tokens,
            max_batch_wait_ms: engine.max_batch_wait.as_millis() as u64,
            max_client_batch_size: request.max_client_batch_size,
            max_concurrent_requests: http.max_concurrent_requests,
            max_body_bytes: http.max_body_bytes,
            request_timeout_ms: http.request_timeout.as_millis() as u64,
            max_total_tokens: request.max_total_tokens,
            max_stop_sequences: request.max_stop_sequences,
            max_stop_length: request.max_stop_length,
            max_failed_batches: http.max_failed_batches,
            max_candidate_labels: request.max_candidate_labels,
            max_label_length: request.max_label_length,
            chunk_overlap: request.chunk_overlap,
            max_chunks_per_input: request.max_chunks_per_input,
            max_targets_per_input: request.max_targets_per_input,
            max_explain_words: request.max_explain_words,
            max_sentences_per_input: request.max_sentences_per_input,
            max_windows_per_request: request.max_windows_per_request,
            truncation_direction: http.default_truncation_direction,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CalibrationInfo {
    pub temperature: f64,
    /// The file's name (not its path: `/info` shows no paths of the server's disk).
    pub file: String,
}

impl CalibrationInfo {
    fn new(calibration: &Option<(std::path::PathBuf, Calibration)>) -> Option<Self> {
        calibration.as_ref().map(|(path, c)| Self {
            temperature: c.temperature,
            file: file_name(path),
        })
    }
}

/// The last component of `path` (a Hub id or a bare name is returned as it is).
fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// A Hub id as it is; a local path by its last component only.
fn public_model_id(model: &str) -> String {
    let path = Path::new(model);
    if path.exists() || path.is_absolute() {
        file_name(path)
    } else {
        model.to_string()
    }
}

/// `reports` as `/info` shows them: each adapter, and the base it was trained on, by a local
/// directory's name or a Hub id.
fn public_reports(reports: &[MergeReport]) -> Vec<MergeReport> {
    reports
        .iter()
        .map(|r| MergeReport {
            adapter: public_model_id(&r.adapter),
            base_model_name_or_path: r.base_model_name_or_path.as_deref().map(public_model_id),
            ..r.clone()
        })
        .collect()
}

/// A merged variant of the base, served next to the default model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VariantInfo {
    /// What `adapter_id` (and the OpenAI routes' `model`) selects it by.
    pub name: String,
    pub adapters: Vec<MergeReport>,
    /// Weight bytes no other served model shares (the layers its adapters changed).
    pub unshared_bytes: usize,
    pub calibration: Option<CalibrationInfo>,
    /// What identifies this variant's outputs (`sha256:HEX`), as in `x-finserve-model-digest`.
    pub digest: String,
    /// How it came to be served: `startup` (`--variant`), `file` (`--variants-file`) or `api`
    /// (`POST /v1/adapters`).
    pub origin: String,
}

impl VariantInfo {
    pub fn new(l: &Listing) -> Self {
        Self {
            name: l.name.clone(),
            adapters: public_reports(&l.reports),
            unshared_bytes: l.unshared_bytes,
            calibration: CalibrationInfo::new(&l.calibration),
            digest: l.digest.clone(),
            origin: l.origin.as_str().into(),
        }
    }
}

/// `POST /v1/adapters`: a variant to merge from adapters under `--adapter-root`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "desk-b", "adapters": [{"path": "desk-b/v3", "weight": 1.0}]}))]
pub struct AdapterLoadRequest {
    /// What `adapter_id` (and the OpenAI routes' `model`) will select it by: 1-64 letters,
    /// digits, `.`, `_`, `-` or `/`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._/-]+$")]
    pub name: String,
    /// Merged in order into the base.
    #[schema(min_items = 1)]
    pub adapters: Vec<AdapterPath>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterPath {
    /// A directory relative to `--adapter-root` (PEFT format), or a Hub id.
    #[schema(min_length = 1)]
    pub path: String,
    /// Scales the adapter's update (default 1).
    pub weight: Option<f64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoResponse {
    pub model_id: String,
    pub model_revision: Option<String>,
    /// What identifies the default model's outputs (`sha256:HEX` over its files and settings,
    /// in the order README states), as in every response's `x-finserve-model-digest`.
    pub digest: String,
    /// The base's files with their SHA-256 (adapters' are in their merge reports).
    pub files: Vec<FileDigest>,
    pub model_type: String,
    pub adapters: Vec<MergeReport>,
    pub dtype: String,
    /// Weight quantization of the linear layers: `none` or `q8`.
    pub quantize: String,
    pub device: String,
    pub labels: Vec<String>,
    pub prompt_template: String,
    /// Token ids are `0..vocab_size` (the tokenizer's).
    pub vocab_size: usize,
    /// The softmax temperature fitted by `finserve eval --calibrate` for the server's labels, if
    /// a calibration file was loaded.
    pub calibration: Option<CalibrationInfo>,
    /// The default model's name (the OpenAI routes' `model`).
    pub name: String,
    /// Weight bytes of the default model that no variant shares.
    pub unshared_bytes: usize,
    /// Further merged variants of the same base, chosen per request with `adapter_id`.
    pub variants: Vec<VariantInfo>,
    /// Weight bytes of every served model together, shared tensors counted once.
    pub weight_bytes: usize,
    pub limits: Limits,
    pub load_seconds: f64,
    pub version: String,
}

/// The default model's labels and calibration, then each variant's.
pub type ServedLabels<'a> = [(&'a LabelSet, &'a Option<(std::path::PathBuf, Calibration)>)];

impl InfoResponse {
    /// What `/info` says of `loaded` (as `spec` asked for it), served as `name` on `device` with
    /// `labels` and `digests` (one entry per served model), `prompt_template` and `limits`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        spec: &ModelSpec,
        loaded: &LoadedModel,
        device: &str,
        labels: &ServedLabels<'_>,
        digests: &[String],
        prompt_template: &str,
        limits: Limits,
    ) -> Self {
        let calibration = |i: usize| labels.get(i).and_then(|(_, c)| CalibrationInfo::new(c));
        let digest = |i: usize| digests.get(i).cloned().unwrap_or_default();
        Self {
            model_id: public_model_id(&spec.model),
            model_revision: spec.revision.clone(),
            digest: digest(0),
            files: loaded.files.clone(),
            model_type: loaded.model.config().model_type().as_str().to_string(),
            adapters: public_reports(&loaded.reports),
            dtype: spec.dtype.as_str().to_string(),
            quantize: spec.quantize.as_str().to_string(),
            device: device.to_string(),
            labels: labels
                .first()
                .map(|(l, _)| l.names.clone())
                .unwrap_or_default(),
            prompt_template: prompt_template.to_string(),
            vocab_size: loaded.tokenizer.get_vocab_size(true),
            calibration: calibration(0),
            name,
            unshared_bytes: loaded.unshared_bytes,
            variants: loaded
                .variants
                .iter()
                .enumerate()
                .map(|(i, v)| VariantInfo {
                    name: v.name.clone(),
                    adapters: public_reports(&v.reports),
                    unshared_bytes: v.unshared_bytes,
                    calibration: calibration(i + 1),
                    digest: digest(i + 1),
                    origin: Origin::Startup.as_str().into(),
                })
                .collect(),
            weight_bytes: loaded.weight_bytes,
            limits,
            load_seconds: loaded.load_seconds,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;

    use crate::engine::is_blank;

    /// The document's pattern for a text and the server's blank check agree on every character.
    #[test]
    fn text_pattern_matches_exactly_the_non_blank_characters() {
        let schema = serde_json::to_value(super::Text::schema()).unwrap();
        let pattern = schema["pattern"].as_str().unwrap();
        let re = regex::Regex::new(pattern).unwrap();
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            let s = c.to_string();
            assert_eq!(re.is_match(&s), !is_blank(&s), "U+{:04X}", c as u32);
        }
    }
}
