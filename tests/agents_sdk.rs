//! Both OpenAI Agents SDKs as real Realtime clients: `openai-agents` (Python) and
//! `@openai/agents` (JavaScript, on Node). Each runs an agent with a function tool of
//! its own, against a hark session whose agent has `calculator`, a tool hark runs
//! itself. The model calls both in one response: the SDK must run only its own tool,
//! see hark's as an `mcp_call` with its real output, and the conversation must go on
//! once both are answered.
//!
//! The model is the scripted OpenAI-compatible server behind hark's remote backend
//! (see `common`): random-weight checkpoints never choose to call tools, so the
//! script makes the call a real model would. Everything else is real.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const FINAL: &str = "All done.";

fn python() -> String {
    std::env::var("HARK_TEST_PYTHON").unwrap_or_else(|_| repo_root().join(".venv/bin/python").display().to_string())
}

/// hark with one agent, `assistant`, whose only tool is the builtin calculator; the
/// scripted model calls it and the client's `lookup_order` together, then answers.
async fn start() -> (ScriptedModel, Hark, tempfile::TempDir) {
    let model = ScriptedModel::start().await;
    let chunks = vec![
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_calc", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\": \"6*7\"}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_order", "type": "function", "function": {"name": "lookup_order", "arguments": "{\"order_id\": \"A1\"}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ];
    model.push(Reply::Stream { chunks, gap: Duration::from_millis(5) });
    model.push(Reply::text(FINAL));
    let dir = tempfile::tempdir().unwrap();
    let (tools, agents) = (dir.path().join("tools"), dir.path().join("agents"));
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::create_dir_all(&agents).unwrap();
    std::fs::copy(repo_root().join("tools/calculator.yaml"), tools.join("calculator.yaml")).unwrap();
    std::fs::write(agents.join("assistant.yaml"), "name: assistant\ninstructions: You help.\ntools: [calculator]\n").unwrap();
    let mut cfg = test_config(&model.base_url());
    cfg.tools_dir = tools;
    cfg.agents_dir = agents;
    cfg.session.agent = Some("assistant".into());
    let hark = Hark::start(cfg).await;
    (model, hark, dir)
}

fn run(program: &str, args: &[&str], cwd: PathBuf) -> Value {
    let out = Command::new(program).args(args).current_dir(cwd).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} failed:\n{stdout}\n{stderr}");
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("no RESULT line:\n{stdout}\n{stderr}"));
    let result: Value = serde_json::from_str(line).unwrap();
    eprintln!("{program}: {result}");
    result
}

/// What reached the model: the follow-up request carries both answers, hark's real
/// calculator result and the client's own.
async fn check_model_requests(model: &ScriptedModel) {
    let requests = model.wait_requests(2).await;
    assert_eq!(requests.len(), 2, "one request for the calls, one to continue: {requests:#?}");
    let tool_msgs: Vec<&Value> = requests[1]["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "tool").collect();
    let answer = |id: &str| tool_msgs.iter().find(|m| m["tool_call_id"] == id).map(|m| m["content"].as_str().unwrap().to_string());
    assert_eq!(answer("call_calc").as_deref(), Some(r#"{"result":42}"#), "{tool_msgs:?}");
    assert!(answer("call_order").is_some_and(|a| a.contains("shipped")), "{tool_msgs:?}");
}

fn assert_ran_only_its_own_tool(r: &Value) {
    assert_eq!(r["ran"], json!(["lookup_order"]), "{r}");
    assert_eq!(r["tool_starts"], json!(["lookup_order"]), "the SDK tried to run hark's tool: {r}");
    assert_eq!(r["errors"], json!([]), "{r}");
    let history = r["history"].as_array().unwrap();
    // No failed local attempt at hark's tool ("Tool calculator not found").
    assert!(!history.iter().any(|i| i["type"] == "function_call" && i["name"] == "calculator"), "{r}");
    assert!(!r.to_string().contains("not found"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_agents_sdk_runs_only_its_own_tool() {
    let (model, hark, _dir) = start().await;
    let url = format!("ws://{}/v1/realtime", hark.addr);
    let script = repo_root().join("tests/clients/agents_sdk.py").display().to_string();
    let py = python();
    let r = tokio::task::spawn_blocking(move || run(&py, &[&script, "--url", &url, "--final-text", FINAL], repo_root())).await.unwrap();
    assert_ran_only_its_own_tool(&r);
    assert_eq!(r["final"], FINAL, "the conversation went on after both calls: {r}");
    // hark's call reached the SDK as an mcp_call with its real output.
    let mcp = r["mcp_done"].as_array().unwrap();
    assert_eq!(mcp.len(), 1, "{r}");
    assert_eq!((&mcp[0]["name"], &mcp[0]["server_label"], &mcp[0]["output"]), (&json!("calculator"), &json!("hark"), &json!("42")));
    check_model_requests(&model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_agents_sdk_runs_only_its_own_tool() {
    let clients = repo_root().join("tests/clients");
    assert!(
        clients.join("node_modules/@openai/agents").exists(),
        "@openai/agents is not installed: run scripts/test (npm install in tests/clients)"
    );
    let (model, hark, _dir) = start().await;
    let url = format!("ws://{}/v1/realtime", hark.addr);
    let r = tokio::task::spawn_blocking(move || run("node", &["agents_sdk.mjs", "--url", &url, "--final-text", FINAL], clients)).await.unwrap();
    assert_ran_only_its_own_tool(&r);
    let history = r["history"].as_array().unwrap();
    // The SDK's history shows hark's call as an MCP call with its real output …
    let calc = history.iter().find(|i| i["type"] == "mcp_call" && i["name"] == "calculator").unwrap_or_else(|| panic!("{r}"));
    assert_eq!(calc["output"], "42", "{r}");
    // … its own call answered, and the model's answer after both.
    assert!(history.iter().any(|i| i["type"] == "function_call" && i["name"] == "lookup_order" && i["output"].as_str().is_some_and(|o| o.contains("shipped"))), "{r}");
    assert!(history.iter().any(|i| i["role"] == "assistant"), "{r}");
    check_model_requests(&model).await;
}
