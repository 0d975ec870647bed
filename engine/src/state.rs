//! Keyed state: the one interface every stateful operator keeps its state in.
//!
//! A [`KeyedTable<V>`] holds values of type `V` per *(key, namespace)*: the key is the encoded key
//! of the record ([`crate::keys::KeyEncoder`]), the namespace an `i64` the operator chooses (the
//! start of a window slice, a record timestamp, or `0` for plain value state). That one shape
//! covers value state (one namespace), list state (`V = Vec<T>`) and map state (many namespaces,
//! ordered, range-scannable).
//!
//! **TTL.** A table may have an event-time time-to-live: every [`update`](KeyedTable::update)
//! touches the key with the event time of the record that caused it, and once the watermark
//! reaches `touched + ttl` the whole key is expired. Expired keys are invisible to reads
//! immediately ([`get`](KeyedTable::get) checks), and are deleted by [`expire`](KeyedTable::expire),
//! which operators call when the watermark advances; the cost is amortised (a key is looked at
//! again only when its previous deadline passes).
//!
//! The backend is in memory. Checkpointing will snapshot tables by key group (keys carry their
//! key group, see [`KeyedTable::key_groups_of`]) and a RocksDB backend will implement the same
//! methods; operators do not change.
use hashbrown::{HashMap, HashSet};
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::ops::Bound;
use std::ops::RangeBounds;
use std::time::Duration;

use crate::Watermark;

/// A key deleted by TTL, with the values it held.
pub type Expired<V> = (StateKey, Vec<(i64, V)>);

/// An encoded key as state stores it: keys of up to 24 bytes (any one or two numbers, short
/// strings) are kept inline, without a heap allocation or a pointer to follow.
pub type StateKey = SmallVec<[u8; 24]>;

/// The hasher of state tables and timers: fixed, so that iteration order depends only on what was
/// inserted, and runs over the same input visit keys in the same order.
type Fixed = foldhash::fast::FixedState;

/// Values per (key, namespace), with an optional event-time TTL per key.
#[derive(Debug)]
pub struct KeyedTable<V> {
    name: String,
    ttl: Option<i64>,
    keys: HashMap<StateKey, Slot<V>, Fixed>,
    deadlines: BinaryHeap<Reverse<(i64, StateKey)>>,
    entries: usize,
}

#[derive(Debug)]
struct Slot<V> {
    touched: i64,
    values: Namespaces<V>,
}

/// The values of one key, sorted by namespace. A key has few namespaces (a window's slices, a
/// join's timestamps within its interval), so a sorted vector beats a tree: one allocation,
/// binary search, contiguous range scans.
#[derive(Debug)]
struct Namespaces<V>(SmallVec<[(i64, V); 1]>);

impl<V> Namespaces<V> {
    fn new() -> Self {
        Namespaces(SmallVec::new())
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn find(&self, ns: i64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&ns, |(k, _)| *k)
    }

    fn get(&self, ns: i64) -> Option<&V> {
        self.find(ns).ok().map(|i| &self.0[i].1)
    }

    /// The value at `ns`, inserted with `init` if absent; and whether it was inserted.
    fn get_or_insert(&mut self, ns: i64, init: impl FnOnce() -> V) -> (&mut V, bool) {
        match self.find(ns) {
            Ok(i) => (&mut self.0[i].1, false),
            Err(i) => {
                self.0.insert(i, (ns, init()));
                (&mut self.0[i].1, true)
            }
        }
    }

    fn remove(&mut self, ns: i64) -> Option<V> {
        self.find(ns).ok().map(|i| self.0.remove(i).1)
    }

    fn bounds(&self, (lo, hi): (Bound<i64>, Bound<i64>)) -> std::ops::Range<usize> {
        let start = match lo {
            Bound::Included(x) => self.0.partition_point(|(k, _)| *k < x),
            Bound::Excluded(x) => self.0.partition_point(|(k, _)| *k <= x),
            Bound::Unbounded => 0,
        };
        let end = match hi {
            Bound::Included(x) => self.0.partition_point(|(k, _)| *k <= x),
            Bound::Excluded(x) => self.0.partition_point(|(k, _)| *k < x),
            Bound::Unbounded => self.0.len(),
        };
        start..end.max(start)
    }
}

