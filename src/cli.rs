//! The command line, and only that: subcommands, and the flags of `run` grouped by the
//! part they configure (each flag with a `MAILHOOK_*` environment fallback; the Helm
//! chart's values map onto them). What the flags mean is decided by the parts; `app`
//! builds them. Depends on the parts' argument types only.

use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::{parse_bytes, parse_duration};
use crate::history::client::{ListArgs, ReplayArgs};
use crate::store::BacklogCap;

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
    /// Write the JSON Schemas of every delivery's data and the OpenAPI document of the
    /// deliveries (what schemas/v1 holds).
    Schemagen {
        /// Folder to write into.
        #[arg(long, default_value = "schemas/v1")]
        out: std::path::PathBuf,
    },
    /// List a subscription's delivery attempts, newest first (asks a running operator).
    Attempts(ListArgs),
    /// List a subscription's dead letters, newest first (asks a running operator).
    DeadLetters(ListArgs),
    /// Queue a subscription's dead letters for delivery again (asks a running operator).
    Replay(ReplayArgs),
    /// The PostgreSQL store's schema: `migrate` applies what is missing (the operator also
    /// does at start), `status` shows where it stands.
    Store {
        #[command(subcommand)]
        action: StoreAction,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The audit log: its verifier key, proofs, and offline verification of evidence.
    Audit {
        #[command(subcommand)]
        action: crate::history::audit::client::Action,
    },
    /// Print a new signing key for a subscription's signing Secret: `ed25519` prints a
    /// `whsk_` key on stdout and its `whpk_` public key on stderr; `hmac` a `whsec_` secret.
    Keygen {
        #[arg(value_enum, default_value_t = KeyKind::Ed25519)]
        kind: KeyKind,
    },
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAction {
    /// Apply the schema migrations this binary has and the database lacks.
    Migrate,
    /// Show the applied and pending migrations.
    Status,
}

/// Where the PostgreSQL store is.
#[derive(clap::Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the store, e.g. `postgres://mailhook@db.example.com/mailhook`.
    #[arg(long, env = "MAILHOOK_STORE_URL")]
    pub store_url: String,

    #[command(flatten)]
    pub postgres: PostgresArgs,
}

/// How to reach the PostgreSQL store beyond its URL: the password, the server's CA.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PostgresArgs {
    /// File holding the PostgreSQL password (mount a Secret here), when the URL has none.
    #[arg(long, env = "MAILHOOK_STORE_PASSWORD_FILE")]
    pub store_password_file: Option<std::path::PathBuf>,

    /// The PostgreSQL password, when neither the URL nor a file gives it.
    #[arg(long, env = "MAILHOOK_STORE_PASSWORD", hide_env_values = true)]
    pub store_password: Option<String>,

    /// PEM file of the CA that signed the PostgreSQL server's certificate (with
    /// `sslmode=verify-full`; the URL's `sslrootcert` works too). Without either, the
    /// system's trust store is used.
    #[arg(long, env = "MAILHOOK_STORE_CA_FILE")]
    pub store_ca_file: Option<std::path::PathBuf>,
}

/// Who may scrape `/metrics` (`--metrics-auth`).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAuth {
    /// Anyone who reaches the admin port.
    None,
    /// A Kubernetes bearer token allowed to `get` the non-resource URL `/metrics`.
    Kubernetes,
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

/// A duration flag that must be above zero (a period).
fn period_arg(text: &str) -> Result<std::time::Duration, String> {
    match duration_arg(text)? {
        d if d.is_zero() => Err(format!(
            "{text:?} is no period: give a duration above zero, such as 60s"
        )),
        d => Ok(d),
    }
}

/// A byte count flag, as a Kubernetes quantity (`2Gi`, `500M`).
fn bytes_arg(text: &str) -> Result<u64, String> {
    parse_bytes(text).map_err(|e| e.to_string())
}

/// `--default-max-backlog-events` when none is given.
pub const DEFAULT_MAX_BACKLOG_EVENTS: u64 = 1_000_000;

