//! Temperature calibration of the sentiment scores, so that a 0.9 means right nine times in ten.
//!
//! `finserve eval --calibrate` fits one temperature `T` on a labelled CSV, minimising the
//! negative log-likelihood of the gold label under `softmax(log_likelihoods / T)` over the label
//! set, and writes it with the fit's quality (expected calibration error over 15 bins, Brier
//! score, NLL; before and after) to `calibration.json`. At startup the server applies it to its
//! own label set, which it was fitted for; a file fitted for other labels or another prompt
//! template is refused rather than silently applied.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::sentiment::softmax;
use crate::error::{Error, Result};

/// The file name `finserve eval --calibrate` writes and `finserve serve` looks for.
pub const FILE_NAME: &str = "calibration.json";

/// Bins of the expected calibration error.
const ECE_BINS: usize = 15;

/// How well probabilities match outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Mean negative log-likelihood of the gold label.
    pub nll: f64,
    /// Expected calibration error: per confidence bin, |accuracy − mean confidence|, weighted by
    /// the bin's share of rows.
    pub ece: f64,
    /// Mean squared distance between the probabilities and the one-hot gold label.
    pub brier: f64,
}

/// What `calibration.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub temperature: f64,
    /// The label set and template the temperature was fitted for.
    pub labels: Vec<String>,
    pub prompt_template: String,
    /// Where it was fitted, and on how many rows.
    pub data: String,
    pub rows: usize,
    pub before: Quality,
    pub after: Quality,
}

impl Calibration {
    /// Fits the temperature to per-row label log-likelihoods and gold label indices.
    pub fn fit(
        log_likelihoods: &[Vec<f64>],
        gold: &[usize],
        labels: Vec<String>,
        prompt_template: String,
        data: String,
    ) -> Self {
        let temperature = fit_temperature(log_likelihoods, gold);
        Self {
            temperature,
            labels,
            prompt_template,
            data,
            rows: gold.len(),
            before: quality(log_likelihoods, gold, 1.0),
            after: quality(log_likelihoods, gold, temperature),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Self = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        if !(c.temperature.is_finite() && c.temperature > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{}: `temperature` must be positive (got {})",
                path.display(),
                c.temperature
            )));
        }
        Ok(c)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| {
            Error::InvalidArgument(format!("cannot serialise the calibration: {e}"))
        })?;
        std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
    }

    /// Refuses a calibration fitted for other labels or another template than the server's.
    pub fn check_fits(&self, path: &Path, labels: &[String], template: &str) -> Result<()> {
        if self.labels != labels || self.prompt_template != template {
            return Err(Error::InvalidArgument(format!(
                "{} was fitted for labels {:?} with prompt template {:?}, but the server scores \
                 {labels:?} with {template:?}: refit it with `finserve eval --calibrate`, or \
                 remove it",
                path.display(),
                self.labels,
                self.prompt_template
            )));
        }
        Ok(())
    }
}

/// The mean negative log-likelihood of the gold labels at temperature `t`.
fn nll(log_likelihoods: &[Vec<f64>], gold: &[usize], t: f64) -> f64 {
    let total: f64 = log_likelihoods
        .iter()
        .zip(gold)
        .map(|(l, &g)| -softmax(l, t)[g].max(f64::MIN_POSITIVE).ln())
        .sum();
    total / gold.len().max(1) as f64
}

/// Golden-section search of `ln T` over [-5, 5] (T from 0.007 to 148): the NLL of a softmax
/// in its temperature has a single minimum there for any non-degenerate data.
fn fit_temperature(log_likelihoods: &[Vec<f64>], gold: &[usize]) -> f64 {
    let f = |ln_t: f64| nll(log_likelihoods, gold, ln_t.exp());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (-5.0f64, 5.0f64);
    let mut c = b - ratio * (b - a);
    let mut d = a + ratio * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-6 {
        if fc < fd {
            (b, d, fd) = (d, c, fc);
            c = b - ratio * (b - a);
            fc = f(c);
        } else {
            (a, c, fc) = (c, d, fd);
            d = a + ratio * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

/// NLL, ECE (15 equal-width confidence bins) and Brier score at temperature `t`.
pub fn quality(log_likelihoods: &[Vec<f64>], gold: &[usize], t: f64) -> Quality {
    let n = gold.len().max(1) as f64;
    let mut bins = vec![(0usize, 0.0f64, 0.0f64); ECE_BINS];
    let mut brier = 0.0;
    for (l, &g) in log_likelihoods.iter().zip(gold) {
        let p = softmax(l, t);
        let (best, conf) =
            p.iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f64::NEG_INFINITY),
                    |m, (i, v)| if v > m.1 { (i, v) } else { m },
                );
        let bin = ((conf * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        bins[bin].0 += 1;
        bins[bin].1 += conf;
        bins[bin].2 += f64::from(u8::from(best == g));
        brier += p
            .iter()
            .enumerate()
            .map(|(i, &v)| (v - f64::from(u8::from(i == g))).powi(2))
            .sum::<f64>();
    }
    let ece = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(_, conf, correct)| (correct - conf).abs() / n)
        .sum();
    Quality {
        nll: nll(log_likelihoods, gold, t),
        ece,
        brier: brier / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overconfident scores (log-likelihood gaps three times too wide) are fixed by T ≈ 3.
    #[test]
    fn fitting_recovers_the_temperature_of_overconfident_scores() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (mut ll, mut gold) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let true_logits: Vec<f64> = (0..3).map(|_| rng.random_range(-2.0..2.0)).collect();
            let p = softmax(&true_logits, 1.0);
            let u: f64 = rng.random();
            let g = if u < p[0] {
                0
            } else if u < p[0] + p[1] {
                1
            } else {
                2
            };
            ll.push(true_logits.iter().map(|x| 3.0 * x).collect());
            gold.push(g);
        }
        let c = Calibration::fit(&ll, &gold, vec![], String::new(), String::new());
        assert!((c.temperature - 3.0).abs() < 0.3, "{}", c.temperature);
        assert!(c.after.nll < c.before.nll);
        assert!(c.after.ece < c.before.ece);
        assert!(c.after.brier < c.before.brier);
    }

    #[test]
    fn ece_and_brier_of_known_cases() {
        // Two rows, both predicted with 0.75 confidence, one right: ECE |0.5 - 0.75| = 0.25.
        let l = (0.75f64 / 0.25).ln();
        let ll = vec![vec![l, 0.0], vec![l, 0.0]];
        let q = quality(&ll, &[0, 1], 1.0);
        assert!((q.ece - 0.25).abs() < 1e-12, "{q:?}");
        // Brier: row 1 (0.25² + 0.25²), row 2 (0.75² + 0.75²); mean 0.625.
        assert!((q.brier - 0.625).abs() < 1e-12, "{q:?}");
    }
}
