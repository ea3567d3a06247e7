//! The mailbox index: what each user's folders held when the Dovecot source last saw them,
//! so that a later change (a deletion, a move, a flag) can name the message, join it with
//! its journaled copy, and be told from a repeat. Kept in the store's keyed rows
//! (`store::rows`), one group per user, written in the same commit as the events it came
//! with. The layout of keys and bodies, renames and retention are this module's alone.
//!
//! A row's key within its user's group sorts by (folder, UIDVALIDITY, UID): the folder's
//! name and a NUL (a name never holds one), then both numbers big-endian. A folder's own
//! row is the folder part alone.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::store::rows::{Row, RowWrite, Rows, is_reserved};

/// A message's place in a mailbox: (user, folder, UIDVALIDITY, UID), as IMAP names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageKey {
    pub user: String,
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
}

/// What the index keeps of one message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexedMessage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Unix seconds it was indexed: retention counts from here. Read from the row's time
    /// (the same figure); still written in the body, which a replica of the release before
    /// this one needs to read the row during a rolling upgrade.
    #[serde(default)]
    pub seen_at: i64,
}

/// A message's row read back: its body, indexed at the row's time.
fn indexed(row: &Row) -> Option<IndexedMessage> {
    let mut message: IndexedMessage = serde_json::from_slice(&row.body).ok()?;
    message.seen_at = row.at;
    Some(message)
}

/// A change to the index, stored in the same commit as the events it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexChange {
    Put(MessageKey, IndexedMessage),
    Remove(MessageKey),
    /// The folder exists (kept even while it holds no known message), with its
    /// UIDVALIDITY when known.
    PutFolder {
        user: String,
        folder: String,
        uid_validity: Option<u32>,
        /// Every message below this UID was known when it was written (the reconciler's
        /// watermark).
        uid_next: Option<u32>,
    },
    /// The folder and every message known in it are gone.
    RemoveFolder {
        user: String,
        folder: String,
    },
    /// The folder and its messages now go by another name; with the hierarchy
    /// `separator`, so do its subfolders (`from/x` becomes `to/x`), as IMAP renames them.
    RenameFolder {
        user: String,
        from: String,
        to: String,
        separator: Option<char>,
    },
}

/// What the index knows of one user's mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexedMailbox {
    /// Every known folder, with what is known of it.
    pub folders: BTreeMap<String, IndexedFolder>,
    pub messages: BTreeMap<MessageKey, IndexedMessage>,
}

/// What the index keeps of a folder.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexedFolder {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid_validity: Option<u32>,
    /// The reconciler's watermark: every message below this UID was known when it looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid_next: Option<u32>,
}

/// Keys within a user's group. Pure.
mod key {
    use super::MessageKey;

    pub fn folder(folder: &str) -> Vec<u8> {
        let mut k = folder.as_bytes().to_vec();
        k.push(0);
        k
    }

    pub fn message(m: &MessageKey) -> Vec<u8> {
        let mut k = folder(&m.folder);
        k.extend_from_slice(&m.uid_validity.to_be_bytes());
        k.extend_from_slice(&m.uid.to_be_bytes());
        k
    }

    /// Whether a folder name can be part of a key.
    pub fn valid(name: &str) -> bool {
        !name.is_empty() && !name.contains('\0')
    }

    /// A key read back: (folder, (UIDVALIDITY, UID)); no message for a folder's own row.
    pub fn parse(key: &[u8]) -> Option<(String, Option<(u32, u32)>)> {
        let mut parts = key.splitn(2, |b| *b == 0);
        let folder = std::str::from_utf8(parts.next()?).ok()?.to_string();
        let rest = parts.next()?;
        let message = match rest.len() {
            0 => None,
            8 => {
                let (v, u) = rest.split_at(4);
                Some((
                    u32::from_be_bytes(v.try_into().ok()?),
                    u32::from_be_bytes(u.try_into().ok()?),
                ))
            }
            _ => return None,
        };
        Some((folder, message))
    }
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::io)
}

/// Whether `user` can name a mailbox's group: a valid group that is not one of
/// mailhook's own (a user name made up to look like one writes nothing).
fn valid_group(user: &str) -> bool {
    crate::store::rows::valid_group(user) && !is_reserved(user)
}

/// One message, if the index knows it.
pub fn message(rows: &dyn Rows, key: &MessageKey) -> Result<Option<IndexedMessage>, StoreError> {
    if !valid_group(&key.user) {
        return Ok(None);
    }
    Ok(rows.row(&key.user, &key::message(key))?.as_ref().and_then(indexed))
}

