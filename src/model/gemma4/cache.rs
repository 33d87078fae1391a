//! The KV cache kept across turns: sliding layers hold only their window, global
//! layers grow with the context.
//!
//! Keys are stored after RoPE, so cached entries never need re-rotating; sliding
//! layers drop keys that fall out of the window after each call, keeping
//! [`ROLLBACK_SLACK`] extra positions so the newest tokens can be taken back
//! (a re-tokenised reply, a retracted turn) without re-prefilling everything.
//!
//! Every layer writes each call's keys in place into preallocated buffers (grown by a
//! quarter when full) instead of concatenating the whole cache per token: global
//! layers grow with the context; sliding layers, once their buffer is full, move the
//! newest window (plus slack) to the front of a fresh one, once every few hundred
//! tokens rather than at every token. Clones share those buffers: a clone that writes
//! while another holds them copies first (copy on write), so forks stay independent.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::config::{LayerKind, TextConfig};

/// Positions a sliding layer keeps beyond its window, so [`KvCache::truncate`] can
/// go back this far.
pub const ROLLBACK_SLACK: usize = 512;

/// Positions a sliding layer's buffer has beyond the window and slack after it moves
/// them to a fresh one: it moves again once these are filled (every 128 decode steps,
/// copying the 1.5K kept positions: ~12 per token, against the whole window per token
/// when appending by concatenation).
pub const SLIDING_SPARE: usize = 128;

#[derive(Clone)]
struct LayerCache {
    kind: LayerKind,
    /// `[kv_heads, capacity, head_dim]` buffers of which the first `len` positions are
    /// filled.
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Absolute position of the first cached key.
    start: usize,
    /// Positions filled in the buffers.
    len: usize,
    /// Counts the clones sharing the global buffers: written in place only when alone.
    holders: Arc<()>,
}

/// Capacity for `needed` positions: a quarter more, so appends rarely reallocate.
fn grown(needed: usize) -> usize {
    needed + (needed / 4).max(128)
}

/// Cloning is cheap (tensors are shared) and the clone is independent: sliding layers
/// make new tensors at every change, and a shared global buffer is copied before it
/// is written.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    window: usize,
    seq_len: usize,
}

impl KvCache {
    pub fn new(cfg: &TextConfig) -> Self {
        Self {
            layers: cfg.layers.iter().map(|l| LayerCache { kind: l.kind, k: None, v: None, start: 0, len: 0, holders: Arc::new(()) }).collect(),
            window: cfg.sliding_window,
            seq_len: 0,
        }
    }

    /// Tokens seen so far (the next token's position).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Adds this call's keys/values for `layer`; returns everything the call's
    /// queries may attend to and the absolute position of its first key.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, usize)> {
        let keep = self.window + ROLLBACK_SLACK;
        let window = self.window;
        let c = &mut self.layers[layer];
        if c.kind == LayerKind::Full {
            return c.append_in_place(k, v, 0);
        }
        let n = k.dim(1)?;
        let capacity = c.k.as_ref().map_or(Ok(0), |b| b.dim(1))?;
        if c.len + n > capacity && c.len > keep {
            c.drop_front(c.len - keep, n + SLIDING_SPARE)?;
        }
        // This call's first query (at start + len) sees back to `window - 1` keys before it.
        let first_query = c.start + c.len;
        let skip = (first_query + 1).saturating_sub(window).saturating_sub(c.start);
        c.append_in_place(k, v, skip)
    }

    /// Called once per forward, after every layer appended.
    pub fn advance(&mut self, n: usize) {
        self.seq_len += n;
    }

    /// Forgets every position from `len` on. Returns `false` (and changes nothing)
    /// when a sliding layer no longer holds the window that position `len` needs.
    pub fn truncate(&mut self, len: usize) -> Result<bool> {
        if len >= self.seq_len {
            return Ok(len == self.seq_len);
        }
        // Position `len` attends back to `len - window + 1`.
        let needed = (len + 1).saturating_sub(self.window);
        if self.layers.iter().any(|l| l.kind == LayerKind::Sliding && l.k.is_some() && l.start > needed) {
            return Ok(false);
        }
        for l in self.layers.iter_mut() {
            // The buffers stay; later appends overwrite (or copy, if shared).
            l.len = l.len.min(len.saturating_sub(l.start));
        }
        self.seq_len = len;
        Ok(true)
    }

    /// Bytes of the keys and values of the positions held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes(false)).sum()
    }

    /// Bytes allocated, spare capacity included (what a memory budget must count).
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes(true)).sum()
    }

    /// Positions the global layers' buffers can hold before they next grow.
    pub fn capacity(&self) -> usize {
        self.layers.iter().filter(|l| l.kind == LayerKind::Full).filter_map(|l| l.k.as_ref()).filter_map(|k| k.dim(1).ok()).min().unwrap_or(0)
    }
}

