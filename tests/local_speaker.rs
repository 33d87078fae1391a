//! The local session speaks: a turn into the virtual microphone, the spoken reply on the
//! virtual speaker (a second null sink, recorded from its monitor), and the reply's own
//! sound looped back into the microphone (PulseAudio `module-loopback`) does not start a
//! turn: half-duplex gating (`audio.echo_cancellation: half_duplex`, the fallback to
//! AEC) keeps the assistant from interrupting itself. AEC itself: tests/local_echo.rs.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::pulse::{route_alsa_to, Pulse, Recorder};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_session_speaks_on_the_speaker_and_does_not_hear_itself() {
    let dir = tempfile::tempdir().unwrap();
    let pulse = Pulse::start(dir.path());
    route_alsa_to(&pulse);
    // The speaker's sound reaches the microphone, as in a room.
    let st = Command::new("pactl")
        .args(["load-module", "module-loopback", "source=vout.monitor", "sink=vspk", "latency_msec=20"])
        .envs(pulse.env())
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));

    let model = ScriptedModel::start().await;
    model.push(Reply::text("Sure thing, it is sunny in Paris today. Enjoy the walk."));
    let mut cfg = test_config(&model.base_url());
    cfg.audio.input = hark::config::AudioInputKind::Mic;
    cfg.audio.output = hark::config::AudioOutputKind::Speaker;
    cfg.audio.echo_cancellation = hark::config::EchoCancellation::HalfDuplex;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&format!("ws://{}/v1/realtime?session=local", hark.addr)).await;
    assert_eq!(c.seen[0]["session"]["output_modalities"][0], "audio", "{}", c.seen[0]);
    let speaker = Recorder::start(&pulse, "vout.monitor");

    let wav = speech_wav(dir.path(), "ask", "what is the weather like in paris", 0.3, 0.5);
    let p = pulse.env();
    let player = tokio::task::spawn_blocking(move || {
        let st = Command::new("paplay").args(["-d", "vspk"]).arg(&wav).envs(p).status().unwrap();
        assert!(st.success());
    });
    c.until("input_audio_buffer.speech_started").await;
    c.until("input_audio_buffer.speech_stopped").await;
    let events = c.collect_until("response.done").await;
    player.await.unwrap();
    let done = events.last().unwrap();
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let audio_ms: f64 = events
        .iter()
        .filter(|e| e["type"] == "response.output_audio.delta")
        .map(|e| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(e["delta"].as_str().unwrap()).unwrap().len() as f64 / 48.0
        })
        .sum();
    assert!(audio_ms > 2000.0, "{audio_ms} ms of speech");

    // The reply plays on the speaker in real time: wait for it, watching for a turn the
    // echo might start (there must be none).
    let deadline = Instant::now() + Duration::from_millis(audio_ms as u64 + 3000);
    let mut echo_turns = 0;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.next()).await {
            Ok(ev) if ev["type"] == "input_audio_buffer.speech_started" => echo_turns += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let played = speaker.loud_span_ms(300);
    eprintln!("reply {audio_ms:.0} ms; heard on the speaker for {played:.0} ms; turns started by the echo: {echo_turns}");
    assert!((played - audio_ms).abs() < 600.0, "speaker played {played} ms of a {audio_ms} ms reply");
    assert_eq!(echo_turns, 0, "the assistant's own voice started a turn");
    assert_eq!(model.requests().len(), 1, "no second turn");
}
