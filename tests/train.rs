//! `finserve train` against torch + peft: for one batch on the fixture mT5, the loss, the
//! gradient of every LoRA tensor and the factors after one AdamW step equal PyTorch's
//! (tests/train/make_fixture.py); and the adapter `finserve train` writes is PEFT's format and
//! is served exactly as it was trained.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::optim::Optimizer;
use finserve::engine::sentiment::{LabelSet, score};
use finserve::engine::targets::TargetTemplate;
use finserve::model::linear::Quantization;
use finserve::model::lora::AdapterConfig;
use finserve::model::{self, Checkpoint, ModelSpec};
use finserve::train::lora_t5::LoraT5;
use finserve::train::{Recipe, Row, gradients, merged_model, optimizer, peft};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

fn checkpoint(dir: &Path) -> Checkpoint {
    let spec = ModelSpec {
        model: dir.display().to_string(),
        revision: None,
        adapters: Vec::new(),
        variants: Vec::new(),
        dtype: candle_core::DType::F32,
        device: Device::Cpu,
        quantize: Quantization::None,
        greedy_screen: false,
    };
    let hub = common::offline_hub();
    model::load_checkpoint(&spec, &hub).unwrap()
}

/// `max |a - b| <= tol * max |b|`: the relative error of the tensor as a whole.
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    let (diff, scale) = (
        diff.to_scalar::<f32>().unwrap() as f64,
        scale.to_scalar::<f32>().unwrap() as f64,
    );
    assert!(
        diff <= tol * scale.max(1e-12),
        "{what}: max diff {diff:e} vs scale {scale:e}"
    );
}

