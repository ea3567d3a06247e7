//! Mail journaling: turns what a mail system journals into `MailboxEvent`s. Pure; MIME is
//! parsed by `mail-parser`.
//!
//! Two forms are understood:
//! - **Exchange envelope journal reports**: a message with an `X-MS-Journal-Report` header
//!   whose first text part lists the envelope (`Sender:`, `Subject:`, `Message-Id:`,
//!   `To:`/`Cc:`/`Bcc:`/`Recipient:` lines, with `, Expanded: <list>` or
//!   `, Forwarded: <address>` after a recipient, `On-Behalf-Of:`), and whose
//!   `message/rfc822` attachment is the original message.
//! - **Plain copies** (BCC journaling, transport copies): the message itself, delivered
//!   to the journaled mailbox; the SMTP envelope recipient is that mailbox.
//!
//! Which events: a journal report gives one `message.received` per internal recipient
//! mailbox (To, Cc, Bcc, members of an expanded list; every recipient when no internal
//! domains are configured) and, when the sender is internal, one `message.sent` /
//! `message.internal` for the sender's mailbox (or the one it sent on behalf of); the
//! recipients' events then have direction `internal`. A plain copy gives one event per
//! envelope recipient, for that mailbox.
//!
//! What each event shows: the sender's event lists every recipient of the envelope; a
//! recipient's event shows what its recipient saw — the To and Cc of the message's header
//! (not the members a list was expanded to), at most [`MAX_LISTED`] of each, and Bcc only
//! if it is itself. Cost is linear in the recipients: events are made on demand, a chunk
//! at a time ([`Journaled::chunks`]), a report lists at most [`MAX_REPORT_RECIPIENTS`], and
//! what one message may expand to is bounded ([`MAX_EXPANSION_BYTES`]): a report that
//! would exceed it is refused with the figures, never half-recorded.

use std::collections::HashSet;

use mail_parser::{Message, MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};

use super::{direction, is_internal, normalize_address};
use crate::api::{Direction, EventType};
use crate::event::{Attachment, MailboxEvent, Source};
use crate::store::RawMessage;

/// Recipient lines (`To`, `Cc`, `Bcc`, `Recipient`) a journal report may list. An
/// all-staff mail of a large organisation fits; more is refused (`552`).
pub const MAX_REPORT_RECIPIENTS: usize = 50_000;

/// Addresses of the header's To (and of its Cc) listed in a recipient's event; the
/// recipient itself is kept when it is among them.
pub const MAX_LISTED: usize = 32;

/// Attachments listed in an event; a message with more lists the first ones.
pub const MAX_ATTACHMENTS: usize = 100;

/// Longest subject, Message-ID or attachment name kept, in bytes (RFC 5322's line limit);
/// longer ones are cut at a character boundary.
pub const MAX_TEXT: usize = 998;

/// What the events of one message may take in all, as stored (JSON): events × the size of
/// one. A report over it is refused with `552` and the figures.
pub const MAX_EXPANSION_BYTES: usize = 256 * 1024 * 1024;

/// The SMTP envelope of one message.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub mail_from: Option<String>,
    pub rcpt_to: Vec<String>,
}

/// Why a message could not be turned into events; the text goes into the 554 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("the message is not parseable MIME")]
    NotMime,
    #[error("the MIME parser failed on this message (malformed multipart structure)")]
    ParserFailed,
    #[error("the journal report has no message/rfc822 part holding the original message")]
    NoOriginal,
    #[error("the journal report names no Sender")]
    NoSender,
    #[error("the journal report lists no recipient (To, Cc, Bcc or Recipient lines)")]
    NoRecipients,
    #[error("{field}: {value:?} is not an email address")]
    BadAddress { field: String, value: String },
    #[error("the journal report lists more than {max} recipients")]
    TooManyRecipients { max: usize },
    #[error(
        "the message would make {events} events of about {each} bytes each ({} MiB), over the {} MiB one message may expand to",
        .events * .each / (1024 * 1024), MAX_EXPANSION_BYTES / (1024 * 1024)
    )]
    TooLarge { events: usize, each: usize },
}

