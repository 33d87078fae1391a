//! The kept KV caches of every session, within a count and a byte budget.
//!
//! A cache belongs to the session (cache key) whose request built it. A request
//! continues a cache in place only when the cache is all prefix of the request, or
//! when it is the request's own (then it is rolled back to where the conversation
//! changed). Another session's cache is never rolled back or taken: where only a
//! prefix of it matches (the shared system and tool prompt), the request forks it —
//! the fork shares the prefix's tensors until its first append copies them — so two
//! sessions speaking in turn never destroy each other's caches. Idle caches are
//! evicted least recently used first; a running generation's cache is outside the
//! pool, so it is never evicted.

use std::time::Instant;

use super::prompt::{is_image_key, PositionKey};
use crate::model::gemma4::KvCache;

/// A KV cache and the keys of the positions it holds.
pub struct CachedContext {
    /// Changes whenever the context leaves the pool, so an open turn that points at
    /// it knows when someone else has taken it.
    pub id: u64,
    /// The session whose conversation this is; `None`: nobody's (a background
    /// preparation, or a request without a cache key).
    pub owner: Option<u64>,
    pub keys: Vec<PositionKey>,
    pub cache: KvCache,
    pub last_used: Instant,
}

impl CachedContext {
    /// Bytes allocated for its keys and values.
    pub fn bytes(&self) -> usize {
        self.cache.allocated_bytes()
    }
}

/// How a request's context came out of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Nothing matched.
    Fresh,
    /// A cache that was all prefix of the request, taken over.
    Continued,
    /// The request's own cache, rolled back to the common prefix.
    RolledBack,
    /// A copy of another cache's common prefix; the original stays.
    Forked,
}

pub struct CachePool {
    contexts: Vec<CachedContext>,
    next_id: u64,
    max_count: usize,
    budget: usize,
}

impl CachePool {
    pub fn new(max_count: usize, budget_bytes: usize) -> Self {
        Self { contexts: Vec::new(), next_id: 1, max_count: max_count.max(1), budget: budget_bytes }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn fresh(&mut self, owner: Option<u64>, cache: KvCache) -> CachedContext {
        CachedContext { id: self.new_id(), owner, keys: Vec::new(), cache, last_used: Instant::now() }
    }

    /// The kept context sharing the longest prefix with `keys`: its index and the
    /// length to resume from (never inside an image: its patches attend to each other,
    /// so the block is prefilled whole; audio is causal, resuming mid-clip is fine).
    fn best_prefix(&self, keys: &[PositionKey]) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (i, ctx) in self.contexts.iter().enumerate() {
            let lcp = ctx.keys.iter().zip(keys).take_while(|(a, b)| a == b).count();
            // Ties go to the most recently used (the live conversation).
            let better = best.is_none_or(|(b, l)| lcp > l || (lcp == l && ctx.last_used > self.contexts[b].last_used));
            if lcp > 0 && better {
                best = Some((i, lcp));
            }
        }
        let (i, mut lcp) = best?;
        while lcp > 0 && lcp < keys.len() && is_image_key(keys[lcp]) && is_image_key(keys[lcp - 1]) {
            lcp -= 1;
        }
        (lcp > 0).then_some((i, lcp))
    }

    /// Length of the longest prefix of `keys` that some kept context holds.
    pub fn prefix_len(&self, keys: &[PositionKey]) -> usize {
        self.best_prefix(keys).map_or(0, |(_, l)| l)
    }

