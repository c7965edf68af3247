//! The int8 matrix product behind `--quantize q8` on the CPU: `y = x·Wᵀ` with `W` rounded to
//! int8 once at load time and `x` rounded at every call, products summed exactly in i32.
//!
//! Both sides are scaled per block of [`K_BLOCK`] inputs: each weight row (output channel) and
//! each activation row gets its own scale per block, so an outlier only coarsens its own block.
//! The i32 sum of a block is turned into f32 with the two scales and added to the output.
//!
//! The hot loop is AVX-512 VNNI's `vpdpbusd` (unsigned 8-bit × signed 8-bit, four pairs summed
//! into each i32 lane): activations are stored as `q + 128` so they fit u8, and the `128·Σw`
//! that adds is subtracted per block from a sum precomputed with the weights. Weights are
//! packed so that one 64-byte load feeds 16 output channels with 4 inputs each. An AVX2 kernel
//! (for CPUs without VNNI) and a portable one walk the same layout with the same integer sums
//! and the same float steps (no fused multiply-add), so all give bit-identical outputs; a unit
//! test holds them to it. On CPUs with Intel AMX (Sapphire Rapids and later) the same i32 sums
//! come from AMX tiles, 16 rows × 64 channels × 64 inputs per step (see [`amx`]).
//! Work is split across rayon's pool by tiles of [`TILE`] output channels, so each weight byte
//! is read once per call however many rows there are (decode steps read `lm_head` once).

use std::ops::Range;

use rayon::prelude::*;

use super::product::{PaddedOut, Product};
use super::wide::{self, wide};

/// Output channels per `vpdpbusd` register.
const LANES: usize = 16;
/// Registers of output channels per tile.
const PANELS: usize = 4;
/// Output channels one kernel call produces (and one rayon task owns).
const TILE: usize = LANES * PANELS;
/// Inputs each i32 lane sums per instruction.
const GROUP: usize = 4;
/// Bytes of packed weights per group of [`GROUP`] inputs in a tile.
const GROUP_BYTES: usize = TILE * GROUP;
/// Activation rows per kernel call.
const ROWS: usize = 4;
/// The u8 offset that makes a signed activation code unsigned.
const OFFSET: i32 = 128;

/// Inputs sharing one scale per row.
const K_BLOCK: usize = 128;

/// A weight `(out, in)` rounded to int8 per output channel and block of [`K_BLOCK`] inputs.
#[derive(Debug)]
pub struct Int8Linear {
    out: usize,
    dims: Dims,
    /// `[tile][group][panel][lane][4]`: one 64-byte panel is 16 channels × 4 inputs.
    packed: Vec<i8>,
    /// `[tile][block][channel in tile]`: the f32 value of one int8 step.
    scales: Vec<f32>,
    /// `[tile][block][channel in tile]`: `128 · Σ q` over the block.
    offsets: Vec<i32>,
}

impl Int8Linear {
    /// Rounds the row-major f32 weight `w` of shape `(out, input)`.
    pub fn quantize(w: &[f32], out: usize, input: usize) -> Self {
        assert_eq!(w.len(), out * input, "weight of {out}x{input}");
        Self::quantize_with(out, input, |o, row| {
            row.copy_from_slice(&w[o * input..(o + 1) * input])
        })
    }

