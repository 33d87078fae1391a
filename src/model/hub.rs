//! `hark model pull`: downloads a checkpoint from a Hugging Face-compatible hub.
//!
//! Only the files hark reads are fetched (config, tokenizer, safetensors shards).
//! Downloads go to `*.part` files renamed on completion, so an interrupted pull
//! never leaves a truncated file that looks complete; finished files of the right
//! size are skipped on a re-run. `HF_ENDPOINT` and `HF_TOKEN` work as in
//! `huggingface_hub`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("cannot reach {endpoint} ({reason}). Without a network, download the checkpoint on another machine and copy its folder here")]
    Unreachable { endpoint: String, reason: String },
    #[error("{repo}: access denied (HTTP {status}). Gemma weights are gated: accept the license on the model page and set HF_TOKEN")]
    Denied { repo: String, status: u16 },
    #[error("{repo}: no such repository or revision on {endpoint}")]
    NotFound { repo: String, endpoint: String },
    #[error("{0}")]
    Other(String),
}

/// Where to download from.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    pub revision: String,
}

impl Hub {
    /// `HF_ENDPOINT` (default https://huggingface.co) and `HF_TOKEN` from the environment.
    pub fn from_env() -> Self {
        Self {
            endpoint: std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()).trim_end_matches('/').to_string(),
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
            revision: "main".into(),
        }
    }
}

/// Files a checkpoint needs.
fn wanted(name: &str) -> bool {
    !name.contains('/')
        && (name.ends_with(".safetensors")
            || matches!(
                name,
                "config.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "generation_config.json"
                    | "special_tokens_map.json"
                    | "chat_template.jinja"
                    | "processor_config.json"
                    | "preprocessor_config.json"
                    | "model.safetensors.index.json"
            ))
}

/// Downloads `repo` into `dir`. `progress(file, done, total)` is called as bytes arrive.
pub async fn pull(hub: &Hub, repo: &str, dir: &Path, mut progress: impl FnMut(&str, u64, u64)) -> Result<Vec<PathBuf>, HubError> {
    crate::tls::init();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| HubError::Other(e.to_string()))?;
    let unreachable = |e: reqwest::Error| HubError::Unreachable { endpoint: hub.endpoint.clone(), reason: root_cause(&e) };
    let auth = |r: reqwest::RequestBuilder| match &hub.token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    let api = format!("{}/api/models/{repo}/revision/{}", hub.endpoint, hub.revision);
    let resp = auth(client.get(&api)).send().await.map_err(unreachable)?;
    check_status(resp.status().as_u16(), repo, hub)?;
    let info: Value = resp.json().await.map_err(|e| HubError::Other(format!("{api}: unexpected answer: {e}")))?;
    let files: Vec<String> = info["siblings"]
        .as_array()
        .map(|s| s.iter().filter_map(|f| f["rfilename"].as_str()).filter(|n| wanted(n)).map(str::to_string).collect())
        .unwrap_or_default();
    if !files.iter().any(|f| f == "config.json") {
        return Err(HubError::Other(format!("{repo} has no config.json; is it a model repository?")));
    }
    tokio::fs::create_dir_all(dir).await.map_err(|e| HubError::Other(format!("{}: {e}", dir.display())))?;
    let mut out = Vec::new();
    for name in files {
        let url = format!("{}/{repo}/resolve/{}/{name}", hub.endpoint, hub.revision);
        let resp = auth(client.get(&url)).send().await.map_err(unreachable)?;
        check_status(resp.status().as_u16(), repo, hub)?;
        let total = resp.content_length().unwrap_or(0);
        let dest = dir.join(&name);
        if let Ok(meta) = tokio::fs::metadata(&dest).await {
            if total > 0 && meta.len() == total {
                progress(&name, total, total);
                out.push(dest);
                continue;
            }
        }
        let part = dir.join(format!("{name}.part"));
        let mut file = tokio::fs::File::create(&part).await.map_err(|e| HubError::Other(format!("{}: {e}", part.display())))?;
        let mut stream = resp.bytes_stream();
        let mut done = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(unreachable)?;
            file.write_all(&chunk).await.map_err(|e| HubError::Other(format!("{}: {e}", part.display())))?;
            done += chunk.len() as u64;
            progress(&name, done, total.max(done));
        }
        file.flush().await.map_err(|e| HubError::Other(e.to_string()))?;
        drop(file);
        if total > 0 && done != total {
            return Err(HubError::Other(format!("{name}: got {done} of {total} bytes; run the pull again to resume")));
        }
        tokio::fs::rename(&part, &dest).await.map_err(|e| HubError::Other(e.to_string()))?;
        out.push(dest);
    }
    Ok(out)
}

fn check_status(status: u16, repo: &str, hub: &Hub) -> Result<(), HubError> {
    match status {
        200..=299 => Ok(()),
        401 | 403 => Err(HubError::Denied { repo: repo.into(), status }),
        404 => Err(HubError::NotFound { repo: repo.into(), endpoint: hub.endpoint.clone() }),
        s => Err(HubError::Other(format!("{repo}: {} answered HTTP {s}", hub.endpoint))),
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
