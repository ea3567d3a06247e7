//! The PostgreSQL side of the store: connecting (`--store-url`, the password from a file
//! or `MAILHOOK_STORE_PASSWORD`), the schema's versioned migrations, and the engine the
//! durable store runs on (`engine::Postgres`). Depends on the durable store's engine
//! interface only.

pub mod engine;
pub mod migrations;
pub mod shared;

use std::path::Path;

/// Why the store's database cannot be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("--store-url is not a PostgreSQL URL such as postgres://mailhook@db.example.com/mailhook")]
    Url(#[source] tokio_postgres::Error),
    #[error(
        "--store-url asks for sslmode={0}, which does not check who answers: use sslmode=verify-full (with --store-ca-file, or sslrootcert= in the URL, naming the server's CA), or sslmode=disable on a trusted network"
    )]
    UnverifiedTls(String),
    #[error("--store-url has sslmode={0}; use verify-full or disable")]
    UnknownSslMode(String),
    #[error("--store-ca-file (or sslrootcert) is given but sslmode=disable: drop one of the two")]
    CaWithoutTls,
    #[error("cannot read {what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM certificate: {reason}")]
    Ca { path: String, reason: String },
    #[error("cannot set up TLS to PostgreSQL: {0}")]
    Tls(String),
    #[error("cannot set up TLS to PostgreSQL")]
    TlsConfig(#[source] rustls::Error),
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
}

/// How to connect to the store's database: libpq-style settings, and TLS that verifies
/// the server (or none).
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The connection settings: the URL's, with the password from `password_file` or
/// `password` (the environment) when the URL has none, and TLS as `sslmode` asks:
/// `verify-full` checks the chain against `ca_file` (or `sslrootcert`, or the system's
/// trust store) and the host name; `disable` (or no `sslmode`) is plain TCP. Modes that
/// encrypt without checking who answers are refused: the store holds compliance data.
pub fn config(url: &str, password_file: Option<&Path>, password: Option<&str>) -> Result<Database, ConnectError> {
    with_ca(url, password_file, password, None)
}

/// As `config`, with the server's CA from `ca_file` (`--store-ca-file`).
pub fn with_ca(
    url: &str,
    password_file: Option<&Path>,
    password: Option<&str>,
    ca_file: Option<&Path>,
) -> Result<Database, ConnectError> {
    // tokio-postgres knows neither verify-full nor sslrootcert: read them here and hand it
    // the rest of the URL.
    let (url, sslmode, root) = tls_parameters(url);
    let root = ca_file.map(Path::to_path_buf).or(root.map(std::path::PathBuf::from));
    let tls = match sslmode.as_deref() {
        None | Some("disable") if root.is_some() => return Err(ConnectError::CaWithoutTls),
        None | Some("disable") => None,
        Some("verify-full") => Some(tls(root.as_deref())?),
        Some(mode @ ("allow" | "prefer" | "require" | "verify-ca")) => {
            return Err(ConnectError::UnverifiedTls(mode.to_string()));
        }
        Some(other) => return Err(ConnectError::UnknownSslMode(other.to_string())),
    };
    let mut config: tokio_postgres::Config = url.parse().map_err(ConnectError::Url)?;
    config.ssl_mode(if tls.is_some() {
        tokio_postgres::config::SslMode::Require
    } else {
        tokio_postgres::config::SslMode::Disable
    });
    if config.get_password().is_none() {
        if let Some(path) = password_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConnectError::File {
                what: "--store-password-file",
                path: path.display().to_string(),
                source,
            })?;
            config.password(text.trim_end_matches(['\r', '\n']));
        } else if let Some(p) = password {
            config.password(p);
        }
    }
    config.application_name("mailhook");
    // A dead server must not hang the store: give up connecting, and notice a silent peer
    // (keepalives while idle, the user timeout while data is unacknowledged).
    config.connect_timeout(std::time::Duration::from_secs(10));
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(30));
    config.keepalives_interval(std::time::Duration::from_secs(5));
    config.keepalives_retries(3);
    config.tcp_user_timeout(std::time::Duration::from_secs(30));
    // An acknowledged event is on disk, whatever the server's or role's default. The server
    // notices a vanished operator within seconds (its keepalives), and ends a transaction
    // left open (a process stopped mid-commit): either would otherwise hold the audit log's
    // head lock, which every replica's commits wait for, for the kernel's two hours.
    config.options(
        "-c synchronous_commit=on -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=1 \
         -c tcp_keepalives_count=3 -c idle_in_transaction_session_timeout=30s",
    );
    Ok(Database { config, tls })
}

