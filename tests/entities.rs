//! Entity-level sentiment, sentence breakdown and explanations on `/v1/sentiment`, through the
//! real binary on the fixture model (given a target template by `--target-template`). Each mode
//! is exact by construction, and each test checks that against plain requests: a target is the
//! marked text in the target template, a sentence is a text, an attribution is the difference of
//! two texts' scores.

mod common;

use common::{Server, label_scores, start};
use serde_json::{Value, json};

const MIXED: &str =
    "Siemens is rallying 6% after a boom in orders, while Huhtamaki fell 3% on weak demand.";

fn by_label(mut s: Vec<(String, f64)>) -> Vec<(String, f64)> {
    s.sort_by(|a, b| a.0.cmp(&b.0));
    s
}

fn assert_close(a: &[(String, f64)], b: &[(String, f64)], what: &str) {
    let (a, b) = (by_label(a.to_vec()), by_label(b.to_vec()));
    assert_eq!(a.len(), b.len(), "{what}");
    for ((la, x), (lb, y)) in a.iter().zip(&b) {
        assert_eq!(la, lb, "{what}");
        assert!((x - y).abs() < 1e-6, "{what}: {la} {x} vs {y}");
    }
}

/// A server on the fixture model with a target template (`context_words` as given).
fn server(context_words: Option<usize>, extra: &[&str]) -> (Server, tempfile::TempDir) {
    server_with(
        json!({"template": "{target} : {text}", "mark": ["<<", ">>"], "context_words": context_words}),
        extra,
    )
}

/// A server on the fixture model with `template` as its target template.
fn server_with(template: Value, extra: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target_template.json");
    std::fs::write(&path, template.to_string()).unwrap();
    let path = path.display().to_string();
    let mut args = vec!["--target-template", path.as_str()];
    args.extend_from_slice(extra);
    (start(&args), dir)
}

/// The plain scores of `inputs` in `template`.
fn plain(s: &Server, inputs: &str, template: &str) -> Vec<(String, f64)> {
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": inputs, "parameters": {"prompt_template": template}}),
    );
    assert_eq!(code, 200, "{body}");
    label_scores(&body[0])
}

fn error(body: &Value) -> &str {
    body["error"].as_str().unwrap()
}

#[test]
fn two_targets_get_two_distributions_each_their_marked_prompt() {
    let (s, _dir) = server(None, &[]);
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Siemens", {"start": 53, "end": 62}]}}),
    );
    assert_eq!(code, 200, "{body}");
    let targets = body[0].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0]["target"], "Siemens");
    assert_eq!(targets[0]["spans"], json!([[0, 7]]));
    assert_eq!(targets[1]["target"], "Huhtamaki");
    assert_eq!(targets[1]["spans"], json!([[53, 62]]));
    for (t, marked) in [
        ("Siemens", MIXED.replacen("Siemens", "<<Siemens>>", 1)),
        ("Huhtamaki", MIXED.replacen("Huhtamaki", "<<Huhtamaki>>", 1)),
    ] {
        let entry = targets.iter().find(|e| e["target"] == t).unwrap();
        let scores = label_scores(&entry["scores"]);
        assert_eq!(scores.len(), 3);
        assert!((scores.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(scores.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
        let expected = plain(&s, &marked, &format!("{t} : {{text}}"));
        assert_close(&scores, &expected, t);
    }
    // Without targets the answer is exactly today's.
    let (_, without) = s.post("/v1/sentiment", &json!({"inputs": MIXED}));
    assert!(without[0][0]["label"].is_string(), "{without}");
    assert_close(
        &label_scores(&without[0]),
        &plain(&s, MIXED, "{text}"),
        "no targets",
    );
}

#[test]
fn a_name_marks_every_whole_word_mention_and_lists_batch_like_singles() {
    let (s, _dir) = server(None, &[]);
    let text = "Nokia beat estimates. Nokian Tyres fell, and Nokia rose again.";
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": [text, MIXED], "parameters": {"targets": [["Nokia"], ["Huhtamaki", "Siemens"]]}}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body[0][0]["spans"], json!([[0, 5], [45, 50]]));
    let marked = "<<Nokia>> beat estimates. Nokian Tyres fell, and <<Nokia>> rose again.";
    assert_close(
        &label_scores(&body[0][0]["scores"]),
        &plain(&s, marked, "Nokia : {text}"),
        "every mention",
    );
    let (_, alone) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Siemens"]}}),
    );
    assert_close(
        &label_scores(&body[1][1]["scores"]),
        &label_scores(&alone[0][0]["scores"]),
        "batched vs alone",
    );
    // top_k and candidate labels apply per target.
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Siemens"], "top_k": 1,
                 "candidate_labels": ["up", "down"]}}),
    );
    assert_eq!(code, 200, "{body}");
    let scores = body[0][0]["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 1);
    assert!(["up", "down"].contains(&scores[0]["label"].as_str().unwrap()));
}

