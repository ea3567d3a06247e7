//! LegalHold: what legal or compliance staff keep past every retention setting. Holds are
//! few and cluster-scoped, so one loop keeps them all: every replica compiles them into the
//! routing table's hold set (its ingest archives what they hold, its purges skip it), and
//! the leader records each placement, change and release in the audit log, keeps the
//! finalizer that makes a deletion wait for its confirmation, and writes status with what
//! the purges of every replica reported kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Context;
use super::conditions::{self, Desired, READY, Status};
use crate::api::{CONFIRM_RELEASE, HOLD_FINALIZER, HeldRecords, LegalHold, LegalHoldSpec, LegalHoldStatus};
use crate::route::{CompiledHold, HoldSet};

/// The custody records of holds are kept under this kind (`custody`).
const KIND: &str = "legalholds";

/// The annotation naming who released a hold, written to the audit log with the release.
pub const RELEASED_BY: &str = "mailhook.io/released-by";

/// Reasons on the `Ready` condition of a LegalHold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Holding,
    InvalidSpec,
    ReleaseNotConfirmed,
}

impl conditions::Reason for Reason {
    fn as_str(&self) -> &'static str {
        match self {
            Reason::Holding => "Holding",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ReleaseNotConfirmed => "ReleaseNotConfirmed",
        }
    }
}

/// What a deletion of a hold may do now. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Not being deleted.
    No,
    /// Deleted and confirmed (or it never held anything): record it and let it go.
    Go,
    /// Deleted without the confirmation: it stays in force.
    Refused,
}

/// Whether a hold's deletion may proceed. A hold that was never in force (its spec never
/// compiled, nothing recorded) held nothing and goes at once; any other needs the
/// confirmation annotation naming it, whatever the purges counted so far: what it covers
/// that retention has not reached yet is held too.
pub fn release(hold: &LegalHold, placed: bool) -> Release {
    if hold.metadata.deletion_timestamp.is_none() {
        return Release::No;
    }
    let confirmed = hold.annotations().get(CONFIRM_RELEASE) == Some(&hold.name_any());
    if confirmed || !placed {
        Release::Go
    } else {
        Release::Refused
    }
}

/// The status a hold should have. Pure.
pub fn hold_status(
    previous: &LegalHoldStatus,
    hold: &LegalHold,
    state: &HoldState<'_>,
    held: Option<HeldRecords>,
    now: &Time,
) -> LegalHoldStatus {
    let name = hold.name_any();
    let generation = hold.metadata.generation;
    let held = held.unwrap_or(previous.held);
    let ready = match (state.invalid, release(hold, state.placed)) {
        (Some(message), _) if state.placed => Desired {
            type_: READY,
            status: Status::False,
            reason: Reason::InvalidSpec,
            message: format!("{message}; the hold stays in force as it was when last valid until the spec is fixed"),
        },
        (Some(message), _) => Desired {
            type_: READY,
            status: Status::False,
            reason: Reason::InvalidSpec,
            message: format!("{message}; the hold keeps nothing until it is fixed"),
        },
        (None, Release::Refused) => Desired {
            type_: READY,
            status: Status::False,
            reason: Reason::ReleaseNotConfirmed,
            message: format!(
                "deletion waits for confirmation and the hold is still in force (it keeps {} raw messages, {} attempts and {} dead letters past retention so far); to release them to retention run `kubectl annotate legalhold {name} {CONFIRM_RELEASE}={name} {RELEASED_BY}=<who>`",
                held.raw_messages, held.attempts, held.dead_letters
            ),
        },
        (None, _) => Desired {
            type_: READY,
            status: Status::True,
            reason: Reason::Holding,
            message: "purges keep what the hold matches, and its mailboxes' raw messages are archived".into(),
        },
    };
    let mut status = previous.clone();
    status.observed_generation = generation;
    conditions::set_ready(&mut status.conditions, &ready, generation, now);
    status.mailbox_summary = super::grant::summary(
        hold.spec
            .mailboxes
            .iter()
            .map(String::as_str)
            .chain(hold.spec.domains.iter().map(String::as_str)),
    );
    if status.held != held {
        status.held = held;
        status.last_counted = Some(now.clone());
    } else if status.last_counted.is_none() {
        status.last_counted = Some(now.clone());
    }
    if let Some((index, logged)) = state.logged {
        status.log_index = Some(index);
        status.logged_generation = Some(logged);
    }
    status
}

