//! The operator as one process: builds every part from the parsed configuration, starts
//! each long-running task through the lifecycle, and on SIGTERM stops them in order (a
//! second signal exits at once). The only module that knows every other; nothing
//! depends on it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use crate::archive::{self, RawLinks};
use crate::auth::Tokens;
use crate::cli::RunConfig;
use crate::controller;
use crate::delivery::client::Clients;
use crate::delivery::egress::EgressPolicy;
use crate::delivery::{Capacity, Deliveries, Housekeeping};
use crate::handles::{self, Directory, Leadership, MatchCounters, Readiness, ReadinessPart, SourceActivity};
use crate::history::History;
use crate::lifecycle::{Lifecycle, Stage};
use crate::metrics::Metrics;
use crate::route::Router;
use crate::source::{self, Pipeline, http::IngestConfig};
use crate::store::open::{Location, Opened};

/// Exit code after a second signal cut the drain short (128 + SIGINT, as shells do).
pub const FORCED_EXIT: i32 = 130;

/// Why `run` refuses to start without a store choice: acknowledging events that a restart
/// loses must be a decision, never a default.
const NO_STORE: &str = "no store chosen: pass --store-dir DIR (the embedded durable store, on a volume), \
--store-url postgres://… (PostgreSQL), or --store-memory (tests and demos only: every acknowledged event is \
lost when the process stops)";

/// Flag combinations refused before anything starts (clap cannot express them).
fn preflight(config: &RunConfig) -> anyhow::Result<()> {
    let store = &config.store;
    anyhow::ensure!(
        store.store_dir.is_some() || store.store_url.is_some() || store.store_memory,
        "{NO_STORE}"
    );
    Ok(())
}

/// What every part of the running operator is started with.
struct Base {
    config: RunConfig,
    client: kube::Client,
    lifecycle: Lifecycle,
    metrics: Metrics,
    readiness: Readiness,
}

impl Base {
    /// Serves `app` on `listener` within `bounds` as a task of `stage`, until it stops;
    /// refused connections are counted under `label`.
    fn serve(
        &self,
        stage: Stage,
        task: &'static str,
        label: &'static str,
        listener: TcpListener,
        app: axum::Router,
        bounds: crate::serve::Bounds,
    ) {
        let (stop, refused) = (self.lifecycle.token(stage), self.metrics.refused.clone());
        self.lifecycle.spawn(
            stage,
            task,
            crate::serve::serve(listener, app, bounds, stop, refused, label),
        );
    }

    /// Re-reads a token file for as long as the operator runs.
    fn watch_tokens(&self, tokens: Tokens) {
        let stop = self.lifecycle.token(Stage::Control);
        self.lifecycle.spawn(
            Stage::Control,
            "token file watcher",
            tokens.watch(Tokens::WATCH_INTERVAL, stop),
        );
    }
}

/// The delivery core, once the store is open: what the sources, the admin server and the
/// controllers share.
struct Core {
    deliveries: Arc<Deliveries>,
    audit: crate::history::audit::Audit,
    router: Arc<Router>,
    leadership: Leadership,
    raw_links: Option<Arc<RawLinks>>,
    matches: Arc<MatchCounters>,
    directory: Arc<Directory>,
    activity: Arc<SourceActivity>,
}

/// Runs the operator until SIGTERM or Ctrl-C, then drains.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    preflight(&config)?;
    let client = kube::Client::try_default().await?;
    let version = client.apiserver_version().await?;
    info!(apiserver = %version.git_version, "connected to Kubernetes");
    let base = Base {
        config,
        client,
        lifecycle: Lifecycle::new(),
        metrics: Metrics::new()?,
        readiness: Readiness::default(),
    };
    let running = base.readiness.part("shutdown", "starting");
    let caches = base
        .readiness
        .part("controllers", "waiting for the initial list of every watched resource");
    let admin_listener = TcpListener::bind(base.config.admin.http_addr).await?;
    let admin_addr = admin_listener.local_addr()?;

    let core = start_core(&base, admin_addr).await?;
    start_admin(&base, &core, admin_listener)?;
    let wiring = wiring(&base, &core)?;
    let pipeline = pipeline(&base, &core);
    let dovecot = start_dovecot(&base, &core, &pipeline)?;
    start_ingest(&base, &pipeline, dovecot).await?;
    start_smtp(&base, &pipeline).await?;
    start_controllers(&base, wiring, caches);
    running.ready();

    crate::lifecycle::signal().await;
    running.not_ready("shutting down");
    drain(&base).await;
    Ok(())
}

