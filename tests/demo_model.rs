//! The committed demo model (models/demo) through the real load + merge path, and `finserve eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use finserve::engine::backend::T5Backend;
use finserve::engine::infer::{LongInput, ScoreQuery};
use finserve::engine::prompt::TruncationDirection;
use finserve::engine::sentiment::LabelSet;
use finserve::engine::{Engine, EngineConfig, Served};
use finserve::hub::HubConfig;
use finserve::model::linear::Quantization;
use finserve::model::lora::AdapterSpec;
use finserve::model::{self, ModelSpec};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn engine(adapter: bool, quantize: Quantization) -> Engine {
    engine_in(adapter, quantize, DType::F32)
}

fn engine_in(adapter: bool, quantize: Quantization, dtype: DType) -> Engine {
    let spec = ModelSpec {
        model: repo().join("models/demo/base").display().to_string(),
        revision: None,
        adapters: adapter
            .then(|| AdapterSpec {
                source: repo().join("models/demo/adapter").display().to_string(),
                weight: 1.0,
            })
            .into_iter()
            .collect(),
        variants: Vec::new(),
        dtype,
        device: Device::Cpu,
        quantize,
        greedy_screen: true,
    };
    let hub = HubConfig {
        cache_dir: std::env::temp_dir(),
        endpoint: None,
        token: None,
        offline: true,
    };
    let loaded = model::load(&spec, &hub, false).unwrap();
    if adapter {
        assert!(loaded.reports[0].modules_merged > 0);
    }
    let names: Vec<String> = ["negative", "neutral", "positive"].map(String::from).into();
    let labels = LabelSet::new(&names, &loaded.tokenizer).unwrap();
    let served = Served {
        name: "demo".into(),
        // These tests check scores, not which files made them.
        digest: "sha256:not-hashed".into(),
        backend: T5Backend::new(loaded.model),
        labels,
        target_template: None,
    };
    Engine::start(
        vec![served],
        Arc::new(loaded.tokenizer),
        EngineConfig {
            max_batch_size: 16,
            max_batch_tokens: 8192,
            queue_capacity: 64,
            max_input_tokens: 256,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Held-out sentences (models/data/test.csv) whose label no reader would dispute.
const UNAMBIGUOUS: &[(&str, &str)] = &[
    (
        "Operating profit totaled EUR 3.8 mn , down from EUR 4.5 mn in the corresponding period in 2005 .",
        "negative",
    ),
    (
        "The company 's profit totaled Ls 578,100 in H1 2007 , down 30.9 % year-on-year .",
        "negative",
    ),
    (
        "The total value of the contract is some EUR 8 million .",
        "neutral",
    ),
    (
        "The annual net sales of the unit is some EUR 5 million and it currently employs some 55 people .",
        "neutral",
    ),
    (
        "Operating profit rose to EUR 13.5 mn from EUR 9.7 mn in the corresponding period in 2006 .",
        "positive",
    ),
    (
        "Cash flow from operations rose to EUR 52.7 mn from EUR 15.6 mn in 2007 .",
        "positive",
    ),
];

/// The server's default scoring of `text`: the server's template and labels, cut from the right
/// when too long.
fn probs(e: &Engine, text: &str) -> Vec<f64> {
    let query = ScoreQuery {
        texts: vec![text.to_string()],
        long_input: LongInput::Truncate(TruncationDirection::Right),
        ..Default::default()
    };
    e.score_blocking(query).unwrap().texts.remove(0).probs
}

fn predict(e: &Engine, text: &str) -> String {
    let p = &probs(e, text);
    let best = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    e.labels().names[best].clone()
}

#[test]
fn merged_demo_model_classifies_held_out_sentences() {
    let test_csv = std::fs::read_to_string(repo().join("models/data/test.csv")).unwrap();
    let e = engine(true, Quantization::None);
    for (text, label) in UNAMBIGUOUS {
        assert!(test_csv.contains(text), "not a held-out sentence: {text}");
        assert_eq!(predict(&e, text), *label, "{text}");
    }
}

#[test]
fn eval_command_reports_scores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sample.csv");
    let test_csv = std::fs::read_to_string(repo().join("models/data/test.csv")).unwrap();
    let header_and_40_rows: Vec<&str> = test_csv.lines().take(41).collect();
    std::fs::write(&data, header_and_40_rows.join("\n") + "\n").unwrap();
    let out_path = dir.path().join("results.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(repo())
        .args(["eval", "--data"])
        .arg(&data)
        .arg("--out")
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
        "accuracy",
        "macro-F1",
        "precision",
        "confusion",
        "sentences/s",
    ] {
        assert!(stdout.contains(needle), "missing {needle}: {stdout}");
    }
    let lines = std::fs::read_to_string(Path::new(&out_path)).unwrap();
    assert_eq!(lines.lines().count(), 40);
}

/// Probabilities of every held-out sentence, scored through the engine in batches.
fn score_test_set(e: &Engine) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut reader = csv::Reader::from_path(repo().join("models/data/test.csv")).unwrap();
    let rows: Vec<(String, String)> = reader.deserialize().map(Result::unwrap).collect();
    let gold = rows
        .iter()
        .map(|(_, label)| e.labels().names.iter().position(|n| n == label).unwrap())
        .collect();
    let mut probs = Vec::new();
    for chunk in rows.chunks(32) {
        let query = ScoreQuery {
            texts: chunk.iter().map(|(text, _)| text.clone()).collect(),
            long_input: LongInput::Truncate(TruncationDirection::Right),
            ..Default::default()
        };
        probs.extend(
            e.score_blocking(query)
                .unwrap()
                .texts
                .into_iter()
                .map(|t| t.probs),
        );
    }
    (probs, gold)
}

fn accuracy(probs: &[Vec<f64>], gold: &[usize]) -> f64 {
    let argmax = |p: &Vec<f64>| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
    let correct = probs
        .iter()
        .zip(gold)
        .filter(|(p, g)| argmax(p) == **g)
        .count();
    correct as f64 / gold.len() as f64
}

/// `--quantize q8` keeps the demo's held-out accuracy within half a point of f32 and moves no
/// label probability by more than 0.025. The bound is this model's: the adapter retrained with
/// entity rows (r 32, larger merged updates) moves one by 0.0222 where the previous one moved
/// none by more than 0.02; accuracy is equal.
#[test]
fn q8_quantized_demo_model_stays_close_to_f32() {
    let (f32_probs, gold) = score_test_set(&engine(true, Quantization::None));
    let (q8_probs, _) = score_test_set(&engine(true, Quantization::Q8));
    assert!(gold.len() > 400, "test split has only {} rows", gold.len());
    let (a32, a8) = (accuracy(&f32_probs, &gold), accuracy(&q8_probs, &gold));
    assert!(
        (a32 - a8).abs() <= 0.005,
        "accuracy f32 {a32:.4} vs q8 {a8:.4}"
    );
    let worst = f32_probs
        .iter()
        .flatten()
        .zip(q8_probs.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("accuracy f32 {a32:.4}, q8 {a8:.4}; largest label-probability change {worst:.4}");
    assert!(
        worst <= 0.025,
        "a label probability moved by {worst:.4} under q8"
    );
    assert!(
        worst > 0.0,
        "q8 changed nothing: was the model quantized at all?"
    );
}

/// `--dtype bf16` on the CPU (linear weights and their inputs rounded to bf16, sums in f32) moves
/// no label probability of the demo's held-out split by more than 0.01 (0.0037 measured on AMX
/// tiles, 0.0034 on `vdpbf16ps`; q8 0.022) and keeps its accuracy within half a point of f32: one sentence flips, a near tie in
/// f32 (neutral 0.4808, positive 0.4789), so accuracy is 0.9115 against 0.9137. A CPU without
/// AVX512-BF16 refuses bf16 by name.
#[test]
fn bf16_demo_model_stays_close_to_f32_or_is_refused() {
    if !model::bf16_linear::available() {
        let refused = model::parse_dtype("bf16", &Device::Cpu)
            .unwrap_err()
            .to_string();
        eprintln!("this CPU has no AVX512-BF16; --dtype bf16 is refused: {refused}");
        assert!(refused.contains("AVX512-BF16"), "{refused}");
        return;
    }
    let (f32_probs, gold) = score_test_set(&engine(true, Quantization::None));
    let (bf16_probs, _) = score_test_set(&engine_in(true, Quantization::None, DType::BF16));
    let (a32, a16) = (accuracy(&f32_probs, &gold), accuracy(&bf16_probs, &gold));
    let worst = f32_probs
        .iter()
        .flatten()
        .zip(bf16_probs.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("accuracy f32 {a32:.4}, bf16 {a16:.4}; largest label-probability change {worst:.4}");
    for (i, (a, b)) in f32_probs.iter().zip(&bf16_probs).enumerate() {
        let top = |p: &Vec<f64>| (0..p.len()).max_by(|&x, &y| p[x].total_cmp(&p[y])).unwrap();
        if top(a) != top(b) {
            eprintln!(
                "row {i} (gold {}) changes label: f32 {a:?}, bf16 {b:?}",
                gold[i]
            );
        }
    }
    assert!(
        (a32 - a16).abs() <= 0.005,
        "accuracy f32 {a32:.4} vs bf16 {a16:.4}"
    );
    assert!(
        worst <= 0.01,
        "a label probability moved by {worst:.4} under bf16"
    );
    assert!(
        worst > 0.0,
        "bf16 changed nothing: were the weights rounded at all?"
    );
}
