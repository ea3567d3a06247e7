//! The controllers: they watch WebhookSubscriptions, MailboxFilters and the Secrets they
//! reference, validate them, and write conditions. They never block the data path.

pub mod conditions;
pub mod filter;
pub mod status;
pub mod subscription;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType as K8sEventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::api::{MailboxFilter, WebhookSubscription};
use crate::delivery::Deliveries;
use crate::metrics::Metrics;
use crate::route::{CompiledFilter, FilterEntry, Router, RoutingTable, SubscriptionRoute};
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("object has no namespace")]
    NotNamespaced,
    #[error("the object cache shut down")]
    StoreClosed,
    #[error("cannot replay dead letters: {0}")]
    Replay(String),
}

/// What the operator knows of one subscription since its last reconcile.
#[derive(Clone)]
pub struct SubscriptionState {
    pub generation: Option<i64>,
    /// Host (and port) of the endpoint, for the status column; None if the URL is unusable.
    pub endpoint_host: Option<String>,
    pub ready: Desired,
    pub route: Option<SubscriptionRoute>,
    pub shard: u32,
    pub paused: bool,
    /// The last replay handled through the annotation (this process's, or None).
    pub last_replay: Option<crate::api::ReplayStatus>,
    /// `whpk_` keys of the ed25519 signing keys.
    pub signing_public_keys: Vec<String>,
    pub insecure_skip_tls_verify: bool,
    /// The endpoint URL that echoed the verification challenge (endpoint.verify).
    pub verified_url: Option<String>,
}

/// What the operator knows of one filter since its last reconcile.
#[derive(Clone)]
pub struct FilterState {
    pub generation: Option<i64>,
    pub ready: Desired,
    pub users: Vec<String>,
    pub compiled: Option<Arc<CompiledFilter>>,
}

/// Matches of one filter: how many, and the last one's time.
pub type MatchCount = (u64, Option<jiff::Timestamp>);

/// Match counts per filter, by (namespace, name).
#[derive(Default)]
pub struct MatchCounters {
    inner: Mutex<HashMap<(String, String), MatchCount>>,
}

impl MatchCounters {
    pub fn record(&self, filters: &[(String, String)], at: jiff::Timestamp) {
        if filters.is_empty() {
            return;
        }
        if let Ok(mut m) = self.inner.lock() {
            for f in filters {
                let e = m.entry(f.clone()).or_default();
                e.0 += 1;
                e.1 = Some(at);
            }
        }
    }

    /// Forgets the counts of filters not in `live` (deleted): a filter created again
    /// under the same name starts from zero.
    pub fn retain(&self, live: &std::collections::HashSet<(String, String)>) {
        if let Ok(mut m) = self.inner.lock() {
            m.retain(|k, _| live.contains(k));
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> MatchCount {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())).copied())
            .unwrap_or_default()
    }
}

/// Keys by (namespace, name).
type Key = (String, String);

/// The UID of every subscription by (namespace, name), for lookups by name.
#[derive(Default)]
pub struct Directory(RwLock<HashMap<Key, String>>);

impl Directory {
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.0
            .read()
            .ok()?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    fn set(&self, namespace: &str, name: &str, uid: &str) {
        if let Ok(mut m) = self.0.write() {
            m.insert((namespace.to_string(), name.to_string()), uid.to_string());
        }
    }

    fn forget(&self, uids: &[String]) {
        if let Ok(mut m) = self.0.write() {
            m.retain(|_, uid| !uids.contains(uid));
        }
    }
}

#[derive(Default)]
pub struct State {
    pub subscriptions: HashMap<String, SubscriptionState>,
    pub filters: HashMap<Key, FilterState>,
}

/// What the reconcilers and the status writer share.
pub struct Context {
    pub client: Client,
    recorder: Recorder,
    pub subscriptions: Caches<WebhookSubscription>,
    pub filters: Caches<MailboxFilter>,
    pub deliveries: Arc<Deliveries>,
    pub router: Arc<Router>,
    pub matches: Arc<MatchCounters>,
    pub metrics: Metrics,
    pub directory: Arc<Directory>,
    pub state: Mutex<State>,
    /// Wakes the status writer: something changed that should show at once.
    pub status_changed: Arc<tokio::sync::Notify>,
    /// Operator-wide secret from which each subscription's pseudonym key is derived.
    pub pseudonym_secret: Vec<u8>,
    /// Signs raw message links; None when the archive is off.
    pub raw_links: Option<Arc<crate::archive::RawLinks>>,
    /// Where deliveries may connect.
    pub egress: Arc<crate::delivery::egress::EgressPolicy>,
    /// The watched namespaces; None when all are.
    watched: Option<std::collections::HashSet<String>>,
}

