//! The local speaker: 24 kHz speech → the output device, through a lock-free ring.
//!
//! The output callback only pops from the ring (silence when it is empty) and never
//! blocks or allocates. [`Speaker::play`] resamples to the device's rate and pushes;
//! [`Speaker::clear`] asks the callback to drop what is queued, so playback stops
//! within one buffer (barge-in). [`Speaker::is_playing`] tells the microphone path
//! when the assistant's own voice may be in the room (half-duplex gating).
//!
//! With echo cancellation the callback also copies every sample it hands the device
//! (silence included) into a second ring, the far-end reference for the AEC
//! ([`super::echo`]); and it counts what it played and what a clear dropped, so the
//! session can tell how much of a reply was heard (barge-in truncation).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::media::StreamResampler;
use crate::speech::OUTPUT_SAMPLE_RATE;

/// Seconds of audio the ring holds: a long reply is queued whole.
const RING_SECONDS: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("no output device named '{0}' (see `hark devices`)")]
    NotFound(String),
    #[error("no default output device")]
    NoDefault,
    #[error("cannot open the speaker: {0}")]
    Open(String),
}

pub struct Speaker {
    prod: Mutex<(HeapProd<f32>, StreamResampler)>,
    flush: Arc<AtomicBool>,
    /// Device-rate frames played since the start (for how much was heard).
    played: Arc<AtomicU64>,
    /// Device-rate frames a clear dropped unplayed.
    skipped: Arc<AtomicU64>,
    /// Device-rate frames queued since the start.
    pushed: AtomicU64,
    reference: Mutex<Option<super::echo::Reference>>,
    rate: u32,
    channels: usize,
    // The stream lives as long as the speaker; it stays on the thread that made it.
    _stream: StreamHolder,
}

