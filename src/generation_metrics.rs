//! The overlap metrics of generated text against references, computed as the Python packages
//! that LoRA recipes report them compute them, so that numbers can be compared across tools:
//! ROUGE-L F1 as `rouge-score` (`RougeScorer(["rougeL"])`, no stemmer) and corpus BLEU as
//! `sacrebleu` (`corpus_bleu` defaults: the `13a` tokeniser, case-sensitive, exponential
//! smoothing, n-grams up to 4, one reference per output).
//!
//! `rouge-score` lowercases and keeps only the ASCII letters and digits, so a text in another
//! script has few or no tokens: ROUGE-L undercounts (or is 0 for) such texts.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

/// Python's `str.isspace`: Unicode White_Space plus the separators U+001C to U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()`.
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// `rouge-score`'s tokens: lowercased, runs of anything but `a-z0-9` as separators.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The length of the longest common subsequence of `a` and `b`.
fn lcs<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y {
                diagonal + 1
            } else {
                above.max(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// ROUGE-L F1 of `prediction` against `reference` (0 when either has no token).
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let common = lcs(&r, &p) as f64;
    let precision = common / p.len() as f64;
    let recall = common / r.len() as f64;
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// The `13a` tokeniser's rules (mteval-v13a), applied in order.
static RULES_13A: LazyLock<[(Regex, &'static str); 4]> = LazyLock::new(|| {
    let rule = |re: &str, to| (Regex::new(re).expect("a fixed, valid pattern"), to);
    [
        // Punctuation and symbols: `{` to `~`, `[` to backquote, space to `&`, `(` to `+`,
        // `:` to `@`, and `/`.
        rule(r"([{-~\[-` -&(-+:-@/])", " ${1} "),
        // A period or comma unless preceded by a digit, then unless followed by one.
        rule(r"([^0-9])([.,])", "${1} ${2} "),
        rule(r"([.,])([^0-9])", " ${1} ${2}"),
        // A dash after a digit.
        rule(r"([0-9])(-)", "${1} ${2} "),
    ]
});

/// `sacrebleu`'s `13a` tokens of one segment (right-stripped first, as sacrebleu does).
fn tokens_13a(segment: &str) -> Vec<String> {
    let mut line = segment
        .trim_end_matches(is_py_space)
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut line = format!(" {line} ");
    for (re, to) in RULES_13A.iter() {
        line = re.replace_all(&line, *to).into_owned();
    }
    py_split(&line).map(str::to_string).collect()
}

const MAX_ORDER: usize = 4;

/// The n-grams (orders 1 to 4) of `tokens`, counted.
fn ngrams(tokens: &[String]) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU (0 to 100) of `predictions` against one reference each.
pub fn corpus_bleu(predictions: &[&str], references: &[&str]) -> f64 {
    let (mut correct, mut total) = ([0usize; MAX_ORDER], [0usize; MAX_ORDER]);
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (prediction, reference) in predictions.iter().zip(references) {
        let (hyp, reference) = (tokens_13a(prediction), tokens_13a(reference));
        sys_len += hyp.len();
        ref_len += reference.len();
        let reference = ngrams(&reference);
        for (gram, count) in ngrams(&hyp) {
            total[gram.len() - 1] += count;
            correct[gram.len() - 1] += count.min(reference.get(gram).copied().unwrap_or(0));
        }
    }
    let brevity = if sys_len >= ref_len {
        1.0
    } else if sys_len > 0 {
        (1.0 - ref_len as f64 / sys_len as f64).exp()
    } else {
        0.0
    };
    if correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    // Exponential smoothing: the k-th order with no match counts as 1 / 2^k matches. Orders
    // the outputs are too short to have count as precision 0, which makes BLEU 0.
    let mut precisions = [0.0f64; MAX_ORDER];
    let mut smoothing = 1.0;
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smoothing *= 2.0;
            100.0 / (smoothing * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    if precisions.contains(&0.0) {
        return 0.0;
    }
    brevity * (precisions.iter().map(|p| p.ln()).sum::<f64>() / MAX_ORDER as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_13a_tokeniser_splits_punctuation_but_not_numbers() {
        assert_eq!(
            tokens_13a("Profit rose 3.5% to EUR 1,200 (est.), 2007-2008."),
            [
                "Profit", "rose", "3.5", "%", "to", "EUR", "1,200", "(", "est", ".", ")", ",",
                "2007", "-", "2008", "."
            ]
        );
    }

    #[test]
    fn rouge_keeps_only_ascii_letters_and_digits() {
        assert_eq!(
            rouge_tokens("Zürich's Q3: up 5%"),
            ["z", "rich", "s", "q3", "up", "5"]
        );
        assert_eq!(rouge_l("日本語", "日本語"), 0.0);
    }
}
