//! Per-subscription backlog caps (`delivery.maxBacklog`): one subscriber's full backlog
//! sends its own new events to its dead letters and never makes ingest refuse anyone's
//! mail.

use std::collections::BTreeSet;

use mailhook::api::WebhookSubscription;
use serde_json::Value;

use crate::support::{
    Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply, condition, eventually, mailhook, siem_event,
    signing_secret, subscription, wait_ready, whs,
};

const ADMIN_TOKEN: &str = "test-admin-token";

/// The Healthy condition's (reason, message).
fn healthy(w: &WebhookSubscription) -> Option<(String, String)> {
    w.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Healthy")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

fn counts(w: &WebhookSubscription) -> (u64, u64, u64) {
    w.status
        .as_ref()
        .map_or((0, 0, 0), |s| (s.backlog, s.dead_lettered, s.delivered))
}

#[tokio::test]
async fn one_subscription_at_its_max_backlog_while_another_keeps_being_accepted_and_delivered() {
    let ns = TestNamespace::new("max-backlog").await;
    let tokens = std::env::temp_dir().join(format!("mailhook-admin-token-{}", ns.name));
    std::fs::write(&tokens, format!("{ADMIN_TOKEN}\n")).expect("write token file");
    let tokens = tokens.display().to_string();
    let down = Receiver::start(SIEM_SECRET);
    down.answer(503).await;
    let up = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--admin-token-file", &tokens]).await;
    // The default retry schedule: nothing of `full`'s backlog is given up within the test,
    // so every dead letter is one the cap made.
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &subscription(
                "full",
                &down.url("/hooks"),
                "",
                "  delivery: {maxBacklog: {events: 5}}\n",
            )
            + &subscription("healthy", &up.url("/hooks"), "", "")),
    );
    wait_ready(&ns, "full").await;
    wait_ready(&ns, "healthy").await;

    // Twenty requests of one event each: every one is answered on its own.
    let ids: Vec<String> = (0..20).map(|i| format!("cap-{i}")).collect();
    for id in &ids {
        let (status, body) = operator.ingest(&[siem_event(id)]).await;
        assert_eq!(status, 202, "{id} accepted whatever full's backlog holds: {body}");
    }
    let metrics = operator.metrics().await;
    assert!(
        !metrics.contains(r#"outcome="throttled""#),
        "nothing refused:\n{metrics}"
    );

    let got = eventually(
        "healthy received all 20",
        || up.deliveries(),
        |d| {
            d.iter()
                .filter(|r| r.answered == 200 && r.verified)
                .filter_map(Received::producer_event_id)
                .collect::<BTreeSet<_>>()
                .len()
                == 20
        },
    )
    .await;
    let delivered: BTreeSet<String> = got.iter().filter_map(Received::producer_event_id).collect();
    assert_eq!(delivered, ids.iter().cloned().collect::<BTreeSet<_>>());
    eventually(
        "healthy's status: 20 delivered, nothing waiting or dead",
        || whs(&ns, "healthy"),
        |w| counts(w) == (0, 0, 20) && condition(w, "Healthy").is_some_and(|(s, _)| s == "True"),
    )
    .await;

    // full's status says its backlog is at the cap, what happens and what to do.
    let w = eventually(
        "full Healthy=False/BacklogFull, with the endpoint's failure",
        || whs(&ns, "full"),
        |w| healthy(w).is_some_and(|(reason, message)| reason == "BacklogFull" && message.contains("HTTP 503")),
    )
    .await;
    let (_, message) = healthy(&w).expect("Healthy");
    for part in [
        "delivery.maxBacklog.events (5)",
        "go straight to its dead letters",
        "HTTP 503",
        "raise delivery.maxBacklog",
        "replay",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    let labels = |name: &str| format!(r#"{{namespace="{}",subscription="{name}"}}"#, ns.name);
    assert_eq!(
        operator
            .metric(&format!("mailhook_backlog_full{}", labels("full")))
            .await,
        1.0
    );
    assert_eq!(
        operator
            .metric(&format!("mailhook_backlog_full{}", labels("healthy")))
            .await,
        0.0
    );

    // What the store does with the cap: five wait, fifteen are dead letters naming it; the
    // backlog's size and age are on status.
    let w = eventually(
        "full: a backlog of 5 and 15 dead letters",
        || whs(&ns, "full"),
        |w| counts(w) == (5, 15, 0),
    )
    .await;
    let status = w.status.as_ref().expect("status");
    assert!(
        status.backlog_bytes > 0 && status.oldest_pending_time.is_some(),
        "{status:?}"
    );
    let target = format!("{}/full", ns.name);
    let admin = format!("http://{}", operator.admin);
    let (ok, out, err) = mailhook(&[
        "dead-letters",
        &target,
        "-o",
        "json",
        "--admin-url",
        &admin,
        "--token-file",
        &tokens,
    ]);
    assert!(ok, "{err}");
    let dead: Vec<Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(dead.len(), 15, "{out}");
    assert!(
        dead.iter()
            .all(|d| d["reason"].as_str().is_some_and(|r| r.contains("delivery.maxBacklog"))),
        "{out}"
    );
    assert_eq!(
        operator
            .metric(&format!("mailhook_backlog_overflowed_total{}", labels("full")))
            .await,
        15.0
    );
    let _ = std::fs::remove_file(&tokens);
}
