//! Camera frames and the user's speech, in time order in the conversation: a session
//! driven over its channels as the WebRTC call task drives it (track audio in, frames
//! sampled by the transport in), with real espeak-ng speech, real Silero VAD, and the
//! scripted model behind the remote backend. (The browser end to end is
//! `webrtc_browser.rs`.)

mod common;

use std::time::Duration;

use common::*;
use hark::protocol::{to_wire, Dialect};
use hark::session::{Session, SessionInput};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A small real JPEG as the transport sends it (already sized to the frame budget).
fn jpeg_data_url(shade: u8) -> String {
    use base64::Engine;
    let img = image::RgbImage::from_pixel(96, 48, image::Rgb([shade, 40, 200]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode(img.as_raw(), 96, 48, image::ExtendedColorType::Rgb8).unwrap();
    format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg))
}

/// Frames sampled while the user speaks join that turn's message after its audio
/// (`[input_audio, "mm:ss", image, …]`); frames sampled in silence are items of their
/// own, before or after it. Every frame lands exactly once, all in time order, and the
/// model's request carries them in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sampled_while_the_user_speaks_join_that_turn() {
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_wav(dir.path(), "speech", "Hello hark. Look at what I am holding up to the camera now.", 1.5, 2.5);
    let samples: Vec<f32> = wav_pcm_bytes(&wav).chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect();
    let model = ScriptedModel::start().await;
    model.push(Reply::text("I see it."));
    let state = hark::server::AppState::from_config(test_config(&model.base_url())).await.expect("hark starts");
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, mut out_rx) = mpsc::channel(4096);
    let task = tokio::spawn(Session::new(state.deps.clone(), None).run(in_rx, out_tx, CancellationToken::new()));

    // 20 ms of 24 kHz track audio at a time; a frame every 400 ms of it, stamped with
    // its time in the stream (the session handles its inputs in order, so a frame is
    // seen after exactly the audio before it).
    let mut sent_at = Vec::new();
    for (k, chunk) in samples.chunks(480).enumerate() {
        let ms = k as u64 * 20;
        if ms % 400 == 0 {
            in_tx.send(SessionInput::CameraFrame { data_url: jpeg_data_url((ms / 20) as u8), at_ms: ms }).await.unwrap();
            sent_at.push(ms);
        }
        in_tx.send(SessionInput::TrackAudio { rate: 24_000, samples: chunk.to_vec() }).await.unwrap();
    }
    let mut events: Vec<Value> = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = out_rx.recv().await {
            let v: Value = to_wire(&ev, Dialect::Ga).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or(Value::Null);
            let done = v["type"] == "response.done";
            events.push(v);
            if done {
                break;
            }
        }
    })
    .await
    .expect("a response after the turn");
    drop(in_tx);
    let conversation = task.await.unwrap();

    let first = |ty: &str| events.iter().find(|e| e["type"] == ty).unwrap_or_else(|| panic!("no {ty}"));
    let (start_ms, end_ms) = (first("input_audio_buffer.speech_started")["audio_start_ms"].as_u64().unwrap(), first("input_audio_buffer.speech_stopped")["audio_end_ms"].as_u64().unwrap());
    // The conversation, flattened: per item, its frames (by stamp) and whether it is the turn.
    let stamp_ms = |t: &str| -> u64 { t[..2].parse::<u64>().unwrap() * 60_000 + t[3..].parse::<u64>().unwrap() * 1000 };
    let items: Vec<&hark::protocol::Item> = conversation.items();
    let turn_at = items.iter().position(|i| i.content.as_deref().unwrap_or_default().first().is_some_and(|p| p.kind == "input_audio")).expect("the turn's item");
    let mut order = Vec::new(); // (item index, stamp ms)
    for (i, item) in items.iter().enumerate() {
        let parts = item.content.as_deref().unwrap_or_default();
        for (k, p) in parts.iter().enumerate() {
            if p.kind == "input_image" {
                assert_eq!(parts[k - 1].kind, "input_text", "each frame follows its stamp");
                order.push((i, stamp_ms(parts[k - 1].text.as_deref().unwrap())));
            }
        }
    }
    let in_turn: Vec<usize> = order.iter().enumerate().filter(|(_, (i, _))| *i == turn_at).map(|(n, _)| n).collect();
    eprintln!(
        "speech {start_ms}..{end_ms} ms; {} frames sent, {} in the turn's message, {} before it, {} after",
        sent_at.len(),
        in_turn.len(),
        order.iter().filter(|(i, _)| *i < turn_at).count(),
        order.iter().filter(|(i, _)| *i > turn_at).count()
    );
    assert_eq!(order.len(), sent_at.len(), "every frame lands once");
    // Frame n is the n-th sent: item order is time order.
    for (n, (_, stamp)) in order.iter().enumerate() {
        assert_eq!(*stamp, sent_at[n] / 1000 * 1000, "frame {n} out of order: {order:?}");
    }
    assert!(in_turn.len() >= 3, "frames sampled while speaking join the turn: {order:?}");
    let turn_parts = items[turn_at].content.as_deref().unwrap();
    assert_eq!(turn_parts.len(), 1 + 2 * in_turn.len(), "[input_audio, (stamp, image)…]");
    for &n in &in_turn {
        // Between the VAD's start and its stop (which comes silence_duration_ms after the end).
        assert!(sent_at[n] + 100 >= start_ms && sent_at[n] <= end_ms + 1000, "frame at {} ms in a turn of {start_ms}..{end_ms}", sent_at[n]);
    }
    for (n, (i, _)) in order.iter().enumerate() {
        if (start_ms + 500..end_ms).contains(&sent_at[n]) {
            assert_eq!(*i, turn_at, "frame at {} ms, inside the speech, is in the turn", sent_at[n]);
        }
    }
    assert!(order.iter().any(|(i, _)| *i < turn_at) && order.iter().any(|(i, _)| *i > turn_at), "frames in silence before and after: {order:?}");

    // The committed item the client sees carries them too, and the model got them in order.
    let committed = events.iter().find(|e| e["type"] == "conversation.item.added" && e["item"]["content"][0]["type"] == "input_audio").unwrap();
    assert_eq!(committed["item"]["content"].as_array().unwrap().len(), turn_parts.len());
    let request = &model.requests()[0];
    let user_turn = request["messages"].as_array().unwrap().iter().find(|m| m["content"].as_array().is_some_and(|c| c[0]["type"] == "input_audio")).unwrap();
    let kinds: Vec<&str> = user_turn["content"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "input_audio");
    assert!(kinds[1..].chunks(2).all(|c| c == ["text", "image_url"]), "{kinds:?}");
    assert_eq!(kinds.len(), turn_parts.len());
}
