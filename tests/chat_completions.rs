//! `POST /v1/chat/completions` with the official `openai` Python SDK as the client:
//! plain, streaming (with usage), an image part, an audio part, and a tool round trip,
//! against the embedded Gemma 4 (a tiny random-weight checkpoint of the real layout:
//! real model code, noise for words) and against the remote backend (the scripted
//! OpenAI-compatible server of `common`, which is what lets the model call a tool).

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn python() -> String {
    std::env::var("HARK_TEST_PYTHON").unwrap_or_else(|_| repo_root().join(".venv/bin/python").display().to_string())
}

async fn run_client(hark: &Hark, extra: &[&str]) -> Value {
    run_script(hark, "chat_sdk.py", extra).await
}

async fn run_script(hark: &Hark, script: &str, extra: &[&str]) -> Value {
    let script = repo_root().join("tests/clients").join(script).display().to_string();
    let mut args = vec![script, "--base-url".to_string(), hark.base_url()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let py = python();
    let out = tokio::task::spawn_blocking(move || Command::new(py).args(&args).output().expect("running the SDK client")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SDK client failed:\n{stdout}\n{stderr}");
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")).expect("RESULT line");
    let r: Value = serde_json::from_str(line).unwrap();
    eprintln!("{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_against_the_remote_backend() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    // plain, stream, image, audio: the default scripted answer; then the tool round trip.
    for _ in 0..4 {
        model.push(Reply::text("Hello from the scripted model."));
    }
    model.push(Reply::tool_call("", "call_w1", "get_weather", ["{\"city\":", "\"Paris\"}"]));
    model.push(Reply::text("It is 18 degrees."));
    let r = run_client(&hark, &["--tools"]).await;
    assert_eq!(r["plain"]["content"], "Hello from the scripted model.");
    assert_eq!((&r["plain"]["finish"], &r["plain"]["object"]), (&json!("stop"), &json!("chat.completion")));
    assert_eq!(r["plain"]["usage"]["prompt_tokens"], 42);
    assert_eq!(r["stream"]["content"], "Hello from the scripted model.");
    assert_eq!(r["stream"]["usage"]["completion_tokens"], 7, "stream_options.include_usage: {r}");
    assert!(r["stream"]["chunks"].as_u64().unwrap() >= 4);
    assert_eq!(r["tool_call"]["name"], "get_weather");
    assert_eq!(r["tool_call"]["arguments"], json!({"city": "Paris"}));
    assert_eq!(r["tool_call"]["finish"], "tool_calls");
    assert_eq!(r["after_tool"], "It is 18 degrees.");
    assert_eq!(r["unknown_model"], "NotFoundError");

    let requests = model.wait_requests(6).await;
    // The system message became the instructions; the image went through as a data
    // URL; the audio as a 16 kHz WAV.
    assert_eq!(requests[0]["messages"][0], json!({"role": "system", "content": "Be brief."}));
    let image = &requests[2]["messages"].as_array().unwrap().last().unwrap()["content"];
    assert!(image.to_string().contains("data:image/png;base64,"), "{image}");
    let audio = requests[3]["messages"].as_array().unwrap().last().unwrap()["content"].as_array().unwrap().iter().find(|p| p["type"] == "input_audio").cloned().unwrap();
    use base64::Engine;
    let wav = base64::engine::general_purpose::STANDARD.decode(audio["input_audio"]["data"].as_str().unwrap()).unwrap();
    let reader = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
    assert_eq!(reader.spec().sample_rate, 16_000);
    assert_eq!(reader.len(), 16_000, "one second of audio");
    // The tool's result went back to the model with its call.
    let last = requests[5]["messages"].as_array().unwrap();
    assert!(last.iter().any(|m| m["role"] == "tool" && m["tool_call_id"] == "call_w1" && m["content"] == "{\"temp_c\": 18}"), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_against_the_embedded_model() {
    let ckpt = tempfile::tempdir().unwrap();
    let cfg = embedded_test_config(ckpt.path());
    let hark = Hark::start(cfg).await;
    let r = run_client(&hark, &["--max-tokens", "8"]).await;
    for part in ["plain", "image", "audio"] {
        // Random weights never stop by themselves: each answer is 8 tokens of noise.
        assert_eq!(r[part]["usage"]["completion_tokens"], 8, "{part}: {r}");
        assert!(!r[part]["content"].as_str().unwrap().is_empty(), "{part}: {r}");
    }
    assert_eq!(r["plain"]["finish"], "length");
    assert_eq!(r["stream"]["finish"], "length");
    assert_eq!(r["stream"]["usage"]["completion_tokens"], 8);
    // The image and the audio became model tokens: one per 48 px patch, one per 40 ms
    // (compared with a text-only prompt of about the same length, the streamed one).
    let text_only = r["stream"]["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(r["image"]["usage"]["prompt_tokens"].as_u64().unwrap() > text_only + 2, "{r}");
    assert!(r["audio"]["usage"]["prompt_tokens"].as_u64().unwrap() >= text_only + 20, "one second is 25 audio tokens: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.server.max_request_bytes = 64 * 1024;
    let hark = Hark::start(cfg).await;
    hark::tls::init();
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", hark.base_url());
    let post = |body: Value| http.post(&url).json(&body).send();
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, status, param) in [
        (json!({"model": "nope", "messages": user}), 404, "model"),
        (json!({"model": "hark", "messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages[0].role"),
        (json!({"model": "hark", "messages": user, "n": 2}), 400, "n"),
        (json!({"model": "hark", "messages": user, "response_format": {"type": "json_object"}}), 400, "response_format"),
        (json!({"model": "hark", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}]}), 400, "messages[0].content[0].image_url.url"),
        (json!({"model": "hark", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}]}]}), 400, "messages[0].content[0].input_audio"),
    ] {
        let r = post(body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()) && v["error"]["type"].is_string(), "{v}");
    }
    // Not JSON, and too large.
    let r = http.post(&url).header("content-type", "application/json").body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let big = json!({"model": "hark", "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    assert_eq!(post(big).await.unwrap().status(), 413);
    // Stop sequences end the answer where they begin.
    model.push(Reply::text("one two three four"));
    let v: Value = post(json!({"model": "hark", "messages": user, "stop": [" three"]})).await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "one two");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // /v1/models lists what `model` accepts.
    let models: Value = http.get(format!("{}/models", hark.base_url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "hark");
}

/// A streamed completion's text, read as raw SSE.
async fn stream_text(http: &reqwest::Client, url: &str, prompt: &str) -> String {
    let body = json!({"model": "hark", "stream": true, "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": prompt}]});
    let text = http.post(url).json(&body).send().await.unwrap().text().await.unwrap();
    let mut out = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        out.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    out
}

/// Many clients share the one embedded model: 16 streaming completions and two
/// realtime sessions at once all finish, and each greedy answer is the one the same
/// request gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_and_sessions_share_the_model_exactly() {
    let ckpt = tempfile::tempdir().unwrap();
    let mut cfg = embedded_test_config(ckpt.path());
    cfg.backend.embedded.max_tokens = 6;
    let hark = Hark::start(cfg).await;
    hark::tls::init();
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", hark.base_url());
    let prompts: Vec<String> = (0..16).map(|i| format!("request number {i}: tell me about the number {}", i * 7)).collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(stream_text(&http, &url, p).await);
    }
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&hark.ws_url()).await;
        c.send(json!({"type": "session.update", "session": {"type": "realtime", "temperature": 0}})).await;
        c.send(json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}})).await;
        c.send(json!({"type": "response.create"})).await;
        sessions.push(c);
    }
    let together: Vec<String> = futures_util::future::join_all(prompts.iter().map(|p| stream_text(&http, &url, p))).await;
    assert_eq!(together, alone, "answers changed when requests ran together");
    for mut c in sessions {
        let done = c.until("response.done").await;
        assert_eq!(done["response"]["status"], "incomplete", "6 tokens of a random model: {done}");
    }
}

