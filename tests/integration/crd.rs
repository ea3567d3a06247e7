//! The CRDs on a real apiserver: they install, serve our types, keep status on its own
//! subresource, and enforce their CEL rules.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams, PostParams};
use mailhook::api::{
    Endpoint, MailboxFilter, MailboxFilterSpec, MatchCriteria, MaxBacklog, SecretRef, Signing, SizeRange,
    WebhookSubscription, WebhookSubscriptionSpec, WebhookSubscriptionStatus,
};
use serde_json::json;

use crate::support::{self, TestNamespace};

fn subscription(name: &str, url: &str) -> WebhookSubscription {
    let mut whs = WebhookSubscription::new(
        name,
        WebhookSubscriptionSpec {
            endpoint: Endpoint {
                url: url.to_string(),
                allow_insecure_http: false,
                timeout: "10s".to_string(),
                headers: vec![],
                ca_bundle: None,
                client_cert_secret_ref: None,
                insecure_skip_tls_verify: false,
                verify: false,
            },
            signing: Signing {
                secret_ref: SecretRef {
                    name: "signing".to_string(),
                },
            },
            event_types: vec![mailhook::api::EventType::MessageReceived],
            filter_refs: vec![],
            filter_selector: None,
            payload: Default::default(),
            delivery: Default::default(),
            paused: false,
        },
    );
    whs.metadata.name = Some(name.to_string());
    whs
}

#[tokio::test]
async fn crdgen_output_applies_with_kubectl_and_is_established() {
    let client = support::client().await;
    support::install_crds(&client).await;
    let (ok, crds, err) = support::mailhook(&["crdgen"]);
    assert!(ok, "crdgen failed: {err}");

    let (ok, applied, err) = support::kubectl_run(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=mailhook-tests",
            "-f",
            "-",
        ],
        Some(&crds),
    );
    assert!(ok, "kubectl apply failed: {err}");
    assert!(applied.contains("mailboxfilters.mailhook.io"), "{applied}");
    assert!(applied.contains("webhooksubscriptions.mailhook.io"), "{applied}");

    for crd in ["mailboxfilters.mailhook.io", "webhooksubscriptions.mailhook.io"] {
        let (_, established, _) = support::kubectl_run(
            &[
                "get",
                "crd",
                crd,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
            ],
            None,
        );
        assert_eq!(established, "True", "{crd} is not established");
    }
}

#[tokio::test]
async fn custom_resource_and_status_subresource_round_trip() {
    let ns = TestNamespace::new("roundtrip").await;
    let api = ns.api::<WebhookSubscription>();

    let created = api
        .create(
            &PostParams::default(),
            &subscription("siem", "https://siem.example.com/hooks"),
        )
        .await
        .expect("create WebhookSubscription");
    // Schema defaults are applied by the apiserver.
    assert_eq!(
        created.spec.delivery.retry_schedule,
        vec!["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]
    );
    let generation = created.metadata.generation;

    let status = WebhookSubscriptionStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            type_: "Ready".to_string(),
            status: "True".to_string(),
            reason: "Routed".to_string(),
            message: "test".to_string(),
            last_transition_time: Time(jiff::Timestamp::now()),
            observed_generation: generation,
        }],
        endpoint_host: Some("siem.example.com".to_string()),
        delivered: 42,
        backlog: 3,
        ..Default::default()
    };
    let patch = json!({
        "apiVersion": "mailhook.io/v1alpha1",
        "kind": "WebhookSubscription",
        "status": status,
    });
    api.patch_status(
        "siem",
        &PatchParams::apply("mailhook-tests").force(),
        &Patch::Apply(&patch),
    )
    .await
    .expect("apply status");

    let read = api.get("siem").await.expect("read back");
    let read_status = read.status.clone().expect("status was stored");
    assert_eq!(read_status.delivered, 42);
    assert_eq!(read_status.backlog, 3);
    assert_eq!(read_status.endpoint_host.as_deref(), Some("siem.example.com"));
    assert_eq!(read_status.conditions[0].type_, "Ready");
    assert_eq!(read.spec, created.spec, "a status write must not touch spec");
    assert_eq!(
        read.metadata.generation, generation,
        "a status write must not bump generation"
    );

    // A write to the main resource cannot change status: it lives on its own subresource.
    let mut edited = read.clone();
    edited.spec.paused = true;
    edited.status = Some(WebhookSubscriptionStatus::default());
    let replaced = api
        .replace("siem", &PostParams::default(), &edited)
        .await
        .expect("replace");
    assert!(replaced.spec.paused);
    assert_eq!(replaced.status.map(|s| s.delivered), Some(42));
    assert_eq!(replaced.metadata.generation, generation.map(|g| g + 1));
}

