//! One response in the making, advanced a unit at a time: a prefill chunk while its
//! prompt goes in, then one token per step. The scheduler interleaves these units
//! across requests; a lone caller just advances until it finishes.

use candle_core::Tensor;
use tokio_util::sync::CancellationToken;

use super::cache_pool::CachedContext;
use super::prompt::Prompt;
use super::{emit_parsed, Engine};
use crate::model::gemma4::sampling::{Sampler, SamplingParams};
use crate::model::gemma4::tokenizer::StreamDecoder;
use crate::model::gemma4::tool_call::ToolCallParser;
use crate::model::{BackendEvent, FinishReason, GenerateRequest, TokenUsage};

enum Phase {
    /// Not rendered yet: the prompt is built and its context chosen at the first step.
    Waiting,
    Prefill(CachedContext),
    /// Decoding: `token` was sampled and emitted; the next step runs it through the model.
    Decode(CachedContext, u32),
    Finished,
}

/// What one step left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Running,
    Finished(FinishReason, TokenUsage),
}

pub struct Generation {
    request: GenerateRequest,
    cancel: CancellationToken,
    phase: Phase,
    prompt: Option<Prompt>,
    reused: usize,
    max_new: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    parser: ToolCallParser,
    calls: usize,
    generated: usize,
    /// The reply's text tokens (up to any tool call), remembered for the next turn.
    reply_ids: Vec<u32>,
    in_calls: bool,
    listener_gone: bool,
    /// Prefill chunks run for this request.
    pub prefill_chunks: usize,
}

impl Generation {
    pub fn new(engine: &Engine, request: GenerateRequest, cancel: CancellationToken) -> Self {
        let s = &engine.settings;
        let sampler = Sampler::new(SamplingParams {
            temperature: request.temperature.unwrap_or(s.temperature),
            top_k: s.top_k,
            top_p: request.top_p.or(s.top_p),
            seed: request.seed.unwrap_or(s.seed),
        });
        let max_new = request.max_output_tokens.unwrap_or(s.max_tokens) as usize;
        Self {
            request,
            cancel,
            phase: Phase::Waiting,
            prompt: None,
            reused: 0,
            max_new,
            sampler,
            decoder: StreamDecoder::new(),
            parser: ToolCallParser::new(),
            calls: 0,
            generated: 0,
            reply_ids: Vec::new(),
            in_calls: false,
            listener_gone: false,
            prefill_chunks: 0,
        }
    }

    /// Whether the request was cancelled or its listener is gone.
    pub fn stopped(&self) -> bool {
        self.cancel.is_cancelled() || self.listener_gone
    }

    /// Bytes of the KV cache this generation holds outside the pool.
    pub fn cache_bytes(&self) -> usize {
        match &self.phase {
            Phase::Prefill(c) | Phase::Decode(c, _) => c.bytes(),
            Phase::Waiting | Phase::Finished => 0,
        }
    }

    /// Whether its next unit is a decode step.
    pub fn decoding(&self) -> bool {
        matches!(self.phase, Phase::Decode(..))
    }

    /// The token a decoding generation runs next, without taking it.
    pub fn next_token(&self) -> Option<u32> {
        match &self.phase {
            Phase::Decode(_, t) => Some(*t),
            _ => None,
        }
    }

    /// A decoding generation's context and next token, taken out for a batched step
    /// (hand them back through [`Engine::decoded`]).
    pub(super) fn take_decode(&mut self) -> Option<(CachedContext, u32)> {
        match std::mem::replace(&mut self.phase, Phase::Finished) {
            Phase::Decode(ctx, t) => Some((ctx, t)),
            other => {
                self.phase = other;
                None
            }
        }
    }

    fn usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.prompt.as_ref().map_or(0, |p| p.tokens.len()) as u32,
            output_tokens: self.generated as u32,
            cached_input_tokens: self.reused as u32,
        }
    }

    fn send(&mut self, ev: BackendEvent, emit: &mut dyn FnMut(BackendEvent) -> bool) {
        if !self.listener_gone && !emit(ev) {
            self.listener_gone = true;
        }
    }
}

impl Engine {
    /// Runs one unit of `g`: its next prefill chunk (the first also renders the prompt
    /// and picks its cache), or one decode step. A stopped generation finishes here
    /// without touching the model. `emit` returns false once the listener is gone,
    /// which stops the generation like a cancel.
    pub fn advance(&mut self, g: &mut Generation, emit: &mut dyn FnMut(BackendEvent) -> bool) -> Result<Progress, String> {
        match std::mem::replace(&mut g.phase, Phase::Finished) {
            Phase::Finished => Err("the generation has finished".into()),
            Phase::Waiting if g.stopped() => Ok(Progress::Finished(FinishReason::Cancelled, g.usage())),
            Phase::Waiting => {
                let prompt = self.prompt(&g.request, true)?;
                self.adopt_background_if_better(&prompt.keys);
                let model = &self.model;
                let (mut ctx, reuse) = self.pool.acquire(&prompt.keys, g.request.cache_key, || model.new_cache());
                self.last_reuse = Some(reuse);
                let len = prompt.tokens.len();
                g.reused = ctx.keys.len();
                self.last_prefill = (g.reused, len - g.reused);
                if g.reused >= len {
                    // Everything was cached: recompute the last position's logits.
                    ctx.cache.truncate(len - 1).map_err(|e| e.to_string())?;
                    ctx.keys.truncate(len - 1);
                }
                g.prompt = Some(prompt);
                self.prefill_step(g, ctx, emit)
            }
            Phase::Prefill(ctx) if g.stopped() => {
                // Keep what was prefilled: the next turn will reuse it.
                self.keep_context(ctx);
                Ok(Progress::Finished(FinishReason::Cancelled, g.usage()))
            }
            Phase::Prefill(ctx) => self.prefill_step(g, ctx, emit),
            Phase::Decode(ctx, _) if g.stopped() => self.finish(g, ctx, FinishReason::Cancelled, emit),
            Phase::Decode(mut ctx, token) => {
                let logits = self.forward_token(&mut ctx, token)?;
                self.stats.decode_steps += 1;
                self.pick(g, ctx, &logits, emit)
            }
        }
    }

