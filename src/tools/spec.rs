//! Tool YAML: `tools/*.yaml`, one tool per file, and MCP server declarations (files
//! whose top-level key is `mcp_server:`, by convention `NAME.mcp.yaml`).
//!
//! [`ToolSet::load_dir`] is the pure step: it reads and validates every file and
//! starts nothing (`hark check` uses it alone). [`ToolSet::start`] then starts the MCP
//! servers and builds the [`ToolRegistry`]. All problems are collected, each as
//! `file:line: field: problem`. See `tools/README.md` for the full schema.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::agent::ToolCatalog;
use super::builtin::BuiltinKind;
use super::registry::ToolRegistry;
use super::template::{is_env_name, Allow, Template};
use super::yaml::{read_source, yaml_files, SourceFile, SpecError};

pub const DEFAULT_BUILTIN_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 15_000;
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_MCP_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_STARTUP_TIMEOUT_MS: u64 = 10_000;
/// An MCP server that stopped or could not start is tried again after this delay,
/// doubled after each failure up to the maximum.
pub const DEFAULT_RESTART_DELAY_MS: u64 = 1_000;
pub const DEFAULT_MAX_RESTART_DELAY_MS: u64 = 60_000;
pub const MAX_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Upper bound for `max_output_bytes` / `max_response_bytes`: results go into a model's context.
pub const MAX_CAPTURE_BYTES: usize = 16 * 1024 * 1024;

/// `^[a-zA-Z0-9_-]{1,64}$`, the OpenAI function-name rule.
pub fn is_valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

// ───────────────────────── file shapes (serde) ─────────────────────────

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    handler: RawHandler,
    #[serde(default)]
    cancel_on_interruption: Option<bool>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    Builtin,
    Command,
    Http,
    Mcp,
}

impl HandlerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Builtin => "builtin",
            HandlerKind::Command => "command",
            HandlerKind::Http => "http",
            HandlerKind::Mcp => "mcp",
        }
    }

    /// The handler keys each kind takes (besides `kind`).
    fn fields(self) -> &'static [&'static str] {
        match self {
            HandlerKind::Builtin => &["name", "data_dir", "timeout_ms"],
            HandlerKind::Command => &["argv", "cwd", "env", "timeout_ms", "max_output_bytes"],
            HandlerKind::Http => &["method", "url", "headers", "body", "allow_hosts", "timeout_ms", "max_response_bytes"],
            HandlerKind::Mcp => &["server", "tool", "timeout_ms"],
        }
    }
}

/// Every handler key of every kind, so that a type error or an unknown key is reported
/// by serde with its exact position; which keys suit which kind is checked afterwards.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    kind: HandlerKind,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    argv: Option<Vec<String>>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_output_bytes: Option<usize>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    allow_hosts: Option<Vec<String>>,
    #[serde(default)]
    max_response_bytes: Option<usize>,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    tool: Option<String>,
}

impl RawHandler {
    fn present(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut add = |name: &'static str, set: bool| {
            if set {
                out.push(name);
            }
        };
        add("name", self.name.is_some());
        add("data_dir", self.data_dir.is_some());
        add("argv", self.argv.is_some());
        add("cwd", self.cwd.is_some());
        add("env", self.env.is_some());
        add("timeout_ms", self.timeout_ms.is_some());
        add("max_output_bytes", self.max_output_bytes.is_some());
        add("method", self.method.is_some());
        add("url", self.url.is_some());
        add("headers", self.headers.is_some());
        add("body", self.body.is_some());
        add("allow_hosts", self.allow_hosts.is_some());
        add("max_response_bytes", self.max_response_bytes.is_some());
        add("server", self.server.is_some());
        add("tool", self.tool.is_some());
        out
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct McpFile {
    mcp_server: RawServer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: String,
    command: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    expose: Expose,
    #[serde(default)]
    startup_timeout_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    cancel_on_interruption: Option<bool>,
    #[serde(default)]
    restart_delay_ms: Option<u64>,
    #[serde(default)]
    max_restart_delay_ms: Option<u64>,
}

/// Which of an MCP server's tools are registered as `<server>_<tool>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Expose {
    #[default]
    All,
    None,
    /// Tool names or `*`/`?` globs.
    Only(Vec<String>),
}

impl Expose {
    pub fn exposes(&self, tool: &str) -> bool {
        match self {
            Expose::All => true,
            Expose::None => false,
            Expose::Only(globs) => globs.iter().any(|g| super::glob_match(g, tool)),
        }
    }
}

