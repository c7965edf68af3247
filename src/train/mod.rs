//! `finserve train`: LoRA fine-tuning of a T5-family model on labelled CSVs and entity-level JSON
//! Lines (each entity shown through a target template, written beside the adapter), with PEFT's recipe
//! (frozen base, LoRA on the targeted linear layers, teacher-forced cross-entropy of the label
//! words and EOS, AdamW with linear warm-up and decay) and PEFT's file format, so the adapter it
//! writes is served by finserve and loaded by `PeftModel.from_pretrained` alike.
//!
//! [`lora_t5`] is the differentiable model; [`peft`] writes the files. On a CPU each batch is
//! split into one piece per core whose gradients are computed on parallel threads and summed
//! ([`gradients`]). Each epoch's adapter is scored on `--eval-data` by merging it into the serving
//! model (exactly how `serve` would score it), and the best one is kept.

pub mod lora_t5;
pub mod peft;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::backprop::GradStore;
use candle_core::{D, DType, IndexOp, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::classification::Report;
use crate::engine::prompt::{Prompt, Template, TruncationDirection};
use crate::engine::sentiment::{LabelSet, score};
use crate::engine::targets::{self, TargetTemplate};
use crate::model::linear::SharedLayers;
use crate::model::lora::{AdapterConfig, merge_weight};
use crate::model::t5::{Config, T5Model};
use crate::model::weights::Weights;
use lora_t5::{Batch, Dropout, LoraPair, LoraT5};

/// What one training run does.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub lora: peft::LoraSettings,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Optimizer steps over which the learning rate rises linearly from 0.
    pub warmup_steps: usize,
    pub batch_size: usize,
    /// Gradients are scaled down to this global L2 norm (transformers' `max_grad_norm`); 0 = off.
    pub max_grad_norm: f64,
    pub seed: u64,
}

impl Recipe {
    /// PEFT's `LoraConfig` fields this recipe stands for (what targeting and scaling read).
    fn adapter_config(&self) -> anyhow::Result<AdapterConfig> {
        let l = &self.lora;
        let json = serde_json::json!({
            "peft_type": "LORA",
            "r": l.r,
            "lora_alpha": l.lora_alpha,
            "lora_dropout": l.lora_dropout,
            "target_modules": l.target_modules,
            "use_rslora": l.use_rslora,
        });
        Ok(serde_json::from_value(json)?)
    }

    /// transformers' `get_linear_schedule_with_warmup`: the factor of `lr` at `step`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = self.warmup_steps;
        let factor = if step < warm {
            step as f64 / warm.max(1) as f64
        } else {
            (total.saturating_sub(step)) as f64 / total.saturating_sub(warm).max(1) as f64
        };
        self.lr * factor.max(0.0)
    }
}

/// `target_modules` as given on the command line: several names are a list of suffixes; one
/// name with regex syntax (or `all-linear`) is PEFT's single-string form.
pub fn target_modules(names: &[String]) -> serde_json::Value {
    let regex = |s: &str| s.chars().any(|c| "\\.*+?()[]{}|^$".contains(c));
    match names {
        [one] if regex(one) || one == "all-linear" => serde_json::json!(one),
        many => {
            let mut sorted = many.to_vec();
            sorted.sort();
            sorted.dedup();
            serde_json::json!(sorted)
        }
    }
}

/// One training (or eval) example.
#[derive(Debug, Clone)]
pub struct Example {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// The gold label's index.
    pub label: usize,
    /// An entity row whose target template weighs in the whole text's reading (`text_weight`):
    /// the text as a sentence-level prompt. Such a row is learnt and scored through the pooled
    /// label distribution `serve` answers with, so the target's view learns to speak up where
    /// the text's reading is wrong for it.
    pub text: Option<Vec<u32>>,
}

/// Tokenized examples: the prompt of each text (cut from the right to `max_input_tokens`) and
/// its label index.
pub fn examples(
    rows: &[(String, usize)],
    tokenizer: &Tokenizer,
    template: &Template,
    max_input_tokens: usize,
) -> anyhow::Result<Vec<Example>> {
    rows.iter()
        .enumerate()
        .map(|(i, (text, label))| {
            let ids = fit(tokenizer, template, text, max_input_tokens)?.with_context(|| {
                format!(
                    "row {}: the prompt template alone is longer than --max-input-tokens",
                    i + 2
                )
            })?;
            Ok(Example {
                ids: ids.ids,
                label: *label,
                text: None,
            })
        })
        .collect()
}

