//! A backend for any OpenAI-compatible chat-completions server (llama.cpp, vLLM,
//! Ollama, LiteRT-LM, …): user audio goes up as 16 kHz WAV parts, the answer
//! comes back as server-sent events.

use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::wav::encode_wav;
use super::{Backend, BackendError, BackendEvent, ChatMessage, FinishReason, GenerateRequest, TokenUsage, UserPart};
use crate::media::MODEL_SAMPLE_RATE;

/// How user audio is encoded in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioPart {
    /// `{"type":"input_audio","input_audio":{"data":…,"format":"wav"}}` (OpenAI, llama.cpp, vLLM)
    InputAudio,
    /// `{"type":"audio_url","audio_url":{"url":"data:audio/wav;base64,…"}}`
    AudioUrl,
}

#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// e.g. `http://127.0.0.1:8080/v1`
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub audio_part: AudioPart,
    pub connect_timeout: Duration,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_tokens: u32,
    pub temperature: f32,
}

pub struct OpenAiBackend {
    settings: OpenAiSettings,
    http: reqwest::Client,
}

/// Bodies of error replies are cut to this length in error messages.
const MAX_ERROR_BODY: usize = 2048;
/// One SSE line longer than this is refused (protects against a runaway server).
const MAX_SSE_LINE: usize = 4 * 1024 * 1024;

impl OpenAiBackend {
    pub fn new(settings: OpenAiSettings) -> Result<Self, BackendError> {
        crate::tls::init();
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .build()
            .map_err(|e| BackendError::Unavailable { url: settings.base_url.clone(), reason: e.to_string() })?;
        Ok(Self { settings, http })
    }

    fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.settings.base_url.trim_end_matches('/'))
    }

    /// The JSON body for one request.
    pub fn request_body(&self, req: &GenerateRequest) -> Value {
        let mut messages = Vec::new();
        if !req.instructions.is_empty() {
            messages.push(json!({"role": "system", "content": req.instructions}));
        }
        for m in &req.messages {
            messages.push(self.message_json(m));
        }
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": req.max_output_tokens.unwrap_or(self.settings.max_tokens),
            "temperature": req.temperature.unwrap_or(self.settings.temperature),
        });
        if let Some(p) = req.top_p {
            body["top_p"] = json!(p);
        }
        if let Some(seed) = req.seed {
            body["seed"] = json!(seed);
        }
        if !req.tools.is_empty() {
            body["tools"] = req
                .tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
                .collect();
            if let Some(choice) = &req.tool_choice {
                body["tool_choice"] = choice.clone();
            }
        }
        body
    }

    fn message_json(&self, m: &ChatMessage) -> Value {
        match m {
            ChatMessage::System(text) => json!({"role": "system", "content": text}),
            ChatMessage::User(parts) => {
                let content: Vec<Value> = parts.iter().map(|p| self.part_json(p)).collect();
                json!({"role": "user", "content": content})
            }
            ChatMessage::Assistant { text, tool_calls } => {
                let mut v = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
                if !tool_calls.is_empty() {
                    v["tool_calls"] = tool_calls
                        .iter()
                        .map(|c| json!({"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                        .collect();
                }
                v
            }
            ChatMessage::Tool { call_id, output } => json!({"role": "tool", "tool_call_id": call_id, "content": output}),
        }
    }

    fn part_json(&self, p: &UserPart) -> Value {
        match p {
            UserPart::Text(t) => json!({"type": "text", "text": t}),
            UserPart::Image(url) => json!({"type": "image_url", "image_url": {"url": url.as_str()}}),
            UserPart::Audio(samples) => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(encode_wav(samples, MODEL_SAMPLE_RATE));
                match self.settings.audio_part {
                    AudioPart::InputAudio => json!({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}),
                    AudioPart::AudioUrl => json!({"type": "audio_url", "audio_url": {"url": format!("data:audio/wav;base64,{b64}")}}),
                }
            }
        }
    }
}

impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        &self.settings.model
    }

    fn generate(&self, request: GenerateRequest, cancel: CancellationToken) -> mpsc::Receiver<BackendEvent> {
        let (tx, rx) = mpsc::channel(256);
        let body = self.request_body(&request);
        let call = StreamCall {
            http: self.http.clone(),
            url: self.endpoint(),
            api_key: self.settings.api_key.clone(),
            first_token_timeout: self.settings.first_token_timeout,
            idle_timeout: self.settings.idle_timeout,
        };
        tokio::spawn(async move {
            let last = tokio::select! {
                r = call.run(body, &tx) => match r {
                    Ok((finish, usage)) => BackendEvent::Done { finish, usage },
                    Err(e) => BackendEvent::Error(e),
                },
                _ = cancel.cancelled() => BackendEvent::Done { finish: FinishReason::Cancelled, usage: None },
            };
            let _ = tx.send(last).await;
        });
        rx
    }
}

