//! `finserve eval --task generate`: generates from each row's text and measures the outputs
//! against the row's reference as LoRA recipes report them: the references' teacher-forced loss
//! and perplexity, exact match, ROUGE-L F1 and corpus BLEU ([`crate::generation_metrics`]).
//! Every row is one request through the engine (generation and likelihood), so a row the server
//! would refuse is refused here, reported, and left out of the measures.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::json;

use crate::data_file::{self, Columns};
use crate::engine::likelihood::{Likelihood, LikelihoodQuery};
use crate::engine::validation::GenerateOptions;
use crate::engine::{Engine, EngineConfig, GenerateOutput};
use crate::error::{Error, Field, Limit};
use crate::generation_metrics::{corpus_bleu, rouge_l};
use crate::served::ModelJob;

/// One evaluated row.
pub struct Evaluated {
    pub generated: String,
    pub reference: String,
    pub likelihood: Likelihood,
    /// ROUGE-L F1 of `generated` against `reference`.
    pub rouge_l: f64,
}

/// The measures over the evaluated rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Mean negative log-likelihood per reference token (EOS included), in nats.
    pub loss: f64,
    pub perplexity: f64,
    pub reference_tokens: usize,
    /// Share of rows whose output equals the reference, surrounding whitespace ignored.
    pub exact_match: f64,
    /// Mean over rows.
    pub rouge_l: f64,
    /// Corpus BLEU, 0 to 100.
    pub bleu: f64,
}

impl Summary {
    pub fn new(rows: &[Evaluated]) -> Self {
        let n = rows.len().max(1) as f64;
        let tokens: usize = rows.iter().map(|r| r.likelihood.tokens).sum();
        let nll: f64 = rows.iter().map(|r| -r.likelihood.log_prob).sum();
        let loss = nll / tokens.max(1) as f64;
        let generated: Vec<&str> = rows.iter().map(|r| r.generated.as_str()).collect();
        let references: Vec<&str> = rows.iter().map(|r| r.reference.as_str()).collect();
        Self {
            loss,
            perplexity: loss.exp(),
            reference_tokens: tokens,
            exact_match: rows
                .iter()
                .filter(|r| r.generated.trim() == r.reference.trim())
                .count() as f64
                / n,
            rouge_l: rows.iter().map(|r| r.rouge_l).sum::<f64>() / n,
            bleu: corpus_bleu(&generated, &references),
        }
    }
}

/// A row's generation and its reference's likelihood, or why the row was refused.
type Outcome = Result<(GenerateOutput, Likelihood), String>;

async fn evaluate(
    engine: &Engine,
    options: &GenerateOptions,
    index: usize,
    text: String,
    reference: String,
) -> anyhow::Result<Outcome> {
    let generation = crate::predict::row_query(text.clone(), options, index);
    let likelihood = LikelihoodQuery {
        text,
        reference,
        ..Default::default()
    };
    let generated = async { engine.generate_text(generation).await?.collect(None).await };
    match futures::future::join(generated, engine.likelihood(likelihood)).await {
        (Ok(out), Ok(l)) => Ok(Ok((out, l))),
        (Err(e @ Error::Invalid { .. }), _) | (_, Err(e @ Error::Invalid { .. })) => {
            Ok(Err(refusal(&e)))
        }
        (Err(e), _) | (_, Err(e)) => Err(e.into()),
    }
}

/// Why a row was refused, naming the row's part at fault and the flag that would let it through.
fn refusal(e: &Error) -> String {
    match e {
        Error::Invalid {
            field: Field::Inputs,
            limit: Some((Limit::MaxInputTokens, max)),
            ..
        } => format!("text: {e} (--max-input-tokens {max})"),
        Error::Invalid {
            field: Field::Reference,
            limit: Some((Limit::MaxNewTokens, max)),
            ..
        } => format!("reference: {e} (at most {max}, or --max-new-tokens)"),
        Error::Invalid {
            field: Field::Inputs,
            ..
        } => format!("text: {e}"),
        Error::Invalid {
            field: Field::Reference,
            ..
        } => format!("reference: {e}"),
        other => other.to_string(),
    }
}

