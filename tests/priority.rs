//! Request priority over HTTP: `parameters.priority` and the `x-finserve-priority` header on
//! every inference route, refused when invalid or contradictory, and the batch-priority queue
//! gauges beside the interactive ones. The scheduling itself (interactive first, reserved decode
//! slots) is unit-tested in `src/engine/batcher.rs`.

mod common;

use common::start;
use serde_json::json;

#[test]
fn priority_is_asked_by_parameter_or_header_and_checked() {
    let s = start(&["--served-model-name", "fin"]);
    let text = "Profit rose .";
    let batch = [("x-finserve-priority", "batch")];
    let cases = [
        (
            "/v1/sentiment",
            json!({"inputs": text, "parameters": {"priority": "batch"}}),
            &[][..],
        ),
        ("/v1/sentiment", json!({"inputs": text}), &batch[..]),
        (
            "/v1/generate",
            json!({"inputs": text, "parameters": {"max_new_tokens": 2, "priority": "batch"}}),
            &[][..],
        ),
        (
            "/v1/chat/completions",
            json!({"model": "fin", "messages": [{"role": "user", "content": text}], "max_tokens": 2}),
            &batch[..],
        ),
        ("/predict", json!({"inputs": text}), &batch[..]),
    ];
    for (path, body, headers) in cases {
        let (status, v) = s.post_raw(path, &body.to_string(), headers);
        assert_eq!(status, 200, "{path}: {v}");
    }
    let (status, v) = s.post_raw(
        "/v1/sentiment",
        &json!({"inputs": text}).to_string(),
        &[("x-finserve-priority", "urgent")],
    );
    assert_eq!(status, 422, "{v}");
    assert!(v.contains("x-finserve-priority"), "{v}");
    let (status, v) = s.post_raw(
        "/v1/sentiment",
        &json!({"inputs": text, "parameters": {"priority": "interactive"}}).to_string(),
        &batch,
    );
    assert_eq!(status, 422, "{v}");
    let (status, _) = s.post(
        "/v1/sentiment",
        &json!({"inputs": text, "parameters": {"priority": "urgent"}}),
    );
    assert_eq!(status, 422);
    let metrics = s.metrics();
    for gauge in [
        "finserve_batch_queue_size 0",
        "finserve_batch_queue_inputs 0",
        "finserve_queue_size 0",
    ] {
        assert!(metrics.contains(gauge), "{gauge} missing");
    }
}

#[test]
fn interactive_slots_must_leave_room_for_batch_work() {
    let f = common::fixtures();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .args(["serve", "--port", "0", "--model"])
        .arg(f.join("mt5_base"))
        .args(["--max-batch-size", "4", "--interactive-slots", "4"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--interactive-slots (4)"), "{stderr}");
}
