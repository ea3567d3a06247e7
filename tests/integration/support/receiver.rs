//! tests/receiver/receiver.py: a real webhook receiver that verifies every delivery with the
//! `standardwebhooks` PyPI library (or an ed25519 public key), reads it in whichever wire
//! format it came (Standard Webhooks JSON, CloudEvents binary, structured or batch: the
//! `cloudevents` SDK), decrypts it (`jwcrypto`, with `--private-key`), checks every event's
//! data against the JSON Schemas in schemas/v1 (`jsonschema`), and records it.
//! [`Receiver::deliveries`] panics on any schema error, so every delivery a test reads is
//! schema-checked.

use std::collections::BTreeMap;

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
#[allow(dead_code, reason = "the wire-format fields are for the tests that need them")]
pub struct Received {
    pub webhook_id: Option<String>,
    pub verified: bool,
    pub answered: u16,
    pub body: String,
    /// The `x-` headers (extra endpoint headers) and the `mailhook-` ones it carried.
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
    /// The `content-type` header.
    #[serde(default)]
    pub content_type: Option<String>,
    /// `standardWebhooks`, `cloudEvents.binary`, `cloudEvents.structured` or
    /// `cloudEvents.batch` (empty for a redirected request, which is not read).
    #[serde(default)]
    pub format: String,
    /// Events in the request: 1 unless batched.
    #[serde(default)]
    pub batch_size: usize,
    /// The events of the request, decoded and decrypted (empty when they could not be read,
    /// e.g. an encrypted Standard Webhooks body without the key: see `decrypt_error`).
    #[serde(default)]
    pub events: Vec<ReceivedEvent>,
    /// The body (Standard Webhooks) or some event's data (CloudEvents) was a JWE.
    #[serde(default)]
    pub encrypted: bool,
    /// Why the request does not match the wire format or an event's data its JSON Schema
    /// (empty when all is well). [`Receiver::deliveries`] panics on any.
    #[serde(default)]
    pub schema_errors: Vec<String>,
    /// Why encrypted data could not be decrypted (no `--private-key`, none with the JWE's kid,
    /// or the wrong key); its data is then not schema-checked.
    #[serde(default)]
    pub decrypt_error: Option<String>,
    /// The body was shorter than its Content-Length (the sender died while sending it); such a
    /// request is not read.
    #[serde(default)]
    pub truncated: bool,
}

/// One event of a delivery, as the receiver decoded it.
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code, reason = "the wire-format fields are for the tests that need them")]
pub struct ReceivedEvent {
    /// The mailhook event type, without CloudEvents' `io.mailhook.` prefix (`message.received`).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The CloudEvents `id` (None for Standard Webhooks).
    #[serde(default)]
    pub id: Option<String>,
    /// The event's data: decoded, decrypted (Null if it could not be decrypted).
    #[serde(default)]
    pub data: serde_json::Value,
    /// The CloudEvents attributes but data, as sent (`time` verbatim; binary mode's header
    /// values percent-decoded); empty for Standard Webhooks.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// A Standard Webhooks dead-letter sink delivery's top-level `deadLetter` object.
    #[serde(default)]
    pub dead_letter: Option<serde_json::Value>,
    /// The `kid` of the JWE the event came in, if it was encrypted.
    #[serde(default)]
    pub kid: Option<String>,
}

#[allow(dead_code, reason = "helpers for the tests that need them")]
impl Received {
    /// The body as JSON (Null if it is not): a Standard Webhooks body `{"type", "timestamp",
    /// "data"}` when unencrypted and unbatched. Whatever the format, [`Received::data`] is the
    /// event's data.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }

    /// The data of the request's `i`th event (0 unless batched), decoded and decrypted,
    /// whatever the format; Null if there is no such event.
    pub fn data(&self, i: usize) -> serde_json::Value {
        self.events.get(i).map(|e| e.data.clone()).unwrap_or_default()
    }

    /// The data of the (first) event, whatever the format: [`Received::data`]`(0)`.
    pub fn event_data(&self) -> serde_json::Value {
        self.data(0)
    }

    /// The event types of the request, in order, without `io.mailhook.`.
    pub fn event_types(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.kind.as_str()).collect()
    }

    /// The id the producer gave the (first) event (`data.producerEventId`), if it has one.
    pub fn producer_event_id(&self) -> Option<String> {
        self.producer_event_ids().into_iter().next()
    }

    /// The producer's ids of all the events of the request (a batch has several).
    pub fn producer_event_ids(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| e.data["producerEventId"].as_str().map(String::from))
            .collect()
    }
}

impl Receiver {
    /// A receiver on 127.0.0.1 verifying `v1` signatures with `secret`.
    pub fn start(secret: &str) -> Receiver {
        Self::start_args(&["--secret", secret])
    }

    /// A receiver with receiver.py's own flags (--host, --public-key, --tls-cert, --private-key
    /// JWK-FILE, --schemas DIR, --payload-mode MODE, ...).
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

    /// Every delivery so far. Panics if any broke the wire format or its JSON Schema
    /// (`schema_errors`): every test that reads deliveries checks them all.
    pub async fn deliveries(&self) -> Vec<Received> {
        let text = reqwest::get(format!("{}/_deliveries", self.control))
            .await
            .expect("receiver")
            .text()
            .await
            .expect("body");
        let got: Vec<Received> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("delivery record"))
            .collect();
        let bad: Vec<String> = got
            .iter()
            .filter(|r| !r.schema_errors.is_empty())
            .map(|r| {
                format!(
                    "  {} {} ({}, {:?}):\n    {}",
                    r.path,
                    r.webhook_id.as_deref().unwrap_or("-"),
                    r.format,
                    r.content_type.as_deref().unwrap_or("-"),
                    r.schema_errors.join("\n    ")
                )
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} deliveries break the wire format or the JSON Schemas (receiver.py --schemas, \
             by default schemas/v1):\n{}",
            bad.len(),
            got.len(),
            bad.join("\n")
        );
        got
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
