//! What the WebRTC browser tests share: fake-device media (espeak-ng speech, an
//! ffmpeg Y4M camera), running the playwright script, and reading hark's own state.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::*;

pub const ANSWER: &str = "I can hear you.";

pub fn tools_present() {
    for (tool, why) in [("chromium", "the browser"), ("ffmpeg", "the Y4M camera"), ("espeak-ng", "speech"), ("sox", "speech"), ("node", "playwright")] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing ({why}): run scripts/test, which installs it");
    }
    assert!(repo_root().join("tests/clients/node_modules/playwright-core").exists(), "playwright-core is missing: run scripts/test (npm ci in tests/clients)");
}

/// Speech at 48 kHz (Chromium's capture rate): `pad_before` s of silence, the words,
/// `pad_after` s of silence.
pub fn speech_48k(dir: &Path, text: &str, pad_before: f32, pad_after: f32) -> PathBuf {
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
pub fn speech_bounds_ms(wav: &Path) -> (u64, u64) {
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

pub fn test_video(dir: &Path) -> PathBuf {
    let out = dir.join("camera.y4m");
    let st = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=640x480:rate=15", "-t", "3", "-pix_fmt", "yuv420p"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg failed");
    out
}

pub fn run_browser(mode: &str, hark: &Hark, wav: &Path, y4m: &Path, out: &Path, env: &[(&str, &str)]) -> Value {
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
pub async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

pub async fn metric(hark: &Hark, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", hark.addr)).await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}")).trim().parse().unwrap()
}

pub async fn start_hark(replies: usize, fps: (f32, f32)) -> (ScriptedModel, Hark) {
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

/// CPU time (user + system) of this process — hark runs in it — in ms.
pub fn process_cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * 1000 / 100
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

