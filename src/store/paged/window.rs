//! One subscription's queue as memory holds it: a bounded window over the queue on disk,
//! what is in flight, and the writes not yet committed that a read of the disk must not
//! undo. Pure: it reads the disk only through the `Page` callback it is given.
//!
//! Two orders, as the subscription asks: unordered queues are read by (due time, seq) so
//! that a retried delivery moves behind the ones due before it; ordered (perMailbox) queues
//! are read by seq, the order of acceptance, so a retried head holds its key back.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::store::PendingDelivery;

/// A delivery's place in its queue: (due time in unix nanoseconds, seq) unordered, (0, seq)
/// ordered.
pub type Key = (u64, u64);

/// Deliveries memory keeps per queue before it stops reading ahead; the window is topped up
/// when it falls to half of this. With many queues each keeps less (`size_for`).
pub const WINDOW: usize = 256;

/// Deliveries every window together reads ahead: 1,000 subscriptions with a backlog hold
/// 32 each, not 256 (which took ~200 MiB).
pub const WINDOW_BUDGET: usize = 32_768;

/// Fewest a window reads ahead, however many queues there are.
pub const WINDOW_MIN: usize = 16;

/// How far an ordered window may grow while every delivery in it waits on a busy key (the
/// keys ahead of the blocked ones must be found), whatever its size.
const ORDERED_REACH: usize = 8 * WINDOW;

/// A window's size when `queues` windows share the budget.
pub fn size_for(queues: usize) -> usize {
    (WINDOW_BUDGET / queues.max(1)).clamp(WINDOW_MIN, WINDOW)
}

/// Reads up to `limit` queued deliveries after `after` in the window's order: each row's
/// key and the delivery (None for a row that cannot be read: skipped, but counted, so a
/// short page still means the end).
pub type Page<'a> = dyn FnMut(bool, Option<Key>, usize) -> PageRows + 'a;

/// What a page read returns.
pub type PageRows = Result<Vec<(Key, Option<Queued>)>, crate::store::StoreError>;

/// A delivery with what the store keeps beside it.
#[derive(Debug, Clone)]
pub struct Queued {
    pub delivery: PendingDelivery,
    /// Bytes of its event (what `QueueCounts::bytes` counts).
    pub size: u64,
    /// Generation of the write that put it here (0: read from the disk).
    pub written: u64,
}

/// A write the disk may not show yet.
#[derive(Debug, Clone)]
enum Unsettled {
    /// Gone (delivered, dead-lettered): a read that still sees the row skips it.
    Gone,
    /// Due again later, outside the window: a read that still sees the old row skips it, and
    /// one that passes its new place takes it from here.
    Moved(Box<Queued>),
}

pub(crate) use crate::store::durable::schema::nanos;

pub fn key_of(d: &PendingDelivery, ordered: bool) -> Key {
    if ordered {
        (0, d.seq)
    } else {
        (nanos(d.not_before), d.seq)
    }
}

#[derive(Default)]
pub struct Window {
    ordered: bool,
    waiting: BTreeMap<Key, Queued>,
    in_flight: HashMap<u64, Queued>,
    /// Every waiting delivery up to this key is in `waiting` (None: nothing read yet).
    cursor: Option<Key>,
    /// The last read reached the end: every waiting delivery is in memory.
    exhausted: bool,
    /// Writes not yet known to be committed, by seq, with their generation.
    unsettled: HashMap<u64, (u64, Unsettled)>,
    /// Rows read from the disk, since start.
    pub rows_read: u64,
    /// How many deliveries it reads ahead (0: `WINDOW`).
    size: usize,
    /// Committed deliveries `insert` left to a later read (counted: a read made before
    /// their commit would not show them, see `Planned`).
    left: u64,
    /// The newest generation `settle` forgot a write of: a read older than it may show
    /// what the write changed.
    forgot: u64,
    /// Bumped whenever the cursor moves or the order changes (a read, a trim, a reorder):
    /// a page planned before may not fit any more, even where the cursor is back at the
    /// same key.
    moves: u64,
}

