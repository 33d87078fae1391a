//! Shared test harness: a scripted OpenAI-compatible model server, an in-process
//! hark, a Realtime WebSocket client, and espeak-ng speech.
//!
//! The scripted model server is a real HTTP server on loopback, but its answers are
//! scripted: no model server with audio-capable weights can run on these machines
//! (a 24 GB checkpoint cannot be downloaded here). Everything else is real.

#![allow(dead_code)]

pub mod pulse;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use hark::config::Config;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ───────────────────────── scripted model server ─────────────────────────

/// One scripted answer to `POST /v1/chat/completions`.
#[derive(Clone, Debug)]
pub enum Reply {
    /// SSE `data:` payloads, sent in order with `gap` between them, then `[DONE]`.
    Stream { chunks: Vec<Value>, gap: Duration },
    /// Like `Stream` but the connection then stays open without finishing.
    StreamThenHang { chunks: Vec<Value> },
    /// An HTTP error status with a body.
    Status(u16, String),
    /// Accept the request and never answer.
    Hang,
    /// Raw bytes as the SSE body (for malformed streams).
    Raw(String),
}

impl Reply {
    /// A plain text answer streamed word by word.
    pub fn text(text: &str) -> Reply {
        let mut chunks: Vec<Value> = text
            .split_inclusive(' ')
            .map(|w| json!({"choices": [{"index": 0, "delta": {"content": w}}]}))
            .collect();
        chunks.push(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
        chunks.push(json!({"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": 7}}));
        Reply::Stream { chunks, gap: Duration::from_millis(5) }
    }

    /// Some text, then one tool call whose arguments arrive in two pieces.
    pub fn tool_call(text: &str, call_id: &str, name: &str, args: [&str; 2]) -> Reply {
        let chunks = vec![
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": args[0]}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[1]}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ];
        Reply::Stream { chunks, gap: Duration::from_millis(5) }
    }
}

#[derive(Default)]
struct ScriptState {
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Value>>,
    arrived: Notify,
}

/// A real HTTP server on 127.0.0.1 that answers chat completions from a script.
pub struct ScriptedModel {
    pub addr: SocketAddr,
    state: Arc<ScriptState>,
    stop: CancellationToken,
}

impl ScriptedModel {
    pub async fn start() -> ScriptedModel {
        let state = Arc::new(ScriptState::default());
        let app = Router::new().route("/v1/chat/completions", post(chat)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(s.cancelled_owned()).await.unwrap();
        });
        ScriptedModel { addr, state, stop }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues replies; when the queue is empty the server answers `Reply::text("Hello from the scripted model.")`.
    pub fn push(&self, reply: Reply) {
        self.state.replies.lock().unwrap().push_back(reply);
    }

    pub fn requests(&self) -> Vec<Value> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_requests(&self, n: usize) -> Vec<Value> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.state.arrived.notified();
                if self.state.requests.lock().unwrap().len() >= n {
                    return self.requests();
                }
                notified.await;
            }
        })
        .await
        .expect("model server did not get the expected requests")
    }
}

impl Drop for ScriptedModel {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn chat(State(st): State<Arc<ScriptState>>, Json(body): Json<Value>) -> Response {
    st.requests.lock().unwrap().push(body);
    st.arrived.notify_waiters();
    let reply = st.replies.lock().unwrap().pop_front().unwrap_or_else(|| Reply::text("Hello from the scripted model."));
    let sse = |chunks: Vec<Value>, gap: Duration, finish: bool| {
        let stream = async_stream(chunks, gap, finish);
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(stream))
            .unwrap()
    };
    match reply {
        Reply::Stream { chunks, gap } => sse(chunks, gap, true),
        Reply::StreamThenHang { chunks } => sse(chunks, Duration::from_millis(5), false),
        Reply::Status(code, body) => (StatusCode::from_u16(code).unwrap(), body).into_response(),
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Raw(text) => Response::builder().header("content-type", "text/event-stream").body(axum::body::Body::from(text)).unwrap(),
    }
}

