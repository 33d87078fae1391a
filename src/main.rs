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
    /// Validate the config (and the files it points to) without starting.
    Check {
        #[arg(long, short, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Measure parts of hark and print a table.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            init_logging(&config.log.level);
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async move {
                let state = hark::server::AppState::from_config(config)?;
                let listener = hark::server::bind(&state.config).await?;
                let addr = listener.local_addr()?;
                tracing::info!("hark listening on http://{addr} (realtime: ws://{addr}/v1/realtime, backend: {})", state.deps.backend.name());
                hark::server::cancel_on_signals(state.shutdown.clone());
                hark::server::serve(listener, state).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let report = hark::config::check(&config);
            for line in &report.problems {
                println!("{line}");
            }
            if report.problems.is_empty() {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Bench { what: BenchCommand::Pipeline { config, streams, seconds, realtime } } => {
            let config = Config::load(&config)?;
            init_logging("warn");
            hark::bench::pipeline(&config, &streams, seconds, realtime)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
