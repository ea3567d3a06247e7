//! Several replicas on one shared PostgreSQL store (`--shared-store`), end to end: three
//! real operator processes on a real apiserver and a real PostgreSQL 15, every event sent
//! to whichever replica answers, a receiver that verifies every signature and records how
//! many requests each subscription had in progress at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{
    INGEST_TOKEN, Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply, eventually, signing_secret,
    subscription, wait_ready, whs,
};

const SHARDS: usize = 8;
const SUBSCRIPTIONS: usize = 6;
const CONCURRENCY: u32 = 2;
const MAILBOXES: usize = 12;
/// The longest a killed replica's shards may take to deliver again.
const FAILOVER_WITHIN: Duration = Duration::from_secs(15);

fn flags(url: &str, ns: &TestNamespace, name: &str) -> Vec<String> {
    [
        "--store-url",
        url,
        "--shared-store",
        "--shards",
        &SHARDS.to_string(),
        "--replica-name",
        name,
        "--leader-lease-namespace",
        &ns.name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn start(url: &str, ns: &TestNamespace, name: &str) -> Operator {
    start_with(url, ns, name, &[]).await
}

async fn start_with(url: &str, ns: &TestNamespace, name: &str, extra: &[&str]) -> Operator {
    let flags = flags(url, ns, name);
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.extend(extra);
    Operator::start_with(ns, &flags).await
}

/// The shards a replica says it owns (`mailhook_shard_owned`).
async fn owned(operator: &Operator) -> BTreeSet<u32> {
    operator
        .metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("mailhook_shard_owned{shard=\""))
        .filter_map(|rest| {
            let (shard, value) = rest.split_once("\"} ")?;
            (value.trim() == "1").then(|| shard.parse().ok()).flatten()
        })
        .collect()
}

/// Who owns what, over the replicas that are up (`None`: down).
async fn ownership(replicas: Vec<Option<&Operator>>) -> Vec<BTreeSet<u32>> {
    let mut out = Vec::new();
    for r in &replicas {
        out.push(match r {
            Some(o) => owned(o).await,
            None => BTreeSet::new(),
        });
    }
    out
}

fn settled(owners: &[BTreeSet<u32>], live: usize) -> bool {
    let all: BTreeSet<u32> = owners.iter().flatten().copied().collect();
    let total: usize = owners.iter().map(BTreeSet::len).sum();
    let fair = SHARDS.div_ceil(live);
    all.len() == SHARDS && total == SHARDS && owners.iter().all(|o| o.len() <= fair + 1)
}

/// Every replica, all up.
fn live(r: &[Operator]) -> Vec<Option<&Operator>> {
    r.iter().map(Some).collect()
}

/// An event of `mailbox` numbered `n` in that mailbox's order.
fn event(mailbox: usize, n: usize) -> serde_json::Value {
    let address = format!("user{mailbox}@contoso.com");
    serde_json::json!({"type": "message.received", "eventId": format!("mb{mailbox:02}-{n:06}"),
        "mailbox": address, "from": "x@partner.org", "to": [address], "subject": format!("n={n} – Grüße")})
}

/// (mailbox, n) from a producer id made by `event`.
fn parse(id: &str) -> Option<(usize, usize)> {
    let (mb, n) = id.strip_prefix("mb")?.split_once('-')?;
    Some((mb.parse().ok()?, n.parse().ok()?))
}

/// Sends a batch (one event per mailbox) every `every`, each to the next replica, until
/// `stop`; a batch that is not acknowledged goes to the next replica, unchanged (its
/// producer ids de-duplicate whatever the first one stored). Returns what was acknowledged.
async fn send(
    ports: Vec<std::net::SocketAddr>,
    every: Duration,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut n = 0;
    let mut next = 0;
    while !stop.load(Ordering::SeqCst) {
        let events: Vec<serde_json::Value> = (0..MAILBOXES).map(|mb| event(mb, n)).collect();
        let body: String = events.iter().map(|e| format!("{e}\n")).collect();
        loop {
            let port = ports[next % ports.len()];
            next += 1;
            let answer = client
                .post(format!("http://{port}/v1/events"))
                .bearer_auth(INGEST_TOKEN)
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            if answer.is_ok_and(|a| a.status().as_u16() == 202) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        acked
            .lock()
            .expect("acked")
            .extend(events.iter().filter_map(|e| e["eventId"].as_str().map(String::from)));
        n += 1;
        tokio::time::sleep(every).await;
    }
}

fn path(i: usize) -> String {
    format!("/hooks/s{i}")
}

/// Verified, accepted deliveries per subscription path.
fn by_path(got: &[Received]) -> HashMap<String, Vec<&Received>> {
    let mut out: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in got.iter().filter(|r| r.verified && r.answered == 200) {
        out.entry(r.path.clone()).or_default().push(r);
    }
    out
}

/// The leader among the replicas that are up (`mailhook_leader`), if exactly one says so.
async fn leader(replicas: Vec<Option<&Operator>>) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        if let Some(o) = r
            && o.metric("mailhook_leader").await == 1.0
        {
            leaders.push(i);
        }
    }
    (leaders.len() == 1).then(|| leaders[0])
}

