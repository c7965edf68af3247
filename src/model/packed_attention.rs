//! Attention on the CPU that reads only real keys, one rayon task per (sequence, head):
//! - the encoder's self-attention, straight from the packed projections (every input's tokens in
//!   order, no padding);
//! - the decoder's cross-attention, over each slot's own source length in the padded cache;
//! - the decoder's self-attention in one-token steps, over each slot's own cache columns.
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
use crate::model::wide::{Kernel, wide};

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
                        Bias::Relative(&bias[head * span..][..span]),
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

/// What one head adds to its scores before the softmax.
#[derive(Debug, Clone, Copy)]
enum Bias<'a> {
    /// Nothing (cross-attention).
    None,
    /// The head's position bias over relative positions `-(longest - 1)..=longest - 1`: query `i`
    /// and key `j` read `j - i` (the encoder, whose queries are its keys).
    Relative(&'a [f32]),
    /// One value per key, for every query (a decode step's one query per sequence).
    PerKey(&'a [f32]),
}

/// One head of one sequence: query rows against `n` key and value rows of `d` values each, the
/// output `(queries, d)`.
fn one_head<'a>(
    q: impl Iterator<Item = &'a [f32]>,
    k: impl Iterator<Item = &'a [f32]>,
    v: impl Iterator<Item = &'a [f32]>,
    n: usize,
    d: usize,
    bias: Bias<'_>,
) -> Vec<f32> {
    wide(Head {
        q,
        k,
        v,
        n,
        d,
        bias,
    })
}

/// Keys scored together, and output values summed together: one vector of accumulators.
const BLOCK: usize = 16;

/// [`one_head`]'s work. Every score is `Σ_c q_c·k_c` summed over `c` in order, and every output
/// `Σ_j p_j·v_j` summed over `j` in order, each in a register across its whole sum.
struct Head<'b, Q, K, V> {
    q: Q,
    k: K,
    v: V,
    n: usize,
    d: usize,
    bias: Bias<'b>,
}

impl<'a, Q, K, V> Kernel for Head<'_, Q, K, V>
where
    Q: Iterator<Item = &'a [f32]>,
    K: Iterator<Item = &'a [f32]>,
    V: Iterator<Item = &'a [f32]>,
{
    type Output = Vec<f32>;

    #[inline(always)]
    fn run(self) -> Vec<f32> {
        let Self {
            q,
            k,
            v,
            n,
            d,
            bias,
        } = self;
        // Keys transposed, `(d, width)`, `width` the keys rounded up to whole blocks (the padding
        // keys are zeros whose scores are never read): a block's scores are then `d` multiply-adds
        // of one vector of keys.
        let width = n.div_ceil(BLOCK) * BLOCK;
        let mut kt = vec![0f32; d * width];
        for (j, key) in k.enumerate() {
            for (c, &x) in key.iter().enumerate() {
                kt[c * width + j] = x;
            }
        }
        let values: Vec<&[f32]> = v.collect();
        let mut out = Vec::new();
        let mut scores = vec![0f32; width];
        for (i, query) in q.enumerate() {
            let at = out.len();
            out.resize(at + d, 0.0);
            if n == 0 {
                continue;
            }
            for (b, block) in scores.chunks_exact_mut(BLOCK).enumerate() {
                let mut acc = [0f32; BLOCK];
                for (&a, keys) in query.iter().zip(kt.chunks_exact(width)) {
                    let keys = &keys[b * BLOCK..][..BLOCK];
                    acc.iter_mut().zip(keys).for_each(|(s, &k)| *s += a * k);
                }
                block.copy_from_slice(&acc);
            }
            let p = &mut scores[..n];
            let bias = match bias {
                Bias::None => None,
                Bias::Relative(bias) => Some(&bias[bias.len() / 2 - i..][..n]),
                Bias::PerKey(bias) => Some(&bias[..n]),
            };
            if let Some(bias) = bias {
                p.iter_mut().zip(bias).for_each(|(s, &b)| *s += b);
            }
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            p.iter_mut().for_each(|s| *s = exp(*s - max));
            let sum: f32 = p.iter().sum();
            p.iter_mut().for_each(|e| *e /= sum);
            let mut row = out[at..].chunks_exact_mut(BLOCK);
            for (c, out) in row.by_ref().enumerate() {
                weighted_sum(out, p, &values, c * BLOCK);
            }
            let tail = row.into_remainder();
            if !tail.is_empty() {
                let from = d - tail.len();
                weighted_sum(tail, p, &values, from);
            }
        }
        out
    }
}

