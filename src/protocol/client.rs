//! Client events: what a Realtime client may send, parsed and validated.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

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
    /// The server's condition (a full conversation), not the client's mistake:
    /// reported as `server_error` rather than `invalid_request_error`.
    pub server_side: bool,
}

impl ProtocolError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param: None, event_id: None, server_side: false }
    }
    /// A refusal caused by the server's state rather than the request.
    pub fn server(code: &'static str, message: impl Into<String>) -> Self {
        Self { server_side: true, ..Self::new(code, message) }
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
        ProtocolError { code: "invalid_value", message, param, event_id: event_id.clone(), server_side: false }
    })?;
    Ok(ClientEnvelope { event_id, event })
}

/// "a string", "an array", …: a JSON value's kind, for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
