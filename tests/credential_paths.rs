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

/// Arbitrary strings, biased towards the characters that make paths dangerous.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._@+/\\\\-]{0,12}",
        "(\\.\\.|/|-|\\.|a|b|\u{0}|\n){0,6}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mapping_is_injective_and_confined(
        u1 in id_like(), s1 in id_like(), u2 in id_like(), s2 in id_like()
    ) {
        let files = files();
        let (Ok(user1), Ok(server1)) = (UserId::parse(&u1), ServerName::parse(&s1)) else {
            return Ok(());
        };
        let p1 = files.path_for(&user1, &server1);
        prop_assert!(confined(files.root(), &p1), "{p1:?} escapes the root");
        if let (Ok(user2), Ok(server2)) = (UserId::parse(&u2), ServerName::parse(&s2)) {
            let p2 = files.path_for(&user2, &server2);
            prop_assert_eq!(p1 == p2, user1 == user2 && server1 == server2);
        }
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
