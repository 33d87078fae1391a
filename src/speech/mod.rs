//! Speech out: the model's streamed text → audio, sentence by sentence.
//!
//! - `segment.rs`: cuts streamed text into speakable pieces (first clause early, then
//!   sentences);
//! - `phonemize.rs`: IPA phonemes from the `espeak-ng` program (a process, never linked);
//! - `piper.rs`: Piper voices through ONNX Runtime (the default engine);
//! - `command.rs`: any program that reads text on stdin and writes audio on stdout;
//! - `http.rs`: any OpenAI-compatible `/v1/audio/speech` server;
//! - `wav.rs`: the WAV reading those two need;
//! - `stream.rs`: [`SpeechStream`], the stage a response feeds text into and reads
//!   24 kHz PCM chunks out of (the session turns them into `response.output_audio.delta`;
//!   a WebRTC or speaker sink can take the same chunks).
//!
//! It depends on `media/` (resampling, the ONNX Runtime environment) and `config`, and
//! knows nothing of sessions or transports.

pub mod command;
pub mod http;
pub mod phonemize;
pub mod piper;
pub mod segment;
pub mod stream;
pub mod wav;

use std::sync::Arc;

use thiserror::Error;

pub use stream::{SpeechEvent, SpeechStream};

/// The rate of every chunk a [`SpeechStream`] gives out: the Realtime protocol's 24 kHz.
pub const OUTPUT_SAMPLE_RATE: u32 = 24_000;

#[derive(Debug, Error)]
pub enum SpeechError {
    #[error("{0}")]
    Missing(String),
    #[error("cannot load the voice: {0}")]
    Load(String),
    #[error("phonemizer: {0}")]
    Phonemizer(String),
    #[error("speech synthesis failed: {0}")]
    Synthesis(String),
    #[error("speech engine: {0}")]
    Engine(String),
}

/// Mono audio at its own rate, samples within ±1.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pcm {
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

impl Pcm {
    pub fn duration_ms(&self) -> u64 {
        if self.sample_rate == 0 {
            return 0;
        }
        self.samples.len() as u64 * 1000 / self.sample_rate as u64
    }
}

/// A configured speech engine.
#[derive(Clone)]
pub enum SpeechEngine {
    Piper(piper::PiperVoice),
    Command(command::CommandEngine),
    Http(http::HttpEngine),
}

impl SpeechEngine {
    /// Synthesizes one piece of text.
    pub async fn synthesize(&self, text: &str) -> Result<Pcm, SpeechError> {
        match self {
            SpeechEngine::Piper(v) => {
                let (v, text) = (v.clone(), text.to_string());
                // ONNX inference and the espeak-ng process block: keep them off the runtime.
                tokio::task::spawn_blocking(move || v.synthesize_blocking(&text))
                    .await
                    .map_err(|e| SpeechError::Synthesis(format!("synthesis task: {e}")))?
            }
            SpeechEngine::Command(c) => c.synthesize(text).await,
            SpeechEngine::Http(h) => h.synthesize(text).await,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SpeechEngine::Piper(_) => "piper",
            SpeechEngine::Command(_) => "command",
            SpeechEngine::Http(_) => "http",
        }
    }
}

/// The engine `config.yaml` asks for, loaded; `None` when speech is off.
pub fn from_config(config: &crate::config::Config) -> Result<Option<Arc<SpeechEngine>>, SpeechError> {
    use crate::config::SpeechEngineKind;
    let s = &config.speech;
    let engine = match s.engine {
        SpeechEngineKind::None => return Ok(None),
        SpeechEngineKind::Piper => SpeechEngine::Piper(piper::PiperVoice::load(&piper::PiperSettings {
            onnxruntime_library: config.onnxruntime_library(),
            model: config.resolve(&s.piper.model),
            config: s.piper.config.as_ref().map(|p| config.resolve(p)),
            espeak_program: s.piper.espeak.clone(),
            length_scale: s.piper.length_scale,
            threads: s.piper.threads,
        })?),
        SpeechEngineKind::Command => SpeechEngine::Command(command::CommandEngine::new(&s.command)?),
        SpeechEngineKind::Http => SpeechEngine::Http(http::HttpEngine::new(&s.http)?),
    };
    Ok(Some(Arc::new(engine)))
}
