//! The embedded Gemma 4 on a random-weight checkpoint of the real layout, written
//! by `hark model init` and read back through the real safetensors loader.

mod common;

use candle_core::{DType, Device, Tensor};
use common::engine_settings;
use hark::model::gemma4::init::{write_random_checkpoint, Preset};
use hark::model::gemma4::{loader, ForwardInput, ImageInput};

fn tiny_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(Preset::Tiny, dir.path(), false, 11, |_, _| {}).unwrap();
    dir
}


fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

#[test]
fn incremental_decoding_matches_a_full_forward_across_the_window() {
    let ckpt = tiny_checkpoint();
    let model = loader::load(ckpt.path(), DType::F32, &Device::Cpu).unwrap();
    // The tiny preset's sliding window is 64: 150 tokens cross it twice.
    let tokens: Vec<u32> = (0..150u32).map(|i| 300 + (i * 37) % 90).collect();
    let mut cache = model.new_cache();
    let full = model.forward(&ForwardInput { tokens: &tokens, all_logits: true, ..Default::default() }, &mut cache).unwrap();
    assert_eq!(full.dims(), &[150, 262_144]);
    assert_eq!(cache.seq_len(), 150);

    // Same tokens: a prefix (turn one), then a chunk (turn two), then one at a time.
    let mut cache = model.new_cache();
    let a = model.forward(&ForwardInput { tokens: &tokens[..70], all_logits: true, ..Default::default() }, &mut cache).unwrap();
    let b = model.forward(&ForwardInput { tokens: &tokens[70..130], all_logits: true, ..Default::default() }, &mut cache).unwrap();
    let mut steps = vec![a, b];
    for i in 130..150 {
        steps.push(model.forward(&ForwardInput { tokens: &tokens[i..i + 1], all_logits: true, ..Default::default() }, &mut cache).unwrap());
    }
    let incremental = Tensor::cat(&steps, 0).unwrap();
    let err = max_rel_err(&incremental, &full);
    assert!(err < 1e-4, "incremental vs full: {err}");
}

#[test]
fn sliding_layers_keep_a_bounded_window_and_global_layers_grow() {
    use hark::model::gemma4::cache::ROLLBACK_SLACK;
    let ckpt = tiny_checkpoint();
    let model = loader::load(ckpt.path(), DType::F32, &Device::Cpu).unwrap();
    let window = model.config.text.sliding_window;
    let total = window + ROLLBACK_SLACK + 124;
    let tokens: Vec<u32> = (0..total as u32).map(|i| 300 + (i * 13) % 200).collect();
    let mut cache = model.new_cache();
    for chunk in tokens.chunks(100) {
        model.forward(&ForwardInput { tokens: chunk, ..Default::default() }, &mut cache).unwrap();
    }
    // tiny: layers S,F,S,F; sliding 2 KV heads × 16, global 1 KV head × 32; K and V; f32.
    // Sliding layers keep at least the window plus the rollback slack and move it to the
    // front of a fresh buffer when theirs fills, so they never hold more than that plus
    // the buffer's spare quarter (at least 128) and one call's chunk.
    let per_position = 2 * 2 * (2 * 16) * 4;
    let keep = window + ROLLBACK_SLACK;
    let global = 2 * 2 * 32 * 4 * total;
    let sliding = cache.bytes() - global;
    assert!(sliding >= per_position * keep, "{sliding}");
    assert!(sliding <= per_position * (keep + (keep / 4).max(128) + 100), "{sliding}");
    // Rolling back within the slack works; to a position whose window the sliding
    // layers no longer hold, it is refused and nothing changes.
    assert!(!cache.truncate(10).unwrap());
    assert_eq!(cache.seq_len(), total);
    assert!(cache.truncate(total - 100).unwrap());
    assert_eq!(cache.seq_len(), total - 100);
}

