//! mailhook: a Kubernetes operator that turns mailbox activity into signed, reliable
//! webhook deliveries. `main.rs` only parses the command line and calls into here.

pub mod admin;
pub mod api;
pub mod archive;
pub mod auth;
pub mod cli;
pub mod controller;
pub mod delivery;
pub mod event;
pub mod metrics;
pub mod panics;
pub mod route;
pub mod source;
pub mod store;
pub mod telemetry;
