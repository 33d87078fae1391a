//! Gemma 4 prompt text: the chat template, rendered without a Jinja engine.
//!
//! The reference is the chat template that `transformers`' `gemma4_unified` conversion
//! script copies for the 12B (`convert_gemma4_unified_weights.py`: `_CHAT_TEMPLATE =
//! cached_file("google/gemma-4-31B-it", "chat_template.jinja")`), in its current form (the
//! one with `format_tool_response_block` and role `tool` messages; seen as llama.cpp
//! `models/templates/google-gemma-4-31B-it.jinja` in forks that track it, and embedded in
//! the gemma-4-26B-A4B-it GGUF). Quoted template lines below come from that file. Where it
//! is silent or plainly broken, we follow Google's LiteRT-LM goldens
//! (`runtime/conversation/model_data_processor/gemma4_data_processor_test.cc`) and say so.
//!
//! Shape of a prompt (thinking off, one tool, one tool round):
//!
//! ```text
//! <bos><|turn>system
//! You are terse.<|tool>declaration:get_time{description:<|"|>Current time<|"|>,parameters:{properties:{tz:{type:<|"|>STRING<|"|>}},type:<|"|>OBJECT<|"|>}}<tool|><turn|>
//! <|turn>user
//! What time is it?<turn|>
//! <|turn>model
//! <|tool_call>call:get_time{tz:<|"|>UTC<|"|>}<tool_call|><|tool_response>response:get_time{value:<|"|>12:00<|"|>}<tool_response|>It is noon.<turn|>
//! <|turn>model
//! <|channel>thought
//! <channel|>
//! ```
//!
//! (The last two lines are the generation prompt; with thinking off the template pre-fills
//! an empty thought channel.) Media are expanded here the way the processor
//! (`processing_gemma4_unified.py`, `replace_image_token` / `replace_audio_token`) expands
//! the template's single `<|image|>` / `<|audio|>`: `<|image>` + N × `<|image|>` + `<image|>`.
//!
//! Decisions where the template is silent or broken (details at each function):
//! - a model turn's text is written before its tool calls (the order the model produced
//!   them); the template writes message content after calls and responses;
//! - a model turn whose calls got no result before a system/user turn is closed with `<turn|>`;
//! - parameter names equal to `type`/`description`/… are kept (the template drops them);
//! - a parameters schema without `type` is written as `OBJECT` (the template leaves its
//!   braces unclosed); a list `type` uses its first non-`null` entry;
//! - JSON `null` is written `null` (Jinja would print `None`).

use serde_json::{Map, Value};

// Shared with the tool-call grammar, which must order and quote keys exactly as the
// template does.
use super::tool_call::{dictsort, is_bare_key};

pub const BOS: &str = "<bos>";
pub const TURN_START: &str = "<|turn>";
pub const TURN_END: &str = "<turn|>";
pub const TOOL_DECL_START: &str = "<|tool>";
pub const TOOL_DECL_END: &str = "<tool|>";
pub const TOOL_CALL_START: &str = "<|tool_call>";
pub const TOOL_CALL_END: &str = "<tool_call|>";
pub const TOOL_RESPONSE_START: &str = "<|tool_response>";
pub const TOOL_RESPONSE_END: &str = "<tool_response|>";
pub const STRING_DELIM: &str = "<|\"|>";
/// Put at the top of the system turn when thinking is on.
pub const THINK: &str = "<|think|>";
pub const CHANNEL_START: &str = "<|channel>";
pub const CHANNEL_END: &str = "<channel|>";
/// Pre-filled after `<|turn>model\n` when thinking is off: "the thinking is already done".
pub const EMPTY_THOUGHT: &str = "<|channel>thought\n<channel|>";
pub const IMAGE_START: &str = "<|image>";
pub const IMAGE_TOKEN: &str = "<|image|>";
pub const IMAGE_END: &str = "<image|>";
pub const AUDIO_START: &str = "<|audio>";
pub const AUDIO_TOKEN: &str = "<|audio|>";
pub const AUDIO_END: &str = "<audio|>";

/// One piece of a user turn.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    /// `tokens` = number of 640-sample frames of 16 kHz audio (one token each).
    Audio {
        tokens: usize,
    },
    /// `tokens` = number of 48×48 patches (one token each).
    Image {
        tokens: usize,
    },
}

/// One entry of the conversation history.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    System(String),
    User(Vec<Part>),
    /// What the model said (`text`, thinking already removed or removable) and the calls it
    /// made, in order. Calls leave the model turn open for the `ToolResult`s that follow.
    Model {
        text: String,
        tool_calls: Vec<(String, Value)>,
    },
    /// The result of one call; written inside the model turn that made the call.
    ToolResult {
        name: String,
        output: Value,
    },
}

/// A tool offered to the model. `parameters` is a JSON Schema object
/// (`{"type":"object","properties":{…},"required":[…]}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDecl {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

/// Template switches beyond [`render`]'s arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// The template's `enable_thinking`: `<|think|>` opens the system turn and the
    /// generation prompt leaves the thought channel to the model. Off by default.
    pub enable_thinking: bool,
    /// Writes past model turns with the empty thought channel they were generated
    /// after (`<|turn>model\n<|channel>thought\n<channel|>…`). The official template
    /// drops it, which makes a re-rendered history diverge from the tokens the model
    /// actually saw and defeats KV-cache reuse across turns; hark's embedded backend
    /// turns this on so each turn only prefills what is new.
    pub keep_empty_thought_in_history: bool,
}

