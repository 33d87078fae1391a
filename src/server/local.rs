//! The always-on local session (`audio.input: mic`): the microphone feeds one session
//! that runs for the daemon's life with the configured agent.
//!
//! It is an ordinary [`Session`]; only its transport differs. Its events go to a
//! broadcast channel that any number of Realtime clients can attach to
//! (`/v1/realtime?session=local`) to watch the assistant and drive it (send text,
//! cancel, update the session); clients come and go, the session stays. Microphone
//! events (opened, lost, reopening) reach attached clients as `error` events with codes
//! `input_device_lost` / `input_device_unavailable`, and the log.
//!
//! With a speaker, `audio.echo_cancellation` decides how the assistant's own voice is
//! kept out of the microphone: `aec` cancels it on the capture thread (the microphone
//! stays live, so the user can talk over the assistant: barge-in), `half_duplex`
//! replaces the microphone with silence while the speaker plays. On barge-in the
//! speaker is cleared at once and the assistant's item is truncated at what was
//! actually played (`conversation.item.truncate`, computed from the samples the device
//! took), so the words never heard leave the model's context.
//!
//! With `audio.activation: wake_word` a [`WakeGate`] stands between the microphone and
//! the session: until the wake phrase is heard the session gets silence (no turns,
//! nothing in the conversation); when it is, the last [`WAKE_PREROLL_SAMPLES`] of real
//! audio (the phrase itself) go in at once and the microphone stays open until the
//! response is done, or `listen_ms` passes with no speech. Attached clients see
//! `hark.wake_word.detected`.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::media::AudioFormat;
use crate::config::EchoCancellation;
use crate::protocol::{ClientEnvelope, ClientEvent, ServerEvent, SessionInfo};
use crate::session::{Session, SessionDeps, SessionInput};
use crate::sources::{MicEvent, MicOutput, SpeechSink};

/// After the speaker falls silent the room still echoes: in half-duplex the microphone
/// stays gated this long.
const ECHO_TAIL: std::time::Duration = std::time::Duration::from_millis(300);

/// Events buffered for attached clients; one that falls further behind misses events
/// (and is told so), it never slows the session.
const BROADCAST_CAPACITY: usize = 4096;

/// Audio held back while waiting for the wake phrase: it must cover the phrase and the
/// VAD's lead-in, since the phrase is recognised only after it is said.
pub const WAKE_PREROLL_SAMPLES: usize = 2 * crate::media::MODEL_SAMPLE_RATE as usize;

pub struct LocalSession {
    input: mpsc::Sender<SessionInput>,
    events: broadcast::Sender<ServerEvent>,
    #[cfg(feature = "audio-devices")]
    echo_stats: Option<Arc<crate::sources::echo::EchoStats>>,
}

/// The local session's output side.
pub struct LocalOutput {
    pub speaker: Option<Arc<dyn SpeechSink>>,
    pub echo: EchoCancellation,
    /// The echo canceller's measurements, when it runs.
    #[cfg(feature = "audio-devices")]
    pub echo_stats: Option<Arc<crate::sources::echo::EchoStats>>,
    /// `audio.activation: wake_word`: the detector that opens the microphone.
    pub wake: Option<WakeWord>,
}

/// The wake word's loaded models and settings.
pub struct WakeWord {
    pub detector: crate::media::wake::WakeDetector,
    pub threshold: f32,
    pub listen: std::time::Duration,
}

