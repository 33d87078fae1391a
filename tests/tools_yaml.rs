//! Tool and agent YAML: every problem is reported as `file:line: field: problem`, all
//! problems of a folder at once; the shipped examples load and resolve.

use std::path::{Path, PathBuf};

use hark::tools::{AgentSet, SpecError, ToolSet};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tool_errors(files: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        write(dir.path(), name, text);
    }
    match ToolSet::load_dir(dir.path(), dir.path()) {
        Ok(set) => panic!("expected errors, loaded {} tools", set.tools.len()),
        Err(errors) => errors.iter().map(SpecError::to_string).collect(),
    }
}

/// The one error, checked to name `file:line:` and `field`.
fn assert_one(errors: &[String], file_line: &str, field: &str, words: &[&str]) {
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert!(e.contains(&format!("/{file_line}: ")), "want {file_line}: {e}");
    assert!(e.contains(&format!("{field}: ")), "want field {field}: {e}");
    for w in words {
        assert!(e.contains(w), "want {w:?}: {e}");
    }
}

const GOOD: &str = "\
name: get_time
description: Current local date and time.
parameters: {type: object, properties: {timezone: {type: string}}, required: []}
handler: {kind: builtin, name: clock}
";

#[test]
fn a_good_tool_loads() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "get_time.yaml", GOOD);
    write(dir.path(), "README.md", "not yaml: [");
    let set = ToolSet::load_dir(dir.path(), dir.path()).unwrap();
    assert_eq!(set.tools.len(), 1);
    assert_eq!(set.tools[0].name, "get_time");
    assert!(set.tools[0].cancel_on_interruption);
}

#[test]
fn unknown_key_names_file_line_and_field() {
    let text = "name: t\ndescription: d\nhandler: {kind: builtin, name: clock}\ntimeout_sm: 5\n";
    let errors = tool_errors(&[("t.yaml", text)]);
    assert_one(&errors, "t.yaml:4", "timeout_sm", &["unknown field"]);

    let text = "name: t\ndescription: d\nhandler:\n  kind: command\n  argv: [echo]\n  shell: true\n";
    let errors = tool_errors(&[("t.yaml", text)]);
    assert_one(&errors, "t.yaml:6", "handler.shell", &["unknown field"]);
}

#[test]
fn wrong_type_names_file_line_and_field() {
    let text = "name: t\ndescription: d\nhandler:\n  kind: command\n  argv: [echo]\n  max_output_bytes: lots\n";
    let errors = tool_errors(&[("t.yaml", text)]);
    assert_one(&errors, "t.yaml:6", "handler.max_output_bytes", &["invalid"]);

    let text = "name: t\ndescription: d\nhandler:\n  kind: command\n  argv: echo hi\n";
    let errors = tool_errors(&[("t.yaml", text)]);
    assert_one(&errors, "t.yaml:5", "handler.argv", &["invalid type"]);
}

#[test]
fn unknown_handler_kind_lists_the_kinds() {
    let text = "name: t\ndescription: d\nhandler:\n  kind: shell\n  argv: [sh]\n";
    let errors = tool_errors(&[("t.yaml", text)]);
    assert_one(&errors, "t.yaml:4", "handler.kind", &["shell", "builtin", "command", "http", "mcp"]);
}

#[test]
fn duplicate_tool_names_name_both_files() {
    let errors = tool_errors(&[("a.yaml", GOOD), ("b.yaml", &format!("# the same again\n{GOOD}"))]);
    assert_one(&errors, "b.yaml:2", "name", &["duplicate tool name \"get_time\"", "a.yaml:1"]);
}

#[test]
fn semantic_problems_point_at_their_lines() {
    // A key that belongs to another kind of handler.
    let text = "name: t\ndescription: d\nhandler:\n  kind: command\n  argv: [echo]\n  url: http://x/\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:6", "handler.url", &["not used by command handlers"]);

    // A placeholder that is not a parameter.
    let text = "\
name: weather
description: d
parameters:
  type: object
  properties:
    city: {type: string}
handler:
  kind: command
  argv:
    - python3
    - scripts/weather.py
    - \"{cty}\"