/// Renders a whole prompt with thinking off.
///
/// `system` (or, when `system` is `None`, a leading `Turn::System`) becomes the first
/// system turn, followed there by the tool declarations. With `add_generation_prompt`,
/// the prompt ends ready for the model to speak: `<|turn>model\n<|channel>thought\n<channel|>`
/// — unless the history already ends inside a model turn waiting on tools (see
/// [`render_with_options`]).
pub fn render(
    system: Option<&str>,
    tools: &[ToolDecl],
    turns: &[Turn],
    add_generation_prompt: bool,
) -> String {
    render_with_options(
        system,
        tools,
        turns,
        add_generation_prompt,
        RenderOptions::default(),
    )
}

/// Where the renderer stands inside an open model turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelTurn {
    /// No model turn is open.
    Closed,
    /// Open; the last thing written was one or more tool calls.
    AfterCalls,
    /// Open; the last thing written was a tool response.
    AfterResponses,
}

/// [`render`] with options.
///
/// Turn rules (template: the message loop and its closing `if`):
/// - `System` / `User`: `<|turn>ROLE\n` + content + `<turn|>\n`. Text is trimmed; parts
///   are concatenated with nothing between them.
/// - `Model`: opens `<|turn>model\n` unless a model turn is still open (after tool calls or
///   results — the template's "continue_same_model_turn"); writes the text (thinking
///   channels stripped, trimmed), then the calls. Without calls it closes with `<turn|>\n`;
///   with calls the turn stays open for the results.
/// - `ToolResult`: `<|tool_response>response:NAME{…}<tool_response|>` inside the open model
///   turn (one is opened if none is).
///
/// End of history (template: the last `if … '<|tool_response>'` and `add_generation_prompt`):
/// - ends after calls without results → `<|tool_response>` is appended (the model's own
///   stop token), and nothing else: the next text must be the results;
/// - ends after results → nothing is appended: the model continues its open turn;
/// - otherwise, with `add_generation_prompt`: `<|turn>model\n` + (thinking off)
///   `<|channel>thought\n<channel|>`.
///
/// These two "open turn" endings are exactly the text the live loop has at those points
/// (model emitted `…<tool_call|><|tool_response>`; runtime appended the results), so a
/// re-render continues the same token stream.
pub fn render_with_options(
    system: Option<&str>,
    tools: &[ToolDecl],
    turns: &[Turn],
    add_generation_prompt: bool,
    options: RenderOptions,
) -> String {
    let mut out = String::from(BOS);

    // The first system turn: `messages[0]` if it is a system message, plus the tools.
    let mut turns = turns;
    let system_text = match (system, turns.first()) {
        (Some(s), _) => Some(s),
        (None, Some(Turn::System(s))) => {
            turns = &turns[1..];
            Some(s.as_str())
        }
        (None, _) => None,
    };
    // "{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}"
    if options.enable_thinking || !tools.is_empty() || system_text.is_some() {
        out.push_str(TURN_START);
        out.push_str("system\n");
        if options.enable_thinking {
            // "{{- '<|think|>\n' -}}"
            out.push_str(THINK);
            out.push('\n');
        }
        if let Some(text) = system_text {
            // "{{- messages[0]['content'] | trim -}}"
            out.push_str(text.trim());
        }
        for tool in tools {
            // "{{- '<|tool>' -}}{{- format_function_declaration(tool) | trim -}}{{- '<tool|>' -}}"
            out.push_str(TOOL_DECL_START);
            out.push_str(render_tool_declaration(tool).trim());
            out.push_str(TOOL_DECL_END);
        }
        out.push_str(TURN_END);
        out.push('\n');
    }

    let mut model = ModelTurn::Closed;
    for turn in turns {
        match turn {
            Turn::System(text) => {
                close_model_turn(&mut out, &mut model);
                write_simple_turn(&mut out, "system", text.trim());
            }
            Turn::User(parts) => {
                close_model_turn(&mut out, &mut model);
                out.push_str(TURN_START);
                out.push_str("user\n");
                for part in parts {
                    write_part(&mut out, part);
                }
                out.push_str(TURN_END);
                out.push('\n');
            }
            Turn::Model { text, tool_calls } => {
                if model == ModelTurn::Closed {
                    out.push_str(TURN_START);
                    out.push_str("model\n");
                    if options.keep_empty_thought_in_history && !options.enable_thinking {
                        out.push_str(EMPTY_THOUGHT);
                    }
                }
                // "{{- strip_thinking(message['content']) -}}"
                out.push_str(&strip_thinking(text));
                for (name, arguments) in tool_calls {
                    out.push_str(&render_tool_call(name, arguments));
                }
                if tool_calls.is_empty() {
                    out.push_str(TURN_END);
                    out.push('\n');
                    model = ModelTurn::Closed;
                } else {
                    model = ModelTurn::AfterCalls;
                }
            }
            Turn::ToolResult { name, output } => {
                if model == ModelTurn::Closed {
                    // A result with no open call: still put it in a model turn, where the
                    // model expects results.
                    out.push_str(TURN_START);
                    out.push_str("model\n");
                }
                out.push_str(&render_tool_response(name, output));
                model = ModelTurn::AfterResponses;
            }
        }
    }

    match model {
        // "{%- if ns.prev_message_type == 'tool_call' and not ns_tr_out.flag -%}{{- '<|tool_response>' -}}"
        ModelTurn::AfterCalls => out.push_str(TOOL_RESPONSE_START),
        // "{%- elif not (ns_tr_out.flag and not message.get('content')) -%}" → no `<turn|>`,
        // and the generation prompt is skipped after a tool response.
        ModelTurn::AfterResponses => {}
        ModelTurn::Closed => {
            if add_generation_prompt {
                // "{{- '<|turn>model\n' -}}{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\n<channel|>' -}}"
                out.push_str(TURN_START);
                out.push_str("model\n");
                if !options.enable_thinking {
                    out.push_str(EMPTY_THOUGHT);
                }
            }
        }
    }
    out
}

