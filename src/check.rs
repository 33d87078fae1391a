//! `hark check`: the config, the files it names, the checkpoint, and every tool and
//! agent YAML — the checks that need other parts of hark, kept out of `config.rs`,
//! which validates only its own fields.
//!
//! MCP servers are started (as `hark tools list` does) to learn whether they run and
//! what tools they have. One that cannot start is a problem here, although
//! `hark serve` starts without it (its tools answer "unavailable" while it is retried
//! in the background): `check` is the pre-flight that should fail until it is fixed.

use std::path::Path;

use crate::config::{BackendKind, Config, VadKind};

/// Reads and validates `tools_dir` and `agents_dir` without starting anything (MCP
/// servers' tools are accepted under their server's prefix). Every problem is returned,
/// each as `file:line: field: problem`.
pub fn load_tool_specs(config: &Config) -> Result<(crate::tools::ToolSet, crate::tools::AgentSet), Vec<String>> {
    let base = config.resolve(Path::new("."));
    let tools = crate::tools::ToolSet::load_dir(&config.resolve(&config.tools_dir), &base)
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    let agents = crate::tools::AgentSet::load_dir(&config.resolve(&config.agents_dir), &tools.catalog())
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    Ok((tools, agents))
}

/// What `hark check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    /// Facts worth knowing that are not problems (what the KV budget holds).
    pub notes: Vec<String>,
}

/// What one session's KV cache costs on the embedded model, in bytes: a fixed part
/// (sliding layers hold their window, the rollback slack and a spare quarter) and a
/// part per token of context (global layers keep every position).
pub fn kv_cost(cfg: &crate::model::gemma4::config::TextConfig, dtype_bytes: usize) -> (usize, usize) {
    use crate::model::gemma4::cache::{ROLLBACK_SLACK, SLIDING_SPARE};
    use crate::model::gemma4::config::LayerKind;
    let held = cfg.sliding_window + ROLLBACK_SLACK + SLIDING_SPARE;
    let per_position = |l: &crate::model::gemma4::config::LayerSpec| 2 * l.num_kv_heads * l.head_dim * dtype_bytes;
    let fixed = cfg.layers.iter().filter(|l| l.kind == LayerKind::Sliding).map(|l| per_position(l) * held).sum();
    let per_token = cfg.layers.iter().filter(|l| l.kind == LayerKind::Full).map(per_position).sum();
    (fixed, per_token)
}

/// Validates the config file, the files it names, and the YAML under `agents/` and `tools/`.
pub fn check(path: &Path) -> CheckReport {
    let mut report = CheckReport::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    if config.audio.vad == VadKind::Silero {
        let lib = config.onnxruntime_library();
        let model = config.resolve(&config.audio.silero_model);
        if let Err(e) = crate::media::vad::SileroModel::load(&lib, &model) {
            report.problems.push(format!("{}: audio: {e}", path.display()));
        }
    }
    if config.audio.activation == crate::config::Activation::WakeWord {
        let w = &config.audio.wake_word;
        let paths = crate::media::wake::WakeModelPaths {
            melspectrogram: config.resolve(&w.melspectrogram),
            embedding: config.resolve(&w.embedding),
            model: config.resolve(&w.model),
        };
        if let Err(e) = crate::media::wake::WakeModel::load(&config.onnxruntime_library(), &paths) {
            report.problems.push(format!("{}: audio.wake_word: {e}", path.display()));
        }
    }
    if config.backend.kind == BackendKind::Embedded {
        let dir = config.resolve(&config.backend.embedded.checkpoint);
        let cfg = dir.join("config.json");
        if !cfg.exists() {
            report.problems.push(format!(
                "{}: backend.embedded.checkpoint: no checkpoint at {} (put a gemma4_unified checkpoint there, \
                 or make a random stand-in with `hark model init --preset tiny --random {}`)",
                path.display(),
                dir.display(),
                dir.display()
            ));
        } else {
            match crate::model::gemma4::Gemma4Config::from_file(&cfg) {
                Err(e) => report.problems.push(format!("{}: {e}", cfg.display())),
                Ok(model) => report.notes.push(kv_note(&config, &model.text)),
            }
            if !dir.join("tokenizer.json").exists() {
                report.problems.push(format!("{}: tokenizer.json is missing", dir.display()));
            }
            if let Err(e) = crate::model::gemma4::loader::weight_files(&dir) {
                report.problems.push(e.to_string());
            }
        }
        if let Err(e) = crate::model::embedded::select_dtype(&config.backend.embedded.dtype) {
            report.problems.push(format!("{}: backend.embedded.dtype: {e}", path.display()));
        }
    }
    match load_tool_specs(&config) {
        Ok((tools, agents)) => {
            if let Some(name) = &config.session.agent {
                if agents.get(name).is_none() {
                    report.problems.push(format!(
                        "{}: session.agent: no agent named \"{name}\" in {}",
                        path.display(),
                        config.resolve(&config.agents_dir).display()
                    ));
                }
            }
            report.problems.extend(start_mcp_servers(&tools));
        }
        Err(problems) => report.problems.extend(problems),
    }
    report
}

