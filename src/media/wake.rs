//! Wake word: a score in [0, 1] for every 80 ms of 16 kHz audio, openWakeWord's way.
//!
//! Three ONNX models through ONNX Runtime (`ort`), as openWakeWord 0.4.0 runs them
//! (`openwakeword/utils.py` `AudioFeatures`, `model.py` `Model.predict`):
//! 1280 samples (int16 scale) plus the 480 before them → `melspectrogram.onnx` → 8 mel
//! frames × 32 bins, transformed `x / 10 + 2`; the last 76 frames → `embedding_model.onnx`
//! → one 96-d embedding; the last 16 embeddings → the wake model (e.g.
//! `hey_jarvis_v0.1.onnx`) → the score.
//!
//! openWakeWord's code is Apache-2.0; its pretrained models are CC BY-NC-SA 4.0
//! (non-commercial use only), which is why the wake word is opt-in.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::session::Session;
use ort::value::TensorRef;
use thiserror::Error;

use crate::media::vad::{ort_environment, VadError};

/// Samples per wake-word step at 16 kHz (80 ms): one embedding and one score each.
pub const WAKE_CHUNK: usize = 1280;
/// The melspectrogram model's window reaches this far back: with it, 1280 new samples
/// give exactly 8 new frames.
const MEL_CONTEXT: usize = 480;
const MEL_BINS: usize = 32;
/// Mel frames per embedding (~775 ms).
const MEL_WINDOW: usize = 76;
const EMBEDDING: usize = 96;
/// Embeddings per wake-model input (1.28 s).
const EMBEDDINGS: usize = 16;
/// openWakeWord reports 0 for the first 5 scores: the buffers still hold start-up filler.
const WARMUP_STEPS: u64 = 5;

#[derive(Debug, Error)]
pub enum WakeError {
    #[error("{0}")]
    Runtime(#[from] VadError),
    #[error(
        "wake-word model not found at {0}. Run `scripts/setup` (it fetches openWakeWord's models from the \
         `openwakeword` wheel on PyPI) or set audio.wake_word in config.yaml"
    )]
    ModelMissing(PathBuf),
    #[error("cannot load wake-word model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    #[error("wake-word inference failed: {0}")]
    Inference(String),
}

/// Where the three models are.
#[derive(Debug, Clone)]
pub struct WakeModelPaths {
    pub melspectrogram: PathBuf,
    pub embedding: PathBuf,
    /// The wake phrase's own model, e.g. `hey_jarvis_v0.1.onnx`.
    pub model: PathBuf,
}

/// The loaded models; cheap to share, makes one detector per stream.
#[derive(Clone)]
pub struct WakeModel {
    mel: Arc<Vec<u8>>,
    embedding: Arc<Vec<u8>>,
    wake: Arc<Vec<u8>>,
    env: &'static ort::environment::Environment,
}

fn read(path: &Path) -> Result<Vec<u8>, WakeError> {
    if !path.exists() {
        return Err(WakeError::ModelMissing(path.to_path_buf()));
    }
    std::fs::read(path).map_err(|e| WakeError::ModelLoad { path: path.into(), reason: e.to_string() })
}

impl WakeModel {
    pub fn load(onnxruntime_library: &Path, paths: &WakeModelPaths) -> Result<Self, WakeError> {
        let (mel, embedding, wake) = (read(&paths.melspectrogram)?, read(&paths.embedding)?, read(&paths.model)?);
        let env = ort_environment(onnxruntime_library)?;
        let this = Self { mel: Arc::new(mel), embedding: Arc::new(embedding), wake: Arc::new(wake), env };
        // Fail now, at startup, rather than in the session; the detector also runs all
        // three models once (its start-up filler), so shapes are checked here too.
        this.detector().map_err(|e| WakeError::ModelLoad { path: paths.model.clone(), reason: e.to_string() })?;
        Ok(this)
    }

    fn session(&self, bytes: &[u8]) -> Result<Session, WakeError> {
        Session::builder(self.env)
            .and_then(|b| Ok(b.with_intra_threads(1)?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|mut b| b.commit_from_memory(bytes))
            .map_err(|e| WakeError::Inference(e.to_string()))
    }

    pub fn detector(&self) -> Result<WakeDetector, WakeError> {
        let mut d = WakeDetector {
            mel_session: self.session(&self.mel)?,
            embedding_session: self.session(&self.embedding)?,
            wake_session: self.session(&self.wake)?,
            pending: Vec::with_capacity(WAKE_CHUNK),
            window: Vec::with_capacity(MEL_CONTEXT + WAKE_CHUNK),
            tail: vec![0.0; MEL_CONTEXT],
            mel: VecDeque::with_capacity(MEL_WINDOW + 8),
            embeddings: VecDeque::with_capacity(EMBEDDINGS + 1),
            flat: Vec::with_capacity(MEL_WINDOW * MEL_BINS),
            silence_embedding: Vec::new(),
            steps: 0,
        };
        d.silence_embedding = d.embed_silence()?;
        d.reset();
        Ok(d)
    }
}

/// openWakeWord for one stream.
pub struct WakeDetector {
    mel_session: Session,
    embedding_session: Session,
    wake_session: Session,
    /// New samples (int16 scale) not yet a whole step.
    pending: Vec<f32>,
    window: Vec<f32>,
    /// The last [`MEL_CONTEXT`] samples of the previous step.
    tail: Vec<f32>,
    mel: VecDeque<[f32; MEL_BINS]>,
    embeddings: VecDeque<[f32; EMBEDDING]>,
    flat: Vec<f32>,
    /// What openWakeWord fills its embedding history with at start: 10 s of silence.
    silence_embedding: Vec<f32>,
    steps: u64,
}

impl WakeDetector {
    /// Feeds 16 kHz mono samples (±1, any count); returns the highest score of the 80 ms
    /// steps this completed, if it completed any.
    pub fn push(&mut self, samples: &[f32]) -> Result<Option<f32>, WakeError> {
        let mut best: Option<f32> = None;
        for &s in samples {
            // The models were trained on int16 PCM cast to float.
            self.pending.push((s * 32768.0).round().clamp(-32768.0, 32767.0));
            if self.pending.len() == WAKE_CHUNK {
                let score = self.step()?;
                self.pending.clear();
                best = Some(best.map_or(score, |b| b.max(score)));
            }
        }
        Ok(best)
    }