/// Asserts that creating `obj` is refused with a message containing `expected`.
async fn assert_refused<K>(api: &kube::Api<K>, obj: &K, expected: &str)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => panic!("apiserver accepted an object it should refuse ({expected})"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains(expected),
                "message {:?} lacks {expected:?}",
                status.message
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn cel_rules_refuse_nonsense_with_clear_messages() {
    let ns = TestNamespace::new("cel").await;
    let whs = ns.api::<WebhookSubscription>();

    assert_refused(
        &whs,
        &subscription("plain-http", "http://siem.example.com/hooks"),
        "endpoint.url must start with https:// (plain http:// needs endpoint.allowInsecureHttp: true)",
    )
    .await;

    let mut opted_in = subscription("plain-http-ok", "http://siem.internal/hooks");
    opted_in.spec.endpoint.allow_insecure_http = true;
    whs.create(&PostParams::default(), &opted_in)
        .await
        .expect("http with opt-in is accepted");

    let mut negative = subscription("negative-timeout", "https://siem.example.com/hooks");
    negative.spec.endpoint.timeout = "-5s".to_string();
    assert_refused(&whs, &negative, "endpoint.timeout must be a positive duration").await;

    let mut nothing = subscription("receives-nothing", "https://siem.example.com/hooks");
    nothing.spec.event_types.clear();
    assert_refused(
        &whs,
        &nothing,
        "needs at least one of eventTypes, filterRefs or filterSelector",
    )
    .await;

    // delivery.maxBacklog: a positive count, a quantity of bytes; each refusal names it.
    let capped = |name: &str, events: Option<u64>, bytes: Option<&str>| {
        let mut w = subscription(name, "https://siem.example.com/hooks");
        w.spec.delivery.max_backlog = Some(MaxBacklog {
            events,
            bytes: bytes.map(String::from),
        });
        w
    };
    let quantity = "delivery.maxBacklog.bytes must be a positive quantity of bytes such as 512Mi, 2Gi or 500M";
    assert_refused(&whs, &capped("bad-bytes", Some(5), Some("2GB")), quantity).await;
    assert_refused(&whs, &capped("zero-bytes", None, Some("0Gi")), quantity).await;
    assert_refused(
        &whs,
        &capped("zero-events", Some(0), None),
        "spec.delivery.maxBacklog.events",
    )
    .await;
    let ok = whs
        .create(&PostParams::default(), &capped("capped", Some(5), Some("1.5Gi")))
        .await
        .expect("a cap of 5 events and 1.5Gi is accepted");
    assert_eq!(
        ok.spec.delivery.max_backlog,
        Some(MaxBacklog {
            events: Some(5),
            bytes: Some("1.5Gi".into())
        })
    );

    let mbf = ns.api::<MailboxFilter>();
    let unordered = MailboxFilter::new(
        "unordered-size",
        MailboxFilterSpec {
            criteria: MatchCriteria {
                size: Some(SizeRange {
                    min_bytes: Some(10_000),
                    max_bytes: Some(10),
                }),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    assert_refused(&mbf, &unordered, "size.minBytes must not be greater than size.maxBytes").await;
}
