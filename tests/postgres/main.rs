//! The PostgreSQL store against a real server: a throw-away cluster that `tests/pgenv/up`
//! started (found through `MAILHOOK_TEST_PG_URL` and `MAILHOOK_TEST_PG_ADMIN_URL`). Each
//! test gets a database of its own, owned by the operator's role.

use std::process::Command;
use std::sync::Arc;

use mailhook::store::postgres::{self, engine::Postgres, migrations};

#[path = "../common/pg.rs"]
mod pg;
use mailhook::store::{DurableStore, Ingest, QueueCounts, Store, conformance};
use pg::database;

fn mailhook(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .args(args)
        .output()
        .expect("run mailhook");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn migrate_applies_the_schema_once_and_status_says_where_it_stands() {
    let url = database("migrate").await;
    let (ok, out, err) = mailhook(&["store", "--store-url", &url, "status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("schema version 0") && out.contains("pending     1  initial"),
        "{out}"
    );

    let (ok, out, err) = mailhook(&["store", "--store-url", &url, "migrate"]);
    assert!(ok, "{err}");
    assert!(out.contains("applied migration 1"), "{out}");
    let (ok, out, _) = mailhook(&["store", "--store-url", &url, "migrate"]);
    assert!(ok && out.contains("nothing to apply"), "{out}");

    let config = postgres::config(&url, None, None).expect("url");
    let client = postgres::connect(&config).await.expect("connect");
    let status = migrations::status(&client).await.expect("status");
    assert_eq!(status.current(), migrations::latest());
    assert!(status.pending.is_empty());
    // The schema is there: the tables the store writes.
    for table in [
        "events",
        "producers",
        "pending",
        "dead_letters",
        "attempts",
        "raw_messages",
        "subscriptions",
        "meta",
    ] {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .expect("query")
            .get(0);
        assert!(exists, "table {table}");
    }
}

/// Two operators starting at once: both succeed, exactly one applies the migrations, and
/// the schema is whole (the advisory lock serialises them).
#[tokio::test]
async fn two_migrations_at_once_both_succeed_and_one_applies() {
    let url = database("race").await;
    for round in 0..3 {
        let url = if round == 0 {
            url.clone()
        } else {
            database("race").await
        };
        let spawn = || {
            Command::new(env!("CARGO_BIN_EXE_mailhook"))
                .args(["store", "--store-url", &url, "migrate"])
                .output()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(spawn);
            let b = s.spawn(spawn);
            (a.join(), b.join())
        });
        let outputs: Vec<String> = [a, b]
            .into_iter()
            .map(|r| {
                let out = r.expect("thread").expect("run");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect();
        let applied = outputs.iter().filter(|o| o.contains("applied migration 1")).count();
        assert_eq!(applied, 1, "exactly one applies: {outputs:?}");
        let config = postgres::config(&url, None, None).expect("url");
        let client = postgres::connect(&config).await.expect("connect");
        let versions: i64 = client
            .query_one("SELECT count(*) FROM schema_migrations", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(versions, migrations::MIGRATIONS.len() as i64);
    }
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused_with_what_to_do() {
    let url = database("newer").await;
    let (ok, _, err) = mailhook(&["store", "--store-url", &url, "migrate"]);
    assert!(ok, "{err}");
    let config = postgres::config(&url, None, None).expect("url");
    let client = postgres::connect(&config).await.expect("connect");
    client
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from the future')",
            &[&(migrations::latest() + 1)],
        )
        .await
        .expect("insert");
    for action in ["status", "migrate"] {
        let (ok, _, err) = mailhook(&["store", "--store-url", &url, action]);
        assert!(!ok, "{action} must refuse");
        assert!(err.contains("newer than this binary's"), "{action}: {err}");
    }
}

/// A migrated, empty database and a store on it; blocking (for the synchronous contract).
fn fresh_store(test: &str) -> (String, Box<dyn Store>) {
    let test = test.to_string();
    let url = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let url = database(&test).await;
            let config = postgres::config(&url, None, None).expect("url");
            let mut client = postgres::connect(&config).await.expect("connect");
            migrations::migrate(&mut client).await.expect("migrate");
            url
        })
    })
    .join()
    .expect("setup thread");
    (url.clone(), open(&url))
}

fn open(url: &str) -> Box<dyn Store> {
    let config = postgres::config(url, None, None).expect("url");
    let engine = Postgres::connect(config).expect("connect the engine");
    Box::new(DurableStore::on(Arc::new(engine)).expect("open the store"))
}

/// The store's contract, written once (`store::conformance`), on a real PostgreSQL: the
/// same cases the redb backend passes.
#[test]
fn the_store_contract_holds_on_postgresql() {
    conformance::run(&|| fresh_store("contract").1);
}

#[test]
fn a_restart_finds_what_was_in_flight_waiting_again() {
    let (url, store) = fresh_store("restart");
    let key = store.secret("links").expect("secret");
    store
        .ingest(vec![Ingest {
            event: conformance::event("evt_1", Some("p-1")),
            deliveries: vec![
                conformance::pending("evt_1", None, 0),
                conformance::pending("evt_1", None, 0),
            ],
        }])
        .expect("ingest");
    let taken = store.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
    assert_eq!(taken.len(), 1, "one in flight when the process dies");
    let mut dead = store.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
    store
        .dead_letter(dead.remove(0), "gave up".into())
        .expect("dead letter");
    store.note_subscription("sub", "mail").expect("note");
    store.flush().expect("flush");
    drop(store);

    let store = open(&url);
    assert_eq!(
        store.secret("links").expect("secret"),
        key,
        "links stay valid across a restart"
    );
    assert_eq!(
        store.subscriptions().expect("subscriptions"),
        vec![("sub".to_string(), Some("mail".to_string()))]
    );
    assert_eq!(
        store.counts("sub"),
        QueueCounts {
            backlog: 1,
            dead_lettered: 1
        },
        "the delivery in flight is waiting again, the dead letter kept"
    );
    let again = store.take_due("sub", jiff::Timestamp::now(), 10, false).expect("take");
    assert_eq!(again.len(), 1);
    assert_eq!(
        store.event("evt_1").expect("read").map(|e| e.id.clone()),
        Some("evt_1".to_string())
    );
    // The producer id still de-duplicates after the restart.
    let appended = store
        .ingest(vec![Ingest {
            event: conformance::event("evt_2", Some("p-1")),
            deliveries: vec![conformance::pending("evt_2", None, 0)],
        }])
        .expect("ingest");
    assert!(appended.iter().all(|a| a.duplicate), "{appended:?}");
    assert!(store.disk_bytes().is_some_and(|b| b > 0), "the database size is known");
}
