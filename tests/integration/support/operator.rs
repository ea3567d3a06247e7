//! The real `mailhook run` binary, one per test, serving the test's namespace
//! (`--watch-namespace`) on free loopback ports, ready when its `/readyz` says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use super::TestNamespace;

/// The bearer token every test operator accepts on `/v1/events`.
pub const INGEST_TOKEN: &str = "test-ingest-token";
/// The token every test operator accepts on the Dovecot routes (and only there).
pub const DOVECOT_TOKEN: &str = "test-dovecot-token";

/// A free loopback port (another process may take it before we bind; tests accept that).
pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// How long a start (or restart) may take to become ready: a ceiling for a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The real `mailhook run` binary, serving one namespace, killed when dropped (its log is
/// printed if the test is failing then).
pub struct Operator {
    child: Child,
    args: Vec<String>,
    log: PathBuf,
    token_file: PathBuf,
    pub admin: SocketAddr,
    pub ingest: SocketAddr,
}

/// The process exited because one of its ports was taken (`Address already in use`).
struct PortTaken;

impl Operator {
    /// [`Operator::start_with`] without extra flags.
    pub async fn start(ns: &TestNamespace) -> Operator {
        Operator::start_with(ns, &[]).await
    }

    /// Starts `mailhook run` for `ns` with the test flags (admin and ingest API on free
    /// ports, the ingest token file, two shards, loopback egress allowed unless `extra`
    /// sets egress flags) and `extra`, and returns once it is ready (see
    /// [`Operator::wait_ready`]). When another process took one of the free ports meanwhile
    /// (parallel tests) and the operator exited for it, starts again on new ones.
    pub async fn start_with(ns: &TestNamespace, extra: &[&str]) -> Operator {
        for _ in 0..5 {
            let mut operator = Self::spawn_new(ns, extra);
            if operator.wait_ready().await.is_ok() {
                return operator;
            }
        }
        panic!("the operator could not bind its ports five times in a row");
    }

    fn spawn_new(ns: &TestNamespace, extra: &[&str]) -> Operator {
        // Several operators on one namespace (replicas) each log to a file of their own.
        let who = extra
            .iter()
            .position(|a| *a == "--replica-name")
            .and_then(|i| extra.get(i + 1))
            .map(|r| format!("{}-{r}", ns.name))
            .unwrap_or_else(|| ns.name.clone());
        let log = std::env::temp_dir().join(format!("mailhook-operator-{who}.log"));
        let token_file = std::env::temp_dir().join(format!("mailhook-tokens-{who}"));
        std::fs::write(&token_file, format!("# test tokens\n{INGEST_TOKEN}\n")).expect("write token file");
        let dovecot_tokens = std::env::temp_dir().join(format!("mailhook-dovecot-tokens-{who}"));
        std::fs::write(&dovecot_tokens, format!("dovecot-test {DOVECOT_TOKEN}\n")).expect("write token file");
        let (admin, ingest) = (free_port(), free_port());
        // MailSources are cluster-scoped: each test's operator judges only its own.
        let sources = format!("mailhook.io/test-namespace={}", ns.name);
        let mut args: Vec<String> = ["run", "--watch-namespace", &ns.name, "--mail-source-selector", &sources]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !extra.contains(&"--shards") {
            args.extend(["--shards".into(), "2".into()]);
        }
        args.extend([
            "--http-addr".into(),
            admin.to_string(),
            "--ingest-addr".into(),
            ingest.to_string(),
        ]);
        args.extend(["--ingest-token-file".into(), token_file.display().to_string()]);
        args.extend(["--dovecot-token-file".into(), dovecot_tokens.display().to_string()]);
        // Test receivers listen on loopback, which the egress guard refuses by default; a
        // test that sets its own egress flags gets only those.
        if !extra.iter().any(|a| a.starts_with("--egress")) {
            args.extend(["--egress-allow".into(), "127.0.0.1/32".into()]);
        }
        // Tests that restart with work on disk choose a store; the rest keep it in memory.
        if !extra.iter().any(|a| *a == "--store-dir" || *a == "--store-url") {
            args.push("--store-memory".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Self::spawn(&args, &log, false);
        Operator {
            child,
            args,
            log,
            token_file,
            admin,
            ingest,
        }
    }

    fn spawn(args: &[String], log: &Path, append: bool) -> Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(log)
            .expect("open operator log");
        let err = out.try_clone().expect("clone log handle");
        // MAILHOOK_BIN runs another build (benchmarks compare commits under one test).
        std::process::Command::new(
            std::env::var("MAILHOOK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mailhook").to_string()),
        )
        .args(args)
        .env("RUST_LOG", "info,mailhook=debug")
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start mailhook run")
    }

