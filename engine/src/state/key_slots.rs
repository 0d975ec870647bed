//! The index of a [`super::KeySet`]: an open-addressing table of 16-byte slots that holds short
//! keys inline, sized to any number of slots (not only powers of two) so that it can fill the
//! memory it is given.
//!
//! Probing is linear with Robin Hood placement: each slot records how far it sits from the
//! slot its hash points at, an insert takes the place of a key nearer its own, and a lookup
//! stops as soon as it passes a key nearer its own than the one it looks for. So a lookup of a
//! missing key ends after about as few slots as one of a present key, even with seven in eight
//! slots full. A removal shifts the keys after it back by one instead of leaving a tombstone.
//! Eviction ([`Index::evict`]) takes keys spread evenly over the slots, by CLOCK.
use std::hash::BuildHasher;

use crate::{EngineError, Result};

/// The hasher of key-set indexes: fixed, so that runs over the same input evict alike.
type Fixed = foldhash::quality::FixedState;

/// Up to 8 bytes as a little-endian word, in registers (no byte copies through memory, which
/// the loads of a comparison would then wait on).
#[inline]
pub(crate) fn word(bytes: &[u8]) -> u64 {
    debug_assert!(bytes.len() <= 8);
    match <[u8; 8]>::try_from(bytes) {
        Ok(b) => u64::from_le_bytes(b),
        Err(_) => bytes
            .iter()
            .enumerate()
            .fold(0, |w, (i, b)| w | (*b as u64) << (8 * i)),
    }
}

/// Keys up to this long are kept in a [`Slot`].
pub(crate) const SLOT_INLINE: usize = 9;

/// A short key's bytes, unpacked from its slot.
pub(crate) type KeyBuf = [u8; SLOT_INLINE];

/// The `len` of a slot whose key is longer than [`SLOT_INLINE`].
const LONG_LEN: u8 = u8::MAX;

/// Slot flag: the slot holds a key.
pub(crate) const OCCUPIED: u8 = 1;
/// The key changed since the last flush.
pub(crate) const DIRTY: u8 = 2;
/// RocksDB holds (or may hold) the key's row.
pub(crate) const PERSISTED: u8 = 4;
/// Used since the last eviction (CLOCK's reference bit).
pub(crate) const USED: u8 = 8;
/// Read ahead for an access still to come, which then counts as its first use.
pub(crate) const READ_AHEAD: u8 = 16;

/// One key in 16 bytes: a short key packed inline (bytes 0–7 in `lo`, byte 8 in `b8`), or a
/// long key's index among the long keys (low half of `lo`) and the high half of its hash (high
/// half); the time it was last touched, in the owner's ticks; the cache flags.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slot {
    lo: u64,
    pub(crate) touched: u32,
    b8: u8,
    /// The key's length, or [`LONG_LEN`].
    len: u8,
    pub(crate) flags: u8,
    /// Slots from the one the key's hash points at.
    dist: u8,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16);

impl Slot {
    /// The slot of `key` with no flags, and the high half of its hash: a short key's from its
    /// packed bytes (so a resize reads nothing but the slots), a long key's from its bytes. A
    /// long key's index is left 0 for [`LongKeys::add`].
    #[inline]
    pub(crate) fn of(key: &[u8], touched: u32) -> (Slot, u32) {
        if key.len() > SLOT_INLINE {
            let hash = Fixed::default().hash_one(key);
            let slot = Slot {
                lo: hash & 0xffff_ffff_0000_0000,
                len: LONG_LEN,
                touched,
                ..Slot::default()
            };
            return (slot, (hash >> 32) as u32);
        }
        let (head, tail) = key.split_at(key.len().min(8));
        let slot = Slot {
            lo: word(head),
            b8: tail.first().copied().unwrap_or(0),
            len: key.len() as u8,
            touched,
            ..Slot::default()
        };
        (slot, slot.short_hash())
    }

    /// Byte 8 and the length of a short key, as one number.
    #[inline]
    fn tail(&self) -> u16 {
        self.b8 as u16 | (self.len as u16) << 8
    }

    #[inline]
    fn short_hash(&self) -> u32 {
        (Fixed::default().hash_one((self.lo, self.tail())) >> 32) as u32
    }

    /// The high half of the key's hash.
    fn hash(&self) -> u32 {
        match self.is_long() {
            true => (self.lo >> 32) as u32,
            false => self.short_hash(),
        }
    }

