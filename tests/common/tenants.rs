//! The routing table of a large tenant-per-namespace installation, shared by the routing
//! benchmark and the allocation budgets: 100 namespaces × 100 MailboxFilters (10,000),
//! 10 subscriptions per namespace each using 10 of its filters (1,000).

use std::sync::Arc;

use mailhook::api::{EventType, MailboxFilterSpec};
use mailhook::route::{CompiledFilter, FilterEntry, Grants, RoutingTable, SubscriptionRoute};

/// Which domains the filters name in `mailboxes`.
#[allow(dead_code, reason = "each user takes the tables it needs")]
#[derive(Clone, Copy, PartialEq)]
pub enum Domains {
    /// `*@t<ns>-<f>.example`: a domain of its own per filter (an event meets one).
    PerFilter,
    /// `*@t<ns>.example`: the tenant's one domain (an event meets 100).
    PerTenant,
    /// None: subject keywords only (every filter is evaluated).
    None,
}

pub fn table(domains: Domains) -> RoutingTable {
    let mut filters = Vec::new();
    let mut routes = Vec::new();
    for ns in 0..100 {
        let namespace = format!("tenant-{ns}");
        for f in 0..100 {
            let spec = match domains {
                Domains::PerFilter => {
                    serde_json::json!({"mailboxes": [format!("*@t{ns}-{f}.example")], "subject": {"keywords": [format!("project-{f}")]}})
                }
                Domains::PerTenant => {
                    serde_json::json!({"mailboxes": [format!("*@t{ns}.example")], "subject": {"keywords": [format!("project-{f}")]}})
                }
                Domains::None => serde_json::json!({"subject": {"keywords": [format!("project-{ns}-{f}")]}}),
            };
            let spec: MailboxFilterSpec = serde_json::from_value(spec).expect("filter");
            filters.push(FilterEntry {
                namespace: namespace.clone(),
                name: format!("f{f}"),
                compiled: Arc::new(CompiledFilter::compile(&spec).expect("compiles")),
            });
        }
        for s in 0..10 {
            routes.push(SubscriptionRoute {
                uid: format!("uid-{ns}-{s}"),
                namespace: namespace.clone(),
                event_types: vec![EventType::MessageReceived],
                filters: (0..10).map(|k| format!("f{}", s * 10 + k)).collect(),
            });
        }
    }
    let namespaces: Vec<String> = routes.iter().map(|r| r.namespace.clone()).collect();
    let grants = Grants::unrestricted(namespaces.iter().map(String::as_str));
    RoutingTable::build(routes, filters, grants)
}
