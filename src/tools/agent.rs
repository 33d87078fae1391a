//! Agent YAML: `agents/*.yaml`, one agent per file — instructions, which tools (names
//! or `*`/`?` globs, with per-tool overrides), and optional backend, turn detection,
//! vision, tool-round and greeting settings. See `agents/README.md` for the schema.
//!
//! [`AgentSet::load_dir`] resolves tool names and globs against a [`ToolCatalog`]:
//! [`super::ToolSet::catalog`] for `hark check` (where an MCP server's tools are not
//! known yet, so names under its `<server>_` prefix are accepted), or
//! [`super::ToolRegistry::catalog`] once everything runs (exact, except under the
//! prefix of a server that is not running yet: an agent naming its tools loads, and
//! gets them when the server comes up — see [`Agent::tool_names`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::glob_match;
use super::spec::is_valid_tool_name;
use super::yaml::{read_source, yaml_files, SourceFile, SpecError};

pub const DEFAULT_MAX_TOOL_ROUNDS: u32 = 4;
pub const MAX_TOOL_ROUNDS: u32 = 16;
/// Tokens per image the embedded model accepts (one per 48×48 patch).
pub const IMAGE_TOKEN_BUDGETS: [u32; 5] = [70, 140, 280, 560, 1120];

/// The names of the tools registered right now (a registry's tools change as MCP
/// servers come up), for agents whose tools were not all known when they loaded.
#[derive(Clone)]
pub struct LiveTools(Arc<dyn Fn() -> Vec<String> + Send + Sync>);

impl LiveTools {
    pub fn new(names: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Self {
        LiveTools(Arc::new(names))
    }

    fn names(&self) -> Vec<String> {
        (self.0)()
    }
}

impl PartialEq for LiveTools {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LiveTools {}

impl std::fmt::Debug for LiveTools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveTools")
    }
}

/// The tool names agents can be resolved against, with each tool's
/// `cancel_on_interruption` default.
#[derive(Debug, Clone, Default)]
pub struct ToolCatalog {
    tools: BTreeMap<String, bool>,
    /// Prefixes (`<server>_`) under which tools exist that are only known at run time,
    /// with the server's `cancel_on_interruption` default.
    open_prefixes: Vec<(String, bool)>,
    live: Option<LiveTools>,
}

impl ToolCatalog {
    pub fn insert(&mut self, name: &str, cancel_on_interruption: bool) {
        self.tools.insert(name.to_string(), cancel_on_interruption);
    }

    pub fn open_prefix(&mut self, prefix: &str, cancel_on_interruption: bool) {
        self.open_prefixes.push((prefix.to_string(), cancel_on_interruption));
    }

    /// Where agents look up, each time they are asked, tools under an open prefix.
    pub fn set_live(&mut self, live: LiveTools) {
        self.live = Some(live);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    fn matching(&self, glob: &str) -> Vec<&str> {
        self.tools.keys().filter(|n| glob_match(glob, n)).map(String::as_str).collect()
    }

    /// The open prefix `pattern` may name tools under (tools only a running MCP
    /// server will list), with its interruption default.
    fn maybe_open(&self, pattern: &str) -> Option<bool> {
        let literal: &str = pattern.split(['*', '?']).next().unwrap_or("");
        self.open_prefixes
            .iter()
            .find(|(p, _)| literal.starts_with(p.as_str()) || (p.starts_with(literal) && literal.len() < pattern.len()))
            .map(|(_, cancel)| *cancel)
    }
}

// ───────────────────────── file shapes ─────────────────────────

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    name: String,
    instructions: String,
    #[serde(default)]
    tools: Vec<ToolRef>,
    #[serde(default)]
    backend: Option<BackendOverride>,
    #[serde(default)]
    turn_detection: Option<TurnDetection>,
    #[serde(default)]
    vision: Option<VisionSettings>,
    #[serde(default)]
    max_tool_rounds: Option<u32>,
    #[serde(default)]
    greeting: Option<String>,
}

