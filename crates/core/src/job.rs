//! The send job as the scheduler publishes it (docs/contract.md#2-the-job-and-how-it-is-published), parsed and validated
//! once. Pure: no I/O, so every rule is unit-tested here.
//!
//! Only `account_id` and `idempotency_key` matter to the gate; every other
//! field is opaque and the body is forwarded byte for byte.

use sha2::{Digest, Sha256};

use crate::ids::{AccountId, IdempotencyKey, JobKey};
use crate::json::{self, strict_object};

/// A job that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub account_id: AccountId,
    pub idempotency_key: IdempotencyKey,
    /// The body's [`PayloadDigest`]: "same payload" means the same bytes.
    pub payload_digest: PayloadDigest,
    /// The body's `campaign_id`, when it is a string of 1 to 128 printable
    /// characters: usage can be grouped by it. Never judged: any other
    /// value (or none) is simply no campaign.
    pub campaign_id: Option<String>,
}

/// The first 16 bytes of the SHA-256 of a job's body, kept with its
/// charge to tell a copy of the job from another job under the same key.
/// 128 bits: no two different bodies share one by chance, and making two
/// that do takes about 2^64 tries, for a sender who would only be fooling
/// itself (its own two jobs under its own key). Charges from before
/// 2026-11-30 keep the whole 32 bytes; their first 16 are this.
pub type PayloadDigest = [u8; 16];

/// A body's [`PayloadDigest`].
pub fn payload_digest(body: &[u8]) -> PayloadDigest {
    let full = Sha256::digest(body);
    let mut digest = [0; 16];
    digest.copy_from_slice(&full[..16]);
    digest
}

/// The longest `campaign_id` usage is grouped by, in characters.
pub const MAX_CAMPAIGN_CHARS: usize = 128;

/// Why a job is `invalid_job`; the message is the dead letter's detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidJob(pub String);

impl Job {
    /// Validates a delivery's body and `message_id` property.
    ///
    /// # Errors
    /// [`InvalidJob`] with a human-readable detail naming what was wrong.
    pub fn parse(
        body: &[u8],
        message_id: Option<&str>,
        max_body_bytes: usize,
    ) -> Result<Job, InvalidJob> {
        if body.len() > max_body_bytes {
            return Err(InvalidJob(format!(
                "body is {} bytes, over the limit of {max_body_bytes} bytes",
                body.len()
            )));
        }
        let text = std::str::from_utf8(body).map_err(|err| {
            InvalidJob(format!(
                "body is not valid UTF-8 (invalid byte at offset {})",
                err.valid_up_to()
            ))
        })?;
        let fields = strict_object(text.as_bytes()).map_err(|err| InvalidJob(err.to_string()))?;
        let account_id = match text_field(&fields, "account_id")? {
            Some(id) => AccountId::parse(id).map_err(|e| InvalidJob(e.0))?,
            None => return Err(InvalidJob("`account_id` is missing".to_owned())),
        };
        let key = job_key(text_field(&fields, "idempotency_key")?, message_id)?;
        let idempotency_key = IdempotencyKey::parse(key).map_err(|e| InvalidJob(e.0))?;
        let campaign_id = match fields.get("campaign_id") {
            Some(serde_json::Value::String(c))
                if !c.is_empty()
                    && c.chars().count() <= MAX_CAMPAIGN_CHARS
                    && !c.chars().any(char::is_control) =>
            {
                Some(c.clone())
            }
            _ => None,
        };
        Ok(Job {
            account_id,
            idempotency_key,
            payload_digest: payload_digest(body),
            campaign_id,
        })
    }

    /// What the job is charged under.
    pub fn key(&self) -> JobKey {
        JobKey::new(&self.account_id, &self.idempotency_key)
    }

    pub fn into_key(self) -> JobKey {
        JobKey {
            account_id: self.account_id,
            idempotency_key: self.idempotency_key,
        }
    }
}

