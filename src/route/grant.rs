//! MailboxGrants compiled for routing: which namespaces may receive the events of which
//! mailboxes, and at most how much of each. Routing asks here before it queues anything
//! for a subscription or counts a filter's match, and the delivery path asks again before
//! it sends, so a revoked grant stops what was already queued.

use std::collections::HashMap;
use std::sync::Arc;

use wildmatch::WildMatch;

use crate::api::{EventType, MailboxGrantSpec, PayloadMode};
use crate::event::{MailboxEvent, domain_of};

use super::FilterError;
use super::filter::{ascii_domain, covers, domains, globs};

/// Mailboxes named by globs and whole domains, as grants and legal holds name them.
#[derive(Debug)]
pub struct MailboxSet {
    mailboxes: Vec<WildMatch>,
    /// ASCII form, as filters keep them.
    domains: Vec<String>,
}

impl MailboxSet {
    /// From `spec.mailboxes` and `spec.domains`; an error names the field.
    pub fn compile(mailboxes: &[String], domain_list: &[String]) -> Result<MailboxSet, FilterError> {
        Ok(MailboxSet {
            mailboxes: globs(mailboxes, "spec.mailboxes")?,
            domains: domains(domain_list, "spec.domains")?,
        })
    }

    pub fn contains(&self, mailbox: &str) -> bool {
        if self.mailboxes.iter().any(|g| g.matches(mailbox)) {
            return true;
        }
        !self.domains.is_empty()
            && domain_of(mailbox).is_some_and(|d| {
                let d = ascii_domain(d);
                self.domains.iter().any(|g| covers(g, &d))
            })
    }
}

/// The most a grant lets a namespace see of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    pub mode: PayloadMode,
    pub raw_links: bool,
}

impl Ceiling {
    /// Nothing withheld: what events are sent with when no ceiling applies.
    pub const NONE: Ceiling = Ceiling {
        mode: PayloadMode::Full,
        raw_links: true,
    };

    /// The fuller of two ceilings: several grants covering one event add up.
    pub fn join(self, other: Ceiling) -> Ceiling {
        Ceiling {
            mode: if other.mode.rank() > self.mode.rank() {
                other.mode
            } else {
                self.mode
            },
            raw_links: self.raw_links || other.raw_links,
        }
    }
}

/// One MailboxGrant, compiled.
#[derive(Debug)]
pub struct CompiledGrant {
    pub name: String,
    mailboxes: MailboxSet,
    /// Empty: every type.
    event_types: Vec<EventType>,
    pub ceiling: Ceiling,
}

impl CompiledGrant {
    pub fn compile(name: &str, spec: &MailboxGrantSpec) -> Result<CompiledGrant, FilterError> {
        Ok(CompiledGrant {
            name: name.to_string(),
            mailboxes: MailboxSet::compile(&spec.mailboxes, &spec.domains)?,
            event_types: spec.event_types.clone(),
            ceiling: Ceiling {
                mode: spec.max_payload_mode,
                // The CRD refuses raw links below `full`; an older object is held to it here.
                raw_links: spec.raw_message_links && spec.max_payload_mode == PayloadMode::Full,
            },
        })
    }

    /// Whether the grant covers any of `types` (empty: every type) for some mailbox.
    pub fn takes_any(&self, types: &[EventType]) -> bool {
        self.event_types.is_empty() || types.is_empty() || types.iter().any(|t| self.event_types.contains(t))
    }

    /// Whether the grant covers events of `event_type` for `mailbox`.
    pub fn covers(&self, event_type: EventType, mailbox: &str) -> bool {
        if !self.event_types.is_empty() && !self.event_types.contains(&event_type) {
            return false;
        }
        self.mailboxes.contains(mailbox)
    }
}

/// Every grant by the namespace it covers.
#[derive(Debug, Default)]
pub struct Grants {
    by_namespace: HashMap<String, Vec<Arc<CompiledGrant>>>,
}

impl Grants {
    /// From (covered namespace, grant) pairs.
    pub fn build(pairs: impl IntoIterator<Item = (String, Arc<CompiledGrant>)>) -> Grants {
        let mut by_namespace: HashMap<String, Vec<Arc<CompiledGrant>>> = HashMap::new();
        for (namespace, grant) in pairs {
            let list = by_namespace.entry(namespace).or_default();
            if !list.iter().any(|g| g.name == grant.name) {
                list.push(grant);
            }
        }
        for list in by_namespace.values_mut() {
            list.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Grants { by_namespace }
    }

    /// Every mailbox, every type, at full payload with raw links, for each of
    /// `namespaces`: what tests and benchmarks that are not about grants route under.
    pub fn unrestricted<'n>(namespaces: impl IntoIterator<Item = &'n str>) -> Grants {
        let everything = Arc::new(CompiledGrant {
            name: "unrestricted".into(),
            mailboxes: MailboxSet {
                mailboxes: vec![WildMatch::new("*")],
                domains: Vec::new(),
            },
            event_types: Vec::new(),
            ceiling: Ceiling::NONE,
        });
        Grants::build(namespaces.into_iter().map(|n| (n.to_string(), everything.clone())))
    }

    /// The grants that cover `namespace`, by name.
    pub fn of(&self, namespace: &str) -> &[Arc<CompiledGrant>] {
        self.by_namespace.get(namespace).map_or(&[], Vec::as_slice)
    }

