//! The `command` executor: runs a program with arguments built from the call's
//! arguments, never through a shell.
//!
//! Each argv element of the tool file becomes exactly one argument; `{param}`
//! placeholders are replaced by the argument's text (strings as they are, numbers and
//! booleans printed, arrays and objects as JSON), so `; rm -rf /`, `$(id)` or backticks
//! reach the program as plain characters. An element that is just `{param}` is left out
//! when the argument is absent or null. `../` and leading `-` are passed literally too:
//! argv is data, and the schema (`pattern`, `enum`) is the place to constrain values.
//!
//! The child runs in its own process group with stdin closed and an environment of
//! only `PATH` plus the variables the tool lists. stdout and stderr are drained as
//! they come (the child never blocks on a full pipe); stdout beyond `max_output_bytes`
//! is dropped and the result says so. On timeout or cancellation, and after the child
//! exits, the whole group is killed (SIGKILL) and the child reaped.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use super::registry::{OutcomeKind, ToolOutcome};
use super::spec::CommandHandler;
use super::template::arg_text;

/// The end of stderr kept for error messages.
const STDERR_TAIL_BYTES: usize = 2048;

/// argv[1..] for one call.
pub fn build_args(h: &CommandHandler, args: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::with_capacity(h.args.len());
    for t in &h.args {
        if let Some(p) = t.single_param() {
            match args.get(p) {
                None | Some(Value::Null) => continue,
                Some(v) => {
                    out.push(arg_text(Some(v)));
                    continue;
                }
            }
        }
        // Command templates hold no ${ENV:…}, so rendering cannot fail.
        out.push(t.render(args, |v| v.to_string()).unwrap_or_default());
    }
    out
}

/// Kills a process group when dropped, so an abandoned call leaves nothing running.
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.0 {
            // SAFETY: killpg only sends a signal; pgid is the group this call created
            // (the child was spawned with process_group(0), so its pid is the pgid).
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn read_head(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, usize) {
    let Some(mut pipe) = pipe else { return (Vec::new(), 0) };
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, total)
}

async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    let Some(mut pipe) = pipe else { return Vec::new() };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > cap {
                    kept.drain(..kept.len() - cap);
                }
            }
        }
    }
    kept
}

enum Stop {
    Cancelled,
    Timeout,
    Done((Vec<u8>, usize), Vec<u8>, std::io::Result<std::process::ExitStatus>),
}

/// Runs the command for one call. Timeout and cancellation are handled here, so the
/// child is killed and reaped before this returns.
pub async fn run(h: &CommandHandler, args: &Map<String, Value>, cancel: &CancellationToken, timeout: Duration) -> ToolOutcome {
    let program = h.program.display().to_string();
    let mut cmd = tokio::process::Command::new(&h.program);
    cmd.args(build_args(h, args))
        .current_dir(&h.cwd)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for name in &h.env {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ToolOutcome::error(format!("cannot run {program} (in {}): {e}", h.cwd.display())),
    };
    let mut guard = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let stop = tokio::select! {
        biased;
        _ = cancel.cancelled() => Stop::Cancelled,
        _ = tokio::time::sleep(timeout) => Stop::Timeout,
        (out, err, status) = async {
            tokio::join!(read_head(stdout, h.max_output_bytes), read_tail(stderr, STDERR_TAIL_BYTES), child.wait())
        } => Stop::Done(out, err, status),
    };
    // Whatever happened, nothing of this call keeps running.
    guard.kill();
    let _ = child.wait().await;
    guard.0 = None;
    match stop {
        Stop::Cancelled => ToolOutcome { kind: OutcomeKind::Cancelled, output: "cancelled".into() },
        Stop::Timeout => ToolOutcome { kind: OutcomeKind::Timeout, output: format!("timed out after {} ms", timeout.as_millis()) },
        Stop::Done(_, _, Err(e)) => ToolOutcome::error(format!("{program}: {e}")),
        Stop::Done((out, total), err, Ok(status)) => {
            if !status.success() {
                let how = match status.code() {
                    Some(code) => format!("exit status {code}"),
                    None => "killed by a signal".to_string(),
                };
                let tail = if err.is_empty() { tail_text(&out, STDERR_TAIL_BYTES) } else { String::from_utf8_lossy(&err).trim().to_string() };
                return ToolOutcome::error(if tail.is_empty() { format!("{program}: {how}") } else { format!("{program}: {how}: {tail}") });
            }
            let mut text = String::from_utf8_lossy(&out).trim_end().to_string();
            if total > out.len() {
                text.push_str(&format!("\n[output truncated: {total} bytes, the first {} kept]", out.len()));
            }
            ToolOutcome::ok(text)
        }
    }
}

fn tail_text(bytes: &[u8], cap: usize) -> String {
    let start = bytes.len().saturating_sub(cap);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}
