//! Adversarial suite: the real `mailhook run` binary under a 1 GiB memory cgroup (cgroup v1,
//! as a kubelet applies a pod's limit), attacked through its real listeners while a
//! well-behaved producer keeps working. `cargo test` runs the short form (small counts);
//! `ADVERSARIAL_FULL=1 cargo test --test adversarial` runs larger attacks. Needs root, the
//! control plane of `tests/testenv/up` (`KUBECONFIG`), `swaks` and `openssl`.
//!
//! After every attack the suite asserts that the operator process is alive, that the cgroup
//! records `oom_kill 0`, and that the good producer — an HTTP client with its own named
//! token posting events, and swaks sending Exchange journal reports from 127.0.0.1 — was
//! acknowledged (202 / 250) for everything it sent and that its events reached a real axum
//! receiver through a WebhookSubscription. It prints the cgroup's peak memory per attack.
//!
//! The HTTP attackers connect from addresses of their own (127.0.0.2, .4, .5 — loopback's
//! /8 is routable), as another host would.
//!
//! 1. `unauth-8mib`: connections announcing `Content-Length: 8388608` on POST /v1/events
//!    without a token, trickling bytes: each gets 401 before its body is read and is closed.
//! 2. `slowloris`: connections sending their headers a byte at a time, reconnecting when
//!    closed: the header timeout closes them, and the per-address cap
//!    (`--ingest-max-connections-per-address`, 256) closes the rest at accept. Short form:
//!    400 connections; full form: 1,024, twice the listener's cap — the good producer from
//!    its own address still finds room.
//! 3. `credential-flood`: a second named credential (`attacker`) floods large bodies, half
//!    trickled (holding its request slots and the in-flight body budget), half sent at
//!    full speed: it gets 429/503/408/400, the good credential keeps getting 202 (it retries
//!    a 503/429 after Retry-After as a well-behaved producer does; refusals are printed).
//! 4. `lockout`: from 127.0.0.1, requests without a token (always 401, never counted) and
//!    with wrong tokens (401, then 429 once locked); the good producer, which authenticated
//!    from the same address before, gets 202 at its first try, every time; a valid token
//!    that never authenticated from there (a right guess) gets 429.
//! 5. `smtp-stall`: 100 connections from 127.0.0.2 that say EHLO and STARTTLS and then
//!    nothing, or EHLO and idle: at most `--smtp-max-connections-per-address` (20) are
//!    served, the MTA from 127.0.0.1 keeps getting 250, every stalled connection is closed
//!    by the server (read returns EOF) — a STARTTLS that never completes frees its slot — and
//!    20 fresh connections from 127.0.0.2 are greeted afterwards.
//! 6. `smtp-long-line`: a DATA line of 2 MiB is answered `500 5.5.2`, the session goes on
//!    and the next message gets 250 and becomes an event.
//! 7. `journal-fanout`: one journal report of one message to 5,000 internal recipients
//!    (full: 50,000, accepted or refused with 552) is accepted with 250 and yields one
//!    message.received event per recipient mailbox at the receiver.
//! 8. `message-id-collision`: two plain copies with one Message-ID and different bodies
//!    both become events; the same message sent twice is one event; an HTTP event whose
//!    `eventId` is the journal id `smtp:<Message-ID>:<mailbox>` does not suppress the
//!    journal event.
//! 9. `no-store-flag`: `mailhook run` without `--store-dir`/`--store-url`/`--store-memory`
//!    exits non-zero and its stderr names the three flags.
//!
//! The operator is a test (debug) build; figures are for that build. Timings are printed,
//! never asserted; the ceilings on waits only stop a hung run.

#[allow(dead_code)]
#[path = "../common/cgroup.rs"]
mod cgroup;
#[allow(dead_code, unused_imports)]
#[path = "../integration/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use futures::FutureExt as _;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use cgroup::Cgroup;
use support::{SIEM_SECRET, TestNamespace, apply, free_port, self_signed, signing_secret, subscription, wait_ready};

const GOOD_TOKEN: &str = "good-producer-token-0123456789abcdef";
const ATTACKER_TOKEN: &str = "attacker-token-0123456789abcdef0123";
const LIMIT_BYTES: u64 = 1 << 30;
const MIB: f64 = 1024.0 * 1024.0;

fn full() -> bool {
    std::env::var_os("ADVERSARIAL_FULL").is_some_and(|v| !v.is_empty() && v != "0")
}

// ---------------------------------------------------------------------------------------
// The webhook receiver: axum, in this process, on a runtime of its own.

#[derive(Default)]
struct Rx {
    events: Mutex<Vec<Value>>,
}

