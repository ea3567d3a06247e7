//! The audit log's public key on a ConfigMap: what a witness or an auditor needs to check
//! checkpoints (`vkey`, the C2SP verifier key) found where cluster users look, beside
//! `mailhook audit key`. The leader writes it (server-side apply) whenever it becomes the
//! leader, and again every few minutes in case someone changed it.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where the key goes, and what it is.
#[derive(Debug, Clone)]
pub struct Published {
    pub namespace: String,
    pub name: String,
    /// The checkpoints' verifier key (`name+keyhash+base64`).
    pub vkey: String,
    /// The log's origin, the first line of every checkpoint.
    pub origin: String,
}

/// The ConfigMap's body. Pure.
pub fn config_map(key: &Published) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "labels": {"app.kubernetes.io/managed-by": "mailhook"},
            "annotations": {
                "mailhook.io/description": "The audit log's checkpoint verifier key (docs/audit.md): check checkpoints and proofs with it, e.g. `mailhook audit verify --key \"$(kubectl get cm NAME -o jsonpath='{.data.vkey}')\" FILE`."
            }
        },
        "data": {"vkey": key.vkey, "origin": key.origin},
    })
}

/// Keeps the ConfigMap written while this replica leads, until `shutdown`.
pub async fn run(client: Client, leadership: crate::handles::Leadership, key: Published, shutdown: CancellationToken) {
    let api: Api<ConfigMap> = Api::namespaced(client, &key.namespace);
    let body = config_map(&key);
    let mut written: Option<tokio::time::Instant> = None;
    loop {
        if !leadership.is_leader() {
            written = None;
        } else if written.is_none_or(|at| at.elapsed() >= Duration::from_secs(300)) {
            let params = PatchParams::apply(super::FIELD_MANAGER).force();
            match tokio::time::timeout(
                Duration::from_secs(10),
                api.patch(&key.name, &params, &Patch::Apply(&body)),
            )
            .await
            {
                Ok(Ok(_)) => {
                    if written.is_none() {
                        info!(
                            namespace = key.namespace,
                            name = key.name,
                            "audit log: verifier key published on a ConfigMap"
                        );
                    }
                    written = Some(tokio::time::Instant::now());
                }
                Ok(Err(err)) => warn!(
                    namespace = key.namespace, name = key.name, %err,
                    "cannot publish the audit log's verifier key on its ConfigMap (the operator needs create and patch on it); will retry"
                ),
                Err(_) => warn!("publishing the audit log's verifier key timed out; will retry"),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_map_holds_the_key_and_its_origin() {
        let key = Published {
            namespace: "mailhook".into(),
            name: "mailhook-audit-key".into(),
            vkey: "example.com/audit+1234abcd+AQID".into(),
            origin: "example.com/audit".into(),
        };
        let cm = config_map(&key);
        assert_eq!(cm["data"]["vkey"], "example.com/audit+1234abcd+AQID");
        assert_eq!(cm["data"]["origin"], "example.com/audit");
        assert_eq!(cm["metadata"]["namespace"], "mailhook");
    }
}
