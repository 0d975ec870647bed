//! What RocksDB holds of a table that its decoded-key cache does not, so that a cache miss can
//! skip RocksDB when RocksDB cannot have the rows asked for.
//!
//! Every row the cache evicts is counted under a *range* of namespaces holding its namespace,
//! and its key goes into that range's Bloom filter; every row read back is taken off its range's
//! count, and a range whose rows have all been read back (a window slice that fired, a join's
//! rows cleared below the watermark) is forgotten with its filter. A miss for a key and a range
//! of namespaces must read RocksDB only when a counted range overlapping it has a filter that
//! may hold the key. So a window whose open slice outgrows the cache reads RocksDB for the keys
//! it evicted from that slice (and about one in a hundred others), not for every key new to the
//! slice; and a join that buffers rows per millisecond, evicting a row or two of each, reads it
//! for the keys it evicted, not for every key new to the join.
//!
//! A range is one namespace when it starts. With [`MAX_RANGES`] of them, a row evicted at a
//! namespace no range holds either widens a neighbouring range to hold it or first merges the
//! two neighbouring ranges that span the fewest namespaces (counts added, filters OR-ed),
//! whichever makes the narrower range. So a few ranges, each with its filter, cover any number
//! of namespaces, and old ranges end where the rows still out begin: as the watermark reads
//! their rows back, they are forgotten. The filters of a table share one cap: a filter that
//! would take them past it is given up, and any key may then have rows in its range.
//!
//! Rows this process did not evict (a restored snapshot) are not counted: the namespaces the
//! restored table wrote before its snapshot are *unknown*, and a miss there always reads
//! RocksDB, unless the owner reads the restored rows and tells of each that memory does not
//! take ([`Spilled::learn`]): while it does, rows evicted in unknown namespaces are counted
//! too and rows read back are not taken off (a count may only be too high: a row read back may
//! be one restored and not yet told of), and once it has read them all the namespaces are
//! known ([`Spilled::learned`]). The filter those rows go into is made for their estimated
//! number and an eighth more: grown a stage at a time it could take up to four times that.
//!
//! A table with a TTL ([`Spilled::expiring`]) counts its rows by their *deadline* instead of
//! their namespace (its reads ask for all of a key's namespaces anyway): each range then spans
//! deadlines, [`EXPIRY_BUCKETS`] of them to a TTL, and once the clock passes the last deadline
//! a range can hold ([`Spilled::expire`]), every row it counted has expired and is invisible,
//! so it is forgotten with its filter. A deduplication with a TTL over an endless stream of
//! new keys thus filters the keys that can still be live, not every key it ever evicted, and
//! its filters stop growing once they span a TTL. Rows read back are not taken off its counts
//! (a count may only be too high, and a range leaves only by expiry).
use super::backend::{self, KeyedBackend, TableScan};
use super::bloom::GrowingBloom;
use crate::Result;
use crate::keys::hash_key;
use std::collections::BTreeMap;
use std::ops::Bound;

/// Rows of its snapshot a restored key set or one-value table reads per prefetch (see
/// [`Spilled::learn_from`]): at least this many, and this many per key the prefetch was asked
/// for. A row read costs a fraction of a microsecond and a miss that reads RocksDB a few, so
/// the misses while the reading goes on (a sixteenth of the restored keys' number, for a
/// stream of new keys) cost about as much as the reading.
const WARM_ROWS: usize = 4096;
const WARM_PER_KEY: usize = 16;

/// Rows of its snapshot a restored table reads for a prefetch of `asked` keys.
pub(crate) fn rows_for_prefetch(asked: usize) -> usize {
    WARM_ROWS.max(asked.saturating_mul(WARM_PER_KEY))
}

/// Rows of its snapshot a restored table reads at a miss that must read RocksDB because the
/// namespaces asked for are unknown (a table whose operator does not prefetch: a join's
/// buffers, session windows, pattern runs). They cost about what the miss's own read costs
/// with the seek that starts them, so a miss costs about twice as much while the reading goes
/// on, and nothing once it is done.
pub(crate) const WARM_PER_MISS: usize = 64;

/// Rows of a restored table read to estimate how many it holds before its filter is made (see
/// [`KeyedBackend::estimate_table_rows`]): whole key groups holding at least this many. Of 10M
/// keys in 128 key groups that is one group, about 78k rows.
const ESTIMATE_ROWS: usize = 1 << 16;

/// A range of namespaces.
pub(crate) type NsRange = (Bound<i64>, Bound<i64>);

/// Every namespace.
pub(crate) const ALL: NsRange = (Bound::Unbounded, Bound::Unbounded);

/// Ranges counted, each with a filter; past this, two neighbours are merged.
const MAX_RANGES: usize = 32;

