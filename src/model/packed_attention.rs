//! Attention on the CPU that reads only real keys, one rayon task per (sequence, head):
//! - the encoder's self-attention, straight from the packed projections (every input's tokens in
//!   order, no padding);
//! - the decoder's cross-attention, over each slot's own source length in the padded cache.
//!
//! candle's path (`t5::Attention::attend`, still used on other devices) needs right-padded
//! layouts: gathering and transposing the projections into them, many tiny batched matrix
//! products, position biases and masks as large as the padded scores, and gathering the result
//! back. Masked keys get weight exactly 0 there, but the padding still changes how candle's
//! vectorized softmax groups its sums, so a sequence's scores moved in the last bits with the
//! longest source in its batch. Here a sequence's result depends on nothing but its own rows.
//! The arithmetic is the same as candle's: the dot product, then the bias, then a softmax with
//! the maximum subtracted, then the probability-weighted sum of values.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::model::ops::exp;

/// Shapes of one packed attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub d_kv: usize,
}

/// Self-attention of packed sequences on the CPU, in f32.
/// - `q`: `(tokens, heads · d_kv)`; `kv`: `(tokens, 2 · heads · d_kv)`, keys then values;
/// - `lengths`: each input's token count, in packing order (they sum to `tokens`);
/// - `bias`: per head, the position bias of relative positions `-(longest - 1)..=longest - 1`
///   (key minus query), `heads · (2 · longest - 1)` values, `longest` the largest length.
///
/// Returns the attention output `(tokens, heads · d_kv)`, heads side by side as
/// `t5::Attention::o` expects them.
pub fn self_attention(
    q: &Tensor,
    kv: &Tensor,
    lengths: &[usize],
    shape: Heads,
    bias: &[f32],
) -> candle_core::Result<Tensor> {
    let Heads { heads, d_kv } = shape;
    let inner = heads * d_kv;
    let tokens: usize = lengths.iter().sum();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let span = (2 * longest).saturating_sub(1);
    if q.dims() != [tokens, inner] || kv.dims() != [tokens, 2 * inner] {
        candle_core::bail!(
            "packed attention: q {:?} and kv {:?} do not fit {tokens} tokens of {heads} heads x {d_kv}",
            q.dims(),
            kv.dims()
        );
    }
    if bias.len() != heads * span {
        candle_core::bail!(
            "packed attention: {} bias values for {heads} heads and {span} relative positions",
            bias.len()
        );
    }
    let q = q.contiguous()?;
    let kv = kv.contiguous()?;
    let offsets: Vec<usize> = lengths
        .iter()
        .scan(0, |at, &n| {
            let start = *at;
            *at += n;
            Some(start)
        })
        .collect();
    let outputs: Vec<Vec<f32>> = with_f32(&q, |q| {
        with_f32(&kv, |kv| {
            (0..lengths.len() * heads)
                .into_par_iter()
                .map(|task| {
                    let (input, head) = (task / heads, task % heads);
                    let n = lengths[input];
                    let at = |width: usize, column: usize| Rows {
                        start: offsets[input] * width + column,
                        width,
                        n,
                        d: d_kv,
                    };
                    let column = head * d_kv;
                    one_head(
                        at(inner, column).of(q),
                        at(2 * inner, column).of(kv),
                        at(2 * inner, inner + column).of(kv),
                        n,
                        d_kv,
                        Some(&bias[head * span..][..span]),
                    )
                })
                .collect()
        })
    })??;
    let mut out = vec![0f32; tokens * inner];
    for (task, values) in outputs.iter().enumerate() {
        let (input, head) = (task / heads, task % heads);
        for (i, row) in values.chunks_exact(d_kv).enumerate() {
            let at = (offsets[input] + i) * inner + head * d_kv;
            out[at..at + d_kv].copy_from_slice(row);
        }
    }
    Tensor::from_vec(out, (tokens, inner), &Device::Cpu)
}

