//! PEFT LoRA adapters merged into the base weights at load time: `W <- W + scale · B·A`.
//!
//! The rules follow PEFT (`peft.tuners.lora`, `check_target_module_exists`, `get_pattern_key`):
//! which modules an adapter targets, the per-module rank and alpha, the rsLoRA scale,
//! `layers_to_transform`, `exclude_modules` and `modules_to_save`. Anything we cannot merge exactly
//! (DoRA, LoRA biases, non-LoRA adapters, tensors that fit nothing) is refused with the file and
//! tensor named, because serving a silently different model is worse than not starting.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::weights::{WeightFiles, Weights, for_each_tensor};
use crate::error::{Error, Result};

/// PEFT's default LoRA targets for T5 and mT5.
const DEFAULT_TARGETS: &[&str] = &["q", "v"];

/// The `adapter_config.json` fields that change the merge. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Used by training only; merging ignores it.
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<Targets>,
    #[serde(default)]
    pub exclude_modules: Option<Targets>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub layers_to_transform: Option<Layers>,
    #[serde(default)]
    pub layers_pattern: Option<Targets>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// Does PEFT apply LoRA to the module called `key` (e.g. `encoder.block.0.layer.0.SelfAttention.q`)?
    /// `cfg_file` names this config in errors.
    pub fn targets(&self, key: &str, cfg_file: &Path) -> Result<bool> {
        let c = self;
        let listed = |list: &[String]| {
            list.iter()
                .any(|t| key == t || key.ends_with(&format!(".{t}")))
        };
        match &c.exclude_modules {
            Some(Targets::Regex(r)) if anchored(r, cfg_file)?.is_match(key) => return Ok(false),
            Some(Targets::List(l)) if listed(l) => return Ok(false),
            _ => {}
        }
        if self.is_saved_module(key, cfg_file)? {
            return Ok(false);
        }
        let list = match &c.target_modules {
            Some(Targets::Regex(r)) if r == "all-linear" => return Ok(key != "lm_head"),
            Some(Targets::Regex(r)) => return Ok(anchored(r, cfg_file)?.is_match(key)),
            Some(Targets::List(l)) => l.clone(),
            None => DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        };
        if list.iter().any(|t| t == key) {
            return Ok(true);
        }
        if !listed(&list) {
            return Ok(false);
        }
        let Some(layers) = c.layers_to_transform.as_ref().filter(|l| !l.is_empty()) else {
            return Ok(true);
        };
        // PEFT takes the first numbered segment (`block.N`), or the one after `layers_pattern`.
        let patterns: Vec<String> = match &c.layers_pattern {
            None => vec![],
            Some(Targets::Regex(p)) if p.is_empty() => vec![],
            Some(Targets::Regex(p)) => vec![p.clone()],
            Some(Targets::List(l)) => l.clone(),
        };
        let index = if patterns.is_empty() {
            Regex::new(r"^.*?\.[^.]*\.(\d+)\.")
                .ok()
                .and_then(|re| re.captures(key).map(|c| c[1].to_string()))
        } else {
            let mut found = None;
            for p in &patterns {
                let re = Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\.")).map_err(|e| {
                    Error::adapter(cfg_file.display(), format!("layers_pattern `{p}`: {e}"))
                })?;
                if let Some(c) = re.captures(key) {
                    found = Some(c[1].to_string());
                    break;
                }
            }
            found
        };
        Ok(index
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| layers.contains(i)))
    }

    fn is_saved_module(&self, key: &str, cfg_file: &Path) -> Result<bool> {
        for m in self.modules_to_save.iter().flatten() {
            let re = Regex::new(&format!(r"^(?:|.*\.){m}(?:$|\..*)")).map_err(|e| {
                Error::adapter(cfg_file.display(), format!("modules_to_save `{m}`: {e}"))
            })?;
            if re.is_match(key) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

/// `target_modules`: a list of name suffixes, or one regex that must match the whole name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    Regex(String),
    List(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    One(usize),
    Many(Vec<usize>),
}

impl Layers {
    fn contains(&self, i: usize) -> bool {
        match self {
            Self::One(x) => *x == i,
            Self::Many(v) => v.contains(&i),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Self::Many(v) if v.is_empty())
    }
}

/// Python's `re.fullmatch` / anchored `re.match` through the Rust regex engine.
fn anchored(pattern: &str, file: &Path) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        Error::adapter(
            file.display(),
            format!("pattern `{pattern}` is not a supported regex: {e}"),
        )
    })
}

