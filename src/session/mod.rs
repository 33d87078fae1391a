//! One client's realtime session: the input audio buffer, turn detection, the
//! conversation and the response in flight.
//!
//! A session is a task that reads [`SessionInput`]s and writes [`ServerEvent`]s; it
//! knows nothing of WebSockets or WebRTC, so every transport shares it. All state is
//! owned by the task: handlers are plain synchronous methods that queue events, and
//! the loop flushes them, so no lock is ever held across an await.
//!
//! - `input.rs`: the input audio buffer, turn detection events, commits, streaming prefill;
//! - `items.rs`: items the client creates, and truncation; `camera.rs`: sampled
//!   camera frames from a media track;
//! - `response.rs`: one response's event sequence; `dispatch.rs`: tools and agents;
//!   `calls.rs`: the exactly-once ledger of tool calls;
//! - `conversation.rs`, `settings.rs`, `turn.rs`: the state they share.

pub mod budget;
pub mod calls;
mod camera;
pub mod conversation;
mod dispatch;
mod input;
pub(crate) use input::off_the_runtime;
mod items;
pub mod response;
mod rolling;
pub mod settings;
pub mod turn;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::{ContextWindow, RetentionPolicy};
use crate::media::vad::{EnergyVad, SileroModel, VadError, VoiceDetector};
use crate::media::AudioPipeline;
use crate::model::{Backend, BackendEvent, ChatMessage, GenerateRequest, ToolSpec};
use crate::protocol::{new_id, ClientEnvelope, ClientEvent, MaxTokens, ProtocolError, ResponseParams, ResponseStatus, ServerEvent};
use calls::{CallAnswer, CallLedger, Unanswered};
pub use conversation::Conversation;
use response::{CancelReason, ResponseRun, Step};
pub use settings::SessionSettings;
use input::{next_end_of_turn, InputBuffer, PendingSpeech, StreamingTurn};
use items::not_found;
use turn::TurnDetector;

