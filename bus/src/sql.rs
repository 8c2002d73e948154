//! RocketMQ's SQL92 subset for filters over message properties.
//!
//! Grammar (keywords and identifiers case-insensitive):
//!
//! ```text
//! expr      := and (OR and)*
//! and       := not (AND not)*
//! not       := NOT not | '(' expr ')' | predicate
//! predicate := value [ cmp value
//!                    | [NOT] BETWEEN value AND value
//!                    | [NOT] IN '(' value (',' value)* ')'
//!                    | IS [NOT] NULL
//!                    | [NOT] (CONTAINS | STARTSWITH | ENDSWITH) value ]
//! cmp       := = | <> | != | > | >= | < | <=
//! value     := identifier | number | 'string' ('' escapes ') | TRUE | FALSE | NULL
//! ```
//!
//! Identifiers name properties; `TAGS` is the message's tag. Property values
//! are strings, compared as numbers when both sides are numbers. Evaluation is
//! three-valued: a missing property is NULL, a comparison with NULL or of
//! mismatched types is unknown, and only a definite `true` lets a message
//! through. Parsing and evaluation never panic and are linear in the input.
//!
//! # Bounds
//!
//! An expression is at most [`MAX_FILTER_BYTES`] bytes and nests at most
//! [`MAX_NESTING`] levels of parentheses and `NOT`; anything larger is an
//! [`Error::InvalidFilter`], never a stack overflow. Chains of `AND` / `OR`
//! are stored flat (one node with all their operands), so a long chain costs
//! no stack depth to parse, evaluate, clone or drop.

use std::fmt;

use crate::error::Error;
use crate::message::Message;

/// A parsed SQL filter expression.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlExpr {
    source: String,
    root: Node,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Ident(String),
}

/// The most bytes a filter expression (SQL or tags) may have.
pub const MAX_FILTER_BYTES: usize = 64 * 1024;

