//! The embedded backend: Gemma 4 in-process, its [`Engine`] on a thread of its own.
//!
//! Requests, streamed turns and preparations go to the model thread as jobs; its
//! scheduler interleaves them (see [`super::engine::scheduler`]). Events come back
//! through channels the model thread never waits on: each response's channel holds
//! every event its token limit allows, and a listener that is gone or full only
//! stops its own response.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use candle_core::{DType, Device};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::engine::emit_parsed;
pub use super::engine::prompt::Prompt;
use super::engine::prompt::{render_with, ImageMode};
use super::engine::scheduler::{EventSink, Job};
pub use super::engine::{Engine, EngineStats};
use super::gemma4::tokenizer::Gemma4Tokenizer;
use super::gemma4::tool_call::ToolCallParser;
use super::{
    Backend, BackendError, BackendEvent, ChatMessage, EstimatedTokens, GenerateRequest, TokenCounter, ToolSpec, TurnStream,
};

/// Most events one generated token can produce (a text delta, or a tool call's start
/// and arguments), with room for the parser's flush and the final `Done`: a response's
/// channel of this many slots per token never fills, so the model never waits on it.
const EVENTS_PER_TOKEN: usize = 3;
const EVENTS_SLACK: usize = 16;
/// Upper bound on a channel's slots (tokio allocates them as they fill, not up front).
const MAX_CHANNEL: usize = 1 << 22;

/// The backend's settings are `backend.embedded` from config.yaml, with
/// `checkpoint` already resolved against the config file's folder.
pub use crate::config::EmbeddedBackendConfig as EmbeddedSettings;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("{0}")]
    Load(String),
}

/// Picks the candle device named in the config (the one place device choice lives).
pub fn select_device(name: &str) -> Result<Device, EmbeddedError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = n.strip_prefix("cuda:").and_then(|i| i.parse().ok()).unwrap_or(0);
            Device::new_cuda(ordinal).map_err(|e| {
                EmbeddedError::Load(format!("cannot open {n}: {e} (is this a build with `--features cuda`, and is a GPU present?)"))
            })
        }
        other => Err(EmbeddedError::Load(format!("unknown device '{other}'; use cpu, cuda or cuda:N"))),
    }
}

pub fn select_dtype(name: &str) -> Result<DType, EmbeddedError> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(EmbeddedError::Load(format!("unknown dtype '{other}'; use f32, bf16 or f16"))),
    }
}


/// A response's event channel for up to `max_new` tokens, and the model thread's end
/// of it. The sink never blocks: a full channel (a listener far behind) or a closed
/// one ends this response; the model thread goes on with everyone else's.
pub fn event_channel(max_new: usize) -> (EventSink, mpsc::Receiver<BackendEvent>) {
    let (tx, rx) = mpsc::channel(max_new.saturating_mul(EVENTS_PER_TOKEN).saturating_add(EVENTS_SLACK).min(MAX_CHANNEL));
    (Box::new(move |ev| tx.try_send(ev).is_ok()), rx)
}

pub struct EmbeddedBackend {
    jobs: std_mpsc::Sender<Job>,
    name: String,
    counter: Arc<EmbeddedTokenCounter>,
    next_stream: AtomicU64,
    max_tokens: u32,
    kv_bytes: Arc<AtomicU64>,
    kv_budget_bytes: u64,
}

impl EmbeddedBackend {
    /// Loads the checkpoint (blocking; seconds for small models) and starts the model thread.
    pub fn start(settings: EmbeddedSettings) -> Result<Self, EmbeddedError> {
        let device = select_device(&settings.device)?;
        let dtype = select_dtype(&settings.dtype)?;
        let engine = Engine::load(&settings, &device, dtype)?;
        let counter = Arc::new(EmbeddedTokenCounter { tokenizer: engine.tokenizer().clone(), image_tokens: settings.image_tokens });
        let name = settings.checkpoint.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "gemma4".into());
        let (tx, rx) = std_mpsc::channel::<Job>();
        let kv_bytes = engine.kv_bytes.clone();
        let kv_budget_bytes = engine.kv_budget() as u64;
        std::thread::Builder::new()
            .name("hark-model".into())
            .spawn(move || engine.serve(rx))
            .map_err(|e| EmbeddedError::Load(format!("cannot start the model thread: {e}")))?;
        Ok(Self { jobs: tx, name, counter, next_stream: AtomicU64::new(1), max_tokens: settings.max_tokens, kv_bytes, kv_budget_bytes })
    }
}

impl Backend for EmbeddedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn memory(&self) -> Option<crate::model::BackendMemory> {
        Some(crate::model::BackendMemory {
            kv_bytes: self.kv_bytes.load(std::sync::atomic::Ordering::Relaxed),
            kv_budget_bytes: self.kv_budget_bytes,
        })
    }

    fn generate(&self, request: GenerateRequest, cancel: CancellationToken) -> mpsc::Receiver<BackendEvent> {
        let (sink, rx) = event_channel(request.max_output_tokens.unwrap_or(self.max_tokens) as usize);
        if let Err(std_mpsc::SendError(Job::Generate { mut sink, .. })) = self.jobs.send(Job::Generate { request, cancel, sink }) {
            sink(BackendEvent::Error(BackendError::Unavailable { url: "embedded".into(), reason: "the model thread has stopped".into() }));
        }
        rx
    }
    fn open_turn(&self, base: GenerateRequest) -> Option<TurnStream> {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (signals, end_of_turn) = mpsc::unbounded_channel();
        self.jobs.send(Job::OpenTurn { stream, base, signals }).ok()?;
        let jobs = self.jobs.clone();
        let send = move |command| {
            let _ = jobs.send(Job::Turn { stream, command });
        };
        Some(TurnStream::new(Box::new(send), end_of_turn))
    }

    fn prepare(&self, request: GenerateRequest) {
        let _ = self.jobs.send(Job::Prepare { request });
    }

    fn token_counter(&self) -> Arc<dyn TokenCounter> {
        self.counter.clone()
    }
}

/// Exact counts: the embedded model's own template and tokenizer.
pub struct EmbeddedTokenCounter {
    tokenizer: Arc<Gemma4Tokenizer>,
    image_tokens: usize,
}

impl TokenCounter for EmbeddedTokenCounter {
    fn count(&self, instructions: &str, tools: &[ToolSpec], messages: &[ChatMessage], add_generation_prompt: bool) -> usize {
        let request = GenerateRequest { instructions: instructions.into(), messages: messages.to_vec(), tools: tools.to_vec(), ..Default::default() };
        match render_with(&request, self.image_tokens, add_generation_prompt, ImageMode::CountOnly) {
            Ok(r) => self.tokenizer.encode(&r.text).map(|t| t.len()).unwrap_or(0),
            // Unrenderable (a broken image): the estimate is the best there is.
            Err(_) => EstimatedTokens { image_tokens: self.image_tokens }.count(instructions, tools, messages, add_generation_prompt),
        }
    }

}

/// The events the embedded backend streams for `text` written by the model (text that
/// keeps Gemma 4's special tokens): deltas and tool calls, as generation would emit them.
pub fn events_for_model_text(text: &str) -> Vec<BackendEvent> {
    let mut out = Vec::new();
    let mut calls = 0;
    let mut parser = ToolCallParser::new();
    for ev in parser.push(text).into_iter().chain(parser.finish()) {
        emit_parsed(ev, &mut calls, &mut |e| out.push(e));
    }
    out
}
