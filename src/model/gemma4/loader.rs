//! Opens a checkpoint folder in the Hugging Face layout: `config.json` plus one or
//! more `*.safetensors` files (memory-mapped), in f32, bf16 or f16.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::Gemma4Config;
use super::model::Gemma4Model;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0} is not a checkpoint folder (no config.json); point hark at a folder in the Hugging Face layout, or make one with `hark model init`")]
    NoConfig(PathBuf),
    #[error("{0}: no *.safetensors files")]
    NoWeights(PathBuf),
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("loading weights from {path}: {source}")]
    Weights { path: PathBuf, source: candle_core::Error },
}

/// The weight files of a checkpoint, sorted.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| LoadError::NoConfig(dir.to_path_buf()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::NoWeights(dir.to_path_buf()));
    }
    Ok(files)
}

/// Loads the model from `dir` onto `device`, converting weights to `dtype`.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Gemma4Model, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(LoadError::NoConfig(dir.to_path_buf()));
    }
    let config = Gemma4Config::from_file(&config_path)?;
    let files = weight_files(dir)?;
    // Safety: the files are memory-mapped read-only; hark never writes to a checkpoint
    // while it is loaded (the same contract as every safetensors loader).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|source| LoadError::Weights { path: dir.to_path_buf(), source })?;
    Gemma4Model::load(config, vb).map_err(|source| LoadError::Weights { path: dir.to_path_buf(), source })
}
