//! MCP for real: PyPI's `mcp-server-time` as a child process over stdio, discovered,
//! called, and stopped; servers that fail to start are clear errors naming the file.
//!
//! Needs a Python with `mcp-server-time`: `HARK_TEST_PYTHON` (scripts/test sets it to
//! `.venv/bin/python` after `pip install 'mcp-server-time==2026.10.19'`).

use std::path::{Path, PathBuf};

use hark::tools::{AgentSet, OutcomeKind, SpecError, ToolSet};
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

#[tokio::test]
async fn servers_that_fail_to_start_are_clear_errors() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "crash.mcp.yaml",
        &format!("mcp_server:\n  name: crash\n  command: [{py}, -c, \"import sys; sys.stderr.write('no luck today'); sys.exit(2)\"]\n"),
    );
    write(
        dir.path(),
        "mute.mcp.yaml",
        &format!("mcp_server:\n  name: mute\n  command: [{py}, -c, \"import time; time.sleep(60)\"]\n  startup_timeout_ms: 500\n"),
    );
    write(dir.path(), "missing.mcp.yaml", "mcp_server:\n  name: missing\n  command: [/nonexistent/server]\n");
    let set = ToolSet::load_dir(dir.path(), dir.path()).unwrap();
    let start = std::time::Instant::now();
    let errors: Vec<String> = set.start().await.unwrap_err().iter().map(SpecError::to_string).collect();
    // The mute server would sleep 60 s: its startup timeout bounds the wait.
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "a server's startup was not bounded");
    assert_eq!(errors.len(), 3, "{errors:#?}");
    let find = |file: &str| errors.iter().find(|e| e.contains(file)).unwrap_or_else(|| panic!("{file}: {errors:#?}")).clone();
    let crash = find("crash.mcp.yaml");
    assert!(crash.contains("mcp_server crash") && crash.contains("no luck today"), "{crash}");
    let mute = find("mute.mcp.yaml");
    assert!(mute.contains("did not answer `initialize` within 500 ms"), "{mute}");
    let missing = find("missing.mcp.yaml");
    assert!(missing.contains("cannot run /nonexistent/server"), "{missing}");
}
