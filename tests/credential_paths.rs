//! The (user, server) → credentials file mapping is injective and never leaves the root.

use std::path::{Component, Path};

use mcp_pool::store::{CredentialFiles, ServerName, UserId};
use proptest::prelude::*;

fn files() -> CredentialFiles {
    // path_for is pure; the root only has to exist for `open`.
    CredentialFiles::open(std::env::temp_dir().join("mcp-pool-proptest-root")).unwrap()
}

fn confined(root: &Path, path: &Path) -> bool {
    let Ok(rest) = path.strip_prefix(root) else {
        return false;
    };
    // <user>/<server>/credentials.json
    rest.components().count() == 3 && rest.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Arbitrary strings, biased towards the characters that make paths dangerous (for the
/// rejection test).
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._@+/\\\\-]{0,12}",
        "(\\.\\.|/|-|\\.|a|b|\u{0}|\n){0,6}",
        any::<String>(),
    ]
}

/// Valid user ids: the whole pattern, or a tiny alphabet where different ids that could
/// collide once joined (`a-b`/`c` and `a`/`b-c`) are frequent.
fn user_id() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}", "[ab][ab._@+-]{0,4}",]
}

/// Valid server names, likewise.
fn server_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9][a-z0-9_-]{0,99}", "[ab][ab_-]{0,4}"]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every case reaches the injectivity check: both pairs are valid by construction, and
    /// `share` makes the second pair equal to the first, or equal in one part only, often.
    #[test]
    fn mapping_is_injective_and_confined(
        u1 in user_id(), s1 in server_name(), u2 in user_id(), s2 in server_name(),
        share in 0u8..4
    ) {
        let files = files();
        let (u2, s2) = match share {
            0 => (u1.clone(), s1.clone()),
            1 => (u1.clone(), s2),
            2 => (u2, s1.clone()),
            _ => (u2, s2),
        };
        let pair = |u: &str, s: &str| {
            (UserId::parse(u).expect("valid user id"), ServerName::parse(s).expect("valid server name"))
        };
        let (a, b) = (pair(&u1, &s1), pair(&u2, &s2));
        let (p1, p2) = (files.path_for(&a.0, &a.1), files.path_for(&b.0, &b.1));
        prop_assert!(confined(files.root(), &p1), "{p1:?} escapes the root");
        prop_assert!(confined(files.root(), &p2), "{p2:?} escapes the root");
        prop_assert_eq!(p1 == p2, a == b);
    }

    /// Short ids over a tiny alphabet, so that splits like ("a-b", "c") / ("a", "b-c") occur.
    #[test]
    fn mapping_is_injective_on_valid_ids(
        u1 in "[ab][ab-]{0,3}", s1 in "[ab][ab-]{0,3}", u2 in "[ab][ab-]{0,3}", s2 in "[ab][ab-]{0,3}"
    ) {
        let files = files();
        let pair = |u: &str, s: &str| (UserId::parse(u).unwrap(), ServerName::parse(s).unwrap());
        let (a, b) = (pair(&u1, &s1), pair(&u2, &s2));
        let (p1, p2) = (files.path_for(&a.0, &a.1), files.path_for(&b.0, &b.1));
        prop_assert!(confined(files.root(), &p1));
        prop_assert_eq!(p1 == p2, a == b);
    }

    #[test]
    fn dangerous_identifiers_are_rejected(id in id_like()) {
        let dangerous = id.is_empty()
            || id.contains('/')
            || id.contains('\0')
            || id.starts_with('.')
            || id.chars().any(char::is_control);
        if dangerous {
            prop_assert!(UserId::parse(&id).is_err());
            prop_assert!(ServerName::parse(&id).is_err());
        }
    }
}

#[test]
fn the_design_collision_pair_gets_two_files() {
    let files = files();
    let first = files.path_for(
        &UserId::parse("a-b").unwrap(),
        &ServerName::parse("c").unwrap(),
    );
    let second = files.path_for(
        &UserId::parse("a").unwrap(),
        &ServerName::parse("b-c").unwrap(),
    );
    assert_ne!(first, second);
}
