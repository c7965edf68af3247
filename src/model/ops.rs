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

use std::marker::PhantomData;

use candle_core::{CpuStorage, D, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::model::wide::{Kernel, wide};

/// Per-row statistics of a `(rows, vocab)` logits tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStats {
    /// NaN for a row holding a NaN or an infinity (on the CPU; candle's ops elsewhere).
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

/// Max, argmax and, with `with_log_z` (or off the CPU), `log Σ exp` of every row. A row holding
/// a NaN or an infinity gets a NaN maximum, so non-finite logits show even where no row asks
/// for the normaliser that would also reveal them.
pub fn row_stats(logits: &Tensor, with_log_z: bool) -> candle_core::Result<RowStats> {
    if let Some(stats) = with_cpu_data(logits, |data, lay, rows, vocab| {
        let best = cpu_best(data, &lay, rows, vocab);
        let argmax = best.iter().map(|b| b.at).collect();
        let log_z = with_log_z.then(|| {
            let max: Vec<f32> = best.iter().map(|b| b.max).collect();
            cpu_log_z(data, &lay, rows, vocab, &max)
        });
        let max = best.iter().map(|b| b.max + b.poison).collect();
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

/// The largest value of one row and its first index, in the same one pass as [`row_stats`];
/// `None` if the row holds a NaN or an infinity.
pub fn finite_best(row: &[f32]) -> Option<(f32, usize)> {
    let best = wide(BestOfRow(row));
    (best.poison == 0.0).then_some((best.max, best.at as usize))
}

/// `log Σ exp` of every row: the normaliser of its log-softmax.
pub fn log_z(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    if let Some(log_z) = with_cpu_data(logits, |data, lay, rows, vocab| {
        let max: Vec<f32> = cpu_best(data, &lay, rows, vocab)
            .iter()
            .map(|b| b.max)
            .collect();
        cpu_log_z(data, &lay, rows, vocab, &max)
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

/// Lanes of the one-pass scans: element `i` of a row goes to lane `i % LANES`, so the compiler
/// turns the scan into vector operations (a single running value cannot be vectorized without
/// reordering the arithmetic).
const LANES: usize = 16;

/// A row's largest value among those seen, its first index, and `poison`, the sum of `x·0`
/// over every value seen: 0, or NaN once one was a NaN or an infinity.
#[derive(Debug, Clone, Copy)]
struct Best {
    max: f32,
    at: u32,
    poison: f32,
}

impl Best {
    const NONE: Self = Self {
        max: f32::NEG_INFINITY,
        at: 0,
        poison: 0.0,
    };

    /// The best of two disjoint sets of indices: the larger maximum, on a tie the first index
    /// (like `torch.argmax`).
    fn or(self, other: Self) -> Self {
        let wins = other.max > self.max || (other.max == self.max && other.at < self.at);
        Self {
            max: if wins { other.max } else { self.max },
            at: if wins { other.at } else { self.at },
            poison: self.poison + other.poison,
        }
    }
}

/// Scans `values` into lanes' best, value `l` into lane `l` at index `index(l)`, which is later
/// than every index the lane has seen. A value moves its lane's index only when strictly
/// greater, so a lane keeps the first of equal maxima (and a NaN never wins). Arithmetic on
/// every lane rather than branches or conditional stores, so it vectorizes.
#[inline(always)]
fn scan(lanes: &mut Lanes, values: &[f32], index: impl Fn(usize) -> u32) {
    let n = values.len();
    let (max, at, poison) = (
        &mut lanes.max[..n],
        &mut lanes.at[..n],
        &mut lanes.poison[..n],
    );
    for l in 0..n {
        let x = values[l];
        let wins = u32::from(x > max[l]);
        at[l] = at[l].wrapping_add(wins.wrapping_mul(index(l).wrapping_sub(at[l])));
        max[l] = max[l].max(x);
        poison[l] += x * 0.0;
    }
}

/// Lane-wise scan state of [`scan`], `n` lanes.
struct Lanes {
    max: Vec<f32>,
    at: Vec<u32>,
    poison: Vec<f32>,
}

impl Lanes {
    fn new(n: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; n],
            at: vec![0; n],
            poison: vec![0.0; n],
        }
    }

    fn lane(&self, l: usize) -> Best {
        Best {
            max: self.max[l],
            at: self.at[l],
            poison: self.poison[l],
        }
    }
}

/// The best of one row: [`LANES`] lanes, merged.
struct BestOfRow<'a>(&'a [f32]);

impl Kernel for BestOfRow<'_> {
    type Output = Best;

    #[inline(always)]
    fn run(self) -> Best {
        let row = self.0;
        let mut lanes = Lanes::new(LANES);
        let mut chunks = row.chunks_exact(LANES);
        for (c, chunk) in chunks.by_ref().enumerate() {
            let first = (c * LANES) as u32;
            scan(&mut lanes, chunk, |l| first + l as u32);
        }
        let first = (row.len() - chunks.remainder().len()) as u32;
        scan(&mut lanes, chunks.remainder(), |l| first + l as u32);
        (0..LANES).map(|l| lanes.lane(l)).fold(Best::NONE, Best::or)
    }
}

/// The best of every row of a column-major block, `first` the vocabulary index of its first
/// entry: each entry holds one value per row, so the rows are the lanes.
struct BestOfBlock<'a> {
    block: &'a [f32],
    rows: usize,
    first: usize,
}

impl Kernel for BestOfBlock<'_> {
    type Output = Vec<Best>;

    #[inline(always)]
    fn run(self) -> Vec<Best> {
        let mut lanes = Lanes::new(self.rows);
        for (j, entry) in self.block.chunks_exact(self.rows).enumerate() {
            let at = (self.first + j) as u32;
            scan(&mut lanes, entry, |_| at);
        }
        (0..self.rows).map(|r| lanes.lane(r)).collect()
    }
}

/// The best of every row in one pass over the logits, in either layout.
fn cpu_best(data: &[f32], lay: &Lay, rows: usize, vocab: usize) -> Vec<Best> {
    let data = &data[..rows * vocab];
    match lay {
        Lay::RowMajor => data
            .par_chunks(vocab)
            .map(|row| wide(BestOfRow(row)))
            .collect(),
        Lay::ColMajor => data
            .par_chunks(BLOCK * rows)
            .enumerate()
            .map(|(b, block)| {
                wide(BestOfBlock {
                    block,
                    rows,
                    first: b * BLOCK,
                })
            })
            .reduce(
                || vec![Best::NONE; rows],
                |a, b| a.into_iter().zip(b).map(|(a, b)| a.or(b)).collect(),
            ),
    }
}

/// Per-row `log Σ exp` around the rows' maxima, in a pass that vectorizes (no branches, no
/// indexing).
fn cpu_log_z(data: &[f32], lay: &Lay, rows: usize, vocab: usize, max: &[f32]) -> Vec<f32> {
    let data = &data[..rows * vocab];
    match lay {
        Lay::RowMajor => data
            .par_chunks(vocab)
            .zip(max)
            .map(|(row, &max)| {
                let sum: f32 = wide(ExpLanes { row, max }).iter().sum();
                max + sum.ln()
            })
            .collect(),
        Lay::ColMajor => {
            let sum = data
                .par_chunks(BLOCK * rows)
                .map(|block| wide(ExpSumsOfBlock { block, max }))
                .reduce(
                    || vec![0f32; rows],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            max.iter().zip(sum).map(|(m, s)| m + s.ln()).collect()
        }
    }
}

/// `Σ exp(x - max)` of a row in [`LANES`] lanes.
struct ExpLanes<'a> {
    row: &'a [f32],
    max: f32,
}

impl Kernel for ExpLanes<'_> {
    type Output = [f32; LANES];

    #[inline(always)]
    fn run(self) -> [f32; LANES] {
        let max = self.max;
        lanes(self.row, 0.0, |s, x| s + exp(x - max))
    }
}

