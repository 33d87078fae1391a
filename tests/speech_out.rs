//! Speech out: the model's text voiced by the real Piper voice (en_US-joe-medium through
//! ONNX Runtime, phonemes from the espeak-ng program), sent to Realtime clients that ask
//! for audio. The model server is scripted (see `common`); the voice, hark and the
//! clients (the official openai SDK, and a raw WebSocket) are real.

mod common;

use std::process::Command;
use std::time::Instant;

use common::*;
use serde_json::{json, Value};

use hark::speech::piper::PiperVoice;
use hark::speech::SpeechEngine;

const REPLY: &str = "Sure thing, the weather in Paris is mild today. Enjoy your walk by the river!";

fn python() -> String {
    std::env::var("HARK_TEST_PYTHON").unwrap_or_else(|_| repo_root().join(".venv/bin/python").display().to_string())
}

fn voice() -> PiperVoice {
    common::piper_voice()
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|s| s * s).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// Runs `tests/clients/realtime_speech.py`; returns its RESULT.
async fn speech_client(hark: &Hark, dialect: &str, extra: &[&str]) -> Value {
    let script = repo_root().join("tests/clients/realtime_speech.py");
    let (base, py, dialect) = (hark.base_url(), python(), dialect.to_string());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).arg(script).args(["--base-url", &base, "--dialect", &dialect]).args(&extra).output().expect("running the SDK client")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK client failed:\n{stdout}\n{stderr}");
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")).expect("RESULT line");
    let v: Value = serde_json::from_str(line).unwrap();
    eprintln!("{v}");
    v
}

/// Piper through ort on its own: plausible speech for a sentence, and its speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piper_voice_speaks_a_sentence() {
    let v = voice();
    assert_eq!(v.sample_rate(), 22_050);
    let ids = v.phoneme_ids("Hello, world.").unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2), "^ … $: {ids:?}");
    assert!(ids.len() > 10 && ids.iter().skip(1).step_by(2).all(|&i| i == 0), "pad after each symbol: {ids:?}");
    // Text that looks like a command-line option is text (it goes to espeak on stdin).
    assert!(!v.phoneme_ids("-v --help").unwrap().is_empty());
    assert!(v.phoneme_ids("...").unwrap().is_empty(), "nothing speakable, no ids");

    let engine = SpeechEngine::Piper(v);
    let text = "The quick brown fox jumps over the lazy dog, and then it runs away.";
    engine.synthesize("Warm up.").await.unwrap();
    let t = Instant::now();
    let pcm = engine.synthesize(text).await.unwrap();
    let took = t.elapsed().as_secs_f64();
    let seconds = pcm.samples.len() as f64 / pcm.sample_rate as f64;
    eprintln!("piper: {seconds:.2} s of audio in {took:.3} s: real-time factor {:.3}", took / seconds);
    assert!((2.5..8.0).contains(&seconds), "{seconds} s for {} characters", text.len());
    assert!(rms(&pcm.samples) > 0.03, "speech-level signal, rms {}", rms(&pcm.samples));
    // Voiced speech has pauses: the quietest 100 ms is far below the loudest.
    let windows: Vec<f32> = pcm.samples.chunks(2205).map(rms).collect();
    let (lo, hi) = windows.iter().fold((f32::MAX, 0f32), |(l, h), &w| (l.min(w), h.max(w)));
    assert!(hi > 10.0 * lo, "no dynamics: quietest {lo}, loudest {hi}");
}

