//! The routing table: every valid subscription and the filters it uses, compiled once per
//! change and swapped in whole. Routing an event touches only the subscriptions indexed
//! under its type, evaluates each filter at most once, and skips the filters that can only
//! match mailboxes of other domains (an index by the domains of `mailboxes` patterns), so
//! an installation with thousands of per-tenant filters pays for the few that concern the
//! event.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::api::EventType;
use crate::event::{Flag, MailboxEvent, Source};

use super::CompiledFilter;
use super::grant::{GrantMemo, Grants};

/// A subscription as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRoute {
    pub uid: String,
    pub namespace: String,
    /// Empty: any type (then filters decide).
    pub event_types: Vec<EventType>,
    /// Names of MailboxFilters in `namespace`; empty: no filter condition.
    pub filters: Vec<String>,
}

/// A compiled MailboxFilter as the router sees it.
#[derive(Debug, Clone)]
pub struct FilterEntry {
    pub namespace: String,
    pub name: String,
    pub compiled: Arc<CompiledFilter>,
}

struct Route {
    uid: String,
    namespace: String,
    /// Index of `namespace` in the table's `namespaces`.
    ns: u32,
    event_types: Vec<EventType>,
    filters: Vec<usize>,
}

/// One subscription an event goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub subscription: String,
    /// The subscription's filters that matched, by name.
    pub matched_filters: Vec<String>,
}

/// The outcome of routing one event.
#[derive(Debug, Default)]
pub struct Routed {
    pub targets: Vec<Target>,
    /// `compliance.flagged` events derived from the event (one per namespace whose
    /// filters flagged it); route them too.
    pub flagged: Vec<MailboxEvent>,
    /// (namespace, name) of every filter that matched, for match counters.
    pub matched: Vec<(String, String)>,
}

#[derive(Default)]
pub struct RoutingTable {
    routes: Vec<Route>,
    filters: Vec<FilterEntry>,
    by_type: [Vec<usize>; EventType::ALL.len()],
    flagging: Vec<usize>,
    /// Per filter: (route, position in its filter list) of every route that uses it.
    users: Vec<Vec<(usize, usize)>>,
    /// The filters routes use, by the domains of their mailboxes.
    used: DomainIndex,
    /// The filters that flag, likewise.
    flags: DomainIndex,
    /// Per event type, the routes that take every event of it (no filters).
    unfiltered_by_type: [Vec<usize>; EventType::ALL.len()],
    /// What each namespace may see: nothing outside a grant is routed to it or counted
    /// by its filters.
    grants: Grants,
    /// Every namespace of a route or filter, once; routes and filters refer to them by index.
    namespaces: Vec<String>,
    /// Per filter, the index of its namespace.
    filter_ns: Vec<u32>,
}

/// Filters by the literal domains their `mailboxes` patterns name: only those of an event's
/// mailbox domain, and those that name none, can match it.
#[derive(Default)]
struct DomainIndex {
    by_domain: HashMap<String, Vec<usize>>,
    /// Filters any mailbox may match.
    unindexed: Vec<usize>,
    /// Every filter, for a mailbox whose domain the index cannot judge.
    all: Vec<usize>,
}

impl DomainIndex {
    fn build(filters: &[FilterEntry], which: impl Iterator<Item = usize>) -> DomainIndex {
        let mut index = DomainIndex::default();
        for f in which {
            index.all.push(f);
            match &filters[f].compiled.include.mailbox_domains {
                Some(domains) => {
                    for d in domains {
                        index.by_domain.entry(d.clone()).or_default().push(f);
                    }
                }
                None => index.unindexed.push(f),
            }
        }
        index
    }

    /// The filters that can match a mailbox of `domain` (None: one the index cannot judge).
    fn candidates<'a>(&'a self, domain: Option<&str>) -> impl Iterator<Item = usize> + 'a {
        let (first, second): (&[usize], &[usize]) = match domain {
            Some(d) => (&self.unindexed, self.by_domain.get(d).map_or(&[][..], Vec::as_slice)),
            None => (&self.all, &[]),
        };
        first.iter().chain(second).copied()
    }
}

/// The ASCII domain of a mailbox, lower-cased, as the index keys it; None when it has no
/// `@` or a non-ASCII domain (case-insensitive globs can match those in ways an exact
/// lookup cannot, e.g. the Kelvin sign and `k`).
fn index_domain(mailbox: &str) -> Option<std::borrow::Cow<'_, str>> {
    let (_, domain) = mailbox.rsplit_once('@')?;
    if !domain.is_ascii() {
        return None;
    }
    Some(if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(domain.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(domain)
    })
}

/// Which filters were evaluated for one event and how: a short list for the few an
/// indexed event touches, a table when there are many.
enum Memo {
    Few(Vec<(usize, bool)>),
    Many(Vec<u8>),
}

impl Memo {
    const FEW: usize = 64;

    fn get(&self, f: usize) -> Option<bool> {
        match self {
            Memo::Few(list) => list.iter().find(|(i, _)| *i == f).map(|(_, hit)| *hit),
            Memo::Many(table) => match table.get(f) {
                Some(1) => Some(false),
                Some(2) => Some(true),
                _ => None,
            },
        }
    }

