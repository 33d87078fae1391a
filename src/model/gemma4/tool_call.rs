//! Gemma 4 tool-call text protocol: a streaming parser for what the model emits, and a
//! formatter for values the runtime writes back (`response:NAME{…}`, replayed calls).
//!
//! # The grammar (as the model emits it)
//!
//! ```text
//! <|tool_call>call:NAME{key:<|"|>text<|"|>,n:3,x:-1.5,flag:true,none:null,obj:{a:[1,2]}}<tool_call|>
//! ```
//!
//! - Keys are bare (`key:`); a key may also be wrapped in `<|"|>…<|"|>` (vLLM
//!   `_normalize_gemma4_key`, test `test_string_delimited_dict_key`).
//! - Strings are wrapped in the special token `<|"|>` on both sides and are never escaped,
//!   so they may hold `{ } [ ] , : "` and newlines freely.
//! - Numbers, `true`, `false`, `null` are bare; objects `{}` and arrays `[]` nest.
//! - Several calls may follow each other with nothing between them; after the last one the
//!   model emits `<|tool_response>`, meaning "stop: the runtime appends the results".
//!
//! Sources: vLLM `vllm/tool_parsers/gemma4_tool_parser.py` (+ its tests
//! `tests/tool_parsers/test_gemma4_tool_parser.py`, `test_gemma4_utils.py`,
//! `test_gemma4_regex_and_bare_calls.py`), the Gemma 4 chat templates
//! (`format_argument` macro; llama.cpp `models/templates/gemma4.jinja`,
//! `google-gemma-4-31B-it.jinja`) and Google's LiteRT-LM `gemma4_data_processor_test.cc`.
//!
//! # Streaming contract of [`ToolCallParser`]
//!
//! Text is fed as the detokenizer produces it (special tokens kept as text), in chunks cut
//! anywhere. Plain text is released as soon as it cannot be the start of a marker; a tail
//! such as `<|to` is held back only until the next chunk decides it. A call is reported
//! once, whole, when its closing `}` (and the `<tool_call|>` after it, if it comes) has
//! arrived. Feeding the same text in any chunking yields the same events, up to how
//! consecutive `Text` events are split.
//!
//! Malformed input never panics and never loses text:
//! - a call still open when [`ToolCallParser::finish`] is called (cut off mid-body) is
//!   returned verbatim, marker included, as [`ParsedEvent::Text`];
//! - a call whose header is not `call:NAME{`, whose brackets do not match, or whose body
//!   does not parse is returned as [`ParsedEvent::MalformedToolCall`] with its raw text and
//!   the reason, so the runtime can log it, show it, or tell the model.
//!
//! Leniencies (each seen in the references): a stray `:` or whitespace before `call:`
//! (vLLM `test_colon_prefixed_tool_call`); a complete `{…}` body closed by something other
//! than `<tool_call|>` — e.g. `<turn|>` (vLLM `test_turn_end_closure_instead_of_tool_call_end`)
//! or the end of the stream — is still a call.

use std::fmt;

use serde_json::{Map, Number, Value};

/// Opens a tool call (special token).
pub const TOOL_CALL_START: &str = "<|tool_call>";
/// Closes a tool call (special token).
pub const TOOL_CALL_END: &str = "<tool_call|>";
/// Emitted by the model after its calls: "stop, the runtime appends the results".
pub const TOOL_RESPONSE_START: &str = "<|tool_response>";
/// Closes one tool result written by the runtime.
pub const TOOL_RESPONSE_END: &str = "<tool_response|>";
/// Wraps every string value (special token), on both sides.
pub const STRING_DELIM: &str = "<|\"|>";

/// Longest `call:NAME` header (after `<|tool_call>`) we wait for before calling it junk;
/// keeps a model that emits `<|tool_call>` followed by prose from being buffered forever.
const MAX_HEADER_LEN: usize = 256;
/// Deepest `{`/`[` nesting accepted, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 128;

/// Something the parser recognised in the model's output.
#[derive(Debug, Clone, PartialEq)]
pub enum ParsedEvent {
    /// Ordinary text for the user (may arrive in many small pieces).
    Text(String),
    /// One complete tool call; `arguments` is always a JSON object.
    ToolCall { name: String, arguments: Value },
    /// The model emitted `<|tool_response>`: stop generating and run the calls.
    ToolResponseRequested,
    /// A `<|tool_call>` that could not be understood. `raw` is the exact text consumed
    /// (starting with `<|tool_call>`), so nothing the model said is lost.
    MalformedToolCall { raw: String, error: ToolCallError },
}

/// Why a tool call or argument body could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallError {
    /// What was wrong, in words.
    pub message: String,
    /// Byte offset in the text being parsed (the body, or the header), where known.
    pub offset: Option<usize>,
}

impl ToolCallError {
    fn at(offset: usize, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            offset: Some(offset),
        }
    }
}

impl fmt::Display for ToolCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(offset) => write!(f, "{} (at byte {offset})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ToolCallError {}

// ---------------------------------------------------------------------------------------
// Streaming parser
// ---------------------------------------------------------------------------------------

/// Incremental parser: [`push`](Self::push) chunks as they are generated, then
/// [`finish`](Self::finish) once at the end of the stream. Reusable after `finish`.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    /// Input not yet turned into events. In text mode: at most a held-back marker prefix.
    /// In call mode: everything after the `<|tool_call>` marker.
    buf: String,
    mode: Mode,
}

#[derive(Debug, Default)]
enum Mode {
    #[default]
    Text,
    Call(CallScan),
}

/// Progress through one `<|tool_call>…` span; offsets index `ToolCallParser::buf`.
#[derive(Debug)]
enum CallScan {
    /// Before the `{`: reading `call:NAME`.
    Header,
    /// Inside the `{…}` body. `pos` is the next byte to look at; bytes before it are
    /// already accounted for, so each byte is scanned once however the input is chunked.
    Body {
        name: String,
        body_start: usize,
        pos: usize,
        /// Closing brackets expected, innermost last.
        closers: Vec<u8>,
        in_string: bool,
        /// Set when brackets stopped matching; from then on we only look for the end of
        /// the call so the whole broken span can be reported at once.
        broken: Option<ToolCallError>,
    },
    /// The body's closing `}` has been seen; `body_end` is just past it.
    AfterBody {
        name: String,
        body_start: usize,
        body_end: usize,
    },
}

/// What scanning the body found.
enum BodyOutcome {
    /// Need more input to decide.
    NeedMore,
    /// The outermost `}` closed at this offset (exclusive end of the body).
    Closed(usize),
    /// Call ended (by `<tool_call|>` or `<|tool_response>`) with the body broken;
    /// `consumed` bytes of `buf` belong to the malformed call.
    Broken {
        consumed: usize,
        error: ToolCallError,
    },
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece of generated text and returns whatever it completes.
    pub fn push(&mut self, chunk: &str) -> Vec<ParsedEvent> {
        self.buf.push_str(chunk);
        let mut events = Vec::new();
        self.run(&mut events, false);
        events
    }

    /// Ends the stream: flushes held-back text and settles any open call (see the module
    /// docs for what happens to an unterminated one). The parser is then ready for reuse.
    pub fn finish(&mut self) -> Vec<ParsedEvent> {
        let mut events = Vec::new();
        self.run(&mut events, true);
        // After an end-of-stream pass nothing can still be pending; clear defensively.
        if !self.buf.is_empty() {
            push_text(&mut events, &std::mem::take(&mut self.buf));
        }
        self.mode = Mode::Text;
        events
    }

    /// Steps the state machine until it needs more input.
    fn run(&mut self, out: &mut Vec<ParsedEvent>, at_end: bool) {
        loop {
            let progressed = match self.mode {
                Mode::Text => self.step_text(out, at_end),
                Mode::Call(_) => self.step_call(out, at_end),
            };
            if !progressed {
                break;
            }
        }
    }

    /// Text mode: release plain text, react to `<|tool_call>` and `<|tool_response>`.
    fn step_text(&mut self, out: &mut Vec<ParsedEvent>, at_end: bool) -> bool {
        let call = self.buf.find(TOOL_CALL_START);
        let response = self.buf.find(TOOL_RESPONSE_START);
        let next = match (call, response) {
            (Some(c), Some(r)) if r < c => Some((r, TOOL_RESPONSE_START)),
            (Some(c), _) => Some((c, TOOL_CALL_START)),
            (None, Some(r)) => Some((r, TOOL_RESPONSE_START)),
            (None, None) => None,
        };
        match next {
            Some((at, marker)) => {
                push_text(out, &self.buf[..at]);
                self.buf.drain(..at + marker.len());
                if marker == TOOL_CALL_START {
                    self.mode = Mode::Call(CallScan::Header);
                } else {
                    out.push(ParsedEvent::ToolResponseRequested);
                }
                true
            }
            None => {
                let keep = if at_end { 0 } else { held_back_len(&self.buf) };
                let cut = self.buf.len() - keep;
                push_text(out, &self.buf[..cut]);
                self.buf.drain(..cut);
                false
            }
        }
    }

