//! Audit records of the inference routes (see [`crate::audit`]), made in one middleware so
//! every route records alike: the request's body (its input texts only with
//! `--audit-log-inputs`), what the handler says answered it ([`Facts`]: variant, digest, input
//! tokens) and the answer's own JSON, so a record reproduces the response. A streamed answer is
//! recorded when its last event has been sent; a client that leaves before then got no answer and
//! leaves no record.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;
use super::route::Route;

/// The request id `observe` chose, for the handlers and middleware inside it.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub String);

/// What answered a request, set by its handler on the response.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    pub variant: String,
    pub digest: String,
    pub input_tokens: usize,
    /// Where the outputs are: the response body, or for a stream what its end leaves here.
    pub streamed: Option<StreamOutputs>,
}

/// A streamed answer's outputs, filled in by the stream when it ends.
pub(crate) type StreamOutputs = Arc<Mutex<Option<Value>>>;

impl Facts {
    pub fn new(variant: &str, digest: &str, input_tokens: usize) -> Self {
        Self {
            variant: variant.to_string(),
            digest: digest.to_string(),
            input_tokens,
            streamed: None,
        }
    }

    /// `response` carrying these facts.
    pub fn on(self, mut response: Response) -> Response {
        response.extensions_mut().insert(self);
        response
    }
}

/// The request members that hold input text, per route.
fn input_fields(route: Route) -> &'static [&'static str] {
    match route {
        Route::Completions => &["prompt"],
        Route::ChatCompletions => &["messages"],
        Route::Classify => &["input"],
        Route::Score => &["text_1"],
        Route::Invocations => &["inputs", "prompt", "messages", "input", "text_1"],
        _ => &["inputs"],
    }
}

/// Records each answered request; refuses work up front (503) while records would be lost with
/// `--audit-log-required`.
pub(super) async fn audit(
    State(state): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let Some(log) = state.audit.get().cloned() else {
        return next.run(req).await;
    };
    if let Err(e) = log.check() {
        return super::refuse(req, ApiError::from(e), &state).await;
    }
    let started = Instant::now();
    let time = SystemTime::now();
    let route = Route::of_path(matched.as_ref().map(MatchedPath::as_str));
    let id = req
        .extensions()
        .get::<RequestId>()
        .map_or_else(String::new, |r| r.0.clone());
    let (parts, body) = req.into_parts();
    // The body is already in memory (read_body), within --max-body-bytes.
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::bad_request("cannot read the request body").into_response();
    };
    let request: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let Some(facts) = response
        .status()
        .is_success()
        .then(|| response.extensions().get::<Facts>().cloned())
        .flatten()
    else {
        return response;
    };
    let (mut parameters, inputs) = split_inputs(request, input_fields(route));
    if let Some(Value::Object(p)) = parameters.as_mut() {
        p.remove("stream");
    }
    let mut record = json!({
        "time": rfc3339(time),
        "request_id": id,
        "route": route.as_str(),
        "variant": facts.variant,
        "digest": facts.digest,
        "parameters": parameters,
        "input_tokens": facts.input_tokens,
    });
    // With `return_full_text` a generated text starts with the input.
    let full_text = parameters
        .as_ref()
        .and_then(|p| p.pointer("/parameters/return_full_text"))
        == Some(&Value::Bool(true));
    let inputs_text: Vec<String> = inputs
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|v| v.as_str().map(String::from))
        .filter(|_| full_text)
        .collect();
    if log.inputs {
        record["inputs"] = inputs;
    }
    let (parts, body) = response.into_parts();
    match facts.streamed {
        None => {
            let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
                return ApiError::internal("cannot read the answer").into_response();
            };
            record["outputs"] = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            record["latency_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
            if !log.inputs {
                redact(&mut record["outputs"], &inputs_text);
            }
            if let Err(e) = log.record(&record).await {
                return ApiError::from(e).into_response();
            }
            Response::from_parts(parts, Body::from(bytes))
        }
        Some(slot) => {
            let end = futures::stream::once(async move {
                let outputs = slot.lock().map(|mut s| s.take()).ok().flatten();
                // A stream that ended in an error answered nothing.
                if let Some(mut outputs) = outputs {
                    if !log.inputs {
                        redact(&mut outputs, &inputs_text);
                    }
                    record["outputs"] = outputs;
                    record["latency_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
                    // Lost records are counted; the answer has already gone out.
                    let _ = log.record(&record).await;
                }
                None
            })
            .filter_map(|x: Option<Result<axum::body::Bytes, axum::Error>>| async move { x });
            let body = body.into_data_stream().chain(end);
            Response::from_parts(parts, Body::from_stream(body))
        }
    }
}

/// `outputs` without what repeats the input: `prefill` (the input's tokens) and the `inputs`
/// text at the start of a `generated_text` (given only with `return_full_text`).
fn redact(outputs: &mut Value, inputs: &[String]) {
    match outputs {
        Value::Object(m) => {
            if m.get("prefill")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty())
            {
                m.remove("prefill");
            }
            if let Some(Value::String(text)) = m.get_mut("generated_text")
                && let Some(rest) = inputs.iter().find_map(|i| text.strip_prefix(i.as_str()))
            {
                *text = rest.to_string();
            }
            m.values_mut().for_each(|v| redact(v, inputs));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, inputs)),
        _ => {}
    }
}

/// The request without its input members, and those members (`null` if none).
fn split_inputs(request: Value, fields: &[&str]) -> (Option<Value>, Value) {
    let Value::Object(mut body) = request else {
        return (None, Value::Null);
    };
    let mut inputs = Map::new();
    for f in fields {
        if let Some(v) = body.remove(*f) {
            inputs.insert(f.to_string(), v);
        }
    }
    (Some(Value::Object(body)), Value::Object(inputs))
}

/// `t` as an RFC 3339 UTC timestamp with milliseconds.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_780_000_000_123);
        assert_eq!(rfc3339(t), "2026-05-28T20:26:40.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn outputs_lose_what_repeats_the_input() {
        let mut out = json!([{"generated_text": "Profit rose . positive",
                              "details": {"prefill": [{"id": 1}], "tokens": []}}]);
        redact(&mut out, &["Profit rose .".into()]);
        assert_eq!(
            out,
            json!([{"generated_text": " positive", "details": {"tokens": []}}])
        );
    }

    #[test]
    fn inputs_are_split_from_parameters() {
        let (p, i) = split_inputs(
            json!({"inputs": "x", "parameters": {"top_k": 1}}),
            &["inputs"],
        );
        assert_eq!(p, Some(json!({"parameters": {"top_k": 1}})));
        assert_eq!(i, json!({"inputs": "x"}));
    }
}