/// Keys a new filter is sized for. It grows by adding a filter four times the size of the last,
/// and a lookup probes each: few and large rather than many small ones.
const FILTER_START: usize = 1 << 14;

/// Ranges of deadlines a TTL spans, for a table with a TTL (see the module documentation): a
/// range is forgotten at most an eighth of a TTL after its last row expired.
const EXPIRY_BUCKETS: i64 = 8;

/// How a table with a TTL counts its rows: by deadline, in buckets of `width` milliseconds.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    ttl: i64,
    width: i64,
    /// The first bucket whose rows may be live: those before it have all expired.
    live: i64,
}

/// The evicted rows of the namespaces `lo..=hi` (`lo` is its key in [`Spilled::ranges`]).
#[derive(Debug)]
struct Range {
    hi: i64,
    /// Rows evicted and not read back since.
    rows: u64,
    /// Their keys' hashes; `None` once the filter outgrew its share (any key may have a row).
    keys: Option<GrowingBloom>,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Spilled {
    /// Namespaces `lo..=hi` in which RocksDB may hold rows of any key.
    unknown: Option<(i64, i64)>,
    /// Disjoint ranges by their first namespace.
    ranges: BTreeMap<i64, Range>,
    /// Estimated bytes of the filters.
    bytes: usize,
    /// The most the filters may take together.
    filter_cap: usize,
    /// The owner is reading the unknown namespaces' rows (see the module documentation).
    learning: bool,
    /// The owner has evicted a row since it made this (rows it learned of do not count).
    evicts: bool,
    /// Keys the next filter made is sized for, if not [`FILTER_START`]: the restored rows'
    /// estimated number when the owner starts reading them (with a TTL, every filter made
    /// while it reads them, for an even share of them).
    next_capacity: Option<usize>,
    /// Rows are counted by deadline, not namespace (a table with a TTL).
    expiry: Option<Expiry>,
}

fn filter_bytes(f: &GrowingBloom) -> usize {
    f.bytes()
}

fn overlaps((lo, hi): (i64, i64), (start, end): NsRange) -> bool {
    let after_start = match start {
        Bound::Included(s) => hi >= s,
        Bound::Excluded(s) => hi > s,
        Bound::Unbounded => true,
    };
    let before_end = match end {
        Bound::Included(e) => lo <= e,
        Bound::Excluded(e) => lo < e,
        Bound::Unbounded => true,
    };
    after_start && before_end
}

fn at(ns: i64) -> NsRange {
    (Bound::Included(ns), Bound::Included(ns))
}

impl Spilled {
    /// Nothing spilled yet; RocksDB may hold rows of any key in the namespaces `unknown` (a
    /// restored table's). The filters take at most `filter_cap` bytes together.
    pub(crate) fn new(unknown: Option<(i64, i64)>, filter_cap: usize) -> Self {
        Spilled {
            unknown,
            ranges: BTreeMap::new(),
            bytes: 0,
            filter_cap,
            learning: false,
            evicts: false,
            next_capacity: None,
            expiry: None,
        }
    }

    /// Counts rows by their deadline if the table has a TTL of `ttl` milliseconds (see the
    /// module documentation): namespaces then do not matter, and a restored table's rows may
    /// have any deadline.
    pub(crate) fn expiring(mut self, ttl: Option<i64>) -> Self {
        if let Some(ttl) = ttl {
            self.expiry = Some(Expiry {
                ttl,
                width: (ttl / EXPIRY_BUCKETS).max(1),
                live: i64::MIN,
            });
            self.unknown = self.unknown.map(|_| (i64::MIN, i64::MAX));
        }
        self
    }

    /// Where a row at namespace `ns` whose key was touched at `touched` is counted: its
    /// namespace, or its deadline's bucket.
    fn place(&self, ns: i64, touched: i64) -> i64 {
        match self.expiry {
            Some(e) => touched.saturating_add(e.ttl).div_euclid(e.width),
            None => ns,
        }
    }

    /// The event-time clock reached `clock`: with a TTL, ranges whose rows have all expired
    /// (their last deadline is at or before it) are forgotten with their filters.
    pub(crate) fn expire(&mut self, clock: i64) {
        let Some(e) = &mut self.expiry else {
            return;
        };
        // a bucket holds deadlines up to (b + 1) * width - 1: expired once that is <= clock
        let live = clock.saturating_add(1).div_euclid(e.width);
        if live <= e.live {
            return;
        }
        e.live = live;
        let mut freed = 0;
        self.ranges.retain(|_, r| {
            let keep = r.hi >= live;
            if !keep {
                freed += r.keys.as_ref().map_or(0, filter_bytes);
            }
            keep
        });
        self.bytes -= freed;
    }

