//! MailSource: a feed a cluster admin expects to keep reporting. The SMTP journal feed
//! reports (a real swaks session), then stops: the MailSource turns Ready=False/Silent
//! naming the feed and what to check, and /metrics holds the time of its last events.

use std::time::Duration;

use kube::Api;
use mailhook::api::MailSource;

use crate::smtp::swaks_mail;
use crate::support::{DOVECOT_TOKEN, Operator, TestNamespace, eventually, free_port, kubectl_run, siem_event};

/// (status, reason, message) of the Ready condition.
fn ready(s: &MailSource) -> Option<(String, String, String)> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Deletes the (cluster-scoped) MailSource when the test ends, passed or not.
struct Declared(String);

impl Drop for Declared {
    fn drop(&mut self) {
        let _ = kubectl_run(
            &["delete", "mailsource", &self.0, "--ignore-not-found", "--wait=false"],
            None,
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_feed_that_stops_turns_its_mail_source_silent_naming_it() {
    let ns = TestNamespace::new("silent-journal").await;
    let smtp = free_port();
    let smtp_arg = smtp.to_string();
    let operator = Operator::start_with(&ns, &["--smtp-addr", &smtp_arg, "--internal-domains", "contoso.com"]).await;
    let name = format!("{}-journal", ns.name);
    let _declared = Declared(name.clone());
    let declare = |producer: &str, window: &str| {
        format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: MailSource\nmetadata:\n  name: {name}\n  labels: {{mailhook.io/test-namespace: {}}}\n\
             spec: {{source: smtp, producer: {producer}, silentAfter: {window}}}\n",
            ns.name
        )
    };

    // Refused at apply, naming the field and the fix.
    let (ok, _, err) = kubectl_run(&["apply", "-f", "-"], Some(&declare("crm", "8s")));
    assert!(
        !ok && err.contains("spec.producer of an smtp source must be journal"),
        "{err}"
    );
    let (ok, _, err) = kubectl_run(&["apply", "-f", "-"], Some(&declare("journal", "soon")));
    assert!(
        !ok && err.contains("spec.silentAfter must be a positive duration"),
        "{err}"
    );

    let (ok, _, err) = kubectl_run(&["apply", "-f", "-"], Some(&declare("journal", "8s")));
    assert!(ok, "{err}");
    let api: Api<MailSource> = Api::all(ns.client.clone());
    let get = || {
        let (api, name) = (api.clone(), name.clone());
        async move { api.get(&name).await.expect("get MailSource") }
    };

    // One journaled message: the feed reports.
    let (sent, out) = swaks_mail(
        smtp,
        "billing@fabrikam.com",
        "alice@contoso.com",
        "Invoice",
        "Hello",
        &[],
    );
    assert!(sent && out.contains("250 2.0.0 OK: recorded as evt_"), "{out}");
    let reporting = eventually("Ready=True/Reporting with lastEventAt", get, |s| {
        ready(s).is_some_and(|(status, reason, _)| status == "True" && reason == "Reporting")
            && s.status.as_ref().is_some_and(|st| st.last_event_at.is_some())
    })
    .await;
    let last = reporting
        .status
        .and_then(|s| s.last_event_at)
        .expect("lastEventAt")
        .0
        .as_second();
    let series = eventually(
        "the journal's series on /metrics",
        || operator.metrics(),
        |text| {
            text.lines().any(|l| {
                l.starts_with("mailhook_source_last_event_timestamp_seconds{")
                    && l.contains("producer=\"journal\"")
                    && l.contains("source=\"smtp\"")
            })
        },
    )
    .await;
    let value: i64 = series
        .lines()
        .find(|l| l.starts_with("mailhook_source_last_event_timestamp_seconds{") && l.contains("producer=\"journal\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("a value");
    assert_eq!(value, last, "the metric and the status tell the same time");

    // Nothing more: past the window it is silent, and the status says which feed and
    // what to check.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let silent = eventually("Ready=False/Silent", get, |s| {
        ready(s).is_some_and(|(status, reason, _)| status == "False" && reason == "Silent")
    })
    .await;
    let (_, _, message) = ready(&silent).expect("Ready");
    for needed in [
        "SMTP journal feed",
        "has been silent since its last events at",
        "spec.silentAfter 8s",
        "always_bcc",
        "--smtp-addr",
    ] {
        assert!(message.contains(needed), "{needed:?} missing from: {message}");
    }
    assert_eq!(
        silent
            .status
            .as_ref()
            .and_then(|s| s.last_event_at.as_ref())
            .map(|t| t.0.as_second()),
        Some(last),
        "lastEventAt still names the last events"
    );
    assert_eq!(
        silent.status.as_ref().and_then(|s| s.observed_generation),
        silent.metadata.generation
    );

    // It reports again once mail flows again.
    let (sent, out) = swaks_mail(smtp, "billing@fabrikam.com", "alice@contoso.com", "Again", "Hello", &[]);
    assert!(sent, "{out}");
    eventually("Ready=True/Reporting again", get, |s| {
        ready(s).is_some_and(|(status, reason, _)| status == "True" && reason == "Reporting")
    })
    .await;
}

/// The value of the series of (`source`, `producer`) in an exposition, if there is one.
fn last_event(metrics: &str, source: &str, producer: &str) -> Option<i64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("mailhook_source_last_event_timestamp_seconds{"))
        .find(|l| l.contains(&format!("source=\"{source}\"")) && l.contains(&format!("producer=\"{producer}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn http_and_dovecot_producers_are_named_by_their_credentials() {
    let ns = TestNamespace::new("source-producers").await;
    let operator = Operator::start(&ns).await;
    let name = format!("{}-ingest", ns.name);
    let _declared = Declared(name.clone());
    let yaml = format!(
        "apiVersion: mailhook.io/v1alpha1\nkind: MailSource\nmetadata:\n  name: {name}\n  labels: {{mailhook.io/test-namespace: {}}}\n\
         spec: {{source: http, producer: ingest, silentAfter: 1h}}\n",
        ns.name
    );
    let (ok, _, err) = kubectl_run(&["apply", "-f", "-"], Some(&yaml));
    assert!(ok, "{err}");

    // The test token file's bare token is the credential `ingest`; the Dovecot file's is
    // `dovecot-test`.
    let (status, body) = operator.ingest(&[siem_event("p-1")]).await;
    assert_eq!(status, 202, "{body}");
    let batch = serde_json::json!({"version": 1, "batch": "s:1", "user": "alice@example.test", "events": [
        {"event": "MailboxCreate", "mailbox": "Projects"}]});
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/sources/dovecot", operator.ingest))
        .bearer_auth(DOVECOT_TOKEN)
        .header("content-type", "application/json")
        .body(batch.to_string())
        .send()
        .await
        .expect("Dovecot batch");
    assert_eq!(r.status().as_u16(), 202);
    let metrics = eventually(
        "both producers on /metrics",
        || operator.metrics(),
        |m| last_event(m, "http", "ingest").is_some() && last_event(m, "dovecot", "dovecot-test").is_some(),
    )
    .await;
    let now = jiff::Timestamp::now().as_second();
    for (source, producer) in [("http", "ingest"), ("dovecot", "dovecot-test")] {
        let at = last_event(&metrics, source, producer).unwrap_or_default();
        assert!((now - 60..=now).contains(&at), "{source}/{producer}: {at}, now {now}");
    }

    let api: Api<MailSource> = Api::all(ns.client.clone());
    eventually(
        "the ingest credential's MailSource Ready=True/Reporting",
        || {
            let (api, name) = (api.clone(), name.clone());
            async move { api.get(&name).await.expect("get MailSource") }
        },
        |s| ready(s).is_some_and(|(status, reason, _)| status == "True" && reason == "Reporting"),
    )
    .await;
}
