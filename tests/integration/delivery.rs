//! The data path end to end: the real operator process, a real apiserver, and a real
//! HTTP receiver that verifies signatures with the `standardwebhooks` PyPI library.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply, condition, eventually, kubectl_run, signing_secret,
    subscription, wait_ready, whs,
};

/// Applies Secret `signing` and a subscription `name` to `url` (5 s timeout) with `extra`
/// YAML appended under spec.
fn subscribe(ns: &TestNamespace, name: &str, url: &str, extra: &str) {
    apply(
        ns,
        &(signing_secret(SIEM_SECRET) + &subscription(name, url, ", timeout: 5s", extra)),
    );
}

fn event(i: usize) -> Value {
    json!({
        "type": "message.received",
        "eventId": format!("producer-{i}"),
        "occurredAt": "2026-11-26T10:00:00Z",
        "mailbox": format!("user{}@finance.example.com", i % 17),
        "messageId": format!("<m{i}@partner.org>"),
        "from": "Sender.Name@Partner.org",
        "to": [format!("user{}@finance.example.com", i % 17)],
        "cc": ["auditor@finance.example.com"],
        "subject": format!("Quarterly merger plan #{i}"),
        "size": 20_000 + i,
        "attachments": [{"name": "plan.pdf", "contentType": "application/pdf", "size": 1200, "sha256": "ab12"}],
        "folder": "Inbox",
    })
}

#[tokio::test]
async fn a_thousand_events_arrive_signed_and_status_counts_them() {
    let ns = TestNamespace::new("thousand").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    apply(
        &ns,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: siem-token}\nstringData: {token: s3cret-token}\n",
    );
    subscribe(&ns, "siem", &receiver.url("/hooks"), "  delivery: {concurrency: 16}\n");
    let header =
        r#"{"spec":{"endpoint":{"headers":[{"name":"X-Api-Key","valueFrom":{"name":"siem-token","key":"token"}}]}}}"#;
    let (ok, _, err) = kubectl_run(
        &["patch", "whs", "siem", "-n", &ns.name, "--type=merge", "-p", header],
        None,
    );
    assert!(ok, "{err}");
    wait_ready(&ns, "siem").await;

    let events: Vec<Value> = (0..1000).map(event).collect();
    for batch in events.chunks(250) {
        let (status, body) = operator.ingest(batch).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["accepted"], 250);
    }

    let got = eventually(
        "1000 verified deliveries",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.answered == 200).count() >= 1000,
    )
    .await;
    assert!(
        got.iter().all(|r| r.verified),
        "every delivery verifies with the standardwebhooks library"
    );
    assert!(
        got.iter()
            .all(|r| r.headers.get("x-api-key").map(String::as_str) == Some("s3cret-token")),
        "the extra header from the Secret rides on every delivery"
    );
    let ids: BTreeSet<&str> = got.iter().filter_map(|r| r.webhook_id.as_deref()).collect();
    assert_eq!(ids.len(), 1000, "one webhook-id per event");
    let first = got[0].json();
    assert_eq!(first["type"], "message.received");
    assert_eq!(
        first["data"]["from"], "sender.name@partner.org",
        "addresses are normalized"
    );
    assert!(
        first["data"]["subject"]
            .as_str()
            .is_some_and(|s| s.starts_with("Quarterly merger plan"))
    );

    let w = eventually(
        "status delivered=1000, Healthy=True, backlog=0",
        || whs(&ns, "siem"),
        |w| {
            w.status.as_ref().is_some_and(|s| s.delivered == 1000 && s.backlog == 0)
                && condition(w, "Healthy") == Some(("True".into(), "EndpointHealthy".into()))
        },
    )
    .await;
    let status = w.status.expect("status");
    assert!(status.last_success_time.is_some() && status.recent_latency_ms.is_some());
    assert!(status.shard.is_some_and(|s| s < 2));

    let (ok, out, _) = kubectl_run(&["get", "whs", "siem", "-n", &ns.name], None);
    assert!(ok && out.contains("1000"), "{out}");
}

