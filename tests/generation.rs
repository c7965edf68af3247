//! Generation in bulk and its quality: ROUGE-L and BLEU equal to `rouge-score` and `sacrebleu`
//! on a committed fixture (tests/generation/make_fixture.py); `finserve predict --task generate`
//! writes transformers' greedy texts and reproducible seeded samples however it is sharded;
//! `finserve eval --task generate` reports measures consistent with its per-row output and
//! refuses bad rows and bad flags.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use finserve::generation_metrics::{corpus_bleu, rouge_l};
use serde_json::{Value, json};

fn fixture() -> Value {
    let path = common::repo().join("tests/generation/fixture.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn rouge_l_and_bleu_equal_the_python_packages() {
    let f = fixture();
    let pairs = f["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 50);
    let text = |p: &Value, k: &str| p[k].as_str().unwrap().to_string();
    let predictions: Vec<String> = pairs.iter().map(|p| text(p, "prediction")).collect();
    let references: Vec<String> = pairs.iter().map(|p| text(p, "reference")).collect();
    for (i, p) in pairs.iter().enumerate() {
        let want = p["rouge_l"].as_f64().unwrap();
        let got = rouge_l(&predictions[i], &references[i]);
        assert!(
            (got - want).abs() < 1e-12,
            "pair {i} {p}: ROUGE-L {got} vs rouge-score {want}"
        );
    }
    let mut groups: Vec<Value> = f["groups"].as_array().unwrap().clone();
    groups.push(json!({"start": 0, "end": pairs.len(), "bleu": f["corpus"]["bleu"]}));
    let mut nonzero = 0;
    for g in &groups {
        let (start, end) = (
            g["start"].as_u64().unwrap() as usize,
            g["end"].as_u64().unwrap() as usize,
        );
        let p: Vec<&str> = predictions[start..end].iter().map(String::as_str).collect();
        let r: Vec<&str> = references[start..end].iter().map(String::as_str).collect();
        let want = g["bleu"].as_f64().unwrap();
        let got = corpus_bleu(&p, &r);
        assert!(
            (got - want).abs() < 1e-9,
            "rows {start}..{end}: BLEU {got} vs sacrebleu {want}"
        );
        nonzero += usize::from(want > 1.0);
    }
    assert!(nonzero >= 5, "the fixture must exercise non-zero BLEU");
}

fn finserve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finserve"))
        .args(args)
        .current_dir(common::repo())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("FINSERVE_MODEL")
        .env_remove("FINSERVE_ADAPTER")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "finserve failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fixture model that `tests/parity` holds transformers' greedy generations for.
fn parity_model() -> Vec<String> {
    let f = common::fixtures();
    vec![
        "--model".into(),
        f.join("mt5_base").display().to_string(),
        "--adapter".into(),
        f.join("adapters/qv").display().to_string(),
    ]
}

fn predict(extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["predict".into()];
    args.extend(parity_model());
    args.extend(extra.iter().map(|s| s.to_string()));
    finserve(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn predict_generates_transformers_greedy_text_and_reproducible_samples() {
    let dir = tempfile::tempdir().unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("mt5_qv/reference.json")).unwrap(),
    )
    .unwrap();
    let tokenizer =
        tokenizers::Tokenizer::from_file(common::fixtures().join("mt5_base/tokenizer.json"))
            .unwrap();
    let input = dir.path().join("in.jsonl");
    let mut lines = String::new();
    for (i, text) in reference["inputs"].as_array().unwrap().iter().enumerate() {
        lines += &format!("{}\n", json!({"id": format!("doc-{i}"), "sentence": text}));
    }
    std::fs::write(&input, lines).unwrap();
    let out = dir.path().join("greedy.jsonl");
    ok(&predict(&[
        "--task",
        "generate",
        "--max-new-tokens",
        "32",
        "--data",
        input.to_str().unwrap(),
        "--id-column",
        "id",
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = records(&out);
    let greedy = reference["greedy"].as_array().unwrap();
    assert_eq!(got.len(), greedy.len());
    for (i, (record, ids)) in got.iter().zip(greedy).enumerate() {
        let ids: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want = tokenizer.decode(&ids, true).unwrap();
        assert_eq!(record["row"], i, "{record}");
        assert_eq!(record["id"], format!("doc-{i}"));
        assert_eq!(record["generated_text"], want, "row {i}");
        assert_eq!(record["generated_tokens"], 32);
        assert_eq!(record["finish_reason"], "length");
        assert!(record["digest"].as_str().unwrap().starts_with("sha256:"));
    }

    // Seeded sampling: the same texts on a rerun and in shards; another seed, other texts.
    let csv_in = dir.path().join("in.csv");
    let mut w = csv::Writer::from_path(&csv_in).unwrap();
    w.write_record(["sentence"]).unwrap();
    for i in 0..8 {
        w.write_record([format!("Quarterly sales rose by {i} % .")])
            .unwrap();
    }
    w.flush().unwrap();
    let sample = |name: &str, seed: &str, shard: Option<&str>| {
        let path = dir.path().join(name);
        let mut args = vec![
            "--task",
            "generate",
            "--do-sample",
            "--temperature",
            "1.5",
            "--max-new-tokens",
            "8",
            "--seed",
            seed,
            "--data",
            csv_in.to_str().unwrap(),
            "--out",
            path.to_str().unwrap(),
        ];
        if let Some(s) = shard {
            args.extend(["--shard", s]);
        }
        ok(&predict(&args));
        let mut rows: Vec<(u64, String)> = records(&path)
            .iter()
            .map(|r| {
                (
                    r["row"].as_u64().unwrap(),
                    r["generated_text"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let first = sample("a.jsonl", "7", None);
    assert_eq!(first.len(), 8);
    assert_eq!(sample("b.jsonl", "7", None), first);
    let mut sharded = sample("s0.jsonl", "7", Some("0/2"));
    sharded.extend(sample("s1.jsonl", "7", Some("1/2")));
    sharded.sort();
    assert_eq!(sharded, first);
    let other = sample("c.jsonl", "8", None);
    assert_ne!(other, first, "another seed gave the same samples");
    // Row i with seed 7 + i is row i + 1 with seed 7 + (i + 1) - 1: the seeds are per row.
    assert_ne!(first[0].1, first[1].1);
}

#[test]
fn eval_generate_reports_loss_exact_match_rouge_and_bleu_of_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let rows = [
        json!({"sentence": "Operating profit rose to EUR 13.5 mn from EUR 9.7 mn .", "label": "positive"}),
        json!({"sentence": "The company 's profit totaled Ls 578,100 in H1 2007 , down 30.9 % year-on-year .", "label": "negative"}),
        json!({"sentence": "The total value of the contract is some EUR 8 million .", "label": "neutral"}),
        json!({"sentence": "Sales were flat .", "label": "a longer reference of several words"}),
        json!({"sentence": "No reference here ."}),
        json!({"sentence": "A blank reference .", "label": "  "}),
    ];
    let lines: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    let out = dir.path().join("out.jsonl");
    let stdout = ok(&finserve(&[
        "eval",
        "--task",
        "generate",
        "--target-column",
        "label",
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let lines = records(&out);
    assert_eq!(lines.len(), rows.len());
    assert!(lines[4]["error"].as_str().unwrap().contains("no `label`"));
    assert!(
        lines[5]["error"].as_str().unwrap().contains("reference"),
        "{}",
        lines[5]
    );
    assert!(stdout.contains("2 rows refused"), "{stdout}");
    let scored = &lines[..4];
    let (mut nll, mut tokens) = (0.0, 0u64);
    for l in scored {
        nll -= l["reference_log_prob"].as_f64().unwrap();
        tokens += l["reference_tokens"].as_u64().unwrap();
    }
    let loss = nll / tokens as f64;
    let shown = |name: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` in\n{stdout}"));
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        (shown("teacher-forced loss") - loss).abs() < 1e-4,
        "{stdout}"
    );
    assert!((shown("perplexity") - loss.exp()).abs() < 1e-3, "{stdout}");
    // The demo model answers with a label: right on the three plain rows, never the long one.
    let exact: Vec<bool> = scored
        .iter()
        .map(|l| l["exact_match"].as_bool().unwrap())
        .collect();
    assert_eq!(exact, [true, true, true, false], "{scored:?}");
    assert!((shown("exact match") - 0.75).abs() < 1e-9, "{stdout}");
    let generated: Vec<&str> = scored
        .iter()
        .map(|l| l["generated_text"].as_str().unwrap())
        .collect();
    let references: Vec<&str> = scored
        .iter()
        .map(|l| l["reference"].as_str().unwrap())
        .collect();
    let rouge: f64 = generated
        .iter()
        .zip(&references)
        .map(|(g, r)| rouge_l(g, r))
        .sum::<f64>()
        / 4.0;
    assert!((shown("ROUGE-L F1") - rouge).abs() < 1e-4, "{stdout}");
    let bleu = corpus_bleu(&generated, &references);
    assert!((shown("BLEU") - bleu).abs() < 1e-2, "{stdout}");
}

#[test]
fn generation_flags_are_checked() {
    let refused = |args: &[&str], why: &str| {
        let out = finserve(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    };
    let data = "models/data/test.csv";
    refused(
        &["eval", "--task", "generate", "--data", data],
        "--task generate needs --target-column",
    );
    refused(
        &["eval", "--seed", "3", "--data", data],
        "--seed is for --task generate",
    );
    refused(
        &[
            "predict",
            "--temperature",
            "0.5",
            "--data",
            data,
            "--out",
            "/tmp/x.jsonl",
        ],
        "--temperature is for --task generate",
    );
    refused(
        &[
            "predict",
            "--task",
            "generate",
            "--truncate",
            "--data",
            data,
            "--out",
            "/tmp/x.jsonl",
        ],
        "are for --task sentiment",
    );
    refused(
        &[
            "eval",
            "--task",
            "generate",
            "--target-column",
            "label",
            "--max-new-tokens",
            "0",
            "--data",
            data,
        ],
        "--max-new-tokens",
    );
}