/// `text` in `template`, cut from the right to `max_input_tokens` (`None`: the template alone
/// is longer).
fn fit(
    tokenizer: &Tokenizer,
    template: &Template,
    text: &str,
    max_input_tokens: usize,
) -> anyhow::Result<Option<crate::engine::prompt::Window>> {
    let prompt = Prompt::new(tokenizer, template, text)?;
    Ok(prompt.fit(max_input_tokens, Some(TruncationDirection::Right))?)
}

/// One example of a batch and how it is learnt.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    /// transformers' seq2seq loss: the cross-entropy of each of `target`'s tokens (EOS
    /// included), teacher forced.
    Tokens { input: &'a [u32], target: &'a [u32] },
    /// The cross-entropy of the label distribution `serve` gives a target whose template weighs
    /// in the text: over the labels, `(1-w)·log p(label | input) + w·log p(label | text)`,
    /// renormalised (see [`TargetTemplate::pool`]).
    Pooled {
        input: &'a [u32],
        text: &'a [u32],
        label: usize,
        text_weight: f64,
    },
}

/// The rows of one piece of a batch and the seed of its dropout masks.
type Piece<'a> = (&'a [Row<'a>], Option<u64>);

/// The mean loss of `rows` and its gradients, computed as up to `pieces` contiguous pieces of
/// the batch on as many threads and summed. The mean is per label token (a pooled row counts
/// its gold label's tokens), so a batch of `Tokens` rows has transformers' loss; each piece
/// divides its sum by the whole batch's count, so the pieces' sum is the whole batch's loss and
/// gradient. Each piece draws its dropout masks from its own generator, seeded from `rng` in
/// piece order, so a seed still fixes the result. `labels` are the label sets' token sequences
/// that pooled rows are scored over.
pub fn gradients(
    model: &LoraT5,
    rows: &[Row],
    labels: &[Vec<u32>],
    pieces: usize,
    mut rng: Option<&mut ChaCha8Rng>,
) -> anyhow::Result<(f32, GradStore)> {
    let label_tokens: usize = rows
        .iter()
        .map(|r| match r {
            Row::Tokens { target, .. } => target.len(),
            Row::Pooled { label, .. } => labels.get(*label).map_or(0, Vec::len),
        })
        .sum();
    let per = rows.len().div_ceil(pieces.max(1)).max(1);
    let work: Vec<Piece> = rows
        .chunks(per)
        .map(|r| (r, rng.as_deref_mut().map(Rng::next_u64)))
        .collect();
    let run = |(rows, seed): Piece| {
        let mut rng = seed.map(ChaCha8Rng::seed_from_u64);
        let summed = summed_loss(model, rows, labels, &mut Dropout { rng: rng.as_mut() })?;
        let loss = (summed * (1.0 / label_tokens.max(1) as f64))?;
        Ok::<_, anyhow::Error>((loss.to_scalar::<f32>()?, loss.backward()?))
    };
    let results: Vec<_> = if work.len() == 1 {
        work.into_iter().map(run).collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .into_iter()
                .map(|piece| s.spawn(move || run(piece)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    };
    let mut results = results.into_iter();
    let (mut loss, mut grads) = results.next().context("an empty batch")??;
    for piece in results {
        let (l, g) = piece?;
        loss += l;
        for v in model.vars() {
            let t = v.as_tensor();
            let sum = match (grads.remove(t), g.get(t)) {
                (Some(a), Some(b)) => (a + b)?,
                (a, b) => a
                    .or_else(|| b.cloned())
                    .context("a LoRA factor without a gradient")?,
            };
            grads.insert(t, sum);
        }
    }
    Ok((loss, grads))
}

/// The summed loss of `rows` (see [`Row`]), a scalar tensor.
fn summed_loss(
    model: &LoraT5,
    rows: &[Row],
    labels: &[Vec<u32>],
    drop: &mut Dropout,
) -> anyhow::Result<Tensor> {
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let (mut views, mut gold, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        match *row {
            Row::Tokens { input, target } => {
                inputs.push(input);
                targets.push(target);
            }
            Row::Pooled {
                input,
                text,
                label,
                text_weight,
            } => {
                views.extend([input, text]);
                gold.push(label as u32);
                weights.push(text_weight as f32);
            }
        }
    }
    let device = model.device();
    let mut total = Tensor::zeros((), DType::F32, device)?;
    if !inputs.is_empty() {
        let batch = Batch::new(&inputs, &targets, model.config(), device)?;
        total = (total - model.log_likelihoods(&batch, drop)?.sum_all()?)?;
    }
    if !gold.is_empty() {
        let n = gold.len();
        // (rows, view: target or text, label)
        let ll = model
            .target_log_likelihoods(&views, labels, drop)?
            .reshape((n, 2, labels.len()))?;
        let w = Tensor::from_vec(weights, (n, 1), device)?;
        let pooled = (ll.i((.., 0))?.broadcast_mul(&w.affine(-1.0, 1.0)?)?
            + ll.i((.., 1))?.broadcast_mul(&w)?)?;
        let logp = candle_nn::ops::log_softmax(&pooled, D::Minus1)?;
        let picked = logp.gather(&Tensor::from_vec(gold, (n, 1), device)?, 1)?;
        total = (total - picked.sum_all()?)?;
    }
    Ok(total)
}

/// One optimizer step on `grads` (clipped to `max_grad_norm` as torch's `clip_grad_norm_` does).
pub fn step(
    model: &LoraT5,
    opt: &mut AdamW,
    mut grads: GradStore,
    max_grad_norm: f64,
) -> anyhow::Result<()> {
    if max_grad_norm > 0.0 {
        let vars = model.vars();
        let mut squares = 0.0;
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                squares += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        let coef = max_grad_norm / (squares.sqrt() + 1e-6);
        if coef < 1.0 {
            for v in &vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    opt.step(&grads)?;
    Ok(())
}

/// How many pieces each training batch is split into on `device` (as given to `--device`). On a
/// CPU, one piece per core, each run with single-threaded candle ops: a small model's
/// elementwise ops are too short to split across cores (candle's pool spent about 60 % of a
/// training step waiting at its barrier), whole pieces of a batch are not. `cli::run` keeps
/// candle's elementwise ops on the calling thread (`keep_candle_on_the_calling_thread`); the products' thread count (rayon's) is read
/// from the environment, so this sets it, and must run before the process starts any other
/// thread.
pub fn parallel_pieces(device: &str) -> usize {
    if device != "cpu" {
        return 1;
    }
    let cores = candle_core::utils::get_num_threads();
    // SAFETY: `cli::run` calls this right after parsing the command line, before telemetry, the
    // runtime or candle start a thread, so nothing can read the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    cores
}

/// The batches of one epoch, as index lists: shuffled, then sorted by length within windows of
/// 50 batches so a batch pads little, then the batches shuffled.
fn epoch_batches(lengths: &[usize], batch_size: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(rng);
    let mut batches = Vec::new();
    for window in order.chunks_mut(batch_size * 50) {
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(rng);
    batches
}

/// The optimizer of a recipe over the model's LoRA factors.
pub fn optimizer(model: &LoraT5, recipe: &Recipe) -> anyhow::Result<AdamW> {
    Ok(AdamW::new(
        model.vars(),
        ParamsAdamW {
            lr: recipe.lr,
            weight_decay: recipe.weight_decay,
            ..ParamsAdamW::default()
        },
    )?)
}

/// `base` with `loras` merged in and built as the serving model.
pub fn merged_model(
    config: &Config,
    base: &Weights,
    loras: &[&LoraPair],
) -> anyhow::Result<T5Model> {
    let mut w = base.clone();
    for l in loras {
        let name = format!("{}.weight", l.module);
        let weight = w
            .get(&name)?
            .with_context(|| format!("the base has no `{name}`"))?;
        let merged = merge_weight(&weight, l.a.as_tensor(), l.b.as_tensor(), l.scale)?;
        w.replace(&name, merged);
    }
    Ok(T5Model::load(
        config.clone(),
        &mut w,
        &mut SharedLayers::default(),
    )?)
}

/// How a model does on the eval data.
pub struct Evaluation {
    /// Accuracy and macro-F1, scored as `serve` scores.
    pub report: Report,
    /// Perplexity of the gold labels' token sequences (EOS included), teacher-forced: the
    /// exponential of the mean per-token loss that training minimises, over the whole set.
    pub perplexity: f64,
}

/// How `model` does on `data`, each row scored as `serve` scores it: a row with its text
/// pooled with the text's scores by `pool`.
pub fn evaluate(
    model: &T5Model,
    labels: &LabelSet,
    data: &[Example],
    pool: Option<&TargetTemplate>,
) -> anyhow::Result<Evaluation> {
    let mut pairs = Vec::with_capacity(data.len());
    let (mut nll, mut tokens) = (0.0, 0usize);
    for chunk in data.chunks(32) {
        let inputs: Vec<&[u32]> = chunk.iter().map(|e| e.ids.as_slice()).collect();
        let texts: Vec<&[u32]> = chunk.iter().filter_map(|e| e.text.as_deref()).collect();
        let mut text_scores = match (texts.is_empty(), pool) {
            (false, Some(_)) => score(model, &texts, labels)?,
            _ => Vec::new(),
        }
        .into_iter();
        for (s, e) in score(model, &inputs, labels)?.into_iter().zip(chunk) {
            let s = match (&e.text, pool) {
                (Some(_), Some(shown)) => {
                    shown.pool(&s, &text_scores.next().context("a text without scores")?)
                }
                _ => s,
            };
            let best = (0..s.probs.len())
                .max_by(|&a, &b| s.probs[a].total_cmp(&s.probs[b]))
                .context("no label scores")?;
            pairs.push((e.label, best));
            nll -= s.log_probs[e.label];
            tokens += labels.targets[e.label].len();
        }
    }
    Ok(Evaluation {
        report: Report::new(labels.names.clone(), &pairs),
        perplexity: (nll / tokens.max(1) as f64).exp(),
    })
}

/// Sets the returned flag on Ctrl-C, so training stops after the running step and saves.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                set.store(true, Ordering::SeqCst);
            }
        });
    });
    flag
}

