//! When each source and producer was last heard from: the pipeline records it per batch
//! (`SourceActivity`), and one task exports it as
//! `mailhook_source_last_event_timestamp_seconds` and keeps it in the store's keyed rows,
//! so that replicas sharing a store agree and a restart does not forget a feed that has
//! gone silent (a silent feed sends nothing that would tell a fresh process about it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{MailboxEvent, Source};
use crate::handles::{HeardFrom, SourceActivity};
use crate::store::StoreError;
use crate::store::rows::{Row, RowWrite, Rows};

/// The row group. It starts with a control character, which no Dovecot user name holds,
/// so the mailbox index (one group per user) never takes it for a mailbox.
pub const GROUP: &str = "\u{1}source-seen"; // = store::reserved_group("source-seen")

/// The producer of the SMTP journal feed: one feed, whichever MTA sends it.
pub const JOURNAL: &str = "journal";

/// How often the times are written to the store (per producer at most) and read back.
pub const PERSIST_EVERY: Duration = Duration::from_secs(15);

/// How often the gauge follows what the pipeline recorded.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Who produced `event`, for the silence check: the credential of an HTTP (or Dovecot)
/// event, `journal` for the SMTP feed; None for what no producer sent (derived events,
/// the Dovecot reconciler's findings).
pub fn producer_of(event: &MailboxEvent) -> Option<(&'static str, &str)> {
    match event.source {
        Source::Smtp => Some((Source::Smtp.as_str(), JOURNAL)),
        Source::Http | Source::Dovecot => event
            .producer_scope
            .as_deref()
            .map(|scope| (event.source.as_str(), scope)),
        Source::Router => None,
    }
}

/// The source name as `SourceActivity` keys it, for a name read back from the store.
fn known_source(name: &str) -> Option<&'static str> {
    [Source::Smtp, Source::Http, Source::Dovecot]
        .into_iter()
        .map(Source::as_str)
        .find(|s| *s == name)
}

/// What a row holds.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_event_at: jiff::Timestamp,
}

/// The row key of a producer: `<source>/<producer>` (credential names hold no `/`).
fn key(source: &str, producer: &str) -> Vec<u8> {
    format!("{source}/{producer}").into_bytes()
}

/// (source, producer, unix seconds) of a row this module wrote; None for anything else.
fn parse(row: &Row) -> Option<(&'static str, String, i64)> {
    let key = std::str::from_utf8(&row.key).ok()?;
    let (source, producer) = key.split_once('/')?;
    let body: Body = serde_json::from_slice(&row.body).ok()?;
    Some((
        known_source(source)?,
        producer.to_string(),
        body.last_event_at.as_second(),
    ))
}

/// The writes that bring the store up to date: one per producer heard from since its
/// time was last stored. Called every `PERSIST_EVERY`, so a producer is written at most
/// that often however many events it sends. Pure.
fn due(heard: &[HeardFrom]) -> Vec<RowWrite> {
    heard
        .iter()
        .filter(|h| h.last > h.stored)
        .filter_map(|h| {
            let last_event_at = jiff::Timestamp::from_second(h.last).ok()?;
            let body = serde_json::to_vec(&Body { last_event_at }).ok()?;
            Some(RowWrite::Put {
                group: GROUP.to_string(),
                row: Row {
                    key: key(h.source, &h.producer),
                    at: h.last,
                    body,
                },
            })
        })
        .collect()
}

/// Reads the stored times into `activity`, then writes those it has newer. Blocking.
fn sync(activity: &SourceActivity, rows: &dyn Rows) -> Result<usize, StoreError> {
    for (source, producer, at) in rows.rows(GROUP, b"")?.iter().filter_map(parse) {
        activity.merge_stored(source, &producer, at);
    }
    let heard = activity.snapshot();
    let writes = due(&heard);
    if writes.is_empty() {
        return Ok(0);
    }
    let n = writes.len();
    rows.write_rows(writes)?;
    for h in heard.iter().filter(|h| h.last > h.stored) {
        activity.merge_stored(h.source, &h.producer, h.last);
    }
    Ok(n)
}

/// Exports and persists `activity` until `stop`: reads the stored times at start (so the
/// gauge shows a feed that was silent before the restart), follows the pipeline every
/// second, and syncs with the store every `PERSIST_EVERY` (off the ingest path).
pub async fn keep(
    activity: Arc<SourceActivity>,
    rows: Arc<dyn Rows>,
    gauge: prometheus::IntGaugeVec,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut exported: HashMap<(&'static str, String), (prometheus::IntGauge, i64)> = HashMap::new();
    let mut persist = tokio::time::interval(PERSIST_EVERY);
    let mut export = tokio::time::interval(EXPORT_EVERY);
    persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    export.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = persist.tick() => {
                let (activity, rows) = (activity.clone(), rows.clone());
                match tokio::task::spawn_blocking(move || sync(&activity, rows.as_ref())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => tracing::warn!(%err, "cannot keep the sources' last event times in the store; will retry"),
                    Err(err) => tracing::warn!(%err, "keeping the sources' last event times stopped unexpectedly; will retry"),
                }
            }
            _ = export.tick() => {}
        }
        for h in activity.snapshot().into_iter().filter(|h| h.last > 0) {
            let (gauge, set) = exported
                .entry((h.source, h.producer))
                .or_insert_with_key(|(source, producer)| (gauge.with_label_values(&[*source, producer.as_str()]), 0));
            if *set != h.last {
                gauge.set(h.last);
                *set = h.last;
            }
        }
    }
    // What came in since the last sync is not lost to a restart.
    match tokio::task::spawn_blocking(move || sync(&activity, rows.as_ref())).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => {
            tracing::warn!(%err, "cannot keep the sources' last event times at shutdown; they are as of the last sync")
        }
        Err(err) => tracing::warn!(%err, "keeping the sources' last event times at shutdown stopped unexpectedly"),
    }
}