#[test]
fn audio_and_image_placeholders_are_embedded() {
    let ckpt = tiny_checkpoint();
    let model = loader::load(ckpt.path(), DType::F32, &Device::Cpu).unwrap();
    let cfg = &model.config;
    let mut tokens = vec![2u32, 105, 300, 301, cfg.boa_token_id];
    tokens.extend(std::iter::repeat_n(cfg.audio_token_id, 3));
    tokens.extend([cfg.eoa_token_id, cfg.boi_token_id]);
    tokens.extend(std::iter::repeat_n(cfg.image_token_id, 2));
    tokens.extend([cfg.eoi_token_id, 106]);
    let frames = Tensor::randn(0f32, 0.1, (3, 640), &Device::Cpu).unwrap();
    let image = ImageInput { patches: Tensor::rand(0f32, 1.0, (2, 6912), &Device::Cpu).unwrap(), positions: vec![(0, 0), (1, 0)] };
    let images = [image];
    let mut cache = model.new_cache();
    let logits = model
        .forward(&ForwardInput { tokens: &tokens, audio_frames: Some(&frames), images: &images, all_logits: true }, &mut cache)
        .unwrap();
    assert_eq!(logits.dims(), &[tokens.len(), 262_144]);
    // Different audio gives different logits after the audio (it really went in).
    let frames2 = Tensor::randn(0f32, 0.1, (3, 640), &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let logits2 = model
        .forward(&ForwardInput { tokens: &tokens, audio_frames: Some(&frames2), images: &images, all_logits: true }, &mut cache)
        .unwrap();
    let before = max_rel_err(&logits.narrow(0, 0, 4).unwrap(), &logits2.narrow(0, 0, 4).unwrap());
    let after = max_rel_err(&logits.narrow(0, 8, 1).unwrap(), &logits2.narrow(0, 8, 1).unwrap());
    assert_eq!(before, 0.0, "audio must not affect earlier positions (causal)");
    assert!(after > 1e-6, "audio must affect later positions");
    // A placeholder count mismatch is an error, not a panic.
    let mut cache = model.new_cache();
    let err = model.forward(&ForwardInput { tokens: &tokens, audio_frames: None, images: &images, all_logits: false }, &mut cache);
    assert!(err.is_err());
}

#[test]
fn the_embedded_engine_reuses_its_cache_across_turns() {
    use hark::model::embedded::Engine;
    use hark::model::{BackendEvent, ChatMessage, GenerateRequest, UserPart};
    let ckpt = tiny_checkpoint();
    let settings = engine_settings(ckpt.path(), 6, 2);
    let run = |engine: &mut Engine, req: &GenerateRequest| -> String {
        let out = std::cell::RefCell::new(String::new());
        let cancel = tokio_util::sync::CancellationToken::new();
        engine
            .generate(req, &cancel, &|ev| {
                if let BackendEvent::TextDelta(t) = ev {
                    out.borrow_mut().push_str(&t);
                }
                true
            })
            .unwrap();
        out.into_inner()
    };
    let user = |t: &str| ChatMessage::User(vec![UserPart::Text(t.into())]);
    let first = GenerateRequest { instructions: "Be brief.".into(), messages: vec![user("hello there")], ..Default::default() };
    let mut warm = Engine::load(&settings, &Device::Cpu, DType::F32).unwrap();
    let reply = run(&mut warm, &first);
    assert!(!reply.is_empty());
    assert_eq!(warm.last_prefill.0, 0);

    let second = GenerateRequest {
        messages: vec![user("hello there"), ChatMessage::Assistant { text: reply.clone(), tool_calls: vec![] }, user("and again")],
        ..first.clone()
    };
    let warm_reply = run(&mut warm, &second);
    let (reused, prefilled) = warm.last_prefill;
    // Everything up to and including the first reply came from the cache.
    assert!(reused > prefilled, "reused {reused}, prefilled {prefilled}");

    // The same second turn prefilled from scratch (same tokens: the engine splices the
    // first reply's generated ids back in, so it must have produced that reply itself).
    let mut cold = Engine::load(&settings, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(run(&mut cold, &first), reply);
    cold.clear_caches();
    let cold_reply = run(&mut cold, &second);
    assert_eq!(cold.last_prefill.0, 0);
    assert_eq!(warm_reply, cold_reply, "a reused cache must give the same greedy answer");
}

#[test]
fn the_embedded_engine_takes_an_image_and_audio_in_one_turn() {
    use base64::Engine as _;
    use hark::model::embedded::Engine;
    use hark::model::{ChatMessage, GenerateRequest, UserPart};
    let ckpt = tiny_checkpoint();
    let settings = engine_settings(ckpt.path(), 3, 1);
    let png = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma4/tiny_mm/image.png")).unwrap();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let audio = std::sync::Arc::new(vec![328i16; 16_000]);
    let req = GenerateRequest {
        messages: vec![ChatMessage::User(vec![UserPart::Text("what is this?".into()), UserPart::Image(std::sync::Arc::new(url)), UserPart::Audio(audio)])],
        ..Default::default()
    };
    let mut engine = Engine::load(&settings, &Device::Cpu, DType::F32).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (_, usage) = engine.generate(&req, &cancel, &|_| true).unwrap();
    let patches = hark::model::gemma4::vision::decode_and_patch(&png, 70).unwrap().positions.len();
    // Counting context reads only the header, and agrees with the patches.
    assert_eq!(hark::model::gemma4::vision::token_count(&png, 70).unwrap(), patches);
    // 1 s of audio = 25 tokens, plus the image's patches, plus the template's text.
    assert!(usage.input_tokens as usize > 25 + patches, "{usage:?}");
    assert_eq!(engine.last_prefill, (0, usage.input_tokens as usize));

    // A broken image is an error for this request, not a crash.
    let bad = GenerateRequest { messages: vec![ChatMessage::User(vec![UserPart::Image(std::sync::Arc::new("data:image/png;base64,AAAA".into()))])], ..Default::default() };
    assert!(engine.generate(&bad, &cancel, &|_| true).is_err());
}

#[test]
fn a_cancelled_request_stops_and_keeps_the_prefilled_context() {
    use hark::model::embedded::Engine;
    use hark::model::{ChatMessage, FinishReason, GenerateRequest, UserPart};
    let ckpt = tiny_checkpoint();
    let settings = engine_settings(ckpt.path(), 500, 1);
    let mut engine = Engine::load(&settings, &Device::Cpu, DType::F32).unwrap();
    let req = GenerateRequest { messages: vec![ChatMessage::User(vec![UserPart::Text("tell me everything".into())])], ..Default::default() };
    let cancel = tokio_util::sync::CancellationToken::new();
    // Cancel from inside the stream after the third delta, as a barge-in would.
    let seen = std::cell::Cell::new(0);
    let (finish, usage) = engine
        .generate(&req, &cancel, &|_| {
            seen.set(seen.get() + 1);
            if seen.get() == 3 {
                cancel.cancel();
            }
            true
        })
        .unwrap();
    assert_eq!(finish, FinishReason::Cancelled);
    assert!(usage.output_tokens <= 4, "{usage:?}");
    // The next request with the same prompt reuses what was prefilled.
    let cancel = tokio_util::sync::CancellationToken::new();
    engine.generate(&GenerateRequest { max_output_tokens: Some(1), ..req }, &cancel, &|_| true).unwrap();
    assert!(engine.last_prefill.0 > 0);
}

#[test]
fn layers_append_in_place_and_forks_copy_before_writing() {
    let ckpt = tiny_checkpoint();
    let model = loader::load(ckpt.path(), DType::F32, &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..40u32).map(|i| 300 + (i * 13) % 200).collect();
    let mut cache = model.new_cache();
    model.forward(&ForwardInput { tokens: &tokens[..30], ..Default::default() }, &mut cache).unwrap();
    // A fork taken now must not see what the original writes next, nor the reverse.
    let mut fork = cache.clone();
    // The first write while the fork holds the buffers copies them...
    model.forward(&ForwardInput { tokens: &tokens[30..31], ..Default::default() }, &mut cache).unwrap();
    let capacity = cache.capacity();
    assert!(capacity > 31, "{capacity}");
    let allocated = cache.allocated_bytes();
    // ...and then decoding writes into the preallocated buffers: no allocation per token.
    for i in 31..35 {
        model.forward(&ForwardInput { tokens: &tokens[i..i + 1], ..Default::default() }, &mut cache).unwrap();
    }
    assert_eq!(cache.capacity(), capacity);
    // Sliding layers write in place too: nothing was allocated for these tokens.
    assert_eq!(cache.allocated_bytes(), allocated);
    let forked = model.forward(&ForwardInput { tokens: &[77], ..Default::default() }, &mut fork).unwrap();
    let next = model.forward(&ForwardInput { tokens: &tokens[35..36], ..Default::default() }, &mut cache).unwrap();
    // Against fresh caches prefilled with the same tokens.
    let fresh = |ids: &[u32]| {
        let mut c = model.new_cache();
        model.forward(&ForwardInput { tokens: ids, ..Default::default() }, &mut c).unwrap()
    };
    let mut fork_ids = tokens[..30].to_vec();
    fork_ids.push(77);
    assert!(max_rel_err(&forked, &fresh(&fork_ids)) < 1e-4);
    assert!(max_rel_err(&next, &fresh(&tokens[..36])) < 1e-4);
}
