//! The Dovecot reconciler: what changed in a mailbox while mailhook was not listening.
//! It logs in to each mailbox the index knows, as the configured master user, takes a
//! snapshot (LIST; per folder EXAMINE for UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ, and
//! UID SEARCH ALL), and compares it with the mailbox index: indexed messages that are gone
//! were expunged or moved, unindexed messages at or above the folder's watermark arrived,
//! folders appeared, vanished or were renamed (same UIDVALIDITY). The findings are the
//! events the live notifications would have been, marked `reconciled`, with the same
//! producer ids: whichever of the two reaches mailhook first is delivered, once.
//!
//! When: at start-up for every user the index knows, and on the first batch of a user
//! seen live (a first look, which only sets the watermarks). IMAP client: `async-imap`
//! (maintained, tokio, CONDSTORE's HIGHESTMODSEQ on EXAMINE). It leaves QRESYNC's
//! `VANISHED (EARLIER)` unparsed, so expunges are found by comparing UID sets, which costs
//! one UID SEARCH per folder and needs no mod-sequence kept between runs.
//!
//! The master password opens every mailbox, so the connection is TLS (STARTTLS or
//! implicit, see `connect`) unless plaintext was asked for by name.
//!
//! `plan` and `findings` are pure; `Reconciler::run` does the I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use tracing::{info, warn};

use super::index::{self, IndexChange, IndexedMailbox, IndexedMessage, MessageKey};
use super::{
    DovecotConfig, Made, Mapped, Shared, Side, folder_producer_id, mailbox_of, message_producer_id, with_message,
};
use crate::api::EventType;
use crate::event::{Activity, DeleteStage, FolderAction};
use crate::source::{Pipeline, normalize_address};

pub mod connect;

/// How to reach the Dovecot server.
#[derive(Clone)]
pub struct ReconcilerConfig {
    /// IMAP address (host:port) and its TLS.
    pub transport: connect::Transport,
    pub master_user: String,
    pub master_password: String,
    /// Dovecot's `auth_master_user_separator`.
    pub separator: String,
}

impl std::fmt::Debug for ReconcilerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconcilerConfig")
            .field("transport", &self.transport)
            .field("master_user", &self.master_user)
            .finish_non_exhaustive()
    }
}

/// One folder as IMAP showed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FolderNow {
    pub uid_validity: u32,
    pub uid_next: u32,
    pub uids: BTreeSet<u32>,
    /// Listed but not read (a name that is not modified UTF-7, no UIDVALIDITY): neither
    /// gone nor new, and nothing in it is judged.
    pub unreadable: bool,
}

/// A mailbox as IMAP showed it: folder (UTF-8) → its state.
pub type Snapshot = BTreeMap<String, FolderNow>;

/// What a comparison found, before the new messages' headers are read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// First look at this mailbox: only watermarks are set, nothing new is reported.
    pub first_look: bool,
    /// (old name, new name, UIDVALIDITY).
    pub renamed: Vec<(String, String, u32)>,
    pub created: Vec<(String, u32)>,
    /// (name, UIDVALIDITY if known).
    pub deleted: Vec<(String, Option<u32>)>,
    /// Indexed messages that are gone.
    pub vanished: Vec<(MessageKey, IndexedMessage)>,
    /// Messages not indexed, at or above their folder's watermark: their headers are read.
    pub arrived: Vec<MessageKey>,
    /// Every folder's UIDVALIDITY and UIDNEXT, the new watermarks.
    pub watermarks: Vec<(String, u32, u32)>,
}

