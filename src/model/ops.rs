//! Element-wise and vocabulary-wide work that candle's CPU backend does one scalar libm call at a
//! time, done here in parallel with a vectorizable `exp`:
//! - what the engine needs from a `(rows, vocab)` block of logits, without materialising anything
//!   vocabulary-wide a second time: per row the maximum, its first index and `log Σ exp`, and the
//!   values at a few `(row, token)` positions. The logits are read in place in either layout the
//!   model produces: row-major, or the transpose of a row-major `(vocab, rows)` block, which is what
//!   `lm_head` computed as `W·xᵀ` yields (re-laying out 250k-wide logits costs more than the matmul
//!   that made them);
//! - the tanh-approximated GELU of the feed-forward layers.
//!
//! Other devices (and layouts) use candle's own ops.

use candle_core::{CpuStorage, D, Device, Storage, Tensor};
use rayon::prelude::*;

/// Per-row statistics of a `(rows, vocab)` logits tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    pub max: Vec<f32>,
    /// First index of the maximum, like `torch.argmax`.
    pub argmax: Vec<u32>,
    /// `log Σ exp(logits)`: a token's log-probability is its logit minus this. Computed on
    /// request (see [`row_stats`]).
    pub log_z: Option<Vec<f32>>,
}

/// How a CPU `(rows, vocab)` f32 tensor lies in its buffer.
enum Lay {
    /// `data[offset + row * vocab + col]`
    RowMajor,
    /// `data[offset + col * rows + row]`
    ColMajor,
}

/// Runs `f` on the f32 buffer of a CPU 2-D tensor laid out either way; `None` otherwise.
fn with_cpu_data<T>(
    logits: &Tensor,
    f: impl FnOnce(&[f32], Lay, usize, usize) -> T,
) -> candle_core::Result<Option<T>> {
    let (rows, vocab) = logits.dims2()?;
    if !matches!(logits.device(), Device::Cpu) {
        return Ok(None);
    }
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Ok(None);
    };
    let data = &data[layout.start_offset()..];
    let lay = match layout.stride() {
        [s, 1] if *s == vocab => Lay::RowMajor,
        [1, s] if *s == rows => Lay::ColMajor,
        _ => return Ok(None),
    };
    Ok(Some(f(data, lay, rows, vocab)))
}

/// Max, argmax and, with `with_log_z` (or off the CPU), `log Σ exp` of every row. Without it a
/// row holding a NaN or an infinity gets a NaN maximum, so non-finite logits still show.
pub fn row_stats(logits: &Tensor, with_log_z: bool) -> candle_core::Result<RowStats> {
    if let Some(stats) = with_cpu_data(logits, |data, lay, rows, vocab| {
        let (max, log_z) = if with_log_z {
            let (max, log_z) = cpu_max_log_z(data, &lay, rows, vocab);
            (max, Some(log_z))
        } else {
            (cpu_max_or_nan(data, &lay, rows, vocab), None)
        };
        let argmax = cpu_first_index_of(data, &lay, rows, vocab, &max);
        RowStats { max, argmax, log_z }
    })? {
        return Ok(stats);
    }
    let logits = logits.contiguous()?;
    let max = logits.max_keepdim(D::Minus1)?;
    Ok(RowStats {
        argmax: logits.argmax(D::Minus1)?.to_vec1()?,
        log_z: Some(generic_log_z(&logits, &max)?),
        max: max.squeeze(D::Minus1)?.to_vec1()?,
    })
}

/// `log Σ exp` of every row: the normaliser of its log-softmax.
pub fn log_z(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    if let Some(log_z) = with_cpu_data(logits, |data, lay, rows, vocab| {
        cpu_max_log_z(data, &lay, rows, vocab).1
    })? {
        return Ok(log_z);
    }
    let logits = logits.contiguous()?;
    generic_log_z(&logits, &logits.max_keepdim(D::Minus1)?)
}

