//! `finserve eval`: scores a labelled CSV through the same request-level call as the server
//! ([`Engine::score`], so a row over `--max-input-tokens` is refused, truncated or chunked exactly
//! as a request would be) and reports accuracy, macro-F1, per-class precision/recall, the
//! confusion matrix, throughput, the rows refused and why, and how well the scores are calibrated
//! (ECE, Brier, NLL), before and after the temperature that applies (the served calibration, or
//! the one `--calibrate` fits and writes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use futures::StreamExt;

use crate::calibration::{Calibration, quality};
use crate::classification::Report;
use crate::engine::infer::{LongInput, ScoreQuery};
use crate::engine::validation::GenerateOptions;
use crate::engine::{Engine, EngineConfig};
use crate::served::ModelJob;

/// The `(text, label index)` rows of a labelled CSV file with a header row.
pub fn read_rows(
    data: &Path,
    text_column: &str,
    label_column: &str,
    labels: &[String],
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut reader =
        csv::Reader::from_path(data).with_context(|| format!("cannot open {}", data.display()))?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers.iter().position(|h| h == name).with_context(|| {
            format!(
                "{} has no column `{name}` (columns: {headers:?})",
                data.display()
            )
        })
    };
    let (text_col, label_col) = (column(text_column)?, column(label_column)?);
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{}: row {}", data.display(), i + 2))?;
        let short = || format!("{}: row {} has too few columns", data.display(), i + 2);
        let text = record.get(text_col).with_context(short)?.to_string();
        let gold = record.get(label_col).with_context(short)?;
        let Some(idx) = labels.iter().position(|l| l == gold) else {
            bail!(
                "{}: row {} has label `{gold}`, not one of {labels:?}",
                data.display(),
                i + 2
            );
        };
        rows.push((text, idx));
    }
    if rows.is_empty() {
        bail!("{} has no rows", data.display());
    }
    Ok(rows)
}

/// What an eval run measures.
pub enum Task {
    /// Label scores against `label_column`.
    Sentiment {
        /// What happens to rows over `max_input_tokens`, as a request's `truncate` /
        /// `long_input`.
        long_input: LongInput,
        label_column: String,
        /// Where a temperature fitted on this data is written, if anywhere.
        calibration_out: Option<PathBuf>,
    },
    /// Generations with `options` against the references in `target_column`.
    Generate {
        options: GenerateOptions,
        target_column: String,
    },
}

/// One `finserve eval` run, as the command line resolved it.
pub struct EvalJob {
    pub model: ModelJob,
    /// The batching the server would use; the queue is sized here to hold the whole file.
    pub engine: EngineConfig,
    pub task: Task,
    pub data: PathBuf,
    pub text_column: String,
    /// Where one JSON line per row goes, if anywhere.
    pub out: Option<PathBuf>,
}

/// What became of one row: its scores (probabilities and log-likelihoods), or the refusal.
type RowResult = Result<(Vec<f64>, Vec<f64>), String>;

/// Scores every row through `engine`, each row its own request (so a refused row fails alone);
/// a few requests are in flight at once so that the engine fills its batches.
fn score_rows(
    engine: &Engine,
    rows: &[(String, usize)],
    long_input: LongInput,
) -> anyhow::Result<Vec<RowResult>> {
    let bar = indicatif::ProgressBar::new(rows.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} sentences ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let in_flight = engine.config().max_batch_size * 2;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let results = rt.block_on(
        futures::stream::iter(rows)
            .map(|(text, _)| {
                let query = ScoreQuery {
                    texts: vec![text.clone()],
                    long_input,
                    ..Default::default()
                };
                let bar = bar.clone();
                async move {
                    let scored = engine.score(query, None).await;
                    bar.inc(1);
                    scored
                }
            })
            .buffered(in_flight)
            .collect::<Vec<_>>(),
    );
    bar.finish_and_clear();
    results
        .into_iter()
        .map(|r| match r {
            Ok(mut scored) => {
                let text = scored
                    .texts
                    .pop()
                    .context("the engine returned no scores")?;
                Ok(Ok((text.probs, text.log_probs)))
            }
            Err(e @ crate::error::Error::Invalid { .. }) => Ok(Err(refusal(&e))),
            Err(e) => Err(e.into()),
        })
        .collect()
}

/// Why a row was refused, in eval's terms: the limit's flag, and the flags that would score it.
fn refusal(e: &crate::error::Error) -> String {
    use crate::error::{Error, Limit};
    match e {
        Error::Invalid {
            limit: Some((Limit::MaxInputTokens, max)),
            ..
        } => format!(
            "{e} (--max-input-tokens {max}; --truncate or --long-input chunk would score it)"
        ),
        Error::Invalid {
            limit: Some((Limit::MaxChunksPerInput, max)),
            ..
        } => format!("{e} (--max-chunks-per-input {max})"),
        other => other.to_string(),
    }
}

