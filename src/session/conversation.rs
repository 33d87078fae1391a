//! The session's conversation: ordered items, with the audio and images they carry.

use std::sync::Arc;

use crate::context::{WindowItem, WindowItemKind};
use crate::model::{ChatMessage, ToolCall, UserPart};
use super::calls::CallAnswer;
use crate::protocol::{Item, ItemKind, Role};

/// Media behind one content part; the wire [`Item`] never carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    None,
    /// 16 kHz mono samples at wire precision.
    Audio(Arc<Vec<i16>>),
    /// `data:image/…;base64,…`
    Image(Arc<String>),
    /// An assistant's spoken part: where each spoken segment ends, so a truncation
    /// keeps exactly the words the user heard.
    Spoken(Arc<SpokenMarks>),
}

/// The timeline of an assistant's audio part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpokenMarks {
    /// Per segment: its end (24 kHz samples from the part's start) and the transcript's
    /// byte length once it is included.
    pub segments: Vec<(u64, usize)>,
}

impl SpokenMarks {
    /// Length of the part's audio in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.segments.last().map_or(0, |(end, _)| end * 1000 / crate::speech::OUTPUT_SAMPLE_RATE as u64)
    }

    /// Transcript bytes heard by `audio_end_ms`: the segments that had started playing
    /// (a half-heard sentence counts as heard, as a listener would remember it).
    pub fn transcript_len_at(&self, audio_end_ms: u64) -> usize {
        let end = audio_end_ms * crate::speech::OUTPUT_SAMPLE_RATE as u64 / 1000;
        let mut start = 0;
        let mut len = 0;
        for &(seg_end, seg_len) in &self.segments {
            if start >= end {
                break;
            }
            len = seg_len;
            start = seg_end;
        }
        len
    }
}

#[derive(Debug, Clone)]
pub struct ConversationItem {
    pub item: Item,
    /// One entry per `item.content` part.
    pub payloads: Vec<Payload>,
    /// Never evicted from the context window (hark extension: `item.pinned`).
    pub pinned: bool,
    /// An assistant reply the user cut short (a truncation dropped words): the model
    /// is told so, or it would go on as if everything had been heard.
    pub cut: bool,
}

/// What the model sees after a reply the user cut short.
pub const CUT_NOTE: &str = " [interrupted: the user spoke over this reply and did not hear the rest]";

impl ConversationItem {
    pub fn new(item: Item, payloads: Vec<Payload>) -> Self {
        Self { item, payloads, pinned: false, cut: false }
    }

    /// What the item holds in memory: its media and text, plus a flat cost for the rest.
    pub fn bytes(&self) -> u64 {
        let media: usize = self
            .payloads
            .iter()
            .map(|p| match p {
                Payload::None => 0,
                Payload::Audio(a) => a.len() * std::mem::size_of::<i16>(),
                Payload::Image(url) => url.len(),
                Payload::Spoken(m) => m.segments.len() * 16,
            })
            .sum();
        let it = &self.item;
        let text: usize = it
            .content
            .iter()
            .flatten()
            .map(|p| p.text.as_ref().map_or(0, String::len) + p.transcript.as_ref().and_then(|t| t.as_ref()).map_or(0, String::len))
            .sum();
        let fields = [&it.arguments, &it.output, &it.name, &it.call_id].iter().map(|f| f.as_ref().map_or(0, String::len)).sum::<usize>();
        let extra = it.error.as_ref().map_or(0, |e| e.to_string().len()) + it.tools.as_ref().map_or(0, |t| t.iter().map(|v| v.to_string().len()).sum());
        (media + text + fields + extra) as u64 + ITEM_OVERHEAD
    }
}

/// Bookkeeping per item besides its content (ids, status, the `Vec`s themselves).
const ITEM_OVERHEAD: u64 = 256;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConversationError {
    #[error("Item with item_id '{0}' not found.")]
    NotFound(String),
    #[error("Item with item_id '{0}' already exists.")]
    Duplicate(String),
}

/// The items in order. It has no limits of its own: the session rolls it (see
/// `rolling.rs`) to keep its item count and bytes within the session's limits, so
/// an item that must enter (a call's answer, the model's output) always can.
#[derive(Debug, Default)]
pub struct Conversation {
    items: Vec<ConversationItem>,
    /// Sum of [`ConversationItem::bytes`], kept up to date on insert; `None` after any
    /// other change, recounted when next asked.
    bytes: Option<u64>,
}

