//! Command-line interface: `serve` (the default), `merge`, `eval` and `openapi`. Every flag can
//! also be set through a `FINSERVE_*` environment variable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::audit::{AuditConfig, Sink};
use crate::engine::prompt::{Template, TruncationDirection};
use crate::engine::sentiment::LabelSet;
use crate::engine::targets::TargetTemplate;
use crate::engine::validation::GenerateOptions;
use crate::engine::{EngineConfig, RequestLimits};
use crate::http::{ApiKeys, HttpConfig};
use crate::hub::HubConfig;
use crate::model::lora::AdapterSpec;
use crate::model::{self, ModelSpec};
use crate::served::{ModelJob, beside_adapter};
use crate::server::{RuntimeJob, ServeJob};
use crate::variants::{Eviction, RuntimeVariants};

/// A count flag that must be at least `MIN`: refused at parse time, naming the flag, never
/// raised silently.
fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|e| format!("`{s}` is not a whole number: {e}"))?;
    if n < MIN {
        return Err(format!("must be at least {MIN} (got {n})"));
    }
    Ok(n)
}

/// A duration flag in milliseconds: at least 1, at most a week (deadlines are computed from it).
fn millis(s: &str) -> Result<u64, String> {
    const WEEK: usize = 7 * 24 * 3600 * 1000;
    match at_least::<1>(s)? {
        n if n > WEEK => Err(format!("must be at most {WEEK} (a week; got {n})")),
        n => Ok(n as u64),
    }
}

/// The default `--backfill-batch-size`: the largest that keeps interactive p99 within 1.5x of idle
/// beside a saturating backfill (`benches/priority.py`, README "Priority").
const DEFAULT_BACKFILL_BATCH_SIZE: usize = 2;

/// A secret given as a flag: parsed like a string, never shown by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "finserve",
    version,
    about = "Serve mt0/mT5 financial-sentiment models with merged LoRA adapters",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand, finserve serves with these options.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "FINSERVE_JSON_LOGS", global = true)]
    pub json_logs: bool,
    /// Export trace spans to this OpenTelemetry collector (OTLP/HTTP protobuf, e.g.
    /// http://otel-collector:4318). Off by default.
    #[arg(long, env = "FINSERVE_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// PEM file of CA certificates an `https://` --otlp-endpoint may be signed by, besides the
    /// system's (e.g. a private CA).
    #[arg(
        long,
        env = "FINSERVE_OTLP_CA_FILE",
        global = true,
        requires = "otlp_endpoint"
    )]
    pub otlp_ca_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the REST API (what `finserve` with no subcommand runs).
    Serve(Box<ServeArgs>),
    /// Merge adapters into the base model and write it in Hugging Face format.
    Merge(MergeArgs),
    /// Score a labelled CSV file and print accuracy, macro-F1 and the confusion matrix.
    Eval(EvalArgs),
    /// Score a file of texts (CSV or JSON Lines) into JSON Lines, resumable and shardable.
    Predict(PredictArgs),
    /// Fine-tune a LoRA adapter on a labelled CSV file and write it in PEFT's format.
    Train(TrainArgs),
    /// Print the OpenAPI document.
    Openapi,
}

/// Which base checkpoint to load and on which device: shared by the model options of
/// `serve`/`eval`/`merge` ([`ModelArgs`]) and by `train`.
#[derive(Debug, Clone, Args)]
pub struct BaseArgs {
    /// Base model: a local directory or a Hugging Face Hub id (default: the bundled demo model).
    #[arg(long, env = "FINSERVE_MODEL")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) of --model.
    #[arg(long, env = "FINSERVE_REVISION")]
    pub revision: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "FINSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// What a sentiment input is wrapped in and which texts answer it: `train` and the serving model
/// options read the same flags, so an adapter is served as it was trained.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// Sentiment labels, comma-separated: the texts the model generates (scored when serving,
    /// learned when training).
    #[arg(
        long,
        env = "FINSERVE_LABELS",
        value_delimiter = ',',
        default_value = "negative,neutral,positive"
    )]
    pub labels: Vec<String>,
    /// Prompt template for sentiment; `{text}` (exactly once) is replaced by the input. Serve
    /// with the template the adapter was trained with.
    #[arg(long, env = "FINSERVE_PROMPT_TEMPLATE", default_value = "{text}")]
    pub prompt_template: String,
}

impl PromptArgs {
    /// `--labels` tokenized by `tokenizer`; two labels with the same tokens are refused.
    fn label_set(&self, tokenizer: &tokenizers::Tokenizer) -> anyhow::Result<LabelSet> {
        let labels = LabelSet::new(&self.labels, tokenizer)?;
        labels.check_distinct().context("--labels")?;
        Ok(labels)
    }

