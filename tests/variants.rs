//! Merged variants: each variant of one loaded base computes exactly what the base with that
//! variant's adapters alone computes, while sharing every tensor its adapters leave alone; over
//! HTTP, `adapter_id` and the OpenAI `model` pick one, and concurrent requests to different
//! variants get what each gets alone.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use finserve::engine::sentiment::{LabelSet, score};
use finserve::model::linear::Quantization;
use finserve::model::lora::AdapterSpec;
use finserve::model::t5::T5Model;
use finserve::model::{self, LoadedModel, ModelSpec, VariantSpec};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn adapter(weight: f64) -> AdapterSpec {
    AdapterSpec {
        source: repo().join("models/demo/adapter").display().to_string(),
        weight,
    }
}

fn load(adapters: Vec<AdapterSpec>, variants: Vec<VariantSpec>, q: Quantization) -> LoadedModel {
    let spec = ModelSpec {
        model: repo().join("models/demo/base").display().to_string(),
        revision: None,
        adapters,
        variants,
        dtype: DType::F32,
        device: Device::Cpu,
        quantize: q,
        greedy_screen: true,
    };
    let hub = common::offline_hub();
    model::load(&spec, &hub, false).unwrap()
}

const TEXTS: &[&str] = &[
    "Operating profit rose to EUR 13.5 mn from EUR 9.7 mn in the corresponding period in 2006 .",
    "The company 's profit totaled Ls 578,100 in H1 2007 , down 30.9 % year-on-year .",
    "The total value of the contract is some EUR 8 million .",
];