impl Context {
    /// Whether every object in the caches has been reconciled at least once.
    fn all_reconciled(&self) -> bool {
        let Ok(state) = self.state.lock() else { return false };
        self.subscriptions
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

    /// Rebuilds the routing table from the current state and swaps it in.
    pub fn rebuild_routes(&self) {
        let Ok(state) = self.state.lock() else { return };
        let subscriptions = state.subscriptions.values().filter_map(|s| s.route.clone()).collect();
        let filters = state
            .filters
            .iter()
            .filter_map(|((ns, name), f)| {
                f.compiled.clone().map(|compiled| FilterEntry {
                    namespace: ns.clone(),
                    name: name.clone(),
                    compiled,
                })
            })
            .collect();
        self.router.swap(RoutingTable::build(subscriptions, filters));
    }

    /// Records a Kubernetes Event on `regarding`. Failing to record is logged, not fatal.
    async fn publish(&self, regarding: &ObjectReference, type_: K8sEventType, reason: &str, note: &str) {
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

/// Writes `status` to the status subresource with server-side apply.
async fn write_status<K>(client: &Client, ns: &str, name: &str, status: &impl Serialize) -> Result<(), Error>
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
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

fn error_policy<K>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    ctx.metrics.reconcile_errors.with_label_values(&[&K::kind(&())]).inc();
    warn!(name = obj.name_any(), namespace = obj.namespace().unwrap_or_default(), %err, "reconcile failed; retrying");
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

fn in_namespace<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, ns: Option<String>) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace == ns)
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// The parts of the data path the controllers feed.
#[derive(Clone)]
pub struct Wiring {
    pub deliveries: Arc<Deliveries>,
    pub router: Arc<Router>,
    pub matches: Arc<MatchCounters>,
    pub metrics: Metrics,
    pub directory: Arc<Directory>,
    pub pseudonym_secret: Vec<u8>,
    pub raw_links: Option<Arc<crate::archive::RawLinks>>,
    pub egress: Arc<crate::delivery::egress::EgressPolicy>,
}

/// Runs both controllers for every scope in `scopes` (a namespace, or None for all
/// namespaces), one status writer and one readiness check over all of them, until
/// `shutdown`. The scopes share one state and one routing table: a rebuild always holds
/// every namespace's routes. `on_ready` is called once every cache is synced and every
/// cached object reconciled.
pub async fn run(
    client: Client,
    scopes: Vec<Option<String>>,
    wiring: Wiring,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    on_ready: impl FnOnce() + Send + 'static,
) {
    let config = watcher::Config::default();
    let scoped: Vec<_> = scopes
        .iter()
        .map(|ns| {
            let ns = ns.as_deref();
            (
                ns.map(String::from),
                Controller::new(api::<WebhookSubscription>(&client, ns), config.clone()),
                Controller::new(api::<MailboxFilter>(&client, ns), config.clone()),
            )
        })
        .collect();

    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        subscriptions: Caches::new(scoped.iter().map(|(ns, s, _)| (ns.clone(), s.store())).collect()),
        filters: Caches::new(scoped.iter().map(|(ns, _, f)| (ns.clone(), f.store())).collect()),
        status_changed: wiring.deliveries.health_changed.clone(),
        deliveries: wiring.deliveries,
        router: wiring.router,
        matches: wiring.matches,
        metrics: wiring.metrics,
        directory: wiring.directory,
        pseudonym_secret: wiring.pseudonym_secret,
        raw_links: wiring.raw_links,
        egress: wiring.egress,
        state: Mutex::default(),
        watched: scopes.iter().cloned().collect::<Option<_>>(),
    });

    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let signal = {
        let tx = shutdown_tx.clone();
        async move {
            shutdown.await;
            let _ = tx.send(());
        }
    };
    let stop = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };

    let mut loops: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
    for (ns, subscriptions, filters) in scoped {
        let ns = ns.as_deref();
        // A Secret change re-checks the subscriptions that name it.
        let by_secret = subscriptions.store();
        // Any filter change re-checks its namespace's subscriptions (refs, selectors, labels).
        let by_filter = subscriptions.store();
        // Any subscription change refreshes its namespace's filters' lists of users.
        let by_subscription = filters.store();
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
            .watches(
                api::<MailboxFilter>(&client, ns),
                config.clone(),
                move |f: MailboxFilter| in_namespace(&by_filter, f.namespace()),
            )
            .graceful_shutdown_on(stop(&shutdown_tx))
            .run(subscription::reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        let filters = filters
            .watches(
                api::<WebhookSubscription>(&client, ns),
                config.clone(),
                move |w: WebhookSubscription| in_namespace(&by_subscription, w.namespace()),
            )
            .graceful_shutdown_on(stop(&shutdown_tx))
            .run(filter::reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        loops.push(Box::pin(subscriptions));
        loops.push(Box::pin(filters));
    }
    let writer = status::run(ctx.clone(), stop(&shutdown_tx));

    // Ready (and ingest open) only once every cached object has been reconciled into the
    // routing table: an event accepted earlier would be routed to nobody.
    let routed_ctx = ctx.clone();
    let ready_stop = stop(&shutdown_tx);
    let ready = async move {
        let wait = async {
            if routed_ctx.subscriptions.synced().await.is_err() || routed_ctx.filters.synced().await.is_err() {
                return;
            }
            while !routed_ctx.all_reconciled() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            routed_ctx.drop_orphans().await;
            on_ready();
        };
        tokio::select! {
            () = wait => {}
            () = ready_stop => {}
        }
    };
    tokio::join!(signal, futures::future::join_all(loops), ready, writer);
}
