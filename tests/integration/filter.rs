//! MailboxFilter budgets: a filter over a limit of `mailhook run` is Ready=False/OverBudget
//! (and Stalled) naming the field and the limit, matches nothing, and leaves the filters
//! of its namespace that are within the limits working.

use serde_json::json;

use mailhook::api::MailboxFilter;

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply, condition, eventually, kubectl_run, signing_secret,
    subscription, wait_ready, whs,
};

fn filter(name: &str, spec: &str) -> String {
    format!("apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: {name}}}\nspec:\n{spec}---\n")
}

/// The message of condition `type_` on `f`.
fn message(f: &MailboxFilter, type_: &str) -> String {
    f.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn filters_over_budget_are_refused_by_name_and_the_rest_still_route() {
    let ns = TestNamespace::new("filter-budget").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--filter-max-regexes", "2", "--filter-max-per-namespace", "2"]).await;
    let mbf = ns.api::<MailboxFilter>();

    // Created together: at one second, `good` sorts before `too-many` by name.
    apply(
        &ns,
        &(filter("good", "  subject: {regex: '(?i)invoice\\s+\\d+'}\n")
            + &filter(
                "too-many",
                "  headers:\n  - {name: X-A, regex: 'a+'}\n  - {name: X-B, regex: 'b+'}\n  - {name: X-C, regex: 'c+'}\n",
            )
            + &signing_secret(SIEM_SECRET)
            + &subscription(
                "siem",
                &receiver.url("/hooks"),
                ", timeout: 5s",
                "  filterRefs: [good]\n",
            )
            + &subscription(
                "uses-too-many",
                &receiver.url("/other"),
                ", timeout: 5s",
                "  filterRefs: [too-many]\n",
            )),
    );

    let f = eventually(
        "too-many Ready=False/OverBudget",
        || async { mbf.get("too-many").await.expect("get") },
        |f| condition(f, "Ready") == Some(("False".into(), "OverBudget".into())),
    )
    .await;
    let msg = message(&f, "Ready");
    assert!(msg.starts_with("spec.headers[2].regex:"), "{msg}");
    assert!(msg.contains("limit of 2 per filter (--filter-max-regexes)"), "{msg}");
    assert!(msg.contains("matches nothing"), "{msg}");
    assert_eq!(condition(&f, "Stalled"), Some(("True".into(), "OverBudget".into())));
    eventually(
        "uses-too-many Ready=False/InvalidFilter",
        || whs(&ns, "uses-too-many"),
        |w| condition(w, "Ready") == Some(("False".into(), "InvalidFilter".into())),
    )
    .await;

    // The filter within budget in the same namespace still routes.
    wait_ready(&ns, "siem").await;
    let good = mbf.get("good").await.expect("get good");
    assert_eq!(condition(&good, "Ready"), Some(("True".into(), "Valid".into())));
    let event = |id: &str, subject: &str| {
        json!({"type": "message.received", "eventId": id, "mailbox": "alice@finance.example.com",
               "from": "x@partner.org", "to": ["alice@finance.example.com"], "subject": subject,
               "headers": {"X-A": "aaa", "X-B": "bbb", "X-C": "ccc"}})
    };
    let (status, _) = operator
        .ingest(&[event("e-1", "Invoice 42"), event("e-2", "lunch")])
        .await;
    assert_eq!(status, 202);
    eventually("a delivery to siem", || receiver.deliveries(), |d| !d.is_empty()).await;
    // A moment for any wrong delivery to arrive too.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let got = receiver.deliveries().await;
    assert_eq!(got.len(), 1, "only the invoice, only to siem: {got:?}");
    assert_eq!(got[0].json()["data"]["producerEventId"], "e-1");

    // A third filter is beyond --filter-max-per-namespace 2: refused, uncompiled.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    apply(&ns, &filter("newest", "  subject: {keywords: [report]}\n"));
    let f = eventually(
        "newest Ready=False/OverBudget",
        || async { mbf.get("newest").await.expect("get") },
        |f| condition(f, "Ready") == Some(("False".into(), "OverBudget".into())),
    )
    .await;
    let msg = message(&f, "Ready");
    assert!(msg.contains("MailboxFilter 3 of 3"), "{msg}");
    assert!(
        msg.contains("limit of 2 per namespace (--filter-max-per-namespace)"),
        "{msg}"
    );
    let good = mbf.get("good").await.expect("get good");
    assert_eq!(
        condition(&good, "Ready"),
        Some(("True".into(), "Valid".into())),
        "the older keep their place"
    );

    // An older one going makes room: the newest is compiled and Ready.
    let (ok, _, err) = kubectl_run(&["delete", "mbf", "too-many", "-n", &ns.name], None);
    assert!(ok, "{err}");
    let f = eventually(
        "newest Ready=True once too-many is gone",
        || async { mbf.get("newest").await.expect("get") },
        |f| condition(f, "Ready") == Some(("True".into(), "Valid".into())),
    )
    .await;
    assert_eq!(condition(&f, "Stalled"), None);
}
