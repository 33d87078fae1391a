//! The `http` speech engine: any OpenAI-compatible `POST /v1/audio/speech` server
//! (OpenAI, Kokoro-FastAPI, LocalAI, hark itself).
//!
//! Asks for `response_format: "pcm"` (raw 24 kHz 16-bit mono, as OpenAI defines it) or
//! `"wav"`, whichever the config says the server speaks.

use std::time::Duration;

use serde_json::json;

use super::{wav, Pcm, SpeechError};
use crate::config::{HttpSpeechConfig, SpeechOutputFormat};

#[derive(Debug, Clone)]
pub struct HttpEngine {
    url: String,
    api_key: Option<String>,
    model: String,
    voice: String,
    format: SpeechOutputFormat,
    sample_rate: u32,
    http: reqwest::Client,
}

impl HttpEngine {
    pub fn new(c: &HttpSpeechConfig) -> Result<Self, SpeechError> {
        if !(c.base_url.starts_with("http://") || c.base_url.starts_with("https://")) {
            return Err(SpeechError::Engine(format!("speech.http.base_url '{}' must start with http:// or https://", c.base_url)));
        }
        crate::tls::init();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(c.timeout_ms.min(10_000)))
            .timeout(Duration::from_millis(c.timeout_ms))
            .build()
            .map_err(|e| SpeechError::Engine(format!("HTTP client: {e}")))?;
        let api_key = match c.api_key.strip_prefix("${ENV:").and_then(|v| v.strip_suffix('}')) {
            Some(var) => Some(std::env::var(var).map_err(|_| SpeechError::Engine(format!("speech.http.api_key: {var} is not set")))?),
            None => (!c.api_key.is_empty()).then(|| c.api_key.clone()),
        };
        Ok(Self {
            url: format!("{}/audio/speech", c.base_url.trim_end_matches('/')),
            api_key,
            model: c.model.clone(),
            voice: c.voice.clone(),
            format: c.format,
            sample_rate: c.sample_rate,
            http,
        })
    }

    pub async fn synthesize(&self, text: &str) -> Result<Pcm, SpeechError> {
        let format = match self.format {
            SpeechOutputFormat::Pcm => "pcm",
            SpeechOutputFormat::Wav => "wav",
        };
        let mut req = self.http.post(&self.url).json(&json!({"model": self.model, "voice": self.voice, "input": text, "response_format": format}));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| SpeechError::Engine(format!("{}: {e}", self.url)))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| SpeechError::Engine(format!("{}: {e}", self.url)))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).to_string();
            return Err(SpeechError::Engine(format!("{} answered {status}: {}", self.url, text.trim())));
        }
        match self.format {
            SpeechOutputFormat::Wav => wav::decode(&body),
            SpeechOutputFormat::Pcm => Ok(wav::from_pcm16(&body, self.sample_rate)),
        }
    }
}
