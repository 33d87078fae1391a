//! Any input rate → 16 kHz (or another output rate), streaming, with rubato's
//! synchronous FFT resampler.
//!
//! The resampler's own delay is trimmed from the start of the output, so sample `n`
//! of the output lines up with time `n / 16000` of the input: VAD timestamps depend on it.
//! Speech output uses the same stage to bring a voice's native rate to the protocol's 24 kHz.

use audioadapter_buffers::direct::SequentialSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};
use thiserror::Error;

use super::frame::MODEL_SAMPLE_RATE;

#[derive(Debug, Error)]
pub enum ResampleError {
    #[error("cannot resample from {rate} Hz: {reason}")]
    Construction { rate: u32, reason: String },
    #[error("resampling failed: {0}")]
    Process(String),
}

/// A mono stream converter to [`MODEL_SAMPLE_RATE`] (or the rate given to [`Self::with_rates`]).
pub struct StreamResampler {
    input_rate: u32,
    output_rate: u32,
    inner: Option<Fft<f32>>,
    chunk_in: usize,
    pending: Vec<f32>,
    out_buf: Vec<f32>,
    /// Output samples still to drop (the resampler's delay).
    skip: usize,
}

impl StreamResampler {
    pub fn new(input_rate: u32) -> Result<Self, ResampleError> {
        Self::with_rates(input_rate, MODEL_SAMPLE_RATE)
    }

    /// A converter from `input_rate` to `output_rate`.
    pub fn with_rates(input_rate: u32, output_rate: u32) -> Result<Self, ResampleError> {
        if output_rate == 0 || output_rate > 384_000 {
            return Err(ResampleError::Construction { rate: output_rate, reason: "unsupported output rate".into() });
        }
        if input_rate == output_rate {
            return Ok(Self { input_rate, output_rate, inner: None, chunk_in: 0, pending: Vec::new(), out_buf: Vec::new(), skip: 0 });
        }
        if input_rate == 0 || input_rate > 384_000 {
            return Err(ResampleError::Construction { rate: input_rate, reason: "unsupported rate".into() });
        }
        // 20 ms chunks keep the added latency small.
        let chunk_in = (input_rate / 50) as usize;
        let inner = Fft::<f32>::new(input_rate as usize, output_rate as usize, chunk_in, 1, FixedSync::Input)
            .map_err(|e| ResampleError::Construction { rate: input_rate, reason: e.to_string() })?;
        let skip = inner.output_delay();
        let out_max = inner.output_frames_max();
        Ok(Self { input_rate, output_rate, inner: Some(inner), chunk_in, pending: Vec::new(), out_buf: vec![0.0; out_max], skip })
    }

    pub fn input_rate(&self) -> u32 {
        self.input_rate
    }

    pub fn output_rate(&self) -> u32 {
        self.output_rate
    }

    /// Feeds samples at the input rate; appends every 16 kHz sample that is ready to `out`.
    pub fn push(&mut self, samples: &[f32], out: &mut Vec<f32>) -> Result<(), ResampleError> {
        let Some(inner) = self.inner.as_mut() else {
            out.extend_from_slice(samples);
            return Ok(());
        };
        self.pending.extend_from_slice(samples);
        let mut consumed = 0;
        while self.pending.len() - consumed >= self.chunk_in {
            let input = &self.pending[consumed..consumed + self.chunk_in];
            let produced = Self::run(inner, input, None, &mut self.out_buf)?;
            consumed += self.chunk_in;
            Self::emit(&self.out_buf[..produced], &mut self.skip, out);
        }
        self.pending.drain(..consumed);
        Ok(())
    }

    /// Pushes out what is buffered, padding the last chunk with silence.
    pub fn flush(&mut self, out: &mut Vec<f32>) -> Result<(), ResampleError> {
        let Some(inner) = self.inner.as_mut() else { return Ok(()) };
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len();
        let mut input = std::mem::take(&mut self.pending);
        input.resize(self.chunk_in, 0.0);
        let produced = Self::run(inner, &input, Some(n), &mut self.out_buf)?;
        // Keep only the output that corresponds to real input.
        let real = (n as u64 * self.output_rate as u64 / self.input_rate as u64) as usize;
        Self::emit(&self.out_buf[..produced.min(real)], &mut self.skip, out);
        Ok(())
    }

    fn run(inner: &mut Fft<f32>, input: &[f32], partial: Option<usize>, out_buf: &mut [f32]) -> Result<usize, ResampleError> {
        let frames_in = input.len();
        let frames_out = out_buf.len();
        let adapter_in = SequentialSlice::new(input, 1, frames_in).map_err(|e| ResampleError::Process(e.to_string()))?;
        let mut adapter_out =
            SequentialSlice::new_mut(out_buf, 1, frames_out).map_err(|e| ResampleError::Process(e.to_string()))?;
        let indexing = partial.map(|n| Indexing::new().partial_len(n));
        let (_, produced) = inner
            .process_into_buffer(&adapter_in, &mut adapter_out, indexing.as_ref())
            .map_err(|e| ResampleError::Process(e.to_string()))?;
        Ok(produced)
    }

    fn emit(produced: &[f32], skip: &mut usize, out: &mut Vec<f32>) {
        let drop = (*skip).min(produced.len());
        *skip -= drop;
        out.extend_from_slice(&produced[drop..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f32, n: usize) -> Vec<f32> {
        (0..n).map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5).collect()
    }

    #[test]
    fn resamples_24k_to_16k_aligned_in_time() {
        let input = sine(24_000, 440.0, 24_000);
        let mut r = StreamResampler::new(24_000).unwrap();
        let mut out = Vec::new();
        // Odd chunk sizes, as a network would deliver them.
        for chunk in input.chunks(333) {
            r.push(chunk, &mut out).unwrap();
        }
        r.flush(&mut out).unwrap();
        assert!((15_000..=16_000).contains(&out.len()), "len {}", out.len());
        // With the delay trimmed, output sample n is the 440 Hz sine at time n/16000.
        let expected = sine(16_000, 440.0, out.len());
        let err: f32 = out[2000..14000].iter().zip(&expected[2000..14000]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 0.02, "max error {err}");
    }

    #[test]
    fn passthrough_at_16k() {
        let mut r = StreamResampler::new(16_000).unwrap();
        let mut out = Vec::new();
        r.push(&[0.25; 100], &mut out).unwrap();
        assert_eq!(out, vec![0.25; 100]);
    }
}
