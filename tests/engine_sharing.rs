//! One embedded model shared by many sessions, on a random-weight tiny checkpoint of
//! the real layout (real safetensors, real loader): a listener that never reads holds
//! nobody up, sessions keep their own caches, work is interleaved, and a cancel stops
//! a long prefill within a chunk.

use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use candle_core::{DType, Device};
use hark::model::embedded::{EmbeddedBackend, Engine};
use hark::model::engine::Reuse;
use hark::model::gemma4::init::{write_random_checkpoint, Preset};
use hark::model::{Backend, BackendEvent, ChatMessage, FinishReason, GenerateRequest, TokenUsage, UserPart};
use tokio_util::sync::CancellationToken;

fn tiny_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_checkpoint(Preset::Tiny, dir.path(), false, 5, |_, _| {}).unwrap();
    dir
}

fn engine_with(dir: &std::path::Path, max_tokens: u32, cached_sessions: usize, kv_budget_mb: usize) -> Engine {
    let mut settings = common::engine_settings(dir, max_tokens, cached_sessions);
    settings.kv_budget_mb = kv_budget_mb;
    Engine::load(&settings, &Device::Cpu, DType::F32).unwrap()
}

fn user(t: &str) -> ChatMessage {
    ChatMessage::User(vec![UserPart::Text(t.into())])
}

fn said(t: &str) -> ChatMessage {
    ChatMessage::Assistant { text: t.into(), tool_calls: vec![] }
}

const SYSTEM: &str = "You are hark, a helpful voice assistant shared by everyone in this house. Answer briefly.";

fn ask(key: Option<u64>, messages: Vec<ChatMessage>, max: u32) -> GenerateRequest {
    GenerateRequest { instructions: SYSTEM.into(), messages, max_output_tokens: Some(max), cache_key: key, ..Default::default() }
}

/// Runs a request alone; returns its text and usage.
fn run(engine: &mut Engine, req: &GenerateRequest) -> (String, FinishReason, TokenUsage) {
    let out = std::cell::RefCell::new(String::new());
    let (finish, usage) = engine
        .generate(req, &CancellationToken::new(), &|ev| {
            if let BackendEvent::TextDelta(t) = ev {
                out.borrow_mut().push_str(&t);
            }
            true
        })
        .unwrap();
    (out.into_inner(), finish, usage)
}

/// A sink that records `(tag, event)` in a shared log, in the order the engine emits.
type Log = Arc<Mutex<Vec<(char, BackendEvent)>>>;
fn logging(log: &Log, tag: char) -> Box<dyn FnMut(BackendEvent) -> bool + Send> {
    let log = log.clone();
    Box::new(move |ev| {
        log.lock().unwrap().push((tag, ev));
        true
    })
}

fn position(log: &Log, pred: impl Fn(&(char, BackendEvent)) -> bool) -> Option<usize> {
    log.lock().unwrap().iter().position(pred)
}

fn done_of(log: &Log, tag: char) -> Option<(usize, FinishReason, TokenUsage)> {
    log.lock().unwrap().iter().enumerate().find_map(|(i, (t, ev))| match ev {
        BackendEvent::Done { finish, usage } if *t == tag => Some((i, *finish, usage.unwrap_or_default())),
        _ => None,
    })
}

#[test]
fn a_sessions_cache_survives_another_session_speaking() {
    let ckpt = tiny_checkpoint();
    // With cache keys (sessions) and without (each request owns nothing): either way
    // B's turn must not cut A's cache down to the shared system prompt.
    for (a, b) in [(Some(1), Some(2)), (None, None)] {
        let mut engine = engine_with(ckpt.path(), 4, 4, 1024);
        let first = ask(a, vec![user("what is the weather like today in the garden?")], 4);
        let (reply, _, u1) = run(&mut engine, &first);
        let (_, _, ub) = run(&mut engine, &ask(b, vec![user("play some music in the kitchen please")], 4));
        // B shared the system turn with A: a fork of A's prefix, not a fresh prefill.
        assert!(ub.cached_input_tokens > 0, "{ub:?}");
        assert_eq!(engine.last_reuse, Some(Reuse::Forked));
        let second = ask(a, vec![user("what is the weather like today in the garden?"), said(&reply), user("and tomorrow?")], 4);
        let (again, _, u2) = run(&mut engine, &second);
        assert!(u2.cached_input_tokens >= u1.input_tokens, "A's second turn reused {u2:?} of a {u1:?} history");
        assert_eq!(engine.last_reuse, Some(Reuse::Continued));

        // The reused cache answers as a fresh prefill would (greedy).
        let mut cold = engine_with(ckpt.path(), 4, 4, 1024);
        assert_eq!(run(&mut cold, &first).0, reply);
        cold.clear_caches();
        let (fresh, _, uc) = run(&mut cold, &second);
        assert_eq!(uc.cached_input_tokens, 0);
        assert_eq!(again, fresh);
    }
}

