//! [`ToolRegistry`]: the tools a session may call, ready to run.
//!
//! Every call is answered exactly once with a [`ToolOutcome`]: the result, an error
//! (unknown tool, arguments that are not a JSON object or fail the schema — checked
//! before anything runs —, or the handler's own failure), a timeout, or a
//! cancellation. Nothing here panics on what a model or a tool sends back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::agent::{LiveTools, ToolCatalog};
use crate::protocol::json_kind;
use super::builtin::Builtin;
use super::http::HttpTool;
use super::mcp::McpServer;
use super::spec::{is_valid_tool_name, CommandHandler, Expose, Handler, McpHandler, McpServerDef, ToolDef, ToolSet};
use super::supervisor::{McpSupervisor, OnUp, ServerHealth};
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
    Mcp { server: Arc<McpSupervisor>, tool: String },
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

impl RegisteredTool {
    fn mcp_server(&self) -> Option<&Arc<McpSupervisor>> {
        match &self.executor {
            Executor::Mcp { server, .. } => Some(server),
            _ => None,
        }
    }
}

type ToolMap = BTreeMap<String, Arc<RegisteredTool>>;

/// What the registry and its servers' supervisors share: the tools change as servers
/// come up (their tools are listed only then).
struct Shared {
    tools: RwLock<ToolMap>,
    /// Tool files of kind `mcp`: declared again whenever their server starts.
    named: Vec<ToolDef>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, ToolMap> {
        self.tools.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ToolMap> {
        self.tools.write().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, name: &str) -> Option<Arc<RegisteredTool>> {
        self.read().get(name).cloned()
    }

    /// Registers the tools of `slot`'s server, running as `server`: the tool files that
    /// name it (their description and schema from the server unless the file has
    /// them) and the tools it exposes as `<server>_<tool>`. Returns the problems as
    /// (file, message).
    fn register_server(&self, slot: &Arc<McpSupervisor>, server: &McpServer) -> Vec<(PathBuf, String)> {
        let def = slot.def();
        let mut problems = Vec::new();
        let mut tools = self.write();
        for t in &self.named {
            let Handler::Mcp(m) = &t.handler else { continue };
            if m.server != def.name {
                continue;
            }
            let info = server.tool(&m.tool);
            if info.is_none() {
                let have: Vec<&str> = server.tools.iter().map(|t| t.name.as_str()).collect();
                problems.push((
                    t.source.clone(),
                    format!("handler.tool: MCP server {} has no tool named {:?} (it has: {})", m.server, m.tool, have.join(", ")),
                ));
            }
            let description = t.description.clone().or_else(|| info.map(|i| i.description.clone()));
            let parameters = t.parameters.clone().or_else(|| info.map(|i| i.input_schema.clone()));
            tools.insert(t.name.clone(), Arc::new(mcp_tool(t, m, slot, description, parameters)));
        }
        for info in &server.tools {
            let named = self.named.iter().any(|t| matches!(&t.handler, Handler::Mcp(m) if m.server == def.name && m.tool == info.name));
            if named || !def.expose.exposes(&info.name) {
                continue;
            }
            let name = exposed_name(&def.name, &info.name);
            if !is_valid_tool_name(&name) {
                continue;
            }
            if let Some(other) = tools.get(&name) {
                let ours = other.mcp_server().is_some_and(|s| Arc::ptr_eq(s, slot));
                if !ours {
                    problems.push((
                        def.source.clone(),
                        format!(
                            "mcp_server {}: its tool {:?} would be registered as {name:?}, which {} already defines",
                            def.name,
                            info.name,
                            other.source.display()
                        ),
                    ));
                    continue;
                }
            }
            let validator = compile(&info.input_schema);
            if validator.is_none() {
                tracing::warn!(server = %def.name, tool = %info.name, "the tool's input schema does not compile; its arguments are only checked to be an object");
            }
            tools.insert(
                name.clone(),
                Arc::new(RegisteredTool {
                    declaration: ToolDeclaration { name, description: info.description.clone(), parameters: info.input_schema.clone() },
                    validator,
                    executor: Executor::Mcp { server: slot.clone(), tool: info.name.clone() },
                    timeout: def.timeout,
                    cancel_on_interruption: def.cancel_on_interruption,
                    source: def.source.clone(),
                    kind_label: format!("mcp:{}", def.name),
                }),
            );
        }
        problems
    }
}

/// A tool file of kind `mcp`, with what is known of the tool.
fn mcp_tool(def: &ToolDef, m: &McpHandler, slot: &Arc<McpSupervisor>, description: Option<String>, parameters: Option<Value>) -> RegisteredTool {
    let parameters = parameters.unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    RegisteredTool {
        declaration: ToolDeclaration { name: def.name.clone(), description: description.unwrap_or_default(), parameters: parameters.clone() },
        validator: compile(&parameters),
        executor: Executor::Mcp { server: slot.clone(), tool: m.tool.clone() },
        timeout: def.timeout,
        cancel_on_interruption: def.cancel_on_interruption,
        source: def.source.clone(),
        kind_label: format!("mcp:{}", m.server),
    }
}

/// The callable tools: YAML tools plus those of the MCP servers. `Send + Sync`; share
/// it as `Arc<ToolRegistry>`.
///
/// An MCP server that cannot start or that stops does not take the registry down: its
/// tools answer with an "unavailable" error while it is restarted in the background
/// ([`McpSupervisor`]); [`ToolRegistry::health`] and [`ToolRegistry::unavailable`]
/// say which servers are down and why.
pub struct ToolRegistry {
    shared: Arc<Shared>,
    servers: Vec<Arc<McpSupervisor>>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry").field("tools", &self.names()).field("servers", &self.servers).finish()
    }
}

