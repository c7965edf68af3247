//! The dense f32 matrix product `y = x·Wᵀ` on the CPU, with `W` packed once at load time.
//!
//! `W` is stored in panels of [`PANEL`] output channels: for each input `k`, the panel's 64
//! weights lie side by side, so one 64-byte load feeds 16 channels and each activation is
//! broadcast to them. A kernel call keeps up to 6 rows × 64 channels of sums in registers;
//! several groups of rows take turns on slices of the panel, so its bytes come from memory
//! once, while every group computes; rows go through in blocks of [`ROW_BLOCK`] so that their
//! sums stay in the L1 cache between slices. That reaches most of the CPU's multiply-add rate
//! on many rows and the memory bandwidth on the one row of a decode step (where the work is
//! reading `W`, 0.5 GB for mt0's `lm_head`). candle's own product (the `gemm` crate, AVX2 only on
//! stable Rust) repacks `W` on every call and reaches about half of either.
//!
//! Every output is the chain `s ← fma(w[k], x[k], s)` for `k = 0, 1, …` from `s = 0`: the
//! AVX-512, AVX2 and portable kernels give the same bits, and a row's output does not depend
//! on which other rows share the call (batched equals one at a time, by construction). A unit
//! test holds all of it.
//! Work is split across rayon's pool by panel, so each weight byte is read from memory once
//! per call.

use std::ops::Range;

use rayon::prelude::*;

use super::product::{PaddedOut, Product};

/// Output channels per packed panel (four AVX-512 registers).
const PANEL: usize = 64;
/// Rows one kernel pass holds sums for (`ROWS × 4` registers of 16 channels).
const ROWS: usize = 6;
/// Rows a panel's task multiplies at a time: their sums (12 KB) stay in the L1 cache from one
/// slice to the next, where those of all rows (164 KB for 640) would go to L2 and back at every
/// slice; the panel's own bytes are then read from L2 once per block. 10-25 % on an encoder's
/// 640 rows (Intel Xeon, AVX-512 and AVX2 kernels alike); nothing changes up to 48 rows.
const ROW_BLOCK: usize = 48;
/// Inputs per slice of a panel in the AVX2 and portable kernels: 64 × 256 bytes of weights,
/// which stay in the L1 cache while every group of rows uses them.
const K_SLICE: usize = 64;
/// The AVX-512 kernel's slice: 32 KB, within the 48 KB L1 of the CPUs that have AVX-512, and
/// half the stores and reloads of sums per input (5-15 % over 64 on 96 rows or more).
const K_SLICE_AVX512: usize = 128;
/// How far ahead, in inputs (rows of 256 bytes of the panel), the AVX-512 kernel's first group
/// of rows prefetches the panel: 6 KB. The hardware prefetchers alone leave a decode step of 4
/// to 16 rows well short of the memory bandwidth; with it the decoder of mt0-base's shape takes
/// 10-18 % less per step there (16 to 48 ahead measured the same; one row unchanged).
const PREFETCH_AVX512: usize = 24;

/// A weight `(out, in)` packed into panels of [`PANEL`] channels, zeros past `out`.
#[derive(Debug)]
pub struct F32Linear {
    out: usize,
    input: usize,
    /// `[panel][k][channel in panel]`.
    packed: Vec<f32>,
}