    /// Rounds a weight of shape `(out, input)` whose row `o` `row_of(o, row)` writes into `row`,
    /// so a weight stored in another layout needs no row-major copy of itself.
    pub fn quantize_with(out: usize, input: usize, row_of: impl Fn(usize, &mut [f32])) -> Self {
        let dims = Dims::new(input);
        let (k_pad, block, blocks) = (dims.k_pad, dims.block, dims.blocks());
        let tiles = out.div_ceil(TILE);
        let groups = k_pad / GROUP;
        let mut packed = vec![0i8; tiles * groups * GROUP_BYTES];
        let mut scales = vec![0f32; tiles * blocks * TILE];
        let mut offsets = vec![0i32; tiles * blocks * TILE];
        let mut codes = vec![0i8; k_pad];
        let mut row = vec![0f32; input];
        for o in 0..out {
            let (tile, c) = (o / TILE, o % TILE);
            row_of(o, &mut row);
            for (b, (xs, codes)) in row
                .chunks(block)
                .zip(codes.chunks_exact_mut(block))
                .enumerate()
            {
                let at = (tile * blocks + b) * TILE + c;
                scales[at] = round_weights(xs, codes);
                offsets[at] = OFFSET * codes.iter().map(|&q| i32::from(q)).sum::<i32>();
            }
            // Channel `c` is lane `c % 16` of panel `c / 16`, i.e. bytes `4c..4c+4` of a group.
            for (g, quad) in codes.chunks_exact(GROUP).enumerate() {
                let at = (tile * groups + g) * GROUP_BYTES + c * GROUP;
                packed[at..at + GROUP].copy_from_slice(quad);
            }
            codes.fill(0);
        }
        Self {
            out,
            dims,
            packed,
            scales,
            offsets,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.packed.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// `Ŵ[c][k]`: the value the product multiplies for `W[c][k]`, its code times its block's
    /// scale, exactly.
    pub fn rounded_weight(&self, c: usize, k: usize) -> f64 {
        let Dims { k_pad, block, .. } = self.dims;
        let (tile, lane) = (c / TILE, c % TILE);
        let groups = k_pad / GROUP;
        let code =
            self.packed[(tile * groups + k / GROUP) * GROUP_BYTES + lane * GROUP + k % GROUP];
        let scale = self.scales[(tile * self.dims.blocks() + k / block) * TILE + lane];
        f64::from(code) * f64::from(scale)
    }

    /// For an activation row `x`, `(‖x − x̂‖₂, ‖x̂‖₂)`, where `x̂` is the row as the product rounds
    /// it (each code times its block's scale), with the same rounding steps; summed in f64.
    pub fn rounding_of(&self, x: &[f32]) -> (f64, f64) {
        let (mut err, mut norm) = (0f64, 0f64);
        for xs in x.chunks(self.dims.block) {
            let (scale, inv) = block_scale(xs);
            for &v in xs {
                let rounded = f64::from(code(v, inv)) * f64::from(scale);
                err += (f64::from(v) - rounded).powi(2);
                norm += rounded.powi(2);
            }
        }
        (err.sqrt(), norm.sqrt())
    }

    /// `ε` of `|y_c − x̂·Ŵ_c| ≤ ε·‖x̂‖·‖Ŵ_c‖` for the product's output `y` (plus at most
    /// [`UNDERFLOW`] per input where scales underflow): the i32 sums are exact, each block adds
    /// them as `sum · (scale_w · scale_x)` (two f32 roundings, unit `u = 2⁻²⁴`), and the blocks
    /// are summed in f32, `blocks − 1` roundings of at most `Σ_b |block b|` each, and
    /// `Σ_b |block b| ≤ Σ_k |x̂_k Ŵ_ck| ≤ ‖x̂‖·‖Ŵ_c‖`.
    pub fn float_error(&self) -> f64 {
        let u = 2f64.powi(-24);
        let b = self.dims.blocks() as f64;
        let gamma = b * u / (1.0 - b * u);
        (1.0 + u).powi(2) * (1.0 + gamma) - 1.0
    }

    fn matmul_with(&self, x: &[f32], rows: usize, kernel: Kernel) -> Vec<f32> {
        let kernel = kernel.for_dims(self.dims);
        let step = kernel.rows();
        let acts = Activations::quantize(x, rows, self.dims, kernel);
        let tiles = self.out.div_ceil(TILE);
        let width = tiles * TILE;
        let mut y = PaddedOut::new(rows, width);
        let out = y.shared();
        let blocks = self.dims.blocks();
        let row_groups = rows.div_ceil(step);
        let slice = kernel.blocks_per_slice(blocks).max(1);
        (0..tiles).into_par_iter().for_each(|tile| {
            for first in (0..blocks).step_by(slice) {
                let run = first..(first + slice).min(blocks);
                for (row_group, r0) in (0..rows).step_by(step).enumerate() {
                    let call = Call {
                        tile,
                        r0,
                        n: (rows - r0).min(step),
                        run: run.clone(),
                        row_group: (row_group, row_groups),
                    };
                    // SAFETY: `tile` writes only columns `tile*TILE..(tile+1)*TILE` of rows
                    // `r0..r0+step` (clipped to `rows`) of `y`, which has capacity `rows ×
                    // width`; no other task writes them and `y` outlives the parallel loop.
                    // The slices run in order, so block `first` finds the sums of the ones
                    // before it.
                    unsafe {
                        self.tile(call, &acts, out.at(r0 * width + tile * TILE), width, kernel)
                    };
                }
            }
        });
        // SAFETY: the tiles cover all `width` columns of all rows, and each wrote every element
        // of its part (its first block stores, see `tile`).
        unsafe { y.finish(self.out) }
    }

    /// Adds blocks `call.run` of rows `r0..r0+n` times tile `tile` to `out` (row stride
    /// `stride`): block 0's products are stored, later blocks' added, so `out` may start
    /// uninitialized.
    ///
    /// # Safety
    /// `out` must be valid for writes of `n` rows of [`TILE`] floats at stride `stride`, hold
    /// the sums of the blocks before `call.run`, and `kernel` must be supported by this CPU.
    unsafe fn tile(
        &self,
        Call {
            tile,
            r0,
            n,
            run,
            row_group,
        }: Call,
        acts: &Activations,
        out: *mut f32,
        stride: usize,
        kernel: Kernel,
    ) {
        let Dims { k_pad, block, .. } = self.dims;
        let (groups, blocks) = (k_pad / GROUP, self.dims.blocks());
        let job = TileJob {
            weights: &self.packed[tile * groups * GROUP_BYTES..(tile + 1) * groups * GROUP_BYTES],
            scales: &self.scales[tile * blocks * TILE..(tile + 1) * blocks * TILE],
            offsets: &self.offsets[tile * blocks * TILE..(tile + 1) * blocks * TILE],
            codes: &acts.codes[r0 * k_pad..(r0 + n) * k_pad],
            row_scales: &acts.scales[r0 * blocks..(r0 + n) * blocks],
            streams: r0 == 0,
            run,
            row_group,
            k_pad,
            groups_per_block: block / GROUP,
            blocks,
            out,
            stride,
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            match n {
                #[cfg(target_arch = "x86_64")]
                _ if kernel == Kernel::Amx => amx::tile(&job, n),
                1 => run_tile::<1>(kernel, &job),
                2 => run_tile::<2>(kernel, &job),
                3 => run_tile::<3>(kernel, &job),
                _ => run_tile::<4>(kernel, &job),
            }
        }
    }
}

/// The input side of a weight: its width, the block that shares a scale, and the width rounded
/// up to whole blocks (zeros beyond `input`).
#[derive(Debug, Clone, Copy)]
struct Dims {
    input: usize,
    block: usize,
    k_pad: usize,
}

impl Dims {
    fn new(input: usize) -> Self {
        let block = K_BLOCK.min(input.div_ceil(GROUP).max(1) * GROUP);
        Self {
            input,
            block,
            k_pad: input.div_ceil(block) * block,
        }
    }

    fn blocks(self) -> usize {
        self.k_pad / self.block
    }
}

/// 1.5·2²³: a float in `ROUND ± 2²²` has a unit step, so adding it to a clamped code rounds to
/// nearest even and leaves the integer in the low bits of the sum's bit pattern. Both steps
/// vectorize on any x86-64, where `round_ties_even` is a libm call without SSE4.1 and the
/// saturating `as i32` is scalarized.
const ROUND: f32 = 12_582_912.0;

/// A block's scale (the value of one int8 step) and its inverse; both 0 for an all-zero block.
/// The largest |x| is found on the bit patterns, which order like the values and vectorize.
#[inline(always)]
fn block_scale(xs: &[f32]) -> (f32, f32) {
    let amax = f32::from_bits(
        xs.iter()
            .map(|v| v.to_bits() & 0x7fff_ffff)
            .max()
            .unwrap_or(0),
    );
    if amax == 0.0 {
        (0.0, 0.0)
    } else {
        (amax / 127.0, 127.0 / amax)
    }
}

/// `v` rounded to an int8 step of a block whose inverse scale is `inv`, in -127..=127.
#[inline(always)]
fn code(v: f32, inv: f32) -> i32 {
    ((v * inv).clamp(-127.0, 127.0) + ROUND).to_bits() as i32 - ROUND.to_bits() as i32
}

/// Rounds a weight block into `dst`, returning its scale.
fn round_weights(xs: &[f32], dst: &mut [i8]) -> f32 {
    let (scale, inv) = block_scale(xs);
    for (d, &v) in dst.iter_mut().zip(xs) {
        *d = code(v, inv) as i8;
    }
    scale
}

/// Activation rows rounded per block: `codes` are `q` plus the kernel's
/// [`Kernel::code_offset`] (as a byte), `(rows, k_pad)`; `scales` are `(rows, blocks)`.
struct Activations {
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// Activation rows per rayon task when rounding.
const ROUND_ROWS: usize = 32;

impl Activations {
    fn quantize(x: &[f32], rows: usize, dims: Dims, kernel: Kernel) -> Self {
        let offset = kernel.code_offset();
        let mut codes = vec![offset as u8; rows * dims.k_pad];
        let mut scales = vec![0f32; rows * dims.blocks()];
        codes
            .par_chunks_mut(ROUND_ROWS * dims.k_pad)
            .zip(scales.par_chunks_mut(ROUND_ROWS * dims.blocks()))
            .zip(x.par_chunks(ROUND_ROWS * dims.input))
            .for_each(|((codes, scales), x)| {
                wide(RoundRows {
                    x,
                    codes,
                    scales,
                    dims,
                    offset,
                })
            });
        Self { codes, scales }
    }
}

/// Rounds the rows of `x` into `codes` (`k_pad` each, `q + offset` as a byte) and `scales`
/// (`blocks` each), as a [`wide`] kernel: its loops vectorize as wide as the CPU allows.
struct RoundRows<'a> {
    x: &'a [f32],
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    dims: Dims,
    offset: i32,
}

impl wide::Kernel for RoundRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            x,
            codes,
            scales,
            dims,
            offset,
        } = self;
        let rows = x
            .chunks_exact(dims.input)
            .zip(codes.chunks_exact_mut(dims.k_pad));
        for ((row, codes), scales) in rows.zip(scales.chunks_exact_mut(dims.blocks())) {
            for ((xs, codes), scale) in row
                .chunks(dims.block)
                .zip(codes.chunks_exact_mut(dims.block))
                .zip(scales)
            {
                let inv;
                (*scale, inv) = block_scale(xs);
                for (c, &v) in codes.iter_mut().zip(xs) {
                    *c = (code(v, inv) + offset) as u8;
                }
            }
        }
    }
}

