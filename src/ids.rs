//! Validated identifiers, shared by every module: [`UserId`] and [`ServerName`] end up as path
//! components and SQL values, so they are checked against a strict pattern and rejected, never
//! rewritten; [`SessionKey`] is the pair the pool and the token refresher are keyed by.
//!
//! A leaf module: it depends on nothing else in the crate, so `config`, `store`, `oauth` and
//! `actors` can all use it without depending on each other.

use std::fmt;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} characters")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} must start with a letter or digit")]
    BadStart { kind: &'static str },
    #[error("{kind} may only contain {allowed}")]
    BadChar {
        kind: &'static str,
        allowed: &'static str,
    },
}

fn check(
    value: &str,
    kind: &'static str,
    max: usize,
    allowed: &'static str,
    is_allowed: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    let first = value.chars().next().ok_or(IdError::Empty { kind })?;
    if value.chars().count() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadStart { kind });
    }
    if !value.chars().all(is_allowed) {
        return Err(IdError::BadChar { kind, allowed });
    }
    Ok(())
}

/// A user of the chat application, e.g. a UUID or an email-like id.
///
/// Pattern: `[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}`: never `/`, never a leading dot, so it is one
/// safe path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(value: &str) -> Result<UserId, IdError> {
        check(
            value,
            "user id",
            Self::MAX_LEN,
            "ASCII letters, digits and . _ @ + -",
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-'),
        )?;
        Ok(UserId(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name of a configured MCP server.
///
/// Pattern: `[a-z0-9][a-z0-9_-]{0,99}`: also valid inside an LLM function name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ServerName(String);

impl ServerName {
    pub const MAX_LEN: usize = 100;

    pub fn parse(value: &str) -> Result<ServerName, IdError> {
        check(
            value,
            "server name",
            Self::MAX_LEN,
            "lowercase ASCII letters, digits, _ and -",
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'),
        )?;
        Ok(ServerName(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    )*};
}
display_as_str!(UserId, ServerName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_traversal_and_malformed_ids() {
        for bad in [
            "", "..", ".", "../x", "a/b", "a\0b", "a\nb", "-a", " a", "a b", "é", "a\\b",
        ] {
            assert!(UserId::parse(bad).is_err(), "user id {bad:?} accepted");
            assert!(ServerName::parse(bad).is_err(), "server {bad:?} accepted");
        }
        assert!(UserId::parse(&"a".repeat(129)).is_err());
        assert!(ServerName::parse(&"a".repeat(101)).is_err());
        assert!(ServerName::parse("Demo").is_err());
    }

    #[test]
    fn accepts_typical_ids() {
        for good in [
            "0b6f3c1e-5d2a-4c55-9a8e-2f1f9b1f0c11",
            "alice@example.com",
            "a-b",
            "a",
        ] {
            UserId::parse(good).unwrap();
        }
        assert_eq!(UserId::parse(&"a".repeat(128)).unwrap().as_str().len(), 128);
        for good in ["google-analytics", "demo", "time_2"] {
            ServerName::parse(good).unwrap();
        }
        assert_eq!(
            ServerName::parse(&"a".repeat(100)).unwrap().as_str().len(),
            100
        );
    }
}

/// One (user, server) pair: the pool keeps one live session per key, and the token refresher
/// runs one refresh at a time per key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub user: UserId,
    pub server: ServerName,
}

impl SessionKey {
    pub fn new(user: &UserId, server: &ServerName) -> SessionKey {
        SessionKey {
            user: user.clone(),
            server: server.clone(),
        }
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.user, self.server)
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
