//! The request-level calls every caller uses: [`Engine::score`] scores texts against labels,
//! [`Engine::generate_text`] generates from a text. Each validates what is asked, tokenizes off
//! the async runtime, submits to the engine thread and waits (or hands back the event stream),
//! so the server, `finserve eval` and warm-up treat a text exactly alike.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;

use super::prompt::{Template, TruncationDirection, Window};
use super::sentiment::{LabelScores, LabelSet};
use super::validation::{self, GenerateOptions};
use super::{Engine, GenerateEvent, GenerateOutput, Priority, SentimentOutput, Timing, Variant};
use crate::error::{Error, Field, Limit, Result};

/// What happens to a text whose prompt is longer than `max_input_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LongInput {
    /// Refuse the request.
    #[default]
    Refuse,
    /// Cut the text from one end; the template's own tokens stay.
    Truncate(TruncationDirection),
    /// Score the text in overlapping windows and average them, weighted by their tokens.
    Chunk,
}

/// Texts to score, and how.
#[derive(Debug, Clone, Default)]
pub struct ScoreQuery {
    pub texts: Vec<String>,
    /// A served variant's name; `None` is the default model.
    pub variant: Option<String>,
    /// The request's own labels instead of the variant's (uncalibrated).
    pub labels: Option<Vec<String>>,
    /// The request's own prompt template instead of the server's.
    pub template: Option<String>,
    pub long_input: LongInput,
    pub priority: Priority,
}

/// One window of a text and its scores.
#[derive(Debug, Clone)]
pub struct WindowScores {
    /// The part of the text the window covers, in characters (end exclusive).
    pub span: (usize, usize),
    /// Input tokens in the window: its weight in the text's mean.
    pub tokens: usize,
    /// Every token the encoder read: input, template and EOS.
    pub prompt_tokens: usize,
    pub scores: LabelScores,
}

/// A text's scores: the token-weighted mean of its windows' (one window unless chunked).
#[derive(Debug, Clone)]
pub struct TextScores {
    pub probs: Vec<f64>,
    pub log_probs: Vec<f64>,
    pub windows: Vec<WindowScores>,
}

/// The answer to a [`ScoreQuery`].
#[derive(Debug, Clone)]
pub struct Scored {
    /// The variant that scored, by name.
    pub variant: String,
    /// That variant's digest.
    pub digest: String,
    /// The label names, in the order of every score vector.
    pub labels: Arc<LabelSet>,
    /// Whether the labels were the request's own.
    pub custom_labels: bool,
    pub texts: Vec<TextScores>,
    /// The slowest window's queue and inference times.
    pub timing: Timing,
    /// When the work was queued (for trace spans).
    pub submitted: SystemTime,
}

impl Scored {
    /// Every token the encoder read, over all texts and windows.
    pub fn prompt_tokens(&self) -> usize {
        self.texts
            .iter()
            .flat_map(|t| &t.windows)
            .map(|w| w.prompt_tokens)
            .sum()
    }
}

/// A text to generate from.
#[derive(Debug, Clone, Default)]
pub struct GenerateQuery {
    pub text: String,
    /// A served variant's name; `None` is the default model.
    pub variant: Option<String>,
    /// Keep at most this many input tokens (the start of the text, then EOS).
    pub truncate: Option<i64>,
    pub options: GenerateOptions,
    pub priority: Priority,
}

/// A queued generation.
#[derive(Debug)]
pub struct Generation {
    /// The variant that generates, by name.
    pub variant: String,
    /// That variant's digest.
    pub digest: String,
    /// The encoder's input.
    pub prompt_ids: Vec<u32>,
    pub events: UnboundedReceiver<GenerateEvent>,
    pub submitted: SystemTime,
    /// Keeps the variant served until the generation is dropped.
    _held: Arc<Variant>,
}

