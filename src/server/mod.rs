//! HTTP front door: the Realtime WebSocket, health, models, metrics-free basics.
//!
//! `serve` runs until the shutdown token fires, then gives open sessions
//! `shutdown_grace_ms` to send their final event and close.

pub mod access;
pub mod calls;
pub mod chat;
pub mod local;
pub mod realtime;
pub mod speech;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AudioPartStyle, BackendKind, Config, VadKind};
use crate::media::vad::SileroModel;
use crate::model::embedded::{EmbeddedBackend, EmbeddedSettings};
use crate::model::openai::{AudioPart, OpenAiBackend, OpenAiSettings};
use crate::model::Backend;
use crate::session::{SessionDeps, SessionSettings, VadFactory};

/// Shared by every request handler.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub deps: Arc<SessionDeps>,
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
    pub session_slots: Arc<Semaphore>,
    /// The size of `session_slots` (`server.max_sessions`, or what `auto` made of it).
    pub max_sessions: usize,
    pub origins: Arc<access::OriginPolicy>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ephemeral keys for browser calls, and the calls open now.
    pub secrets: Arc<crate::webrtc::secrets::ClientSecrets>,
    pub calls: Arc<crate::webrtc::Calls>,
    /// The always-on microphone session (`audio.input: mic`).
    pub local: Option<Arc<local::LocalSession>>,
}

impl AppState {
    /// What a client refused for the session limit is told.
    pub fn too_many_sessions(&self) -> String {
        format!("hark is serving its limit of {} sessions at once (server.max_sessions); try again when one ends.", self.max_sessions)
    }