#[test]
fn bad_targets_are_refused_naming_the_field() {
    let (s, _dir) = server(
        None,
        &[
            "--max-targets-per-input",
            "2",
            "--max-windows-per-request",
            "8",
        ],
    );
    let cases = [
        (json!({"targets": ["siemens"]}), "whole word"),
        (json!({"targets": ["Siem"]}), "whole word"),
        (json!({"targets": [{"start": 80, "end": 200}]}), "outside"),
        (json!({"targets": [{"start": 5, "end": 5}]}), "empty"),
        (
            json!({"targets": ["Siemens", "Huhtamaki", "orders"]}),
            "--max-targets-per-input",
        ),
        (json!({"targets": [["Siemens"]]}), "for one input"),
        (json!({"targets": []}), "empty"),
        (json!({"targets": [7]}), "a name (string) or a span"),
        (
            json!({"targets": ["Siemens"], "long_input": "sentences"}),
            "sentences",
        ),
        (json!({"targets": [{"start": 0, "end": 8}]}), "whitespace"),
        (
            json!({"targets": ["Siemens"], "return_chunks": true}),
            "return_chunks",
        ),
    ];
    for (params, needle) in cases {
        let (code, body) = s.post(
            "/v1/sentiment",
            &json!({"inputs": MIXED, "parameters": params}),
        );
        assert_eq!(code, 422, "{params}: {body}");
        assert!(error(&body).contains("targets"), "{params}: {body}");
        assert!(error(&body).contains(needle), "{params}: {body}");
    }
    // One request's work is bounded: 16 words explained for one target are 16 windows.
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Siemens"], "explain": true}}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(error(&body).contains("--max-windows-per-request"), "{body}");
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": [MIXED, MIXED], "parameters": {"targets": ["Siemens"]}}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(error(&body).contains("one per input"), "{body}");
    // A model without a target template cannot score targets.
    let plain_server = start(&[]);
    let (code, body) = plain_server.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Siemens"]}}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(error(&body).contains("target template"), "{body}");
}

#[test]
fn targets_follow_truncation_and_chunking() {
    let (s, _dir) = server(
        None,
        &["--max-input-tokens", "64", "--max-chunks-per-input", "40"],
    );
    let filler = "The board met on Tuesday and discussed the agenda at length . ".repeat(6);
    let doc = format!(
        "Siemens is rallying after a boom in orders . {filler}Huhtamaki fell on weak demand ."
    );
    let ask = |extra: Value| {
        let mut parameters = json!({"targets": ["Siemens", "Huhtamaki"]});
        parameters
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s.post(
            "/v1/sentiment",
            &json!({"inputs": doc, "parameters": parameters}),
        )
    };
    let (code, body) = ask(json!({}));
    assert_eq!(code, 422, "{body}");
    // Truncated from the right, the second target's mention is gone: refused, naming it.
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": doc, "truncate": true, "parameters": {"targets": ["Siemens", "Huhtamaki"]}}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(error(&body).contains("targets"), "{body}");
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": doc, "truncate": true, "parameters": {"targets": ["Siemens"]}}),
    );
    assert_eq!(code, 200, "{body}");
    // Chunked, each target is scored in the window(s) holding its mention: the token-weighted
    // mean of the marked document's windows that overlap the marked mention.
    let (code, body) = ask(json!({"long_input": "chunk"}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body[0].as_array().unwrap().len(), 2);
    let marked = doc.replacen("Huhtamaki", "<<Huhtamaki>>", 1);
    let (_, windows) = s.post(
        "/v1/sentiment",
        &json!({"inputs": marked, "parameters": {"long_input": "chunk", "return_chunks": true,
                 "prompt_template": "Huhtamaki : {text}"}}),
    );
    let chunks = windows[0]["chunks"].as_array().unwrap();
    let start = marked[..marked.find("<<Huhtamaki>>").unwrap()]
        .chars()
        .count() as u64;
    let end = start + "<<Huhtamaki>>".len() as u64;
    let holding: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["start"].as_u64().unwrap() < end && start < c["end"].as_u64().unwrap())
        .collect();
    assert!(
        !holding.is_empty() && holding.len() < chunks.len(),
        "{windows}"
    );
    let tokens: f64 = holding.iter().map(|c| c["tokens"].as_f64().unwrap()).sum();
    let mut mean: Vec<(String, f64)> = by_label(label_scores(&holding[0]["scores"]))
        .into_iter()
        .map(|(l, _)| (l, 0.0))
        .collect();
    for c in &holding {
        let share = c["tokens"].as_f64().unwrap() / tokens;
        for (m, (_, v)) in mean.iter_mut().zip(by_label(label_scores(&c["scores"]))) {
            m.1 += v * share;
        }
    }
    assert_close(
        &label_scores(&body[0][1]["scores"]),
        &mean,
        "the windows holding the mention",
    );
}

