//! The Dovecot source against a real Dovecot: the shipped Lua script and event-exporter
//! configuration (examples/dovecot/) post to the operator while Python's imaplib and LMTP
//! deliver, flag, move, delete, expunge and manage folders, ACLs, metadata and Sieve
//! scripts; every action reaches a verifying receiver, through MailboxFilters, as exactly
//! one event of the right type with the right fields. Then the operator is stopped,
//! mailboxes change, and after its restart the reconciler reports what it missed.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    DOVECOT_TOKEN, Dovecot, INGEST_TOKEN, Operator, Received, Receiver, SIEM_SECRET, TestNamespace, apply, eventually,
    free_port, self_signed, signing_secret, wait_ready,
};

const ALICE: &str = "alice@example.test";
const ADMIN: &str = "alice@example.test*mailhook-admin";

/// Whether `actual` holds everything `expected` says (objects by their keys, recursively).
fn holds(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e.iter().all(|(k, v)| a.get(k).is_some_and(|x| holds(x, v))),
        _ => actual == expected,
    }
}

/// The verified, accepted deliveries at `path`, each webhook-id once (first arrival): the
/// tests kill the operator right after seeing deliveries, and a delivery whose completion
/// was not yet recorded is sent again after the restart — at least once, as a receiver
/// that de-duplicates by webhook-id expects.
fn verified_at<'a>(got: &'a [Received], path: &str) -> Vec<&'a Received> {
    let mut ids = std::collections::HashSet::new();
    got.iter()
        .filter(|r| r.path == path && r.verified && r.answered == 200)
        .filter(|r| r.webhook_id.as_ref().is_none_or(|id| ids.insert(id.clone())))
        .collect()
}

/// What the receiver got at one path, checked step by step.
struct Expectations<'a> {
    receiver: &'a Receiver,
    path: &'static str,
    seen: usize,
}

impl Expectations<'_> {
    /// Waits until exactly the `expected` deliveries (type and a subset of the body) have
    /// arrived since the last check, in any order; returns them.
    async fn next(&mut self, what: &str, expected: &[Value]) -> Vec<Value> {
        let want = self.seen + expected.len();
        let got = eventually(
            what,
            || self.receiver.deliveries(),
            |d| verified_at(d, self.path).len() >= want,
        )
        .await;
        let new: Vec<Value> = verified_at(&got, self.path)
            .into_iter()
            .skip(self.seen)
            .map(Received::json)
            .collect();
        assert_eq!(new.len(), expected.len(), "{what}: more events than actions: {new:#?}");
        let mut left = new.clone();
        for e in expected {
            let Some(at) = left.iter().position(|n| holds(n, e)) else {
                panic!("{what}: no delivery holds {e:#}; got {new:#?}");
            };
            left.remove(at);
        }
        self.seen = want;
        new
    }

    /// After a quiet moment, nothing more than what was checked has arrived.
    async fn no_more(&self, what: &str) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let got = self.receiver.deliveries().await;
        let all = verified_at(&got, self.path);
        assert_eq!(
            all.len(),
            self.seen,
            "{what}: unexpected deliveries: {:#?}",
            all.iter().skip(self.seen).map(|r| r.json()).collect::<Vec<_>>()
        );
    }
}

/// The master password file the reconciler reads, and a store directory, for `ns`.
fn scratch(ns: &TestNamespace) -> (std::path::PathBuf, std::path::PathBuf) {
    let master_password = std::env::temp_dir().join(format!("mailhook-dovecot-master-{}", ns.name));
    std::fs::write(&master_password, "masterpw\n").expect("write the master password file");
    let store = std::env::temp_dir().join(format!("mailhook-dovecot-store-{}", ns.name));
    (master_password, store)
}

