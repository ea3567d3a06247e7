//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`,
//! one per current key, space-separated, so receivers can roll keys over.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing secret: the decoded bytes of a `whsec_` key. Debug never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(pub Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({} bytes)", self.0.len())
    }
}

/// The `webhook-signature` header value for a delivery.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .filter_map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&key.0).ok()?;
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            Some(format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            ))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A keyed pseudonym for a value: stable for one key, useless without it.
pub fn pseudonym(key: &[u8], value: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(value.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector published with the Standard Webhooks specification.
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("base64");
        let sig = signature_header(
            &[SigningKey(key)],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_key_signs_space_separated() {
        let sig = signature_header(&[SigningKey(vec![1; 32]), SigningKey(vec![2; 32])], "id", 1, b"{}");
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn pseudonyms_are_stable_per_key() {
        assert_eq!(pseudonym(b"k1", "a@b.c"), pseudonym(b"k1", "a@b.c"));
        assert_ne!(pseudonym(b"k1", "a@b.c"), pseudonym(b"k2", "a@b.c"));
        assert_eq!(pseudonym(b"k1", "a@b.c").len(), 16);
    }
}
