//! The one place where errors become HTTP responses: a status code and the JSON body
//! `{"error": ..., "error_type": ...}`, counted in `finserve_errors_total`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::types::ErrorResponse;
use crate::error::Error;
use crate::metrics::METRICS;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl ToString) -> Self {
        Self {
            status,
            error_type,
            message: message.to_string(),
        }
    }

    pub fn bad_request(message: impl ToString) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid API key (send `Authorization: Bearer <key>` or `x-api-key`)",
        )
    }

    pub fn too_large(message: impl ToString) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn validation(message: impl ToString) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the model is not loaded yet or the server is shutting down",
        )
    }

    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took longer than --request-timeout",
        )
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.message.clone(),
            error_type: self.error_type.to_string(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, kind) = match &e {
            Error::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            Error::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            Error::EngineDown => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Tokenizer(_) => (StatusCode::UNPROCESSABLE_ENTITY, "tokenizer"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "inference"),
        };
        Self::new(status, kind, e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        METRICS.errors.with_label_values(&[self.error_type]).inc();
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "request failed");
        } else {
            tracing::info!(status = %self.status, error = %self.message, "request refused");
        }
        (self.status, Json(self.body())).into_response()
    }
}