    /// Forgets the stream's history (as a new detector would start).
    pub fn reset(&mut self) {
        self.pending.clear();
        self.tail.iter_mut().for_each(|s| *s = 0.0);
        self.mel.clear();
        // openWakeWord starts its mel buffer with ones and its embeddings with silence.
        self.mel.extend(std::iter::repeat_n([1.0; MEL_BINS], MEL_WINDOW));
        self.embeddings.clear();
        let mut e = [0.0; EMBEDDING];
        e.copy_from_slice(&self.silence_embedding);
        self.embeddings.extend(std::iter::repeat_n(e, EMBEDDINGS));
        self.steps = 0;
    }

    fn step(&mut self) -> Result<f32, WakeError> {
        self.window.clear();
        self.window.extend_from_slice(&self.tail);
        self.window.extend_from_slice(&self.pending);
        self.tail.copy_from_slice(&self.pending[WAKE_CHUNK - MEL_CONTEXT..]);
        let frames = mel_frames(&mut self.mel_session, &self.window)?;
        for f in frames.chunks_exact(MEL_BINS) {
            let mut row = [0.0; MEL_BINS];
            row.copy_from_slice(f);
            self.mel.push_back(row);
        }
        while self.mel.len() > MEL_WINDOW {
            self.mel.pop_front();
        }
        self.flat.clear();
        self.flat.extend(self.mel.iter().flatten());
        let embedding = embed(&mut self.embedding_session, &self.flat)?;
        let mut e = [0.0; EMBEDDING];
        e.copy_from_slice(&embedding);
        self.embeddings.push_back(e);
        while self.embeddings.len() > EMBEDDINGS {
            self.embeddings.pop_front();
        }
        self.flat.clear();
        self.flat.extend(self.embeddings.iter().flatten());
        let err = |e: ort::Error| WakeError::Inference(e.to_string());
        let input = TensorRef::from_array_view(([1usize, EMBEDDINGS, EMBEDDING], self.flat.as_slice())).map_err(err)?;
        let outputs = self.wake_session.run(ort::inputs![input]).map_err(err)?;
        let (_, score) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
        let score = score.first().copied().unwrap_or(0.0);
        self.steps += 1;
        Ok(if self.steps <= WARMUP_STEPS { 0.0 } else { score })
    }

    /// The embedding of silence: what openWakeWord's feature history starts with.
    fn embed_silence(&mut self) -> Result<Vec<f32>, WakeError> {
        // 12,640 samples give exactly 76 mel frames.
        let frames = mel_frames(&mut self.mel_session, &vec![0.0; (MEL_WINDOW + 3) * 160])?;
        if frames.len() < MEL_WINDOW * MEL_BINS {
            return Err(WakeError::Inference(format!("the melspectrogram model gave {} values for 79 frames' audio", frames.len())));
        }
        embed(&mut self.embedding_session, &frames[frames.len() - MEL_WINDOW * MEL_BINS..])
    }
}

/// Mel frames (row-major, 32 bins each), with openWakeWord's `x / 10 + 2`.
fn mel_frames(session: &mut Session, audio: &[f32]) -> Result<Vec<f32>, WakeError> {
    let err = |e: ort::Error| WakeError::Inference(e.to_string());
    let input = TensorRef::from_array_view(([1usize, audio.len()], audio)).map_err(err)?;
    let outputs = session.run(ort::inputs![input]).map_err(err)?;
    let (_, mel) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
    if mel.len() % MEL_BINS != 0 {
        return Err(WakeError::Inference(format!("melspectrogram output of {} values is not frames of {MEL_BINS}", mel.len())));
    }
    Ok(mel.iter().map(|x| x / 10.0 + 2.0).collect())
}

/// One 96-d embedding of 76 mel frames.
fn embed(session: &mut Session, frames: &[f32]) -> Result<Vec<f32>, WakeError> {
    let err = |e: ort::Error| WakeError::Inference(e.to_string());
    let input = TensorRef::from_array_view(([1usize, MEL_WINDOW, MEL_BINS, 1], frames)).map_err(err)?;
    let outputs = session.run(ort::inputs![input]).map_err(err)?;
    let (_, e) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
    if e.len() != EMBEDDING {
        return Err(WakeError::Inference(format!("the embedding model gave {} values, not {EMBEDDING}", e.len())));
    }
    Ok(e.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_say_how_to_get_them() {
        let paths = WakeModelPaths {
            melspectrogram: "/nonexistent/mel.onnx".into(),
            embedding: "/nonexistent/emb.onnx".into(),
            model: "/nonexistent/hey.onnx".into(),
        };
        let msg = WakeModel::load(Path::new("/nonexistent/libonnxruntime.so"), &paths).err().unwrap().to_string();
        assert!(msg.contains("scripts/setup"), "{msg}");
    }
}
