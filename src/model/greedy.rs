//! Exact greedy tokens for a quarter of `lm_head`'s bytes: a decode step is bound by reading `W`
//! (0.5 GB in f32 for mt0-small's 250k-token vocabulary, 0.77 GB for mt0-base's) on few rows,
//! so the logits are first screened with an int8 copy of `W` ([`Int8Linear`], which multiplies
//! at several times f32's rate with AVX-512 VNNI or AMX), and only the tokens the screen cannot
//! rule out are computed again in f32, with the very chain the f32 product uses.
//!
//! Why that is exact: for a row `x` and token `c`, the screen's logit `s_c` and the f32 logit
//! `l_c` differ by at most `b_c` ([`GreedyHead::settle`] spells it out): the rounding of `W_c`
//! and of `x` to int8 (`‖x‖·‖W_c − Ŵ_c‖ + ‖x − x̂‖·‖Ŵ_c‖`, Cauchy–Schwarz, with both residuals
//! measured exactly), the screen's float steps and the f32 chain's own rounding. The f32 argmax
//! `t` has `s_t + b_t ≥ l_t ≥ l_c ≥ s_c − b_c` for every `c`, so it is among the tokens with
//! `s_c + b_c ≥ max(s − b)`; those are recomputed in f32 and the first largest is taken, as
//! `argmax` over all of them would. The log-probability is not known this way (its normaliser
//! needs every logit), so only requests that do not ask for it take this path.

use rayon::prelude::*;

use super::f32_linear::F32Linear;
use super::int8::{self, Int8Linear};
use super::ops;
use super::product::Product;

/// Candidates per row beyond which the screen gives up (the full product is then cheaper).
const MAX_CANDIDATES: usize = 1024;
/// Rows up to which the screen beats the f32 product without int8 dot-product instructions:
/// AVX2 multiplies int8 at about f32's rate, so the screen pays only while reading `W` bounds
/// the step. With AVX-512 VNNI or AMX it pays at any batch (`cargo bench --bench engine --
/// greedy`).
const MAX_ROWS_WITHOUT_DOT_PRODUCTS: usize = 8;

/// `lm_head` with its int8 screen and the per-token terms of the bounds.
#[derive(Debug)]
pub struct GreedyHead {
    exact: std::sync::Arc<F32Linear>,
    screen: Int8Linear,
    /// Per token, rounded up: `‖W_c − Ŵ_c‖ + γ·‖W_c‖` (what multiplies `‖x‖`, `γ` the f32
    /// chain's relative error) and `‖Ŵ_c‖` (what multiplies `x`'s rounding).
    per_x: Vec<f64>,
    per_rounding: Vec<f64>,
    /// The largest of each.
    max_per_x: f64,
    max_per_rounding: f64,
}

/// Relative error of `n` f32 roundings, `γ_n = n·u / (1 − n·u)` with `u = 2⁻²⁴`.
fn gamma(n: usize) -> f64 {
    let m = n as f64 * 2f64.powi(-24);
    m / (1.0 - m)
}

/// The largest f32 at or below `v`.
fn at_or_below(v: f64) -> f32 {
    let near = v as f32;
    if f64::from(near) > v {
        near.next_down()
    } else {
        near
    }
}

/// Rounds a non-negative f64 computed in a few dozen steps up past its own rounding error.
fn up(v: f64) -> f64 {
    v * (1.0 + 2f64.powi(-40))
}

/// The row's factors of [`GreedyHead::bound`].
struct RowBound {
    x_norm: f64,
    on_rounding: f64,
    slack: f64,
}

impl RowBound {
    /// `b_c` from token `c`'s terms, inflated by 2⁻²⁰ for the f64 arithmetic of the bound.
    #[inline(always)]
    fn of(&self, per_x: f64, per_rounding: f64) -> f64 {
        (self.x_norm * per_x + self.on_rounding * per_rounding + self.slack)
            * (1.0 + 2f64.powi(-20))
    }
}

impl GreedyHead {
    /// The screen of `exact`, where this CPU runs the int8 product with vector instructions;
    /// `None` elsewhere.
    pub fn new(exact: std::sync::Arc<F32Linear>) -> Option<Self> {
        if !int8::vectorized() {
            return None;
        }
        let (out, input) = (exact.out(), exact.input());
        let screen = Int8Linear::quantize_with(out, input, |c, row| {
            for (k, v) in row.iter_mut().enumerate() {
                *v = exact.weight(c, k);
            }
        });
        let chain = gamma(input + 1);
        let (per_x, per_rounding) = (0..out)
            .into_par_iter()
            .map(|c| {
                let (mut norm, mut err, mut rounded) = (0f64, 0f64, 0f64);
                for k in 0..input {
                    let (w, r) = (f64::from(exact.weight(c, k)), screen.rounded_weight(c, k));
                    norm += w * w;
                    err += (w - r) * (w - r);
                    rounded += r * r;
                }
                (
                    up(up(err.sqrt()) + chain * up(norm.sqrt())),
                    up(rounded.sqrt()),
                )
            })
            .unzip();
        let largest = |v: &Vec<f64>| v.iter().copied().fold(0.0, f64::max);
        Some(Self {
            exact,
            screen,
            max_per_x: largest(&per_x),
            max_per_rounding: largest(&per_rounding),
            per_x,
            per_rounding,
        })
    }

