//! The custom resources of group `mailhook.io`, version `v1alpha1`: their types, schema
//! and defaults (what `crdgen` prints). Depends on nothing else of the crate.

mod common;
mod duration;
mod legal_hold;
mod mail_source;
mod mailbox_filter;
mod mailbox_grant;
mod quantity;
mod webhook_subscription;

pub use common::*;
pub use duration::{DurationError, parse_duration, parse_since};
pub use legal_hold::*;
pub use mail_source::*;
pub use mailbox_filter::*;
pub use mailbox_grant::*;
pub use quantity::{QUANTITY_PATTERN, QuantityError, parse_bytes};
pub use webhook_subscription::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every mailhook resource.
pub const GROUP: &str = "mailhook.io";

/// Every CRD this operator serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        kubernetes_formats(LegalHold::crd()),
        kubernetes_formats(MailSource::crd()),
        kubernetes_formats(MailboxFilter::crd()),
        kubernetes_formats(MailboxGrant::crd()),
        kubernetes_formats(WebhookSubscription::crd()),
    ]
}

/// schemars names Rust's unsigned integers `uint16`/`uint32`/`uint64`, formats the
/// apiserver does not know (it warns on every apply). Its own are `int32` and `int64`;
/// the `minimum: 0` schemars also emits keeps values unsigned.
fn kubernetes_formats(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(format)) = map.get_mut("format") {
                    match format.as_str() {
                        "uint8" | "uint16" | "int8" | "int16" | "uint32" => *format = "int32".to_string(),
                        "uint64" => *format = "int64".to_string(),
                        _ => {}
                    }
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
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
        assert!(
            include_str!("../../charts/mailhook/files/crds.yaml") == checked_in,
            "the Helm chart's CRDs differ from crds/: run `cp crds/mailhook.io.yaml charts/mailhook/files/crds.yaml`"
        );
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    /// `kubectl explain` teaches users only if every field under spec and status says
    /// what it is.
    #[test]
    fn every_spec_and_status_field_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    let here = format!("{path}.{name}");
                    if prop
                        .get("description")
                        .and_then(|d| d.as_str())
                        .is_none_or(str::is_empty)
                    {
                        missing.push(here.clone());
                    }
                    walk(&here, prop, missing);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let mut missing = vec![];
        for crd in crds() {
            let value = serde_json::to_value(&crd).expect("serializes");
            let schema = &value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
            for part in ["spec", "status"] {
                walk(&format!("{}.{part}", crd.spec.names.kind), &schema[part], &mut missing);
            }
        }
        assert!(missing.is_empty(), "fields without a description: {missing:#?}");
    }
}