impl JournalError {
    /// Whether the message is refused for its size (`552`) rather than its form (`554`).
    pub fn is_size(&self) -> bool {
        matches!(
            self,
            JournalError::TooManyRecipients { .. } | JournalError::TooLarge { .. }
        )
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// What the report's envelope part says.
#[derive(Debug, Default, PartialEq, Eq)]
struct ReportEnvelope {
    sender: Option<String>,
    subject: Option<String>,
    message_id: Option<String>,
    on_behalf_of: Option<String>,
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
}

fn address(field: &str, value: &str) -> Result<String, JournalError> {
    // "Display Name <a@b>" or a bare address; expansion details come after a comma.
    let first = value.split(',').next().unwrap_or_default().trim();
    let bare = match (first.rfind('<'), first.rfind('>')) {
        (Some(open), Some(close)) if open < close => &first[open + 1..close],
        _ => first,
    };
    normalize_address(bare).ok_or_else(|| JournalError::BadAddress {
        field: field.to_string(),
        value: value.to_string(),
    })
}

/// Reads the `Field: value` lines of a journal report's envelope part.
fn read_report(text: &str) -> Result<ReportEnvelope, JournalError> {
    let mut env = ReportEnvelope::default();
    let mut recipients = 0usize;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        let key = key.trim().to_ascii_lowercase();
        if matches!(key.as_str(), "to" | "recipient" | "cc" | "bcc") {
            recipients += 1;
            if recipients > MAX_REPORT_RECIPIENTS {
                return Err(JournalError::TooManyRecipients {
                    max: MAX_REPORT_RECIPIENTS,
                });
            }
        }
        match key.as_str() {
            "sender" => env.sender = Some(address("Sender", value)?),
            "subject" => env.subject = Some(bounded(value.to_string(), MAX_TEXT)),
            "message-id" => env.message_id = Some(bounded(value.to_string(), MAX_TEXT)),
            "on-behalf-of" => env.on_behalf_of = Some(address("On-Behalf-Of", value)?),
            "to" | "recipient" => env.to.push(address("To", value)?),
            "cc" => env.cc.push(address("Cc", value)?),
            "bcc" => env.bcc.push(address("Bcc", value)?),
            _ => {}
        }
    }
    Ok(env)
}

fn header_addresses(list: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    list.map(|a| {
        a.iter()
            .filter_map(|addr| addr.address().and_then(normalize_address))
            .collect()
    })
    .unwrap_or_default()
}

fn attachments(message: &Message<'_>) -> Vec<Attachment> {
    message
        .attachments()
        .take(MAX_ATTACHMENTS)
        .map(|part| {
            let contents = part.contents();
            Attachment {
                name: part.attachment_name().map(|n| bounded(n.to_string(), MAX_TEXT)),
                content_type: part.content_type().map(|ct| match ct.subtype() {
                    Some(sub) => format!("{}/{}", ct.ctype(), sub).to_ascii_lowercase(),
                    None => ct.ctype().to_ascii_lowercase(),
                }),
                size: Some(contents.len() as u64),
                sha256: Some(crate::crypto::hex(&Sha256::digest(contents))),
            }
        })
        .collect()
}

fn event_type(direction: Option<Direction>) -> EventType {
    match direction {
        Some(Direction::Outbound) => EventType::MessageSent,
        Some(Direction::Internal) => EventType::MessageInternal,
        _ => EventType::MessageReceived,
    }
}

/// The message's facts, shared by every event made from it.
struct Facts {
    from: Option<String>,
    /// Every recipient of the envelope: the sender's view.
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    /// What a recipient saw: the header's To and Cc (the first MAX_LISTED of each are
    /// listed), and the same as sets, to find a recipient among them in constant time.
    seen_to: Vec<String>,
    seen_cc: Vec<String>,
    seen_to_set: HashSet<String>,
    seen_cc_set: HashSet<String>,
    bcc_set: HashSet<String>,
    subject: Option<String>,
    message_id: Option<String>,
    size: u64,
    occurred_at: Option<jiff::Timestamp>,
    attachments: Vec<Attachment>,
    /// SHA-256 of the message as archived.
    sha256: String,
}

impl Facts {
    /// Fills the sets of what recipients saw.
    fn indexed(mut self) -> Facts {
        self.seen_to_set = self.seen_to.iter().cloned().collect();
        self.seen_cc_set = self.seen_cc.iter().cloned().collect();
        self
    }

    fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to.iter().chain(&self.cc).chain(&self.bcc).map(String::as_str)
    }

    fn direction(&self, internal: &[String]) -> Option<Direction> {
        direction(self.from.as_deref(), self.recipients(), internal)
    }
}

