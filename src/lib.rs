//! mailhook: a Kubernetes operator that turns mailbox activity into signed, reliable
//! webhook deliveries. `main.rs` only parses the command line and calls into here.

pub mod admin;
pub mod api;
pub mod app;
pub mod archive;
pub mod auth;
pub mod cli;
pub mod controller;
pub mod crypto;
pub mod delivery;
pub mod event;
pub mod handles;
pub mod history;
pub mod lifecycle;
pub mod metrics;
pub mod panics;
pub mod route;
pub mod source;
pub mod store;
pub mod telemetry;

/// `err` and its sources, `: `-separated: what a log line or an answer should say about an
/// error whose Display names only the outermost step.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
