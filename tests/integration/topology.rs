//! Correct under the inputs and topologies users run: several watched namespaces routed as
//! one, non-ASCII mail through every kind of filter, no queue orphaned by a subscription
//! deleted while the operator was down, kstatus-readable conditions for invalid specs.

use std::time::Duration;

use mailhook::api::MailboxFilter;
use serde_json::json;

use crate::support::{
    Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply, apply_siem, condition, eventually, kubectl_run,
    siem_event, signing_secret, wait_ready, whs,
};

/// A filter on the finance mailboxes with a subject keyword, and a subscription using it.
fn finance(ns: &TestNamespace, url: &str, keyword: &str) {
    apply(
        ns,
        &format!(
            "{}apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: finance}}\nspec:\n  \
             mailboxes: ['*@finance.example.com']\n  subject: {{keywords: [{keyword}]}}\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: finance}}\nspec:\n  \
             endpoint: {{url: '{url}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             filterRefs: [finance]\n",
            signing_secret(SIEM_SECRET)
        ),
    );
}

/// The `siem` fixture's event (to alice@finance.example.com) with `subject`.
fn finance_event(id: &str, subject: &str) -> serde_json::Value {
    let mut event = siem_event(id);
    event["subject"] = json!(subject);
    event
}

async fn deliveries_with(receiver: &Receiver, want: usize, what: &str) {
    eventually(
        what,
        || receiver.deliveries(),
        |d| d.len() >= want && d.iter().all(|r| r.verified),
    )
    .await;
}

#[tokio::test]
async fn two_watched_namespaces_route_as_one() {
    let a = TestNamespace::new("ns-a").await;
    let b = TestNamespace::new("ns-b").await;
    let (ra, rb) = (Receiver::start(SIEM_SECRET), Receiver::start(SIEM_SECRET));
    let operator = Operator::start_with(&a, &["--watch-namespace", &b.name]).await;
    finance(&a, &ra.url("/a"), "invoice");
    finance(&b, &rb.url("/b"), "invoice");
    wait_ready(&a, "finance").await;
    wait_ready(&b, "finance").await;

    let (status, body) = operator.ingest(&[finance_event("both-1", "Invoice 1")]).await;
    assert_eq!(status, 202, "{body}");
    deliveries_with(&ra, 1, "namespace a got the event").await;
    deliveries_with(&rb, 1, "namespace b got the event").await;

    // A rebuild in one namespace (its filter edited) must leave the other's routes alone.
    finance(&a, &ra.url("/a"), "contract");
    eventually(
        "a's filter at its new generation",
        || async { a.api::<MailboxFilter>().get("finance").await.expect("get filter") },
        |f| f.status.as_ref().and_then(|s| s.observed_generation) == f.metadata.generation,
    )
    .await;
    for i in 2..=4 {
        let (status, body) = operator
            .ingest(&[finance_event(&format!("both-{i}"), &format!("Invoice {i}"))])
            .await;
        assert_eq!(status, 202, "{body}");
    }
    deliveries_with(&rb, 4, "namespace b keeps getting invoices after a's filter changed").await;
    let (status, _) = operator.ingest(&[finance_event("contract-1", "Contract draft")]).await;
    assert_eq!(status, 202);
    deliveries_with(&ra, 2, "namespace a now gets contracts").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ra.deliveries().await.len(), 2, "and no longer invoices");
    assert_eq!(rb.deliveries().await.len(), 4, "b does not get contracts");

    // Match counters and status are written for both namespaces.
    for ns in [&a, &b] {
        eventually(
            &format!("{} filter counts its matches", ns.name),
            || async { ns.api::<MailboxFilter>().get("finance").await.expect("get filter") },
            |f| {
                f.status
                    .as_ref()
                    .is_some_and(|s| s.matched_messages > 0 && s.subscriptions == ["finance"])
            },
        )
        .await;
    }
    // Deleting a's subscription garbage-collects a only.
    let (ok, _, err) = kubectl_run(&["delete", "whs", "finance", "-n", &a.name], None);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = operator.ingest(&[finance_event("both-5", "Invoice 5")]).await;
    assert_eq!(status, 202);
    deliveries_with(&rb, 5, "b still routed after a's subscription was deleted").await;
}

