use crate::event::ConfigKind;
use std::collections::HashMap;

use serde_json::json;

use super::*;

fn cfg() -> DovecotConfig {
    DovecotConfig {
        sent_folders: vec!["Sent".into()],
        trash_folders: vec!["Trash".into()],
        internal_domains: vec!["example.test".into()],
        separator: Some('/'),
        ..Default::default()
    }
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000).expect("time")
}

fn batch(user: &str, auth_user: &str, service: &str, events: serde_json::Value) -> Batch {
    serde_json::from_value(json!({
        "version": 1, "batch": "sess-1:7", "user": user, "authUser": auth_user,
        "service": service, "remoteIp": "192.0.2.7", "session": "sess-1", "at": 1_800_000_000,
        "events": events,
    }))
    .expect("batch")
}

fn key(folder: &str, uid_validity: u32, uid: u32) -> MessageKey {
    MessageKey {
        user: "alice@example.test".into(),
        folder: folder.into(),
        uid_validity,
        uid,
    }
}

fn known(id: &str) -> IndexedMessage {
    IndexedMessage {
        message_id: Some(id.into()),
        subject: Some("Grüße aus Köln".into()),
        from: Some("emile@outside.example".into()),
        to: vec!["alice@example.test".into()],
        seen_at: 1,
    }
}

/// Maps with an index holding `index` before the batch.
fn map(b: Batch, index: &[(MessageKey, IndexedMessage)]) -> Mapped {
    let index: HashMap<MessageKey, IndexedMessage> = index.iter().cloned().collect();
    map_batch(b, &mut |k| index.get(k).cloned(), &cfg(), now()).expect("maps")
}

fn types(m: &Mapped) -> Vec<&str> {
    m.events.iter().map(|e| e.event_type.as_str()).collect()
}

fn activity(e: &MailboxEvent) -> &Activity {
    e.activity.as_deref().expect("activity")
}

#[test]
fn a_delivery_is_received_named_and_indexed_and_inbox_creation_is_no_event() {
    let m = map(
        batch(
            "alice@example.test",
            "alice@example.test",
            "lmtp",
            json!([
                {"event": "MailboxCreate", "mailbox": "INBOX"},
                {"event": "MessageNew", "mailbox": "INBOX", "uid": 1, "uidValidity": 1796444796,
                 "messageId": "<m1@outside.example>", "from": "Emile@Outside.example", "to": "alice@example.test",
                 "subject": "Grüße aus Köln", "flags": [], "keywords": []},
            ]),
        ),
        &[],
    );
    assert_eq!(types(&m), vec!["message.received"]);
    let e = &m.events[0];
    assert_eq!(e.mailbox, "alice@example.test");
    assert_eq!(e.source, Source::Dovecot);
    assert_eq!(e.message_id.as_deref(), Some("<m1@outside.example>"));
    assert_eq!(e.subject.as_deref(), Some("Grüße aus Köln"));
    assert_eq!(e.from.as_deref(), Some("emile@outside.example"));
    assert_eq!(e.folder.as_deref(), Some("INBOX"));
    assert_eq!(e.direction, Some(Direction::Inbound));
    assert_eq!(
        e.producer_event_id.as_deref(),
        Some("dovecot:alice@example.test:INBOX:1796444796:1:in"),
        "named by its place: the reconciler's finding of it is the same event"
    );
    let a = activity(e);
    assert_eq!((a.uid, a.uid_validity), (Some(1), Some(1796444796)));
    assert_eq!(a.service.as_deref(), Some("lmtp"));
    assert!(!a.admin_session && a.auth_user.is_none(), "the owner's own session");
    assert_eq!(
        m.index,
        vec![IndexChange::Put(
            key("INBOX", 1796444796, 1),
            IndexedMessage {
                seen_at: now().as_second(),
                ..known("<m1@outside.example>")
            }
        )]
    );
}

#[test]
fn selecting_a_folder_clears_recent_and_yields_nothing() {
    let m = map(
        batch(
            "alice@example.test",
            "alice@example.test",
            "imap",
            json!([{"event": "FlagsClear", "mailbox": "INBOX", "uid": 1, "uidValidity": 5, "flags": [], "keywords": []}]),
        ),
        &[],
    );
    assert!(m.events.is_empty() && m.index.is_empty(), "{:?}", m.events);
}

