//! What a served model is made of, for `serve` and `eval` alike: the merged base (and variants),
//! each with its sentiment labels, calibrated by `calibration.json` beside its last adapter (or
//! the file named for the default model) when there is one, and its target template
//! (`target_template.json`, found the same way).

use std::path::PathBuf;

use anyhow::Context;
use tokenizers::Tokenizer;

use crate::calibration::{self, Calibration};
use crate::engine::backend::T5Backend;
use crate::engine::prompt::Template;
use crate::engine::sentiment::LabelSet;
use crate::engine::targets::{self, TargetTemplate};
use crate::engine::{Engine, Served};
use crate::hub::HubConfig;
use crate::model::digest::FileDigest;
use crate::model::lora::AdapterSpec;
use crate::model::{self, LoadedModel, ModelSpec, digest};

/// A model to load, as the command line resolved it.
#[derive(Debug, Clone)]
pub struct ModelJob {
    pub spec: ModelSpec,
    /// The sentiment labels (`--labels`) and the template they are scored in.
    pub labels: Vec<String>,
    pub prompt_template: String,
    /// A calibration file for the default model (`--calibration`), instead of the adapter's.
    pub calibration: Option<PathBuf>,
    /// A target template for the default model (`--target-template`), instead of the adapter's.
    pub target_template: Option<PathBuf>,
}

/// A target template and the file it came from.
pub type FoundTemplate = Option<(PathBuf, TargetTemplate)>;

/// A label set and the calibration it was given, if any.
pub type CalibratedLabels = (LabelSet, Option<(PathBuf, Calibration)>);

/// A loaded model with the labels and digest of each served model (the default first, then each
/// variant).
pub struct Loaded {
    pub model: LoadedModel,
    pub labels: Vec<CalibratedLabels>,
    pub target_templates: Vec<FoundTemplate>,
    /// `sha256:HEX` over everything that decides each served model's outputs ([`model::digest`]).
    pub digests: Vec<String>,
}

/// `name` in the last adapter's directory, when that is a local directory.
pub fn beside_adapter(adapters: &[AdapterSpec], name: &str) -> Option<PathBuf> {
    adapters
        .last()
        .map(|a| PathBuf::from(&a.source))
        .filter(|dir| dir.is_dir())
        .map(|dir| dir.join(name))
}

