//! The inference core between HTTP and the model: one dedicated thread owns the loaded model and
//! runs the [`batcher`]; callers (HTTP handlers, `finserve eval`) tokenize on their side and talk
//! to it through a bounded queue, getting results back on per-request channels.
//!
//! Nothing here knows about HTTP: requests arrive as token ids plus validated parameters, and
//! errors are [`crate::error::Error`]s.

pub mod backend;
pub mod batcher;
pub mod detokenizer;
pub mod generate;
pub mod prompt;
pub mod sentiment;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::metrics::METRICS;
use backend::Backend;
use generate::{FinishReason, GenerateParams};
use prompt::{Prompt, Template};
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
    pub prompt_template: String,
}

impl Default for EngineConfig {
    /// The `finserve serve` defaults.
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_tokens: 16384,
            max_batch_wait: Duration::ZERO,
            queue_capacity: 512,
            max_input_tokens: 512,
            prompt_template: "{text}".into(),
        }
    }
}

/// The engine thread's health, shared with every [`Engine`] handle: whether the thread runs,
/// and how many batches in a row have failed (reset by the next success).
#[derive(Debug)]
pub(crate) struct Health {
    alive: AtomicBool,
    failed_in_a_row: AtomicUsize,
}

impl Health {
    pub(crate) fn batch_done(&self, ok: bool) {
        let failed = if ok {
            self.failed_in_a_row.store(0, Ordering::SeqCst);
            0
        } else {
            METRICS.failed_batches.inc();
            self.failed_in_a_row.fetch_add(1, Ordering::SeqCst) + 1
        };
        METRICS.failed_batches_in_a_row.set(failed as i64);
    }

    fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::SeqCst);
        METRICS.engine_up.set(i64::from(alive));
    }
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

/// One token of a tokenized text (`/tokenize`).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub id: u32,
    /// The vocabulary entry (e.g. `▁profit`, `</s>`).
    pub token: String,
    pub special: bool,
    /// Byte span in the input text; `None` for special and prompt-template tokens.
    pub span: Option<(usize, usize)>,
}

/// One generated token as reported to clients. `text` is what the token adds to the generated
/// text (see [`detokenizer`]): the texts of a sequence's tokens concatenate to its
/// `generated_text`, and the EOS token adds nothing.
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

/// What a generate request receives, in order: every token but the last as it is produced, then
/// one `End` (whose `tokens` end with the last token) or `Error`.
#[derive(Debug)]
pub enum GenerateEvent {
    Token(TokenInfo),
    End(GenerateOutput),
    Error(Error),
}

pub(crate) struct SentimentJob {
    pub variant: usize,
    pub ids: Vec<u32>,
    pub labels: Arc<LabelSet>,
    pub reply: oneshot::Sender<Result<SentimentOutput>>,
    pub enqueued: Instant,
}

pub(crate) struct GenerateJob {
    pub variant: usize,
    pub ids: Vec<u32>,
    pub params: GenerateParams,
    pub events: mpsc::UnboundedSender<GenerateEvent>,
    pub enqueued: Instant,
}

pub(crate) enum Job {
    /// One request's inputs, queued in one message so that the engine never starts a batch
    /// with only the first few of them (it wakes as soon as anything arrives).
    Sentiment(Vec<SentimentJob>),
    Generate(GenerateJob),
}

impl Job {
    /// Inputs this job queues.
    fn inputs(&self) -> usize {
        match self {
            Self::Sentiment(jobs) => jobs.len(),
            Self::Generate(_) => 1,
        }
    }
}

/// Whether `text` has no character other than whitespace, by the union of Unicode's, Python's
/// and JavaScript's definitions, so that the `\S`-like pattern of the OpenAPI document
/// (`http::types::Text`) means the same to every client's validator as it does here.
pub fn is_blank(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}' | '\u{feff}'))
}

/// A model the engine serves, selected by its name: the default one first, then the merged
/// variants of the same base.
pub struct Served<B> {
    pub name: String,
    pub backend: B,
    /// Its sentiment labels, calibrated for this model when a calibration applies.
    pub labels: LabelSet,
}

/// What requests see of a served model.
#[derive(Debug)]
pub struct Variant {
    pub name: String,
    pub labels: Arc<LabelSet>,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    tokenizer: Arc<Tokenizer>,
    variants: Arc<[Variant]>,
    template: Arc<Template>,
    config: Arc<EngineConfig>,
    health: Arc<Health>,
    eos: u32,
}

