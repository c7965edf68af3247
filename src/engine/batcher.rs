//! The engine thread's loop: forms batches from the queue and runs them on the model.
//!
//! Scheduling policy:
//! - Sentiment requests are batched dynamically: when the engine is free, everything waiting is
//!   taken, capped by `max_batch_size` inputs and `max_batch_tokens` padded tokens (longest input
//!   x batch size), so a lone request never waits; a batch holds inputs of one variant scored
//!   against one label set (those of the oldest waiting input), the others wait for a following
//!   batch; `max_batch_wait` can trade latency for fuller batches when nothing else is running.
//! - Generation is continuously batched, one running batch per variant (a [`Lane`]): a decode
//!   step advances one lane's batch by one token; between steps, waiting requests are encoded
//!   and join (same caps), finished or cancelled sequences leave at once.
//! - Fairness: when both kinds have work, the engine alternates one sentiment batch with one
//!   decode step, so neither starves the other; decode steps go round the lanes that have work,
//!   so every variant's generations advance at the same pace however busy the others are.
//!
//! A panic while running a batch fails that batch's requests and the loop goes on.
//!
//! The model is reached only through the [`Backend`](super::backend::Backend) trait, so these rules are unit-tested
//! against a fake model below.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;

use super::backend::{Choice, DynBackend, StepRow};
use super::config::EngineConfig;
use super::detokenizer::Detokenizer;
use super::generate::{FinishReason, Sampler, stop_hit};
use super::health::Health;
use super::job::{
    GenerateEvent, GenerateJob, GenerateOutput, Job, Priority, SentimentJob, SentimentOutput,
    Timing, TokenInfo,
};
use crate::error::{Error, Field, Result};
use crate::metrics::METRICS;

/// A generation in the running batch.
struct Running {
    job: GenerateJob,
    /// Its row in the backend's decode batch.
    slot: usize,
    sampler: Sampler,
    /// Decoder tokens so far, decoder start first.
    context: Vec<u32>,
    tokens: Vec<TokenInfo>,
    detokenizer: Detokenizer,
    queue_time: Duration,
    started: Instant,
}

/// One served variant: its model and its generations, waiting and running.
pub(crate) struct Lane {
    /// What jobs name it by; never reused while the engine runs.
    pub id: u64,
    /// The variant's name, the `variant` label of its metrics.
    pub name: String,
    pub backend: DynBackend,
    waiting: VecDeque<GenerateJob>,
    running: Vec<Running>,
}

