//! Conversation items from the client: `conversation.item.create` (messages with text,
//! audio and images; function calls and their outputs) and `conversation.item.truncate`.

use std::sync::Arc;

use base64::Engine;

use super::conversation::{self, ConversationItem, Payload};
use super::{calls, Session, MAX_IMAGE_URL_BYTES};
use crate::media::AudioPipeline;
use crate::protocol::{
    new_id, ContentInput, ContentPart, Item, ItemInput, ItemKind, ItemStatus, ProtocolError, Role, ServerEvent, MAX_APPEND_BYTES,
};

impl Session {
    pub(super) fn create_item(&mut self, previous: Option<String>, input: ItemInput) -> Result<(), ProtocolError> {
        let ci = self.item_from_input(input)?;
        let item = ci.item.clone();
        let answers_call = match (item.kind, &item.call_id) {
            (ItemKind::FunctionCallOutput, Some(id)) => Some(id.clone()),
            _ => None,
        };
        if let Some(id) = &answers_call {
            // Every call is answered once: a second output (or one for a call hark
            // already answered) would leave the model two results for one call.
            if self.calls.is_answered(id) {
                return Err(ProtocolError::new(
                    "tool_output_duplicate",
                    format!("Call '{id}' already has its output; each call is answered exactly once."),
                )
                .param("item.call_id"));
            }
            if let Some(call) = self.calls.get(id) {
                if matches!(call.answerer, calls::Answerer::Server { .. }) {
                    return Err(ProtocolError::new(
                        "tool_output_not_allowed",
                        format!("Call '{id}' is a hark tool ({}); hark answers it.", call.name),
                    )
                    .param("item.call_id"));
                }
            }
        }
        // A call's answer always enters (the window rolls after it); anything else
        // needs room in the session's limits.
        if answers_call.is_none() {
            self.make_room(1, ci.bytes())?;
        }
        if item.role == Some(Role::User) {
            self.tool_rounds = 0;
        }
        let previous_item_id = self.conversation.insert(previous.as_deref(), ci).map_err(|e| match e {
            conversation::ConversationError::NotFound(_) => ProtocolError::new("item_not_found", e.to_string()).param("previous_item_id"),
            conversation::ConversationError::Duplicate(_) => ProtocolError::new("duplicate_item_id", e.to_string()).param("item.id"),
        })?;
        self.new_input();
        let answered = answers_call.is_some_and(|id| self.calls.claim(&id));
        self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
        self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
        if answered {
            self.start_deferred_response();
        }
        Ok(())
    }

    /// Starts the response a client asked for once its calls are all answered.
    pub(super) fn start_deferred_response(&mut self) {
        if self.calls.client_calls_pending() > 0 {
            return;
        }
        if let Some(params) = self.deferred_response.take() {
            if let Err(e) = self.hark_create_response(params) {
                self.events.push(ServerEvent::from_protocol_error(e));
            }
        }
    }