/// Opens the store and starts what keeps it: the deliveries (with housekeeping), a shared
/// store's replica tasks, the last flush, and the watch on whether it commits.
async fn start_core(base: &Base, admin_addr: SocketAddr) -> anyhow::Result<Core> {
    let (config, lifecycle, metrics) = (&base.config, &base.lifecycle, &base.metrics);
    let Opened { store, kind, joined } = crate::store::open::open(&store_location(config)?).await?;
    metrics.store_kind.with_label_values(&[kind]).set(1);
    // With a shared store, the holder of the Lease leads; otherwise this process does.
    let leadership = match &joined {
        Some(_) => Leadership::default(),
        None => Leadership::sole(),
    };
    metrics.leader.set(i64::from(leadership.is_leader()));
    let raw_links = raw_links(config, store.as_ref(), admin_addr)?;
    let audit_key = audit_key(config, store.as_ref())?;
    let housekeeping = Housekeeping {
        replica: replica_name(config),
        interval: config.store.housekeeping_interval,
        attempt_retention: config.store.attempt_retention,
        max_attempts: config.store.max_attempts_per_subscription,
        dedup_window: config.store.dedup_window,
        raw_message_retention: config.store.raw_message_retention,
    };
    let router = Arc::new(Router::default());
    let deliveries = Deliveries::start(
        Capacity {
            shards: config.delivery.shards,
            max_in_flight: config.delivery.max_deliveries_in_flight as usize,
        },
        store.clone(),
        metrics.clone(),
        housekeeping,
        lifecycle,
        leadership.clone(),
        router.clone(),
    );
    if let Some(joined) = joined {
        crate::replica::start(
            lifecycle,
            &base.client,
            crate::replica::Settings {
                lease: config.store.leader_lease.clone(),
                lease_namespace: lease_namespace(config),
                drain: config.delivery.shutdown_timeout,
            },
            crate::replica::Replica {
                joined,
                identity: replica_name(config),
                store: store.clone(),
                deliveries: deliveries.clone(),
                metrics: metrics.clone(),
                leadership: leadership.clone(),
                ready: base
                    .readiness
                    .part("shards", "joining the replicas that share the store"),
            },
        );
    }
    {
        // The store's last writes are committed once nothing else writes.
        let (store, stop) = (store.clone(), lifecycle.token(Stage::Storage));
        lifecycle.spawn(Stage::Storage, "store flush", async move {
            stop.cancelled().await;
            match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(())) => info!("store flushed"),
                Ok(Err(err)) => tracing::error!(%err, "cannot flush the store; the last writes may be lost"),
                Err(err) => tracing::error!(%err, "flushing the store stopped unexpectedly"),
            }
        });
    }
    watch_store(
        lifecycle,
        store,
        base.readiness.part(handles::STORE, "opening"),
        metrics.clone(),
    );
    let audit = crate::history::audit::Audit::new(deliveries.audit(), audit_key);
    info!(
        origin = audit.key().origin(),
        vkey = audit.key().vkey(),
        "audit log: checkpoints are signed with this key"
    );
    lifecycle.spawn(
        Stage::Control,
        "audit checkpoints",
        crate::history::audit::keep_signing(
            audit.clone(),
            config.audit.audit_checkpoint_interval,
            leadership.clone(),
            metrics.clone(),
            lifecycle.token(Stage::Control),
        ),
    );
    let activity = Arc::new(SourceActivity::default());
    {
        // In Control: stopped once intake has, so its last write holds every event taken.
        let stop = lifecycle.token(Stage::Control);
        lifecycle.spawn(
            Stage::Control,
            "source activity",
            source::seen::keep(
                activity.clone(),
                deliveries.rows(),
                metrics.source_last_event.clone(),
                stop,
            ),
        );
    }
    Ok(Core {
        deliveries,
        audit,
        router,
        leadership,
        raw_links,
        matches: Arc::new(MatchCounters::default()),
        directory: Arc::new(Directory::default()),
        activity,
    })
}

