//! Subscription filters: which messages of a topic a consumer group wants.
//!
//! A filter is parsed once, at subscribe time; a bad expression is a typed
//! error naming the position. Messages a group's filter rejects are not
//! delivered to it: its position moves past them (they are neither retried
//! nor dead-lettered).

use std::collections::BTreeSet;
use std::fmt;

use crate::error::Error;
use crate::message::Message;
use crate::sql::SqlExpr;

/// Which messages a subscription receives.
///
/// # Examples
///
/// ```
/// use weirmq_bus::Filter;
/// let f = Filter::tags("vip || gold").unwrap();
/// assert_eq!(f.to_string(), "gold || vip");
/// assert!(Filter::tags("*").unwrap().is_all());
/// assert!(Filter::tags("vip ||").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub enum Filter {
    /// Every message (`*`).
    #[default]
    All,
    /// Messages whose tag is one of these (case-sensitive, exact).
    Tags(BTreeSet<String>),
    /// Messages for which a SQL92 expression over their properties (and
    /// `TAGS`) is true.
    Sql(SqlExpr),
}

impl Filter {
    /// Parses a RocketMQ tag expression: `*`, `A`, or `A || B || …`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidFilter`] naming the position of an empty tag, a lone
    /// `|`, or a `*` mixed with tags; also for an expression longer than
    /// [`MAX_FILTER_BYTES`](crate::MAX_FILTER_BYTES).
    pub fn tags(expression: &str) -> Result<Filter, Error> {
        let bad = |position: usize, reason: &str| Error::InvalidFilter {
            expression: expression.to_string(),
            position,
            reason: reason.to_string(),
        };
        crate::sql::check_size(expression)?;
        if expression.trim() == "*" {
            return Ok(Filter::All);
        }
        let mut tags = BTreeSet::new();
        let mut start = 0;
        let bytes = expression.as_bytes();
        loop {
            let end = expression[start..]
                .find("||")
                .map_or(expression.len(), |i| start + i);
            let part = &expression[start..end];
            let tag = part.trim();
            let at = start + (part.len() - part.trim_start().len());
            if tag.is_empty() {
                return Err(bad(at, "expected a tag"));
            }
            if let Some(i) = tag.find('|') {
                return Err(bad(
                    at + i,
                    "`|` is not allowed in a tag (use `||` between tags)",
                ));
            }
            if tag == "*" {
                return Err(bad(
                    at,
                    "`*` matches everything and cannot be combined with tags",
                ));
            }
            tags.insert(tag.to_string());
            if end == expression.len() {
                break;
            }
            start = end + 2;
            if start > bytes.len() {
                break;
            }
        }
        Ok(Filter::Tags(tags))
    }

    /// Parses RocketMQ's SQL92 subset over properties (see [`SqlExpr`]):
    /// `region = 'eu' AND amount > 100`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidFilter`] with the position and what was expected.
    pub fn sql(expression: &str) -> Result<Filter, Error> {
        SqlExpr::parse(expression).map(Filter::Sql)
    }

    /// Whether this filter lets every message through.
    pub fn is_all(&self) -> bool {
        matches!(self, Filter::All)
    }

    /// Whether `message` passes.
    pub fn matches(&self, message: &Message) -> bool {
        match self {
            Filter::All => true,
            Filter::Tags(tags) => message.tag().is_some_and(|t| tags.contains(t)),
            Filter::Sql(e) => e.matches(message),
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::All => f.write_str("*"),
            Filter::Tags(tags) => {
                let v: Vec<&str> = tags.iter().map(String::as_str).collect();
                f.write_str(&v.join(" || "))
            }
            Filter::Sql(e) => write!(f, "SQL {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::OutgoingMessage;
    use std::sync::Arc;

    fn msg(tag: Option<&str>) -> Message {
        let mut out = OutgoingMessage::new("t", vec![]);
        out.tag = tag.map(str::to_string);
        Message::prepare(out, Arc::from("t"))
    }

    #[test]
    fn tag_expressions() {
        let f = Filter::tags(" vip||gold ").unwrap();
        assert!(f.matches(&msg(Some("vip"))));
        assert!(f.matches(&msg(Some("gold"))));
        assert!(!f.matches(&msg(Some("VIP"))), "case-sensitive");
        assert!(!f.matches(&msg(None)));
        assert!(Filter::tags("*").unwrap().matches(&msg(None)));
        for (bad, pos) in [
            ("", 0),
            ("a ||", 4),
            ("|| a", 0),
            ("a | b", 2),
            ("a || * ", 5),
            ("a ||| b", 4),
        ] {
            match Filter::tags(bad) {
                Err(Error::InvalidFilter { position, .. }) => assert_eq!(position, pos, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics(s in ".{0,40}") {
            let _ = Filter::tags(&s);
        }
    }
}
