//! Streaming prefill, turn retraction and eviction in the embedded engine, on a
//! random-weight tiny checkpoint of the real layout (real safetensors, real loader).
//! Each test compares against a fresh engine prefilling the same prompt at once.

use std::sync::Arc;

mod common;

use candle_core::{DType, Device};
use hark::model::embedded::Engine;
use hark::model::gemma4::init::{write_random_checkpoint, Preset};
use hark::model::{ChatMessage, GenerateRequest, UserPart};
use tokio_util::sync::CancellationToken;

fn tiny_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(Preset::Tiny, dir.path(), false, 5, |_, _| {}).unwrap();
    dir
}

/// A greedy engine that generates one token per request (its logits are what we compare).
fn engine(dir: &std::path::Path, cached_sessions: usize) -> Engine {
    Engine::load(&common::engine_settings(dir, 1, cached_sessions), &Device::Cpu, DType::F32).unwrap()
}

/// Runs one request to its first token; returns that token's logits.
fn first_logits(engine: &mut Engine, req: &GenerateRequest) -> Vec<f32> {
    engine.generate(req, &CancellationToken::new(), &|_| true).unwrap();
    engine.last_logits.clone().expect("a token was generated")
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    diff / scale
}

fn user(t: &str) -> ChatMessage {
    ChatMessage::User(vec![UserPart::Text(t.into())])
}

fn said(t: &str) -> ChatMessage {
    ChatMessage::Assistant { text: t.into(), tool_calls: vec![] }
}

/// A second of something speech-like: a chirp with an envelope (deterministic), at
/// 16-bit precision as sessions keep audio.
fn voice(samples: usize, seed: f32) -> Vec<f32> {
    (0..samples)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            0.3 * (t * 3.0).sin().abs() * (2.0 * std::f32::consts::PI * (180.0 + 90.0 * seed + 40.0 * t) * t).sin()
        })
        .map(|s| hark::media::pcm::sample_to_f32(hark::media::pcm::quantize(s)))
        .collect()
}

fn base() -> GenerateRequest {
    GenerateRequest {
        instructions: "You are hark.".into(),
        messages: vec![user("hello"), said("hi, how can I help?")],
        ..Default::default()
    }
}

fn with_audio(mut req: GenerateRequest, audio: Vec<f32>) -> GenerateRequest {
    req.messages.push(ChatMessage::User(vec![UserPart::Audio(Arc::new(hark::media::pcm::to_pcm16(&audio)))]));
    req
}