fn event(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mailbox_action_in_a_real_dovecot_is_one_event_and_changes_made_while_down_are_reconciled() {
    let ns = TestNamespace::new("dovecot").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let (master_password, store) = scratch(&ns);
    let (password_flag, store_flag) = (master_password.display().to_string(), store.display().to_string());
    // The reconciler's flags point at a Dovecot that starts after the operator (its ports
    // are known then): the first start runs without them.
    let mut operator =
        Operator::start_with(&ns, &["--internal-domains", "example.test", "--store-dir", &store_flag]).await;
    let all_types = "[message.received, message.sent, message.moved, message.deleted, message.flagged, \
                     message.unflagged, folder.changed, mailbox.config_changed]";
    apply(
        &ns,
        &format!(
            "{}apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: alice-mailbox}}\nspec:\n  \
             mailboxes: ['alice@example.test']\n  eventTypes: {all_types}\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: admin-sessions}}\nspec:\n  \
             adminSession: true\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: soc}}\nspec:\n  \
             endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             filterRefs: [alice-mailbox]\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: admin-watch}}\nspec:\n  \
             endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             filterRefs: [admin-sessions]\n",
            signing_secret(SIEM_SECRET),
            receiver.url("/soc"),
            receiver.url("/admin"),
        ),
    );
    wait_ready(&ns, "soc").await;
    wait_ready(&ns, "admin-watch").await;
    let dovecot = Dovecot::start(operator.ingest, DOVECOT_TOKEN);
    // The reconciler takes a first look at each mailbox when its first batch arrives.
    let imap = dovecot.imap().to_string();
    operator.kill();
    operator
        .restart_with(&[
            "--dovecot-imap-addr",
            &imap,
            "--dovecot-master-user",
            "mailhook-admin",
            "--dovecot-master-password-file",
            &password_flag,
            // This Dovecot speaks no TLS: plaintext by name, with a warning.
            "--dovecot-imap-tls",
            "none",
        ])
        .await;
    assert!(
        operator.log().contains("crosses the network in clear"),
        "no warning about the plaintext master password"
    );
    let mut soc = Expectations {
        receiver: &receiver,
        path: "/soc",
        seen: 0,
    };
    let m1 = "<m1@outside.example>";
    let m2 = "<m2@outside.example>";
    let m3 = "<m3@outside.example>";

    // Delivery: the server creating INBOX on the first one is nobody's act (no event).
    dovecot.act(
        "deliver",
        &[ALICE, m1, "Grüße aus Köln", "Émile <emile@outside.example>"],
    );
    let got = soc
        .next(
            "LMTP delivery",
            &[event(
                "message.received",
                json!({"folder": "INBOX", "messageId": m1, "subject": "Grüße aus Köln",
                       "from": "emile@outside.example", "mailbox": ALICE, "source": "dovecot", "direction": "inbound",
                       "activity": {"user": ALICE, "service": "lmtp", "remoteIp": "127.0.0.1"}}),
            )],
        )
        .await;
    assert!(got[0]["data"]["activity"].get("adminSession").is_none());
    // The user's client creates Sent and Trash.
    dovecot.act("create", &[ALICE, "Sent"]);
    dovecot.act("create", &[ALICE, "Trash"]);
    soc.next(
        "Sent and Trash created",
        &[
            event(
                "folder.changed",
                json!({"folder": "Sent", "activity": {"action": "created"}}),
            ),
            event(
                "folder.changed",
                json!({"folder": "Trash", "activity": {"action": "created"}}),
            ),
        ],
    )
    .await;
    // Selecting only clears \Recent: nothing.
    dovecot.act("select", &[ALICE, "INBOX"]);

    dovecot.act("flag", &[ALICE, "INBOX", m1, "\\Flagged"]);
    soc.next(
        "flag",
        &[event(
            "message.flagged",
            json!({"messageId": m1, "folder": "INBOX", "subject": "Grüße aus Köln",
                   "activity": {"imapFlags": ["\\Flagged"], "service": "imap"}}),
        )],
    )
    .await;
    dovecot.act("unflag", &[ALICE, "INBOX", m1, "\\Flagged"]);
    soc.next(
        "unflag",
        &[event(
            "message.unflagged",
            json!({"messageId": m1, "activity": {"imapFlags": ["\\Flagged"]}}),
        )],
    )
    .await;

    let projekte = "Projekte/Größe";
    dovecot.act("create", &[ALICE, projekte]);
    soc.next(
        "create",
        &[event(
            "folder.changed",
            json!({"folder": projekte, "activity": {"action": "created"}}),
        )],
    )
    .await;
    dovecot.act("subscribe", &[ALICE, projekte]);
    soc.next(
        "subscribe",
        &[event(
            "folder.changed",
            json!({"folder": projekte, "activity": {"action": "subscribed"}}),
        )],
    )
    .await;
    dovecot.act("unsubscribe", &[ALICE, projekte]);
    soc.next(
        "unsubscribe",
        &[event(
            "folder.changed",
            json!({"folder": projekte, "activity": {"action": "unsubscribed"}}),
        )],
    )
    .await;

    dovecot.act("move", &[ALICE, "INBOX", projekte, m1]);
    soc.next(
        "move",
        &[event(
            "message.moved",
            json!({"messageId": m1, "folder": projekte, "subject": "Grüße aus Köln",
                   "activity": {"previousFolder": "INBOX"}}),
        )],
    )
    .await;

    dovecot.act("deliver", &[ALICE, m2, "Rechnung 4711", "billing@outside.example"]);
    soc.next(
        "second delivery",
        &[event("message.received", json!({"messageId": m2}))],
    )
    .await;
    dovecot.act("flag", &[ALICE, "INBOX", m2, "\\Deleted"]);
    soc.next(
        "\\Deleted",
        &[event(
            "message.deleted",
            json!({"messageId": m2, "folder": "INBOX", "activity": {"stage": "soft"}}),
        )],
    )
    .await;
    dovecot.act("expunge", &[ALICE, "INBOX", m2]);
    soc.next(
        "expunge",
        &[event(
            "message.deleted",
            json!({"messageId": m2, "folder": "INBOX", "subject": "Rechnung 4711", "activity": {"stage": "hard"}}),
        )],
    )
    .await;

    dovecot.act("deliver", &[ALICE, m3, "Newsletter", "news@outside.example"]);
    soc.next("third delivery", &[event("message.received", json!({"messageId": m3}))])
        .await;
    dovecot.act("move", &[ALICE, "INBOX", "Trash", m3]);
    soc.next(
        "move to the trash",
        &[event(
            "message.deleted",
            json!({"messageId": m3, "folder": "Trash", "activity": {"stage": "soft", "previousFolder": "INBOX"}}),
        )],
    )
    .await;

    dovecot.act("rename", &[ALICE, projekte, "Archiv"]);
    soc.next(
        "rename",
        &[event(
            "folder.changed",
            json!({"folder": "Archiv", "activity": {"action": "renamed", "previousFolder": projekte}}),
        )],
    )
    .await;
    // A copy is indexed, not reported.
    dovecot.act("copy", &[ALICE, "Archiv", "INBOX", m1]);
    dovecot.act(
        "append",
        &[ALICE, "Sent", "<s1@example.test>", "bob@else.example", "Angebot"],
    );
    soc.next(
        "a client saving sent mail",
        &[event(
            "message.sent",
            json!({"messageId": "<s1@example.test>", "folder": "Sent", "to": ["bob@else.example"],
                   "direction": "outbound"}),
        )],
    )
    .await;

    // Renaming a parent renames its subfolders: a message in one is still named after.
    dovecot.act("create", &[ALICE, "Kunden"]);
    dovecot.act("create", &[ALICE, "Kunden/Acme"]);
    dovecot.act("copy", &[ALICE, "Archiv", "Kunden/Acme", m1]);
    dovecot.act("rename", &[ALICE, "Kunden", "Partner"]);
    dovecot.act("flag", &[ALICE, "Partner/Acme", m1, "\\Flagged"]);
    soc.next(
        "a parent folder renamed, then a flag in its subfolder",
        &[
            event(
                "folder.changed",
                json!({"folder": "Kunden", "activity": {"action": "created"}}),
            ),
            event(
                "folder.changed",
                json!({"folder": "Kunden/Acme", "activity": {"action": "created"}}),
            ),
            event(
                "folder.changed",
                json!({"folder": "Partner", "activity": {"action": "renamed", "previousFolder": "Kunden"}}),
            ),
            event(
                "message.flagged",
                json!({"folder": "Partner/Acme", "messageId": m1, "subject": "Grüße aus Köln"}),
            ),
        ],
    )
    .await;

    // The master user in alice's mailbox: an admin session, also selected by the
    // admin-sessions filter.
    dovecot.act("flag", &[ADMIN, "Archiv", m1, "\\Seen"]);
    let admin_flag = event(
        "message.flagged",
        json!({"messageId": m1, "folder": "Archiv",
               "activity": {"adminSession": true, "authUser": "mailhook-admin", "user": ALICE}}),
    );
    soc.next("a master user's flag", std::slice::from_ref(&admin_flag))
        .await;
    let mut admin = Expectations {
        receiver: &receiver,
        path: "/admin",
        seen: 0,
    };
    admin.next("the admin-sessions filter", &[admin_flag]).await;

    dovecot.act("setacl", &[ALICE, "INBOX", "bob@example.test", "lr"]);
    soc.next(
        "SETACL",
        &[event(
            "mailbox.config_changed",
            json!({"activity": {"change": {"kind": "acl", "command": "SETACL", "target": "INBOX",
                                           "detail": "\"INBOX\" bob@example.test lr"}}}),
        )],
    )
    .await;
    dovecot.act("setmetadata", &[ALICE, "INBOX", "/private/comment", "vertraulich"]);
    soc.next(
        "SETMETADATA",
        &[event(
            "mailbox.config_changed",
            json!({"activity": {"change": {"kind": "metadata", "command": "SETMETADATA", "target": "INBOX"}}}),
        )],
    )
    .await;
    dovecot.act("putscript", &[ALICE, "forward"]);
    soc.next(
        "a Sieve script",
        &[event(
            "mailbox.config_changed",
            json!({"mailbox": ALICE, "activity": {"change": {"kind": "sieve", "command": "PUTSCRIPT", "target": "forward"}}}),
        )],
    )
    .await;
    dovecot.act("create", &[ALICE, "Leer"]);
    dovecot.act("delete", &[ALICE, "Leer"]);
    soc.next(
        "create and delete",
        &[
            event(
                "folder.changed",
                json!({"folder": "Leer", "activity": {"action": "created"}}),
            ),
            event(
                "folder.changed",
                json!({"folder": "Leer", "activity": {"action": "deleted"}}),
            ),
        ],
    )
    .await;
    soc.no_more("after every action").await;
    admin.no_more("admin sessions").await;
    assert_eq!(dovecot.spooled(ALICE), 0, "mailhook took every batch");
    assert!(!dovecot.log().contains("Error"), "{}", dovecot.log());

    // mailhook away: what users do meanwhile waits in the script's spool, and the
    // reconciler finds it in the mailbox.
    operator.kill();
    let m4 = "<m4@outside.example>";
    dovecot.act("deliver", &[ALICE, m4, "Während der Wartung", "emile@outside.example"]);
    dovecot.act("expunge", &[ALICE, "Trash", m3]);
    dovecot.act("move", &[ALICE, "Archiv", "INBOX", m1]);
    dovecot.act("create", &[ALICE, "Offline"]);
    assert!(
        dovecot.spooled(ALICE) > 0,
        "the script spooled what mailhook did not take"
    );
    operator.restart().await;
    let reconciled = soc
        .next(
            "changes made while mailhook was down",
            &[
                event(
                    "message.received",
                    json!({"messageId": m4, "folder": "INBOX", "subject": "Während der Wartung",
                           "activity": {"reconciled": true}}),
                ),
                event(
                    "message.deleted",
                    json!({"messageId": m3, "folder": "Trash", "activity": {"stage": "hard", "reconciled": true}}),
                ),
                event(
                    "message.moved",
                    json!({"messageId": m1, "folder": "INBOX", "activity": {"previousFolder": "Archiv", "reconciled": true}}),
                ),
                event(
                    "folder.changed",
                    json!({"folder": "Offline", "activity": {"action": "created", "reconciled": true}}),
                ),
            ],
        )
        .await;
    assert!(reconciled.iter().all(|e| e["data"]["source"] == "dovecot"));
    // The spooled batches, resent with alice's next change, are the same events (their
    // ids are the messages' and folders' places): not delivered twice. What only the
    // notifications saw arrives now: m3 was marked \Deleted before its expunge.
    dovecot.act("flag", &[ALICE, "INBOX", m4, "\\Flagged"]);
    let late = soc
        .next(
            "the spool, then the next change",
            &[
                event(
                    "message.deleted",
                    json!({"folder": "Trash", "activity": {"stage": "soft"}}),
                ),
                event("message.flagged", json!({"messageId": m4})),
            ],
        )
        .await;
    assert!(late.iter().all(|e| e["data"]["activity"].get("reconciled").is_none()));
    eventually("the spool to empty", || async { dovecot.spooled(ALICE) }, |n| *n == 0).await;
    soc.no_more("after the restart").await;
    let _ = std::fs::remove_file(&master_password);
    let _ = std::fs::remove_dir_all(&store);
}

/// The flags that point the reconciler at `addr` as the test master user.
fn reconciler_flags<'a>(addr: &'a str, password_file: &'a str) -> [&'a str; 6] {
    [
        "--dovecot-imap-addr",
        addr,
        "--dovecot-master-user",
        "mailhook-admin",
        "--dovecot-master-password-file",
        password_file,
    ]
}

