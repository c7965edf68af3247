//! The inference core between callers (HTTP handlers, `finserve eval`, warm-up) and the model:
//! one dedicated thread owns the loaded model and runs the [`batcher`]; an [`Engine`] handle
//! talks to it through a bounded queue, getting results back on per-request channels.
//!
//! Callers use the request-level calls of [`infer`] (`Engine::score`, `Engine::generate_text`):
//! they validate, tokenize off the async runtime, submit and wait. Nothing here knows about HTTP
//! or the command line: requests arrive as texts and options, and a refusal is an
//! [`Error::Invalid`] naming the part of the request at fault.

pub mod backend;
mod backlog;
pub mod batcher;
pub mod config;
pub mod detokenizer;
mod explain;
pub mod generate;
mod health;
pub mod infer;
pub mod job;
pub mod likelihood;
pub mod prompt;
mod sentences;
pub mod sentiment;
pub mod targets;
pub mod validation;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Field, Limit, Result};
use backend::Backend;
use backlog::Backlog;
pub use config::{EngineConfig, RequestLimits};
use generate::GenerateParams;
use health::Health;
pub use job::{GenerateEvent, GenerateOutput, Priority, SentimentOutput, Timing, TokenInfo};
use job::{GenerateJob, Job, SentimentJob};
use prompt::{Prompt, Template};
use sentiment::LabelSet;
use targets::TargetTemplate;

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
    /// What identifies the model's outputs (`sha256:HEX`, see [`crate::model::digest`]).
    pub digest: String,
    /// How it is shown a target (entity-level sentiment), if it was trained for targets.
    pub target_template: Option<TargetTemplate>,
}

/// What requests see of a served model. A request holds its variant's `Arc` until it has its
/// answer, so removing a variant can wait for the work that uses it.
#[derive(Debug)]
pub struct Variant {
    /// The engine thread's lane for it.
    id: u64,
    pub name: String,
    pub labels: Arc<LabelSet>,
    pub digest: String,
    pub target_template: Option<Arc<TargetTemplate>>,
    /// The engine's use counter when a request last named it (for eviction).
    used: AtomicU64,
}

