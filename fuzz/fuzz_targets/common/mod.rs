//! What several fuzz targets share (each includes it with `mod common;`).
#![allow(dead_code)]

use std::sync::Arc;

use mailhook::route::{CompiledFilter, FilterEntry, Grants, RoutingTable, SubscriptionRoute};

/// Aborts on any panic outside mail-parser, so libFuzzer records the input: mail-parser
/// 0.11 panics on some malformed multiparts, which `journal::parse` catches and refuses
/// (tests/fixtures/journal/fuzz-mail-parser-panic.eml); every other panic is a finding, even
/// one the code under test catches.
pub fn abort_on_our_panics() {
    std::panic::set_hook(Box::new(|info| {
        let upstream = info.location().is_some_and(|l| l.file().contains("mail-parser"));
        if !upstream {
            eprintln!("{info}");
            std::process::abort();
        }
    }));
}

/// A routing table with one subscription ("sub" in namespace "ns") using one filter ("f").
pub fn one_route(filter: Arc<CompiledFilter>) -> RoutingTable {
    RoutingTable::build(
        vec![SubscriptionRoute {
            uid: "sub".into(),
            namespace: "ns".into(),
            event_types: vec![],
            filters: vec!["f".into()],
        }],
        vec![FilterEntry {
            namespace: "ns".into(),
            name: "f".into(),
            compiled: filter,
        }],
        Grants::unrestricted(["ns"]),
    )
}
