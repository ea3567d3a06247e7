//! The tenant boundary: a namespace receives only what a cluster admin granted it with a
//! MailboxGrant, at most as fully as the grant covering each event allows; no grant means
//! Ready=False/NotGranted and nothing queued; a revoked grant stops what was queued; a
//! filter in an ungranted namespace learns nothing of other namespaces' mail; the history
//! API answers a namespace user only about that namespace.

use std::time::Duration;

use mailhook::api::{MailboxFilter, WebhookSubscription};
use serde_json::{Value, json};

use crate::support::{
    Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply, eventually, kubectl_run, signing_secret,
    subscription, wait_ready, whs,
};

/// An ingest event of `mailbox`, with producer id `id`.
fn event(id: &str, mailbox: &str) -> Value {
    json!({"type": "message.received", "eventId": id, "mailbox": mailbox,
           "from": "sender@partner.example", "to": [mailbox], "subject": format!("subject of {id}")})
}

/// The verified, accepted deliveries' bodies.
fn accepted(got: &[Received]) -> Vec<Value> {
    got.iter()
        .filter(|r| r.verified && r.answered == 200)
        .map(|r| r.json())
        .collect()
}

/// (status, reason, message) of the Ready condition.
fn ready(w: &WebhookSubscription) -> (String, String, String) {
    w.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

async fn wait_not_granted(ns: &TestNamespace, name: &str) -> String {
    let w = eventually(
        &format!("{}/{name} Ready=False/NotGranted", ns.name),
        || whs(ns, name),
        |w| {
            let (status, reason, _) = ready(w);
            status == "False"
                && reason == "NotGranted"
                && w.status.as_ref().and_then(|s| s.observed_generation) == w.metadata.generation
        },
    )
    .await;
    ready(&w).2
}

/// An operator watching every namespace of `namespaces`.
async fn operator_for(namespaces: &[&TestNamespace], extra: &[&str]) -> Operator {
    let mut flags: Vec<&str> = Vec::new();
    for ns in namespaces.iter().skip(1) {
        flags.extend(["--watch-namespace", ns.name.as_str()]);
    }
    flags.extend_from_slice(extra);
    Operator::start_with(namespaces[0], &flags).await
}

#[tokio::test]
async fn a_namespace_receives_only_its_granted_mail_and_nothing_without_a_grant() {
    let a = TestNamespace::ungranted("grant-a").await;
    let b = TestNamespace::ungranted("grant-b").await;
    let grant_a = format!("{}-finance", a.name);
    a.grant(
        &grant_a,
        r#"{"mailboxes": ["*@finance.example"], "maxPayloadMode": "full"}"#,
    )
    .await;
    let (ra, rb) = (Receiver::start(SIEM_SECRET), Receiver::start(SIEM_SECRET));
    let mut operator = operator_for(&[&a, &b], &[]).await;
    apply(
        &a,
        &(signing_secret(SIEM_SECRET) + &subscription("all", &ra.url("/a"), "", "")),
    );
    apply(
        &b,
        &(signing_secret(SIEM_SECRET) + &subscription("all", &rb.url("/b"), "", "  payload: {mode: metadata}\n")),
    );
    wait_ready(&a, "all").await;
    let message = wait_not_granted(&b, "all").await;
    assert!(
        message.contains(&format!("No MailboxGrant covers namespace {}", b.name))
            && message.contains("ask a cluster admin"),
        "{message}"
    );
    assert_eq!(
        whs(&a, "all").await.status.map(|s| s.grants),
        Some(vec![grant_a.clone()])
    );

    let events: Vec<Value> = (0..3)
        .map(|i| event(&format!("fin-{i}"), &format!("user{i}@finance.example")))
        .chain((0..3).map(|i| event(&format!("ceo-{i}"), "ceo@example.com")))
        .collect();
    let (status, body) = operator.ingest(&events).await;
    assert_eq!(status, 202, "{body}");
    let got = eventually(
        "a gets the finance events",
        || ra.deliveries(),
        |d| accepted(d).len() >= 3,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got_a = accepted(&ra.deliveries().await);
    assert_eq!(got_a.len(), 3, "exactly the finance events: {got:?}");
    assert!(
        got_a.iter().all(|e| e["data"]["mailbox"]
            .as_str()
            .is_some_and(|m| m.ends_with("@finance.example"))),
        "{got_a:?}"
    );
    assert!(
        rb.deliveries().await.is_empty(),
        "an ungranted namespace receives nothing"
    );

    // A grant for b makes it flow; its deletion stops it again.
    let grant_b = format!("{}-all", b.name);
    b.grant(&grant_b, r#"{"mailboxes": ["*"]}"#).await;
    wait_ready(&b, "all").await;
    let (status, _) = operator.ingest(&[event("after-grant", "ceo@example.com")]).await;
    assert_eq!(status, 202);
    let got_b = eventually(
        "b receives once granted",
        || rb.deliveries(),
        |d| accepted(d).len() == 1,
    )
    .await;
    let delivered = &accepted(&got_b)[0]["data"];
    assert_eq!(
        delivered["mailboxDomain"], "example.com",
        "b asks for metadata: {delivered}"
    );
    assert!(
        delivered.get("mailbox").is_none() && delivered.get("subject").is_none(),
        "{delivered}"
    );

    b.revoke(&grant_b).await;
    wait_not_granted(&b, "all").await;
    let (status, _) = operator.ingest(&[event("after-revoke", "ceo@example.com")]).await;
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        accepted(&rb.deliveries().await).len(),
        1,
        "nothing after the grant is gone"
    );
    let listed = kubectl_run(&["get", "mbg", &grant_a], None);
    assert!(
        listed.0 && listed.1.contains(&a.name) && listed.1.contains("*@finance.example"),
        "kubectl get mbg shows the namespaces and mailboxes: {listed:?}"
    );

    // After an upgrade (a restart) the log names the namespaces left without a grant.
    operator.kill_and_restart().await;
    let log = operator.log();
    assert!(
        log.lines()
            .any(|l| l.contains("no MailboxGrant") && l.contains(&b.name) && !l.contains(&a.name)),
        "{log}"
    );
}

#[tokio::test]
async fn each_event_goes_out_at_the_ceiling_of_its_grant_and_fuller_asks_are_refused() {
    let ns = TestNamespace::ungranted("grant-ceiling").await;
    let fin = format!("{}-finance", ns.name);
    let rest = format!("{}-rest", ns.name);
    ns.grant(
        &fin,
        r#"{"mailboxes": ["*@finance.example"], "maxPayloadMode": "full"}"#,
    )
    .await;
    ns.grant(&rest, r#"{"mailboxes": ["*"], "maxPayloadMode": "metadata"}"#)
        .await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &subscription("full", &receiver.url("/full"), "", "  payload: {mode: full}\n")
            + &subscription(
                "raw",
                &receiver.url("/raw"),
                "",
                "  payload: {mode: full, includeRawMessageLink: true}\n",
            )),
    );
    wait_ready(&ns, "full").await;
    let message = wait_not_granted(&ns, "raw").await;
    assert!(message.contains("spec.payload.includeRawMessageLink"), "{message}");

    let (status, body) = operator
        .ingest(&[event("cfo", "cfo@finance.example"), event("ceo", "ceo@example.com")])
        .await;
    assert_eq!(status, 202, "{body}");
    let got = eventually("both events", || receiver.deliveries(), |d| accepted(d).len() == 2).await;
    let sent = accepted(&got);
    let cfo = sent
        .iter()
        .find(|e| e["data"]["mailbox"].is_string())
        .expect("the finance event in full");
    assert_eq!(cfo["data"]["mailbox"], "cfo@finance.example");
    assert_eq!(cfo["data"]["subject"], "subject of cfo");
    let ceo = sent
        .iter()
        .find(|e| e["data"]["mailbox"].is_null())
        .expect("the other event as metadata");
    assert_eq!(ceo["data"]["mailboxDomain"], "example.com");
    let text = ceo.to_string();
    assert!(
        !text.contains("ceo@example.com") && !text.contains("subject of ceo") && !text.contains("\"ceo\""),
        "metadata shows no address, subject or producer id: {text}"
    );

    // Only metadata grants left: a subscription asking for full is refused, naming the field.
    ns.revoke(&fin).await;
    let message = wait_not_granted(&ns, "full").await;
    assert!(
        message.contains("spec.payload.mode: full") && message.contains("the fullest is metadata"),
        "{message}"
    );
}

#[tokio::test]
async fn a_revoked_grant_delivers_none_of_its_queued_deliveries() {
    const QUEUED: usize = 10_000;
    let ns = TestNamespace::ungranted("grant-revoke").await;
    let fin = format!("{}-finance", ns.name);
    let other = format!("{}-other", ns.name);
    ns.grant(
        &fin,
        r#"{"mailboxes": ["*@finance.example"], "maxPayloadMode": "full"}"#,
    )
    .await;
    ns.grant(&other, r#"{"domains": ["other.example"], "maxPayloadMode": "full"}"#)
        .await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(503).await;
    let operator = Operator::start(&ns).await;
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &subscription(
                "siem",
                &receiver.url("/hooks"),
                "",
                "  delivery: {retrySchedule: [0s, 24h, 24h, 24h, 24h, 24h, 24h, 24h, 24h, 24h], maxEventAge: 72h}\n",
            )),
    );
    wait_ready(&ns, "siem").await;
    for chunk in 0..QUEUED / 500 {
        let batch: Vec<Value> = (0..500)
            .map(|i| event(&format!("q-{chunk}-{i}"), "clerk@finance.example"))
            .collect();
        let (status, body) = operator.ingest(&batch).await;
        assert_eq!(status, 202, "{body}");
    }
    eventually(
        "the queue holds every delivery",
        || whs(&ns, "siem"),
        // Down, not dying: with retries a day apart none is given up before the revocation.
        |w| {
            w.status
                .as_ref()
                .is_some_and(|s| s.backlog == QUEUED as u64 && s.dead_lettered == 0)
        },
    )
    .await;

    ns.revoke(&fin).await;
    // Still granted other.example: the subscription stays Ready and sends again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    receiver.answer(200).await;
    // Every delivery that was due is dead-lettered unsent; the few that failed once while
    // the receiver was down wait for their retry (a day away), and meet the same check then.
    let w = eventually(
        "every due delivery dead-lettered unsent",
        || whs(&ns, "siem"),
        |w| {
            w.status.as_ref().is_some_and(|s| {
                s.backlog == s.failed_attempts && s.backlog + s.dead_lettered == QUEUED as u64 && s.delivered == 0
            })
        },
    )
    .await;
    let dead = w.status.as_ref().map_or(0, |s| s.dead_lettered);
    assert!(dead >= QUEUED as u64 - 100, "{:?}", w.status);
    assert_eq!(ready(&w).0, "True", "{:?}", ready(&w));
    let (status, _) = operator.ingest(&[event("still-granted", "desk@other.example")]).await;
    assert_eq!(status, 202);
    let got = eventually(
        "the still granted event",
        || receiver.deliveries(),
        |d| !accepted(d).is_empty(),
    )
    .await;
    let sent = accepted(&got);
    assert_eq!(
        sent.len(),
        1,
        "none of the revoked grant's queue: {} delivered",
        sent.len()
    );
    assert_eq!(sent[0]["data"]["mailbox"], "desk@other.example");
    let withheld = operator
        .metric(&format!(
            "mailhook_deliveries_not_granted_total{{namespace=\"{}\",subscription=\"siem\"}}",
            ns.name
        ))
        .await;
    assert_eq!(withheld, dead as f64, "each dead letter is a withheld delivery");
}

