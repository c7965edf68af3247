//! A bias-free projection `y = x·Wᵀ` whose weight is f32 packed for the CPU kernels (see
//! [`super::f32_linear`]), int8 (`--quantize q8`, see [`super::int8`]) or dense as loaded (f32
//! or bf16 on a GPU).
//!
//! Packing and quantization happen after the LoRA merge, on the merged f32 weight, so an adapter
//! is never applied to rounded weights.
//!
//! [`SharedLayers`] builds the layers of every merged variant of one base: a layer whose
//! checkpoint tensors no adapter of the variant changed is the base's own, built (and quantized)
//! once and shared by reference.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Module, Tensor, TensorId};

use crate::error::{Error, Result};
use crate::model::bf16_linear::{self, Bf16Linear};
use crate::model::f32_linear::F32Linear;
use crate::model::greedy::GreedyHead;
use crate::model::int8::Int8Linear;
use crate::model::product::AsOp;
use crate::model::weights::Weights;

/// How the linear layers store their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Weights as loaded (`--dtype`).
    #[default]
    None,
    /// int8 with one scale per output channel and block of 128 inputs (CPU).
    Q8,
    /// bf16, rounded from the f32 weights (`--dtype bf16` on the CPU).
    Bf16,
}

impl Quantization {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "none" | "off" => Ok(Self::None),
            "q8" => Ok(Self::Q8),
            other => Err(Error::InvalidArgument(format!(
                "unknown quantization `{other}` (none or q8)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Q8 => "q8",
            Self::Bf16 => "bf16",
        }
    }
}

/// Up to this many rows a dense projection runs as `W·xᵀ` (see [`Linear::forward_wide`]): decode
/// steps, whose few rows would otherwise pay for repacking the whole weight on every call.
const FEW_ROWS: usize = 64;

#[derive(Debug, Clone)]
pub enum Linear {
    /// As loaded: bf16 or f32 on a GPU, or f32 on a CPU [`Linear::pack`] was not asked of.
    Dense(Tensor),
    /// f32 on the CPU, packed for [`F32Linear`]'s kernels.
    F32(Arc<F32Linear>),
    /// bf16 on the CPU (`--dtype bf16`), packed for [`Bf16Linear`]'s kernel.
    Bf16(Arc<Bf16Linear>),
    Q8(Arc<Int8Linear>),
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self::Dense(weight)
    }

    /// Packs a dense f32 CPU weight for the CPU kernels (see [`super::f32_linear`]); other
    /// weights stay as they are.
    pub fn pack(&mut self) -> Result<()> {
        let Self::Dense(w) = self else {
            return Ok(());
        };
        if w.dtype() != DType::F32 || !w.device().is_cpu() {
            return Ok(());
        }
        let (out, input) = w.dims2()?;
        let packed = with_cpu_values(w, |values| F32Linear::pack(values, out, input))?;
        *self = Self::F32(Arc::new(packed));
        Ok(())
    }

    /// Replaces a dense f32 CPU weight by its bf16 form (see [`super::bf16_linear`]).
    pub fn round_to_bf16(&mut self, name: &str) -> Result<()> {
        let Self::Dense(w) = self else {
            return Ok(());
        };
        if w.dtype() != DType::F32 || !w.device().is_cpu() || !bf16_linear::available() {
            return Err(Error::InvalidArgument(format!(
                "bf16 weights on the CPU need f32 weights and AVX512-BF16 (`{name}` is {:?} on {:?})",
                w.dtype(),
                w.device().location()
            )));
        }
        let (out, input) = w.dims2()?;
        let rounded = with_cpu_values(w, |values| Bf16Linear::pack(values, out, input))?;
        *self = Self::Bf16(Arc::new(rounded));
        Ok(())
    }