    fn set(&mut self, f: usize, hit: bool, filters: usize) {
        if let Memo::Few(list) = self
            && list.len() >= Memo::FEW
        {
            let mut table = vec![0u8; filters];
            for (i, h) in list.iter() {
                if let Some(slot) = table.get_mut(*i) {
                    *slot = if *h { 2 } else { 1 };
                }
            }
            *self = Memo::Many(table);
        }
        match self {
            Memo::Few(list) => list.push((f, hit)),
            Memo::Many(table) => {
                if let Some(slot) = table.get_mut(f) {
                    *slot = if hit { 2 } else { 1 };
                }
            }
        }
    }
}

fn type_index(t: EventType) -> usize {
    EventType::ALL.iter().position(|x| *x == t).unwrap_or(0)
}

impl RoutingTable {
    pub fn build(subscriptions: Vec<SubscriptionRoute>, filters: Vec<FilterEntry>, grants: Grants) -> RoutingTable {
        let mut table = RoutingTable {
            filters,
            grants,
            ..Default::default()
        };
        table.flagging = (0..table.filters.len())
            .filter(|i| table.filters[*i].compiled.flag.is_some())
            .collect();
        let by_name: HashMap<(&str, &str), usize> = table
            .filters
            .iter()
            .enumerate()
            .map(|(i, f)| ((f.namespace.as_str(), f.name.as_str()), i))
            .rev() // the first of two entries with one name wins, as a search would find it
            .collect();
        let mut interned: HashMap<String, u32> = HashMap::new();
        let mut namespaces: Vec<String> = Vec::new();
        let mut intern = |namespace: &str| -> u32 {
            if let Some(&i) = interned.get(namespace) {
                return i;
            }
            let i = namespaces.len() as u32;
            namespaces.push(namespace.to_string());
            interned.insert(namespace.to_string(), i);
            i
        };
        let filter_ns: Vec<u32> = table.filters.iter().map(|f| intern(&f.namespace)).collect();
        let mut routes = Vec::with_capacity(subscriptions.len());
        for s in subscriptions {
            let mut filters: Vec<usize> = Vec::with_capacity(s.filters.len());
            for name in &s.filters {
                // A name listed twice is one filter (and one name in matchedFilters).
                if let Some(&f) = by_name.get(&(s.namespace.as_str(), name.as_str()))
                    && !filters.contains(&f)
                {
                    filters.push(f);
                }
            }
            // A subscription whose every filter vanished receives nothing rather than everything.
            if !s.filters.is_empty() && filters.is_empty() {
                continue;
            }
            let index = routes.len();
            let mut types: Vec<usize> = if s.event_types.is_empty() {
                (0..EventType::ALL.len()).collect()
            } else {
                s.event_types.iter().map(|t| type_index(*t)).collect()
            };
            // `eventTypes: [a, a]` is one type: listed twice, the route got every event twice.
            types.sort_unstable();
            types.dedup();
            for t in types {
                table.by_type[t].push(index);
            }
            routes.push(Route {
                uid: s.uid,
                ns: intern(&s.namespace),
                namespace: s.namespace,
                event_types: s.event_types,
                filters,
            });
        }
        drop(by_name);
        table.routes = routes;
        table.namespaces = namespaces;
        table.filter_ns = filter_ns;
        for (t, of_type) in table.by_type.iter().enumerate() {
            table.unfiltered_by_type[t] = of_type
                .iter()
                .copied()
                .filter(|r| table.routes[*r].filters.is_empty())
                .collect();
        }
        table.users = vec![Vec::new(); table.filters.len()];
        for (r, route) in table.routes.iter().enumerate() {
            for (position, &f) in route.filters.iter().enumerate() {
                if let Some(users) = table.users.get_mut(f) {
                    users.push((r, position));
                }
            }
        }
        let used = (0..table.filters.len()).filter(|f| !table.users[*f].is_empty());
        table.used = DomainIndex::build(&table.filters, used);
        table.flags = DomainIndex::build(&table.filters, table.flagging.iter().copied());
        table
    }

    /// The MailboxGrants this table routes under.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    pub fn route(&self, event: &MailboxEvent) -> Routed {
        let mut routed = Routed::default();
        let mut memo = Memo::Few(Vec::new());
        let count = self.filters.len();
        let prepared = super::filter::Prepared::new(event);
        // Whether a namespace was granted the event: a subscription is routed, and a
        // filter evaluated (so counted, or flagging), only within its namespace's grants.
        let memo_granted = std::cell::RefCell::new(GrantMemo::default());
        let granted = |ns: u32| {
            let name = self.namespaces.get(ns as usize).map_or("", String::as_str);
            memo_granted
                .borrow_mut()
                .granted(&self.grants, (ns, name), self.namespaces.len(), event)
        };
        let mut eval = |i: usize, routed: &mut Routed| -> bool {
            if let Some(hit) = memo.get(i) {
                return hit;
            }
            let hit = self.filters[i].compiled.matches_prepared(&prepared);
            memo.set(i, hit, count);
            if hit {
                routed
                    .matched
                    .push((self.filters[i].namespace.clone(), self.filters[i].name.clone()));
            }
            hit
        };

