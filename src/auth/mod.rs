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
///
/// Each line of the file is `TOKEN` or `NAME TOKEN`. The name is the credential's: what
/// producer ids are scoped by and what per-credential limits count, so rotating a secret
/// under the same name changes neither. A bare token is named after the file's purpose
/// (`ingest`, `dovecot`, ...): every bare token of one file is one credential.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    /// The name of bare tokens.
    default_name: Arc<str>,
    tokens: Arc<RwLock<Vec<Credential>>>,
    /// Distinct credential names among `tokens`.
    names: Arc<std::sync::atomic::AtomicUsize>,
    failures: Arc<FailureLimit>,
    /// Credentials that authenticated from each address while it was not locked: still
    /// accepted from it while it is.
    proven: Arc<Mutex<HashMap<IpAddr, Vec<Arc<str>>>>>,
}

/// Credentials remembered per address (more are not, and wait out a lock like others).
const PROVEN_PER_PEER: usize = 8;

/// One token and the name of the credential it belongs to.
struct Credential {
    name: Arc<str>,
    secret: String,
}

/// What an authentication attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// A known token, of the credential named here.
    Accepted(Arc<str>),
    Refused,
    /// Too many wrong tokens from this address lately: refused for this long, unless the
    /// token is of a credential that authenticated from this address before the lock.
    Locked(Duration),
}

/// Wrong tokens per client address. After `MAX_FAILURES` within `WINDOW` the address is
/// locked until the window ends: every token is answered as locked — a right guess
/// teaches nothing — except those of credentials that authenticated from the address
/// before (see `Tokens::check`). Requests that present no token do not count. So clients
/// behind one SNAT address, an Ingress or a shared mail host that share the counter with a
/// guesser keep working, and the guesser learns nothing while locked.
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

/// Tokens shorter than this are warned about: the lockout does not protect them.
const SHORT_TOKEN: usize = 20;

