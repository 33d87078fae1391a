//! WebRTC signalling refusals: every bad request to `/v1/realtime/client_secrets` and
//! `/v1/realtime/calls` is a clear 4xx in OpenAI's error shape, and hark keeps serving.
//! (A real browser completing calls is `webrtc_browser.rs`.)

mod common;

use common::*;
use serde_json::{json, Value};

const HEAD: &str = "v=0\r\no=- 46117317 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\na=msid-semantic: WMS\r\n";
const DATA: &str = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\na=setup:actpass\r\na=mid:1\r\na=sctp-port:5000\r\n";

fn audio_section(codecs: &[(u8, &str)]) -> String {
    let pts: Vec<String> = codecs.iter().map(|(pt, _)| pt.to_string()).collect();
    let mut s = format!(
        "m=audio 9 UDP/TLS/RTP/SAVPF {}\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\na=setup:actpass\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\n",
        pts.join(" ")
    );
    for (pt, codec) in codecs {
        s.push_str(&format!("a=rtpmap:{pt} {codec}\r\n"));
    }
    s
}

async fn post_sdp(url: &str, key: Option<&str>, sdp: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url).header("Content-Type", "application/sdp").body(sdp.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(json!({"raw": text})))
}

async fn mint(base: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{base}/realtime/client_secrets")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// OpenAI's error shape, with the code expected.
fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, mentions: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error lacks '{k}': {body}");
    }
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    assert_eq!(e["code"], code, "{body}");
    let message = e["message"].as_str().unwrap();
    assert!(message.to_lowercase().contains(&mentions.to_lowercase()), "message should mention '{mentions}': {message}");
}

