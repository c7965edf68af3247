//! What travels between [`super::Engine`] handles and the engine thread: the queued jobs and
//! what each one gets back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::backend::DynBackend;
use super::backlog::WaitingInput;
use super::generate::{FinishReason, GenerateParams};
use super::sentiment::{LabelScores, LabelSet};
use crate::error::{Error, Result};

/// Which work goes first. Batch work (a backfill) fills batches only after interactive work, and
/// its generations never take the decode slots reserved for interactive ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// The `priority` label of the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }
}

/// How long a request waited and how long the model worked on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Tokenizing its inputs (before it was queued).
    pub tokenize: Duration,
    pub queue: Duration,
    pub inference: Duration,
}

#[derive(Debug, Clone)]
pub struct SentimentOutput {
    pub scores: LabelScores,
    pub timing: Timing,
}

/// One generated token as reported to clients. `text` is what the token adds to the generated
/// text (see [`super::detokenizer`]): the texts of a sequence's tokens concatenate to its
/// `generated_text`, and the EOS token adds nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    /// The model's log-probability of the token, when the request asked for it.
    pub logprob: Option<f32>,
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
    /// The id of the lane that scores it.
    pub variant: u64,
    pub priority: Priority,
    pub ids: Vec<u32>,
    pub labels: Arc<LabelSet>,
    pub reply: oneshot::Sender<Result<SentimentOutput>>,
    pub enqueued: Instant,
    /// Counts the input in the backlog until it joins a batch (or is dropped).
    pub waiting: Option<WaitingInput>,
}

pub(crate) struct GenerateJob {
    /// The id of the lane that generates it.
    pub variant: u64,
    pub priority: Priority,
    pub ids: Vec<u32>,
    pub params: GenerateParams,
    pub events: mpsc::UnboundedSender<GenerateEvent>,
    pub enqueued: Instant,
    /// How long its input took to tokenize (reported in its [`Timing`]).
    pub tokenize: Duration,
    /// Counts the generation in the backlog until it joins the running batch (or is dropped).
    pub waiting: Option<WaitingInput>,
}

pub(crate) enum Job {
    /// One request's inputs, queued in one message so that the engine never starts a batch
    /// with only the first few of them (it wakes as soon as anything arrives).
    Sentiment(Vec<SentimentJob>),
    Generate(GenerateJob),
    /// A variant merged at runtime starts serving as lane `id`.
    AddLane {
        id: u64,
        name: String,
        backend: DynBackend,
    },
    /// Lane `id` is dropped, freeing its model; `done` says when.
    RemoveLane {
        id: u64,
        done: oneshot::Sender<()>,
    },
}