fn async_stream(
    chunks: Vec<Value>,
    gap: Duration,
    finish: bool,
) -> impl futures_util::Stream<Item = Result<String, std::io::Error>> + Send {
    futures_util::stream::unfold((chunks.into_iter(), false), move |(mut it, done)| async move {
        if done {
            if finish {
                return None;
            }
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(gap).await;
        match it.next() {
            Some(c) => Some((Ok(format!("data: {c}\n\n")), (it, false))),
            None if finish => Some((Ok("data: [DONE]\n\n".to_string()), (it, true))),
            None => {
                std::future::pending::<()>().await;
                None
            }
        }
    })
}

/// Greedy, f32, CPU settings for the embedded engine on a checkpoint.
pub fn engine_settings(dir: &std::path::Path, max_tokens: u32, cached_sessions: usize) -> hark::model::embedded::EmbeddedSettings {
    hark::model::embedded::EmbeddedSettings {
        checkpoint: dir.to_path_buf(),
        device: "cpu".into(),
        dtype: "f32".into(),
        max_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        cached_sessions,
        kv_budget_mb: 1024,
        image_tokens: 70,
    }
}

// ───────────────────────────── hark in-process ─────────────────────────────

pub struct Hark {
    pub addr: SocketAddr,
    /// The running server's state (its calls, metrics), for assertions from hark's side.
    pub state: hark::server::AppState,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// A config for tests: loopback, port 0, the repo's vendor/ files, the given model server.
pub fn test_config(model_base_url: &str) -> Config {
    let mut c = Config::default();
    c.server.port = 0;
    c.backend.kind = hark::config::BackendKind::Openai;
    c.audio.onnxruntime_library = repo_root().join("vendor/libonnxruntime.so");
    c.audio.silero_model = repo_root().join("vendor/silero_vad.onnx");
    c.speech.piper.model = repo_root().join("vendor/en_US-joe-medium.onnx");
    c.backend.openai.base_url = model_base_url.to_string();
    c.backend.openai.model = "scripted".into();
    c.backend.openai.first_token_timeout_ms = 10_000;
    c.backend.openai.idle_timeout_ms = 10_000;
    // No YAML tools or agents unless a test brings its own (the repo's examples start
    // an MCP server).
    c.tools_dir = repo_root().join("tests/fixtures/none");
    c.agents_dir = repo_root().join("tests/fixtures/none");
    c
}

/// A config for the embedded backend on a tiny random-weight checkpoint of the real
/// layout (written into `dir` by the real `hark model init` code).
pub fn embedded_test_config(dir: &Path) -> Config {
    hark::model::gemma4::init::write_random_checkpoint(hark::model::gemma4::init::Preset::Tiny, dir, false, 5, |_, _| {}).unwrap();
    let mut cfg = test_config("http://127.0.0.1:9/v1");
    cfg.backend.kind = hark::config::BackendKind::Embedded;
    cfg.backend.embedded.checkpoint = dir.to_path_buf();
    cfg
}

/// A tools and an agents folder in `dir` with one agent, `name`, whose only tool is
/// the builtin calculator; `cfg` starts sessions with it.
pub fn with_calculator_agent(cfg: &mut Config, dir: &Path, name: &str) {
    let (tools, agents) = (dir.join("tools"), dir.join("agents"));
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::create_dir_all(&agents).unwrap();
    std::fs::copy(repo_root().join("tools/calculator.yaml"), tools.join("calculator.yaml")).unwrap();
    std::fs::write(agents.join(format!("{name}.yaml")), format!("name: {name}\ninstructions: You help.\ntools: [calculator]\n")).unwrap();
    cfg.tools_dir = tools;
    cfg.agents_dir = agents;
    cfg.session.agent = Some(name.into());
}

impl Hark {
    pub async fn start(config: Config) -> Hark {
        let state = hark::server::AppState::from_config(config)
            .await
            .expect("hark could not start; run scripts/test, which fetches vendor/ first");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = state.shutdown.clone();
        let kept = state.clone();
        let task = tokio::spawn(hark::server::serve(listener, state));
        Hark { addr, state: kept, shutdown, task }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/realtime?model=hark-test", self.addr)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for Hark {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ───────────────────────────── Realtime client ─────────────────────────────

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every event received, in order.
    pub seen: Vec<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::connect_with(url, &[]).await
    }

    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Client {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await.expect("websocket connect");
        let mut c = Client { ws, seen: Vec::new() };
        let created = c.next().await;
        assert_eq!(created["type"], "session.created", "{created}");
        c
    }

    /// Attempts an upgrade that hark must refuse; returns the HTTP status and the JSON body.
    pub async fn refused(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = url.into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => panic!("the upgrade to {url} with {headers:?} was accepted"),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().as_deref().map(|b| serde_json::from_slice(b).expect("a JSON error body")).unwrap_or(Value::Null);
                (resp.status().as_u16(), body)
            }
            Err(e) => panic!("expected an HTTP refusal, got {e}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next event (15 s at most). Every event must carry a string `event_id`.
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), self.ws.next())
                .await
                .expect("timed out waiting for a server event")
                .expect("connection closed")
                .expect("websocket error");
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    assert!(v["event_id"].as_str().is_some_and(|s| !s.is_empty()), "event without event_id: {v}");
                    self.seen.push(v.clone());
                    return v;
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Reads events until one of type `ty`; returns it.
    pub async fn until(&mut self, ty: &str) -> Value {
        loop {
            let v = self.next().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Reads events up to and including one of type `ty`; returns them all.
    pub async fn collect_until(&mut self, ty: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = self.next().await;
            let stop = v["type"] == ty;
            out.push(v);
            if stop {
                return out;
            }
        }
    }

    /// Waits for the server to close the connection; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await.expect("no close") {
                None => return None,
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(Message::Text(t))) => self.seen.push(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(_)) => continue,
                Some(Err(_)) => return None,
            }
        }
    }

    /// Proves the session still answers: a clear gets its `cleared`.
    pub async fn assert_alive(&mut self) {
        self.send(json!({"type": "input_audio_buffer.clear", "event_id": "alive"})).await;
        let v = self.until("input_audio_buffer.cleared").await;
        assert_eq!(v["type"], "input_audio_buffer.cleared");
    }
}