/// The audit checkpoint key: the file's, or one derived from a secret kept in the store
/// (every replica sharing it derives the same).
fn audit_key(config: &RunConfig, store: &dyn crate::store::Store) -> anyhow::Result<crate::audit::key::Key> {
    Ok(match &config.audit.audit_key_file {
        Some(path) => crate::audit::key::Key::from_file(path)?,
        None => {
            let seed = store.secret("audit-checkpoint-key")?;
            crate::audit::key::Key::from_seed(&config.audit.audit_origin, &seed)?
        }
    })
}

/// The admin server: probes, metrics and the history API.
fn start_admin(base: &Base, core: &Core, listener: TcpListener) -> anyhow::Result<()> {
    let config = &base.config;
    let admin_tokens = match &config.admin.admin_token_file {
        Some(path) => {
            let tokens = Tokens::load_named(path, "admin")?;
            base.watch_tokens(tokens.clone());
            Some(tokens)
        }
        None => {
            info!(
                "no --admin-token-file: the history API (attempts, dead letters, replay) takes Kubernetes tokens only, each for the namespaces its user may read"
            );
            None
        }
    };
    let kubernetes_access = Arc::new(crate::auth::kubernetes::KubernetesAccess::new(base.client.clone()));
    let history = History {
        deliveries: core.deliveries.clone(),
        directory: core.directory.clone(),
        tokens: admin_tokens,
        kubernetes: Some(kubernetes_access.clone()),
        failures: Arc::default(),
    };
    let scrapers = match config.admin.metrics_auth {
        crate::cli::MetricsAuth::None => None,
        crate::cli::MetricsAuth::Kubernetes => {
            info!("--metrics-auth kubernetes: /metrics answers tokens allowed to get the non-resource URL /metrics");
            Some(kubernetes_access)
        }
    };
    let admin = crate::admin::router(
        base.metrics.clone(),
        base.readiness.clone(),
        scrapers,
        crate::history::router(history, core.raw_links.clone(), Some(core.audit.clone())),
    );
    info!(addr = %listener.local_addr()?, "admin server listening");
    // Probes and scrapes are few; the cap keeps a flood of connections from starving them.
    let bounds = crate::serve::Bounds {
        max_connections: 256,
        max_per_address: 128,
        header_timeout: std::time::Duration::from_secs(10),
        write_timeout: crate::serve::WRITE_TIMEOUT,
    };
    base.serve(Stage::Admin, "admin server", "admin", listener, admin, bounds);
    Ok(())
}

