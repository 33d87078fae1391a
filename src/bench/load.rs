//! `hark bench load`: N concurrent Realtime WebSocket sessions over loopback, each a
//! client inside this process streaming real-time 24 kHz speech with server VAD, against
//! hark running in this process too (the tiny embedded model, or a remote backend).
//!
//! Prints sessions held, frames dropped, event latency (append → `speech_started`,
//! `speech_stopped` → first delta), and RSS and CPU over time, so a soak shows whether
//! memory stays flat and where the load limit is.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::config::{BackendKind, Config};

pub struct LoadBench {
    pub config: Config,
    pub sessions: usize,
    pub seconds: f64,
    /// The embedded model's checkpoint; `None` with no `backend_url`: a tiny random one.
    pub checkpoint: Option<PathBuf>,
    /// An OpenAI-compatible server instead of the embedded model.
    pub backend_url: Option<String>,
}

/// 20 ms of 24 kHz audio: what Realtime clients typically append at a time.
const CHUNK: usize = 480;
/// A sender further behind than this drops frames instead of bursting them.
const MAX_LAG: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Stats {
    frames_sent: AtomicU64,
    frames_dropped: AtomicU64,
    errors: AtomicU64,
    speech_started: AtomicU64,
    responses: AtomicU64,
    closed_early: AtomicU64,
    to_started: Mutex<Vec<Duration>>,
    to_first_delta: Mutex<Vec<Duration>>,
    to_done: Mutex<Vec<Duration>>,
    error_codes: Mutex<Vec<String>>,
}