    fn template(&self) -> anyhow::Result<Template> {
        Template::new(&self.prompt_template).context("--prompt-template")
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub base: BaseArgs,
    /// LoRA adapter directory or Hub id, optionally `:WEIGHT`; repeat (or comma-separate) to
    /// merge several in order. Default: the demo adapter when --model is not given.
    #[arg(long = "adapter", env = "FINSERVE_ADAPTER", value_delimiter = ',')]
    pub adapters: Vec<AdapterSpec>,
    /// Merge no adapter at all (serve the base model as is).
    #[arg(long, env = "FINSERVE_NO_ADAPTER")]
    pub no_adapter: bool,
    /// Serving dtype: f32, or bf16 (on a GPU; on a CPU with AVX512-BF16, the linear layers'
    /// weights are bf16 and everything else stays f32).
    #[arg(long, env = "FINSERVE_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Quantize the linear layers and lm_head after the merge: `none`, or `q8` (int8 blocks, CPU).
    #[arg(long, env = "FINSERVE_QUANTIZE", default_value = "none")]
    pub quantize: String,
    /// Keep no int8 copy of an f32 `lm_head` for greedy decoding. By default, on CPUs with
    /// AVX2, greedy steps whose sequences ask for no log-probabilities screen the vocabulary with
    /// that copy (a quarter of the bytes to read; steps of any size with AVX-512 VNNI or AMX,
    /// else of up to 8 sequences) and compute in f32 only the tokens it cannot rule out: the
    /// same tokens, faster, for about a quarter of `lm_head`'s size in memory (140 MB at
    /// mt0-small's vocabulary and width).
    #[arg(long, env = "FINSERVE_NO_GREEDY_SCREEN")]
    pub no_greedy_screen: bool,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Calibration file (from `finserve eval --calibrate`) applied to the sentiment scores.
    /// Default: `calibration.json` in the last adapter's directory, if there is one.
    #[arg(long, env = "FINSERVE_CALIBRATION")]
    pub calibration: Option<PathBuf>,
    /// How the default model is shown a target (`parameters.targets`): a `target_template.json`
    /// as `finserve train` writes it. Default: the one in the last adapter's directory, if any.
    #[arg(long, env = "FINSERVE_TARGET_TEMPLATE")]
    pub target_template: Option<PathBuf>,
    /// Longest input in tokens (EOS included).
    #[arg(long, env = "FINSERVE_MAX_INPUT_TOKENS", value_parser = at_least::<2>, default_value_t = EngineConfig::default().max_input_tokens)]
    pub max_input_tokens: usize,
    /// Most inputs per engine batch.
    #[arg(long, env = "FINSERVE_MAX_BATCH_SIZE", value_parser = at_least::<1>, default_value_t = EngineConfig::default().max_batch_size)]
    pub max_batch_size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "FINSERVE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "FINSERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// The model's name in the OpenAI routes (`model` field, `/v1/models`); default: --model, or
    /// `finserve-demo` for the bundled demo.
    #[arg(long, env = "FINSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// A further merged variant of the base, `NAME=ADAPTER[:WEIGHT][+ADAPTER[:WEIGHT]...]`
    /// (`NAME=` serves the base itself); requests pick it with `adapter_id` (or `model` on the
    /// OpenAI routes). Repeat, or comma-separate in the env var. Layers its adapters leave alone
    /// are shared with the default model, and a variant's calibration is `calibration.json`
    /// beside its last adapter.
    #[arg(long = "variant", env = "FINSERVE_VARIANTS", value_delimiter = ',')]
    pub variants: Vec<model::VariantSpec>,
    /// Serve /metrics on this port only (not on --port), so it can stay internal while the API
    /// is public.
    #[arg(long, env = "FINSERVE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Most padded tokens (longest input x batch size) per engine batch.
    #[arg(long, env = "FINSERVE_MAX_BATCH_TOKENS", value_parser = at_least::<1>, default_value_t = EngineConfig::default().max_batch_tokens)]
    pub max_batch_tokens: usize,
    /// Decode slots of each variant that batch-priority generations (`priority: batch`, a
    /// backfill) may not take, kept for interactive ones (default: a quarter of
    /// --max-batch-size).
    #[arg(long, env = "FINSERVE_INTERACTIVE_SLOTS")]
    pub interactive_slots: Option<usize>,
    /// Most inputs of a sentiment batch of batch-priority work (default: 2, or --max-batch-size if
    /// smaller): an interactive request that arrives while one runs waits for it, so smaller keeps
    /// interactive latency lower and a backfill slower.
    #[arg(long, env = "FINSERVE_BACKFILL_BATCH_SIZE", value_parser = at_least::<1>)]
    pub backfill_batch_size: Option<usize>,
    /// How long the engine may wait for more sentiment requests to fill a batch.
    #[arg(long, env = "FINSERVE_MAX_BATCH_WAIT_MS", default_value_t = 0)]
    pub max_batch_wait_ms: u64,
    /// Largest `max_new_tokens` a client may ask for.
    #[arg(long, env = "FINSERVE_MAX_NEW_TOKENS", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Most input tokens plus `max_new_tokens` of one generation (default: --max-input-tokens +
    /// --max-new-tokens).
    #[arg(long, env = "FINSERVE_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,
    /// Most stop sequences per generate request.
    #[arg(long, env = "FINSERVE_MAX_STOP_SEQUENCES", default_value_t = RequestLimits::default().max_stop_sequences)]
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in characters.
    #[arg(long, env = "FINSERVE_MAX_STOP_LENGTH", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_stop_length)]
    pub max_stop_length: usize,
    /// Most `candidate_labels` of one /v1/sentiment request.
    #[arg(long, env = "FINSERVE_MAX_CANDIDATE_LABELS", value_parser = at_least::<2>, default_value_t = RequestLimits::default().max_candidate_labels)]
    pub max_candidate_labels: usize,
    /// Longest candidate label, in characters.
    #[arg(long, env = "FINSERVE_MAX_LABEL_LENGTH", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_label_length)]
    pub max_label_length: usize,
    /// Input tokens shared by consecutive windows of a long input (`long_input: chunk`).
    #[arg(long, env = "FINSERVE_CHUNK_OVERLAP", default_value_t = RequestLimits::default().chunk_overlap)]
    pub chunk_overlap: usize,
    /// Most windows one input may need with `long_input: chunk`; longer inputs get 422.
    #[arg(long, env = "FINSERVE_MAX_CHUNKS_PER_INPUT", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_chunks_per_input)]
    pub max_chunks_per_input: usize,
    /// Most `targets` of one input (entity-level sentiment); more get 422.
    #[arg(long, env = "FINSERVE_MAX_TARGETS_PER_INPUT", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_targets_per_input)]
    pub max_targets_per_input: usize,
    /// Most words of one input that `explain` occludes (one scored text each, per target);
    /// longer inputs get 422.
    #[arg(long, env = "FINSERVE_MAX_EXPLAIN_WORDS", value_parser = at_least::<2>, default_value_t = RequestLimits::default().max_explain_words)]
    pub max_explain_words: usize,
    /// Most sentences of one input with `long_input: sentences`; more get 422.
    #[arg(long, env = "FINSERVE_MAX_SENTENCES_PER_INPUT", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_sentences_per_input)]
    pub max_sentences_per_input: usize,
    /// Most windows one /v1/sentiment request may need over all its inputs, targets, sentences,
    /// chunks and explained words (each is scored like one input); more get 422.
    #[arg(long, env = "FINSERVE_MAX_WINDOWS_PER_REQUEST", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_windows_per_request)]
    pub max_windows_per_request: usize,
    /// Which end `truncate` cuts when a request does not say: right (keep the start) or left.
    #[arg(long, env = "FINSERVE_TRUNCATION_DIRECTION", default_value = "right")]
    pub truncation_direction: TruncationDirection,
    /// Most inputs in one /v1/sentiment request.
    #[arg(long, env = "FINSERVE_MAX_CLIENT_BATCH_SIZE", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_client_batch_size)]
    pub max_client_batch_size: usize,
    /// Most requests handled at once; more get 429.
    #[arg(long, env = "FINSERVE_MAX_CONCURRENT_REQUESTS", value_parser = at_least::<1>, default_value_t = HttpConfig::default().max_concurrent_requests)]
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes; larger get 413.
    #[arg(long, env = "FINSERVE_MAX_BODY_BYTES", value_parser = at_least::<1>, default_value_t = HttpConfig::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Per-request time limit in milliseconds; slower requests get 504.
    #[arg(long, env = "FINSERVE_REQUEST_TIMEOUT_MS", value_parser = millis, default_value_t = HttpConfig::default().request_timeout.as_millis() as u64)]
    pub request_timeout_ms: u64,
    /// After this many failed engine batches in a row, /health answers 503 (until one succeeds),
    /// so an orchestrator restarts the server.
    #[arg(long, env = "FINSERVE_MAX_FAILED_BATCHES", value_parser = at_least::<1>, default_value_t = HttpConfig::default().max_failed_batches)]
    pub max_failed_batches: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "FINSERVE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Require this key on /v1/*, /tokenize, /decode and /info (`Authorization: Bearer` or
    /// `x-api-key`); repeat for several valid keys. Prefer --api-key-file: a key given here shows
    /// in the process list and rotates only with a restart.
    #[arg(
        long,
        env = "FINSERVE_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Vec<Secret>,
    /// Read the API keys from this file, one per line (blank lines and `#` comments skipped),
    /// e.g. a Kubernetes Secret mounted as a directory (not with subPath, which never updates).
    /// Re-read when it changes and on SIGHUP: keys rotate without a restart.
    #[arg(long, env = "FINSERVE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// How often --api-key-file is checked for changes, in milliseconds.
    #[arg(long, env = "FINSERVE_API_KEY_FILE_POLL_MS", value_parser = millis, default_value_t = 2000)]
    pub api_key_file_poll_ms: u64,
    /// Longest time a client may take to send a request's headers, or its body once the headers
    /// are in, in milliseconds; slower connections are closed (408 for a stalled body). A request
    /// takes a --max-concurrent-requests slot only once its body has arrived.
    #[arg(long, env = "FINSERVE_CLIENT_TIMEOUT_MS", value_parser = millis, default_value_t = HttpConfig::default().client_timeout.as_millis() as u64)]
    pub client_timeout_ms: u64,
    /// Enable CORS for these origins (comma-separated, `*` for any). Off by default.
    #[arg(long, env = "FINSERVE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Serve the admin routes (`/v1/adapters`: merge and drop variants at runtime), which take
    /// this key and no other. Without it the routes are absent. The base stays in memory to merge
    /// from (with --quantize q8, an f32 copy of it).
    #[arg(long, env = "FINSERVE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<Secret>,
    /// The directory runtime variants read their adapters from (`path` of /v1/adapters and the
    /// adapters of --variants-file are relative to it); a path leaving it, also by a symlink, is
    /// refused. Without it only Hub ids are accepted (never with HF_HUB_OFFLINE).
    #[arg(long, env = "FINSERVE_ADAPTER_ROOT")]
    pub adapter_root: Option<PathBuf>,
    /// Serve the variants this file declares, one --variant value per line (blank lines and `#`
    /// comments skipped), e.g. a mounted ConfigMap: re-read when it changes and on SIGHUP,
    /// merging what was added and draining what was removed. Every replica given the same file
    /// serves the same variants.
    #[arg(long, env = "FINSERVE_VARIANTS_FILE")]
    pub variants_file: Option<PathBuf>,
    /// How often --variants-file is checked for changes, in milliseconds.
    #[arg(long, env = "FINSERVE_VARIANTS_FILE_POLL_MS", value_parser = millis, default_value_t = 2000)]
    pub variants_file_poll_ms: u64,
    /// Most variants served at once besides the default model (start-up, file and API ones
    /// together); a merge beyond it gets 409, or evicts with --variant-eviction lru.
    #[arg(long, env = "FINSERVE_MAX_VARIANTS", value_parser = at_least::<1>)]
    pub max_variants: Option<usize>,
    /// At --max-variants: `refuse` the new variant, or evict the API-loaded one used least
    /// recently (`lru`; start-up and file variants are never evicted).
    #[arg(
        long,
        env = "FINSERVE_VARIANT_EVICTION",
        value_enum,
        default_value = "refuse"
    )]
    pub variant_eviction: Eviction,
    /// Append one JSON line per answered inference request to this file (`-` for stdout): time,
    /// request id, route, variant and digest, parameters, input token count, outputs as
    /// answered, latency. Input texts only with --audit-log-inputs.
    #[arg(long, env = "FINSERVE_AUDIT_LOG")]
    pub audit_log: Option<Sink>,
    /// Also record the input texts in --audit-log (off: texts may be confidential).
    #[arg(long, env = "FINSERVE_AUDIT_LOG_INPUTS", requires = "audit_log")]
    pub audit_log_inputs: bool,
    /// Answer 503 instead of serving while audit records would be lost (the writer behind, or
    /// the file unwritable). Off: lost records are counted in
    /// finserve_audit_records_dropped_total and logged.
    #[arg(long, env = "FINSERVE_AUDIT_LOG_REQUIRED", requires = "audit_log")]
    pub audit_log_required: bool,
    /// Rotate --audit-log before it grows past this many bytes (to PATH.1, PATH.2, ...).
    #[arg(long, env = "FINSERVE_AUDIT_LOG_MAX_BYTES", value_parser = at_least::<4096>, default_value_t = 100 << 20)]
    pub audit_log_max_bytes: usize,
    /// Serve SageMaker's `GET /ping` and `POST /invocations` (which answers by the body's shape:
    /// sentiment, generation, classify, score, completion or chat).
    #[arg(long, env = "FINSERVE_SAGEMAKER")]
    pub sagemaker: bool,
    /// Rotated audit files kept; older ones are deleted.
    #[arg(long, env = "FINSERVE_AUDIT_LOG_KEEP", default_value_t = 10)]
    pub audit_log_keep: usize,
    /// Audit records that may wait for the writer before they count as lost.
    #[arg(long, env = "FINSERVE_AUDIT_LOG_QUEUE", value_parser = at_least::<1>, default_value_t = 65536)]
    pub audit_log_queue: usize,
}

