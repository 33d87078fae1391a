//! WebRTC signalling over HTTP, as OpenAI's Realtime API does it:
//!
//! - `POST /v1/realtime/client_secrets` (API key) → an ephemeral key for a page;
//! - `POST /v1/realtime/calls` (API key or ephemeral key) with the SDP offer as
//!   `application/sdp`, or `{sdp, session}` as multipart form or JSON → `201` with the
//!   SDP answer and `Location: /v1/realtime/calls/{call_id}`;
//! - `POST /v1/realtime/calls/{call_id}/hangup` ends a call.
//!
//! Every refusal is a 4xx in OpenAI's error shape; the media work is in `crate::webrtc`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::realtime::RealtimeQuery;
use super::AppState;
use crate::protocol::{parse_client_event, Dialect};
use crate::webrtc::signaling::{parse_offer, MAX_SDP_BYTES};
use crate::webrtc::{call, CallContext, CallError};

/// An error in OpenAI's shape: `{"error": {message, type, param, code}}`.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>, param: Option<&str>) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    (status, Json(json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}}))).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SecretRequest {
    expires_after: Option<ExpiresAfter>,
    session: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ExpiresAfter {
    #[serde(default)]
    anchor: Option<String>,
    seconds: u64,
}

/// Checks a session configuration the way a `session.update` would be parsed, so a
/// bad one is refused when the key is minted, not when the call opens.
/// Returns the refusal, if any.
fn check_session(session: &Value, param: &str) -> Option<Response> {
    if !session.is_object() {
        return Some(error(StatusCode::BAD_REQUEST, "invalid_value", "'session' must be a JSON object.", Some(param)));
    }
    parse_client_event(&json!({"type": "session.update", "session": session}).to_string())
        .err()
        .map(|e| error(StatusCode::BAD_REQUEST, e.code, e.message, Some(param)))
}

pub async fn client_secrets(State(st): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: SecretRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SecretRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_json", format!("The request body is not valid JSON for client_secrets: {e}."), None),
        }
    };
    let max = st.config.webrtc.client_secret_ttl_s;
    let ttl = match &req.expires_after {
        None => max,
        Some(ExpiresAfter { anchor, .. }) if anchor.as_deref().is_some_and(|a| a != "created_at") => {
            return error(StatusCode::BAD_REQUEST, "invalid_value", "expires_after.anchor must be \"created_at\".", Some("expires_after.anchor"));
        }
        Some(e) if e.seconds < 10 || e.seconds > max => {
            return error(StatusCode::BAD_REQUEST, "invalid_value", format!("expires_after.seconds must be within 10..{max} (webrtc.client_secret_ttl_s)."), Some("expires_after.seconds"));
        }
        Some(e) => e.seconds,
    };
    if let Some(s) = &req.session {
        if let Some(r) = check_session(s, "session") {
            return r;
        }
    }
    match st.secrets.mint(Duration::from_secs(ttl), req.session.clone()) {
        Ok(k) => {
            let mut session = req.session.unwrap_or_else(|| json!({}));
            if let Some(obj) = session.as_object_mut() {
                obj.entry("type").or_insert(json!("realtime"));
                obj.entry("model").or_insert(json!(st.deps.defaults.model));
            }
            (StatusCode::OK, Json(json!({"value": k.value, "expires_at": k.expires_at, "session": session}))).into_response()
        }
        Err(e) => error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", e.to_string(), None),
    }
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// What `/calls` was sent: the offer, and the session configuration if any.
async fn read_call_body(st: &AppState, request: Request) -> Result<(String, Option<Value>), Response> {
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let mime = content_type.split(';').next().unwrap_or("").trim().to_string();
    let too_big = || error(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", format!("The SDP offer is limited to {MAX_SDP_BYTES} bytes."), Some("sdp"));
    match mime.as_str() {
        "application/sdp" | "text/plain" | "" => {
            let body = axum::body::to_bytes(request.into_body(), MAX_SDP_BYTES + 1).await.map_err(|_| too_big())?;
            let sdp = String::from_utf8(body.to_vec()).map_err(|_| error(StatusCode::BAD_REQUEST, "invalid_sdp", "The SDP offer is not UTF-8 text.", Some("sdp")))?;
            Ok((sdp, None))
        }
        "application/json" => {
            let body = axum::body::to_bytes(request.into_body(), st.config.server.max_request_bytes).await.map_err(|_| too_big())?;
            let v: Value = serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_json", format!("The request body is not valid JSON: {e}."), None))?;
            let sdp = v.get("sdp").and_then(Value::as_str).ok_or_else(|| error(StatusCode::BAD_REQUEST, "missing_required_parameter", "Missing required parameter: 'sdp' (the SDP offer as a string).", Some("sdp")))?;
            Ok((sdp.to_string(), v.get("session").cloned().filter(|s| !s.is_null())))
        }
        "multipart/form-data" => {
            let mut form = Multipart::from_request(request, st).await.map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_multipart", e.body_text(), None))?;
            let (mut sdp, mut session) = (None, None);
            loop {
                let field = match form.next_field().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(error(StatusCode::BAD_REQUEST, "invalid_multipart", e.body_text(), None)),
                };
                let name = field.name().unwrap_or("").to_string();
                let text = field.text().await.map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_multipart", e.body_text(), Some(&name)))?;
                match name.as_str() {
                    "sdp" => sdp = Some(text),
                    "session" => {
                        let v: Value = serde_json::from_str(&text).map_err(|e| error(StatusCode::BAD_REQUEST, "invalid_json", format!("'session' is not valid JSON: {e}."), Some("session")))?;
                        session = Some(v);
                    }
                    _ => {}
                }
            }
            let sdp = sdp.ok_or_else(|| error(StatusCode::BAD_REQUEST, "missing_required_parameter", "Missing required form field: 'sdp'.", Some("sdp")))?;
            Ok((sdp, session))
        }
        other => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            format!("Content-Type '{other}' is not accepted; send the offer as application/sdp, or {{sdp, session}} as multipart/form-data or application/json."),
            None,
        )),
    }
}