fn generic_log_z(logits: &Tensor, max: &Tensor) -> candle_core::Result<Vec<f32>> {
    logits
        .broadcast_sub(max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(max)?
        .squeeze(D::Minus1)?
        .to_vec1()
}

/// Vocabulary entries per parallel block of a column-major buffer.
const BLOCK: usize = 4096;

/// The larger of two values, as a select that vectorizes (no NaN handling needed here).
fn bigger(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

/// Folds `row` into 16 independent accumulators (element `i` into lane `i % 16`), which the
/// compiler turns into vector operations: a single running float accumulator cannot be
/// vectorized without reordering the sum.
fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 16] {
    let mut acc = [init; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in chunks.by_ref() {
        acc.iter_mut().zip(chunk).for_each(|(a, &x)| *a = f(*a, x));
    }
    acc.iter_mut()
        .zip(chunks.remainder())
        .for_each(|(a, &x)| *a = f(*a, x));
    acc
}

fn merge(f: fn(f32, f32) -> f32) -> impl Fn(Vec<f32>, Vec<f32>) -> Vec<f32> {
    move |mut a, b| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x = f(*x, y));
        a
    }
}

/// Per-row fold of `f` from `init` over every value, in either layout, vectorizable.
fn cpu_fold(
    data: &[f32],
    lay: &Lay,
    rows: usize,
    vocab: usize,
    init: f32,
    f: fn(f32, f32) -> f32,
) -> Vec<f32> {
    let data = &data[..rows * vocab];
    match lay {
        Lay::RowMajor => data
            .par_chunks(vocab)
            .map(|row| lanes(row, init, f).into_iter().fold(init, f))
            .collect(),
        Lay::ColMajor => data
            .par_chunks(BLOCK * rows)
            .map(|chunk| {
                let mut acc = vec![init; rows];
                for entry in chunk.chunks_exact(rows) {
                    acc.iter_mut().zip(entry).for_each(|(a, &x)| *a = f(*a, x));
                }
                acc
            })
            .reduce(|| vec![init; rows], merge(f)),
    }
}

/// Per-row maximum, NaN where a row holds a NaN or an infinity (`x·0` is NaN only for those):
/// the check `log Σ exp` makes for free, without its exponentials.
fn cpu_max_or_nan(data: &[f32], lay: &Lay, rows: usize, vocab: usize) -> Vec<f32> {
    let poison = cpu_fold(data, lay, rows, vocab, 0.0, |s, x| s + x * 0.0);
    let max = cpu_fold(data, lay, rows, vocab, f32::NEG_INFINITY, bigger);
    max.into_iter().zip(poison).map(|(m, p)| m + p).collect()
}

/// Per-row maximum and `log Σ exp`, in two passes that vectorize (no branches, no indexing).
fn cpu_max_log_z(data: &[f32], lay: &Lay, rows: usize, vocab: usize) -> (Vec<f32>, Vec<f32>) {
    let max = cpu_fold(data, lay, rows, vocab, f32::NEG_INFINITY, bigger);
    let data = &data[..rows * vocab];
    match lay {
        Lay::RowMajor => data
            .par_chunks(vocab)
            .zip(max)
            .map(|(row, max)| {
                let sum: f32 = lanes(row, 0.0, |s, x| s + exp(x - max)).iter().sum();
                (max, max + sum.ln())
            })
            .unzip(),
        Lay::ColMajor => {
            let sum = data
                .par_chunks(BLOCK * rows)
                .map(|chunk| {
                    let mut s = vec![0f32; rows];
                    for entry in chunk.chunks_exact(rows) {
                        s.iter_mut()
                            .zip(entry)
                            .zip(&max)
                            .for_each(|((s, &x), &m)| *s += exp(x - m));
                    }
                    s
                })
                .reduce(|| vec![0f32; rows], merge(|a, b| a + b));
            let log_z = max.iter().zip(sum).map(|(m, s)| m + s.ln()).collect();
            (max, log_z)
        }
    }
}

