//! Reconcile cost at scale: 1,000 WebhookSubscriptions and 100 MailboxFilters applied at
//! once must all become Ready. The time it takes, the reconciles per resource, the status
//! writes and the operator's memory are printed as figures (BENCHMARKS.md), never
//! asserted: these machines are shared. `MAILHOOK_BIN` runs another build (e.g. an
//! earlier commit's) for a before/after comparison in the same conditions.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{ListParams, PostParams};
use mailhook::api::{MailboxFilter, WebhookSubscription};

use crate::support::{Operator, TestNamespace};

const SUBSCRIPTIONS: usize = 1_000;
const FILTERS: usize = 100;
/// Each tenth subscription selects its filters by label; the rest name one.
const SELECTING: usize = 10;

fn filter(i: usize) -> MailboxFilter {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailhook.io/v1alpha1",
        "kind": "MailboxFilter",
        "metadata": {"name": format!("f-{i}"), "labels": {"team": format!("t{}", i % 10)}},
        "spec": {
            "domains": [format!("dept{i}.example.com")],
            "subject": {"keywords": ["invoice", format!("ticket-{i}")]},
        },
    }))
    .expect("a MailboxFilter")
}

fn subscription(i: usize) -> WebhookSubscription {
    let filters = if i.is_multiple_of(SELECTING) {
        serde_json::json!({"filterSelector": {"matchLabels": {"team": format!("t{}", i % 10)}}})
    } else {
        serde_json::json!({"filterRefs": [format!("f-{}", i % FILTERS)]})
    };
    let mut spec = serde_json::json!({
        "endpoint": {"url": format!("http://127.0.0.1:9/hooks/{i}"), "allowInsecureHttp": true},
        "signing": {"secretRef": {"name": "scale-signing"}},
        "eventTypes": ["message.received"],
    });
    if let (Some(spec), Some(filters)) = (spec.as_object_mut(), filters.as_object()) {
        spec.extend(filters.clone());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailhook.io/v1alpha1",
        "kind": "WebhookSubscription",
        "metadata": {"name": format!("s-{i}")},
        "spec": spec,
    }))
    .expect("a WebhookSubscription")
}

fn ready<K>(
    objects: &[K],
    conditions: impl Fn(&K) -> Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>,
) -> usize {
    objects
        .iter()
        .filter(|o| conditions(o).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
        .count()
}

/// Resident and peak memory of a process, in MiB, from /proc.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscriptions_and_a_hundred_filters_all_become_ready() {
    let ns = TestNamespace::new("scale").await;
    let operator = Operator::start(&ns).await;
    let (idle_rss, _) = memory_mib(operator.pid());
    let secrets = ns.api::<k8s_openapi::api::core::v1::Secret>();
    let secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "scale-signing"},
        "stringData": {"key": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
    }))
    .expect("a Secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the signing Secret");

    let started = Instant::now();
    let (filters, subscriptions) = (ns.api::<MailboxFilter>(), ns.api::<WebhookSubscription>());
    let creates = (0..FILTERS)
        .map(|i| {
            let api = filters.clone();
            futures::future::Either::Left(
                async move { api.create(&PostParams::default(), &filter(i)).await.map(|_| ()) },
            )
        })
        .chain((0..SUBSCRIPTIONS).map(|i| {
            let api = subscriptions.clone();
            futures::future::Either::Right(async move {
                api.create(&PostParams::default(), &subscription(i)).await.map(|_| ())
            })
        }));
    let failed: Vec<_> = futures::stream::iter(creates)
        .buffer_unordered(32)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(failed.is_empty(), "creating the resources failed: {failed:?}");
    let applied = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut subs_ready, mut filters_ready) = (0, 0);
    while Instant::now() < deadline {
        let subs = subscriptions
            .list(&ListParams::default())
            .await
            .expect("list subscriptions");
        let fs = filters.list(&ListParams::default()).await.expect("list filters");
        subs_ready = ready(&subs.items, |w| w.status.as_ref().map(|s| &s.conditions));
        filters_ready = ready(&fs.items, |f| f.status.as_ref().map(|s| &s.conditions));
        if subs_ready == SUBSCRIPTIONS && filters_ready == FILTERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_ready = started.elapsed();
    // Settled: whatever the burst left queued has run.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, peak) = memory_mib(operator.pid());
    let metrics = operator.metrics().await;
    let series = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .fold(0.0, |a, b| a + b)
    };
    let subscription_reconciles = series(r#"mailhook_reconcile_duration_seconds_count{kind="WebhookSubscription"}"#);
    let filter_reconciles = series(r#"mailhook_reconcile_duration_seconds_count{kind="MailboxFilter"}"#);
    eprintln!(
        "scale: {SUBSCRIPTIONS} subscriptions + {FILTERS} filters created in {:.1} s; {subs_ready} and {filters_ready} Ready after {:.1} s; \
         reconciles per subscription {:.2}, per filter {:.2}; status writes {}; route rebuilds {}; \
         reconcile time per subscription {:.1} ms; RSS idle {idle_rss:.0} MiB, with them {rss:.0} MiB (peak {peak:.0} MiB)",
        applied.as_secs_f64(),
        all_ready.as_secs_f64(),
        subscription_reconciles / SUBSCRIPTIONS as f64,
        filter_reconciles / FILTERS as f64,
        series("mailhook_status_writes_total"),
        series("mailhook_route_rebuilds_total"),
        1000.0 * series(r#"mailhook_reconcile_duration_seconds_sum{kind="WebhookSubscription"}"#)
            / subscription_reconciles.max(1.0),
    );
    assert_eq!(
        (subs_ready, filters_ready),
        (SUBSCRIPTIONS, FILTERS),
        "not every resource became Ready within 300 s; the operator's log:\n{}",
        operator.log()
    );
    assert!(
        subscription_reconciles >= SUBSCRIPTIONS as f64,
        "every subscription was reconciled"
    );
}
