//! Model backends. A backend is driven: it gets a [`GenerateRequest`] and streams
//! [`BackendEvent`]s back; it knows nothing of sessions or transports.
//!
//! - [`openai::OpenAiBackend`]: any OpenAI-compatible chat-completions server.

pub mod embedded;
pub mod gemma4;
pub mod hub;
pub mod openai;
pub mod wav;

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Everything a backend needs for one response.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub instructions: String,
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
    /// `auto` | `none` | `required` | a specific function (OpenAI's `tool_choice` JSON).
    pub tool_choice: Option<Value>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChatMessage {
    System(String),
    User(Vec<UserPart>),
    Assistant { text: String, tool_calls: Vec<ToolCall> },
    Tool { call_id: String, output: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum UserPart {
    Text(String),
    /// Mono 16 kHz samples in [-1, 1].
    Audio(Arc<Vec<f32>>),
    /// A `data:image/…;base64,…` URL.
    Image(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub call_id: String,
    pub name: String,
    /// JSON text, as the model produced it.
    pub arguments: String,
}

/// What a backend streams back. Ends with exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    TextDelta(String),
    /// A new tool call; `index` orders calls within the response.
    ToolCallStart { index: usize, call_id: String, name: String },
    ToolCallArgumentsDelta { index: usize, delta: String },
    Done { finish: FinishReason, usage: Option<TokenUsage> },
    Error(BackendError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    Cancelled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    #[error("model server unreachable at {url}: {reason}")]
    Unavailable { url: String, reason: String },
    #[error("model server timed out: {0}")]
    Timeout(String),
    #[error("model server returned HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("model server sent a malformed stream: {0}")]
    Protocol(String),
}

impl BackendError {
    /// A stable code for `error` events.
    pub fn code(&self) -> &'static str {
        match self {
            BackendError::Unavailable { .. } => "backend_unavailable",
            BackendError::Timeout(_) => "backend_timeout",
            BackendError::Http { .. } => "backend_http_error",
            BackendError::Protocol(_) => "backend_protocol_error",
        }
    }
}

/// A fresh tool-call id (`call_…`) for backends whose model names none.
pub fn new_call_id() -> String {
    let mut s = String::from("call_");
    s.extend((0..20).map(|_| fastrand::alphanumeric()));
    s
}

/// A model that answers a request with a stream of events.
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs and `/v1/models`.
    fn name(&self) -> &str;

    /// Starts generating. The stream ends with `Done` or `Error`; cancelling `cancel`
    /// stops the work promptly and ends the stream with `Done { finish: Cancelled }`.
    fn generate(&self, request: GenerateRequest, cancel: CancellationToken) -> mpsc::Receiver<BackendEvent>;
}