/// cpal streams are not `Send` on every platform: keep it on a thread of its own.
struct StreamHolder {
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Drop for StreamHolder {
    fn drop(&mut self) {
        self.stop.take();
    }
}

impl Speaker {
    /// Opens the output; `reference`: also keep what is played for an echo canceller
    /// (taken once with [`Self::take_reference`]).
    pub fn open(device: Option<&str>, buffer_frames: u32, reference: bool) -> Result<Arc<Self>, SpeakerError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let device = device.map(str::to_string);
        std::thread::Builder::new()
            .name("hark-speaker".into())
            .spawn(move || {
                match open_stream(device.as_deref(), buffer_frames, reference) {
                    Ok((stream, parts)) => {
                        let _ = ready_tx.send(Ok(parts));
                        // Holds the stream until the speaker is dropped.
                        let _ = stop_rx.recv();
                        drop(stream);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| SpeakerError::Open(e.to_string()))?;
        let Parts { prod, flush, played, skipped, rate, channels, reference } =
            ready_rx.recv().map_err(|_| SpeakerError::Open("the speaker thread ended".into()))??;
        let resampler = StreamResampler::with_rates(OUTPUT_SAMPLE_RATE, rate).map_err(|e| SpeakerError::Open(e.to_string()))?;
        Ok(Arc::new(Self {
            prod: Mutex::new((prod, resampler)),
            flush,
            played,
            skipped,
            pushed: AtomicU64::new(0),
            reference: Mutex::new(reference.map(|samples| super::echo::Reference { samples, rate })),
            rate,
            channels,
            _stream: StreamHolder { stop: Some(stop_tx) },
        }))
    }

    /// Queues 24 kHz mono speech.
    pub fn play(&self, samples: &[f32]) {
        let Ok(mut guard) = self.prod.lock() else { return };
        let (prod, resampler) = &mut *guard;
        let mut out = Vec::with_capacity(samples.len() * self.rate as usize / OUTPUT_SAMPLE_RATE as usize + 64);
        if resampler.push(samples, &mut out).is_err() {
            return;
        }
        // A full ring drops the rest of this chunk (a minute of speech is queued already).
        let n = prod.push_slice(&out);
        self.pushed.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The far-end reference for an echo canceller (once; `None` if not asked for).
    pub fn take_reference(&self) -> Option<super::echo::Reference> {
        self.reference.lock().ok().and_then(|mut r| r.take())
    }

    /// Position (device-rate frames since open) of the next sample the device will get:
    /// everything queued before it was played or dropped by a clear.
    pub fn position(&self) -> u64 {
        self.played.load(Ordering::Relaxed) + self.skipped.load(Ordering::Relaxed)
    }

    /// Position just past the last queued sample.
    pub fn queued_end(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Drops everything queued: playback stops within one device buffer.
    pub fn clear(&self) {
        self.flush.store(true, Ordering::Release);
    }

    /// Whether speech is queued or playing.
    pub fn is_playing(&self) -> bool {
        self.prod.lock().map(|g| g.0.occupied_len() > 0).unwrap_or(false) && !self.flush.load(Ordering::Acquire)
    }

    /// Milliseconds of audio played since the speaker opened.
    pub fn played_ms(&self) -> u64 {
        self.played.load(Ordering::Relaxed) * 1000 / self.rate.max(1) as u64
    }

    pub fn channels(&self) -> usize {
        self.channels
    }
}

struct Parts {
    prod: HeapProd<f32>,
    flush: Arc<AtomicBool>,
    played: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
    rate: u32,
    channels: usize,
    reference: Option<HeapCons<f32>>,
}

/// Seconds of played audio the reference ring holds (drained every capture poll).
const REFERENCE_SECONDS: usize = 2;

fn open_stream(name: Option<&str>, buffer_frames: u32, reference: bool) -> Result<(cpal::Stream, Parts), SpeakerError> {
    let host = cpal::default_host();
    let device = match name {
        None => host.default_output_device().ok_or(SpeakerError::NoDefault)?,
        Some(n) => host
            .output_devices()
            .map_err(|e| SpeakerError::Open(e.to_string()))?
            .find(|d| super::mic::device_name(d) == n || d.id().map(|i| i.to_string() == n || i.id() == n).unwrap_or(false))
            .ok_or_else(|| SpeakerError::NotFound(n.to_string()))?,
    };
    let supported = device.default_output_config().map_err(|e| SpeakerError::Open(e.to_string()))?;
    let rate = supported.sample_rate();
    let channels = supported.channels().max(1) as usize;
    let config = cpal::StreamConfig { channels: channels as u16, sample_rate: rate, buffer_size: cpal::BufferSize::Fixed(buffer_frames) };
    let (prod, cons) = HeapRb::<f32>::new(rate as usize * RING_SECONDS).split();
    let flush = Arc::new(AtomicBool::new(false));
    let played = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let (ref_prod, ref_cons) = match reference {
        true => {
            let (p, c) = HeapRb::<f32>::new(rate as usize * REFERENCE_SECONDS).split();
            (Some(p), Some(c))
        }
        false => (None, None),
    };
    let on_error = |e: cpal::Error| tracing::warn!("speaker: {e}");
    let ends = Ends { cons, reference: ref_prod, channels, flush: flush.clone(), played: played.clone(), skipped: skipped.clone() };
    let stream = match supported.sample_format() {
        cpal::SampleFormat::F32 => device.build_output_stream(config, fill::<f32>(ends, |s| s), on_error, None),
        cpal::SampleFormat::I16 => device.build_output_stream(config, fill::<i16>(ends, |s| (s.clamp(-1.0, 1.0) * 32767.0) as i16), on_error, None),
        other => return Err(SpeakerError::Open(format!("sample format {other} is not supported"))),
    }
    .map_err(|e| SpeakerError::Open(e.to_string()))?;
    stream.play().map_err(|e| SpeakerError::Open(e.to_string()))?;
    tracing::info!(rate, channels, buffer_frames, "speaker open");
    Ok((stream, Parts { prod, flush, played, skipped, rate, channels, reference: ref_cons }))
}

/// What the output callback owns.
struct Ends {
    cons: HeapCons<f32>,
    reference: Option<HeapProd<f32>>,
    channels: usize,
    flush: Arc<AtomicBool>,
    played: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
}

/// The real-time output callback: pop mono samples, copy to every channel, and to the
/// echo reference exactly as played (a full reference ring drops samples rather than wait).
fn fill<T: cpal::SizedSample + Default + Copy + 'static>(mut e: Ends, convert: fn(f32) -> T) -> impl FnMut(&mut [T], &cpal::OutputCallbackInfo) + Send + 'static {
    move |data: &mut [T], _| {
        if e.flush.swap(false, Ordering::AcqRel) {
            let dropped = e.cons.occupied_len();
            e.cons.clear();
            e.skipped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        let mut n = 0u64;
        for frame in data.chunks_exact_mut(e.channels) {
            let s = e.cons.try_pop();
            n += s.is_some() as u64;
            let s = s.unwrap_or(0.0);
            if let Some(r) = e.reference.as_mut() {
                let _ = r.try_push(s);
            }
            let v = convert(s);
            for out in frame {
                *out = v;
            }
        }
        e.played.fetch_add(n, Ordering::Relaxed);
    }
}
