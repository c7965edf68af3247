//! T5 with trainable LoRA factors, written for training: every op has a gradient in candle's
//! autograd, the layout is plainly padded, and the dropouts of transformers' training mode
//! (`dropout_rate`) and PEFT's `lora_dropout` apply. The base weights are frozen tensors shared
//! with the checkpoint; only the [`LoraPair`]s are [`Var`]s.
//!
//! Serving never runs this file: a trained adapter is saved in PEFT's format and merged into the
//! fast inference model ([`crate::model::t5`]) like any other adapter.

use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, RngExt};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::lora::AdapterConfig;
use crate::model::t5::{Activation, Config};
use crate::model::weights::Weights;

/// The LoRA factors of one linear module: `y = x·Wᵀ + scale · (dropout(x)·Aᵀ)·Bᵀ`.
pub struct LoraPair {
    /// The module's name in the checkpoint (`encoder.block.0.layer.0.SelfAttention.q`).
    pub module: String,
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// Draws dropout masks; `None` (evaluation, gradient checks) leaves every tensor as it is.
pub struct Dropout<'a> {
    pub rng: Option<&'a mut ChaCha8Rng>,
}

impl Dropout<'_> {
    /// `x` with each element zeroed with probability `p` and the rest scaled by `1/(1-p)`.
    fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = self.rng.as_deref_mut() else {
            return Ok(x.clone());
        };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - p;
        // One u32 draw per element against a fixed threshold: the same Bernoulli(keep) as a float
        // draw, several times cheaper for the millions of elements a step masks.
        let threshold = (keep * f64::from(u32::MAX)) as u32;
        let scaled = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.next_u32() < threshold {
                    scaled
                } else {
                    0.0
                }
            })
            .collect();
        Ok((x * Tensor::from_vec(mask, x.dims(), x.device())?)?)
    }
}

/// A frozen linear layer, with LoRA factors when the adapter targets it.
struct Linear {
    /// `Wᵀ`, `(in, out)`, stored transposed once so no step transposes or broadcasts it.
    weight_t: Tensor,
    lora: Option<LoraPair>,
}

