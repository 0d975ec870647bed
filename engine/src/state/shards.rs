//! The map of a keyed table's cache, split by hash into [`SHARDS`] maps that grow on their own.
//!
//! A hash map's table doubles when it is full, so one map either fits its budget with room to
//! spare or does not fit at all: a table whose next size would pass the budget must stay at its
//! size and evict down to half of it each time it fills (a full table without free buckets
//! rehashes in place only when at most half full), and holds between a half and seven eighths of
//! what its buckets could hold, the rest of the budget unused. Split in sixteen, the map grows a
//! sixteenth at a time up to what the budget allows, and a shard that may not grow evicts its own
//! keys down to its half while the others stay as they are.
//!
//! A key's shard is given by bits of its hash that the maps' own hashing does not use to place
//! it (neither the low bits of the bucket index nor the top seven of the control byte).
use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use std::hash::BuildHasher;

use super::StateKey;

/// The hasher of state tables and timers: fixed, so that iteration order depends only on what was
/// inserted, and runs over the same input visit keys in the same order.
pub(super) type Fixed = foldhash::fast::FixedState;

/// How many maps a table's cache is split into.
pub(super) const SHARDS: usize = 16;

/// Where the shard number is taken from a key's hash.
const SHARD_SHIFT: u32 = 32;

/// Values per key, in [`SHARDS`] maps chosen by the key's hash.
#[derive(Debug)]
pub(super) struct ShardedMap<S> {
    shards: Vec<HashMap<StateKey, S, Fixed>>,
    hasher: Fixed,
    len: usize,
}

impl<S> Default for ShardedMap<S> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS)
                .map(|_| HashMap::with_hasher(Fixed::default()))
                .collect(),
            hasher: Fixed::default(),
            len: 0,
        }
    }
}

