//! What receivers expect, end to end: CloudEvents parsed by the Python `cloudevents` SDK in
//! binary, structured and batched mode; JWE payloads decrypted by `jwcrypto` with only the
//! private key; dead letters copied to a sink with why they died; batches of the
//! configured sizes. Every delivery is still verified with the `standardwebhooks` library
//! and its data validated against the checked-in JSON Schemas (receiver.py).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply, eventually, kubectl_run, signing_secret, subscription,
    wait_ready, whs,
};

/// The published OpenAPI document is valid OpenAPI 3.1 to an off-the-shelf validator, so
/// receivers' code generators can read it.
#[test]
fn the_openapi_document_is_valid_openapi_3_1() {
    let script = "import json, sys\nfrom openapi_spec_validator import validate\n\
                  validate(json.load(open(sys.argv[1])))\nprint('valid')\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script, &crate::support::repo_path("schemas/v1/openapi.json")])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A message for `mailbox`, with a non-ASCII subject, addresses and attachment name.
fn mail(i: usize, mailbox: &str) -> Value {
    json!({
        "type": "message.received",
        "eventId": format!("fmt-{i}"),
        "mailbox": mailbox,
        "from": "zoë@partner.example",
        "to": [mailbox],
        "subject": format!("Übernahme – streng vertraulich #{i}"),
        "attachments": [{"name": "Kaufvertrag-Müller.pdf", "contentType": "application/pdf", "size": 1200}],
    })
}

fn yaml(name: &str, url: &str, endpoint_extra: &str, spec_extra: &str) -> String {
    subscription(name, url, endpoint_extra, spec_extra)
}

#[tokio::test]
async fn cloud_events_parse_with_the_sdk_in_binary_and_structured_mode_and_still_verify() {
    let ns = TestNamespace::new("cloudevents").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--instance", "mail-system/mailhook"]).await;
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &yaml(
                "binary",
                &receiver.url("/binary"),
                ", verify: true",
                "  payload: {format: cloudEvents}\n",
            )
            + &yaml(
                "structured",
                &receiver.url("/structured"),
                ", verify: true",
                "  payload: {format: cloudEvents, cloudEvents: {mode: structured}}\n",
            )
            + &yaml(
                "anonymized",
                &receiver.url("/anonymized"),
                "",
                "  payload: {format: cloudEvents, mode: anonymized}\n",
            )
            + &yaml(
                "metadata",
                &receiver.url("/metadata"),
                "",
                "  payload: {format: cloudEvents, mode: metadata, cloudEvents: {mode: structured}}\n",
            )),
    );
    for name in ["binary", "structured", "anonymized", "metadata"] {
        wait_ready(&ns, name).await;
    }
    let mailbox = "jürgen@bücher.example";
    let events: Vec<Value> = (0..3).map(|i| mail(i, mailbox)).collect();
    assert_eq!(operator.ingest(&events).await.0, 202);

    let got = eventually(
        "3 events at each of the 4 paths",
        || receiver.deliveries(),
        |d| {
            ["/binary", "/structured", "/anonymized", "/metadata"].iter().all(|p| {
                d.iter()
                    .filter(|r| r.path == *p && r.event_types() == ["message.received"])
                    .count()
                    >= 3
            })
        },
    )
    .await;
    assert!(
        got.iter().all(|r| r.verified),
        "the Standard Webhooks signature verifies in every format"
    );

    // The endpoint verification challenge is a CloudEvent too, echoed from its data.
    for (path, format) in [
        ("/binary", "cloudEvents.binary"),
        ("/structured", "cloudEvents.structured"),
    ] {
        let challenge = got
            .iter()
            .find(|r| r.path == path && r.event_types() == ["endpoint.verification"])
            .unwrap_or_else(|| panic!("a verification CloudEvent at {path}"));
        assert_eq!(challenge.format, format);
        assert_eq!(
            challenge.events[0].attributes["source"],
            "/mailhook/mail-system/mailhook/operator"
        );
    }

    for (path, format) in [
        ("/binary", "cloudEvents.binary"),
        ("/structured", "cloudEvents.structured"),
        ("/anonymized", "cloudEvents.binary"),
        ("/metadata", "cloudEvents.structured"),
    ] {
        let mine: Vec<_> = got
            .iter()
            .filter(|r| r.path == path && r.event_types() == ["message.received"])
            .collect();
        let ids: BTreeSet<&str> = mine.iter().filter_map(|r| r.webhook_id.as_deref()).collect();
        assert_eq!(ids.len(), 3, "{path}: one id per event");
        for r in &mine {
            assert_eq!(r.format, format, "{path}");
            let event = &r.events[0];
            let attrs = &event.attributes;
            assert_eq!(attrs["specversion"], "1.0");
            assert_eq!(event.id.as_deref(), r.webhook_id.as_deref(), "{path}: id = webhook-id");
            assert_eq!(attrs["type"], "io.mailhook.message.received");
            assert_eq!(attrs["source"], "/mailhook/mail-system/mailhook/http");
            assert!(attrs.contains_key("time"), "{attrs:?}");
            let mode = path.trim_start_matches('/');
            let mode = if mode == "binary" || mode == "structured" {
                "full"
            } else {
                mode
            };
            assert_eq!(
                attrs["dataschema"],
                format!("https://mailhook.io/schemas/v1/{mode}/message.received.json")
            );
            match mode {
                "full" => {
                    assert_eq!(attrs["subject"], mailbox, "{path}: the subject is the mailbox");
                    assert!(
                        event.data["subject"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("Übernahme – streng vertraulich")),
                        "{path}: {}",
                        event.data
                    );
                }
                "anonymized" => {
                    assert!(attrs["subject"].starts_with("anon-"), "{attrs:?}");
                    assert!(!r.body.contains("jürgen") && !r.body.contains("Übernahme"));
                }
                _ => {
                    assert!(!attrs.contains_key("subject"), "metadata shows no address: {attrs:?}");
                    assert_eq!(event.data["mailboxDomain"], "bücher.example");
                }
            }
        }
    }
}