impl RunConfig {
    /// The backlog cap of a subscription that sets none, from `--default-max-backlog-*`
    /// and the deprecated `--max-backlog`; with the warning to log when that was given.
    pub fn default_backlog_cap(&self) -> (BacklogCap, Option<String>) {
        let (new, old) = (self.delivery.default_max_backlog_events, self.store.max_backlog);
        let events = new.or(old).unwrap_or(DEFAULT_MAX_BACKLOG_EVENTS);
        let warning = old.map(|n| match new {
            Some(_) => format!(
                "--max-backlog {n} is deprecated and ignored: --default-max-backlog-events is given. Ingest no longer refuses mail for a full backlog; drop --max-backlog"
            ),
            None => format!(
                "--max-backlog {n} is deprecated: ingest no longer refuses mail for a full backlog. It now caps each subscription's backlog at {n} events (new events past it go to that subscription's dead letters), as --default-max-backlog-events {n} does; use that flag, or delivery.maxBacklog per subscription"
            ),
        });
        let cap = BacklogCap {
            events: Some(events).filter(|n| *n > 0),
            bytes: self.delivery.default_max_backlog_bytes,
        };
        (cap, warning)
    }
}

/// The configuration of `mailhook run`, grouped by the part it configures. Every flag
/// has a `MAILHOOK_*` environment fallback; the Helm chart's values map onto them.
#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    #[command(flatten, next_help_heading = "Kubernetes")]
    pub kube: KubeArgs,
    #[command(flatten, next_help_heading = "MailboxFilters")]
    pub filters: FilterArgs,
    #[command(flatten, next_help_heading = "Ingest API")]
    pub ingest: IngestArgs,
    #[command(flatten, next_help_heading = "SMTP journal receiver")]
    pub smtp: SmtpArgs,
    #[command(flatten, next_help_heading = "Dovecot source")]
    pub dovecot: DovecotArgs,
    #[command(flatten, next_help_heading = "Store")]
    pub store: StoreArgs,
    #[command(flatten, next_help_heading = "Delivery")]
    pub delivery: DeliveryArgs,
    #[command(flatten, next_help_heading = "Egress")]
    pub egress: EgressArgs,
    #[command(flatten, next_help_heading = "Admin port")]
    pub admin: AdminArgs,
    #[command(flatten, next_help_heading = "Audit log")]
    pub audit: AuditArgs,
    #[command(flatten, next_help_heading = "Telemetry")]
    pub telemetry: TelemetryArgs,
}

/// Kubernetes: which resources the operator serves.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeArgs {
    /// Namespace whose resources the operator serves; repeat for several. All
    /// namespaces when absent.
    #[arg(long = "watch-namespace", env = "MAILHOOK_WATCH_NAMESPACE", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,

    /// Label selector of the MailSources (cluster-scoped) this operator judges and writes
    /// status on, e.g. `mailhook.io/release=mail-eu`; all when absent. Set it when several
    /// mailhook installations share a cluster, so each judges only its own feeds.
    #[arg(long, env = "MAILHOOK_MAIL_SOURCE_SELECTOR")]
    pub mail_source_selector: Option<String>,

    /// Status writes and Events sent to the Kubernetes API per second, on average
    /// (client-side, like client-go's QPS). Condition changes go before counter refreshes.
    #[arg(long, env = "MAILHOOK_KUBE_API_QPS", default_value = "100")]
    pub kube_api_qps: std::num::NonZeroU32,

    /// How many of them may go at once after a quiet spell, above --kube-api-qps (like
    /// client-go's burst).
    #[arg(long, env = "MAILHOOK_KUBE_API_BURST", default_value = "200")]
    pub kube_api_burst: std::num::NonZeroU32,
}