impl Conversation {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the conversation holds (see [`ConversationItem::bytes`]).
    pub fn bytes(&mut self) -> u64 {
        *self.bytes.get_or_insert_with(|| self.items.iter().map(ConversationItem::bytes).sum())
    }

    fn touch(&mut self) {
        self.bytes = None;
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The items, in order.
    pub fn items(&self) -> Vec<&Item> {
        self.items.iter().map(|ci| &ci.item).collect()
    }

    pub fn last_id(&self) -> Option<String> {
        self.items.last().map(|i| i.item.id.clone())
    }

    /// Inserts after `previous` (`None`: at the end; `Some("root")`: at the start).
    /// Returns the id of the item now before it.
    pub fn insert(&mut self, previous: Option<&str>, item: ConversationItem) -> Result<Option<String>, ConversationError> {
        if self.get(&item.item.id).is_some() {
            return Err(ConversationError::Duplicate(item.item.id.clone()));
        }
        let at = match previous {
            None => self.items.len(),
            Some("root") => 0,
            Some(id) => self.position(id).ok_or_else(|| ConversationError::NotFound(id.to_string()))? + 1,
        };
        let before = if at == 0 { None } else { Some(self.items[at - 1].item.id.clone()) };
        let added = item.bytes();
        self.items.insert(at, item);
        self.bytes = self.bytes.map(|b| b + added);
        Ok(before)
    }

    pub fn get(&self, id: &str) -> Option<&ConversationItem> {
        self.items.iter().find(|i| i.item.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut ConversationItem> {
        self.touch();
        self.items.iter_mut().find(|i| i.item.id == id)
    }

    pub fn delete(&mut self, id: &str) -> Result<ConversationItem, ConversationError> {
        let at = self.position(id).ok_or_else(|| ConversationError::NotFound(id.to_string()))?;
        self.touch();
        Ok(self.items.remove(at))
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.items.iter().position(|i| i.item.id == id)
    }

    /// The `mcp_call` item of the model's call `call_id`.
    pub fn mcp_call_mut(&mut self, call_id: &str) -> Option<&mut ConversationItem> {
        self.touch();
        self.items.iter_mut().find(|ci| ci.item.kind == ItemKind::McpCall && ci.item.call_id.as_deref() == Some(call_id))
    }

    /// The conversation as chat messages for a backend. A function call joins the
    /// assistant message before it, as chat-completions servers expect.
    pub fn to_messages(&self) -> Vec<ChatMessage> {
        self.messages_of(0, self.items.len())
    }

    /// What the context window needs of each item, in order.
    pub fn window_items(&self) -> Vec<WindowItem> {
        self.items
            .iter()
            .map(|ci| WindowItem {
                id: ci.item.id.clone(),
                kind: match (ci.item.kind, ci.item.role) {
                    (ItemKind::Message, Some(Role::User)) => WindowItemKind::User,
                    (ItemKind::FunctionCall, _) => WindowItemKind::Call,
                    (ItemKind::FunctionCallOutput, _) => WindowItemKind::CallOutput,
                    _ => WindowItemKind::Other,
                },
                pinned: ci.pinned || ci.item.role == Some(Role::System),
            })
            .collect()
    }

    /// Chat messages of the `len` items from `start`.
    pub fn messages_of(&self, start: usize, len: usize) -> Vec<ChatMessage> {
        let end = (start + len).min(self.items.len());
        chat_messages(self.items[start.min(end)..end].iter())
    }

    /// Chat messages of every item except those named.
    pub fn messages_without(&self, ids: &[String]) -> Vec<ChatMessage> {
        chat_messages(self.items.iter().filter(|ci| !ids.contains(&ci.item.id)))
    }
}

fn chat_messages<'a>(items: impl Iterator<Item = &'a ConversationItem>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::new();
    // Answers of `mcp_call` items, held back until the calls written beside them are
    // all in the assistant message (the model wrote them together).
    let mut answers: Vec<ChatMessage> = Vec::new();
    for ci in items {
        let it = &ci.item;
        if !matches!(it.kind, ItemKind::FunctionCall | ItemKind::McpCall) {
            out.append(&mut answers);
        }
        match it.kind {
            ItemKind::Message => {
                let parts = it.content.as_deref().unwrap_or_default();
                match it.role {
                    Some(Role::User) => {
                        let mut user = Vec::new();
                        for (part, payload) in parts.iter().zip(&ci.payloads) {
                            match payload {
                                Payload::Audio(a) => user.push(UserPart::Audio(a.clone())),
                                Payload::Image(url) => user.push(UserPart::Image(url.clone())),
                                Payload::None | Payload::Spoken(_) => {
                                    if let Some(t) = &part.text {
                                        user.push(UserPart::Text(t.clone()));
                                    }
                                }
                            }
                        }
                        if !user.is_empty() {
                            out.push(ChatMessage::User(user));
                        }
                    }
                    Some(Role::System) => {
                        let text: Vec<&str> = parts.iter().filter_map(|p| p.text.as_deref()).collect();
                        out.push(ChatMessage::System(text.join("\n")));
                    }
                    Some(Role::Assistant) | None => {
                        // A spoken part's transcript is what the model said.
                        let mut text: String =
                            parts.iter().filter_map(|p| p.text.as_deref().or(p.transcript.as_ref().and_then(|t| t.as_deref()))).collect();
                        if ci.cut {
                            text.push_str(CUT_NOTE);
                        }
                        out.push(ChatMessage::Assistant { text, tool_calls: Vec::new() });
                    }
                }
            }
            ItemKind::FunctionCall | ItemKind::McpCall => {
                if let Some(answer) = (it.kind == ItemKind::McpCall).then(|| CallAnswer::of_item(it)).flatten() {
                    answers.push(ChatMessage::Tool { call_id: it.call_id.clone().unwrap_or_default(), output: answer.for_model() });
                }
                let call = ToolCall {
                    call_id: it.call_id.clone().unwrap_or_default(),
                    name: it.name.clone().unwrap_or_default(),
                    arguments: it.arguments.clone().unwrap_or_default(),
                };
                match out.last_mut() {
                    Some(ChatMessage::Assistant { tool_calls, .. }) => tool_calls.push(call),
                    _ => out.push(ChatMessage::Assistant { text: String::new(), tool_calls: vec![call] }),
                }
            }
            ItemKind::FunctionCallOutput => out.push(ChatMessage::Tool {
                call_id: it.call_id.clone().unwrap_or_default(),
                output: it.output.clone().unwrap_or_default(),
            }),
            // The model has the tools in its prompt already.
            ItemKind::McpListTools => {}
        }
    }
    out.append(&mut answers);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ContentPart, ItemStatus};

    fn msg(id: &str, role: Role, text: &str) -> ConversationItem {
        ConversationItem {
            item: Item::message(id, ItemStatus::Completed, role, vec![ContentPart::input_text(text)]),
            payloads: vec![Payload::None],
            pinned: false,
            cut: false,
        }
    }

    #[test]
    fn insert_after_and_root() {
        let mut c = Conversation::new();
        assert_eq!(c.insert(None, msg("a", Role::User, "1")).unwrap(), None);
        assert_eq!(c.insert(None, msg("b", Role::User, "2")).unwrap(), Some("a".into()));
        assert_eq!(c.insert(Some("root"), msg("z", Role::User, "0")).unwrap(), None);
        assert_eq!(c.insert(Some("a"), msg("m", Role::User, "1.5")).unwrap(), Some("a".into()));
        assert_eq!(c.insert(Some("nope"), msg("q", Role::User, "")).unwrap_err(), ConversationError::NotFound("nope".into()));
        assert_eq!(c.insert(None, msg("a", Role::User, "")).unwrap_err(), ConversationError::Duplicate("a".into()));
        let order: Vec<_> = c.items.iter().map(|i| i.item.id.as_str()).collect();
        assert_eq!(order, ["z", "a", "m", "b"]);
        assert_eq!(c.to_messages().len(), 4);
    }

    #[test]
    fn bytes_follow_every_change() {
        let mut c = Conversation::new();
        let audio = ConversationItem::new(
            Item::message("v", ItemStatus::Completed, Role::User, vec![ContentPart::input_audio()]),
            vec![Payload::Audio(Arc::new(vec![0i16; 16_000]))],
        );
        c.insert(None, audio).unwrap();
        c.insert(None, msg("a", Role::User, "hello")).unwrap();
        // One second of 16 kHz audio is 32 KB at wire precision, not 64 KB as f32.
        assert_eq!(c.bytes(), 32_000 + 5 + 2 * ITEM_OVERHEAD);
        c.get_mut("a").unwrap().item.content.as_mut().unwrap()[0].text = Some("hello, world".into());
        assert_eq!(c.bytes(), 32_000 + 12 + 2 * ITEM_OVERHEAD);
        c.delete("v").unwrap();
        assert_eq!(c.bytes(), 12 + ITEM_OVERHEAD);
    }
}