pub fn types(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["type"].as_str().unwrap_or("").to_string()).collect()
}

// ───────────────────────────────── audio ─────────────────────────────────

/// 24 kHz pcm16 little-endian bytes of a sine.
pub fn sine_pcm24(seconds: f32, freq: f32) -> Vec<u8> {
    let n = (24_000.0 * seconds) as usize;
    (0..n)
        .flat_map(|i| {
            let s = (2.0 * std::f32::consts::PI * freq * i as f32 / 24_000.0).sin() * 0.3;
            ((s * 32767.0) as i16).to_le_bytes()
        })
        .collect()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Speaks `text` with espeak-ng and writes a 24 kHz mono s16 WAV padded with silence.
pub fn speech_wav(dir: &Path, name: &str, text: &str, pad_before: f32, pad_after: f32) -> PathBuf {
    let raw = dir.join(format!("{name}.espeak.wav"));
    let out = dir.join(format!("{name}.wav"));
    let st = std::process::Command::new("espeak-ng")
        .args(["-v", "en-us", "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .expect("espeak-ng is missing: run scripts/test, which installs it");
    assert!(st.success(), "espeak-ng failed");
    let st = std::process::Command::new("sox")
        .arg(&raw)
        .args(["-r", "24000", "-c", "1", "-b", "16", "-e", "signed"])
        .arg(&out)
        .args(["pad", &pad_before.to_string(), &pad_after.to_string()])
        .status()
        .expect("sox is missing: run scripts/test, which installs it");
    assert!(st.success(), "sox failed");
    out
}

/// The raw pcm16 samples of a WAV file as bytes.
pub fn wav_pcm_bytes(path: &Path) -> Vec<u8> {
    let mut r = hound::WavReader::open(path).unwrap();
    r.samples::<i16>().flat_map(|s| s.unwrap().to_le_bytes()).collect()
}

/// hark's default voice (Piper `en_US-joe-medium` from vendor/, as scripts/setup fetches it).
#[allow(dead_code)]
pub fn piper_voice() -> hark::speech::piper::PiperVoice {
    hark::speech::piper::PiperVoice::load(&hark::speech::piper::PiperSettings {
        onnxruntime_library: repo_root().join("vendor/libonnxruntime.so"),
        model: repo_root().join("vendor/en_US-joe-medium.onnx"),
        config: None,
        espeak_program: "espeak-ng".into(),
        length_scale: 1.0,
        threads: 0,
    })
    .expect("the Piper voice: run scripts/setup, which fetches it")
}
