//! LegalHold end to end: a real operator, a real apiserver, mail through the SMTP feed
//! (swaks). A held mailbox's raw message, attempts and audit records outlive their
//! retention (and its raw message is archived though no subscription gets a link to it);
//! a deletion waits for its confirmation; once released, the purges take what was held.

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use mailhook::api::LegalHold;
use serde_json::Value;

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply_siem, eventually, free_port, mailhook, wait_ready,
};

const ADMIN_TOKEN: &str = "hold-admin-token";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_mailbox_keeps_its_message_and_records_past_retention_until_the_hold_is_released() {
    let ns = TestNamespace::ungranted("hold").await;
    // Mailboxes of this run only: a hold another run left behind holds nothing here.
    let [held, free, quiet] = ["held", "free", "quiet"].map(|m| format!("{m}.{}@contoso.com", ns.name));
    // Links for two mailboxes; the third is granted without them, so only the hold
    // archives its raw message.
    ns.grant(
        &format!("{}-links", ns.name),
        &format!(r#"{{"mailboxes": ["{held}", "{free}"], "maxPayloadMode": "full", "rawMessageLinks": true}}"#),
    )
    .await;
    ns.grant(
        &format!("{}-nolinks", ns.name),
        &format!(r#"{{"mailboxes": ["{quiet}"], "maxPayloadMode": "full"}}"#),
    )
    .await;
    let dir = std::env::temp_dir().join(format!("mailhook-hold-{}", ns.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let tokens = dir.join("admin-token");
    std::fs::write(&tokens, format!("{ADMIN_TOKEN}\n")).expect("token");
    let smtp = free_port();
    let smtp_arg = smtp.to_string();
    let operator = Operator::start_with(
        &ns,
        &[
            "--smtp-addr",
            &smtp_arg,
            "--internal-domains",
            "contoso.com",
            "--store-dir",
            &dir.join("store").display().to_string(),
            "--admin-token-file",
            &tokens.display().to_string(),
            "--housekeeping-interval",
            "1s",
            "--attempt-retention",
            "5s",
            "--raw-message-retention",
            "5s",
        ],
    )
    .await;
    let receiver = Receiver::start(SIEM_SECRET);
    apply_siem(
        &ns,
        &receiver.url("/hooks"),
        "  payload: {includeRawMessageLink: true}\n",
    );
    wait_ready(&ns, "siem").await;

    // The hold, before the mail: placing it is an act of custody in the audit log.
    let hold_name = format!("matter-{}", ns.name);
    let holds: Api<LegalHold> = Api::all(ns.client.clone());
    let hold = serde_json::json!({
        "apiVersion": "mailhook.io/v1alpha1", "kind": "LegalHold",
        "metadata": {"name": hold_name},
        "spec": {
            "mailboxes": [held, quiet.to_uppercase()],
            "reason": "Matter 2026-114: preserve the finance mailboxes",
            "requestedBy": "legal@contoso.com"
        }
    });
    holds
        .patch(&hold_name, &PatchParams::apply("hold-test"), &Patch::Apply(&hold))
        .await
        .expect("apply LegalHold");
    let placed = eventually(
        "the hold is ready, recorded and finalized",
        || async { holds.get(&hold_name).await.ok() },
        |h| {
            h.as_ref().is_some_and(|h| {
                h.finalizers().iter().any(|f| f == mailhook::api::HOLD_FINALIZER)
                    && h.status.as_ref().is_some_and(|s| {
                        s.log_index.is_some() && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                    })
            })
        },
    )
    .await
    .expect("hold");
    assert!(placed.status.as_ref().and_then(|s| s.log_index).is_some());
    // Every operator on the cluster records the hold in its own log (others may run beside
    // this test): this one's index is in its own log.
    logs(&operator, "audit log: legal hold recorded", &hold_name).await;
    let placed_index = logged_index(&operator.log(), "audit log: legal hold recorded", &hold_name);

    // A CR that names no mailbox is refused by the apiserver, naming the fix.
    let (ok, _, err) = crate::support::kubectl_run(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: LegalHold\nmetadata: {{name: empty-{}}}\nspec: {{reason: r, requestedBy: me}}\n",
            ns.name
        )),
    );
    assert!(
        !ok && err.contains("a hold needs spec.mailboxes or spec.domains"),
        "{err}"
    );

    for to in [&held, &free, &quiet] {
        let (ok, out) = crate::smtp::swaks_mail(
            smtp,
            "partner@fabrikam.com",
            to,
            &format!("Quarterly figures for {to}"),
            "Zahlen für das Quartal.",
            &[],
        );
        assert!(ok && out.contains("250 2.0.0 OK"), "{out}");
    }
    let got = eventually(
        "the three messages delivered",
        || receiver.deliveries(),
        |d| d.iter().filter(|r| r.verified && r.answered == 200).count() >= 3,
    )
    .await;
    let by_mailbox = |mailbox: &str| -> Value {
        got.iter()
            .map(|r| r.json())
            .find(|j| j["data"]["mailbox"] == mailbox)
            .unwrap_or_else(|| panic!("no delivery for {mailbox}"))
    };
    let held_sha = by_mailbox(&held)["data"]["rawMessage"]["sha256"]
        .as_str()
        .expect("held link")
        .to_string();
    let free_sha = by_mailbox(&free)["data"]["rawMessage"]["sha256"]
        .as_str()
        .expect("free link")
        .to_string();
    assert!(
        by_mailbox(&quiet)["data"].get("rawMessage").is_none(),
        "no link without a grant for it"
    );
    let held_event = by_mailbox(&held)["data"]["eventId"]
        .as_str()
        .expect("event id")
        .to_string();

    let http = reqwest::Client::new();
    let admin = format!("http://{}", operator.admin);
    let fetch = |sha: String| {
        let (http, admin) = (http.clone(), admin.clone());
        async move {
            let r = http
                .get(format!("{admin}/v1/audit/raw-messages/{sha}"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("fetch");
            let status = r.status().as_u16();
            let custody = r
                .headers()
                .get("mailhook-custody-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            (status, custody, r.bytes().await.expect("body").to_vec())
        }
    };
    let attempts = || {
        let (http, admin, ns) = (http.clone(), admin.clone(), ns.name.clone());
        async move {
            let body = http
                .get(format!(
                    "{admin}/v1/subscriptions/{ns}/siem/attempts?since=2000-01-01T00:00:00Z"
                ))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("attempts")
                .bytes()
                .await
                .expect("body");
            let r: Value = serde_json::from_slice(&body).expect("json");
            r["items"].as_array().cloned().unwrap_or_default()
        }
    };
    assert_eq!(attempts().await.len(), 3, "an attempt per delivery");

    // Retention runs past its window: what the hold does not cover goes, the rest stays,
    // and the purges count it (two raw messages: held's and quiet's, archived by the hold
    // alone; two attempts).
    let kept = |kind: &str| format!("mailhook_legal_hold_kept{{hold=\"{hold_name}\",kind=\"{kind}\"}}");
    eventually(
        "the purges keep what the hold covers",
        || async {
            (
                operator.metric(&kept("raw_message")).await,
                operator.metric(&kept("attempt")).await,
            )
        },
        |(raw, attempts)| *raw == 2.0 && *attempts == 2.0,
    )
    .await;
    eventually(
        "the free message is purged",
        || fetch(free_sha.clone()),
        |(status, _, _)| *status == 404,
    )
    .await;
    let left = attempts().await;
    assert_eq!(left.len(), 2, "the free mailbox's attempt is purged: {left:?}");
    assert!(left.iter().any(|a| a["eventId"] == held_event.as_str()), "{left:?}");
    let (status, custody, bytes) = fetch(held_sha.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&bytes), held_sha, "the archived bytes are the message's");
    assert!(String::from_utf8_lossy(&bytes).contains(&format!("Quarterly figures for {held}")));
    let custody = custody.expect("the fetch is recorded in the audit log");

    // The audit records stay too: the event's acceptance and delivery, the placement and
    // the fetch, each proven in the signed log.
    let (ok, out, err) = mailhook(&[
        "audit",
        "prove",
        "--event",
        &held_event,
        "--admin-url",
        &admin,
        "--token-file",
        &tokens.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let evidence: Value = serde_json::from_str(&out).expect("evidence");
    assert!(evidence["inclusion"].as_array().is_some_and(|a| a.len() >= 2), "{out}");
    // Who may see which mail is in the chain of custody too: each grant is recorded.
    let grant_name = format!("{}-links", ns.name);
    logs(&operator, "audit log: grant recorded", &grant_name).await;
    let grant_index = logged_index(&operator.log(), "audit log: grant recorded", &grant_name);
    for (index, action) in [
        (placed_index, "legal-hold.placed"),
        (custody, "raw-message.fetch"),
        (grant_index, "mailbox-grant.created"),
    ] {
        let record = custody_record(&admin, &tokens, index);
        assert_eq!(record["action"], action, "{record}");
    }

    let held = eventually(
        "status shows what the hold keeps",
        || async { holds.get(&hold_name).await.ok() },
        |h| {
            h.as_ref()
                .and_then(|h| h.status.as_ref())
                .is_some_and(|s| s.held.raw_messages == 2 && s.held.attempts == 2)
        },
    )
    .await
    .expect("hold");
    assert!(held.status.as_ref().is_some_and(|s| s.held.raw_message_bytes > 0));

    // The subscription goes; what the hold keeps of it stays.
    let (ok, _, err) = crate::support::kubectl_run(&["delete", "whs", "siem", "-n", &ns.name], None);
    assert!(ok, "{err}");
    logs(
        &operator,
        "kept what a LegalHold keeps of a deleted subscription",
        "subscription_uid",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        operator.metric(&kept("attempt")).await,
        2.0,
        "a deleted subscription's held attempts stay"
    );

    // Deleting it without the confirmation is refused: it stays, in force, and says how.
    holds
        .delete(&hold_name, &DeleteParams::default())
        .await
        .expect("delete");
    let waiting = eventually(
        "the deletion waits for its confirmation",
        || async { holds.get(&hold_name).await.ok() },
        |h| {
            h.as_ref().and_then(|h| h.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.reason == "ReleaseNotConfirmed")
                    && s.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True")
            })
        },
    )
    .await
    .expect("hold");
    let message = waiting
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains(&format!("mailhook.io/confirm-release={hold_name}")),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fetch(held_sha.clone()).await.0, 200, "still held while unconfirmed");

    // Confirmed: released (and recorded), then purged.
    let confirm = serde_json::json!({"metadata": {"annotations": {
        "mailhook.io/confirm-release": hold_name,
        "mailhook.io/released-by": "legal@contoso.com",
    }}});
    holds
        .patch(&hold_name, &PatchParams::default(), &Patch::Merge(&confirm))
        .await
        .expect("confirm");
    eventually(
        "the hold is gone",
        || async { holds.get_opt(&hold_name).await.ok().flatten().is_none() },
        |gone| *gone,
    )
    .await;
    logs(&operator, "audit log: legal hold released", &hold_name).await;
    eventually(
        "the held message is purged once released",
        || fetch(held_sha.clone()),
        |(status, _, _)| *status == 404,
    )
    .await;
    logs(&operator, "no LegalHold keeps them any more", "subscription_uid").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The custody record at `index` of the log, from its inclusion proof.
fn custody_record(admin: &str, tokens: &std::path::Path, index: u64) -> Value {
    let (ok, out, err) = mailhook(&[
        "audit",
        "prove",
        "--index",
        &index.to_string(),
        "--admin-url",
        admin,
        "--token-file",
        &tokens.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let evidence: Value = serde_json::from_str(&out).expect("evidence");
    use base64::Engine as _;
    let record = evidence["inclusion"][0]["record"].as_str().expect("record");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(record)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("record json")
}

/// The `index` field of the operator's log line saying `message` about `name`.
fn logged_index(log: &str, message: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(message) && l.contains(name))
        .unwrap_or_else(|| panic!("no {message:?} for {name} in the log:\n{log}"));
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("index="))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no index in {line}"))
}

/// Waits until the operator's log has a line saying `message` about `name`.
async fn logs(operator: &Operator, message: &str, name: &str) {
    eventually(
        &format!("{message:?} about {name} in the operator's log"),
        || async { operator.log() },
        |log| log.lines().any(|l| l.contains(message) && l.contains(name)),
    )
    .await;
}
