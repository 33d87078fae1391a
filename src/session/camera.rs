//! Camera frames from a media track (WebRTC video), sampled by the transport: each is
//! its time in the call as `mm:ss`, then the image, placed in time among the user's
//! audio turns.
//!
//! Where a frame goes:
//! - sampled while nobody speaks: a user item of its own, `[input_text "mm:ss",
//!   input_image]`, at the end of the conversation;
//! - sampled while the user speaks: held, and added to that turn's own message after
//!   its audio, `[input_audio, input_text "mm:ss", input_image, …]`, when the turn is
//!   committed.
//!
//! Why inside the turn, after its audio: for Gemma 4 a user turn is
//! `<|turn>user … <turn|>`; frames inside the turn read as what the user showed while
//! saying it (the `mm:ss` stamps say when, as in Gemma's video prompts), where separate
//! items would make one utterance several user turns. The audio comes first because it
//! is streamed into the model while the user speaks (streaming prefill): a frame placed
//! before it would change the prompt in front of tokens already computed and throw
//! that work away, whereas frames after it extend the same prefix (≈70 tokens each,
//! prefilled with the response). For Realtime clients it is one user message holding
//! the audio and the frames that went with it.

use std::sync::Arc;

use super::conversation::{ConversationItem, Payload};
use super::Session;
use crate::protocol::{new_id, ContentPart, Item, ItemStatus, ProtocolError, Role, ServerEvent};

/// A frame waiting for the turn it was sampled in.
pub(super) struct HeldFrame {
    stamp: String,
    data_url: Arc<String>,
}

/// Frames held for one turn at most; beyond it (a very long turn at a high rate) the
/// held ones are released as items of their own, so memory stays bounded.
const MAX_HELD_FRAMES: usize = 64;

/// The image part of a frame: the image data stays server-side; events carry the part
/// without the URL (as for client images), so a page is not sent its own camera back.
fn image_part() -> ContentPart {
    ContentPart { kind: "input_image", text: None, transcript: None, image_url: None }
}

impl Session {
    /// `data_url` is a `data:image/jpeg;base64,…` already sized to the frame budget;
    /// `at_ms` is the frame's time since the call began.
    pub(super) fn add_camera_frame(&mut self, data_url: String, at_ms: u64) {
        let secs = at_ms / 1000;
        let frame = HeldFrame { stamp: format!("{:02}:{:02}", secs / 60, secs % 60), data_url: Arc::new(data_url) };
        if self.speech.is_some() {
            if self.held_frames.len() >= MAX_HELD_FRAMES {
                self.release_held_frames();
            }
            self.held_frames.push(frame);
            return;
        }
        self.add_frame_item(frame);
    }

    /// Held frames whose turn was not committed (too short, or the audio path was
    /// rebuilt) become items of their own, in order.
    pub(super) fn release_held_frames(&mut self) {
        for frame in std::mem::take(&mut self.held_frames) {
            self.add_frame_item(frame);
        }
    }

    /// The frames held for the turn being committed: its message's parts after the
    /// audio, with their payloads.
    pub(super) fn take_turn_frames(&mut self) -> (Vec<ContentPart>, Vec<Payload>) {
        let mut parts = Vec::new();
        let mut payloads = Vec::new();
        for frame in std::mem::take(&mut self.held_frames) {
            parts.push(ContentPart::input_text(frame.stamp));
            payloads.push(Payload::None);
            parts.push(image_part());
            payloads.push(Payload::Image(frame.data_url));
        }
        (parts, payloads)
    }

    fn add_frame_item(&mut self, frame: HeldFrame) {
        let item = Item::message(new_id("item"), ItemStatus::Completed, Role::User, vec![ContentPart::input_text(frame.stamp), image_part()]);
        let ci = ConversationItem::new(item.clone(), vec![Payload::None, Payload::Image(frame.data_url)]);
        // A frame is context, not a question: it does not count as new input the model
        // has to answer (see `new_input`), so it never triggers or absorbs a response.
        if let Err(e) = self.make_room(1, ci.bytes()) {
            self.events.push(ServerEvent::from_protocol_error(e));
            return;
        }
        match self.conversation.insert(None, ci) {
            Ok(previous_item_id) => {
                self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
                self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
            }
            Err(e) => self.events.push(ServerEvent::from_protocol_error(ProtocolError::server("duplicate_item_id", e.to_string()))),
        }
    }
}
