//! Bearer-token authentication shared by the ingest API and the admin API.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, header};
use tracing::warn;

/// Bearer tokens, re-read from their file so a rotated Secret takes effect without restart.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    tokens: Arc<RwLock<Vec<String>>>,
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
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Tokens known already, also re-read from `path` once it exists.
    pub fn with(path: PathBuf, tokens: Vec<String>) -> Tokens {
        Tokens {
            path,
            tokens: Arc::new(RwLock::new(tokens)),
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
        if let Ok(mut t) = self.tokens.write() {
            *t = list;
        }
        Ok(())
    }

    /// Re-reads the file every `every`; keeps the old tokens if it cannot.
    pub fn watch(self, every: Duration) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
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
        });
    }

    /// Whether the request carries `Authorization: Bearer <one of the tokens>`.
    pub fn accepts_request(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .is_some_and(|t| self.accepts(t))
    }

    /// Whether `presented` is one of the tokens (compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        let Ok(tokens) = self.tokens.read() else {
            return false;
        };
        // Compare every token in full so timing tells nothing about a near miss.
        tokens.iter().fold(false, |found, t| {
            found | constant_time_eq(t.as_bytes(), presented.as_bytes())
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes())
}

/// 32 bytes from the operating system's random source.
pub fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    // Without an OS random source nothing here is safe: fall back to two v4 UUIDs (also
    // OS randomness, via their own path) rather than to anything predictable.
    if getrandom::fill(&mut bytes).is_err() {
        for (i, b) in uuid::Uuid::new_v4()
            .as_bytes()
            .iter()
            .chain(uuid::Uuid::new_v4().as_bytes())
            .enumerate()
        {
            bytes[i] = *b;
        }
    }
    bytes
}
