//! Intel AMX (Sapphire Rapids and later): whether this process may use the tile instructions.
//! The CPU must report the feature (CPUID), and Linux must grant the process the tile data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16 and later) and enable it in XCR0. Stable Rust
//! has neither AMX intrinsics nor target features, so the kernels that use the tiles
//! ([`super::int8`], [`super::bf16_linear`]) write them in `asm!` and ask here first.

/// An AMX instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `tdpbusd` and friends (u8 × i8 → i32).
    Int8,
    /// `tdpbf16ps` (bf16 pairs → f32).
    Bf16,
}

/// The tile configuration both kernels use (palette 1, every tile row 64 bytes): tiles 0-3 the
/// sums of four groups of 16 output channels for `n <= 16` rows, tile 4 those rows'
/// activations, tiles 5-7 weight tiles of 16 rows. `ldtilecfg` reads it.
pub fn tile_config(n: usize) -> [u8; 64] {
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for t in 0..8 {
        cfg[16 + 2 * t] = 64;
        cfg[48 + t] = if t < 5 { n as u8 } else { 16 };
    }
    cfg
}

/// How far ahead of its current step a kernel asks for weights: two 4 KB steps. Streaming
/// `lm_head` (128 MB in int8 at mt0-small) with tile loads alone reached about half the read
/// bandwidth plain vector loads reach (the hardware prefetchers do not seem to follow
/// `tileloadd`); asking for the weights two steps early doubled a one-row greedy step's rate
/// (`cargo bench --bench engine -- greedy`). Only a product's first pass over a weight asks:
/// its later row groups find the weight in the cache.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 8192;

/// Asks the cache for the `bytes` of a weight stream lying [`PREFETCH_AHEAD`] bytes past
/// `step` (a prefetch never faults, so the stream's end may be passed).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch_ahead(step: *const u8, bytes: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let at = step.wrapping_add(PREFETCH_AHEAD);
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is a hint: it reads nothing into the program and never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line).cast()) };
    }
}

/// Whether this CPU has AMX-TILE and `feature`, and the OS granted this process the tile state
/// (asked once, the first time).
#[cfg(target_arch = "x86_64")]
pub fn ready(feature: Feature) -> bool {
    use std::arch::x86_64::__cpuid_count;
    use std::sync::OnceLock;

    static GRANTED: OnceLock<bool> = OnceLock::new();
    // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 22 AMX-BF16, bit 25 AMX-INT8.
    let bit = match feature {
        Feature::Int8 => 25,
        Feature::Bf16 => 22,
    };
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 24) == 0 || edx & (1 << bit) == 0 || !is_x86_feature_detected!("avx512f") {
        return false;
    }
    *GRANTED.get_or_init(|| {
        let granted = request_tile_state();
        if !granted {
            tracing::info!(
                "the CPU has AMX but the OS did not grant the tile state; AVX-512 runs instead"
            );
        }
        granted
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn ready(_: Feature) -> bool {
    false
}

/// Asks Linux for the AMX tile data state (`ARCH_REQ_XCOMP_PERM`, feature 18) and checks that
/// XCR0 has it enabled.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    use std::arch::asm;

    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let rc: i64;
    // SAFETY: the arch_prctl system call with integer arguments; it changes no memory of this
    // process, and `syscall` clobbers only rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => rc,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if rc != 0 {
        return false;
    }
    let (low, _high): (u32, u32);
    // SAFETY: XGETBV 0 reads XCR0; AVX-512 being detected (checked by the caller) means the OS
    // enabled XSAVE.
    unsafe {
        asm!("xgetbv", in("ecx") 0, out("eax") low, out("edx") _high, options(nomem, nostack))
    };
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA).
    low & (0b11 << 17) == 0b11 << 17
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}