#[tokio::test]
async fn a_filter_in_an_ungranted_namespace_counts_and_flags_nothing() {
    let granted = TestNamespace::new("grant-filter-a").await;
    let nosy = TestNamespace::ungranted("grant-filter-b").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = operator_for(&[&granted, &nosy], &[]).await;
    let filter = |name: &str| {
        format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: {name}}}\nspec:\n  \
             subject: {{regex: '^subject of'}}\n  flag: {{name: {name}, severity: high}}\n---\n"
        )
    };
    apply(&granted, &filter("wires"));
    apply(&nosy, &filter("oracle"));
    apply(
        &granted,
        &(signing_secret(SIEM_SECRET)
            + &subscription("flags", &receiver.url("/flags"), "", "")
                .replace("[message.received]", "[message.received, compliance.flagged]")),
    );
    wait_ready(&granted, "flags").await;
    let (status, _) = operator
        .ingest(&[event("w-1", "cfo@finance.example"), event("w-2", "ceo@example.com")])
        .await;
    assert_eq!(status, 202);
    let got = eventually(
        "two events and their two flags",
        || receiver.deliveries(),
        |d| accepted(d).len() == 4,
    )
    .await;
    let flags: Vec<Value> = accepted(&got)
        .into_iter()
        .filter(|e| e["type"] == "compliance.flagged")
        .collect();
    assert!(
        flags.iter().all(|f| f["data"]["flags"][0]["name"] == "wires"),
        "only the granted namespace's filter flags: {flags:?}"
    );
    // (observed generation, matched messages) of a filter's status.
    let matched = |ns: &TestNamespace, name: &str| {
        let api = ns.api::<MailboxFilter>();
        let name = name.to_string();
        async move {
            let filter = api.get(&name).await.expect("get filter");
            let status = filter.status.unwrap_or_default();
            (status.observed_generation, status.matched_messages)
        }
    };
    eventually("the granted filter counts", || matched(&granted, "wires"), |m| m.1 == 2).await;
    // The status writer refreshes counters of every filter in one pass: once the granted one
    // shows its matches, the other's status has been written from the same counters.
    let seen = eventually(
        "the ungranted filter's status",
        || matched(&nosy, "oracle"),
        |m| m.0.is_some(),
    )
    .await;
    assert_eq!(seen.1, 0, "an ungranted filter learns nothing");
}

