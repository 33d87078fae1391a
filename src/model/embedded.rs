//! The embedded backend: Gemma 4 in-process on its own thread.
//!
//! Requests are rendered with the Gemma 4 chat template and tokenized; the longest
//! prefix already in one of the kept KV caches is reused, so a turn only prefills
//! what is new. Generation streams text deltas, turns `<|tool_call>` blocks into
//! tool-call events, stops on `<eos>`, `<turn|>` or `<|tool_response>`, and checks
//! for cancellation between tokens.

use std::cell::RefCell;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
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
use super::{
    Backend, BackendError, BackendEvent, ChatMessage, EstimatedTokens, FinishReason, GenerateRequest, TokenCounter, TokenUsage,
    ToolSpec, TurnCommand, TurnStream, UserPart,
};

/// Samples per audio token (40 ms at 16 kHz).
const AUDIO_FRAME: usize = 640;

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

/// Work for the model thread, in arrival order.
enum Job {
    Generate { request: GenerateRequest, cancel: CancellationToken, events: mpsc::Sender<BackendEvent> },
    OpenTurn { stream: u64, base: GenerateRequest, signals: mpsc::UnboundedSender<f32> },
    Turn { stream: u64, command: TurnCommand },
    /// Low priority: build a cache for this context when nothing else waits.
    Prepare { request: GenerateRequest },
}

pub struct EmbeddedBackend {
    jobs: std_mpsc::Sender<Job>,
    name: String,
    counter: Arc<EmbeddedTokenCounter>,
    next_stream: AtomicU64,
}

impl EmbeddedBackend {
    /// Loads the checkpoint (blocking; seconds for small models) and starts the model thread.
    pub fn start(settings: EmbeddedSettings) -> Result<Self, EmbeddedError> {
        let device = select_device(&settings.device)?;
        let dtype = select_dtype(&settings.dtype)?;
        let engine = Engine::load(&settings, &device, dtype)?;
        let counter = Arc::new(EmbeddedTokenCounter { tokenizer: engine.tokenizer.clone(), image_tokens: settings.image_tokens });
        let name = settings.checkpoint.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "gemma4".into());
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hark-model".into())
            .spawn(move || engine.serve(rx))
            .map_err(|e| EmbeddedError::Load(format!("cannot start the model thread: {e}")))?;
        Ok(Self { jobs: tx, name, counter, next_stream: AtomicU64::new(1) })
    }
}

