//! Who may use hark: web pages by their `Origin`, and clients by API key.
//!
//! Browsers do not apply CORS to WebSocket upgrades, so without this check any page
//! the user visits could open `ws://127.0.0.1:8765/v1/realtime` and use the agent's
//! tools. Every request that carries an `Origin` header (browsers always send one on
//! upgrades and cross-site POSTs) must come from an allowed origin:
//!
//! - an origin listed in `server.allowed_origins` (`"*"` allows any);
//! - hark's own page: the origin equals the request's `Host` and that host is an IP
//!   address or a loopback name. A DNS name is only trusted when listed, because a
//!   rebinding attack makes `evil.example` resolve to 127.0.0.1, and the browser then
//!   sends `Origin: http://evil.example:8765` with `Host: evil.example:8765`;
//! - a page served from this machine over loopback (`http://localhost:3000`) when the
//!   request itself arrived for a loopback host.
//!
//! Requests without `Origin` come from programs, not pages, and pass (API keys, when
//! configured, are what guards those).

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::normalize_origin;

/// `server.allowed_origins`, normalised for comparison.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    any: bool,
    listed: Vec<String>,
}

impl OriginPolicy {
    /// From the config's list; entries were validated by the config.
    pub fn new(allowed: &[String]) -> Self {
        Self {
            any: allowed.iter().any(|o| o == "*"),
            listed: allowed.iter().filter_map(|o| normalize_origin(o)).collect(),
        }
    }

    /// Whether a request with these headers may proceed.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else { return true };
        if self.any {
            return true;
        }
        let Some(origin) = origin.to_str().ok().and_then(normalize_origin) else { return false };
        if self.listed.contains(&origin) {
            return true;
        }
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_ascii_lowercase) else {
            return false;
        };
        let (origin_host, origin_port) = split_authority(origin.split_once("://").map_or("", |(_, a)| a));
        let (req_host, req_port) = split_authority(&host);
        let default_port = if origin.starts_with("https://") { "443" } else { "80" };
        // hark's own page, reached by address.
        let same_origin = origin_host == req_host
            && origin_port.unwrap_or(default_port) == req_port.unwrap_or(default_port)
            && (is_ip_literal(origin_host) || is_loopback_name(origin_host));
        // Another page served on this machine, talking to hark over loopback.
        let local_page = is_loopback_name(origin_host) && is_loopback_name(req_host);
        same_origin || local_page
    }
}

/// `host[:port]` → (host, port); IPv6 hosts keep their brackets.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => (&authority[..=end], authority[end + 1..].strip_prefix(':')),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    }
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok()
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether the request presents one of `keys` (`Authorization: Bearer KEY`, or the
/// browser subprotocol `openai-insecure-api-key.KEY`). No keys configured: everyone.
/// Keys are compared in constant time, so response timing does not reveal a prefix.
pub fn authorized(keys: &[String], headers: &HeaderMap) -> bool {
    if keys.is_empty() {
        return true;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let offered = headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let sub = offered.filter_map(|p| p.trim().strip_prefix("openai-insecure-api-key.")).next();
    [bearer, sub].into_iter().flatten().any(|k| keys.iter().fold(false, |hit, key| hit | bool::from(key.as_bytes().ct_eq(k.as_bytes()))))
}

/// Middleware for the API routes: a missing or wrong key gets 401 in OpenAI's shape.
pub async fn check_key(State(st): State<AppState>, request: Request, next: Next) -> Response {
    if authorized(&st.config.server.api_keys, request.headers()) {
        return next.run(request).await;
    }
    let body = json!({"error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "Missing or invalid API key.", "param": null}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

/// Middleware: refuses requests from pages whose origin is not allowed, with 403 in
/// OpenAI's error shape. The refused origin is the client's own; nothing internal is echoed.
pub async fn check_origin(State(st): State<AppState>, request: Request, next: Next) -> Response {
    if st.origins.allows(request.headers()) {
        return next.run(request).await;
    }
    tracing::warn!(
        origin = ?request.headers().get(header::ORIGIN),
        path = %request.uri().path(),
        "refused a request from a web page whose origin is not in server.allowed_origins"
    );
    let message = "This web page's origin may not use hark. Add it to server.allowed_origins in hark's config to allow it.";
    (StatusCode::FORBIDDEN, Json(json!({"error": {"type": "invalid_request_error", "code": "origin_not_allowed", "message": message, "param": null}})))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn default_policy() {
        let p = OriginPolicy::new(&[]);
        // Programs send no Origin.
        assert!(p.allows(&headers(None, "127.0.0.1:8765")));
        // hark's own page, by address or loopback name.
        assert!(p.allows(&headers(Some("http://127.0.0.1:8765"), "127.0.0.1:8765")));
        assert!(p.allows(&headers(Some("http://localhost:8765"), "localhost:8765")));
        assert!(p.allows(&headers(Some("http://[::1]:8765"), "[::1]:8765")));
        assert!(p.allows(&headers(Some("http://192.168.1.5:8765"), "192.168.1.5:8765")));
        // A local development page on another port.
        assert!(p.allows(&headers(Some("http://localhost:3000"), "127.0.0.1:8765")));
        // Any other site, a rebinding name, opaque origins, a remote page to a LAN bind.
        assert!(!p.allows(&headers(Some("http://evil.example"), "127.0.0.1:8765")));
        assert!(!p.allows(&headers(Some("http://evil.example:8765"), "evil.example:8765")));
        assert!(!p.allows(&headers(Some("null"), "127.0.0.1:8765")));
        assert!(!p.allows(&headers(Some("http://localhost:3000"), "192.168.1.5:8765")));
        assert!(!p.allows(&headers(Some("http://192.168.1.5:9999"), "192.168.1.5:8765")));
    }

    #[test]
    fn listed_origins_and_wildcard() {
        let p = OriginPolicy::new(&["https://App.Example.com/".into()]);
        assert!(p.allows(&headers(Some("https://app.example.com"), "127.0.0.1:8765")));
        assert!(!p.allows(&headers(Some("http://app.example.com"), "127.0.0.1:8765")));
        assert!(OriginPolicy::new(&["*".into()]).allows(&headers(Some("http://evil.example"), "127.0.0.1:8765")));
    }

    #[test]
    fn origins_are_validated() {
        assert_eq!(normalize_origin("HTTP://Example.com:80/").as_deref(), Some("http://example.com:80"));
        for bad in ["example.com", "ftp://x", "http://x/path", "http://", "http://x:99999", "null"] {
            assert!(normalize_origin(bad).is_none(), "{bad}");
        }
    }
}
