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
mod webrtc_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use webrtc_support::*;

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
    // hark's track streams (silence while nothing is spoken) for the whole call: 50 packets a second.
    let inbound = &r["inboundAudio"];
    let seconds = (r["events"].as_array().unwrap().last().unwrap()["at"].as_f64().unwrap() - r["micAt"].as_f64().unwrap()) / 1000.0;
    // (Half the nominal rate: four browsers on two loaded cores deliver late, and this
    // checks that the track streams for the whole call, not its pacing.)
    assert!(inbound["packets"].as_f64().unwrap() > 25.0 * seconds, "{inbound} over {seconds:.1} s");
    assert!(inbound["samples"].as_f64().unwrap() > 0.0, "Chromium decoded hark's Opus: {inbound}");

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

    // Camera frames: each sampled frame is an image in the context; their count follows
    // the rates over the call's own timeline (page clock, event arrival times).
    let at = |e: &Value| e["at"].as_f64().unwrap();
    // A frame sampled in silence is an item [input_text "mm:ss", input_image]; one
    // sampled while the user speaks is inside that turn's item, after its audio.
    let is_frame = |e: &Value| {
        e["type"] == "conversation.item.added"
            && e["item"]["content"].as_array().is_some_and(|c| c.len() == 2 && c[0]["type"] == "input_text" && c[1]["type"] == "input_image")
    };
    let standalone: Vec<f64> = events.iter().filter(|e| is_frame(e)).map(at).collect();
    let turn = events.iter().find(|e| e["type"] == "conversation.item.added" && e["item"]["content"][0]["type"] == "input_audio").unwrap();
    let in_turn = turn["item"]["content"].as_array().unwrap().iter().filter(|p| p["type"] == "input_image").count();
    let frames = standalone.len() + in_turn;
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
    let expected = simulate_sampler(standalone[0], end, speaking, fps_speaking as f64, fps_idle as f64);
    let minutes = (end - standalone[0]) / 60_000.0;
    let speaking_min = (speaking.1 - speaking.0) / 60_000.0;
    eprintln!(
        "camera frames sampled: {frames} over {:.1} s (expected {expected}): {in_turn} in the {:.1} s turn ({:.0}/min speaking), {} in silence ({:.0}/min idle); keyframe requests {}",
        minutes * 60.0,
        speaking_min * 60.0,
        in_turn as f64 / speaking_min,
        standalone.len(),
        standalone.len() as f64 / (minutes - speaking_min),
        stats.keyframe_requests
    );
    assert!(in_turn >= 2, "frames sampled while speaking are in the turn's item: {turn}");
    // The page closes the call at once; a frame sampled in that instant never reaches it.
    assert!((frames..=frames + 1).contains(&(stats.frames_sampled as usize)), "hark sampled {}, the page saw {frames}", stats.frames_sampled);
    // A sample waits for its keyframe; on a loaded machine a late keyframe pushes the
    // grid back, so two fewer than the ideal schedule still counts as sampling at rate.
    assert!(frames.abs_diff(expected) <= 2, "{frames} frames sampled, {expected} expected from the rates; in silence at {standalone:?}, speaking {speaking:?}");
    // Samples sit on a grid of due times; a keyframe that came late shortens the next
    // gap, never below half the fastest interval (the lead is capped at 300 ms).
    for pair in standalone.windows(2) {
        assert!(pair[1] - pair[0] >= 500.0 / fps_speaking as f64, "frames closer than the sampling grid allows: {standalone:?}");
    }
    // The frames reached the model: the response's request carries them as images,
    // each after its `mm:ss` stamp, and the user's audio turn.
    let request = &model.requests()[0];
    let parts: Vec<&Value> = request["messages"].as_array().unwrap().iter().filter_map(|m| m["content"].as_array()).flatten().collect();
    let images = parts.iter().filter(|p| p["type"] == "image_url").count();
    let stamps = parts.iter().filter(|p| p["type"] == "text" && p["text"].as_str().is_some_and(|t| t.len() == 5 && t.as_bytes()[2] == b':')).count();
    let audio = parts.iter().filter(|p| p["type"] == "input_audio").count();
    assert!(images >= 3 && images == stamps + 1, "{images} images (the page's and the frames), {stamps} stamps in the model's request");
    assert!(stamps <= frames, "never more frames than sampled");
    assert_eq!(audio, 1, "the user's turn as audio");
    assert!(parts.iter().any(|p| p["type"] == "image_url" && p["image_url"]["url"].as_str().unwrap().starts_with("data:image/jpeg;base64,")));
    eprintln!("CPU for the call: {cpu} ms over {:.1} s wall ({:.1}% of one core, hark and its test process)", wall.as_secs_f64(), cpu as f64 / wall.as_millis() as f64 * 100.0);

    // The key was spent.
    assert_eq!(r["reuse"]["status"], 401, "{r}");
    assert_eq!(r["reuse"]["body"]["error"]["code"], "invalid_api_key");
    assert!(r["reuse"]["body"]["error"]["message"].as_str().unwrap().contains("already been used"), "{r}");
    assert_eq!(metric(&hark, "hark_sessions_active").await, 0.0);
}