impl<S> ShardedMap<S> {
    /// The shard of `key`.
    pub(super) fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) >> SHARD_SHIFT) as usize % SHARDS
    }

    /// Shard `i`'s map.
    pub(super) fn shard(&self, i: usize) -> &HashMap<StateKey, S, Fixed> {
        &self.shards[i]
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys the shards hold without growing, in all.
    pub(super) fn capacity(&self) -> usize {
        self.shards.iter().map(HashMap::capacity).sum()
    }

    /// Bytes of the shards' tables.
    pub(super) fn allocation_size(&self) -> usize {
        self.shards.iter().map(HashMap::allocation_size).sum()
    }

    /// Whether a new key `key` would make its shard's table rehash (it has no free bucket).
    pub(super) fn full_for(&self, key: &[u8]) -> bool {
        let map = &self.shards[self.shard_of(key)];
        map.len() >= map.capacity() && !map.contains_key(key)
    }

    pub(super) fn get(&self, key: &[u8]) -> Option<&S> {
        self.shards[self.shard_of(key)].get(key)
    }

    pub(super) fn get_mut(&mut self, key: &[u8]) -> Option<&mut S> {
        let i = self.shard_of(key);
        self.shards[i].get_mut(key)
    }

    pub(super) fn contains_key(&self, key: &[u8]) -> bool {
        self.shards[self.shard_of(key)].contains_key(key)
    }

    pub(super) fn insert(&mut self, key: StateKey, value: S) -> Option<S> {
        let i = self.shard_of(&key);
        let old = self.shards[i].insert(key, value);
        self.len += usize::from(old.is_none());
        old
    }

    pub(super) fn remove(&mut self, key: &[u8]) -> Option<S> {
        let i = self.shard_of(key);
        let old = self.shards[i].remove(key);
        self.len -= usize::from(old.is_some());
        old
    }

    /// The value of `key`, inserted by `make` if absent, and whether it was.
    pub(super) fn get_or_insert_with(
        &mut self,
        key: &[u8],
        make: impl FnOnce() -> S,
    ) -> (&mut S, bool) {
        let i = self.shard_of(key);
        match self.shards[i].entry_ref(key) {
            EntryRef::Occupied(e) => (e.into_mut(), false),
            EntryRef::Vacant(e) => {
                self.len += 1;
                (e.insert(make()), true)
            }
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&StateKey, &S)> {
        self.shards.iter().flat_map(|m| m.iter())
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&StateKey, &mut S)> {
        self.shards.iter_mut().flat_map(|m| m.iter_mut())
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &S> {
        self.shards.iter().flat_map(|m| m.values())
    }

    /// Keeps the keys of shard `i` that `keep` says to keep.
    pub(super) fn retain_in(&mut self, i: usize, keep: impl FnMut(&StateKey, &mut S) -> bool) {
        let map = &mut self.shards[i];
        let before = map.len();
        map.retain(keep);
        self.len -= before - map.len();
    }

    /// Makes the buckets that removals from shard `i` left behind free again, by rehashing it
    /// in place, if fewer are free than it lacks of `half` keys (half of what its table holds:
    /// a table asked for room up to that rehashes in place rather than growing).
    pub(super) fn reclaim(&mut self, i: usize, half: usize) {
        let map = &mut self.shards[i];
        // (a margin for the estimate of `half`)
        let room = half.saturating_sub(map.len() + 16);
        if map.capacity() - map.len() < room {
            map.reserve(room);
        }
    }

    /// Shrinks each shard's table to what its keys and its part of `capacity` need.
    pub(super) fn shrink_to(&mut self, capacity: usize) {
        for map in &mut self.shards {
            map.shrink_to(capacity / SHARDS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys spread over every shard, and each is found in its own; the count follows inserts
    /// and removals; the shards grow one at a time.
    #[test]
    fn keys_spread_over_shards_that_grow_on_their_own() {
        let mut map: ShardedMap<u64> = ShardedMap::default();
        for k in 0..10_000u64 {
            assert!(map.insert(k.to_be_bytes().as_slice().into(), k).is_none());
        }
        assert!(
            map.insert(7u64.to_be_bytes().as_slice().into(), 8)
                .is_some()
        );
        assert_eq!(map.len(), 10_000);
        let sizes: Vec<usize> = (0..SHARDS).map(|i| map.shard(i).len()).collect();
        assert!(sizes.iter().all(|&n| n > 10_000 / SHARDS / 2), "{sizes:?}");
        assert_eq!(map.get(&7u64.to_be_bytes()), Some(&8));
        assert_eq!(map.remove(&9u64.to_be_bytes()), Some(9));
        assert_eq!(map.remove(&9u64.to_be_bytes()), None);
        assert_eq!(map.len(), 9_999);
        assert_eq!(map.iter().count(), 9_999);
        let (v, fresh) = map.get_or_insert_with(&9u64.to_be_bytes(), || 90);
        assert_eq!((*v, fresh), (90, true));
        assert!(!map.get_or_insert_with(&9u64.to_be_bytes(), || 0).1);
        map.retain_in(0, |_, _| false);
        assert_eq!(map.len(), 10_000 - sizes[0]);
        // fill one shard to its last free bucket: only a new key of that shard finds it full
        let mut k = 20_000u64;
        while map.shard(3).len() < map.shard(3).capacity() {
            let key = k.to_be_bytes();
            if map.shard_of(&key) == 3 {
                map.insert(key.as_slice().into(), k);
            }
            k += 1;
        }
        let (mut in_3, mut elsewhere) = (None, None);
        while in_3.is_none() || elsewhere.is_none() {
            k += 1;
            let key = k.to_be_bytes();
            if map.shard_of(&key) == 3 {
                in_3 = Some(key);
            } else if map.shard(map.shard_of(&key)).len() < map.shard(map.shard_of(&key)).capacity()
            {
                elsewhere = Some(key);
            }
        }
        assert!(map.full_for(&in_3.unwrap()));
        assert!(!map.full_for(&elsewhere.unwrap()));
        // a key the full shard holds already needs no room
        let held = map.shard(3).keys().next().unwrap().clone();
        assert!(!map.full_for(&held));
    }
}
