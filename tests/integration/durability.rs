//! Nothing lost: the operator on its durable store, killed with SIGKILL under load and
//! restarted, and a receiver that is down for a while.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailhook::api::WebhookSubscription;

use crate::support::{
    INGEST_TOKEN, Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply_siem, condition, eventually,
    siem_event, wait_ready, whs,
};

const CONCURRENCY: usize = 8;

/// Whether the `siem` subscription's Healthy condition has `reason`.
fn healthy(w: &WebhookSubscription, reason: &str) -> bool {
    condition(w, "Healthy").is_some_and(|(_, r)| r == reason)
}

/// POSTs one batch; the ids come back only if the operator answered 202.
async fn post(client: &reqwest::Client, ingest: std::net::SocketAddr, ids: &[String]) -> bool {
    let body: String = ids.iter().map(|id| format!("{}\n", siem_event(id))).collect();
    let sent = client
        .post(format!("http://{ingest}/v1/events"))
        .bearer_auth(INGEST_TOKEN)
        .header("content-type", "application/x-ndjson")
        .timeout(Duration::from_secs(5))
        .body(body)
        .send()
        .await;
    sent.is_ok_and(|r| r.status().as_u16() == 202)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_sigkill_under_load() {
    let ns = TestNamespace::new("crash").await;
    let store = std::env::temp_dir().join(format!("mailhook-store-{}", ns.name));
    survives_sigkills(&ns, &["--store-dir", &store.display().to_string()]).await;
    let _ = std::fs::remove_dir_all(store);
}

/// The same crash test on the PostgreSQL store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_sigkill_under_load_on_postgresql() {
    let ns = TestNamespace::new("crash-pg").await;
    // Over verified TLS: reconnecting after each kill includes the handshake.
    let url = crate::pg::verified(&crate::pg::database("crash").await);
    survives_sigkills(&ns, &["--store-url", &url]).await;
}

/// Sustained ingest while the operator is SIGKILLed three times: every acknowledged
/// event is delivered, duplicates bounded by what was in flight.
async fn survives_sigkills(ns: &TestNamespace, store_flags: &[&str]) {
    let receiver = Receiver::start(SIEM_SECRET);
    let mut operator = Operator::start_with(ns, store_flags).await;
    apply_siem(
        ns,
        &receiver.url("/hooks"),
        &format!(
            "  delivery: {{concurrency: {CONCURRENCY}, retrySchedule: [0s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]}}\n"
        ),
    );
    wait_ready(ns, "siem").await;

    // Sustained load: batches of 20 from a background task, until told to stop.
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ingest = operator.ingest;
    let loader = {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut batch = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ids: Vec<String> = (0..20).map(|i| format!("crash-{batch}-{i}")).collect();
                if post(&client, ingest, &ids).await {
                    accepted.lock().expect("lock").extend(ids);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                batch += 1;
            }
        })
    };

    const KILLS: usize = 3;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        operator.kill_and_restart().await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    loader.await.expect("loader");
    let accepted: BTreeSet<String> = accepted.lock().expect("lock").iter().cloned().collect();
    assert!(
        accepted.len() >= 200,
        "the load kept flowing across restarts: {} accepted",
        accepted.len()
    );

    let delivered = |got: &Vec<Received>| -> BTreeSet<String> {
        got.iter()
            .filter(|r| r.verified && r.answered == 200)
            .filter_map(Received::producer_event_id)
            .collect()
    };
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

    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for r in got.iter().filter(|r| r.answered == 200) {
        *per_id.entry(r.webhook_id.as_deref().unwrap_or("")).or_default() += 1;
    }
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {} accepted, {} delivered, {} duplicate deliveries over {KILLS} SIGKILLs",
        accepted.len(),
        per_id.len(),
        duplicates
    );
    // A completion is durable before its delivery slot frees, so a duplicate can only be a
    // delivery in flight at a kill: at most `concurrency` per kill.
    assert!(duplicates <= KILLS * CONCURRENCY, "{duplicates} duplicates");
    drop(operator);
}

