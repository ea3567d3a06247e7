//! Leader election on a `coordination.k8s.io/v1` Lease (get, create, update — nothing
//! else), so that one replica writes status and Events and runs the store-wide
//! housekeeping. A candidate takes the Lease only when its record has not changed for a
//! whole `leaseDurationSeconds` as measured by the candidate's own clock — never by
//! comparing another machine's timestamps, so clock skew between nodes cannot elect two
//! leaders. The holder renews every `RENEW`; one that cannot renew for `STEP_DOWN`
//! stops acting as leader before anyone may take over. On shutdown it gives the Lease up
//! at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::handles::Leadership;
use crate::metrics::Metrics;

/// How long a Lease record stays valid without a renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(8);
/// How often the holder renews and candidates look.
pub const RENEW: Duration = Duration::from_secs(2);
/// A holder that has not renewed for this long stops acting as leader: before any
/// candidate can see the record unchanged for LEASE_DURATION.
const STEP_DOWN: Duration = Duration::from_secs(6);
/// One Lease call may take this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);

/// What the election needs.
pub struct Election {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub leadership: Leadership,
    pub metrics: Metrics,
}

/// The last record seen of someone else's Lease, and since when (our clock).
struct Observed {
    holder: Option<String>,
    renew: Option<jiff::Timestamp>,
    version: Option<String>,
    since: Instant,
}

async fn bounded<T>(call: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| crate::error_chain(&e)),
        Err(_) => Err(format!("the Lease call took longer than {}s", CALL_TIMEOUT.as_secs())),
    }
}

impl Election {
    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn became(&self, leader: bool, why: &str) {
        if self.leadership.set(leader) {
            self.metrics.leader.set(i64::from(leader));
            self.metrics.leader_transitions.inc();
            if leader {
                info!(lease = self.name, identity = self.identity, "became the leader: {why}");
            } else {
                warn!(
                    lease = self.name,
                    identity = self.identity,
                    "no longer the leader: {why}"
                );
            }
        }
    }

    /// One look at the Lease: renew it, take it, or note who holds it.
    async fn step(&self, observed: &mut Option<Observed>, renewed: &mut Option<Instant>) -> Result<(), String> {
        let Some(mut lease) = bounded(self.api.get_opt(&self.name)).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0, None)),
            };
            // Two creating at once: the apiserver lets one in; the other sees 409.
            let sent = Instant::now();
            bounded(self.api.create(&PostParams::default(), &lease)).await?;
            *renewed = Some(sent);
            self.became(true, "created the Lease");
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        if holder.as_deref() == Some(self.identity.as_str()) {
            lease.spec = Some(self.spec(transitions, spec.acquire_time.clone()));
            // Replace carries the resourceVersion read: a concurrent taker makes this 409.
            // Counted from before the call: the record may be written at any point of it.
            let sent = Instant::now();
            bounded(self.api.replace(&self.name, &PostParams::default(), &lease)).await?;
            *renewed = Some(sent);
            self.became(true, "renewed the Lease");
            return Ok(());
        }
        // Someone else's (or nobody's): leader no longer, whatever we thought.
        self.became(false, "the Lease names another holder");
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let version = lease.metadata.resource_version.clone();
        let same = observed
            .as_ref()
            .is_some_and(|o| o.holder == holder && o.renew == renew && o.version == version);
        if !same {
            *observed = Some(Observed {
                holder: holder.clone(),
                renew,
                version,
                since: Instant::now(),
            });
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let expired = observed.as_ref().is_some_and(|o| o.since.elapsed() >= duration);
        if holder.is_none() || expired {
            lease.spec = Some(self.spec(transitions + 1, None));
            let sent = Instant::now();
            bounded(self.api.replace(&self.name, &PostParams::default(), &lease)).await?;
            *renewed = Some(sent);
            *observed = None;
            let why = match holder {
                None => "the Lease was free".to_string(),
                Some(h) => format!("{h} stopped renewing the Lease"),
            };
            self.became(true, &why);
        }
        Ok(())
    }

    /// Runs until `stop`, then gives the Lease up if held.
    pub async fn run(self, stop: CancellationToken) {
        let mut observed = None;
        let mut renewed: Option<Instant> = None;
        loop {
            // A leader stops at STEP_DOWN after its last renewal, even while a call hangs.
            let deadline = renewed
                .filter(|_| self.leadership.is_leader())
                .map(|r| tokio::time::Instant::from_std(r + STEP_DOWN));
            let stepped = tokio::select! {
                r = self.step(&mut observed, &mut renewed) => r,
                () = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => Err(format!("no renewal for {}s", STEP_DOWN.as_secs())),
            };
            if let Err(err) = stepped {
                tracing::debug!(%err, "leader election step failed");
                if self.leadership.is_leader() && renewed.is_none_or(|r| r.elapsed() >= STEP_DOWN) {
                    self.became(false, &format!("cannot renew the Lease: {err}"));
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(RENEW) => {}
            }
        }
        if self.leadership.is_leader() {
            self.became(false, "shutting down");
            if let Err(err) = self.release().await {
                warn!(%err, "cannot give the Lease up; another replica takes it once it expires");
            }
        }
    }

    /// Empties the holder, so a candidate takes over at its next look.
    async fn release(&self) -> Result<(), String> {
        let Some(mut lease) = bounded(self.api.get_opt(&self.name)).await? else {
            return Ok(());
        };
        let mine = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        if !mine {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        bounded(self.api.replace(&self.name, &PostParams::default(), &lease)).await?;
        info!(lease = self.name, "gave the leader Lease up");
        Ok(())
    }
}