    /// Whether screening `rows` rows is faster than the f32 product.
    pub fn pays_for(&self, rows: usize) -> bool {
        rows <= MAX_ROWS_WITHOUT_DOT_PRODUCTS || int8::multiplies_fast()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.screen.size_in_bytes() + (self.per_x.len() + self.per_rounding.len()) * 8
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

    /// The bound on `|s_c − l_c|` for row `x`:
    /// `b_c = ‖x‖·(‖W_c − Ŵ_c‖ + γ·‖W_c‖) + (‖x − x̂‖ + ε·‖x̂‖)·‖Ŵ_c‖ + slack`, because
    /// `x·W_c − x̂·Ŵ_c = x·(W_c − Ŵ_c) + (x − x̂)·Ŵ_c`, the f32 chain errs by at most
    /// `γ·‖x‖·‖W_c‖` and the screen's float steps by `ε·‖x̂‖·‖Ŵ_c‖`
    /// ([`Int8Linear::float_error`]); `slack` covers subnormal steps on both sides.
    fn bound(&self, x: &[f32]) -> RowBound {
        let (residual, rounded) = self.screen.rounding_of(x);
        RowBound {
            x_norm: up(x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt()),
            on_rounding: up(residual) + self.screen.float_error() * up(rounded),
            slack: 2.0 * (x.len() + 1) as f64 * int8::UNDERFLOW,
        }
    }

    /// The f32 argmax of one row from its screened logits `s`.
    ///
    /// `floor = s_m − b_m` for the screen's own first argmax `m` is at most `max(s − b)`, so the
    /// tokens with `s_c + b_c ≥ floor` include the f32 argmax; and each of them has
    /// `s_c ≥ floor − max(b)`, a test on `s` alone that leaves only the few whose own `b_c` is
    /// worth reading (the per-token terms are 4 MB: read for every token, they took longer
    /// than the screen's product at 16 rows).
    fn settle(&self, s: &[f32], x: &[f32]) -> Option<u32> {
        let (top, m) = ops::finite_best(s)?;
        let bound = self.bound(x);
        let floor = f64::from(top) - bound.of(self.per_x[m], self.per_rounding[m]);
        let widest = bound.of(self.max_per_x, self.max_per_rounding);
        // Less a margin far wider than the f64 rounding of these few steps.
        let cut = at_or_below(floor - widest - (floor.abs() + widest) * 2f64.powi(-40));
        let candidates: Vec<usize> = s
            .iter()
            .enumerate()
            .filter(|&(c, &v)| {
                v >= cut && f64::from(v) + bound.of(self.per_x[c], self.per_rounding[c]) >= floor
            })
            .map(|(c, _)| c)
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
                "this CPU runs the int8 product only in portable code: the greedy screen is not used here, nothing to test"
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
    fn the_f32_argmax_wins_where_int8_ranks_the_other_way() {
        let (out, input) = (300, 16);
        let mut next = noise(5);
        let mut w: Vec<f32> = (0..out * input).map(|_| next() * 0.01).collect();
        let x = vec![1.0f32; input];
        // In blocks whose largest weight is 1, an int8 step is 1/127: token 5's two weights
        // 0.0039 (0.495 of a step) round to 0, token 9's 0.004 (0.508) to one step. f32 logits
        // 1.0078 and 1.004 rank token 5 first, the screen (about 1 and 1.0079) token 9.
        for (token, extra) in [(5, &[0.0039f32, 0.0039][..]), (9, &[0.004][..])] {
            let row = &mut w[token * input..(token + 1) * input];
            row.fill(0.0);
            row[0] = 1.0;
            row[1..=extra.len()].copy_from_slice(extra);
        }
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
    fn every_screened_logit_is_within_its_bound_of_the_f32_one() {
        let (out, input, rows) = (1000, 200, 5);
        let mut next = noise(11);
        let mut w: Vec<f32> = (0..out * input).map(|_| next()).collect();
        // Outliers coarsen their blocks, a zero block rounds exactly, and token 7 is tiny.
        w[3 * input + 5] = 40.0;
        w[4 * input..4 * input + 128].fill(0.0);
        w[7 * input..8 * input].iter_mut().for_each(|v| *v *= 1e-30);
        let exact = Arc::new(F32Linear::pack(&w, out, input));
        let Some(head) = GreedyHead::new(exact.clone()) else {
            return;
        };
        let mut x: Vec<f32> = (0..rows * input).map(|_| next()).collect();
        x[input + 17] = -300.0;
        x[2 * input..3 * input].iter_mut().for_each(|v| *v *= 1e-20);
        let (screened, full) = (head.screen.matmul(&x, rows), exact.matmul(&x, rows));
        for r in 0..rows {
            let row = &x[r * input..(r + 1) * input];
            let bound = head.bound(row);
            let mut widest = 0f64;
            for c in 0..out {
                let (s, l) = (screened[r * out + c], full[r * out + c]);
                let b = bound.of(head.per_x[c], head.per_rounding[c]);
                let gap = (f64::from(s) - f64::from(l)).abs();
                assert!(gap <= b, "row {r} token {c}: |{s} - {l}| > {b}");
                widest = widest.max(gap / b);
            }
            // The bound is a worst case, but not a vacuous one: it is within 100x of the
            // largest gap it covers.
            assert!(
                widest > 0.01,
                "row {r}: the largest gap is {widest} of its bound"
            );
        }
    }

    #[test]
    fn the_cut_is_the_largest_f32_at_or_below_its_bound() {
        for v in [0.1f64, -0.1, 1.0, 1e-40, -3.4e38, 1e300, -1e300] {
            let c = at_or_below(v);
            assert!(f64::from(c) <= v && f64::from(c.next_up()) > v, "{v}: {c}");
        }
        assert_eq!(
            ops::finite_best(&[1.0, -2.0, 7.5, 3.0, 7.5]),
            Some((7.5, 2))
        );
        assert_eq!(ops::finite_best(&[1.0, f32::INFINITY]), None);
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
