//! A MailboxFilter compiled once per change: globs and regexes parsed, lists lowered, so
//! that an invalid filter is reported on its status instead of failing per event.

use regex::Regex;
use wildmatch::WildMatch;

use crate::api::{Direction, EventType, HeaderMatch, MailboxFilterSpec, MatchCriteria, Severity};
use crate::event::{MailboxEvent, domain_of};

/// Why a filter cannot be compiled: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FilterError {
    /// JSON path of the offending field, e.g. `spec.subject.regex`.
    pub field: String,
    pub problem: String,
}

/// Largest compiled regex we accept; keeps a hostile pattern from eating memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct CompiledFilter {
    pub include: CompiledCriteria,
    pub exclude: Option<CompiledCriteria>,
    pub flag: Option<(String, Severity)>,
}

#[derive(Debug, Clone)]
pub struct CompiledCriteria {
    pub event_types: Vec<EventType>,
    pub mailboxes: Vec<WildMatch>,
    pub senders: Vec<WildMatch>,
    pub recipients: Vec<WildMatch>,
    /// In ASCII form (IDNA: lower-cased, internationalized labels as `xn--`), without a
    /// leading dot, so `bücher.example` and `xn--bcher-kva.example` are one domain.
    pub domains: Vec<String>,
    pub directions: Vec<Direction>,
    /// Lower-cased.
    pub subject_keywords: Vec<String>,
    pub subject_regex: Option<Regex>,
    pub attachments_present: Option<bool>,
    pub attachment_content_types: Vec<WildMatch>,
    /// Lower-cased, without a leading dot.
    pub attachment_extensions: Vec<String>,
    pub min_size: Option<u64>,
    pub max_size: Option<u64>,
    pub headers: Vec<CompiledHeader>,
    pub folders: Vec<WildMatch>,
    pub admin_session: Option<bool>,
    /// When every `mailboxes` pattern ends in a literal ASCII domain (`*@example.com`,
    /// `alice@example.com`): those domains. A matching mailbox has one of them after its
    /// last `@`, which lets the router skip this filter for mailboxes of other domains.
    pub mailbox_domains: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct CompiledHeader {
    /// Lower-cased.
    pub name: String,
    pub value: HeaderValueMatch,
}

#[derive(Debug, Clone)]
pub enum HeaderValueMatch {
    Present,
    Glob(WildMatch),
    Regex(Regex),
}

impl CompiledFilter {
    pub fn compile(spec: &MailboxFilterSpec) -> Result<CompiledFilter, FilterError> {
        Ok(CompiledFilter {
            include: CompiledCriteria::compile(&spec.criteria, "spec")?,
            exclude: spec
                .exclude
                .as_ref()
                .map(|c| CompiledCriteria::compile(c, "spec.exclude"))
                .transpose()?,
            flag: spec.flag.as_ref().map(|f| (f.name.clone(), f.severity)),
        })
    }
}

impl CompiledCriteria {
    fn compile(c: &MatchCriteria, at: &str) -> Result<CompiledCriteria, FilterError> {
        let subject = c.subject.as_ref();
        let attachments = c.attachments.as_ref();
        let size = c.size.as_ref();
        if let Some(s) = size
            && let (Some(min), Some(max)) = (s.min_bytes, s.max_bytes)
            && min > max
        {
            return Err(err(
                format!("{at}.size"),
                format!("minBytes ({min}) is greater than maxBytes ({max}); swap them"),
            ));
        }
        Ok(CompiledCriteria {
            event_types: c.event_types.clone(),
            mailbox_domains: literal_domains(&c.mailboxes),
            mailboxes: globs(&c.mailboxes, &format!("{at}.mailboxes"))?,
            senders: globs(&c.senders, &format!("{at}.senders"))?,
            recipients: globs(&c.recipients, &format!("{at}.recipients"))?,
            domains: domains(&c.domains, &format!("{at}.domains"))?,
            directions: c.directions.clone(),
            subject_keywords: subject
                .map(|s| {
                    s.keywords
                        .iter()
                        .map(|k| k.to_lowercase())
                        .filter(|k| !k.trim().is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            subject_regex: subject
                .and_then(|s| s.regex.as_deref())
                .map(|r| regex(r, &format!("{at}.subject.regex")))
                .transpose()?,
            attachments_present: attachments.and_then(|a| a.present),
            attachment_content_types: attachments
                .map(|a| globs(&a.content_types, &format!("{at}.attachments.contentTypes")))
                .transpose()?
                .unwrap_or_default(),
            attachment_extensions: attachments
                .map(|a| {
                    a.extensions
                        .iter()
                        .map(|e| e.trim_start_matches('.').to_lowercase())
                        .collect()
                })
                .unwrap_or_default(),
            min_size: size.and_then(|s| s.min_bytes),
            max_size: size.and_then(|s| s.max_bytes),
            headers: c
                .headers
                .iter()
                .enumerate()
                .map(|(i, h)| header(h, &format!("{at}.headers[{i}]")))
                .collect::<Result<_, _>>()?,
            folders: folder_globs(&c.folders, &format!("{at}.folders"))?,
            admin_session: c.admin_session,
        })
    }
}

/// What several filters ask of one event, computed once for all of them (the router
/// evaluates many filters per event).
pub struct Prepared<'a> {
    pub event: &'a MailboxEvent,
    lower_subject: std::cell::OnceCell<Option<String>>,
}

impl<'a> Prepared<'a> {
    pub fn new(event: &'a MailboxEvent) -> Prepared<'a> {
        Prepared {
            event,
            lower_subject: std::cell::OnceCell::new(),
        }
    }

    fn lower_subject(&self) -> Option<&str> {
        self.lower_subject
            .get_or_init(|| self.event.subject.as_deref().map(str::to_lowercase))
            .as_deref()
    }
}

impl CompiledFilter {
    /// Whether `event` is selected: it matches the criteria and not the exclusions.
    pub fn matches(&self, event: &MailboxEvent) -> bool {
        self.matches_prepared(&Prepared::new(event))
    }

    /// `matches`, sharing per-event work with other filters evaluated for the same event.
    pub fn matches_prepared(&self, p: &Prepared<'_>) -> bool {
        self.include.matches(p) && !self.exclude.as_ref().is_some_and(|x| !x.is_empty() && x.matches(p))
    }
}

impl CompiledCriteria {
    /// True when no criterion is given (an empty `exclude` removes nothing).
    pub fn is_empty(&self) -> bool {
        self.event_types.is_empty()
            && self.mailboxes.is_empty()
            && self.senders.is_empty()
            && self.recipients.is_empty()
            && self.domains.is_empty()
            && self.directions.is_empty()
            && self.subject_keywords.is_empty()
            && self.subject_regex.is_none()
            && self.attachments_present.is_none()
            && self.attachment_content_types.is_empty()
            && self.attachment_extensions.is_empty()
            && self.min_size.is_none()
            && self.max_size.is_none()
            && self.headers.is_empty()
            && self.folders.is_empty()
            && self.admin_session.is_none()
    }

    /// Every criterion given holds (AND); within a list any entry may match (OR).
    pub fn matches(&self, p: &Prepared<'_>) -> bool {
        let e = p.event;
        let any_glob = |globs: &[WildMatch], value: &str| globs.iter().any(|g| g.matches(value));
        (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
            && (self.mailboxes.is_empty() || any_glob(&self.mailboxes, &e.mailbox))
            && (self.senders.is_empty() || e.from.as_deref().is_some_and(|f| any_glob(&self.senders, f)))
            && (self.recipients.is_empty() || e.recipients().any(|r| any_glob(&self.recipients, r)))
            && (self.domains.is_empty() || self.domain_matches(e))
            && (self.directions.is_empty() || e.direction.is_some_and(|d| self.directions.contains(&d)))
            && self.subject_matches(p)
            && self.attachments_match(e)
            && self.min_size.is_none_or(|min| e.size.is_some_and(|s| s >= min))
            && self.max_size.is_none_or(|max| e.size.is_some_and(|s| s <= max))
            && self.headers.iter().all(|h| h.matches(e))
            && (self.folders.is_empty() || self.folder_matches(e))
            && self
                .admin_session
                .is_none_or(|admin| e.activity.as_ref().is_some_and(|a| a.admin_session == admin))
    }

    fn folder_matches(&self, e: &MailboxEvent) -> bool {
        let previous = e.activity.as_ref().and_then(|a| a.previous_folder.as_deref());
        e.folder
            .as_deref()
            .into_iter()
            .chain(previous)
            .any(|f| self.folders.iter().any(|g| g.matches(f)))
    }

    fn domain_matches(&self, e: &MailboxEvent) -> bool {
        let covered = |domain: &str| {
            let domain = ascii_domain(domain);
            self.domains.iter().any(|d| covers(d, &domain))
        };
        e.from.as_deref().and_then(domain_of).is_some_and(covered) || e.recipients().filter_map(domain_of).any(covered)
    }

    fn subject_matches(&self, p: &Prepared<'_>) -> bool {
        if self.subject_keywords.is_empty() && self.subject_regex.is_none() {
            return true;
        }
        let Some(subject) = p.event.subject.as_deref() else {
            return false;
        };
        if let Some(re) = &self.subject_regex
            && re.is_match(subject)
        {
            return true;
        }
        if self.subject_keywords.is_empty() {
            return false;
        }
        let lower = p.lower_subject().unwrap_or_default();
        self.subject_keywords.iter().any(|k| lower.contains(k.as_str()))
    }

    fn attachments_match(&self, e: &MailboxEvent) -> bool {
        self.attachments_present
            .is_none_or(|want| want != e.attachments.is_empty())
            && (self.attachment_content_types.is_empty()
                || e.attachments.iter().any(|a| {
                    a.content_type
                        .as_deref()
                        .is_some_and(|t| self.attachment_content_types.iter().any(|g| g.matches(t)))
                }))
            && (self.attachment_extensions.is_empty()
                || e.attachments
                    .iter()
                    .any(|a| a.extension().is_some_and(|x| self.attachment_extensions.contains(&x))))
    }
}

impl CompiledHeader {
    fn matches(&self, e: &MailboxEvent) -> bool {
        match (e.headers.get(&self.name), &self.value) {
            (None, _) => false,
            (Some(_), HeaderValueMatch::Present) => true,
            (Some(v), HeaderValueMatch::Glob(g)) => g.matches(v),
            (Some(v), HeaderValueMatch::Regex(r)) => r.is_match(v),
        }
    }
}

fn err(field: String, problem: String) -> FilterError {
    FilterError { field, problem }
}

/// The domains of address patterns that all end in `@<literal ASCII domain>`; None when
/// one does not (or there are none). Lower-cased as the globs are.
fn literal_domains(patterns: &[String]) -> Option<Vec<String>> {
    if patterns.is_empty() {
        return None;
    }
    let mut domains: Vec<String> = patterns
        .iter()
        .map(|p| {
            let (_, domain) = p.rsplit_once('@')?;
            let literal = !domain.is_empty()
                && domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
            literal.then(|| domain.to_ascii_lowercase())
        })
        .collect::<Option<_>>()?;
    domains.sort();
    domains.dedup();
    Some(domains)
}

pub(super) fn globs(patterns: &[String], field: &str) -> Result<Vec<WildMatch>, FilterError> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err(
                    format!("{field}[{i}]"),
                    format!("{p:?} is not a valid pattern: use an address glob without spaces, e.g. *@example.com"),
                ));
            }
            // Lower-cased here too: addresses arrive lower-cased (Unicode, not only ASCII).
            Ok(WildMatch::new_case_insensitive(&p.to_lowercase()))
        })
        .collect()
}

