//! `predict`'s output as Parquet: a directory of complete part files.
//!
//! A Parquet file is only readable once its footer is written, so a killed writer leaves nothing
//! usable. `predict` therefore writes `part-NNNNN.parquet` files of `--part-rows` rows each: a
//! part is written under a hidden temporary name and renamed once closed, so every visible part
//! is whole, and `--resume` skips the rows they hold (the rows of an unfinished part are done
//! again). pandas, pyarrow, Polars, DuckDB and Spark read such a directory as one table. Parts are
//! Snappy-compressed, as pandas, pyarrow and Spark write by default.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

/// Where a column's values come from in a record.
#[derive(Debug, Clone)]
pub enum Source {
    /// An unsigned integer member.
    Count(&'static str),
    /// A member as text: a string as it is, anything else (but null) as JSON.
    Text(&'static str),
    /// The best label of the record's `scores`.
    TopLabel,
    /// The score of this label in the record's `scores`.
    Score(String),
}

/// The columns of a `predict` output.
pub fn output_columns(
    generate: bool,
    labels: &[String],
    sentences: bool,
    targets: bool,
) -> Vec<(String, Source)> {
    let mut columns = vec![
        ("row".to_string(), Source::Count("row")),
        ("id".to_string(), Source::Text("id")),
    ];
    if generate {
        columns.extend([
            ("generated_text".to_string(), Source::Text("generated_text")),
            ("finish_reason".to_string(), Source::Text("finish_reason")),
            (
                "generated_tokens".to_string(),
                Source::Count("generated_tokens"),
            ),
            ("seed".to_string(), Source::Count("seed")),
        ]);
    } else {
        columns.push(("label".to_string(), Source::TopLabel));
        columns.extend(
            labels
                .iter()
                .map(|l| (format!("score_{l}"), Source::Score(l.clone()))),
        );
        if sentences {
            columns.push(("sentences".to_string(), Source::Text("sentences")));
        }
        if targets {
            columns.push(("targets".to_string(), Source::Text("targets")));
        }
    }
    columns.push(("digest".to_string(), Source::Text("digest")));
    columns
}

/// Writes records into `dir` as complete part files.
pub struct PartWriter {
    dir: PathBuf,
    columns: Vec<(String, Source)>,
    schema: Arc<Schema>,
    part_rows: usize,
    next_part: usize,
    pending: Vec<Value>,
}

fn part_name(n: usize) -> String {
    format!("part-{n:05}.parquet")
}

/// The complete parts in `dir`, by number.
fn parts(dir: &Path) -> anyhow::Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if let Some(n) = file
            .strip_prefix("part-")
            .and_then(|f| f.strip_suffix(".parquet"))
            .and_then(|n| n.parse().ok())
        {
            found.push((n, path));
        }
    }
    found.sort();
    Ok(found)
}

impl PartWriter {
    /// A writer into `dir` (created). Without `resume` the directory must hold no parts; with
    /// it, parts are numbered after the last one there, and unfinished parts are removed.
    pub fn open(
        dir: &Path,
        columns: Vec<(String, Source)>,
        part_rows: usize,
        resume: bool,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let existing = parts(dir)?;
        if !resume && !existing.is_empty() {
            bail!(
                "{} already holds part files: pass --resume to continue that run, or remove them",
                dir.display()
            );
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, source)| {
                    let (t, nullable) = match source {
                        Source::Count("row") => (DataType::UInt64, false),
                        Source::Count(_) => (DataType::UInt64, true),
                        Source::Text(_) | Source::TopLabel => (DataType::Utf8, true),
                        Source::Score(_) => (DataType::Float64, true),
                    };
                    Field::new(name, t, nullable)
                })
                .collect::<Vec<_>>(),
        ));
        Ok(Self {
            dir: dir.to_path_buf(),
            columns,
            schema,
            part_rows,
            next_part: existing.last().map_or(0, |(n, _)| n + 1),
            pending: Vec::new(),
        })
    }

    pub fn write(&mut self, record: Value) -> anyhow::Result<()> {
        self.pending.push(record);
        if self.pending.len() >= self.part_rows {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the rows held so far as one part.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|(_, source)| column(source, &self.pending))
            .collect();
        let batch = RecordBatch::try_new(self.schema.clone(), arrays)
            .context("cannot assemble a part's columns")?;
        let name = part_name(self.next_part);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer = ArrowWriter::try_new(file, self.schema.clone(), Some(props))?;
        writer.write(&batch)?;
        let file = writer.into_inner()?;
        file.sync_all()?;
        let path = self.dir.join(&name);
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        self.next_part += 1;
        self.pending.clear();
        Ok(())
    }
}

/// One column of `records`.
fn column(source: &Source, records: &[Value]) -> ArrayRef {
    let score = |r: &Value, label: Option<&str>| -> Option<Value> {
        let scores = r["scores"].as_array()?;
        match label {
            None => scores.first().map(|s| s["label"].clone()),
            Some(l) => scores
                .iter()
                .find(|s| s["label"] == l)
                .map(|s| s["score"].clone()),
        }
    };
    match source {
        Source::Count(member) => Arc::new(
            records
                .iter()
                .map(|r| r[member].as_u64())
                .collect::<UInt64Array>(),
        ),
        Source::Text(member) => Arc::new(
            records
                .iter()
                .map(|r| text(&r[member]))
                .collect::<StringArray>(),
        ),
        Source::TopLabel => Arc::new(
            records
                .iter()
                .map(|r| score(r, None).as_ref().and_then(text))
                .collect::<StringArray>(),
        ),
        Source::Score(label) => Arc::new(
            records
                .iter()
                .map(|r| score(r, Some(label)).and_then(|v| v.as_f64()))
                .collect::<Float64Array>(),
        ),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The rows that the complete parts in `dir` hold.
pub fn finished_rows(dir: &Path) -> anyhow::Result<BTreeSet<usize>> {
    let mut done = BTreeSet::new();
    for (_, path) in parts(dir)? {
        let name = path.display().to_string();
        let file = File::open(&path).with_context(|| format!("cannot open {name}"))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{name} is not a readable Parquet file"))?;
        let at = builder
            .schema()
            .index_of("row")
            .map_err(|_| anyhow!("{name} has no `row` column: not a part of finserve predict"))?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [at]);
        for batch in builder.with_projection(mask).build()? {
            let batch = batch.with_context(|| format!("cannot read {name}"))?;
            let rows = batch
                .column(0)
                .as_primitive_opt::<arrow_array::types::UInt64Type>()
                .with_context(|| format!("{name}: `row` is not an unsigned integer column"))?;
            done.extend(rows.iter().flatten().map(|r| r as usize));
        }
    }
    Ok(done)
}