/// The camera in H.264 only (the page's `setCodecPreferences`): hark negotiates it,
/// depacketizes and decodes sampled IDR frames with OpenH264, and they reach the model
/// as images, as VP8 frames do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h264_camera_frames_reach_the_context() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello hark. What is on my camera?", 1.0, 2.0);
    let y4m = test_video(dir.path());
    let (model, hark) = start_hark(2, (2.0, 1.0)).await;
    let r = run_browser("openai", &hark, &wav, &y4m, dir.path(), &[("VIDEO_CODEC", "h264"), ("HOLD_MS", "7000")]);
    assert_eq!(r["status"], 201, "{r}");
    assert_eq!(r["how"], "response.done", "{r}");
    assert_eq!(r["sentVideo"]["codec"], "video/H264", "the browser sent H.264: {}", r["sentVideo"]);
    until(Duration::from_secs(10), "the call to end", || hark.state.calls.open_count() == 0).await;
    let stats = hark.state.calls.ended().pop().unwrap();
    assert_eq!(stats.video_codec, "h264", "{stats:?}");
    assert!(stats.frames_sampled >= 3, "H.264 frames sampled: {stats:?}");
    eprintln!(
        "h264: {} frames sampled over {:.1} s, {} keyframe requests (browser sent {} keyframes, {} PLIs); {:.2} ms per sampled frame (decode + RGB)",
        stats.frames_sampled,
        stats.duration.as_secs_f64(),
        stats.keyframe_requests,
        r["sentVideo"]["keyFrames"],
        r["sentVideo"]["pli"],
        stats.decode_micros as f64 / 1000.0 / stats.frames_sampled as f64
    );
    let request = &model.requests()[0];
    let images: Vec<&str> = request["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|p| p["type"] == "image_url")
        .map(|p| p["image_url"]["url"].as_str().unwrap())
        .collect();
    // The page's own image is a PNG; the camera's frames are JPEGs.
    let frames: Vec<&&str> = images.iter().filter(|u| u.starts_with("data:image/jpeg;base64,")).collect();
    assert!(frames.len() >= 2, "H.264 frames in the model's request: {} images", images.len());
    // A decoded frame, not a blank: testsrc's colour bars come through.
    use base64::Engine;
    let jpeg = base64::engine::general_purpose::STANDARD.decode(frames[0].trim_start_matches("data:image/jpeg;base64,")).unwrap();
    let img = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (432, 336), "640×480 at 70 patches");
    let saturated = img.pixels().filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 150).count();
    assert!(saturated > 1000, "the test pattern's colours: {saturated} saturated pixels");
}

