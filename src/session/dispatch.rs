//! Agents and tool dispatch for a session.
//!
//! When the model has written a response's calls, each is answered exactly once (see
//! [`super::calls`]): a tool of the session's agent runs in the
//! [`crate::tools::ToolRegistry`] (calls of one response run concurrently) and its
//! result fills its `mcp_call` item; a tool the client declared is awaited as a
//! `function_call_output` item, with a deadline; an unknown tool, or a call the model
//! did not finish, is answered with an error at once. The response ends when its
//! hark-run calls are answered; if the client runs none of its calls, hark then
//! creates the follow-up response itself (up to the agent's `max_tool_rounds`), so the
//! model continues with the results — the `<|tool_response>` continuation on the
//! embedded model, a new request for remote ones.

use std::collections::HashSet;
use std::time::Instant;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::calls::{Answerer, CallAnswer, PendingCall, Unanswered};
use super::conversation::ConversationItem;
use super::response::ToolRouting;
use super::settings::SessionSettings;
use super::Session;
use crate::model::ToolSpec;
use crate::protocol::{
    new_id, ContentPart, Item, ItemKind, ItemStatus, ProtocolError, ResponseParams, ResponseStatus, Role, ServerEvent, SessionUpdate,
};
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

    /// Who answers which tool in a response: the client's tools (the session's, or
    /// the response's own) are the client's; everything else is hark's.
    pub(super) fn tool_routing(&self, params: &ResponseParams) -> ToolRouting {
        let client: HashSet<String> = params.tools.as_ref().unwrap_or(&self.settings.tools).iter().map(|t| t.name.clone()).collect();
        let hark = self
            .agent
            .iter()
            .flat_map(|a| a.tool_names())
            .filter(|n| !client.contains(n.as_str()))
            .map(|n| {
                let label = self.deps.tools.server_label(&n).to_string();
                (n, label)
            })
            .collect();
        ToolRouting { client, hark }
    }

    /// Announces the agent's tools, one `mcp_list_tools` item per tool set, so that
    /// clients know what hark runs itself. The items stay in the conversation (clients
    /// retrieve them) but never reach the model, which has the tools in its prompt.
    pub(super) fn announce_tools(&mut self) {
        let Some(agent) = &self.agent else { return };
        let mut sets: Vec<(String, Vec<Value>)> = Vec::new();
        for d in self.deps.tools.declarations(&agent.tool_names()) {
            let label = self.deps.tools.server_label(&d.name).to_string();
            let tool = json!({"name": d.name, "description": d.description, "input_schema": d.parameters});
            match sets.iter_mut().find(|(l, _)| *l == label) {
                Some((_, tools)) => tools.push(tool),
                None => sets.push((label, vec![tool])),
            }
        }
        for (label, tools) in sets {
            let item = Item::mcp_list_tools(new_id("item"), label, tools);
            let item_id = item.id.clone();
            match self.conversation.insert(None, ConversationItem::new(item.clone(), Vec::new())) {
                Ok(previous_item_id) => {
                    self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
                    self.events.push(ServerEvent::McpListToolsInProgress { item_id: item_id.clone() });
                    self.events.push(ServerEvent::McpListToolsCompleted { item_id });
                    self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
                }
                Err(e) => self.events.push(ServerEvent::server_error("conversation_full", e.to_string(), None)),
            }
        }
    }

    /// Starts every call a completed response made: hark's tools run (calls of one
    /// response concurrently), the client's are awaited with a deadline, and calls of
    /// tools no one has are answered with an error at once.
    pub(super) fn dispatch_calls(&mut self, calls: Vec<Item>) {
        for item in calls {
            let call_id = item.call_id.clone().unwrap_or_default();
            let name = item.name.clone().unwrap_or_default();
            if call_id.is_empty() || self.calls.is_answered(&call_id) || self.calls.get(&call_id).is_some() {
                continue;
            }
            if item.status == ItemStatus::Incomplete {
                self.answer_call(&call_id, Unanswered::ResponseCancelled.answer());
                continue;
            }
            if item.kind == ItemKind::FunctionCall {
                let deadline = Instant::now() + self.deps.client_tool_timeout;
                self.calls.register(&call_id, PendingCall { name, answerer: Answerer::Client { deadline } });
                continue;
            }
            let Some(tool) = self.agent.as_ref().and_then(|a| a.tool(&name)).cloned() else {
                self.answer_call(&call_id, CallAnswer::Error(format!("no tool named {name:?} is available")));
                continue;
            };
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
                let _ = results.send((call_id, CallAnswer::from_outcome(&outcome))).await;
            });
        }
    }

    /// Answers, with `why`, the calls of a response that will not run (the model did
    /// not finish it). Calls already running or answered keep their own answer.
    pub(super) fn answer_unrun(&mut self, calls: Vec<Item>, why: Unanswered) {
        for item in calls {
            let call_id = item.call_id.clone().unwrap_or_default();
            if !call_id.is_empty() && self.calls.get(&call_id).is_none() {
                self.answer_call(&call_id, why.answer());
            }
        }
    }

    /// Puts the one answer of `call_id` into the conversation. `false`: it already had one.
    /// A hark-run call's answer goes into its `mcp_call` item; a client call that hark
    /// answers for (timeout, interruption, session end) gets a `function_call_output`.
    pub(super) fn answer_call(&mut self, call_id: &str, answer: CallAnswer) -> bool {
        if !self.calls.claim(call_id) {
            return false;
        }
        self.new_input();
        if let Some(run) = self.response.as_mut() {
            if run.answer_mcp(call_id, &answer, &mut self.conversation, &mut self.events) {
                return true;
            }
        }
        // An mcp_call of an earlier response (a tool that ran on after a barge-in).
        if let Some(ci) = self.conversation.mcp_call_mut(call_id) {
            answer.fill(&mut ci.item);
            ci.item.status = ItemStatus::Completed;
            let item = ci.item.clone();
            self.events.push(ServerEvent::ConversationItemDone { previous_item_id: None, item });
            return true;
        }
        let item = Item::function_call_output(new_id("item"), call_id.to_string(), answer.for_model());
        match self.conversation.insert(None, ConversationItem::new(item.clone(), Vec::new())) {
            Ok(previous_item_id) => {
                self.events.push(ServerEvent::ConversationItemAdded { previous_item_id: previous_item_id.clone(), item: item.clone() });
                self.events.push(ServerEvent::ConversationItemDone { previous_item_id, item });
            }
            Err(e) => self.events.push(ServerEvent::server_error("conversation_full", e.to_string(), None)),
        }
        true
    }

    /// A hark-run tool finished.
    pub(super) fn on_tool_result(&mut self, call_id: String, answer: CallAnswer) {
        // `false`: cancelled by the user earlier, and that was its answer.
        if self.answer_call(&call_id, answer) {
            self.settle_response();
        }
    }

    /// Ends a response that waited for hark-run calls once the last is answered. If
    /// the model completed it and the client runs none of its calls, the model
    /// continues with the results (up to the agent's `max_tool_rounds`); a response
    /// with client calls continues when the client asks (`response.create`), as with
    /// OpenAI.
    pub(super) fn settle_response(&mut self) {
        let Some(run) = self.response.as_mut() else { return };
        if !run.awaiting_tools() || run.calls_running() > 0 || run.speaking() {
            return;
        }
        // Only hark's own tool results call for a continuation (a response that merely
        // waited for its speech to finish has nothing new for the model).
        let continue_with_results =
            run.outcome() == Some(ResponseStatus::Completed) && run.has_hark_calls() && !run.has_client_calls() && run.in_conversation();
        run.finish_done(&mut self.events);
        self.response = None;
        if !continue_with_results {
            return;
        }
        let max = self.agent.as_ref().map_or(DEFAULT_MAX_TOOL_ROUNDS, |a| a.max_tool_rounds);
        if self.tool_rounds >= max {
            tracing::info!(session = %self.settings.id, "max_tool_rounds ({max}) reached; not continuing");
            return;
        }
        self.tool_rounds += 1;
        if let Err(e) = self.hark_create_response(ResponseParams::default()) {
            self.events.push(ServerEvent::from_protocol_error(e));
        }
    }

    /// Barge-in: calls that are cancelled on interruption are answered "cancelled by
    /// user"; the others run on and their results join the next turn.
    pub(super) fn interrupt_calls(&mut self) {
        for id in self.calls.interrupt() {
            self.answer_call(&id, Unanswered::Interrupted.answer());
        }
    }

    /// Client calls past their deadline are answered "timed out" for the client.
    pub(super) fn expire_client_calls(&mut self) {
        for id in self.calls.expired(Instant::now()) {
            self.answer_call(&id, Unanswered::ClientTimeout.answer());
        }
        self.start_deferred_response();
    }

    /// The session is over: every call still open gets its answer.
    pub(super) fn close_calls(&mut self) {
        for id in self.calls.close() {
            self.answer_call(&id, Unanswered::SessionEnded.answer());
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