impl Linear {
    fn forward(&self, x: &Tensor, drop: &mut Dropout, p: f64) -> Result<Tensor> {
        // Rows flattened to 2-D: a plain matmul whose backward is one matmul per operand, where a
        // broadcast one would materialise a copy of the weight per batch row.
        let width = x.dim(D::Minus1)?;
        let mut dims = x.dims().to_vec();
        dims.pop();
        let rows = x.reshape(((), width))?;
        let mut y = rows.matmul(&self.weight_t)?;
        if let Some(l) = &self.lora {
            let delta = drop
                .apply(&rows, p)?
                .matmul(&l.a.as_tensor().t()?)?
                .matmul(&l.b.as_tensor().t()?)?;
            y = (y + (delta * l.scale)?)?;
        }
        dims.push(y.dim(1)?);
        Ok(y.reshape(dims)?)
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

struct FeedForward {
    /// `wi` alone, or `wi_0` and `wi_1` of a gated activation.
    wi: Vec<Linear>,
    wo: Linear,
}

struct Block {
    self_attn: Attention,
    self_norm: Tensor,
    cross: Option<(Attention, Tensor)>,
    ff: FeedForward,
    ff_norm: Tensor,
}

/// Takes the frozen tensors of one stack's blocks out of the checkpoint, attaching LoRA factors.
struct Builder<'a> {
    w: &'a mut Weights,
    adapter: &'a AdapterConfig,
    rng: &'a mut ChaCha8Rng,
    cfg: &'a Config,
    gated: bool,
    targeted: usize,
}

impl Builder<'_> {
    fn linear(&mut self, name: String, out: usize, inp: usize) -> Result<Linear> {
        let weight_t = self
            .w
            .take(&format!("{name}.weight"), &[out, inp])?
            .t()?
            .contiguous()?;
        let config_file = std::path::Path::new("adapter_config.json");
        if !self.adapter.targets(&name, config_file)? {
            return Ok(Linear {
                weight_t,
                lora: None,
            });
        }
        let (r, alpha) = (self.adapter.r, self.adapter.lora_alpha);
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        let scale = if self.adapter.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        self.targeted += 1;
        let device = weight_t.device().clone();
        Ok(Linear {
            lora: Some(LoraPair {
                module: name,
                a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), &device)?)?,
                b: Var::zeros((out, r), DType::F32, &device)?,
                scale,
            }),
            weight_t,
        })
    }

    fn attention(&mut self, p: &str) -> Result<Attention> {
        let (d, inner) = (self.cfg.d_model, self.cfg.num_heads * self.cfg.d_kv);
        Ok(Attention {
            q: self.linear(format!("{p}.q"), inner, d)?,
            k: self.linear(format!("{p}.k"), inner, d)?,
            v: self.linear(format!("{p}.v"), inner, d)?,
            o: self.linear(format!("{p}.o"), d, inner)?,
        })
    }

    fn norm(&mut self, p: &str) -> Result<Tensor> {
        self.w.take(&format!("{p}.weight"), &[self.cfg.d_model])
    }

    fn block(&mut self, stack: &str, i: usize, decoder: bool) -> Result<Block> {
        let (d, ff) = (self.cfg.d_model, self.cfg.d_ff);
        let p = format!("{stack}.block.{i}.layer");
        let f = if decoder { 2 } else { 1 };
        let cross = if decoder {
            Some((
                self.attention(&format!("{p}.1.EncDecAttention"))?,
                self.norm(&format!("{p}.1.layer_norm"))?,
            ))
        } else {
            None
        };
        let dense = format!("{p}.{f}.DenseReluDense");
        let wi = if self.gated {
            vec![
                self.linear(format!("{dense}.wi_0"), ff, d)?,
                self.linear(format!("{dense}.wi_1"), ff, d)?,
            ]
        } else {
            vec![self.linear(format!("{dense}.wi"), ff, d)?]
        };
        Ok(Block {
            self_attn: self.attention(&format!("{p}.0.SelfAttention"))?,
            self_norm: self.norm(&format!("{p}.0.layer_norm"))?,
            cross,
            ff: FeedForward {
                wi,
                wo: self.linear(format!("{dense}.wo"), d, ff)?,
            },
            ff_norm: self.norm(&format!("{p}.{f}.layer_norm"))?,
        })
    }
}

/// A T5 checkpoint with LoRA on the modules an adapter config targets.
pub struct LoraT5 {
    config: Config,
    shared: Tensor,
    lm_head: Tensor,
    encoder_bias: Tensor,
    decoder_bias: Tensor,
    encoder: Vec<Block>,
    encoder_norm: Tensor,
    decoder: Vec<Block>,
    decoder_norm: Tensor,
    act: Activation,
    gated: bool,
    /// PEFT's `lora_dropout`.
    lora_dropout: f64,
    /// transformers' `dropout_rate`, active while training.
    dropout: f64,
    device: Device,
}

/// A batch for teacher-forced training: inputs right-padded with `pad`, decoder inputs (the
/// labels shifted right behind the decoder start token) and the labels, `-1` where padded.
pub struct Batch {
    pub input_ids: Tensor,
    pub input_mask: Tensor,
    pub decoder_ids: Tensor,
    pub labels: Vec<i64>,
}

