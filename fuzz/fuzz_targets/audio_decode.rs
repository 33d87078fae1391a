//! `input_audio_buffer.append`: base64 (as the session decodes it), then the declared
//! wire format (PCM16, G.711 µ-law, A-law) with its container sniffing.
#![no_main]

use base64::Engine;
use hark::media::codec::AudioFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let format = match which % 3 {
        0 => AudioFormat::Pcm16 { rate: 24_000 },
        1 => AudioFormat::Pcmu,
        _ => AudioFormat::Pcma,
    };
    // Both what a client's base64 decodes to, and the raw bytes themselves.
    let mut out = Vec::new();
    if which & 0x80 != 0 {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(rest) {
            if format.decode_into(&bytes, &mut out).is_ok() {
                assert!(out.iter().all(|s| (-1.0..=1.0).contains(s)));
            }
        }
    } else if format.decode_into(rest, &mut out).is_ok() {
        assert!(out.iter().all(|s| (-1.0..=1.0).contains(s)));
    }
});