/// The HTTP ingest API (`POST /v1/events`) and what makes an event's direction.
#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    /// Address of the HTTP ingest API (POST /v1/events); off when absent.
    #[arg(long, env = "MAILHOOK_INGEST_ADDR")]
    pub ingest_addr: Option<SocketAddr>,

    /// File of bearer tokens accepted by the ingest API (`/v1/events` only), one per line as
    /// `TOKEN` or `NAME TOKEN` (mount a Secret here). A producer's event ids de-duplicate
    /// within its credential's name; bare tokens are all named `ingest`. Re-read every
    /// 10 s. Required with --ingest-addr.
    #[arg(long, env = "MAILHOOK_INGEST_TOKEN_FILE")]
    pub ingest_token_file: Option<std::path::PathBuf>,

    /// Secret (in the operator's namespace, $POD_NAMESPACE) that holds the ingest token
    /// under `token`: when --ingest-token-file is absent or empty the operator reads the
    /// token from it, or creates it with a random token. This is how the Helm chart gets a
    /// token without rendering a random value (GitOps tools re-render every sync).
    #[arg(long, env = "MAILHOOK_INGEST_TOKEN_SECRET")]
    pub ingest_token_secret: Option<String>,

    /// Largest ingest request body, in bytes; larger requests get 413.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub ingest_max_body_bytes: usize,

    /// Most events in one NDJSON batch; more get 413.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    pub ingest_max_batch_events: usize,

    /// Most connections open at once on the ingest port; more are closed at accept.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_CONNECTIONS", default_value_t = 512)]
    pub ingest_max_connections: usize,

    /// Most connections open at once from one client address on the ingest port; more are
    /// closed at accept. Behind an Ingress or a load balancer that does not keep the
    /// client's address, raise it to --ingest-max-connections.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256)]
    pub ingest_max_connections_per_address: usize,

    /// A request's headers must arrive within this long (also how long an idle kept-alive
    /// connection stays open).
    #[arg(long, env = "MAILHOOK_INGEST_HEADER_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    pub ingest_header_timeout: std::time::Duration,

    /// A request's body must arrive within this long of its headers; slower ones get 408.
    #[arg(long, env = "MAILHOOK_INGEST_BODY_TIMEOUT", default_value = "60s", value_parser = duration_arg)]
    pub ingest_body_timeout: std::time::Duration,

    /// Bytes of request bodies read or processed at once over every producer (each request
    /// reserves its Content-Length); more get 503 with Retry-After. Bounds the ingest API's
    /// memory: keep it well under the pod's memory limit.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_INFLIGHT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub ingest_max_inflight_bytes: usize,

    /// Requests one credential (a named token, see --ingest-token-file) may have in flight
    /// at once; more get 429.
    #[arg(long, env = "MAILHOOK_INGEST_MAX_REQUESTS_PER_TOKEN", default_value_t = 64)]
    pub ingest_max_requests_per_token: usize,

    /// Domains whose addresses are internal (for inbound/outbound/internal direction);
    /// repeat or separate with commas.
    #[arg(long = "internal-domains", env = "MAILHOOK_INTERNAL_DOMAINS", value_delimiter = ',')]
    pub internal_domains: Vec<String>,
}

