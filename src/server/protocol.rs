//! The OpenAI Realtime wire protocol: every client and server event as serde types.
//!
//! This is the one file that knows the protocol's JSON shapes. Sessions speak in
//! [`ClientEvent`] and [`ServerEvent`]; transports (WebSocket, WebRTC data channel)
//! call [`parse_client_event`] and [`to_wire`] and nothing else.
//!
//! GA names are the canonical ones. Beta clients (`OpenAI-Beta: realtime=v1`) get
//! the old names and shapes through [`Dialect::Beta`], applied only at the edge.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

use crate::tools::registry::json_kind;

/// Largest `input_audio_buffer.append` payload, as decoded bytes (the protocol's limit).
pub const MAX_APPEND_BYTES: usize = 15 * 1024 * 1024;
/// Largest client frame we accept at all (base64 of the above plus JSON overhead).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = MAX_APPEND_BYTES / 3 * 4 + 64 * 1024;

/// Which event names and shapes a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Ga,
    Beta,
}

// ───────────────────────────── client events ─────────────────────────────

/// A client event, already validated against its schema.
#[derive(Debug, Clone)]
pub struct ClientEnvelope {
    pub event_id: Option<String>,
    pub event: ClientEvent,
}

/// Deserialized externally tagged (`{"session.update": {...}}`, see
/// [`parse_client_event`]) so that error paths survive: serde loses field paths
/// inside internally tagged enums.
#[derive(Debug, Clone, Deserialize)]
pub enum ClientEvent {
    #[serde(rename = "session.update")]
    SessionUpdate { session: SessionUpdate },
    #[serde(rename = "input_audio_buffer.append")]
    InputAudioBufferAppend { audio: String },
    #[serde(rename = "input_audio_buffer.commit")]
    InputAudioBufferCommit {},
    #[serde(rename = "input_audio_buffer.clear")]
    InputAudioBufferClear {},
    #[serde(rename = "conversation.item.create")]
    ConversationItemCreate {
        #[serde(default)]
        previous_item_id: Option<String>,
        item: ItemInput,
    },
    #[serde(rename = "conversation.item.retrieve")]
    ConversationItemRetrieve { item_id: String },
    #[serde(rename = "conversation.item.truncate")]
    ConversationItemTruncate {
        item_id: String,
        content_index: u32,
        audio_end_ms: u64,
    },
    #[serde(rename = "conversation.item.delete")]
    ConversationItemDelete { item_id: String },
    #[serde(rename = "response.create")]
    ResponseCreate {
        #[serde(default)]
        response: Option<ResponseParams>,
    },
    #[serde(rename = "response.cancel")]
    ResponseCancel {
        #[serde(default)]
        response_id: Option<String>,
    },
    #[serde(rename = "output_audio_buffer.clear")]
    OutputAudioBufferClear {},
}

const CLIENT_EVENT_TYPES: &[&str] = &[
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
];