async fn hook(State(rx): State<Arc<Rx>>, body: Bytes) -> StatusCode {
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => {
            rx.events.lock().push(v);
            StatusCode::NO_CONTENT
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

struct Receiver {
    url: String,
    rx: Arc<Rx>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let rx = Arc::new(Rx::default());
        let state = rx.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("receiver runtime");
            rt.block_on(async move {
                let app = Router::new()
                    .route("/hooks", axum::routing::post(hook))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serve");
            });
        });
        Receiver {
            url: format!("http://{addr}/hooks"),
            rx,
        }
    }

    fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.rx.events.lock().iter().filter(|v| pred(v)).count()
    }

    fn for_mailbox(&self, mailbox: &str) -> Vec<Value> {
        self.rx
            .events
            .lock()
            .iter()
            .filter(|v| v["data"]["mailbox"] == mailbox)
            .cloned()
            .collect()
    }

    /// Waits until `pred` counts `n` events, at most `ceiling`; returns the count.
    async fn wait_count(&self, n: usize, ceiling: Duration, pred: impl Fn(&Value) -> bool) -> usize {
        let deadline = Instant::now() + ceiling;
        loop {
            let got = self.count(&pred);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The operator in the cgroup.

struct Operator {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
    ingest: SocketAddr,
    smtp: SocketAddr,
}

impl Operator {
    async fn start(ns: &str, dir: &Path, cgroup: &Cgroup) -> Operator {
        let tokens = dir.join("ingest-tokens");
        std::fs::write(&tokens, format!("good {GOOD_TOKEN}\nattacker {ATTACKER_TOKEN}\n")).expect("token file");
        let dovecot = dir.join("dovecot-tokens");
        std::fs::write(&dovecot, "dovecot dovecot-token-0123456789abcdef\n").expect("token file");
        let (cert, key) = (dir.join("smtp.crt"), dir.join("smtp.key"));
        self_signed(&cert, &key, "localhost", None);
        let store = dir.join("store");
        std::fs::create_dir_all(&store).expect("store dir");
        let (admin, ingest, smtp) = (free_port(), free_port(), free_port());
        let args: Vec<String> = [
            "run",
            "--watch-namespace",
            ns,
            "--shards",
            "2",
            "--http-addr",
            &admin.to_string(),
            "--ingest-addr",
            &ingest.to_string(),
            "--ingest-token-file",
            &tokens.display().to_string(),
            "--dovecot-token-file",
            &dovecot.display().to_string(),
            "--egress-allow",
            "127.0.0.1/32",
            "--store-dir",
            &store.display().to_string(),
            "--smtp-addr",
            &smtp.to_string(),
            "--internal-domains",
            "contoso.com",
            "--smtp-tls-cert-file",
            &cert.display().to_string(),
            "--smtp-tls-key-file",
            &key.display().to_string(),
            "--smtp-handshake-timeout",
            "5s",
            "--ingest-header-timeout",
            "3s",
            "--ingest-body-timeout",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = dir.join("operator.log");
        let out = std::fs::File::create(&log).expect("operator log");
        let err = out.try_clone().expect("log handle");
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(cgroup.script())
            .arg(env!("CARGO_BIN_EXE_mailhook"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start mailhook run through sh");
        let mut operator = Operator {
            child,
            log,
            admin,
            ingest,
            smtp,
        };
        operator.wait_ready().await;
        let procs = std::fs::read_to_string(cgroup.path.join("cgroup.procs")).expect("cgroup.procs");
        assert!(
            procs.lines().any(|p| p.trim() == operator.child.id().to_string()),
            "the operator (pid {}) is not in the cgroup: {procs}",
            operator.child.id()
        );
        operator
    }

    async fn wait_ready(&mut self) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the operator exited ({status}) before it was ready:\n{}",
                    self.log_tail(80)
                );
            }
            let ready = http
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready && TcpStream::connect(self.smtp).await.is_ok() && TcpStream::connect(self.ingest).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "operator not ready:\n{}", self.log_tail(80));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The good producer.

#[derive(Default, Debug)]
struct GoodTally {
    sent: usize,
    acked: usize,
    /// 429/503 answers it retried after Retry-After.
    refusals: usize,
    /// Connections closed before an answer (a full listener), retried.
    resets: usize,
    /// What the producer's events should show at the receiver: (mailbox, count).
    expect: Vec<(String, usize)>,
    failures: Vec<String>,
}

struct Good {
    ingest: SocketAddr,
    smtp: SocketAddr,
    dir: PathBuf,
    http: reqwest::Client,
    seq: AtomicUsize,
}

impl Good {
    fn new(ingest: SocketAddr, smtp: SocketAddr, dir: &Path) -> Good {
        Good {
            ingest,
            smtp,
            dir: dir.to_path_buf(),
            // A fresh connection per request: the ingest listener closes idle kept-alive
            // connections after its header timeout.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            seq: AtomicUsize::new(0),
        }
    }

    /// POSTs one event for `mailbox` with the good token, retrying refusals (429/503, after
    /// Retry-After, at most 2 s) and closed connections up to `tries` times. The status
    /// of the last try, the refusals and the resets.
    async fn post(&self, event: &Value, tries: usize) -> (u16, usize, usize) {
        let (mut refusals, mut resets) = (0, 0);
        let mut last = 0;
        for _ in 0..tries {
            let sent = self
                .http
                .post(format!("http://{}/v1/events", self.ingest))
                .bearer_auth(GOOD_TOKEN)
                .header("content-type", "application/x-ndjson")
                .body(format!("{event}\n"))
                .send()
                .await;
            match sent {
                Ok(r) => {
                    last = r.status().as_u16();
                    if last == 429 || last == 503 {
                        refusals += 1;
                        let wait = r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                            .unwrap_or(1)
                            .min(2);
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                        continue;
                    }
                    return (last, refusals, resets);
                }
                Err(_) => {
                    resets += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        (last, refusals, resets)
    }

    /// `http` events and `mta` journal reports, interleaved, `spacing` apart; the HTTP ones
    /// tried at most `tries` times each.
    async fn produce(&self, tag: &str, http: usize, mta: usize, spacing: Duration, tries: usize) -> GoodTally {
        let mut tally = GoodTally::default();
        let http_mailbox = format!("good-{tag}@contoso.com");
        let mta_mailbox = format!("mta-{tag}@contoso.com");
        let (mut http_acked, mut mta_acked) = (0, 0);
        for i in 0..http.max(mta) {
            if i < http {
                let event = json!({"type": "message.received", "eventId": format!("good-{tag}-{i}"),
                    "mailbox": http_mailbox, "from": "partner@fabrikam.com", "to": [http_mailbox], "subject": format!("good {tag} {i}")});
                tally.sent += 1;
                let (status, refusals, resets) = self.post(&event, tries).await;
                tally.refusals += refusals;
                tally.resets += resets;
                if status == 202 {
                    tally.acked += 1;
                    http_acked += 1;
                } else {
                    tally.failures.push(format!("HTTP event {i}: {status}"));
                }
            }
            if i < mta {
                tally.sent += 1;
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let (ok, out) = self
                    .journal_report(&format!("<good-{tag}-{n}@fabrikam.com>"), &mta_mailbox)
                    .await;
                if ok && out.contains("250 2.0.0") {
                    tally.acked += 1;
                    mta_acked += 1;
                } else {
                    let last: Vec<&str> = out.lines().rev().take(6).collect();
                    tally.failures.push(format!("journal report {i}: {last:?}"));
                }
            }
            tokio::time::sleep(spacing).await;
        }
        tally.expect = vec![(http_mailbox, http_acked), (mta_mailbox, mta_acked)];
        tally
    }

    /// Sends a journal report of one inbound message to `mailbox` with swaks.
    async fn journal_report(&self, message_id: &str, mailbox: &str) -> (bool, String) {
        let report = format!(
            "From: journal@contoso.com\r\nTo: archive@journal.example.net\r\nSubject: journal\r\nMessage-ID: <j{message_id_bare}>\r\nX-MS-Journal-Report:\r\nMIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"jb\"\r\n\r\n--jb\r\nContent-Type: text/plain\r\n\r\nSender: partner@fabrikam.com\r\nSubject: good\r\n\
             Message-Id: {message_id}\r\nTo: {mailbox}\r\n\r\n--jb\r\nContent-Type: message/rfc822\r\n\r\nFrom: partner@fabrikam.com\r\nTo: {mailbox}\r\n\
             Subject: good\r\nMessage-ID: {message_id}\r\n\r\nhello\r\n--jb--\r\n",
            message_id_bare = message_id.trim_matches(['<', '>'])
        );
        let file = self
            .dir
            .join(format!("report-{}.eml", self.seq.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, report).expect("write report");
        let out = swaks(
            self.smtp,
            &[
                "--from",
                "journal@contoso.com",
                "--to",
                "archive@journal.example.net",
                "--data",
                &format!("@{}", file.display()),
            ],
        )
        .await;
        let _ = std::fs::remove_file(&file);
        out
    }
}

/// Runs swaks against `server` with `args`; (exit success, transcript).
async fn swaks(server: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("swaks")
        .args([
            "--server",
            &server.ip().to_string(),
            "--port",
            &server.port().to_string(),
        ])
        .args(["--timeout", "120"])
        .args(args)
        .output()
        .await
        .expect("run swaks (Debian package swaks; tests/setup installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// ---------------------------------------------------------------------------------------
// Raw clients.

/// The status of the HTTP response on `stream` (its first line), if one comes within
/// `within`.
async fn read_status(stream: &mut TcpStream, within: Duration) -> Option<u16> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            return line.split_whitespace().nth(1)?.parse().ok();
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads (and trickles `trickle` bytes every 300 ms, if given) until the server closes the
/// connection; whether it did within `within`.
async fn until_closed(stream: &mut TcpStream, trickle: Option<&[u8]>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => {
                if let Some(bytes) = trickle
                    && stream.write_all(bytes).await.is_err()
                {
                    return true;
                }
            }
        }
    }
    false
}

type Counts = Arc<Mutex<BTreeMap<String, usize>>>;

fn bump(counts: &Counts, key: impl Into<String>) {
    *counts.lock().entry(key.into()).or_default() += 1;
}

fn show(counts: &Counts) -> String {
    counts
        .lock()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One SMTP reply (all its lines), or an error at EOF.
async fn smtp_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        text.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return Ok(text);
        }
    }
}

async fn smtp_cmd(r: &mut BufReader<TcpStream>, line: &str) -> std::io::Result<String> {
    r.get_mut().write_all(format!("{line}\r\n").as_bytes()).await?;
    smtp_reply(r).await
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().expect("address"))?;
    socket.connect(to).await
}

// ---------------------------------------------------------------------------------------
// The attacks.

struct Ctx {
    op: Mutex<Operator>,
    cgroup: Cgroup,
    rx: Receiver,
    good: Good,
    dir: PathBuf,
    full: bool,
    ns: String,
}

/// What an attack reports: its own figures and what the good producer saw.
struct Report {
    figures: String,
    good: GoodTally,
    /// The attack's own checks that failed (kept, not panicked, so its figures print).
    failed: Vec<String>,
}

/// `assert!` that records the failure in `failed` instead of panicking.
macro_rules! check {
    ($failed:expr, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            $failed.push(format!($($arg)+));
        }
    };
}

/// `assert_eq!` that records the failure in `failed` instead of panicking.
macro_rules! check_eq {
    ($failed:expr, $left:expr, $right:expr, $($arg:tt)+) => {
        let (left, right) = (&$left, &$right);
        if left != right {
            $failed.push(format!("{}: {left:?} != {right:?}", format!($($arg)+)));
        }
    };
}

struct Outcome {
    name: &'static str,
    peak_mib: f64,
    rss_mib: f64,
    oom_kills: u64,
    acked: usize,
    sent: usize,
    delivered: usize,
    expected: usize,
    figures: String,
    failure: Option<String>,
    seconds: f64,
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

async fn run_attack<F>(ctx: &Ctx, name: &'static str, attack: F) -> Outcome
where
    F: std::future::Future<Output = Report>,
{
    ctx.cgroup.reset_peak();
    let t0 = Instant::now();
    let result = std::panic::AssertUnwindSafe(attack).catch_unwind().await;
    let mut failures = Vec::new();
    let (figures, good) = match result {
        Ok(r) => {
            failures.extend(r.failed);
            (r.figures, r.good)
        }
        Err(e) => {
            failures.push(panic_text(&*e));
            (String::new(), GoodTally::default())
        }
    };
    // The good producer's events at the receiver.
    let expected: usize = good.expect.iter().map(|(_, n)| n).sum();
    let deadline = Instant::now() + Duration::from_secs(120);
    let delivered = loop {
        let got: usize = good
            .expect
            .iter()
            .map(|(mb, n)| ctx.rx.for_mailbox(mb).len().min(*n))
            .sum();
        if got >= expected || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let peak_mib = ctx.cgroup.peak() as f64 / MIB;
    let oom_kills = ctx
        .cgroup
        .oom_kills()
        .expect("memory.oom_control has an oom_kill line (kernel 4.13+)");
    let (alive, rss_mib) = {
        let mut op = ctx.op.lock();
        (op.alive(), op.rss_mib())
    };
    if !alive {
        failures.push("the operator process is gone".into());
    }
    if oom_kills != 0 {
        failures.push(format!("the cgroup records oom_kill {oom_kills}"));
    }
    if good.acked != good.sent {
        failures.push(format!(
            "good producer acknowledged {}/{}: {:?}",
            good.acked, good.sent, good.failures
        ));
    }
    if delivered != expected {
        failures.push(format!("good producer's events delivered {delivered}/{expected}"));
    }
    let outcome = Outcome {
        name,
        peak_mib,
        rss_mib,
        oom_kills,
        acked: good.acked,
        sent: good.sent,
        delivered,
        expected,
        figures,
        failure: (!failures.is_empty()).then(|| failures.join("; ")),
        seconds: t0.elapsed().as_secs_f64(),
    };
    println!(
        "attack {name}: peak {:.1} MiB, oom_kill {oom_kills}, good producer {}/{} acknowledged ({} refusals retried, {} resets), {delivered}/{expected} delivered; {} [{:.1} s]",
        outcome.peak_mib, good.acked, good.sent, good.refusals, good.resets, outcome.figures, outcome.seconds
    );
    if let Some(f) = &outcome.failure {
        println!("attack {name} FAILED: {f}");
    }
    outcome
}

/// 1. Unauthenticated connections announcing 8 MiB bodies and trickling bytes.
async fn unauth_big_bodies(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let (n, waves) = if ctx.full { (450, 5) } else { (300, 1) };
    let counts: Counts = Arc::default();
    let ingest = ctx.good.ingest;
    let mut good = GoodTally::default();
    for wave in 0..waves {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = connect_from("127.0.0.2", ingest).await else {
                    bump(&counts, "connect_failed");
                    return;
                };
                let head = "POST /v1/events HTTP/1.1\r\nHost: mailhook\r\nContent-Type: application/x-ndjson\r\nContent-Length: 8388608\r\n\r\n{\"type\":";
                if s.write_all(head.as_bytes()).await.is_err() {
                    bump(&counts, "write_failed");
                    return;
                }
                match read_status(&mut s, Duration::from_secs(15)).await {
                    Some(status) => bump(&counts, status.to_string()),
                    None => bump(&counts, "no_answer"),
                }
                if until_closed(&mut s, Some(b"\"aaaa"), Duration::from_secs(20)).await {
                    bump(&counts, "closed");
                } else {
                    bump(&counts, "still_open");
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let g = ctx
            .good
            .produce(&format!("unauth{wave}"), 5, 1, Duration::from_millis(100), 5)
            .await;
        merge(&mut good, g);
        for t in tasks {
            t.await.expect("attack task");
        }
    }
    let c = counts.lock().clone();
    // From one address, those over --ingest-max-connections-per-address (256) are closed
    // at accept without an answer; every other one gets 401 before its body.
    let (answered, unanswered) = (
        c.get("401").copied().unwrap_or(0),
        c.get("no_answer").copied().unwrap_or(0),
    );
    check_eq!(
        failed,
        answered + unanswered,
        n * waves,
        "each gets 401 or is closed at accept: {c:?}"
    );
    check!(
        failed,
        answered >= (n * waves).min(256),
        "at least the address's share gets 401: {c:?}"
    );
    check_eq!(
        failed,
        c.get("closed").copied().unwrap_or(0),
        n * waves,
        "every one is closed: {c:?}"
    );
    Report {
        failed,
        figures: format!("{n}x{waves} connections: {}", show(&counts)),
        good,
    }
}

fn merge(into: &mut GoodTally, g: GoodTally) {
    into.sent += g.sent;
    into.acked += g.acked;
    into.refusals += g.refusals;
    into.resets += g.resets;
    into.expect.extend(g.expect);
    into.failures.extend(g.failures);
}

/// 2. Slowloris: headers a byte at a time, reconnecting when closed.
async fn slowloris(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    // Short: under the listener's cap (512); full: twice it.
    let n = if ctx.full { 1024 } else { 400 };
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let ingest = ctx.good.ingest;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Ok(mut s) = connect_from("127.0.0.4", ingest).await else {
                    bump(&counts, "connect_failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                bump(&counts, "connections");
                let opened = Instant::now();
                if s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: m").await.is_err() {
                    bump(&counts, "closed_at_once");
                    continue;
                }
                let mut buf = [0u8; 1024];
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        r = tokio::time::timeout(Duration::from_millis(700), s.read(&mut buf)) => match r {
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                let key = if opened.elapsed() < Duration::from_millis(500) { "closed_at_accept" } else { "closed_by_header_timeout" };
                                bump(&counts, key);
                                break;
                            }
                            Ok(Ok(_)) => bump(&counts, "answered"),
                            Err(_) => {
                                if s.write_all(b"x").await.is_err() {
                                    bump(&counts, "closed_by_header_timeout");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tries = if ctx.full { 100 } else { 5 };
    let good = ctx
        .good
        .produce("slowloris", 10, 2, Duration::from_millis(500), tries)
        .await;
    // At least one header timeout's worth of attack.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for t in tasks {
        t.await.expect("attack task");
    }
    let c = counts.lock().clone();
    check!(
        failed,
        // Served ones (at most 256 from one address at a time) are closed by the timeout;
        // the rest at accept.
        c.get("closed_by_header_timeout").copied().unwrap_or(0) >= n.min(256),
        "the header timeout closes the slow connections: {c:?}"
    );
    Report {
        failed,
        figures: format!("{n} slow clients: {}", show(&counts)),
        good,
    }
}

/// 3. One credential floods large bodies, trickled and fast.
async fn credential_flood(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let (n, seconds) = if ctx.full { (300, 30) } else { (100, 10) };
    let counts: Counts = Arc::default();
    let stop = CancellationToken::new();
    let ingest = ctx.good.ingest;
    let body_len: usize = 4 * 1024 * 1024;
    let garbage = Arc::new(vec![b'a'; body_len]);
    let mut tasks = Vec::new();
    for i in 0..n {
        let (counts, stop, garbage) = (counts.clone(), stop.clone(), garbage.clone());
        let trickle = i % 2 == 0;
        tasks.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Ok(mut s) = connect_from("127.0.0.5", ingest).await else {
                    bump(&counts, "connect_failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let head = format!(
                    "POST /v1/events HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer {ATTACKER_TOKEN}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    bump(&counts, "write_failed");
                    continue;
                }
                let status = if trickle {
                    let mut sent = 0;
                    let mut status = None;
                    let mut buf = [0u8; 4096];
                    while sent < body_len && !stop.is_cancelled() {
                        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(n)) => {
                                let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                                status = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
                                break;
                            }
                            Err(_) => {
                                if s.write_all(&garbage[..1024]).await.is_err() {
                                    break;
                                }
                                sent += 1024;
                            }
                        }
                    }
                    status
                } else {
                    let (mut r, mut w) = s.into_split();
                    let writer = {
                        let garbage = garbage.clone();
                        tokio::spawn(async move {
                            let _ = w.write_all(&garbage).await;
                            w
                        })
                    };
                    let mut buf = [0u8; 4096];
                    let status = match tokio::time::timeout(Duration::from_secs(15), r.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => String::from_utf8_lossy(&buf[..n])
                            .split_whitespace()
                            .nth(1)
                            .and_then(|s| s.parse::<u16>().ok()),
                        _ => None,
                    };
                    writer.abort();
                    status
                };
                let kind = if trickle { "trickled" } else { "fast" };
                match status {
                    Some(code) => bump(&counts, format!("{kind}_{code}")),
                    None if stop.is_cancelled() => {}
                    None => bump(&counts, format!("{kind}_closed")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let produced = ctx.good.produce("flood", 10, 2, Duration::from_millis(300), 5);
    let (good, ()) = tokio::join!(produced, tokio::time::sleep(Duration::from_secs(seconds)));
    stop.cancel();
    for t in tasks {
        t.await.expect("attack task");
    }
    let c = counts.lock().clone();
    let refused: usize = c
        .iter()
        .filter(|(k, _)| k.ends_with("_429") || k.ends_with("_503"))
        .map(|(_, v)| v)
        .sum();
    check!(
        failed,
        refused > 0,
        "the attacker's credential is refused (429/503): {c:?}"
    );
    check!(
        failed,
        !c.keys().any(|k| k.ends_with("_202")),
        "garbage is never accepted: {c:?}"
    );
    Report {
        failed,
        figures: format!("{n} attacker connections for {seconds} s: {}", show(&counts)),
        good,
    }
}

/// 4. No tokens and wrong tokens from 127.0.0.1, the good producer from the same address.
async fn lockout(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let n = if ctx.full { 500 } else { 50 };
    let counts: Counts = Arc::default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = format!("http://{}/v1/events", ctx.good.ingest);
    let mut good = GoodTally::default();
    for i in 0..n {
        let none = http
            .post(&url)
            .body("{}\n")
            .send()
            .await
            .expect("request without token");
        bump(&counts, format!("no_token_{}", none.status().as_u16()));
        let wrong = http
            .post(&url)
            .bearer_auth(format!("wrong-token-{i:024}"))
            .body("{}\n")
            .send()
            .await
            .expect("request with a wrong token");
        bump(&counts, format!("wrong_token_{}", wrong.status().as_u16()));
        if i % 5 == 4 {
            // The good producer from the same address, first try only.
            let g = ctx
                .good
                .produce(&format!("lockout{}", i / 5), 1, 0, Duration::ZERO, 1)
                .await;
            merge(&mut good, g);
        }
    }
    let g = ctx.good.produce("lockout-mta", 0, 1, Duration::ZERO, 1).await;
    merge(&mut good, g);
    // A right guess from the locked address teaches nothing: a valid token that never
    // authenticated from here (the attacker's own, used from 127.0.0.5 only) is refused.
    let guessed = http
        .post(&url)
        .bearer_auth(ATTACKER_TOKEN)
        .header("content-type", "application/json")
        .body(json!({"type": "message.received", "mailbox": "guess@contoso.com"}).to_string())
        .send()
        .await
        .expect("request with a guessed token");
    bump(&counts, format!("right_guess_{}", guessed.status().as_u16()));
    let c = counts.lock().clone();
    check_eq!(
        failed,
        c.get("right_guess_429").copied().unwrap_or(0),
        1,
        "a right guess from the locked address is answered as locked: {c:?}"
    );
    check_eq!(
        failed,
        c.get("no_token_401").copied().unwrap_or(0),
        n,
        "requests without a token are 401, never locked: {c:?}"
    );
    check!(
        failed,
        c.get("wrong_token_429").copied().unwrap_or(0) > 0,
        "wrong tokens lock the address: {c:?}"
    );
    check_eq!(failed, good.refusals, 0, "the good producer is never refused");
    Report {
        failed,
        figures: show(&counts),
        good,
    }
}

/// 5. SMTP connections from 127.0.0.2 stalled after STARTTLS or idle after EHLO.
async fn smtp_stall(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let (n, waves) = if ctx.full { (100, 3) } else { (100, 1) };
    let smtp = ctx.good.smtp;
    let counts: Counts = Arc::default();
    let mut good = GoodTally::default();
    for wave in 0..waves {
        let mut tasks = Vec::new();
        for i in 0..n {
            let counts = counts.clone();
            let starttls = i % 2 == 0;
            tasks.push(tokio::spawn(async move {
                let kind = if starttls { "starttls" } else { "idle" };
                let Ok(s) = connect_from("127.0.0.2", smtp).await else {
                    bump(&counts, "connect_failed");
                    return;
                };
                let mut r = BufReader::new(s);
                let greeting = smtp_reply(&mut r).await.unwrap_or_default();
                if !greeting.starts_with("220") {
                    bump(&counts, format!("refused_{}", greeting.get(..3).unwrap_or("eof")));
                    return;
                }
                bump(&counts, format!("{kind}_served"));
                let ehlo = smtp_cmd(&mut r, "EHLO x").await.unwrap_or_default();
                assert!(ehlo.contains("STARTTLS"), "STARTTLS offered: {ehlo}");
                if starttls {
                    let go = smtp_cmd(&mut r, "STARTTLS").await.unwrap_or_default();
                    assert!(go.starts_with("220"), "STARTTLS answered 220: {go}");
                }
                // Then nothing: the server must close it.
                let mut sink = Vec::new();
                let closed = tokio::time::timeout(Duration::from_secs(40), r.read_to_end(&mut sink)).await;
                match closed {
                    Ok(_) => bump(&counts, format!("{kind}_closed_by_server")),
                    Err(_) => bump(&counts, format!("{kind}_still_open")),
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let g = ctx
            .good
            .produce(&format!("stall{wave}"), 3, 3, Duration::from_millis(200), 5)
            .await;
        merge(&mut good, g);
        for t in tasks {
            t.await.expect("attack task");
        }
    }
    // The slots are free again: 20 fresh connections from 127.0.0.2 are greeted.
    let mut greeted = 0;
    let mut fresh = Vec::new();
    for _ in 0..20 {
        let s = connect_from("127.0.0.2", smtp).await.expect("connect");
        let mut r = BufReader::new(s);
        if smtp_reply(&mut r).await.unwrap_or_default().starts_with("220") {
            greeted += 1;
        }
        fresh.push(r);
    }
    for mut r in fresh {
        let _ = smtp_cmd(&mut r, "QUIT").await;
    }
    let c = counts.lock().clone();
    let served = c.get("starttls_served").copied().unwrap_or(0) + c.get("idle_served").copied().unwrap_or(0);
    let closed =
        c.get("starttls_closed_by_server").copied().unwrap_or(0) + c.get("idle_closed_by_server").copied().unwrap_or(0);
    check!(
        failed,
        served <= 20 * waves,
        "at most 20 connections of one address are served: {c:?}"
    );
    check!(
        failed,
        c.get("starttls_served").copied().unwrap_or(0) > 0,
        "some STARTTLS stalls were served: {c:?}"
    );
    check_eq!(
        failed,
        closed,
        served,
        "every stalled connection is closed by the server: {c:?}"
    );
    check_eq!(failed, greeted, 20, "the freed slots take new connections");
    Report {
        failed,
        figures: format!("{n}x{waves} from 127.0.0.2: {} fresh_greeted={greeted}", show(&counts)),
        good,
    }
}

/// 6. A 2 MiB line in DATA, then a good message in the same session.
async fn smtp_long_line(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let sessions = if ctx.full { 20 } else { 1 };
    let smtp = ctx.good.smtp;
    let counts: Counts = Arc::default();
    let mut tasks = Vec::new();
    for k in 0..sessions {
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            // From 127.0.0.3: the full form's 20 sessions would take all of 127.0.0.1's slots
            // (per-address cap) from the good MTA.
            let s = connect_from("127.0.0.3", smtp).await.expect("connect");
            let mut r = BufReader::new(s);
            assert!(smtp_reply(&mut r).await.expect("greeting").starts_with("220"));
            smtp_cmd(&mut r, "EHLO attacker").await.expect("EHLO");
            let transaction = async |r: &mut BufReader<TcpStream>, body: &[u8]| -> String {
                for line in [
                    "MAIL FROM:<x@fabrikam.com>",
                    &format!("RCPT TO:<longline{k}@contoso.com>"),
                ] {
                    let a = smtp_cmd(r, line).await.expect("command");
                    assert!(a.starts_with("250"), "{line}: {a}");
                }
                let a = smtp_cmd(r, "DATA").await.expect("DATA");
                assert!(a.starts_with("354"), "DATA: {a}");
                r.get_mut().write_all(body).await.expect("message");
                r.get_mut().write_all(b"\r\n.\r\n").await.expect("end");
                smtp_reply(r).await.expect("answer")
            };
            let mut long = format!(
                "From: x@fabrikam.com\r\nTo: longline{k}@contoso.com\r\nMessage-ID: <long-{k}@fabrikam.com>\r\nSubject: long\r\n\r\n"
            )
            .into_bytes();
            long.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
            let answer = transaction(&mut r, &long).await;
            bump(&counts, format!("long_line_{}", answer.get(..9).unwrap_or(&answer)));
            let next = format!(
                "From: x@fabrikam.com\r\nTo: longline{k}@contoso.com\r\nMessage-ID: <after-long-{k}@fabrikam.com>\r\nSubject: after\r\n\r\nfine\r\n"
            );
            let answer = transaction(&mut r, next.as_bytes()).await;
            bump(&counts, format!("next_{}", answer.get(..3).unwrap_or(&answer)));
            let _ = smtp_cmd(&mut r, "QUIT").await;
        }));
    }
    let mut good = ctx.good.produce("longline", 3, 1, Duration::from_millis(100), 5).await;
    for t in tasks {
        t.await.expect("attack session");
    }
    let c = counts.lock().clone();
    check_eq!(
        failed,
        c.get("long_line_500 5.5.2").copied().unwrap_or(0),
        sessions,
        "2 MiB lines get 500 5.5.2: {c:?}"
    );
    check_eq!(
        failed,
        c.get("next_250").copied().unwrap_or(0),
        sessions,
        "the session goes on: {c:?}"
    );
    // The message after the long line is the session's event, and only it.
    good.expect
        .extend((0..sessions).map(|k| (format!("longline{k}@contoso.com"), 1)));
    Report {
        failed,
        figures: show(&counts),
        good,
    }
}

/// 7. One journal report of one message to thousands of internal recipients.
async fn journal_fanout(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let n = if ctx.full { 50_000 } else { 5_000 };
    let mut report = String::from(
        "From: journal@contoso.com\r\nTo: archive@journal.example.net\r\nSubject: journal\r\nMessage-ID: <journal-allstaff@contoso.com>\r\nX-MS-Journal-Report:\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"jb\"\r\n\r\n--jb\r\nContent-Type: text/plain\r\n\r\nSender: ceo@fabrikam.com\r\nSubject: all hands\r\nMessage-Id: <allstaff@fabrikam.com>\r\n",
    );
    for i in 0..n {
        report.push_str(&format!("To: staff{i}@contoso.com, Expanded: all@contoso.com\r\n"));
    }
    report.push_str(
        "\r\n--jb\r\nContent-Type: message/rfc822\r\n\r\nFrom: ceo@fabrikam.com\r\nTo: all@contoso.com\r\nSubject: all hands\r\nMessage-ID: <allstaff@fabrikam.com>\r\n\r\nall hands\r\n--jb--\r\n",
    );
    let file = ctx.dir.join("allstaff.eml");
    std::fs::write(&file, &report).expect("write report");
    let t0 = Instant::now();
    let (ok, out) = swaks(
        ctx.good.smtp,
        &[
            "--from",
            "journal@contoso.com",
            "--to",
            "archive@journal.example.net",
            "--data",
            &format!("@{}", file.display()),
        ],
    )
    .await;
    let answered = t0.elapsed().as_secs_f64();
    let reply = out
        .lines()
        .find(|l| l.starts_with("<~ 250 2.0.0") || l.starts_with("<** 552") || l.starts_with("<** "))
        .unwrap_or("")
        .to_string();
    let accepted = ok && out.contains("250 2.0.0 OK");
    // The good producer while the fan-out is delivered.
    let good = ctx.good.produce("fanout", 5, 1, Duration::from_millis(200), 5).await;
    let is_staff = |v: &Value| {
        v["type"] == "message.received" && v["data"]["mailbox"].as_str().is_some_and(|m| m.starts_with("staff"))
    };
    let (delivered, distinct) = if accepted {
        let ceiling = Duration::from_secs(if ctx.full { 1200 } else { 300 });
        let got = ctx.rx.wait_count(n, ceiling, is_staff).await;
        let distinct: std::collections::HashSet<String> = ctx
            .rx
            .rx
            .events
            .lock()
            .iter()
            .filter(|v| is_staff(v))
            .filter_map(|v| v["data"]["mailbox"].as_str().map(str::to_string))
            .collect();
        (got, distinct.len())
    } else {
        (0, 0)
    };
    let delivered_in = t0.elapsed().as_secs_f64();
    let figures = format!(
        "{n} recipients, report {:.1} MiB: {} after {answered:.1} s; {delivered} staff events ({distinct} mailboxes) after {delivered_in:.1} s",
        report.len() as f64 / MIB,
        if accepted { "250".to_string() } else { reply.clone() }
    );
    if ctx.full {
        check!(
            failed,
            accepted || out.contains("552"),
            "accepted or refused with 552: {}",
            out.lines().rev().take(8).collect::<Vec<_>>().join(" | ")
        );
    } else {
        check!(
            failed,
            accepted,
            "the report is accepted: {}",
            out.lines().rev().take(8).collect::<Vec<_>>().join(" | ")
        );
    }
    if accepted {
        check_eq!(failed, distinct, n, "one event per recipient mailbox ({figures})");
        check_eq!(failed, delivered, n, "no more than one per mailbox ({figures})");
    }
    Report { figures, good, failed }
}

/// 8. One Message-ID on two messages; a repeat; an HTTP event posing as a journal id.
async fn message_id_collision(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let smtp = ctx.good.smtp;
    let plain = |to: &str, mid: &str, subject: &str, body: &str| {
        format!(
            "From: x@fabrikam.com\r\nTo: {to}\r\nDate: Thu, 26 Nov 2026 09:15:00 +0000\r\nMessage-ID: {mid}\r\nSubject: {subject}\r\n\r\n{body}\r\n"
        )
    };
    let send = async |to: &str, text: String, name: &str| -> String {
        let file = ctx.dir.join(name);
        std::fs::write(&file, text).expect("write message");
        let (ok, out) = swaks(
            smtp,
            &[
                "--from",
                "x@fabrikam.com",
                "--to",
                to,
                "--data",
                &format!("@{}", file.display()),
            ],
        )
        .await;
        assert!(ok && out.contains("250 2.0.0"), "{out}");
        out
    };
    let alice = "alice-mid@contoso.com";
    let a = plain(alice, "<same@fabrikam.com>", "invoice", "harmless");
    let b = plain(alice, "<same@fabrikam.com>", "invoice", "wire 250k to the new account");
    send(alice, a.clone(), "a.eml").await;
    send(alice, b, "b.eml").await;
    send(alice, a, "a-again.eml").await;
    // An HTTP event that claims the journal id of a message not yet sent.
    let carol = "carol-mid@contoso.com";
    let decoy = json!({"type": "message.received", "eventId": format!("smtp:<mid2@fabrikam.com>:{carol}"),
        "mailbox": carol, "from": "x@fabrikam.com", "to": [carol], "subject": "decoy"});
    let (status, _, _) = ctx.good.post(&decoy, 1).await;
    assert_eq!(status, 202, "the decoy is accepted as an event of its own");
    send(carol, plain(carol, "<mid2@fabrikam.com>", "real", "real mail"), "c.eml").await;
    let good = ctx.good.produce("mid", 3, 1, Duration::from_millis(100), 5).await;
    // Wait for what should come, then a little longer for what should not.
    ctx.rx
        .wait_count(2, Duration::from_secs(60), |v| v["data"]["mailbox"] == alice)
        .await;
    ctx.rx
        .wait_count(2, Duration::from_secs(60), |v| v["data"]["mailbox"] == carol)
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alice_events = ctx.rx.for_mailbox(alice);
    let carol_subjects: Vec<String> = ctx
        .rx
        .for_mailbox(carol)
        .iter()
        .filter_map(|v| v["data"]["subject"].as_str().map(str::to_string))
        .collect();
    let figures = format!(
        "alice (A, B, A again): {} events; carol (decoy HTTP id, then the mail): subjects {carol_subjects:?}",
        alice_events.len()
    );
    check_eq!(
        failed,
        alice_events.len(),
        2,
        "two messages with one Message-ID are two events, a repeat is none ({figures})"
    );
    check!(
        failed,
        carol_subjects.contains(&"real".to_string()) && carol_subjects.contains(&"decoy".to_string()),
        "the HTTP event does not suppress the journal event ({figures})"
    );
    Report { figures, good, failed }
}

/// 9. `mailhook run` without a store flag.
async fn no_store_flag(ctx: &Ctx) -> Report {
    let mut failed: Vec<String> = Vec::new();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .args(["run", "--watch-namespace", &ctx.ns])
        .args(["--http-addr", &free_port().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start mailhook run");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("mailhook run without a store flag exits")
        .expect("wait");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("stderr");
    let named: Vec<&str> = ["--store-dir", "--store-url", "--store-memory"]
        .into_iter()
        .filter(|f| stderr.contains(f))
        .collect();
    let figures = format!("exit {status}, stderr names {named:?}");
    check!(failed, !status.success(), "{figures}: {stderr}");
    check_eq!(failed, named.len(), 3, "{figures}: {stderr}");
    Report {
        figures,
        good: GoodTally::default(),
        failed,
    }
}

fn main() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "the adversarial suite needs the test control plane: run eval \"$(tests/testenv/up)\" first (KUBECONFIG is not set)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let t0 = Instant::now();
    let outcomes = rt.block_on(async {
        let full = full();
        let cgroup = Cgroup::create(&format!("mailhook-adversarial-{}", std::process::id()), LIMIT_BYTES);
        let dir = std::env::temp_dir().join(format!("mailhook-adversarial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("work dir");
        let ns = TestNamespace::new("adversarial").await;
        let rx = Receiver::start();
        let op = Operator::start(&ns.name, &dir, &cgroup).await;
        apply(
            &ns,
            &(signing_secret(SIEM_SECRET) + &subscription("adv", &rx.url, "", "")),
        );
        wait_ready(&ns, "adv").await;
        println!(
            "adversarial suite ({} form): operator pid {} in {} (limit {} MiB), ingest {}, smtp {}",
            if full { "full" } else { "short" },
            op.child.id(),
            cgroup.path.display(),
            LIMIT_BYTES >> 20,
            op.ingest,
            op.smtp
        );
        let good = Good::new(op.ingest, op.smtp, &dir);
        let ctx = Ctx {
            op: Mutex::new(op),
            cgroup,
            rx,
            good,
            dir: dir.clone(),
            full,
            ns: ns.name.clone(),
        };
        let mut outcomes = vec![
            run_attack(&ctx, "unauth-8mib", unauth_big_bodies(&ctx)).await,
            run_attack(&ctx, "slowloris", slowloris(&ctx)).await,
            run_attack(&ctx, "credential-flood", credential_flood(&ctx)).await,
            run_attack(&ctx, "lockout", lockout(&ctx)).await,
            run_attack(&ctx, "smtp-stall", smtp_stall(&ctx)).await,
            run_attack(&ctx, "smtp-long-line", smtp_long_line(&ctx)).await,
            run_attack(&ctx, "journal-fanout", journal_fanout(&ctx)).await,
            run_attack(&ctx, "message-id-collision", message_id_collision(&ctx)).await,
        ];
        outcomes.push(run_attack(&ctx, "no-store-flag", no_store_flag(&ctx)).await);
        if outcomes.iter().any(|o| o.failure.is_some()) {
            println!("--- operator log (tail):\n{}", ctx.op.lock().log_tail(60));
        }
        drop(ctx);
        let _ = std::fs::remove_dir_all(&dir);
        drop(ns);
        outcomes
    });
    println!(
        "\n{:<22} {:>9} {:>8} {:>8} {:>10} {:>10} {:>7}  result",
        "attack", "peak MiB", "RSS MiB", "oom_kill", "good ack", "delivered", "secs"
    );
    for o in &outcomes {
        println!(
            "{:<22} {:>9.1} {:>8.1} {:>8} {:>10} {:>10} {:>7.1}  {}",
            o.name,
            o.peak_mib,
            o.rss_mib,
            o.oom_kills,
            format!("{}/{}", o.acked, o.sent),
            format!("{}/{}", o.delivered, o.expected),
            o.seconds,
            if o.failure.is_some() { "FAILED" } else { "ok" }
        );
    }
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure.as_ref().map(|f| format!("{}: {f}", o.name)))
        .collect();
    assert!(
        failed.is_empty(),
        "attacks that broke a defense:\n{}",
        failed.join("\n")
    );
}