/// Three replicas deliver a sustained load for six subscriptions (perMailbox ordering,
/// concurrency 2). One replica is SIGKILLed three times (restarted after each), then the
/// leader is: every acknowledged event reaches every subscription, in order per mailbox,
/// duplicates stay within what was in flight, no subscription ever has more requests in
/// progress than its concurrency, the killed replica's shards deliver again within 15 s,
/// another replica leads within 15 s, and the status counters count every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_work_and_survive_kills_without_losing_or_reordering() {
    let ns = TestNamespace::new("replicas").await;
    let url = crate::pg::database("replicas").await;
    let receiver = Receiver::start(SIEM_SECRET);
    // Each request takes a moment: overlapping deliveries would show.
    receiver.mode(r#"{"delay": 0.01}"#).await;
    let names = ["replica-a", "replica-b", "replica-c"];
    let mut replicas = Vec::new();
    for name in names {
        replicas.push(start(&url, &ns, name).await);
    }
    eventually(
        "the shards are shared out among the three",
        || ownership(live(&replicas)),
        |owners| settled(owners, 3) && owners.iter().all(|o| !o.is_empty()),
    )
    .await;
    let first_leader = eventually("one leader", || leader(live(&replicas)), Option::is_some)
        .await
        .unwrap_or_default();

    let mut yaml = signing_secret(SIEM_SECRET);
    for i in 0..SUBSCRIPTIONS {
        yaml += &subscription(
            &format!("s{i}"),
            &receiver.url(&path(i)),
            "",
            &format!("  delivery: {{concurrency: {CONCURRENCY}, ordering: perMailbox}}\n"),
        );
    }
    apply(&ns, &yaml);
    for i in 0..SUBSCRIPTIONS {
        wait_ready(&ns, &format!("s{i}")).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sender = tokio::spawn(send(
        replicas.iter().map(|r| r.ingest).collect(),
        Duration::from_millis(100),
        stop.clone(),
        acked.clone(),
    ));

    // The shard of each subscription, from its status.
    let mut shard_of: BTreeMap<usize, u32> = BTreeMap::new();
    for i in 0..SUBSCRIPTIONS {
        let w = whs(&ns, &format!("s{i}")).await;
        shard_of.insert(i, w.status.and_then(|s| s.shard).expect("status shows the shard"));
    }

    let mut failovers = Vec::new();
    let victims = [1, 1, 1, usize::MAX];
    for victim in victims {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let victim = if victim == usize::MAX {
            leader(live(&replicas)).await.expect("a leader")
        } else {
            victim
        };
        let lost = owned(&replicas[victim]).await;
        let was_leader = replicas[victim].metric("mailhook_leader").await == 1.0;
        let seen = receiver.deliveries().await;
        let before: HashMap<String, usize> = by_path(&seen).into_iter().map(|(p, v)| (p, v.len())).collect();
        let acquired = r#"mailhook_shard_handovers_total{direction="acquired"}"#;
        let mut taken_before = 0.0;
        for (i, r) in replicas.iter().enumerate() {
            if i != victim {
                taken_before += r.metric(acquired).await;
            }
        }
        let killed = Instant::now();
        replicas[victim].kill();
        let up: Vec<Option<&Operator>> = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| (i != victim).then_some(r))
            .collect();
        // Its shards are owned by the others, and each of its subscriptions delivers again.
        let affected: Vec<usize> = shard_of
            .iter()
            .filter(|(_, s)| lost.contains(s))
            .map(|(i, _)| *i)
            .collect();
        loop {
            let owners = ownership(up.clone()).await;
            let now = receiver.deliveries().await;
            let got = by_path(&now);
            let moving = affected
                .iter()
                .any(|i| got.get(&path(*i)).map_or(0, Vec::len) <= before.get(&path(*i)).copied().unwrap_or(0));
            if settled(&owners, 2) && !moving {
                break;
            }
            assert!(
                killed.elapsed() < FAILOVER_WITHIN,
                "the killed replica's shards {lost:?} are not delivering again after {:?}: {owners:?}",
                killed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = killed.elapsed();
        let mut taken_after = 0.0;
        for r in up.iter().flatten() {
            taken_after += r.metric(acquired).await;
        }
        assert!(
            taken_after - taken_before >= lost.len() as f64,
            "the survivors count the handovers: {taken_before} -> {taken_after} for {lost:?}"
        );
        if was_leader {
            let l = eventually("another replica leads", || leader(up.clone()), Option::is_some).await;
            let led = killed.elapsed();
            assert!(led < FAILOVER_WITHIN, "no new leader within 15 s: {led:?}");
            eprintln!("leader {} killed: replica {l:?} leads after {led:?}", names[victim]);
        }
        eprintln!(
            "{} killed (shards {lost:?}, leader: {was_leader}): its shards deliver again after {took:?}",
            names[victim]
        );
        failovers.push(took);
        replicas[victim].restart().await;
        eventually(
            "the shards are shared out again",
            || ownership(live(&replicas)),
            |owners| settled(owners, 3),
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    sender.await.expect("sender");
    let acked: BTreeSet<String> = acked.lock().expect("acked").iter().cloned().collect();
    assert!(acked.len() > 1_000, "a sustained load: {} events", acked.len());

    let got = eventually(
        "every acknowledged event delivered to every subscription",
        || receiver.deliveries(),
        |got| {
            let paths = by_path(got);
            (0..SUBSCRIPTIONS).all(|i| {
                let ids: BTreeSet<String> = paths
                    .get(&path(i))
                    .map(|v| v.iter().filter_map(|r| r.producer_event_id()).collect())
                    .unwrap_or_default();
                acked.is_subset(&ids)
            })
        },
    )
    .await;
    let paths = by_path(&got);
    for i in 0..SUBSCRIPTIONS {
        let deliveries = &paths[&path(i)];
        // Order per mailbox: each event's first arrival comes after its predecessor's.
        let mut seen = BTreeSet::new();
        let mut last: HashMap<usize, usize> = HashMap::new();
        let mut duplicates = 0;
        for r in deliveries {
            let Some(id) = r.producer_event_id() else { continue };
            if !seen.insert(id.clone()) {
                duplicates += 1;
                continue;
            }
            let (mb, n) = parse(&id).expect("an id the sender made");
            if let Some(prev) = last.insert(mb, n) {
                assert!(n > prev, "s{i}: mailbox {mb} got event {n} after {prev}");
            }
        }
        let most = deliveries
            .iter()
            .filter(|r| !r.orphaned)
            .map(|r| r.in_flight)
            .max()
            .unwrap_or(0);
        let orphans = deliveries.iter().filter(|r| r.orphaned).count();
        if most > CONCURRENCY {
            let at = deliveries
                .iter()
                .find(|r| r.in_flight == most)
                .map_or(0.0, |r| r.arrived);
            for r in deliveries.iter().filter(|r| (r.arrived - at).abs() < 0.05) {
                eprintln!(
                    "  {:.3} port {} in_flight {} orphaned {} {:?}",
                    r.arrived - at,
                    r.port,
                    r.in_flight,
                    r.orphaned,
                    r.producer_event_id()
                );
            }
        }
        assert!(
            most <= CONCURRENCY,
            "s{i} had {most} requests in progress at once: two replicas delivered it together"
        );
        // Each kill can leave at most `concurrency` deliveries made but not recorded.
        let window = victims.len() as u32 * CONCURRENCY;
        assert!(
            duplicates <= window as usize,
            "s{i}: {duplicates} duplicates (window {window})"
        );
        eprintln!(
            "s{i}: {} events, {duplicates} duplicates, at most {most} in progress at once ({orphans} read after their sender died)",
            seen.len()
        );
    }

    // Status: one writer; counters count each event once, and the owner is named.
    let now_leader = eventually("one leader", || leader(live(&replicas)), Option::is_some).await;
    eprintln!(
        "leaders: {} first, {} now",
        names[first_leader],
        now_leader.map_or("none", |l| names[l])
    );
    for i in 0..SUBSCRIPTIONS {
        let name = format!("s{i}");
        let w = eventually(
            "status counts every delivered event once",
            || whs(&ns, &name),
            |w| {
                w.status
                    .as_ref()
                    .is_some_and(|s| s.delivered as usize == acked.len() && s.backlog == 0)
            },
        )
        .await;
        let owner = w.status.and_then(|s| s.shard_owner).unwrap_or_default();
        assert!(
            names.contains(&owner.as_str()),
            "s{i} names its shard's owner: {owner:?}"
        );
    }
    let slowest = failovers.iter().max().copied().unwrap_or_default();
    eprintln!("failover times: {failovers:?} (slowest {slowest:?})");
}

/// SIGTERM (what the kubelet sends): the replica stops taking events, lets its deliveries
/// finish, gives its shards and the leader Lease back at once and exits cleanly; the other
/// replica owns every shard and leads without waiting for anything to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_sigterm_hands_its_shards_and_the_lease_over_at_once() {
    let ns = TestNamespace::new("replicas-term").await;
    let url = crate::pg::database("replicas_term").await;
    let receiver = Receiver::start(SIEM_SECRET);
    // Housekeeping often, producer ids kept a second: the store-wide purge shows who runs it.
    let quick = ["--housekeeping-interval", "1s", "--dedup-window", "1s"];
    let mut first = start_with(&url, &ns, "first", &quick).await;
    eventually("the first leads", || leader(vec![Some(&first)]), Option::is_some).await;
    let second = start_with(&url, &ns, "second", &quick).await;
    eventually(
        "the shards are shared out between the two",
        || ownership(vec![Some(&first), Some(&second)]),
        |owners| settled(owners, 2) && owners.iter().all(|o| !o.is_empty()),
    )
    .await;
    apply(
        &ns,
        &(signing_secret(SIEM_SECRET) + &subscription("s0", &receiver.url(&path(0)), "", "")),
    );
    wait_ready(&ns, "s0").await;
    let events: Vec<serde_json::Value> = (0..50).map(|n| event(n % MAILBOXES, n)).collect();
    let (status, body) = first.ingest(&events).await;
    assert_eq!(status, 202, "{body}");
    // Store-wide housekeeping runs once, on the leader: it purges the producer ids, the
    // other replica none.
    let purged = r#"mailhook_store_purged_total{kind="producer_id"}"#;
    eventually(
        "the leader purges the producer ids",
        || first.metric(purged),
        |n| *n >= 50.0,
    )
    .await;
    assert_eq!(
        second.metric(purged).await,
        0.0,
        "the other replica ran no store-wide purge"
    );

    let asked = Instant::now();
    let exit = first
        .terminate(Duration::from_secs(30))
        .expect("exits within the drain");
    assert!(exit.success(), "a clean exit: {exit}");
    let log = first.log();
    assert!(log.contains("gave every shard back"), "{log}");
    assert!(log.contains("gave the leader Lease up"), "{log}");
    let owners = eventually(
        "the second owns every shard",
        || ownership(vec![Some(&second)]),
        |owners| settled(owners, 1),
    )
    .await;
    eventually("the second leads", || leader(vec![Some(&second)]), Option::is_some).await;
    let took = asked.elapsed();
    eprintln!(
        "SIGTERM to the second owning all {} shards and leading: {took:?}",
        owners[0].len()
    );
    assert!(
        took < crate::replicas::LEASE_DURATION,
        "handed over at once, not after the Lease expired: {took:?}"
    );
    // Whatever the first had not delivered, the second does.
    eventually(
        "every event delivered",
        || receiver.deliveries(),
        |got| {
            let ids: BTreeSet<String> = got.iter().filter_map(|r| r.producer_event_id()).collect();
            events
                .iter()
                .all(|e| e["eventId"].as_str().is_some_and(|id| ids.contains(id)))
        },
    )
    .await;
}

/// The leader Lease's duration (`replica::leader::LEASE_DURATION`).
const LEASE_DURATION: Duration = mailhook::replica::leader::LEASE_DURATION;

/// Figures, not a check (`cargo test --test integration -- --ignored --nocapture
/// replicas_figures`): for 1, 2 and 3 replicas on one fresh database, the rate events are
/// acknowledged and delivered end to end, then what the replicas cost the apiserver and
/// PostgreSQL while idle. On this machine the replicas, PostgreSQL, the apiserver and the
/// receiver share two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints figures"]
async fn replicas_figures() {
    const EVENTS: usize = 6_000;
    const SUBS: usize = 2;
    for n in 1..=3usize {
        let ns = TestNamespace::new(&format!("replicas-fig{n}")).await;
        let url = crate::pg::database(&format!("replicas_fig{n}")).await;
        let receiver = Receiver::start(SIEM_SECRET);
        let mut replicas = Vec::new();
        for i in 0..n {
            replicas.push(start(&url, &ns, &format!("r{i}")).await);
        }
        eventually(
            "the shards are shared out",
            || ownership(live(&replicas)),
            |owners| settled(owners, n),
        )
        .await;
        let mut yaml = signing_secret(SIEM_SECRET);
        for i in 0..SUBS {
            yaml += &subscription(
                &format!("s{i}"),
                &receiver.url(&path(i)),
                "",
                "  delivery: {concurrency: 16}\n",
            );
        }
        apply(&ns, &yaml);
        for i in 0..SUBS {
            wait_ready(&ns, &format!("s{i}")).await;
        }
        // Eight senders, batches of 50, spread over the replicas.
        let started = Instant::now();
        let mut senders = Vec::new();
        for s in 0..8 {
            let ports: Vec<_> = replicas.iter().map(|r| r.ingest).collect();
            senders.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                for b in 0..EVENTS / 8 / 50 {
                    let body: String = (0..50)
                        .map(|k| format!("{}\n", event(k % MAILBOXES, s * 100_000 + b * 50 + k)))
                        .collect();
                    let port = ports[(s + b) % ports.len()];
                    let answer = client
                        .post(format!("http://{port}/v1/events"))
                        .bearer_auth(INGEST_TOKEN)
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await
                        .expect("post");
                    assert_eq!(answer.status().as_u16(), 202);
                }
            }));
        }
        for s in senders {
            s.await.expect("sender");
        }
        let acked_in = started.elapsed();
        let want = EVENTS * SUBS;
        let long = Instant::now() + Duration::from_secs(300);
        loop {
            let got = receiver.deliveries().await;
            if got.iter().filter(|r| r.verified && r.answered == 200).count() >= want || Instant::now() > long {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let delivered_in = started.elapsed();
        // Idle cost over 20 s: apiserver requests and database transactions.
        // (every request but watches, those on Leases), whole server.
        let api = || async {
            let (_, out, _) = crate::support::kubectl_run(&["get", "--raw", "/metrics"], None);
            let lines: Vec<(bool, f64)> = out
                .lines()
                .filter(|l| l.starts_with("apiserver_request_total{") && !l.contains("verb=\"WATCH\""))
                .filter_map(|l| {
                    Some((
                        l.contains("resource=\"leases\""),
                        l.rsplit(' ').next()?.parse::<f64>().ok()?,
                    ))
                })
                .collect();
            (
                lines.iter().map(|l| l.1).sum::<f64>(),
                lines.iter().filter(|l| l.0).map(|l| l.1).sum::<f64>(),
            )
        };
        let db = || async {
            let config = mailhook::store::postgres::config(&url, None, None).expect("url");
            let client = mailhook::store::postgres::connect(&config).await.expect("connect");
            let row = client
                .query_one(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                    &[],
                )
                .await
                .expect("stats");
            row.get::<_, i64>(0)
        };
        let (api0, db0) = (api().await, db().await);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let (api1, db1) = (api().await, db().await);
        eprintln!(
            "FIGURES replicas={n}: {EVENTS} events acknowledged in {:.1} s ({:.0} ev/s); {want} deliveries done in {:.1} s ({:.0} deliveries/s); idle: apiserver {:.2} req/s (whole server; {:.2} on Leases), database {:.1} commits/s",
            acked_in.as_secs_f64(),
            EVENTS as f64 / acked_in.as_secs_f64(),
            delivered_in.as_secs_f64(),
            want as f64 / delivered_in.as_secs_f64(),
            (api1.0 - api0.0) / 20.0,
            (api1.1 - api0.1) / 20.0,
            (db1 - db0) as f64 / 20.0,
        );
    }
}

/// A replica whose commits fail while its session lives (here its role may open no new
/// connection, and its commit connection was cut) steps aside after
/// `STORE_DOWN_GIVE_UP`: the other replica delivers its shards meanwhile, and it joins
/// again once it can commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_commit_gives_its_shards_to_one_that_can() {
    let ns = TestNamespace::new("replicas-down").await;
    let url = crate::pg::database("replicas_down").await;
    let admin_url = std::env::var("MAILHOOK_TEST_PG_ADMIN_URL").expect("MAILHOOK_TEST_PG_ADMIN_URL");
    let admin =
        mailhook::store::postgres::connect(&mailhook::store::postgres::config(&admin_url, None, None).expect("url"))
            .await
            .expect("connect as the superuser");
    // Replica B logs in as a role of its own (a member of the operator's), so that its
    // connections can be limited alone.
    let mut parsed = url::Url::parse(&url).expect("url");
    let password = parsed.password().unwrap_or_default().to_string();
    let role = format!("mh_down_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE mailhook"
        ))
        .await
        .expect("role");
    parsed.set_username(&role).expect("user");
    let url_b = parsed.to_string();

    let receiver = Receiver::start(SIEM_SECRET);
    let a = start(&url, &ns, "a").await;
    let b = start(&url_b, &ns, "b").await;
    eventually(
        "the shards are shared out between the two",
        || ownership(vec![Some(&a), Some(&b)]),
        |owners| settled(owners, 2) && owners.iter().all(|o| !o.is_empty()),
    )
    .await;
    let mut yaml = signing_secret(SIEM_SECRET);
    for i in 0..SUBSCRIPTIONS {
        yaml += &subscription(&format!("s{i}"), &receiver.url(&path(i)), "", "");
    }
    apply(&ns, &yaml);
    for i in 0..SUBSCRIPTIONS {
        wait_ready(&ns, &format!("s{i}")).await;
    }

    // B's session stays; its commit connection is cut and may not come back.
    let db = parsed.path().trim_start_matches('/').to_string();
    admin
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT 1"))
        .await
        .expect("limit");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND datname = $2 \
             AND application_name <> 'mailhook-shards'",
            &[&role, &db],
        )
        .await
        .expect("terminate");
    // Events taken in by A meanwhile reach every subscription, B's shards' included.
    let events: Vec<serde_json::Value> = (0..24).map(|n| event(n % MAILBOXES, n)).collect();
    let (status, body) = a.ingest(&events).await;
    assert_eq!(status, 202, "{body}");
    let got = eventually(
        "A delivers every subscription while B cannot commit",
        || receiver.deliveries(),
        |got| {
            let paths = by_path(got);
            (0..SUBSCRIPTIONS).all(|i| paths.get(&path(i)).is_some_and(|v| v.len() >= events.len()))
        },
    )
    .await;
    assert!(got.iter().all(|r| r.verified));
    assert!(
        b.log().contains("the store cannot commit"),
        "B says why it stepped aside"
    );
    assert_eq!(owned(&a).await.len(), SHARDS, "A owns every shard");

    // B can connect again: it joins and takes its share back.
    admin
        .batch_execute(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .await
        .expect("unlimit");
    eventually(
        "B joins again",
        || ownership(vec![Some(&a), Some(&b)]),
        |owners| settled(owners, 2) && owners.iter().all(|o| !o.is_empty()),
    )
    .await;
}