pub fn run(job: EvalJob) -> anyhow::Result<()> {
    let EvalJob {
        model,
        engine: config,
        task,
        data,
        text_column,
        out,
    } = job;
    let (long_input, label_column, calibration_out) = match task {
        Task::Sentiment {
            long_input,
            label_column,
            calibration_out,
        } => (long_input, label_column, calibration_out),
        Task::Generate {
            options,
            target_column,
        } => {
            let columns = crate::data_file::Columns {
                text: &text_column,
                id: None,
                reference: Some(&target_column),
                targets: None,
            };
            return crate::generation_eval::run(
                model,
                config,
                &data,
                columns,
                options,
                out.as_deref(),
            );
        }
    };
    let names = model.labels.clone();
    if crate::entity_data::is_jsonl(&data) {
        if calibration_out.is_some() {
            bail!("--calibrate fits sentence-level scores: give it a CSV, not entity JSON Lines");
        }
        if long_input == LongInput::Sentences {
            bail!("entity JSON Lines are scored per target: --long-input sentences does not apply");
        }
        let texts = crate::entity_data::read(&data, &names)?;
        let name = model.spec.model.clone();
        let (served, tokenizer) = model.load(false)?.served(name);
        let digest = served.first().map(|s| s.digest.clone()).unwrap_or_default();
        let engine = Engine::start(
            served,
            Arc::new(tokenizer),
            EngineConfig {
                queue_capacity: texts.iter().map(|t| t.entities.len() + 1).sum(),
                ..config
            },
        )?;
        println!(
            "entity-level data {}\nmodel digest: {digest}",
            data.display()
        );
        return crate::entity_eval::run(&engine, &texts, &names, long_input, out.as_deref());
    }
    let rows = read_rows(&data, &text_column, &label_column, &names)?;
    let name = model.spec.model.clone();
    let prompt_template = model.prompt_template.clone();
    let loaded = model.load(false)?;
    let calibration = loaded.labels.first().and_then(|(_, c)| c.clone());
    let (served, tokenizer) = loaded.served(name);
    let digest = served.first().map(|s| s.digest.clone()).unwrap_or_default();
    let engine = Engine::start(
        served,
        Arc::new(tokenizer),
        EngineConfig {
            queue_capacity: rows.len(),
            ..config
        },
    )?;
    if long_input == LongInput::Chunk {
        crate::served::check_chunk_overlap(&engine)?;
    }
    let start = Instant::now();
    let results = score_rows(&engine, &rows, long_input)?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut out = match &out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut pairs = Vec::with_capacity(rows.len());
    let mut log_likelihoods = Vec::with_capacity(rows.len());
    let mut refused = Vec::new();
    for (i, ((text, gold), result)) in rows.iter().zip(results).enumerate() {
        let line = match result {
            Ok((probs, log_probs)) => {
                let pred = (0..probs.len())
                    .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
                    .unwrap_or(0);
                pairs.push((*gold, pred));
                log_likelihoods.push(log_probs);
                serde_json::json!({
                    "text": text,
                    "label": names[*gold],
                    "prediction": names[pred],
                    "scores": names.iter().zip(&probs).map(|(n, p)| (n.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
                })
            }
            Err(why) => {
                // Row numbers as a spreadsheet shows them: the header is row 1.
                refused.push((i + 2, why.clone()));
                serde_json::json!({"text": text, "label": names[*gold], "error": why})
            }
        };
        if let Some(w) = out.as_mut() {
            writeln!(w, "{line}")?;
        }
    }
    let report = Report::new(names.clone(), &pairs);
    println!(
        "{} sentences from {} in {elapsed:.1} s ({:.1} sentences/s), {} scored\nmodel digest: {digest}\n",
        rows.len(),
        data.display(),
        rows.len() as f64 / elapsed,
        pairs.len()
    );
    match long_input {
        LongInput::Refuse => println!(
            "rows over max_input_tokens: refused, as a request without `truncate` \
             (--truncate or --long-input chunk to score them)"
        ),
        LongInput::Truncate(direction) => println!(
            "rows over max_input_tokens: truncated from the {} (--truncate)",
            match direction {
                crate::engine::prompt::TruncationDirection::Right => "right (start kept)",
                crate::engine::prompt::TruncationDirection::Left => "left (end kept)",
            }
        ),
        LongInput::Chunk => println!(
            "rows over max_input_tokens: scored in windows, token-weighted mean (--long-input chunk)"
        ),
        LongInput::Sentences => println!(
            "rows scored sentence by sentence, token-weighted mean (--long-input sentences)"
        ),
    }
    if !refused.is_empty() {
        println!(
            "{} rows refused and left out of the scores below:",
            refused.len()
        );
        for (row, why) in &refused {
            println!("  row {row}: {why}");
        }
    }
    if pairs.is_empty() {
        bail!("every row was refused: nothing to report");
    }
    println!();
    print!("{}", report.render());
    let gold: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    let fitted = calibration_out.as_ref().map(|_| {
        Calibration::fit(
            &log_likelihoods,
            &gold,
            names.clone(),
            prompt_template,
            data.display().to_string(),
        )
    });
    let temperature = match (&fitted, &calibration) {
        (Some(c), _) => Some((c.temperature, "fitted here")),
        (None, Some((_, c))) => Some((c.temperature, "served")),
        (None, None) => None,
    };
    let show = |what: &str, q: &crate::calibration::Quality| {
        println!(
            "{what:<32} ECE {:.4}  Brier {:.4}  NLL {:.4}",
            q.ece, q.brier, q.nll
        );
    };
    println!("\ncalibration (ECE over 15 bins)");
    show(
        "uncalibrated (T = 1)",
        &quality(&log_likelihoods, &gold, 1.0),
    );
    if let Some((t, which)) = temperature {
        show(
            &format!("T = {t:.4} ({which})"),
            &quality(&log_likelihoods, &gold, t),
        );
    }
    if let (Some(c), Some(path)) = (fitted, calibration_out) {
        c.save(&path)?;
        println!(
            "\nwrote {} (temperature {:.4})",
            path.display(),
            c.temperature
        );
    }
    Ok(())
}