/// What the controllers are given: the core, and how subscriptions are built.
fn wiring(base: &Base, core: &Core) -> anyhow::Result<controller::Wiring> {
    let config = &base.config;
    let egress = Arc::new(EgressPolicy::new(
        config.egress.egress_allow.clone(),
        config.egress.egress_deny.clone(),
        &config.egress.egress_allow_hosts,
        config.egress.egress_cluster_cidrs.clone(),
    ));
    let (default_backlog, deprecated) = config.default_backlog_cap();
    if let Some(warning) = deprecated {
        tracing::warn!("{warning}");
    }
    Ok(controller::Wiring {
        leadership: core.leadership.clone(),
        deliveries: core.deliveries.clone(),
        router: core.router.clone(),
        matches: core.matches.clone(),
        metrics: base.metrics.clone(),
        directory: core.directory.clone(),
        activity: core.activity.clone(),
        mail_source_selector: config.kube.mail_source_selector.clone(),
        build: controller::subscription::BuildSettings {
            pseudonym_secret: crate::delivery::signing::pseudonym_secret(
                config.delivery.pseudonym_key_file.as_deref(),
            )?,
            raw_links: core.raw_links.clone(),
            clients: Arc::new(Clients::new(egress.clone())),
            egress,
            instance: Arc::from(config.delivery.instance.as_str()),
            default_backlog,
        },
        api_budget: controller::ApiBudget {
            qps: config.kube.kube_api_qps,
            burst: config.kube.kube_api_burst,
        },
        audit_key: config
            .audit
            .audit_key_configmap
            .clone()
            .map(|name| controller::audit_key::Published {
                namespace: lease_namespace(config),
                name,
                vkey: core.audit.key().vkey().to_string(),
                origin: core.audit.key().origin().to_string(),
            }),
        filter_budget: crate::route::FilterBudget {
            max_regexes: config.filters.filter_max_regexes,
            max_regex_bytes: config.filters.filter_max_regex_bytes,
            max_compiled_bytes: config.filters.filter_max_compiled_bytes,
            max_per_namespace: config.filters.filter_max_per_namespace,
        },
    })
}

/// Where every source's events go: stored, routed, enqueued.
fn pipeline(base: &Base, core: &Core) -> Arc<Pipeline> {
    Arc::new(Pipeline {
        deliveries: core.deliveries.clone(),
        router: core.router.clone(),
        metrics: base.metrics.clone(),
        internal_domains: source::internal_domains(&base.config.ingest.internal_domains),
        matches: core.matches.clone(),
        activity: core.activity.clone(),
        limits: source::Limits {
            max_store_bytes: base.config.store.max_store_bytes,
        },
    })
}

/// What the Dovecot routes of the ingest API share with the reconciler.
struct Dovecot {
    config: source::dovecot::DovecotConfig,
    shared: Arc<source::dovecot::Shared>,
}

/// The Dovecot source's own tasks: the mailbox index's retention, and the reconciler when
/// `--dovecot-imap-addr` asks for one.
fn start_dovecot(base: &Base, core: &Core, pipeline: &Arc<Pipeline>) -> anyhow::Result<Dovecot> {
    let (config, lifecycle) = (&base.config, &base.lifecycle);
    {
        // The index is kept whether or not Dovecot reports now: what it reported before ages out.
        let retention = source::dovecot::index::Retention {
            keep: config.dovecot.dovecot_index_retention,
            first: config.store.housekeeping_interval,
        };
        let stop = lifecycle.token(Stage::Storage);
        lifecycle.spawn(
            Stage::Storage,
            "mailbox index retention",
            source::dovecot::index::keep(
                core.deliveries.clone(),
                retention,
                base.metrics.store_purged.clone(),
                stop,
            ),
        );
    }
    let dovecot = Dovecot {
        config: source::dovecot::DovecotConfig {
            sent_folders: config.dovecot.sent_folders.clone(),
            trash_folders: config.dovecot.trash_folders.clone(),
            internal_domains: pipeline.internal_domains.clone(),
            separator: Some(config.dovecot.dovecot_hierarchy_separator),
            own_master_user: config.dovecot.dovecot_master_user.clone(),
            sieve: None,
        },
        shared: Arc::new(source::dovecot::Shared::default()),
    };
    let mut dovecot = dovecot;
    {
        let windows = source::dovecot::held::Windows {
            window: config.dovecot.dovecot_access_window,
            bulk_threshold: config.dovecot.dovecot_bulk_threshold,
            bulk_quiet: config.dovecot.dovecot_bulk_quiet,
            longest: config
                .dovecot
                .dovecot_hold_longest
                .max(config.dovecot.dovecot_access_window),
        };
        let stop = lifecycle.token(Stage::Intake);
        lifecycle.spawn(
            Stage::Intake,
            "Dovecot held reads and logins",
            source::dovecot::held::release(pipeline.clone(), windows, stop),
        );
    }
    {
        // After the ingest API has drained (the storage stage stops last), a last flush.
        let stop = lifecycle.token(Stage::Storage);
        lifecycle.spawn(
            Stage::Storage,
            "Dovecot held rows",
            source::dovecot::held::flush(dovecot.shared.clone(), core.deliveries.rows(), stop),
        );
    }
    let reconciler = dovecot_reconciler(config, &dovecot.config, pipeline, &dovecot.shared)?;
    if let (Some(addr), Some(r)) = (&config.dovecot.dovecot_managesieve_addr, &reconciler) {
        dovecot.config.sieve = Some(source::dovecot::managesieve::SieveServer {
            addr: addr.clone(),
            security: r.config.transport.security.clone(),
            master_user: r.config.master_user.clone(),
            master_password: r.config.master_password.clone(),
            timeout: std::time::Duration::from_millis(1500),
        });
        info!(%addr, "Sieve scripts are read over ManageSieve");
    }
    if let Some(reconciler) = reconciler {
        let (stop, readiness) = (lifecycle.token(Stage::Intake), base.readiness.clone());
        lifecycle.spawn(Stage::Intake, "Dovecot reconciler", async move {
            // Findings are routed like live events: not before every resource is routed.
            while !readiness.is_ready_apart_from(crate::handles::STORE) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
            reconciler.run(stop).await;
        });
    }
    Ok(dovecot)
}