/// `--adapter PATH[:WEIGHT]`: an adapter directory or Hub id and the factor its update is scaled by.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub source: String,
    pub weight: f64,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some((source, w)) = s.rsplit_once(':')
            && let Ok(weight) = w.parse::<f64>()
        {
            if !weight.is_finite() {
                return Err(format!("adapter weight `{w}` must be a finite number"));
            }
            return Ok(Self {
                source: source.to_string(),
                weight,
            });
        }
        Ok(Self {
            source: s.to_string(),
            weight: 1.0,
        })
    }
}

/// What one merged adapter did, for the startup log and `/info`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MergeReport {
    pub adapter: String,
    pub weight: f64,
    pub base_model_name_or_path: Option<String>,
    pub modules_merged: usize,
    /// Distinct ranks used (JSON object keys, so strings), with how many modules each.
    #[schema(value_type = BTreeMap<String, usize>)]
    pub ranks: BTreeMap<usize, usize>,
    /// Distinct effective scales (`weight · alpha / r`, or `/ sqrt(r)` with rsLoRA).
    pub scales: Vec<f64>,
    pub modules_replaced: Vec<String>,
    pub seconds: f64,
    /// The adapter's `adapter_config.json` and weight file with their SHA-256.
    pub files: Vec<super::digest::FileDigest>,
}

/// An adapter directory read from disk, not yet merged.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    weights_file: PathBuf,
    tensors: HashMap<String, Tensor>,
}

/// The LoRA factors of one module.
struct LoraPair {
    a: Tensor,
    b: Tensor,
}

