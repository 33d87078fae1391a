//! The local microphone: cpal capture → lock-free ring → 16 kHz chunks.
//!
//! The capture callback runs on the audio backend's real-time thread: it only
//! down-mixes into a `ringbuf` ring (no locks, no allocation, never blocks; when the
//! ring is full the newest samples are dropped and counted). A plain thread owns the
//! stream, drains the ring every [`POLL`], resamples to 16 kHz and hands chunks to the
//! session. It also watches the device: a stream error, or no samples for
//! [`STALL`], means the device is gone (unplugged, sound server restarted); the loss is
//! reported, and the capture reopens with backoff until the device is back.
//!
//! With a speaker in the room, the capture thread also runs the echo canceller
//! ([`super::echo`]) on each chunk before it leaves, so the session's VAD only hears
//! the room minus the assistant's own voice.
//!
//! The buffer is a fixed power of two ([`MicSettings::buffer_frames`]): with the
//! default size some backends deliver the first callback seconds late (cpal's
//! PipeWire-bridge issues #1250, #1029).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::HeapRb;
use tokio::sync::mpsc;

use super::echo::EchoCanceller;
use super::{MicEvent, MicOutput, MicSettings};
use crate::media::{StreamResampler, MODEL_SAMPLE_RATE};
use crate::metrics::AudioDrops;

/// How often the capture thread drains the ring (it bounds how late a sound is seen).
const POLL: Duration = Duration::from_millis(5);
/// No samples for this long from a started stream: the device is gone.
const STALL: Duration = Duration::from_secs(2);
/// Reopen backoff: first wait, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Seconds of audio the ring holds (the drain runs every 10 ms; this is slack).
const RING_SECONDS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum MicError {
    #[error("no input device named '{0}' (see `hark devices`)")]
    NotFound(String),
    #[error("no default input device (is a sound server running? see `hark devices`)")]
    NoDefault,
    #[error("cannot open '{device}': {reason}")]
    Open { device: String, reason: String },
}

/// A running capture; dropping it stops the capture thread.
pub struct Microphone {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Samples the callback had to drop because the ring was full (also counted in
    /// `drops`, as frames, by the capture thread).
    pub overruns: Arc<AtomicU64>,
}

impl Microphone {
    /// Starts capturing; audio and events arrive on the returned receiver.
    pub fn start(settings: MicSettings, echo: Option<EchoCanceller>, drops: AudioDrops) -> (Self, mpsc::Receiver<MicOutput>) {
        // ~2 s of 10 ms chunks: a session that falls behind loses audio, never stalls capture.
        let (tx, rx) = mpsc::channel(256);
        let stop = Arc::new(AtomicBool::new(false));
        let overruns = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), overruns.clone());
        let thread = std::thread::Builder::new()
            .name("hark-mic".into())
            .spawn(move || capture_loop(settings, echo, tx, s, o, drops))
            .expect("spawning the capture thread");
        (Self { stop, thread: Some(thread), overruns }, rx)
    }
}

impl Drop for Microphone {
    fn drop(&mut self) {
        // The thread ends at its next poll. It is not joined: a backend call against a
        // sound server that just died can block, and stopping hark must not wait on it.
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take();
    }
}

