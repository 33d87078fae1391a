//! `/metrics` parses with the Prometheus project's own Python parser
//! (`prometheus_client.parser`), and its counters move as sessions and requests run.
//! `/readyz` says ready. The model server is scripted (see `common`).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

/// Parses the exposition with prometheus_client; returns {"name{labels}": value}.
fn parse(text: &str) -> Value {
    let py = std::env::var("HARK_TEST_PYTHON").unwrap_or_else(|_| repo_root().join(".venv/bin/python").display().to_string());
    let code = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(py).args(["-c", code]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the Prometheus parser refused /metrics: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    hark::tls::init();
    let http = reqwest::Client::new();
    let scrape = || async { parse(&http.get(format!("http://{}/metrics", hark.addr)).send().await.unwrap().text().await.unwrap()) };
    let before = scrape().await;
    assert_eq!(before["hark_sessions_total{}"], 0.0, "{before}");

    // One realtime response, one bad event, one chat completion.
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "response.create"})).await;
    c.until("response.done").await;
    c.send(json!({"type": "no.such.event"})).await;
    c.until("error").await;
    let r = http.post(format!("{}/chat/completions", hark.base_url())).json(&json!({"model": "hark", "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let after = scrape().await;
    assert_eq!(after["hark_sessions_total{}"], 1.0, "{after}");
    assert_eq!(after["hark_sessions_active{}"], 1.0, "{after}");
    assert_eq!(after[r#"hark_responses_total{status="completed"}"#], 1.0, "{after}");
    assert_eq!(after[r#"hark_errors_total{code="invalid_value"}"#], 1.0, "{after}");
    assert_eq!(after[r#"hark_requests_total{endpoint="chat.completions"}"#], 1.0, "{after}");
    // The scripted model reports 42 prompt and 7 completion tokens per answer.
    assert_eq!(after["hark_input_tokens_total{}"], 84.0, "{after}");
    assert_eq!(after["hark_output_tokens_total{}"], 14.0, "{after}");
    assert_eq!(after[r#"hark_latency_seconds_count{stage="first_token"}"#], 1.0, "{after}");
    assert_eq!(after[r#"hark_latency_seconds_count{stage="response"}"#], 1.0, "{after}");
    // Context fill: the realtime response's 42 prompt tokens over the window's limit
    // (chat completions have no rolling window). A remote backend holds no KV cache.
    let limit = test_config(&model.base_url()).session.context.max_tokens as f64;
    assert_eq!(after["hark_context_fill_ratio_count{}"], 1.0, "{after}");
    assert!((after["hark_context_fill_ratio_sum{}"].as_f64().unwrap() - 42.0 / limit).abs() < 1e-9, "{after}");
    assert_eq!(after["hark_kv_cache_bytes{}"], 0.0, "{after}");

    drop(c);
    let ready = http.get(format!("http://{}/readyz", hark.addr)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "ready");
}

/// The embedded model's KV memory shows on /metrics: after a response the kept
/// session's cache is counted, within the configured budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_cache_bytes_follow_the_embedded_model() {
    let dir = tempfile::tempdir().unwrap();
    let hark = Hark::start(embedded_test_config(dir.path())).await;
    let http = reqwest::Client::new();
    let scrape = || async { parse(&http.get(format!("http://{}/metrics", hark.addr)).send().await.unwrap().text().await.unwrap()) };
    let before = scrape().await;
    assert_eq!(before["hark_kv_cache_bytes{}"], 0.0, "{before}");
    let budget = before["hark_kv_budget_bytes{}"].as_f64().unwrap();
    assert!(budget > 0.0, "{before}");

    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}})).await;
    c.send(json!({"type": "response.create", "response": {"max_output_tokens": 4}})).await;
    c.until("response.done").await;
    // The model thread records its figure when it keeps the finished response's
    // cache, before it sends the end of the response.
    let held = scrape().await["hark_kv_cache_bytes{}"].as_f64().unwrap();
    assert!(held > 0.0 && held <= budget, "kv bytes {held}, budget {budget}");
}

/// Audio hark has to throw away is counted by cause: an input buffer past
/// `audio.max_buffer_seconds` loses its oldest audio, and an append over the size
/// limit is refused whole; both show in `hark_audio_frames_dropped_total` (40 ms frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_audio_frames_are_counted_by_cause() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.audio.max_buffer_seconds = 1;
    let hark = Hark::start(cfg).await;
    let http = reqwest::Client::new();
    let scrape = || async { parse(&http.get(format!("http://{}/metrics", hark.addr)).send().await.unwrap().text().await.unwrap()) };
    let full = r#"hark_audio_frames_dropped_total{source="input_buffer_full"}"#;
    let large = r#"hark_audio_frames_dropped_total{source="append_too_large"}"#;
    let before = scrape().await;
    assert!(before.get(full).is_none() && before.get(large).is_none(), "{before}");

    // Manual turns: nothing trims the buffer but its cap. 3 s of 24 kHz audio into a
    // 1 s buffer: 2 s (50 frames) go, less what the resampler still holds.
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": null}}}})).await;
    c.until("session.updated").await;
    let tone = sine_pcm24(3.0, 440.0);
    for chunk in tone.chunks(4800) {
        c.send(json!({"type": "input_audio_buffer.append", "audio": b64(chunk)})).await;
    }
    let err = c.until("error").await;
    assert_eq!(err["error"]["code"], "input_audio_buffer_full", "{err}");
    // Over the append limit (but within the message limit): refused, and counted.
    let too_big = vec![0u8; hark::protocol::MAX_APPEND_BYTES + 3 * 1024];
    c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&too_big)})).await;
    let err = c.until("error").await;
    assert_eq!(err["error"]["code"], "audio_too_large", "{err}");

    let after = scrape().await;
    let dropped = after[full].as_f64().unwrap_or_else(|| panic!("no {full} in {after}"));
    assert!((49.0..=50.0).contains(&dropped), "2 s of 3 s should have been dropped, got {dropped} frames: {after}");
    // 7 865 856 samples at 24 kHz = 327.744 s = 8193.6 frames of 40 ms.
    assert_eq!(after[large], 7_865_856.0 * 25.0 / 24_000.0, "{after}");
}
