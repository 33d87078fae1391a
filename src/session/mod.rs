//! One client's realtime session: the input audio buffer, turn detection, the
//! conversation and the response in flight.
//!
//! A session is a task that reads [`SessionInput`]s and writes [`ServerEvent`]s; it
//! knows nothing of WebSockets or WebRTC, so every transport shares it. All state is
//! owned by the task: handlers are plain synchronous methods that queue events, and
//! the loop flushes them, so no lock is ever held across an await.

pub mod calls;
pub mod conversation;
mod dispatch;
pub mod response;
pub mod settings;
pub mod turn;

use std::sync::Arc;

use base64::Engine;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::{ContextWindow, RetentionPolicy};
use crate::media::frame::{ms_to_samples, samples_to_ms, MODEL_SAMPLE_RATE};
use crate::media::vad::{EnergyVad, SileroModel, VadError, VoiceDetector};
use crate::media::AudioPipeline;
use crate::model::{Backend, BackendEvent, ChatMessage, GenerateRequest, ToolSpec, TurnStream};
use crate::server::protocol::{
    new_id, ClientEnvelope, ClientEvent, ContentInput, ContentPart, Item, ItemInput, ItemKind, ItemStatus, MaxTokens,
    ProtocolError, ResponseParams, Role, ServerEvent, MAX_APPEND_BYTES,
};
use calls::CallLedger;
pub use conversation::Conversation;
use conversation::{ConversationItem, Payload};
use response::{CancelReason, ResponseRun};
pub use settings::SessionSettings;
use turn::{TurnDetector, TurnEvent};

/// What a transport hands to a session.
#[derive(Debug)]
pub enum SessionInput {
    Client(ClientEnvelope),
    /// A message that could not be parsed; answered with an `error` event.
    Invalid(ProtocolError),
}

/// Makes one voice detector per session.
#[derive(Clone)]
pub enum VadFactory {
    Silero(SileroModel),
    Energy,
}

impl VadFactory {
    pub fn make(&self) -> Result<Box<dyn VoiceDetector>, VadError> {
        match self {
            VadFactory::Silero(m) => Ok(Box::new(m.detector()?)),
            VadFactory::Energy => Ok(Box::new(EnergyVad::default())),
        }
    }
}

/// What every session shares.
pub struct SessionDeps {
    pub defaults: SessionSettings,
    pub backend: Arc<dyn Backend>,
    pub vad: VadFactory,
    /// Cap on the input audio buffer, in seconds.
    pub max_buffer_seconds: u32,
    pub max_items: usize,
    /// The context window's limits.
    pub retention: RetentionPolicy,
    /// Prefill user audio while the user speaks, where the backend can.
    pub streaming_prefill: bool,
    /// The YAML tools hark runs, and the agents that pick among them.
    pub tools: Arc<crate::tools::ToolRegistry>,
    pub agents: Arc<crate::tools::AgentSet>,
    /// How long a client gets to answer a call of a tool it declared.
    pub client_tool_timeout: std::time::Duration,
}

/// Shortest audio a manual commit accepts (the protocol's rule).
const MIN_COMMIT_MS: u64 = 100;
/// Silence kept after speech ends when a VAD turn is committed.
const TURN_TAIL_MS: u64 = 200;
/// Largest image accepted in `input_image`, as a data URL.
const MAX_IMAGE_URL_BYTES: usize = 20 * 1024 * 1024;

/// The session's input audio buffer: 16 kHz samples not yet committed.
#[derive(Debug, Default)]
struct InputBuffer {
    samples: Vec<f32>,
    /// Stream index (16 kHz) of `samples[0]`.
    start: u64,
}

impl InputBuffer {
    fn end(&self) -> u64 {
        self.start + self.samples.len() as u64
    }

    /// Samples in `[from, to)`, clipped to what is held.
    fn range(&self, from: u64, to: u64) -> Vec<f32> {
        let a = from.clamp(self.start, self.end()) - self.start;
        let b = to.clamp(self.start, self.end()) - self.start;
        self.samples[a as usize..b as usize].to_vec()
    }

    /// Forgets everything before `at`.
    fn drop_before(&mut self, at: u64) {
        let n = (at.clamp(self.start, self.end()) - self.start) as usize;
        if n > 0 {
            self.samples.drain(..n);
            self.start += n as u64;
        }
    }