/// Compares a snapshot with what the index knew. Indexed messages indexed at or after
/// `indexed_before` (unix seconds) are left alone: the live path may have put them there
/// after the snapshot was taken. Pure.
pub fn plan(user: &str, now: &Snapshot, index: &IndexedMailbox, indexed_before: i64) -> Plan {
    let mut plan = Plan {
        first_look: !index.folders.values().any(|f| f.uid_next.is_some()),
        ..Plan::default()
    };
    let known: BTreeSet<&String> = index.folders.keys().collect();
    let mut gone: Vec<&String> = known.iter().copied().filter(|f| !now.contains_key(*f)).collect();
    let mut appeared: Vec<&String> = now
        .iter()
        .filter(|(f, state)| !known.contains(f) && !state.unreadable)
        .map(|(f, _)| f)
        .collect();
    // A folder that went while one with its UIDVALIDITY appeared was renamed.
    let mut renames: BTreeMap<String, String> = BTreeMap::new();
    gone.retain(|g| {
        let Some(v) = index.folders.get(*g).and_then(|f| f.uid_validity) else {
            return true;
        };
        match appeared
            .iter()
            .position(|a| now.get(*a).is_some_and(|f| f.uid_validity == v))
        {
            Some(i) => {
                let new = appeared.remove(i);
                renames.insert((*g).clone(), new.clone());
                plan.renamed.push(((*g).clone(), new.clone(), v));
                false
            }
            None => true,
        }
    });
    for g in gone {
        plan.deleted
            .push((g.clone(), index.folders.get(g).and_then(|f| f.uid_validity)));
    }
    if !plan.first_look {
        for a in &appeared {
            if let Some(f) = now.get(*a) {
                plan.created.push(((*a).clone(), f.uid_validity));
            }
        }
    }
    let deleted: BTreeSet<&String> = plan.deleted.iter().map(|(f, _)| f).collect();
    for (key, message) in &index.messages {
        if message.seen_at >= indexed_before || deleted.contains(&key.folder) {
            continue;
        }
        let folder = renames.get(&key.folder).unwrap_or(&key.folder);
        let present = now
            .get(folder)
            .is_some_and(|f| f.unreadable || (f.uid_validity == key.uid_validity && f.uids.contains(&key.uid)));
        if !present {
            plan.vanished.push((key.clone(), message.clone()));
        }
    }
    for (folder, state) in now.iter().filter(|(_, state)| !state.unreadable) {
        plan.watermarks
            .push((folder.clone(), state.uid_validity, state.uid_next));
        if plan.first_look {
            continue;
        }
        // Where the index last looked, by this folder's name now (renamed: its old name).
        let old_name = renames.iter().find(|(_, new)| *new == folder).map(|(old, _)| old);
        let entry = index.folders.get(old_name.unwrap_or(folder));
        let watermark = match entry {
            Some(f) if f.uid_validity == Some(state.uid_validity) => f.uid_next.unwrap_or_else(|| {
                // Known by its messages only: what lies above the highest one is new.
                index
                    .messages
                    .keys()
                    .filter(|k| k.folder == *old_name.unwrap_or(folder) && k.uid_validity == state.uid_validity)
                    .map(|k| k.uid.saturating_add(1))
                    .max()
                    // Created while mailhook listened and empty since: everything is new.
                    .unwrap_or(1)
            }),
            // A new folder, or one created again: everything in it is new.
            _ => 1,
        };
        for uid in state.uids.range(watermark..) {
            let key = MessageKey {
                user: user.to_string(),
                folder: folder.clone(),
                uid_validity: state.uid_validity,
                uid: *uid,
            };
            let indexed_as = MessageKey {
                folder: old_name.cloned().unwrap_or_else(|| folder.clone()),
                ..key.clone()
            };
            if !index.messages.contains_key(&indexed_as) {
                plan.arrived.push(key);
            }
        }
    }
    plan
}