impl Batch {
    /// Pads `inputs` and `targets` (each ending with EOS) into one batch.
    pub fn new(
        inputs: &[&[u32]],
        targets: &[&[u32]],
        cfg: &Config,
        device: &Device,
    ) -> Result<Self> {
        let (b, t) = (
            inputs.len(),
            inputs.iter().map(|i| i.len()).max().unwrap_or(0),
        );
        let u = targets.iter().map(|t| t.len()).max().unwrap_or(0);
        if b == 0 || t == 0 || u == 0 {
            return Err(Error::InvalidArgument("an empty training batch".into()));
        }
        let pad = cfg.pad_token_id();
        let mut ids = vec![pad; b * t];
        let mut mask = vec![f32::MIN; b * t];
        let mut dec = vec![pad; b * u];
        let mut labels = vec![-1i64; b * u];
        for (row, (input, target)) in inputs.iter().zip(targets).enumerate() {
            for (i, &id) in input.iter().enumerate() {
                ids[row * t + i] = id;
                mask[row * t + i] = 0.0;
            }
            for (i, &id) in target.iter().enumerate() {
                labels[row * u + i] = i64::from(id);
                dec[row * u + i] = if i == 0 {
                    cfg.decoder_start_token_id()
                } else {
                    target[i - 1]
                };
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            input_mask: Tensor::from_vec(mask, (b, 1, 1, t), device)?,
            decoder_ids: Tensor::from_vec(dec, (b, u), device)?,
            labels,
        })
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(variance + eps)?.sqrt()?)?;
    Ok(x.broadcast_mul(weight)?)
}

