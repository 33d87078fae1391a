//! A real browser calling hark over WebRTC: Debian's headless Chromium, driven by
//! playwright-core (`tests/clients/webrtc_call.mjs`), with fake devices fed from an
//! espeak-ng WAV and an ffmpeg test-pattern Y4M. Everything is real: ICE over
//! loopback, DTLS, SCTP, Opus from Chromium's encoder decoded by libopus, VP8 decoded
//! by libvpx, Silero VAD, the session code the WebSocket uses. The model is the
//! scripted OpenAI-compatible server behind hark's remote backend.
//!
//! Needs `chromium`, `ffmpeg`, `espeak-ng`, `sox` and `tests/clients/node_modules`
//! (scripts/test installs them all).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ANSWER: &str = "I can hear you.";

fn tools_present() {
    for (tool, why) in [("chromium", "the browser"), ("ffmpeg", "the Y4M camera"), ("espeak-ng", "speech"), ("sox", "speech"), ("node", "playwright")] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing ({why}): run scripts/test, which installs it");
    }
    assert!(repo_root().join("tests/clients/node_modules/playwright-core").exists(), "playwright-core is missing: run scripts/test (npm ci in tests/clients)");
}

/// Speech at 48 kHz (Chromium's capture rate): `pad_before` s of silence, the words,
/// `pad_after` s of silence.
fn speech_48k(dir: &Path, text: &str, pad_before: f32, pad_after: f32) -> PathBuf {
    let raw = dir.join("speech.espeak.wav");
    let out = dir.join("speech48k.wav");
    assert!(Command::new("espeak-ng").args(["-v", "en-us", "-w"]).arg(&raw).arg(text).status().unwrap().success());
    let st = Command::new("sox")
        .arg(&raw)
        .args(["-r", "48000", "-c", "1", "-b", "16", "-e", "signed"])
        .arg(&out)
        .args(["pad", &pad_before.to_string(), &pad_after.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    out
}

/// Where the speech is in a WAV: first and last 10 ms window louder than -40 dBFS, in ms.
fn speech_bounds_ms(wav: &Path) -> (u64, u64) {
    let mut r = hound::WavReader::open(wav).unwrap();
    let rate = r.spec().sample_rate as usize;
    let samples: Vec<f32> = r.samples::<i16>().map(|s| s.unwrap() as f32 / 32768.0).collect();
    let win = rate / 100;
    let loud: Vec<usize> = samples
        .chunks(win)
        .enumerate()
        .filter(|(_, w)| (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt() > 0.01)
        .map(|(i, _)| i)
        .collect();
    (*loud.first().unwrap() as u64 * 10, (*loud.last().unwrap() as u64 + 1) * 10)
}

fn test_video(dir: &Path) -> PathBuf {
    let out = dir.join("camera.y4m");
    let st = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=640x480:rate=15", "-t", "3", "-pix_fmt", "yuv420p"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg failed");
    out
}

fn run_browser(mode: &str, hark: &Hark, wav: &Path, y4m: &Path, out: &Path, env: &[(&str, &str)]) -> Value {
    let base = format!("http://{}", hark.addr);
    let mut cmd = Command::new("node");
    cmd.arg("webrtc_call.mjs").args([mode, &base]).arg(wav).arg(y4m).arg(out).current_dir(repo_root().join("tests/clients"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")).unwrap_or_else(|| panic!("no RESULT line:\n{stdout}\n{stderr}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert!(v.get("error").is_none(), "browser script failed: {}", v["error"]);
    v
}

/// Polls hark's own state until `f` holds (or fails the test after `limit`).
async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

async fn metric(hark: &Hark, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", hark.addr)).await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}")).trim().parse().unwrap()
}

async fn start_hark(replies: usize, fps: (f32, f32)) -> (ScriptedModel, Hark) {
    let model = ScriptedModel::start().await;
    for _ in 0..replies {
        model.push(Reply::text(ANSWER));
    }
    let mut cfg = test_config(&model.base_url());
    cfg.webrtc.video_fps_speaking = fps.0;
    cfg.webrtc.video_fps_idle = fps.1;
    let hark = Hark::start(cfg).await;
    (model, hark)
}

/// OpenAI-style page code (client secret → /calls → oai-events), not hark's page.
/// Hark's side: the peer connects, speech_started/stopped land within 200 ms of the
/// speech in the WAV, camera frames enter the context at the configured rates, and
/// the page gets the response's events. A spent key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_style_page_talks_over_webrtc() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello hark. What can you see on my camera today?", 1.0, 3.0);
    let (truth_start, truth_end) = speech_bounds_ms(&wav);
    let y4m = test_video(dir.path());
    let (fps_speaking, fps_idle) = (2.0, 0.5);
    let (model, hark) = start_hark(4, (fps_speaking, fps_idle)).await;
    let cpu0 = process_cpu_ms();
    let t0 = Instant::now();
    let r = run_browser("openai", &hark, &wav, &y4m, dir.path(), &[("HOLD_MS", "9000")]);
    let wall = t0.elapsed();
    let cpu = process_cpu_ms() - cpu0;
    assert_eq!(r["status"], 201, "{r}");
    assert!(r["location"].as_str().unwrap().starts_with("/v1/realtime/calls/rtc_"), "{r}");
    assert_eq!(r["how"], "response.done", "the page saw no response.done: {r}");
    assert_eq!(r["remote"], "audio", "hark's audio track reached the page: {r}");

    // hark's side: the peer connected, and the call ended when the page closed it.
    until(Duration::from_secs(10), "the call to end", || hark.state.calls.open_count() == 0).await;
    assert_eq!(hark.state.calls.connected_total(), 1);
    let stats = hark.state.calls.ended().pop().unwrap();
    assert!(stats.connected, "{stats:?}");

    let events = r["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for want in ["session.created", "session.updated", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "response.created", "response.output_text.delta", "response.done"] {
        assert!(types.contains(&want), "no {want} on the data channel: {types:?}");
    }
    assert!(events.iter().all(|e| e["event_id"].as_str().is_some_and(|id| !id.is_empty())), "every event has an event_id");
    let text: String = events.iter().filter(|e| e["type"] == "response.output_text.delta").map(|e| e["delta"].as_str().unwrap()).collect();
    assert_eq!(text, ANSWER);

    // Speech timing: hark's stream starts with the WAV (the mic track is attached once
    // the call is up, and Chromium's fake device starts the file then).
    let first = |ty: &str, field: &str| events.iter().find(|e| e["type"] == ty).unwrap()[field].as_u64().unwrap() as i64;
    let start_err = first("input_audio_buffer.speech_started", "audio_start_ms") - truth_start as i64;
    let end_err = first("input_audio_buffer.speech_stopped", "audio_end_ms") - truth_end as i64;
    eprintln!("speech in the WAV {truth_start}..{truth_end} ms; speech_started error {start_err} ms, speech_stopped error {end_err} ms");
    assert!(start_err.abs() <= 200, "speech_started {start_err} ms off");
    assert!(end_err.abs() <= 200, "speech_stopped {end_err} ms off");
    let speech_turns = types.iter().filter(|t| **t == "input_audio_buffer.speech_started").count();
    assert_eq!(speech_turns, 1, "one utterance, one turn: {types:?}");

    // Camera frames: each sampled frame is an image item; their count follows the
    // rates over the call's own timeline (page clock, event arrival times).
    let at = |e: &Value| e["at"].as_f64().unwrap();
    // A camera frame is [input_text "mm:ss", input_image]; the page's own image is not.
    let is_frame = |e: &Value| {
        e["type"] == "conversation.item.added"
            && e["item"]["content"].as_array().is_some_and(|c| c.len() == 2 && c[0]["type"] == "input_text" && c[1]["type"] == "input_image")
    };
    let frames: Vec<f64> = events.iter().filter(|e| is_frame(e)).map(at).collect();
    // The page's own image, far over SCTP's default 64 KiB message, arrived whole.
    assert!(r["imageBytes"].as_u64().unwrap() > 64 * 1024, "{}", r["imageBytes"]);
    let client_images = events
        .iter()
        .filter(|e| e["type"] == "conversation.item.added" && e["item"]["content"].as_array().is_some_and(|c| c.len() == 1 && c[0]["type"] == "input_image"))
        .count();
    assert_eq!(client_images, 1, "the page's {} byte image became an item", r["imageBytes"]);
    assert!(!types.contains(&"error"), "no errors: {:?}", events.iter().filter(|e| e["type"] == "error").collect::<Vec<_>>());
    let speaking = (
        at(events.iter().find(|e| e["type"] == "input_audio_buffer.speech_started").unwrap()),
        at(events.iter().find(|e| e["type"] == "input_audio_buffer.speech_stopped").unwrap()),
    );
    let end = events.iter().map(at).fold(0.0, f64::max);
    let expected = simulate_sampler(frames[0], end, speaking, fps_speaking as f64, fps_idle as f64);
    eprintln!("camera frames sampled: {} over {:.1} s (expected {expected}); keyframe requests {}", frames.len(), (end - frames[0]) / 1000.0, stats.keyframe_requests);
    // The page closes the call at once; a frame sampled in that instant never reaches it.
    assert!((frames.len()..=frames.len() + 1).contains(&(stats.frames_sampled as usize)), "hark sampled {}, the page saw {}", stats.frames_sampled, frames.len());
    assert!(frames.len().abs_diff(expected) <= 1, "{} frames sampled, {expected} expected from the rates; at {frames:?}, speaking {speaking:?}", frames.len());
    // Samples sit on a grid of due times; a keyframe that came late shortens the next
    // gap, never below half the fastest interval (the lead is capped at 300 ms).
    for pair in frames.windows(2) {
        assert!(pair[1] - pair[0] >= 500.0 / fps_speaking as f64, "frames closer than the sampling grid allows: {frames:?}");
    }
    // The frames reached the model: the response's request carries them as images,
    // each after its `mm:ss` stamp, and the user's audio turn.
    let request = &model.requests()[0];
    let parts: Vec<&Value> = request["messages"].as_array().unwrap().iter().filter_map(|m| m["content"].as_array()).flatten().collect();
    let images = parts.iter().filter(|p| p["type"] == "image_url").count();
    let stamps = parts.iter().filter(|p| p["type"] == "text" && p["text"].as_str().is_some_and(|t| t.len() == 5 && t.as_bytes()[2] == b':')).count();
    let audio = parts.iter().filter(|p| p["type"] == "input_audio").count();
    assert!(images >= 3 && images == stamps + 1, "{images} images (the page's and the frames), {stamps} stamps in the model's request");
    assert!(stamps <= frames.len(), "never more frames than sampled");
    assert_eq!(audio, 1, "the user's turn as audio");
    assert!(parts.iter().any(|p| p["type"] == "image_url" && p["image_url"]["url"].as_str().unwrap().starts_with("data:image/jpeg;base64,")));
    eprintln!("CPU for the call: {cpu} ms over {:.1} s wall ({:.1}% of one core, hark and its test process)", wall.as_secs_f64(), cpu as f64 / wall.as_millis() as f64 * 100.0);

    // The key was spent.
    assert_eq!(r["reuse"]["status"], 401, "{r}");
    assert_eq!(r["reuse"]["body"]["error"]["code"], "invalid_api_key");
    assert!(r["reuse"]["body"]["error"]["message"].as_str().unwrap().contains("already been used"), "{r}");
    assert_eq!(metric(&hark, "hark_sessions_active").await, 0.0);
}

/// Frames a sampler at these rates takes from `from` to `to` (ms), speaking in `speaking`.
fn simulate_sampler(from: f64, to: f64, speaking: (f64, f64), fps_speaking: f64, fps_idle: f64) -> usize {
    let (mut t, mut last, mut n) = (from, f64::NEG_INFINITY, 0);
    while t <= to {
        let fps = if (speaking.0..speaking.1).contains(&t) { fps_speaking } else { fps_idle };
        if t - last >= 1000.0 / fps {
            n += 1;
            last = t;
        }
        t += 10.0;
    }
    n
}

/// CPU time (user + system) of this process — hark runs in it — in ms.
fn process_cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 1000 / 100
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// 20 calls opened and closed by the page: every session ends, nothing is left open
/// (sessions, calls, sockets), and memory does not grow with the number of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_calls_leave_nothing_behind() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello.", 0.2, 0.5);
    let y4m = test_video(dir.path());
    let (_model, hark) = start_hark(0, (1.0, 0.2)).await;
    let mut total = 0;
    let mut round = |n: usize| {
        total += n;
        let r = run_browser("cycles", &hark, &wav, &y4m, dir.path(), &[("CYCLES", &n.to_string())]);
        let cycles = r["cycles"].as_array().unwrap().clone();
        assert_eq!(cycles.len(), n);
        assert!(cycles.iter().all(|c| c["status"] == 201 && c["created"] == true), "every call got session.created on its data channel: {r}");
    };
    // A first round warms up what is allocated once (thread pools, codec tables, TLS).
    round(5);
    until(Duration::from_secs(20), "the warm-up calls to end", || hark.state.calls.open_count() == 0).await;
    let (rss0, fds0) = (rss_kb(), open_fds());
    round(20);
    until(Duration::from_secs(30), "20 calls to end", || hark.state.calls.open_count() == 0).await;
    let (rss1, fds1) = (rss_kb(), open_fds());
    round(20);
    until(Duration::from_secs(30), "20 more calls to end", || hark.state.calls.open_count() == 0).await;
    let (rss2, fds2) = (rss_kb(), open_fds());
    assert_eq!(hark.state.calls.ended_total(), 45);
    assert_eq!(hark.state.calls.connected_total(), 45, "every call connected");
    assert_eq!(metric(&hark, "hark_sessions_active").await, 0.0, "no session left open");
    let reasons: Vec<String> = hark.state.calls.ended().iter().map(|s| s.reason.clone()).collect();
    assert!(reasons.iter().all(|r| r == "the data channel closed"), "calls end when the page closes them: {reasons:?}");
    eprintln!("RSS {rss0} kB → {rss1} kB after 20 calls ({:+} kB) → {rss2} kB after 20 more ({:+} kB); open fds {fds0} → {fds1} → {fds2}", rss1 as i64 - rss0 as i64, rss2 as i64 - rss1 as i64);
    assert!(fds1 <= fds0 + 2 && fds2 <= fds0 + 2, "sockets left open: {fds0} → {fds1} → {fds2}");
    assert!(rss2 < rss1 + 20 * 1024, "RSS keeps growing with calls: {rss1} kB → {rss2} kB over 20 calls");
}

