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

use super::conditions::{self, Desired, READY, Status};
use super::{Context, Error, FilterState};

use crate::api::{MailboxFilter, WebhookSubscriptionSpec};
use crate::route::{CompiledFilter, FilterError, Problem};

/// Reasons on the `Ready` condition of a MailboxFilter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Valid,
    InvalidPattern,
    /// Valid, but over a limit of `mailhook run` (`--filter-max-*`).
    OverBudget,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Valid => "Valid",
            Reason::InvalidPattern => "InvalidPattern",
            Reason::OverBudget => "OverBudget",
        }
    }
}

impl conditions::Reason for Reason {
    fn as_str(&self) -> &'static str {
        Reason::as_str(self)
    }
}

/// Why a filter beyond its namespace's count is refused, and what to do. Pure.
pub fn over_count_message(position: usize, total: usize, limit: usize) -> String {
    format!(
        "metadata.creationTimestamp: this is MailboxFilter {position} of {total} in the namespace by age (creationTimestamp, then name), beyond the limit of {limit} per namespace (--filter-max-per-namespace); delete or merge filters no longer needed"
    )
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
pub fn compile(filter: &MailboxFilter) -> (Desired<Reason>, Option<Arc<CompiledFilter>>) {
    condition(CompiledFilter::compile(&filter.spec).map(Arc::new))
}

/// The `Ready` condition for a compile outcome. Pure.
pub fn condition(compiled: Result<Arc<CompiledFilter>, FilterError>) -> (Desired<Reason>, Option<Arc<CompiledFilter>>) {
    match compiled {
        Ok(compiled) => (
            Desired {
                type_: READY,
                status: Status::True,
                reason: Reason::Valid,
                message: "Every pattern compiled; the filter is in use for routing.".to_string(),
            },
            Some(compiled),
        ),
        Err(e) if e.kind == Problem::OverBudget => (over_budget(e.to_string()), None),
        Err(e) => (
            Desired {
                type_: READY,
                status: Status::False,
                reason: Reason::InvalidPattern,
                message: format!("{e}. Subscriptions using this filter are not Ready until it is fixed."),
            },
            None,
        ),
    }
}

/// `Ready=False/OverBudget` with `why` (field, limit, what to do). Pure.
pub fn over_budget(why: String) -> Desired<Reason> {
    Desired {
        type_: READY,
        status: Status::False,
        reason: Reason::OverBudget,
        message: format!(
            "{why}. The filter is not used for routing and matches nothing until it is within the limits; subscriptions using it are not Ready."
        ),
    }
}

#[instrument(skip_all, fields(namespace = filter.namespace().unwrap_or_default(), name = filter.name_any()))]
pub async fn reconcile(filter: Arc<MailboxFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = filter.namespace().ok_or(Error::NotNamespaced)?;
    // Counted first: a filter beyond the namespace's count is never compiled.
    let counted_out = ctx.counted_out(&filter);
    let (ready, compiled) = match &counted_out {
        Some(why) => (over_budget(why.clone()), None),
        None => condition(ctx.compiled(&filter).await),
    };
    // An invalid pattern stays invalid until the filter is edited (which is watched); one
    // beyond the count is reconciled again when an older one goes (`recheck_counts`).
    let stalled = compiled.is_none();
    let (name, labels) = (filter.name_any(), filter.labels().clone());
    let changed = ctx.record_filter(
        (ns.clone(), name.clone()),
        FilterState {
            generation: filter.metadata.generation,
            ready,
            compiled,
            counted_out: counted_out.is_some(),
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
    fn reasons_on_the_wire() {
        let wire = [Reason::Valid, Reason::InvalidPattern, Reason::OverBudget].map(|r| r.as_str());
        assert_eq!(wire, ["Valid", "InvalidPattern", "OverBudget"]);
    }

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
        assert_eq!((ready.status, ready.reason), (Status::False, Reason::InvalidPattern));
        assert!(ready.message.starts_with("spec.domains[0]:"), "{}", ready.message);
        assert!(compiled.is_none());
    }

    #[test]
    fn over_budget_is_its_own_reason_and_says_the_filter_matches_nothing() {
        let f = MailboxFilter::new(
            "f",
            MailboxFilterSpec {
                criteria: MatchCriteria {
                    headers: (0..20)
                        .map(|i| crate::api::HeaderMatch {
                            name: format!("X-{i}"),
                            regex: Some("a+".into()),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let (ready, compiled) = compile(&f);
        assert_eq!((ready.status, ready.reason), (Status::False, Reason::OverBudget));
        assert!(
            ready.message.starts_with("spec.headers[16].regex:"),
            "{}",
            ready.message
        );
        assert!(ready.message.contains("--filter-max-regexes"), "{}", ready.message);
        assert!(ready.message.contains("matches nothing"), "{}", ready.message);
        assert!(compiled.is_none());
        // Stalled too: only an edit brings it back.
        let progress = super::super::conditions::progress(&ready, false, true);
        assert_eq!(progress.map(|p| p.type_), Some(super::super::conditions::STALLED));
        let count = over_count_message(101, 120, 100);
        assert!(
            count.contains("101 of 120") && count.contains("--filter-max-per-namespace"),
            "{count}"
        );
    }
}
