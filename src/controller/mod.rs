//! The controllers: they watch WebhookSubscriptions, MailboxFilters and the Secrets they
//! reference, validate them, and write conditions. They never block the data path. An
//! inbound adapter (from Kubernetes): depends on the core and the shared `handles`, never
//! on another adapter.

pub mod audit_key;
pub mod conditions;
pub mod custody;
pub mod filter;
pub mod grant;
pub mod hold;
pub mod mail_source;
pub mod status;
pub mod subscription;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType as K8sEventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_runtime::Predicate;
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::api::{MailboxFilter, WebhookSubscription};
use crate::delivery::Deliveries;
use crate::handles::{Directory, MatchCounters, ReadinessPart};
use crate::metrics::Metrics;
use crate::route::{
    CompiledFilter, CompiledGrant, FilterBudget, FilterEntry, FilterError, Grants, Router, RoutingTable,
    SubscriptionRoute,
};
use conditions::Desired;

/// Waits until `store` has its initial list. kube-runtime's readiness signal keeps only
/// the last waiter's waker, so several waiters can miss it: poll it again every 100 ms.
pub async fn synced<K>(store: &Store<K>) -> Result<(), Error>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) = tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            return result.map_err(|_| Error::StoreClosed);
        }
    }
}

/// The object caches of one kind over every watched namespace: one reflector store per
/// `--watch-namespace` (or one over all namespaces). Everything that decides what exists
/// (routing, status, garbage collection, readiness) reads the union, so a namespace's
/// reconcile never drops another namespace's objects.
pub struct Caches<K: kube::runtime::reflector::Lookup<DynamicType = ()> + Clone + 'static> {
    /// (scope, store): scope None covers every namespace.
    stores: Vec<(Option<String>, Store<K>)>,
}

impl<K> Caches<K>
where
    K: kube::runtime::reflector::Lookup<DynamicType = ()> + Clone + 'static,
{
    pub fn new(stores: Vec<(Option<String>, Store<K>)>) -> Caches<K> {
        Caches { stores }
    }

    /// Every cached object, over every watched namespace.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.stores.iter().flat_map(|(_, s)| s.state()).collect()
    }

    /// Waits until every store has its initial list.
    pub async fn synced(&self) -> Result<(), Error> {
        for (_, store) in &self.stores {
            synced(store).await?;
        }
        Ok(())
    }

    /// Waits until the store covering `namespace` has its initial list. A reconcile waits
    /// for its own namespace only: one namespace whose list never comes (say, a Role
    /// missing there) must not hold up every other.
    pub async fn synced_for(&self, namespace: &str) -> Result<(), Error> {
        for (scope, store) in &self.stores {
            if scope.as_deref().is_none_or(|s| s == namespace) {
                synced(store).await?;
            }
        }
        Ok(())
    }
}

/// The one field manager under which the operator writes status (server-side apply).
pub const FIELD_MANAGER: &str = "mailhook";

/// Writes the status of a cluster-scoped object with server-side apply, within 10 s.
pub(crate) async fn apply_cluster_status<K>(
    client: &Client,
    name: &str,
    status: &impl Serialize,
) -> Result<(), kube::Error>
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let (params, patch) = (
        kube::api::PatchParams::apply(FIELD_MANAGER).force(),
        kube::api::Patch::Apply(&patch),
    );
    let call = api.patch_status(name, &params, &patch);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(result) => result.map(|_| ()),
        Err(_) => Err(kube::Error::Service("status write timed out after 10 s".into())),
    }
}