fn check_case(case: &str) {
    let dir = common::repo().join("tests/train/fixtures");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap())
            .unwrap();
    let want: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join(format!("{case}.safetensors")), &Device::Cpu)
            .unwrap();
    let ckpt = checkpoint(&common::fixtures().join("mt5_base"));
    let adapter: AdapterConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA",
        "r": meta["r"],
        "lora_alpha": meta["lora_alpha"],
        "target_modules": meta["target_modules"],
    }))
    .unwrap();
    let mut weights = ckpt.weights.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let model = LoraT5::new(ckpt.config.clone(), &mut weights, &adapter, &mut rng).unwrap();
    let loras = model.loras();
    let names: Vec<&str> = loras.iter().map(|l| l.module.as_str()).collect();
    let expected: Vec<&str> = meta["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(names, expected, "{case}: targeted modules");
    for l in &loras {
        l.a.set(&want[&format!("init.{}.lora_A.weight", l.module)])
            .unwrap();
        l.b.set(&want[&format!("init.{}.lora_B.weight", l.module)])
            .unwrap();
    }
    let ids = |key: &str| -> Vec<Vec<u32>> {
        meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let (inputs, targets) = (ids("inputs"), ids("targets"));
    let rows: Vec<Row> = inputs
        .iter()
        .zip(&targets)
        .map(|(input, target)| Row::Tokens { input, target })
        .collect();
    // The whole batch at once, and split in two pieces trained on two threads (what
    // `finserve train` does on a CPU): both are the same loss and gradients.
    let mut grads = None;
    for pieces in [1, 2] {
        let (got, mut g) = gradients(&model, &rows, &[], pieces, None).unwrap();
        let expect = meta["loss"].as_f64().unwrap();
        assert!(
            (f64::from(got) - expect).abs() <= 1e-5 * expect.abs(),
            "{case}, {pieces} pieces: loss {got} vs torch {expect}"
        );
        for l in &loras {
            for (ab, var) in [("A", &l.a), ("B", &l.b)] {
                let key = format!("{}.lora_{ab}.weight", l.module);
                let torch = &want[&format!("grad.{key}")];
                let what = format!("{case}, {pieces} pieces: grad {key}");
                assert_close(g.get(var.as_tensor()).unwrap(), torch, 1e-4, &what);
                // The optimizer is checked on torch's own gradients: AdamW's first step moves
                // each weight by about lr·g/(|g| + eps), which for gradients near eps magnifies
                // any last-bit difference of g, so comparing steps from our gradients would
                // test that conditioning rather than the optimizer.
                g.insert(var.as_tensor(), torch.clone());
            }
        }
        grads = Some(g);
    }
    let grads = grads.unwrap();
    let recipe = Recipe {
        lora: peft::LoraSettings {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: meta["target_modules"].clone(),
            use_rslora: false,
            base_model_name_or_path: "mt5_base".into(),
        },
        epochs: 1,
        lr: meta["lr"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        warmup_steps: 0,
        batch_size: 3,
        max_grad_norm: 0.0,
        seed: 0,
    };
    let mut opt = optimizer(&model, &recipe).unwrap();
    opt.step(&grads).unwrap();
    for l in &loras {
        for (ab, var) in [("A", &l.a), ("B", &l.b)] {
            let key = format!("{}.lora_{ab}.weight", l.module);
            assert_close(
                var.as_tensor(),
                &want[&format!("step.{key}")],
                1e-6,
                &format!("{case}: after one AdamW step {key}"),
            );
        }
    }
}

#[test]
fn loss_gradients_and_adamw_step_equal_torch_peft_for_q_v() {
    check_case("qv");
}

#[test]
fn loss_gradients_and_adamw_step_equal_torch_peft_for_all_linear_modules() {
    check_case("all_linear");
}

/// A pooled entity row (its template weighs in the text) is learnt through exactly the
/// distribution `serve` answers with: its loss is minus the log of the pooled probability of the
/// gold label, computed here as the server does, by the merged serving model scoring the
/// target's prompt and the text's and `TargetTemplate::pool` combining them; the plain row in
/// the same batch keeps transformers' per-token loss, and splitting the batch changes nothing.
#[test]
fn a_pooled_entity_row_learns_the_distribution_serve_answers_with() {
    let ckpt = checkpoint(&common::fixtures().join("mt5_base"));
    let adapter: AdapterConfig = serde_json::from_value(json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v", "wo"],
    }))
    .unwrap();
    let mut weights = ckpt.weights.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let model = LoraT5::new(ckpt.config.clone(), &mut weights, &adapter, &mut rng).unwrap();
    // B starts at zero; give it values so that the adapter moves the scores.
    for (i, l) in model.loras().iter().enumerate() {
        let b = l.b.as_tensor();
        let values: Vec<f32> = (0..b.elem_count())
            .map(|j| ((j * 7919 + i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        l.b.set(&Tensor::from_vec(values, b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let names = ["negative", "neutral", "positive"].map(String::from);
    let labels = LabelSet::new(&names, &ckpt.tokenizer).unwrap();
    let ids = |s: &str| ckpt.tokenizer.encode(s, true).unwrap().get_ids().to_vec();
    let target = ids("Siemens : <<Siemens>> is rallying 6% after a boom in orders");
    let text = ids("Siemens is rallying 6% after a boom in orders, while Huhtamaki fell 3%");
    let plain = ids("Operating profit fell to EUR 13.1 mn");
    let shown = TargetTemplate {
        text_weight: Some(0.4),
        ..TargetTemplate::new("{target} : {text}", ("<<".into(), ">>".into()), Some(8)).unwrap()
    };
    let rows = [
        Row::Pooled {
            input: &target,
            text: &text,
            label: 0,
            text_weight: 0.4,
        },
        Row::Tokens {
            input: &plain,
            target: &labels.targets[1],
        },
    ];
    let merged = merged_model(&ckpt.config, &ckpt.weights, &model.loras()).unwrap();
    let served = score(&merged, &[&target, &text, &plain], &labels).unwrap();
    let pooled = shown.pool(&served[0], &served[1]);
    assert!(
        (pooled.probs[0] - served[0].probs[0]).abs() > 1e-2,
        "the text's scores must move the target's for this test to tell pooling apart"
    );
    let tokens = labels.targets[0].len() + labels.targets[1].len();
    let want = -(pooled.probs[0].ln() + served[2].log_probs[1]) / tokens as f64;
    for pieces in [1, 2] {
        let (got, grads) = gradients(&model, &rows, &labels.targets, pieces, None).unwrap();
        assert!(
            (f64::from(got) - want).abs() <= 1e-5 * want.abs(),
            "{pieces} pieces: loss {got} vs served {want}"
        );
        for l in model.loras() {
            let g = grads.get(l.a.as_tensor()).unwrap();
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0,
                "{pieces} pieces: no gradient reaches {}",
                l.module
            );
        }
    }
}

fn train(out: &Path, seed: u64) {
    let f = common::repo().join("tests/train/fixtures");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(common::repo())
        .args([
            "train",
            "--model",
            "tests/parity/fixtures/mt5_base",
            "--data",
        ])
        .arg(f.join("tiny.csv"))
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--target-modules",
            "q,k,v,o",
        ])
        .args(["--lr", "5e-3", "--seed", &seed.to_string()])
        .env("FINSERVE_LOG", "warn")
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_same_seed_trains_the_same_adapter_in_peft_format() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    train(&a, 7);
    train(&b, 7);
    train(&c, 8);
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            read(&a, file),
            read(&b, file),
            "{file} differs for the same seed"
        );
    }
    assert_ne!(
        read(&a, "adapter_model.safetensors"),
        read(&c, "adapter_model.safetensors")
    );
    // The files PEFT loaded (tests/train/check_peft.py) have this exact layout.
    let fixture = common::repo().join("tests/train/fixtures/trained");
    assert_eq!(
        read(&a, "adapter_config.json"),
        read(&fixture, "adapter_config.json")
    );
    let names = |d: &Path| {
        let t = candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        let mut n: Vec<(String, Vec<usize>)> =
            t.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect();
        n.sort();
        n
    };
    assert_eq!(names(&a), names(&fixture));
}

/// `finserve train` for one epoch on the tiny sentence rows plus the tiny entity file (`repeat`
/// times), scored on the entity file, with `extra` flags.
fn train_with_entities(out: &Path, repeat: usize, extra: &[&str]) -> std::process::Output {
    let f = common::repo().join("tests/train/fixtures");
    std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(common::repo())
        .args([
            "train",
            "--model",
            "tests/parity/fixtures/mt5_base",
            "--data",
        ])
        .arg(format!(
            "{},{}:{repeat}",
            f.join("tiny.csv").display(),
            f.join("tiny_entities.jsonl").display()
        ))
        .arg("--eval-data")
        .arg(f.join("tiny_entities.jsonl"))
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--target-modules",
            "q,k,v,o",
        ])
        .args(["--lr", "5e-3", "--seed", "7"])
        .args(extra)
        .env("FINSERVE_LOG", "info")
        .output()
        .unwrap()
}

