//! Entity-level sentiment data in FinEntity's JSON Lines shape, which `finserve train` learns from
//! and `finserve eval` scores: one text per line, `{"content": str, "annotations": [{"start",
//! "end", "label", "value"?}]}`, spans in Unicode code points (end exclusive), `value` (if given)
//! the spanned text.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::engine::targets::Located;

#[derive(Debug, Clone, Deserialize)]
struct Record {
    content: String,
    annotations: Vec<Annotation>,
}

#[derive(Debug, Clone, Deserialize)]
struct Annotation {
    start: usize,
    end: usize,
    label: String,
    value: Option<String>,
}

/// One text and its annotated entities.
#[derive(Debug, Clone)]
pub struct EntityText {
    pub text: String,
    /// Each entity (one span each) and its gold label's index in the label set.
    pub entities: Vec<(Located, usize)>,
}

impl EntityText {
    /// Whether its entities do not all carry one label.
    pub fn mixed(&self) -> bool {
        self.entities.iter().any(|(_, l)| *l != self.entities[0].1)
    }
}

/// Whether `path` holds JSON Lines (by its extension, `.jsonl`).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// Reads every text of a FinEntity-shaped file; any line that does not parse, a span outside its
/// text or not matching its `value`, and a label outside `labels` stop the read, naming the line.
pub fn read(path: &Path, labels: &[String]) -> anyhow::Result<Vec<EntityText>> {
    let data =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut texts = Vec::new();
    for (i, line) in data.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {}", path.display(), i + 1);
        let record: Record = serde_json::from_str(line).with_context(at)?;
        let chars: Vec<char> = record.content.chars().collect();
        let mut entities = Vec::with_capacity(record.annotations.len());
        for a in record.annotations {
            if a.start >= a.end || a.end > chars.len() {
                bail!(
                    "{}: span [{}, {}) is empty or outside the text's {} characters",
                    at(),
                    a.start,
                    a.end,
                    chars.len()
                );
            }
            let name: String = chars[a.start..a.end].iter().collect();
            if a.value.as_ref().is_some_and(|v| *v != name) {
                bail!(
                    "{}: span [{}, {}) holds `{name}`, not its value `{}`",
                    at(),
                    a.start,
                    a.end,
                    a.value.unwrap_or_default()
                );
            }
            let Some(label) = labels.iter().position(|l| *l == a.label) else {
                bail!("{}: label `{}` is not one of {labels:?}", at(), a.label);
            };
            let located = Located {
                name,
                spans: vec![(a.start, a.end)],
            };
            entities.push((located, label));
        }
        if !entities.is_empty() {
            texts.push(EntityText {
                text: record.content,
                entities,
            });
        }
    }
    if texts.is_empty() {
        bail!("{} has no annotated text", path.display());
    }
    Ok(texts)
}