/// The most levels of parentheses and `NOT` a SQL filter may nest.
pub const MAX_NESTING: usize = 200;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    /// Two or more operands, any of which is true.
    Or(Vec<Node>),
    /// Two or more operands, all of which are true.
    And(Vec<Node>),
    Not(Box<Node>),
    Value(Value),
    Cmp(Value, &'static str, Value),
    Between(Value, Value, Value, bool),
    In(Value, Vec<Value>, bool),
    IsNull(Value, bool),
    Text(Value, &'static str, Value, bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Num(f64),
    Str(String),
    Sym(&'static str),
}

fn err(source: &str, position: usize, reason: impl Into<String>) -> Error {
    Error::InvalidFilter {
        expression: source.to_string(),
        position,
        reason: reason.into(),
    }
}

/// Refuses an expression longer than [`MAX_FILTER_BYTES`].
pub(crate) fn check_size(source: &str) -> Result<(), Error> {
    if source.len() > MAX_FILTER_BYTES {
        let mut cut = MAX_FILTER_BYTES.min(80);
        while !source.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(Error::InvalidFilter {
            expression: format!("{}...", &source[..cut]),
            position: MAX_FILTER_BYTES,
            reason: format!(
                "the expression is {} bytes, more than the limit of {MAX_FILTER_BYTES}; \
                 use IN (...) for long lists of values, or filter in the handler",
                source.len()
            ),
        });
    }
    Ok(())
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, Error> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            out.push((Tok::Word(src[start..i].to_string()), start));
        } else if c.is_ascii_digit() || (c == b'-' && i + 1 < b.len() && b[i + 1].is_ascii_digit())
        {
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let n: f64 = src[start..i]
                .parse()
                .map_err(|_| err(src, start, "not a number"))?;
            out.push((Tok::Num(n), start));
        } else if c == b'\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match src[i..].find('\'') {
                    None => return Err(err(src, start, "string not closed with `'`")),
                    Some(j) => {
                        s.push_str(&src[i..i + j]);
                        i += j + 1;
                        if i < b.len() && b[i] == b'\'' {
                            s.push('\'');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            out.push((Tok::Str(s), start));
        } else {
            let two = src.get(i..i + 2).unwrap_or("");
            let sym = match two {
                "<>" | "!=" => Some("<>"),
                ">=" => Some(">="),
                "<=" => Some("<="),
                _ => None,
            };
            if let Some(s) = sym {
                out.push((Tok::Sym(s), start));
                i += 2;
                continue;
            }
            let one = match c {
                b'=' => "=",
                b'>' => ">",
                b'<' => "<",
                b'(' => "(",
                b')' => ")",
                b',' => ",",
                _ => {
                    let ch = src[i..].chars().next().unwrap_or('?');
                    return Err(err(src, start, format!("unexpected character `{ch}`")));
                }
            };
            out.push((Tok::Sym(one), start));
            i += 1;
        }
    }
    Ok(out)
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.src.len(), |t| t.1)
    }
    fn peek_kw(&self, kw: &str) -> bool {
        matches!(self.toks.get(self.pos), Some((Tok::Word(w), _)) if w.eq_ignore_ascii_case(kw))
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        let yes = self.peek_kw(kw);
        self.pos += yes as usize;
        yes
    }
    fn eat_sym(&mut self, s: &str) -> bool {
        let yes = matches!(self.toks.get(self.pos), Some((Tok::Sym(x), _)) if *x == s);
        self.pos += yes as usize;
        yes
    }
    fn expect_kw(&mut self, kw: &str) -> Result<(), Error> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(err(self.src, self.at(), format!("expected {kw}")))
        }
    }

    fn or(&mut self) -> Result<Node, Error> {
        let first = self.and()?;
        if !self.peek_kw("OR") {
            return Ok(first);
        }
        let mut operands = vec![first];
        while self.eat_kw("OR") {
            operands.push(self.and()?);
        }
        Ok(Node::Or(operands))
    }

    fn and(&mut self) -> Result<Node, Error> {
        let first = self.not()?;
        if !self.peek_kw("AND") {
            return Ok(first);
        }
        let mut operands = vec![first];
        while self.eat_kw("AND") {
            operands.push(self.not()?);
        }
        Ok(Node::And(operands))
    }

    fn not(&mut self) -> Result<Node, Error> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(err(self.src, self.at(), "expression nested too deeply"));
        }
        let node = if self.eat_kw("NOT") {
            Node::Not(Box::new(self.not()?))
        } else if self.eat_sym("(") {
            let inner = self.or()?;
            if !self.eat_sym(")") {
                return Err(err(self.src, self.at(), "expected `)`"));
            }
            inner
        } else {
            self.predicate()?
        };
        self.depth -= 1;
        Ok(node)
    }

    fn value(&mut self) -> Result<Value, Error> {
        let at = self.at();
        let v = match self.toks.get(self.pos) {
            Some((Tok::Num(n), _)) => Value::Num(*n),
            Some((Tok::Str(s), _)) => Value::Str(s.clone()),
            Some((Tok::Word(w), _)) => match w.to_ascii_uppercase().as_str() {
                "TRUE" => Value::Bool(true),
                "FALSE" => Value::Bool(false),
                "NULL" => Value::Null,
                "AND" | "OR" | "NOT" | "BETWEEN" | "IN" | "IS" | "CONTAINS" | "STARTSWITH"
                | "ENDSWITH" => {
                    return Err(err(self.src, at, format!("expected a value, found {w}")))
                }
                _ => Value::Ident(w.clone()),
            },
            _ => return Err(err(self.src, at, "expected a value")),
        };
        self.pos += 1;
        Ok(v)
    }

    fn predicate(&mut self) -> Result<Node, Error> {
        let left = self.value()?;
        for op in ["=", "<>", ">=", "<=", ">", "<"] {
            if self.eat_sym(op) {
                return Ok(Node::Cmp(left, op, self.value()?));
            }
        }
        if self.eat_kw("IS") {
            let negated = self.eat_kw("NOT");
            self.expect_kw("NULL")?;
            return Ok(Node::IsNull(left, negated));
        }
        let negated = self.eat_kw("NOT");
        if self.eat_kw("BETWEEN") {
            let lo = self.value()?;
            self.expect_kw("AND")?;
            let hi = self.value()?;
            return Ok(Node::Between(left, lo, hi, negated));
        }
        if self.eat_kw("IN") {
            if !self.eat_sym("(") {
                return Err(err(self.src, self.at(), "expected `(` after IN"));
            }
            let mut items = vec![self.value()?];
            while self.eat_sym(",") {
                items.push(self.value()?);
            }
            if !self.eat_sym(")") {
                return Err(err(self.src, self.at(), "expected `,` or `)`"));
            }
            return Ok(Node::In(left, items, negated));
        }
        for op in ["CONTAINS", "STARTSWITH", "ENDSWITH"] {
            if self.eat_kw(op) {
                return Ok(Node::Text(left, op, self.value()?, negated));
            }
        }
        if negated {
            return Err(err(
                self.src,
                self.at(),
                "expected BETWEEN, IN, CONTAINS, STARTSWITH or ENDSWITH after NOT",
            ));
        }
        Ok(Node::Value(left))
    }
}

