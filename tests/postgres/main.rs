//! The PostgreSQL store against a real server: a throw-away cluster that `tests/pgenv/up`
//! started (found through `MAILHOOK_TEST_PG_URL` and `MAILHOOK_TEST_PG_ADMIN_URL`). Each
//! test gets a database of its own, owned by the operator's role.

use std::process::Command;
use std::sync::Arc;

use mailhook::store::postgres::{self, engine::Postgres, migrations};

#[path = "../common/pg.rs"]
mod pg;
use mailhook::store::{
    Archive, Backend, DurableStore, EventLog, History, Ingest, PagedStore, Queue, QueueCounts, Rows, SharedStore,
    Store, conformance,
};
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
    Box::new(PagedStore::on(Arc::new(engine)).expect("open the store"))
}

/// A store in the layout older releases kept (every queued delivery in memory, `pending`
/// by seq), on the same database.
fn open_legacy(url: &str) -> Box<dyn Store> {
    let config = postgres::config(url, None, None).expect("url");
    let engine = Postgres::connect(config).expect("connect the engine");
    Box::new(DurableStore::on(Arc::new(engine)).expect("open the store"))
}

#[test]
fn a_queue_an_older_release_left_is_moved_into_the_paged_tables_and_delivered_once() {
    let (url, paged) = fresh_store("legacy");
    drop(paged);
    let legacy = open_legacy(&url);
    let items: Vec<Ingest> = (0..300)
        .map(|i| {
            let id = format!("evt_{i}");
            Ingest {
                event: conformance::event(&id, Some(&id)),
                deliveries: vec![conformance::pending(&id, None, 0)],
            }
        })
        .collect();
    legacy.ingest(items).expect("ingest");
    let mut dead = legacy.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
    legacy
        .dead_letter(dead.remove(0), "gave up".into())
        .expect("dead letter");
    legacy.flush().expect("flush");
    drop(legacy);

    let store = open(&url);
    let counts = store.counts("sub");
    assert_eq!((counts.backlog, counts.dead_lettered), (299, 1), "{counts:?}");
    let mut seen = std::collections::HashSet::new();
    loop {
        let taken = store.take_due("sub", jiff::Timestamp::now(), 50, false).expect("take");
        if taken.is_empty() {
            break;
        }
        for d in taken {
            assert!(seen.insert(d.event_id.clone()), "{} twice", d.event_id);
            drop(store.complete(&d).expect("complete"));
        }
    }
    assert_eq!(seen.len(), 299);
    store.flush().expect("flush");
    assert_eq!(store.counts("sub").backlog, 0);
    assert_eq!(
        store.event_count().expect("count"),
        1,
        "only the dead letter's event is left"
    );
    let again = store
        .ingest(vec![Ingest {
            event: conformance::event("evt_x", Some("evt_7")),
            deliveries: vec![],
        }])
        .expect("ingest");
    assert!(again[0].duplicate, "producer ids carried over");
}

