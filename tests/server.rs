//! The real server binary over HTTP: every route, every error status, streaming, API keys,
//! timing headers and request ids, batching under concurrency, cancellation, graceful shutdown,
//! the OpenAPI document, the Prometheus exposition, and the threads the server computes on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{assert_same_scores, label_scores, metric_value, start};
use serde_json::{Value, json};

const SHORT: &str = "Profit rose .";
const LONG: &str = "The company said that its operating profit for the full year rose to EUR 13.1 mn from EUR 8.7 mn , \
                    while net sales increased by 12 % to EUR 120 mn , driven by strong demand in Finland and Sweden .";

#[test]
fn routes_statuses_headers_and_spec() {
    let s = start(&[
        "--max-input-tokens",
        "24",
        "--chunk-overlap",
        "8",
        "--max-new-tokens",
        "40",
        "--max-body-bytes",
        "4096",
        "--max-client-batch-size",
        "4",
        "--max-total-tokens",
        "36",
        "--max-stop-sequences",
        "2",
        "--max-stop-length",
        "8",
    ]);
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/ready").0, 200);
    // CORS is off unless --cors-allow-origin is given.
    let resp = ureq::get(&format!("{}/health", s.url))
        .set("origin", "https://evil.example")
        .call()
        .unwrap();
    assert_eq!(resp.header("access-control-allow-origin"), None);

    let (code, info) = s.get("/info");
    assert_eq!(code, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["labels"], json!(["negative", "neutral", "positive"]));
    assert!(info["adapters"][0]["modules_merged"].as_u64().unwrap() > 0);
    assert_eq!(info["limits"]["max_input_tokens"], 24);

    // Sentiment: one string still gives [[...]], sorted, summing to 1.
    let (code, body) = s.post("/v1/sentiment", &json!({"inputs": SHORT}));
    assert_eq!(code, 200, "{body}");
    let entries = body.as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let p = label_scores(&entries[0]);
    assert_eq!(p.len(), 3);
    assert!(p.windows(2).all(|w| w[0].1 >= w[1].1));
    assert!((p.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": [SHORT, "Sales fell ."], "parameters": {"top_k": 1}}),
    );
    assert_eq!(code, 200);
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert_eq!(body[1].as_array().unwrap().len(), 1);

    // Too long: 422 unless truncated.
    let (code, body) = s.post("/v1/sentiment", &json!({"inputs": LONG}));
    assert_eq!(
        (code, body["error_type"].as_str()),
        (422, Some("validation")),
        "{body}"
    );
    assert_eq!(
        s.post("/v1/sentiment", &json!({"inputs": LONG, "truncate": true}))
            .0,
        200
    );

    // Error statuses and the one error shape; the message names what is wrong.
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "/v1/sentiment",
            "{not json".into(),
            400,
            "bad_request",
            "JSON",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": 5}).to_string(),
            422,
            "validation",
            "inputs",
        ),
        (
            "/v1/sentiment",
            json!(["x"]).to_string(),
            422,
            "validation",
            "object",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": ""}).to_string(),
            422,
            "validation",
            "inputs",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": " \t\u{3000}"}).to_string(),
            422,
            "validation",
            "non-blank",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": []}).to_string(),
            422,
            "validation",
            "inputs",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": SHORT, "parameters": {"top_k": 0}}).to_string(),
            422,
            "validation",
            "top_k",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": SHORT, "parameters": {"top_k": "1"}}).to_string(),
            422,
            "validation",
            "parameters.top_k",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": SHORT, "parameters": {"function_to_apply": "sigmoid"}}).to_string(),
            422,
            "validation",
            "softmax",
        ),
        // Unknown fields are refused, at the top level and in `parameters`.
        (
            "/v1/sentiment",
            json!({"inputs": SHORT, "parameters": {"multi_label": true}}).to_string(),
            422,
            "validation",
            "multi_label",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": SHORT, "options": {"wait_for_model": true}}).to_string(),
            422,
            "validation",
            "options",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": ["a", "b", "c", "d", "e"]}).to_string(),
            422,
            "validation",
            "--max-client-batch-size (4)",
        ),
        (
            "/v1/sentiment",
            json!({"inputs": "x".repeat(5000)}).to_string(),
            413,
            "payload_too_large",
            "--max-body-bytes",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"temperature": 0.0}}).to_string(),
            422,
            "validation",
            "temperature",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"top_p": 1.0}}).to_string(),
            422,
            "validation",
            "top_p",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"max_new_tokens": 41}}).to_string(),
            422,
            "validation",
            "max_new_tokens",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"max_new_tokens": 35}}).to_string(),
            422,
            "validation",
            "must be <= 36",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"typical_p": 0.5}}).to_string(),
            422,
            "validation",
            "typical_p",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"stop": ["a", "b", "c"]}}).to_string(),
            422,
            "validation",
            "up to 2 stop sequences",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"stop": ["x".repeat(100_000)]}}).to_string(),
            413,
            "payload_too_large",
            "--max-body-bytes",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"stop": ["x".repeat(9)]}}).to_string(),
            422,
            "validation",
            "1 to 8 characters",
        ),
        (
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"truncate": 0}}).to_string(),
            422,
            "validation",
            "truncate",
        ),
        (
            "/v1/generate",
            json!({"inputs": LONG}).to_string(),
            422,
            "validation",
            "max_input_tokens",
        ),
    ];
    for (path, body, status, kind, needle) in cases {
        let (code, text) = s.post_raw(path, &body, &[]);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_eq!(code, status, "{path} {body}: {text}");
        assert_eq!(v["error_type"], kind, "{path} {body}: {text}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(needle)),
            "{path} {body}: {text}"
        );
    }
    // Clients that send every field, unset ones as null (as TGI clients do), are served.
    let nulls = json!({"inputs": SHORT, "stream": null, "parameters": {
        "max_new_tokens": 2, "best_of": null, "watermark": null, "stop": null, "seed": null,
        "grammar": null, "adapter_id": null, "top_n_tokens": null}});
    assert_eq!(s.post("/v1/generate", &nulls).0, 200);
    let nulls = json!({"inputs": SHORT, "truncate": null, "parameters": {"top_k": null, "multi_label": null}});
    assert_eq!(s.post("/v1/sentiment", &nulls).0, 200);
    // Integers written as floats are integers (JSON Schema's reading).
    assert_eq!(
        s.post(
            "/v1/generate",
            &json!({"inputs": SHORT, "parameters": {"max_new_tokens": 2.0}})
        )
        .0,
        200
    );
    // return_full_text prefixes the input.
    let (_, full) = s.post(
        "/v1/generate",
        &json!({"inputs": SHORT, "parameters": {"max_new_tokens": 3, "return_full_text": true}}),
    );
    assert!(
        full["generated_text"].as_str().unwrap().starts_with(SHORT),
        "{full}"
    );

    // Generate with details; tokens add up; greedy is deterministic.
    let req = json!({"inputs": SHORT, "parameters": {"max_new_tokens": 12, "details": true, "decoder_input_details": true}});
    let (code, a) = s.post("/v1/generate", &req);
    assert_eq!(code, 200, "{a}");
    let d = &a["details"];
    assert_eq!(
        d["generated_tokens"].as_u64().unwrap() as usize,
        d["tokens"].as_array().unwrap().len()
    );
    assert!(["length", "eos_token"].contains(&d["finish_reason"].as_str().unwrap()));
    assert!(!d["prefill"].as_array().unwrap().is_empty());
    assert!(d["tokens"][0]["logprob"].as_f64().unwrap() <= 0.0);
    assert_eq!(
        s.post("/v1/generate", &req).1["generated_text"],
        a["generated_text"]
    );
    // Without details no log-probability is computed, and a greedy step may take `lm_head`'s
    // int8 screen (`model::greedy`): the same text.
    let plain = json!({"inputs": SHORT, "parameters": {"max_new_tokens": 12}});
    assert_eq!(
        s.post("/v1/generate", &plain).1["generated_text"],
        a["generated_text"]
    );

    // Sampling is reproducible by seed.
    let sample = json!({"inputs": SHORT, "parameters": {"max_new_tokens": 16, "do_sample": true, "seed": 42, "details": true}});
    let (x, y) = (
        s.post("/v1/generate", &sample).1,
        s.post("/v1/generate", &sample).1,
    );
    assert_eq!(x["generated_text"], y["generated_text"]);
    assert_eq!(x["details"]["seed"], 42);

    // A stop sequence taken from the greedy output ends generation there.
    let text = a["generated_text"].as_str().unwrap().to_string();
    let word = text
        .split_whitespace()
        .nth(1)
        .or(text.split_whitespace().next())
        .unwrap()
        .to_string();
    let (_, stopped) = s.post("/v1/generate", &json!({"inputs": SHORT, "parameters": {"max_new_tokens": 12, "stop": [word], "details": true}}));
    assert_eq!(
        stopped["details"]["finish_reason"], "stop_sequence",
        "{stopped}"
    );

    // Streaming: TGI events, the last carrying the same text as the plain request.
    let events = stream(
        &s.url,
        &json!({"inputs": SHORT, "stream": true, "parameters": {"max_new_tokens": 12}}),
    );
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"], a["generated_text"]);
    assert_eq!(
        last["details"]["generated_tokens"].as_u64().unwrap() as usize,
        events.len()
    );
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["generated_text"].is_null())
    );
    assert_eq!(
        events
            .iter()
            .map(|e| e["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<_>>()
    );
    let texts: String = events
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, a["generated_text"].as_str().unwrap());

    // /tokenize and /decode round-trip; offsets are character spans of the input; the
    // template option shows the tokens the sentiment route scores.
    let text = "Umsatz stieg um 5 % — naïve café .";
    let (code, toks) = s.post("/tokenize", &json!({"inputs": [text, SHORT]}));
    assert_eq!(code, 200, "{toks}");
    let first = toks[0].as_array().unwrap();
    assert!(first.last().unwrap()["special"].as_bool().unwrap());
    for t in first.iter().filter(|t| !t["special"].as_bool().unwrap()) {
        let (a, b) = (
            t["start"].as_u64().unwrap() as usize,
            t["stop"].as_u64().unwrap() as usize,
        );
        let span: String = text.chars().skip(a).take(b - a).collect();
        assert_eq!(t["text"].as_str().unwrap(), span);
    }
    // (The fixture's 250-piece vocabulary has no accents: round-trip the ASCII input.)
    let ids: Vec<u64> = toks[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let (code, decoded) = s.post("/decode", &json!({"ids": [ids.clone()]}));
    assert_eq!(code, 200, "{decoded}");
    assert_eq!(decoded[0], SHORT);
    let (_, direct) = s.post("/decode", &json!({"ids": ids}));
    assert_eq!(decoded, direct);
    let (_, again) = s.post("/tokenize", &json!({"inputs": decoded[0]}));
    assert_eq!(
        again[0], toks[1],
        "decode then tokenize gives the same tokens"
    );
    let (code, e) = s.post("/decode", &json!({"ids": [1, 100000]}));
    assert_eq!(code, 422, "{e}");
    assert!(e["error"].as_str().unwrap().contains("100000"), "{e}");
    let (_, no_special) = s.post(
        "/tokenize",
        &json!({"inputs": SHORT, "add_special_tokens": false}),
    );
    assert_eq!(
        no_special[0].as_array().unwrap().len(),
        toks[1].as_array().unwrap().len() - 1
    );

    // Request ids: echoed, or generated; present in that request's log lines. Timing headers.
    let resp = ureq::post(&format!("{}/v1/sentiment", s.url))
        .set("x-request-id", "req-abc-123")
        .send_json(json!({"inputs": SHORT}))
        .unwrap();
    assert_eq!(resp.header("x-request-id"), Some("req-abc-123"));
    for h in ["x-queue-time", "x-inference-time", "x-total-time"] {
        let v: f64 = resp
            .header(h)
            .unwrap_or_else(|| panic!("{h} missing"))
            .parse()
            .unwrap();
        assert!(v >= 0.0);
    }
    let resp = ureq::get(&format!("{}/health", s.url)).call().unwrap();
    assert_eq!(resp.header("x-request-id").unwrap().len(), 36);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        s.log_text()
            .lines()
            .any(|l| l.contains("req-abc-123") && l.contains("handled"))
    );

    // The committed spec is the default-limits document; the served one states this server's
    // limits. Swagger UI is served from the binary.
    let committed = std::fs::read_to_string(common::repo().join("openapi/openapi.json")).unwrap();
    assert!(
        serde_json::from_str::<Value>(&finserve::http::openapi::default_json().unwrap()).unwrap()
            == serde_json::from_str::<Value>(&committed).unwrap(),
        "openapi/openapi.json is stale: regenerate with `cargo run -- openapi > openapi/openapi.json`"
    );
    let (_, served) = s.get("/openapi.json");
    let served: Value = serde_json::from_str(&served).unwrap();
    let schemas = &served["components"]["schemas"];
    assert_eq!(schemas["Texts"]["maxItems"], 4);
    assert_eq!(
        schemas["GenerateParameters"]["properties"]["max_new_tokens"]["maximum"],
        40
    );
    assert_eq!(
        schemas["GenerateParameters"]["properties"]["stop"]["maxItems"],
        2
    );
    assert_eq!(schemas["StopSequence"]["maxLength"], 8);
    let (code, html) = s.get("/docs/");
    assert_eq!(code, 200);
    assert!(html.contains("swagger"), "{html}");

    let m = s.metrics();
    assert!(
        metric_value(
            &m,
            "finserve_requests_total",
            "route=\"/v1/sentiment\",status=\"200\""
        )
        .unwrap()
            >= 3.0
    );
    assert!(metric_value(&m, "finserve_errors_total", "error_type=\"validation\"").unwrap() >= 1.0);
    assert!(metric_value(&m, "finserve_lora_merge_seconds", "").is_some());
    assert!(m.contains("process_resident_memory_bytes"));
}

