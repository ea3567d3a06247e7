//! The load harness: the real `mailhook run` binary, a load generator process and a
//! receiver process, on the test control plane (a real kube-apiserver + etcd). Figures go
//! to BENCHMARKS.md; nothing here asserts a timing.
//!
//!   eval "$(tests/testenv/up)"
//!   cargo bench --bench loadtest -- one-endpoint      (one or more scenario names; all when none)
//!   LOADTEST_STORE_URL=postgres://… cargo bench --bench loadtest -- one-endpoint
//!
//! The same executable plays every part: `loadtest receiver …` answers deliveries (2xx at
//! once, or 503 for the endpoints told to fail) and `loadtest generate …` posts events to
//! the ingest API or SMTP journal reports; without a part it runs scenarios, starting
//! those processes, the operator, and `wrk` for the ceilings.
//!
//! Ceilings: `wrk -t1 -c64 -d10s` posting a 347-byte delivery body with the three Standard
//! Webhooks headers (webhook-id, webhook-timestamp, webhook-signature) to the axum receiver
//! and to Debian's nginx (`nginx-light`, one worker, `return 204`, on loopback; tests/setup
//! installs it), in the same run as the scenario they are compared with.
//!
//! Scenarios (BENCHMARKS.md has each one's figures): ceiling (both ceilings alone),
//! one-endpoint, one-endpoint-batched, steady-2k, smtp-journal, fanout-100,
//! fanout-100-batched, failing-10pct, routing-10k, status-writes, drain (drain-unbatched
//! and drain-batched: a paused subscription to nginx with 200,000 events queued, resumed),
//! backlog (alias backlog-1m). LOADTEST_SCALE=0.1 shrinks the event counts (a quick check);
//! LOADTEST_CONCURRENCY sets the one-endpoint scenarios' `delivery.concurrency` (128);
//! LOADTEST_BACKLOG_EVENTS sets backlog's size (default 1,000,000 × LOADTEST_SCALE);
//! LOADTEST_BACKLOG_DRAIN_SECONDS measures backlog's drain over that many seconds instead of
//! waiting for every delivery; LOADTEST_MEMORY_LIMIT_MIB runs the operator in a cgroup v1 memory cgroup of that limit
//! (root; the cgroup's peak and OOM kills are printed); MAILHOOK_BIN runs another build of
//! the operator (before/after in the same run).
//!
//!   cargo bench --bench loadtest -- ceiling drain
//!   LOADTEST_BACKLOG_EVENTS=10000000 LOADTEST_MEMORY_LIMIT_MIB=256 LOADTEST_BACKLOG_DRAIN_SECONDS=60 \
//!     cargo bench --bench loadtest -- backlog
//!
//! Every event carries its send time (µs since the epoch) in its subject (`#ts…`), so the
//! receiver measures ingest-to-arrival latency per event, also per second of sending
//! (disk stalls show as bad seconds, not as a bad average).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use clap::Parser;
use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use mailhook::api::{MailboxFilter, WebhookSubscription};

#[allow(dead_code)]
#[path = "../tests/common/cgroup.rs"]
mod cgroup;
use cgroup::Cgroup;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn now_us() -> u64 {
    jiff::Timestamp::now().as_microsecond() as u64
}

// ---------------------------------------------------------------- the receiver process

#[derive(Parser)]
struct ReceiverArgs {
    #[arg(long)]
    addr: SocketAddr,
}

#[derive(Default)]
struct Rx {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Endpoints `/hooks/N` with N at or above this answer 503.
    fail_from: AtomicU64,
    /// When the first delivery arrived since the last reset (µs since the epoch; 0: none).
    first_us: AtomicU64,
    /// (sent µs, arrival µs) of every stamped event.
    stamps: Mutex<Vec<(u64, u64)>>,
}

/// The send times stamped into a delivery's subjects (`#ts<µs>`), one per event.
fn stamps(body: &[u8]) -> Vec<u64> {
    const KEY: &[u8] = b"#ts";
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[i + KEY.len()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if let Some(v) = std::str::from_utf8(&rest[..digits]).ok().and_then(|s| s.parse().ok()) {
            out.push(v);
        }
    }
    out
}

