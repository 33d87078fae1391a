//! Tool calls through a whole session: validated, run with limits, and answered
//! exactly once whatever happens around them. Each test drives a real `Session`
//! (the one every transport uses) and asserts on the conversation it ends with.
//!
//! The model is the scripted OpenAI-compatible server on loopback (a real HTTP
//! client, real SSE) — or, for the embedded backend's grammar, a backend that replays
//! the events the embedded Gemma 4 parser produces for a literal tool-call token
//! sequence: random-weight checkpoints never choose to call tools, so that sequence
//! stands in for what a real 12B would write.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hark::model::{Backend, BackendEvent, ChatMessage, FinishReason, GenerateRequest};
use hark::protocol::{parse_client_event, to_wire, Dialect, ServerEvent};
use hark::session::{Conversation, Session, SessionDeps, SessionInput};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOOLS: &[(&str, &str)] = &[
    (
        "echo.yaml",
        "name: echo\ndescription: Says the text back.\nparameters: {type: object, properties: {text: {type: string}}, required: [text]}\nhandler: {kind: command, argv: [/bin/echo, \"{text}\"]}\n",
    ),
    (
        "slow.yaml",
        "name: slow\ndescription: Sleeps.\nparameters: {type: object, properties: {seconds: {type: number}}, required: [seconds]}\nhandler: {kind: command, argv: [sleep, \"{seconds}\"]}\ntimeout_ms: 20000\ncancel_on_interruption: true\n",
    ),
    (
        "slow_keep.yaml",
        "name: slow_keep\ndescription: Sleeps, then says done; not cancelled by barge-in.\nparameters: {type: object, properties: {seconds: {type: number}}, required: [seconds]}\nhandler: {kind: command, argv: [python3, -c, \"import sys, time; time.sleep(float(sys.argv[1])); print('done')\", \"{seconds}\"]}\ntimeout_ms: 20000\ncancel_on_interruption: false\n",
    ),
    (
        "hang.yaml",
        "name: hang\ndescription: Never finishes.\nparameters: {type: object, properties: {}}\nhandler: {kind: command, argv: [sleep, \"60\"]}\ntimeout_ms: 300\n",
    ),
];

const AGENT: &str = "name: tester\ninstructions: You test tools.\ntools: [echo, slow, slow_keep, hang]\nmax_tool_rounds: 2\n";

struct Setup {
    _dir: tempfile::TempDir,
    state: hark::server::AppState,
}

async fn setup(model_url: &str, client_timeout_ms: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    let agents = dir.path().join("agents");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::create_dir_all(&agents).unwrap();
    for (name, text) in TOOLS {
        std::fs::write(tools.join(name), text).unwrap();
    }
    std::fs::write(agents.join("tester.yaml"), AGENT).unwrap();
    let mut cfg = test_config(model_url);
    cfg.tools_dir = tools;
    cfg.agents_dir = agents;
    cfg.session.agent = Some("tester".into());
    cfg.session.client_tool_timeout_ms = client_timeout_ms;
    // The energy detector makes a tone "speech" for the barge-in test.
    cfg.audio.vad = hark::config::VadKind::Energy;
    cfg.session.turn_detection = Some(hark::config::TurnDetectionConfig { create_response: false, ..Default::default() });
    let state = hark::server::AppState::from_config(cfg).await.expect("hark starts with the test tools");
    Setup { _dir: dir, state }
}

/// A session driven over its channels, as the WebSocket transport does.
struct Driven {
    input: Option<mpsc::Sender<SessionInput>>,
    out: mpsc::Receiver<ServerEvent>,
    task: tokio::task::JoinHandle<Conversation>,
}

impl Driven {
    fn start(deps: Arc<SessionDeps>) -> Driven {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(1024);
        let task = tokio::spawn(Session::new(deps, None).run(in_rx, out_tx, CancellationToken::new()));
        Driven { input: Some(in_tx), out: out_rx, task }
    }

    async fn send(&mut self, v: Value) {
        let env = parse_client_event(&v.to_string()).unwrap();
        self.input.as_ref().unwrap().send(SessionInput::Client(env)).await.unwrap();
    }

