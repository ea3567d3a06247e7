//! Step 3 of a subscription's reconcile: the delivery configuration and route of a valid
//! subscription. Pure but for the shared client pool, which hands out one HTTP client per
//! distinct TLS setting instead of building one per subscription.

use std::sync::Arc;

use kube::ResourceExt;

use super::Reason;
use super::validate::{Problem, ValidSubscription};
use crate::api::WebhookSubscription;
use crate::api::{CloudEventsMode, PayloadFormat};
use crate::archive::RawLinks;
use crate::delivery::client::{ClientError, ClientSettings, Clients};
use crate::delivery::egress::EgressPolicy;
use crate::delivery::wire::{Format, WireConfig};
use crate::delivery::{DeliveryConfig, backlog_cap, payload::PayloadConfig};
use crate::route::SubscriptionRoute;
use crate::store::BacklogCap;

/// What building needs besides the subscription: operator-wide settings.
#[derive(Clone)]
pub struct BuildSettings {
    /// Operator-wide secret from which each subscription's pseudonym key is derived.
    pub pseudonym_secret: Vec<u8>,
    /// Signs raw message links; None when the archive is off.
    pub raw_links: Option<Arc<RawLinks>>,
    /// Where deliveries may connect.
    pub egress: Arc<EgressPolicy>,
    /// HTTP clients shared by subscriptions with the same TLS settings.
    pub clients: Arc<Clients>,
    /// Names this operator in CloudEvents' `source` (`--instance`).
    pub instance: Arc<str>,
    /// The backlog cap of a subscription whose `delivery.maxBacklog` leaves a figure out
    /// (`--default-max-backlog-events`, `--default-max-backlog-bytes`).
    pub default_backlog: BacklogCap,
}

/// A valid subscription made ready for the data path.
pub struct Built {
    pub config: DeliveryConfig,
    pub route: SubscriptionRoute,
}

/// Why a valid-looking subscription cannot be delivered; the reason on its `Ready`
/// condition follows from the variant.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl BuildError {
    pub fn problem(&self) -> Problem {
        let reason = match self {
            BuildError::Client(ClientError::Identity(_)) => Reason::InvalidSecret,
            BuildError::Client(ClientError::Header(_) | ClientError::CaBundle(_) | ClientError::Build(_)) => {
                Reason::InvalidEndpoint
            }
        };
        Problem {
            reason,
            message: self.to_string(),
        }
    }
}

pub fn build(
    whs: &WebhookSubscription,
    uid: &str,
    valid: &ValidSubscription,
    settings: &BuildSettings,
) -> Result<Built, BuildError> {
    let spec = &whs.spec;
    let (client, headers) = settings.clients.get(&ClientSettings {
        headers: &valid.headers,
        ca_bundle: spec.endpoint.ca_bundle.as_deref(),
        identity: valid.client_identity.as_deref(),
        insecure_skip_verify: spec.endpoint.insecure_skip_tls_verify,
    })?;
    let namespace = whs.namespace().unwrap_or_default();
    let config = DeliveryConfig {
        uid: uid.to_string(),
        namespace: namespace.clone(),
        name: whs.name_any(),
        generation: whs.metadata.generation.unwrap_or_default(),
        url: spec.endpoint.url.clone(),
        client,
        headers,
        egress: settings.egress.clone(),
        timeout: valid.timeout,
        signing_keys: valid.signing_keys.clone(),
        retry_schedule: valid.retry_schedule.clone(),
        max_event_age: valid.max_event_age,
        max_retry_after: valid.max_retry_after,
        dead_letter_retention: valid.dead_letter_retention,
        disable_after: valid.disable_after,
        payload: PayloadConfig {
            mode: spec.payload.mode,
            redact: spec.payload.redact.clone(),
            pseudonym_key: crate::delivery::signing::pseudonym(&settings.pseudonym_secret, uid).into_bytes(),
            raw_links: settings
                .raw_links
                .as_ref()
                .filter(|_| spec.payload.include_raw_message_link)
                .cloned(),
            subscription: uid.to_string(),
        },
        concurrency: spec.delivery.concurrency,
        rate_limit_per_second: spec.delivery.rate_limit_per_second,
        ordered: spec.delivery.ordering == crate::api::Ordering::PerMailbox,
        paused: spec.paused,
        verify: spec.endpoint.verify,
        wire: WireConfig {
            format: match spec.payload.format {
                PayloadFormat::StandardWebhooks => Format::StandardWebhooks,
                PayloadFormat::CloudEvents => Format::CloudEvents {
                    structured: spec
                        .payload
                        .cloud_events
                        .as_ref()
                        .is_some_and(|c| c.mode == CloudEventsMode::Structured),
                },
            },
            encryption: valid.encryption.clone(),
            instance: settings.instance.clone(),
            batched: valid.batch.is_some(),
        },
        batch: valid.batch,
        dead_letter_sink: valid.dead_letter_sink.clone(),
        max_backlog: backlog_cap(valid.max_backlog, settings.default_backlog),
    };
    let route = SubscriptionRoute {
        uid: uid.to_string(),
        namespace,
        event_types: spec.event_types.clone(),
        filters: valid.filters.clone(),
    };
    Ok(Built { config, route })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_client_certificate_is_the_secret_and_a_bad_ca_the_endpoint() {
        // A real reqwest error: the PEM holds no key.
        let cause = || std::sync::Arc::new(reqwest::Identity::from_pem(b"no key").expect_err("refused"));
        let identity = BuildError::Client(ClientError::Identity(cause())).problem();
        assert_eq!(identity.reason, Reason::InvalidSecret);
        assert!(identity.message.contains("clientCertSecretRef"), "{}", identity.message);
        assert!(
            identity.message.ends_with(&cause().to_string()),
            "the cause is said: {}",
            identity.message
        );
        for e in [
            ClientError::CaBundle(cause()),
            ClientError::Header("header Host is set by mailhook".into()),
            ClientError::Build(cause()),
        ] {
            assert_eq!(BuildError::Client(e).problem().reason, Reason::InvalidEndpoint);
        }
    }
}
