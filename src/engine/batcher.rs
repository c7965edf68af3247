//! The engine thread's loop: forms batches from the queue and runs them on the model.
//!
//! Scheduling policy:
//! - Sentiment requests are batched dynamically: when the engine is free, everything waiting is
//!   taken, capped by `max_batch_size` inputs and `max_batch_tokens` padded tokens (longest input
//!   x batch size), so a lone request never waits; `max_batch_wait` can trade latency for fuller
//!   batches when nothing else is running.
//! - Generation is continuously batched: the running batch advances one decode step at a time;
//!   between steps, waiting requests are encoded and join (same caps), finished or cancelled
//!   sequences leave at once.
//! - Fairness: when both kinds have work, the engine alternates one sentiment batch with one
//!   decode step, so neither starves the other.
//!
//! A panic while running a batch fails that batch's requests and the loop goes on.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokenizers::Tokenizer;

use super::generate::{FinishReason, Sampler, stop_hit};
use super::sentiment::{LabelSet, score};
use super::{
    EngineConfig, GenerateEvent, GenerateJob, GenerateOutput, Job, SentimentJob, SentimentOutput,
    Timing, TokenInfo,
};
use crate::error::{Error, Result};
use crate::metrics::METRICS;
use crate::model::t5::{DecoderState, Encoded, T5Model};

/// A generation in the running batch.
struct Running {
    job: GenerateJob,
    state: DecoderState,
    sampler: Sampler,
    /// Decoder tokens so far, decoder start first.
    context: Vec<u32>,
    tokens: Vec<TokenInfo>,
    /// Length of the decoded text so far, to cut each new token's text out of it.
    text_len: usize,
    queue_time: Duration,
    started: Instant,
}

pub(crate) struct Batcher {
    model: Arc<T5Model>,
    tokenizer: Arc<Tokenizer>,
    labels: Arc<LabelSet>,
    config: Arc<EngineConfig>,
    rx: Receiver<Job>,
    open: bool,
    sentiment: VecDeque<SentimentJob>,
    waiting: VecDeque<GenerateJob>,
    running: Vec<Running>,
    sentiment_turn: bool,
}

/// Pads `inputs` to the longest, returning the id tensor and the true lengths.
fn pad_batch(model: &T5Model, inputs: &[&[u32]]) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let max = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
    let pad = model.config().pad_token_id();
    let flat: Vec<u32> = inputs
        .iter()
        .flat_map(|i| {
            i.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, max - i.len()))
        })
        .collect();
    let ids = Tensor::from_vec(flat, (inputs.len(), max), model.device())?;
    Ok((ids, inputs.iter().map(|i| i.len()).collect()))
}

/// Encodes a batch and starts one decoder per input.
pub fn start_batch(model: &T5Model, inputs: &[&[u32]]) -> candle_core::Result<Vec<DecoderState>> {
    let (ids, lengths) = pad_batch(model, inputs)?;
    let encoded: Vec<Encoded> = model.encode(&ids, &lengths)?;
    encoded.iter().map(|e| model.start_decoder(e)).collect()
}

/// How many of the queued lengths fit one batch under both caps (at least one).
fn fits(
    lengths: impl Iterator<Item = usize>,
    max_size: usize,
    max_tokens: usize,
    already: usize,
) -> usize {
    let mut longest = 0;
    let mut n = 0;
    for len in lengths {
        let size = already + n + 1;
        longest = longest.max(len);
        if size > max_size || (n > 0 && longest * (n + 1) > max_tokens) {
            break;
        }
        n += 1;
    }
    n
}