/// The ingest API (with the Dovecot routes), when `--ingest-addr` asks for it.
async fn start_ingest(base: &Base, pipeline: &Arc<Pipeline>, dovecot: Dovecot) -> anyhow::Result<()> {
    let config = &base.config;
    let Some(addr) = config.ingest.ingest_addr else {
        return Ok(());
    };
    let Some(token_file) = config.ingest.ingest_token_file.clone() else {
        anyhow::bail!("--ingest-addr needs --ingest-token-file: the ingest API never runs without authentication");
    };
    let tokens = Tokens::for_ingest(&base.client, &token_file, config.ingest.ingest_token_secret.as_deref()).await?;
    base.watch_tokens(tokens.clone());
    let dovecot_tokens = match &config.dovecot.dovecot_token_file {
        Some(path) => {
            let tokens = Tokens::load_named(path, "Dovecot")?;
            base.watch_tokens(tokens.clone());
            Some(tokens)
        }
        // Said at start: Dovecot servers set up with the ingest token are refused now.
        None if config.dovecot.dovecot_imap_addr.is_some() => {
            tracing::warn!(
                "no --dovecot-token-file: the Dovecot routes answer 401, so Dovecot's push notifications and exported events are refused; give the Dovecot servers a token of their own file (the ingest token is refused there)"
            );
            None
        }
        None => {
            info!("no --dovecot-token-file: the Dovecot routes (/v1/sources/dovecot) answer 401");
            None
        }
    };
    let ingest = IngestConfig {
        token_file,
        max_body_bytes: config.ingest.ingest_max_body_bytes,
        max_batch_events: config.ingest.ingest_max_batch_events,
        body_timeout: config.ingest.ingest_body_timeout,
        max_inflight_body_bytes: config.ingest.ingest_max_inflight_bytes,
        max_requests_per_credential: config.ingest.ingest_max_requests_per_token,
        dovecot: dovecot.config,
        dovecot_tokens,
    };
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "ingest API listening");
    let app = source::http::router_with(
        &ingest,
        pipeline.clone(),
        tokens,
        base.readiness.clone(),
        dovecot.shared,
    );
    let bounds = crate::serve::Bounds {
        max_connections: config.ingest.ingest_max_connections,
        max_per_address: config.ingest.ingest_max_connections_per_address,
        header_timeout: config.ingest.ingest_header_timeout,
        write_timeout: crate::serve::WRITE_TIMEOUT,
    };
    // In-flight requests finish (their events are committed) before the task ends.
    base.serve(Stage::Intake, "ingest API", "ingest", listener, app, bounds);
    Ok(())
}

