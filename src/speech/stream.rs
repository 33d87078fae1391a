//! [`SpeechStream`]: the speech stage of one response. Text deltas in; for each
//! segment (first clause, then sentences), its text and its audio at 24 kHz out, in
//! order. Synthesis of a segment starts as soon as the segment is complete, while the
//! model is still writing the next one.
//!
//! Cancelling the token stops it within one synthesis call: a Piper run in progress
//! finishes on its thread, but nothing more is sent.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::segment::Segmenter;
use super::{SpeechEngine, SpeechError, OUTPUT_SAMPLE_RATE};
use crate::media::StreamResampler;

/// Silence appended before flushing a segment's resampler, so its last real samples
/// come out (the resampler holds back its delay).
const FLUSH_PAD_MS: u32 = 20;

/// What the stage gives out.
#[derive(Debug)]
pub enum SpeechEvent {
    /// One segment: what is said, and its audio (24 kHz mono, ±1).
    Segment { text: String, samples: Vec<f32>, synthesis_ms: u64 },
    /// A segment could not be synthesized; the stream goes on with the next one.
    Error(SpeechError),
    /// All text was spoken (after [`SpeechStream::finish`]).
    Done,
}

pub struct SpeechStream {
    text_tx: Option<mpsc::UnboundedSender<String>>,
    events: mpsc::Receiver<SpeechEvent>,
    cancel: CancellationToken,
}

impl SpeechStream {
    /// Starts the stage's task; it ends when the text is finished and spoken, or on `cancel`.
    pub fn start(engine: Arc<SpeechEngine>, cancel: CancellationToken) -> Self {
        let (text_tx, text_rx) = mpsc::unbounded_channel();
        // A few segments of slack: the session reads events as they come.
        let (tx, events) = mpsc::channel(8);
        tokio::spawn(run(engine, text_rx, tx, cancel.clone()));
        Self { text_tx: Some(text_tx), events, cancel }
    }

    /// More of the model's text.
    pub fn push(&mut self, delta: &str) {
        if let Some(tx) = &self.text_tx {
            let _ = tx.send(delta.to_string());
        }
    }

    /// No more text will come: speak what is left, then send [`SpeechEvent::Done`].
    pub fn finish(&mut self) {
        self.text_tx = None;
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The next event; `None` once the stage has ended (after `Done`, or cancelled).
    pub async fn next(&mut self) -> Option<SpeechEvent> {
        self.events.recv().await
    }
}

impl Drop for SpeechStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn run(engine: Arc<SpeechEngine>, mut text_rx: mpsc::UnboundedReceiver<String>, tx: mpsc::Sender<SpeechEvent>, cancel: CancellationToken) {
    let mut segmenter = Segmenter::new();
    let mut queue: std::collections::VecDeque<String> = Default::default();
    let mut text_done = false;
    loop {
        // Take in all the text there is before synthesizing, so segments are complete.
        while !text_done {
            match text_rx.try_recv() {
                Ok(delta) => queue.extend(segmenter.push(&delta)),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    text_done = true;
                    queue.extend(segmenter.finish());
                }
            }
        }
        if let Some(segment) = queue.pop_front() {
            let started = Instant::now();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = engine.synthesize(&segment) => r,
            };
            let ev = match result.and_then(|pcm| to_output_rate(pcm.sample_rate, pcm.samples)) {
                Ok(samples) => SpeechEvent::Segment { text: segment, samples, synthesis_ms: started.elapsed().as_millis() as u64 },
                Err(e) => SpeechEvent::Error(e),
            };
            if !send(&tx, ev, &cancel).await {
                return;
            }
            continue;
        }
        if text_done {
            send(&tx, SpeechEvent::Done, &cancel).await;
            return;
        }
        // Nothing ready: wait for more text.
        tokio::select! {
            _ = cancel.cancelled() => return,
            delta = text_rx.recv() => match delta {
                Some(d) => queue.extend(segmenter.push(&d)),
                None => {
                    text_done = true;
                    queue.extend(segmenter.finish());
                }
            },
        }
    }
}

async fn send(tx: &mpsc::Sender<SpeechEvent>, ev: SpeechEvent, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        r = tx.send(ev) => r.is_ok(),
    }
}

/// One segment's audio at [`OUTPUT_SAMPLE_RATE`].
pub fn to_output_rate(rate: u32, samples: Vec<f32>) -> Result<Vec<f32>, SpeechError> {
    if rate == OUTPUT_SAMPLE_RATE {
        return Ok(samples);
    }
    let err = |e: crate::media::resample::ResampleError| SpeechError::Synthesis(e.to_string());
    let mut r = StreamResampler::with_rates(rate, OUTPUT_SAMPLE_RATE).map_err(err)?;
    let mut out = Vec::with_capacity(samples.len() * OUTPUT_SAMPLE_RATE as usize / rate.max(1) as usize + 1024);
    r.push(&samples, &mut out).map_err(err)?;
    r.push(&vec![0.0; (rate * FLUSH_PAD_MS / 1000) as usize], &mut out).map_err(err)?;
    r.flush(&mut out).map_err(err)?;
    Ok(out)
}
