//! Wire audio formats of the Realtime protocol, decoded to f32 samples.

use thiserror::Error;

/// An input format a session can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// 16-bit signed little-endian mono PCM (`audio/pcm`; the protocol fixes 24 kHz).
    Pcm16 { rate: u32 },
    /// G.711 µ-law, 8 kHz (`audio/pcmu`).
    Pcmu,
    /// G.711 A-law, 8 kHz (`audio/pcma`).
    Pcma,
}

#[derive(Debug, Error, PartialEq)]
pub enum CodecError {
    #[error("audio/pcm needs an even number of bytes (16-bit samples), got {0}")]
    OddLength(usize),
    /// The bytes are a file container, not raw samples: a client sending a WAV or
    /// Opus file where the session declared raw PCM would otherwise be heard as noise.
    #[error("the audio is a {0} file, but the session expects raw samples; send headerless audio in the declared format")]
    Container(&'static str),
}

/// Recognises common audio file headers. Each check needs more than a few magic
/// bytes (raw audio can begin with `ID3` or `RIFF` by chance), so a match is a header
/// in earnest: RIFF needs its `WAVE` form, ID3 its version, flags and sync-safe size,
/// Ogg its zero stream version.
fn sniff_container(bytes: &[u8]) -> Option<&'static str> {
    let at = |i: usize| bytes.get(i).copied();
    if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WAVE") {
        return Some("WAV");
    }
    if bytes.starts_with(b"ID3")
        && matches!(at(3), Some(2..=4))
        && at(4).is_some_and(|r| r != 0xFF)
        && at(5).is_some_and(|f| f & 0x0F == 0)
        && bytes.get(6..10).is_some_and(|size| size.iter().all(|b| b & 0x80 == 0))
    {
        return Some("MP3");
    }
    if bytes.starts_with(b"OggS") && at(4) == Some(0) {
        return Some("Ogg");
    }
    const MAGIC: [(&[u8], &str); 3] = [(b"fLaC", "FLAC"), (&[0x1A, 0x45, 0xDF, 0xA3], "WebM/Matroska"), (b"#!AMR", "AMR")];
    MAGIC.iter().find(|(m, _)| bytes.starts_with(m)).map(|(_, name)| *name)
}

impl AudioFormat {
    pub fn sample_rate(&self) -> u32 {
        match self {
            AudioFormat::Pcm16 { rate } => *rate,
            AudioFormat::Pcmu | AudioFormat::Pcma => 8_000,
        }
    }

    /// The GA protocol name.
    pub fn name(&self) -> &'static str {
        match self {
            AudioFormat::Pcm16 { .. } => "audio/pcm",
            AudioFormat::Pcmu => "audio/pcmu",
            AudioFormat::Pcma => "audio/pcma",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "audio/pcm" | "pcm16" => Some(AudioFormat::Pcm16 { rate: 24_000 }),
            "audio/pcmu" | "g711_ulaw" => Some(AudioFormat::Pcmu),
            "audio/pcma" | "g711_alaw" => Some(AudioFormat::Pcma),
            _ => None,
        }
    }

    /// Decodes wire bytes to samples in [-1, 1], appending to `out`.
    pub fn decode_into(&self, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), CodecError> {
        if let Some(container) = sniff_container(bytes) {
            return Err(CodecError::Container(container));
        }
        match self {
            AudioFormat::Pcm16 { .. } => {
                if bytes.len() % 2 != 0 {
                    return Err(CodecError::OddLength(bytes.len()));
                }
                out.extend(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0));
            }
            AudioFormat::Pcmu => out.extend(bytes.iter().map(|&b| ulaw_to_linear(b) as f32 / 32768.0)),
            AudioFormat::Pcma => out.extend(bytes.iter().map(|&b| alaw_to_linear(b) as f32 / 32768.0)),
        }
        Ok(())
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Vec<f32>, CodecError> {
        let mut out = Vec::with_capacity(bytes.len());
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }
}

// G.711 is a fixed table defined by ITU-T; a dozen lines don't justify a dependency.
fn ulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = u & 0x0F;
    let magnitude = ((((mantissa as i32) << 3) + 0x84) << exponent) - 0x84;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

fn alaw_to_linear(a: u8) -> i16 {
    let a = a ^ 0x55;
    let sign = a & 0x80;
    let exponent = (a >> 4) & 0x07;
    let mantissa = (a & 0x0F) as i32;
    let magnitude = if exponent == 0 { (mantissa << 4) + 8 } else { ((mantissa << 4) + 0x108) << (exponent - 1) };
    (if sign != 0 { magnitude } else { -magnitude }) as i16
}

/// f32 samples → 16-bit PCM little-endian bytes (for tests and WAV output).
pub fn encode_pcm16(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| ((s.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm16_roundtrip_and_odd_length() {
        let bytes = encode_pcm16(&[0.0, 0.5, -0.5]);
        let back = AudioFormat::Pcm16 { rate: 24_000 }.decode(&bytes).unwrap();
        assert!((back[1] - 0.5).abs() < 1e-3 && (back[2] + 0.5).abs() < 1e-3);
        assert_eq!(AudioFormat::Pcm16 { rate: 24_000 }.decode(&[1, 2, 3]), Err(CodecError::OddLength(3)));
    }

    #[test]
    fn files_are_refused_as_raw_audio() {
        let wav = b"RIFF\x24\0\0\0WAVEfmt ";
        assert_eq!(AudioFormat::Pcm16 { rate: 24_000 }.decode(wav), Err(CodecError::Container("WAV")));
        assert_eq!(AudioFormat::Pcmu.decode(b"OggS\0\0"), Err(CodecError::Container("Ogg")));
        let mp3 = b"ID3\x04\0\0\0\0\x01\x7f";
        assert_eq!(AudioFormat::Pcm16 { rate: 24_000 }.decode(mp3), Err(CodecError::Container("MP3")));
    }

    #[test]
    fn raw_audio_that_starts_like_a_header_is_audio() {
        // "ID3" then samples: as 16-bit PCM, 0x4449 0x??33 …, plausible speech.
        let raw = b"ID3\x90\xff\x10\x80\x80\x01\x02";
        assert_eq!(AudioFormat::Pcm16 { rate: 24_000 }.decode(raw).map(|s| s.len()), Ok(5));
        assert_eq!(AudioFormat::Pcmu.decode(b"RIFFabcdxyzw").map(|s| s.len()), Ok(12));
        assert_eq!(AudioFormat::Pcma.decode(b"OggS\x05").map(|s| s.len()), Ok(5));
    }

    #[test]
    fn g711_known_values() {
        // µ-law 0xFF and A-law 0xD5 are the codes for (near) zero.
        assert_eq!(ulaw_to_linear(0xFF), 0);
        assert_eq!(ulaw_to_linear(0x00), -32124);
        assert_eq!(ulaw_to_linear(0x80), 32124);
        assert_eq!(alaw_to_linear(0xD5), 8);
        assert_eq!(alaw_to_linear(0x2A), -32256);
        assert_eq!(alaw_to_linear(0xAA), 32256);
    }
}
