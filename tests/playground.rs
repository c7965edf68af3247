//! The playground page at `/` in a real headless browser (Debian's `chromium`, driven through
//! the DevTools protocol by `tests/playground/browser.py`): it shows the model from `/info`,
//! scores its sample and draws a bar per returned label, streams a generation whose text equals
//! the plain request's, and reports a missing API key instead of failing silently.

mod common;

use std::process::Command;

use common::start;
use serde_json::{Value, json};

/// The page's state once nothing on it is busy (see `browser.py`).
fn open(url: &str, screenshot: Option<&std::path::Path>) -> Value {
    common::which("chromium");
    let mut cmd = Command::new(common::python());
    cmd.arg(common::repo().join("tests/playground/browser.py"))
        .arg(url);
    if let Some(path) = screenshot {
        cmd.arg("--screenshot").arg(path);
    }
    let out = cmd.output().expect("python");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("page state")
}

#[test]
fn the_playground_scores_and_streams_in_a_browser() {
    let s = start(&["--served-model-name", "prod", "--variant", "base="]);
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("playground.png");
    let page = open(&format!("{}/?run=1&variant=base", s.url), Some(&png));
    assert_eq!(page["variants"], json!(["prod", "base"]), "{page}");
    assert_eq!(page["variant"], "base", "{page}");
    assert!(
        page["model"].as_str().unwrap().contains("mt5_base"),
        "{page}"
    );
    assert_eq!(page["errors"], json!([]), "{page}");
    let (_, scored) = s.post(
        "/v1/sentiment",
        &json!({"inputs": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007 .",
                "parameters": {"adapter_id": "base"}}),
    );
    let bars = page["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 3, "{page}");
    for (bar, want) in bars.iter().zip(scored[0].as_array().unwrap()) {
        assert_eq!(bar["label"], want["label"], "{page}");
        let pct = format!("{:.1}%", 100.0 * want["score"].as_f64().unwrap());
        assert_eq!(bar["score"], pct.as_str(), "{page}");
        // The browser normalises the style ("0.0%" reads back as "0%").
        let width: f64 = bar["width"]
            .as_str()
            .unwrap()
            .trim_end_matches('%')
            .parse()
            .unwrap();
        assert!(
            (width - 100.0 * want["score"].as_f64().unwrap()).abs() < 0.051,
            "{page}"
        );
    }
    let (_, plain) = s.post(
        "/v1/generate",
        &json!({"inputs": "Net sales decreased by 5 % in the third quarter .",
                "parameters": {"max_new_tokens": 32, "adapter_id": "base"}}),
    );
    assert_eq!(page["generated"], plain["generated_text"], "{page}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);
}

#[test]
fn the_playground_highlights_each_target_with_its_label() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("target_template.json");
    std::fs::write(
        &template,
        r#"{"template": "{target} : {text}", "mark": ["<<", ">>"]}"#,
    )
    .unwrap();
    let s = start(&["--target-template", template.to_str().unwrap()]);
    let text = "Siemens is rallying 6% after a boom in orders, while Huhtamaki fell 3%.";
    let encoded: String = text
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let url = format!("{}/?text={encoded}&targets=Siemens,%20Huhtamaki", s.url);
    let page = open(&url, None);
    assert_eq!(page["errors"], json!([]), "{page}");
    let (_, scored) = s.post(
        "/v1/sentiment",
        &json!({"inputs": text, "parameters": {"targets": ["Siemens", "Huhtamaki"]}}),
    );
    let marks = page["entities"].as_array().unwrap();
    assert_eq!(marks.len(), 2, "{page}");
    for (mark, want) in marks.iter().zip(scored[0].as_array().unwrap()) {
        assert_eq!(mark["target"], want["target"], "{page}");
        assert_eq!(mark["text"], want["target"], "{page}");
        assert_eq!(mark["label"], want["scores"][0]["label"], "{page}");
    }
    let bars = page["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 2, "one bar per target: {page}");
}

#[test]
fn the_playground_reports_a_missing_api_key() {
    let s = start(&["--api-key", "secret"]);
    let page = open(&format!("{}/", s.url), None);
    let errors = page["errors"].to_string();
    assert!(errors.contains("missing or invalid API key"), "{page}");
    assert_eq!(page["bars"], json!([]), "{page}");
}