/// The SMTP journal receiver, when `--smtp-addr` asks for it.
async fn start_smtp(base: &Base, pipeline: &Arc<Pipeline>) -> anyhow::Result<()> {
    let config = &base.config;
    let Some(addr) = config.smtp.smtp_addr else {
        return Ok(());
    };
    let smtp = source::smtp::SmtpConfig {
        hostname: config.smtp.smtp_hostname.clone(),
        max_message_bytes: config.smtp.smtp_max_message_bytes,
        max_recipients: config.smtp.smtp_max_recipients,
        max_connections: config.smtp.smtp_max_connections,
        max_connections_per_address: config.smtp.smtp_max_connections_per_address,
        idle_timeout: config.smtp.smtp_idle_timeout,
        handshake_timeout: config.smtp.smtp_handshake_timeout,
        session_timeout: config.smtp.smtp_session_timeout,
        auth: source::smtp::auth_tokens(
            config.smtp.smtp_auth_token_file.as_deref(),
            config.smtp.smtp_tls_cert_file.as_deref(),
        )?,
        tls: source::smtp::TlsFiles::from_flags(
            config.smtp.smtp_tls_cert_file.as_deref(),
            config.smtp.smtp_tls_key_file.as_deref(),
        )?,
    };
    if let Some(tokens) = &smtp.auth {
        base.watch_tokens(tokens.clone());
    }
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "SMTP journal receiver listening");
    let (pipeline, readiness) = (pipeline.clone(), base.readiness.clone());
    let (stop, sessions) = (
        base.lifecycle.token(Stage::Intake),
        base.lifecycle.tracker(Stage::Intake),
    );
    base.lifecycle.spawn(Stage::Intake, "SMTP receiver", async move {
        source::smtp::serve(listener, smtp, pipeline, readiness, stop, sessions).await;
    });
    Ok(())
}

/// The controllers, on every watched namespace.
fn start_controllers(base: &Base, wiring: controller::Wiring, caches: ReadinessPart) {
    let scopes = scopes(&base.config.kube.watch_namespaces);
    info!(
        namespaces = ?scopes.iter().map(|s| s.as_deref().unwrap_or("<all>")).collect::<Vec<_>>(),
        "starting controllers"
    );
    let stop = base.lifecycle.token(Stage::Control);
    base.lifecycle.spawn(
        Stage::Control,
        "controllers",
        controller::run(base.client.clone(), scopes, wiring, stop, caches),
    );
}

/// Stops every task in order, within `--shutdown-timeout`; a second signal exits at once.
async fn drain(base: &Base) {
    let deadline = base.config.delivery.shutdown_timeout;
    info!(deadline_s = deadline.as_secs(), "shutdown requested; draining");
    let stopped = tokio::select! {
        stopped = base.lifecycle.shutdown(deadline) => stopped,
        () = crate::lifecycle::signal() => {
            tracing::warn!("second signal: exiting at once; deliveries in flight are due again after the restart");
            std::process::exit(FORCED_EXIT);
        }
    };
    if stopped.clean() {
        info!("shut down cleanly: every task stopped");
    } else {
        tracing::warn!(left_running = ?stopped.left_running, "shut down at the deadline; tasks were still running");
    }
}

/// `mailhook store migrate | status`: what an admin applying migrations by hand sees.
pub async fn store(action: crate::cli::StoreAction, database: &crate::cli::DatabaseArgs) -> anyhow::Result<String> {
    let location = postgres_location(&database.store_url, &database.postgres, false, 1);
    Ok(crate::store::open::schema_report(&location, action == crate::cli::StoreAction::Migrate).await?)
}

