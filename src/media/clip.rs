//! Whole audio clips (not streams) → 16 kHz mono: what a chat-completions request
//! carries in an `input_audio` part (a WAV file, or raw 24 kHz pcm16).

use thiserror::Error;

use super::resample::StreamResampler;

#[derive(Debug, Error, PartialEq)]
pub enum ClipError {
    #[error("not a readable WAV file: {0}")]
    Wav(String),
    #[error("WAV files of {0}-bit {1:?} samples are not supported; send 16-bit PCM or 32-bit float")]
    WavFormat(u16, hound::SampleFormat),
    #[error("pcm16 audio needs an even number of bytes, got {0}")]
    OddLength(usize),
    #[error("{0} audio is not supported; send wav or pcm16")]
    Format(String),
    #[error("{0}")]
    Resample(String),
    #[error("the clip is longer than {0} s")]
    TooLong(u32),
}

/// Longest clip accepted, in seconds (a bound on memory and on model context).
pub const MAX_CLIP_SECONDS: u32 = 600;

/// Decodes `bytes` in `format` (`wav`, or `pcm16` = raw 24 kHz 16-bit mono LE, as the
/// Realtime protocol's default) to mono 16 kHz samples in [-1, 1].
pub fn decode_clip(bytes: &[u8], format: &str) -> Result<Vec<f32>, ClipError> {
    let (samples, rate) = match format {
        "wav" => read_wav(bytes)?,
        "pcm16" | "pcm" => {
            if bytes.len() % 2 != 0 {
                return Err(ClipError::OddLength(bytes.len()));
            }
            (bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect(), 24_000)
        }
        other => return Err(ClipError::Format(other.to_string())),
    };
    if samples.len() as u64 > MAX_CLIP_SECONDS as u64 * rate as u64 {
        return Err(ClipError::TooLong(MAX_CLIP_SECONDS));
    }
    let want = (samples.len() as u64 * 16_000 / rate as u64) as usize;
    let mut r = StreamResampler::new(rate).map_err(|e| ClipError::Resample(e.to_string()))?;
    let mut out = Vec::with_capacity(want + 1);
    r.push(&samples, &mut out).map_err(|e| ClipError::Resample(e.to_string()))?;
    // The resampler holds back its delay's worth of output: push 40 ms of silence
    // through so the clip's end comes out, then keep exactly the clip's length.
    r.push(&vec![0.0; rate as usize / 25], &mut out).map_err(|e| ClipError::Resample(e.to_string()))?;
    r.flush(&mut out).map_err(|e| ClipError::Resample(e.to_string()))?;
    out.truncate(want);
    Ok(out)
}

/// A WAV file's samples, channels averaged to mono, and its rate.
fn read_wav(bytes: &[u8]) -> Result<(Vec<f32>, u32), ClipError> {
    let reader = hound::WavReader::new(std::io::Cursor::new(bytes)).map_err(|e| ClipError::Wav(e.to_string()))?;
    let spec = reader.spec();
    let channels = spec.channels.max(1) as usize;
    if spec.sample_rate == 0 {
        return Err(ClipError::Wav("sample rate 0".into()));
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 16) => {
            reader.into_samples::<i16>().map(|s| s.map(|v| v as f32 / 32768.0)).collect::<Result<_, _>>()
        }
        (hound::SampleFormat::Float, 32) => reader.into_samples::<f32>().collect::<Result<_, _>>(),
        (f, b) => return Err(ClipError::WavFormat(b, f)),
    }
    .map_err(|e| ClipError::Wav(e.to_string()))?;
    let mono = interleaved.chunks(channels).map(|frame| frame.iter().sum::<f32>() / channels as f32).collect();
    Ok((mono, spec.sample_rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_at_any_rate_becomes_16k() {
        let tone: Vec<f32> = (0..22_050).map(|i| (i as f32 * 0.05).sin() * 0.5).collect();
        let mut wav = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec { channels: 1, sample_rate: 22_050, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut w = hound::WavWriter::new(&mut wav, spec).unwrap();
        for s in &tone {
            w.write_sample((s * 32767.0) as i16).unwrap();
        }
        w.finalize().unwrap();
        let wav = wav.into_inner();
        let out = decode_clip(&wav, "wav").unwrap();
        assert_eq!(out.len(), 16_000);
        // The end of the clip is there, not the resampler's padding.
        assert!(out[15_800..].iter().any(|s| s.abs() > 0.2));
        let pcm: Vec<u8> = (0..24_000).flat_map(|_| 1000i16.to_le_bytes()).collect();
        assert_eq!(decode_clip(&pcm, "pcm16").unwrap().len(), 16_000);
    }

    #[test]
    fn bad_clips_are_errors() {
        assert!(matches!(decode_clip(b"RIFFnope", "wav"), Err(ClipError::Wav(_))));
        assert_eq!(decode_clip(&[1, 2, 3], "pcm16"), Err(ClipError::OddLength(3)));
        assert_eq!(decode_clip(&[0; 4], "mp3"), Err(ClipError::Format("mp3".into())));
    }
}
