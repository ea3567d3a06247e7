use super::*;
use crate::api::Direction;

const USER: &str = "alice@example.test";

fn key(folder: &str, uid_validity: u32, uid: u32) -> MessageKey {
    MessageKey {
        user: USER.into(),
        folder: folder.into(),
        uid_validity,
        uid,
    }
}

fn message(id: &str, seen_at: i64) -> IndexedMessage {
    IndexedMessage {
        message_id: Some(id.into()),
        subject: Some("Grüße".into()),
        seen_at,
        ..Default::default()
    }
}

fn folder(v: u32, next: u32, uids: &[u32]) -> FolderNow {
    FolderNow {
        uid_validity: v,
        uid_next: next,
        uids: uids.iter().copied().collect(),
        unreadable: false,
    }
}

fn watermarked(v: u32, next: Option<u32>) -> crate::source::dovecot::index::IndexedFolder {
    crate::source::dovecot::index::IndexedFolder {
        uid_validity: Some(v),
        uid_next: next,
    }
}

fn cfg() -> DovecotConfig {
    DovecotConfig {
        sent_folders: vec!["Sent".into()],
        trash_folders: vec!["Trash".into()],
        internal_domains: vec!["example.test".into()],
        separator: Some('/'),
        ..Default::default()
    }
}

#[test]
fn a_first_look_sets_watermarks_and_reports_nothing_new() {
    let mut index = IndexedMailbox::default();
    index.messages.insert(key("INBOX", 5, 1), message("<a@x>", 10));
    index.folders.insert("INBOX".into(), Default::default());
    let now: Snapshot = [
        ("INBOX".to_string(), folder(5, 40, &[1, 2, 3, 39])),
        ("Drafts".to_string(), folder(6, 2, &[1])),
    ]
    .into();
    let p = plan(USER, &now, &index, 100);
    assert!(p.first_look);
    assert!(
        p.arrived.is_empty() && p.created.is_empty() && p.vanished.is_empty(),
        "{p:?}"
    );
    assert_eq!(p.watermarks.len(), 2);
}

#[test]
fn changes_while_away_are_found_and_named() {
    let mut index = IndexedMailbox::default();
    index.folders.insert("INBOX".into(), watermarked(5, Some(10)));
    index.folders.insert("Archiv".into(), watermarked(7, Some(4)));
    index.folders.insert("Trash".into(), watermarked(8, Some(3)));
    index.folders.insert("Alt".into(), watermarked(9, Some(1)));
    index.folders.insert("Weg".into(), watermarked(11, Some(1)));
    index.messages.insert(key("Archiv", 7, 3), message("<m1@x>", 10));
    index.messages.insert(key("Trash", 8, 2), message("<m3@x>", 10));
    index.messages.insert(key("INBOX", 5, 9), message("<kept@x>", 10));
    // Indexed after the snapshot began: the live path's, not a vanished one.
    index.messages.insert(key("INBOX", 5, 12), message("<late@x>", 100));
    let now: Snapshot = [
        ("INBOX".to_string(), folder(5, 13, &[2, 9, 10, 11])),
        ("Archiv".to_string(), folder(7, 4, &[])),
        ("Trash".to_string(), folder(8, 3, &[])),
        ("Neu".to_string(), folder(9, 1, &[])),
        ("Offline".to_string(), folder(12, 1, &[])),
    ]
    .into();
    let p = plan(USER, &now, &index, 100);
    assert!(!p.first_look);
    assert_eq!(p.renamed, vec![("Alt".into(), "Neu".into(), 9)]);
    assert_eq!(p.created, vec![("Offline".into(), 12)]);
    assert_eq!(p.deleted, vec![("Weg".into(), Some(11))]);
    assert_eq!(
        p.vanished.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        vec![key("Archiv", 7, 3), key("Trash", 8, 2)]
    );
    assert_eq!(
        p.arrived,
        vec![key("INBOX", 5, 10), key("INBOX", 5, 11)],
        "UID 2 lies below the watermark: it was there before mailhook looked"
    );

    let headers: BTreeMap<MessageKey, IndexedMessage> = [
        (key("INBOX", 5, 10), message("<m1@x>", 100)),
        (
            key("INBOX", 5, 11),
            IndexedMessage {
                from: Some("emile@outside.example".into()),
                ..message("<m4@x>", 100)
            },
        ),
    ]
    .into();
    let m = findings(USER, p, &headers, &cfg(), jiff::Timestamp::UNIX_EPOCH);
    let got: Vec<(&str, Option<&str>, Option<&str>)> = m
        .events
        .iter()
        .map(|e| (e.event_type.as_str(), e.folder.as_deref(), e.message_id.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("folder.changed", Some("Neu"), None),
            ("folder.changed", Some("Offline"), None),
            ("folder.changed", Some("Weg"), None),
            ("message.moved", Some("INBOX"), Some("<m1@x>")),
            ("message.deleted", Some("Trash"), Some("<m3@x>")),
            ("message.received", Some("INBOX"), Some("<m4@x>")),
        ]
    );
    assert!(
        m.events
            .iter()
            .all(|e| e.activity.as_ref().is_some_and(|a| a.reconciled))
    );
    let moved = &m.events[3];
    assert_eq!(
        moved.activity.as_ref().and_then(|a| a.previous_folder.as_deref()),
        Some("Archiv")
    );
    assert_eq!(
        moved.producer_event_id.as_deref(),
        Some("dovecot:alice@example.test:INBOX:5:10:in"),
        "the id the live notification would have had"
    );
    assert_eq!(
        m.events[4].producer_event_id.as_deref(),
        Some("dovecot:alice@example.test:Trash:8:2:out")
    );
    assert_eq!(m.events[5].direction, Some(Direction::Inbound));
    assert!(m.index.contains(&IndexChange::Remove(key("Archiv", 7, 3))));
    assert!(m.index.contains(&IndexChange::PutFolder {
        user: USER.into(),
        folder: "INBOX".into(),
        uid_validity: Some(5),
        uid_next: Some(13),
    }));
}