/// Streamed token texts are exact: for sampled generations from multilingual inputs, they
/// concatenate to the final `generated_text`, which equals the non-streamed text of the same seed.
#[test]
fn streamed_texts_concatenate_to_the_generated_text() {
    let s = start(&[]);
    let inputs = [
        "Le bénéfice d'exploitation a augmenté de 12 % à Zürich, señor.",
        "株価は決算発表後に急騰した。売上高は前年比15%増。",
        "Umsatz €1,2 Mrd 📈 — Gewinnwarnung? 🤔 naïve café",
        "\u{1F4B0}\u{200D}\u{1F525} Ωmega ΣΔ déjà vu",
    ];
    let mut checked = 0;
    for (i, text) in inputs.iter().enumerate() {
        for seed in 0..6u64 {
            let params = json!({"max_new_tokens": 24, "do_sample": true, "temperature": 1.5,
                                "seed": seed * 31 + i as u64, "details": true});
            let events = stream(
                &s.url,
                &json!({"inputs": text, "stream": true, "parameters": params}),
            );
            let last = events.last().unwrap();
            let generated = last["generated_text"].as_str().unwrap();
            let streamed: String = events
                .iter()
                .map(|e| e["token"]["text"].as_str().unwrap())
                .collect();
            assert_eq!(streamed, generated, "{text} seed {seed}: {events:?}");
            let (_, plain) = s.post(
                "/v1/generate",
                &json!({"inputs": text, "parameters": params}),
            );
            assert_eq!(plain["generated_text"], generated);
            let detail_texts: String = plain["details"]["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["text"].as_str().unwrap())
                .collect();
            assert_eq!(detail_texts, generated);
            checked += !generated.is_empty() as usize;
        }
    }
    assert!(checked > 12, "too few non-empty generations: {checked}");
}

/// A key read from --api-key-file works; neither it nor HF_TOKEN reaches the logs (at debug
/// level, every request logged); with --metrics-port, /metrics moves to its own listener.
#[test]
fn secrets_stay_out_of_logs_and_metrics_can_have_their_own_port() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "file-key-8c1f\n").unwrap();
    let f = common::fixtures();
    let args: Vec<String> = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--model",
        &f.join("mt5_base").display().to_string(),
        "--api-key-file",
        &key_file.display().to_string(),
    ]
    .map(String::from)
    .into();
    let s = common::start_with(
        &args,
        &[("HF_TOKEN", "hf_token_5e2a"), ("FINSERVE_LOG", "debug")],
    );
    let body = json!({"inputs": SHORT}).to_string();
    assert_eq!(s.post_raw("/v1/sentiment", &body, &[]).0, 401);
    assert_eq!(
        s.post_raw("/v1/sentiment", &body, &[("x-api-key", "file-key-8c1f")])
            .0,
        200
    );
    assert_eq!(
        s.post_raw(
            "/v1/sentiment",
            &body,
            &[("authorization", "Bearer file-key-8c1f")]
        )
        .0,
        200
    );
    assert_eq!(s.get("/metrics").0, 404);
    let (_, doc) = s.get("/openapi.json");
    assert!(
        !doc.contains("/metrics"),
        "the API listener's spec lists /metrics"
    );
    let metrics_addr = s
        .log_text()
        .lines()
        .find_map(|l| {
            l.split("metrics_address=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_string())
        })
        .expect("metrics address logged");
    let m = ureq::get(&format!("http://{metrics_addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(m.contains("finserve_requests_total"));
    std::thread::sleep(Duration::from_millis(100));
    let logs = s.log_text();
    assert!(logs.matches("handled").count() >= 4, "{logs}");
    for secret in ["file-key-8c1f", "hf_token_5e2a"] {
        assert!(!logs.contains(secret), "{secret} leaked into the log");
    }
}

/// Posts a streaming request and returns the parsed `data:` events.
fn stream(url: &str, body: &Value) -> Vec<Value> {
    let resp = ureq::post(&format!("{url}/v1/generate"))
        .send_json(body)
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    BufReader::new(resp.into_reader())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            l.strip_prefix("data:")
                .map(|d| serde_json::from_str(d.trim()).unwrap())
        })
        .collect()
}