#[tokio::test]
async fn non_ascii_mail_matches_domain_glob_keyword_and_regex_filters() {
    let ns = TestNamespace::new("utf8").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    let filters = [
        ("domain", "domains: [bücher.example]"),
        ("punycode-domain", "domains: [xn--bcher-kva.example]"),
        // 13 bytes against the sender's 15-byte bücher.example: a suffix slice would start
        // inside the ü (the panic that refused such events with 503 every time).
        ("lookalike", "domains: [xcher.example]"),
        (
            "glob",
            "senders: ['jürgen@*.example']\n  recipients: ['*@straße.example']",
        ),
        ("keyword", "subject: {keywords: [Größe]}"),
        ("regex", "subject: {regex: '^Rechnung Nr\\. \\d+ – fällig$'}"),
        ("mailbox", "mailboxes: ['zoë@straße.example']"),
    ];
    let mut yaml = signing_secret(SIEM_SECRET);
    for (name, criteria) in filters {
        yaml.push_str(&format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: {name}}}\nspec:\n  {criteria}\n---\n"
        ));
    }
    yaml.push_str(&format!(
        "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: siem}}\nspec:\n  \
         endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
         filterRefs: [{}]\n",
        receiver.url("/hooks"),
        filters.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    ));
    apply(&ns, &yaml);
    wait_ready(&ns, "siem").await;

    let event = json!({"type": "message.received", "eventId": "utf8-1", "mailbox": "zoë@straße.example",
        "from": "Jürgen@Bücher.Example", "to": ["zoë@straße.example"], "cc": ["李@例え.テスト"],
        "subject": "Rechnung Nr. 4711 – fällig", "headers": {"X-Größe": "groß"}});
    let (status, body) = operator.ingest(&[event]).await;
    assert_eq!(status, 202, "{body}");
    deliveries_with(&receiver, 1, "the non-ASCII event delivered").await;
    let data = receiver.deliveries().await[0].json()["data"].clone();
    let mut matched: Vec<String> = data["matchedFilters"]
        .as_array()
        .expect("matched filters")
        .iter()
        .map(|f| f.as_str().unwrap_or_default().to_string())
        .collect();
    matched.sort();
    assert_eq!(
        matched,
        ["domain", "glob", "mailbox", "punycode-domain", "regex"],
        "every filter but the keyword one (the subject has no Größe) and the look-alike domain: {data}"
    );
    assert_eq!(data["subject"], "Rechnung Nr. 4711 – fällig");

    // A subject with the keyword, in another case: the keyword filter too.
    let second = json!({"type": "message.received", "eventId": "utf8-2", "mailbox": "zoë@straße.example",
        "from": "info@ünïcödé.example", "to": ["zoë@straße.example"], "subject": "GRÖSSE und größe"});
    let (status, body) = operator.ingest(&[second]).await;
    assert_eq!(status, 202, "{body}");
    eventually("the second event delivered", || receiver.deliveries(), |d| d.len() == 2).await;
    let metrics = operator.metrics().await;
    assert!(
        !metrics.lines().any(|l| l.starts_with("mailhook_panics_total")),
        "no panic was caught:\n{metrics}"
    );
}