/// Every user the index knows (groups that are not a mailbox's are left out).
pub fn users(rows: &dyn Rows) -> Result<Vec<String>, StoreError> {
    Ok(rows.row_groups()?.into_iter().filter(|g| !is_reserved(g)).collect())
}

/// A folder's UIDVALIDITY as the index last knew it: its own row's, else that of the
/// messages indexed in it.
pub fn folder_validity(rows: &dyn Rows, user: &str, folder: &str) -> Result<Option<u32>, StoreError> {
    if !valid_group(user) || !key::valid(folder) {
        return Ok(None);
    }
    let marker = rows
        .row(user, &key::folder(folder))?
        .and_then(|row| serde_json::from_slice::<IndexedFolder>(&row.body).ok());
    if let Some(v) = marker.and_then(|m| m.uid_validity) {
        return Ok(Some(v));
    }
    // No marker (the live path writes none): the newest UIDVALIDITY among its messages,
    // so a recreated folder's stale rows do not name a read.
    Ok(mailbox(rows, user, Some(folder))?
        .messages
        .keys()
        .filter(|k| k.folder == folder)
        .map(|k| k.uid_validity)
        .max())
}

/// What the index knows of `user`'s mailbox (one folder, or all of them).
pub fn mailbox(rows: &dyn Rows, user: &str, folder: Option<&str>) -> Result<IndexedMailbox, StoreError> {
    let mut mailbox = IndexedMailbox::default();
    if !valid_group(user) {
        return Ok(mailbox);
    }
    let prefix = folder.map(key::folder).unwrap_or_default();
    for row in rows.rows(user, &prefix)? {
        let Some((folder, message)) = key::parse(&row.key) else {
            continue;
        };
        match message {
            Some((uid_validity, uid)) => {
                let Some(indexed) = indexed(&row) else {
                    continue;
                };
                let key = MessageKey {
                    user: user.to_string(),
                    folder: folder.clone(),
                    uid_validity,
                    uid,
                };
                mailbox.messages.insert(key, indexed);
                let known = mailbox.folders.entry(folder).or_default();
                if known.uid_validity.is_none() {
                    known.uid_validity = Some(uid_validity);
                }
            }
            None => {
                let marker: IndexedFolder = serde_json::from_slice(&row.body).unwrap_or_default();
                let entry = mailbox.folders.entry(folder).or_default();
                if marker.uid_validity.is_some() {
                    entry.uid_validity = marker.uid_validity;
                }
                entry.uid_next = marker.uid_next;
            }
        }
    }
    Ok(mailbox)
}

/// A row's (written at, body).
type Value = (i64, Vec<u8>);

/// (user, key) → value, or deleted: the rows a list of changes leaves.
type Net = BTreeMap<(String, Vec<u8>), Option<Value>>;

/// The row writes that apply `changes`, net: later changes see earlier ones of the same
/// list (a folder renamed after a message was put in it). Names that cannot be keys
/// (empty, or holding a NUL) are skipped.
pub fn writes(rows: &dyn Rows, changes: Vec<IndexChange>) -> Result<Vec<RowWrite>, StoreError> {
    let mut net: Net = BTreeMap::new();
    let now = jiff::Timestamp::now().as_second();
    for change in changes {
        match change {
            IndexChange::Put(key, message) => {
                if valid_group(&key.user) && key::valid(&key.folder) {
                    // The folder is known by its messages: no row of its own is needed.
                    let body = json(&message)?;
                    net.insert((key.user.clone(), key::message(&key)), Some((message.seen_at, body)));
                }
            }
            IndexChange::Remove(key) => {
                if valid_group(&key.user) {
                    net.insert((key.user.clone(), key::message(&key)), None);
                }
            }
            IndexChange::PutFolder {
                user,
                folder,
                uid_validity,
                uid_next,
            } => {
                if valid_group(&user) && key::valid(&folder) {
                    let marker = json(&IndexedFolder { uid_validity, uid_next })?;
                    net.insert((user, key::folder(&folder)), Some((now, marker)));
                }
            }
            IndexChange::RemoveFolder { user, folder } => {
                if valid_group(&user) {
                    for key in scan(rows, &net, &user, &key::folder(&folder))?.into_keys() {
                        net.insert((user.clone(), key), None);
                    }
                }
            }
            IndexChange::RenameFolder {
                user,
                from,
                to,
                separator,
            } => {
                if valid_group(&user) && key::valid(&to) {
                    rename(rows, &mut net, &user, &from, &to, separator)?;
                }
            }
        }
    }
    Ok(net
        .into_iter()
        .map(|((group, key), value)| match value {
            Some((at, body)) => RowWrite::Put {
                group,
                row: Row { key, at, body },
            },
            None => RowWrite::Delete { group, key },
        })
        .collect())
}

