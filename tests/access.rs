//! Who may drive hark: web page origins (browsers send `Origin` on every WebSocket
//! upgrade, and do not apply CORS to it) and API keys.

mod common;

use common::{test_config, Client, Hark, ScriptedModel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_from_other_origins_are_refused() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.allowed_origins = vec!["https://app.example.com".into()];
    let hark = Hark::start(cfg).await;
    let url = hark.ws_url();
    let port = hark.addr.port();

    // Any other site: 403 in OpenAI's error shape, naming nothing internal.
    let (status, body) = Client::refused(&url, &[("origin", "http://evil.example")]).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "origin_not_allowed", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(!body.to_string().contains(&port.to_string()), "the refusal echoes the server's address: {body}");
    // DNS rebinding: the evil name resolved to 127.0.0.1, so Origin and Host agree.
    let evil = format!("evil.example:{port}");
    let (status, _) = Client::refused(&url, &[("origin", &format!("http://{evil}")), ("host", &evil)]).await;
    assert_eq!(status, 403);
    // Sandboxed frames and file:// pages send the opaque origin `null`.
    assert_eq!(Client::refused(&url, &[("origin", "null")]).await.0, 403);

    // Allowed: programs (no Origin), hark's own page, a local development page, the listed origin.
    let _program = Client::connect(&url).await;
    let _own = Client::connect_with(&url, &[("origin", &format!("http://127.0.0.1:{port}"))]).await;
    let _dev = Client::connect_with(&url, &[("origin", "http://localhost:5173")]).await;
    let mut listed = Client::connect_with(&url, &[("origin", "https://APP.example.com")]).await;
    // The session that got through works.
    listed.send(serde_json::json!({"type": "session.update", "session": {"instructions": "hi"}})).await;
    listed.until("session.updated").await;

    // Plain HTTP endpoints get the same check.
    hark::tls::init();
    let http = reqwest::Client::new();
    let r = http.get(format!("{}/models", hark.base_url())).header("origin", "http://evil.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = http.get(format!("{}/models", hark.base_url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_origins_are_both_checked() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.api_keys = vec!["sekrit".into()];
    let hark = Hark::start(cfg).await;
    let (status, body) = Client::refused(&hark.ws_url(), &[("authorization", "Bearer wrong")]).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    // The HTTP API too; health checks need no key.
    hark::tls::init();
    let http = reqwest::Client::new();
    let models = format!("{}/models", hark.base_url());
    let r = http.get(&models).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "invalid_api_key");
    assert_eq!(http.get(&models).bearer_auth("sekrit").send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("http://{}/healthz", hark.addr)).send().await.unwrap().status(), 200);
    // A page from a disallowed origin is refused even with the right key.
    let (status, _) = Client::refused(&hark.ws_url(), &[("authorization", "Bearer sekrit"), ("origin", "http://evil.example")]).await;
    assert_eq!(status, 403);
}
