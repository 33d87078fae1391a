//! hark against a real OpenAI-compatible model server with audio input: llama.cpp's
//! `llama-server` (build b11434, built by `scripts/llama-server`), serving the tiny
//! random-weight `gemma4_unified` checkpoint that `hark model init` writes, converted
//! by llama.cpp's own `convert_hf_to_gguf.py` (text GGUF + `--mmproj`).
//!
//! - A spoken realtime turn through hark's remote backend (`backend.kind: openai`)
//!   reaches llama.cpp as an `input_audio` part, is embedded there as audio tokens
//!   (25 a second) and streams back.
//! - hark's embedded backend and llama.cpp, on the same weights, pick the same greedy
//!   tokens for the same prompt.
//!
//! Needs `HARK_LLAMA_CPP` (set by `scripts/test`): the folder `scripts/llama-server`
//! prepares, with `build/bin/llama-server`, `src/convert_hf_to_gguf.py` and a Python
//! with the converter's packages in `venv/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, D};
use common::*;
use hark::model::gemma4::init::{write_random_checkpoint, Preset};
use hark::model::gemma4::{loader, ForwardInput};
use serde_json::{json, Value};

/// The checkpoint's seed: any; both sides read the same file.
const SEED: u64 = 7;
/// Greedy tokens compared between hark and llama.cpp.
const GREEDY_STEPS: usize = 16;
/// The realtime session's instructions (hark sends them as the system message).
const INSTRUCTIONS: &str = "Be brief.";
/// The synthetic vocabulary's unused id that becomes the merged token "▁t".
const MERGED_ID: u64 = 1000;

/// The folder `scripts/llama-server` prepared; fails (never skips) without it.
fn llama_dir() -> PathBuf {
    let dir = std::env::var_os("HARK_LLAMA_CPP").map(PathBuf::from).unwrap_or_else(|| {
        panic!("HARK_LLAMA_CPP is not set: run scripts/test, which builds llama.cpp's llama-server (scripts/llama-server) and sets it")
    });
    for f in ["build/bin/llama-server", "src/convert_hf_to_gguf.py", "venv/bin/python"] {
        assert!(dir.join(f).exists(), "{} is missing: run scripts/llama-server (scripts/test runs it)", dir.join(f).display());
    }
    dir
}