/// The events and index changes of a plan, given the arrived messages' headers. Pure.
pub fn findings(
    user: &str,
    plan: Plan,
    headers: &BTreeMap<MessageKey, IndexedMessage>,
    cfg: &DovecotConfig,
    now: jiff::Timestamp,
) -> Mapped {
    let mailbox = mailbox_of(user);
    let event = |event_type: EventType, folder: Option<String>, activity: Activity, producer: String| {
        Made {
            event_type,
            mailbox: mailbox.clone(),
            folder,
            occurred_at: now,
            received_at: now,
            producer,
            activity,
        }
        .event()
    };
    let activity = || Activity {
        user: user.to_string(),
        reconciled: true,
        ..Default::default()
    };
    let mut out = Mapped::default();
    // Before the renames: a vanished message is named by its folder's old name.
    for (key, _) in &plan.vanished {
        out.index.push(IndexChange::Remove(key.clone()));
    }
    for (old, new, v) in &plan.renamed {
        let mut a = activity();
        a.action = Some(FolderAction::Renamed);
        a.previous_folder = Some(old.clone());
        out.events.push(event(
            EventType::FolderChanged,
            Some(new.clone()),
            a,
            folder_producer_id(user, new, *v, FolderAction::Renamed),
        ));
        // Each subfolder keeps its UIDVALIDITY too and is found renamed on its own.
        out.index.push(IndexChange::RenameFolder {
            user: user.to_string(),
            from: old.clone(),
            to: new.clone(),
            separator: None,
        });
    }
    for (folder, v) in &plan.created {
        let mut a = activity();
        a.action = Some(FolderAction::Created);
        out.events.push(event(
            EventType::FolderChanged,
            Some(folder.clone()),
            a,
            folder_producer_id(user, folder, *v, FolderAction::Created),
        ));
    }
    for (folder, v) in &plan.deleted {
        let mut a = activity();
        a.action = Some(FolderAction::Deleted);
        let producer = match v {
            Some(v) => folder_producer_id(user, folder, *v, FolderAction::Deleted),
            None => format!("dovecot:{user}:{folder}:deleted:{}", now.as_second()),
        };
        out.events
            .push(event(EventType::FolderChanged, Some(folder.clone()), a, producer));
        out.index.push(IndexChange::RemoveFolder {
            user: user.to_string(),
            folder: folder.clone(),
        });
    }
    // Moves: a message that left one folder and arrived in another, by Message-ID.
    let mut arrived_used = vec![false; plan.arrived.len()];
    for (key, message) in &plan.vanished {
        let to = message.message_id.as_deref().and_then(|id| {
            plan.arrived.iter().enumerate().position(|(i, k)| {
                !arrived_used[i]
                    && k.folder != key.folder
                    && headers.get(k).and_then(|h| h.message_id.as_deref()) == Some(id)
            })
        });
        let mut a = activity();
        let e = match to {
            Some(i) => {
                arrived_used[i] = true;
                let dest = &plan.arrived[i];
                a.previous_folder = Some(key.folder.clone());
                let kind = if cfg.is_trash(&dest.folder) && !cfg.is_trash(&key.folder) {
                    a.stage = Some(DeleteStage::Soft);
                    EventType::MessageDeleted
                } else {
                    EventType::MessageMoved
                };
                let e = event(kind, Some(dest.folder.clone()), a, message_producer_id(dest, Side::In));
                with_message(e, Some(dest), headers.get(dest).or(Some(message)))
            }
            None => {
                a.stage = Some(DeleteStage::Hard);
                let e = event(
                    EventType::MessageDeleted,
                    Some(key.folder.clone()),
                    a,
                    message_producer_id(key, Side::Out),
                );
                with_message(e, Some(key), Some(message))
            }
        };
        out.events.push(e);
    }
    for (i, key) in plan.arrived.iter().enumerate() {
        let header = headers.get(key);
        if let Some(h) = header {
            out.index.push(IndexChange::Put(key.clone(), h.clone()));
        }
        if arrived_used[i] {
            continue;
        }
        // Deliveries land in INBOX; the client saves sent mail to Sent; anything else is
        // a copy or an upload, as the live path sees it.
        let (kind, direction) = if key.folder.eq_ignore_ascii_case("INBOX") {
            (EventType::MessageReceived, cfg.received_direction(header))
        } else if cfg.is_sent(&key.folder) {
            (EventType::MessageSent, cfg.sent_direction(header))
        } else {
            continue;
        };
        let mut e = event(
            kind,
            Some(key.folder.clone()),
            activity(),
            message_producer_id(key, Side::In),
        );
        e.direction = Some(direction);
        out.events.push(with_message(e, Some(key), header));
    }
    for (folder, uid_validity, uid_next) in plan.watermarks {
        out.index.push(IndexChange::PutFolder {
            user: user.to_string(),
            folder,
            uid_validity: Some(uid_validity),
            uid_next: Some(uid_next),
        });
    }
    out
}

/// IMAP's modified UTF-7 (RFC 3501 5.1.3) folder name in UTF-8; None when malformed. Pure.
pub fn decode_folder(name: &str) -> Option<String> {
    use base64::Engine as _;
    let mut out = String::new();
    let mut rest = name;
    while let Some(amp) = rest.find('&') {
        out.push_str(rest.get(..amp)?);
        let after = rest.get(amp + 1..)?;
        let end = after.find('-')?;
        let encoded = after.get(..end)?;
        if encoded.is_empty() {
            out.push('&');
        } else {
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(encoded.replace(',', "/"))
                .ok()?;
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            out.push_str(&String::from_utf16(&units).ok()?);
        }
        rest = after.get(end + 1..)?;
    }
    out.push_str(rest);
    Some(out)
}

