//! The hark binary with an MCP server that cannot start: `hark check` fails naming the
//! server's file and why; `hark serve` warns, starts anyway and answers HTTP; `hark
//! tools list` marks the server's tools as down.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn hark(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hark")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A config with one working tool and one MCP server whose program does not exist.
fn setup() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let (tools, agents) = (dir.path().join("tools"), dir.path().join("agents"));
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::create_dir_all(&agents).unwrap();
    std::fs::write(tools.join("calc.yaml"), "name: calculator\nhandler: {kind: builtin, name: calculator}\n").unwrap();
    std::fs::write(tools.join("gone.mcp.yaml"), "mcp_server:\n  name: gone\n  command: [/nonexistent/mcp-server]\n").unwrap();
    std::fs::write(tools.join("ask.yaml"), "name: ask_gone\ndescription: Ask it.\nhandler: {kind: mcp, server: gone, tool: ask}\n").unwrap();
    std::fs::write(agents.join("helper.yaml"), "name: helper\ninstructions: hi\ntools: [calculator, ask_gone, \"gone_*\"]\n").unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "backend: {kind: openai}\naudio: {vad: energy}\nsession: {agent: helper}\n").unwrap();
    let cfg = cfg.display().to_string();
    (dir, cfg)
}

#[test]
fn check_names_a_server_that_cannot_start() {
    let (_dir, cfg) = setup();
    let (ok, out) = hark(&["check", "--config", &cfg]);
    assert!(!ok, "{out}");
    let line = out.lines().find(|l| l.contains("gone.mcp.yaml")).unwrap_or_else(|| panic!("no line names gone.mcp.yaml:\n{out}"));
    assert!(line.contains("mcp_server gone: cannot start") && line.contains("cannot run /nonexistent/mcp-server"), "{line}");
}

#[test]
fn tools_list_marks_the_tools_of_a_server_that_is_down() {
    let (_dir, cfg) = setup();
    let (ok, out) = hark(&["tools", "list", "--config", &cfg]);
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l.starts_with("ask_gone") && l.contains("mcp:gone (down)")), "{out}");
    assert!(out.contains("unavailable: MCP server 'gone' is not running"), "{out}");
    assert!(out.contains("agent helper") && out.contains("calculator, ask_gone"), "{out}");
}

#[test]
fn serve_starts_without_a_server_that_cannot_start() {
    let (_dir, cfg) = setup();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hark"))
        .args(["serve", "--config", &cfg])
        .env("HARK_SERVER__PORT", "0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let listening = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("hark listening on http://") => break line,
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("hark serve did not start ({e}); its log:\n{}", seen.join("\n"));
            }
        }
    };
    let warned = seen.iter().any(|l| l.contains("WARN") && l.contains("gone") && l.contains("cannot run /nonexistent/mcp-server"));
    // It serves: /healthz answers.
    let addr = listening.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    // /readyz says it serves degraded, and which server is down.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut ready = String::new();
    let _ = stream.read_to_string(&mut ready);
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "no warning naming the server and why:\n{}", seen.join("\n"));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(ready.starts_with("HTTP/1.1 200") && ready.contains("\"status\":\"degraded\"") && ready.contains("\"gone\""), "{ready}");
}