impl Drop for ToolRegistry {
    fn drop(&mut self) {
        // Supervisors would otherwise keep restarting servers nobody can call.
        for s in &self.servers {
            s.cancel();
        }
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
    /// Builds the registry from a validated set, starting its MCP servers (at once,
    /// each bounded by its `startup_timeout_ms`). A server that cannot start is no
    /// error: it is retried in the background and its tools answer "unavailable" until
    /// then. Errors are what is wrong in the files: an HTTP handler that cannot be
    /// built, a tool file naming a tool its (running) server does not have, a name
    /// clash between a server's tool and a tool file.
    pub(crate) async fn start(set: &ToolSet) -> Result<ToolRegistry, Vec<SpecError>> {
        let mut errors = Vec::new();
        let named: Vec<ToolDef> = set.tools.iter().filter(|t| matches!(t.handler, Handler::Mcp(_))).cloned().collect();
        let shared = Arc::new(Shared { tools: RwLock::new(BTreeMap::new()), named });

        let mut first: BTreeMap<String, (McpServerDef, Result<McpServer, String>)> = BTreeMap::new();
        let mut starting = tokio::task::JoinSet::new();
        for def in set.servers.clone() {
            starting.spawn(async move {
                let r = McpServer::start(&def).await;
                (def, r)
            });
        }
        while let Some(joined) = starting.join_next().await {
            match joined {
                Ok((def, r)) => {
                    first.insert(def.name.clone(), (def, r));
                }
                Err(e) => errors.push(SpecError::Start { path: "tools".into(), message: format!("an MCP server start failed: {e}") }),
            }
        }
        let mut servers: BTreeMap<String, Arc<McpSupervisor>> = BTreeMap::new();
        for (name, (def, result)) in first {
            let weak: Weak<Shared> = Arc::downgrade(&shared);
            let on_up: OnUp = Box::new(move |slot: &Arc<McpSupervisor>, server: &Arc<McpServer>| {
                let Some(shared) = weak.upgrade() else { return };
                for (path, problem) in shared.register_server(slot, server) {
                    tracing::warn!(file = %path.display(), "{problem}");
                }
            });
            servers.insert(name, McpSupervisor::spawn(def, result, on_up));
        }

        {
            let mut tools = shared.write();
            for def in &set.tools {
                let source_text = def.source.display().to_string();
                let (executor, kind_label) = match &def.handler {
                    Handler::Builtin(b) => (
                        Executor::Builtin(Builtin { kind: b.builtin, data_dir: b.data_dir.clone() }),
                        format!("builtin:{}", b.builtin.name()),
                    ),
                    Handler::Command(c) => (Executor::Command(c.clone()), "command".to_string()),
                    Handler::Http(h) => match HttpTool::new(h.clone(), def.timeout) {
                        Ok(tool) => (Executor::Http(tool), "http".to_string()),
                        Err(e) => {
                            errors.push(SpecError::Start { path: source_text, message: format!("handler: {e}") });
                            continue;
                        }
                    },
                    Handler::Mcp(m) => {
                        // Until its server runs, what the file says (the server fills in
                        // the rest when it comes up).
                        if let Some(slot) = servers.get(&m.server) {
                            tools.insert(def.name.clone(), Arc::new(mcp_tool(def, m, slot, def.description.clone(), def.parameters.clone())));
                        }
                        continue;
                    }
                };
                let parameters = def.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                tools.insert(
                    def.name.clone(),
                    Arc::new(RegisteredTool {
                        declaration: ToolDeclaration {
                            name: def.name.clone(),
                            description: def.description.clone().unwrap_or_default(),
                            parameters: parameters.clone(),
                        },
                        validator: compile(&parameters),
                        executor,
                        timeout: def.timeout,
                        cancel_on_interruption: def.cancel_on_interruption,
                        source: def.source.clone(),
                        kind_label,
                    }),
                );
            }
        }

        // The servers that run now declare their tools; what clashes or is missing is
        // a mistake in the files, reported like any other.
        for slot in servers.values() {
            if let Ok(server) = slot.server() {
                for (path, message) in shared.register_server(slot, &server) {
                    errors.push(SpecError::Start { path: path.display().to_string(), message });
                }
            }
        }

        let registry = ToolRegistry { shared, servers: servers.into_values().collect() };
        if errors.is_empty() {
            Ok(registry)
        } else {
            registry.shutdown().await;
            Err(errors)
        }
    }

    /// An empty registry (no tools).
    pub fn empty() -> ToolRegistry {
        ToolRegistry { shared: Arc::new(Shared { tools: RwLock::new(BTreeMap::new()), named: Vec::new() }), servers: Vec::new() }
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.shared.read().contains_key(name)
    }

    /// Every tool name, sorted (those of MCP servers that have not run yet are not known).
    pub fn names(&self) -> Vec<String> {
        self.shared.read().keys().cloned().collect()
    }

    /// The default for "cancel this call when the user interrupts" (agents may override).
    pub fn cancel_on_interruption(&self, name: &str) -> Option<bool> {
        self.shared.get(name).map(|t| t.cancel_on_interruption)
    }

    /// What agents are resolved against: the tools registered now, plus the `<server>_`
    /// prefixes of servers not running yet, whose tools agents then get once they run.
    pub fn catalog(&self) -> ToolCatalog {
        let mut c = ToolCatalog::default();
        for (name, t) in self.shared.read().iter() {
            c.insert(name, t.cancel_on_interruption);
        }
        for s in &self.servers {
            let def = s.def();
            if !s.is_running() && def.expose != Expose::None {
                c.open_prefix(&format!("{}_", def.name), def.cancel_on_interruption);
            }
        }
        let weak = Arc::downgrade(&self.shared);
        c.set_live(LiveTools::new(move || weak.upgrade().map(|s| s.read().keys().cloned().collect()).unwrap_or_default()));
        c
    }

    /// What the model sees of a tool. The description of a tool whose MCP server is not
    /// running starts by saying so (in words that stay the same while it is down, so
    /// that a prompt built from it does not change at each retry).
    pub fn declaration(&self, name: &str) -> Option<ToolDeclaration> {
        let t = self.shared.get(name)?;
        let mut d = t.declaration.clone();
        if let Some(server) = t.mcp_server() {
            if !server.is_running() {
                let note = format!("[Unavailable right now: its MCP server '{}' is not running; calls fail until it restarts.]", server.name());
                d.description = if d.description.is_empty() { note } else { format!("{note} {}", d.description) };
            }
        }
        Some(d)
    }

    /// Declarations of `names`, in that order; unknown names are skipped.
    pub fn declarations<S: AsRef<str>>(&self, names: &[S]) -> Vec<ToolDeclaration> {
        names.iter().filter_map(|n| self.declaration(n.as_ref())).collect()
    }

    /// The tool set a tool belongs to, as clients see it (`server_label` of its
    /// `mcp_call` items): its MCP server's name, or `hark` for YAML tools.
    pub fn server_label(&self, name: &str) -> String {
        match self.shared.get(name).as_deref().and_then(RegisteredTool::mcp_server) {
            Some(server) => server.name().to_string(),
            None => "hark".to_string(),
        }
    }

    /// The MCP servers, running or not.
    pub fn servers(&self) -> &[Arc<McpSupervisor>] {
        &self.servers
    }

    /// One MCP server by name.
    pub fn server(&self, name: &str) -> Option<&Arc<McpSupervisor>> {
        self.servers.iter().find(|s| s.name() == name)
    }

    /// Every MCP server's state, by name (for `/readyz` and logs).
    pub fn health(&self) -> Vec<ServerHealth> {
        self.servers.iter().map(|s| s.health()).collect()
    }

    /// The MCP servers that are not running, each with why, as a sentence.
    pub fn unavailable(&self) -> Vec<(String, String)> {
        self.servers.iter().filter_map(|s| s.server().err().map(|why| (s.name().to_string(), why))).collect()
    }

    /// Runs one call: parses and validates `arguments_json`, then runs the handler under
    /// the tool's timeout, stopping it when `cancel` fires. Always returns an outcome;
    /// one for a tool whose MCP server is not running comes at once and says so.
    pub async fn call(&self, name: &str, arguments_json: &str, cancel: CancellationToken) -> ToolOutcome {
        let Some(tool) = self.shared.get(name) else {
            // A tool a server that never ran would expose: say why it is missing.
            if let Some(server) = self.servers.iter().find(|s| name.starts_with(&format!("{}_", s.name())) && !s.is_running()) {
                if let Err(why) = server.server() {
                    return ToolOutcome::error(format!("tool {name} is unavailable: {why}"));
                }
            }
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
        let running = match &tool.executor {
            Executor::Mcp { server, .. } => match server.server() {
                Ok(s) => Some(s),
                Err(why) => return ToolOutcome::error(format!("tool {name} is unavailable: {why}")),
            },
            _ => None,
        };
        let work = async {
            match (&tool.executor, &running) {
                (Executor::Builtin(b), _) => b.call(&args).await,
                (Executor::Http(h), _) => h.call(&args).await,
                (Executor::Mcp { tool, .. }, Some(server)) => server.call(tool, args.clone()).await,
                _ => Err(format!("tool {name} has no handler")),
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
        let tools = self.shared.read();
        let rows: Vec<[String; 4]> = tools
            .iter()
            .map(|(name, t)| {
                let mut desc: String = t.declaration.description.lines().next().unwrap_or("").to_string();
                if desc.chars().count() > 60 {
                    desc = desc.chars().take(59).collect::<String>() + "…";
                }
                let kind = match t.mcp_server() {
                    Some(s) if !s.is_running() => format!("{} (down)", t.kind_label),
                    _ => t.kind_label.clone(),
                };
                [name.clone(), kind, desc, t.source.display().to_string()]
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
        for (_, why) in self.unavailable() {
            out.push_str(&format!("unavailable: {why}\n"));
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