/// Why a reconcile of one mailbox failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    #[error("IMAP")]
    Imap(#[from] async_imap::error::Error),
    #[error("the master user's login into {user} was refused")]
    Login {
        user: String,
        #[source]
        source: async_imap::error::Error,
    },
    #[error("the mailbox index")]
    Store(#[from] crate::store::StoreError),
    #[error("storing the findings")]
    Accept(#[from] crate::source::AcceptError),
    #[error("a blocking task stopped")]
    Join(#[from] tokio::task::JoinError),
}

type Session = async_imap::Session<connect::ImapStream>;

/// UIDs per UID FETCH.
const FETCH_CHUNK: usize = 500;

/// A mailbox whose reconcile failed is tried again this often, this many times.
const RETRY_EVERY: Duration = Duration::from_secs(60);
const RETRIES: u32 = 10;

/// How long one mailbox's reconcile may take.
const MAILBOX_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Reconciler {
    pub config: ReconcilerConfig,
    pub dovecot: DovecotConfig,
    pub pipeline: Arc<Pipeline>,
    pub shared: Arc<Shared>,
}

impl Reconciler {
    /// Reconciles every mailbox the index knows, then each user seen live for the first
    /// time, until `stop`.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let mut first_seen = self.shared.first_seen();
        let rows = self.pipeline.deliveries.rows();
        let users = match tokio::task::spawn_blocking(move || index::users(rows.as_ref())).await {
            Ok(Ok(users)) => users,
            Ok(Err(err)) => {
                warn!(%err, "the Dovecot reconciler cannot list the mailboxes it knows; it starts with none");
                Vec::new()
            }
            Err(err) => {
                warn!(%err, "the Dovecot reconciler cannot list the mailboxes it knows; it starts with none");
                Vec::new()
            }
        };
        info!(
            mailboxes = users.len(),
            "Dovecot reconciler: looking at the known mailboxes"
        );
        // Mailboxes whose reconcile failed, with the attempts made.
        let mut failed: BTreeMap<String, u32> = BTreeMap::new();
        for user in users {
            if stop.is_cancelled() {
                return;
            }
            self.shared.seen(&user);
            if !self.reconcile_logged(&user).await {
                failed.insert(user, 1);
            }
        }
        let Some(rx) = first_seen.as_mut() else { return };
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.reset();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                user = rx.recv() => {
                    let Some(user) = user else { return };
                    if !self.reconcile_logged(&user).await {
                        failed.insert(user, 1);
                    }
                }
                _ = retry.tick(), if !failed.is_empty() => {
                    for (user, attempts) in std::mem::take(&mut failed) {
                        if !self.reconcile_logged(&user).await && attempts < RETRIES {
                            failed.insert(user, attempts + 1);
                        }
                    }
                }
            }
        }
    }

    /// Reconciles one mailbox and logs the outcome; false when it failed.
    async fn reconcile_logged(&self, user: &str) -> bool {
        match tokio::time::timeout(MAILBOX_TIMEOUT, self.reconcile(user)).await {
            Ok(Ok((events, first_look))) => {
                info!(user, events, first_look, "Dovecot mailbox reconciled");
                true
            }
            Ok(Err(err)) => {
                warn!(
                    user,
                    error = crate::error_chain(&err),
                    "Dovecot mailbox not reconciled; will retry"
                );
                false
            }
            Err(_) => {
                warn!(
                    user,
                    "Dovecot mailbox not reconciled: it took longer than {MAILBOX_TIMEOUT:?}; will retry"
                );
                false
            }
        }
    }

    /// One mailbox: returns how many events it found, and whether it was a first look.
    pub async fn reconcile(&self, user: &str) -> Result<(usize, bool), ReconcileError> {
        let _lock = self.shared.locks.lock(user).await;
        let indexed_before = jiff::Timestamp::now().as_second().saturating_sub(1);
        let mut session = self.login(user).await?;
        let snapshot = snapshot(&mut session).await?;
        let rows = self.pipeline.deliveries.rows();
        let who = user.to_string();
        let known = tokio::task::spawn_blocking(move || index::mailbox(rows.as_ref(), &who, None)).await??;
        let plan = plan(user, &snapshot, &known, indexed_before);
        let first_look = plan.first_look;
        let headers = read_headers(&mut session, &plan.arrived).await?;
        // What was read is complete; a failed goodbye changes nothing.
        let _ = session.logout().await;
        let mapped = findings(user, plan, &headers, &self.dovecot, jiff::Timestamp::now());
        let events = mapped.events.len();
        let pipeline = self.pipeline.clone();
        tokio::task::spawn_blocking(move || index::accept(&pipeline, mapped.events, mapped.index)).await??;
        Ok((events, first_look))
    }

    async fn login(&self, user: &str) -> Result<Session, ReconcileError> {
        let client = self.config.transport.connect().await?;
        let login = format!("{user}{}{}", self.config.separator, self.config.master_user);
        let transport = &self.config.transport;
        tokio::time::timeout(transport.timeout, client.login(login, &self.config.master_password))
            .await
            .map_err(|_| connect::ConnectError::Timeout {
                addr: transport.addr.clone(),
                step: "answer to LOGIN",
                after: transport.timeout,
                hint: "",
            })?
            .map_err(|(source, _)| ReconcileError::Login {
                user: user.to_string(),
                source,
            })
    }
}

