//! Media stages: frames in, frames out. Nothing here knows about sessions or models.
//!
//! Audio flows `codec` (wire bytes → f32) → `resample` (any rate → 16 kHz) →
//! `vad` (speech probability per 32 ms window) and `chunk` (640-sample model frames).
//! [`AudioPipeline`] strings them together for one stream.

pub mod chunk;
pub mod clip;
pub mod codec;
pub mod frame;
pub mod pcm;
pub mod pipeline;
pub mod reencode;
pub mod resample;
pub mod vad;
pub mod wake;

pub use chunk::FrameChunker;
pub use codec::AudioFormat;
pub use frame::{AudioFrame, MODEL_FRAME_SAMPLES, MODEL_SAMPLE_RATE};
pub use pipeline::{AudioPipeline, PipelineOutput};
pub use resample::StreamResampler;
pub use vad::{VadReading, VoiceDetector};
