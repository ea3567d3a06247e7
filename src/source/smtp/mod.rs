//! The SMTP journal receiver (RFC 5321): mail systems send journal reports or plain
//! copies here; each message becomes events through the same pipeline as HTTP ingest.
//! `250` is answered only once the events are durable.
//!
//! Replies: `552 5.3.4` over `--smtp-max-message-bytes` (also announced as SIZE), `452`
//! under backpressure or too many recipients, `554 5.6.0` with the reason for mail that is
//! neither a journal report nor a usable copy, `451 4.3.0` when the store fails, `500`
//! for a command line longer than 512 bytes, `500 5.5.2` for a message with a line over
//! 1 MiB (nothing of it is recorded), `421` when busy, not ready, idle too long, or past a
//! deadline.
//!
//! Bounds: `--smtp-max-connections` sessions at once and `--smtp-max-connections-per-address`
//! from one client address; a session must reach its first MAIL within
//! `--smtp-handshake-timeout` (STARTTLS and AUTH included; a TLS handshake alone within
//! 10 s) and end within `--smtp-session-timeout`; each read waits at most
//! `--smtp-idle-timeout`. A client that stalls loses its slot, whatever it stalls on.
//! STARTTLS (RFC 3207) is offered when a certificate is configured. With a token file, AUTH
//! PLAIN (RFC 4954) is offered after STARTTLS only, and MAIL needs it (`530`); the password
//! must be one of the tokens (any user name), a wrong one gets `535`.
//!
//! This module owns the session: the connection (STARTTLS included), its state (greeting,
//! AUTH, the transaction), reading lines and DATA, the limits and every reply. It parses no
//! command itself: [`command::parse`] does, purely. It depends on the pipeline (`source`),
//! the journal parser, the AUTH tokens and readiness.

pub mod command;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

use self::command::{AuthPlain, Command, CommandError, MAX_COMMAND_LINE, Mail};
use super::journal::{self, Envelope};
use super::{AcceptError, Pipeline};
use crate::auth::Auth;
use crate::handles::Readiness;

/// SMTP listener settings (flags of `mailhook run`).
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Name in the greeting and the EHLO answer.
    pub hostname: String,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// Sessions from one client address at once.
    pub max_connections_per_address: usize,
    pub idle_timeout: Duration,
    /// From connect to the first accepted MAIL.
    pub handshake_timeout: Duration,
    /// From connect to the end of the session.
    pub session_timeout: Duration,
    /// Offered as STARTTLS when set.
    pub tls: Option<Arc<TlsFiles>>,
    /// When set, senders must AUTH PLAIN with one of these tokens as the password.
    pub auth: Option<crate::auth::Tokens>,
}

/// Loads a PEM certificate chain and private key for STARTTLS (TLS 1.2 and 1.3 only).
fn tls_config(cert: &[u8], key: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the certificate file is not PEM: {e}"))?;
    anyhow::ensure!(!chain.is_empty(), "the certificate file holds no certificate");
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| anyhow::anyhow!("the key file holds no private key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("the certificate and key do not fit: {e}"))?;
    Ok(Arc::new(config))
}

/// The STARTTLS certificate and key files, re-read at each STARTTLS: a renewed
/// certificate (cert-manager rewriting the mounted Secret) is served from the next
/// handshake on, without a restart. A broken pair keeps the last good one.
pub struct TlsFiles {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    /// The files' bytes and the configuration built from them.
    current: parking_lot::Mutex<(Vec<u8>, Vec<u8>, Arc<rustls::ServerConfig>)>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// The pair of `--smtp-tls-cert-file` and `--smtp-tls-key-file`: both or neither.
    pub fn from_flags(
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<Arc<TlsFiles>>> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Arc::new(TlsFiles::load(cert, key)?))),
            (None, None) => Ok(None),
            _ => anyhow::bail!("--smtp-tls-cert-file and --smtp-tls-key-file go together"),
        }
    }

    /// Loads the pair; fails when it does not make a usable configuration.
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsFiles> {
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()));
        let (c, k) = (read(cert)?, read(key)?);
        let config = tls_config(&c, &k)
            .map_err(|e| anyhow::anyhow!("SMTP TLS from {} and {}: {e}", cert.display(), key.display()))?;
        Ok(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: parking_lot::Mutex::new((c, k, config)),
        })
    }

    /// The configuration for a handshake starting now.
    fn config(&self) -> Option<Arc<rustls::ServerConfig>> {
        let mut current = self.current.lock();
        if let (Ok(c), Ok(k)) = (std::fs::read(&self.cert), std::fs::read(&self.key))
            && (c != current.0 || k != current.1)
        {
            match tls_config(&c, &k) {
                Ok(config) => {
                    info!(cert = %self.cert.display(), "SMTP TLS certificate changed on disk; serving the new one");
                    *current = (c, k, config);
                }
                // Mid-rotation the two files can briefly disagree: keep serving the old pair.
                Err(err) => warn!(%err, "SMTP TLS files changed but do not load; keeping the previous certificate"),
            }
        }
        Some(current.2.clone())
    }
}

