//! Merged variants: each variant of one loaded base computes exactly what the base with that
//! variant's adapters alone computes, while sharing every tensor its adapters leave alone.

use std::path::PathBuf;

use candle_core::{DType, Device};
use finserve::engine::sentiment::{LabelSet, score};
use finserve::hub::HubConfig;
use finserve::lora::AdapterSpec;
use finserve::model::linear::Quantization;
use finserve::model::t5::T5Model;
use finserve::model::{self, LoadedModel, ModelSpec, VariantSpec};

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
    };
    let hub = HubConfig {
        cache_dir: std::env::temp_dir().join("finserve-test-no-cache"),
        endpoint: None,
        token: None,
        offline: true,
    };
    model::load(&spec, &hub).unwrap()
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
