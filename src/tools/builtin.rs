//! Builtin tools: `clock`, `calculator` (see [`super::calculator`]) and `notes`.
//!
//! Each builtin brings a default description and parameter schema, so a tool file may
//! be as short as `{name: calculator, handler: {kind: builtin, name: calculator}}`.
//! A file may also narrow the schema; the builtin checks its own arguments regardless.
//!
//! `notes` is one tool with an `action` argument (`add`, `list`, `search`, `delete`)
//! rather than four tools: one declaration costs the model's context less. Notes live
//! in `<data_dir>/notes.json`; every change rewrites the file through a temporary file
//! and a rename, and calls on one file are serialized by a process-wide lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::calculator;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinKind {
    Clock,
    Calculator,
    Notes,
}

impl BuiltinKind {
    pub const NAMES: [&'static str; 3] = ["clock", "calculator", "notes"];

    pub fn from_name(name: &str) -> Option<BuiltinKind> {
        match name {
            "clock" => Some(BuiltinKind::Clock),
            "calculator" => Some(BuiltinKind::Calculator),
            "notes" => Some(BuiltinKind::Notes),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BuiltinKind::Clock => "clock",
            BuiltinKind::Calculator => "calculator",
            BuiltinKind::Notes => "notes",
        }
    }

    pub fn default_description(self) -> &'static str {
        match self {
            BuiltinKind::Clock => "Current date and time, in the local time zone or a given one.",
            BuiltinKind::Calculator => "Evaluates an arithmetic expression exactly; use it instead of doing arithmetic yourself.",
            BuiltinKind::Notes => "Keeps short notes for the user: add, list, search or delete them.",
        }
    }

    pub fn default_parameters(self) -> Value {
        match self {
            BuiltinKind::Clock => json!({
                "type": "object",
                "properties": {
                    "timezone": {
                        "type": "string",
                        "description": "IANA time zone such as Europe/Paris, or UTC, or a fixed offset such as +02:00. Omit for local time."
                    }
                },
                "additionalProperties": false
            }),
            BuiltinKind::Calculator => json!({
                "type": "object",
                "properties": {
                    "expression": {
                        "type": "string",
                        "description": "Arithmetic: + - * / % ^, parentheses, sqrt abs round floor ceil sin cos tan ln log10 exp, pi, e.",
                        "maxLength": calculator::MAX_EXPRESSION_LEN
                    }
                },
                "required": ["expression"],
                "additionalProperties": false
            }),
            BuiltinKind::Notes => json!({
                "type": "object",
                "properties": {
                    "action": {"type": "string", "enum": ["add", "list", "search", "delete"]},
                    "text": {"type": "string", "description": "The note to add, or the words to search for.", "maxLength": MAX_NOTE_CHARS},
                    "id": {"type": "integer", "description": "The note to delete."}
                },
                "required": ["action"],
                "additionalProperties": false
            }),
        }
    }
}

/// A builtin bound to its settings.
#[derive(Debug, Clone)]
pub struct Builtin {
    pub kind: BuiltinKind,
    pub data_dir: PathBuf,
}

impl Builtin {
    /// Runs the builtin. `Err` is a message for the model.
    pub async fn call(&self, args: &Map<String, Value>) -> Result<String, String> {
        match self.kind {
            BuiltinKind::Clock => clock(args.get("timezone").and_then(Value::as_str)),
            BuiltinKind::Calculator => {
                let Some(expr) = args.get("expression").and_then(Value::as_str) else {
                    return Err("expression: missing (a string such as \"2 * (3 + 4)\")".into());
                };
                calculator::evaluate(expr).map(calculator::format_number)
            }
            BuiltinKind::Notes => {
                let file = self.data_dir.join(NOTES_FILE);
                let lock = file_lock(&file);
                let _guard = lock.lock().await;
                let args = args.clone();
                tokio::task::spawn_blocking(move || notes(&file, &args))
                    .await
                    .unwrap_or_else(|e| Err(format!("notes failed: {e}")))
            }
        }
    }
}

// ───────────────────────── clock ─────────────────────────

/// The time now as JSON: ISO 8601, date, time, weekday, zone and offset.
pub fn clock(timezone: Option<&str>) -> Result<String, String> {
    let tz = match timezone.map(str::trim).filter(|t| !t.is_empty()) {
        None => jiff::tz::TimeZone::system(),
        Some(t) => parse_timezone(t)?,
    };
    let now = jiff::Timestamp::now().to_zoned_datetime(tz);
    let zone = now.time_zone().iana_name().unwrap_or("").to_string();
    let zone = if zone.is_empty() { now.strftime("%:z").to_string() } else { zone };
    Ok(json!({
        "iso": now.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string(),
        "date": now.strftime("%Y-%m-%d").to_string(),
        "time": now.strftime("%H:%M:%S").to_string(),
        "weekday": now.strftime("%A").to_string(),
        "timezone": zone,
        "utc_offset": now.strftime("%:z").to_string(),
    })
    .to_string())
}

fn parse_timezone(t: &str) -> Result<jiff::tz::TimeZone, String> {
    if t.eq_ignore_ascii_case("utc") || t.eq_ignore_ascii_case("z") || t.eq_ignore_ascii_case("gmt") {
        return Ok(jiff::tz::TimeZone::UTC);
    }
    if t.eq_ignore_ascii_case("local") {
        return Ok(jiff::tz::TimeZone::system());
    }
    if let Some(offset) = parse_offset(t) {
        let offset = jiff::tz::Offset::from_seconds(offset).map_err(|e| format!("timezone {t:?}: {e}"))?;
        return Ok(jiff::tz::TimeZone::fixed(offset));
    }
    // Only names shaped like IANA ids reach the time zone database.
    let shaped = t.len() <= 64
        && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'))
        && !t.split('/').any(|part| part.is_empty() || part.starts_with('.'));
    if !shaped {
        return Err(format!("timezone {t:?}: not an IANA time zone name (such as Europe/Paris), UTC, or an offset such as +02:00"));
    }
    jiff::tz::TimeZone::get(t).map_err(|_| format!("timezone {t:?}: unknown time zone (use an IANA name such as America/New_York)"))
}

