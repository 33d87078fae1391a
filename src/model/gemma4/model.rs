//! The `gemma4_unified` network on candle: text backbone, audio and vision embedders.
//!
//! Spec: transformers' `models/gemma4_unified/modeling_gemma4_unified.py` (see
//! `docs/gemma4_unified.md` and DESIGN.md §3). Deviations from the usual Gemma
//! recipe that matter here: RMSNorm multiplies by `weight` (not `1 + weight`),
//! attention is unscaled (scaling 1.0) with QK-norm and a scale-free V-norm, global
//! layers may have no `v_proj` (`attention_k_eq_v`: V is the raw K projection),
//! global RoPE is "proportional" (only the first `partial_rotary_factor` of the
//! frequency pairs rotate, with exponents over the full head_dim), and each layer's
//! output is multiplied by a learned scalar.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::cache::KvCache;
use super::skinny;
use super::config::{Gemma4Config, LayerKind, LayerSpec, RopeSpec, TextConfig};

pub type Result<T> = candle_core::Result<T>;

/// One image's patches, already cut and flattened by [`super::vision`].
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// `[patches, 48·48·3]`, pixels in [0, 1], each patch flattened row-major HWC.
    pub patches: Tensor,
    /// `(x, y)` grid position of each patch; `(-1, -1)` marks padding.
    pub positions: Vec<(i64, i64)>,
}

/// One forward call's inputs. Placeholder tokens (`audio_token_id`,
/// `image_token_id`) in `tokens` are replaced, in order, by the embedded audio
/// frames and image patches.
#[derive(Debug, Clone, Default)]
pub struct ForwardInput<'a> {
    pub tokens: &'a [u32],
    /// `[audio tokens, 640]` raw 16 kHz samples, one row per audio placeholder.
    pub audio_frames: Option<&'a Tensor>,
    pub images: &'a [ImageInput],
    /// Whether all logits are wanted (parity checks) or only the last position's.
    pub all_logits: bool,
}

struct Attention {
    spec: LayerSpec,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Option<Linear>,
    o_proj: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    ones: Tensor,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct DecoderLayer {
    attn: Attention,
    mlp: Mlp,
    input_norm: Tensor,
    post_attn_norm: Tensor,
    pre_ff_norm: Tensor,
    post_ff_norm: Tensor,
    layer_scalar: Tensor,
    /// `layer_scalar` read once, for the fused GPU kernel (a constant of the checkpoint).
    layer_scalar_value: f32,
}

/// Raw features (audio frames or vision states) → the text model's space:
/// RMSNorm without scale, then a bias-free projection.
struct MultimodalEmbedder {
    ones: Tensor,
    eps: f64,
    projection: Linear,
}

impl MultimodalEmbedder {
    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, eps: f64) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "embedding_projection.weight")?;
        Ok(Self { ones: Tensor::ones(in_dim, w.dtype(), w.device())?, eps, projection: Linear::new(w, None) })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = candle_nn::ops::rms_norm(&x.to_dtype(self.ones.dtype())?, &self.ones, self.eps as f32)?;
        self.projection.forward(&x)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")? })
    }

    /// Two-pass (centre, then variance) in f32: the fused one-pass kernel loses
    /// precision on pixel values, whose mean is large next to their spread.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        // torch.nn.LayerNorm's default eps.
        let y = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        y.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?.broadcast_add(&self.bias.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

struct VisionEmbedder {
    ln1: LayerNorm,
    dense: Linear,
    ln2: LayerNorm,
    /// `[mm_posemb_size, 2, mm_embed_dim]`
    pos_embedding: Tensor,
    pos_norm: LayerNorm,
    embedder: MultimodalEmbedder,
    patch_dim: usize,
}

impl VisionEmbedder {
    fn forward(&self, image: &ImageInput) -> Result<Tensor> {
        let valid: Vec<u32> =
            image.positions.iter().enumerate().filter(|(_, p)| p.0 >= 0 && p.1 >= 0).map(|(i, _)| i as u32).collect();
        let dev = image.patches.device();
        let idx = Tensor::new(valid.as_slice(), dev)?;
        let patches = image.patches.to_dtype(self.pos_embedding.dtype())?.index_select(&idx, 0)?;
        if patches.dim(1)? != self.patch_dim {
            candle_core::bail!("image patches have {} values, the model expects {}", patches.dim(1)?, self.patch_dim);
        }
        let h = self.ln2.forward(&self.dense.forward(&self.ln1.forward(&patches)?)?)?;
        let posemb = self.pos_embedding.dim(0)?;
        let mut xs = Vec::with_capacity(valid.len());
        let mut ys = Vec::with_capacity(valid.len());
        for &i in &valid {
            let (x, y) = image.positions[i as usize];
            if x as usize >= posemb || y as usize >= posemb {
                candle_core::bail!("image patch position ({x}, {y}) is outside the {posemb}-entry position table");
            }
            xs.push(x as u32);
            ys.push(y as u32);
        }
        let table_x = self.pos_embedding.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        let table_y = self.pos_embedding.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?;
        let pos = (table_x.index_select(&Tensor::new(xs.as_slice(), dev)?, 0)?
            + table_y.index_select(&Tensor::new(ys.as_slice(), dev)?, 0)?)?;
        let h = self.pos_norm.forward(&(h + pos)?)?;
        self.embedder.forward(&h)
    }
}

impl DecoderLayer {
    /// `residual + norm(attention output)`.
    fn post_attention(&self, residual: &Tensor, h: &Tensor, eps: f32) -> Result<Tensor> {
        if gpu_path(h.device()) && super::fused::supported(h.dtype()) {
            return super::fused::residual_rms(residual, h, &self.post_attn_norm, None, eps);
        }
        residual + rms(h, &self.post_attn_norm, eps)?
    }

    /// `(residual + norm(feed-forward output)) · layer_scalar`.
    fn post_feed_forward(&self, residual: &Tensor, h: &Tensor, eps: f32) -> Result<Tensor> {
        if gpu_path(h.device()) && super::fused::supported(h.dtype()) {
            return super::fused::residual_rms(residual, h, &self.post_ff_norm, Some(self.layer_scalar_value), eps);
        }
        (residual + rms(h, &self.post_ff_norm, eps)?)?.broadcast_mul(&self.layer_scalar)
    }

    /// `gelu(gate) · up`.
    fn gelu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        if gpu_path(gate.device()) && super::fused::supported(gate.dtype()) {
            return super::fused::gelu_mul(gate, up);
        }
        gate.gelu()? * up
    }
}

