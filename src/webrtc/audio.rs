//! Call audio: the browser's Opus in (decoded to 48 kHz mono for the session's
//! resample → VAD → chunk stages), and hark's Opus track out.
//!
//! Decoder choice: `opus` 0.3 (bindings to Debian's libopus 1.3 through
//! `audiopus_sys`/pkg-config) rather than the pure-Rust `opus-rs` 0.1.40 port.
//! Measured on the same packets (`tests/opus_decoders.rs`: espeak speech, 20 ms frames
//! at 32 kbit/s): libopus 35.5 µs per packet, opus-rs 46.0 µs, outputs identical
//! (correlation 1.00000). Both are far below the 20 ms budget; libopus is ≈1.3× faster,
//! it is the reference decoder browsers use, and the distribution maintains it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

/// Opus over RTP always runs a 48 kHz clock (RFC 7587), whatever the encoder's
/// internal bandwidth.
pub const OPUS_RATE: u32 = 48_000;
/// One 20 ms frame at 48 kHz, the packet size browsers send.
pub const FRAME_20MS: usize = 960;
/// The longest Opus packet: 120 ms.
const MAX_PACKET_SAMPLES: usize = 5760;
/// A gap longer than this is not concealed sample by sample: it is filled with
/// silence (a paused track, a suspended tab), keeping the stream's clock.
const MAX_CONCEALED_SAMPLES: u32 = OPUS_RATE / 5;
/// Longest gap filled at all; beyond it the stream simply resumes (a track muted for
/// minutes must not produce minutes of audio at once).
const MAX_GAP_SAMPLES: u32 = OPUS_RATE * 10;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
}

/// One incoming Opus stream → 48 kHz mono samples on the sender's clock: packets lost
/// or late are concealed (libopus PLC) so that sample `n` is always time `n / 48000`
/// of the user's speech — the VAD's timestamps depend on it.
pub struct OpusInput {
    decoder: opus::Decoder,
    /// RTP timestamp the next packet should carry.
    expected: Option<u32>,
    buf: Vec<f32>,
    pub packets: u64,
    pub concealed_samples: u64,
}

impl OpusInput {
    pub fn new() -> Result<Self, AudioError> {
        Ok(Self { decoder: opus::Decoder::new(OPUS_RATE, opus::Channels::Mono)?, expected: None, buf: vec![0.0; MAX_PACKET_SAMPLES], packets: 0, concealed_samples: 0 })
    }

    /// Decodes one RTP payload with its timestamp; appends the samples (and any
    /// concealment of a gap before it) to `out`. A packet that cannot be decoded is
    /// concealed instead: a bad packet from the network never ends the call.
    pub fn push(&mut self, timestamp: u32, payload: &[u8], out: &mut Vec<f32>) {
        if let Some(expected) = self.expected {
            let gap = timestamp.wrapping_sub(expected);
            if gap >= u32::MAX / 2 {
                // A late (reordered) packet or a duplicate: its time has been filled.
                return;
            }
            if gap > 0 && gap <= MAX_GAP_SAMPLES {
                self.fill_gap(gap, out);
            }
        }
        self.packets += 1;
        let n = match self.decoder.decode_float(payload, &mut self.buf, false) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("undecodable opus packet ({} bytes): {e}", payload.len());
                let n = self.decoder.get_last_packet_duration().map_or(FRAME_20MS, |d| d as usize).min(MAX_PACKET_SAMPLES);
                self.conceal(n, out);
                self.expected = Some(timestamp.wrapping_add(n as u32));
                return;
            }
        };
        out.extend_from_slice(&self.buf[..n]);
        self.expected = Some(timestamp.wrapping_add(n as u32));
    }

    fn fill_gap(&mut self, gap: u32, out: &mut Vec<f32>) {
        if gap <= MAX_CONCEALED_SAMPLES {
            self.conceal(gap as usize, out);
        } else {
            out.resize(out.len() + gap as usize, 0.0);
            self.concealed_samples += gap as u64;
        }
    }

    /// libopus's packet-loss concealment, in frames of at most 20 ms (PLC must be
    /// asked in multiples of 2.5 ms; the remainder is silence).
    fn conceal(&mut self, samples: usize, out: &mut Vec<f32>) {
        let mut left = samples;
        while left >= 120 {
            let want = left.min(FRAME_20MS) / 120 * 120;
            match self.decoder.decode_float(&[], &mut self.buf[..want], false) {
                Ok(n) if n > 0 => {
                    out.extend_from_slice(&self.buf[..n]);
                    left -= n.min(left);
                }
                _ => break,
            }
        }
        out.resize(out.len() + left, 0.0);
        self.concealed_samples += samples as u64;
    }
}

