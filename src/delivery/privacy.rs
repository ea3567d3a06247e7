//! What `metadata` and `anonymized` payloads promise: no address, Message-ID or
//! producer-supplied id of the input anywhere in what is sent — body or headers, in every
//! format, batched or not, encrypted or not, dead-letter copies included. `exposed` finds
//! such a string in a built request; the property test below and the `wire` fuzz target
//! hold every rendering to it.

use super::wire::{Request, header_value};
use crate::event::MailboxEvent;

/// The strings of `event` that name a person or a message: its addresses (mailbox, sender,
/// recipients, the users of an activity, forwarding targets), Message-ID, producer id, the
/// client's address and session, and the arguments of a configuration change (an ACL
/// names its grantee, also without a domain).
pub fn identifiers(event: &MailboxEvent) -> Vec<&str> {
    let mut all: Vec<&str> = vec![event.mailbox.as_str()];
    all.extend(event.from.as_deref());
    all.extend(event.to.iter().chain(&event.cc).chain(&event.bcc).map(String::as_str));
    all.extend(event.message_id.as_deref().map(|m| m.trim_matches(['<', '>'])));
    all.extend(event.producer_event_id.as_deref());
    if let Some(a) = &event.activity {
        all.push(&a.user);
        all.extend(a.auth_user.as_deref());
        all.extend(a.remote_ip.as_deref());
        all.extend(a.session.as_deref());
        if let Some(c) = &a.change {
            all.extend(c.detail.as_deref());
            if let Some(f) = &c.forwarding {
                all.extend(f.targets.iter().filter_map(|t| t.address.as_deref()));
                all.extend(f.unreadable.as_deref());
            }
            all.extend(
                c.acl
                    .as_ref()
                    .and_then(|g| g.identifier.as_deref())
                    .filter(|id| crate::event::AclGrant::names_person(id)),
            );
        }
    }
    all.retain(|s| !s.is_empty());
    all
}