impl<'de> Deserialize<'de> for Expose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Expose;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`all`, `none` or a list of tool names/globs")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Expose, E> {
                match v {
                    "all" => Ok(Expose::All),
                    "none" => Ok(Expose::None),
                    other => Err(E::custom(format!("unknown value `{other}`, expected `all`, `none` or a list of tool names"))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Expose, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Expose::Only(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ───────────────────────── validated definitions ─────────────────────────

/// One tool from one YAML file, validated. `description`/`parameters` are `None` only
/// for MCP tools that take them from the server.
#[derive(Debug, Clone)]
pub struct ToolDef {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    pub handler: Handler,
    pub cancel_on_interruption: bool,
    pub timeout: Duration,
    pub source: PathBuf,
}

#[derive(Debug, Clone)]
pub enum Handler {
    Builtin(BuiltinHandler),
    Command(CommandHandler),
    Http(HttpHandler),
    Mcp(McpHandler),
}

impl Handler {
    pub fn kind(&self) -> HandlerKind {
        match self {
            Handler::Builtin(_) => HandlerKind::Builtin,
            Handler::Command(_) => HandlerKind::Command,
            Handler::Http(_) => HandlerKind::Http,
            Handler::Mcp(_) => HandlerKind::Mcp,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BuiltinHandler {
    pub builtin: BuiltinKind,
    /// Where `notes` keeps its file (resolved against the base dir; default `data/`).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CommandHandler {
    /// argv[0]; a relative path with a `/` is resolved against the base dir, a bare
    /// name is looked up on `PATH`.
    pub program: PathBuf,
    /// argv[1..], each a template rendered into exactly one argument.
    pub args: Vec<Template>,
    pub cwd: PathBuf,
    /// Variables passed through from hark's environment (besides `PATH`).
    pub env: Vec<String>,
    pub max_output_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Delete,
    Patch,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Patch => "PATCH",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpHandler {
    pub method: HttpMethod,
    pub url: Template,
    /// Header values may hold `${ENV:NAME}`, read at call time.
    pub headers: Vec<(String, Template)>,
    /// Send the arguments as a JSON body.
    pub json_body: bool,
    /// Lower-case host names a request (or a redirect) may go to.
    pub allow_hosts: Vec<String>,
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct McpHandler {
    pub server: String,
    pub tool: String,
}

/// An MCP server declaration (`mcp_server:`).
#[derive(Debug, Clone)]
pub struct McpServerDef {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub expose: Expose,
    pub startup_timeout: Duration,
    /// Call timeout and interruption default of the tools it exposes.
    pub timeout: Duration,
    pub cancel_on_interruption: bool,
    /// The first delay before starting it again after it stopped or failed to start.
    pub restart_delay: Duration,
    /// The longest such delay (it doubles up to this).
    pub max_restart_delay: Duration,
    pub source: PathBuf,
}

/// Every tool and MCP server declared under one folder, validated, nothing started.
#[derive(Debug, Clone, Default)]
pub struct ToolSet {
    pub tools: Vec<ToolDef>,
    pub servers: Vec<McpServerDef>,
    pub base_dir: PathBuf,
}

impl ToolSet {
    /// Reads every `*.yaml`/`*.yml` in `dir` (a missing folder holds no tools). Relative
    /// paths in the files (`cwd`, `data_dir`, argv[0] with a `/`) resolve against `base_dir`.
    pub fn load_dir(dir: &Path, base_dir: &Path) -> Result<ToolSet, Vec<SpecError>> {
        let files = yaml_files(dir).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        let mut set = ToolSet { base_dir: base_dir.to_path_buf(), ..Default::default() };
        let mut sources: HashMap<PathBuf, SourceFile> = HashMap::new();
        for path in files {
            let src = match read_source(&path) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match parse_file(&src, base_dir) {
                Ok(Parsed::Tool(t)) => set.tools.push(t),
                Ok(Parsed::Server(s)) => set.servers.push(s),
                Err(mut e) => errors.append(&mut e),
            }
            sources.insert(path, src);
        }
        cross_check(&set, &sources, &mut errors);
        set.tools.sort_by(|a, b| a.name.cmp(&b.name));
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&ToolDef> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// What agents may name before any MCP server runs: the YAML tools, plus the
    /// `<server>_` prefixes of servers whose tools are only known once started.
    pub fn catalog(&self) -> ToolCatalog {
        let mut catalog = ToolCatalog::default();
        for t in &self.tools {
            catalog.insert(&t.name, t.cancel_on_interruption);
        }
        for s in &self.servers {
            if s.expose != Expose::None {
                catalog.open_prefix(&format!("{}_", s.name), s.cancel_on_interruption);
            }
        }
        catalog
    }

    /// Starts the MCP servers (each within its `startup_timeout_ms`), lists their tools
    /// and builds the registry. Errors name the server's file.
    pub async fn start(&self) -> Result<ToolRegistry, Vec<SpecError>> {
        ToolRegistry::start(self).await
    }
}

/// Validates one tool or MCP server file given as text, as [`ToolSet::load_dir`] does
/// each file (checks between files aside). For fuzzing and for tools that edit files.
pub fn check_tool_text(path: &Path, text: &str, base_dir: &Path) -> Result<(), Vec<SpecError>> {
    let src = SourceFile { path: path.to_path_buf(), text: text.to_string() };
    parse_file(&src, base_dir).map(|_| ())
}

enum Parsed {
    Tool(ToolDef),
    Server(McpServerDef),
}

fn parse_file(src: &SourceFile, base_dir: &Path) -> Result<Parsed, Vec<SpecError>> {
    let tree: serde_yaml_ng::Value = src.parse().map_err(|e| vec![e])?;
    let is_server = tree.as_mapping().is_some_and(|m| m.contains_key("mcp_server"));
    if tree.is_null() {
        return Err(vec![src.error("name", "the file is empty (a tool file needs name, description, parameters and handler)")]);
    }
    if is_server {
        let file: McpFile = src.parse().map_err(|e| vec![e])?;
        parse_server(src, file.mcp_server, base_dir).map(Parsed::Server)
    } else {
        let file: ToolFile = src.parse().map_err(|e| vec![e])?;
        parse_tool(src, file, base_dir).map(Parsed::Tool)
    }
}

fn timeout(src: &SourceFile, field: &str, ms: Option<u64>, default: u64, errors: &mut Vec<SpecError>) -> Duration {
    let ms = ms.unwrap_or(default);
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        errors.push(src.error(field, format!("{ms} must be within 1..={MAX_TIMEOUT_MS}")));
    }
    Duration::from_millis(ms)
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// argv[0] / `command[0]`: relative paths with a `/` resolve against the base dir.
fn resolve_program(base: &Path, program: &str) -> PathBuf {
    if program.contains('/') {
        resolve(base, Path::new(program))
    } else {
        PathBuf::from(program)
    }
}

fn check_env_names(src: &SourceFile, field: &str, names: &[String], errors: &mut Vec<SpecError>) {
    for (i, name) in names.iter().enumerate() {
        if !is_env_name(name) {
            errors.push(src.error(&format!("{field}[{i}]"), format!("{name:?} is not an environment variable name")));
        }
    }
}

fn parse_tool(src: &SourceFile, file: ToolFile, base_dir: &Path) -> Result<ToolDef, Vec<SpecError>> {
    let mut errors = Vec::new();
    let raw = file.handler;
    let kind = raw.kind;
    if !is_valid_tool_name(&file.name) {
        errors.push(src.error("name", format!("{:?} is not a valid tool name (1 to 64 of a-z A-Z 0-9 _ -)", file.name)));
    }
    for field in raw.present() {
        if !kind.fields().contains(&field) {
            errors.push(src.error(
                &format!("handler.{field}"),
                format!("not used by {} handlers (they take: kind, {})", kind.as_str(), kind.fields().join(", ")),
            ));
        }
    }
    if file.timeout_ms.is_some() && raw.timeout_ms.is_some() {
        errors.push(src.error("handler.timeout_ms", "timeout_ms is set both here and at the top level; keep one"));
    }
    let default_timeout = match kind {
        HandlerKind::Builtin => DEFAULT_BUILTIN_TIMEOUT_MS,
        HandlerKind::Command => DEFAULT_COMMAND_TIMEOUT_MS,
        HandlerKind::Http => DEFAULT_HTTP_TIMEOUT_MS,
        HandlerKind::Mcp => DEFAULT_MCP_TIMEOUT_MS,
    };
    let field = if raw.timeout_ms.is_some() { "handler.timeout_ms" } else { "timeout_ms" };
    let timeout = timeout(src, field, file.timeout_ms.or(raw.timeout_ms), default_timeout, &mut errors);

    let mut description = file.description;
    let mut parameters = file.parameters;
    let handler = match kind {
        HandlerKind::Builtin => {
            let builtin = match raw.name.as_deref() {
                None => {
                    errors.push(src.error("handler", format!("missing field `name` (builtins: {})", BuiltinKind::NAMES.join(", "))));
                    None
                }
                Some(n) => match BuiltinKind::from_name(n) {
                    Some(b) => Some(b),
                    None => {
                        errors.push(src.error("handler.name", format!("unknown builtin {n:?} (builtins: {})", BuiltinKind::NAMES.join(", "))));
                        None
                    }
                },
            };
            if let Some(b) = builtin {
                if raw.data_dir.is_some() && b != BuiltinKind::Notes {
                    errors.push(src.error("handler.data_dir", format!("only the notes builtin keeps data, not {}", b.name())));
                }
                description.get_or_insert_with(|| b.default_description().to_string());
                parameters.get_or_insert_with(|| b.default_parameters());
            }
            builtin.map(|builtin| {
                Handler::Builtin(BuiltinHandler {
                    builtin,
                    data_dir: resolve(base_dir, raw.data_dir.as_deref().unwrap_or(Path::new("data"))),
                })
            })
        }
        HandlerKind::Command => {
            parameters.get_or_insert_with(empty_schema);
            parse_command(src, &raw, base_dir, parameters.as_ref(), &mut errors)
        }
        HandlerKind::Http => {
            parameters.get_or_insert_with(empty_schema);
            parse_http(src, &raw, parameters.as_ref(), &mut errors)
        }
        HandlerKind::Mcp => {
            let server = raw.server.clone();
            let tool = raw.tool.clone();
            if server.is_none() {
                errors.push(src.error("handler", "missing field `server` (the mcp_server's name)"));
            }
            if tool.is_none() {
                errors.push(src.error("handler", "missing field `tool` (the tool's name on the server)"));
            }
            server.zip(tool).map(|(server, tool)| Handler::Mcp(McpHandler { server, tool }))
        }
    };
    if description.is_none() && kind != HandlerKind::Mcp {
        errors.push(src.error("description", "missing: the model decides when to call a tool from it"));
    }
    if let Some(schema) = &parameters {
        if let Err(problem) = check_schema(schema) {
            errors.push(src.error("parameters", problem));
        }
    }
    match handler {
        Some(handler) if errors.is_empty() => Ok(ToolDef {
            name: file.name,
            description,
            parameters,
            handler,
            cancel_on_interruption: file.cancel_on_interruption.unwrap_or(true),
            timeout,
            source: src.path.clone(),
        }),
        _ => Err(errors),
    }
}

fn empty_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// A tool's parameters: an object schema that compiles (JSON Schema, any draft the
/// `jsonschema` crate knows; remote `$ref`s are not fetched and fail here).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    let Some(obj) = schema.as_object() else {
        return Err("must be a JSON Schema object such as {type: object, properties: {…}}".into());
    };
    match obj.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        Some(other) => return Err(format!("type must be \"object\" (tool arguments are an object), not {other}")),
        None => return Err("type: missing; tool parameters must be {type: object, …}".into()),
    }
    if let Some(p) = obj.get("properties") {
        if !p.is_object() {
            return Err("properties must be a mapping of parameter name to schema".into());
        }
    }
    jsonschema::validator_for(schema).map(|_| ()).map_err(|e| {
        let at = e.instance_path().to_string();
        if at.is_empty() {
            format!("invalid JSON Schema: {e}")
        } else {
            format!("invalid JSON Schema at {at}: {e}")
        }
    })
}

fn schema_properties(parameters: Option<&Value>) -> Vec<String> {
    parameters
        .and_then(|p| p.get("properties"))
        .and_then(|p| p.as_object())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn check_placeholders(src: &SourceFile, field: &str, t: &Template, known: &[String], errors: &mut Vec<SpecError>) {
    for p in t.params() {
        if !known.iter().any(|k| k == p) {
            let have = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            errors.push(src.error(field, format!("unknown placeholder {{{p}}} (parameters.properties has: {have})")));
        }
    }
}

fn parse_command(
    src: &SourceFile,
    raw: &RawHandler,
    base_dir: &Path,
    parameters: Option<&Value>,
    errors: &mut Vec<SpecError>,
) -> Option<Handler> {
    let Some(argv) = raw.argv.as_ref() else {
        errors.push(src.error("handler", "missing field `argv` (the program and its arguments, no shell)"));
        return None;
    };
    let known = schema_properties(parameters);
    let Some(program) = argv.first() else {
        errors.push(src.error("handler.argv", "empty: the first element is the program to run"));
        return None;
    };
    let allow = Allow { params: true, env: false };
    match Template::parse(program, allow) {
        Ok(t) if t.has_references() => errors.push(src.error("handler.argv[0]", "the program cannot be a placeholder")),
        Err(e) => errors.push(src.error("handler.argv[0]", e)),
        Ok(_) => {}
    }
    if program.is_empty() {
        errors.push(src.error("handler.argv[0]", "empty program"));
    }
    let mut args = Vec::new();
    for (i, a) in argv.iter().enumerate().skip(1) {
        let field = format!("handler.argv[{i}]");
        match Template::parse(a, allow) {
            Ok(t) => {
                check_placeholders(src, &field, &t, &known, errors);
                args.push(t);
            }
            Err(e) => errors.push(src.error(&field, e)),
        }
    }
    let env = raw.env.clone().unwrap_or_default();
    check_env_names(src, "handler.env", &env, errors);
    let max_output_bytes = raw.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
    if max_output_bytes == 0 || max_output_bytes > MAX_CAPTURE_BYTES {
        errors.push(src.error("handler.max_output_bytes", format!("{max_output_bytes} must be within 1..={MAX_CAPTURE_BYTES}")));
    }
    Some(Handler::Command(CommandHandler {
        program: resolve_program(base_dir, program),
        args,
        cwd: raw.cwd.as_deref().map(|c| resolve(base_dir, c)).unwrap_or_else(|| base_dir.to_path_buf()),
        env,
        max_output_bytes,
    }))
}

fn parse_http(src: &SourceFile, raw: &RawHandler, parameters: Option<&Value>, errors: &mut Vec<SpecError>) -> Option<Handler> {
    let method = match raw.method.as_deref().map(|m| m.to_ascii_uppercase()) {
        None => HttpMethod::Get,
        Some(m) => match m.as_str() {
            "GET" => HttpMethod::Get,
            "POST" => HttpMethod::Post,
            "PUT" => HttpMethod::Put,
            "DELETE" => HttpMethod::Delete,
            "PATCH" => HttpMethod::Patch,
            _ => {
                errors.push(src.error("handler.method", format!("{m:?} is not one of GET, POST, PUT, DELETE, PATCH")));
                HttpMethod::Get
            }
        },
    };
    let json_body = match raw.body.as_deref() {
        None => matches!(method, HttpMethod::Post | HttpMethod::Put | HttpMethod::Patch),
        Some("json") => {
            if method == HttpMethod::Get {
                errors.push(src.error("handler.body", "a GET request has no body; use POST, PUT or PATCH"));
            }
            true
        }
        Some("none") => false,
        Some(other) => {
            errors.push(src.error("handler.body", format!("{other:?} is not json or none")));
            false
        }
    };
    let Some(url_text) = raw.url.as_deref() else {
        errors.push(src.error("handler", "missing field `url`"));
        return None;
    };
    let url = match Template::parse(url_text, Allow { params: true, env: true }) {
        Ok(t) => t,
        Err(e) => {
            errors.push(src.error("handler.url", e));
            return None;
        }
    };
    check_placeholders(src, "handler.url", &url, &schema_properties(parameters), errors);
    let host = match super::http::template_host(&url) {
        Ok(h) => h,
        Err(e) => {
            errors.push(src.error("handler.url", e));
            return None;
        }
    };
    let allow_hosts: Vec<String> = match &raw.allow_hosts {
        None => vec![host.clone()],
        Some(list) => {
            let list: Vec<String> = list.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
            if !list.contains(&host) {
                errors.push(src.error("handler.allow_hosts", format!("does not contain the url's own host {host:?}")));
            }
            for (i, h) in list.iter().enumerate() {
                if h.is_empty() || h.contains(['/', '@', '?', '#', ' ']) {
                    errors.push(src.error(&format!("handler.allow_hosts[{i}]"), format!("{h:?} is not a host name")));
                }
            }
            list
        }
    };
    let mut headers = Vec::new();
    for (name, value) in raw.headers.iter().flatten() {
        let field = format!("handler.headers.{name}");
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            errors.push(src.error(&field, format!("{name:?} is not a valid header name")));
        }
        match Template::parse(value, Allow { params: false, env: true }) {
            Ok(t) => headers.push((name.clone(), t)),
            Err(e) => errors.push(src.error(&field, e)),
        }
    }
    let max_response_bytes = raw.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
    if max_response_bytes == 0 || max_response_bytes > MAX_CAPTURE_BYTES {
        errors.push(src.error("handler.max_response_bytes", format!("{max_response_bytes} must be within 1..={MAX_CAPTURE_BYTES}")));
    }
    Some(Handler::Http(HttpHandler { method, url, headers, json_body, allow_hosts, max_response_bytes }))
}

/// Server names become tool-name prefixes, so they follow the tool-name rule, shorter.
fn is_valid_server_name(name: &str) -> bool {
    (1..=32).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_server(src: &SourceFile, raw: RawServer, base_dir: &Path) -> Result<McpServerDef, Vec<SpecError>> {
    let mut errors = Vec::new();
    if !is_valid_server_name(&raw.name) {
        errors.push(src.error("mcp_server.name", format!("{:?} is not a valid server name (1 to 32 of a-z A-Z 0-9 _ -)", raw.name)));
    }
    if raw.command.first().is_none_or(|p| p.is_empty()) {
        errors.push(src.error("mcp_server.command", "empty: the first element is the program to run"));
    }
    check_env_names(src, "mcp_server.env", &raw.env, &mut errors);
    let startup = timeout(src, "mcp_server.startup_timeout_ms", raw.startup_timeout_ms, DEFAULT_STARTUP_TIMEOUT_MS, &mut errors);
    let call = timeout(src, "mcp_server.timeout_ms", raw.timeout_ms, DEFAULT_MCP_TIMEOUT_MS, &mut errors);
    let restart = timeout(src, "mcp_server.restart_delay_ms", raw.restart_delay_ms, DEFAULT_RESTART_DELAY_MS, &mut errors);
    let max_restart = timeout(src, "mcp_server.max_restart_delay_ms", raw.max_restart_delay_ms, DEFAULT_MAX_RESTART_DELAY_MS, &mut errors);
    if max_restart < restart {
        errors.push(src.error(
            "mcp_server.max_restart_delay_ms",
            format!("{} is below restart_delay_ms ({})", max_restart.as_millis(), restart.as_millis()),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut command = raw.command.into_iter();
    let program = command.next().unwrap_or_default();
    Ok(McpServerDef {
        name: raw.name,
        program: resolve_program(base_dir, &program),
        args: command.collect(),
        env: raw.env,
        cwd: raw.cwd.as_deref().map(|c| resolve(base_dir, c)).unwrap_or_else(|| base_dir.to_path_buf()),
        expose: raw.expose,
        startup_timeout: startup,
        timeout: call,
        cancel_on_interruption: raw.cancel_on_interruption.unwrap_or(true),
        restart_delay: restart,
        max_restart_delay: max_restart,
        source: src.path.clone(),
    })
}

/// Problems between files: duplicate names, MCP tools naming undeclared servers.
fn cross_check(set: &ToolSet, sources: &HashMap<PathBuf, SourceFile>, errors: &mut Vec<SpecError>) {
    let at = |path: &Path, field: &str, problem: String| match sources.get(path) {
        Some(src) => src.error(field, problem),
        None => SpecError::Invalid { path: path.display().to_string(), line: 0, message: format!("{field}: {problem}") },
    };
    let line = |path: &Path, field: &str| sources.get(path).map(|s| super::yaml::line_of(&s.text, field)).unwrap_or(0);
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for t in &set.tools {
        if let Some(first) = seen.insert(&t.name, &t.source) {
            errors.push(at(
                &t.source,
                "name",
                format!("duplicate tool name {:?} (also defined in {}:{})", t.name, first.display(), line(first, "name")),
            ));
        }
    }
    let mut servers: HashMap<&str, &Path> = HashMap::new();
    for s in &set.servers {
        if let Some(first) = servers.insert(&s.name, &s.source) {
            errors.push(at(
                &s.source,
                "mcp_server.name",
                format!("duplicate MCP server name {:?} (also declared in {}:{})", s.name, first.display(), line(first, "mcp_server.name")),
            ));
        }
    }
    for t in &set.tools {
        if let Handler::Mcp(m) = &t.handler {
            if !servers.contains_key(m.server.as_str()) {
                let declared: Vec<&str> = set.servers.iter().map(|s| s.name.as_str()).collect();
                let declared = if declared.is_empty() { "none".to_string() } else { declared.join(", ") };
                errors.push(at(&t.source, "handler.server", format!("no MCP server named {:?} (declared: {declared})", m.server)));
            }
        }
    }
}
