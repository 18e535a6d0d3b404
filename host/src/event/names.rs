//! Names that travel as text but must not be mixed up: a stream's name and an event's id.
//! Each is a newtype over its text, with the check that makes it valid; the log refuses an
//! invalid one at append, so a name the log returns is valid.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use super::{InvalidName, validate_id, validate_stream};

macro_rules! text_name {
    ($(#[$doc:meta])* $name:ident, $check:path, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Checks `text` as ", $what, ".")]
            pub fn new(text: impl Into<String>) -> Result<Self, InvalidName> {
                let text = text.into();
                $check(&text)?;
                Ok(Self(text))
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// Text taken as it is: the log checks it at append.
        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                Self(text.to_owned())
            }
        }

        /// Text taken as it is: the log checks it at append.
        impl From<String> for $name {
            fn from(text: String) -> Self {
                Self(text)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> Self {
                name.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

text_name!(
    /// A stream's name: 1 to 255 bytes with no control characters.
    StreamName,
    validate_stream,
    "a stream name"
);

text_name!(
    /// An event's id: a UUIDv7 the host chose or the client's idempotency key (1 to 128
    /// bytes with no control characters). Unique across the log.
    EventId,
    validate_id,
    "an event id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_compare_with_text() {
        assert!(StreamName::new("orders-1").is_ok());
        assert!(StreamName::new("").is_err());
        assert!(StreamName::new("a\nb").is_err());
        assert!(EventId::new("x".repeat(129)).is_err());
        let s = StreamName::new("orders-1").unwrap();
        assert_eq!(s, "orders-1");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"orders-1\"");
        let back: StreamName = serde_json::from_str("\"orders-1\"").unwrap();
        assert_eq!(back, s);
    }
}