/// Which rows and blocks of which tile one kernel call computes.
struct Call {
    tile: usize,
    r0: usize,
    n: usize,
    run: Range<usize>,
    /// `(this row group, row groups)`.
    row_group: (usize, usize),
}

/// What one kernel call reads and where it adds its results.
struct TileJob<'a> {
    /// This tile's packed weights, all groups.
    weights: &'a [i8],
    /// This tile's `[block][channel]` scales and offsets.
    scales: &'a [f32],
    offsets: &'a [i32],
    /// The call's activation rows, `k_pad` codes each, and their `[row][block]` scales.
    codes: &'a [u8],
    row_scales: &'a [f32],
    k_pad: usize,
    groups_per_block: usize,
    blocks: usize,
    out: *mut f32,
    stride: usize,
    /// Whether this call is the first over the tile's weights, which then come from memory
    /// (later row groups find them in the cache): the AMX kernel prefetches only then.
    streams: bool,
    /// The blocks this call adds.
    run: Range<usize>,
    /// `(this row group, row groups)` of the call, for kernels that share out prefetching.
    row_group: (usize, usize),
}

/// Which implementation of the tile kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// Intel AMX tiles (`tdpbusd`) for weights whose blocks are whole 64-input steps, the
    /// [`Kernel::Vnni`] kernel for the rest.
    #[cfg(target_arch = "x86_64")]
    Amx,
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// For x86-64 CPUs with AVX2 but without AVX-512 VNNI.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            return if amx::ready() { Self::Amx } else { Self::Vnni };
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return Self::Avx2;
        }
        Self::Portable
    }
}

