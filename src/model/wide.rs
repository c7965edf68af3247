//! Kernels compiled three times: for the baseline x86-64 (SSE2) the binary targets, for AVX2
//! and for AVX-512, picked at run time. The binary must run on any x86-64 CPU, so only code
//! inside a `#[target_feature]` function may use wider vectors; [`wide`] is that function for any
//! [`Kernel`], so plain loops (no intrinsics) get 16-wide vectors where the CPU has AVX-512 and
//! 8-wide ones where it has AVX2 (AMD Zen 3 and older, Intel client cores).

/// Work whose loops [`wide`] compiles for wider vectors. `run` must be `#[inline(always)]`, so it
/// is compiled into [`wide`]'s AVX-512 and AVX2 copies for certain. A closure (or a function passed by value)
/// is inlined there only if the compiler's size heuristics allow, and large ones were not: their
/// loops stayed SSE.
pub trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for AVX-512 where the CPU has it, else for AVX2: its loops then use
/// 16- or 8-wide vectors instead of the baseline's 4-wide SSE. The same operations in the same
/// order every way (no fused multiply-adds: Rust never contracts), so the same bits.
#[inline(always)]
pub fn wide<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512(kernel) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2(kernel) };
    }
    kernel.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<K: Kernel>(kernel: K) -> K::Output {
    kernel.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<K: Kernel>(kernel: K) -> K::Output {
    kernel.run()
}