    /// Replaces a dense f32 weight by its int8 form. `name` is for the error message.
    pub fn quantize(&mut self, name: &str) -> Result<()> {
        let Self::Dense(w) = self else {
            return Ok(());
        };
        if w.dtype() != DType::F32 || !w.device().is_cpu() {
            return Err(Error::InvalidArgument(format!(
                "--quantize q8 needs f32 weights on the CPU (`{name}` is {:?} on {:?}; there is no int8 kernel for other devices)",
                w.dtype(),
                w.device().location()
            )));
        }
        let (out, input) = w.dims2()?;
        let q = with_cpu_values(w, |values| Int8Linear::quantize(values, out, input))?;
        *self = Self::Q8(Arc::new(q));
        Ok(())
    }

    /// Which allocation holds the weight and its size in bytes; clones of a layer share both.
    pub fn storage(&self) -> (Storage, usize) {
        match self {
            Self::Dense(w) => Storage::of(w),
            Self::F32(weight) => (
                Storage::Packed(Arc::as_ptr(weight) as usize),
                weight.size_in_bytes(),
            ),
            Self::Bf16(weight) => (
                Storage::Packed(Arc::as_ptr(weight) as usize),
                weight.size_in_bytes(),
            ),
            Self::Q8(weight) => (
                Storage::Packed(Arc::as_ptr(weight) as usize),
                weight.size_in_bytes(),
            ),
        }
    }

    /// `x·Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => {
                let width = x.dim(candle_core::D::Minus1)?;
                let rows = x.elem_count() / width.max(1);
                if rows > FEW_ROWS {
                    return candle_nn::Linear::new(w.clone(), None).forward(x);
                }
                let mut dims = x.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = w.dim(0)?;
                }
                let y = self.forward_wide(&x.reshape((rows, width))?)?;
                y.contiguous()?.reshape(dims)
            }
            Self::F32(weight) => x.contiguous()?.apply_op1_no_bwd(&AsOp(weight.as_ref())),
            Self::Bf16(weight) => x.contiguous()?.apply_op1_no_bwd(&AsOp(weight.as_ref())),
            Self::Q8(weight) => x.contiguous()?.apply_op1_no_bwd(&AsOp(weight.as_ref())),
        }
    }

    /// `rows·Wᵀ` for a 2-D `rows`, in the order that is fastest for a very wide `W` (`lm_head`):
    /// a dense weight with few rows runs as `W·rowsᵀ` (candle's kernels then read it in its
    /// stored layout instead of repacking it per call).
    pub fn forward_wide(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.matmul(&rows.t()?)?.t(),
            Self::F32(_) | Self::Bf16(_) | Self::Q8(_) => self.forward(rows),
        }
    }
}

/// Calls `f` with the f32 values of the contiguous CPU tensor `w`, read in place: a copy of
/// `lm_head` alone is 0.5 GB of peak memory for mt0-small.
fn with_cpu_values<T>(w: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Err(Error::InvalidArgument(
            "a weight to pack is not a contiguous CPU tensor".into(),
        ));
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// The identity of a weight allocation, to count memory shared between models once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Storage {
    Dense(TensorId),
    /// A packed weight ([`F32Linear`], [`Bf16Linear`] or [`Int8Linear`]), by address.
    Packed(usize),
}

impl Storage {
    pub fn of(t: &Tensor) -> (Self, usize) {
        (
            Self::Dense(t.id()),
            t.elem_count() * t.dtype().size_in_bytes(),
        )
    }
}

/// The linear layers (and other tensors) of one base checkpoint, built once and reused by every
/// model built from it whose tensors for that layer are unmodified (see
/// [`Weights::is_modified`]).
#[derive(Debug, Default)]
pub struct SharedLayers {
    quantization: Quantization,
    /// Whether an f32 `lm_head` gets the int8 screen of [`GreedyHead`].
    greedy_screen: bool,
    built: HashMap<String, Linear>,
    /// The base's other tensors, by checkpoint name.
    tensors: HashMap<String, Tensor>,
    /// The screen of the base's `lm_head`, once built.
    greedy: Option<Arc<GreedyHead>>,
}

impl SharedLayers {
    pub fn new(quantization: Quantization) -> Self {
        Self {
            quantization,
            ..Self::default()
        }
    }

