//! One naming of upstream tools for every caller that sees several servers at once:
//! `/v1/chat` (function names for the model) and `/mcp` (tool names for MCP clients).
//!
//! Names must match `^[a-zA-Z0-9_-]{1,64}$` (the model APIs' rule, which MCP clients accept
//! too) and be unique across every server of one user. The name is `{server}__{tool}` when
//! that is already valid; otherwise invalid characters become `_` and the name is cut to 64
//! characters. When that (or a clash such as server `a__b` + tool `c` against server `a` +
//! tool `b__c`) would collide with a name already taken, the name ends in `_` and 8 hex digits
//! of a hash of the original (server, tool), cut so that the whole stays within 64 characters.
//! Valid names are claimed first, so a clean name never changes because some other tool
//! needed rewriting; the same lists in the same order always give the same names.
//! `/mcp` names prompts the same way ([`namespace_by`]).
//!
//! Resources are found by URI, not by name, so `/mcp` rewrites their URIs instead
//! ([`resource_uri`], [`resource_route`]): `mcp-pool://{server}/{original}`, the original URI
//! appended as it is. Stripping the prefix gives back any original byte for byte, and because
//! the prefix holds no template expression, the same rule maps a resource template: a client
//! that fills `mcp-pool://{server}/demo://item/{id}` gets exactly the prefix plus what filling
//! the server's own `demo://item/{id}` gives, whatever the values and their escaping. (Percent-
//! encoding the original would not survive filling: a value the client escapes would be
//! unescaped on the way back.) The URI names a server, never a user: it is resolved among the
//! caller's own servers, so a URI copied from another user leads, at most, to the caller's own
//! session of that server.

use std::collections::HashSet;

use rmcp::model::Tool;

use crate::ids::ServerName;

/// Longest tool name handed out.
pub const MAX_TOOL_NAME: usize = 64;
/// Between the server and the tool in a name.
const SEPARATOR: &str = "__";
/// `_` and 8 hex digits.
const HASH_SUFFIX_LEN: usize = 9;

/// Where a namespaced name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolRoute {
    pub server: ServerName,
    /// The MCP tool name, as the server spells it.
    pub tool: String,
}

/// One upstream tool under its namespaced name.
#[derive(Debug, Clone)]
pub struct NamedTool<'a> {
    pub name: String,
    pub server: &'a ServerName,
    pub tool: &'a Tool,
}

/// One upstream item of any kind (a prompt, ...) under its namespaced name.
#[derive(Debug, Clone)]
pub struct Named<'a, T> {
    /// The name `/mcp` offers it under.
    pub name: String,
    /// The server it comes from.
    pub server: &'a ServerName,
    /// The item as the server listed it.
    pub item: &'a T,
}

/// Where a namespaced prompt name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The server that offers it.
    pub server: ServerName,
    /// The name as the server spells it.
    pub name: String,
}

/// Names every tool of `servers`, in the order given. A tool listed twice by one server is
/// named (and offered) once.
pub fn namespace<'a>(
    servers: impl IntoIterator<Item = (&'a ServerName, &'a [Tool])>,
) -> Vec<NamedTool<'a>> {
    namespace_by(servers, |tool| tool.name.as_ref())
        .into_iter()
        .map(|named| NamedTool {
            name: named.name,
            server: named.server,
            tool: named.item,
        })
        .collect()
}

/// Names every item of `servers` as [`namespace`] names tools, `name_of` giving an item's
/// upstream name.
pub fn namespace_by<'a, T>(
    servers: impl IntoIterator<Item = (&'a ServerName, &'a [T])>,
    name_of: impl Fn(&T) -> &str,
) -> Vec<Named<'a, T>> {
    let mut seen = HashSet::new();
    let items: Vec<(&ServerName, &T)> = servers
        .into_iter()
        .flat_map(|(server, items)| items.iter().map(move |item| (server, item)))
        .filter(|(server, item)| seen.insert((server.as_str(), name_of(item).to_owned())))
        .collect();
    let names = unique_names(
        items
            .iter()
            .map(|(server, item)| (server.as_str(), name_of(item))),
    );
    items
        .into_iter()
        .zip(names)
        .map(|((server, item), name)| Named { name, server, item })
        .collect()
}

/// The scheme of the resource URIs `/mcp` hands out.
pub const RESOURCE_SCHEME: &str = "mcp-pool";