/// Per row, the first index holding that row's `max`. A row of NaNs has none and gets 0; its
/// log-probability is NaN too, which the engine refuses (`engine::backend::choose`).
fn cpu_first_index_of(data: &[f32], lay: &Lay, rows: usize, vocab: usize, max: &[f32]) -> Vec<u32> {
    let data = &data[..rows * vocab];
    match lay {
        Lay::RowMajor => data
            .par_chunks(vocab)
            .zip(max)
            .map(|(row, &m)| row.iter().position(|&x| x == m).unwrap_or(0) as u32)
            .collect(),
        Lay::ColMajor => {
            let mut found = vec![u32::MAX; rows];
            for (j, entry) in data.chunks_exact(rows).enumerate() {
                for ((f, &x), &m) in found.iter_mut().zip(entry).zip(max) {
                    if x == m && *f == u32::MAX {
                        *f = j as u32;
                    }
                }
            }
            found
                .into_iter()
                .map(|f| if f == u32::MAX { 0 } else { f })
                .collect()
        }
    }
}

/// The logits at `(row, token)` positions.
pub fn pick(logits: &Tensor, at: &[(usize, u32)]) -> candle_core::Result<Vec<f32>> {
    let read = |data: &[f32], lay: Lay, rows: usize, vocab: usize| {
        at.iter()
            .map(|&(r, t)| match lay {
                Lay::RowMajor => data[r * vocab + t as usize],
                Lay::ColMajor => data[t as usize * rows + r],
            })
            .collect()
    };
    if let Some(values) = with_cpu_data(logits, read)? {
        return Ok(values);
    }
    let vocab = logits.dim(1)?;
    let flat: Vec<u32> = at.iter().map(|&(r, t)| (r * vocab) as u32 + t).collect();
    let n = flat.len();
    logits
        .contiguous()?
        .flatten_all()?
        .index_select(&Tensor::from_vec(flat, n, logits.device())?, 0)?
        .to_vec1()
}

/// `exp(x)` to within a few ulps, written so that loops over it vectorize: range reduction to
/// `x = k·ln2 + r` with `|r| <= ln2/2`, a degree-6 Taylor polynomial for `e^r` (relative error
/// below 2e-7), and `2^k` put straight into the exponent bits. Inputs below -87 give `e^-87`
/// (≈1.6e-38) instead of a denormal: nothing here sums numbers that small against anything.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low bits of the sum's
    // bit pattern; reading it from there keeps the loop vectorized (`k as i32` saturates, and
    // that check is done one lane at a time).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(k.wrapping_add(127) << 23)
}

/// transformers' `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    let width = x.dim(D::Minus1)?;
    match map_rows(x, width, |row, out| {
        out.iter_mut().zip(row).for_each(|(o, &x)| *o = gelu(x))
    })? {
        Some(out) => Ok(out),
        None => x.gelu(),
    }
}

/// The gated `gelu_new` of a stacked `wi_0 ‖ wi_1` projection `(.., 2·d_ff)`:
/// `gelu_new(first half) · second half`, `(.., d_ff)`.
pub fn gated_gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    let d_ff = x.dim(D::Minus1)? / 2;
    match map_rows(x, d_ff, |row, out| {
        let (gate, up) = row.split_at(d_ff);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = gelu(g) * u;
        }
    })? {
        Some(out) => Ok(out),
        None => x.narrow(D::Minus1, 0, d_ff)?.gelu()? * x.narrow(D::Minus1, d_ff, d_ff)?,
    }
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    // 0.5·(1 + tanh(y)) = 1 - 1 / (e^(2y) + 1)
    x * (1.0 - 1.0 / (exp(2.0 * y) + 1.0))
}

