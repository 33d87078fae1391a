//! The local speaker: 24 kHz speech → the output device, through a lock-free ring.
//!
//! The output callback only pops from the ring (silence when it is empty) and never
//! blocks or allocates. [`Speaker::play`] resamples to the device's rate and pushes;
//! [`Speaker::clear`] asks the callback to drop what is queued, so playback stops
//! within one buffer (barge-in). [`Speaker::is_playing`] tells the microphone path
//! when the assistant's own voice may be in the room (half-duplex gating).

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
    pub fn open(device: Option<&str>, buffer_frames: u32) -> Result<Arc<Self>, SpeakerError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let device = device.map(str::to_string);
        std::thread::Builder::new()
            .name("hark-speaker".into())
            .spawn(move || {
                match open_stream(device.as_deref(), buffer_frames) {
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
        let (prod, flush, played, rate, channels) = ready_rx.recv().map_err(|_| SpeakerError::Open("the speaker thread ended".into()))??;
        let resampler = StreamResampler::with_rates(OUTPUT_SAMPLE_RATE, rate).map_err(|e| SpeakerError::Open(e.to_string()))?;
        Ok(Arc::new(Self {
            prod: Mutex::new((prod, resampler)),
            flush,
            played,
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
        prod.push_slice(&out);
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

type Parts = (HeapProd<f32>, Arc<AtomicBool>, Arc<AtomicU64>, u32, usize);

fn open_stream(name: Option<&str>, buffer_frames: u32) -> Result<(cpal::Stream, Parts), SpeakerError> {
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
    let on_error = |e: cpal::Error| tracing::warn!("speaker: {e}");
    let stream = match supported.sample_format() {
        cpal::SampleFormat::F32 => device.build_output_stream(config, fill::<f32>(cons, channels, flush.clone(), played.clone(), |s| s), on_error, None),
        cpal::SampleFormat::I16 => {
            device.build_output_stream(config, fill::<i16>(cons, channels, flush.clone(), played.clone(), |s| (s.clamp(-1.0, 1.0) * 32767.0) as i16), on_error, None)
        }
        other => return Err(SpeakerError::Open(format!("sample format {other} is not supported"))),
    }
    .map_err(|e| SpeakerError::Open(e.to_string()))?;
    stream.play().map_err(|e| SpeakerError::Open(e.to_string()))?;
    tracing::info!(rate, channels, buffer_frames, "speaker open");
    Ok((stream, (prod, flush, played, rate, channels)))
}

/// The real-time output callback: pop mono samples, copy to every channel.
fn fill<T: cpal::SizedSample + Default + Copy + 'static>(
    mut cons: HeapCons<f32>,
    channels: usize,
    flush: Arc<AtomicBool>,
    played: Arc<AtomicU64>,
    convert: fn(f32) -> T,
) -> impl FnMut(&mut [T], &cpal::OutputCallbackInfo) + Send + 'static {
    move |data: &mut [T], _| {
        if flush.swap(false, Ordering::AcqRel) {
            cons.clear();
        }
        for frame in data.chunks_exact_mut(channels) {
            let s = cons.try_pop();
            if s.is_some() {
                played.fetch_add(1, Ordering::Relaxed);
            }
            let v = convert(s.unwrap_or(0.0));
            for out in frame {
                *out = v;
            }
        }
    }
}
