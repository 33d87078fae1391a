//! The embedded engine: Gemma 4 and everything kept beside it on the model thread.
//!
//! Requests are rendered with the Gemma 4 chat template and tokenized ([`prompt`]);
//! each continues or forks a kept KV cache ([`cache_pool`]) so a turn only prefills
//! what is new. A response advances a prefill chunk or a decode step at a time
//! ([`generation`]); the [`scheduler`] interleaves those units across sessions,
//! streamed user audio first. Generation streams text deltas, turns `<|tool_call>`
//! blocks into tool-call events, stops on `<eos>`, `<turn|>` or `<|tool_response>`,
//! and checks for cancellation at every unit.

pub mod cache_pool;
pub mod generation;
pub mod prompt;
pub mod scheduler;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::embedded::{EmbeddedError, EmbeddedSettings};
use super::gemma4::template;
use super::gemma4::tokenizer::Gemma4Tokenizer;
use super::gemma4::tool_call::ParsedEvent;
use super::gemma4::vision;
use super::gemma4::{audio_frames, loader, ForwardInput, Gemma4Model};
use super::{BackendEvent, ChatMessage, FinishReason, GenerateRequest, TokenUsage, UserPart};
pub use cache_pool::Reuse;
use cache_pool::{CachePool, CachedContext};
use generation::{Generation, Progress};
use prompt::{frame_key, PositionKey, Prompt, AUDIO_FRAME};
use scheduler::Running;

/// Tokens prefilled per forward call: bounds the attention scratch memory, and is the
/// longest another session's decode step waits behind a prefill.
pub const PREFILL_CHUNK: usize = 512;

/// Most replies remembered for re-splicing.
const MAX_REMEMBERED_REPLIES: usize = 64;

/// A user turn being prefilled while the user speaks.
struct OpenTurn {
    /// The kept context holding the turn (gone from the pool: the turn is over).
    context: u64,
    /// Position of the turn's `<|turn>`: a retraction truncates back to here.
    turn_start: usize,
    /// The context before the turn's audio, while it is still being prefilled.
    base: Option<Prompt>,
    /// Position of the turn's first audio frame.
    audio_at: usize,
    /// Samples received but not yet prefilled.
    pending: Vec<f32>,
    signals: mpsc::UnboundedSender<f32>,
}

impl OpenTurn {
    fn has_work(&self) -> bool {
        self.base.is_some() || self.pending.len() >= AUDIO_FRAME
    }
}

/// A context being prefilled in the background, a chunk at a time.
struct Background {
    ctx: CachedContext,
    prompt: Prompt,
}

/// Work counters, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub prefill_chunks: u64,
    /// Tokens decoded (one per sequence per step).
    pub decode_steps: u64,
    /// Batched forwards of several sequences' decode tokens.
    pub decode_batches: u64,
    pub turn_steps: u64,
    pub background_chunks: u64,
}

