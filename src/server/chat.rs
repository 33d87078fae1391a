//! `POST /v1/chat/completions`: OpenAI's chat API in front of the same backend the
//! Realtime sessions use, so tools built for OpenAI (the openai SDKs, LangChain, …)
//! work by changing `base_url`.
//!
//! A request becomes one [`GenerateRequest`]: system and developer messages become the
//! instructions, user parts become text, images (data URLs) and 16 kHz audio
//! (`input_audio` WAV or pcm16, or an `audio_url` data URL), assistant tool calls and
//! tool results pass through. The backend's events come back as one completion or as
//! SSE chunks. A client that goes away cancels the generation.
//!
//! Not honoured, and refused rather than ignored where it would change the answer:
//! `n` > 1, `response_format` other than `text`, `logprobs`. `temperature`, `top_p` and
//! `seed` reach the embedded sampler (or the remote server); `stop` is applied by hark
//! to the streamed text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::metrics::{CodeLabel, EndpointLabel, Metrics};
use crate::media::clip::decode_clip;
use crate::model::{BackendEvent, ChatMessage, FinishReason, GenerateRequest, ToolCall, ToolSpec, UserPart};
use crate::protocol::new_id;

/// Largest number of messages in one request.
const MAX_MESSAGES: usize = 4096;
/// Largest number of stop sequences (OpenAI's limit).
const MAX_STOP: usize = 4;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Vec<ToolIn>>,
    pub tool_choice: Option<Value>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub response_format: Option<Value>,
    pub logprobs: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<Content>,
    pub tool_calls: Option<Vec<ToolCallIn>>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: String,
    pub function: ToolCallFunction,
}