/// At most MAX_LISTED of `list`, `mailbox` among them when it is in `list` (`set`: the
/// same addresses): constant work per recipient, whatever the list's length.
fn listed_for(list: &[String], set: &HashSet<String>, mailbox: &str) -> Vec<String> {
    if list.len() <= MAX_LISTED {
        return list.to_vec();
    }
    let mut out: Vec<String> = list.iter().take(MAX_LISTED).cloned().collect();
    if set.contains(mailbox) && !out.iter().any(|a| a == mailbox) {
        out.pop();
        out.push(mailbox.to_string());
    }
    out
}

/// One event to make: for whom, of what kind, seen how.
#[derive(Debug, Clone)]
struct Planned {
    mailbox: String,
    event_type: EventType,
    direction: Option<Direction>,
    sender_view: bool,
}

/// One event of the message, for `mailbox`. Only the sender's event (`sender_view`) lists
/// the envelope's recipients and its Bcc; a recipient's event shows the header's To and Cc
/// and at most the recipient itself as Bcc, so neither its delivery nor a filter matching
/// on recipients reveals who else was Bcc'd or who a list was expanded to.
fn event(facts: &Facts, planned: &Planned, now: jiff::Timestamp) -> MailboxEvent {
    let mailbox = planned.mailbox.clone();
    let (to, cc, bcc) = if planned.sender_view {
        (facts.to.clone(), facts.cc.clone(), facts.bcc.clone())
    } else {
        let bcc = if facts.bcc_set.contains(&mailbox) {
            vec![mailbox.clone()]
        } else {
            Vec::new()
        };
        (
            listed_for(&facts.seen_to, &facts.seen_to_set, &mailbox),
            listed_for(&facts.seen_cc, &facts.seen_cc_set, &mailbox),
            bcc,
        )
    };
    MailboxEvent {
        id: MailboxEvent::new_id(),
        event_type: planned.event_type,
        occurred_at: facts.occurred_at.unwrap_or(now),
        received_at: now,
        source: Source::Smtp,
        // A journal re-sent by the mail system (or a retried SMTP transaction) is the same
        // event: de-duplicated by message id and mailbox, within the message's digest
        // (`raw_message`, see `MailboxEvent::dedup_key`), so another message reusing the
        // Message-ID is not taken for it.
        // Control characters (a NUL above all, which PostgreSQL's text refuses) are dropped:
        // a producer id only needs to be the same for the same message.
        // Without a Message-ID the digest names the message, so a retry after a failure
        // part-way (chunks already committed) is de-duplicated too.
        producer_event_id: Some(
            format!(
                "smtp:{}:{mailbox}",
                facts.message_id.as_deref().unwrap_or(&facts.sha256)
            )
            .chars()
            .filter(|c| !c.is_control())
            .collect(),
        ),
        mailbox,
        message_id: facts.message_id.clone(),
        from: facts.from.clone(),
        to,
        cc,
        bcc,
        subject: facts.subject.clone(),
        size: Some(facts.size),
        attachments: facts.attachments.clone(),
        direction: planned.direction,
        folder: None,
        headers: Default::default(),
        flags: vec![],
        flagged_event_id: None,
        flag_namespace: None,
        raw_message: Some(facts.sha256.clone()),
        activity: None,
        dead_letter: None,
        // Not `raw_message`, which the pipeline clears when no one links to the message.
        producer_scope: Some(facts.sha256.clone()),
        log_index: Default::default(),
    }
}

fn occurred_at(message: &Message<'_>) -> Option<jiff::Timestamp> {
    message
        .date()
        .and_then(|d| jiff::Timestamp::from_second(d.to_timestamp()).ok())
}

/// What one journaled message gives: its events, made on demand, and the message itself
/// (for a journal report: the original it carries), which the events refer to by its
/// SHA-256.
pub struct Journaled {
    pub original: RawMessage,
    facts: Facts,
    plan: Vec<Planned>,
    now: jiff::Timestamp,
}

/// The events of one message, made on demand (see [`Journaled::into_parts`]).
pub struct EventPlan {
    facts: Facts,
    plan: Vec<Planned>,
    now: jiff::Timestamp,
}

impl EventPlan {
    /// The events, `size` at a time.
    pub fn chunks(&self, size: usize) -> impl Iterator<Item = Vec<MailboxEvent>> + '_ {
        self.plan
            .chunks(size.max(1))
            .map(|chunk| chunk.iter().map(|p| event(&self.facts, p, self.now)).collect())
    }
}

