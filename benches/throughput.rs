//! Throughput and latency of the data path: HTTP ingest → durable store (fsync'd group
//! commits) → routing → delivery shards → a loopback HTTP receiver, all in this process.
//!
//!   cargo bench --bench throughput            (figures go to BENCHMARKS.md)
//!
//! Prints sustained events/s and ingest-to-delivery latency for one subscription and for
//! fan-out to 100, peak memory (of the whole process: generator, operator parts and
//! receiver together) and bytes on disk per event. No Kubernetes: the routing table is
//! built directly, as the controller would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;

use mailhook::api::{EventType, PayloadMode};
use mailhook::auth::Tokens;
use mailhook::delivery::payload::PayloadConfig;
use mailhook::delivery::signing::SigningKey;
use mailhook::delivery::wire::{Format, WireConfig};
use mailhook::delivery::{BatchSettings, Deliveries, DeliveryConfig, client};
use mailhook::handles::MatchCounters;
use mailhook::handles::Readiness;
use mailhook::metrics::Metrics;
use mailhook::route::{Grants, Router as EventRouter, RoutingTable, SubscriptionRoute};
use mailhook::source::Pipeline;
use mailhook::source::http::IngestConfig;
use mailhook::store::{DurableStore, Store};

// The same allocator as the binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Default)]
struct Received {
    count: AtomicU64,
    /// (send time µs since the epoch, ingest-to-delivery latency µs) of every delivery.
    latencies: Mutex<Vec<(u64, u64)>>,
}

async fn receive(State(rx): State<Arc<Received>>, body: Bytes) -> &'static str {
    // The generator stamps each event's send time (µs since the epoch) into its folder;
    // found by a scan, so the receiver's share of the shared CPU stays small. A batch
    // (BENCH_BATCH) carries several: each counts.
    const KEY: &[u8] = br#""folder":""#;
    let now = jiff::Timestamp::now().as_microsecond() as u64;
    let mut rest: &[u8] = &body;
    let mut events = 0;
    while let Some(i) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[i + KEY.len()..];
        events += 1;
        let sent = rest
            .iter()
            .position(|b| *b == b'"')
            .and_then(|end| std::str::from_utf8(&rest[..end]).ok()?.parse::<u64>().ok());
        if let Some(sent) = sent
            && let Ok(mut l) = rx.latencies.lock()
        {
            l.push((sent, now.saturating_sub(sent)));
        }
    }
    rx.count.fetch_add(events.max(1), Ordering::Relaxed);
    ""
}

struct Rig {
    ingest: SocketAddr,
    received: Arc<Received>,
    store: Arc<DurableStore>,
    dir: std::path::PathBuf,
}