    /// The owner is reading the rows of the unknown namespaces, telling of each row memory
    /// does not take with [`Spilled::evicted`], and will call [`Spilled::learned`] once it has
    /// read them all (the rows it evicted before this call are among those it reads).
    pub(crate) fn learn(&mut self) {
        self.learning = self.unknown.is_some();
    }

    /// Reads up to `limit` more rows of the restored table `name` from where `scan` stands and
    /// tells of each one's key, as the owner of a table whose rows memory does not take in
    /// when it restores (a key set, any keyed table): once every row was read, the namespaces
    /// are known and `scan` is `None`. A row that is not one of a table's, or a filter that
    /// gave up, ends the reading with the namespaces still unknown. Whether it read anything
    /// (the filters' bytes may have changed).
    pub(crate) fn learn_from(
        &mut self,
        backend: &KeyedBackend,
        scan: &mut Option<TableScan>,
        limit: usize,
        name: &str,
    ) -> Result<bool> {
        let Some(mut s) = scan.take() else {
            return Ok(false);
        };
        if !self.learning && s.at_start() {
            // one filter of the size the rows need, not a stage four times too large
            let rows = backend.estimate_table_rows(s.table(), ESTIMATE_ROWS)?;
            let mut rows = usize::try_from(rows).unwrap_or(usize::MAX);
            if self.expiry.is_some() {
                // spread over a TTL's buckets of deadlines (and the one the clock is in)
                rows /= EXPIRY_BUCKETS as usize + 1;
            }
            self.next_capacity = Some(rows.saturating_add(rows / 8).max(FILTER_START));
        }
        // what is evicted from now on is counted; what was before, the reading finds
        self.learn();
        let mut foreign = None;
        let more = backend.scan_table(&mut s, limit, |row, value| {
            let deadline = value
                .get(..8)
                .map(|d| i64::from_be_bytes(d.try_into().expect("8 bytes")));
            match (backend::decode_row_key(row), deadline) {
                (Some((key, ns)), Some(deadline)) if foreign.is_none() => {
                    let at = match self.expiry {
                        Some(e) => deadline.div_euclid(e.width),
                        None => ns,
                    };
                    self.count(hash_key(key), at)
                }
                _ => foreign = Some(row.len()),
            }
            Ok(())
        })?;
        let gave_up = self.unknown.is_some_and(|(lo, hi)| {
            self.overlapping((Bound::Included(lo), Bound::Included(hi)))
                .any(|(_, r)| r.keys.is_none())
        });
        match (foreign, more) {
            (Some(len), _) => {
                tracing::warn!(
                    table = name,
                    row_bytes = len,
                    "a restored table holds a row that is not one of its own; keys missing from memory are read from RocksDB"
                );
                self.stop_learning();
            }
            // reading on would tell the filter nothing
            (None, _) if gave_up => self.stop_learning(),
            (None, true) => *scan = Some(s),
            (None, false) => self.learned(),
        }
        Ok(true)
    }

    /// The owner has told of every restored row: no namespace is unknown any more.
    pub(crate) fn learned(&mut self) {
        self.unknown = None;
        self.learning = false;
        self.next_capacity = None;
    }

    /// The owner stopped reading the restored rows before the end: the unknown namespaces stay
    /// unknown, and what was counted in them is forgotten.
    pub(crate) fn stop_learning(&mut self) {
        self.learning = false;
        self.next_capacity = None;
        let Some(u) = self.unknown else {
            return;
        };
        let mut freed = 0;
        self.ranges.retain(|lo, r| {
            let keep = !overlaps(u, (Bound::Included(*lo), Bound::Included(r.hi)));
            if !keep {
                freed += r.keys.as_ref().map_or(0, filter_bytes);
            }
            keep
        });
        self.bytes -= freed;
    }

    /// True while RocksDB holds nothing the cache lacks: no miss needs a read.
    pub(crate) fn is_empty(&self) -> bool {
        self.unknown.is_none() && self.ranges.is_empty()
    }

    /// Estimated bytes of the filters.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the owner has evicted a row (its filters grow from now on as it evicts more).
    pub(crate) fn evicts(&self) -> bool {
        self.evicts
    }

    /// The counted ranges overlapping `range`, as (first namespace, range).
    fn overlapping(&self, range: NsRange) -> impl Iterator<Item = (&i64, &Range)> {
        // ranges are disjoint, so their ends ascend with their starts: walk down from the last
        // one starting inside `range` until one ends before it
        let (start, end) = range;
        self.ranges
            .range((Bound::Unbounded, end))
            .rev()
            .take_while(move |(lo, r)| overlaps((**lo, r.hi), (start, Bound::Unbounded)))
    }

    /// The first namespace of the range holding `ns`.
    fn holding(&self, ns: i64) -> Option<i64> {
        self.overlapping(at(ns)).next().map(|(lo, _)| *lo)
    }