/// A second real client no one here wrote: LangChain's ChatOpenAI, with bind_tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langchain_chat_openai_with_tools() {
    let model = ScriptedModel::start().await;
    let hark = Hark::start(test_config(&model.base_url())).await;
    model.push(Reply::text("Hello from the scripted model."));
    model.push(Reply::text("Hello again."));
    model.push(Reply::tool_call("", "call_lc", "get_weather", ["{\"city\":", "\"Paris\"}"]));
    model.push(Reply::text("It is 18 degrees in Paris."));
    let r = run_script(&hark, "langchain_client.py", &[]).await;
    assert_eq!(r["plain"], "Hello from the scripted model.");
    assert_eq!(r["stream"], "Hello again.");
    assert_eq!(r["tool_calls"], json!([{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_lc"}]));
    assert_eq!(r["after_tool"], "It is 18 degrees in Paris.");
    let requests = model.wait_requests(4).await;
    assert!(requests[2]["tools"].as_array().unwrap().iter().any(|t| t["function"]["name"] == "get_weather"), "{}", requests[2]);
    let last = requests[3]["messages"].as_array().unwrap();
    assert!(last.iter().any(|m| m["role"] == "tool" && m["tool_call_id"] == "call_lc" && m["content"].as_str().unwrap().contains("18")), "{last:?}");
}

/// `seed` and `top_p` reach the embedded sampler: the same seed samples the same
/// answer at temperature 1, another seed another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_makes_sampling_repeatable() {
    let ckpt = tempfile::tempdir().unwrap();
    let hark = Hark::start(embedded_test_config(ckpt.path())).await;
    hark::tls::init();
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", hark.base_url());
    let ask = |seed: u64| {
        let body = json!({"model": "hark", "temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 8, "messages": [{"role": "user", "content": "pick some words"}]});
        let req = http.post(&url).json(&body).send();
        async move { req.await.unwrap().json::<Value>().await.unwrap()["choices"][0]["message"]["content"].as_str().unwrap().to_string() }
    };
    let (a, b, c) = (ask(7).await, ask(7).await, ask(8).await);
    assert_eq!(a, b, "same seed, same sample");
    assert_ne!(a, c, "another seed, another sample");
}