pub struct Gemma4Model {
    pub config: Gemma4Config,
    device: Device,
    dtype: DType,
    embed_tokens: candle_nn::Embedding,
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Linear,
    audio: Option<MultimodalEmbedder>,
    vision: Option<VisionEmbedder>,
    inv_freq_sliding: Vec<f32>,
    inv_freq_full: Vec<f32>,
}

fn linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, name: &str) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), &format!("{name}.weight"))?, None))
}

/// Inverse frequencies for one layer kind, as transformers computes them.
pub fn inv_freq(rope: &RopeSpec, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let rotated = if rope.kind == "proportional" {
        // int(partial_rotary_factor * head_dim // 2)
        ((rope.partial_rotary_factor * head_dim as f64) / 2.0).floor() as usize
    } else {
        half
    };
    (0..half)
        .map(|i| {
            if i < rotated {
                let exponent = (2 * i) as f32 / head_dim as f32;
                1.0 / (rope.theta as f32).powf(exponent)
            } else {
                0.0
            }
        })
        .collect()
}

impl Gemma4Model {
    /// Builds the network from a `VarBuilder` over the checkpoint's tensors.
    pub fn load(config: Gemma4Config, vb: VarBuilder) -> Result<Self> {
        let t: &TextConfig = &config.text;
        let device = vb.device().clone();
        let dtype = vb.dtype();
        let lm = vb.pp("model.language_model");
        let embed = lm.get((t.vocab_size, t.hidden_size), "embed_tokens.weight")?;
        let embed_tokens = candle_nn::Embedding::new(embed.clone(), t.hidden_size);
        let mut layers = Vec::with_capacity(t.layers.len());
        for (i, spec) in t.layers.iter().enumerate() {
            let l = lm.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let hd = spec.head_dim;
            let attn = Attention {
                spec: *spec,
                q_proj: linear(&a, t.hidden_size, t.num_attention_heads * hd, "q_proj")?,
                k_proj: linear(&a, t.hidden_size, spec.num_kv_heads * hd, "k_proj")?,
                v_proj: if spec.k_eq_v { None } else { Some(linear(&a, t.hidden_size, spec.num_kv_heads * hd, "v_proj")?) },
                o_proj: linear(&a, t.num_attention_heads * hd, t.hidden_size, "o_proj")?,
                q_norm: a.get(hd, "q_norm.weight")?,
                k_norm: a.get(hd, "k_norm.weight")?,
                ones: Tensor::ones(hd, dtype, &device)?,
            };
            let m = l.pp("mlp");
            let mlp = Mlp {
                gate: linear(&m, t.hidden_size, t.intermediate_size, "gate_proj")?,
                up: linear(&m, t.hidden_size, t.intermediate_size, "up_proj")?,
                down: linear(&m, t.intermediate_size, t.hidden_size, "down_proj")?,
            };
            let layer_scalar = if l.contains_tensor("layer_scalar") { l.get(1, "layer_scalar")? } else { Tensor::ones(1, dtype, &device)? };
            let layer_scalar_value = layer_scalar.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
            layers.push(DecoderLayer {
                attn,
                mlp,
                input_norm: l.get(t.hidden_size, "input_layernorm.weight")?,
                post_attn_norm: l.get(t.hidden_size, "post_attention_layernorm.weight")?,
                pre_ff_norm: l.get(t.hidden_size, "pre_feedforward_layernorm.weight")?,
                post_ff_norm: l.get(t.hidden_size, "post_feedforward_layernorm.weight")?,
                layer_scalar,
                layer_scalar_value,
            });
        }
        let norm = lm.get(t.hidden_size, "norm.weight")?;
        let lm_head = if vb.contains_tensor("lm_head.weight") && !t.tie_word_embeddings {
            Linear::new(vb.get((t.vocab_size, t.hidden_size), "lm_head.weight")?, None)
        } else {
            Linear::new(embed, None)
        };
        let audio = match &config.audio {
            Some(a) => Some(MultimodalEmbedder::load(&vb.pp("model.embed_audio"), a.samples_per_token, t.hidden_size, a.rms_norm_eps)?),
            None => None,
        };
        let vision = match &config.vision {
            Some(v) => {
                // On disk (save_pretrained and the hub) the vision weights live under
                // `model.vision_embedder.*` with the projection at
                // `model.embed_vision.embedding_projection`; in transformers' memory they
                // are `model.embed_vision.*` and `…multimodal_embedder.embedding_projection`.
                // Accept both spellings.
                let (e, proj) = if vb.contains_tensor("model.vision_embedder.patch_dense.weight") {
                    (vb.pp("model.vision_embedder"), vb.pp("model.embed_vision"))
                } else if vb.contains_tensor("model.embed_vision.patch_dense.weight") {
                    (vb.pp("model.embed_vision"), vb.pp("model.embed_vision.multimodal_embedder"))
                } else {
                    return Err(candle_core::Error::Msg(
                        "config.json has a vision_config but the checkpoint has no vision embedder weights \
                         (model.vision_embedder.patch_dense.weight)"
                            .into(),
                    ));
                };
                Some(VisionEmbedder {
                    ln1: LayerNorm::load(&e.pp("patch_ln1"), v.patch_dim())?,
                    dense: Linear::new(
                        e.get((v.mm_embed_dim, v.patch_dim()), "patch_dense.weight")?,
                        Some(e.get(v.mm_embed_dim, "patch_dense.bias")?),
                    ),
                    ln2: LayerNorm::load(&e.pp("patch_ln2"), v.mm_embed_dim)?,
                    pos_embedding: e.get((v.mm_posemb_size, 2, v.mm_embed_dim), "pos_embedding")?,
                    pos_norm: LayerNorm::load(&e.pp("pos_norm"), v.mm_embed_dim)?,
                    embedder: MultimodalEmbedder::load(&proj, v.output_proj_dims, t.hidden_size, v.rms_norm_eps)?,
                    patch_dim: v.patch_dim(),
                })
            }
            None => None,
        };
        let sliding_hd = t.layers.iter().find(|l| l.kind == LayerKind::Sliding).map(|l| l.head_dim).unwrap_or(2);
        let full_hd = t.layers.iter().find(|l| l.kind == LayerKind::Full).map(|l| l.head_dim).unwrap_or(2);
        Ok(Self {
            inv_freq_sliding: inv_freq(&t.rope_sliding, sliding_hd),
            inv_freq_full: inv_freq(&t.rope_full, full_hd),
            embed_scale: (t.hidden_size as f64).sqrt(),
            config,
            device,
            dtype,
            embed_tokens,
            layers,
            norm,
            lm_head,
            audio,
            vision,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config.text)
    }

    /// Embeds tokens and splices in audio frames and image patches at their placeholders.
    pub fn embed(&self, input: &ForwardInput) -> Result<Tensor> {
        let c = &self.config;
        let is_audio = |t: u32| t == c.audio_token_id;
        let is_image = |t: u32| t == c.image_token_id || t == c.video_token_id;
        let ids: Vec<u32> = input.tokens.iter().map(|&t| if is_audio(t) || is_image(t) { c.text.pad_token_id } else { t }).collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        // transformers scales in the weight dtype.
        let scale = Tensor::new(&[self.embed_scale as f32], &self.device)?.to_dtype(self.dtype)?;
        let text = self.embed_tokens.forward(&ids)?.broadcast_mul(&scale)?;

        let n_audio = input.tokens.iter().filter(|&&t| is_audio(t)).count();
        let n_image = input.tokens.iter().filter(|&&t| is_image(t)).count();
        if n_audio == 0 && n_image == 0 {
            return Ok(text);
        }
        let audio = if n_audio > 0 {
            let frames = input.audio_frames.ok_or_else(|| candle_core::Error::Msg("audio placeholders without audio frames".into()))?;
            let emb = self.audio.as_ref().ok_or_else(|| candle_core::Error::Msg("this checkpoint has no audio embedder".into()))?;
            let out = emb.forward(&frames.to_dtype(self.dtype)?)?;
            if out.dim(0)? != n_audio {
                candle_core::bail!("{n_audio} audio placeholders but {} audio frames", out.dim(0)?);
            }
            Some(out)
        } else {
            None
        };
        let image = if n_image > 0 {
            let emb = self.vision.as_ref().ok_or_else(|| candle_core::Error::Msg("this checkpoint has no vision embedder".into()))?;
            let parts = input.images.iter().map(|img| emb.forward(img)).collect::<Result<Vec<_>>>()?;
            let all = Tensor::cat(&parts, 0)?;
            if all.dim(0)? != n_image {
                candle_core::bail!("{n_image} image placeholders but {} image patches", all.dim(0)?);
            }
            Some(all)
        } else {
            None
        };
        // Splice runs of rows from the three sources together, in token order.
        #[derive(PartialEq, Clone, Copy)]
        enum Src {
            Text,
            Audio,
            Image,
        }
        let src = |t: u32| if is_audio(t) { Src::Audio } else if is_image(t) { Src::Image } else { Src::Text };
        let mut pieces = Vec::new();
        let (mut ai, mut ii) = (0usize, 0usize);
        let mut i = 0;
        while i < input.tokens.len() {
            let s = src(input.tokens[i]);
            let mut j = i;
            while j < input.tokens.len() && src(input.tokens[j]) == s {
                j += 1;
            }
            let len = j - i;
            pieces.push(match s {
                Src::Text => text.narrow(0, i, len)?,
                Src::Audio => {
                    ai += len;
                    audio.as_ref().expect("counted").narrow(0, ai - len, len)?
                }
                Src::Image => {
                    ii += len;
                    image.as_ref().expect("counted").narrow(0, ii - len, len)?.to_dtype(self.dtype)?
                }
            });
            i = j;
        }
        Tensor::cat(&pieces, 0)
    }

    /// Block id per new token: runs of image placeholders attend to each other both ways.
    fn blocks(&self, tokens: &[u32]) -> Vec<i32> {
        let c = &self.config;
        let mut out = vec![-1; tokens.len()];
        if !c.text.bidirectional_vision {
            return out;
        }
        let mut block = -1;
        let mut prev_image = false;
        for (i, &t) in tokens.iter().enumerate() {
            let image = t == c.image_token_id || t == c.video_token_id;
            if image && !prev_image {
                block += 1;
            }
            if image {
                out[i] = block;
            }
            prev_image = image;
        }
        out
    }

    fn rope_tables(&self, inv: &[f32], start: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let half = inv.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            for &f in inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Runs the new tokens through the network, appending to `cache`. Returns logits
    /// `[n, vocab]` (or `[1, vocab]` for the last position).
    pub fn forward(&self, input: &ForwardInput, cache: &mut KvCache) -> Result<Tensor> {
        let n = input.tokens.len();
        if n == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        let start = cache.seq_len();
        if start + n > self.config.text.max_position_embeddings {
            candle_core::bail!("context of {} tokens exceeds the model's {} positions", start + n, self.config.text.max_position_embeddings);
        }
        let mut x = self.embed(input)?;
        let mut masks = MaskMemo::new(self.blocks(input.tokens));
        let rope_s = self.rope_tables(&self.inv_freq_sliding, start, n)?;
        let rope_f = self.rope_tables(&self.inv_freq_full, start, n)?;
        let t = &self.config.text;
        let eps = t.rms_norm_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = if layer.attn.spec.kind == LayerKind::Sliding { &rope_s } else { &rope_f };
            let residual = x.clone();
            let h = rms(&x, &layer.input_norm, eps)?;
            let h = self.attention(&layer.attn, li, &h, cos, sin, start, &mut masks, cache)?;
            x = layer.post_attention(&residual, &h, eps)?;
            let residual = x.clone();
            let h = rms(&x, &layer.pre_ff_norm, eps)?;
            let act = layer.gelu_mul(&project_rows(&layer.mlp.gate, &h)?, &project_rows(&layer.mlp.up, &h)?)?;
            let h = project_rows(&layer.mlp.down, &act)?;
            x = layer.post_feed_forward(&residual, &h, eps)?;
        }
        cache.advance(n);
        let x = if input.all_logits { x } else { x.narrow(0, n - 1, 1)? };
        let x = rms(&x, &self.norm, eps)?;
        let logits = project_rows(&self.lm_head, &x)?.to_dtype(DType::F32)?;
        match t.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// One decode step of several sequences at once: `tokens[i]` continues `caches[i]`.
    /// Projections, MLPs and the LM head run on all rows together (their weights are
    /// read once per step, not once per sequence); attention runs per sequence over its
    /// own cache. Returns logits `[sequences, vocab]`, row `i` for sequence `i`.
    pub fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || caches.len() != b {
            candle_core::bail!("forward_batch needs one cache per token ({} tokens, {} caches)", b, caches.len());
        }
        let max = self.config.text.max_position_embeddings;
        let starts: Vec<usize> = caches.iter().map(|c| c.seq_len()).collect();
        if let Some(s) = starts.iter().find(|&&s| s + 1 > max) {
            candle_core::bail!("context of {} tokens exceeds the model's {max} positions", s + 1);
        }
        let mut x = self.embed(&ForwardInput { tokens, ..Default::default() })?;
        let ropes = starts
            .iter()
            .map(|&s| Ok((self.rope_tables(&self.inv_freq_sliding, s, 1)?, self.rope_tables(&self.inv_freq_full, s, 1)?)))
            .collect::<Result<Vec<_>>>()?;
        let t = &self.config.text;
        let eps = t.rms_norm_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let residual = x.clone();
            let h = rms(&x, &layer.input_norm, eps)?;
            let q = apply(&a.q_proj, &h)?;
            let k = apply(&a.k_proj, &h)?;
            let v = match &a.v_proj {
                Some(v) => apply(v, &h)?,
                None => k.clone(),
            };
            let mut outs = Vec::with_capacity(b);
            for (i, cache) in caches.iter_mut().enumerate() {
                let (rope_s, rope_f) = &ropes[i];
                let (cos, sin) = if a.spec.kind == LayerKind::Sliding { rope_s } else { rope_f };
                let row = |t: &Tensor| t.narrow(0, i, 1);
                let mut masks = MaskMemo::new(vec![-1]);
                outs.push(self.attend(a, li, &row(&q)?, &row(&k)?, &row(&v)?, cos, sin, starts[i], &mut masks, cache)?);
            }
            let h = apply(&a.o_proj, &Tensor::cat(&outs, 0)?)?;
            x = layer.post_attention(&residual, &h, eps)?;
            let residual = x.clone();
            let h = rms(&x, &layer.pre_ff_norm, eps)?;
            let act = layer.gelu_mul(&apply(&layer.mlp.gate, &h)?, &apply(&layer.mlp.up, &h)?)?;
            let h = apply(&layer.mlp.down, &act)?;
            x = layer.post_feed_forward(&residual, &h, eps)?;
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let x = rms(&x, &self.norm, eps)?;
        let logits = apply(&self.lm_head, &x)?.to_dtype(DType::F32)?;
        match t.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        start: usize,
        masks: &mut MaskMemo,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (q, k, v) = Self::project(a, x)?;
        let out = self.attend(a, layer, &q, &k, &v, cos, sin, start, masks, cache)?;
        project_rows(&a.o_proj, &out)
    }

    /// The attention projections of `x` `[n, hidden]`: q, raw k, raw v (k again for
    /// `attention_k_eq_v` layers).
    fn project(a: &Attention, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let q = project_rows(&a.q_proj, x)?;
        let k = project_rows(&a.k_proj, x)?;
        let v = match &a.v_proj {
            Some(v) => project_rows(v, x)?,
            None => k.clone(),
        };
        Ok((q, k, v))
    }

    /// Attention of `n` new positions of one sequence from their projections, over
    /// its cache: norms, RoPE, the cache append, softmax. Returns `[n, heads·head_dim]`
    /// (before `o_proj`).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        a: &Attention,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        start: usize,
        masks: &mut MaskMemo,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = &self.config.text;
        let n = q.dim(0)?;
        let (heads, kv, hd) = (t.num_attention_heads, a.spec.num_kv_heads, a.spec.head_dim);
        let eps = t.rms_norm_eps as f32;
        let q = q.reshape((n, heads, hd))?;
        let q = rms(&q, &a.q_norm, eps)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k_raw = k.reshape((n, kv, hd))?;
        let v_raw = v.reshape((n, kv, hd))?;
        let k = rms(&k_raw, &a.k_norm, eps)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        let v = rms(&v_raw, &a.ones, eps)?.transpose(0, 1)?.contiguous()?;

        let (k_all, v_all, key_start) = cache.append(layer, &k, &v)?;
        let m = k_all.dim(1)?;
        let mask = masks.get(a.spec.kind, start, key_start, m, |blocks| self.mask(a.spec.kind, start, n, key_start, m, blocks))?;

        let groups = heads / kv;
        let q = q.squeeze(0)?.reshape((kv, groups * n, hd))?;
        let probs = if gpu_path(&self.device) {
            // On the GPU every kernel launch counts (a decode step is thousands of
            // them): cuBLAS reads the keys transposed in place rather than after a copy
            // of the whole cache, and candle's softmax computes in f32 from bf16 inputs
            // itself, so the scores stay in the model's dtype (adding 0 or -inf is exact).
            let scores = q.matmul(&k_all.transpose(1, 2)?)?.reshape((kv, groups, n, m))?;
            let scores = match &mask {
                Some(mask) => scores.broadcast_add(&mask.to_dtype(self.dtype)?)?,
                None => scores,
            };
            candle_nn::ops::softmax_last_dim(&scores)?.reshape((kv, groups * n, m))?
        } else {
            let scores = q.matmul(&k_all.transpose(1, 2)?.contiguous()?)?; // [kv, groups·n, m]
            let scores = scores.to_dtype(DType::F32)?.reshape((kv, groups, n, m))?;
            let scores = match &mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?.reshape((kv, groups * n, m))?
        };
        let out = probs.matmul(&v_all)?; // [kv, groups·n, hd]
        out.reshape((heads, n, hd))?.transpose(0, 1)?.contiguous()?.reshape((n, heads * hd))
    }

