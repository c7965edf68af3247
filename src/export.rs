//! `finserve merge`: the merged model written back in Hugging Face format (`config.json`,
//! `model.safetensors`, tokenizer files), loadable by `AutoModelForSeq2SeqLM.from_pretrained`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::hub::HubConfig;
use crate::model::{self, ModelSpec};

/// Files copied unchanged from the base model when present.
const COPIED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
];

/// Merges `spec`'s adapters into its base and writes the result to `out`.
pub fn run(mut spec: ModelSpec, out: &Path) -> anyhow::Result<()> {
    // Export always merges on the CPU in f32, whatever the serving settings are.
    spec.dtype = DType::F32;
    spec.device = Device::Cpu;
    let merged = model::load_merged(&spec, &HubConfig::from_env())
        .with_context(|| format!("cannot load and merge `{}`", spec.model))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for name in COPIED {
        let src = merged.dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name))
                .with_context(|| format!("cannot copy {} to {}", src.display(), out.display()))?;
        }
    }
    let tensors: HashMap<String, Tensor> = merged.weights.into_tensors()?;
    let n = tensors.len();
    let path = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let report = out.join("finserve_merge.json");
    std::fs::write(&report, serde_json::to_string_pretty(&merged.reports)?)
        .with_context(|| format!("cannot write {}", report.display()))?;
    tracing::info!(out = %out.display(), tensors = n, adapters = merged.reports.len(), "merged model written");
    Ok(())
}