/// What hark says to the caller: 48 kHz mono samples, queued for the outgoing Opus
/// track, each chunk tagged with the response it belongs to. While nothing is queued
/// the track carries silence, so the browser's `ontrack` stream is live from the start
/// and latency does not change when speech begins.
///
/// Playback is reported as OpenAI reports it on WebRTC: `output_audio_buffer.started`
/// when a response's first audio goes out on the track, `.stopped` when the last of it
/// has (after its `response.done`), `.cleared` when it is cut off — see
/// [`OutgoingAudio::next_packet`].
#[derive(Clone)]
pub struct AudioOut {
    tx: mpsc::Sender<Queued>,
    /// Bumped by [`Self::clear`]: chunks queued before it are dropped unplayed.
    generation: Arc<AtomicU64>,
}

enum Queued {
    Audio { generation: u64, response_id: String, samples: Vec<f32> },
    /// The response is done: once its audio has gone out, playback has stopped.
    End { response_id: String },
}

/// What playback reports (as the `output_audio_buffer.*` server events).
#[derive(Debug, Clone, PartialEq)]
pub enum Playback {
    Started(String),
    Stopped(String),
    Cleared(String),
}

impl AudioOut {
    /// Queues 48 kHz mono samples of `response_id`; `false` once the call is gone.
    /// Use [`Self::send_24k`] for the Realtime protocol's 24 kHz PCM.
    pub async fn send_48k(&self, response_id: &str, samples: Vec<f32>) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        self.tx.send(Queued::Audio { generation, response_id: response_id.to_string(), samples }).await.is_ok()
    }

    /// Queues 24 kHz mono samples (the protocol's output rate), upsampled ×2 by linear
    /// interpolation — speech at 24 kHz has nothing above 12 kHz to alias.
    pub async fn send_24k(&self, response_id: &str, samples: &[f32]) -> bool {
        let mut up = Vec::with_capacity(samples.len() * 2);
        for (i, &s) in samples.iter().enumerate() {
            let next = samples.get(i + 1).copied().unwrap_or(s);
            up.push(s);
            up.push((s + next) * 0.5);
        }
        self.send_48k(response_id, up).await
    }

    /// The response is done: no more of its audio will be queued.
    pub async fn finish(&self, response_id: &str) -> bool {
        self.tx.send(Queued::End { response_id: response_id.to_string() }).await.is_ok()
    }

    /// Drops everything queued and not yet sent (barge-in, a cancelled response, the
    /// client's `output_audio_buffer.clear`); the track falls silent within one frame.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The receiving end of [`AudioOut`]: yields one 20 ms frame at a time, silence when
/// nothing is queued, and reports playback.
pub struct OutgoingAudio {
    rx: mpsc::Receiver<Queued>,
    generation: Arc<AtomicU64>,
    /// The generation this side has caught up with.
    seen_generation: u64,
    /// Samples of `playing` not yet sent.
    pending: std::collections::VecDeque<f32>,
    /// A chunk of the next response, waiting for the current one to finish.
    next: Option<Queued>,
    /// The response whose audio is being sent, whether `started` was reported, and
    /// whether its end was queued.
    playing: Option<(String, bool, bool)>,
    encoder: opus::Encoder,
}

/// A new outgoing audio path; the [`AudioOut`] handle goes to whoever produces speech.
pub fn outgoing() -> Result<(AudioOut, OutgoingAudio), AudioError> {
    // 50 chunks of any size: the producer waits when the call falls behind.
    let (tx, rx) = mpsc::channel(50);
    let mut encoder = opus::Encoder::new(OPUS_RATE, opus::Channels::Mono, opus::Application::Voip)?;
    encoder.set_bitrate(opus::Bitrate::Bits(32_000))?;
    let generation = Arc::new(AtomicU64::new(0));
    Ok((
        AudioOut { tx, generation: generation.clone() },
        OutgoingAudio { rx, generation, seen_generation: 0, pending: Default::default(), next: None, playing: None, encoder },
    ))
}

impl OutgoingAudio {
    pub const FRAME: Duration = Duration::from_millis(20);