/// The Dovecot source: its routes on the ingest API (`/v1/sources/dovecot`), how
/// folders are recognised, the mailbox index, and the reconciler that finds what was
/// missed while mailhook was away.
#[derive(clap::Args, Debug, Clone)]
pub struct DovecotArgs {
    /// Folders where an appended message is a sent one (`message.sent`), ignoring case;
    /// repeat or separate with commas.
    #[arg(
        long = "dovecot-sent-folder",
        env = "MAILHOOK_DOVECOT_SENT_FOLDERS",
        value_delimiter = ',',
        default_value = "Sent,Sent Items,Sent Messages"
    )]
    pub sent_folders: Vec<String>,

    /// Folders where a moved message counts as deleted (`message.deleted`, stage soft),
    /// ignoring case; repeat or separate with commas.
    #[arg(
        long = "dovecot-trash-folder",
        env = "MAILHOOK_DOVECOT_TRASH_FOLDERS",
        value_delimiter = ',',
        default_value = "Trash,Deleted Items,Deleted Messages"
    )]
    pub trash_folders: Vec<String>,

    /// The hierarchy separator of Dovecot's namespace (`separator`; `.` for Maildir++):
    /// renaming a folder renames its subfolders, and the mailbox index follows.
    #[arg(long, env = "MAILHOOK_DOVECOT_HIERARCHY_SEPARATOR", default_value_t = '/')]
    pub dovecot_hierarchy_separator: char,

    /// How long the mailbox index remembers a message (what later deletions and moves
    /// are named by).
    #[arg(long, env = "MAILHOOK_DOVECOT_INDEX_RETENTION", default_value = "2160h", value_parser = duration_arg)]
    pub dovecot_index_retention: std::time::Duration,

    /// IMAP address (host:port) of the Dovecot server: at start the reconciler logs in to
    /// every mailbox the index knows, as the master user, and reports what changed while
    /// mailhook was not listening. Off when absent.
    #[arg(long, env = "MAILHOOK_DOVECOT_IMAP_ADDR")]
    pub dovecot_imap_addr: Option<String>,

    /// The Dovecot master user the reconciler logs in as (`user*master`).
    #[arg(long, env = "MAILHOOK_DOVECOT_MASTER_USER", requires = "dovecot_imap_addr")]
    pub dovecot_master_user: Option<String>,

    /// File holding the master user's password (mount a Secret here).
    #[arg(
        long,
        env = "MAILHOOK_DOVECOT_MASTER_PASSWORD_FILE",
        requires = "dovecot_master_user"
    )]
    pub dovecot_master_password_file: Option<std::path::PathBuf>,

    /// What separates the user from the master user in a login
    /// (Dovecot's `auth_master_user_separator`).
    #[arg(long, env = "MAILHOOK_DOVECOT_MASTER_SEPARATOR", default_value = "*")]
    pub dovecot_master_separator: String,

    /// File of tokens for the Dovecot routes of the ingest API (`/v1/sources/dovecot`,
    /// `/v1/sources/dovecot/events`), as bearer tokens or HTTP Basic passwords, one per
    /// line as `TOKEN` or `NAME TOKEN`. They are refused on `/v1/events`, and ingest tokens
    /// here. Without it the Dovecot routes answer 401.
    #[arg(long, env = "MAILHOOK_DOVECOT_TOKEN_FILE")]
    pub dovecot_token_file: Option<std::path::PathBuf>,

    /// TLS of the reconciler's IMAP connection: `starttls` (plain IMAP port, TLS before
    /// LOGIN; a server without STARTTLS is refused), `implicit` (IMAPS port) or `none`
    /// (the master password, which opens every mailbox, crosses the network in clear).
    #[arg(long, env = "MAILHOOK_DOVECOT_IMAP_TLS", value_enum, default_value_t = Default::default())]
    pub dovecot_imap_tls: crate::source::dovecot::reconcile::connect::ImapTls,

    /// PEM file of the CA(s) that signed the Dovecot server's certificate; without it
    /// the system's trust store is used.
    #[arg(long, env = "MAILHOOK_DOVECOT_IMAP_CA_FILE", requires = "dovecot_imap_addr")]
    pub dovecot_imap_ca_file: Option<std::path::PathBuf>,

    /// The name the Dovecot server's certificate must carry, when it is not the host of
    /// --dovecot-imap-addr (e.g. an IP address or a Service name the certificate lacks).
    #[arg(long, env = "MAILHOOK_DOVECOT_IMAP_SERVER_NAME", requires = "dovecot_imap_addr")]
    pub dovecot_imap_server_name: Option<String>,

    /// ManageSieve address (host:port, Pigeonhole's 4190) of the Dovecot server: when a
    /// Sieve script is uploaded or activated, mailhook reads it there as the master user
    /// (TLS as --dovecot-imap-tls, STARTTLS for `implicit`) to say where it forwards mail.
    /// Without it such changes are reported with `forwarding.unreadable` (and count as
    /// external).
    #[arg(long, env = "MAILHOOK_DOVECOT_MANAGESIEVE_ADDR", requires = "dovecot_master_user")]
    pub dovecot_managesieve_addr: Option<String>,

    /// Reads and failed logins are held this long before they are delivered, so that a
    /// burst is one event: reads of a session that stay under --dovecot-bulk-threshold
    /// become `message.accessed` events once the first is this old; repeated failed logins
    /// become one event once quiet this long (a bulk read: --dovecot-bulk-quiet).
    #[arg(long, env = "MAILHOOK_DOVECOT_ACCESS_WINDOW", default_value = "10s", value_parser = duration_arg)]
    pub dovecot_access_window: std::time::Duration,

    /// More reads than this by one session within --dovecot-access-window are one
    /// `mailbox.bulk_access` event.
    #[arg(long, env = "MAILHOOK_DOVECOT_BULK_THRESHOLD", default_value_t = 50)]
    pub dovecot_bulk_threshold: u64,

    /// A bulk read is one event once no read of its session arrived for this long. Set it
    /// to the exporter's `transport_timeout` (30 s in the shipped configuration): Dovecot
    /// sends a burst's events in pieces, and drops only what waited longer than that.
    #[arg(long, env = "MAILHOOK_DOVECOT_BULK_QUIET", default_value = "30s", value_parser = duration_arg)]
    pub dovecot_bulk_quiet: std::time::Duration,

    /// A bulk read or a run of failed logins that never goes quiet is reported at least
    /// this often.
    #[arg(long, env = "MAILHOOK_DOVECOT_HOLD_LONGEST", default_value = "15m", value_parser = duration_arg)]
    pub dovecot_hold_longest: std::time::Duration,
}