struct StreamCall {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    first_token_timeout: Duration,
    idle_timeout: Duration,
}

impl StreamCall {
    async fn run(self, body: Value, tx: &mpsc::Sender<BackendEvent>) -> Result<(FinishReason, Option<TokenUsage>), BackendError> {
        let mut req = self.http.post(&self.url).json(&body).header("Accept", "text/event-stream");
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let response = match tokio::time::timeout(self.first_token_timeout, req.send()).await {
            Err(_) => return Err(BackendError::Timeout(format!("no response within {:?}", self.first_token_timeout))),
            Ok(Err(e)) => return Err(BackendError::Unavailable { url: self.url.clone(), reason: error_chain(&e) }),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if !status.is_success() {
            let text = tokio::time::timeout(self.idle_timeout, response.text()).await.ok().and_then(Result::ok).unwrap_or_default();
            let mut body = text.trim().to_string();
            if body.len() > MAX_ERROR_BODY {
                let mut cut = MAX_ERROR_BODY;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
            }
            return Err(BackendError::Http { status: status.as_u16(), body });
        }

        let mut stream = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut state = StreamState::default();
        let mut first = true;
        loop {
            let wait = if first { self.first_token_timeout } else { self.idle_timeout };
            let chunk = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) => return Err(BackendError::Timeout(format!("stream stalled for {wait:?}"))),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(BackendError::Protocol(format!("connection broke: {}", error_chain(&e)))),
                Ok(Some(Ok(bytes))) => bytes,
            };
            first = false;
            for data in parser.push(&chunk)? {
                if data == "[DONE]" {
                    return state.finish(true);
                }
                for ev in state.on_chunk(&data)? {
                    if tx.send(ev).await.is_err() {
                        return Ok((FinishReason::Cancelled, None));
                    }
                }
            }
        }
        state.finish(false)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Splits a byte stream into SSE `data:` payloads. Hand-written because it is a
/// dozen lines, and owning it lets us bound line length and report bad UTF-8 precisely.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, BackendError> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).map_err(|_| BackendError::Protocol("stream is not UTF-8".into()))?;
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data.push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
            // `event:`, `id:`, `retry:` and `:` comments carry nothing we use.
        }
        if self.buf.len() > MAX_SSE_LINE {
            return Err(BackendError::Protocol(format!("an SSE line exceeded {MAX_SSE_LINE} bytes")));
        }
        Ok(events)
    }
}

/// Turns chat-completion chunks into backend events.
#[derive(Default)]
struct StreamState {
    /// Tool calls seen so far, by the server's `index`.
    calls: Vec<(usize, String)>,
    finish: Option<FinishReason>,
    usage: Option<TokenUsage>,
    saw_any: bool,
}

