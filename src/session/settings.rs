//! A session's configuration and how `session.update` merges into it.
//!
//! Updates are validated whole before anything changes: a bad field leaves the
//! session exactly as it was.

use serde_json::{json, Value};

use super::turn::TurnParams;
use crate::config::{Config, TurnDetectionConfig};
use crate::media::AudioFormat;
use crate::protocol::{
    ga_format_name, MaxTokens, ProtocolError, SessionInfo, SessionUpdate, ToolDeclaration, TurnDetectionUpdate,
};

/// Most tools a session may declare.
const MAX_TOOLS: usize = 128;
/// Longest `instructions` accepted, in bytes.
const MAX_INSTRUCTIONS: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct TurnDetection {
    /// `server_vad` or `semantic_vad`.
    pub kind: String,
    pub threshold: f32,
    pub prefix_padding_ms: u32,
    pub silence_duration_ms: u32,
    pub idle_timeout_ms: Option<u32>,
    pub create_response: bool,
    pub interrupt_response: bool,
    pub eagerness: String,
    /// hark: shorter voiced stretches are noise (config only).
    pub min_speech_ms: u32,
}

impl TurnDetection {
    pub fn params(&self) -> TurnParams {
        TurnParams {
            threshold: self.threshold,
            silence_duration_ms: self.effective_silence_ms(),
            semantic_silence_ms: (self.kind == "semantic_vad").then(|| match self.eagerness.as_str() {
                "high" => (200, 1000),
                "low" => (500, 4000),
                _ => (300, 2000),
            }),
        }
    }

    /// `semantic_vad` without the model's end-of-turn signal (a remote backend):
    /// the eagerness maps onto a fixed silence duration.
    fn effective_silence_ms(&self) -> u32 {
        if self.kind != "semantic_vad" {
            return self.silence_duration_ms;
        }
        match self.eagerness.as_str() {
            "high" => 300,
            "low" => 1200,
            _ => 700,
        }
    }

    fn to_json(&self) -> Value {
        if self.kind == "semantic_vad" {
            return json!({
                "type": "semantic_vad",
                "eagerness": self.eagerness,
                "create_response": self.create_response,
                "interrupt_response": self.interrupt_response,
            });
        }
        json!({
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "idle_timeout_ms": self.idle_timeout_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        })
    }

    fn from_config(c: &TurnDetectionConfig) -> Self {
        Self {
            kind: c.kind.clone(),
            threshold: c.threshold,
            prefix_padding_ms: c.prefix_padding_ms,
            silence_duration_ms: c.silence_duration_ms,
            idle_timeout_ms: c.idle_timeout_ms,
            create_response: c.create_response,
            interrupt_response: c.interrupt_response,
            eagerness: "auto".into(),
            min_speech_ms: c.min_speech_ms,
        }
    }

