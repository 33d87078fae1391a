//! Raw 16 kHz audio → the model's audio frames: 640 samples per token, the last
//! frame zero-padded (as transformers' feature extractor does).

use candle_core::{Device, Result, Tensor};

/// Samples per audio token at 16 kHz (40 ms).
pub const FRAME: usize = 640;

/// Number of audio tokens for `samples` samples.
pub fn audio_tokens(samples: usize) -> usize {
    samples.div_ceil(FRAME)
}

/// `[tokens, 640]` frames from mono 16 kHz samples in [-1, 1].
pub fn audio_frames(samples: &[f32], device: &Device) -> Result<Tensor> {
    let n = audio_tokens(samples.len());
    let mut data = samples.to_vec();
    data.resize(n * FRAME, 0.0);
    Tensor::from_vec(data, (n, FRAME), device)
}