fn capture_loop(settings: MicSettings, mut echo: Option<EchoCanceller>, tx: mpsc::Sender<MicOutput>, stop: Arc<AtomicBool>, overruns: Arc<AtomicU64>, drops: AudioDrops) {
    let mut backoff = BACKOFF_MIN;
    while !stop.load(Ordering::Relaxed) {
        match capture_once(&settings, &mut echo, &tx, &stop, &overruns, &drops) {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost { device, reason }) => {
                tracing::warn!(device = %device, "microphone lost: {reason}; reopening");
                if tx.blocking_send(MicOutput::Event(MicEvent::Lost { device, reason })).is_err() {
                    return;
                }
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                tracing::warn!("microphone: {e}; retrying in {backoff:?}");
                let ev = MicEvent::OpenFailed { reason: e.to_string(), retry_in: backoff };
                if tx.blocking_send(MicOutput::Event(ev)).is_err() {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        // Wait out the backoff, but notice a stop at once.
        let until = Instant::now() + backoff;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
        }
    }
}

enum Ended {
    Stopped,
    Lost { device: String, reason: String },
}

/// Finds the device `settings` names.
pub fn find_input(settings: &MicSettings) -> Result<cpal::Device, MicError> {
    let host = cpal::default_host();
    match &settings.device {
        None => host.default_input_device().ok_or(MicError::NoDefault),
        Some(name) => {
            let devices = host.input_devices().map_err(|e| MicError::Open { device: name.clone(), reason: e.to_string() })?;
            for d in devices {
                let id_matches = d.id().map(|i| i.to_string() == *name || i.id() == name).unwrap_or(false);
                if id_matches || device_name(&d) == *name {
                    return Ok(d);
                }
            }
            Err(MicError::NotFound(name.clone()))
        }
    }
}

pub fn device_name(d: &cpal::Device) -> String {
    d.description().map(|desc| desc.name().to_string()).or_else(|_| d.id().map(|i| i.to_string())).unwrap_or_else(|_| "?".into())
}

/// Opens the device and captures until it is lost or `stop` is set.
fn capture_once(
    settings: &MicSettings,
    echo: &mut Option<EchoCanceller>,
    tx: &mpsc::Sender<MicOutput>,
    stop: &AtomicBool,
    overruns: &Arc<AtomicU64>,
    drops: &AudioDrops,
) -> Result<Ended, MicError> {
    let device = find_input(settings)?;
    let name = device_name(&device);
    let open_err = |reason: String| MicError::Open { device: name.clone(), reason };
    let default = device.default_input_config().map_err(|e| open_err(e.to_string()))?;
    // Capture at the model's rate when the device offers it (sound servers resample
    // with little delay): no resampler in the path saves its 20 ms chunk and filter
    // delay on every sound, barge-in included.
    let supported = device
        .supported_input_configs()
        .ok()
        .and_then(|mut c| {
            c.find(|r| r.channels() == default.channels() && r.sample_format() == default.sample_format() && r.min_sample_rate() <= MODEL_SAMPLE_RATE && MODEL_SAMPLE_RATE <= r.max_sample_rate())
        })
        .map(|r| r.with_sample_rate(MODEL_SAMPLE_RATE))
        .unwrap_or(default);
    let rate = supported.sample_rate();
    let channels = supported.channels().max(1);
    let format = supported.sample_format();
    let config = cpal::StreamConfig { channels, sample_rate: rate, buffer_size: cpal::BufferSize::Fixed(settings.buffer_frames) };

    let (mut prod, mut cons) = HeapRb::<f32>::new(rate as usize * RING_SECONDS).split();
    let failed = Arc::new(std::sync::Mutex::new(None::<String>));
    let f = failed.clone();
    // Runs on the backend's thread, rarely (errors only): a lock here is fine.
    let on_error = move |e: cpal::Error| {
        if let Ok(mut slot) = f.lock() {
            slot.get_or_insert_with(|| e.to_string());
        }
    };
    let ch = channels as usize;
    // The callback only bumps an atomic (no locks on the real-time thread); the capture
    // loop below moves what it counted into the metric.
    let dropped = overruns.clone();
    let ring_drops = Arc::new(AtomicU64::new(0));
    let ring_dropped = ring_drops.clone();
    // The real-time callback: down-mix into the ring; never blocks, never allocates.
    macro_rules! callback {
        ($t:ty, $to_f32:expr) => {
            move |data: &[$t], _: &cpal::InputCallbackInfo| {
                for frame in data.chunks_exact(ch) {
                    let mut sum = 0.0f32;
                    for &s in frame {
                        sum += $to_f32(s);
                    }
                    if prod.try_push(sum / ch as f32).is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        ring_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
    }
    let stream = match format {
        cpal::SampleFormat::F32 => device.build_input_stream(config, callback!(f32, |s: f32| s), on_error, None),
        cpal::SampleFormat::I16 => device.build_input_stream(config, callback!(i16, |s: i16| s as f32 / 32768.0), on_error, None),
        cpal::SampleFormat::I32 => device.build_input_stream(config, callback!(i32, |s: i32| s as f32 / 2_147_483_648.0), on_error, None),
        cpal::SampleFormat::U16 => device.build_input_stream(config, callback!(u16, |s: u16| (s as f32 - 32768.0) / 32768.0), on_error, None),
        other => return Err(open_err(format!("sample format {other} is not supported"))),
    }
    .map_err(|e| open_err(e.to_string()))?;
    stream.play().map_err(|e| open_err(e.to_string()))?;
    tracing::info!(device = %name, rate, channels, buffer_frames = settings.buffer_frames, "microphone open");
    if tx.blocking_send(MicOutput::Event(MicEvent::Opened { device: name.clone(), rate, channels })).is_err() {
        return Ok(Ended::Stopped);
    }

    let mut resampler = StreamResampler::with_rates(rate, MODEL_SAMPLE_RATE).map_err(|e| open_err(e.to_string()))?;
    let mut raw = vec![0.0f32; rate as usize / 10];
    let mut last_audio = Instant::now();
    let mut quiet_since: Option<Instant> = Some(Instant::now());
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(Ended::Stopped);
        }
        if let Some(reason) = failed.lock().ok().and_then(|mut s| s.take()) {
            abandon(stream);
            return Ok(Ended::Lost { device: name, reason });
        }
        let lost = ring_drops.swap(0, Ordering::Relaxed);
        if lost > 0 {
            drops.count("mic_ring_overrun", lost, rate);
        }
        let mut out = Vec::new();
        loop {
            let n = cons.pop_slice(&mut raw);
            if n == 0 {
                break;
            }
            last_audio = Instant::now();
            if let Err(e) = resampler.push(&raw[..n], &mut out) {
                abandon(stream);
                return Ok(Ended::Lost { device: name, reason: e.to_string() });
            }
        }
        if let Some(aec) = echo.as_mut().filter(|_| !out.is_empty()) {
            let mut cleaned = Vec::with_capacity(out.len() + 160);
            aec.process(&out, &mut cleaned);
            out = cleaned;
        }
        if !out.is_empty() {
            let peak = out.iter().fold(0f32, |m, s| m.max(s.abs()));
            if peak > 0.02 && quiet_since.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
                // For latency checks: when sound arrives after a quiet stretch.
                tracing::debug!(peak, "microphone: sound after silence");
            }
            if peak > 0.02 {
                quiet_since = None;
            } else if quiet_since.is_none() {
                quiet_since = Some(Instant::now());
            }
            // A full channel means the session is behind: drop this chunk, keep capturing.
            match tx.try_send(MicOutput::Audio(out)) {
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(Ended::Stopped),
                Err(mpsc::error::TrySendError::Full(MicOutput::Audio(chunk))) => {
                    overruns.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    drops.count("mic_queue_full", chunk.len() as u64, MODEL_SAMPLE_RATE);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Ok(()) => {}
            }
        }
        if last_audio.elapsed() > STALL {
            abandon(stream);
            return Ok(Ended::Lost { device: name, reason: format!("no audio for {} s", STALL.as_secs()) });
        }
        std::thread::sleep(POLL);
    }
}

/// Drops a failed stream on a thread of its own: closing a stream whose sound server
/// died can block in the backend (its worker waits in `poll` on a dead socket), and the
/// capture must go on reopening meanwhile.
fn abandon(stream: cpal::Stream) {
    let _ = std::thread::Builder::new().name("hark-mic-close".into()).spawn(move || drop(stream));
}

/// One device as `hark devices` shows it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub id: String,
    pub is_default: bool,
    /// `rate Hz, N ch, format` of the default config.
    pub default_config: Option<String>,
    /// Rate ranges and formats the device supports.
    pub configs: Vec<String>,
}

/// Inputs and outputs of the default host.
pub fn list_devices() -> Result<(Vec<DeviceInfo>, Vec<DeviceInfo>), String> {
    let host = cpal::default_host();
    let id_of = |d: &cpal::Device| d.id().map(|i| i.to_string()).unwrap_or_default();
    let default_in = host.default_input_device().map(|d| id_of(&d));
    let default_out = host.default_output_device().map(|d| id_of(&d));
    let info = |d: cpal::Device, input: bool| {
        let name = device_name(&d);
        let id = id_of(&d);
        let default = if input { d.default_input_config() } else { d.default_output_config() };
        let ranges: Vec<cpal::SupportedStreamConfigRange> = if input {
            d.supported_input_configs().map(|c| c.collect()).unwrap_or_default()
        } else {
            d.supported_output_configs().map(|c| c.collect()).unwrap_or_default()
        };
        DeviceInfo {
            is_default: Some(&id) == if input { default_in.as_ref() } else { default_out.as_ref() },
            configs: summarize(&ranges),
            id,
            name,
            default_config: default.ok().map(|c| format!("{} Hz, {} ch, {}", c.sample_rate(), c.channels(), c.sample_format())),
        }
    };
    let inputs = host.input_devices().map_err(|e| e.to_string())?.map(|d| info(d, true)).collect();
    let outputs = host.output_devices().map_err(|e| e.to_string())?.map(|d| info(d, false)).collect();
    Ok((inputs, outputs))
}

/// One line per sample format: the channel counts and rates it covers (plugins list
/// every channel count separately, hundreds of lines).
fn summarize(ranges: &[cpal::SupportedStreamConfigRange]) -> Vec<String> {
    let mut formats: Vec<cpal::SampleFormat> = Vec::new();
    for r in ranges {
        if !formats.contains(&r.sample_format()) {
            formats.push(r.sample_format());
        }
    }
    formats
        .into_iter()
        .map(|f| {
            let of: Vec<_> = ranges.iter().filter(|r| r.sample_format() == f).collect();
            let ch = (of.iter().map(|r| r.channels()).min().unwrap_or(0), of.iter().map(|r| r.channels()).max().unwrap_or(0));
            let hz = (of.iter().map(|r| r.min_sample_rate()).min().unwrap_or(0), of.iter().map(|r| r.max_sample_rate()).max().unwrap_or(0));
            format!("{f}: {}-{} ch, {}-{} Hz", ch.0, ch.1, hz.0, hz.1)
        })
        .collect()
}
