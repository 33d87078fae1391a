//! The embedded backend: Gemma 4 in-process on its own thread.
//!
//! Requests are rendered with the Gemma 4 chat template and tokenized; the longest
//! prefix already in one of the kept KV caches is reused, so a turn only prefills
//! what is new. Generation streams text deltas, turns `<|tool_call>` blocks into
//! tool-call events, stops on `<eos>`, `<turn|>` or `<|tool_response>`, and checks
//! for cancellation between tokens.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gemma4::sampling::{Sampler, SamplingParams};
use super::gemma4::template::{self, Part, RenderOptions, ToolDecl, Turn};
use super::gemma4::tokenizer::{Gemma4Tokenizer, StreamDecoder};
use super::gemma4::tool_call::{ParsedEvent, ToolCallParser};
use super::gemma4::vision;
use super::gemma4::{audio_frames, audio_tokens, loader, ForwardInput, Gemma4Model, KvCache};
use super::{Backend, BackendError, BackendEvent, ChatMessage, FinishReason, GenerateRequest, TokenUsage, UserPart};

/// Tokens prefilled per forward call: bounds the attention scratch memory.
const PREFILL_CHUNK: usize = 512;

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

struct Job {
    request: GenerateRequest,
    cancel: CancellationToken,
    events: mpsc::Sender<BackendEvent>,
}

pub struct EmbeddedBackend {
    jobs: std_mpsc::Sender<Job>,
    name: String,
}

impl EmbeddedBackend {
    /// Loads the checkpoint (blocking; seconds for small models) and starts the model thread.
    pub fn start(settings: EmbeddedSettings) -> Result<Self, EmbeddedError> {
        let device = select_device(&settings.device)?;
        let dtype = select_dtype(&settings.dtype)?;
        let engine = Engine::load(&settings, &device, dtype)?;
        let name = settings.checkpoint.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "gemma4".into());
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hark-model".into())
            .spawn(move || {
                let mut engine = engine;
                while let Ok(job) = rx.recv() {
                    engine.run(job);
                }
            })
            .map_err(|e| EmbeddedError::Load(format!("cannot start the model thread: {e}")))?;
        Ok(Self { jobs: tx, name })
    }
}

impl Backend for EmbeddedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate(&self, request: GenerateRequest, cancel: CancellationToken) -> mpsc::Receiver<BackendEvent> {
        let (tx, rx) = mpsc::channel(256);
        if let Err(std_mpsc::SendError(job)) = self.jobs.send(Job { request, cancel, events: tx }) {
            let _ = job.events.try_send(BackendEvent::Error(BackendError::Unavailable {
                url: "embedded".into(),
                reason: "the model thread has stopped".into(),
            }));
        }
        rx
    }
}

/// A kept KV cache and the tokens it holds.
struct CachedContext {
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: Instant,
}

/// Owns the model; lives on the model thread.
pub struct Engine {
    model: Gemma4Model,
    tokenizer: Arc<Gemma4Tokenizer>,
    settings: EmbeddedSettings,
    contexts: Vec<CachedContext>,
    stop_ids: Vec<u32>,
    /// Tokens reused from a kept cache and tokens prefilled, for the last request.
    pub last_prefill: (usize, usize),
    /// Recent replies as the model produced them: (text, token ids). Re-encoding a
    /// reply's text can give other ids than the ones generated (BPE is not unique),
    /// which would break the cached prefix at every past reply; splicing the original
    /// ids back keeps the history token-identical to what the model saw.
    replies: Vec<(String, Vec<u32>)>,
}

/// Most replies remembered for re-splicing.
const MAX_REMEMBERED_REPLIES: usize = 64;

impl Engine {
    pub fn load(settings: &EmbeddedSettings, device: &Device, dtype: DType) -> Result<Self, EmbeddedError> {
        let dir = &settings.checkpoint;
        let model = loader::load(dir, dtype, device).map_err(|e| EmbeddedError::Load(e.to_string()))?;
        let tokenizer = load_tokenizer(dir)?;
        let mut stop_ids = vec![1];
        for t in ["<turn|>", "<|tool_response>", "<eos>"] {
            if let Some(id) = tokenizer.token_id(t) {
                stop_ids.push(id);
            }
        }
        Ok(Self { model, tokenizer: Arc::new(tokenizer), settings: settings.clone(), contexts: Vec::new(), stop_ids, last_prefill: (0, 0), replies: Vec::new() })
    }