impl<V> KeyedTable<V> {
    /// A table called `name` (used in errors and metrics) with an optional TTL.
    pub fn new(name: impl Into<String>, ttl: Option<Duration>) -> Self {
        KeyedTable {
            name: name.into(),
            ttl: ttl.map(|d| d.as_millis().min(i64::MAX as u128) as i64),
            keys: HashMap::with_hasher(Fixed::default()),
            deadlines: BinaryHeap::new(),
            entries: 0,
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of (key, namespace) entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True if the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Number of distinct keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn expired(&self, slot: &Slot<V>, clock: Watermark) -> bool {
        match self.ttl {
            Some(ttl) => clock.0 >= slot.touched.saturating_add(ttl),
            None => false,
        }
    }

    /// The value at (key, ns), unless absent or expired as of `clock`.
    pub fn get(&self, key: &[u8], ns: i64, clock: Watermark) -> Option<&V> {
        let slot = self.keys.get(key)?;
        if self.expired(slot, clock) {
            return None;
        }
        slot.values.get(ns)
    }

    /// Whether the key has any live value as of `clock`.
    pub fn contains_key(&self, key: &[u8], clock: Watermark) -> bool {
        self.keys
            .get(key)
            .is_some_and(|s| !self.expired(s, clock) && !s.values.is_empty())
    }

    /// Applies `f` to the value at (key, ns), creating it with `init` if absent; touches the key
    /// at event time `now` for TTL. A key that had expired as of `clock` starts over empty.
    pub fn update<R>(
        &mut self,
        key: &[u8],
        ns: i64,
        now: i64,
        clock: Watermark,
        init: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let ttl = self.ttl;
        let slot = match self.keys.get_mut(key) {
            Some(slot) => slot,
            None => {
                let boxed: StateKey = key.into();
                if let Some(ttl) = ttl {
                    self.deadlines
                        .push(Reverse((now.saturating_add(ttl), boxed.clone())));
                }
                self.keys.entry(boxed).or_insert(Slot {
                    touched: now,
                    values: Namespaces::new(),
                })
            }
        };
        if let Some(ttl) = ttl
            && clock.0 >= slot.touched.saturating_add(ttl)
        {
            self.entries -= slot.values.len();
            slot.values.clear();
        }
        slot.touched = slot.touched.max(now);
        let (v, inserted) = slot.values.get_or_insert(ns, init);
        if inserted {
            self.entries += 1;
        }
        f(v)
    }

    /// Removes the value at (key, ns); drops the key when it has no values left.
    pub fn remove(&mut self, key: &[u8], ns: i64) -> Option<V> {
        let slot = self.keys.get_mut(key)?;
        let v = slot.values.remove(ns);
        if v.is_some() {
            self.entries -= 1;
        }
        if slot.values.is_empty() {
            self.keys.remove(key);
        }
        v
    }

    /// Removes every value of a key.
    pub fn remove_key(&mut self, key: &[u8]) {
        if let Some(slot) = self.keys.remove(key) {
            self.entries -= slot.values.len();
        }
    }

    /// The live values of a key with namespaces in `range`, in namespace order.
    pub fn range<'a>(
        &'a self,
        key: &[u8],
        range: impl RangeBounds<i64>,
        clock: Watermark,
    ) -> impl Iterator<Item = (i64, &'a V)> + 'a {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let slot = self.keys.get(key).filter(|s| !self.expired(s, clock));
        slot.into_iter().flat_map(move |s| {
            s.values.0[s.values.bounds(bounds)]
                .iter()
                .map(|(k, v)| (*k, v))
        })
    }

    /// Mutable access to the values of a key with namespaces in `range`.
    pub fn range_mut<'a>(
        &'a mut self,
        key: &[u8],
        range: impl RangeBounds<i64>,
    ) -> impl Iterator<Item = (i64, &'a mut V)> + 'a {
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        self.keys.get_mut(key).into_iter().flat_map(move |s| {
            let r = s.values.bounds(bounds);
            s.values.0[r].iter_mut().map(|(k, v)| (*k, v))
        })
    }

    /// Removes and returns the values of a key with namespaces in `range`.
    pub fn drain_range(&mut self, key: &[u8], range: impl RangeBounds<i64>) -> Vec<(i64, V)> {
        let Some(slot) = self.keys.get_mut(key) else {
            return Vec::new();
        };
        let r = slot
            .values
            .bounds((range.start_bound().cloned(), range.end_bound().cloned()));
        let out: Vec<(i64, V)> = slot.values.0.drain(r).collect();
        self.entries -= out.len();
        if slot.values.is_empty() {
            self.keys.remove(key);
        }
        out
    }

    /// Deletes keys whose TTL passed as of `clock`; returns how many keys were deleted, with the
    /// values they held (operators that must report expiring state, such as unmatched join rows,
    /// use them; others drop them).
    pub fn expire(&mut self, clock: Watermark) -> Vec<Expired<V>> {
        let Some(ttl) = self.ttl else {
            return Vec::new();
        };
        let mut expired = Vec::new();
        while let Some(Reverse((deadline, _))) = self.deadlines.peek() {
            if *deadline > clock.0 {
                break;
            }
            let Reverse((_, key)) = self.deadlines.pop().expect("peeked");
            let Some(slot) = self.keys.get(&key) else {
                continue;
            };
            let due = slot.touched.saturating_add(ttl);
            if due <= clock.0 {
                let slot = self.keys.remove(&key).expect("present");
                self.entries -= slot.values.len();
                expired.push((key, slot.values.0.into_vec()));
            } else {
                self.deadlines.push(Reverse((due, key)));
            }
        }
        expired
    }

    /// Every key with its values (for end-of-input flushes and snapshots), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[(i64, V)])> {
        self.keys
            .iter()
            .map(|(k, s)| (k.as_ref(), s.values.0.as_slice()))
    }

    /// The key-group function keys of this table are partitioned by (for snapshots by key group).
    pub fn key_groups_of(key: &[u8], max_parallelism: u32) -> crate::KeyGroup {
        crate::keys::key_group(crate::keys::hash_key(key), max_parallelism)
    }
}

/// Event-time timers per (time, key): "call me back for this key when the watermark reaches t".
///
/// Registering the same (time, key) twice keeps one timer. Timers due at the same time fire in an
/// order that depends only on the sequence of registrations, so a rerun fires them alike. Timers
/// are state too and will be checkpointed with the operator's tables.
#[derive(Debug, Default)]
pub struct Timers {
    by_time: BTreeMap<i64, HashSet<StateKey, Fixed>>,
}

impl Timers {
    /// No timers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a timer for `key` at event time `t`.
    pub fn register(&mut self, t: i64, key: &[u8]) {
        let set = self.by_time.entry(t).or_default();
        if !set.contains(key) {
            set.insert(key.into());
        }
    }