/// What a run trains on and where it writes.
pub struct Job {
    pub config: Config,
    pub base: Weights,
    pub labels: LabelSet,
    pub train: Vec<Example>,
    pub eval: Option<Vec<Example>>,
    pub out: PathBuf,
    /// Written beside the adapter when entity rows were trained on.
    pub target_template: Option<TargetTemplate>,
    /// Pieces each batch is split into, trained in parallel (see [`parallel_pieces`]).
    pub pieces: usize,
}

/// Trains, evaluates each epoch and keeps the best adapter (the last one without eval data) in
/// `job.out`.
pub fn run(job: Job, recipe: &Recipe) -> anyhow::Result<()> {
    if recipe.batch_size == 0 || recipe.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(recipe.seed);
    let adapter = recipe.adapter_config()?;
    let mut frozen = job.base.clone();
    let model = LoraT5::new(job.config.clone(), &mut frozen, &adapter, &mut rng)?;
    let mut opt = optimizer(&model, recipe)?;
    let trainable: usize = model.vars().iter().map(|v| v.elem_count()).sum();
    tracing::info!(
        modules = model.loras().len(),
        trainable_parameters = trainable,
        examples = job.train.len(),
        "training LoRA"
    );
    let steps_per_epoch = job.train.len().div_ceil(recipe.batch_size);
    let total = steps_per_epoch * recipe.epochs;
    let interrupted = interrupt_flag();
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let targets = &job.labels.targets;
    let mut best: Option<(f64, f64)> = None;
    let mut done = 0;
    let save = |why: &str| -> anyhow::Result<()> {
        peft::save(&job.out, &recipe.lora, &model.loras())?;
        if let Some(t) = &job.target_template {
            let path = job.out.join(targets::FILE_NAME);
            std::fs::write(&path, serde_json::to_string_pretty(t)? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        tracing::info!(out = %job.out.display(), why, "adapter saved");
        Ok(())
    };
    let lengths: Vec<usize> = job.train.iter().map(|e| e.ids.len()).collect();
    let text_weight = job.target_template.as_ref().and_then(|t| t.text_weight);
    'epochs: for epoch in 1..=recipe.epochs {
        let (mut loss_sum, mut tokens, start) = (0.0, 0usize, Instant::now());
        for (i, chunk) in epoch_batches(&lengths, recipe.batch_size, &mut rng)
            .iter()
            .enumerate()
        {
            let rows: Vec<Row> = chunk
                .iter()
                .map(|&k| {
                    let e = &job.train[k];
                    match (&e.text, text_weight) {
                        (Some(text), Some(text_weight)) => Row::Pooled {
                            input: &e.ids,
                            text,
                            label: e.label,
                            text_weight,
                        },
                        _ => Row::Tokens {
                            input: &e.ids,
                            target: &targets[e.label],
                        },
                    }
                })
                .collect();
            opt.set_learning_rate(recipe.lr_at(done, total));
            let (loss, grads) = gradients(&model, &rows, targets, job.pieces, Some(&mut rng))?;
            step(&model, &mut opt, grads, recipe.max_grad_norm)?;
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} at epoch {epoch}, step {}; lower --lr",
                    i + 1
                );
            }
            done += 1;
            loss_sum += f64::from(loss);
            tokens += rows
                .iter()
                .map(|r| match r {
                    Row::Tokens { input, target } => input.len() + target.len(),
                    Row::Pooled { input, text, .. } => input.len() + text.len(),
                })
                .sum::<usize>();
            bar.inc(1);
            bar.set_message(format!(
                "epoch {epoch}/{}  loss {:.4}  {:.0} tokens/s",
                recipe.epochs,
                loss_sum / (i + 1) as f64,
                tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ));
            if interrupted.load(Ordering::SeqCst) {
                bar.abandon();
                if best.is_none() {
                    save("interrupted: the state after the last completed step")?;
                } else {
                    tracing::info!(out = %job.out.display(), "interrupted: keeping the best epoch's adapter");
                }
                break 'epochs;
            }
        }
        let mean_loss = loss_sum / steps_per_epoch as f64;
        let tokens_per_second = tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let Some(eval) = &job.eval else {
            tracing::info!(epoch, loss = mean_loss, tokens_per_second, "epoch done");
            save("last epoch")?;
            continue;
        };
        let merged = merged_model(&job.config, &job.base, &model.loras())?;
        let evaluation = evaluate(&merged, &job.labels, eval, job.target_template.as_ref())?;
        let (f1, acc) = (evaluation.report.macro_f1(), evaluation.report.accuracy());
        tracing::info!(
            epoch,
            loss = mean_loss,
            eval_accuracy = acc,
            eval_macro_f1 = f1,
            eval_perplexity = evaluation.perplexity,
            "epoch done"
        );
        if best.is_none_or(|b| (f1, acc) > b) {
            best = Some((f1, acc));
            save("best eval macro-F1 so far")?;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// A training file and how many times an epoch goes through it (`FILE` or `FILE:N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    pub path: PathBuf,
    pub repeat: usize,
}

