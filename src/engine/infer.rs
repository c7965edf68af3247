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
use super::targets::{self, Located, Target, TargetTemplate};
use super::validation::{self, GenerateOptions};
use super::{Engine, GenerateEvent, GenerateOutput, Priority, SentimentOutput, Timing, Variant};
use super::{explain, sentences};
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
    /// Score each sentence (windowed as `Chunk` when longer than a window); the text's scores
    /// are the token-weighted mean of its sentences' windows.
    Sentences,
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
    /// Per text, the targets to score it for (entity-level sentiment).
    pub targets: Option<Vec<Vec<Target>>>,
    /// With `targets`, also score each whole text (otherwise its own scores are left empty).
    pub text_scores_with_targets: bool,
    /// Also score each text (and target) once per word with that word removed.
    pub explain: bool,
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

/// A text's scores: the token-weighted mean of its windows' (one window unless chunked, its
/// sentences' windows in `Sentences` mode). Empty when the query had targets only, unless the
/// target template weighs the text's scores into the targets'.
#[derive(Debug, Clone, Default)]
pub struct TextScores {
    pub probs: Vec<f64>,
    pub log_probs: Vec<f64>,
    pub windows: Vec<WindowScores>,
    /// `Sentences` mode: each sentence's character span and scores.
    pub sentences: Vec<SpanScores>,
    /// Per target of the query, in its order.
    pub targets: Vec<TargetScores>,
    /// With `explain` and no targets: the text's scores without each word.
    pub words: Vec<Occluded>,
    /// Every token the encoder read for this text, over all its windows, targets and words.
    pub prompt_tokens: usize,
}

/// A sentence's scores.
#[derive(Debug, Clone)]
pub struct SpanScores {
    /// Characters, end exclusive.
    pub span: (usize, usize),
    pub scores: LabelScores,
    pub windows: Vec<WindowScores>,
}

/// A target's scores: the token-weighted mean of the windows that hold one of its mentions,
/// pooled with the text's when the target template weighs them in.
#[derive(Debug, Clone)]
pub struct TargetScores {
    /// The name, or a span's text.
    pub name: String,
    /// Its mentions, in characters (end exclusive).
    pub spans: Vec<(usize, usize)>,
    pub scores: LabelScores,
    /// With `explain`: its scores without each word outside its mentions.
    pub words: Vec<Occluded>,
}

/// Scores with one word removed: the word's attribution to a label is the scores' difference.
#[derive(Debug, Clone)]
pub struct Occluded {
    pub word: String,
    /// Characters, end exclusive.
    pub span: (usize, usize),
    pub scores: LabelScores,
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
        self.texts.iter().map(|t| t.prompt_tokens).sum()
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

/// The token-weighted mean of windows' scores.
fn mean(windows: &[WindowScores]) -> LabelScores {
    let n = windows.first().map_or(0, |w| w.scores.probs.len());
    let weight: usize = windows.iter().map(|w| w.tokens.max(1)).sum();
    let mut mean = LabelScores {
        probs: vec![0.0; n],
        log_probs: vec![0.0; n],
    };
    for w in windows {
        let share = w.tokens.max(1) as f64 / weight as f64;
        for (m, v) in mean.probs.iter_mut().zip(&w.scores.probs) {
            *m += v * share;
        }
        for (m, v) in mean.log_probs.iter_mut().zip(&w.scores.log_probs) {
            *m += v * share;
        }
    }
    mean
}

/// Pools each target's scores (and each of its occlusions) with the text's (and the text's
/// without the same word).
fn pool_targets(shown: &TargetTemplate, out: &mut TextScores) {
    let text = LabelScores {
        probs: out.probs.clone(),
        log_probs: out.log_probs.clone(),
    };
    for target in &mut out.targets {
        target.scores = shown.pool(&target.scores, &text);
        for word in &mut target.words {
            if let Some(without) = out.words.iter().find(|w| w.span == word.span) {
                word.scores = shown.pool(&word.scores, &without.scores);
            }
        }
    }
}

/// A score query tokenized: its variant (held until the answer), labels, and each text's units.
struct Prepared {
    variant: Arc<Variant>,
    priority: Priority,
    labels: Arc<LabelSet>,
    custom_labels: bool,
    texts: Vec<PreparedText>,
    tokenize: Duration,
}

/// A text broken into what is scored of it.
struct PreparedText {
    text: String,
    targets: Vec<Located>,
    /// Character spans of the sentences (`Sentences`) and of the occluded words, by unit role.
    sentences: Vec<(usize, usize)>,
    words: Vec<(usize, usize)>,
    units: Vec<Unit>,
}

/// One scored piece of a text, the windows of one prompt.
struct Unit {
    role: Role,
    windows: Vec<Window>,
}

#[derive(Clone, Copy)]
enum Role {
    Text,
    Sentence(usize),
    Target(usize),
    /// The text without word `.0`, or (`Some(t)`) target `t`'s prompt without it.
    Occluded(usize, Option<usize>),
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