/// The rows of `user` under `prefix` as stored, with the changes of `net` over them.
fn scan(rows: &dyn Rows, net: &Net, user: &str, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Value>, StoreError> {
    let mut found: BTreeMap<Vec<u8>, Value> = rows
        .rows(user, prefix)?
        .into_iter()
        .map(|row| (row.key, (row.at, row.body)))
        .collect();
    let from = (user.to_string(), prefix.to_vec());
    for ((_, key), value) in net
        .range(from..)
        .take_while(|((u, k), _)| u == user && k.starts_with(prefix))
    {
        match value {
            Some(row) => found.insert(key.clone(), row.clone()),
            None => found.remove(key),
        };
    }
    Ok(found)
}

/// Moves a folder's rows (and with a separator its subfolders') to the new name.
fn rename(
    rows: &dyn Rows,
    net: &mut Net,
    user: &str,
    from: &str,
    to: &str,
    separator: Option<char>,
) -> Result<(), StoreError> {
    // (prefix scanned, the bytes it becomes): the folder's own rows, and with a separator
    // every `from<sep>…` subfolder's (not NUL-ended: the rest of the name follows).
    let mut moves = vec![(key::folder(from), key::folder(to))];
    if let Some(sep) = separator {
        let child = |name: &str| format!("{name}{sep}").into_bytes();
        moves.push((child(from), child(to)));
    }
    for (old, new) in moves {
        for (key, row) in scan(rows, net, user, &old)? {
            let mut moved = new.clone();
            moved.extend_from_slice(key.get(old.len()..).unwrap_or_default());
            net.insert((user.to_string(), key), None);
            net.insert((user.to_string(), moved), Some(row));
        }
    }
    Ok(())
}

/// Forgets the messages indexed before `before`; returns how many. A folder's own row
/// stays while the folder does, and its watermark rises past what is forgotten, so the
/// reconciler never takes a purged message for one that arrived while it was away.
pub fn purge(rows: &dyn Rows, before: jiff::Timestamp) -> Result<u64, StoreError> {
    let mut writes = Vec::new();
    let mut watermarks: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
    for (user, k) in rows.rows_before(before.as_second())? {
        if is_reserved(&user) {
            continue;
        }
        let Some((folder, Some((uid_validity, uid)))) = key::parse(&k) else {
            continue;
        };
        let mark = watermarks.entry((user.clone(), folder)).or_insert((uid_validity, 0));
        if mark.0 == uid_validity {
            mark.1 = mark.1.max(uid.saturating_add(1));
        }
        writes.push(RowWrite::Delete { group: user, key: k });
    }
    let n = writes.len() as u64;
    if n == 0 {
        return Ok(0);
    }
    let now = jiff::Timestamp::now().as_second();
    for ((user, folder), (uid_validity, above)) in watermarks {
        let k = key::folder(&folder);
        let mut marker: IndexedFolder = rows
            .row(&user, &k)?
            .and_then(|row| serde_json::from_slice(&row.body).ok())
            .unwrap_or_default();
        if marker.uid_validity.is_some_and(|v| v != uid_validity) {
            continue;
        }
        marker.uid_validity = Some(uid_validity);
        marker.uid_next = Some(marker.uid_next.unwrap_or(0).max(above));
        writes.push(RowWrite::Put {
            group: user,
            row: Row {
                key: k,
                at: now,
                body: json(&marker)?,
            },
        });
    }
    rows.write_rows(writes)?;
    Ok(n)
}

/// Stores `events` with the index `changes` they came with, in one commit.
pub fn accept(
    pipeline: &crate::source::Pipeline,
    events: Vec<crate::event::MailboxEvent>,
    changes: Vec<IndexChange>,
) -> Result<Vec<crate::store::Appended>, crate::source::AcceptError> {
    let rows = writes(pipeline.deliveries.rows().as_ref(), changes)?;
    pipeline.accept_with_rows(events, rows)
}

/// How long the index remembers a message, and how often that is applied.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `--dovecot-index-retention`.
    pub keep: Duration,
    /// The first purge runs this long after start (the housekeeping interval).
    pub first: Duration,
}

