//! The `command` handler for real: real processes, real pipes, real signals.
//! Shell metacharacters stay literal, output is capped, schema violations stop a call
//! before anything runs, and timeouts and cancellation kill the process group.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hark::tools::{OutcomeKind, ToolRegistry, ToolSet};
use tokio_util::sync::CancellationToken;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A registry with the given tool files, tools dir = base dir = `dir`.
async fn registry(dir: &Path, files: &[(&str, &str)]) -> ToolRegistry {
    for (name, text) in files {
        write(dir, name, text);
    }
    let set = ToolSet::load_dir(dir, dir).unwrap_or_else(|e| panic!("{e:#?}"));
    set.start().await.unwrap_or_else(|e| panic!("{e:#?}"))
}

fn echo_tool() -> &'static str {
    "\
name: echo
description: Echoes its text.
parameters: {type: object, properties: {text: {type: string}}, required: [text]}
handler:
  kind: command
  argv: [/bin/echo, \"{text}\"]
"
}

/// Whether the process is gone (or a zombie no one has reaped yet: it runs no more).
fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().map(|rest| rest.trim_start().starts_with('Z')).unwrap_or(false),
    }
}

/// Waits (bounded) for a condition another process brings about.
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shell_metacharacters_reach_the_program_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), &[("echo.yaml", echo_tool())]).await;
    let marker = dir.path().join("pwned");
    let nasty = format!("; rm -rf / $(id) `touch {m}` && touch {m} | cat > {m} $HOME * ' \" \\n", m = marker.display());
    let args = serde_json::json!({ "text": nasty }).to_string();
    let out = reg.call("echo", &args, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert_eq!(out.output, nasty);
    assert!(!marker.exists(), "a metacharacter was interpreted");
}

