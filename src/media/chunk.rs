//! Cuts a 16 kHz stream into the model's 640-sample (40 ms) audio frames.

use super::frame::{AudioFrame, MODEL_FRAME_SAMPLES, MODEL_SAMPLE_RATE};

#[derive(Debug, Default)]
pub struct FrameChunker {
    pending: Vec<f32>,
    /// Stream index (16 kHz) of `pending[0]`.
    next_start: u64,
}

impl FrameChunker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds samples; returns every complete frame.
    pub fn push(&mut self, samples: &[f32]) -> Vec<AudioFrame> {
        self.pending.extend_from_slice(samples);
        let whole = self.pending.len() / MODEL_FRAME_SAMPLES;
        let mut frames = Vec::with_capacity(whole);
        for chunk in self.pending.chunks_exact(MODEL_FRAME_SAMPLES) {
            frames.push(AudioFrame::new(MODEL_SAMPLE_RATE, self.next_start, chunk.to_vec()));
            self.next_start += MODEL_FRAME_SAMPLES as u64;
        }
        self.pending.drain(..whole * MODEL_FRAME_SAMPLES);
        frames
    }

    /// Emits the partial frame, zero-padded to 640 samples (the model's own padding rule).
    pub fn flush(&mut self) -> Option<AudioFrame> {
        if self.pending.is_empty() {
            return None;
        }
        let mut samples = std::mem::take(&mut self.pending);
        samples.resize(MODEL_FRAME_SAMPLES, 0.0);
        let frame = AudioFrame::new(MODEL_SAMPLE_RATE, self.next_start, samples);
        self.next_start += MODEL_FRAME_SAMPLES as u64;
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_640_and_contiguous() {
        let mut c = FrameChunker::new();
        assert!(c.push(&[0.1; 600]).is_empty());
        let f = c.push(&[0.2; 700]);
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].start, f[1].start), (0, 640));
        assert_eq!(f[0].samples[599], 0.1);
        assert_eq!(f[0].samples[600], 0.2);
        let last = c.flush().unwrap();
        assert_eq!((last.start, last.samples.len(), last.samples[19], last.samples[20]), (1280, 640, 0.2, 0.0));
        assert!(c.flush().is_none());
    }
}
