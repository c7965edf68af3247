//! Command-line interface: `serve` (the default), `merge`, `eval` and `openapi`. Every flag can
//! also be set through a `FINSERVE_*` environment variable.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::calibration::{self, Calibration};
use crate::engine::backend::T5Backend;
use crate::engine::prompt::{Template, TruncationDirection};
use crate::engine::sentiment::LabelSet;
use crate::engine::{Engine, EngineConfig, Served};
use crate::http::types::{CalibrationInfo, InfoResponse, Limits, VariantInfo};
use crate::http::{ApiKey, AppState, HttpLimits, RequestLimits};
use crate::hub::HubConfig;
use crate::lora::AdapterSpec;
use crate::metrics::METRICS;
use crate::model::{self, LoadedModel, ModelSpec};

/// What `ModelArgs::load` gives `serve` and `eval`.
pub struct Loaded {
    pub spec: ModelSpec,
    pub model: LoadedModel,
    /// The server's labels, with the calibration's temperature if one applies.
    pub labels: LabelSet,
    pub calibration: Option<(PathBuf, Calibration)>,
    /// The labels and calibration of each `--variant`, in order.
    pub variant_labels: Vec<(LabelSet, Option<(PathBuf, Calibration)>)>,
}

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
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the REST API (what `finserve` with no subcommand runs).
    Serve(ServeArgs),
    /// Merge adapters into the base model and write it in Hugging Face format.
    Merge(MergeArgs),
    /// Score a labelled CSV file and print accuracy, macro-F1 and the confusion matrix.
    Eval(EvalArgs),
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
    /// Serving dtype: f32, or bf16 on GPU.
    #[arg(long, env = "FINSERVE_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Quantize the linear layers and lm_head after the merge: `none`, or `q8` (int8 blocks, CPU).
    #[arg(long, env = "FINSERVE_QUANTIZE", default_value = "none")]
    pub quantize: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Calibration file (from `finserve eval --calibrate`) applied to the sentiment scores.
    /// Default: `calibration.json` in the last adapter's directory, if there is one.
    #[arg(long, env = "FINSERVE_CALIBRATION")]
    pub calibration: Option<PathBuf>,
    /// Longest input in tokens (EOS included).
    #[arg(long, env = "FINSERVE_MAX_INPUT_TOKENS", default_value_t = EngineConfig::default().max_input_tokens)]
    pub max_input_tokens: usize,
    /// Most inputs per engine batch.
    #[arg(long, env = "FINSERVE_MAX_BATCH_SIZE", default_value_t = EngineConfig::default().max_batch_size)]
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
    #[arg(long, env = "FINSERVE_MAX_BATCH_TOKENS", default_value_t = EngineConfig::default().max_batch_tokens)]
    pub max_batch_tokens: usize,
    /// How long the engine may wait for more sentiment requests to fill a batch.
    #[arg(long, env = "FINSERVE_MAX_BATCH_WAIT_MS", default_value_t = 0)]
    pub max_batch_wait_ms: u64,
    /// Largest `max_new_tokens` a client may ask for.
    #[arg(long, env = "FINSERVE_MAX_NEW_TOKENS", default_value_t = RequestLimits::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Most input tokens plus `max_new_tokens` of one generation (default: --max-input-tokens +
    /// --max-new-tokens).
    #[arg(long, env = "FINSERVE_MAX_TOTAL_TOKENS")]
    pub max_total_tokens: Option<usize>,
    /// Most stop sequences per generate request.
    #[arg(long, env = "FINSERVE_MAX_STOP_SEQUENCES", default_value_t = RequestLimits::default().max_stop_sequences)]
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in characters.
    #[arg(long, env = "FINSERVE_MAX_STOP_LENGTH", default_value_t = RequestLimits::default().max_stop_length)]
    pub max_stop_length: usize,
    /// Most `candidate_labels` of one /v1/sentiment request.
    #[arg(long, env = "FINSERVE_MAX_CANDIDATE_LABELS", default_value_t = RequestLimits::default().max_candidate_labels)]
    pub max_candidate_labels: usize,
    /// Longest candidate label, in characters.
    #[arg(long, env = "FINSERVE_MAX_LABEL_LENGTH", default_value_t = RequestLimits::default().max_label_length)]
    pub max_label_length: usize,
    /// Input tokens shared by consecutive windows of a long input (`long_input: chunk`).
    #[arg(long, env = "FINSERVE_CHUNK_OVERLAP", default_value_t = RequestLimits::default().chunk_overlap)]
    pub chunk_overlap: usize,
    /// Most windows one input may need with `long_input: chunk`; longer inputs get 422.
    #[arg(long, env = "FINSERVE_MAX_CHUNKS_PER_INPUT", default_value_t = RequestLimits::default().max_chunks_per_input)]
    pub max_chunks_per_input: usize,
    /// Which end `truncate` cuts when a request does not say: right (keep the start) or left.
    #[arg(long, env = "FINSERVE_TRUNCATION_DIRECTION", default_value = "right")]
    pub truncation_direction: TruncationDirection,
    /// Most inputs in one /v1/sentiment request.
    #[arg(long, env = "FINSERVE_MAX_CLIENT_BATCH_SIZE", default_value_t = RequestLimits::default().max_client_batch_size)]
    pub max_client_batch_size: usize,
    /// Most requests handled at once; more get 429.
    #[arg(long, env = "FINSERVE_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Largest request body in bytes; larger get 413.
    #[arg(long, env = "FINSERVE_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Per-request time limit in milliseconds; slower requests get 504.
    #[arg(long, env = "FINSERVE_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    pub request_timeout_ms: u64,
    /// After this many failed engine batches in a row, /health answers 503 (until one succeeds),
    /// so an orchestrator restarts the server.
    #[arg(long, env = "FINSERVE_MAX_FAILED_BATCHES", default_value_t = 5)]
    pub max_failed_batches: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "FINSERVE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Require this key on /v1/* and /info (`Authorization: Bearer` or `x-api-key`). Prefer
    /// --api-key-file: a key given here shows in the process list.
    #[arg(
        long,
        env = "FINSERVE_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<Secret>,
    /// Read the API key from this file (its first line; e.g. a mounted Kubernetes secret).
    #[arg(long, env = "FINSERVE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Enable CORS for these origins (comma-separated, `*` for any). Off by default.
    #[arg(long, env = "FINSERVE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
}

