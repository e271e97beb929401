//! A JSON object read strictly: a key that appears twice is an error, not
//! "the last one wins". Two readers of one body must never disagree on
//! what it says: a job whose `account_id` appears twice would be charged to
//! one account by a parser that keeps the last key and sent for another by
//! one that keeps the first.
//!
//! Only the top level is read this way: it is the only level sendgate reads
//! (jobs and delivery reports are flat objects); the values below it are
//! kept as [`serde_json::Value`]s and forwarded as the bytes they came in.
//!
//! No key at any level may be one of serde_json's private markers
//! (`$serde_json::private::RawValue`, `…::Number`). With serde_json's
//! `raw_value` feature on (axum and sqlx turn it on in the gate's build) its
//! `Value` reads `{"$serde_json::private::RawValue":"\"a\""}` as the string
//! `"a"`: a job could name its account in a way one reader takes as a
//! string and another as an object. The values here are read as plain JSON
//! (a marker is an ordinary key to them), and a body holding a marker is
//! refused.

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
    /// A key some JSON readers take as an instruction (serde_json's private
    /// markers), at any level.
    #[error("body has the key `{0}`, which serde_json reserves for its own use")]
    ReservedKey(String),
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
        Err(err) => Err(refusal(&err)),
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

/// The markers [`TopVisitor`] and [`PlainVisitor`] put in front of a
/// refused key's name, so the refusal can be told apart from serde_json's
/// own syntax errors.
const DUPLICATE: &str = "sendgate-duplicate-key:";
const RESERVED: &str = "sendgate-reserved-key:";

/// The prefix of serde_json's private marker keys.
const SERDE_JSON_PRIVATE: &str = "$serde_json::private::";

fn refusal(err: &serde_json::Error) -> NotAnObject {
    let text = err.to_string();
    // serde_json appends " at line L column C" to a custom error.
    let key = |rest: &str| {
        rest.rsplit_once(" at line ")
            .map_or(rest, |(key, _)| key)
            .to_owned()
    };
    if let Some(rest) = text.strip_prefix(DUPLICATE) {
        NotAnObject::DuplicateKey(key(rest))
    } else if let Some(rest) = text.strip_prefix(RESERVED) {
        NotAnObject::ReservedKey(key(rest))
    } else {
        NotAnObject::Syntax(text)
    }
}

fn check_key<E: de::Error>(key: &str) -> Result<(), E> {
    if key.starts_with(SERDE_JSON_PRIVATE) {
        return Err(E::custom(format_args!("{RESERVED}{key}")));
    }
    Ok(())
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
            check_key(&key)?;
            if fields.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{key}")));
            }
            let Plain(value) = map.next_value()?;
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

/// A JSON value read as plain JSON: objects, arrays, strings, numbers,
/// booleans and null, with no key given a meaning (serde_json's own
/// `Value` honours its markers when a feature asks it to). A repeated key
/// below the top level keeps the last, as `Value` does.
struct Plain(Value);

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PlainVisitor).map(Plain)
    }
}

struct PlainVisitor;

impl<'de> Visitor<'de> for PlainVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            check_key(&key)?;
            let Plain(value) = map.next_value()?;
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Plain(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        // As serde_json's own `Value`: a number JSON text cannot hold
        // (never produced by its reader) would be null.
        Ok(Value::from(n))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
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
    fn serde_json_markers_are_refused_at_any_level() {
        // The core's tests build serde_json with `raw_value` on, as the
        // gate's build has it (see Cargo.toml): this job would name account
        // `a` to serde_json's `Value` and an object to other readers.
        let marker = "$serde_json::private::RawValue";
        let nested = format!(r#"{{"account_id":{{"{marker}":"\"a\""}},"x":1}}"#);
        let raw: Value = serde_json::from_str(&nested).expect("serde_json reads it");
        assert_eq!(
            raw["account_id"], "a",
            "the build this test runs in honours the marker"
        );
        assert_eq!(
            strict_object(nested.as_bytes()),
            Err(NotAnObject::ReservedKey(marker.to_owned()))
        );
        for body in [
            format!(r#"{{"{marker}":"99"}}"#),
            r#"{"a":1,"$serde_json::private::Number":"1"}"#.to_owned(),
            format!(r#"{{"a":[{{"b":{{"{marker}":"1"}}}}]}}"#),
            // An escape spells the same key.
            r#"{"a":{"\u0024serde_json::private::RawValue":"1"}}"#.to_owned(),
        ] {
            assert!(
                matches!(
                    strict_object(body.as_bytes()),
                    Err(NotAnObject::ReservedKey(_))
                ),
                "{body}"
            );
        }
        // Keys are plain below the top level too: the values read are the
        // ones serde_json reads where no marker is involved.
        let plain = br#"{"m":{"k":[1,-2,2.5,"s",null,true,{"x":{}}]}}"#;
        let fields = strict_object(plain).expect("an object");
        let Value::Object(expected) = serde_json::from_slice::<Value>(plain).expect("JSON") else {
            panic!("an object")
        };
        assert_eq!(fields, expected);
    }

    #[test]
    fn a_key_that_looks_like_the_marker_is_only_a_key() {
        let body = format!(r#"{{"{DUPLICATE}x":1}}"#);
        assert_eq!(strict_object(body.as_bytes()).expect("an object").len(), 1);
    }
}
