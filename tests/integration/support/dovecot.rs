//! A real Dovecot (tests/dovecot/env.py): IMAP, LMTP and ManageSieve on loopback, with
//! mailhook's Dovecot source installed as shipped (examples/dovecot/), and what users do
//! to it (tests/dovecot/act.py, Python's imaplib and LMTP).

use std::net::SocketAddr;

use super::repo_path;

pub struct Dovecot {
    /// What env.py printed: {"dir", "spool", "host", "imap", "lmtp", "sieve"}, with TLS
    /// also "imaps" and "ca".
    env: serde_json::Value,
}

impl Dovecot {
    /// Dovecot posting to the operator whose ingest API is at `ingest`, with `token`.
    pub fn start(ingest: SocketAddr, token: &str) -> Dovecot {
        Self::up(&["--mailhook", &format!("http://{ingest}"), "--token", token])
    }

    /// [`Dovecot::start`] with the exporter sending configuration changes only, not reads
    /// and logins (a baseline for figures).
    pub fn start_changes_only(ingest: SocketAddr, token: &str) -> Dovecot {
        Self::up(&[
            "--mailhook",
            &format!("http://{ingest}"),
            "--token",
            token,
            "--changes-only",
        ])
    }

    /// [`Dovecot::start`] with TLS required: a test CA, STARTTLS on `imap`, implicit TLS
    /// on `imaps` (env.py --tls).
    pub fn start_tls(ingest: SocketAddr, token: &str) -> Dovecot {
        Self::up(&["--mailhook", &format!("http://{ingest}"), "--token", token, "--tls"])
    }

    /// Dovecot without mailhook's source (a baseline for figures).
    pub fn start_plain() -> Dovecot {
        Self::up(&[])
    }

    fn up(args: &[&str]) -> Dovecot {
        let (ok, out, err) = super::run(
            std::process::Command::new("python3")
                .args([&repo_path("tests/dovecot/env.py"), "up"])
                .args(args),
            None,
        )
        .expect("run tests/dovecot/env.py (python3; tests/setup installs Dovecot)");
        assert!(ok, "Dovecot did not start: {err}");
        Dovecot {
            env: serde_json::from_str(out.trim()).expect("env.py prints JSON"),
        }
    }

    pub fn imap(&self) -> SocketAddr {
        SocketAddr::new(self.host(), self.port("imap"))
    }

    /// The ManageSieve listener.
    pub fn sieve(&self) -> SocketAddr {
        SocketAddr::new(self.host(), self.port("sieve"))
    }

    /// The implicit-TLS listener ([`Dovecot::start_tls`] only).
    pub fn imaps(&self) -> SocketAddr {
        SocketAddr::new(self.host(), self.port("imaps"))
    }

    /// The PEM file of the CA that signed the server's certificate ([`Dovecot::start_tls`]
    /// only).
    pub fn ca(&self) -> String {
        self.env["ca"].as_str().expect("a TLS Dovecot").to_string()
    }

    fn host(&self) -> std::net::IpAddr {
        self.env["host"]
            .as_str()
            .and_then(|h| h.parse().ok())
            .expect("env.py names its host")
    }

    fn port(&self, name: &str) -> u16 {
        self.env[name]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .expect("port")
    }

    /// Runs one act.py action; panics with its output if it fails. Returns its stdout.
    pub fn act(&self, action: &str, args: &[&str]) -> String {
        let (ok, out, err) = super::run(
            std::process::Command::new("python3")
                .args([
                    &repo_path("tests/dovecot/act.py"),
                    "--ports",
                    &self.env.to_string(),
                    action,
                ])
                .args(args),
            None,
        )
        .expect("run tests/dovecot/act.py");
        assert!(
            ok,
            "{action} {args:?} failed: {out}{err}\n--- Dovecot's log:\n{}",
            self.log()
        );
        out
    }

    /// Dovecot's log (errors of the Lua script land here).
    pub fn log(&self) -> String {
        let dir = self.env["dir"].as_str().unwrap_or_default();
        std::fs::read_to_string(format!("{dir}/dovecot.log")).unwrap_or_default()
    }

    /// The batches waiting in the script's spool for `user`.
    pub fn spooled(&self, user: &str) -> usize {
        let spool = self.env["spool"].as_str().unwrap_or_default();
        std::fs::read_to_string(format!("{spool}/{user}.ndjson"))
            .map(|s| s.lines().filter(|l| !l.is_empty()).count())
            .unwrap_or(0)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- Dovecot's log:\n{}", self.log());
        }
        if let Some(dir) = self.env["dir"].as_str() {
            let _ = std::process::Command::new("python3")
                .args([&repo_path("tests/dovecot/env.py"), "down", dir])
                .status();
        }
    }
}