#[tokio::test]
async fn a_long_outage_is_told_on_status_and_every_event_arrives_after() {
    let ns = TestNamespace::new("outage").await;
    let store = std::env::temp_dir().join(format!("mailhook-store-{}", ns.name));
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(503).await;
    let mut operator = Operator::start_with(&ns, &["--store-dir", &store.display().to_string()]).await;
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        "  delivery: {retrySchedule: [0s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]}\n",
    );
    wait_ready(&ns, "siem").await;
    let client = reqwest::Client::new();

    let first: Vec<String> = (0..30).map(|i| format!("outage-a-{i}")).collect();
    assert!(post(&client, operator.ingest, &first).await);
    eventually(
        "EndpointFailing, backlog 30",
        || whs(&ns, "siem"),
        |w| healthy(w, "EndpointFailing") && w.status.as_ref().is_some_and(|s| s.backlog == 30),
    )
    .await;

    // The outage outlasts a restart of the operator; the backlog grows.
    operator.kill_and_restart().await;
    let second: Vec<String> = (0..30).map(|i| format!("outage-b-{i}")).collect();
    assert!(post(&client, operator.ingest, &second).await);
    let w = eventually(
        "backlog grows to 60",
        || whs(&ns, "siem"),
        |w| w.status.as_ref().is_some_and(|s| s.backlog == 60),
    )
    .await;
    let status = w.status.expect("status");
    assert_eq!(status.last_failure.and_then(|f| f.http_status), Some(503));

    receiver.answer(200).await;
    eventually(
        "Healthy, backlog drained, 60 delivered",
        || whs(&ns, "siem"),
        |w| healthy(w, "EndpointHealthy") && w.status.as_ref().is_some_and(|s| s.backlog == 0 && s.delivered == 60),
    )
    .await;
    let got = receiver.deliveries().await;
    let delivered: BTreeSet<String> = got
        .iter()
        .filter(|r| r.answered == 200)
        .filter_map(Received::producer_event_id)
        .collect();
    let expected: BTreeSet<String> = first.into_iter().chain(second).collect();
    assert_eq!(delivered, expected);
    drop(operator);
    let _ = std::fs::remove_dir_all(store);
}