pub fn run(
    model: ModelJob,
    config: EngineConfig,
    data: &Path,
    columns: Columns<'_>,
    options: GenerateOptions,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let rows: Vec<data_file::Row> =
        data_file::read(data, columns)?.collect::<anyhow::Result<_>>()?;
    if rows.is_empty() {
        bail!("{} has no rows", data.display());
    }
    let name = model.spec.model.clone();
    let (served, tokenizer) = model.load(false)?.served(name);
    let digest = served.first().map(|s| s.digest.clone()).unwrap_or_default();
    let in_flight = config.max_batch_size * 2;
    let engine = Engine::start(
        served,
        Arc::new(tokenizer),
        EngineConfig {
            // Each row queues a generation and a likelihood.
            queue_capacity: 2 * in_flight,
            ..config
        },
    )?;
    let bar = indicatif::ProgressBar::new(rows.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let start = Instant::now();
    let outcomes: Vec<anyhow::Result<Outcome>> = rt.block_on(
        futures::stream::iter(&rows)
            .map(|row| {
                let (engine, options, bar) = (&engine, &options, bar.clone());
                async move {
                    let outcome = match (&row.text, &row.reference) {
                        (Ok(text), Some(Ok(reference))) => {
                            evaluate(engine, options, row.index, text.clone(), reference.clone())
                                .await
                        }
                        (Err(why), _) | (_, Some(Err(why))) => Ok(Err(why.clone())),
                        (_, None) => Ok(Err("no reference column was read".into())),
                    };
                    bar.inc(1);
                    outcome
                }
            })
            .buffered(in_flight)
            .collect(),
    );
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let mut writer = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut evaluated = Vec::new();
    let mut refused = Vec::new();
    let mut generated_tokens = 0usize;
    for (row, outcome) in rows.iter().zip(outcomes) {
        let reference = row.reference.clone().and_then(Result::ok);
        let text = row.text.clone().ok();
        let line = match outcome? {
            Ok((generation, likelihood)) => {
                let reference = reference.unwrap_or_default();
                let rouge = rouge_l(&generation.generated_text, &reference);
                generated_tokens += generation.tokens.len();
                let line = json!({
                    "row": row.index,
                    "text": text,
                    "reference": reference,
                    "generated_text": generation.generated_text,
                    "finish_reason": generation.finish_reason,
                    "seed": generation.seed,
                    "reference_log_prob": likelihood.log_prob,
                    "reference_tokens": likelihood.tokens,
                    "exact_match": generation.generated_text.trim() == reference.trim(),
                    "rouge_l": rouge,
                });
                evaluated.push(Evaluated {
                    generated: generation.generated_text,
                    reference,
                    likelihood,
                    rouge_l: rouge,
                });
                line
            }
            Err(why) => {
                refused.push((row.index, why.clone()));
                json!({"row": row.index, "text": text, "reference": reference, "error": why})
            }
        };
        if let Some(w) = writer.as_mut() {
            writeln!(w, "{line}")?;
        }
    }
    if let Some(mut w) = writer {
        w.flush()?;
    }
    println!(
        "{} rows from {} in {elapsed:.1} s ({:.1} rows/s, {:.1} generated tokens/s), {} evaluated\nmodel digest: {digest}\ndecoding: {}",
        rows.len(),
        data.display(),
        rows.len() as f64 / elapsed,
        generated_tokens as f64 / elapsed,
        evaluated.len(),
        decoding(&options),
    );
    if !refused.is_empty() {
        println!(
            "{} rows refused and left out of the measures below:",
            refused.len()
        );
        for (row, why) in &refused {
            println!("  row {row}: {why}");
        }
    }
    if evaluated.is_empty() {
        bail!("every row was refused: nothing to report");
    }
    let s = Summary::new(&evaluated);
    println!(
        "\nteacher-forced loss  {:.4} nats per reference token ({} tokens, EOS included)\n\
         perplexity           {:.4}\n\
         exact match          {:.4} (output equal to the reference, surrounding whitespace ignored)\n\
         ROUGE-L F1           {:.4} (mean over rows, as rouge-score: ASCII letters and digits only)\n\
         BLEU                 {:.2} (corpus, as sacrebleu's defaults: 13a tokens, exp smoothing)",
        s.loss, s.reference_tokens, s.perplexity, s.exact_match, s.rouge_l, s.bleu
    );
    Ok(())
}

/// The decoding options given, for the report.
fn decoding(o: &GenerateOptions) -> String {
    let given: Vec<String> = [
        o.max_new_tokens.map(|v| format!("max_new_tokens {v}")),
        (o.do_sample == Some(true)).then(|| "do_sample".to_string()),
        o.temperature.map(|v| format!("temperature {v}")),
        o.top_k.map(|v| format!("top_k {v}")),
        o.top_p.map(|v| format!("top_p {v}")),
        o.repetition_penalty
            .map(|v| format!("repetition_penalty {v}")),
        o.seed.map(|v| format!("seed {v} (row I: seed + I)")),
        (!o.stop.is_empty()).then(|| format!("stop {:?}", o.stop)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.is_empty() {
        "a request's defaults (greedy)".into()
    } else {
        given.join(", ")
    }
}