/// `session.update` payload: the union of GA and beta fields. Every field is optional:
/// updates merge into the session, they never reset it. Unknown fields are ignored
/// (real clients send `tracing`, `include`, `prompt`, … that hark has no use for).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionUpdate {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub model: Option<String>,
    pub instructions: Option<String>,
    /// GA
    pub output_modalities: Option<Vec<String>>,
    /// beta
    pub modalities: Option<Vec<String>>,
    pub audio: Option<AudioConfigUpdate>,
    /// beta: `pcm16` | `g711_ulaw` | `g711_alaw`
    pub input_audio_format: Option<String>,
    pub output_audio_format: Option<String>,
    /// beta (GA puts it under `audio.input`). `null` turns detection off.
    #[serde(default, deserialize_with = "present")]
    pub turn_detection: Option<Option<TurnDetectionUpdate>>,
    pub voice: Option<String>,
    pub tools: Option<Vec<ToolDeclaration>>,
    pub tool_choice: Option<Value>,
    pub temperature: Option<f32>,
    pub max_output_tokens: Option<MaxTokens>,
    /// beta name of `max_output_tokens`
    pub max_response_output_tokens: Option<MaxTokens>,
    /// hark extension: pick the agent for this session.
    pub agent: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AudioConfigUpdate {
    pub input: Option<AudioInputUpdate>,
    pub output: Option<AudioOutputUpdate>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AudioInputUpdate {
    pub format: Option<AudioFormatSpec>,
    #[serde(default, deserialize_with = "present")]
    pub turn_detection: Option<Option<TurnDetectionUpdate>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct AudioOutputUpdate {
    pub format: Option<AudioFormatSpec>,
    pub voice: Option<String>,
}

/// GA audio format object: `{type: "audio/pcm", rate: 24000}`.
#[derive(Debug, Clone, Deserialize)]
pub struct AudioFormatSpec {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub rate: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TurnDetectionUpdate {
    #[serde(rename = "type")]
    pub kind: String,
    pub threshold: Option<f32>,
    pub prefix_padding_ms: Option<u32>,
    pub silence_duration_ms: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    pub idle_timeout_ms: Option<Option<u32>>,
    pub create_response: Option<bool>,
    pub interrupt_response: Option<bool>,
    pub eagerness: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum MaxTokens {
    Count(u32),
    Inf(String),
}

/// A function tool declared by the client: `{type: "function", name, description, parameters}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ToolDeclaration {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "empty_object")]
    pub parameters: Value,
}

fn function_type() -> String {
    "function".into()
}
fn empty_object() -> Value {
    json!({"type": "object", "properties": {}})
}

/// `response.create`'s optional `response` object.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponseParams {
    pub instructions: Option<String>,
    pub output_modalities: Option<Vec<String>>,
    pub modalities: Option<Vec<String>>,
    pub tools: Option<Vec<ToolDeclaration>>,
    pub tool_choice: Option<Value>,
    pub temperature: Option<f32>,
    pub max_output_tokens: Option<MaxTokens>,
    pub max_response_output_tokens: Option<MaxTokens>,
    /// `"none"` makes an out-of-band response that does not enter the conversation.
    pub conversation: Option<String>,
    pub metadata: Option<Value>,
}

/// An item a client creates. One struct for all item types; [`crate::session`] checks
/// the fields each type needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ItemInput {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: Option<String>,
    pub content: Option<Vec<ContentInput>>,
    pub call_id: Option<String>,
    pub name: Option<String>,
    pub arguments: Option<String>,
    pub output: Option<String>,
    /// hark extension: a pinned item is never evicted from the context window.
    pub pinned: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentInput {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// base64 audio in the session's input format
    pub audio: Option<String>,
    pub transcript: Option<String>,
    pub image_url: Option<String>,
    pub detail: Option<String>,
}

/// Distinguishes a missing field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Why a client message was refused; becomes an `error` event.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub event_id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param: None, event_id: None }
    }
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub fn event_id(mut self, id: Option<String>) -> Self {
        self.event_id = id;
        self
    }
}

