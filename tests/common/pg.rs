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