impl Backend for EmbeddedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate(&self, request: GenerateRequest, cancel: CancellationToken) -> mpsc::Receiver<BackendEvent> {
        let (tx, rx) = mpsc::channel(256);
        if let Err(std_mpsc::SendError(Job::Generate { events, .. })) = self.jobs.send(Job::Generate { request, cancel, events: tx }) {
            let _ = events.try_send(BackendEvent::Error(BackendError::Unavailable {
                url: "embedded".into(),
                reason: "the model thread has stopped".into(),
            }));
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

/// Identity of one prompt position for prefix matching: the token id, or for a media
/// placeholder a hash of the frame or patch it stands for. Two clips of equal length
/// render the same placeholder ids and must never share cached keys; hashing each
/// audio frame on its own also lets a streamed turn match frame by frame.
type PositionKey = u64;
const MEDIA_KEY: u64 = 1 << 63;

fn frame_key(frame: &[f32]) -> PositionKey {
    let mut h = DefaultHasher::new();
    for i in 0..AUDIO_FRAME {
        frame.get(i).copied().unwrap_or(0.0).to_bits().hash(&mut h);
    }
    (h.finish() & !(1 << 62)) | MEDIA_KEY
}

/// A prompt ready for the model: ids, their keys, and the media at their placeholders.
pub struct Prompt {
    pub tokens: Vec<u32>,
    keys: Vec<PositionKey>,
    media: Media,
}

/// A kept KV cache and the keys of the positions it holds.
struct CachedContext {
    id: u64,
    keys: Vec<PositionKey>,
    cache: KvCache,
    last_used: Instant,
}

/// A user turn being prefilled while the user speaks.
struct OpenTurn {
    /// The cached context holding the turn.
    context: u64,
    /// Position of the turn's `<|turn>`: a retraction truncates back to here.
    turn_start: usize,
    /// Samples received but not yet a whole 640-sample frame.
    pending: Vec<f32>,
    signals: mpsc::UnboundedSender<f32>,
}

/// A context being prefilled in the background, a chunk at a time.
struct Background {
    ctx: CachedContext,
    prompt: Prompt,
    pos: usize,
}

/// Owns the model; lives on the model thread.
pub struct Engine {
    model: Gemma4Model,
    tokenizer: Arc<Gemma4Tokenizer>,
    settings: EmbeddedSettings,
    contexts: Vec<CachedContext>,
    next_context: u64,
    open_turns: HashMap<u64, OpenTurn>,
    background: Option<Background>,
    stop_ids: Vec<u32>,
    /// Tokens reused from a kept cache and tokens prefilled, for the last request.
    pub last_prefill: (usize, usize),
    /// The logits that chose the last request's first generated token (for tests).
    pub last_logits: Option<Vec<f32>>,
    /// Decoded images by their URL's `Arc` (checked through the weak reference): an
    /// image is decoded, resized and hashed once, not at every turn that follows it.
    image_cache: RefCell<HashMap<usize, (std::sync::Weak<String>, Arc<vision::Patches>, u64)>>,
    /// Frame keys of recent audio clips, by the clip's address (checked through the
    /// weak reference), so a long conversation's audio is hashed once, not per turn.
    clip_keys: RefCell<HashMap<usize, (std::sync::Weak<Vec<f32>>, Vec<PositionKey>)>>,
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
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            settings: settings.clone(),
            contexts: Vec::new(),
            next_context: 1,
            open_turns: HashMap::new(),
            background: None,
            stop_ids,
            last_prefill: (0, 0),
            last_logits: None,
            clip_keys: RefCell::new(HashMap::new()),
            image_cache: RefCell::new(HashMap::new()),
            replies: Vec::new(),
        })
    }

    /// Drops every kept KV cache (remembered replies stay).
    pub fn clear_caches(&mut self) {
        self.contexts.clear();
        self.open_turns.clear();
        self.background = None;
    }

    pub fn model(&self) -> &Gemma4Model {
        &self.model
    }

    /// Tokens held by each kept cache, newest use last.
    pub fn cached_lengths(&self) -> Vec<usize> {
        let mut c: Vec<_> = self.contexts.iter().map(|c| (c.last_used, c.keys.len())).collect();
        c.sort();
        c.into_iter().map(|(_, n)| n).collect()
    }

    /// The model thread's loop. Jobs run in arrival order; a background preparation
    /// advances one chunk at a time only while no job waits, so it never delays a turn.
    fn serve(mut self, rx: std_mpsc::Receiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        loop {
            if queue.is_empty() {
                if self.background.is_some() {
                    match rx.try_recv() {
                        Ok(job) => queue.push_back(job),
                        Err(std_mpsc::TryRecvError::Empty) => {
                            self.background_step();
                            continue;
                        }
                        Err(std_mpsc::TryRecvError::Disconnected) => return,
                    }
                } else {
                    match rx.recv() {
                        Ok(job) => queue.push_back(job),
                        Err(_) => return,
                    }
                }
            }
            queue.extend(rx.try_iter());
            let Some(job) = queue.pop_front() else { continue };
            match job {
                Job::Generate { request, cancel, events } => {
                    let result = self.generate(&request, &cancel, &|ev| events.blocking_send(ev).is_ok());
                    let last = match result {
                        Ok((finish, usage)) => BackendEvent::Done { finish, usage: Some(usage) },
                        Err(e) => BackendEvent::Error(BackendError::Protocol(format!("embedded model: {e}"))),
                    };
                    let _ = events.blocking_send(last);
                }
                Job::OpenTurn { stream, base, signals } => {
                    if let Err(e) = self.open_turn(stream, &base, signals) {
                        tracing::warn!("streaming prefill off for this turn: {e}");
                    }
                }
                Job::Turn { stream, command: TurnCommand::Audio(mut samples) } => {
                    // Audio queued behind this job for the same turn goes in the same forward.
                    while let Some(Job::Turn { stream: s, command: TurnCommand::Audio(_) }) = queue.front() {
                        if *s != stream {
                            break;
                        }
                        if let Some(Job::Turn { command: TurnCommand::Audio(more), .. }) = queue.pop_front() {
                            samples.extend(more);
                        }
                    }
                    if let Err(e) = self.turn_audio(stream, &samples) {
                        tracing::warn!("streaming prefill stopped for this turn: {e}");
                        self.open_turns.remove(&stream);
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
    }

    /// Renders, tokenizes and places the media of a request.
    pub fn prompt(&self, request: &GenerateRequest, add_generation_prompt: bool) -> Result<Prompt, String> {
        self.image_cache.borrow_mut().retain(|_, (url, _, _)| url.strong_count() > 0);
        let patches_for = |url: &Arc<String>| self.patches_for(url);
        let rendered = render_with(request, self.settings.image_tokens, add_generation_prompt, ImageMode::Patches(&patches_for))?;
        let tokens = self.encode_prompt(&rendered.text)?;
        let vocab = self.model.config.text.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(format!("token id {bad} is outside the model's vocabulary of {vocab}; tokenizer and checkpoint do not match"));
        }
        let max_ctx = self.model.config.text.max_position_embeddings;
        if tokens.len() + 1 >= max_ctx {
            return Err(format!("the prompt has {} tokens; the model holds {max_ctx}", tokens.len()));
        }
        let (media, keys) = self.media_inputs(&tokens, &rendered)?;
        Ok(Prompt { tokens, keys, media })
    }

    /// Renders, prefills what is new, and generates. `emit` returns false once the
    /// listener is gone (which stops generation like a cancel).
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        cancel: &CancellationToken,
        emit: &dyn Fn(BackendEvent) -> bool,
    ) -> Result<(FinishReason, TokenUsage), String> {
        let prompt = self.prompt(request, true)?;
        let tokens = &prompt.tokens;
        let max_ctx = self.model.config.text.max_position_embeddings;
        let max_new = request.max_output_tokens.unwrap_or(self.settings.max_tokens) as usize;

        self.adopt_background_if_better(&prompt.keys);
        let mut ctx = self.take_context(&prompt.keys);
        let reused = ctx.keys.len();
        self.last_prefill = (reused, tokens.len() - reused);
        let logits = match self.prefill(&mut ctx, &prompt, tokens.len(), Some(cancel))? {
            Some(l) => l,
            None if cancel.is_cancelled() => {
                // Keep what was prefilled: the next turn will reuse it.
                self.keep_context(ctx);
                return Ok((FinishReason::Cancelled, TokenUsage { input_tokens: tokens.len() as u32, output_tokens: 0, cached_input_tokens: reused as u32 }));
            }
            None => {
                // Everything was cached: recompute the last position's logits.
                let last = tokens.len() - 1;
                ctx.cache.truncate(last).map_err(|e| e.to_string())?;
                ctx.keys.truncate(last);
                self.prefill(&mut ctx, &prompt, tokens.len(), None)?.ok_or("nothing to prefill")?
            }
        };
        let mut logits = logits;

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
            if generated == 0 {
                self.last_logits = Some(row);
            }
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
            if generated == max_new {
                // The reply is over: its last token enters the cache with the next turn.
                break;
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
        Ok((finish, TokenUsage { input_tokens: tokens.len() as u32, output_tokens: generated as u32, cached_input_tokens: reused as u32 }))
    }

    /// Prefills `prompt` from the context's current length up to `end`, in chunks that
    /// never split an image block. Returns the last chunk's logits, or `None` when there
    /// was nothing to do or `cancel` fired (what was prefilled stays in `ctx`).
    fn prefill(&self, ctx: &mut CachedContext, prompt: &Prompt, end: usize, cancel: Option<&CancellationToken>) -> Result<Option<Tensor>, String> {
        let mut pos = ctx.keys.len();
        let mut logits = None;
        while pos < end {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return Ok(None);
            }
            let stop = self.chunk_end(&prompt.tokens[..end], pos);
            logits = Some(self.forward_span(ctx, prompt, pos, stop)?);
            pos = stop;
        }
        Ok(logits)
    }

    fn forward_span(&self, ctx: &mut CachedContext, prompt: &Prompt, start: usize, end: usize) -> Result<Tensor, String> {
        let (audio, images) = prompt.media.slice(start, end).map_err(|e| e.to_string())?;
        let input = ForwardInput { tokens: &prompt.tokens[start..end], audio_frames: audio.as_ref(), images: &images, all_logits: false };
        let logits = self.model.forward(&input, &mut ctx.cache).map_err(|e| e.to_string())?;
        ctx.keys.extend_from_slice(&prompt.keys[start..end]);
        Ok(logits)
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
        ctx.keys.push(token as PositionKey);
        Ok(l)
    }

    /// End of the prefill chunk starting at `pos`, moved past any image block it would split.
    fn chunk_end(&self, tokens: &[u32], pos: usize) -> usize {
        let mut end = (pos + PREFILL_CHUNK).min(tokens.len());
        while end < tokens.len() && end > pos && self.is_image(tokens[end]) && self.is_image(tokens[end - 1]) {
            end += 1;
        }
        end
    }

    fn is_image(&self, t: u32) -> bool {
        let c = &self.model.config;
        t == c.image_token_id || t == c.video_token_id
    }

    /// The kept context sharing the longest prefix with `keys`: its index and the
    /// length to resume from.
    fn best_prefix(&self, keys: &[PositionKey]) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (i, ctx) in self.contexts.iter().enumerate() {
            let lcp = ctx.keys.iter().zip(keys).take_while(|(a, b)| a == b).count();
            if lcp > 0 && best.is_none_or(|(_, l)| lcp > l) {
                best = Some((i, lcp));
            }
        }
        let (i, mut lcp) = best?;
        // Never resume inside an image: its patches attend to each other, so the
        // block is prefilled whole. (Audio is causal: resuming mid-clip is fine.)
        let is_image_key = |k: PositionKey| k & MEDIA_KEY != 0 && (k >> 62) & 1 == 1;
        while lcp > 0 && lcp < keys.len() && is_image_key(keys[lcp]) && is_image_key(keys[lcp - 1]) {
            lcp -= 1;
        }
        (lcp > 0).then_some((i, lcp))
    }

    /// The kept context sharing the longest prefix with `keys`, rolled back to that
    /// prefix, or a fresh one.
    fn take_context(&mut self, keys: &[PositionKey]) -> CachedContext {
        if let Some((i, lcp)) = self.best_prefix(keys) {
            let mut ctx = self.contexts.swap_remove(i);
            // The context changes hands: a turn streaming into it is over.
            self.open_turns.retain(|_, t| t.context != ctx.id);
            if ctx.cache.truncate(lcp).unwrap_or(false) {
                ctx.keys.truncate(lcp);
                ctx.last_used = Instant::now();
                return ctx;
            }
        }
        self.fresh_context()
    }

    /// A half-built background context that serves `keys` better than every kept one
    /// is taken over as it stands (the request prefills the rest); otherwise the
    /// preparation goes on undisturbed once the request is done.
    fn adopt_background_if_better(&mut self, keys: &[PositionKey]) {
        let Some(bg) = &self.background else { return };
        let lcp = bg.ctx.keys.iter().zip(keys).take_while(|(a, b)| a == b).count();
        let kept = self.best_prefix(keys).map_or(0, |(_, l)| l);
        if lcp > kept {
            if let Some(bg) = self.background.take() {
                self.keep_context(bg.ctx);
            }
        }
    }

    /// Like [`Self::take_context`], but a copy: the kept context stays whole (the
    /// conversation goes on in it while this one is built).
    fn fork_context(&mut self, keys: &[PositionKey]) -> CachedContext {
        let mut fresh = self.fresh_context();
        if let Some((i, lcp)) = self.best_prefix(keys) {
            let src = &self.contexts[i];
            let mut cache = src.cache.clone();
            if cache.truncate(lcp).unwrap_or(false) {
                fresh.cache = cache;
                fresh.keys = src.keys[..lcp].to_vec();
            }
        }
        fresh
    }

    fn fresh_context(&mut self) -> CachedContext {
        self.next_context += 1;
        CachedContext { id: self.next_context, keys: Vec::new(), cache: self.model.new_cache(), last_used: Instant::now() }
    }

    fn keep_context(&mut self, mut ctx: CachedContext) {
        ctx.last_used = Instant::now();
        self.contexts.push(ctx);
        let limit = self.settings.cached_sessions.max(1);
        while self.contexts.len() > limit {
            let oldest = self.contexts.iter().enumerate().min_by_key(|(_, c)| c.last_used).map(|(i, _)| i).unwrap_or(0);
            let gone = self.contexts.swap_remove(oldest);
            self.open_turns.retain(|_, t| t.context != gone.id);
        }
    }

    /// Takes the kept context with this id out of the list.
    fn take_by_id(&mut self, id: u64) -> Option<CachedContext> {
        let i = self.contexts.iter().position(|c| c.id == id)?;
        Some(self.contexts.swap_remove(i))
    }

    /// Prefills `base` followed by the opening of a user audio turn
    /// (`<|turn>user\n<|audio>`), ready for frames.
    pub fn open_turn(&mut self, stream: u64, base: &GenerateRequest, signals: mpsc::UnboundedSender<f32>) -> Result<(), String> {
        let mut request = base.clone();
        request.messages.push(ChatMessage::User(vec![UserPart::Audio(Arc::new(Vec::new()))]));
        let prompt = self.prompt(&request, false)?;
        let boa = self.tokenizer.token_id(template::AUDIO_START).ok_or("the tokenizer has no <|audio>")?;
        let turn_open = self.tokenizer.token_id(template::TURN_START).ok_or("the tokenizer has no <|turn>")?;
        let audio_at = prompt.tokens.iter().rposition(|&t| t == boa).ok_or("no audio opening in the rendered turn")? + 1;
        let turn_start = prompt.tokens[..audio_at].iter().rposition(|&t| t == turn_open).ok_or("no turn opening")?;
        self.adopt_background_if_better(&prompt.keys[..audio_at]);
        let mut ctx = self.take_context(&prompt.keys[..audio_at]);
        self.prefill(&mut ctx, &prompt, audio_at, None)?;
        self.open_turns.insert(stream, OpenTurn { context: ctx.id, turn_start, pending: Vec::new(), signals });
        self.keep_context(ctx);
        Ok(())
    }

    /// Prefills the whole frames among `samples` (plus any left over from before) into
    /// the stream's turn and reports the end-of-turn probability.
    pub fn turn_audio(&mut self, stream: u64, samples: &[f32]) -> Result<(), String> {
        let Some(turn) = self.open_turns.get_mut(&stream) else { return Ok(()) };
        turn.pending.extend_from_slice(samples);
        let frames = turn.pending.len() / AUDIO_FRAME;
        if frames == 0 {
            return Ok(());
        }
        let chunk: Vec<f32> = turn.pending.drain(..frames * AUDIO_FRAME).collect();
        let id = turn.context;
        let Some(mut ctx) = self.take_by_id(id) else {
            self.open_turns.remove(&stream);
            return Ok(());
        };
        let device = self.model.device().clone();
        let c = &self.model.config;
        let tokens = vec![c.audio_token_id; frames];
        let keys: Vec<PositionKey> = chunk.chunks(AUDIO_FRAME).map(frame_key).collect();
        let frames_t = audio_frames(&chunk, &device).map_err(|e| e.to_string())?;
        let input = ForwardInput { tokens: &tokens, audio_frames: Some(&frames_t), images: &[], all_logits: false };
        let result = self.model.forward(&input, &mut ctx.cache).map_err(|e| e.to_string());
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // The cache may be half-written: drop it rather than keep a wrong one.
                self.open_turns.remove(&stream);
                return Err(e);
            }
        };
        ctx.keys.extend(keys);
        let p_end = self.end_of_turn_probability(&logits)?;
        self.keep_context(ctx);
        if let Some(turn) = self.open_turns.get(&stream) {
            let _ = turn.signals.send(p_end);
        }
        Ok(())
    }

    /// Probability mass on the tokens that close an audio turn (`<audio|>`, `<turn|>`).
    fn end_of_turn_probability(&self, logits: &Tensor) -> Result<f32, String> {
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let row: Vec<f32> = probs.flatten_all().and_then(|p| p.to_vec1()).map_err(|e| e.to_string())?;
        let mut p = 0.0;
        for t in [template::AUDIO_END, template::TURN_END].iter().filter_map(|t| self.tokenizer.token_id(t)) {
            p += row.get(t as usize).copied().unwrap_or(0.0);
        }
        Ok(p)
    }

    /// Forgets a streamed turn: its context goes back to before `<|turn>`. A context
    /// that can no longer roll back that far (a sliding layer dropped what it needs)
    /// is discarded, so nothing stale is ever reused.
    pub fn retract_turn(&mut self, stream: u64) -> Result<(), String> {
        let Some(turn) = self.open_turns.remove(&stream) else { return Ok(()) };
        let Some(mut ctx) = self.take_by_id(turn.context) else { return Ok(()) };
        if ctx.keys.len() >= turn.turn_start && ctx.cache.truncate(turn.turn_start).map_err(|e| e.to_string())? {
            ctx.keys.truncate(turn.turn_start);
            self.keep_context(ctx);
        }
        Ok(())
    }

    /// Starts (or replaces) the background preparation of `request`'s context.
    pub fn start_background(&mut self, request: &GenerateRequest) -> Result<(), String> {
        let prompt = self.prompt(request, false)?;
        if let Some(bg) = self.background.take() {
            self.keep_context(bg.ctx);
        }
        // Start from a copy of the best kept prefix: the live context stays as it is,
        // since the conversation goes on in it until the eviction.
        let ctx = self.fork_context(&prompt.keys);
        if ctx.keys.len() >= prompt.tokens.len() {
            self.keep_context(ctx);
            return Ok(());
        }
        let pos = ctx.keys.len();
        self.background = Some(Background { ctx, prompt, pos });
        Ok(())
    }

    /// Advances the background preparation by one chunk.
    pub fn background_step(&mut self) {
        let Some(mut bg) = self.background.take() else { return };
        let end = self.chunk_end(&bg.prompt.tokens, bg.pos);
        match self.forward_span(&mut bg.ctx, &bg.prompt, bg.pos, end) {
            Ok(_) => {
                bg.pos = end;
                if bg.pos >= bg.prompt.tokens.len() {
                    self.keep_context(bg.ctx);
                } else {
                    self.background = Some(bg);
                }
            }
            Err(e) => tracing::warn!("background prefill failed: {e}"),
        }
    }

    /// Builds `request`'s context now, in the background's chunks (benchmarks, tests).
    pub fn prepare_now(&mut self, request: &GenerateRequest) -> Result<(), String> {
        self.start_background(request)?;
        while self.background.is_some() {
            self.background_step();
        }
        Ok(())
    }

    /// Whether a background preparation is under way.
    pub fn background_pending(&self) -> bool {
        self.background.is_some()
    }

    /// An image's patches and their hash, from the cache or decoded now.
    fn patches_for(&self, url: &Arc<String>) -> Result<(Arc<vision::Patches>, u64), String> {
        let id = Arc::as_ptr(url) as usize;
        if let Some((weak, patches, hash)) = self.image_cache.borrow().get(&id) {
            if weak.upgrade().is_some_and(|u| Arc::ptr_eq(&u, url)) {
                return Ok((patches.clone(), *hash));
            }
        }
        let bytes = vision::decode_data_url(url).map_err(|e| format!("image: {e}"))?;
        let patches = Arc::new(vision::decode_and_patch(&bytes, self.settings.image_tokens).map_err(|e| format!("image: {e}"))?);
        let mut h = DefaultHasher::new();
        patches.data.iter().for_each(|v| v.to_bits().hash(&mut h));
        let hash = h.finish();
        self.image_cache.borrow_mut().insert(id, (Arc::downgrade(url), patches.clone(), hash));
        Ok((patches, hash))
    }

    /// Pairs each run of audio / image placeholders (in token order) with the
    /// prompt's clips and images (in message order), checking their sizes agree, and
    /// computes every position's key.
    fn media_inputs(&self, tokens: &[u32], prompt: &Rendered) -> Result<(Media, Vec<PositionKey>), String> {
        let c = &self.model.config;
        let device = self.model.device();
        let mut keys: Vec<PositionKey> = tokens.iter().map(|&t| t as PositionKey).collect();
        let audio_runs = placeholder_runs(tokens, c.audio_token_id);
        if audio_runs.len() != prompt.audio.len() {
            return Err("audio placeholders do not match the audio clips".into());
        }
        let mut audio = Vec::with_capacity(audio_runs.len());
        let mut known = self.clip_keys.borrow_mut();
        known.retain(|_, (clip, _)| clip.strong_count() > 0);
        for (&(start, len), samples) in audio_runs.iter().zip(&prompt.audio) {
            if audio_tokens(samples.len()) != len {
                return Err("audio placeholder count does not match the clip length".into());
            }
            // A clip keeps its `Arc` from turn to turn: hash its frames once.
            let id = Arc::as_ptr(samples) as usize;
            let fresh = !matches!(known.get(&id), Some((clip, _)) if clip.upgrade().is_some_and(|c| Arc::ptr_eq(&c, samples)));
            if fresh {
                known.insert(id, (Arc::downgrade(samples), samples.chunks(AUDIO_FRAME).map(frame_key).collect()));
            }
            keys[start..start + len].copy_from_slice(&known[&id].1);
            audio.push((start, samples.clone()));
        }
        drop(known);
        let image_runs = placeholder_runs(tokens, c.image_token_id);
        if image_runs.len() != prompt.images.len() {
            return Err("image placeholders do not match the images".into());
        }
        if !image_runs.is_empty() && !self.model.has_vision() {
            return Err("this checkpoint has no vision embedder; it cannot take images".into());
        }
        let mut images = Vec::with_capacity(image_runs.len());
        for (&(start, len), (p, image_hash)) in image_runs.iter().zip(&prompt.images) {
            if p.positions.len() != len {
                return Err("image placeholder count does not match the image's patches".into());
            }
            for i in 0..len {
                // Bit 62 marks image keys, so `take_context` can tell them from audio.
                keys[start + i] = ((image_hash ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) & !(3 << 62)) | MEDIA_KEY | (1 << 62);
            }
            images.push((start, p.clone()));
        }
        Ok((Media { audio, images, device: device.clone() }, keys))
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
///
/// Tensors are made only for the span being prefilled: in a long session almost every
/// clip and image is already in the cache, and copying them all per request would cost
/// the model thread more than the new turn.
struct Media {
    /// Samples per clip.
    audio: Vec<(usize, Arc<Vec<f32>>)>,
    images: Vec<(usize, Arc<vision::Patches>)>,
    device: Device,
}

impl Media {
    /// Audio frames and images for the placeholders inside `[start, end)`.
    fn slice(&self, start: usize, end: usize) -> candle_core::Result<(Option<Tensor>, Vec<super::gemma4::ImageInput>)> {
        let mut samples = Vec::new();
        for (pos, clip) in &self.audio {
            let (a, b) = (*pos, pos + audio_tokens(clip.len()));
            let (lo, hi) = (a.max(start), b.min(end));
            if lo < hi {
                let from = (lo - a) * AUDIO_FRAME;
                let to = ((hi - a) * AUDIO_FRAME).min(clip.len());
                samples.extend_from_slice(&clip[from..to]);
                // The clip's last frame is zero-padded, as `audio_frames` does.
                samples.resize(samples.len().div_ceil(AUDIO_FRAME) * AUDIO_FRAME, 0.0);
            }
        }
        let audio = if samples.is_empty() { None } else { Some(audio_frames(&samples, &self.device)?) };
        // Prefill chunks never split an image (see `chunk_end` and `take_context`).
        let mut images = Vec::new();
        for (pos, p) in &self.images {
            if *pos >= start && pos + p.positions.len() <= end {
                let patches = Tensor::from_slice(&p.data, (p.positions.len(), vision::PATCH_DIM), &self.device)?;
                images.push(super::gemma4::ImageInput { patches, positions: p.positions.clone() });
            }
        }
        Ok((audio, images))
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

/// A request rendered as Gemma 4 prompt text, with the media its placeholders stand for.
struct Rendered {
    text: String,
    audio: Vec<Arc<Vec<f32>>>,
    /// Each image's patches and a hash of them (the image's cache key).
    images: Vec<(Arc<vision::Patches>, u64)>,
}

/// How images are rendered: cut into patches for the model (through the engine's
/// cache), or only sized from their header for counting tokens — which runs on a
/// session's async task and must not decode pixels.
enum ImageMode<'a> {
    Patches(&'a dyn Fn(&Arc<String>) -> Result<(Arc<vision::Patches>, u64), String>),
    CountOnly,
}

fn render_with(req: &GenerateRequest, image_tokens: usize, add_generation_prompt: bool, mode: ImageMode) -> Result<Rendered, String> {
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
                            // An empty clip renders no placeholders (a turn being opened).
                            if !samples.is_empty() {
                                audio.push(samples.clone());
                            }
                        }
                        UserPart::Image(url) => match &mode {
                            ImageMode::CountOnly => {
                                let bytes = vision::decode_data_url(url).map_err(|e| format!("image: {e}"))?;
                                let tokens = vision::token_count(&bytes, image_tokens).map_err(|e| format!("image: {e}"))?;
                                out.push(Part::Image { tokens });
                            }
                            ImageMode::Patches(patches_for) => {
                                let (patches, hash) = patches_for(url)?;
                                out.push(Part::Image { tokens: patches.positions.len() });
                                images.push((patches, hash));
                            }
                        },
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
    Ok(Rendered { text: template::render_with_options(system, &tools, &turns, add_generation_prompt, options), audio, images })
}
