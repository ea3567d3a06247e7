//! Payload encryption to a receiver's public key: JWE compact serialization with
//! `ECDH-ES+A256KW` key agreement and `A256GCM` content encryption (RFC 7516, RFC 7518).
//! Receivers publish an EC P-256 public JWK in a Secret; the operator only ever holds
//! public keys, so a leaked operator cannot read what it already sent.

use std::collections::BTreeMap;

use aes_kw::{KeyInit, KwAes256};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use serde_json::{Map, Value};

const ALG: &str = "ECDH-ES+A256KW";
const ENC: &str = "A256GCM";
/// A P-256 coordinate is always its full 32 bytes in a JWK (RFC 7518 §6.2.1.2).
const COORDINATE_LEN: usize = 32;

/// The receiver key payloads are encrypted to: the newest key of a Secret. Holds only
/// public material, so Debug may show it; it shows the key id.
#[derive(Clone)]
pub struct EncryptionKeys {
    kid: String,
    /// The uncompressed SEC1 point `04 || x || y`, as ring's ECDH takes it.
    point: Vec<u8>,
}

impl std::fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// Why a Secret's keys cannot be used; `at` names the Secret key (and the JWK Set entry).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the Secret has no keys; add a public JWK (kty EC, crv P-256) under a data key such as \"2026-01.jwk\"")]
    Empty,
    #[error("{at}: is not JSON; give a public JWK (kty EC, crv P-256) or a JWK Set {{\"keys\":[...]}}")]
    NotJson {
        at: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{at}: holds a private key (\"d\"); give only the public part (kty, crv, x, y): the operator must never hold the receiver's private key"
    )]
    PrivateKey { at: String },
    #[error("{at}: kty \"{kty}\" is not supported; give an EC P-256 public key (kty EC, crv P-256)")]
    UnsupportedKeyType { at: String, kty: String },
    #[error("{at}: crv \"{crv}\" is not supported; give an EC P-256 public key (kty EC, crv P-256)")]
    UnsupportedCurve { at: String, crv: String },
    #[error("{at}: {problem}")]
    Malformed { at: String, problem: &'static str },
    #[error("{at}: \"{coordinate}\" is not base64url without padding; copy it unchanged from the JWK")]
    BadBase64 {
        at: String,
        coordinate: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{at}: \"{coordinate}\" decodes to {len} bytes; a P-256 coordinate is {COORDINATE_LEN} bytes")]
    BadCoordinateLength {
        at: String,
        coordinate: &'static str,
        len: usize,
    },
    #[error("{at}: the point (x, y) is not on the P-256 curve; check that x and y come from the same key")]
    NotOnCurve { at: String },
}