/// Folder names may hold spaces ("Sent Items"), unlike addresses.
fn folder_globs(patterns: &[String], field: &str) -> Result<Vec<WildMatch>, FilterError> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.trim().is_empty() || p.chars().any(char::is_control) {
                return Err(err(
                    format!("{field}[{i}]"),
                    format!(
                        "{p:?} is not a valid folder pattern: give a folder name or glob, e.g. Trash or Projects/*"
                    ),
                ));
            }
            Ok(WildMatch::new_case_insensitive(p))
        })
        .collect()
}

pub(super) fn domains(list: &[String], field: &str) -> Result<Vec<String>, FilterError> {
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            let d = d.trim_start_matches('.').to_lowercase();
            let valid = !d.is_empty()
                && d.split('.').all(|label| {
                    !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_alphanumeric() || c == '-')
                });
            match idna::domain_to_ascii(&d) {
                Ok(ascii) if valid && !ascii.is_empty() => Ok(ascii),
                _ => Err(err(
                    format!("{field}[{i}]"),
                    format!("{d:?} is not a domain name: give one such as example.com (no @, no wildcards)"),
                )),
            }
        })
        .collect()
}

/// A domain in the form filters keep (see `CompiledCriteria::domains`). ASCII domains, the
/// common case, only need lower-casing; a domain IDNA refuses is compared as lower-cased
/// Unicode (it then matches no filter domain, which are all ASCII).
pub(super) fn ascii_domain(domain: &str) -> std::borrow::Cow<'_, str> {
    if domain.is_ascii() {
        if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            return domain.to_ascii_lowercase().into();
        }
        return domain.into();
    }
    idna::domain_to_ascii(domain)
        .map(Into::into)
        .unwrap_or_else(|_| domain.to_lowercase().into())
}

