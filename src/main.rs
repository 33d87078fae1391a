//! The `hark` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use hark::config::Config;

#[derive(Parser)]
#[command(name = "hark", version, about = "A real-time voice-and-vision agent daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// List audio input and output devices (names for audio.mic.device) with their configs.
    Devices,
    /// Validate the config (and the files it points to) without starting.
    Check {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// The YAML tools and agents.
    Tools {
        #[command(subcommand)]
        what: ToolsCommand,
    },
    /// Measure parts of hark and print a table.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Work with Gemma 4 checkpoints.
    Model {
        #[command(subcommand)]
        what: ModelCommand,
    },
    /// Run hark as a systemd user service.
    Service {
        #[command(subcommand)]
        what: ServiceCommand,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write ~/.config/systemd/user/hark.service (`hark serve` with this binary and
    /// config, restarted on failure); then `systemctl --user enable --now hark`.
    Install {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Print the unit instead of writing it.
        #[arg(long)]
        print: bool,
    },
}

#[derive(Subcommand)]
enum ToolsCommand {
    /// Print every tool (MCP servers are started to list theirs) and agent.
    List {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a random-weight checkpoint of the real layout (config.json,
    /// model.safetensors, tokenizer.json), so hark runs without downloading weights.
    Init {
        /// tiny (tests), small (CPU benchmarks) or 12b (the real shapes, ≈24 GB in bf16)
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Random weights (the only kind hark can make; required to say so).
        #[arg(long)]
        random: bool,
        /// Store weights as bf16 (default) or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write only config.json and tokenizer.json (for a reference built elsewhere,
        /// e.g. scripts/bench-transformers.py).
        #[arg(long)]
        config_only: bool,
        dir: PathBuf,
    },
    /// Check the embedded model on a device against the committed transformers
    /// fixtures: text, incremental decode, audio and image logits, greedy tokens.
    Parity {
        /// Folder holding tiny_mm/ and tiny_text/.
        #[arg(long, default_value = "tests/fixtures/gemma4")]
        fixtures: PathBuf,
        /// cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32 or bf16
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Largest relative logit error accepted (default: 1e-4 for f32, 1e-2 for bf16).
        #[arg(long)]
        tolerance: Option<f32>,
        /// Greedy steps that must match an f32 CPU run.
        #[arg(long, default_value_t = 64)]
        steps: usize,
    },
    /// Download a checkpoint from the Hugging Face hub (HF_TOKEN for gated models,
    /// HF_ENDPOINT for a mirror), with progress.
    Pull {
        /// e.g. google/gemma-4-12b-it
        repo: String,
        /// Destination folder (default: models/<name>)
        dir: Option<PathBuf>,
    },
    /// Run one forward pass and write the logits as .npy (for checking a checkpoint
    /// against another implementation).
    Logits {
        checkpoint: PathBuf,
        /// JSON: {"input_ids": [...], "audio": "clip.wav" (16 kHz mono), "images": ["a.png"], "image_tokens": 280, "image_resize": true, "dtype": "f32"}
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// N concurrent Realtime sessions over loopback, each streaming real-time 24 kHz
    /// speech with server VAD; prints sessions held, frames dropped, event latency, RSS and CPU.
    Load {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        #[arg(long, default_value_t = 4)]
        sessions: usize,
        /// Minutes each session streams (fractions allowed).
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
        /// The embedded model's checkpoint (`hark model init --random DIR`); by
        /// default a tiny random one is made for the run.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// An OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1) instead of the embedded model.
        #[arg(long)]
        backend_url: Option<String>,
    },
    /// N concurrent real-time 24 kHz streams through resample + VAD + chunking.
    Pipeline {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Stream counts to measure, comma-separated.
        #[arg(long, default_value = "1,4,16,64", value_delimiter = ',')]
        streams: Vec<usize>,
        /// Seconds of audio per stream.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Pace appends in real time (20 ms chunks) instead of as fast as possible.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        realtime: bool,
    },
    /// End of speech → first token with and without streaming prefill, and eviction cost.
    Latency {
        /// Random-weight preset: tiny, small or 12b (12b needs a GPU).
        #[arg(long, default_value = "small")]
        preset: String,
        /// Context sizes in tokens, comma-separated.
        #[arg(long, default_value = "1024,16384,65536", value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Length of the spoken turn in seconds.
        #[arg(long, default_value_t = 2.0)]
        speech: f32,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// The local voice loop: end of speech → first audio out (turn decision, first
    /// token, first sentence synthesized, first buffer played), TTS real-time factor,
    /// CPU of an idle always-on session. Needs the Piper voice and Silero (scripts/setup).
    Voice {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
        /// Turns to measure.
        #[arg(long, default_value_t = 20)]
        turns: usize,
        /// Random-weight preset of the embedded model.
        #[arg(long, default_value = "tiny")]
        preset: String,
    },
    /// Several sessions answering at once on one embedded model: the scheduler
    /// (interleaved) against one response at a time (FIFO).
    Engine {
        /// Random-weight preset: tiny, small or 12b (12b needs a GPU).
        #[arg(long, default_value = "small")]
        preset: String,
        /// Session counts, comma-separated.
        #[arg(long, default_value = "1,4", value_delimiter = ',')]
        sessions: Vec<usize>,
        /// Tokens each session's answer may have.
        #[arg(long, default_value_t = 64)]
        tokens: u32,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Prefill, decode (batched too) and streaming-turn costs of the embedded model on
    /// random-weight presets built on the device (`--device cuda --presets 12b` on a GPU).
    Model {
        /// Presets to measure, comma-separated (tiny, small, 12b).
        #[arg(long, default_value = "tiny,small", value_delimiter = ',')]
        presets: Vec<String>,
        /// Prompt lengths for the prefill rows, comma-separated; the first is also the
        /// context the decode rows start from.
        #[arg(long, default_value = "512", value_delimiter = ',')]
        prompts: Vec<usize>,
        /// Tokens per prefill call (the engine prefills in chunks); 0 = whole prompt.
        #[arg(long, default_value_t = 512)]
        chunk: usize,
        /// Tokens to decode per measurement.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Decode batch sizes, comma-separated.
        #[arg(long, default_value = "1", value_delimiter = ',')]
        batches: Vec<usize>,
        /// Context sizes for the streaming rows (streamed audio frame, end of speech →
        /// first token), comma-separated; empty for none.
        #[arg(long, value_delimiter = ',')]
        contexts: Vec<usize>,
        /// Split a batch-1 decode step into weight reads, host time and the rest.
        #[arg(long)]
        profile: bool,
        /// cpu or cuda
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Comma-separated dtypes to measure.
        #[arg(long, default_value = "f32,bf16", value_delimiter = ',')]
        dtypes: Vec<String>,
        /// Also write the numbers as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Journald-friendly: no ANSI colours unless stderr is a terminal outside journald.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(hark::service::log_colours()).with_writer(std::io::stderr).try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            init_logging(&config.log.level);
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async move {
                let state = hark::server::AppState::from_config(config).await?;
                let listener = hark::server::bind(&state.config).await?;
                let addr = listener.local_addr()?;
                tracing::info!("hark listening on http://{addr} (realtime: ws://{addr}/v1/realtime, backend: {})", state.deps.backend.name());
                if !addr.ip().is_loopback() && state.config.server.api_keys.is_empty() {
                    tracing::warn!(
                        "hark listens on {addr}, reachable from other machines, and server.api_keys is empty: \
                         anyone who can reach this port can use the model and the agent's tools. Set server.api_keys."
                    );
                }
                hark::server::cancel_on_signals(state.shutdown.clone());
                hark::server::serve(listener, state).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "audio-devices"))]
        Command::Devices => anyhow::bail!("this hark was built without the `audio-devices` feature"),
        #[cfg(feature = "audio-devices")]
        Command::Devices => {
            let (inputs, outputs) = hark::sources::mic::list_devices().map_err(|e| anyhow::anyhow!("cannot list audio devices: {e}"))?;
            for (title, list) in [("inputs", inputs), ("outputs", outputs)] {
                println!("{title}:");
                if list.is_empty() {
                    println!("  (none)");
                }
                for d in list {
                    let mark = if d.is_default { " (default)" } else { "" };
                    println!("  {}{mark}\n    id: {}\n    default: {}", d.name, d.id, d.default_config.as_deref().unwrap_or("-"));
                    for c in d.configs {
                        println!("    supports: {c}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let report = hark::check::check(&config);
            for line in &report.problems {
                println!("{line}");
            }
            for line in &report.notes {
                println!("note: {line}");
            }
            if report.problems.is_empty() {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Tools { what: ToolsCommand::List { config } } => {
            let config = Config::load(&config)?;
            init_logging("warn");
            let (set, _) = hark::check::load_tool_specs(&config).map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async move {
                let registry = set.start().await.map_err(|p| {
                    anyhow::anyhow!("{}", p.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
                })?;
                print!("{}", registry.list_table());
                let agents = hark::tools::AgentSet::load_dir(&config.resolve(&config.agents_dir), &registry.catalog())
                    .map_err(|p| anyhow::anyhow!("{}", p.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")))?;
                println!();
                for a in &agents.agents {
                    println!("agent {} ({}): {}", a.name, a.source.display(), a.tool_names().join(", "));
                }
                registry.shutdown().await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Load { config, sessions, minutes, checkpoint, backend_url } } => {
            // A missing config file means the defaults (the bench sets what it needs).
            let config = if config.exists() { Config::load(&config)? } else { Config::default() };
            init_logging("warn");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(hark::bench::load::load(hark::bench::load::LoadBench { config, sessions, seconds: minutes * 60.0, checkpoint, backend_url }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Service { what: ServiceCommand::Install { config, print } } => {
            if print {
                print!("{}", hark::service::unit_for(&config)?);
            } else {
                let path = hark::service::install(&config)?;
                println!("wrote {}\nstart it with: systemctl --user daemon-reload && systemctl --user enable --now hark", path.display());
                println!("logs: journalctl --user -u hark -f");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Pipeline { config, streams, seconds, realtime } } => {
            let config = Config::load(&config)?;
            init_logging("warn");
            hark::bench::pipeline(&config, &streams, seconds, realtime)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "audio-devices")]
        Command::Bench { what: BenchCommand::Voice { config, turns, preset } } => {
            let config = Config::load(&config)?;
            init_logging("warn");
            hark::bench::voice(&config, turns, &preset)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "audio-devices"))]
        Command::Bench { what: BenchCommand::Voice { .. } } => anyhow::bail!("this hark was built without the `audio-devices` feature"),
        Command::Bench { what: BenchCommand::Latency { preset, contexts, speech, device, dtype } } => {
            init_logging("warn");
            hark::bench::latency(&preset, &contexts, speech, &device, &dtype)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Engine { preset, sessions, tokens, device, dtype } } => {
            init_logging("warn");
            hark::bench::engine(&preset, &sessions, tokens, &device, &dtype)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what: BenchCommand::Model { presets, prompts, chunk, decode, batches, contexts, profile, device, dtypes, json } } => {
            init_logging("warn");
            hark::bench::model(&hark::bench::ModelBench { presets, dtypes, device, prompts, chunk, decode, batches, contexts, profile, json })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { what: ModelCommand::Init { preset, random, dtype, seed, config_only, dir } } => {
            use hark::model::gemma4::init::{write_random_checkpoint, write_config, Preset};
            let p = Preset::parse(&preset).ok_or_else(|| anyhow::anyhow!("unknown preset '{preset}'; use tiny, small or 12b"))?;
            if config_only {
                write_config(p, &dir).with_context(|| format!("writing {}", dir.display()))?;
                println!("{}: config.json and tokenizer.json of the {preset} preset written", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            anyhow::ensure!(random, "hark can only make random-weight checkpoints; pass --random to say that is what you want");
            let bf16 = match dtype.as_str() {
                "bf16" => true,
                "f32" => false,
                other => anyhow::bail!("--dtype {other}: use bf16 or f32"),
            };
            let mut last = 0;
            write_random_checkpoint(p, &dir, bf16, seed, |done, total| {
                let pct = done * 100 / total.max(1);
                if pct >= last + 5 || done == total {
                    last = pct;
                    eprint!("\rwriting {}: {pct:>3}% of {} MB", dir.display(), total / 1_000_000);
                }
            })
            .with_context(|| format!("writing {}", dir.display()))?;
            eprintln!();
            println!("{}: random {preset} checkpoint written", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { what: ModelCommand::Parity { fixtures, device, dtype, tolerance, steps } } => {
            use hark::model::embedded::{select_device, select_dtype};
            let dt = select_dtype(&dtype)?;
            let tolerance = tolerance.unwrap_or(if dt == candle_core::DType::F32 { 1e-4 } else { 1e-2 });
            let rows = hark::model::gemma4::parity::check(&fixtures, &select_device(&device)?, dt, tolerance, steps)?;
            println!("hark model parity: {device} {dtype} against transformers' f32 logits (tolerance {tolerance:e}) and {steps} greedy steps of an f32 CPU run\n");
            println!("| case | relative error / matching steps | ok |");
            println!("|--|--:|--|");
            for r in &rows {
                let v = if r.case.contains("greedy") { format!("{}", r.value as usize) } else { format!("{:.2e}", r.value) };
                println!("| {} | {v} | {}{} |", r.case, if r.pass { "yes" } else { "NO" }, if r.detail.is_empty() { String::new() } else { format!(" ({})", r.detail) });
            }
            Ok(if rows.iter().all(|r| r.pass) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Model { what: ModelCommand::Pull { repo, dir } } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("models").join(repo.rsplit('/').next().unwrap_or(&repo)));
            let hub = hark::model::hub::Hub::from_env();
            let rt = tokio::runtime::Runtime::new()?;
            let mut current = String::new();
            let mut last_pct = u64::MAX;
            let files = rt.block_on(hark::model::hub::pull(&hub, &repo, &dir, |file, done, total| {
                let pct = if total == 0 { 100 } else { done * 100 / total };
                if file != current || pct != last_pct {
                    if file != current && !current.is_empty() {
                        eprintln!();
                    }
                    current = file.to_string();
                    last_pct = pct;
                    eprint!("\r{file}: {pct:>3}% of {:.1} MB", total as f64 / 1e6);
                }
            }))?;
            eprintln!();
            println!("{}: {} files from {repo}", dir.display(), files.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { what: ModelCommand::Logits { checkpoint, inputs, out } } => {
            hark::model::gemma4::logits_command(&checkpoint, &inputs, &out)?;
            println!("{}: logits written", out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
