//! The input audio path of a session: the buffer of 16 kHz samples not yet
//! committed, turn detection events (speech started/stopped, idle timeout), commits,
//! and the user's turn streamed into the model while they speak.

use std::sync::Arc;

use base64::Engine;

use super::conversation::{ConversationItem, Payload};
use super::response::CancelReason;
use super::turn::{TurnDetector, TurnEvent};
use super::{Session, MIN_COMMIT_MS, TURN_TAIL_MS};
use crate::media::pcm;
use crate::media::frame::{ms_to_samples, samples_to_ms, MODEL_SAMPLE_RATE};
use crate::media::AudioPipeline;
use crate::model::TurnStream;
use crate::protocol::{new_id, ContentPart, Item, ItemStatus, ProtocolError, ResponseParams, Role, ServerEvent, MAX_APPEND_BYTES};

/// The session's input audio buffer: 16 kHz samples not yet committed, at wire precision.
#[derive(Debug, Default)]
pub(super) struct InputBuffer {
    pub(super) samples: Vec<i16>,
    /// Stream index (16 kHz) of `samples[0]`.
    pub(super) start: u64,
}

impl InputBuffer {
    pub(super) fn end(&self) -> u64 {
        self.start + self.samples.len() as u64
    }

    /// Samples in `[from, to)`, clipped to what is held.
    pub(super) fn range(&self, from: u64, to: u64) -> Vec<i16> {
        let a = from.clamp(self.start, self.end()) - self.start;
        let b = to.clamp(self.start, self.end()) - self.start;
        self.samples[a as usize..b as usize].to_vec()
    }

    /// Forgets everything before `at`.
    pub(super) fn drop_before(&mut self, at: u64) {
        let n = (at.clamp(self.start, self.end()) - self.start) as usize;
        if n > 0 {
            self.samples.drain(..n);
            self.start += n as u64;
        }
    }
}

pub(super) struct PendingSpeech {
    pub(super) item_id: String,
}

/// The user's turn, streaming into the model while they speak.
pub(super) struct StreamingTurn {
    pub(super) stream: TurnStream,
    /// Stream position (16 kHz) up to which audio has been sent.
    pub(super) sent_to: u64,
}

impl Session {
    /// The model's end-of-turn probability for the streamed turn (`semantic_vad`).
    pub(super) fn on_end_of_turn(&mut self, p: Option<f32>) {
        match (p, self.turn.as_mut()) {
            (Some(p), Some(turn)) => turn.set_end_of_turn(p),
            (Some(_), None) => {}
            // The backend let the turn go (its cache was reused elsewhere): stop streaming.
            (None, _) => self.streaming = None,
        }
    }

    /// Starts streaming the user's turn into the model from stream position `from`.
    pub(super) fn start_streaming(&mut self, from: u64) {
        self.retract_streaming();
        if !self.deps.streaming_prefill || self.response.is_some() {
            // A response still running (interrupt_response off) changes the context
            // before this turn is answered; the stream would not match.
            return;
        }
        let request = self.model_request(&ResponseParams::default());
        if let Some(stream) = self.deps.backend.open_turn(request) {
            self.streaming = Some(StreamingTurn { stream, sent_to: from });
            self.stream_turn_audio();
        }
    }

    /// Sends the audio buffered since the last call to the streamed turn.
    pub(super) fn stream_turn_audio(&mut self) {
        if let Some(st) = self.streaming.as_mut() {
            let end = self.buffer.end();
            if end > st.sent_to {
                // f32 from the 16-bit buffer: the committed clip converts the same way,
                // so the streamed frames match it in the model's cache.
                st.stream.push_audio(pcm::to_f32(&self.buffer.range(st.sent_to, end)));
                st.sent_to = end;
            }
        }
    }

    /// The streamed turn was not speech after all: the model forgets it.
    pub(super) fn retract_streaming(&mut self) {
        if let Some(st) = self.streaming.take() {
            st.stream.retract();
        }
    }

