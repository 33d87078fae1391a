//! `server_vad` turn detection: VAD readings in, speech start/stop out.
//!
//! Same semantics as OpenAI's server VAD: speech starts at the first window whose
//! probability reaches `threshold`; it stops once the probability has stayed below
//! `threshold - 0.15` (Silero's hysteresis) for `silence_duration_ms`.

use crate::media::frame::{ms_to_samples, MODEL_SAMPLE_RATE};
use crate::media::VadReading;

/// Hysteresis below the threshold, as in Silero's reference wrapper.
const NEG_THRESHOLD_GAP: f32 = 0.15;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnParams {
    pub threshold: f32,
    pub silence_duration_ms: u32,
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
}

impl TurnDetector {
    pub fn new(params: TurnParams) -> Self {
        Self { params, state: State::Silent }
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
    }

    pub fn on_reading(&mut self, r: VadReading) -> Option<TurnEvent> {
        let neg = (self.params.threshold - NEG_THRESHOLD_GAP).max(0.01);
        match &mut self.state {
            State::Silent => {
                if r.probability >= self.params.threshold {
                    self.state = State::Speaking { start: r.start, last_voiced_end: r.end, silence_from: None };
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
                let needed = ms_to_samples(self.params.silence_duration_ms as u64, MODEL_SAMPLE_RATE);
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
        probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| d.on_reading(VadReading { start: i as u64 * 512, end: (i as u64 + 1) * 512, probability: p }))
            .collect()
    }

    #[test]
    fn start_and_stop_with_hysteresis() {
        let mut d = TurnDetector::new(TurnParams { threshold: 0.5, silence_duration_ms: 100 });
        // 100 ms = 1600 samples = 3.125 windows → the 4th quiet window ends the turn.
        let ev = feed(&mut d, &[0.1, 0.9, 0.4, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]);
        assert_eq!(ev, vec![TurnEvent::SpeechStarted { start: 512 }, TurnEvent::SpeechStopped { start: 512, end: 2048 }]);
        assert!(!d.is_speaking());
    }

    #[test]
    fn short_pause_does_not_end_the_turn() {
        let mut d = TurnDetector::new(TurnParams { threshold: 0.5, silence_duration_ms: 500 });
        let ev = feed(&mut d, &[0.9, 0.1, 0.1, 0.1, 0.9, 0.9]);
        assert_eq!(ev, vec![TurnEvent::SpeechStarted { start: 0 }]);
        assert!(d.is_speaking());
    }
}