/// Encryption failed: only the system's random source or a cryptographic step can fail.
/// ring's errors carry no detail (deliberately), so the step that failed is the message.
#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    #[error("payload encryption failed: {0}")]
    Crypto(&'static str),
    #[error("payload encryption failed: wrapping the content key")]
    KeyWrap(#[source] aes_kw::Error),
}

impl EncryptionKeys {
    /// Reads a Secret's data: every value a public JWK or a JWK Set. Every key is checked,
    /// so a bad or private key is refused even when it is not the one that encrypts; the
    /// value whose data key sorts last is the newest (in a JWK Set: its last key).
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<EncryptionKeys, KeyError> {
        let mut newest = None;
        for (name, bytes) in data {
            let at = format!("key {name:?}");
            let value: Value =
                serde_json::from_slice(bytes).map_err(|source| KeyError::NotJson { at: at.clone(), source })?;
            let Value::Object(object) = value else {
                return Err(malformed(
                    at,
                    "is not a JSON object; give a public JWK or a JWK Set {\"keys\":[...]}",
                ));
            };
            match object.get("keys") {
                Some(Value::Array(keys)) if !keys.is_empty() => {
                    for (i, key) in keys.iter().enumerate() {
                        let at = format!("{at}, keys[{i}]");
                        let Value::Object(jwk) = key else {
                            return Err(malformed(at, "is not a JSON object; give a public JWK"));
                        };
                        newest = Some(parse_jwk(at, jwk)?);
                    }
                }
                Some(_) => return Err(malformed(at, "\"keys\" is not a non-empty array of JWKs")),
                None => newest = Some(parse_jwk(at, &object)?),
            }
        }
        newest.ok_or(KeyError::Empty)
    }

    /// The `kid` every JWE names, so receivers know which private key to use.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// `plaintext` as a JWE compact serialization to the receiver's key.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<String, EncryptError> {
        let rng = SystemRandom::new();
        let crypto = |step| move |_: ring::error::Unspecified| EncryptError::Crypto(step);

        // ECDH-ES: a fresh key pair per message, so only the receiver's private key can
        // derive the key-encryption key again.
        let ephemeral =
            EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(crypto("generating the ephemeral key"))?;
        let epk = ephemeral
            .compute_public_key()
            .map_err(crypto("computing the ephemeral public key"))?;
        let receiver = UnparsedPublicKey::new(&ECDH_P256, &self.point);
        // PartyUInfo and PartyVInfo stay empty: no "apu"/"apv" in the header.
        let kek = agree_ephemeral(ephemeral, &receiver, |z| concat_kdf(z, ALG, b"", b"", 256))
            .map_err(crypto("agreeing on the key-encryption key"))?;

        let mut cek = [0u8; 32];
        rng.fill(&mut cek).map_err(crypto("drawing the content key"))?;
        let mut wrapped = [0u8; 40];
        let wrapped = KwAes256::new(&kek.into())
            .wrap_key(&cek, &mut wrapped)
            .map_err(EncryptError::KeyWrap)?;

        let (x, y) = split_point(epk.as_ref()).ok_or(EncryptError::Crypto("reading the ephemeral public key"))?;
        let header = Header {
            alg: ALG,
            enc: ENC,
            kid: &self.kid,
            cty: "json",
            epk: Epk {
                kty: "EC",
                crv: "P-256",
                x: &URL_SAFE_NO_PAD.encode(x),
                y: &URL_SAFE_NO_PAD.encode(y),
            },
        };
        let header = serde_json::to_vec(&header).map_err(|_| EncryptError::Crypto("serializing the header"))?;
        let header = URL_SAFE_NO_PAD.encode(header);

        let mut iv = [0u8; NONCE_LEN];
        rng.fill(&mut iv).map_err(crypto("drawing the IV"))?;
        let key = UnboundKey::new(&AES_256_GCM, &cek).map_err(crypto("loading the content key"))?;
        let mut ciphertext = plaintext.to_vec();
        // The AAD is the encoded protected header, which binds kid and epk to the ciphertext.
        let tag = LessSafeKey::new(key)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(header.as_bytes()),
                &mut ciphertext,
            )
            .map_err(crypto("encrypting the content"))?;

        Ok([
            header.as_str(),
            &URL_SAFE_NO_PAD.encode(wrapped),
            &URL_SAFE_NO_PAD.encode(iv),
            &URL_SAFE_NO_PAD.encode(&ciphertext),
            &URL_SAFE_NO_PAD.encode(tag.as_ref()),
        ]
        .join("."))
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    enc: &'a str,
    kid: &'a str,
    cty: &'a str,
    epk: Epk<'a>,
}

#[derive(Serialize)]
struct Epk<'a> {
    kty: &'a str,
    crv: &'a str,
    x: &'a str,
    y: &'a str,
}

fn malformed(at: String, problem: &'static str) -> KeyError {
    KeyError::Malformed { at, problem }
}

/// One public JWK, checked down to the point being on the curve.
fn parse_jwk(at: String, jwk: &Map<String, Value>) -> Result<EncryptionKeys, KeyError> {
    // Checked first and never read: its value must not reach an error message or a log.
    if jwk.contains_key("d") {
        return Err(KeyError::PrivateKey { at });
    }
    let text = |name| jwk.get(name).and_then(Value::as_str);
    match text("kty") {
        Some("EC") => {}
        Some(kty) => {
            return Err(KeyError::UnsupportedKeyType {
                kty: kty.to_string(),
                at,
            });
        }
        None => {
            return Err(malformed(
                at,
                "has no \"kty\"; give an EC P-256 public key (kty EC, crv P-256)",
            ));
        }
    }
    match text("crv") {
        Some("P-256") => {}
        Some(crv) => {
            return Err(KeyError::UnsupportedCurve {
                crv: crv.to_string(),
                at,
            });
        }
        None => {
            return Err(malformed(
                at,
                "has no \"crv\"; give an EC P-256 public key (kty EC, crv P-256)",
            ));
        }
    }
    let coordinate = |name: &'static str| -> Result<Vec<u8>, KeyError> {
        let Some(encoded) = text(name) else {
            return Err(malformed(at.clone(), "lacks \"x\" or \"y\"; give the whole public JWK"));
        };
        let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|source| KeyError::BadBase64 {
            at: at.clone(),
            coordinate: name,
            source,
        })?;
        if bytes.len() != COORDINATE_LEN {
            return Err(KeyError::BadCoordinateLength {
                at: at.clone(),
                coordinate: name,
                len: bytes.len(),
            });
        }
        Ok(bytes)
    };
    let (x, y) = (coordinate("x")?, coordinate("y")?);
    let kid = match jwk.get("kid") {
        None => thumbprint(&x, &y),
        Some(Value::String(kid)) if !kid.is_empty() => kid.clone(),
        Some(_) => {
            return Err(malformed(
                at,
                "\"kid\" is not a non-empty string; fix it or leave it out",
            ));
        }
    };

    let mut point = Vec::with_capacity(1 + 2 * COORDINATE_LEN);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // ring checks the peer's point only when agreeing: one trial agreement here turns a
    // bad key into a configuration error instead of every delivery failing.
    let trial = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new())
        .and_then(|mine| agree_ephemeral(mine, &UnparsedPublicKey::new(&ECDH_P256, &point), |_| ()));
    if trial.is_err() {
        return Err(KeyError::NotOnCurve { at });
    }
    Ok(EncryptionKeys { kid, point })
}