    /// Removes and returns, in time order, every timer at or before `wm`.
    pub fn due(&mut self, wm: Watermark) -> Vec<(i64, Vec<StateKey>)> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_time.first_entry() {
            if *entry.key() > wm.0 {
                break;
            }
            let (t, keys) = entry.remove_entry();
            // the fixed hasher makes this order a function of the registrations alone
            out.push((t, keys.into_iter().collect()));
        }
        out
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.by_time.values().map(|s| s.len()).sum()
    }

    /// True if no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.by_time.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_hides_then_deletes_and_touch_extends() {
        let mut t: KeyedTable<u32> = KeyedTable::new("t", Some(Duration::from_millis(100)));
        t.update(b"a", 0, 1000, Watermark::MIN, || 0, |v| *v += 1);
        t.update(b"b", 0, 1000, Watermark::MIN, || 0, |v| *v += 1);
        // b is touched again later: its deadline moves
        t.update(b"b", 0, 1050, Watermark(1000), || 0, |v| *v += 1);
        assert_eq!(t.get(b"a", 0, Watermark(1099)), Some(&1));
        assert_eq!(
            t.get(b"a", 0, Watermark(1100)),
            None,
            "expired at touched + ttl"
        );
        let gone = t.expire(Watermark(1100));
        assert_eq!(gone.len(), 1);
        assert_eq!(&*gone[0].0, b"a");
        assert_eq!(t.get(b"b", 0, Watermark(1100)), Some(&2));
        assert_eq!(t.expire(Watermark(1149)).len(), 0);
        assert_eq!(t.expire(Watermark(1150)).len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn expired_key_starts_over_on_update() {
        let mut t: KeyedTable<u32> = KeyedTable::new("t", Some(Duration::from_millis(10)));
        t.update(b"k", 0, 0, Watermark::MIN, || 0, |v| *v += 5);
        let v = t.update(
            b"k",
            0,
            20,
            Watermark(15),
            || 0,
            |v| {
                *v += 1;
                *v
            },
        );
        assert_eq!(v, 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn namespaces_range_and_drain() {
        let mut t: KeyedTable<&str> = KeyedTable::new("t", None);
        for ns in [30, 10, 20] {
            t.update(b"k", ns, 0, Watermark::MIN, || "x", |_| ());
        }
        let got: Vec<i64> = t
            .range(b"k", 10..30, Watermark::MIN)
            .map(|(ns, _)| ns)
            .collect();
        assert_eq!(got, vec![10, 20]);
        assert_eq!(t.drain_range(b"k", ..=20).len(), 2);
        assert_eq!(t.len(), 1);
        t.remove(b"k", 30);
        assert_eq!(t.key_count(), 0);
    }

    #[test]
    fn timers_fire_in_order_once() {
        let mut timers = Timers::new();
        timers.register(20, b"b");
        timers.register(10, b"a");
        timers.register(10, b"a");
        assert_eq!(timers.len(), 2);
        let due = timers.due(Watermark(15));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.len(), 1);
        assert_eq!(timers.due(Watermark(25))[0].0, 20);
        assert!(timers.is_empty());
    }
}