impl Adapter {
    /// The files it was read from: its config, then its weights.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![
            self.dir.join("adapter_config.json"),
            self.weights_file.clone(),
        ]
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| Error::adapter(config_path.display(), e))?;
        let refuse = |m: String| Err(Error::adapter(config_path.display(), m));
        match config.peft_type.as_deref() {
            Some(t) if t.eq_ignore_ascii_case("lora") => {}
            other => {
                return refuse(format!(
                    "peft_type is {other:?}; only LORA adapters can be merged"
                ));
            }
        }
        if config.use_dora {
            return refuse("use_dora is true; DoRA adapters are not supported".into());
        }
        if config.lora_bias {
            return refuse(
                "lora_bias is true; T5 linear layers have no bias to merge it into".into(),
            );
        }
        let st = dir.join("adapter_model.safetensors");
        let (weights_file, files) = if st.is_file() {
            (st.clone(), WeightFiles::Safetensors(vec![st]))
        } else {
            let bin = dir.join("adapter_model.bin");
            if !bin.is_file() {
                return Err(Error::adapter(
                    dir.display(),
                    "no adapter_model.safetensors or adapter_model.bin",
                ));
            }
            (bin.clone(), WeightFiles::Pytorch(bin))
        };
        let mut tensors = HashMap::new();
        for_each_tensor(&files, |name, t| {
            tensors.insert(name, t.to_dtype(DType::F32)?);
            Ok(())
        })
        .map_err(|e| Error::adapter(weights_file.display(), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights_file,
            tensors,
        })
    }

    fn refuse(&self, message: impl ToString) -> Error {
        Error::adapter(self.weights_file.display(), message)
    }

    /// Does PEFT apply LoRA to the module called `key`?
    fn targets(&self, key: &str) -> Result<bool> {
        self.config
            .targets(key, &self.dir.join("adapter_config.json"))
    }

    /// PEFT's `get_pattern_key`: the first pattern that matches the end of `key` at a dot boundary.
    fn pattern_value<T: Copy>(
        &self,
        patterns: &BTreeMap<String, T>,
        key: &str,
        default: T,
    ) -> Result<T> {
        for (p, v) in patterns {
            if anchored(
                &format!(r"(?:.*\.)?(?:{p})"),
                &self.dir.join("adapter_config.json"),
            )?
            .is_match(key)
            {
                return Ok(*v);
            }
        }
        Ok(default)
    }

    /// Sorts the saved tensors into LoRA pairs by module and whole replacement modules.
    #[allow(clippy::type_complexity)]
    fn split_tensors(&self) -> Result<(BTreeMap<String, LoraPair>, BTreeMap<String, Tensor>)> {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        let mut saved = BTreeMap::new();
        for (name, t) in &self.tensors {
            let key = name.strip_prefix("base_model.model.").unwrap_or(name);
            if let Some((module, rest)) = key.split_once(".lora_A.") {
                Self::check_param(name, rest)?;
                a.insert(module.to_string(), (name.clone(), t.clone()));
            } else if let Some((module, rest)) = key.split_once(".lora_B.") {
                Self::check_param(name, rest).map_err(|_| {
                    self.refuse(format!(
                        "tensor `{name}`: LoRA bias tensors are not supported (T5 linear layers have no bias)"
                    ))
                })?;
                b.insert(module.to_string(), (name.clone(), t.clone()));
            } else if key.contains("lora_embedding_") || key.contains("lora_magnitude_vector") {
                return Err(self.refuse(format!(
                    "tensor `{name}`: only LoRA on linear layers is supported"
                )));
            } else {
                // `modules_to_save` copies, saved as `lm_head.weight` (or `lm_head.modules_to_save.<name>.weight`).
                let plain = match key.split_once(".modules_to_save.") {
                    Some((module, rest)) => {
                        format!("{module}.{}", rest.rsplit('.').next().unwrap_or(rest))
                    }
                    None => key.to_string(),
                };
                saved.insert(plain, t.clone());
            }
        }
        let mut pairs = BTreeMap::new();
        for (module, (a_name, a_t)) in a {
            let Some((_, b_t)) = b.remove(&module) else {
                return Err(self.refuse(format!("tensor `{a_name}` has no matching lora_B")));
            };
            pairs.insert(module, LoraPair { a: a_t, b: b_t });
        }
        if let Some((_, (b_name, _))) = b.into_iter().next() {
            return Err(self.refuse(format!("tensor `{b_name}` has no matching lora_A")));
        }
        Ok((pairs, saved))
    }

    /// A LoRA parameter suffix is `weight` or `<adapter_name>.weight`; anything else (a bias) is refused.
    fn check_param(name: &str, rest: &str) -> Result<()> {
        if rest == "weight" || rest.ends_with(".weight") && !rest[..rest.len() - 7].contains('.') {
            Ok(())
        } else {
            Err(Error::adapter(name, "unexpected LoRA parameter"))
        }
    }

    /// Merges this adapter into `weights` (scaled by `weight`), after checking all of it first so
    /// that a refused adapter leaves the weights untouched.
    pub fn merge_into(&self, weights: &mut Weights, weight: f64) -> Result<MergeReport> {
        let start = Instant::now();
        let c = &self.config;
        if c.fan_in_fan_out {
            tracing::warn!(
                adapter = %self.dir.display(),
                "fan_in_fan_out is true but T5 layers are nn.Linear; PEFT sets it to false, and so do we"
            );
        }
        let (pairs, saved) = self.split_tensors()?;

        // Every linear module of the base, as PEFT would walk it.
        let mut modules: Vec<String> = weights
            .names()
            .filter_map(|n| n.strip_suffix(".weight"))
            .filter(|m| is_linear(m))
            .map(String::from)
            .collect();
        modules.sort();
        let mut planned = Vec::new();
        for module in &modules {
            if !self.targets(module)? {
                continue;
            }
            if !pairs.contains_key(module) {
                return Err(self.refuse(format!(
                    "adapter_config.json targets `{module}` but the file has no lora_A/lora_B for it"
                )));
            }
            planned.push(module.clone());
        }
        if planned.is_empty() && saved.is_empty() {
            return Err(self.refuse(format!(
                "no module of the base model matches target_modules {:?}",
                c.target_modules
            )));
        }
        let planned_set: BTreeSet<&String> = planned.iter().collect();
        if let Some(unused) = pairs.keys().find(|m| !planned_set.contains(m)) {
            return Err(self.refuse(format!(
                "tensor `base_model.model.{unused}.lora_A.weight` does not belong to any targeted module of the base model"
            )));
        }

        let mut ranks = BTreeMap::new();
        let mut scales = BTreeSet::new();
        let mut updates = Vec::new();
        for module in &planned {
            let pair = &pairs[module];
            let name = format!("{module}.weight");
            let (out_dim, in_dim) = match weights.shape(&name) {
                Some(&[out_dim, in_dim]) => (out_dim, in_dim),
                Some(dims) => {
                    return Err(self.refuse(format!(
                        "base tensor `{name}` has shape {dims:?}, not a matrix"
                    )));
                }
                None => return Err(self.refuse(format!("base has no `{name}`"))),
            };
            let r = self.pattern_value(&c.rank_pattern, module, c.r)?;
            let alpha = self.pattern_value(&c.alpha_pattern, module, c.lora_alpha)?;
            let (a_dims, b_dims) = (pair.a.dims().to_vec(), pair.b.dims().to_vec());
            if a_dims != [r, in_dim] || b_dims != [out_dim, r] {
                return Err(self.refuse(format!(
                    "tensors of `{module}` have shapes lora_A {a_dims:?} / lora_B {b_dims:?}, \
                     the base layer ({out_dim}x{in_dim}) with r={r} needs [{r}, {in_dim}] / [{out_dim}, {r}]"
                )));
            }
            let scale = weight
                * if c.use_rslora {
                    alpha / (r as f64).sqrt()
                } else {
                    alpha / r as f64
                };
            *ranks.entry(r).or_insert(0) += 1;
            scales.insert(scale.to_bits());
            updates.push((name, scale, pair));
        }
        let mut replacements = Vec::new();
        for (module, t) in &saved {
            let base = weights.shape(module).ok_or_else(|| {
                self.refuse(format!(
                    "tensor `{module}` (modules_to_save) does not exist in the base model"
                ))
            })?;
            if base != t.dims() {
                return Err(self.refuse(format!(
                    "tensor `{module}` has shape {:?}, the base has {base:?}",
                    t.dims(),
                )));
            }
            replacements.push((module.clone(), t.clone()));
        }

        for (name, scale, pair) in updates {
            let base = weights
                .get(&name)?
                .ok_or_else(|| self.refuse(format!("base has no `{name}`")))?;
            let merged = merge_weight(&base, &pair.a, &pair.b, scale)?;
            weights.replace(&name, merged);
        }
        let dtype = weights.dtype();
        let device = weights.device().clone();
        let mut modules_replaced = Vec::new();
        for (name, t) in replacements {
            weights.replace(&name, t.to_dtype(dtype)?.to_device(&device)?);
            modules_replaced.push(name);
        }
        Ok(MergeReport {
            adapter: self.dir.display().to_string(),
            weight,
            base_model_name_or_path: c.base_model_name_or_path.clone(),
            modules_merged: planned.len(),
            ranks,
            scales: scales.into_iter().map(f64::from_bits).collect(),
            modules_replaced,
            seconds: start.elapsed().as_secs_f64(),
            files: Vec::new(),
        })
    }
}

