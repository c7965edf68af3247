//! The matrix product behind `--dtype bf16` on the CPU: `y = x·Wᵀ` with `W` rounded to bf16 once
//! at load time and `x` rounded at every call, products summed in f32 by AMX-BF16's `tdpbf16ps`
//! tiles where the CPU has them (Sapphire Rapids and later), else by AVX512-BF16's `vdpbf16ps`.
//!
//! The layout is [`super::f32_linear`]'s with pairs of inputs: panels of [`PANEL`] output
//! channels, for each pair of inputs `(2j, 2j+1)` the panel's 64 weight pairs side by side (one
//! 64-byte load feeds 16 channels), each activation pair broadcast to them; it is also the tiles'
//! own layout. Each output's sums run the same way whatever the batch, so a row's output does not
//! depend on which other rows share the call. The kernels round their sums differently, so their
//! last bits differ: a layer runs on one of them for every call (tiles wherever its input is whole
//! tile steps of 32), and all stay within f32 summation's error of the rounded operands' exact
//! product (unit test).
//!
//! `--dtype bf16` runs only on CPUs with AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and
//! later; AMD Zen 4 and later): [`available`] says whether this one has it, and loading refuses
//! bf16 elsewhere.

use half::bf16;
use rayon::prelude::*;

use super::product::{PaddedOut, Product};

/// Output channels per packed panel (four AVX-512 registers).
const PANEL: usize = 64;
/// Rows one kernel pass holds sums for.
const ROWS: usize = 6;

/// Whether this CPU has bf16 instructions of its own (AVX512-BF16), which `--dtype bf16` needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which implementation of the product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AMX-BF16 tiles, for inputs of whole tile steps.
    Tiles,
    /// AVX512-BF16's `vdpbf16ps`.
    Dot,
}

