//! The command line: `hark check` reports problems as `file:line: field: problem`.

mod common;

use std::process::Command;

use common::repo_root;

fn hark(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hark")).args(args).envs(env.iter().copied()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_accepts_the_shipped_config() {
    let cfg = repo_root().join("config.yaml");
    // The shipped config runs the embedded model from models/gemma-4-12b-it, which a
    // fresh clone does not have: check it with a tiny random stand-in there instead.
    let ckpt = tempfile::tempdir().unwrap();
    hark::model::gemma4::init::write_random_checkpoint(hark::model::gemma4::init::Preset::Tiny, ckpt.path(), true, 1, |_, _| {}).unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[("HARK_BACKEND__EMBEDDED__CHECKPOINT", ckpt.path().to_str().unwrap())]);
    assert!(ok, "{out}");
    assert!(out.contains(": ok"), "{out}");
}

#[test]
fn check_explains_a_missing_checkpoint() {
    let cfg = repo_root().join("config.yaml");
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[("HARK_BACKEND__EMBEDDED__CHECKPOINT", "/nonexistent/ckpt")]);
    assert!(!ok);
    assert!(out.contains("backend.embedded.checkpoint") && out.contains("hark model init"), "{out}");
}

#[test]
fn check_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "server:\n  host: 127.0.0.1\n  prot: 80\n").unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("bad.yaml:3:") && out.contains("prot"), "{out}");

    std::fs::write(&cfg, "audio:\n  vad: quantum\n").unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.contains("bad.yaml:2:") && out.contains("audio.vad") && out.contains("quantum"), "{out}");

    // serve refuses with the same message.
    let (ok, serve_out) = hark(&["serve", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(serve_out.contains("bad.yaml:2:"), "{serve_out}");
}

#[test]
fn check_reports_missing_runtime_files_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "audio:\n  silero_model: /nonexistent/silero.onnx\n").unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[("ORT_DYLIB_PATH", repo_root().join("vendor/libonnxruntime.so").to_str().unwrap())]);
    assert!(!ok);
    assert!(out.contains("/nonexistent/silero.onnx") && out.contains("scripts/setup"), "{out}");
}

#[test]
fn env_overrides_apply_and_bad_ones_are_named() {
    let cfg = repo_root().join("config.yaml");
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[("HARK_SERVER__PORT", "not-a-port")]);
    assert!(!ok);
    assert!(out.contains("HARK_SERVER__PORT"), "{out}");
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[("HARK_SERVER__PORT", "9001"), ("HARK_BACKEND__KIND", "openai")]);
    assert!(ok, "{out}");
}

#[test]
fn bad_tool_and_agent_yaml_is_reported_by_check_and_refused_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (tools, agents) = (dir.path().join("tools"), dir.path().join("agents"));
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::create_dir_all(&agents).unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "backend: {kind: openai}\naudio: {vad: energy}\nsession: {agent: helper}\n").unwrap();
    let good = "name: echo\ndescription: d\nparameters: {type: object, properties: {text: {type: string}}}\nhandler: {kind: command, argv: [/bin/echo, \"{text}\"]}\n";
    std::fs::write(tools.join("echo.yaml"), good).unwrap();
    std::fs::write(tools.join("twin.yaml"), good).unwrap();
    std::fs::write(tools.join("typo.yaml"), "name: typo\ndescription: d\nhandler: {kind: builtin, name: clock}\ncolour: red\n").unwrap();
    std::fs::write(tools.join("types.yaml"), "name: types\ndescription: d\nhandler:\n  kind: command\n  argv: [/bin/true]\n  timeout_ms: soon\n").unwrap();
    std::fs::write(tools.join("kind.yaml"), "name: kind\ndescription: d\nhandler: {kind: teleport}\n").unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok, "{out}");
    for (file, line, field) in [("twin.yaml", 1, "name"), ("typo.yaml", 4, "colour"), ("types.yaml", 6, "timeout_ms"), ("kind.yaml", 3, "teleport")] {
        let want = format!("{file}:{line}:");
        assert!(out.lines().any(|l| l.contains(&want) && l.contains(field)), "no `{want} … {field}` in:\n{out}");
    }
    let (ok, serve_out) = hark(&["serve", "--config", cfg.to_str().unwrap()], &[("HARK_SERVER__PORT", "0")]);
    assert!(!ok);
    assert!(serve_out.contains("typo.yaml:4:") && serve_out.contains("colour"), "{serve_out}");

    // Tools fixed; an agent naming a tool that does not exist.
    for f in ["twin.yaml", "typo.yaml", "types.yaml", "kind.yaml"] {
        std::fs::remove_file(tools.join(f)).unwrap();
    }
    std::fs::write(agents.join("helper.yaml"), "name: helper\ninstructions: hi\ntools:\n  - echo\n  - weather\n").unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(out.lines().any(|l| l.contains("helper.yaml:5:") && l.contains("tools[1]") && l.contains("weather")), "{out}");
    let (ok, serve_out) = hark(&["serve", "--config", cfg.to_str().unwrap()], &[("HARK_SERVER__PORT", "0")]);
    assert!(!ok);
    assert!(serve_out.contains("helper.yaml:5:"), "{serve_out}");

    // Fixed: check passes and `hark tools list` prints the tool and the agent.
    std::fs::write(agents.join("helper.yaml"), "name: helper\ninstructions: hi\ntools: [echo]\n").unwrap();
    let (ok, out) = hark(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert!(ok, "{out}");
    let (ok, out) = hark(&["tools", "list", "--config", cfg.to_str().unwrap()], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("echo") && out.contains("command") && out.contains("agent helper"), "{out}");
}