#[tokio::test]
async fn the_history_api_answers_a_namespace_user_about_that_namespace_only() {
    let a = TestNamespace::new("grant-history-a").await;
    let b = TestNamespace::new("grant-history-b").await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(500).await;
    let operator = operator_for(&[&a, &b], &["--metrics-auth", "kubernetes"]).await;
    for ns in [&a, &b] {
        apply(
            ns,
            &(signing_secret(SIEM_SECRET)
                + &subscription(
                    "siem",
                    &receiver.url("/hooks"),
                    "",
                    "  delivery: {retrySchedule: [0s]}\n",
                )),
        );
        wait_ready(ns, "siem").await;
    }
    let (status, _) = operator.ingest(&[event("h-1", "clerk@finance.example")]).await;
    assert_eq!(status, 202);
    eventually(
        "a dead letter in each namespace",
        || async { (whs(&a, "siem").await, whs(&b, "siem").await) },
        |(x, y)| {
            [x, y]
                .iter()
                .all(|w| w.status.as_ref().is_some_and(|s| s.dead_lettered == 1))
        },
    )
    .await;

    // A namespace user: a ServiceAccount of `a` allowed to read and replay a's subscriptions.
    let rbac = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: auditor}\n---\n\
                apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: whs-reader}\n\
                rules: [{apiGroups: [mailhook.io], resources: [webhooksubscriptions], verbs: [get, list, watch]}]\n---\n\
                apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: auditor}\n\
                roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: whs-reader}\n\
                subjects: [{kind: ServiceAccount, name: auditor}]\n";
    apply(&a, rbac);
    let (ok, token, err) = kubectl_run(&["create", "token", "auditor", "-n", &a.name], None);
    assert!(ok, "kubectl create token: {err}");
    let token = token.trim().to_string();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, ns: &str, what: &str, token: &str| {
        http.request(
            method,
            format!("http://{}/v1/subscriptions/{ns}/siem/{what}", operator.admin),
        )
        .bearer_auth(token)
        .send()
    };
    let own = call(reqwest::Method::GET, &a.name, "dead-letters", &token)
        .await
        .expect("request");
    assert_eq!(own.status(), 200);
    let listed: Value = serde_json::from_str(&own.text().await.expect("body")).expect("json");
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "{listed}");
    let other = call(reqwest::Method::GET, &b.name, "dead-letters", &token)
        .await
        .expect("request");
    assert_eq!(other.status(), 403, "another namespace's history is refused");
    let text = other.text().await.unwrap_or_default();
    assert!(text.contains("may not get webhooksubscriptions"), "{text}");
    let replay = call(reqwest::Method::POST, &a.name, "replay", &token)
        .await
        .expect("request");
    assert_eq!(replay.status(), 403, "reading is not replaying (needs patch)");
    let forged = call(reqwest::Method::GET, &a.name, "attempts", "not-a-token")
        .await
        .expect("request");
    assert_eq!(forged.status(), 401);

    // /metrics names every namespace's subscriptions: only for scrapers Kubernetes allows.
    let scrape = |token: Option<String>| {
        let request = http.get(format!("http://{}/metrics", operator.admin));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
        .send()
    };
    assert_eq!(scrape(None).await.expect("request").status(), 401);
    assert_eq!(
        scrape(Some(token.clone())).await.expect("request").status(),
        403,
        "a namespace user may not"
    );
    let scraper = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: prometheus}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {ns}-metrics}}\n\
         rules: [{{nonResourceURLs: [/metrics], verbs: [get]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {ns}-metrics}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {ns}-metrics}}\n\
         subjects: [{{kind: ServiceAccount, name: prometheus, namespace: {ns}}}]\n",
        ns = b.name
    );
    apply(&b, &scraper);
    let (ok, prometheus, err) = kubectl_run(&["create", "token", "prometheus", "-n", &b.name], None);
    assert!(ok, "kubectl create token: {err}");
    let allowed = scrape(Some(prometheus.trim().to_string())).await.expect("request");
    assert_eq!(allowed.status(), 200);
    assert!(
        allowed
            .text()
            .await
            .unwrap_or_default()
            .contains("mailhook_deliveries_total")
    );
}