/// The RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order,
/// without whitespace, base64url.
fn thumbprint(x: &[u8], y: &[u8]) -> String {
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(x),
        URL_SAFE_NO_PAD.encode(y)
    );
    URL_SAFE_NO_PAD.encode(digest(&SHA256, canonical.as_bytes()))
}

/// The Concat KDF of NIST SP 800-56A as RFC 7518 §4.6.2 uses it. One SHA-256 round gives
/// the 256 bits any JWE key needs; shorter keys take the leading bytes.
fn concat_kdf(z: &[u8], algorithm: &str, party_u: &[u8], party_v: &[u8], key_bits: u32) -> [u8; 32] {
    let mut input = Vec::with_capacity(4 + z.len() + 12 + algorithm.len() + party_u.len() + party_v.len() + 4);
    input.extend_from_slice(&1u32.to_be_bytes()); // round counter
    input.extend_from_slice(z);
    // AlgorithmID, PartyUInfo and PartyVInfo are each prefixed with their 32-bit length.
    for field in [algorithm.as_bytes(), party_u, party_v] {
        input.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
        input.extend_from_slice(field);
    }
    input.extend_from_slice(&key_bits.to_be_bytes()); // SuppPubInfo
    let mut key = [0u8; 32];
    key.copy_from_slice(digest(&SHA256, &input).as_ref());
    key
}

