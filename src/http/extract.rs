//! The JSON body extractor of the inference routes.
//!
//! Malformed JSON is a 400. A well-formed body that does not fit the request type is a 422
//! naming the field (`parameters.top_k: invalid type ...`, `unknown field ...`), so a client
//! learns when part of its request would not be honoured. A field set to `null` counts as
//! absent, known or not, at any depth (TGI clients send every parameter, unset ones as `null`);
//! a `null` list element stays a value.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;

/// The member that must be an object when present.
const NESTED: &str = "parameters";

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large("request body is larger than --max-body-bytes")
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        from_value(value).map(JsonBody)
    }
}

/// A parsed body as `T`, nulls dropped, with the errors every route gives.
pub(super) fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    let body = without_nulls(value, "the request body")?;
    serde_path_to_error::deserialize(Value::Object(body)).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::validation(e.into_inner())
        } else {
            ApiError::validation(format!("`{path}`: {}", e.into_inner()))
        }
    })
}

/// The object `value` without `null` members at any depth; `parameters` must be an object
/// (serde would otherwise read a struct from a list).
fn without_nulls(value: Value, what: &str) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(map) = value else {
        return Err(ApiError::validation(format!(
            "{what} must be a JSON object"
        )));
    };
    map.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                v if k == NESTED => Value::Object(without_nulls(v, "`parameters`")?),
                v => nested(v),
            };
            Ok((k, v))
        })
        .collect()
}

/// `v` with every object in it (at any depth, in lists too) rid of its `null` members; a
/// `null` list element stays.
fn nested(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, nested(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(nested).collect()),
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nulls_vanish_at_any_depth_and_non_objects_are_refused() {
        let body = json!({"inputs": "x", "stream": null, "parameters": {"top_k": null, "seed": 1}});
        assert_eq!(
            Value::Object(without_nulls(body, "body").unwrap()),
            json!({"inputs": "x", "parameters": {"seed": 1}})
        );
        assert!(without_nulls(json!(["x"]), "body").is_err());
        assert!(without_nulls(json!({"parameters": [null]}), "body").is_err());
        // List elements that are null stay (and fail where a value is needed); objects in lists
        // lose their null members.
        let kept = json!({"inputs": ["a", null]});
        assert_eq!(
            Value::Object(without_nulls(kept.clone(), "body").unwrap()),
            kept
        );
        let messages = json!({"messages": [{"role": "user", "name": null}]});
        assert_eq!(
            Value::Object(without_nulls(messages, "body").unwrap()),
            json!({"messages": [{"role": "user"}]})
        );
    }
}
