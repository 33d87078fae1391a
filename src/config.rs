//! `config.yaml`: the daemon's settings, with `HARK_SECTION__KEY` environment overrides.
//!
//! Every key is documented in the shipped `config.yaml`. Unknown keys are errors (a typo
//! should never silently fall back to a default), and every error names the file, the
//! line and the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Parse { path: String, line: usize, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("environment override {var}: {message}")]
    Env { var: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub backend: BackendConfig,
    pub audio: AudioConfig,
    /// Speech out: the engine that voices replies for clients that ask for audio.
    pub speech: SpeechConfig,
    pub session: SessionDefaults,
    pub webrtc: WebRtcConfig,
    pub agents_dir: PathBuf,
    pub tools_dir: PathBuf,
    pub log: LogConfig,
    /// Where the file was read from; relative paths in it are resolved against its folder.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Keys clients must present (`Authorization: Bearer KEY` or the
    /// `openai-insecure-api-key.KEY` subprotocol). Empty: no authentication.
    pub api_keys: Vec<String>,
    /// Web page origins (`scheme://host[:port]`) allowed to use hark besides its own
    /// page and pages served over loopback; `"*"` allows any. Requests without an
    /// `Origin` header (programs, not browsers) are not affected.
    pub allowed_origins: Vec<String>,
    /// Sessions served at once; more are refused (HTTP 503). `auto` (`None`): 64 on a
    /// remote backend; on the embedded one, as many as `backend.embedded.kv_budget_mb`
    /// keeps cached at 8K tokens of context, 1 to 64 (see [`crate::check::auto_max_sessions`]).
    #[serde(deserialize_with = "auto_or_count")]
    pub max_sessions: Option<usize>,
    /// Largest WebSocket message accepted from a client, in bytes.
    pub max_message_bytes: usize,
    /// Largest HTTP request body accepted (chat completions with audio and images).
    pub max_request_bytes: usize,
    /// A realtime client that reads nothing for this long while hark has events for it
    /// is disconnected (close code 1008) and its response cancelled.
    pub client_read_timeout_ms: u64,
    /// How long open sessions get to finish when the daemon stops.
    pub shutdown_grace_ms: u64,
    /// Bytes all sessions together may hold (conversation media, input buffers, queued
    /// messages both ways); data arriving past it is refused with `server_memory_exceeded`.
    pub max_total_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub kind: BackendKind,
    pub embedded: EmbeddedBackendConfig,
    pub openai: OpenAiBackendConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Gemma 4 in-process (candle).
    Embedded,
    /// Any OpenAI-compatible chat-completions server.
    Openai,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBackendConfig {
    /// A `gemma4_unified` checkpoint folder (config.json, *.safetensors, tokenizer.json).
    pub checkpoint: PathBuf,
    /// `cpu` or `cuda` (`cuda:N` for another GPU; needs a build with `--features cuda`).
    pub device: String,
    /// Weight and activation type: `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Defaults for responses that set none.
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
    /// Sessions whose KV caches are kept for reuse across turns.
    pub cached_sessions: usize,
    /// Bytes (MiB) the kept KV caches may hold, those of running responses included;
    /// idle sessions' caches are evicted least recently used first beyond it.
    pub kv_budget_mb: usize,
    /// Tokens per image: 70, 140, 280, 560 or 1120 (one per 48×48 patch).
    pub image_tokens: usize,
}

impl Default for EmbeddedBackendConfig {
    fn default() -> Self {
        Self {
            checkpoint: "models/gemma-4-12b-it".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            max_tokens: 512,
            temperature: 0.7,
            top_k: Some(64),
            top_p: Some(0.95),
            seed: 0,
            cached_sessions: 4,
            kv_budget_mb: 4096,
            image_tokens: 280,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiBackendConfig {
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` when non-empty. `${ENV:NAME}` reads a variable.
    pub api_key: String,
    pub model: String,
    /// How user audio is sent: `input_audio` (OpenAI, llama.cpp, vLLM) or `audio_url` (data URI).
    pub audio_part: AudioPartStyle,
    pub connect_timeout_ms: u64,
    /// Time allowed until the first streamed byte.
    pub first_token_timeout_ms: u64,
    /// Longest gap between two streamed chunks.
    pub idle_timeout_ms: u64,
    pub max_tokens: u32,
    pub temperature: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioPartStyle {
    InputAudio,
    AudioUrl,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    pub vad: VadKind,
    /// ONNX Runtime shared library; `ORT_DYLIB_PATH` takes precedence when set.
    pub onnxruntime_library: PathBuf,
    pub silero_model: PathBuf,
    /// Cap on audio held in one session's input buffer.
    pub max_buffer_seconds: u32,
    /// `none` (clients bring audio) or `mic`: `hark serve` also runs one always-on local
    /// session on the microphone, which clients can attach to (`/v1/realtime?session=local`).
    pub input: AudioInputKind,
    pub mic: MicConfig,
    /// `none`, or `speaker`: the local session speaks its replies on the output device.
    pub output: AudioOutputKind,
    pub speaker: SpeakerConfig,
    /// With both mic and speaker: `aec` (echo cancellation; the user can talk over the
    /// assistant), `half_duplex` (the microphone is ignored while it speaks) or `off`.
    pub echo_cancellation: EchoCancellation,
    /// What the local session answers: `always` (every turn), `wake_word` (only the
    /// turn after the wake phrase; `audio.wake_word`) or `manual` (no turn detection:
    /// an attached client commits the buffered audio, push-to-talk).
    pub activation: Activation,
    pub wake_word: WakeWordConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Always,
    WakeWord,
    Manual,
}

/// openWakeWord's models (code Apache-2.0; pretrained models CC BY-NC-SA 4.0).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeWordConfig {
    /// The wake phrase's model, e.g. `vendor/hey_jarvis_v0.1.onnx`.
    pub model: PathBuf,
    pub melspectrogram: PathBuf,
    pub embedding: PathBuf,
    /// Score (0..1) at which the phrase counts as said.
    pub threshold: f32,
    /// After the wake phrase, how long to wait for speech before going back to waiting.
    pub listen_ms: u64,
}

impl Default for WakeWordConfig {
    fn default() -> Self {
        Self {
            model: "vendor/hey_jarvis_v0.1.onnx".into(),
            melspectrogram: "vendor/oww_melspectrogram.onnx".into(),
            embedding: "vendor/oww_embedding_model.onnx".into(),
            threshold: 0.5,
            listen_ms: 8_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EchoCancellation {
    Aec,
    HalfDuplex,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioOutputKind {
    None,
    Speaker,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeakerConfig {
    /// An output device's name or id as `hark devices` lists it; unset: the default output.
    pub device: Option<String>,
    /// Frames per playback callback (a power of two): barge-in stops within one.
    pub buffer_frames: u32,
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        Self { device: None, buffer_frames: 512 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioInputKind {
    None,
    Mic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicConfig {
    /// An input device's name as `hark devices` lists it; unset: the default input.
    pub device: Option<String>,
    /// Frames per capture callback: a power of two (small: low latency).
    pub buffer_frames: u32,
}

impl Default for MicConfig {
    fn default() -> Self {
        Self { device: None, buffer_frames: 256 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpeechConfig {
    /// `piper` (default: a Piper voice through ONNX Runtime), `command`, `http`, or `none`.
    pub engine: SpeechEngineKind,
    pub piper: PiperConfig,
    pub command: CommandSpeechConfig,
    pub http: HttpSpeechConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeechEngineKind {
    Piper,
    Command,
    Http,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiperConfig {
    /// The voice's `.onnx`; its `.onnx.json` is found beside it unless `config` is set.
    pub model: PathBuf,
    pub config: Option<PathBuf>,
    /// The espeak-ng program (run as a process for phonemes).
    pub espeak: PathBuf,
    /// Above 1 speaks slower, below 1 faster.
    pub length_scale: f32,
    /// ONNX Runtime threads per synthesis; 0 lets it choose.
    pub threads: usize,
}

impl Default for PiperConfig {
    fn default() -> Self {
        Self {
            model: "vendor/en_US-joe-medium.onnx".into(),
            config: None,
            espeak: "espeak-ng".into(),
            length_scale: 1.0,
            threads: 0,
        }
    }
}

/// How a `command` or `http` engine returns audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpeechOutputFormat {
    /// A WAV file (any rate; 16-bit PCM or 32-bit float).
    Wav,
    /// Raw 16-bit little-endian mono PCM at `sample_rate`.
    Pcm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandSpeechConfig {
    /// Program and arguments, no shell; the text arrives on stdin, audio leaves on stdout.
    pub argv: Vec<String>,
    pub format: SpeechOutputFormat,
    /// For `format: pcm`.
    pub sample_rate: u32,
    pub timeout_ms: u64,
}

impl Default for CommandSpeechConfig {
    fn default() -> Self {
        Self {
            argv: vec!["espeak-ng".into(), "--stdout".into(), "-v".into(), "en-us".into()],
            format: SpeechOutputFormat::Wav,
            sample_rate: 22_050,
            timeout_ms: 20_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSpeechConfig {
    /// An OpenAI-compatible server; hark posts to `{base_url}/audio/speech`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` when non-empty. `${ENV:NAME}` reads a variable.
    pub api_key: String,
    pub model: String,
    pub voice: String,
    /// `pcm` asks for OpenAI's raw 24 kHz 16-bit; `wav` for a WAV file.
    pub format: SpeechOutputFormat,
    /// For `format: pcm`.
    pub sample_rate: u32,
    pub timeout_ms: u64,
}

impl Default for HttpSpeechConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8880/v1".into(),
            api_key: String::new(),
            model: "tts-1".into(),
            voice: "alloy".into(),
            format: SpeechOutputFormat::Pcm,
            sample_rate: 24_000,
            timeout_ms: 30_000,
        }
    }
}

impl Default for SpeechConfig {
    fn default() -> Self {
        Self {
            engine: SpeechEngineKind::Piper,
            piper: PiperConfig::default(),
            command: CommandSpeechConfig::default(),
            http: HttpSpeechConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VadKind {
    Silero,
    /// RMS-energy detector: no model needed, much less robust to noise. Only when asked for.
    Energy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionDefaults {
    pub model: String,
    pub instructions: String,
    pub output_modalities: Vec<String>,
    pub turn_detection: Option<TurnDetectionConfig>,
    pub max_output_tokens: Option<u32>,
    pub temperature: f32,
    /// The rolling context window (see `src/context/`).
    pub context: ContextConfig,
    /// Prefill the user's audio into the embedded model while they speak, so the
    /// reply starts one decode step after end of speech.
    pub streaming_prefill: bool,
    /// The agent (from `agents_dir`) new sessions start with; none: no agent tools.
    pub agent: Option<String>,
    /// How long hark waits for a client to answer a call of a tool it declared.
    pub client_tool_timeout_ms: u64,
    /// What one session may hold (see `src/session/budget.rs`).
    pub limits: SessionLimits,
}

/// One session's memory, bounded in bytes where data arrives.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionLimits {
    /// Bytes one session may hold: conversation media and text, the input audio
    /// buffer, and messages queued in and out. The conversation rolls (oldest whole
    /// turns evicted) to stay within it; what still does not fit is refused with
    /// `session_memory_exceeded`.
    pub max_session_bytes: u64,
    /// Most items a conversation keeps; past it the oldest whole turns are evicted
    /// (down to the context's retention_ratio), announced with `conversation.item.deleted`.
    pub max_items: usize,
    /// An `input_image` larger than this is re-encoded (JPEG, at most the model's
    /// largest image size) once on arrival; the original is not kept.
    pub max_image_bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self { max_session_bytes: 256 << 20, max_items: 4096, max_image_bytes: 1 << 20 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Most prompt tokens a request carries; past it, the oldest whole turns are evicted.
    pub max_tokens: usize,
    /// An eviction cuts the prompt back to this fraction of `max_tokens`.
    pub retention_ratio: f32,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self { max_tokens: 262_144, retention_ratio: 0.8 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnDetectionConfig {
    #[serde(rename = "type", default = "server_vad")]
    pub kind: String,
    #[serde(default = "d_threshold")]
    pub threshold: f32,
    #[serde(default = "d_prefix")]
    pub prefix_padding_ms: u32,
    #[serde(default = "d_silence")]
    pub silence_duration_ms: u32,
    #[serde(default)]
    pub idle_timeout_ms: Option<u32>,
    #[serde(default = "d_true")]
    pub create_response: bool,
    #[serde(default = "d_true")]
    pub interrupt_response: bool,
    /// Voiced stretches shorter than this are noise (a click, a cough): the turn is
    /// retracted — nothing is committed and its streamed audio leaves the model's cache.
    #[serde(default = "d_min_speech")]
    pub min_speech_ms: u32,
}

fn d_min_speech() -> u32 {
    100
}

fn server_vad() -> String {
    "server_vad".into()
}
fn d_threshold() -> f32 {
    0.5
}
fn d_prefix() -> u32 {
    300
}
fn d_silence() -> u32 {
    500
}
fn d_true() -> bool {
    true
}

impl Default for TurnDetectionConfig {
    fn default() -> Self {
        Self {
            kind: server_vad(),
            threshold: d_threshold(),
            prefix_padding_ms: d_prefix(),
            silence_duration_ms: d_silence(),
            idle_timeout_ms: None,
            create_response: true,
            interrupt_response: true,
            min_speech_ms: d_min_speech(),
        }
    }
}

/// Browser sessions over WebRTC (`POST /v1/realtime/calls`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebRtcConfig {
    /// Local UDP addresses for ICE (`IP:PORT`, port 0 = any). Empty: follow
    /// `server.host` — loopback only when hark listens on loopback, otherwise every
    /// interface plus loopback. A wildcard (`0.0.0.0:0`) means every non-loopback
    /// interface, so loopback is listed separately.
    pub udp_addrs: Vec<String>,
    /// STUN/TURN servers for peers behind NAT. None by default: hark talks to browsers
    /// on its own host addresses and contacts no outside server.
    pub ice_servers: Vec<IceServerConfig>,
    /// Lifetime of an ephemeral key from `POST /v1/realtime/client_secrets`, seconds.
    pub client_secret_ttl_s: u64,
    /// A call whose peer has not connected this long after the answer is dropped.
    pub connect_timeout_ms: u64,
    /// A connected peer that has answered no ICE check this long has gone (tab killed,
    /// network lost): its call ends. Browsers send checks every few seconds.
    pub ice_failed_timeout_ms: u64,
    /// Camera frames sampled into the context per second while the user speaks.
    pub video_fps_speaking: f32,
    /// … and while nobody speaks.
    pub video_fps_idle: f32,
    /// Token budget of one camera frame (one token = one 48×48 patch).
    pub video_frame_tokens: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IceServerConfig {
    /// `stun:host:port` or `turn:host:port?transport=udp`.
    pub urls: Vec<String>,
    pub username: String,
    /// TURN password; `${ENV:NAME}` reads it from the environment.
    pub credential: String,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        Self {
            udp_addrs: Vec::new(),
            ice_servers: Vec::new(),
            client_secret_ttl_s: 600,
            connect_timeout_ms: 15_000,
            ice_failed_timeout_ms: 15_000,
            video_fps_speaking: 1.0,
            video_fps_idle: 0.2,
            video_frame_tokens: 70,
        }
    }
}

impl WebRtcConfig {
    /// The UDP addresses ICE binds, for a server listening on `host`.
    pub fn udp_addrs_for(&self, host: &str) -> Vec<String> {
        if !self.udp_addrs.is_empty() {
            return self.udp_addrs.clone();
        }
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if loopback {
            vec!["127.0.0.1:0".into()]
        } else {
            vec!["0.0.0.0:0".into(), "127.0.0.1:0".into()]
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `hark=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            backend: BackendConfig::default(),
            audio: AudioConfig::default(),
            speech: SpeechConfig::default(),
            session: SessionDefaults::default(),
            webrtc: WebRtcConfig::default(),
            agents_dir: "agents".into(),
            tools_dir: "tools".into(),
            log: LogConfig::default(),
            source: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into() }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8765,
            api_keys: Vec::new(),
            allowed_origins: Vec::new(),
            max_sessions: None,
            max_message_bytes: crate::protocol::MAX_CLIENT_MESSAGE_BYTES,
            max_request_bytes: 32 * 1024 * 1024,
            client_read_timeout_ms: 10_000,
            shutdown_grace_ms: 2000,
            max_total_bytes: 4 << 30,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self { kind: BackendKind::Embedded, embedded: EmbeddedBackendConfig::default(), openai: OpenAiBackendConfig::default() }
    }
}

impl Default for OpenAiBackendConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080/v1".into(),
            api_key: String::new(),
            model: "gemma-4-12b-it".into(),
            audio_part: AudioPartStyle::InputAudio,
            connect_timeout_ms: 5_000,
            first_token_timeout_ms: 60_000,
            idle_timeout_ms: 30_000,
            max_tokens: 1024,
            temperature: 0.7,
        }
    }
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            vad: VadKind::Silero,
            onnxruntime_library: "vendor/libonnxruntime.so".into(),
            silero_model: "vendor/silero_vad.onnx".into(),
            max_buffer_seconds: 900,
            input: AudioInputKind::None,
            mic: MicConfig::default(),
            output: AudioOutputKind::None,
            speaker: SpeakerConfig::default(),
            echo_cancellation: EchoCancellation::Aec,
            activation: Activation::Always,
            wake_word: WakeWordConfig::default(),
        }
    }
}

impl Default for SessionDefaults {
    fn default() -> Self {
        Self {
            model: "hark".into(),
            instructions: "You are hark, a helpful voice assistant. Answer briefly.".into(),
            output_modalities: vec!["text".into()],
            turn_detection: Some(TurnDetectionConfig::default()),
            max_output_tokens: None,
            temperature: 0.7,
            context: ContextConfig::default(),
            streaming_prefill: true,
            agent: None,
            client_tool_timeout_ms: 60_000,
            limits: SessionLimits::default(),
        }
    }
}

impl Config {
    /// Reads `path`, then applies `HARK_…` overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| is_override(k)).collect();
        let mut config = Self::from_yaml(&text, &path.display().to_string(), &env)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses YAML text; `origin` names it in errors. `env` holds `HARK_A__B=value` pairs.
    pub fn from_yaml(text: &str, origin: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        // Deserialize straight from the text first: that is what gives line numbers.
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(origin, &e))?
        };
        if env.is_empty() {
            config.validate(origin)?;
            return Ok(config);
        }
        let mut tree: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| yaml_error(origin, &e))?
        };
        let base = tree.clone();
        for (var, raw) in env {
            apply_override(&mut tree, var, raw)?;
        }
        let config: Config = match serde_yaml_ng::from_value(tree) {
            Ok(c) => c,
            Err(e) => {
                // Name the variable at fault: try each alone on the file's values.
                let culprit = env.iter().find(|(var, raw)| {
                    let mut t = base.clone();
                    apply_override(&mut t, var, raw).is_err() || serde_yaml_ng::from_value::<Config>(t).is_err()
                });
                let var = culprit.map(|(k, _)| k.clone()).unwrap_or_else(|| "HARK_*".into());
                return Err(ConfigError::Env { var, message: e.to_string() });
            }
        };
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |message: String| Err(ConfigError::Invalid { path: origin.to_string(), message });
        if self.server.host.parse::<std::net::IpAddr>().is_err() && self.server.host != "localhost" {
            return bad(format!("server.host: '{}' is not an IP address", self.server.host));
        }
        for o in &self.server.allowed_origins {
            if o != "*" && normalize_origin(o).is_none() {
                return bad(format!("server.allowed_origins: '{o}' is not an origin like https://app.example.com or http://localhost:3000"));
            }
        }
        if self.session.limits.max_items < 2 || self.session.limits.max_session_bytes < 1 << 20 {
            return bad("session.limits: max_items must be at least 2 and max_session_bytes at least 1 MiB".into());
        }
        if self.server.max_sessions == Some(0) {
            return bad("server.max_sessions: must be at least 1".into());
        }
        if !(self.backend.openai.base_url.starts_with("http://") || self.backend.openai.base_url.starts_with("https://")) {
            return bad(format!("backend.openai.base_url: '{}' must start with http:// or https://", self.backend.openai.base_url));
        }
        if let Some(td) = &self.session.turn_detection {
            if td.kind != "server_vad" && td.kind != "semantic_vad" {
                return bad(format!("session.turn_detection.type: '{}' must be server_vad or semantic_vad", td.kind));
            }
            if !(0.0..=1.0).contains(&td.threshold) {
                return bad(format!("session.turn_detection.threshold: {} must be within 0..1", td.threshold));
            }
        }
        for a in &self.webrtc.udp_addrs {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return bad(format!("webrtc.udp_addrs: '{a}' is not an address like 127.0.0.1:0 or 0.0.0.0:50000"));
            }
        }
        for s in &self.webrtc.ice_servers {
            if s.urls.is_empty() || s.urls.iter().any(|u| !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:"))) {
                return bad(format!("webrtc.ice_servers: urls {:?} must be stun:, turn: or turns: URLs", s.urls));
            }
        }
        if self.webrtc.ice_failed_timeout_ms < 1000 {
            return bad("webrtc.ice_failed_timeout_ms: must be at least 1000".into());
        }
        if self.webrtc.client_secret_ttl_s == 0 || self.webrtc.client_secret_ttl_s > 7200 {
            return bad("webrtc.client_secret_ttl_s: must be within 1..7200".into());
        }
        let fps_ok = |f: f32| f.is_finite() && (0.0..=30.0).contains(&f);
        if !fps_ok(self.webrtc.video_fps_speaking) || !fps_ok(self.webrtc.video_fps_idle) {
            return bad("webrtc.video_fps_speaking / video_fps_idle: must be within 0..30 (0 turns sampling off)".into());
        }
        if self.webrtc.video_frame_tokens == 0 {
            return bad("webrtc.video_frame_tokens: must be at least 1".into());
        }
        let frames = self.audio.mic.buffer_frames;
        if !frames.is_power_of_two() || !(64..=8192).contains(&frames) {
            return bad(format!("audio.mic.buffer_frames: {frames} must be a power of two from 64 to 8192"));
        }
        let threshold = self.audio.wake_word.threshold;
        if !(threshold > 0.0 && threshold < 1.0) {
            return bad(format!("audio.wake_word.threshold: {threshold} must be between 0 and 1"));
        }
        if self.audio.wake_word.listen_ms == 0 {
            return bad("audio.wake_word.listen_ms must be above 0".to_string());
        }
        if !(self.speech.piper.length_scale > 0.0 && self.speech.piper.length_scale <= 4.0) {
            return bad(format!("speech.piper.length_scale: {} must be within (0, 4]", self.speech.piper.length_scale));
        }
        for m in &self.session.output_modalities {
            if m != "text" && m != "audio" {
                return bad(format!("session.output_modalities: '{m}' must be text or audio"));
            }
        }
        Ok(())
    }

    /// Resolves a path from the file against the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_path_buf();
        }
        match self.source.as_ref().and_then(|s| s.parent()) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// The ONNX Runtime library to load: `ORT_DYLIB_PATH` first, then the config.
    pub fn onnxruntime_library(&self) -> PathBuf {
        match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => self.resolve(&self.audio.onnxruntime_library),
        }
    }
}

fn yaml_error(origin: &str, e: &serde_yaml_ng::Error) -> ConfigError {
    // serde_yaml_ng prefixes the dotted field path ("server.port: invalid type …"), keep it.
    let (line, message) = yaml_line_and_message(e);
    ConfigError::Parse { path: origin.to_string(), line, message }
}

/// A serde_yaml_ng error's line and its message without the trailing " at line …".
pub(crate) fn yaml_line_and_message(e: &serde_yaml_ng::Error) -> (usize, String) {
    let line = e.location().map(|l| l.line()).unwrap_or(0);
    let mut message = e.to_string();
    if let Some(idx) = message.find(" at line ") {
        message.truncate(idx);
    }
    (line, message)
}

/// Top-level config keys; only `HARK_<KEY>…` variables naming one of them are
/// overrides (others, such as `HARK_TEST_PYTHON`, belong to other tools).
const TOP_LEVEL_KEYS: [&str; 9] = ["server", "backend", "audio", "speech", "session", "webrtc", "log", "agents_dir", "tools_dir"];

fn is_override(var: &str) -> bool {
    let Some(rest) = var.strip_prefix("HARK_") else { return false };
    let first = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
    TOP_LEVEL_KEYS.contains(&first.as_str())
}

/// `HARK_SERVER__PORT=9000` → `server.port = 9000`. The value is parsed as a YAML scalar.
fn apply_override(tree: &mut Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path = var.trim_start_matches("HARK_");
    let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(ConfigError::Env { var: var.into(), message: "empty key segment".into() });
    }
    let value: Value = serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let mut node = tree;
    for (i, key) in keys.iter().enumerate() {
        if !node.is_mapping() {
            *node = Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().expect("just made a mapping");
        let k = Value::String(key.clone());
        if i + 1 == keys.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert_with(|| Value::Mapping(Default::default()));
    }
    Ok(())
}


/// `auto` (or null) → `None`, a whole number → `Some(n)`.
fn auto_or_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum AutoOrCount {
        Count(usize),
        Word(String),
        Null(()),
    }
    match AutoOrCount::deserialize(d).map_err(|_| serde::de::Error::custom("expected a whole number or auto"))? {
        AutoOrCount::Count(n) => Ok(Some(n)),
        AutoOrCount::Null(()) => Ok(None),
        AutoOrCount::Word(w) if w == "auto" => Ok(None),
        AutoOrCount::Word(w) => Err(serde::de::Error::custom(format!("expected a whole number or auto, got \"{w}\""))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_line_and_field() {
        let err = Config::from_yaml("server:\n  host: 127.0.0.1\n  prot: 80\n", "c.yaml", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("c.yaml:3:"), "{msg}");
        assert!(msg.contains("prot"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let msg = Config::from_yaml("server:\n  port: lots\n", "c.yaml", &[]).unwrap_err().to_string();
        assert!(msg.starts_with("c.yaml:2:") && msg.contains("server.port"), "{msg}");
    }

    #[test]
    fn env_overrides_nested_keys() {
        let env = vec![("HARK_SERVER__PORT".to_string(), "9123".to_string())];
        let c = Config::from_yaml("server:\n  port: 1\n", "c.yaml", &env).unwrap();
        assert_eq!(c.server.port, 9123);
        let env = vec![("HARK_BACKEND__OPENAI__MODEL".to_string(), "m".to_string())];
        assert_eq!(Config::from_yaml("", "c.yaml", &env).unwrap().backend.openai.model, "m");
        let env = vec![("HARK_SERVER__PROT".to_string(), "1".to_string()), ("HARK_LOG__LEVEL".to_string(), "debug".to_string())];
        let msg = Config::from_yaml("", "c.yaml", &env).unwrap_err().to_string();
        assert!(msg.starts_with("environment override HARK_SERVER__PROT:"), "{msg}");
        assert!(is_override("HARK_SERVER__PORT") && is_override("HARK_AGENTS_DIR"));
        assert!(!is_override("HARK_TEST_PYTHON") && !is_override("HARK_VENV"));
    }

    #[test]
    fn defaults_bind_loopback() {
        assert_eq!(Config::default().server.host, "127.0.0.1");
    }
}

/// An origin as `scheme://host[:port]` in lower case without a trailing slash, or `None`
/// when the text is not one (a path, a query, `null`, another scheme).
pub fn normalize_origin(text: &str) -> Option<String> {
    let text = text.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, authority) = text.split_once("://")?;
    if !matches!(scheme, "http" | "https") || authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let port_ok = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => !host.is_empty() && port.parse::<u16>().is_ok(),
        _ => true,
    };
    port_ok.then_some(text)
}
