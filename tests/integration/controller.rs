//! The controller, as the real `mailhook run` binary against a real apiserver: examples
//! become Ready, references are followed, status and Events tell the truth.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams};
use mailhook::api::{MailboxFilter, WebhookSubscription};

use crate::support::{Operator, TestNamespace, apply_path, condition, eventually, kubectl_run, whs};

/// Waits until what `apply_path(ns, "examples")` made is Ready: `kubectl apply -R`, as a
/// user trying the folder would, does not pick up the quick start's templates, so exactly
/// the three example subscriptions and two filters.
async fn all_ready(ns: &TestNamespace) {
    let subscriptions = ns.api::<WebhookSubscription>();
    let mbf = ns.api::<MailboxFilter>();
    eventually(
        "every example WebhookSubscription Ready=True",
        || async {
            subscriptions
                .list(&ListParams::default())
                .await
                .expect("list whs")
                .items
        },
        |items| {
            items.len() == 3
                && items
                    .iter()
                    .all(|w| condition(w, "Ready").is_some_and(|(s, _)| s == "True"))
        },
    )
    .await;
    eventually(
        "every example MailboxFilter Ready=True",
        || async { mbf.list(&ListParams::default()).await.expect("list mbf").items },
        |items| {
            items.len() == 2
                && items
                    .iter()
                    .all(|f| condition(f, "Ready").is_some_and(|(s, _)| s == "True"))
        },
    )
    .await;
}

#[tokio::test]
async fn examples_become_ready_and_printer_columns_fill_in() {
    let ns = TestNamespace::new("examples").await;
    let _operator = Operator::start(&ns).await;
    apply_path(&ns, "examples");
    all_ready(&ns).await;

    let (ok, out, err) = kubectl_run(&["get", "whs,mbf", "-n", &ns.name], None);
    assert!(ok, "{err}");
    let siem = out
        .lines()
        .find(|l| l.contains("siem-finance"))
        .expect("siem-finance row");
    let cols: Vec<&str> = siem.split_whitespace().collect();
    // NAME ENDPOINT READY HEALTHY BACKLOG DELIVERED [LAST SUCCESS] AGE
    assert_eq!(&cols[1..6], &["siem.example.com", "True", "Unknown", "0", "0"], "{out}");
    let legal = out
        .lines()
        .find(|l| l.contains("legal-hold-external-pdf"))
        .expect("filter row");
    assert!(
        legal.contains("True") && legal.matches("legal-hold-external-pdf").count() == 2,
        "{out}"
    );

    // The `mailhook` category lists both kinds.
    let (ok, out, err) = kubectl_run(&["get", "mailhook", "-n", &ns.name, "-o", "name"], None);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("webhooksubscription.mailhook.io/"))
            .count(),
        3,
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("mailboxfilter.mailhook.io/"))
            .count(),
        2,
        "{out}"
    );

    // Filters list the subscriptions that use them, by name and by selector.
    let mbf = ns.api::<MailboxFilter>();
    let users = |name: &'static str| {
        let mbf = mbf.clone();
        async move {
            mbf.get(name)
                .await
                .expect("get filter")
                .status
                .map(|s| s.subscriptions)
                .unwrap_or_default()
        }
    };
    eventually(
        "finance-inbound users",
        || users("finance-inbound"),
        |u| u == &["siem-finance"],
    )
    .await;
    eventually(
        "legal filter users",
        || users("legal-hold-external-pdf"),
        |u| u == &["legal-hold"],
    )
    .await;

    // Ready came from the current generation.
    let w = whs(&ns, "siem-finance").await;
    let status = w.status.expect("status");
    assert_eq!(status.observed_generation, w.metadata.generation);
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.observed_generation == w.metadata.generation)
    );
}

#[tokio::test]
async fn deleting_a_referenced_secret_turns_ready_false_and_recreating_restores_it() {
    let ns = TestNamespace::new("secret-lifecycle").await;
    let _operator = Operator::start(&ns).await;
    apply_path(&ns, "examples");
    all_ready(&ns).await;
    let before = whs(&ns, "siem-finance").await.status.expect("status");
    let untouched = whs(&ns, "analytics-metadata").await.status.expect("status");
    // Conditions carry whole seconds: step past this one so a transition shows.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    ns.api::<Secret>()
        .delete("siem-signing", &DeleteParams::default())
        .await
        .expect("delete secret");
    let w = eventually(
        "siem-finance Ready=False/SecretNotFound",
        || whs(&ns, "siem-finance"),
        |w| condition(w, "Ready") == Some(("False".into(), "SecretNotFound".into())),
    )
    .await;
    let ready = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready");
    assert!(
        ready.message.contains("siem-signing") && ready.message.contains("kubectl create secret"),
        "{}",
        ready.message
    );
    // Other subscriptions are untouched.
    assert_eq!(
        condition(&whs(&ns, "analytics-metadata").await, "Ready"),
        Some(("True".into(), "Valid".into()))
    );
    // The transition is recorded as a Warning Event on the subscription.
    let selector = [
        "get",
        "events",
        "-n",
        &ns.name,
        "--field-selector",
        "involvedObject.name=siem-finance",
        "-o",
        "custom-columns=T:.type,R:.reason",
    ];
    eventually(
        "a Warning SecretNotFound Event",
        || async { kubectl_run(&selector, None) },
        |(ok, events, _)| *ok && events.contains("Warning") && events.contains("SecretNotFound"),
    )
    .await;

    apply_path(&ns, "examples/secrets.yaml");
    let w = eventually(
        "siem-finance Ready=True again",
        || whs(&ns, "siem-finance"),
        |w| condition(w, "Ready") == Some(("True".into(), "Valid".into())),
    )
    .await;
    let t = |s: &mailhook::api::WebhookSubscriptionStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.last_transition_time.clone())
    };
    assert_ne!(
        t(&before),
        t(w.status.as_ref().expect("status")),
        "lastTransitionTime moves on a transition"
    );
    let still = whs(&ns, "analytics-metadata").await.status.expect("status");
    assert_eq!(t(&untouched), t(&still), "no transition, no new lastTransitionTime");
}

