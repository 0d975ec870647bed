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
//! A range is one namespace until there are [`MAX_RANGES`] of them; then a row evicted at a
//! namespace no range holds widens the nearest range to it (ranges never overlap), so a few
//! ranges, each with its filter, cover any number of namespaces. A filter that outgrows its
//! share of memory is given up, and any key may then have rows in its range.
//!
//! Rows this process did not evict (a restored snapshot) are not counted: the namespaces the
//! restored table wrote before its snapshot are *unknown*, and a miss there always reads
//! RocksDB.
use super::bloom::GrowingBloom;
use std::collections::BTreeMap;
use std::ops::Bound;

/// A range of namespaces.
pub(crate) type NsRange = (Bound<i64>, Bound<i64>);

/// Every namespace.
pub(crate) const ALL: NsRange = (Bound::Unbounded, Bound::Unbounded);

/// Ranges counted, each with a filter; past this, a new namespace widens the nearest range.
const MAX_RANGES: usize = 64;

/// Keys a new filter is sized for. It grows by adding a filter four times the size of the last,
/// and a lookup probes each: few and large rather than many small ones.
const FILTER_START: usize = 1 << 14;

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
    /// The most one filter may take.
    filter_cap: usize,
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
    /// restored table's). One filter takes at most `filter_cap` bytes.
    pub(crate) fn new(unknown: Option<(i64, i64)>, filter_cap: usize) -> Self {
        Spilled {
            unknown,
            ranges: BTreeMap::new(),
            bytes: 0,
            filter_cap,
        }
    }

    /// True while RocksDB holds nothing the cache lacks: no miss needs a read.
    pub(crate) fn is_empty(&self) -> bool {
        self.unknown.is_none() && self.ranges.is_empty()
    }

    /// Estimated bytes of the filters.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
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
    /// `ns` is unknown): its filter will not take more memory.
    pub(crate) fn unfiltered(&self, ns: i64) -> bool {
        self.unknown.is_some_and(|u| overlaps(u, at(ns)))
            || self.overlapping(at(ns)).any(|(_, r)| r.keys.is_none())
    }

    /// Whether RocksDB may hold a row of the key with `hash` in `range` that the cache lacks.
    pub(crate) fn may_hold(&self, hash: u64, range: NsRange) -> bool {
        if self.unknown.is_some_and(|u| overlaps(u, range)) {
            return true;
        }
        self.overlapping(range)
            .any(|(_, r)| r.keys.as_ref().is_none_or(|f| f.contains(hash)))
    }

    /// Counts a row of the key with `hash` at `ns` that the cache evicted.
    pub(crate) fn evicted(&mut self, hash: u64, ns: i64) {
        if self.unknown.is_some_and(|u| overlaps(u, at(ns))) {
            return;
        }
        let lo = match self.holding(ns) {
            Some(lo) => lo,
            None => match self.widen_nearest(ns) {
                Some(lo) => lo,
                None => {
                    let f = GrowingBloom::new(FILTER_START);
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
            // a filter that would outgrow its share gives up before it allocates the stage
            if f.bytes_with_one_more() > self.filter_cap {
                self.bytes -= before;
                r.keys = None;
            } else {
                f.insert(hash);
                self.bytes = self.bytes + filter_bytes(f) - before;
            }
        }
    }

    /// With [`MAX_RANGES`] ranges counted, widens the one nearest `ns` (which no range holds)
    /// to hold it, and returns its first namespace; with fewer, `None`: `ns` gets a range.
    fn widen_nearest(&mut self, ns: i64) -> Option<i64> {
        if self.ranges.len() < MAX_RANGES {
            return None;
        }
        let below = self
            .ranges
            .range(..ns)
            .next_back()
            .map(|(lo, r)| (*lo, r.hi));
        let above = self.ranges.range(ns..).next().map(|(lo, _)| *lo);
        let widen_below = match (below, above) {
            (Some((_, hi)), Some(a)) => ns.abs_diff(hi) <= a.abs_diff(ns),
            (below, _) => below.is_some(),
        };
        if widen_below {
            let (lo, _) = below?;
            self.ranges.get_mut(&lo)?.hi = ns;
            Some(lo)
        } else {
            let r = self.ranges.remove(&above?)?;
            self.ranges.insert(ns, r);
            Some(ns)
        }
    }

    /// Takes a row at `ns` read back into the cache off the count.
    pub(crate) fn read_back(&mut self, ns: i64) {
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

    #[test]
    fn a_namespace_is_forgotten_once_its_rows_are_read_back() {
        let mut s = Spilled::new(None, 1 << 20);
        assert!(s.is_empty() && !s.may_hold(1, ALL));
        s.evicted(1, 10);
        s.evicted(2, 10);
        s.evicted(1, 20);
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
        s.evicted(7, 3);
        s.read_back(3);
        assert!(s.may_hold(7, at(3)), "uncounted rows may remain");
    }

    #[test]
    fn a_filter_past_its_share_holds_every_key() {
        let mut s = Spilled::new(None, 64 << 10);
        for h in 0..100_000u64 {
            s.evicted(h, 5);
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
            s.evicted(ns as u64, ns);
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
        // namespaces before every range widen the first one
        let mut t = Spilled::new(None, 1 << 20);
        for ns in (0..1_000i64).rev() {
            t.evicted(ns as u64, ns * 10);
        }
        assert!(t.ranges.len() <= MAX_RANGES);
        assert!((0..1_000i64).all(|ns| t.may_hold(ns as u64, at(ns * 10))));
    }
}
