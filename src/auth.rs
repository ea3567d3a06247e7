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

impl Tokens {
    pub fn load(path: PathBuf) -> std::io::Result<Tokens> {
        let tokens = Tokens {
            path,
            tokens: Arc::default(),
        };
        tokens.reload()?;
        Ok(tokens)
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
                if let Err(err) = self.reload() {
                    warn!(%err, path = %self.path.display(), "cannot re-read tokens; keeping the previous ones");
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

    fn accepts(&self, presented: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_token_in_a_bearer_header_is_accepted() {
        let path = std::env::temp_dir().join(format!("mailhook-tokens-{}", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, "# comment\nfirst\n\n second \n").expect("write");
        let tokens = Tokens::load(path.clone()).expect("load");
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().expect("header"));
            h
        };
        assert!(tokens.accepts_request(&with("Bearer first")));
        assert!(tokens.accepts_request(&with("Bearer second")));
        assert!(!tokens.accepts_request(&with("Bearer firs")));
        assert!(!tokens.accepts_request(&with("Basic first")));
        assert!(!tokens.accepts_request(&HeaderMap::new()));
        std::fs::write(&path, "# nothing\n").expect("write");
        assert!(Tokens::load(path.clone()).is_err(), "an empty token file is an error");
        let _ = std::fs::remove_file(path);
    }
}