/// The coordinates of an uncompressed SEC1 point `04 || x || y`.
fn split_point(point: &[u8]) -> Option<(&[u8], &[u8])> {
    match point {
        [0x04, rest @ ..] if rest.len() == 2 * COORDINATE_LEN => Some(rest.split_at(COORDINATE_LEN)),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn unb64(text: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(text).expect("base64url")
    }

    /// A receiver whose private key lives only in ring (single use: one message) and its
    /// public JWK.
    fn receiver(kid: Option<&str>) -> (EphemeralPrivateKey, Value) {
        let private = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new()).expect("key");
        let public = private.compute_public_key().expect("public key");
        let (x, y) = split_point(public.as_ref()).expect("uncompressed point");
        let mut jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y)});
        if let Some(kid) = kid {
            jwk["kid"] = kid.into();
        }
        (private, jwk)
    }

    /// A receiver's single-use private key and the keys that encrypt to it.
    pub(crate) fn receiver_keys() -> (EphemeralPrivateKey, EncryptionKeys) {
        let (private, jwk) = receiver(Some("receiver"));
        let keys = EncryptionKeys::from_secret_data(&secret(&[("2026-12.jwk", &jwk)])).expect("keys");
        (private, keys)
    }

    fn secret(entries: &[(&str, &Value)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(name, value)| (name.to_string(), serde_json::to_vec(value).expect("json")))
            .collect()
    }

    fn refusal(entries: &[(&str, &Value)]) -> String {
        EncryptionKeys::from_secret_data(&secret(entries))
            .expect_err("refused")
            .to_string()
    }

    /// The receiver's side of RFC 7516 §5.2, written independently of `encrypt`.
    pub(crate) fn decrypt(receiver: EphemeralPrivateKey, jwe: &str) -> Result<(Value, Vec<u8>), &'static str> {
        let parts: Vec<&str> = jwe.split('.').collect();
        let [header_b64, wrapped, iv, ciphertext, tag] = parts[..] else {
            return Err("not five parts");
        };
        let header: Value = serde_json::from_slice(&unb64(header_b64)).map_err(|_| "header")?;
        let epk = [0x04]
            .into_iter()
            .chain(unb64(header["epk"]["x"].as_str().ok_or("x")?))
            .chain(unb64(header["epk"]["y"].as_str().ok_or("y")?))
            .collect::<Vec<u8>>();
        let kek = agree_ephemeral(receiver, &UnparsedPublicKey::new(&ECDH_P256, &epk), |z| {
            concat_kdf(z, ALG, b"", b"", 256)
        })
        .map_err(|_| "agreement")?;
        let mut cek = [0u8; 32];
        KwAes256::new(&kek.into())
            .unwrap_key(&unb64(wrapped), &mut cek)
            .map_err(|_| "unwrap")?;
        let mut sealed = [unb64(ciphertext), unb64(tag)].concat();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek).map_err(|_| "cek")?);
        let nonce = Nonce::try_assume_unique_for_key(&unb64(iv)).map_err(|_| "iv")?;
        let plaintext = key
            .open_in_place(nonce, Aad::from(header_b64.as_bytes()), &mut sealed)
            .map_err(|_| "authentication")?;
        Ok((header, plaintext.to_vec()))
    }

    #[test]
    fn round_trips_to_the_receivers_private_key() {
        let (private, jwk) = receiver(Some("receiver-2026"));
        let keys = EncryptionKeys::from_secret_data(&secret(&[("2026-01.jwk", &jwk)])).expect("keys");
        let plaintext = br#"{"type":"message.received","data":{"subject":"caf\u00e9"}}"#;
        let jwe = keys.encrypt(plaintext).expect("encrypt");

        let (header, decrypted) = decrypt(private, &jwe).expect("decrypt");
        assert_eq!(decrypted, plaintext);
        assert_eq!(header["alg"], "ECDH-ES+A256KW");
        assert_eq!(header["enc"], "A256GCM");
        assert_eq!(header["kid"], "receiver-2026");
        assert_eq!(header["cty"], "json");
        assert_eq!(header["epk"]["kty"], "EC");
        assert_eq!(header["epk"]["crv"], "P-256");
        assert_eq!(
            header.as_object().map(Map::len),
            Some(5),
            "no other header members: {header}"
        );
        // The encrypted key wraps 32 bytes (40 with the RFC 3394 check block); the IV is 96 bits.
        let parts: Vec<&str> = jwe.split('.').collect();
        assert_eq!(unb64(parts[1]).len(), 40);
        assert_eq!(unb64(parts[2]).len(), 12);
        assert!(!jwe.contains('='), "no padding: {jwe}");
    }

    #[test]
    fn a_changed_header_fails_authentication() {
        let (private, jwk) = receiver(Some("k"));
        let keys = EncryptionKeys::from_secret_data(&secret(&[("k.jwk", &jwk)])).expect("keys");
        let jwe = keys.encrypt(b"{}").expect("encrypt");
        let (header_b64, rest) = jwe.split_once('.').expect("compact");
        let mut header: Value = serde_json::from_slice(&unb64(header_b64)).expect("header");
        header["kid"] = "other".into();
        let tampered = format!("{}.{rest}", b64(&serde_json::to_vec(&header).expect("json")));
        assert_eq!(decrypt(private, &tampered).map(|_| ()), Err("authentication"));
    }

    #[test]
    fn every_message_has_its_own_ephemeral_key_and_iv() {
        let (_, jwk) = receiver(None);
        let keys = EncryptionKeys::from_secret_data(&secret(&[("k.jwk", &jwk)])).expect("keys");
        let a = keys.encrypt(b"same").expect("encrypt");
        let b = keys.encrypt(b"same").expect("encrypt");
        let part = |jwe: &str, i: usize| jwe.split('.').nth(i).map(str::to_string);
        assert_ne!(part(&a, 0), part(&b, 0), "epk is in the header");
        assert_ne!(part(&a, 2), part(&b, 2));
    }

    /// RFC 7518 Appendix C: the shared secret Z of its ECDH-ES example and the key derived
    /// from it (AlgorithmID "A128GCM", PartyUInfo "Alice", PartyVInfo "Bob", 128 bits).
    #[test]
    fn concat_kdf_matches_rfc_7518_appendix_c() {
        let z = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49, 110, 163, 218, 128,
            106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let key = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(b64(key.get(..16).expect("16 bytes")), "VqqN6vgjbSBcIijNcacQGg");
    }

    /// RFC 7638 thumbprint of the P-256 key of RFC 7515 Appendix A.3: the canonical JSON is
    /// built by hand, and the digest was also computed by jwcrypto (`JWK.thumbprint()`).
    #[test]
    fn kid_defaults_to_the_rfc_7638_thumbprint() {
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let expected = b64(digest(&SHA256, canonical.as_bytes()).as_ref());
        assert_eq!(expected, "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U");

        // Member order and extra members of the stored JWK do not change the thumbprint.
        let jwk = serde_json::json!({"y": y, "use": "enc", "x": x, "crv": "P-256", "kty": "EC"});
        let keys = EncryptionKeys::from_secret_data(&secret(&[("a.jwk", &jwk)])).expect("keys");
        assert_eq!(keys.key_id(), expected);
    }

    #[test]
    fn the_newest_data_key_encrypts() {
        let (_, older) = receiver(Some("older"));
        let (_, newer) = receiver(Some("newer"));
        // Inserted newest first: the data key's sort order decides, not insertion order.
        let data = secret(&[("2026-12.jwk", &newer), ("2026-01.jwk", &older)]);
        let keys = EncryptionKeys::from_secret_data(&data).expect("keys");
        assert_eq!(keys.key_id(), "newer");
        assert_eq!(format!("{keys:?}"), r#"EncryptionKeys { kid: "newer", .. }"#);
    }

    #[test]
    fn the_last_key_of_a_jwk_set_encrypts() {
        let (_, first) = receiver(Some("first"));
        let (_, last) = receiver(Some("last"));
        let set = serde_json::json!({"keys": [first, last]});
        let keys = EncryptionKeys::from_secret_data(&secret(&[("keys.jwks", &set)])).expect("keys");
        assert_eq!(keys.key_id(), "last");
    }

    #[test]
    fn refuses_private_keys_wherever_they_are() {
        let (_, mut jwk) = receiver(Some("k"));
        jwk["d"] = "c2VjcmV0LXNjYWxhci1uZXZlci1wcmludGVk".into();
        let message = refusal(&[("2026-01.jwk", &jwk)]);
        assert!(
            message.starts_with(r#"key "2026-01.jwk": holds a private key ("d")"#),
            "{message}"
        );
        assert!(
            !message.contains("c2VjcmV0"),
            "the private value is never shown: {message}"
        );

        // In an older entry or inside a JWK Set too, not only in the key that encrypts.
        let (_, public) = receiver(None);
        let set = serde_json::json!({"keys": [jwk, public]});
        let message = refusal(&[("a.jwks", &set), ("b.jwk", &public)]);
        assert!(
            message.starts_with(r#"key "a.jwks", keys[0]: holds a private key"#),
            "{message}"
        );
    }

    #[test]
    fn refuses_keys_it_cannot_use() {
        let rsa = serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"});
        assert_eq!(
            refusal(&[("2026-12.jwk", &rsa)]),
            r#"key "2026-12.jwk": kty "RSA" is not supported; give an EC P-256 public key (kty EC, crv P-256)"#
        );

        let (_, mut p384) = receiver(None);
        p384["crv"] = "P-384".into();
        assert!(refusal(&[("k", &p384)]).contains(r#"crv "P-384" is not supported"#));

        let (_, mut padded) = receiver(None);
        padded["x"] = format!("{}=", padded["x"].as_str().expect("x")).into();
        assert!(refusal(&[("k", &padded)]).contains(r#""x" is not base64url without padding"#));

        let (_, mut short) = receiver(None);
        short["y"] = b64(&[7; 31]).into();
        assert!(refusal(&[("k", &short)]).contains(r#""y" decodes to 31 bytes"#));

        let (_, mut off_curve) = receiver(None);
        off_curve["y"] = b64(&[7; 32]).into();
        assert!(refusal(&[("k", &off_curve)]).contains("is not on the P-256 curve"));

        let (_, mut no_x) = receiver(None);
        no_x.as_object_mut().expect("object").remove("x");
        assert!(refusal(&[("k", &no_x)]).contains(r#"lacks "x" or "y""#));

        let empty_set = serde_json::json!({"keys": []});
        assert!(refusal(&[("k", &empty_set)]).contains(r#""keys" is not a non-empty array"#));

        let not_json = BTreeMap::from([("k".to_string(), b"-----BEGIN PUBLIC KEY-----".to_vec())]);
        let error = EncryptionKeys::from_secret_data(&not_json).expect_err("refused");
        assert!(error.to_string().starts_with(r#"key "k": is not JSON"#), "{error}");
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn an_empty_secret_asks_for_a_key() {
        let error = EncryptionKeys::from_secret_data(&BTreeMap::new()).expect_err("refused");
        assert!(error.to_string().contains("add a public JWK"), "{error}");
    }

    #[test]
    fn keys_are_shareable_across_shards() {
        fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
        assert_send_sync_clone::<EncryptionKeys>();
    }
}