/// The store's contract, written once (`store::conformance`), on a real PostgreSQL: the
/// same cases the redb backend passes.
#[test]
fn the_store_contract_holds_on_postgresql() {
    conformance::run(&|| fresh_store("contract").1);
    // The Dovecot source's mailbox index, on the store's keyed rows.
    mailhook::source::dovecot::index::conformance::the_index_follows_changes_and_is_purged_by_age(
        fresh_store("index").1.as_ref(),
    );
    // When each source was last heard from, on the same rows.
    mailhook::source::seen::conformance::times_are_shared_kept_and_apart_from_the_index(fresh_store("seen").1.as_ref());
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
    let counts: QueueCounts = store.counts("sub");
    assert_eq!(
        (counts.backlog, counts.in_flight, counts.dead_lettered),
        (1, 0, 1),
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

/// Whether the session `client` is on runs over TLS, as the server sees it.
async fn over_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test]
async fn verify_full_connects_over_tls_and_refuses_a_server_it_cannot_verify() {
    let url = database("tls").await;
    let verified = pg::verified(&url);
    let client = postgres::connect(&postgres::config(&verified, None, None).expect("url"))
        .await
        .expect("verify-full against the cluster's CA");
    assert!(over_tls(&client).await, "the session is encrypted");
    let plain = postgres::connect(&postgres::config(&url, None, None).expect("url"))
        .await
        .expect("plain");
    assert!(!over_tls(&plain).await, "sslmode absent: plain TCP, as asked");

    // Another CA: the chain does not verify.
    let other = std::env::temp_dir().join(format!("mailhook-other-ca-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&other).expect("dir");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ])
        .arg("-keyout")
        .arg(other.join("key.pem"))
        .arg("-out")
        .arg(other.join("ca.pem"))
        .output()
        .expect("openssl");
    assert!(made.status.success());
    // A CA file with no sslmode is a contradiction, said so.
    assert!(
        postgres::with_ca(&url, None, None, Some(&other.join("ca.pem"))).is_err(),
        "a CA without sslmode=verify-full is refused"
    );
    let mut parsed = url::Url::parse(&url).expect("url");
    parsed.query_pairs_mut().append_pair("sslmode", "verify-full");
    let wrong = postgres::with_ca(parsed.as_str(), None, None, Some(&other.join("ca.pem"))).expect("config");
    let err = postgres::connect(&wrong).await.expect_err("an unknown CA must fail");
    let chain = mailhook::error_chain(&err);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");

    // The right CA, the wrong name: the certificate is for 127.0.0.1 only.
    let mut by_name = url::Url::parse(&verified).expect("url");
    by_name.set_host(Some("localhost")).expect("host");
    let err = postgres::connect(&postgres::config(by_name.as_str(), None, None).expect("url"))
        .await
        .expect_err("a name the certificate does not carry must fail");
    let chain = mailhook::error_chain(&err);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");
    let _ = std::fs::remove_dir_all(other);

    // The operator's own subcommand over TLS, with the CA as a flag.
    let mut flagged = url::Url::parse(&url).expect("url");
    flagged.query_pairs_mut().append_pair("sslmode", "verify-full");
    let ca = std::env::var("MAILHOOK_TEST_PG_CA").expect("CA");
    let (ok, out, err) = mailhook(&[
        "store",
        "--store-url",
        flagged.as_str(),
        "--store-ca-file",
        &ca,
        "migrate",
    ]);
    assert!(ok && out.contains("applied migration 1"), "{out}{err}");
    // A mode that would not check the server is refused, saying what to use.
    let (ok, _, err) = mailhook(&["store", "--store-url", &format!("{url}?sslmode=require"), "status"]);
    assert!(!ok && err.contains("verify-full"), "{err}");
}

/// The store on a server that crashes (`pg_ctl stop -m immediate`) and comes back: new
/// events are refused while it is down, the writes memory already shows (a completion, a
/// retry) are kept and reach the database once it is back, over a new connection.
#[test]
fn a_crashed_server_refuses_new_events_and_gets_the_kept_writes_once_back() {
    let cluster = pg::Cluster::start();
    let url = pg::verified_with(&cluster.url, &cluster.ca);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = postgres::connect(&postgres::config(&url, None, None).expect("url"))
            .await
            .expect("connect");
        migrations::migrate(&mut client).await.expect("migrate");
    });
    let store = open(&url);
    let one = |id: &str| Ingest {
        event: conformance::event(id, Some(id)),
        deliveries: vec![conformance::pending(id, None, 0)],
    };
    store.ingest(vec![one("evt_1"), one("evt_2")]).expect("ingest");
    let mut taken = store.take_due("sub", jiff::Timestamp::now(), 2, false).expect("take");
    assert_eq!(taken.len(), 2);

    cluster.ctl("stop");
    let refused = store
        .ingest(vec![one("evt_3")])
        .expect_err("no server: nothing acknowledged");
    assert!(refused.to_string().contains("PostgreSQL"), "{refused}");
    let why = store.unavailable().expect("the outage is known");
    assert!(why.contains("PostgreSQL"), "{why}");
    let completion = store.complete(&taken[0]).expect("queued");
    let mut again = taken.remove(1);
    again.attempts = 1;
    store.retry(again).expect("queued");

    cluster.ctl("start");
    runtime
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), completion.wait()).await })
        .expect("the completion commits once the server is back")
        .expect("durable");
    assert!(store.unavailable().is_none());
    assert_eq!(
        store.event_count().expect("count"),
        1,
        "the completed event is gone from the database"
    );
    let appended = store.ingest(vec![one("evt_3")]).expect("ingest after the outage");
    assert!(!appended[0].duplicate, "the refused event's producer id was released");
    drop(store);

    // What the database holds, read by a fresh store: the retry (attempt 1) and evt_3.
    let reopened = open(&url);
    let waiting = reopened
        .take_due("sub", jiff::Timestamp::now(), 10, false)
        .expect("take");
    let mut seen: Vec<(String, u32)> = waiting.iter().map(|d| (d.event_id.clone(), d.attempts)).collect();
    seen.sort();
    assert_eq!(seen, vec![("evt_2".to_string(), 1), ("evt_3".to_string(), 0)]);
}

