//! The official `openai` Python SDK as a Realtime client against hark with server VAD
//! (Silero through ONNX Runtime) on real espeak-ng speech, streamed in real time.
//! The model server behind hark is scripted (see `common`); everything else is real.
//!
//! `tests/clients/realtime_vad.py` does the client side and the event assertions;
//! this test prepares speech, starts hark, runs the script once per dialect, and
//! checks what reached the model server.

mod common;

use std::process::Command;

use base64::Engine;
use common::*;
use serde_json::Value;

fn python() -> String {
    std::env::var("HARK_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = repo_root().join(".venv/bin/python");
        assert!(venv.exists(), "no Python with the openai SDK: run scripts/test (it creates .venv), or set HARK_TEST_PYTHON");
        venv.display().to_string()
    })
}

async fn run_sdk_client(dialect: &str, text: &str) -> (Value, Vec<Value>) {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let result = run_script(&hark, dialect, text).await;
    (result, model.requests())
}

/// Runs `tests/clients/realtime_vad.py` against `hark` with espeak-ng speech; returns its RESULT.
pub async fn run_script(hark: &Hark, dialect: &str, text: &str) -> Value {
    run_script_with(hark, dialect, text, &[]).await
}

async fn run_script_with(hark: &Hark, dialect: &str, text: &str, extra: &[&str]) -> Value {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_wav(dir.path(), "utterance", text, 0.8, 1.2);

    let script = repo_root().join("tests/clients/realtime_vad.py");
    let base = hark.base_url();
    let wav_arg = wav.display().to_string();
    let py = python();
    let dialect_arg = dialect.to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .args(["--base-url", &base, "--dialect", &dialect_arg, "--wav", &wav_arg, "--tolerance-ms", "150", "--timeout-s", "40"])
            .args(&extra)
            .output()
            .expect("running the SDK client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK client failed ({dialect}):\n{stdout}\n{stderr}");
    let result_line = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")).expect("RESULT line");
    let result: Value = serde_json::from_str(result_line).unwrap();
    eprintln!("{dialect}: {result}");
    result
}

fn check_request_audio(requests: &[Value], result: &Value) {
    assert_eq!(requests.len(), 1, "exactly one model request per turn");
    let user = requests[0]["messages"].as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap();
    let data = user["content"][0]["input_audio"]["data"].as_str().unwrap();
    let wav = base64::engine::general_purpose::STANDARD.decode(data).unwrap();
    let r = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    assert_eq!(r.spec().sample_rate, 16_000);
    // The turn's audio: 300 ms prefix padding + the speech + a 200 ms tail.
    let got_ms = r.len() as f64 / 16.0;
    let speech_ms = result["audio_end_ms"].as_f64().unwrap() - result["audio_start_ms"].as_f64().unwrap();
    let want_ms = speech_ms + 300.0 + 200.0;
    assert!((got_ms - want_ms).abs() <= 40.0, "turn audio {got_ms} ms, expected {want_ms} ms");
}

/// One spoken turn through the SDK: VAD timing within 150 ms, the scripted reply, and
/// the turn's audio as it reached the model server.
async fn spoken_turn(dialect: &str, text: &str) {
    let (result, requests) = run_sdk_client(dialect, text).await;
    assert!(result["start_err_ms"].as_f64().unwrap().abs() <= 150.0);
    assert!(result["end_err_ms"].as_f64().unwrap().abs() <= 150.0);
    assert_eq!(result["response_text"], "Hello from the scripted model.");
    check_request_audio(&requests, &result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_ga_server_vad_and_response() {
    spoken_turn("ga", "what is the weather like in paris today").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_beta_server_vad_and_response() {
    spoken_turn("beta", "please set a timer for ten minutes").await;
}

/// The same client against the embedded Gemma 4 (a tiny random-weight checkpoint of the
/// real layout, written by `hark model init`): the content is noise, but the events,
/// token counts and timing are produced by the real model code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_against_the_embedded_model() {
    let ckpt = tempfile::tempdir().unwrap();
    let mut cfg = embedded_test_config(ckpt.path());
    cfg.backend.embedded.max_tokens = 24;
    let hark = Hark::start(cfg).await;
    // Random weights never choose to stop, so the reply ends at max_output_tokens.
    let result = run_script_with(&hark, "ga", "what is the weather like in paris today", &["--accept-incomplete"]).await;
    assert!(result["start_err_ms"].as_f64().unwrap().abs() <= 150.0);
    assert!(result["end_err_ms"].as_f64().unwrap().abs() <= 150.0);
    assert!(!result["response_text"].as_str().unwrap().is_empty(), "{result}");
}
