//! Loading a servable model: resolve `--model` (directory or Hub id), read its config, tokenizer
//! and weights, merge the `--adapter`s, build the [`t5::T5Model`] and, with `--quantize q8`,
//! quantize its linear layers. Each `--variant` is merged from the same base weights and shares
//! with the others every tensor its adapters leave alone.

pub mod amx;
pub mod bf16_linear;
pub mod decode_batch;
pub mod digest;
pub mod f32_linear;
pub mod greedy;
pub mod int8;
pub mod linear;
pub mod lora;
pub mod ops;
pub mod packed_attention;
pub mod product;
pub mod resolve;
pub mod t5;
pub mod weights;
pub mod wide;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::hub::{HubConfig, RepoKind};
use digest::FileDigest;
use linear::{Quantization, SharedLayers, Storage};
use lora::{Adapter, AdapterSpec, MergeReport};
use t5::{Config, T5Model};
use weights::{WeightFiles, Weights};

/// What to load and where to run it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: String,
    pub revision: Option<String>,
    /// Merged into the default model.
    pub adapters: Vec<AdapterSpec>,
    /// Further merged variants of the same base, served next to the default one.
    pub variants: Vec<VariantSpec>,
    pub dtype: DType,
    pub device: Device,
    pub quantize: Quantization,
    /// Keep an int8 screen of an f32 `lm_head` for exact greedy steps (see [`greedy`]).
    pub greedy_screen: bool,
}

impl ModelSpec {
    /// The dtype tensors are read in: bf16 on the CPU keeps f32 activations, norms and
    /// embeddings and rounds only the linear layers' weights (see [`ModelSpec::layer_storage`]).
    fn tensor_dtype(&self) -> DType {
        match (self.dtype, self.device.is_cpu()) {
            (DType::BF16, true) => DType::F32,
            (dtype, _) => dtype,
        }
    }

    /// How the linear layers store their weights.
    fn layer_storage(&self) -> Quantization {
        match (self.dtype, self.device.is_cpu()) {
            (DType::BF16, true) => Quantization::Bf16,
            _ => self.quantize,
        }
    }
}

/// `--variant NAME=ADAPTER[:WEIGHT][+ADAPTER[:WEIGHT]...]`: a named merge of the base; no
/// adapter (`NAME=`) serves the base itself.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSpec {
    pub name: String,
    pub adapters: Vec<AdapterSpec>,
}

impl std::str::FromStr for VariantSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, adapters) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=ADAPTER[:WEIGHT][+ADAPTER[:WEIGHT]...]"))?;
        if !valid_variant_name(name) {
            return Err(format!(
                "variant name `{name}` must be 1-64 characters of letters, digits, `.`, `_`, `-` or `/`"
            ));
        }
        let adapters = adapters
            .split('+')
            .filter(|a| !a.is_empty())
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            name: name.to_string(),
            adapters,
        })
    }
}

/// Names a client can type in `adapter_id` or `model` without escaping.
pub fn valid_variant_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// The merged checkpoint before it becomes a model: what `finserve merge` exports.
pub struct MergedCheckpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub weights: Weights,
    pub reports: Vec<MergeReport>,
}

/// A named variant, built from the same base as the default model.
pub struct Variant {
    pub name: String,
    pub model: Arc<T5Model>,
    pub reports: Vec<MergeReport>,
    /// Weight bytes this variant holds that no other served model shares.
    pub unshared_bytes: usize,
}

/// A model ready to serve.
pub struct LoadedModel {
    /// The default model: the base with `--adapter`s merged.
    pub model: Arc<T5Model>,
    pub reports: Vec<MergeReport>,
    /// Weight bytes of the default model that no variant shares.
    pub unshared_bytes: usize,
    pub variants: Vec<Variant>,
    /// Weight bytes held by the default model and every variant together, each shared tensor
    /// counted once.
    pub weight_bytes: usize,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    /// The base's files: `config.json`, `tokenizer.json`, the weights (see [`digest`]).
    pub files: Vec<FileDigest>,
    /// The base, kept to merge variants from at runtime (when asked for).
    pub base: Option<Base>,
    pub load_seconds: f64,
    pub merge_seconds: f64,
}

