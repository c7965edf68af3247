//! Encoder and decode-step throughput on an mt0-small-shaped model with random weights
//! (d_model 512, d_ff 1024, 6 heads x 64, 8 + 8 layers, vocab 250112) on the CPU, in f32, with
//! `--quantize q8` and (on CPUs with AVX512-BF16) bf16 weights, at 1, 4 and 16 rows, and the
//! encoder and a greedy step at mt0-base's shape (768, 2048, 12 x 64, 12 + 12); the machine's read
//! bandwidth next to the bandwidth each f32 projection reaches in a decode step; and a greedy
//! step's token choice: every logit from each kind of weights, and f32's with and without
//! `lm_head`'s int8 screen. These are the engine's own numbers; `benches/compare.py` compares
//! the whole server with transformers and CTranslate2.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group};
use finserve::engine::sentiment::{LabelSet, score};
use finserve::model::decode_batch::DecodeBatch;
use finserve::model::linear::{Linear, Quantization, SharedLayers};
use finserve::model::ops::row_stats;
use finserve::model::t5::{Config, T5Model};
use finserve::model::weights::Weights;

/// The server's allocator (see `src/main.rs`), so these figures do not include page faults the
/// server does not pay.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mt0-small's shape (see [`Shape`]).
const SMALL: Shape = Shape {
    name: "mt0-small",
    d_model: 512,
    d_ff: 1024,
    heads: 6,
    layers: 8,
};

/// mt0-base's shape, whose encoder the generation rows of `benches/compare.py` spend most of
/// their time in at that size.
const BASE: Shape = Shape {
    name: "mt0-base",
    d_model: 768,
    d_ff: 2048,
    heads: 12,
    layers: 12,
};

/// An mT5 shape (heads of 64, gated GELU, vocabulary 250112, as many decoder as encoder layers).
struct Shape {
    name: &'static str,
    d_model: usize,
    d_ff: usize,
    heads: usize,
    layers: usize,
}

/// A model of `shape` with random weights.
fn random_model(shape: &Shape, quantization: Quantization) -> T5Model {
    let Shape {
        d_model,
        d_ff,
        heads,
        layers,
        ..
    } = *shape;
    let inner = heads * 64;
    let config: Config = serde_json::from_value(serde_json::json!({
        "model_type": "mt5", "vocab_size": 250112, "d_model": d_model, "d_kv": 64, "d_ff": d_ff,
        "num_layers": layers, "num_decoder_layers": layers, "num_heads": heads,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false
    }))
    .expect("config");
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        let w = Tensor::randn(0f32, 0.05, shape, &dev).expect("randn");
        t.insert(name, w);
    };
    add("shared.weight".into(), &[250112, d_model]);
    add("lm_head.weight".into(), &[250112, d_model]);
    for stack in ["encoder", "decoder"] {
        add(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &[32, heads],
        );
        add(format!("{stack}.final_layer_norm.weight"), &[d_model]);
        for i in 0..layers {
            let attn: &[&str] = if stack == "encoder" {
                &["0.SelfAttention"]
            } else {
                &["0.SelfAttention", "1.EncDecAttention"]
            };
            for a in attn {
                for p in ["q", "k", "v"] {
                    add(
                        format!("{stack}.block.{i}.layer.{a}.{p}.weight"),
                        &[inner, d_model],
                    );
                }
                add(
                    format!("{stack}.block.{i}.layer.{a}.o.weight"),
                    &[d_model, inner],
                );
            }
            let ff = if stack == "encoder" { 1 } else { 2 };
            for l in 0..=ff {
                add(
                    format!("{stack}.block.{i}.layer.{l}.layer_norm.weight"),
                    &[d_model],
                );
            }
            for wi in ["wi_0", "wi_1"] {
                add(
                    format!("{stack}.block.{i}.layer.{ff}.DenseReluDense.{wi}.weight"),
                    &[d_ff, d_model],
                );
            }
            add(
                format!("{stack}.block.{i}.layer.{ff}.DenseReluDense.wo.weight"),
                &[d_model, d_ff],
            );
        }
    }
    let mut w = Weights::from_tensors(t, "random", DType::F32, &dev);
    let mut layers = SharedLayers::new(quantization).with_greedy_screen(true);
    T5Model::load(config, &mut w, &mut layers).expect("model")
}

