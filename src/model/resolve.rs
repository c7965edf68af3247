//! From a model as a user names it (a directory, a Hub id or nothing; adapters; device, dtype and
//! quantization as text) to the [`ModelSpec`] the loader takes. Naming no model means the bundled
//! demo base with its adapter, found under the working directory or `FINSERVE_HOME`. Every
//! command that loads a model (serve, eval, merge, train) resolves it here; the CLI only fills
//! in a [`ModelChoice`].

use std::path::PathBuf;

use super::linear::Quantization;
use super::{ModelSpec, parse_device, parse_dtype};
use crate::error::{Error, Result};
use crate::model::lora::AdapterSpec;

/// Where the demo model lives, relative to the working directory or `FINSERVE_HOME`.
const DEMO_BASE: &str = "models/demo/base";
const DEMO_ADAPTER: &str = "models/demo/adapter";

/// A model as named on the command line or in the environment.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    /// A local directory or Hub id; `None` for the bundled demo.
    pub model: Option<String>,
    pub revision: Option<String>,
    /// Merged in order; empty with no `model` means the demo adapter.
    pub adapters: Vec<AdapterSpec>,
    /// Merge no adapter at all, not even the demo's.
    pub no_adapter: bool,
    pub device: String,
    pub dtype: String,
    pub quantize: String,
    /// See [`ModelSpec::greedy_screen`].
    pub greedy_screen: bool,
}

impl ModelChoice {
    pub fn resolve(&self) -> Result<ModelSpec> {
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype, &device)?;
        let quantize = Quantization::parse(&self.quantize)?;
        if quantize == Quantization::Q8 && !device.is_cpu() {
            return Err(Error::InvalidArgument(
                "--quantize q8 runs on the CPU only; on a GPU serve --dtype bf16 instead".into(),
            ));
        }
        if quantize == Quantization::Q8 && dtype != candle_core::DType::F32 {
            return Err(Error::InvalidArgument(
                "--quantize q8 rounds f32 weights; it does not combine with --dtype bf16".into(),
            ));
        }
        let mut adapters = self.adapters.clone();
        let model = match base(self.model.as_deref())? {
            Base::Given(m) => m,
            Base::Demo(base) => {
                tracing::warn!(
                    "serving the bundled demo model: trained on Financial PhraseBank, licensed \
                     CC BY-NC-SA 3.0 (non-commercial use only, attribution, share-alike); see \
                     models/README.md. Pass --model for your own model."
                );
                if adapters.is_empty() && !self.no_adapter {
                    adapters.push(AdapterSpec {
                        source: demo_adapter(&base)?.display().to_string(),
                        weight: 1.0,
                    });
                }
                base.display().to_string()
            }
        };
        if self.no_adapter {
            adapters.clear();
        }
        Ok(ModelSpec {
            model,
            revision: self.revision.clone(),
            adapters,
            variants: Vec::new(),
            dtype,
            device,
            quantize,
            greedy_screen: self.greedy_screen,
        })
    }
}

/// A base model as named.
enum Base {
    Given(String),
    /// No model named: the bundled demo base, found here.
    Demo(PathBuf),
}

/// `model`, or the demo base when it is `None`.
fn base(model: Option<&str>) -> Result<Base> {
    if let Some(m) = model {
        return Ok(Base::Given(m.to_string()));
    }
    find_demo(DEMO_BASE).map(Base::Demo).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no --model given and the demo model ({DEMO_BASE}) is not under the working \
             directory or $FINSERVE_HOME; pass --model DIR_OR_HUB_ID (or set FINSERVE_MODEL), \
             or run from the repository root"
        ))
    })
}

/// The demo adapter next to the demo base `base`.
fn demo_adapter(base: &std::path::Path) -> Result<PathBuf> {
    base.parent()
        .map(|demo| demo.join("adapter"))
        .filter(|a| a.is_dir())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "the demo adapter ({DEMO_ADAPTER}) is missing next to {}",
                base.display()
            ))
        })
}

/// Finds `rel` under the working directory or `FINSERVE_HOME`.
fn find_demo(rel: &str) -> Option<PathBuf> {
    let mut roots = vec![PathBuf::from(".")];
    if let Ok(home) = std::env::var("FINSERVE_HOME") {
        roots.insert(0, PathBuf::from(home));
    }
    roots.into_iter().map(|r| r.join(rel)).find(|p| p.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice() -> ModelChoice {
        ModelChoice {
            model: None,
            revision: None,
            adapters: Vec::new(),
            no_adapter: false,
            device: "cpu".into(),
            dtype: "f32".into(),
            quantize: "none".into(),
            greedy_screen: true,
        }
    }

    #[test]
    fn no_model_means_the_demo_base_with_its_adapter_unless_told_otherwise() {
        let spec = choice().resolve().unwrap();
        assert!(spec.model.ends_with(DEMO_BASE), "{}", spec.model);
        assert_eq!(spec.adapters.len(), 1);
        assert!(spec.adapters[0].source.ends_with(DEMO_ADAPTER));
        let bare = ModelChoice {
            no_adapter: true,
            ..choice()
        };
        assert!(bare.resolve().unwrap().adapters.is_empty());
    }

    #[test]
    fn a_named_model_keeps_exactly_its_adapters_and_settings() {
        let adapter = AdapterSpec {
            source: "org/adapter".into(),
            weight: 0.5,
        };
        let spec = ModelChoice {
            model: Some("org/mt0-small".into()),
            revision: Some("v2".into()),
            adapters: vec![adapter.clone()],
            quantize: "q8".into(),
            ..choice()
        }
        .resolve()
        .unwrap();
        assert_eq!(spec.model, "org/mt0-small");
        assert_eq!(spec.revision.as_deref(), Some("v2"));
        assert_eq!(spec.adapters, [adapter]);
        assert_eq!(spec.quantize, Quantization::Q8);
        let bad = ModelChoice {
            quantize: "q4".into(),
            ..choice()
        };
        assert!(bad.resolve().unwrap_err().to_string().contains("q4"));
    }
}