impl SqlExpr {
    /// Parses an expression.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidFilter`] with the byte position and what was expected;
    /// also for an expression longer than [`MAX_FILTER_BYTES`] or nested
    /// deeper than [`MAX_NESTING`].
    pub fn parse(source: &str) -> Result<SqlExpr, Error> {
        check_size(source)?;
        let toks = lex(source)?;
        if toks.is_empty() {
            return Err(err(source, 0, "empty expression"));
        }
        let mut p = Parser {
            src: source,
            toks,
            pos: 0,
            depth: 0,
        };
        let root = p.or()?;
        if p.pos < p.toks.len() {
            return Err(err(source, p.at(), "expected AND, OR or the end"));
        }
        Ok(SqlExpr {
            source: source.to_string(),
            root,
        })
    }

    /// Whether `message` passes: the expression is definitely true.
    pub fn matches(&self, message: &Message) -> bool {
        eval(&self.root, message) == Some(true)
    }
}

impl fmt::Display for SqlExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A value as seen at evaluation time.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
}

fn resolve(v: &Value, m: &Message) -> Val {
    match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Num(n) => Val::Num(*n),
        Value::Str(s) => Val::Str(s.clone()),
        Value::Ident(name) => {
            let found = if name.eq_ignore_ascii_case("TAGS") {
                m.tag().map(str::to_string)
            } else {
                m.properties()
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            found.map_or(Val::Null, Val::Str)
        }
    }
}