/// A read of the disk the window needs, planned under the store's lock and made outside
/// it (a cold page can take milliseconds; nothing else should wait for it).
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub ordered: bool,
    pub after: Option<Key>,
    pub limit: usize,
    /// The committed generation when planned: the read shows at least this.
    committed: u64,
    left: u64,
    moves: u64,
}

impl Window {
    /// Sets how many deliveries it reads ahead (see `size_for`). What it holds already stays
    /// (trimming here would read an ordered window's reach again at every take).
    pub fn resize(&mut self, size: usize) {
        self.size = size;
    }

    fn size(&self) -> usize {
        if self.size == 0 { WINDOW } else { self.size }
    }

    /// Whether `key` falls where memory holds every waiting delivery.
    fn covers(&self, key: Key) -> bool {
        self.exhausted || self.cursor.is_some_and(|c| key <= c)
    }

    /// A delivery newly waiting (committed when `written` is 0 or below the committed
    /// generation): kept if the window covers its place, else left to a later read.
    pub fn insert(&mut self, q: Queued) {
        let seq = q.delivery.seq;
        if self.in_flight.contains_key(&seq) {
            return;
        }
        let key = key_of(&q.delivery, self.ordered);
        if self.covers(key) {
            self.waiting.insert(key, q);
            self.trim();
        } else if q.written > 0 {
            self.unsettled.insert(seq, (q.written, Unsettled::Moved(Box::new(q))));
        } else {
            self.left += 1;
        }
    }

    /// Keeps the window bounded: beyond twice its size, the latest deliveries leave memory
    /// (the disk has them; an uncommitted one is kept aside until it is committed).
    fn trim(&mut self) {
        while self.waiting.len() > 2 * self.size() {
            let Some((key, q)) = self.waiting.pop_last() else { break };
            self.moves += 1;
            self.exhausted = false;
            self.cursor = self.waiting.last_key_value().map(|(k, _)| *k).or(Some((0, 0)));
            if q.written > 0 {
                self.unsettled.insert(key.1, (q.written, Unsettled::Moved(Box::new(q))));
            }
        }
    }

    /// Forgets writes the disk shows by now (`committed`: the newest committed generation).
    /// A moved delivery whose new place the window covers comes back to `waiting`.
    pub fn settle(&mut self, committed: u64) {
        if self.unsettled.is_empty() {
            return;
        }
        let ordered = self.ordered;
        let exhausted = self.exhausted;
        let cursor = self.cursor;
        let covers = |key: Key| exhausted || cursor.is_some_and(|c| key <= c);
        let mut back = Vec::new();
        let mut forgot = self.forgot;
        self.unsettled.retain(|_, (written, u)| {
            if *written > committed {
                return true;
            }
            forgot = forgot.max(*written);
            if let Unsettled::Moved(q) = u
                && covers(key_of(&q.delivery, ordered))
            {
                back.push(q.as_ref().clone());
            }
            false
        });
        self.forgot = forgot;
        for q in back {
            let key = key_of(&q.delivery, ordered);
            self.waiting.insert(key, Queued { written: 0, ..q });
        }
    }

    /// Reads the disk after the cursor until the window holds `WINDOW` deliveries (or `reach`).
    fn fill(
        &mut self,
        page: &mut Page<'_>,
        committed: u64,
        incoming: &HashSet<u64>,
        reach: usize,
    ) -> Result<(), crate::store::StoreError> {
        self.settle(committed);
        while !self.exhausted && self.waiting.len() < reach {
            let want = (reach - self.waiting.len()).max(32);
            let rows = page(self.ordered, self.cursor, want)?;
            if !self.absorb(rows, want, incoming) {
                break;
            }
        }
        self.take_passed();
        Ok(())
    }

    /// Puts a page read after the cursor into the window (`want`: what was asked; fewer
    /// means the end). False when the page was empty.
    fn absorb(&mut self, rows: Vec<(Key, Option<Queued>)>, want: usize, incoming: &HashSet<u64>) -> bool {
        self.rows_read += rows.len() as u64;
        self.moves += 1;
        if rows.len() < want {
            self.exhausted = true;
        }
        let Some((last, _)) = rows.last() else {
            return false;
        };
        let last = *last;
        for (key, q) in rows {
            let seq = key.1;
            // In flight, changed by a write not yet committed, or being written by an
            // ingest or replay that puts it here itself once committed.
            if self.in_flight.contains_key(&seq) || self.unsettled.contains_key(&seq) || incoming.contains(&seq) {
                continue;
            }
            if let Some(q) = q {
                self.waiting.insert(key, q);
            }
        }
        self.cursor = Some(self.cursor.map_or(last, |c| c.max(last)));
        true
    }

