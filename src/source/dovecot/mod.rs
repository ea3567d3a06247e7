//! The Dovecot source: what happens inside mailboxes, as a Dovecot server reports it.
//! Two feeds arrive on the ingest API, with its tokens:
//!
//! - `POST /v1/sources/dovecot`: the push-notification batches of the shipped Lua script
//!   (`examples/dovecot/mailhook.lua`), one per outermost mail transaction (an IMAP MOVE
//!   is one batch: the append in the destination and the expunge in the source), one JSON
//!   batch per request (the script resends its spool one batch at a time).
//! - `POST /v1/sources/dovecot/events`: Dovecot's event exporter (`transport = http-post`,
//!   the token as the password of the URL's credentials): configuration changes the
//!   push notifications never see (ACLs, metadata, Sieve scripts).
//!
//! `map_batch` and `map_exported` are pure: what arrived and what the mailbox index knew
//! become events and index changes, which are stored in one commit.

use std::collections::HashMap;

use serde::Deserialize;

use self::index::{IndexChange, IndexedMessage, MessageKey};
use super::{is_internal, normalize_address};
use crate::api::{Direction, EventType};
use crate::event::{Activity, DeleteStage, FolderAction, MailboxEvent, Source};

/// The batch format this binary reads; the script sends it as `version`.
pub const WIRE_VERSION: u32 = 1;

/// Longest text kept from a notification (subjects, folder names, addresses).
const MAX_TEXT: usize = 16 * 1024;
/// Most notifications one batch may carry (a MOVE of a whole folder is one batch).
pub const MAX_NOTIFICATIONS: usize = 100_000;

/// How folders are recognised, and what makes a message internal.
#[derive(Debug, Clone, Default)]
pub struct DovecotConfig {
    /// Folder names where an append is a sent message (compared ignoring case).
    pub sent_folders: Vec<String>,
    /// Folder names where a moved message counts as deleted (soft).
    pub trash_folders: Vec<String>,
    /// Lower-cased internal domains (direction).
    pub internal_domains: Vec<String>,
    /// The namespace's hierarchy separator: a renamed folder's subfolders are renamed too.
    pub separator: Option<char>,
    /// The master user mailhook's reconciler logs in as: its sessions are labelled
    /// `mailhookSession`.
    pub own_master_user: Option<String>,
    /// Where Sieve scripts are read (`--dovecot-managesieve-addr`), to say where a
    /// changed script forwards mail.
    pub sieve: Option<managesieve::SieveServer>,
}

impl DovecotConfig {
    fn is_sent(&self, folder: &str) -> bool {
        self.sent_folders.iter().any(|f| f.eq_ignore_ascii_case(folder))
    }

    fn is_trash(&self, folder: &str) -> bool {
        self.trash_folders.iter().any(|f| f.eq_ignore_ascii_case(folder))
    }

    /// A delivered message: internal when its sender is.
    fn received_direction(&self, message: Option<&IndexedMessage>) -> Direction {
        let from = message.and_then(|m| m.from.as_deref());
        if from.is_some_and(|f| is_internal(f, &self.internal_domains)) {
            Direction::Internal
        } else {
            Direction::Inbound
        }
    }

    /// Sent mail: internal when every known recipient is.
    fn sent_direction(&self, message: Option<&IndexedMessage>) -> Direction {
        let to = message.map(|m| m.to.as_slice()).unwrap_or_default();
        if !self.internal_domains.is_empty()
            && !to.is_empty()
            && to.iter().all(|t| is_internal(t, &self.internal_domains))
        {
            Direction::Internal
        } else {
            Direction::Outbound
        }
    }
}

/// One transaction group of one session, as the Lua script posts it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    pub version: u32,
    /// Unique per batch; with each notification's position, the producer id that makes a
    /// resent batch a duplicate.
    pub batch: String,
    /// The mailbox user the changes were made in.
    pub user: String,
    /// Who authenticated (a master user or an admin, when not the user).
    #[serde(default)]
    pub auth_user: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub remote_ip: Option<String>,
    #[serde(default)]
    pub session: Option<String>,
    /// Unix seconds when the transaction ended (the server's clock).
    #[serde(default)]
    pub at: Option<i64>,
    pub events: Vec<Notification>,
}

