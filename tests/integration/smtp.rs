//! The SMTP journal receiver with real mail software: `swaks` sends journal reports and
//! plain copies, a real Postfix relays a message to it, and bad input gets the documented
//! replies while the listener keeps serving.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply, eventually, free_port, kubectl_run, repo_path,
    self_signed, signing_secret, subscription, wait_ready,
};

/// Applies the `archive` subscription (message.received, message.sent and
/// compliance.flagged to `url`) and the `external-pdf` filter that flags inbound PDFs.
fn apply_archive(ns: &TestNamespace, url: &str) {
    let yaml = format!(
        "{}apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: external-pdf}}\nspec:\n  \
         directions: [inbound]\n  attachments: {{extensions: [pdf]}}\n  flag: {{name: external-pdf, severity: high}}\n---\n\
         apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: archive}}\nspec:\n  \
         endpoint: {{url: '{url}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
         eventTypes: [message.received, message.sent, compliance.flagged]\n",
        signing_secret(SIEM_SECRET)
    );
    apply(ns, &yaml);
}

/// A namespace with the `archive` subscription, its receiver, and an operator with the
/// SMTP receiver on a free port (internal domain contoso.com, and the flags `extra`), Ready.
async fn smtp_receiver(name: &str, extra: &[&str]) -> (TestNamespace, Receiver, std::net::SocketAddr, Operator) {
    let ns = TestNamespace::new(name).await;
    let receiver = Receiver::start(SIEM_SECRET);
    let smtp = free_port();
    let smtp_arg = smtp.to_string();
    let flags = [
        &["--smtp-addr", &smtp_arg, "--internal-domains", "contoso.com"][..],
        extra,
    ]
    .concat();
    let operator = Operator::start_with(&ns, &flags).await;
    apply_archive(&ns, &receiver.url("/hooks"));
    wait_ready(&ns, "archive").await;
    (ns, receiver, smtp, operator)
}

