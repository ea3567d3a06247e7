//! Shard ownership among the replicas sharing a PostgreSQL store. Each replica keeps one
//! database session holding a member lock and the advisory locks of the shards it owns;
//! every `TICK` it counts the live members and moves towards its fair share
//! (`ceil(shards / members)`): it takes free shards while below it, and gives back the
//! ones above it — first letting their in-flight deliveries finish, then unlocking — so
//! two replicas never deliver one shard at once. A session that fails loses every shard
//! here at once (the server frees the locks when it notices the connection gone).
//!
//! Depends on the store (its `Sharing` side and the PostgreSQL session) and on delivery
//! (to wake the shards that got work); nothing depends on it but `app`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::delivery::Deliveries;
use crate::handles::ReadinessPart;
use crate::metrics::Metrics;
use crate::store::Backend;
use crate::store::postgres::Database;
use crate::store::postgres::shared::{Session, SharedError};

/// How often a replica looks at the membership and its share.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the owned shards are polled for deliveries other replicas committed.
const ARRIVALS: Duration = Duration::from_millis(50);
/// One session call may take this long; a slower one counts as a lost session.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What the ownership loop needs.
pub struct Ownership {
    pub database: Database,
    /// This replica's name (the pod's): what `shard_owners` and the status show.
    pub identity: String,
    pub store: Arc<dyn Backend>,
    pub deliveries: Arc<Deliveries>,
    pub metrics: Metrics,
    /// Longest a shard being given back waits for its in-flight deliveries (the longest
    /// delivery timeout, with a margin); after it, they are abandoned to the next owner.
    pub drain: Duration,
}

/// How long a replica whose store cannot commit keeps its shards before it gives them
/// to the replicas that can.
pub const STORE_DOWN_GIVE_UP: Duration = Duration::from_secs(10);

/// Whether a store down for `down` has been down long enough to step aside. Pure.
pub fn gives_up(down: Duration) -> bool {
    down >= STORE_DOWN_GIVE_UP
}

/// Fair share of `shards` among `members` live replicas.
pub fn fair_share(shards: usize, members: u64) -> usize {
    let members = usize::try_from(members.max(1)).unwrap_or(usize::MAX);
    shards.div_ceil(members)
}

/// Which of `owned` to give back to come down to `fair`: the highest-numbered ones.
/// Pure.
pub fn surplus(owned: &[u32], fair: usize) -> Vec<u32> {
    let mut owned = owned.to_vec();
    owned.sort_unstable();
    owned.split_off(fair.min(owned.len()))
}

async fn bounded<T>(call: impl std::future::Future<Output = Result<T, SharedError>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| crate::error_chain(&e)),
        Err(_) => Err(format!("the database took longer than {}s", CALL_TIMEOUT.as_secs())),
    }
}

impl Ownership {
    fn sharing(&self) -> &dyn crate::store::Sharing {
        // `app` starts this loop only on a shared store.
        self.store
            .sharing()
            .unwrap_or_else(|| unreachable!("ownership runs on a shared store only"))
    }

