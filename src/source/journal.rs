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

use mail_parser::{Message, MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};

use super::{direction, is_internal, normalize_address};
use crate::api::{Direction, EventType};
use crate::event::{Attachment, MailboxEvent, Source};
use crate::store::RawMessage;

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
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        match key.trim().to_ascii_lowercase().as_str() {
            "sender" => env.sender = Some(address("Sender", value)?),
            "subject" => env.subject = Some(value.to_string()),
            "message-id" => env.message_id = Some(value.to_string()),
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
        .map(|part| {
            let contents = part.contents();
            Attachment {
                name: part.attachment_name().map(String::from),
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
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    subject: Option<String>,
    message_id: Option<String>,
    size: u64,
    occurred_at: Option<jiff::Timestamp>,
    attachments: Vec<Attachment>,
    /// SHA-256 of the message as archived.
    sha256: String,
}

impl Facts {
    fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to.iter().chain(&self.cc).chain(&self.bcc).map(String::as_str)
    }

    fn direction(&self, internal: &[String]) -> Option<Direction> {
        direction(self.from.as_deref(), self.recipients(), internal)
    }
}

/// One event of the message, for `mailbox`. Only the sender's event (`sender_view`) lists
/// the Bcc recipients; a recipient's event names at most that recipient itself, so neither
/// its delivery nor a filter matching on recipients reveals who else was Bcc'd.
fn event(
    facts: &Facts,
    mailbox: String,
    event_type: EventType,
    dir: Option<Direction>,
    sender_view: bool,
    now: jiff::Timestamp,
) -> MailboxEvent {
    let bcc = if sender_view {
        facts.bcc.clone()
    } else {
        facts.bcc.iter().filter(|b| **b == mailbox).cloned().collect()
    };
    MailboxEvent {
        id: MailboxEvent::new_id(),
        event_type,
        occurred_at: facts.occurred_at.unwrap_or(now),
        received_at: now,
        source: Source::Smtp,
        // A journal re-sent by the mail system (or a retried SMTP transaction) is the same
        // event: de-duplicated by message id and mailbox.
        // Control characters (a NUL above all, which PostgreSQL's text refuses) are dropped:
        // a producer id only needs to be the same for the same message.
        producer_event_id: facts.message_id.as_ref().map(|id| {
            format!("smtp:{id}:{mailbox}")
                .chars()
                .filter(|c| !c.is_control())
                .collect()
        }),
        mailbox,
        message_id: facts.message_id.clone(),
        from: facts.from.clone(),
        to: facts.to.clone(),
        cc: facts.cc.clone(),
        bcc,
        subject: facts.subject.clone(),
        size: Some(facts.size),
        attachments: facts.attachments.clone(),
        direction: dir,
        folder: None,
        headers: Default::default(),
        flags: vec![],
        flagged_event_id: None,
        flag_namespace: None,
        raw_message: Some(facts.sha256.clone()),
        activity: None,
        dead_letter: None,
        producer_scope: None,
    }
}

fn occurred_at(message: &Message<'_>) -> Option<jiff::Timestamp> {
    message
        .date()
        .and_then(|d| jiff::Timestamp::from_second(d.to_timestamp()).ok())
}

/// The events made from one journaled message, and the message itself (for a journal
/// report: the original it carries), which the events refer to by its SHA-256.
#[derive(Debug)]
pub struct Journaled {
    pub events: Vec<MailboxEvent>,
    pub original: RawMessage,
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
    let facts = Facts {
        sha256: raw.sha256.clone(),
        from: Some(from.clone()),
        subject: original.subject().map(String::from).or(env.subject.clone()),
        message_id: env
            .message_id
            .clone()
            .or_else(|| original.message_id().map(|id| format!("<{id}>"))),
        size: original.raw_message().len() as u64,
        occurred_at: occurred_at(original),
        attachments: attachments(original),
        to: env.to,
        cc: env.cc,
        bcc: env.bcc,
    };
    let dir = facts.direction(internal);
    let kind = event_type(dir);
    let mut events = Vec::new();
    // Sent on behalf of someone: the sender's event belongs to that mailbox.
    let principal = env.on_behalf_of.unwrap_or(from);
    let recipient_direction = if kind == EventType::MessageReceived {
        dir
    } else {
        events.push(event(&facts, principal.clone(), kind, dir, true, now));
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
    events.extend(mailboxes.into_iter().map(|m| {
        event(
            &facts,
            m.to_string(),
            EventType::MessageReceived,
            recipient_direction,
            false,
            now,
        )
    }));
    Ok(Journaled { events, original: raw })
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
    let to = header_addresses(message.to());
    let cc = header_addresses(message.cc());
    let mailboxes: Vec<String> = envelope.rcpt_to.iter().filter_map(|r| normalize_address(r)).collect();
    if mailboxes.is_empty() {
        return Err(JournalError::NoRecipients);
    }
    // Envelope recipients the headers do not show were Bcc'd (or are journal copies).
    let bcc = mailboxes
        .iter()
        .filter(|m| !to.contains(m) && !cc.contains(m) && **m != from)
        .cloned()
        .collect();
    let raw = RawMessage::new(raw.to_vec());
    let facts = Facts {
        sha256: raw.sha256.clone(),
        from: Some(from.clone()),
        to,
        cc,
        bcc,
        subject: message.subject().map(String::from),
        message_id: message.message_id().map(|id| format!("<{id}>")),
        size: raw.bytes.len() as u64,
        occurred_at: occurred_at(message),
        attachments: attachments(message),
    };
    let dir = facts.direction(internal);
    let events = mailboxes
        .into_iter()
        .map(|mailbox| {
            // The sender's own copy is a sent message whatever the domains say.
            let kind = if mailbox == from && dir != Some(Direction::Internal) {
                EventType::MessageSent
            } else {
                event_type(dir)
            };
            let sender_view = mailbox == from;
            event(&facts, mailbox, kind, dir, sender_view, now)
        })
        .collect();
    Ok(Journaled { events, original: raw })
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
        parse(&fixture(name), &envelope, &internal(), now()).map(|j| j.events)
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
        assert_eq!(e.to, ["alice@contoso.com", "dan@contoso.com"]);
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
        .events;
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
        let events = journaled.events;
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
        let e = parse(raw, &Envelope::default(), &internal(), now()).map(|j| j.events);
        assert!(
            matches!(e, Err(JournalError::NoOriginal | JournalError::NoSender)),
            "{e:?}"
        );
        let no_rcpt = parse(b"From: a@b.com\r\n\r\nx", &Envelope::default(), &internal(), now()).map(|j| j.events);
        assert_eq!(no_rcpt, Err(JournalError::NoRecipients));
    }

    #[test]
    fn a_message_that_makes_the_mime_parser_panic_is_refused() {
        assert_eq!(journal("fuzz-mail-parser-panic.eml"), Err(JournalError::ParserFailed));
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