/// Per row, `Σ exp(x - max)` over a column-major block (`max` has one value per row).
struct ExpSumsOfBlock<'a> {
    block: &'a [f32],
    max: &'a [f32],
}

impl Kernel for ExpSumsOfBlock<'_> {
    type Output = Vec<f32>;

    #[inline(always)]
    fn run(self) -> Vec<f32> {
        let mut s = vec![0f32; self.max.len()];
        for entry in self.block.chunks_exact(self.max.len()) {
            s.iter_mut()
                .zip(entry)
                .zip(self.max)
                .for_each(|((s, &x), &m)| *s += exp(x - m));
        }
        s
    }
}

/// Folds `row` into [`LANES`] independent accumulators (element `i` into lane `i % LANES`).
#[inline(always)]
fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; LANES] {
    let mut acc = [init; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in chunks.by_ref() {
        acc.iter_mut().zip(chunk).for_each(|(a, &x)| *a = f(*a, x));
    }
    acc.iter_mut()
        .zip(chunks.remainder())
        .for_each(|(a, &x)| *a = f(*a, x));
    acc
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
    match map_rows::<Gelu>(x, width)? {
        Some(out) => Ok(out),
        None => x.gelu(),
    }
}

/// The gated `gelu_new` of a stacked `wi_0 ‖ wi_1` projection `(.., 2·d_ff)`:
/// `gelu_new(first half) · second half`, `(.., d_ff)`.
pub fn gated_gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    let d_ff = x.dim(D::Minus1)? / 2;
    match map_rows::<GatedGelu>(x, d_ff)? {
        Some(out) => Ok(out),
        None => x.narrow(D::Minus1, 0, d_ff)?.gelu()? * x.narrow(D::Minus1, d_ff, d_ff)?,
    }
}

