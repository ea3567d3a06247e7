//! Versioned schema migrations, embedded in the binary. Applied in one transaction under
//! a transaction-level advisory lock: operators starting together queue on the lock, the
//! first applies what is missing, the others find nothing left to do. A database whose
//! schema is newer than this binary is refused (an older operator must not write into a
//! layout it does not know).

use tokio_postgres::Client;

/// (version, name, SQL), in order. Append only: an applied migration never changes.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (2, "shared", include_str!("migrations/0002_shared.sql")),
    (3, "mailbox_index", include_str!("migrations/0003_mailbox_index.sql")),
    (4, "paged", include_str!("migrations/0004_paged.sql")),
    (5, "audit", include_str!("migrations/0005_audit.sql")),
];

/// The advisory lock key every mailhook migration takes ("mailhook" in ASCII, 8 bytes).
pub(super) const LOCK_KEY: i64 = 0x6d61_696c_686f_6f6b;

/// The newest schema this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("PostgreSQL refused a migration step")]
    Database(#[from] tokio_postgres::Error),
    #[error(
        "the database's mailhook schema is at version {found}, newer than this binary's {known}: \
         run a mailhook at least as new as the one that migrated it (or restore the database)"
    )]
    Newer { found: i32, known: i32 },
}

/// One applied migration, as `schema_migrations` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i32,
    pub name: String,
    pub applied_at: jiff::Timestamp,
}

/// Where a database's schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    pub applied: Vec<Applied>,
    /// Versions this binary would apply.
    pub pending: Vec<(i32, &'static str)>,
    /// The binary's newest version.
    pub known: i32,
}

impl SchemaStatus {
    pub fn current(&self) -> i32 {
        self.applied.iter().map(|a| a.version).max().unwrap_or(0)
    }
}

const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

async fn applied(client: &impl tokio_postgres::GenericClient) -> Result<Vec<Applied>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT version, name, (extract(epoch from applied_at) * 1000000)::bigint FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Applied {
            version: r.get(0),
            name: r.get(1),
            applied_at: jiff::Timestamp::from_microsecond(r.get(2)).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        })
        .collect())
}

/// Applies every migration the database lacks; returns the versions applied (empty when
/// it was current).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    let txn = client.transaction().await?;
    // Released at commit or rollback, also when the connection dies.
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
    txn.batch_execute(CREATE_LEDGER).await?;
    let done = applied(&txn).await?;
    let found = done.iter().map(|a| a.version).max().unwrap_or(0);
    if found > latest() {
        return Err(MigrateError::Newer { found, known: latest() });
    }
    let mut ran = Vec::new();
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        txn.batch_execute(sql).await?;
        txn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        ran.push(*version);
    }
    txn.commit().await?;
    Ok(ran)
}

/// Where the schema stands, without changing anything.
pub async fn status(client: &Client) -> Result<SchemaStatus, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    let applied = if exists { applied(client).await? } else { Vec::new() };
    let current = applied.iter().map(|a| a.version).max().unwrap_or(0);
    Ok(SchemaStatus {
        pending: MIGRATIONS
            .iter()
            .filter(|m| m.0 > current)
            .map(|m| (m.0, m.1))
            .collect(),
        applied,
        known: latest(),
    })
}

/// Refuses to run against a schema newer than the binary's or not migrated yet.
pub fn check(status: &SchemaStatus) -> Result<(), MigrateError> {
    let found = status.current();
    if found > status.known {
        return Err(MigrateError::Newer {
            found,
            known: status.known,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0, i as i32 + 1, "{}", m.1);
        }
        assert_eq!(latest(), MIGRATIONS.len() as i32);
    }

    #[test]
    fn a_newer_schema_is_refused_with_what_to_do() {
        let status = SchemaStatus {
            applied: vec![Applied {
                version: latest() + 1,
                name: "future".into(),
                applied_at: jiff::Timestamp::UNIX_EPOCH,
            }],
            pending: vec![],
            known: latest(),
        };
        let err = check(&status).expect_err("refused");
        assert!(err.to_string().contains("run a mailhook at least as new"), "{err}");
    }
}