        let flagging_event = event.event_type == EventType::ComplianceFlagged;
        let of_type = &self.by_type[type_index(event.event_type)];
        let domain = index_domain(&event.mailbox);
        if flagging_event {
            for &r in of_type {
                let route = &self.routes[r];
                // A flag reaches subscriptions of its own namespace only, and when the
                // subscription names filters, only flags those filters set.
                if event.flag_namespace.as_deref() != Some(route.namespace.as_str()) || !granted(route.ns) {
                    continue;
                }
                let names: Vec<String> = route
                    .filters
                    .iter()
                    .map(|i| self.filters[*i].name.clone())
                    .filter(|n| event.flags.iter().any(|f| &f.filter == n))
                    .collect();
                if route.filters.is_empty() || !names.is_empty() {
                    routed.targets.push(Target {
                        subscription: route.uid.clone(),
                        matched_filters: names,
                    });
                }
            }
        } else {
            let accepts = |r: usize| {
                let route = &self.routes[r];
                (route.event_types.is_empty() || route.event_types.contains(&event.event_type)) && granted(route.ns)
            };
            // (route, position of the filter in its list) of every filter that matched.
            let mut hits: Vec<(usize, usize)> = Vec::new();
            for f in self.used.candidates(domain.as_deref()) {
                let users = &self.users[f];
                if !users.iter().any(|(r, _)| accepts(*r)) || !eval(f, &mut routed) {
                    continue;
                }
                hits.extend(users.iter().filter(|(r, _)| accepts(*r)));
            }
            hits.sort_unstable();
            // Targets in route order, as the table lists them: routes without filters take
            // every event of their types (merged in), the others the events one of their
            // filters matched.
            let unfiltered = &self.unfiltered_by_type[type_index(event.event_type)];
            let mut next_unfiltered = unfiltered.iter().peekable();
            let mut push_unfiltered_before = |limit: usize, routed: &mut Routed| {
                while let Some(&&u) = next_unfiltered.peek() {
                    if u >= limit {
                        break;
                    }
                    next_unfiltered.next();
                    if !granted(self.routes[u].ns) {
                        continue;
                    }
                    routed.targets.push(Target {
                        subscription: self.routes[u].uid.clone(),
                        matched_filters: vec![],
                    });
                }
            };
            let mut i = 0;
            while let Some(&(r, _)) = hits.get(i) {
                push_unfiltered_before(r, &mut routed);
                let route = &self.routes[r];
                let mut names = Vec::new();
                while let Some(&(hr, position)) = hits.get(i) {
                    if hr != r {
                        break;
                    }
                    i += 1;
                    if let Some(f) = route.filters.get(position) {
                        names.push(self.filters[*f].name.clone());
                    }
                }
                routed.targets.push(Target {
                    subscription: route.uid.clone(),
                    matched_filters: names,
                });
            }
            push_unfiltered_before(usize::MAX, &mut routed);
        }

        if !flagging_event && event.source != Source::Router && self.has_flag_subscribers() {
            let mut by_namespace: Vec<(String, Vec<Flag>)> = Vec::new();
            // In filter order, as the flags were always listed.
            let mut flagging: Vec<usize> = self.flags.candidates(domain.as_deref()).collect();
            flagging.sort_unstable();
            for f in flagging {
                // A namespace flags mail it was granted, or whose flags alone it was granted.
                let may_flag = self.filter_ns.get(f).is_some_and(|&ns| {
                    granted(ns)
                        || self
                            .grants
                            .ceiling_for(&self.filters[f].namespace, EventType::ComplianceFlagged, &event.mailbox)
                            .is_some()
                });
                if !may_flag || !eval(f, &mut routed) {
                    continue;
                }
                let entry = &self.filters[f];
                let Some((name, severity)) = entry.compiled.flag.clone() else {
                    continue;
                };
                let flag = Flag {
                    name,
                    severity,
                    filter: entry.name.clone(),
                };
                match by_namespace.iter_mut().find(|(ns, _)| ns == &entry.namespace) {
                    Some((_, flags)) => flags.push(flag),
                    None => by_namespace.push((entry.namespace.clone(), vec![flag])),
                }
            }
            for (namespace, flags) in by_namespace {
                let mut derived = event.derive();
                derived.event_type = EventType::ComplianceFlagged;
                derived.source = Source::Router;
                // A repeat of the message repeats its flag: both are de-duplicated.
                derived.producer_event_id = event
                    .producer_event_id
                    .as_ref()
                    .map(|p| format!("{p}#compliance.flagged/{namespace}"));
                derived.flagged_event_id = Some(event.id.clone());
                derived.flag_namespace = Some(namespace);
                derived.flags = flags;
                routed.flagged.push(derived);
            }
        }
        routed.matched.sort();
        routed.matched.dedup();
        routed
    }

    fn has_flag_subscribers(&self) -> bool {
        !self.flagging.is_empty() && !self.by_type[type_index(EventType::ComplianceFlagged)].is_empty()
    }
}