impl Tokens {
    /// Loads the tokens of `path`; bare tokens are named `default_name`.
    pub fn load(path: PathBuf, default_name: &str) -> std::io::Result<Tokens> {
        let tokens = Tokens {
            path,
            default_name: default_name.into(),
            tokens: Arc::default(),
            names: Arc::default(),
            failures: Arc::default(),
            proven: Arc::default(),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Loads the tokens of `path`; `what` names them in the error and names bare tokens.
    /// Run `watch` for a rotated Secret to take effect without restart.
    pub fn load_named(path: &std::path::Path, what: &str) -> anyhow::Result<Tokens> {
        Tokens::load(path.to_path_buf(), &what.to_ascii_lowercase())
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
        match (Tokens::load(file.to_path_buf(), "ingest"), secret) {
            (Ok(tokens), _) => Ok(tokens),
            (Err(err), None) => anyhow::bail!("cannot read ingest tokens from {}: {err}", file.display()),
            (Err(err), Some(secret)) => {
                tracing::info!(file = %file.display(), %err, secret, "no ingest token file yet; using the token Secret");
                let token = ensure_token_secret(client, secret).await?;
                Ok(Tokens::with(file.to_path_buf(), "ingest", vec![token]))
            }
        }
    }

    /// Bare tokens known already (named `default_name`), also re-read from `path` once it
    /// exists.
    pub fn with(path: PathBuf, default_name: &str, tokens: Vec<String>) -> Tokens {
        let default_name: Arc<str> = default_name.into();
        let tokens = tokens
            .into_iter()
            .map(|secret| Credential {
                name: default_name.clone(),
                secret,
            })
            .collect::<Vec<_>>();
        let names = Arc::new(std::sync::atomic::AtomicUsize::new(distinct_names(&tokens)));
        Tokens {
            path,
            default_name,
            tokens: Arc::new(RwLock::new(tokens)),
            names,
            failures: Arc::default(),
            proven: Arc::default(),
        }
    }

    fn reload(&self) -> std::io::Result<()> {
        let text = std::fs::read_to_string(&self.path)?;
        let list = parse_tokens(&text, &self.default_name)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", self.path.display())))?;
        if list.is_empty() {
            return Err(std::io::Error::other(format!("{} holds no token", self.path.display())));
        }
        let mut current = self.tokens.write();
        let changed = current.len() != list.len()
            || current
                .iter()
                .zip(&list)
                .any(|(a, b)| a.name != b.name || a.secret != b.secret);
        // Re-read every few seconds: warn when the file changed, not at every read.
        if changed {
            for c in list.iter().filter(|c| c.secret.len() < SHORT_TOKEN) {
                warn!(path = %self.path.display(), credential = %c.name,
                    "a token shorter than {SHORT_TOKEN} characters can be guessed; use 32 random bytes (openssl rand -base64 32)");
            }
        }
        self.names
            .store(distinct_names(&list), std::sync::atomic::Ordering::Relaxed);
        *current = list;
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

    /// Checks a presented token (None: none presented). Only wrong tokens count against
    /// the address, and only they are answered as locked (see [`FailureLimit`]).
    pub fn check(&self, presented: Option<&str>, peer: IpAddr) -> Auth {
        let Some(presented) = presented else {
            return Auth::Refused;
        };
        let now = Instant::now();
        let found = self.credential(presented);
        match (self.failures.locked(peer, now), found) {
            (None, Some(name)) => {
                self.proved(peer, &name);
                Auth::Accepted(name)
            }
            (Some(left), Some(name)) => {
                let proven = self.proven.lock().get(&peer).is_some_and(|names| names.contains(&name));
                if proven {
                    Auth::Accepted(name)
                } else {
                    Auth::Locked(left)
                }
            }
            (Some(left), None) => Auth::Locked(left),
            (None, None) => {
                self.failures.failed(peer, now);
                tracing::info!(%peer, "authentication failed: unknown token");
                Auth::Refused
            }
        }
    }

    /// Remembers that `name` authenticated from `peer` while it was not locked.
    fn proved(&self, peer: IpAddr, name: &Arc<str>) {
        let mut proven = self.proven.lock();
        if proven.len() >= MAX_PEERS && !proven.contains_key(&peer) {
            proven.clear();
        }
        let names = proven.entry(peer).or_default();
        if !names.contains(name) && names.len() < PROVEN_PER_PEER {
            names.push(name.clone());
        }
    }

    /// How many credential names the file has (counted when it is read, not per request).
    pub fn names(&self) -> usize {
        self.names.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `presented` is one of the tokens (compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        self.credential(presented).is_some()
    }

    /// The name of the credential `presented` belongs to, if it is one of the tokens.
    pub fn name_of(&self, presented: &str) -> Option<Arc<str>> {
        self.credential(presented)
    }

    /// The credential `presented` belongs to, if any. Every token is compared in full, so
    /// timing tells nothing about a near miss.
    fn credential(&self, presented: &str) -> Option<Arc<str>> {
        let tokens = self.tokens.read();
        tokens.iter().fold(None, |found, c| {
            let same = crate::crypto::constant_time_eq(c.secret.as_bytes(), presented.as_bytes());
            if same && found.is_none() {
                Some(c.name.clone())
            } else {
                found
            }
        })
    }
}

fn distinct_names(list: &[Credential]) -> usize {
    let mut names: Vec<&str> = list.iter().map(|c| &*c.name).collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

/// Why a token file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFileError {
    #[error("line {line}: expected `TOKEN` or `NAME TOKEN`, found {words} words")]
    Shape { line: usize, words: usize },
    #[error("line {line}: credential name {name:?}: use 1 to 63 letters, digits, `.`, `_` or `-`")]
    BadName { line: usize, name: String },
}

/// The credentials of a token file as (name, token) pairs; bare tokens are named
/// `default_name`. What `Tokens` reads, for tests and fuzzing.
pub fn parse_token_file(text: &str, default_name: &str) -> Result<Vec<(String, String)>, TokenFileError> {
    let list = parse_tokens(text, &Arc::from(default_name))?;
    Ok(list.into_iter().map(|c| (c.name.to_string(), c.secret)).collect())
}

/// The credentials of a token file: `TOKEN` or `NAME TOKEN` per line, `#` comments.
fn parse_tokens(text: &str, default_name: &Arc<str>) -> Result<Vec<Credential>, TokenFileError> {
    let mut list = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, secret) = match words.as_slice() {
            [secret] => (default_name.clone(), *secret),
            [name, secret] => {
                let valid = (1..=63).contains(&name.len())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                if !valid {
                    return Err(TokenFileError::BadName {
                        line: i + 1,
                        name: (*name).to_string(),
                    });
                }
                (Arc::from(*name), *secret)
            }
            other => {
                return Err(TokenFileError::Shape {
                    line: i + 1,
                    words: other.len(),
                });
            }
        };
        list.push(Credential {
            name,
            secret: secret.to_string(),
        });
    }
    Ok(list)
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
        let tokens = Tokens::with(PathBuf::from("/nonexistent"), "dovecot", vec!["s3cret".into()]);
        let accepted = Auth::Accepted("dovecot".into());
        let peer = IpAddr::from([127, 0, 0, 1]);
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().expect("header"));
            h
        };
        let basic = |creds: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
        assert_eq!(
            tokens.check_request_or_basic(&with(&basic("dovecot:s3cret")), peer),
            accepted
        );
        assert_eq!(tokens.check_request_or_basic(&with("Bearer s3cret"), peer), accepted);
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
    fn wrong_tokens_lock_an_address_out_of_guessing_but_not_its_good_producer() {
        let tokens = Tokens::with(PathBuf::from("/nonexistent"), "ingest", vec!["right".into()]);
        let (shared, other) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..MAX_FAILURES * 3 {
            assert_eq!(tokens.check(None, shared), Auth::Refused, "no token: never counted");
        }
        // The good producer authenticated from the address before any guess.
        assert_eq!(tokens.check(Some("right"), shared), Auth::Accepted("ingest".into()));
        for _ in 0..MAX_FAILURES {
            assert_eq!(tokens.check(Some("wrong"), shared), Auth::Refused);
        }
        assert!(
            matches!(tokens.check(Some("wrong"), shared), Auth::Locked(_)),
            "a wrong token from the address is answered as locked"
        );
        assert_eq!(
            tokens.check(Some("right"), shared),
            Auth::Accepted("ingest".into()),
            "the good producer behind the same address goes on"
        );
        assert_eq!(tokens.check(Some("wrong"), other), Auth::Refused);
        // A guesser that finds the right token while locked learns nothing from it.
        for _ in 1..MAX_FAILURES {
            assert_eq!(tokens.check(Some("wrong"), other), Auth::Refused);
        }
        assert!(matches!(tokens.check(Some("right"), other), Auth::Locked(_)));
    }

    #[test]
    fn token_files_name_their_credentials() {
        let default: Arc<str> = "ingest".into();
        let list = parse_tokens("# comment\nbare-token\nsiem-a  token-a\n\n", &default).expect("parse");
        let names: Vec<(&str, &str)> = list.iter().map(|c| (&*c.name, c.secret.as_str())).collect();
        assert_eq!(names, [("ingest", "bare-token"), ("siem-a", "token-a")]);
        assert_eq!(
            parse_tokens("a b c", &default).err(),
            Some(TokenFileError::Shape { line: 1, words: 3 })
        );
        assert!(matches!(
            parse_tokens("bad/name token", &default),
            Err(TokenFileError::BadName { line: 1, .. })
        ));
        let tokens = Tokens::with(PathBuf::from("/nonexistent"), "ingest", vec![]);
        *tokens.tokens.write() = list;
        let peer = IpAddr::from([10, 0, 0, 1]);
        assert_eq!(tokens.check(Some("token-a"), peer), Auth::Accepted("siem-a".into()));
        assert_eq!(tokens.check(Some("bare-token"), peer), Auth::Accepted("ingest".into()));
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