impl Kernel {
    /// The kernel that runs weights of `dims`: AMX steps through 64 inputs at a time, so a
    /// weight whose blocks are not whole steps runs on [`Kernel::Vnni`].
    fn for_dims(self, dims: Dims) -> Self {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Amx if !dims.block.is_multiple_of(amx::STEP) => Self::Vnni,
            other => other,
        }
    }

    /// What the activation codes of this kernel add to `q`: 128 makes them the unsigned bytes
    /// `vpdpbusd` (and the tiles) multiply, with `128·Σw` subtracted again per block; the AVX2
    /// kernel reads them as signed bytes, so there they are `q` itself and need no flipping per
    /// broadcast.
    fn code_offset(self) -> i32 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => 0,
            _ => OFFSET,
        }
    }

    /// Blocks of a weight with `blocks` of them that one call adds before the next row group's
    /// call: the AVX2 kernel goes block by block, every row group in turn, so a tile's bytes come
    /// from memory once (one block, 8 KB, stays in the L1 cache) and while every group
    /// computes; the others walk all blocks per call.
    fn blocks_per_slice(self, blocks: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => 1,
            _ => blocks,
        }
    }

    /// Rows one kernel call takes.
    fn rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Amx => amx::ROWS,
            _ => ROWS,
        }
    }
}

