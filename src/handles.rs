//! Shared runtime handles: small pieces of state that several parts read and one part
//! writes — readiness, per-filter match counters, the subscription directory. They let
//! the inbound adapters (ingest, SMTP, admin, history) and the controllers share state
//! without importing each other. Depends on nothing else of the crate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};

/// Whether this replica leads (writes status and Events, runs store-wide housekeeping);
/// set by the leader election, read everywhere; cheap to clone.
#[derive(Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// A process that is the only one (no election): always the leader.
    pub fn sole() -> Leadership {
        Leadership(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Returns true when that changed it.
    pub fn set(&self, leader: bool) -> bool {
        self.0.swap(leader, Ordering::AcqRel) != leader
    }
}

/// The readiness part that follows the store (not ready while its commits fail).
pub const STORE: &str = "store";

/// Whether the operator is ready, composed from named parts (caches synced, not shutting
/// down, …). Each part says why it is not ready; `/readyz?verbose` lists them all.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    /// Part → None when ready, else why not.
    parts: Mutex<BTreeMap<&'static str, Option<String>>>,
    /// Every part ready (read on every ingest request: no lock).
    all: AtomicBool,
}

/// One named part of readiness; cheap to clone.
#[derive(Clone)]
pub struct ReadinessPart {
    readiness: Readiness,
    name: &'static str,
}

impl Readiness {
    /// Registers a part, not ready for `why` until it says otherwise.
    pub fn part(&self, name: &'static str, why: impl Into<String>) -> ReadinessPart {
        self.set(name, Some(why.into()));
        ReadinessPart {
            readiness: self.clone(),
            name,
        }
    }

    fn set(&self, name: &'static str, state: Option<String>) {
        let mut parts = self.inner.parts.lock();
        parts.insert(name, state);
        let all = parts.values().all(Option::is_none);
        self.inner.all.store(all, Ordering::Release);
    }

    /// Every part is ready (and at least one is registered).
    pub fn is_ready(&self) -> bool {
        self.inner.all.load(Ordering::Acquire)
    }

    /// Every part but `part` is ready: the sources answer a store outage themselves, with
    /// its reason, and refuse on any other part.
    pub fn is_ready_apart_from(&self, part: &str) -> bool {
        self.inner
            .parts
            .lock()
            .iter()
            .all(|(name, why)| *name == part || why.is_none())
    }

