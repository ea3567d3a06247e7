//! What this operator's audit log recorded of cluster-scoped resources (MailboxGrants,
//! LegalHolds), kept in its own store: each operator sharing a cluster keeps a log of its
//! own and records every change in it once, whatever another operator wrote to status,
//! across restarts and leader changes.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Context;

/// The last record of one resource: its generation, where it is in the log, its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    pub generation: i64,
    pub index: u64,
    pub name: String,
    /// The spec recorded (a LegalHold's: the one in force until another compiles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
}

fn group(kind: &str) -> String {
    crate::store::reserved_group(&format!("custody-{kind}"))
}

/// The last records of every resource of `kind`, by UID; None when they cannot be read
/// (nothing is recorded until they can).
pub async fn logged(ctx: &Context, kind: &str) -> Option<HashMap<String, Logged>> {
    let (rows, group) = (ctx.deliveries.rows(), group(kind));
    match tokio::task::spawn_blocking(move || rows.rows(&group, b"")).await {
        Ok(Ok(rows)) => Some(
            rows.into_iter()
                .filter_map(|r| {
                    let uid = String::from_utf8(r.key).ok()?;
                    Some((uid, serde_json::from_slice(&r.body).ok()?))
                })
                .collect(),
        ),
        Ok(Err(err)) => {
            tracing::warn!(%err, kind, "cannot read what the audit log recorded; will retry");
            None
        }
        Err(_) => None,
    }
}

/// Remembers the last record of the resource `uid` (None: it is gone, forget it).
pub async fn remember(ctx: &Context, kind: &str, uid: &str, logged: Option<&Logged>) -> Result<(), String> {
    let write = match logged {
        Some(l) => crate::store::RowWrite::Put {
            group: group(kind),
            row: crate::store::Row {
                key: uid.as_bytes().to_vec(),
                at: jiff::Timestamp::now().as_second(),
                body: serde_json::to_vec(l).map_err(|e| e.to_string())?,
            },
        },
        None => crate::store::RowWrite::Delete {
            group: group(kind),
            key: uid.as_bytes().to_vec(),
        },
    };
    let rows = ctx.deliveries.rows();
    match tokio::task::spawn_blocking(move || rows.write_rows(vec![write])).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

/// Appends `record` to the audit log, durably; its index.
pub async fn append(trail: &Arc<dyn crate::store::AuditTrail>, record: crate::audit::Record) -> Result<u64, String> {
    let trail = trail.clone();
    match tokio::task::spawn_blocking(move || trail.audit_append(&record)).await {
        Ok(Ok(Some(index))) => Ok(index),
        Ok(Ok(None)) => Err("the store keeps no audit log".into()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}
