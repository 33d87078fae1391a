//! Realtime protocol details that clients depend on: per-response tools, responses
//! mixing hark-run and client calls, truncation, speech cut by a clear, message size
//! limits, and every call answered when the client leaves mid-response. Real
//! WebSocket clients against an in-process hark; the model server is scripted (see
//! `common`), since random weights never call tools.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn user_text(text: &str) -> Value {
    json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
}

fn lookup_tool() -> Value {
    json!({"type": "function", "name": "lookup", "description": "client side", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}})
}

/// Tool calls streamed by the scripted model: (call_id, name, arguments).
fn calls(calls: &[(&str, &str, &str)]) -> Reply {
    let mut chunks = vec![json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})];
    for (i, (id, name, args)) in calls.iter().enumerate() {
        chunks.push(json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": args}}]}}]}));
    }
    chunks.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
    Reply::Stream { chunks, gap: Duration::from_millis(5) }
}

/// hark whose default agent runs the builtin calculator.
async fn hark_with_calculator(model: &ScriptedModel) -> (Hark, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&model.base_url());
    with_calculator_agent(&mut cfg, dir.path(), "calc");
    (Hark::start(cfg).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_of_one_response_are_offered_and_awaited_from_the_client() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    model.push(calls(&[("call_r1", "lookup", r#"{"q": "x"}"#)]));
    model.push(Reply::text("found it"));
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(user_text("look it up")).await;
    c.send(json!({"type": "response.create", "response": {"tools": [lookup_tool()]}})).await;
    let events = c.collect_until("response.done").await;
    // Offered to the model …
    let requests = model.wait_requests(1).await;
    assert!(requests[0]["tools"].as_array().unwrap().iter().any(|t| t["function"]["name"] == "lookup"), "{}", requests[0]);
    // … and the call is the client's: a function_call item, not answered by hark.
    let call = events.iter().find(|v| v["type"] == "response.output_item.done").unwrap();
    assert_eq!((&call["item"]["type"], &call["item"]["status"]), (&json!("function_call"), &json!("completed")));
    // The client's answer is accepted (once) and the model continues with it.
    c.send(json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_r1", "output": "{\"hit\": 1}"}})).await;
    c.until("conversation.item.done").await;
    c.send(json!({"type": "response.create"})).await;
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed");
    assert!(!c.seen.iter().any(|v| v["type"] == "error"), "{:#?}", c.seen);
    let requests = model.wait_requests(2).await;
    let tool = requests[1]["messages"].as_array().unwrap().iter().find(|m| m["role"] == "tool").unwrap();
    assert_eq!(tool["content"], "{\"hit\": 1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_hark_and_client_calls_continues_when_the_client_asks() {
    let model = ScriptedModel::start().await;
    let (hark, _dir) = hark_with_calculator(&model).await;
    model.push(calls(&[("call_calc", "calculator", r#"{"expression": "2+2"}"#), ("call_look", "lookup", r#"{"q": "y"}"#)]));
    model.push(Reply::text("both in"));
    let mut c = Client::connect(&hark.ws_url()).await;
    // The agent's tools are announced as an mcp_list_tools item.
    let listed = c.until("mcp_list_tools.completed").await;
    let item = c.until("conversation.item.done").await;
    assert_eq!((&item["item"]["id"], &item["item"]["type"]), (&listed["item_id"], &json!("mcp_list_tools")));
    assert_eq!(item["item"]["tools"][0]["name"], "calculator");
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "tools": [lookup_tool()]}})).await;
    c.send(user_text("add and look")).await;
    c.send(json!({"type": "response.create"})).await;
    let events = c.collect_until("response.done").await;
    // hark's call finished inside the response, as an mcp_call with its output.
    let done = events.last().unwrap();
    let output = done["response"]["output"].as_array().unwrap();
    assert_eq!((&output[0]["type"], &output[0]["output"]), (&json!("mcp_call"), &json!("4")), "{done}");
    assert_eq!((&output[1]["type"], &output[1]["status"]), (&json!("function_call"), &json!("completed")));
    // hark does not continue on its own: the client's call is still open.
    c.send(json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_look", "output": "\"y found\""}})).await;
    c.until("conversation.item.done").await;
    assert_eq!(model.requests().len(), 1, "hark continued before the client answered");
    c.send(json!({"type": "response.create"})).await;
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed");
    assert!(!c.seen.iter().any(|v| v["type"] == "error"), "{:#?}", c.seen);
    let requests = model.wait_requests(2).await;
    let tools: Vec<&Value> = requests[1]["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tools.len(), 2, "{}", requests[1]);
    assert_eq!(tools[0]["content"], "{\"result\":4}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_asked_for_before_the_tool_output_waits_for_it() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    model.push(calls(&[("call_w", "lookup", r#"{"q": "z"}"#)]));
    model.push(Reply::text("thanks"));
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "tools": [lookup_tool()]}})).await;
    c.send(user_text("look")).await;
    c.send(json!({"type": "response.create"})).await;
    c.until("response.done").await;
    // The JS agents SDK asks for the next response first, then sends its output.
    c.send(json!({"type": "response.create"})).await;
    c.send(json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_w", "output": "\"z found\""}})).await;
    let events = c.collect_until("response.done").await;
    let added = events.iter().position(|v| v["type"] == "conversation.item.added" && v["item"]["type"] == "function_call_output").unwrap();
    let created = events.iter().position(|v| v["type"] == "response.created").unwrap();
    assert!(added < created, "the response started before the output it needs: {events:#?}");
    assert!(!events.iter().any(|v| v["type"] == "error"), "{events:#?}");
    let requests = model.wait_requests(2).await;
    assert!(requests[1]["messages"].as_array().unwrap().iter().any(|m| m["role"] == "tool" && m["content"] == "\"z found\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_removes_what_was_not_heard_from_the_context() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    model.push(Reply::text("a long answer nobody heard"));
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(user_text("talk")).await;
    c.send(json!({"type": "response.create"})).await;
    let done = c.until("response.done").await;
    let item_id = done["response"]["output"][0]["id"].as_str().unwrap().to_string();
    // Bad truncations name their field and change nothing.
    for (bad, param) in [
        (json!({"item_id": "nope", "content_index": 0, "audio_end_ms": 0}), "item_id"),
        (json!({"item_id": item_id, "content_index": 3, "audio_end_ms": 0}), "content_index"),
        (json!({"item_id": item_id, "content_index": 0, "audio_end_ms": 1500}), "audio_end_ms"),
    ] {
        let mut ev = bad.clone();
        ev["type"] = json!("conversation.item.truncate");
        c.send(ev).await;
        let err = c.until("error").await;
        assert_eq!(err["error"]["param"], param, "{err}");
    }
    // hark has not spoken the item: nothing of it was heard.
    c.send(json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": 0})).await;
    let t = c.until("conversation.item.truncated").await;
    assert_eq!((&t["item_id"], &t["audio_end_ms"]), (&json!(item_id), &json!(0)));
    c.send(json!({"type": "conversation.item.retrieve", "item_id": item_id})).await;
    let item = c.until("conversation.item.retrieved").await;
    assert_eq!(item["item"]["content"][0]["text"], "");
    c.send(user_text("again")).await;
    c.send(json!({"type": "response.create"})).await;
    c.until("response.done").await;
    let requests = model.wait_requests(2).await;
    assert!(!requests[1].to_string().contains("nobody heard"), "the cut text reached the model: {}", requests[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_mid_speech_ends_the_speech_and_starts_afresh() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.audio.vad = hark::config::VadKind::Energy;
    cfg.session.turn_detection = Some(hark::config::TurnDetectionConfig { create_response: false, ..Default::default() });
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    let tone = sine_pcm24(0.6, 440.0);
    c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&tone)})).await;
    let started = c.until("input_audio_buffer.speech_started").await;
    c.send(json!({"type": "input_audio_buffer.clear"})).await;
    let events = c.collect_until("input_audio_buffer.cleared").await;
    let stopped = events.iter().find(|v| v["type"] == "input_audio_buffer.speech_stopped").expect("the open speech ends");
    assert_eq!(stopped["item_id"], started["item_id"]);
    assert!(!events.iter().any(|v| v["type"] == "input_audio_buffer.committed"), "a cleared turn is not committed");
    // The detector starts afresh: new speech is a new turn.
    c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&vec![0u8; 24_000])})).await;
    c.send(json!({"type": "input_audio_buffer.append", "audio": b64(&tone)})).await;
    let again = c.until("input_audio_buffer.speech_started").await;
    assert_ne!(again["item_id"], started["item_id"]);
    assert!(again["audio_start_ms"].as_u64().unwrap() >= 900, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_closes_with_1009() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.max_message_bytes = 64 * 1024;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    let big = json!({"type": "input_audio_buffer.append", "audio": "A".repeat(100 * 1024)}).to_string();
    c.send_raw(Message::text(big)).await;
    assert_eq!(c.closed().await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_have_their_own_conversation() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&hark.ws_url()).await;
        c.send(json!({"type": "response.create"})).await;
        let done = c.until("response.done").await;
        ids.push(done["response"]["conversation_id"].as_str().unwrap().to_string());
    }
    assert_ne!(ids[0], ids[1]);
    assert!(ids.iter().all(|i| i.starts_with("conv_")), "{ids:?}");
}

