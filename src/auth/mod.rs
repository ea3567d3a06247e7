//! Bearer-token authentication shared by the ingest API, the SMTP receiver and the history
//! API: token files (re-read while running), lockout after failures, the ingest token
//! Secret; and tokens judged by Kubernetes (`kubernetes`: the history API per namespace,
//! `/metrics`). Depends on `crypto` and `api` only.

pub mod kubernetes;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use parking_lot::{Mutex, RwLock};
use tracing::warn;

/// Bearer tokens, re-read from their file so a rotated Secret takes effect without restart.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    tokens: Arc<RwLock<Vec<String>>>,
    failures: Arc<FailureLimit>,
}

/// What an authentication attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Accepted,
    Refused,
    /// Too many failures from this address lately: refused without looking at the token
    /// for this long.
    Locked(Duration),
}

/// Failed attempts per client address. After `MAX_FAILURES` within `WINDOW` every attempt
/// from that address is refused until the window ends, so tokens cannot be guessed at
/// speed; successes never count, so a busy producer is never locked out by its own traffic.
#[derive(Default)]
pub struct FailureLimit {
    by_peer: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

const MAX_FAILURES: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; expired entries are dropped first, then the map is cleared
/// (an attacker with that many addresses is not slowed by a per-address limit anyway).
const MAX_PEERS: usize = 100_000;

impl FailureLimit {
    /// How long `peer` stays refused, if it is.
    pub fn locked(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.by_peer.lock();
        let (n, since) = map.get(&peer)?;
        let left = WINDOW.checked_sub(now.duration_since(*since))?;
        (*n >= MAX_FAILURES && !left.is_zero()).then_some(left)
    }

    /// Counts a failed attempt of `peer`.
    pub fn failed(&self, peer: IpAddr, now: Instant) {
        let mut map = self.by_peer.lock();
        if map.len() >= MAX_PEERS {
            map.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
            if map.len() >= MAX_PEERS {
                map.clear();
            }
        }
        let entry = map.entry(peer).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

impl std::fmt::Debug for Tokens {
    /// Never shows a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({})", self.path.display())
    }
}

impl Tokens {
    pub fn load(path: PathBuf) -> std::io::Result<Tokens> {
        let tokens = Tokens {
            path,
            tokens: Arc::default(),
            failures: Arc::default(),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Loads the tokens of `path`; `what` names them in the error. Run `watch` for a
    /// rotated Secret to take effect without restart.
    pub fn load_named(path: &std::path::Path, what: &str) -> anyhow::Result<Tokens> {
        Tokens::load(path.to_path_buf())
            .map_err(|e| anyhow::anyhow!("cannot read {what} tokens from {}: {e}", path.display()))
    }

    /// The ingest API's tokens: those of `file`, or, when it is absent or empty and
    /// `secret` is set, the token of that Secret (created with a random token if absent)
    /// — how the Helm chart gets a token without rendering a random value.
    pub async fn for_ingest(
        client: &kube::Client,
        file: &std::path::Path,
        secret: Option<&str>,
    ) -> anyhow::Result<Tokens> {
        match (Tokens::load(file.to_path_buf()), secret) {
            (Ok(tokens), _) => Ok(tokens),
            (Err(err), None) => anyhow::bail!("cannot read ingest tokens from {}: {err}", file.display()),
            (Err(err), Some(secret)) => {
                tracing::info!(file = %file.display(), %err, secret, "no ingest token file yet; using the token Secret");
                let token = ensure_token_secret(client, secret).await?;
                Ok(Tokens::with(file.to_path_buf(), vec![token]))
            }
        }
    }

    /// Tokens known already, also re-read from `path` once it exists.
    pub fn with(path: PathBuf, tokens: Vec<String>) -> Tokens {
        Tokens {
            path,
            tokens: Arc::new(RwLock::new(tokens)),
            failures: Arc::default(),
        }
    }

    fn reload(&self) -> std::io::Result<()> {
        let text = std::fs::read_to_string(&self.path)?;
        let list: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        if list.is_empty() {
            return Err(std::io::Error::other(format!("{} holds no token", self.path.display())));
        }
        *self.tokens.write() = list;
        Ok(())
    }

    /// How often `watch` re-reads the file.
    pub const WATCH_INTERVAL: Duration = Duration::from_secs(10);

    /// Re-reads the file every `every` until `stop`; keeps the old tokens if it cannot.
    pub async fn watch(self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            {
                match self.reload() {
                    Ok(()) => {}
                    // Expected while a generated token's Secret is not yet mounted.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        tracing::debug!(%err, path = %self.path.display(), "no token file yet; keeping the current tokens");
                    }
                    Err(err) => {
                        warn!(%err, path = %self.path.display(), "cannot re-read tokens; keeping the previous ones");
                    }
                }
            }
        }
    }

