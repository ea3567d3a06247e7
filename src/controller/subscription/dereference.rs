//! Step 1 of a subscription's reconcile: read what it references — its Secrets (from the
//! API), the MailboxFilters it names or selects (from the cache, compiled once per
//! generation), and what its endpoint's host resolves to (the egress guard). Everything
//! after this step is pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::core::{Selector, SelectorExt};
use kube::{Api, ResourceExt};

use crate::api::{WebhookSubscription, WebhookSubscriptionSpec};
use crate::controller::Context;

/// What a subscription references, as found.
#[derive(Default)]
pub struct References {
    /// Every Secret the spec names, by name; absent means not found.
    pub secrets: BTreeMap<String, Secret>,
    /// The MailboxFilters of the namespace that the spec names or its selector selects.
    pub filters: Vec<FilterRef>,
    /// Why the egress guard refuses the endpoint's host (or the dead-letter sink's), if it
    /// does, naming the field.
    pub egress_refused: Option<String>,
}

/// One MailboxFilter as a subscription sees it: its name, labels, and whether it compiles.
#[derive(Debug, Clone)]
pub struct FilterRef {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Why it does not compile, if it does not.
    pub invalid: Option<String>,
}

impl FilterRef {
    /// Compiles `filter` on the spot (tests, and callers without a compile cache).
    pub fn compile(filter: &crate::api::MailboxFilter) -> FilterRef {
        let invalid = crate::route::CompiledFilter::compile(&filter.spec)
            .err()
            .map(|e| e.to_string());
        FilterRef {
            name: filter.name_any(),
            labels: filter.labels().clone(),
            invalid,
        }
    }
}

/// Why references could not be read; retried (a missing Secret is not an error: it is
/// reported on the subscription).
#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("cannot read Secret {name:?}")]
    Secret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the MailboxFilter cache shut down")]
    FilterCacheClosed,
}

/// Names of every Secret a spec refers to.
pub fn referenced_secrets(spec: &WebhookSubscriptionSpec) -> Vec<String> {
    let mut names = vec![spec.signing.secret_ref.name.clone()];
    names.extend(
        spec.endpoint
            .headers
            .iter()
            .filter_map(|h| h.value_from.as_ref().map(|v| v.name.clone())),
    );
    names.extend(spec.endpoint.client_cert_secret_ref.as_ref().map(|r| r.name.clone()));
    names.extend(
        spec.payload
            .encryption
            .as_ref()
            .map(|e| e.public_key_secret_ref.name.clone()),
    );
    names.sort();
    names.dedup();
    names
}

/// How long the endpoint's host may take to resolve: a slow resolver must not hold up
/// the reconcile loop.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn dereference(ctx: &Context, whs: &WebhookSubscription, ns: &str) -> Result<References, DereferenceError> {
    // Filters not yet listed would look like FilterNotFound.
    ctx.filters
        .synced_for(ns)
        .await
        .map_err(|_| DereferenceError::FilterCacheClosed)?;

    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut refs = References::default();
    for name in referenced_secrets(&whs.spec) {
        match secrets_api.get_opt(&name).await {
            Ok(Some(secret)) => {
                refs.secrets.insert(name, secret);
            }
            Ok(None) => {}
            Err(source) => return Err(DereferenceError::Secret { name, source }),
        }
    }

    let selector = whs
        .spec
        .filter_selector
        .clone()
        .and_then(|s| Selector::try_from(s).ok());
    for f in ctx.filters.state() {
        if f.metadata.namespace.as_deref() != Some(ns) {
            continue;
        }
        let name = f.name_any();
        let named = whs.spec.filter_refs.contains(&name);
        if named || selector.as_ref().is_some_and(|s| s.matches(f.labels())) {
            refs.filters.push(FilterRef {
                invalid: ctx.filter_problem(&f).await,
                labels: f.labels().clone(),
                name,
            });
        }
    }

    let sink = whs
        .spec
        .delivery
        .dead_letter_sink
        .as_ref()
        .and_then(|s| s.uri.as_deref());
    let urls = [
        ("spec.endpoint.url", Some(whs.spec.endpoint.url.as_str())),
        ("spec.delivery.deadLetterSink.uri", sink),
    ];
    for (field, url) in urls {
        let Some(Ok(url)) = url.map(url::Url::parse) else {
            continue;
        };
        let checked = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            crate::delivery::egress::check_host(&ctx.build.egress, &url),
        )
        .await;
        // A timeout is not a refusal: the data path's resolver checks again at connect.
        if let Ok(Err(refused)) = checked {
            refs.egress_refused = Some(format!("{field}: {refused}"));
            break;
        }
    }
    Ok(refs)
}