/// The current table, replaced whole on every change; routing never waits for a rebuild.
#[derive(Default)]
pub struct Router {
    table: RwLock<Arc<RoutingTable>>,
    /// The LegalHolds in force: the ingest path archives what they hold, and the purges
    /// skip it. None until the holds were first listed: nothing that a hold could keep is
    /// purged before then.
    holds: RwLock<Option<Arc<super::HoldSet>>>,
}

impl Router {
    pub fn current(&self) -> Arc<RoutingTable> {
        self.table.read().clone()
    }

    /// The holds in force; None while they are not known yet.
    pub fn holds(&self) -> Option<Arc<super::HoldSet>> {
        self.holds.read().clone()
    }

    pub fn set_holds(&self, holds: super::HoldSet) {
        *self.holds.write() = Some(Arc::new(holds));
    }

    pub fn swap(&self, table: RoutingTable) {
        *self.table.write() = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        AttachmentMatch, ComplianceFlag, Direction, MailboxFilterSpec, MatchCriteria, Severity, SubjectMatch,
    };
    use crate::event::Attachment;

    /// A table whose every namespace is granted everything (grants have tests of their own).
    fn build_granted(routes: Vec<SubscriptionRoute>, filters: Vec<FilterEntry>) -> RoutingTable {
        let namespaces: Vec<String> = routes
            .iter()
            .map(|r| r.namespace.clone())
            .chain(filters.iter().map(|f| f.namespace.clone()))
            .collect();
        let grants = Grants::unrestricted(namespaces.iter().map(String::as_str));
        RoutingTable::build(routes, filters, grants)
    }

    fn event(json: serde_json::Value) -> MailboxEvent {
        let mut base = serde_json::json!({
            "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "alice@finance.example.com",
            "from": "bob@partner.org", "to": ["alice@finance.example.com"], "direction": "inbound",
            "subject": "Q3 Invoice attached"
        });
        if let (Some(b), Some(o)) = (base.as_object_mut(), json.as_object()) {
            b.extend(o.clone());
        }
        serde_json::from_value(base).expect("event")
    }

    /// Targets, matched filters, and the flags of each derived event by namespace.
    type Expected = (Vec<Target>, Vec<(String, String)>, Vec<(String, Vec<Flag>)>);

    /// Routing as it was before the domain index, from the raw lists the table is built
    /// from: every filter of every subscription taking the event's type, in list order
    /// (a type or filter name listed twice counts once; the first filter of a name wins).
    fn reference(routes: &[SubscriptionRoute], filters: &[FilterEntry], event: &MailboxEvent) -> Expected {
        let find = |ns: &str, name: &str| filters.iter().find(|f| f.namespace == ns && f.name == name);
        let (mut targets, mut matched) = (Vec::new(), Vec::new());
        let flagging_event = event.event_type == EventType::ComplianceFlagged;
        let mut flag_subscribers = false;
        for route in routes {
            let mut names: Vec<&String> = Vec::new();
            for n in &route.filters {
                if find(&route.namespace, n).is_some() && !names.contains(&n) {
                    names.push(n);
                }
            }
            if !route.filters.is_empty() && names.is_empty() {
                continue;
            }
            let takes = |t: EventType| route.event_types.is_empty() || route.event_types.contains(&t);
            flag_subscribers |= takes(EventType::ComplianceFlagged);
            if !takes(event.event_type) {
                continue;
            }
            if flagging_event {
                if event.flag_namespace.as_deref() != Some(route.namespace.as_str()) {
                    continue;
                }
                let flagged: Vec<String> = names
                    .iter()
                    .filter(|n| event.flags.iter().any(|f| &f.filter == **n))
                    .map(|n| (*n).clone())
                    .collect();
                if names.is_empty() || !flagged.is_empty() {
                    targets.push(Target {
                        subscription: route.uid.clone(),
                        matched_filters: flagged,
                    });
                }
                continue;
            }
            if names.is_empty() {
                targets.push(Target {
                    subscription: route.uid.clone(),
                    matched_filters: vec![],
                });
                continue;
            }
            let mut hit = Vec::new();
            for n in names {
                if let Some(f) = find(&route.namespace, n)
                    && f.compiled.matches(event)
                {
                    hit.push(n.clone());
                    matched.push((f.namespace.clone(), f.name.clone()));
                }
            }
            if !hit.is_empty() {
                targets.push(Target {
                    subscription: route.uid.clone(),
                    matched_filters: hit,
                });
            }
        }
        let mut flagged: Vec<(String, Vec<Flag>)> = Vec::new();
        let flag_filters = filters.iter().any(|f| f.compiled.flag.is_some());
        if !flagging_event && event.source != Source::Router && flag_filters && flag_subscribers {
            for f in filters {
                let Some((name, severity)) = f.compiled.flag.clone() else {
                    continue;
                };
                if !f.compiled.matches(event) {
                    continue;
                }
                matched.push((f.namespace.clone(), f.name.clone()));
                let flag = Flag {
                    name,
                    severity,
                    filter: f.name.clone(),
                };
                match flagged.iter_mut().find(|(ns, _)| ns == &f.namespace) {
                    Some((_, flags)) => flags.push(flag),
                    None => flagged.push((f.namespace.clone(), vec![flag])),
                }
            }
        }
        matched.sort();
        matched.dedup();
        (targets, matched, flagged)
    }

