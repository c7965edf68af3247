//! Label scoring: the probability that the model generates each label's exact token sequence.
//!
//! Each label's target is the tokenizer's encoding of the label text, EOS included (what PEFT
//! training fed as `labels`). The score is the teacher-forced sum of full-vocabulary
//! log-softmaxes, renormalised over the label set. One encoder pass per batch; the decoder walks a
//! trie of the targets, so a prefix shared by several labels is computed once.

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::t5::{DecoderState, T5Model};

/// The labels a sentiment request is scored against, with their target token ids.
#[derive(Debug, Clone)]
pub struct LabelSet {
    pub names: Vec<String>,
    pub targets: Vec<Vec<u32>>,
}

impl LabelSet {
    pub fn new(names: &[String], tokenizer: &Tokenizer) -> Result<Self> {
        if names.len() < 2 {
            return Err(Error::Config("at least two labels are needed".into()));
        }
        let mut targets = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if name.trim().is_empty() || names[..i].contains(name) {
                return Err(Error::Config(format!(
                    "label `{name}` is empty or repeated"
                )));
            }
            let ids = tokenizer
                .encode(name.as_str(), true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec();
            if ids.is_empty() {
                return Err(Error::Config(format!(
                    "label `{name}` encodes to no tokens"
                )));
            }
            if targets.contains(&ids) {
                return Err(Error::Config(format!(
                    "label `{name}` has the same tokens as another label"
                )));
            }
            targets.push(ids);
        }
        Ok(Self {
            names: names.to_vec(),
            targets,
        })
    }
}

/// Per-input scores, in label-set order.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScores {
    /// Summed log-probability of each label's target sequence.
    pub log_probs: Vec<f64>,
    /// `log_probs` renormalised over the labels (sums to 1).
    pub probs: Vec<f64>,
}

/// Scores every encoded input of `states` (one per input, fresh from `start_decoder`).
pub fn score(
    model: &T5Model,
    states: Vec<DecoderState>,
    labels: &LabelSet,
) -> Result<Vec<LabelScores>> {
    let n = states.len();
    let mut totals = vec![vec![0f64; labels.targets.len()]; n];
    let all: Vec<usize> = (0..labels.targets.len()).collect();
    let start = model.config().decoder_start_token_id();
    walk(model, states, start, 0, &all, labels, &mut totals)?;
    Ok(totals
        .into_iter()
        .map(|log_probs| {
            let max = log_probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = log_probs.iter().map(|l| (l - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            LabelScores {
                probs: exp.into_iter().map(|e| e / sum).collect(),
                log_probs,
            }
        })
        .collect())
}

/// Feeds `token` to every state, adds the log-probability of position `depth` to the labels in
/// `group` (which all share the prefix fed so far) and recurses into each distinct next token.
fn walk(
    model: &T5Model,
    mut states: Vec<DecoderState>,
    token: u32,
    depth: usize,
    group: &[usize],
    labels: &LabelSet,
    totals: &mut [Vec<f64>],
) -> Result<()> {
    let tokens = vec![vec![token]; states.len()];
    let mut refs: Vec<&mut DecoderState> = states.iter_mut().collect();
    let logits = model.decode(&mut refs, &tokens)?;
    let log_probs: Tensor = T5Model::last_log_probs(&logits)?;
    let log_probs: Vec<Vec<f32>> = log_probs.to_vec2()?;
    let mut branches: Vec<(u32, Vec<usize>)> = Vec::new();
    for &label in group {
        let target = labels.targets[label][depth];
        for (input, lp) in log_probs.iter().enumerate() {
            totals[input][label] += f64::from(lp[target as usize]);
        }
        if labels.targets[label].len() > depth + 1 {
            match branches.iter_mut().find(|(t, _)| *t == target) {
                Some((_, members)) => members.push(label),
                None => branches.push((target, vec![label])),
            }
        }
    }
    let last = branches.len().saturating_sub(1);
    for (i, (next, members)) in branches.into_iter().enumerate() {
        // The last branch can take the states; the others need their own copy of the cache.
        let branch_states = if i == last {
            std::mem::take(&mut states)
        } else {
            states.clone()
        };
        walk(
            model,
            branch_states,
            next,
            depth + 1,
            &members,
            labels,
            totals,
        )?;
    }
    Ok(())
}