#[test]
fn flags_set_and_cleared_name_the_message() {
    let before = [(key("INBOX", 5, 1), known("<m1@x>"))];
    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "FlagsClear", "mailbox": "INBOX", "uid": 1, "uidValidity": 5, "flags": []},
                {"event": "FlagsSet", "mailbox": "INBOX", "uid": 1, "uidValidity": 5, "flags": ["\\Flagged", "\\Recent"], "keywords": ["$Important"]},
                {"event": "FlagsClear", "mailbox": "INBOX", "uid": 1, "uidValidity": 5, "flags": ["\\Seen"]},
                {"event": "FlagsSet", "mailbox": "INBOX", "uid": 1, "uidValidity": 5, "flags": ["\\Seen"]},
                {"event": "MessageRead", "mailbox": "INBOX", "uid": 1, "uidValidity": 5},
            ]),
        ),
        &before,
    );
    assert_eq!(
        types(&m),
        vec!["message.flagged", "message.unflagged", "message.flagged"]
    );
    assert_eq!(activity(&m.events[0]).imap_flags, vec!["\\Flagged", "$Important"]);
    assert_eq!(activity(&m.events[1]).imap_flags, vec!["\\Seen"]);
    assert!(m.events.iter().all(|e| e.message_id.as_deref() == Some("<m1@x>")));
    assert!(m.index.is_empty(), "flags do not change what a message is");
}

#[test]
fn a_move_is_one_event_naming_both_folders_and_the_message() {
    let before = [(key("INBOX", 5, 1), known("<m1@x>"))];
    let m = map(
        batch(
            "alice@example.test",
            "alice@example.test",
            "imap",
            json!([
                {"event": "MessageAppend", "mailbox": "Projekte/Größe", "uid": 4, "uidValidity": 9, "messageId": "<m1@x>",
                 "from": "emile@outside.example", "subject": "Grüße aus Köln"},
                {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 1, "uidValidity": 5},
            ]),
        ),
        &before,
    );
    assert_eq!(types(&m), vec!["message.moved"]);
    let e = &m.events[0];
    assert_eq!(e.folder.as_deref(), Some("Projekte/Größe"));
    assert_eq!(activity(e).previous_folder.as_deref(), Some("INBOX"));
    assert_eq!(e.message_id.as_deref(), Some("<m1@x>"));
    assert_eq!(e.to, vec!["alice@example.test"], "what the source's entry knew");
    assert_eq!((activity(e).uid, activity(e).uid_validity), (Some(4), Some(9)));
    assert!(m.index.contains(&IndexChange::Remove(key("INBOX", 5, 1))));
    assert!(matches!(&m.index[0], IndexChange::Put(k, _) if *k == key("Projekte/Größe", 9, 4)));
}

#[test]
fn a_move_of_messages_the_index_never_saw_pairs_in_order() {
    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "MessageAppend", "mailbox": "Archiv", "uid": 1, "uidValidity": 9, "messageId": "<a@x>"},
                {"event": "MessageAppend", "mailbox": "Archiv", "uid": 2, "uidValidity": 9, "messageId": "<b@x>"},
                {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 10, "uidValidity": 5},
                {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 11, "uidValidity": 5},
            ]),
        ),
        &[],
    );
    assert_eq!(types(&m), vec!["message.moved", "message.moved"]);
    assert_eq!(m.events[0].message_id.as_deref(), Some("<a@x>"));
    assert_eq!(m.events[1].message_id.as_deref(), Some("<b@x>"));
}

#[test]
fn deletions_soft_by_flag_or_trash_and_hard_by_expunge() {
    let before = [
        (key("INBOX", 5, 1), known("<m1@x>")),
        (key("INBOX", 5, 2), known("<m2@x>")),
    ];
    // \Deleted is reported twice (FlagsSet and MessageTrash): one event. \Seen set with
    // it is a flag change of its own.
    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "FlagsSet", "mailbox": "INBOX", "uid": 1, "uidValidity": 5, "flags": ["\\Deleted", "\\Seen"]},
                {"event": "MessageTrash", "mailbox": "INBOX", "uid": 1, "uidValidity": 5},
                {"event": "MessageRead", "mailbox": "INBOX", "uid": 1, "uidValidity": 5},
            ]),
        ),
        &before,
    );
    assert_eq!(types(&m), vec!["message.deleted", "message.flagged"]);
    assert_ne!(
        m.events[0].producer_event_id, m.events[1].producer_event_id,
        "two events of one notification: neither is the other's duplicate"
    );
    assert_eq!(activity(&m.events[0]).stage, Some(DeleteStage::Soft));
    assert_eq!(m.events[0].message_id.as_deref(), Some("<m1@x>"));

    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "MessageAppend", "mailbox": "Trash", "uid": 3, "uidValidity": 8, "messageId": "<m2@x>"},
                {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 2, "uidValidity": 5},
            ]),
        ),
        &before,
    );
    assert_eq!(types(&m), vec!["message.deleted"], "a move to the trash");
    let e = &m.events[0];
    assert_eq!(activity(e).stage, Some(DeleteStage::Soft));
    assert_eq!(e.folder.as_deref(), Some("Trash"));
    assert_eq!(activity(e).previous_folder.as_deref(), Some("INBOX"));

    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 1, "uidValidity": 5},
                {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 99, "uidValidity": 5},
            ]),
        ),
        &before,
    );
    assert_eq!(types(&m), vec!["message.deleted", "message.deleted"]);
    assert!(m.events.iter().all(|e| activity(e).stage == Some(DeleteStage::Hard)));
    assert_eq!(m.events[0].message_id.as_deref(), Some("<m1@x>"));
    assert_eq!(m.events[1].message_id, None, "never indexed: named by its UID only");
    assert_eq!(activity(&m.events[1]).uid, Some(99));
}