/// A replica of a shared store that owns every shard (its session holds the locks): the
/// same contract as a store of one's own, with new deliveries claimed after each ingest
/// as the ownership loop does.
struct Sole {
    store: SharedStore,
    _session: postgres::shared::Session,
    _runtime: tokio::runtime::Runtime,
}

const SHARDS: usize = 4;

/// A migrated, empty database readied for sharing.
fn shared_database(test: &str, runtime: &tokio::runtime::Runtime) -> (String, postgres::Database) {
    runtime.block_on(async {
        let url = database(test).await;
        let config = postgres::config(&url, None, None).expect("url");
        let mut client = postgres::connect(&config).await.expect("connect");
        migrations::migrate(&mut client).await.expect("migrate");
        postgres::shared::prepare(&mut client, SHARDS, false)
            .await
            .expect("prepare");
        (url, config)
    })
}

fn replica(config: &postgres::Database) -> SharedStore {
    let engine = Arc::new(Postgres::connect(config.clone()).expect("connect the engine"));
    SharedStore::new(engine.clone(), engine, SHARDS).expect("open the shared store")
}

impl Sole {
    fn new(test: &str) -> Sole {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (_, config) = shared_database(test, &runtime);
        let store = replica(&config);
        let session = runtime.block_on(async {
            let session = postgres::shared::Session::open(&config, std::time::Duration::ZERO)
                .await
                .expect("session");
            let mut taken = Vec::new();
            for shard in 0..SHARDS as u32 {
                taken.push((shard, session.take(shard, "sole").await.expect("take").expect("free")));
            }
            mailhook::store::Sharing::acquire(&store, &taken).expect("acquire");
            session
        });
        Sole {
            store,
            _session: session,
            _runtime: runtime,
        }
    }

    fn sharing(&self) -> &dyn mailhook::store::Sharing {
        self.store.sharing().expect("shared")
    }
}

impl EventLog for Sole {
    fn ingest_archived(
        &self,
        items: Vec<Ingest>,
        raw: Option<mailhook::store::RawMessage>,
    ) -> Result<Vec<mailhook::store::Appended>, mailhook::store::StoreError> {
        let out = self.store.ingest_archived(items, raw)?;
        self.sharing().claim_arrivals()?;
        Ok(out)
    }

    fn ingest_with_rows(
        &self,
        items: Vec<Ingest>,
        rows: Vec<mailhook::store::RowWrite>,
    ) -> Result<Vec<mailhook::store::Appended>, mailhook::store::StoreError> {
        let out = self.store.ingest_with_rows(items, rows)?;
        self.sharing().claim_arrivals()?;
        Ok(out)
    }

    fn event(&self, id: &str) -> Result<Option<Arc<mailhook::event::MailboxEvent>>, mailhook::store::StoreError> {
        self.store.event(id)
    }

    fn purge_producer_ids(&self, before: jiff::Timestamp) -> Result<u64, mailhook::store::StoreError> {
        self.store.purge_producer_ids(before)
    }

    fn event_count(&self) -> Result<u64, mailhook::store::StoreError> {
        self.store.flush()?;
        self.store.event_count()
    }
}

impl Rows for Sole {
    fn rows(&self, group: &str, prefix: &[u8]) -> Result<Vec<mailhook::store::Row>, mailhook::store::StoreError> {
        self.store.rows(group, prefix)
    }

