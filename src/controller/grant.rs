//! MailboxGrant: the cluster admin's word on which namespaces see which mail. Grants are
//! few and cluster-scoped, so one loop keeps them all: any change to a grant or to a
//! namespace's labels recompiles every grant from the caches, records what each covers,
//! rebuilds the routing table and re-checks the subscriptions of every namespace whose
//! grants changed. A deleted grant is simply absent from the next pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Context;
use super::conditions::{self, Desired, READY, Status};
use crate::api::{MailboxGrant, MailboxGrantSpec, MailboxGrantStatus, WebhookSubscription};
use crate::route::CompiledGrant;

/// Reasons on the `Ready` condition of a MailboxGrant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Valid,
    InvalidPattern,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Valid => "Valid",
            Reason::InvalidPattern => "InvalidPattern",
        }
    }
}

impl conditions::Reason for Reason {
    fn as_str(&self) -> &'static str {
        Reason::as_str(self)
    }
}

/// What the operator knows of one grant.
#[derive(Clone, Debug)]
pub struct GrantState {
    /// A grant deleted and made again has a new UID (and may have the same generation).
    pub uid: Option<String>,
    pub spec: MailboxGrantSpec,
    pub generation: Option<i64>,
    pub ready: Desired<Reason>,
    /// None while invalid: an invalid grant grants nothing.
    pub compiled: Option<Arc<CompiledGrant>>,
    /// The namespaces it covers now, sorted.
    pub covered: Vec<String>,
}

/// A grant compiled against the namespaces that exist. Pure.
pub fn evaluate(
    name: &str,
    (uid, generation): (Option<String>, Option<i64>),
    spec: &MailboxGrantSpec,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
) -> GrantState {
    let selector = spec
        .namespace_selector
        .clone()
        .map(Selector::try_from)
        .transpose()
        .map_err(|e| format!("spec.namespaceSelector: {e}"));
    let compiled = CompiledGrant::compile(name, spec).map_err(|e| e.to_string());
    let (selector, compiled) = match (selector, compiled) {
        (Ok(selector), Ok(compiled)) => (selector, compiled),
        (Err(e), _) | (_, Err(e)) => {
            return GrantState {
                uid,
                spec: spec.clone(),
                generation,
                ready: Desired {
                    type_: READY,
                    status: Status::False,
                    reason: Reason::InvalidPattern,
                    message: format!("{e}. An invalid grant grants nothing until it is fixed."),
                },
                compiled: None,
                covered: Vec::new(),
            };
        }
    };
    let mut covered: BTreeSet<String> = spec.namespaces.iter().cloned().collect();
    if let Some(selector) = &selector {
        covered.extend(
            namespaces
                .iter()
                .filter(|(_, labels)| selector.matches(labels))
                .map(|(n, _)| n.clone()),
        );
    }
    let covered: Vec<String> = covered.into_iter().collect();
    GrantState {
        uid,
        spec: spec.clone(),
        generation,
        ready: Desired {
            type_: READY,
            status: Status::True,
            reason: Reason::Valid,
            message: format!(
                "Routing applies this grant to {} namespace(s); events go out at most as {}{}.",
                covered.len(),
                spec.max_payload_mode.as_str(),
                if compiled.ceiling.raw_links {
                    ", with raw message links"
                } else {
                    ""
                }
            ),
        },
        compiled: Some(Arc::new(compiled)),
        covered,
    }
}

/// A short list for a printer column: the first few entries and how many more.
pub(super) fn summary<'a>(items: impl Iterator<Item = &'a str>) -> Option<String> {
    let items: Vec<&str> = items.collect();
    if items.is_empty() {
        return None;
    }
    const SHOWN: usize = 3;
    let mut text = items.iter().take(SHOWN).copied().collect::<Vec<_>>().join(",");
    if items.len() > SHOWN {
        text.push_str(&format!(",+{}", items.len() - SHOWN));
    }
    Some(text)
}

/// A grant's status. Pure.
pub fn grant_status(
    previous: &MailboxGrantStatus,
    spec: &MailboxGrantSpec,
    state: &GrantState,
    subscriptions: u32,
    now: &Time,
) -> MailboxGrantStatus {
    let mut status = previous.clone();
    status.observed_generation = state.generation;
    conditions::set_ready(&mut status.conditions, &state.ready, state.generation, now);
    status.covered_namespaces = state.covered.clone();
    status.namespace_summary = summary(state.covered.iter().map(String::as_str));
    status.mailbox_summary = summary(
        spec.mailboxes
            .iter()
            .map(String::as_str)
            .chain(spec.domains.iter().map(String::as_str)),
    );
    status.subscriptions = subscriptions;
    status
}

