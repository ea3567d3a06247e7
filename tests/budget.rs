//! Per-event cost budgets that do not depend on wall time (these machines are shared and
//! noisy): heap allocations counted by a counting allocator on this thread, for the work
//! every event or delivery repeats — routing among 10,000 compiled MailboxFilters in 100
//! namespaces, rendering and signing a delivery in each wire format. Counts are
//! deterministic, so a budget a little above today's figure fails on a real regression
//! (a clone per filter, a JSON tree per payload) and never on a busy machine. The figures
//! are printed (`cargo test --test budget -- --nocapture`) and kept in BENCHMARKS.md.

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
}

// SAFETY: forwards to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    // A thread-local access can itself fail during thread teardown: then do not count.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|b| b.set(b.get() + size as u64));
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
