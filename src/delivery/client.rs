//! The HTTP client of one subscription: timeout, extra headers, trust (system roots plus
//! the subscription's CA bundle), the client certificate for mutual TLS, and the egress
//! guard's resolver. Redirects are never followed (a 3xx is a failure) and proxies from
//! the environment are ignored (a proxy would hide the address actually reached).

use std::sync::Arc;
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

/// What one subscription's client is built from.
pub struct ClientSettings<'a> {
    pub timeout: Duration,
    pub headers: &'a [(String, String)],
    /// PEM CA certificates trusted in addition to the system's roots.
    pub ca_bundle: Option<&'a str>,
    /// PEM certificate chain followed by its private key, for mutual TLS.
    pub identity: Option<&'a [u8]>,
    /// Accept any server certificate (`endpoint.insecureSkipTLSVerify`).
    pub insecure_skip_verify: bool,
    pub egress: Arc<EgressPolicy>,
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

pub fn build(settings: ClientSettings<'_>) -> Result<reqwest::Client, String> {
    let mut map = HeaderMap::new();
    for (name, value) in settings.headers {
        let (name, value) = check_header(name, value)?;
        map.insert(name, value);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(GuardedResolver(settings.egress))
        .user_agent(concat!("mailhook/", env!("CARGO_PKG_VERSION")))
        .default_headers(map)
        .tls_version_min(reqwest::tls::Version::TLS_1_2);
    if let Some(pem) = settings.ca_bundle {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("endpoint.caBundle cannot be read as PEM certificates: {e}"))?;
        builder = builder.tls_certs_merge(certs);
    }
    if let Some(pem) = settings.identity {
        let identity = reqwest::Identity::from_pem(pem)
            .map_err(|e| format!("the client certificate (endpoint.clientCertSecretRef) cannot be used: {e}"))?;
        builder = builder.identity(identity);
    }
    if settings.insecure_skip_verify {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
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
            build(ClientSettings {
                timeout: Duration::from_secs(5),
                headers: &[],
                ca_bundle: None,
                identity: None,
                insecure_skip_verify: false,
                egress: Arc::new(egress),
            })
            .expect("client")
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
}