impl F32Linear {
    /// Packs the row-major f32 weight `w` of shape `(out, input)`.
    pub fn pack(w: &[f32], out: usize, input: usize) -> Self {
        assert_eq!(w.len(), out * input, "weight of {out}x{input}");
        let panels = out.div_ceil(PANEL);
        let mut packed = vec![0f32; panels * input * PANEL];
        packed
            .par_chunks_mut(input * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(out - p * PANEL) {
                    let row = &w[(p * PANEL + c) * input..(p * PANEL + c + 1) * input];
                    for (k, &v) in row.iter().enumerate() {
                        panel[k * PANEL + c] = v;
                    }
                }
            });
        Self { out, input, packed }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.packed.len() * 4
    }

    /// `W[c][k]`.
    pub fn weight(&self, c: usize, k: usize) -> f32 {
        self.packed[(c / PANEL * self.input + k) * PANEL + c % PANEL]
    }

    /// Output channel `c` of one row `x`: the same chain as [`Product::matmul`], so the same
    /// bits (unit test), for when only a few channels of a very wide `W` are needed.
    pub fn output(&self, c: usize, x: &[f32]) -> f32 {
        x.iter()
            .enumerate()
            .fold(0.0, |s, (k, &xk)| self.weight(c, k).mul_add(xk, s))
    }

    fn matmul_with(&self, x: &[f32], rows: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.input, "{rows} rows of {}", self.input);
        let panels = self.out.div_ceil(PANEL);
        let width = panels * PANEL;
        let mut y = PaddedOut::new(rows, width);
        let out = y.shared();
        (0..panels).into_par_iter().for_each(|p| {
            let panel = &self.packed[p * self.input * PANEL..(p + 1) * self.input * PANEL];
            for r0 in (0..rows).step_by(ROW_BLOCK) {
                let n = ROW_BLOCK.min(rows - r0);
                let job = Job {
                    panel,
                    x: &x[r0 * self.input..(r0 + n) * self.input],
                    input: self.input,
                    rows: n,
                    out: out.at(r0 * width + p * PANEL),
                    stride: width,
                };
                // SAFETY: panel `p` writes only columns `p*PANEL..(p+1)*PANEL` of `y` (row
                // stride `width`), which no other task writes, here of rows `r0..r0+n`; `y` has
                // room for `rows × width` floats and outlives the loop, and `kernel` runs on
                // this CPU.
                unsafe { kernel.run(&job) };
            }
        });
        // SAFETY: the panels cover all `width` columns of all rows, and each pass stores every
        // element of its rows and panel.
        unsafe { y.finish(self.out) }
    }
}

impl Product for F32Linear {
    const NAME: &'static str = "f32-linear";

    fn input(&self) -> usize {
        self.input
    }

    fn out(&self) -> usize {
        self.out
    }

    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_with(x, rows, Kernel::detect())
    }
}

/// One panel times every row of `x`.
struct Job<'a> {
    /// `[k][channel]`, `input × PANEL` floats.
    panel: &'a [f32],
    x: &'a [f32],
    input: usize,
    rows: usize,
    /// Row 0, the panel's first channel, of `y`; rows `stride` floats apart.
    out: *mut f32,
    stride: usize,
}

/// Which implementation of the panel kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// # Safety
    /// `job.out` must be valid for writes of `job.rows` rows of [`PANEL`] floats at
    /// `job.stride`, and this CPU must support `self`.
    unsafe fn run(self, job: &Job) {
        let groups = job.rows.div_ceil(ROWS);
        let slice = self.k_slice();
        // The panel is walked in slices of `slice` inputs, every group in turn, so its
        // bytes come from memory once and (prefetched a slice ahead) while all groups compute;
        // a whole-panel walk per group fetches it all during the first group and stalls.
        let mut k0 = 0;
        loop {
            let k = k0..(k0 + slice).min(job.input);
            let mut r0 = 0;
            for g in 0..groups {
                // Groups of nearly equal size: a lone trailing row would run its few
                // multiply-add chains at the latency of one, not the CPU's rate.
                let n = job.rows / groups + usize::from(g < job.rows % groups);
                // SAFETY: forwarded from the caller; rows `r0..r0+n` exist.
                unsafe {
                    match n {
                        1 => self.pass::<1>(job, r0, k.clone(), (g, groups)),
                        2 => self.pass::<2>(job, r0, k.clone(), (g, groups)),
                        3 => self.pass::<3>(job, r0, k.clone(), (g, groups)),
                        4 => self.pass::<4>(job, r0, k.clone(), (g, groups)),
                        5 => self.pass::<5>(job, r0, k.clone(), (g, groups)),
                        _ => self.pass::<ROWS>(job, r0, k.clone(), (g, groups)),
                    }
                }
                r0 += n;
            }
            k0 = k.end;
            if k0 >= job.input {
                break;
            }
        }
    }

    /// Inputs per slice of the panel (see [`K_SLICE`]).
    fn k_slice(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => K_SLICE_AVX512,
            _ => K_SLICE,
        }
    }

    /// Adds inputs `k` of rows `r0..r0+R` to their outputs (which start from zero at `k = 0`
    /// and are stored back after every slice, so the chain per output is unchanged). `group`
    /// is `(this group, groups)` in the slice, for kernels that share out its prefetching.
    ///
    /// # Safety
    /// As [`Kernel::run`], for rows `r0..r0+R`; `k` within `0..input`, and the outputs hold
    /// the sums over `0..k.start`.
    unsafe fn pass<const R: usize>(
        self,
        job: &Job,
        r0: usize,
        k: Range<usize>,
        group: (usize, usize),
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Self::Avx512 => avx512::pass::<R>(job, r0, k, group.0 == 0),
                #[cfg(target_arch = "x86_64")]
                Self::Avx2 => match R {
                    1 => avx2::pass::<R, 8>(job, r0, k, group),
                    2 => avx2::pass::<R, 4>(job, r0, k, group),
                    _ => avx2::pass::<R, 2>(job, r0, k, group),
                },
                Self::Portable => portable_pass::<R>(job, r0, k),
            }
        }
    }
}

