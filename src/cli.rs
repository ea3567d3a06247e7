//! Command line: subcommands and the `run` configuration (flags with `MAILHOOK_*`
//! environment fallbacks; the Helm chart's values map onto them).

use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tracing::info;

use std::sync::Arc;

use crate::admin::client::{ListArgs, ReplayArgs};
use crate::admin::{self, Readiness, history::History};
use crate::api::parse_duration;
use crate::archive;
use crate::auth::Tokens;
use crate::controller;
use crate::delivery::{Deliveries, Housekeeping};
use crate::metrics::Metrics;
use crate::route::Router;
use crate::source::{self, Pipeline, http::IngestConfig};
use crate::store::{DurableStore, Store};

#[derive(Parser, Debug)]
#[command(
    name = "mailhook",
    version,
    about = "Turns mailbox activity into signed, reliable webhook deliveries"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator.
    Run(Box<RunConfig>),
    /// Print the CustomResourceDefinitions as YAML (what crds/ holds).
    Crdgen,
    /// List a subscription's delivery attempts, newest first (asks a running operator).
    Attempts(ListArgs),
    /// List a subscription's dead letters, newest first (asks a running operator).
    DeadLetters(ListArgs),
    /// Queue a subscription's dead letters for delivery again (asks a running operator).
    Replay(ReplayArgs),
    /// Print a new signing key for a subscription's signing Secret: `ed25519` prints a
    /// `whsk_` key on stdout and its `whpk_` public key on stderr; `hmac` a `whsec_` secret.
    Keygen {
        #[arg(value_enum, default_value_t = KeyKind::Ed25519)]
        kind: KeyKind,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Ed25519,
    Hmac,
}

/// A CIDR flag; a bare address means just that address.
fn cidr_arg(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR range such as 10.20.0.0/16 or an IP address"))
}