/// `hark model init --preset tiny` in `dir`, converted to `model.gguf` and
/// `mmproj.gguf` in f32 (no quantization: the comparison wants the same weights).
fn converted_checkpoint(dir: &Path) -> (PathBuf, PathBuf) {
    let llama = llama_dir();
    write_random_checkpoint(Preset::Tiny, dir, false, SEED, |_, _| {}).unwrap();
    // What a hub checkpoint carries and `hark model init` does not write, but the
    // converter reads: text_config.expert_intermediate_size (it has no default for the
    // key), a tokenizer_config.json (without one, transformers 4.57's AutoTokenizer asks
    // AutoConfig, which does not know gemma4_unified), and the image preprocessor's
    // normalisation (Gemma 4 scales pixels to [0, 1] and stops there).
    let cfg_path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["expert_intermediate_size"] = Value::Null;
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": true,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
    std::fs::write(dir.join("preprocessor_config.json"), json!({"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}).to_string())
        .unwrap();
    // llama.cpp refuses a BPE vocabulary without merges ("cannot find tokenizer merges
    // in model file"), and the synthetic tokenizer has none (it spells text by
    // characters): give this copy one real merge, "▁" + "t", in place of an unused entry.
    // hark reads the same file, so both sides tokenize alike.
    let tok_path = dir.join("tokenizer.json");
    let mut tok: Value = serde_json::from_slice(&std::fs::read(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let unused = vocab.iter().find(|(_, id)| id.as_u64() == Some(MERGED_ID)).map(|(k, _)| k.clone()).unwrap();
    assert!(unused.starts_with("<unused"), "id {MERGED_ID} is {unused}");
    vocab.remove(&unused);
    vocab.insert("▁t".into(), json!(MERGED_ID));
    tok["model"]["merges"] = json!([["▁", "t"]]);
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let (model, mmproj) = (dir.join("model.gguf"), dir.join("mmproj.gguf"));
    // Both conversions at once: each spends most of its time importing torch.
    let runs: Vec<_> = [(&model, None), (&mmproj, Some("--mmproj"))]
        .into_iter()
        .map(|(out, extra)| {
            let mut cmd = Command::new(llama.join("venv/bin/python"));
            cmd.arg(llama.join("src/convert_hf_to_gguf.py")).arg(dir).args(["--outtype", "f32", "--outfile"]).arg(out);
            cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
            (extra, cmd.spawn().expect("running convert_hf_to_gguf.py"))
        })
        .collect();
    for (extra, child) in runs {
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        assert!(o.status.success(), "convert_hf_to_gguf.py {extra:?} failed:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    (model, mmproj)
}

/// A running `llama-server` on a free loopback port; killed when dropped.
struct LlamaServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LlamaServer {
    async fn start(model: &Path, mmproj: &Path, log: PathBuf) -> LlamaServer {
        let bin = llama_dir().join("build/bin/llama-server");
        // A port the OS just handed out and took back: free unless another process
        // grabs it in the moment before llama-server binds (then the start fails loudly).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin)
            .arg("-m")
            .arg(model)
            .arg("--mmproj")
            .arg(mmproj)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-c", "4096", "-np", "1", "-t", "2", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting llama-server");
        let mut server = LlamaServer { child, port, log };
        server.wait_ready().await;
        server
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// llama.cpp's greedy continuation of `prompt` (ids, read as they are), GREEDY_STEPS long.
    async fn greedy(&self, prompt: &[u32]) -> Vec<u32> {
        let r = self
            .post("/completion", json!({
                "prompt": prompt, "n_predict": GREEDY_STEPS, "temperature": 0.0, "top_k": 1, "samplers": ["top_k"],
                "cache_prompt": false, "return_tokens": true,
            }))
            .await;
        assert_eq!(r["tokens_evaluated"], prompt.len(), "llama.cpp must read exactly the prompt's ids (no extra BOS): {r}");
        let ids: Vec<u32> = r["tokens"].as_array().unwrap_or_else(|| panic!("no tokens in {r}")).iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(ids.len(), GREEDY_STEPS, "llama.cpp stopped early ({}): {r}", r["stop_type"]);
        ids
    }

    /// llama.cpp's prompt tokens for the test's system message and one user turn of
    /// `samples` of 16 kHz audio (a WAV `input_audio` part, as hark sends it).
    async fn audio_prompt_tokens(&self, samples: usize) -> u64 {
        let mut wav = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec { channels: 1, sample_rate: 16_000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut w = hound::WavWriter::new(&mut wav, spec).unwrap();
        for i in 0..samples {
            w.write_sample(((i * 37 % 200) as i16) - 100).unwrap();
        }
        w.finalize().unwrap();
        let part = json!({"type": "input_audio", "input_audio": {"data": b64(&wav.into_inner()), "format": "wav"}});
        let r = self.post("/v1/chat/completions", json!({"model": "tiny", "max_tokens": 1, "messages": [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": [part]}]})).await;
        r["usage"]["prompt_tokens"].as_u64().unwrap_or_else(|| panic!("no usage from llama.cpp: {r}"))
    }

    /// POSTs `body` to llama-server's `path`; its JSON answer.
    async fn post(&self, path: &str, body: Value) -> Value {
        let r = reqwest::Client::new().post(format!("{}{path}", self.base_url())).json(&body).send().await.unwrap();
        r.json().await.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/health` answers 200 once the model is loaded (503 while loading).
    async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("llama-server exited with {st}:\n{}", self.log());
            }
            if let Ok(r) = http.get(format!("{}/health", self.base_url())).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "llama-server did not become ready in 60 s:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// hark's own greedy continuation of `prompt`: the embedded model's forward pass, f32 on
/// the CPU, argmax at each step.
fn hark_greedy(ckpt: &Path, prompt: &[u32], steps: usize) -> Vec<u32> {
    let model = loader::load(ckpt, DType::F32, &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let logits = model.forward(&ForwardInput { tokens: &input, ..Default::default() }, &mut cache).unwrap();
        let next = logits.flatten_all().unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
        out.push(next);
        input = vec![next];
    }
    out
}

/// hark's embedded backend's engine (greedy, f32, CPU) answering one user message:
/// the answer's text and the prompt ids it rendered (template + tokenizer).
fn engine_greedy(ckpt: &Path, text: &str) -> (String, Vec<u32>) {
    use hark::model::embedded::Engine;
    use hark::model::engine::prompt::{render_with, ImageMode};
    use hark::model::{BackendEvent, ChatMessage, GenerateRequest, UserPart};
    let req = GenerateRequest {
        instructions: INSTRUCTIONS.into(),
        messages: vec![ChatMessage::User(vec![UserPart::Text(text.into())])],
        ..Default::default()
    };
    let mut engine = Engine::load(&engine_settings(ckpt, GREEDY_STEPS as u32, 1), &Device::Cpu, DType::F32).unwrap();
    let out = std::cell::RefCell::new(String::new());
    let cancel = tokio_util::sync::CancellationToken::new();
    engine
        .generate(&req, &cancel, &|ev| {
            if let BackendEvent::TextDelta(t) = ev {
                out.borrow_mut().push_str(&t);
            }
            true
        })
        .unwrap();
    let rendered = render_with(&req, 70, true, ImageMode::CountOnly).unwrap();
    let tokenizer = hark::model::gemma4::tokenizer::Gemma4Tokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode(&rendered.text).unwrap();
    assert_eq!(engine.last_prefill, (0, ids.len()), "the engine prefilled other ids than the rendered prompt's");
    (out.into_inner(), ids)
}

/// The top logits hark gives after `prompt`, for explaining a disagreement.
fn hark_top(ckpt: &Path, prompt: &[u32]) -> Vec<(u32, f32)> {
    let model = loader::load(ckpt, DType::F32, &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let logits = model.forward(&ForwardInput { tokens: prompt, ..Default::default() }, &mut cache).unwrap();
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let mut idx: Vec<(u32, f32)> = v.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx.truncate(5);
    idx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hark_and_llama_cpp_agree_and_audio_reaches_llama_cpp() {
    hark::tls::init();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let t0 = Instant::now();
    let (model, mmproj) = converted_checkpoint(&ckpt);
    eprintln!("converted in {:.1} s", t0.elapsed().as_secs_f32());
    let llama = LlamaServer::start(&model, &mmproj, dir.path().join("llama-server.log")).await;

    // ── The same greedy tokens for the same prompt ──
    let tokenizer = hark::model::gemma4::tokenizer::Gemma4Tokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let text = "The quick brown fox jumps over the lazy dog.";
    let mut prompt = vec![2u32]; // <bos>
    prompt.extend(tokenizer.encode(text).unwrap());
    // The same text gives the same ids on both sides (so ids stand for the text below).
    let tokenized = llama.post("/tokenize", json!({"content": text, "add_special": false})).await;
    assert_eq!(tokenized["tokens"], json!(prompt[1..]), "llama.cpp tokenized {text:?} differently");
    let theirs = llama.greedy(&prompt).await;
    let ours = hark_greedy(&ckpt, &prompt, GREEDY_STEPS);
    eprintln!("greedy ids: hark {ours:?}\n            llama.cpp {theirs:?}");
    assert_eq!(ours, theirs, "hark's top logits after the prompt: {:?}", hark_top(&ckpt, &prompt));

    // ── The same through hark's embedded backend: its engine renders a chat turn with
    // Gemma 4's template and decodes greedily; llama.cpp continues the same prompt ids.
    let (engine_text, prompt_ids) = engine_greedy(&ckpt, text);
    let theirs = llama.greedy(&prompt_ids).await;
    let their_text = tokenizer.decode(&theirs).unwrap();
    eprintln!("embedded engine: {engine_text:?}\nllama.cpp:       {their_text:?}");
    assert_eq!(engine_text, their_text, "the embedded backend and llama.cpp continued {} prompt ids differently", prompt_ids.len());

    // ── A spoken realtime turn through hark's remote backend ──
    let mut cfg = test_config(&format!("{}/v1", llama.base_url()));
    cfg.backend.openai.model = "tiny".into();
    cfg.backend.openai.max_tokens = 8;
    cfg.backend.openai.temperature = 0.0;
    let hark = Hark::start(cfg).await;
    let mut c = Client::connect(&hark.ws_url()).await;
    c.send(json!({"type": "session.update", "session": {"type": "realtime", "instructions": INSTRUCTIONS, "output_modalities": ["text"]}}))
        .await;
    c.until("session.updated").await;
    let wav = speech_wav(dir.path(), "turn", "What time is it in Paris?", 0.5, 1.0);
    let pcm = wav_pcm_bytes(&wav);
    for chunk in pcm.chunks(4800) {
        c.send(json!({"type": "input_audio_buffer.append", "audio": b64(chunk)})).await;
    }
    let committed = c.until("input_audio_buffer.committed").await;
    let events = c.collect_until("response.done").await;
    let done = events.last().unwrap();
    // A random model never says its end-of-turn token: the answer runs to max_tokens.
    assert_eq!(done["response"]["status"], "incomplete", "{done}\n{}", llama.log());
    assert_eq!(done["response"]["status_details"]["reason"], "max_output_tokens", "{done}");
    let deltas: String = events.iter().filter(|e| e["type"] == "response.output_text.delta").map(|e| e["delta"].as_str().unwrap()).collect();
    assert!(!deltas.is_empty(), "no text deltas: {:?}", types(&events));
    let done_text = done["response"]["output"][0]["content"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(done_text, deltas, "{done}");
    let added = c.seen.iter().find(|e| e["type"] == "conversation.item.added" && e["item"]["id"] == committed["item_id"]).unwrap();
    assert_eq!(added["item"]["content"][0]["type"], "input_audio", "{added}");

    // llama.cpp embedded the turn's audio: its prompt count (hark reports it as the
    // response's input_tokens) is the text around the audio plus one token per 640
    // samples (25 a second). The committed audio runs from prefix_padding_ms before
    // speech_started to 200 ms after speech_stopped. The text around it is measured by
    // asking llama.cpp directly with 1 s and 2 s of audio in the same place.
    let find = |ty: &str| c.seen.iter().find(|e| e["type"] == ty).unwrap_or_else(|| panic!("no {ty}")).clone();
    let prefix_ms = find("session.created")["session"]["audio"]["input"]["turn_detection"]["prefix_padding_ms"].as_u64().unwrap();
    let (start_ms, end_ms) = (
        find("input_audio_buffer.speech_started")["audio_start_ms"].as_u64().unwrap(),
        find("input_audio_buffer.speech_stopped")["audio_end_ms"].as_u64().unwrap(),
    );
    let audio_ms = end_ms - start_ms.saturating_sub(prefix_ms) + 200;
    let one_second = llama.audio_prompt_tokens(16_000).await;
    let two_seconds = llama.audio_prompt_tokens(32_000).await;
    assert_eq!(two_seconds - one_second, 25, "llama.cpp should give a second of audio 25 tokens");
    let prompt_tokens = done["response"]["usage"]["input_tokens"].as_u64().unwrap();
    let audio_tokens = prompt_tokens - (one_second - 25);
    eprintln!("audio {audio_ms} ms → {audio_tokens} audio tokens (prompt {prompt_tokens}; 1 s of audio alone: {one_second})");
    // audio_ms is rounded to the ms; llama.cpp rounds a partial frame up.
    let expected = audio_ms as f64 / 40.0;
    assert!(
        (audio_tokens as f64 - expected).abs() <= 1.0,
        "{audio_ms} ms of audio should be ≈{expected:.1} tokens; llama.cpp counted {audio_tokens} (prompt {prompt_tokens}, 1 s alone {one_second})"
    );
}