pub async fn create_call(State(st): State<AppState>, Query(q): Query<RealtimeQuery>, request: Request) -> Response {
    // Who may call: an ephemeral key (checked now, spent once the offer is good), or
    // one of hark's API keys as on every API route.
    let headers = request.headers().clone();
    let ephemeral = bearer(&headers).filter(|k| k.starts_with("ek_")).map(str::to_string);
    if let Some(key) = &ephemeral {
        if let Err(e) = st.secrets.check(key) {
            return error(StatusCode::UNAUTHORIZED, "invalid_api_key", e.to_string(), None);
        }
    } else if !super::access::authorized(&st.config.server.api_keys, &headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_api_key", "Missing or invalid API key (or ephemeral key from /v1/realtime/client_secrets).", None);
    }
    let (sdp, body_session) = match read_call_body(&st, request).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(s) = &body_session {
        if let Some(r) = check_session(s, "session") {
            return r;
        }
    }
    let offer = match parse_offer(&sdp) {
        Ok(o) => o,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_offer", e.to_string(), Some("sdp")),
    };
    let key_session = match &ephemeral {
        Some(key) => match st.secrets.redeem(key) {
            Ok(s) => s,
            Err(e) => return error(StatusCode::UNAUTHORIZED, "invalid_api_key", e.to_string(), None),
        },
        None => None,
    };
    let Ok(permit) = st.session_slots.clone().try_acquire_owned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "too_many_sessions", st.too_many_sessions(), None);
    };
    if st.shutdown.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_shutdown", "hark is shutting down.", None);
    }
    let beta = headers.get_all("openai-beta").iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|p| p.trim() == "realtime=v1"));
    let session_config = match (key_session, body_session) {
        // The request's own configuration refines the key's.
        (Some(Value::Object(mut a)), Some(Value::Object(b))) => {
            a.extend(b);
            Some(Value::Object(a))
        }
        (a, b) => b.or(a),
    };
    let model = session_config.as_ref().and_then(|s| s.get("model")).and_then(Value::as_str).map(str::to_string).or(q.model);
    let w = &st.config.webrtc;
    let ctx = CallContext {
        deps: st.deps.clone(),
        metrics: st.metrics.clone(),
        calls: st.calls.clone(),
        shutdown: st.shutdown.clone(),
        tracker: st.sessions.clone(),
        webrtc: w.clone(),
        udp_addrs: w.udp_addrs_for(&st.config.server.host),
        model,
        session_config,
        dialect: if beta { Dialect::Beta } else { Dialect::Ga },
        read_timeout: Duration::from_millis(st.config.server.client_read_timeout_ms),
        max_message_bytes: st.config.server.max_message_bytes,
        video: crate::webrtc::video::VideoSettings { fps_speaking: w.video_fps_speaking, fps_idle: w.video_fps_idle, frame_tokens: w.video_frame_tokens },
        permit: Some(Arc::new(permit)),
    };
    match call::answer(ctx, offer).await {
        Ok(a) => (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/sdp".to_string()), (header::LOCATION, format!("/v1/realtime/calls/{}", a.call_id))],
            a.sdp,
        )
            .into_response(),
        Err(e @ (CallError::Offer(_) | CallError::BadOffer(_))) => error(StatusCode::BAD_REQUEST, "invalid_offer", e.to_string(), Some("sdp")),
        Err(e) => {
            tracing::error!("cannot answer a call: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "call_failed", format!("hark could not set up the call: {e}"), None)
        }
    }
}

pub async fn hangup(State(st): State<AppState>, Path(call_id): Path<String>) -> Response {
    if st.calls.hang_up(&call_id) {
        StatusCode::OK.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "call_not_found", format!("No open call '{call_id}'."), Some("call_id"))
    }
}
