//! Per-event cost budgets that do not depend on wall time (these machines are shared and
//! noisy): heap allocations counted by a counting allocator on this thread, for the work
//! every event or delivery repeats — routing among 10,000 compiled MailboxFilters in 100
//! namespaces, rendering and signing a delivery in each wire format. Counts are
//! deterministic, so a budget a little above today's figure fails on a real regression
//! (a clone per filter, a JSON tree per payload) and never on a busy machine. The figures
//! are printed (`cargo test --test budget -- --nocapture`) and kept in BENCHMARKS.md.
//! The same allocator follows the bytes live at once, for what one message may cost: a
//! journal report's peak memory must grow linearly in its recipients.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use mailhook::api::PayloadMode;
use mailhook::delivery::payload::PayloadConfig;
use mailhook::delivery::signing::{self, SigningKey};
use mailhook::delivery::wire::{self, Format, Item, WireConfig};
use mailhook::event::MailboxEvent;
use mailhook::route::Ceiling;

#[path = "common/tenants.rs"]
mod tenants;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated on this thread and not yet freed (may go below zero when another
    /// thread frees what this one allocated), and the most seen since `reset_peak`.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        live(-(layout.size() as i64));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        live(-(layout.size() as i64));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    // A thread-local access can itself fail during thread teardown: then do not count.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|b| b.set(b.get() + size as u64));
    live(size as i64);
}

