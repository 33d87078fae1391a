//! hark: a real-time voice-and-vision agent daemon.
//!
//! Media flows one way, through small stages, into a session that talks to a model:
//!
//! - [`protocol`]: the OpenAI Realtime events as serde types, GA and beta dialects,
//!   item constructors. Every transport and the session speak it; it imports nothing
//!   else of hark.
//! - [`media`]: audio stages — wire codecs, resampling to 16 kHz (rubato), Silero VAD
//!   (ONNX Runtime), 640-sample model frames. Frames in, frames out.
//! - [`session`]: one client's realtime session — input buffer, turn detection,
//!   conversation, the response in flight, barge-in. Transport-agnostic.
//! - [`speech`]: speech out — streamed text cut into clauses and sentences, voiced by
//!   Piper through ONNX Runtime (phonemes from the `espeak-ng` program), a command or
//!   an OpenAI-compatible `/v1/audio/speech` server, as 24 kHz PCM chunks.
//! - [`context`]: the rolling context window — turns, token counts, eviction policy.
//! - [`model`]: the [`model::Backend`] trait and its implementations: Gemma 4
//!   in-process (`model::gemma4`, `model::embedded`) and any OpenAI-compatible server
//!   (`model::openai`); `model::hub` downloads checkpoints. Backends are driven; they
//!   know no transport.
//!   The decode step's CPU matrix kernel lives in the `hark-kernels` crate
//!   (`crates/`), optimised even in test builds.
//! - [`server`]: axum HTTP server — the Realtime WebSocket, WebRTC signalling
//!   (`/v1/realtime/calls`, `/v1/realtime/client_secrets`), `/healthz`, `/v1/models`, and
//!   the always-on local session clients can attach to (`server::local`).
//! - [`webrtc`](mod@webrtc): browser calls — the peer connection, the `oai-events` data
//!   channel into the same session code, Opus audio in and out, camera frames.
//! - [`config`]: `config.yaml` and its `HARK_…` environment overrides.
//! - [`check`]: `hark check` — the config's files, the checkpoint, tools and agents.
//! - [`metrics`]: what `/metrics` exports, measured from the events sessions send.
//! - [`bench`]: `hark bench …` measurements that print tables.
//! - [`tls`]: the process-wide rustls setup for HTTPS clients.
//!
//! - [`tools`]: YAML tools and agents — loading with `file:line` errors, the
//!   [`tools::ToolRegistry`] that validates arguments and runs builtin, command, HTTP
//!   and MCP tools with limits.
//!
//! - [`sources`]: local audio devices (feature `audio-devices`) — the microphone (cpal
//!   capture into a lock-free ring, resampled to 16 kHz, reopened when the device
//!   returns) and the speaker (cpal output from a lock-free ring, cleared on barge-in).

pub mod bench;
pub mod check;
pub mod config;
pub mod context;
pub mod media;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod server;
pub mod service;
pub mod session;
pub mod sources;
pub mod speech;
pub mod tls;
pub mod tools;
pub mod webrtc;
