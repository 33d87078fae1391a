//! One response's lifecycle: backend events in, the protocol's event sequence out.
//!
//! `response.created` → per output item: `output_item.added` (+ `conversation.item.added`)
//! → content part / argument deltas → `…done` events → `response.done`. Every started
//! response ends with exactly one `response.done`, whether it completes, fails or is
//! cancelled.
//!
//! Calls of tools the client declared are `function_call` items, done when the model
//! has written them. Calls hark answers itself (its YAML and MCP tools, and tools no
//! one has) are `mcp_call` items: the response stays open while they run
//! ([`Step::AwaitingTools`]) and each item is done when its output is in, so that
//! `response.done` carries every result and clients never try to run hark's tools.
//!
//! A response that speaks (`output_modalities: ["audio"]` with a speech engine) feeds
//! the model's text to a [`SpeechStream`] instead of sending text deltas: its message
//! has one `output_audio` part, filled by `response.output_audio.delta` (24 kHz pcm16)
//! and `response.output_audio_transcript.delta` (the words of each spoken segment)
//! as segments are synthesized. The item, and the response, end once the last segment
//! is out, so `response.done` carries the full transcript.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::calls::CallAnswer;
use super::conversation::{Conversation, ConversationItem, Payload, SpokenMarks};
use crate::model::{BackendEvent, FinishReason, TokenUsage};
use crate::speech::{SpeechEvent, SpeechStream};
use crate::protocol::{
    new_id, ContentPart, Item, ItemKind, ItemStatus, MaxTokens, ResponseInfo, ResponseStatus, Role, ServerEvent, Usage,
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
    /// The backend stopped the generation on its own.
    Backend,
}

impl CancelReason {
    fn as_str(self) -> &'static str {
        match self {
            CancelReason::TurnDetected => "turn_detected",
            CancelReason::ClientCancelled => "client_cancelled",
            CancelReason::Shutdown => "server_shutdown",
            CancelReason::Backend => "backend_cancelled",
        }
    }
}

/// Who answers each tool the model may call in one response.
#[derive(Debug, Clone, Default)]
pub struct ToolRouting {
    /// Declared by the client (in the session or in this `response.create`): the
    /// client runs them and answers with `function_call_output`.
    pub client: HashSet<String>,
    /// hark's own tools → `server_label` (`hark`, or the MCP server's name).
    pub hark: HashMap<String, String>,
}

impl ToolRouting {
    /// `None` for a client tool; otherwise the label of the tool set hark answers for
    /// (`hark` also for names no one has: hark answers those with an error).
    pub fn server_label(&self, name: &str) -> Option<&str> {
        if self.client.contains(name) {
            return None;
        }
        Some(self.hark.get(name).map_or("hark", String::as_str))
    }
}

/// Where a response stands after a backend event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The model is still generating.
    Generating,
    /// The model is done; the hark-run calls it made are running. The response ends
    /// (`response.done`) when the last of them is answered.
    AwaitingTools,
    /// `response.done` was sent.
    Done,
}

/// 24 kHz samples per `response.output_audio.delta` (200 ms).
const AUDIO_DELTA_SAMPLES: usize = 4800;

/// The spoken form of a message.
#[derive(Debug, Default)]
struct AudioOut {
    transcript: String,
    marks: SpokenMarks,
    /// 24 kHz samples sent so far.
    samples: u64,
    /// The speech stage still has text to speak.
    speaking: bool,
    /// How the item closes once speech ends (it was closed while still speaking).
    close_as: Option<ItemStatus>,
}