/// What a transport hands to a session.
#[derive(Debug)]
pub enum SessionInput {
    Client(ClientEnvelope),
    /// A message that could not be parsed; answered with an `error` event.
    Invalid(ProtocolError),
    /// Decoded audio from a media track (WebRTC): mono samples at `rate` Hz. It takes
    /// the same resample/VAD/turn path as `input_audio_buffer.append`.
    TrackAudio { rate: u32, samples: Vec<f32> },
    /// A sampled camera frame (WebRTC video), as a `data:image/jpeg;base64,…` URL sized
    /// to the frame budget, `at_ms` after the call began.
    CameraFrame { data_url: String, at_ms: u64 },
    /// Audio from a local source (the microphone), mono at the session's input rate.
    LocalAudio(Vec<f32>),
    /// A client attaches to this running session: it gets the session as it is now.
    Describe(tokio::sync::oneshot::Sender<crate::protocol::SessionInfo>),
    /// An input that holds bytes of the session's budget while it waits in the queue
    /// (the transport charged them); they are given back when the session takes it.
    Queued(Box<SessionInput>, budget::Charge),
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
#[derive(Clone)]
pub struct SessionDeps {
    pub defaults: SessionSettings,
    pub backend: Arc<dyn Backend>,
    pub vad: VadFactory,
    /// Cap on the input audio buffer, in seconds.
    pub max_buffer_seconds: u32,
    /// Most conversation items; past it the oldest whole turns are evicted.
    pub max_items: usize,
    /// Bytes all sessions together may hold, and what one session may.
    pub memory: Arc<budget::MemoryPool>,
    pub max_session_bytes: u64,
    /// An `input_image` over this is re-encoded once on arrival.
    pub max_image_bytes: usize,
    /// The context window's limits.
    pub retention: RetentionPolicy,
    /// Prefill user audio while the user speaks, where the backend can.
    pub streaming_prefill: bool,
    /// The YAML tools hark runs, and the agents that pick among them.
    pub tools: Arc<crate::tools::ToolRegistry>,
    pub agents: Arc<crate::tools::AgentSet>,
    /// How long a client gets to answer a call of a tool it declared.
    pub client_tool_timeout: std::time::Duration,
    /// Speech out for responses that ask for audio; `None`: speech is off.
    pub speech: Option<Arc<crate::speech::SpeechEngine>>,
    /// Where audio this session loses is counted (`/metrics`).
    pub audio_drops: crate::metrics::AudioDrops,
}

/// Shortest audio a manual commit accepts (the protocol's rule).
const MIN_COMMIT_MS: u64 = 100;
/// Silence kept after speech ends when a VAD turn is committed.
const TURN_TAIL_MS: u64 = 200;
/// Largest image accepted in `input_image`, as a data URL.
const MAX_IMAGE_URL_BYTES: usize = 20 * 1024 * 1024;

pub struct Session {
    deps: Arc<SessionDeps>,
    settings: SessionSettings,
    pipeline: AudioPipeline,
    /// Set once audio arrives from a media track: the pipeline then runs at the track's
    /// rate, whatever `input_audio_format` says.
    media_format: Option<crate::media::AudioFormat>,
    /// 16 kHz samples of earlier pipelines (a format change starts a new one).
    stream_base: u64,
    turn: Option<TurnDetector>,
    buffer: InputBuffer,
    speech: Option<PendingSpeech>,
    /// Camera frames sampled while the user speaks, for that turn's message (camera.rs).
    held_frames: Vec<camera::HeldFrame>,
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
    tool_results_tx: mpsc::Sender<(String, CallAnswer)>,
    tool_results_rx: mpsc::Receiver<(String, CallAnswer)>,
    /// Follow-up responses created for tool results since the user last spoke.
    tool_rounds: u32,
    /// This session's conversation, as `response.conversation_id` names it.
    conversation_id: String,
    /// A `response.create` that waits for the client to answer its calls.
    deferred_response: Option<ResponseParams>,
    /// Counts conversation input the model has to answer (items, commits, tool answers).
    input_generation: u64,
    /// The input generation when hark itself last started a response (a continuation
    /// after its tools, or a deferred one); see [`Self::client_response_create`].
    hark_started_at: Option<u64>,
    events: Vec<ServerEvent>,
    /// This session's bytes (see `budget.rs`): the conversation's and the input
    /// buffer's charges; transports charge their queues on the same budget.
    budget: Arc<budget::SessionBudget>,
    conversation_charge: budget::Charge,
    buffer_charge: budget::Charge,
    /// Whether the transport releases the bytes of events it takes from the queue.
    count_outgoing: bool,
}

impl Session {
    pub fn new(deps: Arc<SessionDeps>, model: Option<String>) -> Self {
        let mut settings = deps.defaults.clone();
        settings.id = new_id("sess");
        if let Some(m) = model.filter(|m| !m.is_empty()) {
            settings.model = m;
        }
        let budget = budget::SessionBudget::new(deps.memory.clone(), deps.max_session_bytes);
        let (tool_results_tx, tool_results_rx) = mpsc::channel(64);
        let mut s = Self {
            pipeline: AudioPipeline::new(settings.input_format, None).expect("16/24/8 kHz are supported rates"),
            deps: deps.clone(),
            settings,
            media_format: None,
            stream_base: 0,
            turn: None,
            buffer: InputBuffer::default(),
            speech: None,
            held_frames: Vec::new(),
            buffer_overflow_reported: false,
            last_activity: 0,
            conversation: Conversation::new(),
            response: None,
            backend_rx: None,
            streaming: None,
            context: ContextWindow::new(deps.retention, deps.backend.token_counter()),
            agent: None,
            calls: CallLedger::default(),
            tool_results_tx,
            tool_results_rx,
            tool_rounds: 0,
            conversation_id: new_id("conv"),
            deferred_response: None,
            input_generation: 0,
            hark_started_at: None,
            events: Vec::new(),
            conversation_charge: budget.charge(),
            buffer_charge: budget.charge(),
            budget,
            count_outgoing: false,
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

    /// Sets the input format (the local session takes 16 kHz samples from the microphone).
    pub fn with_input_format(mut self, format: crate::media::AudioFormat) -> Self {
        self.settings.input_format = format;
        self.rebuild_audio_path();
        self
    }

    /// Sets the output modalities (the local session speaks when it has a speaker).
    pub fn with_output_modalities(mut self, modalities: Vec<String>) -> Self {
        self.settings.output_modalities = modalities;
        self
    }

    /// The session's memory budget, for the transport to charge its queues on.
    pub fn budget(&self) -> Arc<budget::SessionBudget> {
        self.budget.clone()
    }

    /// The transport releases each event's [`budget::event_bytes`] when it takes the
    /// event from the queue; the session holds them on its budget while queued.
    pub fn with_outgoing_accounting(mut self) -> Self {
        self.count_outgoing = true;
        self
    }

    /// Runs until the client goes away or `shutdown` fires. Returns the conversation
    /// as it ended (every tool call answered), for whoever wants to look.
    pub async fn run(mut self, mut input: mpsc::Receiver<SessionInput>, out: mpsc::Sender<ServerEvent>, shutdown: CancellationToken) -> Conversation {
        self.events.push(ServerEvent::SessionCreated { session: self.settings.info() });
        self.announce_tools();
        self.greet();
        loop {
            self.keep_within_limits();
            let outgoing = self.count_outgoing.then_some(&*self.budget);
            if !flush(&mut self.events, &out, outgoing).await {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.cancel_response(CancelReason::Shutdown);
                    self.events.push(ServerEvent::server_error("server_shutdown", "hark is shutting down; this session is closing.", None));
                    let outgoing = self.count_outgoing.then_some(&*self.budget);
                    flush(&mut self.events, &out, outgoing).await;
                    break;
                }
                ev = next_backend_event(&mut self.backend_rx) => self.on_backend_event(ev),
                ev = next_speech_event(&mut self.response) => self.on_speech_event(ev),
                p = next_end_of_turn(&mut self.streaming) => self.on_end_of_turn(p),
                Some((call_id, output)) = self.tool_results_rx.recv() => self.on_tool_result(call_id, output),
                _ = sleep_until(self.calls.next_deadline()) => self.expire_client_calls(),
                msg = input.recv() => match msg {
                    Some(input) => self.on_input(input),
                    None => break,
                },
            }
        }
        // The client is gone or we are stopping: stop the backend's work too, and
        // answer the calls of the open response (nobody will read these events, but the
        // conversation keeps every answer).
        self.cancel_response(CancelReason::Shutdown);
        self.retract_streaming();
        self.close_calls();
        self.conversation
    }

    fn on_input(&mut self, input: SessionInput) {
                match input {
                    SessionInput::Queued(input, charge) => {
                        // Out of the queue: what it holds now is the session's to charge.
                        drop(charge);
                        self.on_input(*input);
                    }
                    SessionInput::Client(env) => self.handle(env),
                    SessionInput::Invalid(err) => self.events.push(ServerEvent::from_protocol_error(err)),
                    SessionInput::TrackAudio { rate, samples } => self.append_track_audio(rate, &samples),
                    SessionInput::CameraFrame { data_url, at_ms } => self.add_camera_frame(data_url, at_ms),
                    SessionInput::LocalAudio(samples) => {
                        if let Err(e) = self.append_samples(&samples) {
                            self.events.push(ServerEvent::from_protocol_error(e));
                        }
                    }
                    SessionInput::Describe(reply) => {
                        let _ = reply.send(self.settings.info());
                    }
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
        let step = run.on_backend_event(ev, &mut self.conversation, &mut self.events);
        if step == Step::Generating {
            return;
        }
        // The model has written its calls: run them, or answer why they will not run.
        let (calls, outcome) = (run.call_items(), run.outcome());
        if step == Step::Done {
            self.response = None;
        }
        self.backend_rx = None;
        match outcome {
            Some(ResponseStatus::Completed) => self.dispatch_calls(calls),
            Some(ResponseStatus::Incomplete) => self.answer_unrun(calls, Unanswered::TokenLimit),
            Some(ResponseStatus::Failed) => self.answer_unrun(calls, Unanswered::BackendFailed),
            _ => self.answer_unrun(calls, Unanswered::ResponseCancelled),
        }
        self.settle_response();
    }

    fn on_speech_event(&mut self, ev: Option<crate::speech::SpeechEvent>) {
        let Some(run) = self.response.as_mut() else { return };
        if run.on_speech_event(ev, &mut self.conversation, &mut self.events) {
            self.settle_response();
        }
    }

    fn handle(&mut self, env: ClientEnvelope) {
        let event_id = env.event_id.clone();
        let result = match env.event {
            ClientEvent::SessionUpdate { session } => self.update_session(session),
            ClientEvent::InputAudioBufferAppend { audio } => self.append_audio(&audio),
            ClientEvent::InputAudioBufferCommit {} => self.commit_buffer(),
            ClientEvent::InputAudioBufferClear {} => {
                // Everything starts afresh: the buffer, the VAD's and the resampler's
                // state, and a turn the user was in the middle of.
                self.rebuild_audio_path();
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
            ClientEvent::ResponseCreate { response } => self.client_response_create(response.unwrap_or_default()),
            ClientEvent::ResponseCancel { response_id } => match (&self.response, response_id) {
                (None, None) if self.deferred_response.is_some() => {
                    self.deferred_response = None;
                    Ok(())
                }
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
            // A WebRTC call handles it in its transport (the audio queued on its track);
            // here it came over a WebSocket, where the client holds the played audio
            // (it stops playback itself and truncates the item): refused, as OpenAI does.
            ClientEvent::OutputAudioBufferClear {} => Err(ProtocolError::new(
                "invalid_event",
                "output_audio_buffer.clear is only supported for WebRTC sessions; over a WebSocket the client plays the audio and stops it itself (then conversation.item.truncate).",
            )
            .param("type")),
        };
        if let Err(e) = result {
            self.events.push(ServerEvent::from_protocol_error(e.event_id(event_id)));
        }
    }

    fn update_session(&mut self, update: crate::protocol::SessionUpdate) -> Result<(), ProtocolError> {
        let mut agent = None;
        let next = match update.agent.as_deref().filter(|a| *a != self.settings.agent) {
            Some(name) => {
                let (base, a) = self.select_agent(name)?;
                agent = Some(a);
                base.merged(&update)?
            }
            None => self.settings.merged(&update)?,
        };
        let agent_changed = agent.is_some();
        if agent_changed {
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
        if agent_changed {
            self.announce_tools();
        }
        Ok(())
    }

    /// A client's `response.create`. The JS agents SDK asks for a response after every
    /// `mcp_call` it sees finish and after its own tool outputs, while hark has already
    /// continued by itself: such a request, carrying nothing of its own and arriving when
    /// the model has seen all the input there is, is answered by the response hark
    /// started — absorbed while that runs, or an empty response once it is over (the
    /// client waits for a `response.created` for each request). Without this, the client
    /// would get an error or the model would answer twice.
    fn client_response_create(&mut self, params: ResponseParams) -> Result<(), ProtocolError> {
        let plain = params.instructions.is_none() && params.tools.is_none() && params.conversation.is_none() && params.tool_choice.is_none();
        if plain && self.hark_started_at == Some(self.input_generation) {
            if self.response.is_some() {
                tracing::debug!(session = %self.settings.id, "response.create absorbed by the response hark started");
                return Ok(());
            }
            let mut run = ResponseRun::start(
                true,
                self.settings.output_modalities.clone(),
                self.settings.max_output_tokens.clone(),
                params.metadata,
                response::ToolRouting::default(),
                self.conversation_id.clone(),
                &mut self.events,
            );
            run.finish_done(&mut self.events);
            return Ok(());
        }
        self.create_response(params)
    }

    /// Starts a response on hark's own initiative (see [`Self::client_response_create`]).
    pub(super) fn hark_create_response(&mut self, params: ResponseParams) -> Result<(), ProtocolError> {
        self.create_response(params)?;
        if self.response.is_some() {
            self.hark_started_at = Some(self.input_generation);
        }
        Ok(())
    }

    /// Something new for the model to answer entered the conversation.
    pub(super) fn new_input(&mut self) {
        self.input_generation += 1;
    }

    fn create_response(&mut self, params: ResponseParams) -> Result<(), ProtocolError> {
        let active = self.response.as_ref().map(|r| r.id.clone()).or(self.deferred_response.as_ref().map(|_| "(waiting for tool outputs)".into()));
        if let Some(id) = active {
            return Err(ProtocolError::new(
                "conversation_already_has_active_response",
                format!("Conversation already has an active response in progress: {id}. Wait until the response is finished before creating a new one."),
            ));
        }
        let in_conversation = params.conversation.as_deref() != Some("none");
        // The model continues only once every call of the last response is answered:
        // a client may ask for the next response before sending its tool outputs (the
        // JS agents SDK does), so the response waits for them (or their deadline).
        if in_conversation && self.calls.client_calls_pending() > 0 {
            self.deferred_response = Some(params);
            return Ok(());
        }
        let max_tokens = params.max_output_tokens.clone().or(params.max_response_output_tokens.clone()).unwrap_or(self.settings.max_output_tokens.clone());
        let request = self.model_request(&params);
        let modalities = params
            .output_modalities
            .clone()
            .or(params.modalities.clone())
            .unwrap_or_else(|| self.settings.output_modalities.clone());
        let routing = self.tool_routing(&params);
        let speech = if modalities.iter().any(|m| m == "audio") {
            if self.deps.speech.is_none() {
                self.events.push(ServerEvent::server_error(
                    "speech_unavailable",
                    "This response asked for audio, but hark has no speech engine (speech.engine in config.yaml); it answers in text.",
                    None,
                ));
            }
            self.deps.speech.clone()
        } else {
            None
        };
        let mut run = ResponseRun::start(
            in_conversation,
            modalities,
            max_tokens,
            params.metadata.clone(),
            routing,
            self.conversation_id.clone(),
            &mut self.events,
        );
        if let Some(engine) = speech {
            run.speak(crate::speech::SpeechStream::start(engine, run.cancel.child_token()));
        }
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
            ..Default::default()
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
        let Some(run) = self.response.as_mut() else { return };
        let generating = !run.awaiting_tools();
        run.stop(reason, &mut self.conversation, &mut self.events);
        self.backend_rx = None;
        if generating {
            // Calls the model had not finished never run.
            let unrun = match reason {
                CancelReason::TurnDetected => Unanswered::Interrupted,
                CancelReason::Shutdown => Unanswered::SessionEnded,
                CancelReason::ClientCancelled | CancelReason::Backend => Unanswered::ResponseCancelled,
            };
            let calls = self.response.as_ref().map(ResponseRun::call_items).unwrap_or_default();
            self.answer_unrun(calls, unrun);
        } else if matches!(reason, CancelReason::TurnDetected | CancelReason::ClientCancelled) {
            // Running calls stop if their tool says so; the others finish, and their
            // results join the conversation for the next turn.
            self.interrupt_calls();
        }
        if let Some(mut run) = self.response.take() {
            run.finish_done(&mut self.events);
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

async fn next_speech_event(run: &mut Option<ResponseRun>) -> Option<crate::speech::SpeechEvent> {
    match run.as_mut().and_then(ResponseRun::speech_mut) {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn next_backend_event(rx: &mut Option<mpsc::Receiver<BackendEvent>>) -> Option<BackendEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends queued events; `false` once the transport is gone. With `outgoing`, each
/// event's bytes are held on the budget until the transport releases them.
async fn flush(events: &mut Vec<ServerEvent>, out: &mpsc::Sender<ServerEvent>, outgoing: Option<&budget::SessionBudget>) -> bool {
    for ev in events.drain(..) {
        let bytes = outgoing.map(|b| {
            let n = budget::event_bytes(&ev);
            b.hold(n);
            (b, n)
        });
        if out.send(ev).await.is_err() {
            if let Some((b, n)) = bytes {
                b.release(n);
            }
            return false;
        }
    }
    true
}
