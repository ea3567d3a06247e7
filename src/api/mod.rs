//! The custom resources of group `mailhook.io`, version `v1alpha1`.

mod common;
mod mailbox_filter;
mod webhook_subscription;

pub use common::*;
pub use mailbox_filter::*;
pub use webhook_subscription::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every mailhook resource.
pub const GROUP: &str = "mailhook.io";

/// Every CRD this operator serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![MailboxFilter::crd(), WebhookSubscription::crd()]
}

/// The CRDs as one multi-document YAML stream: what `mailhook crdgen` prints and
/// `crds/mailhook.io.yaml` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRDs are what crdgen prints: fails when src/api changes without
    /// `cargo run -- crdgen > crds/mailhook.io.yaml`.
    #[test]
    fn checked_in_crds_match_crdgen() {
        let generated = crds_yaml().expect("CRDs serialize");
        let checked_in = include_str!("../../crds/mailhook.io.yaml");
        assert!(
            generated == checked_in,
            "crds/mailhook.io.yaml is stale: run `cargo run -- crdgen > crds/mailhook.io.yaml`"
        );
    }
}