/// A client that stops reading is cut off (close 1008) instead of holding its session
/// and its response forever; another session is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.client_read_timeout_ms = 300;
    let hark = Hark::start(cfg).await;
    // Far more text than the socket buffers hold.
    let word = "x".repeat(4000);
    let chunks = (0..4000).map(|_| json!({"choices": [{"index": 0, "delta": {"content": word}}]})).collect();
    model.push(Reply::Stream { chunks, gap: Duration::ZERO });
    let mut stalled = Client::connect(&hark.ws_url()).await;
    stalled.send(json!({"type": "response.create"})).await;
    model.wait_requests(1).await;
    // Meanwhile another client is served.
    let mut other = Client::connect(&hark.ws_url()).await;
    other.send(json!({"type": "response.create"})).await;
    let done = other.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed");
    // The stalled client is dropped by hark without ever reading.
    hark::tls::init();
    let http = reqwest::Client::new();
    let metrics_url = format!("http://{}/metrics", hark.addr);
    let cut_off = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let text = http.get(&metrics_url).send().await.unwrap().text().await.unwrap();
            if text.contains(r#"hark_errors_total{code="client_too_slow"} 1"#) && text.contains("hark_sessions_active 1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(cut_off.is_ok(), "the stalled session was never closed");
    other.assert_alive().await;
    drop(stalled);
}