    pub(crate) fn is_long(&self) -> bool {
        self.len == LONG_LEN
    }

    pub(crate) fn long_index(&self) -> usize {
        (self.lo & 0xffff_ffff) as usize
    }

    /// The key's bytes: a short key's unpacked into `buf`, a long key's from `long`.
    pub(crate) fn key<'a>(&self, buf: &'a mut KeyBuf, long: &'a LongKeys) -> &'a [u8] {
        if self.is_long() {
            return &long.keys[self.long_index()];
        }
        buf[..8].copy_from_slice(&self.lo.to_le_bytes());
        buf[8] = self.b8;
        &buf[..self.len as usize]
    }

    /// Whether this slot holds `key`, whose own slot is `probe`.
    #[inline]
    fn holds(&self, probe: &Slot, key: &[u8], long: &LongKeys) -> bool {
        if !probe.is_long() {
            return self.lo == probe.lo && self.tail() == probe.tail();
        }
        self.is_long()
            && self.lo >> 32 == probe.lo >> 32
            && long
                .keys
                .get(self.long_index())
                .is_some_and(|k| &k[..] == key)
    }
}

/// Keys longer than [`SLOT_INLINE`], by index; freed indexes are reused.
#[derive(Debug, Default)]
pub(crate) struct LongKeys {
    keys: Vec<Box<[u8]>>,
    free: Vec<u32>,
    /// Estimated heap bytes of the keys (each with an allocation's overhead).
    bytes: usize,
}

impl LongKeys {
    /// Stores `key` for `slot`.
    pub(crate) fn add(&mut self, slot: &mut Slot, key: &[u8]) -> Result<()> {
        self.bytes += key.len() + 16;
        let i = match self.free.pop() {
            Some(i) => {
                self.keys[i as usize] = key.into();
                i
            }
            None => {
                let i = u32::try_from(self.keys.len()).map_err(|_| {
                    EngineError::State("a key set passed 2^32 long keys in memory".into())
                })?;
                self.keys.push(key.into());
                i
            }
        };
        slot.lo |= i as u64;
        Ok(())
    }

    /// Frees the key of `slot`, if long.
    pub(crate) fn remove(&mut self, slot: &Slot) {
        if !slot.is_long() {
            return;
        }
        let i = slot.long_index();
        let key = std::mem::take(&mut self.keys[i]);
        self.bytes -= key.len() + 16;
        self.free.push(i as u32);
    }

    /// The long key at index `i`.
    pub(crate) fn key_at(&self, i: usize) -> &[u8] {
        &self.keys[i]
    }

    /// Heap bytes held: the keys and the two vectors.
    pub(crate) fn charge(&self) -> usize {
        self.bytes + self.keys.capacity() * 16 + self.free.capacity() * 4
    }
}

/// Whether [`Index::retain`] keeps a key.
pub(crate) enum Pass {
    Keep,
    Evict,
    /// Stop before this key (see [`Index::retain_from`]).
    Stop,
}

/// What eviction makes of a key, in the order keys go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Expired = 0,
    Idle = 1,
    Used = 2,
    /// Never evicted (changed since the last flush).
    Pinned = 3,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Index {
    slots: Vec<Slot>,
    len: usize,
    /// The longest distance from its home a key may sit at.
    max_dist: usize,
}

/// The longest distance a slot can record (in a byte).
const MAX_DIST: usize = u8::MAX as usize;

impl Default for Index {
    fn default() -> Self {
        Index {
            slots: Vec::new(),
            len: 0,
            max_dist: MAX_DIST,
        }
    }
}