/// `out[l] = Σ_j p_j·values_j[from + l]`, summed over `j` in order.
#[inline(always)]
fn weighted_sum(out: &mut [f32], p: &[f32], values: &[&[f32]], from: usize) {
    let mut acc = [0f32; BLOCK];
    let acc = &mut acc[..out.len()];
    for (&p, value) in p.iter().zip(values) {
        let value = &value[from..][..acc.len()];
        acc.iter_mut().zip(value).for_each(|(o, &x)| *o += p * x);
    }
    out.copy_from_slice(acc);
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
                            Bias::None,
                        ));
                    })
            })
        })
    })???;
    Tensor::from_vec(out, (slots, heads, n, d), &Device::Cpu)
}

/// Self-attention of a one-token decode step over the cache: queries `q` `(slots, heads, 1,
/// d_kv)` of the token at column `width - 1`, keys and values `k`, `v` `(slots, heads,
/// capacity, d_kv)` already holding it, each slot reading its own columns `firsts[slot]..width`
/// (`None`, a free slot, gets zeros). `bias`: per head, the position bias of every column seen
/// from the query, `heads · width` values. Returns `(slots, heads, 1, d_kv)`.
pub fn decode_self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    firsts: &[Option<usize>],
    width: usize,
    bias: &[f32],
) -> candle_core::Result<Tensor> {
    let (slots, heads, n, d) = q.dims4()?;
    let (_, _, capacity, _) = k.dims4()?;
    if n != 1
        || k.dims() != [slots, heads, capacity, d]
        || v.dims() != k.dims()
        || firsts.len() != slots
        || width > capacity
        || firsts.iter().flatten().any(|&f| f >= width)
        || bias.len() != heads * width
    {
        candle_core::bail!(
            "decode self-attention: q {:?}, k {:?}, v {:?}, {} slots' first columns, {width} \
             columns and {} bias values do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            firsts.len(),
            bias.len()
        );
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut out = vec![0f32; slots * heads * d];
    with_f32(&q, |q| {
        with_f32(&k, |k| {
            with_f32(&v, |v| {
                out.par_chunks_mut(d).enumerate().for_each(|(task, out)| {
                    let Some(first) = firsts[task / heads] else {
                        return;
                    };
                    let keys = Rows {
                        start: (task * capacity + first) * d,
                        width: d,
                        n: width - first,
                        d,
                    };
                    let query = Rows {
                        start: task * d,
                        width: d,
                        n: 1,
                        d,
                    };
                    let head = task % heads;
                    out.copy_from_slice(&one_head(
                        query.of(q),
                        keys.of(k),
                        keys.of(v),
                        width - first,
                        d,
                        Bias::PerKey(&bias[head * width + first..(head + 1) * width]),
                    ));
                })
            })
        })
    })???;
    Tensor::from_vec(out, (slots, heads, 1, d), &Device::Cpu)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one scalar at a time, in the order [`Head`] promises.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, d: usize, bias: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        for (i, query) in q.chunks_exact(d).enumerate() {
            let zero = bias.len() / 2;
            let mut s: Vec<f32> = (0..n)
                .map(|j| {
                    let mut dot = 0f32;
                    for c in 0..d {
                        dot += query[c] * k[j * d + c];
                    }
                    dot + bias[zero - i + j]
                })
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            s.iter_mut().for_each(|x| *x = exp(*x - max));
            let sum: f32 = s.iter().sum();
            for c in 0..d {
                let mut o = 0f32;
                for j in 0..n {
                    o += s[j] / sum * v[j * d + c];
                }
                out[i * d + c] = o;
            }
        }
        out
    }

    /// Blocked, vectorized (wide or not) and the plain definition give the same bits, for key
    /// counts and head widths on and off the blocks.
    #[test]
    fn a_head_is_its_definition_bit_for_bit() {
        let mut seed = 7u32;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 23) as f32 - 1.0
                })
                .collect()
        };
        for (n, d) in [(1, 64), (5, 64), (16, 64), (40, 64), (33, 24), (7, 8)] {
            let (q, k, v) = (random(n * d), random(n * d), random(n * d));
            let bias = random(2 * n - 1);
            let rows = |x| -> Vec<&[f32]> { <[f32]>::chunks_exact(x, d).collect() };
            let (qr, kr, vr) = (rows(&q[..]), rows(&k[..]), rows(&v[..]));
            let want = reference(&q, &k, &v, n, d, &bias);
            let args = || (qr.iter().copied(), kr.iter().copied(), vr.iter().copied());
            let (a, b, c) = args();
            let plain = Head {
                q: a,
                k: b,
                v: c,
                n,
                d,
                bias: Bias::Relative(&bias),
            }
            .run();
            let (a, b, c) = args();
            let vectorized = one_head(a, b, c, n, d, Bias::Relative(&bias));
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&want), "n {n}, d {d}");
            assert_eq!(bits(&vectorized), bits(&want), "n {n}, d {d} (wide)");
        }
    }
}
