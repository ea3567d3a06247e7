//! The HTTP client of one subscription: its timeout, extra headers and CA bundle;
//! redirects are never followed (a 3xx is a failure).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Headers a subscription cannot override.
const RESERVED: [&str; 4] = ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type"];

pub fn build(
    timeout: Duration,
    headers: &[(String, String)],
    ca_bundle: Option<&str>,
) -> Result<reqwest::Client, String> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(format!("header {name} is set by mailhook and cannot be overridden"));
        }
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
        let mut value = HeaderValue::from_str(value).map_err(|_| format!("the value of header {name} is not valid"))?;
        value.set_sensitive(true);
        map.insert(name, value);
    }
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("mailhook/", env!("CARGO_PKG_VERSION")))
        .default_headers(map)
        .tls_version_min(reqwest::tls::Version::TLS_1_2);
    if let Some(pem) = ca_bundle {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("endpoint.caBundle cannot be read as PEM certificates: {e}"))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}