impl std::str::FromStr for DataFile {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some((path, n)) = s.rsplit_once(':')
            && let Ok(repeat) = n.parse::<usize>()
        {
            if repeat == 0 {
                return Err(format!("`{s}`: a file is repeated at least once"));
            }
            return Ok(Self {
                path: path.into(),
                repeat,
            });
        }
        Ok(Self {
            path: s.into(),
            repeat: 1,
        })
    }
}

/// How a training file's rows become prompts.
pub struct Prompts<'a> {
    /// The CSV columns of the text and the label.
    pub columns: (&'a str, &'a str),
    pub labels: &'a [String],
    pub tokenizer: &'a Tokenizer,
    /// Of sentence-level rows.
    pub template: &'a Template,
    /// Of entity rows.
    pub target_template: &'a TargetTemplate,
    pub max_input_tokens: usize,
}

/// The examples of a labelled CSV file, or of an entity-level JSON Lines file (one per entity).
pub fn read(path: &Path, p: &Prompts) -> anyhow::Result<Vec<Example>> {
    if crate::entity_data::is_jsonl(path) {
        return entity_examples(path, p);
    }
    let rows = crate::eval::read_rows(path, p.columns.0, p.columns.1, p.labels)?;
    examples(&rows, p.tokenizer, p.template, p.max_input_tokens)
        .with_context(|| format!("{}", path.display()))
}

