//! Memory bounded in bytes, where data arrives.
//!
//! Counts (items, queued messages) do not bound memory: one conversation item can be
//! megabytes. So every session holds a [`SessionBudget`] drawn from the daemon's one
//! [`MemoryPool`], and each thing a session keeps — its conversation, its input audio
//! buffer, client messages queued for it, events queued for its client — holds a
//! [`Charge`] on it. A charge grows only if both the session's and the pool's limits
//! allow ([`Charge::try_set`]); what must be kept regardless (a tool call's answer,
//! hark's own events) is charged with [`Charge::set`], which may overshoot, so the
//! next arrival is refused. Dropping a charge gives its bytes back, so a session that
//! ends returns to zero.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::protocol::{ProtocolError, ServerEvent};

/// All sessions' bytes together, under `server.max_total_bytes`.
#[derive(Debug)]
pub struct MemoryPool {
    limit: u64,
    used: AtomicU64,
}

impl MemoryPool {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicU64::new(0) })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

impl Default for MemoryPool {
    fn default() -> Self {
        Self { limit: u64::MAX, used: AtomicU64::new(0) }
    }
}

/// Data refused because a budget is spent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    #[error("This session holds {used} bytes of its {limit}-byte budget (session.limits.max_session_bytes); {wanted} more bytes were refused. What it already holds is kept.")]
    Session { used: u64, limit: u64, wanted: u64 },
    #[error("hark's sessions together hold {used} bytes of the {limit}-byte limit (server.max_total_bytes); {wanted} more bytes were refused.")]
    Server { used: u64, limit: u64, wanted: u64 },
}

impl BudgetError {
    pub fn to_protocol(&self) -> ProtocolError {
        let code = match self {
            BudgetError::Session { .. } => "session_memory_exceeded",
            BudgetError::Server { .. } => "server_memory_exceeded",
        };
        ProtocolError::new(code, self.to_string())
    }
}

/// One session's bytes, under `session.limits.max_session_bytes`.
#[derive(Debug)]
pub struct SessionBudget {
    pool: Arc<MemoryPool>,
    limit: u64,
    used: AtomicU64,
}

impl SessionBudget {
    pub fn new(pool: Arc<MemoryPool>, limit: u64) -> Arc<Self> {
        Arc::new(Self { pool, limit, used: AtomicU64::new(0) })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// A new, empty charge on this budget.
    pub fn charge(self: &Arc<Self>) -> Charge {
        Charge { budget: self.clone(), bytes: 0 }
    }

    /// A charge of `bytes`, if both budgets have room.
    pub fn try_charge(self: &Arc<Self>, bytes: u64) -> Result<Charge, BudgetError> {
        let mut c = self.charge();
        c.try_set(bytes)?;
        Ok(c)
    }

    /// Takes `bytes` from the session and the pool, or neither.
    fn try_add(&self, bytes: u64) -> Result<(), BudgetError> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|n| *n <= self.limit))
            .map_err(|used| BudgetError::Session { used, limit: self.limit, wanted: bytes })?;
        let pool = &self.pool;
        if let Err(used) = pool.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|n| *n <= pool.limit)) {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(BudgetError::Server { used, limit: pool.limit, wanted: bytes });
        }
        Ok(())
    }

    /// Counts `bytes` queued by one side of a channel; the other side [`Self::release`]s
    /// them. Bytes still held when the budget is dropped go back to the pool then.
    pub fn hold(&self, bytes: u64) {
        self.add(bytes);
    }

    pub fn release(&self, bytes: u64) {
        self.sub(bytes);
    }

    fn add(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        self.pool.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.pool.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl Drop for SessionBudget {
    /// Events left in a queue when its reader went away were never released: the
    /// pool gets them back with the session.
    fn drop(&mut self) {
        self.pool.used.fetch_sub(*self.used.get_mut(), Ordering::AcqRel);
    }
}

/// Bytes one thing holds on a session's budget, given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<SessionBudget>,
    bytes: u64,
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Sets the charge to `bytes`: shrinking always works, growing only within both budgets.
    pub fn try_set(&mut self, bytes: u64) -> Result<(), BudgetError> {
        if bytes > self.bytes {
            self.budget.try_add(bytes - self.bytes)?;
        } else {
            self.budget.sub(self.bytes - bytes);
        }
        self.bytes = bytes;
        Ok(())
    }

    /// Sets the charge to `bytes` even past the budgets (for what must be kept).
    pub fn set(&mut self, bytes: u64) {
        if bytes > self.bytes {
            self.budget.add(bytes - self.bytes);
        } else {
            self.budget.sub(self.bytes - bytes);
        }
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.sub(self.bytes);
    }
}

/// What an event holds while it waits in a session's outgoing queue. Cheap and
/// deterministic: the side that queues and the side that sends compute the same
/// figure. Only the large fields count; the rest is a flat per-event cost.
pub fn event_bytes(ev: &ServerEvent) -> u64 {
    const OVERHEAD: u64 = 256;
    let item_bytes = |item: &crate::protocol::Item| -> u64 {
        let text: usize = item
            .content
            .iter()
            .flatten()
            .map(|p| p.text.as_ref().map_or(0, String::len) + p.transcript.as_ref().and_then(|t| t.as_ref()).map_or(0, String::len))
            .sum();
        (text + item.arguments.as_ref().map_or(0, String::len) + item.output.as_ref().map_or(0, String::len)) as u64
    };
    OVERHEAD
        + match ev {
            ServerEvent::ResponseOutputAudioDelta { delta, .. } => delta.len() as u64,
            ServerEvent::ConversationItemAdded { item, .. }
            | ServerEvent::ConversationItemDone { item, .. }
            | ServerEvent::ConversationItemRetrieved { item }
            | ServerEvent::ResponseOutputItemAdded { item, .. }
            | ServerEvent::ResponseOutputItemDone { item, .. } => item_bytes(item),
            _ => 0,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stay_within_both_budgets_and_return_on_drop() {
        let pool = MemoryPool::new(1000);
        let a = SessionBudget::new(pool.clone(), 600);
        let b = SessionBudget::new(pool.clone(), 600);
        let mut ca = a.try_charge(500).unwrap();
        assert!(matches!(a.try_charge(200), Err(BudgetError::Session { used: 500, limit: 600, wanted: 200 })));
        let cb = b.try_charge(450).unwrap();
        // b's own budget has room, the pool does not; nothing is taken.
        assert!(matches!(b.try_charge(100), Err(BudgetError::Server { .. })));
        assert_eq!((a.used(), b.used(), pool.used()), (500, 450, 950));
        ca.try_set(100).unwrap();
        ca.set(900);
        assert_eq!((a.used(), pool.used()), (900, 1350));
        assert_eq!(BudgetError::Session { used: 1, limit: 2, wanted: 3 }.to_protocol().code, "session_memory_exceeded");
        drop(ca);
        drop(cb);
        assert_eq!((a.used(), b.used(), pool.used()), (0, 0, 0));
        // Queued bytes never released are returned with the session.
        b.hold(77);
        assert_eq!(pool.used(), 77);
        drop(b);
        assert_eq!(pool.used(), 0);
    }
}