/// The URI under which `/mcp` offers `server`'s resource `uri` (or resource template: see the
/// module docs).
pub fn resource_uri(server: &ServerName, uri: &str) -> String {
    format!("{RESOURCE_SCHEME}://{server}/{uri}")
}

/// The server and original URI of a URI from [`resource_uri`]; `None` for any other URI.
pub fn resource_route(uri: &str) -> Option<(ServerName, &str)> {
    let rest = uri.strip_prefix(RESOURCE_SCHEME)?.strip_prefix("://")?;
    let (server, original) = rest.split_once('/')?;
    Some((ServerName::parse(server).ok()?, original))
}

/// Whether `name` is acceptable to the model APIs (and so to MCP clients).
pub fn is_valid_tool_name(name: &str) -> bool {
    (1..=MAX_TOOL_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Unique, valid function names for (server, tool) pairs, in the same order.
pub fn unique_names<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    let pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
    let mut names: Vec<Option<String>> = vec![None; pairs.len()];
    let mut taken = HashSet::new();
    // Pass 1: names that are valid as they are.
    for (i, (server, tool)) in pairs.iter().enumerate() {
        let plain = format!("{server}{SEPARATOR}{tool}");
        if is_valid_tool_name(&plain) && taken.insert(plain.clone()) {
            names[i] = Some(plain);
        }
    }
    // Pass 2: the rest, sanitized, with a hash when sanitizing collides.
    for (i, (server, tool)) in pairs.iter().enumerate() {
        if names[i].is_some() {
            continue;
        }
        let sanitized = sanitize(&format!("{server}{SEPARATOR}{tool}"));
        let name = if taken.contains(&sanitized) {
            (0u32..)
                .map(|attempt| with_hash(&sanitized, server, tool, attempt))
                .find(|candidate| !taken.contains(candidate))
                .unwrap_or_default()
        } else {
            sanitized
        };
        taken.insert(name.clone());
        names[i] = Some(name);
    }
    names.into_iter().map(Option::unwrap_or_default).collect()
}

/// Invalid characters become `_`, cut to [`MAX_TOOL_NAME`] (all ASCII by then).
fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(MAX_TOOL_NAME);
    if out.is_empty() {
        out.push('_');
    }
    out
}

fn with_hash(sanitized: &str, server: &str, tool: &str, attempt: u32) -> String {
    let mut base = sanitized.to_owned();
    base.truncate(MAX_TOOL_NAME - HASH_SUFFIX_LEN);
    format!("{base}_{:08x}", fnv1a(server, tool, attempt) as u32)
}