    fn clear(&mut self) {
        self.start = self.end();
        self.samples.clear();
    }
}

struct PendingSpeech {
    item_id: String,
}

/// The user's turn, streaming into the model while they speak.
struct StreamingTurn {
    stream: TurnStream,
    /// Stream position (16 kHz) up to which audio has been sent.
    sent_to: u64,
}

pub struct Session {
    deps: Arc<SessionDeps>,
    settings: SessionSettings,
    pipeline: AudioPipeline,
    /// 16 kHz samples of earlier pipelines (a format change starts a new one).
    stream_base: u64,
    turn: Option<TurnDetector>,
    buffer: InputBuffer,
    speech: Option<PendingSpeech>,
    buffer_overflow_reported: bool,
    /// Stream position (16 kHz) of the last speech, commit or response; the idle timer runs from here.
    last_activity: u64,
    conversation: Conversation,
    response: Option<ResponseRun>,
    backend_rx: Option<mpsc::Receiver<BackendEvent>>,
    streaming: Option<StreamingTurn>,
    context: ContextWindow,
    /// The session's agent: its tools run in hark.
    agent: Option<crate::tools::Agent>,
    calls: CallLedger,
    tool_results_tx: mpsc::Sender<(String, String)>,
    tool_results_rx: mpsc::Receiver<(String, String)>,
    /// Follow-up responses created for tool results since the user last spoke.
    tool_rounds: u32,
    /// The last response started hark-run calls: continue once they are answered.
    follow_up: bool,
    events: Vec<ServerEvent>,
}

impl Session {
    pub fn new(deps: Arc<SessionDeps>, model: Option<String>) -> Self {
        let mut settings = deps.defaults.clone();
        settings.id = new_id("sess");
        if let Some(m) = model.filter(|m| !m.is_empty()) {
            settings.model = m;
        }
        let max_items = deps.max_items;
        let (tool_results_tx, tool_results_rx) = mpsc::channel(64);
        let mut s = Self {
            pipeline: AudioPipeline::new(settings.input_format, None).expect("16/24/8 kHz are supported rates"),
            deps: deps.clone(),
            settings,
            stream_base: 0,
            turn: None,
            buffer: InputBuffer::default(),
            speech: None,
            buffer_overflow_reported: false,
            last_activity: 0,
            conversation: Conversation::new(max_items),
            response: None,
            backend_rx: None,
            streaming: None,
            context: ContextWindow::new(deps.retention, deps.backend.token_counter()),
            agent: None,
            calls: CallLedger::default(),
            tool_results_tx,
            tool_results_rx,
            tool_rounds: 0,
            follow_up: false,
            events: Vec::new(),
        };
        // `?model=NAME` naming an agent picks it; otherwise the configured default.
        let wanted = Some(s.settings.model.clone())
            .filter(|m| s.deps.agents.get(m).is_some())
            .or_else(|| Some(s.settings.agent.clone()).filter(|a| !a.is_empty()));
        if let Some(name) = wanted {
            match s.select_agent(&name) {
                Ok((settings, agent)) => {
                    s.settings = settings;
                    s.agent = Some(agent);
                }
                Err(e) => tracing::warn!("agent {name}: {}", e.message),
            }
        }
        s.rebuild_audio_path();
        s
    }