/// Whether `domain` is `d` or one of its subdomains. Compares bytes: `d` is ASCII, so a
/// match ends on a character boundary of `domain` whatever it holds.
pub(super) fn covers(d: &str, domain: &str) -> bool {
    let (domain, d) = (domain.as_bytes(), d.as_bytes());
    let Some(start) = domain.len().checked_sub(d.len()) else {
        return false;
    };
    domain.get(start..) == Some(d) && (start == 0 || domain.get(start - 1) == Some(&b'.'))
}

fn regex(pattern: &str, field: &str) -> Result<Regex, FilterError> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            // The regex crate's message spans several lines; status wants one.
            let detail = e.to_string().lines().last().unwrap_or_default().trim().to_string();
            err(
                field.to_string(),
                format!("{pattern:?} is not a valid regular expression ({detail}); fix the expression or use subject.keywords"),
            )
        })
}

fn header(h: &HeaderMatch, field: &str) -> Result<CompiledHeader, FilterError> {
    if !h.name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        return Err(err(
            format!("{field}.name"),
            format!("{:?} is not a header name: use printable ASCII without ':'", h.name),
        ));
    }
    let value = match (&h.value, &h.regex) {
        (Some(_), Some(_)) => {
            return Err(err(field.to_string(), "give value or regex, not both".to_string()));
        }
        (Some(v), None) => HeaderValueMatch::Glob(WildMatch::new_case_insensitive(v)),
        (None, Some(r)) => HeaderValueMatch::Regex(regex(r, &format!("{field}.regex"))?),
        (None, None) => HeaderValueMatch::Present,
    };
    Ok(CompiledHeader {
        name: h.name.to_lowercase(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{SizeRange, SubjectMatch};

    fn spec(criteria: MatchCriteria) -> MailboxFilterSpec {
        MailboxFilterSpec {
            criteria,
            ..Default::default()
        }
    }

    #[test]
    fn valid_filter_compiles_and_lowers_case() {
        let f = CompiledFilter::compile(&spec(MatchCriteria {
            domains: vec![".Example.COM".into()],
            subject: Some(SubjectMatch {
                keywords: vec!["Invoice".into()],
                regex: Some("(?i)wire\\s+transfer".into()),
            }),
            ..Default::default()
        }))
        .expect("compiles");
        assert_eq!(f.include.domains, vec!["example.com"]);
        assert_eq!(f.include.subject_keywords, vec!["invoice"]);
        assert!(f.include.subject_regex.is_some());
    }

    #[test]
    fn bad_regex_names_the_field() {
        let e = CompiledFilter::compile(&spec(MatchCriteria {
            subject: Some(SubjectMatch {
                keywords: vec![],
                regex: Some("([unclosed".into()),
            }),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(e.field, "spec.subject.regex");
        assert!(e.problem.contains("not a valid regular expression"), "{e}");
        assert!(!e.to_string().contains('\n'), "one line for status: {e}");
    }

    #[test]
    fn bad_patterns_in_exclude_are_reported_with_their_path() {
        let mut s = spec(MatchCriteria::default());
        s.exclude = Some(MatchCriteria {
            senders: vec!["no reply@x".into()],
            ..Default::default()
        });
        assert_eq!(
            CompiledFilter::compile(&s).unwrap_err().field,
            "spec.exclude.senders[0]"
        );
        s.exclude = Some(MatchCriteria {
            domains: vec!["*.example.com".into()],
            ..Default::default()
        });
        assert_eq!(
            CompiledFilter::compile(&s).unwrap_err().field,
            "spec.exclude.domains[0]"
        );
    }

    #[test]
    fn folders_and_admin_sessions_select_mailbox_activity() {
        use crate::event::Activity;
        let f = CompiledFilter::compile(&spec(MatchCriteria {
            folders: vec!["Projekte/*".into()],
            admin_session: Some(true),
            ..Default::default()
        }))
        .expect("compiles");
        let mut e: MailboxEvent = serde_json::from_value(serde_json::json!({
            "id": "e", "type": "message.moved", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "dovecot", "mailbox": "a@b.c",
            "folder": "Archiv",
        }))
        .expect("event");
        assert!(!f.matches(&e), "no session: matches neither true nor false");
        e.activity = Some(Box::new(Activity {
            user: "a@b.c".into(),
            admin_session: true,
            previous_folder: Some("projekte/Größe".into()),
            ..Default::default()
        }));
        assert!(f.matches(&e), "the source folder of a move counts, ignoring case");
        e.activity.as_mut().expect("set").admin_session = false;
        assert!(!f.matches(&e));
        let bad = CompiledFilter::compile(&spec(MatchCriteria {
            folders: vec![" ".into()],
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(bad.field, "spec.folders[0]");
    }

    #[test]
    fn unordered_size_is_refused_even_if_the_apiserver_let_it_through() {
        let e = CompiledFilter::compile(&spec(MatchCriteria {
            size: Some(SizeRange {
                min_bytes: Some(5),
                max_bytes: Some(1),
            }),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(e.field, "spec.size");
    }
}
