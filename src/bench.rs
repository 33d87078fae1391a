//! `hark bench …`: measurements that print tables (never timed assertions in tests).

pub mod load;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{Config, VadKind};
use crate::media::codec::encode_pcm16;
use crate::media::vad::SileroModel;
use crate::media::{AudioFormat, AudioPipeline};
use crate::session::VadFactory;

/// 20 ms of 24 kHz audio: what Realtime clients typically append at a time.
const CHUNK_SAMPLES: usize = 480;

/// A speech-like test signal: 1.2 s of harmonic bursts with syllable-rate amplitude
/// modulation, then 0.8 s of low noise, repeated. Deterministic.
pub fn test_signal(rate: u32, seconds: u32) -> Vec<f32> {
    let n = (rate * seconds) as usize;
    let mut rng = fastrand::Rng::with_seed(7);
    (0..n)
        .map(|i| {
            let t = i as f32 / rate as f32;
            let cycle = t % 2.0;
            let noise = (rng.f32() - 0.5) * 0.002;
            if cycle < 1.2 {
                let env = (std::f32::consts::PI * 4.0 * t).sin().abs();
                let f0 = 140.0 + 20.0 * (t * 3.0).sin();
                let voiced: f32 = (1..8).map(|h| (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin() / h as f32).sum();
                0.25 * env * voiced + noise
            } else {
                noise
            }
        })
        .collect()
}

fn process_cpu_seconds() -> f64 {
    // utime and stime are fields 14 and 15 of /proc/self/stat, in clock ticks (100 Hz on Linux).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

struct Row {
    streams: usize,
    paced: bool,
    frames_per_s: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_stream: f64,
    rt_factor: f64,
}

/// Runs `streams` 24 kHz streams through decode → resample → VAD → chunking.
pub fn pipeline(config: &Config, stream_counts: &[usize], seconds: u32, realtime: bool) -> anyhow::Result<()> {
    let factory = match config.audio.vad {
        VadKind::Silero => VadFactory::Silero(
            SileroModel::load(&config.onnxruntime_library(), &config.resolve(&config.audio.silero_model)).context("loading Silero VAD")?,
        ),
        VadKind::Energy => VadFactory::Energy,
    };
    let signal = Arc::new(encode_pcm16(&test_signal(24_000, seconds)));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("hark bench pipeline: 24 kHz pcm16 → rubato 16 kHz → {:?} VAD → 640-sample frames", config.audio.vad);
    println!("{seconds} s of audio per stream, appended in 20 ms chunks; {cores} CPU cores\n");
    let mut rows = Vec::new();
    for &n in stream_counts {
        if realtime {
            rows.push(run_once(&factory, &signal, n, true)?);
        }
        rows.push(run_once(&factory, &signal, n, false)?);
    }
    println!(
        "| streams | pacing    | model frames/s | p50 per 20 ms chunk | p99 per 20 ms chunk | CPU per stream (% of a core) | x real time |"
    );
    println!("|--------:|-----------|---------------:|--------------------:|--------------------:|-----------------------------:|------------:|");
    for r in rows {
        println!(
            "| {:>7} | {:<9} | {:>14.0} | {:>16.1} µs | {:>16.1} µs | {:>27.2}% | {:>11.1} |",
            r.streams,
            if r.paced { "real time" } else { "flat out" },
            r.frames_per_s,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.cpu_per_stream * 100.0,
            r.rt_factor,
        );
    }
    Ok(())
}

fn run_once(factory: &VadFactory, signal: &Arc<Vec<u8>>, streams: usize, paced: bool) -> anyhow::Result<Row> {
    let audio_seconds = signal.len() as f64 / 2.0 / 24_000.0;
    // Detectors are made before the clock starts: session setup is not the pipeline.
    let detectors = (0..streams).map(|_| factory.make()).collect::<Result<Vec<_>, _>>()?;
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for (s, vad) in detectors.into_iter().enumerate() {
        let signal = signal.clone();
        handles.push(std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, usize)> {
            let mut p = AudioPipeline::new(AudioFormat::Pcm16 { rate: 24_000 }, Some(vad))?;
            let mut lat = Vec::with_capacity(signal.len() / (CHUNK_SAMPLES * 2) + 1);
            let mut frames = 0;
            // Stagger starts so paced streams don't all wake at once.
            let start = Instant::now() + Duration::from_micros((s as u64 * 20_000 / streams.max(1) as u64) % 20_000);
            for (i, chunk) in signal.chunks(CHUNK_SAMPLES * 2).enumerate() {
                if paced {
                    let due = start + Duration::from_millis(20 * i as u64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                let t = Instant::now();
                let out = p.push_bytes(chunk)?;
                lat.push(t.elapsed());
                frames += out.frames.len();
            }
            Ok((lat, frames))
        }));
    }
    let mut all = Vec::new();
    let mut frames = 0;
    for h in handles {
        let (lat, f) = h.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
        all.extend(lat);
        frames += f;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu0;
    all.sort_unstable();
    Ok(Row {
        streams,
        paced,
        frames_per_s: frames as f64 / wall,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        cpu_per_stream: cpu / wall / streams as f64,
        rt_factor: audio_seconds * streams as f64 / wall,
    })
}

/// What `hark bench model` measures; see `hark bench model --help`.
pub struct ModelBench {
    pub presets: Vec<String>,
    pub dtypes: Vec<String>,
    pub device: String,
    /// Prompt lengths for the prefill rows.
    pub prompts: Vec<usize>,
    /// Tokens per prefill call (what the engine's scheduler uses); 0 = the whole prompt at once.
    pub chunk: usize,
    /// Tokens decoded per measurement.
    pub decode: usize,
    /// Sequences decoded together (1 = the single-sequence path).
    pub batches: Vec<usize>,
    /// Context sizes for the streaming rows (audio frame cost, end of speech → first token).
    pub contexts: Vec<usize>,
    /// Split a batch-1 decode step into weight reads, host time and the rest.
    pub profile: bool,
    /// Also write every number as JSON here (for `scripts/bench-gpu`).
    pub json: Option<std::path::PathBuf>,
}

fn sync(dev: &candle_core::Device) -> anyhow::Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// `hark bench model`: prefill, decode (batched too) and streaming-turn costs of the
/// embedded model on random-weight presets built directly on the device.
pub fn model(b: &ModelBench) -> anyhow::Result<()> {
    use crate::model::embedded::{select_device, select_dtype};
    use crate::model::gemma4::init::{random_model, Preset};
    use crate::model::gemma4::{audio_frames, ForwardInput, KvCache};
    use candle_core::{Tensor, D};

    let dev = select_device(&b.device)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk_text = if b.chunk == 0 { "in one call".to_string() } else { format!("in chunks of {}", b.chunk) };
    println!(
        "hark bench model: random-weight presets on {} ({cores} cores); prefill {chunk_text}; decode {} tokens per sequence, \
         greedy on the device, after a {}-token prompt\n",
        b.device,
        b.decode,
        b.prompts.first().copied().unwrap_or(512)
    );
    let mut json_rows = Vec::new();
    for name in &b.presets {
        let preset = Preset::parse(name).ok_or_else(|| anyhow::anyhow!("unknown preset {name}; use tiny, small or 12b"))?;
        anyhow::ensure!(preset != Preset::Gemma12B || b.device != "cpu", "the 12b preset is not benchmarked on CPU");
        for dt in &b.dtypes {
            let dtype = select_dtype(dt)?;
            let t0 = Instant::now();
            let model = random_model(preset, dtype, &dev)?;
            sync(&dev)?;
            let built = t0.elapsed().as_secs_f64();
            let bytes: usize = model.weight_matrices().iter().map(|w| w.elem_count() * w.dtype().size_in_bytes()).sum();
            println!("### {name} {dt}: {:.2} GB of matrices read per decode step (built in {built:.1} s)\n", bytes as f64 / 1e9);
            let prompt = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| 300 + (i * 7919) % 5000).collect() };
            let prefill = |cache: &mut KvCache, tokens: &[u32]| -> anyhow::Result<Tensor> {
                let step = if b.chunk == 0 { tokens.len() } else { b.chunk };
                let mut last = None;
                for part in tokens.chunks(step.max(1)) {
                    last = Some(model.forward(&ForwardInput { tokens: part, ..Default::default() }, cache)?);
                }
                last.ok_or_else(|| anyhow::anyhow!("empty prompt"))
            };
            let argmax = |logits: &Tensor| -> anyhow::Result<Vec<u32>> { Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?) };
            // Warm-up: kernels load, cuBLAS picks its algorithms, memory pools fill.
            let mut warm = model.new_cache();
            argmax(&prefill(&mut warm, &prompt(64))?)?;
            drop(warm);

            println!("| prefill tokens | ms | tok/s |");
            println!("|--:|--:|--:|");
            for &p in &b.prompts {
                let mut cache = model.new_cache();
                sync(&dev)?;
                let t = Instant::now();
                argmax(&prefill(&mut cache, &prompt(p))?)?;
                let s = t.elapsed().as_secs_f64();
                println!("| {p} | {:.1} | {:.0} |", s * 1e3, p as f64 / s);
                json_rows.push(serde_json::json!({"preset": name, "dtype": dt, "what": "prefill", "tokens": p, "tok_s": p as f64 / s}));
            }

            println!("\n| decode batch | ms/step | tok/s per sequence | tok/s aggregate |");
            println!("|--:|--:|--:|--:|");
            let base = b.prompts.first().copied().unwrap_or(512);
            for &batch in &b.batches {
                let mut caches: Vec<KvCache> = Vec::with_capacity(batch);
                let mut next = Vec::with_capacity(batch);
                for i in 0..batch {
                    let mut c = model.new_cache();
                    let mut toks = prompt(base);
                    toks[0] += i as u32; // distinct sequences
                    next.push(argmax(&prefill(&mut c, &toks)?)?[0]);
                    caches.push(c);
                }
                sync(&dev)?;
                let t = Instant::now();
                for _ in 0..b.decode {
                    let logits = if batch == 1 {
                        model.forward(&ForwardInput { tokens: &next, ..Default::default() }, &mut caches[0])?
                    } else {
                        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                        model.forward_batch(&next, &mut refs)?
                    };
                    next = argmax(&logits)?;
                }
                let s = t.elapsed().as_secs_f64() / b.decode as f64;
                println!("| {batch} | {:.2} | {:.1} | {:.1} |", s * 1e3, 1.0 / s, batch as f64 / s);
                json_rows.push(serde_json::json!({"preset": name, "dtype": dt, "what": "decode", "batch": batch, "tok_s": batch as f64 / s, "ms_step": s * 1e3}));
            }

            if b.profile {
                // A batch-1 decode step, taken apart: (a) the whole step with the
                // device-side argmax read back; (b) the host's time to issue it (the step
                // is asynchronous on a GPU: if issuing takes as long as the step, kernel
                // launches, not the GPU, set the pace); (c) the matrices alone, one
                // product each with a one-row input: the weight-read floor.
                let mut cache = model.new_cache();
                let mut next = argmax(&prefill(&mut cache, &prompt(base))?)?;
                let steps = b.decode.max(8);
                let (mut whole, mut issue) = (0.0, 0.0);
                for _ in 0..steps {
                    sync(&dev)?;
                    let t = Instant::now();
                    let logits = model.forward(&ForwardInput { tokens: &next, ..Default::default() }, &mut cache)?;
                    issue += t.elapsed().as_secs_f64();
                    next = argmax(&logits)?;
                    whole += t.elapsed().as_secs_f64();
                }
                let x: Vec<Tensor> = model
                    .weight_matrices()
                    .iter()
                    .map(|w| Tensor::ones((1, w.dim(1)?), dtype, &dev))
                    .collect::<candle_core::Result<_>>()?;
                let ws = model.weight_matrices();
                let mut weights = 0.0;
                for _ in 0..steps {
                    sync(&dev)?;
                    let t = Instant::now();
                    for (w, x) in ws.iter().zip(&x) {
                        let _ = x.matmul(&w.t()?)?;
                    }
                    sync(&dev)?;
                    weights += t.elapsed().as_secs_f64();
                }
                let (whole, issue, weights) = (whole / steps as f64, issue / steps as f64, weights / steps as f64);
                println!("\n| batch-1 decode step | ms | share |");
                println!("|--|--:|--:|");
                println!("| whole step (forward + argmax read back) | {:.2} | 100% |", whole * 1e3);
                println!("| host time issuing the forward | {:.2} | {:.0}% |", issue * 1e3, issue / whole * 100.0);
                println!(
                    "| matrices alone ({} products, {:.0} GB/s) | {:.2} | {:.0}% |",
                    ws.len(),
                    bytes as f64 / weights / 1e9,
                    weights * 1e3,
                    weights / whole * 100.0
                );
                println!("| everything else (attention, norms, launches, copies) | {:.2} | {:.0}% |", (whole - weights) * 1e3, (whole - weights) / whole * 100.0);
                json_rows.push(serde_json::json!({"preset": name, "dtype": dt, "what": "profile", "step_ms": whole * 1e3, "issue_ms": issue * 1e3, "weights_ms": weights * 1e3, "weights_gb_s": bytes as f64 / weights / 1e9}));
            }

            if !b.contexts.is_empty() {
                // Streaming prefill at several context sizes: each 40 ms of speech enters
                // the cache as it arrives (one audio token); at end of speech only the
                // turn's closing tokens remain before the first answer token.
                let frame = audio_frames(&test_signal(16_000, 1)[..640], &dev)?.to_dtype(dtype)?;
                let audio_id = model.config.audio_token_id;
                // The turn's closing (`<end_of_turn>`, a newline, `<start_of_turn>model`, a
                // newline): five tokens; which ids they are does not change the cost.
                let closing: Vec<u32> = prompt(5);
                println!("\n| context | build tok/s | streamed 40 ms frame p50 / max | end of speech → first token |");
                println!("|--:|--:|--:|--:|");
                for &ctx in &b.contexts {
                    let mut cache = model.new_cache();
                    sync(&dev)?;
                    let t = Instant::now();
                    argmax(&prefill(&mut cache, &prompt(ctx))?)?;
                    let build = t.elapsed().as_secs_f64();
                    let mut frames = Vec::new();
                    for _ in 0..25 {
                        let t = Instant::now();
                        let out = model.forward(&ForwardInput { tokens: &[audio_id], audio_frames: Some(&frame), ..Default::default() }, &mut cache)?;
                        // The streamed frame's logits are wanted only for the end-of-turn
                        // probability; reading one number back is what makes it finished.
                        out.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
                        frames.push(t.elapsed());
                    }
                    frames.sort();
                    let t = Instant::now();
                    argmax(&model.forward(&ForwardInput { tokens: &closing, ..Default::default() }, &mut cache)?)?;
                    let first = t.elapsed().as_secs_f64();
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    println!(
                        "| {ctx} | {:.0} | {:.2} / {:.2} ms | {:.2} ms |",
                        ctx as f64 / build,
                        ms(percentile(&frames, 0.5)),
                        ms(*frames.last().unwrap_or(&Duration::ZERO)),
                        first * 1e3
                    );
                    json_rows.push(serde_json::json!({"preset": name, "dtype": dt, "what": "streaming", "context": ctx,
                        "frame_ms_p50": ms(percentile(&frames, 0.5)), "first_token_ms": first * 1e3, "build_tok_s": ctx as f64 / build}));
                }
            }
            println!();
        }
    }
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_string_pretty(&json_rows)?)?;
    }
    Ok(())
}