/// The `command` engine with espeak-ng writing WAV to stdout; a missing program is a clear error.
#[tokio::test]
async fn command_engine_reads_wav_from_a_program() {
    let cfg = hark::config::CommandSpeechConfig::default();
    let engine = hark::speech::command::CommandEngine::new(&cfg).unwrap();
    let pcm = engine.synthesize("Testing the command engine.").await.unwrap();
    assert_eq!(pcm.sample_rate, 22_050);
    assert!(pcm.duration_ms() > 800 && rms(&pcm.samples) > 0.02, "{} ms rms {}", pcm.duration_ms(), rms(&pcm.samples));

    let bad = hark::config::CommandSpeechConfig { argv: vec!["/nonexistent/tts".into()], ..cfg.clone() };
    let err = hark::speech::command::CommandEngine::new(&bad).unwrap().synthesize("x").await.unwrap_err().to_string();
    assert!(err.contains("/nonexistent/tts"), "{err}");
    let failing = hark::config::CommandSpeechConfig { argv: vec!["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()], ..cfg.clone() };
    let err = hark::speech::command::CommandEngine::new(&failing).unwrap().synthesize("x").await.unwrap_err().to_string();
    assert!(err.contains("broken"), "{err}");
    let empty = hark::config::CommandSpeechConfig { argv: vec![], ..cfg };
    assert!(hark::speech::command::CommandEngine::new(&empty).is_err());
}

async fn spoken_reply(dialect: &str) {
    // RUST_LOG=hark=info shows "first audio … first_text_to_audio_ms".
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let model = ScriptedModel::start().await;
    model.push(Reply::text(REPLY));
    let hark = Hark::start(test_config(&model.base_url())).await;
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("reply.wav");
    let r = speech_client(&hark, dialect, &["--out", wav.to_str().unwrap()]).await;
    assert_eq!(r["transcript"], REPLY, "the transcript is the model's text");
    assert_eq!(r["item_transcript"], REPLY);
    // Piper speaks ~12-16 characters per second.
    let ms = r["duration_ms"].as_f64().unwrap();
    let chars = REPLY.len() as f64;
    assert!(ms > chars * 35.0 && ms < chars * 120.0, "{ms} ms of audio for {chars} characters");
    assert!(r["rms"].as_f64().unwrap() > 0.03, "speech-level audio: {r}");
    // The first clause is voiced on its own, before the rest of the text is spoken.
    assert!(r["create_to_first_audio_ms"].as_f64().unwrap() < r["create_to_done_ms"].as_f64().unwrap() / 2.0, "{r}");
    // What reached the client is the same speech Piper makes for that text, not just noise.
    let mut reader = hound::WavReader::open(&wav).unwrap();
    let got: Vec<f32> = reader.samples::<i16>().map(|s| s.unwrap() as f32 / 32768.0).collect();
    let direct = SpeechEngine::Piper(voice()).synthesize("Sure thing,").await.unwrap();
    let direct = hark::speech::stream::to_output_rate(direct.sample_rate, direct.samples).unwrap();
    let first = &got[..direct.len().min(got.len())];
    // VITS samples noise, so compare energy envelopes (20 ms) rather than samples.
    let env = |x: &[f32]| x.chunks(480).map(rms).collect::<Vec<_>>();
    let (a, b) = (env(first), env(&direct));
    let n = a.len().min(b.len());
    let corr = correlation(&a[..n], &b[..n]);
    assert!(corr > 0.6, "first clause's envelope correlation with Piper's own: {corr}");
}

fn correlation(a: &[f32], b: &[f32]) -> f32 {
    let (ma, mb) = (a.iter().sum::<f32>() / a.len() as f32, b.iter().sum::<f32>() / b.len() as f32);
    let cov: f32 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f32 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f32 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va.sqrt() * vb.sqrt()).max(1e-9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_ga_gets_a_spoken_reply() {
    spoken_reply("ga").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_beta_gets_a_spoken_reply() {
    spoken_reply("beta").await;
}

/// `response.cancel` while speaking: audio stops, the response ends `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_speech() {
    let model = ScriptedModel::start().await;
    let long = "This is the first sentence of a long answer. ".repeat(8);
    model.push(Reply::text(&long));
    let hark = Hark::start(test_config(&model.base_url())).await;
    let r = speech_client(&hark, "ga", &["--cancel-after-first-audio"]).await;
    assert_eq!(r["status"], "cancelled");
    assert!(r["duration_ms"].as_f64().unwrap() < 8000.0, "the whole answer was spoken: {r}");
    assert_eq!(r["audio_deltas_after_cancel"], 0, "{r}");
}

/// Truncation keeps the words that had started playing: the rest leaves the model's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_keeps_only_what_was_heard() {
    let model = ScriptedModel::start().await;
    model.push(Reply::text(REPLY));
    let hark = Hark::start(test_config(&model.base_url())).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"], "audio": {"input": {"turn_detection": null}}}})).await;
    c.until("session.updated").await;
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]}})).await;
    c.send(json!({"type": "response.create"})).await;
    let events = c.collect_until("response.done").await;
    let first_tr = events.iter().find(|e| e["type"] == "response.output_audio_transcript.delta").unwrap();
    assert_eq!(first_tr["delta"], "Sure thing,");
    let item_id = first_tr["item_id"].as_str().unwrap().to_string();
    c.send(json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 999_999})).await;
    let err = c.until("error").await;
    assert_eq!(err["error"]["param"], "audio_end_ms", "{err}");
    c.send(json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 50})).await;
    assert_eq!(c.until("conversation.item.truncated").await["audio_end_ms"], 50);
    c.send(json!({"type": "conversation.item.retrieve", "item_id": item_id})).await;
    let item = c.until("conversation.item.retrieved").await;
    assert_eq!(item["item"]["content"][0]["transcript"], "Sure thing,", "{item}");
    // Then ask again: the model's context holds only the heard clause…
    c.send(json!({"type": "response.create"})).await;
    c.until("response.done").await;
    let reqs = model.wait_requests(2).await;
    assert_eq!(reqs.len(), 2, "a spoken reply is not followed by a continuation");
    let assistant = reqs[1]["messages"].as_array().unwrap().iter().find(|m| m["role"] == "assistant").expect("the assistant turn").clone();
    // …and the note that the user cut it short.
    assert_eq!(assistant["content"], format!("Sure thing,{}", hark::session::conversation::CUT_NOTE), "{assistant}");
}