/// FNV-1a over the original names: stable across runs and platforms, no dependency.
fn fnv1a(server: &str, tool: &str, attempt: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = server
        .bytes()
        .chain([0])
        .chain(tool.bytes())
        .chain(attempt.to_le_bytes());
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Fold the high half in, so the 32 bits kept depend on every byte.
    hash ^ (hash >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names_are_server_double_underscore_tool() {
        let names = unique_names([
            ("demo", "echo"),
            ("demo2", "add"),
            ("google-analytics", "run_report"),
        ]);
        assert_eq!(
            names,
            ["demo__echo", "demo2__add", "google-analytics__run_report"]
        );
    }

    #[test]
    fn invalid_characters_are_replaced() {
        let names = unique_names([
            ("demo", "get.time"),
            ("demo", "files/read"),
            ("demo", "résumé"),
        ]);
        assert_eq!(
            names,
            ["demo__get_time", "demo__files_read", "demo__r_sum_"]
        );
        assert!(names.iter().all(|n| is_valid_tool_name(n)));
    }

    #[test]
    fn sanitizing_collisions_get_distinct_hash_suffixes() {
        let names = unique_names([
            ("demo", "get.time"),
            ("demo", "get_time"),
            ("demo", "get time"),
            ("demo", "get/time"),
        ]);
        // The valid one keeps its name although it comes second.
        assert_eq!(names[1], "demo__get_time");
        for name in [&names[0], &names[2], &names[3]] {
            assert!(name.starts_with("demo__get_time_"), "{name}");
            assert_eq!(name.len(), "demo__get_time_".len() + 8, "{name}");
        }
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 4, "{names:?}");
        assert!(names.iter().all(|n| is_valid_tool_name(n)));
        // Stable: the same input gives the same names.
        assert_eq!(
            names,
            unique_names([
                ("demo", "get.time"),
                ("demo", "get_time"),
                ("demo", "get time"),
                ("demo", "get/time"),
            ])
        );
    }

    #[test]
    fn separator_clashes_between_servers_are_resolved() {
        let names = unique_names([("a__b", "c"), ("a", "b__c")]);
        assert_eq!(names[0], "a__b__c");
        assert_ne!(names[1], names[0]);
        assert!(names[1].starts_with("a__b__c_"), "{}", names[1]);
        assert!(is_valid_tool_name(&names[1]));
    }

    #[test]
    fn long_names_are_cut_to_64_and_stay_unique() {
        let server = "analytics";
        let long_a = format!("{}_a", "x".repeat(80));
        let long_b = format!("{}_b", "x".repeat(80));
        let exact = "y".repeat(64 - "analytics__".len());
        let names = unique_names([
            (server, long_a.as_str()),
            (server, long_b.as_str()),
            (server, exact.as_str()),
        ]);
        // The first keeps the plain cut; the second, whose cut is the same, gets a hash.
        assert_eq!(names[0].len(), 64);
        assert_eq!(names[0], format!("analytics__{}", "x".repeat(53)));
        assert_eq!(names[1].len(), 64);
        assert_ne!(names[0], names[1]);
        assert!(names[1].starts_with("analytics__xxx"));
        // Exactly 64 characters is valid and kept.
        assert_eq!(names[2], format!("analytics__{exact}"));
        assert!(names.iter().all(|n| is_valid_tool_name(n)), "{names:?}");
    }

    #[test]
    fn resource_uris_round_trip_any_original() {
        let server = ServerName::parse("everything").unwrap();
        for original in [
            "demo://resource/static/document/architecture.md",
            "file:///home/a%20b/c.txt?x=1#frag",
            "https://example.com/a/../b",
            "",
            "no scheme at all",
            "mcp-pool://other/nested",
            "résumé://ü/{id}",
        ] {
            let mapped = resource_uri(&server, original);
            assert!(mapped.starts_with("mcp-pool://everything/"), "{mapped}");
            assert_eq!(resource_route(&mapped), Some((server.clone(), original)));
        }
    }

    #[test]
    fn filling_a_mapped_template_fills_the_original() {
        let server = ServerName::parse("everything").unwrap();
        let template = resource_uri(&server, "demo://resource/dynamic/text/{resourceId}");
        // What any RFC 6570 client does with a simple expression, escaping included.
        let fill = |template: &str, value: &str| template.replace("{resourceId}", value);
        for value in ["1", "a%2Fb", "x%20y"] {
            let filled = fill(&template, value);
            let (routed, original) = resource_route(&filled).unwrap();
            assert_eq!(routed, server);
            assert_eq!(
                original,
                fill("demo://resource/dynamic/text/{resourceId}", value)
            );
        }
    }

    #[test]
    fn other_uris_lead_nowhere() {
        for uri in [
            "demo://resource/static/document/architecture.md",
            "mcp-pool://",
            "mcp-pool://everything",
            "mcp-pool://Everything/x",
            "mcp-pool://../x",
            "mcp-pool:everything/x",
            "MCP-POOL://everything/x",
        ] {
            assert_eq!(resource_route(uri), None, "{uri}");
        }
    }

    #[test]
    fn prompts_are_named_like_tools() {
        let (a, b) = (
            ServerName::parse("everything").unwrap(),
            ServerName::parse("demo").unwrap(),
        );
        let prompts_a = ["simple-prompt", "args prompt", "simple-prompt"];
        let prompts_b = ["simple-prompt"];
        let named = namespace_by([(&a, &prompts_a[..]), (&b, &prompts_b[..])], |p| *p);
        let names: Vec<&str> = named.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "everything__simple-prompt",
                "everything__args_prompt",
                "demo__simple-prompt"
            ]
        );
        assert_eq!(*named[1].item, "args prompt");
        assert_eq!(named[2].server, &b);
    }

    #[test]
    fn validity_of_function_names() {
        assert!(is_valid_tool_name("a"));
        assert!(is_valid_tool_name("A-z_09"));
        assert!(!is_valid_tool_name(""));
        assert!(!is_valid_tool_name("a.b"));
        assert!(!is_valid_tool_name(&"a".repeat(65)));
        assert!(is_valid_tool_name(&"a".repeat(64)));
    }
}
