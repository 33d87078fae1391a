//! Acoustic echo cancellation on the microphone path: WebRTC's AEC3 (`sonora`, a pure
//! Rust port), with what the speaker actually played as the far-end reference.
//!
//! The speaker's output callback copies every sample it hands the device (silence
//! included, so the reference keeps the device's timing) into a lock-free ring
//! ([`Reference`]). This stage runs on the capture thread, never in a cpal callback:
//! each time the microphone delivers, it drains the reference, brings both signals to
//! 16 kHz, and runs AEC3 on 10 ms frames — the render frames first (the far end always
//! precedes its echo), then the capture frames. AEC3 finds the delay between them
//! itself (its delay estimator covers the sound server's and the room's latency).
//!
//! The stage also measures itself: the energy of the microphone before and after
//! cancellation while the far end is active gives the echo return loss enhancement
//! (ERLE) on the real loop, in [`EchoStats`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringbuf::traits::Consumer;
use ringbuf::HeapCons;
use sonora::config::EchoCanceller as AecConfig;
use sonora::{AudioProcessing, Config, StreamConfig};

use crate::media::{StreamResampler, MODEL_SAMPLE_RATE};

/// Samples per AEC frame at 16 kHz (10 ms).
const FRAME: usize = MODEL_SAMPLE_RATE as usize / 100;
/// A render frame louder than this (RMS, full scale 1.0) counts as the far end speaking.
const FAR_ACTIVE_RMS: f32 = 0.003;
/// AEC3's adaptive filter needs some far-end signal to converge: until it has heard
/// this many 10 ms frames of it, the microphone is muted while the far end is active
/// (half-duplex, only at the start), so the first reply cannot interrupt itself.
const WARMUP_FAR_FRAMES: u64 = 150;
/// While the far end plays, a frame whose energy the canceller cut by more than this
/// ratio (6 dB) held only echo: its residue is muted. Near-end speech over the echo
/// loses far less (the canceller leaves it), so it passes and can barge in. This keeps
/// a canceller that is still re-converging (after an underrun shifted the echo path)
/// from letting its residue start a turn.
const RESIDUE_RATIO: f64 = 4.0;
/// Capture frames after an active render frame that still count as "far end active"
/// for the statistics: the echo arrives later than the reference (device and room).
const FAR_HANGOVER_FRAMES: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("echo canceller: {0}")]
    Setup(String),
}

/// What the speaker played, sample by sample at the device's rate (mono).
pub struct Reference {
    pub samples: HeapCons<f32>,
    pub rate: u32,
}

/// Energies the stage has seen, for ERLE on the real loop. Totals since start; a reader
/// takes two snapshots and divides the differences.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Σx² of the microphone before / after cancellation, over frames where the far
    /// end was active (f64 bits).
    mic_in_far: AtomicU64,
    mic_out_far: AtomicU64,
    /// 10 ms frames processed, and of them with the far end active.
    pub frames: AtomicU64,
    pub far_frames: AtomicU64,
    /// AEC3's own view, refreshed about once a second.
    aec: Mutex<Option<sonora::AudioProcessingStats>>,
}

/// One reading of [`EchoStats`].
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoSnapshot {
    pub mic_in_far: f64,
    pub mic_out_far: f64,
    pub far_frames: u64,
}

impl EchoSnapshot {
    /// ERLE in dB between an earlier snapshot and this one (`None` without far-end audio).
    /// Whether the canceller is past its warm-up (the microphone is live over playback).
    pub fn converged(&self) -> bool {
        self.far_frames >= WARMUP_FAR_FRAMES
    }

    pub fn erle_db_since(&self, earlier: &EchoSnapshot) -> Option<f64> {
        let (i, o) = (self.mic_in_far - earlier.mic_in_far, self.mic_out_far - earlier.mic_out_far);
        (self.far_frames > earlier.far_frames && i > 0.0).then(|| 10.0 * (i / o.max(1e-12)).log10())
    }
}

impl EchoStats {
    pub fn snapshot(&self) -> EchoSnapshot {
        EchoSnapshot {
            mic_in_far: f64::from_bits(self.mic_in_far.load(Ordering::Relaxed)),
            mic_out_far: f64::from_bits(self.mic_out_far.load(Ordering::Relaxed)),
            far_frames: self.far_frames.load(Ordering::Relaxed),
        }
    }

