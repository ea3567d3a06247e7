//! Reads and failed logins are held a short while before they become events, so that a
//! burst is one event: a session that downloads a whole mailbox is one
//! `mailbox.bulk_access` with a count, not thousands of `message.accessed`; a password
//! guessed again and again is one `mailbox.login` with the attempts counted.
//!
//! Held items are keyed rows of the store (`held_group`), written together every 20 ms
//! (`Buffer`: a crash loses at most the last 20 ms of them), so a restart keeps the rest
//! and every replica's items are seen by the one that releases them (the leader, once a
//! second). A release
//! stores its events and deletes the rows it read in one commit. A group that has turned
//! into a bulk read is folded into one summary row as it grows, so a long download holds
//! one row, not one per message.
//!
//! When a group is released (`plan`, pure): reads as single events once the first of
//! them is `window` old while they, with the session's reads already reported (its tally),
//! are no more than `bulk_threshold` — so a slow download also turns bulk; past it,
//! as one bulk event once no read of the session arrived for `bulk_quiet`, or `longest`
//! after its first read. Dovecot's exporter sends a burst's events in pieces, seconds
//! apart, and drops what waited longer than its `transport_timeout`: with `bulk_quiet` at
//! least that long, no later piece of the burst can still come. Failed logins (one group
//! per user and client address) as one event once quiet for `window` or `longest` after
//! the first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::exported::{SessionInfo, bounded_id};
use super::index;
use crate::api::EventType;
use crate::event::{Access, Activity, BulkAccess, Login, LoginOutcome, MailboxEvent};
use crate::store::{Row, RowWrite, Rows, StoreError, reserved_group};

/// Held rows on their way to the store. Dovecot's exporter posts one event at a time and
/// waits for each answer (one connection, no pipelining), so what a post costs bounds how
/// many reads a burst delivers before Dovecot gives up on the rest; a durable commit per
/// read made it about 1 ms, and on a loaded machine Dovecot then lost a quarter of a
/// 2,000-message download. Held rows are therefore answered once taken here and written
/// together within `FLUSH_EVERY`: a crash loses at most that much of the reads, which
/// Dovecot, which never retries, could not have sent again anyway.
#[derive(Default)]
pub struct Buffer {
    pending: parking_lot::Mutex<Vec<RowWrite>>,
    wake: tokio::sync::Notify,
}

impl Buffer {
    /// Takes `row`; false when the buffer is full (the caller writes it itself).
    pub fn push(&self, row: RowWrite) -> bool {
        let mut pending = self.pending.lock();
        if pending.len() >= MAX_BUFFERED {
            return false;
        }
        pending.push(row);
        if pending.len() >= FLUSH_AT {
            self.wake.notify_one();
        }
        true
    }

    fn take(&self) -> Vec<RowWrite> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Puts back what could not be written, ahead of what came since, within the bound.
    fn put_back(&self, mut rows: Vec<RowWrite>) -> usize {
        let mut pending = self.pending.lock();
        let room = MAX_BUFFERED.saturating_sub(pending.len());
        let dropped = rows.len().saturating_sub(room);
        rows.truncate(room);
        rows.append(&mut pending);
        *pending = rows;
        dropped
    }
}

/// Writes the buffer's rows until `stop`, and once more after it.
pub async fn flush(buffer: Arc<super::Shared>, rows: Arc<dyn Rows>, stop: tokio_util::sync::CancellationToken) {
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(FLUSH_EVERY) => false,
            () = buffer.held.wake.notified() => false,
        };
        let taken = buffer.held.take();
        if !taken.is_empty() {
            let rows = rows.clone();
            let attempt = taken.clone();
            let failed = match tokio::task::spawn_blocking(move || rows.write_rows(attempt)).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(err) = failed {
                let dropped = buffer.held.put_back(taken);
                tracing::warn!(%err, dropped, "cannot write held Dovecot reads and logins; will retry");
            }
        }
        if stopping {
            return;
        }
    }
}