    async fn next(&mut self) -> Value {
        let ev = tokio::time::timeout(Duration::from_secs(20), self.out.recv()).await.expect("no event within 20 s").expect("session ended");
        serde_json::from_str(&to_wire(&ev, Dialect::Ga).unwrap()).unwrap()
    }

    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.next().await;
            let stop = pred(&v);
            seen.push(v);
            if stop {
                return seen;
            }
        }
    }

    async fn until_type(&mut self, ty: &str) -> Vec<Value> {
        self.until(|v| v["type"] == ty).await
    }

    /// The client leaves; returns the conversation the session ended with.
    async fn finish(mut self) -> Conversation {
        drop(self.input.take());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("session did not end").unwrap()
    }
}

/// The answer of `call_id` arriving: a hark-run call's `mcp_call` item done with its
/// output or error, or a `function_call_output` item for a client call.
fn is_output_for(v: &Value, call_id: &str) -> bool {
    v["type"] == "conversation.item.done"
        && v["item"]["call_id"] == call_id
        && (v["item"]["type"] == "function_call_output" || (v["item"]["type"] == "mcp_call" && (v["item"]["output"].is_string() || v["item"]["error"].is_object())))
}

/// The answer's text in such an event.
fn answer_text(v: &Value) -> String {
    let item = &v["item"];
    item["output"].as_str().or(item["error"]["message"].as_str()).unwrap_or_default().to_string()
}

/// Every call in the conversation, as the model reads it, has exactly one answer;
/// returns call id → the answer the model reads.
fn one_answer_per_call(conv: &Conversation) -> HashMap<String, String> {
    let mut calls = Vec::new();
    let mut answers: HashMap<String, Vec<String>> = HashMap::new();
    for m in conv.to_messages() {
        match m {
            ChatMessage::Assistant { tool_calls, .. } => calls.extend(tool_calls.into_iter().map(|c| c.call_id)),
            ChatMessage::Tool { call_id, output } => answers.entry(call_id).or_default().push(output),
            _ => {}
        }
    }
    for c in &calls {
        let n = answers.get(c).map_or(0, |a| a.len());
        assert_eq!(n, 1, "call {c} has {n} answers: {answers:?}");
    }
    assert_eq!(answers.len(), calls.len(), "answers without calls: {answers:?}");
    answers.into_iter().map(|(k, mut v)| (k, v.remove(0))).collect()
}

/// A streamed reply with several tool calls: (call_id, name, arguments).
fn calls_reply(calls: &[(&str, &str, &str)]) -> Reply {
    let mut chunks = vec![json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})];
    for (i, (id, name, args)) in calls.iter().enumerate() {
        chunks.push(json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": args}}]}}]}));
    }
    chunks.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}));
    Reply::Stream { chunks, gap: Duration::from_millis(5) }
}

