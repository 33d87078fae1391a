//! The model thread's loop: many sessions' work interleaved in small units.
//!
//! A unit is one prefill chunk or one decode step of a generation, a chunk of a
//! streamed turn, or a chunk of background preparation. Each round picks, in order:
//! a stopped generation (it finishes without model work, so a cancel is answered
//! within one unit); a streamed turn with work (a speaking user comes first); the
//! next running generation, round robin (so a long answer never holds back another
//! session's first token); the background preparation, only when nothing else waits.
//! Events leave through the sink of each request, which never blocks: a listener that
//! is gone or full stops its own generation and nothing else.

use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::generation::{Generation, Progress};
use super::Engine;
use crate::model::{BackendError, BackendEvent, GenerateRequest, TurnCommand};

/// Where a request's events go. Returns false when they can no longer be delivered
/// (the listener is gone, or so far behind that its channel is full).
pub type EventSink = Box<dyn FnMut(BackendEvent) -> bool + Send>;

/// Most sequences decoded in one forward.
pub const MAX_BATCH: usize = 32;

/// Work for the model thread.
pub enum Job {
    Generate { request: GenerateRequest, cancel: CancellationToken, sink: EventSink },
    OpenTurn { stream: u64, base: GenerateRequest, signals: mpsc::UnboundedSender<f32> },
    Turn { stream: u64, command: TurnCommand },
    /// Low priority: build a cache for this context when nothing else waits.
    Prepare { request: GenerateRequest },
}

/// A generation the scheduler is stepping, and where its events go.
pub(super) struct Running {
    pub gen: Generation,
    sink: EventSink,
}

impl Engine {
    /// Queues a generation; [`Self::step`] advances it. Its events, ending with one
    /// `Done` or `Error`, go to `sink`.
    pub fn submit(&mut self, request: GenerateRequest, cancel: CancellationToken, sink: EventSink) {
        let gen = Generation::new(self, request, cancel);
        self.running.push(Running { gen, sink });
    }

    /// One generation at a time, each to its end, in arrival order: how the engine
    /// behaved before the scheduler (benchmarks compare against it).
    pub fn set_fifo(&mut self, fifo: bool) {
        self.fifo = fifo;
    }

