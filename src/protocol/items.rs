//! Conversation items and their content parts, as the protocol shows them.

use serde::Serialize;
use serde_json::Value;

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
    /// `mcp_call` / `mcp_list_tools`: the tool set (`hark`, or an MCP server's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_label: Option<String>,
    /// `mcp_call`: why the call failed, `{type: "tool_execution_error", message}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// `mcp_list_tools`: `{name, description, input_schema}` of each tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
}

impl Item {
    /// A message item: `role` says who speaks, `content` what was said.
    pub fn message(id: impl Into<String>, status: ItemStatus, role: Role, content: Vec<ContentPart>) -> Self {
        Self { role: Some(role), content: Some(content), ..Self::bare(id.into(), ItemKind::Message, status) }
    }

    /// A call of the model's: `arguments` is JSON text, as the model wrote it.
    pub fn function_call(id: impl Into<String>, status: ItemStatus, call_id: String, name: String, arguments: String) -> Self {
        Self {
            call_id: Some(call_id),
            name: Some(name),
            arguments: Some(arguments),
            ..Self::bare(id.into(), ItemKind::FunctionCall, status)
        }
    }

    /// The answer to the call `call_id`.
    pub fn function_call_output(id: impl Into<String>, call_id: String, output: String) -> Self {
        Self { call_id: Some(call_id), output: Some(output), ..Self::bare(id.into(), ItemKind::FunctionCallOutput, ItemStatus::Completed) }
    }

    /// A call of a tool hark runs itself. `call_id` is the model's id for the call (the
    /// protocol's `mcp_call` has none; clients ignore it, the model's context needs it).
    pub fn mcp_call(id: impl Into<String>, server_label: String, call_id: String, name: String, arguments: String) -> Self {
        Self {
            server_label: Some(server_label),
            call_id: Some(call_id),
            name: Some(name),
            arguments: Some(arguments),
            ..Self::bare(id.into(), ItemKind::McpCall, ItemStatus::InProgress)
        }
    }

    /// The tools of one tool set, announced to the client.
    pub fn mcp_list_tools(id: impl Into<String>, server_label: String, tools: Vec<Value>) -> Self {
        Self { server_label: Some(server_label), tools: Some(tools), ..Self::bare(id.into(), ItemKind::McpListTools, ItemStatus::Completed) }
    }

    fn bare(id: String, kind: ItemKind, status: ItemStatus) -> Self {
        Self {
            id,
            object: "realtime.item",
            kind,
            status,
            role: None,
            content: None,
            call_id: None,
            name: None,
            arguments: None,
            output: None,
            server_label: None,
            error: None,
            tools: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    Message,
    FunctionCall,
    FunctionCallOutput,
    /// A call hark ran itself (agents SDKs display these and never run them).
    McpCall,
    McpListTools,
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
    /// An assistant's spoken part; `transcript` is what was said.
    pub fn output_audio(transcript: impl Into<String>) -> Self {
        Self { kind: "output_audio", text: None, transcript: Some(Some(transcript.into())), image_url: None }
    }
    pub fn output_text(text: impl Into<String>) -> Self {
        Self { kind: "output_text", text: Some(text.into()), transcript: None, image_url: None }
    }
}