    /// Whether the request carries `Authorization: Bearer <one of the tokens>`.
    pub fn accepts_request(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|t| self.accepts(t))
    }

    /// Checks a request's bearer token, counting failures per client address.
    pub fn check_request(&self, headers: &HeaderMap, peer: IpAddr) -> Auth {
        self.check(bearer(headers), peer)
    }

    /// As `check_request`, also taking the token as the password of HTTP Basic
    /// credentials (any user name): all that Dovecot's event exporter can send.
    pub fn check_request_or_basic(&self, headers: &HeaderMap, peer: IpAddr) -> Auth {
        let basic = basic_password(headers);
        self.check(bearer(headers).or(basic.as_deref()), peer)
    }

    /// Checks a presented token (None: none presented), counting failures per address.
    pub fn check(&self, presented: Option<&str>, peer: IpAddr) -> Auth {
        let now = Instant::now();
        if let Some(left) = self.failures.locked(peer, now) {
            return Auth::Locked(left);
        }
        if presented.is_some_and(|t| self.accepts(t)) {
            return Auth::Accepted;
        }
        self.failures.failed(peer, now);
        tracing::info!(%peer, "authentication failed");
        Auth::Refused
    }

    /// Whether `presented` is one of the tokens (compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        let tokens = self.tokens.read();
        // Compare every token in full so timing tells nothing about a near miss.
        tokens.iter().fold(false, |found, t| {
            found | crate::crypto::constant_time_eq(t.as_bytes(), presented.as_bytes())
        })
    }
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The password of `Authorization: Basic base64(user:password)`.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let encoded = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?
        .trim();
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, password)| password.to_string())
}

/// The token in Secret `name` of the operator's namespace ($POD_NAMESPACE, else the
/// client's default), key `token`; creates the Secret with a random token if it is absent.
pub async fn ensure_token_secret(client: &kube::Client, name: &str) -> anyhow::Result<String> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};

    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| client.default_namespace().to_string());
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let read = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get("token"))
            .and_then(|t| String::from_utf8(t.0.clone()).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    if let Some(existing) = api.get_opt(name).await? {
        return read(&existing).ok_or_else(|| {
            anyhow::anyhow!("Secret {namespace}/{name} has no non-empty `token` key; add one or delete the Secret")
        });
    }
    let token = random_token();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "mailhook"},
        },
        "stringData": {"token": token},
    }))?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "created the ingest token Secret");
            Ok(token)
        }
        // Another replica (or a restart) won the race: use its token.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(name).await?;
            read(&existing).ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} has no `token` key"))
        }
        Err(err) => Err(anyhow::anyhow!(
            "cannot create the ingest token Secret {namespace}/{name}: {err}"
        )),
    }
}

/// 32 random bytes, URL-safe base64.
fn random_token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::crypto::random_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_carry_the_token_as_their_password() {
        use base64::Engine as _;
        let tokens = Tokens::with(PathBuf::from("/nonexistent"), vec!["s3cret".into()]);
        let peer = IpAddr::from([127, 0, 0, 1]);
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().expect("header"));
            h
        };
        let basic = |creds: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
        assert_eq!(
            tokens.check_request_or_basic(&with(&basic("dovecot:s3cret")), peer),
            Auth::Accepted
        );
        assert_eq!(
            tokens.check_request_or_basic(&with("Bearer s3cret"), peer),
            Auth::Accepted
        );
        assert_eq!(
            tokens.check_request_or_basic(&with(&basic("s3cret:x")), peer),
            Auth::Refused
        );
        assert_eq!(
            tokens.check_request_or_basic(&with("Basic !!not-base64"), peer),
            Auth::Refused
        );
        assert_eq!(
            tokens.check_request(&with(&basic("dovecot:s3cret")), peer),
            Auth::Refused,
            "the ingest API itself takes bearer tokens only"
        );
    }

    #[test]
    fn repeated_failures_lock_an_address_out_but_not_others() {
        let tokens = Tokens::with(PathBuf::from("/nonexistent"), vec!["right".into()]);
        let (attacker, other) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..MAX_FAILURES {
            assert_eq!(tokens.check(Some("wrong"), attacker), Auth::Refused);
        }
        assert!(
            matches!(tokens.check(Some("right"), attacker), Auth::Locked(_)),
            "even a right guess is refused"
        );
        assert_eq!(tokens.check(Some("right"), other), Auth::Accepted);
        assert_eq!(tokens.check(None, other), Auth::Refused);
    }

    #[test]
    fn a_window_later_the_address_may_try_again() {
        let limit = FailureLimit::default();
        let peer = IpAddr::from([10, 0, 0, 1]);
        let start = Instant::now();
        for _ in 0..MAX_FAILURES {
            limit.failed(peer, start);
        }
        assert!(limit.locked(peer, start).is_some());
        assert_eq!(limit.locked(peer, start + WINDOW), None);
    }
}
