//! Integration tests against a real kube-apiserver and etcd (see tests/testenv). Run them
//! with tests/run, or after `eval "$(tests/testenv/up)"` with `cargo test`.

mod audit;
mod backlog;
mod controller;
mod crd;
mod delivery;
mod dovecot;
mod durability;
mod filter;
mod formats;
mod grants;
mod history;
mod hold;
#[path = "../common/pg.rs"]
mod pg;
mod pgstore;
mod replicas;
mod scale;
mod security;
mod smtp;
mod sources;
mod support;
mod topology;