impl Generation {
    /// Waits for the end (until `deadline`, if any).
    pub async fn collect(mut self, deadline: Option<Instant>) -> Result<GenerateOutput> {
        loop {
            let event = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), self.events.recv())
                    .await
                    .map_err(|_| Error::Timeout)?,
                None => self.events.recv().await,
            };
            match event {
                Some(GenerateEvent::Token(_)) => {}
                Some(GenerateEvent::End(out)) => return Ok(out),
                Some(GenerateEvent::Error(e)) => return Err(e),
                None => return Err(Error::EngineDown),
            }
        }
    }
}

/// A score query tokenized: its variant (held until the answer), labels, and each text's windows.
struct Prepared {
    variant: Arc<Variant>,
    priority: Priority,
    labels: Arc<LabelSet>,
    custom_labels: bool,
    texts: Vec<(String, Vec<Window>)>,
    tokenize: Duration,
}

/// Runs CPU-bound `f` on the async runtime's blocking pool when there is a runtime, in a
/// `tokenize` span of the caller's.
pub async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let span = tracing::info_span!("tokenize");
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt
            .spawn_blocking(move || span.in_scope(f))
            .await
            .map_err(|e| Error::Inference(format!("tokenizer task failed: {e}")))?,
        Err(_) => span.in_scope(f),
    }
}

impl Engine {
    /// Scores `query`'s texts, waiting at most `timeout` (from when they are queued) for the
    /// engine.
    pub async fn score(&self, query: ScoreQuery, timeout: Option<Duration>) -> Result<Scored> {
        let engine = self.clone();
        let prepared = off_runtime(move || engine.prepare(query)).await?;
        let (receivers, submitted) = self.submit_windows(&prepared)?;
        let all = futures::future::join_all(receivers);
        let results = match timeout {
            Some(t) => tokio::time::timeout(t, all)
                .await
                .map_err(|_| Error::Timeout)?,
            None => all.await,
        };
        self.finish(prepared, results, submitted)
    }

    /// [`Engine::score`] for callers outside the async runtime (it blocks the thread).
    pub fn score_blocking(&self, query: ScoreQuery) -> Result<Scored> {
        let prepared = self.prepare(query)?;
        let (receivers, submitted) = self.submit_windows(&prepared)?;
        let results = receivers.into_iter().map(|r| r.blocking_recv()).collect();
        self.finish(prepared, results, submitted)
    }

