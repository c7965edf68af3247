//! Label scoring: the probability that the model generates each label's exact token sequence.
//!
//! Each label's target is the tokenizer's encoding of the label text, EOS included (what PEFT
//! training fed as `labels`). The score is the teacher-forced sum of full-vocabulary
//! log-softmaxes, renormalised over the label set (softmax of the log-likelihoods, divided by the
//! set's calibration temperature when `finserve eval --calibrate` fitted one).
//!
//! A batch costs one encoder pass and one decoder pass: each input's decoder is fed the whole
//! trie of label targets at once (one node per distinct prefix, attending to its ancestors:
//! `T5Model::decode_tree`), so a prefix shared by several labels is computed once and the
//! encoder output is never copied per label. Every node's hidden state is exactly one row that
//! needs the vocabulary projection (for `negative` / `neutral` / `positive` with EOS: the shared
//! first position plus one per label), all in one matmul, so `lm_head` is read once per batch;
//! the normaliser and the target logits are read from the logits where they lie (`model::ops`),
//! and only per-row numbers come back.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::ops::{log_z, pick};
use crate::model::t5::T5Model;

/// The labels a sentiment request is scored against, with their target token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelSet {
    pub names: Vec<String>,
    pub targets: Vec<Vec<u32>>,
    /// Softmax temperature of the scores: 1, or what calibration fitted for this set.
    pub temperature: f64,
    /// Distinct target prefixes as `(label, length)`: the first label that has the prefix.
    prefixes: Vec<(usize, usize)>,
    /// `prefix_of[label][pos]`: index in `prefixes` of `targets[label][..pos]`.
    prefix_of: Vec<Vec<usize>>,
}

impl LabelSet {
    /// Tokenizes each label (EOS appended, as PEFT training fed it).
    pub fn new(names: &[String], tokenizer: &Tokenizer) -> Result<Self> {
        let targets = names
            .iter()
            .map(|name| {
                Ok(tokenizer
                    .encode(name.as_str(), true)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?
                    .get_ids()
                    .to_vec())
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_targets(names.to_vec(), targets)
    }

    /// A label set from already tokenized targets. One label is a likelihood (its probability
    /// is 1; its log-probability is what counts); a classification needs two or more, which
    /// the callers that classify check.
    pub fn from_targets(names: Vec<String>, targets: Vec<Vec<u32>>) -> Result<Self> {
        if names.is_empty() || names.len() != targets.len() {
            return Err(Error::InvalidArgument(
                "at least one label, each with its target tokens, is needed".into(),
            ));
        }
        for (i, (name, ids)) in names.iter().zip(&targets).enumerate() {
            if crate::engine::is_blank(name) || names[..i].contains(name) {
                return Err(Error::InvalidArgument(format!(
                    "label `{name}` is blank or repeated"
                )));
            }
            if ids.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "label `{name}` encodes to no tokens"
                )));
            }
        }
        let mut prefixes: Vec<(usize, usize)> = Vec::new();
        let prefix_of = targets
            .iter()
            .enumerate()
            .map(|(label, target)| {
                (0..target.len())
                    .map(|len| {
                        let same =
                            |&(l, n): &(usize, usize)| n == len && targets[l][..n] == target[..len];
                        prefixes.iter().position(same).unwrap_or_else(|| {
                            prefixes.push((label, len));
                            prefixes.len() - 1
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            names,
            targets,
            temperature: 1.0,
            prefixes,
            prefix_of,
        })
    }

    /// Refuses fewer than two labels (nothing to classify), and labels the tokenizer cannot
    /// tell apart (e.g. both only unknown-token): they would always score the same. The
    /// server's own labels must pass; a request's may not, its scores are exact either way.
    pub fn check_distinct(&self) -> Result<()> {
        if self.names.len() < 2 {
            return Err(Error::InvalidArgument(
                "at least two labels are needed to classify".into(),
            ));
        }
        for (i, ids) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(ids) {
                return Err(Error::InvalidArgument(format!(
                    "label `{}` has the same tokens as another label",
                    self.names[i]
                )));
            }
        }
        Ok(())
    }

    /// The same labels, their scores calibrated by `temperature` (> 0).
    pub fn with_temperature(mut self, temperature: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "a calibration temperature must be positive (got {temperature})"
            )));
        }
        self.temperature = temperature;
        Ok(self)
    }
}

/// Softmax of `log_probs / temperature`: label probabilities.
pub fn softmax(log_probs: &[f64], temperature: f64) -> Vec<f64> {
    let scaled: Vec<f64> = log_probs.iter().map(|l| l / temperature).collect();
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = scaled.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Per-input scores, in label-set order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelScores {
    /// Summed log-probability of each label's target sequence.
    pub log_probs: Vec<f64>,
    /// `log_probs` renormalised over the labels (sums to 1), with the set's temperature.
    pub probs: Vec<f64>,
}

/// Scores every input against `labels` in one encoder and one decoder pass.
pub fn score(model: &T5Model, inputs: &[&[u32]], labels: &LabelSet) -> Result<Vec<LabelScores>> {
    let b = inputs.len();
    let encoded = model.encode(inputs)?;
    let rows: Vec<usize> = (0..b).collect();
    let mut batch = model.new_batch();
    let slots = model.join(&mut batch, &encoded, &rows)?;
    // The label trie, one node per distinct prefix: its token is the prefix's last (the
    // decoder start for the empty one), its parent the prefix one shorter.
    let start = model.config().decoder_start_token_id();
    let (nodes, parents): (Vec<u32>, Vec<Option<usize>>) = labels
        .prefixes
        .iter()
        .map(|&(label, len)| match len {
            0 => (start, None),
            _ => (
                labels.targets[label][len - 1],
                Some(labels.prefix_of[label][len - 1]),
            ),
        })
        .unzip();
    let tokens: Vec<(usize, Vec<u32>)> = slots.iter().map(|&s| (s, nodes.clone())).collect();
    let hidden = model.decode_tree(&mut batch, &tokens, &parents)?;
    let p = nodes.len();
    let rows = hidden.reshape((b * p, hidden.dim(2)?))?;
    let logits = model.logits(&rows)?;
    let log_z = log_z(&logits)?;
    // (projected row, target token) of every label position of every input, in output order.
    let picks: Vec<(usize, u32)> = (0..b)
        .flat_map(|i| {
            labels
                .targets
                .iter()
                .enumerate()
                .flat_map(move |(label, target)| {
                    target
                        .iter()
                        .enumerate()
                        .map(move |(pos, &tok)| (i * p + labels.prefix_of[label][pos], tok))
                })
        })
        .collect();
    let mut values = pick(&logits, &picks)?
        .into_iter()
        .zip(&picks)
        .map(|(x, &(row, _))| x - log_z[row]);
    (0..b)
        .map(|_| {
            let log_probs: Vec<f64> = labels
                .targets
                .iter()
                .map(|t| values.by_ref().take(t.len()).map(f64::from).sum())
                .collect();
            let probs = softmax(&log_probs, labels.temperature);
            // NaN or infinite logits (a broken checkpoint or device) would otherwise reach
            // clients as `null` scores.
            if !probs.iter().all(|p| p.is_finite()) {
                return Err(Error::Inference(format!(
                    "the model produced non-finite label log-likelihoods {log_probs:?}"
                )));
            }
            Ok(LabelScores { probs, log_probs })
        })
        .collect()
}
