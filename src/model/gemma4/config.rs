//! `config.json` of a `gemma4_unified` checkpoint, as transformers saves it.
//!
//! Every size is read from the file; nothing about the 12B is hard-coded. Both the
//! `per_layer_config` form (transformers 5.17) and the `global_head_dim` /
//! `num_global_key_value_heads` form (newer releases) are accepted.

use std::path::Path;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not valid JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("config.json: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Local attention over the last `sliding_window` positions.
    Sliding,
    /// Global attention over everything.
    Full,
}

/// Attention shape of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    pub kind: LayerKind,
    pub head_dim: usize,
    pub num_kv_heads: usize,
    /// No `v_proj`: V is the raw K projection through the V-norm.
    pub k_eq_v: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    /// Fraction of each head's dimension pairs that rotate ("proportional" RoPE).
    pub partial_rotary_factor: f64,
    /// "default" or "proportional".
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub layers: Vec<LayerSpec>,
    pub rms_norm_eps: f64,
    pub sliding_window: usize,
    pub rope_sliding: RopeSpec,
    pub rope_full: RopeSpec,
    pub final_logit_softcapping: Option<f64>,
    /// `"vision"`: tokens of one image attend to each other both ways.
    pub bidirectional_vision: bool,
    pub max_position_embeddings: usize,
    pub pad_token_id: u32,
    pub hidden_activation: String,
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AudioConfig {
    /// Samples per audio token (640 = 40 ms at 16 kHz).
    pub samples_per_token: usize,
    pub rms_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub patch_size: usize,
    pub pooling_kernel_size: usize,
    pub mm_embed_dim: usize,
    pub mm_posemb_size: usize,
    pub output_proj_dims: usize,
    pub rms_norm_eps: f64,
}

impl VisionConfig {
    /// Side of one model patch in pixels (48).
    pub fn model_patch_size(&self) -> usize {
        self.patch_size * self.pooling_kernel_size
    }

    /// Floats per flattened patch (48 × 48 × 3).
    pub fn patch_dim(&self) -> usize {
        self.model_patch_size().pow(2) * 3
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4Config {
    pub text: TextConfig,
    pub audio: Option<AudioConfig>,
    pub vision: Option<VisionConfig>,
    pub image_token_id: u32,
    pub audio_token_id: u32,
    pub video_token_id: u32,
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
    pub boa_token_id: u32,
    pub eoa_token_id: u32,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_or(v: &Value, key: &str, default: usize) -> Result<usize, ConfigError> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| ConfigError::Invalid(format!("'{key}' must be a non-negative integer, got {x}"))),
    }
}

fn f64_or(v: &Value, key: &str, default: f64) -> Result<f64, ConfigError> {
    match get(v, key) {
        None => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| ConfigError::Invalid(format!("'{key}' must be a number, got {x}"))),
    }
}

fn id_or(v: &Value, key: &str, default: u32) -> Result<u32, ConfigError> {
    usize_or(v, key, default as usize).map(|n| n as u32)
}

impl Gemma4Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.display().to_string(), source })?;
        Self::from_json(&v)
    }

    pub fn from_json(v: &Value) -> Result<Self, ConfigError> {
        match get(v, "model_type").and_then(Value::as_str) {
            Some("gemma4_unified") | None => {}
            Some(other) => {
                return Err(ConfigError::Invalid(format!("model_type is '{other}'; hark runs 'gemma4_unified' checkpoints")))
            }
        }
        let t = get(v, "text_config").ok_or_else(|| ConfigError::Invalid("missing 'text_config'".into()))?;
        let text = parse_text(t)?;
        let audio = match get(v, "audio_config") {
            None => None,
            Some(a) => Some(AudioConfig {
                samples_per_token: usize_or(a, "audio_embed_dim", 640)?,
                rms_norm_eps: f64_or(a, "rms_norm_eps", 1e-6)?,
            }),
        };
        let vision = match get(v, "vision_config") {
            None => None,
            Some(x) => {
                let mm = usize_or(x, "mm_embed_dim", 3840)?;
                Some(VisionConfig {
                    patch_size: usize_or(x, "patch_size", 16)?,
                    pooling_kernel_size: usize_or(x, "pooling_kernel_size", 3)?,
                    mm_embed_dim: mm,
                    mm_posemb_size: usize_or(x, "mm_posemb_size", 1120)?,
                    output_proj_dims: usize_or(x, "output_proj_dims", mm)?,
                    rms_norm_eps: f64_or(x, "rms_norm_eps", 1e-6)?,
                })
            }
        };
        Ok(Self {
            text,
            audio,
            vision,
            image_token_id: id_or(v, "image_token_id", 258_880)?,
            audio_token_id: id_or(v, "audio_token_id", 258_881)?,
            video_token_id: id_or(v, "video_token_id", 258_884)?,
            boi_token_id: id_or(v, "boi_token_id", 255_999)?,
            eoi_token_id: id_or(v, "eoi_token_id", 258_882)?,
            boa_token_id: id_or(v, "boa_token_id", 256_000)?,
            // transformers names this one `eoa_token_index`.
            eoa_token_id: id_or(v, "eoa_token_index", id_or(v, "eoa_token_id", 258_883)?)?,
        })
    }
}