/// The rows of held items.
pub fn held_group() -> String {
    reserved_group("dovecot-held")
}

/// The rows of sessions' logins (who is behind a session id).
pub fn sessions_group() -> String {
    reserved_group("dovecot-sessions")
}

/// Held rows taken but not yet written: a flush writes them every `FLUSH_EVERY`.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// A flush starts at once past this many rows.
const FLUSH_AT: usize = 512;
/// Rows the buffer takes before posts are written one by one again.
const MAX_BUFFERED: usize = 100_000;

/// How long a session's login is remembered to label its reads.
const SESSION_KEPT: Duration = Duration::from_secs(24 * 3600);
/// Folders named on a bulk event.
const MAX_FOLDERS: usize = 64;
/// How often held items are looked at.
const TICK: Duration = Duration::from_secs(1);

/// What is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    Read,
    LoginFailed,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::LoginFailed => "login",
        }
    }
}

/// One held read or failed login, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub kind: Kind,
    /// What it is counted with: the user and session (reads), or user and client address.
    pub group: String,
    pub at: jiff::Timestamp,
    pub received_at: jiff::Timestamp,
    pub producer: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mailhook: bool,
}

/// What a group of held items has come to so far, once it is past the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The earliest item (by when it happened), as it came (who, from where).
    pub first: Item,
    /// When the earliest item arrived (`longest` is counted from here).
    pub first_received: jiff::Timestamp,
    pub count: u64,
    pub last_at: jiff::Timestamp,
    /// When the last item arrived (quiet is counted from here).
    pub last_received: jiff::Timestamp,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folders: Vec<String>,
}

/// How many of a session's reads were already reported, so that a slow download (never
/// more than the threshold within one window) still turns into bulk events once it has
/// read more than the threshold in all. Forgotten once the session was quiet for `longest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    pub reads: u64,
    pub updated: jiff::Timestamp,
}

/// The windows (`--dovecot-access-window`, `--dovecot-bulk-threshold`,
/// `--dovecot-hold-longest`).
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub window: Duration,
    pub bulk_threshold: u64,
    /// `--dovecot-bulk-quiet`: the exporter's `transport_timeout`.
    pub bulk_quiet: Duration,
    pub longest: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            window: Duration::from_secs(10),
            bulk_threshold: 50,
            bulk_quiet: Duration::from_secs(30),
            longest: Duration::from_secs(15 * 60),
        }
    }
}

/// Row keys: `tag NUL group NUL ('i' producer | 's')`. An item's key is its producer id,
/// so a POST sent twice holds one row.
fn item_key(item: &Item) -> Vec<u8> {
    let mut k = group_prefix(item.kind, &item.group);
    k.push(b'i');
    k.extend_from_slice(item.producer.as_bytes());
    k
}

fn group_prefix(kind: Kind, group: &str) -> Vec<u8> {
    let mut k = kind.tag().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k
}

fn summary_key(kind: Kind, group: &str) -> Vec<u8> {
    let mut k = group_prefix(kind, group);
    k.push(b's');
    k
}

fn tally_key(kind: Kind, group: &str) -> Vec<u8> {
    let mut k = group_prefix(kind, group);
    k.push(b't');
    k
}

/// The row that holds `item`.
pub fn hold(item: &Item) -> Result<RowWrite, StoreError> {
    Ok(RowWrite::Put {
        group: held_group(),
        row: Row {
            key: item_key(item),
            at: item.received_at.as_second(),
            body: serde_json::to_vec(item).map_err(StoreError::io)?,
        },
    })
}

/// The row that remembers who is behind `session`.
pub fn remember(session: &str, info: &SessionInfo, now: jiff::Timestamp) -> Result<RowWrite, StoreError> {
    Ok(RowWrite::Put {
        group: sessions_group(),
        row: Row {
            key: session.as_bytes().to_vec(),
            at: now.as_second(),
            body: serde_json::to_vec(info).map_err(StoreError::io)?,
        },
    })
}

