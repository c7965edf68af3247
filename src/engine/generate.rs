//! Token selection and stopping for one generating sequence.
//!
//! The logits pipeline follows transformers' `generate`: repetition penalty on the raw logits,
//! then (when sampling) temperature, top-k and top-p, then a draw from a ChaCha RNG seeded per
//! request, so a given seed always gives the same text. Reported log-probabilities are the
//! model's own (log-softmax of the raw logits), which is what a caller scoring text wants.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Decoding parameters of one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Report each token's log-probability. Without it a greedy step may skip the normaliser
    /// over the whole vocabulary, and with it every logit (see `model::greedy`).
    pub logprobs: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            do_sample: false,
            temperature: None,
            top_k: None,
            top_p: None,
            repetition_penalty: None,
            seed: None,
            stop: Vec::new(),
            logprobs: false,
        }
    }
}

impl GenerateParams {
    /// TGI samples as soon as any sampling parameter is given, even without `do_sample`.
    pub fn sampling(&self) -> bool {
        self.do_sample
            || self.temperature.is_some_and(|t| t != 1.0)
            || self.top_k.is_some()
            || self.top_p.is_some()
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

/// Picks tokens for one sequence.
pub struct Sampler {
    params: GenerateParams,
    rng: Option<ChaCha8Rng>,
    /// The seed actually used when sampling (drawn at random when the request gave none).
    pub seed: Option<u64>,
}

impl Sampler {
    pub fn new(params: GenerateParams) -> Self {
        let seed = params
            .sampling()
            .then(|| params.seed.unwrap_or_else(|| rand::rng().random()));
        Self {
            rng: seed.map(ChaCha8Rng::seed_from_u64),
            seed,
            params,
        }
    }

    pub fn params(&self) -> &GenerateParams {
        &self.params
    }

    /// Greedy without a repetition penalty: the argmax of the raw logits, which the backend can
    /// take on the device without copying the logits.
    pub fn is_plain_greedy(&self) -> bool {
        self.rng.is_none() && self.params.repetition_penalty.is_none()
    }

    /// Plain greedy, and no log-probability asked for: the argmax is all this row needs.
    pub fn needs_only_argmax(&self) -> bool {
        self.is_plain_greedy() && !self.params.logprobs
    }

    /// Chooses the next token from `logits` (raw, f32, full vocabulary) given the decoder tokens so
    /// far (`context`, decoder start included, as transformers penalises). Returns the token and
    /// its model log-probability.
    pub fn next(&mut self, logits: &[f32], context: &[u32]) -> (u32, f32) {
        let log_z = log_sum_exp(logits);
        let mut scores: Vec<f32> = logits.to_vec();
        if let Some(p) = self.params.repetition_penalty.map(|p| p as f32) {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s < 0.0 { *s * p } else { *s / p };
                }
            }
        }
        let token = match self.rng.as_mut() {
            None => argmax(&scores),
            Some(rng) => sample(&scores, &self.params, rng),
        };
        (token, logits[token as usize] - log_z)
    }
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|v| f64::from((v - max).exp())).sum();
    max + sum.ln() as f32
}

