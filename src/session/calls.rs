//! Tool calls in flight, and the rule that each gets exactly one answer.
//!
//! A call the model makes is answered by hark (a tool of the session's agent, run by
//! the [`crate::tools::ToolRegistry`]) or by the client (a tool it declared in
//! `session.tools`, answered with a `function_call_output` item). Whatever happens
//! around it — barge-in, a timeout, the client leaving, the backend failing on the
//! follow-up — the ledger lets exactly one answer into the conversation: the first.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::protocol::Item;
use crate::tools::registry::{OutcomeKind, ToolOutcome};

/// A call's one answer: the tool's result, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum CallAnswer {
    /// The tool's output (JSON or plain text).
    Result(String),
    /// Why the call has no result: the tool failed, timed out, was cancelled, …
    Error(String),
}

impl CallAnswer {
    pub fn from_outcome(o: &ToolOutcome) -> Self {
        match o.kind {
            OutcomeKind::Ok => CallAnswer::Result(o.output.clone()),
            _ => CallAnswer::Error(o.output.clone()),
        }
    }

    /// As the model reads it: `{"result": …}` or `{"error": "…"}`, rendered by the one
    /// place that knows that shape ([`ToolOutcome::to_json_output`]).
    pub fn for_model(&self) -> String {
        match self {
            CallAnswer::Result(out) => ToolOutcome::ok(out.as_str()).to_json_output(),
            CallAnswer::Error(msg) => ToolOutcome::error(msg.as_str()).to_json_output(),
        }
    }

    /// Writes the answer into an `mcp_call` item (`output`, or `error` as the
    /// protocol's `tool_execution_error`).
    pub fn fill(&self, item: &mut Item) {
        match self {
            CallAnswer::Result(out) => item.output = Some(out.clone()),
            CallAnswer::Error(msg) => item.error = Some(json!({"type": "tool_execution_error", "message": msg})),
        }
    }

    /// The answer an `mcp_call` item holds, if it has one yet.
    pub fn of_item(item: &Item) -> Option<Self> {
        if let Some(err) = &item.error {
            return Some(CallAnswer::Error(err.get("message").and_then(Value::as_str).unwrap_or("failed").to_string()));
        }
        item.output.clone().map(CallAnswer::Result)
    }
}

/// Who answers a call.
#[derive(Debug, Clone)]
pub enum Answerer {
    /// hark runs it; `cancel` stops the run.
    Server { cancel: CancellationToken, cancel_on_interruption: bool },
    /// The client answers by this deadline, or hark answers "timed out" for it.
    Client { deadline: Instant },
}

#[derive(Debug, Clone)]
pub struct PendingCall {
    pub name: String,
    pub answerer: Answerer,
}

/// Why a call was answered without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The user spoke over the response and the tool is cancelled on interruption.
    Interrupted,
    /// The client did not answer its own tool in time.
    ClientTimeout,
    /// The session ended.
    SessionEnded,
    /// The response hit its token limit before the model finished writing the call.
    TokenLimit,
    /// The model failed before it finished the call.
    BackendFailed,
    /// The response was cancelled (by the client, or the backend) before the call was complete.
    ResponseCancelled,
}

impl Unanswered {
    /// The call's answer.
    pub fn answer(self) -> CallAnswer {
        let msg = match self {
            Unanswered::Interrupted => "cancelled by user: the user interrupted before the tool finished",
            Unanswered::ClientTimeout => "timed out: the client did not return a result in time",
            Unanswered::SessionEnded => "cancelled: the session ended before the tool finished",
            Unanswered::TokenLimit => "not run: the response reached its token limit before the call was complete",
            Unanswered::BackendFailed => "not run: the model failed before the call was complete",
            Unanswered::ResponseCancelled => "not run: the response was cancelled before the call was complete",
        };
        CallAnswer::Error(msg.into())
    }
}

#[derive(Debug, Default)]
pub struct CallLedger {
    pending: HashMap<String, PendingCall>,
    answered: HashSet<String>,
}

impl CallLedger {
    pub fn register(&mut self, call_id: &str, call: PendingCall) {
        if !self.answered.contains(call_id) {
            self.pending.insert(call_id.to_string(), call);
        }
    }