/// hark serves `/v1/audio/speech` with its voice; the official openai SDK and another
/// hark's `http` speech engine both use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_speech_endpoint_serves_the_sdk_and_the_http_engine() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;

    let engine = hark::speech::http::HttpEngine::new(&hark::config::HttpSpeechConfig {
        base_url: hark.base_url(),
        ..Default::default()
    })
    .unwrap();
    let pcm = engine.synthesize("Hello from the other side.").await.unwrap();
    assert_eq!(pcm.sample_rate, 24_000);
    assert!((800..4000).contains(&pcm.duration_ms()) && rms(&pcm.samples) > 0.03, "{} ms, rms {}", pcm.duration_ms(), rms(&pcm.samples));
    let wav = hark::speech::http::HttpEngine::new(&hark::config::HttpSpeechConfig {
        base_url: hark.base_url(),
        format: hark::config::SpeechOutputFormat::Wav,
        ..Default::default()
    })
    .unwrap();
    assert!(wav.synthesize("Hello again.").await.unwrap().duration_ms() > 500);
    // A format hark cannot encode is refused, and the engine says what the server said.
    let client = reqwest::Client::new();
    let r = client.post(format!("{}/audio/speech", hark.base_url())).json(&json!({"model": "x", "voice": "y", "input": "hi", "response_format": "mp3"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "response_format");

    let script = format!(
        "from openai import OpenAI\nc = OpenAI(base_url='{}', api_key='x')\nr = c.audio.speech.create(model='hark', voice='alloy', input='Testing the speech endpoint.', response_format='pcm')\nprint(len(r.content))",
        hark.base_url()
    );
    let py = python();
    let out = tokio::task::spawn_blocking(move || Command::new(py).args(["-c", &script]).output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let ms = bytes / 48;
    assert!((1000..5000).contains(&ms), "{ms} ms of pcm through the SDK");
}

/// With speech off, a response that asks for audio says so and answers in text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_speech_engine_audio_requests_get_text_and_an_error() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.speech.engine = hark::config::SpeechEngineKind::None;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"], "audio": {"input": {"turn_detection": null}}}})).await;
    c.until("session.updated").await;
    c.send(json!({"type": "response.create"})).await;
    let events = c.collect_until("response.done").await;
    let err = events.iter().find(|e| e["type"] == "error").expect("an error event");
    assert_eq!(err["error"]["code"], "speech_unavailable", "{err}");
    let text: String = events.iter().filter(|e| e["type"] == "response.output_text.delta").map(|e| e["delta"].as_str().unwrap()).collect();
    assert_eq!(text, "Hello from the scripted model.");
    assert!(!events.iter().any(|e| e["type"] == "response.output_audio.delta"));
}
