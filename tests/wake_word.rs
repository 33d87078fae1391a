//! The wake-word detector on its own: openWakeWord's real models (melspectrogram,
//! embedding, "hey jarvis", fetched from the `openwakeword` wheel by `scripts/setup`)
//! through ONNX Runtime, fed speech synthesized here — hark's own Piper voice, and the
//! espeak-ng program. The wake phrase scores above the threshold; the same sentence
//! without it stays below.

mod common;

use common::*;
use hark::media::wake::{WakeDetector, WakeModel, WakeModelPaths};
use hark::media::StreamResampler;

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
    let voice = common::piper_voice();
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
        let speech = synth("Hey Jarvis, what time is it?");
        let t = std::time::Instant::now();
        let wake = max_score(&mut d, &speech);
        let audio_s = (speech.len() + 24_000) as f64 / 16_000.0;
        let bare = max_score(&mut d, &synth("What time is it?"));
        eprintln!(
            "{voice}: \"hey jarvis, what time is it\" {wake:.4}; \"what time is it\" {bare:.4}; detector real-time factor {:.3}",
            t.elapsed().as_secs_f64() / audio_s
        );
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

// ───────────────────────── the local session, woken ─────────────────────────

use std::time::Duration;

use hark::protocol::ServerEvent;
use hark::server::local::{LocalOutput, LocalSession, WakeGate, WakeWord};
use hark::sources::MicOutput;
use tokio::sync::{broadcast, mpsc};

/// Feeds `samples` to the session as the microphone would: 10 ms pieces on the clock.
async fn speak(tx: &mpsc::Sender<MicOutput>, samples: &[f32]) {
    let mut next = tokio::time::Instant::now();
    for piece in samples.chunks(160) {
        next += Duration::from_millis(10);
        tokio::time::sleep_until(next).await;
        tx.send(MicOutput::Audio(piece.to_vec())).await.expect("the local session stopped");
    }
}

fn padded(speech: &[f32], before_s: f32, after_s: f32) -> Vec<f32> {
    let mut v = vec![0.0; (before_s * 16_000.0) as usize];
    v.extend_from_slice(speech);
    v.extend(std::iter::repeat_n(0.0, (after_s * 16_000.0) as usize));
    v
}

/// The session's events until `stop` matches one (returned last), within `secs`.
async fn events_until(rx: &mut broadcast::Receiver<ServerEvent>, secs: u64, stop: impl Fn(&ServerEvent) -> bool) -> Vec<ServerEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(ev)) => {
                let done = stop(&ev);
                seen.push(ev);
                if done {
                    return seen;
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => panic!("missed {n} events"),
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("the session ended; saw {}", names(&seen)),
            Err(_) => panic!("no matching event within {secs} s; saw {}", names(&seen)),
        }
    }
}

fn names(evs: &[ServerEvent]) -> String {
    evs.iter().map(|e| e.type_name()).collect::<Vec<_>>().join(", ")
}

fn wake_config(model: &ScriptedModel) -> hark::config::Config {
    let mut cfg = test_config(&model.base_url());
    cfg.audio.activation = hark::config::Activation::WakeWord;
    cfg.audio.wake_word.model = repo_root().join("vendor/hey_jarvis_v0.1.onnx");
    cfg.audio.wake_word.melspectrogram = repo_root().join("vendor/oww_melspectrogram.onnx");
    cfg.audio.wake_word.embedding = repo_root().join("vendor/oww_embedding_model.onnx");
    cfg
}