    /// Runs until the client goes away or `shutdown` fires. Returns the conversation
    /// as it ended (every tool call answered), for whoever wants to look.
    pub async fn run(mut self, mut input: mpsc::Receiver<SessionInput>, out: mpsc::Sender<ServerEvent>, shutdown: CancellationToken) -> Conversation {
        self.events.push(ServerEvent::SessionCreated { session: self.settings.info() });
        self.greet();
        loop {
            if !flush(&mut self.events, &out).await {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.cancel_response(CancelReason::Shutdown);
                    self.events.push(ServerEvent::server_error("server_shutdown", "hark is shutting down; this session is closing.", None));
                    flush(&mut self.events, &out).await;
                    break;
                }
                ev = next_backend_event(&mut self.backend_rx) => self.on_backend_event(ev),
                p = next_end_of_turn(&mut self.streaming) => self.on_end_of_turn(p),
                Some((call_id, output)) = self.tool_results_rx.recv() => self.on_tool_result(call_id, output),
                _ = sleep_until(self.calls.next_deadline()) => self.expire_client_calls(),
                msg = input.recv() => match msg {
                    Some(SessionInput::Client(env)) => self.handle(env),
                    Some(SessionInput::Invalid(err)) => self.events.push(ServerEvent::from_protocol_error(err)),
                    None => break,
                },
            }
        }
        // The client is gone or we are stopping: stop the backend's work too.
        if let Some(run) = self.response.take() {
            run.cancel.cancel();
        }
        self.retract_streaming();
        self.close_calls();
        self.conversation
    }

    /// The model's end-of-turn probability for the streamed turn (`semantic_vad`).
    fn on_end_of_turn(&mut self, p: Option<f32>) {
        match (p, self.turn.as_mut()) {
            (Some(p), Some(turn)) => turn.set_end_of_turn(p),
            (Some(_), None) => {}
            // The backend let the turn go (its cache was reused elsewhere): stop streaming.
            (None, _) => self.streaming = None,
        }
    }

    /// Starts streaming the user's turn into the model from stream position `from`.
    fn start_streaming(&mut self, from: u64) {
        self.retract_streaming();
        if !self.deps.streaming_prefill || self.response.is_some() {
            // A response still running (interrupt_response off) changes the context
            // before this turn is answered; the stream would not match.
            return;
        }
        let request = self.model_request(&ResponseParams::default());
        if let Some(stream) = self.deps.backend.open_turn(request) {
            self.streaming = Some(StreamingTurn { stream, sent_to: from });
            self.stream_turn_audio();
        }
    }

    /// Sends the audio buffered since the last call to the streamed turn.
    fn stream_turn_audio(&mut self) {
        if let Some(st) = self.streaming.as_mut() {
            let end = self.buffer.end();
            if end > st.sent_to {
                st.stream.push_audio(self.buffer.range(st.sent_to, end));
                st.sent_to = end;
            }
        }
    }

    /// The streamed turn was not speech after all: the model forgets it.
    fn retract_streaming(&mut self) {
        if let Some(st) = self.streaming.take() {
            st.stream.retract();
        }
    }

    fn on_backend_event(&mut self, ev: Option<BackendEvent>) {
        let Some(run) = self.response.as_mut() else {
            self.backend_rx = None;
            return;
        };
        // A backend that vanished without a final event is a failure, not a hang.
        let ev = ev.unwrap_or_else(|| {
            BackendEvent::Error(crate::model::BackendError::Protocol("the backend stopped without finishing".into()))
        });
        if run.on_backend_event(ev, &mut self.conversation, &mut self.events) {
            let calls = run.call_items();
            self.response = None;
            self.backend_rx = None;
            self.dispatch_calls(calls, true);
        }
    }

    fn handle(&mut self, env: ClientEnvelope) {
        let event_id = env.event_id.clone();
        let result = match env.event {
            ClientEvent::SessionUpdate { session } => self.update_session(session),
            ClientEvent::InputAudioBufferAppend { audio } => self.append_audio(&audio),
            ClientEvent::InputAudioBufferCommit {} => self.commit_buffer(),
            ClientEvent::InputAudioBufferClear {} => {
                self.retract_streaming();
                self.buffer.clear();
                self.speech = None;
                if let Some(t) = self.turn.as_mut() {
                    t.reset();
                }
                self.events.push(ServerEvent::InputAudioBufferCleared {});
                Ok(())
            }
            ClientEvent::ConversationItemCreate { previous_item_id, item } => self.create_item(previous_item_id, item),
            ClientEvent::ConversationItemRetrieve { item_id } => match self.conversation.get(&item_id) {
                Some(ci) => {
                    self.events.push(ServerEvent::ConversationItemRetrieved { item: ci.item.clone() });
                    Ok(())
                }
                None => Err(not_found(&item_id)),
            },
            ClientEvent::ConversationItemDelete { item_id } => match self.conversation.delete(&item_id) {
                Ok(_) => {
                    self.events.push(ServerEvent::ConversationItemDeleted { item_id });
                    Ok(())
                }
                Err(_) => Err(not_found(&item_id)),
            },
            ClientEvent::ConversationItemTruncate { item_id, content_index, audio_end_ms } => {
                self.truncate_item(item_id, content_index, audio_end_ms)
            }
            ClientEvent::ResponseCreate { response } => self.create_response(response.unwrap_or_default()),
            ClientEvent::ResponseCancel { response_id } => match (&self.response, response_id) {
                (None, _) => Err(ProtocolError::new("response_cancel_not_active", "There is no active response to cancel.")),
                (Some(run), Some(id)) if run.id != id => Err(ProtocolError::new(
                    "response_cancel_not_active",
                    format!("Response '{id}' is not the active response."),
                )
                .param("response_id")),
                _ => {
                    self.cancel_response(CancelReason::ClientCancelled);
                    Ok(())
                }
            },
            // hark sends no output audio, so there is never anything to clear.
            ClientEvent::OutputAudioBufferClear {} => Ok(()),
        };
        if let Err(e) = result {
            self.events.push(ServerEvent::from_protocol_error(e.event_id(event_id)));
        }
    }

    fn update_session(&mut self, update: crate::server::protocol::SessionUpdate) -> Result<(), ProtocolError> {
        let mut agent = None;
        let next = match update.agent.as_deref().filter(|a| *a != self.settings.agent) {
            Some(name) => {
                let (base, a) = self.select_agent(name)?;
                agent = Some(a);
                base.merged(&update)?
            }
            None => self.settings.merged(&update)?,
        };
        if agent.is_some() {
            self.agent = agent;
        }
        let audio_path_changed = next.input_format != self.settings.input_format
            || next.turn_detection.is_some() != self.settings.turn_detection.is_some();
        self.settings = next;
        if audio_path_changed {
            self.rebuild_audio_path();
        } else if let (Some(t), Some(td)) = (self.turn.as_mut(), &self.settings.turn_detection) {
            t.set_params(td.params());
        }
        self.events.push(ServerEvent::SessionUpdated { session: self.settings.info() });
        Ok(())
    }

    /// A new pipeline for the current format, with a VAD when turn detection is on.
    fn rebuild_audio_path(&mut self) {
        self.retract_streaming();
        self.stream_base += self.pipeline.position();
        let vad = match &self.settings.turn_detection {
            None => None,
            Some(_) => match self.deps.vad.make() {
                Ok(v) => Some(v),
                Err(e) => {
                    self.events.push(ServerEvent::server_error("vad_unavailable", format!("Turn detection is off: {e}"), None));
                    self.settings.turn_detection = None;
                    None
                }
            },
        };
        self.turn = self.settings.turn_detection.as_ref().map(|td| TurnDetector::new(td.params()));
        self.pipeline = AudioPipeline::new(self.settings.input_format, vad).expect("supported rate");
        self.buffer = InputBuffer { samples: Vec::new(), start: self.stream_base };
        self.speech = None;
    }

    fn append_audio(&mut self, audio_b64: &str) -> Result<(), ProtocolError> {
        if audio_b64.len() / 4 * 3 > MAX_APPEND_BYTES {
            return Err(ProtocolError::new(
                "audio_too_large",
                format!("input_audio_buffer.append carries at most {MAX_APPEND_BYTES} bytes of audio; split it into smaller appends."),
            )
            .param("audio"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(audio_b64)
            .map_err(|e| ProtocolError::new("invalid_base64", format!("'audio' is not valid base64: {e}.")).param("audio"))?;
        let out = run_heavy(bytes.len(), || self.pipeline.push_bytes(&bytes)).map_err(|e| {
            ProtocolError::new(
                "invalid_audio",
                format!("Audio does not match the session's input format {}: {e}.", self.settings.input_format.name()),
            )
            .param("audio")
        })?;
        self.buffer.samples.extend_from_slice(&out.samples);
        for reading in out.vad {
            let Some(turn) = self.turn.as_mut() else { break };
            match turn.on_reading(offset(reading, self.stream_base)) {
                Some(TurnEvent::SpeechStarted { start }) => self.on_speech_started(start),
                Some(TurnEvent::SpeechStopped { start, end }) => self.on_speech_stopped(start, end),
                None => {}
            }
        }
        self.stream_turn_audio();
        self.check_idle_timeout();
        self.trim_buffer();
        Ok(())
    }

    fn stream_position(&self) -> u64 {
        self.stream_base + self.pipeline.position()
    }

    /// `idle_timeout_ms`: after that much audio without speech (and with no response
    /// running), the silence is committed and a response created, so the model can
    /// re-engage the user. Measured in audio time, so it follows the client's clock.
    fn check_idle_timeout(&mut self) {
        let Some(timeout_ms) = self.settings.turn_detection.as_ref().and_then(|t| t.idle_timeout_ms) else { return };
        let pos = self.stream_position();
        if self.response.is_some() || self.turn.as_ref().is_some_and(|t| t.is_speaking()) {
            self.last_activity = pos;
            return;
        }
        if pos.saturating_sub(self.last_activity) < ms_to_samples(timeout_ms as u64, MODEL_SAMPLE_RATE) {
            return;
        }
        let item_id = new_id("item");
        self.events.push(ServerEvent::InputAudioBufferTimeoutTriggered {
            audio_start_ms: samples_to_ms(self.last_activity, MODEL_SAMPLE_RATE),
            audio_end_ms: samples_to_ms(pos, MODEL_SAMPLE_RATE),
            item_id: item_id.clone(),
        });
        self.last_activity = pos;
        let audio = std::mem::take(&mut self.buffer.samples);
        self.buffer.start += audio.len() as u64;
        let result = self.commit_audio(item_id, audio).and_then(|_| self.create_response(ResponseParams::default()));
        if let Err(e) = result {
            self.events.push(ServerEvent::from_protocol_error(e));
        }
    }

    fn on_speech_started(&mut self, start: u64) {
        self.last_activity = self.stream_position();
        let item_id = new_id("item");
        self.events.push(ServerEvent::InputAudioBufferSpeechStarted {
            audio_start_ms: samples_to_ms(start, MODEL_SAMPLE_RATE),
            item_id: item_id.clone(),
        });
        self.speech = Some(PendingSpeech { item_id });
        let interrupt = self.settings.turn_detection.as_ref().is_some_and(|t| t.interrupt_response);
        if interrupt && self.response.is_some() {
            self.cancel_response(CancelReason::TurnDetected);
        }
        if interrupt {
            self.interrupt_calls();
        }
        let padding = self.settings.turn_detection.as_ref().map_or(0, |t| t.prefix_padding_ms as u64);
        self.start_streaming(start.saturating_sub(ms_to_samples(padding, MODEL_SAMPLE_RATE)));
    }

    fn on_speech_stopped(&mut self, start: u64, end: u64) {
        self.last_activity = self.stream_position();
        let Some(td) = self.settings.turn_detection.clone() else { return };
        let item_id = self.speech.take().map(|s| s.item_id).unwrap_or_else(|| new_id("item"));
        self.events.push(ServerEvent::InputAudioBufferSpeechStopped {
            audio_end_ms: samples_to_ms(end, MODEL_SAMPLE_RATE),
            item_id: item_id.clone(),
        });
        let from = start.saturating_sub(ms_to_samples(td.prefix_padding_ms as u64, MODEL_SAMPLE_RATE));
        let to = end + ms_to_samples(TURN_TAIL_MS, MODEL_SAMPLE_RATE);
        if end.saturating_sub(start) < ms_to_samples(td.min_speech_ms as u64, MODEL_SAMPLE_RATE) {
            // Too short to be speech: retract the turn. Nothing is committed, and the
            // frames already streamed into the model leave its cache.
            self.retract_streaming();
            self.buffer.drop_before(to);
            return;
        }
        // The streamed frames stay in the model's cache for the response below.
        self.streaming = None;
        let audio = self.buffer.range(from, to);
        self.buffer.drop_before(to);
        if let Err(e) = self.commit_audio(item_id, audio) {
            self.events.push(ServerEvent::from_protocol_error(e));
            return;
        }
        if td.create_response {
            if self.response.is_some() {
                // interrupt_response was off: the running response finishes first.
                return;
            }
            if let Err(e) = self.create_response(ResponseParams::default()) {
                self.events.push(ServerEvent::from_protocol_error(e));
            }
        }
    }

    /// Keeps the buffer bounded: while nobody speaks under VAD only the prefix padding
    /// is worth keeping; otherwise the configured cap applies.
    fn trim_buffer(&mut self) {
        if let (Some(turn), Some(td)) = (&self.turn, &self.settings.turn_detection) {
            if !turn.is_speaking() {
                let keep = ms_to_samples(td.prefix_padding_ms as u64 + 100, MODEL_SAMPLE_RATE);
                let end = self.buffer.end();
                self.buffer.drop_before(end.saturating_sub(keep));
                return;
            }
        }
        let cap = self.deps.max_buffer_seconds as u64 * MODEL_SAMPLE_RATE as u64;
        if self.buffer.samples.len() as u64 > cap {
            let end = self.buffer.end();
            self.buffer.drop_before(end - cap);
            if !self.buffer_overflow_reported {
                self.buffer_overflow_reported = true;
                self.events.push(ServerEvent::from_protocol_error(ProtocolError::new(
                    "input_audio_buffer_full",
                    format!("The input audio buffer holds at most {} s; the oldest audio was dropped. Commit more often.", self.deps.max_buffer_seconds),
                )));
            }
        }
    }

    fn commit_buffer(&mut self) -> Result<(), ProtocolError> {
        let out = self.pipeline.flush().map_err(|e| ProtocolError::new("invalid_audio", e.to_string()))?;
        self.buffer.samples.extend_from_slice(&out.samples);
        let ms = samples_to_ms(self.buffer.samples.len() as u64, MODEL_SAMPLE_RATE);
        if ms < MIN_COMMIT_MS {
            return Err(ProtocolError::new(
                "input_audio_buffer_commit_empty",
                format!("Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer only has {ms}ms of audio."),
            ));
        }
        let audio = std::mem::take(&mut self.buffer.samples);
        self.buffer.start += audio.len() as u64;
        if let Some(t) = self.turn.as_mut() {
            t.reset();
        }
        // The manual commit takes the whole buffer; any streamed frames that match it
        // are reused by the backend's prefix match.
        self.streaming = None;
        let item_id = self.speech.take().map(|s| s.item_id).unwrap_or_else(|| new_id("item"));
        self.commit_audio(item_id, audio)
    }

    /// Turns committed audio into a user message item.
    fn commit_audio(&mut self, item_id: String, audio: Vec<f32>) -> Result<(), ProtocolError> {
        self.tool_rounds = 0;
        let item = Item {
            id: item_id.clone(),
            object: "realtime.item",
            kind: ItemKind::Message,
            status: ItemStatus::Completed,
            role: Some(Role::User),
            content: Some(vec![ContentPart::input_audio()]),
            call_id: None,
            name: None,
            arguments: None,
            output: None,
        };
        let ci = ConversationItem::new(item.clone(), vec![Payload::Audio(Arc::new(audio))]);
        let previous_item_id =
            self.conversation.insert(None, ci).map_err(|e| ProtocolError::new("conversation_full", e.to_string()))?;
        self.events.push(ServerEvent::InputAudioBufferCommitted { previous_item_id: previous_item_id.clone(), item_id });
        self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
        self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
        Ok(())
    }

    fn create_item(&mut self, previous: Option<String>, input: ItemInput) -> Result<(), ProtocolError> {
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
        if item.role == Some(Role::User) {
            self.tool_rounds = 0;
        }
        let previous_item_id = self.conversation.insert(previous.as_deref(), ci).map_err(|e| match e {
            conversation::ConversationError::NotFound(_) => ProtocolError::new("item_not_found", e.to_string()).param("previous_item_id"),
            conversation::ConversationError::Duplicate(_) => ProtocolError::new("duplicate_item_id", e.to_string()).param("item.id"),
            conversation::ConversationError::Full(_) => ProtocolError::new("conversation_full", e.to_string()),
        })?;
        if let Some(id) = answers_call {
            self.calls.claim(&id);
        }
        self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
        self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
        Ok(())
    }

    fn item_from_input(&self, input: ItemInput) -> Result<ConversationItem, ProtocolError> {
        let id = input.id.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| new_id("item"));
        if id.len() > 64 {
            return Err(ProtocolError::new("invalid_value", "'item.id' is longer than 64 characters.").param("item.id"));
        }
        let missing = |field: &str| {
            ProtocolError::new("missing_required_parameter", format!("Missing required parameter: 'item.{field}'."))
                .param(format!("item.{field}"))
        };
        let mut item = Item {
            id,
            object: "realtime.item",
            kind: ItemKind::Message,
            status: ItemStatus::Completed,
            role: None,
            content: None,
            call_id: None,
            name: None,
            arguments: None,
            output: None,
        };
        let mut payloads = Vec::new();
        match input.kind.as_str() {
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
                item.role = Some(role);
                item.content = Some(parts);
            }
            "function_call" => {
                item.kind = ItemKind::FunctionCall;
                item.name = Some(input.name.ok_or_else(|| missing("name"))?);
                item.call_id = Some(input.call_id.unwrap_or_else(|| new_id("call")));
                item.arguments = Some(input.arguments.unwrap_or_else(|| "{}".into()));
            }
            "function_call_output" => {
                item.kind = ItemKind::FunctionCallOutput;
                item.call_id = Some(input.call_id.ok_or_else(|| missing("call_id"))?);
                item.output = Some(input.output.ok_or_else(|| missing("output"))?);
            }
            other => {
                return Err(ProtocolError::new(
                    "invalid_value",
                    format!("Invalid value: '{other}'. Supported values are: 'message', 'function_call' and 'function_call_output'."),
                )
                .param("item.type"))
            }
        }
        Ok(ConversationItem { item, payloads, pinned: input.pinned.unwrap_or(false) })
    }

    fn content_from_input(&self, role: Role, i: usize, c: ContentInput) -> Result<(ContentPart, Payload), ProtocolError> {
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
                Ok((part, Payload::Audio(Arc::new(samples))))
            }
            (Role::User, "input_image") => {
                let url = need(c.image_url, "image_url")?;
                if url.len() > MAX_IMAGE_URL_BYTES {
                    return Err(ProtocolError::new("image_too_large", "input_image is limited to 20 MiB.").param(param("image_url")));
                }
                check_image_data_url(&url).map_err(|m| ProtocolError::new("invalid_image", m).param(param("image_url")))?;
                Ok((ContentPart { kind: "input_image", text: None, transcript: None, image_url: None }, Payload::Image(Arc::new(url))))
            }
            (_, other) => Err(ProtocolError::new(
                "invalid_value",
                format!("Content type '{other}' is not allowed in a {} message.", role_name(role)),
            )
            .param(param("type"))),
        }
    }

    fn truncate_item(&mut self, item_id: String, content_index: u32, audio_end_ms: u64) -> Result<(), ProtocolError> {
        let ci = self.conversation.get(&item_id).ok_or_else(|| not_found(&item_id))?;
        if ci.item.role != Some(Role::Assistant) {
            return Err(ProtocolError::new("invalid_value", "Only assistant messages can be truncated.").param("item_id"));
        }
        // hark's assistant messages are text, so there is no audio to cut; the event
        // still confirms the truncation point so clients stay in step.
        self.events.push(ServerEvent::ConversationItemTruncated { item_id, content_index, audio_end_ms });
        Ok(())
    }

    fn create_response(&mut self, params: ResponseParams) -> Result<(), ProtocolError> {
        if let Some(run) = &self.response {
            return Err(ProtocolError::new(
                "conversation_already_has_active_response",
                format!("Conversation already has an active response in progress: {}. Wait until the response is finished before creating a new one.", run.id),
            ));
        }
        let in_conversation = params.conversation.as_deref() != Some("none");
        let max_tokens = params.max_output_tokens.clone().or(params.max_response_output_tokens.clone()).unwrap_or(self.settings.max_output_tokens.clone());
        let request = self.model_request(&params);
        let modalities = params
            .output_modalities
            .clone()
            .or(params.modalities.clone())
            .unwrap_or_else(|| self.settings.output_modalities.clone());
        let run = ResponseRun::start(in_conversation, modalities, max_tokens, params.metadata.clone(), &mut self.events);
        self.backend_rx = Some(self.deps.backend.generate(request, run.cancel.clone()));
        self.response = Some(run);
        Ok(())
    }

    /// The request a response would send now: the session's instructions and tools
    /// (or the response's own), and the conversation as the context window keeps it.
    fn model_request(&mut self, params: &ResponseParams) -> GenerateRequest {
        let mut tools: Vec<ToolSpec> = params
            .tools
            .as_ref()
            .unwrap_or(&self.settings.tools)
            .iter()
            .map(|t| ToolSpec { name: t.name.clone(), description: t.description.clone(), parameters: t.parameters.clone() })
            .collect();
        tools.extend(self.agent_tool_specs(&tools));
        let max_tokens = params.max_output_tokens.clone().or(params.max_response_output_tokens.clone()).unwrap_or(self.settings.max_output_tokens.clone());
        let instructions = params.instructions.clone().unwrap_or_else(|| self.settings.instructions.clone());
        let messages = self.context_messages(&instructions, &tools);
        GenerateRequest {
            instructions,
            messages,
            tools,
            tool_choice: Some(params.tool_choice.clone().unwrap_or_else(|| self.settings.tool_choice.clone())),
            max_output_tokens: match &max_tokens {
                MaxTokens::Count(n) => Some(*n),
                MaxTokens::Inf(_) => None,
            },
            temperature: Some(params.temperature.unwrap_or(self.settings.temperature)),
            cache_key: Some(crate::model::cache_key(&self.settings.id)),
        }
    }

    /// The conversation as the model will see it. Past the window's limit the oldest
    /// whole turns are evicted (each announced with `conversation.item.deleted`); near
    /// it, the window that the next eviction will leave is handed to the backend to
    /// prepare in the background.
    fn context_messages(&mut self, instructions: &str, tools: &[ToolSpec]) -> Vec<ChatMessage> {
        let items = self.conversation.window_items();
        let conversation = &self.conversation;
        let (turns, total) = self.context.measure(&items, instructions, tools, &|start, len| conversation.messages_of(start, len));
        let plan = self.context.plan(&items, &turns, total);
        if !plan.evict.is_empty() {
            tracing::info!(
                session = %self.settings.id,
                items = plan.evict.len(),
                tokens_before = plan.tokens_before,
                tokens_after = plan.tokens_after,
                "context window full: evicted the oldest turns"
            );
            for id in plan.evict {
                if self.conversation.delete(&id).is_ok() {
                    self.events.push(ServerEvent::ConversationItemDeleted { item_id: id });
                }
            }
        }
        if let Some(cut) = plan.prepare {
            let request = GenerateRequest {
                instructions: instructions.to_string(),
                messages: self.conversation.messages_without(&cut),
                tools: tools.to_vec(),
                ..Default::default()
            };
            self.deps.backend.prepare(request);
        }
        self.conversation.to_messages()
    }

    fn cancel_response(&mut self, reason: CancelReason) {
        if let Some(mut run) = self.response.take() {
            run.finish_cancelled(reason, &mut self.conversation, &mut self.events);
            self.backend_rx = None;
            // Calls of a cut-off response never run; each is answered "cancelled".
            self.dispatch_calls(run.call_items(), false);
        }
    }
}

fn offset(r: crate::media::VadReading, base: u64) -> crate::media::VadReading {
    crate::media::VadReading { start: r.start + base, end: r.end + base, probability: r.probability }
}

fn not_found(item_id: &str) -> ProtocolError {
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

/// Decoding + resampling + VAD of one append runs on the session's task: ~0.2 ms per
/// 20 ms chunk. A very large append (up to 15 MiB, minutes of audio) would hold a
/// runtime worker for about a second, so above 1 MiB the worker is handed over to
/// blocking work while other tasks move to the remaining workers.
fn run_heavy<T>(bytes: usize, f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if bytes > 1024 * 1024 && multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

async fn next_end_of_turn(streaming: &mut Option<StreamingTurn>) -> Option<f32> {
    match streaming {
        Some(st) => st.stream.end_of_turn.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_backend_event(rx: &mut Option<mpsc::Receiver<BackendEvent>>) -> Option<BackendEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends queued events; `false` once the transport is gone.
async fn flush(events: &mut Vec<ServerEvent>, out: &mpsc::Sender<ServerEvent>) -> bool {
    for ev in events.drain(..) {
        if out.send(ev).await.is_err() {
            return false;
        }
    }
    true
}
