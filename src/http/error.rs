//! The one place where errors become HTTP responses: a status code and the JSON body
//! `{"error": ..., "error_type": ...}`, counted in `finserve_errors_total`. An engine refusal
//! ([`Error::Invalid`]) is named here in the API's terms: its field as the request spells it,
//! and the flag that sets the limit it crossed.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::types::ErrorResponse;
use crate::error::{Error, Field, Limit};
use crate::metrics::METRICS;

/// The `error_type` of an error response (and the label of `finserve_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    BadRequest,
    Unauthorized,
    PayloadTooLarge,
    Validation,
    Tokenizer,
    ModelNotFound,
    NotFound,
    Conflict,
    Overloaded,
    ClientTimeout,
    Timeout,
    Unavailable,
    Inference,
    Internal,
}

impl ErrorType {
    pub const ALL: [Self; 14] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::PayloadTooLarge,
        Self::Validation,
        Self::Tokenizer,
        Self::ModelNotFound,
        Self::NotFound,
        Self::Conflict,
        Self::Overloaded,
        Self::ClientTimeout,
        Self::Timeout,
        Self::Unavailable,
        Self::Inference,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Validation => "validation",
            Self::Tokenizer => "tokenizer",
            Self::ModelNotFound => "model_not_found",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Overloaded => "overloaded",
            Self::ClientTimeout => "client_timeout",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Inference => "inference",
            Self::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Validation | Self::Tokenizer => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ModelNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict => StatusCode::CONFLICT,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Inference | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The flag that sets `limit`.
fn flag(limit: Limit) -> &'static str {
    match limit {
        Limit::MaxInputTokens => "--max-input-tokens",
        Limit::MaxClientBatchSize => "--max-client-batch-size",
        Limit::MaxChunksPerInput => "--max-chunks-per-input",
        Limit::ChunkOverlap => "--chunk-overlap",
        Limit::MaxNewTokens => "--max-new-tokens",
        Limit::MaxTotalTokens => "--max-total-tokens",
        Limit::MaxStopSequences => "--max-stop-sequences",
        Limit::MaxStopLength => "--max-stop-length",
        Limit::MaxCandidateLabels => "--max-candidate-labels",
        Limit::MaxLabelLength => "--max-label-length",
        Limit::MaxTargetsPerInput => "--max-targets-per-input",
        Limit::MaxExplainWords => "--max-explain-words",
        Limit::MaxSentencesPerInput => "--max-sentences-per-input",
        Limit::MaxWindowsPerRequest => "--max-windows-per-request",
    }
}

/// How a family of routes spells the fields of its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/v1/sentiment` (Hugging Face text classification).
    Sentiment,
    /// `/v1/generate`, `/tokenize`, `/decode` (text-generation-inference, TEI).
    Tgi,
    /// `/v1/completions`.
    OpenAi,
    /// `/v1/chat/completions`.
    Chat,
}

impl Dialect {
    fn field(self, field: Field) -> &'static str {
        let openai = matches!(self, Self::OpenAi | Self::Chat);
        match field {
            Field::Inputs if self == Self::Chat => "messages",
            Field::Inputs if openai => "prompt",
            Field::Inputs => "inputs",
            Field::Variant if openai => "model",
            Field::Variant => "parameters.adapter_id",
            Field::Labels => "parameters.candidate_labels",
            Field::Template => "parameters.prompt_template",
            Field::Truncate => "parameters.truncate",
            Field::MaxNewTokens if openai => "max_tokens",
            Field::MaxNewTokens => "parameters.max_new_tokens",
            Field::Temperature if openai => "temperature",
            Field::Temperature => "parameters.temperature",
            Field::RepetitionPenalty => "parameters.repetition_penalty",
            Field::TopK => "parameters.top_k",
            Field::TopP if openai => "top_p",
            Field::TopP => "parameters.top_p",
            Field::Seed if openai => "seed",
            Field::Seed => "parameters.seed",
            Field::Stop if openai => "stop",
            Field::Stop => "parameters.stop",
            Field::Ids => "ids",
            Field::VariantName => "name",
            Field::Adapters => "adapters",
            Field::Targets => "parameters.targets",
            Field::Explain => "parameters.explain",
            Field::Reference => "reference",
        }
    }

    /// What the client can do about an input over `max_input_tokens`.
    fn long_input_hint(self) -> &'static str {
        match self {
            Self::Sentiment => {
                "; set `truncate` to cut it, or `parameters.long_input: \"chunk\"` to score it in windows"
            }
            Self::Tgi => "; set `parameters.truncate` to cut it",
            Self::OpenAi | Self::Chat => "",
        }
    }

    /// `e` as this dialect's clients see it.
    pub fn error(self, e: Error) -> ApiError {
        let Error::Invalid {
            field,
            limit,
            message,
        } = e
        else {
            return e.into();
        };
        if matches!(self, Self::OpenAi | Self::Chat) && field == Field::Variant {
            return ApiError::new(ErrorType::ModelNotFound, format!("`model`: {message}"));
        }
        let mut text = format!("`{}`: {message}", self.field(field));
        if let Some((limit, value)) = limit {
            text += &format!(
                " (server limit {} ({value}), `{}` in /info)",
                flag(limit),
                limit.name()
            );
            if field == Field::Inputs && limit == Limit::MaxInputTokens {
                text += self.long_input_hint();
            }
        }
        ApiError::validation(text)
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub error_type: ErrorType,
    pub message: String,
}