/// Closes a model turn left open by tool calls/results before another role speaks.
/// (The template would open the next turn without closing this one; LiteRT-LM's golden
/// `RenderTemplateWithEmptyAssistantMessage` shows `…<tool_response|><turn|>\n<|turn>user`.)
fn close_model_turn(out: &mut String, model: &mut ModelTurn) {
    if *model != ModelTurn::Closed {
        out.push_str(TURN_END);
        out.push('\n');
        *model = ModelTurn::Closed;
    }
}

fn write_simple_turn(out: &mut String, role: &str, content: &str) {
    out.push_str(TURN_START);
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str(TURN_END);
    out.push('\n');
}

fn write_part(out: &mut String, part: &Part) {
    match part {
        // "{{- item['text'] | trim -}}"
        Part::Text(text) => out.push_str(text.trim()),
        // Template "{{- '<|image|>' -}}", expanded by the processor to
        // f"{self.boi_token}{self.image_token * num_soft_tokens}{self.eoi_token}".
        Part::Image { tokens } => write_media(out, IMAGE_START, IMAGE_TOKEN, IMAGE_END, *tokens),
        // Template "{{- '<|audio|>' -}}", expanded to
        // f"{self.boa_token}{self.audio_token * int(mask.sum())}{self.eoa_token}".
        Part::Audio { tokens } => write_media(out, AUDIO_START, AUDIO_TOKEN, AUDIO_END, *tokens),
    }
}

fn write_media(out: &mut String, start: &str, token: &str, end: &str, count: usize) {
    out.reserve(start.len() + token.len().saturating_mul(count).min(1 << 24) + end.len());
    out.push_str(start);
    for _ in 0..count {
        out.push_str(token);
    }
    out.push_str(end);
}

/// The template's `strip_thinking`: drops every `<|channel>…<channel|>` span, then trims.
pub fn strip_thinking(text: &str) -> String {
    let mut result = String::new();
    // "{%- for part in text.split('<channel|>') -%}{%- if '<|channel>' in part -%}
    //  {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}"
    for part in text.split(CHANNEL_END) {
        match part.find(CHANNEL_START) {
            Some(at) => result.push_str(&part[..at]),
            None => result.push_str(part),
        }
    }
    result.trim().to_owned()
}

/// `<|tool_call>call:NAME{k:v,…}<tool_call|>` — template: "'<|tool_call>call:' +
/// function['name'] + '{'", then "key:format_argument(value, escape_keys=False)" over
/// `arguments | dictsort`, then "'}<tool_call|>'". A string `arguments` is written as-is
/// between the braces (the template's `function['arguments'] is string` branch); any other
/// non-object gives `{}`.
pub fn render_tool_call(name: &str, arguments: &Value) -> String {
    let mut out = format!("{TOOL_CALL_START}call:{name}{{");
    match arguments {
        Value::Object(map) => write_members(&mut out, map, false),
        Value::String(raw) => out.push_str(raw),
        _ => {}
    }
    out.push('}');
    out.push_str(TOOL_CALL_END);
    out
}

/// `<|tool_response>response:NAME{…}<tool_response|>` — template `format_tool_response_block`:
/// an object's fields (dictsort, bare keys), any other value as `{value:…}`.
pub fn render_tool_response(name: &str, output: &Value) -> String {
    let mut out = format!("{TOOL_RESPONSE_START}response:{name}{{");
    match output {
        Value::Object(map) => write_members(&mut out, map, false),
        other => {
            out.push_str("value:");
            write_argument(&mut out, other, false);
        }
    }
    out.push('}');
    out.push_str(TOOL_RESPONSE_END);
    out
}

// ---------------------------------------------------------------------------------------
// Tool declarations (template macros `format_function_declaration` and `format_parameters`)
// ---------------------------------------------------------------------------------------

/// Keys the template treats as schema keywords when it walks a schema's own keys.
const STANDARD_KEYS: [&str; 5] = ["description", "type", "properties", "required", "nullable"];

/// `declaration:NAME{description:<|"|>…<|"|>,parameters:{properties:{…},required:[…],type:<|"|>OBJECT<|"|>}}`
/// (without the `<|tool>`/`<tool|>` around it).
pub fn render_tool_declaration(tool: &ToolDecl) -> String {
    let q = STRING_DELIM;
    // "declaration:{{- name -}}{description:<|\"|>{{- description -}}<|\"|>"
    let mut out = format!(
        "declaration:{}{{description:{q}{}{q}",
        tool.name, tool.description
    );
    // "{%- if params -%}" (an empty or missing schema adds nothing)
    if let Some(params) = tool.parameters.as_object().filter(|p| !p.is_empty()) {
        out.push_str(",parameters:{");
        // "properties:{ {{- format_parameters(params['properties'], params['required']) -}} },"
        if let Some(props) = params
            .get("properties")
            .and_then(Value::as_object)
            .filter(|p| !p.is_empty())
        {
            out.push_str("properties:{");
            write_parameters(&mut out, props, false);
            out.push_str("},");
        }
        // "required:[ <|\"|>item<|\"|> ,… ],"
        if let Some(required) = params.get("required").filter(|r| truthy(r)) {
            out.push_str("required:");
            write_required(&mut out, required);
            out.push(',');
        }
        // "type:<|\"|>{{- params['type'] | upper -}}<|\"|>}" — only when a type is given in
        // the template, which otherwise leaves this brace unclosed; we default to OBJECT.
        let ty = match schema_type(params.get("type")) {
            ty if ty.is_empty() => "OBJECT".to_owned(),
            ty => ty,
        };
        out.push_str(&format!("type:{q}{ty}{q}}}"));
    }
    out.push('}');
    out
}

