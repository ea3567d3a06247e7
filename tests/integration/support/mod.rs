//! Test harness, one helper for each job, by concern:
//!
//! - [`cluster`]: the control plane that `tests/testenv/up` started (found through
//!   `KUBECONFIG`), the CRDs installed once per process, one namespace per test so tests run
//!   in parallel without seeing each other's objects, kubectl, and reading our resources'
//!   status and conditions.
//! - [`operator`]: the real `mailhook run` binary scoped to a test's namespace, started
//!   and restarted until its `/readyz` answers.
//! - [`receiver`]: `tests/receiver/receiver.py`, a real webhook receiver that verifies
//!   signatures with the `standardwebhooks` PyPI package.
//! - [`fixtures`]: the YAML, events and certificates several tests share.
//! - [`dovecot`]: a real Dovecot with mailhook's Dovecot source, and a mail user's actions.
//!
//! Everything is re-exported here: tests `use crate::support::{...}`.

mod cluster;
mod dovecot;
mod fixtures;
mod operator;
mod receiver;

use std::time::Duration;

pub use cluster::{TestNamespace, apply, apply_path, client, condition, install_crds, kubectl_run, wait_ready, whs};
pub use dovecot::Dovecot;
pub use fixtures::{SIEM_SECRET, apply_siem, self_signed, siem_event, signing_secret, subscription};
pub use operator::{DOVECOT_TOKEN, INGEST_TOKEN, Operator, free_port};
pub use receiver::{Received, Receiver};

/// Polls `get` until `check` holds, for up to 60 s (a ceiling for a loaded machine, not a speed
/// assertion); panics with the last value seen.
pub async fn eventually<T: std::fmt::Debug, F, Fut>(what: &str, mut get: F, check: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let value = get().await;
        if check(&value) {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last seen: {value:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `command` to its end, writing `stdin` (if given) to it; returns (success, stdout,
/// stderr), or the error of starting it (for callers with a hint of their own, e.g. which
/// package provides the program).
pub fn run(command: &mut std::process::Command, stdin: Option<&[u8]>) -> std::io::Result<(bool, String, String)> {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("stdin is piped");
    if let Some(bytes) = stdin {
        input.write_all(bytes)?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs the real `mailhook` binary (its CLI subcommands, e.g. `crdgen`, `keygen`,
/// `replay`); returns (success, stdout, stderr).
pub fn mailhook(args: &[&str]) -> (bool, String, String) {
    run(
        std::process::Command::new(env!("CARGO_BIN_EXE_mailhook")).args(args),
        None,
    )
    .expect("run mailhook")
}

/// The repository's root, for examples/ and charts/.
pub fn repo_path(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}