    /// Validates and tokenizes `query`: the variant, the labels, each text's windows.
    fn prepare(&self, query: ScoreQuery) -> Result<Prepared> {
        let start = Instant::now();
        self.check_text_count(query.texts.len())?;
        let variant = self.variant(query.variant.as_deref())?;
        let limits = &self.config.limits;
        let custom_labels = query.labels.is_some();
        let labels = match query.labels {
            Some(names) => {
                validation::candidate_labels(&names, limits)?;
                Arc::new(LabelSet::new(&names, &self.tokenizer).map_err(|e| match e {
                    Error::InvalidArgument(msg) => Error::invalid(Field::Labels, msg),
                    other => other,
                })?)
            }
            None => variant.labels.clone(),
        };
        let template = match &query.template {
            Some(t) => Arc::new(Template::new(t)?),
            None => self.template.clone(),
        };
        let max = self.config.max_input_tokens;
        let texts = query
            .texts
            .into_iter()
            .map(|text| {
                let prompt = self.prompt(&text, &template)?;
                let windows = match query.long_input {
                    LongInput::Chunk => prompt.windows(
                        max,
                        limits.chunk_overlap,
                        limits.max_chunks_per_input,
                    )?,
                    LongInput::Refuse | LongInput::Truncate(_) => {
                        let direction = match query.long_input {
                            LongInput::Truncate(d) => Some(d),
                            _ => None,
                        };
                        let ids = prompt.fit(max, direction)?.ok_or_else(|| {
                            Error::over_limit(
                                Field::Inputs,
                                Limit::MaxInputTokens, max,
                                format!(
                                    "the input has {} tokens with the prompt template, more than {max}",
                                    prompt.ids.len()
                                ),
                            )
                        })?;
                        let tokens = ids.len();
                        vec![Window {
                            ids,
                            span: (0, text.len()),
                            tokens,
                        }]
                    }
                };
                Ok((text, windows))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prepared {
            variant,
            priority: query.priority,
            labels,
            custom_labels,
            texts,
            tokenize: start.elapsed(),
        })
    }

    #[allow(clippy::type_complexity)]
    fn submit_windows(
        &self,
        p: &Prepared,
    ) -> Result<(Vec<oneshot::Receiver<Result<SentimentOutput>>>, SystemTime)> {
        let inputs: Vec<Vec<u32>> = p
            .texts
            .iter()
            .flat_map(|(_, ws)| ws.iter().map(|w| w.ids.clone()))
            .collect();
        let submitted = SystemTime::now();
        Ok((
            self.sentiment_all(inputs, p.labels.clone(), &p.variant, p.priority)?,
            submitted,
        ))
    }

    /// Each text's scores: its windows' results averaged by their input tokens.
    fn finish(
        &self,
        p: Prepared,
        results: Vec<std::result::Result<Result<SentimentOutput>, oneshot::error::RecvError>>,
        submitted: SystemTime,
    ) -> Result<Scored> {
        let mut results = results.into_iter();
        let mut timing = Timing {
            tokenize: p.tokenize,
            ..Timing::default()
        };
        let n = p.labels.names.len();
        let mut texts = Vec::with_capacity(p.texts.len());
        for (text, ws) in p.texts {
            let weight: usize = ws.iter().map(|w| w.tokens.max(1)).sum();
            let (mut probs, mut log_probs) = (vec![0.0; n], vec![0.0; n]);
            let mut windows = Vec::with_capacity(ws.len());
            for w in ws {
                let out = results
                    .next()
                    .ok_or_else(|| Error::Inference("a window's result is missing".into()))?
                    .map_err(|_| Error::EngineDown)??;
                timing.queue = timing.queue.max(out.timing.queue);
                timing.inference = timing.inference.max(out.timing.inference);
                let share = w.tokens.max(1) as f64;
                for (mean, values) in [
                    (&mut probs, &out.scores.probs),
                    (&mut log_probs, &out.scores.log_probs),
                ] {
                    for (m, v) in mean.iter_mut().zip(values) {
                        *m += v * share / weight as f64;
                    }
                }
                let chars = |b: usize| text[..b].chars().count();
                windows.push(WindowScores {
                    span: (chars(w.span.0), chars(w.span.1)),
                    tokens: w.tokens,
                    prompt_tokens: w.ids.len(),
                    scores: out.scores,
                });
            }
            texts.push(TextScores {
                probs,
                log_probs,
                windows,
            });
        }
        Ok(Scored {
            variant: p.variant.name.clone(),
            digest: p.variant.digest.clone(),
            labels: p.labels,
            custom_labels: p.custom_labels,
            texts,
            timing,
            submitted,
        })
    }

    /// Validates `query`, tokenizes its text and queues the generation; the events arrive on
    /// the returned [`Generation`] (dropping it cancels the generation).
    pub async fn generate_text(&self, query: GenerateQuery) -> Result<Generation> {
        let variant = self.variant(query.variant.as_deref())?;
        let truncate = validation::positive(Field::Truncate, query.truncate)?;
        let engine = self.clone();
        let text = query.text;
        let start = Instant::now();
        let ids = off_runtime(move || engine.tokenize(&text, truncate)).await?;
        let tokenize = start.elapsed();
        let params = validation::generate_params(&query.options, ids.len(), &self.config.limits)?;
        let submitted = SystemTime::now();
        let events =
            self.queue_generation(ids.clone(), params, &variant, query.priority, tokenize)?;
        Ok(Generation {
            variant: variant.name.clone(),
            digest: variant.digest.clone(),
            prompt_ids: ids,
            events,
            submitted,
            _held: variant,
        })
    }
}