/// Parses `--dtype` for `device`: f32 anywhere, bf16 on a GPU or on a CPU with AVX512-BF16
/// (where only the linear layers' weights are bf16), never f16 (T5 overflows to NaN).
pub fn parse_dtype(name: &str, device: &Device) -> Result<DType> {
    match (name, device.is_cpu()) {
        ("f32" | "float32", _) => Ok(DType::F32),
        ("bf16" | "bfloat16", false) => Ok(DType::BF16),
        ("bf16" | "bfloat16", true) if bf16_linear::available() => Ok(DType::BF16),
        ("bf16" | "bfloat16", true) => Err(Error::InvalidArgument(
            "bf16 on the CPU needs AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and later; \
             AMD Zen 4 and later), which this CPU lacks; serve f32 or --quantize q8"
                .into(),
        )),
        ("f16" | "float16", _) => Err(Error::InvalidArgument(
            "f16 is not supported: T5/mT5 activations overflow to NaN in f16; use bf16 on GPU or f32"
                .into(),
        )),
        (other, _) => Err(Error::InvalidArgument(format!("unknown dtype `{other}` (f32 or bf16)"))),
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
                Error::InvalidArgument(format!("unknown device `{other}` (cpu, cuda, cuda:N)"))
            })?,
    };
    Device::new_cuda(ordinal).map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot open CUDA device {ordinal} ({e}); was finserve built with `--features cuda`?"
        ))
    })
}

pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: Config = serde_json::from_str(&text)
        .map_err(|e| Error::ModelConfig(format!("{}: {e}", path.display())))?;
    config.validate().map_err(|e| match e {
        Error::ModelConfig(msg) => Error::ModelConfig(format!("{}: {msg}", path.display())),
        other => other,
    })?;
    Ok(config)
}

/// Resolves, loads and merges, without building the model.
pub fn load_merged(spec: &ModelSpec, hub: &HubConfig) -> Result<MergedCheckpoint> {
    let (dir, config, mut weights) = load_base(spec, hub, Reading::Whole)?;
    let reports = merge(&mut weights, &spec.adapters, &spec.model, hub)?;
    Ok(MergedCheckpoint {
        dir,
        config,
        weights,
        reports,
    })
}

/// A base checkpoint as read from disk: what every merge starts from, and what training freezes.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

/// Resolves and reads `spec.model` with its tokenizer, merging nothing.
pub fn load_checkpoint(spec: &ModelSpec, hub: &HubConfig) -> Result<Checkpoint> {
    checkpoint(spec, hub, Reading::Whole)
}

/// When a checkpoint's tensors are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// All at once ([`Weights::load`]).
    Whole,
    /// Each when it is taken ([`Weights::open`]).
    OnDemand,
}

fn checkpoint(spec: &ModelSpec, hub: &HubConfig, reading: Reading) -> Result<Checkpoint> {
    let (dir, config, weights) = load_base(spec, hub, reading)?;
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
    Ok(Checkpoint {
        dir,
        config,
        weights,
        tokenizer,
    })
}

/// The files of the checkpoint in `dir` that decide its outputs, in the digest's order.
fn base_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut paths = vec![dir.join("config.json"), dir.join("tokenizer.json")];
    // A sharded checkpoint's index names its shards, so it counts too.
    if !dir.join("model.safetensors").is_file() && index.is_file() {
        paths.push(index);
    }
    paths.extend(WeightFiles::discover(dir)?.paths());
    Ok(paths)
}

fn load_base(
    spec: &ModelSpec,
    hub: &HubConfig,
    reading: Reading,
) -> Result<(PathBuf, Config, Weights)> {
    let dir = hub.resolve(&spec.model, spec.revision.as_deref(), RepoKind::Model)?;
    let config = read_config(&dir)?;
    let files = WeightFiles::discover(&dir)?;
    tracing::info!(model = %spec.model, dir = %dir.display(), files = ?files.paths(), "loading weights");
    let weights = match reading {
        Reading::Whole => Weights::load(&files, spec.tensor_dtype(), &spec.device)?,
        Reading::OnDemand => Weights::open(&files, spec.tensor_dtype(), &spec.device)?,
    };
    Ok((dir, config, weights))
}

