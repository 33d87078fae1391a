//! Agents and tool dispatch for a session.
//!
//! When a response ends, each function call it made is answered exactly once (see
//! [`super::calls`]): a tool of the session's agent runs in the
//! [`crate::tools::ToolRegistry`] (calls of one response run concurrently); a tool
//! the client declared is awaited as a `function_call_output` item, with a deadline;
//! an unknown tool, or a call cut off by a cancelled response, is answered with an
//! error at once. Once every hark-run call of a response is answered, hark creates the
//! follow-up response itself (up to the agent's `max_tool_rounds`), so the model
//! continues with the results — the `<|tool_response>` continuation on the embedded
//! model, a new request for remote ones.

use std::time::Instant;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::calls::{Answerer, PendingCall, Unanswered};
use super::conversation::ConversationItem;
use super::settings::SessionSettings;
use super::Session;
use crate::model::ToolSpec;
use crate::protocol::{new_id, ContentPart, Item, ItemStatus, ProtocolError, ResponseParams, Role, ServerEvent, SessionUpdate};
use crate::tools::Agent;

/// Follow-up responses per user turn when no agent says otherwise.
const DEFAULT_MAX_TOOL_ROUNDS: u32 = 4;

/// The session settings an agent asks for: its instructions and turn detection on top of `base`.
pub(super) fn agent_settings(base: &SessionSettings, agent: &Agent) -> Result<SessionSettings, ProtocolError> {
    let mut update = json!({ "instructions": agent.instructions });
    if let Some(td) = &agent.turn_detection {
        update["turn_detection"] = match td.kind {
            crate::tools::agent::TurnDetectionKind::None => Value::Null,
            _ => serde_json::to_value(td).unwrap_or(Value::Null),
        };
    }
    let update: SessionUpdate = serde_json::from_value(update)
        .map_err(|e| ProtocolError::new("invalid_agent", format!("agent {}: {e}", agent.name)).param("session.agent"))?;
    let mut next = base.merged(&update)?;
    next.agent = agent.name.clone();
    Ok(next)
}

impl Session {
    /// Switches to the named agent (from `session.agent`, `?model=` or the config).
    pub(super) fn select_agent(&self, name: &str) -> Result<(SessionSettings, Agent), ProtocolError> {
        let agent = self.deps.agents.get(name).cloned().ok_or_else(|| {
            let known = self.deps.agents.names().join(", ");
            ProtocolError::new("invalid_value", format!("No agent named '{name}'. Agents: {known}.")).param("session.agent")
        })?;
        Ok((agent_settings(&self.settings, &agent)?, agent))
    }

    /// The agent's greeting, said once at the start of the session.
    pub(super) fn greet(&mut self) {
        let Some(text) = self.agent.as_ref().and_then(|a| a.greeting.clone()) else { return };
        let item = Item::message(new_id("item"), ItemStatus::Completed, Role::Assistant, vec![ContentPart::output_text(text)]);
        if let Ok(previous_item_id) = self.conversation.insert(None, ConversationItem::new(item.clone(), vec![super::conversation::Payload::None])) {
            self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
            self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
        }
    }

    /// The agent's tools as the model sees them (those the client did not declare itself).
    pub(super) fn agent_tool_specs(&self, client: &[ToolSpec]) -> Vec<ToolSpec> {
        let Some(agent) = &self.agent else { return Vec::new() };
        self.deps
            .tools
            .declarations(&agent.tool_names())
            .into_iter()
            .filter(|d| !client.iter().any(|c| c.name == d.name))
            .map(|d| ToolSpec { name: d.name, description: d.description, parameters: d.parameters })
            .collect()
    }

    /// Answers or starts every call a finished response made. `run` is false for a
    /// response that was cancelled: its calls are answered "cancelled" without running.
    pub(super) fn dispatch_calls(&mut self, calls: Vec<Item>, run: bool) {
        let mut started = 0;
        for item in calls {
            let call_id = item.call_id.clone().unwrap_or_default();
            let name = item.name.clone().unwrap_or_default();
            if call_id.is_empty() || self.calls.is_answered(&call_id) {
                continue;
            }
            if !run || item.status != ItemStatus::Completed {
                self.answer_call(&call_id, Unanswered::Interrupted.output());
                continue;
            }
            let client_declared = self.settings.tools.iter().any(|t| t.name == name);
            let agent_tool = self.agent.as_ref().and_then(|a| a.tool(&name)).filter(|_| !client_declared).cloned();
            if let Some(tool) = agent_tool {
                let cancel = CancellationToken::new();
                self.calls.register(
                    &call_id,
                    PendingCall {
                        name: name.clone(),
                        answerer: Answerer::Server { cancel: cancel.clone(), cancel_on_interruption: tool.cancel_on_interruption },
                    },
                );
                let registry = self.deps.tools.clone();
                let results = self.tool_results_tx.clone();
                let arguments = item.arguments.clone().unwrap_or_default();
                tokio::spawn(async move {
                    let outcome = registry.call(&name, &arguments, cancel).await;
                    let _ = results.send((call_id, outcome.to_json_output())).await;
                });
                started += 1;
            } else if client_declared {
                let deadline = Instant::now() + self.deps.client_tool_timeout;
                self.calls.register(&call_id, PendingCall { name, answerer: Answerer::Client { deadline } });
            } else {
                let output = json!({ "error": format!("no tool named {name:?} is available") }).to_string();
                self.answer_call(&call_id, output);
            }
        }
        if started > 0 {
            self.follow_up = true;
        }
    }