/// Where the command line put the store.
fn store_location(config: &RunConfig) -> anyhow::Result<Location> {
    let store = &config.store;
    Ok(match (&store.store_dir, &store.store_url) {
        (_, Some(url)) => Location::Postgres(postgres_location(
            url,
            &store.postgres,
            store.shared_store,
            config.delivery.shards,
        )),
        (Some(dir), None) => Location::Dir(dir.clone()),
        (None, None) if store.store_memory => Location::Memory,
        (None, None) => anyhow::bail!("{NO_STORE}"),
    })
}

fn postgres_location(
    url: &str,
    args: &crate::cli::PostgresArgs,
    shared: bool,
    shards: usize,
) -> crate::store::open::PostgresLocation {
    crate::store::open::PostgresLocation {
        url: url.to_string(),
        password_file: args.store_password_file.clone(),
        password: args.store_password.clone(),
        ca_file: args.store_ca_file.clone(),
        shared,
        shards,
    }
}

/// The first of `candidates` that is set and not blank, trimmed.
fn first_named(candidates: impl IntoIterator<Item = Option<String>>) -> Option<String> {
    candidates
        .into_iter()
        .flatten()
        .map(|n| n.trim().to_string())
        .find(|n| !n.is_empty())
}

/// This replica's name: `--replica-name`, else the pod's, else the host's.
fn replica_name(config: &RunConfig) -> String {
    first_named([
        config.store.replica_name.clone(),
        std::env::var("POD_NAME").ok(),
        std::env::var("HOSTNAME").ok(),
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
    ])
    .unwrap_or_else(|| format!("mailhook-{}", std::process::id()))
}

/// The namespace of the leader Lease: the flag, the pod's, the service account's.
fn lease_namespace(config: &RunConfig) -> String {
    first_named([
        config.store.leader_lease_namespace.clone(),
        std::env::var("POD_NAMESPACE").ok(),
        std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok(),
    ])
    .unwrap_or_else(|| "default".to_string())
}

/// Follows whether the store commits: readiness part `store`, `mailhook_store_up`, a log
/// line on each change. Polled (cheap: a lock) so that it needs nothing from the store.
fn watch_store(lifecycle: &Lifecycle, store: Arc<dyn crate::store::Backend>, part: ReadinessPart, metrics: Metrics) {
    let stop = lifecycle.token(Stage::Admin);
    lifecycle.spawn(Stage::Admin, "store watch", async move {
        let mut was: Option<Option<String>> = None;
        loop {
            let now = store.unavailable();
            if was.as_ref() != Some(&now) {
                match &now {
                    None => {
                        part.ready();
                        metrics.store_up.set(1);
                        if was.is_some() {
                            info!("the store commits again: ingest and deliveries resume");
                        }
                    }
                    Some(why) => {
                        part.not_ready(format!("the store cannot commit: {why}"));
                        metrics.store_up.set(0);
                        if was.as_ref().is_none_or(Option::is_none) {
                            tracing::warn!(%why, "the store cannot commit: ingest answers 503/451 and deliveries pause until it can");
                        }
                    }
                }
                was = Some(now);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            }
        }
    });
}

/// The signer of raw message links, or None when the archive is off.
fn raw_links(
    config: &RunConfig,
    store: &dyn crate::store::Backend,
    admin: SocketAddr,
) -> anyhow::Result<Option<Arc<RawLinks>>> {
    if config.store.raw_message_retention.is_zero() {
        info!("--raw-message-retention is 0s: raw messages are not archived and deliveries carry no links to them");
        return Ok(None);
    }
    let key = match &config.store.raw_link_key_file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read --raw-link-key-file {}: {e}", path.display()))?;
            archive::key_from_file(&bytes).ok_or_else(|| {
                anyhow::anyhow!(
                    "--raw-link-key-file {} holds {} bytes; use at least 32 random bytes",
                    path.display(),
                    bytes.len()
                )
            })?
        }
        None => store
            .secret(archive::KEY_NAME)
            .map_err(|e| anyhow::anyhow!("cannot read the raw message link key from the store: {e}"))?,
    };
    let base = match &config.admin.public_url {
        Some(url) => url.to_string(),
        None => {
            let base = archive::local_base(admin);
            info!(%base, "no --public-url: raw message links point at the local HTTP port");
            base
        }
    };
    Ok(Some(Arc::new(RawLinks::new(
        key,
        &base,
        config.store.raw_message_link_ttl,
    ))))
}

