//! Parity with transformers + peft on the committed fixtures of `tests/parity/` (see its README):
//! teacher-forced logits, greedy generations, label probabilities, batch invariance, the merge
//! export, every weight format, and the refusals of bad adapters.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use finserve::engine::backend::T5Backend;
use finserve::engine::generate::GenerateParams;
use finserve::engine::likelihood::LikelihoodQuery;
use finserve::engine::sentiment::{LabelSet, score};
use finserve::engine::{Engine, EngineConfig, GenerateEvent, Served};
use finserve::hub::HubConfig;
use finserve::model::decode_batch::DecodeBatch;
use finserve::model::linear::Quantization;
use finserve::model::lora::AdapterSpec;
use finserve::model::t5::T5Model;
use finserve::model::{self, LoadedModel, ModelSpec};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Reference {
    model: String,
    adapters: Vec<String>,
    inputs: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    decoder_input_ids: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
    merged_logits: Vec<Vec<Vec<f32>>>,
    greedy_max_new_tokens: usize,
    greedy: Vec<Vec<u32>>,
    labels: Vec<String>,
    label_ids: Vec<Vec<u32>>,
    label_probs: Vec<Vec<f64>>,
    label_logprobs: Vec<Vec<f64>>,
}

const CASES: &[&str] = &[
    "mt5_plain",
    "mt5_qv",
    "mt5_all_patterns",
    "mt5_modules_to_save",
    "mt5_qv_bin",
    "mt5_regex_layers",
    "mt5_layers_to_transform",
    "t5_qv",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/fixtures")
}

fn reference(case: &str) -> Reference {
    let path = fixtures().join(case).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn offline_hub() -> HubConfig {
    HubConfig {
        cache_dir: std::env::temp_dir().join("finserve-test-no-cache"),
        endpoint: None,
        token: None,
        offline: true,
    }
}

fn spec(model: &Path, adapters: &[PathBuf]) -> ModelSpec {
    ModelSpec {
        model: model.display().to_string(),
        revision: None,
        adapters: adapters
            .iter()
            .map(|a| AdapterSpec {
                source: a.display().to_string(),
                weight: 1.0,
            })
            .collect(),
        variants: Vec::new(),
        dtype: DType::F32,
        device: Device::Cpu,
        quantize: Quantization::None,
        greedy_screen: true,
    }
}

fn load(model: &Path, adapters: &[PathBuf]) -> LoadedModel {
    model::load(&spec(model, adapters), &offline_hub(), false).unwrap()
}

fn load_case(r: &Reference) -> LoadedModel {
    let adapters: Vec<PathBuf> = r.adapters.iter().map(|a| fixtures().join(a)).collect();
    load(&fixtures().join(&r.model), &adapters)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Encodes `inputs` and starts one decoder sequence per input in a fresh batch.
fn start(model: &T5Model, inputs: &[&[u32]]) -> (DecodeBatch, Vec<usize>) {
    let mut batch = model.new_batch();
    let encoded = model.encode(inputs).unwrap();
    let rows: Vec<usize> = (0..inputs.len()).collect();
    let slots = model.join(&mut batch, &encoded, &rows).unwrap();
    (batch, slots)
}

/// Feeds `tokens` (slot, ids) and returns the logits `(listed, n, vocab)`.
fn step(
    model: &T5Model,
    batch: &mut DecodeBatch,
    tokens: &[(usize, Vec<u32>)],
) -> Vec<Vec<Vec<f32>>> {
    let hidden = model.decode(batch, tokens).unwrap();
    let (b, n, d) = hidden.dims3().unwrap();
    let logits = model.logits(&hidden.reshape((b * n, d)).unwrap()).unwrap();
    logits.reshape((b, n, ())).unwrap().to_vec3().unwrap()
}

/// Teacher-forced logits of every input, all in one padded batch, all decoder tokens at once.
fn batch_logits(
    m: &LoadedModel,
    input_ids: &[Vec<u32>],
    decoder_ids: &[Vec<u32>],
) -> Vec<Vec<Vec<f32>>> {
    let inputs: Vec<&[u32]> = input_ids.iter().map(Vec::as_slice).collect();
    let (mut batch, slots) = start(&m.model, &inputs);
    let tokens: Vec<(usize, Vec<u32>)> =
        slots.into_iter().zip(decoder_ids.iter().cloned()).collect();
    step(&m.model, &mut batch, &tokens)
}

fn assert_logits_close(case: &str, what: &str, got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (pos, (gp, wp)) in g.iter().zip(w).enumerate() {
            let d = max_abs_diff(gp, wp);
            assert!(
                d < 1e-4,
                "{case} {what}: input {i} position {pos} differs by {d}"
            );
        }
    }
}

#[test]
fn tokenizer_matches_transformers() {
    for case in CASES {
        let r = reference(case);
        let m = load_case(&r);
        for (text, ids) in r.inputs.iter().zip(&r.input_ids) {
            assert_eq!(
                m.tokenizer.encode(text.as_str(), true).unwrap().get_ids(),
                ids.as_slice(),
                "{case}"
            );
        }
        let labels = LabelSet::new(&r.labels, &m.tokenizer).unwrap();
        assert_eq!(labels.targets, r.label_ids, "{case}");
    }
}

#[test]
fn tokenizer_edge_cases_match_transformers() {
    #[derive(Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
        decoded: String,
    }
    #[derive(Deserialize)]
    struct Cases {
        cases: Vec<Case>,
    }
    let path = fixtures().join("tokenizer_cases.json");
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("tokenizer.json")).unwrap();
    for c in cases.cases {
        let enc = tok.encode(c.text.as_str(), true).unwrap();
        assert_eq!(enc.get_ids(), c.ids.as_slice(), "{:?}", c.text);
        assert_eq!(tok.decode(&c.ids, true).unwrap(), c.decoded, "{:?}", c.text);
    }
}