    /// Drops every kept KV cache (remembered replies stay).
    pub fn clear_caches(&mut self) {
        self.contexts.clear();
    }

    pub fn model(&self) -> &Gemma4Model {
        &self.model
    }

    fn run(&mut self, job: Job) {
        let events = job.events.clone();
        let result = self.generate(&job.request, &job.cancel, &|ev| events.blocking_send(ev).is_ok());
        let last = match result {
            Ok((finish, usage)) => BackendEvent::Done { finish, usage: Some(usage) },
            Err(e) => BackendEvent::Error(BackendError::Protocol(format!("embedded model: {e}"))),
        };
        let _ = job.events.blocking_send(last);
    }

    /// Renders, prefills what is new, and generates. `emit` returns false once the
    /// listener is gone (which stops generation like a cancel).
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        cancel: &CancellationToken,
        emit: &dyn Fn(BackendEvent) -> bool,
    ) -> Result<(FinishReason, TokenUsage), String> {
        let prompt = render(request, self.settings.image_tokens)?;
        let tokens = self.encode_prompt(&prompt.text)?;
        let vocab = self.model.config.text.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(format!("token id {bad} is outside the model's vocabulary of {vocab}; tokenizer and checkpoint do not match"));
        }
        let max_ctx = self.model.config.text.max_position_embeddings;
        let max_new = request.max_output_tokens.unwrap_or(self.settings.max_tokens) as usize;
        if tokens.len() + 1 >= max_ctx {
            return Err(format!("the prompt has {} tokens; the model holds {max_ctx}", tokens.len()));
        }

        let mut ctx = self.take_context(&tokens);
        let reused = ctx.tokens.len();
        self.last_prefill = (reused, tokens.len() - reused);
        // Prefill the new part, in chunks that never split an image block.
        let media = self.media_inputs(&tokens, &prompt)?;
        let mut pos = reused;
        let mut logits = None;
        while pos < tokens.len() {
            if cancel.is_cancelled() {
                // Keep what was prefilled: the next turn will reuse it.
                self.keep_context(ctx);
                return Ok((FinishReason::Cancelled, TokenUsage { input_tokens: tokens.len() as u32, output_tokens: 0 }));
            }
            let end = self.chunk_end(&tokens, pos);
            let chunk = &tokens[pos..end];
            let (audio, images) = media.slice(pos, end).map_err(|e| e.to_string())?;
            let input = ForwardInput { tokens: chunk, audio_frames: audio.as_ref(), images: &images, all_logits: false };
            logits = Some(self.model.forward(&input, &mut ctx.cache).map_err(|e| e.to_string())?);
            ctx.tokens.extend_from_slice(chunk);
            pos = end;
        }
        let mut logits = match logits {
            Some(l) => l,
            None => {
                // Everything was cached: recompute the last position's logits.
                ctx.cache.truncate(tokens.len() - 1).map_err(|e| e.to_string())?;
                ctx.tokens.truncate(tokens.len() - 1);
                let last = &tokens[tokens.len() - 1..];
                let l = self.model.forward(&ForwardInput { tokens: last, all_logits: false, ..Default::default() }, &mut ctx.cache).map_err(|e| e.to_string())?;
                ctx.tokens.extend_from_slice(last);
                l
            }
        };

        let mut sampler = Sampler::new(SamplingParams {
            temperature: request.temperature.unwrap_or(self.settings.temperature),
            top_k: self.settings.top_k,
            top_p: self.settings.top_p,
            seed: self.settings.seed,
        });
        let mut decoder = StreamDecoder::new();
        let mut parser = ToolCallParser::new();
        let mut calls = 0usize;
        let mut generated = 0usize;
        let mut finish = FinishReason::Length;
        let mut listener_gone = false;
        // The reply's text tokens (up to any tool call), remembered for the next turn.
        let mut reply_ids: Vec<u32> = Vec::new();
        let tool_call_id = self.tokenizer.token_id("<|tool_call>");
        let mut in_calls = false;
        let send = |ev: BackendEvent, gone: &mut bool| {
            if !*gone && !emit(ev) {
                *gone = true;
            }
        };
        while generated < max_new && ctx.cache.seq_len() + 1 < max_ctx {
            if cancel.is_cancelled() || listener_gone {
                finish = FinishReason::Cancelled;
                break;
            }
            let row: Vec<f32> = logits.squeeze(0).and_then(|l| l.to_vec1()).map_err(|e| e.to_string())?;
            let next = sampler.sample(&row);
            generated += 1;
            if self.stop_ids.contains(&next) {
                let is_tool_response = self.tokenizer.token_id("<|tool_response>") == Some(next);
                finish = if is_tool_response || calls > 0 { FinishReason::ToolCalls } else { FinishReason::Stop };
                if is_tool_response {
                    // The runtime appends the results after this marker: keep it in context.
                    self.step(&mut ctx, next)?;
                }
                break;
            }
            in_calls |= Some(next) == tool_call_id;
            if !in_calls {
                reply_ids.push(next);
            }
            let delta = decoder.push(&self.tokenizer, next).map_err(|e| e.to_string())?;
            for ev in parser.push(&delta) {
                emit_parsed(ev, &mut calls, &mut |e| send(e, &mut listener_gone));
            }
            logits = self.step(&mut ctx, next)?;
        }
        for ev in parser.finish() {
            emit_parsed(ev, &mut calls, &mut |e| send(e, &mut listener_gone));
        }
        if finish == FinishReason::Stop && calls > 0 {
            finish = FinishReason::ToolCalls;
        }
        if !reply_ids.is_empty() {
            if let Ok(text) = self.tokenizer.decode(&reply_ids) {
                self.replies.retain(|(t, _)| t != &text);
                self.replies.push((text, reply_ids));
                if self.replies.len() > MAX_REMEMBERED_REPLIES {
                    self.replies.remove(0);
                }
            }
        }
        self.keep_context(ctx);
        Ok((finish, TokenUsage { input_tokens: tokens.len() as u32, output_tokens: generated as u32 }))
    }

    /// Tokenizes a rendered prompt, splicing in the original ids of remembered replies
    /// (found right after the empty thought channel that opens each model turn).
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            let hit = self
                .replies
                .iter()
                .filter(|(t, _)| !t.is_empty())
                .filter_map(|(t, ids)| {
                    let marker = format!("{}{t}", template::EMPTY_THOUGHT);
                    rest.find(&marker).map(|pos| (pos, marker.len(), ids))
                })
                .min_by_key(|(pos, len, _)| (*pos, usize::MAX - len));
            match hit {
                None => {
                    out.extend(self.tokenizer.encode(rest).map_err(|e| e.to_string())?);
                    return Ok(out);
                }
                Some((pos, len, ids)) => {
                    let head = pos + template::EMPTY_THOUGHT.len();
                    out.extend(self.tokenizer.encode(&rest[..head]).map_err(|e| e.to_string())?);
                    out.extend_from_slice(ids);
                    rest = &rest[pos + len..];
                }
            }
        }
    }

    fn step(&self, ctx: &mut CachedContext, token: u32) -> Result<Tensor, String> {
        let t = [token];
        let l = self.model.forward(&ForwardInput { tokens: &t, all_logits: false, ..Default::default() }, &mut ctx.cache).map_err(|e| e.to_string())?;
        ctx.tokens.push(token);
        Ok(l)
    }

    /// End of the prefill chunk starting at `pos`, moved past any image block it would split.
    fn chunk_end(&self, tokens: &[u32], pos: usize) -> usize {
        let c = &self.model.config;
        let is_image = |t: u32| t == c.image_token_id || t == c.video_token_id;
        let mut end = (pos + PREFILL_CHUNK).min(tokens.len());
        while end < tokens.len() && end > pos && is_image(tokens[end]) && is_image(tokens[end - 1]) {
            end += 1;
        }
        end
    }

    /// The kept context sharing the longest prefix with `tokens`, rolled back to that
    /// prefix, or a fresh one.
    fn take_context(&mut self, tokens: &[u32]) -> CachedContext {
        let c = &self.model.config;
        let mut best: Option<(usize, usize)> = None;
        for (i, ctx) in self.contexts.iter().enumerate() {
            let lcp = ctx.tokens.iter().zip(tokens).take_while(|(a, b)| a == b).count();
            if lcp > 0 && best.is_none_or(|(_, l)| lcp > l) {
                best = Some((i, lcp));
            }
        }
        if let Some((i, mut lcp)) = best {
            // Never resume inside a media block: its placeholders must be prefilled together.
            let is_media = |t: u32| t == c.image_token_id || t == c.video_token_id || t == c.audio_token_id;
            while lcp > 0 && lcp < tokens.len() && is_media(tokens[lcp]) && is_media(tokens[lcp - 1]) {
                lcp -= 1;
            }
            let mut ctx = self.contexts.swap_remove(i);
            if lcp > 0 && ctx.cache.truncate(lcp).unwrap_or(false) {
                ctx.tokens.truncate(lcp);
                ctx.last_used = Instant::now();
                return ctx;
            }
        }
        CachedContext { tokens: Vec::new(), cache: self.model.new_cache(), last_used: Instant::now() }
    }

    fn keep_context(&mut self, mut ctx: CachedContext) {
        ctx.last_used = Instant::now();
        self.contexts.push(ctx);
        let limit = self.settings.cached_sessions.max(1);
        while self.contexts.len() > limit {
            let oldest = self.contexts.iter().enumerate().min_by_key(|(_, c)| c.last_used).map(|(i, _)| i).unwrap_or(0);
            self.contexts.swap_remove(oldest);
        }
    }

    /// Pairs each run of audio / image placeholders (in token order) with the
    /// prompt's clips and images (in message order), checking their sizes agree.
    fn media_inputs(&self, tokens: &[u32], prompt: &Rendered) -> Result<Media, String> {
        let c = &self.model.config;
        let device = self.model.device();
        let audio_runs = placeholder_runs(tokens, c.audio_token_id);
        if audio_runs.len() != prompt.audio.len() {
            return Err("audio placeholders do not match the audio clips".into());
        }
        let mut audio = Vec::with_capacity(audio_runs.len());
        for (&(start, len), samples) in audio_runs.iter().zip(&prompt.audio) {
            if audio_tokens(samples.len()) != len {
                return Err("audio placeholder count does not match the clip length".into());
            }
            audio.push((start, audio_frames(samples, device).map_err(|e| e.to_string())?));
        }
        let image_runs = placeholder_runs(tokens, c.image_token_id);
        if image_runs.len() != prompt.images.len() {
            return Err("image placeholders do not match the images".into());
        }
        if !image_runs.is_empty() && !self.model.has_vision() {
            return Err("this checkpoint has no vision embedder; it cannot take images".into());
        }
        let mut images = Vec::with_capacity(image_runs.len());
        for (&(start, len), p) in image_runs.iter().zip(&prompt.images) {
            if p.positions.len() != len {
                return Err("image placeholder count does not match the image's patches".into());
            }
            let patches = Tensor::from_vec(p.data.clone(), (len, vision::PATCH_DIM), device).map_err(|e| e.to_string())?;
            images.push((start, super::gemma4::ImageInput { patches, positions: p.positions.clone() }));
        }
        Ok(Media { audio, images })
    }
}

