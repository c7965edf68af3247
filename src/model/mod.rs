//! Loading a servable model: resolve `--model` (directory or Hub id), read its config, tokenizer
//! and weights, merge the `--adapter`s, build the [`t5::T5Model`] and, with `--quantize q8`,
//! quantize its linear layers.

pub mod decode_batch;
pub mod linear;
pub mod ops;
pub mod t5;
pub mod weights;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::hub::{HubConfig, RepoKind};
use crate::lora::{self, Adapter, AdapterSpec, MergeReport};
use linear::Quantization;
use t5::{Config, T5Model};
use weights::{WeightFiles, Weights};

/// What to load and where to run it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: String,
    pub revision: Option<String>,
    pub adapters: Vec<AdapterSpec>,
    pub dtype: DType,
    pub device: Device,
    pub quantize: Quantization,
}

/// The merged checkpoint before it becomes a model: what `finserve merge` exports.
pub struct MergedCheckpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub weights: Weights,
    pub reports: Vec<MergeReport>,
}

/// A model ready to serve.
pub struct LoadedModel {
    pub model: T5Model,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    pub reports: Vec<MergeReport>,
    pub load_seconds: f64,
    pub merge_seconds: f64,
}

/// Parses `--dtype` for `device`: f32 anywhere, bf16 on GPU only, never f16 (T5 overflows to NaN).
pub fn parse_dtype(name: &str, device: &Device) -> Result<DType> {
    match (name, device.is_cpu()) {
        ("f32" | "float32", _) => Ok(DType::F32),
        ("bf16" | "bfloat16", false) => Ok(DType::BF16),
        ("bf16" | "bfloat16", true) => Err(Error::Config(
            "bf16 is only supported on GPU; serve f32 on CPU".into(),
        )),
        ("f16" | "float16", _) => Err(Error::Config(
            "f16 is not supported: T5/mT5 activations overflow to NaN in f16; use bf16 on GPU or f32"
                .into(),
        )),
        (other, _) => Err(Error::Config(format!("unknown dtype `{other}` (f32 or bf16)"))),
    }
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::Config(format!("unknown device `{other}` (cpu, cuda, cuda:N)"))
            })?,
    };
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Config(format!(
            "cannot open CUDA device {ordinal} ({e}); was finserve built with `--features cuda`?"
        ))
    })
}

pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: Config = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    config.validate().map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        other => other,
    })?;
    Ok(config)
}

/// Resolves, loads and merges, without building the model.
pub fn load_merged(spec: &ModelSpec, hub: &HubConfig) -> Result<MergedCheckpoint> {
    let dir = hub.resolve(&spec.model, spec.revision.as_deref(), RepoKind::Model)?;
    let config = read_config(&dir)?;
    let files = WeightFiles::discover(&dir)?;
    tracing::info!(model = %spec.model, dir = %dir.display(), files = ?files.paths(), "loading weights");
    let mut weights = Weights::load(&files, spec.dtype, &spec.device)?;
    let adapters = spec
        .adapters
        .iter()
        .map(|a| {
            let adir = hub.resolve(&a.source, None, RepoKind::Adapter)?;
            Ok((Adapter::load(&adir)?, a.weight))
        })
        .collect::<Result<Vec<_>>>()?;
    let reports = lora::merge_all(&mut weights, &adapters, &spec.model)?;
    Ok(MergedCheckpoint {
        dir,
        config,
        weights,
        reports,
    })
}

/// Everything `serve` and `eval` need: merged weights, model and tokenizer.
pub fn load(spec: &ModelSpec, hub: &HubConfig) -> Result<LoadedModel> {
    let start = Instant::now();
    let MergedCheckpoint {
        dir,
        config,
        mut weights,
        reports,
    } = load_merged(spec, hub)?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab > config.vocab_size {
        return Err(Error::Tokenizer(format!(
            "{} has {vocab} tokens but the model's vocab_size is {}",
            tokenizer_path.display(),
            config.vocab_size
        )));
    }
    let mut model = T5Model::load(config, &mut weights)?;
    if spec.quantize == Quantization::Q8 {
        model.quantize_q8()?;
        tracing::info!("linear layers and lm_head quantized to q8 (Q8_0)");
    }
    let leftover = weights.leftover();
    if !leftover.is_empty() {
        tracing::warn!(source = weights.source(), tensors = ?leftover, "checkpoint tensors not used by the model");
    }
    let merge_seconds = reports.iter().map(|r| r.seconds).sum();
    Ok(LoadedModel {
        model,
        tokenizer,
        dir,
        reports,
        load_seconds: start.elapsed().as_secs_f64(),
        merge_seconds,
    })
}