/// `+02:00`, `-0530`, `+2`, `UTC+3` → seconds east of UTC.
fn parse_offset(t: &str) -> Option<i32> {
    if !t.is_ascii() {
        return None;
    }
    let t = t.strip_prefix("UTC").or_else(|| t.strip_prefix("utc")).or_else(|| t.strip_prefix("GMT")).unwrap_or(t);
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    if h.is_empty() || h.len() > 2 || m.len() > 2 || !h.chars().chain(m.chars()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if h > 18 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

// ───────────────────────── notes ─────────────────────────

pub const NOTES_FILE: &str = "notes.json";
pub const MAX_NOTE_CHARS: usize = 2000;
pub const MAX_NOTES: usize = 1000;
/// Most notes returned by one `list` or `search`.
pub const MAX_LISTED: usize = 50;
/// A notes file larger than this is refused rather than read.
const MAX_NOTES_FILE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct NotesFile {
    next_id: u64,
    notes: Vec<Note>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Note {
    id: u64,
    text: String,
    created: String,
}

fn file_lock(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let locks = LOCKS.get_or_init(Default::default);
    let mut map = locks.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(path.to_path_buf()).or_default().clone()
}

fn load_notes(file: &Path) -> Result<NotesFile, String> {
    match std::fs::metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NotesFile { next_id: 1, notes: Vec::new() }),
        Err(e) => return Err(format!("cannot read the notes: {e}")),
        Ok(m) if m.len() > MAX_NOTES_FILE_BYTES => return Err("the notes file is too large".into()),
        Ok(_) => {}
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read the notes: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("the notes file {} is damaged: {e}", file.display()))
}

fn save_notes(file: &Path, notes: &NotesFile) -> Result<(), String> {
    use std::io::Write;
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".{NOTES_FILE}.{}.tmp", std::process::id()));
    let text = serde_json::to_string_pretty(notes).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot save the notes: {e}")
    })
}

fn notes(file: &Path, args: &Map<String, Value>) -> Result<String, String> {
    let action = args.get("action").and_then(Value::as_str).ok_or("action: missing (add, list, search or delete)")?;
    let text = args.get("text").and_then(Value::as_str).map(str::trim);
    let mut store = load_notes(file)?;
    match action {
        "add" => {
            let text = text.filter(|t| !t.is_empty()).ok_or("text: the note to add is missing")?;
            if text.chars().count() > MAX_NOTE_CHARS {
                return Err(format!("text: a note is at most {MAX_NOTE_CHARS} characters"));
            }
            if store.notes.len() >= MAX_NOTES {
                return Err(format!("there are already {MAX_NOTES} notes; delete some first"));
            }
            let id = store.next_id.max(1);
            store.next_id = id + 1;
            store.notes.push(Note { id, text: text.to_string(), created: jiff::Timestamp::now().to_string() });
            save_notes(file, &store)?;
            Ok(json!({"added": id}).to_string())
        }
        "list" => Ok(listing(store.notes.iter().rev().take(MAX_LISTED), store.notes.len())),
        "search" => {
            let query = text.filter(|t| !t.is_empty()).ok_or("text: the words to search for are missing")?;
            let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
            let hits: Vec<&Note> = store
                .notes
                .iter()
                .rev()
                .filter(|n| {
                    let t = n.text.to_lowercase();
                    words.iter().all(|w| t.contains(w.as_str()))
                })
                .collect();
            let total = hits.len();
            Ok(listing(hits.into_iter().take(MAX_LISTED), total))
        }
        "delete" => {
            let id = args.get("id").and_then(Value::as_u64).ok_or("id: the number of the note to delete is missing")?;
            let before = store.notes.len();
            store.notes.retain(|n| n.id != id);
            if store.notes.len() == before {
                return Err(format!("no note with id {id}"));
            }
            save_notes(file, &store)?;
            Ok(json!({"deleted": id}).to_string())
        }
        other => Err(format!("action: {other:?} is not add, list, search or delete")),
    }
}

fn listing<'a>(notes: impl Iterator<Item = &'a Note>, total: usize) -> String {
    let notes: Vec<Value> = notes.map(|n| json!({"id": n.id, "text": n.text, "created": n.created})).collect();
    json!({"notes": notes, "total": total}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse() {
        assert_eq!(parse_offset("+02:00"), Some(7200));
        assert_eq!(parse_offset("-0530"), Some(-(5 * 3600 + 30 * 60)));
        assert_eq!(parse_offset("UTC+3"), Some(3 * 3600));
        assert_eq!(parse_offset("+25:00"), None);
        assert_eq!(parse_offset("Europe/Paris"), None);
        assert_eq!(parse_offset("+1é1"), None);
    }

    #[test]
    fn clock_answers_in_the_zone_asked() {
        let v: Value = serde_json::from_str(&clock(Some("+02:00")).unwrap()).unwrap();
        assert_eq!(v["utc_offset"], "+02:00");
        let v: Value = serde_json::from_str(&clock(Some("UTC")).unwrap()).unwrap();
        assert_eq!(v["utc_offset"], "+00:00");
        assert!(clock(Some("../../etc/passwd")).unwrap_err().contains("not an IANA"));
        assert!(clock(Some("Mars/Olympus_Mons")).unwrap_err().contains("unknown time zone"));
    }
}
