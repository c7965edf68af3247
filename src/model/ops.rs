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
    /// `log Σ exp(logits)`: a token's log-probability is its logit minus this.
    pub log_z: Vec<f32>,
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

/// Max, argmax and `log Σ exp` of every row.
pub fn row_stats(logits: &Tensor) -> candle_core::Result<RowStats> {
    if let Some(stats) = with_cpu_data(logits, cpu_row_stats)? {
        return Ok(stats);
    }
    let logits = logits.contiguous()?;
    let max = logits.max_keepdim(D::Minus1)?;
    let log_z = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    Ok(RowStats {
        max: max.squeeze(D::Minus1)?.to_vec1()?,
        argmax: logits.argmax(D::Minus1)?.to_vec1()?,
        log_z: log_z.squeeze(D::Minus1)?.to_vec1()?,
    })
}

fn cpu_row_stats(data: &[f32], lay: Lay, rows: usize, vocab: usize) -> RowStats {
    match lay {
        Lay::RowMajor => {
            let per_row: Vec<(f32, u32, f32)> = data[..rows * vocab]
                .par_chunks(vocab)
                .map(|row| {
                    let (mut max, mut arg) = (f32::NEG_INFINITY, 0);
                    for (i, &x) in row.iter().enumerate() {
                        if x > max {
                            (max, arg) = (x, i);
                        }
                    }
                    let sum: f32 = row.iter().map(|&x| exp(x - max)).sum();
                    (max, arg as u32, max + sum.ln())
                })
                .collect();
            RowStats {
                max: per_row.iter().map(|r| r.0).collect(),
                argmax: per_row.iter().map(|r| r.1).collect(),
                log_z: per_row.iter().map(|r| r.2).collect(),
            }
        }
        Lay::ColMajor => {
            // Blocks of whole vocabulary entries (each `rows` wide) in parallel, merged in order
            // so that ties keep the first index.
            let block = 4096 * rows;
            let data = &data[..rows * vocab];
            let partial: Vec<(Vec<f32>, Vec<u32>)> = data
                .par_chunks(block)
                .enumerate()
                .map(|(b, chunk)| {
                    let (mut max, mut arg) = (vec![f32::NEG_INFINITY; rows], vec![0u32; rows]);
                    for (j, entry) in chunk.chunks(rows).enumerate() {
                        for (r, &x) in entry.iter().enumerate() {
                            if x > max[r] {
                                max[r] = x;
                                arg[r] = (b * 4096 + j) as u32;
                            }
                        }
                    }
                    (max, arg)
                })
                .collect();
            let (mut max, mut argmax) = (vec![f32::NEG_INFINITY; rows], vec![0u32; rows]);
            for (m, a) in partial {
                for r in 0..rows {
                    if m[r] > max[r] {
                        max[r] = m[r];
                        argmax[r] = a[r];
                    }
                }
            }
            let sums: Vec<f32> = data
                .par_chunks(block)
                .map(|chunk| {
                    let mut sum = vec![0f32; rows];
                    for entry in chunk.chunks(rows) {
                        for (r, &x) in entry.iter().enumerate() {
                            sum[r] += exp(x - max[r]);
                        }
                    }
                    sum
                })
                .reduce(
                    || vec![0f32; rows],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                        a
                    },
                );
            let log_z = max.iter().zip(sums).map(|(m, s)| m + s.ln()).collect();
            RowStats { max, argmax, log_z }
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
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// transformers' `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    let out = {
        let (storage, layout) = x.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => {
                let mut out = vec![0f32; end - start];
                out.par_chunks_mut(4096)
                    .zip(data[start..end].par_chunks(4096))
                    .for_each(|(o, i)| {
                        for (o, &x) in o.iter_mut().zip(i) {
                            let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
                            // tanh(y) = 1 - 2 / (e^(2y) + 1)
                            *o = 0.5 * x * (2.0 - 2.0 / (exp(2.0 * y) + 1.0));
                        }
                    });
                Some(out)
            }
            _ => None,
        }
    };
    match out {
        Some(out) => Tensor::from_vec(out, x.shape(), x.device()),
        None => x.gelu(),
    }
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
            let s = row_stats(t).unwrap();
            assert_eq!(s.argmax, [1, 2], "first index of the maximum");
            assert_eq!(s.max, [3.0, 1000.0]);
            assert!((s.log_z[0] - lse0).abs() < 1e-6);
            assert!((s.log_z[1] - 1000.0).abs() < 1e-3);
            assert_eq!(
                pick(t, &[(0, 2), (1, 3), (1, 0)]).unwrap(),
                [2.0, 5.0, -1000.0]
            );
        }
    }
}
