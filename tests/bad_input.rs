//! Bad input from a client gets an `error` event that names the problem (and the
//! client's `event_id`), and the connection stays usable.

mod common;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn setup() -> (ScriptedModel, Hark) {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    (model, hark)
}

/// Sends `raw`, expects one `error` event, then checks the session still answers.
async fn expect_error(c: &mut Client, raw: Message) -> Value {
    c.send_raw(raw).await;
    let err = c.until("error").await;
    assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    c.assert_alive().await;
    err
}

fn text(s: impl Into<String>) -> Message {
    Message::text(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_errors_and_the_session_lives() {
    let (_m, hark) = setup().await;
    let mut c = Client::connect(&hark.ws_url()).await;

    let e = expect_error(&mut c, text("{\"type\": \"session.update\", ")).await;
    assert_eq!(e["error"]["code"], "invalid_json");

    let e = expect_error(&mut c, text("[1,2,3]")).await;
    assert_eq!(e["error"]["code"], "invalid_json");

    let e = expect_error(&mut c, text(r#"{"event_id":"ev_unknown","type":"response.make"}"#)).await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["param"].as_str()), (Some("invalid_value"), Some("type")));
    assert_eq!(e["error"]["event_id"], "ev_unknown");
    assert!(e["error"]["message"].as_str().unwrap().contains("response.make"));

    let e = expect_error(&mut c, text(r#"{"event_id":"ev_notype"}"#)).await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["event_id"].as_str()), (Some("missing_required_parameter"), Some("ev_notype")));

    let e = expect_error(&mut c, Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(e["error"]["code"], "invalid_message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_field_types_name_the_field() {
    let (_m, hark) = setup().await;
    let mut c = Client::connect(&hark.ws_url()).await;

    let e = expect_error(&mut c, text(json!({"type": "input_audio_buffer.append", "event_id": "ev1", "audio": 12345}).to_string())).await;
    assert_eq!((e["error"]["param"].as_str(), e["error"]["event_id"].as_str()), (Some("audio"), Some("ev1")));

    let e = expect_error(
        &mut c,
        text(json!({"type": "session.update", "event_id": "ev2", "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": "long"}}}}}).to_string()),
    )
    .await;
    assert_eq!(e["error"]["param"], "session.audio.input.turn_detection.silence_duration_ms");
    assert_eq!(e["error"]["event_id"], "ev2");

    let e = expect_error(&mut c, text(json!({"type": "conversation.item.create", "event_id": "ev3", "item": {"type": "message", "role": "user", "content": "hello"}}).to_string())).await;
    assert_eq!(e["error"]["param"], "item.content");

    let e = expect_error(&mut c, text(json!({"type": "conversation.item.create", "event_id": "ev4", "item": {"type": "message", "role": "robot", "content": []}}).to_string())).await;
    assert_eq!(e["error"]["param"], "item.role");

    let e = expect_error(&mut c, text(json!({"type": "event_id", "event_id": ["not", "a", "string"]}).to_string())).await;
    assert_eq!(e["error"]["param"], "event_id");

    // A refused session.update leaves the session as it was.
    let e = expect_error(&mut c, text(json!({"type": "session.update", "session": {"instructions": "changed", "audio": {"input": {"format": {"type": "audio/mp3"}}}}}).to_string())).await;
    assert_eq!(e["error"]["param"], "session.audio.input.format.type");
    c.send(json!({"type": "session.update", "session": {"type": "realtime"}})).await;
    let s = c.until("session.updated").await;
    assert_ne!(s["session"]["instructions"], "changed");
    assert_eq!(s["session"]["audio"]["input"]["format"]["type"], "audio/pcm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_is_refused_and_nothing_is_lost() {
    let (_m, hark) = setup().await;
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": null}}}})).await;
    c.until("session.updated").await;

    // Good audio first; it must survive the bad appends below.
    c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&sine_pcm24(0.5, 300.0))})).await;

    let e = expect_error(&mut c, text(json!({"type": "input_audio_buffer.append", "event_id": "b64", "audio": "@@@ not base64 @@@"}).to_string())).await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["event_id"].as_str()), (Some("invalid_base64"), Some("b64")));
    // assert_alive cleared the buffer; append the good audio again.
    c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&sine_pcm24(0.5, 300.0))})).await;

    // 16-bit PCM cannot have an odd byte count.
    c.send_raw(text(json!({"type": "input_audio_buffer.append", "event_id": "odd", "audio": b64(&[1, 2, 3])}).to_string())).await;
    let e = c.until("error").await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["event_id"].as_str()), (Some("invalid_audio"), Some("odd")));

    // A WAV file where the session declared raw audio/pcm.
    let wav = {
        let mut cur = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec { channels: 1, sample_rate: 24_000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut w = hound::WavWriter::new(&mut cur, spec).unwrap();
        for _ in 0..2400 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        cur.into_inner()
    };
    c.send_raw(text(json!({"type": "input_audio_buffer.append", "event_id": "wav", "audio": b64(&wav)}).to_string())).await;
    let e = c.until("error").await;
    assert_eq!(e["error"]["code"], "invalid_audio");
    assert!(e["error"]["message"].as_str().unwrap().contains("WAV"), "{e}");

    // Over 15 MiB of audio in one append.
    let big = vec![0u8; 15 * 1024 * 1024 + 4];
    c.send_raw(text(json!({"type": "input_audio_buffer.append", "event_id": "big", "audio": b64(&big)}).to_string())).await;
    let e = c.until("error").await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["event_id"].as_str()), (Some("audio_too_large"), Some("big")));

    // The 0.5 s of good audio is all still there.
    c.send(json!({"type": "input_audio_buffer.commit"})).await;
    let committed = c.until("input_audio_buffer.committed").await;
    assert!(committed["item_id"].as_str().is_some());

    // Empty buffer commits are refused.
    c.send(json!({"type": "input_audio_buffer.commit", "event_id": "empty"})).await;
    let e = c.until("error").await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["event_id"].as_str()), (Some("input_audio_buffer_commit_empty"), Some("empty")));
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_errors_and_conflicting_responses() {
    let (model, hark) = setup().await;
    let mut c = Client::connect(&hark.ws_url()).await;

    for (ev, code) in [
        (json!({"type": "conversation.item.retrieve", "event_id": "r", "item_id": "nope"}), "item_not_found"),
        (json!({"type": "conversation.item.delete", "event_id": "d", "item_id": "nope"}), "item_not_found"),
        (json!({"type": "conversation.item.create", "event_id": "p", "previous_item_id": "nope", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}}), "item_not_found"),
        (json!({"type": "conversation.item.create", "event_id": "i", "item": {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/cat.png"}]}}), "invalid_image"),
        (json!({"type": "conversation.item.create", "event_id": "f", "item": {"type": "function_call_output", "output": "x"}}), "missing_required_parameter"),
    ] {
        let id = ev["event_id"].clone();
        let e = expect_error(&mut c, text(ev.to_string())).await;
        assert_eq!(e["error"]["code"], code, "{e}");
        assert_eq!(e["error"]["event_id"], id);
    }

    // Create, retrieve, delete a real item; a valid PNG data URL is accepted.
    let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    c.send(json!({"type": "conversation.item.create", "item": {"id": "img1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is this"}, {"type": "input_image", "image_url": png}]}})).await;
    let added = c.until("conversation.item.added").await;
    assert_eq!(added["item"]["id"], "img1");
    c.send(json!({"type": "conversation.item.retrieve", "item_id": "img1"})).await;
    assert_eq!(c.until("conversation.item.retrieved").await["item"]["content"][1]["type"], "input_image");

    // Two response.create in a row: the second is refused, the first completes.
    model.push(Reply::StreamThenHang { chunks: vec![json!({"choices": [{"index": 0, "delta": {"content": "x"}}]})] });
    c.send(json!({"type": "response.create"})).await;
    c.until("response.created").await;
    // The scripted reply goes to the first request: cancel only once it has arrived.
    model.wait_requests(1).await;
    c.send(json!({"type": "response.create", "event_id": "second"})).await;
    let e = c.until("error").await;
    assert_eq!((e["error"]["code"].as_str(), e["error"]["event_id"].as_str()), (Some("conversation_already_has_active_response"), Some("second")));
    c.send(json!({"type": "response.cancel"})).await;
    assert_eq!(c.until("response.done").await["response"]["status"], "cancelled");

    // The image went to the model as an image_url part.
    c.send(json!({"type": "response.create"})).await;
    c.until("response.done").await;
    let req = model.wait_requests(2).await;
    let user = &req[1]["messages"][1];
    assert_eq!(user["content"][1]["type"], "image_url");
    assert_eq!(user["content"][1]["image_url"]["url"], png);

    c.send(json!({"type": "conversation.item.delete", "item_id": "img1"})).await;
    assert_eq!(c.until("conversation.item.deleted").await["item_id"], "img1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_enforced_when_configured() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.api_keys = vec!["sekrit".into()];
    let hark = Hark::start(cfg).await;
    let refused = tokio_tungstenite::connect_async(hark.ws_url()).await;
    assert!(refused.is_err(), "connection without a key must be refused");
    let _c = Client::connect_with(&hark.ws_url(), &[("authorization", "Bearer sekrit")]).await;
    // Browsers use subprotocols; hark answers with `realtime`.
    let _b = Client::connect_with(&hark.ws_url(), &[("sec-websocket-protocol", "realtime, openai-insecure-api-key.sekrit")]).await;
}
