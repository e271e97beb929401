//! The two identifiers every rule keys on, each validated once, in its
//! constructor: a value of these types is known to be good everywhere
//! downstream (jobs, reports, the store, the API).

use std::borrow::Borrow;
use std::fmt;

/// Longest `account_id`, in characters.
pub const MAX_ACCOUNT_ID_CHARS: usize = 128;
/// Longest idempotency key, in characters. It also travels as the AMQP
/// `message_id`, a short string of at most 255 bytes.
pub const MAX_KEY_CHARS: usize = 255;
/// What an AMQP short string (`message_id`) can carry.
const MAX_BYTES: usize = 255;

/// Why a value is not a valid identifier; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The field's name in jobs, reports and error messages.
            pub const FIELD: &'static str = $field;

            /// # Errors
            /// [`InvalidId`] naming the field and what is wrong with it.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check_text($field, &value, $max)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by the type can be probed with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

identifier!(
    /// An account's id: 1 to 128 printable characters.
    AccountId,
    "account_id",
    MAX_ACCOUNT_ID_CHARS
);

identifier!(
    /// A job's idempotency key: 1 to 255 printable characters, at most 255
    /// bytes, unique per account for one intended send.
    IdempotencyKey,
    "idempotency_key",
    MAX_KEY_CHARS
);

/// What a charge is recorded under: one account's one intended send.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub account_id: AccountId,
    pub idempotency_key: IdempotencyKey,
}

impl JobKey {
    pub fn new(account_id: &AccountId, idempotency_key: &IdempotencyKey) -> Self {
        JobKey {
            account_id: account_id.clone(),
            idempotency_key: idempotency_key.clone(),
        }
    }
}

/// 1 to `max` printable characters: no control characters, and within the
/// 255 bytes an AMQP short string can carry.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), InvalidId> {
    let rule = format!("1 to {max} printable characters, at most {MAX_BYTES} bytes");
    let chars = value.chars().count();
    if chars == 0 {
        return Err(InvalidId(format!("`{field}` is empty; it must be {rule}")));
    }
    if chars > max || value.len() > MAX_BYTES {
        return Err(InvalidId(format!(
            "`{field}` is {chars} characters ({} bytes), over the limit of {max} characters; it must be {rule}",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(InvalidId(format!(
            "`{field}` contains the control character {c:?}; it must be {rule}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_compared_as_sent_without_unicode_normalisation() {
        let nfc = AccountId::parse("caf\u{e9}").expect("valid");
        let nfd = AccountId::parse("cafe\u{301}").expect("valid");
        assert_ne!(nfc, nfd, "two look-alike ids are two accounts");
        assert_eq!(nfd.as_str(), "cafe\u{301}", "kept exactly as sent");
    }

    #[test]
    fn identifiers_are_printable_and_bounded() {
        assert!(AccountId::parse("acme").is_ok());
        assert!(AccountId::parse("").expect_err("empty").0.contains("empty"));
        assert!(
            AccountId::parse("a".repeat(129))
                .expect_err("long")
                .0
                .contains("over the limit of 128")
        );
        assert!(AccountId::parse("a".repeat(128)).is_ok());
        assert!(
            IdempotencyKey::parse("k\n")
                .expect_err("control")
                .0
                .contains("control character")
        );
        assert!(IdempotencyKey::parse("k".repeat(255)).is_ok());
        // 128 characters of two bytes each fit the character limit but not
        // the 255 bytes of a message_id.
        assert!(IdempotencyKey::parse("é".repeat(128)).is_err());
    }

    #[test]
    fn a_map_keyed_by_id_is_probed_with_a_str() {
        let map = std::collections::HashMap::from([(AccountId::parse("a").expect("valid"), 1)]);
        assert_eq!(map.get("a"), Some(&1));
    }
}