impl Lane {
    pub(crate) fn new(id: u64, name: String, backend: DynBackend) -> Self {
        Self {
            id,
            name,
            backend,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    fn generating(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
}

pub(crate) struct Batcher {
    lanes: Vec<Lane>,
    tokenizer: Arc<Tokenizer>,
    config: Arc<EngineConfig>,
    health: Arc<Health>,
    rx: Receiver<Job>,
    open: bool,
    sentiment: VecDeque<SentimentJob>,
    sentiment_turn: bool,
    /// The lane whose turn it is to run a decode step, if it has work.
    next_lane: usize,
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
    /// `lanes` are the served variants, named by the jobs' `variant` (a lane id).
    pub(crate) fn new(
        lanes: Vec<Lane>,
        tokenizer: Arc<Tokenizer>,
        config: Arc<EngineConfig>,
        health: Arc<Health>,
        rx: Receiver<Job>,
    ) -> Self {
        Self {
            lanes,
            tokenizer,
            config,
            health,
            rx,
            open: true,
            sentiment: VecDeque::new(),
            sentiment_turn: true,
            next_lane: 0,
        }
    }

    fn generating(&self) -> bool {
        self.lanes.iter().any(Lane::generating)
    }

    fn idle(&self) -> bool {
        self.sentiment.is_empty() && !self.generating()
    }

    /// The position in `lanes` of the lane with id `id`.
    fn lane(&self, id: u64) -> Option<usize> {
        self.lanes.iter().position(|l| l.id == id)
    }

    fn accept(&mut self, job: Job) {
        let unknown =
            |variant: u64| Error::invalid(Field::Variant, format!("no variant number {variant}"));
        match job {
            Job::Sentiment(jobs) => {
                for j in jobs {
                    if self.lane(j.variant).is_some() {
                        self.sentiment.push_back(j);
                    } else {
                        drop(j.reply.send(Err(unknown(j.variant))));
                    }
                }
            }
            Job::Generate(j) => match self.lane(j.variant) {
                Some(i) => self.lanes[i].waiting.push_back(j),
                None => drop(j.events.send(GenerateEvent::Error(unknown(j.variant)))),
            },
            Job::AddLane { id, name, backend } => {
                tracing::info!(variant = %name, "variant serving");
                self.lanes.push(Lane::new(id, name, backend));
            }
            Job::RemoveLane { id, done } => {
                self.remove_lane(id);
                let _ = done.send(());
            }
        }
    }

    /// Drops lane `id` and its model. Callers wait until no request holds the variant, so what
    /// is left here is work whose client has gone: it is failed, not run.
    fn remove_lane(&mut self, id: u64) {
        let Some(i) = self.lane(id) else { return };
        let lane = self.lanes.remove(i);
        let gone = || {
            Error::invalid(
                Field::Variant,
                format!("variant `{}` was removed", lane.name),
            )
        };
        for j in lane.waiting {
            drop(j.events.send(GenerateEvent::Error(gone())));
        }
        for r in lane.running {
            drop(r.job.events.send(GenerateEvent::Error(gone())));
        }
        for j in std::mem::take(&mut self.sentiment) {
            if j.variant == id {
                drop(j.reply.send(Err(gone())));
            } else {
                self.sentiment.push_back(j);
            }
        }
        if self.next_lane >= self.lanes.len() {
            self.next_lane = 0;
        }
        tracing::info!(variant = %lane.name, "variant removed");
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
        let running = self.lanes.iter().any(|l| !l.running.is_empty());
        if wait > Duration::ZERO && !running && !self.sentiment.is_empty() {
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
        while self.tick() {}
    }

    /// Takes what has arrived and runs one unit of work (a sentiment batch or a decode step);
    /// false once the queue is closed and everything is done.
    fn tick(&mut self) -> bool {
        self.receive();
        if self.idle() {
            return self.open;
        }
        if !self.sentiment.is_empty() && (self.sentiment_turn || !self.generating()) {
            self.sentiment_batch();
            self.sentiment_turn = false;
        } else {
            self.generate_step();
            self.sentiment_turn = true;
        }
        true
    }

    fn sentiment_batch(&mut self) {
        drop_cancelled(&mut self.sentiment, |j| j.reply.is_closed(), "sentiment");
        // The oldest interactive input leads; batch work leads only when none waits.
        let lead = self
            .sentiment
            .iter()
            .position(|j| j.priority == Priority::Interactive)
            .unwrap_or(0);
        let Some((variant, labels)) = self
            .sentiment
            .get(lead)
            .map(|j| (j.variant, j.labels.clone()))
        else {
            return;
        };
        // A batch led by interactive inputs takes no batch work: it would make it longer. Batch
        // work gets batches of its own once no interactive input waits.
        let priority = self.sentiment[lead].priority;
        let same: Vec<usize> = (0..self.sentiment.len())
            .filter(|&i| {
                let job = &self.sentiment[i];
                job.variant == variant
                    && job.priority == priority
                    && (Arc::ptr_eq(&job.labels, &labels) || *job.labels == *labels)
            })
            .collect();
        let cfg = &self.config;
        let max_size = match priority {
            Priority::Interactive => cfg.max_batch_size,
            Priority::Batch => cfg.backfill_batch_size.clamp(1, cfg.max_batch_size),
        };
        let n = fits(
            same.iter().map(|&i| self.sentiment[i].ids.len()),
            max_size,
            cfg.max_batch_tokens,
            0,
        );
        let mut jobs: Vec<SentimentJob> = same[..n]
            .iter()
            .rev()
            .filter_map(|&i| self.sentiment.remove(i))
            .collect();
        jobs.reverse();
        if jobs.is_empty() {
            return;
        }
        for job in &mut jobs {
            job.waiting = None;
        }
        let start = Instant::now();
        let longest = jobs.iter().map(|j| j.ids.len()).max().unwrap_or(0);
        let Some(at) = self.lane(variant) else {
            return self.fail_sentiment(jobs, format!("no variant number {variant}"));
        };
        let lane = &mut self.lanes[at];
        let metric = ["sentiment", lane.name.as_str()];
        METRICS
            .batch_size
            .with_label_values(&metric)
            .observe(n as f64);
        METRICS
            .batch_tokens
            .with_label_values(&metric)
            .observe((longest * n) as f64);
        let backend = &mut lane.backend;
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<_> {
            let inputs: Vec<&[u32]> = jobs.iter().map(|j| j.ids.as_slice()).collect();
            backend.score(&inputs, &labels)
        }));
        let inference = start.elapsed();
        let scores = match result {
            Ok(Ok(scores)) => scores,
            Ok(Err(e)) => return self.fail_sentiment(jobs, e.to_string()),
            Err(p) => return self.fail_sentiment(jobs, panic_message(p)),
        };
        METRICS
            .forward_duration
            .with_label_values(&metric)
            .observe(inference.as_secs_f64());
        self.health.batch_done(true);
        for (job, scores) in jobs.into_iter().zip(scores) {
            let timing = Timing {
                queue: start.duration_since(job.enqueued),
                inference,
                ..Timing::default()
            };
            let _ = job.reply.send(Ok(SentimentOutput { scores, timing }));
        }
    }

    fn fail_sentiment(&self, jobs: Vec<SentimentJob>, error: String) {
        tracing::error!(%error, "sentiment batch failed");
        self.health.batch_done(false);
        for job in jobs {
            let _ = job.reply.send(Err(Error::Inference(error.clone())));
        }
    }

    /// Runs one decode step of the next lane, in turn, that has generations.
    fn generate_step(&mut self) {
        let n = self.lanes.len();
        let Some(i) = (0..n)
            .map(|k| (self.next_lane + k) % n)
            .find(|&i| self.lanes[i].generating())
        else {
            return;
        };
        self.next_lane = (i + 1) % n;
        let lane = &mut self.lanes[i];
        let (tokenizer, config) = (&self.tokenizer, &self.config);
        let result = catch_unwind(AssertUnwindSafe(|| lane.step(tokenizer, config)));
        let error = match result {
            Ok(Ok(())) => return self.health.batch_done(true),
            Ok(Err(e)) => e.to_string(),
            Err(p) => panic_message(p),
        };
        tracing::error!(%error, variant = %lane.name, "generation step failed; failing the running batch");
        self.health.batch_done(false);
        lane.backend.reset();
        for r in lane.running.drain(..) {
            let _ = r
                .job
                .events
                .send(GenerateEvent::Error(Error::Inference(error.clone())));
        }
    }
}

impl Lane {
    /// Encodes waiting requests that fit next to the running batch and adds them to it.
    fn admit(&mut self, cfg: &EngineConfig) -> Result<()> {
        drop_cancelled(&mut self.waiting, |j| j.events.is_closed(), "generate");
        // Interactive requests first (each priority in arrival order); batch ones only into the
        // slots beyond `interactive_slots`.
        let mut order: Vec<usize> = (0..self.waiting.len()).collect();
        order.sort_by_key(|&i| self.waiting[i].priority);
        let batch_room = cfg.max_batch_size.saturating_sub(cfg.interactive_slots);
        let mut batch_running = self
            .running
            .iter()
            .filter(|r| r.job.priority == Priority::Batch)
            .count();
        let mut chosen = Vec::new();
        let mut longest = 0;
        for i in order {
            let job = &self.waiting[i];
            if job.priority == Priority::Batch && batch_running >= batch_room {
                continue;
            }
            let size = self.running.len() + chosen.len() + 1;
            let tokens = longest.max(job.ids.len()) * (chosen.len() + 1);
            if size > cfg.max_batch_size || (!chosen.is_empty() && tokens > cfg.max_batch_tokens) {
                break;
            }
            longest = longest.max(job.ids.len());
            batch_running += usize::from(job.priority == Priority::Batch);
            chosen.push(i);
        }
        let n = chosen.len();
        if n == 0 {
            return Ok(());
        }
        chosen.sort_unstable();
        let mut jobs: Vec<GenerateJob> = chosen
            .iter()
            .rev()
            .filter_map(|&i| self.waiting.remove(i))
            .collect();
        jobs.reverse();
        for job in &mut jobs {
            job.waiting = None;
        }
        let longest = jobs.iter().map(|j| j.ids.len()).max().unwrap_or(0);
        METRICS
            .batch_tokens
            .with_label_values(&["generate", &self.name])
            .observe((longest * n) as f64);
        let started = Instant::now();
        let inputs: Vec<&[u32]> = jobs.iter().map(|j| j.ids.as_slice()).collect();
        let slots = self.backend.join(&inputs)?;
        METRICS
            .forward_duration
            .with_label_values(&["prefill", &self.name])
            .observe(started.elapsed().as_secs_f64());
        let start_token = self.backend.decoder_start();
        for (job, slot) in jobs.into_iter().zip(slots) {
            self.running.push(Running {
                sampler: Sampler::new(job.params.clone()),
                queue_time: started.duration_since(job.enqueued),
                job,
                slot,
                context: vec![start_token],
                tokens: Vec::new(),
                detokenizer: Detokenizer::default(),
                started,
            });
        }
        Ok(())
    }

    /// Admits who fits, drops who left, and advances the running batch by one token.
    fn step(&mut self, tokenizer: &Tokenizer, cfg: &EngineConfig) -> Result<()> {
        self.admit(cfg)?;
        let mut cancelled = 0;
        let backend = &mut self.backend;
        self.running.retain(|r| {
            let gone = r.job.events.is_closed();
            if gone {
                backend.leave(r.slot);
                cancelled += 1;
            }
            !gone
        });
        METRICS
            .cancelled
            .with_label_values(&["generate"])
            .inc_by(cancelled);
        if self.running.is_empty() {
            return Ok(());
        }
        METRICS
            .batch_size
            .with_label_values(&["generate", &self.name])
            .observe(self.running.len() as f64);
        let mut rows: Vec<StepRow<'_>> = self
            .running
            .iter_mut()
            .map(|r| StepRow {
                slot: r.slot,
                context: &r.context,
                sampler: &mut r.sampler,
            })
            .collect();
        let stepping = Instant::now();
        let choices = self.backend.step(&mut rows)?;
        METRICS
            .forward_duration
            .with_label_values(&["decode", &self.name])
            .observe(stepping.elapsed().as_secs_f64());
        drop(rows);
        let mut finished = Vec::new();
        let eos = self.backend.eos_ids();
        for (i, (r, choice)) in self.running.iter_mut().zip(choices).enumerate() {
            if let Some(end) = advance(tokenizer, eos, r, choice)? {
                finished.push((i, end));
            }
        }
        for (i, (reason, text)) in finished.into_iter().rev() {
            let r = self.running.swap_remove(i);
            self.backend.leave(r.slot);
            finish(r, &self.name, reason, text);
        }
        Ok(())
    }
}

fn finish(r: Running, variant: &str, reason: FinishReason, generated_text: String) {
    let inference = r.started.elapsed();
    let n = r.tokens.len();
    METRICS
        .generated_tokens
        .with_label_values(&[variant])
        .inc_by(n as u64);
    METRICS
        .time_per_output_token
        .observe(inference.as_secs_f64() / n.max(1) as f64);
    let output = GenerateOutput {
        generated_text,
        finish_reason: reason,
        tokens: r.tokens,
        seed: r.sampler.seed,
        timing: Timing {
            tokenize: r.job.tokenize,
            queue: r.queue_time,
            inference,
        },
    };
    let _ = r.job.events.send(GenerateEvent::End(output));
}

/// Records the token chosen for `r` and decides whether the sequence is done. Every token but
/// the last is sent at once; the last, which also carries any text held back, goes out with
/// the end of the sequence (its reason and whole text are returned).
fn advance(
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    r: &mut Running,
    Choice { id, logprob }: Choice,
) -> Result<Option<(FinishReason, String)>> {
    r.context.push(id);
    let special = eos_ids.contains(&id);
    let mut text = if special {
        String::new()
    } else {
        r.detokenizer.push(tokenizer, id)?
    };
    let params = r.sampler.params();
    let reason = if special {
        Some(FinishReason::EosToken)
    } else if stop_hit(r.detokenizer.text(), text.len(), &params.stop) {
        Some(FinishReason::StopSequence)
    } else if r.tokens.len() + 1 >= params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    let end = match reason {
        Some(reason) => {
            let (full, rest) = r.detokenizer.finish(tokenizer)?;
            text.push_str(&rest);
            Some((reason, full))
        }
        None => None,
    };
    let token = TokenInfo {
        id,
        text,
        logprob,
        special,
    };
    if end.is_none() {
        let _ = r.job.events.send(GenerateEvent::Token(token.clone()));
    }
    r.tokens.push(token);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{SyncSender, sync_channel};

    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::engine::backend::Backend;
    use crate::engine::backlog::Backlog;
    use crate::engine::generate::GenerateParams;
    use crate::engine::sentiment::{LabelScores, LabelSet};

    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Score(usize),
        Join(Vec<usize>),
        Step(Vec<usize>),
        Leave(usize),
        Reset,
    }

    /// A model that records what the batcher asks of it: token `10 + position` every step,
    /// uniform label scores, and a panic on demand. The fakes of one harness's lanes share
    /// `by_lane`, the order of every lane's calls.
    #[derive(Clone, Default)]
    struct Fake {
        lane: usize,
        by_lane: Arc<Mutex<Vec<(usize, Call)>>>,
        calls: Arc<Mutex<Vec<Call>>>,
        slots: Arc<Mutex<Vec<bool>>>,
        panic: Arc<AtomicBool>,
    }

    impl Fake {
        fn log(&self, c: Call) {
            self.by_lane.lock().unwrap().push((self.lane, c.clone()));
            self.calls.lock().unwrap().push(c);
        }
        fn take_calls(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
        fn check_panic(&self) {
            if self.panic.swap(false, Ordering::SeqCst) {
                panic!("injected fault");
            }
        }
    }

    impl Backend for Fake {
        fn score(&mut self, inputs: &[&[u32]], labels: &LabelSet) -> Result<Vec<LabelScores>> {
            self.log(Call::Score(inputs.len()));
            self.check_panic();
            let n = labels.names.len();
            Ok(inputs
                .iter()
                .map(|_| LabelScores {
                    log_probs: vec![-(n as f64).ln(); n],
                    probs: vec![1.0 / n as f64; n],
                })
                .collect())
        }
        fn join(&mut self, inputs: &[&[u32]]) -> Result<Vec<usize>> {
            let mut slots = self.slots.lock().unwrap();
            let mut got = Vec::new();
            for _ in inputs {
                let free = slots.iter().position(|used| !used).unwrap_or(slots.len());
                if free == slots.len() {
                    slots.push(true);
                } else {
                    slots[free] = true;
                }
                got.push(free);
            }
            drop(slots);
            self.log(Call::Join(got.clone()));
            Ok(got)
        }
        fn step(&mut self, rows: &mut [StepRow<'_>]) -> Result<Vec<Choice>> {
            self.log(Call::Step(rows.iter().map(|r| r.slot).collect()));
            self.check_panic();
            Ok(rows
                .iter()
                .map(|r| Choice {
                    id: 10 + r.context.len() as u32,
                    logprob: Some(-1.0),
                })
                .collect())
        }
        fn leave(&mut self, slot: usize) {
            self.slots.lock().unwrap()[slot] = false;
            self.log(Call::Leave(slot));
        }
        fn reset(&mut self) {
            self.slots.lock().unwrap().clear();
            self.log(Call::Reset);
        }
        fn decoder_start(&self) -> u32 {
            0
        }
        fn eos_ids(&self) -> &[u32] {
            &[1]
        }
    }

    struct Harness {
        batcher: Batcher,
        tx: SyncSender<Job>,
        fake: Fake,
        health: Arc<Health>,
        labels: Arc<LabelSet>,
        backlog: Arc<Backlog>,
    }

    fn harness(max_batch_size: usize, max_batch_wait: Duration) -> Harness {
        harness_with_lanes(max_batch_size, max_batch_wait, 1)
    }

    /// A batcher over `lanes` variants; `fake` is the first lane's model.
    fn harness_with_lanes(
        max_batch_size: usize,
        max_batch_wait: Duration,
        lanes: usize,
    ) -> Harness {
        let tokenizer = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/parity/fixtures/tokenizer.json"
        ))
        .unwrap();
        let labels = LabelSet::from_targets(
            vec!["down".into(), "up".into()],
            vec![vec![5, 1], vec![6, 1]],
        )
        .unwrap();
        let config = EngineConfig {
            max_batch_size,
            max_batch_tokens: 1024,
            max_batch_wait,
            queue_capacity: 64,
            max_input_tokens: 64,
            interactive_slots: max_batch_size / 2,
            backfill_batch_size: max_batch_size / 2,
            ..Default::default()
        };
        let (tx, rx) = sync_channel(64);
        let fake = Fake::default();
        let health = Arc::new(Health::default());
        health.set_alive(true);
        let lanes = (0..lanes)
            .map(|lane| {
                let model = Fake {
                    lane,
                    by_lane: fake.by_lane.clone(),
                    ..Fake::default()
                };
                let backend: DynBackend = if lane == 0 {
                    Box::new(fake.clone())
                } else {
                    Box::new(model)
                };
                Lane::new(lane as u64, format!("v{lane}"), backend)
            })
            .collect();
        let batcher = Batcher::new(
            lanes,
            Arc::new(tokenizer),
            Arc::new(config),
            health.clone(),
            rx,
        );
        Harness {
            batcher,
            tx,
            fake,
            health,
            labels: Arc::new(labels),
            backlog: Arc::new(Backlog::default()),
        }
    }

    impl Harness {
        fn sentiment(&self) -> oneshot::Receiver<Result<SentimentOutput>> {
            self.sentiment_with(self.labels.clone())
        }
        fn sentiment_with(
            &self,
            labels: Arc<LabelSet>,
        ) -> oneshot::Receiver<Result<SentimentOutput>> {
            self.sentiment_on(0, labels)
        }
        fn sentiment_on(
            &self,
            variant: u64,
            labels: Arc<LabelSet>,
        ) -> oneshot::Receiver<Result<SentimentOutput>> {
            self.sentiment_at(variant, labels, Priority::Interactive)
        }
        fn sentiment_at(
            &self,
            variant: u64,
            labels: Arc<LabelSet>,
            priority: Priority,
        ) -> oneshot::Receiver<Result<SentimentOutput>> {
            let (reply, rx) = oneshot::channel();
            let job = SentimentJob {
                variant,
                priority,
                labels,
                ids: vec![20, 21, 1],
                reply,
                enqueued: Instant::now(),
                waiting: self.backlog.enter(1).pop(),
            };
            self.tx.send(Job::Sentiment(vec![job])).unwrap();
            rx
        }
        fn generate(&self, max_new_tokens: usize) -> mpsc::UnboundedReceiver<GenerateEvent> {
            self.generate_on(0, max_new_tokens)
        }
        fn generate_on(
            &self,
            variant: u64,
            max_new_tokens: usize,
        ) -> mpsc::UnboundedReceiver<GenerateEvent> {
            self.generate_at(variant, max_new_tokens, Priority::Interactive)
        }
        fn generate_at(
            &self,
            variant: u64,
            max_new_tokens: usize,
            priority: Priority,
        ) -> mpsc::UnboundedReceiver<GenerateEvent> {
            let (events, rx) = mpsc::unbounded_channel();
            let job = GenerateJob {
                variant,
                priority,
                ids: vec![20, 21, 1],
                params: GenerateParams {
                    max_new_tokens,
                    ..Default::default()
                },
                events,
                enqueued: Instant::now(),
                tokenize: Duration::ZERO,
                waiting: self.backlog.enter(1).pop(),
            };
            self.tx.send(Job::Generate(job)).unwrap();
            rx
        }
        fn ticks(&mut self, n: usize) -> Vec<Call> {
            for _ in 0..n {
                assert!(self.batcher.tick());
            }
            self.fake.take_calls()
        }
    }

    fn end(
        rx: &mut mpsc::UnboundedReceiver<GenerateEvent>,
    ) -> std::result::Result<GenerateOutput, String> {
        loop {
            match rx.try_recv() {
                Ok(GenerateEvent::End(out)) => return Ok(out),
                Ok(GenerateEvent::Error(e)) => return Err(e.to_string()),
                Ok(GenerateEvent::Token(_)) => {}
                Err(e) => return Err(format!("no end event: {e}")),
            }
        }
    }

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

    #[test]
    fn one_requests_inputs_join_one_batch_and_an_unknown_variant_is_refused() {
        let mut h = harness(8, Duration::ZERO);
        let (jobs, mut rx): (Vec<_>, Vec<_>) = [0, 0, 7]
            .into_iter()
            .map(|variant| {
                let (reply, rx) = oneshot::channel();
                let job = SentimentJob {
                    variant,
                    priority: Priority::Interactive,
                    labels: h.labels.clone(),
                    ids: vec![20, 1],
                    reply,
                    enqueued: Instant::now(),
                    waiting: None,
                };
                (job, rx)
            })
            .unzip();
        h.tx.send(Job::Sentiment(jobs)).unwrap();
        assert_eq!(h.ticks(1), [Call::Score(2)]);
        assert!(rx[0].try_recv().unwrap().is_ok());
        assert!(rx[1].try_recv().unwrap().is_ok());
        let refused = rx[2].try_recv().unwrap().unwrap_err();
        assert!(
            refused.to_string().contains("no variant number 7"),
            "{refused}"
        );
    }

    #[test]
    fn sentiment_batches_and_decode_steps_alternate() {
        let mut h = harness(1, Duration::ZERO);
        let s: Vec<_> = (0..2).map(|_| h.sentiment()).collect();
        let mut g = h.generate(3);
        let calls = h.ticks(4);
        assert_eq!(
            calls,
            [
                Call::Score(1),
                Call::Join(vec![0]),
                Call::Step(vec![0]),
                Call::Score(1),
                Call::Step(vec![0]),
            ]
        );
        for mut rx in s {
            assert!(rx.try_recv().unwrap().is_ok());
        }
        h.ticks(1);
        let out = end(&mut g).unwrap();
        assert_eq!(
            out.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            [11, 12, 13]
        );
        assert_eq!(out.finish_reason, FinishReason::Length);
    }

    #[test]
    fn a_finished_sequence_frees_its_slot_for_the_next_one() {
        let mut h = harness(2, Duration::ZERO);
        let mut short = h.generate(2);
        let _long = h.generate(6);
        assert_eq!(h.ticks(1), [Call::Join(vec![0, 1]), Call::Step(vec![0, 1])]);
        assert_eq!(h.ticks(1), [Call::Step(vec![0, 1]), Call::Leave(0)]);
        assert!(end(&mut short).is_ok());
        let _next = h.generate(4);
        // The newcomer takes slot 0; the running sequence in slot 1 is untouched.
        assert_eq!(h.ticks(1), [Call::Join(vec![0]), Call::Step(vec![1, 0])]);
    }

    #[test]
    fn a_cancelled_generation_leaves_the_batch_before_the_next_step() {
        let mut h = harness(4, Duration::ZERO);
        let gone = h.generate(10);
        let _kept = h.generate(10);
        h.ticks(1);
        drop(gone);
        assert_eq!(h.ticks(1), [Call::Leave(0), Call::Step(vec![1])]);
    }

    #[test]
    fn a_panicking_step_fails_the_running_batch_and_the_engine_goes_on() {
        let mut h = harness(4, Duration::ZERO);
        let mut a = h.generate(5);
        h.ticks(1);
        h.fake.panic.store(true, Ordering::SeqCst);
        let calls = h.ticks(1);
        assert_eq!(calls.last(), Some(&Call::Reset));
        assert!(end(&mut a).unwrap_err().contains("injected fault"));
        let mut b = h.generate(2);
        h.ticks(2);
        assert_eq!(end(&mut b).unwrap().tokens.len(), 2);
    }

    #[test]
    fn a_panicking_sentiment_batch_fails_only_its_requests() {
        let mut h = harness(1, Duration::ZERO);
        let mut first = h.sentiment();
        let mut second = h.sentiment();
        h.fake.panic.store(true, Ordering::SeqCst);
        h.ticks(2);
        let failed = first.try_recv().unwrap().unwrap_err();
        assert!(matches!(&failed, Error::Inference(m) if m.contains("injected fault")));
        assert!(second.try_recv().unwrap().is_ok());
    }

    #[test]
    fn failed_batches_are_counted_until_one_succeeds() {
        let mut h = harness(1, Duration::ZERO);
        let failed = |h: &Harness| h.health.failed_in_a_row();
        for n in 1..=3 {
            let _s = h.sentiment();
            h.fake.panic.store(true, Ordering::SeqCst);
            h.ticks(1);
            assert_eq!(failed(&h), n);
        }
        let mut g = h.generate(3);
        h.fake.panic.store(true, Ordering::SeqCst);
        h.ticks(1);
        assert_eq!(
            failed(&h),
            4,
            "a failed decode step counts like a failed sentiment batch"
        );
        assert!(end(&mut g).is_err());
        let _ok = h.sentiment();
        h.ticks(1);
        assert_eq!(failed(&h), 0);
    }

    #[test]
    fn the_last_token_arrives_with_the_end_and_texts_concatenate() {
        let mut h = harness(1, Duration::ZERO);
        let mut g = h.generate(4);
        h.ticks(4);
        let mut streamed = Vec::new();
        let out = loop {
            match g.try_recv().unwrap() {
                GenerateEvent::Token(t) => streamed.push(t),
                GenerateEvent::End(out) => break out,
                GenerateEvent::Error(e) => panic!("{e}"),
            }
        };
        assert_eq!(streamed.len(), 3);
        assert_eq!(out.tokens[..3], streamed[..]);
        let texts: String = out.tokens.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, out.generated_text);
    }

