//! The OpenAI Realtime wire protocol: every client and server event as serde types.
//!
//! This is the one place that knows the protocol's JSON shapes. Sessions speak in
//! [`ClientEvent`] and [`ServerEvent`]; transports (WebSocket, WebRTC data channel,
//! the local microphone session) call [`parse_client_event`] and [`to_wire`] and
//! nothing else. It depends on no other part of hark.
//!
//! - `client.rs`: client events, parsed with errors that name the field;
//! - `items.rs`: conversation items and their constructors;
//! - `events.rs`: server events, responses, usage, errors;
//! - `session.rs`: the session object and audio format names;
//! - `wire.rs`: serialisation in the GA or beta dialect.
//!
//! GA names are the canonical ones. Beta clients (`OpenAI-Beta: realtime=v1`) get
//! the old names and shapes through [`Dialect::Beta`], applied only at the edge.

mod client;
mod events;
mod items;
mod session;
mod wire;

pub use client::*;
pub use events::*;
pub use items::*;
pub use session::*;
pub use wire::*;

/// Largest `input_audio_buffer.append` payload, as decoded bytes (the protocol's limit).
pub const MAX_APPEND_BYTES: usize = 15 * 1024 * 1024;
/// Largest client frame we accept at all (base64 of the above plus JSON overhead).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = MAX_APPEND_BYTES / 3 * 4 + 64 * 1024;

/// Which event names and shapes a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Ga,
    Beta,
}

/// A fresh protocol id such as `event_Xk3…`: prefix plus 20 random alphanumerics.
pub fn new_id(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 21);
    s.push_str(prefix);
    s.push('_');
    for _ in 0..20 {
        s.push(fastrand::alphanumeric());
    }
    s
}
