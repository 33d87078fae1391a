//! The `calculator` builtin: arithmetic over f64 with a hand-written recursive-descent
//! parser.
//!
//! Hand-written on purpose: the expression comes from a model (so, indirectly, from
//! whoever speaks to it), and the evaluator must do arithmetic and nothing else. The
//! crates that fit (`meval`, unmaintained since 2017; `evalexpr`, a small language with
//! variables, assignment, strings and loops-by-recursion) either are unkept or do far
//! more than needed. This grammar is ~150 lines, bounded in length and depth, and
//! cannot reach anything outside the numbers it is given.
//!
//! ```text
//! expr    := term (('+' | '-') term)*
//! term    := unary (('*' | '/' | '%') unary)*
//! unary   := ('-' | '+') unary | power
//! power   := primary (('^' | '**') unary)?        right-associative; -2^2 = -4
//! primary := NUMBER | CONSTANT | FUNCTION '(' expr ')' | '(' expr ')'
//! ```
//! Numbers: `12`, `1.5`, `.5`, `2e-3`. Constants: `pi`, `e`. Functions: sqrt abs round
//! floor ceil sin cos tan ln log10 exp (radians for trigonometry). `×` and `÷` are read
//! as `*` and `/`. Whitespace is ignored.

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_LEN: usize = 1000;
/// Deepest nesting of parentheses / unary operators / powers.
pub const MAX_DEPTH: usize = 64;

const FUNCTIONS: [&str; 11] = ["sqrt", "abs", "round", "floor", "ceil", "sin", "cos", "tan", "ln", "log10", "exp"];

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(f64),
    Ident(String),
    Op(char),
    Pow,
    LParen,
    RParen,
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '0'..='9' | '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                    let mut j = i + 1;
                    if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                        j += 1;
                    }
                    if j < chars.len() && chars[j].is_ascii_digit() {
                        i = j;
                        while i < chars.len() && chars[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
                let text: String = chars[start..i].iter().collect();
                let n: f64 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
                out.push(Token::Num(n));
            }
            'a'..='z' | 'A'..='Z' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect::<String>().to_ascii_lowercase()));
            }
            '*' if chars.get(i + 1) == Some(&'*') => {
                out.push(Token::Pow);
                i += 2;
            }
            '^' => {
                out.push(Token::Pow);
                i += 1;
            }
            '+' | '-' | '*' | '/' | '%' => {
                out.push(Token::Op(c));
                i += 1;
            }
            '×' => {
                out.push(Token::Op('*'));
                i += 1;
            }
            '÷' => {
                out.push(Token::Op('/'));
                i += 1;
            }
            '(' => {
                out.push(Token::LParen);
                i += 1;
            }
            ')' => {
                out.push(Token::RParen);
                i += 1;
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("expression nested deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<f64, String> {
        self.enter()?;
        let mut v = self.term()?;
        while let Some(Token::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let r = self.term()?;
            v = if op == '+' { v + r } else { v - r };
        }
        self.depth -= 1;
        Ok(v)
    }

    fn term(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        while let Some(Token::Op(op @ ('*' | '/' | '%'))) = self.peek().cloned() {
            self.pos += 1;
            let r = self.unary()?;
            v = match op {
                '*' => v * r,
                _ if r == 0.0 => return Err("division by zero".into()),
                '/' => v / r,
                _ => v % r,
            };
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some(Token::Op(op @ ('-' | '+'))) => {
                let neg = *op == '-';
                self.pos += 1;
                self.enter()?;
                let v = self.unary()?;
                self.depth -= 1;
                Ok(if neg { -v } else { v })
            }
            _ => self.power(),
        }
    }

    fn power(&mut self) -> Result<f64, String> {
        let base = self.primary()?;
        if self.peek() == Some(&Token::Pow) {
            self.pos += 1;
            self.enter()?;
            let exp = self.unary()?;
            self.depth -= 1;
            return Ok(base.powf(exp));
        }
        Ok(base)
    }

    fn primary(&mut self) -> Result<f64, String> {
        match self.next() {
            Some(Token::Num(n)) => Ok(n),
            Some(Token::LParen) => {
                let v = self.expr()?;
                match self.next() {
                    Some(Token::RParen) => Ok(v),
                    _ => Err("missing ')'".into()),
                }
            }
            Some(Token::Ident(name)) => match name.as_str() {
                "pi" => Ok(std::f64::consts::PI),
                "e" => Ok(std::f64::consts::E),
                f if FUNCTIONS.contains(&f) => {
                    if self.next() != Some(Token::LParen) {
                        return Err(format!("{f} needs parentheses: {f}(x)"));
                    }
                    let x = self.expr()?;
                    if self.next() != Some(Token::RParen) {
                        return Err(format!("missing ')' after the argument of {f}"));
                    }
                    apply(f, x)
                }
                other => Err(format!(
                    "unknown name {other:?} (constants: pi, e; functions: {})",
                    FUNCTIONS.join(", ")
                )),
            },
            Some(Token::RParen) => Err("unexpected ')'".into()),
            Some(Token::Op(op)) => Err(format!("unexpected '{op}'")),
            Some(Token::Pow) => Err("unexpected '^'".into()),
            None => Err("the expression ends too early".into()),
        }
    }
}