/// Applies `f(input row, output row)` to every row of a contiguous CPU f32 tensor in parallel,
/// the output rows `out_width` wide; `None` for other tensors.
fn map_rows(
    x: &Tensor,
    out_width: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> candle_core::Result<Option<Tensor>> {
    let width = x.dim(D::Minus1)?;
    let out = {
        let (storage, layout) = x.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => {
                let rows = (end - start) / width.max(1);
                let mut out = vec![0f32; rows * out_width];
                // Blocks of whole rows, about 64k values each, spread over the threads.
                let per_block = (65536 / width.max(1)).max(1);
                out.par_chunks_mut(per_block * out_width)
                    .zip(data[start..end].par_chunks(per_block * width))
                    .for_each(|(o, i)| {
                        for (o, i) in o.chunks_mut(out_width).zip(i.chunks(width)) {
                            f(i, o);
                        }
                    });
                Some(out)
            }
            _ => None,
        }
    };
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_width;
    }
    out.map(|o| Tensor::from_vec(o, dims, x.device()))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_gelu_match_the_library_functions() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-7 * want,
                "exp({x}) = {got}, libm {want}"
            );
        }
        let x = Tensor::arange(-2000i64, 2000, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .affine(0.005, 0.0)
            .unwrap();
        let fast: Vec<f32> = gelu_tanh(&x).unwrap().to_vec1().unwrap();
        let candle: Vec<f32> = x.gelu().unwrap().to_vec1().unwrap();
        for (a, b) in fast.iter().zip(&candle) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let stacked = x.reshape((20, 200)).unwrap();
        let gated: Vec<f32> = gated_gelu_tanh(&stacked)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (stacked.narrow(1, 0, 100).unwrap().gelu().unwrap()
            * stacked.narrow(1, 100, 100).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        assert_eq!(gated.len(), 2000);
        for (a, b) in gated.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Both CPU layouts and the generic path agree with the definitions.
    #[test]
    fn stats_and_picks_follow_the_definitions_in_every_layout() {
        let rows = [[1f32, 3., 2., 3.], [-1000., 0., 1000., 5.]];
        let row_major = Tensor::new(&rows, &Device::Cpu).unwrap();
        let col_major = row_major.t().unwrap().contiguous().unwrap().t().unwrap();
        let strided = Tensor::new(
            &[[1f32, 3., 2., 3., 9.], [-1000., 0., 1000., 5., 9.]],
            &Device::Cpu,
        )
        .unwrap()
        .narrow(1, 0, 4)
        .unwrap();
        let lse0 = (1f64.exp() + 2. * 3f64.exp() + 2f64.exp()).ln() as f32;
        for t in [&row_major, &col_major, &strided] {
            let s = row_stats(t, true).unwrap();
            assert_eq!(s.argmax, [1, 2], "first index of the maximum");
            assert_eq!(s.max, [3.0, 1000.0]);
            let log_z = s.log_z.unwrap();
            assert!((log_z[0] - lse0).abs() < 1e-6);
            assert!((log_z[1] - 1000.0).abs() < 1e-3);
            // The CPU layouts skip the normaliser on request; the generic path computes it.
            let s = row_stats(t, false).unwrap();
            assert_eq!((s.argmax, s.max), (vec![1, 2], vec![3.0, 1000.0]));
            assert_eq!(s.log_z.is_none(), !std::ptr::eq(t, &strided));
            assert_eq!(
                pick(t, &[(0, 2), (1, 3), (1, 0)]).unwrap(),
                [2.0, 5.0, -1000.0]
            );
        }
    }

    /// Without `log Σ exp`, a NaN or an infinity anywhere in a row still makes it non-finite.
    #[test]
    fn a_non_finite_logit_shows_without_the_normaliser() {
        let rows = [[1f32, f32::NAN, 2.], [f32::INFINITY, 0., 1.], [0.5, 2., 1.]];
        let row_major = Tensor::new(&rows, &Device::Cpu).unwrap();
        let col_major = row_major.t().unwrap().contiguous().unwrap().t().unwrap();
        for t in [&row_major, &col_major] {
            let s = row_stats(t, false).unwrap();
            assert!(s.max[0].is_nan() && s.max[1].is_nan(), "{:?}", s.max);
            assert_eq!((s.max[2], s.argmax[2]), (2.0, 1));
        }
    }
}