fn live(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

/// The most bytes live at once on this thread while `work` ran, above what was live before.
fn peak_during(work: impl FnOnce()) -> u64 {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    work();
    (PEAK.with(Cell::get) - base).max(0) as u64
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations (count, bytes) per call of `work`, averaged over `n` calls on this thread.
fn per_call(n: u64, mut work: impl FnMut()) -> (f64, f64) {
    work(); // warm caches (thread-locals, lazy statics) outside the count
    let (a0, b0) = (ALLOCATIONS.with(Cell::get), BYTES.with(Cell::get));
    for _ in 0..n {
        work();
    }
    let (a1, b1) = (ALLOCATIONS.with(Cell::get), BYTES.with(Cell::get));
    ((a1 - a0) as f64 / n as f64, (b1 - b0) as f64 / n as f64)
}

fn event(mailbox: &str) -> MailboxEvent {
    serde_json::from_value(serde_json::json!({
        "id": "evt_019a0000000070008000000000000001", "type": "message.received",
        "occurredAt": "2026-12-05T08:00:00Z", "receivedAt": "2026-12-05T08:00:00Z", "source": "http",
        "mailbox": mailbox, "from": "sender@partner.example", "to": [mailbox], "cc": ["audit@finance.example"],
        "subject": "Quarterly figures – draft", "size": 20480, "folder": "INBOX",
        "attachments": [{"name": "figures.xlsx", "contentType": "application/vnd.ms-excel", "size": 4096}]
    }))
    .expect("event")
}

fn payload(mode: PayloadMode) -> PayloadConfig {
    PayloadConfig {
        mode,
        redact: vec![],
        pseudonym_key: vec![7; 32],
        raw_links: None,
        subscription: "sub".into(),
    }
}

/// (what, allocations per call, bytes per call) at most: today's counts (BENCHMARKS.md)
/// plus headroom for a small change. Raise one only with the reason in the commit.
const BUDGETS: &[(&str, f64, f64)] = &[
    // With the domain index an event touches the filters of its mailbox's domain only
    // (before it: 1 allocation of 10,000 bytes, a table sized by the filter count).
    ("route: 10,000 filters, a domain no filter names", 4.0, 1_000.0),
    ("route: 10,000 filters, one subscription matches", 16.0, 2_000.0),
    // A mailbox the index cannot judge (no `@`): every filter is evaluated.
    ("route: 10,000 filters, every one evaluated", 10.0, 16_000.0),
    ("deliver: Standard Webhooks full, HMAC", 28.0, 5_000.0),
    ("deliver: Standard Webhooks anonymized, HMAC", 50.0, 6_000.0),
    ("deliver: CloudEvents binary full, HMAC", 64.0, 5_000.0),
    ("deliver: CloudEvents batch of 10, HMAC (per event)", 32.0, 7_000.0),
];

#[test]
fn per_event_allocations_stay_within_budget() {
    let table = tenants::table(tenants::Domains::PerFilter);
    let miss = event("nobody@elsewhere.example");
    let mut hit = event("ceo@t42-7.example");
    hit.subject = Some("Re: project-7 status".into());
    let unjudged = event("postmaster");
    assert!(table.route(&miss).targets.is_empty());
    assert!(table.route(&unjudged).targets.is_empty());
    assert_eq!(
        table.route(&hit).targets.len(),
        1,
        "one subscription uses filter f7 of tenant-42"
    );

    let keys = vec![SigningKey::Hmac(vec![9; 32])];
    let filters = vec!["f7".to_string()];
    let sign = |request: wire::Request| {
        let header = signing::signature_header(&keys, &request.id, 1_764_921_600, &request.body);
        std::hint::black_box((header, request));
    };
    let wire = |format, batched| WireConfig {
        format,
        encryption: None,
        instance: "budget".into(),
        batched,
    };
    let delivery = |cfg: &WireConfig, p: &PayloadConfig, events: &[MailboxEvent]| {
        let items: Vec<Item<'_>> = events
            .iter()
            .map(|e| Item {
                event: e,
                matched_filters: &filters,
                webhook_id: "msg_0123456789abcdef0123456789abcdef".into(),
                ceiling: Ceiling::NONE,
            })
            .collect();
        sign(wire::request(cfg, p, &items).expect("request"));
    };
    let one = [hit.clone()];
    let ten: Vec<MailboxEvent> = (0..10).map(|_| hit.clone()).collect();
    let full = payload(PayloadMode::Full);
    let anonymized = payload(PayloadMode::Anonymized);
    let sw = wire(Format::StandardWebhooks, false);
    let ce = wire(Format::CloudEvents { structured: false }, false);
    let batch = wire(Format::CloudEvents { structured: true }, true);

    let measured = [
        per_call(200, || {
            std::hint::black_box(table.route(&miss));
        }),
        per_call(200, || {
            std::hint::black_box(table.route(&hit));
        }),
        per_call(50, || {
            std::hint::black_box(table.route(&unjudged));
        }),
        per_call(200, || delivery(&sw, &full, &one)),
        per_call(200, || delivery(&sw, &anonymized, &one)),
        per_call(200, || delivery(&ce, &full, &one)),
        {
            let (a, b) = per_call(50, || delivery(&batch, &full, &ten));
            (a / 10.0, b / 10.0)
        },
    ];
    let mut over = Vec::new();
    for ((what, count, size), (allocations, bytes)) in BUDGETS.iter().zip(measured) {
        println!("{what}: {allocations:.1} allocations ({bytes:.0} bytes) per call; budget {count} ({size} bytes)");
        if allocations > *count || bytes > *size {
            over.push(format!(
                "{what}: {allocations:.1} allocations ({bytes:.0} bytes) > budget {count} ({size} bytes)"
            ));
        }
    }
    assert!(
        over.is_empty(),
        "over budget (a regression, or raise the budget with the reason):\n{}",
        over.join("\n")
    );
}

/// An Exchange journal report of one all-staff message: `n` internal recipients (a list
/// expanded), the header showing the list and 200 addresses.
fn all_staff_report(n: usize) -> Vec<u8> {
    let mut report = String::from(
        "X-MS-Journal-Report:\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nSender: ceo@contoso.com\r\nMessage-Id: <memo@contoso.com>\r\n",
    );
    for i in 0..n {
        report.push_str(&format!("To: staff{i}@contoso.com, Expanded: all@contoso.com\r\n"));
    }
    let shown: Vec<String> = std::iter::once("all@contoso.com".to_string())
        .chain((0..200).map(|i| format!("staff{i}@contoso.com")))
        .collect();
    report.push_str(&format!(
        "\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: ceo@contoso.com\r\nTo: {}\r\nSubject: all hands\r\nMessage-ID: <memo@contoso.com>\r\n\r\nsee you there\r\n--b--\r\n",
        shown.join(", ")
    ));
    report.into_bytes()
}

/// What the SMTP receiver holds for one journal report: the parsed report, then its events
/// a commit chunk at a time, each serialized as the store does. Before events were made on
/// demand with bounded lists, each of n events carried all n recipients: n² addresses.
#[test]
fn a_journal_report_costs_memory_linear_in_its_recipients() {
    use mailhook::source::journal::{Envelope, parse};
    let internal = vec!["contoso.com".to_string()];
    let now: jiff::Timestamp = "2026-12-05T08:00:00Z".parse().expect("time");
    let mut peaks = Vec::new();
    for n in [1_000usize, 5_000, 20_000] {
        let raw = all_staff_report(n);
        let peak = peak_during(|| {
            let journaled = parse(&raw, &Envelope::default(), &internal, now).expect("parse");
            assert_eq!(journaled.len(), n + 1);
            for chunk in journaled.chunks(1000) {
                let stored: usize = chunk.iter().map(|e| serde_json::to_vec(e).expect("json").len()).sum();
                assert!(stored > 0);
            }
        });
        println!(
            "journal report to {n:>6} recipients: peak {:>6.1} MiB live ({:.0} bytes per recipient; the report itself {:.1} MiB)",
            peak as f64 / (1 << 20) as f64,
            peak as f64 / n as f64,
            raw.len() as f64 / (1 << 20) as f64
        );
        peaks.push((n, peak));
    }
    let (n0, p0) = peaks[0];
    let (n2, p2) = peaks[2];
    // Linear: 20× the recipients may cost at most ~twice 20× the memory (a chunk of
    // events is a fixed cost); quadratic would be 400×.
    assert!(
        p2 as f64 / p0 as f64 <= 2.0 * (n2 / n0) as f64,
        "peak grew from {p0} to {p2} bytes for {n0} → {n2} recipients"
    );
    assert!(p2 / n2 as u64 <= 4096, "{} bytes per recipient", p2 / n2 as u64);
}