impl ServeArgs {
    /// The default model's name: --served-model-name, else --model, else the demo's name.
    fn model_name(&self) -> String {
        self.served_model_name
            .clone()
            .or_else(|| self.model.base.model.clone())
            .unwrap_or_else(|| crate::http::openapi::DEMO_MODEL_NAME.into())
    }

    /// The API key from --api-key or --api-key-file, if any.
    fn api_key(&self) -> anyhow::Result<Option<ApiKey>> {
        let key = match (&self.api_key, &self.api_key_file) {
            (Some(Secret(key)), _) => key.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
                let key = text.lines().next().unwrap_or("").trim().to_string();
                if key.is_empty() {
                    bail!("--api-key-file {} is empty", path.display());
                }
                key
            }
            (None, None) => return Ok(None),
        };
        Ok((!key.is_empty()).then(|| ApiKey::new(&key)))
    }

    fn request_limits(&self) -> anyhow::Result<RequestLimits> {
        let max_new_tokens = self.max_new_tokens.max(1);
        let max_input = self.model.max_input_tokens;
        let max_total_tokens = self.max_total_tokens.unwrap_or(max_input + max_new_tokens);
        if max_total_tokens <= max_input {
            bail!(
                "--max-total-tokens ({max_total_tokens}) must be more than --max-input-tokens \
                 ({max_input}) so every valid input can generate at least one token"
            );
        }
        Ok(RequestLimits {
            max_new_tokens,
            max_total_tokens,
            max_stop_sequences: self.max_stop_sequences,
            max_stop_length: self.max_stop_length.max(1),
            max_client_batch_size: self.max_client_batch_size.max(1),
            max_candidate_labels: self.max_candidate_labels.max(2),
            max_label_length: self.max_label_length.max(1),
            chunk_overlap: self.chunk_overlap,
            max_chunks_per_input: self.max_chunks_per_input.max(1),
            truncation_direction: self.truncation_direction,
        })
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

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CSV file with a header row.
    #[arg(long, env = "FINSERVE_EVAL_DATA")]
    pub data: PathBuf,
    #[arg(long, env = "FINSERVE_EVAL_TEXT_COLUMN", default_value = "sentence")]
    pub text_column: String,
    #[arg(long, env = "FINSERVE_EVAL_LABEL_COLUMN", default_value = "label")]
    pub label_column: String,
    /// Write one JSON line per row (text, gold label, prediction, scores).
    #[arg(long, env = "FINSERVE_EVAL_OUT")]
    pub out: Option<PathBuf>,
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
    /// Training CSV file with a header row.
    #[arg(long, env = "FINSERVE_TRAIN_DATA")]
    pub data: PathBuf,
    /// CSV scored after each epoch (accuracy, macro-F1); the best epoch's adapter is kept.
    #[arg(long, env = "FINSERVE_TRAIN_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
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
        }
        .resolve()?;
        let name = spec.model.clone();
        let ckpt = model::load_checkpoint(&spec, &HubConfig::from_env())
            .with_context(|| format!("cannot load model `{name}`"))?;
        let labels = self.prompt.label_set(&ckpt.tokenizer)?;
        let template = self.prompt.template()?;
        let columns = (self.text_column.as_str(), self.label_column.as_str());
        let read = |path: &PathBuf| {
            crate::train::read(
                path,
                columns,
                &self.prompt.labels,
                &ckpt.tokenizer,
                &template,
                self.max_input_tokens,
            )
        };
        let train = read(&self.data)?;
        let eval = self.eval_data.as_ref().map(read).transpose()?;
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
            pieces,
        };
        crate::train::run(job, &recipe)
    }
}

