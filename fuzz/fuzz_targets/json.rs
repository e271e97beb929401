//! Any body: the strict object reader never panics, and it agrees with
//! serde_json wherever a body is unambiguous. An object it accepts reads
//! the same to serde_json (so to a reader that keeps the first of a key or
//! the last); an object it refuses for a repeated key does have that key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendgate_core::json::{NotAnObject, strict_object};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let lenient = serde_json::from_slice::<Value>(data);
    match strict_object(data) {
        Ok(fields) => assert_eq!(lenient.ok(), Some(Value::Object(fields))),
        Err(NotAnObject::DuplicateKey(key)) => {
            let Ok(Value::Object(last_wins)) = lenient else {
                panic!("a repeated key in a body serde_json cannot read as an object");
            };
            assert!(last_wins.contains_key(&key));
        }
        Err(NotAnObject::Kind(kind)) => {
            let value = lenient.expect("a JSON value of another kind");
            assert_eq!(sendgate_core::json::kind(&value), kind);
        }
        Err(NotAnObject::Syntax(message)) => {
            assert!(lenient.is_err(), "strict refused what serde_json read: {message}");
        }
    }
});
