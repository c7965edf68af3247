//! What the CPU matrix products of packed weights share ([`super::f32_linear`],
//! [`super::bf16_linear`], [`super::int8`]): the candle op that runs one over the last dimension
//! of a tensor, and the padded output rows their parallel tasks fill, each its own columns.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// A weight `(out, input)` that multiplies f32 rows on the CPU.
pub trait Product {
    /// The candle op's name.
    const NAME: &'static str;

    fn input(&self) -> usize;

    fn out(&self) -> usize;

    /// `x·Wᵀ` for the row-major `x` of shape `(rows, input)`, row-major `(rows, out)`.
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32>;
}

/// `x·Wᵀ` over the last dimension of a contiguous f32 CPU tensor, as a candle op.
pub struct AsOp<'a, P>(pub &'a P);

impl<P: Product> CustomOp1 for AsOp<'_, P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = P::NAME;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name} needs a contiguous input")))?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let input = self.0.input();
        let mut dims = layout.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == input => *last = self.0.out(),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "{name} expects {input} inputs, got shape {:?}",
                    layout.dims()
                )));
            }
        }
        let rows = x.len() / input.max(1);
        Ok((CpuStorage::F32(self.0.matmul(x, rows)), Shape::from(dims)))
    }
}

/// `rows` output rows of `width` columns (whole panels of a packed weight), written by
/// parallel tasks through [`PaddedOut::shared`] and then cut to the weight's real width.
pub struct PaddedOut {
    y: Vec<f32>,
    rows: usize,
    width: usize,
}

impl PaddedOut {
    pub fn new(rows: usize, width: usize) -> Self {
        Self {
            y: Vec::with_capacity(rows * width),
            rows,
            width,
        }
    }

    /// The pointer the tasks write through (row `r`, column `c` at `r * width + c`).
    pub fn shared(&mut self) -> SharedOut {
        SharedOut(self.y.as_mut_ptr())
    }

    /// The rows cut to `out` columns.
    ///
    /// # Safety
    /// Every one of the `rows × width` elements must have been written.
    pub unsafe fn finish(self, out: usize) -> Vec<f32> {
        let Self { mut y, rows, width } = self;
        // SAFETY: the caller wrote every element within the capacity.
        unsafe { y.set_len(rows * width) };
        if width != out {
            for r in 1..rows {
                y.copy_within(r * width..r * width + out, r * out);
            }
            y.truncate(rows * out);
        }
        y
    }
}

/// The output pointer shared by parallel tasks, each of which writes its own elements.
#[derive(Clone, Copy)]
pub struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (each product's loop says which).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
