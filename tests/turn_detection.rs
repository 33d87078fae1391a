//! Turn detection with real espeak-ng speech through the real Silero VAD (scripted
//! model server): barge-in cancels a running response with `speech_started` first and
//! one `response.done` (cancelled, `turn_detected`); `interrupt_response: false` lets it
//! finish; `idle_timeout_ms` re-engages a silent user.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

async fn send_wav(c: &mut Client, wav: &std::path::Path) {
    for chunk in wav_pcm_bytes(wav).chunks(960) {
        c.send(json!({"type": "input_audio_buffer.append", "audio": b64(chunk)})).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_during_a_response_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = speech_wav(dir.path(), "first", "tell me a long story about the sea", 0.5, 0.8);
    let second = speech_wav(dir.path(), "second", "stop, that is enough", 0.3, 0.8);
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let mut c = Client::connect(&hark.ws_url()).await;

    // The first answer starts streaming and then keeps the connection open.
    model.push(Reply::StreamThenHang { chunks: vec![json!({"choices": [{"index": 0, "delta": {"content": "Once upon a time"}}]})] });
    send_wav(&mut c, &first).await;
    c.until("input_audio_buffer.speech_stopped").await;
    let created = c.until("response.created").await;
    let first_id = created["response"]["id"].as_str().unwrap().to_string();
    c.until("response.output_text.delta").await;

    send_wav(&mut c, &second).await;
    let events = c.collect_until("response.done").await;
    let t = types(&events);
    let started = t.iter().position(|x| x == "input_audio_buffer.speech_started").expect("speech_started before response.done");
    // Cancellation follows the speech start directly (no more deltas in between).
    assert!(t[started + 1..].iter().all(|x| !x.starts_with("response.output_text.delta")), "{t:?}");
    let done = events.last().unwrap();
    assert_eq!(done["response"]["id"], first_id.as_str());
    assert_eq!(done["response"]["status"], "cancelled");
    assert_eq!(done["response"]["status_details"]["reason"], "turn_detected");
    // The partial answer stays in the conversation, marked incomplete.
    assert_eq!(done["response"]["output"][0]["status"], "incomplete");
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Once upon a time");

    // The interrupting turn gets its own response, which completes.
    c.until("input_audio_buffer.speech_stopped").await;
    let created = c.until("response.created").await;
    assert_ne!(created["response"]["id"], first_id.as_str());
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed");
    assert_eq!(c.seen.iter().filter(|e| e["type"] == "response.done").count(), 2);

    // The second request carried both user turns and the interrupted answer.
    let reqs = model.wait_requests(2).await;
    let roles: Vec<&str> = reqs[1]["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_response_false_lets_the_response_finish() {
    let dir = tempfile::tempdir().unwrap();
    let first = speech_wav(dir.path(), "first", "what time is it", 0.5, 0.8);
    let second = speech_wav(dir.path(), "second", "hmm", 0.3, 0.8);
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": false}}}}})).await;
    c.until("session.updated").await;

    let slow: Vec<_> = (0..6).map(|i| json!({"choices": [{"index": 0, "delta": {"content": format!("w{i} ")}}]})).collect();
    let mut chunks = slow;
    chunks.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
    model.push(Reply::Stream { chunks, gap: Duration::from_millis(400) });
    send_wav(&mut c, &first).await;
    c.until("response.output_text.delta").await;
    send_wav(&mut c, &second).await;
    let events = c.collect_until("response.done").await;
    assert!(types(&events).contains(&"input_audio_buffer.speech_started".to_string()), "{:?}", types(&events));
    assert_eq!(events.last().unwrap()["response"]["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_commits_silence_and_creates_a_response() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 1000}}}}})).await;
    assert_eq!(c.until("session.updated").await["session"]["audio"]["input"]["turn_detection"]["idle_timeout_ms"], 1000);
    // 1.5 s of silence, appended in 20 ms chunks.
    let silence = vec![0u8; 960];
    for _ in 0..75 {
        c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&silence)})).await;
    }
    let events = c.collect_until("response.done").await;
    let t = types(&events);
    let trig = events.iter().find(|e| e["type"] == "input_audio_buffer.timeout_triggered").unwrap_or_else(|| panic!("{t:?}"));
    let end = trig["audio_end_ms"].as_u64().unwrap();
    assert!((1000..1100).contains(&end), "timeout at {end} ms");
    let committed = events.iter().find(|e| e["type"] == "input_audio_buffer.committed").unwrap();
    assert_eq!(committed["item_id"], trig["item_id"]);
    assert!(!t.contains(&"input_audio_buffer.speech_started".to_string()));
    assert_eq!(events.last().unwrap()["response"]["status"], "completed");
    // Exactly one timeout for that stretch of silence.
    assert_eq!(t.iter().filter(|x| *x == "input_audio_buffer.timeout_triggered").count(), 1);
}
