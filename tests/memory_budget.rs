//! Memory bounded in bytes where data arrives: a session past its byte budget is
//! refused with a clear error and goes on; a long conversation rolls instead of
//! filling up; an oversized image is kept re-encoded; what sessions hold shows on
//! /metrics and returns to zero when they end. Real hark over a real WebSocket; the
//! model is the scripted OpenAI-compatible server (see `common`).

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{json, Value};

async fn session_bytes(http: &reqwest::Client, hark: &Hark) -> u64 {
    let text = http.get(format!("http://{}/metrics", hark.addr)).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("hark_session_bytes ")).unwrap_or_else(|| panic!("no hark_session_bytes in\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_past_its_byte_budget_is_refused_lives_on_and_gives_its_bytes_back() {
    let mut cfg = test_config("http://127.0.0.1:9/v1");
    cfg.session.turn_detection = None;
    cfg.session.limits.max_session_bytes = 2 << 20;
    let hark = Hark::start(cfg).await;
    hark::tls::init();
    let http = reqwest::Client::new();
    assert_eq!(session_bytes(&http, &hark).await, 0);
    let mut c = Client::connect(&hark.ws_url()).await;
    // 5 s of 24 kHz audio per append: 160 KB once kept as 16-bit at 16 kHz.
    let chunk = b64(&sine_pcm24(5.0, 220.0));
    let mut refused = None;
    for i in 0..40 {
        c.send(json!({"type": "input_audio_buffer.append", "event_id": format!("a{i}"), "audio": chunk})).await;
        // A clear round trip after each append: its error (if any) arrives first.
        c.send(json!({"type": "conversation.item.retrieve", "event_id": format!("r{i}"), "item_id": "none"})).await;
        let ev = c.until("error").await;
        if ev["error"]["event_id"] == format!("a{i}") {
            refused = Some((i, ev));
            break;
        }
        assert_eq!(ev["error"]["code"], "item_not_found", "{ev}");
    }
    let (n, err) = refused.expect("appends past the budget are refused");
    // 2 MiB hold 13 such appends (16-bit); as f32 it would have been 6.
    assert!(n >= 12, "refused after {n} appends: {err}");
    assert_eq!(err["error"]["code"], "session_memory_exceeded", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("max_session_bytes"), "{err}");
    assert_eq!(c.until("error").await["error"]["event_id"], format!("r{n}"));
    let held = session_bytes(&http, &hark).await;
    assert!(held > 1 << 20 && held <= 2 << 20, "held {held}");
    // The session lives on: a small append fits, and the commit keeps all it had.
    c.send(json!({"type": "input_audio_buffer.append", "event_id": "small", "audio": b64(&sine_pcm24(0.2, 220.0))})).await;
    c.send(json!({"type": "input_audio_buffer.commit", "event_id": "commit"})).await;
    let events = c.collect_until("input_audio_buffer.committed").await;
    assert!(!events.iter().any(|v| v["type"] == "error"), "{events:#?}");
    c.assert_alive().await;
    // Closed: every byte goes back.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = session_bytes(&http, &hark).await;
        if now == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{now} bytes still held after the session ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_past_its_item_limit_rolls_and_keeps_answering() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.session.turn_detection = None;
    cfg.session.limits.max_items = 10;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    let mut deleted = Vec::new();
    for i in 0..30 {
        for (role, kind) in [("user", "input_text"), ("assistant", "output_text")] {
            let id = format!("{}{i:02}", &role[..1]);
            c.send(json!({"type": "conversation.item.create", "item": {"id": id, "type": "message", "role": role, "content": [{"type": kind, "text": format!("{role} {i}")}]}})).await;
            for v in c.collect_until("conversation.item.done").await {
                assert_ne!(v["type"], "error", "{v}");
                if v["type"] == "conversation.item.deleted" {
                    deleted.push(v["item_id"].as_str().unwrap().to_string());
                }
            }
        }
    }
    // Whole turns went, oldest first: each user message with the reply after it.
    assert!(deleted.len() >= 40, "{deleted:?}");
    for (k, pair) in deleted.chunks(2).enumerate() {
        assert_eq!(pair, [format!("u{k:02}"), format!("a{k:02}")], "{deleted:?}");
    }
    model.push(Reply::text("still here"));
    c.send(json!({"type": "response.create"})).await;
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let req = &model.wait_requests(1).await[0];
    let messages = req["messages"].as_array().unwrap();
    let texts: Vec<String> = messages.iter().map(|m| m["content"].to_string()).collect();
    assert!(messages.len() <= 11, "{req}");
    assert!(texts.iter().any(|t| t.contains("assistant 29")) && !texts.iter().any(|t| t.contains("user 0\"")), "{texts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_over_its_budget_is_kept_re_encoded() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.session.turn_detection = None;
    cfg.session.limits.max_image_bytes = 512 * 1024;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    // Noise compresses badly: a 1600×1200 PNG of it is megabytes.
    let mut seed = 7u32;
    let img = image::RgbImage::from_fn(1600, 1200, |_, _| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        image::Rgb([(seed >> 24) as u8, (seed >> 16) as u8, (seed >> 8) as u8])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    assert!(url.len() > 4 << 20);
    c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": url}]}})).await;
    let events = c.collect_until("conversation.item.done").await;
    assert!(!events.iter().any(|v| v["type"] == "error"), "{events:#?}");
    model.push(Reply::text("noise"));
    c.send(json!({"type": "response.create"})).await;
    c.until("response.done").await;
    let req = &model.wait_requests(1).await[0];
    let sent: &Value = req["messages"].as_array().unwrap().iter().find_map(|m| m["content"].as_array()?.iter().find(|p| p["type"] == "image_url")).expect("the image reaches the model");
    let kept = sent["image_url"]["url"].as_str().unwrap();
    assert!(kept.starts_with("data:image/jpeg;base64,") && kept.len() <= 512 * 1024, "{} bytes", kept.len());
    let bytes = base64::engine::general_purpose::STANDARD.decode(&kept["data:image/jpeg;base64,".len()..]).unwrap();
    let back = image::load_from_memory(&bytes).unwrap();
    assert!((back.width() as f64 / back.height() as f64 - 4.0 / 3.0).abs() < 0.01);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_cut_off_while_another_session_gets_its_answer() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.session.turn_detection = None;
    cfg.session.limits.max_session_bytes = 2 << 20;
    cfg.server.client_read_timeout_ms = 2000;
    let hark = Hark::start(cfg).await;
    // The flooder appends a second of audio at a time as fast as it can; it reads what
    // comes back (a fast sender, not a slow reader).
    let (ws, _) = tokio_tungstenite::connect_async(hark.ws_url()).await.unwrap();
    let (mut flood_tx, mut flood_rx) = futures_util::StreamExt::split(ws);
    let reader = tokio::spawn(async move {
        let (mut code, mut errors) = (None, Vec::new());
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(30), futures_util::StreamExt::next(&mut flood_rx)).await {
            match msg {
                Ok(Message::Close(frame)) => {
                    code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "error" {
                        errors.push(v["error"]["code"].as_str().unwrap_or("").to_string());
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (code, errors)
    });
    let chunk = json!({"type": "input_audio_buffer.append", "audio": b64(&sine_pcm24(1.0, 300.0))}).to_string();
    let flooder = tokio::spawn(async move {
        let mut sent = 0u32;
        // Until hark stops taking them.
        while sent < 100_000 {
            match tokio::time::timeout(Duration::from_secs(5), flood_tx.send(Message::text(chunk.clone()))).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        sent
    });
    // Meanwhile another session asks and is answered.
    let mut calm = Client::connect(&hark.ws_url()).await;
    model.push(Reply::text("answered"));
    calm.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}})).await;
    calm.send(json!({"type": "response.create"})).await;
    let done = calm.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    // hark closed the flooder with a policy close (1008), after errors that say why.
    let (code, errors) = reader.await.unwrap();
    let sent = flooder.await.unwrap();
    assert_eq!(code, Some(1008), "the flooder ({sent} appends) was not closed for flooding; errors seen: {errors:?}");
    assert!(errors.iter().filter(|c| *c == "session_memory_exceeded").count() > 10, "{errors:?}");
    calm.assert_alive().await;
}