/// "hey jarvis, what time is it" is a turn and an answer; "what time is it" alone,
/// before it and after the answer, is nothing: no speech events, no request to the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_session_answers_only_after_the_wake_phrase() {
    let _ = tracing_subscriber::fmt().with_env_filter("hark=info").with_test_writer().try_init();
    let model = ScriptedModel::start().await;
    let cfg = wake_config(&model);
    let wake = hark::server::load_wake_word(&cfg).expect("openWakeWord's models: run scripts/setup, which fetches them");
    let state = hark::server::AppState::from_config(cfg).await.unwrap();
    let (mic_tx, mic_rx) = mpsc::channel(256);
    let output = LocalOutput { speaker: None, echo: hark::config::EchoCancellation::Off, echo_stats: None, wake: Some(wake) };
    let local = LocalSession::start(state.deps.clone(), mic_rx, Box::new(()), output, state.shutdown.clone());
    let (_, mut rx) = local.attach().await.expect("the local session started");

    let (woken, bare) = tokio::task::spawn_blocking(|| (piper_16k("Hey Jarvis, what time is it?"), piper_16k("What time is it?"))).await.unwrap();
    let is_wake = |e: &ServerEvent| matches!(e, ServerEvent::HarkWakeWordDetected { .. });
    let ignored = |evs: &[ServerEvent]| {
        evs.iter().any(|e| {
            matches!(
                e,
                ServerEvent::InputAudioBufferSpeechStarted { .. } | ServerEvent::InputAudioBufferCommitted { .. } | ServerEvent::ResponseCreated { .. }
            )
        })
    };

    // The bare sentence, then the wake phrase on the same stream: everything before the
    // wake event is what the bare sentence caused (the channel keeps the order).
    let feeder = {
        let (tx, bare, woken) = (mic_tx.clone(), bare.clone(), woken.clone());
        tokio::spawn(async move {
            speak(&tx, &padded(&bare, 0.3, 2.5)).await;
            speak(&tx, &padded(&woken, 0.3, 2.0)).await;
            // Quiet while it answers.
            speak(&tx, &vec![0.0; 16_000 * 20]).await;
        })
    };
    let before = events_until(&mut rx, 30, is_wake).await;
    assert!(!ignored(&before), "the bare sentence was taken as a turn: {}", names(&before));
    let Some(ServerEvent::HarkWakeWordDetected { score }) = before.last() else { unreachable!() };
    eprintln!("woken with score {score:.4}");
    assert!(*score >= 0.5, "{score}");
    let turn = events_until(&mut rx, 30, |e| matches!(e, ServerEvent::ResponseDone { .. })).await;
    let kinds = names(&turn);
    for needed in ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "response.created"] {
        assert!(kinds.contains(needed), "{needed} missing after the wake phrase: {kinds}");
    }
    let Some(ServerEvent::ResponseDone { response }) = turn.last() else { unreachable!() };
    assert_eq!(response.status, hark::protocol::ResponseStatus::Completed);
    let reqs = model.wait_requests(1).await;
    let user = reqs[0]["messages"].as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap();
    let audio = user["content"][0]["input_audio"]["data"].as_str().expect("the turn's audio reached the model");
    // The turn holds the wake phrase too (handed over from the held-back audio): its
    // audio is longer than the bare sentence's.
    let turn_ms = audio.len() as f64 * 3.0 / 4.0 / 32.0;
    let (bare_ms, woken_ms) = (bare.len() as f64 / 16.0, woken.len() as f64 / 16.0);
    eprintln!("turn audio ≈{turn_ms:.0} ms; the spoken phrase {woken_ms:.0} ms, the bare sentence {bare_ms:.0} ms");
    assert!(turn_ms > bare_ms + 300.0, "turn audio {turn_ms:.0} ms: the wake phrase was not in it");
    feeder.abort();

    // Answered: asleep again. The bare sentence is ignored again; the wake phrase wakes it.
    let feeder = {
        let tx = mic_tx.clone();
        tokio::spawn(async move {
            speak(&tx, &padded(&bare, 0.3, 2.5)).await;
            speak(&tx, &padded(&woken, 0.3, 2.0)).await;
            speak(&tx, &vec![0.0; 16_000 * 20]).await;
        })
    };
    let before = events_until(&mut rx, 30, is_wake).await;
    assert!(!ignored(&before), "after the answer, the bare sentence was taken as a turn: {}", names(&before));
    events_until(&mut rx, 30, |e| matches!(e, ServerEvent::ResponseDone { .. })).await;
    assert_eq!(model.wait_requests(2).await.len(), 2);
    feeder.abort();
    state.shutdown.cancel();
}

/// Woken and then silent: after `listen` it is asleep again.
#[test]
fn the_gate_falls_asleep_after_listen_without_speech() {
    let mut gate = WakeGate::new(WakeWord { detector: detector(), threshold: 0.5, listen: Duration::from_millis(300) });
    let speech = padded(&espeak_16k("Hey Jarvis"), 0.5, 0.5);
    let mut woke = None;
    for piece in speech.chunks(320) {
        let (out, score) = gate.on_audio(piece.to_vec());
        woke = woke.or(score);
        // The session's timeline stays whole: nothing is lost or invented overall.
        assert!(out.len() <= 320 || score.is_some(), "{} samples out of 320", out.len());
    }
    assert!(woke.is_some() && gate.is_awake(), "not woken");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gate.is_awake() {
        assert!(std::time::Instant::now() < deadline, "still awake 5 s later");
        let (out, score) = gate.on_audio(vec![0.0; 320]);
        assert!(score.is_none());
        assert!(out.len() <= 320);
        std::thread::yield_now();
    }
}

/// `activation: manual` (push-to-talk): speech alone starts nothing; the attached
/// client's commit and response.create make the turn, with the spoken audio in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_activation_waits_for_the_clients_commit() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.audio.activation = hark::config::Activation::Manual;
    let state = hark::server::AppState::from_config(cfg).await.unwrap();
    let (mic_tx, mic_rx) = mpsc::channel(256);
    let output = LocalOutput { speaker: None, echo: hark::config::EchoCancellation::Off, echo_stats: None, wake: None };
    let local = LocalSession::start(state.deps.clone(), mic_rx, Box::new(()), output, state.shutdown.clone());
    local.use_manual_turns().unwrap();
    let (_, mut rx) = local.attach().await.expect("the local session started");

    let speech = tokio::task::spawn_blocking(|| espeak_16k("What time is it?")).await.unwrap();
    speak(&mic_tx, &padded(&speech, 0.3, 1.5)).await;
    let mut heard = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        heard.push(ev);
    }
    let turn_events = |evs: &[ServerEvent]| {
        evs.iter().any(|e| {
            matches!(e, ServerEvent::InputAudioBufferSpeechStarted { .. } | ServerEvent::InputAudioBufferCommitted { .. } | ServerEvent::ResponseCreated { .. })
        })
    };
    assert!(!turn_events(&heard), "speech made a turn without the client: {}", names(&heard));

    for event in [r#"{"type":"input_audio_buffer.commit"}"#, r#"{"type":"response.create"}"#] {
        let envelope = hark::protocol::parse_client_event(event).unwrap();
        local.input().send(hark::session::SessionInput::Client(envelope)).await.unwrap();
    }
    let turn = events_until(&mut rx, 30, |e| matches!(e, ServerEvent::ResponseDone { .. })).await;
    assert!(names(&turn).contains("input_audio_buffer.committed"), "{}", names(&turn));
    let reqs = model.wait_requests(1).await;
    let user = reqs[0]["messages"].as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap();
    let audio = user["content"][0]["input_audio"]["data"].as_str().expect("the buffered audio reached the model");
    let turn_ms = audio.len() as f64 * 3.0 / 4.0 / 32.0;
    let spoken_ms = speech.len() as f64 / 16.0;
    assert!(turn_ms >= spoken_ms, "committed {turn_ms:.0} ms of audio for {spoken_ms:.0} ms of speech");
    state.shutdown.cancel();
}