impl std::fmt::Debug for Journaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journaled")
            .field("sha256", &self.original.sha256)
            .field("events", &self.plan.len())
            .finish_non_exhaustive()
    }
}

impl Journaled {
    /// How many events the message gives.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.is_empty()
    }

    /// Every event, made now.
    pub fn events(&self) -> Vec<MailboxEvent> {
        self.plan.iter().map(|p| event(&self.facts, p, self.now)).collect()
    }

    /// The events, `size` at a time: what a caller holds at once stays bounded however
    /// many recipients the message had.
    pub fn chunks(&self, size: usize) -> impl Iterator<Item = Vec<MailboxEvent>> + '_ {
        self.plan
            .chunks(size.max(1))
            .map(|chunk| chunk.iter().map(|p| event(&self.facts, p, self.now)).collect())
    }

    /// The events still to make, and the message, apart: the message can then go to the
    /// store once while the events are made a chunk at a time.
    pub fn into_parts(self) -> (EventPlan, RawMessage) {
        (
            EventPlan {
                facts: self.facts,
                plan: self.plan,
                now: self.now,
            },
            self.original,
        )
    }

    /// The message and its events, or the refusal of a message whose events would take
    /// more than MAX_EXPANSION_BYTES in all.
    fn bounded(
        original: RawMessage,
        facts: Facts,
        plan: Vec<Planned>,
        now: jiff::Timestamp,
    ) -> Result<Journaled, JournalError> {
        let journaled = Journaled {
            original,
            facts: facts.indexed(),
            plan,
            now,
        };
        journaled.within_expansion()
    }

    fn within_expansion(self) -> Result<Journaled, JournalError> {
        // Recipients' events are alike in size; the sender's is one.
        let Some(sample) = self.plan.iter().find(|p| !p.sender_view).or(self.plan.first()) else {
            return Ok(self);
        };
        let each = serde_json::to_vec(&event(&self.facts, sample, self.now)).map_or(0, |v| v.len());
        let events = self.plan.len();
        if events.saturating_mul(each) > MAX_EXPANSION_BYTES {
            return Err(JournalError::TooLarge { events, each });
        }
        Ok(self)
    }
}

/// Turns one journaled message into events.
pub fn parse(
    raw: &[u8],
    envelope: &Envelope,
    internal: &[String],
    now: jiff::Timestamp,
) -> Result<Journaled, JournalError> {
    // mail-parser 0.11 panics on some malformed multiparts (found by tests/fuzz; the
    // input is tests/fixtures/journal/fuzz-mail-parser-panic.eml): such mail is refused
    // like any other unusable message instead of failing the SMTP transaction with 451.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let message = MessageParser::default().parse(raw).ok_or(JournalError::NotMime)?;
        if message.header_raw("X-MS-Journal-Report").is_some() {
            journal_report(&message, internal, now)
        } else {
            plain_copy(&message, raw, envelope, internal, now)
        }
    }))
    .unwrap_or(Err(JournalError::ParserFailed))
}