    /// A new pipeline for the current format, with a VAD when turn detection is on.
    /// Speech in progress ends here (`speech_stopped`, no commit).
    pub(super) fn rebuild_audio_path(&mut self) {
        if let Some(speech) = self.speech.take() {
            self.events.push(ServerEvent::InputAudioBufferSpeechStopped {
                audio_end_ms: samples_to_ms(self.stream_position(), MODEL_SAMPLE_RATE),
                item_id: speech.item_id,
            });
        }
        self.retract_streaming();
        self.release_held_frames();
        self.stream_base += self.pipeline.position();
        let vad = match &self.settings.turn_detection {
            None => None,
            Some(_) => match self.deps.vad.make() {
                Ok(v) => Some(v),
                Err(e) => {
                    self.events.push(ServerEvent::server_error("vad_unavailable", format!("Turn detection is off: {e}"), None));
                    self.settings.turn_detection = None;
                    None
                }
            },
        };
        self.turn = self.settings.turn_detection.as_ref().map(|td| TurnDetector::new(td.params()));
        let format = self.media_format.unwrap_or(self.settings.input_format);
        self.pipeline = AudioPipeline::new(format, vad).expect("supported rate");
        self.buffer = InputBuffer { samples: Vec::new(), start: self.stream_base };
        self.speech = None;
    }