impl ServeArgs {
    /// The default model's name: --served-model-name, else --model, else the demo's name.
    fn model_name(&self) -> String {
        self.served_model_name
            .clone()
            .or_else(|| self.model.base.model.clone())
            .unwrap_or_else(|| crate::http::openapi::DEMO_MODEL_NAME.into())
    }

    /// The API keys from --api-key or --api-key-file, if any.
    fn api_keys(&self) -> anyhow::Result<Option<Arc<ApiKeys>>> {
        if let Some(path) = &self.api_key_file {
            let keys = ApiKeys::from_file(path.clone())
                .map_err(anyhow::Error::msg)
                .context("--api-key-file")?;
            return Ok(Some(Arc::new(keys)));
        }
        let keys: Vec<String> = self
            .api_key
            .iter()
            .map(|Secret(k)| k.clone())
            .filter(|k| !k.is_empty())
            .collect();
        Ok((!keys.is_empty()).then(|| Arc::new(ApiKeys::fixed(&keys))))
    }

    fn request_limits(&self) -> anyhow::Result<RequestLimits> {
        let max_input = self.model.max_input_tokens;
        let max_total_tokens = self
            .max_total_tokens
            .unwrap_or(max_input + self.max_new_tokens);
        if max_total_tokens <= max_input {
            bail!(
                "--max-total-tokens ({max_total_tokens}) must be more than --max-input-tokens \
                 ({max_input}) so every valid input can generate at least one token"
            );
        }
        if self.chunk_overlap >= max_input {
            bail!(
                "--chunk-overlap ({}) must be less than --max-input-tokens ({max_input}) so \
                 consecutive windows of a long input advance",
                self.chunk_overlap
            );
        }
        Ok(RequestLimits {
            max_new_tokens: self.max_new_tokens,
            max_total_tokens,
            max_stop_sequences: self.max_stop_sequences,
            max_stop_length: self.max_stop_length,
            max_client_batch_size: self.max_client_batch_size,
            max_candidate_labels: self.max_candidate_labels,
            max_label_length: self.max_label_length,
            chunk_overlap: self.chunk_overlap,
            max_chunks_per_input: self.max_chunks_per_input,
            max_targets_per_input: self.max_targets_per_input,
            max_explain_words: self.max_explain_words,
            max_sentences_per_input: self.max_sentences_per_input,
            max_windows_per_request: self.max_windows_per_request,
        })
    }