/// `(start, length)` of each run of `id` in `tokens`.
fn placeholder_runs(tokens: &[u32], id: u32) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == id {
            let start = i;
            while i < tokens.len() && tokens[i] == id {
                i += 1;
            }
            runs.push((start, i - start));
        } else {
            i += 1;
        }
    }
    runs
}

/// The request's media, placed: first placeholder position and model-ready tensors.
struct Media {
    /// `[tokens, 640]` frames per clip.
    audio: Vec<(usize, Tensor)>,
    images: Vec<(usize, super::gemma4::ImageInput)>,
}

impl Media {
    /// Audio frames and images for the placeholders inside `[start, end)`.
    fn slice(&self, start: usize, end: usize) -> candle_core::Result<(Option<Tensor>, Vec<super::gemma4::ImageInput>)> {
        let mut parts = Vec::new();
        for (pos, frames) in &self.audio {
            let (a, b) = (*pos, pos + frames.dim(0)?);
            let (lo, hi) = (a.max(start), b.min(end));
            if lo < hi {
                parts.push(frames.narrow(0, lo - a, hi - lo)?);
            }
        }
        let audio = if parts.is_empty() { None } else { Some(Tensor::cat(&parts, 0)?) };
        // Prefill chunks never split an image (see `chunk_end` and `take_context`).
        let images = self
            .images
            .iter()
            .filter(|(pos, img)| *pos >= start && pos + img.positions.len() <= end)
            .map(|(_, img)| img.clone())
            .collect();
        Ok((audio, images))
    }
}

