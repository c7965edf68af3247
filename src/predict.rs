//! `finserve predict`: scores a file of texts (CSV with a header row, or JSON Lines) into a JSON
//! Lines file, through the same engine, batching and validation as the server. Each output line
//! is one complete, flushed record, so a run killed at any point resumes (`--resume`) from what
//! is on disk with no row written twice; `--shard I/N` takes the rows whose index is I modulo N,
//! so N jobs over one file write disjoint outputs whose union is the whole file. A row that is
//! readable but cannot be scored (no text, a blank text, too long) goes to the errors file with
//! the reason; a file that cannot be read or parsed stops the run naming the file and row.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::engine::infer::{LongInput, ScoreQuery};
use crate::engine::{Engine, EngineConfig};
use crate::error::Error;
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

/// One `finserve predict` run, as the command line resolved it.
pub struct PredictJob {
    pub model: ModelJob,
    pub engine: EngineConfig,
    pub long_input: LongInput,
    pub data: PathBuf,
    pub text_column: String,
    pub id_column: Option<String>,
    pub out: PathBuf,
    pub errors: PathBuf,
    pub resume: bool,
    pub shard: Option<Shard>,
}

/// One input row: its index in the file (0 = the first data row), its id if asked for, and its
/// text, or why it has none.
struct Row {
    index: usize,
    id: Value,
    text: Result<String, String>,
}

/// The rows of `data` (CSV with a header row, or JSON Lines by extension), lazily; an error
/// stops the run.
fn read_rows(
    data: &Path,
    text_column: &str,
    id_column: Option<&str>,
) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Row>>>> {
    let name = data.display().to_string();
    let ext = data.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "csv" => {
            let mut reader =
                csv::Reader::from_path(data).with_context(|| format!("cannot open {name}"))?;
            let headers = reader
                .headers()
                .with_context(|| format!("{name}: cannot read the header row"))?
                .clone();
            let column = |c: &str| {
                headers
                    .iter()
                    .position(|h| h == c)
                    .with_context(|| format!("{name} has no column `{c}` (columns: {headers:?})"))
            };
            let text_at = column(text_column)?;
            let id_at = id_column.map(column).transpose()?;
            let text_column = text_column.to_string();
            Ok(Box::new(reader.into_records().enumerate().map(
                move |(index, record)| {
                    // Row numbers as a spreadsheet shows them: the header is row 1.
                    let record = record
                        .with_context(|| format!("{name}: row {} cannot be read", index + 2))?;
                    let field = |at: usize| record.get(at).map(str::to_string);
                    Ok(Row {
                        index,
                        id: id_at.and_then(field).map_or(Value::Null, Value::String),
                        text: field(text_at).ok_or_else(|| format!("no `{text_column}` field")),
                    })
                },
            )))
        }
        "jsonl" | "ndjson" => {
            let file = File::open(data).with_context(|| format!("cannot open {name}"))?;
            let text_column = text_column.to_string();
            let id_column = id_column.map(str::to_string);
            Ok(Box::new(BufReader::new(file).lines().enumerate().map(
                move |(index, line)| {
                    let line =
                        line.with_context(|| format!("{name}: line {} cannot be read", index + 1))?;
                    let value: Value = serde_json::from_str(&line)
                        .with_context(|| format!("{name}: line {} is not JSON", index + 1))?;
                    let Value::Object(object) = value else {
                        bail!("{name}: line {} is not a JSON object", index + 1);
                    };
                    let id = id_column
                        .as_ref()
                        .and_then(|c| object.get(c).cloned())
                        .unwrap_or(Value::Null);
                    let text = match object.get(&text_column) {
                        Some(Value::String(t)) => Ok(t.clone()),
                        Some(other) => Err(format!("`{text_column}` is not a string: {other}")),
                        None => Err(format!("no `{text_column}` field")),
                    };
                    Ok(Row { index, id, text })
                },
            )))
        }
        other => {
            bail!("{name}: unknown input format `.{other}` (.csv with a header row, or .jsonl)")
        }
    }
}

/// The rows a previous run finished (written to `out` or to `errors`), after cutting a record
/// that a kill left half written off the end of each file.
fn finished_rows(paths: &[&Path]) -> anyhow::Result<BTreeSet<usize>> {
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

/// Appends `record` as one line in one write, so a kill leaves at most that line cut short.
fn write_record(file: &mut File, record: &Value, path: &Path) -> anyhow::Result<()> {
    let line = format!("{record}\n");
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(job: PredictJob) -> anyhow::Result<()> {
    let done = if job.resume {
        finished_rows(&[&job.out, &job.errors])?
    } else {
        BTreeSet::new()
    };
    // Read the whole file's rows up front only to count them for the progress bar and ETA;
    // texts are read again, lazily, while scoring.
    let total = read_rows(&job.data, &job.text_column, job.id_column.as_deref())?
        .filter(|r| match r {
            Ok(row) => job.shard.is_none_or(|s| s.takes(row.index)) && !done.contains(&row.index),
            Err(_) => true,
        })
        .count();
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
    if job.long_input == LongInput::Chunk {
        crate::served::check_chunk_overlap(&engine)?;
    }
    let mut out = open_output(&job.out, job.resume)?;
    let mut errors = open_output(&job.errors, job.resume)?;
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let shard = job.shard;
    let rows = read_rows(&job.data, &job.text_column, job.id_column.as_deref())?.filter(|r| {
        r.as_ref().map_or(true, |row| {
            shard.is_none_or(|s| s.takes(row.index)) && !done.contains(&row.index)
        })
    });
    let long_input = job.long_input;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let start = Instant::now();
    let (mut scored, mut refused) = (0usize, 0usize);
    rt.block_on(async {
        let mut results = futures::stream::iter(rows)
            .map(|row| {
                let engine = engine.clone();
                async move {
                    let row = row?;
                    let text = match row.text {
                        Ok(t) => t,
                        Err(why) => return anyhow::Ok((row.index, row.id, Err(why))),
                    };
                    let query = ScoreQuery {
                        texts: vec![text],
                        long_input,
                        ..Default::default()
                    };
                    match engine.score(query, None).await {
                        Ok(s) => Ok((row.index, row.id, Ok(s))),
                        Err(e @ Error::Invalid { .. }) => {
                            Ok((row.index, row.id, Err(e.to_string())))
                        }
                        Err(e) => Err(e.into()),
                    }
                }
            })
            .buffered(in_flight);
        while let Some(result) = results.next().await {
            let (index, id, result) = result?;
            match result {
                Ok(s) => {
                    let text = s.texts.first().context("the engine returned no scores")?;
                    let mut ranked: Vec<(&String, f64)> = s
                        .labels
                        .names
                        .iter()
                        .zip(text.probs.iter().copied())
                        .collect();
                    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                    let scores: Vec<Value> = ranked
                        .into_iter()
                        .map(|(label, score)| json!({"label": label, "score": score}))
                        .collect();
                    let record =
                        json!({"row": index, "id": id, "scores": scores, "digest": s.digest});
                    write_record(&mut out, &record, &job.out)?;
                    scored += 1;
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
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{scored} rows scored into {}, {refused} refused into {} ({} done before), {elapsed:.1} s ({:.1} rows/s)",
        job.out.display(),
        job.errors.display(),
        done.len(),
        (scored + refused) as f64 / elapsed.max(1e-9)
    );
    if let Some(s) = shard {
        println!(
            "shard {}/{}: rows whose index modulo {} is {}",
            s.index, s.count, s.count, s.index
        );
    }
    Ok(())
}
