//! One input stream's audio path: wire bytes → f32 → 16 kHz → VAD readings + model frames.

use super::chunk::FrameChunker;
use super::codec::{AudioFormat, CodecError};
use super::frame::AudioFrame;
use super::resample::{ResampleError, StreamResampler};
use super::vad::{VadError, VadReading, VoiceDetector, VAD_WINDOW};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Resample(#[from] ResampleError),
    #[error(transparent)]
    Vad(#[from] VadError),
}

/// What one push produced.
#[derive(Debug, Default)]
pub struct PipelineOutput {
    /// The new 16 kHz samples, contiguous with the previous push's.
    pub samples: Vec<f32>,
    /// Index (16 kHz) of `samples[0]` in the stream.
    pub start: u64,
    pub vad: Vec<VadReading>,
    pub frames: Vec<AudioFrame>,
}

pub struct AudioPipeline {
    format: AudioFormat,
    decoded: Vec<f32>,
    resampler: StreamResampler,
    vad: Option<Box<dyn VoiceDetector>>,
    window: Vec<f32>,
    chunker: FrameChunker,
    /// 16 kHz samples produced so far.
    position: u64,
    /// Stream index of `window[0]`.
    window_start: u64,
}

impl AudioPipeline {
    /// `vad: None` skips voice detection (turn detection off).
    pub fn new(format: AudioFormat, vad: Option<Box<dyn VoiceDetector>>) -> Result<Self, PipelineError> {
        Ok(Self {
            format,
            decoded: Vec::new(),
            resampler: StreamResampler::new(format.sample_rate())?,
            vad,
            window: Vec::with_capacity(VAD_WINDOW),
            chunker: FrameChunker::new(),
            position: 0,
            window_start: 0,
        })
    }

    pub fn format(&self) -> AudioFormat {
        self.format
    }

    /// 16 kHz samples produced so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn has_vad(&self) -> bool {
        self.vad.is_some()
    }

    /// Decodes and processes one chunk of wire audio.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Result<PipelineOutput, PipelineError> {
        self.decoded.clear();
        self.format.decode_into(bytes, &mut self.decoded)?;
        let decoded = std::mem::take(&mut self.decoded);
        let out = self.push_samples(&decoded);
        self.decoded = decoded;
        out
    }

    /// Processes samples at the format's rate.
    pub fn push_samples(&mut self, samples: &[f32]) -> Result<PipelineOutput, PipelineError> {
        let mut out = PipelineOutput { start: self.position, ..Default::default() };
        self.resampler.push(samples, &mut out.samples)?;
        self.process_16k(&mut out)?;
        Ok(out)
    }

    /// Pushes out audio held inside the resampler (end of a clip or a manual commit).
    pub fn flush(&mut self) -> Result<PipelineOutput, PipelineError> {
        let mut out = PipelineOutput { start: self.position, ..Default::default() };
        self.resampler.flush(&mut out.samples)?;
        self.process_16k(&mut out)?;
        Ok(out)
    }

    /// Starts the resampler afresh after a [`Self::flush`]: the flush zero-padded its
    /// last block, and audio after it must not be filtered together with that padding.
    /// The stream position carries on.
    pub fn restart_resampler(&mut self) -> Result<(), PipelineError> {
        self.resampler = StreamResampler::new(self.format.sample_rate())?;
        Ok(())
    }

    fn process_16k(&mut self, out: &mut PipelineOutput) -> Result<(), PipelineError> {
        self.position += out.samples.len() as u64;
        out.frames = self.chunker.push(&out.samples);
        if let Some(vad) = self.vad.as_mut() {
            let mut rest = &out.samples[..];
            while !rest.is_empty() {
                let take = (VAD_WINDOW - self.window.len()).min(rest.len());
                self.window.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.window.len() == VAD_WINDOW {
                    let probability = vad.probability(&self.window)?;
                    out.vad.push(VadReading { start: self.window_start, end: self.window_start + VAD_WINDOW as u64, probability });
                    self.window_start += VAD_WINDOW as u64;
                    self.window.clear();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::codec::encode_pcm16;
    use crate::media::vad::EnergyVad;

    #[test]
    fn tone_after_silence_is_detected_at_the_right_time() {
        // 0.5 s silence then 0.5 s of tone at 24 kHz, pushed in 20 ms chunks.
        let mut samples = vec![0.0f32; 12_000];
        samples.extend((0..12_000).map(|i| (i as f32 * 0.1).sin() * 0.3));
        let bytes = encode_pcm16(&samples);
        let mut p = AudioPipeline::new(AudioFormat::Pcm16 { rate: 24_000 }, Some(Box::new(EnergyVad::default()))).unwrap();
        let mut readings = Vec::new();
        let mut frames = 0;
        for chunk in bytes.chunks(960) {
            let out = p.push_bytes(chunk).unwrap();
            readings.extend(out.vad);
            frames += out.frames.len();
        }
        let first = readings.iter().find(|r| r.probability > 0.5).unwrap();
        let onset_ms = first.end * 1000 / 16_000;
        assert!((480..=540).contains(&onset_ms), "onset at {onset_ms} ms");
        assert!(frames >= 23, "{frames} model frames");
    }
}
