//! The rolling context window: which of a session's items the model sees, and what
//! each costs in tokens.
//!
//! A session's conversation is cut into **turns**: a turn starts at a user message and
//! runs to the next one, so a model's tool calls and their results always share a turn.
//! System messages and pinned items stand alone and are never evicted.
//!
//! Policy (in the spirit of OpenAI's `truncation: {type: retention_ratio}` and Gemini's
//! sliding window): while the prompt fits in `max_tokens`, nothing happens. When it
//! would not, whole turns are dropped oldest-first until the prompt is at most
//! `retention_ratio × max_tokens`, so evictions are rare and each frees a large block.
//!
//! Eviction without a pause: the embedded model's KV cache cannot simply drop the
//! oldest turns. Sliding-window layers only hold their last 1024 positions, but every
//! token of a global layer has attended to the evicted turns, so its keys and values
//! (and all positions) change. hark re-prefills the retained window, **ahead of
//! time and in the background**: once the prompt passes the halfway mark between the
//! retention target and the limit, the window that will remain is planned and handed to
//! [`crate::model::Backend::prepare`]; the model thread prefills it in chunks while it
//! has nothing else to do. When the limit is reached the planned turns are dropped and
//! the next request finds that cache ready, prefilling only what came since. The
//! result equals a fresh prefill of the retained context (tested), at the cost of a
//! second cache while the preparation lives (≈ 16 KiB per token on the 12B in bf16).
//!
//! Counts are exact for the embedded model (its own template and tokenizer, see
//! [`crate::model::TokenCounter`]) and estimates for remote servers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{ChatMessage, TokenCounter, ToolSpec};

/// When the window fills and how far it is cut back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetentionPolicy {
    /// The most prompt tokens a request may carry.
    pub max_tokens: usize,
    /// After an eviction the prompt holds at most this fraction of `max_tokens`.
    pub retention_ratio: f32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self { max_tokens: 262_144, retention_ratio: 0.8 }
    }
}

impl RetentionPolicy {
    fn target(&self) -> usize {
        (self.max_tokens as f64 * self.retention_ratio.clamp(0.0, 1.0) as f64) as usize
    }

    /// Past this, the window after the next eviction is prepared in the background.
    fn prepare_at(&self) -> usize {
        (self.target() + self.max_tokens) / 2
    }
}

/// What the window needs to know of one conversation item.
#[derive(Debug, Clone)]
pub struct WindowItem {
    pub id: String,
    pub kind: WindowItemKind,
    /// Never evicted (system messages, items the client pinned).
    pub pinned: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowItemKind {
    /// A user message: starts a turn.
    User,
    /// A tool call, awaiting its output.
    Call,
    /// A tool call's output.
    CallOutput,
    /// Anything else (assistant text, system messages).
    Other,
}

/// A run of items evicted together.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// Index of the first item and number of items.
    pub start: usize,
    pub len: usize,
    pub pinned: bool,
    pub tokens: usize,
}

/// The window's verdict for one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Items to drop now, oldest first.
    pub evict: Vec<String>,
    /// Prompt tokens before and after the eviction.
    pub tokens_before: usize,
    pub tokens_after: usize,
    /// Items a later eviction will drop, for [`crate::model::Backend::prepare`]; set
    /// once per planned cut.
    pub prepare: Option<Vec<String>>,
}

/// Splits items into turns: a turn starts at a user message, unless a tool call is
/// still waiting for its output (a call and its result are never separated); pinned
/// items stand alone.
pub fn turns(items: &[WindowItem]) -> Vec<Turn> {
    let mut out: Vec<Turn> = Vec::new();
    let mut open_calls = 0usize;
    for (i, it) in items.iter().enumerate() {
        let starts = match out.last() {
            None => true,
            Some(last) => it.pinned || last.pinned || (it.kind == WindowItemKind::User && open_calls == 0),
        };
        match it.kind {
            WindowItemKind::Call => open_calls += 1,
            WindowItemKind::CallOutput => open_calls = open_calls.saturating_sub(1),
            _ => {}
        }
        if starts {
            out.push(Turn { start: i, len: 1, pinned: it.pinned, tokens: 0 });
        } else if let Some(last) = out.last_mut() {
            last.len += 1;
        }
    }
    out
}