/// Runs swaks against `server`; returns (exit success, transcript).
fn swaks(server: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("swaks")
        .args([
            "--server",
            &server.ip().to_string(),
            "--port",
            &server.port().to_string(),
        ])
        .args(["--timeout", "20"])
        .args(args)
        .output()
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

/// swaks sending the message in `data` (a file, or `@file`) as is.
fn swaks_data(server: std::net::SocketAddr, from: &str, to: &str, data: &str) -> (bool, String) {
    swaks(server, &["--from", from, "--to", to, "--data", data])
}

/// swaks sending a short message with `subject` and `body`, plus the flags in `extra`
/// (TLS, AUTH, attachments).
pub(crate) fn swaks_mail(
    server: std::net::SocketAddr,
    from: &str,
    to: &str,
    subject: &str,
    body: &str,
    extra: &[&str],
) -> (bool, String) {
    let header = format!("Subject: {subject}");
    let mut args = vec!["--from", from, "--to", to, "--header", &header, "--body", body];
    args.extend_from_slice(extra);
    swaks(server, &args)
}

fn delivered(got: &[Received], kind: &str) -> Vec<Value> {
    got.iter()
        .filter(|r| r.verified && r.answered == 200)
        .map(|r| r.json())
        .filter(|j| j["type"] == kind)
        .collect()
}

/// Sends raw SMTP lines and returns what the server answered; the connection closes when
/// it returns, QUIT or not.
fn raw_session(addr: std::net::SocketAddr, lines: &[&str]) -> String {
    let lines: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    raw_bytes_session(addr, &lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_reports_and_plain_copies_become_events_and_bad_mail_gets_the_right_reply() {
    let (_ns, receiver, smtp, operator) = smtp_receiver(
        "smtp",
        &["--smtp-max-message-bytes", "20000", "--smtp-max-recipients", "3"],
    )
    .await;

    // An Exchange journal report: four internal recipients (To, Cc, Bcc, a list member).
    let report = repo_path("tests/fixtures/journal/inbound-report.eml");
    let (ok, out) = swaks_data(smtp, "journal@contoso.com", "archive@journal.example.net", &report);
    assert!(ok && out.contains("250 2.0.0 OK: recorded as evt_"), "{out}");
    let got = eventually(
        "4 message.received + 4 compliance.flagged",
        || receiver.deliveries(),
        |d| delivered(d, "message.received").len() == 4 && delivered(d, "compliance.flagged").len() == 4,
    )
    .await;
    let received = delivered(&got, "message.received");
    let mut mailboxes: Vec<&str> = received.iter().filter_map(|j| j["data"]["mailbox"].as_str()).collect();
    mailboxes.sort_unstable();
    assert_eq!(
        mailboxes,
        [
            "alice@contoso.com",
            "bob@contoso.com",
            "carol@contoso.com",
            "dan@contoso.com"
        ]
    );
    let alice = received
        .iter()
        .find(|j| j["data"]["mailbox"] == "alice@contoso.com")
        .expect("alice");
    assert_eq!(alice["data"]["from"], "billing@fabrikam.com");
    assert_eq!(alice["data"]["subject"], "Rechnung Nr. 4711 – fällig");
    assert_eq!(alice["data"]["source"], "smtp");
    assert_eq!(alice["data"]["attachments"][0]["name"], "invoice-4711.pdf");
    assert_eq!(alice["data"]["attachments"][0]["size"], 39);
    assert_eq!(
        alice["data"]["attachments"][0]["sha256"],
        sha256_hex(b"%PDF-1.4 invoice 4711 fake pdf content\n")
    );
    assert!(alice["data"].get("bcc").is_none(), "Bcc is never delivered");

    // The same report again (the journal retried): acknowledged, not delivered twice.
    let (ok, out) = swaks_data(smtp, "journal@contoso.com", "archive@journal.example.net", &report);
    assert!(ok && out.contains("250 2.0.0"), "{out}");

    // A plain copy to a journaled mailbox.
    let (ok, out) = swaks_mail(smtp, "x@fabrikam.com", "erin@contoso.com", "plain copy", "hello", &[]);
    assert!(ok, "{out}");
    eventually(
        "the plain copy as message.received for erin",
        || receiver.deliveries(),
        |d| {
            delivered(d, "message.received")
                .iter()
                .any(|j| j["data"]["mailbox"] == "erin@contoso.com" && j["data"]["subject"] == "plain copy")
        },
    )
    .await;

    // Bad input: each gets its reply, and nothing is half-stored.
    let broken = repo_path("tests/fixtures/journal/report-without-original.eml");
    let (ok, out) = swaks_data(smtp, "j@contoso.com", "a@journal.example.net", &broken);
    assert!(
        !ok && out.contains("554 5.6.0") && out.contains("message/rfc822"),
        "{out}"
    );
    let big = "x".repeat(30_000);
    let (ok, out) = swaks(
        smtp,
        &["--from", "x@fabrikam.com", "--to", "erin@contoso.com", "--body", &big],
    );
    assert!(!ok && out.contains("552 5.3.4"), "{out}");
    let (ok, out) = swaks(
        smtp,
        &[
            "--from",
            "x@fabrikam.com",
            "--to",
            "a@contoso.com,b@contoso.com,c@contoso.com,d@contoso.com",
        ],
    );
    // The fourth recipient is refused (452, retry later); the message goes to the first three.
    assert!(
        ok && out.contains("452 4.5.3") && out.contains("250 2.0.0 OK: recorded"),
        "{out}"
    );
    let long = format!("NOOP {}", "y".repeat(600));
    let answers = raw_session(smtp, &["EHLO test", &long, "DATA", "QUIT"]);
    assert!(
        answers.contains("500 5.5.2") && answers.contains("503 5.5.1"),
        "{answers}"
    );
    // Truncated: the client goes away in the middle of DATA.
    let answers = raw_session(
        smtp,
        &[
            "EHLO test",
            "MAIL FROM:<x@fabrikam.com>",
            "RCPT TO:<frank@contoso.com>",
            "DATA",
            "Subject: cut",
            "",
        ],
    );
    assert!(answers.contains("354"), "{answers}");

    // Still serving after all that.
    let (ok, out) = swaks_mail(smtp, "x@fabrikam.com", "gina@contoso.com", "after", "ok", &[]);
    assert!(ok, "{out}");
    let got = eventually(
        "the last message delivered",
        || receiver.deliveries(),
        |d| {
            delivered(d, "message.received")
                .iter()
                .any(|j| j["data"]["mailbox"] == "gina@contoso.com")
        },
    )
    .await;
    let received = delivered(&got, "message.received");
    assert_eq!(
        received.len(),
        9,
        "4 from the report (once), erin, a/b/c (d refused), gina; nothing from bad input"
    );
    assert!(!received.iter().any(|j| j["data"]["mailbox"] == "frank@contoso.com"));
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains(r#"mailhook_events_ingested_total{outcome="rejected",source="smtp"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_auth_plain_guard_the_receiver_and_mail_flows_over_them() {
    let ns = TestNamespace::new("smtp-tls").await;
    let dir = std::env::temp_dir().join(format!("mailhook-{}-tls", ns.name));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    self_signed(&cert, &key, "mailhook.test", Some("IP:127.0.0.1"));
    let receiver = Receiver::start(SIEM_SECRET);
    let smtp = free_port();
    let (cert_arg, key_arg) = (cert.display().to_string(), key.display().to_string());
    let tokens = dir.join("smtp-tokens");
    std::fs::write(&tokens, "relay-secret\n").expect("tokens");
    let token_arg = tokens.display().to_string();
    let _operator = Operator::start_with(
        &ns,
        &[
            "--smtp-addr",
            &smtp.to_string(),
            "--internal-domains",
            "contoso.com",
            "--smtp-tls-cert-file",
            &cert_arg,
            "--smtp-tls-key-file",
            &key_arg,
            "--smtp-auth-token-file",
            &token_arg,
        ],
    )
    .await;
    apply_archive(&ns, &receiver.url("/hooks"));
    wait_ready(&ns, "archive").await;
    // Without AUTH, mail is refused; with a wrong password too.
    let (ok, out) = swaks(smtp, &["--tls", "--from", "x@fabrikam.com", "--to", "erin@contoso.com"]);
    assert!(!ok && out.contains("530 5.7.0"), "{out}");
    let (ok, out) = swaks(
        smtp,
        &[
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "relay",
            "--auth-password",
            "wrong",
            "--to",
            "erin@contoso.com",
        ],
    );
    assert!(!ok && out.contains("535 5.7.8"), "{out}");
    let (ok, out) = swaks_mail(
        smtp,
        "x@fabrikam.com",
        "erin@contoso.com",
        "over tls",
        "secret",
        &[
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            "relay",
            "--auth-password",
            "relay-secret",
        ],
    );
    assert!(
        ok && out.contains("250-STARTTLS") && out.contains("TLS started") && out.contains("235 2.7.0"),
        "{out}"
    );
    assert!(out.contains("250 2.0.0 OK: recorded"), "{out}");
    eventually(
        "the message sent over TLS delivered",
        || receiver.deliveries(),
        |d| {
            delivered(d, "message.received")
                .iter()
                .any(|j| j["data"]["subject"] == "over tls")
        },
    )
    .await;

    // A renewed certificate (as cert-manager rewrites the mounted Secret) is served from
    // the next STARTTLS on, without a restart; a half-written pair keeps the old one.
    let served = served_certificate(smtp);
    assert!(served.contains("CN=mailhook.test"), "{served}");
    std::fs::write(&cert, "not a certificate").expect("break cert");
    assert!(
        served_certificate(smtp).contains("CN=mailhook.test"),
        "a broken pair keeps the last good one"
    );
    let (new_cert, new_key) = (dir.join("new.crt"), dir.join("new.key"));
    self_signed(&new_cert, &new_key, "mailhook-renewed.test", Some("IP:127.0.0.1"));
    std::fs::rename(&new_key, &key).expect("rotate key");
    std::fs::rename(&new_cert, &cert).expect("rotate cert");
    let served = served_certificate(smtp);
    assert!(served.contains("CN=mailhook-renewed.test"), "{served}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The subject of the certificate the receiver presents after STARTTLS (openssl s_client).
fn served_certificate(smtp: std::net::SocketAddr) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-nameopt",
            "RFC2253",
            "-starttls",
            "smtp",
            "-connect",
            &smtp.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_relayed_by_postfix_arrives_as_message_received_and_is_flagged() {
    let Some(postfix) = Postfix::start_relaying_to("contoso.com", free_port()) else {
        panic!("Postfix could not start (Debian package postfix; tests/setup installs it)");
    };
    let ns = TestNamespace::new("postfix").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let _operator = Operator::start_with(
        &ns,
        &[
            "--smtp-addr",
            &postfix.next_hop.to_string(),
            "--internal-domains",
            "contoso.com",
        ],
    )
    .await;
    apply_archive(&ns, &receiver.url("/hooks"));
    wait_ready(&ns, "archive").await;

    let attachment = std::env::temp_dir().join(format!("mailhook-{}-contract.pdf", ns.name));
    let pdf = b"%PDF-1.4 contract relayed by postfix\n".repeat(200);
    std::fs::write(&attachment, &pdf).expect("attachment");
    let (ok, out) = swaks_mail(
        postfix.listen,
        "sales@fabrikam.com",
        "alice@contoso.com",
        "=?utf-8?q?Vertrag_=C3=BCber_Lizenzen?=",
        "Please find the contract attached.",
        &[
            "--attach-type",
            "application/pdf",
            "--attach-name",
            "contract.pdf",
            "--attach",
            &format!("@{}", attachment.display()),
        ],
    );
    assert!(ok && out.contains("250"), "Postfix took the message:\n{out}");
    let got = eventually(
        "message.received and compliance.flagged via Postfix",
        || receiver.deliveries(),
        |d| !delivered(d, "message.received").is_empty() && !delivered(d, "compliance.flagged").is_empty(),
    )
    .await;
    let event = &delivered(&got, "message.received")[0];
    let data = &event["data"];
    assert_eq!(data["mailbox"], "alice@contoso.com");
    assert_eq!(data["from"], "sales@fabrikam.com");
    assert_eq!(data["to"], serde_json::json!(["alice@contoso.com"]));
    assert_eq!(data["subject"], "Vertrag über Lizenzen");
    assert!(data["size"].as_u64().is_some_and(|s| s > pdf.len() as u64), "{data}");
    assert_eq!(data["attachments"][0]["name"], "contract.pdf");
    assert_eq!(data["attachments"][0]["contentType"], "application/pdf");
    assert_eq!(data["attachments"][0]["size"], pdf.len());
    assert_eq!(data["attachments"][0]["sha256"], sha256_hex(&pdf));
    let flagged = &delivered(&got, "compliance.flagged")[0];
    assert_eq!(flagged["data"]["flags"][0]["name"], "external-pdf");
    assert!(
        postfix.log().contains("status=sent"),
        "Postfix relayed it:\n{}",
        postfix.log()
    );
    let _ = std::fs::remove_file(attachment);
}

/// A real Postfix instance in a temporary config and queue directory, relaying one domain
/// to `next_hop`; stopped when dropped.
struct Postfix {
    dir: std::path::PathBuf,
    listen: std::net::SocketAddr,
    next_hop: std::net::SocketAddr,
}

impl Postfix {
    fn start_relaying_to(domain: &str, next_hop: std::net::SocketAddr) -> Option<Postfix> {
        let dir = std::env::temp_dir().join(format!("mailhook-postfix-{}", uuid::Uuid::now_v7().simple()));
        // Postfix checks ownership: the queue is root's, the data directory its own user's.
        std::fs::create_dir_all(dir.join("spool")).ok()?;
        std::fs::create_dir_all(dir.join("data")).ok()?;
        std::process::Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .status()
            .ok()?;
        let listen = free_port();
        let d = dir.display();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {d}/spool\n\
             data_directory = {d}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             myhostname = relay.test\n\
             mydestination =\n\
             relay_domains = {domain}\n\
             transport_maps = inline:{{{domain}=smtp:[{}]:{}}}\n\
             smtp_dns_support_level = disabled\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtputf8_enable = no\n\
             maillog_file = {d}/maillog\n\
             maillog_file_prefixes = {d}\n",
            next_hop.ip(),
            next_hop.port()
        );
        let master_cf = format!(
            "{listen} inet n - n - - smtpd\n\
             pickup unix n - n 60 1 pickup\n\
             cleanup unix n - n - 0 cleanup\n\
             qmgr unix n - n 300 1 qmgr\n\
             rewrite unix - - n - - trivial-rewrite\n\
             bounce unix - - n - 0 bounce\n\
             defer unix - - n - 0 bounce\n\
             trace unix - - n - 0 bounce\n\
             verify unix - - n - 1 verify\n\
             flush unix n - n 1000? 0 flush\n\
             proxymap unix - - n - - proxymap\n\
             smtp unix - - n - - smtp\n\
             relay unix - - n - - smtp\n\
             showq unix n - n - - showq\n\
             error unix - - n - - error\n\
             retry unix - - n - - error\n\
             discard unix - - n - - discard\n\
             local unix - n n - - local\n\
             anvil unix - - n - 1 anvil\n\
             scache unix - - n - 1 scache\n\
             postlog unix-dgram n - n - 1 postlogd\n"
        );
        std::fs::write(dir.join("main.cf"), main_cf).ok()?;
        std::fs::write(dir.join("master.cf"), master_cf).ok()?;
        let run = |args: &[&str]| {
            std::process::Command::new("postfix")
                .arg("-c")
                .arg(&dir)
                .args(args)
                .output()
                .ok()
        };
        let started = run(&["start"])?;
        if !started.status.success() {
            eprintln!(
                "postfix start failed: {}{}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr)
            );
            return None;
        }
        let postfix = Postfix { dir, listen, next_hop };
        for _ in 0..100 {
            if std::net::TcpStream::connect(listen).is_ok() {
                return Some(postfix);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("postfix never listened on {listen}; its log:\n{}", postfix.log());
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = std::process::Command::new("postfix")
            .arg("-c")
            .arg(&self.dir)
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A journal report (Exchange envelope format) whose original carries one attachment of
/// `attachment` bytes.
fn report_with_attachment(message_id: &str, attachment: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(attachment);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).expect("base64 is ascii"))
        .collect();
    format!(
        "From: Microsoft Outlook <journal@contoso.com>\r\nTo: archive@journal.example.net\r\n\
         Subject: journal report\r\nMessage-ID: <report-{message_id}>\r\nX-MS-Journal-Report:\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"jb\"\r\n\r\n\
         --jb\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Sender: designer@fabrikam.com\r\nSubject: =?utf-8?q?Gro=C3=9Fe_Pl=C3=A4ne?=\r\nMessage-Id: <{message_id}>\r\n\
         To: alice@contoso.com\r\nBcc: carol@contoso.com\r\n\r\n\
         --jb\r\nContent-Type: message/rfc822\r\n\r\n\
         From: Designer <designer@fabrikam.com>\r\nTo: alice@contoso.com\r\n\
         Subject: =?utf-8?q?Gro=C3=9Fe_Pl=C3=A4ne?=\r\nMessage-ID: <{message_id}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"ob\"\r\n\r\n\
         --ob\r\nContent-Type: text/plain\r\n\r\nThe plans, attached.\r\n\
         --ob\r\nContent-Type: application/octet-stream; name=\"plans.cad\"\r\n\
         Content-Disposition: attachment; filename=\"plans.cad\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {}\r\n--ob--\r\n\r\n--jb--\r\n",
        lines.join("\r\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_journaled_message_is_archived_and_linked_and_its_link_dies_when_altered_or_expired() {
    let (ns, plain, smtp, _operator) = smtp_receiver("smtp-raw", &["--raw-message-link-ttl", "15s"]).await;
    let linked = Receiver::start(SIEM_SECRET);
    let yaml = subscription(
        "with-raw",
        &linked.url("/hooks"),
        "",
        "  payload: {includeRawMessageLink: true}\n",
    );
    apply(&ns, &yaml);
    let other = Receiver::start(SIEM_SECRET);
    apply(
        &ns,
        &yaml
            .replace("with-raw", "with-raw-2")
            .replace(&linked.url("/hooks"), &other.url("/hooks")),
    );
    // The raw message shows what metadata and anonymized modes hide: refused together.
    let refused = yaml.replace("with-raw", "leaky").replace(
        "{includeRawMessageLink: true}",
        "{includeRawMessageLink: true, mode: metadata}",
    );
    let (ok, _, err) = kubectl_run(&["apply", "-n", &ns.name, "-f", "-"], Some(&refused));
    assert!(
        !ok && err.contains("payload.includeRawMessageLink needs payload.mode full"),
        "{err}"
    );
    wait_ready(&ns, "with-raw").await;

    // 4 MiB of attachment, not compressible, so the message is about 5.4 MB on the wire.
    let attachment: Vec<u8> = (0u32..4 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = std::env::temp_dir().join(format!("mailhook-{}-large.eml", ns.name));
    std::fs::write(&file, report_with_attachment("large-1@fabrikam.com", &attachment)).expect("write");
    let (ok, out) = swaks_data(
        smtp,
        "journal@contoso.com",
        "archive@journal.example.net",
        &format!("@{}", file.display()),
    );
    assert!(ok && out.contains("250 2.0.0 OK: recorded"), "{out}");
    let _ = std::fs::remove_file(&file);

    let got = eventually(
        "the subscriptions got the large message",
        || async {
            (
                plain.deliveries().await,
                linked.deliveries().await,
                other.deliveries().await,
            )
        },
        |(p, l, o)| [p, l, o].iter().all(|d| delivered(d, "message.received").len() == 2),
    )
    .await;
    for e in delivered(&got.0, "message.received") {
        assert!(e["data"].get("rawMessage").is_none(), "no link unless asked: {e}");
    }
    let events = delivered(&got.1, "message.received");
    let data = &events[0]["data"];
    assert_eq!(data["subject"], "Große Pläne");
    assert_eq!(data["attachments"][0]["name"], "plans.cad");
    assert_eq!(data["attachments"][0]["size"], attachment.len());
    assert_eq!(data["attachments"][0]["sha256"], sha256_hex(&attachment));
    let raw = &data["rawMessage"];
    let url = raw["url"].as_str().expect("rawMessage.url");
    assert_eq!(
        raw["sha256"], events[1]["data"]["rawMessage"]["sha256"],
        "one archive per message"
    );

    let http = reqwest::Client::new();
    let response = http.get(url).send().await.expect("fetch raw");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "message/rfc822");
    let body = response.bytes().await.expect("body");
    assert_eq!(
        raw["sha256"],
        sha256_hex(&body),
        "the bytes are the ones the link names"
    );
    assert_eq!(raw["size"], body.len(), "{raw}");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.starts_with("From: Designer <designer@fabrikam.com>")
            && text.contains("Message-ID: <large-1@fabrikam.com>"),
        "the archive holds the original message, not the report"
    );

    // Altered in any part: refused without a byte of the message.
    let altered = [
        url.replace("signature=", "signature=A"),
        url.replace("expires=", "expires=9"),
        url.replacen(raw["sha256"].as_str().expect("sha"), &"0".repeat(64), 1),
        url.split('?').next().expect("path").to_string(),
    ];
    for bad in &altered {
        let r = http.get(bad).send().await.expect("fetch altered");
        assert_eq!(r.status(), 403, "{bad}");
    }
    // A link names the subscription it was issued to: gone with it.
    let events_2 = delivered(&got.2, "message.received");
    let url_2 = events_2[0]["data"]["rawMessage"]["url"]
        .as_str()
        .expect("second link")
        .to_string();
    assert_eq!(http.get(&url_2).send().await.expect("fetch").status(), 200);
    let (ok, _, err) = kubectl_run(&["delete", "whs", "with-raw-2", "-n", &ns.name], None);
    assert!(ok, "{err}");
    eventually(
        "the deleted subscription's link is refused",
        || async { http.get(&url_2).send().await.map(|r| r.status().as_u16()).unwrap_or(0) },
        |s| *s == 404,
    )
    .await;
    // And the grant it was issued under: gone with it (the namespace's only grant).
    ns.revoke(&ns.name).await;
    eventually(
        "the link of a revoked grant is refused",
        || async { http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) },
        // 403 while the subscription still asks for links; 404 once it is parked NotGranted.
        |s| *s == 403 || *s == 404,
    )
    .await;
    // Expired: 410 once the link's time is up.
    let expires: jiff::Timestamp = raw["expiresAt"].as_str().expect("expiresAt").parse().expect("time");
    let wait = expires.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0) + 1.0;
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let r = http.get(url).send().await.expect("fetch expired");
    assert_eq!(r.status(), 410);
}

/// Writes raw command lines (bytes that need not be UTF-8), each with CRLF in one write,
/// and returns what the server answered; the connection closes when it returns.
fn raw_bytes_session(addr: std::net::SocketAddr, lines: &[&[u8]]) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    let mut read = |s: &mut std::net::TcpStream, out: &mut String| {
        if let Ok(n) = s.read(&mut buf) {
            out.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read(&mut s, &mut out);
    for l in lines {
        let mut line = l.to_vec();
        line.extend_from_slice(b"\r\n");
        s.write_all(&line).expect("write");
        std::thread::sleep(Duration::from_millis(50));
        read(&mut s, &mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_junk_in_mail_and_rcpt_gets_5xx_and_the_listener_goes_on() {
    let (_ns, receiver, smtp, operator) = smtp_receiver("smtp-utf8", &[]).await;

    let replies = raw_bytes_session(
        smtp,
        &[
            b"EHLO junk.example",
            b"MAIL FROM:\xff\xfe<x@fabrikam.com>",
            "MAIL FRO\u{e9}:<x@fabrikam.com>".as_bytes(),
            "MAIL \u{1F600}".as_bytes(),
            "MAIL FROM:<\u{fc}".as_bytes(),
            "MAIL FROM:<j\u{fc}rgen@b\u{fc}cher.example>".as_bytes(),
            "RCPT TO\u{1F600}<erin@contoso.com>".as_bytes(),
            b"RCPT TO:<erin@contoso.\xc3(com>",
            "RCPT T\u{d6}:<erin@contoso.com>".as_bytes(),
            b"QUIT",
        ],
    );
    let codes: Vec<&str> = replies
        .lines()
        .filter(|l| !l.starts_with("250-"))
        .filter_map(|l| l.get(..3))
        .collect();
    assert_eq!(
        codes,
        [
            "220", "250", "501", "501", "501", "501", "250", "501", "501", "501", "221"
        ],
        "junk is refused with 5xx; a real UTF-8 address (SMTPUTF8) is taken:\n{replies}"
    );
    assert!(replies.contains("250-SMTPUTF8"), "{replies}");

    // The same listener then takes a normal message from swaks, with a non-ASCII subject.
    let (ok, out) = swaks_mail(
        smtp,
        "x@fabrikam.com",
        "erin@contoso.com",
        "Grüße aus Köln",
        "hallo",
        &[],
    );
    assert!(ok && out.contains("250 2.0.0 OK: recorded"), "{out}");
    eventually(
        "the normal message delivered",
        || receiver.deliveries(),
        |d| {
            delivered(d, "message.received")
                .iter()
                .any(|j| j["data"]["mailbox"] == "erin@contoso.com")
        },
    )
    .await;
    let metrics = operator.metrics().await;
    assert!(
        !metrics.lines().any(|l| l.starts_with("mailhook_panics_total")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_report_from_an_internal_sender_gives_every_internal_mailbox_its_event() {
    let (_ns, receiver, smtp, _operator) = smtp_receiver("smtp-internal", &[]).await;
    let report = repo_path("tests/fixtures/journal/internal-report.eml");
    let (ok, out) = swaks_data(smtp, "journal@contoso.com", "archive@journal.example.net", &report);
    assert!(ok && out.contains("250 2.0.0 OK: recorded"), "{out}");
    let got = eventually(
        "the sender's event and five received events",
        || receiver.deliveries(),
        |d| delivered(d, "message.sent").len() == 1 && delivered(d, "message.received").len() == 5,
    )
    .await;
    let sent = &delivered(&got, "message.sent")[0]["data"];
    assert_eq!(sent["mailbox"], "grace@contoso.com");
    assert_eq!(sent["direction"], "outbound");
    let mut received: Vec<(String, String)> = delivered(&got, "message.received")
        .iter()
        .map(|j| {
            let d = &j["data"];
            assert_eq!(d["messageId"], "<q3-report@contoso.com>", "one message id for all: {d}");
            assert_eq!(d["subject"], "Quartalsbericht Q3 – vertraulich");
            assert!(d.get("bcc").is_none(), "no recipient's event reveals the Bcc list: {d}");
            (
                d["mailbox"].as_str().unwrap_or_default().to_string(),
                d["direction"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    received.sort();
    let internal = |m: &str| (m.to_string(), "internal".to_string());
    assert_eq!(
        received,
        [
            internal("heidi@contoso.com"),
            internal("ivan@contoso.com"),
            internal("judy@contoso.com"),
            internal("mallory@contoso.com"),
            internal("olivia@contoso.com"),
        ],
        "To, both members of the expanded list, Cc and Bcc; not the external Cc"
    );
}
