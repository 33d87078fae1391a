//! Text → IPA phonemes with the `espeak-ng` program.
//!
//! espeak-ng is GPL-3: hark runs it as a separate process and never links it. The
//! text goes in on stdin (never as an argument, so text that looks like an option is
//! still text), one clause per call, because the command line prints no clause
//! punctuation and Piper voices are trained on clauses followed by their terminator.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::SpeechError;

/// The espeak-ng program and voice.
#[derive(Debug, Clone)]
pub struct Espeak {
    pub program: PathBuf,
    /// espeak voice, from the Piper voice's `.onnx.json` (`espeak.voice`), e.g. `en-us`.
    pub voice: String,
}

impl Espeak {
    /// IPA phonemes of one clause (no punctuation), words separated by spaces.
    pub fn phonemes(&self, clause: &str) -> Result<String, SpeechError> {
        let mut child = Command::new(&self.program)
            .args(["-q", "--ipa", "-b", "1", "-v", &self.voice])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| SpeechError::Phonemizer(format!("cannot run {}: {e} (install the espeak-ng package)", self.program.display())))?;
        {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            // espeak treats a newline as a clause end: keep the clause one line.
            let line = clause.replace(['\n', '\r'], " ");
            stdin
                .write_all(line.as_bytes())
                .and_then(|_| stdin.write_all(b"\n"))
                .map_err(|e| SpeechError::Phonemizer(format!("writing to espeak-ng: {e}")))?;
        }
        let out = child.wait_with_output().map_err(|e| SpeechError::Phonemizer(format!("espeak-ng: {e}")))?;
        if !out.status.success() {
            return Err(SpeechError::Phonemizer(format!(
                "espeak-ng exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // espeak may still break a long clause over lines; they are one clause here.
        Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}