/// Writes a P-256 key pair made by jwcrypto: the private JWK file (for the receiver) and
/// the public JWK (for the Secret), with `kid`.
fn key_pair(dir: &std::path::Path, kid: &str) -> (std::path::PathBuf, String) {
    std::fs::create_dir_all(dir).expect("dir");
    let private = dir.join(format!("{kid}.private.json"));
    let script = format!(
        "from jwcrypto import jwk\nk = jwk.JWK.generate(kty='EC', crv='P-256', kid='{kid}')\n\
         open({:?}, 'w').write(k.export_private())\nprint(k.export_public())\n",
        private.to_string_lossy()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (private, String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test]
async fn encrypted_deliveries_decrypt_with_only_the_private_key_and_show_nothing_in_clear() {
    let ns = TestNamespace::new("encrypted").await;
    let dir = std::env::temp_dir().join(format!("mailhook-jwe-{}", ns.name));
    let (old_private, old_public) = key_pair(&dir, "2026-11");
    let (new_private, new_public) = key_pair(&dir, "2026-12");
    // The receiver holds both private keys (a JWK Set): it decrypts whichever was used.
    let set = dir.join("keys.json");
    let both: Vec<Value> = [&old_private, &new_private]
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).expect("key")).expect("jwk"))
        .collect();
    std::fs::write(&set, json!({"keys": both}).to_string()).expect("write");
    let receiver = Receiver::start_args(&["--secret", SIEM_SECRET, "--private-key", &set.to_string_lossy()]);
    let operator = Operator::start(&ns).await;
    let secret = |entries: &[(&str, &str)]| {
        let mut y = "apiVersion: v1\nkind: Secret\nmetadata: {name: receiver-keys}\nstringData:\n".to_string();
        for (k, v) in entries {
            y.push_str(&format!("  {k}: '{v}'\n"));
        }
        y + "---\n"
    };
    let encryption = "publicKeySecretRef: {name: receiver-keys}";
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &secret(&[("2026-11.jwk", &old_public)])
            + &yaml(
                "sealed",
                &receiver.url("/sealed"),
                "",
                &format!("  payload: {{encryption: {{{encryption}}}}}\n"),
            )
            + &yaml(
                "sealed-ce",
                &receiver.url("/sealed-ce"),
                "",
                &format!("  payload: {{format: cloudEvents, encryption: {{{encryption}}}}}\n"),
            )
            + &yaml(
                "sealed-batch",
                &receiver.url("/sealed-batch"),
                "",
                &format!(
                    "  payload: {{format: cloudEvents, encryption: {{{encryption}}}}}\n  delivery: {{batch: {{maxEvents: 3, maxWait: 300ms}}}}\n"
                ),
            )),
    );
    for name in ["sealed", "sealed-ce", "sealed-batch"] {
        wait_ready(&ns, name).await;
    }
    let w = whs(&ns, "sealed").await;
    assert_eq!(
        w.status.and_then(|s| s.encryption_key_id).as_deref(),
        Some("2026-11"),
        "status shows the key in use"
    );
    let mailbox = "märta@ekonomi.example";
    assert_eq!(operator.ingest(&[mail(0, mailbox), mail(1, mailbox)]).await.0, 202);
    let got = eventually(
        "2 events at each path",
        || receiver.deliveries(),
        |d| {
            ["/sealed", "/sealed-ce", "/sealed-batch"]
                .iter()
                .all(|p| d.iter().filter(|r| r.path == *p).map(|r| r.events.len()).sum::<usize>() >= 2)
        },
    )
    .await;

    // Rotation: a newer key (its name sorts last) encrypts from now on.
    apply(
        &ns,
        &secret(&[("2026-11.jwk", &old_public), ("2026-12.jwk", &new_public)]),
    );
    eventually(
        "status shows the new key",
        || whs(&ns, "sealed"),
        |w| w.status.as_ref().and_then(|s| s.encryption_key_id.as_deref()) == Some("2026-12"),
    )
    .await;
    assert_eq!(operator.ingest(&[mail(2, mailbox)]).await.0, 202);
    let got2 = eventually(
        "the third event at /sealed",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.path == "/sealed").count() >= 3,
    )
    .await;

    for r in got.iter().chain(&got2) {
        assert!(r.verified, "the signature covers the encrypted body");
        assert!(r.encrypted, "{} {}", r.path, r.body);
        assert_eq!(r.decrypt_error, None, "{}", r.path);
        // What a proxy or a request log between mailhook and the receiver sees.
        for secret in [
            "märta",
            "m\\u00e4rta",
            "ekonomi.example",
            "Übernahme",
            "\\u00dcbernahme",
            "zoë",
            "partner.example",
            "Kaufvertrag",
        ] {
            assert!(
                !r.body.contains(secret),
                "{} shows {secret} in clear: {}",
                r.path,
                r.body
            );
            for (name, value) in &r.headers {
                assert!(!value.contains(secret), "{} header {name} shows {secret}", r.path);
            }
        }
        for e in &r.events {
            assert_eq!(e.data["mailbox"], mailbox, "decrypted with only the private key");
            assert!(
                e.data["subject"].as_str().is_some_and(|s| s.starts_with("Übernahme")),
                "{}",
                e.data
            );
            assert!(!e.attributes.contains_key("subject"), "{:?}", e.attributes);
        }
    }
    let sealed: Vec<_> = got2.iter().filter(|r| r.path == "/sealed").collect();
    assert_eq!(sealed[0].content_type.as_deref(), Some("application/jose"));
    assert_eq!(sealed[0].events[0].kid.as_deref(), Some("2026-11"));
    assert_eq!(sealed[2].events[0].kid.as_deref(), Some("2026-12"), "rotated");

    // A private key in the Secret is refused, naming the field and the fix.
    let leaked = std::fs::read_to_string(&old_private).expect("key");
    apply(&ns, &secret(&[("2026-11.jwk", leaked.trim())]));
    let w = eventually(
        "Ready=False for a private key",
        || whs(&ns, "sealed"),
        |w| crate::support::condition(w, "Ready").is_some_and(|(s, r)| s == "False" && r == "InvalidSecret"),
    )
    .await;
    let message = w
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(
        message.contains("publicKeySecretRef") && message.contains("private key"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn dead_letters_go_to_the_sink_with_why_they_died_and_replay_still_works() {
    let ns = TestNamespace::new("deadletter").await;
    let failing = Receiver::start(SIEM_SECRET);
    failing.answer(500).await;
    let sink = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    let retries = "  delivery: {retrySchedule: [0s, 1s], deadLetterSink: ";
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            // The sink subscription: CloudEvents, so Knative's error attributes are seen.
            + &format!(
                "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: dlq}}\nspec:\n  \
                 endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
                 eventTypes: [compliance.flagged]\n  payload: {{format: cloudEvents}}\n---\n",
                sink.url("/dlq")
            )
            + &yaml(
                "by-ref",
                &failing.url("/by-ref"),
                "",
                &format!("{retries}{{ref: {{name: dlq}}}}}}\n"),
            )
            + &yaml(
                "by-uri",
                &failing.url("/by-uri"),
                "",
                &format!("{retries}{{uri: '{}'}}}}\n", sink.url("/uri")),
            )),
    );
    for name in ["dlq", "by-ref", "by-uri"] {
        wait_ready(&ns, name).await;
    }
    assert_eq!(operator.ingest(&[mail(0, "ana@finance.example")]).await.0, 202);

    let got = eventually(
        "a dead-letter copy at each sink path",
        || sink.deliveries(),
        |d| ["/dlq", "/uri"].iter().all(|p| d.iter().any(|r| r.path == *p)),
    )
    .await;
    let tried = failing.deliveries().await;
    for path in ["/by-ref", "/by-uri"] {
        assert_eq!(
            tried.iter().filter(|r| r.path == path).count(),
            2,
            "{path}: the retry schedule ran first"
        );
    }
    let first_id = tried
        .iter()
        .find(|r| r.path == "/by-ref")
        .and_then(|r| r.webhook_id.clone())
        .expect("id");
    let by_ref = got.iter().find(|r| r.path == "/dlq").expect("copy");
    assert!(by_ref.verified);
    let attrs = &by_ref.events[0].attributes;
    assert_eq!(attrs["knativeerrorcode"], "500");
    assert_eq!(attrs["knativeerrordest"], failing.url("/by-ref"));
    assert_eq!(attrs["mailhookattempts"], "2");
    assert_eq!(attrs["mailhookorigin"], format!("{}/by-ref", ns.name));
    assert!(attrs["mailhookdeadreason"].contains("retries exhausted"), "{attrs:?}");
    assert_eq!(by_ref.events[0].data["subject"], "Übernahme – streng vertraulich #0");

    let by_uri = got.iter().find(|r| r.path == "/uri").expect("copy");
    assert!(by_uri.verified, "signed with the dead subscription's key");
    let dead = by_uri.events[0].dead_letter.clone().expect("deadLetter");
    assert_eq!(dead["lastStatus"], 500);
    assert_eq!(dead["attempts"], 2);
    assert_eq!(dead["subscription"], format!("{}/by-uri", ns.name));
    assert_eq!(by_uri.json()["type"], "message.received");
    assert!(dead["webhookId"].is_string());
    assert_ne!(
        by_ref.webhook_id.as_deref(),
        Some(first_id.as_str()),
        "the copy has its own id"
    );

    // Dead letters are kept for replay: once the endpoint works, replay delivers there.
    let w = eventually(
        "deadLettered=1",
        || whs(&ns, "by-ref"),
        |w| w.status.as_ref().is_some_and(|s| s.dead_lettered == 1),
    )
    .await;
    assert_eq!(w.status.map(|s| s.backlog), Some(0));
    failing.answer(200).await;
    let (ok, _, err) = kubectl_run(
        &[
            "annotate",
            "-n",
            &ns.name,
            "webhooksubscription/by-ref",
            "mailhook.io/replay-requested-at=now",
        ],
        None,
    );
    assert!(ok, "{err}");
    eventually(
        "the replayed event at /by-ref, answered 200",
        || failing.deliveries(),
        |d| d.iter().any(|r| r.path == "/by-ref" && r.answered == 200),
    )
    .await;
    // Only one copy went to each sink.
    let copies = sink.deliveries().await;
    assert_eq!(copies.iter().filter(|r| r.path == "/dlq").count(), 1);
    assert_eq!(copies.iter().filter(|r| r.path == "/uri").count(), 1);
}

