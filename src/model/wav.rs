//! 16-bit PCM WAV encoding for sending audio to servers that take files.

use std::io::Cursor;

/// Encodes mono 16-bit samples as a PCM WAV file.
pub fn encode_wav(samples: &[i16], sample_rate: u32) -> Vec<u8> {
    let spec = hound::WavSpec { channels: 1, sample_rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut cursor = Cursor::new(Vec::with_capacity(44 + samples.len() * 2));
    {
        // Writing to memory cannot fail for I/O reasons; hound only errors on bad specs.
        let mut w = hound::WavWriter::new(&mut cursor, spec).expect("valid WAV spec");
        for &s in samples {
            w.write_sample(s).expect("in-memory write");
        }
        w.finalize().expect("in-memory finalize");
    }
    cursor.into_inner()
}

#[cfg(test)]
mod tests {
    #[test]
    fn wav_has_header_and_samples() {
        let wav = super::encode_wav(&[0, 16_384, -16_384], 16_000);
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(wav.len(), 44 + 6);
        let r = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
        assert_eq!((r.spec().sample_rate, r.spec().channels, r.len()), (16_000, 1, 3));
    }
}
