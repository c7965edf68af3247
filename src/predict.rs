//! `finserve predict`: scores a file of texts (CSV with a header row, or JSON Lines) into a JSON
//! Lines file, or generates from each (`--task generate`), through the same engine, batching and
//! validation as the server. Each output line
//! is one complete, flushed record, so a run killed at any point resumes (`--resume`) from what
//! is on disk with no row written twice; `--shard I/N` takes the rows whose index is I modulo N,
//! so N jobs over one file write disjoint outputs whose union is the whole file. A row that is
//! readable but cannot be scored (no text, a blank text, too long) goes to the errors file with
//! the reason; a file that cannot be read or parsed stops the run naming the file and row.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::data_file::{self, Columns};
use crate::engine::infer::{GenerateQuery, LongInput, ScoreQuery, Scored, TextScores};
use crate::engine::sentiment::LabelScores;
use crate::engine::targets::Target;
use crate::engine::validation::GenerateOptions;
use crate::engine::{Engine, EngineConfig, GenerateOutput};
use crate::error::Error;
use crate::parquet_output::{self, PartWriter};
use crate::served::ModelJob;

/// `--shard I/N`: this job's part of the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not I/N (e.g. 0/4)"))?;
        let index: usize = i.parse().map_err(|_| format!("`{i}` is not a row index"))?;
        let count: usize = n
            .parse()
            .map_err(|_| format!("`{n}` is not a shard count"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: I must be less than N (and N at least 1)"
            ));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    fn takes(self, row: usize) -> bool {
        row % self.count == self.index
    }
}

/// What is done with each row.
#[derive(Debug, Clone)]
pub enum Task {
    /// Label scores, with over-long rows handled as this says.
    Sentiment(LongInput),
    /// A generation with these options; a seed among them is the first row's, and row `i`'s
    /// is that plus `i`, so a sampled run is reproducible row by row, however it is sharded or
    /// resumed.
    Generate(GenerateOptions),
}

/// One `finserve predict` run, as the command line resolved it.
pub struct PredictJob {
    pub model: ModelJob,
    pub engine: EngineConfig,
    pub task: Task,
    pub data: PathBuf,
    pub text_column: String,
    /// Entity-level targets per row (sentiment only).
    pub targets_column: Option<String>,
    pub id_column: Option<String>,
    /// JSON Lines, or (`.parquet`) a directory of Parquet part files of `part_rows` rows.
    pub out: PathBuf,
    pub part_rows: usize,
    pub errors: PathBuf,
    pub resume: bool,
    pub shard: Option<Shard>,
}

/// The rows a previous run finished (written to `out` or to `errors`), after cutting a record
/// that a kill left half written off the end of each file.
fn finished_jsonl_rows(paths: &[&Path]) -> anyhow::Result<BTreeSet<usize>> {
    let mut done = BTreeSet::new();
    for path in paths {
        let Ok(mut file) = OpenOptions::new().read(true).write(true).open(path) else {
            continue;
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64)
                .with_context(|| format!("cannot repair {}", path.display()))?;
            file.seek(std::io::SeekFrom::End(0))?;
        }
        for (n, line) in text[..complete].lines().enumerate() {
            let record: Value = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}: line {} is not a record of finserve predict",
                    path.display(),
                    n + 1
                )
            })?;
            let row = record["row"]
                .as_u64()
                .with_context(|| format!("{}: line {} has no `row`", path.display(), n + 1))?;
            done.insert(row as usize);
        }
    }
    Ok(done)
}

fn open_output(path: &Path, resume: bool) -> anyhow::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true);
    if resume {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    options
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))
}

/// Where records go: JSON Lines, or Parquet parts.
enum Output {
    Jsonl(File),
    Parquet(PartWriter),
}

fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "parquet")
}