    /// Additive mask `[n, m]`: 0 where query `start+i` may see key `key_start+j`;
    /// `None` when every query sees every key (a decode step: the cache already holds
    /// only the window), which spares an upload and an add per layer.
    ///
    /// Keys every query sees (the cached past of a global layer) are the mask's leading
    /// columns of zeros: they are made on the device, and only the rest is built here
    /// and uploaded — a prefill chunk at a 128K context would otherwise upload 256 MB.
    fn mask(&self, kind: LayerKind, start: usize, n: usize, key_start: usize, m: usize, blocks: &[i32]) -> Result<Option<Tensor>> {
        let window = self.config.text.sliding_window;
        let visible = |i: usize, j: usize| {
            let q = start + i;
            let k = key_start + j;
            let causal = k <= q && (kind == LayerKind::Full || q - k < window);
            // Same image block: both ways (keys of this call only; blocks never span calls).
            let same_block = k >= start && {
                let b = blocks[k - start];
                b >= 0 && b == blocks[i]
            };
            causal || same_block
        };
        // Leading columns that every query sees. The queries that see a key form one
        // run (causality and the window bound it from both sides; an image block is a
        // run of positions too), so checking the first and last query is enough.
        let lead = (0..m).take_while(|&j| visible(0, j) && visible(n - 1, j)).count();
        if lead == m {
            return Ok(None);
        }
        let rest = m - lead;
        let mut data = vec![f32::NEG_INFINITY; n * rest];
        for i in 0..n {
            for j in lead..m {
                if visible(i, j) {
                    data[i * rest + (j - lead)] = 0.0;
                }
            }
        }
        let tail = Tensor::from_vec(data, (n, rest), &self.device)?;
        if lead == 0 {
            return Ok(Some(tail));
        }
        let zeros = Tensor::zeros((n, lead), DType::F32, &self.device)?;
        Ok(Some(Tensor::cat(&[&zeros, &tail], 1)?))
    }

