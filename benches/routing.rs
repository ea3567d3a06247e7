//! Routing cost per event among many MailboxFilters: 100 namespaces × 100 filters (10,000),
//! 10 subscriptions per namespace each using 10 filters. Three tables: every filter names a
//! domain of its own (`*@t<ns>-<f>.example`: an event meets one filter, the best case);
//! every tenant's 100 filters name the tenant's one domain (`*@t<ns>.example`: an event
//! meets 100); and filters that name no domain (subject keywords only), which the domain
//! index cannot skip.
//!
//!   cargo bench --bench routing
//!
//! Prints ns per event (median of 7 rounds of 20,000 events); no assertion (the machine is
//! shared and noisy: tests/budget.rs holds the deterministic budget).

use std::time::Instant;

use mailhook::event::MailboxEvent;
use mailhook::route::RoutingTable;

#[path = "../tests/common/tenants.rs"]
mod tenants;
use tenants::{Domains, table};

/// The i-th event: its mailbox in tenant `i % 100`'s domain (of filter `(i / 100) % 100`
/// when every filter has a domain of its own).
fn event(i: usize, per_filter: bool) -> MailboxEvent {
    let domain = if per_filter {
        format!("t{}-{}.example", i % 100, (i / 100) % 100)
    } else {
        format!("t{}.example", i % 100)
    };
    serde_json::from_value(serde_json::json!({
        "id": format!("evt_{i}"), "type": "message.received",
        "occurredAt": "2026-12-05T08:00:00Z", "receivedAt": "2026-12-05T08:00:00Z", "source": "http",
        "mailbox": format!("user{}@{domain}", i % 50),
        "from": "sender@partner.example", "to": ["someone@finance.example"],
        "subject": format!("Re: project-{} status", i % 100),
    }))
    .expect("event")
}

fn measure(what: &str, table: &RoutingTable, events: &[MailboxEvent]) {
    let mut rounds = Vec::new();
    let mut targets = 0;
    for _ in 0..7 {
        let started = Instant::now();
        for e in events {
            targets += std::hint::black_box(table.route(e)).targets.len();
        }
        rounds.push(started.elapsed().as_nanos() as f64 / events.len() as f64);
    }
    rounds.sort_by(f64::total_cmp);
    println!(
        "{what}: {:.0} ns per event (median of 7 rounds; min {:.0}, max {:.0}); {:.2} targets per event",
        rounds[3],
        rounds[0],
        rounds[6],
        targets as f64 / (7 * events.len()) as f64
    );
}

fn main() {
    let per_filter: Vec<MailboxEvent> = (0..20_000).map(|i| event(i, true)).collect();
    let per_tenant: Vec<MailboxEvent> = (0..20_000).map(|i| event(i, false)).collect();
    for (what, domains, events) in [
        (
            "every filter names a domain of its own (an event meets 1 filter)",
            Domains::PerFilter,
            &per_filter,
        ),
        (
            "each tenant's 100 filters name its one domain (an event meets 100)",
            Domains::PerTenant,
            &per_tenant,
        ),
        (
            "no filter names a domain (subject keywords: every filter evaluated)",
            Domains::None,
            &per_filter,
        ),
    ] {
        let started = Instant::now();
        let table = table(domains);
        println!("built the table in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
        measure(&format!("10,000 filters, {what}"), &table, events);
    }
}