impl Index {
    /// An empty index whose keys sit at most `max_dist` slots from their home (tests make it
    /// small to refuse keys often).
    #[cfg(test)]
    pub(crate) fn with_max_dist(max_dist: usize) -> Self {
        Index {
            max_dist: max_dist.min(MAX_DIST),
            ..Index::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Slots, free or not.
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Keys the index takes before it must grow or evict: seven in eight slots.
    pub(crate) fn max_len(&self) -> usize {
        self.slots.len() / 8 * 7
    }

    /// Bytes of the slots.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
    }

    fn home(&self, hash: u32) -> usize {
        ((hash as u64 * self.slots.len() as u64) >> 32) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// The position of `key` (whose slot and hash are `probe`), if the index holds it.
    #[inline]
    pub(crate) fn find(
        &self,
        key: &[u8],
        (probe, hash): &(Slot, u32),
        long: &LongKeys,
    ) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mut i = self.home(*hash);
        for d in 0..=self.max_dist {
            let s = &self.slots[i];
            if s.flags & OCCUPIED == 0 || (s.dist as usize) < d {
                return None;
            }
            if s.holds(probe, key, long) {
                return Some(i);
            }
            i = self.next(i);
        }
        None
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.slots[i]
    }

    /// Adds a key the index does not hold (there must be a free slot); false, changing
    /// nothing, if it would put a key further than the index allows from its home. That
    /// takes many keys whose hashes fall together, which input can be made of: the caller
    /// then keeps the key elsewhere.
    #[must_use]
    pub(crate) fn insert(&mut self, mut slot: Slot, hash: u32) -> bool {
        debug_assert!(self.len < self.slots.len());
        let home = self.home(hash);
        // a dry run of the placement below: the key, and each key it displaces in turn, must
        // end up within the allowed distance of its home
        let (mut i, mut d) = (home, 0usize);
        loop {
            let s = &self.slots[i];
            if s.flags & OCCUPIED == 0 {
                if d > self.max_dist {
                    return false;
                }
                break;
            }
            if (s.dist as usize) < d {
                if d > self.max_dist {
                    return false;
                }
                d = s.dist as usize;
            }
            d += 1;
            i = self.next(i);
        }
        slot.flags |= OCCUPIED;
        let (mut i, mut d) = (home, 0usize);
        loop {
            let s = &mut self.slots[i];
            if s.flags & OCCUPIED == 0 {
                slot.dist = d as u8;
                *s = slot;
                self.len += 1;
                return true;
            }
            if (s.dist as usize) < d {
                slot.dist = d as u8;
                std::mem::swap(s, &mut slot);
                d = slot.dist as usize;
            }
            d += 1;
            i = self.next(i);
        }
    }

    /// Removes the key at `i`, shifting the keys after it back; returns its slot.
    pub(crate) fn remove(&mut self, i: usize) -> Slot {
        let removed = self.slots[i];
        let mut hole = i;
        loop {
            let j = self.next(hole);
            let s = self.slots[j];
            if s.flags & OCCUPIED == 0 || s.dist == 0 {
                break;
            }
            self.slots[hole] = Slot {
                dist: s.dist - 1,
                ..s
            };
            hole = j;
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
        removed
    }

    /// Moves every key into an index of `slots` slots (at least the keys held, plus one), in
    /// place ([`Self::grow`], [`Self::shrink`]); returns the keys it refused (see
    /// [`Self::insert`]).
    #[must_use]
    pub(crate) fn resize(&mut self, slots: usize) -> Vec<Slot> {
        let slots = slots.max(self.len + 1).max(8);
        if self.len > 0 && slots > self.slots.len() {
            return self.grow(slots);
        }
        if self.len > 0 && slots < self.slots.len() {
            return self.shrink(slots);
        }
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); slots]);
        self.len = 0;
        let mut refused = Vec::new();
        for s in old.into_iter().filter(|s| s.flags & OCCUPIED != 0) {
            let hash = s.hash();
            if !self.insert(s, hash) {
                refused.push(s);
            }
        }
        refused
    }

    /// Takes out the keys that wrapped past the end of the slots (they sit first, further from
    /// their homes than from slot 0), for a resize to insert once it has moved the others.
    fn take_wrapped(&mut self) -> Vec<Slot> {
        let mut wrapped = Vec::new();
        for i in 0..self.slots.len() {
            let s = self.slots[i];
            if s.flags & OCCUPIED == 0 || s.dist as usize <= i {
                break;
            }
            wrapped.push(s);
            self.slots[i] = Slot::default();
        }
        wrapped
    }

    /// Sorts the run of keys from slot `i` (taken) that share its home, up to slot `n`, by
    /// their `home` in a resized index (the order a resize places them in), and returns where
    /// the run ends.
    fn sorted_run(&mut self, i: usize, n: usize, home: impl Fn(u32) -> usize) -> usize {
        let old_home = i - self.slots[i].dist as usize;
        let mut end = i + 1;
        while end < n
            && self.slots[end].flags & OCCUPIED != 0
            && end - self.slots[end].dist as usize == old_home
        {
            end += 1;
        }
        if end - i > 1 {
            self.slots[i..end].sort_unstable_by_key(|s| home(s.hash()));
        }
        end
    }

    /// Moves every key into `m` slots, more than now, in place: the allocation is extended
    /// (a large one by remapping its pages, not copying them), so the old index and the new
    /// are never held at once. Returns the keys refused.
    ///
    /// Homes grow with the hash, so keys sorted by hash stay in order, each at or after its
    /// old home. In the old index keys sit in order of home (those with one home in any order,
    /// which is sorted first), and a key's new position follows from the one before it. New
    /// positions and old ones both increase along that order, so the keys that move back can
    /// move first to last and those that move on last to first, each into a slot already
    /// left. Keys that wrapped past the end (old or new) are set aside and inserted after.
    fn grow(&mut self, m: usize) -> Vec<Slot> {
        let n = self.slots.len();
        let home = |hash: u32| ((hash as u64 * m as u64) >> 32) as usize;
        let mut aside = self.take_wrapped();
        let mut refused = Vec::new();
        self.slots.reserve_exact(m - n);
        self.slots.resize(m, Slot::default());
        // first to last: the new positions, and the moves back
        let mut next = 0;
        let mut i = 0;
        while i < n {
            if self.slots[i].flags & OCCUPIED == 0 {
                i += 1;
                continue;
            }
            let end = self.sorted_run(i, n, home);
            for q in i..end {
                let mut s = self.slots[q];
                let h = home(s.hash());
                let p = h.max(next);
                if p - h > self.max_dist || p >= m {
                    self.slots[q] = Slot::default();
                    match p >= m {
                        true => aside.push(s),
                        false => refused.push(s),
                    }
                    continue;
                }
                s.dist = (p - h) as u8;
                // a key moving back moves now; one moving on waits in place for the pass back
                self.slots[q] = Slot::default();
                debug_assert!(p >= q || self.slots[p].flags & OCCUPIED == 0);
                self.slots[p.min(q)] = s;
                next = p + 1;
            }
            i = end;
        }
        // last to first: the moves on
        for q in (0..n).rev() {
            let s = self.slots[q];
            if s.flags & OCCUPIED == 0 {
                continue;
            }
            let p = home(s.hash()) + s.dist as usize;
            if p > q {
                debug_assert!(self.slots[p].flags & OCCUPIED == 0);
                self.slots[p] = s;
                self.slots[q] = Slot::default();
            }
        }
        self.len -= aside.len() + refused.len();
        for s in aside {
            if !self.insert(s, s.hash()) {
                refused.push(s);
            }
        }
        refused
    }

    /// Moves every key into `m` slots, fewer than now but more than the keys, in place: the
    /// allocation is cut once the keys have moved (a large one by remapping its pages), so the
    /// old index and the new are never held at once. A set giving memory back shrinks its
    /// index when it is largest; a new index beside the old one took three quarters more for
    /// a moment, over a hundred megabytes at the default budget. Returns the keys refused.
    ///
    /// Homes shrink with the index, so along the order of old homes (see [`Self::grow`]) the new
    /// homes do not fall, each at or before its old home, and a key's new position follows from
    /// the one before it: at or before its old position, so one pass first to last moves every
    /// key into a slot already left. Keys that wrapped past the end (old or new) are set aside
    /// and inserted after.
    fn shrink(&mut self, m: usize) -> Vec<Slot> {
        let n = self.slots.len();
        debug_assert!(self.len < m && m < n);
        let home = |hash: u32| ((hash as u64 * m as u64) >> 32) as usize;
        let mut aside = self.take_wrapped();
        let mut refused = Vec::new();
        let mut next = 0;
        let mut i = 0;
        while i < n {
            if self.slots[i].flags & OCCUPIED == 0 {
                i += 1;
                continue;
            }
            let end = self.sorted_run(i, n, home);
            for q in i..end {
                let mut s = std::mem::take(&mut self.slots[q]);
                let h = home(s.hash());
                let p = h.max(next);
                if p >= m {
                    aside.push(s);
                } else if p - h > self.max_dist {
                    refused.push(s);
                } else {
                    debug_assert!(p <= q && self.slots[p].flags & OCCUPIED == 0);
                    s.dist = (p - h) as u8;
                    self.slots[p] = s;
                    next = p + 1;
                }
            }
            i = end;
        }
        debug_assert!(self.slots[m..].iter().all(|s| s.flags & OCCUPIED == 0));
        self.slots.truncate(m);
        self.slots.shrink_to_fit();
        self.len -= aside.len() + refused.len();
        for s in aside {
            if !self.insert(s, s.hash()) {
                refused.push(s);
            }
        }
        refused
    }

    /// Calls `f` with every key; removes those it answers [`Pass::Evict`] for. A key shifted
    /// back across the end of the slots may be seen twice.
    pub(crate) fn retain(&mut self, f: impl FnMut(&mut Slot) -> Pass) {
        self.retain_from(0, f);
    }

    /// [`Index::retain`] from slot `from` on, until `f` answers [`Pass::Stop`] for a key:
    /// returns that key's slot (where a later call goes on), or the number of slots.
    pub(crate) fn retain_from(
        &mut self,
        from: usize,
        mut f: impl FnMut(&mut Slot) -> Pass,
    ) -> usize {
        let mut i = from;
        while i < self.slots.len() {
            let s = &mut self.slots[i];
            if s.flags & OCCUPIED != 0 {
                match f(s) {
                    Pass::Keep => {}
                    // the key shifted into `i` is looked at next
                    Pass::Evict => {
                        self.remove(i);
                        continue;
                    }
                    Pass::Stop => return i,
                }
            }
            i += 1;
        }
        self.slots.len()
    }

    /// Evicts `n` keys spread evenly over the slots (evicting a run of neighbours would leave
    /// the other slots fuller than the index allows): expired keys first, then keys not used
    /// since the last eviction, then used ones; every key kept loses its used mark, so a key
    /// is spared once for each use (CLOCK). `class` says what a key is, `evicted` hears of each
    /// key evicted. Returns the keys evicted.
    pub(crate) fn evict(
        &mut self,
        n: usize,
        class: impl Fn(&Slot) -> Class,
        mut evicted: impl FnMut(&Slot),
    ) -> usize {
        let mut count = [0usize; 4];
        for s in self.slots.iter().filter(|s| s.flags & OCCUPIED != 0) {
            count[class(s) as usize] += 1;
        }
        // how many of each class go, and an error-diffusing counter to spread them
        let mut left = n;
        let mut take = [0usize; 4];
        for c in [Class::Expired, Class::Idle, Class::Used] {
            take[c as usize] = left.min(count[c as usize]);
            left -= take[c as usize];
        }
        let mut acc = [0usize; 4];
        let mut done = 0;
        self.retain(|s| {
            let c = class(s) as usize;
            if c != Class::Pinned as usize && take[c] > 0 && done < n {
                acc[c] += take[c];
                if acc[c] >= count[c] {
                    acc[c] -= count[c];
                    evicted(s);
                    done += 1;
                    return Pass::Evict;
                }
            }
            s.flags &= !USED;
            Pass::Keep
        });
        done
    }

    /// Every key's slot.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.slots.iter_mut().filter(|s| s.flags & OCCUPIED != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Keys that differ in a few bytes only (integers in a row, as the key encoder writes
    /// them: a tag, then big-endian with the sign bit flipped; and short strings with a
    /// counter) fill an index to seven in eight slots without one refused, and sit as near
    /// their homes as random keys would. (A hash whose high bits kept the keys' pattern put
    /// sequential integers 56 slots from home on average, and with a stricter check refused
    /// keys at two in three slots full.)
    #[test]
    fn keys_alike_but_for_a_few_bytes_spread_over_the_index() {
        fn int(v: i64) -> Vec<u8> {
            let mut k = vec![1u8];
            k.extend_from_slice(&((v as u64) ^ (1 << 63)).to_be_bytes());
            k
        }
        type KeyOf = fn(i64) -> Vec<u8>;
        let shapes: [(&str, KeyOf); 3] = [
            ("integers", int),
            ("integers 1000 apart", |v| int(v * 1000)),
            ("strings", |v| format!("u{v}").into_bytes()),
        ];
        for (name, key) in shapes {
            let mut index = Index::default();
            assert!(index.resize(4096).is_empty());
            let n = index.max_len();
            let refused = (0..n as i64)
                .filter(|v| {
                    let (slot, hash) = Slot::of(&key(*v), 0);
                    !index.insert(slot, hash)
                })
                .count();
            assert_eq!(refused, 0, "{name}: {refused} of {n} refused");
            // about 3.5 slots on average from home at seven in eight full, for random homes
            let total: usize = index.iter_mut().map(|s| s.dist as usize).sum();
            let mean = total as f64 / n as f64;
            assert!(mean < 6.0, "{name}: {mean:.1} slots from home on average");
        }
    }

    /// Keys whose hashes all fall on one slot are placed until the next would sit further
    /// from home than the index allows; it is refused and the index is unchanged.
    #[test]
    fn a_key_too_far_from_home_is_refused() {
        let mut index = Index::with_max_dist(5);
        assert!(index.resize(64).is_empty());
        let long = LongKeys::default();
        let keys: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i]).collect();
        let placed: Vec<bool> = keys
            .iter()
            .map(|k| index.insert(Slot::of(k, 0).0, 7))
            .collect();
        // distances 0 to 5 are taken; a seventh key would sit 6 from home
        assert_eq!(placed, [true, true, true, true, true, true, false, false]);
        assert_eq!(index.len(), 6);
        for (k, placed) in keys.iter().zip(placed) {
            let probe = (Slot::of(k, 0).0, 7);
            assert_eq!(index.find(k, &probe, &long).is_some(), placed);
        }
    }

    /// Inserts, finds and removes (by position and by sweeps) agree with a set, through
    /// resizes, for short and long keys and at seven in eight slots full.
    #[test]
    fn the_index_agrees_with_a_set() {
        let mut index = Index::default();
        assert!(index.resize(1000).is_empty());
        let mut long = LongKeys::default();
        let mut model: HashSet<Vec<u8>> = HashSet::new();
        let key = |i: u64| -> Vec<u8> {
            match i % 4 {
                0 => format!("a longer key than inline {i}").into_bytes(),
                _ => (i as u128 * 2_654_435_761).to_le_bytes()[..(i % 11 + 1) as usize].to_vec(),
            }
        };
        let mut x = 1u64;
        for round in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = key(x % 3000);
            let probe = Slot::of(&k, round as u32);
            match (index.find(&k, &probe, &long), model.contains(&k)) {
                (Some(i), true) => {
                    if x.is_multiple_of(3) {
                        let s = index.remove(i);
                        long.remove(&s);
                        model.remove(&k);
                    }
                }
                (None, false) => {
                    if index.len() >= index.max_len() {
                        assert!(index.resize(index.slots() * 3 / 2).is_empty());
                    }
                    let (mut s, h) = probe;
                    if s.is_long() {
                        long.add(&mut s, &k).unwrap();
                    }
                    assert!(index.insert(s, h));
                    model.insert(k);
                }
                (found, held) => panic!("round {round}: found {found:?}, held {held}"),
            }
            if round % 5000 == 4999 {
                let mut buf: KeyBuf = Default::default();
                let before = index.len();
                // evict a third, then check the rest are all findable
                let mut gone = Vec::new();
                let evicted = index.evict(
                    before / 3,
                    |_| Class::Idle,
                    |s| {
                        gone.push(s.key(&mut buf, &long).to_vec());
                        long.remove(s);
                    },
                );
                assert_eq!(evicted, before / 3);
                for k in gone {
                    assert!(model.remove(&k));
                }
            }
            assert_eq!(index.len(), model.len());
        }
        for k in &model {
            assert!(index.find(k, &Slot::of(k, 0), &long).is_some());
        }
        let mut buf: KeyBuf = Default::default();
        let held: HashSet<Vec<u8>> = index
            .slots
            .iter()
            .filter(|s| s.flags & OCCUPIED != 0)
            .map(|s| s.key(&mut buf, &long).to_vec())
            .collect();
        assert_eq!(held, model);
    }

    /// Every key sits its recorded distance from its home, with no free slot between, in order
    /// of home.
    fn assert_robin_hood(index: &Index) {
        let n = index.slots();
        for (i, s) in index.slots.iter().enumerate() {
            if s.flags & OCCUPIED == 0 {
                continue;
            }
            let h = index.home(s.hash());
            // homes never fall along a run: a key sits no further from home than one before
            // it, plus one
            let before = index.slots[(i + n - 1) % n];
            if s.dist > 0 {
                assert!(s.dist <= before.dist + 1, "out of order at {i}");
            }
            assert_eq!((h + s.dist as usize) % n, i, "slot {i} of {n}");
            for d in 0..s.dist as usize {
                assert!(
                    index.slots[(h + d) % n].flags & OCCUPIED != 0,
                    "gap before {i}"
                );
            }
        }
    }

    /// Growing in place, by a slot or by five times, keeps every key findable where Robin Hood
    /// puts it; keys it cannot place as near home as allowed come back, and only those.
    #[test]
    fn an_index_grown_in_place_keeps_every_key_in_place() {
        let long = LongKeys::default();
        for max_dist in [2, MAX_DIST] {
            for start in [64usize, 1000, 4099] {
                for factor in [0.0, 0.125, 0.5, 1.0, 4.0] {
                    let mut index = Index::with_max_dist(max_dist);
                    assert!(index.resize(start).is_empty());
                    let mut held = Vec::new();
                    let mut i = start as u64 * 1_000;
                    while index.len() < index.max_len() {
                        i += 1;
                        let k = i.to_le_bytes();
                        let (s, h) = Slot::of(&k, 0);
                        if index.insert(s, h) {
                            held.push(k);
                        }
                    }
                    assert_robin_hood(&index);
                    let grown = start + 1 + (start as f64 * factor) as usize;
                    let refused = index.resize(grown);
                    assert_eq!(index.slots(), grown);
                    assert_robin_hood(&index);
                    let mut buf: KeyBuf = Default::default();
                    let refused: HashSet<Vec<u8>> = refused
                        .iter()
                        .map(|s| s.key(&mut buf, &long).to_vec())
                        .collect();
                    assert_eq!(index.len() + refused.len(), held.len());
                    if max_dist == MAX_DIST {
                        assert!(refused.is_empty());
                    }
                    for k in &held {
                        let found = index.find(k, &Slot::of(k, 0), &long).is_some();
                        assert_eq!(found, !refused.contains(&k[..]), "{start} x {factor}");
                    }
                }
            }
        }
    }
    /// Shrinking in place, to just above the keys held or by a slot, keeps every key findable
    /// where Robin Hood puts it and cuts the allocation where it is; keys it cannot place
    /// as near home as allowed come back, and only those.
    #[test]
    fn an_index_shrunk_in_place_keeps_every_key_in_place() {
        let long = LongKeys::default();
        for max_dist in [2, MAX_DIST] {
            for start in [64usize, 1000, 4099] {
                for full in [0.05, 0.4, 0.6, 0.875] {
                    let mut index = Index::with_max_dist(max_dist);
                    assert!(index.resize(start).is_empty());
                    let mut held = Vec::new();
                    let mut i = start as u64 * 7_000;
                    while (index.len() as f64) < start as f64 * full {
                        i += 1;
                        let k = i.to_le_bytes();
                        let (s, h) = Slot::of(&k, 0);
                        if index.insert(s, h) {
                            held.push(k);
                        }
                    }
                    let len = index.len();
                    for m in [start - 1, start * 3 / 4, len * 8 / 7 + 1, len + 1] {
                        if m <= len || m >= start || m < 8 {
                            continue;
                        }
                        let mut index = Index {
                            slots: index.slots.clone(),
                            len,
                            max_dist,
                        };
                        let at = index.slots.as_ptr();
                        let refused = index.resize(m);
                        assert_eq!(index.slots(), m);
                        assert_eq!(index.bytes(), m * std::mem::size_of::<Slot>());
                        // in place: glibc cuts a block it shrinks where it is (a new index
                        // would have been allocated while the old one was still held)
                        if cfg!(all(target_os = "linux", target_env = "gnu")) {
                            assert_eq!(index.slots.as_ptr(), at, "{start} to {m}");
                        }
                        assert_robin_hood(&index);
                        let mut buf: KeyBuf = Default::default();
                        let refused: HashSet<Vec<u8>> = refused
                            .iter()
                            .map(|s| s.key(&mut buf, &long).to_vec())
                            .collect();
                        assert_eq!(index.len() + refused.len(), held.len());
                        if max_dist == MAX_DIST {
                            assert!(refused.is_empty(), "{start} to {m}");
                        }
                        for k in &held {
                            let found = index.find(k, &Slot::of(k, 0), &long).is_some();
                            assert_eq!(found, !refused.contains(&k[..]), "{start} to {m}");
                        }
                    }
                }
            }
        }
    }
}
