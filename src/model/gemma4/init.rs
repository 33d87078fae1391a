//! `hark model init`: writes a random-weight `gemma4_unified` checkpoint in the
//! Hugging Face layout (config.json, model.safetensors, tokenizer.json), so the
//! daemon and its tests run without downloading real weights.
//!
//! Tensors are generated and written one at a time (the safetensors header is
//! computed up front), so even the 12B preset never needs its 24 GB in memory.

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Value};

use super::tokenizer::synthetic_tokenizer_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few MB of weights beyond the embedding: for tests.
    Tiny,
    /// Large enough to make CPU speed measurements meaningful.
    Small,
    /// The real 12B's shapes (≈24 GB in bf16).
    Gemma12B,
}

impl Preset {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tiny" => Some(Preset::Tiny),
            "small" => Some(Preset::Small),
            "12b" => Some(Preset::Gemma12B),
            _ => None,
        }
    }
}

/// Shapes of a preset, in the terms `config.json` uses.
struct Dims {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    global_head_dim: usize,
    global_kv: usize,
    ffn: usize,
    vocab: usize,
    sliding_window: usize,
    mm_posemb: usize,
    global_every: usize,
}

fn dims(p: Preset) -> Dims {
    match p {
        Preset::Tiny => Dims {
            hidden: 64, layers: 4, heads: 4, kv: 2, head_dim: 16, global_head_dim: 32, global_kv: 1, ffn: 128,
            vocab: 262_144, sliding_window: 64, mm_posemb: 256, global_every: 2,
        },
        Preset::Small => Dims {
            hidden: 512, layers: 8, heads: 8, kv: 4, head_dim: 64, global_head_dim: 128, global_kv: 1, ffn: 2048,
            vocab: 262_144, sliding_window: 1024, mm_posemb: 1120, global_every: 4,
        },
        Preset::Gemma12B => Dims {
            hidden: 3840, layers: 48, heads: 16, kv: 8, head_dim: 256, global_head_dim: 512, global_kv: 1, ffn: 15_360,
            vocab: 262_144, sliding_window: 1024, mm_posemb: 1120, global_every: 6,
        },
    }
}

/// The `config.json` of a preset, as transformers would save it.
pub fn config_json(p: Preset) -> Value {
    let d = dims(p);
    let layer_types: Vec<&str> = (0..d.layers)
        .map(|i| if (i + 1) % d.global_every == 0 || i + 1 == d.layers { "full_attention" } else { "sliding_attention" })
        .collect();
    let per_layer: serde_json::Map<String, Value> = layer_types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == "full_attention")
        .map(|(i, _)| (i.to_string(), json!({"head_dim": d.global_head_dim, "num_key_value_heads": d.global_kv})))
        .collect();
    json!({
        "architectures": ["Gemma4UnifiedForConditionalGeneration"],
        "model_type": "gemma4_unified",
        "text_config": {
            "model_type": "gemma4_unified_text",
            "vocab_size": d.vocab, "hidden_size": d.hidden, "intermediate_size": d.ffn,
            "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.kv,
            "head_dim": d.head_dim, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 262_144,
            "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}
            },
            "sliding_window": d.sliding_window, "layer_types": layer_types, "final_logit_softcapping": 30.0,
            "use_bidirectional_attention": "vision", "attention_k_eq_v": true, "num_kv_shared_layers": 0,
            "use_double_wide_mlp": false, "per_layer_config": per_layer
        },
        "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640, "rms_norm_eps": 1e-6},
        "vision_config": {
            "model_type": "gemma4_unified_vision", "patch_size": 16, "pooling_kernel_size": 3,
            "mm_embed_dim": d.hidden, "mm_posemb_size": d.mm_posemb, "output_proj_dims": d.hidden, "rms_norm_eps": 1e-6
        },
        "boi_token_id": 255_999, "eoi_token_id": 258_882, "image_token_id": 258_880, "video_token_id": 258_884,
        "boa_token_id": 256_000, "eoa_token_index": 258_883, "audio_token_id": 258_881,
        "eos_token_id": [1, 106], "tie_word_embeddings": true
    })
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Init {
    Normal(f32),
    /// 1 + N(0, σ): norm scales near one.
    NearOne(f32),
    Zero,
}