/// Speech for the clients: espeak-ng if it is installed, else a synthetic speech-like
/// signal. Returned as 24 kHz pcm16, with what it is.
fn speech() -> (Vec<i16>, &'static str) {
    let dir = std::env::temp_dir().join(format!("hark-load-{}", std::process::id()));
    let wav = dir.join("speech.wav");
    let made = std::fs::create_dir_all(&dir).is_ok()
        && std::process::Command::new("espeak-ng")
            .args(["-v", "en-us", "-w"])
            .arg(&wav)
            .arg("What is the weather like in Paris today? Tell me briefly.")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let spoken = made.then(|| std::fs::read(&wav).ok()).flatten().and_then(|b| crate::media::clip::decode_clip(&b, "wav").ok());
    let _ = std::fs::remove_dir_all(&dir);
    let (speech16k, what) = match spoken {
        Some(s) => (s, "espeak-ng speech"),
        None => (super::test_signal(16_000, 2), "a synthetic speech-like signal (espeak-ng not found)"),
    };
    // 16 → 24 kHz by linear interpolation (the VAD does not mind), then 1.5 s of quiet
    // so each utterance ends a turn.
    let n = speech16k.len() * 3 / 2;
    let mut out: Vec<i16> = (0..n)
        .map(|i| {
            let x = i as f64 * 2.0 / 3.0;
            let (a, f) = (x.floor() as usize, x.fract() as f32);
            let s = speech16k[a] * (1.0 - f) + speech16k.get(a + 1).copied().unwrap_or(0.0) * f;
            crate::media::pcm::quantize(s)
        })
        .collect();
    out.extend(std::iter::repeat_n(0i16, 36_000));
    (out, what)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

pub async fn load(mut b: LoadBench) -> anyhow::Result<()> {
    // A tiny random checkpoint made for this run, removed after it.
    let mut made_dir = None;
    match (&b.backend_url, &b.checkpoint) {
        (Some(url), _) => {
            b.config.backend.kind = BackendKind::Openai;
            b.config.backend.openai.base_url = url.clone();
        }
        (None, Some(dir)) => {
            b.config.backend.kind = BackendKind::Embedded;
            b.config.backend.embedded.checkpoint = dir.clone();
        }
        (None, None) => {
            let dir = std::env::temp_dir().join(format!("hark-load-tiny-{}", std::process::id()));
            crate::model::gemma4::init::write_random_checkpoint(crate::model::gemma4::init::Preset::Tiny, &dir, false, 5, |_, _| {})?;
            b.config.backend.kind = BackendKind::Embedded;
            b.config.backend.embedded.checkpoint = dir.clone();
            made_dir = Some(dir);
        }
    }
    b.config.server.host = "127.0.0.1".into();
    // Every bench session must be admitted, whatever the configured (or automatic) limit.
    b.config.server.max_sessions = Some(b.config.server.max_sessions.unwrap_or(0).max(b.sessions));
    b.config.session.output_modalities = vec!["text".into()];
    b.config.session.max_output_tokens = Some(16);
    b.config.session.agent = None;
    let backend = match b.config.backend.kind {
        BackendKind::Embedded => format!("embedded {}", b.config.backend.embedded.checkpoint.display()),
        BackendKind::Openai => format!("remote {}", b.config.backend.openai.base_url),
    };
    let state = crate::server::AppState::from_config(b.config.clone()).await.context("starting hark")?;
    let memory = state.deps.memory.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = state.shutdown.clone();
    let server = tokio::spawn(crate::server::serve(listener, state));

    let (audio, what) = speech();
    let audio = Arc::new(audio);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "hark bench load: {} sessions × {:.1} min of real-time 24 kHz {what} ({:.1} s per utterance), server VAD, text answers of ≤16 tokens; backend {backend}; {cores} CPU cores\n",
        b.sessions,
        b.seconds / 60.0,
        audio.len() as f64 / 24_000.0
    );
    let stats = Arc::new(Stats::default());
    let url = format!("ws://{addr}/v1/realtime?model=hark");
    let run_for = Duration::from_secs_f64(b.seconds);
    let mut clients = Vec::new();
    for i in 0..b.sessions {
        let (url, audio, stats) = (url.clone(), audio.clone(), stats.clone());
        // Staggered starts, so turns do not all end on the same frame.
        let offset = (i * audio.len() / b.sessions.max(1)) / CHUNK * CHUNK;
        clients.push(tokio::spawn(async move {
            if let Err(e) = client(&url, &audio, offset, run_for, &stats).await {
                stats.closed_early.fetch_add(1, Ordering::Relaxed);
                eprintln!("session {i}: {e:#}");
            }
        }));
    }

    // RSS and CPU while it runs.
    println!("| t (s) | RSS (MiB) | CPU (% of one core) | session bytes (MiB) | frames sent | dropped |");
    println!("|---|---|---|---|---|---|");
    let started = Instant::now();
    let sample_every = Duration::from_secs_f64((b.seconds / 12.0).clamp(2.0, 30.0));
    let mut last = (started, super::process_cpu_seconds());
    let mut rss_samples = Vec::new();
    while started.elapsed() < run_for {
        tokio::time::sleep(sample_every.min(run_for.saturating_sub(started.elapsed()) + Duration::from_millis(200))).await;
        let (now, cpu) = (Instant::now(), super::process_cpu_seconds());
        let pct = 100.0 * (cpu - last.1) / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, cpu);
        let rss = rss_kib();
        rss_samples.push(rss);
        println!(
            "| {:.0} | {:.1} | {pct:.0} | {:.2} | {} | {} |",
            started.elapsed().as_secs_f64(),
            rss as f64 / 1024.0,
            memory.used() as f64 / (1 << 20) as f64,
            stats.frames_sent.load(Ordering::Relaxed),
            stats.frames_dropped.load(Ordering::Relaxed)
        );
    }
    for c in clients {
        let _ = c.await;
    }
    let pct = |v: &Mutex<Vec<Duration>>, p: f64| -> String {
        let mut v = v.lock().unwrap().clone();
        v.sort();
        if v.is_empty() {
            return "–".into();
        }
        format!("{:.0} ms", super::percentile(&v, p).as_secs_f64() * 1000.0)
    };
    let held = b.sessions as u64 - stats.closed_early.load(Ordering::Relaxed);
    println!(
        "\n| sessions held | frames sent | frames dropped | errors | speech_started | responses | append → speech_started p50 / p99 | speech_stopped → first delta p50 / p99 | speech_stopped → response.done p50 / p99 | RSS first → last |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {held}/{} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {:.1} → {:.1} MiB |",
        b.sessions,
        stats.frames_sent.load(Ordering::Relaxed),
        stats.frames_dropped.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.speech_started.load(Ordering::Relaxed),
        stats.responses.load(Ordering::Relaxed),
        pct(&stats.to_started, 0.5),
        pct(&stats.to_started, 0.99),
        pct(&stats.to_first_delta, 0.5),
        pct(&stats.to_first_delta, 0.99),
        pct(&stats.to_done, 0.5),
        pct(&stats.to_done, 0.99),
        rss_samples.first().copied().unwrap_or(0) as f64 / 1024.0,
        rss_samples.last().copied().unwrap_or(0) as f64 / 1024.0,
    );
    let codes = stats.error_codes.lock().unwrap().clone();
    if !codes.is_empty() {
        println!("\nerror codes: {}", codes.join(", "));
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Some(dir) = made_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// One client: streams `audio` from `offset` in a loop, in real time, for `run_for`.
async fn client(url: &str, audio: &[i16], offset: usize, run_for: Duration, stats: &Stats) -> anyhow::Result<()> {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.context("connecting")?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(
        json!({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
            "audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": true, "interrupt_response": true}}}}})
        .to_string(),
    ))
    .await?;
    let start = Instant::now();
    // When each stretch of the stream (ms from its start) was sent.
    let sent: Arc<Mutex<VecDeque<(u64, Instant)>>> = Arc::new(Mutex::new(VecDeque::new()));
    let sent_r = sent.clone();
    let reader = async {
        // End of the last turn, until its first delta; until its response.done.
        let mut stopped_at: Option<Instant> = None;
        let mut turn_end: Option<Instant> = None;
        while let Some(msg) = stream.next().await {
            let Message::Text(t) = msg? else { continue };
            let v: Value = serde_json::from_str(t.as_str())?;
            let now = Instant::now();
            match v["type"].as_str().unwrap_or("") {
                "input_audio_buffer.speech_started" => {
                    stats.speech_started.fetch_add(1, Ordering::Relaxed);
                    let at = v["audio_start_ms"].as_u64().unwrap_or(0);
                    let sent_at = sent_r.lock().unwrap().iter().find(|(end, _)| *end > at).map(|(_, t)| *t);
                    if let Some(t) = sent_at {
                        stats.to_started.lock().unwrap().push(now.duration_since(t));
                    }
                }
                "input_audio_buffer.speech_stopped" => {
                    stopped_at = Some(now);
                    turn_end = Some(now);
                }
                "response.output_text.delta" | "response.text.delta" => {
                    if let Some(t) = stopped_at.take() {
                        stats.to_first_delta.lock().unwrap().push(now.duration_since(t));
                    }
                }
                "response.done" => {
                    stats.responses.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = turn_end.take() {
                        stats.to_done.lock().unwrap().push(now.duration_since(t));
                    }
                }
                "error" => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    let code = v["error"]["code"].as_str().unwrap_or("?").to_string();
                    let mut codes = stats.error_codes.lock().unwrap();
                    if !codes.contains(&code) {
                        codes.push(code);
                    }
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    };
    let writer = async {
        let mut pos = offset % audio.len().max(1);
        let mut stream_ms = 0u64;
        let mut next = tokio::time::Instant::now();
        while start.elapsed() < run_for {
            tokio::time::sleep_until(next).await;
            next += Duration::from_millis(20);
            // Behind schedule (the machine is saturated): the frame is dropped, as a
            // real-time source would, and counted.
            if tokio::time::Instant::now().duration_since(next) > MAX_LAG {
                stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                stream_ms += 20;
                continue;
            }
            let mut bytes = Vec::with_capacity(CHUNK * 2);
            for _ in 0..CHUNK {
                bytes.extend_from_slice(&audio[pos].to_le_bytes());
                pos = (pos + 1) % audio.len();
            }
            let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
            sink.send(Message::text(json!({"type": "input_audio_buffer.append", "audio": b64}).to_string())).await?;
            stream_ms += 20;
            stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            let mut s = sent.lock().unwrap();
            s.push_back((stream_ms, Instant::now()));
            while s.len() > 3000 {
                s.pop_front();
            }
        }
        sink.send(Message::Close(None)).await.ok();
        anyhow::Ok(())
    };
    tokio::pin!(reader);
    tokio::select! {
        r = writer => r?,
        r = &mut reader => {
            r?;
            anyhow::bail!("hark closed the session early");
        }
    }
    // Drain what is left until hark closes.
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    Ok(())
}