/// Parses one client text frame. Every failure names the offending field and the
/// client's `event_id` when it could be read.
pub fn parse_client_event(text: &str) -> Result<ClientEnvelope, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new("invalid_json", format!("The message is not valid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(ProtocolError::new("invalid_json", "The message must be a JSON object."));
    };
    let event_id = match obj.get("event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(ProtocolError::new(
                "invalid_type",
                format!("Invalid type for 'event_id': expected a string, got {}.", json_kind(other)),
            )
            .param("event_id"))
        }
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.clone(),
        None => {
            return Err(ProtocolError::new("missing_required_parameter", "Missing required parameter: 'type'.")
                .param("type")
                .event_id(event_id))
        }
        Some(other) => {
            return Err(ProtocolError::new(
                "invalid_type",
                format!("Invalid type for 'type': expected a string, got {}.", json_kind(other)),
            )
            .param("type")
            .event_id(event_id))
        }
    };
    if !CLIENT_EVENT_TYPES.contains(&kind.as_str()) {
        return Err(ProtocolError::new(
            "invalid_value",
            format!("Invalid value: '{kind}'. Supported values are: {}.", CLIENT_EVENT_TYPES.join(", ")),
        )
        .param("type")
        .event_id(event_id));
    }
    let mut payload = obj.clone();
    payload.remove("type");
    payload.remove("event_id");
    let tagged = Value::Object(Map::from_iter([(kind.clone(), Value::Object(payload))]));
    let event: ClientEvent = serde_path_to_error::deserialize(tagged).map_err(|e| {
        let full = e.path().to_string();
        let path = full.strip_prefix(kind.as_str()).map(|p| p.trim_start_matches('.')).unwrap_or(&full).to_string();
        let inner = e.into_inner().to_string();
        let param = if path.is_empty() || path == "." || path == "?" { None } else { Some(path.clone()) };
        let message = match &param {
            Some(p) => format!("Invalid '{p}' in {kind}: {inner}."),
            None => format!("Invalid {kind}: {inner}."),
        };
        ProtocolError { code: "invalid_value", message, param, event_id: event_id.clone() }
    })?;
    Ok(ClientEnvelope { event_id, event })
}

// ───────────────────────────── server events ─────────────────────────────

/// A conversation item as the protocol shows it. Audio bytes are never echoed back.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Item {
    pub id: String,
    pub object: &'static str,
    #[serde(rename = "type")]
    pub kind: ItemKind,
    pub status: ItemStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Vec<ContentPart>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    Message,
    FunctionCall,
    FunctionCallOutput,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    Completed,
    Incomplete,
    InProgress,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One content part of a message item (GA names; beta renames at the edge).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// For audio parts: the transcript, `null` when there is none (hark does no ASR).
    #[serde(skip_serializing_if = "is_not_audio_transcript")]
    pub transcript: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
}

fn is_not_audio_transcript(t: &Option<Option<String>>) -> bool {
    t.is_none()
}

impl ContentPart {
    pub fn input_text(text: impl Into<String>) -> Self {
        Self { kind: "input_text", text: Some(text.into()), transcript: None, image_url: None }
    }
    pub fn input_audio() -> Self {
        Self { kind: "input_audio", text: None, transcript: Some(None), image_url: None }
    }
    pub fn input_image(url: String) -> Self {
        Self { kind: "input_image", text: None, transcript: None, image_url: Some(url) }
    }
    pub fn output_text(text: impl Into<String>) -> Self {
        Self { kind: "output_text", text: Some(text.into()), transcript: None, image_url: None }
    }
}

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

/// The session as reported in `session.created` / `session.updated`, in neutral form;
/// [`to_wire`] renders it as the GA or the beta shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    pub model: String,
    pub instructions: String,
    pub output_modalities: Vec<String>,
    pub input_format: String,
    pub input_rate: u32,
    pub output_format: String,
    pub voice: String,
    pub turn_detection: Option<Value>,
    pub tools: Vec<ToolDeclaration>,
    pub tool_choice: Value,
    pub temperature: f32,
    pub max_output_tokens: MaxTokens,
    pub agent: String,
}

