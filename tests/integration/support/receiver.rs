//! tests/receiver/receiver.py: a real webhook receiver that verifies every delivery with the
//! `standardwebhooks` PyPI library (or an ed25519 public key) and records it.

use super::repo_path;

/// A running receiver.py, killed when dropped.
pub struct Receiver {
    child: std::process::Child,
    pub port: u16,
    /// Where /_mode and /_deliveries answer (plain HTTP).
    control: String,
    /// Where deliveries go, without the path.
    base: String,
}

/// One delivery as the receiver saw it.
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Received {
    pub webhook_id: Option<String>,
    pub verified: bool,
    pub answered: u16,
    pub body: String,
    /// The `x-` headers it carried (extra endpoint headers).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The `webhook-signature` header.
    #[serde(default)]
    pub signatures: String,
    /// Common name of the client certificate (mutual TLS).
    #[serde(default)]
    pub client_cert: Option<String>,
    /// The request path (one per subscription, where tests give each its own).
    #[serde(default)]
    pub path: String,
    /// Requests to that path in progress when this one arrived, itself included (requests
    /// whose sender was gone before they were read are not counted).
    #[serde(default)]
    pub in_flight: u32,
    /// Read after its sender had closed the connection (the sender was killed).
    #[serde(default)]
    pub orphaned: bool,
    /// When it arrived (the receiver's monotonic clock, seconds).
    #[serde(default)]
    pub arrived: f64,
    /// The sender's TCP port (tells the connections apart).
    #[serde(default)]
    pub port: u16,
}

impl Received {
    /// The body as JSON (Null if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }

    /// The id the producer gave the event (`data.producerEventId`), if the body has one.
    pub fn producer_event_id(&self) -> Option<String> {
        self.json()["data"]["producerEventId"].as_str().map(String::from)
    }
}

impl Receiver {
    /// A receiver on 127.0.0.1 verifying `v1` signatures with `secret`.
    pub fn start(secret: &str) -> Receiver {
        Self::start_args(&["--secret", secret])
    }

    /// A receiver with receiver.py's own flags (--host, --public-key, --tls-cert, ...).
    pub fn start_args(args: &[&str]) -> Receiver {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(repo_path("tests/receiver/receiver.py"))
            .args(args)
            .arg("--quiet")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start receiver.py");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("receiver prints its port");
        let mut words = line.trim().strip_prefix("listening on ").unwrap_or_default().split(' ');
        let port: u16 = words
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        let control_port: Option<u16> = match (words.next(), words.next()) {
            (Some("control"), Some(p)) => p.parse().ok(),
            _ => None,
        };
        let flag = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .copied()
        };
        let host = flag("--host").unwrap_or("127.0.0.1").to_string();
        let scheme = if flag("--tls-cert").is_some() { "https" } else { "http" };
        let control = match control_port {
            Some(c) => format!("http://127.0.0.1:{c}"),
            None => format!("http://{host}:{port}"),
        };
        Receiver {
            child,
            port,
            control,
            base: format!("{scheme}://{host}:{port}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// From now on, answer deliveries with `status`.
    pub async fn answer(&self, status: u16) {
        self.mode(&format!(r#"{{"status": {status}}}"#)).await;
    }

    /// Switches the receiver's behaviour (see receiver.py: status, redirect, echo).
    pub async fn mode(&self, json: &str) {
        reqwest::Client::new()
            .post(format!("{}/_mode", self.control))
            .body(json.to_string())
            .send()
            .await
            .expect("set receiver mode");
    }

    pub async fn deliveries(&self) -> Vec<Received> {
        let text = reqwest::get(format!("{}/_deliveries", self.control))
            .await
            .expect("receiver")
            .text()
            .await
            .expect("body");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("delivery record"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
