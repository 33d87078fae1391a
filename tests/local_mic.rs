//! The always-on local session on a real microphone path: a user-space PulseAudio with
//! a null sink and a remap source on its monitor (`../shared/DESIGN.md` §6); espeak-ng
//! speech played into it in real time with `paplay`; hark captures it through cpal
//! (ALSA's pulse plugin) as the default input. A Realtime client attaches to the local
//! session and follows it. The model server is scripted; everything else is real.
//!
//! One test function: the sound server's environment is process-wide, and the
//! device-loss phase stops and restarts it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::pulse::Pulse;
use common::*;
use serde_json::Value;

/// 16 kHz mono speech padded with silence; returns the path and the speech's length in ms.
fn speech16(dir: &Path, name: &str, text: &str) -> (PathBuf, f64) {
    let wav24 = speech_wav(dir, name, text, 0.5, 1.0);
    let out = dir.join(format!("{name}.16k.wav"));
    let st = Command::new("sox").arg(&wav24).args(["-r", "16000"]).arg(&out).status().unwrap();
    assert!(st.success());
    let mut r = hound::WavReader::open(&out).unwrap();
    let s: Vec<i16> = r.samples::<i16>().map(|x| x.unwrap()).collect();
    let first = s.iter().position(|x| x.abs() > 400).unwrap();
    let last = s.iter().rposition(|x| x.abs() > 400).unwrap();
    (out, (last - first) as f64 / 16.0)
}

/// Reads the virtual microphone with `parec`; returns when the first loud sample arrived.
fn listen_for_sound(pulse: &Pulse) -> std::thread::JoinHandle<Instant> {
    use std::io::Read;
    let mut child = Command::new("parec")
        .args(["-d", "vmic", "--rate=16000", "--channels=1", "--format=s16le", "--latency-msec=10"])
        .envs(pulse.env())
        .stdout(Stdio::piped())
        .spawn()
        .expect("parec");
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 320];
        let t = loop {
            out.read_exact(&mut buf).expect("parec output");
            if buf.chunks_exact(2).any(|b| i16::from_le_bytes([b[0], b[1]]).abs() > 400) {
                break Instant::now();
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        t
    })
}

async fn until_type(c: &mut Client, ty: &str) -> (Value, Instant) {
    let v = c.until(ty).await;
    (v, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_session_hears_the_microphone_and_survives_device_loss() {
    let _ = tracing_subscriber::fmt().with_env_filter("hark=debug").with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut pulse = Pulse::start(dir.path());
    // ALSA reads ~/.asoundrc: route its default device through the private PulseAudio.
    std::fs::write(dir.path().join(".asoundrc"), "pcm.!default { type pulse }\nctl.!default { type pulse }\n").unwrap();
    for (k, v) in pulse.env() {
        std::env::set_var(k, v);
    }

    let model = ScriptedModel::start().await;
    let mut cfg = test_config(&model.base_url());
    cfg.audio.input = hark::config::AudioInputKind::Mic;
    let hark = Hark::start(cfg).await;
    let url = format!("ws://{}/v1/realtime?session=local", hark.addr);
    let mut c = Client::connect(&url).await;
    let created = c.seen[0].clone();
    assert_eq!(created["session"]["audio"]["input"]["format"]["rate"], 16000, "{created}");

    // Phase 1: speech into the microphone → a turn and a reply on the attached client.
    let (wav, speech_ms) = speech16(dir.path(), "turn", "what is the weather like in paris today");
    // A second reader of the same source (`parec`) marks when the sound reaches the
    // microphone: the sound server's own buffering (a null sink renders in blocks) is
    // not hark's latency.
    let reference = listen_for_sound(&pulse);
    let wav2 = wav.clone();
    let p_env = pulse.env();
    let played = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let st = Command::new("paplay").args(["-d", "vspk"]).arg(&wav2).envs(p_env).status().expect("paplay");
        assert!(st.success());
        t
    });
    let (started, t_started) = until_type(&mut c, "input_audio_buffer.speech_started").await;
    let (stopped, _) = until_type(&mut c, "input_audio_buffer.speech_stopped").await;
    let t_play = played.await.unwrap();
    let t_sound = reference.join().unwrap();
    eprintln!("phase 1 turn heard");
    let detected_ms = stopped["audio_end_ms"].as_f64().unwrap() - started["audio_start_ms"].as_f64().unwrap();
    let latency = t_started.saturating_duration_since(t_sound).as_millis() as i64 - (t_sound.saturating_duration_since(t_started).as_millis() as i64);
    eprintln!(
        "speech {speech_ms:.0} ms, detected {detected_ms:.0} ms; sound reached the source {} ms after paplay began; speech_started {latency} ms after that",
        (t_sound - t_play).as_millis()
    );
    assert!((detected_ms - speech_ms).abs() <= 150.0, "speech {speech_ms} ms, detected {detected_ms} ms");
    // Capture, resampling, VAD and the event to the client, wall clock.
    assert!(latency <= 150, "speech_started {latency} ms after the sound reached the microphone");
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Hello from the scripted model.");
    let reqs = model.wait_requests(1).await;
    let user = reqs[0]["messages"].as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap();
    assert!(user["content"][0]["input_audio"]["data"].as_str().is_some_and(|d| d.len() > 10_000), "the turn's audio reached the model");

    // Phase 2: the sound server goes away → reported; it comes back → capture reopens.
    eprintln!("phase 2: stopping the sound server");
    pulse.stop();
    let lost = c.until("error").await;
    assert!(
        matches!(lost["error"]["code"].as_str(), Some("input_device_lost" | "input_device_unavailable")),
        "{lost}"
    );
    eprintln!("loss reported: {lost}");
    pulse.restart();
    let (wav3, _) = speech16(dir.path(), "again", "set a timer for ten minutes please");
    // The capture reopens with backoff: play until a turn is heard (a few times at most).
    let heard = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let player = tokio::task::spawn_blocking({
        let (env_dir, heard) = (dir.path().to_path_buf(), heard.clone());
        move || {
            let pulse = Pulse { dir: env_dir, child: None };
            for _ in 0..6 {
                if heard.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                pulse.play(&wav3);
            }
        }
    });
    c.until("input_audio_buffer.speech_started").await;
    c.until("input_audio_buffer.speech_stopped").await;
    heard.store(true, std::sync::atomic::Ordering::Relaxed);
    let done = c.until("response.done").await;
    assert_eq!(done["response"]["status"], "completed", "{done}");
    player.await.unwrap();
}