/// The SMTP journal receiver.
#[derive(clap::Args, Debug, Clone)]
pub struct SmtpArgs {
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

    /// Most SMTP connections from one client address at once; more get 421. Postfix opens
    /// up to 20 per destination by default.
    #[arg(long, env = "MAILHOOK_SMTP_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 20)]
    pub smtp_max_connections_per_address: usize,

    /// An SMTP connection silent this long is closed (421).
    #[arg(long, env = "MAILHOOK_SMTP_IDLE_TIMEOUT", default_value = "5m", value_parser = duration_arg)]
    pub smtp_idle_timeout: std::time::Duration,

    /// A session must have its first MAIL accepted (after STARTTLS and AUTH) within this
    /// long of connecting, or it is closed (421) and its slot freed.
    #[arg(long, env = "MAILHOOK_SMTP_HANDSHAKE_TIMEOUT", default_value = "30s", value_parser = duration_arg)]
    pub smtp_handshake_timeout: std::time::Duration,

    /// A session is closed (421) this long after it connected, mid-message or not; the
    /// sender retries what was not answered 250.
    #[arg(long, env = "MAILHOOK_SMTP_SESSION_TIMEOUT", default_value = "30m", value_parser = duration_arg)]
    pub smtp_session_timeout: std::time::Duration,

    /// PEM certificate chain offered with STARTTLS (mount a kubernetes.io/tls Secret);
    /// STARTTLS is not offered without it.
    #[arg(long, env = "MAILHOOK_SMTP_TLS_CERT_FILE")]
    pub smtp_tls_cert_file: Option<std::path::PathBuf>,

    /// PEM private key of --smtp-tls-cert-file.
    #[arg(long, env = "MAILHOOK_SMTP_TLS_KEY_FILE")]
    pub smtp_tls_key_file: Option<std::path::PathBuf>,

    /// File of tokens, one per line: when set, SMTP senders must STARTTLS and AUTH PLAIN
    /// with one of them as the password (any user name).
    #[arg(long, env = "MAILHOOK_SMTP_AUTH_TOKEN_FILE")]
    pub smtp_auth_token_file: Option<std::path::PathBuf>,
}