#[test]
fn teacher_forced_logits_match_peft() {
    for case in CASES {
        let r = reference(case);
        let m = load_case(&r);
        let got = batch_logits(&m, &r.input_ids, &r.decoder_input_ids);
        assert_logits_close(case, "runtime-LoRA logits", &got, &r.logits);
        assert_logits_close(case, "merge_and_unload logits", &got, &r.merged_logits);
    }
}

#[test]
fn incremental_decoding_matches_full_decoding() {
    let r = reference("mt5_all_patterns");
    let m = load_case(&r);
    let inputs: Vec<&[u32]> = r.input_ids.iter().map(Vec::as_slice).collect();
    let (mut batch, slots) = start(&m.model, &inputs);
    let steps = r.decoder_input_ids[0].len();
    for pos in 0..steps {
        let tokens: Vec<(usize, Vec<u32>)> = slots
            .iter()
            .zip(&r.decoder_input_ids)
            .map(|(&s, d)| (s, vec![d[pos]]))
            .collect();
        let logits = step(&m.model, &mut batch, &tokens);
        for (i, l) in logits.iter().enumerate() {
            let d = max_abs_diff(&l[0], &r.logits[i][pos]);
            assert!(d < 1e-4, "input {i} step {pos} differs by {d}");
        }
    }
}

/// Sequences that join a running batch late, leave early, or reuse a freed slot (in the middle,
/// or the last row after the step shrank) see exactly the logits they would see alone: per-slot
/// masks and the shared position bias are right.
#[test]
fn sequences_joining_and_leaving_a_running_batch_match_the_reference() {
    let r = reference("mt5_all_patterns");
    let m = load_case(&r);
    let model = &m.model;
    let steps = r.decoder_input_ids[0].len();
    assert!(r.input_ids.len() >= 3 && steps >= 4, "fixture too small");
    let mut batch = model.new_batch();
    // (input, slot, next position) of the running sequences.
    let mut running: Vec<(usize, usize, usize)> = Vec::new();
    let join = |batch: &mut DecodeBatch, running: &mut Vec<(usize, usize, usize)>, input: usize| {
        let encoded = model.encode(&[r.input_ids[input].as_slice()]).unwrap();
        let slot = model.join(batch, &encoded, &[0]).unwrap()[0];
        running.push((input, slot, 0));
        slot
    };
    let first = join(&mut batch, &mut running, 0);
    let mut checked = 0;
    for round in 0..steps + 5 {
        match round {
            2 => {
                join(&mut batch, &mut running, 1);
            }
            3 => {
                // Input 0 leaves; input 2 must reuse its slot.
                running.retain(|&(i, _, _)| i != 0);
                batch.free(first);
                assert_eq!(join(&mut batch, &mut running, 2), first);
            }
            4 => {
                // The last row's sequence leaves, so the step shrinks; input 0 starts again and
                // moves into that row, whose storage still holds the other input's keys.
                let (input, last, _) = running.iter().copied().max_by_key(|&(_, s, _)| s).unwrap();
                assert_ne!(input, 0);
                running.retain(|&(_, s, _)| s != last);
                batch.free(last);
                assert_eq!(batch.num_slots(), last);
                assert_eq!(join(&mut batch, &mut running, 0), last);
            }
            _ => {}
        }
        running.retain(|&(_, slot, pos)| {
            let done = pos >= steps;
            if done {
                batch.free(slot);
            }
            !done
        });
        if running.is_empty() {
            break;
        }
        let tokens: Vec<(usize, Vec<u32>)> = running
            .iter()
            .map(|&(i, slot, pos)| (slot, vec![r.decoder_input_ids[i][pos]]))
            .collect();
        let logits = step(model, &mut batch, &tokens);
        for ((i, _, pos), l) in running.iter_mut().zip(logits) {
            let d = max_abs_diff(&l[0], &r.logits[*i][*pos]);
            assert!(d < 1e-4, "input {i} position {pos} differs by {d}");
            *pos += 1;
            checked += 1;
        }
    }
    assert!(checked >= 2 * steps, "only {checked} positions checked");
}

