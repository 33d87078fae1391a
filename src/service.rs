//! `hark service install`: a systemd user unit that runs `hark serve` with this binary
//! and config, restarted on failure. Its logs go to the journal through stderr (hark
//! writes no colours there when it is not a terminal or runs under journald).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot find hark's own path: {0}")]
    Exe(std::io::Error),
    #[error("the config {path} does not exist (give --config): {source}")]
    Config { path: PathBuf, source: std::io::Error },
    #[error("no home directory (HOME is not set)")]
    NoHome,
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The unit's text for `exe` serving `config` (both absolute).
pub fn unit(exe: &Path, config: &Path) -> String {
    let workdir = config.parent().unwrap_or(Path::new("/"));
    format!(
        "[Unit]\n\
         Description=hark real-time voice agent\n\
         After=network-online.target sound.target pipewire.service pulseaudio.service\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         WorkingDirectory={wd}\n\
         ExecStart={exe} serve --config {config}\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         # Logs: stderr to the journal, no colours (hark sees JOURNAL_STREAM).\n\
         StandardOutput=journal\n\
         StandardError=journal\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        wd = quote(workdir),
        exe = quote(exe),
        config = quote(config),
    )
}

/// systemd splits ExecStart on spaces: paths that hold one are quoted.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains(char::is_whitespace) {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// Where the user unit lives: `$XDG_CONFIG_HOME/systemd/user/hark.service`
/// (`~/.config/...` by default).
pub fn unit_path() -> Result<PathBuf, ServiceError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty()).ok_or(ServiceError::NoHome)?).join(".config"),
    };
    Ok(base.join("systemd/user/hark.service"))
}

/// The unit for this binary and `config` (made absolute; it must exist).
pub fn unit_for(config: &Path) -> Result<String, ServiceError> {
    let exe = std::env::current_exe().map_err(ServiceError::Exe)?;
    let config = std::fs::canonicalize(config).map_err(|source| ServiceError::Config { path: config.to_path_buf(), source })?;
    Ok(unit(&exe, &config))
}

/// Writes the unit; returns its path.
pub fn install(config: &Path) -> Result<PathBuf, ServiceError> {
    let text = unit_for(config)?;
    let path = unit_path()?;
    let write = |p: &Path| -> std::io::Result<()> {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, &text)
    };
    write(&path).map_err(|source| ServiceError::Write { path: path.clone(), source })?;
    Ok(path)
}

/// Whether log lines may carry ANSI colours: only on a terminal, never under journald.
pub fn log_colours() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("JOURNAL_STREAM").is_none() && std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_the_binary_and_config_and_restarts() {
        let u = unit(Path::new("/opt/hark/bin/hark"), Path::new("/home/me/my hark/config.yaml"));
        assert!(u.contains("ExecStart=/opt/hark/bin/hark serve --config \"/home/me/my hark/config.yaml\"\n"), "{u}");
        assert!(u.contains("Restart=on-failure\n") && u.contains("WantedBy=default.target"));
        assert!(u.contains("WorkingDirectory=\"/home/me/my hark\"\n"));
    }
}