    /// Whether rows evicted at `ns` are no longer filtered (its filter outgrew its share, or
    /// `ns` is unknown and the owner is not learning it): its filter will not take more memory.
    /// With a TTL, namespaces do not matter: whether any filter gave up.
    pub(crate) fn unfiltered(&self, ns: i64) -> bool {
        let range = if self.expiry.is_some() { ALL } else { at(ns) };
        (!self.learning && self.unknown.is_some_and(|u| overlaps(u, range)))
            || self.overlapping(range).any(|(_, r)| r.keys.is_none())
    }

    /// Whether RocksDB may hold a row of the key with `hash` in `range` that the cache lacks
    /// (with a TTL, in any namespace).
    pub(crate) fn may_hold(&self, hash: u64, range: NsRange) -> bool {
        let range = if self.expiry.is_some() { ALL } else { range };
        if self.unknown.is_some_and(|u| overlaps(u, range)) {
            return true;
        }
        self.overlapping(range)
            .any(|(_, r)| r.keys.as_ref().is_none_or(|f| f.contains(hash)))
    }

    /// Counts a row of the key with `hash` at `ns`, the key last touched at `touched`, that the
    /// cache evicted.
    pub(crate) fn evicted(&mut self, hash: u64, ns: i64, touched: i64) {
        self.evicts = true;
        self.count(hash, self.place(ns, touched));
    }

    /// Counts a row of the key with `hash` that RocksDB holds and the cache does not, at `ns`
    /// (a namespace, or with a TTL a deadline's bucket).
    fn count(&mut self, hash: u64, ns: i64) {
        if !self.learning && self.unknown.is_some_and(|u| overlaps(u, at(ns))) {
            return;
        }
        // expired: invisible whatever RocksDB holds
        if self.expiry.is_some_and(|e| ns < e.live) {
            return;
        }
        let lo = match self.holding(ns) {
            Some(lo) => lo,
            None => match self.make_room(ns) {
                Some(lo) => lo,
                None => {
                    // with a TTL a new range is the next bucket of deadlines, which takes about
                    // as many keys as the largest so far (the newest are still filling: an
                    // eviction takes keys of any age in memory): one stage that size, and one
                    // as large again if it was short, not stages growing fourfold from 16k
                    // keys, each adding its false positives, in each of a TTL's buckets
                    let restored = match self.expiry {
                        // every bucket a restored table's rows fall in is sized alike
                        Some(_) if self.learning => self.next_capacity,
                        _ => self.next_capacity.take(),
                    };
                    let bucket = || {
                        self.expiry?;
                        let rows = self.ranges.values().map(|r| r.rows).max()?;
                        let rows = usize::try_from(rows).unwrap_or(usize::MAX);
                        Some(rows.saturating_add(rows / 8).max(FILTER_START))
                    };
                    let room =
                        GrowingBloom::capacity_within(self.filter_cap.saturating_sub(self.bytes));
                    let f = match (restored, bucket()) {
                        (Some(keys), _) => GrowingBloom::sized(keys.min(room), FILTER_START),
                        (None, Some(keys)) => GrowingBloom::sized(keys.min(room), keys),
                        (None, None) => GrowingBloom::new(FILTER_START),
                    };
                    self.bytes += filter_bytes(&f);
                    let r = Range {
                        hi: ns,
                        rows: 0,
                        keys: Some(f),
                    };
                    self.ranges.insert(ns, r);
                    ns
                }
            },
        };
        let r = self.ranges.get_mut(&lo).expect("found or made above");
        r.rows += 1;
        if let Some(f) = &mut r.keys {
            let before = filter_bytes(f);
            // a filter that cannot hold one more key within its share gives up
            // within what the other ranges' filters leave
            if f.insert_within(hash, self.filter_cap.saturating_sub(self.bytes - before)) {
                self.bytes = self.bytes + filter_bytes(f) - before;
            } else {
                self.bytes -= before;
                r.keys = None;
            }
        }
    }

