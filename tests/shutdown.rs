//! Graceful shutdown: open sessions get a final event and a proper close, in-process
//! and for the real binary on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cancels_the_response_and_closes_sessions() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    model.push(Reply::StreamThenHang { chunks: vec![json!({"choices": [{"index": 0, "delta": {"content": "partial"}}]})] });
    c.send(json!({"type": "response.create"})).await;
    c.until("response.output_text.delta").await;

    hark.shutdown.cancel();
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "cancelled");
    assert_eq!(done["response"]["status_details"]["reason"], "server_shutdown");
    let err = c.until("error").await;
    assert_eq!(err["error"]["code"], "server_shutdown");
    assert_eq!(c.closed().await, Some(1001));
    let mut hark = hark;
    tokio::time::timeout(Duration::from_secs(5), &mut hark.task).await.expect("serve returns").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_stops_cleanly_on_sigterm() {
    let model = ScriptedModel::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let root = repo_root();
    std::fs::write(
        &config,
        format!(
            "server: {{host: 127.0.0.1, port: 0}}\nbackend: {{kind: openai, openai: {{base_url: '{}'}}}}\naudio:\n  onnxruntime_library: {}\n  silero_model: {}\n",
            model.base_url(),
            root.join("vendor/libonnxruntime.so").display(),
            root.join("vendor/silero_vad.onnx").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hark"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon logs its address once it listens.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("hark did not report its address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let mut c = Client::connect(&format!("ws://{addr}/v1/realtime")).await;
    c.assert_alive().await;

    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let err = c.until("error").await;
    assert_eq!(err["error"]["code"], "server_shutdown");
    assert_eq!(c.closed().await, Some(1001));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "hark exited with {status}");
}