impl LoraT5 {
    /// Takes the base tensors out of `w` (f32) and attaches fresh LoRA factors to every module
    /// `adapter` targets: `A` Kaiming-uniform as PEFT initialises it (bound `1/sqrt(in)`), `B`
    /// zeros, so training starts from the base model exactly.
    pub fn new(
        config: Config,
        w: &mut Weights,
        adapter: &AdapterConfig,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        config.validate()?;
        let cfg = &config;
        let (act, gated) = Activation::parse(cfg.feed_forward_proj())?;
        let mut b = Builder {
            w,
            adapter,
            rng,
            cfg,
            gated,
            targeted: 0,
        };
        let encoder = (0..cfg.num_layers)
            .map(|i| b.block("encoder", i, false))
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..cfg.decoder_layers())
            .map(|i| b.block("decoder", i, true))
            .collect::<Result<Vec<_>>>()?;
        if b.targeted == 0 {
            return Err(Error::InvalidArgument(format!(
                "no module of the model matches target_modules {:?}",
                adapter.target_modules
            )));
        }
        let d = cfg.d_model;
        let shared = w.take("shared.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings() {
            shared.clone()
        } else {
            w.take("lm_head.weight", &[cfg.vocab_size, d])?
        };
        let bias_shape = [cfg.relative_attention_num_buckets, cfg.num_heads];
        let bias = |w: &mut Weights, stack: &str| {
            w.take(
                &format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                &bias_shape,
            )
        };
        Ok(Self {
            shared,
            lm_head,
            encoder_bias: bias(w, "encoder")?,
            decoder_bias: bias(w, "decoder")?,
            encoder,
            encoder_norm: w.take("encoder.final_layer_norm.weight", &[d])?,
            decoder,
            decoder_norm: w.take("decoder.final_layer_norm.weight", &[d])?,
            act,
            gated,
            lora_dropout: adapter.lora_dropout,
            dropout: cfg.dropout_rate,
            device: w.device().clone(),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every LoRA pair, in module name order.
    pub fn loras(&self) -> Vec<&LoraPair> {
        fn attn(a: &Attention) -> [&Linear; 4] {
            [&a.q, &a.k, &a.v, &a.o]
        }
        let mut all: Vec<&LoraPair> = Vec::new();
        for b in self.encoder.iter().chain(&self.decoder) {
            let mut layers: Vec<&Linear> = attn(&b.self_attn).into();
            if let Some((c, _)) = &b.cross {
                layers.extend(attn(c));
            }
            layers.extend(&b.ff.wi);
            layers.push(&b.ff.wo);
            all.extend(layers.into_iter().filter_map(|l| l.lora.as_ref()));
        }
        all.sort_by(|x, y| x.module.cmp(&y.module));
        all
    }

    /// The trainable variables, in [`Self::loras`] order (A then B of each module).
    pub fn vars(&self) -> Vec<Var> {
        self.loras()
            .into_iter()
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn position_bias(
        &self,
        table: &Tensor,
        q: usize,
        k: usize,
        bidirectional: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let relative = (0..q).flat_map(|i| (0..k).map(move |j| j as i64 - i as i64));
        let ids = cfg.position_buckets(relative, bidirectional);
        let ids = Tensor::from_vec(ids, q * k, &self.device)?;
        Ok(table
            .index_select(&ids, 0)?
            .t()?
            .reshape((1, cfg.num_heads, q, k))?)
    }

    fn attend(
        &self,
        a: &Attention,
        x: &Tensor,
        kv: &Tensor,
        bias: &Tensor,
        drop: &mut Dropout,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, q_len, _) = x.dims3()?;
        let k_len = kv.dim(1)?;
        let heads = |t: Tensor, len: usize| -> Result<Tensor> {
            Ok(t.reshape((b, len, cfg.num_heads, cfg.d_kv))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let p = self.lora_dropout;
        let q = heads(a.q.forward(x, drop, p)?, q_len)?;
        let k = heads(a.k.forward(kv, drop, p)?, k_len)?;
        let v = heads(a.v.forward(kv, drop, p)?, k_len)?;
        // T5 does not scale scores by 1/sqrt(d_kv).
        let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(bias)?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let weights = drop.apply(&weights, self.dropout)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, q_len, cfg.num_heads * cfg.d_kv))?;
        a.o.forward(&out, drop, p)
    }

    fn feed_forward(&self, f: &FeedForward, x: &Tensor, drop: &mut Dropout) -> Result<Tensor> {
        let p = self.lora_dropout;
        let h = self
            .act
            .apply_differentiable(&f.wi[0].forward(x, drop, p)?)?;
        let h = if self.gated {
            (h * f.wi[1].forward(x, drop, p)?)?
        } else {
            h
        };
        let h = drop.apply(&h, self.dropout)?;
        f.wo.forward(&h, drop, p)
    }

    /// Decoder logits `(batch, target length, vocab)` of a teacher-forced batch.
    pub fn forward(&self, batch: &Batch, drop: &mut Dropout) -> Result<Tensor> {
        let encoded = self.encode(&batch.input_ids, &batch.input_mask, drop)?;
        self.decode(&encoded, &batch.input_mask, &batch.decoder_ids, drop)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (rows, len) = ids.dims2()?;
        Ok(self.shared.index_select(&ids.flatten_all()?, 0)?.reshape((
            rows,
            len,
            self.config.d_model,
        ))?)
    }

    /// The encoder's output `(batch, input length, d_model)`.
    fn encode(
        &self,
        input_ids: &Tensor,
        input_mask: &Tensor,
        drop: &mut Dropout,
    ) -> Result<Tensor> {
        let eps = self.config.layer_norm_epsilon;
        let t = input_ids.dim(1)?;
        let enc_bias = self
            .position_bias(&self.encoder_bias, t, t, true)?
            .broadcast_add(input_mask)?;
        let mut x = drop.apply(&self.embed(input_ids)?, self.dropout)?;
        for block in &self.encoder {
            let h = rms_norm(&x, &block.self_norm, eps)?;
            let a = self.attend(&block.self_attn, &h, &h, &enc_bias, drop)?;
            x = (x + drop.apply(&a, self.dropout)?)?;
            let h = rms_norm(&x, &block.ff_norm, eps)?;
            let f = self.feed_forward(&block.ff, &h, drop)?;
            x = (x + drop.apply(&f, self.dropout)?)?;
        }
        drop.apply(&rms_norm(&x, &self.encoder_norm, eps)?, self.dropout)
    }

    /// Decoder logits `(batch, target length, vocab)` of `decoder_ids` over `encoded`.
    fn decode(
        &self,
        encoded: &Tensor,
        input_mask: &Tensor,
        decoder_ids: &Tensor,
        drop: &mut Dropout,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let eps = cfg.layer_norm_epsilon;
        let (b, u) = decoder_ids.dims2()?;
        let causal: Vec<f32> = (0..u)
            .flat_map(|i| (0..u).map(move |j| if j > i { f32::MIN } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, u, u), &self.device)?;
        let dec_bias = self
            .position_bias(&self.decoder_bias, u, u, false)?
            .broadcast_add(&causal)?;
        let mut y = drop.apply(&self.embed(decoder_ids)?, self.dropout)?;
        for block in &self.decoder {
            let h = rms_norm(&y, &block.self_norm, eps)?;
            let a = self.attend(&block.self_attn, &h, &h, &dec_bias, drop)?;
            y = (y + drop.apply(&a, self.dropout)?)?;
            if let Some((cross, norm)) = &block.cross {
                let h = rms_norm(&y, norm, eps)?;
                let a = self.attend(cross, &h, encoded, input_mask, drop)?;
                y = (y + drop.apply(&a, self.dropout)?)?;
            }
            let h = rms_norm(&y, &block.ff_norm, eps)?;
            let f = self.feed_forward(&block.ff, &h, drop)?;
            y = (y + drop.apply(&f, self.dropout)?)?;
        }
        let mut y = drop.apply(&rms_norm(&y, &self.decoder_norm, eps)?, self.dropout)?;
        if cfg.tie_word_embeddings() {
            y = (y * (cfg.d_model as f64).powf(-0.5))?;
        }
        Ok(y.reshape((b * u, cfg.d_model))?
            .matmul(&self.lm_head.t()?)?
            .reshape((b, u, cfg.vocab_size))?)
    }

    /// Each row's summed log-probability of its label tokens, teacher forced: `(batch,)`.
    pub fn log_likelihoods(&self, batch: &Batch, drop: &mut Dropout) -> Result<Tensor> {
        let logits = self.forward(batch, drop)?;
        self.picked(&logits, &batch.labels)
    }

    /// Each of `inputs`' summed log-probability of each of `targets` (each ending with EOS),
    /// teacher forced: `(inputs, targets)`. The encoder runs once per input.
    pub fn target_log_likelihoods(
        &self,
        inputs: &[&[u32]],
        targets: &[Vec<u32>],
        drop: &mut Dropout,
    ) -> Result<Tensor> {
        let (b, k) = (inputs.len(), targets.len());
        let target_refs: Vec<&[u32]> = targets.iter().map(Vec::as_slice).collect();
        let pairs: Vec<&[u32]> = (0..b).flat_map(|_| target_refs.iter().copied()).collect();
        let repeated: Vec<&[u32]> = inputs.iter().flat_map(|&i| vec![i; k]).collect();
        let batch = Batch::new(&repeated, &pairs, &self.config, &self.device)?;
        let rows: Vec<u32> = (0..b * k).map(|i| (i / k) as u32).collect();
        let rows = Tensor::from_vec(rows, b * k, &self.device)?;
        let firsts = Tensor::from_vec(
            (0..b).map(|i| (i * k) as u32).collect::<Vec<_>>(),
            b,
            &self.device,
        )?;
        let ids = batch.input_ids.index_select(&firsts, 0)?;
        let mask = batch.input_mask.index_select(&firsts, 0)?;
        let encoded = self.encode(&ids, &mask, drop)?.index_select(&rows, 0)?;
        let logits = self.decode(&encoded, &batch.input_mask, &batch.decoder_ids, drop)?;
        Ok(self.picked(&logits, &batch.labels)?.reshape((b, k))?)
    }

    /// The log-probability of each label token (`-1`: padding, left out) summed per row.
    fn picked(&self, logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
        let (b, u, v) = logits.dims3()?;
        let logp = candle_nn::ops::log_softmax(&logits.reshape((b * u, v))?, D::Minus1)?;
        let rows: Vec<u32> = labels.iter().map(|&l| l.max(0) as u32).collect();
        let weights: Vec<f32> = labels
            .iter()
            .map(|&l| if l >= 0 { 1.0 } else { 0.0 })
            .collect();
        let picked = logp
            .gather(&Tensor::from_vec(rows, (b * u, 1), &self.device)?, 1)?
            .squeeze(1)?;
        let weights = Tensor::from_vec(weights, b * u, &self.device)?;
        Ok((picked * weights)?.reshape((b, u))?.sum(1)?)
    }
}
