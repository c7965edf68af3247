//! Reductions over the vocabulary that candle composes from several full passes: here they are
//! one fused, row-parallel pass on the CPU (the vocabulary is 250k wide, so each extra pass over
//! a batch of logits costs more than the matmul that made them). Other devices use candle's ops.

use candle_core::{CpuStorage, CustomOp1, D, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `log Σ exp(x)` over the last dimension of `(rows, vocab)` logits -> `(rows,)`, f32.
pub fn log_sum_exp(logits: &Tensor) -> candle_core::Result<Tensor> {
    if logits.device().is_cpu() {
        return logits.contiguous()?.apply_op1_no_bwd(&LogSumExp);
    }
    let max = logits.max_keepdim(D::Minus1)?;
    logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?
        .squeeze(D::Minus1)
}

struct LogSumExp;

impl CustomOp1 for LogSumExp {
    fn name(&self) -> &'static str {
        "log-sum-exp-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("log_sum_exp expects f32 logits");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("log_sum_exp expects contiguous logits");
        };
        let dims = layout.shape().dims();
        let width = *dims.last().unwrap_or(&1);
        if width == 0 {
            candle_core::bail!("log_sum_exp over an empty dimension");
        }
        let out: Vec<f32> = data[start..end]
            .par_chunks(width)
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
                max + sum.ln()
            })
            .collect();
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&dims[..dims.len() - 1]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn log_sum_exp_matches_the_definition() {
        let x = Tensor::new(&[[1f32, 2., 3.], [-1000., 0., 1000.]], &Device::Cpu).unwrap();
        let got: Vec<f32> = super::log_sum_exp(&x).unwrap().to_vec1().unwrap();
        let first = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() as f32;
        assert!((got[0] - first).abs() < 1e-6);
        assert!((got[1] - 1000.0).abs() < 1e-3);
    }
}
