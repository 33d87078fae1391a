//! `POST /v1/audio/speech`: OpenAI's text-to-speech API on hark's speech engine, so any
//! OpenAI client (and another hark's `http` speech engine) can use the local voice.
//!
//! Answers `response_format` `pcm` (raw 24 kHz 16-bit mono, as OpenAI defines it) and
//! `wav`; other formats (mp3, opus, aac, flac) would need encoders hark does not carry
//! and are refused with 400 rather than answered in another format.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::speech::segment::Segmenter;
use crate::speech::stream::to_output_rate;
use crate::speech::OUTPUT_SAMPLE_RATE;

/// OpenAI's limit on `input`.
const MAX_INPUT_CHARS: usize = 4096;

#[derive(Debug, Deserialize)]
pub struct SpeechRequest {
    pub input: String,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub voice: Option<serde_json::Value>,
    #[serde(default)]
    pub response_format: Option<String>,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>, param: Option<&str>) -> Response {
    let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
    (status, Json(json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}}))).into_response()
}

pub async fn create(State(st): State<AppState>, body: Result<Json<SpeechRequest>, JsonRejection>) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(rej) => return error(rej.status(), "invalid_request", rej.body_text(), None),
    };
    let format = req.response_format.as_deref().unwrap_or("wav");
    if !matches!(format, "pcm" | "wav") {
        return error(StatusCode::BAD_REQUEST, "unsupported_format", format!("response_format '{format}' is not supported; use 'pcm' or 'wav'."), Some("response_format"));
    }
    if req.input.trim().is_empty() || req.input.chars().count() > MAX_INPUT_CHARS {
        return error(StatusCode::BAD_REQUEST, "invalid_value", format!("'input' must hold 1 to {MAX_INPUT_CHARS} characters."), Some("input"));
    }
    let Some(engine) = st.deps.speech.clone() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "speech_unavailable", "hark has no speech engine (speech.engine in config.yaml).", None);
    };
    // Sentence by sentence, as a response is spoken: one long synthesis call would cost
    // memory quadratic in the text on VITS voices.
    let mut seg = Segmenter::new();
    let mut pieces = seg.push(&req.input);
    pieces.extend(seg.finish());
    let mut samples = Vec::new();
    for piece in pieces {
        match engine.synthesize(&piece).await.and_then(|p| to_output_rate(p.sample_rate, p.samples)) {
            Ok(s) => samples.extend(s),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "speech_failed", e.to_string(), None),
        }
    }
    let pcm = crate::media::codec::encode_pcm16(&samples);
    let (content_type, body) = if format == "pcm" { ("audio/pcm", pcm) } else { ("audio/wav", wav_bytes(&pcm)) };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A 24 kHz mono 16-bit WAV around `pcm`.
fn wav_bytes(pcm: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(44 + pcm.len());
    w.extend(b"RIFF");
    w.extend((36 + pcm.len() as u32).to_le_bytes());
    w.extend(b"WAVEfmt ");
    w.extend(16u32.to_le_bytes());
    w.extend(1u16.to_le_bytes());
    w.extend(1u16.to_le_bytes());
    w.extend(OUTPUT_SAMPLE_RATE.to_le_bytes());
    w.extend((OUTPUT_SAMPLE_RATE * 2).to_le_bytes());
    w.extend(2u16.to_le_bytes());
    w.extend(16u16.to_le_bytes());
    w.extend(b"data");
    w.extend((pcm.len() as u32).to_le_bytes());
    w.extend_from_slice(pcm);
    w
}
