//! A bias-free projection `y = x·Wᵀ` whose weight is either dense (f32, or bf16 on GPU) or
//! quantized to int8 blocks (`--quantize q8`, GGML's Q8_0: 32 weights share one f16 scale).
//!
//! Quantization happens after the LoRA merge, on the merged f32 weight, so an adapter is never
//! applied to rounded weights. candle's fast CPU kernel for Q8_0 (AVX-512 VNNI or AVX-VNNI, chosen
//! at run time) needs the input dimension to be a multiple of 256; other layers (mt0-small's
//! attention output, 384 wide) would fall back to a per-block dot product several times slower
//! than f32, so their weights and inputs are padded with zero columns to the next multiple (which
//! changes no product) when that adds at most half the width. Narrower layers keep the per-block
//! path: padding 128 to 256 would double their work.
//!
//! [`SharedLayers`] builds the layers of every merged variant of one base: a layer whose
//! checkpoint tensors no adapter of the variant changed is the base's own, built (and quantized)
//! once and shared by reference.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor, TensorId};

use crate::error::{Error, Result};
use crate::model::weights::Weights;

/// How the linear layers store their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Weights as loaded (`--dtype`).
    #[default]
    None,
    /// int8 blocks of 32 with an f16 scale each (CPU).
    Q8,
}

impl Quantization {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "none" | "off" => Ok(Self::None),
            "q8" | "q8_0" => Ok(Self::Q8),
            other => Err(Error::Config(format!(
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

/// Input widths candle's fast Q8_0 kernel works in.
const Q8_BLOCK: usize = 256;

#[derive(Debug, Clone)]
pub enum Linear {
    Dense(Tensor),
    /// Weight `(out, padded_in)`, zero beyond the real input width.
    Q8 {
        weight: QMatMul,
        padded_in: usize,
    },
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self::Dense(weight)
    }

    /// Replaces a dense f32 weight by its Q8_0 blocks. `name` is for the error message.
    pub fn quantize(&mut self, name: &str) -> Result<()> {
        let Self::Dense(w) = self else {
            return Ok(());
        };
        if w.dtype() != DType::F32 || !w.device().is_cpu() {
            return Err(Error::Config(
                "--quantize q8 needs f32 weights on the CPU (candle has no Q8_0 matmul for this device here)"
                    .into(),
            ));
        }
        let (out, input) = w.dims2()?;
        let fast = input.div_ceil(Q8_BLOCK) * Q8_BLOCK;
        let padded_in = if 2 * fast <= 3 * input { fast } else { input };
        let w = if padded_in > input {
            Tensor::cat(
                &[
                    w,
                    &Tensor::zeros((out, padded_in - input), DType::F32, w.device())?,
                ],
                1,
            )?
        } else {
            w.clone()
        };
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)
            .map_err(|e| Error::Config(format!("cannot quantize `{name}` to q8: {e}")))?;
        *self = Self::Q8 {
            weight: QMatMul::from_qtensor(q)?,
            padded_in,
        };
        Ok(())
    }

    /// Which allocation holds the weight and its size in bytes; clones of a layer share both.
    pub fn storage(&self) -> (Storage, usize) {
        match self {
            Self::Dense(w) => Storage::of(w),
            Self::Q8 { weight, .. } => match weight {
                QMatMul::QTensor(q) => (
                    Storage::Quantized(Arc::as_ptr(q) as usize),
                    q.storage_size_in_bytes(),
                ),
                QMatMul::Tensor(w) | QMatMul::TensorF16(w) => Storage::of(w),
            },
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
            Self::Q8 { weight, padded_in } => weight.forward(&pad_last(x, *padded_in)?),
        }
    }

    /// `rows·Wᵀ` for a 2-D `rows`, in the order that is fastest for a very wide `W` (`lm_head`):
    /// with few rows the dense CPU kernels are far faster as `W·rowsᵀ` (the weight is read in its
    /// stored layout instead of being repacked per call).
    pub fn forward_wide(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.matmul(&rows.t()?)?.t(),
            Self::Q8 { weight, padded_in } => weight.forward(&pad_last(rows, *padded_in)?),
        }
    }
}

/// `x` contiguous, with zero columns appended to its last dimension up to `width`.
fn pad_last(x: &Tensor, width: usize) -> candle_core::Result<Tensor> {
    let last = x.dim(candle_core::D::Minus1)?;
    if last == width {
        return x.contiguous();
    }
    let mut dims = x.dims().to_vec();
    let rank = dims.len();
    dims[rank - 1] = width - last;
    Tensor::cat(&[x, &Tensor::zeros(dims, x.dtype(), x.device())?], rank - 1)
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
}

impl SharedLayers {
    pub fn new(quantization: Quantization) -> Self {
        Self {
            quantization,
            built: HashMap::new(),
        }
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
        self.layer(key, base, || match parts.as_slice() {
            [one] => Ok(one.clone()),
            _ => Ok(Tensor::cat(&parts, 0)?),
        })
    }

    /// The layer `key` with the weight `weight` builds; `base` says whether that weight is the
    /// base checkpoint's, in which case a layer built earlier is reused. With q8 the first
    /// encoder block stays dense: it reads the raw embeddings, whose outliers make it the most
    /// sensitive to rounding (on the demo model, quantizing it too moves label probabilities by
    /// up to 0.055 against 0.015 without it, at equal accuracy).
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