/// The template's `format_parameters(properties, required)` over `properties | dictsort`.
///
/// `walking_schema_itself` is the template's fallback for an OBJECT property without
/// `properties`, where it walks the property's own keys and must skip schema keywords.
/// The template skips those names always — which silently hides a parameter called
/// `type` or `description` from the model — so we skip them only in that fallback.
fn write_parameters(
    out: &mut String,
    properties: &Map<String, Value>,
    walking_schema_itself: bool,
) {
    let q = STRING_DELIM;
    let empty = Map::new();
    let mut first = true;
    for (key, value) in dictsort(properties) {
        if walking_schema_itself && STANDARD_KEYS.contains(&key.as_str()) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        let schema = value.as_object().unwrap_or(&empty);
        // "{{ key }}:{"
        out.push_str(key);
        out.push_str(":{");
        let mut add_comma = false;
        // "{%- if add_comma %},{%- else -%} {%- set add_comma = true -%} {% endif -%}"
        let mut comma = |out: &mut String| {
            if add_comma {
                out.push(',');
            } else {
                add_comma = true;
            }
        };
        if let Some(description) = schema.get("description").filter(|d| truthy(d)) {
            comma(out);
            out.push_str("description:");
            out.push_str(q);
            out.push_str(&jinja_str(description));
            out.push_str(q);
        }
        let ty = schema_type(schema.get("type"));
        if ty == "STRING" {
            if let Some(choices) = schema.get("enum").filter(|e| truthy(e)) {
                comma(out);
                out.push_str("enum:");
                write_argument(out, choices, true);
            }
        } else if ty == "ARRAY" {
            if let Some(items) = schema
                .get("items")
                .and_then(Value::as_object)
                .filter(|i| !i.is_empty())
            {
                comma(out);
                out.push_str("items:{");
                write_items(out, items);
                out.push('}');
            }
        }
        if schema.get("nullable").is_some_and(truthy) {
            comma(out);
            out.push_str("nullable:true");
        }
        if ty == "OBJECT" {
            comma(out);
            out.push_str("properties:{");
            match schema.get("properties").and_then(Value::as_object) {
                Some(props) => write_parameters(out, props, false),
                None => write_parameters(out, schema, true),
            }
            out.push('}');
            if let Some(required) = schema.get("required").filter(|r| truthy(r)) {
                comma(out);
                out.push_str("required:");
                write_required(out, required);
            }
        }
        comma(out);
        out.push_str(&format!("type:{q}{ty}{q}}}"));
    }
}

/// The `items:{…}` block of an ARRAY property, over `items | dictsort`, skipping nulls.
fn write_items(out: &mut String, items: &Map<String, Value>) {
    let mut first = true;
    for (key, value) in dictsort(items) {
        if value.is_null() {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        match (key.as_str(), value) {
            ("properties", _) => {
                out.push_str("properties:{");
                if let Some(props) = value.as_object() {
                    write_parameters(out, props, false);
                }
                out.push('}');
            }
            ("required", _) => {
                out.push_str("required:");
                write_required(out, value);
            }
            // "type:{{ format_argument(item_value | upper) }}" / "… | map('upper') | list"
            ("type", Value::String(ty)) => {
                out.push_str("type:");
                write_argument(out, &Value::String(ty.to_uppercase()), true);
            }
            ("type", Value::Array(types)) => {
                let upper: Vec<Value> = types
                    .iter()
                    .map(|t| Value::String(jinja_str(t).to_uppercase()))
                    .collect();
                out.push_str("type:");
                write_argument(out, &Value::Array(upper), true);
            }
            // "{{ item_key }}:{{ format_argument(item_value) }}" (keys escaped)
            _ => {
                out.push_str(key);
                out.push(':');
                write_argument(out, value, true);
            }
        }
    }
}

/// `[<|"|>a<|"|>,<|"|>b<|"|>]` from a `required` list.
fn write_required(out: &mut String, required: &Value) {
    let q = STRING_DELIM;
    out.push('[');
    if let Some(items) = required.as_array() {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(q);
            out.push_str(&jinja_str(item));
            out.push_str(q);
        }
    }
    out.push(']');
}

