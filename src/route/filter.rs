//! A MailboxFilter compiled once per change: globs and regexes parsed, lists lowered, so
//! that an invalid filter is reported on its status instead of failing per event.

use regex_automata::meta::Regex;
use wildmatch::WildMatch;

use crate::api::{
    AclMatch, Direction, EventType, ForwardingMatch, HeaderMatch, MailboxFilterSpec, MatchCriteria, Severity,
};
use crate::event::{MailboxEvent, domain_of};

/// Why a filter cannot be compiled: the field at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FilterError {
    /// JSON path of the offending field, e.g. `spec.subject.regex`.
    pub field: String,
    pub problem: String,
    pub kind: Problem,
}

/// What kind of fault a `FilterError` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Not a valid pattern, domain, header name or range.
    Invalid,
    /// Valid, but over a `FilterBudget` limit.
    OverBudget,
}

/// What one MailboxFilter may cost to compile and keep (flags of `mailhook run`). Each
/// filter is judged on its own spec, so its validity never depends on its neighbours;
/// the memory of a namespace is bounded by `max_per_namespace * max_compiled_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterBudget {
    /// Regular expressions per filter (subject and header regexes, exclude included).
    pub max_regexes: usize,
    /// Compiled size of one regex, and the lazy DFA cache it may grow per search.
    pub max_regex_bytes: usize,
    /// Memory a filter's compiled regexes take together.
    pub max_compiled_bytes: usize,
    /// Filters per namespace; the newest beyond it are refused.
    pub max_per_namespace: usize,
}

impl Default for FilterBudget {
    fn default() -> FilterBudget {
        FilterBudget {
            max_regexes: 16,
            max_regex_bytes: 256 * 1024,
            max_compiled_bytes: 1024 * 1024,
            max_per_namespace: 100,
        }
    }
}

/// The longest part of a subject or header value that filters look at: matching cost
/// stays bounded whatever a message carries (a longer value is matched by its start).
pub const MAX_MATCHED_TEXT: usize = 16 * 1024;

/// `text` cut to at most `MAX_MATCHED_TEXT` bytes, on a character boundary.
pub fn matched_part(text: &str) -> &str {
    if text.len() <= MAX_MATCHED_TEXT {
        return text;
    }
    let mut end = MAX_MATCHED_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

/// The regex budget as compilation spends it.
struct Meter {
    budget: FilterBudget,
    /// Heap bytes of the regexes compiled so far.
    used: usize,
}

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
    pub forwarding: Option<ForwardingMatch>,
    pub acl: Option<AclMatch>,
    /// In a filter's own criteria, absent means `false` (mailhook's own sessions are left
    /// out); in `exclude`, absent removes nothing.
    pub mailhook_sessions: Option<bool>,
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
    /// Compiles within the default budget.
    pub fn compile(spec: &MailboxFilterSpec) -> Result<CompiledFilter, FilterError> {
        CompiledFilter::compile_within(spec, FilterBudget::default())
    }

    /// Compiles `spec`, refusing it (`Problem::OverBudget`) past any limit of `budget`
    /// but the per-namespace count, which is not the spec's. Can take a while: callers
    /// on an async runtime run it on a blocking thread.
    pub fn compile_within(spec: &MailboxFilterSpec, budget: FilterBudget) -> Result<CompiledFilter, FilterError> {
        // Counted before anything is compiled: an over-long list costs nothing.
        let regexes = regex_fields(spec);
        if let Some((field, _)) = regexes.get(budget.max_regexes) {
            return Err(over_budget(
                field.clone(),
                format!(
                    "the filter has {} regular expressions (subject.regex and headers[].regex, exclude included), more than the limit of {} per filter (--filter-max-regexes); combine them with | or use subject.keywords and header value globs",
                    regexes.len(),
                    budget.max_regexes
                ),
            ));
        }
        let mut meter = Meter { budget, used: 0 };
        Ok(CompiledFilter {
            include: {
                let mut include = CompiledCriteria::compile(&spec.criteria, "spec", &mut meter)?;
                include.mailhook_sessions = Some(include.mailhook_sessions.unwrap_or(false));
                include
            },
            exclude: spec
                .exclude
                .as_ref()
                .map(|c| CompiledCriteria::compile(c, "spec.exclude", &mut meter))
                .transpose()?,
            flag: spec.flag.as_ref().map(|f| (f.name.clone(), f.severity)),
        })
    }
}

