//! The admin routes: merge a variant while serving (`POST /v1/adapters`), list the served ones
//! (`GET`), drain and drop one (`DELETE /v1/adapters/{name}`). They exist only with
//! `--admin-api-key` and take that key alone, so clients' inference keys cannot change what is
//! served.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::types::{AdapterLoadRequest, ErrorResponse, VariantInfo};
use crate::variants::{AdapterRequest, Origin, Variants};

/// Refuses requests without the admin key with 401.
pub(super) async fn authorize_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let allowed = state
        .config
        .admin_api_keys
        .as_ref()
        .is_some_and(|keys| super::auth::presented_key(&req).is_some_and(|k| keys.allows(k)));
    if !allowed {
        return super::refuse(req, ApiError::unauthorized(), &state).await;
    }
    next.run(req).await
}

fn variants(state: &AppState) -> Result<Arc<Variants>, ApiError> {
    state
        .variants
        .get()
        .cloned()
        .ok_or_else(ApiError::not_ready)
}

/// Every served model, the default first, with its digest and the bytes it holds alone.
#[utoipa::path(get, path = "/v1/adapters", tag = "admin",
    responses(
        (status = 200, body = Vec<VariantInfo>),
        (status = 401, description = "Missing or wrong admin key", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse)),
    security(("admin_key" = [])))]
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Vec<VariantInfo>>, ApiError> {
    Ok(Json(
        variants(&state)?
            .list()
            .iter()
            .map(VariantInfo::new)
            .collect(),
    ))
}

/// Merges a variant from adapters under `--adapter-root` and answers once it serves. Serving
/// goes on while it merges.
#[utoipa::path(post, path = "/v1/adapters", tag = "admin",
    request_body = AdapterLoadRequest,
    responses(
        (status = 201, description = "The variant serves", body = VariantInfo),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong admin key", body = ErrorResponse),
        (status = 409, description = "The name is taken or being changed, or --max-variants is reached", body = ErrorResponse),
        (status = 422, description = "Invalid name, or an adapter that cannot be read or merged", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse)),
    security(("admin_key" = [])))]
pub async fn load(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<AdapterLoadRequest>,
) -> Result<(StatusCode, Json<VariantInfo>), ApiError> {
    let adapters = req
        .adapters
        .into_iter()
        .map(|a| AdapterRequest {
            path: a.path,
            weight: a.weight.unwrap_or(1.0),
        })
        .collect();
    let variants = variants(&state)?;
    // On its own task: a client that hangs up must not leave a variant half loaded.
    let listing =
        tokio::spawn(async move { variants.load(&req.name, adapters, Origin::Api).await })
            .await
            .map_err(|e| ApiError::internal(format!("the merge task failed: {e}")))?
            .map_err(adapter_error)?;
    Ok((StatusCode::CREATED, Json(VariantInfo::new(&listing))))
}

/// Stops serving an API-loaded variant: new requests naming it get 422 (404 on the OpenAI
/// routes) at once; the answer comes once the requests that use it are done and it is freed.
#[utoipa::path(delete, path = "/v1/adapters/{name}", tag = "admin",
    params(("name" = String, Path, description = "The variant's name")),
    responses(
        (status = 204, description = "Drained and freed"),
        (status = 401, description = "Missing or wrong admin key", body = ErrorResponse),
        (status = 404, description = "No such variant", body = ErrorResponse),
        (status = 409, description = "A start-up or file variant, or one being changed", body = ErrorResponse),
        (status = 503, description = "Not ready", body = ErrorResponse)),
    security(("admin_key" = [])))]
pub async fn unload(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let variants = variants(&state)?;
    // Finished on its own task: a client that hangs up must not leave a variant half removed.
    tokio::spawn(async move { variants.unload(&name, Some(Origin::Api)).await })
        .await
        .map_err(|e| ApiError::internal(format!("the removal task failed: {e}")))?
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Errors of merging, where a bad adapter directory is the request's fault.
fn adapter_error(e: crate::error::Error) -> ApiError {
    use crate::error::Error;
    match e {
        Error::Adapter { .. } | Error::Hub { .. } | Error::Io { .. } | Error::ModelConfig(_) => {
            ApiError::validation(format!("`adapters`: {e}"))
        }
        other => other.into(),
    }
}