/// Token accounting and the eviction policy for one session.
pub struct ContextWindow {
    policy: RetentionPolicy,
    counter: Arc<dyn TokenCounter>,
    /// Tokens of each turn, keyed by its item ids (a turn's items only ever grow at the end).
    turn_tokens: HashMap<String, usize>,
    /// Fixed costs: `<bos>` + system turn with tools, keyed by their text.
    preamble: Option<(u64, usize)>,
    generation_prompt: Option<usize>,
    /// The items already handed to `prepare` (the planned cut).
    prepared: Option<Vec<String>>,
}

impl ContextWindow {
    pub fn new(policy: RetentionPolicy, counter: Arc<dyn TokenCounter>) -> Self {
        Self { policy, counter, turn_tokens: HashMap::new(), preamble: None, generation_prompt: None, prepared: None }
    }

    /// Tokens of the fixed part of every prompt: `<bos>`, instructions and tool declarations.
    fn preamble_tokens(&mut self, instructions: &str, tools: &[ToolSpec]) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        instructions.hash(&mut h);
        for t in tools {
            t.name.hash(&mut h);
            t.description.hash(&mut h);
            t.parameters.to_string().hash(&mut h);
        }
        let key = h.finish();
        match self.preamble {
            Some((k, n)) if k == key => n,
            _ => {
                let n = self.counter.count(instructions, tools, &[], false);
                self.preamble = Some((key, n));
                n
            }
        }
    }

    fn generation_prompt_tokens(&mut self) -> usize {
        *self.generation_prompt.get_or_insert_with(|| {
            self.counter.count("", &[], &[], true).saturating_sub(self.counter.count("", &[], &[], false))
        })
    }

    /// Tokens a turn adds to a prompt. Rendered followed by an empty user turn, so a
    /// model turn left open by tool results is counted with the `<turn|>` that closes
    /// it in context.
    fn count_turn(&self, messages: &[ChatMessage]) -> usize {
        let closer = ChatMessage::User(Vec::new());
        let mut with = messages.to_vec();
        with.push(closer.clone());
        let a = self.counter.count("", &[], &with, false);
        let b = self.counter.count("", &[], &[closer], false);
        a.saturating_sub(b)
    }

    /// Counts every turn (cached), returning the turns and the whole prompt's tokens.
    /// `messages_of(start, len)` gives the chat messages of a run of items.
    pub fn measure(
        &mut self,
        items: &[WindowItem],
        instructions: &str,
        tools: &[ToolSpec],
        messages_of: &dyn Fn(usize, usize) -> Vec<ChatMessage>,
    ) -> (Vec<Turn>, usize) {
        let mut turns = turns(items);
        let mut total = self.preamble_tokens(instructions, tools) + self.generation_prompt_tokens();
        let mut live = HashMap::with_capacity(turns.len());
        for t in turns.iter_mut() {
            let key: String = items[t.start..t.start + t.len].iter().map(|i| i.id.as_str()).collect::<Vec<_>>().join("\u{1f}");
            let n = match self.turn_tokens.get(&key) {
                Some(&n) => n,
                None => self.count_turn(&messages_of(t.start, t.len)),
            };
            t.tokens = n;
            total += n;
            live.insert(key, n);
        }
        // Only the turns that still exist stay cached.
        self.turn_tokens = live;
        (turns, total)
    }

    /// Decides what to evict before a request (and what to prepare for later).
    pub fn plan(&mut self, items: &[WindowItem], turns: &[Turn], total: usize) -> Plan {
        let mut plan = Plan { tokens_before: total, tokens_after: total, ..Default::default() };
        let ids = |cut: &[usize]| -> Vec<String> {
            cut.iter().flat_map(|&t| items[turns[t].start..turns[t].start + turns[t].len].iter().map(|i| i.id.clone())).collect()
        };
        if total > self.policy.max_tokens {
            // Use the prepared cut if it is still all there and enough: its cache is ready.
            let prepared = self.prepared.take().filter(|p| p.iter().all(|id| items.iter().any(|i| &i.id == id)));
            let (cut, after) = match prepared {
                Some(p) => {
                    let freed: usize = turns
                        .iter()
                        .filter(|t| items[t.start..t.start + t.len].iter().all(|i| p.contains(&i.id)))
                        .map(|t| t.tokens)
                        .sum();
                    if total - freed <= self.policy.max_tokens {
                        (p, total - freed)
                    } else {
                        let (c, a) = cut_to(turns, total, self.policy.target());
                        (ids(&c), a)
                    }
                }
                None => {
                    let (c, a) = cut_to(turns, total, self.policy.target());
                    (ids(&c), a)
                }
            };
            plan.evict = cut;
            plan.tokens_after = after;
            return plan;
        }
        if total > self.policy.prepare_at() && self.prepared.is_none() {
            let (c, _) = cut_to(turns, total, self.policy.target());
            if !c.is_empty() {
                let cut = ids(&c);
                self.prepared = Some(cut.clone());
                plan.prepare = Some(cut);
            }
        }
        plan
    }
}