#[test]
fn a_folder_known_by_its_messages_counts_what_lies_above_them() {
    let mut index = IndexedMailbox::default();
    index.folders.insert("INBOX".into(), watermarked(5, Some(3)));
    index.folders.insert("Sent".into(), watermarked(6, None));
    index.messages.insert(key("Sent", 6, 4), message("<s@x>", 10));
    let now: Snapshot = [
        ("INBOX".to_string(), folder(5, 3, &[])),
        ("Sent".to_string(), folder(6, 8, &[1, 4, 7])),
    ]
    .into();
    let p = plan(USER, &now, &index, 100);
    assert_eq!(p.arrived, vec![key("Sent", 6, 7)]);
    let headers = [(
        key("Sent", 6, 7),
        IndexedMessage {
            to: vec!["bob@else.example".into()],
            ..message("<s2@x>", 100)
        },
    )]
    .into();
    let m = findings(USER, p, &headers, &cfg(), jiff::Timestamp::UNIX_EPOCH);
    assert_eq!(m.events.len(), 1);
    assert_eq!(m.events[0].event_type, EventType::MessageSent);
    assert_eq!(m.events[0].direction, Some(Direction::Outbound));
}

#[test]
fn an_unreadable_folder_is_neither_gone_nor_new_and_a_rename_drops_vanished_entries_first() {
    let mut index = IndexedMailbox::default();
    index.folders.insert("INBOX".into(), watermarked(5, Some(1)));
    index.folders.insert("Odd".into(), watermarked(6, Some(1)));
    index.folders.insert("Alt".into(), watermarked(9, Some(1)));
    index.folders.insert("Leer".into(), watermarked(10, None));
    index.messages.insert(key("Odd", 6, 1), message("<odd@x>", 10));
    index.messages.insert(key("Alt", 9, 1), message("<gone@x>", 10));
    let now: Snapshot = [
        ("INBOX".to_string(), folder(5, 1, &[])),
        (
            "Odd".to_string(),
            FolderNow {
                unreadable: true,
                ..FolderNow::default()
            },
        ),
        ("Neu".to_string(), folder(9, 2, &[])),
        ("Leer".to_string(), folder(10, 3, &[1, 2])),
    ]
    .into();
    let p = plan(USER, &now, &index, 100);
    assert!(p.deleted.is_empty() && p.created.is_empty(), "{p:?}");
    assert_eq!(p.vanished.len(), 1, "only the message of the renamed folder: {p:?}");
    assert_eq!(
        p.arrived,
        vec![key("Leer", 10, 1), key("Leer", 10, 2)],
        "a folder created live and empty since: all of it is new"
    );
    let m = findings(USER, p, &BTreeMap::new(), &cfg(), jiff::Timestamp::UNIX_EPOCH);
    let remove = m.index.iter().position(|c| *c == IndexChange::Remove(key("Alt", 9, 1)));
    let rename = m
        .index
        .iter()
        .position(|c| matches!(c, IndexChange::RenameFolder { .. }));
    assert!(
        remove < rename,
        "removed under the old name before the rename: {:?}",
        m.index
    );
}

#[test]
fn folder_names_round_trip_through_modified_utf7() {
    for (utf8, imap) in [
        ("INBOX", "INBOX"),
        ("Projekte/Größe", "Projekte/Gr&APYA3w-e"),
        ("A & B", "A &- B"),
        ("日本語", "&ZeVnLIqe-"),
        ("😀", "&2D3eAA-"),
    ] {
        assert_eq!(encode_folder(utf8), imap, "{utf8}");
        assert_eq!(decode_folder(imap).as_deref(), Some(utf8), "{imap}");
    }
    for bad in ["&", "&ZeVn", "&A-", "&,,,,-"] {
        assert_eq!(decode_folder(bad), None, "{bad}");
    }
}

#[test]
fn headers_name_the_message_and_garbage_names_nothing() {
    let h = parse_headers(
        b"Message-ID: <m4@outside.example>\r\nSubject: =?utf-8?q?W=C3=A4hrend?=\r\nFrom: Emile <Emile@Outside.example>\r\nTo: alice@example.test\r\n\r\n",
        7,
    );
    assert_eq!(h.message_id.as_deref(), Some("<m4@outside.example>"));
    assert_eq!(h.subject.as_deref(), Some("Während"));
    assert_eq!(h.from.as_deref(), Some("emile@outside.example"));
    assert_eq!(h.to, vec!["alice@example.test"]);
    assert_eq!(parse_headers(b"\xff\xfe\x00", 7).seen_at, 7);
}
