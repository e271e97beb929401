//! A JSON object read strictly: a key that appears twice is an error, not
//! "the last one wins". Two readers of one body must never disagree on
//! what it says: a job whose `account_id` appears twice would be charged to
//! one account by a parser that keeps the last key and sent for another by
//! one that keeps the first.
//!
//! Only the top level is read this way: it is the only level sendgate reads
//! (jobs and delivery reports are flat objects); the values below it are
//! kept as [`serde_json::Value`]s and forwarded as the bytes they came in.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::{Map, Value};

/// Why a body is not a strict JSON object; the message names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnObject {
    /// Not JSON at all, or a key repeated (the message names it).
    #[error("body is not JSON: {0}")]
    Syntax(String),
    #[error("body has the key `{0}` more than once")]
    DuplicateKey(String),
    /// JSON, but of this other kind.
    #[error("body is a JSON {0}, not an object")]
    Kind(&'static str),
}

/// The body's top-level object, each key at most once.
///
/// # Errors
/// [`NotAnObject`] saying what the body is instead.
pub fn strict_object(body: &[u8]) -> Result<Map<String, Value>, NotAnObject> {
    match serde_json::from_slice::<Top>(body) {
        Ok(Top::Object(fields)) => Ok(fields),
        Ok(Top::Other(kind)) => Err(NotAnObject::Kind(kind)),
        Err(err) => match duplicate_key(&err) {
            Some(key) => Err(NotAnObject::DuplicateKey(key)),
            None => Err(NotAnObject::Syntax(err.to_string())),
        },
    }
}

/// The kind of a JSON value, as the error messages name it.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The marker [`TopVisitor`] puts in front of a repeated key's name, so the
/// key can be told apart from serde_json's own syntax errors.
const DUPLICATE: &str = "sendgate-duplicate-key:";

fn duplicate_key(err: &serde_json::Error) -> Option<String> {
    let text = err.to_string();
    let rest = text.strip_prefix(DUPLICATE)?;
    // serde_json appends " at line L column C" to a custom error.
    let key = rest.rsplit_once(" at line ").map_or(rest, |(key, _)| key);
    Some(key.to_owned())
}

enum Top {
    Object(Map<String, Value>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{key}")));
            }
            let value: Value = map.next_value()?;
            fields.insert(key, value);
        }
        Ok(Top::Object(fields))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Top, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Top::Other("array"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Top, E> {
        Ok(Top::Other("string"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Top, E> {
        Ok(Top::Other("boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Top, E> {
        Ok(Top::Other("number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Top, E> {
        Ok(Top::Other("number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Top, E> {
        Ok(Top::Other("number"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Top, E> {
        Ok(Top::Other("null"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_is_named() {
        let body = br#"{"account_id":"a","idempotency_key":"k","account_id":"b"}"#;
        assert_eq!(
            strict_object(body),
            Err(NotAnObject::DuplicateKey("account_id".to_owned()))
        );
    }

    #[test]
    fn a_key_spelled_with_an_escape_is_the_same_key() {
        let body = br#"{"account_id":"a","account\u005fid":"b"}"#;
        assert_eq!(
            strict_object(body),
            Err(NotAnObject::DuplicateKey("account_id".to_owned()))
        );
    }

    #[test]
    fn keys_repeated_below_the_top_level_are_left_to_the_reader_of_that_level() {
        let fields = strict_object(br#"{"a":{"x":1,"x":2},"b":[1,2]}"#).expect("an object");
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn other_kinds_and_syntax_errors_say_what_they_are() {
        assert_eq!(strict_object(b"[1,2]"), Err(NotAnObject::Kind("array")));
        assert_eq!(strict_object(b"null"), Err(NotAnObject::Kind("null")));
        assert_eq!(strict_object(b"\"s\""), Err(NotAnObject::Kind("string")));
        assert_eq!(strict_object(b"1.5"), Err(NotAnObject::Kind("number")));
        assert!(matches!(strict_object(b"{"), Err(NotAnObject::Syntax(_))));
        assert!(matches!(
            strict_object(br#"{"a":1} x"#),
            Err(NotAnObject::Syntax(_))
        ));
    }

    #[test]
    fn a_key_that_looks_like_the_marker_is_only_a_key() {
        let body = format!(r#"{{"{DUPLICATE}x":1}}"#);
        assert_eq!(strict_object(body.as_bytes()).expect("an object").len(), 1);
    }
}