    fn row(&self, group: &str, key: &[u8]) -> Result<Option<mailhook::store::Row>, mailhook::store::StoreError> {
        self.store.row(group, key)
    }

    fn row_groups(&self) -> Result<Vec<String>, mailhook::store::StoreError> {
        self.store.row_groups()
    }

    fn rows_before(&self, before: i64) -> Result<Vec<(String, Vec<u8>)>, mailhook::store::StoreError> {
        self.store.rows_before(before)
    }

    fn write_rows(&self, writes: Vec<mailhook::store::RowWrite>) -> Result<(), mailhook::store::StoreError> {
        self.store.write_rows(writes)
    }
}

impl mailhook::store::AuditTrail for Sole {
    fn audit_size(&self) -> Result<u64, mailhook::store::StoreError> {
        self.store.audit_size()
    }

    fn audit_hashes(&self, indexes: &[u64]) -> Result<Vec<Option<[u8; 32]>>, mailhook::store::StoreError> {
        self.store.audit_hashes(indexes)
    }

    fn audit_records(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, mailhook::store::StoreError> {
        self.store.audit_records(from, to)
    }

    fn audit_leaves_of(&self, event_id: &str) -> Result<Vec<u64>, mailhook::store::StoreError> {
        self.store.audit_leaves_of(event_id)
    }

    fn audit_append(&self, record: &mailhook::audit::Record) -> Result<Option<u64>, mailhook::store::StoreError> {
        self.store.audit_append(record)
    }

    fn audit_checkpoint(&self, size: Option<u64>) -> Result<Option<(u64, Vec<u8>)>, mailhook::store::StoreError> {
        self.store.audit_checkpoint(size)
    }

    fn audit_keep_checkpoint(&self, size: u64, note: Vec<u8>) -> Result<(), mailhook::store::StoreError> {
        self.store.audit_keep_checkpoint(size, note)
    }
}

impl Archive for Sole {
    fn raw_message(&self, sha256: &str) -> Result<Option<(jiff::Timestamp, Vec<u8>)>, mailhook::store::StoreError> {
        self.store.raw_message(sha256)
    }

    fn purge_raw_messages(
        &self,
        before: jiff::Timestamp,
        holds: &dyn mailhook::store::Holds,
    ) -> Result<mailhook::store::Purged, mailhook::store::StoreError> {
        self.store.purge_raw_messages(before, holds)
    }
}

impl Queue for Sole {
    fn take_due(
        &self,
        subscription: &str,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<mailhook::store::PendingDelivery>, mailhook::store::StoreError> {
        self.store.take_due(subscription, now, max, ordered)
    }

    fn next_due(&self, subscription: &str) -> Option<jiff::Timestamp> {
        self.store.next_due(subscription)
    }

    fn complete(
        &self,
        d: &mailhook::store::PendingDelivery,
    ) -> Result<mailhook::store::Durable, mailhook::store::StoreError> {
        self.store.complete(d)
    }

    fn retry(&self, d: mailhook::store::PendingDelivery) -> Result<(), mailhook::store::StoreError> {
        self.store.retry(d)
    }

    fn dead_letter(
        &self,
        d: mailhook::store::PendingDelivery,
        reason: String,
    ) -> Result<(), mailhook::store::StoreError> {
        self.store.dead_letter(d, reason)
    }

    fn replay(
        &self,
        s: &str,
        since: jiff::Timestamp,
        now: jiff::Timestamp,
    ) -> Result<u64, mailhook::store::StoreError> {
        self.store.replay(s, since, now)
    }

    fn expire(
        &self,
        s: &str,
        before: jiff::Timestamp,
        reason: &str,
    ) -> Result<Vec<mailhook::store::PendingDelivery>, mailhook::store::StoreError> {
        self.store.expire(s, before, reason)
    }

    fn counts(&self, s: &str) -> QueueCounts {
        self.store.counts(s)
    }

    fn limit_backlog(&self, s: &str, cap: Option<mailhook::store::BacklogCap>) {
        self.store.limit_backlog(s, cap)
    }

    fn total_backlog(&self) -> u64 {
        self.sharing().refresh_backlog().unwrap_or(0)
    }

    fn subscriptions(&self) -> Result<Vec<(String, Option<String>)>, mailhook::store::StoreError> {
        self.store.subscriptions()
    }

    fn note_subscription(&self, uid: &str, ns: &str) -> Result<(), mailhook::store::StoreError> {
        self.store.note_subscription(uid, ns)
    }

    fn forget_subscription(&self, s: &str) -> Result<(), mailhook::store::StoreError> {
        self.store.forget_subscription(s)
    }
}

impl History for Sole {
    fn record_attempt(&self, a: mailhook::store::Attempt) -> Result<(), mailhook::store::StoreError> {
        self.store.record_attempt(a)
    }