impl LocalSession {
    /// Starts the session on `source` (the microphone's output); it stops when `shutdown`
    /// fires. `keep` is held until then (the capture handle: dropping it stops capture).
    pub fn start(
        deps: Arc<SessionDeps>,
        mut mic_rx: mpsc::Receiver<MicOutput>,
        keep: Box<dyn Send + 'static>,
        output: LocalOutput,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let speaker = output.speaker;
        let (in_tx, in_rx) = mpsc::channel(256);
        let (out_tx, mut out_rx) = mpsc::channel::<ServerEvent>(1024);
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        let mut session = Session::new(deps, None).with_input_format(AudioFormat::Pcm16 { rate: crate::media::MODEL_SAMPLE_RATE });
        if speaker.is_some() {
            // The assistant answers aloud on the speaker.
            session = session.with_output_modalities(vec!["audio".into()]);
        }
        tokio::spawn(session.run(in_rx, out_tx, shutdown.clone()));

        let gate = output.wake.map(|w| Arc::new(std::sync::Mutex::new(WakeGate::new(w))));
        let bcast = events.clone();
        let sink = speaker.clone();
        let gate_events = gate.clone();
        let barge_in = output.echo != EchoCancellation::HalfDuplex;
        let to_session = in_tx.clone();
        tokio::spawn(async move {
            let mut playback = Playback::default();
            while let Some(ev) = out_rx.recv().await {
                if let Some(sp) = &sink {
                    if let Some(cut) = playback.on_event(sp.as_ref(), &ev, barge_in) {
                        // The session has already stopped the response (it did so
                        // before announcing the speech), so the item can be cut now.
                        let truncate = ClientEvent::ConversationItemTruncate { item_id: cut.item_id, content_index: 0, audio_end_ms: cut.audio_end_ms };
                        let _ = to_session.send(SessionInput::Client(ClientEnvelope { event_id: None, event: truncate })).await;
                    }
                }
                if let Some(g) = &gate_events {
                    g.lock().unwrap_or_else(|p| p.into_inner()).on_event(&ev);
                }
                // No one attached is fine: the assistant runs on its own.
                let _ = bcast.send(ev);
            }
        });

        let (audio_tx, bcast) = (in_tx.clone(), events.clone());
        let half_duplex = output.echo == EchoCancellation::HalfDuplex;
        tokio::spawn(async move {
            let mut last_playing: Option<std::time::Instant> = None;
            loop {
                let out = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    out = mic_rx.recv() => out,
                };
                match out {
                    None => break,
                    Some(MicOutput::Audio(mut samples)) => {
                        // Half-duplex: while the assistant speaks (and its echo dies
                        // down) the microphone hears silence, so its own voice cannot
                        // start a turn. Silence, not nothing: the timeline stays whole.
                        if half_duplex {
                            if speaker.as_ref().is_some_and(|s| s.is_playing()) {
                                last_playing = Some(std::time::Instant::now());
                            }
                            if last_playing.is_some_and(|t| t.elapsed() < ECHO_TAIL) {
                                samples.iter_mut().for_each(|s| *s = 0.0);
                            }
                        }
                        if let Some(g) = &gate {
                            // The wake models run ≈5 ms per 80 ms of audio: not on an
                            // async worker that other tasks (this session's events) share.
                            let (out, detected) = crate::session::off_the_runtime(|| g.lock().unwrap_or_else(|p| p.into_inner()).on_audio(samples));
                            if let Some(score) = detected {
                                let _ = bcast.send(ServerEvent::HarkWakeWordDetected { score });
                            }
                            samples = out;
                            if samples.is_empty() {
                                continue;
                            }
                        }
                        if audio_tx.send(SessionInput::LocalAudio(samples)).await.is_err() {
                            break;
                        }
                    }
                    Some(MicOutput::Event(ev)) => {
                        if let Some(err) = mic_event(&ev) {
                            let _ = bcast.send(err);
                        }
                    }
                }
            }
            drop(keep);
        });
        Arc::new(Self {
            input: in_tx,
            events,
            #[cfg(feature = "audio-devices")]
            echo_stats: output.echo_stats,
        })
    }

    /// The echo canceller's measurements (ERLE on the real loop), when it runs.
    #[cfg(feature = "audio-devices")]
    pub fn echo_stats(&self) -> Option<Arc<crate::sources::echo::EchoStats>> {
        self.echo_stats.clone()
    }

    /// Subscribes to the session's events and returns the session as it is now.
    pub async fn attach(&self) -> Option<(SessionInfo, broadcast::Receiver<ServerEvent>)> {
        let rx = self.events.subscribe();
        let (tx, info) = oneshot::channel();
        self.input.send(SessionInput::Describe(tx)).await.ok()?;
        Some((info.await.ok()?, rx))
    }

    /// `audio.activation: manual`: the session detects no turns; the microphone's audio
    /// collects in the input buffer (bounded by `audio.max_buffer_seconds`) until an
    /// attached client commits it and asks for a response — push-to-talk, as a Realtime
    /// session with `turn_detection: null` works. Call right after [`Self::start`].
    pub fn use_manual_turns(&self) -> anyhow::Result<()> {
        let update = r#"{"type":"session.update","session":{"type":"realtime","audio":{"input":{"turn_detection":null}}}}"#;
        let envelope = crate::protocol::parse_client_event(update).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.input.try_send(SessionInput::Client(envelope)).map_err(|e| anyhow::anyhow!("the local session did not take manual turns: {e}"))
    }

    /// Where attached clients send their events.
    pub fn input(&self) -> mpsc::Sender<SessionInput> {
        self.input.clone()
    }
}