    /// Every part with why it is not ready (None: ready), by name.
    pub fn report(&self) -> Vec<(&'static str, Option<String>)> {
        self.inner.parts.lock().iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

impl ReadinessPart {
    pub fn ready(&self) {
        self.readiness.set(self.name, None);
    }
    pub fn not_ready(&self, why: impl Into<String>) {
        self.readiness.set(self.name, Some(why.into()));
    }
}

/// Matches of one filter: how many, and the last one's time.
pub type MatchCount = (u64, Option<jiff::Timestamp>);

/// Match counts per filter, by (namespace, name): the routing path counts, the status
/// writer reads.
#[derive(Default)]
pub struct MatchCounters {
    inner: Mutex<HashMap<(String, String), MatchCount>>,
}

impl MatchCounters {
    pub fn record(&self, filters: &[(String, String)], at: jiff::Timestamp) {
        if filters.is_empty() {
            return;
        }
        let mut m = self.inner.lock();
        for f in filters {
            let e = m.entry(f.clone()).or_default();
            e.0 += 1;
            e.1 = Some(at);
        }
    }

    /// Forgets the counts of filters not in `live` (deleted): a filter created again
    /// under the same name starts from zero.
    pub fn retain(&self, live: &HashSet<(String, String)>) {
        self.inner.lock().retain(|k, _| live.contains(k));
    }

    pub fn get(&self, namespace: &str, name: &str) -> MatchCount {
        self.inner
            .lock()
            .get(&(namespace.to_string(), name.to_string()))
            .copied()
            .unwrap_or_default()
    }
}

/// The UID of every subscription by (namespace, name), for lookups by name (the history
/// API is addressed by name, the store by UID).
#[derive(Default)]
pub struct Directory(RwLock<HashMap<(String, String), String>>);

impl Directory {
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.0.read().get(&(namespace.to_string(), name.to_string())).cloned()
    }

    pub fn set(&self, namespace: &str, name: &str, uid: &str) {
        self.0
            .write()
            .insert((namespace.to_string(), name.to_string()), uid.to_string());
    }

    pub fn forget(&self, uids: &[String]) {
        self.0.write().retain(|_, uid| !uids.contains(uid));
    }
}

/// When each source (and producer within it: a credential, or `journal` for the SMTP
/// feed) last had events committed: written by the pipeline, read by the MailSource
/// status loop and the task that exports and persists it (`source::seen`). Producers are
/// bounded by the configured credentials.
#[derive(Default)]
pub struct SourceActivity {
    /// Source (`smtp`, `http`, `dovecot`) → producer → its times.
    sources: RwLock<HashMap<&'static str, HashMap<String, Arc<Heard>>>>,
}

/// One producer's times, in unix seconds (0: never).
#[derive(Default, Debug)]
pub struct Heard {
    /// The last commit of its events, here or (merged from the store) on another replica.
    pub last: std::sync::atomic::AtomicI64,
    /// The newest time the store is known to hold for it.
    pub stored: std::sync::atomic::AtomicI64,
}

impl Heard {
    /// Events of this producer were committed at `at`.
    pub fn heard(&self, at: i64) {
        self.last.fetch_max(at, Ordering::Relaxed);
    }
}

/// One producer's times, as `SourceActivity::snapshot` reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeardFrom {
    pub source: &'static str,
    pub producer: String,
    pub last: i64,
    pub stored: i64,
}

impl SourceActivity {
    /// The times of (`source`, `producer`), made on first use. Allocates only then: the
    /// ingest path calls it for every batch.
    pub fn producer(&self, source: &'static str, producer: &str) -> Arc<Heard> {
        if let Some(heard) = self.sources.read().get(source).and_then(|p| p.get(producer)) {
            return heard.clone();
        }
        self.sources
            .write()
            .entry(source)
            .or_default()
            .entry(producer.to_string())
            .or_default()
            .clone()
    }

    /// A time another replica (or an earlier run) stored: counts as heard and as stored.
    pub fn merge_stored(&self, source: &'static str, producer: &str, at: i64) {
        let heard = self.producer(source, producer);
        heard.last.fetch_max(at, Ordering::Relaxed);
        heard.stored.fetch_max(at, Ordering::Relaxed);
    }

    /// When (`source`, `producer`) was last heard from, if ever.
    pub fn last(&self, source: &str, producer: &str) -> Option<i64> {
        let sources = self.sources.read();
        let last = sources.get(source)?.get(producer)?.last.load(Ordering::Relaxed);
        (last > 0).then_some(last)
    }

    /// Every producer heard from, sorted.
    pub fn snapshot(&self) -> Vec<HeardFrom> {
        let mut all: Vec<HeardFrom> = self
            .sources
            .read()
            .iter()
            .flat_map(|(source, producers)| {
                producers.iter().map(|(producer, heard)| HeardFrom {
                    source,
                    producer: producer.clone(),
                    last: heard.last.load(Ordering::Relaxed),
                    stored: heard.stored.load(Ordering::Relaxed),
                })
            })
            .collect();
        all.sort_by(|a, b| (a.source, &a.producer).cmp(&(b.source, &b.producer)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_part_and_says_why() {
        let r = Readiness::default();
        assert!(!r.is_ready(), "nothing registered: not ready");
        let caches = r.part("caches", "waiting for the initial list");
        let running = r.part("shutdown", "starting");
        running.ready();
        assert!(!r.is_ready());
        assert_eq!(
            r.report(),
            vec![
                ("caches", Some("waiting for the initial list".into())),
                ("shutdown", None)
            ]
        );
        caches.ready();
        assert!(r.is_ready());
        running.not_ready("draining");
        assert!(!r.is_ready());
    }
}
