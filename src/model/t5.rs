//! The T5 family (T5 v1.0, T5 v1.1 / flan-t5, mT5 / mt0) as an encoder-decoder in candle.
//!
//! This is a re-implementation of transformers' `modeling_t5.py` for inference only. The weights
//! are immutable and meant to be shared (`Arc<T5Model>`) by every thread that runs the model; all
//! per-sequence state (the decoder's self-attention KV cache and the cross-attention K/V computed
//! once from the encoder output) lives in a [`DecodeBatch`], outside the model, and every decode
//! step runs all of a batch's sequences through one attention call per layer.
//!
//! Details that matter for parity with transformers:
//! - no `1/sqrt(d_kv)` scaling of attention scores (T5 folds it into the initialisation);
//! - relative-position buckets are bidirectional in the encoder and unidirectional (only the past)
//!   in the decoder, computed in f32 exactly like `_relative_position_bucket`;
//! - the bias is computed by the first block of each stack and reused by all later blocks;
//! - cross-attention has no position bias;
//! - with tied embeddings (T5 v1.0) the decoder output is scaled by `d_model^-0.5` before the
//!   shared embedding matrix projects it onto the vocabulary.

use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::Embedding;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::model::decode_batch::{CacheShape, DecodeBatch};
use crate::model::greedy::GreedyHead;
use crate::model::linear::{Linear, SharedLayers, Storage};
use crate::model::packed_attention;
use crate::model::weights::Weights;

/// `config.json` of a T5-family checkpoint. Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub feed_forward_proj: Option<String>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Dropout of transformers' training mode (used by `finserve train` only).
    #[serde(default = "default_dropout")]
    pub dropout_rate: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Option<Vec<u32>>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

fn default_dropout() -> f64 {
    0.1
}

fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<u32>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(x) => x,
    }))
}

/// Which transformers configuration class a checkpoint is (`model_type` of `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    T5,
    Mt5,
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::T5 => "t5",
            Self::Mt5 => "mt5",
        }
    }
}

impl Config {
    /// `mt5`, or `t5` (also when `config.json` names none: transformers' `T5Config` then applies,
    /// and `validate` refuses any other name).
    pub fn model_type(&self) -> ModelType {
        match self.model_type.as_deref() {
            Some("mt5") => ModelType::Mt5,
            _ => ModelType::T5,
        }
    }

    fn is_mt5(&self) -> bool {
        self.model_type() == ModelType::Mt5
    }

    /// transformers' `MT5Config` defaults to gated-gelu and untied embeddings; `T5Config` to relu and tied.
    /// The relative-attention bucket of each relative position (key minus query).
    pub fn position_buckets(
        &self,
        relative: impl Iterator<Item = i64>,
        bidirectional: bool,
    ) -> Vec<u32> {
        relative
            .map(|rel| {
                relative_position_bucket(
                    rel,
                    bidirectional,
                    self.relative_attention_num_buckets,
                    self.relative_attention_max_distance,
                )
            })
            .collect()
    }

    pub fn feed_forward_proj(&self) -> &str {
        match &self.feed_forward_proj {
            Some(p) => p,
            None if self.is_mt5() => "gated-gelu",
            None => "relu",
        }
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(!self.is_mt5())
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.clone().unwrap_or_else(|| vec![1])
    }

    pub fn decoder_start_token_id(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(self.pad_token_id())
    }

    fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Checks what the forward pass relies on, so a broken config fails at load with a clear message.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::ModelConfig(msg));
        if let Some(t) = &self.model_type
            && t != "t5"
            && t != "mt5"
        {
            return bad(format!(
                "model_type `{t}` is not a T5-family model (expected t5 or mt5)"
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.decoder_layers()),
            ("num_heads", self.num_heads),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be > 0"));
            }
        }
        let eos = self.eos_token_ids();
        if eos.is_empty() {
            return bad("`eos_token_id` is an empty list: generation could never stop".into());
        }
        let specials = eos.iter().map(|&id| ("eos_token_id", id)).chain([
            ("pad_token_id", self.pad_token_id()),
            ("decoder_start_token_id", self.decoder_start_token_id()),
        ]);
        for (name, id) in specials {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "`{name}` {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                ));
            }
        }
        if self.relative_attention_num_buckets < 4 {
            return bad("`relative_attention_num_buckets` must be >= 4".into());
        }
        if self.relative_attention_max_distance * 2 <= self.relative_attention_num_buckets {
            return bad(
                "`relative_attention_max_distance` must exceed half the number of buckets".into(),
            );
        }
        Activation::parse(self.feed_forward_proj())?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    /// Exact (erf) GELU, what a non-gated `gelu` maps to.
    Gelu,
    /// tanh-approximated GELU, what `gated-gelu` maps to in transformers.
    GeluNew,
    Silu,
}