    /// A type or filter listed twice in a subscription is one: the event is delivered
    /// once (it was twice, with the same webhook-id, before the routing index).
    #[test]
    fn a_type_or_filter_listed_twice_routes_once() {
        let spec: MailboxFilterSpec = serde_json::from_value(serde_json::json!({})).expect("spec");
        let table = build_granted(
            vec![
                SubscriptionRoute {
                    uid: "twice".into(),
                    namespace: "ns".into(),
                    event_types: vec![EventType::MessageReceived, EventType::MessageReceived],
                    filters: vec![],
                },
                SubscriptionRoute {
                    uid: "filters".into(),
                    namespace: "ns".into(),
                    event_types: vec![],
                    filters: vec!["all".into(), "all".into()],
                },
            ],
            vec![FilterEntry {
                namespace: "ns".into(),
                name: "all".into(),
                compiled: Arc::new(CompiledFilter::compile(&spec).expect("compiles")),
            }],
        );
        let routed = table.route(&event(serde_json::json!({})));
        assert_eq!(
            routed.targets,
            vec![
                Target {
                    subscription: "twice".into(),
                    matched_filters: vec![],
                },
                Target {
                    subscription: "filters".into(),
                    matched_filters: vec!["all".into()],
                },
            ]
        );
    }

    #[test]
    fn the_domain_index_routes_exactly_as_evaluating_every_filter() {
        // A small deterministic generator (no dependency): the same cases on every run.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let specs = |k: usize, j: usize| -> Vec<serde_json::Value> {
            vec![
                serde_json::json!({"mailboxes": [format!("*@d{k}.example")]}),
                serde_json::json!({"mailboxes": [format!("u{j}@d{k}.example"), format!("*@D{j}.Example")]}),
                serde_json::json!({"mailboxes": ["*@*.example"]}),
                serde_json::json!({"mailboxes": ["*@bücher.example"]}),
                serde_json::json!({"mailboxes": ["*@kd1.example"]}),
                serde_json::json!({"mailboxes": [format!("*@*@d{k}.example"), format!("u{j}@")]}),
                serde_json::json!({"mailboxes": ["*", format!("*@d{k}.example.")]}),
                serde_json::json!({"mailboxes": [format!("u{j}@d{k}.exam?le")]}),
                serde_json::json!({"mailboxes": [format!("*@d{k}.example")], "subject": {"keywords": ["invoice"]}}),
                serde_json::json!({"mailboxes": [format!("*@d{k}.example")], "exclude": {"mailboxes": [format!("u{j}@*")]}}),
                serde_json::json!({"exclude": {"mailboxes": [format!("*@d{k}.example")]}}),
                serde_json::json!({"subject": {"keywords": ["invoice"]}}),
                serde_json::json!({"senders": ["*@partner.example"]}),
                serde_json::json!({"eventTypes": ["message.sent"], "mailboxes": [format!("*@d{k}.example")]}),
                serde_json::json!({"mailboxes": [format!("*@d{k}.example")], "flag": {"name": format!("hold-{j}"), "severity": "high"}}),
                serde_json::json!({"subject": {"keywords": ["invoice"]}, "flag": {"name": "invoice", "severity": "low"}}),
                serde_json::json!({}),
            ]
        };
        let types = [
            EventType::MessageReceived,
            EventType::MessageSent,
            EventType::MessageDeleted,
            EventType::ComplianceFlagged,
        ];
        for round in 0..300 {
            // Some tables have more than Memo::FEW filters, so both memo forms are used.
            let per_namespace = if round % 5 == 0 { 40 } else { 12 };
            let mut filters = Vec::new();
            for ns in 0..3 {
                for f in 0..(1 + next(per_namespace)) {
                    let options = specs(next(4), next(4));
                    let spec: MailboxFilterSpec =
                        serde_json::from_value(options[next(options.len())].clone()).expect("spec");
                    filters.push(FilterEntry {
                        namespace: format!("ns{ns}"),
                        name: format!("f{}", if next(10) == 0 { 0 } else { f }),
                        compiled: Arc::new(CompiledFilter::compile(&spec).expect("compiles")),
                    });
                }
            }
            let routes: Vec<SubscriptionRoute> = (0..(1 + next(15)))
                .map(|i| SubscriptionRoute {
                    uid: format!("uid-{i}"),
                    namespace: format!("ns{}", next(3)),
                    event_types: (0..next(3)).map(|_| types[next(types.len())]).collect(),
                    filters: (0..next(5)).map(|_| format!("f{}", next(per_namespace + 2))).collect(),
                })
                .collect();
            let table = build_granted(routes.clone(), filters.clone());
            for _ in 0..25 {
                let (k, j) = (next(4), next(4));
                let mailbox = [
                    format!("u{j}@d{k}.example"),
                    format!("X@D{k}.EXAMPLE"),
                    "jürgen@bücher.example".to_string(),
                    format!("a@b@d{k}.example"),
                    "postmaster".to_string(),
                    format!("u{j}@d{k}.example."),
                    "x@\u{212A}d1.example".to_string(),
                    format!("jürgen@d{k}.example"),
                ][next(8)]
                .clone();
                let subject = ["Invoice 7", "hello"][next(2)];
                let from = ["bob@partner.example", "eve@other.example"][next(2)];
                let mut e = event(serde_json::json!({"mailbox": mailbox, "subject": subject, "from": from}));
                e.event_type = types[next(types.len())];
                if e.event_type == EventType::ComplianceFlagged {
                    e.source = Source::Router;
                    e.flag_namespace = Some(format!("ns{}", next(3)));
                    e.flags = vec![Flag {
                        name: "hold".into(),
                        severity: Severity::High,
                        filter: format!("f{}", next(per_namespace)),
                    }];
                }
                let routed = table.route(&e);
                let (targets, matched, flagged) = reference(&routes, &filters, &e);
                assert_eq!(routed.targets, targets, "round {round}: {e:?}");
                assert_eq!(routed.matched, matched, "round {round}: {e:?}");
                let got: Vec<(String, Vec<Flag>)> = routed
                    .flagged
                    .iter()
                    .map(|d| (d.flag_namespace.clone().unwrap_or_default(), d.flags.clone()))
                    .collect();
                assert_eq!(got, flagged, "round {round}: {e:?}");
            }
        }
    }

    fn filter(ns: &str, name: &str, criteria: MatchCriteria, exclude: Option<MatchCriteria>) -> FilterEntry {
        let spec = MailboxFilterSpec {
            criteria,
            exclude,
            flag: None,
        };
        FilterEntry {
            namespace: ns.into(),
            name: name.into(),
            compiled: Arc::new(CompiledFilter::compile(&spec).expect("compiles")),
        }
    }

    fn sub(uid: &str, ns: &str, types: &[EventType], filters: &[&str]) -> SubscriptionRoute {
        SubscriptionRoute {
            uid: uid.into(),
            namespace: ns.into(),
            event_types: types.to_vec(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn targets(table: &RoutingTable, e: &MailboxEvent) -> Vec<String> {
        table.route(e).targets.into_iter().map(|t| t.subscription).collect()
    }
    #[test]
    fn and_across_criteria_or_within_a_list() {
        let f = filter(
            "ns",
            "f",
            MatchCriteria {
                mailboxes: vec!["*@finance.example.com".into(), "*@legal.example.com".into()],
                directions: vec![Direction::Inbound],
                ..Default::default()
            },
            None,
        );
        let t = build_granted(vec![sub("s", "ns", &[], &["f"])], vec![f]);
        assert_eq!(targets(&t, &event(serde_json::json!({}))), vec!["s"]);
        assert_eq!(
            targets(&t, &event(serde_json::json!({"mailbox": "x@legal.example.com"}))),
            vec!["s"]
        );
        // One criterion fails: no match.
        assert!(targets(&t, &event(serde_json::json!({"direction": "outbound"}))).is_empty());
        assert!(targets(&t, &event(serde_json::json!({"mailbox": "x@sales.example.com"}))).is_empty());
    }

    #[test]
    fn exclude_removes_and_globs_and_domains_ignore_case() {
        let f = filter(
            "ns",
            "f",
            MatchCriteria {
                domains: vec!["Partner.ORG".into()],
                ..Default::default()
            },
            Some(MatchCriteria {
                senders: vec!["NOREPLY@*".into()],
                ..Default::default()
            }),
        );
        let t = build_granted(vec![sub("s", "ns", &[EventType::MessageReceived], &["f"])], vec![f]);
        assert_eq!(targets(&t, &event(serde_json::json!({}))), vec!["s"]);
        // Subdomains match a domain; look-alike suffixes do not.
        assert_eq!(
            targets(&t, &event(serde_json::json!({"from": "x@mail.partner.org"}))),
            vec!["s"]
        );
        assert!(targets(&t, &event(serde_json::json!({"from": "x@notpartner.org", "to": []}))).is_empty());
        assert!(targets(&t, &event(serde_json::json!({"from": "noreply@partner.org"}))).is_empty());
        // The subscription's own event types apply too.
        assert!(targets(&t, &event(serde_json::json!({"type": "message.sent"}))).is_empty());
    }

    #[test]
    fn subject_keywords_regex_attachments_and_size() {
        let f = filter(
            "ns",
            "f",
            MatchCriteria {
                subject: Some(SubjectMatch {
                    keywords: vec!["INVOICE".into()],
                    regex: None,
                }),
                attachments: Some(AttachmentMatch {
                    present: Some(true),
                    content_types: vec!["application/*".into()],
                    extensions: vec!["pdf".into()],
                }),
                size: Some(crate::api::SizeRange {
                    min_bytes: Some(100),
                    max_bytes: None,
                }),
                ..Default::default()
            },
            None,
        );
        let t = build_granted(vec![sub("s", "ns", &[], &["f"])], vec![f]);
        let pdf = Attachment {
            name: Some("Q3.PDF".into()),
            content_type: Some("application/pdf".into()),
            size: Some(10),
            sha256: None,
        };
        let with = |v: serde_json::Value| {
            let mut e = event(v);
            e.attachments = vec![pdf.clone()];
            e
        };
        assert_eq!(targets(&t, &with(serde_json::json!({"size": 500}))), vec!["s"]);
        assert!(
            targets(&t, &with(serde_json::json!({"size": 50}))).is_empty(),
            "below minBytes"
        );
        assert!(targets(&t, &with(serde_json::json!({"size": 500, "subject": "hello"}))).is_empty());
        assert!(
            targets(&t, &event(serde_json::json!({"size": 500}))).is_empty(),
            "no attachment"
        );
    }

    #[test]
    fn compliance_flagged_once_per_message_to_its_namespace_only() {
        let flagged = |ns: &str, name: &str| {
            let spec = MailboxFilterSpec {
                criteria: MatchCriteria {
                    directions: vec![Direction::Inbound],
                    ..Default::default()
                },
                exclude: None,
                flag: Some(ComplianceFlag {
                    name: format!("{name}-flag"),
                    severity: Severity::High,
                }),
            };
            FilterEntry {
                namespace: ns.into(),
                name: name.into(),
                compiled: Arc::new(CompiledFilter::compile(&spec).expect("compiles")),
            }
        };
        let t = build_granted(
            vec![
                sub("legal", "ns", &[EventType::ComplianceFlagged], &[]),
                sub("other-ns", "elsewhere", &[EventType::ComplianceFlagged], &[]),
                sub("only-a", "ns", &[EventType::ComplianceFlagged], &["a"]),
            ],
            vec![flagged("ns", "a"), flagged("ns", "b")],
        );
        let message = event(serde_json::json!({}));
        let routed = t.route(&message);
        assert!(routed.targets.is_empty(), "nobody subscribed to the message itself");
        assert_eq!(routed.flagged.len(), 1, "two flags, one namespace: one event");
        let flag_event = &routed.flagged[0];
        assert_eq!(flag_event.flags.len(), 2);
        assert_eq!(flag_event.flagged_event_id.as_deref(), Some("evt_1"));
        let to: Vec<Target> = t.route(flag_event).targets;
        assert_eq!(
            to.iter().map(|t| t.subscription.as_str()).collect::<Vec<_>>(),
            vec!["legal", "only-a"]
        );
        assert_eq!(to[1].matched_filters, vec!["a"]);
        // A derived event never derives another.
        assert!(t.route(flag_event).flagged.is_empty());
    }

    #[test]
    fn non_ascii_addresses_domains_and_subjects_match_without_panicking() {
        let f = |name: &str, criteria: MatchCriteria| filter("ns", name, criteria, None);
        let subject = |keywords: &[&str], regex: Option<&str>| {
            Some(SubjectMatch {
                keywords: keywords.iter().map(|k| k.to_string()).collect(),
                regex: regex.map(String::from),
            })
        };
        let t = build_granted(
            vec![
                sub("unicode", "ns", &[], &["unicode"]),
                sub("punycode", "ns", &[], &["punycode"]),
                sub("ascii", "ns", &[], &["ascii"]),
                sub("glob", "ns", &[], &["glob"]),
                sub("words", "ns", &[], &["words"]),
            ],
            vec![
                f(
                    "unicode",
                    MatchCriteria {
                        domains: vec!["Bücher.example".into()],
                        ..Default::default()
                    },
                ),
                f(
                    "punycode",
                    MatchCriteria {
                        domains: vec!["xn--bcher-kva.example".into()],
                        ..Default::default()
                    },
                ),
                // 13 bytes against the sender's 15-byte bücher.example: the old suffix slice
                // started inside the ü and panicked.
                f(
                    "ascii",
                    MatchCriteria {
                        domains: vec!["xcher.example".into()],
                        ..Default::default()
                    },
                ),
                f(
                    "glob",
                    MatchCriteria {
                        senders: vec!["JÜRGEN@*".into()],
                        ..Default::default()
                    },
                ),
                f(
                    "words",
                    MatchCriteria {
                        subject: subject(&["GRÖSSE"], Some("fällig$")),
                        ..Default::default()
                    },
                ),
            ],
        );
        let e = event(serde_json::json!({
            "from": "jürgen@bücher.example", "to": ["zoë@straße.example"], "mailbox": "zoë@straße.example",
            "subject": "Rechnung – fällig"
        }));
        let mut got = targets(&t, &e);
        got.sort();
        assert_eq!(
            got,
            vec!["glob", "punycode", "unicode", "words"],
            "xcher.example is not bücher.example"
        );
        // A subdomain, in Unicode or ASCII form; an unrelated look-alike is not.
        let sub_domain = event(serde_json::json!({"from": "x@mail.xn--bcher-kva.example", "to": [], "subject": ""}));
        let mut got = targets(&t, &sub_domain);
        got.sort();
        assert_eq!(got, vec!["punycode", "unicode"]);
        let odd =
            event(serde_json::json!({"from": "a@ü", "to": ["@", "ü@", "x@.ü.", "\u{fffd}@\u{fffd}"], "subject": "ü"}));
        assert!(targets(&t, &odd).is_empty());
    }

    #[test]
    fn only_indexed_types_are_considered_and_filters_evaluated_once() {
        let f = filter("ns", "f", MatchCriteria::default(), None);
        let t = build_granted(
            vec![
                sub("a", "ns", &[EventType::MessageSent], &["f"]),
                sub("b", "ns", &[], &["f"]),
                sub("c", "ns", &[], &["f"]),
            ],
            vec![f],
        );
        let routed = t.route(&event(serde_json::json!({})));
        assert_eq!(routed.targets.len(), 2);
        assert_eq!(routed.matched, vec![("ns".to_string(), "f".to_string())]);
    }
}

#[cfg(test)]
mod grant_tests {
    use super::*;
    use crate::api::{ComplianceFlag, MailboxFilterSpec, MailboxGrantSpec, MatchCriteria, PayloadMode, Severity};
    use crate::route::CompiledGrant;

    fn event(mailbox: &str) -> MailboxEvent {
        serde_json::from_value(serde_json::json!({
            "id": "evt_1", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": mailbox,
            "from": "x@partner.org", "to": [mailbox], "subject": "wire"
        }))
        .expect("event")
    }

    fn grant(name: &str, mailboxes: &[&str], types: &[EventType]) -> Arc<CompiledGrant> {
        let spec = MailboxGrantSpec {
            mailboxes: mailboxes.iter().map(|s| s.to_string()).collect(),
            event_types: types.to_vec(),
            max_payload_mode: PayloadMode::Full,
            ..Default::default()
        };
        Arc::new(CompiledGrant::compile(name, &spec).expect("compiles"))
    }

    fn flagging(ns: &str, name: &str) -> FilterEntry {
        let spec = MailboxFilterSpec {
            criteria: MatchCriteria::default(),
            exclude: None,
            flag: Some(ComplianceFlag {
                name: name.into(),
                severity: Severity::High,
            }),
        };
        FilterEntry {
            namespace: ns.into(),
            name: name.into(),
            compiled: Arc::new(CompiledFilter::compile(&spec).expect("compiles")),
        }
    }

    fn route(uid: &str, ns: &str, types: &[EventType], filters: &[&str]) -> SubscriptionRoute {
        SubscriptionRoute {
            uid: uid.into(),
            namespace: ns.into(),
            event_types: types.to_vec(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Routes, counters and flags stay inside each namespace's grants, also when an
    /// event concerns more namespaces than the short per-event list holds.
    #[test]
    fn nothing_outside_a_grant_is_routed_counted_or_flagged() {
        let mut routes = Vec::new();
        let mut filters = Vec::new();
        let mut pairs = Vec::new();
        for i in 0..40 {
            let ns = format!("ns{i}");
            routes.push(route(&format!("all-{i}"), &ns, &[], &[]));
            routes.push(route(&format!("filtered-{i}"), &ns, &[], &[&format!("f{i}")]));
            filters.push(flagging(&ns, &format!("f{i}")));
            // Even namespaces: finance only; odd ones: nothing; ns39: only flags of anyone.
            if i % 2 == 0 {
                pairs.push((ns, grant("finance", &["*@finance.example"], &[])));
            } else if i == 39 {
                pairs.push((ns, grant("flags", &["*"], &[EventType::ComplianceFlagged])));
            }
        }
        routes.push(route("flags-39", "ns39", &[EventType::ComplianceFlagged], &[]));
        let table = RoutingTable::build(routes, filters, Grants::build(pairs));

        let routed = table.route(&event("cfo@finance.example"));
        let mut targets: Vec<String> = routed.targets.iter().map(|t| t.subscription.clone()).collect();
        targets.sort();
        let mut expected: Vec<String> = (0..40)
            .step_by(2)
            .flat_map(|i| [format!("all-{i}"), format!("filtered-{i}")])
            .collect();
        expected.sort();
        assert_eq!(targets, expected);
        let counted: Vec<&str> = routed.matched.iter().map(|(ns, _)| ns.as_str()).collect();
        assert!(
            counted.iter().all(|ns| ns
                .trim_start_matches("ns")
                .parse::<u32>()
                .is_ok_and(|i| i % 2 == 0 || i == 39)),
            "only granted namespaces count: {counted:?}"
        );
        let flagged: Vec<&str> = routed
            .flagged
            .iter()
            .filter_map(|f| f.flag_namespace.as_deref())
            .collect();
        assert!(
            flagged.contains(&"ns39"),
            "a grant of flags alone lets a namespace flag: {flagged:?}"
        );
        assert!(
            !flagged.contains(&"ns1"),
            "an ungranted namespace flags nothing: {flagged:?}"
        );

        let other = table.route(&event("ceo@example.com"));
        assert!(other.targets.is_empty(), "{:?}", other.targets);
        assert!(other.matched.iter().all(|(ns, _)| ns == "ns39"));
        // The flag of ns39 reaches its own subscriptions that take flags, nobody else's.
        let flag = other
            .flagged
            .iter()
            .find(|f| f.flag_namespace.as_deref() == Some("ns39"))
            .expect("flag");
        let to: Vec<String> = table.route(flag).targets.into_iter().map(|t| t.subscription).collect();
        assert_eq!(to, ["all-39", "filtered-39", "flags-39"]);
    }
}