fn num(v: &Val) -> Option<f64> {
    match v {
        Val::Num(n) => Some(*n),
        Val::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn equal(a: &Val, b: &Val) -> Option<bool> {
    match (a, b) {
        (Val::Null, _) | (_, Val::Null) => None,
        (Val::Bool(x), Val::Bool(y)) => Some(x == y),
        (Val::Str(x), Val::Str(y)) => Some(x == y),
        (Val::Num(_), _) | (_, Val::Num(_)) => Some(num(a)? == num(b)?),
        (Val::Bool(x), Val::Str(s)) | (Val::Str(s), Val::Bool(x)) => {
            Some(s.eq_ignore_ascii_case(if *x { "true" } else { "false" }))
        }
    }
}

fn truth(v: &Val) -> Option<bool> {
    match v {
        Val::Bool(b) => Some(*b),
        Val::Str(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Val::Str(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn eval(n: &Node, m: &Message) -> Option<bool> {
    match n {
        Node::Or(operands) => {
            let mut unknown = false;
            for o in operands {
                match eval(o, m) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => unknown = true,
                }
            }
            (!unknown).then_some(false)
        }
        Node::And(operands) => {
            let mut unknown = false;
            for o in operands {
                match eval(o, m) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => unknown = true,
                }
            }
            (!unknown).then_some(true)
        }
        Node::Not(a) => eval(a, m).map(|b| !b),
        Node::Value(v) => truth(&resolve(v, m)),
        Node::Cmp(a, op, b) => {
            let (a, b) = (resolve(a, m), resolve(b, m));
            match *op {
                "=" => equal(&a, &b),
                "<>" => equal(&a, &b).map(|e| !e),
                _ => {
                    let (x, y) = (num(&a)?, num(&b)?);
                    Some(match *op {
                        ">" => x > y,
                        ">=" => x >= y,
                        "<" => x < y,
                        _ => x <= y,
                    })
                }
            }
        }
        Node::Between(v, lo, hi, negated) => {
            let x = num(&resolve(v, m))?;
            let inside = x >= num(&resolve(lo, m))? && x <= num(&resolve(hi, m))?;
            Some(inside != *negated)
        }
        Node::In(v, items, negated) => {
            let x = resolve(v, m);
            if x == Val::Null {
                return None;
            }
            let found = items
                .iter()
                .any(|i| equal(&x, &resolve(i, m)) == Some(true));
            Some(found != *negated)
        }
        Node::IsNull(v, negated) => Some((resolve(v, m) == Val::Null) != *negated),
        Node::Text(v, op, pat, negated) => {
            let (Val::Str(s), Val::Str(p)) = (resolve(v, m), resolve(pat, m)) else {
                return None;
            };
            let hit = match *op {
                "CONTAINS" => s.contains(&p),
                "STARTSWITH" => s.starts_with(&p),
                _ => s.ends_with(&p),
            };
            Some(hit != *negated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::OutgoingMessage;
    use std::sync::Arc;

    fn msg() -> Message {
        let out = OutgoingMessage::new("t", vec![])
            .tag("vip")
            .property("region", "eu")
            .property("amount", "120.5")
            .property("Level", "3")
            .property("name", "O'Brien");
        Message::prepare(out, Arc::from("t"))
    }

    #[test]
    fn table() {
        let m = msg();
        let cases: &[(&str, bool)] = &[
            ("region = 'eu'", true),
            ("REGION = 'eu'", true),
            ("region <> 'eu'", false),
            ("region != 'us'", true),
            ("amount > 100", true),
            ("amount >= 120.5 AND amount <= 120.5", true),
            ("amount < 100", false),
            ("level = 3", true),
            ("amount BETWEEN 100 AND 200", true),
            ("amount NOT BETWEEN 100 AND 200", false),
            ("region IN ('us', 'eu')", true),
            ("region NOT IN ('us', 'eu')", false),
            ("missing IS NULL", true),
            ("region IS NOT NULL", true),
            ("missing = 'x'", false),
            ("NOT missing = 'x'", false),
            ("missing = 'x' OR region = 'eu'", true),
            ("missing = 'x' AND region = 'eu'", false),
            ("name = 'O''Brien'", true),
            ("name CONTAINS 'Bri'", true),
            ("name STARTSWITH 'O'''", true),
            ("name ENDSWITH 'x'", false),
            ("name NOT CONTAINS 'x'", true),
            ("TAGS = 'vip'", true),
            ("tags IN ('gold')", false),
            (
                "(region = 'us' OR region = 'eu') AND NOT (amount < 0)",
                true,
            ),
            ("TRUE", true),
            ("FALSE OR NULL", false),
            ("region > 5", false),
            ("region", false),
            ("amount = -1", false),
        ];
        for (src, want) in cases {
            let e = SqlExpr::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(e.matches(&m), *want, "{src}");
        }
    }

    #[test]
    fn syntax_errors_name_the_position() {
        for (src, pos) in [
            ("", 0),
            ("region =", 8),
            ("region = 'eu", 9),
            ("a IN (1, 2", 10),
            ("a BETWEEN 1 2", 12),
            ("(a = 1", 6),
            ("a = 1 b", 6),
            ("a # 1", 2),
            ("a NOT = 1", 6),
            ("a IS 1", 5),
        ] {
            match SqlExpr::parse(src) {
                Err(Error::InvalidFilter { position, .. }) => assert_eq!(position, pos, "{src:?}"),
                other => panic!("{src:?}: {other:?}"),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,60}") {
            if let Ok(e) = SqlExpr::parse(&s) {
                let _ = e.matches(&msg());
            }
        }

        #[test]
        fn sql_like_input_never_panics(s in "[a-z ()=<>!',0-9.ANDORTIS-]{0,60}") {
            if let Ok(e) = SqlExpr::parse(&s) {
                let _ = e.matches(&msg());
            }
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let src = "(".repeat(10_000) + "a = 1" + &")".repeat(10_000);
        assert!(SqlExpr::parse(&src).is_err());
        let src = "NOT ".repeat(10_000) + "a = 1";
        assert!(SqlExpr::parse(&src).is_err());
    }
}