/// An operator with a durable store, alice's mailbox routed to /soc, and a Dovecot
/// posting to it (with TLS required, or none).
async fn operator_and_dovecot(ns: &TestNamespace, receiver: &Receiver, store: &str, tls: bool) -> (Operator, Dovecot) {
    let operator = Operator::start_with(ns, &["--internal-domains", "example.test", "--store-dir", store]).await;
    apply(
        ns,
        &format!(
            "{}apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: alice-mailbox}}\nspec:\n  \
             mailboxes: ['alice@example.test']\n  eventTypes: [message.received, folder.changed]\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: soc}}\nspec:\n  \
             endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             filterRefs: [alice-mailbox]\n",
            signing_secret(SIEM_SECRET),
            receiver.url("/soc"),
        ),
    );
    wait_ready(ns, "soc").await;
    let dovecot = if tls {
        Dovecot::start_tls(operator.ingest, DOVECOT_TOKEN)
    } else {
        Dovecot::start(operator.ingest, DOVECOT_TOKEN)
    };
    (operator, dovecot)
}

/// The reconciler against a Dovecot that requires TLS (env.py --tls: LOGINDISABLED
/// without it): STARTTLS by default and implicit TLS reconcile what changed while
/// mailhook was down; a certificate its CA did not sign is refused with the CA named;
/// plaintext is refused by the server, and contradicting flags by `mailhook run` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_reaches_dovecot_over_tls_and_checks_its_certificate() {
    let ns = TestNamespace::new("dovecot-tls").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let tmp = std::env::temp_dir();
    let password_file = tmp.join(format!("mailhook-dovecot-master-{}", ns.name));
    std::fs::write(&password_file, "masterpw\n").expect("write the master password file");
    let password_flag = password_file.display().to_string();
    let store = tmp.join(format!("mailhook-dovecot-store-{}", ns.name));
    let store_flag = store.display().to_string();
    let (mut operator, dovecot) = operator_and_dovecot(&ns, &receiver, &store_flag, true).await;
    let (imap, imaps, ca) = (dovecot.imap().to_string(), dovecot.imaps().to_string(), dovecot.ca());
    operator.kill();
    // No --dovecot-imap-tls: STARTTLS.
    let mut flags = reconciler_flags(&imap, &password_flag).to_vec();
    flags.extend(["--dovecot-imap-ca-file", &ca]);
    operator.restart_with(&flags).await;
    let mut soc = Expectations {
        receiver: &receiver,
        path: "/soc",
        seen: 0,
    };
    let reconciled = |log: &String| log.matches("Dovecot mailbox reconciled").count();

    // The first batch of alice: the reconciler's first look.
    dovecot.act(
        "deliver",
        &[ALICE, "<t1@outside.example>", "Live", "emile@outside.example"],
    );
    soc.next(
        "a live delivery",
        &[event("message.received", json!({"messageId": "<t1@outside.example>"}))],
    )
    .await;
    eventually(
        "the first look over STARTTLS",
        || async { operator.log() },
        |l| reconciled(l) >= 1,
    )
    .await;

    operator.kill();
    dovecot.act(
        "deliver",
        &[ALICE, "<t2@outside.example>", "Verpasst", "emile@outside.example"],
    );
    dovecot.act("create", &[ALICE, "Offline"]);
    operator.restart().await;
    soc.next(
        "changes found over STARTTLS",
        &[
            event(
                "message.received",
                json!({"messageId": "<t2@outside.example>", "activity": {"reconciled": true}}),
            ),
            event(
                "folder.changed",
                json!({"folder": "Offline", "activity": {"action": "created", "reconciled": true}}),
            ),
        ],
    )
    .await;

    operator.kill();
    operator.set_flag("--dovecot-imap-addr", &imaps);
    operator.set_flag("--dovecot-imap-tls", "implicit");
    dovecot.act(
        "deliver",
        &[ALICE, "<t3@outside.example>", "Implizit", "emile@outside.example"],
    );
    operator.restart().await;
    soc.next(
        "changes found over implicit TLS",
        &[event(
            "message.received",
            json!({"messageId": "<t3@outside.example>", "activity": {"reconciled": true}}),
        )],
    )
    .await;

    // A CA that did not sign the server's certificate.
    operator.kill();
    let (wrong_ca, wrong_key) = (
        tmp.join(format!("mailhook-wrong-ca-{}.pem", ns.name)),
        tmp.join(format!("mailhook-wrong-ca-{}.key", ns.name)),
    );
    self_signed(&wrong_ca, &wrong_key, "not the Dovecot CA", None);
    let wrong_flag = wrong_ca.display().to_string();
    operator.set_flag("--dovecot-imap-ca-file", &wrong_flag);
    dovecot.act(
        "deliver",
        &[ALICE, "<t4@outside.example>", "Nie", "emile@outside.example"],
    );
    operator.restart().await;
    let log = eventually(
        "the certificate refused against the wrong CA",
        || async { operator.log() },
        |l| l.contains(&format!("checked against the CA file {wrong_flag}")),
    )
    .await;
    assert!(log.contains("UnknownIssuer"), "{log}");
    // No CA file: the system's roots do not know the test CA either.
    operator.kill();
    operator.restart_without(&["--dovecot-imap-ca-file", &wrong_flag]).await;
    let log = eventually(
        "the certificate refused against the system's roots",
        || async { operator.log() },
        |l| l.contains("checked against the system's trusted CAs"),
    )
    .await;
    assert!(log.contains("--dovecot-imap-ca-file"), "{log}");

    // Plaintext by name: this Dovecot announces LOGINDISABLED, so LOGIN is not sent.
    operator.kill();
    operator.set_flag("--dovecot-imap-addr", &imap);
    operator.set_flag("--dovecot-imap-tls", "none");
    operator.restart().await;
    eventually(
        "plaintext LOGIN refused",
        || async { operator.log() },
        |l| l.contains("refuses LOGIN on this connection (LOGINDISABLED)"),
    )
    .await;
    assert!(operator.log().contains("crosses the network in clear"));
    soc.no_more("while the reconciler was refused").await;

    // A CA file with TLS off is a contradiction: `mailhook run` stops at start.
    operator.kill();
    let (admin, ingest) = (free_port().to_string(), free_port().to_string());
    let mut args = vec![
        "run",
        "--watch-namespace",
        &ns.name,
        "--http-addr",
        &admin,
        "--ingest-addr",
        &ingest,
        "--store-memory",
        "--dovecot-imap-tls",
        "none",
        "--dovecot-imap-ca-file",
        &ca,
    ];
    args.extend(reconciler_flags(&imap, &password_flag));
    let (ok, out, err) = exits_within(&args, Duration::from_secs(60));
    assert!(!ok, "mailhook run accepted a CA file with TLS off: {out}{err}");
    assert!(format!("{out}{err}").contains("--dovecot-imap-tls none"), "{out}{err}");
    let _ = std::fs::remove_file(&password_file);
    let _ = std::fs::remove_file(&wrong_ca);
    let _ = std::fs::remove_file(&wrong_key);
    let _ = std::fs::remove_dir_all(&store);
}