/// The store: where events and queues live, backpressure, and how long history is kept.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Directory of the durable store (a volume in a cluster). One of --store-dir,
    /// --store-url and --store-memory is required.
    #[arg(long, env = "MAILHOOK_STORE_DIR", conflicts_with_all = ["store_url", "store_memory"])]
    pub store_dir: Option<std::path::PathBuf>,

    /// Keep events in memory only, for tests and demos: an acknowledged event is lost when
    /// the process stops. Logged as non-durable at start.
    #[arg(long, env = "MAILHOOK_STORE_MEMORY", conflicts_with = "store_url")]
    pub store_memory: bool,

    /// PostgreSQL store instead of the embedded one, e.g.
    /// `postgres://mailhook@db.example.com/mailhook`: the schema is migrated at start.
    #[arg(long, env = "MAILHOOK_STORE_URL")]
    pub store_url: Option<String>,

    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Several replicas share the PostgreSQL store: every replica takes events in, the
    /// delivery shards are shared out among the live replicas (one owner per shard at a
    /// time), and the holder of the leader Lease writes status. Every replica of one
    /// database must run with it, and with the same `--shards`.
    #[arg(long, env = "MAILHOOK_SHARED_STORE", requires = "store_url")]
    pub shared_store: bool,

    /// This replica's name in the shard owners table, the leader Lease and status
    /// (the pod's name in a cluster). Defaults to `POD_NAME`, else the host name.
    #[arg(long, env = "MAILHOOK_REPLICA_NAME")]
    pub replica_name: Option<String>,

    /// The Lease the replicas elect their leader with (in the operator's namespace:
    /// `POD_NAMESPACE`, or `--leader-lease-namespace`).
    #[arg(long, env = "MAILHOOK_LEADER_LEASE", default_value = "mailhook-leader")]
    pub leader_lease: String,

    #[arg(long, env = "MAILHOOK_LEADER_LEASE_NAMESPACE")]
    pub leader_lease_namespace: Option<String>,

    /// Deprecated: a full backlog no longer makes ingest refuse anyone's mail. Taken as
    /// `--default-max-backlog-events` (each subscription's own cap), which wins when both
    /// are given; a warning at start says so.
    #[arg(long, env = "MAILHOOK_MAX_BACKLOG")]
    pub max_backlog: Option<u64>,

    /// Guards the store's volume: new events are refused (HTTP 429 with Retry-After, SMTP
    /// 452) while the store occupies this many bytes (the file on redb, the database on
    /// PostgreSQL). Set it below the volume's size; a subscriber's backlog is capped on its
    /// own by `delivery.maxBacklog`. No limit when absent.
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

    /// A file (at least 32 random bytes, e.g. a mounted Secret) whose contents sign raw
    /// message links instead of the key kept in the store. Replace it and restart to rotate
    /// the key: every link signed before then is refused.
    #[arg(long, env = "MAILHOOK_RAW_LINK_KEY_FILE")]
    pub raw_link_key_file: Option<std::path::PathBuf>,

    /// How often expiry (maxEventAge) and retention purges run.
    #[arg(long, env = "MAILHOOK_HOUSEKEEPING_INTERVAL", default_value = "30s", value_parser = duration_arg)]
    pub housekeeping_interval: std::time::Duration,
}

/// Delivery: shards, payload pseudonyms, and the drain on shutdown.
#[derive(clap::Args, Debug, Clone)]
pub struct DeliveryArgs {
    /// Number of delivery shards (workers); each subscription lives on one.
    #[arg(long, env = "MAILHOOK_SHARDS", default_value_t = 4)]
    pub shards: usize,

    /// The most delivery requests in flight at once over every subscription (a batch is
    /// one). Each holds its events, its body and a connection: this bounds what many
    /// subscriptions draining together cost in memory. Subscriptions waiting for a slot
    /// take turns; each still has its own `delivery.concurrency`. Until the start is over
    /// (every resource reconciled, or 30 s) at most 4 are in flight: the start goes first.
    #[arg(long, env = "MAILHOOK_MAX_DELIVERIES_IN_FLIGHT", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_deliveries_in_flight: u32,

    /// Names this operator in the `source` of the CloudEvents it sends
    /// (`/mailhook/<instance>/<journal source>`); the chart sets `<namespace>/<release>`.
    #[arg(long, env = "MAILHOOK_INSTANCE", default_value = "mailhook")]
    pub instance: String,

    /// File holding the secret from which anonymized payloads derive their pseudonyms.
    /// Without it a random one is used and pseudonyms change on every restart.
    #[arg(long, env = "MAILHOOK_PSEUDONYM_KEY_FILE")]
    pub pseudonym_key_file: Option<std::path::PathBuf>,

