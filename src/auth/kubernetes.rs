//! Bearer tokens judged by Kubernetes: a TokenReview says who holds the token, a
//! SubjectAccessReview whether that user may do what is asked — `get` or `patch` a
//! WebhookSubscription in its namespace (the history API: the namespace's usual roles,
//! `view` and `edit`, decide, as for the resource itself), or `get` a path of the admin
//! port such as `/metrics` (as Prometheus is allowed to scrape the apiserver). Answers are
//! kept for a short while per token, so a busy client costs the apiserver two reviews a
//! minute, not two a request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// What is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access<'a> {
    /// `verb` on the WebhookSubscription `namespace/name`.
    Subscription {
        namespace: &'a str,
        name: &'a str,
        verb: Verb,
    },
    /// `get` on a path of the admin port (a non-resource URL).
    Path(&'a str),
}

/// What a history request does to a subscription, as a Kubernetes verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Listing attempts or dead letters.
    Get,
    /// Replaying dead letters (like annotating the resource for a replay).
    Patch,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Patch => "patch",
        }
    }
}

/// The outcome of asking Kubernetes about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The user may.
    Allowed,
    /// Kubernetes does not know the token.
    Unauthenticated,
    /// The user (named) may not.
    Denied(String),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot ask the Kubernetes API who the caller is and what it may do")]
pub struct ReviewError(#[source] pub kube::Error);

/// Answers are reused this long.
const TTL: Duration = Duration::from_secs(30);
/// Cached answers at most; beyond it the cache starts again.
const MAX_CACHED: usize = 10_000;

/// (token digest, what was asked).
type Key = ([u8; 32], String);

/// Token and access reviews through the operator's own Kubernetes client.
pub struct KubernetesAccess {
    client: Client,
    cache: Mutex<HashMap<Key, (Decision, Instant)>>,
}

impl KubernetesAccess {
    pub fn new(client: Client) -> KubernetesAccess {
        KubernetesAccess {
            client,
            cache: Mutex::default(),
        }
    }

    /// Whether the holder of `token` may do `access`.
    pub async fn decide(&self, token: &str, access: Access<'_>) -> Result<Decision, ReviewError> {
        let key: Key = (Sha256::digest(token.as_bytes()).into(), format!("{access:?}"));
        let now = Instant::now();
        if let Some((decision, at)) = self.cache.lock().get(&key)
            && now.duration_since(*at) < TTL
        {
            return Ok(decision.clone());
        }
        let decision = self.review(token, access).await.map_err(ReviewError)?;
        // Unknown tokens are not kept: guessing must not fill the cache (callers limit
        // failures per client address instead).
        if decision == Decision::Unauthenticated {
            return Ok(decision);
        }
        let mut cache = self.cache.lock();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (_, at)| now.duration_since(*at) < TTL);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (decision.clone(), now));
        Ok(decision)
    }

    async fn review(&self, token: &str, access: Access<'_>) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
            return Ok(Decision::Unauthenticated);
        };
        let Some(user) = status.user else {
            return Ok(Decision::Unauthenticated);
        };
        let (resource_attributes, non_resource_attributes, what) = match access {
            Access::Subscription { namespace, name, verb } => (
                Some(ResourceAttributes {
                    group: Some(crate::api::GROUP.to_string()),
                    resource: Some("webhooksubscriptions".to_string()),
                    namespace: Some(namespace.to_string()),
                    name: Some(name.to_string()),
                    verb: Some(verb.as_str().to_string()),
                    ..Default::default()
                }),
                None,
                format!(
                    "{} webhooksubscriptions.{} in namespace {namespace}",
                    verb.as_str(),
                    crate::api::GROUP
                ),
            ),
            Access::Path(path) => (
                None,
                Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some("get".to_string()),
                }),
                format!("get {path}"),
            ),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes,
                non_resource_attributes,
            },
            ..Default::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let who = user.username.unwrap_or_else(|| "the caller".to_string());
        Ok(match answered.status {
            Some(s) if s.allowed => Decision::Allowed,
            _ => Decision::Denied(format!("{who} may not {what}")),
        })
    }
}
