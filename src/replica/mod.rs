//! Several replicas on one shared PostgreSQL store: which replica delivers which shard
//! (`ownership`, advisory locks with fencing), which one writes status (`leader`, a
//! Lease), and how delivery health travels from the shards' owners to the leader
//! (`health`, through the store). An adapter over the core: depends on `store`,
//! `delivery`, `metrics` and `handles`; only `app` depends on it.

pub mod health;
pub mod leader;
pub mod ownership;
