//! The seam between scheduling and the model. The [`batcher`](super::batcher) decides *what* runs
//! (which requests share a batch, who joins or leaves the running generation, fairness, recovery);
//! a [`Backend`] runs it. [`T5Backend`] is the real one; the batcher's tests drive a fake.

use std::sync::Arc;

use candle_core::Tensor;

use super::generate::Sampler;
use super::sentiment::{self, LabelScores, LabelSet};
use crate::error::{Error, Result};
use crate::model::decode_batch::DecodeBatch;
use crate::model::ops::row_stats;
use crate::model::t5::T5Model;

/// One running sequence's part in a decode step.
pub struct StepRow<'a> {
    pub slot: usize,
    /// Decoder tokens so far, decoder start first; the last one is fed this step.
    pub context: &'a [u32],
    pub sampler: &'a mut Sampler,
}

/// A chosen token and its model log-probability (computed unless the step needed only the
/// argmax, see [`Sampler::needs_only_argmax`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub id: u32,
    pub logprob: Option<f32>,
}

/// What the engine thread needs from a model.
pub trait Backend {
    /// Label scores of each input (one encoder and one decoder pass).
    fn score(&mut self, inputs: &[&[u32]], labels: &LabelSet) -> Result<Vec<LabelScores>>;
    /// Encodes `inputs` and adds them to the running generation batch; returns their slots.
    fn join(&mut self, inputs: &[&[u32]]) -> Result<Vec<usize>>;
    /// Advances every running sequence by one token (all of them, each exactly once); returns
    /// the choices in the order of `rows`.
    fn step(&mut self, rows: &mut [StepRow<'_>]) -> Result<Vec<Choice>>;
    /// Removes a sequence from the running batch (the others stay where they are).
    fn leave(&mut self, slot: usize);
    /// Drops the whole running batch, after a failed step left it in an unknown state.
    fn reset(&mut self);
    fn decoder_start(&self) -> u32;
    fn eos_ids(&self) -> &[u32];
}

/// A served variant's model as the engine thread owns it: variants come and go at runtime, so
/// their backends travel to it boxed.
pub type DynBackend = Box<dyn Backend + Send>;

/// The T5 model with its running generation batch.
pub struct T5Backend {
    model: Arc<T5Model>,
    batch: DecodeBatch,
    eos: Vec<u32>,
}

impl T5Backend {
    pub fn new(model: Arc<T5Model>) -> Self {
        Self {
            batch: model.new_batch(),
            eos: model.config().eos_token_ids(),
            model,
        }
    }
}

impl Backend for T5Backend {
    fn score(&mut self, inputs: &[&[u32]], labels: &LabelSet) -> Result<Vec<LabelScores>> {
        sentiment::score(&self.model, inputs, labels)
    }

    fn join(&mut self, inputs: &[&[u32]]) -> Result<Vec<usize>> {
        let encoded = self.model.encode(inputs)?;
        let rows: Vec<usize> = (0..inputs.len()).collect();
        Ok(self.model.join(&mut self.batch, &encoded, &rows)?)
    }

    fn step(&mut self, rows: &mut [StepRow<'_>]) -> Result<Vec<Choice>> {
        let tokens = rows
            .iter()
            .map(|r| match r.context.last() {
                Some(&t) => Ok((r.slot, vec![t])),
                None => Err(Error::Inference(format!(
                    "slot {} has no decoder input",
                    r.slot
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let hidden = self.model.decode(&mut self.batch, &tokens)?.squeeze(1)?;
        if rows.iter().all(|r| r.sampler.needs_only_argmax())
            && let Some(ids) = self.model.greedy_tokens(&hidden)?
        {
            let choice = |id| Choice { id, logprob: None };
            return Ok(ids.into_iter().map(choice).collect());
        }
        choose(&self.model.logits(&hidden)?, rows)
    }

    fn leave(&mut self, slot: usize) {
        self.batch.free(slot);
    }

    fn reset(&mut self) {
        self.batch = self.model.new_batch();
    }

    fn decoder_start(&self) -> u32 {
        self.model.config().decoder_start_token_id()
    }

    fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
}

/// Picks each row's token from `logits` `(rows, vocab)` where they are: greedy rows take the
/// argmax (and, when asked, its log-probability) on the device (two numbers per row come back);
/// only rows that sample or penalise repetition copy their logits row to the host for their
/// [`Sampler`].
fn choose(logits: &Tensor, rows: &mut [StepRow<'_>]) -> Result<Vec<Choice>> {
    let greedy: Vec<u32> = (0..rows.len() as u32)
        .filter(|&i| rows[i as usize].sampler.is_plain_greedy())
        .collect();
    let mut choices = vec![None; rows.len()];
    if !greedy.is_empty() {
        let g = if greedy.len() == rows.len() {
            logits.clone()
        } else {
            let n = greedy.len();
            logits.index_select(&Tensor::from_vec(greedy.clone(), n, logits.device())?, 0)?
        };
        let wants = |row: u32| !rows[row as usize].sampler.needs_only_argmax();
        let stats = row_stats(&g, greedy.iter().any(|&row| wants(row)))?;
        for (i, &row) in greedy.iter().enumerate() {
            let max = stats.max[i];
            if !max.is_finite() {
                return Err(non_finite(stats.argmax[i], max));
            }
            let logprob = match &stats.log_z {
                Some(log_z) if wants(row) => Some(max - log_z[i]),
                _ => None,
            };
            choices[row as usize] = Some(Choice {
                id: stats.argmax[i],
                logprob,
            });
        }
    }
    for (i, r) in rows.iter_mut().enumerate() {
        if choices[i].is_none() {
            let row: Vec<f32> = logits.get(i)?.to_vec1()?;
            let (id, logprob) = r.sampler.next(&row, r.context);
            choices[i] = Some(Choice {
                id,
                logprob: Some(logprob),
            });
        }
    }
    let choices: Vec<Choice> = choices.into_iter().flatten().collect();
    if let Some((id, logprob)) = choices
        .iter()
        .find_map(|c| c.logprob.filter(|l| !l.is_finite()).map(|l| (c.id, l)))
    {
        return Err(non_finite(id, logprob));
    }
    Ok(choices)
}

/// A row holding a NaN or an infinity has no meaningful argmax: refused instead.
fn non_finite(id: u32, value: f32) -> Error {
    Error::Inference(format!(
        "the model produced non-finite logits (token {id}: {value})"
    ))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::engine::generate::GenerateParams;

    #[test]
    fn non_finite_logits_are_an_error_not_token_zero() {
        let logits = Tensor::new(&[[0.5f32, 2.0, 1.0], [f32::NAN; 3]], &Device::Cpu).unwrap();
        for params in [
            GenerateParams::default(),
            GenerateParams {
                logprobs: true,
                ..Default::default()
            },
            GenerateParams {
                do_sample: true,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let mut samplers = [Sampler::new(params.clone()), Sampler::new(params)];
            let context = [0u32];
            let mut rows: Vec<StepRow<'_>> = samplers
                .iter_mut()
                .enumerate()
                .map(|(slot, sampler)| StepRow {
                    slot,
                    context: &context,
                    sampler,
                })
                .collect();
            let err = choose(&logits, &mut rows).unwrap_err();
            assert!(err.to_string().contains("non-finite logits"), "{err}");
            let mut first = rows.into_iter().take(1).collect::<Vec<_>>();
            let ok = choose(&logits.narrow(0, 0, 1).unwrap(), &mut first).unwrap();
            assert!(ok[0].logprob.is_none_or(f32::is_finite));
        }
    }
}