/// A schema `type` as the template prints it: upper-cased; for a list (`["string","null"]`)
/// the first non-null entry (as llama.cpp's `gemma4.jinja` does; the Google template would
/// print the list's Python repr); missing → empty.
fn schema_type(ty: Option<&Value>) -> String {
    match ty {
        Some(Value::String(s)) => s.to_uppercase(),
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .find(|s| !s.eq_ignore_ascii_case("null"))
            .unwrap_or("")
            .to_uppercase(),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Values (template macro `format_argument`)
// ---------------------------------------------------------------------------------------

/// `format_argument(argument, escape_keys)`.
fn write_argument(out: &mut String, value: &Value, escape_keys: bool) {
    match value {
        Value::String(s) => {
            out.push_str(STRING_DELIM);
            out.push_str(s);
            out.push_str(STRING_DELIM);
        }
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Object(map) => {
            out.push('{');
            write_members(out, map, escape_keys);
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_argument(out, item, escape_keys);
            }
            out.push(']');
        }
        // Jinja prints Python's `None`; the model's own grammar says `null`.
        Value::Null => out.push_str("null"),
        Value::Number(n) => out.push_str(&n.to_string()),
    }
}

/// `key:value,…` over `map | dictsort`. Unescaped keys that a bare key cannot carry are
/// delimited anyway so the text stays parseable.
fn write_members(out: &mut String, map: &Map<String, Value>, escape_keys: bool) {
    for (i, (key, value)) in dictsort(map).into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if escape_keys || !is_bare_key(key) {
            out.push_str(STRING_DELIM);
            out.push_str(key);
            out.push_str(STRING_DELIM);
        } else {
            out.push_str(key);
        }
        out.push(':');
        write_argument(out, value, escape_keys);
    }
}

