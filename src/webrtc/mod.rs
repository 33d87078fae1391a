//! Browser sessions over WebRTC, the OpenAI Realtime way: a page posts its SDP offer
//! to `POST /v1/realtime/calls` and gets hark's answer; JSON events then flow on the
//! `oai-events` data channel through the very [`Session`](crate::session::Session)
//! the WebSocket uses, the microphone arrives as Opus, the camera as VP8 or H.264.
//!
//! - `secrets.rs`: ephemeral `ek_…` keys (`POST /v1/realtime/client_secrets`);
//! - `signaling.rs`: the offer, checked before anything is built;
//! - `call.rs`: the peer connection and the task that runs one call;
//! - `datachannel.rs`: `oai-events` ↔ the session;
//! - `audio.rs`: Opus in (→ 48 kHz → the session's audio stages) and out;
//! - `video.rs`: camera frames sampled into the context (VP8 decoded there);
//! - `h264.rs`: H.264 access units out of RTP, and their decoder.
//!
//! The HTTP side (routes, keys, error bodies) lives in `server/calls.rs`; this module
//! knows no HTTP.

pub mod audio;
pub mod call;
pub mod datachannel;
pub mod h264;
pub mod secrets;
pub mod signaling;
pub mod video;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WebRtcConfig;
use crate::protocol::Dialect;
use crate::session::SessionDeps;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    BadOffer(#[from] signaling::OfferError),
    /// The offer parsed but could not be answered (nothing in common, bad fingerprints…).
    #[error("The SDP offer could not be answered: {0}")]
    Offer(String),
    #[error("{0}")]
    Internal(String),
    #[error("webrtc: {0}")]
    Webrtc(#[from] rtc::shared::error::Error),
    #[error(transparent)]
    Audio(#[from] audio::AudioError),
}

/// What a call needs from the server.
#[derive(Clone)]
pub struct CallContext {
    pub deps: Arc<SessionDeps>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub calls: Arc<Calls>,
    /// The server's shutdown: calls end with it.
    pub shutdown: CancellationToken,
    /// Where call tasks are tracked, so shutdown waits for them.
    pub tracker: TaskTracker,
    pub webrtc: WebRtcConfig,
    pub udp_addrs: Vec<String>,
    pub model: Option<String>,
    /// `session` of the request or of the ephemeral key: the first `session.update`.
    pub session_config: Option<serde_json::Value>,
    pub dialect: Dialect,
    /// A peer that reads no events this long is cut off.
    pub read_timeout: Duration,
    pub max_message_bytes: usize,
    pub video: video::VideoSettings,
    /// Held for the call's life: one of `server.max_sessions`.
    pub permit: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// The calls open now: for hang-up by id, the output audio hook, and counting.
#[derive(Default)]
pub struct Calls {
    open: Mutex<HashMap<String, OpenCall>>,
    connected_total: AtomicU64,
    ended_total: AtomicU64,
    /// The last calls that ended, newest last (for tests and diagnostics).
    ended: Mutex<std::collections::VecDeque<CallStats>>,
}

/// What one call did, recorded when it ends.
#[derive(Debug, Clone)]
pub struct CallStats {
    pub call_id: String,
    pub connected: bool,
    pub duration: Duration,
    pub frames_sampled: u64,
    pub keyframe_requests: u64,
    /// The camera's codec ("vp8", "h264"; empty: no camera).
    pub video_codec: String,
    /// Time spent decoding the sampled frames, µs.
    pub decode_micros: u64,
    /// Why it ended.
    pub reason: String,
}

/// Ended calls remembered in [`Calls::ended`].
const ENDED_KEPT: usize = 64;

struct OpenCall {
    hangup: CancellationToken,
    audio_out: audio::AudioOut,
    video: Arc<video::VideoState>,
}

impl Calls {
    fn register(&self, call_id: &str, audio_out: audio::AudioOut) {
        let call = OpenCall { hangup: CancellationToken::new(), audio_out, video: Default::default() };
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(call_id.to_string(), call);
    }

    fn hangup_token(&self, call_id: &str) -> CancellationToken {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(call_id).map(|c| c.hangup.clone()).unwrap_or_default()
    }

    fn video_state(&self, call_id: &str) -> Arc<video::VideoState> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(call_id).map(|c| c.video.clone()).unwrap_or_default()
    }

    /// Camera frames sampled so far in an open call.
    pub fn frames_sampled(&self, call_id: &str) -> Option<u64> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(call_id).map(|c| c.video.sampled.load(Ordering::Relaxed))
    }

    fn connected(&self) {
        self.connected_total.fetch_add(1, Ordering::Relaxed);
    }

    fn unregister(&self, call_id: &str, connected: bool, duration: Duration, reason: &str) {
        let call = self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(call_id);
        self.ended_total.fetch_add(1, Ordering::Relaxed);
        let video = call.map(|c| c.video).unwrap_or_default();
        let frames_sampled = video.sampled.load(Ordering::Relaxed);
        let keyframe_requests = video.keyframe_requests.load(Ordering::Relaxed);
        let decode_micros = video.decode_micros.load(Ordering::Relaxed);
        let video_codec = video.codec.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.len() == ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back(CallStats {
            call_id: call_id.to_string(),
            connected,
            duration,
            frames_sampled,
            keyframe_requests,
            video_codec,
            decode_micros,
            reason: reason.to_string(),
        });
    }

    /// The calls that ended most recently, oldest first.
    pub fn ended(&self) -> Vec<CallStats> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Ends a call; `false` when no such call is open.
    pub fn hang_up(&self, call_id: &str) -> bool {
        match self.open.lock().unwrap_or_else(|p| p.into_inner()).get(call_id) {
            Some(c) => {
                c.hangup.cancel();
                true
            }
            None => false,
        }
    }

    /// The hook for speech output: queue audio to the caller (see [`audio::AudioOut`]).
    pub fn audio_out(&self, call_id: &str) -> Option<audio::AudioOut> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(call_id).map(|c| c.audio_out.clone())
    }

    /// Calls open now (answered, not yet ended).
    pub fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Calls whose peer connected, since start.
    pub fn connected_total(&self) -> u64 {
        self.connected_total.load(Ordering::Relaxed)
    }

    pub fn ended_total(&self) -> u64 {
        self.ended_total.load(Ordering::Relaxed)
    }
}