/// Encodes `inputs`, starts a decoder per input and feeds each `prefix` tokens.
fn started(model: &T5Model, inputs: &[&[u32]], prefix: usize) -> (DecodeBatch, Vec<usize>) {
    let mut batch = model.new_batch();
    let encoded = model.encode(inputs).expect("encode");
    let rows: Vec<usize> = (0..inputs.len()).collect();
    let slots = model.join(&mut batch, &encoded, &rows).expect("join");
    let warm: Vec<(usize, Vec<u32>)> = slots
        .iter()
        .map(|&s| (s, (0..prefix as u32).collect()))
        .collect();
    model.decode(&mut batch, &warm).expect("prefill");
    (batch, slots)
}

fn bench(c: &mut Criterion) {
    bench_memory(c);
    for q in [Quantization::None, Quantization::Q8, Quantization::Bf16] {
        if q == Quantization::Bf16 && !finserve::model::bf16_linear::available() {
            eprintln!("this CPU has no AVX512-BF16: no bf16 figures");
            continue;
        }
        bench_model(c, q);
        bench_shape(c, &BASE, q);
    }
}

/// A larger shape: the encoder alone, for a whole request of 16 inputs and for the couple of
/// generations that typically join a running batch at once, and a greedy step there.
fn bench_shape(c: &mut Criterion, shape: &Shape, quantization: Quantization) {
    let model = random_model(shape, quantization);
    let mut group = c.benchmark_group(format!("{}-{}", shape.name, quantization.as_str()));
    group.sample_size(10);
    for (batch, len) in [(2, 40), (16, 40)] {
        let ids = token_ids(batch, len);
        bench_encode(&mut group, &model, &ids);
    }
    for rows in [1, 4, 16] {
        bench_greedy_step(&mut group, &model, rows);
    }
    group.finish();
}

/// `greedy_step/{rows}`: a decode step as the server takes it, the decoder over caches 16 tokens
/// deep and one deeper per step, then each row's token from the int8 screen of `lm_head` where
/// the model has one for this many rows, else from every logit. One batch serves all of a
/// sample's steps, so its encoding stays out of the time.
fn bench_greedy_step(group: &mut BenchmarkGroup<'_, WallTime>, model: &T5Model, rows: usize) {
    let ids = token_ids(rows, 40);
    let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function(BenchmarkId::new("greedy_step", rows), |b| {
        b.iter_custom(|steps| {
            let (mut batch, slots) = started(model, &inputs, 16);
            let next: Vec<(usize, Vec<u32>)> = slots.iter().map(|&s| (s, vec![5])).collect();
            let start = Instant::now();
            for _ in 0..steps {
                let hidden = model.decode(&mut batch, &next).expect("step");
                let hidden = hidden.squeeze(1).expect("squeeze");
                if model.greedy_tokens(&hidden).expect("screen").is_none() {
                    row_stats(&model.logits(&hidden).expect("logits"), false).expect("argmax");
                }
            }
            start.elapsed()
        })
    });
}

/// `batch` inputs of `len` token ids, each input its own.
fn token_ids(batch: usize, len: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| (0..len).map(|i| (100 + b * 7 + i) as u32).collect())
        .collect()
}

/// `encode_tokens/{batch}x{len}` over `ids` (equally long inputs), in tokens per second.
fn bench_encode(group: &mut BenchmarkGroup<'_, WallTime>, model: &T5Model, ids: &[Vec<u32>]) {
    let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let len = inputs.first().map_or(0, |i| i.len());
    group.throughput(Throughput::Elements((inputs.len() * len) as u64));
    group.bench_with_input(
        BenchmarkId::new("encode_tokens", format!("{}x{len}", inputs.len())),
        &inputs,
        |b, inputs| b.iter(|| model.encode(inputs).expect("encode")),
    );
}

/// What a decode step is bound by: the machine's read bandwidth, and the bandwidth each f32
/// projection of mt0-small reaches on 1, 4 and 16 rows (its weight bytes over the time per
/// call; the 1-row figure is the one to hold against the read bandwidth).
fn bench_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory");
    group.sample_size(10);
    let buffer = vec![1f32; 128 << 20];
    group.throughput(Throughput::Bytes((buffer.len() * 4) as u64));
    group.bench_function("read_512MiB", |b| b.iter(|| read_all(&buffer)));
    let projections = [
        ("q", 384, 512),
        ("kv", 768, 512),
        ("o", 512, 384),
        ("wi", 2048, 512),
        ("wo", 512, 1024),
        ("lm_head", 250112, 512),
    ];
    for (name, out, input) in projections {
        let w = Tensor::randn(0f32, 0.05, (out, input), &Device::Cpu).expect("randn");
        let mut layer = Linear::new(w);
        layer.pack().expect("pack");
        group.throughput(Throughput::Bytes((out * input * 4) as u64));
        for rows in [1, 4, 16] {
            let x = Tensor::randn(0f32, 1.0, (rows, input), &Device::Cpu).expect("randn");
            group.bench_with_input(BenchmarkId::new(format!("f32_{name}"), rows), &x, |b, x| {
                b.iter(|| layer.forward(x).expect("forward"))
            });
        }
    }
    group.finish();
}

