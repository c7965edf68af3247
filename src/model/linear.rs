//! A bias-free projection `y = x·Wᵀ` whose weight is either dense (f32, or bf16 on GPU) or
//! int8 (`--quantize q8`, see [`super::int8`]).
//!
//! Quantization happens after the LoRA merge, on the merged f32 weight, so an adapter is never
//! applied to rounded weights.
//!
//! [`SharedLayers`] builds the layers of every merged variant of one base: a layer whose
//! checkpoint tensors no adapter of the variant changed is the base's own, built (and quantized)
//! once and shared by reference.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Module, Tensor, TensorId};

use crate::error::{Error, Result};
use crate::model::int8::Int8Linear;
use crate::model::weights::Weights;

/// How the linear layers store their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Weights as loaded (`--dtype`).
    #[default]
    None,
    /// int8 with one scale per output channel and block of 128 inputs (CPU).
    Q8,
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
        }
    }
}

/// Up to this many rows a dense projection runs as `W·xᵀ` (see [`Linear::forward_wide`]): decode
/// steps, whose few rows would otherwise pay for repacking the whole weight on every call.
const FEW_ROWS: usize = 64;

#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    Q8(Arc<Int8Linear>),
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self::Dense(weight)
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
        let w = w.contiguous()?;
        let q = {
            // Read in place: a copy of `lm_head` alone is 0.5 GB of peak memory for mt0-small.
            let (storage, layout) = w.storage_and_layout();
            let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Err(Error::InvalidArgument(format!(
                    "`{name}` is not a contiguous CPU tensor"
                )));
            };
            Int8Linear::quantize(&cpu.as_slice::<f32>()?[start..end], out, input)
        };
        *self = Self::Q8(Arc::new(q));
        Ok(())
    }

    /// Which allocation holds the weight and its size in bytes; clones of a layer share both.
    pub fn storage(&self) -> (Storage, usize) {
        match self {
            Self::Dense(w) => Storage::of(w),
            Self::Q8(weight) => (
                Storage::Quantized(Arc::as_ptr(weight) as usize),
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
            Self::Q8(weight) => x.contiguous()?.apply_op1_no_bwd(weight.as_ref()),
        }
    }

    /// `rows·Wᵀ` for a 2-D `rows`, in the order that is fastest for a very wide `W` (`lm_head`):
    /// with few rows the dense CPU kernels are far faster as `W·rowsᵀ` (the weight is read in its
    /// stored layout instead of being repacked per call).
    pub fn forward_wide(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.matmul(&rows.t()?)?.t(),
            Self::Q8(_) => self.forward(rows),
        }
    }
}

/// The identity of a weight allocation, to count memory shared between models once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Storage {
    Dense(TensorId),
    Quantized(usize),
}

impl Storage {
    pub fn of(t: &Tensor) -> (Self, usize) {
        (
            Self::Dense(t.id()),
            t.elem_count() * t.dtype().size_in_bytes(),
        )
    }
}

/// The linear layers of one base checkpoint, built once and reused by every model built from
/// it whose tensors for that layer are unmodified (see [`Weights::is_modified`]).
#[derive(Debug, Default)]
pub struct SharedLayers {
    quantization: Quantization,
    built: HashMap<String, Linear>,
    /// Base layers stacked from several checkpoint tensors: their key, sources and the rows of
    /// each source.
    stacked: Vec<(String, Vec<String>, usize)>,
}

impl SharedLayers {
    pub fn new(quantization: Quantization) -> Self {
        Self {
            quantization,
            built: HashMap::new(),
            stacked: Vec::new(),
        }
    }

    /// Makes `w` hold the sources of every dense base layer stacked from several tensors as
    /// views into that layer, so a base kept to merge from does not hold those values twice.
    pub fn share_stacked_sources(&self, w: &mut Weights) -> Result<()> {
        for (key, sources, rows) in &self.stacked {
            let Some(Linear::Dense(stacked)) = self.built.get(key) else {
                continue;
            };
            for (i, source) in sources.iter().enumerate() {
                w.share(source, stacked.narrow(0, i * rows, *rows)?);
            }
        }
        Ok(())
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
        let parts = sources
            .iter()
            .map(|s| w.take(s, &[out_dim, in_dim]))
            .collect::<Result<Vec<_>>>()?;
        if base && sources.len() > 1 && !self.built.contains_key(key) {
            self.stacked
                .push((key.to_string(), sources.to_vec(), out_dim));
        }
        self.layer(key, base, || match parts.as_slice() {
            [one] => Ok(one.clone()),
            _ => Ok(Tensor::cat(&parts, 0)?),
        })
    }

    /// The layer `key` with the weight `weight` builds; `base` says whether that weight is the
    /// base checkpoint's, in which case a layer built earlier is reused. With q8 the first
    /// encoder block stays dense: it reads the raw embeddings, whose outliers make it the most
    /// sensitive to rounding (on the demo model, quantizing it too moves label probabilities by
    /// up to 0.063 against 0.010 without it).
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
        if self.quantization == Quantization::Q8 && !key.starts_with("encoder.block.0.") {
            layer.quantize(key)?;
        }
        if base {
            self.built.insert(key.to_string(), layer.clone());
        }
        Ok(layer)
    }
}