/// First index of the maximum, like `torch.argmax`.
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from the (temperature-scaled) distribution restricted to the top-k tokens and then to
/// the top-p nucleus. Only the candidates that can matter are ordered: the top k with
/// `select_nth_unstable`, and for top-p a growing prefix until it holds the nucleus.
///
/// The temperature divides the distance to the best score, not the scores themselves, so a
/// temperature near zero (or a penalty that pushed scores to infinity) turns into greedy
/// decoding instead of infinities and NaN weights.
fn sample(scores: &[f32], p: &GenerateParams, rng: &mut ChaCha8Rng) -> u32 {
    let v = scores.len();
    let k = p.top_k.map_or(v, |k| k.clamp(1, v));
    let desc = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]);
    let mut order: Vec<usize> = (0..v).collect();
    if k < v {
        order.select_nth_unstable_by(k - 1, desc);
        order.truncate(k);
    }
    let max = order
        .iter()
        .map(|&i| scores[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let t = p.temperature.unwrap_or(1.0);
    let weight = |i: usize| {
        if scores[i] == max {
            1.0
        } else {
            (f64::from(scores[i] - max) / t).exp()
        }
    };
    let keep = match p.top_p {
        None => order.len(),
        Some(top_p) => {
            let total: f64 = order.iter().map(|&i| weight(i)).sum();
            // Sort a prefix large enough to hold the nucleus, doubling it until it does.
            let mut sorted = 64.min(order.len());
            loop {
                if sorted < order.len() {
                    order.select_nth_unstable_by(sorted - 1, desc);
                }
                order[..sorted].sort_by(desc);
                let mut cum = 0.0;
                let found = order[..sorted].iter().position(|&i| {
                    cum += weight(i) / total;
                    cum >= top_p
                });
                match found {
                    Some(n) => break n + 1,
                    None if sorted == order.len() => break sorted,
                    None => sorted = (sorted * 2).min(order.len()),
                }
            }
        }
    };
    let weights: Vec<f64> = order[..keep].iter().map(|&i| weight(i)).collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (n, w) in weights.iter().enumerate() {
        if draw < *w {
            return order[n] as u32;
        }
        draw -= w;
    }
    order[keep - 1] as u32
}

/// Whether a stop sequence ends within the last `new_bytes` bytes of `text`: only the tail
/// where a match can newly appear is searched, so checking every token stays linear.
pub fn stop_hit(text: &str, new_bytes: usize, stops: &[String]) -> bool {
    stops.iter().any(|s| {
        let mut from = text.len().saturating_sub(new_bytes + s.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        text[from..].contains(s.as_str())
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_reports_model_logprob() {
        let mut s = Sampler::new(GenerateParams::default());
        let (t, lp) = s.next(&[0.0, 2.0, 1.0], &[0]);
        assert_eq!(t, 1);
        let expected = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp - expected).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let params = GenerateParams {
            repetition_penalty: Some(2.0),
            ..Default::default()
        };
        let mut s = Sampler::new(params);
        // token 1 (seen, 3.0 -> 1.5) loses to token 2 (2.0).
        assert_eq!(s.next(&[0.0, 3.0, 2.0], &[1]).0, 2);
    }

    #[test]
    fn sampling_is_reproducible_by_seed_and_respects_top_k() {
        let params = GenerateParams {
            do_sample: true,
            seed: Some(7),
            top_k: Some(2),
            ..Default::default()
        };
        let logits = [1.0, 1.1, 0.9, 5.0, 4.9];
        let run = || {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.next(&logits, &[]).0).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().all(|t| *t == 3 || *t == 4));
        assert!(a.contains(&3) && a.contains(&4));
    }

    #[test]
    fn extreme_temperatures_and_penalties_stay_finite() {
        let logits = [1.0, 3.0, 2.0, 3.0];
        for (temperature, penalty) in [(5e-324, None), (1e-30, Some(5e-324)), (1e300, None)] {
            let mut s = Sampler::new(GenerateParams {
                do_sample: true,
                seed: Some(1),
                temperature: Some(temperature),
                repetition_penalty: penalty,
                top_p: Some(0.5),
                ..Default::default()
            });
            for _ in 0..20 {
                let (t, lp) = s.next(&logits, &[1]);
                assert!(
                    (t as usize) < logits.len() && lp.is_finite(),
                    "{temperature} {t} {lp}"
                );
            }
        }
        // A vanishing temperature is greedy over the best scores (ties: either one).
        let mut s = Sampler::new(GenerateParams {
            temperature: Some(1e-300),
            seed: Some(3),
            ..Default::default()
        });
        assert!((0..20).all(|_| matches!(s.next(&logits, &[]).0, 1 | 3)));
    }

    #[test]
    fn stop_sequences_are_found_in_the_new_tail_only() {
        let stops = vec!["ab".to_string(), "é!".to_string()];
        assert!(stop_hit("xxab", 1, &stops));
        assert!(stop_hit("çaé!", 1, &stops));
        assert!(!stop_hit("abxxxx", 2, &stops));
        assert!(!stop_hit("", 0, &stops));
    }
}