/// One tile of `R` rows with `kernel`.
///
/// # Safety
/// As [`Int8Linear::tile`].
unsafe fn run_tile<const R: usize>(kernel: Kernel, job: &TileJob) {
    // SAFETY: forwarded from the caller, who also guarantees `kernel` runs on this CPU.
    unsafe {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni | Kernel::Amx => vnni::tile::<R>(job),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::tile::<R>(job),
            Kernel::Portable => portable_tile::<R>(job),
        }
    }
}

/// The scalar kernel: same packed layout, same sums, same float steps as [`vnni::tile`].
///
/// # Safety
/// `job.out` must be valid for writes of `R` rows of [`TILE`] floats at `job.stride`.
unsafe fn portable_tile<const R: usize>(job: &TileJob) {
    for b in job.run.clone() {
        let mut acc = [[0i32; TILE]; R];
        for g in b * job.groups_per_block..(b + 1) * job.groups_per_block {
            let w = &job.weights[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = &job.codes[r * job.k_pad + g * GROUP..r * job.k_pad + (g + 1) * GROUP];
                // Channel `c` of the tile is lane `c % 16` of panel `c / 16`: bytes `4c..4c+4`.
                for (sum, lane) in acc.iter_mut().zip(w.chunks_exact(GROUP)) {
                    *sum += a
                        .iter()
                        .zip(lane)
                        .map(|(&a, &w)| i32::from(a) * i32::from(w))
                        .sum::<i32>();
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row_scale = job.row_scales[r * job.blocks + b];
            for (c, &sum) in acc.iter().enumerate() {
                let at = b * TILE + c;
                let value = (sum - job.offsets[at]) as f32 * (job.scales[at] * row_scale);
                // SAFETY: row `r < R`, column `c < TILE`, as the caller guarantees.
                unsafe {
                    let out = job.out.add(r * job.stride + c);
                    *out = if b == 0 { value } else { *out + value };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GROUP, GROUP_BYTES, TILE, TileJob};

    /// `R` rows × one tile without VNNI. `vpmaddubsw` multiplies unsigned by signed bytes and
    /// saturates pairs to i16, so it is fed `|w|` and the activation code carrying `w`'s sign
    /// (`vpsignb`): both at most 127 in magnitude, a pair at most 32258, never saturated. The
    /// codes are `q` itself ([`super::Kernel::code_offset`]), so no offset is added and none is
    /// subtracted: the i32 sums equal the other kernels' after their offset.
    ///
    /// # Safety
    /// The CPU must have AVX2, and `job.out` must be valid for writes of `R` rows of [`TILE`]
    /// floats at `job.stride`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile<const R: usize>(job: &TileJob) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match R {
                1 => channels::<R, 8>(job),
                2 => channels::<R, 4>(job),
                _ => channels::<R, 2>(job),
            }
        }
    }

    /// `R` rows × one tile in passes of `V × 8` channels, as many as the 16 registers hold
    /// sums for beside the rows' codes: each pass reads its weights once for all `R` rows (and
    /// takes `|w|` once), and one row's pass covers the whole tile, so a decode step sweeps each
    /// group's 256 bytes in order. With `V = 2` the four passes each read every fourth cache
    /// line, which the hardware prefetchers do not follow: each then prefetches its lines of
    /// the next block, row group `part` of `parts` only the groups `g ≡ part (mod parts)`, so
    /// the requests spread over all row groups' work.
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx2")]
    unsafe fn channels<const R: usize, const V: usize>(job: &TileJob) {
        let ones = _mm256_set1_epi16(1);
        let (codes, weights) = (job.codes.as_ptr(), job.weights.as_ptr());
        let (part, parts) = job.row_group;
        for c0 in (0..TILE).step_by(8 * V) {
            for b in job.run.clone() {
                let mut acc = [[_mm256_setzero_si256(); V]; R];
                let groups = b * job.groups_per_block..(b + 1) * job.groups_per_block;
                let mut due = if V == 2 {
                    groups.start + part
                } else {
                    usize::MAX
                };
                for g in groups {
                    if g == due {
                        due += parts;
                        // A prefetch is a hint: it reads nothing into the program and never
                        // faults (past the tile's end it fetches the start of the next one).
                        let next = (g + job.groups_per_block) * GROUP_BYTES + GROUP * c0;
                        _mm_prefetch::<_MM_HINT_T0>(weights.wrapping_add(next).cast());
                    }
                    // SAFETY: row `r < R` of `codes` has `k_pad` bytes and `g * GROUP + 4 <=
                    // k_pad`.
                    let codes: [__m256i; R] = std::array::from_fn(|r| unsafe {
                        _mm256_set1_epi32(std::ptr::read_unaligned(
                            codes.add(r * job.k_pad + g * GROUP).cast::<i32>(),
                        ))
                    });
                    // Channels `c0..c0 + 8V` are bytes `4·c0..` of the group (4 inputs each).
                    let w = weights.wrapping_add(g * GROUP_BYTES + GROUP * c0);
                    for v in 0..V {
                        // SAFETY: group `g` of the tile has `GROUP_BYTES` bytes, and `GROUP ·
                        // (c0 + 8v) + 32 <= GROUP_BYTES`.
                        let w = unsafe { _mm256_loadu_si256(w.add(32 * v).cast()) };
                        let magnitude = _mm256_abs_epi8(w);
                        for (acc, a) in acc.iter_mut().zip(&codes) {
                            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(*a, w));
                            acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let row_scale = _mm256_set1_ps(job.row_scales[r * job.blocks + b]);
                    for (v, acc) in acc.iter().enumerate() {
                        let at = b * TILE + c0 + 8 * v;
                        let scales = &job.scales[at..at + 8];
                        // SAFETY: `scales` holds 8 floats; row `r < R` and columns
                        // `c0 + 8v .. +8 <= TILE` of `out`, as the caller guarantees.
                        unsafe {
                            let scale = _mm256_mul_ps(_mm256_loadu_ps(scales.as_ptr()), row_scale);
                            let value = _mm256_mul_ps(_mm256_cvtepi32_ps(*acc), scale);
                            let out = job.out.add(r * job.stride + c0 + 8 * v);
                            let sum = if b == 0 {
                                value
                            } else {
                                _mm256_add_ps(_mm256_loadu_ps(out), value)
                            };
                            _mm256_storeu_ps(out, sum);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{GROUP, GROUP_BYTES, LANES, PANELS, TileJob, store_block};

    /// `R` rows × one tile with `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI, and `job.out` must be valid for writes of
    /// `R` rows of [`TILE`] floats at `job.stride`.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(job: &TileJob) {
        let codes = job.codes.as_ptr();
        for b in job.run.clone() {
            let mut acc = [[_mm512_setzero_si512(); PANELS]; R];
            for g in b * job.groups_per_block..(b + 1) * job.groups_per_block {
                let w = &job.weights[g * GROUP_BYTES..(g + 1) * GROUP_BYTES];
                // SAFETY: `w` holds PANELS × 64 bytes; each load reads one 64-byte panel.
                let panels: [__m512i; PANELS] = std::array::from_fn(|p| unsafe {
                    _mm512_loadu_si512(w.as_ptr().add(p * LANES * GROUP).cast())
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: row `r < R` of `codes` has `k_pad` bytes and `g * GROUP + 4 <= k_pad`.
                    let a = unsafe {
                        std::ptr::read_unaligned(codes.add(r * job.k_pad + g * GROUP).cast::<i32>())
                    };
                    let a = _mm512_set1_epi32(a);
                    for (acc, w) in acc.iter_mut().zip(&panels) {
                        *acc = _mm512_dpbusd_epi32(*acc, a, *w);
                    }
                }
            }
            for p in 0..PANELS {
                for (r, acc) in acc.iter().enumerate() {
                    // SAFETY: row `r < R`, block `b` and group `p` of this tile, as the caller
                    // guarantees.
                    unsafe { store_block(job, b, p, r, acc[p]) };
                }
            }
        }
    }
}

/// Turns row `r`'s i32 sums of block `b` and channel group `p` into f32 (the block's zero-point
/// offsets removed, the weight and row scales applied) and adds them to the output row (the
/// first block stores them). The VNNI and AMX kernels both end here, so they give the same bits.
///
/// # Safety
/// The CPU must have AVX-512F, and row `r` of `job.out` be valid for writes of group `p`'s 16
/// columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_block(
    job: &TileJob,
    b: usize,
    p: usize,
    r: usize,
    sums: std::arch::x86_64::__m512i,
) {
    use std::arch::x86_64::*;
    let at = b * TILE + p * LANES;
    let (offsets, scales) = (&job.offsets[at..at + LANES], &job.scales[at..at + LANES]);
    // SAFETY: both slices hold 16 elements; the output row is the caller's guarantee.
    unsafe {
        let value = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_sub_epi32(
                sums,
                _mm512_loadu_si512(offsets.as_ptr().cast()),
            )),
            _mm512_mul_ps(
                _mm512_loadu_ps(scales.as_ptr()),
                _mm512_set1_ps(job.row_scales[r * job.blocks + b]),
            ),
        );
        let out = job.out.add(r * job.stride + p * LANES);
        let total = if b == 0 {
            value
        } else {
            _mm512_add_ps(_mm512_loadu_ps(out), value)
        };
        _mm512_storeu_ps(out, total);
    }
}

/// The AMX tile kernel: per block, `n <= 16` activation rows times the tile's four panels of 16
/// channels, summed exactly in i32 by `tdpbusd` (the same sums `vpdpbusd` forms) and turned into
/// f32 by the same vector steps as [`vnni::tile`], so both give the same bits. Stable Rust has no
/// AMX intrinsics: the tile instructions are written in `asm!`, and Linux must first grant the
/// process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16 and later).
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{GROUP, GROUP_BYTES, LANES, PANELS, TileJob};

    /// Inputs per `tdpbusd`: a tile row holds 64 bytes.
    pub(super) const STEP: usize = 64;
    /// Rows per kernel call: a tile holds 16.
    pub(super) const ROWS: usize = 16;

    /// Whether this CPU has AMX-INT8 and the OS has granted this process the tile state.
    pub(super) fn ready() -> bool {
        crate::model::amx::ready(crate::model::amx::Feature::Int8)
    }

    /// `n <= 16` rows × one tile.
    ///
    /// # Safety
    /// [`ready`] must be true, the weight's block a multiple of [`STEP`], and `job.out` valid
    /// for writes of `n` rows of [`TILE`] floats at `job.stride`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(job: &TileJob, n: usize) {
        // Sums: `n` rows of 16 i32; activations: `n` rows of 64 bytes; weights: 16 groups of 4
        // inputs × 16 channels.
        let cfg = crate::model::amx::tile_config(n);
        let mut sums = [[[0i32; LANES]; ROWS]; PANELS];
        let (codes, weights) = (job.codes.as_ptr(), job.weights.as_ptr());
        // SAFETY: `cfg` is a valid palette-1 configuration, read once by `ldtilecfg`.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack)) };
        for b in job.run.clone() {
            // SAFETY: zeroing the four sum tiles configured above.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                )
            };
            let groups = b * job.groups_per_block..(b + 1) * job.groups_per_block;
            for g in groups.step_by(STEP / GROUP) {
                // SAFETY: the activation tile reads `n` rows of 64 bytes from column `g*4` at
                // stride `k_pad` (`g*4 + 64 <= k_pad`: the block is whole steps); each weight
                // tile reads 16 groups of one 64-byte panel at the group stride, inside the
                // tile's packed weights.
                unsafe {
                    let a = codes.add(g * GROUP);
                    let w = weights.add(g * GROUP_BYTES);
                    if job.streams {
                        crate::model::amx::prefetch_ahead(w.cast(), STEP / GROUP * GROUP_BYTES);
                    }
                    asm!(
                        "tileloadd tmm4, [{a} + {ka}*1]",
                        "tileloadd tmm5, [{w0} + {kw}*1]",
                        "tdpbusd tmm0, tmm4, tmm5",
                        "tileloadd tmm6, [{w1} + {kw}*1]",
                        "tdpbusd tmm1, tmm4, tmm6",
                        "tileloadd tmm7, [{w2} + {kw}*1]",
                        "tdpbusd tmm2, tmm4, tmm7",
                        "tileloadd tmm5, [{w3} + {kw}*1]",
                        "tdpbusd tmm3, tmm4, tmm5",
                        a = in(reg) a,
                        ka = in(reg) job.k_pad,
                        w0 = in(reg) w,
                        w1 = in(reg) w.add(LANES * GROUP),
                        w2 = in(reg) w.add(2 * LANES * GROUP),
                        w3 = in(reg) w.add(3 * LANES * GROUP),
                        kw = in(reg) GROUP_BYTES,
                        options(nostack, readonly),
                    );
                }
            }
            // SAFETY: each store writes `n <= 16` rows of 64 bytes into its panel of `sums`.
            unsafe {
                asm!(
                    "tilestored [{s0} + {stride}*1], tmm0",
                    "tilestored [{s1} + {stride}*1], tmm1",
                    "tilestored [{s2} + {stride}*1], tmm2",
                    "tilestored [{s3} + {stride}*1], tmm3",
                    s0 = in(reg) sums[0].as_mut_ptr(),
                    s1 = in(reg) sums[1].as_mut_ptr(),
                    s2 = in(reg) sums[2].as_mut_ptr(),
                    s3 = in(reg) sums[3].as_mut_ptr(),
                    stride = in(reg) LANES * 4,
                    options(nostack),
                );
            }
            for (p, panel) in sums.iter().enumerate() {
                for (r, sum) in panel.iter().take(n).enumerate() {
                    // SAFETY: `sum` holds 16 i32; row `r < n`, block `b` and group `p` of this
                    // tile, as the caller guarantees.
                    unsafe {
                        let sum = _mm512_loadu_si512(sum.as_ptr().cast());
                        super::store_block(job, b, p, r, sum);
                    }
                }
            }
        }
        // SAFETY: returns the tile state to its initial configuration.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Absolute error per input, generously, where a block's two scales multiply to below f32's
/// normal range and the product of the block is rounded to a subnormal step.
pub const UNDERFLOW: f64 = 1.0 / (1u128 << 120) as f64;

/// Whether this CPU multiplies int8 with dot-product instructions (AVX-512 VNNI or AMX), at
/// several times f32's multiply-add rate; AVX2 multiplies at about f32's rate (see the `avx2`
/// kernel), and the portable kernel far below it.
pub fn multiplies_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(Kernel::detect(), Kernel::Vnni | Kernel::Amx) {
        return true;
    }
    false
}

/// Whether this CPU runs the int8 product with vector instructions at all.
pub fn vectorized() -> bool {
    Kernel::detect() != Kernel::Portable
}

impl Product for Int8Linear {
    const NAME: &'static str = "int8-linear";

    fn input(&self) -> usize {
        self.dims.input
    }

    fn out(&self) -> usize {
        self.out
    }

    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_with(x, rows, Kernel::detect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, out: usize, input: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..input)
                    .map(|k| x[r * input + k] * w[o * input + k])
                    .sum();
            }
        }
        y
    }

    /// Shapes that exercise partial tiles, partial row groups, partial blocks and padding.
    const SHAPES: [(usize, usize, usize); 7] = [
        (1, 64, 128),
        (3, 70, 384),
        (5, 130, 100),
        (16, 200, 1024),
        (7, 1, 6),
        (40, 130, 256),
        (17, 64, 640),
    ];

    #[test]
    fn int8_product_is_close_to_f32() {
        for (i, &(rows, out, input)) in SHAPES.iter().enumerate() {
            let (x, w) = (
                random(rows * input, i as u64),
                random(out * input, 100 + i as u64),
            );
            let q = Int8Linear::quantize(&w, out, input);
            let (y, exact) = (
                q.matmul_with(&x, rows, Kernel::Portable),
                reference(&x, &w, rows, out, input),
            );
            assert_eq!(y.len(), exact.len());
            // Two roundings of ±1/254 of each block's largest value, over `input` products.
            let bound = 2.0 * (input as f32).sqrt() / 127.0;
            for (a, b) in y.iter().zip(&exact) {
                assert!((a - b).abs() <= bound, "{rows}x{out}x{input}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn every_kernel_this_cpu_has_equals_the_portable_one_bit_for_bit() {
        let mut kernels = vec![Kernel::detect()];
        #[cfg(target_arch = "x86_64")]
        {
            if kernels[0] == Kernel::Amx {
                kernels.push(Kernel::Vnni);
            } else {
                eprintln!("this CPU (or OS) has no AMX-INT8: the AMX kernel is not compared");
            }
            if is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels.retain(|&k| k != Kernel::Portable);
        kernels.dedup();
        eprintln!("comparing {kernels:?} with the portable kernel");
        for kernel in kernels {
            for (i, &(rows, out, input)) in SHAPES.iter().enumerate() {
                let (x, w) = (
                    random(rows * input, i as u64),
                    random(out * input, 100 + i as u64),
                );
                let q = Int8Linear::quantize(&w, out, input);
                assert_eq!(
                    q.matmul_with(&x, rows, kernel),
                    q.matmul_with(&x, rows, Kernel::Portable),
                    "{kernel:?} on {rows}x{out}x{input}"
                );
            }
        }
    }

    #[test]
    fn zero_rows_and_blocks_give_zero() {
        let q = Int8Linear::quantize(&[0.0; 6 * 8], 6, 8);
        assert_eq!(q.matmul(&random(2 * 8, 7), 2), vec![0.0; 12]);
        let q = Int8Linear::quantize(&random(6 * 8, 8), 6, 8);
        assert_eq!(q.matmul(&[0.0; 8], 1), vec![0.0; 6]);
    }
}