    fn attempts(
        &self,
        s: &str,
        since: jiff::Timestamp,
        limit: usize,
    ) -> Result<Vec<mailhook::store::Attempt>, mailhook::store::StoreError> {
        self.store.attempts(s, since, limit)
    }

    fn dead_letters(
        &self,
        s: &str,
        since: jiff::Timestamp,
        limit: usize,
    ) -> Result<Vec<mailhook::store::DeadLetter>, mailhook::store::StoreError> {
        self.store.dead_letters(s, since, limit)
    }

    fn purge(
        &self,
        s: &str,
        retention: mailhook::store::Retention,
        holds: &dyn mailhook::store::Holds,
    ) -> Result<mailhook::store::Purged, mailhook::store::StoreError> {
        self.store.purge(s, retention, holds)
    }
}

impl Backend for Sole {
    fn secret(&self, name: &str) -> Result<[u8; 32], mailhook::store::StoreError> {
        self.store.secret(name)
    }

    fn flush(&self) -> Result<(), mailhook::store::StoreError> {
        self.store.flush()
    }
}

/// The store's contract holds for a replica of a shared store too (owning every shard):
/// de-duplication, numbering and event lifetimes done by the database instead of memory.
#[test]
fn the_store_contract_holds_on_a_shared_store() {
    conformance::run(&|| Box::new(Sole::new("shared_contract")));
    mailhook::source::dovecot::index::conformance::the_index_follows_changes_and_is_purged_by_age(&Sole::new(
        "shared_index",
    ));
    mailhook::source::seen::conformance::times_are_shared_kept_and_apart_from_the_index(&Sole::new("shared_seen"));
}

/// Two replicas of one shared store, by hand: either one ingests and producer ids
/// de-duplicate across them; a shard's owner claims what the other committed; when the
/// shard moves (the first replica's session is gone), the new owner holds every waiting
/// delivery, and the old owner's late writes are refused by the database.
#[test]
fn a_shard_moves_between_replicas_and_the_old_owner_is_fenced_out() {
    use mailhook::store::Sharing;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_, config) = shared_database("fencing", &runtime);
    let (a, b) = (replica(&config), replica(&config));
    let shard = mailhook::store::shard_of("sub", SHARDS) as u32;
    let session_a = runtime
        .block_on(postgres::shared::Session::open(&config, std::time::Duration::ZERO))
        .expect("session a");
    let epoch_a = runtime
        .block_on(session_a.take(shard, "replica-a"))
        .expect("take")
        .expect("free");
    a.acquire(&[(shard, epoch_a)]).expect("acquire");

    // B takes the events in; A owns the shard.
    let two = Ingest {
        event: conformance::event("evt_1", Some("p-1")),
        deliveries: vec![
            conformance::pending("evt_1", Some("ada@contoso.com"), 0),
            conformance::pending("evt_1", Some("ada@contoso.com"), 0),
        ],
    };
    assert!(!b.ingest(vec![two]).expect("ingest on b")[0].duplicate);
    let again = a
        .ingest(vec![Ingest {
            event: conformance::event("evt_1b", Some("p-1")),
            deliveries: vec![conformance::pending("evt_1b", None, 0)],
        }])
        .expect("ingest on a");
    assert_eq!(
        (again[0].duplicate, again[0].id.as_str()),
        (true, "evt_1"),
        "the producer id B stored de-duplicates on A"
    );
    assert!(b.claim_arrivals().expect("claim").is_empty(), "B owns nothing");
    assert_eq!(a.claim_arrivals().expect("claim"), vec!["sub".to_string()]);
    let taken = a.take_due("sub", jiff::Timestamp::now(), 10, false).expect("take");
    assert_eq!(taken.len(), 2, "A delivers what B committed");