impl Kernel {
    /// Whether this CPU has the instructions the kernel runs (tiles also need whole tile steps).
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Tiles => amx::ready(),
                Self::Dot => available(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// A weight `(out, in)` rounded to bf16 and packed into panels of [`PANEL`] channels.
#[derive(Debug)]
pub struct Bf16Linear {
    out: usize,
    input: usize,
    /// Input pairs, `input` rounded up to even.
    pairs: usize,
    /// `[panel][pair][channel in panel]`: the two inputs' bf16 bits, the even input low.
    packed: Vec<u32>,
}

/// The bits of two bf16 values as `vdpbf16ps` reads a lane: `even` in the low half.
fn pair(even: f32, odd: f32) -> u32 {
    u32::from(bf16::from_f32(even).to_bits()) | (u32::from(bf16::from_f32(odd).to_bits()) << 16)
}

impl Bf16Linear {
    /// Rounds (to nearest, ties to even) and packs the row-major f32 weight `w` of shape
    /// `(out, input)`.
    pub fn pack(w: &[f32], out: usize, input: usize) -> Self {
        assert_eq!(w.len(), out * input, "weight of {out}x{input}");
        let pairs = input.div_ceil(2);
        let panels = out.div_ceil(PANEL);
        let mut packed = vec![0u32; panels * pairs * PANEL];
        packed
            .par_chunks_mut(pairs * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(out - p * PANEL) {
                    let w = |k: usize| {
                        if k < input {
                            w[(p * PANEL + c) * input + k]
                        } else {
                            0.0
                        }
                    };
                    for j in 0..pairs {
                        panel[j * PANEL + c] = pair(w(2 * j), w(2 * j + 1));
                    }
                }
            });
        Self {
            out,
            input,
            pairs,
            packed,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.packed.len() * 4
    }
}

impl Product for Bf16Linear {
    const NAME: &'static str = "bf16-linear";

    fn input(&self) -> usize {
        self.input
    }

    fn out(&self) -> usize {
        self.out
    }

    /// # Panics
    /// On a CPU without AVX512-BF16 ([`available`]; loading refuses bf16 there).
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let kernel = if self.has_tiles() {
            Kernel::Tiles
        } else {
            Kernel::Dot
        };
        self.matmul_on(x, rows, kernel)
    }
}

impl Bf16Linear {
    /// Whether [`Product::matmul`] runs on AMX tiles on this CPU.
    pub fn has_tiles(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.pairs.is_multiple_of(amx::STEP) && amx::ready()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    fn matmul_on(&self, x: &[f32], rows: usize, kernel: Kernel) -> Vec<f32> {
        assert!(
            kernel.runs_here(),
            "this CPU cannot run the bf16 kernel {kernel:?}"
        );
        assert_eq!(x.len(), rows * self.input, "{rows} rows of {}", self.input);
        let acts: Vec<u32> = x
            .chunks_exact(self.input.max(1))
            .flat_map(|row| {
                row.chunks(2)
                    .map(|two| pair(two[0], two.get(1).copied().unwrap_or(0.0)))
            })
            .collect();
        let panels = self.out.div_ceil(PANEL);
        let width = panels * PANEL;
        let mut y = PaddedOut::new(rows, width);
        let out = y.shared();
        (0..panels).into_par_iter().for_each(|p| {
            let job = Job {
                panel: &self.packed[p * self.pairs * PANEL..(p + 1) * self.pairs * PANEL],
                acts: &acts,
                pairs: self.pairs,
                rows,
                out: out.at(p * PANEL),
                stride: width,
            };
            // SAFETY: panel `p` writes only columns `p*PANEL..(p+1)*PANEL` of `y` (row stride
            // `width`), which no other task writes; `y` has room for `rows × width` floats and
            // outlives the loop; the CPU runs `kernel` (the callers pick one it has).
            unsafe { run(&job, kernel) };
        });
        // SAFETY: the panels cover all `width` columns of all rows, and each pass stores every
        // element of its rows and panel.
        unsafe { y.finish(self.out) }
    }
}

/// One panel times every row of the rounded activations.
struct Job<'a> {
    /// `[pair][channel]`, `pairs × PANEL`.
    panel: &'a [u32],
    /// `[row][pair]`.
    acts: &'a [u32],
    pairs: usize,
    rows: usize,
    out: *mut f32,
    stride: usize,
}

/// # Safety
/// The CPU must run `kernel` (AVX512-BF16 for [`Kernel::Dot`], AMX-BF16 granted and `job.pairs`
/// whole tile steps for [`Kernel::Tiles`]), and `job.out`
/// be valid for writes of `job.rows` rows of [`PANEL`] floats at `job.stride`.
unsafe fn run(job: &Job, kernel: Kernel) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Tiles {
        for r0 in (0..job.rows).step_by(amx::ROWS) {
            // SAFETY: forwarded from the caller; rows `r0..r0+n` exist.
            unsafe { amx::pass(job, r0, (job.rows - r0).min(amx::ROWS)) };
        }
        return;
    }
    let mut r0 = 0;
    while r0 < job.rows {
        let n = (job.rows - r0).min(ROWS);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller; rows `r0..r0+n` exist.
        unsafe {
            match n {
                1 => avx512::pass::<1>(job, r0),
                2 => avx512::pass::<2>(job, r0),
                3 => avx512::pass::<3>(job, r0),
                4 => avx512::pass::<4>(job, r0),
                5 => avx512::pass::<5>(job, r0),
                _ => avx512::pass::<ROWS>(job, r0),
            }
        }
        r0 += n;
    }
}

