//! The `http` executor: one HTTP request per call, to hosts the tool allows.
//!
//! The URL template's scheme, host and port are fixed text (a placeholder there is a
//! load error). Every substituted value (`{param}`, `${ENV:NAME}`) is percent-encoded
//! as a URL component: everything but `A-Z a-z 0-9 - . _ ~` is escaped, so a value can
//! never add `/`, `?`, `#`, `@` or `&` and cannot change the host or the path's shape.
//! A value that would make a whole path segment `.` or `..` is refused (URL parsers
//! resolve those segments even when escaped).
//!
//! Redirects are followed (at most 5) only to hosts in `allow_hosts` (default: the
//! URL's own host); a redirect elsewhere ends the call with an error. Responses are
//! read as a stream and a response beyond `max_response_bytes` is an error (a cut JSON
//! document is worse than none). A non-2xx status is an error with the body's start.

use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::spec::{HttpHandler, HttpMethod};
use super::template::{Piece, Template};

/// Escaped in substituted values: all but the RFC 3986 unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// How much of an error response's body goes into the message.
const ERROR_BODY_HEAD: usize = 512;
const MAX_REDIRECTS: usize = 5;

pub fn encode_component(value: &str) -> String {
    utf8_percent_encode(value, COMPONENT).to_string()
}

/// The lower-case host of a URL template whose scheme and authority are literal text.
pub fn template_host(url: &Template) -> Result<String, String> {
    let prefix = match url.pieces().first() {
        Some(Piece::Literal(s)) => s.as_str(),
        _ => return Err("must start with http:// or https:// and a host, not a placeholder".into()),
    };
    let Some(scheme_end) = prefix.find("://") else {
        return Err("must start with http:// or https://".into());
    };
    let scheme = &prefix[..scheme_end];
    if scheme != "http" && scheme != "https" {
        return Err(format!("scheme {scheme:?} is not http or https"));
    }
    let after = &prefix[scheme_end + 3..];
    let authority_end = after.find(['/', '?', '#']);
    if authority_end.is_none() && url.pieces().len() > 1 {
        return Err("placeholders may not be part of the host or port (end the host with '/')".into());
    }
    let authority = &after[..authority_end.unwrap_or(after.len())];
    if authority.contains('@') {
        return Err("user names and passwords in the URL are not allowed; use headers".into());
    }
    let parsed = reqwest::Url::parse(&format!("{scheme}://{authority}/")).map_err(|e| format!("bad host {authority:?}: {e}"))?;
    match parsed.host_str() {
        Some(h) if !h.is_empty() => Ok(h.to_ascii_lowercase()),
        _ => Err("has no host".into()),
    }
}

fn host_allowed(allow: &[String], url: &reqwest::Url) -> bool {
    url.host_str().is_some_and(|h| allow.iter().any(|a| a.eq_ignore_ascii_case(h)))
}

/// The URL for one call, checked: encoded values, no `.`/`..` segments, allowed host.
pub fn build_url(h: &HttpHandler, args: &Map<String, Value>) -> Result<reqwest::Url, String> {
    let text = h.url.render(args, encode_component).map_err(|e| e.to_string())?;
    let after_scheme = text.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &text[after_scheme..];
    let path_start = rest.find('/').unwrap_or(rest.len());
    let path_end = rest[path_start..].find(['?', '#']).map(|i| path_start + i).unwrap_or(rest.len());
    for segment in rest[path_start..path_end].split('/') {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err(format!("the arguments would make a {decoded:?} path segment; refused"));
        }
    }
    let url = reqwest::Url::parse(&text).map_err(|e| format!("the URL {text:?} is not valid: {e}"))?;
    if !host_allowed(&h.allow_hosts, &url) {
        return Err(format!("host {:?} is not in allow_hosts", url.host_str().unwrap_or("")));
    }
    Ok(url)
}

/// An http tool with its client (one per tool: the redirect policy holds its allowlist).
#[derive(Debug, Clone)]
pub struct HttpTool {
    handler: HttpHandler,
    client: reqwest::Client,
}

