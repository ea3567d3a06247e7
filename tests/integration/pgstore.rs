//! The operator on the PostgreSQL store (`--store-url`), end to end: a real apiserver, the
//! operator binary, a real PostgreSQL 15, a receiver verifying every signature. (The crash
//! test on it is in `durability.rs`, beside the redb one.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{
    INGEST_TOKEN, Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply_siem, condition, eventually,
    free_port, siem_event, wait_ready, whs,
};

fn delivered(got: &[Received]) -> BTreeSet<String> {
    got.iter()
        .filter(|r| r.verified && r.answered == 200)
        .filter_map(Received::producer_event_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_are_delivered_and_verified_on_the_postgres_store() {
    let ns = TestNamespace::new("pgstore").await;
    // Over TLS that checks the server (sslmode=verify-full, the CA as a flag).
    let url = format!("{}?sslmode=verify-full", crate::pg::database("pgstore").await);
    let ca = std::env::var("MAILHOOK_TEST_PG_CA").expect("MAILHOOK_TEST_PG_CA: run tests/pgenv/up");
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--store-url", &url, "--store-ca-file", &ca]).await;
    assert!(operator.log().contains("tls=true"), "the operator says it uses TLS");
    assert_eq!(operator.metric(r#"mailhook_store_info{kind="postgres"}"#).await, 1.0);
    apply_siem(&ns, &receiver.url("/hooks"), "  delivery: {concurrency: 16}\n");
    wait_ready(&ns, "siem").await;

    let client = reqwest::Client::new();
    let mut sent = BTreeSet::new();
    for batch in 0..10 {
        let ids: Vec<String> = (0..100).map(|i| format!("pg-{batch}-{i}")).collect();
        let body: String = ids.iter().map(|id| format!("{}\n", siem_event(id))).collect();
        let answer = client
            .post(format!("http://{}/v1/events", operator.ingest))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/x-ndjson")
            .timeout(Duration::from_secs(10))
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status().as_u16(), 202);
        sent.extend(ids);
    }
    eventually(
        "1,000 events delivered and verified",
        || receiver.deliveries(),
        |got| delivered(got) == sent,
    )
    .await;
}

/// The readiness report (`/readyz?verbose`): (HTTP status, body).
async fn readyz(operator: &Operator) -> (u16, String) {
    let r = reqwest::get(format!("http://{}/readyz?verbose", operator.admin))
        .await
        .expect("readyz");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// One SMTP transaction with swaks (real mail software) to `smtp`: its transcript.
fn swaks_journal(smtp: std::net::SocketAddr) -> String {
    let out = std::process::Command::new("swaks")
        .args(["--server", &smtp.ip().to_string(), "--port", &smtp.port().to_string()])
        .args([
            "--timeout",
            "20",
            "--from",
            "journal@contoso.com",
            "--to",
            "ada@contoso.com",
        ])
        .args(["--header", "Subject: während des Ausfalls", "--body", "outage"])
        .output()
        .expect("run swaks (tests/setup installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// PostgreSQL crashes (`pg_ctl stop -m immediate`) under sustained load and comes back:
/// while it is down ingest answers 503 with Retry-After and SMTP 451, deliveries pause,
/// /readyz is not ready and the subscription's status says why; once it is back
/// everything resumes without restarting the operator, and every acknowledged event is
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_under_load_refuses_new_events_pauses_and_resumes_by_itself() {
    const CONCURRENCY: usize = 8;
    let ns = TestNamespace::new("pg-outage").await;
    let cluster = crate::pg::Cluster::start();
    let url = crate::pg::verified_with(&cluster.url, &cluster.ca);
    let receiver = Receiver::start(SIEM_SECRET);
    let smtp = free_port();
    let smtp_arg = smtp.to_string();
    let operator = Operator::start_with(
        &ns,
        &[
            "--store-url",
            &url,
            "--smtp-addr",
            &smtp_arg,
            "--internal-domains",
            "contoso.com",
        ],
    )
    .await;
    let pid = operator.pid();
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        &format!("  delivery: {{concurrency: {CONCURRENCY}, retrySchedule: [0s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]}}\n"),
    );
    wait_ready(&ns, "siem").await;

    // Sustained load: batches of 20 until told to stop; what was refused, and how.
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let refusals: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = operator.ingest;
    let loader = {
        let (accepted, refused, refusals, stop) = (accepted.clone(), refused.clone(), refusals.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut batch = 0;
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..20).map(|i| format!("pgdown-{batch}-{i}")).collect();
                let body: String = ids.iter().map(|id| format!("{}\n", siem_event(id))).collect();
                batch += 1;
                let sent = client
                    .post(format!("http://{ingest}/v1/events"))
                    .bearer_auth(INGEST_TOKEN)
                    .header("content-type", "application/x-ndjson")
                    .timeout(Duration::from_secs(10))
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().as_u16() == 202 => accepted.lock().expect("lock").extend(ids),
                    Ok(r) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        let key = format!(
                            "{} retry-after={}",
                            r.status().as_u16(),
                            r.headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                        );
                        *refusals.lock().expect("lock").entry(key).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !accepted.lock().expect("lock").is_empty(),
        "load flows before the outage"
    );

    cluster.ctl("stop");
    eventually(
        "/readyz not ready, naming the store",
        || readyz(&operator),
        |(status, body)| *status == 503 && body.contains("[-]store"),
    )
    .await;
    assert_eq!(operator.metric("mailhook_store_up").await, 0.0);
    let down = eventually(
        "Healthy=False StoreUnavailable on the subscription",
        || whs(&ns, "siem"),
        |w| condition(w, "Healthy").is_some_and(|(s, r)| s == "False" && r == "StoreUnavailable"),
    )
    .await;
    let message = down
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Healthy"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("the store cannot commit"), "{message}");
    let transcript = swaks_journal(smtp);
    assert!(
        transcript.contains("451 4.3.0"),
        "SMTP answers 451 while the store is down: {transcript}"
    );
    // Deliveries pause: nothing new reaches the receiver while the store is down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = receiver.deliveries().await.len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = receiver.deliveries().await.len();
    assert_eq!(
        before, during,
        "no delivery is attempted while its completion could not be recorded"
    );
    let accepted_while_down = accepted.lock().expect("lock").len();

    cluster.ctl("start");
    eventually(
        "/readyz ready again",
        || readyz(&operator),
        |(status, _)| *status == 200,
    )
    .await;
    eventually(
        "new events accepted again",
        || async { accepted.lock().expect("lock").len() },
        |n| *n > accepted_while_down,
    )
    .await;
    let transcript = swaks_journal(smtp);
    assert!(
        transcript.contains("250 2.0.0 OK"),
        "SMTP takes mail again: {transcript}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    loader.await.expect("loader");

    let accepted: BTreeSet<String> = accepted.lock().expect("lock").iter().cloned().collect();
    let got = eventually(
        "every acknowledged event delivered",
        || async {
            let got = receiver.deliveries().await;
            let missing: Vec<String> = accepted.difference(&delivered(&got)).take(5).cloned().collect();
            (got, missing)
        },
        |(_, missing)| missing.is_empty(),
    )
    .await
    .0;
    eventually(
        "Healthy again",
        || whs(&ns, "siem"),
        |w| condition(w, "Healthy").is_some_and(|(_, r)| r == "EndpointHealthy"),
    )
    .await;
    assert_eq!(operator.metric("mailhook_store_up").await, 1.0);
    assert_eq!(operator.pid(), pid, "recovered without a restart");
    let refusals = refusals.lock().expect("lock").clone();
    assert!(
        refusals.keys().all(|k| k == "503 retry-after=1"),
        "every refusal is a 503 with Retry-After: {refusals:?}"
    );
    assert!(refused.load(Ordering::Relaxed) > 0, "the outage was seen by ingest");
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for r in got.iter().filter(|r| r.answered == 200) {
        *per_id.entry(r.webhook_id.as_deref().unwrap_or("")).or_default() += 1;
    }
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    eprintln!(
        "PostgreSQL outage: {} accepted, {} delivered, {} duplicates, refusals {refusals:?}",
        accepted.len(),
        per_id.len(),
        duplicates
    );
    // Completions made during the outage were kept and committed after it: none is lost,
    // so nothing is delivered twice beyond what was in flight.
    assert!(duplicates <= CONCURRENCY, "{duplicates} duplicates");
}

/// Two replicas started at the same moment on one new database: the migrations run under
/// an advisory lock, so one applies them, the other waits and finds the schema current;
/// both start, and the schema is whole. An operator that would own the database alone is
/// then refused, with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_starting_at_once_on_a_new_database_migrate_it_once() {
    let (a, b) = (
        TestNamespace::new("pg-race-a").await,
        TestNamespace::new("pg-race-b").await,
    );
    let url = crate::pg::database("race").await;
    let flags = |name: &'static str| ["--store-url", url.as_str(), "--shared-store", "--replica-name", name];
    let (fa, fb) = (flags("race-a"), flags("race-b"));
    let (first, second) = tokio::join!(Operator::start_with(&a, &fa), Operator::start_with(&b, &fb));
    // Every migration this binary has, as the operator logs them.
    let every = format!(
        "applied={:?}",
        mailhook::store::postgres::migrations::MIGRATIONS
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>()
    );
    let applied: Vec<bool> = [&first, &second]
        .iter()
        .map(|o| {
            let log = o.log();
            assert!(log.contains("PostgreSQL store: schema current"), "{log}");
            log.contains(&every)
        })
        .collect();
    assert_eq!(
        applied.iter().filter(|a| **a).count(),
        1,
        "exactly one of the two applied the migration: {applied:?}"
    );
    let db = mailhook::store::postgres::config(&url, None, None).expect("url");
    let client = mailhook::store::postgres::connect(&db).await.expect("connect");
    let status = mailhook::store::postgres::migrations::status(&client)
        .await
        .expect("status");
    assert_eq!(status.current(), mailhook::store::postgres::migrations::latest());
    assert_eq!(
        status.applied.len(),
        mailhook::store::postgres::migrations::MIGRATIONS.len()
    );
    // Both work on it: an event through each is stored.
    for (operator, id) in [(&first, "race-a"), (&second, "race-b")] {
        let (status, body) = operator.ingest(&[siem_event(id)]).await;
        assert_eq!(status, 202, "{body}");
    }
    // A single owner on a database replicas share would corrupt their work: refused.
    let (ok, _, err) = crate::support::mailhook(&[
        "run",
        "--store-url",
        &url,
        "--watch-namespace",
        &a.name,
        "--http-addr",
        &crate::support::free_port().to_string(),
    ]);
    assert!(!ok, "a single owner started beside shared replicas");
    assert!(err.contains("--shared-store"), "{err}");
}

/// `--max-store-bytes` on PostgreSQL reads the database's size (`pg_database_size`): past
/// the limit, new events get 429 and the size in the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_store_bytes_is_the_database_size_on_postgresql() {
    let ns = TestNamespace::new("pg-full").await;
    let url = crate::pg::database("full").await;
    // An empty database is a few MiB: one MiB is past the limit from the start.
    let operator = Operator::start_with(&ns, &["--store-url", &url, "--max-store-bytes", "1048576"]).await;
    let (status, body) = operator.ingest(&[siem_event("too-big")]).await;
    assert_eq!(status, 429, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("--max-store-bytes 1048576"), "{error}");
    eventually(
        "the gauge shows the database size",
        || operator.metric("mailhook_store_disk_bytes"),
        |bytes| *bytes > 1_048_576.0,
    )
    .await;
}

/// A process killed with SIGKILL leaves its PostgreSQL session, and the store's lock with
/// it, until the server notices (after the statement it was running, or after the
/// keepalives when its node vanished). The restarted operator waits for it rather than
/// exiting; here a session of the test's own holds the lock, as a killed predecessor's
/// does, for a few seconds, then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waits_for_its_killed_predecessors_session_to_end() {
    let ns = TestNamespace::new("pg-successor").await;
    let url = crate::pg::database("successor").await;
    let db = mailhook::store::postgres::config(&url, None, None).expect("url");
    let mut client = mailhook::store::postgres::connect(&db).await.expect("connect");
    mailhook::store::postgres::migrations::migrate(&mut client)
        .await
        .expect("migrate");
    mailhook::store::postgres::shared::hold_exclusive(&client, Duration::ZERO)
        .await
        .expect("the lock is free");
    let predecessor = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(client);
    });
    let operator = Operator::start_with(&ns, &["--store-url", &url]).await;
    predecessor.await.expect("predecessor");
    let log = operator.log();
    assert!(
        log.contains("another session holds the store's lock; waiting for it to end"),
        "the wait is told: {log}"
    );
    assert!(log.contains("holders=pid "), "the holder is named: {log}");
    let (status, body) = operator.ingest(&[siem_event("after-predecessor")]).await;
    assert_eq!(status, 202, "{body}");
}