#[tokio::test]
async fn a_failing_endpoint_is_probed_one_request_at_a_time_then_gets_its_backlog() {
    let ns = TestNamespace::new("probe").await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(500).await;
    let operator = Operator::start(&ns).await;
    // The default schedule (0s, 5s, …) and concurrency (4).
    subscribe(&ns, "down", &receiver.url("/hooks"), "");
    wait_ready(&ns, "down").await;
    assert_eq!(operator.ingest(&(0..20).map(event).collect::<Vec<_>>()).await.0, 202);

    eventually("a first failed attempt", || receiver.deliveries(), |d| !d.is_empty()).await;
    // An upper bound, which a slow machine can only make smaller: the first pass's 4
    // requests, then a probe a second. Without the probe every event's first attempt and
    // its 0s retry were sent at once (40).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let tried = receiver.deliveries().await.len();
    assert!(tried <= 10, "{tried} requests in ~3 s to a failing endpoint");
    let w = whs(&ns, "down").await;
    let healthy = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Healthy"))
        .expect("Healthy");
    assert!(healthy.message.contains("one request at a time"), "{}", healthy.message);

    // The next probe succeeds and the backlog flows at full concurrency.
    receiver.answer(200).await;
    eventually(
        "delivered=20, backlog=0",
        || whs(&ns, "down"),
        |w| w.status.as_ref().is_some_and(|s| s.delivered == 20 && s.backlog == 0),
    )
    .await;
}

#[tokio::test]
async fn a_failing_endpoints_dead_letters_reach_its_sink_uri_while_it_fails() {
    // The copies for a sink URI share the failing subscription's queue: the probe limit
    // must not put them behind it (100 events x 2 attempts at a probe a second would take
    // over 3 minutes).
    let ns = TestNamespace::new("sinkuri").await;
    let failing = Receiver::start(SIEM_SECRET);
    failing.answer(500).await;
    let sink = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    subscribe(
        &ns,
        "down",
        &failing.url("/hooks"),
        &format!(
            "  delivery: {{retrySchedule: [0s, 1s], deadLetterSink: {{uri: '{}'}}}}\n",
            sink.url("/dlq")
        ),
    );
    wait_ready(&ns, "down").await;
    assert_eq!(operator.ingest(&(0..100).map(event).collect::<Vec<_>>()).await.0, 202);
    let copies = eventually(
        "100 dead-letter copies at the sink",
        || sink.deliveries(),
        |d| d.len() >= 100,
    )
    .await;
    let ids: BTreeSet<_> = copies.iter().filter_map(|r| r.webhook_id.clone()).collect();
    assert_eq!(ids.len(), 100, "one copy per event");
    assert!(copies.iter().all(|r| r.verified));
}

#[tokio::test]
async fn a_failing_endpoint_is_retried_reported_and_recovers_without_loss() {
    let ns = TestNamespace::new("recovery").await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(500).await;
    let operator = Operator::start(&ns).await;
    subscribe(
        &ns,
        "flaky",
        &receiver.url("/hooks"),
        "  delivery: {retrySchedule: [0s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]}\n",
    );
    wait_ready(&ns, "flaky").await;

    let (status, _) = operator.ingest(&(0..5).map(event).collect::<Vec<_>>()).await;
    assert_eq!(status, 202);

    let w = eventually(
        "Healthy=False/EndpointFailing",
        || whs(&ns, "flaky"),
        |w| condition(w, "Healthy") == Some(("False".into(), "EndpointFailing".into())),
    )
    .await;
    let status = w.status.expect("status");
    let failure = status.last_failure.clone().expect("lastFailure");
    assert_eq!(failure.http_status, Some(500));
    assert!(status.consecutive_failures >= 1 && status.backlog == 5, "{status:?}");
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Healthy")
        .expect("Healthy")
        .message;
    assert!(message.contains("HTTP 500"), "{message}");

    // Let every event be retried at least once more, then recover.
    eventually("retries", || receiver.deliveries(), |d| d.len() >= 10).await;
    receiver.answer(200).await;
    eventually(
        "Healthy=True, delivered=5, backlog=0",
        || whs(&ns, "flaky"),
        |w| {
            condition(w, "Healthy") == Some(("True".into(), "EndpointHealthy".into()))
                && w.status.as_ref().is_some_and(|s| s.delivered == 5 && s.backlog == 0)
        },
    )
    .await;

    // Nothing lost, and retries of one event carry one webhook-id.
    let got = receiver.deliveries().await;
    let mut by_id: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for r in &got {
        assert!(r.verified);
        by_id
            .entry(r.webhook_id.clone().expect("webhook-id"))
            .or_default()
            .push(r.answered);
    }
    assert_eq!(by_id.len(), 5, "{by_id:?}");
    for (id, answers) in &by_id {
        assert!(answers.contains(&500) && answers.contains(&200), "{id}: {answers:?}");
    }
    let producer_ids: BTreeSet<String> = got
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.json()["data"]["producerEventId"].to_string())
        .collect();
    assert_eq!(producer_ids.len(), 5);
}