impl ApiError {
    pub fn new(error_type: ErrorType, message: impl ToString) -> Self {
        Self {
            error_type,
            message: message.to_string(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.error_type.status()
    }

    pub fn bad_request(message: impl ToString) -> Self {
        Self::new(ErrorType::BadRequest, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            ErrorType::Unauthorized,
            "missing or invalid API key (send `Authorization: Bearer <key>` or `x-api-key`)",
        )
    }

    pub fn too_large(message: impl ToString) -> Self {
        Self::new(ErrorType::PayloadTooLarge, message)
    }

    pub fn validation(message: impl ToString) -> Self {
        Self::new(ErrorType::Validation, message)
    }

    /// Over `--max-concurrent-requests`.
    pub fn too_many_requests() -> Self {
        Self::new(
            ErrorType::Overloaded,
            "the server is at its limit of concurrent requests (--max-concurrent-requests)",
        )
    }

    /// Over the budget of request bodies held in memory at once.
    pub fn too_many_bodies() -> Self {
        Self::new(
            ErrorType::Overloaded,
            "the server holds as many request bodies as it may (--max-concurrent-requests x \
             --max-body-bytes); retry later",
        )
    }

    pub fn not_ready() -> Self {
        Self::new(
            ErrorType::Unavailable,
            "the model is not loaded yet or the server is shutting down",
        )
    }

    /// A client too slow to send its request.
    pub fn client_timeout() -> Self {
        Self::new(
            ErrorType::ClientTimeout,
            "the request body did not arrive within --client-timeout-ms",
        )
    }

    pub fn timeout() -> Self {
        Self::new(
            ErrorType::Timeout,
            "the request took longer than --request-timeout-ms",
        )
    }

    pub fn internal(message: impl ToString) -> Self {
        Self::new(ErrorType::Internal, message)
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.message.clone(),
            error_type: self.error_type.as_str().to_string(),
        }
    }
}

impl From<Error> for ApiError {
    /// The error in the TGI routes' terms; see [`Dialect::error`] for the others.
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Invalid { .. } => return Dialect::Tgi.error(e),
            Error::QueueFull => ErrorType::Overloaded,
            Error::Timeout => return Self::timeout(),
            Error::EngineDown => ErrorType::Unavailable,
            Error::Conflict(_) => ErrorType::Conflict,
            Error::AuditUnavailable(_) => ErrorType::Unavailable,
            Error::NotFound(_) => ErrorType::NotFound,
            Error::Tokenizer(_) => ErrorType::Tokenizer,
            _ => ErrorType::Inference,
        };
        Self::new(kind, e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        METRICS
            .errors
            .with_label_values(&[self.error_type.as_str()])
            .inc();
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = %status, error = ?self.message, "request failed");
        } else {
            tracing::info!(status = %status, error = ?self.message, "request refused");
        }
        (status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_distinct() {
        let names: std::collections::BTreeSet<_> =
            ErrorType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names.len(), ErrorType::ALL.len());
    }

    #[test]
    fn refusals_name_the_field_in_each_dialect() {
        let e = || {
            Error::over_limit(
                Field::MaxNewTokens,
                Limit::MaxNewTokens,
                8,
                "must be <= 8 (got 9)",
            )
        };
        let tgi = ApiError::from(e());
        assert_eq!(tgi.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            tgi.message
                .starts_with("`parameters.max_new_tokens`: must be <= 8")
        );
        assert!(tgi.message.contains("--max-new-tokens"), "{}", tgi.message);
        let openai = Dialect::OpenAi.error(e());
        assert!(
            openai.message.starts_with("`max_tokens`:"),
            "{}",
            openai.message
        );
        let unknown = Dialect::OpenAi.error(Error::invalid(Field::Variant, "no variant `x`"));
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        let long = Dialect::Sentiment.error(Error::over_limit(
            Field::Inputs,
            Limit::MaxInputTokens,
            512,
            "too long",
        ));
        assert!(long.message.contains("long_input"), "{}", long.message);
    }
}
