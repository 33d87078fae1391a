//! The `command` speech engine: a program that reads the text on stdin and writes the
//! audio on stdout, run without a shell.
//!
//! argv is data: the text never becomes an argument, so nothing in it can act as an
//! option. Output is WAV (any rate, 16-bit or float) or raw 16-bit PCM at a configured
//! rate. Each call has a timeout; the child is killed when it runs past it or when the
//! synthesis is abandoned (`kill_on_drop`).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::{wav, Pcm, SpeechError};
use crate::config::{CommandSpeechConfig, SpeechOutputFormat};

#[derive(Debug, Clone)]
pub struct CommandEngine {
    argv: Vec<String>,
    format: SpeechOutputFormat,
    sample_rate: u32,
    timeout: Duration,
}

impl CommandEngine {
    pub fn new(c: &CommandSpeechConfig) -> Result<Self, SpeechError> {
        if c.argv.is_empty() || c.argv[0].is_empty() {
            return Err(SpeechError::Engine("speech.command.argv is empty: give the program and its arguments".into()));
        }
        if c.format == SpeechOutputFormat::Pcm && c.sample_rate == 0 {
            return Err(SpeechError::Engine("speech.command.sample_rate must be set for raw pcm output".into()));
        }
        Ok(Self { argv: c.argv.clone(), format: c.format, sample_rate: c.sample_rate, timeout: Duration::from_millis(c.timeout_ms) })
    }

    pub async fn synthesize(&self, text: &str) -> Result<Pcm, SpeechError> {
        let program = &self.argv[0];
        let mut child = tokio::process::Command::new(program)
            .args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| SpeechError::Engine(format!("cannot run {program}: {e}")))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = text.as_bytes().to_vec();
        // Write and read at once: a program that answers before reading everything
        // must not deadlock on a full pipe.
        let writer = async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.write_all(b"\n").await;
            drop(stdin);
        };
        let run = async {
            let (_, out) = tokio::join!(writer, child.wait_with_output());
            out
        };
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| SpeechError::Engine(format!("{program} took longer than {} ms", self.timeout.as_millis())))?
            .map_err(|e| SpeechError::Engine(format!("{program}: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(SpeechError::Engine(format!("{program} exited with {}: {}", out.status, err.trim())));
        }
        match self.format {
            SpeechOutputFormat::Wav => wav::decode(&out.stdout),
            SpeechOutputFormat::Pcm => Ok(wav::from_pcm16(&out.stdout, self.sample_rate)),
        }
    }
}
