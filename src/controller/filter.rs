//! MailboxFilter: compile → status (Ready, the subscriptions that use it).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType as K8sEventType;
use kube::{Resource, ResourceExt};
use tracing::{info, instrument};

use super::conditions::{self, Desired, READY, Status};
use super::{Context, Error, write_status};
use crate::api::{MailboxFilter, MailboxFilterStatus, WebhookSubscription};
use crate::route::CompiledFilter;

pub mod reason {
    pub const VALID: &str = "Valid";
    pub const INVALID_PATTERN: &str = "InvalidPattern";
}

/// Whether `whs` uses `filter`, by name or by label selector.
pub fn uses(whs: &WebhookSubscription, filter: &MailboxFilter) -> bool {
    let name = filter.name_any();
    whs.namespace() == filter.namespace()
        && (whs.spec.filter_refs.contains(&name)
            || whs
                .spec
                .filter_selector
                .clone()
                .and_then(|s| Selector::try_from(s).ok())
                .is_some_and(|s| s.matches(filter.labels())))
}

/// The status a filter should have. Pure.
pub fn desired_status(
    filter: &MailboxFilter,
    users: Vec<String>,
    now: &Time,
) -> MailboxFilterStatus {
    let generation = filter.metadata.generation;
    let mut status = filter.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.subscriptions = users;
    let ready = match CompiledFilter::compile(&filter.spec) {
        Ok(_) => Desired {
            type_: READY,
            status: Status::True,
            reason: reason::VALID,
            message: "Every pattern compiled; the filter is in use for routing.".to_string(),
        },
        Err(e) => Desired {
            type_: READY,
            status: Status::False,
            reason: reason::INVALID_PATTERN,
            message: format!(
                "{e}. Subscriptions using this filter are not Ready until it is fixed."
            ),
        },
    };
    conditions::set(&mut status.conditions, ready, generation, now);
    status
}

#[instrument(skip_all, fields(namespace = filter.namespace().unwrap_or_default(), name = filter.name_any()))]
pub async fn reconcile(filter: Arc<MailboxFilter>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = filter.namespace().ok_or(Error::NotNamespaced)?;
    ctx.subscriptions
        .wait_until_ready()
        .await
        .map_err(|_| Error::StoreClosed)?;
    let mut users: Vec<String> = ctx
        .subscriptions
        .state()
        .iter()
        .filter(|w| uses(w, &filter))
        .map(|w| w.name_any())
        .collect();
    users.sort();

    let status = desired_status(&filter, users, &Time(jiff::Timestamp::now()));
    let was_ready = filter
        .status
        .as_ref()
        .and_then(|s| conditions::status_of(&s.conditions, READY))
        .map(str::to_string);
    if filter.status.as_ref() != Some(&status) {
        write_status::<MailboxFilter>(&ctx.client, &ns, &filter.name_any(), &status).await?;
    }
    if let Some(c) = status.conditions.iter().find(|c| c.type_ == READY)
        && was_ready.as_deref() != Some(c.status.as_str())
    {
        info!(ready = c.status, reason = c.reason, "Ready changed");
        let type_ = if c.status == "True" {
            K8sEventType::Normal
        } else {
            K8sEventType::Warning
        };
        ctx.publish(&filter.object_ref(&()), type_, &c.reason, &c.message)
            .await;
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
        let s = desired_status(&f, vec!["siem".into()], &Time(jiff::Timestamp::UNIX_EPOCH));
        let c = &s.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reason::INVALID_PATTERN)
        );
        assert!(c.message.starts_with("spec.domains[0]:"), "{}", c.message);
        assert_eq!(s.subscriptions, vec!["siem"]);
    }
}