#[derive(Debug, Deserialize)]
pub struct ToolCallFunction {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// An error in OpenAI's shape with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn invalid(code: &'static str, message: impl Into<String>, param: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, kind: "invalid_request_error", code, message: message.into(), param: Some(param.into()) }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

pub async fn completions(State(st): State<AppState>, body: Result<Json<ChatRequest>, JsonRejection>) -> Response {
    st.metrics.requests_total.get_or_create(&EndpointLabel { endpoint: "chat.completions".into() }).inc();
    let req = match body {
        Ok(Json(r)) => r,
        Err(rejection) => {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_request" };
            let message = rejection.body_text();
            st.metrics.errors_total.get_or_create(&CodeLabel { code: code.into() }).inc();
            return ApiError { status, kind: "invalid_request_error", code, message, param: None }.into_response();
        }
    };
    match prepare(&st, req) {
        Ok(prepared) => run(st, prepared).await,
        Err(e) => {
            st.metrics.errors_total.get_or_create(&CodeLabel { code: e.code.into() }).inc();
            e.into_response()
        }
    }
}

/// What a validated request asks of the backend.
struct Prepared {
    model: String,
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
}

fn prepare(st: &AppState, req: ChatRequest) -> Result<Prepared, ApiError> {
    let defaults = &st.deps.defaults;
    let agent = st.deps.agents.get(&req.model);
    if req.model != defaults.model && req.model != st.deps.backend.name() && agent.is_none() {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: "model_not_found",
            message: format!("The model '{}' does not exist. GET /v1/models lists the models hark serves.", req.model),
            param: Some("model".into()),
        });
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("unsupported_parameter", "Only n = 1 is supported.", "n"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("unsupported_parameter", "logprobs are not supported.", "logprobs"));
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                "unsupported_parameter",
                "response_format other than text is not supported: hark's backends cannot constrain output to JSON.",
                "response_format",
            ));
        }
    }
    if req.messages.is_empty() || req.messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid("invalid_value", format!("messages must hold 1 to {MAX_MESSAGES} messages."), "messages"));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("invalid_value", format!("stop takes 1 to {MAX_STOP} non-empty strings."), "stop"));
    }
    let mut instructions = Vec::new();
    let mut messages = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let param = |f: &str| format!("messages[{i}].{f}");
        match m.role.as_str() {
            "system" | "developer" => {
                let text = text_of(m.content.as_ref(), &param("content"))?;
                if messages.is_empty() {
                    instructions.push(text);
                } else {
                    messages.push(ChatMessage::System(text));
                }
            }
            "user" => messages.push(ChatMessage::User(user_parts(m.content, &param("content"))?)),
            "assistant" => {
                let text = match &m.content {
                    None => String::new(),
                    Some(_) => text_of(m.content.as_ref(), &param("content"))?,
                };
                let tool_calls = m
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| ToolCall { call_id: c.id, name: c.function.name, arguments: c.function.arguments })
                    .collect();
                messages.push(ChatMessage::Assistant { text, tool_calls });
            }
            "tool" => {
                let call_id = m.tool_call_id.ok_or_else(|| ApiError::invalid("missing_required_parameter", "A tool message needs tool_call_id.", param("tool_call_id")))?;
                messages.push(ChatMessage::Tool { call_id, output: text_of(m.content.as_ref(), &param("content"))? });
            }
            other => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    format!("Invalid role '{other}': use system, developer, user, assistant or tool."),
                    param("role"),
                ))
            }
        }
    }
    let tools = req
        .tools
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if t.kind != "function" {
                return Err(ApiError::invalid("invalid_value", format!("Tool type '{}' is not supported; use function.", t.kind), format!("tools[{i}].type")));
            }
            Ok(ToolSpec {
                name: t.function.name,
                description: t.function.description,
                parameters: t.function.parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // An agent's instructions stand in when the request brings none.
    if instructions.is_empty() {
        if let Some(a) = agent {
            instructions.push(a.instructions.clone());
        }
    }
    let request = GenerateRequest {
        instructions: instructions.join("\n\n"),
        messages,
        tools,
        tool_choice: req.tool_choice,
        max_output_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p.filter(|p| *p > 0.0 && *p < 1.0),
        seed: req.seed.map(|s| s as u64),
        ..Default::default()
    };
    Ok(Prepared {
        model: req.model,
        request,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        stop,
    })
}

/// The text of a system/assistant/tool message: a string, or text parts joined.
fn text_of(content: Option<&Content>, param: &str) -> Result<String, ApiError> {
    match content {
        None => Err(ApiError::invalid("missing_required_parameter", "The message needs content.", param)),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(ApiError::invalid("invalid_value", "Only text parts are allowed here.", format!("{param}[{i}]"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join("")),
    }
}

fn user_parts(content: Option<Content>, param: &str) -> Result<Vec<UserPart>, ApiError> {
    let parts = match content {
        None => return Err(ApiError::invalid("missing_required_parameter", "The message needs content.", param)),
        Some(Content::Text(t)) => return Ok(vec![UserPart::Text(t)]),
        Some(Content::Parts(p)) => p,
    };
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let at = |f: &str| format!("{param}[{i}].{f}");
        let bad = |f: &str, msg: String| ApiError::invalid("invalid_value", msg, at(f));
        match p.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => out.push(UserPart::Text(p.get("text").and_then(Value::as_str).ok_or_else(|| bad("text", "A text part needs text.".into()))?.to_string())),
            "image_url" => {
                let url = p.pointer("/image_url/url").and_then(Value::as_str).ok_or_else(|| bad("image_url", "An image_url part needs image_url.url.".into()))?;
                if !url.starts_with("data:image/") {
                    return Err(bad("image_url.url", "Images must be data: URLs (data:image/png;base64,…); hark fetches no URLs.".into()));
                }
                out.push(UserPart::Image(Arc::new(url.to_string())));
            }
            "input_audio" => {
                let data = p.pointer("/input_audio/data").and_then(Value::as_str).ok_or_else(|| bad("input_audio.data", "An input_audio part needs input_audio.data (base64).".into()))?;
                let format = p.pointer("/input_audio/format").and_then(Value::as_str).unwrap_or("wav");
                out.push(UserPart::Audio(Arc::new(audio(data, format).map_err(|m| bad("input_audio", m))?)));
            }
            "audio_url" => {
                let url = p.pointer("/audio_url/url").and_then(Value::as_str).ok_or_else(|| bad("audio_url.url", "An audio_url part needs audio_url.url.".into()))?;
                let (meta, data) = url
                    .strip_prefix("data:")
                    .and_then(|r| r.split_once(','))
                    .ok_or_else(|| bad("audio_url.url", "Audio must be a data: URL (data:audio/wav;base64,…).".into()))?;
                let format = if meta.contains("wav") { "wav" } else { meta.trim_start_matches("audio/").trim_end_matches(";base64") };
                out.push(UserPart::Audio(Arc::new(audio(data, format).map_err(|m| bad("audio_url", m))?)));
            }
            other => return Err(bad("type", format!("Content part type '{other}' is not supported: use text, image_url, input_audio or audio_url."))),
        }
    }
    Ok(out)
}

fn audio(b64: &str, format: &str) -> Result<Vec<i16>, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("audio is not valid base64: {e}"))?;
    decode_clip(&bytes, format).map(|s| crate::media::pcm::to_pcm16(&s)).map_err(|e| e.to_string())
}

