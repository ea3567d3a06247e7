//! Opening the store the command line chose: the embedded store in a directory or in
//! memory, or PostgreSQL (migrated first), owned by one replica or shared by several.
//! Start-up asks for a `Location` and gets a `Store`; which engine is behind it, and what
//! a shared one needs for shard ownership (`Joined`), stay here.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use super::postgres::{self, ConnectError, Database, engine::Postgres, migrations};
use super::{PagedStore, SharedStore, Store, StoreError};

/// Where the store is.
#[derive(Debug, Clone)]
pub enum Location {
    /// The embedded store in this directory (a volume).
    Dir(PathBuf),
    /// PostgreSQL.
    Postgres(PostgresLocation),
    /// The embedded store in memory: lost when the process stops.
    Memory,
}

/// How to reach the PostgreSQL store, and whether replicas share it.
#[derive(Debug, Clone)]
pub struct PostgresLocation {
    pub url: String,
    pub password_file: Option<PathBuf>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Several replicas deliver from it, each the shards it owns.
    pub shared: bool,
    pub shards: usize,
}

impl PostgresLocation {
    fn database(&self) -> Result<Database, ConnectError> {
        postgres::with_ca(
            &self.url,
            self.password_file.as_deref(),
            self.password.as_deref(),
            self.ca_file.as_deref(),
        )
    }
}

/// This replica's place among those sharing the store: the database, and the session
/// that holds its member lock (shard ownership goes on with it).
pub struct Joined {
    pub database: Database,
    pub session: postgres::shared::Session,
}

/// An open store.
pub struct Opened {
    pub store: Arc<dyn Store>,
    /// `redb`, `postgres` or `memory` (the `mailhook_store_kind` label).
    pub kind: &'static str,
    /// Set when replicas share the store.
    pub joined: Option<Joined>,
}

/// Why the store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    // Each says what is wrong and with which flag.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Migrate(#[from] migrations::MigrateError),
    #[error("cannot join the replicas sharing the store")]
    Join(#[source] postgres::shared::SharedError),
    #[error("cannot share the PostgreSQL store")]
    Share(#[source] postgres::shared::SharedError),
    #[error("cannot open the store in {dir}")]
    Dir {
        dir: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot open the {kind} store")]
    Engine {
        kind: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("opening the store stopped unexpectedly")]
    Stopped(#[from] tokio::task::JoinError),
}

/// Opens the store at `location`. PostgreSQL is migrated first; a shared one is joined
/// (its member lock taken) before anything is loaded, so that no single owner runs beside
/// this replica.
pub async fn open(location: &Location) -> Result<Opened, OpenError> {
    info!(
        memory_limit_mib = crate::memory::limit().map(|l| l >> 20),
        page_cache_mib = super::page_cache_bytes() >> 20,
        events_cached = super::event_cache(),
        "caches sized from the memory limit (the page cache applies to the embedded store)"
    );
    match location {
        Location::Postgres(pg) => open_postgres(pg).await,
        Location::Dir(dir) => {
            let store = PagedStore::open(dir).map_err(|source| OpenError::Dir {
                dir: dir.display().to_string(),
                source,
            })?;
            info!(dir = %dir.display(), "durable store open (queues are read from it as they are delivered)");
            Ok(Opened {
                store: Arc::new(store),
                kind: "redb",
                joined: None,
            })
        }
        Location::Memory => {
            tracing::warn!(
                "--store-memory: events are kept in memory only; every event acknowledged is lost when the process stops"
            );
            let store = PagedStore::in_memory().map_err(|source| OpenError::Engine {
                kind: "in-memory",
                source,
            })?;
            Ok(Opened {
                store: Arc::new(store),
                kind: "memory",
                joined: None,
            })
        }
    }
}

async fn open_postgres(pg: &PostgresLocation) -> Result<Opened, OpenError> {
    let db = pg.database()?;
    let mut client = postgres::connect(&db).await?;
    let applied = migrations::migrate(&mut client).await?;
    let status = migrations::status(&client).await?;
    info!(
        hosts = ?db.config.get_hosts(),
        database = db.config.get_dbname().unwrap_or_default(),
        tls = db.tls(),
        schema = status.current(),
        ?applied,
        "PostgreSQL store: schema current"
    );
    let engine_error = |source| OpenError::Engine {
        kind: "PostgreSQL",
        source,
    };
    if !pg.shared {
        // The engine and the queue index load from the database: off the async workers.
        let store = tokio::task::spawn_blocking(move || PagedStore::on(Arc::new(Postgres::connect_exclusive(db)?)))
            .await?
            .map_err(engine_error)?;
        info!("PostgreSQL store open (queues are read from it as they are delivered)");
        return Ok(Opened {
            store: Arc::new(store),
            kind: "postgres",
            joined: None,
        });
    }
    let shards = pg.shards;
    // Joined first: it holds the shared lock, so no single owner starts (or runs) beside
    // this replica, and nothing is changed if one does.
    let session = postgres::shared::Session::open(&db, postgres::shared::PREDECESSOR_GRACE)
        .await
        .map_err(OpenError::Join)?;
    postgres::shared::prepare(&mut client, shards, true)
        .await
        .map_err(OpenError::Share)?;
    let engine_db = db.clone();
    let store = tokio::task::spawn_blocking(move || {
        let engine = Arc::new(Postgres::connect(engine_db)?);
        SharedStore::new(engine.clone(), engine, shards)
    })
    .await?
    .map_err(engine_error)?;
    info!(
        shards,
        "PostgreSQL store open, shared: this replica delivers the shards it takes"
    );
    Ok(Opened {
        store: Arc::new(store),
        kind: "postgres",
        joined: Some(Joined { database: db, session }),
    })
}

/// `mailhook store migrate | status`: applies the migrations when `apply`, then says
/// where the schema is, as an admin applying them by hand reads it.
pub async fn schema_report(pg: &PostgresLocation, apply: bool) -> Result<String, OpenError> {
    let mut client = postgres::connect(&pg.database()?).await?;
    let mut out = String::new();
    if apply {
        let ran = migrations::migrate(&mut client).await?;
        if ran.is_empty() {
            out.push_str("nothing to apply\n");
        }
        for version in ran {
            out.push_str(&format!("applied migration {version}\n"));
        }
    }
    let status = migrations::status(&client).await?;
    out.push_str(&format!(
        "schema version {} (this binary knows up to {})\n",
        status.current(),
        status.known
    ));
    for a in &status.applied {
        out.push_str(&format!(
            "  applied  {:>4}  {:<24} {}\n",
            a.version, a.name, a.applied_at
        ));
    }
    for (version, name) in &status.pending {
        out.push_str(&format!("  pending  {version:>4}  {name}\n"));
    }
    migrations::check(&status)?;
    Ok(out)
}
