//! Gemma 4 (`gemma4_unified`) in-process: config, the network, its KV cache,
//! and token sampling. Knows nothing of sessions or transports.

pub mod audio;
pub mod cache;
pub mod config;
pub mod init;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod template;
pub mod tokenizer;
pub mod tool_call;

pub use audio::{audio_frames, audio_tokens};
pub use cache::KvCache;
pub use config::Gemma4Config;
pub use model::{ForwardInput, Gemma4Model, ImageInput};