fn merge(
    weights: &mut Weights,
    adapters: &[AdapterSpec],
    model: &str,
    hub: &HubConfig,
) -> Result<Vec<MergeReport>> {
    let loaded = adapters
        .iter()
        .map(|a| {
            let adir = hub.resolve(&a.source, None, RepoKind::Adapter)?;
            Ok((Adapter::load(&adir)?, a.weight))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut reports = lora::merge_all(weights, &loaded, model)?;
    // Each adapter as it was named (a directory or a Hub id), not where the Hub cached it.
    for ((report, a), (adapter, _)) in reports.iter_mut().zip(adapters).zip(&loaded) {
        report.adapter = a.source.clone();
        report.files = digest::files(&adapter.files())?;
    }
    Ok(reports)
}

/// A base checkpoint kept to merge variants from: its tensors (safetensors ones stay in the file
/// until a merge reads them) and the layers and tensors built from them, which a variant shares
/// where its adapters leave them alone.
pub struct Base {
    config: Config,
    weights: Weights,
    layers: SharedLayers,
    model: String,
}

impl Base {
    /// Merges `adapters` into a copy of the base (tensors are shared, not copied, until an adapter
    /// changes them) and builds the model.
    pub fn build(
        &mut self,
        adapters: &[AdapterSpec],
        hub: &HubConfig,
    ) -> Result<(Arc<T5Model>, Vec<MergeReport>)> {
        let mut weights = self.weights.clone();
        let reports = merge(&mut weights, adapters, &self.model, hub)?;
        let model = T5Model::load(self.config.clone(), &mut weights, &mut self.layers)?;
        let leftover = weights.leftover();
        if !leftover.is_empty() {
            tracing::warn!(source = weights.source(), tensors = ?leftover, "checkpoint tensors not used by the model");
        }
        Ok((Arc::new(model), reports))
    }
}

/// Everything `serve` and `eval` need: the default model and every variant, merged and built
/// from one copy of the base (each shares every layer its adapters leave alone), and the tokenizer.
/// With `keep_base`, the base stays in memory to merge variants from at runtime.
pub fn load(spec: &ModelSpec, hub: &HubConfig, keep_base: bool) -> Result<LoadedModel> {
    let start = Instant::now();
    let Checkpoint {
        dir,
        config,
        weights,
        tokenizer,
    } = checkpoint(spec, hub, Reading::OnDemand)?;
    let mut base = Base {
        config,
        weights,
        layers: SharedLayers::new(spec.layer_storage()).with_greedy_screen(spec.greedy_screen),
        model: spec.model.clone(),
    };
    let (model, reports) = base.build(&spec.adapters, hub)?;
    let mut variants = Vec::new();
    for v in &spec.variants {
        let (model, reports) = base.build(&v.adapters, hub)?;
        variants.push(Variant {
            name: v.name.clone(),
            model,
            reports,
            unshared_bytes: 0,
        });
    }
    let base = keep_base.then_some(base);
    let hashing = Instant::now();
    let files = digest::files(&base_files(&dir)?)?;
    tracing::info!(
        seconds = hashing.elapsed().as_secs_f64(),
        "model files hashed"
    );
    if spec.quantize == Quantization::Q8 {
        tracing::info!("linear layers and lm_head quantized to q8 (int8 per block of 128 inputs)");
    }
    let (weight_bytes, unshared) = {
        let models: Vec<&T5Model> = std::iter::once(&*model)
            .chain(variants.iter().map(|v| &*v.model))
            .collect();
        count_bytes(&models)
    };
    for (v, bytes) in variants.iter_mut().zip(&unshared[1..]) {
        v.unshared_bytes = *bytes;
        tracing::info!(variant = %v.name, adapters = v.reports.len(), unshared_bytes = bytes, "variant merged");
    }
    let merge_seconds = std::iter::once(&reports)
        .chain(variants.iter().map(|v| &v.reports))
        .flatten()
        .map(|r| r.seconds)
        .sum();
    Ok(LoadedModel {
        model,
        reports,
        unshared_bytes: unshared[0],
        variants,
        weight_bytes,
        tokenizer,
        dir,
        files,
        base,
        load_seconds: start.elapsed().as_secs_f64(),
        merge_seconds,
    })
}

/// The bytes of every distinct weight allocation of `models`, and per model those no other
/// model holds.
pub fn count_bytes(models: &[&T5Model]) -> (usize, Vec<usize>) {
    let mut holders: HashMap<Storage, (usize, BTreeSet<usize>)> = HashMap::new();
    for (i, m) in models.iter().enumerate() {
        for (storage, bytes) in m.storages() {
            holders
                .entry(storage)
                .or_insert((bytes, BTreeSet::new()))
                .1
                .insert(i);
        }
    }
    let mut unshared = vec![0; models.len()];
    for (bytes, who) in holders.values() {
        if let [only] = who.iter().collect::<Vec<_>>()[..] {
            unshared[*only] += bytes;
        }
    }
    (holders.values().map(|(b, _)| b).sum(), unshared)
}