impl Variant {
    /// When a request last named it, on a counter that only grows (not a time).
    pub fn last_used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    tokenizer: Arc<Tokenizer>,
    /// The served models, the default first; variants come and go at runtime.
    variants: Arc<RwLock<Vec<Arc<Variant>>>>,
    next_lane: Arc<AtomicU64>,
    /// Counts variant lookups, to order variants by last use.
    uses: Arc<AtomicU64>,
    template: Arc<Template>,
    config: Arc<EngineConfig>,
    health: Arc<Health>,
    /// Requests waiting for a batch: interactive, then batch priority.
    backlogs: Arc<[Arc<Backlog>; 2]>,
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
            .ok_or_else(|| Error::Startup("the engine needs at least one model".into()))?;
        let eos = *first
            .backend
            .eos_ids()
            .first()
            .ok_or_else(|| Error::ModelConfig("the model has no EOS token id".into()))?;
        let mut variants: Vec<Arc<Variant>> = Vec::new();
        let mut lanes = Vec::new();
        for (id, s) in (0u64..).zip(served) {
            check_variant(&variants, &s, eos).map_err(|e| Error::Startup(e.to_string()))?;
            variants.push(Arc::new(Variant {
                id,
                name: s.name.clone(),
                labels: Arc::new(s.labels),
                digest: s.digest,
                target_template: s.target_template.map(Arc::new),
                used: AtomicU64::new(0),
            }));
            lanes.push(batcher::Lane::new(id, s.name, Box::new(s.backend)));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity.max(1));
        let health = Arc::new(Health::default());
        health.set_alive(true);
        health.batch_done(true);
        let template = Arc::new(Template::new(&config.prompt_template)?);
        let config = Arc::new(config);
        let batcher =
            batcher::Batcher::new(lanes, tokenizer.clone(), config.clone(), health.clone(), rx);
        let thread_health = health.clone();
        // The batcher runs on a worker of its own compute pool (its thread only waits for it): a
        // parallel product called from inside a pool does its share of the work in place while
        // the other workers steal the rest, where one called from outside parks the caller and
        // hands all of it over, two thread switches per product, dozens per decode step. Its own
        // pool, not the global one, because the batcher holds its worker for as long as it runs.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("finserve-engine-{i}"))
            .build()
            .map_err(|e| {
                Error::Startup(format!("cannot start the engine's compute threads: {e}"))
            })?;
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
                pool.install(|| batcher.run());
            })
            .map_err(|e| Error::Startup(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            tx,
            tokenizer,
            next_lane: Arc::new(AtomicU64::new(variants.len() as u64)),
            variants: Arc::new(RwLock::new(variants)),
            uses: Arc::new(AtomicU64::new(0)),
            template,
            config,
            health,
            backlogs: Arc::new([Arc::new(Backlog::default()), Arc::new(Backlog::batch())]),
            eos,
        })
    }

    /// Starts serving `served` as a further variant. Blocks while the engine's queue is full
    /// (call it off the async runtime); requests can name it once this returns.
    pub fn add_variant<B: Backend + Send + 'static>(&self, served: Served<B>) -> Result<()> {
        check_variant(&self.read_variants(), &served, self.eos)?;
        let id = self.next_lane.fetch_add(1, Ordering::Relaxed);
        // The lane is queued before the name is published, so every job that names it finds it;
        // no lock is held while the queue is full.
        self.tx
            .send(Job::AddLane {
                id,
                name: served.name.clone(),
                backend: Box::new(served.backend),
            })
            .map_err(|_| Error::EngineDown)?;
        let mut variants = self.write_variants();
        if variants.iter().any(|v| v.name == served.name) {
            drop(variants);
            let (done, _) = oneshot::channel();
            let _ = self.tx.send(Job::RemoveLane { id, done });
            return Err(Error::Conflict(format!(
                "a variant named `{}` is already served",
                served.name
            )));
        }
        variants.push(Arc::new(Variant {
            id,
            name: served.name,
            labels: Arc::new(served.labels),
            digest: served.digest,
            target_template: served.target_template.map(Arc::new),
            used: AtomicU64::new(self.uses.fetch_add(1, Ordering::Relaxed)),
        }));
        Ok(())
    }

    /// Stops serving the variant `name` (never the default model): new requests no longer find
    /// it at once; this waits until every request that holds it has its answer (at most
    /// `drain`, after which what is left fails), then the engine thread frees its model. The
    /// removal finishes on its own task even if the caller goes away.
    pub async fn remove_variant(&self, name: &str, drain: Duration) -> Result<()> {
        let removed = {
            let mut variants = self.write_variants();
            let at = variants
                .iter()
                .skip(1)
                .position(|v| v.name == name)
                .ok_or_else(|| Error::NotFound(format!("no runtime variant `{name}`")))?;
            variants.remove(at + 1)
        };
        let tx = self.tx.clone();
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + drain;
            while Arc::strong_count(&removed) > 1 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if Arc::strong_count(&removed) > 1 {
                tracing::warn!(variant = %removed.name, "requests still held the variant after the drain time; they fail");
            }
            let (done, freed) = oneshot::channel();
            let job = Job::RemoveLane {
                id: removed.id,
                done,
            };
            // The queue may be full of other work: wait for room rather than fail the removal.
            tokio::task::spawn_blocking(move || tx.send(job).map_err(|_| Error::EngineDown))
                .await
                .map_err(|e| Error::Inference(format!("cannot queue the removal: {e}")))??;
            freed.await.map_err(|_| Error::EngineDown)
        });
        task.await
            .map_err(|e| Error::Inference(format!("the removal task failed: {e}")))?
    }

    fn write_variants(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Variant>>> {
        self.variants.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_variants(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Variant>>> {
        self.variants.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_alive(&self) -> bool {
        self.health.is_alive()
    }

    /// How many batches in a row have failed (0 after any success).
    pub fn failed_batches_in_a_row(&self) -> usize {
        self.health.failed_in_a_row()
    }

    /// The served models now, the default first.
    pub fn variants(&self) -> Vec<Arc<Variant>> {
        self.read_variants().clone()
    }

    /// The variant called `name`; no name means the default model.
    pub fn variant(&self, name: Option<&str>) -> Result<Arc<Variant>> {
        let variants = self.read_variants();
        let found = match name {
            None => variants.first(),
            Some(name) => variants.iter().find(|v| v.name == name),
        };
        if let Some(v) = found {
            let tick = self.uses.fetch_add(1, Ordering::Relaxed);
            v.used.store(tick, Ordering::Relaxed);
            return Ok(v.clone());
        }
        let name = name.unwrap_or_default();
        Err({
            let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
            Error::invalid(
                Field::Variant,
                format!("no variant `{name}` is served here; the variants are {names:?}"),
            )
        })
    }

    /// The server's prompt template (`--prompt-template`).
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// The labels the default model scores against (`--labels`, with its calibration).
    pub fn labels(&self) -> Arc<LabelSet> {
        self.read_variants()[0].labels.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Refuses a request of more than `max_client_batch_size` texts.
    pub fn check_text_count(&self, count: usize) -> Result<()> {
        let max = self.config.limits.max_client_batch_size;
        if count > max {
            return Err(Error::over_limit(
                Field::Inputs,
                Limit::MaxClientBatchSize,
                max,
                format!("{count} inputs is more than {max}"),
            ));
        }
        Ok(())
    }

    /// Encodes a generation input `text` (EOS appended). An input over `max_input_tokens` is
    /// refused unless `truncate_to` is given, in which case it is cut to that many tokens (at
    /// most `max_input_tokens`), keeping the start and the final EOS. CPU-bound.
    fn tokenize(&self, text: &str, truncate_to: Option<usize>) -> Result<Vec<u32>> {
        if is_blank(text) {
            return Err(Error::invalid(
                Field::Inputs,
                "must contain a non-blank character",
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
                return Err(Error::over_limit(
                    Field::Inputs,
                    Limit::MaxInputTokens,
                    max,
                    format!("the input has {} tokens, more than {max}", ids.len()),
                ));
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
            return Err(Error::invalid(
                Field::Ids,
                format!("{id} is not a token id (the vocabulary has {vocab})"),
            ));
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
    fn prompt(&self, text: &str, template: &Template) -> Result<Prompt> {
        if is_blank(text) {
            return Err(Error::invalid(
                Field::Inputs,
                "every text must contain a non-blank character",
            ));
        }
        Prompt::new(&self.tokenizer, template, text)
    }

    fn backlog(&self, priority: Priority) -> &Arc<Backlog> {
        &self.backlogs[usize::from(priority == Priority::Batch)]
    }

    fn submit(&self, job: Job) -> Result<()> {
        if !self.is_alive() {
            return Err(Error::EngineDown);
        }
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(Error::EngineDown),
        }
    }

    /// Queues one tokenized input for scoring by `variant` against `labels`; the receiver
    /// yields its scores. What [`Engine::score`] does for each window, without its checks, for
    /// exactness tests against the model.
    pub fn sentiment(
        &self,
        ids: Vec<u32>,
        labels: Arc<LabelSet>,
        variant: &Variant,
    ) -> Result<oneshot::Receiver<Result<SentimentOutput>>> {
        let mut rx = self.sentiment_all(vec![ids], labels, variant, Priority::Interactive)?;
        rx.pop()
            .ok_or_else(|| Error::Inference("no receiver for a queued input".into()))
    }

    /// Queues several inputs together (one request's), so that they are scored in the same
    /// batch when it has room; one receiver per input, in order.
    fn sentiment_all(
        &self,
        inputs: Vec<Vec<u32>>,
        labels: Arc<LabelSet>,
        variant: &Variant,
        priority: Priority,
    ) -> Result<Vec<oneshot::Receiver<Result<SentimentOutput>>>> {
        let enqueued = Instant::now();
        let waiting = self.backlog(priority).enter(inputs.len());
        let (jobs, receivers) = inputs
            .into_iter()
            .zip(waiting)
            .map(|(ids, waiting)| {
                let (reply, rx) = oneshot::channel();
                let job = SentimentJob {
                    variant: variant.id,
                    priority,
                    ids,
                    labels: labels.clone(),
                    reply,
                    enqueued,
                    waiting: Some(waiting),
                };
                (job, rx)
            })
            .unzip();
        self.submit(Job::Sentiment(jobs))?;
        Ok(receivers)
    }

    /// Queues a tokenized generation by `variant` with validated `params`; dropping the
    /// receiver cancels it at the next decode step. The building block of
    /// [`Engine::generate_text`], for exactness tests.
    pub fn generate(
        &self,
        ids: Vec<u32>,
        params: GenerateParams,
        variant: &Variant,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        self.queue_generation(ids, params, variant, Priority::Interactive, Duration::ZERO)
    }

    /// [`Engine::generate`] of an input that took `tokenize` to tokenize.
    fn queue_generation(
        &self,
        ids: Vec<u32>,
        params: GenerateParams,
        variant: &Variant,
        priority: Priority,
        tokenize: Duration,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        let (events, rx) = mpsc::unbounded_channel();
        self.submit(Job::Generate(GenerateJob {
            variant: variant.id,
            priority,
            ids,
            params,
            events,
            enqueued: Instant::now(),
            tokenize,
            waiting: self.backlog(priority).enter(1).pop(),
        }))?;
        Ok(rx)
    }
}

/// Refuses a variant whose name is taken or whose model ends sequences differently.
fn check_variant<B: Backend>(
    variants: &[Arc<Variant>],
    served: &Served<B>,
    eos: u32,
) -> Result<()> {
    if variants.iter().any(|v| v.name == served.name) {
        return Err(Error::Conflict(format!(
            "a variant named `{}` is already served",
            served.name
        )));
    }
    if served.backend.eos_ids().first() != Some(&eos) {
        return Err(Error::ModelConfig(format!(
            "variant `{}` has other EOS token ids than the default model",
            served.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::engine::backend::{Choice, StepRow};
    use crate::engine::sentiment::LabelScores;

    /// Where a scoring call ran: the thread's name and its index in a rayon pool, if in one.
    type Seen = (Option<String>, Option<usize>);

    /// A backend that notes where each scoring call runs.
    struct Whereabouts(Arc<Mutex<Vec<Seen>>>);

    impl Backend for Whereabouts {
        fn score(&mut self, inputs: &[&[u32]], labels: &LabelSet) -> Result<Vec<LabelScores>> {
            let thread = std::thread::current();
            self.0.lock().unwrap().push((
                thread.name().map(String::from),
                rayon::current_thread_index(),
            ));
            let n = labels.names.len();
            let uniform = LabelScores {
                log_probs: vec![-(n as f64).ln(); n],
                probs: vec![1.0 / n as f64; n],
            };
            Ok(vec![uniform; inputs.len()])
        }
        fn join(&mut self, _inputs: &[&[u32]]) -> Result<Vec<usize>> {
            Err(Error::Inference("this backend only scores".into()))
        }
        fn step(&mut self, _rows: &mut [StepRow<'_>]) -> Result<Vec<Choice>> {
            Err(Error::Inference("this backend only scores".into()))
        }
        fn leave(&mut self, _slot: usize) {}
        fn reset(&mut self) {}
        fn decoder_start(&self) -> u32 {
            0
        }
        fn eos_ids(&self) -> &[u32] {
            &[1]
        }
    }

    #[test]
    fn the_model_runs_on_a_worker_of_the_engines_own_compute_pool() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/parity/fixtures/tokenizer.json"
        );
        let tokenizer = Tokenizer::from_file(path).unwrap();
        let labels = LabelSet::new(&["up".to_string(), "down".to_string()], &tokenizer).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let served = Served {
            name: "where".into(),
            digest: "sha256:not-hashed".into(),
            backend: Whereabouts(seen.clone()),
            labels,
            target_template: None,
        };
        let engine =
            Engine::start(vec![served], Arc::new(tokenizer), EngineConfig::default()).unwrap();
        let variant = engine.variant(None).unwrap();
        let scores = engine
            .sentiment(vec![5, 6, 7], engine.labels(), &variant)
            .unwrap()
            .blocking_recv()
            .unwrap();
        assert!(scores.is_ok());
        let seen = seen.lock().unwrap();
        let (name, index) = &seen[0];
        assert!(
            name.as_deref()
                .is_some_and(|n| n.starts_with("finserve-engine-")),
            "scored on {name:?}"
        );
        assert!(index.is_some(), "scored outside any rayon pool");
    }
}
