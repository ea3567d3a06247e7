//! The reconciler's IMAP connection: TCP, TLS (from the first byte, or after STARTTLS)
//! unless plaintext was asked for, the greeting, and the capability checks before LOGIN.
//! Every step has a deadline: a server that takes the TCP connection and then says
//! nothing (or never finishes a handshake) costs one timeout, not a stuck reconciler.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_imap::imap_proto::{Capability, Response, ResponseCode, Status};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long each step before and including LOGIN may take (TCP, TLS, greeting, one
/// command's answer): generous for a loaded server, short enough to retry soon.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the reconciler protects its IMAP connection (and the master password in it).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImapTls {
    /// TLS from the first byte (IMAPS, port 993).
    Implicit,
    /// Plain IMAP, then STARTTLS before anything else (port 143); a server that does
    /// not offer it is refused.
    #[default]
    #[value(name = "starttls")]
    StartTls,
    /// No TLS: the master password crosses the network in clear.
    None,
}

/// What the TLS client checks: the server's chain against `roots`, its certificate
/// against `server_name`.
#[derive(Clone)]
pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    /// The trust anchors, named for error messages.
    trust: String,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

/// Why the TLS client could not be set up (at start: a configuration mistake).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read the IMAP CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the IMAP CA file {path} is not a PEM certificate bundle")]
    Ca {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the IMAP CA file {path} holds a certificate rustls cannot use")]
    CaCertificate {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("the IMAP CA file {path} holds no certificate")]
    NoCertificate { path: String },
    #[error("the system has no trusted CA certificates: name the Dovecot server's CA with --dovecot-imap-ca-file")]
    NoSystemRoots,
    #[error("no host name in the IMAP address {addr} (host:port) to check the certificate against")]
    NoHost { addr: String },
    #[error("{name} is neither a DNS name nor an IP address")]
    ServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS configuration")]
    Rustls(#[source] rustls::Error),
}

impl TlsClient {
    /// Trusts the PEM certificates in `ca_file`, or the system's trust store, and checks
    /// the server's certificate against `server_name`, or else the host of `addr`.
    pub fn new(addr: &str, ca_file: Option<&Path>, server_name: Option<&str>) -> Result<TlsClient, TlsSetupError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let name = match server_name {
            Some(name) => name,
            None => host_of(addr).ok_or_else(|| TlsSetupError::NoHost { addr: addr.to_string() })?,
        };
        let server_name = ServerName::try_from(name.to_string()).map_err(|source| TlsSetupError::ServerName {
            name: name.to_string(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        let trust = match ca_file {
            Some(path) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| TlsSetupError::CaFile {
                    path: shown.clone(),
                    source,
                })?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|source| TlsSetupError::Ca {
                        path: shown.clone(),
                        source,
                    })?;
                    roots.add(cert).map_err(|source| TlsSetupError::CaCertificate {
                        path: shown.clone(),
                        source,
                    })?;
                }
                if roots.is_empty() {
                    return Err(TlsSetupError::NoCertificate { path: shown });
                }
                format!("the CA file {shown}")
            }
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if roots.is_empty() {
                    return Err(TlsSetupError::NoSystemRoots);
                }
                "the system's trusted CAs (a private CA needs --dovecot-imap-ca-file)".to_string()
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            trust,
        })
    }

    fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// TLS over `tcp`, the certificate checked (other protocols of the same server, e.g.
    /// ManageSieve, use the same trust).
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }

    /// What the certificate is checked against, for error messages.
    pub fn trust(&self) -> &str {
        &self.trust
    }
}

/// The host of `host:port` or `[v6]:port`. Pure.
pub fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// How the connection is protected, with what TLS needs.
#[derive(Debug, Clone)]
pub enum Security {
    Implicit(TlsClient),
    StartTls(TlsClient),
    Plaintext,
}

impl Security {
    pub fn mode(&self) -> ImapTls {
        match self {
            Security::Implicit(_) => ImapTls::Implicit,
            Security::StartTls(_) => ImapTls::StartTls,
            Security::Plaintext => ImapTls::None,
        }
    }
}

/// Where and how to reach the server.
#[derive(Debug, Clone)]
pub struct Transport {
    pub addr: String,
    pub security: Security,
    /// Deadline of each step before LOGIN.
    pub timeout: Duration,
}