/// The index's age is read off every row: once an hour is often enough.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Purges the index past its retention until `stop`, on the leader only (the index is
/// store-wide); counted in `purged` (`mailhook_store_purged_total`) as `indexed_message`.
pub async fn keep(
    deliveries: std::sync::Arc<crate::delivery::Deliveries>,
    retention: Retention,
    purged: prometheus::IntCounterVec,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut wait = retention.first;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = PURGE_INTERVAL;
        if !deliveries.is_leader() {
            continue;
        }
        let before = jiff::SignedDuration::try_from(retention.keep)
            .ok()
            .and_then(|age| jiff::Timestamp::now().checked_sub(age).ok())
            .unwrap_or(jiff::Timestamp::MIN);
        let rows = deliveries.rows();
        match tokio::task::spawn_blocking(move || purge(rows.as_ref(), before)).await {
            Ok(Ok(n)) => purged.with_label_values(&["indexed_message"]).inc_by(n),
            Ok(Err(err)) => tracing::warn!(%err, "cannot purge the mailbox index; will retry"),
            Err(err) => tracing::warn!(%err, "purging the mailbox index stopped unexpectedly; will retry"),
        }
    }
}

/// The index's behaviour on a real store; run on every backend (the PostgreSQL one from
/// `tests/postgres`). Test support, not API.
#[doc(hidden)]
pub mod conformance {
    use super::*;
    use crate::store::{Ingest, Store, conformance::event};

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("valid")
    }

    fn apply(s: &dyn Store, items: Vec<Ingest>, changes: Vec<IndexChange>) -> Vec<crate::store::Appended> {
        let rows = writes(s, changes).expect("plan");
        s.ingest_with_rows(items, rows).expect("ingest")
    }

    pub fn the_index_follows_changes_and_is_purged_by_age(s: &dyn Store) {
        let key = |folder: &str, uid: u32| MessageKey {
            user: "zoë@example.com".into(),
            folder: folder.into(),
            uid_validity: 7,
            uid,
        };
        let msg = |id: &str, seen_at: i64| IndexedMessage {
            message_id: Some(id.into()),
            subject: Some("Grüße".into()),
            seen_at,
            ..Default::default()
        };
        let user = "zoë@example.com";
        let folder = |f: &str| IndexChange::PutFolder {
            user: user.into(),
            folder: f.into(),
            uid_validity: (f == "Projekte").then_some(7),
            uid_next: (f == "Projekte").then_some(2),
        };
        let first = apply(
            s,
            vec![Ingest {
                event: event("evt_i1", Some("dovecot:1")),
                deliveries: vec![],
            }],
            vec![
                folder("INBOX"),
                folder("Projekte"),
                folder("Projekte/Ä"),
                IndexChange::Put(key("INBOX", 1), msg("<a@x>", 10)),
                IndexChange::Put(key("INBOX", 300), msg("<b@x>", 20)),
                IndexChange::Put(key("Projekte", 1), msg("<c@x>", 30)),
                IndexChange::Put(key("Projekte/Ä", 2), msg("<d@x>", 40)),
            ],
        );
        assert!(!first[0].duplicate);
        let all = mailbox(s, user, None).expect("read");
        assert_eq!(all.folders.len(), 3);
        assert_eq!(all.messages.len(), 4);
        let projekte = mailbox(s, user, Some("Projekte")).expect("read");
        assert_eq!(
            projekte.messages.keys().cloned().collect::<Vec<_>>(),
            vec![key("Projekte", 1)],
            "a folder is not its subfolders"
        );
        assert_eq!(users(s).expect("users"), vec![user.to_string()]);
        assert_eq!(message(s, &key("INBOX", 300)).expect("read"), Some(msg("<b@x>", 20)));
        assert_eq!(message(s, &key("INBOX", 3)).expect("read"), None);
        // A UID whose last byte is 0xff (a range scan ending at "the next key" misses it).
        apply(s, vec![], vec![IndexChange::Put(key("INBOX", 255), msg("<ff@x>", 20))]);
        assert_eq!(message(s, &key("INBOX", 255)).expect("read"), Some(msg("<ff@x>", 20)));
        apply(s, vec![], vec![IndexChange::Remove(key("INBOX", 255))]);

        apply(
            s,
            vec![],
            vec![
                IndexChange::Remove(key("INBOX", 1)),
                IndexChange::RenameFolder {
                    user: user.into(),
                    from: "Projekte".into(),
                    to: "Archiv".into(),
                    separator: None,
                },
                IndexChange::RemoveFolder {
                    user: user.into(),
                    folder: "Projekte/Ä".into(),
                },
            ],
        );
        let all = mailbox(s, user, None).expect("read");
        assert_eq!(
            all.folders
                .iter()
                .map(|(f, v)| (f.as_str(), v.uid_validity))
                .collect::<Vec<_>>(),
            vec![("Archiv", Some(7)), ("INBOX", Some(7))],
            "a renamed folder keeps its UIDVALIDITY; a folder known by its messages has theirs"
        );
        assert_eq!(
            all.messages.keys().cloned().collect::<Vec<_>>(),
            vec![key("Archiv", 1), key("INBOX", 300)]
        );
        assert_eq!(all.messages[&key("Archiv", 1)], msg("<c@x>", 30));
        assert_eq!(
            all.folders["Archiv"].uid_next,
            Some(2),
            "the watermark moves with the folder"
        );

        // A parent renamed with the hierarchy separator takes its subfolders along.
        apply(
            s,
            vec![],
            vec![
                IndexChange::Put(key("Kunden/Acme", 1), msg("<k@x>", 40)),
                IndexChange::Put(key("Kunden.Alt", 1), msg("<l@x>", 40)),
                IndexChange::RenameFolder {
                    user: user.into(),
                    from: "Kunden".into(),
                    to: "Partner".into(),
                    separator: Some('/'),
                },
            ],
        );
        let after = mailbox(s, user, None).expect("read");
        assert!(after.messages.contains_key(&key("Partner/Acme", 1)), "{after:?}");
        assert!(
            after.messages.contains_key(&key("Kunden.Alt", 1)),
            "not a subfolder: another separator"
        );
        apply(
            s,
            vec![],
            vec![
                IndexChange::RemoveFolder {
                    user: user.into(),
                    folder: "Partner/Acme".into(),
                },
                IndexChange::RemoveFolder {
                    user: user.into(),
                    folder: "Kunden.Alt".into(),
                },
            ],
        );

        assert_eq!(purge(s, at(25)).expect("purge"), 1, "the message seen at 20");
        let left = mailbox(s, user, None).expect("read");
        assert_eq!(left.messages.len(), 1);
        assert_eq!(
            left.folders["INBOX"].uid_next,
            Some(301),
            "the watermark rises past the forgotten message"
        );
        assert_eq!(
            mailbox(s, "nobody@example.com", None).expect("read"),
            IndexedMailbox::default()
        );
        // Names that cannot be keys are skipped, not stored half.
        apply(
            s,
            vec![],
            vec![IndexChange::Put(
                MessageKey {
                    user: "a\0b".into(),
                    ..key("INBOX", 9)
                },
                msg("<n@x>", 50),
            )],
        );
        assert_eq!(users(s).expect("users"), vec![user.to_string()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_folder_then_numbers_and_parse_back() {
        let m = |folder: &str, v: u32, u: u32| MessageKey {
            user: "u".into(),
            folder: folder.into(),
            uid_validity: v,
            uid: u,
        };
        assert!(key::message(&m("A", 1, 300)) > key::message(&m("A", 1, 2)));
        assert!(
            key::message(&m("A", 1, 2)) < key::folder("A/B"),
            "a folder's messages sort before its subfolders"
        );
        assert_eq!(
            key::parse(&key::message(&m("Ä", 7, 255))),
            Some(("Ä".into(), Some((7, 255))))
        );
        assert_eq!(key::parse(&key::folder("INBOX")), Some(("INBOX".into(), None)));
        assert_eq!(key::parse(b"INBOX\0abc"), None);
    }

    #[test]
    fn a_message_is_indexed_at_its_row_time_and_its_body_still_reads_in_older_releases() {
        let stored = serde_json::to_vec(&IndexedMessage {
            message_id: Some("<a@x>".into()),
            seen_at: 42,
            ..Default::default()
        })
        .expect("json");
        assert_eq!(
            stored, br#"{"messageId":"<a@x>","seenAt":42}"#,
            "an older release reads the time from the body"
        );
        let row = |body: &[u8]| Row {
            key: vec![],
            at: 42,
            body: body.to_vec(),
        };
        let read = indexed(&row(&stored)).expect("read");
        assert_eq!((read.message_id.as_deref(), read.seen_at), (Some("<a@x>"), 42));
        let other = indexed(&row(br#"{"messageId":"<a@x>","seenAt":7}"#)).expect("read");
        assert_eq!(other, read, "the row's time is the message's");
    }

    #[test]
    fn the_index_on_the_embedded_store() {
        let store = crate::store::PagedStore::in_memory().expect("store");
        conformance::the_index_follows_changes_and_is_purged_by_age(&store);
    }

    #[test]
    fn the_index_on_the_memory_indexed_store() {
        let store = crate::store::DurableStore::in_memory().expect("store");
        conformance::the_index_follows_changes_and_is_purged_by_age(&store);
    }
}