#[test]
fn the_target_template_context_cuts_to_the_words_around_the_mention() {
    let (s, _dir) = server(Some(3), &[]);
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Huhtamaki"]}}),
    );
    assert_eq!(code, 200, "{body}");
    let shown = "in orders, while <<Huhtamaki>> fell 3% on";
    assert_close(
        &label_scores(&body[0][0]["scores"]),
        &plain(&s, shown, "Huhtamaki : {text}"),
        "context",
    );
}

#[test]
fn a_document_is_scored_sentence_by_sentence() {
    let s = start(&[]);
    let sentences = [
        "Good morning and welcome to Acme Corp.'s third-quarter 2024 earnings call.",
        "Revenue rose to EUR 13.1 mn from EUR 8.7 mn in Q3 2024 .",
        "U.S. sales grew 12% while Europe was flat.",
        "Operating margin fell to 4.5% on higher input costs, and we expect pressure to continue.",
        "Our CFO, Dr. Jane Smith, will now take you through the numbers.",
        "Net debt stood at USD 1.2 bn at the end of the quarter.",
    ];
    let doc = format!(
        "{} {}\n\n{} {}\n\n  {} {}\n",
        sentences[0], sentences[1], sentences[2], sentences[3], sentences[4], sentences[5]
    );
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": doc, "parameters": {"long_input": "sentences"}}),
    );
    assert_eq!(code, 200, "{body}");
    let found = body[0]["sentences"].as_array().unwrap();
    let chars: Vec<char> = doc.chars().collect();
    let texts: Vec<String> = found
        .iter()
        .map(|x| {
            let (a, b) = (
                x["start"].as_u64().unwrap() as usize,
                x["end"].as_u64().unwrap() as usize,
            );
            chars[a..b].iter().collect()
        })
        .collect();
    assert_eq!(texts, sentences);
    // Each sentence is scored as a text of its own; the document's scores are the token-weighted
    // mean of its sentences'.
    let tokens: f64 = found.iter().map(|x| x["tokens"].as_f64().unwrap()).sum();
    let overall = by_label(label_scores(&body[0]["scores"]));
    let mut mean = vec![0.0; overall.len()];
    for (x, text) in found.iter().zip(sentences) {
        let scores = label_scores(&x["scores"]);
        assert_close(&scores, &plain(&s, text, "{text}"), text);
        for (m, (_, v)) in mean.iter_mut().zip(by_label(scores)) {
            *m += v * x["tokens"].as_f64().unwrap() / tokens;
        }
    }
    for ((label, v), m) in overall.iter().zip(&mean) {
        assert!((v - m).abs() < 1e-9, "{label}: {v} vs {m}");
    }
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": " \n ", "parameters": {"long_input": "sentences"}}),
    );
    assert_eq!(code, 422, "{body}");
    // A sentence longer than a window is windowed like `chunk`.
    let short = start(&["--max-input-tokens", "24", "--chunk-overlap", "4"]);
    let (code, body) = short.post(
        "/v1/sentiment",
        &json!({"inputs": doc, "parameters": {"long_input": "sentences"}}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body[0]["sentences"].as_array().unwrap().len(),
        sentences.len()
    );
    let (code, body) = short.post(
        "/v1/sentiment",
        &json!({"inputs": doc, "parameters": {"long_input": "sentences", "explain": true}}),
    );
    assert_eq!(code, 422, "{body}");
}

