//! The `oai-events` data channel: the Realtime protocol's JSON events, exactly as the
//! WebSocket carries them. Messages in are parsed by the same [`parse_client_event`]
//! and go to the same [`Session`](crate::session::Session); events out are written by
//! the same [`to_wire`] (so they carry the same `event_id`s). One client event belongs
//! to the transport instead: `output_audio_buffer.clear` cuts off the audio queued on
//! the call's track, which only the call holds.

use std::sync::Arc;

use ::webrtc::data_channel::{DataChannel, DataChannelEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::{parse_client_event, ClientEvent, ProtocolError};
use crate::session::SessionInput;

/// The channel's label in OpenAI's WebRTC flow.
pub const LABEL: &str = "oai-events";

/// Reads client events from the channel into the session until the channel closes,
/// the session is gone, or `done` fires. Returns when the channel is finished.
/// `output_audio_buffer.clear` goes to `clear` (the call task), not to the session.
pub async fn read_events(
    dc: Arc<dyn DataChannel>,
    session: mpsc::Sender<SessionInput>,
    clear: mpsc::UnboundedSender<()>,
    max_bytes: usize,
    done: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            _ = done.cancelled() => return,
            ev = dc.poll() => ev,
        };
        let input = match ev {
            None | Some(DataChannelEvent::OnClose) => return,
            Some(DataChannelEvent::OnMessage(msg)) => {
                if msg.data.len() > max_bytes {
                    SessionInput::Invalid(ProtocolError::new(
                        "message_too_large",
                        format!("An event on {LABEL} is limited to {max_bytes} bytes (server.max_message_bytes)."),
                    ))
                } else if !msg.is_string {
                    SessionInput::Invalid(ProtocolError::new(
                        "invalid_message",
                        "Binary messages are not part of the Realtime protocol; send JSON text on the data channel.",
                    ))
                } else {
                    match std::str::from_utf8(&msg.data) {
                        Ok(text) => match parse_client_event(text) {
                            Ok(env) if matches!(env.event, ClientEvent::OutputAudioBufferClear {}) => {
                                let _ = clear.send(());
                                continue;
                            }
                            Ok(env) => SessionInput::Client(env),
                            Err(e) => SessionInput::Invalid(e),
                        },
                        Err(_) => SessionInput::Invalid(ProtocolError::new("invalid_message", "A text message on the data channel is not valid UTF-8.")),
                    }
                }
            }
            Some(_) => continue,
        };
        if session.send(input).await.is_err() {
            return;
        }
    }
}