    /// Whether anything is waiting for the model.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || self.background.is_some() || self.open_turns.values().any(|t| t.has_work())
    }

    /// Runs one unit of work (see the module doc). Returns false when there was none.
    pub fn step(&mut self) -> bool {
        if let Some(i) = self.running.iter().position(|r| r.gen.stopped()) {
            self.advance_at(i);
            return true;
        }
        if let Some(stream) = self.open_turns.iter().filter(|(_, t)| t.has_work()).map(|(s, _)| *s).min() {
            if let Err(e) = self.turn_step(stream) {
                tracing::warn!("streaming prefill stopped for this turn: {e}");
            }
            return true;
        }
        if self.fifo && !self.running.is_empty() {
            self.advance_at(0);
            return true;
        }
        if !self.running.is_empty() {
            // Decode steps (all decoding generations in one batch) alternate with
            // prefill chunks of the others, round robin: a new request's prompt goes in
            // while the running answers go on, each waiting at most one chunk.
            let decoding: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].gen.decoding()).collect();
            let prefilling: Vec<usize> = (0..self.running.len()).filter(|&i| !self.running[i].gen.decoding()).collect();
            if !decoding.is_empty() && (prefilling.is_empty() || self.decode_next) {
                self.decode_next = false;
                self.decode_batch(decoding);
            } else {
                self.decode_next = true;
                let i = prefilling[self.cursor % prefilling.len()];
                if !self.advance_at(i) {
                    self.cursor += 1;
                }
            }
            return true;
        }
        if self.background.is_some() {
            self.background_step();
            return true;
        }
        false
    }

    /// One decode step of the generations at `indices` (ascending): one batched forward,
    /// then each samples its own token. A single one (or a token the batch cannot take,
    /// a media placeholder) goes alone through [`Self::advance_at`].
    fn decode_batch(&mut self, indices: Vec<usize>) {
        let placeholder = |t: u32| {
            let c = &self.model.config;
            t == c.audio_token_id || t == c.image_token_id || t == c.video_token_id
        };
        let first = indices.first().copied().unwrap_or(0);
        let mut batch: Vec<usize> = indices.into_iter().filter(|&i| self.running[i].gen.next_token().is_some_and(|t| !placeholder(t))).collect();
        batch.truncate(MAX_BATCH);
        if batch.len() < 2 {
            self.advance_at(batch.first().copied().unwrap_or(first));
            return;
        }
        let mut members: Vec<(Running, super::cache_pool::CachedContext, u32)> = Vec::with_capacity(batch.len());
        for &i in batch.iter().rev() {
            let mut r = self.running.remove(i);
            if let Some((ctx, t)) = r.gen.take_decode() {
                members.push((r, ctx, t));
            }
        }
        members.reverse();
        let tokens: Vec<u32> = members.iter().map(|m| m.2).collect();
        let result = {
            let mut caches: Vec<&mut crate::model::gemma4::KvCache> = members.iter_mut().map(|m| &mut m.1.cache).collect();
            self.model.forward_batch(&tokens, &mut caches)
        };
        self.stats.decode_batches += 1;
        for (i, (mut r, mut ctx, token)) in members.into_iter().enumerate() {
            let progress = match &result {
                Ok(logits) => {
                    ctx.keys.push(token as super::prompt::PositionKey);
                    match logits.narrow(0, i, 1) {
                        Ok(row) => self.decoded(&mut r.gen, ctx, &row, &mut *r.sink),
                        Err(e) => Err(e.to_string()),
                    }
                }
                // The caches may be half-written: they are dropped.
                Err(e) => Err(e.to_string()),
            };
            let last = match progress {
                Ok(Progress::Running) => {
                    self.running.push(r);
                    continue;
                }
                Ok(Progress::Finished(finish, usage)) => BackendEvent::Done { finish, usage: Some(usage) },
                Err(e) => BackendEvent::Error(BackendError::Protocol(format!("embedded model: {e}"))),
            };
            (r.sink)(last);
        }
    }

    /// Advances the running generation at `i`; true when it finished (and was removed).
    fn advance_at(&mut self, i: usize) -> bool {
        let mut r = self.running.remove(i);
        let last = match self.advance(&mut r.gen, &mut *r.sink) {
            Ok(Progress::Running) => {
                self.running.insert(i, r);
                return false;
            }
            Ok(Progress::Finished(finish, usage)) => BackendEvent::Done { finish, usage: Some(usage) },
            Err(e) => BackendEvent::Error(BackendError::Protocol(format!("embedded model: {e}"))),
        };
        (r.sink)(last);
        true
    }

    /// Takes in one job.
    pub fn admit(&mut self, job: Job) {
        match job {
            Job::Generate { request, cancel, sink } => self.submit(request, cancel, sink),
            Job::OpenTurn { stream, base, signals } => {
                if let Err(e) = self.begin_turn(stream, &base, signals) {
                    tracing::warn!("streaming prefill off for this turn: {e}");
                }
            }
            Job::Turn { stream, command: TurnCommand::Audio(samples) } => {
                if let Some(turn) = self.open_turns.get_mut(&stream) {
                    turn.pending.extend(samples);
                }
            }
            Job::Turn { stream, command: TurnCommand::Retract } => {
                if let Err(e) = self.retract_turn(stream) {
                    tracing::warn!("retracting a turn: {e}");
                }
            }
            Job::Prepare { request } => {
                if let Err(e) = self.start_background(&request) {
                    tracing::warn!("background prefill skipped: {e}");
                }
            }
        }
    }

    /// The model thread's loop: takes in every job that has arrived, runs one unit,
    /// and sleeps on the channel only when there is nothing to do. Ends when every
    /// sender is gone and the work in hand is done.
    pub fn serve(mut self, rx: std_mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            if !self.has_work() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return,
                }
            }
            while open {
                match rx.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.step();
            self.kv_bytes.store(self.kv_bytes_held() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