/// The scalar kernel: the same fused multiply-add chain per output as the SIMD kernels.
///
/// # Safety
/// As [`Kernel::pass`].
unsafe fn portable_pass<const R: usize>(job: &Job, r0: usize, k: Range<usize>) {
    for r in r0..r0 + R {
        let out = job.out.wrapping_add(r * job.stride);
        let mut acc = [0f32; PANEL];
        if k.start > 0 {
            // SAFETY: row `r < rows`, `PANEL` columns, written by the slice before this one.
            unsafe { std::ptr::copy_nonoverlapping(out, acc.as_mut_ptr(), PANEL) };
        }
        let x = &job.x[r * job.input..(r + 1) * job.input];
        for k in k.clone() {
            let w = &job.panel[k * PANEL..(k + 1) * PANEL];
            for (acc, &w) in acc.iter_mut().zip(w) {
                *acc = w.mul_add(x[k], *acc);
            }
        }
        // SAFETY: row `r < rows`, `PANEL` columns, as the caller guarantees.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out, PANEL) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Job, PANEL, PREFETCH_AVX512};

    const VECTORS: usize = PANEL / 16;

    /// Inputs `k` of rows `r0..r0+R` times one panel. The group that reads a slice first
    /// (`first`) prefetches the panel [`PREFETCH_AVX512`] inputs ahead of itself, into the next
    /// slice at its end; the others find the slice in the L1 cache.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the rest as [`super::Kernel::pass`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pass<const R: usize>(job: &Job, r0: usize, k: Range<usize>, first: bool) {
        let (w, x) = (job.panel.as_ptr(), job.x.as_ptr());
        let out = |r: usize, v: usize| job.out.wrapping_add((r0 + r) * job.stride + 16 * v);
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
        if k.start > 0 {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: row `r0 + r < rows`, columns `16v..16v+16 <= PANEL`, written by
                    // the slice before this one.
                    *acc = unsafe { _mm512_loadu_ps(out(r, v)) };
                }
            }
        }
        for k in k {
            if first {
                for v in 0..VECTORS {
                    // A prefetch is a hint: it reads nothing into the program and never faults
                    // (past the panel's end it fetches the start of the next one).
                    let ahead = (k + PREFETCH_AVX512) * PANEL + 16 * v;
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(ahead).cast());
                }
            }
            // SAFETY: `k < input`: the panel's row `k` has `PANEL` floats and row `r0 + r <
            // rows` of `x` has `input`.
            unsafe {
                let ws: [__m512; VECTORS] =
                    std::array::from_fn(|v| _mm512_loadu_ps(w.add(k * PANEL + 16 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xs = _mm512_set1_ps(*x.add((r0 + r) * job.input + k));
                    for (acc, ws) in acc.iter_mut().zip(&ws) {
                        *acc = _mm512_fmadd_ps(*ws, xs, *acc);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: row `r0 + r < rows`, columns `16v..16v+16 <= PANEL`.
                unsafe { _mm512_storeu_ps(out(r, v), *acc) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Job, K_SLICE, PANEL};

    /// Inputs `k` of rows `r0..r0+R` times one panel, `8 × V` channels at a time: `R × V`
    /// registers of sums, enough independent chains to hide the multiply-add latency, plus
    /// `V` of weights fit the 16 registers (the caller picks `V` by `R`).
    ///
    /// With `V = 2` the four passes over a slice each read every fourth cache line, which the
    /// hardware prefetchers do not follow: each pass then prefetches its columns of the next
    /// slice, group `part` of `parts` only the inputs `k ≡ part (mod parts)`, so the requests
    /// spread over the whole slice's work instead of queueing up in the first group's.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; the rest as [`super::Kernel::pass`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pass<const R: usize, const V: usize>(
        job: &Job,
        r0: usize,
        k: Range<usize>,
        (part, parts): (usize, usize),
    ) {
        let (w, x) = (job.panel.as_ptr(), job.x.as_ptr());
        for c0 in (0..PANEL).step_by(8 * V) {
            let out = |r: usize, v: usize| job.out.wrapping_add((r0 + r) * job.stride + c0 + 8 * v);
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            if k.start > 0 {
                for (r, acc) in acc.iter_mut().enumerate() {
                    for (v, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: row `r0 + r < rows`, columns `c0 + 8v .. +8 <= PANEL`,
                        // written by the slice before this one.
                        *acc = unsafe { _mm256_loadu_ps(out(r, v)) };
                    }
                }
            }
            let mut due = if V == 2 { k.start + part } else { usize::MAX };
            for k in k.clone() {
                if k == due {
                    due += parts;
                    // A prefetch is a hint: it reads nothing into the program and never faults
                    // (past the panel's end it fetches the start of the next one).
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((k + K_SLICE) * PANEL + c0).cast());
                }
                // SAFETY: `k < input` and `c0 + 8V <= PANEL`; row `r0 + r < rows` of `x`.
                unsafe {
                    let ws: [__m256; V] =
                        std::array::from_fn(|v| _mm256_loadu_ps(w.add(k * PANEL + c0 + 8 * v)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xs = _mm256_set1_ps(*x.add((r0 + r) * job.input + k));
                        for (acc, ws) in acc.iter_mut().zip(&ws) {
                            *acc = _mm256_fmadd_ps(*ws, xs, *acc);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (v, acc) in acc.iter().enumerate() {
                    // SAFETY: row `r0 + r < rows`, columns `c0 + 8v .. +8 <= PANEL`.
                    unsafe { _mm256_storeu_ps(out(r, v), *acc) };
                }
            }
        }
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

    /// Shapes with partial panels, partial row passes and many rows.
    const SHAPES: [(usize, usize, usize); 10] = [
        (1, 64, 512),
        (100, 70, 300),
        (3, 70, 384),
        (5, 130, 100),
        (16, 200, 1024),
        (7, 1, 6),
        (75, 67, 33),
        (13, 70, 150),
        (2, 130, 200),
        (0, 64, 100),
    ];

    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::detect()];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            kernels.push(Kernel::Avx2);
        }
        kernels.retain(|&k| k != Kernel::Portable);
        kernels.dedup();
        eprintln!("comparing {kernels:?} with the portable kernel");
        kernels
    }

    #[test]
    fn the_product_and_a_single_output_are_the_fused_chain_over_the_inputs() {
        for (i, &(rows, out, input)) in SHAPES.iter().enumerate() {
            let (x, w) = (
                random(rows * input, i as u64),
                random(out * input, 50 + i as u64),
            );
            let linear = F32Linear::pack(&w, out, input);
            let y = linear.matmul_with(&x, rows, Kernel::Portable);
            for r in 0..rows {
                let row = &x[r * input..(r + 1) * input];
                for o in 0..out {
                    let chain = (0..input).fold(0f32, |s, k| w[o * input + k].mul_add(row[k], s));
                    assert_eq!(
                        y[r * out + o].to_bits(),
                        chain.to_bits(),
                        "{rows}x{out}x{input} [{r},{o}]"
                    );
                    assert_eq!(
                        linear.output(o, row).to_bits(),
                        chain.to_bits(),
                        "output({o})"
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_this_cpu_has_equals_the_portable_one_bit_for_bit() {
        for kernel in kernels() {
            for (i, &(rows, out, input)) in SHAPES.iter().enumerate() {
                let (x, w) = (
                    random(rows * input, i as u64),
                    random(out * input, 50 + i as u64),
                );
                let linear = F32Linear::pack(&w, out, input);
                assert_eq!(
                    linear.matmul_with(&x, rows, kernel),
                    linear.matmul_with(&x, rows, Kernel::Portable),
                    "{kernel:?} on {rows}x{out}x{input}"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        // Two blocks of rows, the second of 13 in unequal groups.
        let (rows, out, input) = (61, 130, 96);
        let (x, w) = (random(rows * input, 1), random(out * input, 2));
        let linear = F32Linear::pack(&w, out, input);
        let batch = linear.matmul(&x, rows);
        for r in 0..rows {
            let alone = linear.matmul(&x[r * input..(r + 1) * input], 1);
            assert_eq!(alone, batch[r * out..(r + 1) * out], "row {r}");
        }
    }
}