fn emit_parsed(ev: ParsedEvent, calls: &mut usize, send: &mut dyn FnMut(BackendEvent)) {
    match ev {
        ParsedEvent::Text(t) if !t.is_empty() => send(BackendEvent::TextDelta(t)),
        ParsedEvent::Text(_) | ParsedEvent::ToolResponseRequested => {}
        ParsedEvent::ToolCall { name, arguments } => {
            let index = *calls;
            *calls += 1;
            send(BackendEvent::ToolCallStart { index, call_id: super::new_call_id(), name });
            send(BackendEvent::ToolCallArgumentsDelta { index, delta: arguments.to_string() });
        }
        // A call the model botched: show it as text rather than lose it.
        ParsedEvent::MalformedToolCall { raw, .. } => send(BackendEvent::TextDelta(raw)),
    }
}

fn load_tokenizer(dir: &Path) -> Result<Gemma4Tokenizer, EmbeddedError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(EmbeddedError::Load(format!("{} is missing: the checkpoint needs its tokenizer.json", path.display())));
    }
    Gemma4Tokenizer::from_file(&path).map_err(|e| EmbeddedError::Load(e.to_string()))
}

/// A request rendered as Gemma 4 prompt text, with the audio its placeholders stand for.
pub struct Rendered {
    pub text: String,
    pub audio: Vec<Arc<Vec<f32>>>,
    pub images: Vec<Arc<vision::Patches>>,
}