/// `hark bench latency`: end of speech → first token, with and without streaming
/// prefill, at several context sizes; and what an eviction at the limit costs.
pub fn latency(preset: &str, contexts: &[usize], speech_seconds: f32, device: &str, dtype: &str) -> anyhow::Result<()> {
    use crate::model::embedded::{select_device, select_dtype, EmbeddedSettings, Engine};
    use crate::model::{ChatMessage, GenerateRequest, UserPart};
    use tokio_util::sync::CancellationToken;

    let dir = random_checkpoint(preset, device)?;
    let settings = EmbeddedSettings {
        checkpoint: dir.clone(),
        device: device.into(),
        dtype: dtype.into(),
        max_tokens: 1,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        cached_sessions: 4,
        kv_budget_mb: 4096,
        image_tokens: 280,
    };
    let mut engine = Engine::load(&settings, &select_device(device)?, select_dtype(dtype)?)?;
    let speech: Vec<f32> = test_signal(16_000, speech_seconds.ceil() as u32).into_iter().take((speech_seconds * 16_000.0) as usize).collect();
    // Kept audio is 16-bit: the streamed frames must carry the same values as the clip.
    let clip = Arc::new(crate::media::pcm::to_pcm16(&speech));
    let speech = crate::media::pcm::to_f32(&clip);
    let frames = speech.len().div_ceil(640);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "hark bench latency: {preset} preset (random weights), {dtype} on {device} ({cores} cores); a {speech_seconds} s utterance \
         ({frames} audio tokens) after a text conversation of each size. TTFT = end of speech → first token.\n"
    );
    println!("| context | build tok/s | TTFT, streaming off | TTFT, streaming on | on vs off | streamed frame p50 / max | eviction: re-prefill of the retained 80% (background) | TTFT right after eviction |");
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|");

    let cancel = CancellationToken::new();
    let turn = |i: usize| {
        [
            ChatMessage::User(vec![UserPart::Text(format!("Tell me about item {i} of the list, briefly please."))]),
            ChatMessage::Assistant { text: format!("Item {i} is a fine thing to talk about; here is a short answer."), tool_calls: vec![] },
        ]
    };
    let instructions = "You are hark, a helpful voice assistant. Answer briefly.".to_string();
    for &size in contexts {
        engine.clear_caches();
        // Enough whole turns to reach `size` prompt tokens.
        let one = GenerateRequest { instructions: instructions.clone(), messages: turn(0).to_vec(), ..Default::default() };
        let empty = GenerateRequest { instructions: instructions.clone(), ..Default::default() };
        let per_turn = engine.prompt(&one, false).map_err(anyhow::Error::msg)?.tokens.len()
            - engine.prompt(&empty, false).map_err(anyhow::Error::msg)?.tokens.len();
        let turns = (size / per_turn.max(1)).max(1);
        let base = GenerateRequest { instructions: instructions.clone(), messages: (0..turns).flat_map(turn).collect(), ..Default::default() };
        let base_tokens = engine.prompt(&base, false).map_err(anyhow::Error::msg)?.tokens.len();

        let t = Instant::now();
        engine.prepare_now(&base).map_err(anyhow::Error::msg)?;
        let build = t.elapsed().as_secs_f64();

        let mut spoken = base.clone();
        spoken.messages.push(ChatMessage::User(vec![UserPart::Audio(clip.clone())]));
        // Streaming off: the whole utterance is prefilled after end of speech.
        let t = Instant::now();
        engine.generate(&spoken, &cancel, &|_| true).map_err(anyhow::Error::msg)?;
        let off = t.elapsed();
        // Streaming on: frames enter as they are spoken; end of speech leaves the last one.
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        engine.open_turn(1, &base, tx).map_err(anyhow::Error::msg)?;
        let mut frame_times = Vec::with_capacity(frames);
        for chunk in speech.chunks(640) {
            let t = Instant::now();
            engine.turn_audio(1, chunk).map_err(anyhow::Error::msg)?;
            frame_times.push(t.elapsed());
        }
        frame_times.sort();
        let t = Instant::now();
        engine.generate(&spoken, &cancel, &|_| true).map_err(anyhow::Error::msg)?;
        let on = t.elapsed();

        // Eviction at the limit: the oldest whole turns go, about 80 % stays. The
        // retained window is prefilled in the background; the next turn starts from it.
        let keep = (turns * 4 / 5).max(1);
        let retained = GenerateRequest { messages: base.messages[(turns - keep) * 2..].to_vec(), ..base.clone() };
        let t = Instant::now();
        engine.prepare_now(&retained).map_err(anyhow::Error::msg)?;
        let evict = t.elapsed().as_secs_f64();
        let mut next = retained.clone();
        next.messages.push(ChatMessage::User(vec![UserPart::Audio(clip.clone())]));
        let t = Instant::now();
        engine.generate(&next, &cancel, &|_| true).map_err(anyhow::Error::msg)?;
        let after = t.elapsed();

        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {base_tokens} | {:.0} | {:.1} ms | {:.1} ms | {:.1}× faster | {:.1} / {:.1} ms | {:.2} s | {:.1} ms |",
            base_tokens as f64 / build,
            ms(off),
            ms(on),
            ms(off) / ms(on).max(1e-6),
            ms(percentile(&frame_times, 0.5)),
            ms(*frame_times.last().unwrap_or(&Duration::ZERO)),
            evict,
            ms(after),
        );
    }
    println!("\nA streamed 40 ms frame must cost under 40 ms for the turn to keep up with the speaker.");
    println!("Without the background preparation, the first request after an eviction would wait for the re-prefill column.");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `hark bench engine`: N sessions ask at once; aggregate decode tokens/s, time to
