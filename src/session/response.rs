//! One response's lifecycle: backend events in, the protocol's event sequence out.
//!
//! `response.created` → per output item: `output_item.added` (+ `conversation.item.added`)
//! → content part / argument deltas → `…done` events → `response.done`. Every started
//! response ends with exactly one `response.done`, whether it completes, fails or is
//! cancelled.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::conversation::{Conversation, ConversationItem, Payload};
use crate::model::{BackendError, BackendEvent, FinishReason, TokenUsage};
use crate::protocol::{
    new_id, ContentPart, Item, ItemStatus, MaxTokens, ResponseInfo, ResponseStatus, Role, ServerEvent, Usage,
};

/// Why a response was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Barge-in: the user started speaking.
    TurnDetected,
    /// `response.cancel` from the client.
    ClientCancelled,
    /// The daemon is stopping or the client went away.
    Shutdown,
}

impl CancelReason {
    fn as_str(self) -> &'static str {
        match self {
            CancelReason::TurnDetected => "turn_detected",
            CancelReason::ClientCancelled => "client_cancelled",
            CancelReason::Shutdown => "server_shutdown",
        }
    }
}

enum Output {
    Message { item: Item, text: String, open: bool },
    Call { item: Item, backend_index: usize, args: String, open: bool },
}

pub struct ResponseRun {
    pub id: String,
    pub cancel: CancellationToken,
    /// Whether output items join the conversation (`conversation: "none"` makes them not).
    in_conversation: bool,
    modalities: Vec<String>,
    max_output_tokens: MaxTokens,
    metadata: Option<Value>,
    outputs: Vec<Output>,
    text_output: Option<usize>,
}

impl ResponseRun {
    pub fn start(
        in_conversation: bool,
        modalities: Vec<String>,
        max_output_tokens: MaxTokens,
        metadata: Option<Value>,
        events: &mut Vec<ServerEvent>,
    ) -> Self {
        let run = Self {
            id: new_id("resp"),
            cancel: CancellationToken::new(),
            in_conversation,
            modalities,
            max_output_tokens,
            metadata,
            outputs: Vec::new(),
            text_output: None,
        };
        events.push(ServerEvent::ResponseCreated { response: run.info(ResponseStatus::InProgress, None, None) });
        run
    }

    fn info(&self, status: ResponseStatus, details: Option<Value>, usage: Option<TokenUsage>) -> ResponseInfo {
        ResponseInfo {
            id: self.id.clone(),
            object: "realtime.response",
            status,
            status_details: details,
            output: self.outputs.iter().map(|o| self.item_of(o).clone()).collect(),
            conversation_id: self.in_conversation.then(|| "conv_default".to_string()),
            output_modalities: self.modalities.clone(),
            max_output_tokens: self.max_output_tokens.clone(),
            usage: usage.map(|u| Usage {
                total_tokens: u.input_tokens + u.output_tokens,
                input_tokens: u.input_tokens,
                output_tokens: u.output_tokens,
                input_token_details: crate::protocol::InputTokenDetails { cached_tokens: u.cached_input_tokens },
            }),
            metadata: self.metadata.clone(),
        }
    }