    /// AEC3's own statistics (ERLE, delay estimate), when it has computed them.
    pub fn aec(&self) -> Option<sonora::AudioProcessingStats> {
        self.aec.lock().ok().and_then(|g| g.clone())
    }

    fn add(slot: &AtomicU64, v: f64) {
        // Only the capture thread writes: load + store is enough.
        let now = f64::from_bits(slot.load(Ordering::Relaxed)) + v;
        slot.store(now.to_bits(), Ordering::Relaxed);
    }
}

/// The AEC stage: 16 kHz microphone in, 16 kHz echo-cancelled microphone out.
pub struct EchoCanceller {
    apm: AudioProcessing,
    reference: Reference,
    ref_resampler: StreamResampler,
    /// Reference samples as popped (device rate), reused.
    raw: Vec<f32>,
    render: Vec<f32>,
    capture: Vec<f32>,
    frame_out: Vec<f32>,
    /// Capture frames still inside the far end's activity (see [`FAR_HANGOVER_FRAMES`]).
    far_hangover: u32,
    /// Smoothed microphone energy before / after the canceller (for the residue gate).
    smooth_in: f64,
    smooth_out: f64,
    stats: Arc<EchoStats>,
}

impl EchoCanceller {
    pub fn new(reference: Reference) -> Result<Self, EchoError> {
        let stream = StreamConfig::new(MODEL_SAMPLE_RATE, 1);
        let config = Config { echo_canceller: Some(AecConfig::default()), ..Default::default() };
        let apm = AudioProcessing::builder().config(config).capture_config(stream).render_config(stream).build();
        let ref_resampler = StreamResampler::with_rates(reference.rate, MODEL_SAMPLE_RATE).map_err(|e| EchoError::Setup(e.to_string()))?;
        Ok(Self {
            apm,
            raw: vec![0.0; reference.rate as usize / 10],
            reference,
            ref_resampler,
            render: Vec::new(),
            capture: Vec::new(),
            frame_out: vec![0.0; FRAME],
            far_hangover: 0,
            smooth_in: 0.0,
            smooth_out: 0.0,
            stats: Arc::new(EchoStats::default()),
        })
    }

    pub fn stats(&self) -> Arc<EchoStats> {
        self.stats.clone()
    }

    /// Cancels the echo in `mic` (16 kHz). Returns whole 10 ms frames; up to 10 ms of
    /// input waits for the next call.
    pub fn process(&mut self, mic: &[f32], out: &mut Vec<f32>) {
        loop {
            let n = self.reference.samples.pop_slice(&mut self.raw);
            if n == 0 {
                break;
            }
            // A resampler error cannot happen on a rate it accepted; the frame is lost.
            let _ = self.ref_resampler.push(&self.raw[..n], &mut self.render);
        }
        let mut fed = 0;
        let mut active = false;
        while self.render.len() - fed >= FRAME {
            let frame = &self.render[fed..fed + FRAME];
            active |= rms(frame) > FAR_ACTIVE_RMS;
            let _ = self.apm.process_render_f32(&[frame], &mut [&mut self.frame_out]);
            fed += FRAME;
        }
        self.render.drain(..fed);
        if active {
            // Audio arrives in bursts when the machine is busy: the hangover must cover
            // every capture frame matching this batch of render frames, plus the echo's lag.
            self.far_hangover = self.far_hangover.max((fed / FRAME) as u32 + FAR_HANGOVER_FRAMES);
        }

        self.capture.extend_from_slice(mic);
        let mut used = 0;
        while self.capture.len() - used >= FRAME {
            let frame = &self.capture[used..used + FRAME];
            if self.apm.process_capture_f32(&[frame], &mut [&mut self.frame_out]).is_err() {
                self.frame_out.copy_from_slice(frame);
            }
            let frames = self.stats.frames.fetch_add(1, Ordering::Relaxed) + 1;
            let (e_in, e_out) = (energy(frame), energy(&self.frame_out));
            self.smooth_in = 0.5 * self.smooth_in + 0.5 * e_in;
            self.smooth_out = 0.5 * self.smooth_out + 0.5 * e_out;
            if self.far_hangover > 0 {
                self.far_hangover -= 1;
                EchoStats::add(&self.stats.mic_in_far, e_in);
                EchoStats::add(&self.stats.mic_out_far, e_out);
                let seen = self.stats.far_frames.fetch_add(1, Ordering::Relaxed);
                if seen < WARMUP_FAR_FRAMES || self.smooth_in > RESIDUE_RATIO * self.smooth_out {
                    self.frame_out.fill(0.0);
                }
            }
            if frames % 100 == 0 {
                let aec = self.apm.statistics().clone();
                tracing::debug!(
                    frames,
                    far_frames = self.stats.far_frames.load(Ordering::Relaxed),
                    render_backlog = self.render.len(),
                    erle = ?aec.echo_return_loss_enhancement,
                    delay_ms = ?aec.delay_ms,
                    "echo canceller"
                );
                if let Ok(mut g) = self.stats.aec.lock() {
                    *g = Some(aec);
                }
            }
            out.extend_from_slice(&self.frame_out);
            used += FRAME;
        }
        self.capture.drain(..used);
    }
}