fn engine(m: LoadedModel, labels: &[String]) -> Engine {
    let labels = LabelSet::new(labels, &m.tokenizer).unwrap();
    let served = Served {
        name: "parity".into(),
        // These tests check scores, not which files made them.
        digest: "sha256:not-hashed".into(),
        backend: T5Backend::new(m.model),
        labels,
        target_template: None,
    };
    Engine::start(
        vec![served],
        Arc::new(m.tokenizer),
        EngineConfig {
            max_batch_size: 8,
            max_batch_tokens: 4096,
            queue_capacity: 64,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The generated ids, checking that each token carries a log-probability exactly when asked.
fn generated_ids(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
    logprobs: bool,
) -> Vec<u32> {
    loop {
        match rx.blocking_recv().expect("engine hung up") {
            GenerateEvent::End(out) => {
                assert!(out.tokens.iter().all(|t| t.logprob.is_some() == logprobs));
                return out.tokens.iter().map(|t| t.id).collect();
            }
            GenerateEvent::Error(e) => panic!("generation failed: {e}"),
            GenerateEvent::Token(_) => {}
        }
    }
}

/// Without log-probabilities a greedy step takes the int8 screen of `lm_head` where the CPU has
/// AVX2 (`model::greedy`; steps of any size with AVX-512 VNNI); with them, the full f32 logits.
/// Both must give transformers' tokens.
#[test]
fn greedy_generation_is_token_identical_alone_and_batched() {
    for case in CASES {
        let r = reference(case);
        assert!(
            r.greedy.iter().all(|g| g.len() >= 24),
            "{case}: fixture needs >= 24 tokens"
        );
        let e = engine(load_case(&r), &r.labels);
        for logprobs in [false, true] {
            let params = GenerateParams {
                max_new_tokens: r.greedy_max_new_tokens,
                logprobs,
                ..Default::default()
            };
            // All inputs at once: they share decode steps (continuous batching).
            let mut batched: Vec<_> = r
                .input_ids
                .iter()
                .map(|ids| {
                    e.generate(ids.clone(), params.clone(), &e.variant(None).unwrap())
                        .unwrap()
                })
                .collect();
            for (i, rx) in batched.iter_mut().enumerate() {
                assert_eq!(
                    generated_ids(rx, logprobs),
                    r.greedy[i],
                    "{case} input {i} (batched, logprobs {logprobs})"
                );
            }
            for (i, ids) in r.input_ids.iter().enumerate() {
                let mut rx = e
                    .generate(ids.clone(), params.clone(), &e.variant(None).unwrap())
                    .unwrap();
                assert_eq!(
                    generated_ids(&mut rx, logprobs),
                    r.greedy[i],
                    "{case} input {i} (alone, logprobs {logprobs})"
                );
            }
        }
    }
}

/// The teacher-forced likelihood of a reference (`eval --task generate`'s loss) is PEFT's summed
/// log-probability of that sequence; the fixture's label sequences serve as references.
#[test]
fn reference_likelihoods_match_peft() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for case in CASES {
        let r = reference(case);
        let e = engine(load_case(&r), &r.labels);
        for (i, text) in r.inputs.iter().enumerate() {
            for (l, label) in r.labels.iter().enumerate() {
                let got = rt
                    .block_on(e.likelihood(LikelihoodQuery {
                        text: text.clone(),
                        reference: label.clone(),
                        ..Default::default()
                    }))
                    .unwrap();
                let want = r.label_logprobs[i][l];
                assert_eq!(got.tokens, r.label_ids[l].len(), "{case} label {l}");
                assert!(
                    (got.log_prob - want).abs() < 1e-4,
                    "{case} input {i} label {l}: log-prob {} vs {want}",
                    got.log_prob
                );
            }
        }
    }
}

#[test]
fn label_probabilities_match_and_batching_changes_nothing() {
    for case in CASES {
        let r = reference(case);
        let m = load_case(&r);
        let labels = LabelSet::new(&r.labels, &m.tokenizer).unwrap();
        let inputs: Vec<&[u32]> = r.input_ids.iter().map(Vec::as_slice).collect();
        let batched = score(&m.model, &inputs, &labels).unwrap();
        for (i, s) in batched.iter().enumerate() {
            for (l, (got, want)) in s.probs.iter().zip(&r.label_probs[i]).enumerate() {
                assert!(
                    (got - want).abs() < 1e-5,
                    "{case} input {i} label {l}: {got} vs {want}"
                );
            }
            for (got, want) in s.log_probs.iter().zip(&r.label_logprobs[i]) {
                assert!(
                    (got - want).abs() < 1e-4,
                    "{case} input {i}: log-prob {got} vs {want}"
                );
            }
            let alone = score(&m.model, &inputs[i..i + 1], &labels).unwrap();
            for (a, b) in alone[0].probs.iter().zip(&s.probs) {
                assert!(
                    (a - b).abs() < 1e-6,
                    "{case} input {i}: alone {a} vs batched {b}"
                );
            }
        }
    }
}

#[test]
fn sharded_and_pytorch_bin_checkpoints_load_the_same_model() {
    let r = reference("mt5_qv");
    let adapters = [fixtures().join("adapters/qv")];
    for dir in ["mt5_base_sharded", "mt5_base_bin"] {
        let m = load(&fixtures().join(dir), &adapters);
        let got = batch_logits(&m, &r.input_ids, &r.decoder_input_ids);
        assert_logits_close(dir, "logits", &got, &r.logits);
    }
}

#[test]
fn hub_offline_cache_layout_resolves_model_and_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let install = |repo: &str, src: &Path| {
        let root = tmp
            .path()
            .join(format!("models--{}", repo.replace('/', "--")));
        let snap = root.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "0123abcd").unwrap();
        for f in std::fs::read_dir(src).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
        }
    };
    install("acme/mt0-tiny", &fixtures().join("mt5_base"));
    install("acme/mt0-tiny-lora", &fixtures().join("adapters/qv"));
    let hub = HubConfig {
        cache_dir: tmp.path().to_path_buf(),
        endpoint: None,
        token: None,
        offline: true,
    };
    let mut s = spec(Path::new("acme/mt0-tiny"), &[]);
    s.adapters = vec![AdapterSpec {
        source: "acme/mt0-tiny-lora".into(),
        weight: 1.0,
    }];
    let m = model::load(&s, &hub, false).unwrap();
    let r = reference("mt5_qv");
    assert_logits_close(
        "hub",
        "logits",
        &batch_logits(&m, &r.input_ids, &r.decoder_input_ids),
        &r.logits,
    );
}

