//! The audit log over the real server: one record per answered request on every inference
//! route, holding exactly what was answered; input texts only when asked; rotation by size; a
//! sink that cannot be written is reported (and, when required, refused with 503), never a crash.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{metric_value, start};
use serde_json::{Value, json};

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The records in `path` once there are `n` (the writer is asynchronous).
fn wait_for(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = records(path);
        if r.len() >= n || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post(url: &str, path: &str, body: &Value) -> (u16, String, String, String) {
    let r = match ureq::post(&format!("{url}{path}")).send_json(body.clone()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = r.status();
    let id = r.header("x-request-id").unwrap_or("").to_string();
    let digest = r
        .header("x-finserve-model-digest")
        .unwrap_or("")
        .to_string();
    (status, id, digest, r.into_string().unwrap())
}

/// The data of the last JSON event of a server-sent stream that carries `key`.
fn last_event_with(body: &str, key: &str) -> Value {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .rfind(|v| v.get(key).is_some())
        .unwrap_or(Value::Null)
}

#[test]
fn every_answered_request_has_one_faithful_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let s = start(&[
        "--audit-log",
        log.to_str().unwrap(),
        "--served-model-name",
        "m",
    ]);
    let calls: Vec<(&str, Value)> = vec![
        (
            "/v1/sentiment",
            json!({"inputs": ["Profit rose .", "Sales fell ."], "parameters": {"top_k": 2}}),
        ),
        (
            "/v1/generate",
            json!({"inputs": "Profit rose .", "parameters": {"max_new_tokens": 4, "details": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "Profit rose .", "max_tokens": 3, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "Profit rose ."}], "max_tokens": 3, "temperature": 0}),
        ),
        ("/predict", json!({"inputs": "Profit rose ."})),
        ("/classify", json!({"input": ["Profit rose ."]})),
        (
            "/score",
            json!({"text_1": "Profit rose .", "text_2": ["up", "down"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "Profit rose ."}], "guided_choice": ["up", "down"]}),
        ),
    ];
    let mut answers = Vec::new();
    for (path, body) in &calls {
        let (status, id, digest, text) = post(&s.url, path, body);
        assert_eq!(status, 200, "{path}: {text}");
        answers.push((
            *path,
            id,
            digest,
            serde_json::from_str::<Value>(&text).unwrap(),
        ));
    }
    // Streams are recorded with what their last events carried.
    let (status, stream_id, _, stream) = post(
        &s.url,
        "/v1/generate",
        &json!({"inputs": "Profit rose .", "stream": true, "parameters": {"max_new_tokens": 4}}),
    );
    assert_eq!(status, 200);
    // A refused request answers nothing and leaves no record.
    let (status, ..) = post(&s.url, "/v1/sentiment", &json!({"inputs": ""}));
    assert_eq!(status, 422);
    let got = wait_for(&log, answers.len() + 1);
    assert_eq!(got.len(), answers.len() + 1, "{got:#?}");
    for (path, id, digest, body) in &answers {
        let r: Vec<&Value> = got.iter().filter(|r| r["request_id"] == *id).collect();
        assert_eq!(r.len(), 1, "{path}: one record per request");
        let r = r[0];
        assert_eq!(r["route"], *path);
        assert_eq!(r["outputs"], *body, "{path}: the record holds the answer");
        assert_eq!(r["digest"], *digest);
        assert!(r["input_tokens"].as_u64().unwrap() > 0, "{r}");
        assert!(r["latency_ms"].as_f64().unwrap() > 0.0);
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
        assert!(r.get("inputs").is_none(), "texts are off by default");
        let params = r["parameters"].to_string();
        assert!(!params.contains("Profit rose"), "{path}: {params}");
    }
    let sentiment = got.iter().find(|r| r["route"] == "/v1/sentiment").unwrap();
    assert_eq!(sentiment["parameters"]["parameters"]["top_k"], 2);
    let streamed = got.iter().find(|r| r["request_id"] == stream_id).unwrap();
    let last = last_event_with(&stream, "generated_text");
    assert_eq!(
        streamed["outputs"]["generated_text"],
        last["generated_text"]
    );
    assert_eq!(
        metric_value(&s.metrics(), "finserve_audit_records_total", ""),
        Some(got.len() as f64)
    );
}

