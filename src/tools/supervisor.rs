//! [`McpSupervisor`]: keeps one MCP server running — degraded, not dead.
//!
//! A server that cannot start, or that stops (its process exits, its pipes break), is
//! marked unavailable with the reason and started again in the background after a
//! delay that doubles from `restart_delay_ms` up to `max_restart_delay_ms`. The delay
//! goes back to its start only once a server has stayed up longer than the longest
//! delay, so one that crashes right after each start is not restarted in a tight loop.
//! Calls meanwhile get [`McpSupervisor::server`]'s message at once, never a hang.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::mcp::McpServer;
use super::spec::McpServerDef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    Running,
    /// Not running; the next start is scheduled.
    Restarting,
    /// Shut down with the registry; never started again.
    Stopped,
}

/// What `/readyz`, `hark check` and logs say about one MCP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerHealth {
    pub name: String,
    /// The file that declares it.
    pub source: PathBuf,
    pub state: ServerState,
    /// The process id while it runs.
    pub pid: Option<u32>,
    /// Why it is not running now, or why it stopped last.
    pub last_error: Option<String>,
    /// Starts that failed in a row (0 while it runs).
    pub failures: u32,
    /// Successful starts after the first one.
    pub restarts: u32,
}

impl ServerHealth {
    pub fn is_running(&self) -> bool {
        self.state == ServerState::Running
    }
}

/// Called with each server that comes up again (its tools may have changed).
pub type OnUp = Box<dyn Fn(&Arc<McpSupervisor>, &Arc<McpServer>) + Send + Sync>;

enum Slot {
    Running(Arc<McpServer>),
    Down { reason: String, retry_at: Instant },
    Stopped,
}

struct Inner {
    slot: Slot,
    last_error: Option<String>,
    failures: u32,
    restarts: u32,
}

pub struct McpSupervisor {
    def: McpServerDef,
    inner: Mutex<Inner>,
    /// Bumped on every change of state, so that waiters need no polling.
    changes: tokio::sync::watch::Sender<u64>,
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for McpSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.health();
        f.debug_struct("McpSupervisor").field("name", &h.name).field("state", &h.state).field("pid", &h.pid).finish()
    }
}

