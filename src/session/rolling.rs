//! The conversation rolls: past the session's item limit or byte budget, the oldest
//! whole turns leave (announced with `conversation.item.deleted`), so a session can run
//! for days instead of stopping at a full conversation.
//!
//! Checked after every event the session handles (the model's output and tool answers
//! always enter, then the window rolls) and before client data is taken (so it has
//! room, or is refused with `session_memory_exceeded` while the session keeps what it
//! has). Each roll cuts back to `retention_ratio` of the limit, as the token window
//! does (`src/context/`): evictions are rare and each frees a block, since every one
//! costs the embedded model a re-prefill of the window.

use super::Session;
use crate::context::turns;
use crate::protocol::{ProtocolError, ServerEvent};

impl Session {
    /// Charges the conversation and the input buffer at what they hold now, and rolls
    /// the conversation if it is past a limit.
    pub(super) fn keep_within_limits(&mut self) {
        self.buffer_charge.set(self.buffer.samples.len() as u64 * std::mem::size_of::<i16>() as u64);
        self.conversation_charge.set(self.conversation.bytes());
        // Only what the session keeps rolls it: queued messages pass by themselves, and
        // a client slow to read should not cost the conversation its history.
        let kept = self.conversation_charge.bytes() + self.buffer_charge.bytes();
        if self.conversation.len() > self.deps.max_items || kept > self.budget.limit() {
            self.roll(0, 0);
        }
    }

    /// Makes room for `items` more conversation items holding `bytes`, rolling the
    /// conversation if needed, and holds the bytes on the budget (until the next
    /// [`Self::keep_within_limits`] charges what was really added).
    pub(super) fn make_room(&mut self, items: usize, bytes: u64) -> Result<(), ProtocolError> {
        self.keep_within_limits();
        if self.conversation.len() + items > self.deps.max_items {
            self.roll(items, 0);
        }
        let held = self.conversation_charge.bytes();
        if self.conversation_charge.try_set(held + bytes).is_ok() {
            return Ok(());
        }
        self.roll(items, bytes);
        let held = self.conversation.bytes();
        self.conversation_charge.try_set(held + bytes).map_err(|e| e.to_protocol())
    }

    /// Makes room for the input buffer to grow by `bytes`, rolling the conversation
    /// if that is what it takes.
    pub(super) fn make_buffer_room(&mut self, bytes: u64) -> Result<(), ProtocolError> {
        self.keep_within_limits();
        let held = self.buffer_charge.bytes();
        if self.buffer_charge.try_set(held + bytes).is_ok() {
            return Ok(());
        }
        self.roll(0, bytes);
        self.buffer_charge.try_set(held + bytes).map_err(|e| e.to_protocol())
    }

    /// Evicts the oldest whole turns until `extra_items` more items and `extra_bytes`
    /// more bytes fit with room to spare. Pinned items, system messages, the newest
    /// turn and the response being generated stay.
    fn roll(&mut self, extra_items: usize, extra_bytes: u64) {
        let ratio = self.deps.retention.retention_ratio.clamp(0.0, 1.0) as f64;
        let max_items = self.deps.max_items;
        let len = self.conversation.len();
        let items_goal = if len + extra_items > max_items {
            ((max_items as f64 * ratio) as usize).saturating_sub(extra_items)
        } else {
            usize::MAX
        };
        let held = self.conversation.bytes();
        let others = self.budget.used().saturating_sub(self.conversation_charge.bytes());
        let room = self.budget.limit().saturating_sub(others);
        let bytes_goal = if held + extra_bytes > room { ((room as f64 * ratio) as u64).saturating_sub(extra_bytes) } else { u64::MAX };
        if len <= items_goal && held <= bytes_goal {
            return;
        }
        let window = self.conversation.window_items();
        let all = turns(&window);
        let (mut left_items, mut left_bytes) = (len, held);
        let mut evict = Vec::new();
        for t in all.iter().take(all.len().saturating_sub(1)) {
            if left_items <= items_goal && left_bytes <= bytes_goal {
                break;
            }
            let ids = &window[t.start..t.start + t.len];
            let generating = ids.iter().any(|w| self.response.as_ref().is_some_and(|r| r.has_output(&w.id)));
            if t.pinned || generating {
                continue;
            }
            for w in ids {
                left_items -= 1;
                left_bytes -= self.conversation.get(&w.id).map_or(0, |ci| ci.bytes());
                evict.push(w.id.clone());
            }
        }
        if evict.is_empty() {
            return;
        }
        tracing::info!(
            session = %self.settings.id,
            items = evict.len(),
            items_before = len,
            bytes_before = held,
            bytes_after = left_bytes,
            "conversation past its limits: evicted the oldest turns"
        );
        for id in evict {
            if self.conversation.delete(&id).is_ok() {
                self.events.push(ServerEvent::ConversationItemDeleted { item_id: id });
            }
        }
        self.conversation_charge.set(self.conversation.bytes());
    }
}