/// The times' behaviour on a real store; run on every backend (the PostgreSQL ones from
/// `tests/postgres`). Test support, not API.
#[doc(hidden)]
pub mod conformance {
    use super::*;
    use crate::store::Store;

    /// Two replicas share their times through the store, the newest wins, a restart reads
    /// them back, and the rows stay apart from the Dovecot mailbox index (not a mailbox to
    /// reconcile, never purged by its retention).
    pub fn times_are_shared_kept_and_apart_from_the_index(s: &dyn Store) {
        let (a, b) = (SourceActivity::default(), SourceActivity::default());
        a.producer("smtp", JOURNAL).heard(1_000);
        b.producer("smtp", JOURNAL).heard(1_500);
        b.producer("dovecot", "imap-eu").heard(1_200);
        assert_eq!(sync(&a, s).expect("sync"), 1);
        assert_eq!(sync(&b, s).expect("sync"), 2);
        assert_eq!(sync(&a, s).expect("sync"), 0, "nothing newer to write");
        assert_eq!(a.last("smtp", JOURNAL), Some(1_500));
        assert_eq!(a.last("dovecot", "imap-eu"), Some(1_200));

        let restarted = SourceActivity::default();
        assert_eq!(sync(&restarted, s).expect("sync"), 0);
        assert_eq!(restarted.snapshot().len(), 2);
        assert_eq!(restarted.last("smtp", JOURNAL), Some(1_500));

        let users = crate::source::dovecot::index::users(s).expect("users");
        assert!(!users.iter().any(|u| u == GROUP), "{users:?}");
        crate::source::dovecot::index::purge(s, jiff::Timestamp::now()).expect("purge");
        assert_eq!(s.rows(GROUP, b"").expect("rows").len(), 2, "not the index's to purge");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heard(source: &'static str, producer: &str, last: i64, stored: i64) -> HeardFrom {
        HeardFrom {
            source,
            producer: producer.into(),
            last,
            stored,
        }
    }

    #[test]
    fn only_producers_heard_since_their_last_write_are_written() {
        let writes = due(&[
            heard("smtp", JOURNAL, 1_000, 990),
            heard("http", "crm", 500, 500),
            heard("dovecot", "imap-1", 0, 0),
        ]);
        assert_eq!(writes.len(), 1, "one write per producer with news, none for the rest");
        let RowWrite::Put { group, row } = &writes[0] else {
            panic!("a put")
        };
        assert_eq!(
            (group.as_str(), row.key.as_slice(), row.at),
            (GROUP, &b"smtp/journal"[..], 1_000)
        );
        assert_eq!(parse(row), Some(("smtp", JOURNAL.to_string(), 1_000)));
    }

    #[test]
    fn rows_of_other_shapes_are_skipped() {
        let row = |key: &[u8], body: &[u8]| Row {
            key: key.to_vec(),
            at: 1,
            body: body.to_vec(),
        };
        assert_eq!(parse(&row(b"smtp/journal", b"{}")), None);
        assert_eq!(
            parse(&row(b"fax/x", br#"{"lastEventAt":"2026-01-01T00:00:00Z"}"#)),
            None
        );
        assert_eq!(parse(&row(b"INBOX\0", b"{}")), None);
        assert_eq!(
            parse(&row(b"http/crm", br#"{"lastEventAt":"1970-01-01T00:16:40Z"}"#)),
            Some(("http", "crm".to_string(), 1_000))
        );
    }

    #[test]
    fn a_sync_writes_news_once_and_merges_what_others_stored() {
        let store = crate::store::DurableStore::in_memory().expect("store");
        let activity = SourceActivity::default();
        activity.producer("smtp", JOURNAL).heard(2_000);
        assert_eq!(sync(&activity, &store).expect("sync"), 1);
        assert_eq!(sync(&activity, &store).expect("sync"), 0, "throttled: nothing new");
        // Another replica heard the journal later and a producer this one never saw.
        let other = SourceActivity::default();
        other.producer("smtp", JOURNAL).heard(3_000);
        other.producer("http", "crm").heard(2_500);
        assert_eq!(sync(&other, &store).expect("sync"), 2);
        sync(&activity, &store).expect("sync");
        assert_eq!(activity.last("smtp", JOURNAL), Some(3_000));
        assert_eq!(activity.last("http", "crm"), Some(2_500));
        assert_eq!(activity.last("dovecot", "x"), None);
    }

    #[test]
    fn times_on_the_embedded_stores() {
        conformance::times_are_shared_kept_and_apart_from_the_index(
            &crate::store::DurableStore::in_memory().expect("store"),
        );
        conformance::times_are_shared_kept_and_apart_from_the_index(
            &crate::store::PagedStore::in_memory().expect("store"),
        );
    }

    #[test]
    fn producers_by_source() {
        let mut e = crate::store::conformance::event("evt_1", None);
        e.source = Source::Smtp;
        e.producer_scope = Some("ab12".into());
        assert_eq!(producer_of(&e), Some(("smtp", JOURNAL)), "not the message's hash");
        e.source = Source::Http;
        e.producer_scope = Some("crm".into());
        assert_eq!(producer_of(&e), Some(("http", "crm")));
        e.source = Source::Dovecot;
        e.producer_scope = None;
        assert_eq!(producer_of(&e), None, "the reconciler's findings name no producer");
        e.source = Source::Router;
        assert_eq!(producer_of(&e), None);
    }
}
