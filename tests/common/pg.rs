//! A database of its own for each test, on the PostgreSQL cluster `tests/pgenv/up`
//! started (found through `MAILHOOK_TEST_PG_URL` and `MAILHOOK_TEST_PG_ADMIN_URL`); shared
//! by the test targets that need one.

use mailhook::store::postgres;

/// A new, empty database owned by the test role; returns its URL.
pub async fn database(test: &str) -> String {
    let (url, admin) = match (
        std::env::var("MAILHOOK_TEST_PG_URL"),
        std::env::var("MAILHOOK_TEST_PG_ADMIN_URL"),
    ) {
        (Ok(url), Ok(admin)) => (url, admin),
        _ => panic!("PostgreSQL tests need a real server: run tests/run, or eval \"$(tests/pgenv/up)\" first"),
    };
    let config = postgres::config(&admin, None, None).expect("admin URL");
    let client = postgres::connect(&config).await.expect("connect as the superuser");
    let name = format!("{test}_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name} OWNER mailhook"))
        .await
        .expect("create the test database");
    let mut parsed = url::Url::parse(&url).expect("test URL");
    parsed.set_path(&name);
    parsed.to_string()
}

/// `url` over TLS that checks the server: `sslmode=verify-full` against the test
/// cluster's CA (`MAILHOOK_TEST_PG_CA`, from `tests/pgenv/up`).
pub fn verified(url: &str) -> String {
    let ca = std::env::var("MAILHOOK_TEST_PG_CA").expect("MAILHOOK_TEST_PG_CA: run tests/pgenv/up");
    verified_with(url, &ca)
}

/// `url` with `sslmode=verify-full` against the CA in `ca`.
pub fn verified_with(url: &str, ca: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("test URL");
    parsed
        .query_pairs_mut()
        .append_pair("sslmode", "verify-full")
        .append_pair("sslrootcert", ca);
    parsed.to_string()
}

/// A PostgreSQL cluster of one test's own (`tests/pgenv/up`), for tests that stop and
/// start the server: the shared one serves the other tests meanwhile. Removed on drop.
pub struct Cluster {
    dir: String,
    /// The operator's role on the `mailhook` database, plain TCP.
    pub url: String,
    /// The CA of the server's certificate.
    pub ca: String,
}

impl Cluster {
    pub fn start() -> Cluster {
        let script = format!("{}/tests/pgenv/up", env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(&script)
            .output()
            .expect("run tests/pgenv/up");
        assert!(
            out.status.success(),
            "tests/pgenv/up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exports: std::collections::HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| {
            exports
                .get(k)
                .cloned()
                .unwrap_or_else(|| panic!("tests/pgenv/up exported no {k}"))
        };
        Cluster {
            dir: get("MAILHOOK_PGENV_DIR"),
            url: get("MAILHOOK_TEST_PG_URL"),
            ca: get("MAILHOOK_TEST_PG_CA"),
        }
    }

    /// `tests/pgenv/ctl stop` (immediate: a crash) or `start`.
    pub fn ctl(&self, action: &str) {
        let script = format!("{}/tests/pgenv/ctl", env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(&script)
            .args([action, &self.dir])
            .output()
            .expect("run tests/pgenv/ctl");
        assert!(
            out.status.success(),
            "tests/pgenv/ctl {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = format!("{}/tests/pgenv/down", env!("CARGO_MANIFEST_DIR"));
        let _ = std::process::Command::new(&script).arg(&self.dir).output();
    }
}