    /// The serve run these options describe.
    fn job(self) -> anyhow::Result<ServeJob> {
        let m = &self.model;
        if self.max_batch_tokens < m.max_input_tokens {
            bail!(
                "--max-batch-tokens ({}) must be at least --max-input-tokens ({}) so every valid \
                 input fits a batch",
                self.max_batch_tokens,
                m.max_input_tokens
            );
        }
        let name = self.model_name();
        if let Some(v) = self.variants.iter().find(|v| v.name == name) {
            bail!(
                "--variant {}: the default model is already served as `{name}` (see --served-model-name)",
                v.name
            );
        }
        let limits = self.request_limits()?;
        let runtime = self.runtime_variants()?;
        let interactive_slots = self.interactive_slots.unwrap_or(m.max_batch_size / 4);
        let backfill_batch_size = self
            .backfill_batch_size
            .unwrap_or(DEFAULT_BACKFILL_BATCH_SIZE.min(m.max_batch_size));
        if backfill_batch_size > m.max_batch_size {
            bail!(
                "--backfill-batch-size ({backfill_batch_size}) must be at most --max-batch-size ({})",
                m.max_batch_size
            );
        }
        if interactive_slots >= m.max_batch_size {
            bail!(
                "--interactive-slots ({interactive_slots}) must be less than --max-batch-size ({}) \
                 so batch-priority generations can run",
                m.max_batch_size
            );
        }
        let http = HttpConfig {
            api_keys: self.api_keys()?,
            api_key_file_poll: Duration::from_millis(self.api_key_file_poll_ms),
            client_timeout: Duration::from_millis(self.client_timeout_ms),
            max_body_bytes: self.max_body_bytes,
            max_concurrent_requests: self.max_concurrent_requests,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            cors_allow_origin: self.cors_allow_origin.clone(),
            max_failed_batches: self.max_failed_batches,
            metrics_on_api: self.metrics_port.is_none(),
            model_name: name.clone(),
            default_truncation_direction: self.truncation_direction,
            limits: limits.clone(),
            admin_api_keys: self
                .admin_api_key
                .as_ref()
                .filter(|Secret(k)| !k.is_empty())
                .map(|Secret(k)| Arc::new(ApiKeys::fixed(std::slice::from_ref(k)))),
            sagemaker: self.sagemaker,
        };
        let engine = EngineConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_batch_wait: Duration::from_millis(self.max_batch_wait_ms),
            queue_capacity: self.max_concurrent_requests * limits.max_client_batch_size,
            limits,
            interactive_slots,
            backfill_batch_size,
            ..m.engine_config()
        };
        Ok(ServeJob {
            model: m.job(self.variants.clone())?,
            name,
            device: m.base.device.clone(),
            host: self.host,
            port: self.port,
            metrics_port: self.metrics_port,
            engine,
            http,
            runtime,
            audit: self.audit_log.clone().map(|sink| AuditConfig {
                sink,
                inputs: self.audit_log_inputs,
                required: self.audit_log_required,
                max_bytes: self.audit_log_max_bytes as u64,
                keep: self.audit_log_keep,
                capacity: self.audit_log_queue,
            }),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
        })
    }

    /// How variants may change while serving; `None` when neither the admin API nor a variants
    /// file is on (the base is then not kept).
    fn runtime_variants(&self) -> anyhow::Result<Option<RuntimeJob>> {
        if let Some(root) = &self.adapter_root
            && !root.is_dir()
        {
            bail!("--adapter-root {} is not a directory", root.display());
        }
        if let Some(max) = self.max_variants
            && self.variants.len() > max
        {
            bail!(
                "--max-variants ({max}) is less than the {} --variant values given",
                self.variants.len()
            );
        }
        if self.variant_eviction == Eviction::Lru && self.max_variants.is_none() {
            bail!("--variant-eviction lru needs --max-variants");
        }
        if let Some(file) = &self.variants_file {
            crate::variants::check_file(file)?;
        }
        let admin = self
            .admin_api_key
            .as_ref()
            .is_some_and(|Secret(k)| !k.is_empty());
        if !admin && self.variants_file.is_none() {
            return Ok(None);
        }
        Ok(Some(RuntimeJob {
            config: RuntimeVariants {
                adapter_root: self.adapter_root.clone(),
                max_variants: self.max_variants,
                eviction: self.variant_eviction,
                // A request is over by then: answered, or timed out.
                drain_timeout: Duration::from_millis(self.request_timeout_ms)
                    + Duration::from_secs(5),
            },
            variants_file: self.variants_file.clone(),
            poll: Duration::from_millis(self.variants_file_poll_ms),
        }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (created; existing files are overwritten).
    #[arg(long, env = "FINSERVE_OUT")]
    pub out: PathBuf,
}

/// `eval --long-input`: what happens to rows over --max-input-tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalLongInput {
    Error,
    Chunk,
    /// Score each sentence (windowed when longer than a window); the row's scores are the
    /// token-weighted mean of its sentences'.
    Sentences,
}

/// What a bulk command does with each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BulkTask {
    /// Label scores, as `/v1/sentiment`.
    Sentiment,
    /// Generated text, as `/v1/generate`, with the --max-new-tokens ... --stop options.
    Generate,
}

