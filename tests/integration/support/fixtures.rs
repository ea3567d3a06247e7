//! What several tests apply and send: the `signing` Secret, subscriptions to
//! message.received, the `siem` fixture and its events, self-signed certificates.

use super::{TestNamespace, apply};

/// A 32-byte signing key, as `whsec_` + base64: the key of the `siem` fixture and of most
/// test receivers.
pub const SIEM_SECRET: &str = "whsec_dGVzdC1zaWduaW5nLWtleS1mb3ItbWFpbGhvb2stMzI=";

/// The YAML of Secret `signing` holding `key` (a `whsec_` or `whsk_` key), ending in `---`.
pub fn signing_secret(key: &str) -> String {
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\nstringData: {{key: {key}}}\n---\n")
}

/// The YAML of WebhookSubscription `name`: message.received to `url` (plain http allowed),
/// signed with Secret `signing`, ending in `---`. `endpoint_extra` continues the endpoint's
/// flow mapping (e.g. `", verify: true"`); `spec_extra` holds further spec lines, indented
/// two spaces.
pub fn subscription(name: &str, url: &str, endpoint_extra: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: {name}}}\nspec:\n  \
         endpoint: {{url: '{url}', allowInsecureHttp: true{endpoint_extra}}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
         eventTypes: [message.received]\n{spec_extra}---\n"
    )
}

/// Applies Secret `signing` ([`SIEM_SECRET`]) and WebhookSubscription `siem`
/// (message.received to `url`); `spec_extra` holds further spec lines, indented two spaces.
pub fn apply_siem(ns: &TestNamespace, url: &str, spec_extra: &str) {
    apply(
        ns,
        &(signing_secret(SIEM_SECRET) + &subscription("siem", url, "", spec_extra)),
    );
}

/// An ingest event for the `siem` subscription, with producer id `id`.
pub fn siem_event(id: &str) -> serde_json::Value {
    serde_json::json!({"type": "message.received", "eventId": id, "mailbox": "alice@finance.example.com",
           "from": "x@partner.org", "to": ["alice@finance.example.com"], "subject": "s"})
}

/// Writes a self-signed P-256 certificate (valid one day) for `cn`, with `san` as its
/// subjectAltName (e.g. `IP:127.0.0.1`), and its key.
pub fn self_signed(cert: &std::path::Path, key: &std::path::Path, cn: &str, san: Option<&str>) {
    let mut command = std::process::Command::new("openssl");
    command
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", &format!("/CN={cn}")]);
    if let Some(san) = san {
        command.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let made = command
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}
