//! Teacher-forced likelihood: how probable the model finds a given output (a reference answer)
//! for an input, the measure behind a generation's loss and perplexity.
//!
//! It is the sentiment scorer's computation with one "label", the reference: the same queue,
//! batching and decoder pass, so it is as exact as label scores are. The input is tokenized as
//! a generation's is (no prompt template); the reference gets EOS appended, as training feeds
//! targets.

use super::job::Priority;
use super::sentiment::LabelSet;
use super::{Engine, infer::off_runtime};
use crate::error::{Error, Field, Limit, Result};

/// An input and the output whose likelihood is asked for.
#[derive(Debug, Clone, Default)]
pub struct LikelihoodQuery {
    pub text: String,
    pub reference: String,
    /// A served variant's name; `None` is the default model.
    pub variant: Option<String>,
    pub priority: Priority,
}

/// The reference's summed log-probability and its length in tokens (EOS included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Likelihood {
    pub log_prob: f64,
    pub tokens: usize,
}

impl Engine {
    /// The log-probability of `query.reference` given `query.text`, summed over its tokens.
    pub async fn likelihood(&self, query: LikelihoodQuery) -> Result<Likelihood> {
        let variant = self.variant(query.variant.as_deref())?;
        let engine = self.clone();
        let reference = query.reference.clone();
        let (ids, labels) = off_runtime(move || {
            let ids = engine.tokenize(&query.text, None)?;
            Ok((ids, engine.reference(&query.reference)?))
        })
        .await?;
        let tokens = labels.targets[0].len();
        let receiver = self
            .sentiment_all(vec![ids], labels.into(), &variant, query.priority)?
            .pop()
            .ok_or_else(|| Error::Inference("the likelihood's receiver is missing".into()))?;
        let out = receiver.await.map_err(|_| Error::EngineDown)??;
        let log_prob = out.scores.log_probs[0];
        if !log_prob.is_finite() {
            return Err(Error::Inference(format!(
                "the model gave the reference {reference:?} a non-finite log-probability"
            )));
        }
        Ok(Likelihood { log_prob, tokens })
    }

    /// `reference` as a one-label set: its tokens, EOS appended, within `max_new_tokens` (what
    /// one generation may produce).
    fn reference(&self, reference: &str) -> Result<LabelSet> {
        if super::is_blank(reference) {
            return Err(Error::invalid(
                Field::Reference,
                "must contain a non-blank character",
            ));
        }
        let ids = self
            .tokenizer
            .encode(reference, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        let max = self.config.limits.max_new_tokens;
        if ids.len() > max {
            return Err(Error::over_limit(
                Field::Reference,
                Limit::MaxNewTokens,
                max,
                format!("the reference has {} tokens, more than {max}", ids.len()),
            ));
        }
        LabelSet::from_targets(vec![reference.to_string()], vec![ids])
    }
}
