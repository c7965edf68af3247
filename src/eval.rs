//! `finserve eval`: scores a labelled CSV through the same engine and batching as the server and
//! reports accuracy, macro-F1, per-class precision/recall, the confusion matrix, throughput, and
//! how well the scores are calibrated (ECE, Brier, NLL), before and after the temperature that
//! applies (the served calibration, or the one `--calibrate` fits and writes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::calibration::{Calibration, quality};
use crate::engine::backend::T5Backend;
use crate::engine::sentiment::LabelSet;
use crate::engine::{Engine, EngineConfig, Served};
use crate::model::LoadedModel;

/// Gold/predicted label indices over `n` classes, and the scores derived from them.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub labels: Vec<String>,
    /// `confusion[gold][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

impl Report {
    pub fn new(labels: Vec<String>, pairs: &[(usize, usize)]) -> Self {
        let n = labels.len();
        let mut confusion = vec![vec![0; n]; n];
        for &(gold, pred) in pairs {
            confusion[gold][pred] += 1;
        }
        Self { labels, confusion }
    }

    fn total(&self) -> usize {
        self.confusion.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let correct: usize = (0..self.labels.len()).map(|i| self.confusion[i][i]).sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// (precision, recall, f1, support) of class `c`; 0 where undefined, as scikit-learn reports.
    pub fn class(&self, c: usize) -> (f64, f64, f64, usize) {
        let tp = self.confusion[c][c] as f64;
        let predicted: usize = self.confusion.iter().map(|row| row[c]).sum();
        let support: usize = self.confusion[c].iter().sum();
        let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
        let (p, r) = (ratio(tp, predicted), ratio(tp, support));
        let f1 = if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        };
        (p, r, f1, support)
    }

    pub fn macro_f1(&self) -> f64 {
        let n = self.labels.len();
        (0..n).map(|c| self.class(c).2).sum::<f64>() / n.max(1) as f64
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "accuracy  {:.4}\nmacro-F1  {:.4}\n\n{:<12} {:>9} {:>9} {:>9} {:>9}\n",
            self.accuracy(),
            self.macro_f1(),
            "class",
            "precision",
            "recall",
            "f1",
            "support"
        );
        for (c, label) in self.labels.iter().enumerate() {
            let (p, r, f, n) = self.class(c);
            s += &format!("{label:<12} {p:>9.4} {r:>9.4} {f:>9.4} {n:>9}\n");
        }
        s += &format!("\nconfusion (rows gold, columns predicted)\n{:<12}", "");
        for label in &self.labels {
            s += &format!(" {label:>10}");
        }
        s.push('\n');
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            s += &format!("{label:<12}");
            for v in row {
                s += &format!(" {v:>10}");
            }
            s.push('\n');
        }
        s
    }
}

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

/// One `finserve eval` run, as the command line resolved it.
pub struct EvalJob {
    /// The model's name in reports (its `--model`).
    pub name: String,
    pub model: LoadedModel,
    /// The labels, with the served calibration's temperature if one applies.
    pub labels: LabelSet,
    pub calibration: Option<(PathBuf, Calibration)>,
    pub prompt_template: String,
    /// The batching the server would use; the queue is sized here to hold the whole file.
    pub engine: EngineConfig,
    pub data: PathBuf,
    pub text_column: String,
    pub label_column: String,
    /// Where one JSON line per sentence goes, if anywhere.
    pub out: Option<PathBuf>,
    /// Where a temperature fitted on this data is written, if anywhere.
    pub calibration_out: Option<PathBuf>,
}

pub fn run(job: EvalJob) -> anyhow::Result<()> {
    let EvalJob {
        name,
        model: loaded,
        labels,
        calibration,
        prompt_template,
        engine: config,
        data,
        text_column,
        label_column,
        out,
        calibration_out,
    } = job;
    let rows = read_rows(&data, &text_column, &label_column, &labels.names)?;
    let names = labels.names.clone();
    let served = Served {
        name,
        backend: T5Backend::new(loaded.model),
        labels,
    };
    let engine = Engine::start(
        vec![served],
        Arc::new(loaded.tokenizer),
        EngineConfig {
            queue_capacity: rows.len(),
            ..config
        },
    )?;
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(rows.len());
    for (text, _) in &rows {
        receivers.push(engine.sentiment_text(text, 0)?);
    }
    let bar = indicatif::ProgressBar::new(rows.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} sentences ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut out = match &out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut pairs = Vec::with_capacity(rows.len());
    let mut log_likelihoods = Vec::with_capacity(rows.len());
    for ((text, gold), rx) in rows.iter().zip(receivers) {
        let result = rx.blocking_recv().context("the engine stopped")??;
        log_likelihoods.push(result.scores.log_probs.clone());
        let probs = &result.scores.probs;
        let pred = (0..probs.len())
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .unwrap_or(0);
        pairs.push((*gold, pred));
        if let Some(w) = out.as_mut() {
            let line = serde_json::json!({
                "text": text,
                "label": names[*gold],
                "prediction": names[pred],
                "scores": names.iter().zip(probs).map(|(n, p)| (n.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
            });
            writeln!(w, "{line}")?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let report = Report::new(names.clone(), &pairs);
    println!(
        "{} sentences from {} in {elapsed:.1} s ({:.1} sentences/s)\n",
        rows.len(),
        data.display(),
        rows.len() as f64 / elapsed
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_scikit_learn() {
        // sklearn: accuracy 0.6, f1 per class [0.6667, 0.5, 0.6667] -> macro 0.6111
        let labels = vec!["a".into(), "b".into(), "c".into()];
        let pairs = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)];
        let r = Report::new(labels, &pairs);
        assert!((r.accuracy() - 0.6).abs() < 1e-12);
        let (p, rec, f, n) = r.class(1);
        assert_eq!(n, 2);
        assert!((p - 0.5).abs() < 1e-12 && (rec - 0.5).abs() < 1e-12 && (f - 0.5).abs() < 1e-12);
        assert!((r.macro_f1() - (2.0 / 3.0 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    }
}
