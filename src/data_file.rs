//! The rows of a bulk command's input file (`predict`, `eval --task generate`): CSV with a header
//! row, JSON Lines or Parquet (only the columns asked for are read; Snappy is the one codec
//! built in, what pandas, pyarrow and Spark write by default), chosen by extension, read lazily. A row that is readable but lacks a field
//! is still a row (its field holds why), so that the command can report it and go on; a file
//! that cannot be read or parsed stops the command, naming the file and the row.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use crate::engine::targets::Target;

/// The columns (or JSON members) a command reads.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub text: &'a str,
    /// Carried through to the output as it is.
    pub id: Option<&'a str>,
    /// A second text, e.g. the reference output of `eval --task generate`.
    pub reference: Option<&'a str>,
    /// Entity-level targets: a list of names and `{"start", "end"}` spans (in CSV and Parquet,
    /// that list as JSON text).
    pub targets: Option<&'a str>,
}

/// A string field of a row, or why it has none.
pub type Field = Result<String, String>;

/// One input row: its index in the file (0 = the first data row), its id if asked for (JSON
/// null otherwise), its text, and its reference and targets if asked for.
pub struct Row {
    pub index: usize,
    pub id: Value,
    pub text: Field,
    pub reference: Option<Field>,
    pub targets: Option<Result<Vec<Target>, String>>,
}

/// A row's targets from their column: a JSON list (or JSON text of one) of names and
/// `{"start", "end"}` code-point spans.
fn targets(value: Option<&Value>, column: &str) -> Result<Vec<Target>, String> {
    let parsed;
    let value = match value {
        None | Some(Value::Null) => return Err(format!("no `{column}` field")),
        Some(Value::String(text)) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| format!("`{column}` is not a JSON list of targets: {e}"))?;
            &parsed
        }
        Some(v) => v,
    };
    let bad =
        || format!("`{column}` must be a list of names and {{\"start\", \"end\"}} spans: {value}");
    let items = value.as_array().ok_or_else(bad)?;
    items
        .iter()
        .map(|item| match item {
            Value::String(name) => Ok(Target::Name(name.clone())),
            Value::Object(span) if span.len() == 2 => {
                let at = |k: &str| span.get(k).and_then(Value::as_u64).map(|v| v as usize);
                match (at("start"), at("end")) {
                    (Some(start), Some(end)) => Ok(Target::Span { start, end }),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        })
        .collect()
}

pub type Rows = Box<dyn Iterator<Item = anyhow::Result<Row>>>;

/// The rows of `data`, lazily; an error stops the command.
pub fn read(data: &Path, columns: Columns<'_>) -> anyhow::Result<Rows> {
    let name = data.display().to_string();
    let ext = data.extension().and_then(|e| e.to_str()).unwrap_or("");
    let text_column = columns.text.to_string();
    let id_column = columns.id.map(str::to_string);
    let reference_column = columns.reference.map(str::to_string);
    let targets_column = columns.targets.map(str::to_string);
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
            let reference_at = reference_column.as_deref().map(column).transpose()?;
            let targets_at = targets_column.as_deref().map(column).transpose()?;
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
                        reference: reference_at
                            .zip(reference_column.as_deref())
                            .map(|(at, c)| field(at, c)),
                        targets: targets_at.zip(targets_column.as_deref()).map(|(at, c)| {
                            targets(record.get(at).map(|t| Value::String(t.into())).as_ref(), c)
                        }),
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
                        reference: reference_column.as_deref().map(field),
                        targets: targets_column.as_deref().map(|c| targets(object.get(c), c)),
                    })
                },
            )))
        }
        "parquet" => read_parquet(data, columns),
        other => bail!(
            "{name}: unknown input format `.{other}` (.csv with a header row, .jsonl or .parquet)"
        ),
    }
}

/// The string at `i` of a text column (`None` when null).
fn string_at(array: &dyn Array, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(i).to_string()),
        _ => None,
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// The id at `i`: a string or an integer as JSON, null when null.
fn id_at(array: &dyn Array, i: usize) -> Value {
    use arrow_array::types::*;
    if array.is_null(i) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Int8 => array.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(i).into(),
        _ => string_at(array, i).map_or(Value::Null, Value::String),
    }
}

/// The rows of the Parquet file `data`, reading only the columns asked for.
fn read_parquet(data: &Path, columns: Columns<'_>) -> anyhow::Result<Rows> {
    let name = data.display().to_string();
    let file = File::open(data).with_context(|| format!("cannot open {name}"))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{name} is not a readable Parquet file"))?;
    let schema = builder.schema().clone();
    // Each column read, with whether it may hold integers (an id) or only strings.
    let wanted = [Some((columns.text, false)), columns.id.map(|c| (c, true))]
        .into_iter()
        .chain([
            columns.reference.map(|c| (c, false)),
            columns.targets.map(|c| (c, false)),
        ])
        .flatten();
    let mut indices = Vec::new();
    for (column, integers) in wanted {
        let at = schema.index_of(column).map_err(|_| {
            let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
            anyhow!("{name} has no column `{column}` (columns: {names:?})")
        })?;
        let t = schema.field(at).data_type();
        if !(is_text(t) || integers && t.is_integer()) {
            let what = if integers {
                "a string or an integer"
            } else {
                "a string"
            };
            bail!("{name}: column `{column}` holds {t}, not {what}");
        }
        indices.push(at);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let reader = builder
        .with_projection(mask)
        .build()
        .with_context(|| format!("cannot read {name}"))?;
    let text_column = columns.text.to_string();
    let id_column = columns.id.map(str::to_string);
    let reference_column = columns.reference.map(str::to_string);
    let targets_column = columns.targets.map(str::to_string);
    let mut first = 0usize;
    Ok(Box::new(reader.flat_map(
        move |batch| -> Box<dyn Iterator<Item = anyhow::Result<Row>>> {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    return Box::new(std::iter::once(Err(anyhow!(
                        "{name}: the rows from row {first} (0 = the first) cannot be read: {e} \
                         (finserve reads Snappy-compressed and uncompressed Parquet)"
                    ))));
                }
            };
            let start = first;
            first += batch.num_rows();
            let column = |c: &str| batch.column_by_name(c).cloned();
            let (text, id) = (column(&text_column), id_column.as_deref().and_then(column));
            let reference = reference_column
                .as_deref()
                .map(|c| (c.to_string(), column(c)));
            let targets_of = targets_column
                .as_deref()
                .map(|c| (c.to_string(), column(c)));
            let text_column = text_column.clone();
            Box::new((0..batch.num_rows()).map(move |i| {
                let field = |array: &Option<ArrayRef>, c: &str| {
                    array
                        .as_deref()
                        .and_then(|a| string_at(a, i))
                        .ok_or_else(|| format!("`{c}` is null"))
                };
                Ok(Row {
                    index: start + i,
                    id: id.as_deref().map_or(Value::Null, |a| id_at(a, i)),
                    text: field(&text, &text_column),
                    reference: reference.as_ref().map(|(c, a)| field(a, c)),
                    targets: targets_of.as_ref().map(|(c, a)| {
                        let text = a.as_deref().and_then(|a| string_at(a, i));
                        targets(text.map(Value::String).as_ref(), c)
                    }),
                })
            }))
        },
    )))
}
