//! Teardown, in a process of its own so that its memory figures are its own: 45 calls
//! from a real browser (headless Chromium, see `webrtc_browser.rs`) opened and closed;
//! every session, call and socket goes away and RSS stays flat.

mod common;
mod webrtc_support;

use std::time::Duration;

use webrtc_support::*;

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

