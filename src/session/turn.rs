//! Turn detection: VAD readings in, speech start/stop out.
//!
//! `server_vad` has OpenAI's semantics: speech starts at the first window whose
//! probability reaches `threshold`; it stops once the probability has stayed below
//! `threshold - 0.15` (Silero's hysteresis) for `silence_duration_ms`.
//!
//! `semantic_vad` adds the model's own opinion: while the user's turn is prefilled into
//! the embedded model, each batch of frames yields the probability that the model would
//! close the turn there ([`TurnDetector::set_end_of_turn`]). The silence needed to end
//! the turn slides between the eagerness's shortest and longest wait with it: a speaker
//! who sounds finished is answered sooner, one pausing mid-sentence is given longer.
//! Without that signal (remote backends) the eagerness maps to a fixed silence.

use crate::media::frame::{ms_to_samples, MODEL_SAMPLE_RATE};
use crate::media::VadReading;

/// Hysteresis below the threshold, as in Silero's reference wrapper.
const NEG_THRESHOLD_GAP: f32 = 0.15;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnParams {
    pub threshold: f32,
    pub silence_duration_ms: u32,
    /// `semantic_vad`: the silence needed when the model is sure the turn is over
    /// (`.0`) and when it is sure it is not (`.1`).
    pub semantic_silence_ms: Option<(u32, u32)>,
}

impl TurnParams {
    pub fn server_vad(threshold: f32, silence_duration_ms: u32) -> Self {
        Self { threshold, silence_duration_ms, semantic_silence_ms: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent {
    /// Speech began at this 16 kHz sample.
    SpeechStarted { start: u64 },
    /// Speech ended at this 16 kHz sample (end of the last voiced window).
    SpeechStopped { start: u64, end: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Silent,
    Speaking { start: u64, last_voiced_end: u64, silence_from: Option<u64> },
}

#[derive(Debug, Clone)]
pub struct TurnDetector {
    params: TurnParams,
    state: State,
    /// The model's latest probability that the user's turn is over.
    end_of_turn: Option<f32>,
}

impl TurnDetector {
    pub fn new(params: TurnParams) -> Self {
        Self { params, state: State::Silent, end_of_turn: None }
    }

    /// The model's probability that the user's turn ends here (`semantic_vad`).
    pub fn set_end_of_turn(&mut self, p: f32) {
        self.end_of_turn = Some(p.clamp(0.0, 1.0));
    }

    /// Silence that ends the current turn, in ms.
    pub fn silence_needed_ms(&self) -> u32 {
        match (self.params.semantic_silence_ms, self.end_of_turn) {
            (Some((short, long)), Some(p)) => (long as f32 - p * (long as f32 - short as f32)).round() as u32,
            _ => self.params.silence_duration_ms,
        }
    }

    pub fn params(&self) -> TurnParams {
        self.params
    }

    pub fn set_params(&mut self, params: TurnParams) {
        self.params = params;
    }

    pub fn is_speaking(&self) -> bool {
        matches!(self.state, State::Speaking { .. })
    }

    /// Drops an unfinished turn (buffer cleared, session reconfigured).
    pub fn reset(&mut self) {
        self.state = State::Silent;
        self.end_of_turn = None;
    }

    pub fn on_reading(&mut self, r: VadReading) -> Option<TurnEvent> {
        let neg = (self.params.threshold - NEG_THRESHOLD_GAP).max(0.01);
        let silence_ms = self.silence_needed_ms();
        match &mut self.state {
            State::Silent => {
                if r.probability >= self.params.threshold {
                    self.state = State::Speaking { start: r.start, last_voiced_end: r.end, silence_from: None };
                    self.end_of_turn = None;
                    return Some(TurnEvent::SpeechStarted { start: r.start });
                }
                None
            }
            State::Speaking { start, last_voiced_end, silence_from } => {
                if r.probability >= neg {
                    *last_voiced_end = r.end;
                    *silence_from = None;
                    return None;
                }
                let from = *silence_from.get_or_insert(r.start);
                let needed = ms_to_samples(silence_ms as u64, MODEL_SAMPLE_RATE);
                if r.end - from >= needed {
                    let ev = TurnEvent::SpeechStopped { start: *start, end: *last_voiced_end };
                    self.state = State::Silent;
                    return Some(ev);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut TurnDetector, probs: &[f32]) -> Vec<TurnEvent> {
        feed_from(d, 0, probs)
    }

    /// Feeds 512-sample windows, the first one being window number `first`.
    fn feed_from(d: &mut TurnDetector, first: u64, probs: &[f32]) -> Vec<TurnEvent> {
        probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| {
                let i = first + i as u64;
                d.on_reading(VadReading { start: i * 512, end: (i + 1) * 512, probability: p })
            })
            .collect()
    }

    #[test]
    fn start_and_stop_with_hysteresis() {
        let mut d = TurnDetector::new(TurnParams::server_vad(0.5, 100));
        // 100 ms = 1600 samples = 3.125 windows → the 4th quiet window ends the turn.
        let ev = feed(&mut d, &[0.1, 0.9, 0.4, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]);
        assert_eq!(ev, vec![TurnEvent::SpeechStarted { start: 512 }, TurnEvent::SpeechStopped { start: 512, end: 2048 }]);
        assert!(!d.is_speaking());
    }

    #[test]
    fn short_pause_does_not_end_the_turn() {
        let mut d = TurnDetector::new(TurnParams::server_vad(0.5, 500));
        let ev = feed(&mut d, &[0.9, 0.1, 0.1, 0.1, 0.9, 0.9]);
        assert_eq!(ev, vec![TurnEvent::SpeechStarted { start: 0 }]);
        assert!(d.is_speaking());
    }

    #[test]
    fn semantic_silence_follows_the_models_end_of_turn_probability() {
        let mut d = TurnDetector::new(TurnParams { threshold: 0.5, silence_duration_ms: 700, semantic_silence_ms: Some((200, 2000)) });
        assert_eq!(d.silence_needed_ms(), 700, "no signal yet: the eagerness's fixed silence");
        d.set_end_of_turn(1.0);
        assert_eq!(d.silence_needed_ms(), 200);
        d.set_end_of_turn(0.0);
        assert_eq!(d.silence_needed_ms(), 2000);
        d.set_end_of_turn(0.5);
        assert_eq!(d.silence_needed_ms(), 1100);
        // Speech start resets the signal (a new turn): 8 quiet windows (256 ms) are
        // far from the fixed 700 ms.
        let ev = feed(&mut d, &[0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]);
        assert_eq!(ev, vec![TurnEvent::SpeechStarted { start: 0 }]);
        // The model is sure the speaker is done: 200 ms of silence is enough.
        d.set_end_of_turn(1.0);
        let ev = feed_from(&mut d, 10, &[0.1]);
        assert_eq!(ev, vec![TurnEvent::SpeechStopped { start: 0, end: 1024 }]);
    }
}