    /// With [`MAX_RANGES`] ranges counted, makes room for `ns` (which no range holds) at the
    /// least cost in width: either widens a neighbour of `ns` to hold it, or merges the two
    /// neighbouring ranges that together span the fewest namespaces (their counts added, their
    /// filters OR-ed), whichever spans fewer. Returns the first namespace of the range that
    /// now holds `ns`; `None` when `ns` gets a range of its own (with fewer ranges counted, or
    /// after a merge).
    ///
    /// Choosing the narrowest keeps ranges about as wide as the namespaces they are apart: a
    /// join's newest range widens over the milliseconds that follow it until older ranges are
    /// the narrower pair, which then merge. So a range ends below where rows are still evicted
    /// and is forgotten once its rows are read back (as the watermark passes them), no filter
    /// collects the keys of every namespace ever evicted from, and a new filter is made only
    /// when a range starts.
    fn make_room(&mut self, ns: i64) -> Option<i64> {
        if self.ranges.len() < MAX_RANGES {
            return None;
        }
        let below = self.ranges.range(..ns).next_back().map(|(lo, _)| *lo);
        let above = self.ranges.range(ns..).next().map(|(lo, r)| (*lo, r.hi));
        let widen = [
            below.map(|lo| (ns.abs_diff(lo), lo)),
            above.map(|(lo, hi)| (hi.abs_diff(ns), lo)),
        ]
        .into_iter()
        .flatten()
        .min();
        let pair = self
            .ranges
            .iter()
            .zip(self.ranges.iter().skip(1))
            .map(|((a, _), (b, second))| (second.hi.abs_diff(*a), *a, *b))
            .min();
        let merge = match (widen, pair) {
            (Some((span, _)), Some((p, a, b))) if p < span => Some((a, b)),
            (None, Some((_, a, b))) => Some((a, b)),
            _ => None,
        };
        if let Some((a, b)) = merge {
            self.merge(a, b);
            // `ns` may lie between the two
            return self.holding(ns);
        }
        let (_, lo) = widen?;
        if lo < ns {
            self.ranges.get_mut(&lo)?.hi = ns;
            Some(lo)
        } else {
            let r = self.ranges.remove(&lo)?;
            self.ranges.insert(ns, r);
            Some(ns)
        }
    }

    /// Merges range `b` into its lower neighbour `a`: counts added, filters OR-ed (or given
    /// up, past their share).
    fn merge(&mut self, a: i64, b: i64) {
        let Some(second) = self.ranges.remove(&b) else {
            return;
        };
        let Some(first) = self.ranges.get_mut(&a) else {
            return;
        };
        first.hi = second.hi;
        first.rows += second.rows;
        self.bytes -= first.keys.as_ref().map_or(0, filter_bytes)
            + second.keys.as_ref().map_or(0, filter_bytes);
        first.keys = match (first.keys.take(), second.keys) {
            (Some(mut f), Some(g)) => {
                f.merge(g);
                (filter_bytes(&f) <= self.filter_cap.saturating_sub(self.bytes)).then_some(f)
            }
            _ => None,
        };
        self.bytes += first.keys.as_ref().map_or(0, filter_bytes);
    }