fn apply(f: &str, x: f64) -> Result<f64, String> {
    Ok(match f {
        "sqrt" if x < 0.0 => return Err("sqrt of a negative number".into()),
        "sqrt" => x.sqrt(),
        "abs" => x.abs(),
        "round" => x.round(),
        "floor" => x.floor(),
        "ceil" => x.ceil(),
        "sin" => x.sin(),
        "cos" => x.cos(),
        "tan" => x.tan(),
        "ln" | "log10" if x <= 0.0 => return Err(format!("{f} of a number that is not positive")),
        "ln" => x.ln(),
        "log10" => x.log10(),
        "exp" => x.exp(),
        _ => return Err(format!("unknown function {f}")),
    })
}

/// Evaluates `expression`; errors say what is wrong in words a model can act on.
pub fn evaluate(expression: &str) -> Result<f64, String> {
    if expression.len() > MAX_EXPRESSION_LEN {
        return Err(format!("expression longer than {MAX_EXPRESSION_LEN} characters"));
    }
    let tokens = tokenize(expression)?;
    if tokens.is_empty() {
        return Err("empty expression".into());
    }
    let mut p = Parser { tokens, pos: 0, depth: 0 };
    let v = p.expr()?;
    if let Some(t) = p.peek() {
        return Err(format!("unexpected {} after a complete expression", describe(t)));
    }
    if !v.is_finite() {
        return Err("the result is not a finite number".into());
    }
    Ok(v)
}

fn describe(t: &Token) -> String {
    match t {
        Token::Num(n) => format!("number {n}"),
        Token::Ident(s) => format!("name {s:?}"),
        Token::Op(c) => format!("'{c}'"),
        Token::Pow => "'^'".into(),
        Token::LParen => "'('".into(),
        Token::RParen => "')'".into(),
    }
}

/// A result as a model should read it: integers without a fraction, others to 12
/// significant digits (so 0.1 + 0.2 reads 0.3).
pub fn format_number(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", v as i64);
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = 11 - magnitude;
    if (0..=15).contains(&decimals) {
        let scale = 10f64.powi(decimals);
        let rounded = (v * scale).round() / scale;
        if rounded.is_finite() {
            return format!("{rounded}");
        }
    }
    format!("{v:e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(evaluate("1 + 2 * 3").unwrap(), 7.0);
        assert_eq!(evaluate("(1 + 2) * 3").unwrap(), 9.0);
        assert_eq!(evaluate("2 ^ 3 ^ 2").unwrap(), 512.0);
        assert_eq!(evaluate("-2^2").unwrap(), -4.0);
        assert_eq!(evaluate("2^-1").unwrap(), 0.5);
        assert_eq!(evaluate("10 - 4 - 3").unwrap(), 3.0);
        assert_eq!(evaluate("7 % 4").unwrap(), 3.0);
        assert_eq!(evaluate("2 ** 10").unwrap(), 1024.0);
        assert_eq!(evaluate("6 × 7 ÷ 2").unwrap(), 21.0);
        assert_eq!(evaluate("--3").unwrap(), 3.0);
        assert_eq!(evaluate("1.5e3 + .5").unwrap(), 1500.5);
    }

    #[test]
    fn functions_and_constants() {
        assert_eq!(evaluate("sqrt(16)").unwrap(), 4.0);
        assert!((evaluate("sin(pi / 2)").unwrap() - 1.0).abs() < 1e-12);
        assert!((evaluate("ln(e)").unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(evaluate("log10(1000)").unwrap(), 3.0);
        assert_eq!(evaluate("round(2.5) + floor(-1.5) + ceil(1.2) + abs(-3)").unwrap(), 3.0 - 2.0 + 2.0 + 3.0);
        assert_eq!(evaluate("PI").unwrap(), std::f64::consts::PI);
    }

    #[test]
    fn errors_instead_of_panics() {
        assert_eq!(evaluate("1 / 0").unwrap_err(), "division by zero");
        assert_eq!(evaluate("5 % 0").unwrap_err(), "division by zero");
        assert!(evaluate("sqrt(-1)").unwrap_err().contains("negative"));
        assert!(evaluate("ln(0)").unwrap_err().contains("not positive"));
        assert!(evaluate("10 ^ 400").unwrap_err().contains("finite"));
        assert!(evaluate("").unwrap_err().contains("empty"));
        assert!(evaluate("1 +").unwrap_err().contains("ends too early"));
        assert!(evaluate("(1 + 2").unwrap_err().contains("')'"));
        assert!(evaluate("1 2").unwrap_err().contains("after a complete expression"));
        assert!(evaluate("system(1)").unwrap_err().contains("unknown name"));
        assert!(evaluate("1; rm -rf /").unwrap_err().contains("unexpected character"));
        assert!(evaluate("1..2").unwrap_err().contains("not a number"));
        assert!(evaluate("sqrt 4").unwrap_err().contains("parentheses"));
        let deep = format!("{}1{}", "(".repeat(200), ")".repeat(200));
        assert!(evaluate(&deep).unwrap_err().contains("deeper"));
        let unary = format!("{}1", "-".repeat(500));
        assert!(evaluate(&unary).unwrap_err().contains("deeper"));
        let long = "1+".repeat(600) + "1";
        assert!(evaluate(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn formats_for_speech() {
        assert_eq!(format_number(evaluate("0.1 + 0.2").unwrap()), "0.3");
        assert_eq!(format_number(42.0), "42");
        assert_eq!(format_number(-7.0), "-7");
        assert_eq!(format_number(1.0 / 3.0), "0.333333333333");
        assert_eq!(format_number(2.5e20), "2.5e20");
        assert_eq!(format_number(1e-20), "1e-20");
    }
}