    /// Call mode: advance through header, body and end marker.
    fn step_call(&mut self, out: &mut Vec<ParsedEvent>, at_end: bool) -> bool {
        let Mode::Call(scan) = &mut self.mode else {
            return false;
        };
        match scan {
            CallScan::Header => match scan_header(&self.buf) {
                HeaderScan::Incomplete if !at_end => false,
                HeaderScan::Incomplete => {
                    self.abandon_unterminated(out);
                    true
                }
                HeaderScan::Invalid(at, error) => {
                    // The header is junk; report the marker plus what was read so far and
                    // re-read the rest as text (it may even hold a fresh `<|tool_call>`).
                    self.emit_malformed(out, at, error);
                    true
                }
                HeaderScan::Complete { name, brace } => {
                    *scan = CallScan::Body {
                        name,
                        body_start: brace,
                        pos: brace + 1,
                        closers: vec![b'}'],
                        in_string: false,
                        broken: None,
                    };
                    true
                }
            },
            CallScan::Body {
                name,
                body_start,
                pos,
                closers,
                in_string,
                broken,
            } => match scan_body(&self.buf, pos, closers, in_string, broken) {
                BodyOutcome::NeedMore if !at_end => false,
                BodyOutcome::NeedMore => {
                    self.abandon_unterminated(out);
                    true
                }
                BodyOutcome::Closed(body_end) => {
                    *scan = CallScan::AfterBody {
                        name: std::mem::take(name),
                        body_start: *body_start,
                        body_end,
                    };
                    true
                }
                BodyOutcome::Broken { consumed, error } => {
                    self.emit_malformed(out, consumed, error);
                    true
                }
            },
            CallScan::AfterBody {
                name,
                body_start,
                body_end,
            } => {
                let (body_start, body_end) = (*body_start, *body_end);
                let after_ws = self.buf[body_end..].trim_start();
                let consumed = if after_ws.starts_with(TOOL_CALL_END) {
                    self.buf.len() - after_ws.len() + TOOL_CALL_END.len()
                } else if !at_end && TOOL_CALL_END.starts_with(after_ws) {
                    // Nothing yet, or a partial `<tool_call|>`: wait to see if it completes.
                    return false;
                } else {
                    // Closed by something else (`<turn|>`, prose, end of stream): the body
                    // is complete, so accept the call and re-read what follows as text.
                    body_end
                };
                let name = std::mem::take(name);
                let event = match parse_arguments(&self.buf[body_start..body_end]) {
                    Ok(arguments) => ParsedEvent::ToolCall { name, arguments },
                    Err(error) => ParsedEvent::MalformedToolCall {
                        raw: format!("{TOOL_CALL_START}{}", &self.buf[..consumed]),
                        error,
                    },
                };
                out.push(event);
                self.buf.drain(..consumed);
                self.mode = Mode::Text;
                true
            }
        }
    }

    /// Reports `<|tool_call>` + the first `consumed` bytes as malformed; back to text.
    fn emit_malformed(
        &mut self,
        out: &mut Vec<ParsedEvent>,
        consumed: usize,
        error: ToolCallError,
    ) {
        let consumed = floor_char_boundary(&self.buf, consumed);
        let raw = format!("{TOOL_CALL_START}{}", &self.buf[..consumed]);
        out.push(ParsedEvent::MalformedToolCall { raw, error });
        self.buf.drain(..consumed);
        self.mode = Mode::Text;
    }

    /// End of stream inside an unfinished call: give the text back verbatim.
    fn abandon_unterminated(&mut self, out: &mut Vec<ParsedEvent>) {
        let raw = format!("{TOOL_CALL_START}{}", std::mem::take(&mut self.buf));
        push_text(out, &raw);
        self.mode = Mode::Text;
    }
}

/// Appends text, merging with a preceding `Text` event and skipping empty strings.
fn push_text(out: &mut Vec<ParsedEvent>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(ParsedEvent::Text(last)) = out.last_mut() {
        last.push_str(text);
    } else {
        out.push(ParsedEvent::Text(text.to_owned()));
    }
}

/// Length of the longest tail of `buf` that is a proper prefix of a marker we act on in
/// text mode; that much must wait for the next chunk.
fn held_back_len(buf: &str) -> usize {
    let longest = TOOL_CALL_START.len().max(TOOL_RESPONSE_START.len()) - 1;
    let max = longest.min(buf.len());
    (1..=max)
        .rev()
        .find(|&k| {
            let start = buf.len() - k;
            buf.is_char_boundary(start)
                && [TOOL_CALL_START, TOOL_RESPONSE_START]
                    .iter()
                    .any(|marker| marker.len() > k && marker.starts_with(&buf[start..]))
        })
        .unwrap_or(0)
}

/// Largest char boundary ≤ `at` (offsets we compute are always ASCII positions, but stay safe).
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

enum HeaderScan {
    Incomplete,
    Invalid(usize, ToolCallError),
    Complete { name: String, brace: usize },
}

/// Reads `call:NAME{` at the start of `h` (the text after `<|tool_call>`).
/// Accepts leading whitespace and one stray `:` before `call:`.
fn scan_header(h: &str) -> HeaderScan {
    let bytes = h.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if i < bytes.len() && bytes[i] == b':' {
        i += 1;
        skip_ws(&mut i);
    }
    if i >= MAX_HEADER_LEN {
        // Endless whitespace after the marker: junk, not a call (position fixed so the
        // verdict does not depend on chunking).
        return HeaderScan::Invalid(
            MAX_HEADER_LEN,
            ToolCallError::at(MAX_HEADER_LEN, "no `call:` after <|tool_call>"),
        );
    }
    for &expected in b"call:" {
        if i >= bytes.len() {
            return HeaderScan::Incomplete;
        }
        if bytes[i] != expected {
            return HeaderScan::Invalid(
                i,
                ToolCallError::at(i, "tool call does not start with `call:`"),
            );
        }
        i += 1;
    }
    let name_start = i;
    for (offset, c) in h[name_start..].char_indices() {
        let at = name_start + offset;
        if c == '{' {
            let name = h[name_start..at].trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return HeaderScan::Invalid(at, ToolCallError::at(at, "bad tool name"));
            }
            return HeaderScan::Complete {
                name: name.to_owned(),
                brace: at,
            };
        }
        if !(is_name_char(c) || c.is_whitespace()) {
            return HeaderScan::Invalid(
                at,
                ToolCallError::at(at, format!("unexpected {c:?} in tool name")),
            );
        }
        if at >= MAX_HEADER_LEN {
            return HeaderScan::Invalid(at, ToolCallError::at(at, "tool name too long"));
        }
    }
    HeaderScan::Incomplete
}

/// Characters allowed in a tool name: vLLM accepts `[\w\-.]`; MCP-style names may also
/// carry `:` or `/`.
fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/')
}

/// Scans the body from `*pos`, updating the bracket stack and string state in place.
///
/// Works on bytes, never slicing the `str`: every byte acted on is ASCII, and no byte of a
/// multi-byte UTF-8 character equals an ASCII byte, so stepping one byte at a time is safe.
fn scan_body(
    buf: &str,
    pos: &mut usize,
    closers: &mut Vec<u8>,
    in_string: &mut bool,
    broken: &mut Option<ToolCallError>,
) -> BodyOutcome {
    let bytes = buf.as_bytes();
    let delim = STRING_DELIM.as_bytes();
    let call_end = TOOL_CALL_END.as_bytes();
    let response = TOOL_RESPONSE_START.as_bytes();
    while *pos < bytes.len() {
        let rest = &bytes[*pos..];
        if *in_string {
            // Only the closing delimiter matters inside a string.
            match rest.iter().position(|&b| b == b'<') {
                None => *pos = bytes.len(),
                Some(lt) => {
                    *pos += lt;
                    let rest = &bytes[*pos..];
                    if rest.starts_with(delim) {
                        *in_string = false;
                        *pos += delim.len();
                    } else if delim.starts_with(rest) {
                        return BodyOutcome::NeedMore;
                    } else {
                        *pos += 1;
                    }
                }
            }
            continue;
        }
        match bytes[*pos] {
            b'<' => {
                if rest.starts_with(delim) {
                    *in_string = true;
                    *pos += delim.len();
                } else if rest.starts_with(call_end) {
                    // `<tool_call|>` outside a string always ends the call, balanced or not.
                    let error = broken.take().unwrap_or_else(|| {
                        ToolCallError::at(
                            *pos,
                            format!("tool call ended with {} unclosed bracket(s)", closers.len()),
                        )
                    });
                    return BodyOutcome::Broken {
                        consumed: *pos + call_end.len(),
                        error,
                    };
                } else if rest.starts_with(response) {
                    // The model asked for results mid-body; close the broken call here and
                    // let text mode see the `<|tool_response>`.
                    let error = broken.take().unwrap_or_else(|| {
                        ToolCallError::at(*pos, "tool call interrupted by <|tool_response>")
                    });
                    return BodyOutcome::Broken {
                        consumed: *pos,
                        error,
                    };
                } else if [delim, call_end, response]
                    .iter()
                    .any(|marker| marker.starts_with(rest))
                {
                    return BodyOutcome::NeedMore;
                } else {
                    *pos += 1;
                }
            }
            open @ (b'{' | b'[') if broken.is_none() => {
                if closers.len() >= MAX_DEPTH {
                    *broken = Some(ToolCallError::at(*pos, "arguments nested too deeply"));
                } else {
                    closers.push(if open == b'{' { b'}' } else { b']' });
                }
                *pos += 1;
            }
            close @ (b'}' | b']') if broken.is_none() => match closers.pop() {
                Some(expected) if expected == close => {
                    *pos += 1;
                    if closers.is_empty() {
                        return BodyOutcome::Closed(*pos);
                    }
                }
                _ => {
                    *broken = Some(ToolCallError::at(
                        *pos,
                        format!("mismatched {:?} in tool call arguments", close as char),
                    ));
                    *pos += 1;
                }
            },
            _ => *pos += 1,
        }
    }
    BodyOutcome::NeedMore
}