/// The decoding options of `--task generate`: a request's `parameters`, as flags.
#[derive(Debug, Clone, Args)]
pub struct GenerationArgs {
    /// Most tokens generated per row (default: the server's default for a request).
    #[arg(long, env = "FINSERVE_GENERATE_MAX_NEW_TOKENS", value_parser = at_least::<1>)]
    pub max_new_tokens: Option<usize>,
    /// Sample instead of decoding greedily.
    #[arg(long, env = "FINSERVE_GENERATE_DO_SAMPLE")]
    pub do_sample: bool,
    #[arg(long, env = "FINSERVE_GENERATE_TEMPERATURE")]
    pub temperature: Option<f64>,
    #[arg(long, env = "FINSERVE_GENERATE_TOP_K")]
    pub top_k: Option<i64>,
    #[arg(long, env = "FINSERVE_GENERATE_TOP_P")]
    pub top_p: Option<f64>,
    #[arg(long, env = "FINSERVE_GENERATE_REPETITION_PENALTY")]
    pub repetition_penalty: Option<f64>,
    /// The first row's sampling seed; row I (0 = the first data row) uses SEED + I, so a run
    /// gives the same texts however it is sharded or resumed.
    #[arg(long, env = "FINSERVE_GENERATE_SEED")]
    pub seed: Option<u64>,
    /// Stop sequences (comma-separated).
    #[arg(long, env = "FINSERVE_GENERATE_STOP", value_delimiter = ',')]
    pub stop: Vec<String>,
}