/// Whether the microphone reaches the session under `activation: wake_word`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Listening {
    /// Waiting for the wake phrase: the session hears silence.
    Asleep,
    /// Awake, idle since `since`; `busy` while the user speaks or a response runs
    /// (then `listen` does not count).
    Awake { since: std::time::Instant, busy: bool },
}

/// The wake word between the microphone and the session. While asleep the audio is
/// delayed by [`WAKE_PREROLL_SAMPLES`] and passed on as silence, so the session's
/// timeline stays whole and the phrase can still be handed over once recognised.
pub struct WakeGate {
    wake: WakeWord,
    state: Listening,
    held: std::collections::VecDeque<f32>,
}

impl WakeGate {
    pub fn new(wake: WakeWord) -> Self {
        Self { wake, state: Listening::Asleep, held: std::collections::VecDeque::with_capacity(WAKE_PREROLL_SAMPLES + 4096) }
    }

    /// Takes microphone audio; returns what the session gets now, and the score when
    /// this audio woke the gate.
    pub fn on_audio(&mut self, samples: Vec<f32>) -> (Vec<f32>, Option<f32>) {
        if let Listening::Awake { since, busy: false } = self.state {
            if since.elapsed() >= self.wake.listen {
                tracing::info!("wake word: no speech within {} ms; waiting for the wake phrase again", self.wake.listen.as_millis());
                self.sleep();
            }
        }
        if let Listening::Awake { .. } = self.state {
            return (samples, None);
        }
        let score = match self.wake.detector.push(&samples) {
            Ok(s) => s,
            Err(e) => {
                // A failing model must not take the microphone down; it just cannot wake.
                tracing::warn!("wake word: {e}");
                None
            }
        };
        self.held.extend(samples.iter().copied());
        if let Some(score) = score.filter(|s| *s >= self.wake.threshold) {
            tracing::info!(score, "wake word detected; listening");
            self.state = Listening::Awake { since: std::time::Instant::now(), busy: false };
            return (self.held.drain(..).collect(), Some(score));
        }
        let over = self.held.len().saturating_sub(WAKE_PREROLL_SAMPLES);
        self.held.drain(..over);
        (vec![0.0; over], None)
    }

    /// Follows the session: the turn beginning, and its response ending.
    pub fn on_event(&mut self, ev: &ServerEvent) {
        let Listening::Awake { since, .. } = self.state else { return };
        let now = std::time::Instant::now();
        match ev {
            ServerEvent::InputAudioBufferSpeechStarted { .. } | ServerEvent::ResponseCreated { .. } => {
                self.state = Listening::Awake { since, busy: true };
            }
            // A turn that asks for no response still ends the user's speech; `listen`
            // counts from there.
            ServerEvent::InputAudioBufferSpeechStopped { .. } => self.state = Listening::Awake { since: now, busy: false },
            // Cut off by the user's own speech (barge-in): their new turn is coming.
            ServerEvent::ResponseDone { response } if response.status == crate::protocol::ResponseStatus::Cancelled => {
                self.state = Listening::Awake { since: now, busy: false };
            }
            ServerEvent::ResponseDone { .. } => {
                tracing::info!("wake word: answered; waiting for the wake phrase again");
                self.sleep();
            }
            _ => {}
        }
    }