/// Label probabilities and the first greedy decode steps' logits of `TEXTS`, batched.
fn outputs(m: &T5Model, loaded: &LoadedModel) -> (Vec<Vec<f64>>, Vec<Vec<f32>>) {
    let names: Vec<String> = ["negative", "neutral", "positive"].map(String::from).into();
    let labels = LabelSet::new(&names, &loaded.tokenizer).unwrap();
    let ids: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| {
            loaded
                .tokenizer
                .encode(*t, true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect();
    let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let probs = score(m, &inputs, &labels)
        .unwrap()
        .into_iter()
        .map(|s| s.probs)
        .collect();
    let mut batch = m.new_batch();
    let encoded = m.encode(&inputs).unwrap();
    let slots = m.join(&mut batch, &encoded, &[0, 1, 2]).unwrap();
    let mut tokens: Vec<(usize, Vec<u32>)> = slots
        .iter()
        .map(|&s| (s, vec![m.config().decoder_start_token_id()]))
        .collect();
    let mut logits = Vec::new();
    for _ in 0..3 {
        let hidden = m.decode(&mut batch, &tokens).unwrap().squeeze(1).unwrap();
        let step: Vec<Vec<f32>> = m.logits(&hidden).unwrap().to_vec2().unwrap();
        for ((_, t), row) in tokens.iter_mut().zip(&step) {
            let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
            *t = vec![best.unwrap() as u32];
        }
        logits.extend(step);
    }
    (probs, logits)
}

fn check(q: Quantization) {
    let variants = vec![
        "half=".to_string() + &adapter(0.5).source + ":0.5",
        "base=".to_string(),
    ]
    .into_iter()
    .map(|v| v.parse::<VariantSpec>().unwrap())
    .collect();
    let all = load(vec![adapter(1.0)], variants, q);
    assert_eq!(all.variants.len(), 2);
    assert_eq!(all.variants[0].reports[0].weight, 0.5);
    assert!(all.variants[1].reports.is_empty());

    let alone = [
        load(vec![adapter(1.0)], vec![], q),
        load(vec![adapter(0.5)], vec![], q),
        load(vec![], vec![], q),
    ];
    let served = [&all.model, &all.variants[0].model, &all.variants[1].model];
    for (i, (m, a)) in served.iter().zip(&alone).enumerate() {
        // Same merged weights, same kernels: the outputs are identical, not merely close.
        assert_eq!(outputs(m, &all), outputs(&a.model, a), "model {i} ({q:?})");
    }
    let (default, half) = (
        outputs(&all.model, &all),
        outputs(&all.variants[0].model, &all),
    );
    assert_ne!(default.0, half.0, "the variants must differ");

    // One copy of the base, plus what each variant's adapters changed.
    let one = alone[0].weight_bytes;
    assert_eq!(alone[0].unshared_bytes, one);
    let extra: usize = all.variants.iter().map(|v| v.unshared_bytes).sum();
    assert!(extra > 0 && all.variants.iter().all(|v| v.unshared_bytes > 0));
    assert_eq!(all.weight_bytes, one + extra, "({q:?})");
    // The demo adapter changes every linear layer but lm_head: the embedding, lm_head and norms
    // (two thirds of this small model) stay shared, and three models fit in less than two.
    let cfg = all.model.config();
    let embedding = cfg.vocab_size * cfg.d_model * 4;
    for v in &all.variants {
        assert!(
            v.unshared_bytes + embedding < one,
            "{}: {}",
            v.name,
            v.unshared_bytes
        );
    }
    assert!(
        all.weight_bytes < 2 * one,
        "three models take {} bytes, one {one}",
        all.weight_bytes
    );
}

#[test]
fn variants_equal_their_adapters_served_alone_and_share_the_rest() {
    check(Quantization::None);
}

#[test]
fn quantized_variants_share_the_quantized_layers() {
    check(Quantization::Q8);
}

#[test]
fn variant_flags_parse() {
    let v: VariantSpec = "desk-eu=a:0.5+b".parse().unwrap();
    assert_eq!(v.name, "desk-eu");
    assert_eq!(v.adapters.len(), 2);
    assert_eq!(v.adapters[0].weight, 0.5);
    assert_eq!(v.adapters[1].source, "b");
    assert!("no-equals".parse::<VariantSpec>().is_err());
    assert!("bad name=a".parse::<VariantSpec>().is_err());
    assert!("=a".parse::<VariantSpec>().is_err());
}

/// A server with the fixture base, its `qv` adapter as the default and two variants: the
/// `all_patterns` adapter and the bare base.
fn server_with_variants() -> common::Server {
    let f = common::fixtures();
    let all = f.join("adapters/all_patterns").display().to_string();
    common::start(&[
        "--served-model-name",
        "prod",
        "--variant",
        &format!("candidate={all}"),
        "--variant",
        "base=",
    ])
}

fn serve_alone(adapter: Option<&str>) -> common::Server {
    let f = common::fixtures();
    let mut args: Vec<String> = ["serve", "--host", "127.0.0.1", "--port", "0", "--model"]
        .map(String::from)
        .into();
    args.push(f.join("mt5_base").display().to_string());
    match adapter {
        Some(a) => args.extend(["--adapter".into(), f.join(a).display().to_string()]),
        None => args.push("--no-adapter".into()),
    }
    common::start_with(&args, &[])
}

const HTTP_TEXTS: [&str; 3] = [
    "Profit rose .",
    "Net sales fell 10 % .",
    "The board met on Tuesday .",
];

fn sentiment(variant: Option<&str>, text: &str) -> Value {
    json!({"inputs": text, "parameters": {"adapter_id": variant}})
}

fn generate(variant: Option<&str>, text: &str) -> Value {
    json!({"inputs": text, "parameters": {"adapter_id": variant, "max_new_tokens": 8, "details": true}})
}

/// The same tokens and text; log-probabilities equal to 1e-5 (the CPU kernels block differently
/// for different batch shapes, which moves the last bits).
fn assert_same_generation(got: &Value, want: &Value, variant: &str) {
    assert_eq!(got["generated_text"], want["generated_text"], "{variant}");
    let tokens = |v: &Value| v["details"]["tokens"].as_array().unwrap().clone();
    let (g, w) = (tokens(got), tokens(want));
    assert_eq!(g.len(), w.len(), "{variant}");
    for (a, b) in g.iter().zip(&w) {
        assert_eq!(a["id"], b["id"], "{variant}");
        let (x, y) = (
            a["logprob"].as_f64().unwrap(),
            b["logprob"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-5, "{variant}: {x} vs {y}");
    }
}

#[test]
fn requests_pick_their_variant_and_get_what_it_serves_alone() {
    let s = server_with_variants();
    let alone = [
        (Some("prod"), serve_alone(Some("adapters/qv"))),
        (
            Some("candidate"),
            serve_alone(Some("adapters/all_patterns")),
        ),
        (Some("base"), serve_alone(None)),
    ];
    // Every variant's requests at once, mixed: batches never mix variants, so each answer is
    // what the variant's model gives alone.
    let url = s.url.clone();
    let handles: Vec<_> = alone
        .iter()
        .flat_map(|(v, _)| HTTP_TEXTS.iter().map(move |t| (*v, *t)))
        .flat_map(|(v, t)| [("sentiment", sentiment(v, t)), ("generate", generate(v, t))])
        .map(|(route, body)| {
            let url = url.clone();
            std::thread::spawn(move || {
                let v: Value = ureq::post(&format!("{url}/v1/{route}"))
                    .send_json(body.clone())
                    .unwrap()
                    .into_json()
                    .unwrap();
                (route, body, v)
            })
        })
        .collect();
    for h in handles {
        let (route, mut body, got) = h.join().unwrap();
        let variant = body["parameters"]["adapter_id"]
            .as_str()
            .unwrap()
            .to_string();
        let (_, single) = alone
            .iter()
            .find(|(v, _)| *v == Some(variant.as_str()))
            .unwrap();
        body["parameters"]["adapter_id"] = Value::Null;
        let (code, want) = single.post(&format!("/v1/{route}"), &body);
        assert_eq!(code, 200);
        if route == "sentiment" {
            common::assert_same_scores(&got, &want, 0);
        } else {
            assert_same_generation(&got, &want, &variant);
        }
    }
    // No adapter_id is the default model; the variants really differ.
    let plain = s.post("/v1/sentiment", &json!({"inputs": HTTP_TEXTS[0]})).1;
    assert_eq!(
        plain,
        s.post("/v1/sentiment", &sentiment(Some("prod"), HTTP_TEXTS[0]))
            .1
    );
    assert_ne!(
        plain,
        s.post("/v1/sentiment", &sentiment(Some("base"), HTTP_TEXTS[0]))
            .1
    );

    let (code, err) = s.post("/v1/generate", &generate(Some("nope"), "Profit rose ."));
    assert_eq!(code, 422, "{err}");
    let message = err["error"].as_str().unwrap();
    for name in ["nope", "prod", "candidate", "base"] {
        assert!(message.contains(name), "{message}");
    }
    assert_eq!(
        s.post("/v1/sentiment", &sentiment(Some("nope"), "x")).0,
        422
    );

    // The OpenAI routes: one model per variant, `model` selects it.
    let models: Value = serde_json::from_str(&s.get("/v1/models").1).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["prod", "candidate", "base"]);
    let completion = |model: &str| {
        let body =
            json!({"model": model, "prompt": HTTP_TEXTS[1], "max_tokens": 8, "temperature": 0});
        let (code, v) = s.post("/v1/completions", &body);
        assert_eq!(code, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let generated = |variant: &str| {
        let v = s
            .post("/v1/generate", &generate(Some(variant), HTTP_TEXTS[1]))
            .1;
        v["generated_text"].as_str().unwrap().to_string()
    };
    for v in ["prod", "candidate", "base"] {
        assert_eq!(completion(v), generated(v), "{v}");
    }

    // /info reports each variant's merge and the bytes it adds; metrics carry its name.
    let info: Value = serde_json::from_str(&s.get("/info").1).unwrap();
    assert_eq!(info["name"], "prod");
    let variants = info["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    assert_eq!(variants[0]["name"], "candidate");
    assert!(
        variants[0]["adapters"][0]["modules_merged"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(variants[1]["adapters"].as_array().unwrap().len(), 0);
    let total = info["weight_bytes"].as_u64().unwrap();
    let unshared: u64 = variants
        .iter()
        .map(|v| v["unshared_bytes"].as_u64().unwrap())
        .sum();
    assert!(unshared > 0 && total > unshared + info["unshared_bytes"].as_u64().unwrap());
    let m = s.metrics();
    for v in ["prod", "candidate", "base"] {
        let label = format!("kind=\"generate\",variant=\"{v}\"");
        assert!(
            common::metric_value(&m, "finserve_batch_size_count", &label).unwrap() > 0.0,
            "{v}"
        );
        let label = format!("variant=\"{v}\"");
        assert!(
            common::metric_value(&m, "finserve_sentiment_predictions_total", &label).is_some(),
            "{v}"
        );
        assert!(
            common::metric_value(&m, "finserve_generated_tokens_total", &label).unwrap() > 0.0,
            "{v}"
        );
    }
}

#[test]
fn bad_variant_flags_stop_the_server_with_a_precise_message() {
    let f = common::fixtures();
    let base = f.join("mt5_base").display().to_string();
    let run = |variant: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_finserve"))
            .args([
                "serve",
                "--port",
                "0",
                "--model",
                &base,
                "--no-adapter",
                "--variant",
                variant,
            ])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run("bad name=x").contains("variant name `bad name`"));
    let missing = run("v=/nonexistent/adapter");
    assert!(missing.contains("/nonexistent/adapter"), "{missing}");
    let taken = run(&format!("{base}="));
    assert!(taken.contains("already served"), "{taken}");
}
