//! How well predicted labels match gold ones: accuracy, per-class precision / recall / F1 (as
//! scikit-learn defines them), macro-F1 and the confusion matrix, for `eval`, entity `eval` and
//! the per-epoch scores of `train`.

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