impl HttpTool {
    pub fn new(handler: HttpHandler, timeout: Duration) -> Result<HttpTool, String> {
        crate::tls::init();
        let allow = handler.allow_hosts.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if host_allowed(&allow, attempt.url()) {
                attempt.follow()
            } else {
                let host = attempt.url().host_str().unwrap_or("").to_string();
                attempt.error(format!("redirect to host {host:?}, which is not in allow_hosts"))
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("hark/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(HttpTool { handler, client })
    }

    /// Makes the request. `Err` is a message for the model.
    pub async fn call(&self, args: &Map<String, Value>) -> Result<String, String> {
        let h = &self.handler;
        let url = build_url(h, args)?;
        let method = match h.method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Delete => reqwest::Method::DELETE,
            HttpMethod::Patch => reqwest::Method::PATCH,
        };
        let mut req = self.client.request(method, url.clone());
        for (name, value) in &h.headers {
            let value = value.render(args, |v| v.to_string()).map_err(|e| format!("header {name}: {e}"))?;
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))?;
            let value = HeaderValue::from_str(&value).map_err(|_| format!("header {name}: the value is not a valid header value"))?;
            req = req.header(name, value);
        }
        if h.json_body {
            req = req.json(args);
        }
        let mut resp = req.send().await.map_err(|e| format!("{} {}: {}", h.method.as_str(), redact(&url), error_chain(&e)))?;
        let status = resp.status();
        let mut body: Vec<u8> = Vec::new();
        let mut too_big = false;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > h.max_response_bytes {
                        too_big = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(format!("reading the response: {}", error_chain(&e))),
            }
        }
        if !status.is_success() {
            let head = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_HEAD)]).trim().to_string();
            return Err(format!("HTTP {status}: {head}"));
        }
        if too_big {
            return Err(format!("the response is larger than max_response_bytes ({} bytes)", h.max_response_bytes));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// A URL for messages, without its query (which may carry keys from `${ENV:…}`).
fn redact(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::template::Allow;
    use serde_json::json;

    fn handler(url: &str) -> HttpHandler {
        let url = Template::parse(url, Allow { params: true, env: true }).unwrap();
        let host = template_host(&url).unwrap();
        HttpHandler { method: HttpMethod::Get, url, headers: vec![], json_body: false, allow_hosts: vec![host], max_response_bytes: 1024 }
    }

    #[test]
    fn values_cannot_change_host_or_path_shape() {
        let h = handler("https://wttr.in/{city}?format=3&q={q}");
        let args = json!({"city": "../../etc/passwd", "q": "a&b=c#d @x/y?z"});
        let url = build_url(&h, args.as_object().unwrap()).unwrap();
        assert_eq!(url.host_str(), Some("wttr.in"));
        assert_eq!(url.path(), "/..%2F..%2Fetc%2Fpasswd");
        assert_eq!(url.query(), Some("format=3&q=a%26b%3Dc%23d%20%40x%2Fy%3Fz"));
        assert!(url.fragment().is_none());
        let dots = json!({"city": "..", "q": ""});
        assert!(build_url(&h, dots.as_object().unwrap()).unwrap_err().contains("path segment"));
        let at = json!({"city": "@evil.example", "q": ""});
        assert_eq!(build_url(&h, at.as_object().unwrap()).unwrap().host_str(), Some("wttr.in"));
    }

    #[test]
    fn host_must_be_literal() {
        let t = |u: &str| template_host(&Template::parse(u, Allow { params: true, env: true }).unwrap());
        assert_eq!(t("https://Example.COM:8443/x/{a}").unwrap(), "example.com");
        assert!(t("https://{host}/x").is_err());
        assert!(t("https://api.example{tld}/x").is_err());
        assert!(t("https://user:pw@api.example/x").is_err());
        assert!(t("ftp://api.example/x").is_err());
        assert!(t("{url}").is_err());
    }
}
