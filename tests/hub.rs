//! `hark model pull` against a hub on loopback (the real hub is unreachable from
//! these machines; the test server speaks the same two endpoints: the model info
//! API and `resolve/<rev>/<file>`), and its failure messages.

use std::process::Command;

use axum::extract::Path as UrlPath;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

const CONFIG: &str = "{\"model_type\": \"gemma4_unified\"}";

async fn start_hub() -> std::net::SocketAddr {
    let app = Router::new()
        .route(
            "/api/models/{org}/{name}/revision/{rev}",
            get(|UrlPath((org, name, _rev)): UrlPath<(String, String, String)>| async move {
                if org == "gated" {
                    return Err(StatusCode::UNAUTHORIZED);
                }
                if name != "tiny" {
                    return Err(StatusCode::NOT_FOUND);
                }
                Ok(Json(json!({"siblings": [
                    {"rfilename": "config.json"}, {"rfilename": "model.safetensors"},
                    {"rfilename": "README.md"}, {"rfilename": "original/weights.bin"}
                ]})))
            }),
        )
        .route(
            "/{org}/{name}/resolve/{rev}/{file}",
            get(|UrlPath((_o, _n, _r, file)): UrlPath<(String, String, String, String)>| async move {
                match file.as_str() {
                    "config.json" => Ok(CONFIG.as_bytes().to_vec()),
                    "model.safetensors" => Ok(vec![7u8; 300_000]),
                    _ => Err(StatusCode::NOT_FOUND),
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn pull(endpoint: &str, repo: &str, dir: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hark"))
        .args(["model", "pull", repo])
        .arg(dir)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_downloads_only_checkpoint_files_with_progress() {
    let addr = start_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("tiny");
    let endpoint = format!("http://{addr}");
    let (ok, out) = tokio::task::spawn_blocking({
        let dest = dest.clone();
        move || pull(&endpoint, "test/tiny", &dest)
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("100%"), "progress is shown: {out}");
    assert_eq!(std::fs::read_to_string(dest.join("config.json")).unwrap(), CONFIG);
    assert_eq!(std::fs::read(dest.join("model.safetensors")).unwrap(), vec![7u8; 300_000]);
    assert!(!dest.join("README.md").exists() && !dest.join("original").exists());
    assert!(!dest.join("model.safetensors.part").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_failures_say_what_to_do() {
    let addr = start_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let endpoint = format!("http://{addr}");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (gated, missing, offline) = tokio::task::spawn_blocking(move || {
        (pull(&endpoint, "gated/tiny", &d.join("a")), pull(&endpoint, "test/nothing", &d.join("b")), pull(&closed, "test/tiny", &d.join("c")))
    })
    .await
    .unwrap();
    assert!(!gated.0 && gated.1.contains("HF_TOKEN"), "{}", gated.1);
    assert!(!missing.0 && missing.1.contains("no such repository"), "{}", missing.1);
    assert!(!offline.0 && offline.1.contains("cannot reach"), "{}", offline.1);
}