#[tokio::test]
async fn an_endpoint_answering_410_is_disabled_and_left_alone() {
    let ns = TestNamespace::new("gone").await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.answer(410).await;
    let operator = Operator::start(&ns).await;
    subscribe(
        &ns,
        "retired",
        &receiver.url("/hooks"),
        "  delivery: {concurrency: 1, retrySchedule: [0s, 1s, 1s, 1s, 1s]}\n",
    );
    wait_ready(&ns, "retired").await;
    let (status, _) = operator.ingest(&(0..3).map(event).collect::<Vec<_>>()).await;
    assert_eq!(status, 202);

    let w = eventually(
        "Healthy=False/EndpointDisabled",
        || whs(&ns, "retired"),
        |w| condition(w, "Healthy") == Some(("False".into(), "EndpointDisabled".into())),
    )
    .await;
    assert_eq!(
        w.status.as_ref().map(|s| s.backlog),
        Some(3),
        "events are kept, not dropped"
    );
    let attempts = receiver.deliveries().await.len();
    assert_eq!(attempts, 1, "one attempt, then no more");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        receiver.deliveries().await.len(),
        attempts,
        "a disabled endpoint gets no more attempts"
    );
    let (ok, events, _) = kubectl_run(
        &[
            "get",
            "events",
            "-n",
            &ns.name,
            "--field-selector",
            "involvedObject.name=retired",
            "-o",
            "custom-columns=R:.reason",
        ],
        None,
    );
    assert!(ok && events.contains("EndpointDisabled"), "{events}");

    // Editing the subscription re-enables it; the kept events then arrive.
    receiver.answer(200).await;
    let (ok, _, err) = kubectl_run(
        &[
            "patch",
            "whs",
            "retired",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            r#"{"spec":{"delivery":{"concurrency":2}}}"#,
        ],
        None,
    );
    assert!(ok, "{err}");
    eventually(
        "3 deliveries after re-enable",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.answered == 200).count() == 3,
    )
    .await;
}

#[tokio::test]
async fn metadata_and_anonymized_payloads_carry_no_subject_and_no_real_address() {
    let ns = TestNamespace::new("privacy").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    subscribe(
        &ns,
        "analytics",
        &receiver.url("/metadata"),
        "  payload: {mode: metadata}\n",
    );
    subscribe(
        &ns,
        "research",
        &receiver.url("/anonymized"),
        "  payload: {mode: anonymized}\n",
    );
    wait_ready(&ns, "analytics").await;
    wait_ready(&ns, "research").await;
    let (status, _) = operator.ingest(&(0..10).map(event).collect::<Vec<_>>()).await;
    assert_eq!(status, 202);
    let got = eventually("20 deliveries", || receiver.deliveries(), |d| d.len() >= 20).await;
    for r in &got {
        assert!(r.verified);
        let body = r.body.to_lowercase();
        // Pseudonyms keep the domain (anon-…@partner.org); real local parts never appear.
        for secret in ["merger", "sender.name@", "\"user", "auditor@", "plan.pdf", "<m1@"] {
            assert!(!body.contains(secret), "a privacy payload leaks {secret:?}: {}", r.body);
        }
    }
    let anonymized: Vec<Value> = got
        .iter()
        .map(|r| r.json())
        .filter(|j| j["data"]["from"].as_str().is_some_and(|f| f.starts_with("anon-")))
        .collect();
    assert_eq!(anonymized.len(), 10, "the anonymized subscription gets pseudonyms");
    let pseudonyms: BTreeSet<&str> = anonymized.iter().filter_map(|j| j["data"]["from"].as_str()).collect();
    assert_eq!(pseudonyms.len(), 1, "one sender, one stable pseudonym: {pseudonyms:?}");
    let metadata: Vec<Value> = got
        .iter()
        .map(|r| r.json())
        .filter(|j| j["data"].get("senderDomain").is_some())
        .collect();
    assert_eq!(metadata.len(), 10);
    assert_eq!(metadata[0]["data"]["senderDomain"], "partner.org");
}