/// Python/Jinja truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// How `{{ value }}` prints a scalar inside a string context (strings unquoted).
fn jinja_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => {
            let mut out = String::new();
            write_argument(&mut out, other, false);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const Q: &str = STRING_DELIM;

    fn user(text: &str) -> Turn {
        Turn::User(vec![Part::Text(text.to_owned())])
    }
    fn model(text: &str) -> Turn {
        Turn::Model {
            text: text.to_owned(),
            tool_calls: vec![],
        }
    }
    fn calls(list: &[(&str, Value)]) -> Turn {
        Turn::Model {
            text: String::new(),
            tool_calls: list
                .iter()
                .map(|(n, a)| (n.to_string(), a.clone()))
                .collect(),
        }
    }
    fn result(name: &str, output: Value) -> Turn {
        Turn::ToolResult {
            name: name.to_owned(),
            output,
        }
    }

    /// LiteRT-LM's goldens render without `bos_token`; the template starts with
    /// "{{- bos_token -}}", so ours start with `<bos>`.
    fn bos(s: &str) -> String {
        format!("{BOS}{s}")
    }

    const PARIS_LONDON: &str = "How is the weather in Paris and London?";

    fn paris_london_calls() -> Turn {
        calls(&[
            ("get_weather", json!({"location": "Paris"})),
            ("get_weather", json!({"location": "London"})),
        ])
    }
    fn paris_london_results() -> Vec<Turn> {
        vec![
            result(
                "get_weather",
                json!({"location": "Paris", "temperature": 20, "unit": "C", "weather": "Sunny"}),
            ),
            result(
                "get_weather",
                json!({"location": "London", "temperature": 15, "unit": "C", "weather": "Cloudy"}),
            ),
        ]
    }
    const CALLS_GOLDEN: &str =
        "<|tool_call>call:get_weather{location:<|\"|>Paris<|\"|>}<tool_call|>\
<|tool_call>call:get_weather{location:<|\"|>London<|\"|>}<tool_call|>";
    const RESULTS_GOLDEN: &str = "<|tool_response>response:get_weather{location:<|\"|>Paris<|\"|>,\
temperature:20,unit:<|\"|>C<|\"|>,weather:<|\"|>Sunny<|\"|>}<tool_response|>\
<|tool_response>response:get_weather{location:<|\"|>London<|\"|>,\
temperature:15,unit:<|\"|>C<|\"|>,weather:<|\"|>Cloudy<|\"|>}<tool_response|>";

    #[test]
    fn user_turn_and_generation_prompt() {
        // LiteRT-LM RenderTemplateUserTurn: "<|turn>user\nHow is the weather in Paris and
        // London?<turn|>\n<|turn>model\n" (E2B template), plus the 12B/31B template's
        // thinking-off pre-fill "{%- if not enable_thinking | default(false) -%}{{-
        // '<|channel>thought\n<channel|>' -}}".
        assert_eq!(
            render(None, &[], &[user(PARIS_LONDON)], true),
            bos(&format!(
                "<|turn>user\n{PARIS_LONDON}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
            ))
        );
        // Without a generation prompt nothing follows the last turn.
        assert_eq!(
            render(None, &[], &[user(PARIS_LONDON)], false),
            bos(&format!("<|turn>user\n{PARIS_LONDON}<turn|>\n"))
        );
        // Empty history.
        assert_eq!(
            render(None, &[], &[], true),
            bos("<|turn>model\n<|channel>thought\n<channel|>")
        );
    }

    #[test]
    fn assistant_text_turn() {
        // LiteRT-LM RenderTemplateAssistantTurnTextOnly (add_generation_prompt = false).
        assert_eq!(
            render(None, &[], &[user(PARIS_LONDON), model("Sorry, I can't help with that.")], false),
            bos(&format!(
                "<|turn>user\n{PARIS_LONDON}<turn|>\n<|turn>model\nSorry, I can't help with that.<turn|>\n"
            ))
        );
    }

    #[test]
    fn system_and_multi_turn() {
        // LiteRT-LM PromptTemplateToInputDataVectorTextOnly (+ bos and thinking-off pre-fill).
        let want = "<|turn>system\nHello world!<turn|>\n<|turn>user\nHow are you?<turn|>\n\
<|turn>model\nI am doing well, thanks for asking.<turn|>\n<|turn>user\nWhat is the capital of France?<turn|>\n\
<|turn>model\n<|channel>thought\n<channel|>";
        let turns = [
            user("How are you?"),
            model("I am doing well, thanks for asking."),
            user("What is the capital of France?"),
        ];
        assert_eq!(render(Some("Hello world!"), &[], &turns, true), bos(want));
        // The same with the system prompt given as the first turn instead.
        let mut with_system = vec![Turn::System("Hello world!".into())];
        with_system.extend(turns.iter().cloned());
        assert_eq!(render(None, &[], &with_system, true), bos(want));
        // "{{- messages[0]['content'] | trim -}}": dappco gemma4 Go test
        // want "<bos><|turn>system\nbe concise<turn|>\n<|turn>user\nhello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
        assert_eq!(
            render(Some(" be concise "), &[], &[user("hello")], true),
            "<bos><|turn>system\nbe concise<turn|>\n<|turn>user\nhello<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
        );
        // A later system turn is its own turn.
        assert_eq!(
            render(None, &[], &[user("a"), Turn::System(" b ".into())], false),
            bos("<|turn>user\na<turn|>\n<|turn>system\nb<turn|>\n")
        );
    }

    #[test]
    fn thinking_on() {
        // Template: "{{- '<|think|>\n' -}}" at the top of the system turn, and no pre-filled
        // channel. dappco gemma4 Go test ThinkingContinuation: want
        // "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhello<turn|>\n<|turn>model\n".
        let on = RenderOptions {
            enable_thinking: true,
            ..Default::default()
        };
        assert_eq!(
            render_with_options(None, &[], &[user("hello")], true, on),
            "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhello<turn|>\n<|turn>model\n"
        );
        assert_eq!(
            render_with_options(Some("sys"), &[], &[user("hello")], true, on),
            "<bos><|turn>system\n<|think|>\nsys<turn|>\n<|turn>user\nhello<turn|>\n<|turn>model\n"
        );
    }

    fn weather_and_stock_tools() -> Vec<ToolDecl> {
        vec![
            ToolDecl {
                name: "get_weather".into(),
                description: "Gets weather information.".into(),
                parameters: json!({
                    "properties": {"location": {"description": "Weather location.", "nullable": false, "type": "string"}},
                    "required": ["location"],
                    "type": "object"
                }),
            },
            ToolDecl {
                name: "get_stock_price".into(),
                description: "Gets stock price.".into(),
                parameters: json!({
                    "properties": {"symbol": {"description": "Stock symbol.", "nullable": false, "type": "string"}},
                    "required": ["symbol"],
                    "type": "object"
                }),
            },
        ]
    }

    #[test]
    fn tool_declarations_litert_golden() {
        // LiteRT-LM RenderTemplateWithToolDeclarations, verbatim (+ bos and pre-fill).
        let want = "<|turn>system\n\
<|tool>declaration:get_weather{description:<|\"|>Gets weather information.<|\"|>,parameters:{properties:{location:{description:<|\"|>Weather location.<|\"|>,type:<|\"|>STRING<|\"|>}},required:[<|\"|>location<|\"|>],type:<|\"|>OBJECT<|\"|>}}<tool|>\
<|tool>declaration:get_stock_price{description:<|\"|>Gets stock price.<|\"|>,parameters:{properties:{symbol:{description:<|\"|>Stock symbol.<|\"|>,type:<|\"|>STRING<|\"|>}},required:[<|\"|>symbol<|\"|>],type:<|\"|>OBJECT<|\"|>}}<tool|><turn|>\n\
<|turn>user\nHow is the weather in Paris and London?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>";
        assert_eq!(
            render(
                None,
                &weather_and_stock_tools(),
                &[user(PARIS_LONDON)],
                true
            ),
            bos(want)
        );
        // With a system prompt, the declarations follow its text directly:
        // "{{- messages[0]['content'] | trim -}}" then "{%- for tool in tools %}{{- '<|tool>' -}}".
        let rendered = render(
            Some("Be brief."),
            &weather_and_stock_tools()[..1],
            &[],
            false,
        );
        assert!(
            rendered.starts_with("<bos><|turn>system\nBe brief.<|tool>declaration:get_weather{"),
            "{rendered}"
        );
        assert!(rendered.ends_with("<tool|><turn|>\n"), "{rendered}");
    }

    #[test]
    fn tool_declaration_schema_features() {
        // Derived by hand from the template's format_parameters: per property, in this
        // order, description, (STRING) enum / (ARRAY) items, nullable, (OBJECT) properties
        // and required, then type; properties in dictsort order.
        let tool = ToolDecl {
            name: "search".into(),
            description: "Search things".into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "What to find"},
                    "mode": {"type": "string", "enum": ["fast", "deep"]},
                    "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags"},
                    "limit": {"type": ["integer", "null"], "nullable": true, "minimum": 1},
                    "filter": {"type": "object", "properties": {"lang": {"type": "string"}}, "required": ["lang"]},
                    "Type": {"type": "string"}
                },
                "required": ["query"]
            }),
        };
        let want = format!(
            "declaration:search{{description:{Q}Search things{Q},parameters:{{properties:{{\
filter:{{properties:{{lang:{{type:{Q}STRING{Q}}}}},required:[{Q}lang{Q}],type:{Q}OBJECT{Q}}},\
limit:{{nullable:true,type:{Q}INTEGER{Q}}},\
mode:{{enum:[{Q}fast{Q},{Q}deep{Q}],type:{Q}STRING{Q}}},\
query:{{description:{Q}What to find{Q},type:{Q}STRING{Q}}},\
tags:{{description:{Q}Tags{Q},items:{{type:{Q}STRING{Q}}},type:{Q}ARRAY{Q}}},\
Type:{{type:{Q}STRING{Q}}}\
}},required:[{Q}query{Q}],type:{Q}OBJECT{Q}}}}}"
        );
        assert_eq!(render_tool_declaration(&tool), want);

        // Array items with an object schema and extra keys (keys escaped by format_argument).
        let tool = ToolDecl {
            name: "batch".into(),
            description: "".into(),
            parameters: json!({"type": "object", "properties": {"ops": {"type": "array", "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}},
                "required": ["id"],
                "description": "one op",
                "enum": [{"k": 1}],
                "default": null
            }}}}),
        };
        assert_eq!(
            render_tool_declaration(&tool),
            format!(
                "declaration:batch{{description:{Q}{Q},parameters:{{properties:{{ops:{{items:{{\
description:{Q}one op{Q},enum:[{{{Q}k{Q}:1}}],properties:{{id:{{type:{Q}INTEGER{Q}}}}},required:[{Q}id{Q}],type:{Q}OBJECT{Q}\
}},type:{Q}ARRAY{Q}}}}},type:{Q}OBJECT{Q}}}}}"
            )
        );

        // OBJECT without `properties`: the template walks the schema's own keys, skipping
        // schema keywords ("{%- elif value is mapping -%}").
        let tool = ToolDecl {
            name: "f".into(),
            description: "d".into(),
            parameters: json!({"type": "object", "properties": {"meta": {"type": "object", "description": "free",
                "additionalProperties": {"type": "string"}}}}),
        };
        assert_eq!(
            render_tool_declaration(&tool),
            format!(
                "declaration:f{{description:{Q}d{Q},parameters:{{properties:{{meta:{{description:{Q}free{Q},\
properties:{{additionalProperties:{{type:{Q}STRING{Q}}}}},type:{Q}OBJECT{Q}}}}},type:{Q}OBJECT{Q}}}}}"
            )
        );

        // No parameters at all ("{%- if params -%}" is false for {} and null).
        for parameters in [json!({}), Value::Null] {
            let tool = ToolDecl {
                name: "now".into(),
                description: "Current time".into(),
                parameters,
            };
            assert_eq!(
                render_tool_declaration(&tool),
                format!("declaration:now{{description:{Q}Current time{Q}}}")
            );
        }
        // A schema without `type` is still closed (written as OBJECT).
        let tool = ToolDecl {
            name: "g".into(),
            description: "x".into(),
            parameters: json!({"properties": {"a": {"type": "boolean"}}}),
        };
        assert_eq!(
            render_tool_declaration(&tool),
            format!("declaration:g{{description:{Q}x{Q},parameters:{{properties:{{a:{{type:{Q}BOOLEAN{Q}}}}},type:{Q}OBJECT{Q}}}}}")
        );
    }

    #[test]
    fn tool_calls_without_results() {
        // LiteRT-LM RenderTemplateWithToolCalls gives "…<tool_call|>" and notes the turn
        // should end with "<|tool_response>"; the 31B template does append it:
        // "{%- if ns.prev_message_type == 'tool_call' and not ns_tr_out.flag -%}{{- '<|tool_response>' -}}"
        let want = format!(
            "<|turn>user\n{PARIS_LONDON}<turn|>\n<|turn>model\n{CALLS_GOLDEN}<|tool_response>"
        );
        assert_eq!(
            render(
                None,
                &[],
                &[user(PARIS_LONDON), paris_london_calls()],
                false
            ),
            bos(&want)
        );
        // …and no generation prompt after it ("ns.prev_message_type != 'tool_call'").
        assert_eq!(
            render(None, &[], &[user(PARIS_LONDON), paris_london_calls()], true),
            bos(&want)
        );
    }

    #[test]
    fn tool_results_inside_the_model_turn() {
        // LiteRT-LM RenderTemplateWithToolResponses: results follow the calls in the same
        // model turn, and the generation prompt is suppressed after them.
        let mut turns = vec![user(PARIS_LONDON), paris_london_calls()];
        turns.extend(paris_london_results());
        let want = format!(
            "<|turn>user\n{PARIS_LONDON}<turn|>\n<|turn>model\n{CALLS_GOLDEN}{RESULTS_GOLDEN}"
        );
        assert_eq!(render(None, &[], &turns, true), bos(&want));
        assert_eq!(render(None, &[], &turns, false), bos(&want));

        // LiteRT-LM RenderTemplateWithModelResponseAfterToolResponse: the answer continues
        // the same turn ("continue_same_model_turn") and closes it.
        let answer = "The weather in Paris is sunny and the weather in London is cloudy.";
        turns.push(model(answer));
        assert_eq!(
            render(None, &[], &turns, false),
            bos(&format!("{want}{answer}<turn|>\n"))
        );

        // LiteRT-LM RenderTemplateWithEmptyAssistantMessage: an empty answer closes the turn.
        let mut turns = vec![user("How is the weather in Paris?")];
        turns.push(calls(&[("get_weather", json!({"location": "Paris"}))]));
        turns.push(result(
            "get_weather",
            json!({"location": "Paris", "temperature": 20, "unit": "C", "weather": "Sunny"}),
        ));
        turns.push(model(""));
        turns.push(user("How is the weather in New York?"));
        assert_eq!(
            render(None, &[], &turns, true),
            bos("<|turn>user\nHow is the weather in Paris?<turn|>\n<|turn>model\n\
<|tool_call>call:get_weather{location:<|\"|>Paris<|\"|>}<tool_call|>\
<|tool_response>response:get_weather{location:<|\"|>Paris<|\"|>,temperature:20,unit:<|\"|>C<|\"|>,weather:<|\"|>Sunny<|\"|>}<tool_response|><turn|>\n\
<|turn>user\nHow is the weather in New York?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
        );
    }

    #[test]
    fn tool_turn_edge_cases() {
        // Non-object output: "'response:' + tool_name + '{value:' + format_argument(response, escape_keys=False) + '}'"
        assert_eq!(
            render(
                None,
                &[],
                &[
                    user("t?"),
                    calls(&[("now", json!({}))]),
                    result("now", json!("12:00"))
                ],
                false
            ),
            bos(
                "<|turn>user\nt?<turn|>\n<|turn>model\n<|tool_call>call:now{}<tool_call|>\
<|tool_response>response:now{value:<|\"|>12:00<|\"|>}<tool_response|>"
            )
        );
        // Text said before the calls is written before them (our decision), then a second
        // round of calls in the same turn.
        let turns = [
            user("go"),
            Turn::Model {
                text: "Let me check.".into(),
                tool_calls: vec![("a".into(), json!({"x": 1}))],
            },
            result("a", json!({"ok": true})),
            Turn::Model {
                text: "One more.".into(),
                tool_calls: vec![("b".into(), json!({}))],
            },
            result("b", json!(null)),
            model("Done."),
        ];
        assert_eq!(
            render(None, &[], &turns, true),
            bos("<|turn>user\ngo<turn|>\n<|turn>model\nLet me check.<|tool_call>call:a{x:1}<tool_call|>\
<|tool_response>response:a{ok:true}<tool_response|>One more.<|tool_call>call:b{}<tool_call|>\
<|tool_response>response:b{value:null}<tool_response|>Done.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
        );
        // Calls that got no result before the user spoke again (barge-in): the turn is closed.
        assert_eq!(
            render(None, &[], &[user("a"), calls(&[("f", json!({}))]), user("b")], false),
            bos("<|turn>user\na<turn|>\n<|turn>model\n<|tool_call>call:f{}<tool_call|><turn|>\n<|turn>user\nb<turn|>\n")
        );
        // A result with no call before it still lands in a model turn.
        assert_eq!(
            render(None, &[], &[user("a"), result("f", json!({"v": 1}))], true),
            bos("<|turn>user\na<turn|>\n<|turn>model\n<|tool_response>response:f{v:1}<tool_response|>")
        );
        // Call arguments: dictsort, bare keys, nested values; a string is written as-is.
        assert_eq!(
            render_tool_call(
                "f",
                &json!({"b": {"y": [1, "two", null], "X": false}, "A": 1.5})
            ),
            "<|tool_call>call:f{A:1.5,b:{X:false,y:[1,<|\"|>two<|\"|>,null]}}<tool_call|>"
        );
        assert_eq!(
            render_tool_call("f", &json!("k:<|\"|>v<|\"|>")),
            "<|tool_call>call:f{k:<|\"|>v<|\"|>}<tool_call|>"
        );
    }

    #[test]
    fn model_text_drops_thinking() {
        // strip_thinking: split on '<channel|>', keep what precedes '<|channel>' in each part, trim.
        assert_eq!(
            strip_thinking("<|channel>thought\nhmm<channel|>Answer "),
            "Answer"
        );
        assert_eq!(
            strip_thinking("A <|channel>x<channel|> B<|channel>y"),
            "A  B"
        );
        assert_eq!(strip_thinking(" plain "), "plain");
        assert_eq!(
            render(
                None,
                &[],
                &[user("q"), model("<|channel>thought\n<channel|>  Hi!  ")],
                false
            ),
            bos("<|turn>user\nq<turn|>\n<|turn>model\nHi!<turn|>\n")
        );
    }

    #[test]
    fn media_placeholders() {
        // Template "{{- '<|image|>' -}}" / "{{- '<|audio|>' -}}" with text parts trimmed and
        // joined with nothing; the processor expands each placeholder to
        // boi + image_token * n + eoi (boa + audio_token * n + eoa).
        let turns = [Turn::User(vec![
            Part::Text("Describe this image: ".into()),
            Part::Image { tokens: 3 },
            Part::Audio { tokens: 2 },
            Part::Text(" and answer. ".into()),
        ])];
        assert_eq!(
            render(None, &[], &turns, true),
            bos(
                "<|turn>user\nDescribe this image:<|image><|image|><|image|><|image|><image|>\
<|audio><|audio|><|audio|><audio|>and answer.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
            )
        );
        // Counts are exact: one token per 640-sample frame / per 48×48 patch.
        let rendered = render(
            None,
            &[],
            &[Turn::User(vec![
                Part::Audio { tokens: 25 },
                Part::Image { tokens: 280 },
            ])],
            false,
        );
        assert_eq!(rendered.matches(AUDIO_TOKEN).count(), 25);
        assert_eq!(rendered.matches(IMAGE_TOKEN).count(), 280);
        assert_eq!(rendered.matches(AUDIO_START).count(), 1);
        assert_eq!(rendered.matches(IMAGE_END).count(), 1);
        // Zero tokens still brackets the (empty) media.
        assert_eq!(
            render(
                None,
                &[],
                &[Turn::User(vec![Part::Audio { tokens: 0 }])],
                false
            ),
            bos("<|turn>user\n<|audio><audio|><turn|>\n")
        );
    }
}