/// Why a connection did not reach the point where LOGIN can be sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach the Dovecot IMAP server at {addr}")]
    Tcp {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("the Dovecot IMAP server at {addr}: no {step} within {after:?}{hint}")]
    Timeout {
        addr: String,
        step: &'static str,
        after: Duration,
        hint: &'static str,
    },
    #[error(
        "TLS with the Dovecot IMAP server at {addr} failed (its certificate is checked against {trust} and the name {server_name}){hint}"
    )]
    Tls {
        addr: String,
        server_name: String,
        trust: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the server at {addr} did not greet as an IMAP server: {reason}")]
    Greeting { addr: String, reason: String },
    #[error("IMAP {step} with {addr}")]
    Imap {
        addr: String,
        step: &'static str,
        #[source]
        source: async_imap::error::Error,
    },
    #[error(
        "the Dovecot IMAP server at {addr} does not offer STARTTLS: turn TLS on in Dovecot (ssl = yes or required), use --dovecot-imap-tls implicit for an IMAPS port, or --dovecot-imap-tls none to send the master password in clear"
    )]
    NoStartTls { addr: String },
    #[error("the Dovecot IMAP server at {addr} refuses LOGIN on this connection (LOGINDISABLED){hint}")]
    LoginDisabled { addr: String, hint: &'static str },
}

/// The stream under the IMAP client: TCP, or TLS over TCP.
#[derive(Debug)]
pub enum ImapStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ImapStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ImapStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ImapStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ImapStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type Client = async_imap::Client<ImapStream>;