    /// Validates and tokenizes `query`: the variant, the labels, each text's units.
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
        let targets = match query.targets {
            Some(t) if t.len() != query.texts.len() => {
                return Err(Error::invalid(
                    Field::Targets,
                    format!(
                        "{} target lists for {} inputs: give one list per input",
                        t.len(),
                        query.texts.len()
                    ),
                ));
            }
            Some(_) if query.long_input == LongInput::Sentences => {
                return Err(Error::invalid(
                    Field::Targets,
                    "targets cannot be combined with long_input `sentences` (use `chunk`: a \
                     target is scored in the windows that hold its mentions)",
                ));
            }
            Some(t) => t.into_iter().map(Some).collect(),
            None => vec![None; query.texts.len()],
        };
        if query.explain && query.long_input == LongInput::Sentences {
            return Err(Error::invalid(
                Field::Explain,
                "explanations cannot be combined with long_input `sentences`",
            ));
        }
        let texts = query
            .texts
            .into_iter()
            .zip(targets)
            .map(|(text, targets)| {
                let whole = targets.is_none() || query.text_scores_with_targets;
                self.prepare_text(
                    text,
                    targets,
                    whole,
                    query.explain,
                    &template,
                    &variant,
                    query.long_input,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let windows: usize = texts
            .iter()
            .flat_map(|t| &t.units)
            .map(|u| u.windows.len())
            .sum();
        let max = limits.max_windows_per_request;
        if windows > max {
            return Err(Error::over_limit(
                Field::Inputs,
                Limit::MaxWindowsPerRequest,
                max,
                format!(
                    "the request needs {windows} scored windows (over its inputs, targets, \
                     sentences, chunks and explained words), more than {max}"
                ),
            ));
        }
        Ok(Prepared {
            variant,
            priority: query.priority,
            labels,
            custom_labels,
            texts,
            tokenize: start.elapsed(),
        })
    }

    /// One text's units: the whole text (or its sentences), each target, each occlusion.
    #[allow(clippy::too_many_arguments)]
    fn prepare_text(
        &self,
        text: String,
        targets: Option<Vec<Target>>,
        whole: bool,
        explain: bool,
        template: &Template,
        variant: &Variant,
        long_input: LongInput,
    ) -> Result<PreparedText> {
        if super::is_blank(&text) {
            return Err(Error::invalid(
                Field::Inputs,
                "every text must contain a non-blank character",
            ));
        }
        let chars = |b: usize| text[..b].chars().count();
        // A target template that weighs in the text's scores needs them, and, to explain a
        // target, the text's without each word.
        let weighs = targets.is_some()
            && variant
                .target_template
                .as_deref()
                .is_some_and(|t| t.weighs_text());
        let mut units = Vec::new();
        let mut sentence_spans = Vec::new();
        if long_input == LongInput::Sentences {
            let spans = sentences::split(&text);
            let max = self.config.limits.max_sentences_per_input;
            if spans.len() > max {
                return Err(Error::over_limit(
                    Field::Inputs,
                    Limit::MaxSentencesPerInput,
                    max,
                    format!("the input has {} sentences, more than {max}", spans.len()),
                ));
            }
            for (i, &(s, e)) in spans.iter().enumerate() {
                let mut windows = self.windows(&text[s..e], template, LongInput::Chunk, None)?;
                for w in &mut windows {
                    w.span = (chars(s + w.span.0), chars(s + w.span.1));
                }
                units.push(Unit {
                    role: Role::Sentence(i),
                    windows,
                });
                sentence_spans.push((chars(s), chars(e)));
            }
        } else if whole || weighs {
            let mut windows = self.windows(&text, template, long_input, None)?;
            for w in &mut windows {
                w.span = (chars(w.span.0), chars(w.span.1));
            }
            units.push(Unit {
                role: Role::Text,
                windows,
            });
        }
        let words = if explain {
            let words = explain::words(&text);
            let max = self.config.limits.max_explain_words;
            if words.len() > max {
                return Err(Error::over_limit(
                    Field::Explain,
                    Limit::MaxExplainWords,
                    max,
                    format!("the input has {} words, more than {max}", words.len()),
                ));
            }
            if words.len() < 2 {
                return Err(Error::invalid(
                    Field::Explain,
                    "an explanation needs an input of at least two words",
                ));
            }
            words
        } else {
            Vec::new()
        };
        if targets.is_none() || weighs {
            for i in 0..words.len() {
                let occluded = explain::without(&text, &explain::cut(&text, &words, i));
                units.push(Unit {
                    role: Role::Occluded(i, None),
                    windows: self.windows(&occluded, template, long_input, None)?,
                });
            }
        }
        let located = match &targets {
            Some(targets) => {
                targets::locate(&text, targets, self.config.limits.max_targets_per_input)?
            }
            None => Vec::new(),
        };
        if !located.is_empty() {
            let shown = variant.target_template.as_deref().ok_or_else(|| {
                Error::invalid(
                    Field::Targets,
                    format!(
                        "`{}` has no target template (target_template.json beside its adapter, \
                         or --target-template), so it cannot score targets",
                        variant.name
                    ),
                )
            })?;
            for (t, target) in located.iter().enumerate() {
                let prompt = shown.prompt(&target.name);
                let mentions = target.byte_spans(&text);
                let (marked, ranges) = shown.mark(&text, &mentions);
                units.push(Unit {
                    role: Role::Target(t),
                    windows: self.windows(&marked, &prompt, long_input, Some(&ranges))?,
                });
                for i in 0..words.len() {
                    // The cut takes whitespace beside the word too: a mention it touches stays.
                    let cut = explain::cut(&text, &words, i);
                    if mentions
                        .iter()
                        .any(|m| m.start < cut.end && cut.start < m.end)
                    {
                        continue;
                    }
                    let occluded = explain::without(&text, &cut);
                    let shifted: Vec<_> = mentions
                        .iter()
                        .map(|m| explain::shift(m.start, &cut)..explain::shift(m.end, &cut))
                        .collect();
                    let (marked, ranges) = shown.mark(&occluded, &shifted);
                    units.push(Unit {
                        role: Role::Occluded(i, Some(t)),
                        windows: self.windows(&marked, &prompt, long_input, Some(&ranges))?,
                    });
                }
            }
        }
        let words = words
            .iter()
            .map(|w| (chars(w.start), chars(w.end)))
            .collect();
        Ok(PreparedText {
            text,
            targets: located,
            sentences: sentence_spans,
            words,
            units,
        })
    }

    /// The windows `text` is scored in, placed in `template`: one (refused or truncated when
    /// too long) or overlapping ones (`Chunk`, `Sentences`). With `mentions` (byte ranges of the
    /// text), only the windows that hold one of them.
    fn windows(
        &self,
        text: &str,
        template: &Template,
        long_input: LongInput,
        mentions: Option<&[std::ops::Range<usize>]>,
    ) -> Result<Vec<Window>> {
        let prompt = self.prompt(text, template)?;
        let max = self.config.max_input_tokens;
        let limits = &self.config.limits;
        let windows = match long_input {
            LongInput::Chunk | LongInput::Sentences => {
                prompt.windows(max, limits.chunk_overlap, limits.max_chunks_per_input)?
            }
            LongInput::Refuse | LongInput::Truncate(_) => {
                let direction = match long_input {
                    LongInput::Truncate(d) => Some(d),
                    _ => None,
                };
                vec![prompt.fit(max, direction)?.ok_or_else(|| {
                    Error::over_limit(
                        Field::Inputs,
                        Limit::MaxInputTokens,
                        max,
                        format!(
                            "the input has {} tokens with the prompt template, more than {max}",
                            prompt.ids.len()
                        ),
                    )
                })?]
            }
        };
        let Some(mentions) = mentions else {
            return Ok(windows);
        };
        let holding: Vec<Window> = windows
            .into_iter()
            .filter(|w| {
                mentions
                    .iter()
                    .any(|m| m.start < w.span.1 && w.span.0 < m.end)
            })
            .collect();
        if holding.is_empty() {
            return Err(Error::invalid(
                Field::Targets,
                "a target's mentions fall outside the truncated input (long_input `chunk` scores \
                 a target in the windows that hold it)",
            ));
        }
        Ok(holding)
    }

    #[allow(clippy::type_complexity)]
    fn submit_windows(
        &self,
        p: &Prepared,
    ) -> Result<(Vec<oneshot::Receiver<Result<SentimentOutput>>>, SystemTime)> {
        let inputs: Vec<Vec<u32>> = p
            .texts
            .iter()
            .flat_map(|t| &t.units)
            .flat_map(|u| u.windows.iter().map(|w| w.ids.clone()))
            .collect();
        let submitted = SystemTime::now();
        Ok((
            self.sentiment_all(inputs, p.labels.clone(), &p.variant, p.priority)?,
            submitted,
        ))
    }

    /// Each unit's scores (its windows' averaged by their input tokens), placed by its role.
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
        let mut texts = Vec::with_capacity(p.texts.len());
        for t in p.texts {
            let mut out = TextScores {
                targets: t
                    .targets
                    .iter()
                    .map(|target| TargetScores {
                        name: target.name.clone(),
                        spans: target.spans.clone(),
                        scores: LabelScores::default(),
                        words: Vec::new(),
                    })
                    .collect(),
                ..TextScores::default()
            };
            let word = |i: usize, scores: LabelScores| {
                let (s, e) = t.words[i];
                Occluded {
                    word: t.text.chars().skip(s).take(e - s).collect(),
                    span: (s, e),
                    scores,
                }
            };
            for unit in t.units {
                let mut windows = Vec::with_capacity(unit.windows.len());
                for w in unit.windows {
                    let result = results
                        .next()
                        .ok_or_else(|| Error::Inference("a window's result is missing".into()))?
                        .map_err(|_| Error::EngineDown)??;
                    timing.queue = timing.queue.max(result.timing.queue);
                    timing.inference = timing.inference.max(result.timing.inference);
                    out.prompt_tokens += w.ids.len();
                    windows.push(WindowScores {
                        span: w.span,
                        tokens: w.tokens,
                        prompt_tokens: w.ids.len(),
                        scores: result.scores,
                    });
                }
                let scores = mean(&windows);
                match unit.role {
                    Role::Text => {
                        (out.probs, out.log_probs) = (scores.probs, scores.log_probs);
                        out.windows = windows;
                    }
                    Role::Sentence(i) => out.sentences.push(SpanScores {
                        span: t.sentences[i],
                        scores,
                        windows,
                    }),
                    Role::Target(i) => out.targets[i].scores = scores,
                    Role::Occluded(i, None) => out.words.push(word(i, scores)),
                    Role::Occluded(i, Some(target)) => {
                        out.targets[target].words.push(word(i, scores))
                    }
                }
            }
            if let Some(shown) = p.variant.target_template.as_deref()
                && shown.weighs_text()
            {
                pool_targets(shown, &mut out);
            }
            if !out.sentences.is_empty() {
                out.windows = out
                    .sentences
                    .iter()
                    .flat_map(|s| s.windows.clone())
                    .collect();
                let scores = mean(&out.windows);
                (out.probs, out.log_probs) = (scores.probs, scores.log_probs);
            }
            texts.push(out);
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