#[test]
fn metrics_pass_promtool() {
    let s = start(&[]);
    s.post("/v1/sentiment", &json!({"inputs": SHORT}));
    s.post("/v1/generate", &json!({"inputs": SHORT}));
    let mut child = std::process::Command::new(common::which("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(s.metrics().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn api_key_is_required_when_set() {
    let s = start(&[
        "--api-key",
        "s3cret",
        "--cors-allow-origin",
        "https://app.example",
    ]);
    let preflight = ureq::request("OPTIONS", &format!("{}/v1/sentiment", s.url))
        .set("origin", "https://app.example")
        .set("access-control-request-method", "POST")
        .call()
        .unwrap();
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let body = json!({"inputs": SHORT}).to_string();
    let (code, text) = s.post_raw("/v1/sentiment", &body, &[]);
    assert_eq!(code, 401);
    assert!(text.contains("unauthorized"));
    assert_eq!(
        s.post_raw("/v1/sentiment", &body, &[("authorization", "Bearer wrong")])
            .0,
        401
    );
    assert_eq!(
        s.post_raw(
            "/v1/sentiment",
            &body,
            &[("authorization", "Bearer s3cret")]
        )
        .0,
        200
    );
    assert_eq!(
        s.post_raw(
            "/v1/generate",
            &json!({"inputs": SHORT}).to_string(),
            &[("x-api-key", "s3cret")]
        )
        .0,
        200
    );
    assert_eq!(s.get("/info").0, 401);
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/metrics").0, 200);
}

#[test]
fn concurrent_requests_batch_and_match_one_at_a_time() {
    let s = start(&["--max-batch-wait-ms", "30", "--max-batch-size", "16"]);
    let texts: Vec<String> = (0..24)
        .map(|i| match i % 3 {
            0 => SHORT.to_string(),
            1 => format!("Net sales decreased by {i} % in the quarter ."),
            _ => LONG.to_string(),
        })
        .collect();
    let alone: Vec<Value> = texts
        .iter()
        .map(|t| s.post("/v1/sentiment", &json!({"inputs": t})).1)
        .collect();
    let gen_alone: Vec<Value> = texts[..6]
        .iter()
        .map(|t| {
            s.post(
                "/v1/generate",
                &json!({"inputs": t, "parameters": {"max_new_tokens": 20}}),
            )
            .1
        })
        .collect();
    let url = s.url.clone();
    let handles: Vec<_> = texts
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, t)| {
            let url = url.clone();
            std::thread::spawn(move || {
                let route = if i < 6 { "generate" } else { "sentiment" };
                let body = if i < 6 {
                    json!({"inputs": t, "parameters": {"max_new_tokens": 20}})
                } else {
                    json!({"inputs": t})
                };
                let v: Value = ureq::post(&format!("{url}/v1/{route}"))
                    .send_json(body)
                    .unwrap()
                    .into_json()
                    .unwrap();
                (i, v)
            })
        })
        .collect();
    for h in handles {
        let (i, v) = h.join().unwrap();
        if i < 6 {
            assert_eq!(v, gen_alone[i], "generate {i}");
        } else {
            assert_same_scores(&v, &alone[i], i);
        }
    }
    let m = s.metrics();
    let info: Value = serde_json::from_str(&s.get("/info").1).unwrap();
    let name = info["name"].as_str().unwrap();
    for kind in ["sentiment", "generate"] {
        let label = format!("kind=\"{kind}\",variant=\"{name}\"");
        let count = metric_value(&m, "finserve_batch_size_count", &label).unwrap();
        let singles = metric_value(
            &m,
            "finserve_batch_size_bucket",
            &format!("{label},le=\"1\""),
        )
        .unwrap();
        assert!(
            count > singles,
            "{kind}: no batch larger than one ({singles} of {count} were single)"
        );
    }
    for kind in ["sentiment", "prefill", "decode"] {
        let label = format!("kind=\"{kind}\",variant=\"{name}\"");
        let passes = metric_value(&m, "finserve_forward_duration_seconds_count", &label).unwrap();
        let seconds = metric_value(&m, "finserve_forward_duration_seconds_sum", &label).unwrap();
        assert!(
            passes > 0.0 && seconds > 0.0,
            "{kind}: {passes} passes, {seconds} s"
        );
    }
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|name| name.trim().to_string())
        .collect()
}