/// Why a reconcile failed and is retried (what is wrong with a resource is not an error:
/// it goes on the resource's status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read what the subscription references")]
    Dereference(#[from] subscription::DereferenceError),
    #[error("cannot replay dead letters")]
    Replay(#[from] subscription::ReplayError),
    #[error("object has no namespace")]
    NotNamespaced,
    #[error("the object cache shut down")]
    StoreClosed,
    #[error("{GRANTS_NOT_LISTED}")]
    GrantsNotListed,
}

/// Why nothing can be judged granted yet.
const GRANTS_NOT_LISTED: &str =
    "the MailboxGrants and Namespaces are not listed yet (the operator needs list and watch on both, cluster-wide)";

/// What the operator knows of one subscription since its last reconcile.
#[derive(Clone)]
pub struct SubscriptionState {
    pub generation: Option<i64>,
    /// Host (and port) of the endpoint, for the status column; None if the URL is unusable.
    pub endpoint_host: Option<String>,
    pub ready: Desired<subscription::Reason>,
    pub route: Option<SubscriptionRoute>,
    pub shard: u32,
    pub paused: bool,
    /// The last replay handled through the annotation (this process's, or None).
    pub last_replay: Option<crate::api::ReplayStatus>,
    /// `whpk_` keys of the ed25519 signing keys.
    pub signing_public_keys: Vec<String>,
    /// `kid` of the public key deliveries are encrypted to (`payload.encryption`).
    pub encryption_key_id: Option<String>,
    pub insecure_skip_tls_verify: bool,
    /// Names of the MailboxFilters it names or selects that exist (valid or not): each
    /// filter's status lists the subscriptions using it from these.
    pub uses: Vec<String>,
    /// The MailboxGrants it receives through (empty when it is not granted anything).
    pub grants: Vec<String>,
    /// The cap on its backlog the data path was given (None: no cap, or not valid).
    pub backlog_cap: Option<crate::store::BacklogCap>,
    /// `State::version` when this was recorded.
    pub version: u64,
}

/// What the operator knows of one filter since its last reconcile.
#[derive(Clone)]
pub struct FilterState {
    pub generation: Option<i64>,
    pub ready: Desired<filter::Reason>,
    pub compiled: Option<Arc<CompiledFilter>>,
    /// Refused, uncompiled, as one of the newest beyond `--filter-max-per-namespace`.
    pub counted_out: bool,
    /// Its labels (selectors match them).
    pub labels: std::collections::BTreeMap<String, String>,
    /// `State::version` when this was recorded.
    pub version: u64,
}

/// Keys by (namespace, name).
type Key = (String, String);

#[derive(Default)]
pub struct State {
    pub subscriptions: HashMap<String, SubscriptionState>,
    pub filters: HashMap<Key, FilterState>,
    /// MailboxGrants by name.
    pub grants: std::collections::BTreeMap<String, grant::GrantState>,
    /// Bumped on every change that the routing table reflects.
    pub version: u64,
}

impl State {
    /// The next version, for a change about to be recorded.
    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// The valid grants that cover `namespace`, by name.
    pub fn grants_of(&self, namespace: &str) -> Vec<Arc<CompiledGrant>> {
        self.grants
            .values()
            .filter(|g| g.covered.iter().any(|n| n == namespace))
            .filter_map(|g| g.compiled.clone())
            .collect()
    }

    /// Every (covered namespace, grant) pair, as the routing table takes them.
    fn grants(&self) -> Grants {
        Grants::build(self.grants.values().flat_map(|g| {
            g.compiled
                .iter()
                .flat_map(move |c| g.covered.iter().map(move |n| (n.clone(), c.clone())))
        }))
    }
}

/// The routing table follows `State` through one rebuilder task: many changes arriving
/// together (a `kubectl apply` of a thousand resources) cost one rebuild, not one each.
#[derive(Default)]
pub struct Routes {
    wake: tokio::sync::Notify,
    /// The `State::version` the current table was built from.
    routed: std::sync::atomic::AtomicU64,
}

/// A change waits this long for others before the table is rebuilt.
const ROUTES_DEBOUNCE: Duration = Duration::from_millis(20);

impl Routes {
    /// The version the routing table reflects: status written from a state at or below
    /// it describes what routing does.
    pub fn routed(&self) -> u64 {
        self.routed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A filter compiled once per generation, shared by its own reconcile and those of the
/// subscriptions that use it (a thousand subscriptions over one filter compile it once).
pub type Compiled = Result<Arc<CompiledFilter>, FilterError>;

/// One filter generation's compile, filled by the first reconcile that asks.
type CompileCell = Arc<tokio::sync::OnceCell<Compiled>>;

/// Filters compiled at once, on blocking threads: a burst of big filters keeps the rest
/// of the blocking pool (store I/O) free.
const COMPILE_CONCURRENCY: usize = 2;

/// A token bucket over the API calls the operator sends in bursts (status writes, Events),
/// like client-go's QPS and burst: a thousand resources changing at once must not flood
/// the apiserver (which may throttle every client of it, with API Priority and Fairness).
pub type ApiLimiter = governor::DefaultDirectRateLimiter;

/// `--kube-api-qps` and `--kube-api-burst`.
#[derive(Debug, Clone, Copy)]
pub struct ApiBudget {
    pub qps: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
}

impl ApiBudget {
    fn limiter(self) -> ApiLimiter {
        governor::RateLimiter::direct(governor::Quota::per_second(self.qps).allow_burst(self.burst))
    }
}

/// What the reconcilers and the status writer share.
pub struct Context {
    pub client: Client,
    pub leadership: crate::handles::Leadership,
    recorder: Recorder,
    pub subscriptions: Caches<WebhookSubscription>,
    pub filters: Caches<MailboxFilter>,
    pub deliveries: Arc<Deliveries>,
    pub router: Arc<Router>,
    pub matches: Arc<MatchCounters>,
    pub metrics: Metrics,
    pub directory: Arc<Directory>,
    pub state: Mutex<State>,
    pub routes: Routes,
    /// True once the grant loop recorded its first complete pass: until then no
    /// subscription can be judged granted or not.
    pub grants_synced: tokio::sync::watch::Sender<bool>,
    /// Compiled filters by UID, with the generation compiled; the cell is filled once,
    /// however many reconciles ask for it meanwhile.
    compiled: Mutex<HashMap<String, (Option<i64>, CompileCell)>>,
    /// Permits to compile (`COMPILE_CONCURRENCY`).
    compiling: tokio::sync::Semaphore,
    pub filter_budget: FilterBudget,
    /// Wakes the status writer: something changed that should show at once.
    pub status_changed: Arc<tokio::sync::Notify>,
    /// What building a subscription's delivery configuration needs besides the resource.
    pub build: subscription::BuildSettings,
    /// The client-side budget of status writes and Events.
    api_limiter: ApiLimiter,
    /// The watched namespaces; None when all are.
    watched: Option<std::collections::HashSet<String>>,
    /// Asks the subscription controller of each scope to reconcile a subscription.
    retrigger: Vec<(
        Option<String>,
        tokio::sync::mpsc::UnboundedSender<ObjectRef<WebhookSubscription>>,
    )>,
    /// Likewise for filters, whose place in their namespace's count changed.
    filter_retrigger: Vec<(
        Option<String>,
        tokio::sync::mpsc::UnboundedSender<ObjectRef<MailboxFilter>>,
    )>,
}

impl Context {
    /// Whether every object in the caches has been reconciled at least once, and the
    /// routing table reflects it.
    fn all_reconciled(&self) -> bool {
        let state = self.state.lock();
        *self.grants_synced.borrow()
            && self.routes.routed() >= state.version
            && self
                .subscriptions
                .state()
                .iter()
                .all(|w| w.uid().is_some_and(|u| state.subscriptions.contains_key(&u)))
            && self.filters.state().iter().all(|f| {
                state
                    .filters
                    .contains_key(&(f.namespace().unwrap_or_default(), f.name_any()))
            })
    }

    /// Once the caches are synced: drops the stored work of subscriptions that exist in no
    /// watched namespace (deleted while the operator was down). A failure is logged and
    /// left for the next start; it never holds up readiness.
    async fn drop_orphans(&self) {
        let live: std::collections::HashSet<String> =
            self.subscriptions.state().iter().filter_map(|w| w.uid()).collect();
        let (deliveries, watched) = (self.deliveries.clone(), self.watched.clone());
        match tokio::task::spawn_blocking(move || deliveries.drop_orphans(&live, watched.as_ref())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(subscriptions = n, "dropped stored work of deleted subscriptions"),
            Ok(Err(err)) => {
                warn!(%err, "cannot drop the stored work of deleted subscriptions; will try at the next start")
            }
            Err(err) => warn!(%err, "dropping the stored work of deleted subscriptions stopped unexpectedly"),
        }
    }

    /// Records what a subscription reconcile decided. The routing table follows when the
    /// route changed; otherwise (a periodic re-check) only the status writer is woken.
    pub fn record_subscription(&self, uid: String, mut state: SubscriptionState) {
        let mut all = self.state.lock();
        let same_route = all
            .subscriptions
            .get(&uid)
            .filter(|old| old.route == state.route)
            .map(|old| old.version);
        let rebuild = same_route.is_none();
        state.version = match same_route {
            Some(version) => version,
            None => all.next_version(),
        };
        all.subscriptions.insert(uid, state);
        drop(all);
        self.changed(rebuild);
    }

    /// Records what a filter reconcile decided; returns whether it changed anything a
    /// subscription sees (new, compiled anew, labels), which then re-checks its users.
    pub fn record_filter(&self, key: Key, mut state: FilterState) -> bool {
        let mut all = self.state.lock();
        let same = all.filters.get(&key).filter(|old| {
            old.labels == state.labels
                && match (&old.compiled, &state.compiled) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
        });
        let changed = same.is_none();
        state.version = match same {
            Some(old) => old.version,
            None => all.next_version(),
        };
        all.filters.insert(key, state);
        drop(all);
        self.changed(changed);
        changed
    }

    /// After a change to state: rebuild the routing table (which then wakes the status
    /// writer), or only wake the status writer.
    fn changed(&self, rebuild: bool) {
        if rebuild {
            self.routes.wake.notify_one();
        } else {
            self.status_changed.notify_one();
        }
    }

    /// Records the grants of a pass (every grant that exists); returns the namespaces whose
    /// grants changed, whose subscriptions are then checked again. A grant of the same UID,
    /// spec and namespaces keeps its compiled form, so an idle pass changes nothing. The
    /// routing table is rebuilt here, before anyone is told.
    pub fn record_grants(
        &self,
        mut grants: std::collections::BTreeMap<String, grant::GrantState>,
    ) -> std::collections::BTreeSet<String> {
        let mut all = self.state.lock();
        let mut changed = std::collections::BTreeSet::new();
        for (name, new) in grants.iter_mut() {
            match all.grants.get(name) {
                Some(old)
                    if old.uid == new.uid
                        && old.spec == new.spec
                        && old.covered == new.covered
                        && old.compiled.is_some() == new.compiled.is_some() =>
                {
                    new.compiled = old.compiled.clone();
                }
                old => {
                    changed.extend(new.covered.iter().cloned());
                    changed.extend(old.into_iter().flat_map(|o| o.covered.iter().cloned()));
                }
            }
        }
        for (name, old) in &all.grants {
            if !grants.contains_key(name) {
                changed.extend(old.covered.iter().cloned());
            }
        }
        let rebuild = all.grants.len() != grants.len()
            || all
                .grants
                .iter()
                .zip(grants.iter())
                .any(|((a, x), (b, y))| a != b || !same_grant(x, y));
        all.grants = grants;
        if rebuild {
            all.next_version();
        }
        drop(all);
        if rebuild {
            let version = self.rebuild_routes();
            self.routes
                .routed
                .fetch_max(version, std::sync::atomic::Ordering::AcqRel);
            self.metrics.route_rebuilds.inc();
            self.status_changed.notify_one();
        }
        changed
    }

    /// How many subscriptions receive through each grant.
    pub fn grant_users(&self) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for s in self.state.lock().subscriptions.values() {
            for g in &s.grants {
                *counts.entry(g.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Reconciles again the subscriptions of `namespace` that name or select `filter`, or
    /// used a filter of that name before: the filter appeared, changed or went away. Sent
    /// after the filter's cache holds the change, so their reconcile sees it.
    pub fn retrigger_users(
        &self,
        namespace: &str,
        filter: &str,
        labels: Option<&std::collections::BTreeMap<String, String>>,
    ) {
        let state = self.state.lock();
        let users: Vec<ObjectRef<WebhookSubscription>> = self
            .subscriptions
            .state()
            .iter()
            .filter(|w| w.metadata.namespace.as_deref() == Some(namespace))
            .filter(|w| {
                let used_before = w
                    .metadata
                    .uid
                    .as_deref()
                    .and_then(|u| state.subscriptions.get(u))
                    .is_some_and(|s| s.uses.iter().any(|f| f == filter));
                used_before || labels.is_some_and(|l| filter::uses(&w.spec, filter, l))
            })
            .map(|w| ObjectRef::from_obj(w.as_ref()))
            .collect();
        drop(state);
        for (scope, tx) in &self.retrigger {
            if scope.as_deref().is_none_or(|s| s == namespace) {
                for user in &users {
                    // Closed only at shutdown, when nothing needs reconciling any more.
                    let _ = tx.send(user.clone());
                }
            }
        }
    }

    /// Forgets subscriptions (by UID) and, with `live_filters`, the filters not in
    /// `filters`; the users of a forgotten filter are reconciled again (FilterNotFound).
    fn forget(&self, subscriptions: &[String], filters: &std::collections::HashSet<Key>, live_filters: bool) {
        let mut all = self.state.lock();
        let before = (all.subscriptions.len(), all.filters.len());
        for uid in subscriptions {
            all.subscriptions.remove(uid);
        }
        let mut gone = Vec::new();
        if live_filters {
            gone = all.filters.keys().filter(|k| !filters.contains(*k)).cloned().collect();
            all.filters.retain(|k, _| filters.contains(k));
        }
        if before != (all.subscriptions.len(), all.filters.len()) {
            all.next_version();
            drop(all);
            self.routes.wake.notify_one();
        } else {
            drop(all);
        }
        for (ns, name) in gone {
            self.retrigger_users(&ns, &name, None);
        }
    }

    /// The compiled form of `filter`, compiling (on a blocking thread, never on the
    /// reconcile's) only when its UID or generation is new.
    pub async fn compiled(&self, filter: &MailboxFilter) -> Compiled {
        let Some(uid) = filter.uid() else {
            return self.compile_off(filter).await;
        };
        let generation = filter.metadata.generation;
        let cell = {
            let mut cache = self.compiled.lock();
            match cache.get(&uid) {
                Some((g, cell)) if *g == generation => cell.clone(),
                _ => {
                    let cell = Arc::new(tokio::sync::OnceCell::new());
                    cache.insert(uid, (generation, cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_init(|| self.compile_off(filter)).await.clone()
    }

    async fn compile_off(&self, filter: &MailboxFilter) -> Compiled {
        // The semaphore is never closed; without a permit the compile would still be right.
        let _permit = self.compiling.acquire().await.ok();
        let (spec, budget) = (filter.spec.clone(), self.filter_budget);
        tokio::task::spawn_blocking(move || CompiledFilter::compile_within(&spec, budget).map(Arc::new))
            .await
            .unwrap_or_else(|e| {
                Err(FilterError {
                    field: "spec".to_string(),
                    problem: format!("compiling the filter stopped unexpectedly ({e}); edit it to try again"),
                    kind: crate::route::Problem::Invalid,
                })
            })
    }

    /// Drops the compiled forms of filters whose UID is not in `live`.
    fn forget_compiled(&self, live: &std::collections::HashSet<String>) {
        self.compiled.lock().retain(|uid, _| live.contains(uid));
    }

    /// Why `filter` is refused for the namespace's count: it is not among the oldest
    /// `--filter-max-per-namespace` (by creationTimestamp, then name). Counted from the
    /// cache, without compiling anything.
    pub fn counted_out(&self, filter: &MailboxFilter) -> Option<String> {
        // Called once per filter and per subscription's filter: compared in place, no copies.
        let ns = filter.metadata.namespace.as_deref();
        let key = age_ref(filter);
        let (mut older, mut total) = (0usize, 0usize);
        for f in self.filters.state() {
            if f.metadata.namespace.as_deref() != ns {
                continue;
            }
            total += 1;
            if age_ref(&f) < key {
                older += 1;
            }
        }
        let limit = self.filter_budget.max_per_namespace;
        (older >= limit).then(|| filter::over_count_message(older + 1, total, limit))
    }

    /// What a subscription using `filter` is told is wrong with it, if anything.
    pub async fn filter_problem(&self, filter: &MailboxFilter) -> Option<String> {
        match self.counted_out(filter) {
            Some(why) => Some(why),
            None => self.compiled(filter).await.err().map(|e| e.to_string()),
        }
    }

    /// The filters beyond their namespace's count (`counted_out`), all at once.
    fn over_count(&self) -> std::collections::HashSet<Key> {
        let mut by_ns: HashMap<String, Vec<Arc<MailboxFilter>>> = HashMap::new();
        for f in self.filters.state() {
            by_ns.entry(f.namespace().unwrap_or_default()).or_default().push(f);
        }
        let limit = self.filter_budget.max_per_namespace;
        let mut over = std::collections::HashSet::new();
        for (ns, mut filters) in by_ns {
            if filters.len() <= limit {
                continue;
            }
            filters.sort_by_cached_key(|f| age_key(f));
            over.extend(filters.iter().skip(limit).map(|f| (ns.clone(), f.name_any())));
        }
        over
    }

    /// Reconciles again the filters whose recorded count decision no longer holds (one
    /// older went away, or a newer one sorts before it).
    fn recheck_counts(&self, over: &std::collections::HashSet<Key>) {
        let stale: Vec<Key> = {
            let state = self.state.lock();
            state
                .filters
                .iter()
                .filter(|(key, f)| f.counted_out != over.contains(*key))
                .map(|(key, _)| key.clone())
                .collect()
        };
        for (ns, name) in stale {
            for (scope, tx) in &self.filter_retrigger {
                if scope.as_deref().is_none_or(|s| s == ns) {
                    // Closed only at shutdown, when nothing needs reconciling any more.
                    let _ = tx.send(ObjectRef::new(&name).within(&ns));
                }
            }
        }
    }

    /// Rebuilds the routing table from the current state and swaps it in; returns the
    /// version it reflects.
    fn rebuild_routes(&self) -> u64 {
        // Decided from the cache here too: a filter that a newer-created one outranks
        // leaves routing at once, before its own reconcile records it.
        let over = self.over_count();
        let (version, subscriptions, filters, grants) = {
            let state = self.state.lock();
            let subscriptions: Vec<SubscriptionRoute> =
                state.subscriptions.values().filter_map(|s| s.route.clone()).collect();
            let filters: Vec<FilterEntry> = state
                .filters
                .iter()
                .filter(|(key, _)| !over.contains(*key))
                .filter_map(|((ns, name), f)| {
                    f.compiled.clone().map(|compiled| FilterEntry {
                        namespace: ns.clone(),
                        name: name.clone(),
                        compiled,
                    })
                })
                .collect();
            (state.version, subscriptions, filters, state.grants())
        };
        self.router.swap(RoutingTable::build(subscriptions, filters, grants));
        self.recheck_counts(&over);
        version
    }

    /// Records a Kubernetes Event on `regarding`, within the API budget. Failing to record
    /// is logged, not fatal.
    async fn publish(&self, regarding: &ObjectReference, type_: K8sEventType, reason: &str, note: &str) {
        self.api_limiter.until_ready().await;
        self.post_event(regarding, type_, reason, note).await;
    }

    /// `publish` without waiting for the API budget: the caller has a token.
    async fn post_event(&self, regarding: &ObjectReference, type_: K8sEventType, reason: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1024).collect()),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, regarding).await {
            warn!(%err, "cannot record Event");
        }
    }
}

/// A filter's place in its namespace's count: older first, by name at the same second.
fn age_key(f: &MailboxFilter) -> (Option<jiff::Timestamp>, String) {
    (f.metadata.creation_timestamp.as_ref().map(|t| t.0), f.name_any())
}

/// `age_key` without copying the name.
fn age_ref(f: &MailboxFilter) -> (Option<jiff::Timestamp>, &str) {
    (
        f.metadata.creation_timestamp.as_ref().map(|t| t.0),
        f.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Whether two records of one grant route alike.
fn same_grant(a: &grant::GrantState, b: &grant::GrantState) -> bool {
    a.covered == b.covered
        && match (&a.compiled, &b.compiled) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            (None, None) => true,
            _ => false,
        }
}

/// Keeps the routing table in step with `State`: each wake-up waits a moment for more
/// changes, then rebuilds once and lets the status writer show what is now routed.
async fn run_routes(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = ctx.routes.wake.notified() => {}
        }
        tokio::time::sleep(ROUTES_DEBOUNCE).await;
        let version = ctx.rebuild_routes();
        // A rebuild made meanwhile (by the grant loop) may reflect a later version.
        ctx.routes
            .routed
            .fetch_max(version, std::sync::atomic::Ordering::AcqRel);
        ctx.metrics.route_rebuilds.inc();
        ctx.status_changed.notify_one();
    }
}

/// Writes `status` to the status subresource with server-side apply.
async fn write_status<K>(client: &Client, ns: &str, name: &str, status: &impl Serialize) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn error_policy<K>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    ctx.metrics.reconcile_errors.with_label_values(&[&K::kind(&())]).inc();
    warn!(name = obj.name_any(), namespace = obj.namespace().unwrap_or_default(), err = %crate::error_chain(err), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A controller over `api` and the reflector store behind it. Only changes to what a
/// reconcile reads (`predicate`: generation, and for subscriptions annotations) trigger
/// one, so status writes do not; managed fields are dropped from the cache (they are
/// most of an object's size and nothing reads them).
fn controller<K, P>(api: Api<K>, config: watcher::Config, predicate: P) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    P: kube_runtime::Predicate<K> + Send + 'static,
{
    let (reader, writer) = reflector::store();
    let trigger = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicate, kube_runtime::PredicateConfig::default());
    Controller::for_stream(trigger, reader).with_config(
        kube::runtime::controller::Config::default()
            .debounce(RECONCILE_DEBOUNCE)
            .concurrency(RECONCILE_CONCURRENCY),
    )
}

/// Requests for the same object within this window are one reconcile.
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(100);
/// Reconciles in flight per controller; bounds the requests a burst sends the apiserver.
const RECONCILE_CONCURRENCY: u16 = 32;

/// The parts of the data path the controllers feed.
#[derive(Clone)]
pub struct Wiring {
    /// Whether this replica writes status and Events (always, on a store of its own).
    pub leadership: crate::handles::Leadership,
    pub deliveries: Arc<Deliveries>,
    pub router: Arc<Router>,
    pub matches: Arc<MatchCounters>,
    pub metrics: Metrics,
    pub directory: Arc<Directory>,
    /// When each source and producer was last heard from (MailSource status).
    pub activity: Arc<crate::handles::SourceActivity>,
    /// `--mail-source-selector`: the MailSources this operator judges.
    pub mail_source_selector: Option<String>,
    pub build: subscription::BuildSettings,
    pub api_budget: ApiBudget,
    pub filter_budget: FilterBudget,
    /// Where the leader publishes the audit log's verifier key, if anywhere.
    pub audit_key: Option<audit_key::Published>,
}

/// Runs both controllers for every scope in `scopes` (a namespace, or None for all
/// namespaces), the routing table's rebuilder, one status writer and one readiness check
/// over all of them, until `shutdown`. The scopes share one state and one routing table:
/// a rebuild always holds every namespace's routes. `ready` turns ready once every cache
/// is synced, every cached object reconciled and routed.
pub async fn run(
    client: Client,
    scopes: Vec<Option<String>>,
    wiring: Wiring,
    shutdown: CancellationToken,
    ready: ReadinessPart,
) {
    let config = watcher::Config::default();
    let generation_and_annotations =
        kube_runtime::predicates::generation.combine(kube_runtime::predicates::annotations);
    let scoped: Vec<_> = scopes
        .iter()
        .map(|ns| {
            let ns = ns.as_deref();
            (
                ns.map(String::from),
                controller(
                    api::<WebhookSubscription>(&client, ns),
                    config.clone(),
                    generation_and_annotations,
                ),
                // Labels too: a selector may start or stop matching.
                controller(
                    api::<MailboxFilter>(&client, ns),
                    config.clone(),
                    kube_runtime::predicates::generation.combine(kube_runtime::predicates::labels),
                ),
                tokio::sync::mpsc::unbounded_channel(),
                tokio::sync::mpsc::unbounded_channel(),
            )
        })
        .collect();

    let (activity, mail_source_selector) = (wiring.activity.clone(), wiring.mail_source_selector.clone());
    let audit_key = wiring.audit_key.clone();
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        leadership: wiring.leadership,
        recorder: Recorder::new(client.clone(), reporter),
        subscriptions: Caches::new(scoped.iter().map(|(ns, s, _, _, _)| (ns.clone(), s.store())).collect()),
        filters: Caches::new(scoped.iter().map(|(ns, _, f, _, _)| (ns.clone(), f.store())).collect()),
        retrigger: scoped
            .iter()
            .map(|(ns, _, _, (tx, _), _)| (ns.clone(), tx.clone()))
            .collect(),
        filter_retrigger: scoped
            .iter()
            .map(|(ns, _, _, _, (tx, _))| (ns.clone(), tx.clone()))
            .collect(),
        status_changed: wiring.deliveries.health_changed.clone(),
        deliveries: wiring.deliveries,
        router: wiring.router,
        matches: wiring.matches,
        metrics: wiring.metrics,
        directory: wiring.directory,
        build: wiring.build,
        api_limiter: wiring.api_budget.limiter(),
        state: Mutex::default(),
        routes: Routes::default(),
        grants_synced: tokio::sync::watch::Sender::new(false),
        compiled: Mutex::default(),
        compiling: tokio::sync::Semaphore::new(COMPILE_CONCURRENCY),
        filter_budget: wiring.filter_budget,
        watched: scopes.iter().cloned().collect::<Option<_>>(),
    });

    let mut loops: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
    for (ns, subscriptions, filters, (_, retriggered), (_, filters_retriggered)) in scoped {
        let ns = ns.as_deref();
        // A Secret change re-checks the subscriptions that name it.
        let by_secret = subscriptions.store();
        // A filter's spec, labels or existence changing re-checks the subscriptions that
        // name it, select it, or used it: its reconcile asks for them (`retrigger_users`).
        let retriggered =
            futures::stream::unfold(retriggered, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let subscriptions = subscriptions
            .watches(api::<Secret>(&client, ns), config.clone(), move |secret: Secret| {
                let name = secret.name_any();
                by_secret
                    .state()
                    .iter()
                    .filter(|w| {
                        w.namespace() == secret.namespace() && subscription::referenced_secrets(&w.spec).contains(&name)
                    })
                    .map(|w| ObjectRef::from_obj(w.as_ref()))
                    .collect::<Vec<_>>()
            })
            .reconcile_on(retriggered)
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(subscription::reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        let filters_retriggered =
            futures::stream::unfold(
                filters_retriggered,
                |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
            );
        let filters = filters
            .reconcile_on(filters_retriggered)
            .graceful_shutdown_on(shutdown.clone().cancelled_owned())
            .run(filter::reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        loops.push(Box::pin(subscriptions));
        loops.push(Box::pin(filters));
    }
    let writer = status::run(ctx.clone(), shutdown.clone());
    let grants = grant::run(ctx.clone(), client.clone(), shutdown.clone());
    let holds = hold::run(ctx.clone(), client.clone(), shutdown.clone());
    let published = audit_key.map(|key| audit_key::run(client.clone(), ctx.leadership.clone(), key, shutdown.clone()));
    let mail_sources = mail_source::run(
        ctx.clone(),
        client.clone(),
        activity,
        mail_source_selector,
        shutdown.clone(),
    );
    let routes = run_routes(ctx.clone(), shutdown.clone());

    // Ready (and ingest open) only once every cached object has been reconciled into the
    // routing table: an event accepted earlier would be routed to nobody.
    let routed_ctx = ctx.clone();
    let ready_stop = shutdown.clone();
    let readiness = async move {
        let wait = async {
            if routed_ctx.subscriptions.synced().await.is_err() || routed_ctx.filters.synced().await.is_err() {
                return;
            }
            // Held mail must be archived from the first event on: the LegalHolds first.
            while !routed_ctx.all_reconciled() || routed_ctx.router.holds().is_none() {
                ready.not_ready(if !*routed_ctx.grants_synced.borrow() {
                    GRANTS_NOT_LISTED
                } else if routed_ctx.router.holds().is_none() {
                    "the LegalHolds are not listed yet (the operator needs list and watch on legalholds, cluster-wide)"
                } else {
                    "the caches are synced; reconciling every resource into the routing table"
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            routed_ctx.drop_orphans().await;
            grant::log_ungranted(&routed_ctx);
            ready.ready();
            routed_ctx.deliveries.warmed_up();
            tracing::info!("caches synced and every resource routed; ready");
        };
        tokio::select! {
            () = wait => {}
            () = ready_stop.cancelled() => {}
        }
    };
    // Each part a task of its own: in one task, every wake-up of any part polled all of
    // them, and the reconcilers (which run inside their controller's stream) shared one
    // core with the status writer's passes.
    let mut tasks = tokio::task::JoinSet::new();
    for l in loops {
        tasks.spawn(l);
    }
    tasks.spawn(readiness);
    tasks.spawn(writer);
    tasks.spawn(routes);
    tasks.spawn(grants);
    tasks.spawn(holds);
    if let Some(published) = published {
        tasks.spawn(published);
    }
    tasks.spawn(mail_sources);
    while let Some(done) = tasks.join_next().await {
        // A panic goes on up as it did when the parts were joined in one task.
        if let Err(err) = done
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
    }
}
