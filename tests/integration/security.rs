//! Security defaults on real components: the egress guard (SSRF), mutual TLS with a
//! rotated client certificate, ed25519 (v1a) signatures verified with the public key
//! alone, and endpoint verification.

use serde_json::Value;

use crate::support::{Operator, Receiver, SIEM_SECRET, TestNamespace, eventually, kubectl_run, siem_event};

/// A subscription to message.received at `url`, signed with the `signing` Secret.
fn subscription(name: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: {name}}}\nspec:\n  \
         endpoint: {{url: '{url}', allowInsecureHttp: true{extra}}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
         eventTypes: [message.received]\n---\n"
    )
}

fn apply(ns: &TestNamespace, yaml: &str) {
    let (ok, _, err) = kubectl_run(&["apply", "-n", &ns.name, "-f", "-"], Some(yaml));
    assert!(ok, "{err}");
}

fn signing_secret(value: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\nstringData: {{key: {value}}}\n---\n")
}

/// The subscription's status once `check` holds.
async fn status_of(ns: &TestNamespace, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    let api = ns.api::<mailhook::api::WebhookSubscription>();
    eventually(
        &format!("status of {name}"),
        || async {
            let w = api.get(name).await.expect("get");
            serde_json::to_value(w.status).unwrap_or_default()
        },
        check,
    )
    .await
}

fn ready(status: &Value) -> Option<(&str, &str, &str)> {
    let c = status["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?;
    Some((c["status"].as_str()?, c["reason"].as_str()?, c["message"].as_str()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_guard_refuses_internal_targets_and_lets_an_allowlisted_receiver_through() {
    assert!(
        std::net::ToSocketAddrs::to_socket_addrs(&("private.mailhook.test", 80))
            .is_ok_and(|mut a| a.next().is_some_and(|a| a.ip().to_string() == "10.255.255.1")),
        "private.mailhook.test must resolve to 10.255.255.1 (tests/setup adds it to /etc/hosts)"
    );
    let ns = TestNamespace::new("egress").await;
    // A real receiver on 127.0.0.1 that nothing may reach, and the allowlisted internal
    // receivers on 127.0.0.2.
    let trap = Receiver::start(SIEM_SECRET);
    let internal = Receiver::start_args(&["--secret", SIEM_SECRET, "--host", "127.0.0.2"]);
    let redirector = Receiver::start_args(&["--secret", SIEM_SECRET, "--host", "127.0.0.2"]);
    redirector
        .mode(r#"{"redirect": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}"#)
        .await;
    let operator = Operator::start_with(&ns, &["--egress-allow", "127.0.0.2/32"]);
    let refused = [
        ("loopback", trap.url("/hooks"), "127.0.0.1 is a loopback address"),
        (
            "loopback-mapped",
            format!("http://[::ffff:127.0.0.1]:{}/hooks", trap.port),
            "is a loopback address",
        ),
        (
            "localhost",
            format!("http://localhost:{}/hooks", trap.port),
            "refuses localhost",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "cloud metadata endpoints live here",
        ),
        (
            "private-name",
            "http://private.mailhook.test:8080/hooks".to_string(),
            "private.mailhook.test: 10.255.255.1 is a private address",
        ),
    ];
    let mut yaml = signing_secret(SIEM_SECRET);
    for (name, url, _) in &refused {
        yaml.push_str(&subscription(name, url, ""));
    }
    yaml.push_str(&subscription("internal", &internal.url("/hooks"), ""));
    yaml.push_str(&subscription("redirected", &redirector.url("/hooks"), ""));
    apply(&ns, &yaml);
    operator.ready().await;

    for (name, _, why) in &refused {
        let status = status_of(&ns, name, |s| ready(s).is_some_and(|r| r.0 == "False")).await;
        let (_, reason, message) = ready(&status).expect("Ready");
        assert_eq!(reason, "EgressRefused", "{name}: {message}");
        assert!(
            message.contains(why) && message.contains("--egress-allow"),
            "{name}: {message}"
        );
    }
    status_of(&ns, "internal", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    status_of(&ns, "redirected", |s| ready(s).is_some_and(|r| r.0 == "True")).await;

    let (code, body) = operator.ingest(&[siem_event("egress-1")]).await;
    assert_eq!(code, 202, "{body}");
    eventually(
        "the allowlisted internal receiver got the event",
        || internal.deliveries(),
        |d| d.iter().any(|r| r.verified && r.answered == 200),
    )
    .await;
    let status = status_of(&ns, "redirected", |s| s["lastFailure"]["message"].is_string()).await;
    let failure = status["lastFailure"]["message"].as_str().unwrap_or_default();
    assert!(
        failure.contains("redirect to http://169.254.169.254/latest/meta-data/iam/security-credentials/ not followed")
            && failure.contains("cloud metadata"),
        "{failure}"
    );
    assert!(
        trap.deliveries().await.is_empty(),
        "not a single request reached the refused receiver"
    );
}