";
    assert_one(&tool_errors(&[("w.yaml", text)]), "w.yaml:12", "handler.argv[2]", &["unknown placeholder {cty}", "city"]);

    // An invalid JSON schema.
    let text = "name: t\ndescription: d\n\nparameters: {type: object, properties: {x: {type: 12}}}\nhandler: {kind: builtin, name: clock}\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:4", "parameters", &["invalid JSON Schema"]);

    // A bad tool name.
    let text = "description: d\nname: get time\nhandler: {kind: builtin, name: clock}\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:2", "name", &["not a valid tool name"]);

    // A templated host.
    let text = "name: t\ndescription: d\nparameters: {type: object, properties: {h: {type: string}}}\nhandler:\n  kind: http\n  url: \"https://{h}/x\"\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:6", "handler.url", &["placeholder"]);

    // An allowlist without the URL's own host.
    let text = "name: t\ndescription: d\nhandler:\n  kind: http\n  url: https://a.example/x\n  allow_hosts:\n    - b.example\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:6", "handler.allow_hosts", &["a.example"]);

    // An MCP tool of a server nobody declared.
    let text = "name: t\nhandler:\n  kind: mcp\n  server: nowhere\n  tool: x\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:4", "handler.server", &["no MCP server named \"nowhere\""]);

    // An unknown builtin.
    let text = "name: t\ndescription: d\nhandler: {kind: builtin, name: shell}\n";
    assert_one(&tool_errors(&[("t.yaml", text)]), "t.yaml:3", "handler.name", &["unknown builtin", "clock, calculator, notes"]);
}

#[test]
fn all_problems_of_a_folder_are_reported_together() {
    let errors = tool_errors(&[
        ("a.yaml", "name: a\ndescription: d\nhandler: {kind: nope}\n"),
        ("b.yaml", "name: b\nhandler: {kind: builtin, name: clock}\nextra: 1\n"),
        ("c.yaml", GOOD),
        ("d.yaml", "name: [unclosed\n"),
    ]);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].contains("a.yaml:3:") && errors[0].contains("handler.kind"), "{errors:#?}");
    assert!(errors[1].contains("b.yaml:3:") && errors[1].contains("extra"), "{errors:#?}");
    assert!(errors[2].contains("d.yaml:"), "{errors:#?}");
}

#[test]
fn mcp_server_files_are_checked_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "time.mcp.yaml",
        "mcp_server:\n  name: time\n  command: [/nonexistent/python, -m, mcp_server_time]\n  expose: [get_*]\n",
    );
    let set = ToolSet::load_dir(dir.path(), dir.path()).unwrap();
    assert_eq!(set.servers.len(), 1);
    assert_eq!(set.servers[0].name, "time");

    let errors = tool_errors(&[("s.mcp.yaml", "mcp_server:\n  name: time\n  command: []\n  expose: some\n")]);
    assert_one(&errors, "s.mcp.yaml:4", "mcp_server.expose", &["all", "none"]);
    let errors = tool_errors(&[("s.mcp.yaml", "mcp_server:\n  name: time\n  command: []\n")]);
    assert_one(&errors, "s.mcp.yaml:3", "mcp_server.command", &["empty"]);
}

// ───────────────────────── agents ─────────────────────────

fn tools_for_agents() -> ToolSet {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "get_time.yaml", GOOD);
    write(dir.path(), "calc.yaml", "name: calculator\nhandler: {kind: builtin, name: calculator}\n");
    write(dir.path(), "notes.yaml", "name: notes_main\nhandler: {kind: builtin, name: notes}\ncancel_on_interruption: false\n");
    write(
        dir.path(),
        "weather.yaml",
        "name: weather\ndescription: w\nparameters: {type: object, properties: {city: {type: string}}}\nhandler: {kind: http, url: \"https://wttr.in/{city}?format=3\"}\n",
    );
    write(dir.path(), "time.mcp.yaml", "mcp_server:\n  name: time\n  command: [python3, -m, mcp_server_time]\n");
    ToolSet::load_dir(dir.path(), dir.path()).unwrap()
}

fn agent_errors(text: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", text);
    match AgentSet::load_dir(dir.path(), &tools_for_agents().catalog()) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors.iter().map(SpecError::to_string).collect(),
    }
}

#[test]
fn agents_resolve_names_globs_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "assistant.yaml",
        "\
name: assistant
instructions: |
  Be brief.
tools:
  - get_time
  - \"notes_*\"
  - {name: weather, cancel_on_interruption: false}
  - name: notes_main
    cancel_on_interruption: true
  - time_get_current_time