impl Output {
    fn write(&mut self, record: Value, path: &Path) -> anyhow::Result<()> {
        match self {
            Self::Jsonl(file) => write_record(file, &record, path),
            Self::Parquet(parts) => parts.write(record),
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Self::Jsonl(_) => Ok(()),
            Self::Parquet(mut parts) => parts.flush(),
        }
    }
}

/// Appends `record` as one line in one write, so a kill leaves at most that line cut short.
fn write_record(file: &mut File, record: &Value, path: &Path) -> anyhow::Result<()> {
    let line = format!("{record}\n");
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// One row's outcome: its record, or why it was refused.
type Outcome = Result<Value, String>;

/// The labels and scores of `scores`, best first.
fn ranked(names: &[String], scores: &LabelScores) -> Value {
    let mut ranked: Vec<(&String, f64)> = names.iter().zip(scores.probs.iter().copied()).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
        .into_iter()
        .map(|(label, score)| json!({"label": label, "score": score}))
        .collect()
}

/// A scored row's record: its scores, each sentence's in `sentences` mode, and each target's.
fn scores_record(scored: &Scored, text: &TextScores) -> Value {
    let names = &scored.labels.names;
    let mut record = json!({
        "scores": ranked(names, &LabelScores {
            probs: text.probs.clone(),
            log_probs: text.log_probs.clone(),
        }),
        "digest": scored.digest,
    });
    if !text.sentences.is_empty() {
        record["sentences"] = text
            .sentences
            .iter()
            .map(|s| json!({"span": [s.span.0, s.span.1], "scores": ranked(names, &s.scores)}))
            .collect();
    }
    if !text.targets.is_empty() {
        record["targets"] = text
            .targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.name,
                    "spans": t.spans.iter().map(|&(s, e)| [s, e]).collect::<Vec<_>>(),
                    "scores": ranked(names, &t.scores),
                })
            })
            .collect();
    }
    record
}

/// A generated row's record.
fn generation_record(out: &GenerateOutput, digest: &str) -> Value {
    json!({
        "generated_text": out.generated_text,
        "finish_reason": out.finish_reason,
        "generated_tokens": out.tokens.len(),
        "seed": out.seed,
        "digest": digest,
    })
}

/// The generation of row `index` from `text`: `options`, with the row's seed when the first
/// row's is given.
pub fn row_query(text: String, options: &GenerateOptions, index: usize) -> GenerateQuery {
    // Kept within what a request may give (0 to i64::MAX).
    let seed = options
        .seed
        .map(|s| ((s as u64).wrapping_add(index as u64) & i64::MAX as u64) as i64);
    GenerateQuery {
        text,
        options: GenerateOptions {
            seed,
            ..options.clone()
        },
        ..Default::default()
    }
}