/// The first of `identifiers` found in `request`: its body (also as a URL's query would
/// encode it), or a header value as sent (CloudEvents attributes are percent-encoded there).
pub fn exposed<'a>(identifiers: &[&'a str], request: &Request) -> Option<&'a str> {
    let body = String::from_utf8_lossy(&request.body);
    identifiers.iter().copied().find(|id| {
        let in_header = header_value(id);
        let in_query: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
        body.contains(id)
            || body.contains(in_query.as_str())
            || request
                .headers
                .iter()
                .any(|(_, v)| v.contains(id) || v.contains(in_header.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EventType, PayloadMode};
    use crate::delivery::encryption::tests::{decrypt, receiver_keys};
    use crate::delivery::payload::PayloadConfig;
    use crate::delivery::wire::{self, Format, Item, WireConfig};
    use crate::event::{
        Access, AclGrant, Activity, Attachment, BulkAccess, ConfigChange, ConfigKind, DeadLetterNote, Flag,
        ForwardAction, ForwardTarget, Forwarding, Login, LoginOutcome, Source,
    };
    use crate::route::Ceiling;

    /// A small deterministic generator (xorshift): the same cases on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }
        /// A token no rendering could make up: starts with a letter that is no hex digit.
        fn token(&mut self) -> String {
            format!("q{:x}", self.next() % 0xffff_ffff)
        }
        fn address(&mut self) -> String {
            let local = self.pick(&["zoe", "jürgen", "o'neil", "x.y+tag", "ceo", "李"]);
            let domain = self.pick(&["finance.example", "Bücher.example", "partner.org", "example.com"]);
            format!("{local}.{}@{domain}", self.token())
        }
    }

    /// An event of `event_type` from `source`, every field that can name someone filled.
    fn event(rng: &mut Rng, event_type: EventType, source: Source) -> MailboxEvent {
        let mailbox = rng.address();
        let message_id = format!("<{}@mail.{}.example>", rng.token(), rng.token());
        let producer = match source {
            Source::Smtp => format!("smtp:{message_id}:{mailbox}"),
            Source::Dovecot => format!("dovecot:{mailbox}:INBOX:{}", rng.token()),
            Source::Http => format!("crm-{}", rng.token()),
            Source::Router => format!("smtp:{message_id}:{mailbox}#compliance.flagged/ns"),
        };
        let user = mailbox.clone();
        MailboxEvent {
            id: MailboxEvent::new_id(),
            event_type,
            occurred_at: jiff::Timestamp::UNIX_EPOCH,
            received_at: jiff::Timestamp::UNIX_EPOCH,
            source,
            producer_event_id: Some(producer),
            mailbox: mailbox.clone(),
            message_id: Some(message_id.clone()),
            from: Some(rng.address()),
            to: vec![rng.address(), mailbox.clone()],
            cc: vec![rng.address()],
            bcc: vec![rng.address()],
            subject: Some(format!("Re: wire for {mailbox}")),
            size: Some(1234),
            attachments: vec![Attachment {
                name: Some(format!("{mailbox}.pdf")),
                content_type: Some(format!("application/pdf; name={mailbox}")),
                size: Some(10),
                sha256: Some("ab".repeat(32)),
            }],
            direction: None,
            folder: Some(format!("Other Users/{mailbox}/INBOX")),
            headers: [("reply-to".to_string(), mailbox.clone())].into(),
            flags: vec![Flag {
                name: "wire".into(),
                severity: crate::api::Severity::High,
                filter: "wires".into(),
            }],
            flagged_event_id: Some(MailboxEvent::new_id()),
            flag_namespace: Some("ns".into()),
            raw_message: Some("ab".repeat(32)),
            activity: Some(Box::new(Activity {
                user,
                auth_user: Some(rng.address()),
                admin_session: true,
                service: Some("imap".into()),
                // Each event its own: a companion sent in full shows its own address.
                remote_ip: Some(format!(
                    "2001:db8:{:x}:{:x}::7",
                    rng.next() & 0xffff,
                    rng.next() & 0xffff
                )),
                session: Some(format!("<{}>", rng.token())),
                previous_folder: Some(format!("shared/{mailbox}/Archive")),
                imap_flags: vec!["\\Seen".into(), format!("$fwd-{mailbox}")],
                change: Some(ConfigChange {
                    kind: ConfigKind::Acl,
                    command: "SETACL".into(),
                    target: Some(format!("Other Users/{mailbox}")),
                    detail: Some(format!("{} lrs", rng.address())),
                    forwarding: Some(Forwarding {
                        targets: vec![ForwardTarget {
                            address: Some(rng.address()),
                            domain: "partner.org".into(),
                            action: ForwardAction::Redirect,
                            external: true,
                        }],
                        unresolved: vec![format!("include \"{mailbox}\"")],
                        external: true,
                        unreadable: Some(format!("not fetched for {mailbox} from dovecot.{}", rng.token())),
                        active: Some(true),
                    }),
                    acl: Some(AclGrant {
                        folder: format!("Other Users/{mailbox}/INBOX"),
                        // A user name without a domain: only its kind tells it is a person.
                        identifier: Some(rng.token()),
                        mode: "add".into(),
                        rights: vec!["read".into()],
                        negative: false,
                        granted: true,
                        read_granted: true,
                    }),
                }),
                access: Some(Access {
                    command: Some("UID FETCH".into()),
                    reasons: vec!["imap:fetch_body".into()],
                }),
                bulk: Some(BulkAccess {
                    reads: 2000,
                    folders: vec!["INBOX".into(), format!("Other Users/{mailbox}/INBOX")],
                    first_at: jiff::Timestamp::UNIX_EPOCH,
                    last_at: jiff::Timestamp::UNIX_EPOCH,
                }),
                login: Some(Login {
                    outcome: LoginOutcome::Failed,
                    mechanism: Some("PLAIN".into()),
                    reason: Some("password_mismatch".into()),
                    attempts: 3,
                    first_at: jiff::Timestamp::UNIX_EPOCH,
                    last_at: jiff::Timestamp::UNIX_EPOCH,
                }),
                uid: Some(7),
                uid_validity: Some(1),
                ..Default::default()
            })),
            dead_letter: None,
            producer_scope: None,
            log_index: Default::default(),
        }
    }

    /// As a dead-letter sink receives `event`: a copy with an id of its own and a note.
    fn dead_letter_copy(event: &MailboxEvent) -> MailboxEvent {
        let mut copy = event.clone();
        copy.id = MailboxEvent::new_id();
        copy.producer_event_id = Some(format!("deadletter:msg_x:uid:{}", 0));
        copy.dead_letter = Some(Box::new(DeadLetterNote {
            event_id: event.id.clone(),
            subscription: "ns/siem".into(),
            endpoint: "https://siem.example/hooks".into(),
            webhook_id: "msg_0123".into(),
            reason: "retries exhausted".into(),
            attempts: 8,
            last_status: Some(503),
            last_error: Some("HTTP 503".into()),
            dead_lettered_at: jiff::Timestamp::UNIX_EPOCH,
            sink_uri: None,
        }));
        copy
    }

    /// Every event type from every source, in every hiding mode, format and shape, batched
    /// (beside an event sent in full) or not, encrypted (decrypted again here) or not, with
    /// raw message links asked for, and as dead-letter copies — also when a grant's ceiling
    /// is what lowers a `full` subscription: nothing of `identifiers` is in what would be
    /// sent.
    #[test]
    fn metadata_and_anonymized_requests_name_no_one() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let filters = vec!["wires".to_string()];
        let links = std::sync::Arc::new(crate::archive::RawLinks::new(
            [3; 32],
            "https://mailhook.example",
            std::time::Duration::from_secs(60),
        ));
        let mut checked = 0;
        for event_type in EventType::ALL {
            for source in [Source::Http, Source::Smtp, Source::Dovecot, Source::Router] {
                let original = event(&mut rng, event_type, source);
                // Sent in full beside it in a batch: its own addresses may show, not `ev`'s.
                let companion = event(&mut rng, event_type, source);
                for ev in [original.clone(), dead_letter_copy(&original)] {
                    let mut ids = identifiers(&ev);
                    ids.extend(identifiers(&original));
                    // How a payload comes to hide: asked for, or capped by the grant.
                    let ways = [
                        (PayloadMode::Metadata, Ceiling::NONE),
                        (PayloadMode::Anonymized, Ceiling::NONE),
                        (
                            PayloadMode::Full,
                            Ceiling {
                                mode: PayloadMode::Metadata,
                                raw_links: false,
                            },
                        ),
                        (
                            PayloadMode::Full,
                            Ceiling {
                                mode: PayloadMode::Anonymized,
                                raw_links: false,
                            },
                        ),
                    ];
                    for (mode, ceiling) in ways {
                        let payload = PayloadConfig {
                            mode,
                            redact: vec![],
                            pseudonym_key: b"subscription key".to_vec(),
                            raw_links: Some(links.clone()),
                            subscription: "uid".into(),
                        };
                        for format in [
                            Format::StandardWebhooks,
                            Format::CloudEvents { structured: false },
                            Format::CloudEvents { structured: true },
                        ] {
                            for (batched, encrypted) in [(false, false), (true, false), (false, true), (true, true)] {
                                let (receiver, keys) = receiver_keys();
                                let cfg = WireConfig {
                                    format,
                                    encryption: encrypted.then_some(keys),
                                    instance: "ns/mailhook".into(),
                                    batched,
                                };
                                let mut items = vec![Item {
                                    event: &ev,
                                    matched_filters: &filters,
                                    webhook_id: "msg_1".into(),
                                    ceiling,
                                }];
                                if batched {
                                    items.insert(
                                        0,
                                        Item {
                                            event: &companion,
                                            matched_filters: &filters,
                                            webhook_id: "msg_0".into(),
                                            ceiling: Ceiling::NONE,
                                        },
                                    );
                                }
                                let mut request = wire::request(&cfg, &payload, &items).expect("request");
                                if encrypted {
                                    let jwe = String::from_utf8_lossy(&request.body).to_string();
                                    // A structured or batched CloudEvent carries the JWE as its data.
                                    let jwe = serde_json::from_str::<serde_json::Value>(&jwe)
                                        .ok()
                                        .and_then(|v| {
                                            let data = match v.as_array() {
                                                // `ev` is last (the receiver's key opens one JWE).
                                                Some(all) => {
                                                    all.last().map_or(&serde_json::Value::Null, |e| &e["data"])
                                                }
                                                None => &v["data"],
                                            };
                                            data.as_str().map(String::from)
                                        })
                                        .unwrap_or(jwe);
                                    let (_, plain) = decrypt(receiver, &jwe).expect("decrypts");
                                    request.body.extend_from_slice(b"\n");
                                    request.body.extend_from_slice(&plain);
                                }
                                let case = format!(
                                    "{event_type} from {source:?}, {mode:?} under {ceiling:?}, {format:?}, batched {batched}, encrypted {encrypted}, dead letter {}",
                                    ev.dead_letter.is_some()
                                );
                                assert_eq!(
                                    exposed(&ids, &request),
                                    None,
                                    "{case}:\n{}\n{:?}",
                                    String::from_utf8_lossy(&request.body),
                                    request.headers
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, EventType::ALL.len() * 4 * 2 * 4 * 3 * 4);
    }

    /// The check itself finds what `full` shows, in the body and in a percent-encoded
    /// header, so the test above cannot pass by looking nowhere.
    #[test]
    fn full_payloads_are_found_naming_people() {
        let mut rng = Rng(7);
        let ev = event(&mut rng, EventType::MessageReceived, Source::Smtp);
        let payload = PayloadConfig {
            mode: PayloadMode::Full,
            redact: vec![],
            pseudonym_key: b"k".to_vec(),
            raw_links: None,
            subscription: "uid".into(),
        };
        let items = [Item {
            event: &ev,
            matched_filters: &[],
            webhook_id: "msg_1".into(),
            ceiling: Ceiling::NONE,
        }];
        for format in [Format::StandardWebhooks, Format::CloudEvents { structured: false }] {
            let cfg = WireConfig {
                format,
                encryption: None,
                instance: "i".into(),
                batched: false,
            };
            let request = wire::request(&cfg, &payload, &items).expect("request");
            assert!(exposed(&identifiers(&ev), &request).is_some(), "{format:?}");
        }
        let only_header = Request {
            id: "x".into(),
            content_type: "application/json",
            headers: vec![("ce-subject".into(), header_value(&ev.mailbox))],
            body: b"{}".to_vec(),
        };
        assert_eq!(exposed(&[ev.mailbox.as_str()], &only_header), Some(ev.mailbox.as_str()));
    }
}
