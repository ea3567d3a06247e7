//! Dovecot's event exporter (`format = json`, one event per POST): what the push
//! notifications never see. Configuration changes (ACLs and metadata over IMAP, Sieve
//! scripts over ManageSieve), message reads (`mail_opened`: every body read, `BODY.PEEK`
//! and re-reads included, also POP3 and master sessions), and logins
//! (`auth_request_finished`, `auth_passdb_request_finished`).
//!
//! `read` is pure: it says what one exported event is. Reads and failed logins are held
//! (see `held`) so that a burst becomes one event; a Sieve change needs its script read
//! first (see `managesieve`); the rest is stored as it comes.

use serde::{Deserialize, Serialize};

use super::{DovecotConfig, Made, acl, clean, mailbox_of};
use crate::api::EventType;
use crate::event::{AclGrant, Activity, ConfigChange, ConfigKind, Login, LoginOutcome, MailboxEvent};

/// One event of Dovecot's event exporter (`format = json`).
#[derive(Debug, Deserialize)]
pub struct Exported {
    pub event: String,
    /// The Dovecot server that sent it.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub start_time: Option<String>,
    #[serde(default)]
    pub end_time: Option<String>,
    #[serde(default)]
    pub categories: Vec<serde_json::Value>,
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Longest user name taken (RFC 5321's path limit).
const MAX_USER: usize = 320;

impl Exported {
    /// A text field, cleaned of control characters and bounded.
    fn text(&self, name: &str) -> Option<String> {
        clean(self.fields.get(name).and_then(|v| v.as_str()).map(String::from))
    }

    /// A number field (Dovecot sends UIDs as numbers; older versions as strings).
    fn number(&self, name: &str) -> Option<u64> {
        match self.fields.get(name)? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A list field (`reason_code` is an array; a single value is taken as a list of one).
    fn texts(&self, name: &str) -> Vec<String> {
        let values: Vec<&serde_json::Value> = match self.fields.get(name) {
            Some(serde_json::Value::Array(items)) => items.iter().take(16).collect(),
            Some(v) => vec![v],
            None => vec![],
        };
        values
            .into_iter()
            .filter_map(|v| clean(v.as_str().map(String::from)))
            .collect()
    }

    fn user(&self) -> Option<String> {
        self.text("user").filter(|u| u.len() <= MAX_USER)
    }

    /// When it happened: its end, else its start, else `now`.
    fn at(&self, now: jiff::Timestamp) -> jiff::Timestamp {
        self.end_time
            .as_deref()
            .or(self.start_time.as_deref())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .unwrap_or(now)
    }

    /// The parts of a producer id, without control characters, bounded (`bounded_id`).
    fn producer(&self, kind: &str, parts: &[&str]) -> String {
        let mut id = format!("dovecot-{kind}");
        for part in parts {
            id.push(':');
            id.push_str(part);
        }
        id.push(':');
        id.push_str(self.start_time.as_deref().unwrap_or(""));
        bounded_id(id.chars().filter(|c| !c.is_control()).collect())
    }
}

/// Longest producer id or held-group name kept as it is; a longer one (a long folder name)
/// is replaced by its digest, since store keys are bounded (PostgreSQL's index rows).
const MAX_ID: usize = 200;

/// `id`, or a digest of it when longer than `MAX_ID` bytes.
pub fn bounded_id(id: String) -> String {
    if id.len() <= MAX_ID {
        return id;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A session id as Dovecot writes them (16 to 22 characters); anything longer is no id.
fn session_of(e: &Exported) -> Option<String> {
    e.text("session").filter(|s| s.len() <= 64)
}

/// What one exported event is.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    /// Stored as it comes (an ACL or metadata change, a successful login), with the
    /// session it opened when it is a login (remembered to label the session's reads).
    Event {
        event: Box<MailboxEvent>,
        session: Option<(String, SessionInfo)>,
    },
    /// A Sieve change: the script named (`None`: the active one) is read before the event
    /// is stored, to say where it sends mail.
    Sieve {
        event: Box<MailboxEvent>,
        user: String,
        script: Option<String>,
    },
    /// A message read or a failed login, held for the window.
    Held(super::held::Item),
}

/// Who is behind a session, from its login: to label the session's reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mailhook: bool,
    /// POP3's reads carry no client address: the login's is theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// What `e` reports, if anything mailhook keeps (the exporter's filter may let more
/// through: the rest is acknowledged and dropped). Pure.
pub fn read(e: &Exported, config: &DovecotConfig, now: jiff::Timestamp) -> Option<Reported> {
    match e.event.as_str() {
        "imap_command_finished" | "managesieve_command_finished" => config_change(e, now),
        "mail_opened" => opened(e, now),
        "auth_request_finished" | "auth_passdb_request_finished" => login(e, config, now),
        _ => None,
    }
}

fn config_change(e: &Exported, now: jiff::Timestamp) -> Option<Reported> {
    let command = e.text("cmd_name")?.to_ascii_uppercase();
    let args = e.text("cmd_args");
    let first_arg = || args.as_deref().and_then(first_imap_argument);
    let (kind, target) = if e.event == "imap_command_finished" {
        if e.text("tagged_reply_state").as_deref() != Some("OK") {
            return None;
        }
        match command.as_str() {
            "SETACL" | "DELETEACL" => (ConfigKind::Acl, first_arg()),
            "SETMETADATA" => (ConfigKind::Metadata, e.text("mailbox").or_else(first_arg)),
            _ => return None,
        }
    } else {
        if e.fields.contains_key("error") {
            return None;
        }
        match command.as_str() {
            "PUTSCRIPT" | "SETACTIVE" | "DELETESCRIPT" | "RENAMESCRIPT" => {
                (ConfigKind::Sieve, e.text("script_name").or_else(first_arg))
            }
            _ => return None,
        }
    };
    let user = e.user()?;
    let session = session_of(e);
    let producer = e.producer(
        "export",
        &[
            session.as_deref().unwrap_or(""),
            &e.text("cmd_tag").unwrap_or_default(),
            &command,
        ],
    );
    let acl = match kind {
        ConfigKind::Acl => args.as_deref().and_then(|a| acl::parse(&command, a).ok()).map(grant),
        _ => None,
    };
    let activity = Activity {
        user: user.clone(),
        service: Some(
            if kind == ConfigKind::Sieve {
                "managesieve"
            } else {
                "imap"
            }
            .to_string(),
        ),
        remote_ip: e.text("remote_ip"),
        session,
        change: Some(ConfigChange {
            kind,
            command: command.clone(),
            target: target.clone(),
            detail: args,
            forwarding: None,
            acl,
        }),
        ..Default::default()
    };
    let event = made(
        EventType::MailboxConfigChanged,
        &user,
        None,
        e.at(now),
        now,
        producer,
        activity,
    );
    Some(match kind {
        ConfigKind::Sieve if matches!(command.as_str(), "PUTSCRIPT" | "SETACTIVE") => Reported::Sieve {
            event: Box::new(event),
            user,
            // SETACTIVE with an empty name deactivates every script: nothing is sent.
            script: target,
        },
        _ => Reported::Event {
            event: Box::new(event),
            session: None,
        },
    })
}

/// An ACL change as events carry it.
fn grant(change: acl::AclChange) -> AclGrant {
    AclGrant {
        granted: change.grants(),
        read_granted: change.grants_reading(),
        folder: change.folder,
        identifier: Some(change.identifier),
        mode: match change.mode {
            acl::Mode::Add => "add",
            acl::Mode::Remove => "remove",
            acl::Mode::Replace => "replace",
            acl::Mode::Delete => "delete",
        }
        .into(),
        rights: change.rights.iter().map(|r| r.as_str().to_string()).collect(),
        negative: change.negative,
    }
}

fn made(
    event_type: EventType,
    user: &str,
    folder: Option<String>,
    occurred_at: jiff::Timestamp,
    received_at: jiff::Timestamp,
    producer: String,
    activity: Activity,
) -> MailboxEvent {
    Made {
        event_type,
        mailbox: mailbox_of(user),
        folder,
        occurred_at,
        received_at,
        producer,
        activity,
    }
    .event()
}

/// The service a read or a login came through: Dovecot's `service` field, else the
/// protocol its reason codes or categories name.
fn service(e: &Exported, reasons: &[String]) -> Option<String> {
    if let Some(s) = e.text("service") {
        return Some(s);
    }
    let named = reasons
        .iter()
        .filter_map(|r| r.split_once(':').map(|(p, _)| p))
        .chain(e.categories.iter().filter_map(|c| c.as_str()))
        .find(|p| matches!(*p, "imap" | "pop3" | "doveadm" | "lmtp" | "managesieve"));
    named.map(String::from)
}

/// `mail_opened`: a message's body was opened. Held, so that a bulk read is one event.
fn opened(e: &Exported, now: jiff::Timestamp) -> Option<Reported> {
    let user = e.user()?;
    let folder = e.text("mailbox")?;
    // UID 0: a message being delivered (LMTP opens it to run Sieve), not a read.
    let uid = e.number("uid").and_then(|u| u32::try_from(u).ok()).filter(|u| *u > 0)?;
    let reasons = e.texts("reason_code");
    if reasons.iter().any(|r| r.starts_with("lmtp:") || r.starts_with("lda:")) {
        return None;
    }
    let session = session_of(e);
    let remote_ip = e.text("remote_ip").filter(|ip| ip.len() <= 64);
    let at = e.at(now);
    // One session's reads are counted together; without a session id, one client's.
    let group = bounded_id(match &session {
        Some(s) => format!("{user} {s}"),
        None => format!("{user} {}", remote_ip.as_deref().unwrap_or("")),
    });
    let producer = e.producer("read", &[session.as_deref().unwrap_or(""), &folder, &uid.to_string()]);
    Some(Reported::Held(super::held::Item {
        kind: super::held::Kind::Read,
        group,
        at,
        received_at: now,
        producer,
        user,
        folder: Some(folder),
        uid: Some(uid),
        service: service(e, &reasons),
        remote_ip,
        session,
        command: e.text("cmd_name").map(|c| c.to_ascii_uppercase()),
        reasons,
        mechanism: None,
        reason: None,
        auth_user: None,
        mailhook: false,
    }))
}

/// A login: `auth_request_finished` with `success=yes`, and `auth_passdb_request_finished`
/// with a failing `result` (a failed `auth_request_finished` carries no reason, so it is
/// ignored). The shipped filter sends just those.
fn login(e: &Exported, config: &DovecotConfig, now: jiff::Timestamp) -> Option<Reported> {
    let service = e.text("service");
    // doveadm looks users up for itself, LMTP and LDA for the recipients of a delivery:
    // not logins.
    if matches!(service.as_deref(), Some("doveadm" | "lmtp" | "lda")) {
        return None;
    }
    let succeeded = if e.event == "auth_request_finished" {
        // A failure says neither that it failed nor why: its passdb's event says both.
        if e.text("success").as_deref() != Some("yes") {
            return None;
        }
        true
    } else {
        match e.text("result").as_deref() {
            Some("ok") => return None,
            // Another password database may still say yes (a master passdb tried first).
            Some("next") | Some("internal_failure") | None => return None,
            Some(_) => false,
        }
    };
    // On a master login `user` is the mailbox logged into, `master_user` who logged in.
    let user = e
        .user()
        .or_else(|| e.text("original_user").filter(|u| u.len() <= MAX_USER))?;
    let auth_user = e.text("master_user").filter(|m| !m.eq_ignore_ascii_case(&user));
    let mailhook = auth_user.as_deref().is_some_and(|a| {
        config
            .own_master_user
            .as_deref()
            .is_some_and(|own| own.eq_ignore_ascii_case(a))
    });
    let session = session_of(e);
    let remote_ip = e.text("remote_ip").filter(|ip| ip.len() <= 64);
    let mechanism = e
        .text("mechanism")
        .filter(|m| m.len() <= 64)
        .map(|m| m.to_ascii_uppercase());
    let at = e.at(now);
    if !succeeded {
        let reason = e
            .text("result")
            .or_else(|| e.text("error"))
            .or_else(|| e.text("reason"));
        let producer = e.producer("login", &[session.as_deref().unwrap_or(""), &user]);
        return Some(Reported::Held(super::held::Item {
            kind: super::held::Kind::LoginFailed,
            group: bounded_id(format!("{user} {}", remote_ip.as_deref().unwrap_or(""))),
            at,
            received_at: now,
            producer,
            user,
            folder: None,
            uid: None,
            service,
            remote_ip,
            session,
            command: None,
            reasons: vec![],
            mechanism,
            reason,
            auth_user,
            mailhook,
        }));
    }
    let producer = e.producer("login", &[session.as_deref().unwrap_or(""), &user]);
    let info = session.clone().map(|s| {
        (
            s,
            SessionInfo {
                user: user.clone(),
                auth_user: auth_user.clone(),
                mailhook,
                remote_ip: remote_ip.clone(),
                service: service.clone(),
            },
        )
    });
    let activity = Activity {
        user: user.clone(),
        admin_session: auth_user.is_some(),
        auth_user,
        mailhook_session: mailhook,
        service,
        remote_ip,
        session,
        login: Some(Login {
            outcome: LoginOutcome::Succeeded,
            mechanism,
            reason: None,
            attempts: 1,
            first_at: at,
            last_at: at,
        }),
        ..Default::default()
    };
    Some(Reported::Event {
        event: Box::new(made(EventType::MailboxLogin, &user, None, at, now, producer, activity)),
        session: info,
    })
}

/// The first argument of an IMAP command line: a quoted string (with `\` escapes) or
/// an atom. Pure.
pub fn first_imap_argument(args: &str) -> Option<String> {
    let args = args.trim_start();
    let mut chars = args.chars();
    if chars.next()? != '"' {
        return args.split_whitespace().next().map(String::from);
    }
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// The configuration change an exported event reports, if it reports one (kept for the
/// fuzz target and tests: `read` is what the route uses).
pub fn map_exported(e: Exported, now: jiff::Timestamp) -> Option<MailboxEvent> {
    match config_change(&e, now)? {
        Reported::Event { event, .. } | Reported::Sieve { event, .. } => Some(*event),
        Reported::Held(_) => None,
    }
}

/// Where a Sieve script sends mail, as events carry it: each target judged against the
/// internal domains; what cannot be judged counts as external. Pure.
pub fn forwarding(
    summary: Result<(super::sieve::Summary, Option<bool>), String>,
    internal_domains: &[String],
) -> crate::event::Forwarding {
    use crate::event::{ForwardAction, ForwardTarget, Forwarding};
    let (summary, active) = match summary {
        Ok(s) => s,
        Err(why) => {
            return Forwarding {
                external: true,
                unreadable: Some(why),
                ..Default::default()
            };
        }
    };
    let target = |written: &String, action| {
        let address = plain_address(written);
        let normalized = crate::source::normalize_address(&address);
        // What does not parse but names a domain is judged by it; what names none is a
        // local user (`redirect "bob"`), delivered by the server itself.
        let domain = match &normalized {
            Some(a) => crate::event::domain_of(a).unwrap_or_default().to_string(),
            None => address
                .rsplit_once('@')
                .map(|(_, d)| d.trim().trim_end_matches('>').to_lowercase())
                .unwrap_or_default(),
        };
        let external = match &normalized {
            Some(_) => !domain.is_empty() && !crate::source::is_internal(&domain_address(&domain), internal_domains),
            // An address mailhook cannot read, with a domain: it may leave; say so.
            None => address.contains('@') && !crate::source::is_internal(&domain_address(&domain), internal_domains),
        };
        ForwardTarget {
            external,
            address: Some(normalized.unwrap_or(address)),
            domain,
            action,
        }
    };
    let mut targets: Vec<ForwardTarget> = Vec::new();
    targets.extend(summary.redirects.iter().map(|a| target(a, ForwardAction::Redirect)));
    targets.extend(
        summary
            .vacation_from
            .iter()
            .map(|a| target(a, ForwardAction::VacationFrom)),
    );
    targets.extend(summary.notify.iter().map(|a| target(a, ForwardAction::Notify)));
    targets.truncate(256);
    let external = targets.iter().any(|t| t.external) || !summary.unresolved.is_empty();
    Forwarding {
        targets,
        unresolved: summary.unresolved.into_iter().take(64).collect(),
        external,
        unreadable: None,
        active,
    }
}

/// The address in what a script wrote: `Name <a@b>` → `a@b`, `mailto:` percent-encoding
/// decoded (`a%40b` → `a@b`).
fn plain_address(written: &str) -> String {
    let inner = match (written.rfind('<'), written.rfind('>')) {
        (Some(open), Some(close)) if open < close => written.get(open + 1..close).unwrap_or(written),
        _ => written,
    };
    let bytes = inner.trim().as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `is_internal` judges addresses: a domain as one.
fn domain_address(domain: &str) -> String {
    format!("x@{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ForwardAction;
    use crate::source::dovecot::held::Kind;

    /// What Dovecot 2.3.19.1 posted for one scenario (`tests/dovecot/capture.py`).
    fn captured(scenario: &str) -> Vec<Exported> {
        let path = format!(
            "{}/tests/fixtures/dovecot-exported/{scenario}.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path)
            .expect("fixture")
            .lines()
            .map(|l| serde_json::from_str(l).expect("exported event"))
            .collect()
    }

    fn config() -> DovecotConfig {
        DovecotConfig {
            internal_domains: vec!["example.test".into()],
            own_master_user: Some("mailhook-admin".into()),
            ..Default::default()
        }
    }

    /// (event type or held kind, the reported thing) of a scenario.
    fn reported(scenario: &str) -> Vec<Reported> {
        let now = jiff::Timestamp::now();
        captured(scenario)
            .iter()
            .filter_map(|e| read(e, &config(), now))
            .collect()
    }

    fn held(r: &[Reported]) -> Vec<&super::super::held::Item> {
        r.iter()
            .filter_map(|r| match r {
                Reported::Held(i) => Some(i),
                _ => None,
            })
            .collect()
    }

    fn events(r: &[Reported]) -> Vec<&MailboxEvent> {
        r.iter()
            .filter_map(|r| match r {
                Reported::Event { event, .. } | Reported::Sieve { event, .. } => Some(event.as_ref()),
                Reported::Held(_) => None,
            })
            .collect()
    }

    #[test]
    fn each_body_read_is_one_held_read_and_each_login_one_event() {
        for scenario in ["read", "peek", "master-read", "pop3-retr"] {
            let r = reported(scenario);
            let reads = held(&r);
            assert_eq!(reads.len(), 1, "{scenario}: one read");
            assert_eq!(reads[0].kind, Kind::Read);
            assert_eq!(reads[0].user, "alice@example.test");
            assert_eq!(reads[0].uid, Some(1));
            assert_eq!(reads[0].folder.as_deref(), Some("INBOX"));
            let logins = events(&r);
            assert_eq!(logins.len(), 1, "{scenario}: one login");
            assert_eq!(logins[0].event_type, EventType::MailboxLogin);
        }
        let pop3 = reported("pop3-retr");
        assert_eq!(held(&pop3)[0].service.as_deref(), Some("pop3"));
        assert_eq!(held(&pop3)[0].reasons, vec!["pop3:cmd_retr".to_string()]);
        // The master user is on the session's login only: it labels the session.
        let master = reported("master-read");
        let Some(Reported::Event {
            session: Some((id, info)),
            ..
        }) = master.iter().find(|r| matches!(r, Reported::Event { .. }))
        else {
            panic!("the master login remembers its session");
        };
        assert_eq!(Some(id.as_str()), held(&master)[0].session.as_deref());
        assert_eq!(info.auth_user.as_deref(), Some("mailhook-admin"));
        assert!(info.mailhook, "the reconciler's master user is mailhook's own");
    }

    #[test]
    fn a_bulk_fetch_is_one_read_per_message_held_in_one_group() {
        let r = reported("bulkread");
        let reads = held(&r);
        assert_eq!(reads.len(), 20);
        assert!(reads.iter().all(|i| i.group == reads[0].group));
        let producers: std::collections::BTreeSet<_> = reads.iter().map(|i| &i.producer).collect();
        assert_eq!(producers.len(), 20, "each read its own row");
    }

    #[test]
    fn deliveries_and_cached_header_fetches_are_not_reads_but_uncached_ones_are_held() {
        assert!(
            held(&reported("deliver")).is_empty(),
            "LMTP opens the message to deliver it"
        );
        assert!(held(&reported("fetch-envelope-again")).is_empty());
        // The shipped filter sends body reads only; these reach mailhook only with a wider one.
        assert_eq!(held(&reported("fetch-header")).len(), 1);
    }

    #[test]
    fn failed_logins_are_held_with_their_reason_and_successes_are_events() {
        for (scenario, reason) in [
            ("login-fail-password", "password_mismatch"),
            ("login-fail-unknown", "user_unknown"),
        ] {
            let r = reported(scenario);
            assert!(events(&r).is_empty(), "{scenario}: the failure is held, not stored");
            let fails = held(&r);
            assert_eq!(fails.len(), 1, "{scenario}");
            assert_eq!(
                (fails[0].kind, fails[0].reason.as_deref()),
                (Kind::LoginFailed, Some(reason))
            );
            assert_eq!(fails[0].mechanism.as_deref(), Some("PLAIN"));
            assert_eq!(fails[0].remote_ip.as_deref(), Some("127.0.0.1"));
        }
        let ok = reported("login-ok");
        let login = events(&ok)[0];
        let a = login.activity.as_deref().expect("activity");
        let l = a.login.as_ref().expect("login");
        assert_eq!(
            (l.outcome, l.mechanism.as_deref()),
            (LoginOutcome::Succeeded, Some("PLAIN"))
        );
        assert!(!a.admin_session && !a.mailhook_session);
        let master = reported("master-login");
        let a = events(&master)[0].activity.as_deref().expect("activity");
        assert_eq!(a.auth_user.as_deref(), Some("mailhook-admin"));
        assert!(a.admin_session && a.mailhook_session);
    }

    #[test]
    fn acl_and_sieve_changes_carry_their_meaning() {
        let acl = reported("setacl");
        let change = events(&acl)
            .iter()
            .find_map(|e| e.activity.as_deref()?.change.clone())
            .expect("an ACL change");
        let grant = change.acl.expect("parsed");
        assert_eq!(grant.identifier.as_deref(), Some("bob@example.test"));
        assert_eq!(grant.folder, "INBOX");
        assert!(grant.granted && grant.read_granted);
        let sieve = reported("putscript");
        let scripts: Vec<_> = sieve
            .iter()
            .filter_map(|r| match r {
                Reported::Sieve { script, .. } => Some(script.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            scripts.len(),
            2,
            "PUTSCRIPT and SETACTIVE each read the script they name"
        );
        assert!(
            reported("putscript-invalid")
                .iter()
                .all(|r| !matches!(r, Reported::Sieve { .. }))
        );
    }

    #[test]
    fn forwarding_is_judged_against_the_internal_domains() {
        let summary = crate::source::dovecot::sieve::summarize(
            "require [\"vacation\", \"variables\"]; redirect \"Boss@Example.TEST\"; redirect \"x@outside.example\"; vacation :from \"me@example.test\" \"away\"; set \"t\" \"a@b.c\"; redirect \"${t}\";",
        );
        let f = forwarding(
            summary.map(|s| (s, Some(true))).map_err(|e| e.to_string()),
            &["example.test".into()],
        );
        let judged: Vec<_> = f
            .targets
            .iter()
            .map(|t| (t.domain.as_str(), t.action, t.external))
            .collect();
        assert_eq!(
            judged,
            vec![
                ("example.test", ForwardAction::Redirect, false),
                ("outside.example", ForwardAction::Redirect, true),
                ("example.test", ForwardAction::VacationFrom, false),
            ]
        );
        assert_eq!(f.unresolved.len(), 1);
        assert!(f.external);
        let internal = forwarding(
            crate::source::dovecot::sieve::summarize("redirect \"bob@example.test\";")
                .map(|s| (s, None))
                .map_err(|e| e.to_string()),
            &["example.test".into()],
        );
        assert!(!internal.external);
        let disguised = forwarding(
            Ok((
                crate::source::dovecot::sieve::Summary {
                    notify: vec!["spy%40evil.example".into()],
                    vacation_from: vec!["Boss <boss@Evil.Example>".into()],
                    redirects: vec!["bob".into(), "not an address@evil.example".into()],
                    unresolved: vec![],
                },
                Some(true),
            )),
            &["example.test".into()],
        );
        let judged: Vec<_> = disguised
            .targets
            .iter()
            .map(|t| (t.domain.as_str(), t.external))
            .collect();
        assert_eq!(
            judged,
            vec![
                ("", false),
                ("evil.example", true),
                ("evil.example", true),
                ("evil.example", true)
            ],
            "a local user stays inside; what names an outside domain does not, parsed or not"
        );
        let unknown = forwarding(Err("not read".into()), &[]);
        assert!(unknown.external && unknown.unreadable.is_some());
    }
}