    /// Runs until `stop`; then lets every shard go at once (after the store's last commits).
    pub async fn run(self, mut first: Option<Session>, stop: CancellationToken, ready: ReadinessPart) {
        // Since when (and why) claiming new deliveries fails: like failing commits, a reason
        // to step aside.
        let claims_failing: Arc<parking_lot::Mutex<Option<(Instant, String)>>> = Arc::default();
        let arrivals = tokio::spawn(poll_arrivals(
            self.store.clone(),
            self.deliveries.clone(),
            stop.clone(),
            claims_failing.clone(),
        ));
        loop {
            ready.not_ready("connecting to the store to take a share of the delivery shards");
            let session = match first.take() {
                Some(s) => Ok(s),
                None => tokio::select! {
                    () = stop.cancelled() => break,
                    s = bounded(Session::open(&self.database, std::time::Duration::ZERO)) => s,
                },
            };
            let session = match session {
                Ok(s) => s,
                Err(err) => {
                    warn!(%err, "cannot open the shard session; retrying");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(TICK) => continue,
                    }
                }
            };
            info!(identity = self.identity, "joined the replicas sharing the store");
            let mut draining: HashMap<u32, Instant> = HashMap::new();
            let mut down_since: Option<Instant> = None;
            let lost = loop {
                // Its commits failing for long, this replica cannot deliver its shards (a
                // completion would not be durable): it steps aside so that replicas that can
                // commit take them, and joins again once it commits.
                let failing = claims_failing.lock().clone();
                match self.store.commits_fail().or(failing.as_ref().map(|f| f.1.clone())) {
                    None => down_since = None,
                    Some(why) => {
                        let since = *down_since.get_or_insert(failing.map_or_else(Instant::now, |f| f.0));
                        if gives_up(since.elapsed()) {
                            let owned = self.sharing().owned();
                            if let Err(err) = bounded(session.leave(&owned)).await {
                                warn!(%err, "cannot unlock the shards; they are free once the session closes");
                            }
                            break format!(
                                "the store cannot commit or claim ({why}) for {}s: stepping aside",
                                since.elapsed().as_secs()
                            );
                        }
                    }
                }
                if let Err(err) = self.tick(&session, &mut draining).await {
                    break err;
                }
                ready.ready();
                tokio::select! {
                    () = stop.cancelled() => {
                        self.leave(&session).await;
                        arrivals.abort();
                        return;
                    }
                    () = tokio::time::sleep(TICK) => {}
                }
            };
            // The locks are gone with the session (or soon will be): nothing here is ours.
            let owned = self.sharing().owned();
            warn!(err = %lost, shards = owned.len(), "lost the shard session; its shards are given up at once");
            for (shard, _) in owned {
                self.sharing().release(shard);
                self.disown(shard, "lost");
            }
            drop(session);
            // Join again only once the store commits.
            while self.store.commits_fail().is_some() {
                tokio::select! {
                    () = stop.cancelled() => {
                        arrivals.abort();
                        return;
                    }
                    () = tokio::time::sleep(TICK) => {}
                }
            }
        }
        arrivals.abort();
    }

    /// One look: membership, give back the surplus, finish drains, take the shortfall.
    async fn tick(&self, session: &Session, draining: &mut HashMap<u32, Instant>) -> Result<(), String> {
        if session.is_closed() {
            return Err("the connection closed".into());
        }
        let members = bounded(session.members()).await?;
        let shards = self.sharing().shards();
        let fair = fair_share(shards, members);
        let owned: Vec<u32> = self.sharing().owned().into_iter().map(|(s, _)| s).collect();
        // Shards let go but still locked: held until their deliveries in flight are done.
        let kept = owned.len() + draining.len();
        // Above the share, give the surplus back; at the share while another replica is
        // below its floor and no shard is free, give one back so it can have it.
        let holdings = bounded(session.holdings()).await?;
        let floor = shards / usize::try_from(members.max(1)).unwrap_or(usize::MAX);
        let starving = holdings.first().is_some_and(|least| (*least as usize) < floor);
        let mut target = fair;
        if kept == fair && draining.is_empty() && starving && holdings.iter().sum::<u64>() >= shards as u64 {
            target = fair.saturating_sub(1);
        }
        if kept > target {
            for shard in surplus(&owned, target.saturating_sub(draining.len())) {
                info!(shard, members, fair, "giving a shard back to even out the replicas");
                self.sharing().release(shard);
                draining.insert(shard, Instant::now());
            }
        }
        let epochs: HashMap<u32, u64> = bounded(session.owners())
            .await?
            .into_iter()
            .filter(|o| o.owner == self.identity)
            .map(|o| (o.shard, o.epoch))
            .collect();
        for (shard, since) in draining.clone() {
            let left = self.sharing().in_flight(shard);
            if left > 0 && since.elapsed() < self.drain {
                continue;
            }
            if left > 0 {
                warn!(
                    shard,
                    in_flight = left,
                    "giving a shard back with deliveries still in flight; its next owner makes them again"
                );
            }
            // Their completions are committed before the lock goes.
            self.flush().await;
            bounded(session.give_back(shard, epochs.get(&shard).copied().unwrap_or(0))).await?;
            draining.remove(&shard);
            self.disown(shard, "released");
        }
        let kept = self.sharing().owned().len() + draining.len();
        // A free shard goes to a replica below its floor first.
        if kept >= fair || (starving && kept >= floor) {
            return Ok(());
        }
        let locked = bounded(session.locked()).await?;
        let want = fair - kept;
        let mut taken = Vec::new();
        for shard in 0..u32::try_from(shards).unwrap_or(u32::MAX) {
            if taken.len() == want {
                break;
            }
            if locked.contains(&shard) {
                continue;
            }
            if let Some(epoch) = bounded(session.take(shard, &self.identity)).await? {
                taken.push((shard, epoch));
            }
        }
        if taken.is_empty() {
            return Ok(());
        }
        // Loaded together: one read of the attempt log and of the published health for all.
        let (store, loading) = (self.store.clone(), taken.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let Some(sharing) = store.sharing() else {
                return Ok((vec![], vec![]));
            };
            let subscriptions = sharing.acquire(&loading)?;
            // What the previous owners published: the counters go on from there.
            let health: Vec<_> = sharing
                .published_health()?
                .into_iter()
                .filter(|h| {
                    let shard = crate::store::shard_of(&h.uid, sharing.shards()) as u32;
                    loading.iter().any(|(s, _)| *s == shard)
                })
                .collect();
            Ok::<_, crate::store::StoreError>((subscriptions, health))
        })
        .await
        .map_err(|e| e.to_string())?;
        match loaded {
            Ok((subscriptions, health)) => {
                self.deliveries.seed_health(&health);
                self.deliveries.wake_shards(subscriptions.iter().map(String::as_str));
                for (shard, epoch) in taken {
                    info!(shard, epoch, "took a shard");
                    self.deliveries.wake_shard(shard as usize);
                    self.metrics.shard_owned.with_label_values(&[&shard.to_string()]).set(1);
                    self.metrics.shard_handovers.with_label_values(&["acquired"]).inc();
                }
            }
            Err(err) => {
                // Not loaded: not ours. Given back for another replica (or a later tick).
                warn!(%err, shards = ?taken, "cannot load the shards just taken; giving them back");
                for (shard, epoch) in taken {
                    self.sharing().release(shard);
                    bounded(session.give_back(shard, epoch)).await?;
                }
            }
        }
        Ok(())
    }

    /// Commits what is queued (completions above all) before shards are given back; a
    /// failure is told, and what was not committed is delivered again by the next owner.
    async fn flush(&self) {
        let store = self.store.clone();
        let failed = match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => err.to_string(),
            Err(err) => err.to_string(),
        };
        warn!(
            err = failed,
            "cannot commit the last writes before giving shards back; their next owner delivers those again"
        );
    }

    /// A shard is no longer this replica's: its series goes (absent already is fine), the
    /// handover is counted.
    fn disown(&self, shard: u32, direction: &str) {
        let _ = self.metrics.shard_owned.remove_label_values(&[&shard.to_string()]);
        self.metrics.shard_handovers.with_label_values(&[direction]).inc();
    }

    /// Shutdown: the last completions committed, then every lock released at once.
    async fn leave(&self, session: &Session) {
        self.flush().await;
        let owned = self.sharing().owned();
        for (shard, _) in &owned {
            self.sharing().release(*shard);
        }
        match bounded(session.leave(&owned)).await {
            Ok(()) => info!(shards = owned.len(), "gave every shard back"),
            Err(err) => warn!(%err, "cannot give the shards back; they are free once the session closes"),
        }
    }
}