    // A's session dies: its lock is free at once, and B takes the shard.
    drop(session_a);
    let session_b = runtime
        .block_on(postgres::shared::Session::open(&config, std::time::Duration::ZERO))
        .expect("session b");
    let epoch_b = runtime.block_on(async {
        for _ in 0..50 {
            if let Some(e) = session_b.take(shard, "replica-b").await.expect("take") {
                return e;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the shard's lock was never freed");
    });
    assert!(epoch_b > epoch_a);
    b.acquire(&[(shard, epoch_b)]).expect("acquire");
    assert_eq!(b.counts("sub").backlog, 2, "B holds both deliveries A had in flight");

    // A does not know yet: its completion and its retry are refused by the database.
    runtime
        .block_on(a.complete(&taken[0]).expect("complete").wait())
        .expect("durable");
    let mut late = taken[1].clone();
    late.attempts = 1;
    a.retry(late).expect("retry");
    a.flush().expect("flush");
    assert_eq!(
        a.fenced_writes(),
        2,
        "both writes made under the old claim were refused"
    );
    // New work for the shard is B's: A's claim no longer matches the owner row.
    a.ingest(vec![Ingest {
        event: conformance::event("evt_2", Some("p-2")),
        deliveries: vec![conformance::pending("evt_2", None, 0)],
    }])
    .expect("ingest");
    a.release(shard);
    assert!(a.claim_arrivals().expect("claim").is_empty());
    assert_eq!(b.claim_arrivals().expect("claim"), vec!["sub".to_string()]);
    let all = b.take_due("sub", jiff::Timestamp::now(), 10, false).expect("take");
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|d| d.attempts == 0), "A's retry did not land");
    for d in &all {
        runtime
            .block_on(b.complete(d).expect("complete").wait())
            .expect("durable");
    }
    assert_eq!(b.fenced_writes(), 0);
    assert_eq!(b.refresh_backlog().expect("count"), 0, "nothing waits");
    assert_eq!(
        b.event_count().expect("events"),
        0,
        "the events went with their last deliveries"
    );
}

/// A store owned by one operator and replicas sharing it never run on one database at once.
#[test]
fn a_single_owner_and_shared_replicas_exclude_each_other() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_, config) = shared_database("modes", &runtime);
    let session = runtime
        .block_on(postgres::shared::Session::open(&config, std::time::Duration::ZERO))
        .expect("session");
    let refused = Postgres::connect_exclusive(config.clone()).err().expect("refused");
    assert!(refused.to_string().contains("--shared-store"), "{refused}");
    drop(session);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sole = Postgres::connect_exclusive(config.clone()).expect("free once the replica left");
    let refused = runtime
        .block_on(postgres::shared::Session::open(&config, std::time::Duration::ZERO))
        .err()
        .expect("refused");
    assert!(refused.to_string().contains("only owner"), "{refused}");
    drop(sole);
}

/// Replicas of two stores on one PostgreSQL server (two databases) do not see each other:
/// advisory locks are per database, and so are the members and shards counted.
#[test]
fn replicas_of_another_database_on_the_server_are_not_counted() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_, one) = shared_database("members_one", &runtime);
    let (_, two) = shared_database("members_two", &runtime);
    runtime.block_on(async {
        let a = postgres::shared::Session::open(&one, std::time::Duration::ZERO)
            .await
            .expect("session");
        assert!(a.take(0, "a").await.expect("take").is_some());
        let b = postgres::shared::Session::open(&two, std::time::Duration::ZERO)
            .await
            .expect("session");
        assert_eq!(b.members().await.expect("members"), 1);
        assert!(
            b.locked().await.expect("locked").is_empty(),
            "shard 0 of the other store"
        );
        assert_eq!(b.holdings().await.expect("holdings"), vec![0]);
        assert_eq!(a.holdings().await.expect("holdings"), vec![1]);
        assert!(b.take(0, "b").await.expect("take").is_some(), "its own shard 0 is free");
    });
}