fn journal_report(report: &Message<'_>, internal: &[String], now: jiff::Timestamp) -> Result<Journaled, JournalError> {
    let text = report.body_text(0).unwrap_or_default();
    let env = read_report(&text)?;
    let original_part = report
        .attachments()
        .find(|p| p.is_message())
        .ok_or(JournalError::NoOriginal)?;
    let original = original_part.message().ok_or(JournalError::NoOriginal)?;
    let from = env.sender.clone().ok_or(JournalError::NoSender)?;
    if env.to.is_empty() && env.cc.is_empty() && env.bcc.is_empty() {
        return Err(JournalError::NoRecipients);
    }
    let raw = RawMessage::new(original.raw_message().to_vec());
    let seen = |list| {
        let mut all = header_addresses(list);
        all.truncate(MAX_REPORT_RECIPIENTS);
        all
    };
    let facts = Facts {
        sha256: raw.sha256.clone(),
        from: Some(from.clone()),
        subject: original
            .subject()
            .map(|s| bounded(s.to_string(), MAX_TEXT))
            .or(env.subject.clone()),
        message_id: env
            .message_id
            .clone()
            .or_else(|| original.message_id().map(|id| bounded(format!("<{id}>"), MAX_TEXT))),
        size: original.raw_message().len() as u64,
        occurred_at: occurred_at(original),
        attachments: attachments(original),
        seen_to_set: HashSet::new(),
        seen_cc_set: HashSet::new(),
        seen_to: seen(original.to()),
        seen_cc: seen(original.cc()),
        bcc_set: env.bcc.iter().cloned().collect(),
        to: env.to,
        cc: env.cc,
        bcc: env.bcc,
    };
    let dir = facts.direction(internal);
    let kind = event_type(dir);
    let mut plan = Vec::new();
    // Sent on behalf of someone: the sender's event belongs to that mailbox.
    let principal = env.on_behalf_of.unwrap_or(from);
    let recipient_direction = if kind == EventType::MessageReceived {
        dir
    } else {
        plan.push(Planned {
            mailbox: principal.clone(),
            event_type: kind,
            direction: dir,
            sender_view: true,
        });
        // From an internal mailbox to an internal one.
        Some(Direction::Internal)
    };
    // Every internal mailbox the message reached gets its own received event (all of them
    // when no internal domains are configured); they share the message id, so receivers
    // can group them. The sender's own copy is its sent event.
    let mut mailboxes: Vec<&str> = facts
        .recipients()
        .filter(|r| internal.is_empty() || is_internal(r, internal))
        .filter(|r| kind == EventType::MessageReceived || (*r != principal && Some(*r) != facts.from.as_deref()))
        .collect();
    mailboxes.sort_unstable();
    mailboxes.dedup();
    plan.extend(mailboxes.into_iter().map(|m| Planned {
        mailbox: m.to_string(),
        event_type: EventType::MessageReceived,
        direction: recipient_direction,
        sender_view: false,
    }));
    Journaled::bounded(raw, facts, plan, now)
}