    fn merged(base: Option<&TurnDetection>, u: &TurnDetectionUpdate, at: &str) -> Result<Self, ProtocolError> {
        if u.kind != "server_vad" && u.kind != "semantic_vad" {
            return Err(ProtocolError::new(
                "invalid_value",
                format!("Invalid value: '{}'. Supported values are: 'server_vad' and 'semantic_vad'.", u.kind),
            )
            .param(format!("{at}.type")));
        }
        let mut t = match base {
            Some(b) if b.kind == u.kind => b.clone(),
            Some(b) => TurnDetection {
                min_speech_ms: b.min_speech_ms,
                ..TurnDetection::from_config(&TurnDetectionConfig { kind: u.kind.clone(), ..Default::default() })
            },
            None => TurnDetection::from_config(&TurnDetectionConfig { kind: u.kind.clone(), ..Default::default() }),
        };
        if let Some(v) = u.threshold {
            if !(0.0..=1.0).contains(&v) {
                return Err(ProtocolError::new("invalid_value", format!("threshold must be between 0 and 1, got {v}."))
                    .param(format!("{at}.threshold")));
            }
            t.threshold = v;
        }
        if let Some(v) = u.prefix_padding_ms {
            if v > 10_000 {
                return Err(ProtocolError::new("invalid_value", "prefix_padding_ms must be at most 10000.").param(format!("{at}.prefix_padding_ms")));
            }
            t.prefix_padding_ms = v;
        }
        if let Some(v) = u.silence_duration_ms {
            if !(100..=10_000).contains(&v) {
                return Err(ProtocolError::new("invalid_value", "silence_duration_ms must be between 100 and 10000.")
                    .param(format!("{at}.silence_duration_ms")));
            }
            t.silence_duration_ms = v;
        }
        if let Some(v) = u.idle_timeout_ms {
            if v.is_some_and(|ms| !(500..=3_600_000).contains(&ms)) {
                return Err(ProtocolError::new("invalid_value", "idle_timeout_ms must be between 500 and 3600000, or null.")
                    .param(format!("{at}.idle_timeout_ms")));
            }
            t.idle_timeout_ms = v;
        }
        if let Some(v) = u.create_response {
            t.create_response = v;
        }
        if let Some(v) = u.interrupt_response {
            t.interrupt_response = v;
        }
        if let Some(v) = &u.eagerness {
            if !matches!(v.as_str(), "low" | "medium" | "high" | "auto") {
                return Err(ProtocolError::new("invalid_value", format!("Invalid value: '{v}'. Supported values are: 'low', 'medium', 'high' and 'auto'."))
                    .param(format!("{at}.eagerness")));
            }
            t.eagerness = v.clone();
        }
        Ok(t)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionSettings {
    pub id: String,
    pub model: String,
    pub instructions: String,
    pub output_modalities: Vec<String>,
    pub input_format: AudioFormat,
    pub output_format: String,
    pub voice: String,
    pub turn_detection: Option<TurnDetection>,
    pub tools: Vec<ToolDeclaration>,
    pub tool_choice: Value,
    pub temperature: f32,
    pub max_output_tokens: MaxTokens,
    pub agent: String,
}

impl SessionSettings {
    pub fn from_config(c: &Config) -> Self {
        let s = &c.session;
        Self {
            id: String::new(),
            model: s.model.clone(),
            instructions: s.instructions.clone(),
            output_modalities: s.output_modalities.clone(),
            input_format: AudioFormat::Pcm16 { rate: 24_000 },
            output_format: "audio/pcm".into(),
            voice: "default".into(),
            turn_detection: s.turn_detection.as_ref().map(TurnDetection::from_config),
            tools: Vec::new(),
            tool_choice: json!("auto"),
            temperature: s.temperature,
            max_output_tokens: s.max_output_tokens.map(MaxTokens::Count).unwrap_or_else(|| MaxTokens::Inf("inf".into())),
            agent: s.agent.clone().unwrap_or_default(),
        }
    }

    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id.clone(),
            model: self.model.clone(),
            instructions: self.instructions.clone(),
            output_modalities: self.output_modalities.clone(),
            input_format: self.input_format.name().to_string(),
            input_rate: self.input_format.sample_rate(),
            output_format: self.output_format.clone(),
            voice: self.voice.clone(),
            turn_detection: self.turn_detection.as_ref().map(TurnDetection::to_json),
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            temperature: self.temperature,
            max_output_tokens: self.max_output_tokens.clone(),
            agent: self.agent.clone(),
        }
    }

