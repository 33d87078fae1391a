//! libopus (the `opus` crate on Debian's libopus-dev, what hark uses) against the
//! pure-Rust `opus-rs` port, on the same packets: espeak-ng speech at 48 kHz, encoded
//! by libopus as a browser would send it (20 ms frames, 32 kbit/s, VoIP mode). Prints
//! the time per packet of each and how closely their outputs agree; asserts both
//! decode every packet and match the original speech.
//! Run: `cargo test --test opus_decoders -- --nocapture`.

use std::process::Command;
use std::time::Instant;

fn speech_48k(dir: &std::path::Path) -> Vec<f32> {
    let raw = dir.join("s.espeak.wav");
    let out = dir.join("s48.wav");
    let text = "The quick brown fox jumps over the lazy dog. Hark, what light through yonder window breaks?";
    assert!(Command::new("espeak-ng").args(["-v", "en-us", "-w"]).arg(&raw).arg(text).status().expect("espeak-ng (scripts/test installs it)").success());
    assert!(Command::new("sox").arg(&raw).args(["-r", "48000", "-c", "1", "-b", "16", "-e", "signed"]).arg(&out).status().expect("sox").success());
    hound::WavReader::open(&out).unwrap().samples::<i16>().map(|s| s.unwrap() as f32 / 32768.0).collect()
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..n {
        ab += a[i] as f64 * b[i] as f64;
        aa += a[i] as f64 * a[i] as f64;
        bb += b[i] as f64 * b[i] as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Best correlation with the original over small lags (the codec delays its output).
fn correlation_with_lag(original: &[f32], decoded: &[f32]) -> (f64, usize) {
    (0..480).map(|lag| (correlation(original, &decoded[lag.min(decoded.len())..]), lag)).fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a })
}

#[test]
fn libopus_and_opus_rs_on_the_same_packets() {
    let dir = tempfile::tempdir().unwrap();
    let speech = speech_48k(dir.path());
    let mut enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    enc.set_bitrate(opus::Bitrate::Bits(32_000)).unwrap();
    let packets: Vec<Vec<u8>> = speech.chunks_exact(960).map(|f| enc.encode_vec_float(f, 1500).unwrap()).collect();

    let mut buf = vec![0f32; 5760];
    let mut libopus = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let t = Instant::now();
    let mut out_c = Vec::with_capacity(speech.len());
    for p in &packets {
        let n = libopus.decode_float(p, &mut buf, false).unwrap();
        out_c.extend_from_slice(&buf[..n]);
    }
    let libopus_time = t.elapsed();

    let mut port = opus_rs::OpusDecoder::new(48_000, 1).unwrap();
    let t = Instant::now();
    let mut out_rs = Vec::with_capacity(speech.len());
    for p in &packets {
        let n = port.decode(p, 960, &mut buf).unwrap();
        out_rs.extend_from_slice(&buf[..n]);
    }
    let port_time = t.elapsed();

    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / packets.len() as f64;
    let (c_orig, lag) = correlation_with_lag(&speech, &out_c);
    let (rs_orig, _) = correlation_with_lag(&speech, &out_rs);
    let between = correlation(&out_c, &out_rs);
    eprintln!(
        "{} packets ({:.1} s of speech): libopus {:.1} µs/packet, opus-rs {:.1} µs/packet; correlation with the original: libopus {c_orig:.4} (lag {lag}), opus-rs {rs_orig:.4}; libopus vs opus-rs {between:.5}",
        packets.len(),
        speech.len() as f64 / 48_000.0,
        per(libopus_time),
        per(port_time),
    );
    assert_eq!(out_c.len(), packets.len() * 960);
    assert_eq!(out_rs.len(), packets.len() * 960);
    assert!(c_orig > 0.9, "libopus output does not follow the speech: {c_orig}");
    assert!(rs_orig > 0.9, "opus-rs output does not follow the speech: {rs_orig}");
}
