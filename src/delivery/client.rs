//! The HTTP clients of subscriptions: trust (system roots plus a subscription's CA bundle),
//! the client certificate for mutual TLS, and the egress guard's resolver, shared by
//! every subscription with the same TLS settings; extra headers checked. Redirects are never followed (a 3xx is a failure) and proxies from
//! the environment are ignored (a proxy would hide the address actually reached).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::egress::{EgressPolicy, GuardedResolver};

/// Headers a subscription cannot set: the signature headers, and those that would change
/// how the request is framed or routed.
const RESERVED: [&str; 9] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "user-agent",
];

/// The TLS side of one subscription's client, and its extra headers.
pub struct ClientSettings<'a> {
    pub headers: &'a [(String, String)],
    /// PEM CA certificates trusted in addition to the system's roots.
    pub ca_bundle: Option<&'a str>,
    /// PEM certificate chain followed by its private key, for mutual TLS.
    pub identity: Option<&'a [u8]>,
    /// Accept any server certificate (`endpoint.insecureSkipTLSVerify`).
    pub insecure_skip_verify: bool,
}

/// Why a subscription's client cannot be made; each names the field to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Header(String),
    // The cause is said in the message (it becomes a condition's message) and kept as
    // the source.
    #[error("endpoint.caBundle cannot be read as PEM certificates: {0}")]
    CaBundle(#[source] std::sync::Arc<reqwest::Error>),
    #[error("the client certificate (endpoint.clientCertSecretRef) cannot be used: {0}")]
    Identity(#[source] std::sync::Arc<reqwest::Error>),
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] std::sync::Arc<reqwest::Error>),
}

/// Checks an extra header: a valid name that mailhook does not set itself, and a value
/// without control characters (no CR/LF header injection).
pub fn check_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!("header {name} is set by mailhook and cannot be overridden"));
    }
    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!(
            "the value of header {name} contains a control character (such as a line break); remove it"
        ));
    }
    let mut value = HeaderValue::from_str(value).map_err(|_| format!("the value of header {name} is not valid"))?;
    value.set_sensitive(true);
    Ok((header, value))
}

/// The headers a subscription adds to every request.
pub fn headers(headers: &[(String, String)]) -> Result<HeaderMap, ClientError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let (name, value) = check_header(name, value).map_err(ClientError::Header)?;
        map.insert(name, value);
    }
    Ok(map)
}

/// What makes two subscriptions' clients differ. Holds key material: no Debug.
#[derive(PartialEq, Eq, Hash)]
struct TlsKey {
    ca_bundle: Option<String>,
    identity: Option<Vec<u8>>,
    insecure_skip_verify: bool,
}

/// The HTTP clients of every subscription, one per distinct TLS setting. A client holds
/// the system's root certificates and a connection pool: a thousand subscriptions with
/// the default trust share one, instead of a thousand copies of both. Timeouts and extra
/// headers are set per request.
pub struct Clients {
    egress: Arc<EgressPolicy>,
    pool: parking_lot::Mutex<HashMap<TlsKey, Weak<reqwest::Client>>>,
}

impl Clients {
    pub fn new(egress: Arc<EgressPolicy>) -> Clients {
        Clients {
            egress,
            pool: parking_lot::Mutex::default(),
        }
    }

    /// The client for these settings (shared with every subscription that has the same
    /// TLS settings), and the checked extra headers.
    pub fn get(&self, settings: &ClientSettings<'_>) -> Result<(Arc<reqwest::Client>, HeaderMap), ClientError> {
        let headers = headers(settings.headers)?;
        let key = TlsKey {
            ca_bundle: settings.ca_bundle.map(str::to_string),
            identity: settings.identity.map(<[u8]>::to_vec),
            insecure_skip_verify: settings.insecure_skip_verify,
        };
        let mut pool = self.pool.lock();
        if let Some(client) = pool.get(&key).and_then(Weak::upgrade) {
            return Ok((client, headers));
        }
        // Clients no subscription holds any more go, so the pool does not grow with edits.
        pool.retain(|_, c| c.strong_count() > 0);
        let client = Arc::new(build(settings, self.egress.clone())?);
        pool.insert(key, Arc::downgrade(&client));
        Ok((client, headers))
    }