/// A connection before or after STARTTLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Longest text line taken in DATA. RFC 5321 says 1000; real journals exceed it, so the
/// bound only protects memory. A message with a longer line is refused whole: dropping the
/// line would archive a message that is not the one sent.
const MAX_DATA_LINE: usize = 1 << 20;

/// How long a TLS handshake may take after `220 Ready to start TLS`.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session may go on after shutdown began: one finishing its message is let
/// finish; one still open after this is closed (a sender retries what was not answered).
const SESSION_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The passwords of `--smtp-auth-token-file`; they need TLS (`--smtp-tls-cert-file`):
/// passwords never cross the wire unencrypted.
pub fn auth_tokens(
    token_file: Option<&std::path::Path>,
    cert_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<crate::auth::Tokens>> {
    match (token_file, cert_file) {
        (None, _) => Ok(None),
        (Some(_), None) => anyhow::bail!(
            "--smtp-auth-token-file needs --smtp-tls-cert-file: passwords never cross the wire unencrypted"
        ),
        (Some(path), Some(_)) => crate::auth::Tokens::load_named(path, "SMTP").map(Some),
    }
}

/// Accepts connections until `shutdown`; each session runs on `sessions` (the shutdown
/// waits for them, up to SESSION_GRACE).
pub async fn serve(
    listener: TcpListener,
    config: SmtpConfig,
    pipeline: Arc<Pipeline>,
    readiness: Readiness,
    shutdown: tokio_util::sync::CancellationToken,
    sessions: tokio_util::task::TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let per_address = Arc::new(crate::serve::PerAddress::default());
    let config = Arc::new(config);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    warn!(%err, "cannot accept an SMTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (config, pipeline, readiness) = (config.clone(), pipeline.clone(), readiness.clone());
        let address = per_address.take(peer.ip(), config.max_connections_per_address);
        let permit = slots.clone().try_acquire_owned();
        let stop = shutdown.clone();
        sessions.spawn(
            async move {
                let refused = |reason| pipeline.metrics.refused.with_label_values(&["smtp", reason]).inc();
                let run = async {
                    match (permit, address) {
                        (Err(_), _) => {
                            refused("connections");
                            let mut session = Session::new(Box::new(stream), peer.ip(), &config);
                            session.reply("421 4.7.0 Too many connections; try again later").await
                        }
                        (Ok(_), None) => {
                            refused("connections_per_address");
                            let mut session = Session::new(Box::new(stream), peer.ip(), &config);
                            session
                                .reply("421 4.7.0 Too many connections from your address; try again later")
                                .await
                        }
                        // Not ready only because the store is down: the session goes on and
                        // MAIL answers 451, as the sender's queue expects.
                        (Ok(_permit), Some(_address)) if !readiness.is_ready_apart_from(crate::handles::STORE) => {
                            let mut session = Session::new(Box::new(stream), peer.ip(), &config);
                            session.reply("421 4.3.2 Not ready yet; try again later").await
                        }
                        // However the client stalls (reading, writing, or in the TLS
                        // handshake), the slot is back at the session deadline.
                        (Ok(_permit), Some(_address)) => {
                            let whole = config.session_timeout + SESSION_GRACE;
                            tokio::time::timeout(whole, session(Box::new(stream), peer.ip(), &config, &pipeline))
                                .await
                                .unwrap_or_else(|_| {
                                    refused("session_timeout");
                                    Ok(())
                                })
                        }
                    }
                };
                tokio::pin!(run);
                let result = tokio::select! {
                    r = &mut run => r,
                    () = stop.cancelled() => tokio::time::timeout(SESSION_GRACE, &mut run).await.unwrap_or(Ok(())),
                };
                if let Err(err) = result {
                    debug!(%err, "SMTP connection ended");
                }
            }
            .instrument(info_span!("smtp", %peer)),
        );
    }
}

/// Runs one SMTP session on `stream` to its end. A panic inside it (a bug) is caught:
/// the client gets `421`, the panic is counted, and the listener goes on.
pub async fn session(
    stream: Box<dyn Stream>,
    peer: std::net::IpAddr,
    config: &SmtpConfig,
    pipeline: &Arc<Pipeline>,
) -> std::io::Result<()> {
    use futures::FutureExt;
    let mut session = Session::new(stream, peer, config);
    let outcome = std::panic::AssertUnwindSafe(session.run(config, pipeline))
        .catch_unwind()
        .await;
    match outcome {
        Ok(result) => result,
        Err(_) => {
            crate::panics::record(&pipeline.metrics, "smtp");
            session
                .reply("421 4.3.0 Internal error (reported); closing. Nothing of the current message was recorded.")
                .await
        }
    }
}

/// What reading one line gave.
enum Line {
    Text(Vec<u8>),
    TooLong,
    Closed,
    /// The idle timeout or the deadline passed; `421` was sent.
    TimedOut,
}

/// What reading a message gave.
enum Data {
    Message(Vec<u8>),
    /// Over the size limit, at least this many bytes.
    TooBig(usize),
    /// A line over MAX_DATA_LINE.
    LineTooLong,
    /// The client went away, or a timeout closed the session.
    Gone,
}

struct Session {
    io: BufReader<Box<dyn Stream>>,
    /// The client's address (failed AUTH attempts are counted per address).
    peer: std::net::IpAddr,
    idle: Duration,
    /// Until the first MAIL: the handshake deadline; then the session's.
    deadline: tokio::time::Instant,
    /// The session's own deadline.
    session_deadline: tokio::time::Instant,
    /// Whether a transaction is open (a MAIL accepted, not yet answered or reset).
    transacted: bool,
    tls: bool,
    authenticated: bool,
}

#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

impl Session {
    fn new(stream: Box<dyn Stream>, peer: std::net::IpAddr, config: &SmtpConfig) -> Session {
        let now = tokio::time::Instant::now();
        let session_deadline = now + config.session_timeout;
        Session {
            io: BufReader::new(stream),
            peer,
            idle: config.idle_timeout,
            deadline: (now + config.handshake_timeout).min(session_deadline),
            session_deadline,
            transacted: false,
            tls: false,
            authenticated: false,
        }
    }

    /// A MAIL was accepted: while the transaction is open only the session deadline
    /// applies.
    fn transacting(&mut self) {
        self.transacted = true;
        self.deadline = self.session_deadline;
    }

    /// The transaction ended (answered, or reset): the next MAIL must come within the
    /// handshake deadline again, so one MAIL does not buy a session-long slot.
    fn between_transactions(&mut self, handshake: Duration) {
        self.transacted = false;
        self.deadline = (tokio::time::Instant::now() + handshake).min(self.session_deadline);
    }

    /// Sends one reply in one write: a client that reads the STARTTLS answer with a single
    /// read (OpenSSL's s_client does) would otherwise take a late CRLF for the TLS handshake.
    /// A client that stops reading its answers gets the same deadlines as one that stops
    /// writing.
    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        let mut line = Vec::with_capacity(text.len() + 2);
        line.extend_from_slice(text.as_bytes());
        line.extend_from_slice(b"\r\n");
        let until = (tokio::time::Instant::now() + self.idle).min(self.session_deadline);
        let w = self.io.get_mut();
        let write = async {
            w.write_all(&line).await?;
            w.flush().await
        };
        tokio::time::timeout_at(until, write).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))
        })
    }

    /// RFC 3207: after `220`, the TLS handshake; the session starts over, and anything the
    /// client pipelined before the handshake is discarded.
    async fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> std::io::Result<()> {
        self.reply("220 2.0.0 Ready to start TLS").await?;
        let placeholder: Box<dyn Stream> = Box::new(tokio::io::duplex(1).0);
        let plain = std::mem::replace(&mut self.io, BufReader::new(placeholder)).into_inner();
        let within = TLS_HANDSHAKE_TIMEOUT.min(self.deadline.saturating_duration_since(tokio::time::Instant::now()));
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(plain);
        // A client that never completes the handshake must not keep its slot.
        let tls = tokio::time::timeout(within, accept).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the TLS handshake did not complete in time",
            )
        })??;
        self.io = BufReader::new(Box::new(tls));
        self.tls = true;
        Ok(())
    }

    /// Reads one line (with its line ending) of at most `max` bytes; a longer one is read
    /// to its end and dropped.
    async fn line(&mut self, max: usize) -> std::io::Result<Line> {
        let mut buf = Vec::new();
        let mut too_long = false;
        loop {
            let now = tokio::time::Instant::now();
            let until = (now + self.idle).min(self.deadline);
            let chunk = match tokio::time::timeout_at(until, self.io.fill_buf()).await {
                Ok(r) => r?,
                Err(_) => {
                    let why = if until < now + self.idle {
                        if self.transacted {
                            "421 4.4.2 Session too long; closing (send the rest in a new session)"
                        } else {
                            "421 4.4.2 No transaction started in time; closing"
                        }
                    } else {
                        "421 4.4.2 Idle too long; closing"
                    };
                    let _ = self.reply(why).await;
                    return Ok(Line::TimedOut);
                }
            };
            if chunk.is_empty() {
                return Ok(Line::Closed);
            }
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if !too_long {
                if buf.len() + take > max {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.io.consume(take);
            if done {
                return Ok(if too_long { Line::TooLong } else { Line::Text(buf) });
            }
        }
    }

    async fn run(&mut self, config: &SmtpConfig, pipeline: &Arc<Pipeline>) -> std::io::Result<()> {
        self.reply(&format!("220 {} mailhook ESMTP ready", config.hostname))
            .await?;
        let mut tx = Transaction::default();
        let mut greeted = false;
        loop {
            let line = match self.line(MAX_COMMAND_LINE).await? {
                Line::Closed => return Ok(()),
                Line::TimedOut => {
                    count_refused(
                        pipeline,
                        if self.transacted {
                            "session_timeout"
                        } else {
                            "handshake_timeout"
                        },
                    );
                    return Ok(());
                }
                Line::TooLong => {
                    self.reply(&CommandError::TooLong.to_string()).await?;
                    continue;
                }
                Line::Text(t) => t,
            };
            let command = match command::parse(&line) {
                Ok(command) => command,
                Err(err) => {
                    self.reply(&err.to_string()).await?;
                    continue;
                }
            };
            match command {
                Command::Ehlo(_) => {
                    tx = Transaction::default();
                    greeted = true;
                    let starttls = if config.tls.is_some() && !self.tls {
                        "250-STARTTLS\r\n"
                    } else {
                        ""
                    };
                    let auth = if config.auth.is_some() && self.tls && !self.authenticated {
                        "250-AUTH PLAIN\r\n"
                    } else {
                        ""
                    };
                    let answer = format!(
                        "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n{starttls}{auth}250 ENHANCEDSTATUSCODES",
                        config.hostname, config.max_message_bytes
                    );
                    self.reply(&answer).await?;
                }
                Command::Helo(_) => {
                    tx = Transaction::default();
                    greeted = true;
                    self.reply(&format!("250 {}", config.hostname)).await?;
                }
                Command::Mail(mail) => {
                    if !greeted {
                        self.reply("503 5.5.1 Say EHLO first").await?;
                    } else if config.auth.is_some() && !self.authenticated {
                        self.reply("530 5.7.0 Authentication required (STARTTLS, then AUTH PLAIN)")
                            .await?;
                    } else if tx.mail_from.is_some() {
                        self.reply("503 5.5.1 Nested MAIL command").await?;
                    } else if let Some(answer) = backpressure(pipeline) {
                        self.reply(&answer).await?;
                    } else {
                        match sender(mail, config.max_message_bytes) {
                            Ok(from) => {
                                tx.mail_from = Some(from.to_string());
                                self.transacting();
                                self.reply("250 2.1.0 OK").await?;
                            }
                            Err(reply) => self.reply(&reply).await?,
                        }
                    }
                }
                Command::Rcpt { to } => {
                    if tx.mail_from.is_none() {
                        self.reply("503 5.5.1 Need MAIL first").await?;
                    } else if tx.rcpt_to.len() >= config.max_recipients {
                        self.reply("452 4.5.3 Too many recipients").await?;
                    } else {
                        match to {
                            Ok(rcpt) => {
                                tx.rcpt_to.push(rcpt.to_string());
                                self.reply("250 2.1.5 OK").await?;
                            }
                            Err(err) => self.reply(&err.to_string()).await?,
                        }
                    }
                }
                Command::Data => {
                    if tx.rcpt_to.is_empty() {
                        self.reply("503 5.5.1 Need RCPT first").await?;
                        continue;
                    }
                    self.reply("354 End data with <CR><LF>.<CR><LF>").await?;
                    let body = self.data(config.max_message_bytes).await?;
                    let envelope = Envelope {
                        mail_from: tx.mail_from.take().filter(|f| !f.is_empty()),
                        rcpt_to: std::mem::take(&mut tx.rcpt_to),
                    };
                    let answer = match body {
                        // The client went away or ran out of time mid-message: nothing is stored.
                        Data::Gone => return Ok(()),
                        Data::TooBig(size) => {
                            count(pipeline, "rejected");
                            format!(
                                "552 5.3.4 Message too big ({size}+ bytes; at most {})",
                                config.max_message_bytes
                            )
                        }
                        Data::LineTooLong => {
                            count(pipeline, "rejected");
                            count_refused(pipeline, "line_too_long");
                            format!(
                                "500 5.5.2 Line too long: a line of the message is over {MAX_DATA_LINE} bytes; nothing was recorded"
                            )
                        }
                        Data::Message(raw) => deliver(raw, envelope, pipeline.clone()).await,
                    };
                    self.between_transactions(config.handshake_timeout);
                    self.reply(&answer).await?;
                }
                Command::Rset => {
                    tx = Transaction::default();
                    self.between_transactions(config.handshake_timeout);
                    self.reply("250 2.0.0 OK").await?;
                }
                Command::Noop => self.reply("250 2.0.0 OK").await?,
                Command::Vrfy => self.reply("252 2.5.2 Cannot verify; send the message").await?,
                Command::Help => self.reply("214 2.0.0 See RFC 5321").await?,
                Command::Quit => {
                    self.reply("221 2.0.0 Bye").await?;
                    return Ok(());
                }
                Command::StartTls => match (config.tls.as_ref().and_then(|t| t.config()), self.tls) {
                    (Some(tls), false) => {
                        self.start_tls(tls).await?;
                        tx = Transaction::default();
                        greeted = false;
                    }
                    (Some(_), true) => self.reply("503 5.5.1 TLS already active").await?,
                    (None, _) => self.reply("502 5.5.1 STARTTLS not offered").await?,
                },
                Command::Auth(plain) => match &config.auth {
                    None => self.reply("502 5.5.1 AUTH not offered").await?,
                    Some(_) if !self.tls => self.reply("538 5.7.11 Encryption required: STARTTLS first").await?,
                    Some(_) if self.authenticated => self.reply("503 5.5.1 Already authenticated").await?,
                    Some(tokens) => {
                        let initial = match plain {
                            Ok(AuthPlain { initial }) => initial,
                            Err(err) => {
                                self.reply(&err.to_string()).await?;
                                continue;
                            }
                        };
                        let response = match initial {
                            Some(initial) => initial.to_string(),
                            None => {
                                self.reply("334 ").await?;
                                match self.line(MAX_COMMAND_LINE).await? {
                                    Line::Text(t) => String::from_utf8_lossy(&t).trim().to_string(),
                                    Line::TooLong => String::new(),
                                    Line::Closed | Line::TimedOut => return Ok(()),
                                }
                            }
                        };
                        match tokens.check(command::plain_password(&response).as_deref(), self.peer) {
                            Auth::Accepted(_) => {
                                self.authenticated = true;
                                self.reply("235 2.7.0 Authentication successful").await?;
                            }
                            Auth::Refused => {
                                count(pipeline, "rejected");
                                self.reply("535 5.7.8 Authentication credentials invalid").await?;
                            }
                            Auth::Locked(_) => {
                                count(pipeline, "rejected");
                                self.reply("421 4.7.0 Too many failed authentications; try again later")
                                    .await?;
                                return Ok(());
                            }
                        }
                    }
                },
            }
        }
    }

    /// Reads the message up to the lone dot, undoing dot-stuffing. Read to its end even
    /// when over `max` or holding an overlong line, so the session can go on.
    async fn data(&mut self, max: usize) -> std::io::Result<Data> {
        let mut body = Vec::new();
        let mut size = 0usize;
        let mut line_too_long = false;
        loop {
            let line = match self.line(MAX_DATA_LINE).await? {
                Line::Closed | Line::TimedOut => return Ok(Data::Gone),
                Line::TooLong => {
                    line_too_long = true;
                    size = size.saturating_add(MAX_DATA_LINE);
                    body = Vec::new();
                    continue;
                }
                Line::Text(t) => t,
            };
            if line == b".\r\n" || line == b".\n" {
                return Ok(if line_too_long {
                    Data::LineTooLong
                } else if size > max {
                    Data::TooBig(size)
                } else {
                    Data::Message(body)
                });
            }
            let line = line.strip_prefix(b".").unwrap_or(&line);
            size = size.saturating_add(line.len());
            if size <= max && !line_too_long {
                body.extend_from_slice(line);
            } else {
                body = Vec::new();
            }
        }
    }
}

/// Parses the message into events and stores them (off the async workers: parsing a
/// large message and the durable write both block); the reply to send.
async fn deliver(raw: Vec<u8>, envelope: Envelope, pipeline: Arc<Pipeline>) -> String {
    if let Some(answer) = backpressure(&pipeline) {
        return answer;
    }
    let metrics = pipeline.metrics.clone();
    tokio::task::spawn_blocking(move || record(&raw, &envelope, &pipeline))
        .await
        .unwrap_or_else(|err| match err.try_into_panic() {
            Ok(_) => {
                crate::panics::record(&metrics, "smtp");
                count_with(&metrics, "rejected");
                "451 4.3.0 Internal error while recording this message (a mailhook bug, reported); try again later"
                    .into()
            }
            Err(err) => {
                warn!(%err, "recording a journaled message stopped unexpectedly");
                "451 4.3.0 Cannot store the message right now; try again later".into()
            }
        })
}

/// Events committed at once for one message: what is held in memory at a time, however
/// many recipients a journal report lists. A retry after a failure part-way is safe: what
/// was committed is de-duplicated by its producer ids.
const COMMIT_CHUNK: usize = 1000;

/// Ids listed in the 250 reply; a larger message's reply gives the count.
const REPLY_IDS: usize = 16;

fn record(raw: &[u8], envelope: &Envelope, pipeline: &Pipeline) -> String {
    let journaled = match journal::parse(raw, envelope, &pipeline.internal_domains, jiff::Timestamp::now()) {
        Ok(j) => j,
        Err(err) => {
            count(pipeline, "rejected");
            if err == journal::JournalError::ParserFailed {
                // mail-parser's own panic, caught by `journal::parse`: counted like ours.
                pipeline.metrics.panics.with_label_values(&["mail_parser"]).inc();
            }
            info!(%err, size = raw.len(), "refused a message that is neither a journal report nor a usable copy");
            let code = if err.is_size() { "552 5.3.4" } else { "554 5.6.0" };
            return format!("{code} Cannot record this message: {}", one_line(&err.to_string(), 400));
        }
    };
    if journaled.is_empty() {
        return "250 2.0.0 OK: no internal mailbox involved; nothing recorded".into();
    }
    let n = journaled.len();
    let (mut duplicates, mut ids) = (0usize, Vec::new());
    let (plan, original) = journaled.into_parts();
    let mut archive = super::RawArchive::new(Some(original));
    for chunk in plan.chunks(COMMIT_CHUNK) {
        match pipeline.accept_chunk(chunk, &mut archive) {
            Ok(stored) => {
                duplicates += stored.iter().filter(|s| s.duplicate).count();
                ids.extend(
                    stored
                        .into_iter()
                        .take(REPLY_IDS.saturating_sub(ids.len()))
                        .map(|s| s.id),
                );
            }
            Err(AcceptError::RoutingPanicked { .. }) => {
                count(pipeline, "rejected");
                return "451 4.3.0 Internal error while routing this message (a mailhook bug, reported); try again later"
                    .into();
            }
            Err(AcceptError::Store(err)) => {
                warn!(%err, "cannot store a journaled message; the sender will retry");
                if Pipeline::out_of_space(&err.to_string()) {
                    return "452 4.3.1 Insufficient system storage; try again later".into();
                }
                return "451 4.3.0 Cannot store the message right now; try again later".into();
            }
        }
    }
    info!(events = n, duplicates, "journaled message recorded");
    if n <= REPLY_IDS {
        format!("250 2.0.0 OK: recorded as {}", ids.join(" "))
    } else {
        format!("250 2.0.0 OK: recorded as {n} events ({} ...)", ids.join(" "))
    }
}

/// The 451 answer while the store is down (452 when its volume is full; counted as
/// unavailable), or the 452 answer
/// (counted as throttled) while the pipeline refuses new events: checked at MAIL, so
/// senders stop early, and again before storing.
fn backpressure(pipeline: &Pipeline) -> Option<String> {
    if let Some(reason) = pipeline.store_down() {
        count(pipeline, "unavailable");
        let code = if Pipeline::out_of_space(&reason) {
            "452 4.3.1 Insufficient system storage"
        } else {
            "451 4.3.0 Cannot store messages right now"
        };
        return Some(format!("{code} ({}); try again later", one_line(&reason, 200)));
    }
    let reason = pipeline.overloaded()?;
    count(pipeline, "throttled");
    Some(format!(
        "452 4.3.1 Insufficient system storage: {reason}; try again later"
    ))
}

/// `text` fit for one SMTP reply line: control characters (a CR LF would end the reply)
/// as spaces, at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

/// Counts a session the listener's bounds ended.
fn count_refused(pipeline: &Pipeline, reason: &str) {
    pipeline.metrics.refused.with_label_values(&["smtp", reason]).inc();
}

/// Counts a message outcome that the pipeline does not count itself (refusals).
fn count(pipeline: &Pipeline, outcome: &str) {
    count_with(&pipeline.metrics, outcome);
}

fn count_with(metrics: &crate::metrics::Metrics, outcome: &str) {
    metrics.events_ingested.with_label_values(&["smtp", outcome]).inc();
}

/// The reverse path MAIL may take, or the reply: an oversized SIZE is answered before an
/// unusable address, as it always was.
fn sender(mail: Mail<'_>, max: usize) -> Result<&str, String> {
    if mail.size.is_some_and(|s| s > max) {
        return Err("552 5.3.4 Message size exceeds the fixed limit".into());
    }
    mail.from.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail_from(arg: &str, max: usize) -> Result<String, String> {
        let line = format!("MAIL {arg}");
        match command::parse(line.as_bytes()) {
            Ok(Command::Mail(mail)) => sender(mail, max).map(str::to_string),
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn size_parameters_against_the_limit() {
        assert_eq!(mail_from("FROM:<a@b.com> SIZE=100", 1000), Ok("a@b.com".into()));
        assert_eq!(
            mail_from("FROM:<a@b.com> SIZE=5000", 1000),
            Err("552 5.3.4 Message size exceeds the fixed limit".into())
        );
        assert!(mail_from("FROM:<not an address>", 1000).is_err());
        // The size is answered first, then the address; a malformed path before both.
        assert_eq!(
            mail_from("FROM:<not an address> SIZE=5000", 1000),
            Err("552 5.3.4 Message size exceeds the fixed limit".into())
        );
        assert_eq!(
            mail_from("FROM:not-a-path SIZE=5000", 1000),
            Err("501 5.1.7 Bad sender address syntax".into())
        );
        assert_eq!(mail_from("FROM:<> SIZE=1000", 1000), Ok(String::new()));
    }
}
