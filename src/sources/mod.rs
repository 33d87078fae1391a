//! Sources: where audio comes from besides a client's WebSocket.
//!
//! - `mic.rs`: the local microphone through cpal, into a lock-free ring, resampled to
//!   16 kHz for the session; device loss is detected and the capture reopens.

pub mod mic;