/// LIST, then per selectable folder EXAMINE and UID SEARCH ALL.
async fn snapshot(session: &mut Session) -> Result<Snapshot, ReconcileError> {
    use async_imap::types::NameAttribute;
    let names: Vec<String> = session
        .list(Some(""), Some("*"))
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        // \NonExistent (RFC 5258) arrives as an extension attribute.
        .filter(|n| {
            !n.attributes().iter().any(|a| match a {
                NameAttribute::NoSelect => true,
                NameAttribute::Extension(x) => x.eq_ignore_ascii_case("\\NonExistent"),
                _ => false,
            })
        })
        .map(|n| n.name().to_string())
        .collect();
    let mut out = Snapshot::new();
    for raw in names {
        let Some(folder) = decode_folder(&raw) else {
            warn!(folder = raw, "a folder name that is not modified UTF-7; skipped");
            out.insert(
                raw,
                FolderNow {
                    unreadable: true,
                    ..FolderNow::default()
                },
            );
            continue;
        };
        let mailbox = session.examine(&raw).await?;
        let (Some(uid_validity), Some(uid_next)) = (mailbox.uid_validity, mailbox.uid_next) else {
            out.insert(
                folder,
                FolderNow {
                    unreadable: true,
                    ..FolderNow::default()
                },
            );
            continue;
        };
        let uids = if mailbox.exists == 0 {
            BTreeSet::new()
        } else {
            session.uid_search("ALL").await?.into_iter().collect()
        };
        out.insert(
            folder,
            FolderNow {
                uid_validity,
                uid_next,
                uids,
                unreadable: false,
            },
        );
    }
    Ok(out)
}

/// Message-ID, Subject, From and To of the arrived messages, folder by folder.
async fn read_headers(
    session: &mut Session,
    arrived: &[MessageKey],
) -> Result<BTreeMap<MessageKey, IndexedMessage>, ReconcileError> {
    let mut by_folder: BTreeMap<&str, Vec<&MessageKey>> = BTreeMap::new();
    for key in arrived {
        by_folder.entry(key.folder.as_str()).or_default().push(key);
    }
    let mut out = BTreeMap::new();
    let now = jiff::Timestamp::now().as_second();
    for (folder, keys) in by_folder {
        session.examine(encode_folder(folder)).await?;
        // A few hundred UIDs per command: a command line stays far below Dovecot's
        // imap_max_line_length (64 KiB) however many messages arrived.
        let mut fetched = Vec::new();
        for chunk in keys.chunks(FETCH_CHUNK) {
            let set = chunk.iter().map(|k| k.uid.to_string()).collect::<Vec<_>>().join(",");
            let mut part: Vec<_> = session
                .uid_fetch(set, "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT FROM TO)])")
                .await?
                .try_collect()
                .await?;
            fetched.append(&mut part);
        }
        for f in fetched {
            let (Some(uid), Some(bytes)) = (f.uid, f.header().or_else(|| f.body())) else {
                continue;
            };
            let Some(key) = keys.iter().find(|k| k.uid == uid) else {
                continue;
            };
            out.insert((*key).clone(), parse_headers(bytes, now));
        }
    }
    Ok(out)
}

/// The index's view of a message from its header block. Pure.
pub fn parse_headers(bytes: &[u8], now: i64) -> IndexedMessage {
    // mail-parser 0.11 can panic on malformed input (see source::journal): a message it
    // cannot read is indexed without names.
    std::panic::catch_unwind(|| {
        let parsed = mail_parser::MessageParser::default().parse_headers(bytes)?;
        let first = |a: Option<&mail_parser::Address<'_>>| {
            a.and_then(|a| a.first())
                .and_then(|a| a.address())
                .and_then(normalize_address)
        };
        Some(IndexedMessage {
            message_id: parsed.message_id().map(|id| format!("<{id}>")),
            subject: parsed.subject().map(String::from),
            from: first(parsed.from()),
            to: first(parsed.to()).into_iter().collect(),
            seen_at: now,
        })
    })
    .ok()
    .flatten()
    .unwrap_or(IndexedMessage {
        seen_at: now,
        ..Default::default()
    })
}

/// A UTF-8 folder name in IMAP's modified UTF-7. Pure.
pub fn encode_folder(folder: &str) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    let mut run: Vec<u16> = Vec::new();
    let flush = |run: &mut Vec<u16>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        let bytes: Vec<u8> = run.iter().flat_map(|u| u.to_be_bytes()).collect();
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(bytes)
            .replace('/', ",");
        out.push('&');
        out.push_str(&b64);
        out.push('-');
        run.clear();
    };
    for c in folder.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut run, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            run.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests;