/// The closing note's figures over a one-minute call at the default rates (1 fps
/// speaking, 0.2 fps idle): speech start/stop error, camera frames per minute speaking
/// and idle, CPU for the call, printed (`--nocapture`) and held to the bounds:
/// speech edges within 200 ms of the WAV's, frame rates within a quarter of the
/// configured ones. `VIDEO_CODEC=h264` in the environment measures the H.264 path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minute_call_measured() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let text = "Hello hark, I would like you to look at my camera while I talk for a while about the things on my desk, \
                the coffee cup and the notebook and the small green plant next to the window, and then tell me what you think of them";
    let wav = speech_48k(dir.path(), text, 5.0, 30.0);
    let (truth_start, truth_end) = speech_bounds_ms(&wav);
    let y4m = test_video(dir.path());
    let (_model, hark) = start_hark(4, (1.0, 0.2)).await;
    let cpu0 = process_cpu_ms();
    let t0 = Instant::now();
    // VIDEO_CODEC=h264 in the environment measures the H.264 path.
    let codec = std::env::var("VIDEO_CODEC").unwrap_or_default();
    let r = run_browser("openai", &hark, &wav, &y4m, dir.path(), &[("HOLD_MS", "60000"), ("WAIT_MS", "60000"), ("VIDEO_CODEC", &codec)]);
    let (wall, cpu) = (t0.elapsed(), process_cpu_ms() - cpu0);
    assert_eq!(r["status"], 201, "{r}");
    until(Duration::from_secs(10), "the call to end", || hark.state.calls.open_count() == 0).await;
    let stats = hark.state.calls.ended().pop().unwrap();
    let events = r["events"].as_array().unwrap();
    let at = |e: &Value| e["at"].as_f64().unwrap();
    let of = |ty: &'static str| events.iter().filter(move |e| e["type"] == ty);
    let start_err = of("input_audio_buffer.speech_started").next().unwrap()["audio_start_ms"].as_i64().unwrap() - truth_start as i64;
    let end_err = of("input_audio_buffer.speech_stopped").last().unwrap()["audio_end_ms"].as_i64().unwrap() - truth_end as i64;
    let speaking_ms: f64 = of("input_audio_buffer.speech_started").zip(of("input_audio_buffer.speech_stopped")).map(|(a, b)| at(b) - at(a)).sum();
    let call_ms = at(events.last().unwrap()) - r["micAt"].as_f64().unwrap();
    let mut in_turns = 0;
    let mut standalone = 0;
    for e in of("conversation.item.added") {
        let c = e["item"]["content"].as_array().unwrap();
        let images = c.iter().filter(|p| p["type"] == "input_image").count();
        if c.first().is_some_and(|p| p["type"] == "input_audio") {
            in_turns += images;
        } else if c.len() == 2 && c[0]["type"] == "input_text" && c[1]["type"] == "input_image" {
            standalone += images;
        }
    }
    eprintln!("MEASURED speech in the WAV {truth_start}..{truth_end} ms; speech_started error {start_err} ms, speech_stopped error {end_err} ms (last turn); {} turns", of("input_audio_buffer.speech_started").count());
    eprintln!(
        "MEASURED camera ({}): {} frames over {:.1} s; speaking {:.1} s → {in_turns} frames ({:.1}/min), idle {:.1} s → {standalone} frames ({:.1}/min); {} keyframe requests; {:.2} ms per sampled frame (decode + RGB)",
        stats.video_codec,
        stats.frames_sampled,
        call_ms / 1000.0,
        speaking_ms / 1000.0,
        in_turns as f64 / (speaking_ms / 60_000.0),
        (call_ms - speaking_ms) / 1000.0,
        standalone as f64 / ((call_ms - speaking_ms) / 60_000.0),
        stats.keyframe_requests,
        stats.decode_micros as f64 / 1000.0 / stats.frames_sampled.max(1) as f64
    );
    eprintln!(
        "MEASURED CPU: {cpu} ms over {:.1} s wall = {:.1}% of one core for one call with mic + camera (hark and the test process; Chromium not counted)",
        wall.as_secs_f64(),
        cpu as f64 / wall.as_millis() as f64 * 100.0
    );
    assert!(start_err.abs() <= 200 && end_err.abs() <= 200, "speech edges off by {start_err} / {end_err} ms");
    let per_min = |frames: usize, ms: f64| frames as f64 / (ms / 60_000.0);
    let (speaking_rate, idle_rate) = (per_min(in_turns, speaking_ms), per_min(standalone, call_ms - speaking_ms));
    assert!((45.0..=75.0).contains(&speaking_rate), "{speaking_rate:.1} frames/min while speaking, configured 60");
    assert!((9.0..=15.0).contains(&idle_rate), "{idle_rate:.1} frames/min idle, configured 12");
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

