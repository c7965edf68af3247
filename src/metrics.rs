//! Every Prometheus metric finserve exports, in one place (prefix `finserve_`).
//!
//! The engine records batch shapes and model-side timings; the HTTP layer records requests,
//! statuses and errors. Both use the process-wide [`METRICS`]; `/metrics` renders the default
//! registry, which also carries the process collector (resident memory, CPU seconds).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    exponential_buckets, register_gauge, register_histogram, register_histogram_vec,
    register_int_counter, register_int_counter_vec, register_int_gauge,
};

pub struct Metrics {
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub cancelled: IntCounterVec,
    pub request_duration: HistogramVec,
    pub tokenization_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub input_tokens: HistogramVec,
    pub generated_tokens: IntCounterVec,
    pub time_per_output_token: Histogram,
    pub queue_size: IntGauge,
    pub queue_inputs: IntGauge,
    pub queue_oldest_seconds: Gauge,
    pub batch_queue_size: IntGauge,
    pub batch_queue_inputs: IntGauge,
    pub batch_queue_oldest_seconds: Gauge,
    pub in_flight: IntGauge,
    pub batch_size: HistogramVec,
    pub batch_tokens: HistogramVec,
    pub forward_duration: HistogramVec,
    pub predictions: IntCounterVec,
    pub top_score: HistogramVec,
    pub model_load_seconds: Gauge,
    pub merge_seconds: Gauge,
    pub engine_up: IntGauge,
    pub failed_batches: IntCounter,
    pub failed_batches_in_a_row: IntGauge,
    pub audit_records: IntCounter,
    pub audit_dropped: IntCounterVec,
}