#[tokio::test]
async fn batches_arrive_with_the_configured_sizes_and_verify() {
    let ns = TestNamespace::new("batches").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start(&ns).await;
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &yaml(
                "bulk",
                &receiver.url("/bulk"),
                "",
                "  delivery: {concurrency: 1, batch: {maxEvents: 5, maxWait: 2s}}\n",
            )
            + &yaml(
                "bulk-ce",
                &receiver.url("/bulk-ce"),
                "",
                "  payload: {format: cloudEvents}\n  delivery: {concurrency: 2, batch: {maxEvents: 4, maxBytes: 2048, maxWait: 500ms}}\n",
            )),
    );
    wait_ready(&ns, "bulk").await;
    wait_ready(&ns, "bulk-ce").await;
    let events: Vec<Value> = (0..23).map(|i| mail(i, "batch@finance.example")).collect();
    assert_eq!(operator.ingest(&events).await.0, 202);

    let got = eventually(
        "23 events at each path",
        || receiver.deliveries(),
        |d| {
            ["/bulk", "/bulk-ce"].iter().all(|p| {
                d.iter()
                    .filter(|r| r.path == *p && r.answered == 200)
                    .map(|r| r.events.len())
                    .sum::<usize>()
                    >= 23
            })
        },
    )
    .await;
    for (path, format, max) in [("/bulk", "standardWebhooks", 5), ("/bulk-ce", "cloudEvents.batch", 4)] {
        let requests: Vec<_> = got.iter().filter(|r| r.path == path).collect();
        let sizes: Vec<usize> = requests.iter().map(|r| r.events.len()).collect();
        assert!(requests.iter().all(|r| r.verified && r.format == format), "{path}");
        assert!(sizes.iter().all(|s| (1..=max).contains(s)), "{path}: {sizes:?}");
        assert!(
            requests.iter().all(|r| r.batch_size == r.events.len()),
            "{path}: mailhook-batch-size says how many"
        );
        let ids: BTreeSet<String> = requests.iter().flat_map(|r| r.producer_event_ids()).collect();
        assert_eq!(ids.len(), 23, "{path}: every event once");
        if path == "/bulk" {
            // 23 events ingested at once fill four requests of 5; the rest waits maxWait.
            assert!(sizes.iter().filter(|s| **s == 5).count() >= 4, "{path}: {sizes:?}");
            assert!(requests.iter().all(|r| r.json().is_array()), "a JSON array of bodies");
        } else {
            // 2048 bytes hold fewer than 4 of these events: maxBytes cuts the batch.
            assert!(requests.iter().all(|r| r.body.len() < 4096), "{path}");
            assert!(sizes.iter().any(|s| *s < 4), "{path}: {sizes:?}");
        }
    }
    let w = eventually(
        "status counts events, not requests",
        || whs(&ns, "bulk"),
        |w| w.status.as_ref().is_some_and(|s| s.delivered == 23 && s.backlog == 0),
    )
    .await;
    assert!(w.status.is_some());
}

