//! The rolling context window, driven through the Realtime protocol: sessions pushed
//! past `session.context.max_tokens` keep answering, evict whole turns oldest-first,
//! and keep system and pinned items; streamed turns that turn out to be noise are
//! retracted. (That the model's state after an eviction equals a fresh prefill is
//! proved at the engine level in `streaming_prefill.rs`.)

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

fn tiny_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    hark::model::gemma4::init::write_random_checkpoint(hark::model::gemma4::init::Preset::Tiny, dir.path(), false, 5, |_, _| {}).unwrap();
    dir
}

fn embedded_config(ckpt: &std::path::Path, max_context: usize) -> hark::config::Config {
    let mut cfg = test_config("http://127.0.0.1:9/v1");
    cfg.backend.kind = hark::config::BackendKind::Embedded;
    cfg.backend.embedded.checkpoint = ckpt.to_path_buf();
    cfg.backend.embedded.max_tokens = 3;
    cfg.backend.embedded.temperature = 0.0;
    cfg.session.context.max_tokens = max_context;
    cfg.session.context.retention_ratio = 0.5;
    cfg.session.turn_detection = None;
    cfg
}

async fn add_text(c: &mut Client, role: &str, text: &str, pinned: bool) -> String {
    let kind = if role == "assistant" { "output_text" } else { "input_text" };
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": role, "pinned": pinned, "content": [{"type": kind, "text": text}]}})).await;
    let added = c.until("conversation.item.added").await;
    added["item"]["id"].as_str().unwrap().to_string()
}