#[test]
fn adapter_weight_scales_the_update() {
    let r = reference("mt5_qv");
    let base = load(&fixtures().join("mt5_base"), &[]);
    let mut s = spec(
        &fixtures().join("mt5_base"),
        &[fixtures().join("adapters/qv")],
    );
    s.adapters[0].weight = 0.0;
    let zero = model::load(&s, &offline_hub(), false).unwrap();
    let a = batch_logits(&base, &r.input_ids, &r.decoder_input_ids);
    let b = batch_logits(&zero, &r.input_ids, &r.decoder_input_ids);
    assert_logits_close("weight 0", "logits", &b, &a);
    // Two half-weight merges of the same adapter equal one full merge.
    s.adapters[0].weight = 0.5;
    s.adapters.push(s.adapters[0].clone());
    let halves = model::load(&s, &offline_hub(), false).unwrap();
    let got = batch_logits(&halves, &r.input_ids, &r.decoder_input_ids);
    assert_logits_close("two halves", "logits", &got, &r.logits);
}

#[test]
fn merge_export_reproduces_merge_and_unload() {
    for (case, adapter) in [("mt5_qv", "adapters/qv"), ("t5_qv", "adapters/t5_qv")] {
        let r = reference(case);
        let out = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
            .args(["merge", "--model"])
            .arg(fixtures().join(&r.model))
            .arg("--adapter")
            .arg(fixtures().join(adapter))
            .arg("--out")
            .arg(out.path())
            .status()
            .unwrap();
        assert!(status.success());
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            assert!(out.path().join(f).is_file(), "{f} missing");
        }
        let m = load(out.path(), &[]);
        let got = batch_logits(&m, &r.input_ids, &r.decoder_input_ids);
        assert_logits_close(case, "exported logits", &got, &r.merged_logits);
    }
}