    /// The backlog cap of each subscription whose `delivery.maxBacklog` sets no `events`:
    /// once that many of its events wait or are in flight, its new events go straight to
    /// its dead letters, so one subscriber's outage never makes ingest refuse mail. Default
    /// 1000000, so that no backlog grows without bound unless someone chose it: 0 turns
    /// the default cap off.
    #[arg(long, env = "MAILHOOK_DEFAULT_MAX_BACKLOG_EVENTS")]
    pub default_max_backlog_events: Option<u64>,

    /// The backlog cap in bytes of each subscription whose `delivery.maxBacklog` sets no
    /// `bytes`, as a quantity such as `2Gi`. Unset by default: events differ in size with
    /// the mail, so a bytes figure fits a volume only when chosen for it, and
    /// `--max-store-bytes` already guards the volume as a whole.
    #[arg(long, env = "MAILHOOK_DEFAULT_MAX_BACKLOG_BYTES", value_parser = bytes_arg)]
    pub default_max_backlog_bytes: Option<u64>,

    /// On SIGTERM: how long deliveries in flight may take to finish before the process
    /// exits anyway (those left are due again after the restart). Keep it below the
    /// pod's terminationGracePeriodSeconds.
    #[arg(long, env = "MAILHOOK_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = duration_arg)]
    pub shutdown_timeout: std::time::Duration,
}

/// The egress guard: where deliveries may connect.
#[derive(clap::Args, Debug, Clone)]
pub struct EgressArgs {
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
}

/// The admin port: probes, metrics, the history API and raw message links.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// Address of the admin server: /metrics, /healthz, /readyz.
    #[arg(long, env = "MAILHOOK_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// File of bearer tokens for the history API on the admin port (attempts, dead
    /// letters, replay), one per line, each good for every namespace. Without it the API
    /// still takes Kubernetes tokens, each for the namespaces whose WebhookSubscriptions
    /// its user may `get` (and `patch`, to replay).
    #[arg(long, env = "MAILHOOK_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,

    /// Who may scrape `/metrics`, which names every namespace's subscriptions and counts
    /// their deliveries: `none` (anyone who reaches the port) or `kubernetes` (a bearer
    /// token whose user may `get` the non-resource URL `/metrics`, checked with a
    /// TokenReview and a SubjectAccessReview).
    #[arg(long, env = "MAILHOOK_METRICS_AUTH", value_enum, default_value_t = MetricsAuth::None)]
    pub metrics_auth: MetricsAuth,

    /// Where receivers reach the operator's HTTP port (--http-addr), e.g.
    /// `https://mailhook.example.com`; raw message links start with it. Defaults to
    /// `http://` and the listening address, which suits only local runs.
    #[arg(long, env = "MAILHOOK_PUBLIC_URL")]
    pub public_url: Option<url::Url>,
}

/// The audit log: every event accepted and every delivery attempt, in a Merkle tree whose
/// signed checkpoints an auditor verifies offline.
#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    /// File holding the checkpoint signing key, a signed-note signer key
    /// (`PRIVATE+KEY+<origin>+<keyid>+<base64>`; make one with `mailhook audit keygen`),
    /// whose name is the log's origin. Without it the key is derived from a secret kept in
    /// the store, named --audit-origin: checkpoints are still signed, but whoever can read
    /// the store can sign them too.
    #[arg(long, env = "MAILHOOK_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<std::path::PathBuf>,

    /// The log's origin when no --audit-key-file is given: a name unique to this log
    /// (e.g. your cluster's domain and `/mailhook`), the first line of every checkpoint.
    #[arg(long, env = "MAILHOOK_AUDIT_ORIGIN", default_value = "mailhook.local/audit")]
    pub audit_origin: String,

    /// How often a checkpoint of the log is signed, when the log grew.
    #[arg(long, env = "MAILHOOK_AUDIT_CHECKPOINT_INTERVAL", default_value = "60s", value_parser = period_arg)]
    pub audit_checkpoint_interval: std::time::Duration,

    /// A ConfigMap (in the operator's namespace, that of the leader Lease) on which the
    /// leader publishes the checkpoints' verifier key (`data.vkey`) and the log's origin
    /// (`data.origin`); none when not given.
    #[arg(long, env = "MAILHOOK_AUDIT_KEY_CONFIGMAP")]
    pub audit_key_configmap: Option<String>,
}