fn seconds(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(0.0005, 2.0, 18).expect("constant bucket parameters");
    register_histogram_vec!(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn counts(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(1.0, 2.0, 14).expect("constant bucket parameters");
    register_histogram_vec!(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// Registration only fails on a duplicate name, a programming error caught by any test run.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    Metrics {
    requests: register_int_counter_vec!(
        Opts::new(
            "finserve_requests_total",
            "HTTP requests by route and status code"
        ),
        &["route", "status"]
    )
    .expect("finserve_requests_total"),
    errors: register_int_counter_vec!(
        Opts::new("finserve_errors_total", "Error responses by error_type"),
        &["error_type"]
    )
    .expect("finserve_errors_total"),
    cancelled: register_int_counter_vec!(
        Opts::new(
            "finserve_cancelled_total",
            "Queued or running work dropped because its client went away"
        ),
        &["kind"]
    )
    .expect("finserve_cancelled_total"),
    request_duration: seconds(
        "finserve_request_duration_seconds",
        "End-to-end request duration",
        &["route"],
    ),
    tokenization_duration: seconds(
        "finserve_tokenization_duration_seconds",
        "Time spent tokenizing a request",
        &["route"],
    ),
    queue_duration: seconds(
        "finserve_queue_duration_seconds",
        "Time a request waited for the engine",
        &["route"],
    ),
    inference_duration: seconds(
        "finserve_inference_duration_seconds",
        "Time from joining a batch to the last result",
        &["route"],
    ),
    input_tokens: counts(
        "finserve_input_tokens",
        "Tokens the encoder read per request input (all its windows, targets, sentences and explained words)",
        &["route"],
    ),
    generated_tokens: register_int_counter_vec!(
        Opts::new(
            "finserve_generated_tokens_total",
            "Tokens generated, by variant"
        ),
        &["variant"]
    )
    .expect("finserve_generated_tokens_total"),
    time_per_output_token: register_histogram!(
        HistogramOpts::new(
            "finserve_time_per_output_token_seconds",
            "Mean decode time per generated token of a request"
        )
        .buckets(exponential_buckets(0.0005, 2.0, 16).expect("constant bucket parameters"))
    )
    .expect("finserve_time_per_output_token_seconds"),
    queue_size: register_int_gauge!(
        "finserve_queue_size",
        "Interactive requests waiting to join an engine batch (queued or in the batcher's own queues)"
    )
    .expect("finserve_queue_size"),
    queue_inputs: register_int_gauge!(
        "finserve_queue_inputs",
        "Inputs of the interactive requests waiting to join an engine batch"
    )
    .expect("finserve_queue_inputs"),
    queue_oldest_seconds: register_gauge!(
        "finserve_queue_oldest_seconds",
        "How long the oldest interactive request waiting to join an engine batch has waited (0 when none)"
    )
    .expect("finserve_queue_oldest_seconds"),
    batch_queue_size: register_int_gauge!(
        "finserve_batch_queue_size",
        "Batch-priority requests (a backfill) waiting to join an engine batch"
    )
    .expect("finserve_batch_queue_size"),
    batch_queue_inputs: register_int_gauge!(
        "finserve_batch_queue_inputs",
        "Inputs of the batch-priority requests waiting to join an engine batch"
    )
    .expect("finserve_batch_queue_inputs"),
    batch_queue_oldest_seconds: register_gauge!(
        "finserve_batch_queue_oldest_seconds",
        "How long the oldest batch-priority request has waited to join an engine batch (0 when none)"
    )
    .expect("finserve_batch_queue_oldest_seconds"),
    in_flight: register_int_gauge!("finserve_in_flight_requests", "Requests being handled")
        .expect("finserve_in_flight_requests"),
    batch_size: counts(
        "finserve_batch_size",
        "Sequences per engine step, by kind and variant",
        &["kind", "variant"],
    ),
    batch_tokens: counts(
        "finserve_batch_padded_tokens",
        "Padded tokens (longest input x batch size) per engine encoder pass, by kind and variant",
        &["kind", "variant"],
    ),
    forward_duration: seconds(
        "finserve_forward_duration_seconds",
        "Model time per engine pass, by kind (sentiment: a scored batch; prefill: encoding the \
         generations that join; decode: one token for every running generation) and variant",
        &["kind", "variant"],
    ),
    predictions: register_int_counter_vec!(
        Opts::new(
            "finserve_sentiment_predictions_total",
            "Top sentiment label of each input, by variant"
        ),
        &["variant", "label"]
    )
    .expect("finserve_sentiment_predictions_total"),
    top_score: register_histogram_vec!(
        HistogramOpts::new(
            "finserve_sentiment_top_score",
            "Score (probability) of the top label of each input, by variant and that label"
        )
        .buckets(vec![0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]),
        &["variant", "label"]
    )
    .expect("finserve_sentiment_top_score"),
    model_load_seconds: register_gauge!(
        "finserve_model_load_seconds",
        "Seconds spent loading and merging the model at startup"
    )
    .expect("finserve_model_load_seconds"),
    merge_seconds: register_gauge!(
        "finserve_lora_merge_seconds",
        "Seconds spent merging LoRA adapters at startup"
    )
    .expect("finserve_lora_merge_seconds"),
    engine_up: register_int_gauge!(
        "finserve_engine_up",
        "1 while the engine thread runs, 0 once it has died"
    )
    .expect("finserve_engine_up"),
    failed_batches: register_int_counter!(
        "finserve_failed_batches_total",
        "Engine batches (sentiment batches or decode steps) that failed"
    )
    .expect("finserve_failed_batches_total"),
    failed_batches_in_a_row: register_int_gauge!(
        "finserve_failed_batches_in_a_row",
        "Engine batches failed since the last success; /health is 503 at --max-failed-batches"
    )
    .expect("finserve_failed_batches_in_a_row"),
    audit_records: register_int_counter!(
        "finserve_audit_records_total",
        "Audit log records written (--audit-log)"
    )
    .expect("finserve_audit_records_total"),
    audit_dropped: register_int_counter_vec!(
        Opts::new(
            "finserve_audit_records_dropped_total",
            "Audit records lost: the writer was behind (full) or the sink failed (write_error)"
        ),
        &["reason"]
    )
    .expect("finserve_audit_records_dropped_total"),
}
});

/// When the oldest waiting request arrived, in microseconds since the Unix epoch, interactive
/// then batch priority; 0 when none waits. Kept as a time, not an age, so that a scrape reads the
/// age at that moment.
static OLDEST_WAITING: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Records when the oldest request of a priority (`batch` or not) waiting for the engine
/// arrived (`None`: none waits).
pub fn set_oldest_waiting(batch: bool, at: Option<SystemTime>) {
    let micros = at.map_or(0, |t| {
        t.duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros().max(1) as u64)
    });
    OLDEST_WAITING[usize::from(batch)].store(micros, Ordering::SeqCst);
}

/// The text exposition of every registered metric.
pub fn render() -> Result<String, prometheus::Error> {
    LazyLock::force(&METRICS);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let age = |oldest: &AtomicU64| match oldest.load(Ordering::SeqCst) {
        0 => 0.0,
        at => now.saturating_sub(at) as f64 / 1e6,
    };
    METRICS.queue_oldest_seconds.set(age(&OLDEST_WAITING[0]));
    METRICS
        .batch_queue_oldest_seconds
        .set(age(&OLDEST_WAITING[1]));
    let families = prometheus::gather();
    prometheus::TextEncoder::new().encode_to_string(&families)
}
