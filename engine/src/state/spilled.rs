//! What RocksDB holds of a table that its decoded-key cache does not, so that a cache miss can
//! skip RocksDB when RocksDB cannot have the rows asked for.
//!
//! Every row the cache evicts is counted under its namespace, and its key goes into that
//! namespace's Bloom filter; every row read back is taken off the count, and a namespace whose
//! rows have all been read back (a window slice that fired, say) is forgotten with its filter.
//! A miss for a key and a range of namespaces must read RocksDB only when a counted namespace in
//! the range has a filter that may hold the key. So a window whose open slice outgrows the cache
//! reads RocksDB for the keys it evicted from that slice (and about one in a hundred others),
//! not for every key new to the slice.
//!
//! Rows this process did not evict (a restored snapshot) are not counted: the namespaces the
//! restored table wrote before its snapshot are *unknown*, and a miss there always reads
//! RocksDB. So are namespaces given up on: a filter
//! that outgrows its share of memory, or more namespaces than are worth a filter each (a join
//! buffering per millisecond), which fold into the unknown range.
use super::bloom::GrowingBloom;
use std::collections::BTreeMap;
use std::ops::Bound;

/// A range of namespaces.
pub(crate) type NsRange = (Bound<i64>, Bound<i64>);

/// Every namespace.
pub(crate) const ALL: NsRange = (Bound::Unbounded, Bound::Unbounded);

/// Namespaces counted one by one; past this the lower half folds into the unknown range.
const MAX_NAMESPACES: usize = 64;

/// Keys a new filter is sized for. It grows by adding a filter four times the size of the last,
/// and a lookup probes each: few and large rather than many small ones.
const FILTER_START: usize = 1 << 14;

/// The evicted rows of one namespace.
#[derive(Debug)]
struct Namespace {
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
    by_ns: BTreeMap<i64, Namespace>,
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

impl Spilled {
    /// Nothing spilled yet; RocksDB may hold rows of any key in the namespaces `unknown` (a
    /// restored table's). One filter takes at most `filter_cap` bytes.
    pub(crate) fn new(unknown: Option<(i64, i64)>, filter_cap: usize) -> Self {
        Spilled {
            unknown,
            by_ns: BTreeMap::new(),
            bytes: 0,
            filter_cap,
        }
    }

    /// True while RocksDB holds nothing the cache lacks: no miss needs a read.
    pub(crate) fn is_empty(&self) -> bool {
        self.unknown.is_none() && self.by_ns.is_empty()
    }

    /// Estimated bytes of the filters.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether rows evicted at `ns` are no longer filtered (its filter outgrew its share, or
    /// `ns` is unknown): its filter will not take more memory.
    pub(crate) fn unfiltered(&self, ns: i64) -> bool {
        self.unknown
            .is_some_and(|u| overlaps(u, (Bound::Included(ns), Bound::Included(ns))))
            || self.by_ns.get(&ns).is_some_and(|n| n.keys.is_none())
    }

    /// Whether RocksDB may hold a row of the key with `hash` in `range` that the cache lacks.
    pub(crate) fn may_hold(&self, hash: u64, range: NsRange) -> bool {
        if self.unknown.is_some_and(|u| overlaps(u, range)) {
            return true;
        }
        self.by_ns
            .range(range)
            .any(|(_, n)| n.keys.as_ref().is_none_or(|f| f.contains(hash)))
    }

    /// Counts a row of the key with `hash` at `ns` that the cache evicted.
    pub(crate) fn evicted(&mut self, hash: u64, ns: i64) {
        if self
            .unknown
            .is_some_and(|u| overlaps(u, (Bound::Included(ns), Bound::Included(ns))))
        {
            return;
        }
        let n = match self.by_ns.entry(ns) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let f = GrowingBloom::new(FILTER_START);
                self.bytes += filter_bytes(&f);
                e.insert(Namespace {
                    rows: 0,
                    keys: Some(f),
                })
            }
        };
        n.rows += 1;
        if let Some(f) = &mut n.keys {
            let before = filter_bytes(f);
            // a filter that would outgrow its share gives up before it allocates the stage
            if f.bytes_with_one_more() > self.filter_cap {
                self.bytes -= before;
                n.keys = None;
            } else {
                f.insert(hash);
                self.bytes = self.bytes + filter_bytes(f) - before;
            }
        }
        if self.by_ns.len() > MAX_NAMESPACES {
            self.fold_lower_half();
        }
    }

    /// Takes a row at `ns` read back into the cache off the count.
    pub(crate) fn read_back(&mut self, ns: i64) {
        if let Some(n) = self.by_ns.get_mut(&ns) {
            n.rows -= 1;
            if n.rows == 0 {
                let n = self.by_ns.remove(&ns).expect("found above");
                self.bytes -= n.keys.as_ref().map_or(0, filter_bytes);
            }
        }
    }

    /// Gives up counting the lower half of the namespaces: they join the unknown range.
    fn fold_lower_half(&mut self) {
        let keep = self.by_ns.len() / 2;
        let split = *self
            .by_ns
            .keys()
            .nth(self.by_ns.len() - keep)
            .expect("over the limit");
        let upper = self.by_ns.split_off(&split);
        let lower = std::mem::replace(&mut self.by_ns, upper);
        let lo = *lower.keys().next().expect("not empty");
        let hi = *lower.keys().next_back().expect("not empty");
        self.bytes -= lower
            .values()
            .map(|n| n.keys.as_ref().map_or(0, filter_bytes))
            .sum::<usize>();
        self.unknown = Some(match self.unknown {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
        // counted namespaces inside the widened range are unknown now too
        if let Some((a, b)) = self.unknown {
            let inside: Vec<i64> = self.by_ns.range(a..=b).map(|(ns, _)| *ns).collect();
            for ns in inside {
                let n = self.by_ns.remove(&ns).expect("listed");
                self.bytes -= n.keys.as_ref().map_or(0, filter_bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ns: i64) -> NsRange {
        (Bound::Included(ns), Bound::Included(ns))
    }

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
    fn a_filter_past_its_share_holds_every_key_and_many_namespaces_fold() {
        let mut s = Spilled::new(None, 64 << 10);
        for h in 0..100_000u64 {
            s.evicted(h, 5);
        }
        assert!(s.may_hold(u64::MAX, at(5)), "the filter was given up");
        assert!(s.bytes() == 0, "{}", s.bytes());
        assert!(s.unfiltered(5) && !s.unfiltered(6));
        let mut t = Spilled::new(None, 1 << 20);
        for ns in 0..(MAX_NAMESPACES as i64 + 1) {
            t.evicted(ns as u64, ns);
        }
        assert!(t.may_hold(u64::MAX, at(0)), "folded into the unknown range");
        assert!(!t.may_hold(u64::MAX, at(MAX_NAMESPACES as i64 + 5)));
        assert!(t.by_ns.len() <= MAX_NAMESPACES / 2 + 1);
    }
}