    /// Every matrix a decode step reads (projections, MLPs, the LM head): what the
    /// GPU bench times alone to find the weight-read share of a step.
    pub fn weight_matrices(&self) -> Vec<&Tensor> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for l in &self.layers {
            let a = &l.attn;
            out.extend([a.q_proj.weight(), a.k_proj.weight(), a.o_proj.weight()]);
            if let Some(v) = &a.v_proj {
                out.push(v.weight());
            }
            out.extend([l.mlp.gate.weight(), l.mlp.up.weight(), l.mlp.down.weight()]);
        }
        out.push(self.lm_head.weight());
        out
    }

    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }
}

/// A bias-free linear layer: on the CPU, a few rows (a decode step) go through the
/// kernel that reads the weights once for all rows ([`skinny`]); more rows (prefill)
/// and other devices through candle's matrix product.
fn project_rows(l: &Linear, x: &Tensor) -> Result<Tensor> {
    match skinny::matmul_t(x, l.weight())? {
        Some(y) => Ok(y),
        None => l.forward(x),
    }
}

/// [`project_rows`] for the rows of a batched decode step. Where the CPU kernel does not
/// apply (a GPU, or more rows than it takes) the product is computed as `W · xᵀ`: the
/// weight is the long side, streamed once. That rounds differently from `x · Wᵀ` in
/// the last bits (about 1e-6 of the logits' scale), so there a batched sequence's
/// greedy token could differ from its lone one at a near tie; on the CPU kernel the
/// two are bit-identical.
fn apply(l: &Linear, x: &Tensor) -> Result<Tensor> {
    match skinny::matmul_t(x, l.weight())? {
        Some(y) => Ok(y),
        None => l.weight().matmul(&x.t()?)?.t()?.contiguous(),
    }
}