impl Activation {
    /// Parses `feed_forward_proj` (`relu`, `gated-gelu`, ...) into (activation, gated).
    pub fn parse(proj: &str) -> Result<(Self, bool)> {
        let (gated, name) = match proj.strip_prefix("gated-") {
            Some(rest) => (true, rest),
            None => (false, proj),
        };
        let act = match (name, gated) {
            ("gelu", true) | ("gelu_new", _) => Self::GeluNew,
            ("gelu", false) => Self::Gelu,
            ("relu", _) => Self::Relu,
            ("silu", _) | ("swish", _) => Self::Silu,
            _ => {
                return Err(Error::ModelConfig(format!(
                    "feed_forward_proj `{proj}` is not supported (relu, gelu, silu, optionally `gated-`)"
                )));
            }
        };
        Ok((act, gated))
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluNew => crate::model::ops::gelu_tanh(x),
            Self::Silu => x.silu(),
        }
    }

    /// The same function through ops candle can differentiate (training).
    pub fn apply_differentiable(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluNew => x.gelu(),
            other => other.apply(x),
        }
    }
}

/// transformers' `_relative_position_bucket`, including its f32 arithmetic for large distances.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> u32 {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let distance = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let log_ratio = (max_distance as f64 / max_exact as f64).ln() as f32;
        let scaled = (distance as f32 / max_exact as f32).ln() / log_ratio
            * (num_buckets - max_exact) as f32;
        let large = max_exact + scaled as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as u32
}