impl SessionInfo {
    fn to_json(&self, dialect: Dialect) -> Value {
        match dialect {
            Dialect::Ga => json!({
                "type": "realtime",
                "object": "realtime.session",
                "id": self.id,
                "model": self.model,
                "instructions": self.instructions,
                "output_modalities": self.output_modalities,
                "audio": {
                    "input": {
                        "format": ga_format(&self.input_format, self.input_rate),
                        "turn_detection": self.turn_detection,
                        "transcription": null,
                        "noise_reduction": null,
                    },
                    "output": {
                        "format": ga_format(&self.output_format, 24000),
                        "voice": self.voice,
                        "speed": 1.0,
                    }
                },
                "tools": self.tools,
                "tool_choice": self.tool_choice,
                "max_output_tokens": self.max_output_tokens,
                "tracing": null,
                "truncation": "auto",
                "expires_at": 0,
                "hark_agent": self.agent,
            }),
            Dialect::Beta => json!({
                "object": "realtime.session",
                "id": self.id,
                "model": self.model,
                "instructions": self.instructions,
                "modalities": self.output_modalities,
                "input_audio_format": beta_format(&self.input_format),
                "output_audio_format": beta_format(&self.output_format),
                "input_audio_transcription": null,
                "turn_detection": self.turn_detection,
                "voice": self.voice,
                "tools": self.tools,
                "tool_choice": self.tool_choice,
                "temperature": self.temperature,
                "max_response_output_tokens": self.max_output_tokens,
                "hark_agent": self.agent,
            }),
        }
    }
}

fn ga_format(kind: &str, rate: u32) -> Value {
    if kind == "audio/pcm" {
        json!({"type": kind, "rate": rate})
    } else {
        json!({"type": kind})
    }
}

/// GA format name → beta format name.
pub fn beta_format(kind: &str) -> &'static str {
    match kind {
        "audio/pcmu" => "g711_ulaw",
        "audio/pcma" => "g711_alaw",
        _ => "pcm16",
    }
}

/// Beta format name (or GA name) → GA format name, `None` if unknown.
pub fn ga_format_name(kind: &str) -> Option<&'static str> {
    match kind {
        "pcm16" | "audio/pcm" => Some("audio/pcm"),
        "g711_ulaw" | "audio/pcmu" => Some("audio/pcmu"),
        "g711_alaw" | "audio/pcma" => Some("audio/pcma"),
        _ => None,
    }
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
    #[serde(rename = "rate_limits.updated")]
    RateLimitsUpdated { rate_limits: Vec<Value> },
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
                kind: "invalid_request_error",
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

/// Server event name (GA) → beta name, where they differ.
fn beta_event_name(ga: &str) -> &str {
    match ga {
        "conversation.item.added" => "conversation.item.created",
        "response.output_text.delta" => "response.text.delta",
        "response.output_text.done" => "response.text.done",
        "response.output_audio.delta" => "response.audio.delta",
        "response.output_audio.done" => "response.audio.done",
        "response.output_audio_transcript.delta" => "response.audio_transcript.delta",
        "response.output_audio_transcript.done" => "response.audio_transcript.done",
        other => other,
    }
}

/// Serializes a server event for one client: adds the `event_id`, and for beta
/// clients renames events and content types. Returns `None` for GA-only events
/// that beta clients do not know (`conversation.item.done`).
pub fn to_wire(event: &ServerEvent, dialect: Dialect) -> Option<String> {
    let mut value = serde_json::to_value(event).unwrap_or_else(|e| {
        json!({"type": "error", "error": {"type": "server_error", "code": "serialization", "message": e.to_string()}})
    });
    let obj = value.as_object_mut()?;
    if let ServerEvent::SessionCreated { session } | ServerEvent::SessionUpdated { session } = event {
        obj.insert("session".into(), session.to_json(dialect));
    }
    let mut out = Map::with_capacity(obj.len() + 1);
    out.insert("event_id".into(), Value::String(new_id("event")));
    for (k, v) in std::mem::take(obj) {
        out.insert(k, v);
    }
    if dialect == Dialect::Beta {
        let ga = out.get("type").and_then(Value::as_str).unwrap_or("").to_string();
        if ga == "conversation.item.done" {
            return None;
        }
        out.insert("type".into(), Value::String(beta_event_name(&ga).to_string()));
        beta_content_types(&mut out);
    }
    Some(Value::Object(out).to_string())
}

