//! The PostgreSQL side of the store: connecting (`--store-url`, the password from a file
//! or `MAILHOOK_STORE_PASSWORD`), the schema's versioned migrations, and the engine the
//! durable store runs on (`engine::Postgres`). Depends on the durable store's engine
//! interface only.

pub mod engine;
pub mod migrations;

use std::path::Path;

/// Why the store's database cannot be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("--store-url is not a PostgreSQL URL such as postgres://mailhook@db.example.com/mailhook")]
    Url(#[source] tokio_postgres::Error),
    #[error(
        "--store-url asks for sslmode={0}; TLS to PostgreSQL is not built yet: use sslmode=disable on a trusted network for now"
    )]
    Tls(String),
    #[error("cannot read --store-password-file {path}")]
    PasswordFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
}

/// The connection settings: the URL's, with the password from `password_file` or
/// `password` (the environment) when the URL has none.
pub fn config(
    url: &str,
    password_file: Option<&Path>,
    password: Option<&str>,
) -> Result<tokio_postgres::Config, ConnectError> {
    if let Some(mode) = url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "sslmode")
                .map(|(_, v)| v.into_owned())
        })
        .filter(|m| m != "disable")
    {
        return Err(ConnectError::Tls(mode));
    }
    // Parsed after the sslmode check: tokio-postgres does not know verify-full, and would
    // call it a bad URL.
    let mut config: tokio_postgres::Config = url.parse().map_err(ConnectError::Url)?;
    if config.get_password().is_none() {
        if let Some(path) = password_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConnectError::PasswordFile {
                path: path.display().to_string(),
                source,
            })?;
            config.password(text.trim_end_matches(['\r', '\n']));
        } else if let Some(p) = password {
            config.password(p);
        }
    }
    config.application_name("mailhook");
    // A dead server must not hang the store: give up connecting, and notice a silent peer.
    config.connect_timeout(std::time::Duration::from_secs(10));
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(30));
    // An acknowledged event is on disk, whatever the server's or role's default.
    config.options("-c synchronous_commit=on");
    Ok(config)
}

/// One connection; its I/O runs on a task of its own until the client is dropped.
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, ConnectError> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(ConnectError::Connect)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(%err, "the PostgreSQL connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_comes_from_the_url_the_file_or_the_environment() {
        let c = config("postgres://mailhook:secret@db/mailhook", None, Some("env")).expect("config");
        assert_eq!(c.get_password(), Some(&b"secret"[..]));
        let c = config("postgres://mailhook@db/mailhook", None, Some("env")).expect("config");
        assert_eq!(c.get_password(), Some(&b"env"[..]));
        let file = std::env::temp_dir().join(format!("mailhook-pw-{}", uuid::Uuid::new_v4()));
        std::fs::write(&file, "from-file\n").expect("write");
        let c = config("postgres://mailhook@db/mailhook", Some(&file), Some("env")).expect("config");
        assert_eq!(c.get_password(), Some(&b"from-file"[..]));
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn unusable_urls_say_what_to_write() {
        assert!(matches!(config("http://x", None, None), Err(ConnectError::Url(_))));
        let tls = config("postgres://db/mailhook?sslmode=verify-full", None, None).expect_err("not built");
        assert!(tls.to_string().contains("sslmode=verify-full"), "{tls}");
    }
}