#[tokio::test]
async fn placeholders_inside_elements_and_non_string_values() {
    let dir = tempfile::tempdir().unwrap();
    let tool = "\
name: show
description: Prints its arguments, one per line.
parameters:
  type: object
  properties:
    city: {type: string}
    n: {type: integer}
    flag: {type: boolean}
    opts: {type: object}
    maybe: {type: string}
handler:
  kind: command
  argv: [python3, -c, \"import sys; print('\\\\n'.join(sys.argv[1:]))\", \"--city={city}\", \"{n}\", \"{flag}\", \"{opts}\", \"{maybe}\", \"{{literal}}\"]
";
    let reg = registry(dir.path(), &[("show.yaml", tool)]).await;
    let args = r#"{"city": "../../etc/passwd", "n": 3, "flag": true, "opts": {"a": [1, 2]}}"#;
    let out = reg.call("show", args, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    // `{maybe}` is absent, so its element is left out; `{{literal}}` is literal braces.
    assert_eq!(out.output, "--city=../../etc/passwd\n3\ntrue\n{\"a\":[1,2]}\n{literal}");
}

#[tokio::test]
async fn schema_violations_stop_the_call_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let tool = format!(
        "\
name: touch_marker
description: Creates a marker file.
parameters:
  type: object
  properties:
    n: {{type: integer, minimum: 1}}
  required: [n]
  additionalProperties: false
handler:
  kind: command
  argv: [/usr/bin/touch, \"{}\"]
",
        marker.display()
    );
    let reg = registry(dir.path(), &[("t.yaml", &tool)]).await;
    for (args, words) in [
        (r#"{"n": "three"}"#, vec!["/n", "\"three\" is not of type \"integer\""]),
        (r#"{"n": 0}"#, vec!["/n", "minimum"]),
        (r#"{}"#, vec!["\"n\" is a required property"]),
        (r#"{"n": 1, "x": 2}"#, vec!["Additional properties"]),
        (r#"[1]"#, vec!["must be a JSON object"]),
        (r#"{"n": 1"#, vec!["not valid JSON"]),
    ] {
        let out = reg.call("touch_marker", args, CancellationToken::new()).await;
        assert_eq!(out.kind, OutcomeKind::Error, "{args}: {out:?}");
        for w in words {
            assert!(out.output.contains(w), "{args}: want {w:?} in {}", out.output);
        }
        assert!(!marker.exists(), "{args}: the command ran");
    }
    let out = reg.call("touch_marker", r#"{"n": 1}"#, CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    assert!(marker.exists(), "a valid call runs the command");
    assert_eq!(reg.call("nope", "{}", CancellationToken::new()).await.kind, OutcomeKind::Error);
}

#[tokio::test]
async fn oversized_output_is_capped_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let tool = "\
name: flood
description: Prints a lot.
handler:
  kind: command
  argv: [python3, -c, \"import sys; sys.stdout.write('x' * 1000000); sys.stderr.write('e' * 1000000)\"]
  max_output_bytes: 1000
";
    let reg = registry(dir.path(), &[("flood.yaml", tool)]).await;
    let out = reg.call("flood", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    let (kept, note) = out.output.split_once('\n').unwrap();
    assert_eq!(kept, "x".repeat(1000));
    assert_eq!(note, "[output truncated: 1000000 bytes, the first 1000 kept]");
}

#[tokio::test]
async fn failures_carry_the_exit_status_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let tool = "\
name: fail
description: Fails.
handler:
  kind: command
  argv: [python3, -c, \"import sys; print('partial'); sys.stderr.write('boom: no such city'); sys.exit(3)\"]
";
    let missing = "name: missing\ndescription: d\nhandler: {kind: command, argv: [/nonexistent/bin/tool]}\n";
    let reg = registry(dir.path(), &[("fail.yaml", tool), ("missing.yaml", missing)]).await;
    let out = reg.call("fail", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(out.output.contains("exit status 3") && out.output.contains("boom: no such city"), "{}", out.output);
    let out = reg.call("missing", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(out.output.contains("cannot run /nonexistent/bin/tool"), "{}", out.output);
}

#[tokio::test]
async fn the_environment_is_only_path_and_the_allowlist() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("work")).unwrap();
    // cargo sets CARGO_PKG_NAME and CARGO_MANIFEST_DIR (and HOME is set) for test runs.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let tool = "\
name: env
description: Shows its environment.
handler:
  kind: command
  argv: [/usr/bin/env]
  env: [CARGO_PKG_NAME]
  cwd: work
";
    let pwd = "name: pwd\ndescription: d\nhandler: {kind: command, argv: [/bin/pwd], cwd: work}\n";
    let reg = registry(dir.path(), &[("env.yaml", tool), ("pwd.yaml", pwd)]).await;
    let out = reg.call("env", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    let mut names: Vec<&str> = out.output.lines().filter_map(|l| l.split('=').next()).collect();
    names.sort();
    assert_eq!(names, vec!["CARGO_PKG_NAME", "PATH"], "{}", out.output);
    assert!(out.output.contains("CARGO_PKG_NAME=hark"));
    let out = reg.call("pwd", "{}", CancellationToken::new()).await;
    assert_eq!(std::fs::canonicalize(out.output.trim()).unwrap(), std::fs::canonicalize(dir.path().join("work")).unwrap());
}

#[tokio::test]
async fn a_command_that_never_exits_times_out_and_its_group_dies() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // The shell starts a background sleeper (same process group), records both pids,
    // then waits forever.
    let tool = format!(
        "\
name: hang
description: Never finishes.
handler:
  kind: command
  argv: [/bin/sh, -c, 'sleep 60 & echo $$ $! > {}; wait']
timeout_ms: 700
",
        pids.display()
    );
    let reg = registry(dir.path(), &[("hang.yaml", &tool)]).await;
    let start = Instant::now();
    let out = reg.call("hang", "{}", CancellationToken::new()).await;
    let took = start.elapsed();
    assert_eq!(out.kind, OutcomeKind::Timeout, "{out:?}");
    assert_eq!(out.output, "timed out after 700 ms");
    // At least the timeout, and nowhere near the 60 s the command would take (a wide
    // bound: this guards against waiting for the child, it does not measure speed).
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(30), "{took:?}");
    let text = std::fs::read_to_string(&pids).unwrap();
    let ids: Vec<u32> = text.split_whitespace().map(|s| s.parse().unwrap()).collect();
    // The direct child was killed and reaped before call() returned.
    assert!(!Path::new(&format!("/proc/{}", ids[0])).exists(), "the child is still there");
    // The grandchild got SIGKILL with the group; it ends as soon as the kernel delivers it.
    until("the background sleeper to end", Duration::from_secs(5), || process_ended(ids[1])).await;
}

#[tokio::test]
async fn cancellation_kills_the_child_and_answers_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let tool = format!(
        "\
name: slow
description: Takes long.
handler:
  kind: command
  argv: [/bin/sh, -c, 'echo $$ > {}; exec sleep 60']
",
        pidfile.display()
    );
    let reg = std::sync::Arc::new(registry(dir.path(), &[("slow.yaml", &tool)]).await);
    let cancel = CancellationToken::new();
    let call = tokio::spawn({
        let reg = reg.clone();
        let cancel = cancel.clone();
        async move { reg.call("slow", "{}", cancel).await }
    });
    until("the command to start", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).map(|s| s.ends_with('\n')).unwrap_or(false)
    })
    .await;
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(!process_ended(pid));
    let start = Instant::now();
    cancel.cancel();
    let out = call.await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(30), "waited for the 60 s child");
    assert_eq!(out.kind, OutcomeKind::Cancelled, "{out:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the child is still there");
    let json: serde_json::Value = serde_json::from_str(&out.to_json_output()).unwrap();
    assert_eq!(json, serde_json::json!({"error": "cancelled", "cancelled": true}));

    // A call whose token is already cancelled never starts.
    std::fs::remove_file(&pidfile).unwrap();
    let out = reg.call("slow", "{}", cancel).await;
    assert_eq!(out.kind, OutcomeKind::Cancelled);
    assert!(!pidfile.exists());
}
