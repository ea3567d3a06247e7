//! Security defaults on real components: the egress guard (SSRF), mutual TLS with a
//! rotated client certificate, ed25519 (v1a) signatures verified with the public key
//! alone, and endpoint verification.

use serde_json::Value;

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply, eventually, siem_event, signing_secret, subscription, whs,
};

/// The subscription's status, as JSON, once `check` holds.
async fn status_of(ns: &TestNamespace, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(
        &format!("status of {name}"),
        || async { serde_json::to_value(whs(ns, name).await.status).unwrap_or_default() },
        check,
    )
    .await
}

fn ready(status: &Value) -> Option<(&str, &str, &str)> {
    let c = status["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?;
    Some((c["status"].as_str()?, c["reason"].as_str()?, c["message"].as_str()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_guard_refuses_internal_targets_and_lets_an_allowlisted_receiver_through() {
    assert!(
        std::net::ToSocketAddrs::to_socket_addrs(&("private.mailhook.test", 80))
            .is_ok_and(|mut a| a.next().is_some_and(|a| a.ip().to_string() == "10.255.255.1")),
        "private.mailhook.test must resolve to 10.255.255.1 (tests/setup adds it to /etc/hosts)"
    );
    let ns = TestNamespace::new("egress").await;
    // A real receiver on 127.0.0.1 that nothing may reach, and the allowlisted internal
    // receivers on 127.0.0.2.
    let trap = Receiver::start(SIEM_SECRET);
    let internal = Receiver::start_args(&["--secret", SIEM_SECRET, "--host", "127.0.0.2"]);
    let redirector = Receiver::start_args(&["--secret", SIEM_SECRET, "--host", "127.0.0.2"]);
    redirector
        .mode(r#"{"redirect": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}"#)
        .await;
    // A redirect to the trap itself: were redirects followed, the trap would see it.
    let redirector_to_trap = Receiver::start_args(&["--secret", SIEM_SECRET, "--host", "127.0.0.2"]);
    redirector_to_trap
        .mode(&format!(r#"{{"redirect": "{}"}}"#, trap.url("/hooks")))
        .await;
    let operator = Operator::start_with(&ns, &["--egress-allow", "127.0.0.2/32"]).await;
    let refused = [
        ("loopback", trap.url("/hooks"), "127.0.0.1 is a loopback address"),
        (
            "loopback-mapped",
            format!("http://[::ffff:127.0.0.1]:{}/hooks", trap.port),
            "is a loopback address",
        ),
        (
            "localhost",
            format!("http://localhost:{}/hooks", trap.port),
            "refuses localhost",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "cloud metadata endpoints live here",
        ),
        (
            "private-name",
            "http://private.mailhook.test:8080/hooks".to_string(),
            "private.mailhook.test: 10.255.255.1 is a private address",
        ),
    ];
    let mut yaml = signing_secret(SIEM_SECRET);
    for (name, url, _) in &refused {
        yaml.push_str(&subscription(name, url, "", ""));
    }
    yaml.push_str(&subscription("internal", &internal.url("/hooks"), "", ""));
    yaml.push_str(&subscription("redirected", &redirector.url("/hooks"), "", ""));
    yaml.push_str(&subscription(
        "redirected-to-trap",
        &redirector_to_trap.url("/hooks"),
        "",
        "",
    ));
    apply(&ns, &yaml);

    for (name, _, why) in &refused {
        let status = status_of(&ns, name, |s| ready(s).is_some_and(|r| r.0 == "False")).await;
        let (_, reason, message) = ready(&status).expect("Ready");
        assert_eq!(reason, "EgressRefused", "{name}: {message}");
        assert!(
            message.contains(why) && message.contains("--egress-allow"),
            "{name}: {message}"
        );
    }
    status_of(&ns, "internal", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    status_of(&ns, "redirected", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    status_of(&ns, "redirected-to-trap", |s| ready(s).is_some_and(|r| r.0 == "True")).await;

    let (code, body) = operator.ingest(&[siem_event("egress-1")]).await;
    assert_eq!(code, 202, "{body}");
    eventually(
        "the allowlisted internal receiver got the event",
        || internal.deliveries(),
        |d| d.iter().any(|r| r.verified && r.answered == 200),
    )
    .await;
    let status = status_of(&ns, "redirected", |s| s["lastFailure"]["message"].is_string()).await;
    let failure = status["lastFailure"]["message"].as_str().unwrap_or_default();
    assert!(
        failure.contains("redirect to http://169.254.169.254/latest/meta-data/iam/security-credentials/ not followed")
            && failure.contains("cloud metadata"),
        "{failure}"
    );
    let status = status_of(&ns, "redirected-to-trap", |s| s["lastFailure"]["message"].is_string()).await;
    let failure = status["lastFailure"]["message"].as_str().unwrap_or_default();
    assert!(
        failure.contains(&format!("redirect to {} not followed", trap.url("/hooks")))
            && failure.contains("127.0.0.1 is a loopback address"),
        "{failure}"
    );
    assert!(
        trap.deliveries().await.is_empty(),
        "not a single request reached the refused receiver"
    );
}

/// A throwaway PKI made with openssl: a CA, and certificates it signs.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("mailhook-pki-{name}-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pki = Pki { dir };
        crate::support::self_signed(
            &pki.dir.join("ca.crt"),
            &pki.dir.join("ca.key"),
            &format!("{name} test CA"),
            None,
        );
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Issues `<name>.crt`/`<name>.key` for `cn`, with `ext` (e.g. subjectAltName=IP:127.0.0.2).
    fn issue(&self, name: &str, cn: &str, ext: &str) {
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        std::fs::write(self.dir.join(format!("{name}.ext")), ext).expect("ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &crt,
        ]);
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).expect("read pki file")
    }

    /// A kubernetes.io/tls Secret holding `<name>.crt`/`<name>.key`.
    fn tls_secret(&self, secret: &str, name: &str) -> String {
        let indent = |pem: String| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
            indent(self.read(&format!("{name}.crt"))),
            indent(self.read(&format!("{name}.key")))
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_receiver_gets_deliveries_and_a_rotated_client_certificate_keeps_them_flowing() {
    let ns = TestNamespace::new("mtls").await;
    let pki = Pki::new("mtls");
    pki.issue(
        "server",
        "receiver",
        "subjectAltName=IP:127.0.0.2\nextendedKeyUsage=serverAuth\n",
    );
    pki.issue("client-a", "mailhook-client-a", "extendedKeyUsage=clientAuth\n");
    pki.issue("client-b", "mailhook-client-b", "extendedKeyUsage=clientAuth\n");
    let (crt, key, ca) = (pki.path("server.crt"), pki.path("server.key"), pki.path("ca.crt"));
    let receiver = Receiver::start_args(&[
        "--secret",
        SIEM_SECRET,
        "--host",
        "127.0.0.2",
        "--tls-cert",
        &crt,
        "--tls-key",
        &key,
        "--client-ca",
        &ca,
    ]);
    let operator = Operator::start_with(&ns, &["--egress-allow", "127.0.0.2/32"]).await;
    // Block style for the multi-line CA bundle.
    let sub = |name: &str, client: &str| {
        let mut y = format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: {name}}}\nspec:\n  endpoint:\n    url: '{}'",
            receiver.url("/hooks")
        );
        match name {
            // Certificate checks off, loudly: no CA bundle needed.
            "unchecked" => y.push_str("\n    insecureSkipTLSVerify: true"),
            // Neither: the receiver's private CA is unknown to the system roots.
            "untrusted" => {}
            _ => {
                y.push_str("\n    caBundle: |");
                y.push_str(
                    &pki.read("ca.crt")
                        .lines()
                        .map(|l| format!("\n      {l}"))
                        .collect::<String>(),
                );
            }
        }
        if !client.is_empty() {
            y.push_str(&format!("\n    clientCertSecretRef: {{name: {client}}}"));
        }
        y.push_str("\n  signing: {secretRef: {name: signing}}\n  eventTypes: [message.received]\n---\n");
        y
    };
    let mut yaml = signing_secret(SIEM_SECRET);
    yaml.push_str(&pki.tls_secret("client-cert", "client-a"));
    yaml.push_str(&sub("mutual", "client-cert"));
    yaml.push_str(&sub("no-client-cert", ""));
    yaml.push_str(&sub("unchecked", "client-cert"));
    yaml.push_str(&sub("untrusted", "client-cert"));
    apply(&ns, &yaml);
    for name in ["mutual", "no-client-cert", "unchecked", "untrusted"] {
        status_of(&ns, name, |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    }

    assert_eq!(operator.ingest(&[siem_event("mtls-1")]).await.0, 202);
    let got = eventually(
        "a delivery over mutual TLS",
        || receiver.deliveries(),
        |d| d.iter().any(|r| r.verified && r.answered == 200),
    )
    .await;
    assert!(
        got.iter()
            .all(|r| r.client_cert.as_deref() == Some("mailhook-client-a")),
        "{got:?}"
    );
    // The receiver really requires a client certificate: without one the handshake fails.
    let status = status_of(&ns, "no-client-cert", |s| s["lastFailure"]["message"].is_string()).await;
    let failure = status["lastFailure"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(status["delivered"] == 0, "{status}");
    // Without the CA the certificate is refused; skipping the check works but says so.
    let status = status_of(&ns, "untrusted", |s| s["lastFailure"]["message"].is_string()).await;
    assert!(status["delivered"] == 0, "{status}");
    let status = status_of(&ns, "unchecked", |s| s["delivered"].as_u64().is_some_and(|n| n >= 1)).await;
    assert_eq!(status["insecureSkipTLSVerify"], true);
    let (_, _, message) = ready(&status).expect("Ready");
    assert!(
        message.contains("WARNING: endpoint.insecureSkipTLSVerify is true"),
        "{message}"
    );

    // Rotation: the Secret now holds a renewed certificate; no restart.
    apply(&ns, &pki.tls_secret("client-cert", "client-b"));
    // Wait until the subscription was rebuilt with the new Secret: a delivery made after it
    // carries the new certificate.
    let got = eventually(
        "deliveries continue with the rotated certificate",
        || async {
            let _ = operator
                .ingest(&[siem_event(&format!("mtls-{}", uuid::Uuid::now_v7().simple()))])
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            receiver.deliveries().await
        },
        |d| {
            d.iter()
                .any(|r| r.verified && r.client_cert.as_deref() == Some("mailhook-client-b"))
        },
    )
    .await;
    assert!(
        got.iter().all(|r| r.verified && r.answered == 200),
        "every delivery before and after the rotation was accepted: {got:?}"
    );
    assert!(!failure.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_holding_only_the_ed25519_public_key_verifies_every_delivery() {
    let ns = TestNamespace::new("ed25519").await;
    let keygen = |kind: &str| {
        let (ok, out, err) = crate::support::mailhook(&["keygen", kind]);
        assert!(ok);
        (out.trim().to_string(), err.trim().to_string())
    };
    let (secret, told) = keygen("ed25519");
    assert!(secret.starts_with("whsk_"), "{secret}");
    let public = told.rsplit(' ').next().expect("public key").to_string();
    assert!(public.starts_with("whpk_"), "{told}");

    let operator = Operator::start(&ns).await;
    let mut yaml = signing_secret(&secret);
    yaml.push_str(&subscription("siem", "http://127.0.0.1:9/placeholder", "", ""));
    apply(&ns, &yaml);
    // Receivers take the key from status: it is public.
    let status = status_of(&ns, "siem", |s| s["signingPublicKeys"].is_array()).await;
    assert_eq!(status["signingPublicKeys"], serde_json::json!([public]));
    let receiver = Receiver::start_args(&["--public-key", &public]);
    apply(&ns, &subscription("siem", &receiver.url("/hooks"), "", ""));
    let port = receiver.port.to_string();
    status_of(&ns, "siem", |s| {
        s["endpointHost"].as_str().is_some_and(|h| h.ends_with(&port))
    })
    .await;

    let events: Vec<Value> = (0..5).map(|i| siem_event(&format!("ed-{i}"))).collect();
    assert_eq!(operator.ingest(&events).await.0, 202);
    let got = eventually(
        "five deliveries verified with the public key",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.verified).count() == 5,
    )
    .await;
    assert!(got.iter().all(|r| r.verified), "{got:?}");
    assert!(
        got.iter()
            .all(|r| r.signatures.starts_with("v1a,") && !r.signatures.contains("v1,")),
        "only v1a signatures: no shared secret exists"
    );

    // Rotation with overlap: a second key joins the Secret; both sign, both are published,
    // and the receiver that still holds the first keeps verifying.
    let (second, _) = keygen("ed25519");
    apply(
        &ns,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\nstringData: {{key: {secret}, next: {second}}}\n"
        ),
    );
    status_of(&ns, "siem", |s| {
        s["signingPublicKeys"].as_array().is_some_and(|k| k.len() == 2)
    })
    .await;
    assert_eq!(operator.ingest(&[siem_event("ed-after-rotation")]).await.0, 202);
    let got = eventually(
        "a delivery signed by both keys",
        || receiver.deliveries(),
        |d| d.iter().any(|r| r.signatures.matches("v1a,").count() == 2),
    )
    .await;
    assert!(got.iter().all(|r| r.verified), "{got:?}");
    // Neither key nor message content ever reaches the log.
    let log = operator.log();
    assert!(
        !log.contains(&secret) && !log.contains(&second),
        "a signing key is in the log"
    );
    assert!(
        !log.contains("alice@finance.example.com"),
        "a mailbox address is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_does_not_echo_the_challenge_gets_nothing_until_it_does() {
    let ns = TestNamespace::new("verify").await;
    let willing = Receiver::start(SIEM_SECRET);
    let unwilling = Receiver::start(SIEM_SECRET);
    unwilling.mode(r#"{"echo": false}"#).await;
    let operator = Operator::start(&ns).await;
    let mut yaml = signing_secret(SIEM_SECRET);
    yaml.push_str(&subscription("willing", &willing.url("/hooks"), ", verify: true", ""));
    yaml.push_str(&subscription(
        "unwilling",
        &unwilling.url("/hooks"),
        ", verify: true",
        "",
    ));
    apply(&ns, &yaml);
    status_of(&ns, "willing", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    let status = status_of(&ns, "unwilling", |s| ready(s).is_some_and(|r| r.0 == "False")).await;
    let (_, reason, message) = ready(&status).expect("Ready");
    assert_eq!(reason, "EndpointNotVerified");
    assert!(message.contains("did not echo the challenge"), "{message}");
    // kstatus: on its way (Reconciling), not failed (Stalled).
    let condition = |s: &Value, t: &str| {
        s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t))
            .map(|c| (c["status"].clone(), c["reason"].clone()))
    };
    assert_eq!(
        condition(&status, "Reconciling"),
        Some((Value::from("True"), Value::from("EndpointNotVerified")))
    );
    assert_eq!(condition(&status, "Stalled"), None);

    assert_eq!(operator.ingest(&[siem_event("verify-1")]).await.0, 202);
    let kinds = |d: &[crate::support::Received]| -> Vec<String> {
        d.iter()
            .map(|r| r.json()["type"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    eventually(
        "the willing endpoint got the event",
        || willing.deliveries(),
        |d| kinds(d).contains(&"message.received".to_string()),
    )
    .await;
    let status = status_of(&ns, "unwilling", |s| s["backlog"] == 1).await;
    assert_eq!(status["delivered"], 0);
    let seen = unwilling.deliveries().await;
    assert!(
        !seen.is_empty() && kinds(&seen).iter().all(|k| k == "endpoint.verification"),
        "only verification requests, all signed: {:?}",
        kinds(&seen)
    );
    assert!(seen.iter().all(|r| r.verified));

    // Once it echoes, it is verified on the next retry and gets what queued.
    unwilling.mode(r#"{"echo": true}"#).await;
    let status = status_of(&ns, "unwilling", |s| ready(s).is_some_and(|r| r.0 == "True")).await;
    assert_eq!(
        condition(&status, "Reconciling"),
        None,
        "verified: no longer reconciling"
    );
    eventually(
        "the queued event reached the endpoint once verified",
        || unwilling.deliveries(),
        |d| kinds(d).contains(&"message.received".to_string()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_ingest_tokens_locks_the_address_out_of_guessing_only() {
    let ns = TestNamespace::new("lockout").await;
    let operator = Operator::start(&ns).await;
    let http = reqwest::Client::new();
    let post = |token: &'static str| {
        http.post(format!("http://{}/v1/events", operator.ingest))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(siem_event("guess").to_string())
            .send()
    };
    // The good producer behind this address (SNAT, an Ingress) authenticated before.
    assert_eq!(post(crate::support::INGEST_TOKEN).await.expect("post").status(), 202);
    for _ in 0..10 {
        assert_eq!(post("guess").await.expect("post").status(), 401);
    }
    let locked = post("guess").await.expect("post");
    assert_eq!(locked.status(), 429);
    let retry: u64 = locked.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    // The lockout is a lever only against guessers: requests without a token never count,
    // and the good producer that authenticated from the address before the lock goes on.
    for _ in 0..30 {
        let r = http
            .post(format!("http://{}/v1/events", operator.ingest))
            .header("content-type", "application/json")
            .body(siem_event("anonymous").to_string())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 401);
    }
    assert_eq!(post(crate::support::INGEST_TOKEN).await.expect("post").status(), 202);
    assert_eq!(
        post("guess").await.expect("post").status(),
        429,
        "still locked for guesses"
    );
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains(r#"mailhook_events_ingested_total{outcome="rejected",source="http"} 42"#),
        "{metrics}"
    );
}

/// Acknowledging events that a restart loses must be chosen, never a default: `run`
/// without a store choice exits at once, naming the three choices.
#[test]
fn run_without_a_store_choice_refuses_to_start() {
    let (ok, _, err) = crate::support::mailhook(&["run", "--http-addr", "127.0.0.1:0"]);
    assert!(!ok, "started without a store");
    for flag in ["--store-dir", "--store-url", "--store-memory"] {
        assert!(err.contains(flag), "{flag} not named: {err}");
    }
}