/// The deprecated `--max-backlog` no longer refuses ingest: it caps each subscription's
/// backlog. The event past the cap is accepted (202, nothing throttled) and goes to the
/// subscription's dead letters; nothing is lost: a replay delivers it once the endpoint is
/// back.
#[tokio::test]
async fn the_deprecated_max_backlog_caps_the_backlog_instead_of_refusing_and_loses_nothing() {
    let ns = TestNamespace::new("backpressure").await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(503).await;
    let operator = Operator::start_with(&ns, &["--max-backlog", "10"]).await;
    let log = operator.log();
    assert!(
        log.contains("--max-backlog 10 is deprecated") && log.contains("caps each subscription's backlog at 10 events"),
        "the start says what the flag does now:\n{log}"
    );
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        "  delivery: {retrySchedule: [0s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]}\n",
    );
    wait_ready(&ns, "siem").await;
    let client = reqwest::Client::new();
    let first: Vec<String> = (0..10).map(|i| format!("bp-{i}")).collect();
    assert!(
        post(&client, operator.ingest, &first).await,
        "up to the cap is accepted"
    );
    assert!(
        post(&client, operator.ingest, &["bp-over".to_string()]).await,
        "past the cap is accepted too: a full backlog refuses nothing"
    );
    let metrics = operator.metrics().await;
    assert!(!metrics.contains(r#"outcome="throttled""#), "{metrics}");

    let w = eventually(
        "Healthy=False/BacklogFull",
        || whs(&ns, "siem"),
        |w| healthy(w, "BacklogFull"),
    )
    .await;
    let (_, message) = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Healthy"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .expect("Healthy");
    assert!(message.contains("delivery.maxBacklog.events (10)"), "{message}");
    eventually(
        "the backlog at its cap (10) and the event past it dead-lettered",
        || whs(&ns, "siem"),
        |w| {
            w.status
                .as_ref()
                .is_some_and(|s| s.backlog == 10 && s.dead_lettered == 1)
        },
    )
    .await;
    let labels = format!(r#"{{namespace="{}",subscription="siem"}}"#, ns.name);
    assert_eq!(
        operator
            .metric(&format!("mailhook_backlog_overflowed_total{labels}"))
            .await,
        1.0
    );

    receiver.answer(200).await;
    eventually(
        "backlog drained",
        || whs(&ns, "siem"),
        |w| w.status.as_ref().is_some_and(|s| s.backlog == 0 && s.delivered == 10),
    )
    .await;
    let (ok, _, err) = crate::support::kubectl_run(
        &[
            "annotate",
            "-n",
            &ns.name,
            "webhooksubscription/siem",
            "mailhook.io/replay-requested-at=after-the-outage",
        ],
        None,
    );
    assert!(ok, "{err}");
    let got = eventually(
        "11 deliveries, the dead-lettered one replayed",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.answered == 200).count() == 11,
    )
    .await;
    assert!(got.iter().all(|r| r.verified));
    let delivered: BTreeSet<String> = got
        .iter()
        .filter(|r| r.answered == 200)
        .filter_map(Received::producer_event_id)
        .collect();
    assert!(delivered.contains("bp-over"), "{delivered:?}");
}

/// Sends `n` events (ids `{prefix}-{i}`), each acknowledged.
async fn send(operator: &Operator, prefix: &str, n: usize) -> BTreeSet<String> {
    let client = reqwest::Client::new();
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    assert!(
        post(&client, operator.ingest, &ids).await,
        "the events were acknowledged"
    );
    ids.into_iter().collect()
}

/// Deliveries answered 200 per webhook-id.
fn answered(got: &[Received]) -> BTreeMap<String, usize> {
    let mut per_id = BTreeMap::new();
    for r in got.iter().filter(|r| r.verified && r.answered == 200) {
        *per_id.entry(r.webhook_id.clone().unwrap_or_default()).or_default() += 1;
    }
    per_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_deliveries_in_flight_and_a_restart_delivers_the_rest() {
    let ns = TestNamespace::new("drain").await;
    let store = std::env::temp_dir().join(format!("mailhook-store-{}", ns.name));
    let receiver = Receiver::start(SIEM_SECRET);
    let flags = ["--store-dir", &store.display().to_string(), "--shutdown-timeout", "15s"];
    let mut operator = Operator::start_with(&ns, &flags).await;
    apply_siem(&ns, &receiver.url("/hooks"), "  delivery: {concurrency: 4}\n");
    wait_ready(&ns, "siem").await;
    // Each delivery takes a second: at SIGTERM four are in flight and the rest queued.
    receiver.mode(r#"{"delay": 1.0}"#).await;
    let sent = send(&operator, "drain", 40).await;
    eventually("deliveries in flight", || receiver.deliveries(), |d| !d.is_empty()).await;

    let status = operator
        .terminate(Duration::from_secs(20))
        .expect("exits within the shutdown deadline");
    assert!(status.success(), "a drain exits 0: {status:?}");
    let log = operator.log();
    assert!(
        log.contains("shut down cleanly: every task stopped"),
        "every task (shards, attempts, controllers, committer, servers) ended before the exit:\n{log}"
    );
    let before_restart = answered(&receiver.deliveries().await);
    assert!(
        before_restart.len() < sent.len(),
        "the drain took no new work: {before_restart:?}"
    );

    receiver.mode(r#"{"delay": 0}"#).await;
    operator.restart().await;
    let got = eventually(
        "every event delivered after the restart",
        || receiver.deliveries(),
        |d| answered(d).len() == sent.len(),
    )
    .await;
    // What was in flight at SIGTERM completed then (its completion durable before the
    // exit): nothing is delivered twice.
    let twice: Vec<_> = answered(&got).into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    drop(operator);
    let _ = std::fs::remove_dir_all(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_what_was_in_flight_is_due_after_the_restart() {
    let ns = TestNamespace::new("forced").await;
    let store = std::env::temp_dir().join(format!("mailhook-store-{}", ns.name));
    let receiver = Receiver::start(SIEM_SECRET);
    let flags = ["--store-dir", &store.display().to_string(), "--shutdown-timeout", "60s"];
    let mut operator = Operator::start_with(&ns, &flags).await;
    apply_siem(&ns, &receiver.url("/hooks"), "  delivery: {concurrency: 2}\n");
    wait_ready(&ns, "siem").await;
    // Deliveries hang far longer than anyone waits.
    receiver.mode(r#"{"delay": 120}"#).await;
    let sent = send(&operator, "forced", 6).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    operator.sigterm();
    assert!(
        operator.wait_exit(Duration::from_secs(2)).is_none(),
        "draining: still running"
    );
    let status = operator
        .terminate(Duration::from_secs(5))
        .expect("a second signal exits at once");
    assert_eq!(status.code(), Some(130), "a forced exit says so: {status:?}");
    assert!(operator.log().contains("second signal: exiting at once"));

    receiver.mode(r#"{"delay": 0}"#).await;
    operator.restart().await;
    eventually(
        "the abandoned deliveries are made after the restart",
        || receiver.deliveries(),
        |d| answered(d).len() == sent.len(),
    )
    .await;
    drop(operator);
    let _ = std::fs::remove_dir_all(store);
}

/// Unmounts a test's tmpfs when dropped (lazily: a process may still hold a file).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str]) -> bool {
    std::process::Command::new("mount")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// The store's volume fills up (a size-limited tmpfs, as a PVC fills) while the receiver is
/// down: ingest answers 507 naming the store and the process stays up; once the volume is
/// grown in place and the receiver is back, every acknowledged event is delivered and new
/// ones are taken — without a restart. (redb refuses every transaction after one failed
/// write until its file is opened again; the store does that by itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_refuses_new_events_and_delivers_every_acknowledged_one_once_grown() {
    let ns = TestNamespace::new("full-volume").await;
    let dir = std::env::temp_dir().join(format!("mailhook-volume-{}", ns.name));
    std::fs::create_dir_all(&dir).expect("mount point");
    let path = dir.display().to_string();
    assert!(
        mount(&["-t", "tmpfs", "-o", "size=4m", "tmpfs", &path]),
        "mounting a tmpfs at {path} needs root (CI runs as root)"
    );
    let _mounted = Mounted(dir.clone());
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(503).await;
    let store = dir.join("store").display().to_string();
    let operator = Operator::start_with(&ns, &["--store-dir", &store]).await;
    // Retries every 2 s for as long as the test needs: nothing reaches the dead letters.
    let schedule = vec!["2s"; 32].join(", ");
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        &format!("  delivery: {{retrySchedule: [{schedule}]}}\n"),
    );
    wait_ready(&ns, "siem").await;

    let client = reqwest::Client::new();
    let subject = "x".repeat(12 * 1024);
    let mut accepted = BTreeSet::new();
    let mut refused = None;
    for batch in 0..400 {
        let ids: Vec<String> = (0..20).map(|i| format!("vol-{batch}-{i}")).collect();
        let body: String = ids
            .iter()
            .map(|id| {
                let mut e = siem_event(id);
                e["subject"] = subject.clone().into();
                format!("{e}\n")
            })
            .collect();
        let r = client
            .post(format!("http://{}/v1/events", operator.ingest))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("request");
        match r.status().as_u16() {
            202 => accepted.extend(ids),
            status => {
                refused = Some((status, r.text().await.unwrap_or_default()));
                break;
            }
        }
    }
    let (status, answer) = refused.expect("the 4 MiB volume never filled");
    assert_eq!(status, 507, "a full volume is Insufficient Storage: {answer}");
    assert!(answer.contains("store"), "the answer names the store: {answer}");
    assert!(
        !accepted.is_empty(),
        "some events were taken before the volume was full"
    );
    eventually(
        "the store reported down",
        || operator.metrics(),
        |m| m.contains("mailhook_store_up 0"),
    )
    .await;

    let metrics = eventually(
        "the volume's size in the metrics",
        || operator.metrics(),
        |m| m.contains("mailhook_store_volume_bytes 4194304"),
    )
    .await;
    assert!(metrics.contains("mailhook_store_volume_available_bytes"), "{metrics}");

    // The receiver comes back while the volume is still full: deliveries drain (their
    // writes use pages the file holds), new events stay refused — no flapping.
    receiver.answer(200).await;
    let delivered = |got: &Vec<Received>| -> BTreeSet<String> {
        got.iter()
            .filter(|r| r.verified && r.answered == 200)
            .filter_map(Received::producer_event_id)
            .collect()
    };
    let early = eventually(
        "deliveries on the full volume",
        || async { delivered(&receiver.deliveries().await).len() },
        |n| *n >= 20,
    )
    .await;
    let again = client
        .post(format!("http://{}/v1/events", operator.ingest))
        .bearer_auth(INGEST_TOKEN)
        .header("content-type", "application/x-ndjson")
        .body(format!("{}\n", siem_event("vol-while-full")))
        .send()
        .await
        .expect("request");
    let status = again.status().as_u16();
    assert_eq!(
        status,
        507,
        "still full: refused again ({})",
        again.text().await.unwrap_or_default()
    );

    // The volume is grown in place: no restart.
    assert!(mount(&["-o", "remount,size=256m", &path]), "remount");
    eventually(
        "every acknowledged event delivered after the volume was grown",
        || async {
            let got = receiver.deliveries().await;
            accepted
                .difference(&delivered(&got))
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
        },
        |missing| missing.is_empty(),
    )
    .await;
    // The store looks at the volume every second while it is full: taken within that.
    eventually(
        "new events taken again",
        || async { post(&client, operator.ingest, &["vol-after".to_string()]).await },
        |taken| *taken,
    )
    .await;
    assert!(
        dir.join("store/space-reserve").exists(),
        "the space reserve released while full is held again"
    );
    assert!(
        operator.log().contains("released its space reserve"),
        "the reserve was given to the deliveries while full"
    );
    assert!(
        operator.log().contains("store file opened again"),
        "the store reopened its file by itself"
    );
    eventually(
        "the grown volume in the metrics",
        || operator.metrics(),
        |m| m.contains("mailhook_store_volume_bytes 268435456"),
    )
    .await;
    eprintln!(
        "full volume: {} events acknowledged before it filled, {early} delivered while it was full, all after it grew",
        accepted.len()
    );
}