#[test]
fn an_attribution_is_the_score_with_the_word_minus_without_it() {
    let (s, _dir) = server(None, &["--max-explain-words", "20"]);
    let text = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn .";
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": text, "parameters": {"explain": true}}),
    );
    assert_eq!(code, 200, "{body}");
    let words = body[0]["explanation"].as_array().unwrap();
    assert_eq!(words.len(), text.split_whitespace().count());
    let with = by_label(label_scores(&body[0]["scores"]));
    assert_close(&with, &plain(&s, text, "{text}"), "the text itself");
    let rose = &words[2];
    assert_eq!(rose["word"], "rose");
    assert_eq!(
        (rose["start"].as_u64(), rose["end"].as_u64()),
        (Some(17), Some(21))
    );
    let without = by_label(plain(
        &s,
        "Operating profit to EUR 13.1 mn from EUR 8.7 mn .",
        "{text}",
    ));
    for a in rose["attributions"].as_array().unwrap() {
        let label = a["label"].as_str().unwrap();
        let w = with.iter().find(|x| x.0 == label).unwrap().1;
        let wo = without.iter().find(|x| x.0 == label).unwrap().1;
        assert!(
            (a["score"].as_f64().unwrap() - (w - wo)).abs() < 1e-6,
            "{label}"
        );
    }
    // The last word takes the space before it.
    let last = words.last().unwrap();
    let without = by_label(plain(
        &s,
        "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn",
        "{text}",
    ));
    let a = &last["attributions"][0];
    let label = a["label"].as_str().unwrap();
    let expected = with.iter().find(|x| x.0 == label).unwrap().1
        - without.iter().find(|x| x.0 == label).unwrap().1;
    assert!((a["score"].as_f64().unwrap() - expected).abs() < 1e-6);
    // Per target: the words outside its mention, each removed from the marked prompt.
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Huhtamaki"], "explain": true}}),
    );
    assert_eq!(code, 200, "{body}");
    let entry = &body[0][0];
    let words = entry["explanation"].as_array().unwrap();
    assert_eq!(words.len(), MIXED.split_whitespace().count() - 1);
    let fell = words.iter().find(|w| w["word"] == "fell").unwrap();
    let with = label_scores(&entry["scores"]);
    let without = plain(
        &s,
        &MIXED.replacen("Huhtamaki fell", "<<Huhtamaki>>", 1),
        "Huhtamaki : {text}",
    );
    let a = &fell["attributions"][0];
    let label = a["label"].as_str().unwrap();
    let expected = with.iter().find(|x| x.0 == label).unwrap().1
        - without.iter().find(|x| x.0 == label).unwrap().1;
    assert!((a["score"].as_f64().unwrap() - expected).abs() < 1e-6);
    // Over --max-explain-words: 422 naming the field and the flag.
    let long = "profit rose ".repeat(11);
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": long, "parameters": {"explain": true}}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(error(&body).contains("parameters.explain"), "{body}");
    assert!(error(&body).contains("--max-explain-words"), "{body}");
}

/// The demo, served with no arguments at all (what `cargo run --release` does), answers entity
/// requests with the target template its adapter was trained with.
#[test]
fn the_demo_answers_entity_requests_out_of_the_box() {
    let s = common::start_with(
        &["serve", "--host", "127.0.0.1", "--port", "0"].map(String::from),
        &[],
    );
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Siemens", "Huhtamaki"]}}),
    );
    assert_eq!(code, 200, "{body}");
    let best = |i: usize| {
        body[0][i]["scores"][0]["label"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (best(0), best(1)),
        ("positive".into(), "negative".into()),
        "{body}"
    );
}

/// `p_target^(1-w) · p_text^w`, renormalised (`TargetTemplate::pool`'s definition), by label.
fn pooled(target: &[(String, f64)], text: &[(String, f64)], w: f64) -> Vec<(String, f64)> {
    let (target, text) = (by_label(target.to_vec()), by_label(text.to_vec()));
    let raw: Vec<f64> = target
        .iter()
        .zip(&text)
        .map(|((_, a), (_, b))| a.powf(1.0 - w) * b.powf(w))
        .collect();
    let sum: f64 = raw.iter().sum();
    target
        .iter()
        .zip(raw)
        .map(|((label, _), r)| (label.clone(), r / sum))
        .collect()
}

