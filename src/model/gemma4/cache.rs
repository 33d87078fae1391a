//! The KV cache kept across turns: sliding layers hold only their window, global
//! layers grow with the context.
//!
//! Keys are stored after RoPE, so cached entries never need re-rotating; sliding
//! layers drop keys that fall out of the window after each call.

use candle_core::{Result, Tensor};

use super::config::{LayerKind, TextConfig};

struct LayerCache {
    kind: LayerKind,
    /// `[kv_heads, len, head_dim]`
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Absolute position of the first cached key.
    start: usize,
}

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
        let window = self.window;
        let c = &mut self.layers[layer];
        let (k_all, v_all) = match (&c.k, &c.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 1)?, Tensor::cat(&[pv, v], 1)?),
            _ => (k.clone(), v.clone()),
        };
        let key_start = c.start;
        let len = k_all.dim(1)?;
        if c.kind == LayerKind::Sliding && len > window {
            let drop = len - window;
            c.k = Some(k_all.narrow(1, drop, window)?.contiguous()?);
            c.v = Some(v_all.narrow(1, drop, window)?.contiguous()?);
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
