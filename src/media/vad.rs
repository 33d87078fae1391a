//! Voice activity: a speech probability for every 32 ms window of 16 kHz audio.
//!
//! [`SileroVad`] runs the Silero VAD ONNX model through ONNX Runtime (`ort`, loaded
//! dynamically from the library the `onnxruntime` wheel ships). [`EnergyVad`] is the
//! explicit fallback for machines without it: an RMS-level detector, chosen only by
//! configuration, never silently.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::session::Session;
use ort::value::TensorRef;
use thiserror::Error;

/// Samples per VAD window at 16 kHz (what Silero is trained on).
pub const VAD_WINDOW: usize = 512;
/// Silero's `sr` input.
static SAMPLE_RATE: [i64; 1] = [16_000];
/// Samples of the previous window Silero sees before each new one.
const SILERO_CONTEXT: usize = 64;

/// One VAD decision over `[start, end)` (16 kHz sample indices).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadReading {
    pub start: u64,
    pub end: u64,
    pub probability: f32,
}

#[derive(Debug, Error)]
pub enum VadError {
    #[error(
        "ONNX Runtime library not found at {0}. Run `scripts/setup` (it fetches it from the \
         `onnxruntime` wheel on PyPI), set ORT_DYLIB_PATH, or set audio.vad: energy in config.yaml"
    )]
    RuntimeMissing(PathBuf),
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error(
        "Silero VAD model not found at {0}. Run `scripts/setup` (it fetches it from the \
         `silero-vad` wheel on PyPI) or set audio.silero_model in config.yaml"
    )]
    ModelMissing(PathBuf),
    #[error("cannot load Silero VAD model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    #[error("VAD inference failed: {0}")]
    Inference(String),
}

/// Anything that scores 512-sample windows.
pub trait VoiceDetector: Send {
    /// Probability that `window` (exactly [`VAD_WINDOW`] samples) holds speech.
    fn probability(&mut self, window: &[f32]) -> Result<f32, VadError>;
    /// Forgets the stream's history.
    fn reset(&mut self);
}

/// The process-wide ONNX Runtime: the shared library can be loaded once per process.
static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment (VAD, speech and wake-word models share it).
pub fn ort_environment(library: &Path) -> Result<&'static ort::environment::Environment, VadError> {
    let env = ORT_ENV.get_or_init(|| {
        if !library.exists() {
            return Err(format!("missing:{}", library.display()));
        }
        ort::init_from(library)
            .map_err(|e| e.to_string())?
            .with_name("hark")
            .build()
            .map_err(|e| e.to_string())
    });
    match env {
        Ok(env) => Ok(env),
        Err(e) if e.starts_with("missing:") => Err(VadError::RuntimeMissing(library.to_path_buf())),
        Err(e) => Err(VadError::RuntimeLoad { path: library.to_path_buf(), reason: e.clone() }),
    }
}

/// The loaded Silero model; cheap to share, makes one detector per stream.
#[derive(Clone)]
pub struct SileroModel {
    bytes: Arc<Vec<u8>>,
    env: &'static ort::environment::Environment,
}

impl SileroModel {
    pub fn load(onnxruntime_library: &Path, model: &Path) -> Result<Self, VadError> {
        if !model.exists() {
            return Err(VadError::ModelMissing(model.to_path_buf()));
        }
        let env = ort_environment(onnxruntime_library)?;
        let bytes = std::fs::read(model).map_err(|e| VadError::ModelLoad { path: model.into(), reason: e.to_string() })?;
        let this = Self { bytes: Arc::new(bytes), env };
        // Fail now, at startup, rather than in the first session.
        this.detector().map_err(|e| VadError::ModelLoad { path: model.into(), reason: e.to_string() })?;
        Ok(this)
    }

    pub fn detector(&self) -> Result<SileroVad, VadError> {
        let session = Session::builder(self.env)
            .and_then(|b| Ok(b.with_intra_threads(1)?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|mut b| b.commit_from_memory(&self.bytes))
            .map_err(|e| VadError::Inference(e.to_string()))?;
        Ok(SileroVad { session, state: vec![0.0; 2 * 128], context: vec![0.0; SILERO_CONTEXT], input: Vec::with_capacity(SILERO_CONTEXT + VAD_WINDOW) })
    }
}

/// Silero VAD v5/v6 for one stream (it carries a recurrent state).
pub struct SileroVad {
    session: Session,
    state: Vec<f32>,
    context: Vec<f32>,
    input: Vec<f32>,
}

impl VoiceDetector for SileroVad {
    fn probability(&mut self, window: &[f32]) -> Result<f32, VadError> {
        debug_assert_eq!(window.len(), VAD_WINDOW);
        self.input.clear();
        self.input.extend_from_slice(&self.context);
        self.input.extend_from_slice(window);
        let err = |e: ort::Error| VadError::Inference(e.to_string());
        // Views over our own buffers: no allocation per window on the audio path.
        let input = TensorRef::from_array_view(([1usize, SILERO_CONTEXT + VAD_WINDOW], self.input.as_slice())).map_err(err)?;
        let state = TensorRef::from_array_view(([2usize, 1, 128], self.state.as_slice())).map_err(err)?;
        let sr = TensorRef::from_array_view(((), &SAMPLE_RATE[..])).map_err(err)?;
        let outputs = self
            .session
            .run(ort::inputs!["input" => input, "state" => state, "sr" => sr])
            .map_err(err)?;
        let (_, prob) = outputs["output"].try_extract_tensor::<f32>().map_err(err)?;
        let probability = prob.first().copied().unwrap_or(0.0);
        let (_, new_state) = outputs["stateN"].try_extract_tensor::<f32>().map_err(err)?;
        self.state.copy_from_slice(new_state);
        self.context.copy_from_slice(&window[VAD_WINDOW - SILERO_CONTEXT..]);
        Ok(probability)
    }

    fn reset(&mut self) {
        self.state.iter_mut().for_each(|s| *s = 0.0);
        self.context.iter_mut().for_each(|s| *s = 0.0);
    }
}

/// RMS-level detector: maps -50 dBFS..-30 dBFS onto probability 0..1.
#[derive(Debug, Clone)]
pub struct EnergyVad {
    pub floor_db: f32,
    pub full_db: f32,
}

impl Default for EnergyVad {
    fn default() -> Self {
        Self { floor_db: -50.0, full_db: -30.0 }
    }
}

impl VoiceDetector for EnergyVad {
    fn probability(&mut self, window: &[f32]) -> Result<f32, VadError> {
        let mean_sq = window.iter().map(|s| s * s).sum::<f32>() / window.len().max(1) as f32;
        let db = 10.0 * mean_sq.max(1e-12).log10();
        Ok(((db - self.floor_db) / (self.full_db - self.floor_db)).clamp(0.0, 1.0))
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_vad_separates_silence_and_tone() {
        let mut v = EnergyVad::default();
        assert_eq!(v.probability(&[0.0; VAD_WINDOW]).unwrap(), 0.0);
        let tone: Vec<f32> = (0..VAD_WINDOW).map(|i| (i as f32 * 0.2).sin() * 0.3).collect();
        assert_eq!(v.probability(&tone).unwrap(), 1.0);
    }

    #[test]
    fn missing_files_say_how_to_get_them() {
        let e = SileroModel::load(Path::new("/nonexistent/libonnxruntime.so"), Path::new("/nonexistent/silero.onnx"));
        let msg = e.err().unwrap().to_string();
        assert!(msg.contains("scripts/setup"), "{msg}");
    }
}