/// The history API may be asked on any replica: one that does not own a subscription's
/// shard lists its dead letters from the database.
#[test]
fn dead_letters_are_listed_on_a_replica_that_does_not_own_the_shard() {
    use mailhook::store::Sharing;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_, config) = shared_database("dead_anywhere", &runtime);
    let (a, b) = (replica(&config), replica(&config));
    let shard = mailhook::store::shard_of("sub", SHARDS) as u32;
    let session = runtime
        .block_on(postgres::shared::Session::open(&config, std::time::Duration::ZERO))
        .expect("session");
    let epoch = runtime.block_on(session.take(shard, "a")).expect("take").expect("free");
    a.acquire(&[(shard, epoch)]).expect("acquire");
    a.ingest(vec![Ingest {
        event: conformance::event("evt_1", Some("p-1")),
        deliveries: vec![conformance::pending("evt_1", None, 0)],
    }])
    .expect("ingest");
    a.claim_arrivals().expect("claim");
    let mut taken = a.take_due("sub", jiff::Timestamp::now(), 1, false).expect("take");
    a.dead_letter(taken.remove(0), "410 Gone".into()).expect("dead letter");
    a.flush().expect("flush");
    let listed = b
        .dead_letters("sub", jiff::Timestamp::MIN, 10)
        .expect("list on the other replica");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].event_id.as_str(), listed[0].reason.as_str()),
        ("evt_1", "410 Gone")
    );
    assert_eq!(a.dead_letters("sub", jiff::Timestamp::MIN, 10).expect("owner").len(), 1);
    drop(session);
}

/// `--shards` may change while no other replica runs (the rows are re-sharded), and is
/// refused, saying what to do, while one does — counting the starting replica itself once.
#[test]
fn the_shard_count_changes_only_while_no_other_replica_runs() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (url, config) = shared_database("reshard", &runtime);
    runtime.block_on(async {
        let mut client = postgres::connect(&postgres::config(&url, None, None).expect("url"))
            .await
            .expect("connect");
        let me = postgres::shared::Session::open(&config, std::time::Duration::ZERO)
            .await
            .expect("session");
        postgres::shared::prepare(&mut client, SHARDS * 2, true)
            .await
            .expect("alone (joined): re-sharded");
        let other = postgres::shared::Session::open(&config, std::time::Duration::ZERO)
            .await
            .expect("another replica");
        let refused = postgres::shared::prepare(&mut client, SHARDS, true)
            .await
            .expect_err("refused beside another replica");
        assert!(refused.to_string().contains("same --shards"), "{refused}");
        drop((me, other));
    });
}

/// A database a single owner used becomes shared: its waiting deliveries get their shard
/// and columns when the first replica prepares it, and that shard's owner delivers them.
#[test]
fn a_single_owners_waiting_deliveries_are_delivered_once_the_store_is_shared() {
    let (url, single) = fresh_store("to_shared");
    single
        .ingest(vec![Ingest {
            event: conformance::event("evt_1", Some("p-1")),
            deliveries: vec![conformance::pending("evt_1", None, 0)],
        }])
        .expect("ingest");
    single.flush().expect("flush");
    drop(single);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let config = postgres::config(&url, None, None).expect("url");
    let session = runtime.block_on(async {
        let mut client = postgres::connect(&config).await.expect("connect");
        postgres::shared::prepare(&mut client, SHARDS, false)
            .await
            .expect("prepare");
        postgres::shared::Session::open(&config, std::time::Duration::ZERO)
            .await
            .expect("session")
    });
    let shared = replica(&config);
    let shard = mailhook::store::shard_of("sub", SHARDS) as u32;
    let epoch = runtime.block_on(session.take(shard, "r")).expect("take").expect("free");
    mailhook::store::Sharing::acquire(&shared, &[(shard, epoch)]).expect("acquire");
    let due = shared.take_due("sub", jiff::Timestamp::now(), 10, false).expect("take");
    assert_eq!(due.len(), 1, "the single owner's delivery is waiting on its shard");
    runtime
        .block_on(shared.complete(&due[0]).expect("complete").wait())
        .expect("durable");
    assert_eq!(
        mailhook::store::Sharing::fenced_writes(&shared),
        0,
        "its completion was this replica's to make"
    );
    assert_eq!(shared.event_count().expect("events"), 0, "and its event went with it");
}