#[tokio::test]
async fn ingest_refuses_bad_requests_whole_and_deduplicates() {
    let ns = TestNamespace::new("ingest").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--ingest-max-body-bytes", "65536"]).await;
    subscribe(&ns, "siem", &receiver.url("/hooks"), "");
    wait_ready(&ns, "siem").await;
    let url = format!("http://{}/v1/events", operator.ingest);
    let client = reqwest::Client::new();
    let post = |token: Option<&str>, content_type: &str, body: String| {
        let mut r = client.post(&url).header("content-type", content_type).body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let resp = r.send().await.expect("request");
            let status = resp.status().as_u16();
            (
                status,
                serde_json::from_str::<Value>(&resp.text().await.unwrap_or_default()).unwrap_or_default(),
            )
        }
    };
    let token = Some(crate::support::INGEST_TOKEN);
    let one = event(1).to_string();

    assert_eq!(post(None, "application/json", one.clone()).await.0, 401);
    assert_eq!(post(Some("wrong"), "application/json", one.clone()).await.0, 401);
    assert_eq!(post(token, "text/plain", one.clone()).await.0, 415);
    let (status, _) = post(token, "application/x-ndjson", format!("{one}\n").repeat(200)).await;
    assert_eq!(status, 413, "over --ingest-max-body-bytes");

    // A bad second line refuses the whole batch, naming the field.
    let mut bad = event(2);
    bad["to"] = json!(["ok@example.com", "not an address"]);
    let (status, body) = post(token, "application/x-ndjson", format!("{}\n{bad}\n", event(100))).await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "line 2: to[1]", "{body}");
    let mut unknown = event(3);
    unknown["subjet"] = json!("typo");
    let (status, body) = post(token, "application/json", unknown.to_string()).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("subjet")), "{body}");
    let (status, body) = post(
        token,
        "application/json",
        r#"{"type": "message.exploded", "mailbox": "a@b.c"}"#.into(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["field"], "body: type", "{body}");

    // Accepted once; the repeat is acknowledged as a duplicate and not delivered again.
    let (status, body) = post(token, "application/json", one.clone()).await;
    assert_eq!((status, body["accepted"].as_u64()), (202, Some(1)), "{body}");
    let (status, body) = post(token, "application/json", one).await;
    assert_eq!(status, 202);
    assert_eq!(body["events"][0]["duplicate"], true, "{body}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let got = receiver.deliveries().await;
    assert_eq!(got.len(), 1, "one delivery: nothing from refused batches, no duplicate");
    assert_eq!(got[0].json()["data"]["producerEventId"], "producer-1");
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_deliveries() {
    let ns = TestNamespace::new("metrics").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    apply(
        &ns,
        "apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {name: pdfs}\nspec:\n  attachments: {extensions: [pdf]}\n",
    );
    subscribe(&ns, "siem", &receiver.url("/hooks"), "  filterRefs: [pdfs]\n");
    wait_ready(&ns, "siem").await;
    let mut no_pdf = event(3);
    no_pdf["attachments"] = json!([]);
    assert_eq!(operator.ingest(&[event(1), event(2), no_pdf]).await.0, 202);
    let got = eventually("2 deliveries", || receiver.deliveries(), |d| d.len() == 2).await;
    assert_eq!(got[0].json()["data"]["matchedFilters"], json!(["pdfs"]));

    // The filter's status counts what it matched.
    let filters = ns.api::<mailhook::api::MailboxFilter>();
    let f = eventually(
        "pdfs matchedMessages=2",
        || async { filters.get("pdfs").await.expect("get filter") },
        |f| f.status.as_ref().is_some_and(|s| s.matched_messages == 2),
    )
    .await;
    let status = f.status.expect("status");
    assert!(status.last_match_time.is_some());
    assert_eq!(status.subscriptions, vec!["siem"]);
    let text = eventually(
        "backlog gauge at 0 after delivery",
        || operator.metrics(),
        |t: &String| {
            t.contains(&format!(
                "mailhook_backlog{{namespace=\"{}\",subscription=\"siem\"}} 0",
                ns.name
            ))
        },
    )
    .await;
    for needle in [
        "mailhook_events_ingested_total{outcome=\"accepted\",source=\"http\"} 3",
        "mailhook_events_routed_total{result=\"unmatched\"} 1",
        "mailhook_deliveries_total{",
        "mailhook_delivery_duration_seconds_bucket{",
        "mailhook_endpoint_up{",
        "mailhook_reconcile_duration_seconds_bucket{kind=\"WebhookSubscription\"",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(!text.contains("finance.example.com"), "no address in any label");

    let (ok, out, err) = crate::support::run(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        Some(text.as_bytes()),
    )
    .expect("promtool is installed by tests/setup (Debian package prometheus)");
    assert!(ok, "promtool check metrics: {out}{err}");
}

/// `--max-deliveries-in-flight` bounds requests over every subscription: six
/// subscriptions (concurrency 4 each) drain into one slow receiver with at most three
/// requests open at any moment, and they take turns — every one has had a delivery before
/// any has had five — instead of the first one taking every slot that frees. One shard, so
/// the turns are exact: between shards, slots go to waiting shards in turn (tokio's fair
/// semaphore), so a subscription's share also depends on how many others its shard holds.
#[tokio::test]
async fn subscriptions_take_turns_for_the_process_wide_request_slots() {
    take_turns("inflight", "  delivery: {concurrency: 4}\n").await;
}

/// The same with batched subscriptions (one event per request, so the counts match): a
/// batch that took a slot has had its turn too.
#[tokio::test]
async fn batched_subscriptions_take_turns_for_the_process_wide_request_slots() {
    take_turns(
        "inflight-batched",
        "  delivery: {concurrency: 4, batch: {maxEvents: 1, maxWait: 1s}}\n",
    )
    .await;
}

async fn take_turns(prefix: &str, delivery: &str) {
    let ns = TestNamespace::new(prefix).await;
    let receiver = Receiver::start(SIEM_SECRET);
    receiver.mode(r#"{"delay": 0.3}"#).await;
    let operator = Operator::start_with(&ns, &["--max-deliveries-in-flight", "3", "--shards", "1"]).await;
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let mut yaml = signing_secret(SIEM_SECRET);
    for name in &names {
        let header = format!(", headers: [{{name: X-Subscription, value: {name}}}]");
        yaml += &subscription(name, &receiver.url("/slow"), &header, delivery);
    }
    apply(&ns, &yaml);
    for name in &names {
        wait_ready(&ns, name).await;
    }
    assert_eq!(operator.metric("mailhook_delivery_requests_in_flight_limit").await, 3.0);
    let (status, body) = operator.ingest(&(0..8).map(event).collect::<Vec<_>>()).await;
    assert_eq!(status, 202, "{body}");

    let got = eventually(
        "8 deliveries for each of the 6 subscriptions",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.answered == 200).count() >= 48,
    )
    .await;
    let most = got.iter().map(|r| r.in_flight).max().unwrap_or(0);
    assert!(most <= 3, "at most 3 requests open at once, saw {most}");
    assert!(most >= 2, "the slots are used in parallel, saw at most {most}");
    let mut arrived: Vec<&crate::support::Received> = got.iter().filter(|r| r.answered == 200).collect();
    arrived.sort_by(|a, b| a.arrived.total_cmp(&b.arrived));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fifth_before_all_first = None;
    for (n, r) in arrived.iter().enumerate() {
        let sub = r.headers.get("x-subscription").map_or("?", String::as_str);
        let count = counts.entry(sub).or_default();
        *count += 1;
        if *count == 5 && counts.len() < names.len() && fifth_before_all_first.is_none() {
            fifth_before_all_first = Some(format!(
                "{sub}'s fifth (delivery {n}) came before any for {} others",
                names.len() - counts.len()
            ));
        }
    }
    assert_eq!(fifth_before_all_first, None, "taking turns: {counts:?}");
    assert!(counts.values().all(|c| *c == 8), "8 each: {counts:?}");
    eventually(
        "no request in flight once drained",
        || operator.metric("mailhook_delivery_requests_in_flight"),
        |v| *v == 0.0,
    )
    .await;
}

/// `rateLimitPerSecond` counts requests: with 2 per second (a burst of 2), no stretch of the
/// arrivals holds more than 2 + 2 × its length in seconds, however many slots are free —
/// and every event still arrives.
#[tokio::test]
async fn the_rate_limit_spaces_requests_and_delivers_everything() {
    let ns = TestNamespace::new("ratelimit").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    subscribe(
        &ns,
        "limited",
        &receiver.url("/limited"),
        "  delivery: {concurrency: 4, rateLimitPerSecond: 2}\n",
    );
    wait_ready(&ns, "limited").await;
    let (status, body) = operator.ingest(&(0..8).map(event).collect::<Vec<_>>()).await;
    assert_eq!(status, 202, "{body}");
    let got = eventually(
        "8 deliveries",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.answered == 200).count() >= 8,
    )
    .await;
    let mut times: Vec<f64> = got.iter().filter(|r| r.answered == 200).map(|r| r.arrived).collect();
    times.sort_by(f64::total_cmp);
    for i in 0..times.len() {
        for j in i..times.len() {
            let requests = (j - i + 1) as f64;
            let span = times[j] - times[i];
            // 50 ms of slack for when the receiver notes an arrival.
            assert!(
                requests <= 2.0 + 2.0 * (span + 0.05),
                "{requests} requests within {span:.3} s: more than the limit allows ({times:?})"
            );
        }
    }
}