/// An entry of `tools:` — a name or glob, or `{name, cancel_on_interruption}`.
#[derive(Debug, Clone)]
struct ToolRef {
    name: String,
    cancel_on_interruption: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolRefMap {
    name: String,
    #[serde(default)]
    cancel_on_interruption: Option<bool>,
}

impl<'de> Deserialize<'de> for ToolRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ToolRef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tool name, a glob such as notes_*, or {name: …, cancel_on_interruption: …}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ToolRef, E> {
                Ok(ToolRef { name: v.to_string(), cancel_on_interruption: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ToolRef, A::Error> {
                let m = ToolRefMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ToolRef { name: m.name, cancel_on_interruption: m.cancel_on_interruption })
            }
        }
        d.deserialize_any(V)
    }
}

/// Which backend runs this agent, overriding `config.yaml`'s `backend.kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendOverride {
    pub kind: BackendChoice,
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    Embedded,
    Openai,
}

/// Turn detection as in the Realtime protocol's `session.turn_detection`; every field
/// optional, so an agent overrides only what it sets (the session layer merges).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnDetection {
    #[serde(rename = "type")]
    pub kind: TurnDetectionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_padding_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence_duration_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eagerness: Option<Eagerness>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_response: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupt_response: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnDetectionKind {
    ServerVad,
    SemanticVad,
    /// No automatic turns: the client commits (`turn_detection: null` on the wire).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eagerness {
    Low,
    Medium,
    High,
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSettings {
    /// Tokens per image: 70, 140, 280, 560 or 1120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokens: Option<u32>,
    /// Video frames sampled per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_fps: Option<f32>,
}

// ───────────────────────── resolved ─────────────────────────

/// One tool an agent may call, with its interruption rule resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTool {
    pub name: String,
    /// Cancel the call when the user barges in (the tool's default unless overridden).
    pub cancel_on_interruption: bool,
    /// Set on an entry that matched nothing when the agent loaded because its MCP
    /// server was not running: `name` is then the agent's name or glob, matched
    /// against the tools registered at the time of asking.
    pub pending: Option<LiveTools>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub name: String,
    pub instructions: String,
    /// Resolved, in file order, without duplicates (a later explicit entry's override wins).
    pub tools: Vec<AgentTool>,
    pub backend: Option<BackendOverride>,
    pub turn_detection: Option<TurnDetection>,
    pub vision: Option<VisionSettings>,
    pub max_tool_rounds: u32,
    pub greeting: Option<String>,
    pub source: PathBuf,
}

