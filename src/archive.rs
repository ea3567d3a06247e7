//! Links to archived raw messages: time-limited and signed,
//! `{base}/v1/raw-messages/{sha256}?subscription={uid}&mailbox={address}&type={event type}&expires={unix s}&signature={base64url HMAC-SHA256}`,
//! made by the delivery path and checked by the history API (`history::raw`), which
//! serves them on the operator's HTTP (admin) port. The link is the credential: it needs no
//! token, so a receiver can fetch the message it was told about, and nothing else, until
//! the link expires — and only while the subscription it names exists and a MailboxGrant
//! still lets it have raw messages of that mailbox and event type (checked at fetch time:
//! both are signed into the link, as the event itself may be gone once delivered; the
//! link goes only to a `full` subscription, which sees the mailbox anyway). The key lives in
//! the store (links survive a restart and die with the data) or in `--raw-link-key-file`
//! (replacing the file and restarting rotates it: every older link then fails closed).
//! Depends on nothing else of the crate.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// Name of the link key in the store.
pub const KEY_NAME: &str = "raw-message-links";

/// Signs and checks raw message links.
pub struct RawLinks {
    key: [u8; 32],
    /// Where receivers reach the operator's HTTP port, without a trailing slash.
    base: String,
    ttl: Duration,
}

/// What a link opens: one archived message, for one subscription, as part of an event of
/// one mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTo<'a> {
    pub sha256: &'a str,
    /// The UID of the subscription the link was issued to.
    pub subscription: &'a str,
    /// The mailbox of the event whose delivery carried it.
    pub mailbox: &'a str,
    /// That event's type (`message.received`, ...).
    pub event_type: &'a str,
}

/// A key for links from a file's bytes (at least 32): their SHA-256, so any length works.
pub fn key_from_file(bytes: &[u8]) -> Option<[u8; 32]> {
    use sha2::Digest;
    (bytes.len() >= 32).then(|| Sha256::digest(bytes).into())
}

/// A link as a delivery carries it (`data.rawMessage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    /// A signed URL of the raw message (RFC 5322 bytes), valid until `expiresAt`.
    pub url: String,
    #[schemars(with = "String")]
    pub expires_at: jiff::Timestamp,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link was not signed by this operator or was altered")]
    BadSignature,
    #[error("the link expired at {0}; the next delivery attempt or a replay carries a fresh one")]
    Expired(jiff::Timestamp),
}

impl std::fmt::Debug for RawLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawLinks")
            .field("base", &self.base)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RawLinks {
    pub fn new(key: [u8; 32], base: &str, ttl: Duration) -> RawLinks {
        RawLinks {
            key,
            base: base.trim_end_matches('/').to_string(),
            ttl,
        }
    }

    fn mac(&self, to: &LinkTo<'_>, expires: i64) -> Hmac<Sha256> {
        // A 32-byte key always fits HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        // Each part ends with a newline, which none of them can hold: no two links share
        // the signed bytes.
        mac.update(b"mailhook raw message v2\n");
        for part in [to.sha256, to.subscription, to.mailbox, to.event_type] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// A link to the raw message of `to`, valid from `now` for the configured time.
    pub fn link(&self, to: &LinkTo<'_>, now: jiff::Timestamp) -> Link {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let expires = now.as_second().saturating_add(ttl);
        let signature = URL_SAFE_NO_PAD.encode(self.mac(to, expires).finalize().into_bytes());
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("subscription", to.subscription)
            .append_pair("mailbox", to.mailbox)
            .append_pair("type", to.event_type)
            .append_pair("expires", &expires.to_string())
            .append_pair("signature", &signature)
            .finish();
        Link {
            url: format!("{}/v1/raw-messages/{}?{query}", self.base, to.sha256),
            expires_at: jiff::Timestamp::from_second(expires).unwrap_or(jiff::Timestamp::MAX),
        }
    }

    /// Whether a presented link is one this operator made and still valid. The signature
    /// is checked first and in constant time: an altered expiry is a bad signature.
    pub fn verify(
        &self,
        to: &LinkTo<'_>,
        expires: &str,
        signature: &str,
        now: jiff::Timestamp,
    ) -> Result<(), LinkError> {
        if [to.sha256, to.subscription, to.mailbox, to.event_type]
            .iter()
            .any(|p| p.contains('\n'))
        {
            return Err(LinkError::BadSignature);
        }
        let expires: i64 = expires.parse().map_err(|_| LinkError::BadSignature)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| LinkError::BadSignature)?;
        self.mac(to, expires)
            .verify_slice(&signature)
            .map_err(|_| LinkError::BadSignature)?;
        if now.as_second() >= expires {
            return Err(LinkError::Expired(
                jiff::Timestamp::from_second(expires).unwrap_or(jiff::Timestamp::MAX),
            ));
        }
        Ok(())
    }
}