/// The AMX-BF16 kernel: `n <= 16` rows times the panel's four groups of 16 channels, 16 input
/// pairs per `tdpbf16ps`. The packed panel is already the tiles' layout (a weight tile row is one
/// pair of inputs for 16 channels, 64 bytes; rows 256 bytes apart), and so are the rounded
/// activations (a row of 16 pairs), so the tiles load both in place.
#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use super::{Job, PANEL};
    use crate::model::amx::Feature;

    /// Input pairs per `tdpbf16ps`: a tile row holds 64 bytes.
    pub(super) const STEP: usize = 16;
    /// Rows per pass: a tile holds 16.
    pub(super) const ROWS: usize = 16;

    pub(super) fn ready() -> bool {
        crate::model::amx::ready(Feature::Bf16)
    }

    /// Rows `r0..r0 + n` (`n <= 16`) of the panel.
    ///
    /// # Safety
    /// [`ready`] must be true, `job.pairs` a multiple of [`STEP`], and `job.out` valid for
    /// writes of rows `r0..r0 + n` of [`PANEL`] floats at `job.stride`.
    pub(super) unsafe fn pass(job: &Job, r0: usize, n: usize) {
        // Sums: `n` rows of 16 f32; activations: `n` rows of 16 pairs; weights: 16 pairs × 16
        // channels.
        let cfg = crate::model::amx::tile_config(n);
        let (w, a) = (job.panel.as_ptr(), job.acts[r0 * job.pairs..].as_ptr());
        // SAFETY: `cfg` is a valid palette-1 configuration, read once by `ldtilecfg`; then the
        // four sum tiles it configures are zeroed.
        unsafe {
            asm!(
                "ldtilecfg [{}]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                in(reg) cfg.as_ptr(),
                options(nostack, readonly),
            )
        };
        for j in (0..job.pairs).step_by(STEP) {
            // Later row groups find the panel in the cache.
            if r0 == 0 {
                crate::model::amx::prefetch_ahead(
                    w.wrapping_add(j * PANEL).cast(),
                    STEP * PANEL * 4,
                );
            }
            // SAFETY: the activation tile reads `n` rows of 64 bytes from pair `j` at stride
            // `pairs` (`j + 16 <= pairs`, rows `r0..r0+n` exist); each weight tile reads 16 pair
            // rows `j..j+16` of 64 bytes at the panel's row stride, inside the panel.
            unsafe {
                asm!(
                    "tileloadd tmm4, [{a} + {ka}*1]",
                    "tileloadd tmm5, [{w0} + {kw}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tileloadd tmm6, [{w1} + {kw}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tileloadd tmm7, [{w2} + {kw}*1]",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm5, [{w3} + {kw}*1]",
                    "tdpbf16ps tmm3, tmm4, tmm5",
                    a = in(reg) a.add(j),
                    ka = in(reg) job.pairs * 4,
                    w0 = in(reg) w.add(j * PANEL),
                    w1 = in(reg) w.add(j * PANEL + 16),
                    w2 = in(reg) w.add(j * PANEL + 32),
                    w3 = in(reg) w.add(j * PANEL + 48),
                    kw = in(reg) PANEL * 4,
                    options(nostack, readonly),
                );
            }
        }
        // SAFETY: each store writes `n` rows of 16 floats (64 bytes) at the output's row stride,
        // inside rows `r0..r0+n` and the panel's columns; then the tile state is released.
        unsafe {
            let out = job.out.add(r0 * job.stride);
            asm!(
                "tilestored [{o0} + {stride}*1], tmm0",
                "tilestored [{o1} + {stride}*1], tmm1",
                "tilestored [{o2} + {stride}*1], tmm2",
                "tilestored [{o3} + {stride}*1], tmm3",
                "tilerelease",
                o0 = in(reg) out,
                o1 = in(reg) out.add(16),
                o2 = in(reg) out.add(32),
                o3 = in(reg) out.add(48),
                stride = in(reg) job.stride * 4,
                options(nostack),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Job, PANEL};

    const VECTORS: usize = PANEL / 16;

    /// Rows `r0..r0+R` times one panel.
    ///
    /// # Safety
    /// As [`super::run`].
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pass<const R: usize>(job: &Job, r0: usize) {
        let (w, a) = (job.panel.as_ptr(), job.acts.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
        for j in 0..job.pairs {
            // SAFETY: `j < pairs`: the panel's pair row `j` has `PANEL` lanes and row `r0 + r <
            // rows` of the activations has `pairs`. A vector of 32 bf16 is 64 bytes like the
            // integer vector it is loaded as.
            unsafe {
                let ws: [__m512bh; VECTORS] = std::array::from_fn(|v| {
                    std::mem::transmute(_mm512_loadu_si512(w.add(j * PANEL + 16 * v).cast()))
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xs: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        *a.add((r0 + r) * job.pairs + j) as i32,
                    ));
                    for (acc, ws) in acc.iter_mut().zip(&ws) {
                        *acc = _mm512_dpbf16_ps(*acc, *ws, xs);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: row `r0 + r < rows`, columns `16v..16v+16 <= PANEL`.
                unsafe { _mm512_storeu_ps(job.out.add((r0 + r) * job.stride + 16 * v), *acc) };
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

    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 64, 512),
        (3, 70, 385),
        (5, 130, 100),
        (16, 200, 1024),
        (20, 70, 64),
        (75, 67, 33),
    ];

    /// Every kernel this CPU runs for `linear`, saying which it cannot.
    fn kernels(linear: &Bf16Linear) -> Vec<Kernel> {
        let kernels: Vec<Kernel> = [Kernel::Dot, Kernel::Tiles]
            .into_iter()
            .filter(|&k| k.runs_here() && (k != Kernel::Tiles || linear.has_tiles()))
            .collect();
        if !kernels.contains(&Kernel::Dot) {
            eprintln!("this CPU has no AVX512-BF16: the vdpbf16ps kernel cannot run here");
        }
        kernels
    }

    /// The rounded operands' products summed in f64: what the kernel computes but for its f32
    /// sums.
    fn rounded_product(x: &[f32], w: &[f32], r: usize, o: usize, input: usize) -> (f64, f64) {
        let round = |v: f32| f64::from(bf16::from_f32(v).to_f32());
        (0..input).fold((0.0, 0.0), |(s, m), k| {
            let p = round(x[r * input + k]) * round(w[o * input + k]);
            (s + p, m + p.abs())
        })
    }

    #[test]
    fn the_product_is_the_rounded_operands_summed_in_f32() {
        let mut ran = Vec::new();
        for (i, &(rows, out, input)) in SHAPES.iter().enumerate() {
            let (x, w) = (
                random(rows * input, i as u64),
                random(out * input, 50 + i as u64),
            );
            let linear = Bf16Linear::pack(&w, out, input);
            for kernel in kernels(&linear) {
                let y = linear.matmul_on(&x, rows, kernel);
                if !ran.contains(&kernel) {
                    ran.push(kernel);
                }
                for r in 0..rows {
                    for o in 0..out {
                        let (exact, magnitude) = rounded_product(&x, &w, r, o, input);
                        // Products of bf16 values are exact in f32; `input` f32 additions round.
                        let bound = input as f64 * f64::from(f32::EPSILON) * magnitude;
                        let got = f64::from(y[r * out + o]);
                        assert!(
                            (got - exact).abs() <= bound,
                            "{kernel:?} {rows}x{out}x{input} [{r},{o}]: {got} vs {exact}"
                        );
                    }
                }
            }
        }
        eprintln!("kernels held to the bound on this CPU: {ran:?}");
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        // More rows than a tile holds, so some share a tile pass with others and some do not.
        let (rows, out, input) = (21, 130, 96);
        let (x, w) = (random(rows * input, 1), random(out * input, 2));
        let linear = Bf16Linear::pack(&w, out, input);
        for kernel in kernels(&linear) {
            let batch = linear.matmul_on(&x, rows, kernel);
            for r in 0..rows {
                let alone = linear.matmul_on(&x[r * input..(r + 1) * input], 1, kernel);
                assert_eq!(alone, batch[r * out..(r + 1) * out], "row {r}, {kernel:?}");
            }
        }
    }
}