/// Sentence rows and FinEntity rows train one adapter: PEFT's layout as above, with the target
/// template beside it, which `serve` then reads to answer entity requests.
#[test]
fn entity_rows_train_into_the_same_adapter_with_its_target_template() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mixed");
    let f = common::repo().join("tests/train/fixtures");
    let output = train_with_entities(&out, 2, &[]);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let entities: usize = std::fs::read_to_string(f.join("tiny_entities.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["annotations"]
                .as_array()
                .unwrap()
                .len()
        })
        .sum();
    let rows = std::fs::read_to_string(f.join("tiny.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;
    // `:2` goes through the entity file twice per epoch.
    assert!(
        log.contains(&format!("examples={}", rows + 2 * entities)),
        "{log}"
    );
    let fixture = f.join("trained");
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(
        read(&out, "adapter_config.json"),
        read(&fixture, "adapter_config.json")
    );
    let template: Value = serde_json::from_slice(&read(&out, "target_template.json")).unwrap();
    assert_eq!(
        template,
        json!({"template": "{target} : {text}", "mark": ["<<", ">>"], "context_words": null})
    );
    // A template that weighs in the text is trained and scored through the pooled scores: the
    // epoch's eval accuracy is the one `finserve eval` then gets from the adapter.
    let weighed = dir.path().join("weighed.json");
    std::fs::write(
        &weighed,
        r#"{"template": "{target} : {text}", "mark": ["<<", ">>"], "text_weight": 0.4}"#,
    )
    .unwrap();
    let pooled = dir.path().join("pooled");
    let weighed = weighed.display().to_string();
    let output = train_with_entities(&pooled, 1, &["--target-template", &weighed]);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let template: Value = serde_json::from_slice(&read(&pooled, "target_template.json")).unwrap();
    assert_eq!(template["text_weight"], json!(0.4));
    let trained: f64 = log
        .split("eval_accuracy=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{log}"))
        .parse()
        .unwrap();
    let eval = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .current_dir(common::repo())
        .args([
            "eval",
            "--model",
            "tests/parity/fixtures/mt5_base",
            "--adapter",
        ])
        .arg(&pooled)
        .arg("--data")
        .arg(f.join("tiny_entities.jsonl"))
        .env("FINSERVE_LOG", "warn")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&eval.stdout);
    assert!(eval.status.success(), "{report}");
    let served: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("targets (this model)"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{report}"))
        .parse()
        .unwrap();
    // `eval` prints four decimals.
    assert!(
        (trained - served).abs() < 5e-5,
        "trained {trained}, served {served}"
    );
    // Without entity rows no template is written.
    let plain = dir.path().join("plain");
    train(&plain, 7);
    assert!(!plain.join("target_template.json").exists());
    // A bad row names its file and line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"content\": \"Acme rose\", \"annotations\": [{\"start\": 0, \"end\": 4, \"label\": \"up\"}]}\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
        .args(["train", "--model"])
        .arg(common::fixtures().join("mt5_base"))
        .arg("--data")
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("bad.jsonl: line 1: label `up`"), "{err}");
}