/// Owns the model; lives on the model thread.
pub struct Engine {
    model: Gemma4Model,
    tokenizer: Arc<Gemma4Tokenizer>,
    settings: EmbeddedSettings,
    pool: CachePool,
    open_turns: HashMap<u64, OpenTurn>,
    background: Option<Background>,
    stop_ids: Vec<u32>,
    /// Generations in progress, in arrival order.
    running: Vec<Running>,
    /// The next generation to advance (round robin).
    cursor: usize,
    /// One generation at a time, in arrival order (benchmarks compare against it).
    fifo: bool,
    /// Whether the next unit is the decode batch (else a prefill chunk): they alternate.
    decode_next: bool,
    pub stats: EngineStats,
    /// Tokens reused from a kept cache and tokens prefilled, for the last request.
    pub last_prefill: (usize, usize),
    /// How the last request's context came out of the pool.
    pub last_reuse: Option<Reuse>,
    /// The logits that chose the last request's first generated token (for tests).
    pub last_logits: Option<Vec<f32>>,
    /// Decoded images by their URL's `Arc` (checked through the weak reference): an
    /// image is decoded, resized and hashed once, not at every turn that follows it.
    image_cache: RefCell<HashMap<usize, (std::sync::Weak<String>, Arc<vision::Patches>, u64)>>,
    /// Frame keys of recent audio clips, by the clip's address (checked through the
    /// weak reference), so a long conversation's audio is hashed once, not per turn.
    clip_keys: RefCell<HashMap<usize, (std::sync::Weak<Vec<i16>>, Vec<PositionKey>)>>,
    /// Recent replies as the model produced them: (text, token ids). Re-encoding a
    /// reply's text can give other ids than the ones generated (BPE is not unique),
    /// which would break the cached prefix at every past reply; splicing the original
    /// ids back keeps the history token-identical to what the model saw.
    replies: Vec<(String, Vec<u32>)>,
    /// KV bytes held, recorded after each unit of work for `/metrics` (read from
    /// other threads).
    pub kv_bytes: Arc<std::sync::atomic::AtomicU64>,
}

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
            pool: CachePool::new(settings.cached_sessions, settings.kv_budget_mb.saturating_mul(1 << 20)),
            open_turns: HashMap::new(),
            background: None,
            stop_ids,
            running: Vec::new(),
            cursor: 0,
            fifo: false,
            decode_next: true,
            stats: EngineStats::default(),
            last_prefill: (0, 0),
            last_reuse: None,
            last_logits: None,
            clip_keys: RefCell::new(HashMap::new()),
            image_cache: RefCell::new(HashMap::new()),
            replies: Vec::new(),
            kv_bytes: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Bytes of every KV cache held: kept sessions, running answers, the background.
    pub fn kv_bytes_held(&self) -> usize {
        self.pool.bytes() + self.reserved_bytes()
    }

    pub fn tokenizer(&self) -> &Arc<Gemma4Tokenizer> {
        &self.tokenizer
    }

    /// Drops every kept KV cache (remembered replies stay).
    pub fn clear_caches(&mut self) {
        self.pool.clear();
        self.open_turns.clear();
        self.background = None;
    }

    pub fn model(&self) -> &Gemma4Model {
        &self.model
    }

    /// Tokens held by each kept cache, newest use last.
    pub fn cached_lengths(&self) -> Vec<usize> {
        self.pool.lengths()
    }

    /// Tokens held by the kept caches of the session with this cache key, longest first.
    pub fn cached_lengths_of(&self, cache_key: u64) -> Vec<usize> {
        self.pool.lengths_of(cache_key)
    }

    /// Bytes held by the kept (idle) caches.
    pub fn pool_bytes(&self) -> usize {
        self.pool.bytes()
    }

    /// The KV byte budget (`kv_budget_mb`).
    pub fn kv_budget(&self) -> usize {
        self.pool.budget()
    }

    /// Bytes of caches in use outside the pool: running generations and the background.
    fn reserved_bytes(&self) -> usize {
        self.running.iter().map(|r| r.gen.cache_bytes()).sum::<usize>() + self.background.as_ref().map_or(0, |b| b.ctx.bytes())
    }

    fn keep_context(&mut self, ctx: CachedContext) {
        let reserved = self.reserved_bytes();
        self.pool.keep(ctx, reserved);
        // Recorded here too (not only after each unit) so that a response's `Done`,
        // which follows, never overtakes the figure that includes its cache.
        self.kv_bytes.store(self.kv_bytes_held() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Renders, prefills what is new, and generates, alone (the scheduler interleaves
    /// the same units across requests). `emit` returns false once the listener is
    /// gone (which stops generation like a cancel).
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        cancel: &CancellationToken,
        emit: &dyn Fn(BackendEvent) -> bool,
    ) -> Result<(FinishReason, TokenUsage), String> {
        let mut g = Generation::new(self, request.clone(), cancel.clone());
        let mut emit = |ev| emit(ev);
        loop {
            if let Progress::Finished(finish, usage) = self.advance(&mut g, &mut emit)? {
                return Ok((finish, usage));
            }
        }
    }

    fn remember_reply(&mut self, reply_ids: Vec<u32>) {
        if reply_ids.is_empty() {
            return;
        }
        if let Ok(text) = self.tokenizer.decode(&reply_ids) {
            self.replies.retain(|(t, _)| t != &text);
            self.replies.push((text, reply_ids));
            if self.replies.len() > MAX_REMEMBERED_REPLIES {
                self.replies.remove(0);
            }
        }
    }

    fn forward_span(&self, ctx: &mut CachedContext, prompt: &Prompt, start: usize, end: usize) -> Result<Tensor, String> {
        let (audio, images) = prompt.media.slice(start, end).map_err(|e| e.to_string())?;
        let input = ForwardInput { tokens: &prompt.tokens[start..end], audio_frames: audio.as_ref(), images: &images, all_logits: false };
        let logits = self.model.forward(&input, &mut ctx.cache).map_err(|e| e.to_string())?;
        ctx.keys.extend_from_slice(&prompt.keys[start..end]);
        Ok(logits)
    }

    fn forward_token(&self, ctx: &mut CachedContext, token: u32) -> Result<Tensor, String> {
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

    /// A half-built background context that serves `keys` better than every kept one
    /// goes into the pool as it stands (the request prefills the rest); otherwise the
    /// preparation goes on undisturbed once the request is done.
    fn adopt_background_if_better(&mut self, keys: &[PositionKey]) {
        let Some(bg) = &self.background else { return };
        let lcp = bg.ctx.keys.iter().zip(keys).take_while(|(a, b)| a == b).count();
        if lcp > self.pool.prefix_len(keys) {
            if let Some(bg) = self.background.take() {
                self.keep_context(bg.ctx);
            }
        }
    }

    /// Opens a streamed user turn: `base` followed by the opening of a user audio turn
    /// (`<|turn>user\n<|audio>`) is prefilled a chunk at a time ([`Self::turn_step`]),
    /// then frames as they arrive.
    fn begin_turn(&mut self, stream: u64, base: &GenerateRequest, signals: mpsc::UnboundedSender<f32>) -> Result<(), String> {
        let mut request = base.clone();
        request.messages.push(ChatMessage::User(vec![UserPart::Audio(Arc::new(Vec::new()))]));
        let prompt = self.prompt(&request, false)?;
        let boa = self.tokenizer.token_id(template::AUDIO_START).ok_or("the tokenizer has no <|audio>")?;
        let turn_open = self.tokenizer.token_id(template::TURN_START).ok_or("the tokenizer has no <|turn>")?;
        let audio_at = prompt.tokens.iter().rposition(|&t| t == boa).ok_or("no audio opening in the rendered turn")? + 1;
        let turn_start = prompt.tokens[..audio_at].iter().rposition(|&t| t == turn_open).ok_or("no turn opening")?;
        self.adopt_background_if_better(&prompt.keys[..audio_at]);
        let model = &self.model;
        let (ctx, _) = self.pool.acquire(&prompt.keys[..audio_at], base.cache_key, || model.new_cache());
        let context = ctx.id;
        let base = (ctx.keys.len() < audio_at).then_some(prompt);
        self.keep_context(ctx);
        self.open_turns.insert(stream, OpenTurn { context, turn_start, base, audio_at, pending: Vec::new(), signals });
        Ok(())
    }

    /// One unit of a streamed turn: a chunk of its base context, or the whole frames
    /// received so far (at most a chunk's worth), reporting the end-of-turn probability.
    fn turn_step(&mut self, stream: u64) -> Result<(), String> {
        let Some(mut turn) = self.open_turns.remove(&stream) else { return Ok(()) };
        // Taken by a request meanwhile (or evicted): the turn is over.
        let Some(mut ctx) = self.pool.take(turn.context) else { return Ok(()) };
        self.stats.turn_steps += 1;
        if let Some(prompt) = &turn.base {
            let pos = ctx.keys.len();
            let end = self.chunk_end(&prompt.tokens[..turn.audio_at], pos);
            // On error the cache may be half-written: it is dropped with the turn.
            self.forward_span(&mut ctx, prompt, pos, end)?;
            if end >= turn.audio_at {
                turn.base = None;
            }
            self.keep_context(ctx);
            self.open_turns.insert(stream, turn);
            return Ok(());
        }
        let frames = (turn.pending.len() / AUDIO_FRAME).min(PREFILL_CHUNK);
        if frames == 0 {
            self.keep_context(ctx);
            self.open_turns.insert(stream, turn);
            return Ok(());
        }
        let chunk: Vec<f32> = turn.pending.drain(..frames * AUDIO_FRAME).collect();
        let tokens = vec![self.model.config.audio_token_id; frames];
        let frames_t = audio_frames(&chunk, self.model.device()).map_err(|e| e.to_string())?;
        let input = ForwardInput { tokens: &tokens, audio_frames: Some(&frames_t), images: &[], all_logits: false };
        let logits = self.model.forward(&input, &mut ctx.cache).map_err(|e| e.to_string())?;
        ctx.keys.extend(chunk.chunks(AUDIO_FRAME).map(frame_key));
        let p_end = self.end_of_turn_probability(&logits)?;
        self.keep_context(ctx);
        let _ = turn.signals.send(p_end);
        self.open_turns.insert(stream, turn);
        Ok(())
    }

    /// Runs a streamed turn's pending work, reporting (and ending the turn on) an error.
    fn turn_work(&mut self, stream: u64) -> Result<(), String> {
        while self.open_turns.get(&stream).is_some_and(OpenTurn::has_work) {
            self.turn_step(stream)?;
        }
        Ok(())
    }

    /// Prefills `base` followed by the opening of a user audio turn, ready for frames
    /// (all at once; the scheduler does it a chunk at a time).
    pub fn open_turn(&mut self, stream: u64, base: &GenerateRequest, signals: mpsc::UnboundedSender<f32>) -> Result<(), String> {
        self.begin_turn(stream, base, signals)?;
        self.turn_work(stream)
    }

    /// Prefills the whole frames among `samples` (plus any left over from before) into
    /// the stream's turn and reports the end-of-turn probability.
    pub fn turn_audio(&mut self, stream: u64, samples: &[f32]) -> Result<(), String> {
        let Some(turn) = self.open_turns.get_mut(&stream) else { return Ok(()) };
        turn.pending.extend_from_slice(samples);
        self.turn_work(stream)
    }

    /// Probability mass on the tokens that close an audio turn (`<audio|>`, `<turn|>`):
    /// the log-sum-exp over the vocabulary is reduced on the device and only the two
    /// logits and that scalar come back to the host.
    fn end_of_turn_probability(&self, logits: &Tensor) -> Result<f32, String> {
        let ids: Vec<u32> = [template::AUDIO_END, template::TURN_END].iter().filter_map(|t| self.tokenizer.token_id(t)).collect();
        if ids.is_empty() {
            return Ok(0.0);
        }
        let p = (|| -> candle_core::Result<f32> {
            let logits = logits.to_dtype(DType::F32)?.flatten_all()?;
            let max = logits.max_keepdim(D::Minus1)?;
            let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
            let picked = logits.index_select(&Tensor::new(ids.as_slice(), logits.device())?, 0)?;
            let probs: Vec<f32> = picked.broadcast_sub(&lse)?.exp()?.to_vec1()?;
            Ok(probs.iter().sum())
        })()
        .map_err(|e| e.to_string())?;
        Ok(p.clamp(0.0, 1.0))
    }

    /// Forgets a streamed turn: its context goes back to before `<|turn>`. A context
    /// that can no longer roll back that far (a sliding layer dropped what it needs)
    /// is discarded, so nothing stale is ever reused.
    pub fn retract_turn(&mut self, stream: u64) -> Result<(), String> {
        let Some(turn) = self.open_turns.remove(&stream) else { return Ok(()) };
        let Some(mut ctx) = self.pool.take(turn.context) else { return Ok(()) };
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
        let model = &self.model;
        let ctx = self.pool.fork(&prompt.keys, request.cache_key, || model.new_cache());
        if ctx.keys.len() >= prompt.tokens.len() {
            self.keep_context(ctx);
            return Ok(());
        }
        self.background = Some(Background { ctx, prompt });
        Ok(())
    }

    /// Advances the background preparation by one chunk.
    pub fn background_step(&mut self) {
        let Some(mut bg) = self.background.take() else { return };
        let pos = bg.ctx.keys.len();
        let end = self.chunk_end(&bg.prompt.tokens, pos);
        self.stats.background_chunks += 1;
        match self.forward_span(&mut bg.ctx, &bg.prompt, pos, end) {
            Ok(_) if end >= bg.prompt.tokens.len() => self.keep_context(bg.ctx),
            Ok(_) => self.background = Some(bg),
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
}

pub(crate) fn emit_parsed(ev: ParsedEvent, calls: &mut usize, send: &mut dyn FnMut(BackendEvent)) {
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
