//! Conditions in Kubernetes convention: one entry per type, `lastTransitionTime` moving
//! only when `status` changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const HEALTHY: &str = "Healthy";
/// kstatus "abnormal-true" conditions: present (True) only while they hold, removed
/// otherwise, so Flux, Argo CD and `kstatus` tell failed from in progress from current.
pub const STALLED: &str = "Stalled";
pub const RECONCILING: &str = "Reconciling";

/// The reasons one condition can give, as an enum; `as_str` is the reason on the wire,
/// which users, alerts and GitOps tools match on, so a variant's string never changes.
pub trait Reason: std::fmt::Debug + Clone + Copy + PartialEq + Eq {
    fn as_str(&self) -> &'static str;
}

/// The desired state of one condition, with its reasons `R`; `set` turns it into a
/// `Condition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired<R> {
    pub type_: &'static str,
    pub status: Status,
    pub reason: R,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Sets `Ready` and what it implies of `Stalled`/`Reconciling`, for a resource that is
/// either valid or waits for an edit (a filter, a grant). Returns whether `Ready` changed.
pub fn set_ready<R: Reason>(
    conditions: &mut Vec<Condition>,
    ready: &Desired<R>,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let changed = set(conditions, ready.clone(), generation, now);
    set_progress(conditions, progress(ready, false, true), generation, now);
    changed
}

/// Sets `desired` in `conditions`, keeping `lastTransitionTime` when the status is
/// unchanged. Returns true when the status changed (a transition).
pub fn set<R: Reason>(
    conditions: &mut Vec<Condition>,
    desired: Desired<R>,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = desired.status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) => {
            let transition = existing.status != status;
            if transition {
                existing.last_transition_time = now.clone();
            }
            existing.status = status.to_string();
            existing.reason = desired.reason.as_str().to_string();
            existing.message = desired.message;
            existing.observed_generation = generation;
            transition
        }
        None => {
            conditions.push(Condition {
                type_: desired.type_.to_string(),
                status: status.to_string(),
                reason: desired.reason.as_str().to_string(),
                message: desired.message,
                last_transition_time: now.clone(),
                observed_generation: generation,
            });
            true
        }
    }
}

/// Removes the condition of `type_`; true when there was one.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// What `Ready` means for kstatus readers: `Stalled` when the resource cannot become
/// ready until someone changes it (`waiting_on_change`), `Reconciling` while it is on its
/// way (`in_progress`), neither when it is ready or deliberately held (paused). Pure.
pub fn progress<R: Reason>(ready: &Desired<R>, in_progress: bool, waiting_on_change: bool) -> Option<Desired<R>> {
    let (type_, status) = if in_progress {
        (RECONCILING, Status::True)
    } else if waiting_on_change && ready.status == Status::False {
        (STALLED, Status::True)
    } else {
        return None;
    };
    Some(Desired {
        type_,
        status,
        reason: ready.reason,
        message: ready.message.clone(),
    })
}

/// Sets the kstatus conditions `progress` decided, removing the other (or both).
pub fn set_progress<R: Reason>(
    conditions: &mut Vec<Condition>,
    progress: Option<Desired<R>>,
    generation: Option<i64>,
    now: &Time,
) {
    let keep = progress.as_ref().map(|p| p.type_);
    for type_ in [STALLED, RECONCILING] {
        if keep != Some(type_) {
            remove(conditions, type_);
        }
    }
    if let Some(p) = progress {
        set(conditions, p, generation, now);
    }
}

/// The status of the condition of `type_`, if present.
pub fn status_of<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::subscription::{
        self,
        Reason::{EndpointNotVerified, FilterNotFound, Paused, SecretNotFound, Valid},
    };

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("valid"))
    }

    fn ready(status: Status, reason: subscription::Reason) -> Desired<subscription::Reason> {
        Desired {
            type_: READY,
            status,
            reason,
            message: format!("{} message", reason.as_str()),
        }
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conds = vec![];
        assert!(set(&mut conds, ready(Status::False, SecretNotFound), Some(1), &at(100)));
        // Same status, new reason and generation: no transition, time kept.
        assert!(!set(
            &mut conds,
            ready(Status::False, FilterNotFound),
            Some(2),
            &at(200)
        ));
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].reason, "FilterNotFound");
        assert_eq!(conds[0].observed_generation, Some(2));
        // Status flips: time moves.
        assert!(set(&mut conds, ready(Status::True, Valid), Some(2), &at(300)));
        assert_eq!(conds[0].last_transition_time, at(300));
        assert_eq!(conds.len(), 1);
        assert_eq!(status_of(&conds, READY), Some("True"));
    }

    #[test]
    fn stalled_and_reconciling_are_present_only_while_true() {
        let mut conds = vec![];
        let broken = ready(Status::False, FilterNotFound);
        set(&mut conds, broken.clone(), Some(1), &at(100));
        set_progress(&mut conds, progress(&broken, false, true), Some(1), &at(100));
        assert_eq!(status_of(&conds, STALLED), Some("True"));
        assert_eq!(conds[1].reason, "FilterNotFound");
        assert_eq!(conds[1].message, broken.message, "the same message tells what to fix");
        // Still broken later: the transition time stays.
        set_progress(&mut conds, progress(&broken, false, true), Some(2), &at(200));
        assert_eq!(conds[1].last_transition_time, at(100));
        // On its way: Reconciling replaces Stalled.
        let verifying = ready(Status::False, EndpointNotVerified);
        set_progress(&mut conds, progress(&verifying, true, true), Some(2), &at(300));
        assert_eq!(status_of(&conds, STALLED), None);
        assert_eq!(status_of(&conds, RECONCILING), Some("True"));
        // Ready, or deliberately held: neither.
        set_progress(
            &mut conds,
            progress(&ready(Status::True, Valid), false, true),
            Some(3),
            &at(400),
        );
        assert_eq!(
            (status_of(&conds, STALLED), status_of(&conds, RECONCILING)),
            (None, None)
        );
        assert_eq!(progress(&ready(Status::False, Paused), false, false), None);
    }
}