#[test]
fn a_trained_adapter_is_served_as_peft_computes_it() {
    let f = common::repo().join("tests/train/fixtures");
    let spec = ModelSpec {
        model: common::fixtures().join("mt5_base").display().to_string(),
        revision: None,
        adapters: vec![finserve::model::lora::AdapterSpec {
            source: f.join("trained").display().to_string(),
            weight: 1.0,
        }],
        variants: Vec::new(),
        dtype: candle_core::DType::F32,
        device: Device::Cpu,
        quantize: Quantization::None,
        greedy_screen: false,
    };
    let hub = common::offline_hub();
    let loaded = model::load(&spec, &hub, false).unwrap();
    assert_eq!(loaded.reports[0].modules_merged, 32);
    let m = &loaded.model;
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("peft_logits.json")).unwrap())
            .unwrap();
    let peft: HashMap<String, Tensor> =
        candle_core::safetensors::load(f.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (i, (input, dec)) in meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["decoder_inputs"].as_array().unwrap())
        .enumerate()
    {
        let (input, dec) = (ids(input), ids(dec));
        let mut batch = m.new_batch();
        let encoded = m.encode(&[&input]).unwrap();
        let slot = m.join(&mut batch, &encoded, &[0]).unwrap()[0];
        let mut rows = Vec::new();
        for &t in &dec {
            let hidden = m
                .decode(&mut batch, &[(slot, vec![t])])
                .unwrap()
                .squeeze(1)
                .unwrap();
            rows.push(m.logits(&hidden).unwrap());
        }
        let ours = Tensor::cat(&rows, 0).unwrap();
        assert_close(
            &ours,
            &peft[&format!("logits.{i}")],
            1e-4,
            &format!("input {i}"),
        );
    }
}

/// Each epoch reports the eval set's perplexity of its gold labels, which is what `finserve eval
/// --task generate` measures for the trained adapter with those labels as references.
#[test]
fn each_epoch_reports_the_eval_perplexity_that_eval_generate_measures() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let data = common::repo().join("tests/train/fixtures/tiny.csv");
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
            .current_dir(common::repo())
            .args(args)
            .env("FINSERVE_LOG", "info")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{text}");
        text
    };
    let (data, out_dir) = (data.to_str().unwrap(), out.to_str().unwrap());
    let log = run(&[
        "train",
        "--model",
        "tests/parity/fixtures/mt5_base",
        "--data",
        data,
        "--eval-data",
        data,
        "--out",
        out_dir,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "5e-3",
        "--seed",
        "7",
    ]);
    let number_after = |text: &str, key: &str| -> f64 {
        let at = text
            .find(key)
            .unwrap_or_else(|| panic!("no `{key}` in\n{text}"));
        text[at + key.len()..]
            .split(|c: char| c.is_whitespace() || c == ',')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let trained = number_after(&log, "eval_perplexity=");
    assert!(trained.is_finite() && trained > 1.0, "{trained}");
    let report = run(&[
        "eval",
        "--model",
        "tests/parity/fixtures/mt5_base",
        "--adapter",
        out_dir,
        "--task",
        "generate",
        "--target-column",
        "label",
        "--max-new-tokens",
        "4",
        "--data",
        data,
    ]);
    let measured = number_after(&report, "perplexity           ");
    assert!(
        (measured - trained).abs() <= 1e-3 * trained,
        "train says {trained}, eval --task generate {measured}"
    );
}