impl McpSupervisor {
    /// Takes over from a server's first start (already tried, so that the registry can
    /// report problems of the first start as it builds) and keeps it running.
    pub fn spawn(def: McpServerDef, first: Result<McpServer, String>, on_up: OnUp) -> Arc<McpSupervisor> {
        let (slot, last_error, failures) = match first {
            Ok(server) => (Slot::Running(Arc::new(server)), None, 0),
            Err(reason) => {
                tracing::warn!(
                    server = %def.name,
                    file = %def.source.display(),
                    "MCP server could not start; its tools are unavailable until it does (retrying in {} ms): {reason}",
                    def.restart_delay.as_millis()
                );
                let retry_at = Instant::now() + def.restart_delay;
                (Slot::Down { reason: reason.clone(), retry_at }, Some(reason), 1)
            }
        };
        let sup = Arc::new(McpSupervisor {
            def,
            inner: Mutex::new(Inner { slot, last_error, failures, restarts: 0 }),
            changes: tokio::sync::watch::channel(0).0,
            stop: CancellationToken::new(),
            task: tokio::sync::Mutex::new(None),
        });
        let task = tokio::spawn(supervise(sup.clone(), on_up));
        if let Ok(mut t) = sup.task.try_lock() {
            *t = Some(task);
        }
        sup
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    pub fn def(&self) -> &McpServerDef {
        &self.def
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server is down for `reason`; the next attempt is `retry_in` away. `false`:
    /// the supervisor was stopped meanwhile (nothing to retry).
    fn mark_down(&self, reason: String, retry_in: Duration, failed_start: bool) -> bool {
        let mut inner = self.lock();
        if matches!(inner.slot, Slot::Stopped) {
            return false;
        }
        inner.slot = Slot::Down { reason: reason.clone(), retry_at: Instant::now() + retry_in };
        inner.last_error = Some(reason);
        if failed_start {
            inner.failures += 1;
        }
        true
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The running server, or why there is none, as a sentence for the model.
    pub fn server(&self) -> Result<Arc<McpServer>, String> {
        let inner = self.lock();
        match &inner.slot {
            Slot::Running(s) if !s.is_closed() => Ok(s.clone()),
            // Closed but not yet noticed by the supervisor task: it is about to restart.
            Slot::Running(s) => Err(format!(
                "MCP server '{}' is not running (restarting; last error: {})",
                self.def.name,
                s.exit_reason()
            )),
            Slot::Down { reason, retry_at } => {
                let wait = retry_at.saturating_duration_since(Instant::now());
                Err(format!(
                    "MCP server '{}' is not running (restarting, next attempt in {:.0} s; last error: {reason})",
                    self.def.name,
                    wait.as_secs_f64().ceil()
                ))
            }
            Slot::Stopped => Err(format!("MCP server '{}' has been stopped (hark is shutting down)", self.def.name)),
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(&self.lock().slot, Slot::Running(s) if !s.is_closed())
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        match &self.lock().slot {
            Slot::Running(s) => s.pid(),
            _ => None,
        }
    }

    pub fn health(&self) -> ServerHealth {
        let inner = self.lock();
        let (state, pid) = match &inner.slot {
            Slot::Running(s) if !s.is_closed() => (ServerState::Running, s.pid()),
            Slot::Running(_) | Slot::Down { .. } => (ServerState::Restarting, None),
            Slot::Stopped => (ServerState::Stopped, None),
        };
        let last_error = match &inner.slot {
            Slot::Running(s) if s.is_closed() => Some(s.exit_reason()),
            _ => inner.last_error.clone(),
        };
        ServerHealth {
            name: self.def.name.clone(),
            source: self.def.source.clone(),
            state,
            pid,
            last_error,
            failures: inner.failures,
            restarts: inner.restarts,
        }
    }

    /// Waits until `ready` holds for the server's health, or `timeout` passes; either
    /// way returns the health last seen.
    pub async fn wait_for(&self, ready: impl Fn(&ServerHealth) -> bool, timeout: Duration) -> Result<ServerHealth, ServerHealth> {
        let mut rx = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let h = self.health();
            if ready(&h) {
                return Ok(h);
            }
            // A server that closed unnoticed changes no state: the closing itself wakes us.
            let running = match &self.lock().slot {
                Slot::Running(s) => Some(s.clone()),
                _ => None,
            };
            let closed = async {
                match &running {
                    Some(s) => s.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(self.health()) },
                _ = closed => {}
                _ = tokio::time::sleep_until(deadline) => return Err(self.health()),
            }
        }
    }

    /// Stops supervising and the server; later calls say it has been stopped.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
        let running = match std::mem::replace(&mut self.lock().slot, Slot::Stopped) {
            Slot::Running(s) => Some(s),
            _ => None,
        };
        if let Some(s) = running {
            s.shutdown().await;
        }
        self.changed();
    }

    /// Stops the background task without waiting (for `Drop`).
    pub(crate) fn cancel(&self) {
        self.stop.cancel();
    }
}

async fn supervise(sup: Arc<McpSupervisor>, on_up: OnUp) {
    let def = sup.def.clone();
    let grow = |d: Duration| (d * 2).min(def.max_restart_delay);
    // The delay before the start after the next one that fails: the slot already
    // holds the time of the next one.
    let mut next = if sup.is_running() { def.restart_delay } else { grow(def.restart_delay) };
    let mut up_since = Instant::now();
    loop {
        let (running, retry_at) = match &sup.lock().slot {
            Slot::Running(s) => (Some(s.clone()), None),
            Slot::Down { retry_at, .. } => (None, Some(*retry_at)),
            Slot::Stopped => return,
        };
        if let Some(server) = running {
            tokio::select! {
                _ = sup.stop.cancelled() => return,
                _ = server.closed() => {}
            }
            let reason = server.exit_reason();
            if up_since.elapsed() > def.max_restart_delay {
                next = def.restart_delay;
            }
            tracing::warn!(
                server = %def.name,
                file = %def.source.display(),
                "MCP server stopped; its tools are unavailable until it restarts (in {} ms): {reason}",
                next.as_millis()
            );
            if !sup.mark_down(reason, next, false) {
                return;
            }
            next = grow(next);
            sup.changed();
            // Joins the connection's task; the child is killed if it lingers.
            server.shutdown().await;
            continue;
        }
        let Some(retry_at) = retry_at else { return };
        tokio::select! {
            _ = sup.stop.cancelled() => return,
            _ = tokio::time::sleep_until(retry_at.into()) => {}
        }
        let started = tokio::select! {
            _ = sup.stop.cancelled() => return,
            r = McpServer::start(&def) => r,
        };
        match started {
            Ok(server) => {
                let server = Arc::new(server);
                on_up(&sup, &server);
                let stopped = {
                    let mut inner = sup.lock();
                    let stopped = matches!(inner.slot, Slot::Stopped);
                    if !stopped {
                        inner.slot = Slot::Running(server.clone());
                        inner.failures = 0;
                        inner.restarts += 1;
                    }
                    stopped
                };
                if stopped {
                    server.shutdown().await;
                    return;
                }
                up_since = Instant::now();
                tracing::info!(server = %def.name, pid = ?server.pid(), "MCP server is running again");
                sup.changed();
            }
            Err(reason) => {
                tracing::warn!(
                    server = %def.name,
                    file = %def.source.display(),
                    "MCP server could not start again (next attempt in {} ms): {reason}",
                    next.as_millis()
                );
                if !sup.mark_down(reason, next, true) {
                    return;
                }
                next = grow(next);
                sup.changed();
            }
        }
    }
}