/// Copies the `qv` adapter into a temp dir and lets `edit` break it.
fn broken_adapter(
    edit: impl FnOnce(&mut serde_json::Value, &mut std::collections::HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = fixtures().join("adapters/qv");
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    edit(&mut config, &mut tensors);
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

fn refusal(adapter: &Path) -> String {
    match model::load(
        &spec(&fixtures().join("mt5_base"), &[adapter.to_path_buf()]),
        &offline_hub(),
        false,
    ) {
        Ok(_) => panic!("adapter {} was accepted", adapter.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapters_are_refused_naming_file_and_tensor() {
    const Q_A: &str = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";
    let cases: Vec<(&str, tempfile::TempDir, Vec<&str>)> = vec![
        (
            "peft_type",
            broken_adapter(|c, _| c["peft_type"] = "PREFIX_TUNING".into()),
            vec!["adapter_config.json", "PREFIX_TUNING"],
        ),
        (
            "dora",
            broken_adapter(|c, _| c["use_dora"] = true.into()),
            vec!["adapter_config.json", "use_dora"],
        ),
        (
            "no match",
            broken_adapter(|c, _| c["target_modules"] = serde_json::json!(["query"])),
            vec!["adapter_model.safetensors", "no module"],
        ),
        (
            "unused tensor",
            broken_adapter(|_, t| {
                let a = t[Q_A].clone();
                t.insert(Q_A.replace(".q.", ".k."), a);
                let b_name = Q_A.replace("lora_A", "lora_B");
                let b = t[&b_name].clone();
                t.insert(b_name.replace(".q.", ".k."), b);
            }),
            vec!["adapter_model.safetensors", "SelfAttention.k.lora_A.weight"],
        ),
        (
            "shape",
            broken_adapter(|_, t| {
                let a = t[Q_A].narrow(1, 0, 5).unwrap().contiguous().unwrap();
                t.insert(Q_A.to_string(), a);
            }),
            vec![
                "adapter_model.safetensors",
                "encoder.block.0.layer.0.SelfAttention.q",
            ],
        ),
        (
            "bias",
            broken_adapter(|_, t| {
                let bias = Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap();
                t.insert(Q_A.replace("lora_A.weight", "lora_B.bias"), bias);
            }),
            vec!["adapter_model.safetensors", "SelfAttention.q.lora_B.bias"],
        ),
    ];
    for (what, dir, needles) in cases {
        let msg = refusal(dir.path());
        for n in needles {
            assert!(msg.contains(n), "{what}: `{msg}` does not mention `{n}`");
        }
    }
}

/// Every merged weight acts like the base weight plus the low-rank update applied at run time,
/// `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`, computed here from the adapter file without any merge code.
#[test]
fn merged_weights_equal_runtime_low_rank_update() {
    let base_dir = fixtures().join("mt5_base");
    let adapter_dir = fixtures().join("adapters/qv");
    let merged = model::load_merged(
        &spec(&base_dir, std::slice::from_ref(&adapter_dir)),
        &offline_hub(),
    )
    .unwrap();
    let base = model::load_merged(&spec(&base_dir, &[]), &offline_hub()).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let scale = config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap();
    let lora =
        candle_core::safetensors::load(adapter_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut checked = 0;
    for (name, a) in lora.iter().filter(|(n, _)| n.contains(".lora_A.")) {
        let b = &lora[&name.replace(".lora_A.", ".lora_B.")];
        let module = name
            .strip_prefix("base_model.model.")
            .unwrap()
            .split(".lora_A.")
            .next()
            .unwrap();
        let w_name = format!("{module}.weight");
        let w0 = base.weights.get(&w_name).unwrap().unwrap();
        let w1 = merged.weights.get(&w_name).unwrap().unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, w0.dim(1).unwrap()), &Device::Cpu).unwrap();
        let runtime = (x.matmul(&w0.t().unwrap()).unwrap()
            + (x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                * scale)
                .unwrap())
        .unwrap();
        let merged_out = x.matmul(&w1.t().unwrap()).unwrap();
        let diff: f32 = (runtime - merged_out)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff < 1e-4,
            "{module}: merged and runtime LoRA differ by {diff}"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} LoRA modules checked");
}
