//! `GET /v1/realtime`: the OpenAI Realtime protocol over WebSocket.
//!
//! The transport only frames messages: it parses text frames into client events,
//! hands them to a [`Session`], and writes the session's events back in the client's
//! dialect. Authentication and limits are checked before the upgrade.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::protocol::{parse_client_event, to_wire, Dialect, ProtocolError, ServerEvent};
use super::AppState;
use crate::session::{Session, SessionInput};

#[derive(Debug, Deserialize)]
pub struct RealtimeQuery {
    pub model: Option<String>,
    /// `local`: attach to the always-on microphone session instead of starting one.
    pub session: Option<String>,
}

/// Subprotocols hark answers with, in order of preference.
const SUBPROTOCOLS: [&str; 2] = ["realtime", "openai-beta.realtime-v1"];

pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<RealtimeQuery>,
    headers: HeaderMap,
) -> Response {
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    let beta_header = headers
        .get_all("openai-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == "realtime=v1"));
    let dialect = if beta_header || offered.iter().any(|p| p == "openai-beta.realtime-v1") { Dialect::Beta } else { Dialect::Ga };
    let Ok(permit) = st.session_slots.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": {"type": "server_error", "code": "too_many_sessions", "message": st.too_many_sessions()}}))).into_response();
    };
    if st.shutdown.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let max = st.config.server.max_message_bytes;
    if let Some(name) = q.session.as_deref() {
        let local = match (name, st.local.clone()) {
            ("local", Some(l)) => l,
            _ => {
                let message = format!("No session '{name}' to attach to (the local session runs with audio.input: mic).");
                return (StatusCode::NOT_FOUND, Json(json!({"error": {"type": "invalid_request_error", "code": "session_not_found", "message": message}})))
                    .into_response();
            }
        };
        return ws.protocols(SUBPROTOCOLS).max_message_size(max).max_frame_size(max).on_upgrade(move |socket| {
            let tracker = st.sessions.clone();
            tracker.track_future(async move {
                tracing::info!(%peer, ?dialect, "attached to the local session");
                run_attached(socket, local, dialect, st.shutdown.clone()).await;
                tracing::info!(%peer, "detached from the local session");
                drop(permit);
            })
        });
    }
    ws.protocols(SUBPROTOCOLS).max_message_size(max).max_frame_size(max).on_upgrade(move |socket| {
        let tracker = st.sessions.clone();
        tracker.track_future(async move {
            tracing::info!(%peer, ?dialect, model = ?q.model, "realtime session opened");
            run_socket(socket, st, q.model, dialect).await;
            tracing::info!(%peer, "realtime session closed");
            drop(permit);
        })
    })
}

/// A client attached to the local session: it sees the session's events from now on
/// and its own events drive the session; leaving does not end the session.
async fn run_attached(socket: WebSocket, local: Arc<super::local::LocalSession>, dialect: Dialect, shutdown: tokio_util::sync::CancellationToken) {
    let (mut sink, mut stream) = socket.split();
    let Some((info, mut events)) = local.attach().await else {
        let _ = sink.send(Message::Close(Some(CloseFrame { code: 1011, reason: "the local session has ended".into() }))).await;
        return;
    };
    let writer = tokio::spawn(async move {
        let mut next = Some(ServerEvent::SessionCreated { session: info });
        loop {
            let ev = match next.take() {
                Some(ev) => ev,
                None => match events.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        ServerEvent::server_error("events_dropped", format!("This client fell behind; {n} events were dropped."), None)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            };
            let Some(text) = to_wire(&ev, dialect) else { continue };
            if sink.send(Message::text(text)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::Close(Some(CloseFrame { code: 1001, reason: "session closed".into() }))).await;
    });
    let input = local.input();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = stream.next() => m,
        };
        let ev = match msg {
            None | Some(Ok(Message::Close(_))) | Some(Err(_)) => break,
            Some(Ok(Message::Text(text))) => match parse_client_event(text.as_str()) {
                Ok(env) => SessionInput::Client(env),
                Err(e) => SessionInput::Invalid(e),
            },
            Some(Ok(_)) => continue,
        };
        if input.send(ev).await.is_err() {
            break;
        }
    }
    writer.abort();
}

/// The `event_id` of a message, found without parsing it: parsing a refused message in
/// full would cost what refusing it saves. A key inside a JSON string has its quotes
/// escaped, so the first bare `"event_id"` is a key (of the event, or in the rare case
/// of a nested object of the same name, of that — only the error's label suffers).
fn scan_event_id(text: &str) -> Option<String> {
    let at = text.find("\"event_id\"")? + "\"event_id\"".len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let id = &rest[..rest.find('"')?];
    (id.len() <= 256 && !id.contains('\\')).then(|| id.to_string())
}

/// Messages refused for the budget in a row before the session is closed (1008).
const MAX_REFUSED_IN_A_ROW: u32 = 64;

