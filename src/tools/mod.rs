//! Tools and agents from YAML (see `../shared/DESIGN.md` §5, `tools/README.md`,
//! `agents/README.md`).
//!
//! - [`spec`]: tool files and MCP server files → a validated [`ToolSet`] (nothing
//!   started; what `hark check` runs), then [`ToolSet::start`] → [`ToolRegistry`].
//! - [`agent`]: agent files → [`AgentSet`], tool names and globs resolved.
//! - [`registry`]: [`ToolRegistry`] — declarations for the model, and `call`, which
//!   validates arguments against the schema, applies the timeout and the cancel token,
//!   and always answers with a [`ToolOutcome`].
//! - Executors: [`builtin`] (clock, notes; [`calculator`] is its parser), [`command`]
//!   (argv, no shell), [`http`] (templated URLs, host allowlist), [`mcp`] (MCP servers
//!   over stdio via `rmcp`); [`supervisor`] keeps each MCP server running — one that
//!   cannot start or stops is marked unavailable and restarted with backoff, and the
//!   rest of hark goes on without it.
//! - [`template`]: `{param}` and `${ENV:NAME}` templates; [`yaml`]: reading files and
//!   reporting `file:line: field: problem`.
//!
//! `tools/` never imports `server/`; sessions drive the registry.

pub mod agent;
pub mod builtin;
pub mod calculator;
pub mod command;
pub mod http;
pub mod mcp;
pub mod registry;
pub mod spec;
pub mod supervisor;
pub mod template;
pub mod yaml;

pub use agent::{Agent, AgentSet, AgentTool, LiveTools, ToolCatalog};
pub use registry::{OutcomeKind, ToolDeclaration, ToolOutcome, ToolRegistry};
pub use spec::{ToolDef, ToolSet};
pub use supervisor::{McpSupervisor, ServerHealth, ServerState};
pub use yaml::SpecError;

/// `*` (any run of characters) and `?` (one character) globs over tool names; every
/// other character matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with one backtrack point for the last `*` (linear-ish, no recursion).
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("notes_*", "notes_add"));
        assert!(glob_match("notes_*", "notes_"));
        assert!(!glob_match("notes_*", "note"));
        assert!(glob_match("*time*", "time_get_current_time"));
        assert!(glob_match("get_?ime", "get_time"));
        assert!(!glob_match("get_?ime", "get_tiime"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", ""));
    }
}