/// With `text_weight`, a target's scores are its own pooled with the whole text's, and an
/// attribution is the pooled score with the word minus the pooled score without it (the
/// marked prompt and the text, each without the word).
#[test]
fn a_template_weighing_in_the_text_pools_the_targets_scores_with_the_texts() {
    let w = 0.25;
    let template = json!({"template": "{target} : {text}", "mark": ["<<", ">>"], "text_weight": w});
    let (s, _dir) = server_with(template, &["--max-explain-words", "20"]);
    let (code, body) = s.post(
        "/v1/sentiment",
        &json!({"inputs": MIXED, "parameters": {"targets": ["Huhtamaki"], "explain": true}}),
    );
    assert_eq!(code, 200, "{body}");
    let entry = &body[0][0];
    let with = label_scores(&entry["scores"]);
    let target = plain(
        &s,
        &MIXED.replacen("Huhtamaki", "<<Huhtamaki>>", 1),
        "Huhtamaki : {text}",
    );
    let text = plain(&s, MIXED, "{text}");
    assert_close(&with, &pooled(&target, &text, w), "pooled");
    let differs = by_label(with.clone())
        .iter()
        .zip(by_label(target))
        .any(|(a, b)| (a.1 - b.1).abs() > 1e-6);
    assert!(differs, "the text's scores changed nothing: {with:?}");
    let fell = entry["explanation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["word"] == "fell")
        .unwrap();
    let without = pooled(
        &plain(
            &s,
            &MIXED.replacen("Huhtamaki fell", "<<Huhtamaki>>", 1),
            "Huhtamaki : {text}",
        ),
        &plain(&s, &MIXED.replacen("fell ", "", 1), "{text}"),
        w,
    );
    for a in fell["attributions"].as_array().unwrap() {
        let label = a["label"].as_str().unwrap();
        let expected = with.iter().find(|x| x.0 == label).unwrap().1
            - without.iter().find(|x| x.0 == label).unwrap().1;
        assert!(
            (a["score"].as_f64().unwrap() - expected).abs() < 1e-6,
            "{label}"
        );
    }
}

/// A target template without its placeholders, with a `text_weight` outside `[0, 1)`, or with
/// context options that cannot apply, stops the server at start-up, naming the file and what is
/// wrong.
#[test]
fn a_bad_target_template_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target_template.json");
    for (template, names) in [
        (r#"{"template": "{text}", "mark": ["[", "]"]}"#, "{target}"),
        (
            r#"{"template": "{target}: {text}", "mark": ["[", "]"], "text_weight": 1.0}"#,
            "text_weight",
        ),
        (
            r#"{"template": "{target}: {text}", "mark": ["[", "]"], "text_weight": -0.5}"#,
            "text_weight",
        ),
        (
            r#"{"template": "{target}: {text}", "mark": ["[", "]"], "context_stops": ["but"]}"#,
            "context_words",
        ),
        (
            r#"{"template": "{target}: {text}", "mark": ["[", "]"], "context_words": 4, "context_stops": ["so that"]}"#,
            "context_stops",
        ),
    ] {
        std::fs::write(&path, template).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
            .args(["serve", "--port", "0", "--model"])
            .arg(common::fixtures().join("mt5_base"))
            .arg("--target-template")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{template}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("target_template.json") && err.contains(names),
            "{template}: {err}"
        );
    }
}

/// `finserve eval` on FinEntity's JSON Lines scores every entity as a target and prints the
/// three ways side by side with their intervals, and the confusion matrix.
#[test]
fn eval_reports_entity_metrics_against_both_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("entities.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(common::repo())
        .args(["eval", "--data", "models/data/finentity_dev.jsonl", "--out"])
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "137 entities of 68 texts",
        "targets (this model)",
        "text label copied (this model)",
        "majority label (neutral)",
        "mixed-text accuracy",
        "confusion (rows gold, columns predicted)",
    ] {
        assert!(stdout.contains(needle), "missing {needle}: {stdout}");
    }
    let lines: Vec<Value> = std::fs::read_to_string(&out_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 137);
    let right = lines
        .iter()
        .filter(|l| l["label"] == l["prediction"])
        .count();
    let accuracy = format!("{:.4}", right as f64 / 137.0);
    let row = stdout
        .lines()
        .find(|l| l.starts_with("targets (this model)"))
        .unwrap();
    assert!(row.contains(&accuracy), "{row} vs {accuracy}");
}
