//! The KV cache kept across turns: sliding layers hold only their window, global
//! layers grow with the context.
//!
//! Keys are stored after RoPE, so cached entries never need re-rotating; sliding
//! layers drop keys that fall out of the window after each call, keeping
//! [`ROLLBACK_SLACK`] extra positions so the newest tokens can be taken back
//! (a re-tokenised reply, a retracted turn) without re-prefilling everything.

use candle_core::{Result, Tensor};

use super::config::{LayerKind, TextConfig};

/// Positions a sliding layer keeps beyond its window, so [`KvCache::truncate`] can
/// go back this far.
pub const ROLLBACK_SLACK: usize = 512;

#[derive(Clone)]
struct LayerCache {
    kind: LayerKind,
    /// `[kv_heads, len, head_dim]`
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Absolute position of the first cached key.
    start: usize,
}

/// Cloning is cheap (tensors are shared) and the clone is independent: every change
/// makes new tensors.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    window: usize,
    seq_len: usize,
}

impl KvCache {
    pub fn new(cfg: &TextConfig) -> Self {
        Self {
            layers: cfg.layers.iter().map(|l| LayerCache { kind: l.kind, k: None, v: None, start: 0 }).collect(),
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
        let c = &mut self.layers[layer];
        let (k_all, v_all) = match (&c.k, &c.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 1)?, Tensor::cat(&[pv, v], 1)?),
            _ => (k.clone(), v.clone()),
        };
        let key_start = c.start;
        let len = k_all.dim(1)?;
        if c.kind == LayerKind::Sliding && len > keep {
            let drop = len - keep;
            c.k = Some(k_all.narrow(1, drop, keep)?.contiguous()?);
            c.v = Some(v_all.narrow(1, drop, keep)?.contiguous()?);
            c.start += drop;
        } else {
            c.k = Some(k_all.clone());
            c.v = Some(v_all.clone());
        }
        Ok((k_all, v_all, key_start))
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
            if let (Some(k), Some(v)) = (&l.k, &l.v) {
                let keep = len.saturating_sub(l.start);
                if keep == 0 {
                    l.k = None;
                    l.v = None;
                    l.start = len;
                } else {
                    l.k = Some(k.narrow(1, 0, keep)?);
                    l.v = Some(v.narrow(1, 0, keep)?);
                }
            }
        }
        self.seq_len = len;
        Ok(true)
    }

    /// Bytes held by cached keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}