/// Oldest evictable turns to drop so that `total` falls to `target`. The newest turn
/// (the one being answered) always stays.
fn cut_to(turns: &[Turn], total: usize, target: usize) -> (Vec<usize>, usize) {
    let mut cut = Vec::new();
    let mut left = total;
    let last = turns.len().saturating_sub(1);
    for (i, t) in turns.iter().enumerate() {
        if left <= target || i >= last {
            break;
        }
        if t.pinned {
            continue;
        }
        cut.push(i);
        left -= t.tokens;
    }
    (cut, left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EstimatedTokens;

    fn item(id: &str, kind: WindowItemKind, pinned: bool) -> WindowItem {
        WindowItem { id: id.into(), kind, pinned }
    }

    #[test]
    fn turns_keep_calls_with_their_results_and_pins_alone() {
        use WindowItemKind::*;
        let items = [
            item("sys", Other, true),
            item("u1", User, false),
            item("a1", Other, false),
            item("c1", Call, false),
            // A user message while the call is open does not split the turn.
            item("u2", User, false),
            item("o1", CallOutput, false),
            item("u3", User, false),
            item("pin", User, true),
            item("a3", Other, false),
        ];
        let t = turns(&items);
        let spans: Vec<(usize, usize, bool)> = t.iter().map(|t| (t.start, t.len, t.pinned)).collect();
        assert_eq!(spans, vec![(0, 1, true), (1, 5, false), (6, 1, false), (7, 1, true), (8, 1, false)]);
    }

    #[test]
    fn evicts_oldest_whole_turns_down_to_the_target_and_prepares_first() {
        use WindowItemKind::*;
        let policy = RetentionPolicy { max_tokens: 1000, retention_ratio: 0.5 };
        let mut w = ContextWindow::new(policy, Arc::new(EstimatedTokens::default()));
        let items: Vec<WindowItem> = (0..10)
            .flat_map(|i| [item(&format!("u{i}"), User, false), item(&format!("a{i}"), Other, false)])
            .chain([item("sys", Other, true)])
            .collect();
        let mk = |tokens: usize| -> Vec<Turn> {
            let mut t = turns(&items);
            for x in t.iter_mut() {
                x.tokens = tokens;
            }
            t
        };
        // 10 turns × 80 + pinned 80 = 880: past the prepare mark (750), under the limit.
        let t = mk(80);
        let p = w.plan(&items, &t, 880);
        assert!(p.evict.is_empty());
        let prepared = p.prepare.expect("a cut is prepared");
        // Down to ≤ 500: drop 5 turns (880 - 400 = 480).
        assert_eq!(prepared, ["u0", "a0", "u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4"]);
        // Asked again: already prepared.
        assert!(w.plan(&items, &t, 880).prepare.is_none());
        // Past the limit: the prepared cut is used.
        let t = mk(101);
        let p = w.plan(&items, &t, 1111);
        assert_eq!(p.evict, prepared);
        assert_eq!(p.tokens_after, 1111 - 5 * 101);
    }

    #[test]
    fn pinned_and_newest_turns_are_never_evicted() {
        use WindowItemKind::*;
        let policy = RetentionPolicy { max_tokens: 100, retention_ratio: 0.1 };
        let mut w = ContextWindow::new(policy, Arc::new(EstimatedTokens::default()));
        let items = [item("p", User, true), item("u0", User, false), item("u1", User, false)];
        let mut t = turns(&items);
        for x in t.iter_mut() {
            x.tokens = 60;
        }
        let p = w.plan(&items, &t, 180);
        assert_eq!(p.evict, ["u0"]);
        assert_eq!(p.tokens_after, 120);
    }
}
