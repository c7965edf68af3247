//! The rows of a bulk command's input file (`predict`, `eval --task generate`): CSV with a header
//! row or JSON Lines, chosen by extension, read lazily. A row that is readable but lacks a field
//! is still a row (its field holds why), so that the command can report it and go on; a file
//! that cannot be read or parsed stops the command, naming the file and the row.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

/// The columns (or JSON members) a command reads.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub text: &'a str,
    /// Carried through to the output as it is.
    pub id: Option<&'a str>,
    /// A second text, e.g. the reference output of `eval --task generate`.
    pub target: Option<&'a str>,
}

/// A string field of a row, or why it has none.
pub type Field = Result<String, String>;

/// One input row: its index in the file (0 = the first data row), its id if asked for (JSON
/// null otherwise), its text and its target if asked for.
pub struct Row {
    pub index: usize,
    pub id: Value,
    pub text: Field,
    pub target: Option<Field>,
}

pub type Rows = Box<dyn Iterator<Item = anyhow::Result<Row>>>;

/// The rows of `data`, lazily; an error stops the command.
pub fn read(data: &Path, columns: Columns<'_>) -> anyhow::Result<Rows> {
    let name = data.display().to_string();
    let ext = data.extension().and_then(|e| e.to_str()).unwrap_or("");
    let text_column = columns.text.to_string();
    let id_column = columns.id.map(str::to_string);
    let target_column = columns.target.map(str::to_string);
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
            let text_at = column(&text_column)?;
            let id_at = id_column.as_deref().map(column).transpose()?;
            let target_at = target_column.as_deref().map(column).transpose()?;
            Ok(Box::new(reader.into_records().enumerate().map(
                move |(index, record)| {
                    // Row numbers as a spreadsheet shows them: the header is row 1.
                    let record = record
                        .with_context(|| format!("{name}: row {} cannot be read", index + 2))?;
                    let field = |at: usize, column: &str| {
                        record
                            .get(at)
                            .map(str::to_string)
                            .ok_or_else(|| format!("no `{column}` field"))
                    };
                    Ok(Row {
                        index,
                        id: id_at
                            .and_then(|at| record.get(at))
                            .map_or(Value::Null, |id| Value::String(id.to_string())),
                        text: field(text_at, &text_column),
                        target: target_at
                            .zip(target_column.as_deref())
                            .map(|(at, c)| field(at, c)),
                    })
                },
            )))
        }
        "jsonl" | "ndjson" => {
            let file = File::open(data).with_context(|| format!("cannot open {name}"))?;
            Ok(Box::new(BufReader::new(file).lines().enumerate().map(
                move |(index, line)| {
                    let line =
                        line.with_context(|| format!("{name}: line {} cannot be read", index + 1))?;
                    let value: Value = serde_json::from_str(&line)
                        .with_context(|| format!("{name}: line {} is not JSON", index + 1))?;
                    let Value::Object(object) = value else {
                        bail!("{name}: line {} is not a JSON object", index + 1);
                    };
                    let field = |column: &str| match object.get(column) {
                        Some(Value::String(t)) => Ok(t.clone()),
                        Some(other) => Err(format!("`{column}` is not a string: {other}")),
                        None => Err(format!("no `{column}` field")),
                    };
                    Ok(Row {
                        index,
                        id: id_column
                            .as_ref()
                            .and_then(|c| object.get(c).cloned())
                            .unwrap_or(Value::Null),
                        text: field(&text_column),
                        target: target_column.as_deref().map(field),
                    })
                },
            )))
        }
        other => {
            bail!("{name}: unknown input format `.{other}` (.csv with a header row, or .jsonl)")
        }
    }
}