#[test]
fn streaming_prefill_gives_the_logits_of_prefilling_the_turn_at_once() {
    let ckpt = tiny_checkpoint();
    let mut warm = engine(ckpt.path(), 2);
    // The conversation so far is already cached (an earlier turn).
    first_logits(&mut warm, &base());

    // The user speaks 1.3 s; the VAD admits audio in uneven pieces (20 ms appends
    // batched by the session, a prefix padding first).
    let audio = voice(20_800, 1.0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    warm.open_turn(1, &base(), tx).unwrap();
    let mut fed = 0;
    for piece in [4_800, 320, 1_000, 2_560, 777, 6_000, 5_343] {
        warm.turn_audio(1, &audio[fed..fed + piece]).unwrap();
        fed += piece;
    }
    assert_eq!(fed, audio.len());
    // Each piece that completed at least one 640-sample frame reported an end-of-turn probability.
    let mut signals = Vec::new();
    while let Ok(p) = rx.try_recv() {
        signals.push(p);
    }
    assert_eq!(signals.len(), 7, "{signals:?}");
    assert!(signals.iter().all(|p| (0.0..=1.0).contains(p)), "{signals:?}");

    // End of speech: the committed clip is the same audio.
    let req = with_audio(base(), audio.clone());
    let streamed = first_logits(&mut warm, &req);
    let (reused, prefilled) = warm.last_prefill;
    // Everything up to the last whole streamed frame was reused; only the last partial
    // frame and the turn's closing were left to prefill.
    let tokens = warm.prompt(&req, true).unwrap().tokens;
    let audio_at = tokens.iter().position(|&t| t == 256_000).unwrap() + 1;
    assert_eq!(reused, audio_at + 32, "32 whole frames were streamed");
    assert_eq!(reused + prefilled, tokens.len());

    let mut cold = engine(ckpt.path(), 1);
    let at_once = first_logits(&mut cold, &req);
    assert_eq!(cold.last_prefill.0, 0);
    let err = rel_err(&streamed, &at_once);
    assert!(err < 1e-4, "streamed vs at once: {err}");
}

#[test]
fn a_retracted_turn_rolls_the_cache_back_exactly() {
    let ckpt = tiny_checkpoint();
    let mut warm = engine(ckpt.path(), 2);
    first_logits(&mut warm, &base());
    // Where the retracted turn began: its `<|turn>` in the rendered prompt.
    let opened = warm.prompt(&with_audio(base(), Vec::new()), false).unwrap().tokens;
    let turn_start = opened.iter().rposition(|&t| t == 105).unwrap();
    let audio_at = opened.iter().rposition(|&t| t == 256_000).unwrap() + 1;

    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    warm.open_turn(7, &base(), tx).unwrap();
    warm.turn_audio(7, &voice(6_400, 2.0)).unwrap();
    assert!(warm.cached_lengths().contains(&(audio_at + 10)), "{:?}", warm.cached_lengths());
    // The VAD decides it was noise.
    warm.retract_turn(7).unwrap();
    assert!(warm.cached_lengths().contains(&turn_start), "{:?} vs {turn_start}", warm.cached_lengths());

    // The next turn continues from exactly where the context stood before.
    let next = GenerateRequest { messages: vec![user("hello"), said("hi, how can I help?"), user("what time is it?")], ..base() };
    let after = first_logits(&mut warm, &next);
    // At least the context before the turn (the earlier reply's cache, which the turn
    // forked rather than took, also shares the next `<|turn>`).
    assert!(warm.last_prefill.0 >= turn_start, "reused {} < {turn_start}", warm.last_prefill.0);
    let mut cold = engine(ckpt.path(), 1);
    let fresh = first_logits(&mut cold, &next);
    let err = rel_err(&after, &fresh);
    assert!(err < 1e-5, "after retraction vs fresh: {err}");
}

#[test]
fn equal_length_clips_never_share_cached_audio() {
    let ckpt = tiny_checkpoint();
    let mut warm = engine(ckpt.path(), 2);
    let a = with_audio(base(), voice(8_000, 1.0));
    let b = with_audio(base(), voice(8_000, 3.0));
    first_logits(&mut warm, &a);
    let got = first_logits(&mut warm, &b);
    // The placeholders are the same ids; the cache is reused only up to the clip.
    let audio_at = warm.prompt(&b, true).unwrap().tokens.iter().position(|&t| t == 258_881).unwrap();
    assert_eq!(warm.last_prefill.0, audio_at);
    let mut cold = engine(ckpt.path(), 1);
    let err = rel_err(&got, &first_logits(&mut cold, &b));
    assert!(err < 1e-5, "{err}");
}

/// A long conversation, its retained tail (the oldest turns evicted), and the next turn.
fn long_and_retained() -> (GenerateRequest, GenerateRequest) {
    let mut messages = Vec::new();
    for i in 0..12 {
        messages.push(user(&format!("question number {i}: tell me something about the number {}", i * 7)));
        messages.push(said(&format!("the number {} is interesting in many ways, {i}", i * 7)));
    }
    let long = GenerateRequest { instructions: "You are hark, a voice assistant.".into(), messages: messages.clone(), ..Default::default() };
    let mut retained = long.clone();
    retained.messages = messages[16..].to_vec();
    (long, retained)
}

#[test]
fn after_eviction_the_prepared_cache_equals_a_fresh_prefill() {
    let ckpt = tiny_checkpoint();
    let (long, retained) = long_and_retained();
    let mut warm = engine(ckpt.path(), 3);
    first_logits(&mut warm, &long);

    // Near the limit the session plans the cut and the engine prepares it, a chunk
    // at a time, whenever it is idle.
    warm.start_background(&retained).unwrap();
    let mut steps = 0;
    while warm.background_pending() {
        warm.background_step();
        steps += 1;
    }
    assert!(steps >= 1);

    // At the limit the oldest turns go; the next request starts from the prepared cache.
    let mut next = retained.clone();
    next.messages.push(user("and what about seven?"));
    let evicted = first_logits(&mut warm, &next);
    let retained_len = warm.prompt(&retained, false).unwrap().tokens.len();
    let (reused, prefilled) = warm.last_prefill;
    assert_eq!(reused, retained_len, "the whole prepared window was reused");
    assert_eq!(reused + prefilled, warm.prompt(&next, true).unwrap().tokens.len());

    let mut cold = engine(ckpt.path(), 1);
    let fresh = first_logits(&mut cold, &next);
    let err = rel_err(&evicted, &fresh);
    assert!(err < 1e-4, "after eviction vs fresh prefill: {err}");
}

#[test]
fn a_request_arriving_mid_preparation_continues_the_half_built_cache() {
    let ckpt = tiny_checkpoint();
    let (long, retained) = long_and_retained();
    let mut warm = engine(ckpt.path(), 3);
    first_logits(&mut warm, &long);
    let retained_len = warm.prompt(&retained, false).unwrap().tokens.len();
    warm.start_background(&retained).unwrap();
    warm.background_step();
    let built = retained_len.min(512);

    // A request the preparation does not serve (the live conversation going on) leaves it running.
    let mut live = long.clone();
    live.messages.push(user("one more thing"));
    first_logits(&mut warm, &live);
    assert_eq!(warm.background_pending(), retained_len > 512);

    // The eviction's request comes before the preparation is done: it takes the
    // half-built cache over and prefills only the rest.
    let mut next = retained.clone();
    next.messages.push(user("and what about seven?"));
    let got = first_logits(&mut warm, &next);
    assert!(!warm.background_pending());
    assert!(warm.last_prefill.0 >= built, "reused {} < {built}", warm.last_prefill.0);
    let mut cold = engine(ckpt.path(), 1);
    let err = rel_err(&got, &first_logits(&mut cold, &next));
    assert!(err < 1e-4, "{err}");
}
