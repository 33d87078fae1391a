//! Sources: where audio comes from besides a client's WebSocket.
//!
//! - `speaker.rs`: the local speaker (cpal output fed from a lock-free ring; cleared
//!   within one buffer on barge-in).
//! - `mic.rs` (feature `audio-devices`, on by default; needs ALSA's libasound): the local
//!   microphone through cpal, into a lock-free ring, resampled to 16 kHz for the
//!   session; device loss is detected and the capture reopens.
//! - `echo.rs`: acoustic echo cancellation (AEC3) of the speaker on the microphone,
//!   with what the speaker played as the reference.
//!
//! What a source hands on ([`MicOutput`]) is defined here, without cpal, so the local
//! session can run on any source.

#[cfg(feature = "audio-devices")]
pub mod echo;
#[cfg(feature = "audio-devices")]
pub mod mic;
#[cfg(feature = "audio-devices")]
pub mod speaker;

/// Where the local session's speech goes (the speaker), as the session sees it.
pub trait SpeechSink: Send + Sync {
    /// Queues 24 kHz mono speech.
    fn play(&self, samples: &[f32]);
    /// Stops playback now (barge-in, cancel).
    fn clear(&self);
    /// Whether speech is queued or playing (the microphone is gated meanwhile).
    fn is_playing(&self) -> bool;
    /// Where playback is: the output-rate index of the next sample the device gets
    /// (what was queued before it has been played, or dropped by a clear).
    fn position(&self) -> u64;
    /// The index just past the last queued sample.
    fn queued_end(&self) -> u64;
    /// The output rate those indices count in.
    fn rate(&self) -> u32;
}

#[cfg(feature = "audio-devices")]
impl SpeechSink for speaker::Speaker {
    fn play(&self, samples: &[f32]) {
        speaker::Speaker::play(self, samples)
    }
    fn clear(&self) {
        speaker::Speaker::clear(self)
    }
    fn is_playing(&self) -> bool {
        speaker::Speaker::is_playing(self)
    }
    fn position(&self) -> u64 {
        speaker::Speaker::position(self)
    }
    fn queued_end(&self) -> u64 {
        speaker::Speaker::queued_end(self)
    }
    fn rate(&self) -> u32 {
        speaker::Speaker::rate(self)
    }
}

use std::time::Duration;

/// Where to capture from.
#[derive(Debug, Clone)]
pub struct MicSettings {
    /// A device name as `hark devices` lists it; `None`: the default input.
    pub device: Option<String>,
    /// Frames per callback, a power of two.
    pub buffer_frames: u32,
}

/// What the capture reports besides audio.
#[derive(Debug, Clone, PartialEq)]
pub enum MicEvent {
    /// Capturing from `device` at its native `rate`.
    Opened { device: String, rate: u32, channels: u16 },
    /// The device stopped delivering (`reason`); hark keeps trying to reopen it.
    Lost { device: String, reason: String },
    /// Opening failed; the next try is after `retry_in`.
    OpenFailed { reason: String, retry_in: Duration },
}

/// What the capture sends.
#[derive(Debug)]
pub enum MicOutput {
    /// 16 kHz mono samples, in order, contiguous within one opening.
    Audio(Vec<f32>),
    Event(MicEvent),
}