/// A session that asks for spoken answers hears them on hark's Opus track: the page's
/// received audio carries energy (silence carries none), the transcript arrives on the
/// data channel, and the audio itself does not (as in OpenAI's WebRTC flow).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spoken_answer_plays_on_the_track() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello hark. Say something please.", 1.0, 2.0);
    let y4m = test_video(dir.path());
    let (_model, hark) = start_hark(2, (0.5, 0.2)).await;
    let r = run_browser("openai", &hark, &wav, &y4m, dir.path(), &[("AUDIO_OUT", "1"), ("UNTIL", "output_audio_buffer.stopped")]);
    assert_eq!(r["how"], "output_audio_buffer.stopped", "the page saw no output_audio_buffer.stopped: {r}");
    let events = r["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"response.output_audio_transcript.delta"), "{types:?}");
    assert!(!types.contains(&"response.output_audio.delta"), "audio belongs on the track: {types:?}");
    let energy = r["inboundAudio"]["energy"].as_f64().unwrap_or(0.0);
    eprintln!("received audio energy {energy}");
    assert!(energy > 1e-3, "hark's track carried no speech: {}", r["inboundAudio"]);
    // Playback, as OpenAI reports it on WebRTC: started when the answer's audio goes
    // out on the track, stopped once all of it has, after response.done.
    let response_id = events.iter().find(|e| e["type"] == "response.done").unwrap()["response"]["id"].as_str().unwrap();
    let pos = |ty: &str| types.iter().position(|t| *t == ty).unwrap_or_else(|| panic!("no {ty}: {types:?}"));
    for ty in ["output_audio_buffer.started", "output_audio_buffer.stopped"] {
        let e = &events[pos(ty)];
        assert_eq!(e["response_id"], response_id, "{e}");
        assert!(e["event_id"].as_str().is_some_and(|id| !id.is_empty()), "{e}");
    }
    assert!(pos("response.content_part.added") < pos("output_audio_buffer.started"));
    assert!(pos("response.done") < pos("output_audio_buffer.stopped"), "stopped comes once all audio went out: {types:?}");
    assert!(!types.contains(&"output_audio_buffer.cleared"), "{types:?}");
    let started = events[pos("output_audio_buffer.started")]["at"].as_f64().unwrap();
    let stopped = events[pos("output_audio_buffer.stopped")]["at"].as_f64().unwrap();
    eprintln!("the answer played for {:.0} ms on the track (started → stopped)", stopped - started);
    assert!(stopped - started > 300.0, "the spoken answer takes time to play out");
}

/// The page's `output_audio_buffer.clear` (sent as soon as the answer starts playing)
/// cuts the answer off: `output_audio_buffer.cleared` for that response, no `stopped`,
/// and no error (over a WebSocket the same event is refused: webrtc_signaling.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clearing_the_output_audio_buffer_cuts_the_answer_off() {
    tools_present();
    let dir = tempfile::tempdir().unwrap();
    let wav = speech_48k(dir.path(), "Hello hark. Say something please.", 1.0, 2.0);
    let y4m = test_video(dir.path());
    let (_model, hark) = start_hark(2, (0.5, 0.2)).await;
    let r = run_browser("openai", &hark, &wav, &y4m, dir.path(), &[("AUDIO_OUT", "1"), ("CLEAR_ON_START", "1"), ("UNTIL", "output_audio_buffer.cleared")]);
    assert_eq!(r["how"], "output_audio_buffer.cleared", "the page saw no output_audio_buffer.cleared: {r}");
    let events = r["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let response_id = events.iter().find(|e| e["type"] == "response.done").unwrap()["response"]["id"].as_str().unwrap();
    let pos = |ty: &str| types.iter().position(|t| *t == ty).unwrap_or_else(|| panic!("no {ty}: {types:?}"));
    assert!(pos("output_audio_buffer.started") < pos("output_audio_buffer.cleared"), "{types:?}");
    assert_eq!(events[pos("output_audio_buffer.cleared")]["response_id"], response_id);
    assert!(!types.contains(&"output_audio_buffer.stopped"), "a cleared answer never stops normally: {types:?}");
    assert!(!types.contains(&"error"), "{:?}", events.iter().filter(|e| e["type"] == "error").collect::<Vec<_>>());
    let at = |ty: &str| events[pos(ty)]["at"].as_f64().unwrap();
    eprintln!("cleared {:.0} ms after the answer started playing", at("output_audio_buffer.cleared") - at("output_audio_buffer.started"));
}
