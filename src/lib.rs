//! mailhook: a Kubernetes operator that turns mailbox activity into signed, reliable
//! webhook deliveries. `main.rs` only parses the command line and calls into here.

pub mod admin;
pub mod api;
pub mod app;
pub mod archive;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod controller;
pub mod crypto;
pub mod delivery;
pub mod event;
pub mod handles;
pub mod history;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod panics;
pub mod replica;
pub mod route;
pub mod serve;
pub mod source;
pub mod store;
pub mod telemetry;

/// `err` and its sources, `: `-separated: what a log line or an answer should say about an
/// error whose Display names only the outermost step. A source whose text the error's own
/// already ends with (one that shows its cause as well as keeping it) is not said twice.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}

/// The module graph this crate keeps (docs/development.md, "Layout"): checked over the
/// sources, so an import that breaks it fails `cargo test`, not a review.
#[cfg(test)]
mod layout {
    use std::collections::{BTreeMap, BTreeSet};

    /// Adapters: they may use the core and `handles`, never each other (`replica` adapts
    /// the core to several processes sharing one store).
    const ADAPTERS: [&str; 5] = ["source", "admin", "history", "controller", "replica"];
    /// The core: may use the leaves and each other, never an adapter.
    const CORE: [&str; 8] = [
        "event", "audit", "route", "store", "delivery", "archive", "panics", "auth",
    ];
    /// Modules that use nothing else of the crate.
    const LEAVES: [&str; 8] = [
        "handles",
        "lifecycle",
        "crypto",
        "telemetry",
        "api",
        "metrics",
        "serve",
        "memory",
    ];
    /// Wiring and the command line may use anything.
    const TOP: [&str; 4] = ["app", "cli", "main", "lib"];

    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let rel = path.strip_prefix(&root).expect("under src");
                let module = rel
                    .components()
                    .next()
                    .and_then(|c| c.as_os_str().to_str())
                    .map(|s| s.trim_end_matches(".rs").to_string())
                    .expect("a module");
                let text = std::fs::read_to_string(&path).expect("read source");
                let deps = graph.entry(module.clone()).or_default();
                // Code only: comments may name modules freely.
                let code: String = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let ident = |s: &str| -> String {
                    s.trim_start()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect()
                };
                for (i, _) in code.match_indices("crate::") {
                    let rest = code.get(i + "crate::".len()..).unwrap_or_default();
                    // `crate::{a, b::c}` names several modules.
                    let names: Vec<String> = match rest.strip_prefix('{') {
                        Some(group) => group
                            .split('}')
                            .next()
                            .unwrap_or_default()
                            .split(',')
                            .map(ident)
                            .collect(),
                        None => vec![ident(rest)],
                    };
                    for name in names {
                        if !name.is_empty() && name != module && name != "error_chain" {
                            deps.insert(name);
                        }
                    }
                }
                assert!(
                    !code.contains(concat!("use crate", " as ")),
                    "{}: an alias of `crate` hides imports from this check",
                    rel.display()
                );
            }
        }
        graph
    }

    #[test]
    fn every_module_has_a_place_in_the_layout() {
        let unplaced: Vec<String> = imports()
            .into_keys()
            .filter(|m| {
                ![&ADAPTERS[..], &CORE[..], &LEAVES[..], &TOP[..]]
                    .iter()
                    .any(|kind| kind.contains(&m.as_str()))
            })
            .collect();
        assert!(
            unplaced.is_empty(),
            "modules with no place in the layout (add each to ADAPTERS, CORE, LEAVES or TOP, and to docs/development.md): {unplaced:?}"
        );
    }

    #[test]
    fn dependencies_point_one_way() {
        let mut broken = Vec::new();
        for (module, deps) in imports() {
            if TOP.contains(&module.as_str()) {
                continue;
            }
            for dep in &deps {
                let adapter_to_adapter = ADAPTERS.contains(&module.as_str()) && ADAPTERS.contains(&dep.as_str());
                let core_to_adapter = !ADAPTERS.contains(&module.as_str()) && ADAPTERS.contains(&dep.as_str());
                let leaf_uses = LEAVES.contains(&module.as_str());
                let uses_top = TOP.contains(&dep.as_str());
                if adapter_to_adapter || core_to_adapter || leaf_uses || uses_top {
                    broken.push(format!("{module} -> {dep}"));
                }
            }
        }
        assert!(broken.is_empty(), "imports against the layout: {broken:?}");
    }

    /// Start-up opens the store through `store::open` and hands a shared one's session to
    /// `replica`: which engine runs is not `app`'s business.
    #[test]
    fn app_names_no_store_engine() {
        let app = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/app.rs"))
            .expect("read app.rs");
        let named: Vec<&str> = [
            "store::postgres",
            "tokio_postgres",
            "DurableStore",
            "PagedStore",
            "redb",
            "Session",
        ]
        .into_iter()
        .filter(|name| app.contains(name))
        .collect();
        assert!(named.is_empty(), "app.rs names store engine types: {named:?}");
    }
}
