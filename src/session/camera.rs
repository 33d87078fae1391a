//! Camera frames from a media track (WebRTC video), sampled by the transport: each
//! enters the conversation as a user item — its time in the call as `mm:ss`, then the
//! image — where it falls among the user's audio turns.

use std::sync::Arc;

use super::conversation::{ConversationItem, Payload};
use super::Session;
use crate::protocol::{new_id, ContentPart, Item, ItemStatus, ProtocolError, Role, ServerEvent};

impl Session {
    /// `data_url` is a `data:image/jpeg;base64,…` already sized to the frame budget;
    /// `at_ms` is the frame's time since the call began.
    pub(super) fn add_camera_frame(&mut self, data_url: String, at_ms: u64) {
        let secs = at_ms / 1000;
        let stamp = format!("{:02}:{:02}", secs / 60, secs % 60);
        // The image data stays server-side: events carry the part without the URL (as
        // for client images), so a page is not sent its own camera back.
        let image = ContentPart { kind: "input_image", text: None, transcript: None, image_url: None };
        let item = Item::message(new_id("item"), ItemStatus::Completed, Role::User, vec![ContentPart::input_text(stamp), image]);
        let ci = ConversationItem::new(item.clone(), vec![Payload::None, Payload::Image(Arc::new(data_url))]);
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