/// The base of links when no `--public-url` is given: `http://` and the listening
/// address, loopback for an unspecified one (suits local runs only).
pub fn local_base(addr: std::net::SocketAddr) -> String {
    let host = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(host, addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> RawLinks {
        RawLinks::new([7; 32], "https://mailhook.example/", Duration::from_secs(3600))
    }

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("time")
    }

    const TO: LinkTo<'static> = LinkTo {
        sha256: "abc",
        subscription: "uid-1",
        mailbox: "zoë@example.com",
        event_type: "message.received",
    };

    /// Splits a link into (sha256, expires, signature), checking it names TO.
    fn parts(url: &str) -> (String, String, String) {
        let u = url::Url::parse(url).expect("url");
        let sha = u.path().rsplit('/').next().expect("path").to_string();
        let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
        assert_eq!(
            (q["subscription"].as_str(), q["mailbox"].as_str(), q["type"].as_str()),
            ("uid-1", "zoë@example.com", "message.received")
        );
        (sha, q["expires"].clone(), q["signature"].clone())
    }

    fn to(sha256: &str) -> LinkTo<'_> {
        LinkTo { sha256, ..TO }
    }

    #[test]
    fn a_link_verifies_until_it_expires() {
        let l = links();
        let link = l.link(&TO, at(1_000));
        assert!(
            link.url.starts_with(
                "https://mailhook.example/v1/raw-messages/abc?subscription=uid-1&mailbox=zo%C3%AB%40example.com&type=message.received&expires=4600&signature="
            ),
            "{}",
            link.url
        );
        assert_eq!(link.expires_at, at(4_600));
        let (sha, exp, sig) = parts(&link.url);
        assert_eq!(l.verify(&to(&sha), &exp, &sig, at(4_599)), Ok(()));
        assert_eq!(
            l.verify(&to(&sha), &exp, &sig, at(4_600)),
            Err(LinkError::Expired(at(4_600)))
        );
    }

    #[test]
    fn an_altered_link_is_refused() {
        let l = links();
        let (sha, exp, sig) = parts(&l.link(&TO, at(1_000)).url);
        assert_eq!(
            l.verify(&to("abd"), &exp, &sig, at(1_001)),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            l.verify(&to(&sha), "999999", &sig, at(1_001)),
            Err(LinkError::BadSignature)
        );
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert_eq!(
            l.verify(&to(&sha), &exp, &flipped, at(1_001)),
            Err(LinkError::BadSignature)
        );
        assert_eq!(l.verify(&to(&sha), &exp, "", at(1_001)), Err(LinkError::BadSignature));
        assert_eq!(l.verify(&to(&sha), "x", &sig, at(1_001)), Err(LinkError::BadSignature));
        let other_subscription = LinkTo {
            subscription: "uid-2",
            ..TO
        };
        assert_eq!(
            l.verify(&other_subscription, &exp, &sig, at(1_001)),
            Err(LinkError::BadSignature)
        );
        for other in [
            LinkTo {
                mailbox: "ceo@example.com",
                ..TO
            },
            LinkTo {
                event_type: "message.sent",
                ..TO
            },
        ] {
            assert_eq!(l.verify(&other, &exp, &sig, at(1_001)), Err(LinkError::BadSignature));
        }
        let other = RawLinks::new([8; 32], "https://mailhook.example", Duration::from_secs(3600));
        assert_eq!(
            other.verify(&to(&sha), &exp, &sig, at(1_001)),
            Err(LinkError::BadSignature)
        );
    }
}