/// An event that grows older than maxEventAge undelivered (here: its subscription is
/// paused) is dead-lettered by housekeeping, and that dead letter reaches the sink too.
#[tokio::test]
async fn an_expired_event_goes_to_the_dead_letter_sink_with_its_reason() {
    let ns = TestNamespace::new("expirysink").await;
    let sink = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--housekeeping-interval", "1s"]).await;
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET)
            + &format!(
                "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: dlq}}\nspec:\n  \
                 endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
                 eventTypes: [compliance.flagged]\n---\n",
                sink.url("/dlq")
            )
            + &yaml(
                "paused",
                &sink.url("/never"),
                "",
                "  paused: true\n  delivery: {maxEventAge: 2s, deadLetterSink: {ref: {name: dlq}}}\n",
            )),
    );
    wait_ready(&ns, "dlq").await;
    eventually(
        "paused reconciled",
        || whs(&ns, "paused"),
        |w| w.status.as_ref().is_some_and(|s| !s.conditions.is_empty()),
    )
    .await;
    assert_eq!(operator.ingest(&[mail(0, "ana@finance.example")]).await.0, 202);
    let got = eventually(
        "the expired event at the sink",
        || sink.deliveries(),
        |d| d.iter().any(|r| r.path == "/dlq"),
    )
    .await;
    assert!(got.iter().all(|r| r.path == "/dlq"), "the paused endpoint got nothing");
    let copy = &got[0];
    assert!(copy.verified);
    let dead = copy.events[0].dead_letter.clone().expect("deadLetter");
    assert!(
        dead["reason"].as_str().is_some_and(|r| r.contains("maxEventAge")),
        "{dead}"
    );
    assert_eq!(dead["attempts"], 0);
    assert_eq!(copy.events[0].data["subject"], "Übernahme – streng vertraulich #0");
    eventually(
        "kept for replay as well: deadLettered=1",
        || whs(&ns, "paused"),
        |w| w.status.as_ref().is_some_and(|s| s.dead_lettered == 1),
    )
    .await;
}
