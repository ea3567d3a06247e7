//! MailSource: feeds a cluster admin expects to keep reporting. One loop keeps them all
//! (they are few and cluster-scoped): it judges each against when its producer was last
//! heard from (`SourceActivity`, which holds every replica's times through the store)
//! and, on the leader, writes the statuses that changed — at every change to a
//! MailSource, at the moment a feed's window runs out, and otherwise every 2 s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Context;
use super::conditions::{self, Desired, READY, Status};
use crate::api::{MailSource, MailSourceSpec, MailSourceStatus, SourceKind, parse_duration};
use crate::handles::SourceActivity;

/// Reasons on the `Ready` condition of a MailSource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The feed sent events within its window.
    Reporting,
    /// It has not, for longer than `silentAfter` (or never did, since the MailSource was made).
    Silent,
    /// Never heard from, within its window since the MailSource was created.
    Waiting,
    /// The spec cannot be judged (the apiserver's schema normally refuses it first).
    InvalidSpec,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Reporting => "Reporting",
            Reason::Silent => "Silent",
            Reason::Waiting => "Waiting",
            Reason::InvalidSpec => "InvalidSpec",
        }
    }
}

impl conditions::Reason for Reason {
    fn as_str(&self) -> &'static str {
        Reason::as_str(self)
    }
}

/// Statuses are judged again this often (in memory; written only when they change), so a
/// feed that resumes shows within seconds.
const PASS_EVERY: Duration = Duration::from_secs(2);

/// `status.lastEventAt` of a feed that keeps reporting is refreshed at most this often: a
/// busy feed must not cost a status write per pass.
const LAST_EVENT_REFRESH: i64 = 30;

/// A MailSource judged at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub ready: Desired<Reason>,
    /// When the answer changes by itself (a reporting feed's window runs out).
    pub changes_at: Option<jiff::Timestamp>,
}

/// How a person names a feed in a message.
fn feed(spec: &MailSourceSpec) -> String {
    match spec.source {
        SourceKind::Smtp => "the SMTP journal feed (source smtp, producer journal)".to_string(),
        SourceKind::Http => format!("HTTP producer {:?} (source http)", spec.producer),
        SourceKind::Dovecot => format!("Dovecot credential {:?} (source dovecot)", spec.producer),
    }
}

/// What to look at when a feed is silent.
fn what_to_check(spec: &MailSourceSpec) -> String {
    match spec.source {
        SourceKind::Smtp => "Check that the MTA still journals to mailhook's SMTP listener (--smtp-addr): the \
             journal rule or always_bcc/recipient_bcc_maps, the transport to mailhook, and mail deferred to \
             it in the MTA's queue; mailhook_listener_refused_total{listener=\"smtp\"} counts refusals."
            .to_string(),
        SourceKind::Http => format!(
            "Check that the producer runs and posts to /v1/events with the token named {:?} in \
             --ingest-token-file (refusals show as 401/429 at the producer and in \
             mailhook_listener_refused_total{{listener=\"ingest\"}}).",
            spec.producer
        ),
        SourceKind::Dovecot => format!(
            "Check that the Dovecot server's push-notification script (mailhook.lua) and event exporter \
             still post to /v1/sources/dovecot with the token named {:?} in --dovecot-token-file, \
             and the script's spool on the Dovecot host.",
            spec.producer
        ),
    }
}

