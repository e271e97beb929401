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
        // Where serde_json reads the body it reads the same object. (This
        // build has serde_json's `raw_value` on, as the gate's has; its
        // markers, which make its `Value` read an object as something else,
        // are refused below.)
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
        Err(NotAnObject::ReservedKey(key)) => {
            // Refused for a marker key, found by this target at the top
            // level (serde_json read `{"$serde_json::private::RawValue":"99"}`
            // as the number 99).
            assert!(key.starts_with("$serde_json::private::"), "{key}");
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