    /// This session with `u` applied, or the first problem found.
    pub fn merged(&self, u: &SessionUpdate) -> Result<Self, ProtocolError> {
        let mut s = self.clone();
        if let Some(kind) = &u.kind {
            if kind != "realtime" {
                return Err(ProtocolError::new("invalid_value", format!("Session type '{kind}' is not supported; use 'realtime'."))
                    .param("session.type"));
            }
        }
        if let Some(m) = &u.model {
            s.model = m.clone();
        }
        if let Some(i) = &u.instructions {
            if i.len() > MAX_INSTRUCTIONS {
                return Err(ProtocolError::new("invalid_value", "instructions are limited to 256 KiB.").param("session.instructions"));
            }
            s.instructions = i.clone();
        }
        if let Some(m) = u.output_modalities.as_ref().or(u.modalities.as_ref()) {
            let field = if u.output_modalities.is_some() { "session.output_modalities" } else { "session.modalities" };
            if m.is_empty() || m.iter().any(|x| x != "text" && x != "audio") {
                return Err(ProtocolError::new("invalid_value", "modalities must be a non-empty list of 'text' and 'audio'.").param(field));
            }
            s.output_modalities = m.clone();
        }
        // Input format: GA `audio.input.format` or beta `input_audio_format`.
        let ga_in = u.audio.as_ref().and_then(|a| a.input.as_ref());
        if let Some(f) = ga_in.and_then(|i| i.format.as_ref()) {
            let kind = f.kind.as_deref().unwrap_or("audio/pcm");
            s.input_format = parse_format(kind, "session.audio.input.format.type")?;
            if let (AudioFormat::Pcm16 { .. }, Some(rate)) = (s.input_format, f.rate) {
                if rate != 24_000 {
                    return Err(ProtocolError::new("invalid_value", format!("audio/pcm rate must be 24000, got {rate}."))
                        .param("session.audio.input.format.rate"));
                }
            }
        }
        if let Some(f) = &u.input_audio_format {
            s.input_format = parse_format(f, "session.input_audio_format")?;
        }
        if let Some(f) = u.audio.as_ref().and_then(|a| a.output.as_ref()).and_then(|o| o.format.as_ref()) {
            let kind = f.kind.as_deref().unwrap_or("audio/pcm");
            s.output_format = parse_format(kind, "session.audio.output.format.type")?.name().to_string();
        }
        if let Some(f) = &u.output_audio_format {
            s.output_format = parse_format(f, "session.output_audio_format")?.name().to_string();
        }
        if let Some(v) = u.audio.as_ref().and_then(|a| a.output.as_ref()).and_then(|o| o.voice.clone()).or(u.voice.clone()) {
            s.voice = v;
        }
        let td = ga_in
            .and_then(|i| i.turn_detection.as_ref().map(|t| (t, "session.audio.input.turn_detection")))
            .or(u.turn_detection.as_ref().map(|t| (t, "session.turn_detection")));
        if let Some((td, at)) = td {
            s.turn_detection = match td {
                None => None,
                Some(t) => Some(TurnDetection::merged(self.turn_detection.as_ref(), t, at)?),
            };
        }
        if let Some(tools) = &u.tools {
            if tools.len() > MAX_TOOLS {
                return Err(ProtocolError::new("invalid_value", format!("At most {MAX_TOOLS} tools per session.")).param("session.tools"));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, t) in tools.iter().enumerate() {
                if t.kind != "function" {
                    return Err(ProtocolError::new("invalid_value", format!("Tool type '{}' is not supported; use 'function'.", t.kind))
                        .param(format!("session.tools[{i}].type")));
                }
                if t.name.is_empty() || !seen.insert(t.name.as_str()) {
                    return Err(ProtocolError::new("invalid_value", format!("Tool names must be non-empty and unique: '{}'.", t.name))
                        .param(format!("session.tools[{i}].name")));
                }
            }
            s.tools = tools.clone();
        }
        if let Some(tc) = &u.tool_choice {
            s.tool_choice = tc.clone();
        }
        if let Some(t) = u.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ProtocolError::new("invalid_value", "temperature must be between 0 and 2.").param("session.temperature"));
            }
            s.temperature = t;
        }
        if let Some(m) = u.max_output_tokens.as_ref().or(u.max_response_output_tokens.as_ref()) {
            if let MaxTokens::Inf(word) = m {
                if word != "inf" {
                    return Err(ProtocolError::new("invalid_value", "max_output_tokens must be an integer or 'inf'.").param("session.max_output_tokens"));
                }
            }
            s.max_output_tokens = m.clone();
        }
        if let Some(a) = &u.agent {
            s.agent = a.clone();
        }
        Ok(s)
    }
}

fn parse_format(name: &str, param: &str) -> Result<AudioFormat, ProtocolError> {
    ga_format_name(name).and_then(AudioFormat::from_name).ok_or_else(|| {
        ProtocolError::new(
            "invalid_value",
            format!("Invalid audio format '{name}'. Supported: audio/pcm (pcm16), audio/pcmu (g711_ulaw), audio/pcma (g711_alaw)."),
        )
        .param(param)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_client_event;
    use crate::protocol::ClientEvent;

    fn update(json: &str) -> SessionUpdate {
        match parse_client_event(json).unwrap().event {
            ClientEvent::SessionUpdate { session } => session,
            _ => unreachable!(),
        }
    }

    #[test]
    fn partial_update_keeps_the_rest() {
        let base = SessionSettings::from_config(&Config::default());
        let s = base
            .merged(&update(r#"{"type":"session.update","session":{"type":"realtime","instructions":"be brief","tools":[{"type":"function","name":"f","parameters":{"$schema":"x"}}]}}"#))
            .unwrap();
        let s2 = s.merged(&update(r#"{"type":"session.update","session":{"type":"realtime","tracing":"auto"}}"#)).unwrap();
        assert_eq!(s2.instructions, "be brief");
        assert_eq!(s2.tools.len(), 1);
        assert_eq!(s2.turn_detection, base.turn_detection);
    }

    #[test]
    fn beta_fields_and_null_turn_detection() {
        let base = SessionSettings::from_config(&Config::default());
        let s = base.merged(&update(r#"{"type":"session.update","session":{"input_audio_format":"g711_ulaw","turn_detection":null}}"#)).unwrap();
        assert_eq!(s.input_format, AudioFormat::Pcmu);
        assert!(s.turn_detection.is_none());
    }

    #[test]
    fn bad_values_name_the_field_and_change_nothing() {
        let base = SessionSettings::from_config(&Config::default());
        let e = base
            .merged(&update(r#"{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/flac"}}}}}"#))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("session.audio.input.format.type"));
        let e = base
            .merged(&update(r#"{"type":"session.update","session":{"turn_detection":{"type":"server_vad","threshold":3}}}"#))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("session.turn_detection.threshold"));
    }
}
