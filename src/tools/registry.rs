//! [`ToolRegistry`]: the tools a session may call, ready to run.
//!
//! Every call is answered exactly once with a [`ToolOutcome`]: the result, an error
//! (unknown tool, arguments that are not a JSON object or fail the schema — checked
//! before anything runs —, or the handler's own failure), a timeout, or a
//! cancellation. Nothing here panics on what a model or a tool sends back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::agent::ToolCatalog;
use crate::protocol::json_kind;
use super::builtin::Builtin;
use super::http::HttpTool;
use super::mcp::McpServer;
use super::spec::{is_valid_tool_name, CommandHandler, Handler, ToolSet};
use super::yaml::SpecError;

/// Arguments longer than this are refused before parsing.
pub const MAX_ARGUMENTS_BYTES: usize = 1024 * 1024;
/// Schema violations listed in one error.
const MAX_LISTED_VIOLATIONS: usize = 8;

/// What a model sees of a tool (OpenAI function-tool shape).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolDeclaration {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Ok,
    Error,
    Timeout,
    Cancelled,
}

/// The answer to one call. `output` is the text for the model's context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutcome {
    pub kind: OutcomeKind,
    pub output: String,
}

impl ToolOutcome {
    pub fn ok(output: impl Into<String>) -> Self {
        ToolOutcome { kind: OutcomeKind::Ok, output: output.into() }
    }

    pub fn error(output: impl Into<String>) -> Self {
        ToolOutcome { kind: OutcomeKind::Error, output: output.into() }
    }

    pub fn is_ok(&self) -> bool {
        self.kind == OutcomeKind::Ok
    }

    /// The outcome as a JSON document for a `function_call_output` / tool response:
    /// `{"result": …}` (the output itself when it is JSON, else the text) or
    /// `{"error": "…"}`, with `"timeout": true` / `"cancelled": true` where that is why.
    pub fn to_json_output(&self) -> String {
        match self.kind {
            OutcomeKind::Ok => {
                let value = serde_json::from_str::<Value>(&self.output).unwrap_or_else(|_| Value::String(self.output.clone()));
                json!({ "result": value }).to_string()
            }
            OutcomeKind::Error => json!({ "error": self.output }).to_string(),
            OutcomeKind::Timeout => json!({ "error": self.output, "timeout": true }).to_string(),
            OutcomeKind::Cancelled => json!({ "error": self.output, "cancelled": true }).to_string(),
        }
    }
}

enum Executor {
    Builtin(Builtin),
    Command(CommandHandler),
    Http(HttpTool),
    Mcp { server: Arc<McpServer>, tool: String },
}

struct RegisteredTool {
    declaration: ToolDeclaration,
    validator: Option<jsonschema::Validator>,
    executor: Executor,
    timeout: Duration,
    cancel_on_interruption: bool,
    source: PathBuf,
    kind_label: String,
}

/// The callable tools: YAML tools plus those of the started MCP servers. `Send + Sync`;
/// share it as `Arc<ToolRegistry>`.
pub struct ToolRegistry {
    tools: BTreeMap<String, RegisteredTool>,
    servers: Vec<Arc<McpServer>>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry").field("tools", &self.tools.keys().collect::<Vec<_>>()).field("servers", &self.servers).finish()
    }
}