    /// Claims the one answer of `call_id`. `false`: it was already answered (drop
    /// this one). Calls the ledger never saw (a client answering a call it created
    /// itself) are claimed once too.
    pub fn claim(&mut self, call_id: &str) -> bool {
        self.pending.remove(call_id);
        self.answered.insert(call_id.to_string())
    }

    pub fn is_answered(&self, call_id: &str) -> bool {
        self.answered.contains(call_id)
    }

    pub fn get(&self, call_id: &str) -> Option<&PendingCall> {
        self.pending.get(call_id)
    }

    /// Server calls still running.
    pub fn server_calls_running(&self) -> usize {
        self.pending.values().filter(|c| matches!(c.answerer, Answerer::Server { .. })).count()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Calls the client has yet to answer.
    pub fn client_calls_pending(&self) -> usize {
        self.pending.values().filter(|c| matches!(c.answerer, Answerer::Client { .. })).count()
    }

    /// Barge-in: cancels the server calls that want it and returns their ids (to be
    /// answered "cancelled by user"); the others run on and answer later.
    pub fn interrupt(&mut self) -> Vec<String> {
        let ids: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, c)| matches!(c.answerer, Answerer::Server { cancel_on_interruption: true, .. }))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(PendingCall { answerer: Answerer::Server { cancel, .. }, .. }) = self.pending.get(id) {
                cancel.cancel();
            }
        }
        ids
    }

    /// Client calls whose deadline has passed.
    pub fn expired(&self, now: Instant) -> Vec<String> {
        self.pending
            .iter()
            .filter(|(_, c)| matches!(c.answerer, Answerer::Client { deadline } if deadline <= now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The earliest client deadline, for the session's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter_map(|c| match c.answerer {
                Answerer::Client { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// The session is ending: cancels every server call; returns all pending ids.
    pub fn close(&mut self) -> Vec<String> {
        for c in self.pending.values() {
            if let Answerer::Server { cancel, .. } = &c.answerer {
                cancel.cancel();
            }
        }
        self.pending.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server(cancel_on_interruption: bool) -> (PendingCall, CancellationToken) {
        let cancel = CancellationToken::new();
        (PendingCall { name: "t".into(), answerer: Answerer::Server { cancel: cancel.clone(), cancel_on_interruption } }, cancel)
    }

    #[test]
    fn the_first_answer_wins_and_later_ones_are_refused() {
        let mut l = CallLedger::default();
        let (c, _) = server(true);
        l.register("a", c);
        assert!(l.claim("a"));
        assert!(!l.claim("a"));
        // Registering an answered call again does not reopen it.
        let (c, _) = server(true);
        l.register("a", c);
        assert!(l.is_empty());
        // A call the ledger never saw can be answered once.
        assert!(l.claim("client-made"));
        assert!(!l.claim("client-made"));
    }

    #[test]
    fn interruption_cancels_only_the_calls_that_want_it() {
        let mut l = CallLedger::default();
        let (a, ca) = server(true);
        let (b, cb) = server(false);
        l.register("a", a);
        l.register("b", b);
        l.register("c", PendingCall { name: "client".into(), answerer: Answerer::Client { deadline: Instant::now() + Duration::from_secs(60) } });
        assert_eq!(l.interrupt(), vec!["a".to_string()]);
        assert!(ca.is_cancelled() && !cb.is_cancelled());
        assert_eq!(l.server_calls_running(), 2, "interrupt only flags; the answer is claimed by the session");
        let mut ids = l.close();
        ids.sort();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(cb.is_cancelled());
    }

    #[test]
    fn client_deadlines() {
        let mut l = CallLedger::default();
        let now = Instant::now();
        l.register("late", PendingCall { name: "x".into(), answerer: Answerer::Client { deadline: now } });
        l.register("later", PendingCall { name: "y".into(), answerer: Answerer::Client { deadline: now + Duration::from_secs(5) } });
        assert_eq!(l.next_deadline(), Some(now));
        assert_eq!(l.expired(now), vec!["late".to_string()]);
    }
}