    /// Moved deliveries whose new place a read passed before their write was committed.
    fn take_passed(&mut self) {
        let passed: Vec<u64> = self
            .unsettled
            .iter()
            .filter_map(|(seq, (_, u))| match u {
                Unsettled::Moved(q) if self.covers(key_of(&q.delivery, self.ordered)) => Some(*seq),
                _ => None,
            })
            .collect();
        for seq in passed {
            if let Some((written, Unsettled::Moved(q))) = self.unsettled.remove(&seq) {
                let key = key_of(&q.delivery, self.ordered);
                self.waiting.insert(key, Queued { written, ..*q });
            }
        }
    }

    /// Whether the next `take_due` in this order would read the disk first.
    fn wants_page(&self) -> bool {
        !self.exhausted && (self.waiting.len() < self.size() / 2 || self.cursor.is_none())
    }

    /// Whether a take in `ordered` order would read the disk first (cheap: no settling).
    pub fn wants_read(&self, ordered: bool) -> bool {
        if self.ordered != ordered {
            return true;
        }
        self.wants_page()
    }

    /// The read the next `take_due` would make first, to be made without the store's lock
    /// and handed to `apply`; None when the window has enough.
    pub fn plan(&mut self, committed: u64, ordered: bool) -> Option<Planned> {
        self.reorder(ordered);
        self.settle(committed);
        if !self.wants_page() {
            return None;
        }
        Some(Planned {
            ordered: self.ordered,
            after: self.cursor,
            limit: (self.size() - self.waiting.len().min(self.size())).max(32),
            committed,
            left: self.left,
            moves: self.moves,
        })
    }

    /// Puts a page read as `planned` into the window, unless the window changed since in
    /// a way the read may not show: it moved on, or a write the read may predate was
    /// forgotten or left to a later read. False when the page was not used (the next take
    /// reads again).
    pub fn apply(&mut self, planned: Planned, rows: Vec<(Key, Option<Queued>)>, incoming: &HashSet<u64>) -> bool {
        let unchanged = self.moves == planned.moves
            && self.ordered == planned.ordered
            && self.cursor == planned.after
            && !self.exhausted
            && self.left == planned.left
            && self.forgot <= planned.committed;
        if !unchanged {
            return false;
        }
        self.absorb(rows, planned.limit, incoming);
        self.take_passed();
        true
    }

    /// Starts over in the other order (the subscription's ordering changed).
    fn reorder(&mut self, ordered: bool) {
        if self.ordered == ordered && (self.cursor.is_some() || self.exhausted) {
            return;
        }
        self.ordered = ordered;
        self.cursor = None;
        self.exhausted = false;
        self.moves += 1;
        // What waits unsettled moves with the window; the rest is read again.
        let waiting = std::mem::take(&mut self.waiting);
        for (_, q) in waiting {
            if q.written > 0 {
                self.unsettled
                    .insert(q.delivery.seq, (q.written, Unsettled::Moved(Box::new(q))));
            }
        }
    }