enum Output {
    Message { item: Item, text: String, open: bool, audio: Option<AudioOut> },
    /// A `function_call` or `mcp_call` item (`item.kind` says which). `open`: the model
    /// is still writing its arguments; `answered`: an `mcp_call`'s output is in.
    Call { item: Item, backend_index: usize, args: String, open: bool, answered: bool },
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
    routing: ToolRouting,
    conversation_id: String,
    /// What `response.done` says (set when the model's part ends).
    finish: Option<(ResponseStatus, Option<Value>, Option<TokenUsage>)>,
    /// `response.done` was sent.
    done: bool,
    /// The speech stage, for a response that speaks.
    speech: Option<SpeechStream>,
    /// The output that is being spoken (the first message).
    speech_item: Option<usize>,
    /// When the first text reached the speech stage (for the first-audio latency log).
    first_text_at: Option<Instant>,
}

impl ResponseRun {
    pub fn start(
        in_conversation: bool,
        modalities: Vec<String>,
        max_output_tokens: MaxTokens,
        metadata: Option<Value>,
        routing: ToolRouting,
        conversation_id: String,
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
            routing,
            conversation_id,
            finish: None,
            done: false,
            speech: None,
            speech_item: None,
            first_text_at: None,
        };
        events.push(ServerEvent::ResponseCreated { response: run.info(ResponseStatus::InProgress, None, None) });
        run
    }

    /// Makes this response speak: its first message's text goes to `speech`.
    pub fn speak(&mut self, speech: SpeechStream) {
        self.speech = Some(speech);
    }

    /// The speech stage, while it has something to give out.
    pub fn speech_mut(&mut self) -> Option<&mut SpeechStream> {
        self.speech.as_mut()
    }

    /// Whether the message being spoken still has speech to come.
    pub fn speaking(&self) -> bool {
        self.speech_item.is_some_and(|i| matches!(&self.outputs[i], Output::Message { audio: Some(a), .. } if a.speaking))
    }

    /// Feeds one event of the speech stage (`None`: the stage ended). Returns `true`
    /// when the speech is over (its message is then closed if the model is done with it).
    pub fn on_speech_event(&mut self, ev: Option<SpeechEvent>, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> bool {
        let Some(idx) = self.speech_item else {
            self.speech = None;
            return true;
        };
        let response_id = self.id.clone();
        let Output::Message { item, audio: Some(a), .. } = &mut self.outputs[idx] else {
            self.speech = None;
            return true;
        };
        match ev {
            Some(SpeechEvent::Segment { text, samples, synthesis_ms }) => {
                let delta = if a.transcript.is_empty() { text } else { format!(" {text}") };
                a.transcript.push_str(&delta);
                let (item_id, output_index) = (item.id.clone(), idx as u32);
                if a.samples == 0 {
                    let since_text = self.first_text_at.map(|t| t.elapsed().as_millis()).unwrap_or(0);
                    tracing::info!(response = %response_id, first_text_to_audio_ms = since_text as u64, synthesis_ms, "first audio");
                }
                events.push(ServerEvent::ResponseOutputAudioTranscriptDelta {
                    response_id: response_id.clone(),
                    item_id: item_id.clone(),
                    output_index,
                    content_index: 0,
                    delta,
                });
                for chunk in samples.chunks(AUDIO_DELTA_SAMPLES) {
                    let bytes = crate::media::codec::encode_pcm16(chunk);
                    events.push(ServerEvent::ResponseOutputAudioDelta {
                        response_id: response_id.clone(),
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        delta: base64::engine::general_purpose::STANDARD.encode(bytes),
                    });
                }
                a.samples += samples.len() as u64;
                a.marks.segments.push((a.samples, a.transcript.len()));
                false
            }
            Some(SpeechEvent::Error(e)) => {
                tracing::warn!(response = %response_id, "speech: {e}");
                events.push(ServerEvent::server_error("speech_failed", format!("A sentence could not be spoken: {e}"), None));
                false
            }
            Some(SpeechEvent::Done) | None => {
                a.speaking = false;
                let close_as = a.close_as.take();
                self.speech = None;
                if let Some(status) = close_as {
                    self.close(idx, status, conv, events);
                }
                true
            }
        }
    }

    /// Stops speaking at once (cancel, failure): what was spoken stays the transcript.
    fn stop_speech(&mut self) {
        if let Some(s) = self.speech.take() {
            s.cancel();
        }
        if let Some(Output::Message { audio: Some(a), .. }) = self.speech_item.map(|i| &mut self.outputs[i]) {
            a.speaking = false;
        }
    }

    fn info(&self, status: ResponseStatus, details: Option<Value>, usage: Option<TokenUsage>) -> ResponseInfo {
        ResponseInfo {
            id: self.id.clone(),
            object: "realtime.response",
            status,
            status_details: details,
            output: self.outputs.iter().map(|o| self.item_of(o).clone()).collect(),
            conversation_id: self.in_conversation.then(|| self.conversation_id.clone()),
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

    /// Feeds one backend event.
    pub fn on_backend_event(&mut self, ev: BackendEvent, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> Step {
        match ev {
            BackendEvent::TextDelta(delta) => {
                let idx = match self.text_output {
                    Some(i) => i,
                    None => self.open_message(conv, events),
                };
                let output_index = idx as u32;
                if let Output::Message { item, text, audio, .. } = &mut self.outputs[idx] {
                    text.push_str(&delta);
                    if audio.is_some() {
                        if let Some(s) = self.speech.as_mut() {
                            self.first_text_at.get_or_insert_with(Instant::now);
                            s.push(&delta);
                        }
                        return Step::Generating;
                    }
                    events.push(ServerEvent::ResponseOutputTextDelta {
                        response_id: self.id.clone(),
                        item_id: item.id.clone(),
                        output_index,
                        content_index: 0,
                        delta,
                    });
                }
                Step::Generating
            }
            BackendEvent::ToolCallStart { index, call_id, name } => {
                self.close_text(ItemStatus::Completed, conv, events);
                let item = match self.routing.server_label(&name) {
                    None => Item::function_call(new_id("item"), ItemStatus::InProgress, call_id, name, String::new()),
                    Some(label) => Item::mcp_call(new_id("item"), label.to_string(), call_id, name, String::new()),
                };
                let out = Output::Call { item, backend_index: index, args: String::new(), open: true, answered: false };
                self.add_output(out, conv, events);
                Step::Generating
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
                    let (item_id, output_index) = (item.id.clone(), pos as u32);
                    events.push(match item.kind {
                        ItemKind::McpCall => ServerEvent::ResponseMcpCallArgumentsDelta { response_id, item_id, output_index, delta },
                        _ => ServerEvent::ResponseFunctionCallArgumentsDelta {
                            response_id,
                            item_id,
                            output_index,
                            call_id: item.call_id.clone().unwrap_or_default(),
                            delta,
                        },
                    });
                }
                Step::Generating
            }
            BackendEvent::Done { finish: FinishReason::Cancelled, .. } => {
                self.stop(CancelReason::Backend, conv, events);
                self.conclude(events)
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
                self.finish = Some((status, details, usage));
                self.conclude(events)
            }
            BackendEvent::Error(err) => {
                self.stop_speech();
                self.close_all(ItemStatus::Incomplete, conv, events);
                tracing::warn!(response = %self.id, "backend failed: {err}");
                let message = err.client_message();
                events.push(ServerEvent::server_error(err.code(), message.clone(), None));
                let details = json!({"type": "failed", "error": {"type": "server_error", "code": err.code(), "message": message}});
                self.finish = Some((ResponseStatus::Failed, Some(details), None));
                self.conclude(events)
            }
        }
    }

    /// The model is done: the response ends now, or once its hark-run calls are answered.
    fn conclude(&mut self, events: &mut Vec<ServerEvent>) -> Step {
        if self.calls_running() > 0 || self.speaking() {
            return Step::AwaitingTools;
        }
        self.finish_done(events);
        Step::Done
    }

    /// How the model's part ended, once it has (`None` while generating).
    pub fn outcome(&self) -> Option<ResponseStatus> {
        self.finish.as_ref().map(|f| f.0)
    }

    /// Puts the answer of a hark-run call into its `mcp_call` item and finishes the
    /// item. `false`: the call is not an unanswered call of this response.
    pub fn answer_mcp(&mut self, call_id: &str, answer: &CallAnswer, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> bool {
        let Some(idx) = self.outputs.iter().position(|o| {
            matches!(o, Output::Call { item, answered: false, .. } if item.kind == ItemKind::McpCall && item.call_id.as_deref() == Some(call_id))
        }) else {
            return false;
        };
        let Output::Call { item, answered, .. } = &mut self.outputs[idx] else { return false };
        *answered = true;
        if item.status == ItemStatus::InProgress {
            item.status = ItemStatus::Completed;
        }
        answer.fill(item);
        let done = item.clone();
        let (item_id, output_index) = (done.id.clone(), idx as u32);
        events.push(match answer {
            CallAnswer::Result(_) => ServerEvent::ResponseMcpCallCompleted { item_id, output_index },
            CallAnswer::Error(_) => ServerEvent::ResponseMcpCallFailed { item_id, output_index },
        });
        events.push(ServerEvent::ResponseOutputItemDone { response_id: self.id.clone(), output_index, item: done.clone() });
        if self.in_conversation {
            if let Some(ci) = conv.get_mut(&done.id) {
                ci.item = done.clone();
                events.push(ServerEvent::ConversationItemDone { previous_item_id: None, item: done });
            }
        }
        true
    }

    /// Whether `item_id` is one of this response's output items.
    pub fn has_output(&self, item_id: &str) -> bool {
        self.outputs.iter().any(|o| self.item_of(o).id == item_id)
    }

    pub fn in_conversation(&self) -> bool {
        self.in_conversation
    }

    /// hark-run calls of this response still without an answer.
    pub fn calls_running(&self) -> usize {
        self.outputs.iter().filter(|o| matches!(o, Output::Call { item, answered: false, .. } if item.kind == ItemKind::McpCall)).count()
    }

    /// The model finished and hark-run calls are still running.
    pub fn awaiting_tools(&self) -> bool {
        self.finish.is_some() && !self.done
    }

    /// Whether hark ran any call of this response.
    pub fn has_hark_calls(&self) -> bool {
        self.outputs.iter().any(|o| matches!(o, Output::Call { item, .. } if item.kind == ItemKind::McpCall))
    }

    /// Whether the client runs any call of this response (then the client, not hark,
    /// creates the next response once it has answered).
    pub fn has_client_calls(&self) -> bool {
        self.outputs.iter().any(|o| matches!(o, Output::Call { item, .. } if item.kind == ItemKind::FunctionCall))
    }

    /// `response.done` for a response whose calls are all answered.
    pub fn finish_done(&mut self, events: &mut Vec<ServerEvent>) {
        if self.done {
            return;
        }
        self.done = true;
        let (status, details, usage) = self.finish.clone().unwrap_or((ResponseStatus::Completed, None, None));
        events.push(ServerEvent::ResponseDone { response: self.info(status, details, usage) });
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

    /// Cuts the response short: the backend stops, open items become `incomplete`,
    /// and `response.done` will say `cancelled` for `reason`. The caller answers the
    /// calls that will not run, then calls [`Self::finish_done`].
    pub fn stop(&mut self, reason: CancelReason, conv: &mut Conversation, events: &mut Vec<ServerEvent>) {
        self.cancel.cancel();
        self.stop_speech();
        self.close_all(ItemStatus::Incomplete, conv, events);
        let usage = self.finish.take().and_then(|f| f.2);
        self.finish = Some((ResponseStatus::Cancelled, Some(json!({"type": "cancelled", "reason": reason.as_str()})), usage));
    }

    fn open_message(&mut self, conv: &mut Conversation, events: &mut Vec<ServerEvent>) -> usize {
        let item = Item::message(new_id("item"), ItemStatus::InProgress, Role::Assistant, Vec::new());
        let item_id = item.id.clone();
        // Only the first message speaks (a model writes one per turn in practice).
        let spoken = self.speech.is_some() && self.speech_item.is_none();
        let audio = spoken.then(|| AudioOut { speaking: true, ..Default::default() });
        let idx = self.add_output(Output::Message { item, text: String::new(), open: true, audio }, conv, events);
        if spoken {
            self.speech_item = Some(idx);
        }
        events.push(ServerEvent::ResponseContentPartAdded {
            response_id: self.id.clone(),
            item_id,
            output_index: idx as u32,
            content_index: 0,
            part: if spoken { json!({"type": "output_audio", "transcript": ""}) } else { json!({"type": "text", "text": ""}) },
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
        if let Output::Message { audio: Some(a), open: true, .. } = &mut self.outputs[idx] {
            if a.speaking {
                // The model is done with the message; the voice is not. It closes when
                // the last segment is out (see `on_speech_event`).
                a.close_as = Some(status);
                if let Some(s) = self.speech.as_mut() {
                    s.finish();
                }
                return;
            }
        }
        let mut spoken = None;
        let done_item = match &mut self.outputs[idx] {
            Output::Message { item, open, audio: Some(a), .. } => {
                if !*open {
                    return;
                }
                *open = false;
                let (item_id, transcript) = (item.id.clone(), a.transcript.clone());
                let ids = (response_id.clone(), item_id.clone(), output_index);
                events.push(ServerEvent::ResponseOutputAudioDone { response_id: ids.0.clone(), item_id: ids.1.clone(), output_index, content_index: 0 });
                events.push(ServerEvent::ResponseOutputAudioTranscriptDone {
                    response_id: ids.0.clone(),
                    item_id: ids.1.clone(),
                    output_index,
                    content_index: 0,
                    transcript: transcript.clone(),
                });
                events.push(ServerEvent::ResponseContentPartDone {
                    response_id: ids.0,
                    item_id,
                    output_index,
                    content_index: 0,
                    part: json!({"type": "output_audio", "transcript": transcript}),
                });
                item.status = status;
                item.content = Some(vec![ContentPart::output_audio(transcript)]);
                spoken = Some(Payload::Spoken(Arc::new(std::mem::take(&mut a.marks))));
                item.clone()
            }
            Output::Message { item, text, open, audio: None } => {
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
            Output::Call { item, args, open, .. } if item.kind == ItemKind::McpCall => {
                if !*open {
                    return;
                }
                *open = false;
                item.arguments = Some(args.clone());
                if status == ItemStatus::Completed {
                    let item_id = item.id.clone();
                    events.push(ServerEvent::ResponseMcpCallArgumentsDone {
                        response_id,
                        item_id: item_id.clone(),
                        output_index,
                        arguments: args.clone(),
                    });
                    events.push(ServerEvent::ResponseMcpCallInProgress { item_id, output_index });
                } else {
                    item.status = status;
                }
                // Done once answered (see `answer_mcp`).
                return;
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
                ci.payloads = match spoken {
                    Some(p) => vec![p],
                    None => vec![Payload::None; done_item.content.as_ref().map_or(0, Vec::len)],
                };
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
        let mut conv = Conversation::new();
        let mut ev = Vec::new();
        let client = ToolRouting { client: ["f".to_string()].into(), ..Default::default() };
        let mut run = ResponseRun::start(true, vec!["text".into()], MaxTokens::Inf("inf".into()), None, client, "conv_t".into(), &mut ev);
        for e in [
            BackendEvent::TextDelta("Hel".into()),
            BackendEvent::TextDelta("lo".into()),
            BackendEvent::ToolCallStart { index: 0, call_id: "c1".into(), name: "f".into() },
            BackendEvent::ToolCallArgumentsDelta { index: 0, delta: "{}".into() },
        ] {
            assert_eq!(run.on_backend_event(e, &mut conv, &mut ev), Step::Generating);
        }
        let done = BackendEvent::Done { finish: FinishReason::ToolCalls, usage: None };
        assert_eq!(run.on_backend_event(done, &mut conv, &mut ev), Step::Done);
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
        let mut conv = Conversation::new();
        let mut ev = Vec::new();
        let mut run = ResponseRun::start(true, vec!["text".into()], MaxTokens::Count(10), None, ToolRouting::default(), "conv_t".into(), &mut ev);
        run.on_backend_event(BackendEvent::TextDelta("a".into()), &mut conv, &mut ev);
        run.stop(CancelReason::TurnDetected, &mut conv, &mut ev);
        run.finish_done(&mut ev);
        run.finish_done(&mut ev);
        assert!(run.cancel.is_cancelled());
        let dones: Vec<_> = ev.iter().filter(|e| matches!(e, ServerEvent::ResponseDone { .. })).collect();
        assert_eq!(dones.len(), 1);
        let ServerEvent::ResponseDone { response } = dones[0] else { panic!() };
        assert_eq!(response.status, ResponseStatus::Cancelled);
        assert_eq!(response.status_details.as_ref().unwrap()["reason"], "turn_detected");
        assert_eq!(response.output[0].status, ItemStatus::Incomplete);
    }

    #[test]
    fn hark_run_calls_are_mcp_calls_and_the_response_waits_for_them() {
        let mut conv = Conversation::new();
        let mut ev = Vec::new();
        let routing = ToolRouting { hark: [("calc".to_string(), "hark".to_string())].into(), ..Default::default() };
        let mut run = ResponseRun::start(true, vec!["text".into()], MaxTokens::Count(10), None, routing, "conv_t".into(), &mut ev);
        run.on_backend_event(BackendEvent::ToolCallStart { index: 0, call_id: "c1".into(), name: "calc".into() }, &mut conv, &mut ev);
        run.on_backend_event(BackendEvent::ToolCallArgumentsDelta { index: 0, delta: "{\"x\":1}".into() }, &mut conv, &mut ev);
        let done = BackendEvent::Done { finish: FinishReason::ToolCalls, usage: None };
        assert_eq!(run.on_backend_event(done, &mut conv, &mut ev), Step::AwaitingTools);
        assert_eq!(
            names(&ev),
            [
                "response.created",
                "response.output_item.added",
                "conversation.item.added",
                "response.mcp_call_arguments.delta",
                "response.mcp_call_arguments.done",
                "response.mcp_call.in_progress",
            ]
        );
        assert_eq!((run.calls_running(), run.has_client_calls()), (1, false));
        ev.clear();
        assert!(!run.answer_mcp("other", &CallAnswer::Result("1".into()), &mut conv, &mut ev));
        assert!(run.answer_mcp("c1", &CallAnswer::Result("42".into()), &mut conv, &mut ev));
        assert!(!run.answer_mcp("c1", &CallAnswer::Result("43".into()), &mut conv, &mut ev), "answered once");
        run.finish_done(&mut ev);
        assert_eq!(names(&ev), ["response.mcp_call.completed", "response.output_item.done", "conversation.item.done", "response.done"]);
        let ServerEvent::ResponseDone { response } = ev.last().unwrap() else { panic!() };
        let call = &response.output[0];
        assert_eq!((call.kind, call.server_label.as_deref(), call.output.as_deref()), (ItemKind::McpCall, Some("hark"), Some("42")));
        assert_eq!(conv.items()[0].output.as_deref(), Some("42"));
        // The model sees the call and its result.
        let msgs = conv.to_messages();
        assert!(matches!(&msgs[1], crate::model::ChatMessage::Tool { call_id, output } if call_id == "c1" && output == "{\"result\":42}"), "{msgs:?}");
    }
}
