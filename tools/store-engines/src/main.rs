//! redb against fjall on the write pattern of mailhook's store: every group commit
//! inserts B new events (≈700 B) with one pending delivery each (≈200 B), and completes B
//! earlier ones (delete event, delete pending, insert a ≈100 B attempt record), then
//! syncs to disk. Prints commits/s, events/s and bytes on disk.
//!
//!   cargo run --release --manifest-path tools/store-engines/Cargo.toml
//!
//! Figures go to BENCHMARKS.md ("Choosing the embedded store").

use std::path::Path;
use std::time::Instant;

const EVENTS: u64 = 100_000;

fn value(n: usize, seed: u64) -> Vec<u8> {
    (0..n).map(|i| b'a' + ((seed as usize + i * 7) % 26) as u8).collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            };
        }
    }
    total
}

fn report(engine: &str, batch: u64, started: Instant, dir: &Path) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{engine:>5}, {batch:>4} events per commit: {:>7.0} events/s, {:>6.0} commits/s, {:>6.1} MiB on disk after {EVENTS} events",
        EVENTS as f64 / secs,
        (EVENTS / batch) as f64 / secs,
        dir_bytes(dir) as f64 / (1 << 20) as f64
    );
}

const EVT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
const PEND: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("pending");
const ATT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("attempts");

fn redb_run(dir: &Path, batch: u64) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let db = redb::Database::create(dir.join("store.redb"))?;
    let started = Instant::now();
    let mut next = 0;
    while next < EVENTS {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let (mut ev, mut pe, mut at) = (txn.open_table(EVT)?, txn.open_table(PEND)?, txn.open_table(ATT)?);
            for i in next..next + batch {
                ev.insert(i, value(700, i).as_slice())?;
                pe.insert(i, value(200, i).as_slice())?;
                if i >= batch {
                    let done = i - batch;
                    ev.remove(done)?;
                    pe.remove(done)?;
                    at.insert(done, value(100, done).as_slice())?;
                }
            }
        }
        txn.commit()?;
        next += batch;
    }
    report("redb", batch, started, dir);
    Ok(())
}

fn fjall_run(dir: &Path, batch: u64) -> Result<(), Box<dyn std::error::Error>> {
    let db = fjall::Database::builder(dir).open()?;
    let ev = db.keyspace("events", fjall::KeyspaceCreateOptions::default)?;
    let pe = db.keyspace("pending", fjall::KeyspaceCreateOptions::default)?;
    let at = db.keyspace("attempts", fjall::KeyspaceCreateOptions::default)?;
    let started = Instant::now();
    let mut next = 0;
    while next < EVENTS {
        let mut b = db.batch().durability(Some(fjall::PersistMode::SyncData));
        for i in next..next + batch {
            b.insert(&ev, i.to_be_bytes(), value(700, i));
            b.insert(&pe, i.to_be_bytes(), value(200, i));
            if i >= batch {
                let done = i - batch;
                b.remove(&ev, done.to_be_bytes());
                b.remove(&pe, done.to_be_bytes());
                b.insert(&at, done.to_be_bytes(), value(100, done));
            }
        }
        b.commit()?;
        next += batch;
    }
    report("fjall", batch, started, dir);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::temp_dir().join(format!("mailhook-engines-{}", std::process::id()));
    for batch in [10, 50, 250] {
        for engine in ["redb", "fjall"] {
            let dir = root.join(format!("{engine}-{batch}"));
            match engine {
                "redb" => redb_run(&dir, batch)?,
                _ => fjall_run(&dir, batch)?,
            }
            std::fs::remove_dir_all(&dir)?;
        }
    }
    Ok(())
}
