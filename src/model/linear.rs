//! A bias-free projection `y = x·Wᵀ` whose weight is either dense (f32, or bf16 on GPU) or
//! quantized to int8 blocks (`--quantize q8`, GGML's Q8_0: 32 weights share one f16 scale).
//!
//! Quantization happens after the LoRA merge, on the merged f32 weight, so an adapter is never
//! applied to rounded weights. candle's CPU kernels for Q8_0 choose AVX-512 VNNI, AVX-VNNI or
//! AVX2 at run time.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::{Error, Result};

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

#[derive(Debug)]
pub enum Linear {
    Dense(Tensor),
    Q8(QMatMul),
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
        let q = QTensor::quantize(w, GgmlDType::Q8_0)
            .map_err(|e| Error::Config(format!("cannot quantize `{name}` to q8: {e}")))?;
        *self = Self::Q8(QMatMul::from_qtensor(q)?);
        Ok(())
    }

    /// `x·Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => candle_nn::Linear::new(w.clone(), None).forward(x),
            Self::Q8(q) => q.forward(&x.contiguous()?),
        }
    }

    /// `rows·Wᵀ` for a 2-D `rows`, in the order that is fastest for a very wide `W` (`lm_head`):
    /// with few rows the dense CPU kernels are far faster as `W·rowsᵀ` (the weight is read in its
    /// stored layout instead of being repacked per call).
    pub fn forward_wide(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.matmul(&rows.t()?)?.t(),
            Self::Q8(q) => q.forward(&rows.contiguous()?),
        }
    }
}
