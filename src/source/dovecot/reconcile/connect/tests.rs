use tokio::io::{AsyncBufReadExt, BufReader};

use super::*;

#[test]
fn the_host_of_an_address() {
    assert_eq!(host_of("dovecot.mail.svc:143"), Some("dovecot.mail.svc"));
    assert_eq!(host_of("127.0.0.1:993"), Some("127.0.0.1"));
    assert_eq!(host_of("[::1]:993"), Some("::1"));
    assert_eq!(host_of("dovecot"), None);
    assert_eq!(host_of(":143"), None);
    assert_eq!(host_of("dovecot:imap"), None);
}

#[test]
fn a_tls_client_names_what_is_wrong_with_its_settings() {
    let dir = std::env::temp_dir().join(format!("mailhook-connect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let missing = dir.join("missing.pem");
    let err = TlsClient::new("dovecot:993", Some(&missing), None).expect_err("no file");
    assert!(matches!(err, TlsSetupError::CaFile { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let err = TlsClient::new("dovecot:993", Some(&empty), None).expect_err("no certificate");
    assert!(matches!(err, TlsSetupError::NoCertificate { .. }), "{err:?}");
    let err = TlsClient::new("dovecot", None, None).expect_err("no host");
    assert!(matches!(err, TlsSetupError::NoHost { .. }), "{err:?}");
    let err = TlsClient::new("dovecot:993", None, Some("not a name!")).expect_err("bad name");
    assert!(matches!(err, TlsSetupError::ServerName { .. }), "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server on loopback that sends `greeting` (if any), answers CAPABILITY with
/// `capability`, and otherwise stays silent with the connection open.
async fn fake_server(greeting: Option<&'static str>, capability: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let (read, mut write) = socket.into_split();
        if let Some(greeting) = greeting {
            let _ = write.write_all(greeting.as_bytes()).await;
        }
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(tag) = line.strip_suffix(" CAPABILITY") {
                let answer = format!("* CAPABILITY {capability}\r\n{tag} OK done\r\n");
                let _ = write.write_all(answer.as_bytes()).await;
            }
        }
        // Bytes that are no text (a ClientHello) end the loop, not the connection.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(write);
    });
    addr
}

fn transport(addr: &str, security: Security) -> Transport {
    Transport {
        addr: addr.to_string(),
        security,
        timeout: Duration::from_millis(300),
    }
}

fn tls(addr: &str) -> TlsClient {
    // The system's roots: no test here gets as far as checking a certificate.
    TlsClient::new(addr, None, Some("dovecot.test")).expect("a TLS client")
}

#[tokio::test]
async fn a_server_that_never_answers_the_handshake_times_out() {
    let addr = fake_server(None, "").await;
    let err = transport(&addr, Security::Implicit(tls(&addr)))
        .connect()
        .await
        .expect_err("no handshake");
    assert!(
        matches!(
            err,
            ConnectError::Timeout {
                step: "TLS handshake",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn implicit_tls_to_a_plain_imap_port_suggests_starttls() {
    let addr = fake_server(Some("* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"), "").await;
    let err = transport(&addr, Security::Implicit(tls(&addr)))
        .connect()
        .await
        .expect_err("no TLS");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("--dovecot-imap-tls starttls"), "{err}");
}

#[tokio::test]
async fn a_silent_server_spoken_to_in_plain_suggests_implicit_tls() {
    let addr = fake_server(None, "").await;
    let err = transport(&addr, Security::StartTls(tls(&addr)))
        .connect()
        .await
        .expect_err("no greeting");
    assert!(matches!(err, ConnectError::Timeout { step: "greeting", .. }), "{err:?}");
    assert!(err.to_string().contains("--dovecot-imap-tls implicit"), "{err}");
}

#[tokio::test]
async fn starttls_not_offered_is_refused_and_names_the_flag() {
    // Offered neither in the greeting nor in the answer to CAPABILITY.
    let addr = fake_server(Some("* OK ready\r\n"), "IMAP4rev1 AUTH=PLAIN").await;
    let err = transport(&addr, Security::StartTls(tls(&addr)))
        .connect()
        .await
        .expect_err("no STARTTLS");
    assert!(matches!(err, ConnectError::NoStartTls { .. }), "{err:?}");
    assert!(err.to_string().contains("--dovecot-imap-tls none"), "{err}");
    let addr = fake_server(Some("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"), "").await;
    let err = transport(&addr, Security::StartTls(tls(&addr)))
        .connect()
        .await
        .expect_err("no STARTTLS");
    assert!(matches!(err, ConnectError::NoStartTls { .. }), "{err:?}");
}

#[tokio::test]
async fn plaintext_login_disabled_is_a_clear_error() {
    let addr = fake_server(Some("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n"), "").await;
    let err = transport(&addr, Security::Plaintext)
        .connect()
        .await
        .expect_err("LOGINDISABLED");
    assert!(matches!(err, ConnectError::LoginDisabled { .. }), "{err:?}");
    assert!(err.to_string().contains("disable_plaintext_auth"), "{err}");
    // Capabilities asked for when the greeting names none.
    let addr = fake_server(Some("* OK ready\r\n"), "IMAP4rev1 LOGINDISABLED").await;
    let err = transport(&addr, Security::Plaintext)
        .connect()
        .await
        .expect_err("LOGINDISABLED");
    assert!(matches!(err, ConnectError::LoginDisabled { .. }), "{err:?}");
}

#[tokio::test]
async fn plaintext_reaches_login_when_allowed() {
    let addr = fake_server(Some("* OK ready\r\n"), "IMAP4rev1 AUTH=PLAIN").await;
    transport(&addr, Security::Plaintext)
        .connect()
        .await
        .expect("ready for LOGIN");
}

#[tokio::test]
async fn a_goodbye_instead_of_a_greeting_is_reported() {
    let addr = fake_server(Some("* BYE too many connections\r\n"), "").await;
    let err = transport(&addr, Security::Plaintext).connect().await.expect_err("BYE");
    assert!(matches!(err, ConnectError::Greeting { .. }), "{err:?}");
    assert!(err.to_string().contains("too many connections"), "{err}");
}
