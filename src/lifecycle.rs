//! One lifecycle for every long-running task: each is started here, in a stage, and
//! tracked; on shutdown the stages stop in order — intake (stop accepting mail and
//! events), delivery (no new attempts; those in flight finish until the deadline, the rest
//! stay due in the store), control (controllers, status, watchers), storage (the last
//! writes are committed), admin (metrics and probes answer until the end) — and what is
//! still running when the deadline passes is named in the log. Depends on nothing else
//! of the crate.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The stages, in the order they stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Listeners that take events in: ingest API, SMTP.
    Intake,
    /// Delivery shards and the attempts they started: stopped right after intake, so the
    /// drain has the deadline to itself.
    Delivery,
    /// Controllers, the status writer, the routing table, token and certificate watchers.
    Control,
    /// Housekeeping and the store's last commits.
    Storage,
    /// The admin server: probes and metrics answer while everything else stops.
    Admin,
}

const STAGES: [Stage; 5] = [
    Stage::Intake,
    Stage::Delivery,
    Stage::Control,
    Stage::Storage,
    Stage::Admin,
];

struct Part {
    token: CancellationToken,
    tracker: TaskTracker,
    /// Running tasks of this stage by name (a name may run several times).
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

/// One running task in its stage's count; counted out when dropped.
struct Running {
    map: Arc<Mutex<BTreeMap<&'static str, usize>>>,
    name: &'static str,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.map.lock();
        if let Some(n) = running.get_mut(self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(self.name);
            }
        }
    }
}

/// The least time a stage gets once the deadline has passed.
const LATE_GRACE: Duration = Duration::from_secs(2);

/// The tasks of the process. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    parts: Arc<[Part; 5]>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

/// How a shutdown went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Tasks still running when their stage's time ran out, by stage and name.
    pub left_running: Vec<(Stage, &'static str)>,
    /// Stages whose time ran out (also when what was left had no name).
    pub timed_out: Vec<Stage>,
}

impl Stopped {
    pub fn clean(&self) -> bool {
        self.left_running.is_empty() && self.timed_out.is_empty()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        let part = || Part {
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
            running: Arc::default(),
        };
        Lifecycle {
            parts: Arc::new([part(), part(), part(), part(), part()]),
        }
    }

    fn part(&self, stage: Stage) -> &Part {
        &self.parts[stage as usize]
    }

    /// Cancelled when `stage` is asked to stop: the tasks of that stage watch it.
    pub fn token(&self, stage: Stage) -> CancellationToken {
        self.part(stage).token.clone()
    }

    /// The tracker of `stage`, for a part that spawns many short tasks of its own and
    /// wants the drain to wait for them too.
    pub fn tracker(&self, stage: Stage) -> TaskTracker {
        self.part(stage).tracker.clone()
    }

    /// Starts a long-running `task` in `stage`; the shutdown waits for it. `name` says
    /// what it is in the log when it ends early or outlives its stage.
    pub fn spawn<F>(&self, stage: Stage, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.start(stage, name, task, true);
    }

    /// Starts a short task in `stage` (a verification handshake, one SMTP session); the
    /// shutdown waits for it like for any other.
    pub fn spawn_short<F>(&self, stage: Stage, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.start(stage, name, task, false);
    }

    fn start<F>(&self, stage: Stage, name: &'static str, task: F, long_running: bool)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let part = self.part(stage);
        *part.running.lock().entry(name).or_default() += 1;
        let running = Running {
            map: part.running.clone(),
            name,
        };
        let token = part.token.clone();
        part.tracker.spawn(async move {
            // Counted out when it ends, also by a panic (the guard drops while unwinding).
            let _running = running;
            task.await;
            if long_running && !token.is_cancelled() {
                warn!(task = name, "a long-running task ended before shutdown");
            }
        });
    }

    /// Starts a blocking task (a thread) in `stage`, tracked like `spawn`.
    pub fn spawn_blocking<F>(&self, stage: Stage, name: &'static str, task: F)
    where
        F: FnOnce() + Send + 'static,
    {
        self.spawn_short(stage, name, async move {
            if let Err(err) = tokio::task::spawn_blocking(task).await {
                warn!(task = name, %err, "a blocking task stopped unexpectedly");
            }
        });
    }

    /// Stops every stage in order; each gets what is left of `deadline` (delivery may take
    /// most of it), and at least `LATE_GRACE` so that a stage stuck early does not rob the
    /// store of its last commit. Tasks still running when their time is up are named and
    /// left behind.
    pub async fn shutdown(&self, deadline: Duration) -> Stopped {
        let until = tokio::time::Instant::now() + deadline;
        let mut stopped = Stopped::default();
        for stage in STAGES {
            let part = self.part(stage);
            part.token.cancel();
            part.tracker.close();
            let stage_until = until.max(tokio::time::Instant::now() + LATE_GRACE);
            if tokio::time::timeout_at(stage_until, part.tracker.wait()).await.is_err() {
                stopped.timed_out.push(stage);
                for (name, _) in part.running.lock().iter() {
                    stopped.left_running.push((stage, name));
                }
                warn!(?stage, running = ?stopped.left_running, "tasks still running at the shutdown deadline");
            } else {
                info!(?stage, "stopped");
            }
        }
        stopped
    }
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stages_stop_in_order_and_stragglers_are_named() {
        let lifecycle = Lifecycle::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        for stage in [Stage::Admin, Stage::Delivery, Stage::Intake] {
            let (token, order) = (lifecycle.token(stage), order.clone());
            lifecycle.spawn(stage, "worker", async move {
                token.cancelled().await;
                order.lock().push(stage);
            });
        }
        // A task that ignores its stage's token outlives the deadline.
        lifecycle.spawn(Stage::Control, "stuck", std::future::pending());
        let stopped = lifecycle.shutdown(Duration::from_secs(5)).await;
        assert_eq!(*order.lock(), vec![Stage::Intake, Stage::Delivery, Stage::Admin]);
        assert_eq!(stopped.left_running, vec![(Stage::Control, "stuck")]);
        assert_eq!(stopped.timed_out, vec![Stage::Control]);
        assert!(!stopped.clean());
    }

    #[tokio::test]
    async fn a_clean_shutdown_leaves_nothing_running() {
        let lifecycle = Lifecycle::new();
        let token = lifecycle.token(Stage::Storage);
        lifecycle.spawn(Stage::Storage, "committer", async move { token.cancelled().await });
        lifecycle.spawn_blocking(Stage::Storage, "flush", || {});
        assert!(lifecycle.shutdown(Duration::from_secs(5)).await.clean());
    }
}