    pub(super) fn item_from_input(&self, input: ItemInput) -> Result<ConversationItem, ProtocolError> {
        let id = input.id.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| new_id("item"));
        if id.len() > 64 {
            return Err(ProtocolError::new("invalid_value", "'item.id' is longer than 64 characters.").param("item.id"));
        }
        let missing = |field: &str| {
            ProtocolError::new("missing_required_parameter", format!("Missing required parameter: 'item.{field}'."))
                .param(format!("item.{field}"))
        };
        let mut payloads = Vec::new();
        let item = match input.kind.as_str() {
            "message" => {
                let role = match input.role.as_deref() {
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("system") => Role::System,
                    Some(other) => {
                        return Err(ProtocolError::new(
                            "invalid_value",
                            format!("Invalid value: '{other}'. Supported values are: 'user', 'assistant' and 'system'."),
                        )
                        .param("item.role"))
                    }
                    None => return Err(missing("role")),
                };
                let content = input.content.ok_or_else(|| missing("content"))?;
                let mut parts = Vec::with_capacity(content.len());
                for (i, c) in content.into_iter().enumerate() {
                    let (part, payload) = self.content_from_input(role, i, c)?;
                    parts.push(part);
                    payloads.push(payload);
                }
                Item::message(id, ItemStatus::Completed, role, parts)
            }
            "function_call" => {
                let name = input.name.ok_or_else(|| missing("name"))?;
                let call_id = input.call_id.unwrap_or_else(|| new_id("call"));
                Item::function_call(id, ItemStatus::Completed, call_id, name, input.arguments.unwrap_or_else(|| "{}".into()))
            }
            "function_call_output" => {
                let call_id = input.call_id.ok_or_else(|| missing("call_id"))?;
                Item::function_call_output(id, call_id, input.output.ok_or_else(|| missing("output"))?)
            }
            other => {
                return Err(ProtocolError::new(
                    "invalid_value",
                    format!("Invalid value: '{other}'. Supported values are: 'message', 'function_call' and 'function_call_output'."),
                )
                .param("item.type"))
            }
        };
        Ok(ConversationItem { item, payloads, pinned: input.pinned.unwrap_or(false), cut: false })
    }

    pub(super) fn content_from_input(&self, role: Role, i: usize, c: ContentInput) -> Result<(ContentPart, Payload), ProtocolError> {
        let param = |f: &str| format!("item.content[{i}].{f}");
        let need = |v: Option<String>, f: &str| {
            v.ok_or_else(|| {
                ProtocolError::new("missing_required_parameter", format!("Missing required parameter: '{}'.", param(f))).param(param(f))
            })
        };
        match (role, c.kind.as_str()) {
            (Role::User | Role::System, "input_text") => Ok((ContentPart::input_text(need(c.text, "text")?), Payload::None)),
            (Role::Assistant, "output_text" | "text") => Ok((ContentPart::output_text(need(c.text, "text")?), Payload::None)),
            (Role::User, "input_audio") => {
                let b64 = need(c.audio, "audio")?;
                if b64.len() / 4 * 3 > MAX_APPEND_BYTES {
                    return Err(ProtocolError::new("audio_too_large", "input_audio carries at most 15 MiB.").param(param("audio")));
                }
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(&b64)
                    .map_err(|e| ProtocolError::new("invalid_base64", format!("'{}' is not valid base64: {e}.", param("audio"))).param(param("audio")))?;
                // A clip of its own: decode and resample with a fresh pipeline.
                let mut p = AudioPipeline::new(self.settings.input_format, None).expect("supported rate");
                let mut samples = p
                    .push_bytes(&bytes)
                    .map_err(|e| ProtocolError::new("invalid_audio", format!("{}: {e}", param("audio"))).param(param("audio")))?
                    .samples;
                samples.extend(p.flush().map(|o| o.samples).unwrap_or_default());
                let mut part = ContentPart::input_audio();
                part.transcript = Some(c.transcript);
                Ok((part, Payload::Audio(Arc::new(crate::media::pcm::to_pcm16(&samples)))))
            }
            (Role::User, "input_image") => {
                let url = need(c.image_url, "image_url")?;
                if url.len() > MAX_IMAGE_URL_BYTES {
                    return Err(ProtocolError::new("image_too_large", "input_image is limited to 20 MiB.").param(param("image_url")));
                }
                check_image_data_url(&url).map_err(|m| ProtocolError::new("invalid_image", m).param(param("image_url")))?;
                let url = self.image_within_budget(url).map_err(|m| ProtocolError::new("image_too_large", m).param(param("image_url")))?;
                Ok((ContentPart { kind: "input_image", text: None, transcript: None, image_url: None }, Payload::Image(Arc::new(url))))
            }
            (_, other) => Err(ProtocolError::new(
                "invalid_value",
                format!("Content type '{other}' is not allowed in a {} message.", role_name(role)),
            )
            .param(param("type"))),
        }
    }

    /// An upload over `session.limits.max_image_bytes` is kept re-encoded (JPEG, at
    /// most the model's largest image size), decoded once here, not as sent.
    fn image_within_budget(&self, url: String) -> Result<String, String> {
        let max = self.deps.max_image_bytes;
        if url.len() <= max {
            return Ok(url);
        }
        let data = url.split_once(',').map_or("", |(_, d)| d);
        let bytes = base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| e.to_string())?;
        // The model's largest image: 1120 patches of 48×48 pixels.
        const MODEL_MAX_PIXELS: u64 = 1120 * 48 * 48;
        // The base64 text must fit, so the JPEG gets 3/4 of the budget.
        let jpeg = super::input::run_heavy(bytes.len(), || crate::media::reencode::shrink_to_fit(&bytes, MODEL_MAX_PIXELS, max / 4 * 3))
            .map_err(|e| format!("input_image is over {max} bytes (session.limits.max_image_bytes) and could not be re-encoded: {e}"))?;
        Ok(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg)))
    }

    /// `conversation.item.truncate`: the assistant item keeps only what the user heard.
    /// For a spoken item, the transcript keeps the segments that had started playing by
    /// `audio_end_ms`; the rest leaves the conversation and so the model's context. A
    /// text item has no audio: the only valid cut is `audio_end_ms: 0`, which empties it.
    pub(super) fn truncate_item(&mut self, item_id: String, content_index: u32, audio_end_ms: u64) -> Result<(), ProtocolError> {
        if self.response.as_ref().is_some_and(|r| r.has_output(&item_id)) {
            return Err(ProtocolError::new("invalid_value", "The item is still being generated; cancel the response first.").param("item_id"));
        }
        let ci = self.conversation.get_mut(&item_id).ok_or_else(|| not_found(&item_id))?;
        if ci.item.kind != ItemKind::Message || ci.item.role != Some(Role::Assistant) {
            return Err(ProtocolError::new("invalid_value", "Only assistant messages can be truncated.").param("item_id"));
        }
        let parts = ci.item.content.as_ref().map_or(0, Vec::len);
        if content_index as usize >= parts {
            return Err(ProtocolError::new(
                "invalid_value",
                format!("content_index {content_index} is out of range: the item has {parts} content part(s)."),
            )
            .param("content_index"));
        }
        let marks = match ci.payloads.get(content_index as usize) {
            Some(conversation::Payload::Spoken(m)) => Some(m.clone()),
            _ => None,
        };
        let audio_ms = marks.as_ref().map_or(0, |m| m.duration_ms());
        if audio_end_ms > audio_ms {
            return Err(ProtocolError::new(
                "invalid_value",
                format!("audio_end_ms {audio_end_ms} is past the end of the item's audio ({audio_ms} ms)."),
            )
            .param("audio_end_ms"));
        }
        let mut cut = false;
        if let Some(part) = ci.item.content.as_mut().and_then(|c| c.get_mut(content_index as usize)) {
            match (&marks, part.transcript.as_mut()) {
                (Some(m), Some(Some(t))) => {
                    let keep = m.transcript_len_at(audio_end_ms).min(t.len());
                    cut = keep < t.len();
                    t.truncate(keep);
                }
                _ => {
                    if let Some(t) = part.text.as_mut() {
                        cut = !t.is_empty();
                        t.clear();
                    }
                }
            }
        }
        ci.cut |= cut;
        self.events.push(ServerEvent::ConversationItemTruncated { item_id, content_index, audio_end_ms });
        Ok(())
    }
}

pub(super) fn not_found(item_id: &str) -> ProtocolError {
    ProtocolError::new("item_not_found", format!("Item with item_id '{item_id}' not found.")).param("item_id")
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::System => "system",
    }
}

/// Accepts `data:image/{png,jpeg,webp,gif};base64,…` with valid base64.
fn check_image_data_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("data:").ok_or("image_url must be a data: URL (data:image/png;base64,…)")?;
    let (meta, data) = rest.split_once(',').ok_or("image_url has no ',' separating the data")?;
    let mime = meta.strip_suffix(";base64").ok_or("image_url must be base64-encoded (';base64')")?;
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg" | "image/webp" | "image/gif") {
        return Err(format!("unsupported image type '{mime}'; use PNG, JPEG, WebP or GIF"));
    }
    base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| format!("image data is not valid base64: {e}"))?;
    Ok(())
}