fn parse_rope(v: Option<&Value>, default_theta: f64, default_partial: f64, default_kind: &str) -> Result<RopeSpec, ConfigError> {
    let Some(v) = v else {
        return Ok(RopeSpec { theta: default_theta, partial_rotary_factor: default_partial, kind: default_kind.into() });
    };
    let kind = get(v, "rope_type").and_then(Value::as_str).unwrap_or(default_kind).to_string();
    if kind != "default" && kind != "proportional" {
        return Err(ConfigError::Invalid(format!("rope_type '{kind}' is not supported (default, proportional)")));
    }
    if let Some(f) = get(v, "factor").and_then(Value::as_f64) {
        if (f - 1.0).abs() > 1e-12 {
            return Err(ConfigError::Invalid(format!("RoPE scaling factor {f} is not supported")));
        }
    }
    Ok(RopeSpec {
        theta: f64_or(v, "rope_theta", default_theta)?,
        partial_rotary_factor: f64_or(v, "partial_rotary_factor", if kind == "proportional" { default_partial } else { 1.0 })?,
        kind,
    })
}

fn parse_text(t: &Value) -> Result<TextConfig, ConfigError> {
    let num_layers = usize_or(t, "num_hidden_layers", 30)?;
    let heads = usize_or(t, "num_attention_heads", 8)?;
    let kv = usize_or(t, "num_key_value_heads", 4)?;
    let head_dim = usize_or(t, "head_dim", 256)?;
    let k_eq_v = get(t, "attention_k_eq_v").and_then(Value::as_bool).unwrap_or(false);
    if usize_or(t, "num_kv_shared_layers", 0)? != 0 {
        return Err(ConfigError::Invalid("num_kv_shared_layers > 0 (KV sharing across layers) is not supported yet".into()));
    }
    let kinds: Vec<LayerKind> = match get(t, "layer_types").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .map(|x| match x.as_str() {
                Some("sliding_attention") => Ok(LayerKind::Sliding),
                Some("full_attention") => Ok(LayerKind::Full),
                other => Err(ConfigError::Invalid(format!("unknown layer type {other:?} in text_config.layer_types"))),
            })
            .collect::<Result<_, _>>()?,
        // transformers' default: every 6th layer is global.
        None => (0..num_layers).map(|i| if (i + 1) % 6 == 0 { LayerKind::Full } else { LayerKind::Sliding }).collect(),
    };
    if kinds.len() != num_layers {
        return Err(ConfigError::Invalid(format!("layer_types has {} entries for {num_layers} layers", kinds.len())));
    }
    let global_head_dim = usize_or(t, "global_head_dim", 512)?;
    let global_kv = get(t, "num_global_key_value_heads").and_then(Value::as_u64).map(|n| n as usize);
    let per_layer = get(t, "per_layer_config").and_then(Value::as_object);
    let mut layers = Vec::with_capacity(num_layers);
    for (i, kind) in kinds.iter().enumerate() {
        let mut spec = LayerSpec { kind: *kind, head_dim, num_kv_heads: kv, k_eq_v: k_eq_v && *kind == LayerKind::Full };
        match per_layer {
            Some(map) => {
                if let Some(o) = map.get(&i.to_string()) {
                    spec.head_dim = usize_or(o, "head_dim", spec.head_dim)?;
                    spec.num_kv_heads = usize_or(o, "num_key_value_heads", spec.num_kv_heads)?;
                }
            }
            None if *kind == LayerKind::Full => {
                spec.head_dim = global_head_dim;
                if k_eq_v {
                    if let Some(g) = global_kv {
                        spec.num_kv_heads = g;
                    }
                }
            }
            None => {}
        }
        if spec.num_kv_heads == 0 || heads % spec.num_kv_heads != 0 {
            return Err(ConfigError::Invalid(format!("layer {i}: {heads} heads is not a multiple of {} KV heads", spec.num_kv_heads)));
        }
        if spec.head_dim % 2 != 0 {
            return Err(ConfigError::Invalid(format!("layer {i}: head_dim {} must be even", spec.head_dim)));
        }
        layers.push(spec);
    }
    let rope = get(t, "rope_parameters");
    let rope_sliding = parse_rope(rope.and_then(|r| get(r, "sliding_attention")), 10_000.0, 1.0, "default")?;
    let rope_full = parse_rope(rope.and_then(|r| get(r, "full_attention")), 1_000_000.0, 0.25, "proportional")?;
    let bidir = get(t, "use_bidirectional_attention").and_then(Value::as_str);
    if bidir == Some("all") {
        return Err(ConfigError::Invalid("use_bidirectional_attention 'all' (an encoder) is not supported".into()));
    }
    let hidden_activation = get(t, "hidden_activation").and_then(Value::as_str).unwrap_or("gelu_pytorch_tanh").to_string();
    if hidden_activation != "gelu_pytorch_tanh" && hidden_activation != "gelu" {
        return Err(ConfigError::Invalid(format!("hidden_activation '{hidden_activation}' is not supported")));
    }
    Ok(TextConfig {
        vocab_size: usize_or(t, "vocab_size", 262_144)?,
        hidden_size: usize_or(t, "hidden_size", 2304)?,
        intermediate_size: usize_or(t, "intermediate_size", 9216)?,
        num_attention_heads: heads,
        layers,
        rms_norm_eps: f64_or(t, "rms_norm_eps", 1e-6)?,
        sliding_window: usize_or(t, "sliding_window", 1024)?,
        rope_sliding,
        rope_full,
        final_logit_softcapping: get(t, "final_logit_softcapping").and_then(Value::as_f64),
        bidirectional_vision: bidir == Some("vision"),
        max_position_embeddings: usize_or(t, "max_position_embeddings", 262_144)?,
        pad_token_id: usize_or(t, "pad_token_id", 0)? as u32,
        hidden_activation,
        tie_word_embeddings: get(t, "tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn per_layer_config_and_global_head_dim_forms_agree() {
        let base = json!({
            "model_type": "gemma4_unified",
            "text_config": {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"], "attention_k_eq_v": true,
                            "per_layer_config": {"2": {"head_dim": 32, "num_key_value_heads": 1}}},
            "eoa_token_index": 77
        });
        let a = Gemma4Config::from_json(&base).unwrap();
        let mut alt = base.clone();
        alt["text_config"].as_object_mut().unwrap().remove("per_layer_config");
        alt["text_config"]["global_head_dim"] = json!(32);
        alt["text_config"]["num_global_key_value_heads"] = json!(1);
        let b = Gemma4Config::from_json(&alt).unwrap();
        assert_eq!(a.text.layers, b.text.layers);
        assert_eq!(a.text.layers[2], LayerSpec { kind: LayerKind::Full, head_dim: 32, num_kv_heads: 1, k_eq_v: true });
        assert_eq!(a.text.layers[0], LayerSpec { kind: LayerKind::Sliding, head_dim: 16, num_kv_heads: 2, k_eq_v: false });
        assert_eq!(a.eoa_token_id, 77);
        assert_eq!(a.text.rope_full.kind, "proportional");
    }

    #[test]
    fn clear_errors() {
        let e = Gemma4Config::from_json(&json!({"model_type": "llama"})).unwrap_err().to_string();
        assert!(e.contains("gemma4_unified"), "{e}");
        let e = Gemma4Config::from_json(&json!({"text_config": {"num_hidden_layers": 2, "layer_types": ["full_attention"]}})).unwrap_err();
        assert!(e.to_string().contains("layer_types"), "{e}");
    }
}
