//! Agent YAML: `agents/*.yaml`, one agent per file — instructions, which tools (names
//! or `*`/`?` globs, with per-tool overrides), and optional backend, turn detection,
//! vision, tool-round and greeting settings. See `agents/README.md` for the schema.
//!
//! [`AgentSet::load_dir`] resolves tool names and globs against a [`ToolCatalog`]:
//! [`super::ToolSet::catalog`] for `hark check` (where an MCP server's tools are not
//! known yet, so names under its `<server>_` prefix are accepted), or
//! [`super::ToolRegistry::catalog`] once everything runs (exact).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::glob_match;
use super::spec::is_valid_tool_name;
use super::yaml::{read_source, yaml_files, SourceFile, SpecError};

pub const DEFAULT_MAX_TOOL_ROUNDS: u32 = 4;
pub const MAX_TOOL_ROUNDS: u32 = 16;
/// Tokens per image the embedded model accepts (one per 48×48 patch).
pub const IMAGE_TOKEN_BUDGETS: [u32; 5] = [70, 140, 280, 560, 1120];

/// The tool names agents can be resolved against, with each tool's
/// `cancel_on_interruption` default.
#[derive(Debug, Clone, Default)]
pub struct ToolCatalog {
    tools: BTreeMap<String, bool>,
    /// Prefixes (`<server>_`) under which tools exist that are only known at run time.
    open_prefixes: Vec<String>,
}

impl ToolCatalog {
    pub fn insert(&mut self, name: &str, cancel_on_interruption: bool) {
        self.tools.insert(name.to_string(), cancel_on_interruption);
    }

    pub fn open_prefix(&mut self, prefix: &str) {
        self.open_prefixes.push(prefix.to_string());
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    fn matching(&self, glob: &str) -> Vec<&str> {
        self.tools.keys().filter(|n| glob_match(glob, n)).map(String::as_str).collect()
    }

    /// Whether `pattern` may name tools that only a running MCP server will list.
    fn maybe_open(&self, pattern: &str) -> bool {
        let literal: &str = pattern.split(['*', '?']).next().unwrap_or("");
        self.open_prefixes.iter().any(|p| literal.starts_with(p.as_str()) || (p.starts_with(literal) && literal.len() < pattern.len()))
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
    pub fn tool_names(&self) -> Vec<String> {
        self.tools.iter().map(|t| t.name.clone()).collect()
    }

    pub fn tool(&self, name: &str) -> Option<&AgentTool> {
        self.tools.iter().find(|t| t.name == name)
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
            if catalog.maybe_open(&entry.name) {
                continue; // an MCP server's tool, known once it runs
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
            match tools.iter_mut().find(|t| t.name == name) {
                Some(t) => {
                    if entry.cancel_on_interruption.is_some() {
                        t.cancel_on_interruption = cancel;
                    }
                }
                None => tools.push(AgentTool { name, cancel_on_interruption: cancel }),
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
