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
    let receiver = Receiver::start(SIEM_SECRET);
    let mut operator = Operator::start_with(&ns, &["--store-dir", &store.display().to_string()]).await;
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        &format!(
            "  delivery: {{concurrency: {CONCURRENCY}, retrySchedule: [0s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]}}\n"
        ),
    );
    wait_ready(&ns, "siem").await;

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
    let _ = std::fs::remove_dir_all(store);
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

#[tokio::test]
async fn a_full_backlog_refuses_new_events_with_429_and_loses_nothing() {
    let ns = TestNamespace::new("backpressure").await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(503).await;
    let operator = Operator::start_with(&ns, &["--max-backlog", "10"]).await;
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
        "up to the limit is accepted"
    );

    let refused = client
        .post(format!("http://{}/v1/events", operator.ingest))
        .bearer_auth(INGEST_TOKEN)
        .header("content-type", "application/json")
        .body(siem_event("bp-over").to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains(r#"mailhook_events_ingested_total{outcome="throttled",source="http"} 1"#),
        "{metrics}"
    );

    receiver.answer(200).await;
    eventually(
        "backlog drained",
        || whs(&ns, "siem"),
        |w| w.status.as_ref().is_some_and(|s| s.backlog == 0 && s.delivered == 10),
    )
    .await;
    assert!(
        post(&client, operator.ingest, &["bp-over".to_string()]).await,
        "accepted again once drained"
    );
    let got = eventually(
        "11 deliveries",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.answered == 200).count() == 11,
    )
    .await;
    assert!(got.iter().all(|r| r.verified));
}