    /// The context a request of `owner` for `keys` continues (see the module doc).
    /// `empty` makes a fresh cache when nothing matches.
    pub fn acquire(&mut self, keys: &[PositionKey], owner: Option<u64>, empty: impl FnOnce() -> KvCache) -> (CachedContext, Reuse) {
        let id = self.new_id();
        if let Some((i, lcp)) = self.best_prefix(keys) {
            let c = &self.contexts[i];
            let free = c.owner.is_none() || c.owner == owner;
            if free && lcp == c.keys.len() {
                let mut ctx = self.contexts.swap_remove(i);
                ctx.id = id;
                ctx.owner = owner;
                ctx.last_used = Instant::now();
                return (ctx, Reuse::Continued);
            }
            if owner.is_some() && c.owner == owner {
                let mut ctx = self.contexts.swap_remove(i);
                // A cache that cannot roll back that far (a sliding layer dropped what
                // the position needs) is stale for its own session too: dropped.
                if ctx.cache.truncate(lcp).unwrap_or(false) {
                    ctx.keys.truncate(lcp);
                    ctx.id = id;
                    ctx.last_used = Instant::now();
                    return (ctx, Reuse::RolledBack);
                }
            } else if let Some(ctx) = self.fork_at(i, lcp, owner) {
                return (ctx, Reuse::Forked);
            }
        }
        let mut ctx = self.fresh(owner, empty());
        ctx.id = id;
        (ctx, Reuse::Fresh)
    }

    /// A copy of the best kept prefix of `keys` (the kept context stays whole), or a
    /// fresh context.
    pub fn fork(&mut self, keys: &[PositionKey], owner: Option<u64>, empty: impl FnOnce() -> KvCache) -> CachedContext {
        if let Some(ctx) = self.best_prefix(keys).and_then(|(i, lcp)| self.fork_at(i, lcp, owner)) {
            return ctx;
        }
        self.fresh(owner, empty())
    }

    fn fork_at(&mut self, i: usize, lcp: usize, owner: Option<u64>) -> Option<CachedContext> {
        let src = &mut self.contexts[i];
        // Cloning shares the tensors; only the fork's own appends allocate.
        let mut cache = src.cache.clone();
        if !cache.truncate(lcp).unwrap_or(false) {
            return None;
        }
        src.last_used = Instant::now();
        let keys = src.keys[..lcp].to_vec();
        let id = self.new_id();
        Some(CachedContext { id, owner, keys, cache, last_used: Instant::now() })
    }

    /// Returns a context to the pool, then evicts the least recently used ones while
    /// the pool holds more than its count or `budget − reserved` bytes (`reserved`:
    /// caches in use outside the pool). A context larger than the room left is not kept.
    pub fn keep(&mut self, mut ctx: CachedContext, reserved: usize) {
        ctx.last_used = Instant::now();
        self.contexts.push(ctx);
        let room = self.budget.saturating_sub(reserved);
        let mut bytes = self.bytes();
        while !self.contexts.is_empty() && (self.contexts.len() > self.max_count || bytes > room) {
            let oldest = self.contexts.iter().enumerate().min_by_key(|(_, c)| c.last_used).map(|(i, _)| i).unwrap_or(0);
            let gone = self.contexts.swap_remove(oldest);
            bytes -= gone.bytes();
        }
    }

    /// Takes the kept context with this id out of the pool.
    pub fn take(&mut self, id: u64) -> Option<CachedContext> {
        let i = self.contexts.iter().position(|c| c.id == id)?;
        Some(self.contexts.swap_remove(i))
    }

    /// Bytes held by the kept caches. A fork's shared prefix counts in both the fork
    /// and its source: the sum errs high, never low.
    pub fn bytes(&self) -> usize {
        self.contexts.iter().map(CachedContext::bytes).sum()
    }

    /// Tokens held by each kept cache, newest use last.
    pub fn lengths(&self) -> Vec<usize> {
        let mut c: Vec<_> = self.contexts.iter().map(|c| (c.last_used, c.keys.len())).collect();
        c.sort();
        c.into_iter().map(|(_, n)| n).collect()
    }

    /// Tokens held by the kept caches of `owner`, longest first.
    pub fn lengths_of(&self, owner: u64) -> Vec<usize> {
        let mut c: Vec<_> = self.contexts.iter().filter(|c| c.owner == Some(owner)).map(|c| c.keys.len()).collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        c
    }

    pub fn clear(&mut self) {
        self.contexts.clear();
    }
}
