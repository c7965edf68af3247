//! `/v1/sentiment` beyond the default labels, through the real binary: labels and templates per
//! request, log-likelihood scores, truncation that keeps the template, long documents in
//! windows, calibration fitted by `finserve eval --calibrate` and applied by the server, and the
//! top-label confidence histogram.

mod common;

use std::process::Command;

use common::{label_scores, metric_value, start};
use serde_json::{Value, json};

const TEXT: &str = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .";

fn by_label(mut s: Vec<(String, f64)>) -> Vec<(String, f64)> {
    s.sort_by(|a, b| a.0.cmp(&b.0));
    s
}

fn softmax(v: &[f64], t: f64) -> Vec<f64> {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = v.iter().map(|x| ((x - max) / t).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

#[test]
fn request_labels_and_templates_score_exactly_like_server_ones() {
    let labels = ["bullish", "bearish", "no view"];
    let template = "{text} Is this bullish, bearish or no view?";
    let custom = start(&[]);
    let configured = start(&["--labels", &labels.join(","), "--prompt-template", template]);
    let body = |extra: Value| {
        let mut b = json!({"inputs": [TEXT, "Sales fell sharply ."]});
        if !extra.is_null() {
            b["parameters"] = extra;
        }
        b
    };
    let (code, got) = custom.post(
        "/v1/sentiment",
        &body(json!({"candidate_labels": labels, "prompt_template": template})),
    );
    assert_eq!(code, 200, "{got}");
    let (_, want) = configured.post("/v1/sentiment", &body(Value::Null));
    for i in 0..2 {
        let (g, w) = (
            by_label(label_scores(&got[i])),
            by_label(label_scores(&want[i])),
        );
        assert_eq!(g.len(), 3);
        for ((gl, gs), (wl, ws)) in g.iter().zip(&w) {
            assert_eq!(gl, wl);
            assert!((gs - ws).abs() < 1e-12, "{g:?} vs {w:?}");
        }
    }
    // A request with its own labels does not change what others get.
    let (_, default) = custom.post("/v1/sentiment", &json!({"inputs": TEXT}));
    assert_eq!(label_scores(&default[0]).len(), 3);
    assert!(
        label_scores(&default[0])
            .iter()
            .any(|(l, _)| l == "positive")
    );

    // Limits and invalid sets: 422 naming the problem.
    let bad = [
        (json!({"candidate_labels": ["only"]}), "2 to 10 labels"),
        (json!({"candidate_labels": ["a", "a"]}), "repeated"),
        (
            json!({"candidate_labels": ["a", "x".repeat(65)]}),
            "longer than 64",
        ),
        (json!({"prompt_template": "no placeholder"}), "{text}"),
        (json!({"function_to_apply": "sigmoid"}), "softmax"),
        (json!({"long_input": "split"}), "chunk"),
    ];
    for (params, needle) in bad {
        let (code, e) = custom.post("/v1/sentiment", &body(params.clone()));
        assert_eq!(code, 422, "{params}: {e}");
        assert!(
            e["error"].as_str().unwrap().contains(needle),
            "{params}: {e}"
        );
    }
}

#[test]
fn function_to_apply_none_returns_log_likelihoods() {
    let s = start(&[]);
    let (_, probs) = s.post("/v1/sentiment", &json!({"inputs": TEXT}));
    let (code, ll) = s.post(
        "/v1/sentiment",
        &json!({"inputs": TEXT, "parameters": {"function_to_apply": "none"}}),
    );
    assert_eq!(code, 200, "{ll}");
    let (p, l) = (
        by_label(label_scores(&probs[0])),
        by_label(label_scores(&ll[0])),
    );
    assert!(l.iter().all(|(_, v)| *v < 0.0), "{l:?}");
    let lv: Vec<f64> = l.iter().map(|x| x.1).collect();
    for ((_, want), got) in p.iter().zip(softmax(&lv, 1.0)) {
        assert!((want - got).abs() < 1e-9);
    }
    // Sorted best first like probabilities.
    let raw = label_scores(&ll[0]);
    assert!(raw.windows(2).all(|w| w[0].1 >= w[1].1));
}

#[test]
fn truncation_cuts_only_the_input_from_either_end() {
    let template = "{text} Question: is the sentiment negative, neutral or positive?";
    let s = start(&["--max-input-tokens", "80", "--prompt-template", template]);
    let long = format!(
        "{TEXT} {}",
        "Net sales fell by 5 % in the quarter . ".repeat(10)
    );
    let ask = |extra: Value| {
        let mut b = json!({"inputs": long, "truncate": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        s.post("/v1/sentiment", &b)
    };
    let (code, e) = s.post("/v1/sentiment", &json!({"inputs": long}));
    assert_eq!(code, 422, "{e}");
    assert!(e["error"].as_str().unwrap().contains("long_input"), "{e}");
    let (c1, right) = ask(json!({}));
    let (c2, right2) = ask(json!({"truncation_direction": "right"}));
    let (c3, left) = ask(json!({"truncation_direction": "left"}));
    assert_eq!((c1, c2, c3), (200, 200, 200), "{right} {left}");
    assert_eq!(right, right2, "right is the default");
    assert_ne!(right, left, "the two ends give different inputs");
    let (code, bad) = ask(json!({"truncation_direction": "middle"}));
    assert_eq!(code, 422, "{bad}");
    // A template longer than the whole budget is refused, not silently cut.
    let (code, e) = s.post(
        "/v1/sentiment",
        &json!({"inputs": TEXT, "truncate": true,
                "parameters": {"prompt_template": format!("{} {{text}}", "word ".repeat(90))}}),
    );
    assert_eq!(code, 422, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("template alone"),
        "{e}"
    );
}

#[test]
fn a_long_document_scores_in_windows() {
    let s = start(&["--max-input-tokens", "512", "--max-chunks-per-input", "12"]);
    let sentence = "The company said its operating profit rose while net sales fell in Finland . ";
    let doc = sentence.repeat(120);
    let (code, e) = s.post("/v1/sentiment", &json!({"inputs": doc}));
    assert_eq!(code, 422, "{e}");
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": [doc, TEXT], "parameters": {"long_input": "chunk", "return_chunks": true}}),
    );
    assert_eq!(code, 200, "{body}");
    let first = &body[0];
    let chunks = first["chunks"].as_array().unwrap();
    let tokens: u64 = chunks.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert!(chunks.len() >= 5, "{} windows", chunks.len());
    assert!(
        tokens >= 3000,
        "only {tokens} tokens: not a 3,000-token document"
    );
    assert_eq!(chunks[0]["start"], 0);
    assert_eq!(
        chunks.last().unwrap()["end"].as_u64().unwrap() as usize,
        doc.chars().count()
    );
    for w in chunks.windows(2) {
        // Consecutive windows overlap (or at least touch).
        assert!(w[1]["start"].as_u64() <= w[0]["end"].as_u64(), "{w:?}");
    }
    // The input's scores are the token-weighted mean of its windows' scores.
    let overall = by_label(label_scores(&first["scores"]));
    for (i, (label, score)) in overall.iter().enumerate() {
        let mean: f64 = chunks
            .iter()
            .map(|c| {
                let s = by_label(label_scores(&c["scores"]));
                assert_eq!(&s[i].0, label);
                s[i].1 * c["tokens"].as_f64().unwrap()
            })
            .sum::<f64>()
            / tokens as f64;
        assert!((mean - score).abs() < 1e-9, "{label}: {mean} vs {score}");
    }
    assert!((overall.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
    // A short input is one window covering all of it.
    let second = body[1]["chunks"].as_array().unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(
        second[0]["end"].as_u64().unwrap() as usize,
        TEXT.chars().count()
    );
    // Over --max-chunks-per-input: 422.
    let (code, e) = s.post(
        "/v1/sentiment",
        &json!({"inputs": sentence.repeat(400), "parameters": {"long_input": "chunk"}}),
    );
    assert_eq!(code, 422, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("--max-chunks-per-input"),
        "{e}"
    );
    // The confidence histogram saw the top labels.
    let m = s.metrics();
    assert!(metric_value(&m, "finserve_sentiment_top_score_count", "label=").unwrap() >= 2.0);
}

/// `finserve eval --calibrate` fits a temperature on the demo model's held-out split that lowers
/// its ECE, and a server given that file serves `softmax(log-likelihood / T)`.
#[test]
fn calibration_is_fitted_by_eval_and_applied_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calibration.json");
    let out = Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(common::repo())
        .args(["eval", "--data", "models/data/test.csv", "--calibrate"])
        .arg("--calibration-out")
        .arg(&file)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("FINSERVE_MODEL")
        .env_remove("FINSERVE_ADAPTER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ECE") && stdout.contains("Brier"),
        "{stdout}"
    );
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let t = c["temperature"].as_f64().unwrap();
    assert!(t > 0.0 && (t - 1.0).abs() > 1e-3, "{c}");
    assert!(
        c["after"]["ece"].as_f64() < c["before"]["ece"].as_f64(),
        "{c}"
    );
    assert!(
        c["after"]["nll"].as_f64() < c["before"]["nll"].as_f64(),
        "{c}"
    );
    assert_eq!(c["rows"], 452);

    let args: Vec<String> = [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--calibration",
    ]
    .map(String::from)
    .into_iter()
    .chain([file.display().to_string()])
    .collect();
    let s = common::start_in(&args, &[], &common::repo());
    let (_, info) = s.get("/info");
    // The demo's licence is named at start-up; /info shows no path of the server's disk.
    assert!(s.log_text().contains("CC BY-NC-SA 3.0"), "{}", s.log_text());
    let repo = common::repo().display().to_string();
    let tmp = dir.path().display().to_string();
    assert!(!info.contains(&repo) && !info.contains(&tmp), "{info}");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["calibration"]["temperature"].as_f64(),
        Some(t),
        "{info}"
    );
    let (_, probs) = s.post("/v1/sentiment", &json!({"inputs": TEXT}));
    let (_, ll) = s.post(
        "/v1/sentiment",
        &json!({"inputs": TEXT, "parameters": {"function_to_apply": "none"}}),
    );
    let (p, l) = (
        by_label(label_scores(&probs[0])),
        by_label(label_scores(&ll[0])),
    );
    let lv: Vec<f64> = l.iter().map(|x| x.1).collect();
    for ((_, want), got) in p.iter().zip(softmax(&lv, t)) {
        assert!((want - got).abs() < 1e-9, "{p:?} vs T={t} softmax of {l:?}");
    }
    // A calibration fitted for other labels is refused at startup.
    let out = Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(common::repo())
        .args([
            "serve",
            "--port",
            "0",
            "--labels",
            "up,down",
            "--calibration",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("calibration.json was fitted for labels"),
        "{err}"
    );
}

/// `finserve eval` scores a CSV row through the same call as a `/v1/sentiment` request: the same
/// scores for the same row, and a row over `--max-input-tokens` refused (and reported) unless
/// `--truncate` asks for what a request's `truncate` does.
#[test]
fn eval_scores_rows_as_the_server_does() {
    let f = common::fixtures();
    let model = f.join("mt5_base").display().to_string();
    let adapter = f.join("adapters/qv").display().to_string();
    let long = format!(
        "{TEXT} {}",
        "Net sales grew by twelve percent . ".repeat(12)
    );
    let rows = [TEXT, "Profit fell sharply .", long.as_str()];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.csv");
    let mut csv = String::from("sentence,label\n");
    for (row, label) in rows.iter().zip(["positive", "negative", "neutral"]) {
        csv += &format!("\"{row}\",{label}\n");
    }
    std::fs::write(&data, csv).unwrap();
    let eval = |extra: &[&str]| {
        let out_path = dir.path().join("out.jsonl");
        let out = Command::new(env!("CARGO_BIN_EXE_finserve"))
            .args(["eval", "--model", &model, "--adapter", &adapter])
            .args(["--max-input-tokens", "48", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out_path)
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = std::fs::read_to_string(out_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (stdout, lines)
    };
    let s = start(&["--max-input-tokens", "48", "--chunk-overlap", "8"]);
    let served = |extra: Value| {
        let mut body = json!({"inputs": rows});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        s.post("/v1/sentiment", &body)
    };
    let same = |line: &Value, entry: &Value| {
        for (label, score) in common::label_scores(entry) {
            let eval_score = line["scores"][&label].as_f64().unwrap();
            assert!(
                (eval_score - score).abs() < 1e-6,
                "{label}: {eval_score} vs {score}"
            );
        }
    };

    // Refused by both: the server answers 422, eval reports the row and scores the others.
    let (code, e) = served(json!({}));
    assert_eq!(code, 422, "{e}");
    let (stdout, lines) = eval(&[]);
    assert!(stdout.contains("1 rows refused"), "{stdout}");
    assert!(
        stdout.contains("row 4:") && stdout.contains("max_input_tokens"),
        "{stdout}"
    );
    assert!(lines[2]["error"].as_str().is_some(), "{}", lines[2]);
    let (code, short) = s.post("/v1/sentiment", &json!({"inputs": &rows[..2]}));
    assert_eq!(code, 200, "{short}");
    same(&lines[0], &short[0]);
    same(&lines[1], &short[1]);

    // Truncated by both, from the same end.
    let (code, cut) = served(json!({"truncate": true, "truncation_direction": "left"}));
    assert_eq!(code, 200, "{cut}");
    let (stdout, lines) = eval(&["--truncate", "--truncation-direction", "left"]);
    assert!(stdout.contains("truncated from the left"), "{stdout}");
    for (line, entry) in lines.iter().zip(cut.as_array().unwrap()) {
        same(line, entry);
    }

    // Scored in windows by both.
    let (code, chunked) = served(json!({"parameters": {"long_input": "chunk"}}));
    assert_eq!(code, 200, "{chunked}");
    let (_, lines) = eval(&["--long-input", "chunk", "--chunk-overlap", "8"]);
    for (line, entry) in lines.iter().zip(chunked.as_array().unwrap()) {
        same(line, entry);
    }
}