turn_detection: {type: semantic_vad, eagerness: low}
vision: {image_tokens: 280, video_fps: 1}
backend: {kind: openai, model: gemma}
greeting: Hi!
",
    );
    let agents = AgentSet::load_dir(dir.path(), &tools_for_agents().catalog()).unwrap();
    let a = agents.get("assistant").unwrap();
    assert_eq!(a.instructions, "Be brief.\n");
    // time_get_current_time belongs to an MCP server not started yet: accepted, not listed.
    assert_eq!(a.tool_names(), vec!["get_time", "notes_main", "weather"]);
    assert!(a.tool("get_time").unwrap().cancel_on_interruption);
    assert!(!a.tool("weather").unwrap().cancel_on_interruption);
    // notes_main defaults to false in its file; the later explicit entry overrides it.
    assert!(a.tool("notes_main").unwrap().cancel_on_interruption);
    assert_eq!(a.max_tool_rounds, 4);
    assert_eq!(a.greeting.as_deref(), Some("Hi!"));
    assert_eq!(a.vision.as_ref().unwrap().image_tokens, Some(280));
    let td = serde_json::to_value(a.turn_detection.as_ref().unwrap()).unwrap();
    assert_eq!(td, serde_json::json!({"type": "semantic_vad", "eagerness": "low"}));
}

#[test]
fn an_agent_naming_an_unknown_tool_names_the_entry() {
    let errors = agent_errors("name: a\ninstructions: x\ntools: [get_time, calculator, foo]\n");
    assert_one(&errors, "a.yaml:3", "tools[2]", &["no tool named \"foo\""]);

    let errors = agent_errors("name: a\ninstructions: x\ntools:\n  - get_time\n  - \"nope_*\"\n");
    assert_one(&errors, "a.yaml:5", "tools[1]", &["no tool matches \"nope_*\""]);
}

#[test]
fn agent_structure_errors_name_line_and_field() {
    let errors = agent_errors("name: a\ninstructions: x\nvision:\n  image_tokens: 280\n  fps: 2\n");
    assert_one(&errors, "a.yaml:5", "vision.fps", &["unknown field"]);
    let errors = agent_errors("name: a\ninstructions: x\nturn_detection:\n  type: loud_vad\n");
    assert_one(&errors, "a.yaml:4", "turn_detection.type", &["loud_vad", "server_vad"]);
    let errors = agent_errors("name: a\ninstructions: x\nvision:\n  image_tokens: 300\n");
    assert_one(&errors, "a.yaml:4", "vision.image_tokens", &["280"]);
    let errors = agent_errors("name: a\ninstructions: x\ntools:\n  - {name: weather, cancel: no}\n");
    assert_one(&errors, "a.yaml:4", "tools[0].cancel", &["unknown field `cancel`"]);
    let errors = agent_errors("name: a\n");
    assert_one(&errors, "a.yaml:1", "instructions", &["missing field"]);
}

#[test]
fn duplicate_agent_names_name_both_files() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "name: helper\ninstructions: x\n");
    write(dir.path(), "b.yaml", "instructions: y\nname: helper\n");
    let errors: Vec<String> =
        AgentSet::load_dir(dir.path(), &tools_for_agents().catalog()).unwrap_err().iter().map(SpecError::to_string).collect();
    assert_one(&errors, "b.yaml:2", "name", &["duplicate agent name \"helper\"", "a.yaml:1"]);
}

#[test]
fn shipped_examples_load_and_resolve() {
    // The repo's agents/ and tools/.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tools = ToolSet::load_dir(&root.join("tools"), &root).unwrap_or_else(|e| panic!("{e:#?}"));
    for name in ["get_time", "calculator", "notes", "weather"] {
        assert!(tools.get(name).is_some(), "{name} missing");
    }
    assert_eq!(tools.servers.len(), 1);
    let agents = AgentSet::load_dir(&root.join("agents"), &tools.catalog()).unwrap_or_else(|e| panic!("{e:#?}"));
    let assistant = agents.get("assistant").unwrap();
    assert!(assistant.tool_names().contains(&"weather".to_string()));
    let vision = agents.get("vision").unwrap();
    assert_eq!(vision.vision.as_ref().unwrap().image_tokens, Some(280));
}