/// One user turn and its response; returns (user item id, reply item id, response.done, events).
async fn turn(c: &mut Client, i: usize) -> (String, String, Value, Vec<Value>) {
    let user = add_text(c, "user", &format!("turn {i}: please remember the number {}", i * 11), false).await;
    c.send(json!({"type": "response.create"})).await;
    let events = c.collect_until("response.done").await;
    let done = events.last().unwrap().clone();
    let reply = done["response"]["output"][0]["id"].as_str().unwrap_or_default().to_string();
    (user, reply, done, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_session_evicts_whole_old_turns_and_keeps_answering() {
    let ckpt = tiny_checkpoint();
    let max_context = 400;
    let hark = Hark::start(embedded_config(ckpt.path(), max_context)).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    let system = add_text(&mut c, "system", "Always answer in one word.", false).await;
    let pinned = add_text(&mut c, "user", "My name is Ada; never forget it.", true).await;

    let mut turns = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    for i in 0..24 {
        let (user, reply, done, events) = turn(&mut c, i).await;
        let status = done["response"]["status"].as_str().unwrap();
        assert!(status == "completed" || status == "incomplete", "turn {i}: {done}");
        let input_tokens = done["response"]["usage"]["input_tokens"].as_u64().unwrap() as usize;
        // Counts are exact for the embedded model: no request ever exceeds the window.
        assert!(input_tokens <= max_context, "turn {i}: {input_tokens} prompt tokens > {max_context}");
        deleted.extend(events.iter().filter(|e| e["type"] == "conversation.item.deleted").map(|e| e["item_id"].as_str().unwrap().to_string()));
        turns.push((user, reply));
    }
    assert!(deleted.len() >= 4, "24 turns must overflow a 400-token window: {deleted:?}");

    // Never the system message or the pinned item.
    assert!(!deleted.contains(&system) && !deleted.contains(&pinned));
    // Oldest first, and whole turns: a user message goes with the reply that answered it.
    let order: Vec<String> = turns.iter().flat_map(|(u, r)| [u.clone(), r.clone()]).collect();
    assert_eq!(deleted, order[..deleted.len()].to_vec(), "evicted out of order");
    assert_eq!(deleted.len() % 2, 0, "a turn was split: {deleted:?}");
    // The newest turns are still there.
    let (last_user, _) = turns.last().unwrap();
    c.send(json!({"type": "conversation.item.retrieve", "item_id": last_user})).await;
    assert_eq!(c.until("conversation.item.retrieved").await["item"]["id"], last_user.as_str());
    for gone in deleted.iter().take(2) {
        c.send(json!({"type": "conversation.item.retrieve", "item_id": gone})).await;
        let e = c.until("error").await;
        assert_eq!(e["error"]["code"], "item_not_found", "{e}");
    }
    let unique: HashSet<&String> = deleted.iter().collect();
    assert_eq!(unique.len(), deleted.len(), "an item was evicted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_backends_get_the_same_window() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.session.context.max_tokens = 200;
    cfg.session.context.retention_ratio = 0.5;
    cfg.session.turn_detection = None;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    add_text(&mut c, "system", "Be brief.", false).await;
    for i in 0..12 {
        model.push(Reply::text(&format!("answer {i} with a few words of text")));
        let (_, _, done, _) = turn(&mut c, i).await;
        assert_eq!(done["response"]["status"], "completed", "{done}");
    }
    let requests = model.requests();
    let last = &requests.last().unwrap()["messages"];
    let texts: Vec<String> = last.as_array().unwrap().iter().map(|m| m["content"].to_string()).collect();
    // The system message stays; the first turns are gone; the newest is there.
    assert!(texts.iter().any(|t| t.contains("Be brief.")), "{texts:?}");
    assert!(!texts.iter().any(|t| t.contains("turn 0:")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("turn 11:")), "{texts:?}");
    // Estimated at about four characters a token, the prompt stays within the window.
    let chars: usize = texts.iter().map(|t| t.len()).sum();
    assert!(chars / 4 <= 200, "{chars} characters sent");
    // The window evicted in a few large steps, not a turn at every request.
    let sizes: Vec<usize> = requests.iter().map(|r| r["messages"].as_array().unwrap().len()).collect();
    let shrinks = sizes.windows(2).filter(|w| w[1] < w[0]).count();
    assert!((1..=4).contains(&shrinks), "{sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_is_retracted_and_the_next_turn_is_answered() {
    let ckpt = tiny_checkpoint();
    let mut cfg = embedded_config(ckpt.path(), 262_144);
    // The energy detector fires on a tone, so a 64 ms burst is "speech" to it.
    cfg.audio.vad = hark::config::VadKind::Energy;
    cfg.session.turn_detection = Some(hark::config::TurnDetectionConfig { silence_duration_ms: 300, ..Default::default() });
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;

    let silence = vec![0u8; 24_000 * 2]; // 1 s
    let mut audio = silence.clone();
    audio.extend(sine_pcm24(0.064, 440.0));
    audio.extend(&silence);
    for chunk in audio.chunks(960) {
        c.send(json!({"type": "input_audio_buffer.append", "audio": b64(chunk)})).await;
    }
    c.send(json!({"type": "input_audio_buffer.clear", "event_id": "mark"})).await;
    let events = c.collect_until("input_audio_buffer.cleared").await;
    let kinds = types(&events);
    assert!(kinds.contains(&"input_audio_buffer.speech_started".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"input_audio_buffer.speech_stopped".to_string()), "{kinds:?}");
    // Too short to be speech: nothing committed, no response.
    assert!(!kinds.iter().any(|k| k == "input_audio_buffer.committed" || k == "response.created"), "{kinds:?}");

    // A real turn afterwards goes through (the model's cache was rolled back cleanly).
    let mut audio = sine_pcm24(0.8, 300.0);
    audio.extend(&silence);
    for chunk in audio.chunks(960) {
        c.send(json!({"type": "input_audio_buffer.append", "audio": b64(chunk)})).await;
    }
    c.until("input_audio_buffer.committed").await;
    let done = c.until("response.done").await;
    assert_ne!(done["response"]["status"], "failed", "{done}");
    // The turn was streamed into the model while it was spoken: of its ~32 audio
    // tokens (0.3 s padding + 0.8 s + 0.2 s tail) only the last frame and the turn's
    // closing were prefilled after end of speech.
    let usage = &done["response"]["usage"];
    let (input, cached) = (usage["input_tokens"].as_u64().unwrap(), usage["input_token_details"]["cached_tokens"].as_u64().unwrap());
    assert!(input - cached < 25, "prefilled {} of {input} after end of speech: {usage}", input - cached);
}