#[test]
fn an_append_to_sent_is_sent_mail_and_elsewhere_only_indexed() {
    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "MessageAppend", "mailbox": "Sent", "uid": 1, "uidValidity": 3, "messageId": "<s1@example.test>",
                 "from": "alice@example.test", "to": "bob@else.example", "subject": "sent one"},
                {"event": "MessageAppend", "mailbox": "Drafts", "uid": 1, "uidValidity": 4, "messageId": "<d1@example.test>"},
            ]),
        ),
        &[],
    );
    assert_eq!(types(&m), vec!["message.sent"]);
    assert_eq!(
        m.events[0].producer_event_id.as_deref(),
        Some("dovecot:alice@example.test:Sent:3:1:in")
    );
    assert_eq!(m.events[0].direction, Some(Direction::Outbound));
    assert_eq!(m.events[0].to, vec!["bob@else.example"]);
    assert_eq!(m.index.len(), 2, "both appends are indexed");
}

#[test]
fn folder_changes_carry_their_action_and_move_the_index() {
    let m = map(
        batch(
            "alice@example.test",
            "",
            "imap",
            json!([
                {"event": "MailboxCreate", "mailbox": "Projekte"},
                {"event": "MailboxSubscribe", "mailbox": "Projekte"},
                {"event": "MailboxRename", "mailbox": "Archiv", "mailboxOld": "Projekte"},
                {"event": "MailboxUnsubscribe", "mailbox": "Archiv"},
                {"event": "MailboxDelete", "mailbox": "Archiv"},
                {"event": "SomethingNew", "mailbox": "Archiv"},
            ]),
        ),
        &[],
    );
    assert_eq!(types(&m), vec!["folder.changed"; 5]);
    let actions: Vec<_> = m.events.iter().map(|e| activity(e).action).collect();
    use FolderAction::*;
    assert_eq!(
        actions,
        vec![
            Some(Created),
            Some(Subscribed),
            Some(Renamed),
            Some(Unsubscribed),
            Some(Deleted)
        ]
    );
    assert_eq!(activity(&m.events[2]).previous_folder.as_deref(), Some("Projekte"));
    assert_eq!(m.events[2].folder.as_deref(), Some("Archiv"));
    assert_eq!(
        m.index,
        vec![
            IndexChange::PutFolder {
                user: "alice@example.test".into(),
                folder: "Projekte".into(),
                uid_validity: None,
                uid_next: None,
            },
            IndexChange::RenameFolder {
                user: "alice@example.test".into(),
                from: "Projekte".into(),
                to: "Archiv".into(),
                separator: Some('/'),
            },
            IndexChange::RemoveFolder {
                user: "alice@example.test".into(),
                folder: "Archiv".into()
            },
        ]
    );
}

#[test]
fn a_master_user_session_is_flagged_as_an_admin_session() {
    let m = map(
        batch(
            "alice@example.test",
            "mailhook-admin",
            "imap",
            json!([{"event": "MailboxCreate", "mailbox": "Hidden"}]),
        ),
        &[],
    );
    let a = activity(&m.events[0]);
    assert!(a.admin_session);
    assert_eq!(a.auth_user.as_deref(), Some("mailhook-admin"));
    assert_eq!(a.user, "alice@example.test");
    assert_eq!(a.remote_ip.as_deref(), Some("192.0.2.7"));
}