/// The URL without `sslmode` and `sslrootcert`, and their values. A URL that does not
/// parse is returned as it is (tokio-postgres says what is wrong with it).
fn tls_parameters(url: &str) -> (String, Option<String>, Option<String>) {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return (url.to_string(), None, None);
    };
    let (mut sslmode, mut root) = (None, None);
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(k, v)| match k.as_ref() {
            "sslmode" => {
                sslmode = Some(v.into_owned());
                None
            }
            "sslrootcert" => {
                root = Some(v.into_owned());
                None
            }
            _ => Some((k.into_owned(), v.into_owned())),
        })
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    (parsed.to_string(), sslmode, root)
}

/// A TLS connector that checks the server's chain against `root` (PEM), or the system's
/// trust store, and its name against the host connected to.
fn tls(root: Option<&Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ConnectError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| ConnectError::File {
                what: "the PostgreSQL CA file",
                path: shown.clone(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ConnectError::Ca {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| ConnectError::Ca {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
            }
            if roots.is_empty() {
                return Err(ConnectError::Ca {
                    path: shown,
                    reason: "no certificate in it".into(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(ConnectError::Tls(
                    "the system has no trusted CA certificates: name the server's CA with --store-ca-file".into(),
                ));
            }
        }
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(ConnectError::TlsConfig)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl Database {
    /// Whether connections are TLS (verified).
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens one connection; its I/O runs on a task of the current runtime until the
    /// client is dropped.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        fn drive<S>(connection: tokio_postgres::Connection<tokio_postgres::Socket, S>)
        where
            S: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(%err, "the PostgreSQL connection ended");
                }
            });
        }
        match &self.tls {
            None => {
                let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
                drive(connection);
                Ok(client)
            }
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                drive(connection);
                Ok(client)
            }
        }
    }
}

/// One connection; its I/O runs on a task of its own until the client is dropped.
pub async fn connect(database: &Database) -> Result<tokio_postgres::Client, ConnectError> {
    database.connect().await.map_err(ConnectError::Connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_comes_from_the_url_the_file_or_the_environment() {
        let c = config("postgres://mailhook:secret@db/mailhook", None, Some("env")).expect("config");
        assert_eq!(c.config.get_password(), Some(&b"secret"[..]));
        let c = config("postgres://mailhook@db/mailhook", None, Some("env")).expect("config");
        assert_eq!(c.config.get_password(), Some(&b"env"[..]));
        let file = std::env::temp_dir().join(format!("mailhook-pw-{}", uuid::Uuid::new_v4()));
        std::fs::write(&file, "from-file\n").expect("write");
        let c = config("postgres://mailhook@db/mailhook", Some(&file), Some("env")).expect("config");
        assert_eq!(c.config.get_password(), Some(&b"from-file"[..]));
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn unusable_urls_say_what_to_write() {
        assert!(matches!(config("http://x", None, None), Err(ConnectError::Url(_))));
        for mode in ["require", "prefer", "verify-ca"] {
            let refused = config(&format!("postgres://db/mailhook?sslmode={mode}"), None, None).expect_err(mode);
            let text = refused.to_string();
            assert!(text.contains(mode) && text.contains("verify-full"), "{text}");
        }
        assert!(matches!(
            config("postgres://db/mailhook?sslmode=bogus", None, None),
            Err(ConnectError::UnknownSslMode(_))
        ));
        assert!(matches!(
            config("postgres://db/mailhook?sslrootcert=/ca.pem", None, None),
            Err(ConnectError::CaWithoutTls)
        ));
        let missing = config(
            "postgres://db/mailhook?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            None,
            None,
        )
        .expect_err("no such file");
        assert!(missing.to_string().contains("/nonexistent/ca.pem"), "{missing}");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_the_url_and_the_rest_kept() {
        let (url, mode, root) =
            tls_parameters("postgres://u@db:5433/mailhook?sslmode=verify-full&application_name=x&sslrootcert=/ca.pem");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        let parsed: tokio_postgres::Config = url.parse().expect("the rest parses");
        assert_eq!(parsed.get_dbname(), Some("mailhook"));
        assert_eq!(parsed.get_application_name(), Some("x"));
        let (url, mode, _) = tls_parameters("postgres://u@db/mailhook");
        assert_eq!((url.as_str(), mode), ("postgres://u@db/mailhook", None));
    }
}
