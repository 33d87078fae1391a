//! What `/metrics` reports, in the Prometheus text format (prometheus-client).
//!
//! Sessions are not instrumented from inside: each transport hands every event a
//! session sends to an [`EventObserver`], which counts responses, tokens, errors and
//! tool calls and times the stages from the events themselves. So every transport
//! (WebSocket today, WebRTC and the local microphone session later) is measured the
//! same way, and the session code knows nothing of metrics.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::protocol::{ItemKind, ServerEvent};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    pub tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// Audio lost before it reached a session's buffer (or pushed out of it), counted in
/// 40 ms frames (the model's 640-sample frame at 16 kHz) by cause. The count is the
/// audio's length over 40 ms, so it can be fractional: drops come in pieces of any
/// length and rounding each up would overcount. A handle the audio paths keep (the
/// session, the microphone): clones count into the same counters.
#[derive(Clone, Debug, Default)]
pub struct AudioDrops(Family<SourceLabel, Counter<f64, AtomicU64>>);

impl AudioDrops {
    /// `input_buffer_full`: the input buffer passed `audio.max_buffer_seconds` and its
    /// oldest audio went. `append_too_large`: an `input_audio_buffer.append` over the
    /// size limit was refused. `mic_ring_overrun`: the capture callback found the ring
    /// full. `mic_queue_full`: the session fell behind the microphone.
    pub fn count(&self, source: &str, samples: u64, rate: u32) {
        if samples > 0 {
            self.0.get_or_create(&SourceLabel { source: source.into() }).inc_by(samples as f64 * 25.0 / rate.max(1) as f64);
        }
    }
}

/// Every metric hark exports. Cheap to update from any task (atomics inside).
pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions_total: Counter,
    pub requests_total: Family<EndpointLabel, Counter>,
    pub errors_total: Family<CodeLabel, Counter>,
    pub responses_total: Family<StatusLabel, Counter>,
    pub input_tokens_total: Counter,
    pub output_tokens_total: Counter,
    pub cached_tokens_total: Counter,
    /// Seconds from a stage's start: `speech_end_to_response` (end of speech →
    /// `response.created`), `first_token` (`response.created` → first output),
    /// `response` (`response.created` → `response.done`).
    pub latency_seconds: Family<StageLabel, Histogram>,
    pub tool_call_seconds: Family<ToolLabel, Histogram>,
    /// The embedded model's KV caches: bytes held now (running answers, streaming
    /// turns and kept sessions) and the configured budget; set at each scrape.
    pub kv_cache_bytes: Gauge,
    pub kv_budget_bytes: Gauge,
    /// Bytes all sessions hold (conversations, input buffers, queues both ways) and
    /// `server.max_total_bytes`; set at each scrape.
    pub session_bytes: Gauge,
    pub session_bytes_limit: Gauge,
    /// Prompt tokens of each finished response over the context window's limit.
    pub context_fill_ratio: Histogram,
    pub audio_frames_dropped: AudioDrops,
    /// The context window's limit in tokens (`session.context.max_tokens`).
    context_max_tokens: std::sync::atomic::AtomicU64,
}