    pub(super) fn append_audio(&mut self, audio_b64: &str) -> Result<(), ProtocolError> {
        if audio_b64.len() / 4 * 3 > MAX_APPEND_BYTES {
            let format = self.media_format.unwrap_or(self.settings.input_format);
            let bytes_per_sample = if matches!(format, crate::media::AudioFormat::Pcm16 { .. }) { 2 } else { 1 };
            self.deps.audio_drops.count("append_too_large", (audio_b64.len() / 4 * 3 / bytes_per_sample) as u64, format.sample_rate());
            return Err(ProtocolError::new(
                "audio_too_large",
                format!("input_audio_buffer.append carries at most {MAX_APPEND_BYTES} bytes of audio; split it into smaller appends."),
            )
            .param("audio"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(audio_b64)
            .map_err(|e| ProtocolError::new("invalid_base64", format!("'audio' is not valid base64: {e}.")).param("audio"))?;
        if self.media_format.is_some() {
            // The session's audio comes from a media track (WebRTC): appends would
            // interleave with it in one stream.
            return Err(ProtocolError::new(
                "invalid_audio",
                "This session's audio arrives on its WebRTC track; input_audio_buffer.append is not accepted.",
            )
            .param("audio"));
        }
        // At most what the buffer grows by (16-bit samples at 16 kHz; G.711 doubles).
        let rate = self.settings.input_format.sample_rate().max(1) as u64;
        let per_byte = if matches!(self.settings.input_format, crate::media::AudioFormat::Pcm16 { .. }) { 1 } else { 2 };
        self.make_buffer_room(bytes.len() as u64 * per_byte * MODEL_SAMPLE_RATE as u64 / rate + 64)?;
        let out = run_heavy(bytes.len(), || self.pipeline.push_bytes(&bytes)).map_err(|e| {
            ProtocolError::new(
                "invalid_audio",
                format!("Audio does not match the session's input format {}: {e}.", self.settings.input_format.name()),
            )
            .param("audio")
        })?;
        self.take_audio(out);
        Ok(())
    }

    /// Samples from a local source (the microphone), at the session's input rate.
    pub(super) fn append_samples(&mut self, samples: &[f32]) -> Result<(), ProtocolError> {
        let out = run_heavy(samples.len() * 2, || self.pipeline.push_samples(samples))
            .map_err(|e| ProtocolError::server("audio_pipeline", format!("local audio: {e}")))?;
        self.take_audio(out);
        Ok(())
    }

    /// Decoded audio from a media track (a WebRTC peer's Opus, mono at `rate` Hz): the
    /// same resample → VAD → turn detection path as appends. The first call (or a new
    /// rate) switches the session's input to the track; `input_audio_format` then no
    /// longer applies.
    pub(super) fn append_track_audio(&mut self, rate: u32, samples: &[f32]) {
        let format = crate::media::AudioFormat::Pcm16 { rate };
        if self.media_format != Some(format) {
            self.media_format = Some(format);
            self.rebuild_audio_path();
        }
        match self.pipeline.push_samples(samples) {
            Ok(out) => self.take_audio(out),
            Err(e) => self.events.push(ServerEvent::server_error("invalid_audio", format!("The audio track could not be processed: {e}"), None)),
        }
    }

    /// New 16 kHz audio and its VAD readings: buffer, turn events, streaming prefill.
    fn take_audio(&mut self, out: crate::media::PipelineOutput) {
        self.buffer.samples.extend(out.samples.iter().map(|&s| pcm::quantize(s)));
        for reading in out.vad {
            let Some(turn) = self.turn.as_mut() else { break };
            match turn.on_reading(offset(reading, self.stream_base)) {
                Some(TurnEvent::SpeechStarted { start }) => self.on_speech_started(start),
                Some(TurnEvent::SpeechStopped { start, end }) => self.on_speech_stopped(start, end),
                None => {}
            }
        }
        self.stream_turn_audio();
        self.check_idle_timeout();
        self.trim_buffer();
    }

    pub(super) fn stream_position(&self) -> u64 {
        self.stream_base + self.pipeline.position()
    }

    /// `idle_timeout_ms`: after that much audio without speech (and with no response
    /// running), the silence is committed and a response created, so the model can
    /// re-engage the user. Measured in audio time, so it follows the client's clock.
    pub(super) fn check_idle_timeout(&mut self) {
        let Some(timeout_ms) = self.settings.turn_detection.as_ref().and_then(|t| t.idle_timeout_ms) else { return };
        let pos = self.stream_position();
        if self.response.is_some() || self.turn.as_ref().is_some_and(|t| t.is_speaking()) {
            self.last_activity = pos;
            return;
        }
        if pos.saturating_sub(self.last_activity) < ms_to_samples(timeout_ms as u64, MODEL_SAMPLE_RATE) {
            return;
        }
        let item_id = new_id("item");
        self.events.push(ServerEvent::InputAudioBufferTimeoutTriggered {
            audio_start_ms: samples_to_ms(self.last_activity, MODEL_SAMPLE_RATE),
            audio_end_ms: samples_to_ms(pos, MODEL_SAMPLE_RATE),
            item_id: item_id.clone(),
        });
        self.last_activity = pos;
        let audio = std::mem::take(&mut self.buffer.samples);
        self.buffer.start += audio.len() as u64;
        let result = self.commit_audio(item_id, audio).and_then(|_| self.create_response(ResponseParams::default()));
        if let Err(e) = result {
            self.events.push(ServerEvent::from_protocol_error(e));
        }
    }

    pub(super) fn on_speech_started(&mut self, start: u64) {
        self.last_activity = self.stream_position();
        let item_id = new_id("item");
        self.events.push(ServerEvent::InputAudioBufferSpeechStarted {
            audio_start_ms: samples_to_ms(start, MODEL_SAMPLE_RATE),
            item_id: item_id.clone(),
        });
        self.speech = Some(PendingSpeech { item_id });
        let interrupt = self.settings.turn_detection.as_ref().is_some_and(|t| t.interrupt_response);
        if interrupt && self.response.is_some() {
            self.cancel_response(CancelReason::TurnDetected);
        }
        if interrupt {
            // The user speaks again before the tools were answered: that response is moot.
            self.deferred_response = None;
        }
        if interrupt {
            self.interrupt_calls();
        }
        let padding = self.settings.turn_detection.as_ref().map_or(0, |t| t.prefix_padding_ms as u64);
        self.start_streaming(start.saturating_sub(ms_to_samples(padding, MODEL_SAMPLE_RATE)));
    }

    pub(super) fn on_speech_stopped(&mut self, start: u64, end: u64) {
        self.last_activity = self.stream_position();
        let Some(td) = self.settings.turn_detection.clone() else { return };
        let item_id = self.speech.take().map(|s| s.item_id).unwrap_or_else(|| new_id("item"));
        self.events.push(ServerEvent::InputAudioBufferSpeechStopped {
            audio_end_ms: samples_to_ms(end, MODEL_SAMPLE_RATE),
            item_id: item_id.clone(),
        });
        let from = start.saturating_sub(ms_to_samples(td.prefix_padding_ms as u64, MODEL_SAMPLE_RATE));
        let to = end + ms_to_samples(TURN_TAIL_MS, MODEL_SAMPLE_RATE);
        if end.saturating_sub(start) < ms_to_samples(td.min_speech_ms as u64, MODEL_SAMPLE_RATE) {
            // Too short to be speech: retract the turn. Nothing is committed, and the
            // frames already streamed into the model leave its cache.
            self.retract_streaming();
            self.buffer.drop_before(to);
            self.release_held_frames();
            return;
        }
        // The streamed frames stay in the model's cache for the response below.
        self.streaming = None;
        let audio = self.buffer.range(from, to);
        self.buffer.drop_before(to);
        if let Err(e) = self.commit_audio(item_id, audio) {
            self.events.push(ServerEvent::from_protocol_error(e));
            return;
        }
        if td.create_response {
            if self.response.is_some() {
                // interrupt_response was off: the running response finishes first.
                return;
            }
            if let Err(e) = self.create_response(ResponseParams::default()) {
                self.events.push(ServerEvent::from_protocol_error(e));
            }
        }
    }

    /// Keeps the buffer bounded: while nobody speaks under VAD only the prefix padding
    /// is worth keeping; otherwise the configured cap applies.
    pub(super) fn trim_buffer(&mut self) {
        if let (Some(turn), Some(td)) = (&self.turn, &self.settings.turn_detection) {
            if !turn.is_speaking() {
                let keep = ms_to_samples(td.prefix_padding_ms as u64 + 100, MODEL_SAMPLE_RATE);
                let end = self.buffer.end();
                self.buffer.drop_before(end.saturating_sub(keep));
                return;
            }
        }
        let cap = self.deps.max_buffer_seconds as u64 * MODEL_SAMPLE_RATE as u64;
        if self.buffer.samples.len() as u64 > cap {
            let end = self.buffer.end();
            self.deps.audio_drops.count("input_buffer_full", self.buffer.samples.len() as u64 - cap, MODEL_SAMPLE_RATE);
            self.buffer.drop_before(end - cap);
            if !self.buffer_overflow_reported {
                self.buffer_overflow_reported = true;
                self.events.push(ServerEvent::from_protocol_error(ProtocolError::new(
                    "input_audio_buffer_full",
                    format!("The input audio buffer holds at most {} s; the oldest audio was dropped. Commit more often.", self.deps.max_buffer_seconds),
                )));
            }
        }
    }

    pub(super) fn commit_buffer(&mut self) -> Result<(), ProtocolError> {
        let out = self.pipeline.flush().map_err(|e| ProtocolError::new("invalid_audio", e.to_string()))?;
        if let Err(e) = self.pipeline.restart_resampler() {
            tracing::error!("resampler restart failed: {e}");
        }
        self.buffer.samples.extend(out.samples.iter().map(|&s| pcm::quantize(s)));
        let ms = samples_to_ms(self.buffer.samples.len() as u64, MODEL_SAMPLE_RATE);
        if ms < MIN_COMMIT_MS {
            return Err(ProtocolError::new(
                "input_audio_buffer_commit_empty",
                format!("Error committing input audio buffer: buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer only has {ms}ms of audio."),
            ));
        }
        let audio = std::mem::take(&mut self.buffer.samples);
        self.buffer.start += audio.len() as u64;
        if let Some(t) = self.turn.as_mut() {
            t.reset();
        }
        // The manual commit takes the whole buffer; any streamed frames that match it
        // are reused by the backend's prefix match.
        self.streaming = None;
        let item_id = self.speech.take().map(|s| s.item_id).unwrap_or_else(|| new_id("item"));
        self.commit_audio(item_id, audio)
    }

    /// Turns committed audio into a user message item.
    pub(super) fn commit_audio(&mut self, item_id: String, audio: Vec<i16>) -> Result<(), ProtocolError> {
        self.tool_rounds = 0;
        self.new_input();
        // Camera frames sampled during the turn follow its audio (see camera.rs).
        let (frame_parts, frame_payloads) = self.take_turn_frames();
        let item = Item::message(item_id.clone(), ItemStatus::Completed, Role::User, [vec![ContentPart::input_audio()], frame_parts].concat());
        let ci = ConversationItem::new(item.clone(), [vec![Payload::Audio(Arc::new(audio))], frame_payloads].concat());
        self.make_room(1, ci.bytes())?;
        let previous_item_id =
            self.conversation.insert(None, ci).map_err(|e| ProtocolError::server("duplicate_item_id", e.to_string()))?;
        self.events.push(ServerEvent::InputAudioBufferCommitted { previous_item_id: previous_item_id.clone(), item_id });
        self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
        self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
        Ok(())
    }
}

pub(super) fn offset(r: crate::media::VadReading, base: u64) -> crate::media::VadReading {
    crate::media::VadReading { start: r.start + base, end: r.end + base, probability: r.probability }
}

/// Decoding + resampling + VAD of one append runs on the session's task: ~0.2 ms per
/// 20 ms chunk. A very large append (up to 15 MiB, minutes of audio) would hold a
/// runtime worker for about a second, so above 1 MiB the worker is handed over to
/// blocking work while other tasks move to the remaining workers.
pub(super) fn run_heavy<T>(bytes: usize, f: impl FnOnce() -> T) -> T {
    if bytes > 1024 * 1024 {
        off_the_runtime(f)
    } else {
        f()
    }
}

/// Runs `f`, which computes for milliseconds, handing this runtime worker over to it
/// (other tasks move to the remaining workers); on a single-threaded runtime, where
/// that is impossible, just runs it.
pub(crate) fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

pub(super) async fn next_end_of_turn(streaming: &mut Option<StreamingTurn>) -> Option<f32> {
    match streaming {
        Some(st) => st.stream.end_of_turn.recv().await,
        None => std::future::pending().await,
    }
}