/// Each entity of a JSON Lines file in the target template, cut from the right to
/// `max_input_tokens`; an entity whose mention the cut removes is left out (and counted). When
/// the template weighs in the text, each carries its text as a sentence-level prompt.
fn entity_examples(path: &Path, p: &Prompts) -> anyhow::Result<Vec<Example>> {
    let too_long = || {
        format!(
            "{}: a template alone is longer than --max-input-tokens",
            path.display()
        )
    };
    let mut out = Vec::new();
    let mut cut_off = 0;
    for t in crate::entity_data::read(path, p.labels)? {
        let text = if p.target_template.weighs_text() {
            let window = fit(p.tokenizer, p.template, &t.text, p.max_input_tokens)?;
            Some(window.with_context(too_long)?.ids)
        } else {
            None
        };
        for (target, label) in &t.entities {
            let shown = p.target_template;
            let (marked, mentions) = shown.mark(&t.text, &target.byte_spans(&t.text));
            let window = fit(
                p.tokenizer,
                &shown.prompt(&target.name),
                &marked,
                p.max_input_tokens,
            )?
            .with_context(too_long)?;
            if mentions
                .iter()
                .any(|m| m.start < window.span.1 && window.span.0 < m.end)
            {
                out.push(Example {
                    ids: window.ids,
                    label: *label,
                    text: text.clone(),
                });
            } else {
                cut_off += 1;
            }
        }
    }
    if cut_off > 0 {
        tracing::warn!(
            file = %path.display(),
            entities = cut_off,
            "entities left out: their mention lies beyond --max-input-tokens"
        );
    }
    Ok(out)
}
