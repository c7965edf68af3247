//! `/health` and `/ready` when the engine fails, through the real HTTP stack and engine thread
//! with a fault-injecting model behind the `Backend` seam: batches that keep failing turn
//! `/health` 503 until one succeeds, and a dead engine thread turns everything 503, including
//! the requests that were queued when it died.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::metric_value;
use finserve::engine::backend::{Backend, Choice, StepRow};
use finserve::engine::sentiment::{LabelScores, LabelSet};
use finserve::engine::{Engine, EngineConfig, Served};
use finserve::error::{Error, Result};
use finserve::http::{AppState, HttpConfig};
use serde_json::{Value, json};

/// A model whose label scoring fails while `fail` is set, and whose decode step, while `die` is
/// set, fails slowly and then panics in the recovery path, which ends the engine thread.
#[derive(Clone, Default)]
struct Faulty {
    fail: Arc<AtomicBool>,
    die: Arc<AtomicBool>,
    stepping: Arc<AtomicBool>,
}

impl Backend for Faulty {
    fn score(&mut self, inputs: &[&[u32]], labels: &LabelSet) -> Result<Vec<LabelScores>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Inference("injected device error".into()));
        }
        let n = labels.names.len();
        Ok(inputs
            .iter()
            .map(|_| LabelScores {
                log_probs: vec![-(n as f64).ln(); n],
                probs: vec![1.0 / n as f64; n],
            })
            .collect())
    }
    fn join(&mut self, inputs: &[&[u32]]) -> Result<Vec<usize>> {
        Ok((0..inputs.len()).collect())
    }
    fn step(&mut self, rows: &mut [StepRow<'_>]) -> Result<Vec<Choice>> {
        if self.die.load(Ordering::SeqCst) {
            self.stepping.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(500));
            return Err(Error::Inference("injected device error".into()));
        }
        Ok(rows
            .iter()
            .map(|_| Choice {
                id: 1,
                logprob: Some(0.0),
            })
            .collect())
    }
    fn leave(&mut self, _slot: usize) {}
    fn reset(&mut self) {
        if self.die.load(Ordering::SeqCst) {
            panic!("injected fault: the engine thread dies");
        }
    }
    fn decoder_start(&self) -> u32 {
        0
    }
    fn eos_ids(&self) -> &[u32] {
        &[1]
    }
}

/// Serves the real router over the faulty model on an ephemeral port.
fn serve(model: Faulty, max_failed_batches: usize) -> String {
    let tokenizer = tokenizers::Tokenizer::from_file(common::fixtures().join("tokenizer.json"))
        .expect("tokenizer");
    let labels = LabelSet::new(&["up".to_string(), "down".to_string()], &tokenizer).unwrap();
    let served = Served {
        name: "faulty".into(),
        // These tests check scores, not which files made them.
        digest: "sha256:not-hashed".into(),
        backend: model,
        labels,
        target_template: None,
    };
    let engine = Engine::start(vec![served], Arc::new(tokenizer), EngineConfig::default()).unwrap();
    let state = AppState::new(HttpConfig {
        max_body_bytes: 1 << 20,
        max_concurrent_requests: 64,
        request_timeout: Duration::from_secs(30),
        max_failed_batches,
        model_name: "faulty".into(),
        ..HttpConfig::default()
    });
    assert!(state.engine.set(engine).is_ok());
    state.ready.store(true, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let forever = std::future::pending::<()>();
            finserve::http::serve(listener, None, state, forever, Duration::from_secs(1))
                .await
                .unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

fn call(req: ureq::Request, body: Option<Value>) -> (u16, Value) {
    let r = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let (code, text) = match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    };
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(url: &str, path: &str) -> (u16, Value) {
    call(ureq::get(&format!("{url}{path}")), None)
}

fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    call(ureq::post(&format!("{url}{path}")), Some(body))
}

fn metric(url: &str, name: &str) -> f64 {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    metric_value(&text, name, "").unwrap_or_else(|| panic!("{name} missing"))
}

#[test]
fn failing_batches_and_a_dead_engine_turn_health_503() {
    let model = Faulty::default();
    let url = serve(model.clone(), 3);
    let sentiment = json!({"inputs": "Profit rose ."});
    assert_eq!(get(&url, "/health"), (200, json!({"status": "ok"})));
    assert_eq!(metric(&url, "finserve_engine_up"), 1.0);

    // Every batch fails: each request gets the one engine error; the third failure in a row
    // turns /health and /ready 503.
    model.fail.store(true, Ordering::SeqCst);
    for n in 1..=3 {
        assert_eq!(get(&url, "/health").0, 200, "after {} failures", n - 1);
        let (code, body) = post(&url, "/v1/sentiment", sentiment.clone());
        assert_eq!(
            (code, &body["error_type"]),
            (500, &json!("inference")),
            "{body}"
        );
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("injected device error")
        );
    }
    assert_eq!(get(&url, "/health"), (503, json!({"status": "failing"})));
    assert_eq!(get(&url, "/ready").0, 503);
    assert_eq!(metric(&url, "finserve_failed_batches_in_a_row"), 3.0);
    assert!(metric(&url, "finserve_failed_batches_total") >= 3.0);

    // One success clears it.
    model.fail.store(false, Ordering::SeqCst);
    assert_eq!(post(&url, "/v1/sentiment", sentiment.clone()).0, 200);
    assert_eq!(get(&url, "/health"), (200, json!({"status": "ok"})));
    assert_eq!(get(&url, "/ready").0, 200);
    assert_eq!(metric(&url, "finserve_failed_batches_in_a_row"), 0.0);

    // The engine thread dies during a decode step; requests queued behind it get 503.
    model.die.store(true, Ordering::SeqCst);
    let dying = {
        let url = url.clone();
        std::thread::spawn(move || post(&url, "/v1/generate", json!({"inputs": "Profit rose ."})))
    };
    while !model.stepping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let queued: Vec<_> = (0..3)
        .map(|_| {
            let (url, body) = (url.clone(), sentiment.clone());
            std::thread::spawn(move || post(&url, "/v1/sentiment", body))
        })
        .collect();
    let (code, body) = dying.join().unwrap();
    assert_eq!(
        (code, &body["error_type"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    for q in queued {
        let (code, body) = q.join().unwrap();
        assert_eq!(
            (code, &body["error_type"]),
            (503, &json!("unavailable")),
            "{body}"
        );
    }
    assert_eq!(
        get(&url, "/health"),
        (503, json!({"status": "engine_down"}))
    );
    assert_eq!(get(&url, "/ready").0, 503);
    assert_eq!(post(&url, "/v1/sentiment", sentiment).0, 503);
    assert_eq!(metric(&url, "finserve_engine_up"), 0.0);
}