#[tokio::test]
async fn a_subscription_deleted_while_the_operator_is_down_leaves_no_queue() {
    let ns = TestNamespace::new("orphan").await;
    // A second namespace, watched at first, then taken out of --watch-namespace: its
    // subscription still exists, so its queue must be kept.
    let other = TestNamespace::new("orphan-kept").await;
    let store = std::env::temp_dir().join(format!("mailhook-store-{}", ns.name));
    let _ = std::fs::remove_dir_all(&store);
    let store_arg = store.display().to_string();
    let receiver = Receiver::start(SIEM_SECRET);
    let mut operator = Operator::start_with(&ns, &["--watch-namespace", &other.name, "--store-dir", &store_arg]).await;
    for n in [&ns, &other] {
        apply_siem(n, &receiver.url("/hooks"), "  paused: true\n");
        eventually(
            &format!("{}/siem Ready=False/Paused", n.name),
            || whs(n, "siem"),
            |w| condition(w, "Ready").is_some_and(|(_, r)| r == "Paused"),
        )
        .await;
    }
    let events: Vec<_> = (0..5).map(|i| siem_event(&format!("orphan-{i}"))).collect();
    let (status, body) = operator.ingest(&events).await;
    assert_eq!(status, 202, "{body}");
    eventually(
        "the store holds 5 waiting deliveries for each namespace",
        || operator.metric("mailhook_store_backlog"),
        |v| *v == 10.0,
    )
    .await;

    operator.kill();
    let (ok, _, err) = kubectl_run(&["delete", "whs", "siem", "-n", &ns.name], None);
    assert!(ok, "{err}");
    operator.restart_without(&["--watch-namespace", &other.name]).await;
    eventually(
        "the orphaned queue is dropped once the caches are synced",
        || operator.metric("mailhook_store_purged_total{kind=\"orphaned_subscription\"}"),
        |v| *v == 1.0,
    )
    .await;
    assert_eq!(
        operator
            .metric("mailhook_store_purged_total{kind=\"orphaned_delivery\"}")
            .await,
        5.0
    );
    eventually(
        "the store keeps only the unwatched namespace's 5",
        || operator.metric("mailhook_store_backlog"),
        |v| *v == 5.0,
    )
    .await;
    let log = operator.log();
    assert!(log.contains("no longer exists"), "the drop is logged:\n{log}");
    assert!(
        log.contains("outside the watched namespaces"),
        "the kept queue is logged:\n{log}"
    );
    // A new subscription of the same name is a new one: it gets events, none of the orphan's.
    apply_siem(&ns, &receiver.url("/hooks"), "");
    eventually(
        "the new siem Ready=True",
        || whs(&ns, "siem"),
        |w| condition(w, "Ready").is_some_and(|(s, _)| s == "True"),
    )
    .await;
    let (status, body) = operator.ingest(&[siem_event("after-restart")]).await;
    assert_eq!(status, 202, "{body}");
    let got = eventually("delivered", || receiver.deliveries(), |d| !d.is_empty()).await;
    assert_eq!(
        got.iter().filter_map(Received::producer_event_id).collect::<Vec<_>>(),
        ["after-restart"],
        "only the new event: the orphan's were dropped"
    );
    drop(operator);
    let _ = std::fs::remove_dir_all(&store);
}

#[tokio::test]
async fn invalid_specs_are_stalled_for_kstatus_readers() {
    let ns = TestNamespace::new("stalled").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    apply(
        &ns,
        &format!(
            "{}apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: broken}}\nspec:\n  \
             endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             filterRefs: [missing]\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: bad-regex}}\nspec:\n  \
             subject: {{regex: '('}}\n",
            signing_secret(SIEM_SECRET),
            receiver.url("/hooks")
        ),
    );
    // What Flux, Argo CD and kstatus read: Stalled=True.
    for object in ["whs/broken", "mbf/bad-regex"] {
        let (ok, out, err) = kubectl_run(
            &[
                "wait",
                "-n",
                &ns.name,
                "--for=condition=Stalled",
                "--timeout=60s",
                object,
            ],
            None,
        );
        assert!(ok, "kubectl wait --for=condition=Stalled {object}: {out}{err}");
    }
    let w = whs(&ns, "broken").await;
    assert_eq!(condition(&w, "Ready"), Some(("False".into(), "FilterNotFound".into())));
    assert_eq!(condition(&w, "Stalled"), Some(("True".into(), "FilterNotFound".into())));
    assert_eq!(condition(&w, "Reconciling"), None);
    let (ok, out, err) = kubectl_run(&["get", "whs", "broken", "-n", &ns.name, "-o", "wide"], None);
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap_or_default().split_whitespace().collect();
    let row: Vec<&str> = out.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    let stalled = header
        .iter()
        .position(|h| *h == "STALLED")
        .expect("a STALLED column in -o wide");
    assert_eq!(row.get(stalled), Some(&"True"), "{out}");

    // Stalled waits for a change: no reconcile on a timer meanwhile (errors requeue every 5 s).
    let reconciles = r#"mailhook_reconcile_duration_seconds_count{kind="WebhookSubscription"}"#;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = operator.metric(reconciles).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        operator.metric(reconciles).await,
        before,
        "a stalled subscription is not requeued"
    );

    // Fixed by creating the filter: Stalled goes away, Ready turns True.
    apply(
        &ns,
        "apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {name: missing}\nspec:\n  directions: [inbound]\n",
    );
    wait_ready(&ns, "broken").await;
    let w = whs(&ns, "broken").await;
    assert_eq!(condition(&w, "Stalled"), None, "{:?}", w.status);
}