    /// Puts the one answer of `call_id` into the conversation. `false`: it already had one.
    pub(super) fn answer_call(&mut self, call_id: &str, output: String) -> bool {
        if !self.calls.claim(call_id) {
            return false;
        }
        let item = Item::function_call_output(new_id("item"), call_id.to_string(), output);
        match self.conversation.insert(None, ConversationItem::new(item.clone(), Vec::new())) {
            Ok(previous_item_id) => {
                self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
                self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
            }
            Err(e) => self.events.push(ServerEvent::from_protocol_error(ProtocolError::new("conversation_full", e.to_string()))),
        }
        true
    }

    /// A hark-run tool finished. Once the response's calls are all answered, the model
    /// continues with their results.
    pub(super) fn on_tool_result(&mut self, call_id: String, output: String) {
        if !self.answer_call(&call_id, output) {
            return; // cancelled by the user earlier: that was its answer
        }
        if self.follow_up && self.calls.server_calls_running() == 0 && self.response.is_none() {
            self.follow_up = false;
            let max = self.agent.as_ref().map_or(DEFAULT_MAX_TOOL_ROUNDS, |a| a.max_tool_rounds);
            if self.tool_rounds >= max {
                tracing::info!(session = %self.settings.id, "max_tool_rounds ({max}) reached; not continuing");
                return;
            }
            self.tool_rounds += 1;
            if let Err(e) = self.create_response(ResponseParams::default()) {
                self.events.push(ServerEvent::from_protocol_error(e));
            }
        }
    }

    /// Barge-in: calls that are cancelled on interruption are answered "cancelled by
    /// user"; the others run on and their results join the next turn.
    pub(super) fn interrupt_calls(&mut self) {
        self.follow_up = false;
        for id in self.calls.interrupt() {
            self.answer_call(&id, Unanswered::Interrupted.output());
        }
    }

    /// Client calls past their deadline are answered "timed out" for the client.
    pub(super) fn expire_client_calls(&mut self) {
        for id in self.calls.expired(Instant::now()) {
            self.answer_call(&id, Unanswered::ClientTimeout.output());
        }
    }

    /// The session is over: every call still open gets its answer.
    pub(super) fn close_calls(&mut self) {
        for id in self.calls.close() {
            self.answer_call(&id, Unanswered::SessionEnded.output());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::agent::{TurnDetection, TurnDetectionKind};

    fn agent(td: Option<TurnDetection>) -> Agent {
        Agent {
            name: "a".into(),
            instructions: "Be an agent.".into(),
            tools: Vec::new(),
            backend: None,
            turn_detection: td,
            vision: None,
            max_tool_rounds: 4,
            greeting: None,
            source: "agents/a.yaml".into(),
        }
    }

    fn td(kind: TurnDetectionKind, silence: Option<u32>) -> TurnDetection {
        TurnDetection {
            kind,
            threshold: None,
            prefix_padding_ms: None,
            silence_duration_ms: silence,
            eagerness: None,
            create_response: None,
            interrupt_response: None,
            idle_timeout_ms: None,
        }
    }

    #[test]
    fn an_agent_sets_instructions_and_turn_detection() {
        let base = SessionSettings::from_config(&crate::config::Config::default());
        let s = agent_settings(&base, &agent(Some(td(TurnDetectionKind::ServerVad, Some(900))))).unwrap();
        assert_eq!(s.instructions, "Be an agent.");
        assert_eq!(s.agent, "a");
        let t = s.turn_detection.unwrap();
        assert_eq!((t.kind.as_str(), t.silence_duration_ms, t.threshold), ("server_vad", 900, 0.5));
        let s = agent_settings(&base, &agent(Some(td(TurnDetectionKind::SemanticVad, None)))).unwrap();
        assert_eq!(s.turn_detection.unwrap().kind, "semantic_vad");
        let s = agent_settings(&base, &agent(Some(td(TurnDetectionKind::None, None)))).unwrap();
        assert!(s.turn_detection.is_none());
        // No turn detection in the agent: the session's stays.
        let s = agent_settings(&base, &agent(None)).unwrap();
        assert_eq!(s.turn_detection, base.turn_detection);
    }
}
