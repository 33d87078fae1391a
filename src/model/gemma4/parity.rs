//! `hark model parity`: the committed transformers fixtures (`tests/fixtures/gemma4/`,
//! written by `scripts/make_gemma4_fixtures.py` in f32 on the CPU) run on any device
//! and dtype, so a GPU build is checked against the same reference the CPU tests use:
//! text, incremental decoding through the cache, audio and image logits, and greedy
//! tokens against hark's own f32 CPU run.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::{loader, ForwardInput, Gemma4Model, ImageInput};

/// One compared case.
#[derive(Debug, Clone)]
pub struct ParityRow {
    pub case: String,
    /// max |got − expected| / max |expected| over all logits; for greedy rows, the
    /// number of steps (of `steps`) whose token matched the f32 CPU run, as a float.
    pub value: f32,
    pub pass: bool,
    pub detail: String,
}

fn npy(dir: &Path, name: &str) -> anyhow::Result<Tensor> {
    Tensor::read_npy(dir.join(name)).map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(name).display()))
}

fn ids(dir: &Path, name: &str) -> anyhow::Result<Vec<u32>> {
    Ok(npy(dir, name)?.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?.into_iter().map(|x| x as u32).collect())
}

fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (&a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    anyhow::ensure!(diff.is_finite(), "logits are not finite");
    Ok(diff / scale)
}

fn images(dir: &Path, device: &Device) -> anyhow::Result<Vec<ImageInput>> {
    let pixels = npy(dir, "image_pixel_values.npy")?.to_device(device)?;
    let positions = npy(dir, "image_position_ids.npy")?.to_dtype(DType::I64)?;
    (0..pixels.dim(0)?)
        .map(|i| {
            let pos = positions.get(i)?.to_vec2::<i64>()?;
            Ok(ImageInput { patches: pixels.get(i)?, positions: pos.into_iter().map(|p| (p[0], p[1])).collect() })
        })
        .collect()
}

/// Greedy continuation of `prompt` for `steps` tokens.
fn greedy(model: &Gemma4Model, prompt: &[u32], steps: usize) -> anyhow::Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let mut logits = model.forward(&ForwardInput { tokens: prompt, ..Default::default() }, &mut cache)?;
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
        out.push(next);
        logits = model.forward(&ForwardInput { tokens: &[next], ..Default::default() }, &mut cache)?;
    }
    Ok(out)
}

/// Runs every fixture under `root` on `device` in `dtype`; logits must be within
/// `tolerance` (relative) of transformers' f32 logits, and `steps` greedy tokens
/// must equal those of an f32 CPU run (reported, and failed, at the first difference).
pub fn check(root: &Path, device: &Device, dtype: DType, tolerance: f32, steps: usize) -> anyhow::Result<Vec<ParityRow>> {
    let mut rows = Vec::new();
    let mut push = |case: String, value: f32, pass: bool, detail: String| rows.push(ParityRow { case, value, pass, detail });
    for name in ["tiny_mm", "tiny_text"] {
        let dir = root.join(name);
        if !dir.join("config.json").exists() {
            anyhow::bail!("{}: no fixture here (run from the repository root, or pass --fixtures)", dir.display());
        }
        let model = loader::load(&dir, dtype, device)?;
        let tokens = ids(&dir, "text_input_ids.npy")?;
        let expected = npy(&dir, "text_logits.npy")?.squeeze(0)?;
        let mut cache = model.new_cache();
        let logits = model.forward(&ForwardInput { tokens: &tokens, all_logits: true, ..Default::default() }, &mut cache)?;
        let err = rel_err(&logits, &expected)?;
        push(format!("{name}: text, {} tokens", tokens.len()), err, err < tolerance, String::new());

        // Prefill a third, then one token at a time: the decode path.
        let split = tokens.len() / 3;
        let mut cache = model.new_cache();
        let mut parts = vec![model.forward(&ForwardInput { tokens: &tokens[..split], all_logits: true, ..Default::default() }, &mut cache)?];
        for i in split..tokens.len() {
            parts.push(model.forward(&ForwardInput { tokens: &tokens[i..i + 1], all_logits: true, ..Default::default() }, &mut cache)?);
        }
        let err = rel_err(&Tensor::cat(&parts, 0)?, &expected)?;
        push(format!("{name}: text, incremental decode"), err, err < tolerance, String::new());

        if dir.join("audio_logits.npy").exists() {
            let tokens = ids(&dir, "audio_input_ids.npy")?;
            let frames = npy(&dir, "audio_input_features.npy")?.squeeze(0)?.to_device(device)?;
            let expected = npy(&dir, "audio_logits.npy")?.squeeze(0)?;
            let logits = model.forward(
                &ForwardInput { tokens: &tokens, audio_frames: Some(&frames), images: &[], all_logits: true },
                &mut model.new_cache(),
            )?;
            let err = rel_err(&logits, &expected)?;
            push(format!("{name}: audio"), err, err < tolerance, String::new());
        }
        if dir.join("image_logits.npy").exists() {
            let tokens = ids(&dir, "image_input_ids.npy")?;
            let imgs = images(&dir, device)?;
            let expected = npy(&dir, "image_logits.npy")?.squeeze(0)?;
            let logits = model
                .forward(&ForwardInput { tokens: &tokens, audio_frames: None, images: &imgs, all_logits: true }, &mut model.new_cache())?;
            let err = rel_err(&logits, &expected)?;
            push(format!("{name}: image"), err, err < tolerance, String::new());
        }
        if steps > 0 {
            let reference = greedy(&loader::load(&dir, DType::F32, &Device::Cpu)?, &tokens, steps)?;
            let got = greedy(&model, &tokens, steps)?;
            let same = reference.iter().zip(&got).take_while(|(a, b)| a == b).count();
            let detail = if same == steps { String::new() } else { format!("first difference at step {same}: {} vs {}", got[same], reference[same]) };
            push(format!("{name}: greedy tokens vs f32 CPU"), same as f32, same == steps, detail);
        }
    }
    Ok(rows)
}
