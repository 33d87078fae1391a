//! Sources: where audio comes from besides a client's WebSocket.
//!
//! - `mic.rs` (feature `audio-devices`, on by default; needs ALSA's libasound): the local
//!   microphone through cpal, into a lock-free ring, resampled to 16 kHz for the
//!   session; device loss is detected and the capture reopens.
//!
//! What a source hands on ([`MicOutput`]) is defined here, without cpal, so the local
//! session can run on any source.

#[cfg(feature = "audio-devices")]
pub mod mic;

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