// ---------------------------------------------------------------------------------------
// Argument parsing (whole body)
// ---------------------------------------------------------------------------------------

/// Parses a tool-call argument body into a JSON object.
///
/// Accepts either the braced form (`{key:<|"|>v<|"|>,n:1}`) or just its inside
/// (`key:<|"|>v<|"|>,n:1`, as vLLM's `_parse_gemma4_args` takes it). Empty input → `{}`.
///
/// Value rules: `<|"|>…<|"|>` → string (verbatim, no trimming, no escapes); `{}`/`[]` nest;
/// a bare token is `true`/`false` (also `True`/`False`), `null`/`none`/`nil` (any case),
/// a number (JSON syntax, plus a trailing dot as in `108.`), otherwise a string of the
/// trimmed token. `key:` with nothing before `,`/`}` gives `""`. Stray and trailing commas
/// are ignored; a JSON-style `"key"` loses its quotes. Errors: unterminated strings,
/// objects or arrays; a key without `:`; a string delimiter glued to a bare word; text
/// after a value; nesting deeper than 128.
pub fn parse_arguments(body: &str) -> Result<Value, ToolCallError> {
    let mut parser = ArgParser {
        text: body,
        pos: 0,
        depth: 0,
    };
    parser.skip_ws();
    let value = if parser.peek() == Some(b'{') {
        parser.parse_object()?
    } else {
        parser.parse_members(None)?
    };
    parser.skip_ws();
    if parser.pos < body.len() {
        return Err(ToolCallError::at(
            parser.pos,
            "unexpected text after the arguments",
        ));
    }
    Ok(value)
}

struct ArgParser<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> ArgParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn enter(&mut self) -> Result<(), ToolCallError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ToolCallError::at(self.pos, "arguments nested too deeply"));
        }
        Ok(())
    }

    /// `{ members }`, cursor on the `{`.
    fn parse_object(&mut self) -> Result<Value, ToolCallError> {
        self.enter()?;
        self.pos += 1; // '{'
        let value = self.parse_members(Some(b'}'))?;
        self.depth -= 1;
        Ok(value)
    }

    /// `key:value` pairs separated by commas, up to `close` (consumed) or, when `close`
    /// is `None`, the end of the input.
    fn parse_members(&mut self, close: Option<u8>) -> Result<Value, ToolCallError> {
        let mut map = Map::new();
        loop {
            // Skip whitespace and stray commas between members (as vLLM does).
            loop {
                self.skip_ws();
                if self.peek() == Some(b',') {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            match (self.peek(), close) {
                (None, None) => break,
                (None, Some(_)) => return Err(ToolCallError::at(self.pos, "unterminated object")),
                (Some(b), Some(c)) if b == c => {
                    self.pos += 1;
                    break;
                }
                _ => {}
            }
            let key = self.parse_key()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(ToolCallError::at(
                    self.pos,
                    format!("expected ':' after key {key:?}"),
                ));
            }
            self.pos += 1;
            self.skip_ws();
            let value = match self.peek() {
                // `key:` followed directly by a separator: an empty value (vLLM gives "").
                None | Some(b',') => Value::String(String::new()),
                Some(b) if Some(b) == close => Value::String(String::new()),
                _ => self.parse_value()?,
            };
            map.insert(key, value);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b) if Some(b) == close => {}
                None if close.is_none() => {}
                None => return Err(ToolCallError::at(self.pos, "unterminated object")),
                Some(_) => {
                    return Err(ToolCallError::at(
                        self.pos,
                        "expected ',' or the end of the object",
                    ))
                }
            }
        }
        Ok(Value::Object(map))
    }

    fn parse_key(&mut self) -> Result<String, ToolCallError> {
        if self.rest().starts_with(STRING_DELIM) {
            return self.parse_string();
        }
        let start = self.pos;
        let len = self
            .rest()
            .find([':', ',', '{', '}', '[', ']'])
            .unwrap_or(self.rest().len());
        self.pos += len;
        let raw = self.text[start..self.pos].trim();
        // Tolerate JSON-style `"key":`.
        let key = raw
            .strip_prefix('"')
            .and_then(|k| k.strip_suffix('"'))
            .unwrap_or(raw);
        if key.is_empty() {
            return Err(ToolCallError::at(start, "expected a key"));
        }
        if key.contains(STRING_DELIM) {
            return Err(ToolCallError::at(
                start,
                "string delimiter inside a bare key",
            ));
        }
        Ok(key.to_owned())
    }

    /// `<|"|>…<|"|>`, cursor on the opening delimiter.
    fn parse_string(&mut self) -> Result<String, ToolCallError> {
        let start = self.pos;
        self.pos += STRING_DELIM.len();
        match self.rest().find(STRING_DELIM) {
            Some(len) => {
                let s = self.rest()[..len].to_owned();
                self.pos += len + STRING_DELIM.len();
                Ok(s)
            }
            None => Err(ToolCallError::at(start, "unterminated string")),
        }
    }

    /// Any value.
    fn parse_value(&mut self) -> Result<Value, ToolCallError> {
        if self.rest().starts_with(STRING_DELIM) {
            return self.parse_string().map(Value::String);
        }
        match self.peek() {
            Some(b'{') => self.parse_object(),
            Some(b'[') => self.parse_array(),
            _ => self.parse_bare(),
        }
    }

    /// `[ values ]`, cursor on the `[`.
    fn parse_array(&mut self) -> Result<Value, ToolCallError> {
        self.enter()?;
        self.pos += 1; // '['
        let mut items = Vec::new();
        loop {
            // Skip whitespace and stray commas (vLLM does the same).
            loop {
                self.skip_ws();
                if self.peek() == Some(b',') {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            match self.peek() {
                None => return Err(ToolCallError::at(self.pos, "unterminated array")),
                Some(b']') => {
                    self.pos += 1;
                    break;
                }
                _ => {}
            }
            items.push(self.parse_value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                None => return Err(ToolCallError::at(self.pos, "unterminated array")),
                Some(_) => return Err(ToolCallError::at(self.pos, "expected ',' or ']'")),
            }
        }
        self.depth -= 1;
        Ok(Value::Array(items))
    }

    /// A bare token up to `,`, `}`, `]` or the end.
    fn parse_bare(&mut self) -> Result<Value, ToolCallError> {
        let start = self.pos;
        let len = self
            .rest()
            .find([',', '}', ']'])
            .unwrap_or(self.rest().len());
        let token = self.rest()[..len].trim();
        if token.contains(STRING_DELIM) {
            // e.g. `a:x<|"|>y<|"|>`: neither a string nor a bare word.
            return Err(ToolCallError::at(
                start,
                "string delimiter inside a bare value",
            ));
        }
        self.pos += len;
        Ok(bare_value(token))
    }
}

/// Interprets an undelimited token.
fn bare_value(token: &str) -> Value {
    match token {
        "true" | "True" => return Value::Bool(true),
        "false" | "False" => return Value::Bool(false),
        _ => {}
    }
    if ["null", "none", "nil"]
        .iter()
        .any(|n| token.eq_ignore_ascii_case(n))
    {
        return Value::Null;
    }
    if let Some(number) = parse_number(token) {
        return Value::Number(number);
    }
    Value::String(token.to_owned())
}

fn parse_number(token: &str) -> Option<Number> {
    let first = *token.as_bytes().first()?;
    if !(first.is_ascii_digit() || first == b'-') {
        return None;
    }
    if let Ok(n) = token.parse::<Number>() {
        return Some(n);
    }
    // `108.` (Python's float() accepts it; vLLM's non-partial parse gives 108.0).
    let whole = token.strip_suffix('.')?;
    if whole.parse::<i64>().is_ok() || whole.parse::<u64>().is_ok() {
        return whole.parse::<f64>().ok().and_then(Number::from_f64);
    }
    None
}

// ---------------------------------------------------------------------------------------
// Formatting (JSON → Gemma 4 grammar)
// ---------------------------------------------------------------------------------------

/// Renders a JSON value in the Gemma 4 grammar, as the chat template's
/// `format_argument(value, escape_keys=False)` does for tool calls and tool responses:
/// strings → `<|"|>s<|"|>`, objects → `{k:v,…}` with keys sorted case-insensitively (Jinja
/// `dictsort`), arrays → `[a,b]`, booleans → `true`/`false`, numbers as JSON writes them.
///
/// Two deliberate differences from the Jinja output: `null` is written `null` (Jinja
/// would print Python's `None`; the model itself writes `null`, cf. vLLM
/// `test_null_value`), and a key that a bare key cannot carry (empty, or containing
/// whitespace or one of `:,{}[]<`) is wrapped in `<|"|>…<|"|>` so the text parses back.
pub fn format_value(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    out
}

/// `<|tool_call>call:NAME{…}<tool_call|>`, as the template replays a past call.
/// Non-object arguments give `call:NAME{}` (the template only iterates a mapping).
pub fn format_tool_call(name: &str, arguments: &Value) -> String {
    let body = match arguments {
        Value::Object(_) => format_value(arguments),
        _ => "{}".to_owned(),
    };
    format!("{TOOL_CALL_START}call:{name}{body}{TOOL_CALL_END}")
}

/// `<|tool_response>response:NAME{…}<tool_response|>`: an object's fields become the
/// body; any other value is wrapped as `{value:…}` (template `format_tool_response_block`).
/// When the model has already emitted `<|tool_response>` itself, append only
/// `&block[TOOL_RESPONSE_START.len()..]`.
pub fn format_tool_response(name: &str, output: &Value) -> String {
    let body = match output {
        Value::Object(_) => format_value(output),
        other => format!("{{value:{}}}", format_value(other)),
    };
    format!("{TOOL_RESPONSE_START}response:{name}{body}{TOOL_RESPONSE_END}")
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            out.push_str(STRING_DELIM);
            out.push_str(s);
            out.push_str(STRING_DELIM);
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, value)) in dictsort(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if is_bare_key(key) {
                    out.push_str(key);
                } else {
                    out.push_str(STRING_DELIM);
                    out.push_str(key);
                    out.push_str(STRING_DELIM);
                }
                out.push(':');
                write_value(out, value);
            }
            out.push('}');
        }
    }
}

