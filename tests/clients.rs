//! Real clients against the real server: the `huggingface_hub` Python InferenceClient, the
//! `openai` Python client, LangChain's `ChatOpenAI` and `OpenAI`, TGI's `text_generation` client,
//! schemathesis fuzzing every operation against the served OpenAPI document, and a Prometheus
//! server scraping `/metrics`.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::start;
use serde_json::{Value, json};

/// Runs `tests/clients/<script>` with `args` and fails with its output unless it succeeds.
fn client(script: &str, args: &[&str]) {
    let out = Command::new(common::python())
        .arg(common::repo().join("tests/clients").join(script))
        .args(args)
        // The clients only talk to our loopback server; offline mode would refuse even that.
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn huggingface_hub_inference_client_works() {
    let s = start(&[]);
    client("hf_client.py", &[&s.url]);
}

#[test]
fn openai_client_works() {
    let s = start(&["--served-model-name", "fin-mt5"]);
    client("openai_client.py", &[&s.url, "fin-mt5"]);
}

#[test]
fn text_generation_client_works() {
    let s = start(&[]);
    client("tgi_client.py", &[&s.url]);
}

#[test]
fn langchain_openai_works() {
    let s = start(&["--served-model-name", "fin-mt5"]);
    client("langchain_client.py", &[&s.url, "fin-mt5"]);
}

/// The served document is the contract: schemathesis generates valid and invalid requests from
/// it (fixed seed, bounded examples) and every check must pass: statuses, content types, response
/// and event schemas, valid data accepted, invalid data rejected, auth enforced. The one limit a
/// schema cannot state is the input's token count (it depends on the tokenizer): it is raised
/// here so that random texts of many parts stay within it (`tests/server.rs` tests the limit).
#[test]
fn schemathesis_finds_no_spec_violation() {
    let key = "schemathesis-key";
    let s = start(&[
        "--api-key",
        key,
        "--max-input-tokens",
        "16384",
        "--max-batch-tokens",
        "65536",
    ]);
    let venv_bin = common::python().parent().unwrap().to_path_buf();
    // schemathesis keeps a cache in its working directory, and reads its config from there. A
    // sentiment request whose `targets` do not occur in its input is schema-valid and refused
    // (422): no schema can say that a target must occur in the text. Only that operation accepts
    // a 422 for schema-valid data; every other check applies to it in full.
    let scratch = tempfile::tempdir().unwrap();
    std::fs::write(
        scratch.path().join("schemathesis.toml"),
        "[[operations]]\ninclude-path = \"/v1/sentiment\"\n\
         checks.positive_data_acceptance.expected-statuses = \
         [\"2xx\", \"3xx\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\", \"5xx\"]\n",
    )
    .unwrap();
    let out = Command::new(venv_bin.join("schemathesis"))
        .current_dir(scratch.path())
        .args(["run", &format!("{}/openapi.json", s.url)])
        .args(["--checks", "all", "--seed", "1", "--max-examples", "300"])
        .args(["--workers", "1", "--no-color"])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .output()
        .expect("schemathesis is missing: run .ci/setup");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("No issues found"),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_metrics() {
    let s = start(&[]);
    assert_eq!(
        s.post("/v1/sentiment", &json!({"inputs": "Profit rose ."}))
            .0,
        200
    );
    let target = s.url.trim_start_matches("http://");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: finserve\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let _prom = Killed(
        Command::new(common::which("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = ureq::get(&format!("{api}/query"))
            .query("query", "finserve_requests_total{route=\"/v1/sentiment\"}")
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok());
        let targets = ureq::get(&format!("{api}/targets"))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok());
        let healthy = targets.as_ref().is_some_and(|t| {
            t["data"]["activeTargets"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["labels"]["job"] == "finserve" && x["health"] == "up")
            })
        });
        let sampled = up.as_ref().is_some_and(|v| {
            v["data"]["result"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|x| x["value"][1].as_str().is_some_and(|n| n != "0"))
            })
        });
        if healthy && sampled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped finserve: targets {targets:?}, query {up:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