impl Transport {
    /// A client ready for LOGIN: connected, TLS set up as configured, greeted, and
    /// checked to accept LOGIN.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let tcp = self
            .step("TCP connection", "", TcpStream::connect(&self.addr))
            .await?
            .map_err(|source| ConnectError::Tcp {
                addr: self.addr.clone(),
                source,
            })?;
        let (mut client, greeting) = match &self.security {
            Security::Implicit(tls) => {
                let stream = self.handshake(tls, tcp).await?;
                let mut client = Client::new(stream);
                let caps = self.greeting(&mut client).await?;
                (client, caps)
            }
            Security::StartTls(tls) => {
                let mut client = Client::new(ImapStream::Plain(tcp));
                let offered = match self.greeting(&mut client).await? {
                    Some(caps) => caps,
                    None => self.capabilities(&mut client).await?,
                };
                if !has(&offered, "STARTTLS") {
                    return Err(ConnectError::NoStartTls {
                        addr: self.addr.clone(),
                    });
                }
                self.step(
                    "answer to STARTTLS",
                    "",
                    client.run_command_and_check_ok("STARTTLS", None),
                )
                .await?
                .map_err(|source| self.imap("STARTTLS", source))?;
                // Whatever arrived after the tagged OK was sent before TLS and is dropped
                // with the client's read buffer; what the server said before is forgotten.
                let ImapStream::Plain(tcp) = client.into_inner() else {
                    return Err(ConnectError::Greeting {
                        addr: self.addr.clone(),
                        reason: "STARTTLS on a TLS connection".into(),
                    });
                };
                (Client::new(self.handshake(tls, tcp).await?), None)
            }
            Security::Plaintext => {
                let mut client = Client::new(ImapStream::Plain(tcp));
                let caps = self.greeting(&mut client).await?;
                (client, caps)
            }
        };
        let caps = match greeting {
            Some(caps) => caps,
            None => self.capabilities(&mut client).await?,
        };
        if has(&caps, "LOGINDISABLED") {
            let hint = match self.security {
                Security::Plaintext => {
                    ": Dovecot takes a password in clear only with disable_plaintext_auth = no and ssl not required; use TLS (--dovecot-imap-tls starttls or implicit) instead"
                }
                _ => "",
            };
            return Err(ConnectError::LoginDisabled {
                addr: self.addr.clone(),
                hint,
            });
        }
        Ok(client)
    }

    async fn step<F: std::future::Future>(
        &self,
        step: &'static str,
        hint: &'static str,
        future: F,
    ) -> Result<F::Output, ConnectError> {
        tokio::time::timeout(self.timeout, future)
            .await
            .map_err(|_| ConnectError::Timeout {
                addr: self.addr.clone(),
                step,
                after: self.timeout,
                hint,
            })
    }

    fn imap(&self, step: &'static str, source: async_imap::error::Error) -> ConnectError {
        ConnectError::Imap {
            addr: self.addr.clone(),
            step,
            source,
        }
    }

    async fn handshake(&self, tls: &TlsClient, tcp: TcpStream) -> Result<ImapStream, ConnectError> {
        let stream = self
            .step("TLS handshake", "", tls.connector.connect(tls.server_name.clone(), tcp))
            .await?
            .map_err(|source| {
                // A plain IMAP port answers a ClientHello with its greeting: no TLS record.
                let not_tls = source
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>())
                    .is_some_and(|e| matches!(e, rustls::Error::InvalidMessage(_)));
                let hint = match self.security {
                    Security::Implicit(_) if not_tls => " (a plain IMAP port needs --dovecot-imap-tls starttls)",
                    _ => "",
                };
                ConnectError::Tls {
                    addr: self.addr.clone(),
                    server_name: tls.server_name(),
                    trust: tls.trust.clone(),
                    hint,
                    source,
                }
            })?;
        Ok(ImapStream::Tls(Box::new(stream)))
    }

    /// Reads the greeting; returns the capabilities it names, if any.
    async fn greeting(&self, client: &mut Client) -> Result<Option<Vec<String>>, ConnectError> {
        // An IMAPS port spoken to in plain waits for a ClientHello and says nothing.
        let hint = match self.security {
            Security::Implicit(_) => "",
            _ => " (an IMAPS port needs --dovecot-imap-tls implicit)",
        };
        let greeting = self
            .step("greeting", hint, client.read_response())
            .await?
            .map_err(|source| self.imap("greeting", source.into()))?;
        let Some(greeting) = greeting else {
            return Err(ConnectError::Greeting {
                addr: self.addr.clone(),
                reason: "it closed the connection".into(),
            });
        };
        match greeting.parsed() {
            Response::Data {
                status: Status::Ok,
                outcome,
            } => Ok(match &outcome.code {
                Some(ResponseCode::Capabilities(caps)) => Some(caps.iter().map(capability).collect()),
                _ => None,
            }),
            Response::Data { status, outcome } => Err(ConnectError::Greeting {
                addr: self.addr.clone(),
                reason: format!("{status:?} {}", outcome.information.as_deref().unwrap_or_default()),
            }),
            _ => Err(ConnectError::Greeting {
                addr: self.addr.clone(),
                reason: "an unexpected first response".into(),
            }),
        }
    }

    /// Asks for CAPABILITY. async-imap offers the command on a logged-in session only,
    /// so it is written here and the answers read through the client.
    async fn capabilities(&self, client: &mut Client) -> Result<Vec<String>, ConnectError> {
        const TAG: &str = "mhcap";
        let exchange = async {
            let stream = client.get_mut();
            stream.write_all(format!("{TAG} CAPABILITY\r\n").as_bytes()).await?;
            stream.flush().await?;
            let mut caps = Vec::new();
            loop {
                let Some(response) = client.read_response().await? else {
                    return Err(async_imap::error::Error::ConnectionLost);
                };
                match response.parsed() {
                    Response::Capabilities(list) => caps.extend(list.iter().map(capability)),
                    Response::Done { tag, status, .. } if tag.0 == TAG => {
                        return match status {
                            Status::Ok => Ok(caps),
                            other => Err(async_imap::error::Error::Bad(format!("{other:?}"))),
                        };
                    }
                    _ => {}
                }
            }
        };
        self.step("answer to CAPABILITY", "", exchange)
            .await?
            .map_err(|source| self.imap("CAPABILITY", source))
    }
}

fn capability(c: &Capability<'_>) -> String {
    match c {
        Capability::Imap4rev1 => "IMAP4REV1".into(),
        Capability::Auth(mechanism) => format!("AUTH={}", mechanism.to_ascii_uppercase()),
        Capability::Atom(atom) => atom.to_ascii_uppercase(),
    }
}

fn has(caps: &[String], name: &str) -> bool {
    caps.iter().any(|c| c == name)
}

#[cfg(test)]
mod tests;