async fn run_socket(socket: WebSocket, st: AppState, model: Option<String>, dialect: Dialect) {
    let (mut sink, mut stream) = socket.split();
    let (in_tx, in_rx) = mpsc::channel::<SessionInput>(256);
    let (out_tx, mut out_rx) = mpsc::channel::<ServerEvent>(1024);
    let session = Session::new(st.deps.clone(), model).with_outgoing_accounting();
    let budget = session.budget();
    let writer_budget = budget.clone();
    let shutdown = st.shutdown.child_token();
    let session_task = tokio::spawn(session.run(in_rx, out_tx, shutdown.clone()));

    // 1001 (going away) unless the reader saw why else the session ends.
    let close_code = Arc::new(AtomicU16::new(1001));
    let code = close_code.clone();
    let metrics = st.metrics.clone();
    let slow = Duration::from_millis(st.config.server.client_read_timeout_ms);
    let end_session = shutdown.clone();
    let writer = tokio::spawn(async move {
        let mut observer = crate::metrics::EventObserver::new(&metrics);
        while let Some(ev) = out_rx.recv().await {
            writer_budget.release(crate::session::budget::event_bytes(&ev));
            observer.observe(&ev);
            let Some(text) = to_wire(&ev, dialect) else { continue };
            match tokio::time::timeout(slow, sink.send(Message::text(text))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    // A client that stops reading would hold its session (and what it
                    // asked of the model) forever: it is cut off, never waited for.
                    tracing::warn!("a realtime client read nothing for {slow:?}; closing its session");
                    metrics.errors_total.get_or_create(&crate::metrics::CodeLabel { code: "client_too_slow".into() }).inc();
                    end_session.cancel();
                    let close = Message::Close(Some(CloseFrame { code: 1008, reason: "client too slow".into() }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
                    return;
                }
            }
        }
        // The session ended (client gone or shutdown): say goodbye properly.
        let code = code.load(Ordering::Relaxed);
        let reason = match code {
            1009 => "message too big",
            1008 => "client sends faster than hark can take (session.limits.max_session_bytes)",
            _ => "session closed",
        };
        let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
        let _ = sink.close().await;
    });

    // Messages refused in a row for the session's memory budget: a client that keeps
    // sending while nothing more fits is sending faster than hark can take.
    let mut refused = 0u32;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = stream.next() => m,
        };
        if let Some(Ok(Message::Text(text))) = &msg {
            // A queued message holds its bytes on the session's budget until the
            // session takes it; past the budget it is refused, not queued.
            match budget.try_charge(text.len() as u64) {
                Ok(charge) => {
                    refused = 0;
                    let input = match parse_client_event(text.as_str()) {
                        Ok(env) => SessionInput::Client(env),
                        Err(e) => SessionInput::Invalid(e),
                    };
                    if in_tx.send(SessionInput::Queued(Box::new(input), charge)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    refused += 1;
                    st.metrics.errors_total.get_or_create(&crate::metrics::CodeLabel { code: "client_too_fast".into() }).inc();
                    if refused > MAX_REFUSED_IN_A_ROW {
                        tracing::warn!("a realtime client kept sending past its memory budget; closing its session");
                        close_code.store(1008, Ordering::Relaxed);
                        break;
                    }
                    let mut err = e.to_protocol();
                    err.event_id = scan_event_id(text.as_str());
                    if in_tx.send(SessionInput::Invalid(err)).await.is_err() {
                        break;
                    }
                }
            }
            continue;
        }
        let input = match msg {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Err(e)) => {
                // axum hides tungstenite's error type, so its capacity error is known
                // by its text ("Space limit exceeded: Message too long: …").
                if e.to_string().contains("Message too long") {
                    close_code.store(1009, Ordering::Relaxed);
                    tracing::info!("closing a session: {e} (server.max_message_bytes)");
                } else {
                    tracing::debug!("websocket read failed: {e}");
                }
                break;
            }
            // Text frames were taken above.
            Some(Ok(Message::Text(_))) => continue,
            Some(Ok(Message::Binary(_))) => SessionInput::Invalid(ProtocolError::new(
                "invalid_message",
                "Binary frames are not part of the Realtime protocol; send JSON text frames.",
            )),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
        if in_tx.send(input).await.is_err() {
            break;
        }
    }
    drop(in_tx);
    let _ = session_task.await;
    let _ = writer.await;
    // The closing handshake: read on until the client's Close (or a second). Dropping
    // a socket with unread input resets the connection, and a client that is still
    // sending would lose the error and the close frame that say why it was closed.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::scan_event_id;

    #[test]
    fn event_ids_are_found_without_parsing() {
        assert_eq!(scan_event_id(r#"{"audio":"AAAA","event_id" : "e1","type":"x"}"#).as_deref(), Some("e1"));
        assert_eq!(scan_event_id(r#"{"type":"x","text":"say \"event_id\": \"no\""}"#), None);
        assert_eq!(scan_event_id(r#"{"event_id":12}"#), None);
        assert_eq!(scan_event_id(r#"{"event_id":"unterminated"#), None);
    }
}
