//! WAV bytes → [`Pcm`], tolerant of streamed files.
//!
//! Programs that write WAV to a pipe (espeak-ng `--stdout`, `piper --output-raw` wrappers,
//! sox) cannot seek back to fill in the sizes, so the RIFF and data lengths are often
//! 0 or 0xFFFFFFFF: the data chunk is then taken to run to the end of the bytes.

use super::{Pcm, SpeechError};

/// Decodes 16-bit integer or 32-bit float PCM WAV, any rate, down-mixed to mono.
pub fn decode(bytes: &[u8]) -> Result<Pcm, SpeechError> {
    let bad = |m: &str| SpeechError::Engine(format!("not a usable WAV file: {m}"));
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("no RIFF/WAVE header"));
    }
    let mut pos = 12;
    let mut fmt: Option<(u16, u16, u32, u16)> = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes")) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            if size < 16 || body + 16 > bytes.len() {
                return Err(bad("short fmt chunk"));
            }
            let f = &bytes[body..body + 16];
            let u16_at = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
            let format = u16_at(0);
            let channels = u16_at(2);
            let rate = u32::from_le_bytes(f[4..8].try_into().expect("4 bytes"));
            let bits = u16_at(14);
            fmt = Some((format, channels, rate, bits));
        } else if id == b"data" {
            let (format, channels, rate, bits) = fmt.ok_or_else(|| bad("data before fmt"))?;
            let end = if size == 0 || size == u32::MAX as usize || body + size > bytes.len() { bytes.len() } else { body + size };
            return samples(&bytes[body..end], format, channels, rate, bits);
        }
        // Chunks are padded to an even size.
        pos = body.saturating_add(size + (size & 1));
    }
    Err(bad("no data chunk"))
}

fn samples(data: &[u8], format: u16, channels: u16, rate: u32, bits: u16) -> Result<Pcm, SpeechError> {
    if channels == 0 || rate == 0 {
        return Err(SpeechError::Engine("WAV with 0 channels or 0 Hz".into()));
    }
    // 0xFFFE (extensible) carries the real format in a sub-chunk; 16-bit is PCM in practice.
    let mono: Vec<f32> = match (format, bits) {
        (1 | 0xFFFE, 16) => data.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect(),
        (3 | 0xFFFE, 32) => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        _ => return Err(SpeechError::Engine(format!("WAV format {format} with {bits}-bit samples is not supported; use 16-bit PCM"))),
    };
    let ch = channels as usize;
    let samples = if ch == 1 { mono } else { mono.chunks_exact(ch).map(|f| f.iter().sum::<f32>() / ch as f32).collect() };
    Ok(Pcm { sample_rate: rate, samples })
}

/// Raw 16-bit little-endian mono PCM bytes → [`Pcm`].
pub fn from_pcm16(bytes: &[u8], sample_rate: u32) -> Pcm {
    Pcm { sample_rate, samples: bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(rate: u32, channels: u16, data: &[i16], data_size: Option<u32>) -> Vec<u8> {
        let bytes: Vec<u8> = data.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut w = b"RIFF\xff\xff\xff\xffWAVEfmt ".to_vec();
        w.extend(16u32.to_le_bytes());
        w.extend(1u16.to_le_bytes());
        w.extend(channels.to_le_bytes());
        w.extend(rate.to_le_bytes());
        w.extend((rate * 2 * channels as u32).to_le_bytes());
        w.extend((2 * channels).to_le_bytes());
        w.extend(16u16.to_le_bytes());
        w.extend(b"LIST");
        w.extend(3u32.to_le_bytes());
        w.extend(b"abc\0");
        w.extend(b"data");
        w.extend(data_size.unwrap_or(bytes.len() as u32).to_le_bytes());
        w.extend(bytes);
        w
    }

    #[test]
    fn reads_streamed_and_stereo_wavs() {
        let p = decode(&wav(22050, 1, &[0, 16384, -16384], Some(u32::MAX))).unwrap();
        assert_eq!((p.sample_rate, p.samples), (22050, vec![0.0, 0.5, -0.5]));
        let p = decode(&wav(16000, 2, &[16384, 0, -16384, -16384], None)).unwrap();
        assert_eq!(p.samples, vec![0.25, -0.5]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"").is_err());
        assert!(decode(b"RIFF\0\0\0\0WAVEfmt \x02\0\0\0").is_err());
        assert!(decode(b"RIFF\0\0\0\0WAVEdata\x04\0\0\0abcd").is_err());
        let mut w = wav(8000, 1, &[1, 2], None);
        w[20] = 7; // a format hark does not read
        assert!(decode(&w).is_err());
    }
}
