//! The `http` handler against a real HTTP server on 127.0.0.1: placeholders are
//! percent-encoded and cannot change the path's shape or the host, redirects leave
//! the allowlist never, responses are capped, errors carry status and body.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hark::tools::{OutcomeKind, ToolRegistry, ToolSet};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    slow_started: Notify,
}

/// Echoes what arrived: method, raw path, raw query, a header, the body.
async fn echo(State(seen): State<Arc<Seen>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let header = headers.get("x-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    axum::Json(json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "x_key": header,
        "body": String::from_utf8_lossy(&body),
    }))
    .into_response()
}

async fn start_server() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/big", get(|| async { "y".repeat(2 * 1024 * 1024) }))
        .route("/fail", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "server exploded: details") }))
        .route(
            "/redirect-out",
            get(move || async move { (StatusCode::FOUND, [("location", format!("http://localhost:{}/echo/leaked", addr.port()))]) }),
        )
        .route("/redirect-in", get(|| async { (StatusCode::FOUND, [("location", "/echo/redirected")]) }))
        .route(
            "/slow",
            get(|State(seen): State<Arc<Seen>>| async move {
                seen.slow_started.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .fallback(echo)
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

async fn registry(dir: &Path, files: &[(&str, String)]) -> ToolRegistry {
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let set = ToolSet::load_dir(dir, dir).unwrap_or_else(|e| panic!("{e:#?}"));
    set.start().await.unwrap_or_else(|e| panic!("{e:#?}"))
}

fn tool(name: &str, url: &str, extra: &str) -> String {
    format!(
        "\
name: {name}
description: Test endpoint.
parameters:
  type: object
  properties:
    city: {{type: string}}
    q: {{type: string}}
handler:
  kind: http
  url: \"{url}\"
{extra}"
    )
}

fn result(out: &hark::tools::ToolOutcome) -> Value {
    assert_eq!(out.kind, OutcomeKind::Ok, "{out:?}");
    serde_json::from_str(&out.output).unwrap()
}

#[tokio::test]
async fn placeholders_are_encoded_and_cannot_move_the_request() {
    let (addr, seen) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}");
    let reg = registry(dir.path(), &[("echo.yaml", tool("echo", &format!("{base}/api/{{city}}/info?q={{q}}&format=3"), ""))]).await;

    let args = json!({"city": "../../admin?x=1#frag", "q": "a&b=c#d @evil.example/x"}).to_string();
    let got = result(&reg.call("echo", &args, CancellationToken::new()).await);
    assert_eq!(got["path"], "/api/..%2F..%2Fadmin%3Fx%3D1%23frag/info");
    assert_eq!(got["query"], "q=a%26b%3Dc%23d%20%40evil.example%2Fx&format=3");

    let args = json!({"city": "@127.0.0.2:1", "q": "é"}).to_string();
    let got = result(&reg.call("echo", &args, CancellationToken::new()).await);
    assert_eq!(got["path"], "/api/%40127.0.0.2%3A1/info");
    assert_eq!(got["query"], "q=%C3%A9&format=3");

    // A whole `..` segment would be resolved away by URL parsing: refused, nothing sent.
    let before = seen.requests.load(Ordering::SeqCst);
    for city in ["..", ".", "%2e%2e"] {
        let out = reg.call("echo", &json!({"city": city, "q": ""}).to_string(), CancellationToken::new()).await;
        if city == "%2e%2e" {
            // The value's own `%` is escaped, so this is the literal text "%2e%2e".
            assert_eq!(result(&out)["path"], "/api/%252e%252e/info");
        } else {
            assert_eq!(out.kind, OutcomeKind::Error, "{city}: {out:?}");
            assert!(out.output.contains("path segment"), "{}", out.output);
        }
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn redirects_stay_inside_the_allowlist() {
    let (addr, seen) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}");
    let reg = registry(
        dir.path(),
        &[
            ("out.yaml", tool("out", &format!("{base}/redirect-out"), "")),
            ("in.yaml", tool("inside", &format!("{base}/redirect-in"), "")),
        ],
    )
    .await;
    let out = reg.call("out", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error, "{out:?}");
    assert!(out.output.contains("\"localhost\"") && out.output.contains("not in allow_hosts"), "{}", out.output);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0, "the redirect was followed");

    let got = result(&reg.call("inside", "{}", CancellationToken::new()).await);
    assert_eq!(got["path"], "/echo/redirected");
}

#[tokio::test]
async fn post_sends_the_arguments_and_env_headers() {
    let (addr, _) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}");
    // cargo sets CARGO_PKG_NAME for test runs.
    let headers = "  method: POST\n  headers: {X-Key: \"k-${ENV:CARGO_PKG_NAME}\"}\n";
    let missing = "  headers: {X-Key: \"Bearer ${ENV:HARK_TEST_SURELY_UNSET_VARIABLE}\"}\n";
    let reg = registry(
        dir.path(),
        &[("post.yaml", tool("post", &format!("{base}/submit"), headers)), ("nokey.yaml", tool("nokey", &format!("{base}/x"), missing))],
    )
    .await;
    let got = result(&reg.call("post", r#"{"city": "Paris", "q": "rain"}"#, CancellationToken::new()).await);
    assert_eq!(got["method"], "POST");
    assert_eq!(got["x_key"], "k-hark");
    let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"city": "Paris", "q": "rain"}));

    let out = reg.call("nokey", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(out.output.contains("HARK_TEST_SURELY_UNSET_VARIABLE is not set"), "{}", out.output);
}

#[tokio::test]
async fn big_responses_and_error_statuses_become_errors() {
    let (addr, _) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{addr}");
    let reg = registry(
        dir.path(),
        &[
            ("big.yaml", tool("big", &format!("{base}/big"), "  max_response_bytes: 65536\n")),
            ("fail.yaml", tool("fail", &format!("{base}/fail"), "")),
        ],
    )
    .await;
    let out = reg.call("big", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert_eq!(out.output, "the response is larger than max_response_bytes (65536 bytes)");

    let out = reg.call("fail", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Error);
    assert!(out.output.starts_with("HTTP 500") && out.output.contains("server exploded: details"), "{}", out.output);
}

#[tokio::test]
async fn slow_servers_time_out() {
    let (addr, _) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), &[("slow.yaml", tool("slow", &format!("http://{addr}/slow"), "timeout_ms: 400\n"))]).await;
    let start = Instant::now();
    let out = reg.call("slow", "{}", CancellationToken::new()).await;
    assert_eq!(out.kind, OutcomeKind::Timeout, "{out:?}");
    assert_eq!(out.output, "timed out after 400 ms");
    assert!(start.elapsed() < Duration::from_secs(30), "waited for the 60 s response");
}

#[tokio::test]
async fn a_request_in_flight_is_cancelled() {
    let (addr, seen) = start_server().await;
    let dir = tempfile::tempdir().unwrap();
    let reg = Arc::new(registry(dir.path(), &[("wait.yaml", tool("wait", &format!("http://{addr}/slow"), ""))]).await);
    let cancel = CancellationToken::new();
    let call = tokio::spawn({
        let (reg, cancel) = (reg.clone(), cancel.clone());
        async move { reg.call("wait", "{}", cancel).await }
    });
    // The server has the request: now cancel it.
    seen.slow_started.notified().await;
    let start = Instant::now();
    cancel.cancel();
    let out = call.await.unwrap();
    assert_eq!(out.kind, OutcomeKind::Cancelled, "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(30), "waited for the 60 s response");
}
