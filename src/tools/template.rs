//! Templates in tool YAML: `{param}` placeholders (argv elements, URLs) and
//! `${ENV:NAME}` references (URLs, HTTP header values).
//!
//! `{{` and `}}` are literal braces. A `{` that does not start a well-formed
//! placeholder is a load error, so a typo never silently becomes literal text.
//! Values are substituted as data: the caller decides how they are encoded (argv
//! elements take them verbatim, URLs percent-encode them), nothing is ever parsed again.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    /// `{name}`: the tool argument `name`.
    Param(String),
    /// `${ENV:NAME}`: the environment variable, read at call time.
    Env(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Which references a template may contain.
#[derive(Debug, Clone, Copy)]
pub struct Allow {
    pub params: bool,
    pub env: bool,
}

/// A value a template needs that is not there at call time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    MissingEnv(String),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::MissingEnv(name) => write!(f, "environment variable {name} is not set"),
        }
    }
}

fn is_param_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Template {
    pub fn parse(text: &str, allow: Allow) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if allow.env && rest.starts_with("${ENV:") {
                let body = &rest[6..];
                let end = body.find('}').ok_or_else(|| format!("unclosed ${{ENV:…}} in {text:?}"))?;
                let name = &body[..end];
                if !is_env_name(name) {
                    return Err(format!("${{ENV:{name}}}: {name:?} is not a valid environment variable name"));
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Env(name.to_string()));
                rest = &body[end + 1..];
                continue;
            }
            if allow.params && c == '{' {
                if let Some(r) = rest.strip_prefix("{{") {
                    lit.push('{');
                    rest = r;
                    continue;
                }
                let body = &rest[1..];
                let end = body.find('}').ok_or_else(|| format!("unclosed '{{' in {text:?} (write {{{{ for a literal brace)"))?;
                let name = &body[..end];
                if name.is_empty() || !name.chars().all(is_param_char) {
                    return Err(format!(
                        "'{{{name}}}' in {text:?} is not a placeholder: names are letters, digits, _ and - (write {{{{ for a literal brace)"
                    ));
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Param(name.to_string()));
                rest = &body[end + 1..];
                continue;
            }
            if allow.params && c == '}' {
                if let Some(r) = rest.strip_prefix("}}") {
                    lit.push('}');
                    rest = r;
                    continue;
                }
                return Err(format!("unmatched '}}' in {text:?} (write }}}} for a literal brace)"));
            }
            lit.push(c);
            rest = &rest[c.len_utf8()..];
        }
        if !lit.is_empty() {
            pieces.push(Piece::Literal(lit));
        }
        Ok(Template { pieces })
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    pub fn has_references(&self) -> bool {
        self.pieces.iter().any(|p| !matches!(p, Piece::Literal(_)))
    }

    /// `Some(name)` when the whole template is one `{name}`.
    pub fn single_param(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [Piece::Param(n)] => Some(n),
            _ => None,
        }
    }

    /// Substitutes arguments and environment variables; `encode` is applied to every
    /// substituted value (never to the literal text). Absent arguments become "".
    pub fn render(&self, args: &Map<String, Value>, encode: impl Fn(&str) -> String) -> Result<String, RenderError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Param(name) => out.push_str(&encode(&arg_text(args.get(name)))),
                Piece::Env(name) => {
                    let value = std::env::var(name).map_err(|_| RenderError::MissingEnv(name.clone()))?;
                    out.push_str(&encode(&value));
                }
            }
        }
        Ok(out)
    }
}

/// An argument as text: strings as they are, numbers and booleans printed, null and
/// absent as "", arrays and objects as compact JSON.
pub fn arg_text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOTH: Allow = Allow { params: true, env: true };

    #[test]
    fn parses_placeholders_and_escapes() {
        let t = Template::parse("a{x}b{{c}}${ENV:HOME}", BOTH).unwrap();
        assert_eq!(
            t.pieces(),
            &[Piece::Literal("a".into()), Piece::Param("x".into()), Piece::Literal("b{c}".into()), Piece::Env("HOME".into())]
        );
        assert!(Template::parse("{", BOTH).is_err());
        assert!(Template::parse("{a b}", BOTH).is_err());
        assert!(Template::parse("}", BOTH).is_err());
        assert!(Template::parse("${ENV:1X}", BOTH).is_err());
        assert_eq!(Template::parse("{x}", BOTH).unwrap().single_param(), Some("x"));
        // Without params, braces are plain text.
        let t = Template::parse("{\"a\": 1}", Allow { params: false, env: true }).unwrap();
        assert!(!t.has_references());
    }

    #[test]
    fn renders_values_through_the_encoder() {
        let t = Template::parse("n={n} o={o} s={s} m={missing}", BOTH).unwrap();
        let args = json!({"n": 2.5, "o": {"k": [1]}, "s": "a b"});
        let out = t.render(args.as_object().unwrap(), |v| v.replace(' ', "+")).unwrap();
        assert_eq!(out, "n=2.5 o={\"k\":[1]} s=a+b m=");
        let t = Template::parse("${ENV:HARK_SURELY_UNSET_VAR_1234}", BOTH).unwrap();
        assert_eq!(t.render(&Map::new(), |v| v.to_string()), Err(RenderError::MissingEnv("HARK_SURELY_UNSET_VAR_1234".into())));
    }
}