async fn rig(subscriptions: usize) -> Rig {
    let received = Arc::new(Received::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let receiver_addr = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = std::env::temp_dir().join(format!("mailhook-bench-{}", uuid::Uuid::now_v7().simple()));
    let store = Arc::new(match std::env::var("BENCH_STORE_URL") {
        // The same scenarios on the PostgreSQL engine: the database is emptied first.
        Ok(url) => {
            use mailhook::store::postgres::{self, engine::Postgres, migrations};
            std::fs::create_dir_all(&dir).expect("bench directory");
            let config = postgres::config(&url, None, None).expect("BENCH_STORE_URL");
            let mut client = postgres::connect(&config).await.expect("connect");
            migrations::migrate(&mut client).await.expect("migrate");
            client
                .batch_execute(
                    "TRUNCATE events, producers, pending, dead_letters, attempts, raw_messages, subscriptions",
                )
                .await
                .expect("empty the bench database");
            client.batch_execute("VACUUM").await.expect("vacuum the bench database");
            DurableStore::on(Arc::new(Postgres::connect(config).expect("engine"))).expect("open store")
        }
        Err(_) => DurableStore::open(&dir).expect("open store"),
    });
    let metrics = Metrics::new().expect("metrics");
    let lifecycle = mailhook::lifecycle::Lifecycle::new();
    let router = Arc::new(EventRouter::default());
    let deliveries = Deliveries::start(
        mailhook::delivery::Capacity {
            shards: 4,
            max_in_flight: 512,
        },
        store.clone() as Arc<dyn Store>,
        metrics.clone(),
        Default::default(),
        &lifecycle,
        mailhook::handles::Leadership::sole(),
        router.clone(),
    );
    // No controllers here to end the start: every request slot at once.
    deliveries.warmed_up();
    // The receiver is on loopback, which the egress guard refuses unless allowed.
    let egress = Arc::new(mailhook::delivery::egress::EgressPolicy {
        allow: vec!["127.0.0.0/8".parse().expect("net")],
        ..Default::default()
    });
    let clients = client::Clients::new(egress.clone());
    let (shared, headers) = clients
        .get(&client::ClientSettings {
            headers: &[],
            ca_bundle: None,
            identity: None,
            insecure_skip_verify: false,
        })
        .expect("client");
    let mut routes = Vec::new();
    let batch = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|n| n.parse().ok())
        .map(|max_events| BatchSettings {
            max_events,
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(20),
        });
    for i in 0..subscriptions {
        let uid = format!("bench-{i}");
        deliveries.upsert(DeliveryConfig {
            uid: uid.clone(),
            namespace: "bench".into(),
            name: uid.clone(),
            generation: 1,
            url: format!("http://{receiver_addr}/hook"),
            client: shared.clone(),
            headers: headers.clone(),
            egress: egress.clone(),
            timeout: Duration::from_secs(10),
            signing_keys: vec![match std::env::var("BENCH_SIGNING").as_deref() {
                // `v1a` signatures instead of HMAC: what an ed25519 key costs per delivery.
                Ok("ed25519") => SigningKey::parse(&mailhook::delivery::signing::generate_ed25519().0).expect("key"),
                _ => SigningKey::Hmac(vec![7; 32]),
            }],
            retry_schedule: vec![Duration::ZERO, Duration::from_secs(1)],
            max_event_age: Duration::from_secs(3600),
            max_retry_after: Duration::from_secs(3600),
            dead_letter_retention: Duration::from_secs(3600),
            disable_after: Duration::from_secs(3600),
            payload: PayloadConfig {
                mode: PayloadMode::Full,
                redact: vec![],
                pseudonym_key: vec![1; 16],
                raw_links: None,
                subscription: "sub".into(),
            },
            concurrency: if subscriptions == 1 {
                std::env::var("BENCH_CONCURRENCY")
                    .ok()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(128)
            } else {
                8
            },
            rate_limit_per_second: None,
            ordered: false,
            paused: false,
            verify: false,
            wire: WireConfig {
                format: Format::StandardWebhooks,
                encryption: None,
                instance: "bench".into(),
                batched: batch.is_some(),
            },
            // BENCH_BATCH=N: up to N events per request (delivery.batch).
            batch,
            dead_letter_sink: None,
            max_backlog: None,
        });
        routes.push(SubscriptionRoute {
            uid,
            namespace: "bench".into(),
            event_types: vec![EventType::MessageReceived],
            filters: vec![],
        });
    }
    router.swap(RoutingTable::build(routes, vec![], Grants::unrestricted(["bench"])));

    let tokens_file = dir.join("tokens");
    std::fs::write(&tokens_file, "bench-token\n").expect("tokens");
    let pipeline = Arc::new(Pipeline {
        deliveries,
        router,
        metrics,
        internal_domains: vec![],
        matches: Arc::new(MatchCounters::default()),
        activity: Arc::default(),
        limits: Default::default(),
    });
    let readiness = Readiness::default();
    readiness.part("bench", "").ready();
    let config = IngestConfig {
        token_file: tokens_file.clone(),
        max_body_bytes: 64 << 20,
        max_batch_events: 100_000,
        body_timeout: std::time::Duration::from_secs(60),
        max_inflight_body_bytes: 256 << 20,
        max_requests_per_credential: 1024,
        dovecot: Default::default(),
        dovecot_tokens: None,
    };
    let app = mailhook::source::http::router(
        &config,
        pipeline,
        Tokens::load(tokens_file, "ingest").expect("tokens"),
        readiness,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind ingest");
    let ingest = listener.local_addr().expect("addr");
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Rig {
        ingest,
        received,
        store,
        dir,
    }
}

fn batch(start: u64, n: u64) -> String {
    let sent = jiff::Timestamp::now().as_microsecond();
    (start..start + n)
        .map(|i| {
            format!(
                r#"{{"type":"message.received","eventId":"bench-{i}","mailbox":"user{m}@finance.example.com","from":"billing@supplier.org","to":["user{m}@finance.example.com"],"subject":"Invoice {i}","size":48213,"folder":"{sent}","attachments":[{{"name":"invoice.pdf","contentType":"application/pdf","size":30211}}]}}"#,
                m = i % 500
            ) + "\n"
        })
        .collect()
}

async fn post(client: &reqwest::Client, ingest: SocketAddr, body: String) {
    let r = client
        .post(format!("http://{ingest}/v1/events"))
        .bearer_auth("bench-token")
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap_or_default());
}