/// GA content types → beta content types, anywhere in the event.
fn beta_content_types(obj: &mut Map<String, Value>) {
    for (key, v) in obj.iter_mut() {
        match v {
            Value::Object(m) => beta_content_types(m),
            Value::Array(items) => {
                for it in items {
                    if let Value::Object(m) = it {
                        beta_content_types(m);
                    }
                }
            }
            Value::String(s) if key == "type" => {
                if s == "output_text" {
                    *s = "text".into();
                } else if s == "output_audio" {
                    *s = "audio".into();
                }
            }
            _ => {}
        }
    }
}

/// A fresh protocol id such as `event_Xk3…`: prefix plus 20 random alphanumerics.
pub fn new_id(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 21);
    s.push_str(prefix);
    s.push('_');
    for _ in 0..20 {
        s.push(fastrand::alphanumeric());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ga_session_update_with_null_turn_detection() {
        let env = parse_client_event(
            r#"{"type":"session.update","event_id":"e1","session":{"type":"realtime","audio":{"input":{"turn_detection":null}}}}"#,
        )
        .unwrap();
        assert_eq!(env.event_id.as_deref(), Some("e1"));
        let ClientEvent::SessionUpdate { session } = env.event else { panic!() };
        assert!(matches!(session.audio.unwrap().input.unwrap().turn_detection, Some(None)));
    }

    #[test]
    fn wrong_field_type_names_the_field_and_event() {
        let err = parse_client_event(
            r#"{"type":"session.update","event_id":"e7","session":{"audio":{"input":{"turn_detection":{"type":"server_vad","threshold":"high"}}}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.event_id.as_deref(), Some("e7"));
        assert_eq!(err.param.as_deref(), Some("session.audio.input.turn_detection.threshold"));
    }

    #[test]
    fn unknown_type_and_bad_json_are_errors() {
        assert_eq!(parse_client_event("{nope").unwrap_err().code, "invalid_json");
        let e = parse_client_event(r#"{"type":"foo.bar","event_id":"x"}"#).unwrap_err();
        assert_eq!((e.code, e.param.as_deref(), e.event_id.as_deref()), ("invalid_value", Some("type"), Some("x")));
    }

    #[test]
    fn beta_dialect_renames_text_events_and_content() {
        let ev = ServerEvent::ResponseOutputTextDelta {
            response_id: "r".into(),
            item_id: "i".into(),
            output_index: 0,
            content_index: 0,
            delta: "hi".into(),
        };
        let v: Value = serde_json::from_str(&to_wire(&ev, Dialect::Beta).unwrap()).unwrap();
        assert_eq!(v["type"], "response.text.delta");
        assert!(v["event_id"].as_str().unwrap().starts_with("event_"));
        let part = ServerEvent::ResponseContentPartAdded {
            response_id: "r".into(),
            item_id: "i".into(),
            output_index: 0,
            content_index: 0,
            part: json!({"type": "text", "text": ""}),
        };
        let v: Value = serde_json::from_str(&to_wire(&part, Dialect::Ga).unwrap()).unwrap();
        assert_eq!(v["part"]["type"], "text");
        let item = Item {
            id: "i".into(),
            object: "realtime.item",
            kind: ItemKind::Message,
            status: ItemStatus::Completed,
            role: Some(Role::Assistant),
            content: Some(vec![ContentPart::output_text("x")]),
            call_id: None,
            name: None,
            arguments: None,
            output: None,
        };
        let added = ServerEvent::ConversationItemAdded { previous_item_id: None, item: item.clone() };
        let v: Value = serde_json::from_str(&to_wire(&added, Dialect::Beta).unwrap()).unwrap();
        assert_eq!(v["type"], "conversation.item.created");
        assert_eq!(v["item"]["content"][0]["type"], "text");
        assert!(to_wire(&ServerEvent::ConversationItemDone { previous_item_id: None, item }, Dialect::Beta).is_none());
    }
}
