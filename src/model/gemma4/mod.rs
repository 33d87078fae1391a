//! Gemma 4 (`gemma4_unified`) in-process: config, the network, its KV cache,
//! and token sampling. Knows nothing of sessions or transports.

pub mod audio;
pub mod cache;
pub mod config;
pub mod fused;
pub mod init;
pub mod loader;
pub mod model;
pub mod parity;
pub mod sampling;
pub mod skinny;
pub mod template;
pub mod tokenizer;
pub mod tool_call;
pub mod vision;

pub use audio::{audio_frames, audio_tokens};
pub use cache::KvCache;
pub use config::Gemma4Config;
pub use model::{ForwardInput, Gemma4Model, ImageInput};

/// `hark model logits`: one forward over the ids (and audio) in `inputs`, logits to `.npy`.
pub fn logits_command(checkpoint: &std::path::Path, inputs: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = std::fs::read_to_string(inputs).with_context(|| format!("reading {}", inputs.display()))?;
    let spec: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", inputs.display()))?;
    let ids: Vec<u32> = spec["input_ids"]
        .as_array()
        .context("inputs.json needs \"input_ids\": [..]")?
        .iter()
        .map(|v| v.as_u64().map(|x| x as u32).context("input_ids must be non-negative integers"))
        .collect::<anyhow::Result<_>>()?;
    let dtype = match spec["dtype"].as_str().unwrap_or("f32") {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        other => anyhow::bail!("dtype {other}: use f32 or bf16"),
    };
    let device = candle_core::Device::Cpu;
    let model = loader::load(checkpoint, dtype, &device)?;
    let audio = match spec["audio"].as_str() {
        None => None,
        Some(path) => {
            let base = inputs.parent().unwrap_or(std::path::Path::new("."));
            let mut r = hound::WavReader::open(base.join(path)).with_context(|| format!("opening {path}"))?;
            anyhow::ensure!(r.spec().sample_rate == 16_000 && r.spec().channels == 1, "{path}: needs 16 kHz mono");
            let samples: Vec<f32> = r.samples::<i16>().map(|s| s.map(|s| s as f32 / 32768.0)).collect::<Result<_, _>>()?;
            Some(audio_frames(&samples, &device)?)
        }
    };
    // Images: paths relative to inputs.json, cut into 48-px patches within
    // "image_tokens" (default 280); "image_resize": false keeps sizes that are already
    // multiples of 48, as transformers' processor does with do_resize=False.
    let budget = spec["image_tokens"].as_u64().unwrap_or(280) as usize;
    let resize = spec["image_resize"].as_bool().unwrap_or(true);
    let mut images = Vec::new();
    for p in spec["images"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let path = p.as_str().context("\"images\" must be a list of file paths")?;
        let base = inputs.parent().unwrap_or(std::path::Path::new("."));
        let bytes = std::fs::read(base.join(path)).with_context(|| format!("reading {path}"))?;
        let patches = if resize {
            vision::decode_and_patch(&bytes, budget)?
        } else {
            let (rgb, w, h) = vision::decode_rgb(&bytes)?;
            vision::patches_from_rgb(&rgb, w, h, budget, false)?
        };
        let n = patches.positions.len();
        images.push(ImageInput { patches: candle_core::Tensor::from_vec(patches.data, (n, vision::PATCH_DIM), &device)?, positions: patches.positions });
    }
    let mut cache = model.new_cache();
    let logits = model.forward(&ForwardInput { tokens: &ids, audio_frames: audio.as_ref(), images: &images, all_logits: true }, &mut cache)?;
    write_npy_f32(&logits, out)?;
    Ok(())
}

/// Writes a tensor as a little-endian f32 `.npy` in one buffered pass. candle's
/// `write_npy` issues one `write` call per element, which took minutes for a
/// vocabulary-wide logits matrix.
fn write_npy_f32(t: &candle_core::Tensor, path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let data = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let shape: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 { format!("({},)", shape[0]) } else { format!("({})", shape.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for v in data {
        w.write_all(&v.to_le_bytes())?;
    }
    w.flush()?;
    Ok(())
}