impl LayerCache {
    fn bytes(&self, allocated: bool) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| {
                let elems = match (allocated, t.dims()) {
                    (false, &[h, _, d]) => h * self.len * d,
                    _ => t.elem_count(),
                };
                elems * t.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Forgets the oldest `drop` positions: the rest moves to the front of fresh
    /// buffers with `room` free positions, so clones holding the old ones are unaffected.
    fn drop_front(&mut self, drop: usize, room: usize) -> Result<()> {
        let rest = self.len - drop;
        let cap = rest + room;
        let moved = |old: &Option<Tensor>| -> Result<Option<Tensor>> {
            let Some(old) = old else { return Ok(None) };
            let (h, _, d) = old.dims3()?;
            let buf = Tensor::zeros((h, cap, d), old.dtype(), old.device())?;
            if rest > 0 {
                buf.slice_set(&old.narrow(1, drop, rest)?.contiguous()?, 1, 0)?;
            }
            Ok(Some(buf))
        };
        self.k = moved(&self.k)?;
        self.v = moved(&self.v)?;
        self.holders = Arc::new(());
        self.start += drop;
        self.len = rest;
        Ok(())
    }

    /// Writes `k`, `v` `[kv_heads, n, head_dim]` after the filled positions, growing
    /// (or, when another clone holds the buffers, copying) them first where needed.
    /// Returns the filled positions from `skip` on (a sliding layer's queries do not
    /// see its oldest keys) and the absolute position of the first returned key.
    fn append_in_place(&mut self, k: &Tensor, v: &Tensor, skip: usize) -> Result<(Tensor, Tensor, usize)> {
        let n = k.dim(1)?;
        let needed = self.len + n;
        let capacity = self.k.as_ref().map_or(Ok(0), |b| b.dim(1))?;
        let alone = Arc::strong_count(&self.holders) == 1;
        if needed > capacity || !alone {
            let cap = grown(needed);
            let fresh = |src: &Tensor, old: &Option<Tensor>| -> Result<Tensor> {
                let (h, _, d) = src.dims3()?;
                let buf = Tensor::zeros((h, cap, d), src.dtype(), src.device())?;
                if let Some(old) = old.as_ref().filter(|_| self.len > 0) {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            let (nk, nv) = (fresh(k, &self.k)?, fresh(v, &self.v)?);
            self.k = Some(nk);
            self.v = Some(nv);
            self.holders = Arc::new(());
        }
        let (Some(kb), Some(vb)) = (&self.k, &self.v) else { candle_core::bail!("KV buffers missing") };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = needed;
        let skip = skip.min(needed - 1);
        let keys = kb.narrow(1, skip, needed - skip)?;
        let values = vb.narrow(1, skip, needed - skip)?;
        // With several KV heads the filled part is strided: cuBLAS multiplies by it as it
        // is (a strided batch); the CPU's matrix kernel wants it contiguous.
        let values = if values.device().is_cuda() { values } else { values.contiguous()? };
        Ok((keys, values, self.start + skip))
    }
}