impl GenerationArgs {
    /// The first of these flags that is given, if any: they mean nothing without generation.
    fn first_given(&self) -> Option<&'static str> {
        [
            (self.max_new_tokens.is_some(), "--max-new-tokens"),
            (self.do_sample, "--do-sample"),
            (self.temperature.is_some(), "--temperature"),
            (self.top_k.is_some(), "--top-k"),
            (self.top_p.is_some(), "--top-p"),
            (self.repetition_penalty.is_some(), "--repetition-penalty"),
            (self.seed.is_some(), "--seed"),
            (!self.stop.is_empty(), "--stop"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// The options, and the engine limits that let `max_new_tokens` through (a bulk run is
    /// bounded by its flags, not by a server's per-request limits). `long_input` is what the
    /// sentiment flags asked for: a generation's input must fit as it is.
    fn options(
        &self,
        limits: &mut RequestLimits,
        max_input_tokens: usize,
        long_input: crate::engine::infer::LongInput,
    ) -> anyhow::Result<GenerateOptions> {
        if long_input != crate::engine::infer::LongInput::Refuse {
            bail!(
                "--truncate and --long-input are for --task sentiment; a generation's input \
                 must fit --max-input-tokens"
            );
        }
        let seed = self
            .seed
            .map(|s| i64::try_from(s).context("--seed must be at most 9223372036854775807"))
            .transpose()?;
        if let Some(n) = self.max_new_tokens {
            limits.max_new_tokens = limits.max_new_tokens.max(n);
        }
        limits.max_total_tokens = max_input_tokens + limits.max_new_tokens;
        limits.max_stop_sequences = limits.max_stop_sequences.max(self.stop.len());
        let longest = self
            .stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0);
        limits.max_stop_length = limits.max_stop_length.max(longest);
        Ok(GenerateOptions {
            max_new_tokens: self.max_new_tokens.map(|n| n as i64),
            do_sample: Some(self.do_sample),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed,
            stop: self.stop.clone(),
            // The output files carry the text, not log-probabilities.
            logprobs: false,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to write per row: label scores, or generated text.
    #[arg(long, env = "FINSERVE_PREDICT_TASK", default_value = "sentiment")]
    pub task: BulkTask,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// The texts: CSV with a header row (.csv), JSON Lines (.jsonl, one object per line) or
    /// Parquet (.parquet; Snappy or uncompressed).
    #[arg(long, env = "FINSERVE_PREDICT_DATA")]
    pub data: PathBuf,
    /// The column (or JSON member) holding the text.
    #[arg(long, env = "FINSERVE_PREDICT_TEXT_COLUMN", default_value = "sentence")]
    pub text_column: String,
    /// A column (or member) carried into every output record as `id`.
    #[arg(long, env = "FINSERVE_PREDICT_ID_COLUMN")]
    pub id_column: Option<String>,
    /// A column (or member) of entity-level targets: a list of names and `{"start", "end"}`
    /// spans, as `parameters.targets` takes them (JSON text in CSV and Parquet). Each record then
    /// has `targets`, each with its `target`, `spans` and `scores`, beside the text's `scores`.
    #[arg(long, env = "FINSERVE_PREDICT_TARGETS_COLUMN")]
    pub targets_column: Option<String>,
    /// `.parquet`: a directory of Parquet part files (--part-rows rows each; columns `row`,
    /// `id`, `label`, `score_<label>`..., `sentences` as JSON, `digest`; or the generation's).
    /// Otherwise JSON Lines, one flushed record per line: per row `{"row", "id", "scores":
    /// [{"label", "score"}...] best first, "digest"}` (and `"sentences"`, each with its `span`
    /// and `scores`, with --long-input sentences); with --task generate `{"row", "id",
    /// "generated_text", "finish_reason", "generated_tokens", "seed", "digest"}`.
    #[arg(long, env = "FINSERVE_PREDICT_OUT")]
    pub out: PathBuf,
    /// Rows per Parquet part file: a kill loses at most the part being written.
    #[arg(long, env = "FINSERVE_PREDICT_PART_ROWS", value_parser = at_least::<1>, default_value_t = 10_000)]
    pub part_rows: usize,
    /// Where rows that cannot be scored go, JSON Lines `{"row", "id", "error"}` (default:
    /// OUT.errors).
    #[arg(long, env = "FINSERVE_PREDICT_ERRORS")]
    pub errors: Option<PathBuf>,
    /// Continue a run that stopped: rows already in --out or --errors are skipped (a record cut
    /// off by a kill is removed first).
    #[arg(long, env = "FINSERVE_PREDICT_RESUME")]
    pub resume: bool,
    /// Process only the rows whose index (0 = the first data row) modulo N is I.
    #[arg(long, env = "FINSERVE_PREDICT_SHARD")]
    pub shard: Option<crate::predict::Shard>,
    /// Cut rows longer than --max-input-tokens (with the template), as a request's `truncate`;
    /// without it (and without --long-input chunk) such rows go to --errors.
    #[arg(long, env = "FINSERVE_PREDICT_TRUNCATE")]
    pub truncate: bool,
    /// Which end --truncate cuts: right (keep the start) or left.
    #[arg(long, env = "FINSERVE_TRUNCATION_DIRECTION", default_value = "right")]
    pub truncation_direction: TruncationDirection,
    /// Rows over --max-input-tokens: `error` (to --errors) or `chunk` (scored in windows).
    #[arg(long, env = "FINSERVE_PREDICT_LONG_INPUT", default_value = "error")]
    pub long_input: EvalLongInput,
    /// Input tokens shared by consecutive windows with --long-input chunk.
    #[arg(long, env = "FINSERVE_CHUNK_OVERLAP", default_value_t = RequestLimits::default().chunk_overlap)]
    pub chunk_overlap: usize,
    /// Most windows one row may need with --long-input chunk.
    #[arg(long, env = "FINSERVE_MAX_CHUNKS_PER_INPUT", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_chunks_per_input)]
    pub max_chunks_per_input: usize,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What is measured: label accuracy (sentiment), or generated text against --target-column
    /// (generate: teacher-forced loss and perplexity of the references, exact match, ROUGE-L F1
    /// as `rouge-score` computes it, corpus BLEU as `sacrebleu` does).
    #[arg(long, env = "FINSERVE_EVAL_TASK", default_value = "sentiment")]
    pub task: BulkTask,
    /// With --task generate: the column (or JSON member) holding each row's reference output.
    #[arg(long, env = "FINSERVE_EVAL_TARGET_COLUMN")]
    pub target_column: Option<String>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// CSV file with a header row; entity-level JSON Lines (FinEntity's shape) for sentiment;
    /// CSV or JSON Lines for --task generate.
    #[arg(long, env = "FINSERVE_EVAL_DATA")]
    pub data: PathBuf,
    #[arg(long, env = "FINSERVE_EVAL_TEXT_COLUMN", default_value = "sentence")]
    pub text_column: String,
    #[arg(long, env = "FINSERVE_EVAL_LABEL_COLUMN", default_value = "label")]
    pub label_column: String,
    /// Write one JSON line per row (text, gold label, prediction, scores; or the refusal).
    #[arg(long, env = "FINSERVE_EVAL_OUT")]
    pub out: Option<PathBuf>,
    /// Cut rows longer than --max-input-tokens (with the template), as a request's `truncate`
    /// does; without it (and without --long-input chunk) such rows are refused and reported,
    /// as the server would answer them.
    #[arg(long, env = "FINSERVE_EVAL_TRUNCATE")]
    pub truncate: bool,
    /// Which end --truncate cuts: right (keep the start) or left.
    #[arg(long, env = "FINSERVE_TRUNCATION_DIRECTION", default_value = "right")]
    pub truncation_direction: TruncationDirection,
    /// Rows over --max-input-tokens: `error` (refused, as above) or `chunk` (scored in windows
    /// of --chunk-overlap overlapping tokens, as a request's `long_input: "chunk"`).
    #[arg(long, env = "FINSERVE_EVAL_LONG_INPUT", default_value = "error")]
    pub long_input: EvalLongInput,
    /// Input tokens shared by consecutive windows with --long-input chunk.
    #[arg(long, env = "FINSERVE_CHUNK_OVERLAP", default_value_t = RequestLimits::default().chunk_overlap)]
    pub chunk_overlap: usize,
    /// Most windows one row may need with --long-input chunk.
    #[arg(long, env = "FINSERVE_MAX_CHUNKS_PER_INPUT", value_parser = at_least::<1>, default_value_t = RequestLimits::default().max_chunks_per_input)]
    pub max_chunks_per_input: usize,
    /// Fit a softmax temperature on this data and write it (see --calibration-out).
    #[arg(long, env = "FINSERVE_EVAL_CALIBRATE")]
    pub calibrate: bool,
    /// Where --calibrate writes the calibration (default: `calibration.json` in the last
    /// adapter's directory, where `serve` finds it).
    #[arg(long, env = "FINSERVE_CALIBRATION_OUT")]
    pub calibration_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The base to train on.
    #[command(flatten)]
    pub base: BaseArgs,
    /// Training data: CSV files with a header row (sentence-level rows) and entity-level JSON
    /// Lines (`.jsonl`, FinEntity's shape: each annotated entity is one example, shown through
    /// --target-template). Repeat the flag (or comma-separate) to mix files; `FILE:N` goes
    /// through FILE N times per epoch.
    #[arg(
        long,
        env = "FINSERVE_TRAIN_DATA",
        value_delimiter = ',',
        required = true
    )]
    pub data: Vec<crate::train::DataFile>,
    /// Data scored after each epoch (accuracy, macro-F1 over all its rows), CSV or JSON Lines as
    /// --data; the best epoch's adapter is kept.
    #[arg(long, env = "FINSERVE_TRAIN_EVAL_DATA", value_delimiter = ',')]
    pub eval_data: Vec<PathBuf>,
    /// How entity rows are shown to the model: a `target_template.json` (`template` with
    /// `{text}` and `{target}`, `mark`, optional `context_words`, `context_skips_names`,
    /// `context_stops` and `text_weight`, with which entity rows are learnt through the scores
    /// pooled with their text's, as `serve` answers).
    /// Default: `{target} : {text}`, mentions marked `<<` `>>`, the whole text. Written beside
    /// the adapter when --data holds entity rows, where `serve` reads it.
    #[arg(long, env = "FINSERVE_TRAIN_TARGET_TEMPLATE")]
    pub target_template: Option<PathBuf>,
    /// Adapter directory to write (adapter_config.json, adapter_model.safetensors).
    #[arg(long, env = "FINSERVE_TRAIN_OUT")]
    pub out: PathBuf,
    #[arg(long, env = "FINSERVE_TRAIN_TEXT_COLUMN", default_value = "sentence")]
    pub text_column: String,
    #[arg(long, env = "FINSERVE_TRAIN_LABEL_COLUMN", default_value = "label")]
    pub label_column: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// LoRA rank.
    #[arg(long = "r", env = "FINSERVE_LORA_R", default_value_t = 8)]
    pub r: usize,
    #[arg(long, env = "FINSERVE_LORA_ALPHA", default_value_t = 32.0)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA path's input (the model's own `dropout_rate` applies too).
    #[arg(long, env = "FINSERVE_LORA_DROPOUT", default_value_t = 0.1)]
    pub lora_dropout: f64,
    /// Modules to adapt, as PEFT: name suffixes (comma-separated), or one regex matching the
    /// whole module name, or `all-linear`.
    #[arg(
        long,
        env = "FINSERVE_TARGET_MODULES",
        value_delimiter = ',',
        default_value = "q,v"
    )]
    pub target_modules: Vec<String>,
    /// Scale updates by alpha/sqrt(r) instead of alpha/r.
    #[arg(long, env = "FINSERVE_USE_RSLORA")]
    pub use_rslora: bool,
    #[arg(long, env = "FINSERVE_EPOCHS", default_value_t = 3)]
    pub epochs: usize,
    /// Peak learning rate of AdamW.
    #[arg(long, env = "FINSERVE_LR", default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW's decoupled weight decay (torch's default).
    #[arg(long, env = "FINSERVE_WEIGHT_DECAY", default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Steps of linear warm-up before the linear decay to zero.
    #[arg(long, env = "FINSERVE_WARMUP_STEPS", default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, env = "FINSERVE_BATCH_SIZE", default_value_t = 8)]
    pub batch_size: usize,
    /// Clip gradients to this global L2 norm, as transformers' Trainer does by default (0: off).
    #[arg(long, env = "FINSERVE_MAX_GRAD_NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Longest input in tokens (EOS included); longer inputs are cut from the right.
    #[arg(long, env = "FINSERVE_MAX_INPUT_TOKENS", default_value_t = 256)]
    pub max_input_tokens: usize,
    /// Seed of initialisation, shuffling and dropout: the same seed gives the same adapter on
    /// the same machine.
    #[arg(long, env = "FINSERVE_SEED", default_value_t = 42)]
    pub seed: u64,
}