impl Engine {
    /// Starts the engine thread, which owns every served model (`served`, the default first).
    /// The thread ends when every handle is dropped and the work already queued is done.
    pub fn start<B: Backend + Send + 'static>(
        served: Vec<Served<B>>,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
    ) -> Result<Self> {
        let first = served
            .first()
            .ok_or_else(|| Error::Config("the engine needs at least one model".into()))?;
        let eos = *first
            .backend
            .eos_ids()
            .first()
            .ok_or_else(|| Error::Config("the model has no EOS token id".into()))?;
        if let Some(other) = served
            .iter()
            .find(|s| s.backend.eos_ids().first() != Some(&eos))
        {
            return Err(Error::Config(format!(
                "variant `{}` has other EOS token ids than the default model",
                other.name
            )));
        }
        let mut variants = Vec::new();
        let mut lanes = Vec::new();
        for s in served {
            if variants.iter().any(|v: &Variant| v.name == s.name) {
                return Err(Error::Config(format!(
                    "two variants are named `{}`",
                    s.name
                )));
            }
            variants.push(Variant {
                name: s.name.clone(),
                labels: Arc::new(s.labels),
            });
            lanes.push(batcher::Lane::new(s.name, s.backend));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity.max(1));
        let health = Arc::new(Health {
            alive: AtomicBool::new(false),
            failed_in_a_row: AtomicUsize::new(0),
        });
        health.set_alive(true);
        health.batch_done(true);
        let template = Arc::new(Template::new(&config.prompt_template)?);
        let config = Arc::new(config);
        let batcher =
            batcher::Batcher::new(lanes, tokenizer.clone(), config.clone(), health.clone(), rx);
        let thread_health = health.clone();
        std::thread::Builder::new()
            .name("finserve-engine".into())
            .spawn(move || {
                // Cleared however the thread ends, so health checks see a dead engine.
                struct Alive(Arc<Health>);
                impl Drop for Alive {
                    fn drop(&mut self) {
                        self.0.set_alive(false);
                        if std::thread::panicking() {
                            tracing::error!(
                                "the engine thread died: every request now gets 503 and /health \
                                 reports engine_down until the server is restarted"
                            );
                        }
                    }
                }
                let _alive = Alive(thread_health);
                batcher.run();
            })
            .map_err(|e| Error::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx,
            tokenizer,
            variants: variants.into(),
            template,
            config,
            health,
            eos,
        })
    }

    pub fn is_alive(&self) -> bool {
        self.health.alive.load(Ordering::SeqCst)
    }

    /// How many batches in a row have failed (0 after any success).
    pub fn failed_batches_in_a_row(&self) -> usize {
        self.health.failed_in_a_row.load(Ordering::SeqCst)
    }

    /// The served models, the default first; a request names one by its index here.
    pub fn variants(&self) -> &[Variant] {
        &self.variants
    }

    /// The index of the variant called `name`; no name means the default model.
    pub fn variant(&self, name: Option<&str>) -> Result<usize> {
        let Some(name) = name else { return Ok(0) };
        self.variants
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.variants.iter().map(|v| v.name.as_str()).collect();
                Error::Validation(format!(
                    "`adapter_id`: no variant `{name}` is served here; the variants are {names:?}"
                ))
            })
    }

    /// The server's prompt template (`--prompt-template`).
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// A label set of a request (tokenized as the server's labels are, uncalibrated).
    pub fn label_set(&self, names: &[String]) -> Result<Arc<LabelSet>> {
        LabelSet::new(names, &self.tokenizer)
            .map(Arc::new)
            .map_err(|e| match e {
                Error::Config(msg) => Error::Validation(format!("`candidate_labels`: {msg}")),
                other => other,
            })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Encodes `text` (EOS appended). An input over `max_input_tokens` is refused unless
    /// `truncate_to` is given, in which case it is cut to that many tokens (at most
    /// `max_input_tokens`), keeping the start and the final EOS. CPU-bound: call it off the async runtime.
    pub fn tokenize(&self, text: &str, truncate_to: Option<usize>) -> Result<Vec<u32>> {
        if is_blank(text) {
            return Err(Error::Validation(
                "`inputs` must contain a non-blank character".into(),
            ));
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

    /// `text` tokenized (in `template` when given, special tokens added when asked), each
    /// token with its span in `text`.
    pub fn pieces(
        &self,
        text: &str,
        add_special_tokens: bool,
        template: Option<&Template>,
    ) -> Result<Vec<Piece>> {
        let (prompt, lo) = match template {
            Some(t) => t.place(text),
            None => (text.to_string(), 0),
        };
        let hi = lo + text.len();
        let enc = self
            .tokenizer
            .encode(prompt.as_str(), add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let special = enc.get_special_tokens_mask();
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .zip(enc.get_offsets())
            .enumerate()
            .map(|(i, ((&id, token), &(s, e)))| {
                let is_special = special.get(i) == Some(&1);
                let inside = s >= lo && e <= hi && (s < e || s < hi);
                Piece {
                    id,
                    token: token.clone(),
                    special: is_special,
                    span: (!is_special && inside).then(|| (s - lo, e - lo)),
                }
            })
            .collect())
    }

    /// The text of `ids`; an id outside the vocabulary is refused, not skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let vocab = self.tokenizer.get_vocab_size(true);
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Validation(format!(
                "`ids`: {id} is not a token id (the vocabulary has {vocab})"
            )));
        }
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Token ids the tokenizer knows: `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The text of each token id on its own, as the tokenizer decodes it.
    pub fn token_texts(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter()
            .map(|&id| {
                self.tokenizer
                    .decode(&[id], false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            })
            .collect()
    }

    /// `text` placed in `template` and tokenized, its own tokens located (see [`prompt`]).
    /// CPU-bound: call it off the async runtime.
    pub fn prompt(&self, text: &str, template: &Template) -> Result<Prompt> {
        if is_blank(text) {
            return Err(Error::Validation(
                "every text in `inputs` must contain a non-blank character".into(),
            ));
        }
        Prompt::new(&self.tokenizer, template, text)
    }

    /// The sentiment prompt of `text` cut to `max_input_tokens` (only the input is cut, from
    /// `truncate`'s end); without `truncate`, a longer prompt is refused.
    pub fn tokenize_sentiment(
        &self,
        text: &str,
        template: &Template,
        truncate: Option<prompt::TruncationDirection>,
    ) -> Result<Vec<u32>> {
        let max = self.config.max_input_tokens;
        let prompt = self.prompt(text, template)?;
        prompt.fit(max, truncate)?.ok_or_else(|| {
            Error::Validation(format!(
                "input has {} tokens with the prompt template, more than max_input_tokens \
                 ({max}); set `truncate` to cut it, or `long_input: \"chunk\"` to score it in windows",
                prompt.ids.len()
            ))
        })
    }

    fn submit(&self, job: Job) -> Result<()> {
        if !self.is_alive() {
            return Err(Error::EngineDown);
        }
        let inputs = job.inputs() as i64;
        match self.tx.try_send(job) {
            Ok(()) => {
                METRICS.queue_size.add(inputs);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Error::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(Error::EngineDown),
        }
    }

    /// Queues `text` as `variant` scores it by default: in the server's template (cut from the
    /// right if too long), against the variant's labels.
    pub fn sentiment_text(
        &self,
        text: &str,
        variant: usize,
    ) -> Result<oneshot::Receiver<Result<SentimentOutput>>> {
        let ids = self.tokenize_sentiment(
            text,
            &self.template,
            Some(prompt::TruncationDirection::Right),
        )?;
        let labels = self
            .variants
            .get(variant)
            .map(|v| v.labels.clone())
            .ok_or_else(|| Error::Validation(format!("no variant number {variant}")))?;
        self.sentiment(ids, labels, variant)
    }

    /// The labels the default model scores against (`--labels`, with its calibration).
    pub fn labels(&self) -> &Arc<LabelSet> {
        &self.variants[0].labels
    }

    /// Queues one input for scoring by `variant` against `labels`; the receiver yields its scores.
    pub fn sentiment(
        &self,
        ids: Vec<u32>,
        labels: Arc<LabelSet>,
        variant: usize,
    ) -> Result<oneshot::Receiver<Result<SentimentOutput>>> {
        let mut rx = self.sentiment_all(vec![ids], labels, variant)?;
        rx.pop()
            .ok_or_else(|| Error::Inference("no receiver for a queued input".into()))
    }

    /// Queues several inputs together (one request's), so that they are scored in the same
    /// batch when it has room; one receiver per input, in order.
    pub fn sentiment_all(
        &self,
        inputs: Vec<Vec<u32>>,
        labels: Arc<LabelSet>,
        variant: usize,
    ) -> Result<Vec<oneshot::Receiver<Result<SentimentOutput>>>> {
        let enqueued = Instant::now();
        let (jobs, receivers) = inputs
            .into_iter()
            .map(|ids| {
                let (reply, rx) = oneshot::channel();
                let job = SentimentJob {
                    variant,
                    ids,
                    labels: labels.clone(),
                    reply,
                    enqueued,
                };
                (job, rx)
            })
            .unzip();
        self.submit(Job::Sentiment(jobs))?;
        Ok(receivers)
    }

    /// Queues a generation by `variant`; dropping the receiver cancels it at the next decode step.
    pub fn generate(
        &self,
        ids: Vec<u32>,
        params: GenerateParams,
        variant: usize,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        let (events, rx) = mpsc::unbounded_channel();
        self.submit(Job::Generate(GenerateJob {
            variant,
            ids,
            params,
            events,
            enqueued: Instant::now(),
        }))?;
        Ok(rx)
    }
}
