//! Writing a trained adapter exactly as PEFT's `save_pretrained` does: `adapter_config.json`
//! (PEFT's field names, keys sorted) and `adapter_model.safetensors` with PEFT's tensor names
//! (`base_model.model.<module>.lora_A.weight`) and its `format: pt` metadata, so that
//! `PeftModel.from_pretrained` loads it and finserve merges it like any other adapter.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{Value, json};

use super::lora_t5::LoraPair;
use crate::error::{Error, Result};

/// The LoRA hyper-parameters an adapter was trained with.
#[derive(Debug, Clone)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// `target_modules` as PEFT stores it: a list of name suffixes, or one regex.
    pub target_modules: Value,
    pub use_rslora: bool,
    pub base_model_name_or_path: String,
}

/// `adapter_config.json` as PEFT 0.21 writes it for a LoRA on a seq2seq model.
pub fn adapter_config(s: &LoraSettings) -> Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": s.base_model_name_or_path,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": s.lora_alpha,
        "lora_bias": false,
        "lora_dropout": s.lora_dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": s.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": s.target_modules,
        "task_type": "SEQ_2_SEQ_LM",
        "use_dora": false,
        "use_rslora": s.use_rslora,
    })
}

/// Writes `loras` to `dir` (created) in PEFT's format, replacing what was there.
pub fn save(dir: &Path, settings: &LoraSettings, loras: &[&LoraPair]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&adapter_config(settings))
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::write(&config, text + "\n").map_err(|e| Error::io(&config, e))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for l in loras {
        let key = |ab: &str| format!("base_model.model.{}.lora_{ab}.weight", l.module);
        tensors.push((key("A"), l.a.as_tensor().contiguous()?));
        tensors.push((key("B"), l.b.as_tensor().contiguous()?));
    }
    let weights = dir.join("adapter_model.safetensors");
    // Written beside and renamed, so an interrupted save never leaves a torn adapter.
    let partial = dir.join("adapter_model.safetensors.partial");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        &partial,
    )
    .map_err(|e| Error::weights(partial.display(), e))?;
    std::fs::rename(&partial, &weights).map_err(|e| Error::io(&weights, e))?;
    Ok(())
}