/// A Dovecot without TLS, and the reconciler left at its default (STARTTLS): it refuses
/// to send the master password and says which flag would allow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_does_not_fall_back_to_plaintext() {
    let ns = TestNamespace::new("dovecot-plain").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let tmp = std::env::temp_dir();
    let password_file = tmp.join(format!("mailhook-dovecot-master-{}", ns.name));
    std::fs::write(&password_file, "masterpw\n").expect("write the master password file");
    let password_flag = password_file.display().to_string();
    let store = tmp.join(format!("mailhook-dovecot-store-{}", ns.name));
    let store_flag = store.display().to_string();
    let (mut operator, dovecot) = operator_and_dovecot(&ns, &receiver, &store_flag, false).await;
    let imap = dovecot.imap().to_string();
    operator.kill();
    operator.restart_with(&reconciler_flags(&imap, &password_flag)).await;
    let mut soc = Expectations {
        receiver: &receiver,
        path: "/soc",
        seen: 0,
    };
    dovecot.act(
        "deliver",
        &[ALICE, "<p1@outside.example>", "Klartext", "emile@outside.example"],
    );
    soc.next(
        "a live delivery",
        &[event("message.received", json!({"messageId": "<p1@outside.example>"}))],
    )
    .await;
    let log = eventually(
        "the first look refused",
        || async { operator.log() },
        |l| l.contains("does not offer STARTTLS"),
    )
    .await;
    assert!(log.contains("--dovecot-imap-tls none"), "{log}");
    assert!(!log.contains("Dovecot mailbox reconciled"), "{log}");
    assert!(!dovecot.log().contains("mailhook-admin"), "{}", dovecot.log());
    let _ = std::fs::remove_file(&password_file);
    let _ = std::fs::remove_dir_all(&store);
}