    pub fn is_awake(&self) -> bool {
        matches!(self.state, Listening::Awake { .. })
    }

    fn sleep(&mut self) {
        self.state = Listening::Asleep;
        self.held.clear();
        // The phrase is still in the detector's last 1.3 s of history: start clean.
        self.wake.detector.reset();
    }
}

/// A cut the speaker asks of the session: the item keeps what was heard.
#[derive(Debug, PartialEq)]
struct Cut {
    item_id: String,
    audio_end_ms: u64,
}

/// What the speaker is playing, as far as truncation needs to know.
#[derive(Default)]
struct Playback {
    /// The spoken item whose audio went out last: its id, the speaker position of its
    /// first sample, and how much of it (24 kHz samples) was queued.
    item: Option<(String, u64, u64)>,
    /// Whether the user's speech interrupts the assistant (`interrupt_response`).
    interrupts: bool,
}

impl Playback {
    /// Speech deltas go to the speaker; the user's speech over it (barge-in) or a
    /// cancelled response stops it, and the heard part is returned for truncation.
    fn on_event(&mut self, sp: &dyn SpeechSink, ev: &ServerEvent, barge_in: bool) -> Option<Cut> {
        use base64::Engine;
        match ev {
            ServerEvent::SessionCreated { session } | ServerEvent::SessionUpdated { session } => {
                self.interrupts = session.turn_detection.as_ref().and_then(|t| t.get("interrupt_response")).and_then(|v| v.as_bool()).unwrap_or(false);
                None
            }
            ServerEvent::ResponseOutputAudioDelta { delta, item_id, .. } => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(delta).ok()?;
                let samples: Vec<f32> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect();
                if self.item.as_ref().is_none_or(|(id, ..)| id != item_id) {
                    self.item = Some((item_id.clone(), sp.queued_end(), 0));
                }
                sp.play(&samples);
                if let Some((.., queued)) = self.item.as_mut() {
                    *queued += samples.len() as u64;
                }
                None
            }
            ServerEvent::InputAudioBufferSpeechStarted { .. } if barge_in && self.interrupts && sp.is_playing() => self.stop(sp),
            ServerEvent::ResponseDone { response } if response.status == crate::protocol::ResponseStatus::Cancelled => {
                let playing = sp.is_playing();
                let cut = if playing { self.stop(sp) } else { None };
                sp.clear();
                cut
            }
            _ => None,
        }
    }

    /// Stops playback now; the item playing keeps what the device had taken.
    fn stop(&mut self, sp: &dyn SpeechSink) -> Option<Cut> {
        let at = sp.position();
        sp.clear();
        let (item_id, start, queued) = self.item.take()?;
        let heard_ms = at.saturating_sub(start) * 1000 / sp.rate().max(1) as u64;
        let audio_end_ms = heard_ms.min(queued * 1000 / crate::speech::OUTPUT_SAMPLE_RATE as u64);
        tracing::info!(item = %item_id, audio_end_ms, "barge-in: playback stopped; the reply is cut where the user stopped hearing it");
        Some(Cut { item_id, audio_end_ms })
    }
}

fn mic_event(ev: &MicEvent) -> Option<ServerEvent> {
    match ev {
        MicEvent::Opened { .. } => None,
        MicEvent::Lost { device, reason } => {
            Some(ServerEvent::server_error("input_device_lost", format!("The microphone '{device}' stopped ({reason}); reopening it."), None))
        }
        MicEvent::OpenFailed { reason, retry_in } => Some(ServerEvent::server_error(
            "input_device_unavailable",
            format!("Cannot open the microphone: {reason}; retrying in {} ms.", retry_in.as_millis()),
            None,
        )),
    }
}