/// `<server>_<tool>`, with characters outside the tool-name rule replaced by `_`.
pub fn exposed_name(server: &str, tool: &str) -> String {
    let name: String = format!("{server}_{tool}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    name.chars().take(64).collect()
}

fn compile(schema: &Value) -> Option<jsonschema::Validator> {
    jsonschema::validator_for(schema).ok()
}

impl ToolRegistry {
    /// Builds the registry from a validated set, starting its MCP servers.
    pub(crate) async fn start(set: &ToolSet) -> Result<ToolRegistry, Vec<SpecError>> {
        let mut errors = Vec::new();
        let mut servers: BTreeMap<String, Arc<McpServer>> = BTreeMap::new();
        let mut starting = tokio::task::JoinSet::new();
        for def in set.servers.clone() {
            starting.spawn(async move {
                let r = McpServer::start(&def).await;
                (def, r)
            });
        }
        while let Some(joined) = starting.join_next().await {
            match joined {
                Ok((_, Ok(server))) => {
                    servers.insert(server.def.name.clone(), Arc::new(server));
                }
                Ok((def, Err(reason))) => errors.push(SpecError::Start {
                    path: def.source.display().to_string(),
                    message: format!("mcp_server {}: {reason}", def.name),
                }),
                Err(e) => errors.push(SpecError::Start { path: "tools".into(), message: format!("an MCP server start failed: {e}") }),
            }
        }

        let mut tools: BTreeMap<String, RegisteredTool> = BTreeMap::new();
        for def in &set.tools {
            let source_text = def.source.display().to_string();
            let (executor, kind_label, description, parameters) = match &def.handler {
                Handler::Builtin(b) => (
                    Executor::Builtin(Builtin { kind: b.builtin, data_dir: b.data_dir.clone() }),
                    format!("builtin:{}", b.builtin.name()),
                    def.description.clone(),
                    def.parameters.clone(),
                ),
                Handler::Command(c) => (Executor::Command(c.clone()), "command".to_string(), def.description.clone(), def.parameters.clone()),
                Handler::Http(h) => match HttpTool::new(h.clone(), def.timeout) {
                    Ok(tool) => (Executor::Http(tool), "http".to_string(), def.description.clone(), def.parameters.clone()),
                    Err(e) => {
                        errors.push(SpecError::Start { path: source_text, message: format!("handler: {e}") });
                        continue;
                    }
                },
                Handler::Mcp(m) => {
                    let Some(server) = servers.get(&m.server) else {
                        continue; // its server failed to start: reported above
                    };
                    let Some(info) = server.tool(&m.tool) else {
                        let have: Vec<&str> = server.tools.iter().map(|t| t.name.as_str()).collect();
                        errors.push(SpecError::Start {
                            path: source_text,
                            message: format!("handler.tool: MCP server {} has no tool named {:?} (it has: {})", m.server, m.tool, have.join(", ")),
                        });
                        continue;
                    };
                    (
                        Executor::Mcp { server: server.clone(), tool: m.tool.clone() },
                        format!("mcp:{}", m.server),
                        def.description.clone().or_else(|| Some(info.description.clone())),
                        def.parameters.clone().or_else(|| Some(info.input_schema.clone())),
                    )
                }
            };
            let parameters = parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            tools.insert(
                def.name.clone(),
                RegisteredTool {
                    declaration: ToolDeclaration { name: def.name.clone(), description: description.unwrap_or_default(), parameters: parameters.clone() },
                    validator: compile(&parameters),
                    executor,
                    timeout: def.timeout,
                    cancel_on_interruption: def.cancel_on_interruption,
                    source: def.source.clone(),
                    kind_label,
                },
            );
        }

        // Tools the servers expose themselves, unless a tool file already names them.
        for server in servers.values() {
            for info in &server.tools {
                let named = set.tools.iter().any(|t| matches!(&t.handler, Handler::Mcp(m) if m.server == server.def.name && m.tool == info.name));
                if named || !server.def.expose.exposes(&info.name) {
                    continue;
                }
                let name = exposed_name(&server.def.name, &info.name);
                if !is_valid_tool_name(&name) {
                    continue;
                }
                if let Some(other) = tools.get(&name) {
                    errors.push(SpecError::Start {
                        path: server.def.source.display().to_string(),
                        message: format!(
                            "mcp_server {}: its tool {:?} would be registered as {name:?}, which {} already defines",
                            server.def.name,
                            info.name,
                            other.source.display()
                        ),
                    });
                    continue;
                }
                let validator = compile(&info.input_schema);
                if validator.is_none() {
                    tracing::warn!(server = %server.def.name, tool = %info.name, "the tool's input schema does not compile; its arguments are only checked to be an object");
                }
                tools.insert(
                    name.clone(),
                    RegisteredTool {
                        declaration: ToolDeclaration { name, description: info.description.clone(), parameters: info.input_schema.clone() },
                        validator,
                        executor: Executor::Mcp { server: server.clone(), tool: info.name.clone() },
                        timeout: server.def.timeout,
                        cancel_on_interruption: server.def.cancel_on_interruption,
                        source: server.def.source.clone(),
                        kind_label: format!("mcp:{}", server.def.name),
                    },
                );
            }
        }

        let registry = ToolRegistry { tools, servers: servers.into_values().collect() };
        if errors.is_empty() {
            Ok(registry)
        } else {
            registry.shutdown().await;
            Err(errors)
        }
    }

    /// An empty registry (no tools).
    pub fn empty() -> ToolRegistry {
        ToolRegistry { tools: BTreeMap::new(), servers: Vec::new() }
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// Every tool name, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tools.keys().map(String::as_str).collect()
    }

    /// The default for "cancel this call when the user interrupts" (agents may override).
    pub fn cancel_on_interruption(&self, name: &str) -> Option<bool> {
        self.tools.get(name).map(|t| t.cancel_on_interruption)
    }

    /// What agents are resolved against once everything runs.
    pub fn catalog(&self) -> ToolCatalog {
        let mut c = ToolCatalog::default();
        for (name, t) in &self.tools {
            c.insert(name, t.cancel_on_interruption);
        }
        c
    }

    pub fn declaration(&self, name: &str) -> Option<ToolDeclaration> {
        self.tools.get(name).map(|t| t.declaration.clone())
    }

    /// Declarations of `names`, in that order; unknown names are skipped.
    pub fn declarations<S: AsRef<str>>(&self, names: &[S]) -> Vec<ToolDeclaration> {
        names.iter().filter_map(|n| self.declaration(n.as_ref())).collect()
    }

    /// The tool set a tool belongs to, as clients see it (`server_label` of its
    /// `mcp_call` items): its MCP server's name, or `hark` for YAML tools.
    pub fn server_label(&self, name: &str) -> &str {
        match self.tools.get(name).map(|t| &t.executor) {
            Some(Executor::Mcp { server, .. }) => &server.def.name,
            _ => "hark",
        }
    }

    /// The running MCP servers.
    pub fn servers(&self) -> &[Arc<McpServer>] {
        &self.servers
    }

    /// Runs one call: parses and validates `arguments_json`, then runs the handler under
    /// the tool's timeout, stopping it when `cancel` fires. Always returns an outcome.
    pub async fn call(&self, name: &str, arguments_json: &str, cancel: CancellationToken) -> ToolOutcome {
        let Some(tool) = self.tools.get(name) else {
            return ToolOutcome::error(format!("no tool named {name:?}"));
        };
        let args = match parse_arguments(arguments_json) {
            Ok(a) => a,
            Err(e) => return ToolOutcome::error(e),
        };
        if let Some(v) = &tool.validator {
            let instance = Value::Object(args.clone());
            let problems: Vec<String> = v
                .iter_errors(&instance)
                .take(MAX_LISTED_VIOLATIONS)
                .map(|e| {
                    let path = e.instance_path().to_string();
                    format!("{}: {}", if path.is_empty() { "/" } else { &path }, e)
                })
                .collect();
            if !problems.is_empty() {
                return ToolOutcome::error(format!("invalid arguments for {name}: {}", problems.join("; ")));
            }
        }
        if cancel.is_cancelled() {
            return ToolOutcome { kind: OutcomeKind::Cancelled, output: "cancelled".into() };
        }
        if let Executor::Command(c) = &tool.executor {
            // The command executor kills and reaps its child itself.
            return super::command::run(c, &args, &cancel, tool.timeout).await;
        }
        let work = async {
            match &tool.executor {
                Executor::Builtin(b) => b.call(&args).await,
                Executor::Http(h) => h.call(&args).await,
                Executor::Mcp { server, tool } => server.call(tool, args.clone()).await,
                Executor::Command(_) => Err("unreachable".into()),
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => ToolOutcome { kind: OutcomeKind::Cancelled, output: "cancelled".into() },
            _ = tokio::time::sleep(tool.timeout) => ToolOutcome {
                kind: OutcomeKind::Timeout,
                output: format!("timed out after {} ms", tool.timeout.as_millis()),
            },
            r = work => match r {
                Ok(out) => ToolOutcome::ok(out),
                Err(e) => ToolOutcome::error(e),
            },
        }
    }

    /// `hark tools list`: one row per tool.
    pub fn list_table(&self) -> String {
        let rows: Vec<[String; 4]> = self
            .tools
            .iter()
            .map(|(name, t)| {
                let mut desc: String = t.declaration.description.lines().next().unwrap_or("").to_string();
                if desc.chars().count() > 60 {
                    desc = desc.chars().take(59).collect::<String>() + "…";
                }
                [name.clone(), t.kind_label.clone(), desc, t.source.display().to_string()]
            })
            .collect();
        let header = ["NAME".to_string(), "KIND".to_string(), "DESCRIPTION".to_string(), "SOURCE".to_string()];
        let mut widths = [0usize; 4];
        for row in std::iter::once(&header).chain(rows.iter()) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(rows.iter()) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Stops the MCP servers.
    pub async fn shutdown(&self) {
        for s in &self.servers {
            s.shutdown().await;
        }
    }
}

/// A call's arguments: a JSON object; empty text counts as `{}` (models send that for
/// tools without parameters).
pub fn parse_arguments(text: &str) -> Result<Map<String, Value>, String> {
    if text.len() > MAX_ARGUMENTS_BYTES {
        return Err(format!("arguments longer than {MAX_ARGUMENTS_BYTES} bytes"));
    }
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("arguments must be a JSON object, not {}", json_kind(&other))),
        Err(e) => Err(format!("arguments are not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_render_as_json() {
        let json = |o: ToolOutcome| serde_json::from_str::<Value>(&o.to_json_output()).unwrap();
        assert_eq!(json(ToolOutcome::ok("{\"a\":1}")), json!({"result": {"a": 1}}));
        assert_eq!(json(ToolOutcome::ok("plain text")), json!({"result": "plain text"}));
        assert_eq!(json(ToolOutcome::error("bad")), json!({"error": "bad"}));
        let t = ToolOutcome { kind: OutcomeKind::Timeout, output: "timed out".into() };
        assert_eq!(json(t), json!({"error": "timed out", "timeout": true}));
    }

    #[test]
    fn arguments_must_be_an_object() {
        assert!(parse_arguments("").unwrap().is_empty());
        assert!(parse_arguments("[1]").unwrap_err().contains("an array"));
        assert!(parse_arguments("{").unwrap_err().contains("not valid JSON"));
        assert_eq!(parse_arguments(r#"{"a": 1}"#).unwrap()["a"], 1);
    }

    #[test]
    fn exposed_names_follow_the_rule() {
        assert_eq!(exposed_name("time", "get_current_time"), "time_get_current_time");
        assert_eq!(exposed_name("fs", "read.file"), "fs_read_file");
        assert_eq!(exposed_name("s", &"x".repeat(100)).len(), 64);
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn registry_is_shareable() {
        assert_send_sync::<ToolRegistry>();
        assert_send_sync::<Arc<ToolRegistry>>();
    }
}