/// Runs `mailhook` with `args`, expecting it to exit within `within`; returns (success,
/// stdout, stderr). Panics (and kills it) if it does not.
fn exits_within(args: &[&str], within: Duration) -> (bool, String, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mailhook"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mailhook");
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().expect("wait for mailhook").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("mailhook's output");
            panic!(
                "mailhook {args:?} still runs after {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("mailhook's output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the script costs an IMAP user: per-command latency of one IMAP session (SELECT,
/// FETCH of flags, a BODY.PEEK read, STORE of a flag, NOOP; 200 rounds) against Dovecot
/// without mailhook's source, with it posting to a running operator (durable store) with
/// the exporter sending configuration changes only and with reads and logins too, and with
/// the operator down (every batch spooled). Prints figures; asserts nothing about time. Run it with
/// `cargo test --test integration dovecot_imap_latency -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints figures (BENCHMARKS.md)"]
async fn dovecot_imap_latency() {
    let ns = TestNamespace::new("dovecot-latency").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let store = std::env::temp_dir().join(format!("mailhook-dovecot-bench-{}", ns.name));
    let mut operator = Operator::start_with(&ns, &["--store-dir", &store.display().to_string()]).await;
    apply(
        &ns,
        &format!(
            "{}apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: soc}}\nspec:\n  \
             endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             eventTypes: [message.flagged, message.unflagged]\n",
            signing_secret(SIEM_SECRET),
            receiver.url("/soc"),
        ),
    );
    wait_ready(&ns, "soc").await;
    let rounds = "200";
    let run = |dovecot: &Dovecot| -> Value {
        dovecot.act(
            "deliver",
            &[ALICE, "<bench@outside.example>", "Bench", "a@outside.example"],
        );
        serde_json::from_str(&dovecot.act("latency", &[ALICE, rounds])).expect("latency JSON")
    };
    let plain = Dovecot::start_plain();
    let without = run(&plain);
    drop(plain);
    let changes_only = Dovecot::start_changes_only(operator.ingest, DOVECOT_TOKEN);
    let before = run(&changes_only);
    drop(changes_only);
    let dovecot = Dovecot::start(operator.ingest, DOVECOT_TOKEN);
    let with = run(&dovecot);
    operator.kill();
    let down = run(&dovecot);
    println!("IMAP per-command latency, ms ({rounds} rounds; p50 / p99 / max):");
    for command in ["SELECT", "FETCH", "BODY", "STORE", "NOOP"] {
        let f = |v: &Value| format!("{} / {} / {}", v[command]["p50"], v[command]["p99"], v[command]["max"]);
        println!(
            "  {command:<6}  without the script: {:<22} changes only: {:<22} reads and logins too: {:<22} mailhook down (spooled): {}",
            f(&without),
            f(&before),
            f(&with),
            f(&down)
        );
    }
    let _ = std::fs::remove_dir_all(&store);
}

/// The Dovecot routes answer bad requests with the status and field a person can act on,
/// and take the token from Basic credentials (all Dovecot's exporter can send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_routes_refuse_bad_requests_naming_the_field() {
    let ns = TestNamespace::new("dovecot-refusals").await;
    let operator = Operator::start(&ns).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: &str, auth: Option<(&str, &str)>, bearer: bool| {
        let mut r = http
            .post(format!("http://{}{path}", operator.ingest))
            .header("content-type", "application/json")
            .body(body.to_string());
        r = match (auth, bearer) {
            (Some((_, token)), true) => r.bearer_auth(token),
            (Some((user, token)), false) => r.basic_auth(user, Some(token)),
            (None, _) => r,
        };
        async move {
            let r = r.send().await.expect("request");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            (status, serde_json::from_str::<Value>(&text).unwrap_or_default())
        }
    };
    let batch = |version: u32| {
        json!({"version": version, "batch": "s:1", "user": ALICE, "events": [
            {"event": "MailboxCreate", "mailbox": "Grüße"}]})
        .to_string()
    };
    // Each route takes its own source's tokens: the ingest token is refused here, the
    // Dovecot token on /v1/events, both before the body is read.
    let (status, body) = post("/v1/sources/dovecot", &batch(1), Some(("", INGEST_TOKEN)), true).await;
    assert_eq!(status, 401, "the ingest token on a Dovecot route: {body}");
    let (status, body) = post(
        "/v1/sources/dovecot/events",
        "{}",
        Some(("dovecot", INGEST_TOKEN)),
        false,
    )
    .await;
    assert_eq!(status, 401, "the ingest token on the exporter route: {body}");
    let r = http
        .post(format!("http://{}/v1/events", operator.ingest))
        .bearer_auth(DOVECOT_TOKEN)
        .header("content-type", "application/json")
        .body(json!({"type": "message.received", "mailbox": ALICE}).to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401, "the Dovecot token on /v1/events");
    let (status, body) = post("/v1/sources/dovecot", &batch(2), Some(("", DOVECOT_TOKEN)), true).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "version", "{body}");
    let (status, body) = post(
        "/v1/sources/dovecot",
        r#"{"version": 1}"#,
        Some(("", DOVECOT_TOKEN)),
        true,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = post("/v1/sources/dovecot", &batch(1), None, true).await;
    assert_eq!(status, 401);
    let (status, body) = post(
        "/v1/sources/dovecot",
        &batch(1),
        Some(("dovecot", DOVECOT_TOKEN)),
        false,
    )
    .await;
    assert_eq!(status, 202, "Basic credentials carry the token: {body}");
    let exported = json!({"event": "imap_command_finished", "fields": {"user": ALICE, "cmd_name": "SELECT",
                                                                     "tagged_reply_state": "OK"}});
    let (status, body) = post(
        "/v1/sources/dovecot/events",
        &exported.to_string(),
        Some(("dovecot", DOVECOT_TOKEN)),
        false,
    )
    .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(0)),
        "not a change: taken, nothing stored"
    );
    let r = http
        .post(format!("http://{}/v1/sources/dovecot", operator.ingest))
        .bearer_auth(DOVECOT_TOKEN)
        .header("content-type", "application/x-ndjson")
        .body(batch(1))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 415);
}