    /// Loads what sessions need (VAD model, backend client, tools and agents; MCP tool
    /// servers are started). Fails with a message that says what is missing and how to
    /// get it; bad tool or agent YAML fails with every problem as `file:line: field: …`.
    pub async fn from_config(config: Config) -> anyhow::Result<Self> {
        let (tool_set, _) = crate::check::load_tool_specs(&config).map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
        let tools = tool_set.start().await.map_err(|p| {
            anyhow::anyhow!("{}", p.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
        })?;
        // Agents resolve against the running registry: MCP tools are known by name now.
        let agents = crate::tools::AgentSet::load_dir(&config.resolve(&config.agents_dir), &tools.catalog()).map_err(|p| {
            anyhow::anyhow!("{}", p.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
        })?;
        if let Some(name) = &config.session.agent {
            anyhow::ensure!(
                agents.get(name).is_some(),
                "session.agent: no agent named \"{name}\" in {} (agents: {})",
                config.resolve(&config.agents_dir).display(),
                agents.names().join(", ")
            );
        }
        let vad = match config.audio.vad {
            VadKind::Silero => VadFactory::Silero(
                SileroModel::load(&config.onnxruntime_library(), &config.resolve(&config.audio.silero_model))
                    .context("loading the Silero VAD")?,
            ),
            VadKind::Energy => {
                tracing::warn!("audio.vad is 'energy': turn detection uses signal level only, not a speech model");
                VadFactory::Energy
            }
        };
        let backend = build_backend(&config)?;
        let speech = match crate::speech::from_config(&config) {
            Ok(s) => s,
            // A voice that is not fetched yet leaves hark useful for text; say how to get it.
            Err(crate::speech::SpeechError::Missing(m)) => {
                tracing::warn!("speech out is off: {m}");
                None
            }
            Err(e) => return Err(anyhow::Error::new(e).context("loading the speech engine (speech in config.yaml; speech.engine: none turns it off)")),
        };
        if let Some(s) = &speech {
            tracing::info!("speech out: {}", s.name());
        }
        let metrics = Arc::new(crate::metrics::Metrics::default());
        metrics.set_context_limit(config.session.context.max_tokens);
        let deps = SessionDeps {
            defaults: SessionSettings::from_config(&config),
            backend,
            vad,
            max_buffer_seconds: config.audio.max_buffer_seconds,
            max_items: config.session.limits.max_items,
            memory: crate::session::budget::MemoryPool::new(config.server.max_total_bytes),
            max_session_bytes: config.session.limits.max_session_bytes,
            max_image_bytes: config.session.limits.max_image_bytes,
            retention: crate::context::RetentionPolicy {
                max_tokens: config.session.context.max_tokens,
                retention_ratio: config.session.context.retention_ratio,
            },
            streaming_prefill: config.session.streaming_prefill,
            tools: Arc::new(tools),
            agents: Arc::new(agents),
            client_tool_timeout: Duration::from_millis(config.session.client_tool_timeout_ms),
            speech,
            audio_drops: metrics.audio_frames_dropped.clone(),
        };
        let deps = Arc::new(deps);
        let shutdown = CancellationToken::new();
        let local = match config.audio.input {
            crate::config::AudioInputKind::None => None,
            crate::config::AudioInputKind::Mic => Some(start_local_session(&config, deps.clone(), shutdown.clone())?),
        };
        let (max_sessions, why) = crate::check::max_sessions(&config);
        tracing::info!("serving at most {max_sessions} sessions at once ({why})");
        Ok(Self {
            local,
            session_slots: Arc::new(Semaphore::new(max_sessions)),
            max_sessions,
            origins: Arc::new(access::OriginPolicy::new(&config.server.allowed_origins)),
            metrics,
            secrets: Default::default(),
            calls: Default::default(),
            config: Arc::new(config),
            deps,
            shutdown,
            sessions: TaskTracker::new(),
        })
    }
}

/// The always-on microphone session (`audio.input: mic`).
#[cfg(feature = "audio-devices")]
fn start_local_session(config: &Config, deps: Arc<SessionDeps>, shutdown: CancellationToken) -> anyhow::Result<Arc<local::LocalSession>> {
    let mic = crate::sources::MicSettings { device: config.audio.mic.device.clone(), buffer_frames: config.audio.mic.buffer_frames };
    tracing::info!("local session on the microphone ({})", mic.device.as_deref().unwrap_or("default input"));
    use crate::config::EchoCancellation;
    let echo_mode = config.audio.echo_cancellation;
    let (speaker, reference) = match config.audio.output {
        crate::config::AudioOutputKind::None => (None, None),
        crate::config::AudioOutputKind::Speaker => {
            anyhow::ensure!(deps.speech.is_some(), "audio.output: speaker needs a speech engine (speech.engine; is the voice fetched? run scripts/setup)");
            let aec = echo_mode == EchoCancellation::Aec;
            let s = crate::sources::speaker::Speaker::open(config.audio.speaker.device.as_deref(), config.audio.speaker.buffer_frames, aec)
                .context("opening the speaker (audio.speaker)")?;
            let reference = s.take_reference();
            (Some(s as Arc<dyn crate::sources::SpeechSink>), reference)
        }
    };
    let echo = match reference {
        Some(r) => Some(crate::sources::echo::EchoCanceller::new(r).context("starting the echo canceller")?),
        None => None,
    };
    let echo_stats = echo.as_ref().map(|e| e.stats());
    if speaker.is_some() {
        tracing::info!(mode = ?echo_mode, "local session: echo handling");
    }
    let (microphone, rx) = crate::sources::mic::Microphone::start(mic, echo, deps.audio_drops.clone());
    let wake = match config.audio.activation {
        crate::config::Activation::Always => None,
        crate::config::Activation::WakeWord => Some(load_wake_word(config)?),
        crate::config::Activation::Manual => None,
    };
    let output = local::LocalOutput { speaker, echo: echo_mode, echo_stats, wake };
    let session = local::LocalSession::start(deps, rx, Box::new(microphone), output, shutdown);
    if config.audio.activation == crate::config::Activation::Manual {
        session.use_manual_turns()?;
    }
    Ok(session)
}

/// `audio.activation: wake_word`: openWakeWord's models, loaded (and run once) now.
#[cfg(feature = "audio-devices")]
pub fn load_wake_word(config: &Config) -> anyhow::Result<local::WakeWord> {
    let w = &config.audio.wake_word;
    let paths = crate::media::wake::WakeModelPaths {
        melspectrogram: config.resolve(&w.melspectrogram),
        embedding: config.resolve(&w.embedding),
        model: config.resolve(&w.model),
    };
    let detector = crate::media::wake::WakeModel::load(&config.onnxruntime_library(), &paths)
        .and_then(|m| m.detector())
        .context("loading the wake word (audio.wake_word; audio.activation: always turns it off)")?;
    tracing::info!(model = %paths.model.display(), threshold = w.threshold, "local session: activation by wake word");
    Ok(local::WakeWord { detector, threshold: w.threshold, listen: Duration::from_millis(w.listen_ms) })
}

#[cfg(not(feature = "audio-devices"))]
fn start_local_session(_: &Config, _: Arc<SessionDeps>, _: CancellationToken) -> anyhow::Result<Arc<local::LocalSession>> {
    anyhow::bail!("audio.input: mic needs a hark built with the `audio-devices` feature (on by default; it needs libasound2-dev)")
}

pub fn build_backend(config: &Config) -> anyhow::Result<Arc<dyn Backend>> {
    match config.backend.kind {
        BackendKind::Embedded => {
            let mut settings: EmbeddedSettings = config.backend.embedded.clone();
            settings.checkpoint = config.resolve(&settings.checkpoint);
            tracing::info!("loading {} on {} ({})", settings.checkpoint.display(), settings.device, settings.dtype);
            let backend = EmbeddedBackend::start(settings).context("starting the embedded model (backend.embedded in config.yaml)")?;
            Ok(Arc::new(backend))
        }
        BackendKind::Openai => {
            let c = &config.backend.openai;
            let api_key = resolve_secret(&c.api_key)?;
            let settings = OpenAiSettings {
                base_url: c.base_url.clone(),
                api_key: (!api_key.is_empty()).then_some(api_key),
                model: c.model.clone(),
                audio_part: match c.audio_part {
                    AudioPartStyle::InputAudio => AudioPart::InputAudio,
                    AudioPartStyle::AudioUrl => AudioPart::AudioUrl,
                },
                connect_timeout: Duration::from_millis(c.connect_timeout_ms),
                first_token_timeout: Duration::from_millis(c.first_token_timeout_ms),
                idle_timeout: Duration::from_millis(c.idle_timeout_ms),
                max_tokens: c.max_tokens,
                temperature: c.temperature,
            };
            Ok(Arc::new(OpenAiBackend::new(settings)?))
        }
    }
}

/// `${ENV:NAME}` → the variable's value; anything else as written.
pub fn resolve_secret(value: &str) -> anyhow::Result<String> {
    match value.strip_prefix("${ENV:").and_then(|v| v.strip_suffix('}')) {
        Some(name) => std::env::var(name).with_context(|| format!("environment variable {name} is not set")),
        None => Ok(value.to_string()),
    }
}

pub fn router(state: AppState) -> Router {
    // The API needs a key when keys are configured; the page and health checks do not.
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", axum::routing::post(chat::completions))
        .route("/v1/audio/speech", axum::routing::post(speech::create))
        .route("/v1/realtime", get(realtime::upgrade))
        .route("/v1/realtime/client_secrets", axum::routing::post(calls::client_secrets))
        .route("/v1/realtime/calls/{call_id}/hangup", axum::routing::post(calls::hangup))
        .layer(axum::middleware::from_fn_with_state(state.clone(), access::check_key));
    Router::new()
        // Checks its own key: an ephemeral key from client_secrets, or an API key.
        .route("/v1/realtime/calls", axum::routing::post(calls::create_call))
        .route("/", get(index))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(state.config.server.max_request_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), access::check_origin))
        .with_state(state)
}

