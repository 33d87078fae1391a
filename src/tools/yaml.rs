//! Reading the YAML files under `tools/` and `agents/`: the error type every loader
//! reports with (`file:line: field: problem`), and finding the line of a field in a
//! file's text for problems found after parsing (duplicate names, bad schemas, …).

use std::path::{Path, PathBuf};

/// One problem in one file. Loaders collect all of them instead of stopping at the first.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: cannot read: {message}")]
    Read { path: String, message: String },
    /// `message` starts with the field's dotted path (`handler.argv[2]: …`).
    #[error("{path}:{line}: {message}")]
    Invalid { path: String, line: usize, message: String },
    /// An MCP server that could not be started or listed its tools.
    #[error("{path}: {message}")]
    Start { path: String, message: String },
}

impl SpecError {
    /// The file the problem is in.
    pub fn path(&self) -> &str {
        match self {
            SpecError::Read { path, .. } | SpecError::Invalid { path, .. } | SpecError::Start { path, .. } => path,
        }
    }
}

/// A parsed file's text, kept to point semantic errors at lines.
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    pub fn display(&self) -> String {
        self.path.display().to_string()
    }

    /// An error at `field` (a dotted path such as `handler.argv[2]`), located in the text.
    pub fn error(&self, field: &str, problem: impl std::fmt::Display) -> SpecError {
        SpecError::Invalid { path: self.display(), line: line_of(&self.text, field), message: format!("{field}: {problem}") }
    }

    /// Deserializes the whole file; structural errors keep serde_yaml_ng's position.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, SpecError> {
        let de = serde_yaml_ng::Deserializer::from_str(&self.text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            yaml_error(&self.display(), &field, &inner)
        })
    }
}

/// `*.yaml` / `*.yml` files directly in `dir`, sorted by name. A missing folder is empty.
pub(crate) fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, SpecError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpecError::Read { path: dir.display().to_string(), message: e.to_string() }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

pub(crate) fn read_source(path: &Path) -> Result<SourceFile, SpecError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SpecError::Read { path: path.display().to_string(), message: e.to_string() })?;
    Ok(SourceFile { path: path.to_path_buf(), text })
}

/// A serde_yaml_ng error as `file:line: field: problem`, the way `config.rs` reports them.
/// `field` is serde_path_to_error's path (`.` when the problem is at the top).
fn yaml_error(origin: &str, field: &str, e: &serde_yaml_ng::Error) -> SpecError {
    let (line, mut message) = crate::config::yaml_line_and_message(e);
    // serde_yaml_ng prefixes nested problems with its own dotted path: drop it and use
    // serde_path_to_error's, extended by the key at fault for unknown/missing fields.
    if let Some((head, rest)) = message.split_once(": ") {
        if !head.is_empty() && !head.contains(char::is_whitespace) {
            message = rest.to_string();
        }
    }
    let mut field = if field == "." || field == "?" { String::new() } else { field.to_string() };
    if let Some(key) = quoted_after(&message, "unknown field `").or_else(|| quoted_after(&message, "missing field `")) {
        if !field.ends_with(key) {
            field = if field.is_empty() { key.to_string() } else { format!("{field}.{key}") };
        }
    }
    if !field.is_empty() {
        message = format!("{field}: {message}");
    }
    SpecError::Invalid { path: origin.to_string(), line, message }
}

/// `unknown field `foo`, expected …` with `unknown field `` → `foo`.
fn quoted_after<'a>(message: &'a str, lead: &str) -> Option<&'a str> {
    let rest = message.split(lead).nth(1)?;
    rest.split('`').next()
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let end = stripped.find(']').unwrap_or(stripped.len());
            if let Ok(i) = stripped[..end].parse() {
                out.push(Segment::Index(i));
            }
            rest = stripped.get(end + 1..).unwrap_or("");
        }
    }
    out
}

/// One non-blank, non-comment line: the column its content starts at after any `- `
/// sequence markers, where the innermost `- ` was (if any), and the content.
struct Line<'a> {
    number: usize,
    indent: usize,
    dash: Option<usize>,
    content: &'a str,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let mut col = raw.len() - raw.trim_start().len();
        let mut content = raw.trim_start();
        let mut dash = None;
        while let Some(rest) = content.strip_prefix('-').filter(|r| r.is_empty() || r.starts_with(' ')) {
            dash = Some(col);
            let trimmed = rest.trim_start();
            col += 1 + (rest.len() - trimmed.len());
            content = trimmed;
        }
        if content.is_empty() && dash.is_none() || content.starts_with('#') || content == "---" {
            continue;
        }
        out.push(Line { number: i + 1, indent: col, dash, content });
    }
    out
}