/// Sums `xs` across rayon's pool with enough independent accumulators that the loop runs at
/// the speed memory delivers (a STREAM-like read).
fn read_all(xs: &[f32]) -> f32 {
    use rayon::prelude::*;
    xs.par_chunks(1 << 16)
        .map(|chunk| {
            let mut acc = [0f32; 64];
            for block in chunk.chunks_exact(64) {
                acc.iter_mut().zip(block).for_each(|(a, x)| *a += x);
            }
            acc.iter().sum::<f32>()
        })
        .sum()
}

fn bench_model(c: &mut Criterion, quantization: Quantization) {
    let model = random_model(&SMALL, quantization);
    // Three single-token labels plus EOS, like negative / neutral / positive.
    let labels = LabelSet::from_targets(
        ["negative", "neutral", "positive"].map(String::from).into(),
        vec![vec![4, 1], vec![5, 1], vec![6, 1]],
    )
    .expect("labels");
    let mut group = c.benchmark_group(format!("{}-{}", SMALL.name, quantization.as_str()));
    group.sample_size(10);
    for (batch, len) in [(1, 32), (4, 36), (16, 40)] {
        let ids = token_ids(batch, len);
        bench_encode(&mut group, &model, &ids);
        let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("decode_step_tokens", format!("{batch}x{len}")),
            &inputs,
            |b, inputs| {
                // A cache already 16 tokens deep, as in the middle of a generation.
                b.iter_batched(
                    || started(&model, inputs, 16),
                    |(mut state, slots)| {
                        let next: Vec<(usize, Vec<u32>)> =
                            slots.iter().map(|&s| (s, vec![5])).collect();
                        let hidden = model.decode(&mut state, &next).expect("step");
                        model
                            .logits(&hidden.squeeze(1).expect("squeeze"))
                            .expect("logits")
                    },
                    criterion::BatchSize::PerIteration,
                )
            },
        );
        group.bench_with_input(
            BenchmarkId::new("score_3_labels", format!("{batch}x{len}")),
            &inputs,
            |b, inputs| b.iter(|| score(&model, inputs, &labels).expect("score")),
        );
    }
    group.finish();
    bench_greedy(c, &model, quantization);
}

/// A greedy decode step's token choice after the decoder: every logit (in f32 from the
/// model's weights, int8 or bf16 ones included) and its argmax,
/// against the int8 screen of `lm_head` with the few tokens it leaves computed in f32
/// (`model::greedy`; the same tokens). Where the screen does not pay (more than 8 rows without
/// AVX-512 VNNI or AMX), `greedy_tokens` declines and the step computes the logits.
fn bench_greedy(c: &mut Criterion, model: &T5Model, quantization: Quantization) {
    let mut group = c.benchmark_group(format!("{}-{}-greedy", SMALL.name, quantization.as_str()));
    group.sample_size(10);
    for rows in [1, 4, 8, 16, 32, 64] {
        let ids = token_ids(rows, 32);
        let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let (mut state, slots) = started(model, &inputs, 16);
        let next: Vec<(usize, Vec<u32>)> = slots.iter().map(|&s| (s, vec![5])).collect();
        let hidden = model
            .decode(&mut state, &next)
            .and_then(|h| h.squeeze(1))
            .expect("step");
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_function(BenchmarkId::new("logits_argmax", rows), |b| {
            b.iter(|| row_stats(&model.logits(&hidden).expect("logits"), false).expect("argmax"))
        });
        if model.greedy_tokens(&hidden).expect("screen").is_some() {
            group.bench_function(BenchmarkId::new("screened_argmax", rows), |b| {
                b.iter(|| model.greedy_tokens(&hidden).expect("screen"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    // As the server runs. SAFETY: before anything starts a thread.
    unsafe { finserve::cli::keep_candle_on_the_calling_thread() };
    benches();
    Criterion::default().configure_from_args().final_summary();
}