/// Runs the request; cancels the backend's work if the client goes away (the future
/// or the stream is dropped with the guard).
async fn run(st: AppState, p: Prepared) -> Response {
    let cancel = CancellationToken::new();
    let guard = cancel.clone().drop_guard();
    let events = st.deps.backend.generate(p.request, cancel.clone());
    let id = new_id("chatcmpl");
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut acc = Accumulator::new(p.stop);
    if !p.stream {
        let mut events = events;
        let mut result = None;
        while let Some(ev) = events.recv().await {
            if let Some(end) = acc.feed(ev, &cancel, &mut |_| {}) {
                result = Some(end);
                break;
            }
        }
        drop(guard);
        return match result.unwrap_or(End::Failed("the backend stopped without finishing".into())) {
            End::Failed(message) => {
                ApiError { status: StatusCode::BAD_GATEWAY, kind: "server_error", code: "backend_error", message, param: None }.into_response()
            }
            End::Done { finish, usage } => {
                count_usage(&st.metrics, &usage);
                let mut message = json!({"role": "assistant", "content": acc.text});
                if !acc.calls.is_empty() {
                    message["tool_calls"] = Value::Array(acc.calls.iter().map(CallOut::to_json).collect());
                    if acc.text.is_empty() {
                        message["content"] = Value::Null;
                    }
                }
                Json(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": p.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
                    "usage": usage,
                }))
                .into_response()
            }
        };
    }
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let chunk = {
        let (id, model) = (id.clone(), p.model.clone());
        move |delta: Value, finish: Option<&str>| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
        }
    };
    let _ = tx.send(sse(&chunk(json!({"role": "assistant", "content": ""}), None)));
    let include_usage = p.include_usage;
    let metrics = st.metrics.clone();
    let (id2, model2) = (id.clone(), p.model.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let mut events = events;
        let mut end = None;
        while let Some(ev) = events.recv().await {
            let mut emit = |delta: Value| {
                let _ = tx.send(sse(&chunk(delta, None)));
            };
            if let Some(e) = acc.feed(ev, &cancel, &mut emit) {
                end = Some(e);
                break;
            }
            if tx.is_closed() {
                return; // the client left: the guard cancels the backend
            }
        }
        match end.unwrap_or(End::Failed("the backend stopped without finishing".into())) {
            End::Failed(message) => {
                let _ = tx.send(sse(&json!({"error": {"message": message, "type": "server_error", "param": null, "code": "backend_error"}})));
            }
            End::Done { finish, usage } => {
                count_usage(&metrics, &usage);
                let _ = tx.send(sse(&chunk(json!({}), Some(finish))));
                if include_usage {
                    let _ = tx.send(sse(&json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2, "choices": [], "usage": usage})));
                }
            }
        }
        let _ = tx.send("data: [DONE]\n\n".to_string());
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (Ok::<_, Infallible>(s), rx)) });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn count_usage(m: &Metrics, usage: &Value) {
    let n = |k: &str| usage.pointer(k).and_then(Value::as_u64).unwrap_or(0);
    m.count_usage(n("/prompt_tokens"), n("/completion_tokens"), n("/prompt_tokens_details/cached_tokens"));
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

enum End {
    Done { finish: &'static str, usage: Value },
    Failed(String),
}

struct CallOut {
    /// The backend's index for the call, which its argument deltas name.
    backend_index: usize,
    id: String,
    name: String,
    arguments: String,
}

impl CallOut {
    fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// Collects the answer and turns backend events into chunk deltas. Stop sequences are
/// applied here: text is held back while it could be the start of one.
struct Accumulator {
    text: String,
    /// Text not yet emitted (a possible stop-sequence prefix).
    held: String,
    stop: Vec<String>,
    stopped: bool,
    calls: Vec<CallOut>,
}

impl Accumulator {
    fn new(stop: Vec<String>) -> Self {
        Self { text: String::new(), held: String::new(), stop, stopped: false, calls: Vec::new() }
    }

    /// Feeds one event; emits deltas; returns how the completion ended once it has.
    fn feed(&mut self, ev: BackendEvent, cancel: &CancellationToken, emit: &mut dyn FnMut(Value)) -> Option<End> {
        match ev {
            BackendEvent::TextDelta(d) if !self.stopped => {
                self.held.push_str(&d);
                if let Some((at, _)) = self.stop.iter().filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s))).min_by_key(|(i, _)| *i) {
                    self.held.truncate(at);
                    self.stopped = true;
                    cancel.cancel();
                }
                // Emit all but the longest tail that could still begin a stop sequence.
                let keep = if self.stopped { 0 } else { self.stop.iter().map(|s| partial_suffix(&self.held, s)).max().unwrap_or(0) };
                let cut = self.held.len() - keep;
                if cut > 0 {
                    let out: String = self.held.drain(..cut).collect();
                    self.text.push_str(&out);
                    emit(json!({"content": out}));
                }
                if self.stopped {
                    return Some(End::Done { finish: "stop", usage: usage_json(None) });
                }
                None
            }
            BackendEvent::TextDelta(_) => None,
            BackendEvent::ToolCallStart { index: backend_index, call_id, name } => {
                let index = self.calls.len();
                emit(json!({"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}));
                self.calls.push(CallOut { backend_index, id: call_id, name, arguments: String::new() });
                None
            }
            BackendEvent::ToolCallArgumentsDelta { index, delta } => {
                if let Some((at, c)) = self.calls.iter_mut().enumerate().rev().find(|(_, c)| c.backend_index == index) {
                    c.arguments.push_str(&delta);
                    emit(json!({"tool_calls": [{"index": at, "function": {"arguments": delta}}]}));
                }
                None
            }
            BackendEvent::Done { finish, usage } => {
                if !self.held.is_empty() {
                    let out = std::mem::take(&mut self.held);
                    self.text.push_str(&out);
                    emit(json!({"content": out}));
                }
                let finish = match finish {
                    _ if self.stopped => "stop",
                    FinishReason::Length => "length",
                    FinishReason::ToolCalls => "tool_calls",
                    FinishReason::Stop | FinishReason::Cancelled => "stop",
                };
                Some(End::Done { finish, usage: usage_json(usage) })
            }
            BackendEvent::Error(e) => {
                tracing::warn!("chat completion: backend failed: {e}");
                Some(End::Failed(e.client_message()))
            }
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

fn usage_json(u: Option<crate::model::TokenUsage>) -> Value {
    let u = u.unwrap_or_default();
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_cut_the_text_even_across_deltas() {
        let mut acc = Accumulator::new(vec!["END".into()]);
        let cancel = CancellationToken::new();
        let mut out = String::new();
        for d in ["Hello E", "N", "D and more"] {
            let mut emit = |v: Value| out.push_str(v["content"].as_str().unwrap_or(""));
            if acc.feed(BackendEvent::TextDelta(d.into()), &cancel, &mut emit).is_some() {
                break;
            }
        }
        assert_eq!(out, "Hello ");
        assert!(cancel.is_cancelled(), "the backend stops at the stop sequence");
        // A held prefix that turns out not to be a stop is emitted.
        let mut acc = Accumulator::new(vec!["END".into()]);
        let mut out = String::new();
        let mut emit = |v: Value| out.push_str(v["content"].as_str().unwrap_or(""));
        acc.feed(BackendEvent::TextDelta("say EN".into()), &CancellationToken::new(), &mut emit);
        acc.feed(BackendEvent::Done { finish: FinishReason::Stop, usage: None }, &CancellationToken::new(), &mut emit);
        assert_eq!(out, "say EN");
    }

    #[test]
    fn argument_deltas_go_to_the_call_the_backend_names() {
        let mut acc = Accumulator::new(Vec::new());
        let cancel = CancellationToken::new();
        let mut deltas = Vec::new();
        let mut emit = |v: Value| deltas.push(v);
        for ev in [
            BackendEvent::ToolCallStart { index: 3, call_id: "a".into(), name: "f".into() },
            BackendEvent::ToolCallStart { index: 5, call_id: "b".into(), name: "g".into() },
            BackendEvent::ToolCallArgumentsDelta { index: 3, delta: "{}".into() },
            BackendEvent::ToolCallArgumentsDelta { index: 5, delta: "{\"x\":1}".into() },
        ] {
            acc.feed(ev, &cancel, &mut emit);
        }
        assert_eq!((acc.calls[0].arguments.as_str(), acc.calls[1].arguments.as_str()), ("{}", "{\"x\":1}"));
        assert_eq!(deltas[3]["tool_calls"][0]["index"], 1, "clients see the calls numbered from 0");
    }

    #[test]
    fn partial_suffixes() {
        assert_eq!(partial_suffix("abcE", "END"), 1);
        assert_eq!(partial_suffix("abcEN", "END"), 2);
        assert_eq!(partial_suffix("abc", "END"), 0);
        assert_eq!(partial_suffix("é", "éa"), 2);
    }
}
