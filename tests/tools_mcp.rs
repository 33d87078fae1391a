//! MCP for real: PyPI's `mcp-server-time` as a child process over stdio, discovered,
//! called, and stopped; servers that cannot start or that die are marked unavailable
//! (their tools answer at once with why) and restarted, and the rest keeps working.
//!
//! Needs a Python with `mcp-server-time`: `HARK_TEST_PYTHON` (scripts/test sets it to
//! `.venv/bin/python` after `pip install 'mcp-server-time==2026.10.19'`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hark::tools::{AgentSet, OutcomeKind, ServerState, SpecError, ToolSet};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn python() -> String {
    let py = std::env::var("HARK_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        assert!(
            venv.exists(),
            "no Python with mcp-server-time: run scripts/test (it creates .venv), or set HARK_TEST_PYTHON \
             to a python that has `pip install 'mcp-server-time==2026.10.19'`"
        );
        venv.display().to_string()
    });
    let ok = std::process::Command::new(&py).args(["-c", "import mcp_server_time"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "{py} cannot import mcp_server_time: pip install 'mcp-server-time==2026.10.19' into it");
    py
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn time_server(py: &str, extra: &str) -> String {
    format!("mcp_server:\n  name: time\n  command: [{py}, -m, mcp_server_time, --local-timezone, UTC]\n{extra}")
}

#[tokio::test]
async fn the_time_server_is_discovered_and_called() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "time.mcp.yaml", &time_server(&py, "  expose: all\n"));
    // One tool named explicitly (its description and schema come from the server)...
    write(dir.path(), "now.yaml", "name: now_in\nhandler: {kind: mcp, server: time, tool: get_current_time}\ntimeout_ms: 5000\n");
    let set = ToolSet::load_dir(dir.path(), dir.path()).unwrap_or_else(|e| panic!("{e:#?}"));
    let reg = set.start().await.unwrap_or_else(|e| panic!("{e:#?}"));
    // ...so it is not registered a second time as time_get_current_time.
    assert_eq!(reg.names(), vec!["now_in", "time_convert_time"]);
    let decl = reg.declaration("now_in").unwrap();
    assert!(decl.description.to_lowercase().contains("time"), "{decl:?}");
    assert!(decl.parameters["properties"]["timezone"].is_object(), "{decl:?}");

    let out = reg.call("now_in", r#"{"timezone": "Europe/Paris"}"#, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    let v: Value = serde_json::from_str(&out.output).unwrap();
    assert_eq!(v["timezone"], "Europe/Paris");
    assert!(v["datetime"].as_str().unwrap().starts_with("20"), "{v}");

    let args = json!({"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}).to_string();
    let out = reg.call("time_convert_time", &args, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    let v: Value = serde_json::from_str(&out.output).unwrap();
    assert!(v["target"]["datetime"].as_str().unwrap().contains("21:00"), "{v}");

    // The server's own error (isError) is an error result.
    let out = reg.call("now_in", r#"{"timezone": "Mars/Olympus"}"#, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert!(out.output.contains("Mars/Olympus"), "{}", out.output);

    // The discovered schema is enforced before the server sees anything.
    let out = reg.call("now_in", r#"{"timezone": 5}"#, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(out.output.starts_with("invalid arguments") && out.output.contains("/timezone"), "{}", out.output);
    let out = reg.call("now_in", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(out.output.contains("\"timezone\" is a required property"), "{}", out.output);

    // Agents resolve globs against what the server listed.
    let adir = tempfile::tempdir().unwrap();
    write(adir.path(), "agent.yaml", "name: a\ninstructions: x\ntools: [\"time_*\", now_in]\n");
    let agents = AgentSet::load_dir(adir.path(), &reg.catalog()).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(agents.get("a").unwrap().tool_names(), vec!["time_convert_time", "now_in"]);

    // Shutting down stops the server process.
    let pid = reg.servers()[0].pid().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    reg.shutdown().await;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.rsplit(')').next().unwrap().trim_start().starts_with('Z'), "still running: {stat}");
    let out = reg.call("now_in", r#"{"timezone": "UTC"}"#, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
}

#[tokio::test]
async fn expose_lists_filter_and_name_clashes_are_errors() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "time.mcp.yaml", &time_server(&py, "  expose: [\"get_*\"]\n"));
    let reg = ToolSet::load_dir(dir.path(), dir.path()).unwrap().start().await.unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(reg.names(), vec!["time_get_current_time"]);
    reg.shutdown().await;

    // A tool file that already uses the name the server's tool would get.
    write(dir.path(), "clash.yaml", "name: time_get_current_time\nhandler: {kind: builtin, name: clock}\n");
    let errors = ToolSet::load_dir(dir.path(), dir.path()).unwrap().start().await.unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = errors[0].to_string();
    assert!(e.contains("time.mcp.yaml") && e.contains("clash.yaml") && e.contains("time_get_current_time"), "{e}");

    // An explicit tool the server does not have.
    std::fs::remove_file(dir.path().join("clash.yaml")).unwrap();
    write(dir.path(), "ghost.yaml", "name: ghost\nhandler: {kind: mcp, server: time, tool: get_ghost}\n");
    let errors = ToolSet::load_dir(dir.path(), dir.path()).unwrap().start().await.unwrap_err();
    let e = errors.iter().map(SpecError::to_string).collect::<Vec<_>>().join("\n");
    assert!(e.contains("ghost.yaml") && e.contains("no tool named \"get_ghost\"") && e.contains("get_current_time"), "{e}");
}

/// How long a test waits for a server to come up or go down before it fails.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn servers_that_cannot_start_leave_the_rest_working() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "crash.mcp.yaml",
        &format!(
            "mcp_server:\n  name: crash\n  command: [{py}, -c, \"import sys; sys.stderr.write('no luck today'); sys.exit(2)\"]\n  restart_delay_ms: 50\n  max_restart_delay_ms: 200\n"
        ),
    );
    write(
        dir.path(),
        "mute.mcp.yaml",
        &format!("mcp_server:\n  name: mute\n  command: [{py}, -c, \"import time; time.sleep(60)\"]\n  startup_timeout_ms: 500\n"),
    );
    write(dir.path(), "missing.mcp.yaml", "mcp_server:\n  name: missing\n  command: [/nonexistent/server]\n");
    // A tool file naming a tool of a server that is down, and a tool that needs no server.
    write(dir.path(), "ghost.yaml", "name: ghost\ndescription: Ask the ghost.\nhandler: {kind: mcp, server: missing, tool: boo}\n");
    write(dir.path(), "calc.yaml", "name: calculator\nhandler: {kind: builtin, name: calculator}\n");
    let set = ToolSet::load_dir(dir.path(), dir.path()).unwrap();
    let start = Instant::now();
    let reg = set.start().await.unwrap_or_else(|e| panic!("a server that cannot start must not stop the registry: {e:#?}"));
    // The mute server would sleep 60 s: its startup timeout bounds the wait.
    assert!(start.elapsed() < Duration::from_secs(30), "a server's startup was not bounded");

    let down: std::collections::BTreeMap<String, String> = reg.unavailable().into_iter().collect();
    assert_eq!(down.keys().map(String::as_str).collect::<Vec<_>>(), vec!["crash", "missing", "mute"], "{down:#?}");
    assert!(down["crash"].contains("no luck today") && down["crash"].contains("restarting"), "{}", down["crash"]);
    assert!(down["mute"].contains("did not answer `initialize` within 500 ms"), "{}", down["mute"]);
    assert!(down["missing"].contains("cannot run /nonexistent/server"), "{}", down["missing"]);
    let health = reg.health();
    assert!(health.iter().all(|h| h.state == ServerState::Restarting && h.pid.is_none() && h.last_error.is_some()), "{health:#?}");
    assert!(health.iter().find(|h| h.name == "missing").unwrap().source.ends_with("missing.mcp.yaml"), "{health:#?}");

    // The named tool is declared (the model is told it is down) and answers at once.
    assert_eq!(reg.names(), vec!["calculator", "ghost"]);
    let decl = reg.declaration("ghost").unwrap();
    assert!(decl.description.starts_with("[Unavailable right now: its MCP server 'missing'") && decl.description.ends_with("Ask the ghost."), "{decl:?}");
    let t = Instant::now();
    let out = reg.call("ghost", "{}", CancellationToken::new()).await;
    assert!(t.elapsed() < Duration::from_secs(2), "an unavailable tool took {:?} to answer", t.elapsed());
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert!(
        out.output.starts_with("tool ghost is unavailable: MCP server 'missing' is not running (restarting")
            && out.output.contains("cannot run /nonexistent/server"),
        "{}",
        out.output
    );
    // A tool only the server would have listed says why it is missing.
    let out = reg.call("crash_anything", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert!(out.output.contains("MCP server 'crash' is not running") && out.output.contains("no luck today"), "{}", out.output);

    // Other tools work.
    let out = reg.call("calculator", r#"{"expression": "6 * 7"}"#, CancellationToken::new()).await;
    assert_eq!((out.kind, out.output.as_str()), (OutcomeKind::Ok, "42"));

    // Agents that name the missing servers' tools still load.
    let adir = tempfile::tempdir().unwrap();
    write(adir.path(), "agent.yaml", "name: a\ninstructions: x\ntools: [calculator, ghost, \"crash_*\", mute_say]\n");
    let agents = AgentSet::load_dir(adir.path(), &reg.catalog()).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(agents.get("a").unwrap().tool_names(), vec!["calculator", "ghost"]);

    // The crashing server is tried again in the background, with a growing delay.
    let crash = reg.server("crash").unwrap();
    let seen = crash.wait_for(|h| h.failures >= 3, WAIT).await.unwrap_or_else(|h| panic!("not retried: {h:?}"));
    assert_eq!(seen.state, ServerState::Restarting);
    assert!(seen.last_error.as_deref().unwrap_or("").contains("no luck today"), "{seen:?}");

    reg.shutdown().await;
    assert!(reg.health().iter().all(|h| h.state == ServerState::Stopped), "{:#?}", reg.health());
    let out = reg.call("ghost", "{}", CancellationToken::new()).await;
    assert!(out.output.contains("has been stopped"), "{}", out.output);
}

#[tokio::test]
async fn a_killed_server_is_restarted_and_its_tools_work_again() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "time.mcp.yaml", &time_server(&py, "  restart_delay_ms: 500\n"));
    let reg = ToolSet::load_dir(dir.path(), dir.path()).unwrap().start().await.unwrap_or_else(|e| panic!("{e:#?}"));
    let args = r#"{"timezone": "UTC"}"#;
    let out = reg.call("time_get_current_time", args, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");

    let time = reg.server("time").unwrap();
    let pid = time.pid().unwrap();
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let h = time.wait_for(|h| !h.is_running(), WAIT).await.unwrap_or_else(|h| panic!("the death was not noticed: {h:?}"));
    assert_eq!(h.state, ServerState::Restarting);
    // Its restart is at least restart_delay_ms away: this call finds it down.
    let out = reg.call("time_get_current_time", args, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert!(out.output.starts_with("tool time_get_current_time is unavailable: MCP server 'time' is not running"), "{}", out.output);
    assert!(reg.unavailable().iter().any(|(name, _)| name == "time"));
    assert!(reg.declaration("time_get_current_time").unwrap().description.starts_with("[Unavailable"));

    let h = time.wait_for(|h| h.is_running(), WAIT).await.unwrap_or_else(|h| panic!("not restarted: {h:?}"));
    assert_eq!(h.restarts, 1, "{h:?}");
    assert_ne!(h.pid, Some(pid));
    let out = reg.call("time_get_current_time", args, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert!(reg.unavailable().is_empty());
    assert!(!reg.declaration("time_get_current_time").unwrap().description.starts_with("[Unavailable"));
    reg.shutdown().await;
}

/// An MCP server of our own (the `mcp` SDK that mcp-server-time is built on) whose
/// `crash` tool kills its own process while the call is running.
const CRASHING_SERVER: &str = r#"
import os
from mcp.server.mcpserver import MCPServer
server = MCPServer("crashy")

@server.tool()
def echo(text: str) -> str:
    """Echo text."""
    return text

@server.tool()
def crash() -> str:
    """Kill this server in the middle of the call."""
    os.kill(os.getpid(), 9)
    return "unreachable"

server.run()
"#;

#[tokio::test]
async fn a_call_in_flight_when_its_server_dies_fails_at_once() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "crashy.py", CRASHING_SERVER);
    write(
        dir.path(),
        "crashy.mcp.yaml",
        &format!("mcp_server:\n  name: crashy\n  command: [{py}, crashy.py]\n  timeout_ms: 60000\n  restart_delay_ms: 100\n"),
    );
    let reg = ToolSet::load_dir(dir.path(), dir.path()).unwrap().start().await.unwrap_or_else(|e| panic!("{e:#?}"));
    let out = reg.call("crashy_echo", r#"{"text": "hi"}"#, CancellationToken::new()).await;
    assert_eq!((out.kind, out.output.as_str()), (OutcomeKind::Ok, "hi"), "{out:?}");

    let t = Instant::now();
    let out = reg.call("crashy_crash", "{}", CancellationToken::new()).await;
    assert!(t.elapsed() < Duration::from_secs(20), "the call waited {:?} for a dead server", t.elapsed());
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert!(out.output.contains("MCP server 'crashy'"), "{}", out.output);

    let crashy = reg.server("crashy").unwrap();
    crashy.wait_for(|h| h.is_running() && h.restarts >= 1, WAIT).await.unwrap_or_else(|h| panic!("not restarted: {h:?}"));
    let out = reg.call("crashy_echo", r#"{"text": "back"}"#, CancellationToken::new()).await;
    assert_eq!((out.kind, out.output.as_str()), (OutcomeKind::Ok, "back"), "{out:?}");
    reg.shutdown().await;
}

#[tokio::test]
async fn a_server_that_comes_up_late_brings_its_tools_to_agents() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    // mcp-server-time, refusing to start until the flag file exists.
    let script = "import os, sys\nif not os.path.exists(sys.argv[1]): sys.exit('not ready yet')\nsys.argv = [sys.argv[0], '--local-timezone', 'UTC']\nfrom mcp_server_time import main\nmain()\n";
    write(dir.path(), "late.py", script);
    write(
        dir.path(),
        "time.mcp.yaml",
        &format!("mcp_server:\n  name: time\n  command: [{py}, late.py, {}]\n  restart_delay_ms: 100\n  max_restart_delay_ms: 400\n", flag.display()),
    );
    let reg = ToolSet::load_dir(dir.path(), dir.path()).unwrap().start().await.unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(reg.unavailable()[0].1.contains("not ready yet"), "{:?}", reg.unavailable());
    assert!(reg.names().is_empty());

    let adir = tempfile::tempdir().unwrap();
    write(adir.path(), "agent.yaml", "name: a\ninstructions: x\ntools:\n  - \"time_*\"\n  - {name: time_convert_time, cancel_on_interruption: false}\n");
    let agents = AgentSet::load_dir(adir.path(), &reg.catalog()).unwrap_or_else(|e| panic!("{e:#?}"));
    let agent = agents.get("a").unwrap();
    assert!(agent.tool_names().is_empty());
    assert!(agent.tool("time_get_current_time").is_none());

    std::fs::write(&flag, "").unwrap();
    let time = reg.server("time").unwrap();
    time.wait_for(|h| h.is_running(), WAIT).await.unwrap_or_else(|h| panic!("never came up: {h:?}"));
    assert_eq!(agent.tool_names(), vec!["time_convert_time", "time_get_current_time"]);
    assert!(agent.tool("time_get_current_time").is_some_and(|t| t.cancel_on_interruption));
    assert!(agent.tool("time_convert_time").is_some_and(|t| !t.cancel_on_interruption));
    assert!(agent.tool("time_nonexistent").is_none());
    let out = reg.call("time_get_current_time", r#"{"timezone": "UTC"}"#, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    reg.shutdown().await;
}