/// Logging.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(long, env = "MAILHOOK_LOG_FORMAT", value_enum, default_value_t = crate::telemetry::LogFormat::Text)]
    pub log_format: crate::telemetry::LogFormat,
}

/// What one MailboxFilter may cost. A filter over a limit is Ready=False/OverBudget and
/// matches nothing; each is judged on its own spec, except the count per namespace.
#[derive(clap::Args, Debug, Clone)]
pub struct FilterArgs {
    /// Most regular expressions in one filter (subject.regex and headers[].regex,
    /// exclude included).
    #[arg(long, env = "MAILHOOK_FILTER_MAX_REGEXES", default_value_t = crate::route::FilterBudget::default().max_regexes)]
    pub filter_max_regexes: usize,

    /// Largest compiled size of one regular expression, in bytes (and of the matching
    /// cache it may grow).
    #[arg(long, env = "MAILHOOK_FILTER_MAX_REGEX_BYTES", default_value_t = crate::route::FilterBudget::default().max_regex_bytes)]
    pub filter_max_regex_bytes: usize,

    /// Most memory one filter's compiled regular expressions take together, in bytes. A
    /// namespace's filters take at most this times --filter-max-per-namespace.
    #[arg(long, env = "MAILHOOK_FILTER_MAX_COMPILED_BYTES", default_value_t = crate::route::FilterBudget::default().max_compiled_bytes)]
    pub filter_max_compiled_bytes: usize,

    /// Most MailboxFilters per namespace: the newest beyond it (by creationTimestamp, then
    /// name) are refused without being compiled.
    #[arg(long, env = "MAILHOOK_FILTER_MAX_PER_NAMESPACE", default_value_t = crate::route::FilterBudget::default().max_per_namespace)]
    pub filter_max_per_namespace: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunConfig, clap::Error> {
        let argv = ["mailhook", "run"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(config) => Ok(*config),
            _ => unreachable!("the run subcommand"),
        }
    }

    fn cap(args: &[&str]) -> (BacklogCap, Option<String>) {
        run(args).expect("flags parse").default_backlog_cap()
    }

    #[test]
    fn the_default_backlog_cap_is_a_million_events_and_no_bytes() {
        let (c, warning) = cap(&[]);
        assert_eq!(
            c,
            BacklogCap {
                events: Some(1_000_000),
                bytes: None
            }
        );
        assert_eq!(warning, None);
        let (c, _) = cap(&[
            "--default-max-backlog-events",
            "500",
            "--default-max-backlog-bytes",
            "2Gi",
        ]);
        assert_eq!(
            c,
            BacklogCap {
                events: Some(500),
                bytes: Some(2 << 30)
            }
        );
        assert_eq!(
            cap(&["--default-max-backlog-events", "0"]).0.events,
            None,
            "0: no default cap"
        );
    }

    #[test]
    fn the_deprecated_max_backlog_sets_the_events_default_and_says_so() {
        let (c, warning) = cap(&["--max-backlog", "10"]);
        assert_eq!(c.events, Some(10));
        let warning = warning.expect("a warning");
        assert!(
            warning.contains("deprecated")
                && warning.contains("no longer refuses")
                && warning.contains("--default-max-backlog-events 10"),
            "{warning}"
        );
        let (c, warning) = cap(&["--max-backlog", "10", "--default-max-backlog-events", "20"]);
        assert_eq!(c.events, Some(20), "the new flag wins");
        assert!(warning.is_some_and(|w| w.contains("ignored")));
    }

    #[test]
    fn a_malformed_bytes_default_names_the_flag() {
        let err = run(&["--default-max-backlog-bytes", "2GB"])
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("--default-max-backlog-bytes") && err.contains("not a quantity of bytes"),
            "{err}"
        );
    }
}