async fn wait_for(rx: &Received, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while rx.count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} delivered",
            rx.count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// As fast as the generator can: `events` events in batches of `batch_size` from 4
/// concurrent posters; events/s counted until the last delivery arrives.
/// CPU seconds used so far by every process named `postgres` (the server, when the bench
/// runs on the PostgreSQL store), from /proc.
fn postgres_cpu_seconds() -> f64 {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(") ") else {
            continue;
        };
        if !name.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split(' ').collect();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
        for i in [11, 12] {
            ticks += fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / 100.0
}

/// The PostgreSQL server's WAL position in bytes (None without BENCH_STORE_URL).
async fn wal_bytes() -> Option<u64> {
    let url = std::env::var("BENCH_STORE_URL").ok()?;
    let config = mailhook::store::postgres::config(&url, None, None).ok()?;
    let client = mailhook::store::postgres::connect(&config).await.ok()?;
    let row = client
        .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint", &[])
        .await
        .ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// The store's tables on PostgreSQL with their sizes (heap, indexes and TOAST), largest
/// first (None without BENCH_STORE_URL).
async fn table_sizes() -> Option<String> {
    let url = std::env::var("BENCH_STORE_URL").ok()?;
    let config = mailhook::store::postgres::config(&url, None, None).ok()?;
    let client = mailhook::store::postgres::connect(&config).await.ok()?;
    // Fresh statistics first: the row counts below come from them.
    client.batch_execute("ANALYZE").await.ok()?;
    let rows = client
        .query(
            "SELECT c.relname::text, pg_total_relation_size(c.oid), c.reltuples::bigint FROM pg_class c \
             WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace ORDER BY 2 DESC",
            &[],
        )
        .await
        .ok()?;
    Some(
        rows.iter()
            .map(|r| {
                let (name, bytes, tuples): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                format!(
                    "{name} {:.1} MiB ({} rows)",
                    bytes as f64 / (1 << 20) as f64,
                    tuples.max(0)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    )
}

async fn sustained(subscriptions: usize, events: u64, batch_size: u64) {
    let rig = rig(subscriptions).await;
    let (cpu_before, wal_before) = (postgres_cpu_seconds(), wal_bytes().await);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let posters = 4;
    let per = events / posters;
    let mut tasks = Vec::new();
    for p in 0..posters {
        let (client, ingest) = (client.clone(), rig.ingest);
        tasks.push(tokio::spawn(async move {
            let mut i = p * per;
            while i < (p + 1) * per {
                post(&client, ingest, batch(i, batch_size)).await;
                i += batch_size;
            }
        }));
    }
    for t in tasks {
        t.await.expect("poster");
    }
    let ingested = started.elapsed();
    let expected = per * posters * subscriptions as u64;
    wait_for(&rig.received, expected).await;
    let took = started.elapsed();
    let mut lat: Vec<u64> = rig
        .received
        .latencies
        .lock()
        .expect("lock")
        .iter()
        .map(|l| l.1)
        .collect();
    lat.sort_unstable();
    println!(
        "sustained, {subscriptions} subscription(s): {} events ingested in {:.2}s ({:.0} events/s accepted); {expected} deliveries in {:.2}s = {:.0} events/s end to end, {:.0} deliveries/s; latency under saturation p50 {:.1} ms p99 {:.1} ms; store file {:.1} MiB ({:.0} bytes/event)",
        per * posters,
        ingested.as_secs_f64(),
        (per * posters) as f64 / ingested.as_secs_f64(),
        took.as_secs_f64(),
        (per * posters) as f64 / took.as_secs_f64(),
        expected as f64 / took.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        rig.store.disk_bytes() as f64 / (1 << 20) as f64,
        rig.store.disk_bytes() as f64 / (per * posters) as f64,
    );
    if let (Some(before), Some(after)) = (wal_before, wal_bytes().await) {
        println!(
            "  on PostgreSQL: server CPU {:.1} s ({:.0} µs per delivered event), WAL {:.1} MiB ({:.0} bytes per delivered event)",
            postgres_cpu_seconds() - cpu_before,
            1e6 * (postgres_cpu_seconds() - cpu_before) / expected as f64,
            after.saturating_sub(before) as f64 / (1 << 20) as f64,
            after.saturating_sub(before) as f64 / expected as f64,
        );
        if let Some(tables) = table_sizes().await {
            println!("  tables after the run: {tables}");
        }
    }
    drop(rig.store);
    let _ = std::fs::remove_dir_all(rig.dir);
}

/// A steady `rate` events/s for `seconds`, in batches every 10 ms: the latency a
/// producer sees when the operator is not saturated.
async fn steady(subscriptions: usize, rate: u64, seconds: u64) {
    let rig = rig(subscriptions).await;
    let client = reqwest::Client::new();
    let per_tick = rate / 100;
    let started = Instant::now();
    let first_send = jiff::Timestamp::now().as_microsecond() as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    for _ in 0..seconds * 100 {
        tick.tick().await;
        let (client, ingest, start) = (client.clone(), rig.ingest, sent);
        tokio::spawn(async move { post(&client, ingest, batch(start, per_tick)).await });
        sent += per_tick;
    }
    wait_for(&rig.received, sent * subscriptions as u64).await;
    let took = started.elapsed().as_secs_f64();
    let all = rig.received.latencies.lock().expect("lock").clone();
    let mut lat: Vec<u64> = all.iter().map(|l| l.1).collect();
    lat.sort_unstable();
    // A fresh store file grows during the first seconds (each growth an fsync'd metadata
    // change); the figures after 2 s are the steady state of a store in service.
    let warm = first_send + 2_000_000;
    let mut settled: Vec<u64> = all.iter().filter(|l| l.0 >= warm).map(|l| l.1).collect();
    settled.sort_unstable();
    println!(
        "steady {rate} events/s for {seconds}s, {subscriptions} subscription(s): all {} deliveries done {took:.2}s after the first send ({:.0} events/s kept up with); ingest-to-delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; after the first 2 s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        sent as f64 / took,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        percentile(&settled, 0.5),
        percentile(&settled, 0.99),
        percentile(&settled, 1.0),
    );
    drop(rig.store);
    let _ = std::fs::remove_dir_all(rig.dir);
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "mailhook data-path benchmark ({} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        // `cargo bench --bench throughput -- NAME` runs only the scenarios whose name
        // contains NAME (steady-1, sustained-1, sustained-100, steady-100).
        let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        let wanted = |name: &str| only.as_deref().is_none_or(|o| name == o);
        if wanted("steady-1") {
            steady(1, 2_000, 5).await;
        }
        if wanted("steady-1-20k") {
            steady(1, 20_000, 10).await;
        }
        if wanted("sustained-1") {
            sustained(1, 100_000, 500).await;
        }
        if wanted("sustained-100") {
            sustained(100, 2_000, 100).await;
        }
        if wanted("steady-100") {
            steady(100, 200, 5).await;
        }
    });
    println!("peak RSS of the whole benchmark process: {:.0} MiB", peak_rss_mib());
}