/// Claims what other replicas (and this one) committed for the shards owned, and wakes
/// the shards that got work.
async fn poll_arrivals(
    store: Arc<dyn Backend>,
    deliveries: Arc<Deliveries>,
    stop: CancellationToken,
    failing: Arc<parking_lot::Mutex<Option<(Instant, String)>>>,
) {
    // A claim that failed may have committed without its answer: the rows it claimed are
    // found again by loading the owned shards anew.
    let mut reload = false;
    let mut counted = std::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = deliveries.arrivals.notified() => {}
            () = tokio::time::sleep(ARRIVALS) => {}
        }
        if store.unavailable().is_some() {
            continue;
        }
        // The backlog over every shard, for the metrics, once a second.
        if counted.elapsed() >= TICK {
            counted = std::time::Instant::now();
            let s = store.clone();
            if let Ok(Some(Err(err))) =
                tokio::task::spawn_blocking(move || s.sharing().map(|sh| sh.refresh_backlog())).await
            {
                tracing::debug!(%err, "cannot count the backlog; the last count stands");
            }
        }
        let (s, again) = (store.clone(), reload);
        let claimed = tokio::task::spawn_blocking(move || {
            s.sharing()
                .map(|sh| if again { sh.reload() } else { sh.claim_arrivals() })
        })
        .await;
        match claimed {
            Ok(Some(Ok(subscriptions))) => {
                reload = false;
                *failing.lock() = None;
                deliveries.wake_shards(subscriptions.iter().map(String::as_str));
            }
            Ok(Some(Err(err))) => {
                reload = true;
                failing.lock().get_or_insert_with(|| (Instant::now(), err.to_string()));
                tracing::debug!(%err, "cannot claim new deliveries; will load the shards again");
            }
            Ok(None) => return,
            Err(err) => warn!(%err, "claiming new deliveries stopped unexpectedly"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fair_share_covers_every_shard_and_the_surplus_is_the_highest() {
        assert_eq!(fair_share(32, 1), 32);
        assert_eq!(fair_share(32, 2), 16);
        assert_eq!(fair_share(32, 3), 11);
        assert_eq!(fair_share(32, 0), 32, "no members counted yet: this one");
        for members in 1..=40u64 {
            let fair = fair_share(32, members);
            assert!(fair * members as usize >= 32, "{members} members cover every shard");
            assert!(
                fair <= 32 / members as usize + 1,
                "and none owns more than its share plus one"
            );
        }
        assert_eq!(surplus(&[5, 1, 9, 3], 2), vec![5, 9]);
        assert_eq!(surplus(&[1, 2], 4), Vec::<u32>::new());
        assert!(!gives_up(Duration::from_secs(9)) && gives_up(STORE_DOWN_GIVE_UP));
    }
}