/// Runs `task` on one text (for `targets`, with the text's scores).
async fn process(
    engine: &Engine,
    task: &Task,
    index: usize,
    text: String,
    targets: Option<Vec<Target>>,
) -> anyhow::Result<Outcome> {
    let result = match task {
        Task::Sentiment(long_input) => {
            let query = ScoreQuery {
                texts: vec![text],
                long_input: *long_input,
                text_scores_with_targets: targets.is_some(),
                targets: targets.map(|t| vec![t]),
                ..Default::default()
            };
            engine.score(query, None).await.and_then(|scored| {
                let first = scored
                    .texts
                    .first()
                    .ok_or_else(|| Error::Inference("the engine returned no scores".into()))?;
                Ok(scores_record(&scored, first))
            })
        }
        Task::Generate(options) => {
            async {
                let generation = engine
                    .generate_text(row_query(text, options, index))
                    .await?;
                let digest = generation.digest.clone();
                let out = generation.collect(None).await?;
                Ok(generation_record(&out, &digest))
            }
            .await
        }
    };
    match result {
        Ok(record) => Ok(Ok(record)),
        Err(e @ Error::Invalid { .. }) => Ok(Err(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

pub fn run(job: PredictJob) -> anyhow::Result<()> {
    let done = if job.resume {
        let mut done = finished_jsonl_rows(&[&job.errors])?;
        if is_parquet(&job.out) {
            done.extend(parquet_output::finished_rows(&job.out)?);
        } else {
            done.extend(finished_jsonl_rows(&[&job.out])?);
        }
        done
    } else {
        BTreeSet::new()
    };
    let columns = Columns {
        text: &job.text_column,
        id: job.id_column.as_deref(),
        reference: None,
        targets: job.targets_column.as_deref(),
    };
    let shard = job.shard;
    let wanted = |r: &anyhow::Result<data_file::Row>| match r {
        Ok(row) => shard.is_none_or(|s| s.takes(row.index)) && !done.contains(&row.index),
        Err(_) => true,
    };
    // Read the whole file's rows up front only to count them for the progress bar and ETA;
    // texts are read again, lazily, while scoring.
    let total = data_file::read(&job.data, columns)?.filter(wanted).count();
    let name = job.model.spec.model.clone();
    let loaded = job.model.load(false)?;
    let (served, tokenizer) = loaded.served(name);
    let in_flight = job.engine.max_batch_size * 4;
    let engine = Engine::start(
        served,
        Arc::new(tokenizer),
        EngineConfig {
            queue_capacity: in_flight,
            ..job.engine
        },
    )?;
    if matches!(job.task, Task::Sentiment(LongInput::Chunk)) {
        crate::served::check_chunk_overlap(&engine)?;
    }
    let mut out = if is_parquet(&job.out) {
        let columns = parquet_output::output_columns(
            matches!(job.task, Task::Generate(_)),
            &engine.labels().names,
            matches!(job.task, Task::Sentiment(LongInput::Sentences)),
            job.targets_column.is_some(),
        );
        Output::Parquet(PartWriter::open(
            &job.out,
            columns,
            job.part_rows,
            job.resume,
        )?)
    } else {
        Output::Jsonl(open_output(&job.out, job.resume)?)
    };
    let mut errors = open_output(&job.errors, job.resume)?;
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let rows = data_file::read(&job.data, columns)?.filter(wanted);
    let task = &job.task;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let start = Instant::now();
    let (mut processed, mut refused) = (0usize, 0usize);
    rt.block_on(async {
        let mut results = futures::stream::iter(rows)
            .map(|row| {
                let engine = engine.clone();
                async move {
                    let row = row?;
                    let outcome = match (row.text, row.targets.transpose()) {
                        (Ok(text), Ok(targets)) => {
                            process(&engine, task, row.index, text, targets).await?
                        }
                        (Err(why), _) | (_, Err(why)) => Err(why),
                    };
                    anyhow::Ok((row.index, row.id, outcome))
                }
            })
            .buffered(in_flight);
        while let Some(result) = results.next().await {
            let (index, id, outcome) = result?;
            match outcome {
                Ok(mut record) => {
                    record["row"] = json!(index);
                    record["id"] = id;
                    out.write(record, &job.out)?;
                    processed += 1;
                }
                Err(why) => {
                    let record = json!({"row": index, "id": id, "error": why});
                    write_record(&mut errors, &record, &job.errors)?;
                    refused += 1;
                }
            }
            bar.inc(1);
        }
        anyhow::Ok(())
    })?;
    out.finish()?;
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let verb = match task {
        Task::Sentiment(_) => "scored",
        Task::Generate(_) => "generated",
    };
    println!(
        "{processed} rows {verb} into {}, {refused} refused into {} ({} done before), {elapsed:.1} s ({:.1} rows/s)",
        job.out.display(),
        job.errors.display(),
        done.len(),
        (processed + refused) as f64 / elapsed.max(1e-9)
    );
    if let Some(s) = shard {
        println!(
            "shard {}/{}: rows whose index modulo {} is {}",
            s.index, s.count, s.count, s.index
        );
    }
    Ok(())
}
