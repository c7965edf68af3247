//! Exact greedy tokens for half of `lm_head`'s bytes: a decode step is bound by reading `W`
//! (0.5 GB in f32 for mt0-small's 250k-token vocabulary) on few rows and by multiplying on many,
//! so the logits are first screened with a bf16 copy of `W` ([`Bf16Linear`]: on AMX-BF16 tiles
//! half the bytes and many times f32's multiply rate, elsewhere half the bytes), and only the
//! tokens the screen cannot rule out are computed again in f32, with the very chain the f32
//! product uses.
//!
//! Why that is exact: for a row `x` and token `c`, the screen's logit `s_c` and the f32 logit
//! `l_c` differ by at most `b_c = C·‖x‖·‖W_c‖` (bf16 rounding of `x` and `W_c`, f32 summation on
//! both sides, Cauchy–Schwarz; [`bound_factor`] derives `C`). The f32 argmax `t` has
//! `s_t + b_t ≥ l_t ≥ l_c ≥ s_c − b_c` for every `c`, so it is among the tokens with
//! `s_c + b_c ≥ max(s − b)`; those are recomputed in f32 and the first largest is taken, as
//! `argmax` over all of them would. The log-probability is not known this way (its normaliser
//! needs every logit), so only requests that do not ask for it take this path.

use rayon::prelude::*;

use super::bf16_linear::{self, Bf16Linear};
use super::f32_linear::F32Linear;
use super::product::Product;

/// Candidates per row beyond which the screen gives up (the full product is then cheaper).
const MAX_CANDIDATES: usize = 1024;
/// Rows up to which the screen beats the f32 product without AMX tiles (`cargo bench --bench
/// engine -- greedy`): `vdpbf16ps` multiplies at about half f32's rate on the CPUs measured, and
/// AVX2 (widening bf16 to f32) at f32's rate with extra work, so it pays only while reading `W`
/// dominates. On AMX-BF16 tiles it reads at the memory's pace at any batch (2x at 1 to 64 rows).
const MAX_ROWS_WITHOUT_TILES: usize = 8;

/// `lm_head` with its bf16 screen and the row norms the bounds need.
#[derive(Debug)]
pub struct GreedyHead {
    exact: std::sync::Arc<F32Linear>,
    screen: Bf16Linear,
    /// `‖W_c‖₂` per token, rounded up.
    norms: Vec<f64>,
    factor: f64,
}

/// `C` of the bound `|s_c − l_c| ≤ C·‖x‖·‖W_c‖` for `n` inputs. Per product, rounding `x` and
/// `W` to bf16 (to nearest, unit roundoff `u = 2⁻⁸`) errs by at most `(2u + u²)|x_k W_ck|`; summing
/// `n` products in f32 errs by at most `γ = n·2⁻²⁴ / (1 − n·2⁻²⁴)` times the sum of their
/// magnitudes, once for the screen (whose products are at most `(1 + u)²` times larger) and
/// once for the f32 chain; `Σ|x_k W_ck| ≤ ‖x‖·‖W_c‖`. Inflated by 2⁻²⁰ for the f64 arithmetic
/// of the bound itself.
fn bound_factor(n: usize) -> f64 {
    let u = 2f64.powi(-8);
    let m = (n + 1) as f64 * 2f64.powi(-24);
    let gamma = m / (1.0 - m);
    (2.0 * u + u * u + gamma * ((1.0 + u).powi(2) + 1.0)) * (1.0 + 2f64.powi(-20))
}

/// Absolute slack, per product and partial sum, for values the bf16 product flushes to zero
/// (below 2⁻¹²⁶), generously.
const FLUSH: f64 = 1.0 / (1u128 << 120) as f64;

impl GreedyHead {
    /// The screen of `exact`, where this CPU runs the bf16 product; `None` elsewhere.
    pub fn new(exact: std::sync::Arc<F32Linear>) -> Option<Self> {
        if !bf16_linear::screens() {
            return None;
        }
        let (out, input) = (exact.out(), exact.input());
        let screen = Bf16Linear::pack_with(out, input, |c, k| exact.weight(c, k));
        let norms = (0..out)
            .into_par_iter()
            .map(|c| {
                let sq: f64 = (0..input)
                    .map(|k| f64::from(exact.weight(c, k)).powi(2))
                    .sum();
                sq.sqrt() * (1.0 + 2f64.powi(-40))
            })
            .collect();
        Some(Self {
            factor: bound_factor(input),
            exact,
            screen,
            norms,
        })
    }

    /// Whether screening `rows` rows is faster than the f32 product.
    pub fn pays_for(&self, rows: usize) -> bool {
        rows <= MAX_ROWS_WITHOUT_TILES || self.screen.has_tiles()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.screen.size_in_bytes() + self.norms.len() * 8
    }

    /// Per row of `x` (`rows × input`), the first index of the largest f32 logit, exactly as
    /// the full product and `argmax` give it; `None` if some row cannot be settled this way
    /// (non-finite values, or more than [`MAX_CANDIDATES`] tokens within the bounds).
    pub fn argmax(&self, x: &[f32], rows: usize) -> Option<Vec<u32>> {
        let input = self.exact.input();
        if x.len() != rows * input || x.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let screened = self.screen.matmul(x, rows);
        let out = self.exact.out();
        screened
            .par_chunks(out)
            .zip(x.par_chunks(input))
            .map(|(s, x)| self.settle(s, x))
            .collect()
    }

