//! Logit parity with Hugging Face transformers on tiny random-weight checkpoints.
//!
//! The fixtures under `tests/fixtures/gemma4/` were written by
//! `scripts/make_gemma4_fixtures.py`, which runs transformers'
//! `Gemma4UnifiedForConditionalGeneration` (5.24) on configs small enough to commit;
//! weights, inputs and expected logits are all in the folder. hark loads the same
//! safetensors through its real loader and must agree within 1e-4 relative error
//! (max |a−b| / max |b|).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hark::model::gemma4::{loader, ForwardInput, ImageInput};

fn fixture(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4").join(dir)
}

fn npy(dir: &Path, name: &str) -> Tensor {
    Tensor::read_npy(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn ids(dir: &Path, name: &str) -> Vec<u32> {
    npy(dir, name).flatten_all().unwrap().to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

/// The image case's pixel values and positions, one `ImageInput` per image.
fn fixture_images(dir: &Path) -> Vec<ImageInput> {
    let pixels = npy(dir, "image_pixel_values.npy");
    let positions = npy(dir, "image_position_ids.npy").to_dtype(DType::I64).unwrap();
    (0..pixels.dim(0).unwrap())
        .map(|i| {
            let pos = positions.get(i).unwrap().to_vec2::<i64>().unwrap();
            ImageInput { patches: pixels.get(i).unwrap(), positions: pos.into_iter().map(|p| (p[0], p[1])).collect() }
        })
        .collect()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn check_text(dir: &str) -> f32 {
    let dir = fixture(dir);
    let model = loader::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokens = ids(&dir, "text_input_ids.npy");
    let expected = npy(&dir, "text_logits.npy").squeeze(0).unwrap();
    let mut cache = model.new_cache();
    let logits = model.forward(&ForwardInput { tokens: &tokens, all_logits: true, ..Default::default() }, &mut cache).unwrap();
    let err = rel_err(&logits, &expected);
    eprintln!("{}: text parity error {err:.2e} over {} tokens", dir.display(), tokens.len());

    // Incremental decoding through the cache must land on the same logits.
    let mut cache = model.new_cache();
    let split = tokens.len() / 3;
    let mut parts = vec![model.forward(&ForwardInput { tokens: &tokens[..split], all_logits: true, ..Default::default() }, &mut cache).unwrap()];
    for i in split..tokens.len() {
        parts.push(model.forward(&ForwardInput { tokens: &tokens[i..i + 1], all_logits: true, ..Default::default() }, &mut cache).unwrap());
    }
    let inc = Tensor::cat(&parts, 0).unwrap();
    let inc_err = rel_err(&inc, &expected);
    eprintln!("{}: incremental parity error {inc_err:.2e}", dir.display());
    assert!(inc_err < 1e-4, "incremental: {inc_err}");
    err
}

#[test]
fn text_parity_with_transformers_k_eq_v_and_softcap() {
    let err = check_text("tiny_mm");
    assert!(err < 1e-4, "relative error {err}");
}

#[test]
fn text_parity_with_transformers_v_proj_partial_rotary_half() {
    let err = check_text("tiny_text");
    assert!(err < 1e-4, "relative error {err}");
}

#[test]
fn audio_parity_with_transformers() {
    let dir = fixture("tiny_mm");
    let model = loader::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokens = ids(&dir, "audio_input_ids.npy");
    let frames = npy(&dir, "audio_input_features.npy").squeeze(0).unwrap();
    // The same frames, made from the WAV the way hark makes them from a turn's audio.
    let wav = hound::WavReader::open(dir.join("audio.wav")).unwrap();
    let samples: Vec<f32> = wav.into_samples::<i16>().map(|s| s.unwrap() as f32 / 32768.0).collect();
    let from_wav = hark::model::gemma4::audio_frames(&samples, &Device::Cpu).unwrap();
    assert_eq!(rel_err(&from_wav, &frames), 0.0, "WAV → frames must be exact");

    let expected = npy(&dir, "audio_logits.npy").squeeze(0).unwrap();
    let mut cache = model.new_cache();
    let logits = model
        .forward(&ForwardInput { tokens: &tokens, audio_frames: Some(&frames), images: &[], all_logits: true }, &mut cache)
        .unwrap();
    let err = rel_err(&logits, &expected);
    eprintln!("audio parity error {err:.2e}");
    assert!(err < 1e-4, "relative error {err}");
}

#[test]
fn image_parity_with_transformers_bidirectional_blocks() {
    let dir = fixture("tiny_mm");
    let model = loader::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokens = ids(&dir, "image_input_ids.npy");
    let images = fixture_images(&dir);
    let expected = npy(&dir, "image_logits.npy").squeeze(0).unwrap();
    let mut cache = model.new_cache();
    let logits = model.forward(&ForwardInput { tokens: &tokens, audio_frames: None, images: &images, all_logits: true }, &mut cache).unwrap();
    let err = rel_err(&logits, &expected);
    eprintln!("image parity error {err:.2e}");
    assert!(err < 1e-4, "relative error {err}");
}

#[test]
fn image_embeddings_match_transformers() {
    let dir = fixture("tiny_mm");
    let model = loader::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tokens = ids(&dir, "image_input_ids.npy");
    let images = fixture_images(&dir);
    let emb = model.embed(&ForwardInput { tokens: &tokens, audio_frames: None, images: &images, all_logits: true }).unwrap();
    let expected = npy(&dir, "image_embeds.npy").squeeze(0).unwrap();
    let err = rel_err(&emb, &expected);
    eprintln!("image embedding error {err:.2e}");
    assert!(err < 1e-5, "relative error {err}");
}

/// `hark model logits` from the fixture's PNG and WAV files (the user-facing path:
/// file decoding, patching and framing included) lands on transformers' logits.
#[test]
fn logits_command_reproduces_the_fixtures_from_png_and_wav_files() {
    let dir = fixture("tiny_mm");
    let tmp = tempfile::tempdir().unwrap();
    for (case, media) in [
        ("image", serde_json::json!({"images": [dir.join("image.png"), dir.join("image2.png")], "image_resize": false, "image_tokens": 70})),
        ("audio", serde_json::json!({"audio": dir.join("audio.wav")})),
    ] {
        let mut spec = media;
        spec["input_ids"] = serde_json::json!(ids(&dir, &format!("{case}_input_ids.npy")));
        let inputs = tmp.path().join(format!("{case}.json"));
        std::fs::write(&inputs, spec.to_string()).unwrap();
        let out = tmp.path().join(format!("{case}.npy"));
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_hark"))
            .args(["model", "logits"])
            .arg(&dir)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let got = Tensor::read_npy(&out).unwrap();
        let expected = npy(&dir, &format!("{case}_logits.npy")).squeeze(0).unwrap();
        let err = rel_err(&got, &expected);
        eprintln!("hark model logits, {case} from files: {err:.2e}");
        assert!(err < 1e-4, "{case}: {err}");
    }
}
