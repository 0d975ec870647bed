//! A growable Bloom filter over 64-bit key hashes whose probe touches one cache line per stage.
//!
//! Each stage is a *split-block* filter (the layout of Parquet's Bloom filters): 32-byte blocks
//! of eight 32-bit words, and a key sets one bit in each word of the one block its hash picks.
//! A sliced or classic filter touches a cache line per bit it checks (seven for 1%): with
//! filters far larger than the CPU's caches that was 9% of a deduplication's samples at 4M
//! keys; here a check is one line per stage. The filter grows by adding a stage four times the
//! capacity of the last, so a probe checks few stages and the total false-positive rate stays
//! near the sum of theirs; its owner bounds its bytes, and the stage that reaches the bound is
//! cut to what fits. Past that, the largest stage takes keys up to twice its capacity before
//! the filter refuses any (in its test the whole filter then answers yes for 3.9% of the keys
//! it does not hold).

/// Bits of filter per key of capacity (two bytes): a full stage answers yes for about one key
/// in a thousand it does not hold.
const BITS_PER_KEY: usize = 16;

/// How much larger each new stage is than the one before.
const GROWTH: usize = 4;

/// How many times its capacity a filter that may not grow puts into its largest stage before
/// it refuses keys: at twice, that stage answers yes for about 3% of the keys it does not hold
/// (0.1% when just full), where a filter that refused keys would make its owner read them all.
const OVERFILL: usize = 2;

/// Odd constants that derive a block's eight bit positions from one 32-bit hash (one per
/// word), as in Parquet's split-block filters.
const SALT: [u32; 8] = [
    0x47b6_137b,
    0x4497_4d91,
    0x8824_ad5b,
    0xa2b7_289d,
    0x7054_95c7,
    0x2df1_424b,
    0x9efc_4947,
    0x5c6b_fb31,
];

/// One stage: a fixed number of blocks.
#[derive(Debug)]
struct Stage {
    blocks: Vec<[u32; 8]>,
    capacity: usize,
    inserted: usize,
}

impl Stage {
    /// Blocks of a stage of `capacity` keys.
    fn blocks_for(capacity: usize) -> usize {
        (capacity * BITS_PER_KEY).div_ceil(256).max(1)
    }

    fn new(capacity: usize) -> Self {
        Stage {
            blocks: vec![[0; 8]; Self::blocks_for(capacity)],
            capacity,
            inserted: 0,
        }
    }

    /// The block a hash picks and the bit it sets in each word.
    #[inline]
    fn locate(&self, hash: u64) -> (usize, [u32; 8]) {
        // multiply-shift maps the upper half onto the blocks without a division
        let block = (((hash >> 32) * self.blocks.len() as u64) >> 32) as usize;
        let low = hash as u32;
        (block, SALT.map(|s| 1u32 << (low.wrapping_mul(s) >> 27)))
    }

    #[inline]
    fn insert(&mut self, hash: u64) {
        let (b, mask) = self.locate(hash);
        for (w, m) in self.blocks[b].iter_mut().zip(mask) {
            *w |= m;
        }
        self.inserted += 1;
    }