#[test]
fn the_kv_pool_stays_within_its_budget_over_fifty_sessions() {
    let ckpt = tiny_checkpoint();
    let mut engine = engine_with(ckpt.path(), 3, 64, 1);
    let budget = engine.kv_budget();
    assert_eq!(budget, 1 << 20);
    let history = |i: u64| vec![user(&format!("session {i} says: tell me a long story about the number {} and its friends", i * 13))];
    let mut replies = Vec::new();
    let mut evicted_some = false;
    for i in 0..50u64 {
        let (reply, _, _) = run(&mut engine, &ask(Some(i), history(i), 3));
        assert!(engine.pool_bytes() <= budget, "after session {i} spoke: {} > {budget}", engine.pool_bytes());
        replies.push(reply);
        // The previous session speaks again: the budget holds at least two sessions,
        // so its cache is still there.
        if i > 0 {
            let p = i - 1;
            let mut msgs = history(p);
            msgs.push(said(&replies[p as usize]));
            msgs.push(user("go on"));
            let first_len = engine.prompt(&ask(Some(p), history(p), 3), true).unwrap().tokens.len();
            let (_, _, u) = run(&mut engine, &ask(Some(p), msgs, 3));
            assert!(u.cached_input_tokens as usize >= first_len, "session {p}: {u:?} of {first_len}");
            assert!(engine.pool_bytes() <= budget, "after session {p} spoke again: {} > {budget}", engine.pool_bytes());
        }
        evicted_some |= (0..i).any(|old| engine.cached_lengths_of(old).is_empty());
    }
    // The budget, not the count (64), is what bounded the pool.
    assert!(evicted_some);
    assert!(engine.cached_lengths().len() < 50);
}

#[test]
fn a_short_request_answers_before_a_long_one_finishes() {
    let ckpt = tiny_checkpoint();
    for fifo in [false, true] {
        let mut engine = engine_with(ckpt.path(), 200, 4, 1024);
        engine.set_fifo(fifo);
        let log: Log = Arc::default();
        engine.submit(ask(Some(1), vec![user("tell me everything you know about tides")], 200), CancellationToken::new(), logging(&log, 'L'));
        // The long answer is under way...
        while position(&log, |(t, _)| *t == 'L').is_none() {
            assert!(engine.step());
        }
        // ...when a short question arrives.
        engine.submit(ask(Some(2), vec![user("what time is it?")], 3), CancellationToken::new(), logging(&log, 'S'));
        while engine.step() {}
        let (l_done, _, lu) = done_of(&log, 'L').unwrap();
        let (s_done, _, su) = done_of(&log, 'S').unwrap();
        assert!(lu.output_tokens > su.output_tokens + 10, "the long answer must be long: {lu:?}");
        let s_first = position(&log, |(t, _)| *t == 'S').unwrap();
        if fifo {
            // One at a time (the old engine): the short answer waits for the long one.
            assert!(s_first > l_done);
        } else {
            assert!(s_done < l_done, "the short answer finished at event {s_done}, the long one at {l_done}");
            let l_after = log.lock().unwrap()[s_done..].iter().filter(|(t, e)| *t == 'L' && matches!(e, BackendEvent::TextDelta(_))).count();
            assert!(l_after > 0, "the long answer went on after the short one");
        }
    }
}

#[test]
fn cancelling_a_long_prefill_stops_within_one_chunk() {
    let ckpt = tiny_checkpoint();
    let mut engine = engine_with(ckpt.path(), 4, 4, 1024);
    let long: Vec<ChatMessage> = (0..60)
        .flat_map(|i| [user(&format!("question {i}: what do you think about the number {} and the weather?", i * 7)), said(&format!("the number {} is fine, {i}", i * 7))])
        .chain([user("so?")])
        .collect();
    let req = ask(Some(1), long, 4);
    let tokens = engine.prompt(&req, true).unwrap().tokens.len();
    assert!(tokens > 3000, "{tokens}");
    let log: Log = Arc::default();
    let cancel = CancellationToken::new();
    engine.submit(req.clone(), cancel.clone(), logging(&log, 'X'));
    assert!(engine.step());
    assert!(engine.step());
    assert_eq!(engine.stats.prefill_chunks, 2);
    cancel.cancel();
    assert!(engine.step());
    let (_, finish, usage) = done_of(&log, 'X').expect("the cancel was answered at the next step");
    assert_eq!(finish, FinishReason::Cancelled);
    assert_eq!(usage.output_tokens, 0);
    assert_eq!(engine.stats.prefill_chunks, 2, "no chunk ran after the cancel");
    assert!(!engine.step(), "nothing left to do");
    // What was prefilled is kept for the next request.
    let (_, _, u) = run(&mut engine, &req);
    assert_eq!(u.cached_input_tokens as usize, 2 * hark::model::engine::PREFILL_CHUNK);
}