/// `hark bench model` (what the GPU runs use, here on the CPU with the tiny preset):
/// every section prints, and the JSON carries positive rates for each row asked for.
#[test]
fn bench_model_reports_prefill_decode_streaming_and_profile() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let (ok, out) = hark(
        &[
            "bench", "model", "--presets", "tiny", "--dtypes", "f32", "--prompts", "64,96", "--chunk", "32", "--batches", "1,2",
            "--decode", "2", "--contexts", "80", "--profile", "--json", json.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{out}");
    for section in ["| prefill tokens |", "| decode batch |", "| batch-1 decode step |", "| context |"] {
        assert!(out.contains(section), "missing {section}: {out}");
    }
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let count = |what: &str| rows.iter().filter(|r| r["what"] == what).count();
    assert_eq!((count("prefill"), count("decode"), count("profile"), count("streaming")), (2, 2, 1, 1), "{rows:?}");
    for r in rows.iter().filter(|r| r["what"] == "prefill" || r["what"] == "decode") {
        assert!(r["tok_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `hark model parity` on the CPU in f32 passes against the committed fixtures, and a
/// tolerance no model can meet makes it fail with the offending rows marked.
#[test]
fn model_parity_passes_in_f32_and_fails_loudly_below_rounding() {
    let fixtures = repo_root().join("tests/fixtures/gemma4");
    let f = fixtures.to_str().unwrap();
    let (ok, out) = hark(&["model", "parity", "--fixtures", f, "--steps", "8"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("tiny_mm: image") && out.contains("tiny_text: greedy tokens vs f32 CPU | 8 | yes"), "{out}");
    let (ok, out) = hark(&["model", "parity", "--fixtures", f, "--steps", "0", "--tolerance", "1e-12"], &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("| NO"), "{out}");
}

/// `hark check` says what the KV budget holds: one 12B session in bf16 is ≈520 MiB of
/// sliding-layer windows plus 16 KiB per token of context.
#[test]
fn check_says_how_many_sessions_the_kv_budget_keeps() {
    use hark::model::gemma4::init::{config_json, Preset};
    let cfg = hark::model::gemma4::Gemma4Config::from_json(&config_json(Preset::Gemma12B)).unwrap();
    let (fixed, per_token) = hark::check::kv_cost(&cfg.text, 2);
    assert_eq!((fixed, per_token), (520 << 20, 16 << 10));

    let ckpt = tempfile::tempdir().unwrap();
    hark::model::gemma4::init::write_random_checkpoint(Preset::Tiny, ckpt.path(), true, 1, |_, _| {}).unwrap();
    let cfg = repo_root().join("config.yaml");
    let (ok, out) = hark(
        &["check", "--config", cfg.to_str().unwrap()],
        &[("HARK_BACKEND__EMBEDDED__CHECKPOINT", ckpt.path().to_str().unwrap()), ("HARK_BACKEND__EMBEDDED__KV_BUDGET_MB", "64")],
    );
    assert!(ok, "{out}");
    let note = out.lines().find(|l| l.starts_with("note: backend.embedded.kv_budget_mb: 64 MiB keeps")).unwrap_or_else(|| panic!("{out}"));
    // config.yaml's `max_sessions: auto` becomes what the budget keeps at 8K tokens.
    let fits: usize = note.split(" keeps ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{note}"));
    assert!(note.contains(&format!("server.max_sessions is auto: {} sessions at once", fits.clamp(1, 64))), "{note}");
}

/// `hark service install` writes a systemd user unit for this binary and config
/// (`--print` shows it instead); `hark serve` logs without ANSI colours under journald.
#[test]
fn service_install_writes_a_user_unit_and_logs_are_plain_for_journald() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hark.yaml");
    let none = repo_root().join("tests/fixtures/none");
    std::fs::write(
        &cfg,
        format!(
            "server: {{port: 0}}\nbackend: {{kind: openai, openai: {{base_url: 'http://127.0.0.1:9/v1', model: x}}}}\naudio: {{vad: energy}}\nspeech: {{engine: none}}\ntools_dir: {0}\nagents_dir: {0}\n",
            none.display()
        ),
    )
    .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let env = [("HOME", home.to_str().unwrap()), ("XDG_CONFIG_HOME", "")];
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_hark")).unwrap();
    let abs_cfg = std::fs::canonicalize(&cfg).unwrap();
    let exec = format!("ExecStart={} serve --config {}\n", exe.display(), abs_cfg.display());

    let (ok, printed) = hark(&["service", "install", "--print", "--config", cfg.to_str().unwrap()], &env);
    assert!(ok, "{printed}");
    assert!(printed.contains(&exec) && printed.contains("Restart=on-failure"), "{printed}");
    let unit = home.join(".config/systemd/user/hark.service");
    assert!(!unit.exists(), "--print writes nothing");

    let (ok, out) = hark(&["service", "install", "--config", cfg.to_str().unwrap()], &env);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_to_string(&unit).unwrap(), printed);
    let (ok, out) = hark(&["service", "install", "--config", "/nonexistent/hark.yaml"], &env);
    assert!(!ok && out.contains("/nonexistent/hark.yaml"), "{out}");

    // As systemd would run it: stderr to the journal (JOURNAL_STREAM set).
    use std::io::BufRead;
    let mut child = Command::new(&exe)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        let done = line.contains("hark listening");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.iter().any(|l| l.contains("hark listening")), "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\u{1b}')), "ANSI colours in the journal: {seen:?}");
}