/// candle runs elementwise ops of 64K elements or more on a pool of its own, whose idle workers
/// spin on the cores the engine computes on, unless it is given one thread (`cli::run`).
#[test]
fn candle_starts_no_thread_pool_beside_the_engines() {
    let s = start(&[]);
    // 32 inputs of about 50 tokens at the demo's d_model 128: encoder activations of about 200K
    // elements, enough for candle's pool (the build before `cli::run` set it started `candle-bp-0`).
    let inputs: Vec<String> = (0..32).map(|i| format!("{LONG} {i}")).collect();
    let (code, body) = s.post("/v1/sentiment", &json!({"inputs": inputs}));
    assert_eq!(code, 200, "{body}");
    let names = thread_names(s.child.id());
    assert!(
        names.iter().any(|n| n.starts_with("finserve-engine")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with("candle")), "{names:?}");
}

#[test]
fn too_many_concurrent_requests_get_429() {
    // With a long batch wait, a lone sentiment request stays in flight for ~2 s.
    let s = start(&[
        "--max-concurrent-requests",
        "1",
        "--max-batch-wait-ms",
        "2000",
    ]);
    let url = s.url.clone();
    let first = std::thread::spawn(move || {
        ureq::post(&format!("{url}/v1/sentiment"))
            .send_json(json!({"inputs": SHORT}))
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = s.post_raw("/v1/generate", &json!({"inputs": SHORT}).to_string(), &[]);
    assert_eq!(code, 429, "{text}");
    assert!(text.contains("overloaded"));
    assert_eq!(first.join().unwrap().unwrap(), 200);
}

#[test]
fn request_timeout_gives_504() {
    let s = start(&["--request-timeout-ms", "200", "--max-batch-wait-ms", "1500"]);
    let (code, text) = s.post_raw("/v1/sentiment", &json!({"inputs": SHORT}).to_string(), &[]);
    assert_eq!(code, 504, "{text}");
    assert!(text.contains("timeout"));
}

#[test]
fn disconnected_clients_are_dropped_from_the_batch() {
    let s = start(&["--max-new-tokens", "4000"]);
    let addr = s.url.trim_start_matches("http://").to_string();
    let body = json!({"inputs": SHORT, "stream": true, "parameters": {"max_new_tokens": 4000}})
        .to_string();
    let mut sock = TcpStream::connect(&addr).unwrap();
    write!(sock, "POST /v1/generate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    sock.read_exact(&mut first).unwrap();
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = s.metrics();
        if metric_value(&m, "finserve_cancelled_total", "kind=\"generate\"").unwrap_or(0.0) >= 1.0 {
            // It never finished, so none of its tokens were counted as generated.
            assert_eq!(
                metric_value(&m, "finserve_generated_tokens_total", "").unwrap_or(0.0),
                2.0,
                "only the warm-up's 2 tokens should be counted"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled generation was not dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut s = start(&["--max-batch-wait-ms", "1500", "--shutdown-timeout", "10"]);
    let url = s.url.clone();
    let inflight = std::thread::spawn(move || {
        ureq::post(&format!("{url}/v1/sentiment"))
            .send_json(json!({"inputs": SHORT}))
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = s.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(inflight.join().unwrap().unwrap(), 200);
    assert!(s.log_text().contains("shut down cleanly"));
}

#[test]
fn refuses_to_start_with_a_precise_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .args(["serve", "--port", "0", "--model"])
        .arg(common::fixtures().join("mt5_base"))
        .arg("--adapter")
        .arg(common::fixtures().join("adapters/t5_qv"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("adapters/t5_qv") && err.contains("lora_A"),
        "{err}"
    );
}

#[test]
fn without_a_model_it_says_what_to_pass() {
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(empty.path())
        .env_remove("FINSERVE_HOME")
        .env_remove("FINSERVE_MODEL")
        .args(["--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--model") && err.contains("FINSERVE_HOME"),
        "{err}"
    );
}

/// Every `route` label value is one route's path (one spelling per route, OpenAI routes
/// included), and no text a request chooses becomes a label value: 100 distinct candidate label
/// sets add no series, and a line break in an unknown `adapter_id` cannot forge a log line.
#[test]
fn metric_labels_are_bounded_and_user_strings_stay_on_one_log_line() {
    let s = start(&[]);
    let routes = [
        "/v1/sentiment",
        "/v1/generate",
        "/tokenize",
        "/decode",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/info",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/",
        "/docs",
        "unmatched",
    ];
    let model = s.get("/v1/models").1;
    let model: Value = serde_json::from_str(&model).unwrap();
    let model = model["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(s.post("/v1/sentiment", &json!({"inputs": SHORT})).0, 200);
    let generate = json!({"inputs": SHORT, "parameters": {"max_new_tokens": 2}});
    assert_eq!(s.post("/v1/generate", &generate).0, 200);
    let stream = json!({"inputs": SHORT, "stream": true, "parameters": {"max_new_tokens": 2}});
    assert_eq!(s.post_raw("/v1/generate", &stream.to_string(), &[]).0, 200);
    assert_eq!(s.post("/tokenize", &json!({"inputs": SHORT})).0, 200);
    assert_eq!(s.post("/decode", &json!({"ids": [5, 6]})).0, 200);
    for stream in [false, true] {
        let cmpl = json!({"model": model, "prompt": SHORT, "max_tokens": 2, "stream": stream});
        assert_eq!(s.post_raw("/v1/completions", &cmpl.to_string(), &[]).0, 200);
        let chat = json!({"model": model, "messages": [{"role": "user", "content": SHORT}],
                          "max_tokens": 2, "stream": stream});
        assert_eq!(
            s.post_raw("/v1/chat/completions", &chat.to_string(), &[]).0,
            200
        );
    }
    for path in [
        "/info",
        "/health",
        "/ready",
        "/openapi.json",
        "/",
        "/docs/",
        "/nowhere",
    ] {
        s.get(path);
    }
    let route_values = |metrics: &str| -> std::collections::BTreeSet<String> {
        metrics
            .split("route=\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(String::from)
            .collect()
    };
    let seen = route_values(&s.metrics());
    for value in &seen {
        assert!(
            routes.contains(&value.as_str()),
            "unknown route label {value:?}"
        );
    }
    for route in [
        "/v1/sentiment",
        "/v1/generate",
        "/v1/completions",
        "/v1/chat/completions",
    ] {
        assert!(seen.contains(route), "{route} missing from {seen:?}");
    }

    // Per-request labels are counted under one fixed value.
    let series = |m: &str| m.lines().filter(|l| !l.starts_with('#')).count();
    let custom = |i: usize| {
        json!({"inputs": SHORT, "parameters": {
        "candidate_labels": [format!("up{i}"), format!("down{i}")]}})
    };
    assert_eq!(s.post("/v1/sentiment", &custom(1000)).0, 200);
    let before = s.metrics();
    for i in 0..100 {
        assert_eq!(s.post("/v1/sentiment", &custom(i)).0, 200);
    }
    let after = s.metrics();
    assert_eq!(series(&before), series(&after), "metric series grew");
    assert!(!after.contains("up7") && !after.contains("down7"));
    assert!(after.contains("label=\"custom\""));

    // A user string with a line break is logged escaped, on its request's line.
    let forged =
        json!({"inputs": SHORT, "parameters": {"adapter_id": "x\nFORGED request refused"}});
    assert_eq!(s.post("/v1/sentiment", &forged).0, 422);
    let logs = s.log_text_with("x\\nFORGED");
    assert!(logs.contains("x\\nFORGED"), "{logs}");
    assert!(!logs.lines().any(|l| l.starts_with("FORGED")), "{logs}");
}

/// 64 clients that send headers and then stall mid-body hold no `--max-concurrent-requests`
/// slot: a normal request is answered at once, and the stalled connections are closed (408)
/// after `--client-timeout-ms`; a client that never finishes its headers is closed too.
#[test]
fn stalled_clients_neither_hold_slots_nor_stay_connected() {
    let s = start(&[
        "--max-concurrent-requests",
        "32",
        "--client-timeout-ms",
        "1500",
    ]);
    let addr = s.url.trim_start_matches("http://").to_string();
    let stalled: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            write!(
                c,
                "POST /v1/sentiment HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
                 content-length: 100\r\n\r\n{{\"inputs\": \"Pro"
            )
            .unwrap();
            c
        })
        .collect();
    let mut half_headers = TcpStream::connect(&addr).unwrap();
    write!(half_headers, "POST /v1/sentiment HTTP/1.1\r\nHost: x\r\n").unwrap();
    let silent = TcpStream::connect(&addr).unwrap();
    // One byte of a request line, or of HTTP/2's preface, then nothing.
    let mut one_byte = TcpStream::connect(&addr).unwrap();
    write!(one_byte, "P").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (code, body) = s.post("/v1/sentiment", &json!({"inputs": SHORT}));
    assert_eq!(code, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a normal request waited {:?} behind stalled clients",
        started.elapsed()
    );
    let answer = |mut c: TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        // The server answers or not, then closes: read_to_string ends (a timeout would fail).
        c.read_to_string(&mut answer).unwrap();
        answer
    };
    for c in stalled {
        let a = answer(c);
        assert!(a.starts_with("HTTP/1.1 408"), "{a}");
        assert!(a.contains("client_timeout"), "{a}");
    }
    // Unfinished headers and silence get no answer, only the closed connection.
    for c in [half_headers, silent, one_byte] {
        let a = answer(c);
        assert!(a.is_empty() || a.starts_with("HTTP/1.1 408"), "{a}");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// Keys rotate on a running server: the new key is added to the file (picked up on SIGHUP,
/// with the file watch too slow to matter), both work while clients move, the old one is removed
/// and gets 401; no request with a key valid at the time fails. Then, on a server polling the
/// file, a change is picked up without any signal.
#[test]
fn api_keys_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    // Written as a Kubernetes Secret volume updates: a new file swapped in by rename.
    let write = |text: &str| {
        let tmp = dir.path().join("keys.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("old-key\n");
    let server = |poll: &str| {
        start(&[
            "--api-key-file",
            file.to_str().unwrap(),
            "--api-key-file-poll-ms",
            poll,
        ])
    };
    let s = server("600000");
    let body = json!({"inputs": SHORT}).to_string();
    let ask_on =
        |s: &common::Server, key: &str| s.post_raw("/v1/sentiment", &body, &[("x-api-key", key)]).0;
    let ask = |key: &str| ask_on(&s, key);
    let hangup = |s: &common::Server| {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(s.child.id() as i32, libc::SIGHUP);
        }
    };
    let until = |key: &str, status: u16, steady: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert_eq!(ask(steady), 200, "a request with `{steady}` failed");
            if ask(key) == status {
                return;
            }
            assert!(Instant::now() < deadline, "`{key}` never got {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(ask("old-key"), 200);
    assert_eq!(ask("new-key"), 401);
    write("old-key\nnew-key\n");
    hangup(&s);
    until("new-key", 200, "old-key");
    write("new-key\n");
    hangup(&s);
    until("old-key", 401, "new-key");
    assert_eq!(ask("new-key"), 200);
    assert!(
        s.log_text_with("API keys reloaded")
            .contains("API keys reloaded")
    );
    assert!(!s.log_text().contains("new-key"), "a key reached the logs");
    drop(s);

    let watched = server("200");
    assert_eq!(ask_on(&watched, "new-key"), 200);
    write("newer-key\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask_on(&watched, "new-key") != 401 {
        assert!(
            Instant::now() < deadline,
            "the file change was never picked up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ask_on(&watched, "newer-key"), 200);
}

/// Every answer names the digest of the model that produced it (`x-finserve-model-digest`, and
/// `system_fingerprint` on the OpenAI routes), `/info` shows it with each file's SHA-256, and one
/// changed byte of an adapter changes it.
#[test]
fn the_model_digest_identifies_the_exact_files() {
    use sha2::Digest as _;
    let f = common::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("qv");
    std::fs::create_dir(&adapter).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(f.join("adapters/qv").join(file), adapter.join(file)).unwrap();
    }
    let serve = || {
        let args: Vec<String> = ["serve", "--host", "127.0.0.1", "--port", "0", "--model"]
            .map(String::from)
            .into_iter()
            .chain([f.join("mt5_base").display().to_string(), "--adapter".into()])
            .chain([adapter.display().to_string()])
            .collect();
        common::start_with(&args, &[])
    };
    let digests = |s: &common::Server| {
        let info: Value = serde_json::from_str(&s.get("/info").1).unwrap();
        let digest = info["digest"].as_str().unwrap().to_string();
        let post = |path: &str, body: Value| {
            let r = ureq::post(&format!("{}{path}", s.url))
                .send_json(body)
                .unwrap();
            let header = r.header("x-finserve-model-digest").unwrap().to_string();
            (header, r.into_json::<Value>().unwrap())
        };
        let (sentiment, _) = post("/v1/sentiment", json!({"inputs": SHORT}));
        let (generate, _) = post(
            "/v1/generate",
            json!({"inputs": SHORT, "parameters": {"max_new_tokens": 2}}),
        );
        let model = info["name"].as_str().unwrap();
        let (completion, body) = post(
            "/v1/completions",
            json!({"model": model, "prompt": SHORT, "max_tokens": 2}),
        );
        for other in [&sentiment, &generate, &completion] {
            assert_eq!(other, &digest, "{info}");
        }
        assert_eq!(body["system_fingerprint"], digest.as_str());
        (digest, info)
    };
    let s = serve();
    let (before, info) = digests(&s);
    assert!(
        before.starts_with("sha256:") && before.len() == 71,
        "{before}"
    );
    let weights = adapter.join("adapter_model.safetensors");
    let sha = |path: &std::path::Path| {
        sha2::Sha256::digest(std::fs::read(path).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let files = info["adapters"][0]["files"].as_array().unwrap();
    assert_eq!(files[1]["name"], "adapter_model.safetensors");
    assert_eq!(files[1]["sha256"].as_str().unwrap(), sha(&weights));
    let base_files = info["files"].as_array().unwrap();
    assert!(
        base_files.iter().any(|f| f["name"] == "config.json"),
        "{info}"
    );
    drop(s);

    // One byte of the adapter's last tensor, which still loads.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    let s = serve();
    let (after, info) = digests(&s);
    assert_ne!(before, after);
    assert_eq!(
        info["adapters"][0]["files"][1]["sha256"].as_str().unwrap(),
        sha(&weights)
    );
    assert_eq!(info["files"], json!(base_files), "the base did not change");
}
