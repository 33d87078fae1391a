//! The session object of `session.created` / `session.updated`, and audio format names.

use serde_json::{json, Value};

use super::{Dialect, MaxTokens, ToolDeclaration};

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
    pub(super) fn to_json(&self, dialect: Dialect) -> Value {
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
