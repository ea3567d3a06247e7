//! MailboxFilter: compile (once per generation) → record. Which subscriptions use a
//! filter is known from their reconciles; the status writer lists them, so a change to a
//! subscription never re-runs its filters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use tracing::instrument;

use super::conditions::{Desired, READY, Status};
use super::{Context, Error, FilterState};

use crate::api::{MailboxFilter, WebhookSubscriptionSpec};
use crate::route::CompiledFilter;

pub mod reason {
    pub const VALID: &str = "Valid";
    pub const INVALID_PATTERN: &str = "InvalidPattern";
}

/// Whether a subscription (of the filter's namespace) uses the filter `name` with
/// `labels`, by name or by label selector. Pure.
pub fn uses(spec: &WebhookSubscriptionSpec, name: &str, labels: &BTreeMap<String, String>) -> bool {
    spec.filter_refs.iter().any(|r| r == name)
        || spec
            .filter_selector
            .clone()
            .and_then(|s| Selector::try_from(s).ok())
            .is_some_and(|s| s.matches(labels))
}

/// The `Ready` condition of a filter and its compiled form. Pure.
pub fn compile(filter: &MailboxFilter) -> (Desired, Option<Arc<CompiledFilter>>) {
    condition(
        CompiledFilter::compile(&filter.spec)
            .map(Arc::new)
            .map_err(|e| e.to_string()),
    )
}

/// The `Ready` condition for a compile outcome. Pure.
pub fn condition(compiled: Result<Arc<CompiledFilter>, String>) -> (Desired, Option<Arc<CompiledFilter>>) {
    match compiled {
        Ok(compiled) => (
            Desired {
                type_: READY,
                status: Status::True,
                reason: reason::VALID,
                message: "Every pattern compiled; the filter is in use for routing.".to_string(),
            },
            Some(compiled),
        ),
        Err(e) => (
            Desired {
                type_: READY,
                status: Status::False,
                reason: reason::INVALID_PATTERN,
                message: format!("{e}. Subscriptions using this filter are not Ready until it is fixed."),
            },
            None,
        ),
    }
}

#[instrument(skip_all, fields(namespace = filter.namespace().unwrap_or_default(), name = filter.name_any()))]
pub async fn reconcile(filter: Arc<MailboxFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = filter.namespace().ok_or(Error::NotNamespaced)?;
    let (ready, compiled) = condition(ctx.compiled(&filter));
    // An invalid pattern stays invalid until the filter is edited (which is watched).
    let stalled = compiled.is_none();
    let (name, labels) = (filter.name_any(), filter.labels().clone());
    let changed = ctx.record_filter(
        (ns.clone(), name.clone()),
        FilterState {
            generation: filter.metadata.generation,
            ready,
            compiled,
            labels: labels.clone(),
            version: 0,
        },
    );
    if changed {
        ctx.retrigger_users(&ns, &name, Some(&labels));
    }
    ctx.metrics
        .reconcile_duration
        .with_label_values(&["MailboxFilter"])
        .observe(started.elapsed().as_secs_f64());
    if stalled {
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MailboxFilterSpec, MatchCriteria};

    #[test]
    fn invalid_pattern_names_field_and_consequence() {
        let f = MailboxFilter::new(
            "f",
            MailboxFilterSpec {
                criteria: MatchCriteria {
                    domains: vec!["@bad".into()],
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let (ready, compiled) = compile(&f);
        assert_eq!((ready.status, ready.reason), (Status::False, reason::INVALID_PATTERN));
        assert!(ready.message.starts_with("spec.domains[0]:"), "{}", ready.message);
        assert!(compiled.is_none());
    }
}