#[test]
fn streamed_audio_goes_before_a_running_generation() {
    let ckpt = tiny_checkpoint();
    let mut engine = engine_with(ckpt.path(), 100, 4, 1024);
    let log: Log = Arc::default();
    engine.submit(ask(Some(1), vec![user("tell me everything you know about tides")], 100), CancellationToken::new(), logging(&log, 'L'));
    assert!(engine.step());
    let (tx, mut signals) = tokio::sync::mpsc::unbounded_channel();
    engine.admit(hark::model::engine::scheduler::Job::OpenTurn { stream: 9, base: ask(Some(2), vec![], 1), signals: tx });
    engine.admit(hark::model::engine::scheduler::Job::Turn {
        stream: 9,
        command: hark::model::TurnCommand::Audio((0..3200).map(|i| (i as f32 * 0.05).sin() * 0.2).collect()),
    });
    let before = engine.stats;
    // The turn's base context, then its five frames, before any other decode step.
    while signals.try_recv().is_err() {
        assert!(engine.step());
    }
    assert!(engine.stats.turn_steps > before.turn_steps);
    assert_eq!(engine.stats.decode_steps, before.decode_steps, "the generation waited for the speaking user");
    assert_eq!(done_of(&log, 'L'), None);
}

#[test]
fn a_listener_that_never_reads_holds_nobody_up() {
    let ckpt = tiny_checkpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = EmbeddedBackend::start(common::engine_settings(ckpt.path(), 400, 4)).unwrap();
    rt.block_on(async {
        // A asks for a long answer and never reads it.
        let unread = backend.generate(ask(Some(1), vec![user("tell me everything you know about tides")], 400), CancellationToken::new());
        let mut b = backend.generate(ask(Some(2), vec![user("what time is it?")], 8), CancellationToken::new());
        let done = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(ev) = b.recv().await {
                if let BackendEvent::Done { finish, .. } = ev {
                    return Some(finish);
                }
            }
            None
        })
        .await
        .expect("B's answer came while A's stream sat unread");
        assert!(done.is_some());
        // A is still held, unread, and its answer is delivered whole when read.
        let mut a = unread;
        let mut deltas = 0;
        let finish = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(ev) = a.recv().await {
                match ev {
                    BackendEvent::TextDelta(_) => deltas += 1,
                    BackendEvent::Done { finish, .. } => return Some(finish),
                    _ => {}
                }
            }
            None
        })
        .await
        .unwrap();
        assert!(finish.is_some());
        assert!(deltas > 0);
    });
}

#[test]
fn an_unread_answer_fills_no_bounded_queue_and_a_dropped_one_stops() {
    let ckpt = tiny_checkpoint();
    let mut engine = engine_with(ckpt.path(), 400, 4, 1024);
    // The backend's own channel: run the whole answer with nobody reading. Were any
    // send blocking, this loop would never end.
    let (sink, rx) = hark::model::embedded::event_channel(400);
    engine.submit(ask(Some(1), vec![user("tell me everything you know about tides")], 400), CancellationToken::new(), sink);
    while engine.step() {}
    let (_, u) = {
        let mut rx = rx;
        let mut n = 0;
        let mut last = None;
        while let Ok(ev) = rx.try_recv() {
            n += 1;
            last = Some(ev);
        }
        assert!(n > 256, "more events than the old 256-slot channel held: {n}");
        match last {
            Some(BackendEvent::Done { usage, .. }) => (n, usage.unwrap()),
            other => panic!("the stream ends with Done, not {other:?}"),
        }
    };
    assert!(u.output_tokens > 256, "{u:?}");

    // A listener that goes away stops its generation at the next token.
    let steps = engine.stats.decode_steps;
    let (sink, rx) = hark::model::embedded::event_channel(400);
    drop(rx);
    engine.submit(ask(Some(2), vec![user("tell me everything you know about tides")], 400), CancellationToken::new(), sink);
    while engine.step() {}
    assert!(engine.stats.decode_steps - steps <= 1, "{} decode steps for nobody", engine.stats.decode_steps - steps);
}