    /// Takes up to `max` deliveries due at `now` and marks them in flight. Ordered: a key
    /// with a delivery in flight or not yet due holds back every later one of that key.
    pub fn take_due(
        &mut self,
        page: &mut Page<'_>,
        committed: u64,
        incoming: &HashSet<u64>,
        now: jiff::Timestamp,
        max: usize,
        ordered: bool,
    ) -> Result<Vec<PendingDelivery>, crate::store::StoreError> {
        self.reorder(ordered);
        self.settle(committed);
        let size = self.size();
        let furthest = ORDERED_REACH.max(size);
        if self.wants_page() {
            self.fill(page, committed, incoming, size)?;
        }
        let mut reach = size;
        loop {
            let picked = self.pick(now, max);
            let short = picked.len() < max;
            let mut taken = Vec::with_capacity(picked.len());
            for key in picked {
                if let Some(q) = self.waiting.remove(&key) {
                    taken.push(q.delivery.clone());
                    self.in_flight.insert(key.1, q);
                }
            }
            // Ordered, every delivery in memory may wait on a busy key while later keys
            // are due: read further, within bounds.
            // Bounded: past ORDERED_REACH, keys behind a busy one wait for it.
            if !taken.is_empty() || !short || !self.ordered || self.exhausted || self.waiting.len() >= furthest {
                return Ok(taken);
            }
            reach = (reach * 2).min(furthest);
            let before = self.waiting.len();
            self.fill(page, committed, incoming, reach.max(before + 1))?;
            if self.waiting.len() == before {
                return Ok(taken);
            }
        }
    }

    fn pick(&self, now: jiff::Timestamp, max: usize) -> Vec<Key> {
        if !self.ordered {
            let now = nanos(now);
            return self
                .waiting
                .keys()
                .take_while(|(due, _)| *due <= now)
                .take(max)
                .copied()
                .collect();
        }
        let mut blocked: HashSet<&str> = self
            .in_flight
            .values()
            .filter_map(|q| q.delivery.ordering_key.as_deref())
            .collect();
        let mut picked = Vec::new();
        for (key, q) in &self.waiting {
            if picked.len() == max {
                break;
            }
            let d = &q.delivery;
            let k = d.ordering_key.as_deref();
            if k.is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if let Some(k) = k {
                blocked.insert(k);
            }
            if d.not_before <= now {
                picked.push(*key);
            }
        }
        picked
    }

    /// The earliest due time among the waiting deliveries memory holds (unordered: the
    /// queue's earliest; ordered: of the window).
    pub fn next_due(&self) -> Option<jiff::Timestamp> {
        if self.waiting.is_empty() && !self.exhausted {
            // More on disk than memory shows: the next take reads it.
            return Some(jiff::Timestamp::UNIX_EPOCH);
        }
        let due = if self.ordered {
            self.waiting.values().map(|q| nanos(q.delivery.not_before)).min()?
        } else {
            self.waiting.keys().next()?.0
        };
        jiff::Timestamp::from_nanosecond(i128::from(due)).ok()
    }

    /// An in-flight delivery is done (delivered or given up) by the write of `written`.
    pub fn finish(&mut self, seq: u64, written: u64) -> Option<Queued> {
        let q = self.in_flight.remove(&seq)?;
        self.unsettled.insert(seq, (written, Unsettled::Gone));
        Some(q)
    }

    /// An in-flight delivery is due again (its `not_before` moved) by the write of `written`.
    pub fn requeue(&mut self, d: PendingDelivery, written: u64) -> Option<Queued> {
        let old = self.in_flight.remove(&d.seq)?;
        let q = Queued {
            delivery: d,
            size: old.size,
            written,
        };
        self.insert(q);
        Some(old)
    }

    /// Removes waiting deliveries by seq (expired, replayed elsewhere), by the write of `written`.
    pub fn remove_waiting(&mut self, seqs: &HashSet<u64>, written: u64) {
        self.waiting.retain(|_, q| !seqs.contains(&q.delivery.seq));
        for seq in seqs {
            self.unsettled.insert(*seq, (written, Unsettled::Gone));
        }
    }