    /// The f32 argmax of one row from its screened logits `s`.
    fn settle(&self, s: &[f32], x: &[f32]) -> Option<u32> {
        if s.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let x_norm =
            x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt() * (1.0 + 2f64.powi(-40));
        // `b_c = C·‖x‖·‖W_c‖` plus the flush slack `(n + 1)·FLUSH·(1 + ‖x‖ + ‖W_c‖)`.
        let slack = (x.len() + 1) as f64 * FLUSH;
        let (per_norm, fixed) = (self.factor * x_norm + slack, slack * (1.0 + x_norm));
        let bound = |c: usize| per_norm * self.norms[c] + fixed;
        // `max(s − b)` in 8 independent lanes, which the compiler vectorizes.
        let mut lanes = [f64::NEG_INFINITY; 8];
        for (s, n) in s.chunks(8).zip(self.norms.chunks(8)) {
            for ((lane, &v), &n) in lanes.iter_mut().zip(s).zip(n) {
                let low = f64::from(v) - (per_norm * n + fixed);
                *lane = if low > *lane { low } else { *lane };
            }
        }
        let floor = lanes.into_iter().fold(f64::NEG_INFINITY, f64::max);
        let candidates: Vec<usize> = (0..s.len())
            .filter(|&c| f64::from(s[c]) + bound(c) >= floor)
            .take(MAX_CANDIDATES + 1)
            .collect();
        if candidates.len() > MAX_CANDIDATES {
            return None;
        }
        let mut best: Option<(usize, f32)> = None;
        for c in candidates {
            let l = self.exact.output(c, x);
            if !l.is_finite() {
                return None;
            }
            if best.is_none_or(|(_, b)| l > b) {
                best = Some((c, l));
            }
        }
        best.map(|(c, _)| c as u32)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A deterministic pseudo-random stream in [-1, 1).
    fn noise(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    fn first_argmax(row: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn screened_argmax_equals_the_full_products() {
        let (out, input, rows) = (3001, 96, 7);
        let mut next = noise(7);
        let mut w: Vec<f32> = (0..out * input).map(|_| next()).collect();
        // Exact ties: token 2000 repeats token 1000's weights, so the first must win whenever
        // it is the largest; a few slightly smaller near-copies make candidates the screen cannot
        // split.
        w.copy_within(1000 * input..1001 * input, 2000 * input);
        for c in 2001..2011 {
            w.copy_within(1000 * input..1001 * input, c * input);
            let k = c % input;
            w[c * input + k] -= 1e-6 * w[1000 * input + k].signum();
        }
        let exact = Arc::new(F32Linear::pack(&w, out, input));
        let Some(head) = GreedyHead::new(exact.clone()) else {
            eprintln!(
                "this CPU runs no bf16 product: the greedy screen is not used here, nothing to test"
            );
            return;
        };
        let mut x: Vec<f32> = (0..rows * input).map(|_| next() * 3.0).collect();
        // Rows 0 and 1 point at token 1000 (and so at its copies), row 2 is nearly all zeros.
        x[..input].copy_from_slice(&w[1000 * input..1001 * input]);
        for (k, v) in x[input..2 * input].iter_mut().enumerate() {
            *v = w[1000 * input + k] * 0.5 + *v * 0.01;
        }
        x[2 * input..3 * input].iter_mut().for_each(|v| *v *= 1e-3);
        let full = exact.matmul(&x, rows);
        let expected: Vec<u32> = full.chunks(out).map(first_argmax).collect();
        assert_eq!(
            expected[0], 1000,
            "the test's tie must be the largest logit of row 0"
        );
        assert_eq!(head.argmax(&x, rows), Some(expected));
    }

    #[test]
    fn the_f32_argmax_wins_where_bf16_ranks_the_other_way() {
        let (out, input) = (300, 16);
        let mut next = noise(5);
        let mut w: Vec<f32> = (0..out * input).map(|_| next() * 0.01).collect();
        let x = vec![1.0f32; input];
        // Token 5: four weights 1 + 2⁻¹⁰, which bf16 rounds to 1 (f32 logit 4 + 2⁻⁸); token 9:
        // four ones and 2⁻¹², exact in bf16 (logit 4 + 2⁻¹²). bf16 ranks 9 first, f32 ranks 5.
        for (token, values) in [(5, [1.0 + 2f32.powi(-10); 4]), (9, [1.0; 4])] {
            let row = &mut w[token * input..(token + 1) * input];
            row.fill(0.0);
            row[..4].copy_from_slice(&values);
        }
        w[9 * input + 4] = 2f32.powi(-12);
        let exact = Arc::new(F32Linear::pack(&w, out, input));
        let Some(head) = GreedyHead::new(exact.clone()) else {
            return;
        };
        let screened = head.screen.matmul(&x, 1);
        assert_eq!(
            first_argmax(&screened),
            9,
            "the screen alone must get this wrong"
        );
        assert_eq!(first_argmax(&exact.matmul(&x, 1)), 5);
        assert_eq!(head.argmax(&x, 1), Some(vec![5]));
    }

    #[test]
    fn what_the_screen_cannot_settle_is_left_to_the_full_product() {
        let (out, input) = (2048, 32);
        let mut next = noise(3);
        let w: Vec<f32> = (0..out * input).map(|_| next()).collect();
        let Some(head) = GreedyHead::new(Arc::new(F32Linear::pack(&w, out, input))) else {
            return;
        };
        // A zero row ties every token; a NaN has no argmax.
        assert_eq!(head.argmax(&vec![0.0; input], 1), None);
        let mut x: Vec<f32> = (0..input).map(|_| next()).collect();
        x[3] = f32::NAN;
        assert_eq!(head.argmax(&x, 1), None);
    }
}
