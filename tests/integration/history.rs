//! Dead letters and the attempt log: replay by annotation and by the `mailhook` CLI over
//! the authenticated admin API, expiry by maxEventAge, and purge by retention.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use mailhook::api::WebhookSubscription;
use serde_json::Value;

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply_siem, eventually, kubectl_run, mailhook, siem_event,
    wait_ready, whs,
};

const ADMIN_TOKEN: &str = "test-admin-token";

fn token_file(ns: &TestNamespace, token: &str) -> String {
    let path = std::env::temp_dir().join(format!("mailhook-admin-token-{}-{}", ns.name, token.len()));
    std::fs::write(&path, format!("{token}\n")).expect("write token file");
    path.display().to_string()
}

fn counts(w: &WebhookSubscription) -> (u64, u64, u64) {
    w.status
        .as_ref()
        .map_or((0, 0, 0), |s| (s.backlog, s.dead_lettered, s.delivered))
}

#[tokio::test]
async fn dead_letters_replay_by_annotation_and_by_the_cli_with_authentication() {
    let ns = TestNamespace::new("replay").await;
    let store = std::env::temp_dir().join(format!("mailhook-store-{}", ns.name));
    let tokens = token_file(&ns, ADMIN_TOKEN);
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(500).await;
    let operator = Operator::start_with(
        &ns,
        &[
            "--store-dir",
            &store.display().to_string(),
            "--admin-token-file",
            &tokens,
        ],
    )
    .await;
    apply_siem(&ns, &receiver.url("/hooks"), "  delivery: {retrySchedule: [0s, 0s]}\n");
    wait_ready(&ns, "siem").await;
    let (status, body) = operator.ingest(&[siem_event("dl-1"), siem_event("dl-2")]).await;
    assert_eq!(status, 202, "{body}");
    eventually(
        "two dead letters on status",
        || whs(&ns, "siem"),
        |w| counts(w) == (0, 2, 0),
    )
    .await;

    let admin = format!("http://{}", operator.admin);
    let target = format!("{}/siem", ns.name);
    let base = ["--admin-url", admin.as_str(), "--token-file", tokens.as_str()];

    let (ok, out, err) = mailhook(&[&["dead-letters", target.as_str(), "-o", "json"][..], &base[..]].concat());
    assert!(ok, "{err}");
    let dead: Vec<Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(dead.len(), 2, "{out}");
    assert!(
        dead.iter().all(|d| d["attempts"] == 2
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("retries exhausted") && r.contains("HTTP 500"))),
        "{out}"
    );

    let (ok, out, err) = mailhook(&[&["attempts", target.as_str(), "--since", "1h"][..], &base[..]].concat());
    assert!(ok, "{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "two attempts per event, newest first:\n{out}");
    assert!(
        rows.iter().all(|r| r.contains(" 500 ") && r.contains("HTTP 500")),
        "{out}"
    );

    // Authentication: a wrong token is refused with 401, and nothing is replayed.
    let wrong = token_file(&ns, "not-the-token");
    let (ok, _, err) = mailhook(&["replay", &target, "--admin-url", &admin, "--token-file", &wrong]);
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, _, err) = mailhook(&[&["replay", "no-such-namespace/siem"][..], &base[..]].concat());
    assert!(
        !ok && err.contains("404") && err.contains("no WebhookSubscription"),
        "{err}"
    );
    let (ok, _, err) = mailhook(&[&["attempts", target.as_str(), "--since", "yesterday"][..], &base[..]].concat());
    assert!(!ok && err.contains("400") && err.contains("RFC 3339"), "{err}");
    assert_eq!(counts(&whs(&ns, "siem").await).1, 2);

    // The Kubernetes way: a new annotation value replays once; the outcome goes on status.
    receiver.answer(200).await;
    let (ok, _, err) = kubectl_run(
        &[
            "annotate",
            "-n",
            &ns.name,
            "webhooksubscription/siem",
            "mailhook.io/replay-requested-at=first",
            "mailhook.io/replay-since=1h",
        ],
        None,
    );
    assert!(ok, "{err}");
    let w = eventually(
        "replayed and delivered",
        || whs(&ns, "siem"),
        |w| {
            counts(w) == (0, 0, 2)
                && w.status
                    .as_ref()
                    .and_then(|s| s.last_replay.as_ref())
                    .is_some_and(|r| r.requested_at == "first")
        },
    )
    .await;
    let replay = w.status.and_then(|s| s.last_replay).expect("lastReplay");
    assert_eq!(replay.replayed, 2);
    assert!(
        replay.since.is_some() && replay.message.contains("Queued 2"),
        "{replay:?}"
    );
    let events = ns
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .expect("list events");
    assert!(
        events.items.iter().any(|e| e.reason.as_deref() == Some("Replayed")),
        "a Replayed Event is recorded"
    );

    // A third event dies; the CLI replays it.
    receiver.answer(500).await;
    assert_eq!(operator.ingest(&[siem_event("dl-3")]).await.0, 202);
    eventually("a new dead letter", || whs(&ns, "siem"), |w| counts(w).1 == 1).await;
    receiver.answer(200).await;
    let (ok, out, err) = mailhook(&[&["replay", target.as_str(), "--since", "1h"][..], &base[..]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("1 dead letter(s) queued"), "{out}");
    eventually("all three delivered", || whs(&ns, "siem"), |w| counts(w) == (0, 0, 3)).await;

    let got = receiver.deliveries().await;
    let mut ok_ids: Vec<String> = got
        .iter()
        .filter(|r| r.answered == 200 && r.verified)
        .filter_map(crate::support::Received::producer_event_id)
        .collect();
    ok_ids.sort();
    assert_eq!(
        ok_ids,
        ["dl-1", "dl-2", "dl-3"],
        "each replayed event is delivered once"
    );
    drop(operator);
    let _ = std::fs::remove_dir_all(store);
}

#[tokio::test]
async fn the_history_api_answers_no_one_without_a_token() {
    let ns = TestNamespace::new("history-off").await;
    let operator = Operator::start(&ns).await;
    let r = reqwest::get(format!(
        "http://{}/v1/subscriptions/{}/siem/dead-letters",
        operator.admin, ns.name
    ))
    .await
    .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body = r.text().await.expect("body");
    assert!(
        body.contains("a Kubernetes token") && body.contains("--admin-token-file"),
        "{body}"
    );
}

#[tokio::test]
async fn undelivered_events_expire_by_max_event_age_then_go_by_dead_letter_retention() {
    let ns = TestNamespace::new("expiry").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--housekeeping-interval", "1s"]).await;
    // Paused: nothing is attempted, so only expiry can end the delivery.
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        "  paused: true\n  delivery: {maxEventAge: 2s, deadLetterRetention: 8s}\n",
    );
    eventually(
        "siem reconciled",
        || whs(&ns, "siem"),
        |w| w.status.as_ref().is_some_and(|s| !s.conditions.is_empty()),
    )
    .await;
    assert_eq!(operator.ingest(&[siem_event("old-1")]).await.0, 202);
    eventually(
        "expired to a dead letter",
        || whs(&ns, "siem"),
        |w| counts(w) == (0, 1, 0),
    )
    .await;
    eventually(
        "purged after deadLetterRetention",
        || whs(&ns, "siem"),
        |w| counts(w) == (0, 0, 0),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        receiver.deliveries().await.is_empty(),
        "a paused subscription sends nothing"
    );
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains(r#"mailhook_store_purged_total{kind="dead_letter"} 1"#),
        "{metrics}"
    );
}