/// first token and the longest gap between a session's tokens, with the scheduler
/// interleaving them and with one response at a time (the engine before it).
pub fn engine(preset: &str, sessions: &[usize], tokens: u32, device: &str, dtype: &str) -> anyhow::Result<()> {
    use std::sync::Mutex;

    use crate::model::embedded::{select_device, select_dtype, EmbeddedSettings, Engine};
    use crate::model::{BackendEvent, ChatMessage, GenerateRequest, UserPart};
    use tokio_util::sync::CancellationToken;

    anyhow::ensure!(!sessions.is_empty() && !sessions.contains(&0), "--sessions needs counts of at least 1");
    let dir = random_checkpoint(preset, device)?;
    let settings = EmbeddedSettings {
        checkpoint: dir.clone(),
        device: device.into(),
        dtype: dtype.into(),
        max_tokens: tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
        cached_sessions: sessions.iter().copied().max().unwrap_or(1) + 1,
        kv_budget_mb: 1 << 20,
        image_tokens: 280,
    };
    let mut engine = Engine::load(&settings, &select_device(device)?, select_dtype(dtype)?)?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "hark bench engine: {preset} preset (random weights), {dtype} on {device} ({cores} cores); every session asks at once, \
         a short spoken-length question, up to {tokens} tokens each. TTFT = submission → first token.\n"
    );
    // The batched forward alone: N sequences' decode tokens in one call against N calls.
    {
        use crate::model::gemma4::ForwardInput;
        let model = engine.model();
        println!("| sequences | N single decode forwards | one batched forward | speed-up |");
        println!("|--:|--:|--:|--:|");
        let prompt: Vec<u32> = (0..40u32).map(|i| 1000 + i * 7).collect();
        for &n in sessions {
            let mut caches: Vec<_> = (0..n).map(|_| model.new_cache()).collect();
            for c in caches.iter_mut() {
                model.forward(&ForwardInput { tokens: &prompt, ..Default::default() }, c)?;
            }
            let steps = 8;
            let t = Instant::now();
            for s in 0..steps {
                for c in caches.iter_mut() {
                    model.forward(&ForwardInput { tokens: &[2000 + s], ..Default::default() }, c)?;
                }
            }
            let single = t.elapsed() / steps;
            let t = Instant::now();
            for s in 0..steps {
                let tokens = vec![3000 + s; n];
                let mut refs: Vec<_> = caches.iter_mut().collect();
                model.forward_batch(&tokens, &mut refs)?;
            }
            let batched = t.elapsed() / steps;
            println!("| {n} | {:.1} ms | {:.1} ms | {:.2}× |", ms(single), ms(batched), ms(single) / ms(batched).max(1e-9));
        }
        println!();
    }
    println!("| sessions | schedule | tokens | aggregate decode tok/s | TTFT p50 | TTFT p99 | inter-token p99 | wall |");
    println!("|--:|:--|--:|--:|--:|--:|--:|--:|");
    for &n in sessions {
        let mut rates = Vec::new();
        for fifo in [true, false] {
            engine.clear_caches();
            engine.set_fifo(fifo);
            let times: Vec<Arc<Mutex<Vec<Instant>>>> = (0..n).map(|_| Arc::default()).collect();
            let outputs: Arc<Mutex<usize>> = Arc::default();
            let start = Instant::now();
            for (i, t) in times.iter().enumerate() {
                let request = GenerateRequest {
                    instructions: "You are hark, a helpful voice assistant. Answer briefly.".into(),
                    messages: vec![ChatMessage::User(vec![UserPart::Text(format!("Session {i} asks: tell me about item {i} of the list, please."))])],
                    max_output_tokens: Some(tokens),
                    cache_key: Some(i as u64),
                    ..Default::default()
                };
                let (t, outputs) = (t.clone(), outputs.clone());
                let sink = Box::new(move |ev: BackendEvent| {
                    match ev {
                        BackendEvent::Done { usage: Some(u), .. } => *outputs.lock().unwrap_or_else(|e| e.into_inner()) += u.output_tokens as usize,
                        BackendEvent::Done { .. } | BackendEvent::Error(_) => {}
                        _ => t.lock().unwrap_or_else(|e| e.into_inner()).push(Instant::now()),
                    }
                    true
                });
                engine.submit(request, CancellationToken::new(), sink);
            }
            while engine.step() {}
            let wall = start.elapsed();
            let mut ttft = Vec::new();
            let mut gaps = Vec::new();
            for t in &times {
                let t = t.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(first) = t.first() {
                    ttft.push(*first - start);
                }
                gaps.extend(t.windows(2).map(|w| w[1] - w[0]));
            }
            ttft.sort();
            gaps.sort();
            let total = *outputs.lock().unwrap_or_else(|e| e.into_inner());
            let rate = total as f64 / wall.as_secs_f64();
            rates.push(rate);
            println!(
                "| {n} | {} | {total} | {rate:.1} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} s |",
                if fifo { "one at a time" } else { "interleaved" },
                ms(percentile(&ttft, 0.5)),
                ms(percentile(&ttft, 0.99)),
                ms(percentile(&gaps, 0.99)),
                wall.as_secs_f64(),
            );
        }
        println!("| {n} | interleaved ÷ one at a time | | {:.2}× | | | | |", rates[1] / rates[0].max(1e-9));
    }
    println!(
        "\nInterleaved: decode steps of every answering session run as one batched forward (weights read once per step), \
         alternating with prefill chunks of sessions still reading their prompt."
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir(name: &str) -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("hark-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A random-weight checkpoint of `preset` in a temporary folder, for the model benches.
fn random_checkpoint(preset: &str, device: &str) -> anyhow::Result<std::path::PathBuf> {
    use crate::model::gemma4::init::{write_random_checkpoint, Preset};
    let p = Preset::parse(preset).ok_or_else(|| anyhow::anyhow!("unknown preset {preset}; use tiny, small or 12b"))?;
    anyhow::ensure!(p != Preset::Gemma12B || device != "cpu", "the 12b preset is not benchmarked on CPU");
    let dir = tempfile_dir(preset)?;
    write_random_checkpoint(p, &dir, false, 1, |_, _| {})?;
    Ok(dir)
}

/// `hark bench voice`: the always-on local session end to end on the embedded tiny
/// model — a Piper-spoken question is fed as the microphone in real time; from the end
/// of speech, the turn decision (`speech_stopped`), the first token (the reply's item
/// opens), the first sentence synthesized (first audio delta) and the first buffer
/// written to the output (a null output: no sound device needed), p50/p95 over
/// `turns`; then Piper's real-time factor and the CPU an idle always-on session costs.
#[cfg(feature = "audio-devices")]
pub fn voice(config: &Config, turns: usize, preset: &str) -> anyhow::Result<()> {
    use crate::protocol::ServerEvent;
    use crate::sources::{MicOutput, SpeechSink};
    use std::sync::Mutex;

    /// The output: takes what the session plays and notes when the first sample came.
    #[derive(Default)]
    struct NullOutput {
        first: Mutex<Option<Instant>>,
        written: std::sync::atomic::AtomicU64,
    }
    impl SpeechSink for NullOutput {
        fn play(&self, samples: &[f32]) {
            if let Ok(mut f) = self.first.lock() {
                f.get_or_insert_with(Instant::now);
            }
            self.written.fetch_add(samples.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        fn clear(&self) {}
        fn is_playing(&self) -> bool {
            false
        }
        fn position(&self) -> u64 {
            self.written.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn queued_end(&self) -> u64 {
            self.position()
        }
        fn rate(&self) -> u32 {
            crate::speech::OUTPUT_SAMPLE_RATE
        }
    }

    let dir = random_checkpoint(preset, "cpu")?;
    let mut config = config.clone();
    config.backend.kind = crate::config::BackendKind::Embedded;
    config.backend.embedded.checkpoint = dir.clone();
    config.backend.embedded.device = "cpu".into();
    config.audio.input = crate::config::AudioInputKind::None;
    config.session.max_output_tokens = Some(16);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let state = crate::server::AppState::from_config(config.clone()).await?;
        let speech = state.deps.speech.clone().context("bench voice needs a speech engine (speech.engine; run scripts/setup for the Piper voice)")?;
        // The user's question, in hark's own voice, at the microphone's 16 kHz.
        let q = speech.synthesize("What time is it in Paris right now?").await?;
        let mut question = Vec::new();
        let mut rs = crate::media::StreamResampler::with_rates(q.sample_rate, crate::media::MODEL_SAMPLE_RATE)?;
        rs.push(&q.samples, &mut question)?;
        rs.flush(&mut question)?;

        let out = Arc::new(NullOutput::default());
        let (mic_tx, mic_rx) = tokio::sync::mpsc::channel(256);
        let output = crate::server::local::LocalOutput {
            speaker: Some(out.clone() as Arc<dyn SpeechSink>),
            echo: crate::config::EchoCancellation::Off,
            echo_stats: None,
            wake: None,
        };
        let local = crate::server::local::LocalSession::start(state.deps.clone(), mic_rx, Box::new(()), output, state.shutdown.clone());
        let (_, mut events) = local.attach().await.context("the local session did not start")?;

        // Real-time feeder: 10 ms chunks, speech then silence, on a clock.
        let chunk = 160;
        let feed = |samples: Vec<f32>, tx: tokio::sync::mpsc::Sender<MicOutput>| async move {
            let mut next = tokio::time::Instant::now();
            for c in samples.chunks(chunk) {
                next += Duration::from_millis(10);
                tokio::time::sleep_until(next).await;
                if tx.send(MicOutput::Audio(c.to_vec())).await.is_err() {
                    break;
                }
            }
            Instant::now()
        };
        let silence = |secs: f32| vec![0.0f32; (secs * 16_000.0) as usize];
        let mut rows: Vec<[Duration; 4]> = Vec::new();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for turn in 0..turns {
            if let Ok(mut f) = out.first.lock() {
                *f = None;
            }
            let mut utterance = silence(0.3);
            utterance.extend_from_slice(&question);
            let spoken = tokio::spawn(feed(utterance, mic_tx.clone()));
            let end_of_speech = spoken.await?;
            // Silence goes on while hark decides and answers.
            let quiet = tokio::spawn(feed(silence(30.0), mic_tx.clone()));
            let (mut stopped, mut first_token, mut first_audio) = (None, None, None);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while first_audio.is_none() || stopped.is_none() {
                let ev = match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Ok(ev)) => ev,
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                    _ => break,
                };
                let now = Instant::now();
                if std::env::var_os("HARK_BENCH_TRACE").is_some() {
                    eprintln!("{:>6.0} ms {}", ms(now.saturating_duration_since(end_of_speech)), serde_json::to_string(&ev).unwrap_or_default().chars().take(200).collect::<String>());
                }
                match ev {
                    ServerEvent::InputAudioBufferSpeechStopped { .. } => stopped = Some(now),
                    ServerEvent::ResponseOutputItemAdded { .. } if first_token.is_none() => first_token = Some(now),
                    ServerEvent::ResponseOutputAudioDelta { .. } if first_audio.is_none() => first_audio = Some(now),
                    ServerEvent::ResponseDone { response } if first_audio.is_none() => {
                        eprintln!("turn {turn}: the reply had no speech: {}", serde_json::to_string(&response).unwrap_or_default().chars().take(600).collect::<String>());
                        break;
                    }
                    _ => {}
                }
            }
            // Let the response finish before the next turn.
            loop {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Ok(ServerEvent::ResponseDone { response })) => {
                        if first_audio.is_none() {
                            eprintln!("turn {turn}: the reply had no speech: {}", serde_json::to_string(&response).unwrap_or_default().chars().take(400).collect::<String>());
                        }
                        break;
                    }
                    Err(_) | Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                    _ => {}
                }
            }
            quiet.abort();
            let played = out.first.lock().ok().and_then(|f| *f);
            match (stopped, first_token, first_audio, played) {
                (Some(s), Some(t), Some(a), Some(p)) => {
                    let since = |x: Instant| x.saturating_duration_since(end_of_speech);
                    rows.push([since(s), since(t), since(a), since(p)]);
                }
                other => eprintln!("turn {turn}: incomplete ({:?})", other),
            }
        }
        anyhow::ensure!(!rows.is_empty(), "no turn produced audio");

        // Piper's real-time factor on a few sentences.
        let mut synth = Duration::ZERO;
        let mut audio_s = 0.0;
        for s in ["Sure, it is a quarter past three in Paris.", "The weather is mild today, with a light breeze from the west.", "Anything else?"] {
            let t = Instant::now();
            let pcm = speech.synthesize(s).await?;
            synth += t.elapsed();
            audio_s += pcm.samples.len() as f64 / pcm.sample_rate as f64;
        }
        // An idle always-on session: silence at the microphone for 5 s.
        let cpu0 = process_cpu_seconds();
        let t = Instant::now();
        feed(silence(5.0), mic_tx.clone()).await;
        let idle_cpu = (process_cpu_seconds() - cpu0) / t.elapsed().as_secs_f64();

        let td = config.session.turn_detection.as_ref();
        println!(
            "hark bench voice: {preset} preset (random weights) on cpu, Piper voice, {} turns; turn detection {} (silence {} ms). \
             Times from the end of speech, p50 / p95:\n",
            rows.len(),
            td.map_or("none".to_string(), |t| t.kind.clone()),
            td.map_or(0, |t| t.silence_duration_ms)
        );
        println!("| stage | p50 | p95 |");
        println!("|--|--:|--:|");
        for (i, name) in ["turn decision (speech_stopped)", "first token (reply item opens)", "first sentence synthesized (first audio delta)", "first buffer played (written to the output)"].iter().enumerate() {
            let mut v: Vec<Duration> = rows.iter().map(|r| r[i]).collect();
            v.sort();
            println!("| {name} | {:.0} ms | {:.0} ms |", ms(percentile(&v, 0.5)), ms(percentile(&v, 0.95)));
        }
        println!("\nTTS real-time factor (Piper, synthesis time / audio time): {:.3}", synth.as_secs_f64() / audio_s.max(1e-9));
        println!("CPU of an idle always-on session (VAD on silence, whole process): {:.1} % of one core", idle_cpu * 100.0);
        println!(
            "\nWith random weights the reply is {} random tokens without clause breaks, spoken as one piece: the synthesis rows \
             time that whole piece, where a real model's first clause would be a few words.",
            config.session.max_output_tokens.unwrap_or(0)
        );
        state.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
        anyhow::Ok(())
    })
}