/// A browser killed mid-call (no DTLS close, no SCTP abort) is noticed by ICE: the
/// call and its session end within `webrtc.ice_failed_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vanished_peer_ends_its_call() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello.", 0.2, 0.5);
    let y4m = test_video(dir.path());
    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.webrtc.ice_failed_timeout_ms = 3000;
    let hark = Hark::start(cfg).await;
    let r = run_browser("vanish", &hark, &wav, &y4m, dir.path(), &[]);
    assert_eq!(r["created"], true, "{r}");
    let killed = Instant::now();
    assert_eq!(hark.state.calls.open_count(), 1, "the call outlives the browser until ICE gives up");
    until(Duration::from_secs(15), "the vanished peer's call to end", || hark.state.calls.open_count() == 0).await;
    let took = killed.elapsed();
    let stats = hark.state.calls.ended().pop().unwrap();
    eprintln!("vanished peer noticed after {took:?}: {}", stats.reason);
    assert!(stats.connected);
    assert!(stats.reason.contains("failed") || stats.reason.contains("closed"), "{stats:?}");
    assert!(took < Duration::from_secs(8), "ICE took {took:?} to give up (configured 3 s)");
    assert_eq!(metric(&hark, "hark_sessions_active").await, 0.0);
}

/// hark's own page at `/`, driven like a person would: Start, speak (the fake mic),
/// read the streamed answer and the turn's latency. Saves a screenshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn built_in_page_shows_the_answer() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello hark, can you hear me?", 1.0, 3.0);
    let y4m = test_video(dir.path());
    let (_model, hark) = start_hark(4, (1.0, 0.2)).await;
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("webrtc");
    let r = run_browser("page", &hark, &wav, &y4m, &artifacts, &[]);
    assert_eq!(r["answer"].as_str().unwrap().trim(), ANSWER, "{r}");
    assert!(r["latency"].as_str().unwrap().ends_with(" ms"), "{r}");
    assert!(r["log"].as_str().unwrap().contains("input_audio_buffer.speech_stopped"), "{r}");
    assert!(r["frames"].as_u64().unwrap() > 0, "the camera preview shows video: {r}");
    let shot = PathBuf::from(r["screenshot"].as_str().unwrap());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "screenshot at {}", shot.display());
    eprintln!("screenshot: {}", shot.display());
    until(Duration::from_secs(10), "the call to end", || hark.state.calls.open_count() == 0).await;
    assert!(hark.state.calls.ended().pop().unwrap().frames_sampled >= 1, "camera frames entered the context");
}