/// What [`map_rows`] does to one row.
trait RowMap {
    fn row(input: &[f32], out: &mut [f32]);
}

/// `gelu_new` of every value.
struct Gelu;

impl RowMap for Gelu {
    #[inline(always)]
    fn row(input: &[f32], out: &mut [f32]) {
        out.iter_mut().zip(input).for_each(|(o, &x)| *o = gelu(x))
    }
}

/// `out` is `d_ff` wide, `input` the gate's `d_ff` values, then the up projection's.
struct GatedGelu;

impl RowMap for GatedGelu {
    #[inline(always)]
    fn row(input: &[f32], out: &mut [f32]) {
        let (gate, up) = input.split_at(out.len());
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = gelu(g) * u;
        }
    }
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    // 0.5·(1 + tanh(y)) = 1 - 1 / (e^(2y) + 1)
    x * (1.0 - 1.0 / (exp(2.0 * y) + 1.0))
}

/// Applies `M` to every row of a contiguous CPU f32 tensor in parallel, the output rows
/// `out_width` wide; `None` for other tensors.
fn map_rows<M: RowMap>(x: &Tensor, out_width: usize) -> candle_core::Result<Option<Tensor>> {
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
                    .for_each(|(out, input)| {
                        wide(Rows::<M> {
                            input,
                            out,
                            width,
                            out_width,
                            map: PhantomData,
                        })
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

/// [`map_rows`]' work on one block of whole rows.
struct Rows<'a, M> {
    input: &'a [f32],
    out: &'a mut [f32],
    width: usize,
    out_width: usize,
    map: PhantomData<M>,
}

impl<M: RowMap> Kernel for Rows<'_, M> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let rows = self.out.chunks_mut(self.out_width);
        for (o, i) in rows.zip(self.input.chunks(self.width)) {
            M::row(i, o);
        }
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

    /// Over rows long enough for every lane and several parallel blocks: the maximum and its
    /// first index, ties spread over lanes and blocks, as a plain scan finds them.
    #[test]
    fn the_one_pass_scan_finds_the_first_maximum_across_lanes_and_blocks() {
        let (rows, vocab) = (5, 3 * BLOCK + 37);
        let mut seed = 3u32;
        let mut data: Vec<f32> = (0..rows * vocab)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1 << 20) as f32
            })
            .collect();
        // Equal maxima: later lanes first, then another block, then the tail past the lanes.
        let ties = [
            [17, 5, BLOCK + 1],
            [BLOCK * 2 + 3, BLOCK + 9, 40],
            [vocab - 1, vocab - 3, vocab - 20],
        ];
        for (r, at) in ties.iter().enumerate() {
            for &i in at {
                data[r * vocab + i] = 1e6;
            }
        }
        data[3 * vocab + 11] = f32::NAN;
        let row_major = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let col_major = row_major.t().unwrap().contiguous().unwrap().t().unwrap();
        for t in [&row_major, &col_major] {
            for with_log_z in [false, true] {
                let s = row_stats(t, with_log_z).unwrap();
                for (r, row) in data.chunks_exact(vocab).enumerate() {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let first = row.iter().position(|&x| x == max).unwrap() as u32;
                    assert_eq!(s.argmax[r], first, "row {r}");
                    if r == 3 {
                        assert!(s.max[r].is_nan());
                    } else {
                        assert_eq!(s.max[r], max, "row {r}");
                    }
                }
            }
        }
    }

    /// With or without `log Σ exp`, a NaN or an infinity anywhere in a row makes its maximum NaN.
    #[test]
    fn a_non_finite_logit_always_shows_in_the_maximum() {
        let rows = [[1f32, f32::NAN, 2.], [f32::INFINITY, 0., 1.], [0.5, 2., 1.]];
        let row_major = Tensor::new(&rows, &Device::Cpu).unwrap();
        let col_major = row_major.t().unwrap().contiguous().unwrap().t().unwrap();
        for t in [&row_major, &col_major] {
            for with_log_z in [false, true] {
                let s = row_stats(t, with_log_z).unwrap();
                assert!(s.max[0].is_nan() && s.max[1].is_nan(), "{:?}", s.max);
                assert_eq!((s.max[2], s.argmax[2]), (2.0, 1));
            }
        }
    }
}