/// One head of one sequence: query rows against `n` key and value rows of `d` values each, the
/// output `(queries, d)`. `bias`, for self-attention, is the head's position bias over relative
/// positions `-(longest - 1)..=longest - 1` (query `i` and key `j` read `j - i`).
fn one_head<'a>(
    q: impl Iterator<Item = &'a [f32]>,
    k: impl Iterator<Item = &'a [f32]>,
    v: impl Iterator<Item = &'a [f32]>,
    n: usize,
    d: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    // Keys transposed, `(d, n)`: a query's scores are then `d` multiply-adds over contiguous
    // rows, which vectorize across keys.
    let mut kt = vec![0f32; d * n];
    for (j, key) in k.enumerate() {
        for (c, &x) in key.iter().enumerate() {
            kt[c * n + j] = x;
        }
    }
    let values: Vec<&[f32]> = v.collect();
    let mut out = Vec::new();
    let mut scores = vec![0f32; n];
    for (i, query) in q.enumerate() {
        let at = out.len();
        out.resize(at + d, 0.0);
        let row = &mut out[at..];
        if n > 0 {
            scores.fill(0.0);
            for (&a, keys) in query.iter().zip(kt.chunks_exact(n)) {
                scores.iter_mut().zip(keys).for_each(|(s, &k)| *s += a * k);
            }
            if let Some(bias) = bias {
                let zero = bias.len() / 2;
                scores
                    .iter_mut()
                    .zip(&bias[zero - i..][..n])
                    .for_each(|(s, &b)| *s += b);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scores.iter_mut().for_each(|s| *s = exp(*s - max));
            let sum: f32 = scores.iter().sum();
            for (&e, value) in scores.iter().zip(&values) {
                let p = e / sum;
                row.iter_mut().zip(*value).for_each(|(o, &x)| *o += p * x);
            }
        }
    }
    out
}

/// Cross-attention of decoder queries `q` `(slots, heads, n, d_kv)` over the padded source keys
/// and values `k`, `v` `(slots, heads, capacity, d_kv)`, each slot reading only its first
/// `lengths[slot]` (a free slot, length 0, gets zeros). Returns `(slots, heads, n, d_kv)`.
pub fn cross_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lengths: &[usize],
) -> candle_core::Result<Tensor> {
    let (slots, heads, n, d) = q.dims4()?;
    let (_, _, capacity, _) = k.dims4()?;
    if k.dims() != [slots, heads, capacity, d]
        || v.dims() != k.dims()
        || lengths.len() != slots
        || lengths.iter().any(|&l| l > capacity)
    {
        candle_core::bail!(
            "cross attention: q {:?}, k {:?}, v {:?} and {} source lengths do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            lengths.len()
        );
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut out = vec![0f32; slots * heads * n * d];
    with_f32(&q, |q| {
        with_f32(&k, |k| {
            with_f32(&v, |v| {
                out.par_chunks_mut(n * d)
                    .enumerate()
                    .for_each(|(task, out)| {
                        let len = lengths[task / heads];
                        let keys = Rows {
                            start: task * capacity * d,
                            width: d,
                            n: len,
                            d,
                        };
                        let queries = Rows {
                            start: task * n * d,
                            width: d,
                            n,
                            d,
                        };
                        out.copy_from_slice(&one_head(
                            queries.of(q),
                            keys.of(k),
                            keys.of(v),
                            len,
                            d,
                            None,
                        ));
                    })
            })
        })
    })???;
    Tensor::from_vec(out, (slots, heads, n, d), &Device::Cpu)
}

/// `n` rows of `d` values, `width` apart from `start`: one head's slice of an input's rows.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    width: usize,
    n: usize,
    d: usize,
}

impl Rows {
    fn of(self, data: &[f32]) -> impl Iterator<Item = &[f32]> {
        (0..self.n).map(move |i| &data[self.start + i * self.width..][..self.d])
    }
}

/// Runs `f` on the f32 buffer of a contiguous CPU tensor.
fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> candle_core::Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => Ok(f(&data[start..end])),
        _ => candle_core::bail!("packed attention needs contiguous f32 CPU tensors"),
    }
}