fn tensors(p: Preset) -> Vec<(String, Vec<usize>, Init)> {
    let d = dims(p);
    let cfg = config_json(p);
    let types = cfg["text_config"]["layer_types"].as_array().cloned().unwrap_or_default();
    let std = 0.02;
    let mut t = vec![("model.language_model.embed_tokens.weight".to_string(), vec![d.vocab, d.hidden], Init::Normal(std))];
    for i in 0..d.layers {
        let full = types[i] == "full_attention";
        let (hd, kv) = if full { (d.global_head_dim, d.global_kv) } else { (d.head_dim, d.kv) };
        let p = format!("model.language_model.layers.{i}");
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![d.heads * hd, d.hidden], Init::Normal(std)));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv * hd, d.hidden], Init::Normal(std)));
        if !full {
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv * hd, d.hidden], Init::Normal(std)));
        }
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![d.hidden, d.heads * hd], Init::Normal(std)));
        t.push((format!("{p}.self_attn.q_norm.weight"), vec![hd], Init::NearOne(0.1)));
        t.push((format!("{p}.self_attn.k_norm.weight"), vec![hd], Init::NearOne(0.1)));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![d.ffn, d.hidden], Init::Normal(std)));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![d.ffn, d.hidden], Init::Normal(std)));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![d.hidden, d.ffn], Init::Normal(std)));
        for n in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"] {
            t.push((format!("{p}.{n}.weight"), vec![d.hidden], Init::NearOne(0.1)));
        }
        t.push((format!("{p}.layer_scalar"), vec![1], Init::NearOne(0.0)));
    }
    t.push(("model.language_model.norm.weight".into(), vec![d.hidden], Init::NearOne(0.1)));
    t.push(("model.embed_audio.embedding_projection.weight".into(), vec![d.hidden, 640], Init::Normal(std)));
    let patch = 48 * 48 * 3;
    // The on-disk names, as save_pretrained writes them.
    let v = "model.vision_embedder";
    t.push((format!("{v}.patch_ln1.weight"), vec![patch], Init::NearOne(0.1)));
    t.push((format!("{v}.patch_ln1.bias"), vec![patch], Init::Zero));
    t.push((format!("{v}.patch_dense.weight"), vec![d.hidden, patch], Init::Normal(std)));
    t.push((format!("{v}.patch_dense.bias"), vec![d.hidden], Init::Zero));
    t.push((format!("{v}.patch_ln2.weight"), vec![d.hidden], Init::NearOne(0.1)));
    t.push((format!("{v}.patch_ln2.bias"), vec![d.hidden], Init::Zero));
    t.push((format!("{v}.pos_embedding"), vec![d.mm_posemb, 2, d.hidden], Init::Normal(std)));
    t.push((format!("{v}.pos_norm.weight"), vec![d.hidden], Init::NearOne(0.1)));
    t.push((format!("{v}.pos_norm.bias"), vec![d.hidden], Init::Zero));
    t.push(("model.embed_vision.embedding_projection.weight".into(), vec![d.hidden, d.hidden], Init::Normal(std)));
    t
}

/// Writes the checkpoint into `dir` (created if needed). `bf16` halves the size.
/// `progress` is called with (bytes written, total bytes).
pub fn write_random_checkpoint(p: Preset, dir: &Path, bf16: bool, seed: u64, mut progress: impl FnMut(u64, u64)) -> std::io::Result<()> {
    write_config(p, dir)?;

    let list = tensors(p);
    let elem = if bf16 { 2 } else { 4 };
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, _) in &list {
        let bytes = shape.iter().product::<usize>() as u64 * elem;
        header.insert(
            name.clone(),
            json!({"dtype": if bf16 { "BF16" } else { "F32" }, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), json!({"format": "pt", "written_by": "hark model init"}));
    let mut header_bytes = serde_json::to_vec(&Value::Object(header))?;
    // The data section must start 8-byte aligned.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let total = offset;
    let tmp = dir.join("model.safetensors.part");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    w.write_all(&header_bytes)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut written = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    for (_, shape, init) in &list {
        let mut remaining: usize = shape.iter().product();
        while remaining > 0 {
            let n = remaining.min(1 << 18);
            buf.clear();
            for _ in 0..n {
                let v = match init {
                    Init::Normal(s) => normal(&mut rng) * s,
                    Init::NearOne(s) => 1.0 + normal(&mut rng) * s,
                    Init::Zero => 0.0,
                };
                if bf16 {
                    buf.extend_from_slice(&half_bf16(v).to_le_bytes());
                } else {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
            }
            w.write_all(&buf)?;
            remaining -= n;
            written += buf.len() as u64;
            progress(written, total);
        }
    }
    w.flush()?;
    drop(w);
    std::fs::rename(tmp, dir.join("model.safetensors"))
}

/// A preset's `config.json` and synthetic `tokenizer.json`, without weights.
pub fn write_config(p: Preset, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config_json(p))?)?;
    std::fs::write(dir.join("tokenizer.json"), synthetic_tokenizer_json(dims(p).vocab).to_string())
}

/// A random-weight model of `preset` built directly on `device`, with the same tensors
/// and scales as [`write_random_checkpoint`] but no file: the GPU benches use it, since
/// writing and reading back the 12B preset's 24 GB would cost minutes of device time.
pub fn random_model(p: Preset, dtype: candle_core::DType, device: &candle_core::Device) -> anyhow::Result<super::Gemma4Model> {
    use candle_core::{DType, Tensor};
    let config = super::config::Gemma4Config::from_json(&config_json(p))?;
    let mut map = std::collections::HashMap::new();
    for (name, shape, init) in tensors(p) {
        let t = match init {
            Init::Normal(s) => Tensor::randn(0f32, s, shape.as_slice(), device)?,
            Init::NearOne(s) => (Tensor::randn(0f32, s, shape.as_slice(), device)? + 1.0)?,
            Init::Zero => Tensor::zeros(shape.as_slice(), DType::F32, device)?,
        };
        map.insert(name, t.to_dtype(dtype)?);
    }
    let vb = candle_nn::VarBuilder::from_tensors(map, dtype, device);
    Ok(super::Gemma4Model::load(config, vb)?)
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut fastrand::Rng) -> f32 {
    let u1 = rng.f32().max(1e-7);
    let u2 = rng.f32();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// f32 → bf16 bits, rounding to nearest even.
fn half_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding() {
        assert_eq!(half_bf16(1.0), 0x3F80);
        assert_eq!(half_bf16(-2.0), 0xC000);
    }
}