fn plain_copy(
    message: &Message<'_>,
    raw: &[u8],
    envelope: &Envelope,
    internal: &[String],
    now: jiff::Timestamp,
) -> Result<Journaled, JournalError> {
    let from = header_addresses(message.from())
        .into_iter()
        .next()
        .or_else(|| envelope.mail_from.as_deref().and_then(normalize_address))
        .ok_or(JournalError::NoSender)?;
    let mut to = header_addresses(message.to());
    let mut cc = header_addresses(message.cc());
    to.truncate(MAX_REPORT_RECIPIENTS);
    cc.truncate(MAX_REPORT_RECIPIENTS);
    let mailboxes: Vec<String> = envelope.rcpt_to.iter().filter_map(|r| normalize_address(r)).collect();
    if mailboxes.is_empty() {
        return Err(JournalError::NoRecipients);
    }
    // Envelope recipients the headers do not show were Bcc'd (or are journal copies).
    let shown: HashSet<&String> = to.iter().chain(&cc).collect();
    let bcc: Vec<String> = mailboxes
        .iter()
        .filter(|m| !shown.contains(m) && **m != from)
        .cloned()
        .collect();
    let raw = RawMessage::new(raw.to_vec());
    let facts = Facts {
        sha256: raw.sha256.clone(),
        from: Some(from.clone()),
        seen_to_set: HashSet::new(),
        seen_cc_set: HashSet::new(),
        seen_to: to.clone(),
        seen_cc: cc.clone(),
        bcc_set: bcc.iter().cloned().collect(),
        to,
        cc,
        bcc,
        subject: message.subject().map(|s| bounded(s.to_string(), MAX_TEXT)),
        message_id: message.message_id().map(|id| bounded(format!("<{id}>"), MAX_TEXT)),
        size: raw.bytes.len() as u64,
        occurred_at: occurred_at(message),
        attachments: attachments(message),
    };
    let dir = facts.direction(internal);
    let plan = mailboxes
        .into_iter()
        .map(|mailbox| {
            // The sender's own copy is a sent message whatever the domains say.
            let kind = if mailbox == from && dir != Some(Direction::Internal) {
                EventType::MessageSent
            } else {
                event_type(dir)
            };
            Planned {
                sender_view: mailbox == from,
                mailbox,
                event_type: kind,
                direction: dir,
            }
        })
        .collect();
    Journaled::bounded(raw, facts, plan, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/journal/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
    }

    fn internal() -> Vec<String> {
        vec!["contoso.com".to_string()]
    }

    fn now() -> jiff::Timestamp {
        "2026-11-26T12:00:00Z".parse().expect("time")
    }

    fn journal(name: &str) -> Result<Vec<MailboxEvent>, JournalError> {
        let envelope = Envelope {
            mail_from: Some("journal@contoso.com".into()),
            rcpt_to: vec!["archive@journal.example.net".into()],
        };
        parse(&fixture(name), &envelope, &internal(), now()).map(|j| j.events())
    }

    #[test]
    fn inbound_report_gives_one_received_event_per_internal_recipient() {
        let events = journal("inbound-report.eml").expect("parse");
        let mailboxes: Vec<&str> = events.iter().map(|e| e.mailbox.as_str()).collect();
        assert_eq!(
            mailboxes,
            [
                "alice@contoso.com",
                "bob@contoso.com",
                "carol@contoso.com",
                "dan@contoso.com"
            ],
            "To, Cc, Bcc and the expanded list member; not the external Cc"
        );
        let e = &events[0];
        assert_eq!(e.event_type, EventType::MessageReceived);
        assert_eq!(e.from.as_deref(), Some("billing@fabrikam.com"));
        assert_eq!(
            e.to,
            ["alice@contoso.com", "finance-team@contoso.com"],
            "what alice saw: the header's To, not who the list was expanded to"
        );
        assert_eq!(e.cc, ["bob@contoso.com", "partner@fabrikam.com"]);
        assert!(e.bcc.is_empty(), "alice's event does not reveal that carol was Bcc'd");
        let carol = events
            .iter()
            .find(|e| e.mailbox == "carol@contoso.com")
            .expect("carol's event");
        assert_eq!(carol.bcc, ["carol@contoso.com"], "carol's own event says she was Bcc'd");
        assert_eq!(
            e.subject.as_deref(),
            Some("Rechnung Nr. 4711 – fällig"),
            "RFC 2047 decoded"
        );
        assert_eq!(e.message_id.as_deref(), Some("<inv-4711@fabrikam.com>"));
        assert_eq!(e.direction, Some(Direction::Inbound));
        assert_eq!(e.source, Source::Smtp);
        assert_eq!(e.attachments.len(), 1);
        let a = &e.attachments[0];
        assert_eq!(a.name.as_deref(), Some("invoice-4711.pdf"));
        assert_eq!(a.content_type.as_deref(), Some("application/pdf"));
        assert_eq!(a.size, Some(39));
        assert_eq!(
            a.sha256.as_deref(),
            Some(format!("{:x}", Sha256::digest(b"%PDF-1.4 invoice 4711 fake pdf content\n")).as_str())
        );
        assert_eq!(
            e.occurred_at,
            "2026-11-26T09:15:00Z".parse::<jiff::Timestamp>().expect("time")
        );
        assert_eq!(
            e.producer_event_id.as_deref(),
            Some("smtp:<inv-4711@fabrikam.com>:alice@contoso.com")
        );
    }

    #[test]
    fn outbound_report_on_behalf_of_gives_one_sent_event_for_the_principal() {
        let events = journal("outbound-report.eml").expect("parse");
        assert_eq!(events.len(), 1, "no internal recipient");
        assert_eq!(events[0].event_type, EventType::MessageSent);
        assert_eq!(events[0].mailbox, "ceo@contoso.com", "On-Behalf-Of");
        assert_eq!(events[0].from.as_deref(), Some("assistant@contoso.com"));
        assert_eq!(events[0].to, ["lawyer@fabrikam.com"]);
    }

    #[test]
    fn internal_sender_gives_a_sent_event_and_one_received_event_per_internal_recipient() {
        let events = journal("internal-report.eml").expect("parse");
        let got: Vec<(&str, EventType, Option<Direction>)> = events
            .iter()
            .map(|e| (e.mailbox.as_str(), e.event_type, e.direction))
            .collect();
        let received = |m| (m, EventType::MessageReceived, Some(Direction::Internal));
        assert_eq!(
            got,
            [
                ("grace@contoso.com", EventType::MessageSent, Some(Direction::Outbound)),
                received("heidi@contoso.com"),
                received("ivan@contoso.com"),
                received("judy@contoso.com"),
                received("mallory@contoso.com"),
                received("olivia@contoso.com"),
            ],
            "the sender, then To, the expanded list's members, Cc and Bcc; not the external Cc"
        );
        assert!(
            events
                .iter()
                .all(|e| e.message_id.as_deref() == Some("<q3-report@contoso.com>")),
            "one message id to group them by"
        );
        assert_eq!(events[1].subject.as_deref(), Some("Quartalsbericht Q3 – vertraulich"));
        assert_eq!(
            events[0].bcc,
            ["olivia@contoso.com"],
            "the sender's event lists its Bcc"
        );
        for e in &events[1..] {
            let own: &[String] = if e.mailbox == "olivia@contoso.com" {
                &events[0].bcc
            } else {
                &[]
            };
            assert_eq!(e.bcc, own, "{}'s event reveals no one else's Bcc", e.mailbox);
        }
        let producers: std::collections::HashSet<_> = events.iter().map(|e| e.producer_event_id.clone()).collect();
        assert_eq!(
            producers.len(),
            events.len(),
            "each mailbox's event de-duplicates on its own"
        );
        // Only internal recipients: the sender's event is message.internal.
        let all_internal = parse(
            &fixture("internal-report.eml"),
            &Envelope::default(),
            &["contoso.com".into(), "fabrikam.com".into()],
            now(),
        )
        .expect("parse")
        .events();
        assert_eq!(all_internal[0].event_type, EventType::MessageInternal);
        assert_eq!(all_internal.len(), 7, "the Cc at fabrikam.com is internal now");
    }

    #[test]
    fn plain_copy_is_an_event_for_the_envelope_recipient() {
        let envelope = Envelope {
            mail_from: Some("x@fabrikam.com".into()),
            rcpt_to: vec!["Alice@Contoso.com".into()],
        };
        let raw = b"From: Partner <x@fabrikam.com>\r\nTo: alice@contoso.com\r\nSubject: hi\r\nMessage-ID: <p1@fabrikam.com>\r\n\r\nhello\r\n";
        let journaled = parse(raw, &envelope, &internal(), now()).expect("parse");
        assert_eq!(journaled.original.bytes, raw, "a plain copy is archived whole");
        let events = journaled.events();
        assert_eq!(
            events[0].raw_message.as_deref(),
            Some(journaled.original.sha256.as_str())
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].mailbox, "alice@contoso.com");
        assert_eq!(events[0].event_type, EventType::MessageReceived);
        assert_eq!(events[0].size, Some(raw.len() as u64));
        assert!(events[0].bcc.is_empty());
    }

    #[test]
    fn broken_reports_are_refused_with_a_reason() {
        assert_eq!(journal("report-without-original.eml"), Err(JournalError::NoOriginal));
        let raw = b"X-MS-Journal-Report:\r\nContent-Type: text/plain\r\n\r\nSubject: x\r\n";
        let e = parse(raw, &Envelope::default(), &internal(), now()).map(|j| j.events());
        assert!(
            matches!(e, Err(JournalError::NoOriginal | JournalError::NoSender)),
            "{e:?}"
        );
        let no_rcpt = parse(b"From: a@b.com\r\n\r\nx", &Envelope::default(), &internal(), now()).map(|j| j.events());
        assert_eq!(no_rcpt, Err(JournalError::NoRecipients));
    }

    #[test]
    fn a_message_that_makes_the_mime_parser_panic_is_refused() {
        assert_eq!(journal("fuzz-mail-parser-panic.eml"), Err(JournalError::ParserFailed));
    }

    /// An all-staff report: `n` internal recipients by expansion of one list, the header
    /// showing the list and `shown` explicit addresses.
    fn all_staff(n: usize, shown: usize, body: &str) -> Vec<u8> {
        let mut report = String::from(
            "X-MS-Journal-Report:\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nSender: ceo@contoso.com\r\nMessage-Id: <memo@contoso.com>\r\n",
        );
        for i in 0..n {
            report.push_str(&format!("To: staff{i}@contoso.com, Expanded: all@contoso.com\r\n"));
        }
        let header_to: Vec<String> = std::iter::once("all@contoso.com".to_string())
            .chain((0..shown).map(|i| format!("staff{i}@contoso.com")))
            .collect();
        report.push_str(&format!(
            "\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: ceo@contoso.com\r\nTo: {}\r\nSubject: memo\r\nMessage-ID: <memo@contoso.com>\r\n\r\n{body}\r\n--b--\r\n",
            header_to.join(", ")
        ));
        report.into_bytes()
    }

    #[test]
    fn a_report_to_thousands_costs_linear_in_its_recipients() {
        let j = parse(
            &all_staff(5000, 200, "all hands"),
            &Envelope::default(),
            &internal(),
            now(),
        )
        .expect("parse");
        assert_eq!(j.len(), 5001, "the sender's event and one per recipient");
        let events = j.events();
        let sender = &events[0];
        assert_eq!(sender.to.len(), 5000, "the sender's event lists the envelope");
        let listed: usize = events[1..].iter().map(|e| e.to.len() + e.cc.len() + e.bcc.len()).sum();
        assert!(
            listed <= 5000 * MAX_LISTED,
            "recipients' events list a bounded view: {listed} addresses"
        );
        let staff7 = events
            .iter()
            .find(|e| e.mailbox == "staff7@contoso.com")
            .expect("staff7");
        assert!(
            staff7.to.contains(&"all@contoso.com".to_string()),
            "what the header showed"
        );
        assert!(
            staff7.to.contains(&"staff7@contoso.com".to_string()),
            "itself, when shown"
        );
        let staff4000 = events
            .iter()
            .find(|e| e.mailbox == "staff4000@contoso.com")
            .expect("staff4000");
        assert!(
            !staff4000.to.contains(&"staff4000@contoso.com".to_string()),
            "not shown in the header: not listed"
        );
        assert_eq!(
            j.chunks(1000).map(|c| c.len()).collect::<Vec<_>>(),
            [1000, 1000, 1000, 1000, 1000, 1]
        );
    }

    #[test]
    fn reports_over_the_bounds_are_refused_as_too_large() {
        let over = parse(
            &all_staff(MAX_REPORT_RECIPIENTS + 1, 0, "x"),
            &Envelope::default(),
            &internal(),
            now(),
        );
        assert_eq!(
            over.err(),
            Some(JournalError::TooManyRecipients {
                max: MAX_REPORT_RECIPIENTS
            })
        );
        // Few recipients but large events: what one message may expand to is bounded too.
        let attachments: String = (0..MAX_ATTACHMENTS)
            .map(|i| format!("--p\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{}{i}.bin\"\r\n\r\nx\r\n", "n".repeat(900)))
            .collect();
        let body = format!("Content-Type: multipart/mixed; boundary=\"p\"\r\n\r\n{attachments}--p--");
        let raw = all_staff(MAX_REPORT_RECIPIENTS, 0, "").into_iter().collect::<Vec<u8>>();
        let raw = String::from_utf8(raw).expect("utf-8").replace(
            "Subject: memo\r\nMessage-ID: <memo@contoso.com>\r\n\r\n",
            &format!("Subject: memo\r\nMessage-ID: <memo@contoso.com>\r\n{body}"),
        );
        let e = parse(raw.as_bytes(), &Envelope::default(), &internal(), now()).err();
        assert!(matches!(e, Some(JournalError::TooLarge { .. })), "{e:?}");
        assert!(e.is_some_and(|e| e.is_size()));
    }

    #[test]
    fn one_message_id_on_two_messages_gives_two_events_and_a_repeat_gives_one() {
        let envelope = Envelope {
            mail_from: Some("x@fabrikam.com".into()),
            rcpt_to: vec!["alice@contoso.com".into()],
        };
        let mail = |body: &str| {
            format!(
                "From: x@fabrikam.com\r\nTo: alice@contoso.com\r\nMessage-ID: <same@fabrikam.com>\r\n\r\n{body}\r\n"
            )
        };
        // As the pipeline stores it: without the raw message when no one links to it.
        let key = |raw: String| {
            let mut events = parse(raw.as_bytes(), &envelope, &internal(), now())
                .expect("parse")
                .events();
            events[0].raw_message = None;
            events[0].dedup_key()
        };
        assert_ne!(key(mail("harmless")), key(mail("wire 250k to the new account")));
        assert_eq!(
            key(mail("harmless")),
            key(mail("harmless")),
            "a retried message is the same event"
        );
    }

    #[test]
    fn recipient_lines_keep_the_address_before_expansion_details() {
        let env = read_report(
            "Sender: a@contoso.com\nTo: Dan <dan@contoso.com>, Expanded: finance-team@contoso.com\nRecipient: e@contoso.com\nBcc: f@contoso.com, Forwarded: g@contoso.com\n",
        )
        .expect("read");
        assert_eq!(env.to, ["dan@contoso.com", "e@contoso.com"]);
        assert_eq!(env.bcc, ["f@contoso.com"]);
        assert!(read_report("To: not an address").is_err());
    }
}