/// A Go-style duration flag (`72h`, `30s`).
fn duration_arg(text: &str) -> Result<std::time::Duration, String> {
    parse_duration(text).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Address of the admin server: /metrics, /healthz, /readyz.
    #[arg(long, env = "MAILHOOK_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Namespace whose resources the operator serves; repeat for several. All
    /// namespaces when absent.
    #[arg(long = "watch-namespace", env = "MAILHOOK_WATCH_NAMESPACE", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,

    /// Address of the HTTP ingest API (POST /v1/events); off when absent.
    #[arg(long, env = "MAILHOOK_INGEST_ADDR")]
    pub ingest_addr: Option<SocketAddr>,

    /// File of bearer tokens accepted by the ingest API, one per line (mount a Secret
    /// here). Re-read every 10 s. Required with --ingest-addr.
    #[arg(long, env = "MAILHOOK_INGEST_TOKEN_FILE")]
    pub ingest_token_file: Option<std::path::PathBuf>,

    /// Secret (in the operator's namespace, $POD_NAMESPACE) that holds the ingest token
    /// under `token`: when --ingest-token-file is absent or empty the operator reads the
    /// token from it, or creates it with a random token. This is how the Helm chart gets a
    /// token without rendering a random value (GitOps tools re-render every sync).
    #[arg(long, env = "MAILHOOK_INGEST_TOKEN_SECRET")]
    pub ingest_token_secret: Option<String>,

    /// Address of the SMTP journal receiver (journal reports and plain copies); off when
    /// absent.
    #[arg(long, env = "MAILHOOK_SMTP_ADDR")]
    pub smtp_addr: Option<SocketAddr>,

    /// Host name in the SMTP greeting.
    #[arg(long, env = "MAILHOOK_SMTP_HOSTNAME", default_value = "mailhook")]
    pub smtp_hostname: String,

    /// Largest message the SMTP receiver takes (announced as SIZE); larger get 552.
    #[arg(long, env = "MAILHOOK_SMTP_MAX_MESSAGE_BYTES", default_value_t = 25 * 1024 * 1024)]
    pub smtp_max_message_bytes: usize,

    /// Most envelope recipients per message; more get 452.
    #[arg(long, env = "MAILHOOK_SMTP_MAX_RECIPIENTS", default_value_t = 100)]
    pub smtp_max_recipients: usize,

    /// Most SMTP connections at once; more get 421.
    #[arg(long, env = "MAILHOOK_SMTP_MAX_CONNECTIONS", default_value_t = 100)]
    pub smtp_max_connections: usize,

    /// An SMTP connection silent this long is closed (421).
    #[arg(long, env = "MAILHOOK_SMTP_IDLE_TIMEOUT", default_value = "5m", value_parser = duration_arg)]
    pub smtp_idle_timeout: std::time::Duration,

    /// PEM certificate chain offered with STARTTLS (mount a kubernetes.io/tls Secret);
    /// STARTTLS is not offered without it.
    #[arg(long, env = "MAILHOOK_SMTP_TLS_CERT_FILE")]
    pub smtp_tls_cert_file: Option<std::path::PathBuf>,

    /// File of tokens, one per line: when set, SMTP senders must STARTTLS and AUTH PLAIN
    /// with one of them as the password (any user name).
    #[arg(long, env = "MAILHOOK_SMTP_AUTH_TOKEN_FILE")]
    pub smtp_auth_token_file: Option<std::path::PathBuf>,

    /// PEM private key of --smtp-tls-cert-file.
    #[arg(long, env = "MAILHOOK_SMTP_TLS_KEY_FILE")]
    pub smtp_tls_key_file: Option<std::path::PathBuf>,

    /// Largest ingest request body, in bytes; larger requests get 413.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub ingest_max_body_bytes: usize,

    /// Most events in one NDJSON batch; more get 413.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    pub ingest_max_batch_events: usize,

    /// Domains whose addresses are internal (for inbound/outbound/internal direction);
    /// repeat or separate with commas.
    #[arg(long = "internal-domains", env = "MAILHOOK_INTERNAL_DOMAINS", value_delimiter = ',')]
    pub internal_domains: Vec<String>,

    /// Directory of the durable store (a volume in a cluster). Without it events are kept
    /// in memory only and an acknowledged event is lost if the process dies.
    #[arg(long, env = "MAILHOOK_STORE_DIR")]
    pub store_dir: Option<std::path::PathBuf>,

    /// Refuse new events (HTTP 429) while this many deliveries wait, over every
    /// subscription. No limit when absent.
    #[arg(long, env = "MAILHOOK_MAX_BACKLOG")]
    pub max_backlog: Option<u64>,

    /// Refuse new events (HTTP 429) while the store occupies this many bytes on disk.
    #[arg(long, env = "MAILHOOK_MAX_STORE_BYTES")]
    pub max_store_bytes: Option<u64>,

    /// Delivery attempts older than this leave the audit log.
    #[arg(long, env = "MAILHOOK_ATTEMPT_RETENTION", default_value = "72h", value_parser = duration_arg)]
    pub attempt_retention: std::time::Duration,

    /// Most delivery attempts kept per subscription (the newest); bounds the audit log's
    /// disk use whatever the event rate.
    #[arg(long, env = "MAILHOOK_MAX_ATTEMPTS_PER_SUBSCRIPTION", default_value_t = 10_000)]
    pub max_attempts_per_subscription: u64,

    /// How long an event's producer id (`producerEventId`) de-duplicates later events.
    #[arg(long, env = "MAILHOOK_DEDUP_WINDOW", default_value = "24h", value_parser = duration_arg)]
    pub dedup_window: std::time::Duration,

    /// How long raw journaled messages are archived for subscriptions that ask for links
    /// to them (`payload.includeRawMessageLink`); `0s` turns the archive off.
    #[arg(long, env = "MAILHOOK_RAW_MESSAGE_RETENTION", default_value = "168h", value_parser = duration_arg)]
    pub raw_message_retention: std::time::Duration,

    /// How long a raw message link in a delivery stays valid (each attempt gets a fresh
    /// one).
    #[arg(long, env = "MAILHOOK_RAW_MESSAGE_LINK_TTL", default_value = "1h", value_parser = duration_arg)]
    pub raw_message_link_ttl: std::time::Duration,

    /// Where receivers reach the operator's HTTP port (--http-addr), e.g.
    /// `https://mailhook.example.com`; raw message links start with it. Defaults to
    /// `http://` and the listening address, which suits only local runs.
    #[arg(long, env = "MAILHOOK_PUBLIC_URL")]
    pub public_url: Option<url::Url>,

    /// Addresses deliveries may reach although the egress guard refuses them by default
    /// (loopback, link-local, private, cluster ranges), as CIDR ranges; repeat or separate
    /// with commas. Example: the range of an internal SIEM.
    #[arg(long = "egress-allow", env = "MAILHOOK_EGRESS_ALLOW", value_delimiter = ',', value_parser = cidr_arg)]
    pub egress_allow: Vec<ipnet::IpNet>,

    /// Addresses deliveries may never reach, whatever else allows them (CIDR ranges).
    #[arg(long = "egress-deny", env = "MAILHOOK_EGRESS_DENY", value_delimiter = ',', value_parser = cidr_arg)]
    pub egress_deny: Vec<ipnet::IpNet>,

    /// Host names deliveries may reach whatever they resolve to (except --egress-deny):
    /// exact names or `*.suffix`.
    #[arg(
        long = "egress-allow-host",
        env = "MAILHOOK_EGRESS_ALLOW_HOST",
        value_delimiter = ','
    )]
    pub egress_allow_hosts: Vec<String>,

    /// The cluster's pod and service ranges, refused like private ranges (matters when
    /// they are public addresses).
    #[arg(long = "egress-cluster-cidr", env = "MAILHOOK_EGRESS_CLUSTER_CIDR", value_delimiter = ',', value_parser = cidr_arg)]
    pub egress_cluster_cidrs: Vec<ipnet::IpNet>,

    /// How often expiry (maxEventAge) and retention purges run.
    #[arg(long, env = "MAILHOOK_HOUSEKEEPING_INTERVAL", default_value = "30s", value_parser = duration_arg)]
    pub housekeeping_interval: std::time::Duration,

    /// File of bearer tokens for the history API on the admin port (attempts, dead
    /// letters, replay), one per line; the API is off without it.
    #[arg(long, env = "MAILHOOK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// Number of delivery shards (workers); each subscription lives on one.
    #[arg(long, env = "MAILHOOK_SHARDS", default_value_t = 4)]
    pub shards: usize,

    /// File holding the secret from which anonymized payloads derive their pseudonyms.
    /// Without it a random one is used and pseudonyms change on every restart.
    #[arg(long, env = "MAILHOOK_PSEUDONYM_KEY_FILE")]
    pub pseudonym_key_file: Option<std::path::PathBuf>,

    /// Log line format.
    #[arg(long, env = "MAILHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Starts every part of the operator and waits for SIGTERM or Ctrl-C.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let version = client.apiserver_version().await?;
    info!(apiserver = %version.git_version, "connected to Kubernetes");

    // One signal fans out to every part.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let metrics = Metrics::new()?;
    let readiness = Readiness::default();
    let listener = TcpListener::bind(config.http_addr).await?;

    let store: Arc<dyn Store> = match &config.store_dir {
        Some(dir) => {
            let store = DurableStore::open(dir)
                .map_err(|e| anyhow::anyhow!("cannot open the store in {}: {e}", dir.display()))?;
            info!(dir = %dir.display(), backlog_restored = true, "durable store open");
            Arc::new(store)
        }
        None => {
            tracing::warn!("no --store-dir: events are kept in memory only and are lost if the process dies");
            Arc::new(DurableStore::in_memory().map_err(|e| anyhow::anyhow!("cannot create the in-memory store: {e}"))?)
        }
    };
    let housekeeping = Housekeeping {
        interval: config.housekeeping_interval,
        attempt_retention: config.attempt_retention,
        max_attempts: config.max_attempts_per_subscription,
        dedup_window: config.dedup_window,
        raw_message_retention: config.raw_message_retention,
    };
    let raw_links = if config.raw_message_retention.is_zero() {
        info!("--raw-message-retention is 0s: raw messages are not archived and deliveries carry no links to them");
        None
    } else {
        let key = store
            .secret(archive::KEY_NAME)
            .map_err(|e| anyhow::anyhow!("cannot read the raw message link key from the store: {e}"))?;
        let base = match &config.public_url {
            Some(url) => url.to_string(),
            None => {
                let addr = listener.local_addr()?;
                let host = if addr.ip().is_unspecified() {
                    std::net::IpAddr::from([127, 0, 0, 1])
                } else {
                    addr.ip()
                };
                let base = format!("http://{}", std::net::SocketAddr::new(host, addr.port()));
                info!(%base, "no --public-url: raw message links point at the local HTTP port");
                base
            }
        };
        Some(Arc::new(archive::RawLinks::new(
            key,
            &base,
            config.raw_message_link_ttl,
        )))
    };
    let archive_store = store.clone();
    let deliveries = Deliveries::start(config.shards, store, metrics.clone(), housekeeping);
    let router = Arc::new(Router::default());
    let matches = Arc::new(controller::MatchCounters::default());
    let directory = Arc::new(controller::Directory::default());

    let admin_tokens = match &config.admin_token_file {
        Some(path) => Some(Tokens::load_watched(path, "admin")?),
        None => {
            info!("no --admin-token-file: the history API (attempts, dead letters, replay) is off");
            None
        }
    };
    let history = History {
        deliveries: deliveries.clone(),
        directory: directory.clone(),
        tokens: admin_tokens,
    };
    info!(addr = %listener.local_addr()?, "admin server listening");
    let admin = tokio::spawn(admin::serve(
        listener,
        admin::router(
            metrics.clone(),
            readiness.clone(),
            history,
            raw_links.clone(),
            archive_store,
        ),
        stopped(),
    ));

    let wiring = controller::Wiring {
        deliveries: deliveries.clone(),
        router: router.clone(),
        matches: matches.clone(),
        metrics: metrics.clone(),
        directory,
        pseudonym_secret: pseudonym_secret(config.pseudonym_key_file.as_deref())?,
        raw_links: raw_links.clone(),
        egress: Arc::new(crate::delivery::egress::EgressPolicy {
            allow: config.egress_allow.clone(),
            deny: config.egress_deny.clone(),
            allow_hosts: config
                .egress_allow_hosts
                .iter()
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            cluster: config.egress_cluster_cidrs.clone(),
        }),
    };

    let pipeline = Arc::new(Pipeline {
        deliveries: deliveries.clone(),
        router,
        metrics: metrics.clone(),
        internal_domains: config
            .internal_domains
            .iter()
            .map(|d| d.trim().to_lowercase())
            .collect(),
        matches,
        limits: source::Limits {
            max_backlog: config.max_backlog,
            max_store_bytes: config.max_store_bytes,
        },
    });

    if let Some(addr) = config.ingest_addr {
        let Some(token_file) = config.ingest_token_file.clone() else {
            anyhow::bail!("--ingest-addr needs --ingest-token-file: the ingest API never runs without authentication");
        };
        let tokens = match (Tokens::load(token_file.clone()), &config.ingest_token_secret) {
            (Ok(tokens), _) => tokens,
            (Err(err), None) => anyhow::bail!("cannot read ingest tokens from {}: {err}", token_file.display()),
            (Err(err), Some(secret)) => {
                info!(file = %token_file.display(), %err, secret, "no ingest token file yet; using the token Secret");
                let token = crate::auth::ensure_token_secret(&client, secret).await?;
                Tokens::with(token_file.clone(), vec![token])
            }
        };
        tokens.clone().watch(std::time::Duration::from_secs(10));
        let ingest_config = IngestConfig {
            token_file,
            max_body_bytes: config.ingest_max_body_bytes,
            max_batch_events: config.ingest_max_batch_events,
        };
        let listener = TcpListener::bind(addr).await?;
        info!(addr = %listener.local_addr()?, "ingest API listening");
        let app = source::http::router(&ingest_config, pipeline.clone(), tokens, readiness.clone());
        let stop = stopped();
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!(%err, "ingest server failed");
            }
        });
    }

    if let Some(addr) = config.smtp_addr {
        let listener = TcpListener::bind(addr).await?;
        info!(addr = %listener.local_addr()?, "SMTP journal receiver listening");
        let smtp = source::smtp::SmtpConfig {
            hostname: config.smtp_hostname.clone(),
            max_message_bytes: config.smtp_max_message_bytes,
            max_recipients: config.smtp_max_recipients,
            max_connections: config.smtp_max_connections,
            idle_timeout: config.smtp_idle_timeout,
            auth: match (&config.smtp_auth_token_file, &config.smtp_tls_cert_file) {
                (None, _) => None,
                (Some(_), None) => {
                    anyhow::bail!(
                        "--smtp-auth-token-file needs --smtp-tls-cert-file: passwords never cross the wire unencrypted"
                    )
                }
                (Some(path), Some(_)) => Some(Tokens::load_watched(path, "SMTP")?),
            },
            tls: match (&config.smtp_tls_cert_file, &config.smtp_tls_key_file) {
                (Some(cert), Some(key)) => Some(Arc::new(source::smtp::TlsFiles::load(cert, key)?)),
                (None, None) => None,
                _ => anyhow::bail!("--smtp-tls-cert-file and --smtp-tls-key-file go together"),
            },
        };
        tokio::spawn(source::smtp::serve(
            listener,
            smtp,
            pipeline.clone(),
            readiness.clone(),
            stopped(),
        ));
    }

    let scopes: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        // A namespace named twice is watched once (two controllers on the same objects
        // would reconcile them concurrently).
        let mut namespaces = config.watch_namespaces.clone();
        namespaces.sort();
        namespaces.dedup();
        namespaces.into_iter().map(Some).collect()
    };
    info!(
        namespaces = ?scopes.iter().map(|s| s.as_deref().unwrap_or("<all>")).collect::<Vec<_>>(),
        "starting controllers"
    );
    let ready_handle = readiness.clone();
    let controllers = vec![tokio::spawn(controller::run(
        client.clone(),
        scopes,
        wiring.clone(),
        stopped(),
        move || {
            ready_handle.set_ready(true);
            info!("caches synced; ready");
        },
    ))];

    shutdown_signal().await;
    readiness.set_ready(false);
    let _ = stop_tx.send(true);
    // Bounded: a controller stuck in a watch (e.g. every list refused with 403) must not
    // keep the pod in Terminating until the kubelet's SIGKILL. Deliveries in flight are
    // durable either way (a completion is committed before its slot frees).
    let stopping = async {
        for c in controllers {
            c.await?;
        }
        admin.await??;
        anyhow::Ok(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), stopping).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("parts still running 10 s after SIGTERM; exiting anyway"),
    }
    info!("shut down");
    Ok(())
}

fn pseudonym_secret(path: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| anyhow::anyhow!("cannot read --pseudonym-key-file {}: {e}", p.display()))?;
            if bytes.len() < 16 {
                anyhow::bail!(
                    "--pseudonym-key-file {} holds {} bytes; use at least 16 random bytes",
                    p.display(),
                    bytes.len()
                );
            }
            Ok(bytes)
        }
        None => {
            tracing::warn!("no --pseudonym-key-file: anonymized payloads use a random key that changes on restart");
            Ok(uuid::Uuid::new_v4()
                .as_bytes()
                .iter()
                .chain(uuid::Uuid::new_v4().as_bytes())
                .copied()
                .collect())
        }
    }
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "cannot listen for Ctrl-C");
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
                tracing::warn!(%err, "cannot listen for SIGTERM");
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
    info!("shutdown requested");
}