    fn item_of<'a>(&self, o: &'a Output) -> &'a Item {
        match o {
            Output::Message { item, .. } | Output::Call { item, .. } => item,
        }
    }

    /// Feeds one backend event. Returns `true` when the response is over.
    pub fn on_backend_event(&mut self, ev: BackendEvent, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> bool {
        match ev {
            BackendEvent::TextDelta(delta) => {
                let idx = match self.text_output {
                    Some(i) => i,
                    None => self.open_message(conv, events),
                };
                let output_index = idx as u32;
                if let Output::Message { item, text, .. } = &mut self.outputs[idx] {
                    text.push_str(&delta);
                    events.push(ServerEvent::ResponseOutputTextDelta {
                        response_id: self.id.clone(),
                        item_id: item.id.clone(),
                        output_index,
                        content_index: 0,
                        delta,
                    });
                }
                false
            }
            BackendEvent::ToolCallStart { index, call_id, name } => {
                self.close_text(ItemStatus::Completed, conv, events);
                let item = Item::function_call(new_id("item"), ItemStatus::InProgress, call_id, name, String::new());
                self.add_output(Output::Call { item, backend_index: index, args: String::new(), open: true }, conv, events);
                false
            }
            BackendEvent::ToolCallArgumentsDelta { index, delta } => {
                let response_id = self.id.clone();
                if let Some((pos, Output::Call { item, args, .. })) = self
                    .outputs
                    .iter_mut()
                    .enumerate()
                    .find(|(_, o)| matches!(o, Output::Call { backend_index, open: true, .. } if *backend_index == index))
                {
                    args.push_str(&delta);
                    events.push(ServerEvent::ResponseFunctionCallArgumentsDelta {
                        response_id,
                        item_id: item.id.clone(),
                        output_index: pos as u32,
                        call_id: item.call_id.clone().unwrap_or_default(),
                        delta,
                    });
                }
                false
            }
            BackendEvent::Done { finish: FinishReason::Cancelled, .. } => {
                self.finish_cancelled(CancelReason::ClientCancelled, conv, events);
                true
            }
            BackendEvent::Done { finish, usage } => {
                let item_status = if finish == FinishReason::Length { ItemStatus::Incomplete } else { ItemStatus::Completed };
                self.close_all(item_status, conv, events);
                let (status, details) = match finish {
                    FinishReason::Length => {
                        (ResponseStatus::Incomplete, Some(json!({"type": "incomplete", "reason": "max_output_tokens"})))
                    }
                    _ => (ResponseStatus::Completed, None),
                };
                events.push(ServerEvent::ResponseDone { response: self.info(status, details, usage) });
                true
            }
            BackendEvent::Error(err) => {
                self.finish_failed(&err, conv, events);
                true
            }
        }
    }

    /// The function calls this response put in the conversation (none for an
    /// out-of-band response), with their final status.
    pub fn call_items(&self) -> Vec<Item> {
        if !self.in_conversation {
            return Vec::new();
        }
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Call { item, .. } => Some(item.clone()),
                Output::Message { .. } => None,
            })
            .collect()
    }

    /// Ends the response early: open items become `incomplete`.
    pub fn finish_cancelled(&mut self, reason: CancelReason, conv: &mut Conversation, events: &mut Vec<ServerEvent>) {
        self.cancel.cancel();
        self.close_all(ItemStatus::Incomplete, conv, events);
        let details = json!({"type": "cancelled", "reason": reason.as_str()});
        events.push(ServerEvent::ResponseDone { response: self.info(ResponseStatus::Cancelled, Some(details), None) });
    }

    fn finish_failed(&mut self, err: &BackendError, conv: &mut Conversation, events: &mut Vec<ServerEvent>) {
        self.close_all(ItemStatus::Incomplete, conv, events);
        events.push(ServerEvent::server_error(err.code(), err.to_string(), None));
        let details = json!({"type": "failed", "error": {"type": "server_error", "code": err.code(), "message": err.to_string()}});
        events.push(ServerEvent::ResponseDone { response: self.info(ResponseStatus::Failed, Some(details), None) });
    }

    fn open_message(&mut self, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> usize {
        let item = Item::message(new_id("item"), ItemStatus::InProgress, Role::Assistant, Vec::new());
        let item_id = item.id.clone();
        let idx = self.add_output(Output::Message { item, text: String::new(), open: true }, conv, events);
        events.push(ServerEvent::ResponseContentPartAdded {
            response_id: self.id.clone(),
            item_id,
            output_index: idx as u32,
            content_index: 0,
            part: json!({"type": "text", "text": ""}),
        });
        self.text_output = Some(idx);
        idx
    }

    fn add_output(&mut self, out: Output, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> usize {
        let item = self.item_of(&out).clone();
        let idx = self.outputs.len();
        self.outputs.push(out);
        events.push(ServerEvent::ResponseOutputItemAdded { response_id: self.id.clone(), output_index: idx as u32, item: item.clone() });
        if self.in_conversation {
            let payloads = vec![Payload::None; item.content.as_ref().map_or(0, Vec::len)];
            // Ids are fresh, and a full conversation only loses this item's history,
            // never the response: the client still sees every event.
            if let Ok(previous_item_id) = conv.insert(None, ConversationItem::new(item.clone(), payloads)) {
                events.push(ServerEvent::ConversationItemAdded { previous_item_id, item });
            }
        }
        idx
    }

    fn close_text(&mut self, status: ItemStatus, conv: &mut Conversation, events: &mut Vec<ServerEvent>) {
        if let Some(idx) = self.text_output.take() {
            self.close(idx, status, conv, events);
        }
    }

    fn close_all(&mut self, status: ItemStatus, conv: &mut Conversation, events: &mut Vec<ServerEvent>) {
        self.text_output = None;
        for idx in 0..self.outputs.len() {
            self.close(idx, status, conv, events);
        }
    }

    fn close(&mut self, idx: usize, status: ItemStatus, conv: &mut Conversation, events: &mut Vec<ServerEvent>) {
        let response_id = self.id.clone();
        let output_index = idx as u32;
        let done_item = match &mut self.outputs[idx] {
            Output::Message { item, text, open } => {
                if !*open {
                    return;
                }
                *open = false;
                events.push(ServerEvent::ResponseOutputTextDone {
                    response_id: response_id.clone(),
                    item_id: item.id.clone(),
                    output_index,
                    content_index: 0,
                    text: text.clone(),
                });
                events.push(ServerEvent::ResponseContentPartDone {
                    response_id: response_id.clone(),
                    item_id: item.id.clone(),
                    output_index,
                    content_index: 0,
                    part: json!({"type": "text", "text": text}),
                });
                item.status = status;
                item.content = Some(vec![ContentPart::output_text(text.clone())]);
                item.clone()
            }
            Output::Call { item, args, open, .. } => {
                if !*open {
                    return;
                }
                *open = false;
                item.status = status;
                item.arguments = Some(args.clone());
                if status == ItemStatus::Completed {
                    events.push(ServerEvent::ResponseFunctionCallArgumentsDone {
                        response_id: response_id.clone(),
                        item_id: item.id.clone(),
                        output_index,
                        call_id: item.call_id.clone().unwrap_or_default(),
                        name: item.name.clone().unwrap_or_default(),
                        arguments: args.clone(),
                    });
                }
                item.clone()
            }
        };
        events.push(ServerEvent::ResponseOutputItemDone { response_id, output_index, item: done_item.clone() });
        if self.in_conversation {
            if let Some(ci) = conv.get_mut(&done_item.id) {
                ci.payloads = vec![Payload::None; done_item.content.as_ref().map_or(0, Vec::len)];
                ci.item = done_item.clone();
                events.push(ServerEvent::ConversationItemDone { previous_item_id: None, item: done_item });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(events: &[ServerEvent]) -> Vec<String> {
        events.iter().map(|e| e.type_name()).collect()
    }

    #[test]
    fn text_then_tool_call_sequence() {
        let mut conv = Conversation::new(100);
        let mut ev = Vec::new();
        let mut run = ResponseRun::start(true, vec!["text".into()], MaxTokens::Inf("inf".into()), None, &mut ev);
        for e in [
            BackendEvent::TextDelta("Hel".into()),
            BackendEvent::TextDelta("lo".into()),
            BackendEvent::ToolCallStart { index: 0, call_id: "c1".into(), name: "f".into() },
            BackendEvent::ToolCallArgumentsDelta { index: 0, delta: "{}".into() },
        ] {
            assert!(!run.on_backend_event(e, &mut conv, &mut ev));
        }
        assert!(run.on_backend_event(BackendEvent::Done { finish: FinishReason::ToolCalls, usage: None }, &mut conv, &mut ev));
        assert_eq!(
            names(&ev),
            [
                "response.created",
                "response.output_item.added",
                "conversation.item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.output_item.added",
                "conversation.item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done",
            ]
        );
        let ServerEvent::ResponseDone { response } = ev.last().unwrap() else { panic!() };
        assert_eq!(response.status, ResponseStatus::Completed);
        assert_eq!(response.output[0].content.as_ref().unwrap()[0].text.as_deref(), Some("Hello"));
        assert_eq!(response.output[1].arguments.as_deref(), Some("{}"));
        assert_eq!(conv.len(), 2);
    }

    #[test]
    fn cancel_marks_items_incomplete_and_ends_once() {
        let mut conv = Conversation::new(100);
        let mut ev = Vec::new();
        let mut run = ResponseRun::start(true, vec!["text".into()], MaxTokens::Count(10), None, &mut ev);
        run.on_backend_event(BackendEvent::TextDelta("a".into()), &mut conv, &mut ev);
        run.finish_cancelled(CancelReason::TurnDetected, &mut conv, &mut ev);
        assert!(run.cancel.is_cancelled());
        let dones: Vec<_> = ev.iter().filter(|e| matches!(e, ServerEvent::ResponseDone { .. })).collect();
        assert_eq!(dones.len(), 1);
        let ServerEvent::ResponseDone { response } = dones[0] else { panic!() };
        assert_eq!(response.status, ResponseStatus::Cancelled);
        assert_eq!(response.status_details.as_ref().unwrap()["reason"], "turn_detected");
        assert_eq!(response.output[0].status, ItemStatus::Incomplete);
    }
}
