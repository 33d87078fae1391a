//! Builtins through the registry: clock, calculator, notes (a real file in a temp data
//! dir, concurrent calls serialized), and what the session layer reads off a registry.

use std::path::Path;
use std::sync::Arc;

use hark::tools::{OutcomeKind, ToolRegistry, ToolSet};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn registry(dir: &Path) -> ToolRegistry {
    let files = [
        ("clock.yaml", "name: get_time\nhandler: {kind: builtin, name: clock}\n"),
        ("calc.yaml", "name: calculator\nhandler: {kind: builtin, name: calculator}\ncancel_on_interruption: false\n"),
        ("notes.yaml", "name: notes\nhandler: {kind: builtin, name: notes, data_dir: data/notes}\n"),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    ToolSet::load_dir(dir, dir).unwrap_or_else(|e| panic!("{e:#?}")).start().await.unwrap_or_else(|e| panic!("{e:#?}"))
}

async fn call(reg: &ToolRegistry, name: &str, args: Value) -> (OutcomeKind, String) {
    let out = reg.call(name, &args.to_string(), CancellationToken::new()).await;
    (out.kind, out.output)
}

#[tokio::test]
async fn calculator_answers_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    assert_eq!(call(&reg, "calculator", json!({"expression": "2 * (3 + 4) ^ 2"})).await, (OutcomeKind::Ok, "98".into()));
    assert_eq!(call(&reg, "calculator", json!({"expression": "0.1 + 0.2"})).await, (OutcomeKind::Ok, "0.3".into()));
    assert_eq!(call(&reg, "calculator", json!({"expression": "sqrt(2)^2"})).await, (OutcomeKind::Ok, "2".into()));
    assert_eq!(call(&reg, "calculator", json!({"expression": "1/0"})).await, (OutcomeKind::Error, "division by zero".into()));
    let (kind, msg) = call(&reg, "calculator", json!({"expression": "__import__('os')"})).await;
    assert_eq!(kind, OutcomeKind::Error);
    assert!(msg.contains("unexpected character") || msg.contains("unknown name"), "{msg}");
    // The builtin's own schema: a string of at most 1000 characters.
    let (kind, msg) = call(&reg, "calculator", json!({"expression": 5})).await;
    assert_eq!(kind, OutcomeKind::Error);
    assert!(msg.contains("invalid arguments") && msg.contains("/expression"), "{msg}");
    let (kind, msg) = call(&reg, "calculator", json!({"expression": "1+".repeat(600) + "1"})).await;
    assert_eq!(kind, OutcomeKind::Error);
    assert!(msg.contains("/expression"), "{msg}");
    // The JSON a model reads back.
    let out = reg.call("calculator", r#"{"expression": "6*7"}"#, CancellationToken::new()).await;
    assert_eq!(serde_json::from_str::<Value>(&out.to_json_output()).unwrap(), json!({"result": 42}));
}

#[tokio::test]
async fn clock_reads_zones() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    let (kind, out) = call(&reg, "get_time", json!({"timezone": "Asia/Tokyo"})).await;
    assert_eq!(kind, OutcomeKind::Ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["timezone"], "Asia/Tokyo");
    assert_eq!(v["utc_offset"], "+09:00");
    assert_eq!(v["date"].as_str().unwrap().len(), 10);
    let (kind, out) = call(&reg, "get_time", json!({"timezone": "-05:30"})).await;
    assert_eq!(kind, OutcomeKind::Ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["utc_offset"], "-05:30");
    let (kind, _) = call(&reg, "get_time", json!({})).await;
    assert_eq!(kind, OutcomeKind::Ok);
    let (kind, out) = call(&reg, "get_time", json!({"timezone": "Nowhere/Land"})).await;
    assert_eq!(kind, OutcomeKind::Error);
    assert!(out.contains("unknown time zone"), "{out}");
}

#[tokio::test]
async fn notes_round_trip_in_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    let file = dir.path().join("data/notes/notes.json");
    assert!(!file.exists());
    assert_eq!(call(&reg, "notes", json!({"action": "add", "text": "Buy oat milk"})).await, (OutcomeKind::Ok, r#"{"added":1}"#.into()));
    assert_eq!(call(&reg, "notes", json!({"action": "add", "text": "Call Ana about the trip"})).await.0, OutcomeKind::Ok);
    let (_, listed) = call(&reg, "notes", json!({"action": "list"})).await;
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["total"], 2);
    assert_eq!(listed["notes"][0]["text"], "Call Ana about the trip");
    let (_, found) = call(&reg, "notes", json!({"action": "search", "text": "OAT"})).await;
    let found: Value = serde_json::from_str(&found).unwrap();
    assert_eq!(found["total"], 1);
    assert_eq!(found["notes"][0]["id"], 1);
    assert_eq!(call(&reg, "notes", json!({"action": "delete", "id": 1})).await.0, OutcomeKind::Ok);
    assert_eq!(call(&reg, "notes", json!({"action": "delete", "id": 1})).await, (OutcomeKind::Error, "no note with id 1".into()));
    let (kind, msg) = call(&reg, "notes", json!({"action": "add"})).await;
    assert_eq!(kind, OutcomeKind::Error);
    assert!(msg.contains("text"), "{msg}");
    let (kind, msg) = call(&reg, "notes", json!({"action": "add", "text": "x".repeat(2001)})).await;
    assert_eq!(kind, OutcomeKind::Error, "{msg}");
    let (kind, _) = call(&reg, "notes", json!({"action": "drop_table"})).await;
    assert_eq!(kind, OutcomeKind::Error);

    // What is on disk is the one remaining note, and no temporary file is left.
    let disk: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(disk["notes"].as_array().unwrap().len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("notes.json")]);

    // A fresh registry (a restart) sees the same notes.
    let again = registry(dir.path()).await;
    let (_, listed) = call(&again, "notes", json!({"action": "list"})).await;
    assert_eq!(serde_json::from_str::<Value>(&listed).unwrap()["notes"][0]["text"], "Call Ana about the trip");
}

#[tokio::test]
async fn concurrent_note_calls_are_serialized() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(registry(dir.path()).await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move { call(&reg, "notes", json!({"action": "add", "text": format!("note {i}")})).await }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let (kind, out) = t.await.unwrap();
        assert_eq!(kind, OutcomeKind::Ok, "{out}");
        ids.push(serde_json::from_str::<Value>(&out).unwrap()["added"].as_u64().unwrap());
    }
    ids.sort();
    assert_eq!(ids, (1..=20).collect::<Vec<u64>>());
    let (_, listed) = call(&reg, "notes", json!({"action": "list"})).await;
    assert_eq!(serde_json::from_str::<Value>(&listed).unwrap()["total"], 20);
}

#[tokio::test]
async fn declarations_and_the_listing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path()).await;
    assert!(reg.is_known("calculator") && !reg.is_known("shell"));
    let decls = reg.declarations(&["notes", "nope", "calculator"]);
    assert_eq!(decls.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), vec!["notes", "calculator"]);
    assert_eq!(decls[1].parameters["required"], json!(["expression"]));
    assert!(!decls[1].description.is_empty());
    assert_eq!(reg.cancel_on_interruption("calculator"), Some(false));
    assert_eq!(reg.cancel_on_interruption("notes"), Some(true));
    let table = reg.list_table();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("KIND") && lines[0].contains("SOURCE"), "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[1].starts_with("calculator") && lines[1].contains("builtin:calculator") && lines[1].contains("calc.yaml"), "{table}");
}
