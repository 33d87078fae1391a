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

        let bcast = events.clone();
        let sink = speaker.clone();
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
                // No one attached is fine: the assistant runs on its own.
                let _ = bcast.send(ev);
            }
        });

        let (audio_tx, bcast) = (in_tx.clone(), events.clone());
        let gate = output.echo == EchoCancellation::HalfDuplex;
        tokio::spawn(async move {
            let mut last_playing: Option<std::time::Instant> = None;
            loop {
                let out = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    out = mic_rx.recv() => out,
                };
                match out {
                    None => break,
                    Some(MicOutput::Audio(mut samples)) if gate => {
                        // Half-duplex: while the assistant speaks (and its echo dies
                        // down) the microphone hears silence, so its own voice cannot
                        // start a turn. Silence, not nothing: the timeline stays whole.
                        if speaker.as_ref().is_some_and(|s| s.is_playing()) {
                            last_playing = Some(std::time::Instant::now());
                        }
                        if last_playing.is_some_and(|t| t.elapsed() < ECHO_TAIL) {
                            samples.iter_mut().for_each(|s| *s = 0.0);
                        }
                        if audio_tx.send(SessionInput::LocalAudio(samples)).await.is_err() {
                            break;
                        }
                    }
                    Some(MicOutput::Audio(samples)) => {
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

    /// Where attached clients send their events.
    pub fn input(&self) -> mpsc::Sender<SessionInput> {
        self.input.clone()
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