/// The watch scopes: each namespace once, or None for all namespaces.
fn scopes(namespaces: &[String]) -> Vec<Option<String>> {
    if namespaces.is_empty() {
        return vec![None];
    }
    // A namespace named twice is watched once (two controllers on the same objects would
    // reconcile them concurrently).
    let mut namespaces = namespaces.to_vec();
    namespaces.sort();
    namespaces.dedup();
    namespaces.into_iter().map(Some).collect()
}

/// The Dovecot reconciler, when `--dovecot-imap-addr` asks for one.
fn dovecot_reconciler(
    config: &RunConfig,
    dovecot: &source::dovecot::DovecotConfig,
    pipeline: &Arc<Pipeline>,
    shared: &Arc<source::dovecot::Shared>,
) -> anyhow::Result<Option<source::dovecot::reconcile::Reconciler>> {
    let args = &config.dovecot;
    let Some(addr) = args.dovecot_imap_addr.clone() else {
        return Ok(None);
    };
    let (Some(master_user), Some(password_file)) = (&args.dovecot_master_user, &args.dovecot_master_password_file)
    else {
        anyhow::bail!(
            "--dovecot-imap-addr needs --dovecot-master-user and --dovecot-master-password-file: the reconciler logs in to each mailbox as that master user"
        );
    };
    let password = std::fs::read_to_string(password_file)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read --dovecot-master-password-file {}: {e}",
                password_file.display()
            )
        })?
        .trim_end_matches(['\n', '\r'])
        .to_string();
    use source::dovecot::reconcile::connect::{ImapTls, STEP_TIMEOUT, Security, TlsClient, Transport};
    let tls = |addr: &str| {
        TlsClient::new(
            addr,
            args.dovecot_imap_ca_file.as_deref(),
            args.dovecot_imap_server_name.as_deref(),
        )
    };
    let security = match args.dovecot_imap_tls {
        ImapTls::StartTls => Security::StartTls(tls(&addr)?),
        ImapTls::Implicit => Security::Implicit(tls(&addr)?),
        ImapTls::None => {
            if args.dovecot_imap_ca_file.is_some() || args.dovecot_imap_server_name.is_some() {
                anyhow::bail!(
                    "--dovecot-imap-ca-file and --dovecot-imap-server-name are for TLS, and --dovecot-imap-tls none turns it off"
                );
            }
            tracing::warn!(
                %addr,
                "--dovecot-imap-tls none: the Dovecot master password, which opens every mailbox, crosses the network in clear"
            );
            Security::Plaintext
        }
    };
    info!(%addr, master_user, tls = ?args.dovecot_imap_tls, "Dovecot reconciler on");
    Ok(Some(source::dovecot::reconcile::Reconciler {
        config: source::dovecot::reconcile::ReconcilerConfig {
            transport: Transport {
                addr,
                security,
                timeout: STEP_TIMEOUT,
            },
            master_user: master_user.clone(),
            master_password: password,
            separator: args.dovecot_master_separator.clone(),
        },
        dovecot: dovecot.clone(),
        pipeline: pipeline.clone(),
        shared: shared.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_watched_once_or_all() {
        assert_eq!(scopes(&[]), vec![None]);
        assert_eq!(
            scopes(&["b".into(), "a".into(), "b".into()]),
            vec![Some("a".to_string()), Some("b".to_string())]
        );
    }
}
