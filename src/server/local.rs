//! The always-on local session (`audio.input: mic`): the microphone feeds one session
//! that runs for the daemon's life with the configured agent.
//!
//! It is an ordinary [`Session`]; only its transport differs. Its events go to a
//! broadcast channel that any number of Realtime clients can attach to
//! (`/v1/realtime?session=local`) to watch the assistant and drive it (send text,
//! cancel, update the session); clients come and go, the session stays. Microphone
//! events (opened, lost, reopening) reach attached clients as `error` events with codes
//! `input_device_lost` / `input_device_unavailable`, and the log.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::media::AudioFormat;
use crate::protocol::{ServerEvent, SessionInfo};
use crate::session::{Session, SessionDeps, SessionInput};
use crate::sources::{MicEvent, MicOutput, SpeechSink};

/// After the speaker falls silent the room still echoes: the microphone stays gated
/// this long (half-duplex; there is no echo canceller yet).
const ECHO_TAIL: std::time::Duration = std::time::Duration::from_millis(300);

/// Events buffered for attached clients; one that falls further behind misses events
/// (and is told so), it never slows the session.
const BROADCAST_CAPACITY: usize = 4096;

pub struct LocalSession {
    input: mpsc::Sender<SessionInput>,
    events: broadcast::Sender<ServerEvent>,
}

impl LocalSession {
    /// Starts the session on `source` (the microphone's output); it stops when `shutdown`
    /// fires. `keep` is held until then (the capture handle: dropping it stops capture).
    pub fn start(
        deps: Arc<SessionDeps>,
        mut mic_rx: mpsc::Receiver<MicOutput>,
        keep: Box<dyn Send + 'static>,
        speaker: Option<Arc<dyn SpeechSink>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
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
        tokio::spawn(async move {
            while let Some(ev) = out_rx.recv().await {
                if let Some(sp) = &sink {
                    play_on(sp.as_ref(), &ev);
                }
                // No one attached is fine: the assistant runs on its own.
                let _ = bcast.send(ev);
            }
        });

        let (audio_tx, bcast) = (in_tx.clone(), events.clone());
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
                    Some(MicOutput::Event(ev)) => {
                        if let Some(err) = mic_event(&ev) {
                            let _ = bcast.send(err);
                        }
                    }
                }
            }
            drop(keep);
        });
        Arc::new(Self { input: in_tx, events })
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

/// Speech deltas go to the speaker; a cancelled response stops it.
fn play_on(sp: &dyn SpeechSink, ev: &ServerEvent) {
    use base64::Engine;
    match ev {
        ServerEvent::ResponseOutputAudioDelta { delta, .. } => {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(delta) {
                let samples: Vec<f32> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect();
                sp.play(&samples);
            }
        }
        ServerEvent::ResponseDone { response } if response.status == crate::protocol::ResponseStatus::Cancelled => sp.clear(),
        _ => {}
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