    /// The most `namespace` may see of `event`; None when no grant of it covers the event.
    /// A `compliance.flagged` event is judged by the mailbox of the message flagged.
    pub fn ceiling(&self, namespace: &str, event: &MailboxEvent) -> Option<Ceiling> {
        self.ceiling_for(namespace, event.event_type, &event.mailbox)
    }

    pub fn ceiling_for(&self, namespace: &str, event_type: EventType, mailbox: &str) -> Option<Ceiling> {
        self.of(namespace)
            .iter()
            .filter(|g| g.covers(event_type, mailbox))
            .map(|g| g.ceiling)
            .reduce(Ceiling::join)
    }

    /// The fullest ceiling any grant of `namespace` allows, over every mailbox.
    pub fn widest(&self, namespace: &str) -> Option<Ceiling> {
        self.of(namespace).iter().map(|g| g.ceiling).reduce(Ceiling::join)
    }
}

/// Whether each namespace (by its index in the routing table) was granted one event:
/// routing asks once per namespace, not per subscription — a short list for the few
/// namespaces an event usually concerns, a table when it concerns many.
#[derive(Default)]
pub(super) struct GrantMemo {
    few: Vec<(u32, bool)>,
    /// Per namespace index: 0 not asked yet, 1 not granted, 2 granted.
    many: Vec<u8>,
}

impl GrantMemo {
    const FEW: usize = 16;

    pub(super) fn granted(
        &mut self,
        grants: &Grants,
        (index, namespace): (u32, &str),
        namespaces: usize,
        event: &MailboxEvent,
    ) -> bool {
        if let Some((_, hit)) = self.few.iter().find(|(n, _)| *n == index) {
            return *hit;
        }
        match self.many.get(index as usize) {
            Some(1) => return false,
            Some(2) => return true,
            _ => {}
        }
        let hit = grants.ceiling(namespace, event).is_some();
        if self.few.len() < Self::FEW {
            // One allocation for the whole short list, not one per growth step.
            if self.few.capacity() == 0 {
                self.few.reserve_exact(Self::FEW);
            }
            self.few.push((index, hit));
        } else {
            if self.many.is_empty() {
                self.many = vec![0; namespaces];
            }
            if let Some(slot) = self.many.get_mut(index as usize) {
                *slot = if hit { 2 } else { 1 };
            }
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str, mailboxes: &[&str], domains: &[&str], mode: PayloadMode) -> Arc<CompiledGrant> {
        let spec = MailboxGrantSpec {
            namespaces: vec!["a".into()],
            mailboxes: mailboxes.iter().map(|s| s.to_string()).collect(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
            max_payload_mode: mode,
            raw_message_links: mode == PayloadMode::Full,
            ..Default::default()
        };
        Arc::new(CompiledGrant::compile(name, &spec).expect("compiles"))
    }

    #[test]
    fn the_ceiling_is_per_event_and_grants_add_up() {
        let grants = Grants::build([
            (
                "a".to_string(),
                grant("finance", &["*@finance.example"], &[], PayloadMode::Full),
            ),
            ("a".to_string(), grant("all", &["*"], &[], PayloadMode::Metadata)),
            (
                "b".to_string(),
                grant("sales", &[], &["sales.example"], PayloadMode::Anonymized),
            ),
        ]);
        let t = EventType::MessageReceived;
        let full = Ceiling {
            mode: PayloadMode::Full,
            raw_links: true,
        };
        assert_eq!(grants.ceiling_for("a", t, "cfo@finance.example"), Some(full));
        assert_eq!(
            grants.ceiling_for("a", t, "ceo@example.com").map(|c| c.mode),
            Some(PayloadMode::Metadata)
        );
        assert_eq!(grants.ceiling_for("b", t, "cfo@finance.example"), None);
        assert_eq!(
            grants.ceiling_for("b", t, "x@eu.SALES.example").map(|c| c.mode),
            Some(PayloadMode::Anonymized)
        );
        assert_eq!(grants.ceiling_for("b", t, "x@notsales.example"), None);
        assert_eq!(grants.ceiling_for("c", t, "cfo@finance.example"), None);
        assert_eq!(grants.widest("a"), Some(full));
        assert_eq!(grants.of("a").len(), 2);
    }

    #[test]
    fn event_types_limit_a_grant() {
        let spec = MailboxGrantSpec {
            namespaces: vec!["a".into()],
            mailboxes: vec!["*".into()],
            event_types: vec![EventType::MessageReceived],
            ..Default::default()
        };
        let g = CompiledGrant::compile("g", &spec).expect("compiles");
        assert!(g.covers(EventType::MessageReceived, "x@y.example"));
        assert!(!g.covers(EventType::MessageSent, "x@y.example"));
        assert_eq!(g.ceiling.mode, PayloadMode::Metadata, "the default ceiling is metadata");
    }

    #[test]
    fn a_bad_pattern_names_its_field() {
        let spec = MailboxGrantSpec {
            namespaces: vec!["a".into()],
            domains: vec!["not a domain".into()],
            ..Default::default()
        };
        let e = CompiledGrant::compile("g", &spec).expect_err("refused");
        assert_eq!(e.field, "spec.domains[0]");
    }
}