    /// Waits until the process is ready: `/readyz` on its admin port answers 200, that
    /// port is held by this very process (not by another test's operator that took the
    /// same port number), and the ingest API and, if configured, the SMTP receiver accept
    /// a TCP connection. `Err` if the process exited because a port was taken; panics if it
    /// exited for another reason or is not ready within [`READY_WITHIN`].
    async fn wait_ready(&mut self) -> Result<(), PortTaken> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("HTTP client");
        let readyz = format!("http://{}/readyz", self.admin);
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // The reason to try other ports; readiness itself comes from /readyz only.
                if self.log().contains("Address already in use") {
                    return Err(PortTaken);
                }
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "the operator exited ({status}) before it was ready; the end of its log:\n{}",
                    tail.join("\n")
                );
            }
            let ready = http.get(&readyz).send().await.is_ok_and(|r| r.status().is_success());
            if ready && listens_on(self.child.id(), self.admin) && self.ports_accept().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "operator not ready within {} s ({readyz} never answered 200)",
                    READY_WITHIN.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the ingest API and the SMTP receiver (when `--smtp-addr` is set) accept a
    /// TCP connection.
    async fn ports_accept(&self) -> bool {
        let smtp = self
            .args
            .iter()
            .position(|a| a == "--smtp-addr")
            .and_then(|i| self.args.get(i + 1))
            .map(|a| a.parse::<SocketAddr>().expect("--smtp-addr is an address"));
        for addr in std::iter::once(self.ingest).chain(smtp) {
            let connect = tokio::net::TcpStream::connect(addr);
            if !matches!(tokio::time::timeout(Duration::from_secs(2), connect).await, Ok(Ok(_))) {
                return false;
            }
        }
        true
    }

    /// Sends SIGTERM without waiting (a second one cuts the drain short).
    pub fn sigterm(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM (what the kubelet sends) and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.sigterm();
        self.wait_exit(within)
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, then start again with the same flags (same ports, same store); returns once
    /// ready.
    pub async fn kill_and_restart(&mut self) {
        self.kill();
        self.restart().await;
    }

    /// SIGKILL: no shutdown code runs. `restart_without` starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the stopped operator again without the consecutive flags `remove` (e.g.
    /// `["--watch-namespace", "b"]`), otherwise with the same flags; returns once ready.
    pub async fn restart_without(&mut self, remove: &[&str]) {
        if let Some(at) = self.args.windows(remove.len()).position(|w| w.iter().eq(remove.iter())) {
            self.args.drain(at..at + remove.len());
        }
        self.restart().await;
    }

    /// Sets `flag` to `value` for the next (re)start: replaces its value, or adds it.
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(at) if at + 1 < self.args.len() => self.args[at + 1] = value.to_string(),
            _ => self.args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// Starts the stopped operator again with `extra` flags added; returns once ready.
    pub async fn restart_with(&mut self, extra: &[&str]) {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self.restart().await;
    }

    /// Starts the stopped operator again with its flags (same ports, same store; the log
    /// goes on) and waits until it is ready.
    pub async fn restart(&mut self) {
        self.child = Self::spawn(&self.args, &self.log, true);
        if self.wait_ready().await.is_err() {
            panic!("the restarted operator found one of its ports taken");
        }
    }

    /// The value of one Prometheus series (`name{labels}` exactly as exposed), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The operator's log so far (all its runs, restarts included).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The Prometheus exposition from the admin port.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body")
    }

    /// POSTs an NDJSON batch to the ingest API with [`INGEST_TOKEN`]; returns (status, body).
    pub async fn ingest(&self, events: &[serde_json::Value]) -> (u16, serde_json::Value) {
        let body: String = events.iter().map(|e| format!("{e}\n")).collect();
        let r = reqwest::Client::new()
            .post(format!("http://{}/v1/events", self.ingest))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("ingest request");
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default(),
        )
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of the operator under test:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.token_file);
    }
}

/// Whether process `pid` holds the TCP socket listening on `addr`, read from /proc (Linux):
/// the listening sockets on that port in the process's network namespace, and whether one
/// of them is among the process's open files.
fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let table = if addr.is_ipv4() { "tcp" } else { "tcp6" };
    let Ok(sockets) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return false;
    };
    // Columns: sl local_address rem_address st ... inode; the port is upper-case hex,
    // state 0A is LISTEN.
    let port = format!(":{:04X}", addr.port());
    let inodes: Vec<String> = sockets
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let inode = columns.get(9)?;
            (columns.get(1)?.ends_with(&port) && *columns.get(3)? == "0A").then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}
