//! Audio at wire precision. Clients send 16-bit PCM; holding what they sent as f32
//! would double every buffer and conversation item for no gain in fidelity, so kept
//! audio is 16-bit and becomes f32 only where a model builds its tensors.

/// One 16-bit sample as f32 in [-1, 1): the inverse of [`quantize`] on every i16.
#[inline]
pub fn sample_to_f32(s: i16) -> f32 {
    s as f32 / 32768.0
}

/// One f32 sample to 16 bits. Scaled by 32768 (not 32767) so that a wire sample
/// decoded by [`sample_to_f32`] comes back bit-exact.
#[inline]
pub fn quantize(s: f32) -> i16 {
    (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

pub fn to_pcm16(samples: &[f32]) -> Vec<i16> {
    samples.iter().map(|&s| quantize(s)).collect()
}

pub fn to_f32(samples: &[i16]) -> Vec<f32> {
    samples.iter().map(|&s| sample_to_f32(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_samples_round_trip_exactly() {
        for s in [i16::MIN, -12345, -1, 0, 1, 777, i16::MAX] {
            assert_eq!(quantize(sample_to_f32(s)), s);
        }
        // Out-of-range floats clip instead of wrapping.
        assert_eq!(to_pcm16(&[2.0, -2.0, f32::NAN]), vec![i16::MAX, i16::MIN, 0]);
    }
}