#[test]
fn a_resent_batch_has_the_same_producer_ids() {
    let events = json!([
        {"event": "MailboxCreate", "mailbox": "A"},
        {"event": "MessageExpunge", "mailbox": "INBOX", "uid": 1, "uidValidity": 5},
        {"event": "FlagsSet", "mailbox": "INBOX", "uid": 2, "uidValidity": 5, "flags": ["\\Seen"]},
    ]);
    let first = map(batch("alice@example.test", "", "imap", events.clone()), &[]);
    let again = map(batch("alice@example.test", "", "imap", events), &[]);
    let ids = |m: &Mapped| m.events.iter().map(|e| e.producer_event_id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(
        ids(&first),
        vec![
            Some("dovecot:sess-1:7:0".to_string()),
            Some("dovecot:alice@example.test:INBOX:5:1:out".to_string()),
            Some("dovecot:sess-1:7:2".to_string()),
        ]
    );
    assert_ne!(first.events[0].id, again.events[0].id);
}

#[test]
fn bad_batches_are_refused_naming_the_field() {
    let mut b = batch("alice@example.test", "", "imap", json!([]));
    b.version = 2;
    let e = map_batch(b, &mut |_| None, &cfg(), now()).unwrap_err();
    assert_eq!(e.field, "version");
    assert!(e.problem.contains("install the Lua script"), "{e}");
    let b = batch("", "", "imap", json!([]));
    assert_eq!(map_batch(b, &mut |_| None, &cfg(), now()).unwrap_err().field, "user");
    let b = batch(
        "alice@example.test",
        "",
        "imap",
        json!([{"event": "MessageExpunge", "uid": 1}]),
    );
    assert_eq!(
        map_batch(b, &mut |_| None, &cfg(), now()).unwrap_err().field,
        "events[0].mailbox"
    );
}

#[test]
fn users_that_are_not_addresses_keep_their_name() {
    assert_eq!(mailbox_of(" Alice "), "alice");
    assert_eq!(mailbox_of("Alice@Example.TEST"), "alice@example.test");
}

fn exported(event: &str, fields: serde_json::Value) -> Exported {
    serde_json::from_value(json!({
        "event": event, "hostname": "vm", "start_time": "2026-12-05T04:27:24.149430Z",
        "end_time": "2026-12-05T04:27:24.153597Z", "categories": ["imap"], "fields": fields,
    }))
    .expect("exported")
}

#[test]
fn exported_acl_metadata_and_sieve_changes_are_config_changes() {
    let acl = map_exported(
        exported(
            "imap_command_finished",
            json!({"user": "alice@example.test", "remote_ip": "127.0.0.1", "session": "s1", "cmd_tag": "A1",
                   "cmd_name": "SETACL", "cmd_args": "INBOX bob@example.test lr", "tagged_reply_state": "OK",
                   "duration": 4076}),
        ),
        now(),
    )
    .expect("an ACL change");
    assert_eq!(acl.event_type, EventType::MailboxConfigChanged);
    assert_eq!(acl.mailbox, "alice@example.test");
    assert_eq!(acl.occurred_at.to_string(), "2026-12-05T04:27:24.153597Z");
    let change = activity(&acl).change.clone().expect("change");
    assert_eq!(change.kind, ConfigKind::Acl);
    assert_eq!(
        first_imap_argument(r#""Sent Items" bob lr"#).as_deref(),
        Some("Sent Items")
    );
    assert_eq!(first_imap_argument(r#""a\"b" x"#).as_deref(), Some("a\"b"));
    assert_eq!(first_imap_argument(r#""open"#), None);
    assert_eq!(change.target.as_deref(), Some("INBOX"));
    assert_eq!(change.detail.as_deref(), Some("INBOX bob@example.test lr"));

    let metadata = map_exported(
        exported(
            "imap_command_finished",
            json!({"user": "alice@example.test", "cmd_name": "SETMETADATA", "mailbox": "INBOX", "tagged_reply_state": "OK"}),
        ),
        now(),
    )
    .expect("a metadata change");
    assert_eq!(
        activity(&metadata).change.as_ref().map(|c| c.kind),
        Some(ConfigKind::Metadata)
    );

    let sieve = map_exported(
        exported(
            "managesieve_command_finished",
            json!({"user": "alice@example.test", "session": "s2", "cmd_name": "PUTSCRIPT", "cmd_args": "\"forward\"",
                   "script_name": "forward"}),
        ),
        now(),
    )
    .expect("a Sieve change");
    let change = activity(&sieve).change.clone().expect("change");
    assert_eq!(
        (change.kind, change.target.as_deref()),
        (ConfigKind::Sieve, Some("forward"))
    );

    for (event, fields) in [
        (
            "imap_command_finished",
            json!({"user": "a@b.c", "cmd_name": "SETACL", "tagged_reply_state": "NO"}),
        ),
        (
            "imap_command_finished",
            json!({"user": "a@b.c", "cmd_name": "SELECT", "tagged_reply_state": "OK"}),
        ),
        (
            "managesieve_command_finished",
            json!({"user": "a@b.c", "cmd_name": "PUTSCRIPT", "error": "syntax"}),
        ),
        ("mail_opened", json!({"user": "a@b.c"})),
        (
            "imap_command_finished",
            json!({"cmd_name": "SETACL", "tagged_reply_state": "OK"}),
        ),
    ] {
        assert!(
            map_exported(exported(event, fields.clone()), now()).is_none(),
            "{event} {fields}"
        );
    }
}
