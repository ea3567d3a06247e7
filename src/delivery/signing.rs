//! Standard Webhooks signatures, one per current key, space-separated so receivers can
//! roll keys over: `v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>` for `whsec_`
//! secrets and `v1a,<base64 ed25519(id.timestamp.body)>` for `whsk_` keys, whose public
//! half (`whpk_`) lets receivers verify without holding any secret.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::Sha256;

/// A signing key. Debug never shows secret bytes.
#[derive(Clone)]
pub enum SigningKey {
    /// The decoded bytes of a `whsec_` secret.
    Hmac(Vec<u8>),
    /// An ed25519 key pair from a `whsk_` key.
    Ed25519(Arc<Ed25519KeyPair>),
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SigningKey::Hmac(a), SigningKey::Hmac(b)) => a == b,
            (SigningKey::Ed25519(a), SigningKey::Ed25519(b)) => a.public_key().as_ref() == b.public_key().as_ref(),
            _ => false,
        }
    }
}

impl Eq for SigningKey {}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigningKey::Hmac(k) => write!(f, "SigningKey::Hmac({} bytes)", k.len()),
            SigningKey::Ed25519(_) => write!(f, "SigningKey::Ed25519({})", self.public_key().unwrap_or_default()),
        }
    }
}

impl SigningKey {
    /// Reads one value of a signing Secret: `whsec_<base64 of 24 to 64 bytes>` or
    /// `whsk_<base64 of a 32-byte ed25519 seed>` (a 64-byte seed + public key is taken too).
    pub fn parse(text: &str) -> Result<SigningKey, String> {
        let text = text.trim();
        if let Some(b64) = text.strip_prefix("whsec_") {
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| "the part after whsec_ is not valid base64".to_string())?;
            if !(24..=64).contains(&bytes.len()) {
                return Err(format!(
                    "decodes to {} bytes; use 24 to 64 random bytes (e.g. openssl rand -base64 32)",
                    bytes.len()
                ));
            }
            return Ok(SigningKey::Hmac(bytes));
        }
        if let Some(b64) = text.strip_prefix("whsk_") {
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| "the part after whsk_ is not valid base64".to_string())?;
            let pair = match bytes.len() {
                32 => Ed25519KeyPair::from_seed_unchecked(&bytes),
                64 => Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..]),
                n => {
                    return Err(format!(
                        "an ed25519 key (whsk_) decodes to 32 bytes, not {n}; make one with `mailhook keygen ed25519`"
                    ));
                }
            }
            .map_err(|_| "is not a valid ed25519 key".to_string())?;
            return Ok(SigningKey::Ed25519(Arc::new(pair)));
        }
        Err("is not a Standard Webhooks key: it must start with whsec_ (HMAC) or whsk_ (ed25519)".to_string())
    }

    /// The `whpk_` public key of an ed25519 key.
    pub fn public_key(&self) -> Option<String> {
        match self {
            SigningKey::Hmac(_) => None,
            SigningKey::Ed25519(pair) => Some(format!("whpk_{}", STANDARD.encode(pair.public_key().as_ref()))),
        }
    }

    fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> Option<String> {
        match self {
            SigningKey::Hmac(key) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(timestamp.as_bytes());
                mac.update(b".");
                mac.update(body);
                Some(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
            }
            SigningKey::Ed25519(pair) => {
                let mut content = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
                content.extend_from_slice(id.as_bytes());
                content.push(b'.');
                content.extend_from_slice(timestamp.as_bytes());
                content.push(b'.');
                content.extend_from_slice(body);
                Some(format!("v1a,{}", STANDARD.encode(pair.sign(&content).as_ref())))
            }
        }
    }
}

/// A new ed25519 signing key as `(whsk_…, whpk_…)`.
pub fn generate_ed25519() -> (String, String) {
    let seed = crate::crypto::random_bytes();
    let secret = format!("whsk_{}", STANDARD.encode(seed));
    let public = SigningKey::parse(&secret)
        .ok()
        .and_then(|k| k.public_key())
        .unwrap_or_default();
    (secret, public)
}

/// The `webhook-signature` header value for a delivery.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    keys.iter()
        .filter_map(|key| key.sign(id, &timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A keyed pseudonym for a value: stable for one key, useless without it.
pub fn pseudonym(key: &[u8], value: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(value.as_bytes());
    crate::crypto::hex(mac.finalize().into_bytes().get(..8).unwrap_or_default())
}

/// The operator-wide secret pseudonyms derive from: the file's bytes (at least 16), or,
/// without a file, a random one that changes on every restart.
pub fn pseudonym_secret(path: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| anyhow::anyhow!("cannot read --pseudonym-key-file {}: {e}", p.display()))?;
            if bytes.len() < 16 {
                anyhow::bail!(
                    "--pseudonym-key-file {} holds {} bytes; use at least 16 random bytes",
                    p.display(),
                    bytes.len()
                );
            }
            Ok(bytes)
        }
        None => {
            tracing::warn!("no --pseudonym-key-file: anonymized payloads use a random key that changes on restart");
            Ok(crate::crypto::random_bytes().to_vec())
        }
    }
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
            &[SigningKey::Hmac(key)],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn every_key_signs_space_separated() {
        let sig = signature_header(
            &[SigningKey::Hmac(vec![1; 32]), SigningKey::Hmac(vec![2; 32])],
            "id",
            1,
            b"{}",
        );
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        assert_ne!(parts[0], parts[1]);
    }

    /// RFC 8032 §7.1 test 1: the seed, its public key and the signature of the empty message
    /// pin that v1a signs with plain ed25519 over `id.timestamp.body`.
    #[test]
    fn ed25519_keys_sign_v1a_and_publish_their_public_key() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
                .collect()
        };
        let seed = hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let key = SigningKey::parse(&format!("whsk_{}", STANDARD.encode(&seed))).expect("key");
        let public = hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        assert_eq!(key.public_key(), Some(format!("whpk_{}", STANDARD.encode(&public))));
        let header = signature_header(std::slice::from_ref(&key), "msg_1", 1_700_000_000, b"{}");
        let sig = STANDARD
            .decode(header.strip_prefix("v1a,").expect("v1a"))
            .expect("base64");
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &public)
            .verify(b"msg_1.1700000000.{}", &sig)
            .expect("verifies with the public key alone");
        let mixed = signature_header(&[SigningKey::Hmac(vec![1; 32]), key], "msg_1", 1, b"{}");
        assert!(mixed.starts_with("v1,") && mixed.contains(" v1a,"), "{mixed}");
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        assert!(SigningKey::parse("whsk_AAAA").expect_err("short").contains("32 bytes"));
        assert!(SigningKey::parse("whsec_AAAA").expect_err("short").contains("24 to 64"));
        assert!(SigningKey::parse("secret").expect_err("prefix").contains("whsec_"));
        let (secret, public) = generate_ed25519();
        assert_eq!(
            SigningKey::parse(&secret).expect("generated").public_key(),
            Some(public)
        );
    }

    #[test]
    fn pseudonyms_are_stable_per_key() {
        assert_eq!(pseudonym(b"k1", "a@b.c"), pseudonym(b"k1", "a@b.c"));
        assert_ne!(pseudonym(b"k1", "a@b.c"), pseudonym(b"k2", "a@b.c"));
        assert_eq!(pseudonym(b"k1", "a@b.c").len(), 16);
    }
}