    /// The next 20 ms of output as one Opus packet, and what playback did in it.
    pub fn next_packet(&mut self, report: &mut Vec<Playback>) -> Result<Vec<u8>, AudioError> {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != self.seen_generation {
            self.seen_generation = generation;
            self.pending.clear();
            self.next = None;
            // Only audio that was playing, or about to, is reported cleared.
            if let Some((id, _, _)) = self.playing.take() {
                report.push(Playback::Cleared(id));
            }
        }
        while self.pending.len() < FRAME_20MS {
            let item = match self.next.take() {
                Some(q) => q,
                None => match self.rx.try_recv() {
                    Ok(q) => q,
                    Err(_) => break,
                },
            };
            match item {
                // Queued before a clear.
                Queued::Audio { generation: g, .. } if g != generation => {}
                Queued::Audio { response_id, samples, .. } => match &self.playing {
                    Some((id, _, _)) if *id == response_id => self.pending.extend(samples),
                    // Another response's audio: the current one finishes first.
                    Some(_) if !self.pending.is_empty() => {
                        self.next = Some(Queued::Audio { generation, response_id, samples });
                        break;
                    }
                    Some((id, started, _)) => {
                        if *started {
                            report.push(Playback::Stopped(id.clone()));
                        }
                        self.playing = Some((response_id, false, false));
                        self.pending.extend(samples);
                    }
                    None => {
                        self.playing = Some((response_id, false, false));
                        self.pending.extend(samples);
                    }
                },
                Queued::End { response_id } => {
                    if let Some((id, _, ended)) = self.playing.as_mut() {
                        if *id == response_id {
                            *ended = true;
                        }
                    }
                }
            }
        }
        let mut frame = [0f32; FRAME_20MS];
        let n = self.pending.len().min(FRAME_20MS);
        for (slot, s) in frame.iter_mut().zip(self.pending.drain(..n)) {
            *slot = s;
        }
        if let Some((id, started, ended)) = self.playing.as_mut() {
            if n > 0 && !*started {
                *started = true;
                report.push(Playback::Started(id.clone()));
            }
            if *ended && self.pending.is_empty() {
                if *started {
                    report.push(Playback::Stopped(id.clone()));
                }
                self.playing = None;
            }
        }
        Ok(self.encoder.encode_vec_float(&frame, 1500)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encode a tone, drop a packet, decode: the output keeps the sender's clock.
    #[test]
    fn loss_is_concealed_on_the_clock() {
        let mut enc = opus::Encoder::new(OPUS_RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let tone: Vec<f32> = (0..FRAME_20MS * 10).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let mut input = OpusInput::new().unwrap();
        let mut out = Vec::new();
        for (k, frame) in tone.chunks(FRAME_20MS).enumerate() {
            let packet = enc.encode_vec_float(frame, 1500).unwrap();
            if k == 4 {
                continue; // lost
            }
            input.push(1000 + (k * FRAME_20MS) as u32, &packet, &mut out);
        }
        assert_eq!(out.len(), tone.len(), "a lost packet is concealed, not skipped");
        assert_eq!(input.packets, 9);
        assert_eq!(input.concealed_samples, FRAME_20MS as u64);
        // Garbage is concealed too, and a duplicate is dropped.
        input.push(1000 + (10 * FRAME_20MS) as u32, &[0xff, 0xff, 0xff], &mut out);
        input.push(1000, &[0u8; 3], &mut out);
        assert_eq!(out.len(), tone.len() + FRAME_20MS);
    }

    #[test]
    fn silence_then_queued_audio() {
        let (tx, mut out) = outgoing().unwrap();
        let mut report = Vec::new();
        assert!(!out.next_packet(&mut report).unwrap().is_empty());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(tx.send_24k("r1", &vec![0.1; 480])));
        out.next_packet(&mut report).unwrap();
        assert!(out.pending.is_empty(), "480 samples at 24 kHz are exactly one 20 ms frame");
        assert_eq!(report, [Playback::Started("r1".into())]);
    }

    /// started → stopped after the response's end; a clear drops what is queued and
    /// reports the response cut off; a new response after that plays.
    #[test]
    fn playback_is_reported() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (tx, mut out) = outgoing().unwrap();
        let mut report = Vec::new();
        rt.block_on(async {
            assert!(tx.send_48k("r1", vec![0.1; FRAME_20MS * 2]).await);
            assert!(tx.finish("r1").await);
        });
        for _ in 0..3 {
            out.next_packet(&mut report).unwrap();
        }
        assert_eq!(report, [Playback::Started("r1".into()), Playback::Stopped("r1".into())]);
        report.clear();
        rt.block_on(async { assert!(tx.send_48k("r2", vec![0.1; FRAME_20MS * 10]).await) });
        out.next_packet(&mut report).unwrap();
        tx.clear();
        rt.block_on(async { assert!(tx.finish("r2").await) });
        out.next_packet(&mut report).unwrap();
        assert!(out.pending.is_empty(), "the rest of r2 was dropped");
        assert_eq!(report, [Playback::Started("r2".into()), Playback::Cleared("r2".into())]);
        report.clear();
        rt.block_on(async { assert!(tx.send_48k("r3", vec![0.1; FRAME_20MS]).await) });
        out.next_packet(&mut report).unwrap();
        assert_eq!(report, [Playback::Started("r3".into())]);
    }
}
