//! The operator on the PostgreSQL store (`--store-url`), end to end: a real apiserver, the
//! operator binary, a real PostgreSQL 15, a receiver verifying every signature. (The crash
//! test on it is in `durability.rs`, beside the redb one.)

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{
    INGEST_TOKEN, Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply_siem, eventually, siem_event,
    wait_ready,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_are_delivered_and_verified_on_the_postgres_store() {
    let ns = TestNamespace::new("pgstore").await;
    let url = crate::pg::database("pgstore").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let operator = Operator::start_with(&ns, &["--store-url", &url]).await;
    assert_eq!(operator.metric(r#"mailhook_store_info{kind="postgres"}"#).await, 1.0);
    apply_siem(&ns, &receiver.url("/hooks"), "  delivery: {concurrency: 16}\n");
    wait_ready(&ns, "siem").await;

    let client = reqwest::Client::new();
    let mut sent = BTreeSet::new();
    for batch in 0..10 {
        let ids: Vec<String> = (0..100).map(|i| format!("pg-{batch}-{i}")).collect();
        let body: String = ids.iter().map(|id| format!("{}\n", siem_event(id))).collect();
        let answer = client
            .post(format!("http://{}/v1/events", operator.ingest))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/x-ndjson")
            .timeout(Duration::from_secs(10))
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status().as_u16(), 202);
        sent.extend(ids);
    }
    let delivered = |got: &Vec<Received>| -> BTreeSet<String> {
        got.iter()
            .filter(|r| r.verified && r.answered == 200)
            .filter_map(Received::producer_event_id)
            .collect()
    };
    eventually(
        "1,000 events delivered and verified",
        || receiver.deliveries(),
        |got| delivered(got) == sent,
    )
    .await;
}