/// A string field of the job's object: `None` when absent or null, an
/// error naming it when it is another kind.
fn text_field<'a>(
    fields: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<&'a str>, InvalidJob> {
    match fields.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(InvalidJob(format!(
            "`{name}` must be a string, found a {}",
            json::kind(other)
        ))),
    }
}

/// The key a job is charged under: its body's `idempotency_key` or its
/// `message_id` property, which agree when both are given.
fn job_key<'a>(
    body_key: Option<&'a str>,
    message_id: Option<&'a str>,
) -> Result<&'a str, InvalidJob> {
    let message_id = message_id.filter(|id| !id.is_empty());
    if message_id.is_some_and(|id| id.contains(char::REPLACEMENT_CHARACTER)) {
        // The AMQP reader puts U+FFFD where a `message_id` was not UTF-8.
        return Err(InvalidJob(
            "`message_id` is not valid UTF-8 (or holds U+FFFD, the replacement character)"
                .to_owned(),
        ));
    }
    match (body_key, message_id) {
        (None, None) => Err(InvalidJob(
            "`idempotency_key` is missing from the body and there is no message_id".to_owned(),
        )),
        (Some(body_key), Some(message_id)) if body_key != message_id => Err(InvalidJob(format!(
            "`idempotency_key` {body_key:?} differs from the message_id {message_id:?}"
        ))),
        (Some(key), _) | (None, Some(key)) => Ok(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{MAX_ACCOUNT_ID_CHARS, MAX_KEY_CHARS};

    const LIMIT: usize = 64 * 1024;

    #[test]
    fn the_payload_digest_is_the_first_half_of_the_sha256() {
        // SHA-256("abc") = ba7816bf 8f01cfea 414140de 5dae2223 b00361a3 ...
        assert_eq!(
            payload_digest(b"abc"),
            [
                0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
                0x22, 0x23
            ]
        );
    }

    fn detail(body: &[u8], message_id: Option<&str>) -> String {
        Job::parse(body, message_id, LIMIT)
            .expect_err("job must be refused")
            .0
    }

    #[test]
    fn a_well_formed_job_parses() {
        let job = Job::parse(
            br#"{"account_id":"acme","idempotency_key":"k1","voice_note":"x"}"#,
            None,
            LIMIT,
        )
        .expect("valid");
        assert_eq!(job.account_id.as_str(), "acme");
        assert_eq!(job.idempotency_key.as_str(), "k1");
    }

    #[test]
    fn the_key_may_come_from_message_id_alone() {
        let job = Job::parse(br#"{"account_id":"acme"}"#, Some("k9"), LIMIT).expect("valid");
        assert_eq!(job.idempotency_key.as_str(), "k9");
    }

    #[test]
    fn equal_key_and_message_id_are_accepted() {
        let job = Job::parse(
            br#"{"account_id":"a","idempotency_key":"k"}"#,
            Some("k"),
            LIMIT,
        )
        .expect("valid");
        assert_eq!(job.idempotency_key.as_str(), "k");
    }

    #[test]
    fn the_same_bytes_hash_the_same_and_other_bytes_differ() {
        let a = Job::parse(br#"{"account_id":"a","idempotency_key":"k"}"#, None, LIMIT);
        let b = Job::parse(br#"{"account_id":"a","idempotency_key":"k"}"#, None, LIMIT);
        let c = Job::parse(
            br#"{"account_id":"a","idempotency_key":"k","x":1}"#,
            None,
            LIMIT,
        );
        let (a, b, c) = (a.expect("valid"), b.expect("valid"), c.expect("valid"));
        assert_eq!(a.payload_digest, b.payload_digest);
        assert_ne!(a.payload_digest, c.payload_digest);
    }

    #[test]
    fn a_key_given_twice_is_invalid_and_named_whichever_key_it_is() {
        for key in [
            "account_id",
            "idempotency_key",
            "campaign_id",
            "voice_note_url",
        ] {
            let body = format!(
                r#"{{"account_id":"a","idempotency_key":"k","campaign_id":"c","voice_note_url":"u","{key}":"b"}}"#
            );
            assert_eq!(
                detail(body.as_bytes(), None),
                format!("body has the key `{key}` more than once")
            );
        }
    }

    #[test]
    fn every_kind_of_bad_input_is_named() {
        assert!(detail(b"not json", None).contains("not JSON"));
        assert!(detail(b"[1,2]", None).contains("array, not an object"));
        assert!(detail(b"\"s\"", None).contains("string, not an object"));
        assert!(detail(b"\xff\xfe{}", None).contains("not valid UTF-8"));
        assert!(detail(br#"{"idempotency_key":"k"}"#, None).contains("`account_id` is missing"));
        assert!(
            detail(br#"{"account_id":7,"idempotency_key":"k"}"#, None)
                .contains("`account_id` must be a string")
        );
        assert!(detail(br#"{"account_id":"","idempotency_key":"k"}"#, None).contains("empty"));
        assert!(detail(br#"{"account_id":"a"}"#, None).contains("`idempotency_key` is missing"));
        assert!(
            detail(br#"{"account_id":"a","idempotency_key":5}"#, None)
                .contains("`idempotency_key` must be a string")
        );
        assert!(
            detail(br#"{"account_id":"a","idempotency_key":"k1"}"#, Some("k2"))
                .contains("differs from the message_id")
        );
        assert!(
            detail(br#"{"account_id":"a","idempotency_key":"k\n"}"#, None)
                .contains("control character")
        );
        assert!(detail(br#"{"account_id":"a"}"#, Some("key-\u{fffd}")).contains("not valid UTF-8"));
        assert_eq!(
            detail(
                br#"{"account_id":{"$serde_json::private::RawValue":"\"a\""},"idempotency_key":"k"}"#,
                None
            ),
            "body has the key `$serde_json::private::RawValue`, which serde_json reserves for its own use"
        );
    }

    #[test]
    fn fields_over_their_length_are_refused() {
        let long_id = "a".repeat(MAX_ACCOUNT_ID_CHARS + 1);
        let body = format!(r#"{{"account_id":"{long_id}","idempotency_key":"k"}}"#);
        assert!(detail(body.as_bytes(), None).contains("over the limit of 128"));
        let long_key = "k".repeat(MAX_KEY_CHARS + 1);
        let body = format!(r#"{{"account_id":"a","idempotency_key":"{long_key}"}}"#);
        assert!(detail(body.as_bytes(), None).contains("over the limit of 255"));
        let max_key = "k".repeat(MAX_KEY_CHARS);
        let body = format!(r#"{{"account_id":"a","idempotency_key":"{max_key}"}}"#);
        assert!(Job::parse(body.as_bytes(), None, LIMIT).is_ok());
    }

    #[test]
    fn a_body_over_the_size_limit_is_refused() {
        let body = format!(
            r#"{{"account_id":"a","idempotency_key":"k","pad":"{}"}}"#,
            "x".repeat(100)
        );
        let err = Job::parse(body.as_bytes(), None, 50).expect_err("too big");
        assert!(err.0.contains("over the limit of 50 bytes"), "{}", err.0);
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics_and_every_refusal_has_a_detail(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            message_id in proptest::option::of(".{0,300}"),
        ) {
            if let Err(InvalidJob(detail)) = Job::parse(&body, message_id.as_deref(), 256) {
                proptest::prop_assert!(!detail.is_empty());
            }
        }

        #[test]
        fn json_objects_with_valid_fields_always_parse(
            account in "[a-zA-Z0-9_.-]{1,128}",
            key in "[ -~]{1,255}",
            extra in ".{0,50}",
        ) {
            let body = serde_json::json!({
                "account_id": account,
                "idempotency_key": key,
                "extra": extra,
            })
            .to_string();
            let job = Job::parse(body.as_bytes(), None, 64 * 1024);
            proptest::prop_assert!(job.is_ok(), "{:?}", job);
        }
    }
}