fn energy(x: &[f32]) -> f64 {
    x.iter().map(|&s| (s as f64) * (s as f64)).sum()
}

fn rms(x: &[f32]) -> f32 {
    (energy(x) / x.len().max(1) as f64).sqrt() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringbuf::traits::{Producer, Split};
    use ringbuf::HeapRb;

    /// A speech-like far end (noise bursts through a resonance) echoed 40 ms later at
    /// −6 dB: AEC3 removes most of it once converged.
    #[test]
    fn removes_a_delayed_linear_echo() {
        let (mut prod, cons) = HeapRb::<f32>::new(48_000).split();
        let mut aec = EchoCanceller::new(Reference { samples: cons, rate: 16_000 }).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let n = 16_000 * 8;
        let mut far = vec![0.0f32; n];
        let (mut y1, mut y2) = (0.0f32, 0.0f32);
        for (i, s) in far.iter_mut().enumerate() {
            let on = (i / 4000) % 3 != 2;
            let x = if on { rng.f32() - 0.5 } else { 0.0 };
            let y = x + 1.6 * y1 - 0.8 * y2;
            y2 = y1;
            y1 = y;
            *s = y * 0.1;
        }
        let delay = 640;
        let mut out = Vec::new();
        let (mut tail_in, mut tail_out) = (0.0, 0.0);
        for (k, chunk) in far.chunks(320).enumerate() {
            prod.push_slice(chunk);
            let start = k * 320;
            let mic: Vec<f32> = (start..start + chunk.len()).map(|i| if i >= delay { far[i - delay] * 0.5 } else { 0.0 }).collect();
            let before = out.len();
            aec.process(&mic, &mut out);
            if start > n / 2 {
                tail_in += energy(&mic);
                tail_out += energy(&out[before..]);
            }
        }
        let erle = 10.0 * (tail_in / tail_out.max(1e-12)).log10();
        assert!(erle > 20.0, "ERLE {erle:.1} dB");
        let snap = aec.stats().snapshot();
        let whole = snap.erle_db_since(&EchoSnapshot::default());
        eprintln!("ERLE {erle:.1} dB in the second half; {whole:?} dB over {} far-end frames, AEC3: {:?}", snap.far_frames, aec.stats().aec());
        assert!(snap.far_frames > 300 && whole.unwrap() > 10.0);
    }

    /// With nothing played, the microphone passes through (near-end speech is kept).
    #[test]
    fn near_end_alone_passes() {
        let (_prod, cons) = HeapRb::<f32>::new(1600).split();
        let mut aec = EchoCanceller::new(Reference { samples: cons, rate: 48_000 }).unwrap();
        let mic: Vec<f32> = (0..32_000).map(|i| (i as f32 * 0.2).sin() * 0.3).collect();
        let mut out = Vec::new();
        for c in mic.chunks(256) {
            aec.process(c, &mut out);
        }
        assert_eq!(out.len() / FRAME, mic.len() / FRAME);
        let tail = out.len() / 2;
        let ratio = energy(&out[tail..]) / energy(&mic[tail..out.len()]);
        assert!(ratio > 0.5, "near-end energy kept: {ratio}");
    }
}