/// The built-in page: talk to hark from a browser over WebRTC (plain HTML/JS, no
/// build step; it calls `/v1/realtime/calls` on the origin that served it).
async fn index() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("page.html"))
}

/// The Prometheus text exposition of [`crate::metrics::Metrics`].
async fn metrics(axum::extract::State(st): axum::extract::State<AppState>) -> impl axum::response::IntoResponse {
    st.metrics.set_backend_memory(st.deps.backend.memory());
    st.metrics.set_session_memory(st.deps.memory.used(), st.deps.memory.limit());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.metrics.render())
}

/// Ready to serve: the model is loaded and the tools started (both happen before the
/// server listens), and the daemon is not shutting down. An MCP server that is down
/// (restarting with backoff) makes hark `degraded`, still 200: voice and the other
/// tools work.
async fn readyz(axum::extract::State(st): axum::extract::State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let degraded = !st.deps.tools.unavailable().is_empty();
    let status = match (st.shutdown.is_cancelled(), degraded) {
        (true, _) => "shutting_down",
        (false, true) => "degraded",
        (false, false) => "ready",
    };
    let body = json!({
        "status": status,
        "backend": st.deps.backend.name(),
        "tools": st.deps.tools.names().len(),
        "mcp_servers": st.deps.tools.health(),
        "sessions": st.metrics.sessions_active.get(),
        "webrtc_calls": st.calls.open_count(),
    });
    let status = if st.shutdown.is_cancelled() { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK };
    (status, Json(body)).into_response()
}

/// What `model` accepts: the configured model name, and each agent (which brings its
/// instructions to chat completions and everything else to Realtime sessions).
async fn models(axum::extract::State(st): axum::extract::State<AppState>) -> Json<serde_json::Value> {
    let mut data = vec![json!({"id": st.deps.defaults.model, "object": "model", "created": 0, "owned_by": "hark", "backend": st.deps.backend.name()})];
    for name in st.deps.agents.names() {
        if name != st.deps.defaults.model {
            data.push(json!({"id": name, "object": "model", "created": 0, "owned_by": "hark", "agent": true}));
        }
    }
    Json(json!({"object": "list", "data": data}))
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let addr = format!("{}:{}", config.server.host, config.server.port);
    TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// Serves until `state.shutdown` fires; then waits (bounded) for sessions to close.
pub async fn serve(listener: TcpListener, state: AppState) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let sessions = state.sessions.clone();
    let grace = Duration::from_millis(state.config.server.shutdown_grace_ms);
    let tools = state.deps.tools.clone();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()).await?;
    sessions.close();
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!("some sessions did not close within {grace:?}");
    }
    tools.shutdown().await;
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGTERM: {e}");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        token.cancel();
    });
}
