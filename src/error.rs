//! The one error type of the library. Each variant says what went wrong in words a user can act
//! on; `http::error` is the only place that turns them into HTTP statuses. A request the engine
//! refuses is an [`Error::Invalid`]: it says which part of the request ([`Field`]) and which
//! server limit ([`Limit`]) are at fault, so that each caller names them in its own terms (a
//! JSON field, a CLI flag) and the engine names neither.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The part of a request that an [`Error::Invalid`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The texts (one of them, or how many there are).
    Inputs,
    /// The served variant a request names.
    Variant,
    /// A request's own labels.
    Labels,
    /// A request's own prompt template.
    Template,
    /// How many input tokens a generation keeps.
    Truncate,
    MaxNewTokens,
    Temperature,
    RepetitionPenalty,
    TopK,
    TopP,
    Seed,
    Stop,
    /// Token ids to decode.
    Ids,
    /// A runtime variant's name.
    VariantName,
    /// The adapters a runtime variant merges.
    Adapters,
    /// The targets of entity-level sentiment.
    Targets,
    /// The request for occlusion explanations.
    Explain,
    /// The output whose likelihood is asked for.
    Reference,
}

/// A server limit that a request went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MaxInputTokens,
    MaxClientBatchSize,
    MaxChunksPerInput,
    ChunkOverlap,
    MaxNewTokens,
    MaxTotalTokens,
    MaxStopSequences,
    MaxStopLength,
    MaxCandidateLabels,
    MaxLabelLength,
    MaxTargetsPerInput,
    MaxExplainWords,
    MaxSentencesPerInput,
    MaxWindowsPerRequest,
}

impl Limit {
    /// The limit's name in `/info`'s `limits`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxInputTokens => "max_input_tokens",
            Self::MaxClientBatchSize => "max_client_batch_size",
            Self::MaxChunksPerInput => "max_chunks_per_input",
            Self::ChunkOverlap => "chunk_overlap",
            Self::MaxNewTokens => "max_new_tokens",
            Self::MaxTotalTokens => "max_total_tokens",
            Self::MaxStopSequences => "max_stop_sequences",
            Self::MaxStopLength => "max_stop_length",
            Self::MaxCandidateLabels => "max_candidate_labels",
            Self::MaxLabelLength => "max_label_length",
            Self::MaxTargetsPerInput => "max_targets_per_input",
            Self::MaxExplainWords => "max_explain_words",
            Self::MaxSentencesPerInput => "max_sentences_per_input",
            Self::MaxWindowsPerRequest => "max_windows_per_request",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model's `config.json` (or what it implies) cannot be served.
    #[error("invalid model config: {0}")]
    ModelConfig(String),
    /// A setting chosen at start-up (device, dtype, labels, calibration, ...) is unusable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The engine could not start.
    #[error("cannot start the engine: {0}")]
    Startup(String),
    #[error("{file}: {message}")]
    Weights { file: String, message: String },
    #[error("adapter {file}: {message}")]
    Adapter { file: String, message: String },
    #[error("cannot resolve model `{model}`: {message}")]
    Hub { model: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request the engine refuses; `message` names neither a JSON field nor a flag.
    #[error("{message}")]
    Invalid {
        field: Field,
        /// The limit crossed, with its value.
        limit: Option<(Limit, usize)>,
        message: String,
    },
    /// What a request would create exists already (e.g. a variant's name).
    #[error("{0}")]
    Conflict(String),
    /// What a request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The audit log cannot take a record and must (`--audit-log-required`).
    #[error("{0}")]
    AuditUnavailable(String),
    #[error("the engine's queue is full")]
    QueueFull,
    #[error("the request passed its deadline")]
    Timeout,
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the engine is not running")]
    EngineDown,
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn weights(file: impl ToString, message: impl ToString) -> Self {
        Self::Weights {
            file: file.to_string(),
            message: message.to_string(),
        }
    }

    pub fn adapter(file: impl ToString, message: impl ToString) -> Self {
        Self::Adapter {
            file: file.to_string(),
            message: message.to_string(),
        }
    }

    /// A request refused for `field`.
    pub fn invalid(field: Field, message: impl ToString) -> Self {
        Self::Invalid {
            field,
            limit: None,
            message: message.to_string(),
        }
    }

    /// A request refused for `field` because it went over `limit`, whose value is `value`.
    pub fn over_limit(field: Field, limit: Limit, value: usize, message: impl ToString) -> Self {
        Self::Invalid {
            field,
            limit: Some((limit, value)),
            message: message.to_string(),
        }
    }
}