    fn prefill_step(&mut self, g: &mut Generation, mut ctx: CachedContext, emit: &mut dyn FnMut(BackendEvent) -> bool) -> Result<Progress, String> {
        let prompt = g.prompt.as_ref().ok_or("no prompt")?;
        let pos = ctx.keys.len();
        let end = self.chunk_end(&prompt.tokens, pos);
        // On error the cache may be half-written: it is dropped, never kept.
        let logits = self.forward_span(&mut ctx, prompt, pos, end)?;
        g.prefill_chunks += 1;
        self.stats.prefill_chunks += 1;
        if end < prompt.tokens.len() {
            g.phase = Phase::Prefill(ctx);
            return Ok(Progress::Running);
        }
        // The first token goes out with the prompt's last chunk, not a round later.
        self.pick(g, ctx, &logits, emit)
    }

    /// Completes a decode step whose forward ran in a batch: `logits` `[1, vocab]`
    /// are the row of `g`'s token, already appended to `ctx`.
    pub(super) fn decoded(&mut self, g: &mut Generation, ctx: CachedContext, logits: &Tensor, emit: &mut dyn FnMut(BackendEvent) -> bool) -> Result<Progress, String> {
        self.stats.decode_steps += 1;
        self.pick(g, ctx, logits, emit)
    }

    /// Samples the next token from `logits` and emits it; decides whether to go on.
    fn pick(&mut self, g: &mut Generation, mut ctx: CachedContext, logits: &Tensor, emit: &mut dyn FnMut(BackendEvent) -> bool) -> Result<Progress, String> {
        let max_ctx = self.model.config.text.max_position_embeddings;
        if g.generated >= g.max_new || ctx.cache.seq_len() + 1 >= max_ctx {
            return self.finish(g, ctx, FinishReason::Length, emit);
        }
        if g.stopped() {
            return self.finish(g, ctx, FinishReason::Cancelled, emit);
        }
        let row: Vec<f32> = logits.squeeze(0).and_then(|l| l.to_vec1()).map_err(|e| e.to_string())?;
        let next = g.sampler.sample(&row);
        if g.generated == 0 {
            self.last_logits = Some(row);
        }
        g.generated += 1;
        if self.stop_ids.contains(&next) {
            let is_tool_response = self.tokenizer.token_id("<|tool_response>") == Some(next);
            let finish = if is_tool_response || g.calls > 0 { FinishReason::ToolCalls } else { FinishReason::Stop };
            if is_tool_response {
                // The runtime appends the results after this marker: keep it in context.
                self.forward_token(&mut ctx, next)?;
            }
            return self.finish(g, ctx, finish, emit);
        }
        g.in_calls |= Some(next) == self.tokenizer.token_id("<|tool_call>");
        if !g.in_calls {
            g.reply_ids.push(next);
        }
        let delta = g.decoder.push(&self.tokenizer, next).map_err(|e| e.to_string())?;
        for ev in g.parser.push(&delta) {
            let mut out = Vec::new();
            emit_parsed(ev, &mut g.calls, &mut |e| out.push(e));
            for e in out {
                g.send(e, emit);
            }
        }
        if g.generated == g.max_new {
            // The reply is over: its last token enters the cache with the next turn.
            return self.finish(g, ctx, FinishReason::Length, emit);
        }
        g.phase = Phase::Decode(ctx, next);
        Ok(Progress::Running)
    }

    fn finish(&mut self, g: &mut Generation, ctx: CachedContext, mut finish: FinishReason, emit: &mut dyn FnMut(BackendEvent) -> bool) -> Result<Progress, String> {
        let mut out = Vec::new();
        for ev in g.parser.finish() {
            emit_parsed(ev, &mut g.calls, &mut |e| out.push(e));
        }
        for e in out {
            g.send(e, emit);
        }
        if finish == FinishReason::Stop && g.calls > 0 {
            finish = FinishReason::ToolCalls;
        }
        let reply_ids = std::mem::take(&mut g.reply_ids);
        self.remember_reply(reply_ids);
        self.keep_context(ctx);
        Ok(Progress::Finished(finish, g.usage()))
    }
}