/// What the loop knows of one hold beyond its object.
#[derive(Debug, Clone, Copy, Default)]
pub struct HoldState<'a> {
    /// Why the current spec does not compile, if it does not.
    pub invalid: Option<&'a str>,
    /// Whether the hold was ever in force (a spec compiled, or its placement recorded).
    pub placed: bool,
    /// The custody record of the generation in force: (log index, generation).
    pub logged: Option<(u64, i64)>,
}

/// What the audit log says of a hold placed or changed.
fn custody_detail(spec: &LegalHoldSpec) -> String {
    format!(
        "reason={:?} mailboxes={:?} domains={:?} from={} until={}",
        spec.reason,
        spec.mailboxes,
        spec.domains,
        spec.from.as_deref().unwrap_or("-"),
        spec.until.as_deref().unwrap_or("-")
    )
}

/// Adds up the figures each replica left (`delivery::housekeeping::report_kept`), skipping
/// (and deleting) those of replicas that stopped reporting. None when they cannot be read
/// or none is fresh yet: status keeps the last figures.
fn kept_by_hold(store: &dyn crate::store::Rows, now: jiff::Timestamp) -> Option<BTreeMap<String, HeldRecords>> {
    let group = crate::delivery::kept_group();
    let rows = match store.rows(&group, b"") {
        Ok(rows) => rows,
        Err(err) => {
            warn!(%err, "cannot read what legal holds kept; status keeps the last figures");
            return None;
        }
    };
    let fresh = now.as_second() - crate::delivery::KEPT_FRESH.as_secs() as i64;
    let (rows, stale): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.at >= fresh);
    if !stale.is_empty() {
        let gone = stale
            .into_iter()
            .map(|r| crate::store::RowWrite::Delete {
                group: group.clone(),
                key: r.key,
            })
            .collect();
        if let Err(err) = store.write_rows(gone) {
            warn!(%err, "cannot delete the legal hold figures of replicas that stopped");
        }
    }
    if rows.is_empty() {
        return None;
    }
    let mut total: BTreeMap<String, HeldRecords> = BTreeMap::new();
    for row in rows {
        let Ok(kept) = serde_json::from_slice::<BTreeMap<String, HeldRecords>>(&row.body) else {
            continue;
        };
        for (hold, k) in kept {
            total.entry(hold).or_default().add(&k);
        }
    }
    Some(total)
}

/// What the loop remembers between passes (the leader's, but for `last_valid`).
#[derive(Default)]
struct Memory {
    /// The last spec of each hold (by uid) that compiled: an edit that does not compile
    /// leaves it in force.
    last_valid: HashMap<String, Arc<CompiledHold>>,
    /// Releases recorded here, by uid: the finalizer's removal may fail and be retried.
    released: HashMap<String, u64>,
    /// Who released each hold whose confirmed release this leader saw, by uid: one that
    /// goes before its release is recorded here was let go by another operator sharing
    /// the cluster.
    confirmed: HashMap<String, String>,
    written: HashMap<String, LegalHoldStatus>,
}

