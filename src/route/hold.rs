//! LegalHolds compiled for the ingest path and the purges: which mailboxes' records are
//! kept past retention, and archived whether or not a subscription asks for them.

use std::sync::Arc;

use crate::api::LegalHoldSpec;

use super::grant::MailboxSet;
use super::{FilterError, Problem};

/// One LegalHold, compiled.
#[derive(Debug)]
pub struct CompiledHold {
    pub name: String,
    mailboxes: MailboxSet,
    from: Option<jiff::Timestamp>,
    until: Option<jiff::Timestamp>,
}

impl CompiledHold {
    /// An error names the field and what is wrong with it.
    pub fn compile(name: &str, spec: &LegalHoldSpec) -> Result<CompiledHold, FilterError> {
        let time = |field: &str, text: &Option<String>| -> Result<Option<jiff::Timestamp>, FilterError> {
            text.as_deref()
                .map(|t| {
                    t.parse::<jiff::Timestamp>().map_err(|e| FilterError {
                        field: field.to_string(),
                        kind: Problem::Invalid,
                        problem: format!("{t:?} is not an RFC 3339 time ({e}); write e.g. 2026-01-31T00:00:00Z"),
                    })
                })
                .transpose()
        };
        let hold = CompiledHold {
            name: name.to_string(),
            mailboxes: MailboxSet::compile(&spec.mailboxes, &spec.domains)?,
            from: time("spec.from", &spec.from)?,
            until: time("spec.until", &spec.until)?,
        };
        if let (Some(from), Some(until)) = (hold.from, hold.until)
            && from >= until
        {
            return Err(FilterError {
                field: "spec.until".into(),
                problem: "must be after spec.from".into(),
                kind: Problem::Invalid,
            });
        }
        Ok(hold)
    }

    /// Whether the hold keeps a record of `mailbox` made at `at`.
    pub fn holds(&self, mailbox: &str, at: jiff::Timestamp) -> bool {
        self.from.is_none_or(|from| at >= from)
            && self.until.is_none_or(|until| at < until)
            && self.mailboxes.contains(mailbox)
    }
}

/// Every hold in force.
#[derive(Debug, Default, Clone)]
pub struct HoldSet {
    holds: Vec<Arc<CompiledHold>>,
}

impl HoldSet {
    pub fn new(holds: Vec<Arc<CompiledHold>>) -> HoldSet {
        HoldSet { holds }
    }

    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }

    /// The holds that keep a record of `mailbox` made at `at`.
    pub fn holding(&self, mailbox: &str, at: jiff::Timestamp) -> impl Iterator<Item = &str> {
        self.holds
            .iter()
            .filter(move |h| h.holds(mailbox, at))
            .map(|h| h.name.as_str())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.holds.iter().map(|h| h.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mailboxes: &[&str], domains: &[&str]) -> LegalHoldSpec {
        LegalHoldSpec {
            mailboxes: mailboxes.iter().map(|s| s.to_string()).collect(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
            reason: "matter 1".into(),
            requested_by: "legal".into(),
            ..Default::default()
        }
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn a_hold_keeps_its_mailboxes_and_domains_within_its_range() {
        let mut s = spec(&["Zoë@Example.com"], &["legal.example.org"]);
        s.from = Some("2026-01-01T00:00:00Z".into());
        s.until = Some("2026-02-01T00:00:00Z".into());
        let hold = CompiledHold::compile("h", &s).expect("valid");
        let inside = at("2026-01-15T00:00:00Z");
        assert!(hold.holds("zoë@example.com", inside));
        assert!(hold.holds("bob@team.legal.example.org", inside));
        assert!(!hold.holds("bob@example.com", inside));
        assert!(!hold.holds("zoë@example.com", at("2025-12-31T23:59:59Z")));
        assert!(
            !hold.holds("zoë@example.com", at("2026-02-01T00:00:00Z")),
            "until is exclusive"
        );
        let set = HoldSet::new(vec![Arc::new(hold)]);
        assert_eq!(set.holding("zoë@example.com", inside).collect::<Vec<_>>(), ["h"]);
    }

    #[test]
    fn a_bad_hold_names_the_field() {
        let mut s = spec(&["a@example.com"], &[]);
        s.from = Some("yesterday".into());
        let e = CompiledHold::compile("h", &s).expect_err("refused");
        assert_eq!(e.field, "spec.from");
        let e = CompiledHold::compile("h", &spec(&[], &["not a domain"])).expect_err("refused");
        assert_eq!(e.field, "spec.domains[0]");
        let mut s = spec(&["a@example.com"], &[]);
        s.from = Some("2026-02-01T00:00:00Z".into());
        s.until = Some("2026-01-01T00:00:00Z".into());
        assert_eq!(CompiledHold::compile("h", &s).expect_err("refused").field, "spec.until");
    }
}