/// A MailSource against when its producer was last heard from (`last`, unix seconds),
/// created at `created`, at `now`. Pure.
pub fn judge(
    spec: &MailSourceSpec,
    created: Option<jiff::Timestamp>,
    last: Option<i64>,
    now: jiff::Timestamp,
) -> Judged {
    let window = match parse_duration(&spec.silent_after) {
        Ok(window) if !window.is_zero() => window,
        Ok(_) | Err(_) => {
            return Judged {
                ready: Desired {
                    type_: READY,
                    status: Status::False,
                    reason: Reason::InvalidSpec,
                    message: format!(
                        "spec.silentAfter {:?} is not a positive duration: use one such as 30m, 2h or 45s",
                        spec.silent_after
                    ),
                },
                changes_at: None,
            };
        }
    };
    let window_secs = i64::try_from(window.as_secs().max(1)).unwrap_or(i64::MAX);
    let last = last.and_then(|s| jiff::Timestamp::from_second(s).ok());
    // A feed never heard from is judged from when it was declared.
    let since = last.or(created).unwrap_or(now);
    let quiet = now.as_second().saturating_sub(since.as_second());
    if quiet <= window_secs {
        let changes_at = jiff::Timestamp::from_second(since.as_second().saturating_add(window_secs + 1)).ok();
        // Messages name times, not ages: an age would change the status at every pass.
        let message = match last {
            Some(_) => format!(
                "{} sends events within spec.silentAfter {} (status.lastEventAt: the last ones).",
                capitalised(&feed(spec)),
                spec.silent_after
            ),
            None => format!(
                "{} has sent nothing yet; it counts as silent once this MailSource is {} old (spec.silentAfter).",
                capitalised(&feed(spec)),
                spec.silent_after
            ),
        };
        // Not heard from yet, but within its window: not silent yet, not reporting either.
        let (status, reason) = match last {
            Some(_) => (Status::True, Reason::Reporting),
            None => (Status::Unknown, Reason::Waiting),
        };
        return Judged {
            ready: Desired {
                type_: READY,
                status,
                reason,
                message,
            },
            changes_at,
        };
    }
    let heard = match last {
        Some(at) => format!("since its last events at {at}"),
        None => format!("since this MailSource was created at {since}: it was never heard from"),
    };
    Judged {
        ready: Desired {
            type_: READY,
            status: Status::False,
            reason: Reason::Silent,
            message: format!(
                "{} has been silent {heard}, longer than spec.silentAfter {}. {}",
                capitalised(&feed(spec)),
                spec.silent_after,
                what_to_check(spec)
            ),
        },
        changes_at: None,
    }
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A MailSource's status from its judgement, with kstatus' conditions: `Reconciling` while
/// it waits for the first events, `Stalled` only for a spec that needs an edit (a silent
/// feed is fixed at the feed, not on the resource). Pure.
pub fn source_status(
    previous: &MailSourceStatus,
    generation: Option<i64>,
    judged: &Judged,
    last: Option<i64>,
    now: &Time,
) -> MailSourceStatus {
    let mut status = previous.clone();
    status.observed_generation = generation;
    let transition = conditions::set(&mut status.conditions, judged.ready.clone(), generation, now);
    let reason = judged.ready.reason;
    let progress = conditions::progress(&judged.ready, reason == Reason::Waiting, reason == Reason::InvalidSpec);
    conditions::set_progress(&mut status.conditions, progress, generation, now);
    let shown = previous.last_event_at.as_ref().map(|t| t.0.as_second());
    let fresh = match (shown, last) {
        (Some(shown), Some(last)) => transition || last.saturating_sub(shown) >= LAST_EVENT_REFRESH,
        (None, Some(_)) => true,
        (_, None) => false,
    };
    if fresh {
        status.last_event_at = last.and_then(|s| jiff::Timestamp::from_second(s).ok()).map(Time);
    }
    status
}

/// Runs the MailSource loop until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    client: Client,
    activity: Arc<SourceActivity>,
    selector: Option<String>,
    shutdown: CancellationToken,
) {
    let (sources, writer) = reflector::store::<MailSource>();
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut config = watcher::Config::default();
    if let Some(selector) = &selector {
        config = config.labels(selector);
    }
    let watch = {
        let wake = wake.clone();
        watcher(Api::<MailSource>::all(client.clone()), config)
            .default_backoff()
            .modify(|s: &mut MailSource| s.metadata.managed_fields = None)
            .reflect(writer)
            .for_each(move |event| {
                // Not on the operator's own status writes (their generation is observed
                // already): they would wake a pass that writes again.
                let wanted = match &event {
                    Ok(watcher::Event::Apply(s)) => {
                        s.status.as_ref().and_then(|st| st.observed_generation) != s.metadata.generation
                    }
                    Ok(watcher::Event::Delete(_) | watcher::Event::InitDone) => true,
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => false,
                    Err(err) => {
                        warn!(%err, "watching MailSources failed (is the MailSource CRD installed, --mail-source-selector a label selector?); retrying");
                        false
                    }
                };
                if wanted {
                    wake.notify_one();
                }
                async {}
            })
    };
    let passes = async {
        if super::synced(&sources).await.is_err() {
            return;
        }
        let mut written: HashMap<String, MailSourceStatus> = HashMap::new();
        loop {
            let next = pass(&ctx, &sources, &activity, &mut written).await;
            let wait = next
                .and_then(|at| {
                    let secs = at.as_second().saturating_sub(jiff::Timestamp::now().as_second());
                    u64::try_from(secs).ok()
                })
                .map_or(PASS_EVERY, |secs| Duration::from_secs(secs).min(PASS_EVERY))
                .max(Duration::from_millis(500));
            tokio::select! {
                () = wake.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
                () = tokio::time::sleep(wait) => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = watch => tracing::error!("the MailSource watch ended; MailSource statuses no longer follow changes"),
        () = passes => {}
    }
}

/// Judges every MailSource and, on the leader, writes the statuses that changed. Returns
/// the soonest moment a judgement changes by itself.
async fn pass(
    ctx: &Context,
    sources: &reflector::Store<MailSource>,
    activity: &SourceActivity,
    written: &mut HashMap<String, MailSourceStatus>,
) -> Option<jiff::Timestamp> {
    if !ctx.leadership.is_leader() {
        written.clear();
        return None;
    }
    let now = jiff::Timestamp::now();
    let mut next: Option<jiff::Timestamp> = None;
    let all = sources.state();
    for source in &all {
        let name = source.name_any();
        let last = activity.last(source.spec.source.as_str(), &source.spec.producer);
        let created = source.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let judged = judge(&source.spec, created, last, now);
        next = match (next, judged.changes_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let previous = written
            .get(&name)
            .cloned()
            .or_else(|| source.status.clone())
            .unwrap_or_default();
        let desired = source_status(&previous, source.metadata.generation, &judged, last, &Time(now));
        if source.status.as_ref() == Some(&desired) || written.get(&name) == Some(&desired) {
            continue;
        }
        ctx.api_limiter.until_ready().await;
        match write_status(&ctx.client, &name, &desired).await {
            Ok(()) => {
                ctx.metrics
                    .status_writes
                    .with_label_values(&["MailSource", "written"])
                    .inc();
                written.insert(name, desired);
            }
            Err(err) => {
                ctx.metrics
                    .status_writes
                    .with_label_values(&["MailSource", "failed"])
                    .inc();
                warn!(source = name, %err, "cannot write MailSource status; will retry");
            }
        }
    }
    written.retain(|name, _| all.iter().any(|s| s.name_any() == *name));
    next
}

/// Writes a MailSource's status (cluster-scoped).
async fn write_status(client: &Client, name: &str, status: &MailSourceStatus) -> Result<(), kube::Error> {
    super::apply_cluster_status::<MailSource>(client, name, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid")
    }

    fn spec(source: SourceKind, producer: &str, window: &str) -> MailSourceSpec {
        MailSourceSpec {
            source,
            producer: producer.into(),
            silent_after: window.into(),
        }
    }

    #[test]
    fn reasons_on_the_wire() {
        assert_eq!(
            [Reason::Reporting, Reason::Silent, Reason::Waiting, Reason::InvalidSpec].map(|r| r.as_str()),
            ["Reporting", "Silent", "Waiting", "InvalidSpec"]
        );
    }

    #[test]
    fn a_feed_reports_until_its_window_runs_out() {
        let journal = spec(SourceKind::Smtp, "journal", "30m");
        let j = judge(&journal, Some(at(0)), Some(10_000), at(10_000 + 600));
        assert_eq!((j.ready.status, j.ready.reason), (Status::True, Reason::Reporting));
        assert_eq!(
            j.changes_at,
            Some(at(10_000 + 1801)),
            "judged again the moment it turns silent"
        );

        let j = judge(&journal, Some(at(0)), Some(10_000), at(10_000 + 1801));
        assert_eq!((j.ready.status, j.ready.reason), (Status::False, Reason::Silent));
        assert_eq!(j.changes_at, None);
        for needed in [
            "SMTP journal feed",
            "silent since its last events at 1970-01-01T02:46:40Z",
            "always_bcc",
            "--smtp-addr",
        ] {
            assert!(j.ready.message.contains(needed), "{needed}: {}", j.ready.message);
        }
    }

    #[test]
    fn a_feed_never_heard_from_is_silent_since_its_creation() {
        let crm = spec(SourceKind::Http, "crm", "45s");
        let j = judge(&crm, Some(at(1_000)), None, at(1_030));
        assert_eq!((j.ready.status, j.ready.reason), (Status::Unknown, Reason::Waiting));
        assert_eq!(j.changes_at, Some(at(1_046)));
        let s = source_status(&MailSourceStatus::default(), Some(1), &j, None, &Time(at(1_030)));
        assert_eq!(
            conditions::status_of(&s.conditions, conditions::RECONCILING),
            Some("True")
        );
        let j = judge(&crm, Some(at(1_000)), None, at(1_100));
        assert_eq!((j.ready.status, j.ready.reason), (Status::False, Reason::Silent));
        for needed in [
            "\"crm\"",
            "never heard from",
            "created at 1970-01-01T00:16:40Z",
            "--ingest-token-file",
        ] {
            assert!(j.ready.message.contains(needed), "{needed}: {}", j.ready.message);
        }
    }

    #[test]
    fn an_unusable_window_names_the_field() {
        let j = judge(&spec(SourceKind::Dovecot, "imap", "soon"), None, Some(1), at(2));
        assert_eq!((j.ready.status, j.ready.reason), (Status::False, Reason::InvalidSpec));
        assert!(j.ready.message.starts_with("spec.silentAfter"), "{}", j.ready.message);
    }

    #[test]
    fn transitions_move_the_time_and_only_an_invalid_spec_stalls() {
        let journal = spec(SourceKind::Smtp, "journal", "1m");
        let reporting = judge(&journal, None, Some(100), at(110));
        let s1 = source_status(
            &MailSourceStatus::default(),
            Some(1),
            &reporting,
            Some(100),
            &Time(at(110)),
        );
        assert_eq!(s1.last_event_at, Some(Time(at(100))));
        assert_eq!(conditions::status_of(&s1.conditions, READY), Some("True"));
        // Still reporting later: the transition time stays, and lastEventAt moves only
        // every LAST_EVENT_REFRESH seconds.
        let later = judge(&journal, None, Some(120), at(125));
        let s2 = source_status(&s1, Some(1), &later, Some(120), &Time(at(125)));
        assert_eq!(s2, s1, "nothing to write");
        let later = judge(&journal, None, Some(130), at(140));
        let s2 = source_status(&s1, Some(1), &later, Some(130), &Time(at(140)));
        assert_eq!(s2.conditions[0].last_transition_time, Time(at(110)));
        assert_eq!(s2.last_event_at, Some(Time(at(130))));
        // Silent: it moves, and neither Stalled nor Reconciling is set.
        let silent = judge(&journal, None, Some(130), at(500));
        let s3 = source_status(&s2, Some(1), &silent, Some(130), &Time(at(500)));
        assert_eq!(s3.conditions[0].last_transition_time, Time(at(500)));
        assert_eq!(s3.conditions.len(), 1);
        let invalid = judge(&spec(SourceKind::Smtp, "journal", "0s"), None, None, at(500));
        let s4 = source_status(&s3, Some(2), &invalid, None, &Time(at(600)));
        assert_eq!(conditions::status_of(&s4.conditions, conditions::STALLED), Some("True"));
        assert_eq!(s4.last_event_at, Some(Time(at(130))), "the last time seen is kept");
    }
}