/// `key:` at the start of `content` (bare or quoted); returns what follows the colon.
fn after_key<'a>(content: &'a str, key: &str) -> Option<&'a str> {
    for quoted in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
        if let Some(rest) = content.strip_prefix(quoted.as_str()) {
            let rest = rest.trim_start();
            if let Some(value) = rest.strip_prefix(':') {
                if value.is_empty() || value.starts_with(' ') {
                    return Some(value.trim());
                }
            }
        }
    }
    None
}

/// The 1-based line of `path` (`handler.argv[2]`, `tools[1]`) in block-style YAML text.
/// Where the path goes into a flow collection (`{…}` / `[…]` on one line) the line of
/// the collection's key is the answer; where nothing is found, the deepest line found
/// so far (1 for the file's top).
pub(crate) fn line_of(text: &str, path: &str) -> usize {
    let all = lines(text);
    // The window of lines that belong to the current node, and the column its parent
    // key sits at (children are indented further).
    let (mut start, mut end) = (0usize, all.len());
    let mut parent_col: Option<usize> = None;
    let mut found = all.first().map(|l| l.number).unwrap_or(1);
    for seg in segments(path) {
        let window = &all[start..end];
        match seg {
            Segment::Key(key) => {
                let child_col = window.iter().filter(|l| parent_col.is_none_or(|p| l.indent > p)).map(|l| l.indent).min();
                let Some(col) = child_col else { return found };
                let Some(pos) = window.iter().position(|l| l.indent == col && after_key(l.content, key).is_some()) else {
                    return found;
                };
                let line = &window[pos];
                found = line.number;
                let value = after_key(line.content, key).unwrap_or("");
                if !value.is_empty() && !value.starts_with('#') && !value.starts_with('|') && !value.starts_with('>') {
                    return found; // inline value or flow collection
                }
                let abs = start + pos;
                let stop = all[abs + 1..end].iter().position(|l| match l.dash {
                        None => l.indent <= col,
                        Some(d) => d < col,
                    }).map(|p| abs + 1 + p).unwrap_or(end);
                start = abs + 1;
                end = stop;
                parent_col = Some(col);
            }
            Segment::Index(i) => {
                let items: Vec<usize> = (start..end)
                    .filter(|&k| all[k].dash.is_some_and(|d| parent_col.is_none_or(|p| d >= p)))
                    .collect();
                let Some(dash_col) = items.iter().map(|&k| all[k].dash.unwrap_or(0)).min() else { return found };
                let items: Vec<usize> = items.into_iter().filter(|&k| all[k].dash == Some(dash_col)).collect();
                let Some(&k) = items.get(i) else { return found };
                found = all[k].number;
                let next = items.get(i + 1).copied().unwrap_or(end);
                // The item's own line holds its first key: keep it in the window, with
                // the parent column just left of the item's content.
                start = k;
                end = next;
                parent_col = Some(dash_col);
                if all[k].indent == dash_col {
                    return found;
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
name: x
# a comment
handler:
  kind: command
  argv:
    - python3
    - -c
    - \"{code}\"
  env: [PATH, HOME]
tools:
  - get_time
  - name: weather
    cancel_on_interruption: false
  - notes_*
parameters: {type: object}
";

    #[test]
    fn finds_nested_keys_and_items() {
        assert_eq!(line_of(TEXT, "name"), 1);
        assert_eq!(line_of(TEXT, "handler"), 3);
        assert_eq!(line_of(TEXT, "handler.kind"), 4);
        assert_eq!(line_of(TEXT, "handler.argv[2]"), 8);
        assert_eq!(line_of(TEXT, "handler.env[1]"), 9);
        assert_eq!(line_of(TEXT, "tools[0]"), 11);
        assert_eq!(line_of(TEXT, "tools[1]"), 12);
        assert_eq!(line_of(TEXT, "tools[1].cancel_on_interruption"), 13);
        assert_eq!(line_of(TEXT, "tools[2]"), 14);
        assert_eq!(line_of(TEXT, "parameters.properties"), 15);
        assert_eq!(line_of(TEXT, "missing"), 1);
    }
}