/// The request as a Gemma 4 prompt (thinking off, ready for the model to speak).
pub fn render(req: &GenerateRequest, image_tokens: usize) -> Result<Rendered, String> {
    let mut audio = Vec::new();
    let mut images = Vec::new();
    let mut turns = Vec::new();
    let mut names: Vec<(String, String)> = Vec::new();
    for m in &req.messages {
        match m {
            ChatMessage::System(t) => turns.push(Turn::System(t.clone())),
            ChatMessage::User(parts) => {
                let mut out = Vec::new();
                for p in parts {
                    match p {
                        UserPart::Text(t) => out.push(Part::Text(t.clone())),
                        UserPart::Audio(samples) => {
                            out.push(Part::Audio { tokens: audio_tokens(samples.len()) });
                            audio.push(samples.clone());
                        }
                        UserPart::Image(url) => {
                            let bytes = vision::decode_data_url(url).map_err(|e| format!("image: {e}"))?;
                            let patches = vision::decode_and_patch(&bytes, image_tokens).map_err(|e| format!("image: {e}"))?;
                            out.push(Part::Image { tokens: patches.positions.len() });
                            images.push(Arc::new(patches));
                        }
                    }
                }
                turns.push(Turn::User(out));
            }
            ChatMessage::Assistant { text, tool_calls } => {
                let calls = tool_calls
                    .iter()
                    .map(|c| {
                        names.push((c.call_id.clone(), c.name.clone()));
                        (c.name.clone(), serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments.clone())))
                    })
                    .collect();
                turns.push(Turn::Model { text: text.clone(), tool_calls: calls });
            }
            ChatMessage::Tool { call_id, output } => {
                let name = names.iter().find(|(id, _)| id == call_id).map(|(_, n)| n.clone()).unwrap_or_else(|| "tool".into());
                let output = serde_json::from_str(output).unwrap_or(Value::String(output.clone()));
                turns.push(Turn::ToolResult { name, output });
            }
        }
    }
    let tools: Vec<ToolDecl> =
        req.tools.iter().map(|t| ToolDecl { name: t.name.clone(), description: t.description.clone(), parameters: t.parameters.clone() }).collect();
    let system = (!req.instructions.is_empty()).then_some(req.instructions.as_str());
    let options = RenderOptions { enable_thinking: false, keep_empty_thought_in_history: true };
    Ok(Rendered { text: template::render_with_options(system, &tools, &turns, true, options), audio, images })
}