/// One RFC 5423 notification, flattened by the script (unknown fields are ignored, so a
/// newer script's additions do not break an older mailhook).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    /// `MessageNew`, `MessageAppend`, `MessageExpunge`, `MessageTrash`, `MessageRead`,
    /// `FlagsSet`, `FlagsClear`, `MailboxCreate`, `MailboxDelete`, `MailboxRename`,
    /// `MailboxSubscribe`, `MailboxUnsubscribe`.
    pub event: String,
    #[serde(default)]
    pub mailbox: Option<String>,
    /// MailboxRename: the old name.
    #[serde(default)]
    pub mailbox_old: Option<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub uid_validity: Option<u32>,
    #[serde(default)]
    pub message_id: Option<String>,
    /// Sender address (not the display name).
    #[serde(default)]
    pub from: Option<String>,
    /// First recipient address.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    /// System flags set or cleared (FlagsSet / FlagsClear).
    #[serde(default)]
    pub flags: Vec<String>,
    /// Keywords set or cleared.
    #[serde(default)]
    pub keywords: Vec<String>,
}

/// Why a batch was refused whole: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BatchError {
    pub field: String,
    pub problem: String,
}

fn refuse(field: impl Into<String>, problem: impl Into<String>) -> BatchError {
    BatchError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// What a batch becomes: events (in the order of the notifications they came from) and
/// the changes to the mailbox index, stored together.
#[derive(Debug, Default)]
pub struct Mapped {
    pub events: Vec<MailboxEvent>,
    pub index: Vec<IndexChange>,
}

/// The mailbox a Dovecot user name stands for: the address, lower-cased, where it is
/// one; otherwise the name as Dovecot has it, lower-cased.
pub fn mailbox_of(user: &str) -> String {
    normalize_address(user).unwrap_or_else(|| user.trim().to_lowercase())
}

fn clean(text: Option<String>) -> Option<String> {
    text.map(|t| {
        let t: String = t.chars().filter(|c| !c.is_control()).collect();
        match t.char_indices().nth(MAX_TEXT) {
            Some((cut, _)) => t.get(..cut).unwrap_or_default().to_string(),
            None => t,
        }
    })
    .filter(|t| !t.is_empty())
}

/// The flags that tell something: `\Recent` is the server's own bookkeeping (selecting a
/// folder clears it), never a user's act.
fn meaningful(flags: &[String], keywords: &[String]) -> Vec<String> {
    let mut out: Vec<String> = flags
        .iter()
        .chain(keywords)
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent") && !f.trim().is_empty())
        .filter_map(|f| clean(Some(f.clone())))
        .collect();
    out.dedup();
    out
}

/// A Dovecot event: what happened, to which mailbox and folder, who did it, under which
/// producer id; message fields are filled by the caller where known.
pub(crate) struct Made {
    pub event_type: EventType,
    pub mailbox: String,
    pub folder: Option<String>,
    pub occurred_at: jiff::Timestamp,
    pub received_at: jiff::Timestamp,
    pub producer: String,
    pub activity: Activity,
}

impl Made {
    pub(crate) fn event(self) -> MailboxEvent {
        MailboxEvent {
            id: MailboxEvent::new_id(),
            event_type: self.event_type,
            occurred_at: self.occurred_at,
            received_at: self.received_at,
            source: Source::Dovecot,
            producer_event_id: Some(self.producer),
            mailbox: self.mailbox,
            message_id: None,
            from: None,
            to: vec![],
            cc: vec![],
            bcc: vec![],
            subject: None,
            size: None,
            attachments: vec![],
            direction: None,
            folder: self.folder,
            headers: Default::default(),
            flags: vec![],
            flagged_event_id: None,
            flag_namespace: None,
            raw_message: None,
            activity: Some(Box::new(self.activity)),
            dead_letter: None,
            producer_scope: None,
            log_index: Default::default(),
        }
    }
}

/// The session's side of every event of a batch.
struct Session {
    mailbox: String,
    activity: Activity,
    at: jiff::Timestamp,
    now: jiff::Timestamp,
    batch: String,
}

impl Session {
    fn event(
        &self,
        position: usize,
        event_type: EventType,
        folder: Option<String>,
        activity: Activity,
    ) -> MailboxEvent {
        Made {
            event_type,
            mailbox: self.mailbox.clone(),
            folder,
            occurred_at: self.at,
            received_at: self.now,
            producer: format!("dovecot:{}:{position}", self.batch),
            activity,
        }
        .event()
    }

    fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

/// Which end of a message's life in a folder an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// It arrived in the folder (delivered, appended, moved in).
    In,
    /// It left the folder (expunged).
    Out,
}

/// The producer id of an event about a message arriving in or leaving its place: UIDs
/// are never reused within a UIDVALIDITY, so the live notification, its resent copy from
/// the script's spool and the reconciler's finding are one event, whichever comes first.
pub fn message_producer_id(key: &MessageKey, side: Side) -> String {
    let side = match side {
        Side::In => "in",
        Side::Out => "out",
    };
    format!(
        "dovecot:{}:{}:{}:{}:{side}",
        key.user, key.folder, key.uid_validity, key.uid
    )
    .chars()
    .filter(|c| !c.is_control())
    .collect()
}

/// The producer id of a folder's creation or renaming when its UIDVALIDITY is known: a
/// folder created again gets a new one, so the live notification and the reconciler's
/// finding are one event. Pure.
pub fn folder_producer_id(user: &str, folder: &str, uid_validity: u32, action: FolderAction) -> String {
    let action = match action {
        FolderAction::Created => "created",
        FolderAction::Renamed => "renamed",
        FolderAction::Deleted => "deleted",
        FolderAction::Subscribed => "subscribed",
        FolderAction::Unsubscribed => "unsubscribed",
    };
    format!("dovecot:{user}:{folder}:{uid_validity}:{action}")
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

/// Names the event by its message's place (see `message_producer_id`), when it has one.
fn placed(mut event: MailboxEvent, key: Option<&MessageKey>, side: Side) -> MailboxEvent {
    if let Some(key) = key {
        event.producer_event_id = Some(message_producer_id(key, side));
    }
    event
}

/// A message event's notification, with the message it names.
struct Placed {
    position: usize,
    key: Option<MessageKey>,
    folder: String,
    known: Option<IndexedMessage>,
}

fn with_message(mut event: MailboxEvent, key: Option<&MessageKey>, known: Option<&IndexedMessage>) -> MailboxEvent {
    if let Some(m) = known {
        event.message_id = m.message_id.clone();
        event.subject = m.subject.clone();
        event.from = m.from.clone();
        event.to = m.to.clone();
    }
    if let (Some(key), Some(activity)) = (key, event.activity.as_mut()) {
        activity.uid = Some(key.uid);
        activity.uid_validity = Some(key.uid_validity);
    }
    event
}

/// Maps one batch. `lookup` answers what the index knew of a message before this batch;
/// messages the batch itself indexes are found without it.
pub fn map_batch(
    batch: Batch,
    lookup: &mut dyn FnMut(&MessageKey) -> Option<IndexedMessage>,
    cfg: &DovecotConfig,
    now: jiff::Timestamp,
) -> Result<Mapped, BatchError> {
    let (session, notifications) = checked(batch, now)?;
    let mut mapping = Mapping::new(&session, cfg, lookup);
    for (position, n) in notifications.into_iter().enumerate() {
        mapping.notification(position, n)?;
    }
    Ok(mapping.finish())
}

/// The batch's envelope checked, as the session its notifications share.
fn checked(batch: Batch, now: jiff::Timestamp) -> Result<(Session, Vec<Notification>), BatchError> {
    if batch.version != WIRE_VERSION {
        return Err(refuse(
            "version",
            format!(
                "batch format version {} is not spoken by this mailhook (it reads version {WIRE_VERSION}); \
                 install the Lua script shipped with this release",
                batch.version
            ),
        ));
    }
    let user = batch.user.trim().to_string();
    if user.is_empty() || user.len() > 320 || user.chars().any(char::is_control) {
        return Err(refuse("user", "must be the mailbox user's name, 1 to 320 characters"));
    }
    if batch.batch.is_empty() || batch.batch.len() > 200 || batch.batch.chars().any(char::is_control) {
        return Err(refuse(
            "batch",
            "must be 1 to 200 characters, none of them control characters",
        ));
    }
    if batch.events.len() > MAX_NOTIFICATIONS {
        return Err(refuse(
            "events",
            format!("more than {MAX_NOTIFICATIONS} notifications in one batch"),
        ));
    }
    let auth_user = clean(batch.auth_user).filter(|a| *a != user);
    let session = Session {
        mailbox: mailbox_of(&user),
        activity: Activity {
            user,
            admin_session: auth_user.is_some(),
            auth_user,
            service: clean(batch.service),
            remote_ip: clean(batch.remote_ip),
            session: clean(batch.session),
            ..Default::default()
        },
        at: batch
            .at
            .and_then(|s| jiff::Timestamp::from_second(s).ok())
            .unwrap_or(now),
        now,
        batch: batch.batch,
    };
    Ok((session, batch.events))
}

/// One batch being mapped: the events so far (by the position of the notification they
/// came from), the index changes, and the appends and expunges left to pair into moves.
struct Mapping<'a> {
    session: &'a Session,
    cfg: &'a DovecotConfig,
    lookup: &'a mut dyn FnMut(&MessageKey) -> Option<IndexedMessage>,
    out: Vec<(usize, MailboxEvent)>,
    index: Vec<IndexChange>,
    /// Messages indexed by this batch, for later notifications of the same batch.
    indexed: batch_index::BatchIndex,
    appends: Vec<Placed>,
    expunges: Vec<Placed>,
    soft_deleted: std::collections::HashSet<MessageKey>,
}

impl<'a> Mapping<'a> {
    fn new(
        session: &'a Session,
        cfg: &'a DovecotConfig,
        lookup: &'a mut dyn FnMut(&MessageKey) -> Option<IndexedMessage>,
    ) -> Self {
        Mapping {
            session,
            cfg,
            lookup,
            out: Vec::new(),
            index: Vec::new(),
            indexed: batch_index::BatchIndex::new(cfg.separator),
            appends: Vec::new(),
            expunges: Vec::new(),
            soft_deleted: std::collections::HashSet::new(),
        }
    }

    fn user(&self) -> &str {
        &self.session.activity.user
    }

    fn key_of(&self, n: &Notification, folder: &str) -> Option<MessageKey> {
        Some(MessageKey {
            user: self.user().to_string(),
            folder: folder.to_string(),
            uid_validity: n.uid_validity?,
            uid: n.uid?,
        })
    }

    /// What is known of a message: indexed earlier in this batch, or before it.
    fn find(&mut self, key: &Option<MessageKey>) -> Option<IndexedMessage> {
        let key = key.as_ref()?;
        self.indexed.get(key).cloned().or_else(|| (self.lookup)(key))
    }

    fn notification(&mut self, position: usize, n: Notification) -> Result<(), BatchError> {
        let folder = clean(n.mailbox.clone());
        let named = |what: &str| {
            folder.clone().ok_or_else(|| {
                refuse(
                    format!("events[{position}].mailbox"),
                    format!("a {what} notification names its folder"),
                )
            })
        };
        match n.event.as_str() {
            "MessageNew" | "MessageAppend" => self.arrived(position, &n, named("message")?),
            "MessageExpunge" => self.expunged(position, &n, named("message")?),
            "MessageTrash" => {
                let folder = named("message")?;
                let key = self.key_of(&n, &folder);
                let known = self.find(&key);
                self.soft_delete(position, key, &folder, known);
            }
            "FlagsSet" | "FlagsClear" => self.flagged(position, &n, named("message")?),
            // Reported as FlagsSet \Seen as well: one event for one act.
            "MessageRead" => {}
            "MailboxCreate" | "MailboxDelete" | "MailboxRename" | "MailboxSubscribe" | "MailboxUnsubscribe" => {
                self.folder_changed(position, &n, named("folder")?)?;
            }
            // A newer server or script may report more: ignored, not refused.
            _ => {}
        }
        Ok(())
    }

    /// A delivery (reported now) or an append (paired with an expunge into a move, or
    /// reported as sent, at the end).
    fn arrived(&mut self, position: usize, n: &Notification, folder: String) {
        let key = self.key_of(n, &folder);
        let message = IndexedMessage {
            message_id: clean(n.message_id.clone()),
            subject: clean(n.subject.clone()),
            from: n.from.as_deref().and_then(normalize_address),
            to: n.to.as_deref().and_then(normalize_address).into_iter().collect(),
            seen_at: self.session.now.as_second(),
        };
        if let Some(k) = &key {
            self.indexed.insert(k, message.clone());
            self.index.push(IndexChange::Put(k.clone(), message.clone()));
        }
        if n.event == "MessageAppend" {
            self.appends.push(Placed {
                position,
                key,
                folder,
                known: Some(message),
            });
            return;
        }
        let direction = self.cfg.received_direction(Some(&message));
        let session = self.session;
        let mut event = session.event(position, EventType::MessageReceived, Some(folder), session.activity());
        event.direction = Some(direction);
        let event = placed(event, key.as_ref(), Side::In);
        self.out
            .push((position, with_message(event, key.as_ref(), Some(&message))));
    }

    /// An expunge: the source half of a move, or a hard delete (at the end).
    fn expunged(&mut self, position: usize, n: &Notification, folder: String) {
        let key = self.key_of(n, &folder);
        let known = self.find(&key);
        if let Some(k) = &key {
            self.indexed.remove(k);
            self.index.push(IndexChange::Remove(k.clone()));
        }
        self.expunges.push(Placed {
            position,
            key,
            folder,
            known,
        });
    }

    /// Flags set or cleared; `\Deleted` set is a soft delete of its own.
    fn flagged(&mut self, position: usize, n: &Notification, folder: String) {
        let key = self.key_of(n, &folder);
        let set = n.event == "FlagsSet";
        let mut flags = meaningful(&n.flags, &n.keywords);
        if set && flags.iter().any(|f| f.eq_ignore_ascii_case("\\Deleted")) {
            flags.retain(|f| !f.eq_ignore_ascii_case("\\Deleted"));
            let known = self.find(&key);
            self.soft_delete(position, key.clone(), &folder, known);
        }
        if flags.is_empty() {
            return;
        }
        let known = self.find(&key);
        let mut activity = self.session.activity();
        activity.imap_flags = flags;
        let kind = if set {
            EventType::MessageFlagged
        } else {
            EventType::MessageUnflagged
        };
        let event = self.session.event(position, kind, Some(folder), activity);
        self.out
            .push((position, with_message(event, key.as_ref(), known.as_ref())));
    }

    /// A message marked deleted (trashed, or `\Deleted` set), once per message.
    fn soft_delete(&mut self, position: usize, key: Option<MessageKey>, folder: &str, known: Option<IndexedMessage>) {
        if key.as_ref().is_some_and(|k| self.soft_deleted.contains(k)) {
            return;
        }
        let mut activity = self.session.activity();
        activity.stage = Some(DeleteStage::Soft);
        let mut event = self
            .session
            .event(position, EventType::MessageDeleted, Some(folder.to_string()), activity);
        // A flag change in the same notification has the notification's id: this one
        // needs its own.
        event.producer_event_id = event.producer_event_id.map(|p| format!("{p}:soft"));
        self.out
            .push((position, with_message(event, key.as_ref(), known.as_ref())));
        self.soft_deleted.extend(key);
    }

    /// A folder created, deleted, renamed or (un)subscribed.
    fn folder_changed(&mut self, position: usize, n: &Notification, folder: String) -> Result<(), BatchError> {
        let user = self.user().to_string();
        let mut activity = self.session.activity();
        activity.action = Some(match n.event.as_str() {
            "MailboxCreate" => {
                // INBOX always exists for IMAP: the server creating it on first delivery
                // is not anyone's act.
                if folder.eq_ignore_ascii_case("INBOX") {
                    return Ok(());
                }
                self.index.push(IndexChange::PutFolder {
                    user: user.clone(),
                    folder: folder.clone(),
                    uid_validity: n.uid_validity,
                    uid_next: None,
                });
                FolderAction::Created
            }
            "MailboxDelete" => {
                self.index.push(IndexChange::RemoveFolder {
                    user: user.clone(),
                    folder: folder.clone(),
                });
                self.indexed.clear_folder(&folder);
                FolderAction::Deleted
            }
            "MailboxRename" => {
                let field = format!("events[{position}].mailboxOld");
                let Some(old) = clean(n.mailbox_old.clone()) else {
                    return Err(refuse(field, "a rename names the old folder"));
                };
                self.index.push(IndexChange::RenameFolder {
                    user: user.clone(),
                    from: old.clone(),
                    to: folder.clone(),
                    separator: self.cfg.separator,
                });
                if let Err(e) = self.indexed.rename(&old, &folder) {
                    return Err(refuse(field, format!("{e}; send them in smaller batches")));
                }
                activity.previous_folder = Some(old);
                FolderAction::Renamed
            }
            "MailboxSubscribe" => FolderAction::Subscribed,
            _ => FolderAction::Unsubscribed,
        });
        let action = activity.action;
        let mut event = self
            .session
            .event(position, EventType::FolderChanged, Some(folder.clone()), activity);
        if let (Some(uid_validity), Some(action @ (FolderAction::Created | FolderAction::Renamed))) =
            (n.uid_validity, action)
        {
            event.producer_event_id = Some(folder_producer_id(&user, &folder, uid_validity, action));
        }
        self.out.push((position, event));
        Ok(())
    }

    /// The events left at the end: moves, sent messages, hard deletes; all in the order
    /// of the notifications they came from.
    fn finish(mut self) -> Mapped {
        let pairs = pair_moves(&self.appends, &self.expunges);
        for &(a, e) in &pairs.paired {
            self.moved(a, e);
        }
        self.sent(&pairs.append_used);
        self.hard_deleted(&pairs.expunge_used);
        self.out.sort_by_key(|(position, _)| *position);
        Mapped {
            events: self.out.into_iter().map(|(_, e)| e).collect(),
            index: self.index,
        }
    }

    /// An append paired with an expunge: a move (a soft delete when into the trash).
    fn moved(&mut self, a: usize, e: usize) {
        let (Some(append), Some(expunge)) = (self.appends.get(a), self.expunges.get(e)) else {
            return;
        };
        let mut activity = self.session.activity();
        activity.previous_folder = Some(expunge.folder.clone());
        let kind = if self.cfg.is_trash(&append.folder) && !self.cfg.is_trash(&expunge.folder) {
            activity.stage = Some(DeleteStage::Soft);
            EventType::MessageDeleted
        } else {
            EventType::MessageMoved
        };
        // The destination's notification knows the message; the source's index entry
        // may know more (a recipient list from the delivery).
        let known = match (&append.known, &expunge.known) {
            (Some(new), Some(old)) => Some(IndexedMessage {
                message_id: new.message_id.clone().or_else(|| old.message_id.clone()),
                subject: new.subject.clone().or_else(|| old.subject.clone()),
                from: new.from.clone().or_else(|| old.from.clone()),
                to: if new.to.is_empty() {
                    old.to.clone()
                } else {
                    new.to.clone()
                },
                seen_at: new.seen_at,
            }),
            (new, old) => new.clone().or_else(|| old.clone()),
        };
        let position = append.position.min(expunge.position);
        let event = placed(
            self.session
                .event(position, kind, Some(append.folder.clone()), activity),
            append.key.as_ref(),
            Side::In,
        );
        self.out
            .push((position, with_message(event, append.key.as_ref(), known.as_ref())));
    }

    /// Appends to a sent folder that were not moves. A copy or a client's upload to
    /// another folder is indexed, not reported.
    fn sent(&mut self, used: &[bool]) {
        for (a, append) in self.appends.iter().enumerate() {
            if used.get(a).copied().unwrap_or(false) || !self.cfg.is_sent(&append.folder) {
                continue;
            }
            let mut event = self.session.event(
                append.position,
                EventType::MessageSent,
                Some(append.folder.clone()),
                self.session.activity(),
            );
            event.direction = Some(self.cfg.sent_direction(append.known.as_ref()));
            let event = placed(event, append.key.as_ref(), Side::In);
            self.out.push((
                append.position,
                with_message(event, append.key.as_ref(), append.known.as_ref()),
            ));
        }
    }

    /// Expunges that were not moves: hard deletes.
    fn hard_deleted(&mut self, used: &[bool]) {
        for (e, expunge) in self.expunges.iter().enumerate() {
            if used.get(e).copied().unwrap_or(false) {
                continue;
            }
            let mut activity = self.session.activity();
            activity.stage = Some(DeleteStage::Hard);
            let event = placed(
                self.session.event(
                    expunge.position,
                    EventType::MessageDeleted,
                    Some(expunge.folder.clone()),
                    activity,
                ),
                expunge.key.as_ref(),
                Side::Out,
            );
            self.out.push((
                expunge.position,
                with_message(event, expunge.key.as_ref(), expunge.known.as_ref()),
            ));
        }
    }
}

/// Which appends and expunges of a batch are the two halves of one move.
struct Pairs {
    /// (append, expunge), by index.
    paired: Vec<(usize, usize)>,
    append_used: Vec<bool>,
    expunge_used: Vec<bool>,
}

/// A MOVE is an append in the destination and an expunge in the source, in one batch:
/// paired by Message-ID, or, for a source message the index never saw, in order. Pure.
fn pair_moves(appends: &[Placed], expunges: &[Placed]) -> Pairs {
    let mut pairs = Pairs {
        paired: Vec::new(),
        append_used: vec![false; appends.len()],
        expunge_used: vec![false; expunges.len()],
    };
    // Appends by Message-ID, in order: a MOVE of a whole folder pairs in linear time.
    let mut by_id: HashMap<&str, std::collections::VecDeque<usize>> = HashMap::new();
    for (a, append) in appends.iter().enumerate() {
        if let Some(id) = append.known.as_ref().and_then(|k| k.message_id.as_deref()) {
            by_id.entry(id).or_default().push_back(a);
        }
    }
    for (e, expunge) in expunges.iter().enumerate() {
        let Some(id) = expunge.known.as_ref().and_then(|k| k.message_id.as_deref()) else {
            continue;
        };
        let Some(queue) = by_id.get_mut(id) else { continue };
        if let Some(at) = queue
            .iter()
            .position(|a| appends.get(*a).is_some_and(|append| append.folder != expunge.folder))
            && let Some(a) = queue.remove(at)
        {
            pairs.append_used[a] = true;
            pairs.expunge_used[e] = true;
            pairs.paired.push((a, e));
        }
    }
    let mut next = 0;
    for (e, expunge) in expunges.iter().enumerate() {
        if pairs.expunge_used[e] || expunge.known.as_ref().is_some_and(|k| k.message_id.is_some()) {
            continue;
        }
        while next < appends.len() && (pairs.append_used[next] || appends[next].folder == expunge.folder) {
            next += 1;
        }
        if next < appends.len() {
            pairs.append_used[next] = true;
            pairs.expunge_used[e] = true;
            pairs.paired.push((next, e));
            next += 1;
        }
    }
    pairs
}

pub mod acl;
mod batch_index;
pub mod exported;
pub use exported::{Exported, first_imap_argument, map_exported};
pub mod held;
pub mod index;
pub mod managesieve;
pub mod reconcile;
pub mod sieve;
#[cfg(test)]
mod tests;

/// Per-user locks kept before the idle ones are dropped.
const KEPT_LOCKS: usize = 4096;

/// What the Dovecot routes and the reconciler share: one lock per group of users (a batch
/// and a reconcile both read the mailbox index and write it back: one user's must not
/// interleave), and the users seen live, so the reconciler takes a first look at each.
pub struct Shared {
    pub locks: UserLocks,
    /// Held reads and failed logins on their way to the store.
    pub held: held::Buffer,
    seen: parking_lot::Mutex<std::collections::HashSet<String>>,
    first_seen: tokio::sync::mpsc::UnboundedSender<String>,
    first_seen_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

impl Default for Shared {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Shared {
            locks: UserLocks::default(),
            held: held::Buffer::default(),
            seen: Default::default(),
            first_seen: tx,
            first_seen_rx: parking_lot::Mutex::new(Some(rx)),
        }
    }
}

impl Shared {
    /// Notes that a batch of `user` was stored; the first time, the reconciler hears of it.
    pub fn seen(&self, user: &str) {
        let mut seen = self.seen.lock();
        // Every batch passes here: no allocation once the user is known.
        if !seen.contains(user) && seen.insert(user.to_string()) {
            drop(seen);
            // Fails only when no reconciler listens (none configured): nothing to do then.
            let _ = self.first_seen.send(user.to_string());
        }
    }

    /// The users seen for the first time, once (the reconciler takes it).
    pub fn first_seen(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        self.first_seen_rx.lock().take()
    }
}

/// One lock per user, held by the blocking ingest path and across the reconciler's IMAP
/// calls alike (a reconcile blocks that user's batches only). Locks nobody holds are
/// dropped once there are many.
#[derive(Default)]
pub struct UserLocks(parking_lot::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>);

impl UserLocks {
    fn slot(&self, user: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock();
        if locks.len() >= KEPT_LOCKS {
            locks.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
        }
        locks.entry(user.to_string()).or_default().clone()
    }

    pub async fn lock(&self, user: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.slot(user).lock_owned().await
    }
}
