//! Model backends. A backend is driven: it gets a [`GenerateRequest`] and streams
//! [`BackendEvent`]s back; it knows nothing of sessions or transports.
//!
//! - [`embedded::EmbeddedBackend`]: Gemma 4 in-process; its [`engine::Engine`] owns the
//!   model on one thread, where a scheduler interleaves every session's work and a
//!   pool keeps a KV cache per session within a byte budget.
//! - [`openai::OpenAiBackend`]: any OpenAI-compatible chat-completions server.

pub mod embedded;
pub mod engine;
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
    /// Nucleus sampling and the random seed, when the request sets them (chat
    /// completions); otherwise the backend's configured defaults.
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    /// Which conversation this request continues (one per session; see [`cache_key`]).
    /// The embedded engine keeps one KV cache per key and rolls back only a key's own
    /// cache: other sessions' caches are forked where a prefix matches, never cut.
    /// `None`: the request owns no cache and rolls back nobody's.
    pub cache_key: Option<u64>,
}

/// A request's [`GenerateRequest::cache_key`] for a session id.
pub fn cache_key(session_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    session_id.hash(&mut h);
    h.finish()
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
    /// Mono 16 kHz samples at the wire's 16-bit precision (see [`crate::media::pcm`]).
    Audio(Arc<Vec<i16>>),
    /// A `data:image/…;base64,…` URL, shared with the conversation (it can be megabytes).
    Image(Arc<String>),
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
    /// Input tokens served from a cache rather than prefilled for this request.
    pub cached_input_tokens: u32,
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

    /// What a client may be told: no internal URLs, no server response bodies (they
    /// can carry paths, keys or stack traces). The full error goes to the log.
    pub fn client_message(&self) -> String {
        match self {
            BackendError::Unavailable { .. } => "The model server is unreachable.".into(),
            BackendError::Timeout(_) => "The model server timed out.".into(),
            BackendError::Http { status, .. } => format!("The model server returned HTTP {status}."),
            BackendError::Protocol(_) => "The model server sent a malformed stream.".into(),
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

    /// Starts prefilling a user turn while the user is still speaking. `base` is the
    /// context the turn follows (what a `generate` request would carry without the
    /// turn). Audio pushed into the returned stream enters the model as it arrives, so
    /// the `generate` that follows end of speech only prefills the turn's last frames.
    /// `None`: this backend cannot (remote servers take whole requests).
    fn open_turn(&self, base: GenerateRequest) -> Option<TurnStream> {
        let _ = base;
        None
    }

    /// A hint that a later request will start with `request`'s context (the retained
    /// window after an eviction): a backend with a cache may build it in the background
    /// so the eviction costs the conversation no pause. Default: nothing.
    fn prepare(&self, request: GenerateRequest) {
        let _ = request;
    }

    /// How this backend counts the tokens of a prompt.
    fn token_counter(&self) -> Arc<dyn TokenCounter> {
        Arc::new(EstimatedTokens::default())
    }

    /// What the backend's caches hold now (`/metrics`); `None` for remote servers.
    fn memory(&self) -> Option<BackendMemory> {
        None
    }
}

/// The embedded model's KV memory, as the model thread last recorded it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendMemory {
    pub kv_bytes: u64,
    pub kv_budget_bytes: u64,
}

/// Counts prompt tokens as a backend's model would see them.
pub trait TokenCounter: Send + Sync {
    /// Tokens of the whole prompt for `instructions`, `tools` and `messages`, ending
    /// with the generation prompt when `add_generation_prompt`.
    fn count(&self, instructions: &str, tools: &[ToolSpec], messages: &[ChatMessage], add_generation_prompt: bool) -> usize;
}

/// Estimates for remote servers, whose tokenizer hark does not have: about four
/// characters per text token, Gemma's 25 audio tokens per second, a fixed budget per image.
#[derive(Debug, Clone)]
pub struct EstimatedTokens {
    pub image_tokens: usize,
}

impl Default for EstimatedTokens {
    fn default() -> Self {
        Self { image_tokens: 280 }
    }
}

impl TokenCounter for EstimatedTokens {
    fn count(&self, instructions: &str, tools: &[ToolSpec], messages: &[ChatMessage], add_generation_prompt: bool) -> usize {
        let text = |s: &str| s.len().div_ceil(4);
        let mut n = 1 + text(instructions);
        n += tools.iter().map(|t| 8 + text(&t.name) + text(&t.description) + text(&t.parameters.to_string())).sum::<usize>();
        for m in messages {
            n += 4 + match m {
                ChatMessage::System(t) => text(t),
                ChatMessage::User(parts) => parts
                    .iter()
                    .map(|p| match p {
                        UserPart::Text(t) => text(t),
                        UserPart::Audio(a) => 2 + a.len().div_ceil(640),
                        UserPart::Image(_) => 2 + self.image_tokens,
                    })
                    .sum(),
                ChatMessage::Assistant { text: t, tool_calls } => {
                    text(t) + tool_calls.iter().map(|c| 6 + text(&c.name) + text(&c.arguments)).sum::<usize>()
                }
                ChatMessage::Tool { output, .. } => 6 + text(output),
            };
        }
        n + if add_generation_prompt { 4 } else { 0 }
    }
}

/// What a [`TurnStream`] carries to the backend.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnCommand {
    /// More of the turn's audio: 16 kHz mono samples, continuing the previous ones.
    Audio(Vec<f32>),
    /// The turn was not speech after all: forget it, back to the context before it.
    Retract,
}

/// A user turn being prefilled while the user speaks (see [`Backend::open_turn`]).
/// Dropping it without [`TurnStream::retract`] leaves the prefilled frames in the
/// backend's cache for the `generate` that closes the turn.
pub struct TurnStream {
    send: Box<dyn Fn(TurnCommand) + Send + Sync>,
    /// After each prefilled batch of frames: the model's probability that the user's
    /// turn ends there (the mass on the tokens that close an audio turn).
    pub end_of_turn: mpsc::UnboundedReceiver<f32>,
}

impl TurnStream {
    pub fn new(send: Box<dyn Fn(TurnCommand) + Send + Sync>, end_of_turn: mpsc::UnboundedReceiver<f32>) -> Self {
        Self { send, end_of_turn }
    }

    pub fn push_audio(&self, samples: Vec<f32>) {
        if !samples.is_empty() {
            (self.send)(TurnCommand::Audio(samples));
        }
    }

    pub fn retract(self) {
        (self.send)(TurnCommand::Retract);
    }
}