    #[test]
    fn inputs_with_other_labels_wait_for_their_own_batch() {
        let mut h = harness(8, Duration::ZERO);
        let other = Arc::new(
            LabelSet::from_targets(
                vec!["a".into(), "b".into(), "c".into()],
                vec![vec![7, 1], vec![8, 1], vec![9, 1]],
            )
            .unwrap(),
        );
        let mut first = h.sentiment();
        let mut odd = h.sentiment_with(other.clone());
        let mut third = h.sentiment();
        assert_eq!(h.ticks(1), [Call::Score(2)]);
        assert_eq!(first.try_recv().unwrap().unwrap().scores.probs.len(), 2);
        assert_eq!(third.try_recv().unwrap().unwrap().scores.probs.len(), 2);
        assert_eq!(h.ticks(1), [Call::Score(1)]);
        assert_eq!(odd.try_recv().unwrap().unwrap().scores.probs.len(), 3);
    }

    #[test]
    fn max_batch_wait_gathers_a_fuller_sentiment_batch() {
        let mut h = harness(2, Duration::from_secs(30));
        let _a = h.sentiment();
        let tx = h.tx.clone();
        let labels = h.labels.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let (reply, rx) = oneshot::channel();
            let job = SentimentJob {
                variant: 0,
                priority: Priority::Interactive,
                labels: labels.clone(),
                ids: vec![20, 1],
                reply,
                enqueued: Instant::now(),
                waiting: None,
            };
            tx.send(Job::Sentiment(vec![job])).unwrap();
            rx
        });
        // The batch closes as soon as it is full, long before the 30 s wait.
        assert_eq!(h.ticks(1), [Call::Score(2)]);
        assert!(late.join().unwrap().try_recv().unwrap().is_ok());
    }

    #[test]
    fn the_loop_ends_when_the_queue_closes_and_work_is_done() {
        let mut h = harness(2, Duration::ZERO);
        let mut g = h.generate(2);
        drop(h.tx);
        while h.batcher.tick() {}
        assert!(end(&mut g).is_ok());
    }

    #[test]
    fn batches_never_mix_variants_and_decode_steps_go_round_the_lanes() {
        let mut h = harness_with_lanes(8, Duration::ZERO, 3);
        let sentiment = [0, 1, 0].map(|v| h.sentiment_on(v, h.labels.clone()));
        // Lane 0 has three generations, lane 2 one, lane 1 none: each lane with work gets a
        // step in turn, however many sequences it runs.
        let long: Vec<_> = (0..3).map(|_| h.generate_on(0, 4)).collect();
        let mut short = h.generate_on(2, 2);
        let mut lanes = Vec::new();
        h.ticks(8);
        for (lane, call) in h.fake.by_lane.lock().unwrap().drain(..) {
            match call {
                Call::Score(n) => lanes.push(format!("score{lane}x{n}")),
                Call::Step(slots) => lanes.push(format!("step{lane}x{}", slots.len())),
                _ => {}
            }
        }
        assert_eq!(
            lanes,
            [
                "score0x2", "step0x3", "score1x1", "step2x1", "step0x3", "step2x1", "step0x3",
                "step0x3"
            ]
        );
        for rx in sentiment {
            let scores = rx.blocking_recv().unwrap();
            assert!(scores.is_ok());
        }
        assert_eq!(end(&mut short).unwrap().tokens.len(), 2);
        for mut g in long {
            assert_eq!(end(&mut g).unwrap().tokens.len(), 4);
        }
    }

    #[test]
    fn interactive_inputs_go_first_and_alone() {
        let mut h = harness(4, Duration::ZERO);
        let labels = h.labels.clone();
        let mut older = h.sentiment_at(0, labels.clone(), Priority::Batch);
        let mut newer = h.sentiment_at(0, labels.clone(), Priority::Batch);
        let mut interactive = h.sentiment_at(0, labels, Priority::Interactive);
        assert_eq!(h.ticks(1), [Call::Score(1)]);
        assert!(
            interactive.try_recv().unwrap().is_ok(),
            "interactive first, not slowed down by batch work"
        );
        assert!(older.try_recv().is_err() && newer.try_recv().is_err());
        assert_eq!(h.ticks(1), [Call::Score(2)]);
        assert!(older.try_recv().unwrap().is_ok() && newer.try_recv().unwrap().is_ok());
    }

    #[test]
    fn backfill_batches_are_kept_short() {
        let mut h = harness(4, Duration::ZERO);
        let labels = h.labels.clone();
        let _batch: Vec<_> = (0..4)
            .map(|_| h.sentiment_at(0, labels.clone(), Priority::Batch))
            .collect();
        assert_eq!(h.ticks(2), [Call::Score(2), Call::Score(2)]);
    }

    #[test]
    fn batch_generations_leave_the_interactive_slots_free() {
        // 4 slots, 2 of them for interactive work only.
        let mut h = harness(4, Duration::ZERO);
        let batch: Vec<_> = (0..4)
            .map(|_| h.generate_at(0, 50, Priority::Batch))
            .collect();
        let calls = h.ticks(1);
        assert_eq!(calls[0], Call::Join(vec![0, 1]), "{calls:?}");
        let interactive: Vec<_> = (0..2)
            .map(|_| h.generate_at(0, 1, Priority::Interactive))
            .collect();
        let calls = h.ticks(1);
        assert_eq!(calls[0], Call::Join(vec![2, 3]), "{calls:?}");
        drop((batch, interactive));
    }

    #[test]
    fn a_job_for_a_variant_that_does_not_exist_is_refused() {
        let mut h = harness(2, Duration::ZERO);
        let rx = h.sentiment_on(3, h.labels.clone());
        let mut g = h.generate_on(1, 2);
        assert_eq!(h.ticks(1), []);
        assert!(rx.blocking_recv().unwrap().is_err());
        assert!(end(&mut g).unwrap_err().contains("no variant"));
    }

    #[test]
    fn the_backlog_counts_every_request_until_it_joins_a_batch() {
        let mut h = harness(4, Duration::ZERO);
        let waiting = |h: &Harness| (h.backlog.requests(), h.backlog.inputs());
        let generations: Vec<_> = (0..10).map(|_| h.generate(3)).collect();
        let scored: Vec<_> = (0..6).map(|_| h.sentiment()).collect();
        // Queued in the channel, before the engine has looked: all 16 wait.
        assert_eq!(waiting(&h), (16, 16));
        // A sentiment batch takes 4 inputs; the generations still wait in their lane.
        h.ticks(1);
        assert_eq!(waiting(&h), (12, 12));
        assert!(h.backlog.oldest().is_some());
        // A decode step admits 4 generations into the running batch; the other 6 wait.
        h.ticks(1);
        assert_eq!(waiting(&h), (8, 8));
        // Each later decode step admits who fits as sequences finish (a tick with nothing to do
        // would block on the queue, so stop once nothing waits).
        for _ in 0..40 {
            if waiting(&h) == (0, 0) {
                break;
            }
            h.ticks(1);
        }
        assert_eq!(waiting(&h), (0, 0));
        assert_eq!(h.backlog.oldest(), None);
        drop((generations, scored));
        while !h.batcher.idle() {
            h.ticks(1);
        }

        // A waiting request whose client went away, and one for a variant that does not exist,
        // leave the backlog too.
        let gone = h.generate(3);
        let busy = h.generate(3);
        drop(gone);
        let (reply, _unknown) = oneshot::channel();
        let job = SentimentJob {
            variant: 9,
            priority: Priority::Interactive,
            labels: h.labels.clone(),
            ids: vec![20, 1],
            reply,
            enqueued: Instant::now(),
            waiting: h.backlog.enter(1).pop(),
        };
        h.tx.send(Job::Sentiment(vec![job])).unwrap();
        assert_eq!(waiting(&h), (3, 3));
        h.ticks(1);
        assert_eq!(waiting(&h), (0, 0));
        drop(busy);
    }
}