#[test]
fn inputs_are_recorded_when_asked_and_files_rotate_by_size() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let s = start(&[
        "--audit-log",
        log.to_str().unwrap(),
        "--audit-log-inputs",
        "--audit-log-max-bytes",
        "4096",
        "--audit-log-keep",
        "50",
    ]);
    let n = 40;
    for i in 0..n {
        let text = format!("Profit rose {i} % .");
        let (status, ..) = post(&s.url, "/v1/sentiment", &json!({"inputs": text}));
        assert_eq!(status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut all = Vec::new();
    while Instant::now() < deadline {
        all = std::iter::once(log.clone())
            .chain((1..=50).map(|k| dir.path().join(format!("audit.jsonl.{k}"))))
            .flat_map(|p| records(&p))
            .collect();
        if all.len() >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        all.len(),
        n,
        "every record in the current or a rotated file"
    );
    assert!(dir.path().join("audit.jsonl.1").is_file(), "rotated");
    for f in std::fs::read_dir(dir.path()).unwrap() {
        assert!(f.unwrap().metadata().unwrap().len() <= 4096);
    }
    for i in 0..n {
        let text = format!("Profit rose {i} % .");
        assert_eq!(
            all.iter().filter(|r| r["inputs"]["inputs"] == text).count(),
            1,
            "{text}"
        );
    }
}

#[test]
fn a_full_disk_is_reported_not_a_crash_and_required_audits_refuse() {
    let s = start(&["--audit-log", "/dev/full"]);
    for _ in 0..3 {
        let (status, ..) = post(&s.url, "/v1/sentiment", &json!({"inputs": "Profit rose ."}));
        assert_eq!(status, 200, "serving goes on without --audit-log-required");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(
        &s.metrics(),
        "finserve_audit_records_dropped_total",
        "reason=\"write_error\"",
    )
    .unwrap_or(0.0)
        < 3.0
    {
        assert!(Instant::now() < deadline, "lost records were not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        s.log_text_with("cannot write the audit log")
            .contains("cannot write the audit log")
    );
    assert_eq!(s.get("/health").0, 200);

    // Required: no answer goes out before its record is written, so not even the first.
    let s = start(&["--audit-log", "/dev/full", "--audit-log-required"]);
    for _ in 0..3 {
        let (status, _, _, body) =
            post(&s.url, "/v1/sentiment", &json!({"inputs": "Profit rose ."}));
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("--audit-log-required"), "{body}");
    }
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn a_required_record_is_on_disk_before_the_answer_and_inputs_stay_out() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let s = start(&["--audit-log", log.to_str().unwrap(), "--audit-log-required"]);
    let text = "Profit rose .";
    let body = json!({"inputs": text, "parameters": {"max_new_tokens": 3, "return_full_text": true,
                      "details": true, "decoder_input_details": true}});
    let (status, _, _, answer) = post(&s.url, "/v1/generate", &body);
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert!(answer["generated_text"].as_str().unwrap().starts_with(text));
    // Read at once: the answer came only after its record was flushed.
    let got = records(&log);
    assert_eq!(got.len(), 1);
    let line = serde_json::to_string(&got[0]).unwrap();
    assert!(
        !line.contains(text),
        "the input text is in the record: {line}"
    );
    let generated = answer["generated_text"].as_str().unwrap();
    assert_eq!(got[0]["outputs"]["generated_text"], generated[text.len()..]);
    assert!(got[0]["outputs"]["details"].get("prefill").is_none());
}