    /// Takes a row at `ns` read back into the cache off the count (not with a TTL, see the
    /// module documentation).
    pub(crate) fn read_back(&mut self, ns: i64) {
        if self.learning || self.expiry.is_some() {
            return;
        }
        let Some(lo) = self.holding(ns) else {
            return;
        };
        let r = self.ranges.get_mut(&lo).expect("found above");
        r.rows = r.rows.saturating_sub(1);
        if r.rows == 0 {
            let r = self.ranges.remove(&lo).expect("found above");
            self.bytes -= r.keys.as_ref().map_or(0, filter_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_namespace_is_forgotten_once_its_rows_are_read_back() {
        let mut s = Spilled::new(None, 1 << 20);
        assert!(s.is_empty() && !s.may_hold(1, ALL));
        s.evicted(1, 10, 0);
        s.evicted(2, 10, 0);
        s.evicted(1, 20, 0);
        assert!(s.may_hold(1, at(10)) && s.may_hold(2, at(10)) && s.may_hold(1, at(20)));
        assert!(!s.may_hold(1, at(15)), "no row of any key at 15");
        assert!(!s.may_hold(1, (Bound::Excluded(10), Bound::Excluded(20))));
        assert!(s.may_hold(2, (Bound::Included(0), Bound::Excluded(20))));
        // a filter has no false negatives, and few false positives
        let fp = (1000..11_000u64).filter(|h| s.may_hold(*h, at(10))).count();
        assert!(fp < 400, "{fp} false positives of 10 000");
        assert!(s.bytes() > 0);
        s.read_back(10);
        assert!(s.may_hold(2, at(10)), "one row of 10 is still out");
        s.read_back(10);
        s.read_back(20);
        assert!(s.is_empty() && s.bytes() == 0 && !s.may_hold(1, ALL));
    }

    #[test]
    fn a_restored_table_may_hold_anything_until_told_otherwise() {
        let mut s = Spilled::new(Some((i64::MIN, i64::MAX)), 1 << 20);
        assert!(!s.is_empty() && s.may_hold(7, at(3)) && s.unfiltered(3));
        s.evicted(7, 3, 0);
        s.read_back(3);
        assert!(s.may_hold(7, at(3)), "uncounted rows may remain");
    }

    /// While the owner reads a restored table's rows, evictions in its namespaces are
    /// counted and reads back are not taken off; once it is done, a key neither restored nor
    /// evicted skips RocksDB, and both kinds are still found.
    #[test]
    fn a_restored_namespace_is_known_once_its_rows_were_read() {
        let mut s = Spilled::new(Some((0, 0)), 1 << 20);
        s.learn();
        s.evicted(1, 0, 0); // evicted after the restore
        s.read_back(0); // a restored row read back: must not cancel the eviction
        assert!(s.may_hold(99, at(0)), "unknown until learned");
        for h in 100..200 {
            s.evicted(h, 0, 0); // restored rows memory did not take
        }
        s.learned();
        assert!(!s.unfiltered(0));
        assert!(s.may_hold(1, at(0)) && (100..200).all(|h| s.may_hold(h, at(0))));
        let fp = (1_000..11_000u64).filter(|h| s.may_hold(*h, at(0))).count();
        assert!(fp < 100, "{fp} of 10 000 new keys would read RocksDB");
        // without learning, evictions in unknown namespaces are not counted
        let mut t = Spilled::new(Some((0, 0)), 1 << 20);
        t.evicted(1, 0, 0);
        assert!(t.ranges.is_empty() && t.bytes() == 0);
        // learning given up: what was counted in the unknown namespaces is forgotten, what
        // was counted elsewhere stays, and the unknown ones may hold anything
        t.learn();
        t.evicted(1, 0, 0);
        t.evicted(2, 5, 0);
        assert!(t.bytes() > 0);
        t.stop_learning();
        assert_eq!(t.ranges.len(), 1);
        assert!(t.may_hold(99, at(0)) && t.unfiltered(0) && !t.may_hold(99, at(5)));
        t.evicted(3, 0, 0);
        assert_eq!(t.ranges.len(), 1, "not counted once learning stopped");
    }

    /// An instance holding `n` rows of a table at namespace 0, and, if `foreign`, a row in its
    /// last key group that is not a row key (of another layout).
    fn table_of(dir: &std::path::Path, n: u64, foreign: bool) -> (Arc<KeyedBackend>, [u8; 4]) {
        let backend = crate::state::table::tests::capped_backend(dir, 1 << 20);
        let table = backend::value_table_id("t");
        let mut batch = rocksdb::WriteBatch::default();
        for i in 0..n {
            let key = i.to_be_bytes();
            let kg = crate::keys::key_group(hash_key(&key), 128);
            batch.put(backend::row_key(kg, table, &key, 0), [0u8; 8]);
        }
        if foreign {
            batch.put([&[0, 127][..], &table, &[0x80, 0x80]].concat(), [0u8; 8]);
        }
        backend.write(batch).unwrap();
        (backend, table)
    }

    /// Reads the table as prefetches of 1 000 keys do until the reading ends; the calls made.
    fn learn_all(s: &mut Spilled, backend: &KeyedBackend, table: [u8; 4]) -> usize {
        let mut scan = Some(TableScan::new(table));
        let mut calls = 0;
        while scan.is_some() {
            assert!(
                s.learn_from(backend, &mut scan, rows_for_prefetch(1_000), "t")
                    .unwrap()
            );
            calls += 1;
        }
        calls
    }

    /// Reading a restored table's rows: once all are read its keys are filtered in one filter
    /// sized for them; a row that is not one of the table's, or a filter that cannot hold them
    /// all, ends the reading with the namespaces unknown and nothing counted in them.
    #[test]
    fn reading_a_restored_table_learns_its_keys_or_gives_up_on_them() {
        let dir = tempfile::tempdir().unwrap();
        let n = 50_000u64;
        let (backend, table) = table_of(dir.path(), n, false);
        let mut s = Spilled::new(Some((0, 0)), 1 << 20);
        assert_eq!(learn_all(&mut s, &backend, table), 4, "16 000 rows a call");
        assert!(!s.unfiltered(0) && !s.learning);
        assert!((0..n).all(|i| s.may_hold(hash_key(&i.to_be_bytes()), at(0))));
        let fp = (n..n + 10_000)
            .filter(|i| s.may_hold(hash_key(&i.to_be_bytes()), at(0)))
            .count();
        assert!(fp < 50, "{fp} of 10 000 new keys would read RocksDB");
        // two bytes a key and an eighth more, where stages of 16k and 64k keys take 160 kB
        assert!(
            s.bytes() <= 2 * n as usize * 9 / 8 + 32,
            "{} bytes",
            s.bytes()
        );

        // a filter capped at 32 kB holds 16k keys, and 32k with its stage filled twice over
        let mut s = Spilled::new(Some((0, 0)), 32 << 10);
        learn_all(&mut s, &backend, table);
        assert!(s.unfiltered(0) && s.may_hold(1, at(0)) && s.bytes() == 0);

        let dir = tempfile::tempdir().unwrap();
        let (backend, table) = table_of(dir.path(), n, true);
        let mut s = Spilled::new(Some((0, 0)), 1 << 20);
        learn_all(&mut s, &backend, table);
        assert!(s.unfiltered(0) && s.may_hold(1, at(0)) && s.bytes() == 0);
    }

    /// With a TTL, rows are counted by deadline whatever their namespace, a read back does not
    /// take them off, and a range is forgotten once the clock passed every deadline it can
    /// hold; a row evicted already expired is not counted.
    #[test]
    fn with_a_ttl_rows_are_counted_by_deadline_and_forgotten_once_expired() {
        // buckets of 100 ms
        let mut s = Spilled::new(None, 1 << 20).expiring(Some(800));
        s.evicted(1, 5, 0); // deadline 800
        s.evicted(2, 7, 250); // deadline 1 050
        assert!(
            s.may_hold(1, at(99)) && s.may_hold(2, at(0)),
            "any namespace"
        );
        s.read_back(5);
        assert!(s.may_hold(1, ALL), "a count leaves only by expiry");
        s.expire(898);
        assert!(s.may_hold(1, ALL), "800..=899 may still be live at 898");
        s.expire(899);
        assert!(!s.may_hold(1, ALL) && s.may_hold(2, ALL));
        s.evicted(3, 0, 50); // deadline 850: expired
        assert!(!s.may_hold(3, ALL) && s.ranges.len() == 1);
        s.expire(1_099);
        assert!(s.is_empty() && s.bytes() == 0);
        // a restored table's rows may have any deadline
        let t = Spilled::new(Some((0, 0)), 1 << 20).expiring(Some(800));
        assert!(t.may_hold(1, at(5)) && t.unfiltered(9));
    }

    /// With a TTL, a range that starts after others is made one stage sized for the keys the
    /// largest of them took (and an eighth more), not stages growing fourfold from 16k keys;
    /// if that is short, its next stage is as large again.
    #[test]
    fn with_a_ttl_the_next_range_is_sized_like_the_largest() {
        let mut s = Spilled::new(None, 8 << 20).expiring(Some(800));
        for h in 0..100_000u64 {
            s.evicted(h, 0, 0); // bucket 8
        }
        let first = s.bytes();
        s.evicted(100_000, 0, 100); // bucket 9, still filling
        for h in 100_001..300_000u64 {
            s.evicted(h, 0, 200); // bucket 10
        }
        let filter = |b: i64| s.ranges[&b].keys.as_ref().map(filter_bytes).unwrap();
        // 16k + 64k + 256k keys against 112.5k, two bytes each
        assert!(first > 600_000, "{first}");
        assert!((200_000..260_000).contains(&filter(9)), "{}", filter(9));
        // 200k keys: two stages of 112.5k
        assert!((400_000..520_000).contains(&filter(10)), "{}", filter(10));
        assert!((100_000..300_000u64).all(|h| s.may_hold(h, ALL)));
    }

    /// The filters of all ranges share the cap: one that would pass it is given up.
    #[test]
    fn the_filters_of_a_table_share_one_cap() {
        let mut s = Spilled::new(None, 256 << 10);
        for h in 0..60_000u64 {
            s.evicted(h, 1, 0);
        }
        assert!(!s.unfiltered(1) && s.bytes() > 128 << 10, "{}", s.bytes());
        for h in 0..100_000u64 {
            s.evicted(h, 2, 0);
        }
        assert!(!s.unfiltered(1) && s.unfiltered(2));
        assert!(s.bytes() <= 256 << 10, "{}", s.bytes());
    }

    #[test]
    fn a_filter_past_its_share_holds_every_key() {
        let mut s = Spilled::new(None, 64 << 10);
        for h in 0..100_000u64 {
            s.evicted(h, 5, 0);
        }
        assert!(s.may_hold(u64::MAX, at(5)), "the filter was given up");
        assert!(s.bytes() == 0, "{}", s.bytes());
        assert!(s.unfiltered(5) && !s.unfiltered(6));
    }

    /// A join buffers rows per millisecond: it evicts a row or two of each of many namespaces,
    /// and reads them back as the watermark clears them. Keys it never evicted must not read
    /// RocksDB, however many namespaces it evicted from, and ranges whose rows were all read
    /// back are forgotten.
    #[test]
    fn many_namespaces_share_ranges_and_keep_filtering() {
        let mut s = Spilled::new(None, 1 << 20);
        let n = 10_000i64;
        for ns in 0..n {
            s.evicted(ns as u64, ns, 0);
        }
        assert!(s.ranges.len() <= MAX_RANGES, "{} ranges", s.ranges.len());
        assert!(s.bytes() <= MAX_RANGES * (1 << 20));
        // ranges are disjoint and hold every namespace evicted from
        let mut last_hi = i64::MIN;
        for (lo, r) in &s.ranges {
            assert!(*lo > last_hi && r.hi >= *lo, "{lo}..={}", r.hi);
            last_hi = r.hi;
        }
        for ns in 0..n {
            assert!(s.may_hold(ns as u64, at(ns)), "evicted row of {ns} missed");
            assert!(s.may_hold(
                ns as u64,
                (Bound::Included(ns - 3), Bound::Excluded(ns + 2))
            ));
        }
        let absent = (1_000_000..1_010_000u64)
            .filter(|h| s.may_hold(*h, (Bound::Included(n - 5_000), Bound::Unbounded)))
            .count();
        assert!(
            absent < 200,
            "{absent} of 10 000 new keys would read RocksDB"
        );
        assert!(!s.may_hold(1, (Bound::Excluded(n - 1), Bound::Unbounded)));
        assert!(!s.may_hold(1, (Bound::Unbounded, Bound::Excluded(0))));
        // the watermark clears the older half: those rows are read back, and the ranges
        // holding nothing else are forgotten
        let before = s.ranges.len();
        for ns in 0..n / 2 {
            s.read_back(ns);
        }
        assert!(s.ranges.len() < before);
        assert!(s.ranges.values().all(|r| r.hi >= n / 2));
        for ns in n / 2..n {
            s.read_back(ns);
        }
        assert!(s.is_empty() && s.bytes() == 0, "{:?}", s.ranges.len());
        // namespaces in any order
        let mut t = Spilled::new(None, 1 << 20);
        for ns in (0..1_000i64).rev() {
            t.evicted(ns as u64, ns * 10, 0);
        }
        assert!(t.ranges.len() <= MAX_RANGES);
        assert!((0..1_000i64).all(|ns| t.may_hold(ns as u64, at(ns * 10))));
    }

    /// Checks that at most 2% of 2 000 keys never evicted may hit over the 5 000 namespaces
    /// up to `ns` (a join's probe of its interval).
    fn assert_new_keys_skip(s: &Spilled, ns: i64) {
        let new = (0..2_000u64)
            .filter(|i| {
                s.may_hold(
                    u64::MAX - i,
                    (Bound::Included(ns - 5_000), Bound::Included(ns)),
                )
            })
            .count();
        assert!(
            new < 40,
            "{new} of 2 000 new keys would read RocksDB at {ns}"
        );
    }

    /// A join under memory pressure for a long time: it keeps evicting a row of each new
    /// millisecond, and reads each back (clearing it) 2 000 milliseconds later. The filters
    /// must follow the rows still out, not every row ever evicted: new keys keep skipping
    /// RocksDB, the filters' memory stays bounded, and nothing is left once all is read back.
    #[test]
    fn a_long_stream_of_evictions_read_back_keeps_filters_small() {
        let cap = 64 << 10;
        let mut s = Spilled::new(None, cap);
        let (n, lag) = (300_000i64, 2_000i64);
        let key = |ns: i64| ns as u64 * 0x9e37_79b9;
        let mut most = 0;
        for ns in 0..n {
            s.evicted(key(ns), ns, 0);
            if ns >= lag {
                s.read_back(ns - lag);
            }
            most = most.max(s.bytes());
            if ns % 10_000 == 9_999 {
                assert!(s.ranges.len() <= MAX_RANGES);
                assert!(
                    s.ranges.values().all(|r| r.keys.is_some()),
                    "a filter was given up at {ns}"
                );
                assert_new_keys_skip(&s, ns);
            }
        }
        assert!(most <= MAX_RANGES * cap, "{most} bytes of filters");
        assert!((n - lag..n).all(|ns| s.may_hold(key(ns), at(ns))));
        for ns in n - lag..n {
            s.read_back(ns);
        }
        assert!(s.is_empty() && s.bytes() == 0);
    }

    /// Rows that are never read back (removed by compaction once their TTL passed) keep their
    /// ranges counted for good. The ranges of old namespaces must then grow, not the newest
    /// one: a probe of recent namespaces keeps finding filters that know its key is new.
    #[test]
    fn ranges_kept_by_rows_never_read_back_stay_behind_the_new_ones() {
        let cap = 64 << 10;
        let mut s = Spilled::new(None, cap);
        let n = 300_000i64;
        let key = |ns: i64| ns as u64 * 0x9e37_79b9;
        for ns in 0..n {
            s.evicted(key(ns), ns, 0);
            // every other row is read back a while later; the rest stay out
            if ns >= 1_000 && ns % 2 == 0 {
                s.read_back(ns - 1_000);
            }
            if ns % 10_000 == 9_999 {
                assert!(s.ranges.len() <= MAX_RANGES);
                assert_new_keys_skip(&s, ns);
            }
        }
        assert!((0..n).all(|ns| ns % 2 == 0 && ns < n - 1_000 || s.may_hold(key(ns), at(ns))));
    }
}