    /// How many distinct clients are in use.
    pub fn len(&self) -> usize {
        self.pool.lock().values().filter(|c| c.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Connecting may take at most this long (the request's own timeout may be shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn build(settings: &ClientSettings<'_>, egress: Arc<EgressPolicy>) -> Result<reqwest::Client, ClientError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(GuardedResolver(egress))
        .user_agent(concat!("mailhook/", env!("CARGO_PKG_VERSION")))
        .tls_version_min(reqwest::tls::Version::TLS_1_2);
    if let Some(pem) = settings.ca_bundle {
        let certs =
            reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| ClientError::CaBundle(e.into()))?;
        builder = builder.tls_certs_merge(certs);
    }
    if let Some(pem) = settings.identity {
        let identity = reqwest::Identity::from_pem(pem).map_err(|e| ClientError::Identity(e.into()))?;
        builder = builder.identity(identity);
    }
    if settings.insecure_skip_verify {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder.build().map_err(|e| ClientError::Build(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard sits in the connection path: a host name resolving to loopback is refused
    /// when the client connects (nothing reaches the listener), and allowed by name it is
    /// connected to. A real socket counts the connections.
    #[tokio::test]
    async fn the_egress_guard_decides_at_connect_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // main() installs the process's crypto provider; a test process has to itself.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        let client = |egress: EgressPolicy| {
            let settings = ClientSettings {
                headers: &[],
                ca_bundle: None,
                identity: None,
                insecure_skip_verify: false,
            };
            build(&settings, Arc::new(egress)).expect("client")
        };
        let url = format!("http://localhost:{port}/hooks");
        let err = client(EgressPolicy::default())
            .post(&url)
            .send()
            .await
            .expect_err("refused");
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert!(chain.contains("the egress policy refuses localhost"), "{chain}");
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing reached the listener");

        let allowed = EgressPolicy {
            allow_hosts: vec!["localhost".into()],
            ..Default::default()
        };
        let _ = client(allowed).post(&url).send().await;
        assert!(accepted.load(Ordering::SeqCst) >= 1, "allowed by name: connected");
    }

    #[test]
    fn headers_cannot_inject_or_override() {
        assert!(check_header("X-Api-Key", "abc").is_ok());
        for (name, value) in [
            ("Webhook-Signature", "v1,forged"),
            ("Host", "evil.example"),
            ("Content-Length", "0"),
            ("X-Api-Key", "abc\r\nX-Injected: 1"),
            ("X-Api-Key", "abc\ndef"),
            ("Bad Name", "x"),
        ] {
            assert!(check_header(name, value).is_err(), "{name}: {value:?}");
        }
    }

    #[test]
    fn subscriptions_with_the_same_tls_settings_share_one_client() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let clients = Clients::new(Arc::new(EgressPolicy::default()));
        let plain = |headers: &'static [(String, String)]| ClientSettings {
            headers,
            ca_bundle: None,
            identity: None,
            insecure_skip_verify: false,
        };
        let (a, _) = clients.get(&plain(&[])).expect("client");
        let (b, _) = clients.get(&plain(&[])).expect("client");
        assert!(Arc::ptr_eq(&a, &b), "same settings, one client");
        let mut insecure = plain(&[]);
        insecure.insecure_skip_verify = true;
        let (c, _) = clients.get(&insecure).expect("client");
        assert!(!Arc::ptr_eq(&a, &c), "other TLS settings, another client");
        assert_eq!(clients.len(), 2);
        drop(c);
        assert_eq!(clients.len(), 1, "a client nobody holds is gone");
        let bad = clients.get(&ClientSettings {
            ca_bundle: Some("-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n"),
            ..plain(&[])
        });
        assert!(matches!(bad, Err(ClientError::CaBundle(_))), "{:?}", bad.err());
    }
}