    #[inline]
    fn contains(&self, hash: u64) -> bool {
        let (b, mask) = self.locate(hash);
        self.blocks[b].iter().zip(mask).all(|(w, m)| w & m != 0)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct GrowingBloom {
    stages: Vec<Stage>,
    /// Keys the next stage holds, unless cut to the bytes left.
    next: usize,
}

/// Spreads a key hash's bits: the key hash also picks the key group (its low bits), so a
/// subtask's keys share some of them.
#[inline]
fn mix(hash: u64) -> u64 {
    let h = hash.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

impl GrowingBloom {
    /// An empty filter whose first stage holds `capacity` keys.
    pub(crate) fn new(capacity: usize) -> Self {
        Self::sized(capacity, capacity.saturating_mul(GROWTH))
    }

    /// An empty filter whose first stage holds `capacity` keys, made for about that many: if
    /// more come, the stages added hold `then` keys, and [`GROWTH`] times more each (a filter
    /// whose stages grew from its first would add a stage four times the size it was made for).
    pub(crate) fn sized(capacity: usize, then: usize) -> Self {
        GrowingBloom {
            stages: vec![Stage::new(capacity.max(1))],
            next: then.max(1),
        }
    }

    /// The most keys a stage of `bytes` holds.
    pub(crate) fn capacity_within(bytes: usize) -> usize {
        (bytes / 32).saturating_mul(256) / BITS_PER_KEY
    }

    /// Adds a key hash (adding one twice takes capacity twice) if the filter can hold it in
    /// `max_bytes`; false, leaving the filter as it was, if it cannot. A full filter adds its
    /// next stage ([`GROWTH`] times the one grown before it), or only what the bytes left hold
    /// if that is less, but not less than the one grown before: so a filter fills its bytes
    /// rather than stopping a fourfold stage short of them, and it never has more than one
    /// cut stage. A filter whose bytes hold no further stage fills its largest stage past its
    /// capacity ([`OVERFILL`]), answering yes more often, before it refuses keys.
    pub(crate) fn insert_within(&mut self, hash: u64, max_bytes: usize) -> bool {
        let last = self.stages.last().expect("at least one stage");
        if last.inserted >= last.capacity {
            let fits = Self::capacity_within(max_bytes.saturating_sub(self.bytes()));
            let next = self.next.min(fits);
            if next < (self.next / GROWTH).max(1) {
                return self.overfill(hash);
            }
            self.stages.push(Stage::new(next));
            self.next = self.next.saturating_mul(GROWTH);
        }
        self.stages
            .last_mut()
            .expect("pushed above")
            .insert(mix(hash));
        true
    }

    /// Adds a key hash to the largest stage past its capacity, up to [`OVERFILL`] times it;
    /// false if that stage is that full.
    fn overfill(&mut self, hash: u64) -> bool {
        let largest = self
            .stages
            .iter_mut()
            .max_by_key(|s| s.capacity)
            .expect("at least one stage");
        if largest.inserted >= largest.capacity.saturating_mul(OVERFILL) {
            return false;
        }
        largest.insert(mix(hash));
        true
    }

    /// Adds every hash `other` holds: its stages are OR-ed into this filter's stages of the
    /// same size (filters started at the same capacity have the same sizes, stage by stage),
    /// and any it has beyond them are taken over.
    pub(crate) fn merge(&mut self, other: GrowingBloom) {
        for (i, stage) in other.stages.into_iter().enumerate() {
            match self.stages.get_mut(i) {
                Some(mine) if mine.blocks.len() == stage.blocks.len() => {
                    for (a, b) in mine.blocks.iter_mut().zip(&stage.blocks) {
                        for (x, y) in a.iter_mut().zip(b) {
                            *x |= y;
                        }
                    }
                    mine.inserted += stage.inserted;
                }
                _ => self.stages.push(stage),
            }
        }
        self.next = self.next.max(other.next);
    }

    /// Whether the hash may have been added (never false for one that was).
    pub(crate) fn contains(&self, hash: u64) -> bool {
        let hash = mix(hash);
        self.stages.iter().any(|s| s.contains(hash))
    }

    /// Adds a key hash with no limit on the filter's bytes.
    #[cfg(test)]
    fn insert(&mut self, hash: u64) {
        assert!(self.insert_within(hash, usize::MAX));
    }

    /// Keys of capacity over all stages.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.stages.iter().map(|s| s.capacity).sum()
    }

    /// Bytes of the filter's blocks.
    pub(crate) fn bytes(&self) -> usize {
        self.stages.iter().map(|s| s.blocks.len() * 32).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes as the state gives them: XXH3 of encoded keys.
    fn h(i: u64) -> u64 {
        crate::keys::hash_key(&i.to_be_bytes())
    }

    /// A filter given a number of bytes fills them, its last stage cut to what they hold,
    /// then fills its largest stage to twice its capacity, and then refuses keys without
    /// changing; every key it took is still found, and few others.
    #[test]
    fn a_filter_fills_its_bytes_and_then_refuses_keys() {
        let max = 300 << 10;
        let mut f = GrowingBloom::new(1 << 10);
        let mut taken = 0u64;
        while f.insert_within(h(taken), max) {
            taken += 1;
            assert!(f.bytes() <= max, "{} bytes after {taken} keys", f.bytes());
        }
        // 1k, 4k, 16k, 64k keys take 170 KB; a fourfold stage (512 KB) would not fit, so
        // the last one holds what the 130 KB left hold instead of being refused outright
        let capacities: Vec<usize> = f.stages.iter().map(|s| s.capacity).collect();
        assert_eq!(capacities[..4], [1024, 4096, 16_384, 65_536]);
        assert_eq!(capacities.len(), 5, "{capacities:?}");
        assert!(capacities[4] > 65_536 && capacities[4] < 4 * 65_536);
        assert!(f.bytes() > max - 32, "{} of {max} bytes used", f.bytes());
        // the largest stage took twice its capacity
        let largest = capacities.iter().max().unwrap();
        assert_eq!(taken as usize, f.capacity() + largest);
        let bytes = f.bytes();
        assert!(!f.insert_within(h(taken), max), "full: a key is refused");
        assert_eq!(f.bytes(), bytes, "a refused key changes nothing");
        assert!((0..taken).all(|i| f.contains(h(i))), "a false negative");
        let absent = 100_000;
        let fp = (10_000_000..10_000_000 + absent)
            .filter(|i| f.contains(h(*i)))
            .count();
        // the overfilled stage at about 3%, the others at about 0.1% each
        assert!(
            fp < absent as usize / 20,
            "{fp} false positives of {absent}"
        );
        // given more room, it grows again
        assert!(f.insert_within(h(taken), 4 * max));
        assert_eq!(f.stages.len(), 6);
    }

    #[test]
    fn holds_every_key_added_and_few_others_as_it_grows() {
        let mut f = GrowingBloom::new(1 << 10);
        for i in 0..200_000 {
            f.insert(h(i));
        }
        assert!((0..200_000).all(|i| f.contains(h(i))), "a false negative");
        // 1k, 4k, 16k, 64k, 256k keys of capacity
        assert_eq!(f.stages.len(), 5);
        assert_eq!(f.capacity(), 1024 + 4096 + 16_384 + 65_536 + 262_144);
        assert!(f.bytes() >= f.capacity() * BITS_PER_KEY / 8);
        let absent = 100_000;
        let fp = (1_000_000..1_000_000 + absent)
            .filter(|i| f.contains(h(*i)))
            .count();
        // each full stage is at about 0.1%; the stages together stay under 1%
        assert!(
            fp < absent as usize / 100,
            "{fp} false positives of {absent}"
        );
        assert!(fp > 0, "a filter this full has some false positives");
    }

    /// A filter made for the keys it is expected to hold grows, if more come, by stages that
    /// start small again, not by one four times its size.
    #[test]
    fn a_sized_filter_grows_from_small_stages() {
        let mut f = GrowingBloom::sized(100_000, 1_024);
        for i in 0..100_000 {
            f.insert(h(i));
        }
        let full = f.bytes();
        assert_eq!(full, 100_000 * BITS_PER_KEY / 8);
        for i in 100_000..101_024 {
            f.insert(h(i));
        }
        assert_eq!(
            f.bytes() - full,
            1_024 * BITS_PER_KEY / 8,
            "one stage of 1 024 keys"
        );
        f.insert(h(101_024));
        assert_eq!(f.capacity(), 100_000 + 1_024 + 4_096);
        assert!((0..=101_024).all(|i| f.contains(h(i))));
    }

    #[test]
    fn a_merged_filter_holds_the_keys_of_both() {
        let mut a = GrowingBloom::new(1 << 10);
        let mut b = GrowingBloom::new(1 << 10);
        for i in 0..3_000 {
            a.insert(h(i));
        }
        for i in 3_000..3_500 {
            b.insert(h(i));
        }
        let (stages_a, stages_b) = (a.stages.len(), b.stages.len());
        assert!(stages_a > stages_b, "{stages_a} and {stages_b} stages");
        b.merge(a);
        assert_eq!(
            b.stages.len(),
            stages_a,
            "stage by stage, the longer's kept"
        );
        assert!((0..3_500).all(|i| b.contains(h(i))), "a false negative");
        let fp = (1_000_000..1_100_000u64)
            .filter(|i| b.contains(h(*i)))
            .count();
        assert!(fp < 1_000, "{fp} false positives of 100 000");
    }

    #[test]
    fn keys_sharing_their_low_bits_still_spread() {
        // a subtask owning half the key groups sees hashes whose lowest bits are constrained
        let mut f = GrowingBloom::new(50_000);
        let ours: Vec<u64> = (0..400_000u64)
            .map(h)
            .filter(|x| x % 128 < 64)
            .take(50_000)
            .collect();
        for x in &ours {
            f.insert(*x);
        }
        assert_eq!(f.stages.len(), 1);
        let others = (10_000_000..10_200_000u64)
            .map(h)
            .filter(|x| x % 128 < 64)
            .take(50_000);
        let fp = others.filter(|x| f.contains(*x)).count();
        assert!(fp < 250, "{fp} false positives of 50 000");
    }
}