/// Removes queued jobs whose client has gone, counting them.
fn drop_cancelled<T>(queue: &mut VecDeque<T>, gone: impl Fn(&T) -> bool, kind: &str) {
    let before = queue.len();
    queue.retain(|j| !gone(j));
    let n = before - queue.len();
    if n > 0 {
        METRICS
            .cancelled
            .with_label_values(&[kind])
            .inc_by(n as u64);
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Batcher {
    pub(crate) fn new(
        model: Arc<T5Model>,
        tokenizer: Arc<Tokenizer>,
        labels: Arc<LabelSet>,
        config: Arc<EngineConfig>,
        rx: Receiver<Job>,
    ) -> Self {
        Self {
            model,
            tokenizer,
            labels,
            config,
            rx,
            open: true,
            sentiment: VecDeque::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            sentiment_turn: true,
        }
    }

    fn idle(&self) -> bool {
        self.sentiment.is_empty() && self.waiting.is_empty() && self.running.is_empty()
    }

    fn accept(&mut self, job: Job) {
        METRICS.queue_size.dec();
        match job {
            Job::Sentiment(j) => self.sentiment.push_back(j),
            Job::Generate(j) => self.waiting.push_back(j),
        }
    }

    /// Moves queued jobs into the local queues; blocks only when there is nothing to do.
    fn receive(&mut self) {
        if self.idle() {
            match self.rx.recv() {
                Ok(job) => self.accept(job),
                Err(_) => {
                    self.open = false;
                    return;
                }
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(job) => self.accept(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.open = false;
                    break;
                }
            }
        }
        let wait = self.config.max_batch_wait;
        if wait > Duration::ZERO && self.running.is_empty() && !self.sentiment.is_empty() {
            let deadline = Instant::now() + wait;
            while self.sentiment.len() < self.config.max_batch_size {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.open = false;
                        break;
                    }
                }
            }
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            self.receive();
            if self.idle() {
                if self.open {
                    continue;
                }
                return;
            }
            let generating = !self.running.is_empty() || !self.waiting.is_empty();
            if !self.sentiment.is_empty() && (self.sentiment_turn || !generating) {
                self.sentiment_batch();
                self.sentiment_turn = false;
            } else {
                self.generate_step();
                self.sentiment_turn = true;
            }
        }
    }

    fn sentiment_batch(&mut self) {
        drop_cancelled(&mut self.sentiment, |j| j.reply.is_closed(), "sentiment");
        let cfg = &self.config;
        let n = fits(
            self.sentiment.iter().map(|j| j.ids.len()),
            cfg.max_batch_size,
            cfg.max_batch_tokens,
            0,
        );
        if n == 0 {
            return;
        }
        let jobs: Vec<SentimentJob> = self.sentiment.drain(..n).collect();
        let start = Instant::now();
        let longest = jobs.iter().map(|j| j.ids.len()).max().unwrap_or(0);
        METRICS
            .batch_size
            .with_label_values(&["sentiment"])
            .observe(n as f64);
        METRICS
            .batch_tokens
            .with_label_values(&["sentiment"])
            .observe((longest * n) as f64);
        let (model, labels) = (&self.model, &self.labels);
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<_> {
            let inputs: Vec<&[u32]> = jobs.iter().map(|j| j.ids.as_slice()).collect();
            score(model, start_batch(model, &inputs)?, labels)
        }));
        let inference = start.elapsed();
        match result {
            Ok(Ok(scores)) => {
                for (job, scores) in jobs.into_iter().zip(scores) {
                    let timing = Timing {
                        queue: start.duration_since(job.enqueued),
                        inference,
                    };
                    let _ = job.reply.send(Ok(SentimentOutput { scores, timing }));
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "sentiment batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(Error::Inference(e.to_string())));
                }
            }
            Err(p) => {
                let msg = panic_message(p);
                tracing::error!(panic = %msg, "sentiment batch panicked");
                for job in jobs {
                    let _ = job.reply.send(Err(Error::EngineDown));
                }
            }
        }
    }

    /// Encodes waiting requests that fit next to the running batch and adds them to it.
    fn admit(&mut self) -> Result<()> {
        drop_cancelled(&mut self.waiting, |j| j.events.is_closed(), "generate");
        let cfg = &self.config;
        let n = fits(
            self.waiting.iter().map(|j| j.ids.len()),
            cfg.max_batch_size,
            cfg.max_batch_tokens,
            self.running.len(),
        );
        if n == 0 {
            return Ok(());
        }
        let jobs: Vec<GenerateJob> = self.waiting.drain(..n).collect();
        let longest = jobs.iter().map(|j| j.ids.len()).max().unwrap_or(0);
        METRICS
            .batch_tokens
            .with_label_values(&["generate"])
            .observe((longest * n) as f64);
        let started = Instant::now();
        let inputs: Vec<&[u32]> = jobs.iter().map(|j| j.ids.as_slice()).collect();
        let states = start_batch(&self.model, &inputs)?;
        let start_token = self.model.config().decoder_start_token_id();
        for (job, state) in jobs.into_iter().zip(states) {
            self.running.push(Running {
                sampler: Sampler::new(job.params.clone()),
                queue_time: started.duration_since(job.enqueued),
                job,
                state,
                context: vec![start_token],
                tokens: Vec::new(),
                text_len: 0,
                started,
            });
        }
        Ok(())
    }

    fn generate_step(&mut self) {
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            self.admit()?;
            let before = self.running.len();
            self.running.retain(|r| !r.job.events.is_closed());
            METRICS
                .cancelled
                .with_label_values(&["generate"])
                .inc_by((before - self.running.len()) as u64);
            if self.running.is_empty() {
                return Ok(());
            }
            METRICS
                .batch_size
                .with_label_values(&["generate"])
                .observe(self.running.len() as f64);
            let tokens: Vec<Vec<u32>> = self
                .running
                .iter()
                .map(|r| vec![*r.context.last().unwrap_or(&0)])
                .collect();
            let mut states: Vec<&mut DecoderState> =
                self.running.iter_mut().map(|r| &mut r.state).collect();
            let logits = self.model.decode(&mut states, &tokens)?;
            let logits: Vec<Vec<Vec<f32>>> = logits.to_vec3()?;
            let mut finished = Vec::new();
            let eos = self.model.config().eos_token_ids();
            for (i, (r, l)) in self.running.iter_mut().zip(logits).enumerate() {
                if let Some(reason) = advance(&self.tokenizer, &eos, r, &l[0])? {
                    finished.push((i, reason));
                }
            }
            for (i, reason) in finished.into_iter().rev() {
                let r = self.running.swap_remove(i);
                self.finish(r, reason)?;
            }
            Ok(())
        }));
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(p) => panic_message(p),
        };
        tracing::error!(error = %error, "generation step failed; failing the running batch");
        for r in self.running.drain(..) {
            let _ = r
                .job
                .events
                .send(GenerateEvent::Error(format!("inference failed: {error}")));
        }
    }

    fn finish(&self, r: Running, reason: FinishReason) -> Result<()> {
        let inference = r.started.elapsed();
        let n = r.tokens.len();
        METRICS.generated_tokens.inc_by(n as u64);
        METRICS
            .time_per_output_token
            .observe(inference.as_secs_f64() / n.max(1) as f64);
        let output = GenerateOutput {
            generated_text: decode(&self.tokenizer, &r.context[1..])?,
            finish_reason: reason,
            tokens: r.tokens,
            seed: r.sampler.seed,
            timing: Timing {
                queue: r.queue_time,
                inference,
            },
        };
        let _ = r.job.events.send(GenerateEvent::End(output));
        Ok(())
    }
}

