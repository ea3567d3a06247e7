//! The controllers: they watch WebhookSubscriptions, MailboxFilters and the Secrets they
//! reference, validate them, and write conditions. They never block the data path.

pub mod conditions;
pub mod filter;
pub mod subscription;

use std::sync::Arc;
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
}

/// What both reconcilers share.
pub struct Context {
    pub client: Client,
    recorder: Recorder,
    pub subscriptions: Store<WebhookSubscription>,
    pub filters: Store<MailboxFilter>,
}

impl Context {
    /// Records a Kubernetes Event on `regarding`. Failing to record is logged, not fatal.
    async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: K8sEventType,
        reason: &str,
        note: &str,
    ) {
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
async fn write_status<K>(
    client: &Client,
    ns: &str,
    name: &str,
    status: &impl Serialize,
) -> Result<(), Error>
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

fn error_policy<K>(obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action
where
    K: ResourceExt,
{
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

fn in_namespace<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    ns: Option<String>,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace == ns)
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Runs both controllers over `namespace` (all namespaces when None) until `shutdown`.
/// `on_ready` is called once both object caches have their initial list.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    on_ready: impl FnOnce() + Send + 'static,
) {
    let ns = namespace.as_deref();
    let config = watcher::Config::default();
    let subscriptions = Controller::new(api::<WebhookSubscription>(&client, ns), config.clone());
    let filters = Controller::new(api::<MailboxFilter>(&client, ns), config.clone());
    let subscription_store = subscriptions.store();
    let filter_store = filters.store();

    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        subscriptions: subscription_store.clone(),
        filters: filter_store.clone(),
    });

    // A Secret change re-checks the subscriptions that name it.
    let by_secret = subscription_store.clone();
    // Any filter change re-checks its namespace's subscriptions (refs, selectors, labels).
    let by_filter = subscription_store.clone();
    // Any subscription change refreshes its namespace's filters' lists of users.
    let by_subscription = filter_store.clone();

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

    let subscriptions = subscriptions
        .watches(
            api::<Secret>(&client, ns),
            config.clone(),
            move |secret: Secret| {
                let name = secret.name_any();
                by_secret
                    .state()
                    .iter()
                    .filter(|w| {
                        w.namespace() == secret.namespace()
                            && subscription::referenced_secrets(&w.spec).contains(&name)
                    })
                    .map(|w| ObjectRef::from_obj(w.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
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
            config,
            move |w: WebhookSubscription| in_namespace(&by_subscription, w.namespace()),
        )
        .graceful_shutdown_on(stop(&shutdown_tx))
        .run(filter::reconcile, error_policy, ctx)
        .for_each(|_| async {});

    let ready = async move {
        if subscription_store.wait_until_ready().await.is_ok()
            && filter_store.wait_until_ready().await.is_ok()
        {
            on_ready();
        }
    };
    tokio::join!(signal, subscriptions, filters, ready);
}
