//! The inference core between HTTP and the model: one dedicated thread owns the loaded model and
//! runs the [`batcher`]; callers (HTTP handlers, `finserve eval`) tokenize on their side and talk
//! to it through a bounded queue, getting results back on per-request channels.
//!
//! Nothing here knows about HTTP: requests arrive as token ids plus validated parameters, and
//! errors are [`crate::error::Error`]s.

pub mod backend;
pub mod batcher;
pub mod generate;
pub mod sentiment;
pub mod validation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::metrics::METRICS;
use crate::model::t5::T5Model;
use generate::{FinishReason, GenerateParams};
use sentiment::{LabelScores, LabelSet};

/// Limits and batching knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    /// Upper bound on padded encoder tokens (longest input x batch size) per batch.
    pub max_batch_tokens: usize,
    pub max_batch_wait: Duration,
    /// Requests that may wait in the queue before new ones are refused.
    pub queue_capacity: usize,
    pub max_input_tokens: usize,
    pub max_new_tokens: usize,
    pub prompt_template: String,
}

/// How long a request waited and how long the model worked on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub queue: Duration,
    pub inference: Duration,
}

#[derive(Debug, Clone)]
pub struct SentimentOutput {
    pub scores: LabelScores,
    pub timing: Timing,
}

/// One generated token as reported to clients.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub tokens: Vec<TokenInfo>,
    pub seed: Option<u64>,
    pub timing: Timing,
}

/// What a generate request receives, in order: tokens as they are produced, then one `End` or `Error`.
#[derive(Debug, Clone)]
pub enum GenerateEvent {
    Token(TokenInfo),
    End(GenerateOutput),
    Error(String),
}

pub(crate) struct SentimentJob {
    pub ids: Vec<u32>,
    pub reply: oneshot::Sender<Result<SentimentOutput>>,
    pub enqueued: Instant,
}

pub(crate) struct GenerateJob {
    pub ids: Vec<u32>,
    pub params: GenerateParams,
    pub events: mpsc::UnboundedSender<GenerateEvent>,
    pub enqueued: Instant,
}

pub(crate) enum Job {
    Sentiment(SentimentJob),
    Generate(GenerateJob),
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    tokenizer: Arc<Tokenizer>,
    labels: Arc<LabelSet>,
    config: Arc<EngineConfig>,
    alive: Arc<AtomicBool>,
    eos: u32,
}

impl Engine {
    /// Starts the engine thread for `model`. The thread ends when every handle is dropped and the
    /// work already queued is done.
    pub fn start(
        model: Arc<T5Model>,
        tokenizer: Arc<Tokenizer>,
        labels: LabelSet,
        config: EngineConfig,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity.max(1));
        let alive = Arc::new(AtomicBool::new(true));
        let labels = Arc::new(labels);
        let config = Arc::new(config);
        let eos = model.config().eos_token_ids()[0];
        let batcher = batcher::Batcher::new(
            backend::T5Backend::new(model),
            tokenizer.clone(),
            labels.clone(),
            config.clone(),
            rx,
        );
        let flag = alive.clone();
        std::thread::Builder::new()
            .name("finserve-engine".into())
            .spawn(move || {
                // Cleared however the thread ends, so health checks see a dead engine.
                struct Alive(Arc<AtomicBool>);
                impl Drop for Alive {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::SeqCst);
                    }
                }
                let _alive = Alive(flag);
                batcher.run();
            })
            .map_err(|e| Error::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx,
            tokenizer,
            labels,
            config,
            alive,
            eos,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn labels(&self) -> &LabelSet {
        &self.labels
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Encodes `text` (EOS appended). An input over `max_input_tokens` is refused unless
    /// `truncate_to` is given, in which case it is cut to that many tokens (at most
    /// `max_input_tokens`), keeping the start and the final EOS. CPU-bound: call it off the async runtime.
    pub fn tokenize(&self, text: &str, truncate_to: Option<usize>) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(Error::Validation("`inputs` must not be empty".into()));
        }
        let mut ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        let max = self.config.max_input_tokens;
        let limit = truncate_to.map_or(max, |n| n.clamp(1, max));
        if ids.len() > limit {
            if truncate_to.is_none() {
                return Err(Error::Validation(format!(
                    "input has {} tokens, more than max_input_tokens ({max}); set `truncate` to cut it",
                    ids.len()
                )));
            }
            ids.truncate(limit - 1);
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// The text of one token id as the tokenizer decodes it.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Applies the prompt template, then tokenizes (`truncate` cuts at `max_input_tokens`).
    pub fn tokenize_sentiment(&self, text: &str, truncate: bool) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(Error::Validation(
                "`inputs` must not contain empty strings".into(),
            ));
        }
        let prompt = self.config.prompt_template.replace("{text}", text);
        self.tokenize(&prompt, truncate.then_some(self.config.max_input_tokens))
    }

    fn submit(&self, job: Job) -> Result<()> {
        if !self.is_alive() {
            return Err(Error::EngineDown);
        }
        match self.tx.try_send(job) {
            Ok(()) => {
                METRICS.queue_size.inc();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Error::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(Error::EngineDown),
        }
    }

    /// Queues one input for label scoring; the receiver yields its scores.
    pub fn sentiment(&self, ids: Vec<u32>) -> Result<oneshot::Receiver<Result<SentimentOutput>>> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Sentiment(SentimentJob {
            ids,
            reply,
            enqueued: Instant::now(),
        }))?;
        Ok(rx)
    }

    /// Queues a generation; dropping the receiver cancels it at the next decode step.
    pub fn generate(
        &self,
        ids: Vec<u32>,
        params: GenerateParams,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        let (events, rx) = mpsc::unbounded_channel();
        self.submit(Job::Generate(GenerateJob {
            ids,
            params,
            events,
            enqueued: Instant::now(),
        }))?;
        Ok(rx)
    }
}