fn seconds_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hark");
        let m = Metrics {
            sessions_active: Gauge::default(),
            sessions_total: Counter::default(),
            requests_total: Family::default(),
            errors_total: Family::default(),
            responses_total: Family::default(),
            input_tokens_total: Counter::default(),
            output_tokens_total: Counter::default(),
            cached_tokens_total: Counter::default(),
            latency_seconds: Family::new_with_constructor(seconds_histogram),
            tool_call_seconds: Family::new_with_constructor(seconds_histogram),
            kv_cache_bytes: Gauge::default(),
            kv_budget_bytes: Gauge::default(),
            session_bytes: Gauge::default(),
            session_bytes_limit: Gauge::default(),
            context_fill_ratio: Histogram::new([0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0].into_iter()),
            audio_frames_dropped: AudioDrops::default(),
            context_max_tokens: std::sync::atomic::AtomicU64::new(0),
            registry: Registry::default(),
        };
        registry.register("sessions_active", "Realtime sessions open now", m.sessions_active.clone());
        registry.register("sessions", "Realtime sessions opened", m.sessions_total.clone());
        registry.register("requests", "HTTP API requests by endpoint", m.requests_total.clone());
        registry.register("errors", "error events and API errors by code", m.errors_total.clone());
        registry.register("responses", "model responses by final status", m.responses_total.clone());
        registry.register("input_tokens", "prompt tokens of finished responses", m.input_tokens_total.clone());
        registry.register("output_tokens", "tokens generated", m.output_tokens_total.clone());
        registry.register("cached_tokens", "prompt tokens served from the model's cache", m.cached_tokens_total.clone());
        registry.register("latency_seconds", "time from a stage's start, by stage", m.latency_seconds.clone());
        registry.register("tool_call_seconds", "duration of tool calls hark runs, by tool", m.tool_call_seconds.clone());
        registry.register("kv_cache_bytes", "bytes of the embedded model's KV caches held now", m.kv_cache_bytes.clone());
        registry.register("kv_budget_bytes", "the embedded model's KV cache budget in bytes", m.kv_budget_bytes.clone());
        registry.register("session_bytes", "bytes all realtime sessions hold: conversations, input buffers, queued messages", m.session_bytes.clone());
        registry.register("session_bytes_limit", "server.max_total_bytes", m.session_bytes_limit.clone());
        registry.register(
            "context_fill_ratio",
            "prompt tokens of each finished response over the context window's limit",
            m.context_fill_ratio.clone(),
        );
        registry.register(
            "audio_frames_dropped",
            "40 ms frames of input audio lost, by cause (source)",
            m.audio_frames_dropped.0.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition for `GET /metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The context window's limit, for `context_fill_ratio`.
    pub fn set_context_limit(&self, tokens: usize) {
        self.context_max_tokens.store(tokens as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes the backend's memory figures (called before each render).
    pub fn set_backend_memory(&self, memory: Option<crate::model::BackendMemory>) {
        if let Some(m) = memory {
            self.kv_cache_bytes.set(m.kv_bytes as i64);
            self.kv_budget_bytes.set(m.kv_budget_bytes as i64);
        }
    }

    /// Takes the sessions' memory figures (called before each render).
    pub fn set_session_memory(&self, used: u64, limit: u64) {
        self.session_bytes.set(used.min(i64::MAX as u64) as i64);
        self.session_bytes_limit.set(limit.min(i64::MAX as u64) as i64);
    }

    pub fn count_usage(&self, input: u64, output: u64, cached: u64) {
        self.input_tokens_total.inc_by(input);
        self.output_tokens_total.inc_by(output);
        self.cached_tokens_total.inc_by(cached);
    }

    pub fn observe_stage(&self, stage: &str, seconds: f64) {
        self.latency_seconds.get_or_create(&StageLabel { stage: stage.into() }).observe(seconds);
    }
}

/// Follows one session's outgoing events. Create it when the session opens; drop it
/// when the session closes.
pub struct EventObserver<'m> {
    metrics: &'m Metrics,
    speech_end: Option<Instant>,
    response_start: Option<Instant>,
    first_output_seen: bool,
    /// mcp_call item id → (tool, started)
    tool_calls: HashMap<String, (String, Instant)>,
}

impl<'m> EventObserver<'m> {
    pub fn new(metrics: &'m Metrics) -> Self {
        metrics.sessions_total.inc();
        metrics.sessions_active.inc();
        Self { metrics, speech_end: None, response_start: None, first_output_seen: false, tool_calls: HashMap::new() }
    }

    pub fn observe(&mut self, ev: &ServerEvent) {
        let m = self.metrics;
        let now = Instant::now();
        match ev {
            ServerEvent::Error { error } => {
                m.errors_total.get_or_create(&CodeLabel { code: error.code.clone() }).inc();
            }
            ServerEvent::InputAudioBufferSpeechStopped { .. } => self.speech_end = Some(now),
            ServerEvent::ResponseCreated { .. } => {
                if let Some(t) = self.speech_end.take() {
                    m.observe_stage("speech_end_to_response", (now - t).as_secs_f64());
                }
                self.response_start = Some(now);
                self.first_output_seen = false;
            }
            ServerEvent::ResponseOutputTextDelta { .. }
            | ServerEvent::ResponseFunctionCallArgumentsDelta { .. }
            | ServerEvent::ResponseMcpCallArgumentsDelta { .. } => {
                if let (false, Some(t)) = (self.first_output_seen, self.response_start) {
                    self.first_output_seen = true;
                    m.observe_stage("first_token", (now - t).as_secs_f64());
                }
            }
            ServerEvent::ResponseOutputItemAdded { item, .. } if item.kind == ItemKind::McpCall => {
                self.tool_calls.insert(item.id.clone(), (item.name.clone().unwrap_or_default(), now));
            }
            ServerEvent::ResponseMcpCallCompleted { item_id, .. } | ServerEvent::ResponseMcpCallFailed { item_id, .. } => {
                if let Some((tool, started)) = self.tool_calls.remove(item_id) {
                    m.tool_call_seconds.get_or_create(&ToolLabel { tool }).observe((now - started).as_secs_f64());
                }
            }
            ServerEvent::ResponseDone { response } => {
                let status = serde_json::to_value(response.status).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                m.responses_total.get_or_create(&StatusLabel { status }).inc();
                if let Some(u) = &response.usage {
                    m.count_usage(u.input_tokens as u64, u.output_tokens as u64, u.input_token_details.cached_tokens as u64);
                    let limit = m.context_max_tokens.load(std::sync::atomic::Ordering::Relaxed);
                    if limit > 0 {
                        m.context_fill_ratio.observe(u.input_tokens as f64 / limit as f64);
                    }
                }
                if let Some(t) = self.response_start.take() {
                    m.observe_stage("response", (now - t).as_secs_f64());
                }
                // Every call of a finished response has its completed/failed event by
                // now, except tools left running after a cancel: forget those, so a long
                // session's map stays bounded.
                self.tool_calls.clear();
            }
            _ => {}
        }
    }
}

impl Drop for EventObserver<'_> {
    fn drop(&mut self) {
        self.metrics.sessions_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_sessions() {
        let m = Metrics::default();
        {
            let mut o = EventObserver::new(&m);
            o.observe(&ServerEvent::server_error("backend_timeout", "slow", None));
            assert!(m.render().contains("hark_sessions_active 1"));
        }
        let text = m.render();
        assert!(text.contains("hark_sessions_active 0"), "{text}");
        assert!(text.contains("hark_sessions_total 1"), "{text}");
        assert!(text.contains(r#"hark_errors_total{code="backend_timeout"} 1"#), "{text}");
    }

    #[test]
    fn dropped_audio_counts_40ms_frames() {
        let m = Metrics::default();
        let drops = m.audio_frames_dropped.clone();
        drops.count("input_buffer_full", 640, 16_000);
        drops.count("input_buffer_full", 320, 16_000);
        drops.count("mic_ring_overrun", 480, 48_000);
        drops.count("mic_queue_full", 0, 16_000);
        let text = m.render();
        assert!(text.contains(r#"hark_audio_frames_dropped_total{source="input_buffer_full"} 1.5"#), "{text}");
        assert!(text.contains(r#"hark_audio_frames_dropped_total{source="mic_ring_overrun"} 0.25"#), "{text}");
        assert!(!text.contains("mic_queue_full"), "{text}");
    }
}