impl TrainArgs {
    /// Trains with each batch split into `pieces` (see [`crate::train::parallel_pieces`]).
    fn run(&self, pieces: usize) -> anyhow::Result<()> {
        // The base alone, in f32: the adapter is what training makes.
        let spec = model::resolve::ModelChoice {
            model: self.base.model.clone(),
            revision: self.base.revision.clone(),
            adapters: Vec::new(),
            no_adapter: true,
            device: self.base.device.clone(),
            dtype: "f32".into(),
            quantize: "none".into(),
            greedy_screen: false,
        }
        .resolve()?;
        let name = spec.model.clone();
        let ckpt = model::load_checkpoint(&spec, &HubConfig::from_env())
            .with_context(|| format!("cannot load model `{name}`"))?;
        let labels = self.prompt.label_set(&ckpt.tokenizer)?;
        let template = self.prompt.template()?;
        let target_template = match &self.target_template {
            Some(path) => TargetTemplate::load(path)?,
            None => TargetTemplate::new("{target} : {text}", ("<<".into(), ">>".into()), None)?,
        };
        let prompts = crate::train::Prompts {
            columns: (self.text_column.as_str(), self.label_column.as_str()),
            labels: &self.prompt.labels,
            tokenizer: &ckpt.tokenizer,
            template: &template,
            target_template: &target_template,
            max_input_tokens: self.max_input_tokens,
        };
        let mut train = Vec::new();
        for file in &self.data {
            let rows = crate::train::read(&file.path, &prompts)?;
            for _ in 0..file.repeat {
                train.extend(rows.iter().cloned());
            }
        }
        let eval = match self.eval_data.as_slice() {
            [] => None,
            paths => Some(
                paths
                    .iter()
                    .map(|p| crate::train::read(p, &prompts))
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .concat(),
            ),
        };
        let entities = self
            .data
            .iter()
            .any(|f| crate::entity_data::is_jsonl(&f.path));
        let recipe = crate::train::Recipe {
            lora: crate::train::peft::LoraSettings {
                r: self.r,
                lora_alpha: self.lora_alpha,
                lora_dropout: self.lora_dropout,
                target_modules: crate::train::target_modules(&self.target_modules),
                use_rslora: self.use_rslora,
                base_model_name_or_path: name,
            },
            epochs: self.epochs,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps,
            batch_size: self.batch_size,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
        };
        let job = crate::train::Job {
            config: ckpt.config,
            base: ckpt.weights,
            labels,
            train,
            eval,
            out: self.out.clone(),
            target_template: entities.then_some(target_template),
            pieces,
        };
        crate::train::run(job, &recipe)
    }
}

/// What a bulk command does with rows over `--max-input-tokens`: the flags of a request's
/// `truncate` / `long_input`, checked together.
fn long_input(
    truncate: bool,
    direction: TruncationDirection,
    mode: EvalLongInput,
    chunk_overlap: usize,
    max_input_tokens: usize,
) -> anyhow::Result<crate::engine::infer::LongInput> {
    use crate::engine::infer::LongInput;
    if truncate && mode != EvalLongInput::Error {
        bail!("--truncate and --long-input chunk or sentences exclude each other: choose one");
    }
    if mode != EvalLongInput::Error && chunk_overlap >= max_input_tokens {
        bail!(
            "--chunk-overlap ({chunk_overlap}) must be less than --max-input-tokens ({max_input_tokens})"
        );
    }
    Ok(match (mode, truncate) {
        (EvalLongInput::Chunk, _) => LongInput::Chunk,
        (EvalLongInput::Sentences, _) => LongInput::Sentences,
        (EvalLongInput::Error, true) => LongInput::Truncate(direction),
        (EvalLongInput::Error, false) => LongInput::Refuse,
    })
}

impl PredictArgs {
    fn job(self) -> anyhow::Result<crate::predict::PredictJob> {
        let m = &self.model;
        let long_input = long_input(
            self.truncate,
            self.truncation_direction,
            self.long_input,
            self.chunk_overlap,
            m.max_input_tokens,
        )?;
        let errors = self.errors.clone().unwrap_or_else(|| {
            let mut name = self.out.clone().into_os_string();
            name.push(".errors");
            PathBuf::from(name)
        });
        if errors == self.out {
            bail!("--errors must be another file than --out");
        }
        let mut engine = m.bulk_engine_config(self.chunk_overlap, self.max_chunks_per_input);
        let task = match self.task {
            BulkTask::Sentiment => {
                if let Some(flag) = self.generation.first_given() {
                    bail!("{flag} is for --task generate");
                }
                if self.targets_column.is_some()
                    && long_input == crate::engine::infer::LongInput::Sentences
                {
                    bail!(
                        "--targets-column and --long-input sentences exclude each other (use \
                         --long-input chunk: a target is scored in the windows that hold it)"
                    );
                }
                crate::predict::Task::Sentiment(long_input)
            }
            BulkTask::Generate => {
                if self.targets_column.is_some() {
                    bail!("--targets-column is for --task sentiment");
                }
                crate::predict::Task::Generate(self.generation.options(
                    &mut engine.limits,
                    m.max_input_tokens,
                    long_input,
                )?)
            }
        };
        Ok(crate::predict::PredictJob {
            model: m.job(Vec::new())?,
            engine,
            task,
            data: self.data,
            text_column: self.text_column,
            targets_column: self.targets_column,
            id_column: self.id_column,
            out: self.out,
            part_rows: self.part_rows,
            errors,
            resume: self.resume,
            shard: self.shard,
        })
    }
}