/// Whether the GPU's fewer-launch variants are used: on a CUDA device, unless
/// `HARK_GPU_BASELINE=1` asks for the CPU formulation (for the bench's same-run baseline).
fn gpu_path(device: &Device) -> bool {
    static BASELINE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device.is_cuda() && !*BASELINE.get_or_init(|| std::env::var("HARK_GPU_BASELINE").is_ok_and(|v| v == "1"))
}

/// RMSNorm over the last dimension, computed in f32 as transformers does.
fn rms(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if gpu_path(x.device()) {
        // candle's CUDA kernel reads bf16, computes `x · rsqrt(mean(x²) + eps) · w` in
        // f32 and rounds once: the same arithmetic in one launch instead of four.
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps);
    }
    let dtype = x.dtype();
    let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, eps)?;
    y.to_dtype(dtype)
}


/// One forward call's attention masks: every layer of a kind sees the same keys, so
/// its mask is built once per call, not once per layer.
struct MaskMemo {
    /// Image block of each new token (see `Gemma4Model::blocks`).
    blocks: Vec<i32>,
    built: Vec<((LayerKind, usize, usize, usize), Option<Tensor>)>,
}

impl MaskMemo {
    fn new(blocks: Vec<i32>) -> Self {
        Self { blocks, built: Vec::with_capacity(2) }
    }

    fn get(
        &mut self,
        kind: LayerKind,
        start: usize,
        key_start: usize,
        m: usize,
        build: impl FnOnce(&[i32]) -> Result<Option<Tensor>>,
    ) -> Result<Option<Tensor>> {
        let key = (kind, start, key_start, m);
        if let Some((_, mask)) = self.built.iter().find(|(k, _)| *k == key) {
            return Ok(mask.clone());
        }
        let mask = build(&self.blocks)?;
        self.built.push((key, mask.clone()));
        Ok(mask)
    }
}