/// Jinja's `dictsort`: by key, case-insensitively (ties broken case-sensitively so the
/// order is total and independent of the map's own ordering).
pub(crate) fn dictsort(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|(a, _), (b, _)| {
        a.to_lowercase()
            .cmp(&b.to_lowercase())
            .then_with(|| a.cmp(b))
    });
    entries
}

pub(crate) fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && !key.contains(|c: char| {
            c.is_whitespace() || matches!(c, ':' | ',' | '{' | '}' | '[' | ']' | '<' | '"')
        })
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
#[allow(clippy::approx_constant)] // 3.14 is the literal vLLM's tests use
mod tests {
    use super::*;
    use serde_json::json;

    /// Event shape compared in tests: malformed calls are compared by raw text only (the
    /// error wording is not part of the contract).
    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        T(String),
        C(String, Value),
        R,
        M(String),
    }

    fn t(s: &str) -> Ev {
        Ev::T(s.to_owned())
    }
    fn c(name: &str, args: Value) -> Ev {
        Ev::C(name.to_owned(), args)
    }
    fn m(raw: &str) -> Ev {
        Ev::M(raw.to_owned())
    }

    /// Feeds `chunks`, then finishes; merges adjacent text (chunking may split it anywhere).
    fn feed<S: AsRef<str>>(chunks: &[S]) -> Vec<Ev> {
        let mut parser = ToolCallParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.push(chunk.as_ref()));
        }
        events.extend(parser.finish());
        let mut out: Vec<Ev> = Vec::new();
        for event in events {
            let ev = match event {
                ParsedEvent::Text(s) => {
                    assert!(!s.is_empty(), "empty Text event");
                    if let Some(Ev::T(last)) = out.last_mut() {
                        last.push_str(&s);
                        continue;
                    }
                    Ev::T(s)
                }
                ParsedEvent::ToolCall { name, arguments } => {
                    assert!(arguments.is_object(), "arguments must be an object");
                    Ev::C(name, arguments)
                }
                ParsedEvent::ToolResponseRequested => Ev::R,
                ParsedEvent::MalformedToolCall { raw, error } => {
                    assert!(
                        raw.starts_with(TOOL_CALL_START),
                        "raw keeps the marker: {raw:?}"
                    );
                    assert!(!error.message.is_empty());
                    Ev::M(raw)
                }
            };
            out.push(ev);
        }
        out
    }

    const SPECIAL: [&str; 9] = [
        TOOL_CALL_START,
        TOOL_CALL_END,
        TOOL_RESPONSE_START,
        TOOL_RESPONSE_END,
        STRING_DELIM,
        "<|turn>",
        "<turn|>",
        "<|channel>",
        "<channel|>",
    ];

    /// Splits text roughly as a tokenizer would: special tokens whole, words in pieces of
    /// up to 3 characters, every other character alone.
    fn tokenize(s: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(special) = SPECIAL.iter().find(|sp| rest.starts_with(**sp)) {
                tokens.push(special.to_string());
                rest = &rest[special.len()..];
                continue;
            }
            let mut end = 0;
            for (i, ch) in rest.char_indices() {
                if i > 0 && (!ch.is_alphanumeric() || rest[..i].chars().count() >= 3) {
                    break;
                }
                end = i + ch.len_utf8();
                if !ch.is_alphanumeric() {
                    break;
                }
            }
            tokens.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
        tokens
    }

    fn chars(s: &str) -> Vec<String> {
        s.chars().map(String::from).collect()
    }

    /// Asserts the same events for: the whole string, pseudo-tokens, single characters,
    /// and every split into two chunks.
    fn check(input: &str, expected: &[Ev]) {
        assert_eq!(feed(&[input]), expected, "whole: {input:?}");
        assert_eq!(feed(&tokenize(input)), expected, "tokens: {input:?}");
        assert_eq!(feed(&chars(input)), expected, "chars: {input:?}");
        for (i, _) in input.char_indices().skip(1) {
            assert_eq!(
                feed(&[&input[..i], &input[i..]]),
                expected,
                "split at {i}: {input:?}"
            );
        }
    }

    /// Asserts the events for the given chunks (the vLLM streaming cases), and also for
    /// their concatenation through `check`.
    fn check_chunks(chunks: &[&str], expected: &[Ev]) {
        assert_eq!(feed(chunks), expected, "chunks: {chunks:?}");
        check(&chunks.concat(), expected);
    }

    // ----- the streaming table -------------------------------------------------------

    #[test]
    fn table_whole_tokens_chars_and_splits() {
        let q = STRING_DELIM;
        let cases: Vec<(&str, String, Vec<Ev>)> = vec![
            // vLLM TestExtractToolCalls.test_no_tool_calls
            ("no calls", "Hello, how can I help you today?".into(), vec![t("Hello, how can I help you today?")]),
            // vLLM test_single_tool_call
            (
                "single",
                format!("<|tool_call>call:get_weather{{location:{q}London{q}}}<tool_call|>"),
                vec![c("get_weather", json!({"location": "London"}))],
            ),
            // vLLM test_multiple_arguments
            (
                "multiple arguments",
                format!("<|tool_call>call:get_weather{{location:{q}San Francisco{q},unit:{q}celsius{q}}}<tool_call|>"),
                vec![c("get_weather", json!({"location": "San Francisco", "unit": "celsius"}))],
            ),
            // vLLM test_text_before_tool_call (we keep the text verbatim, trailing space too)
            (
                "text before",
                format!("Let me check the weather for you. <|tool_call>call:get_weather{{location:{q}Paris{q}}}<tool_call|>"),
                vec![t("Let me check the weather for you. "), c("get_weather", json!({"location": "Paris"}))],
            ),
            // vLLM test_multiple_tool_calls
            (
                "two calls",
                format!(
                    "<|tool_call>call:get_weather{{location:{q}London{q}}}<tool_call|><|tool_call>call:get_time{{location:{q}London{q}}}<tool_call|>"
                ),
                vec![c("get_weather", json!({"location": "London"})), c("get_time", json!({"location": "London"}))],
            ),
            // vLLM test_nested_arguments
            (
                "nested",
                format!("<|tool_call>call:complex_function{{nested:{{inner:{q}value{q}}},list:[{q}a{q},{q}b{q}]}}<tool_call|>"),
                vec![c("complex_function", json!({"nested": {"inner": "value"}, "list": ["a", "b"]}))],
            ),
            // vLLM test_tool_call_with_number_and_boolean
            (
                "number and boolean",
                "<|tool_call>call:set_status{is_active:true,count:42,score:3.14}<tool_call|>".into(),
                vec![c("set_status", json!({"is_active": true, "count": 42, "score": 3.14}))],
            ),
            // vLLM test_incomplete_tool_call: no end, cut mid-string → the raw text comes back
            (
                "incomplete",
                format!("<|tool_call>call:get_weather{{location:{q}London"),
                vec![t(&format!("<|tool_call>call:get_weather{{location:{q}London"))],
            ),
            // vLLM test_hyphenated_function_name / test_hyphenated_tool_name
            (
                "hyphenated",
                format!("<|tool_call>call:get-weather{{location:{q}London{q}}}<tool_call|>"),
                vec![c("get-weather", json!({"location": "London"}))],
            ),
            // vLLM test_dotted_function_name / test_dotted_tool_name
            (
                "dotted",
                format!("<|tool_call>call:weather.get{{location:{q}London{q}}}<tool_call|>"),
                vec![c("weather.get", json!({"location": "London"}))],
            ),
            // vLLM test_no_arguments / test_streaming_empty_args
            ("no arguments", "<|tool_call>call:get_status{}<tool_call|>".into(), vec![c("get_status", json!({}))]),
            // vLLM (utils) test_standard_format_with_internal_quotes
            (
                "internal quotes",
                format!(
                    "<|tool_call>call:write_file{{path:{q}index.html{q},content:{q}<div class=\"app\">Hello</div>{q}}}<tool_call|>"
                ),
                vec![c("write_file", json!({"path": "index.html", "content": "<div class=\"app\">Hello</div>"}))],
            ),
            // vLLM (utils) test_multiple_tool_calls
            (
                "two read_file",
                format!(
                    "<|tool_call>call:read_file{{path:{q}a.txt{q}}}<tool_call|><|tool_call>call:read_file{{path:{q}b.txt{q}}}<tool_call|>"
                ),
                vec![c("read_file", json!({"path": "a.txt"})), c("read_file", json!({"path": "b.txt"}))],
            ),
            // vLLM (utils) test_no_tool_calls / (bare calls) test_no_tool_call_returns_empty
            ("plain", "Hello, how can I help?".into(), vec![t("Hello, how can I help?")]),
            (
                "plain reasoning",
                "Just some reasoning text with no call in it.".into(),
                vec![t("Just some reasoning text with no call in it.")],
            ),
            // vLLM (utils) TestHasToolResponseTag
            ("response tag", "some text <|tool_response>".into(), vec![t("some text "), Ev::R]),
            ("no response tag", "some text <eos>".into(), vec![t("some text <eos>")]),
            ("response tag + ws", "some text <|tool_response>  ".into(), vec![t("some text "), Ev::R, t("  ")]),
            // vLLM (bare calls) test_canonical_tag_wrapped_call
            (
                "bash",
                format!("<|tool_call>call:bash{{command:{q}ls -la /work{q}}}<tool_call|>"),
                vec![c("bash", json!({"command": "ls -la /work"}))],
            ),
            // vLLM test_turn_end_closure_instead_of_tool_call_end: a complete body closed by
            // `<turn|>` is still a call; the `<turn|>` stays text for the caller.
            (
                "closed by <turn|>",
                format!("<|tool_call>call:gdb{{args:{q}-batch -ex run /tmp/poc{q}}}<turn|>"),
                vec![c("gdb", json!({"args": "-batch -ex run /tmp/poc"})), t("<turn|>")],
            ),
            // vLLM test_multiple_sequential_canonical_calls (newline between them)
            (
                "sequential with newline",
                format!(
                    "<|tool_call>call:read_file{{path:{q}/work/Makefile{q}}}<tool_call|>\n<|tool_call>call:bash{{command:{q}make -j8{q}}}<tool_call|>"
                ),
                vec![c("read_file", json!({"path": "/work/Makefile"})), t("\n"), c("bash", json!({"command": "make -j8"}))],
            ),
            // vLLM test_colon_prefixed_tool_call (no end marker: complete body at finish)
            (
                "colon prefixed",
                format!("<|tool_call>:call:bash{{command:{q}pytest{q}}}"),
                vec![c("bash", json!({"command": "pytest"}))],
            ),
            // vLLM's non-strict fallbacks for calls WITHOUT `<|tool_call>` (after `<channel|>`,
            // after prose, `<call>name{…}`) are deliberately not parsed: only marked calls
            // are calls (vLLM's strict=True behaviour), so such text stays text.
            (
                "bare call after channel stays text",
                format!("<|channel>thought\nI need to read it.\n<channel|>call:bash{{command:{q}cat /work/src/entry.c{q}}}"),
                vec![t(&format!("<|channel>thought\nI need to read it.\n<channel|>call:bash{{command:{q}cat /work/src/entry.c{q}}}"))],
            ),
            (
                "bare call after prose stays text",
                format!("some prose\ncall:bash{{command:{q}make -j8{q}}}"),
                vec![t(&format!("some prose\ncall:bash{{command:{q}make -j8{q}}}"))],
            ),
            (
                "<call> tag stays text",
                format!("<call>get_weather{{city:{q}Paris{q}}}"),
                vec![t(&format!("<call>get_weather{{city:{q}Paris{q}}}"))],
            ),
            (
                "strict: unmarked call stays text",
                "call:get_weather{location:Tokyo}".into(),
                vec![t("call:get_weather{location:Tokyo}")],
            ),
            // DESIGN.md §3 example, then the stop marker.
            (
                "design example",
                format!("<|tool_call>call:NAME{{key:{q}str{q},n:3,flag:true,obj:{{a:[1,2]}}}}<tool_call|><|tool_response>"),
                vec![c("NAME", json!({"key": "str", "n": 3, "flag": true, "obj": {"a": [1, 2]}})), Ev::R],
            ),
            // Several calls, text before, between and after, then the stop marker.
            (
                "text around calls",
                format!(
                    "Checking. <|tool_call>call:a{{x:1}}<tool_call|> and <|tool_call>call:b{{y:{q}z{q}}}<tool_call|><|tool_response>"
                ),
                vec![t("Checking. "), c("a", json!({"x": 1})), t(" and "), c("b", json!({"y": "z"})), Ev::R],
            ),
            ("text after call", "<|tool_call>call:f{}<tool_call|>Done.".into(), vec![c("f", json!({})), t("Done.")]),
            // Strings holding structure characters, quotes, newlines and marker lookalikes.
            (
                "nasty string",
                format!("<|tool_call>call:f{{s:{q}}}{{,:\"'\n]<[ <tool_call|> <|tool_response> <|\" |>{q},t:{q}{q}}}<tool_call|>"),
                vec![c("f", json!({"s": "}{,:\"'\n]<[ <tool_call|> <|tool_response> <|\" |>", "t": ""}))],
            ),
            // Unicode in text, names and strings.
            (
                "unicode",
                format!("héllo 👋 <|tool_call>call:météo{{ville:{q}Zürich 東京 🚀{q},n:-2}}<tool_call|>ça va"),
                vec![t("héllo 👋 "), c("météo", json!({"ville": "Zürich 東京 🚀", "n": -2})), t("ça va")],
            ),
            // Deep nesting and all scalar kinds.
            (
                "deep",
                format!("<|tool_call>call:f{{o:{{a:[1,[2,{{b:null}}],{q}c{q}],d:{{}}}},x:1.5e3,y:-0.25,z:false}}<tool_call|>"),
                vec![c("f", json!({"o": {"a": [1, [2, {"b": null}], "c"], "d": {}}, "x": 1500.0, "y": -0.25, "z": false}))],
            ),
            // Whitespace between the body and the end marker, and inside the body.
            (
                "whitespace",
                "<|tool_call>call:f{ a : 1 , b : [ 2 , 3 ] }  <tool_call|>".into(),
                vec![c("f", json!({"a": 1, "b": [2, 3]}))],
            ),
            // Text that only looks like a marker's start.
            ("lookalike mid", "a <|to b <|tool_cal c".into(), vec![t("a <|to b <|tool_cal c")]),
            ("lookalike end", "hello <|tool_resp".into(), vec![t("hello <|tool_resp")]),
            ("lookalike x", "<|tool_callx> <tool_call|> <|\"|>".into(), vec![t("<|tool_callx> <tool_call|> <|\"|>")]),
            ("lt before marker", "<<|tool_call>call:f{}<tool_call|>".into(), vec![t("<"), c("f", json!({}))]),
            ("lone lt", "x < y <".into(), vec![t("x < y <")]),
            // A partial end marker cut off by the end of the stream.
            ("partial end", "<|tool_call>call:f{}<tool_ca".into(), vec![c("f", json!({})), t("<tool_ca")]),
            // Unterminated header / string at the end of the stream: verbatim text.
            ("cut in header", "Sure <|tool_call>call:get_wea".into(), vec![t("Sure <|tool_call>call:get_wea")]),
            ("cut at marker", "<|tool_call>".into(), vec![t("<|tool_call>")]),
            (
                "unterminated string",
                format!("<|tool_call>call:f{{a:{q}abc}}<tool_call|><|tool_response>"),
                vec![t(&format!("<|tool_call>call:f{{a:{q}abc}}<tool_call|><|tool_response>"))],
            ),
            // Malformed calls.
            ("junk header", "<|tool_call>hello there".into(), vec![m("<|tool_call>"), t("hello there")]),
            (
                "junk header then real call",
                "<|tool_call><|tool_call>call:f{}<tool_call|>".into(),
                vec![m("<|tool_call>"), c("f", json!({}))],
            ),
            ("space in name", "<|tool_call>call:get weather{}<tool_call|>".into(), vec![m("<|tool_call>call:get weather"), t("{}<tool_call|>")]),
            ("mismatched", "<|tool_call>call:f{a:[1}}<tool_call|>ok".into(), vec![m("<|tool_call>call:f{a:[1}}<tool_call|>"), t("ok")]),
            ("unclosed at end marker", "<|tool_call>call:f{a:[1<tool_call|>ok".into(), vec![m("<|tool_call>call:f{a:[1<tool_call|>"), t("ok")]),
            ("bad body", "<|tool_call>call:f{a 1}<tool_call|>".into(), vec![m("<|tool_call>call:f{a 1}<tool_call|>")]),
            ("bad body no end", "<|tool_call>call:f{a 1}".into(), vec![m("<|tool_call>call:f{a 1}")]),
            (
                "interrupted by tool_response",
                "<|tool_call>call:f{a:[1<|tool_response>".into(),
                vec![m("<|tool_call>call:f{a:[1"), Ev::R],
            ),
        ];
        for (name, input, expected) in &cases {
            eprintln!("case: {name}");
            check(input, expected);
        }
    }

    // ----- vLLM TestStreamingExtraction, with their exact chunks -----------------------

    #[test]
    fn vllm_streaming_basic_single_tool() {
        check_chunks(
            &[
                "<|tool_call>",
                "call:get_weather{",
                "location:<|\"|>Paris",
                ", France",
                "<|\"|>}",
                "<tool_call|>",
            ],
            &[c("get_weather", json!({"location": "Paris, France"}))],
        );
    }

    #[test]
    fn vllm_streaming_multi_arg() {
        check_chunks(
            &[
                "<|tool_call>",
                "call:get_weather{",
                "location:<|\"|>Tokyo<|\"|>,",
                "unit:<|\"|>celsius<|\"|>}",
                "<tool_call|>",
            ],
            &[c(
                "get_weather",
                json!({"location": "Tokyo", "unit": "celsius"}),
            )],
        );
    }

    #[test]
    fn vllm_streaming_no_extra_brace_no_unquoted_keys_no_call_prefix() {
        // test_streaming_no_extra_brace, test_streaming_no_unquoted_keys,
        // test_streaming_name_no_call_prefix: one complete call with the plain name.
        check_chunks(
            &[
                "<|tool_call>",
                "call:get_weather{",
                "location:<|\"|>London<|\"|>}",
                "<tool_call|>",
            ],
            &[c("get_weather", json!({"location": "London"}))],
        );
        check_chunks(
            &[
                "<|tool_call>",
                "call:get_weather{",
                "location:<|\"|>Paris<|\"|>}",
                "<tool_call|>",
            ],
            &[c("get_weather", json!({"location": "Paris"}))],
        );
    }

    #[test]
    fn vllm_streaming_text_before_tool_call() {
        check_chunks(
            &[
                "Let me check ",
                "the weather. ",
                "<|tool_call>",
                "call:get_weather{",
                "location:<|\"|>London<|\"|>}",
                "<tool_call|>",
            ],
            &[
                t("Let me check the weather. "),
                c("get_weather", json!({"location": "London"})),
            ],
        );
    }

    #[test]
    fn vllm_streaming_numeric_and_split_scalars() {
        // test_streaming_numeric_args
        check_chunks(
            &[
                "<|tool_call>",
                "call:set_config{",
                "count:42,",
                "active:true}",
                "<tool_call|>",
            ],
            &[c("set_config", json!({"count": 42, "active": true}))],
        );
        // test_streaming_boolean_split_across_chunks
        check_chunks(
            &[
                "<|tool_call>",
                "call:search{input:{all:tru",
                "e}}",
                "<tool_call|>",
            ],
            &[c("search", json!({"input": {"all": true}}))],
        );
        // test_streaming_false_split_across_chunks
        check_chunks(
            &["<|tool_call>", "call:set{flag:fals", "e}", "<tool_call|>"],
            &[c("set", json!({"flag": false}))],
        );
        // test_streaming_number_split_across_chunks
        check_chunks(
            &["<|tool_call>", "call:set{count:4", "2}", "<tool_call|>"],
            &[c("set", json!({"count": 42}))],
        );
        // test_trailing_dot_float_partial_withheld, streamed: `108.` then `2`.
        check_chunks(
            &["<|tool_call>call:m{left:108.", "2,right:22.8}<tool_call|>"],
            &[c("m", json!({"left": 108.2, "right": 22.8}))],
        );
        // test_empty_value_partial_withheld, streamed: `flag:` then its value.
        check_chunks(
            &[
                "<|tool_call>call:f{name:<|\"|>test<|\"|>,flag:",
                "true}<tool_call|>",
            ],
            &[c("f", json!({"name": "test", "flag": true}))],
        );
    }

    #[test]
    fn vllm_streaming_empty_args() {
        check_chunks(
            &["<|tool_call>", "call:get_status{}", "<tool_call|>"],
            &[c("get_status", json!({}))],
        );
    }

    #[test]
    fn vllm_streaming_split_delimiter() {
        // test_streaming_split_delimiter_no_invalid_json: `<|"|>` cut as `<|` + `"|>`.
        check_chunks(
            &[
                "<|tool_call>",
                "call:todowrite{",
                "content:<|\"|>Buy milk<|",
                "\"|>}",
                "<tool_call|>",
            ],
            &[c("todowrite", json!({"content": "Buy milk"}))],
        );
    }

    #[test]
    fn vllm_streaming_plain_text_after_call_not_duplicated() {
        // test_streaming_does_not_duplicate_plain_text_after_tool_call
        check_chunks(
            &[
                "<|tool_call>",
                "call:get_weather{",
                "location:<|\"|>Paris<|\"|>}",
                "<tool_call|><",
                "div>",
            ],
            &[c("get_weather", json!({"location": "Paris"})), t("<div>")],
        );
    }

    #[test]
    fn vllm_streaming_html_argument() {
        // test_streaming_html_argument_does_not_duplicate_tag_prefixes
        check_chunks(
            &[
                "<|tool_call>",
                "call:write_file{",
                "path:<|\"|>index.html<|\"|>,",
                "content:<|\"|><!DOCTYPE html>\n<",
                "html lang=\"zh-CN\">\n<",
                "head>\n    <",
                "meta charset=\"UTF-8\">\n    <",
                "meta name=\"viewport\" content=\"width=device-width\">\n",
                "<|\"|>}",
                "<tool_call|>",
            ],
            &[c(
                "write_file",
                json!({
                    "path": "index.html",
                    "content": "<!DOCTYPE html>\n<html lang=\"zh-CN\">\n<head>\n    <meta charset=\"UTF-8\">\n    <meta name=\"viewport\" content=\"width=device-width\">\n"
                }),
            )],
        );
    }

    #[test]
    fn vllm_streaming_trailing_bare_bool() {
        // test_streaming_trailing_bare_bool_not_duplicated
        check_chunks(
            &[
                "<|tool_call>",
                "call:Edit{",
                "file_path:<|\"|>src/env.py<|\"|>,",
                "old_string:<|\"|>old_val<|\"|>,",
                "new_string:<|\"|>new_val<|\"|>,",
                "replace_all:",
                "false}",
                "<tool_call|>",
            ],
            &[c(
                "Edit",
                json!({"file_path": "src/env.py", "old_string": "old_val", "new_string": "new_val", "replace_all": false}),
            )],
        );
    }

    // ----- parse_arguments: vLLM TestParseGemma4Args / TestParseGemma4Array / utils ----

    fn args(body: &str) -> Value {
        match parse_arguments(body) {
            Ok(v) => v,
            Err(e) => panic!("parse_arguments({body:?}) failed: {e}"),
        }
    }

    #[test]
    fn parse_arguments_vllm_cases() {
        let q = STRING_DELIM;
        assert_eq!(args(""), json!({}));
        assert_eq!(args("   "), json!({}));
        assert_eq!(args("{}"), json!({}));
        assert_eq!(
            args(&format!("location:{q}Paris{q}")),
            json!({"location": "Paris"})
        );
        assert_eq!(
            args(&format!("location:{q}Paris, France{q}")),
            json!({"location": "Paris, France"})
        );
        assert_eq!(
            args(&format!("location:{q}San Francisco{q},unit:{q}celsius{q}")),
            json!({"location": "San Francisco", "unit": "celsius"})
        );
        assert_eq!(args("count:42"), json!({"count": 42}));
        assert_eq!(args("score:3.14"), json!({"score": 3.14}));
        assert_eq!(args("flag:true"), json!({"flag": true}));
        assert_eq!(args("flag:false"), json!({"flag": false}));
        assert_eq!(args("param:null"), json!({"param": null}));
        assert_eq!(
            serde_json::to_string(&args("param:null")).ok().as_deref(),
            Some(r#"{"param":null}"#)
        );
        assert_eq!(
            args(&format!("name:{q}test{q},count:42,active:true,score:3.14")),
            json!({"name": "test", "count": 42, "active": true, "score": 3.14})
        );
        assert_eq!(
            args(&format!("nested:{{inner:{q}value{q}}}")),
            json!({"nested": {"inner": "value"}})
        );
        assert_eq!(
            args(&format!("record_map:{{{q}3{q}:{q}new text{q}}}")),
            json!({"record_map": {"3": "new text"}})
        );
        assert_eq!(
            args(&format!("outer:{{inner:{{{q}3{q}:{q}new text{q}}}}}")),
            json!({"outer": {"inner": {"3": "new text"}}})
        );
        assert_eq!(
            args(&format!("items:[{q}a{q},{q}b{q}]")),
            json!({"items": ["a", "b"]})
        );
        // test_empty_value
        assert_eq!(args("key:"), json!({"key": ""}));
        assert_eq!(args("a:,b:1"), json!({"a": "", "b": 1}));
        // test_trailing_dot_float_partial_withheld, non-partial half
        assert_eq!(
            args("left:108.,right:22.8"),
            json!({"left": 108.0, "right": 22.8})
        );
        // TestParseGemma4Array, as values of a key
        assert_eq!(
            args(&format!("x:[{q}a{q},{q}b{q}]")),
            json!({"x": ["a", "b"]})
        );
        assert_eq!(args("x:[]"), json!({"x": []}));
        assert_eq!(args("x:[42,true,3.14]"), json!({"x": [42, true, 3.14]}));
        assert_eq!(
            args(&format!("x:[[{q}a]b{q},{q}c{q}],{q}tail{q}]")),
            json!({"x": [["a]b", "c"], "tail"]})
        );
        assert_eq!(args("x:[108.,22.8]"), json!({"x": [108.0, 22.8]}));
        // test_gemma4_utils: strings with quotes, HTML, braces, code, newlines
        assert_eq!(
            args(&format!("content:{q}She said \"hello\" loudly{q}")),
            json!({"content": "She said \"hello\" loudly"})
        );
        assert_eq!(
            args(&format!(
                "path:{q}out.html{q},content:{q}<div class=\"main\">hello</div>{q}"
            )),
            json!({"path": "out.html", "content": "<div class=\"main\">hello</div>"})
        );
        assert_eq!(
            args(&format!("content:{q}<html><div>{{test}}</div></html>{q}")),
            json!({"content": "<html><div>{test}</div></html>"})
        );
        assert_eq!(
            args(&format!("code:{q}function() {{ return \"ok\"; }}{q}")),
            json!({"code": "function() { return \"ok\"; }"})
        );
        assert_eq!(
            args(&format!("content:{q}line1\nline2\nline3{q}")),
            json!({"content": "line1\nline2\nline3"})
        );
        // test_strict_mode_ignores_fallback: a bare word value is kept as a string
        assert_eq!(args("location:Tokyo"), json!({"location": "Tokyo"}));
        // braced form
        assert_eq!(
            args(&format!("{{location:{q}Tokyo{q}}}")),
            json!({"location": "Tokyo"})
        );
    }

    #[test]
    fn parse_arguments_deliberate_differences_from_vllm() {
        let q = STRING_DELIM;
        // vLLM test_unterminated_string takes the rest as the value; we refuse (a streamed
        // call can never reach this: its body would not have closed).
        assert!(parse_arguments(&format!("key:{q}unterminated")).is_err());
        // vLLM test_stray_closing_bracket returns [42]; for us text after a closed array
        // is an error rather than silently dropped.
        assert!(parse_arguments("x:[42,]trailing]").is_err());
        // vLLM test_malformed_partial_array only asks for termination without a crash.
        assert!(parse_arguments(":[t:[]").is_err());
        // A delimiter glued to a bare word is neither a string nor a word.
        assert!(parse_arguments(&format!("a:x{q}y{q}")).is_err());
        assert!(parse_arguments(&format!("a{q}b:1")).is_err());
    }

    #[test]
    fn parse_arguments_errors_and_leniency() {
        assert!(parse_arguments("{a:1").is_err());
        assert!(parse_arguments("{a:[1,2}").is_err());
        assert!(parse_arguments("{a 1}").is_err());
        assert!(parse_arguments("{a:1} extra").is_err());
        assert!(parse_arguments("a:1}").is_err());
        assert!(parse_arguments("{:1}").is_err());
        // Stray and trailing commas are tolerated.
        assert_eq!(args("{a:1,,b:2,}"), json!({"a": 1, "b": 2}));
        assert_eq!(args("{x:[,1,,2,]}"), json!({"x": [1, 2]}));
        // Python/JSON-ish spellings.
        assert_eq!(
            args("{a:None,b:nil,c:True,d:False}"),
            json!({"a": null, "b": null, "c": true, "d": false})
        );
        assert_eq!(args("{\"a\":1}"), json!({"a": 1}));
        // Big and odd numbers.
        assert_eq!(
            args("{a:-7,b:1e3,c:18446744073709551615}"),
            json!({"a": -7, "b": 1000.0, "c": 18446744073709551615u64})
        );
        assert_eq!(
            args("{zip:007,v:1.2.3,n:NaN}"),
            json!({"zip": "007", "v": "1.2.3", "n": "NaN"})
        );
        // Deep nesting is refused, not a stack overflow.
        let deep = format!("{{a:{}{}}}", "[".repeat(1000), "]".repeat(1000));
        assert!(parse_arguments(&deep).is_err());
        let ok_depth = format!("{{a:{}{}}}", "[".repeat(50), "]".repeat(50));
        assert!(parse_arguments(&ok_depth).is_ok());
    }

    // ----- formatting --------------------------------------------------------------------

    #[test]
    fn format_goldens() {
        // LiteRT-LM gemma4_data_processor_test.cc RenderTemplateWithToolCalls:
        //   "<|tool_call>call:get_weather{location:<|\"|>Paris<|\"|>}<tool_call|>"
        assert_eq!(
            format_tool_call("get_weather", &json!({"location": "Paris"})),
            "<|tool_call>call:get_weather{location:<|\"|>Paris<|\"|>}<tool_call|>"
        );
        // Same file, RenderTemplateWithToolResponses (keys in dictsort order):
        //   "<|tool_response>response:get_weather{location:<|\"|>Paris<|\"|>,temperature:20,unit:<|\"|>C<|\"|>,weather:<|\"|>Sunny<|\"|>}<tool_response|>"
        assert_eq!(
            format_tool_response(
                "get_weather",
                &json!({"weather": "Sunny", "unit": "C", "temperature": 20, "location": "Paris"})
            ),
            "<|tool_response>response:get_weather{location:<|\"|>Paris<|\"|>,temperature:20,unit:<|\"|>C<|\"|>,weather:<|\"|>Sunny<|\"|>}<tool_response|>"
        );
        // Template format_tool_response_block, non-mapping branch:
        //   'response:' + tool_name + '{value:' + format_argument(response, escape_keys=False) + '}'
        assert_eq!(
            format_tool_response("now", &json!("12:00")),
            "<|tool_response>response:now{value:<|\"|>12:00<|\"|>}<tool_response|>"
        );
        assert_eq!(
            format_tool_response("n", &json!([1, 2])),
            "<|tool_response>response:n{value:[1,2]}<tool_response|>"
        );
        // format_argument: bools, nested maps/lists, dictsort is case-insensitive.
        assert_eq!(
            format_value(&json!({"b": [true, false, 1.5], "A": {"y": "s", "X": null}})),
            "{A:{X:null,y:<|\"|>s<|\"|>},b:[true,false,1.5]}"
        );
        // Keys a bare key cannot carry are delimited so they parse back.
        assert_eq!(
            format_value(&json!({"a b": 1, "": 2})),
            "{<|\"|><|\"|>:2,<|\"|>a b<|\"|>:1}"
        );
        // Non-object call arguments: the template renders nothing between the braces.
        assert_eq!(
            format_tool_call("f", &json!("x")),
            "<|tool_call>call:f{}<tool_call|>"
        );
    }

    #[test]
    fn format_then_parse_round_trips() {
        let values = [
            json!({}),
            json!({"location": "Paris, France", "n": 3, "f": -2.5, "ok": true, "no": false, "nil": null}),
            json!({"s": "}{][,:\"\n\t  padded  ", "u": "Zürich 東京 🚀", "e": ""}),
            json!({"o": {"a": [1, [2, {"b": null}], "c"], "d": {}, "e": []}}),
            json!({"weird key": {"3": "x", "a:b": [true]}, "Case": 1, "case": 2}),
            json!({"big": 18446744073709551615u64, "neg": -9223372036854775808i64, "sci": 1e-7}),
            json!({"looks_bare": ["true", "null", "42", "3.14", "Tokyo"]}),
        ];
        for v in values {
            let text = format_value(&v);
            assert_eq!(
                parse_arguments(&text).ok(),
                Some(v.clone()),
                "round trip of {text}"
            );
            // And through the streaming parser, cut everywhere.
            let name = "roundtrip";
            check(&format_tool_call(name, &v), &[c(name, v.clone())]);
        }
    }

    // ----- streaming behaviour -----------------------------------------------------------

    #[test]
    fn holds_back_only_what_could_be_a_marker() {
        let mut p = ToolCallParser::new();
        assert_eq!(
            p.push("Hello <|to"),
            vec![ParsedEvent::Text("Hello ".into())]
        );
        assert_eq!(p.push("ol"), vec![]);
        assert_eq!(
            p.push("x and"),
            vec![ParsedEvent::Text("<|toolx and".into())]
        );
        assert_eq!(p.push(" <"), vec![ParsedEvent::Text(" ".into())]);
        assert_eq!(p.push("b>"), vec![ParsedEvent::Text("<b>".into())]);
        assert_eq!(p.push("<|tool_response"), vec![]);
        assert_eq!(p.push(">"), vec![ParsedEvent::ToolResponseRequested]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn call_is_reported_as_soon_as_it_closes() {
        let mut p = ToolCallParser::new();
        assert_eq!(p.push("<|tool_call>call:f{a:1"), vec![]);
        // The body closed, but `<tool_call|>` may still follow: wait.
        assert_eq!(p.push("}"), vec![]);
        assert_eq!(
            p.push("<tool_call|>"),
            vec![ParsedEvent::ToolCall {
                name: "f".into(),
                arguments: json!({"a": 1})
            }]
        );
        assert_eq!(
            p.push("<|tool_response>"),
            vec![ParsedEvent::ToolResponseRequested]
        );
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn long_streams_are_linear() {
        // 400 KB of string and 400 KB of text, fed 3 characters at a time: a quadratic
        // rescan would take minutes here; this must stay well under a second in debug.
        let payload: String = "lorem {ipsum}, <b>dolor</b> sit: amet\n".repeat(10_000);
        let input = format!("{payload}<|tool_call>call:write{{text:{STRING_DELIM}{payload}{STRING_DELIM}}}<tool_call|>");
        let chunks: Vec<String> = input
            .chars()
            .collect::<Vec<_>>()
            .chunks(3)
            .map(|c| c.iter().collect())
            .collect();
        let started = std::time::Instant::now();
        let events = feed(&chunks);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            events,
            vec![t(&payload), c("write", json!({ "text": payload }))]
        );
    }

    #[test]
    fn parser_is_reusable_after_finish() {
        let mut p = ToolCallParser::new();
        p.push("<|tool_call>call:f{a:");
        assert_eq!(
            p.finish(),
            vec![ParsedEvent::Text("<|tool_call>call:f{a:".into())]
        );
        assert_eq!(p.push("hi"), vec![ParsedEvent::Text("hi".into())]);
        assert_eq!(p.push("<|tool_call>call:g{}<tool_call|>").len(), 1);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn hostile_inputs_do_not_panic_or_hang() {
        let inputs = [
            format!("<|tool_call>call:f{}", "{".repeat(5000)),
            format!(
                "<|tool_call>call:f{{a:{}{}}}<tool_call|>",
                "[".repeat(500),
                "]".repeat(500)
            ),
            format!("<|tool_call>call:{}", "x".repeat(10_000)),
            "<|tool_call>".repeat(100),
            format!("<|tool_call>{}call:f{{}}", " ".repeat(1000)),
            "}{][<|\"|><tool_call|><|tool_response>".repeat(50),
            format!("<|tool_call>call:f{{a:{}", STRING_DELIM.repeat(1001)),
        ];
        for input in &inputs {
            let whole = feed(&[input.as_str()]);
            assert_eq!(
                feed(&chars(input)),
                whole,
                "chunking changed the result for {input:.60}"
            );
        }
        // The 5000 open braces never close: returned as text, nothing lost.
        assert_eq!(feed(&[inputs[0].as_str()]), vec![t(&inputs[0])]);
        // A long name is junk, reported once, the rest stays text.
        assert!(matches!(
            feed(&[inputs[2].as_str()]).first(),
            Some(Ev::M(_))
        ));
    }

    /// Deterministic pseudo-random generator (no external crates).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn fuzz_parse_arguments_never_panics() {
        let pieces = [
            "{", "}", "[", "]", ",", ":", " ", "\n", "a", "é", "東", "🚀", "1", "-", ".", "e",
            "true", "null", "<|\"|>", "<|", "\"", "<",
        ];
        let mut rng = Lcg(0xa5a5);
        for _ in 0..20_000 {
            let len = rng.below(16);
            let mut body = String::new();
            if rng.below(2) == 0 {
                body.push('{');
            }
            body.extend((0..len).map(|_| pieces[rng.below(pieces.len())]));
            if let Ok(value) = parse_arguments(&body) {
                assert!(value.is_object(), "{body:?} gave {value}");
                // Whatever parses must survive a format → parse round trip.
                assert_eq!(
                    parse_arguments(&format_value(&value)).ok(),
                    Some(value),
                    "{body:?}"
                );
            }
        }
    }

    #[test]
    fn fuzz_chunking_never_changes_the_result() {
        let pieces = [
            "<|tool_call>",
            "call:",
            "f",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "a",
            "1",
            "true",
            " ",
            "\n",
            "<|\"|>",
            "<tool_call|>",
            "<|tool_response>",
            "<",
            "|",
            "<|",
            "<|to",
            "é",
            "東",
            "🚀",
            "x:",
            "-2.5",
            "null",
            "<|tool_call>call:g{",
            "<tool_call|><|tool_response>",
            "}<tool_call|>",
            "ü:",
            "<|\"|>ö<|\"|>",
        ];
        let mut rng = Lcg(0x5eed);
        for _ in 0..6000 {
            let len = 1 + rng.below(24);
            // Often start inside a call so bodies get exercised, not just text.
            let mut input: String = match rng.below(3) {
                0 => String::new(),
                1 => "<|tool_call>call:f{".to_owned(),
                _ => "x <|tool_call>call:f{a:".to_owned(),
            };
            input.extend((0..len).map(|_| pieces[rng.below(pieces.len())]));
            let whole = feed(&[input.as_str()]);
            assert_eq!(feed(&chars(&input)), whole, "chars: {input:?}");
            assert_eq!(feed(&tokenize(&input)), whole, "tokens: {input:?}");
            // Random chunking at char boundaries.
            let boundaries: Vec<usize> = input.char_indices().map(|(i, _)| i).skip(1).collect();
            let mut cuts: Vec<usize> = (0..rng.below(6))
                .filter_map(|_| boundaries.get(rng.below(boundaries.len())).copied())
                .collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut chunks = Vec::new();
            let mut last = 0;
            for cut in cuts {
                chunks.push(&input[last..cut]);
                last = cut;
            }
            chunks.push(&input[last..]);
            assert_eq!(feed(&chunks), whole, "chunks {chunks:?}");
            // Text without markers comes back unchanged.
            if !input.contains(TOOL_CALL_START) && !input.contains(TOOL_RESPONSE_START) {
                assert_eq!(whole, vec![t(&input)]);
            }
        }
    }
}