#[tokio::test]
async fn an_invalid_filter_is_reported_on_it_and_on_its_subscribers() {
    let ns = TestNamespace::new("invalid-filter").await;
    let _operator = Operator::start(&ns).await;
    apply_path(&ns, "examples");
    all_ready(&ns).await;

    let patch = r#"{"spec":{"subject":{"regex":"(unclosed"}}}"#;
    let (ok, _, err) = kubectl_run(
        &[
            "patch",
            "mbf",
            "finance-inbound",
            "-n",
            &ns.name,
            "--type=merge",
            "-p",
            patch,
        ],
        None,
    );
    assert!(ok, "{err}");
    let mbf = ns.api::<MailboxFilter>();
    let f = eventually(
        "finance-inbound Ready=False/InvalidPattern",
        || async { mbf.get("finance-inbound").await.expect("get") },
        |f| condition(f, "Ready") == Some(("False".into(), "InvalidPattern".into())),
    )
    .await;
    let msg = &f.status.expect("status").conditions[0].message;
    assert!(msg.starts_with("spec.subject.regex:"), "{msg}");

    eventually(
        "siem-finance Ready=False/InvalidFilter",
        || whs(&ns, "siem-finance"),
        |w| condition(w, "Ready") == Some(("False".into(), "InvalidFilter".into())),
    )
    .await;
}

#[tokio::test]
async fn kubectl_apply_refuses_nonsense_with_clear_messages() {
    let ns = TestNamespace::new("refused").await;
    let whs = |endpoint: &str| {
        format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: bad, namespace: {}}}\nspec:\n  endpoint: {endpoint}\n  signing: {{secretRef: {{name: s}}}}\n  eventTypes: [message.received]\n",
            ns.name
        )
    };
    let cases = [
        (
            whs("{url: 'http://siem.example.com/hooks'}"),
            "endpoint.url must start with https://",
        ),
        (
            whs("{url: 'https://siem.example.com/hooks', timeout: '-5s'}"),
            "endpoint.timeout must be a positive duration",
        ),
        (
            format!(
                "apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: bad, namespace: {}}}\nspec:\n  size: {{minBytes: 5000, maxBytes: 10}}\n",
                ns.name
            ),
            "size.minBytes must not be greater than size.maxBytes",
        ),
    ];
    // A minimal object gets the schema's defaults from the apiserver itself.
    let minimal = whs("{url: 'https://siem.example.com/hooks'}").replace("name: bad", "name: minimal");
    let (ok, _, err) = kubectl_run(&["apply", "-f", "-"], Some(&minimal));
    assert!(ok, "{err}");
    let (_, schedule, _) = kubectl_run(
        &[
            "get",
            "whs",
            "minimal",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.delivery.retrySchedule}",
        ],
        None,
    );
    assert_eq!(schedule, r#"["0s","5s","5m","30m","2h","5h","10h","10h"]"#);

    for (yaml, expected) in cases {
        let (ok, _, err) = kubectl_run(&["apply", "-f", "-"], Some(&yaml));
        assert!(!ok, "kubectl apply accepted:\n{yaml}");
        assert!(err.contains(expected), "stderr {err:?} lacks {expected:?}");
    }
}

#[tokio::test]
async fn kubectl_explain_describes_every_delivery_field() {
    let client = crate::support::client().await;
    crate::support::install_crds(&client).await;
    // The apiserver publishes a new CRD's OpenAPI a moment after it is established.
    let out = eventually(
        "kubectl explain whs.spec.delivery",
        || async { kubectl_run(&["explain", "whs.spec.delivery"], None) },
        |(ok, _, _)| *ok,
    )
    .await
    .1;
    let fields: Vec<&str> = out.split("FIELDS:").nth(1).expect("FIELDS section").lines().collect();
    let names = [
        "concurrency",
        "deadLetterRetention",
        "disableAfter",
        "maxEventAge",
        "ordering",
        "rateLimitPerSecond",
        "retrySchedule",
    ];
    for name in names {
        let i = fields
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{name}\t")))
            .unwrap_or_else(|| panic!("{name} missing:\n{out}"));
        let description = fields.get(i + 1).map(|l| l.trim()).unwrap_or_default();
        assert!(!description.is_empty(), "{name} has no description:\n{out}");
    }
    assert!(out.contains("Retries, limits and ordering."), "{out}");
}

#[tokio::test]
async fn resources_made_before_start_are_reconciled_and_sigterm_stops_cleanly() {
    let ns = TestNamespace::new("restart").await;
    apply_path(&ns, "examples");
    let mut operator = Operator::start(&ns).await;
    all_ready(&ns).await;
    // Readiness is made of named parts; `?verbose` says which holds.
    let verbose = reqwest::get(format!("http://{}/readyz?verbose", operator.admin))
        .await
        .expect("readyz")
        .text()
        .await
        .expect("body");
    assert!(
        verbose.contains("[+]controllers ok") && verbose.contains("[+]shutdown ok") && verbose.ends_with("ready\n"),
        "{verbose}"
    );
    let status = operator
        .terminate(std::time::Duration::from_secs(10))
        .expect("exits within 10s of SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
}