impl EvalArgs {
    /// The eval run these options describe, with where a fitted calibration goes.
    fn job(self) -> anyhow::Result<crate::eval::EvalJob> {
        let m = &self.model;
        let model = m.job(Vec::new())?;
        let calibration_out = match (self.calibration_out, self.calibrate) {
            (Some(p), _) => Some(p),
            (None, true) => Some(beside_adapter(&model.spec.adapters, crate::calibration::FILE_NAME).context(
                "--calibrate writes beside the last adapter, and there is no local adapter directory: \
                 pass --calibration-out",
            )?),
            (None, false) => None,
        };
        let long_input = long_input(
            self.truncate,
            self.truncation_direction,
            self.long_input,
            self.chunk_overlap,
            m.max_input_tokens,
        )?;
        let mut engine = m.bulk_engine_config(self.chunk_overlap, self.max_chunks_per_input);
        let task = match (self.task, self.target_column) {
            (BulkTask::Sentiment, target) => {
                if let Some(flag) = self.generation.first_given() {
                    bail!("{flag} is for --task generate");
                }
                if target.is_some() {
                    bail!(
                        "--target-column is for --task generate (sentiment reads --label-column)"
                    );
                }
                crate::eval::Task::Sentiment {
                    long_input,
                    label_column: self.label_column,
                    calibration_out,
                }
            }
            (BulkTask::Generate, None) => {
                bail!("--task generate needs --target-column: the column of reference outputs")
            }
            (BulkTask::Generate, Some(target_column)) => {
                if calibration_out.is_some() {
                    bail!("--calibrate and --calibration-out are for --task sentiment");
                }
                crate::eval::Task::Generate {
                    options: self.generation.options(
                        &mut engine.limits,
                        m.max_input_tokens,
                        long_input,
                    )?,
                    target_column,
                }
            }
        };
        Ok(crate::eval::EvalJob {
            model,
            engine,
            task,
            data: self.data,
            text_column: self.text_column,
            out: self.out,
        })
    }
}

impl ModelArgs {
    /// The model these options name (see [`model::resolve`]).
    pub fn spec(&self) -> anyhow::Result<ModelSpec> {
        let choice = model::resolve::ModelChoice {
            model: self.base.model.clone(),
            revision: self.base.revision.clone(),
            adapters: self.adapters.clone(),
            no_adapter: self.no_adapter,
            device: self.base.device.clone(),
            dtype: self.dtype.clone(),
            quantize: self.quantize.clone(),
            greedy_screen: !self.no_greedy_screen,
        };
        Ok(choice.resolve()?)
    }

    /// The model to load with `variants`, its labels and calibration.
    fn job(&self, variants: Vec<model::VariantSpec>) -> anyhow::Result<ModelJob> {
        let mut spec = self.spec()?;
        spec.variants = variants;
        Ok(ModelJob {
            spec,
            labels: self.prompt.labels.clone(),
            prompt_template: self.prompt.prompt_template.clone(),
            calibration: self.calibration.clone(),
            target_template: self.target_template.clone(),
        })
    }

    /// The engine of a bulk command (`eval`, `predict`): batches as large as --max-batch-size,
    /// with the chunking limits given.
    fn bulk_engine_config(
        &self,
        chunk_overlap: usize,
        max_chunks_per_input: usize,
    ) -> EngineConfig {
        EngineConfig {
            max_batch_tokens: self.max_batch_size * self.max_input_tokens,
            limits: RequestLimits {
                chunk_overlap,
                max_chunks_per_input,
                max_client_batch_size: self.max_batch_size,
                ..RequestLimits::default()
            },
            ..self.engine_config()
        }
    }

    /// The engine settings these options fix; the batching knobs of `serve` stay at their defaults.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_batch_size: self.max_batch_size,
            max_input_tokens: self.max_input_tokens,
            prompt_template: self.prompt.prompt_template.clone(),
            ..EngineConfig::default()
        }
    }
}

/// Gives candle's elementwise thread pool no workers. candle (0.11) runs every elementwise op of
/// 64K elements or more on a pool of its own, beside finserve's compute pools, and its idle
/// workers spin (25,000 times) after each such op on the cores those pools compute on: under a
/// stream of generations on 2 cores the spinning took about a tenth of the CPU. With one thread
/// those ops run on the calling thread; finserve's own products do the parallel work.
///
/// # Safety
/// It sets an environment variable (read once, when candle first needs its pool), so it must run
/// before the process starts any other thread.
pub unsafe fn keep_candle_on_the_calling_thread() {
    // SAFETY: the caller guarantees that no other thread can read the environment.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // SAFETY: right after parsing the command line, before telemetry, the runtime or candle start
    // a thread.
    unsafe { keep_candle_on_the_calling_thread() };
    let pieces = match &cli.command {
        Some(Command::Train(args)) => crate::train::parallel_pieces(&args.base.device),
        _ => 1,
    };
    // The global compute pool: loading, merging and quantizing weights, training (a serving
    // engine computes on a pool of its own of the same size, `finserve-engine-N`). Named so that
    // profiles and `top -H` tell them from tokio's workers; it reads `RAYON_NUM_THREADS`, so it
    // comes after `parallel_pieces`.
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("finserve-pool-{i}"))
        .build_global()
        .context("cannot start the compute thread pool")?;
    let otlp = cli
        .otlp_endpoint
        .clone()
        .map(|endpoint| crate::telemetry::Otlp {
            endpoint,
            ca_file: cli.otlp_ca_file.clone(),
        });
    let _telemetry = crate::telemetry::init(cli.json_logs, otlp.as_ref())?;
    match cli.command {
        None => crate::server::run(cli.serve.job()?),
        Some(Command::Serve(args)) => crate::server::run(args.job()?),
        Some(Command::Merge(args)) => crate::export::run(args.model.spec()?, &args.out),
        Some(Command::Eval(args)) => crate::eval::run(args.job()?),
        Some(Command::Predict(args)) => crate::predict::run(args.job()?),
        Some(Command::Train(args)) => args.run(pieces),
        Some(Command::Openapi) => {
            let doc = crate::http::openapi::default_json().map_err(anyhow::Error::msg)?;
            println!("{doc}");
            Ok(())
        }
    }
}
