//! The one error type of the library. Each variant says what went wrong in words a user can act
//! on; `http::error` is the only place that turns them into HTTP statuses.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{file}: {message}")]
    Weights { file: String, message: String },
    #[error("adapter {file}: {message}")]
    Adapter { file: String, message: String },
    #[error("cannot resolve model `{model}`: {message}")]
    Hub { model: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Validation(String),
    #[error("the server is at its limit of concurrent requests")]
    Overloaded,
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
}