    /// Asks for [`GreedyHead`]'s screen on packed f32 `lm_head`s (where the CPU runs the int8
    /// product with vector instructions).
    pub fn with_greedy_screen(self, on: bool) -> Self {
        Self {
            greedy_screen: on,
            ..self
        }
    }

    /// The greedy screen of `head` (see [`super::greedy`]), if asked for and possible; `base`
    /// says whether `head` is the base checkpoint's, whose screen is built once.
    pub fn greedy_head(&mut self, head: &Linear, base: bool) -> Option<Arc<GreedyHead>> {
        let Linear::F32(exact) = head else {
            return None;
        };
        if !self.greedy_screen {
            return None;
        }
        if base && let Some(g) = &self.greedy {
            return Some(g.clone());
        }
        let g = Arc::new(GreedyHead::new(exact.clone())?);
        if base {
            self.greedy = Some(g.clone());
        }
        Some(g)
    }

    /// The layer `key` made of the checkpoint tensors `sources` (stacked along the output
    /// dimension), each `(out_dim, in_dim)`.
    pub fn linear(
        &mut self,
        w: &mut Weights,
        key: &str,
        sources: &[String],
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Linear> {
        let base = sources.iter().all(|s| !w.is_modified(s));
        if base && let Some(layer) = self.built.get(key) {
            sources.iter().for_each(|s| w.discard(s));
            return Ok(layer.clone());
        }
        let parts = sources
            .iter()
            .map(|s| w.take(s, &[out_dim, in_dim]))
            .collect::<Result<Vec<_>>>()?;
        self.layer(key, base, || match parts.as_slice() {
            [one] => Ok(one.clone()),
            _ => Ok(Tensor::cat(&parts, 0)?),
        })
    }

    /// The tensor `name` of `shape` that is not a linear layer (an embedding, a norm), shared
    /// like the layers: the base's is read once for every model built from it.
    pub fn tensor(&mut self, w: &mut Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.tensor_optional(w, name, shape)?
            .ok_or_else(|| Error::weights(w.source(), format!("missing tensor `{name}`")))
    }

    /// Like [`SharedLayers::tensor`], for tensors a checkpoint may leave out.
    pub fn tensor_optional(
        &mut self,
        w: &mut Weights,
        name: &str,
        shape: &[usize],
    ) -> Result<Option<Tensor>> {
        let base = !w.is_modified(name);
        if base && let Some(t) = self.tensors.get(name) {
            w.discard(name);
            return Ok(Some(t.clone()));
        }
        let t = w.take_optional(name, shape)?;
        if let (true, Some(t)) = (base, &t) {
            self.tensors.insert(name.to_string(), t.clone());
        }
        Ok(t)
    }

    /// The layer `key` with the weight `weight` builds; `base` says whether that weight is the
    /// base checkpoint's, in which case a layer built earlier is reused. With q8 or bf16 the
    /// first encoder block stays f32: it reads the raw embeddings, whose outliers make it the
    /// most sensitive to rounding (on the demo model, quantizing it too moves label
    /// probabilities by up to 0.063 against 0.010 without it; rounding it to bf16, by 0.0078
    /// against 0.0034, measured on `vdpbf16ps`).
    pub fn layer(
        &mut self,
        key: &str,
        base: bool,
        weight: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Linear> {
        if base && let Some(layer) = self.built.get(key) {
            return Ok(layer.clone());
        }
        let mut layer = Linear::new(weight()?);
        match self.quantization {
            Quantization::Q8 if !key.starts_with("encoder.block.0.") => layer.quantize(key)?,
            Quantization::Bf16 if !key.starts_with("encoder.block.0.") => {
                layer.round_to_bf16(key)?
            }
            Quantization::None | Quantization::Q8 | Quantization::Bf16 => layer.pack()?,
        }
        if base {
            self.built.insert(key.to_string(), layer.clone());
        }
        Ok(layer)
    }
}