impl Agent {
    /// The agent's tools: those resolved when it loaded, then the tools of MCP servers
    /// that came up since and that a pending entry names.
    pub fn tool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tools.iter().filter(|t| t.pending.is_none()).map(|t| t.name.clone()).collect();
        for entry in &self.tools {
            if let Some(live) = &entry.pending {
                for name in live.names() {
                    if glob_match(&entry.name, &name) && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names
    }

    /// The agent's entry for `name`. For a tool of a server that came up after the
    /// agent loaded, that is the pending entry that admits it (its `name` is the
    /// agent's pattern; its `cancel_on_interruption` applies).
    pub fn tool(&self, name: &str) -> Option<&AgentTool> {
        if let Some(t) = self.tools.iter().find(|t| t.pending.is_none() && t.name == name) {
            return Some(t);
        }
        // The last entry that admits it wins, as a later entry's override does above.
        self.tools.iter().rev().find(|t| match &t.pending {
            Some(live) => glob_match(&t.name, name) && live.names().iter().any(|n| n == name),
            None => false,
        })
    }
}


#[derive(Debug, Clone, Default)]
pub struct AgentSet {
    pub agents: Vec<Agent>,
}

impl AgentSet {
    /// Reads every `*.yaml`/`*.yml` in `dir` (a missing folder holds no agents) and
    /// resolves their tools against `tools`. All problems are returned together.
    pub fn load_dir(dir: &Path, tools: &ToolCatalog) -> Result<AgentSet, Vec<SpecError>> {
        let files = yaml_files(dir).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let mut agents: Vec<Agent> = Vec::new();
        let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
        for path in files {
            let src = match read_source(&path) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match parse_agent(&src, tools) {
                Ok(agent) => {
                    let line = super::yaml::line_of(&src.text, "name");
                    if let Some((first, first_line)) = seen.get(&agent.name) {
                        errors.push(src.error(
                            "name",
                            format!("duplicate agent name {:?} (also defined in {}:{first_line})", agent.name, first.display()),
                        ));
                    } else {
                        seen.insert(agent.name.clone(), (path.clone(), line));
                        agents.push(agent);
                    }
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        if errors.is_empty() {
            Ok(AgentSet { agents })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.agents.iter().map(|a| a.name.as_str()).collect()
    }
}

/// One agent file given as text, resolved against `catalog`, as [`AgentSet::load_dir`]
/// reads each file. For fuzzing and for tools that edit files.
pub fn parse_agent_text(path: &Path, text: &str, catalog: &ToolCatalog) -> Result<Agent, Vec<SpecError>> {
    parse_agent(&SourceFile { path: path.to_path_buf(), text: text.to_string() }, catalog)
}

fn parse_agent(src: &SourceFile, catalog: &ToolCatalog) -> Result<Agent, Vec<SpecError>> {
    if src.text.trim().is_empty() {
        return Err(vec![src.error("name", "the file is empty (an agent needs at least name and instructions)")]);
    }
    let file: AgentFile = src.parse().map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    if !is_valid_tool_name(&file.name) {
        errors.push(src.error("name", format!("{:?} is not a valid agent name (1 to 64 of a-z A-Z 0-9 _ -)", file.name)));
    }
    let max_tool_rounds = file.max_tool_rounds.unwrap_or(DEFAULT_MAX_TOOL_ROUNDS);
    if max_tool_rounds > MAX_TOOL_ROUNDS {
        errors.push(src.error("max_tool_rounds", format!("{max_tool_rounds} must be within 0..={MAX_TOOL_ROUNDS}")));
    }
    if let Some(td) = &file.turn_detection {
        if let Some(t) = td.threshold {
            if !(0.0..=1.0).contains(&t) {
                errors.push(src.error("turn_detection.threshold", format!("{t} must be within 0..1")));
            }
        }
        if td.eagerness.is_some() && td.kind != TurnDetectionKind::SemanticVad {
            errors.push(src.error("turn_detection.eagerness", "only semantic_vad takes eagerness"));
        }
    }
    if let Some(v) = &file.vision {
        if let Some(n) = v.image_tokens {
            if !IMAGE_TOKEN_BUDGETS.contains(&n) {
                errors.push(src.error("vision.image_tokens", format!("{n} is not one of 70, 140, 280, 560, 1120")));
            }
        }
        if let Some(fps) = v.video_fps {
            if !(fps > 0.0 && fps <= 30.0) {
                errors.push(src.error("vision.video_fps", format!("{fps} must be above 0 and at most 30")));
            }
        }
    }
    if let Some(b) = &file.backend {
        if b.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            errors.push(src.error("backend.model", "empty; leave it out to use the configured model"));
        }
    }

    let mut tools: Vec<AgentTool> = Vec::new();
    for (i, entry) in file.tools.iter().enumerate() {
        let field = format!("tools[{i}]");
        let is_glob = entry.name.contains(['*', '?']);
        let names: Vec<String> = if is_glob {
            catalog.matching(&entry.name).into_iter().map(str::to_string).collect()
        } else if catalog.contains(&entry.name) {
            vec![entry.name.clone()]
        } else {
            Vec::new()
        };
        if names.is_empty() {
            if let Some(default) = catalog.maybe_open(&entry.name) {
                // An MCP server's tool, known once it runs.
                if let Some(live) = &catalog.live {
                    let cancel_on_interruption = entry.cancel_on_interruption.unwrap_or(default);
                    tools.push(AgentTool { name: entry.name.clone(), cancel_on_interruption, pending: Some(live.clone()) });
                }
                continue;
            }
            let problem = if is_glob {
                format!("no tool matches {:?}", entry.name)
            } else {
                format!("no tool named {:?}", entry.name)
            };
            errors.push(src.error(&field, problem));
            continue;
        }
        for name in names {
            let cancel = entry.cancel_on_interruption.unwrap_or_else(|| catalog.tools.get(&name).copied().unwrap_or(true));
            match tools.iter_mut().find(|t| t.pending.is_none() && t.name == name) {
                Some(t) => {
                    if entry.cancel_on_interruption.is_some() {
                        t.cancel_on_interruption = cancel;
                    }
                }
                None => tools.push(AgentTool { name, cancel_on_interruption: cancel, pending: None }),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Agent {
        name: file.name,
        instructions: file.instructions,
        tools,
        backend: file.backend,
        turn_detection: file.turn_detection,
        vision: file.vision,
        max_tool_rounds,
        greeting: file.greeting,
        source: src.path.clone(),
    })
}