/// Linear layers of a T5 checkpoint (everything with a 2-D `.weight` except embeddings and norms).
fn is_linear(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(
        last,
        "q" | "k" | "v" | "o" | "wi" | "wi_0" | "wi_1" | "wo" | "lm_head"
    )
}

/// `W + scale · B·A`, computed in f32 on W's device and cast back to W's dtype.
pub fn merge_weight(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let device: &Device = w.device();
    let delta = b
        .to_device(device)?
        .to_dtype(DType::F32)?
        .matmul(&a.to_device(device)?.to_dtype(DType::F32)?)?;
    Ok((w.to_dtype(DType::F32)? + (delta * scale)?)?.to_dtype(w.dtype())?)
}

/// Applies `adapters` in order, logging each report.
pub fn merge_all(
    weights: &mut Weights,
    adapters: &[(Adapter, f64)],
    served_model: &str,
) -> Result<Vec<MergeReport>> {
    adapters
        .iter()
        .map(|(adapter, weight)| {
            if let Some(base) = &adapter.config.base_model_name_or_path
                && !served_model.ends_with(base.as_str())
                && !base.ends_with(served_model)
            {
                tracing::warn!(
                    adapter = %adapter.dir.display(),
                    trained_on = %base,
                    serving = %served_model,
                    "adapter was trained on a different base model"
                );
            }
            let report = adapter.merge_into(weights, *weight)?;
            tracing::info!(
                adapter = %report.adapter,
                weight = report.weight,
                modules = report.modules_merged,
                ranks = ?report.ranks,
                scales = ?report.scales,
                replaced = ?report.modules_replaced,
                seconds = report.seconds,
                "merged LoRA adapter"
            );
            Ok(report)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(config: &str) -> Adapter {
        Adapter {
            dir: PathBuf::from("a"),
            config: serde_json::from_str(config).unwrap(),
            weights_file: PathBuf::from("a/adapter_model.safetensors"),
            tensors: HashMap::new(),
        }
    }

    #[test]
    fn target_matching_follows_peft() {
        let a = adapter(r#"{"peft_type":"LORA","target_modules":["q","v"]}"#);
        assert!(
            a.targets("encoder.block.0.layer.0.SelfAttention.q")
                .unwrap()
        );
        assert!(
            a.targets("decoder.block.3.layer.1.EncDecAttention.v")
                .unwrap()
        );
        assert!(
            !a.targets("encoder.block.0.layer.0.SelfAttention.k")
                .unwrap()
        );
        let a = adapter(r#"{"target_modules":".*decoder.*\\.(q|v)"}"#);
        assert!(
            a.targets("decoder.block.0.layer.0.SelfAttention.q")
                .unwrap()
        );
        assert!(
            !a.targets("encoder.block.0.layer.0.SelfAttention.q")
                .unwrap()
        );
        let a = adapter(r#"{"target_modules":["q"],"layers_to_transform":[1]}"#);
        assert!(
            a.targets("encoder.block.1.layer.0.SelfAttention.q")
                .unwrap()
        );
        assert!(
            !a.targets("encoder.block.0.layer.1.EncDecAttention.q")
                .unwrap()
        );
        let a =
            adapter(r#"{"target_modules":["q"],"layers_to_transform":0,"layers_pattern":"block"}"#);
        assert!(
            a.targets("decoder.block.0.layer.1.EncDecAttention.q")
                .unwrap()
        );
        assert!(
            !a.targets("decoder.block.2.layer.0.SelfAttention.q")
                .unwrap()
        );
        let a = adapter(
            r#"{"target_modules":["q","lm_head"],"modules_to_save":["lm_head"],"exclude_modules":["EncDecAttention.q"]}"#,
        );
        assert!(!a.targets("lm_head").unwrap());
        assert!(
            !a.targets("decoder.block.0.layer.1.EncDecAttention.q")
                .unwrap()
        );
        assert!(
            a.targets("decoder.block.0.layer.0.SelfAttention.q")
                .unwrap()
        );
        let a = adapter(r#"{}"#);
        assert!(
            a.targets("encoder.block.0.layer.0.SelfAttention.v")
                .unwrap()
        );
    }

    #[test]
    fn patterns_follow_get_pattern_key() {
        let a = adapter(r#"{"rank_pattern":{"EncDecAttention.q":2,"wo":6}}"#);
        let p = &a.config.rank_pattern;
        assert_eq!(
            a.pattern_value(p, "decoder.block.0.layer.1.EncDecAttention.q", 8)
                .unwrap(),
            2
        );
        assert_eq!(
            a.pattern_value(p, "encoder.block.1.layer.1.DenseReluDense.wo", 8)
                .unwrap(),
            6
        );
        assert_eq!(
            a.pattern_value(p, "encoder.block.1.layer.0.SelfAttention.q", 8)
                .unwrap(),
            8
        );
    }

    #[test]
    fn adapter_spec_parses_optional_weight() {
        let s: AdapterSpec = "dir/a:0.5".parse().unwrap();
        assert_eq!((s.source.as_str(), s.weight), ("dir/a", 0.5));
        let s: AdapterSpec = "org/name".parse().unwrap();
        assert_eq!((s.source.as_str(), s.weight), ("org/name", 1.0));
        assert!("a:inf".parse::<AdapterSpec>().is_err());
    }
}