/// Runs the hold loop until `shutdown`: a pass on every change to a hold, and every 15 s
/// for the figures.
pub async fn run(ctx: Arc<Context>, client: Client, shutdown: CancellationToken) {
    let (holds, writer) = reflector::store::<LegalHold>();
    let wake = Arc::new(tokio::sync::Notify::new());
    let watch = {
        let wake = wake.clone();
        watcher(Api::<LegalHold>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|h: &mut LegalHold| h.metadata.managed_fields = None)
            .reflect(writer)
            .for_each(move |event| {
                if let Err(err) = &event {
                    warn!(%err, "watching LegalHolds failed (the operator needs list/watch on legalholds); retrying");
                }
                wake.notify_one();
                async {}
            })
    };
    let passes = async {
        if super::synced(&holds).await.is_err() {
            return;
        }
        let mut memory = Memory::default();
        loop {
            pass(&ctx, &client, &holds, &mut memory).await;
            tokio::select! {
                () = wake.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
                () = tokio::time::sleep(Duration::from_secs(15)) => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = watch => tracing::error!("the LegalHold watch ended; holds no longer follow changes"),
        () = passes => {}
    }
}

async fn pass(ctx: &Arc<Context>, client: &Client, holds: &reflector::Store<LegalHold>, memory: &mut Memory) {
    let all = holds.state();
    // Every replica holds: the current spec of each hold, or the last one that compiled.
    // A hold waiting for its release confirmation still holds.
    // What this operator's log recorded of each hold, kept in its store, with the spec in
    // force then: an edit that does not compile leaves that spec in force, on every
    // replica and after a restart.
    let Some(mut known) = super::custody::logged(ctx, KIND).await else {
        return;
    };
    let mut invalid: HashMap<String, String> = HashMap::new();
    let mut set = Vec::new();
    for h in &all {
        let uid = h.uid().unwrap_or_default();
        match CompiledHold::compile(&h.name_any(), &h.spec) {
            Ok(c) => {
                let c = Arc::new(c);
                memory.last_valid.insert(uid, c.clone());
                set.push(c);
            }
            Err(e) => {
                invalid.insert(uid.clone(), e.to_string());
                let recorded = || {
                    let spec: LegalHoldSpec = serde_json::from_value(known.get(&uid)?.spec.clone()?).ok()?;
                    CompiledHold::compile(&h.name_any(), &spec).ok().map(Arc::new)
                };
                if let Some(c) = memory.last_valid.get(&uid).cloned().or_else(recorded) {
                    memory.last_valid.insert(uid.clone(), c.clone());
                    set.push(c);
                }
            }
        }
    }
    memory
        .last_valid
        .retain(|uid, _| all.iter().any(|h| h.uid().as_deref() == Some(uid)));
    ctx.router.set_holds(HoldSet::new(set));
    if !ctx.leadership.is_leader() {
        memory.written.clear();
        memory.confirmed.clear();
        return;
    }
    let now = jiff::Timestamp::now();
    // The store's reads and writes wait for commits: off the async workers.
    let rows = ctx.deliveries.rows();
    let kept = tokio::task::spawn_blocking(move || kept_by_hold(rows.as_ref(), now))
        .await
        .ok()
        .flatten();
    let trail = ctx.deliveries.audit();
    for hold in &all {
        let name = hold.name_any();
        let uid = hold.uid().unwrap_or_default();
        let generation = hold.metadata.generation.unwrap_or(0);
        let status = hold.status.clone().unwrap_or_default();
        let held = kept.as_ref().map(|k| k.get(&name).copied().unwrap_or_default());
        let valid = !invalid.contains_key(&uid);
        let placed = known.contains_key(&uid) || status.log_index.is_some() || memory.last_valid.contains_key(&uid);
        // Placed or changed: an act of custody, once per generation in force (an edit that
        // does not compile changes nothing that is held).
        let mut logged = known.get(&uid).map(|l| (l.index, l.generation));
        if valid && !memory.released.contains_key(&uid) && known.get(&uid).map(|l| l.generation) != Some(generation) {
            let action = if known.contains_key(&uid) {
                "legal-hold.changed"
            } else {
                "legal-hold.placed"
            };
            let record = crate::audit::Record::Custody {
                action: action.into(),
                subject: format!("LegalHold/{name}"),
                by: hold.spec.requested_by.clone(),
                at: now,
                detail: custody_detail(&hold.spec),
            };
            match super::custody::append(&trail, record).await {
                Ok(index) => {
                    info!(hold = name, index, action, "audit log: legal hold recorded");
                    let last = super::custody::Logged {
                        generation,
                        index,
                        name: name.clone(),
                        spec: serde_json::to_value(&hold.spec).ok(),
                    };
                    if let Err(err) = super::custody::remember(ctx, KIND, &uid, Some(&last)).await {
                        warn!(hold = name, %err, "cannot remember the hold's record; it may be recorded again");
                    }
                    known.insert(uid.clone(), last);
                    logged = Some((index, generation));
                }
                Err(err) => warn!(hold = name, %err, "cannot record the legal hold in the audit log; will retry"),
            }
        }
        let released_by = hold
            .annotations()
            .get(RELEASED_BY)
            .cloned()
            .unwrap_or_else(|| format!("not named (no {RELEASED_BY} annotation)"));
        let going = release(hold, placed);
        if placed && going == Release::Go {
            memory.confirmed.insert(uid.clone(), released_by.clone());
        }
        match going {
            Release::Go => {
                let recorded = match memory.released.get(&uid) {
                    Some(index) => Ok(*index),
                    None if !placed => Ok(0),
                    None => {
                        let by = released_by.clone();
                        let held = held.unwrap_or(status.held);
                        let record = crate::audit::Record::Custody {
                            action: "legal-hold.released".into(),
                            subject: format!("LegalHold/{name}"),
                            by,
                            at: now,
                            detail: format!(
                                "kept past retention at release: {} raw messages ({} bytes), {} attempts, {} dead letters",
                                held.raw_messages, held.raw_message_bytes, held.attempts, held.dead_letters
                            ),
                        };
                        super::custody::append(&trail, record).await
                    }
                };
                // Recorded before the finalizer goes: a release is never unlogged.
                match recorded {
                    Ok(index) => {
                        if placed && !memory.released.contains_key(&uid) {
                            info!(hold = name, index, "audit log: legal hold released");
                            // Its record is forgotten once the object is gone.
                            memory.released.insert(uid.clone(), index);
                        }
                        match remove_finalizer(client, hold).await {
                            Ok(()) => {}
                            // Gone already: released.
                            Err(kube::Error::Api(status)) if status.code == 404 => {}
                            Err(err) => warn!(hold = name, %err, "cannot remove the LegalHold's finalizer; will retry"),
                        }
                    }
                    Err(err) => warn!(hold = name, %err, "cannot record the release in the audit log; will retry"),
                }
                continue;
            }
            Release::No if !hold.finalizers().iter().any(|f| f == HOLD_FINALIZER) => {
                if let Err(err) = add_finalizer(client, hold).await {
                    warn!(hold = name, %err, "cannot add the LegalHold's finalizer; will retry");
                }
            }
            _ => {}
        }
        let previous = memory.written.get(&name).cloned().unwrap_or_else(|| status.clone());
        let state = HoldState {
            invalid: invalid.get(&uid).map(String::as_str),
            placed,
            logged,
        };
        let desired = hold_status(&previous, hold, &state, held, &Time(now));
        // Written again whenever the object shows otherwise (another operator sharing the
        // cluster may have written its own figures).
        if hold.status.as_ref() == Some(&desired) {
            continue;
        }
        ctx.api_limiter.until_ready().await;
        match super::apply_cluster_status::<LegalHold>(&ctx.client, &name, &desired).await {
            Ok(()) => {
                memory.written.insert(name, desired);
            }
            Err(err) => warn!(hold = name, %err, "cannot write LegalHold status; will retry"),
        }
    }
    // A hold this log recorded that went before its release was recorded here: let go by
    // another operator sharing the cluster once confirmed, or removed without a confirmed
    // release (its finalizer taken off by hand). Said in the log.
    let present: std::collections::HashSet<String> = all.iter().filter_map(|h| h.uid()).collect();
    let vanished: Vec<(String, String)> = known
        .iter()
        .filter(|(uid, _)| !present.contains(*uid))
        .map(|(u, l)| (u.clone(), l.name.clone()))
        .collect();
    for (uid, name) in vanished {
        if memory.released.contains_key(&uid) {
            // Released and recorded here: only its record goes.
            if let Err(err) = super::custody::remember(ctx, KIND, &uid, None).await {
                warn!(hold = name, %err, "cannot forget the released hold's record; will retry");
            }
            continue;
        }
        let confirmed = memory.confirmed.get(&uid).cloned();
        let record = match confirmed.clone() {
            Some(by) => crate::audit::Record::Custody {
                action: "legal-hold.released".into(),
                subject: format!("LegalHold/{name}"),
                by,
                at: now,
                detail: "confirmed, and let go by another operator sharing the cluster".into(),
            },
            None => crate::audit::Record::Custody {
                action: "legal-hold.removed".into(),
                subject: format!("LegalHold/{name}"),
                by: "unknown".into(),
                at: now,
                detail:
                    "removed without a release confirmed to this operator: its finalizer was taken off by someone else"
                        .into(),
            },
        };
        match super::custody::append(&trail, record).await {
            Ok(index) => {
                if confirmed.is_some() {
                    info!(hold = name, index, "audit log: legal hold released");
                } else {
                    warn!(
                        hold = name,
                        index, "a LegalHold was removed without a confirmed release; recorded in the audit log"
                    );
                }
                if let Err(err) = super::custody::remember(ctx, KIND, &uid, None).await {
                    warn!(hold = name, %err, "cannot forget the removed hold's record");
                }
            }
            Err(err) => warn!(hold = name, %err, "cannot record the end of a legal hold; will retry"),
        }
    }
    memory
        .released
        .retain(|uid, _| present.contains(uid) || known.contains_key(uid));
    memory
        .confirmed
        .retain(|uid, _| present.contains(uid) || known.contains_key(uid));
    memory
        .written
        .retain(|name, _| all.iter().any(|h| &h.name_any() == name));
}

async fn add_finalizer(client: &Client, hold: &LegalHold) -> Result<(), kube::Error> {
    let mut finalizers = hold.finalizers().to_vec();
    finalizers.push(HOLD_FINALIZER.to_string());
    patch_finalizers(client, hold, finalizers).await
}

async fn remove_finalizer(client: &Client, hold: &LegalHold) -> Result<(), kube::Error> {
    let finalizers = hold
        .finalizers()
        .iter()
        .filter(|f| *f != HOLD_FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(client, hold, finalizers).await
}

/// A merge patch of the finalizers, conditional on the object being as read.
async fn patch_finalizers(client: &Client, hold: &LegalHold, finalizers: Vec<String>) -> Result<(), kube::Error> {
    let api: Api<LegalHold> = Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": { "finalizers": finalizers, "resourceVersion": hold.resource_version() }
    });
    api.patch(
        &hold.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn hold(deleting: bool, confirm: Option<&str>) -> LegalHold {
        let mut annotations = BTreeMap::new();
        if let Some(c) = confirm {
            annotations.insert(CONFIRM_RELEASE.to_string(), c.to_string());
        }
        LegalHold {
            metadata: ObjectMeta {
                name: Some("matter-7".into()),
                generation: Some(2),
                annotations: Some(annotations),
                deletion_timestamp: deleting.then_some(Time(jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            spec: LegalHoldSpec {
                mailboxes: vec!["zoë@example.com".into()],
                reason: "matter 7".into(),
                requested_by: "legal@example.com".into(),
                ..Default::default()
            },
            status: None,
        }
    }

    #[test]
    fn a_deletion_needs_the_confirmation_naming_the_hold() {
        assert_eq!(release(&hold(false, None), true), Release::No);
        assert_eq!(release(&hold(true, None), true), Release::Refused);
        assert_eq!(release(&hold(true, Some("other")), true), Release::Refused);
        assert_eq!(release(&hold(true, Some("matter-7")), true), Release::Go);
        assert_eq!(
            release(&hold(true, None), false),
            Release::Go,
            "an invalid hold holds nothing"
        );
    }

    #[test]
    fn status_says_what_is_held_and_how_to_release_it() {
        let h = hold(true, None);
        let held = HeldRecords {
            raw_messages: 3,
            raw_message_bytes: 900,
            attempts: 5,
            dead_letters: 1,
        };
        let now = Time(jiff::Timestamp::UNIX_EPOCH);
        let state = HoldState {
            invalid: None,
            placed: true,
            logged: Some((12, 2)),
        };
        let s = hold_status(&LegalHoldStatus::default(), &h, &state, Some(held), &now);
        assert_eq!((s.held, s.log_index, s.observed_generation), (held, Some(12), Some(2)));
        let ready = s.conditions.iter().find(|c| c.type_ == READY).expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ReleaseNotConfirmed")
        );
        assert!(
            ready
                .message
                .contains("kubectl annotate legalhold matter-7 mailhook.io/confirm-release=matter-7")
        );
        assert_eq!(conditions::status_of(&s.conditions, conditions::STALLED), Some("True"));
        let state = HoldState { logged: None, ..state };
        let s = hold_status(&s, &hold(false, None), &state, None, &now);
        assert_eq!(conditions::status_of(&s.conditions, READY), Some("True"));
        assert_eq!(s.log_index, Some(12), "kept until a new generation is recorded");
        assert_eq!(s.held, held, "figures that cannot be read leave the last ones");
        assert_eq!(conditions::status_of(&s.conditions, conditions::STALLED), None);
        // An edit that does not compile leaves the hold in force, and says so.
        let state = HoldState {
            invalid: Some("spec.domains[0]: not a domain"),
            ..state
        };
        let s = hold_status(&s, &hold(false, None), &state, None, &now);
        let ready = s.conditions.iter().find(|c| c.type_ == READY).expect("ready");
        assert_eq!(ready.reason, "InvalidSpec");
        assert!(ready.message.contains("stays in force"), "{}", ready.message);
    }
}