/// Picks the next token of `r`, reports it, and says whether the sequence is done.
fn advance(
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    r: &mut Running,
    logits: &[f32],
) -> Result<Option<FinishReason>> {
    let (id, logprob) = r.sampler.next(logits, &r.context);
    r.context.push(id);
    let eos = eos_ids.contains(&id);
    let text = decode(tokenizer, &r.context[1..])?;
    let token = TokenInfo {
        id,
        text: if eos {
            tokenizer.id_to_token(id).unwrap_or_default()
        } else {
            text.get(r.text_len..).unwrap_or_default().to_string()
        },
        logprob,
        special: eos,
    };
    r.text_len = text.len();
    r.tokens.push(token.clone());
    let _ = r.job.events.send(GenerateEvent::Token(token));
    Ok(if eos {
        Some(FinishReason::EosToken)
    } else if stop_hit(&text, &r.sampler.params().stop) {
        Some(FinishReason::StopSequence)
    } else if r.tokens.len() >= r.sampler.params().max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    })
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::fits;

    #[test]
    fn batches_respect_size_and_padded_token_caps() {
        assert_eq!(fits([5, 5, 5].into_iter(), 8, 100, 0), 3);
        assert_eq!(fits([5, 5, 5].into_iter(), 2, 100, 0), 2);
        // 10 x 3 = 30 > 25: the third does not fit.
        assert_eq!(fits([5, 10, 3].into_iter(), 8, 25, 0), 2);
        // A single input over the token cap still runs alone.
        assert_eq!(fits([50, 1].into_iter(), 8, 25, 0), 1);
        // Next to 3 running sequences only one more fits a batch of 4.
        assert_eq!(fits([1, 1].into_iter(), 4, 100, 3), 1);
        assert_eq!(fits([1].into_iter(), 4, 100, 4), 0);
    }
}