/// T5's RMS norm: no mean subtraction, no bias.
#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &mut Weights, l: &mut SharedLayers, name: &str, cfg: &Config) -> Result<Self> {
        Ok(Self {
            weight: l.tensor(w, &format!("{name}.weight"), &[cfg.d_model])?,
            eps: cfg.layer_norm_epsilon as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    /// `k` and `v` stacked: `(2 · inner, d_model)`.
    kv: Linear,
    o: Linear,
    num_heads: usize,
    d_kv: usize,
}

impl Attention {
    fn load(w: &mut Weights, l: &mut SharedLayers, name: &str, cfg: &Config) -> Result<Self> {
        let inner = cfg.inner_dim();
        let weight = |p: &str| format!("{name}.{p}.weight");
        Ok(Self {
            q: l.linear(w, &format!("{name}.q"), &[weight("q")], inner, cfg.d_model)?,
            // k and v read the same input: one stacked layer reads (and with q8 quantizes) it once.
            kv: l.linear(
                w,
                &format!("{name}.kv"),
                &[weight("k"), weight("v")],
                inner,
                cfg.d_model,
            )?,
            o: l.linear(w, &format!("{name}.o"), &[weight("o")], cfg.d_model, inner)?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// Splits the stacked K/V projection `(b, t, 2 · inner)` into K and V, each
    /// `(b, heads, t, d_kv)`.
    fn split_kv(&self, kv: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let inner = self.num_heads * self.d_kv;
        Ok((
            self.split_heads(&kv.narrow(2, 0, inner)?)?,
            self.split_heads(&kv.narrow(2, inner, inner)?)?,
        ))
    }

    /// (b, t, inner) -> (b, heads, t, d_kv)
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // A narrowed (non-contiguous) projection is copied once by the transpose below.
        x.reshape((b, t, self.num_heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// (b, heads, t, d_kv) -> (b, t, inner)
    fn merge_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, t, _) = x.dims4()?;
        x.transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.d_kv))
    }

    /// Scale-free dot-product attention; `bias` (broadcastable to the scores) carries the position
    /// bias and the masks. Softmax runs in f32 as in transformers.
    fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = q.dtype();
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        probs.matmul(v)
    }
}

#[derive(Debug)]
struct FeedForward {
    /// `wi`, or for gated activations `wi_0` and `wi_1` stacked: `(2 · d_ff, d_model)`.
    wi: Linear,
    gated: bool,
    wo: Linear,
    act: Activation,
}

impl FeedForward {
    fn load(w: &mut Weights, l: &mut SharedLayers, name: &str, cfg: &Config) -> Result<Self> {
        let (act, gated) = Activation::parse(cfg.feed_forward_proj())?;
        let weight = |p: &str| format!("{name}.{p}.weight");
        let wi = if gated {
            vec![weight("wi_0"), weight("wi_1")]
        } else {
            vec![weight("wi")]
        };
        Ok(Self {
            wi: l.linear(w, &format!("{name}.wi"), &wi, cfg.d_ff, cfg.d_model)?,
            gated,
            wo: l.linear(
                w,
                &format!("{name}.wo"),
                &[weight("wo")],
                cfg.d_model,
                cfg.d_ff,
            )?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.wi.forward(x)?;
        let h = match (self.gated, self.act) {
            (false, act) => act.apply(&h)?,
            (true, Activation::GeluNew) => crate::model::ops::gated_gelu_tanh(&h)?,
            (true, act) => {
                let d_ff = h.dim(D::Minus1)? / 2;
                (act.apply(&h.narrow(D::Minus1, 0, d_ff)?.contiguous()?)?
                    * h.narrow(D::Minus1, d_ff, d_ff)?)?
            }
        };
        self.wo.forward(&h)
    }
}

#[derive(Debug)]
struct EncoderBlock {
    self_attn: Attention,
    attn_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

#[derive(Debug)]
struct DecoderBlock {
    self_attn: Attention,
    self_attn_norm: LayerNorm,
    cross_attn: Attention,
    cross_attn_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

/// How a decode step runs the decoder's self-attention over the cache.
enum SelfAttention {
    /// One token per slot on the CPU in f32: each slot reads only its own columns
    /// ([`packed_attention::decode_self_attention`]); `bias` is each head's position bias of
    /// every column seen from the step's column, `heads · width` values.
    Packed {
        firsts: Vec<Option<usize>>,
        bias: Vec<f32>,
    },
    /// candle's ops over every column: the position bias plus the masks, broadcastable to the
    /// scores `(slots, heads, n, width)`.
    Masked(Tensor),
}

/// How the encoder runs self-attention over its packed rows.
enum EncoderAttention<'a> {
    /// On the CPU in f32: straight from the packed rows ([`packed_attention`]).
    Packed {
        lengths: &'a [usize],
        bias: Vec<f32>,
    },
    /// Elsewhere: candle's ops on the right-padded layout.
    Padded(PaddedLayout),
}

/// The right-padded layout of an encoder batch, for [`Attention::attend`].
struct PaddedLayout {
    /// Position bias plus padding mask, `(batch, heads, longest, longest)`.
    bias: Tensor,
    /// Packed row of every padded position (see [`Encoded::unpack`]).
    unpack: Tensor,
    /// Padded position of every packed row.
    repack: Tensor,
    batch: usize,
    longest: usize,
}

impl EncoderAttention<'_> {
    /// Self-attention of the normed packed rows `h` `(tokens, d_model)`, before `a.o`.
    fn forward(&self, a: &Attention, h: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Packed { lengths, bias } => packed_attention::self_attention(
                &a.q.forward(h)?,
                &a.kv.forward(h)?,
                lengths,
                packed_attention::Heads {
                    heads: a.num_heads,
                    d_kv: a.d_kv,
                },
                bias,
            ),
            Self::Padded(p) => {
                let padded = |proj: &Linear| -> candle_core::Result<Tensor> {
                    proj.forward(h)?
                        .index_select(&p.unpack, 0)?
                        .reshape((p.batch, p.longest, ()))
                };
                let (k, v) = a.split_kv(&padded(&a.kv)?)?;
                let out = Attention::attend(&a.split_heads(&padded(&a.q)?)?, &k, &v, &p.bias)?;
                a.merge_heads(&out)?
                    .reshape((p.batch * p.longest, ()))?
                    .index_select(&p.repack, 0)
            }
        }
    }
}

/// A whole T5 checkpoint, read-only once loaded.
#[derive(Debug)]
pub struct T5Model {
    config: Config,
    encoder_embed: Embedding,
    decoder_embed: Embedding,
    encoder_bias: Tensor,
    encoder_blocks: Vec<EncoderBlock>,
    encoder_norm: LayerNorm,
    decoder_bias: Tensor,
    decoder_blocks: Vec<DecoderBlock>,
    decoder_norm: LayerNorm,
    lm_head: Linear,
    /// `lm_head`'s int8 screen, for greedy steps that need no log-probabilities.
    greedy: Option<Arc<GreedyHead>>,
    device: Device,
}

/// The encoder output of a batch, packed: every input's tokens in order, no padding,
/// `(tokens, d_model)`.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub hidden: Tensor,
    pub lengths: Vec<usize>,
    /// For each position of the right-padded `(batch, longest)` layout, its packed row; padding
    /// points at row 0, which is masked wherever padding is read.
    unpack: Vec<u32>,
    longest: usize,
}

impl T5Model {
    /// Builds the model from a weight map, taking every tensor it uses out of `w`; linear layers
    /// come from `layers`, shared with every other model it built from the same base.
    pub fn load(config: Config, w: &mut Weights, layers: &mut SharedLayers) -> Result<Self> {
        config.validate()?;
        let cfg = &config;
        let device = w.device().clone();
        let vocab = [cfg.vocab_size, cfg.d_model];
        let head_is_base = !w.is_modified(if cfg.tie_word_embeddings() {
            "shared.weight"
        } else {
            "lm_head.weight"
        });
        // An untied `lm_head` is built before the embedding is read: with q8 its f32 weight is
        // rounded and freed first, so loading never holds both at full size.
        let untied_head = match cfg.tie_word_embeddings() {
            true => None,
            false => {
                Some(layers.linear(w, "lm_head", &["lm_head.weight".into()], vocab[0], vocab[1])?)
            }
        };
        let shared = layers.tensor(w, "shared.weight", &vocab)?;
        // mt0 checkpoints store only `shared.weight`; both stacks embed with it.
        let mut embed = |name: &str| -> Result<Embedding> {
            let t = layers
                .tensor_optional(w, name, &vocab)?
                .unwrap_or_else(|| shared.clone());
            Ok(Embedding::new(t, cfg.d_model))
        };
        let encoder_embed = embed("encoder.embed_tokens.weight")?;
        let decoder_embed = embed("decoder.embed_tokens.weight")?;
        let lm_head = match untied_head {
            Some(head) => head,
            None => {
                w.discard("lm_head.weight");
                layers.layer("lm_head", !w.is_modified("shared.weight"), || {
                    Ok(shared.clone())
                })?
            }
        };
        let greedy = layers.greedy_head(&lm_head, head_is_base);
        let bias_shape = [cfg.relative_attention_num_buckets, cfg.num_heads];
        let encoder_bias = layers.tensor(
            w,
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &bias_shape,
        )?;
        let decoder_bias = layers.tensor(
            w,
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &bias_shape,
        )?;
        let encoder_blocks = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                Ok(EncoderBlock {
                    self_attn: Attention::load(w, layers, &format!("{p}.0.SelfAttention"), cfg)?,
                    attn_norm: LayerNorm::load(w, layers, &format!("{p}.0.layer_norm"), cfg)?,
                    ff: FeedForward::load(w, layers, &format!("{p}.1.DenseReluDense"), cfg)?,
                    ff_norm: LayerNorm::load(w, layers, &format!("{p}.1.layer_norm"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder_blocks = (0..cfg.decoder_layers())
            .map(|i| {
                let p = format!("decoder.block.{i}.layer");
                Ok(DecoderBlock {
                    self_attn: Attention::load(w, layers, &format!("{p}.0.SelfAttention"), cfg)?,
                    self_attn_norm: LayerNorm::load(w, layers, &format!("{p}.0.layer_norm"), cfg)?,
                    cross_attn: Attention::load(w, layers, &format!("{p}.1.EncDecAttention"), cfg)?,
                    cross_attn_norm: LayerNorm::load(w, layers, &format!("{p}.1.layer_norm"), cfg)?,
                    ff: FeedForward::load(w, layers, &format!("{p}.2.DenseReluDense"), cfg)?,
                    ff_norm: LayerNorm::load(w, layers, &format!("{p}.2.layer_norm"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            encoder_norm: LayerNorm::load(w, layers, "encoder.final_layer_norm", cfg)?,
            decoder_norm: LayerNorm::load(w, layers, "decoder.final_layer_norm", cfg)?,
            config,
            encoder_embed,
            decoder_embed,
            encoder_bias,
            encoder_blocks,
            decoder_bias,
            decoder_blocks,
            lm_head,
            greedy,
            device,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.decoder_embed.embeddings().dtype()
    }

    /// Every weight allocation the model holds, with its size in bytes: to count what models
    /// built from one base share, and what each adds.
    pub fn storages(&self) -> Vec<(Storage, usize)> {
        let attn = |a: &Attention| [a.q.storage(), a.kv.storage(), a.o.storage()];
        let ff = |f: &FeedForward| [f.wi.storage(), f.wo.storage()];
        let mut all = vec![
            Storage::of(self.encoder_embed.embeddings()),
            Storage::of(self.decoder_embed.embeddings()),
            Storage::of(&self.encoder_bias),
            Storage::of(&self.decoder_bias),
            Storage::of(&self.encoder_norm.weight),
            Storage::of(&self.decoder_norm.weight),
            self.lm_head.storage(),
        ];
        if let Some(g) = &self.greedy {
            all.push((Storage::Packed(Arc::as_ptr(g) as usize), g.size_in_bytes()));
        }
        for b in &self.encoder_blocks {
            all.extend(attn(&b.self_attn));
            all.extend(ff(&b.ff));
            all.extend([&b.attn_norm, &b.ff_norm].map(|n| Storage::of(&n.weight)));
        }
        for b in &self.decoder_blocks {
            all.extend(attn(&b.self_attn));
            all.extend(attn(&b.cross_attn));
            all.extend(ff(&b.ff));
            let norms = [&b.self_attn_norm, &b.cross_attn_norm, &b.ff_norm];
            all.extend(norms.map(|n| Storage::of(&n.weight)));
        }
        all
    }

    /// Runs the encoder over `inputs` in one batch. The linear layers and norms see only real
    /// tokens (packed); attention reads them packed too on the CPU in f32, and elsewhere runs on
    /// the right-padded layout with a padding mask.
    pub fn encode(&self, inputs: &[&[u32]]) -> candle_core::Result<Encoded> {
        self.encode_with(inputs, self.attends_packed())
    }

    /// Whether attention runs from [`packed_attention`] (CPU, f32) rather than candle's ops.
    fn attends_packed(&self) -> bool {
        self.device.is_cpu() && self.dtype() == DType::F32
    }

    /// [`Self::encode`], with attention from [`packed_attention`] (CPU f32 only) or not.
    fn encode_with(&self, inputs: &[&[u32]], attend_packed: bool) -> candle_core::Result<Encoded> {
        let t = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
        if t == 0 {
            candle_core::bail!("encode needs at least one non-empty input");
        }
        let b = inputs.len();
        let lengths: Vec<usize> = inputs.iter().map(|i| i.len()).collect();
        let packed: Vec<u32> = inputs.iter().flat_map(|i| i.iter().copied()).collect();
        let total = packed.len();
        let mut unpack = Vec::with_capacity(b * t);
        let mut offset = 0;
        for &len in &lengths {
            unpack.extend((0..t).map(|i| if i < len { (offset + i) as u32 } else { 0 }));
            offset += len;
        }
        let attention = if attend_packed {
            EncoderAttention::Packed {
                lengths: &lengths,
                bias: self.packed_encoder_bias(t)?,
            }
        } else {
            EncoderAttention::Padded(self.padded_layout(&lengths, &unpack, t)?)
        };
        let mut x = self
            .encoder_embed
            .forward(&Tensor::from_vec(packed, total, &self.device)?)?;
        for block in &self.encoder_blocks {
            let a = &block.self_attn;
            let out = attention.forward(a, &block.attn_norm.forward(&x)?)?;
            x = (x + a.o.forward(&out)?)?;
            x = (&x + block.ff.forward(&block.ff_norm.forward(&x)?)?)?;
        }
        Ok(Encoded {
            hidden: self.encoder_norm.forward(&x)?,
            lengths,
            unpack,
            longest: t,
        })
    }

    /// The encoder's position bias per head over relative positions `-(t - 1)..=t - 1`, for
    /// [`packed_attention::self_attention`].
    fn packed_encoder_bias(&self, t: usize) -> candle_core::Result<Vec<f32>> {
        let table: Vec<Vec<f32>> = self.encoder_bias.to_dtype(DType::F32)?.to_vec2()?;
        let span = t as i64 - 1;
        let ids = self.config.position_buckets(-span..=span, true);
        Ok((0..self.config.num_heads)
            .flat_map(|h| {
                ids.iter()
                    .map(|&id| table[id as usize][h])
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    /// What the padded encoder attention needs for inputs of `lengths` packed per `unpack`
    /// (see [`Encoded::unpack`]), `t` the longest.
    fn padded_layout(
        &self,
        lengths: &[usize],
        unpack: &[u32],
        t: usize,
    ) -> candle_core::Result<PaddedLayout> {
        let b = lengths.len();
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&len| (0..t).map(move |i| if i < len { 0.0 } else { f32::MIN }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, t), &self.device)?;
        let bias = self
            .position_bias(
                &self.encoder_bias,
                (0..t).flat_map(|q| (0..t).map(move |k| k as i64 - q as i64)),
                (t, t),
                true,
            )?
            .broadcast_add(&mask)?;
        let repack: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(row, &len)| (0..len).map(move |i| (row * t + i) as u32))
            .collect();
        let total = repack.len();
        Ok(PaddedLayout {
            bias,
            unpack: Tensor::from_vec(unpack.to_vec(), b * t, &self.device)?,
            repack: Tensor::from_vec(repack, total, &self.device)?,
            batch: b,
            longest: t,
        })
    }

    /// An empty decode batch for this model.
    pub fn new_batch(&self) -> DecodeBatch {
        let cfg = &self.config;
        DecodeBatch::new(
            CacheShape {
                layers: cfg.decoder_layers(),
                heads: cfg.num_heads,
                d_kv: cfg.d_kv,
            },
            self.dtype(),
            &self.device,
        )
    }

    /// Adds one decoder sequence per entry of `rows` (an index into `encoded`; an encoded input
    /// may start several sequences) to `batch`, projecting each input's cross-attention K/V once.
    /// Returns the slots of the new sequences, in order.
    pub fn join(
        &self,
        batch: &mut DecodeBatch,
        encoded: &Encoded,
        rows: &[usize],
    ) -> candle_core::Result<Vec<usize>> {
        // Each new sequence's source positions, padded to the longest, as packed rows.
        let t = encoded.longest;
        let gather: Vec<u32> = rows
            .iter()
            .flat_map(|&r| encoded.unpack[r * t..(r + 1) * t].iter().copied())
            .collect();
        let gather = Tensor::from_vec(gather, rows.len() * t, &self.device)?;
        let cross_kv = self
            .decoder_blocks
            .iter()
            .map(|block| {
                let a = &block.cross_attn;
                let kv = a.kv.forward(&encoded.hidden)?.index_select(&gather, 0)?;
                a.split_kv(&kv.reshape((rows.len(), t, ()))?)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lens: Vec<usize> = rows.iter().map(|&r| encoded.lengths[r]).collect();
        batch.fill(cross_kv, &lens)
    }

    /// Position bias `(1, heads, q_len, k_len)` from each (query, key) pair's relative position
    /// (key minus query, row-major). The bucket ids are computed here; the table lookup runs on
    /// the device.
    fn position_bias(
        &self,
        table: &Tensor,
        relative: impl Iterator<Item = i64>,
        (q_len, k_len): (usize, usize),
        bidirectional: bool,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let ids = cfg.position_buckets(relative, bidirectional);
        let ids = Tensor::from_vec(ids, q_len * k_len, &self.device)?;
        table
            .index_select(&ids, 0)?
            .t()?
            .reshape((1, cfg.num_heads, q_len, k_len))?
            .to_dtype(DType::F32)
    }

    /// Token ids `(slots, n)` for a step feeding `tokens` (slot, ids): every active slot exactly
    /// once, the same number of tokens each; free slots get padding.
    fn step_ids(
        &self,
        batch: &DecodeBatch,
        tokens: &[(usize, Vec<u32>)],
    ) -> candle_core::Result<(Tensor, usize)> {
        let n = tokens.first().map_or(0, |(_, t)| t.len());
        if n == 0 || tokens.iter().any(|(_, t)| t.len() != n) {
            candle_core::bail!("decode needs one equally long, non-empty token list per slot");
        }
        let slots = batch.num_slots();
        let mut ids = vec![self.config.pad_token_id(); slots * n];
        let mut listed = vec![false; slots];
        for (slot, t) in tokens {
            if !batch.is_active(*slot) || std::mem::replace(&mut listed[*slot], true) {
                candle_core::bail!("slot {slot} is not active or listed twice");
            }
            ids[slot * n..(slot + 1) * n].copy_from_slice(t);
        }
        if tokens.len() != batch.active() {
            candle_core::bail!("every active slot must be fed at each step");
        }
        Ok((Tensor::from_vec(ids, (slots, n), &self.device)?, n))
    }

    /// Feeds `tokens[i].1` to slot `tokens[i].0` of `batch`: every active slot exactly once, the
    /// same number of tokens each (several tokens are teacher-forced with a causal mask). Returns
    /// the final decoder hidden states of the listed slots, `(listed, n_tokens, d_model)`, in
    /// the order listed; [`Self::logits`] projects them onto the vocabulary.
    pub fn decode(
        &self,
        batch: &mut DecodeBatch,
        tokens: &[(usize, Vec<u32>)],
    ) -> candle_core::Result<Tensor> {
        let (ids, n) = self.step_ids(batch, tokens)?;
        let start = batch.begin_step(n)?;
        let width = start + n;
        // Key column c seen from query q of this step is c - (start + q) positions away, for
        // every slot (see `DecodeBatch`), so one bias serves the whole batch.
        let relative = (0..n).flat_map(|q| (0..width).map(move |c| c as i64 - (start + q) as i64));
        let position = self.position_bias(&self.decoder_bias, relative, (n, width), false)?;
        let attention = if self.attends_packed() && n == 1 {
            SelfAttention::Packed {
                firsts: batch.first_columns(),
                bias: position.flatten_all()?.to_vec1()?,
            }
        } else {
            SelfAttention::Masked(position.broadcast_add(&batch.self_mask(start, n)?)?)
        };
        self.run_decoder(batch, tokens, ids, start, &attention)
    }

    /// Feeds each listed slot of a fresh batch a whole token tree at once: node `i` carries
    /// `tokens[slot][i]` and has parent `parents[i]` (`None` for the root). Every node attends to
    /// itself and its ancestors at their depth, as if its root-to-node path had been decoded
    /// alone, so all paths of the tree cost one pass and each shared prefix is computed once.
    /// Returns the hidden states like [`Self::decode`], one per node.
    pub fn decode_tree(
        &self,
        batch: &mut DecodeBatch,
        tokens: &[(usize, Vec<u32>)],
        parents: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let (ids, n) = self.step_ids(batch, tokens)?;
        if parents.len() != n
            || parents
                .iter()
                .enumerate()
                .any(|(i, p)| p.is_some_and(|p| p >= i))
        {
            candle_core::bail!("a token tree needs one parent per node, each before its child");
        }
        if batch.begin_step(n)? != 0 {
            candle_core::bail!("a token tree must start a fresh decode batch");
        }
        let mut depth = vec![0i64; n];
        let mut visible = vec![f32::MIN; n * n];
        for i in 0..n {
            depth[i] = parents[i].map_or(0, |p| depth[p] + 1);
            let mut node = Some(i);
            while let Some(j) = node {
                visible[i * n + j] = 0.0;
                node = parents[j];
            }
        }
        let relative = (0..n)
            .flat_map(|q| (0..n).map(move |k| (q, k)))
            .map(|(q, k)| depth[k] - depth[q]);
        let bias = self
            .position_bias(&self.decoder_bias, relative, (n, n), false)?
            .broadcast_add(&Tensor::from_vec(visible, (1, 1, n, n), &self.device)?)?;
        self.run_decoder(batch, tokens, ids, 0, &SelfAttention::Masked(bias))
    }

    /// The decoder stack over `ids` `(slots, n)` written at cache column `start`, its
    /// self-attention's biases already built.
    fn run_decoder(
        &self,
        batch: &mut DecodeBatch,
        tokens: &[(usize, Vec<u32>)],
        ids: Tensor,
        start: usize,
        attention: &SelfAttention,
    ) -> candle_core::Result<Tensor> {
        let (slots, n) = ids.dims2()?;
        let width = start + n;
        // On the CPU in f32, cross-attention reads each slot's real source only (see
        // `packed_attention`); elsewhere candle's ops run over the padding with a mask.
        let source_lengths = self.attends_packed().then(|| batch.source_lengths());
        let mut x = self.decoder_embed.forward(&ids)?;
        for (layer, block) in self.decoder_blocks.iter().enumerate() {
            let cache = batch.layer(layer)?;
            let a = &block.self_attn;
            let h = block.self_attn_norm.forward(&x)?;
            let q = a.split_heads(&a.q.forward(&h)?)?;
            let (ck, cv) = &cache.self_kv;
            let (k, v) = a.split_kv(&a.kv.forward(&h)?)?;
            ck.slice_set(&k, 2, start)?;
            cv.slice_set(&v, 2, start)?;
            let out = match attention {
                SelfAttention::Packed { firsts, bias } => {
                    packed_attention::decode_self_attention(&q, ck, cv, firsts, width, bias)?
                }
                SelfAttention::Masked(bias) => {
                    Attention::attend(&q, &ck.narrow(2, 0, width)?, &cv.narrow(2, 0, width)?, bias)?
                }
            };
            x = (x + a.o.forward(&a.merge_heads(&out)?)?)?;

            let a = &block.cross_attn;
            let h = block.cross_attn_norm.forward(&x)?;
            let q = a.split_heads(&a.q.forward(&h)?)?;
            let (xk, xv) = &cache.cross_kv;
            let out = match &source_lengths {
                Some(lengths) => packed_attention::cross_attention(&q, xk, xv, lengths)?,
                None => Attention::attend(&q, xk, xv, &cache.cross_mask)?,
            };
            x = (x + a.o.forward(&a.merge_heads(&out)?)?)?;

            x = (&x + block.ff.forward(&block.ff_norm.forward(&x)?)?)?;
        }
        batch.end_step(n);
        let x = self.decoder_norm.forward(&x)?;
        let in_order =
            tokens.len() == slots && tokens.iter().enumerate().all(|(i, (s, _))| i == *s);
        if in_order {
            return Ok(x);
        }
        let order: Vec<u32> = tokens.iter().map(|(s, _)| *s as u32).collect();
        x.index_select(&Tensor::from_vec(order, tokens.len(), &self.device)?, 0)
    }

    /// Vocabulary logits, f32, of decoder hidden states `(rows, d_model)` -> `(rows, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.lm_head
            .forward_wide(&self.head_input(hidden)?)?
            .to_dtype(DType::F32)
    }

    /// What `lm_head` multiplies: tied embeddings are scaled first, as transformers does.
    fn head_input(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        if self.config.tie_word_embeddings() {
            hidden * (self.config.d_model as f64).powf(-0.5)
        } else {
            Ok(hidden.clone())
        }
    }

    /// Each row's greedy token, the first argmax of [`Self::logits`], when `lm_head` has its
    /// int8 screen and it pays for this many rows (see [`super::greedy`]); `None` where the
    /// logits must be computed.
    pub fn greedy_tokens(&self, hidden: &Tensor) -> candle_core::Result<Option<Vec<u32>>> {
        let rows = hidden.dim(0)?;
        let Some(head) = self.greedy.as_ref().filter(|h| h.pays_for(rows)) else {
            return Ok(None);
        };
        let x: Vec<f32> = self
            .head_input(hidden)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Ok(head.argmax(&x, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar())
            .unwrap()
    }

    /// A tiny random mT5 (2 encoder layers, 1 decoder layer, 2 heads), f32 on the CPU.
    fn tiny_model() -> T5Model {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "mt5", "vocab_size": 64, "d_model": 16, "d_kv": 8, "d_ff": 32,
            "num_layers": 2, "num_decoder_layers": 1, "num_heads": 2,
            "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false
        }))
        .unwrap();
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        let mut add = |name: String, shape: &[usize]| {
            t.insert(name, Tensor::randn(0f32, 0.5, shape, &dev).unwrap());
        };
        add("shared.weight".into(), &[64, 16]);
        add("lm_head.weight".into(), &[64, 16]);
        for stack in ["encoder", "decoder"] {
            let p = format!("{stack}.block.0.layer.0.SelfAttention");
            add(format!("{p}.relative_attention_bias.weight"), &[32, 2]);
            add(format!("{stack}.final_layer_norm.weight"), &[16]);
            let blocks = if stack == "encoder" { 2 } else { 1 };
            for i in 0..blocks {
                let attn: &[&str] = if stack == "encoder" {
                    &["0.SelfAttention"]
                } else {
                    &["0.SelfAttention", "1.EncDecAttention"]
                };
                for a in attn {
                    for w in ["q", "k", "v"] {
                        add(format!("{stack}.block.{i}.layer.{a}.{w}.weight"), &[16, 16]);
                    }
                    add(format!("{stack}.block.{i}.layer.{a}.o.weight"), &[16, 16]);
                }
                let ff = attn.len();
                for l in 0..=ff {
                    add(
                        format!("{stack}.block.{i}.layer.{l}.layer_norm.weight"),
                        &[16],
                    );
                }
                let dense = format!("{stack}.block.{i}.layer.{ff}.DenseReluDense");
                add(format!("{dense}.wi_0.weight"), &[32, 16]);
                add(format!("{dense}.wi_1.weight"), &[32, 16]);
                add(format!("{dense}.wo.weight"), &[16, 32]);
            }
        }
        let mut w = Weights::from_tensors(t, "random", DType::F32, &dev);
        T5Model::load(config, &mut w, &mut SharedLayers::default()).unwrap()
    }

    #[test]
    fn packed_encoder_attention_equals_the_padded_one() {
        let model = tiny_model();
        // Lengths past 8 reach the logarithmic position buckets; one input of a single token.
        let ids: Vec<Vec<u32>> = [5, 1, 40, 17]
            .iter()
            .enumerate()
            .map(|(b, &n)| (0..n).map(|i| ((b * 13 + i * 7) % 64) as u32).collect())
            .collect();
        let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let packed = model.encode_with(&inputs, true).unwrap();
        let padded = model.encode_with(&inputs, false).unwrap();
        assert_eq!(packed.hidden.dims(), [63, 16]);
        let diff = max_abs_diff(&packed.hidden, &padded.hidden);
        assert!(diff < 1e-5, "packed and padded encoders differ by {diff}");
    }

    #[test]
    fn cross_attention_over_real_sources_equals_the_masked_one() {
        let dev = Device::Cpu;
        let (slots, heads, n, cap, d) = (3, 2, 4, 6, 8);
        let q = Tensor::randn(0f32, 1.0, (slots, heads, n, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (slots, heads, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (slots, heads, cap, d), &dev).unwrap();
        let lengths = [6, 2, 1];
        let mask: Vec<f32> = lengths
            .iter()
            .flat_map(|&len| (0..cap).map(move |c| if c < len { 0.0 } else { f32::MIN }))
            .collect();
        let mask = Tensor::from_vec(mask, (slots, 1, 1, cap), &dev).unwrap();
        let packed = packed_attention::cross_attention(&q, &k, &v, &lengths).unwrap();
        let masked = Attention::attend(&q, &k, &v, &mask).unwrap();
        let diff = max_abs_diff(&packed, &masked);
        assert!(diff < 1e-5, "cross attentions differ by {diff}");
    }

    #[test]
    fn decode_self_attention_over_own_columns_equals_the_masked_one() {
        let dev = Device::Cpu;
        let (slots, heads, cap, d, width) = (4, 2, 8, 8, 6);
        let q = Tensor::randn(0f32, 1.0, (slots, heads, 1, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (slots, heads, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (slots, heads, cap, d), &dev).unwrap();
        // Joined at column 0, 3 and 5 (the step's own column); the third slot is free.
        let firsts = [Some(0), Some(3), None, Some(5)];
        let bias = Tensor::randn(0f32, 1.0, (1, heads, 1, width), &dev).unwrap();
        let mask: Vec<f32> = firsts
            .iter()
            .flat_map(|f| (0..width).map(move |c| if c < f.unwrap_or(0) { f32::MIN } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (slots, 1, 1, width), &dev).unwrap();
        let packed = packed_attention::decode_self_attention(
            &q,
            &k,
            &v,
            &firsts,
            width,
            &bias.flatten_all().unwrap().to_vec1().unwrap(),
        )
        .unwrap();
        let masked = Attention::attend(
            &q,
            &k.narrow(2, 0, width).unwrap(),
            &v.narrow(2, 0, width).unwrap(),
            &bias.broadcast_add(&mask).unwrap(),
        )
        .unwrap();
        let busy = Tensor::new(&[0u32, 1, 3], &dev).unwrap();
        let (packed_busy, masked_busy) = (
            packed.index_select(&busy, 0).unwrap(),
            masked.index_select(&busy, 0).unwrap(),
        );
        let diff = max_abs_diff(&packed_busy, &masked_busy);
        assert!(diff < 1e-5, "self attentions differ by {diff}");
        let free = packed.get(2).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            free.to_scalar::<f32>().unwrap(),
            0.0,
            "a free slot reads nothing"
        );
    }

    #[test]
    fn buckets_match_transformers_formula() {
        // Values from transformers' `_relative_position_bucket` (32 buckets, max distance 128).
        let bi = |p| relative_position_bucket(p, true, 32, 128);
        assert_eq!(
            [-1000, -128, -20, -8, -7, -1, 0, 1, 7, 8, 20, 127, 1000].map(bi),
            [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31]
        );
        let uni = |p| relative_position_bucket(p, false, 32, 128);
        assert_eq!(
            [-1000, -127, -40, -16, -15, -1, 0, 5].map(uni),
            [31, 31, 23, 16, 15, 1, 0, 0]
        );
    }

    #[test]
    fn activation_names_follow_transformers() {
        assert_eq!(
            Activation::parse("gated-gelu").unwrap(),
            (Activation::GeluNew, true)
        );
        assert_eq!(
            Activation::parse("gelu").unwrap(),
            (Activation::Gelu, false)
        );
        assert_eq!(
            Activation::parse("relu").unwrap(),
            (Activation::Relu, false)
        );
        assert!(Activation::parse("gated-tanh").is_err());
    }
}
