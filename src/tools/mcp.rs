//! The `mcp` executor: MCP servers run as child processes speaking JSON-RPC over
//! stdio (the official `rmcp` SDK), their tools discovered at startup with
//! `tools/list` and called with `tools/call`.
//!
//! A server gets no shell and an environment of only `PATH` plus the variables its
//! file lists; its stderr is drained continuously and the last lines are kept for
//! error messages. A server that does not answer `initialize` and `tools/list` within
//! `startup_timeout_ms` is a start error naming its file. Results: text content is
//! joined; other content is named, not inlined; `isError` makes an error result.
//!
//! The connection's end (the process exited, its pipes broke, or [`McpServer::shutdown`])
//! is watched: [`McpServer::closed`] fires, calls in flight end with an error instead
//! of waiting for their timeout, and the supervisor ([`super::supervisor`]) restarts it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock};
use rmcp::service::{RoleClient, RunningServiceCancellationToken};
use rmcp::transport::TokioChildProcess;
use rmcp::{Peer, ServiceExt};
use serde_json::{Map, Value};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::spec::McpServerDef;

/// The end of a server's stderr kept for messages.
const STDERR_TAIL_BYTES: usize = 2048;
/// A result longer than this is cut (it goes into a model's context).
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// One discovered tool.
#[derive(Debug, Clone)]
pub struct McpToolInfo {
    pub name: String,
    pub description: String,
    pub input_schema: Value,
}

/// A running MCP server.
pub struct McpServer {
    pub def: McpServerDef,
    pub tools: Vec<McpToolInfo>,
    peer: Peer<RoleClient>,
    /// Ends the connection (and so the child, which is killed on drop).
    stop: Mutex<Option<RunningServiceCancellationToken>>,
    /// The task that owns the connection and fires `closed` when it ends.
    watcher: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    closed: CancellationToken,
    stderr: Arc<Mutex<Vec<u8>>>,
    pid: Option<u32>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer").field("name", &self.def.name).field("pid", &self.pid).finish()
    }
}

fn push_tail(buf: &Mutex<Vec<u8>>, bytes: &[u8]) {
    let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
    b.extend_from_slice(bytes);
    if b.len() > STDERR_TAIL_BYTES {
        let cut = b.len() - STDERR_TAIL_BYTES;
        b.drain(..cut);
    }
}

fn tail_text(buf: &Mutex<Vec<u8>>) -> String {
    let b = buf.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&b).trim().to_string()
}