/// Most sessions `server.max_sessions: auto` admits.
pub const AUTO_MAX_SESSIONS: usize = 64;

/// Context length a session is assumed to reach when `auto` sizes the session limit
/// from the KV budget: a conversation of some minutes, not the full window.
const AUTO_CONTEXT_TOKENS: usize = 8192;

fn dtype_bytes(config: &Config) -> usize {
    match config.backend.embedded.dtype.as_str() {
        "f32" => 4,
        _ => 2,
    }
}

/// Sessions whose KV caches fit `backend.embedded.kv_budget_mb` at `tokens` of context.
fn sessions_that_fit(config: &Config, text: &crate::model::gemma4::config::TextConfig, tokens: usize) -> usize {
    let (fixed, per_token) = kv_cost(text, dtype_bytes(config));
    config.backend.embedded.kv_budget_mb.saturating_mul(1 << 20) / (fixed + per_token * tokens).max(1)
}

/// `server.max_sessions: auto` on the embedded model: the sessions whose caches fit the
/// KV budget at 8K tokens of context, at least 1 and at most [`AUTO_MAX_SESSIONS`].
/// More would run, but each would evict another's cache and prefill its whole context
/// again at every turn.
pub fn auto_max_sessions(config: &Config, text: &crate::model::gemma4::config::TextConfig) -> usize {
    sessions_that_fit(config, text, AUTO_CONTEXT_TOKENS).clamp(1, AUTO_MAX_SESSIONS)
}

/// The session limit the server applies, and where it comes from (for the log).
pub fn max_sessions(config: &Config) -> (usize, String) {
    if let Some(n) = config.server.max_sessions {
        return (n, "server.max_sessions".into());
    }
    if config.backend.kind != BackendKind::Embedded {
        return (AUTO_MAX_SESSIONS, "server.max_sessions: auto, remote backend".into());
    }
    let file = config.resolve(&config.backend.embedded.checkpoint).join("config.json");
    match crate::model::gemma4::Gemma4Config::from_file(&file) {
        Ok(model) => (
            auto_max_sessions(config, &model.text),
            format!("server.max_sessions: auto, what backend.embedded.kv_budget_mb ({} MiB) keeps cached at 8K tokens", config.backend.embedded.kv_budget_mb),
        ),
        Err(e) => (AUTO_MAX_SESSIONS, format!("server.max_sessions: auto, default (cannot read {}: {e})", file.display())),
    }
}

/// How many sessions the KV budget keeps cached, at a short and at a full context, and
/// the session limit that follows: sessions beyond what fits would evict each other's
/// caches (least recently used) and prefill their context again when they next speak.
fn kv_note(config: &Config, text: &crate::model::gemma4::config::TextConfig) -> String {
    let (fixed, per_token) = kv_cost(text, dtype_bytes(config));
    let full = config.session.context.max_tokens.min(text.max_position_embeddings);
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let limit = match config.server.max_sessions {
        None => format!("server.max_sessions is auto: {} sessions at once", auto_max_sessions(config, text)),
        Some(n) if n > sessions_that_fit(config, text, AUTO_CONTEXT_TOKENS) => {
            format!("server.max_sessions is {n}: sessions beyond what fits re-prefill their context when they next speak")
        }
        Some(n) => format!("server.max_sessions is {n}"),
    };
    format!(
        "backend.embedded.kv_budget_mb: {} MiB keeps {} sessions cached at 8K tokens of context, {} at the full {full} \
         ({:.0} MiB + {:.1} KiB per token each, {}); {limit}",
        config.backend.embedded.kv_budget_mb,
        sessions_that_fit(config, text, AUTO_CONTEXT_TOKENS),
        sessions_that_fit(config, text, full),
        mib(fixed),
        per_token as f64 / 1024.0,
        config.backend.embedded.dtype,
    )
}

/// Starts the set's MCP servers, then stops them: what would keep tools from running.
fn start_mcp_servers(tools: &crate::tools::ToolSet) -> Vec<String> {
    if tools.servers.is_empty() {
        return Vec::new();
    }
    let tools = tools.clone();
    // A runtime of its own on a thread of its own: `check` may be called from inside
    // another runtime, where blocking on one would panic.
    let run = std::thread::spawn(move || -> Vec<String> {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return vec![format!("cannot start an async runtime to try the MCP servers: {e}")],
        };
        rt.block_on(async move {
            let registry = match tools.start().await {
                Ok(r) => r,
                Err(errors) => return errors.iter().map(|e| e.to_string()).collect(),
            };
            let problems = registry
                .health()
                .into_iter()
                .filter(|h| !h.is_running())
                .map(|h| {
                    format!(
                        "{}: mcp_server {}: cannot start ({}); `hark serve` would run without its tools and keep retrying",
                        h.source.display(),
                        h.name,
                        h.last_error.unwrap_or_else(|| "no reason given".into())
                    )
                })
                .collect();
            registry.shutdown().await;
            problems
        })
    });
    run.join().unwrap_or_else(|_| vec!["trying the MCP servers failed unexpectedly".to_string()])
}