impl ModelJob {
    /// Loads and merges the model and resolves every served model's labels; with `keep_base`,
    /// the base stays in memory to merge variants from at runtime.
    pub fn load(&self, keep_base: bool) -> anyhow::Result<Loaded> {
        Template::new(&self.prompt_template).context("--prompt-template")?;
        let spec = &self.spec;
        let loaded = model::load(spec, &HubConfig::from_env(), keep_base)
            .with_context(|| format!("cannot load model `{}`", spec.model))?;
        let tokenizer = &loaded.tokenizer;
        let mut labels = vec![self.labels(tokenizer, self.calibration.clone(), &spec.adapters)?];
        let mut target_templates = vec![Self::target_template(
            self.target_template.clone(),
            &spec.adapters,
        )?];
        for v in &spec.variants {
            let context = || format!("variant `{}`", v.name);
            labels.push(
                self.labels(tokenizer, None, &v.adapters)
                    .with_context(context)?,
            );
            target_templates.push(Self::target_template(None, &v.adapters).with_context(context)?);
        }
        let adapters = std::iter::once((&spec.adapters, &loaded.reports)).chain(
            spec.variants
                .iter()
                .zip(&loaded.variants)
                .map(|(v, m)| (&v.adapters, &m.reports)),
        );
        let digests = adapters
            .zip(labels.iter().zip(&target_templates))
            .map(|((specs, reports), ((_, calibration), target_template))| {
                self.digest(
                    &loaded.files,
                    specs,
                    reports,
                    calibration.as_ref().map(|(p, _)| p),
                    target_template.as_ref().map(|(p, _)| p),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Loaded {
            model: loaded,
            labels,
            target_templates,
            digests,
        })
    }

    /// The digest of one served model: the base's files, dtype and quantization, its adapters'
    /// weights and files, the labels, template, calibration file and target template file (see
    /// [`model::digest`]).
    pub fn digest(
        &self,
        base_files: &[FileDigest],
        adapters: &[AdapterSpec],
        reports: &[model::lora::MergeReport],
        calibration: Option<&PathBuf>,
        target_template: Option<&PathBuf>,
    ) -> anyhow::Result<String> {
        let mut lines: Vec<String> = digest::file_lines(base_files).collect();
        lines.push(format!("dtype {}", self.spec.dtype.as_str()));
        lines.push(format!("quantize {}", self.spec.quantize.as_str()));
        for (a, r) in adapters.iter().zip(reports) {
            lines.push(format!("adapter {}", a.weight));
            lines.extend(digest::file_lines(&r.files));
        }
        lines.push(format!("labels {}", serde_json::to_string(&self.labels)?));
        lines.push(format!(
            "template {}",
            serde_json::to_string(&self.prompt_template)?
        ));
        lines.push(match calibration {
            Some(path) => format!("calibration {}", digest::file(path)?.sha256),
            None => "calibration none".into(),
        });
        // Absent for a model without one, so that such a model's digest stays what it was.
        if let Some(path) = target_template {
            lines.push(format!("target_template {}", digest::file(path)?.sha256));
        }
        Ok(digest::combine(lines))
    }

    /// `--labels`, calibrated by `explicit` or else by `calibration.json` beside the last of
    /// `adapters`, if there is one.
    pub fn labels(
        &self,
        tokenizer: &Tokenizer,
        explicit: Option<PathBuf>,
        adapters: &[AdapterSpec],
    ) -> anyhow::Result<CalibratedLabels> {
        let labels = LabelSet::new(&self.labels, tokenizer)?;
        labels.check_distinct().context("--labels")?;
        let path = explicit
            .or_else(|| beside_adapter(adapters, calibration::FILE_NAME).filter(|p| p.is_file()));
        let Some(path) = path else {
            return Ok((labels, None));
        };
        let c = Calibration::load(&path)?;
        c.check_fits(&path, &self.labels, &self.prompt_template)?;
        let labels = labels.with_temperature(c.temperature)?;
        tracing::info!(file = %path.display(), temperature = c.temperature, "sentiment scores calibrated");
        Ok((labels, Some((path, c))))
    }
}

impl ModelJob {
    /// `explicit`, or else `target_template.json` beside the last of `adapters`, if there is
    /// one; a file without its placeholders is refused.
    pub fn target_template(
        explicit: Option<PathBuf>,
        adapters: &[AdapterSpec],
    ) -> anyhow::Result<FoundTemplate> {
        let path = explicit
            .or_else(|| beside_adapter(adapters, targets::FILE_NAME).filter(|p| p.is_file()));
        let Some(path) = path else {
            return Ok(None);
        };
        let template = TargetTemplate::load(&path)?;
        tracing::info!(file = %path.display(), "target template read");
        Ok(Some((path, template)))
    }
}

impl Loaded {
    /// The engine's served models: the default one named `name`, then each variant.
    pub fn served(self, name: String) -> (Vec<Served<T5Backend>>, tokenizers::Tokenizer) {
        let Self {
            model,
            labels,
            target_templates,
            digests,
        } = self;
        let variants = model.variants.into_iter().map(|v| (v.name, v.model));
        let served = std::iter::once((name, model.model))
            .chain(variants)
            .zip(labels.into_iter().zip(target_templates))
            .zip(digests)
            .map(
                |(((name, m), ((labels, _), target_template)), digest)| Served {
                    name,
                    backend: T5Backend::new(m),
                    labels,
                    digest,
                    target_template: target_template.map(|(_, t)| t),
                },
            )
            .collect();
        (served, model.tokenizer)
    }
}

/// Refuses a `--chunk-overlap` that leaves the windows of a long input in the server's template
/// no room to advance. The template's own tokens are counted around a one-letter text, so a
/// text whose edges merge with the template's may differ by a token.
pub fn check_chunk_overlap(engine: &Engine) -> anyhow::Result<()> {
    let config = engine.config();
    let overlap = config.limits.chunk_overlap;
    let template = engine
        .pieces("x", true, Some(engine.template()))?
        .iter()
        .filter(|p| p.span.is_none())
        .count();
    let window = config.max_input_tokens.saturating_sub(template);
    if overlap >= window {
        anyhow::bail!(
            "--chunk-overlap ({overlap}) must be less than the input tokens of a window \
             ({window}: --max-input-tokens {} minus the prompt template's {template} tokens)",
            config.max_input_tokens
        );
    }
    Ok(())
}
