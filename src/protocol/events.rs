//! Server events: everything hark sends a client, with GA names.

use serde::Serialize;
use serde_json::Value;

use super::{Item, MaxTokens, ProtocolError, SessionInfo};

/// The `response` object of `response.created` / `response.done`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResponseInfo {
    pub id: String,
    pub object: &'static str,
    pub status: ResponseStatus,
    pub status_details: Option<Value>,
    pub output: Vec<Item>,
    pub conversation_id: Option<String>,
    pub output_modalities: Vec<String>,
    pub max_output_tokens: MaxTokens,
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResponseStatus {
    InProgress,
    Completed,
    Cancelled,
    Failed,
    Incomplete,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Usage {
    pub total_tokens: u32,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// `{cached_tokens}`: input served from the model's cache (with streaming prefill,
    /// nearly all of a spoken turn).
    pub input_token_details: InputTokenDetails,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct InputTokenDetails {
    pub cached_tokens: u32,
}

/// Every event the server sends, with its GA name. `event_id` is added by [`to_wire`].
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type")]
pub enum ServerEvent {
    #[serde(rename = "error")]
    Error { error: ErrorBody },
    #[serde(rename = "session.created")]
    SessionCreated {
        #[serde(serialize_with = "session_placeholder")]
        session: SessionInfo,
    },
    #[serde(rename = "session.updated")]
    SessionUpdated {
        #[serde(serialize_with = "session_placeholder")]
        session: SessionInfo,
    },
    #[serde(rename = "conversation.item.added")]
    ConversationItemAdded { previous_item_id: Option<String>, item: Item },
    #[serde(rename = "conversation.item.done")]
    ConversationItemDone { previous_item_id: Option<String>, item: Item },
    #[serde(rename = "conversation.item.retrieved")]
    ConversationItemRetrieved { item: Item },
    #[serde(rename = "conversation.item.deleted")]
    ConversationItemDeleted { item_id: String },
    #[serde(rename = "conversation.item.truncated")]
    ConversationItemTruncated { item_id: String, content_index: u32, audio_end_ms: u64 },
    #[serde(rename = "input_audio_buffer.committed")]
    InputAudioBufferCommitted { previous_item_id: Option<String>, item_id: String },
    #[serde(rename = "input_audio_buffer.cleared")]
    InputAudioBufferCleared {},
    #[serde(rename = "input_audio_buffer.speech_started")]
    InputAudioBufferSpeechStarted { audio_start_ms: u64, item_id: String },
    #[serde(rename = "input_audio_buffer.speech_stopped")]
    InputAudioBufferSpeechStopped { audio_end_ms: u64, item_id: String },
    #[serde(rename = "input_audio_buffer.timeout_triggered")]
    InputAudioBufferTimeoutTriggered { audio_start_ms: u64, audio_end_ms: u64, item_id: String },
    /// WebRTC only: a response's audio began to go out on the call's track.
    #[serde(rename = "output_audio_buffer.started")]
    OutputAudioBufferStarted { response_id: String },
    /// WebRTC only: all of a response's audio has gone out (after its `response.done`).
    #[serde(rename = "output_audio_buffer.stopped")]
    OutputAudioBufferStopped { response_id: String },
    /// WebRTC only: a response's audio not yet sent was dropped (barge-in, cancel, or
    /// the client's `output_audio_buffer.clear`).
    #[serde(rename = "output_audio_buffer.cleared")]
    OutputAudioBufferCleared { response_id: String },
    #[serde(rename = "response.created")]
    ResponseCreated { response: ResponseInfo },
    #[serde(rename = "response.done")]
    ResponseDone { response: ResponseInfo },
    #[serde(rename = "response.output_item.added")]
    ResponseOutputItemAdded { response_id: String, output_index: u32, item: Item },
    #[serde(rename = "response.output_item.done")]
    ResponseOutputItemDone { response_id: String, output_index: u32, item: Item },
    #[serde(rename = "response.content_part.added")]
    ResponseContentPartAdded {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: Value,
    },
    #[serde(rename = "response.content_part.done")]
    ResponseContentPartDone {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: Value,
    },
    #[serde(rename = "response.output_text.delta")]
    ResponseOutputTextDelta {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
    },
    #[serde(rename = "response.output_text.done")]
    ResponseOutputTextDone {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        text: String,
    },
    /// 24 kHz pcm16 (base64) of the spoken reply.
    #[serde(rename = "response.output_audio.delta")]
    ResponseOutputAudioDelta {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
    },
    #[serde(rename = "response.output_audio.done")]
    ResponseOutputAudioDone { response_id: String, item_id: String, output_index: u32, content_index: u32 },
    #[serde(rename = "response.output_audio_transcript.delta")]
    ResponseOutputAudioTranscriptDelta {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
    },
    #[serde(rename = "response.output_audio_transcript.done")]
    ResponseOutputAudioTranscriptDone {
        response_id: String,
        item_id: String,
        output_index: u32,
        content_index: u32,
        transcript: String,
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    ResponseFunctionCallArgumentsDelta {
        response_id: String,
        item_id: String,
        output_index: u32,
        call_id: String,
        delta: String,
    },
    #[serde(rename = "response.function_call_arguments.done")]
    ResponseFunctionCallArgumentsDone {
        response_id: String,
        item_id: String,
        output_index: u32,
        call_id: String,
        name: String,
        arguments: String,
    },
    #[serde(rename = "response.mcp_call_arguments.delta")]
    ResponseMcpCallArgumentsDelta { response_id: String, item_id: String, output_index: u32, delta: String },
    #[serde(rename = "response.mcp_call_arguments.done")]
    ResponseMcpCallArgumentsDone { response_id: String, item_id: String, output_index: u32, arguments: String },
    #[serde(rename = "response.mcp_call.in_progress")]
    ResponseMcpCallInProgress { item_id: String, output_index: u32 },
    #[serde(rename = "response.mcp_call.completed")]
    ResponseMcpCallCompleted { item_id: String, output_index: u32 },
    #[serde(rename = "response.mcp_call.failed")]
    ResponseMcpCallFailed { item_id: String, output_index: u32 },
    #[serde(rename = "mcp_list_tools.in_progress")]
    McpListToolsInProgress { item_id: String },
    #[serde(rename = "mcp_list_tools.completed")]
    McpListToolsCompleted { item_id: String },
    #[serde(rename = "rate_limits.updated")]
    RateLimitsUpdated { rate_limits: Vec<Value> },
    /// hark's own: the local session heard its wake phrase (`audio.activation:
    /// wake_word`) with this score (0..1) and takes the next turn.
    #[serde(rename = "hark.wake_word.detected")]
    HarkWakeWordDetected { score: f32 },
}

fn session_placeholder<S: serde::Serializer>(_: &SessionInfo, s: S) -> Result<S::Ok, S::Error> {
    // Replaced in `to_wire`, which knows the dialect.
    s.serialize_none()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub event_id: Option<String>,
}

impl ServerEvent {
    /// An `error` event for a refused client message.
    pub fn from_protocol_error(e: ProtocolError) -> Self {
        ServerEvent::Error {
            error: ErrorBody {
                kind: if e.server_side { "server_error" } else { "invalid_request_error" },
                code: e.code.to_string(),
                message: e.message,
                param: e.param,
                event_id: e.event_id,
            },
        }
    }

    /// An `error` event for a failure on the server's side (backend down, …).
    pub fn server_error(code: &str, message: impl Into<String>, event_id: Option<String>) -> Self {
        ServerEvent::Error {
            error: ErrorBody {
                kind: "server_error",
                code: code.to_string(),
                message: message.into(),
                param: None,
                event_id,
            },
        }
    }

    pub fn type_name(&self) -> String {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m.get("type").and_then(Value::as_str).unwrap_or("").to_string(),
            _ => String::new(),
        }
    }
}
