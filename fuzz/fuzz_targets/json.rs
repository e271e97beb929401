//! Any body: the strict object reader never panics, and it agrees with
//! serde_json wherever both read a body. An object it accepts reads the
//! same to serde_json (so to a reader that keeps the first of a key or the
//! last); an object it refuses for a repeated key does have that key (or is
//! broken after it as well).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendgate_core::json::{NotAnObject, strict_object};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let lenient = serde_json::from_slice::<Value>(data);
    match strict_object(data) {
        // Where serde_json reads the body it reads the same object. (It
        // refuses some objects the strict reader takes: a first key that is
        // serde_json's own raw-value marker, found by this target. No
        // reader takes those differently; one just cannot read them.)
        Ok(fields) => {
            if let Ok(value) = lenient {
                assert_eq!(value, Value::Object(fields));
            }
        }
        Err(NotAnObject::DuplicateKey(key)) => {
            // The strict reader stops at the repeated key; a body that is
            // also broken after it is refused by serde_json for that.
            if let Ok(value) = lenient {
                let Value::Object(last_wins) = value else {
                    panic!("a repeated key in a JSON {}", sendgate_core::json::kind(&value));
                };
                assert!(last_wins.contains_key(&key));
            }
        }
        Err(NotAnObject::Kind(kind)) => {
            // Refused either way; where serde_json reads it, the kinds agree
            // (an array is skipped, not read, so bad text inside one is
            // serde_json's refusal alone).
            if let Ok(value) = lenient {
                assert_eq!(sendgate_core::json::kind(&value), kind);
            }
        }
        Err(NotAnObject::Syntax(message)) => {
            assert!(lenient.is_err(), "strict refused what serde_json read: {message}");
        }
    }
});