#[test]
fn sequences_decoded_together_give_the_tokens_each_gives_alone() {
    let ckpt = tiny_checkpoint();
    let questions = ["tell me about tides", "what is the capital of the moon and why is it there", "count to ten"];
    let requests: Vec<GenerateRequest> =
        questions.iter().enumerate().map(|(i, q)| ask(Some(i as u64), vec![user(q)], 24)).collect();
    let alone: Vec<(String, TokenUsage)> = requests
        .iter()
        .map(|r| {
            let mut e = engine_with(ckpt.path(), 24, 4, 1024);
            let (text, _, usage) = run(&mut e, r);
            (text, usage)
        })
        .collect();

    let mut engine = engine_with(ckpt.path(), 24, 4, 1024);
    let log: Log = Arc::default();
    let tags = ['a', 'b', 'c'];
    for (r, &tag) in requests.iter().zip(&tags) {
        engine.submit(r.clone(), CancellationToken::new(), logging(&log, tag));
    }
    while engine.step() {}
    assert!(engine.stats.decode_batches > 0, "the sequences were decoded in batches");
    for (i, &tag) in tags.iter().enumerate() {
        let text: String = log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(t, ev)| match ev {
                BackendEvent::TextDelta(d) if *t == tag => Some(d.clone()),
                _ => None,
            })
            .collect();
        let (_, _, usage) = done_of(&log, tag).unwrap();
        assert_eq!((&text, usage.output_tokens), (&alone[i].0, alone[i].1.output_tokens), "sequence {tag}");
    }
}

#[test]
fn a_batched_forward_gives_each_sequence_its_own_logits() {
    use hark::model::gemma4::ForwardInput;
    let ckpt = tiny_checkpoint();
    let engine = engine_with(ckpt.path(), 1, 4, 1024);
    let model = engine.model();
    // Three sequences at different lengths (different positions and cache sizes; one
    // past the sliding window of 64).
    let prompts: Vec<Vec<u32>> = [5usize, 30, 90].iter().map(|&n| (0..n as u32).map(|i| 300 + (i * 37) % 5000).collect()).collect();
    let prefilled = |p: &Vec<u32>| {
        let mut c = model.new_cache();
        model.forward(&ForwardInput { tokens: p, ..Default::default() }, &mut c).unwrap();
        c
    };
    let mut alone: Vec<_> = prompts.iter().map(prefilled).collect();
    let mut together: Vec<_> = prompts.iter().map(prefilled).collect();
    for step in 0..3u32 {
        let tokens: Vec<u32> = (0..3).map(|i| 700 + 11 * step + i).collect();
        let singles: Vec<Vec<f32>> = alone
            .iter_mut()
            .zip(&tokens)
            .map(|(c, &t)| model.forward(&ForwardInput { tokens: &[t], ..Default::default() }, c).unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let mut refs: Vec<_> = together.iter_mut().collect();
        let batched = model.forward_batch(&tokens, &mut refs).unwrap();
        assert_eq!(batched.dims(), &[3, singles[0].len()]);
        for (i, single) in singles.iter().enumerate() {
            let row: Vec<f32> = batched.get(i).unwrap().to_vec1().unwrap();
            let scale = single.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            let diff = row.iter().zip(single).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // Not bit for bit (the batch's matrix product rounds differently), but
            // within float rounding and to the same greedy token.
            assert!(diff <= 1e-5 * scale, "step {step}, sequence {i}: {diff} of {scale}");
            let argmax = |v: &[f32]| hark::model::gemma4::sampling::argmax(v);
            assert_eq!(argmax(&row), argmax(single), "step {step}, sequence {i}");
        }
    }
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(a.seq_len(), t.seq_len());
    }
}

/// `server.max_sessions: auto` on the embedded model admits as many sessions as the KV
/// budget keeps cached at 8K tokens of context, and refuses the next one with a message
/// naming the limit; a slot freed by a session that ended is taken by the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_budget_sets_how_many_sessions_are_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::embedded_test_config(dir.path());
    let text = hark::model::gemma4::Gemma4Config::from_file(&dir.path().join("config.json")).unwrap().text;
    let (fixed, per_token) = hark::check::kv_cost(&text, 4);
    let two_sessions = 2 * (fixed + per_token * 8192);
    cfg.backend.embedded.kv_budget_mb = two_sessions.div_ceil(1 << 20);
    cfg.server.max_sessions = None;
    assert_eq!(hark::check::max_sessions(&cfg).0, 2, "the budget was meant to fit two sessions");

    let hark = common::Hark::start(cfg).await;
    let url = hark.ws_url();
    let first = common::Client::connect(&url).await;
    let _second = common::Client::connect(&url).await;
    let (status, body) = common::Client::refused(&url, &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "too_many_sessions", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("limit of 2 sessions"), "{body}");

    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok(_) => break,
            Err(e) => assert!(std::time::Instant::now() < deadline, "the ended session's slot was never freed: {e}"),
        }
        tokio::task::yield_now().await;
    }
}