async fn hook(State(rx): State<Arc<Rx>>, UrlPath(n): UrlPath<u64>, body: Bytes) -> StatusCode {
    if n >= rx.fail_from.load(Ordering::Relaxed) {
        rx.failed.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let now = now_us();
    let _ = rx
        .first_us
        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    let sent = stamps(&body);
    rx.ok.fetch_add(sent.len().max(1) as u64, Ordering::Relaxed);
    if !sent.is_empty()
        && let Ok(mut s) = rx.stamps.lock()
    {
        s.extend(sent.into_iter().map(|t| (t, now)));
    }
    StatusCode::NO_CONTENT
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
struct Latency {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Latency {
        us.sort_unstable();
        let at = |p: f64| {
            us.get(((us.len().saturating_sub(1)) as f64 * p).round() as usize)
                .map_or(0.0, |v| *v as f64 / 1000.0)
        };
        Latency {
            n: us.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

#[derive(Serialize, Deserialize, Default, Debug)]
struct Stats {
    ok: u64,
    failed: u64,
    first_us: u64,
    /// Arrival of the last stamped event.
    last_us: u64,
    latency: Latency,
    /// Per second of sending (from the first stamp): that second's events.
    windows: Vec<Latency>,
}

async fn stats(State(rx): State<Arc<Rx>>) -> axum::Json<Stats> {
    let stamps = rx.stamps.lock().map(|s| s.clone()).unwrap_or_default();
    let start = stamps.iter().map(|s| s.0).min().unwrap_or(0);
    let mut windows: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (sent, at) in &stamps {
        windows
            .entry((sent - start) / 1_000_000)
            .or_default()
            .push(at.saturating_sub(*sent));
    }
    axum::Json(Stats {
        ok: rx.ok.load(Ordering::Relaxed),
        failed: rx.failed.load(Ordering::Relaxed),
        first_us: rx.first_us.load(Ordering::Relaxed),
        last_us: stamps.iter().map(|s| s.1).max().unwrap_or(0),
        latency: Latency::of(stamps.iter().map(|(s, a)| a.saturating_sub(*s)).collect()),
        windows: windows.into_values().map(Latency::of).collect(),
    })
}

#[derive(Deserialize)]
struct Control {
    fail_from: Option<u64>,
}

async fn control(State(rx): State<Arc<Rx>>, Query(c): Query<Control>) -> StatusCode {
    rx.fail_from.store(c.fail_from.unwrap_or(u64::MAX), Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn reset(State(rx): State<Arc<Rx>>) -> StatusCode {
    rx.ok.store(0, Ordering::Relaxed);
    rx.failed.store(0, Ordering::Relaxed);
    rx.first_us.store(0, Ordering::Relaxed);
    if let Ok(mut s) = rx.stamps.lock() {
        s.clear();
    }
    StatusCode::NO_CONTENT
}

fn receiver(args: ReceiverArgs) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let rx = Arc::new(Rx {
            fail_from: AtomicU64::new(u64::MAX),
            ..Default::default()
        });
        let app = Router::new()
            .route("/hooks/{n}", axum::routing::post(hook))
            .route("/_stats", axum::routing::get(stats))
            .route("/_control", axum::routing::post(control))
            .route("/_reset", axum::routing::post(reset))
            .with_state(rx);
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .expect("bind the receiver");
        axum::serve(listener, app).await.expect("serve");
    });
}

// ---------------------------------------------------------------- the generator process

#[derive(Parser, Clone)]
struct GenerateArgs {
    /// The ingest API (NDJSON batches).
    #[arg(long)]
    ingest: Option<SocketAddr>,
    /// The SMTP journal receiver (one plain journal copy per message).
    #[arg(long)]
    smtp: Option<SocketAddr>,
    #[arg(long, default_value = "")]
    token: String,
    #[arg(long)]
    events: u64,
    /// Events per ingest request.
    #[arg(long, default_value_t = 500)]
    batch: u64,
    /// Concurrent requests (or SMTP connections).
    #[arg(long, default_value_t = 4)]
    posters: u64,
    /// Events per second; as fast as acknowledged when absent.
    #[arg(long)]
    rate: Option<u64>,
    /// Mailboxes are spread over `dept0.example.com` … `dept<domains-1>.example.com`.
    #[arg(long, default_value_t = 1)]
    domains: u64,
    /// Event ids are `<id-prefix>-<n>`: unique per run.
    #[arg(long)]
    id_prefix: String,
}

#[derive(Serialize, Deserialize, Debug)]
struct Generated {
    sent: u64,
    seconds: f64,
    /// Requests refused for backpressure (429/503) and sent again.
    refused: u64,
}

fn event_line(args: &GenerateArgs, i: u64, sent: u64) -> String {
    let (m, d) = (i % 500, i % args.domains);
    format!(
        r#"{{"type":"message.received","eventId":"{p}-{i}","mailbox":"user{m}@dept{d}.example.com","from":"billing@supplier.org","to":["user{m}@dept{d}.example.com"],"subject":"Invoice {i} #ts{sent}","size":48213,"attachments":[{{"name":"invoice.pdf","contentType":"application/pdf","size":30211}}]}}"#,
        p = args.id_prefix
    ) + "\n"
}

async fn post(client: &reqwest::Client, args: &GenerateArgs, from: u64, n: u64, refused: &AtomicU64) {
    let Some(ingest) = args.ingest else { return };
    let sent = now_us();
    let body: String = (from..from + n).map(|i| event_line(args, i, sent)).collect();
    loop {
        let r = client
            .post(format!("http://{ingest}/v1/events"))
            .bearer_auth(&args.token)
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 202 => return,
            Ok(r) if [429, 503].contains(&r.status().as_u16()) => {
                refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(r) => panic!(
                "ingest refused a batch: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => panic!("ingest: {e}"),
        }
    }
}

/// Reads one SMTP reply (all its lines); its code.
async fn reply(lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>) -> u16 {
    loop {
        let line = lines
            .next_line()
            .await
            .expect("SMTP read")
            .expect("SMTP connection closed");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        }
    }
}

/// Sends messages `from..to` as plain journal copies over one SMTP connection.
async fn smtp_session(args: GenerateArgs, from: u64, to: u64) {
    let Some(addr) = args.smtp else { return };
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect SMTP");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    assert_eq!(reply(&mut lines).await, 220);
    write.write_all(b"EHLO loadtest\r\n").await.expect("write");
    assert_eq!(reply(&mut lines).await, 250);
    for i in from..to {
        let (m, d) = (i % 500, i % args.domains);
        let rcpt = format!("user{m}@dept{d}.example.com");
        let message = format!(
            "From: billing@supplier.org\r\nTo: {rcpt}\r\nSubject: Invoice {i} #ts{sent}\r\nMessage-ID: <{p}-{i}@loadtest>\r\nDate: Sat, 5 Dec 2026 10:00:00 +0000\r\n\r\nPlease find the invoice attached.\r\n.\r\n",
            sent = now_us(),
            p = args.id_prefix
        );
        for (cmd, want) in [
            ("MAIL FROM:<journal@mail.example.com>\r\n".to_string(), 250),
            (format!("RCPT TO:<{rcpt}>\r\n"), 250),
            ("DATA\r\n".to_string(), 354),
            (message, 250),
        ] {
            write.write_all(cmd.as_bytes()).await.expect("write");
            let code = reply(&mut lines).await;
            assert_eq!(
                code,
                want,
                "SMTP answered {code} to {}",
                cmd.lines().next().unwrap_or("")
            );
        }
    }
    let _ = write.write_all(b"QUIT\r\n").await;
}

fn generate(args: GenerateArgs) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let out = rt.block_on(async {
        let started = Instant::now();
        let refused = Arc::new(AtomicU64::new(0));
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        if args.smtp.is_some() {
            let per = args.events.div_ceil(args.posters);
            for p in 0..args.posters {
                let (from, to) = (p * per, ((p + 1) * per).min(args.events));
                tasks.push(tokio::spawn(smtp_session(args.clone(), from, to)));
            }
        } else if let Some(rate) = args.rate {
            // Every 10 ms, that tick's share as one request (not waiting for the last).
            let per_tick = (rate / 100).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0;
            while i < args.events {
                tick.tick().await;
                let n = per_tick.min(args.events - i);
                let (client, args, refused) = (client.clone(), args.clone(), refused.clone());
                tasks.push(tokio::spawn(async move { post(&client, &args, i, n, &refused).await }));
                i += n;
            }
        } else {
            let per = args.events.div_ceil(args.posters);
            for p in 0..args.posters {
                let (client, args, refused) = (client.clone(), args.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    let end = ((p + 1) * per).min(args.events);
                    let mut i = p * per;
                    while i < end {
                        let n = args.batch.min(end - i);
                        post(&client, &args, i, n, &refused).await;
                        i += n;
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("a sender task failed");
        }
        Generated {
            sent: args.events,
            seconds: started.elapsed().as_secs_f64(),
            refused: refused.load(Ordering::Relaxed),
        }
    });
    println!("{}", serde_json::to_string(&out).expect("json"));
}

// ---------------------------------------------------------------- processes

/// A child process, killed when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// User + system CPU seconds so far (all threads).
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }
    /// (current, peak) resident memory in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// CPU seconds of every process whose command name is `name` (the control plane).
fn cpu_seconds_named(name: &str) -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .map(cpu_seconds)
        .sum()
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn me() -> PathBuf {
    std::env::current_exe().expect("the harness's own path")
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

struct Receiver {
    proc: Proc,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Receiver {
    async fn start() -> Receiver {
        let addr = free_port();
        let child = Command::new(me())
            .args(["receiver", "--addr", &addr.to_string()])
            .spawn()
            .expect("start the receiver");
        wait_listening(addr).await;
        Receiver {
            proc: Proc { child },
            addr,
            http: reqwest::Client::new(),
        }
    }
    fn url(&self, n: usize) -> String {
        format!("http://{}/hooks/{n}", self.addr)
    }
    async fn stats(&self) -> Stats {
        let r = self.http.get(format!("http://{}/_stats", self.addr)).send().await;
        let body = r.expect("receiver stats").bytes().await.expect("stats body");
        serde_json::from_slice(&body).expect("stats JSON")
    }
    async fn post(&self, what: &str) {
        let r = self.http.post(format!("http://{}/{what}", self.addr)).send().await;
        assert!(r.is_ok_and(|r| r.status().is_success()), "receiver {what}");
    }
    /// Waits until `n` events arrived (or `within` passed); the stats then.
    async fn wait_for(&self, n: u64, within: Duration) -> Stats {
        let deadline = Instant::now() + within;
        loop {
            let s = self.stats().await;
            if s.ok >= n || Instant::now() > deadline {
                if s.ok < n {
                    println!("  !! only {} of {n} events arrived within {} s", s.ok, within.as_secs());
                }
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The body of one delivery as the operator sends it (a Standard Webhooks JSON event,
/// unbatched), padded to exactly 347 bytes: what every ceiling posts.
fn ceiling_body() -> String {
    const LEN: usize = 347;
    let (head, tail) = (
        r#"{"type":"message.received","timestamp":"2026-12-06T10:00:00Z","data":{"eventId":"evt_01jf0v9k3m8q2r5t7w9y1z3b5d","source":"http","occurredAt":"2026-12-06T10:00:00Z","direction":"inbound","size":48213,"producerEventId":"ceiling-0","matchedFilters":[],"mailbox":"user0@dept0.example.com","from":"billing@supplier.org","subject":"Invoice 0"#,
        r#""}}"#,
    );
    let pad = LEN.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", " ".repeat(pad))
}

/// A wrk script POSTing [`ceiling_body`] with the three Standard Webhooks headers
/// (`webhook-id`, `webhook-timestamp`, `webhook-signature`), as a delivery arrives.
fn wrk_script(dir: &Path) -> PathBuf {
    let script = dir.join("post.lua");
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"webhook-id\"] = \"msg_2bM0hQ1lV9yY7kqXc8T0fZ3pD4e\"\nwrk.headers[\"webhook-timestamp\"] = \"1796551200\"\nwrk.headers[\"webhook-signature\"] = \"v1,{sig}\"\nwrk.body = [[{body}]]\n",
        sig = "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
        body = ceiling_body()
    );
    std::fs::write(&script, lua).expect("write the wrk script");
    script
}

/// Requests/s of `wrk -t1 -c64 -d10s` with [`wrk_script`] against `url`; 0 when wrk is
/// missing.
fn wrk_ceiling(url: &str, dir: &Path) -> f64 {
    let script = wrk_script(dir);
    let out = Command::new("wrk")
        .args(["-t1", "-c64", "-d10s", "-s"])
        .arg(&script)
        .arg(url)
        .output();
    let out = match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).to_string(),
        Err(e) => {
            println!("  !! wrk did not run ({e}); tests/setup installs it");
            return 0.0;
        }
    };
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The ceiling of the axum receiver (this harness's `receiver` process).
fn ceiling(receiver: &Receiver, dir: &Path) -> f64 {
    wrk_ceiling(&receiver.url(0), dir)
}

// ---------------------------------------------------------------- nginx, a C receiver

/// Debian's nginx (`nginx-light`) as a receiver: one worker, `return 204` for every request,
/// on loopback, each request logged (`$uri`, the `mailhook-batch-size` header, `$msec`) to
/// count the deliveries and find the last one. Stopped (SIGTERM) when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// How far the access log has been read, and what it held so far.
    read: u64,
    partial: String,
    pub counted: Counted,
}

/// What the access log shows of the deliveries (`/hooks/…` requests).
#[derive(Default, Debug, Clone, Copy)]
struct Counted {
    requests: u64,
    events: u64,
    /// When the last one was answered (seconds since the epoch).
    last: f64,
}

impl Nginx {
    /// Starts nginx in `dir`; None (said why) when there is no nginx.
    async fn start(dir: &Path) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nginx");
        let root = dir.join("nginx");
        std::fs::create_dir_all(&root).expect("nginx directory");
        let addr = free_port();
        let log = root.join("access.log");
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n  fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n\
             \x20 keepalive_requests 1000000;\n\
             \x20 log_format hooks '$uri $http_mailhook_batch_size $msec';\n\
             \x20 access_log {log} hooks buffer=256k flush=100ms;\n\
             \x20 server {{\n    listen {addr};\n    location / {{ return 204; }}\n  }}\n}}\n",
            root = root.display(),
            log = log.display(),
        );
        let path = root.join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(&root)
            .arg("-e")
            .arg(root.join("error.log"))
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                println!("  !! nginx did not start ({e}); tests/setup installs nginx-light");
                return None;
            }
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Some(Nginx {
                    child,
                    addr,
                    log,
                    read: 0,
                    partial: String::new(),
                    counted: Counted::default(),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
                println!("  !! nginx exited ({status}): {err}");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        println!("  !! nginx does not listen on {addr}");
        None
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The ceiling: wrk against `/ceiling` (not counted as deliveries).
    fn ceiling(&self, dir: &Path) -> f64 {
        wrk_ceiling(&self.url("/ceiling"), dir)
    }

    /// Reads what the access log gained; the deliveries so far.
    fn count(&mut self) -> Counted {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.log) else {
            return self.counted;
        };
        let mut text = String::new();
        if file.seek(SeekFrom::Start(self.read)).is_err() || file.read_to_string(&mut text).is_err() {
            return self.counted;
        }
        self.read += text.len() as u64;
        let text = std::mem::take(&mut self.partial) + &text;
        let (complete, rest) = text.rsplit_once('\n').unwrap_or(("", &text));
        self.partial = rest.to_string();
        for line in complete.lines() {
            let mut fields = line.split(' ');
            let (Some(uri), Some(batch), Some(msec)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if !uri.starts_with("/hooks/") {
                continue;
            }
            self.counted.requests += 1;
            self.counted.events += batch.parse::<u64>().unwrap_or(1);
            self.counted.last = self.counted.last.max(msec.parse().unwrap_or(0.0));
        }
        self.counted
    }

    /// CPU seconds of the master and its worker.
    fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        cpu_seconds(pid)
            + children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .map(cpu_seconds)
                .sum::<f64>()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM: the master stops its worker (a SIGKILLed master would leave it running).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

struct Operator {
    proc: Proc,
    args: Vec<String>,
    log: PathBuf,
    admin: SocketAddr,
    ingest: SocketAddr,
    smtp: SocketAddr,
    /// How long a start may take to be ready before the run is given up.
    ready_within: Duration,
    /// LOADTEST_MEMORY_LIMIT_MIB: the memory cgroup the operator runs in (every start of
    /// it), as a kubelet applies a pod's limit. Dropped after `proc`.
    cgroup: Option<Cgroup>,
}

/// LOADTEST_MEMORY_LIMIT_MIB, in bytes.
fn memory_limit() -> Option<u64> {
    let mib = std::env::var("LOADTEST_MEMORY_LIMIT_MIB").ok()?;
    let mib: u64 = mib
        .parse()
        .unwrap_or_else(|_| panic!("LOADTEST_MEMORY_LIMIT_MIB={mib} is not a number"));
    Some(mib << 20)
}

const TOKEN: &str = "loadtest-token";

impl Operator {
    async fn start(dir: &Path, namespaces: &[String], extra: &[&str]) -> Operator {
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{TOKEN}\n")).expect("token file");
        let (admin, ingest, smtp) = (free_port(), free_port(), free_port());
        let mut args: Vec<String> = vec![
            "run".into(),
            "--watch-namespace".into(),
            namespaces.join(","),
            "--http-addr".into(),
            admin.to_string(),
            "--ingest-addr".into(),
            ingest.to_string(),
            "--smtp-addr".into(),
            smtp.to_string(),
            "--ingest-token-file".into(),
            tokens.display().to_string(),
            "--egress-allow".into(),
            "127.0.0.1/32".into(),
            "--instance".into(),
            "loadtest".into(),
        ];
        match std::env::var("LOADTEST_STORE_URL") {
            Ok(url) => args.extend(["--store-url".into(), url]),
            Err(_) => args.extend(["--store-dir".into(), dir.join("store").display().to_string()]),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.join("operator.log");
        let cgroup = memory_limit().map(|limit| {
            static STARTS: AtomicU64 = AtomicU64::new(0);
            let name = format!(
                "mailhook-loadtest-{}-{}",
                std::process::id(),
                STARTS.fetch_add(1, Ordering::Relaxed)
            );
            if let Some(why) = Cgroup::unavailable() {
                panic!("LOADTEST_MEMORY_LIMIT_MIB is set but no memory cgroup can be made: {why}");
            }
            Cgroup::create(&name, limit)
        });
        let mut op = Operator {
            proc: Self::spawn(&args, &log, cgroup.as_ref()),
            args,
            log,
            admin,
            ingest,
            smtp,
            ready_within: Duration::from_secs(300),
            cgroup,
        };
        op.wait_ready().await;
        if let Some(c) = &op.cgroup {
            println!(
                "  operator in memory cgroup {} (limit {} MiB)",
                c.path.display(),
                c.read_u64("memory.limit_in_bytes") >> 20
            );
        }
        op
    }

    /// The cgroup's figures when the operator runs in one (LOADTEST_MEMORY_LIMIT_MIB):
    /// its peak (page cache of the store's files included, as the kernel charges it) and
    /// the OOM kills it recorded; empty otherwise.
    fn cgroup_figures(&self) -> String {
        let Some(c) = &self.cgroup else {
            return String::new();
        };
        format!(
            "; cgroup limit {} MiB: peak {:.0} MiB (rss now {:.0}, page cache {:.0}), oom_kill {}",
            c.read_u64("memory.limit_in_bytes") >> 20,
            c.peak() as f64 / 1048576.0,
            c.stat("total_rss") as f64 / 1048576.0,
            c.stat("total_cache") as f64 / 1048576.0,
            c.oom_kills().map_or("?".to_string(), |n| n.to_string())
        )
    }

    fn spawn(args: &[String], log: &Path, cgroup: Option<&Cgroup>) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("operator log");
        let err = out.try_clone().expect("log handle");
        let bin = std::env::var("MAILHOOK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mailhook").to_string());
        // In a cgroup: a shell moves itself in, then execs the operator.
        let mut command = match cgroup {
            Some(c) => {
                let mut sh = Command::new("sh");
                sh.arg("-c").arg(c.script()).arg(bin);
                sh
            }
            None => Command::new(bin),
        };
        let child = command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start mailhook run");
        Proc { child }
    }

    /// Waits for /readyz; the time it took.
    async fn wait_ready(&mut self) -> Duration {
        let started = Instant::now();
        let http = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("the operator exited ({status}):\n{log}");
            }
            let ready = http.get(format!("http://{}/readyz", self.admin)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < self.ready_within,
                "the operator was not ready in {} s",
                self.ready_within.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait for the exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .status();
        let _ = self.proc.child.wait();
    }

    /// Starts again with the same flags and store.
    fn restart(&mut self) {
        self.proc = Self::spawn(&self.args, &self.log, self.cgroup.as_ref());
    }

    /// The sum of every series of `name`; 0 when it is not exposed.
    async fn metric(&self, name: &str) -> f64 {
        self.metric_opt(name).await.unwrap_or(0.0)
    }

    /// The sum of every series of `name`, or None when the operator does not expose it.
    async fn metric_opt(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .ok()
            .map(|r| r.text());
        let text = match text {
            Some(t) => t.await.unwrap_or_default(),
            None => String::new(),
        };
        sum_series(&text, name)
    }
}

/// The sum of every series of `name` (with any labels) in a Prometheus exposition; None
/// when there is none.
fn sum_series(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn generator(args: &[String]) -> Child {
    Command::new(me())
        .arg("generate")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the generator")
}

/// Runs the generator to the end: what it reports, and its CPU seconds.
async fn run_generator(args: Vec<String>) -> (Generated, f64) {
    tokio::task::spawn_blocking(move || {
        let child = generator(&args);
        let pid = child.id();
        let cpu = Arc::new(Mutex::new(0.0));
        // The CPU time must be read before the process is reaped.
        let watcher = {
            let cpu = cpu.clone();
            std::thread::spawn(move || {
                while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let c = cpu_seconds(pid);
                    if c > 0.0
                        && let Ok(mut v) = cpu.lock()
                    {
                        *v = c;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let out = child.wait_with_output().expect("the generator");
        let _ = watcher.join();
        assert!(out.status.success(), "the generator failed");
        let generated: Generated = serde_json::from_slice(&out.stdout).expect("the generator's report");
        let cpu = cpu.lock().map(|v| *v).unwrap_or(0.0);
        (generated, cpu)
    })
    .await
    .expect("generator task")
}

// ---------------------------------------------------------------- the cluster side

struct Cluster {
    client: kube::Client,
    namespaces: Vec<String>,
}

impl Cluster {
    async fn new(prefix: &str, count: usize) -> Cluster {
        let client = kube::Client::try_default()
            .await
            .expect("a kubeconfig: run `eval \"$(tests/testenv/up)\"` first");
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        for crd in mailhook::api::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(&name, &PatchParams::apply("loadtest").force(), &Patch::Apply(&crd))
                .await
                .expect("install the CRDs");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let namespaces: Vec<String> = (0..count).map(|i| format!("lt-{prefix}-{}-{i}", &run[..6])).collect();
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        for ns in &namespaces {
            let object = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("namespace");
            api.create(&PostParams::default(), &object)
                .await
                .expect("create a namespace");
            let secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "signing"},
                "stringData": {"key": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
            }))
            .expect("secret");
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &secret)
                .await
                .expect("create the signing Secret");
        }
        // Every load-test namespace may receive all mail, as an admin would grant it.
        let grant: mailhook::api::MailboxGrant = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("lt-{prefix}-{}", &run[..6])},
            "spec": {"namespaces": namespaces, "mailboxes": ["*"], "maxPayloadMode": "full"},
        }))
        .expect("grant");
        Api::<mailhook::api::MailboxGrant>::all(client.clone())
            .create(&PostParams::default(), &grant)
            .await
            .expect("create the MailboxGrant");
        Cluster { client, namespaces }
    }

    /// Creates every object, 32 requests at a time.
    async fn create<K>(&self, objects: Vec<(String, K)>)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let failed: Vec<String> = futures::stream::iter(objects)
            .map(|(ns, o)| {
                let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
                async move {
                    api.create(&PostParams::default(), &o)
                        .await
                        .err()
                        .map(|e| e.to_string())
                }
            })
            .buffer_unordered(32)
            .filter_map(|e| async move { e })
            .collect()
            .await;
        assert!(failed.is_empty(), "creating objects failed: {:?}", failed.first());
    }

    /// Waits until every subscription and filter is Ready (a paused subscription: Ready
    /// False for being paused, and nothing else); the time from `since`.
    async fn wait_ready(&self, since: Instant, subscriptions: usize, filters: usize) -> Duration {
        let ready = |c: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>| {
            c.is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Ready" && (c.status == "True" || c.reason == "Paused"))
            })
        };
        loop {
            let (mut s, mut f) = (0, 0);
            for ns in &self.namespaces {
                let subs: Api<WebhookSubscription> = Api::namespaced(self.client.clone(), ns);
                let fs: Api<MailboxFilter> = Api::namespaced(self.client.clone(), ns);
                let lp = ListParams::default();
                s += subs.list(&lp).await.map_or(0, |l| {
                    l.items
                        .iter()
                        .filter(|w| ready(w.status.as_ref().map(|s| &s.conditions)))
                        .count()
                });
                if filters > 0 {
                    f += fs.list(&lp).await.map_or(0, |l| {
                        l.items
                            .iter()
                            .filter(|m| ready(m.status.as_ref().map(|s| &s.conditions)))
                            .count()
                    });
                }
            }
            if s >= subscriptions && f >= filters {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(600),
                "only {s} of {subscriptions} subscriptions and {f} of {filters} filters Ready after 600 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Sets `spec.paused` on every subscription.
    async fn pause_all(&self, paused: bool) {
        let mut patches = Vec::new();
        for ns in &self.namespaces {
            let api: Api<WebhookSubscription> = Api::namespaced(self.client.clone(), ns);
            for w in api.list(&ListParams::default()).await.expect("list").items {
                patches.push((api.clone(), w.metadata.name.unwrap_or_default()));
            }
        }
        futures::stream::iter(patches)
            .map(|(api, name)| async move {
                let patch = serde_json::json!({"spec": {"paused": paused}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .expect("pause");
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    }

    /// The apiserver's request counter for a resource (and subresource), every verb.
    async fn apiserver_requests(&self, resource: &str, subresource: &str) -> f64 {
        let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
        let text = self.client.request_text(request).await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter(|l| l.contains(&format!("resource=\"{resource}\"")))
            .filter(|l| l.contains(&format!("subresource=\"{subresource}\"")))
            .filter(|l| !l.contains("verb=\"GET\"") && !l.contains("verb=\"LIST\"") && !l.contains("verb=\"WATCH\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn delete(&self) {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        for ns in &self.namespaces {
            let _ = api.delete(ns, &Default::default()).await;
        }
    }
}

fn subscription(name: &str, url: &str, extra: serde_json::Value) -> WebhookSubscription {
    let mut spec = serde_json::json!({
        "endpoint": {"url": url, "allowInsecureHttp": true},
        "signing": {"secretRef": {"name": "signing"}},
        "eventTypes": ["message.received"],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailhook.io/v1alpha1",
        "kind": "WebhookSubscription",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a WebhookSubscription")
}

/// A filter taking the mailboxes of `dept<domain>.example.com`, by keyword too when asked.
fn filter(name: &str, domain: usize, labels: serde_json::Value, keywords: bool) -> MailboxFilter {
    let mut spec = serde_json::json!({"mailboxes": [format!("*@dept{domain}.example.com")]});
    if keywords && let Some(spec) = spec.as_object_mut() {
        spec.insert(
            "subject".into(),
            serde_json::json!({"keywords": ["invoice", format!("ticket-{domain}")]}),
        );
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailhook.io/v1alpha1",
        "kind": "MailboxFilter",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))
    .expect("a MailboxFilter")
}

// ---------------------------------------------------------------- scenarios

/// One scenario's world: a working directory, a cluster part, a receiver.
struct Rig {
    dir: PathBuf,
    cluster: Cluster,
    receiver: Receiver,
    run: String,
}

impl Rig {
    async fn new(name: &str, namespaces: usize) -> Rig {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("mailhook-loadtest-{name}-{}", &run[..8]));
        std::fs::create_dir_all(&dir).expect("working directory");
        if let Ok(url) = std::env::var("LOADTEST_STORE_URL") {
            empty_database(&url).await;
        }
        Rig {
            cluster: Cluster::new(name, namespaces).await,
            receiver: Receiver::start().await,
            dir,
            run,
        }
    }

    fn generate_args(&self, events: u64, extra: &[String]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--events".into(),
            events.to_string(),
            "--token".into(),
            TOKEN.into(),
            "--id-prefix".into(),
            format!("{}-{}", &self.run[..8], uuid::Uuid::new_v4().simple()),
        ];
        a.extend(extra.iter().cloned());
        a
    }

    async fn done(self) {
        self.cluster.delete().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PostgreSQL store starts empty (LOADTEST_STORE_URL).
async fn empty_database(url: &str) {
    use mailhook::store::postgres;
    let ca = std::env::var("MAILHOOK_STORE_CA_FILE").ok().map(PathBuf::from);
    let config = postgres::with_ca(url, None, None, ca.as_deref()).expect("LOADTEST_STORE_URL");
    let client = postgres::connect(&config).await.expect("connect LOADTEST_STORE_URL");
    client
        .batch_execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public")
        .await
        .expect("empty the loadtest database");
}

fn store_name() -> &'static str {
    if std::env::var("LOADTEST_STORE_URL").is_ok() {
        "PostgreSQL"
    } else {
        "redb"
    }
}

/// Seconds from `t0` (µs since the epoch) to the arrival of the last stamped event.
fn elapsed(t0: u64, stats: &Stats) -> f64 {
    stats.last_us.saturating_sub(t0) as f64 / 1e6
}

/// Prints the end-to-end figures of one measured phase; the ratio to each ceiling given
/// (receiver name, requests/s).
fn report(
    label: &str,
    events: u64,
    deliveries: u64,
    took: f64,
    stats: &Stats,
    cpu: &[(&str, f64)],
    ceilings: &[(&str, f64)],
) {
    let per_s = events as f64 / took;
    let ratios: String = ceilings
        .iter()
        .filter(|(_, c)| *c > 0.0)
        .map(|(who, c)| format!("; {who} ceiling {c:.0} req/s, ratio {:.2}", per_s / c))
        .collect();
    println!(
        "  {label}: {events} events, {deliveries} deliveries in {took:.2} s = {per_s:.0} events/s end to end, {:.0} deliveries/s{ratios}",
        deliveries as f64 / took,
    );
    println!(
        "    ingest→arrival p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        stats.latency.p50_ms, stats.latency.p99_ms, stats.latency.max_ms
    );
    let cpu: Vec<String> = cpu.iter().map(|(who, s)| format!("{who} {s:.1}")).collect();
    println!("    CPU seconds: {}", cpu.join(", "));
}

/// Per-second windows of a fixed-rate run: how many seconds had a stall, and the
/// percentiles without those seconds.
fn windows(stats: &Stats) {
    let stalled: Vec<&Latency> = stats.windows.iter().filter(|w| w.max_ms > 100.0).collect();
    let clean: Vec<&Latency> = stats.windows.iter().filter(|w| w.max_ms <= 100.0).collect();
    let worst = |ws: &[&Latency], f: fn(&Latency) -> f64| ws.iter().map(|w| f(w)).fold(0.0, f64::max);
    let median = |ws: &[&Latency], f: fn(&Latency) -> f64| {
        let mut v: Vec<f64> = ws.iter().map(|w| f(w)).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "    per second of sending ({} s): {} s with a delivery over 100 ms (worst max {:.0} ms); the other {} s: median p50 {:.1} ms, median p99 {:.1} ms, worst p99 {:.1} ms",
        stats.windows.len(),
        stalled.len(),
        worst(&stalled, |w| w.max_ms),
        clean.len(),
        median(&clean, |w| w.p50_ms),
        median(&clean, |w| w.p99_ms),
        worst(&clean, |w| w.p99_ms),
    );
}

/// One endpoint, events as fast as they are acknowledged; the ceiling in the same run.
async fn one_endpoint(name: &str, events: u64, batch: Option<u32>) {
    println!(
        "[{name}] 1 subscription, {events} events over HTTP ingest, as fast as acknowledged ({} store)",
        store_name()
    );
    let rig = Rig::new(name, 1).await;
    let ceiling = ceiling(&rig.receiver, &rig.dir);
    // The same request against a C receiver (nginx, one worker, `return 204`).
    let nginx_ceiling = match Nginx::start(&rig.dir).await {
        Some(nginx) => nginx.ceiling(&rig.dir),
        None => 0.0,
    };
    println!(
        "  ceilings (wrk -t1 -c64 -d10s, a 347-byte delivery with the Standard Webhooks headers): axum receiver {ceiling:.0} req/s, nginx {nginx_ceiling:.0} req/s"
    );
    rig.receiver.post("_reset").await;
    let ns = rig.cluster.namespaces.clone();
    let mut op = Operator::start(&rig.dir, &ns, &[]).await;
    // One busy endpoint is given 128 requests in flight (the default, 4, suits an
    // endpoint of unknown capacity; LOADTEST_CONCURRENCY changes it).
    let concurrency: u32 = std::env::var("LOADTEST_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(128);
    let mut delivery = serde_json::json!({"concurrency": concurrency});
    if let Some(n) = batch {
        delivery["batch"] = serde_json::json!({"maxEvents": n, "maxWait": "20ms"});
    }
    let extra = serde_json::json!({"delivery": delivery});
    rig.cluster
        .create(vec![(ns[0].clone(), subscription("one", &rig.receiver.url(0), extra))])
        .await;
    rig.cluster.wait_ready(Instant::now(), 1, 0).await;
    let (idle, _) = op.proc.rss_mib();
    let cpu0 = (
        op.proc.cpu_seconds(),
        rig.receiver.proc.cpu_seconds(),
        cpu_seconds_named("kube-apiserver"),
    );
    let t0 = now_us();
    let args = rig.generate_args(
        events,
        &["--ingest".into(), op.ingest.to_string(), "--batch".into(), "500".into()],
    );
    let (generated, gen_cpu) = run_generator(args).await;
    let stats = rig.receiver.wait_for(events, Duration::from_secs(300)).await;
    let took = elapsed(t0, &stats);
    report(
        "end to end",
        events,
        stats.ok,
        took,
        &stats,
        &[
            ("operator", op.proc.cpu_seconds() - cpu0.0),
            ("generator", gen_cpu),
            ("receiver", rig.receiver.proc.cpu_seconds() - cpu0.1),
            ("kube-apiserver", cpu_seconds_named("kube-apiserver") - cpu0.2),
        ],
        &[("axum", ceiling), ("nginx", nginx_ceiling)],
    );
    let (rss, peak) = op.proc.rss_mib();
    println!(
        "    ingest accepted {:.0} events/s ({} refused requests); operator RSS idle {idle:.0} MiB, now {rss:.0} MiB, peak {peak:.0} MiB",
        generated.sent as f64 / generated.seconds,
        generated.refused
    );
    op.stop();
    rig.done().await;
}

/// One endpoint at a fixed rate the operator keeps up with: the latency a producer sees,
/// per second of sending, so the seconds hit by an fsync stall show apart.
async fn steady(rate: u64, seconds: u64) {
    println!(
        "[steady-2k] 1 subscription, {rate} events/s for {seconds} s over HTTP ingest ({} store)",
        store_name()
    );
    let rig = Rig::new("steady-2k", 1).await;
    let ns = rig.cluster.namespaces.clone();
    let mut op = Operator::start(&rig.dir, &ns, &[]).await;
    let spec = serde_json::json!({"delivery": {"concurrency": 128}});
    rig.cluster
        .create(vec![(ns[0].clone(), subscription("one", &rig.receiver.url(0), spec))])
        .await;
    rig.cluster.wait_ready(Instant::now(), 1, 0).await;
    let cpu0 = op.proc.cpu_seconds();
    let t0 = now_us();
    let args = rig.generate_args(
        rate * seconds,
        &[
            "--ingest".into(),
            op.ingest.to_string(),
            "--rate".into(),
            rate.to_string(),
        ],
    );
    let (_, gen_cpu) = run_generator(args).await;
    let stats = rig.receiver.wait_for(rate * seconds, Duration::from_secs(120)).await;
    report(
        "steady",
        rate * seconds,
        stats.ok,
        elapsed(t0, &stats),
        &stats,
        &[("operator", op.proc.cpu_seconds() - cpu0), ("generator", gen_cpu)],
        &[],
    );
    windows(&stats);
    println!("    operator peak RSS {:.0} MiB", op.proc.rss_mib().1);
    op.stop();
    rig.done().await;
}

/// The SMTP journal feed: plain journal copies over 4 connections.
async fn smtp_journal(messages: u64) {
    println!(
        "[smtp-journal] 1 subscription, {messages} journal copies over SMTP, 4 connections ({} store)",
        store_name()
    );
    let rig = Rig::new("smtp-journal", 1).await;
    let ns = rig.cluster.namespaces.clone();
    let mut op = Operator::start(&rig.dir, &ns, &[]).await;
    rig.cluster
        .create(vec![(
            ns[0].clone(),
            subscription(
                "one",
                &rig.receiver.url(0),
                serde_json::json!({"delivery": {"concurrency": 128}}),
            ),
        )])
        .await;
    rig.cluster.wait_ready(Instant::now(), 1, 0).await;
    let cpu0 = (op.proc.cpu_seconds(), rig.receiver.proc.cpu_seconds());
    let t0 = now_us();
    let args = rig.generate_args(messages, &["--smtp".into(), op.smtp.to_string()]);
    let (generated, gen_cpu) = run_generator(args).await;
    let stats = rig.receiver.wait_for(messages, Duration::from_secs(300)).await;
    report(
        "end to end",
        messages,
        stats.ok,
        elapsed(t0, &stats),
        &stats,
        &[
            ("operator", op.proc.cpu_seconds() - cpu0.0),
            ("generator", gen_cpu),
            ("receiver", rig.receiver.proc.cpu_seconds() - cpu0.1),
        ],
        &[],
    );
    println!(
        "    SMTP accepted {:.0} messages/s; operator peak RSS {:.0} MiB",
        generated.sent as f64 / generated.seconds,
        op.proc.rss_mib().1
    );
    op.stop();
    rig.done().await;
}

/// 100 subscriptions, each taking every event.
async fn fanout(name: &str, events: u64, batch: Option<u32>) {
    println!(
        "[{name}] 100 subscriptions each taking every event (default concurrency 4 each{}), {events} events ({} store)",
        batch.map_or(String::new(), |n| format!(", batches of up to {n}")),
        store_name()
    );
    let rig = Rig::new(name, 1).await;
    let ns = rig.cluster.namespaces[0].clone();
    let mut op = Operator::start(&rig.dir, &rig.cluster.namespaces, &[]).await;
    let spec = batch.map_or(
        serde_json::json!({}),
        |n| serde_json::json!({"delivery": {"batch": {"maxEvents": n, "maxWait": "20ms"}}}),
    );
    let subs = (0..100)
        .map(|i| {
            (
                ns.clone(),
                subscription(&format!("s-{i}"), &rig.receiver.url(i), spec.clone()),
            )
        })
        .collect();
    rig.cluster.create(subs).await;
    rig.cluster.wait_ready(Instant::now(), 100, 0).await;
    let cpu0 = (op.proc.cpu_seconds(), rig.receiver.proc.cpu_seconds());
    let t0 = now_us();
    let args = rig.generate_args(
        events,
        &["--ingest".into(), op.ingest.to_string(), "--batch".into(), "100".into()],
    );
    let (_, gen_cpu) = run_generator(args).await;
    let stats = rig.receiver.wait_for(events * 100, Duration::from_secs(300)).await;
    report(
        "fan-out",
        events,
        stats.ok,
        elapsed(t0, &stats),
        &stats,
        &[
            ("operator", op.proc.cpu_seconds() - cpu0.0),
            ("generator", gen_cpu),
            ("receiver", rig.receiver.proc.cpu_seconds() - cpu0.1),
        ],
        &[],
    );
    println!("    operator peak RSS {:.0} MiB", op.proc.rss_mib().1);
    op.stop();
    rig.done().await;
}

/// 1,000 subscriptions, each naming the filter of one of 100 domains (10 per event); the
/// last 100 endpoints fail (503) in the second phase. Healthy throughput with and without.
async fn failing(events: u64) {
    println!(
        "[failing-10pct] 1,000 subscriptions over 100 filters (10 deliveries per event), {events} events per phase; phase 2: subscriptions 900-999 answer 503 ({} store)",
        store_name()
    );
    let rig = Rig::new("failing-10pct", 1).await;
    let ns = rig.cluster.namespaces[0].clone();
    let mut op = Operator::start(&rig.dir, &rig.cluster.namespaces, &[]).await;
    let (idle, _) = op.proc.rss_mib();
    let filters = (0..100)
        .map(|d| (ns.clone(), filter(&format!("f-{d}"), d, serde_json::json!({}), false)))
        .collect();
    rig.cluster.create(filters).await;
    let subs = (0..1000)
        .map(|i| {
            let refs = serde_json::json!({"filterRefs": [format!("f-{}", i % 100)]});
            (ns.clone(), subscription(&format!("s-{i}"), &rig.receiver.url(i), refs))
        })
        .collect();
    let applied = Instant::now();
    rig.cluster.create(subs).await;
    let ready = rig.cluster.wait_ready(applied, 1000, 100).await;
    let (with_subs, _) = op.proc.rss_mib();
    println!(
        "  all Ready {:.1} s after the first create; operator RSS idle {idle:.0} MiB, with 1,000 subscriptions {with_subs:.0} MiB",
        ready.as_secs_f64()
    );
    for (phase, fail_from) in [("all healthy", None), ("10% failing", Some(900))] {
        rig.receiver.post("_reset").await;
        if let Some(f) = fail_from {
            rig.receiver.post(&format!("_control?fail_from={f}")).await;
        }
        let cpu0 = op.proc.cpu_seconds();
        let t0 = now_us();
        let args = rig.generate_args(
            events,
            &[
                "--ingest".into(),
                op.ingest.to_string(),
                "--batch".into(),
                "100".into(),
                "--domains".into(),
                "100".into(),
            ],
        );
        let (_, gen_cpu) = run_generator(args).await;
        let healthy = if fail_from.is_some() { events * 9 } else { events * 10 };
        let stats = rig.receiver.wait_for(healthy, Duration::from_secs(300)).await;
        report(
            phase,
            events,
            stats.ok,
            elapsed(t0, &stats),
            &stats,
            &[("operator", op.proc.cpu_seconds() - cpu0), ("generator", gen_cpu)],
            &[],
        );
        println!(
            "    failed attempts answered: {}; operator RSS {:.0} MiB (peak {:.0})",
            stats.failed,
            op.proc.rss_mib().0,
            op.proc.rss_mib().1
        );
    }
    op.stop();
    rig.done().await;
}

/// 10,000 filters across 100 namespaces (100 each, a domain and keywords each), one
/// subscription per namespace selecting all of its namespace's filters.
async fn routing(events: u64) {
    println!(
        "[routing-10k] 10,000 MailboxFilters in 100 namespaces, 100 subscriptions (one per namespace, each selecting its 100 filters), {events} events over 10,000 domains ({} store)",
        store_name()
    );
    let rig = Rig::new("routing-10k", 100).await;
    let mut op = Operator::start(&rig.dir, &rig.cluster.namespaces, &[]).await;
    let applied = Instant::now();
    let mut filters = Vec::new();
    for (n, ns) in rig.cluster.namespaces.iter().enumerate() {
        for k in 0..100 {
            let labels = serde_json::json!({"loadtest": "yes"});
            filters.push((ns.clone(), filter(&format!("f-{k}"), n * 100 + k, labels, true)));
        }
    }
    rig.cluster.create(filters).await;
    let subs = rig
        .cluster
        .namespaces
        .iter()
        .enumerate()
        .map(|(n, ns)| {
            let sel = serde_json::json!({"filterSelector": {"matchLabels": {"loadtest": "yes"}}});
            (ns.clone(), subscription("all", &rig.receiver.url(n), sel))
        })
        .collect();
    rig.cluster.create(subs).await;
    let ready = rig.cluster.wait_ready(applied, 100, 10_000).await;
    let (rss, _) = op.proc.rss_mib();
    println!(
        "  created and all Ready in {:.1} s; operator RSS with 10,000 filters {rss:.0} MiB",
        ready.as_secs_f64()
    );
    let cpu0 = op.proc.cpu_seconds();
    let t0 = now_us();
    let args = rig.generate_args(
        events,
        &[
            "--ingest".into(),
            op.ingest.to_string(),
            "--domains".into(),
            "10000".into(),
        ],
    );
    let (_, gen_cpu) = run_generator(args).await;
    let stats = rig.receiver.wait_for(events, Duration::from_secs(300)).await;
    let cpu = op.proc.cpu_seconds() - cpu0;
    report(
        "routed",
        events,
        stats.ok,
        elapsed(t0, &stats),
        &stats,
        &[("operator", cpu), ("generator", gen_cpu)],
        &[],
    );
    println!(
        "    operator CPU per event {:.0} µs (routing among 10,000 filters included); peak RSS {:.0} MiB",
        cpu * 1e6 / events as f64,
        op.proc.rss_mib().1
    );
    op.stop();
    rig.done().await;
}

/// 1,000 paused subscriptions (one filter each) and `events` events queued for them; the
/// operator's memory idle and with the backlog; then a restart with the backlog pending
/// (unpaused while the operator is down): time to ready, to the first delivery, to all,
/// and how many queued rows the start read (`mailhook_store_queue_rows_read_total`).
async fn backlog(events: u64) {
    println!(
        "[backlog] 1,000 paused subscriptions with one filter each, {events} events queued; restart with them pending ({} store{})",
        store_name(),
        memory_limit().map_or(String::new(), |l| format!(
            ", operator in a {} MiB memory cgroup",
            l >> 20
        ))
    );
    let rig = Rig::new("backlog", 1).await;
    let ns = rig.cluster.namespaces[0].clone();
    // A thousand filters in one namespace: above the default count.
    let mut op = Operator::start(
        &rig.dir,
        &rig.cluster.namespaces,
        &["--filter-max-per-namespace", "1000"],
    )
    .await;
    // A start that reads the whole backlog takes long at 10,000,000; a ceiling only.
    op.ready_within = Duration::from_secs(300.max(events / 10_000));
    let (idle, _) = op.proc.rss_mib();
    let filters = (0..1000)
        .map(|d| (ns.clone(), filter(&format!("f-{d}"), d, serde_json::json!({}), false)))
        .collect();
    rig.cluster.create(filters).await;
    let subs = (0..1000)
        .map(|i| {
            let spec = serde_json::json!({"filterRefs": [format!("f-{i}")], "paused": true});
            (ns.clone(), subscription(&format!("s-{i}"), &rig.receiver.url(i), spec))
        })
        .collect();
    rig.cluster.create(subs).await;
    rig.cluster.wait_ready(Instant::now(), 1000, 1000).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (with_subs, _) = op.proc.rss_mib();
    let args = rig.generate_args(
        events,
        &[
            "--ingest".into(),
            op.ingest.to_string(),
            "--batch".into(),
            "1000".into(),
            "--domains".into(),
            "1000".into(),
        ],
    );
    let (generated, _) = run_generator(args).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (with_backlog, peak) = op.proc.rss_mib();
    let backlog = op.metric("mailhook_store_backlog").await;
    let disk = op.metric("mailhook_store_disk_bytes").await;
    println!(
        "  ingested {events} events at {:.0} events/s; operator RSS idle {idle:.0} MiB, with 1,000 subscriptions {with_subs:.0} MiB, with {backlog:.0} deliveries queued {with_backlog:.0} MiB (peak {peak:.0} MiB); store {:.0} MiB on disk{}",
        generated.sent as f64 / generated.seconds,
        disk / 1048576.0,
        op.cgroup_figures()
    );
    op.stop();
    rig.cluster.pause_all(false).await;
    rig.receiver.post("_reset").await;
    let log_before = std::fs::metadata(&op.log).map_or(0, |m| m.len() as usize);
    let started = Instant::now();
    let spawned = jiff::Timestamp::now();
    op.restart();
    let ready = op.wait_ready().await;
    let rows = op.metric_opt("mailhook_store_queue_rows_read_total").await;
    let (rss_ready, _) = op.proc.rss_mib();
    // Where the start went, from the operator's own log lines.
    let log = std::fs::read_to_string(&op.log).unwrap_or_default();
    for line in log.get(log_before..).unwrap_or("").lines() {
        let marks = ["connected to Kubernetes", "store open", "; ready"];
        if marks.iter().any(|m| line.contains(m))
            && let Some(at) = line
                .split_whitespace()
                .next()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        {
            let what = marks.iter().find(|m| line.contains(**m)).unwrap_or(&"");
            println!(
                "    start: {what:?} after {:.2} s",
                (at - spawned).total(jiff::Unit::Second).unwrap_or(0.0)
            );
        }
    }
    // The receiver notes when the first delivery arrived (it may come before /readyz).
    let first = loop {
        let s = rig.receiver.stats().await;
        if s.first_us > 0 {
            let spawned_us = spawned.as_microsecond() as u64;
            break Duration::from_micros(s.first_us.saturating_sub(spawned_us));
        }
        if started.elapsed() > Duration::from_secs(300) {
            break Duration::ZERO;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // LOADTEST_BACKLOG_DRAIN_SECONDS: measure the drain over that long after the first
    // delivery instead of waiting for all (10,000,000 at a few thousand a second is hours).
    let window = std::env::var("LOADTEST_BACKLOG_DRAIN_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(seconds) = window {
        let before = rig.receiver.stats().await.ok;
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let after = rig.receiver.stats().await.ok;
        println!(
            "  restart with {backlog:.0} pending: ready after {:.2} s (RSS then {rss_ready:.0} MiB; mailhook_store_queue_rows_read_total {}), first delivery after {:.2} s; {} delivered in the {seconds} s after it ({:.0} events/s); operator peak RSS while draining {:.0} MiB, RSS now {:.0} MiB, CPU {:.1} s{}",
            ready.as_secs_f64(),
            rows.map_or("not exposed".to_string(), |r| format!("{r:.0}")),
            first.as_secs_f64(),
            after.saturating_sub(before),
            after.saturating_sub(before) as f64 / seconds as f64,
            op.proc.rss_mib().1,
            op.proc.rss_mib().0,
            op.proc.cpu_seconds(),
            op.cgroup_figures()
        );
        op.stop();
        rig.done().await;
        return;
    }
    let stats = rig
        .receiver
        .wait_for(events, Duration::from_secs(540.max(events / 1_000)))
        .await;
    let all = started.elapsed();
    println!(
        "  restart with {backlog:.0} pending: ready after {:.2} s (RSS then {rss_ready:.0} MiB; mailhook_store_queue_rows_read_total {}), first delivery after {:.2} s, all {} delivered after {:.1} s ({:.0} events/s from the first delivery); operator peak RSS while draining {:.0} MiB, CPU {:.1} s{}",
        ready.as_secs_f64(),
        rows.map_or("not exposed".to_string(), |r| format!("{r:.0}")),
        first.as_secs_f64(),
        stats.ok,
        all.as_secs_f64(),
        stats.ok as f64 / all.saturating_sub(first).as_secs_f64(),
        op.proc.rss_mib().1,
        op.proc.cpu_seconds(),
        op.cgroup_figures()
    );
    op.stop();
    rig.done().await;
}

/// The ceilings alone: the same request (a 347-byte delivery with the Standard Webhooks
/// headers, `wrk -t1 -c64 -d10s`) against the axum receiver and against nginx.
async fn ceilings() {
    println!(
        "[ceiling] wrk -t1 -c64 -d10s, a 347-byte delivery body with webhook-id, webhook-timestamp and webhook-signature"
    );
    let run = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("mailhook-loadtest-ceiling-{}", &run[..8]));
    std::fs::create_dir_all(&dir).expect("working directory");
    let receiver = Receiver::start().await;
    let axum = ceiling(&receiver, &dir);
    let (nginx, cpu) = match Nginx::start(&dir).await {
        Some(nginx) => {
            let before = nginx.cpu_seconds();
            let c = nginx.ceiling(&dir);
            (c, nginx.cpu_seconds() - before)
        }
        None => (0.0, 0.0),
    };
    println!(
        "  axum receiver (this harness's receiver process) {axum:.0} req/s; nginx-light (1 worker, return 204, each request logged) {nginx:.0} req/s, nginx CPU {cpu:.1} s of the 10"
    );
    drop(receiver);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One subscription whose endpoint is nginx (`return 204`): `events` events queued while it
/// is paused, then resumed. From the resume to the last delivery nginx logged: events/s
/// and its ratio to nginx's own ceiling (measured in the same run), the operator's peak
/// RSS. Unbatched with `delivery.concurrency` 64, or batched (`batch.maxEvents`).
async fn drain(name: &str, events: u64, batch: Option<u32>) {
    println!(
        "[{name}] 1 subscription to nginx (1 worker, return 204), {events} events queued while paused, then resumed; delivery.concurrency 64{} ({} store)",
        batch.map_or(String::new(), |n| format!(", batches of up to {n} (maxWait 20ms)")),
        store_name()
    );
    let rig = Rig::new(name, 1).await;
    let Some(mut nginx) = Nginx::start(&rig.dir).await else {
        rig.done().await;
        return;
    };
    let ceiling = nginx.ceiling(&rig.dir);
    let ns = rig.cluster.namespaces.clone();
    let mut op = Operator::start(&rig.dir, &ns, &[]).await;
    let mut delivery = serde_json::json!({"concurrency": 64});
    if let Some(n) = batch {
        delivery["batch"] = serde_json::json!({"maxEvents": n, "maxWait": "20ms"});
    }
    let spec = serde_json::json!({"delivery": delivery, "paused": true});
    rig.cluster
        .create(vec![(
            ns[0].clone(),
            subscription("drain", &nginx.url("/hooks/0"), spec),
        )])
        .await;
    rig.cluster.wait_ready(Instant::now(), 1, 0).await;
    let (idle, _) = op.proc.rss_mib();
    let args = rig.generate_args(
        events,
        &["--ingest".into(), op.ingest.to_string(), "--batch".into(), "500".into()],
    );
    let (generated, _) = run_generator(args).await;
    // Every event is queued (the gauge follows the store every few seconds).
    let queued_by = Instant::now() + Duration::from_secs(60);
    while op.metric("mailhook_store_backlog").await < events as f64 && Instant::now() < queued_by {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let queued = op.metric("mailhook_store_backlog").await;
    let (with_backlog, _) = op.proc.rss_mib();
    let cpu0 = (op.proc.cpu_seconds(), nginx.cpu_seconds());
    let resumed = jiff::Timestamp::now().as_microsecond() as f64 / 1e6;
    let resumed_at = Instant::now();
    rig.cluster.pause_all(false).await;
    let within = Duration::from_secs(300.max(events / 500));
    let counted = loop {
        let c = nginx.count();
        if c.events >= events || resumed_at.elapsed() > within {
            if c.events < events {
                println!(
                    "  !! only {} of {events} events reached nginx within {} s",
                    c.events,
                    within.as_secs()
                );
            }
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cpu = (op.proc.cpu_seconds() - cpu0.0, nginx.cpu_seconds() - cpu0.1);
    let took = counted.last - resumed;
    let per_s = counted.events as f64 / took;
    let requests_per_s = counted.requests as f64 / took;
    println!(
        "  nginx ceiling {ceiling:.0} req/s (wrk -t1 -c64 -d10s, a 347-byte delivery with the Standard Webhooks headers, same run)"
    );
    println!(
        "  drain: {} events in {} requests, {took:.2} s from resume to the last delivery = {per_s:.0} events/s, {requests_per_s:.0} requests/s; ratio to the nginx ceiling {:.2} (events), {:.2} (requests)",
        counted.events,
        counted.requests,
        per_s / ceiling,
        requests_per_s / ceiling
    );
    println!(
        "    queued {queued:.0} (ingest accepted {:.0} events/s); operator RSS idle {idle:.0} MiB, with the backlog {with_backlog:.0} MiB, peak (VmHWM) {:.0} MiB; CPU s while draining: operator {:.1}, nginx {:.1}{}",
        generated.sent as f64 / generated.seconds,
        op.proc.rss_mib().1,
        cpu.0,
        cpu.1,
        op.cgroup_figures()
    );
    op.stop();
    drop(nginx);
    rig.done().await;
}

/// 10,000 events/s spread over 100 subscriptions (one domain each) for `seconds`: status
/// writes and Events that reach the apiserver, counted by the apiserver itself.
async fn status_writes(seconds: u64) {
    let rate = 10_000;
    println!(
        "[status-writes] 100 subscriptions (one domain each), {rate} events/s for {seconds} s; requests counted by the apiserver ({} store)",
        store_name()
    );
    let rig = Rig::new("status-writes", 1).await;
    let ns = rig.cluster.namespaces[0].clone();
    let mut op = Operator::start(&rig.dir, &rig.cluster.namespaces, &[]).await;
    let filters = (0..100)
        .map(|d| (ns.clone(), filter(&format!("f-{d}"), d, serde_json::json!({}), false)))
        .collect();
    rig.cluster.create(filters).await;
    let subs = (0..100)
        .map(|i| {
            let spec = serde_json::json!({"filterRefs": [format!("f-{i}")]});
            (ns.clone(), subscription(&format!("s-{i}"), &rig.receiver.url(i), spec))
        })
        .collect();
    rig.cluster.create(subs).await;
    rig.cluster.wait_ready(Instant::now(), 100, 100).await;
    // Whatever becoming Ready wrote is settled before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let count = async || {
        (
            rig.cluster.apiserver_requests("webhooksubscriptions", "status").await,
            rig.cluster.apiserver_requests("mailboxfilters", "status").await,
            rig.cluster.apiserver_requests("events", "").await,
        )
    };
    let before = count().await;
    let cpu0 = (
        op.proc.cpu_seconds(),
        cpu_seconds_named("kube-apiserver"),
        cpu_seconds_named("etcd"),
    );
    let t0 = now_us();
    let args = rig.generate_args(
        rate * seconds,
        &[
            "--ingest".into(),
            op.ingest.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--domains".into(),
            "100".into(),
        ],
    );
    let (generated, gen_cpu) = run_generator(args).await;
    let stats = rig.receiver.wait_for(rate * seconds, Duration::from_secs(120)).await;
    let window = elapsed(t0, &stats);
    let after = count().await;
    report(
        "steady",
        generated.sent,
        stats.ok,
        window,
        &stats,
        &[
            ("operator", op.proc.cpu_seconds() - cpu0.0),
            ("generator", gen_cpu),
            ("kube-apiserver", cpu_seconds_named("kube-apiserver") - cpu0.1),
            ("etcd", cpu_seconds_named("etcd") - cpu0.2),
        ],
        &[],
    );
    windows(&stats);
    let (subs, filters, events) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    println!(
        "    apiserver received in {window:.0} s: {subs} subscription status writes ({:.2}/s; {:.2} per subscription per 5 s), {filters} filter status writes ({:.2} per filter per 5 s), {events} Event writes",
        subs / window,
        subs / 100.0 / (window / 5.0),
        filters / 100.0 / (window / 5.0),
    );
    op.stop();
    rig.done().await;
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `cargo bench` passes --bench; the parts take their own flags.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("receiver") => return receiver(ReceiverArgs::parse_from(&args)),
        Some("generate") => return generate(GenerateArgs::parse_from(&args)),
        _ => {}
    }
    let names: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |n: &str| names.is_empty() || names.contains(&n);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        println!(
            "mailhook load harness ({} cores): separate processes for the operator, the generator and the receiver",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let scale = |n: u64| {
            std::env::var("LOADTEST_SCALE")
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .map_or(n, |f| (n as f64 * f) as u64)
        };
        if wanted("ceiling") {
            ceilings().await;
        }
        if wanted("one-endpoint") {
            one_endpoint("one-endpoint", scale(200_000), None).await;
        }
        if wanted("one-endpoint-batched") {
            one_endpoint("one-endpoint-batched", scale(200_000), Some(50)).await;
        }
        if wanted("steady-2k") {
            steady(2_000, scale(30)).await;
        }
        if wanted("smtp-journal") {
            smtp_journal(scale(5_000)).await;
        }
        if wanted("fanout-100") {
            fanout("fanout-100", scale(5_000), None).await;
        }
        if wanted("fanout-100-batched") {
            fanout("fanout-100-batched", scale(5_000), Some(50)).await;
        }
        if wanted("failing-10pct") {
            failing(scale(20_000)).await;
        }
        if wanted("routing-10k") {
            routing(scale(100_000)).await;
        }
        if wanted("status-writes") {
            status_writes(scale(60)).await;
        }
        if wanted("drain") || wanted("drain-unbatched") {
            drain("drain-unbatched", scale(200_000), None).await;
        }
        if wanted("drain") || wanted("drain-batched") {
            drain("drain-batched", scale(200_000), Some(50)).await;
        }
        if wanted("backlog") || wanted("backlog-1m") {
            // LOADTEST_BACKLOG_EVENTS sets the size outright (10,000,000 for the paged
            // store's figures); otherwise 1,000,000 times LOADTEST_SCALE.
            let events = std::env::var("LOADTEST_BACKLOG_EVENTS")
                .ok()
                .map(|v| {
                    v.replace('_', "")
                        .parse::<u64>()
                        .unwrap_or_else(|_| panic!("LOADTEST_BACKLOG_EVENTS={v} is not a number"))
                })
                .unwrap_or_else(|| scale(1_000_000));
            backlog(events).await;
        }
    });
}