async fn ask(d: &mut Driven, text: &str) {
    d.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})).await;
    d.send(json!({"type": "response.create"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_one_timing_out_are_each_answered_once_and_the_model_continues() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    model.push(calls_reply(&[("call_echo", "echo", r#"{"text": "; rm -rf / $(id)"}"#), ("call_hang", "hang", "{}")]));
    model.push(Reply::text("both answered"));
    let mut d = Driven::start(s.state.deps.clone());
    ask(&mut d, "run both").await;
    let events = d.until(|v| v["type"] == "response.done" && v["response"]["output"][0]["type"] == "message").await;
    // hark ran both tools: each is an mcp_call item, done with its answer, and the
    // first response ended only once both were in.
    let outputs: Vec<&Value> = events.iter().filter(|v| is_output_for(v, "call_echo") || is_output_for(v, "call_hang")).collect();
    assert_eq!(outputs.len(), 2, "{events:#?}");
    assert!(!events.iter().any(|v| v["item"]["type"] == "function_call" || v["item"]["type"] == "function_call_output"), "{events:#?}");
    let first_done = events.iter().find(|v| v["type"] == "response.done").unwrap();
    let calls = first_done["response"]["output"].as_array().unwrap();
    assert!(calls.iter().all(|c| c["type"] == "mcp_call" && c["server_label"] == "hark"), "{first_done}");
    assert!(calls[1]["error"]["message"].as_str().unwrap().contains("timed out"), "{first_done}");
    let done = events.last().unwrap();
    assert_eq!(done["response"]["status"], "completed");
    // The follow-up request carried both results.
    let requests = model.wait_requests(2).await;
    let tool_msgs: Vec<&Value> = requests[1]["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tool_msgs.len(), 2, "{}", requests[1]);
    let conv = d.finish().await;
    let answers = one_answer_per_call(&conv);
    // Shell metacharacters reached echo verbatim; the hung command timed out.
    assert!(answers["call_echo"].contains("; rm -rf / $(id)"), "{answers:?}");
    assert!(answers["call_hang"].contains("timed out") || answers["call_hang"].contains("timeout"), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_cancels_or_keeps_running_calls_per_tool() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    model.push(calls_reply(&[("call_slow", "slow", r#"{"seconds": 15}"#), ("call_keep", "slow_keep", r#"{"seconds": 0.6}"#)]));
    let mut d = Driven::start(s.state.deps.clone());
    ask(&mut d, "run them").await;
    // Both calls are running (the response waits for them) …
    d.until(|v| v["type"] == "response.mcp_call.in_progress" && v["output_index"] == 1).await;
    // … when the user speaks over them.
    for chunk in sine_pcm24(0.5, 440.0).chunks(960) {
        d.send(json!({"type": "input_audio_buffer.append", "audio": b64(chunk)})).await;
    }
    let events = d.until(|v| is_output_for(v, "call_slow")).await;
    assert!(events.iter().any(|v| v["type"] == "input_audio_buffer.speech_started"));
    let cancelled = answer_text(events.last().unwrap());
    assert!(cancelled.contains("cancelled by user"), "{cancelled}");
    let done = d.until_type("response.done").await;
    let done = &done.last().unwrap()["response"];
    assert_eq!((&done["status"], &done["status_details"]["reason"]), (&json!("cancelled"), &json!("turn_detected")));
    // The other tool runs on; its result joins the conversation for the next turn.
    let events = d.until(|v| is_output_for(v, "call_keep")).await;
    assert!(answer_text(events.last().unwrap()).contains("done"));
    assert!(!events.iter().any(|v| v["type"] == "response.created"), "no follow-up after a barge-in");
    let conv = d.finish().await;
    let answers = one_answer_per_call(&conv);
    assert_eq!(answers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_call_still_leaves_one_answer() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    model.push(calls_reply(&[("call_slow", "slow", r#"{"seconds": 30}"#)]));
    let mut d = Driven::start(s.state.deps.clone());
    ask(&mut d, "take your time").await;
    d.until_type("response.mcp_call.in_progress").await;
    let conv = d.finish().await;
    let answers = one_answer_per_call(&conv);
    // The session did not wait for the 30 s tool: its answer is the session's, not a result.
    assert!(!answers["call_slow"].contains("\"result\""), "the session waited for the tool: {answers:?}");
    assert!(answers["call_slow"].contains("session ended"), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_while_the_model_writes_calls_leaves_them_answered() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    // The model writes a hark call and a client call, then stalls mid-response.
    let chunks = vec![
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_echo", "type": "function", "function": {"name": "echo", "arguments": "{\"text\": \"hi\"}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_client", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}}]}),
    ];
    model.push(Reply::StreamThenHang { chunks });
    let mut d = Driven::start(s.state.deps.clone());
    d.send(json!({"type": "session.update", "session": {"type": "realtime", "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}})).await;
    ask(&mut d, "go").await;
    d.until(|v| v["type"] == "response.output_item.added" && v["item"]["name"] == "lookup").await;
    let answers = one_answer_per_call(&d.finish().await);
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(answers.values().all(|a| a.contains("session ended")), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_failing_after_a_call_loses_nothing() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    model.push(calls_reply(&[("call_echo", "echo", r#"{"text": "hi"}"#)]));
    model.push(Reply::Status(500, "model crashed".into()));
    let mut d = Driven::start(s.state.deps.clone());
    ask(&mut d, "echo hi").await;
    d.until_type("response.done").await;
    let events = d.until_type("response.done").await;
    assert_eq!(events.last().unwrap()["response"]["status"], "failed");
    // The session goes on: a new turn is answered.
    ask(&mut d, "again").await;
    let events = d.until_type("response.done").await;
    assert_eq!(events.last().unwrap()["response"]["status"], "completed");
    let answers = one_answer_per_call(&d.finish().await);
    assert_eq!(answers["call_echo"], r#"{"result":"hi"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_violations_and_unknown_tools_are_error_results() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    model.push(calls_reply(&[("call_bad", "echo", r#"{"txt": 3}"#), ("call_nope", "format_disk", "{}")]));
    model.push(Reply::text("sorry"));
    let mut d = Driven::start(s.state.deps.clone());
    ask(&mut d, "do odd things").await;
    d.until_type("response.done").await;
    let events = d.until_type("response.done").await;
    assert_eq!(events.last().unwrap()["response"]["status"], "completed", "the model continued");
    let answers = one_answer_per_call(&d.finish().await);
    assert!(answers["call_bad"].contains("error") && answers["call_bad"].contains("text"), "{answers:?}");
    assert!(answers["call_nope"].contains("no tool named"), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_declared_tools_are_awaited_answered_once_and_timed_out() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 400).await;
    model.push(calls_reply(&[("call_c1", "lookup", r#"{"q": "x"}"#)]));
    model.push(calls_reply(&[("call_c2", "lookup", r#"{"q": "y"}"#)]));
    let mut d = Driven::start(s.state.deps.clone());
    d.send(json!({"type": "session.update", "session": {"type": "realtime", "tools": [{"type": "function", "name": "lookup", "description": "client side", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]}})).await;
    ask(&mut d, "look it up").await;
    let events = d.until_type("response.done").await;
    assert!(!events.iter().any(|v| v["item"]["type"] == "function_call_output"), "hark must not answer a client tool");
    assert!(events.iter().any(|v| v["type"] == "response.output_item.done" && v["item"]["type"] == "function_call" && v["item"]["status"] == "completed"));
    // The client answers, once; a second answer is refused.
    let answer = json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_c1", "output": "{\"found\": true}"}});
    d.send(answer.clone()).await;
    d.until(|v| is_output_for(v, "call_c1")).await;
    d.send(answer).await;
    let err = d.until_type("error").await;
    assert_eq!(err.last().unwrap()["error"]["code"], "tool_output_duplicate");
    // A call the client never answers is answered for it when the deadline passes.
    d.send(json!({"type": "response.create"})).await;
    d.until_type("response.done").await;
    let events = d.until(|v| is_output_for(v, "call_c2")).await;
    assert!(answer_text(events.last().unwrap()).contains("timed out"));
    let answers = one_answer_per_call(&d.finish().await);
    assert_eq!(answers["call_c1"], "{\"found\": true}");
}

/// Replays what the embedded backend's parser makes of Gemma 4 tool-call text.
struct GrammarBackend {
    replies: Mutex<Vec<String>>,
    requests: Mutex<Vec<GenerateRequest>>,
}

impl Backend for GrammarBackend {
    fn name(&self) -> &str {
        "gemma4-grammar"
    }

    fn generate(&self, request: GenerateRequest, _cancel: CancellationToken) -> mpsc::Receiver<BackendEvent> {
        self.requests.lock().unwrap().push(request);
        let text = { let mut r = self.replies.lock().unwrap(); if r.is_empty() { "fine.".to_string() } else { r.remove(0) } };
        let events = hark::model::embedded::events_for_model_text(&text);
        let calls = events.iter().any(|e| matches!(e, BackendEvent::ToolCallStart { .. }));
        let (tx, rx) = mpsc::channel(events.len() + 1);
        for e in events {
            tx.try_send(e).unwrap();
        }
        let finish = if calls { FinishReason::ToolCalls } else { FinishReason::Stop };
        tx.try_send(BackendEvent::Done { finish, usage: None }).unwrap();
        rx
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_grammar_tool_calls_go_through_the_same_dispatch() {
    let s = setup("http://127.0.0.1:9/v1", 60_000).await;
    let backend = Arc::new(GrammarBackend {
        replies: Mutex::new(vec![
            r#"Let me check.<|tool_call>call:echo{text:<|"|>a } b, c: {d}<|"|>}<tool_call|><|tool_call>call:hang{}<tool_call|>"#.to_string(),
        ]),
        requests: Mutex::new(Vec::new()),
    });
    let deps = Arc::new(SessionDeps { backend: backend.clone(), streaming_prefill: false, ..(*s.state.deps).clone() });
    let mut d = Driven::start(deps);
    ask(&mut d, "echo it").await;
    let events = d.until(|v| v["type"] == "response.done" && v["response"]["output"][0]["type"] == "message" && v["response"]["output"].as_array().unwrap().len() == 1).await;
    let args: Vec<&Value> = events.iter().filter(|v| v["type"] == "response.mcp_call_arguments.done").collect();
    assert_eq!(args.len(), 2, "{events:#?}");
    let first = events.iter().find(|v| v["type"] == "response.output_item.added" && v["item"]["type"] == "mcp_call").unwrap();
    assert_eq!(first["item"]["name"], "echo");
    assert_eq!(serde_json::from_str::<Value>(args[0]["arguments"].as_str().unwrap()).unwrap(), json!({"text": "a } b, c: {d}"}));
    // The follow-up request carries the results; the declared tools reached the model.
    let requests = backend.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    assert!(requests[0].tools.iter().any(|t| t.name == "echo"));
    let answers = one_answer_per_call(&d.finish().await);
    assert_eq!(answers.len(), 2);
    assert!(answers.values().any(|a| a == r#"{"result":"a } b, c: {d}"}"#), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_pick_agents_and_unknown_ones_are_refused() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 60_000).await;
    let mut d = Driven::start(s.state.deps.clone());
    let created = d.until_type("session.created").await;
    let session = &created.last().unwrap()["session"];
    assert_eq!(session["instructions"], "You test tools.", "the config's default agent applies");
    d.send(json!({"type": "session.update", "event_id": "u1", "session": {"type": "realtime", "agent": "nobody"}})).await;
    let err = d.until_type("error").await;
    let err = &err.last().unwrap()["error"];
    assert_eq!((err["code"].as_str(), err["param"].as_str()), (Some("invalid_value"), Some("session.agent")), "{err}");
    // The session is unchanged and its agent's tools reach the model.
    ask(&mut d, "hello").await;
    d.until_type("response.done").await;
    let req = &model.wait_requests(1).await[0];
    let names: Vec<&str> = req["tools"].as_array().unwrap().iter().map(|t| t["function"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["echo", "slow", "slow_keep", "hang"]);
    assert!(req["messages"][0]["content"].as_str().unwrap().contains("You test tools."), "{req}");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_conversation_rolls_and_a_call_answered_at_the_limit_is_answered() {
    let model = ScriptedModel::start().await;
    let s = setup(&model.base_url(), 400).await;
    model.push(calls_reply(&[("call_full", "lookup", r#"{"q": "x"}"#)]));
    // The agent's mcp_list_tools item, then at most 5 more.
    let deps = Arc::new(SessionDeps { max_items: 6, ..(*s.state.deps).clone() });
    let mut d = Driven::start(deps);
    d.send(json!({"type": "session.update", "session": {"type": "realtime", "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}})).await;
    // Past the limit the oldest turns go, oldest first, a block at a time; nothing is refused.
    let mut seen = Vec::new();
    for i in 0..8 {
        d.send(json!({"type": "conversation.item.create", "item": {"id": format!("old{i}"), "type": "message", "role": "user", "content": [{"type": "input_text", "text": format!("turn {i}")}]}})).await;
        seen.extend(d.until(|v| v["type"] == "conversation.item.done" && v["item"]["id"] == format!("old{i}")).await);
    }
    assert!(!seen.iter().any(|v| v["type"] == "error"), "{seen:#?}");
    let deleted: Vec<&str> = seen.iter().filter(|v| v["type"] == "conversation.item.deleted").filter_map(|v| v["item_id"].as_str()).collect();
    let old: Vec<&str> = deleted.iter().copied().filter(|id| id.starts_with("old")).collect();
    assert!(old.len() >= 2 && old.windows(2).all(|w| w[0] < w[1]) && old[0] == "old0", "{deleted:?}");
    // Pinned items cannot be evicted: the conversation stays at its limit with them.
    for i in 0..5 {
        d.send(json!({"type": "conversation.item.create", "item": {"id": format!("pin{i}"), "pinned": true, "type": "message", "role": "user", "content": [{"type": "input_text", "text": format!("keep {i}")}]}})).await;
    }
    ask(&mut d, "look it up").await;
    let events = d.until_type("response.done").await;
    assert!(!events.iter().any(|v| v["type"] == "error"), "{events:#?}");
    // The call's answer (the client's deadline passing) enters though the window is full
    // of pinned items: the call is answered once, and the client's own late answer is
    // refused as a duplicate of that one.
    let answered = d.until(|v| is_output_for(v, "call_full")).await;
    assert!(answer_text(answered.last().unwrap()).contains("timed out"));
    d.send(json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_full", "output": "late"}})).await;
    let err = d.until_type("error").await;
    assert_eq!(err.last().unwrap()["error"]["code"], "tool_output_duplicate");
    let conv = d.finish().await;
    let answers = one_answer_per_call(&conv);
    assert!(answers["call_full"].contains("timed out"), "{answers:?}");
    let ids: Vec<String> = conv.items().iter().map(|i| i.id.clone()).collect();
    assert!(!ids.contains(&"old0".to_string()) && ids.contains(&"pin0".to_string()), "{ids:?}");
}