/// A group's rows as read back.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Group {
    pub summary: Option<Summary>,
    pub tally: Option<Tally>,
    /// (row key, item), in key order.
    pub items: Vec<(Vec<u8>, Item)>,
}

impl Group {
    fn count(&self) -> u64 {
        self.summary.as_ref().map_or(0, |s| s.count) + self.items.len() as u64
    }

    fn first_received(&self) -> Option<jiff::Timestamp> {
        let items = self.items.iter().map(|(_, i)| i.received_at);
        self.summary
            .as_ref()
            .map(|s| s.first_received)
            .into_iter()
            .chain(items)
            .min()
    }

    fn last_received(&self) -> Option<jiff::Timestamp> {
        let items = self.items.iter().map(|(_, i)| i.received_at);
        self.summary
            .as_ref()
            .map(|s| s.last_received)
            .into_iter()
            .chain(items)
            .max()
    }

    /// Everything folded into one summary; its `first` is the earliest item by when it
    /// happened (rows are in key order, which is not time order).
    fn folded(&self) -> Option<Summary> {
        let mut items: Vec<&Item> = self.items.iter().map(|(_, i)| i).collect();
        items.sort_by_key(|i| (i.at, i.received_at));
        let mut items = items.into_iter();
        let mut summary = match self.summary.clone() {
            Some(s) => s,
            None => {
                let first = items.next()?;
                Summary {
                    first: first.clone(),
                    first_received: first.received_at,
                    count: 1,
                    last_at: first.at,
                    last_received: first.received_at,
                    folders: first.folder.iter().cloned().collect(),
                }
            }
        };
        for item in items {
            summary.count += 1;
            if item.at < summary.first.at {
                summary.first = item.clone();
            }
            summary.first_received = summary.first_received.min(item.received_at);
            summary.last_at = summary.last_at.max(item.at);
            summary.last_received = summary.last_received.max(item.received_at);
            if let Some(f) = &item.folder
                && !summary.folders.contains(f)
                && summary.folders.len() < MAX_FOLDERS
            {
                summary.folders.push(f.clone());
            }
        }
        Some(summary)
    }
}

/// What to do with one group now.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Each read becomes a `message.accessed`.
    Singles(Vec<Item>),
    /// One `mailbox.bulk_access` or one `mailbox.login` (failed) for the group.
    Counted(Kind, Summary),
    /// Still open but past the threshold: folded into its summary row.
    Fold(Kind, Summary),
    /// Only a tally is left, of a session quiet for `longest`: forgotten.
    Forget,
}

/// Held groups by kind and name.
pub type Groups = BTreeMap<(Kind, String), Group>;

/// Reads the held rows back into groups; rows that cannot be read are returned to delete.
pub fn groups(rows: Vec<Row>) -> (Groups, Vec<Vec<u8>>) {
    let mut groups: Groups = BTreeMap::new();
    let mut unreadable = Vec::new();
    for row in rows {
        let mut parts = row.key.splitn(3, |b| *b == 0);
        let (Some(tag), Some(group), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            unreadable.push(row.key);
            continue;
        };
        let kind = match tag {
            b"read" => Kind::Read,
            b"login" => Kind::LoginFailed,
            _ => {
                unreadable.push(row.key);
                continue;
            }
        };
        let Ok(group) = std::str::from_utf8(group) else {
            unreadable.push(row.key);
            continue;
        };
        let key = (kind, group.to_string());
        match rest.first() {
            Some(b's') => match serde_json::from_slice::<Summary>(&row.body) {
                Ok(s) => groups.entry(key).or_default().summary = Some(s),
                Err(_) => unreadable.push(row.key),
            },
            Some(b't') => match serde_json::from_slice::<Tally>(&row.body) {
                Ok(t) => groups.entry(key).or_default().tally = Some(t),
                Err(_) => unreadable.push(row.key),
            },
            Some(b'i') => match serde_json::from_slice::<Item>(&row.body) {
                Ok(i) => groups.entry(key).or_default().items.push((row.key, i)),
                Err(_) => unreadable.push(row.key),
            },
            _ => unreadable.push(row.key),
        }
    }
    (groups, unreadable)
}

