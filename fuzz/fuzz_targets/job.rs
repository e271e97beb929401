//! Any body and `message_id`: parsing never panics, and a job that parses
//! has identifiers that pass their own rules and reads the same to any
//! JSON parser (no key repeated for another reader to take differently).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendgate_core::ids::{AccountId, IdempotencyKey};
use sendgate_core::job::Job;

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into a message_id and a body.
    let (message_id, body) = match data.split_first() {
        Some((&n, rest)) if usize::from(n) <= rest.len() => {
            let (id, body) = rest.split_at(usize::from(n));
            (std::str::from_utf8(id).ok(), body)
        }
        _ => (None, data),
    };
    match Job::parse(body, message_id, 64 * 1024) {
        Ok(job) => {
            assert!(AccountId::parse(job.account_id.as_str()).is_ok());
            assert!(IdempotencyKey::parse(job.idempotency_key.as_str()).is_ok());
            // serde_json, where it reads the body, reads the same account.
            if let Ok(lenient) = serde_json::from_slice::<serde_json::Value>(body) {
                assert_eq!(lenient["account_id"].as_str(), Some(job.account_id.as_str()));
            }
        }
        Err(invalid) => assert!(!invalid.0.is_empty()),
    }
});
