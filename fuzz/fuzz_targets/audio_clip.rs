//! Chat-completions `input_audio` clips: WAV files (any rate, channels, sample format)
//! and raw pcm16, decoded and resampled to 16 kHz — an error or samples in range,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let format = if which & 1 == 0 { "wav" } else { "pcm16" };
    if let Ok(samples) = hark::media::clip::decode_clip(rest, format) {
        assert!(samples.iter().all(|s| s.is_finite()));
    }
});