impl McpServer {
    /// Starts the server and lists its tools. `Err` says why, with its stderr's end.
    pub async fn start(def: &McpServerDef) -> Result<McpServer, String> {
        let program = def.program.display().to_string();
        let mut cmd = tokio::process::Command::new(&def.program);
        cmd.args(&def.args).current_dir(&def.cwd).env_clear().kill_on_drop(true);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        for name in &def.env {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        let (transport, stderr_pipe) = TokioChildProcess::builder(cmd)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {program} (in {}): {e}", def.cwd.display()))?;
        let pid = transport.id();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let drain = stderr_pipe.map(|mut pipe| {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    push_tail(&stderr, &buf[..n]);
                }
            })
        });
        let started = Instant::now();
        let fail = |what: String, drain: Option<tokio::task::JoinHandle<()>>, stderr: Arc<Mutex<Vec<u8>>>| async move {
            // The child is gone (or going): wait briefly for the rest of its stderr.
            if let Some(d) = drain {
                let _ = tokio::time::timeout(Duration::from_secs(2), d).await;
            }
            let tail = tail_text(&stderr);
            if tail.is_empty() {
                what
            } else {
                format!("{what}; its stderr ends with: {tail}")
            }
        };
        let service = match tokio::time::timeout(def.startup_timeout, ().serve(transport)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(fail(format!("{program} did not start as an MCP server: {e}"), drain, stderr).await),
            Err(_) => {
                return Err(fail(
                    format!("{program} did not answer `initialize` within {} ms", def.startup_timeout.as_millis()),
                    None,
                    stderr,
                )
                .await)
            }
        };
        let left = def.startup_timeout.saturating_sub(started.elapsed());
        let listed = match tokio::time::timeout(left, service.list_all_tools()).await {
            Ok(Ok(tools)) => tools,
            Ok(Err(e)) => {
                drop(service);
                return Err(fail(format!("listing the tools of {program} failed: {e}"), drain, stderr).await);
            }
            Err(_) => {
                drop(service);
                return Err(fail(format!("{program} did not list its tools within {} ms", def.startup_timeout.as_millis()), None, stderr).await);
            }
        };
        let tools = listed
            .into_iter()
            .map(|t| McpToolInfo {
                name: t.name.to_string(),
                description: t.description.map(|d| d.to_string()).unwrap_or_default(),
                input_schema: Value::Object((*t.input_schema).clone()),
            })
            .collect();
        let peer = service.peer().clone();
        let stop = service.cancellation_token();
        let closed = CancellationToken::new();
        let fire = closed.clone();
        let watcher = tokio::spawn(async move {
            // The service loop ends when the child's stdout closes (it exited or its
            // pipes broke) or when it is cancelled; dropping it kills the child.
            let _ = service.waiting().await;
            fire.cancel();
        });
        Ok(McpServer {
            def: def.clone(),
            tools,
            peer,
            stop: Mutex::new(Some(stop)),
            watcher: tokio::sync::Mutex::new(Some(watcher)),
            closed,
            stderr,
            pid,
        })
    }

    /// The server's process id (it was started with this id; see [`Self::is_closed`]).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Resolves when the connection has ended: the process exited, its pipes broke,
    /// or it was shut down.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Why the connection ended, for messages: the end of its stderr when it left any.
    pub fn exit_reason(&self) -> String {
        let tail = tail_text(&self.stderr);
        if tail.is_empty() {
            "its process exited or closed its pipes".to_string()
        } else {
            format!("its process exited or closed its pipes; its stderr ends with: {tail}")
        }
    }

    pub fn tool(&self, name: &str) -> Option<&McpToolInfo> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// Calls one tool. `Err` is a message for the model.
    pub async fn call(&self, tool: &str, args: Map<String, Value>) -> Result<String, String> {
        let params = CallToolRequestParams::new(tool.to_string()).with_arguments(args);
        if self.is_closed() {
            return Err(format!("MCP server '{}' is not running: {}", self.def.name, self.exit_reason()));
        }
        let result = tokio::select! {
            r = self.peer.call_tool(params) => r,
            // The call's answer can never come: say so now rather than at the timeout.
            _ = self.closed.cancelled() => {
                return Err(format!("MCP server '{}' stopped during the call: {}", self.def.name, self.exit_reason()));
            }
        };
        let result = result.map_err(|e| {
            let tail = tail_text(&self.stderr);
            if tail.is_empty() {
                format!("MCP server '{}': {e}", self.def.name)
            } else {
                format!("MCP server '{}': {e} (stderr: {tail})", self.def.name)
            }
        })?;
        let text = result_text(&result);
        if result.is_error == Some(true) {
            Err(if text.is_empty() { "the tool reported an error".into() } else { text })
        } else {
            Ok(text)
        }
    }

    /// Closes the connection; the child is killed if it does not exit.
    pub async fn shutdown(&self) {
        let stop = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(stop) = stop {
            stop.cancel();
        }
        if let Some(watcher) = self.watcher.lock().await.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
        }
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        // The watcher task owns the connection: without this it (and the child) would
        // outlive a server dropped without `shutdown`.
        if let Some(stop) = self.stop.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            stop.cancel();
        }
    }
}

/// A tool result as text for the model.
pub fn result_text(result: &CallToolResult) -> String {
    let mut parts: Vec<String> = Vec::new();
    for block in &result.content {
        match block {
            ContentBlock::Text(t) => parts.push(t.text.clone()),
            other => {
                let kind = serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| "non-text".into());
                parts.push(format!("[{kind} content not shown]"));
            }
        }
    }
    if parts.is_empty() {
        if let Some(s) = &result.structured_content {
            parts.push(s.to_string());
        }
    }
    let mut text = parts.join("\n");
    if text.len() > MAX_RESULT_BYTES {
        let mut cut = MAX_RESULT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = text.len();
        text.truncate(cut);
        text.push_str(&format!("\n[result truncated: {total} bytes, the first {cut} kept]"));
    }
    text
}