/// Every regex of `spec` with its field, in the order they are compiled.
fn regex_fields(spec: &MailboxFilterSpec) -> Vec<(String, &str)> {
    fn add<'a>(out: &mut Vec<(String, &'a str)>, c: &'a MatchCriteria, at: &str) {
        if let Some(r) = c.subject.as_ref().and_then(|s| s.regex.as_deref()) {
            out.push((format!("{at}.subject.regex"), r));
        }
        for (i, h) in c.headers.iter().enumerate() {
            if let Some(r) = h.regex.as_deref() {
                out.push((format!("{at}.headers[{i}].regex"), r));
            }
        }
    }
    let mut out = Vec::new();
    add(&mut out, &spec.criteria, "spec");
    if let Some(x) = &spec.exclude {
        add(&mut out, x, "spec.exclude");
    }
    out
}

impl CompiledCriteria {
    fn compile(c: &MatchCriteria, at: &str, meter: &mut Meter) -> Result<CompiledCriteria, FilterError> {
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
                .map(|r| regex(r, &format!("{at}.subject.regex"), meter))
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
                .map(|(i, h)| header(h, &format!("{at}.headers[{i}]"), meter))
                .collect::<Result<_, _>>()?,
            folders: folder_globs(&c.folders, &format!("{at}.folders"))?,
            admin_session: c.admin_session,
            forwarding: c.forwarding,
            acl: c.acl,
            mailhook_sessions: c.mailhook_sessions,
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
            .get_or_init(|| self.event.subject.as_deref().map(|s| matched_part(s).to_lowercase()))
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
            && self.forwarding.is_none()
            && self.acl.is_none()
            && self.mailhook_sessions.is_none()
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
            && self
                .mailhook_sessions
                .is_none_or(|ours| e.activity.as_ref().is_some_and(|a| a.mailhook_session) == ours)
            && self.forwarding.is_none_or(|want| {
                let forwarding = e.activity.as_ref().and_then(|a| a.change.as_ref()?.forwarding.as_ref());
                forwarding.is_some_and(|f| match want {
                    ForwardingMatch::External => f.external,
                    ForwardingMatch::Any => f.external || !f.targets.is_empty() || !f.unresolved.is_empty(),
                })
            })
            && self.acl.is_none_or(|want| {
                let acl = e.activity.as_ref().and_then(|a| a.change.as_ref()?.acl.as_ref());
                acl.is_some_and(|g| match want {
                    AclMatch::Granted => g.granted,
                    AclMatch::ReadGranted => g.read_granted,
                })
            })
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
        let Some(subject) = p.event.subject.as_deref().map(matched_part) else {
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
        match (e.headers.get(&self.name).map(|v| matched_part(v)), &self.value) {
            (None, _) => false,
            (Some(_), HeaderValueMatch::Present) => true,
            (Some(v), HeaderValueMatch::Glob(g)) => g.matches(v),
            (Some(v), HeaderValueMatch::Regex(r)) => r.is_match(v),
        }
    }
}

fn err(field: String, problem: String) -> FilterError {
    FilterError {
        field,
        problem,
        kind: Problem::Invalid,
    }
}

fn over_budget(field: String, problem: String) -> FilterError {
    FilterError {
        field,
        problem,
        kind: Problem::OverBudget,
    }
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

/// Compiles one regex as `regex::Regex` would (leftmost-first, UTF-8), within the
/// budget: its own size limit, then what the filter's regexes take together.
fn regex(pattern: &str, field: &str, meter: &mut Meter) -> Result<Regex, FilterError> {
    use regex_automata::{MatchKind, meta, util::syntax};
    let limit = meter.budget.max_regex_bytes;
    let config = meta::Config::new()
        .match_kind(MatchKind::LeftmostFirst)
        .utf8_empty(true)
        .nfa_size_limit(Some(limit))
        .onepass_size_limit(Some(limit))
        .dfa_size_limit(Some(limit))
        .hybrid_cache_capacity(limit);
    let built = meta::Builder::new()
        .configure(config)
        .syntax(syntax::Config::new().utf8(true))
        .build(pattern);
    let re = match built {
        Ok(re) => re,
        Err(e) if e.size_limit().is_some() => {
            return Err(over_budget(
                field.to_string(),
                format!(
                    "the expression compiles to more than the limit of {limit} bytes per regex (--filter-max-regex-bytes); simplify it: fewer or smaller counted repetitions ({{n}}), ASCII classes such as (?-u:\\w) instead of Unicode ones, or subject.keywords"
                ),
            ));
        }
        Err(e) => {
            // The syntax error's message spans several lines; status wants one.
            let text = e.syntax_error().map_or_else(|| e.to_string(), ToString::to_string);
            let detail = text.lines().last().unwrap_or_default().trim().to_string();
            return Err(err(
                field.to_string(),
                format!(
                    "{pattern:?} is not a valid regular expression ({detail}); fix the expression or use subject.keywords"
                ),
            ));
        }
    };
    meter.used = meter.used.saturating_add(re.memory_usage());
    if meter.used > meter.budget.max_compiled_bytes {
        return Err(over_budget(
            field.to_string(),
            format!(
                "with this expression the filter's regular expressions take {} bytes compiled, more than the limit of {} per filter (--filter-max-compiled-bytes); simplify them or split the filter",
                meter.used, meter.budget.max_compiled_bytes
            ),
        ));
    }
    Ok(re)
}

fn header(h: &HeaderMatch, field: &str, meter: &mut Meter) -> Result<CompiledHeader, FilterError> {
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
        (None, Some(r)) => HeaderValueMatch::Regex(regex(r, &format!("{field}.regex"), meter)?),
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

    fn regexes(n: usize, exclude: usize) -> MailboxFilterSpec {
        let headers = |n: usize| {
            (0..n)
                .map(|i| HeaderMatch {
                    name: format!("X-H{i}"),
                    regex: Some(format!("^v{i}$")),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
        };
        MailboxFilterSpec {
            criteria: MatchCriteria {
                subject: Some(SubjectMatch {
                    keywords: vec![],
                    regex: Some("invoice".into()),
                }),
                headers: headers(n.saturating_sub(1)),
                ..Default::default()
            },
            exclude: (exclude > 0).then(|| MatchCriteria {
                headers: headers(exclude),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn regex_count_is_checked_before_compiling_and_names_the_first_one_over() {
        let budget = FilterBudget {
            max_regexes: 4,
            ..Default::default()
        };
        assert!(CompiledFilter::compile_within(&regexes(4, 0), budget).is_ok());
        let e = CompiledFilter::compile_within(&regexes(3, 2), budget).unwrap_err();
        assert_eq!(e.kind, Problem::OverBudget);
        // subject, headers[0..1] of spec, then exclude's headers[0] is the 4th, [1] the 5th.
        assert_eq!(e.field, "spec.exclude.headers[1].regex");
        assert!(e.problem.contains("5 regular expressions"), "{e}");
        assert!(
            e.problem.contains("limit of 4 per filter (--filter-max-regexes)"),
            "{e}"
        );
        // Even an invalid pattern past the limit is not compiled: the count is reported.
        let mut s = regexes(3, 2);
        if let Some(x) = s.exclude.as_mut() {
            x.headers[1].regex = Some("([unclosed".into());
        }
        assert_eq!(
            CompiledFilter::compile_within(&s, budget).unwrap_err().kind,
            Problem::OverBudget
        );
    }

    #[test]
    fn a_regex_over_its_size_limit_is_over_budget_not_invalid() {
        let budget = FilterBudget {
            max_regex_bytes: 64 * 1024,
            ..Default::default()
        };
        let s = spec(MatchCriteria {
            headers: vec![HeaderMatch {
                name: "X-Tag".into(),
                regex: Some(r"\w{1,200}".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        let e = CompiledFilter::compile_within(&s, budget).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (Problem::OverBudget, "spec.headers[0].regex")
        );
        assert!(
            e.problem
                .contains("limit of 65536 bytes per regex (--filter-max-regex-bytes)"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'), "one line for status: {e}");
        // The same expression over ASCII fits.
        let mut ascii = s.clone();
        ascii.criteria.headers[0].regex = Some(r"(?-u:\w){1,200}".into());
        assert!(CompiledFilter::compile_within(&ascii, budget).is_ok());
    }

    #[test]
    fn regexes_together_are_held_to_the_compiled_bytes_limit() {
        let s = regexes(3, 0);
        let used: usize = {
            let f = CompiledFilter::compile_within(&s, FilterBudget::default()).expect("compiles");
            let headers: usize = f
                .include
                .headers
                .iter()
                .map(|h| match &h.value {
                    HeaderValueMatch::Regex(r) => r.memory_usage(),
                    _ => 0,
                })
                .sum();
            headers + f.include.subject_regex.as_ref().map_or(0, Regex::memory_usage)
        };
        let fits = FilterBudget {
            max_compiled_bytes: used,
            ..Default::default()
        };
        assert!(CompiledFilter::compile_within(&s, fits).is_ok());
        let short = FilterBudget {
            max_compiled_bytes: used - 1,
            ..Default::default()
        };
        let e = CompiledFilter::compile_within(&s, short).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_str()),
            (Problem::OverBudget, "spec.headers[1].regex")
        );
        assert!(e.problem.contains("(--filter-max-compiled-bytes)"), "{e}");
    }

    #[test]
    fn typical_expressions_fit_the_default_budget() {
        let budget = FilterBudget::default();
        for re in [
            "(?i)wire\\s+transfer",
            "(?i)^(re|fwd?):\\s*invoice\\s+#?\\d{4,10}",
            "^[A-Z]{2}\\d{2}[A-Z0-9]{10,30}$",
            "(?i)\\b(urgent|confidential|vertraulich)\\b",
        ] {
            let s = spec(MatchCriteria {
                subject: Some(SubjectMatch {
                    keywords: vec![],
                    regex: Some(re.into()),
                }),
                ..Default::default()
            });
            assert!(CompiledFilter::compile_within(&s, budget).is_ok(), "{re}");
        }
        // Sixteen of them, as the count allows.
        let many = regexes(budget.max_regexes, 0);
        assert!(CompiledFilter::compile_within(&many, budget).is_ok());
    }

    #[test]
    fn only_the_start_of_long_subjects_and_header_values_is_matched() {
        let f = CompiledFilter::compile(&spec(MatchCriteria {
            subject: Some(SubjectMatch {
                keywords: vec!["tail".into()],
                regex: Some("end$".into()),
            }),
            ..Default::default()
        }))
        .expect("compiles");
        let mut e: MailboxEvent = serde_json::from_value(serde_json::json!({
            "id": "e", "type": "message.received", "occurredAt": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z", "source": "http", "mailbox": "a@b.c",
        }))
        .expect("event");
        e.subject = Some(format!("{} tail end", "ä".repeat(MAX_MATCHED_TEXT)));
        assert!(!f.matches(&e), "past the first {MAX_MATCHED_TEXT} bytes");
        e.subject = Some("short tail".into());
        assert!(f.matches(&e));
        let cut = matched_part("äää");
        assert_eq!(cut, "äää");
        let long = "ä".repeat(MAX_MATCHED_TEXT);
        assert!(matched_part(&long).len() <= MAX_MATCHED_TEXT);
        assert!(matched_part(&long).len() >= MAX_MATCHED_TEXT - 1);
    }
}