/// Runs the grant loop until `shutdown`: a pass on every change to a grant or a namespace,
/// and every few seconds for the subscription counts. Marks `ctx.grants_synced` once the
/// first pass over both complete lists is recorded.
pub async fn run(ctx: Arc<Context>, client: Client, shutdown: CancellationToken) {
    let (grants, grant_writer) = reflector::store::<MailboxGrant>();
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let wake = Arc::new(tokio::sync::Notify::new());
    let watch_grants = {
        let wake = wake.clone();
        watcher(Api::<MailboxGrant>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|g: &mut MailboxGrant| g.metadata.managed_fields = None)
            .reflect(grant_writer)
            .for_each(move |event| {
                if let Err(err) = &event {
                    warn!(%err, "watching MailboxGrants failed; retrying");
                }
                wake.notify_one();
                async {}
            })
    };
    let watch_namespaces = {
        let wake = wake.clone();
        // Labels are all a grant reads of a namespace.
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|n: &mut Namespace| {
                n.metadata.managed_fields = None;
                n.metadata.annotations = None;
                n.spec = None;
                n.status = None;
            })
            .reflect(ns_writer)
            .for_each(move |event| {
                if let Err(err) = &event {
                    warn!(%err, "watching Namespaces failed (the operator needs list/watch on namespaces); retrying");
                }
                wake.notify_one();
                async {}
            })
    };
    // Recording and status writing run apart: a revocation must not wait behind status
    // writes to a slow apiserver.
    let statuses = Arc::new(tokio::sync::Notify::new());
    let passes = async {
        if super::synced(&grants).await.is_err() || super::synced(&namespaces).await.is_err() {
            return;
        }
        loop {
            pass(&ctx, &grants, &namespaces);
            statuses.notify_one();
            tokio::select! {
                () = wake.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    };
    let writes = async {
        let mut written: HashMap<String, MailboxGrantStatus> = HashMap::new();
        let mut custody = Custody::default();
        loop {
            statuses.notified().await;
            record_custody(&ctx, &grants, &mut custody).await;
            write_statuses(&ctx, &grants, &mut written, &custody).await;
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = watch_grants => tracing::error!("the MailboxGrant watch ended; grants no longer follow changes"),
        () = watch_namespaces => tracing::error!("the Namespace watch ended; grants no longer follow changes"),
        () = passes => {}
        () = writes => {}
    }
}

/// Recompiles every grant against the namespaces' labels and records the changes: the
/// routing table is rebuilt before the subscriptions of the namespaces concerned are
/// checked again, so neither they nor the send-time check see the old grants.
fn pass(ctx: &Arc<Context>, grants: &reflector::Store<MailboxGrant>, namespaces: &reflector::Store<Namespace>) {
    let labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    let evaluated: BTreeMap<String, GrantState> = grants
        .state()
        .iter()
        .map(|g| {
            let name = g.name_any();
            let state = evaluate(&name, (g.uid(), g.metadata.generation), &g.spec, &labels);
            (name, state)
        })
        .collect();
    let changed_namespaces = ctx.record_grants(evaluated);
    if !changed_namespaces.is_empty() {
        retrigger_namespaces(ctx, &changed_namespaces);
    }
    ctx.grants_synced.send_replace(true);
}

/// What the leader recorded of grants in the audit log, for status.
#[derive(Default)]
struct Custody {
    /// By (uid, generation): the log index of its record.
    recorded: HashMap<(String, i64), u64>,
}

/// What the audit log says of a grant created or changed.
fn custody_detail(spec: &MailboxGrantSpec) -> String {
    serde_json::json!({
        "namespaces": spec.namespaces,
        "namespaceSelector": spec.namespace_selector,
        "mailboxes": spec.mailboxes,
        "domains": spec.domains,
        "eventTypes": spec.event_types,
        "maxPayloadMode": spec.max_payload_mode,
        "rawMessageLinks": spec.raw_message_links,
    })
    .to_string()
}

/// Records in the audit log, on the leader, each grant created or changed (once per
/// generation, as the store remembers) and each deleted: who may see which mail is part
/// of the chain of custody. Kubernetes does not tell the operator who made a change: the
/// record names the grant, and the apiserver's audit log names the user.
async fn record_custody(ctx: &Context, grants: &reflector::Store<MailboxGrant>, custody: &mut Custody) {
    const KIND: &str = "mailboxgrants";
    if !ctx.leadership.is_leader() {
        return;
    }
    let Some(known) = super::custody::logged(ctx, KIND).await else {
        return;
    };
    let all = grants.state();
    let now = jiff::Timestamp::now();
    let trail = ctx.deliveries.audit();
    let mut records = Vec::new();
    for grant in &all {
        let (name, uid) = (grant.name_any(), grant.uid().unwrap_or_default());
        let generation = grant.metadata.generation.unwrap_or(0);
        match known.get(&uid) {
            Some(l) if l.generation == generation => {
                custody.recorded.insert((uid, generation), l.index);
            }
            last => {
                let action = if last.is_some() {
                    "mailbox-grant.changed"
                } else {
                    "mailbox-grant.created"
                };
                records.push((uid, Some(generation), name, action, custody_detail(&grant.spec)));
            }
        }
    }
    let present: std::collections::HashSet<String> = all.iter().filter_map(|g| g.uid()).collect();
    for (uid, l) in &known {
        if !present.contains(uid) {
            records.push((
                uid.clone(),
                None,
                l.name.clone(),
                "mailbox-grant.deleted",
                String::new(),
            ));
        }
    }
    for (uid, generation, name, action, detail) in records {
        let record = crate::audit::Record::Custody {
            action: action.into(),
            subject: format!("MailboxGrant/{name}"),
            by: "kubernetes (the apiserver's audit log names the user)".into(),
            at: now,
            detail,
        };
        let index = match super::custody::append(&trail, record).await {
            Ok(index) => index,
            Err(err) => {
                warn!(grant = name, %err, "cannot record the grant in the audit log; will retry");
                continue;
            }
        };
        info!(grant = name, index, action, "audit log: grant recorded");
        let last = generation.map(|generation| super::custody::Logged {
            generation,
            index,
            name: name.clone(),
            spec: None,
        });
        if let Err(err) = super::custody::remember(ctx, KIND, &uid, last.as_ref()).await {
            warn!(grant = name, %err, "cannot remember the grant's record; it may be recorded again");
        }
        if let Some(generation) = generation {
            custody.recorded.insert((uid, generation), index);
        }
    }
    custody.recorded.retain(|(uid, _), _| present.contains(uid));
}

/// Writes the statuses that changed: what each grant covers and how many subscriptions
/// receive through it.
async fn write_statuses(
    ctx: &Context,
    grants: &reflector::Store<MailboxGrant>,
    written: &mut HashMap<String, MailboxGrantStatus>,
    custody: &Custody,
) {
    let recorded = ctx.state.lock().grants.clone();
    let counts = ctx.grant_users();
    let now = Time(jiff::Timestamp::now());
    let leader = ctx.leadership.is_leader();
    if !leader {
        written.clear();
        return;
    }
    for grant in grants.state() {
        let name = grant.name_any();
        let Some(state) = recorded.get(&name).filter(|s| s.uid == grant.uid()) else {
            continue;
        };
        let previous = written
            .get(&name)
            .cloned()
            .or_else(|| grant.status.clone())
            .unwrap_or_default();
        let mut desired = grant_status(
            &previous,
            &grant.spec,
            state,
            counts.get(&name).copied().unwrap_or(0),
            &now,
        );
        let generation = grant.metadata.generation.unwrap_or(0);
        if let Some(index) = custody.recorded.get(&(grant.uid().unwrap_or_default(), generation)) {
            desired.log_index = Some(*index);
            desired.logged_generation = Some(generation);
        }
        if grant.status.as_ref() == Some(&desired) || written.get(&name) == Some(&desired) {
            continue;
        }
        ctx.api_limiter.until_ready().await;
        match write_status(&ctx.client, &name, &desired).await {
            Ok(()) => {
                written.insert(name, desired);
            }
            Err(err) => warn!(grant = name, %err, "cannot write MailboxGrant status; will retry"),
        }
    }
    written.retain(|name, _| recorded.contains_key(name));
}

/// Reconciles again every subscription of `namespaces`.
fn retrigger_namespaces(ctx: &Context, namespaces: &BTreeSet<String>) {
    let refs: Vec<(String, ObjectRef<WebhookSubscription>)> = ctx
        .subscriptions
        .state()
        .iter()
        .filter_map(|w| {
            let ns = w.namespace()?;
            namespaces.contains(&ns).then(|| (ns, ObjectRef::from_obj(w.as_ref())))
        })
        .collect();
    for (scope, tx) in &ctx.retrigger {
        for (ns, r) in &refs {
            if scope.as_deref().is_none_or(|s| s == ns) {
                // Closed only at shutdown, when nothing needs reconciling any more.
                let _ = tx.send(r.clone());
            }
        }
    }
}

/// Once at start, when every subscription is cached and every grant recorded: names the
/// namespaces whose subscriptions no grant covers, so that an upgrade that stopped them
/// says so in the log.
pub fn log_ungranted(ctx: &Context) {
    let objects = ctx.subscriptions.state();
    let mut ungranted: BTreeSet<String> = BTreeSet::new();
    {
        let state = ctx.state.lock();
        for w in &objects {
            let Some(ns) = w.namespace() else { continue };
            if state.grants_of(&ns).is_empty() {
                ungranted.insert(ns);
            }
        }
    }
    if !ungranted.is_empty() {
        warn!(
            namespaces = ungranted.iter().cloned().collect::<Vec<_>>().join(","),
            "these namespaces have WebhookSubscriptions but no MailboxGrant: they receive nothing (Ready=False, NotGranted) until a cluster admin grants them mail"
        );
    } else if !objects.is_empty() {
        info!("every namespace with WebhookSubscriptions is covered by a MailboxGrant");
    }
}

/// Writes a MailboxGrant's status (cluster-scoped).
async fn write_status(client: &Client, name: &str, status: &MailboxGrantStatus) -> Result<(), kube::Error> {
    super::apply_cluster_status::<MailboxGrant>(client, name, status).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PayloadMode;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    #[test]
    fn reasons_on_the_wire() {
        assert_eq!(
            [Reason::Valid, Reason::InvalidPattern].map(|r| r.as_str()),
            ["Valid", "InvalidPattern"]
        );
    }

    fn namespaces() -> BTreeMap<String, BTreeMap<String, String>> {
        let mut all = BTreeMap::new();
        all.insert(
            "a".to_string(),
            BTreeMap::from([("team".to_string(), "finance".to_string())]),
        );
        all.insert("b".to_string(), BTreeMap::new());
        all
    }

    #[test]
    fn names_and_selector_add_up() {
        let spec = MailboxGrantSpec {
            namespaces: vec!["c".into()],
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("team".to_string(), "finance".to_string())])),
                ..Default::default()
            }),
            mailboxes: vec!["*@finance.example".into()],
            max_payload_mode: PayloadMode::Full,
            ..Default::default()
        };
        let state = evaluate("g", (None, Some(3)), &spec, &namespaces());
        assert_eq!(state.covered, vec!["a", "c"]);
        assert_eq!(state.ready.status, Status::True);
        let status = grant_status(
            &MailboxGrantStatus::default(),
            &spec,
            &state,
            2,
            &Time(jiff::Timestamp::UNIX_EPOCH),
        );
        assert_eq!(status.namespace_summary.as_deref(), Some("a,c"));
        assert_eq!(status.mailbox_summary.as_deref(), Some("*@finance.example"));
        assert_eq!((status.subscriptions, status.observed_generation), (2, Some(3)));
    }

    #[test]
    fn an_invalid_grant_grants_nothing_and_names_the_field() {
        let spec = MailboxGrantSpec {
            namespaces: vec!["a".into()],
            domains: vec!["no domain".into()],
            ..Default::default()
        };
        let state = evaluate("g", (None, None), &spec, &namespaces());
        assert!(state.compiled.is_none());
        assert_eq!(state.ready.reason, Reason::InvalidPattern);
        assert!(
            state.ready.message.starts_with("spec.domains[0]"),
            "{}",
            state.ready.message
        );
    }

    #[test]
    fn summaries_stay_short() {
        let names = ["a", "b", "c", "d", "e"];
        assert_eq!(summary(names.into_iter()).as_deref(), Some("a,b,c,+2"));
        assert_eq!(summary(std::iter::empty()), None);
    }
}