const HELPDESK: &str = "alice@example.test*helpdesk-admin";

/// Reads, logins, forwarding rules and ACL grants against a real Dovecot with the shipped
/// exporter configuration: each user action is exactly one event of its type at the
/// receiver, through MailboxFilters — a first read, a BODY.PEEK re-read, a read by another
/// administrator's master session, a POP3 RETR, a failed and a successful login; a
/// 2,000-message FETCH is one `mailbox.bulk_access`; a Sieve upload with an external
/// redirect is flagged by a `forwarding: external` filter and an internal one is not; an
/// ACL grant is selected by `acl: granted`; mailhook's own reconciler sessions are
/// labelled and left out unless a filter asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_logins_forwarding_and_grants_in_a_real_dovecot_are_one_event_each() {
    let ns = TestNamespace::new("dovecot-access").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let (master_password, store) = scratch(&ns);
    let (password_flag, store_flag) = (master_password.display().to_string(), store.display().to_string());
    let mut operator =
        Operator::start_with(&ns, &["--internal-domains", "example.test", "--store-dir", &store_flag]).await;
    let sub = |name: &str, path: &str, filter: &str, types: &str| {
        format!(
            "apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: {name}}}\nspec:\n  \
             endpoint: {{url: '{}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
             filterRefs: [{filter}]\n  eventTypes: {types}\n---\n",
            receiver.url(path)
        )
    };
    apply(
        &ns,
        &format!(
            "{}apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: alice}}\nspec:\n  \
             mailboxes: ['alice@example.test']\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: external-forwarding}}\nspec:\n  \
             forwarding: external\n  flag: {{name: external-forwarding, severity: high}}\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: acl-grants}}\nspec:\n  \
             acl: granted\n---\n\
             apiVersion: mailhook.io/v1alpha1\nkind: MailboxFilter\nmetadata: {{name: mailhook-own}}\nspec:\n  \
             mailhookSessions: true\n---\n{}{}{}{}{}{}",
            signing_secret(SIEM_SECRET),
            sub("received", "/received", "alice", "[message.received]"),
            sub(
                "access",
                "/access",
                "alice",
                "[message.accessed, mailbox.bulk_access, mailbox.login]"
            ),
            sub("config", "/config", "alice", "[mailbox.config_changed]"),
            sub(
                "compliance",
                "/compliance",
                "external-forwarding",
                "[compliance.flagged]"
            ),
            sub("grants", "/grants", "acl-grants", "[mailbox.config_changed]"),
            sub("own", "/own", "mailhook-own", "[]"),
        ),
    );
    for name in ["received", "access", "config", "compliance", "grants", "own"] {
        wait_ready(&ns, name).await;
    }
    let dovecot = Dovecot::start(operator.ingest, DOVECOT_TOKEN);
    let (imap, sieve) = (dovecot.imap().to_string(), dovecot.sieve().to_string());
    operator.kill();
    let mut flags = reconciler_flags(&imap, &password_flag).to_vec();
    flags.extend([
        "--dovecot-imap-tls",
        "none",
        "--dovecot-managesieve-addr",
        &sieve,
        "--dovecot-access-window",
        "3s",
        "--dovecot-bulk-threshold",
        "100",
    ]);
    operator.restart_with(&flags).await;
    let expect = |path: &'static str| Expectations {
        receiver: &receiver,
        path,
        seen: 0,
    };
    let (mut received, mut access, mut config, mut compliance, mut grants) = (
        expect("/received"),
        expect("/access"),
        expect("/config"),
        expect("/compliance"),
        expect("/grants"),
    );
    let m1 = "<read-me@outside.example>";
    dovecot.act(
        "deliver",
        &[ALICE, m1, "Quartalszahlen", "Émile <emile@outside.example>"],
    );
    received
        .next("delivery", &[event("message.received", json!({"messageId": m1}))])
        .await;
    let login = |service: &str| {
        event(
            "mailbox.login",
            json!({"mailbox": ALICE, "activity": {"user": ALICE, "service": service, "remoteIp": "127.0.0.1",
                   "login": {"outcome": "succeeded", "mechanism": "PLAIN", "attempts": 1}}}),
        )
    };
    let read = |service: &str, reasons: Value| {
        event(
            "message.accessed",
            json!({"mailbox": ALICE, "folder": "INBOX", "messageId": m1, "subject": "Quartalszahlen",
                   "activity": {"user": ALICE, "service": service, "remoteIp": "127.0.0.1", "uid": 1,
                                "access": {"reasons": reasons}}}),
        )
    };

    dovecot.act("read", &[ALICE, "INBOX", m1]);
    let got = access
        .next(
            "a first read",
            &[
                login("imap"),
                read("imap", json!(["imap:cmd_uid_fetch", "imap:fetch_body"])),
            ],
        )
        .await;
    let accessed = got.iter().find(|g| g["type"] == "message.accessed").expect("read");
    assert_eq!(accessed["data"]["activity"]["access"]["command"], "UID FETCH");
    assert!(accessed["data"]["activity"].get("adminSession").is_none());
    dovecot.act("peek", &[ALICE, "INBOX", m1]);
    access
        .next(
            "a BODY.PEEK re-read",
            &[
                login("imap"),
                read("imap", json!(["imap:cmd_uid_fetch", "imap:fetch_body"])),
            ],
        )
        .await;
    dovecot.act("read", &[HELPDESK, "INBOX", m1]);
    let got = access
        .next(
            "a read by another administrator's master session",
            &[
                event(
                    "mailbox.login",
                    json!({"activity": {"user": ALICE, "authUser": "helpdesk-admin", "adminSession": true}}),
                ),
                event(
                    "message.accessed",
                    json!({"messageId": m1, "activity": {"user": ALICE, "authUser": "helpdesk-admin", "adminSession": true}}),
                ),
            ],
        )
        .await;
    assert!(
        got.iter()
            .all(|g| g["data"]["activity"].get("mailhookSession").is_none())
    );
    dovecot.act("pop3read", &[ALICE, "1"]);
    // POP3's reads carry no client address: the session's login gives it.
    access
        .next("a POP3 RETR", &[login("pop3"), read("pop3", json!(["pop3:cmd_retr"]))])
        .await;
    dovecot.act("loginfail", &[ALICE]);
    access
        .next(
            "a failed login",
            &[event(
                "mailbox.login",
                json!({"activity": {"user": ALICE, "service": "imap", "remoteIp": "127.0.0.1",
                       "login": {"outcome": "failed", "reason": "password_mismatch", "attempts": 1}}}),
            )],
        )
        .await;
    dovecot.act("login", &[ALICE]);
    access.next("a successful login", &[login("imap")]).await;
    access.no_more("logins and reads").await;

    // Bulk: 2,000 messages appended (one login), then fetched in one command.
    dovecot.act("create", &[ALICE, "Archiv"]);
    dovecot.act("appendmany", &[ALICE, "Archiv", "2000", "bulk"]);
    access
        .next(
            "the creating and the appending sessions' logins",
            &[login("imap"), login("imap")],
        )
        .await;
    let fetched = dovecot.act("bulkread", &[ALICE, "Archiv"]);
    assert!(fetched.contains("2000"), "bulkread fetched: {fetched}");
    let got = access
        .next(
            "a 2,000-message FETCH",
            &[
                login("imap"),
                event(
                    "mailbox.bulk_access",
                    json!({"folder": "Archiv", "activity": {"user": ALICE, "service": "imap",
                           "bulk": {"folders": ["Archiv"]}}}),
                ),
            ],
        )
        .await;
    let bulk = got.iter().find(|g| g["type"] == "mailbox.bulk_access").expect("bulk");
    let b = &bulk["data"]["activity"]["bulk"];
    assert!(b["firstAt"].as_str() <= b["lastAt"].as_str());
    // Every read Dovecot handed to its exporter is counted. On a loaded machine Dovecot's
    // IMAP process can end its session before its stats process took all its events, and
    // those never reach the exporter (Dovecot logs nothing): mailhook refused none.
    let reads = b["reads"].as_u64().expect("a count");
    assert!((101..=2000).contains(&reads), "reads counted: {reads}");
    if reads < 2000 {
        eprintln!("the bulk event counts {reads} of 2000 reads: Dovecot did not export the rest");
    }
    let metrics = operator.metrics().await;
    assert!(
        !metrics.contains(r#"mailhook_events_ingested_total{outcome="rejected",source="dovecot"}"#)
            && !metrics.contains(r#"mailhook_listener_refused_total{listener="ingest""#),
        "mailhook refused none of Dovecot's posts"
    );
    access.no_more("one bulk event, no single reads").await;

    // Sieve: an internal redirect uploaded and activated is not flagged; replacing the
    // active script with an external redirect is, once.
    dovecot.act("putscript", &[ALICE, "rules", "redirect \"bob@example.test\";\r\n"]);
    dovecot.act("setactive", &[ALICE, "rules"]);
    let internal = json!({"kind": "sieve", "target": "rules",
                          "forwarding": {"external": false, "targets": [{"address": "bob@example.test", "domain": "example.test", "action": "redirect", "external": false}]}});
    let mut put = internal.clone();
    put["command"] = json!("PUTSCRIPT");
    let mut activated = internal.clone();
    activated["command"] = json!("SETACTIVE");
    config
        .next(
            "an internal redirect uploaded, then activated",
            &[
                event(
                    "mailbox.config_changed",
                    json!({"activity": {"service": "managesieve", "change": put}}),
                ),
                event("mailbox.config_changed", json!({"activity": {"change": activated}})),
            ],
        )
        .await;
    dovecot.act(
        "putscript",
        &[
            ALICE,
            "rules",
            "require [\"copy\"];\r\nredirect :copy \"boss@outside.example\";\r\n",
        ],
    );
    config
        .next(
            "an external redirect uploaded over the active script",
            &[event(
                "mailbox.config_changed",
                json!({"activity": {"change": {"command": "PUTSCRIPT", "forwarding": {"external": true,
                       "targets": [{"address": "boss@outside.example", "domain": "outside.example", "action": "redirect",
                       "external": true}]}}}}),
            )],
        )
        .await;
    let flagged = compliance
        .next(
            "the external redirect flagged",
            &[event(
                "compliance.flagged",
                json!({"flags": [{"name": "external-forwarding", "severity": "high", "filter": "external-forwarding"}],
                       "activity": {"change": {"forwarding": {"external": true}}}}),
            )],
        )
        .await;
    assert_eq!(flagged.len(), 1);
    compliance.no_more("the internal redirect is not flagged").await;

    // ACL: a grant of read rights to bob.
    dovecot.act("setacl", &[ALICE, "INBOX", "bob@example.test", "lr"]);
    let grant = json!({"activity": {"change": {"kind": "acl", "command": "SETACL", "acl": {"folder": "INBOX",
                       "identifier": "bob@example.test", "mode": "replace", "rights": ["lookup", "read"],
                       "granted": true, "readGranted": true}}}});
    grants
        .next("an ACL grant", &[event("mailbox.config_changed", grant.clone())])
        .await;
    config
        .next("the ACL change", &[event("mailbox.config_changed", grant)])
        .await;
    grants.no_more("Sieve changes are not ACL grants").await;
    config.no_more("one event per change").await;

    // The users' own ManageSieve and IMAP sessions above logged in; mailhook's own reads
    // of the script (as its master user) did too, and are left out.
    access
        .next(
            "the Sieve and ACL sessions' logins",
            &[login("sieve"), login("sieve"), login("sieve"), login("imap")],
        )
        .await;

    // mailhook's own reconciler logged in to look at alice's mailbox: labelled, left out
    // of every filter above, and there for a filter that asks.
    let own = eventually(
        "the reconciler's login",
        || receiver.deliveries(),
        |d| !verified_at(d, "/own").is_empty(),
    )
    .await;
    for r in verified_at(&own, "/own") {
        let body = r.json();
        assert_eq!(body["type"], "mailbox.login", "{body:#}");
        assert_eq!(body["data"]["activity"]["mailhookSession"], true, "{body:#}");
        assert_eq!(body["data"]["activity"]["authUser"], "mailhook-admin", "{body:#}");
    }
    access.no_more("mailhook's own sessions left out").await;
    drop(operator);
    let _ = std::fs::remove_file(&master_password);
    let _ = std::fs::remove_dir_all(&store);
}