impl EvalArgs {
    /// Loads the model and resolves where a fitted calibration goes.
    fn job(self) -> anyhow::Result<crate::eval::EvalJob> {
        let m = &self.model;
        let Loaded {
            spec,
            model,
            labels,
            calibration,
            ..
        } = m.load(Vec::new())?;
        let calibration_out = match (self.calibration_out, self.calibrate) {
            (Some(p), _) => Some(p),
            (None, true) => Some(ModelArgs::adapter_calibration_path(&spec.adapters).context(
                "--calibrate writes beside the last adapter, and there is no local adapter directory: \
                 pass --calibration-out",
            )?),
            (None, false) => None,
        };
        Ok(crate::eval::EvalJob {
            name: spec.model,
            model,
            labels,
            calibration,
            prompt_template: m.prompt.prompt_template.clone(),
            engine: EngineConfig {
                max_batch_tokens: m.max_batch_size * m.max_input_tokens,
                ..m.engine_config()
            },
            data: self.data,
            text_column: self.text_column,
            label_column: self.label_column,
            out: self.out,
            calibration_out,
        })
    }
}

impl ModelArgs {
    /// The model these options name (see [`model::resolve`]).
    pub fn spec(&self) -> anyhow::Result<ModelSpec> {
        if self.max_input_tokens < 2 || self.max_batch_size == 0 {
            bail!("--max-input-tokens must be >= 2 and --max-batch-size >= 1");
        }
        let choice = model::resolve::ModelChoice {
            model: self.base.model.clone(),
            revision: self.base.revision.clone(),
            adapters: self.adapters.clone(),
            no_adapter: self.no_adapter,
            device: self.base.device.clone(),
            dtype: self.dtype.clone(),
            quantize: self.quantize.clone(),
        };
        Ok(choice.resolve()?)
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

    /// `calibration.json` in the last adapter's directory, when that is a local directory.
    pub fn adapter_calibration_path(adapters: &[AdapterSpec]) -> Option<PathBuf> {
        adapters
            .last()
            .map(|a| PathBuf::from(&a.source))
            .filter(|dir| dir.is_dir())
            .map(|dir| dir.join(calibration::FILE_NAME))
    }

    /// Loads the model with `variants` and the label sets, each calibrated when a calibration
    /// applies.
    pub fn load(&self, variants: Vec<model::VariantSpec>) -> anyhow::Result<Loaded> {
        let mut spec = self.spec()?;
        spec.variants = variants;
        self.prompt.template()?;
        let loaded = model::load(&spec, &HubConfig::from_env())
            .with_context(|| format!("cannot load model `{}`", spec.model))?;
        let (labels, calibration) =
            self.labels(&loaded, self.calibration.clone(), &spec.adapters)?;
        let variant_labels = spec
            .variants
            .iter()
            .map(|v| {
                self.labels(&loaded, None, &v.adapters)
                    .with_context(|| format!("variant `{}`", v.name))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Loaded {
            spec,
            model: loaded,
            labels,
            calibration,
            variant_labels,
        })
    }

    /// `--labels`, calibrated by `explicit` or else by `calibration.json` beside the last of
    /// `adapters`, if there is one.
    fn labels(
        &self,
        loaded: &LoadedModel,
        explicit: Option<PathBuf>,
        adapters: &[AdapterSpec],
    ) -> anyhow::Result<(LabelSet, Option<(PathBuf, Calibration)>)> {
        let mut labels = self.prompt.label_set(&loaded.tokenizer)?;
        let path =
            explicit.or_else(|| Self::adapter_calibration_path(adapters).filter(|p| p.is_file()));
        let Some(path) = path else {
            return Ok((labels, None));
        };
        let c = Calibration::load(&path)?;
        c.check_fits(&path, &self.prompt.labels, &self.prompt.prompt_template)?;
        labels = labels.with_temperature(c.temperature)?;
        tracing::info!(file = %path.display(), temperature = c.temperature, "sentiment scores calibrated");
        Ok((labels, Some((path, c))))
    }
}

pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let pieces = match &cli.command {
        Some(Command::Train(args)) => crate::train::parallel_pieces(&args.base.device),
        _ => 1,
    };
    // Named so that profiles and `top -H` tell the compute pool (matmuls, vocabulary-wide work)
    // from tokio's workers; it reads `RAYON_NUM_THREADS`, so it comes after `parallel_pieces`.
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("finserve-pool-{i}"))
        .build_global()
        .context("cannot start the compute thread pool")?;
    let _telemetry = crate::telemetry::init(cli.json_logs, cli.otlp_endpoint.as_deref())?;
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Merge(args)) => crate::export::run(args.model.spec()?, &args.out),
        Some(Command::Eval(args)) => crate::eval::run(args.job()?),
        Some(Command::Train(args)) => args.run(pieces),
        Some(Command::Openapi) => {
            let doc = crate::http::openapi::default_json().map_err(anyhow::Error::msg)?;
            println!("{doc}");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> anyhow::Result<()> {
    std::sync::LazyLock::force(&METRICS);
    let m = &args.model;
    if args.max_batch_tokens < m.max_input_tokens {
        bail!(
            "--max-batch-tokens must be at least --max-input-tokens so every valid input fits a batch"
        );
    }
    let limits = HttpLimits {
        api_key: args.api_key()?,
        max_body_bytes: args.max_body_bytes,
        max_concurrent_requests: args.max_concurrent_requests.max(1),
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        cors_allow_origin: args.cors_allow_origin.clone(),
        max_failed_batches: args.max_failed_batches.max(1),
        metrics_on_api: args.metrics_port.is_none(),
        model_name: args.model_name(),
        request: args.request_limits()?,
    };
    let state = AppState::new(limits);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    tracing::info!(address = %listener.local_addr()?, "listening (not ready until the model is loaded)");
    let metrics_listener = match args.metrics_port {
        Some(port) => {
            let l = tokio::net::TcpListener::bind((args.host.as_str(), port))
                .await
                .with_context(|| {
                    format!("cannot listen on {}:{port} (--metrics-port)", args.host)
                })?;
            tracing::info!(metrics_address = %l.local_addr()?, "serving /metrics");
            Some(l)
        }
        None => None,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stop_wait = stop_rx.clone();
    let server = tokio::spawn(crate::http::serve(
        listener,
        metrics_listener,
        state.clone(),
        async move {
            let _ = stop_wait.wait_for(|s| *s).await;
        },
        Duration::from_secs(args.shutdown_timeout),
    ));
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let load_args = args.clone();
    let request_limits = state.limits.request.clone();
    let max_failed_batches = state.limits.max_failed_batches;
    let loading = tokio::task::spawn_blocking(move || {
        start_engine(&load_args, request_limits, max_failed_batches)
    });
    let mut stopped = stop_rx.clone();
    tokio::select! {
        loaded = loading => {
            let (engine, info) = loaded.context("model loading task failed")??;
            let _ = state.info.set(info);
            let _ = state.engine.set(engine);
            state.ready.store(true, Ordering::SeqCst);
            tracing::info!("ready");
        }
        _ = stopped.wait_for(|s| *s) => {
            tracing::info!("stopped while loading");
        }
    }
    server.await.context("server task failed")??;
    signal.abort();
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Loads and merges the model, starts the engine and warms it up with one request of each kind.
fn start_engine(
    args: &ServeArgs,
    request: RequestLimits,
    max_failed_batches: usize,
) -> anyhow::Result<(Engine, InfoResponse)> {
    let m = &args.model;
    let name = args.model_name();
    if let Some(v) = args.variants.iter().find(|v| v.name == name) {
        bail!(
            "--variant {}: the default model is already served as `{name}` (see --served-model-name)",
            v.name
        );
    }
    let Loaded {
        spec,
        model: loaded,
        labels,
        calibration,
        variant_labels,
    } = m.load(args.variants.clone())?;
    METRICS.model_load_seconds.set(loaded.load_seconds);
    METRICS.merge_seconds.set(loaded.merge_seconds);
    tracing::info!(
        seconds = loaded.load_seconds,
        merge_seconds = loaded.merge_seconds,
        adapters = loaded.reports.len(),
        variants = loaded.variants.len(),
        weight_bytes = loaded.weight_bytes,
        quantize = spec.quantize.as_str(),
        "model loaded"
    );
    let config = EngineConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_batch_wait: Duration::from_millis(args.max_batch_wait_ms),
        queue_capacity: args.max_concurrent_requests.max(1) * request.max_client_batch_size,
        ..m.engine_config()
    };
    let calibration_info = |c: &Option<(PathBuf, Calibration)>| {
        c.as_ref().map(|(path, c)| CalibrationInfo {
            temperature: c.temperature,
            file: path.display().to_string(),
        })
    };
    let info = InfoResponse {
        model_id: spec.model.clone(),
        model_revision: spec.revision.clone(),
        model_dir: loaded.dir.display().to_string(),
        model_type: loaded
            .model
            .config()
            .model_type
            .clone()
            .unwrap_or_else(|| "t5".into()),
        adapters: loaded.reports.clone(),
        dtype: format!("{:?}", spec.dtype).to_lowercase(),
        quantize: spec.quantize.as_str().to_string(),
        device: m.base.device.clone(),
        labels: labels.names.clone(),
        prompt_template: m.prompt.prompt_template.clone(),
        vocab_size: loaded.tokenizer.get_vocab_size(true),
        calibration: calibration_info(&calibration),
        name: name.clone(),
        unshared_bytes: loaded.unshared_bytes,
        variants: loaded
            .variants
            .iter()
            .zip(&variant_labels)
            .map(|(v, (_, c))| VariantInfo {
                name: v.name.clone(),
                adapters: v.reports.clone(),
                unshared_bytes: v.unshared_bytes,
                calibration: calibration_info(c),
            })
            .collect(),
        weight_bytes: loaded.weight_bytes,
        limits: Limits {
            max_input_tokens: m.max_input_tokens,
            max_new_tokens: request.max_new_tokens,
            max_batch_size: m.max_batch_size,
            max_batch_tokens: args.max_batch_tokens,
            max_batch_wait_ms: args.max_batch_wait_ms,
            max_client_batch_size: request.max_client_batch_size,
            max_concurrent_requests: args.max_concurrent_requests,
            max_body_bytes: args.max_body_bytes,
            request_timeout_ms: args.request_timeout_ms,
            max_total_tokens: request.max_total_tokens,
            max_stop_sequences: request.max_stop_sequences,
            max_stop_length: request.max_stop_length,
            max_failed_batches,
            max_candidate_labels: request.max_candidate_labels,
            max_label_length: request.max_label_length,
            chunk_overlap: request.chunk_overlap,
            max_chunks_per_input: request.max_chunks_per_input,
            truncation_direction: request.truncation_direction,
        },
        load_seconds: loaded.load_seconds,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let served = std::iter::once(Served {
        name,
        backend: T5Backend::new(loaded.model),
        labels,
    })
    .chain(
        loaded
            .variants
            .into_iter()
            .zip(variant_labels)
            .map(|(v, (labels, _))| Served {
                name: v.name,
                backend: T5Backend::new(v.model),
                labels,
            }),
    )
    .collect();
    let engine = Engine::start(served, Arc::new(loaded.tokenizer), config)?;
    for variant in 0..engine.variants().len() {
        warm_up(&engine, variant)?;
    }
    Ok((engine, info))
}

fn warm_up(engine: &Engine, variant: usize) -> anyhow::Result<()> {
    let text = "Operating profit rose .";
    let scores = engine.sentiment_text(text, variant)?.blocking_recv()??;
    let name = &engine.variants()[variant].name;
    tracing::info!(variant = %name, probs = ?scores.scores.probs, "warm-up sentiment done");
    let params = crate::engine::generate::GenerateParams {
        max_new_tokens: 2,
        ..Default::default()
    };
    let mut rx = engine.generate(engine.tokenize(text, None)?, params, variant)?;
    while let Some(event) = rx.blocking_recv() {
        match event {
            crate::engine::GenerateEvent::End(_) => break,
            crate::engine::GenerateEvent::Error(e) => bail!("warm-up generation failed: {e}"),
            crate::engine::GenerateEvent::Token(_) => {}
        }
    }
    Ok(())
}