#[tokio::test]
async fn bad_offers_and_keys_are_clear_4xx() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.webrtc.client_secret_ttl_s = 1;
    let hark = Hark::start(cfg).await;
    let base = hark.base_url();
    let calls = format!("{base}/realtime/calls");

    // The key: OpenAI's shape.
    let (status, secret) = mint(&base, json!({"session": {"type": "realtime", "instructions": "Be brief."}})).await;
    assert_eq!(status, 200, "{secret}");
    let key = secret["value"].as_str().unwrap().to_string();
    assert!(key.starts_with("ek_"), "{secret}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!((now..=now + 2).contains(&secret["expires_at"].as_u64().unwrap()), "{secret}");
    assert_eq!(secret["session"]["instructions"], "Be brief.");
    let (status, body) = mint(&base, json!({"expires_after": {"anchor": "created_at", "seconds": 3600}})).await;
    assert_error(status, &body, 400, "invalid_value", "expires_after.seconds");
    let (status, body) = mint(&base, json!({"session": {"turn_detection": "loud"}})).await;
    assert_eq!(status, 400, "a bad session is refused when the key is minted: {body}");

    // Offers hark cannot use: each refused before the key is spent.
    let (status, body) = post_sdp(&calls, Some(&key), "this is not sdp").await;
    assert_error(status, &body, 400, "invalid_offer", "could not be parsed");
    let (status, body) = post_sdp(&calls, Some(&key), "").await;
    assert_error(status, &body, 400, "invalid_offer", "empty");
    let (status, body) = post_sdp(&calls, Some(&key), &format!("{HEAD}{DATA}")).await;
    assert_error(status, &body, 400, "invalid_offer", "no audio");
    let (status, body) = post_sdp(&calls, Some(&key), &format!("{HEAD}{}{DATA}", audio_section(&[(0, "PCMU/8000"), (9, "G722/8000")]))).await;
    assert_error(status, &body, 400, "invalid_offer", "opus");
    assert!(body["error"]["message"].as_str().unwrap().contains("pcmu, g722"), "names what was offered: {body}");
    let (status, body) = post_sdp(&calls, Some(&key), &format!("{HEAD}{}", audio_section(&[(111, "opus/48000/2")]))).await;
    assert_error(status, &body, 400, "invalid_offer", "oai-events");
    // A camera only in codecs hark cannot decode (VP9, AV1): refused, naming them,
    // rather than answered with a camera that never reaches the model.
    let video = "m=video 9 UDP/TLS/RTP/SAVPF 98 99 45\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\na=setup:actpass\r\na=mid:2\r\na=sendonly\r\na=rtcp-mux\r\na=rtpmap:98 VP9/90000\r\na=rtpmap:99 rtx/90000\r\na=fmtp:99 apt=98\r\na=rtpmap:45 AV1/90000\r\n";
    let (status, body) = post_sdp(&calls, Some(&key), &format!("{HEAD}{}{DATA}{video}", audio_section(&[(111, "opus/48000/2")]))).await;
    assert_error(status, &body, 400, "invalid_offer", "VP8 and H.264");
    assert!(body["error"]["message"].as_str().unwrap().contains("vp9, av1"), "names what was offered: {body}");
    let r = reqwest::Client::new().post(&calls).bearer_auth(&key).header("Content-Type", "image/png").body("x").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let r = reqwest::Client::new().post(&calls).bearer_auth(&key).json(&json!({"session": {}})).send().await.unwrap();
    let (status, body) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_error(status, &body, 400, "missing_required_parameter", "sdp");

    // Keys: unknown, then (once the key's second has passed) expired.
    let sdp = format!("{HEAD}{}{DATA}", audio_section(&[(111, "opus/48000/2")]));
    let (status, body) = post_sdp(&calls, Some("ek_notakey"), &sdp).await;
    assert_error(status, &body, 401, "invalid_api_key", "not known");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // the key's lifetime is what is tested
    let (status, body) = post_sdp(&calls, Some(&key), &sdp).await;
    assert_error(status, &body, 401, "invalid_api_key", "expired");

    // output_audio_buffer.clear is WebRTC's (the call holds the audio it plays): over a
    // WebSocket it is an error naming the event, and the session carries on.
    let mut ws = Client::connect(&hark.ws_url()).await;
    ws.send(json!({"type": "output_audio_buffer.clear", "event_id": "c1"})).await;
    let e = ws.until("error").await;
    assert_eq!(e["error"]["event_id"], "c1", "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("only supported for WebRTC"), "{e}");
    ws.assert_alive().await;

    // Still serving.
    let r = reqwest::get(format!("{base}/../healthz").replace("/v1/../", "/")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ready: Value = reqwest::get(hark.base_url().replace("/v1", "/readyz")).await.unwrap().json().await.unwrap();
    assert_eq!(ready["webrtc_calls"], 0, "{ready}");
}

/// An offer that is answered but whose peer never shows up: the key is spent (a reuse
/// is refused), and the call ends by itself after `webrtc.connect_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_call_whose_peer_never_comes_ends() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.webrtc.connect_timeout_ms = 500;
    let hark = Hark::start(cfg).await;
    let base = hark.base_url();
    let (_, secret) = mint(&base, json!({})).await;
    let key = secret["value"].as_str().unwrap();
    let sdp = format!("{HEAD}{}{DATA}", audio_section(&[(111, "opus/48000/2")]));
    let r = reqwest::Client::new().post(format!("{base}/realtime/calls")).bearer_auth(key).header("Content-Type", "application/sdp").body(sdp.clone()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/v1/realtime/calls/rtc_"), "{location}");
    assert_eq!(r.headers()["content-type"], "application/sdp");
    let answer = r.text().await.unwrap();
    assert!(answer.starts_with("v=0") && answer.contains("a=candidate:") && answer.contains("127.0.0.1"), "a loopback host candidate:\n{answer}");
    assert!(answer.contains("opus/48000/2"), "{answer}");
    let (status, body) = post_sdp(&format!("{base}/realtime/calls"), Some(key), &sdp).await;
    assert_error(status, &body, 401, "invalid_api_key", "already been used");
    let t = std::time::Instant::now();
    while hark.state.calls.open_count() > 0 {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "the unconnected call was not dropped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = hark.state.calls.ended().pop().unwrap();
    assert!(!stats.connected && stats.reason.contains("did not connect"), "{stats:?}");
}

/// The other body forms OpenAI accepts — `{sdp, session}` as multipart or JSON — and
/// hanging up a call by its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_and_json_offers_and_hangup() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    let base = hark.base_url();
    let sdp = format!("{HEAD}{}{DATA}", audio_section(&[(111, "opus/48000/2")]));
    let http = reqwest::Client::new();
    let boundary = "hark-test-boundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\n\r\n{sdp}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"session\"\r\n\r\n{}\r\n--{boundary}--\r\n",
        json!({"type": "realtime", "instructions": "From the form."})
    );
    let r = http.post(format!("{base}/realtime/calls")).header("Content-Type", format!("multipart/form-data; boundary={boundary}")).body(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let r = http.post(format!("{base}/realtime/calls")).json(&json!({"sdp": sdp, "session": {"type": "realtime"}})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(hark.state.calls.open_count(), 2);
    let r = http.post(format!("http://{}{location}/hangup", hark.addr)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let t = std::time::Instant::now();
    while hark.state.calls.open_count() > 1 {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "the hung-up call did not end");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(hark.state.calls.ended().pop().unwrap().reason, "hung up");
    let r = http.post(format!("http://{}{location}/hangup", hark.addr)).send().await.unwrap();
    let (status, body) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_error(status, &body, 404, "call_not_found", "no open call");
    // A bad session in the form is refused before anything is built.
    let r = http.post(format!("{base}/realtime/calls")).json(&json!({"sdp": sdp, "session": "loud"})).send().await.unwrap();
    let (status, body) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_error(status, &body, 400, "invalid_value", "session");
}

#[tokio::test]
async fn calls_need_a_key_when_keys_are_configured() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.api_keys = vec!["sk-test".into()];
    let hark = Hark::start(cfg).await;
    let base = hark.base_url();
    let sdp = format!("{HEAD}{}{DATA}", audio_section(&[(111, "opus/48000/2")]));
    let (status, body) = post_sdp(&format!("{base}/realtime/calls"), None, &sdp).await;
    assert_error(status, &body, 401, "invalid_api_key", "api key");
    // Minting needs the real key; the minted key then opens the door once.
    let r = reqwest::Client::new().post(format!("{base}/realtime/client_secrets")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = reqwest::Client::new().post(format!("{base}/realtime/client_secrets")).bearer_auth("sk-test").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let key = r.json::<Value>().await.unwrap()["value"].as_str().unwrap().to_string();
    let (status, body) = post_sdp(&format!("{base}/realtime/calls"), Some(&key), "garbage").await;
    assert_error(status, &body, 400, "invalid_offer", "parsed");
}
