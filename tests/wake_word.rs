//! The wake-word detector on its own: openWakeWord's real models (melspectrogram,
//! embedding, "hey jarvis", fetched from the `openwakeword` wheel by `scripts/setup`)
//! through ONNX Runtime, fed speech synthesized here — hark's own Piper voice, and the
//! espeak-ng program. The wake phrase scores above the threshold; the same sentence
//! without it stays below.

mod common;

use common::*;
use hark::media::wake::{WakeDetector, WakeModel, WakeModelPaths};
use hark::media::StreamResampler;
use hark::speech::piper::{PiperSettings, PiperVoice};

const THRESHOLD: f32 = 0.5;

fn detector() -> WakeDetector {
    let paths = WakeModelPaths {
        melspectrogram: repo_root().join("vendor/oww_melspectrogram.onnx"),
        embedding: repo_root().join("vendor/oww_embedding_model.onnx"),
        model: repo_root().join("vendor/hey_jarvis_v0.1.onnx"),
    };
    WakeModel::load(&repo_root().join("vendor/libonnxruntime.so"), &paths)
        .expect("openWakeWord's models: run scripts/setup, which fetches them")
        .detector()
        .unwrap()
}

fn to_16k(rate: u32, samples: &[f32]) -> Vec<f32> {
    let mut r = StreamResampler::new(rate).unwrap();
    let mut out = Vec::new();
    r.push(samples, &mut out).unwrap();
    r.flush(&mut out).unwrap();
    out
}

/// The highest score over `speech` with 0.5 s of silence before and 1 s after, fed in
/// 20 ms pieces as the microphone delivers it.
fn max_score(d: &mut WakeDetector, speech: &[f32]) -> f32 {
    d.reset();
    let mut audio = vec![0.0; 8_000];
    audio.extend_from_slice(speech);
    audio.extend(std::iter::repeat_n(0.0, 16_000));
    let mut best = 0.0f32;
    for piece in audio.chunks(320) {
        if let Some(s) = d.push(piece).unwrap() {
            assert!((0.0..=1.0).contains(&s), "score {s}");
            best = best.max(s);
        }
    }
    best
}

fn piper_16k(text: &str) -> Vec<f32> {
    let voice = PiperVoice::load(&PiperSettings {
        onnxruntime_library: repo_root().join("vendor/libonnxruntime.so"),
        model: repo_root().join("vendor/en_US-joe-medium.onnx"),
        config: None,
        espeak_program: "espeak-ng".into(),
        length_scale: 1.0,
        threads: 0,
    })
    .expect("the Piper voice: run scripts/setup, which fetches it");
    let pcm = voice.synthesize_blocking(text).unwrap();
    to_16k(pcm.sample_rate, &pcm.samples)
}

fn espeak_16k(text: &str) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_wav(dir.path(), "s", text, 0.0, 0.0);
    let mut r = hound::WavReader::open(&wav).unwrap();
    let rate = r.spec().sample_rate;
    let s: Vec<f32> = r.samples::<i16>().map(|x| x.unwrap() as f32 / 32768.0).collect();
    to_16k(rate, &s)
}

#[test]
fn wake_phrase_scores_above_threshold_and_the_bare_sentence_below() {
    let mut d = detector();
    // Silence alone: nothing.
    let silence = max_score(&mut d, &[]);
    assert!(silence < 0.05, "silence scored {silence}");
    let mut report = Vec::new();
    for (voice, synth) in [("piper", piper_16k as fn(&str) -> Vec<f32>), ("espeak-ng", espeak_16k)] {
        let wake = max_score(&mut d, &synth("Hey Jarvis, what time is it?"));
        let bare = max_score(&mut d, &synth("What time is it?"));
        eprintln!("{voice}: \"hey jarvis, what time is it\" {wake:.4}; \"what time is it\" {bare:.4}");
        report.push((voice, wake, bare));
    }
    for (voice, wake, bare) in report {
        assert!(wake > THRESHOLD, "{voice}: the wake phrase scored {wake}");
        assert!(bare < THRESHOLD, "{voice}: the bare sentence scored {bare}");
    }
}

#[test]
fn a_fresh_detector_and_a_reset_one_agree() {
    // reset() must restore the start-up state exactly, or a session that re-arms would
    // score differently from a new one.
    let speech = espeak_16k("Hey Jarvis");
    let mut a = detector();
    let first = max_score(&mut a, &speech);
    let again = max_score(&mut a, &speech);
    assert!((first - again).abs() < 1e-4, "{first} then {again}");
    assert!(first > THRESHOLD, "{first}");
}