/// What to do with `group` at `now`, if anything. Pure.
pub fn plan(kind: Kind, group: &Group, windows: &Windows, now: jiff::Timestamp) -> Option<Release> {
    let age = |t: jiff::Timestamp| now.duration_since(t).try_into().unwrap_or(Duration::ZERO);
    if group.items.is_empty() && group.summary.is_none() {
        return group
            .tally
            .filter(|t| age(t.updated) >= windows.longest)
            .map(|_| Release::Forget);
    }
    let (first, last) = (group.first_received()?, group.last_received()?);
    let tallied = group.tally.map_or(0, |t| t.reads);
    let quiet = age(last)
        >= match kind {
            Kind::Read => windows.bulk_quiet,
            Kind::LoginFailed => windows.window,
        };
    let too_long = age(first) >= windows.longest;
    match kind {
        Kind::Read if group.count().saturating_add(tallied) <= windows.bulk_threshold && group.summary.is_none() => {
            (age(first) >= windows.window)
                .then(|| Release::Singles(group.items.iter().map(|(_, i)| i.clone()).collect()))
        }
        _ if quiet || too_long => group.folded().map(|s| Release::Counted(kind, s)),
        // Open, and counted: fold the new items in so that rows stay few.
        _ if !group.items.is_empty() => group.folded().map(|s| Release::Fold(kind, s)),
        _ => None,
    }
}

/// The context a released item is told in: the index (Message-ID) and the sessions, with
/// each folder's UIDVALIDITY looked up once per look at the held items.
pub struct Lookups<'a> {
    pub rows: &'a dyn Rows,
    validity: std::cell::RefCell<BTreeMap<(String, String), Option<u32>>>,
}

impl<'a> Lookups<'a> {
    fn session(&self, session: Option<&str>) -> Option<SessionInfo> {
        let row = self.rows.row(&sessions_group(), session?.as_bytes()).ok()??;
        serde_json::from_slice(&row.body).ok()
    }