    /// The in-flight delivery with `seq`, if any.
    pub fn in_flight(&self, seq: u64) -> Option<&Queued> {
        self.in_flight.get(&seq)
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a read must skip the delivery with `seq` (in flight, or changed by a write
    /// the disk may not show yet).
    pub fn busy(&self, seq: u64, committed: u64) -> bool {
        self.in_flight.contains_key(&seq)
            || self.unsettled.get(&seq).is_some_and(|(w, _)| *w > committed)
            || self
                .waiting
                .values()
                .any(|q| q.delivery.seq == seq && q.written > committed)
    }

    /// The waiting delivery with `seq`, if memory holds it.
    pub fn waiting(&self, seq: u64) -> Option<&Queued> {
        self.waiting.values().find(|q| q.delivery.seq == seq)
    }

    /// Deliveries memory holds (waiting, in flight, set aside).
    pub fn held(&self) -> usize {
        self.waiting.len() + self.in_flight.len() + self.unsettled.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_queues_share_one_read_ahead_budget() {
        assert_eq!(size_for(1), WINDOW);
        assert_eq!(size_for(128), WINDOW);
        assert_eq!(size_for(1_000), 32);
        assert_eq!(size_for(100_000), WINDOW_MIN);
    }

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).expect("time")
    }

    fn d(seq: u64, due: i64, key: Option<&str>) -> PendingDelivery {
        PendingDelivery {
            subscription: "s".into(),
            event_id: format!("e{seq}"),
            attempts: 0,
            not_before: at(due),
            accepted_at: at(0),
            ordering_key: key.map(String::from),
            matched_filters: vec![],
            seq,
        }
    }

    /// A queue on "disk": (seq → delivery), read in either order.
    struct Disk(BTreeMap<u64, PendingDelivery>);

    impl Disk {
        fn page(&self, ordered: bool, after: Option<Key>, limit: usize) -> Vec<(Key, Option<Queued>)> {
            let mut rows: Vec<(Key, Option<Queued>)> = self
                .0
                .values()
                .map(|d| {
                    (
                        key_of(d, ordered),
                        Some(Queued {
                            delivery: d.clone(),
                            size: 10,
                            written: 0,
                        }),
                    )
                })
                .filter(|(k, _)| after.is_none_or(|a| *k > a))
                .collect();
            rows.sort_by_key(|(k, _)| *k);
            rows.truncate(limit);
            rows
        }
    }

    #[test]
    fn a_large_queue_is_read_a_window_at_a_time_and_drained_whole() {
        let disk = Disk((0..10_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let mut seen = 0;
        loop {
            let taken = w
                .take_due(&mut page, 1, &HashSet::new(), at(1), 50, false)
                .expect("take");
            if taken.is_empty() {
                break;
            }
            assert!(w.held() <= 3 * WINDOW, "memory stays bounded: {}", w.held());
            for t in taken {
                assert_eq!(t.seq, seen, "in order");
                seen += 1;
                // Completed, and the disk shows it at once (committed generation 1).
                w.finish(t.seq, 1);
            }
        }
        assert_eq!(seen, 10_000);
    }

    #[test]
    fn a_retry_moves_behind_what_is_due_before_it_and_comes_back_when_due() {
        let mut disk = Disk((0..1_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let first = {
            let mut page = |o, a, l| Ok(disk.page(o, a, l));
            w.take_due(&mut page, 0, &HashSet::new(), at(1), 1, false)
                .expect("take")
        };
        assert_eq!(first[0].seq, 0);
        // Retried far in the future: written as generation 5, not yet committed.
        let mut again = first[0].clone();
        again.not_before = at(1_000);
        w.requeue(again.clone(), 5);
        // The disk still has the old row; reads skip it until generation 5 is committed.
        let mut delivered = vec![];
        loop {
            let taken = {
                let mut page = |o, a, l| Ok(disk.page(o, a, l));
                w.take_due(&mut page, 4, &HashSet::new(), at(1), 100, false)
                    .expect("take")
            };
            if taken.is_empty() {
                break;
            }
            for t in taken {
                delivered.push(t.seq);
                disk.0.remove(&t.seq);
                w.finish(t.seq, 6);
            }
        }
        assert_eq!(delivered.len(), 999, "everything else, and not seq 0 twice");
        assert!(!delivered.contains(&0));
        // Now committed (the row moved on disk too), and due.
        disk.0.insert(0, again);
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let taken = w
            .take_due(&mut page, 6, &HashSet::new(), at(2_000), 100, false)
            .expect("take");
        assert_eq!(taken.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn ordered_a_busy_key_holds_back_its_later_deliveries_even_beyond_the_window() {
        // 600 deliveries of key "a" then one of key "b": "b" is found although the window
        // is full of "a"s waiting for the first.
        let mut map: BTreeMap<u64, PendingDelivery> = (0..600).map(|s| (s, d(s, 0, Some("a")))).collect();
        map.insert(600, d(600, 0, Some("b")));
        let disk = Disk(map);
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let taken = w
            .take_due(&mut page, 0, &HashSet::new(), at(1), 10, true)
            .expect("take");
        assert_eq!(taken.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![0]);
        let taken = w
            .take_due(&mut page, 0, &HashSet::new(), at(1), 10, true)
            .expect("take");
        assert_eq!(taken.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![600]);
        assert!(
            w.take_due(&mut page, 0, &HashSet::new(), at(1), 10, true)
                .expect("take")
                .is_empty()
        );
    }

    #[test]
    fn new_deliveries_past_the_window_are_left_on_disk() {
        let disk = Disk((0..1_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        w.take_due(&mut page, 0, &HashSet::new(), at(1), 1, false)
            .expect("take");
        let before = w.held();
        for s in 1_000..2_000 {
            w.insert(Queued {
                delivery: d(s, 0, None),
                size: 1,
                written: 0,
            });
        }
        assert_eq!(w.held(), before, "committed and beyond the cursor: read later");
    }

    #[test]
    fn a_delivery_being_ingested_is_left_to_the_ingest_and_handed_out_once() {
        let mut disk = Disk((0..300).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        {
            let mut page = |o, a, l| Ok(disk.page(o, a, l));
            for t in w
                .take_due(&mut page, 0, &HashSet::new(), at(10), 200, false)
                .expect("take")
            {
                w.finish(t.seq, 1);
            }
        }
        for s in 0..200 {
            disk.0.remove(&s);
        }
        // Seq 300 is committed, and its ingest has not put it in the window yet.
        disk.0.insert(300, d(300, 1, None));
        let incoming = HashSet::from([300]);
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let taken = w.take_due(&mut page, 1, &incoming, at(10), 1_000, false).expect("take");
        assert!(taken.iter().all(|t| t.seq != 300), "left to the ingest");
        w.insert(Queued {
            delivery: d(300, 1, None),
            size: 1,
            written: 0,
        });
        let taken = w
            .take_due(&mut page, 1, &HashSet::new(), at(10), 1_000, false)
            .expect("take");
        assert_eq!(taken.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![300]);
        w.insert(Queued {
            delivery: d(300, 1, None),
            size: 1,
            written: 0,
        });
        let again = w
            .take_due(&mut page, 1, &HashSet::new(), at(10), 1_000, false)
            .expect("take");
        assert!(again.is_empty(), "in flight: not handed out again");
    }

    #[test]
    fn committed_writes_are_forgotten_without_a_refill() {
        let disk = Disk((0..200).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        w.take_due(&mut page, 0, &HashSet::new(), at(10), 1, false)
            .expect("take");
        for (next, g) in (200..).zip(1..20_000u64) {
            for t in w
                .take_due(&mut page, g, &HashSet::new(), at(10), 1, false)
                .expect("take")
            {
                w.finish(t.seq, g);
            }
            w.insert(Queued {
                delivery: d(next, 0, None),
                size: 1,
                written: 0,
            });
        }
        assert!(w.held() <= 3 * WINDOW, "held {}", w.held());
    }

    #[test]
    fn an_ordered_window_behind_one_busy_key_stays_bounded() {
        let disk = Disk((0..50_000).map(|s| (s, d(s, 0, Some("a")))).collect());
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        assert_eq!(
            w.take_due(&mut page, 0, &HashSet::new(), at(10), 1, true)
                .expect("take")
                .len(),
            1
        );
        for _ in 0..20 {
            assert!(
                w.take_due(&mut page, 0, &HashSet::new(), at(10), 1, true)
                    .expect("take")
                    .is_empty()
            );
        }
        assert!(w.held() <= ORDERED_REACH + WINDOW, "held {}", w.held());
    }

    #[test]
    fn an_emptied_window_with_more_on_disk_says_something_is_due() {
        let disk = Disk((0..300).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        assert_eq!(
            w.take_due(&mut page, 0, &HashSet::new(), at(10), 128, false)
                .expect("take")
                .len(),
            128
        );
        assert_eq!(
            w.take_due(&mut page, 0, &HashSet::new(), at(10), 128, false)
                .expect("take")
                .len(),
            128
        );
        assert!(w.next_due().is_some(), "44 still queued on disk");
    }

    #[test]
    fn a_page_read_outside_the_lock_fills_the_window_as_a_take_would() {
        let disk = Disk((0..1_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let planned = w.plan(0, false).expect("a cold window wants a page");
        assert!(w.apply(
            planned,
            disk.page(planned.ordered, planned.after, planned.limit),
            &HashSet::new()
        ));
        assert!(!w.wants_read(false), "filled");
        let read = w.rows_read;
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let taken = w
            .take_due(&mut page, 0, &HashSet::new(), at(1), 10, false)
            .expect("take");
        assert_eq!(
            taken.iter().map(|t| t.seq).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(w.rows_read, read, "the take read nothing more");
    }

    #[test]
    fn a_page_planned_before_the_window_moved_on_is_not_used() {
        let mut disk = Disk((0..1_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let planned = w.plan(0, false).expect("page");
        let stale = disk.page(planned.ordered, planned.after, planned.limit);
        // Meanwhile a take read the same page itself, and its deliveries were delivered
        // and committed.
        {
            let mut page = |o, a, l| Ok(disk.page(o, a, l));
            for t in w
                .take_due(&mut page, 0, &HashSet::new(), at(1), 100, false)
                .expect("take")
            {
                w.finish(t.seq, 1);
                disk.0.remove(&t.seq);
            }
        }
        w.settle(1);
        assert!(!w.apply(planned, stale, &HashSet::new()), "the cursor moved on");
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let next = w
            .take_due(&mut page, 1, &HashSet::new(), at(1), 1_000, false)
            .expect("take");
        assert!(next.iter().all(|t| t.seq >= 100), "nothing delivered comes back");
    }

    #[test]
    fn a_page_planned_before_the_order_flipped_twice_is_not_used() {
        let disk = Disk((0..1_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        let planned = w.plan(0, false).expect("page");
        let stale = disk.page(planned.ordered, planned.after, planned.limit);
        // The subscription's ordering changed and changed back meanwhile: the cursor is
        // where it was (nothing read), but the window started over twice.
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        w.take_due(&mut page, 0, &HashSet::new(), at(1), 0, true).expect("take");
        w.take_due(&mut page, 0, &HashSet::new(), at(1), 0, false)
            .expect("take");
        w.cursor = planned.after;
        w.exhausted = false;
        assert!(!w.apply(planned, stale, &HashSet::new()), "it moved since");
    }

    #[test]
    fn a_page_read_before_a_commit_it_cannot_show_is_not_used() {
        let mut disk = Disk((0..1_000).map(|s| (s, d(s, 0, None))).collect());
        let mut w = Window::default();
        // A committed delivery past the cursor is left to a later read meanwhile: a page
        // read before its commit would pass it by.
        let planned = w.plan(0, false).expect("page");
        let stale = disk.page(planned.ordered, planned.after, planned.limit);
        w.insert(Queued {
            delivery: d(5_000, 0, None),
            size: 1,
            written: 0,
        });
        assert!(!w.apply(planned, stale, &HashSet::new()), "left to a later read since");

        // Settling forgets a write newer than what the read shows: not used either.
        let mut w = Window::default();
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let first = w
            .take_due(&mut page, 0, &HashSet::new(), at(1), 200, false)
            .expect("take");
        for t in &first {
            w.finish(t.seq, 7);
        }
        let planned = w.plan(0, false).expect("low: a page");
        let stale = disk.page(planned.ordered, planned.after, planned.limit);
        for t in &first {
            disk.0.remove(&t.seq);
        }
        w.settle(7);
        assert!(!w.apply(planned, stale, &HashSet::new()), "forgot generation 7 since");
        // The take reads again and hands out each delivery once.
        let mut page = |o, a, l| Ok(disk.page(o, a, l));
        let next = w
            .take_due(&mut page, 7, &HashSet::new(), at(1), 1_000, false)
            .expect("take");
        assert!(next.iter().all(|t| t.seq >= 200), "nothing delivered comes back");
    }
}
