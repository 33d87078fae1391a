//! The unit that moves between audio stages.

/// The model's audio rate: Gemma 4 reads raw 16 kHz mono.
pub const MODEL_SAMPLE_RATE: u32 = 16_000;
/// One audio token: 640 samples = 40 ms at 16 kHz.
pub const MODEL_FRAME_SAMPLES: usize = 640;

/// A run of mono samples in [-1, 1] with its place in the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFrame {
    pub sample_rate: u32,
    /// Index of the first sample, counted at `sample_rate` from the stream's start.
    pub start: u64,
    pub samples: Vec<f32>,
}

impl AudioFrame {
    pub fn new(sample_rate: u32, start: u64, samples: Vec<f32>) -> Self {
        Self { sample_rate, start, samples }
    }

    /// Where the frame starts, in milliseconds from the stream's start.
    pub fn start_ms(&self) -> u64 {
        self.start * 1000 / self.sample_rate as u64
    }

    pub fn end(&self) -> u64 {
        self.start + self.samples.len() as u64
    }
}

/// Sample index at `rate` → milliseconds.
pub fn samples_to_ms(samples: u64, rate: u32) -> u64 {
    samples * 1000 / rate as u64
}

/// Milliseconds → sample index at `rate`.
pub fn ms_to_samples(ms: u64, rate: u32) -> u64 {
    ms * rate as u64 / 1000
}