    pub fn new(rows: &'a dyn Rows) -> Lookups<'a> {
        Lookups {
            rows,
            validity: Default::default(),
        }
    }

    /// The indexed message at `folder`/`uid` under the folder's current UIDVALIDITY.
    fn message(&self, user: &str, folder: &str, uid: u32) -> Option<(u32, index::IndexedMessage)> {
        let key = (user.to_string(), folder.to_string());
        let known = self.validity.borrow().get(&key).copied();
        let uid_validity = match known {
            Some(v) => v,
            None => {
                let v = index::folder_validity(self.rows, user, folder).ok().flatten();
                self.validity.borrow_mut().insert(key, v);
                v
            }
        }?;
        let key = index::MessageKey {
            user: user.to_string(),
            folder: folder.to_string(),
            uid_validity,
            uid,
        };
        index::message(self.rows, &key).ok()?.map(|m| (uid_validity, m))
    }
}

fn activity(item: &Item, who: Option<&SessionInfo>) -> Activity {
    let auth_user = item
        .auth_user
        .clone()
        .or_else(|| who.and_then(|w| w.auth_user.clone()))
        .filter(|a| !a.eq_ignore_ascii_case(&item.user));
    Activity {
        user: item.user.clone(),
        admin_session: auth_user.is_some(),
        auth_user,
        mailhook_session: item.mailhook || who.is_some_and(|w| w.mailhook),
        service: item.service.clone().or_else(|| who.and_then(|w| w.service.clone())),
        remote_ip: item.remote_ip.clone().or_else(|| who.and_then(|w| w.remote_ip.clone())),
        session: item.session.clone(),
        ..Default::default()
    }
}

fn made(event_type: EventType, item: &Item, producer: String, activity: Activity, at: jiff::Timestamp) -> MailboxEvent {
    super::Made {
        event_type,
        mailbox: super::mailbox_of(&item.user),
        folder: item.folder.clone(),
        occurred_at: at,
        received_at: item.received_at,
        producer,
        activity,
    }
    .event()
}

/// The events a release stores.
pub fn events(release: &Release, lookups: &Lookups<'_>) -> Vec<MailboxEvent> {
    match release {
        Release::Fold(..) | Release::Forget => vec![],
        Release::Singles(items) => items
            .iter()
            .map(|item| {
                let who = lookups.session(item.session.as_deref());
                let mut a = activity(item, who.as_ref());
                a.access = Some(Access {
                    command: item.command.clone(),
                    reasons: item.reasons.clone(),
                });
                let found = match (&item.folder, item.uid) {
                    (Some(f), Some(uid)) => lookups.message(&item.user, f, uid),
                    _ => None,
                };
                a.uid = item.uid;
                let mut e = made(EventType::MessageAccessed, item, item.producer.clone(), a, item.at);
                if let Some((uid_validity, m)) = found {
                    if let Some(a) = e.activity.as_mut() {
                        a.uid_validity = Some(uid_validity);
                    }
                    e.message_id = m.message_id;
                    e.subject = m.subject;
                    e.from = m.from;
                    e.to = m.to;
                }
                e
            })
            .collect(),
        Release::Counted(Kind::Read, s) => {
            let who = lookups.session(s.first.session.as_deref());
            let mut a = activity(&s.first, who.as_ref());
            a.bulk = Some(BulkAccess {
                reads: s.count,
                folders: s.folders.clone(),
                first_at: s.first.at,
                last_at: s.last_at,
            });
            let producer = bounded_id(format!("dovecot-bulk:{}:{}", s.first.group, s.first.producer));
            let mut e = made(EventType::MailboxBulkAccess, &s.first, producer, a, s.last_at);
            e.folder = (s.folders.len() == 1).then(|| s.folders[0].clone());
            vec![e]
        }
        Release::Counted(Kind::LoginFailed, s) => {
            let mut a = activity(&s.first, None);
            a.login = Some(Login {
                outcome: LoginOutcome::Failed,
                mechanism: s.first.mechanism.clone(),
                reason: s.first.reason.clone(),
                attempts: s.count,
                first_at: s.first.at,
                last_at: s.last_at,
            });
            let producer = bounded_id(format!("dovecot-login-failed:{}:{}", s.first.group, s.first.producer));
            vec![made(EventType::MailboxLogin, &s.first, producer, a, s.last_at)]
        }
    }
}

/// The row writes that go with a release: its items and summary deleted, or (a fold)
/// the new summary written.
pub fn writes(
    kind: Kind,
    group_name: &str,
    group: &Group,
    release: &Release,
    now: jiff::Timestamp,
) -> Result<Vec<RowWrite>, StoreError> {
    let mut writes: Vec<RowWrite> = group
        .items
        .iter()
        .map(|(k, _)| RowWrite::Delete {
            group: held_group(),
            key: k.clone(),
        })
        .collect();
    let tallied = group.tally.map_or(0, |t| t.reads);
    let tally = |reads: u64| -> Result<RowWrite, StoreError> {
        Ok(RowWrite::Put {
            group: held_group(),
            row: Row {
                key: tally_key(kind, group_name),
                at: now.as_second(),
                body: serde_json::to_vec(&Tally { reads, updated: now }).map_err(StoreError::io)?,
            },
        })
    };
    match release {
        Release::Singles(items) => writes.push(tally(tallied.saturating_add(items.len() as u64))?),
        Release::Counted(Kind::Read, summary) => writes.push(tally(tallied.saturating_add(summary.count))?),
        Release::Forget => writes.push(RowWrite::Delete {
            group: held_group(),
            key: tally_key(kind, group_name),
        }),
        _ => {}
    }
    match release {
        Release::Fold(_, summary) => writes.push(RowWrite::Put {
            group: held_group(),
            row: Row {
                key: summary_key(kind, group_name),
                at: now.as_second(),
                body: serde_json::to_vec(summary).map_err(StoreError::io)?,
            },
        }),
        _ if group.summary.is_some() => writes.push(RowWrite::Delete {
            group: held_group(),
            key: summary_key(kind, group_name),
        }),
        _ => {}
    }
    Ok(writes)
}

/// One look at the held items: what is due is stored. Returns how many events.
pub fn release_due(
    pipeline: &crate::source::Pipeline,
    windows: &Windows,
    now: jiff::Timestamp,
) -> Result<usize, crate::source::AcceptError> {
    let rows = pipeline.deliveries.rows();
    let (groups, unreadable) = groups(rows.rows(&held_group(), b"")?);
    let (mut released, mut failed) = (0, 0);
    if !unreadable.is_empty() {
        rows.write_rows(
            unreadable
                .into_iter()
                .map(|key| RowWrite::Delete {
                    group: held_group(),
                    key,
                })
                .collect(),
        )?;
    }
    let lookups = Lookups::new(rows.as_ref());
    for ((kind, name), group) in &groups {
        let Some(release) = plan(*kind, group, windows, now) else {
            continue;
        };
        if let Release::Counted(kind, s) = &release {
            tracing::debug!(
                ?kind,
                count = s.count,
                first = %s.first_received,
                last = %s.last_received,
                first_at = %s.first.at,
                last_at = %s.last_at,
                "held Dovecot items released as one event"
            );
        }
        // One group that cannot be stored (a routing bug, a refused row) must not hold up
        // the others: it is logged and tried again on the next look.
        let stored = writes(*kind, name, group, &release, now)
            .map_err(crate::source::AcceptError::from)
            .and_then(|writes| {
                let events = events(&release, &lookups);
                let n = events.len();
                if events.is_empty() {
                    rows.write_rows(writes)?;
                } else {
                    pipeline.accept_with_rows(events, writes)?;
                }
                Ok(n)
            });
        match stored {
            Ok(n) => released += n,
            Err(err) => {
                failed += 1;
                tracing::warn!(%err, ?kind, "cannot release a group of held Dovecot reads or logins; will retry");
            }
        }
    }
    if failed > 0 {
        tracing::debug!(failed, released, "some held Dovecot groups wait for the next look");
    }
    Ok(released)
}

/// Forgets sessions' logins older than a day.
fn forget_sessions(rows: &dyn Rows, now: jiff::Timestamp) -> Result<(), StoreError> {
    let before = now.as_second() - SESSION_KEPT.as_secs() as i64;
    let group = sessions_group();
    let old: Vec<RowWrite> = rows
        .rows(&group, b"")?
        .into_iter()
        .filter(|r| r.at < before)
        .map(|r| RowWrite::Delete {
            group: group.clone(),
            key: r.key,
        })
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    rows.write_rows(old)
}

/// Releases held items until `stop`, on the leader only (the rows are store-wide).
pub async fn release(
    pipeline: Arc<crate::source::Pipeline>,
    windows: Windows,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        if !pipeline.deliveries.is_leader() {
            continue;
        }
        ticks += 1;
        let pipeline = pipeline.clone();
        let forget = ticks % 3600 == 1;
        let done = tokio::task::spawn_blocking(move || {
            let now = jiff::Timestamp::now();
            if forget && let Err(err) = forget_sessions(pipeline.deliveries.rows().as_ref(), now) {
                tracing::warn!(%err, "cannot forget old Dovecot sessions; will retry");
            }
            release_due(&pipeline, &windows, now)
        })
        .await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::warn!(%err, "cannot release held Dovecot reads and logins; will retry"),
            Err(err) => {
                tracing::warn!(%err, "releasing held Dovecot reads and logins stopped unexpectedly; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + s).expect("valid")
    }

    fn read(n: u32, s: i64) -> Item {
        Item {
            kind: Kind::Read,
            group: "alice@example.test\u{1f}sess".into(),
            at: at(s),
            received_at: at(s),
            producer: format!("dovecot-read:sess:INBOX:{n}:"),
            user: "alice@example.test".into(),
            folder: Some(if n.is_multiple_of(2) { "INBOX" } else { "Archive" }.into()),
            uid: Some(n),
            service: Some("imap".into()),
            remote_ip: Some("192.0.2.1".into()),
            session: Some("sess".into()),
            command: Some("UID FETCH".into()),
            reasons: vec!["imap:fetch_body".into()],
            mechanism: None,
            reason: None,
            auth_user: None,
            mailhook: false,
        }
    }

    fn group(items: Vec<Item>) -> Group {
        Group {
            summary: None,
            tally: None,
            items: items.into_iter().map(|i| (item_key(&i), i)).collect(),
        }
    }

    fn windows() -> Windows {
        Windows {
            window: Duration::from_secs(10),
            bulk_threshold: 3,
            bulk_quiet: Duration::from_secs(10),
            longest: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_few_reads_are_released_one_by_one_once_the_window_has_passed() {
        let g = group(vec![read(1, 0), read(2, 4)]);
        assert_eq!(plan(Kind::Read, &g, &windows(), at(9)), None);
        let Some(Release::Singles(items)) = plan(Kind::Read, &g, &windows(), at(10)) else {
            panic!("singles due");
        };
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn a_bulk_read_is_folded_while_it_goes_on_and_released_once_when_quiet() {
        let g = group((1..=5).map(|n| read(n, i64::from(n))).collect());
        let Some(Release::Fold(Kind::Read, summary)) = plan(Kind::Read, &g, &windows(), at(6)) else {
            panic!("past the threshold and not quiet: folded");
        };
        assert_eq!((summary.count, summary.folders.len()), (5, 2));
        // The fold as stored, with one more read since.
        let later = Group {
            summary: Some(summary),
            tally: None,
            items: vec![(item_key(&read(6, 8)), read(6, 8))],
        };
        assert_eq!(
            plan(Kind::Read, &later, &windows(), at(17)).map(|_| ()),
            Some(()),
            "fold the new read"
        );
        let quiet = plan(Kind::Read, &later, &windows(), at(18));
        let Some(Release::Counted(Kind::Read, s)) = quiet else {
            panic!("quiet for the window: one bulk event, got {quiet:?}");
        };
        assert_eq!((s.count, s.first.at, s.last_at), (6, at(1), at(8)));
        let writes = writes(
            Kind::Read,
            &later_name(),
            &later,
            &Release::Counted(Kind::Read, s),
            at(18),
        )
        .expect("writes");
        assert_eq!(
            writes.len(),
            3,
            "the new item and the summary deleted, the tally written"
        );
        assert_eq!(
            writes.iter().filter(|w| matches!(w, RowWrite::Delete { .. })).count(),
            2
        );
    }

    fn later_name() -> String {
        "alice@example.test\u{1f}sess".into()
    }

    #[test]
    fn a_slow_download_turns_into_bulk_events_once_past_the_threshold_in_all() {
        // Two reads a window, never more than the threshold (3) at once.
        let first = group(vec![read(1, 0), read(2, 1)]);
        let release = plan(Kind::Read, &first, &windows(), at(10)).expect("due");
        assert!(matches!(&release, Release::Singles(items) if items.len() == 2));
        let w = writes(Kind::Read, "g", &first, &release, at(10)).expect("writes");
        let tallied = w.iter().find_map(|w| match w {
            RowWrite::Put { row, .. } if row.key.ends_with(b"t") => serde_json::from_slice::<Tally>(&row.body).ok(),
            _ => None,
        });
        assert_eq!(tallied.map(|t| t.reads), Some(2));
        // The next two: 4 in all, past the threshold: held as bulk, not released one by one.
        let second = Group {
            tally: tallied,
            ..group(vec![read(3, 11), read(4, 12)])
        };
        assert!(matches!(
            plan(Kind::Read, &second, &windows(), at(21)),
            Some(Release::Fold(..))
        ));
        assert!(
            matches!(plan(Kind::Read, &second, &windows(), at(22)), Some(Release::Counted(Kind::Read, s)) if s.count == 2)
        );
        // A tally alone is forgotten once the session was quiet for `longest`.
        let idle = Group {
            tally: tallied,
            ..Group::default()
        };
        assert_eq!(plan(Kind::Read, &idle, &windows(), at(69)), None);
        assert_eq!(plan(Kind::Read, &idle, &windows(), at(70)), Some(Release::Forget));
    }

    #[test]
    fn the_buffer_is_bounded_and_keeps_what_could_not_be_written_first() {
        let b = Buffer::default();
        let row = |n: u32| hold(&read(n, 0)).expect("row");
        assert!(b.push(row(1)));
        let taken = b.take();
        assert!(b.push(row(2)));
        assert_eq!(b.put_back(taken), 0);
        assert_eq!(b.take(), vec![row(1), row(2)], "the failed write first, in order");
        for n in 0..MAX_BUFFERED as u32 {
            assert!(b.push(row(n)));
        }
        assert!(!b.push(row(0)), "full: the caller writes it itself");
        assert_eq!(b.put_back(vec![row(1)]), 1, "no room to put back");
    }

    #[test]
    fn the_first_item_is_the_earliest_by_time_not_by_key() {
        // UID 10 sorts before 9 as a key, and happened later.
        let g = group(vec![read(10, 5), read(9, 2), read(11, 3)]);
        let s = g.folded().expect("summary");
        assert_eq!(
            (s.first.uid, s.first.at, s.last_at, s.first_received),
            (Some(9), at(2), at(5), at(2))
        );
    }

    #[test]
    fn a_read_that_never_goes_quiet_is_reported_after_the_longest_hold() {
        let g = Group {
            summary: group((1..=5).map(|n| read(n, 0)).collect()).folded(),
            tally: None,
            items: vec![(item_key(&read(9, 59)), read(9, 59))],
        };
        assert!(matches!(
            plan(Kind::Read, &g, &windows(), at(60)),
            Some(Release::Counted(..))
        ));
    }

    #[test]
    fn failed_logins_are_one_event_when_quiet() {
        let fail = |s| Item {
            kind: Kind::LoginFailed,
            reason: Some("password_mismatch".into()),
            ..read(0, s)
        };
        let g = group(vec![fail(0), fail(3), fail(6)]);
        assert!(
            matches!(
                plan(Kind::LoginFailed, &g, &windows(), at(15)),
                Some(Release::Fold(Kind::LoginFailed, _))
            ),
            "a run still going is folded into one row"
        );
        let Some(Release::Counted(Kind::LoginFailed, s)) = plan(Kind::LoginFailed, &g, &windows(), at(16)) else {
            panic!("quiet: released");
        };
        assert_eq!(s.count, 3);
    }

    #[test]
    fn rows_read_back_into_their_groups_and_bad_rows_are_dropped() {
        let items = [read(1, 0), read(2, 0)];
        let mut rows: Vec<Row> = items
            .iter()
            .map(|i| Row {
                key: item_key(i),
                at: 0,
                body: serde_json::to_vec(i).expect("json"),
            })
            .collect();
        rows.push(Row {
            key: b"read\0x\0ibroken".to_vec(),
            at: 0,
            body: b"{".to_vec(),
        });
        rows.push(Row {
            key: b"other".to_vec(),
            at: 0,
            body: vec![],
        });
        let (groups, bad) = groups(rows);
        assert_eq!(bad.len(), 2);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups.values().next().map(|g| g.items.len()), Some(2));
    }
}
