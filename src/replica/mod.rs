//! Several replicas on one shared PostgreSQL store: which replica delivers which shard
//! (`ownership`, advisory locks with fencing), which one writes status (`leader`, a
//! Lease), and how delivery health travels from the shards' owners to the leader
//! (`health`, through the store). An adapter over the core: depends on `store`,
//! `delivery`, `metrics`, `handles` and `lifecycle`; only `app` depends on it.

pub mod health;
pub mod leader;
pub mod ownership;

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::delivery::Deliveries;
use crate::handles::{Leadership, ReadinessPart};
use crate::lifecycle::{Lifecycle, Stage};
use crate::metrics::Metrics;
use crate::store::open::Joined;

/// Where the leader Lease is, and how long a shard given up may drain.
pub struct Settings {
    pub lease: String,
    pub lease_namespace: String,
    pub drain: Duration,
}

/// What one replica of a shared store runs besides the rest.
pub struct Replica {
    /// Its place among the replicas (the session holding its member lock).
    pub joined: Joined,
    pub identity: String,
    pub store: Arc<dyn crate::store::Backend>,
    pub deliveries: Arc<Deliveries>,
    pub metrics: Metrics,
    pub leadership: Leadership,
    pub ready: ReadinessPart,
}

/// Starts shard ownership (stops after the deliveries, so their completions land first),
/// the health publisher and the leader election (stop with the controllers: the Lease is
/// given up once status writes have stopped).
pub fn start(lifecycle: &Lifecycle, client: &kube::Client, settings: Settings, r: Replica) {
    info!(
        identity = r.identity,
        lease = %format!("{}/{}", settings.lease_namespace, settings.lease),
        "replica of a shared store: shards are shared out, the Lease holder writes status"
    );
    let owning = ownership::Ownership {
        database: r.joined.database,
        identity: r.identity.clone(),
        store: r.store,
        deliveries: r.deliveries.clone(),
        metrics: r.metrics.clone(),
        drain: settings.drain,
    };
    let (stop, ready) = (lifecycle.token(Stage::Storage), r.ready);
    lifecycle.spawn(
        Stage::Storage,
        "shard ownership",
        owning.run(Some(r.joined.session), stop, ready),
    );
    let stop = lifecycle.token(Stage::Control);
    lifecycle.spawn(
        Stage::Control,
        "health publisher",
        health::run(r.deliveries, r.identity.clone(), stop),
    );
    let election = leader::Election {
        api: kube::Api::namespaced(client.clone(), &settings.lease_namespace),
        name: settings.lease,
        identity: r.identity,
        leadership: r.leadership,
        metrics: r.metrics,
    };
    let stop = lifecycle.token(Stage::Control);
    lifecycle.spawn(Stage::Control, "leader election", election.run(stop));
}