impl StreamState {
    fn on_chunk(&mut self, data: &str) -> Result<Vec<BackendEvent>, BackendError> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| BackendError::Protocol(format!("chunk is not JSON ({e}): {}", preview(data))))?;
        if let Some(err) = v.get("error") {
            let msg = err.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| err.to_string());
            return Err(BackendError::Protocol(format!("server reported an error: {msg}")));
        }
        let mut out = Vec::new();
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(TokenUsage {
                input_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0) as u32,
                output_tokens: u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0) as u32,
                cached_input_tokens: u
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as u32,
            });
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            if v.get("usage").is_some() {
                return Ok(out);
            }
            return Err(BackendError::Protocol(format!("chunk has no 'choices': {}", preview(data))));
        };
        self.saw_any = true;
        let Some(choice) = choices.first() else { return Ok(out) };
        if let Some(delta) = choice.get("delta") {
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                if !text.is_empty() {
                    out.push(BackendEvent::TextDelta(text.to_string()));
                }
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (pos, call) in calls.iter().enumerate() {
                    let index = call.get("index").and_then(Value::as_u64).map(|i| i as usize).unwrap_or(pos);
                    let func = call.get("function");
                    let name = func.and_then(|f| f.get("name")).and_then(Value::as_str);
                    let args = func.and_then(|f| f.get("arguments")).and_then(Value::as_str);
                    if !self.calls.iter().any(|(i, _)| *i == index) {
                        let Some(name) = name else {
                            return Err(BackendError::Protocol(format!("tool call {index} starts without a function name")));
                        };
                        let call_id = call
                            .get("id")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .unwrap_or_else(|| super::new_call_id());
                        self.calls.push((index, call_id.clone()));
                        out.push(BackendEvent::ToolCallStart { index, call_id, name: name.to_string() });
                    }
                    if let Some(a) = args.filter(|a| !a.is_empty()) {
                        out.push(BackendEvent::ToolCallArgumentsDelta { index, delta: a.to_string() });
                    }
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(match reason {
                "length" => FinishReason::Length,
                "tool_calls" | "function_call" => FinishReason::ToolCalls,
                _ => FinishReason::Stop,
            });
        }
        Ok(out)
    }

    fn finish(self, saw_done: bool) -> Result<(FinishReason, Option<TokenUsage>), BackendError> {
        match (self.finish, saw_done) {
            (Some(f), _) => Ok((f, self.usage)),
            (None, true) if self.saw_any => Ok((if self.calls.is_empty() { FinishReason::Stop } else { FinishReason::ToolCalls }, self.usage)),
            _ => Err(BackendError::Protocol("the stream ended before the response was finished".into())),
        }
    }
}

fn preview(s: &str) -> String {
    s.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_lines_and_comments() {
        let mut p = SseParser::default();
        assert!(p.push(b": keepalive\n\nda").unwrap().is_empty());
        assert!(p.push(b"ta: {\"a\":1}\r").unwrap().is_empty());
        assert_eq!(p.push(b"\n\ndata: [DONE]\n\n").unwrap(), vec!["{\"a\":1}".to_string(), "[DONE]".to_string()]);
    }

    #[test]
    fn chunks_become_text_and_tool_call_events() {
        let mut s = StreamState::default();
        let ev = s.on_chunk(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#).unwrap();
        assert_eq!(ev, vec![BackendEvent::TextDelta("Hi".into())]);
        let ev = s
            .on_chunk(r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"{\"x\""}}]}}]}"#)
            .unwrap();
        assert_eq!(
            ev,
            vec![
                BackendEvent::ToolCallStart { index: 0, call_id: "c1".into(), name: "f".into() },
                BackendEvent::ToolCallArgumentsDelta { index: 0, delta: "{\"x\"".into() }
            ]
        );
        s.on_chunk(r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#).unwrap();
        assert_eq!(s.finish(true).unwrap().0, FinishReason::ToolCalls);
    }

    #[test]
    fn malformed_chunks_are_protocol_errors() {
        let mut s = StreamState::default();
        assert!(matches!(s.on_chunk("{not json"), Err(BackendError::Protocol(_))));
        assert!(matches!(StreamState::default().finish(false), Err(BackendError::Protocol(_))));
    }
}
