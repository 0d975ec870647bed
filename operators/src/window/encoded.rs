//! A slice's spilled value ([`SliceParts`]) merged straight from its encoding into a slice's
//! columns, and written straight from them. Firing a window that spilled reads a value per key
//! and generation, and a spill or flush writes one per key; the common shape, one part
//! counting from the slice's first window whose accumulators are counts, sums and averages, is
//! read and written here without building the value. Anything else (late parts, other
//! accumulators, an encoding this reader is not sure of) is declined and left to serde, so a
//! value read or written here is exactly what serde would read or write.
//!
//! The encoding is postcard's: lengths and integers as LEB128 varints (signed ones zigzagged),
//! an enum as its variant's index then its fields, a float as 8 bytes little-endian, a bool as
//! one byte.
use super::aggregate::{Acc, AccColumn, AggDef};
#[cfg(test)]
use super::slices::SliceParts;

/// The variants of [`super::aggregate::Acc`] read here, by their index.
const COUNT: u64 = 0;
const SUM_INT: u64 = 2;
const SUM_FLOAT: u64 = 3;
const AVG: u64 = 6;

/// Accumulators at most one value holds for this reader.
const MAX_ACCS: usize = 8;

/// A numeric accumulator as read.
#[derive(Debug, Clone, Copy)]
enum Num {
    Count(i64),
    SumInt(i64, bool),
    SumFloat(f64, bool),
    Avg(f64, i64),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// An unsigned LEB128 varint of at most 64 bits.
    fn varint(&mut self) -> Option<u64> {
        let mut out = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            if i == 9 && b > 1 {
                return None;
            }
            out |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }

    fn signed(&mut self) -> Option<i64> {
        let v = self.varint()?;
        Some((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn float(&mut self) -> Option<f64> {
        let bytes = self.bytes.get(self.at..self.at + 8)?;
        self.at += 8;
        Some(f64::from_le_bytes(bytes.try_into().ok()?))
    }

    fn num(&mut self) -> Option<Num> {
        Some(match self.varint()? {
            COUNT => Num::Count(self.signed()?),
            SUM_INT => Num::SumInt(self.signed()?, self.bool()?),
            SUM_FLOAT => Num::SumFloat(self.float()?, self.bool()?),
            AVG => Num::Avg(self.float()?, self.signed()?),
            _ => return None,
        })
    }
}

/// Whether `num` is an accumulator of the kind `column` holds.
fn fits(column: &AccColumn, num: &Num) -> bool {
    matches!(
        (column, num),
        (AccColumn::Count(_), Num::Count(_))
            | (AccColumn::SumInt(..), Num::SumInt(..))
            | (AccColumn::SumFloat(..), Num::SumFloat(..))
            | (AccColumn::Avg(..), Num::Avg(..))
    )
}

impl From<Num> for Acc {
    fn from(num: Num) -> Acc {
        match num {
            Num::Count(n) => Acc::Count(n),
            Num::SumInt(s, any) => Acc::SumInt(s, any),
            Num::SumFloat(s, any) => Acc::SumFloat(s, any),
            Num::Avg(s, n) => Acc::Avg(s, n),
        }
    }
}

/// Merges the [`SliceParts`] encoded as `encoded` into row `row` of `columns` (one per
/// aggregate of `aggs`), if it is one part tagged `first_end` (the end of the slice's first
/// window) whose accumulators are of the columns' kinds; `false`, and nothing merged,
/// otherwise.
pub(super) fn merge(
    aggs: &[AggDef],
    columns: &mut [AccColumn],
    row: u32,
    first_end: i64,
    encoded: &[u8],
) -> bool {
    let mut r = Reader {
        bytes: encoded,
        at: 0,
    };
    let mut nums = [Num::Count(0); MAX_ACCS];
    let read = (|| {
        if r.varint()? != 1 || r.signed()? != first_end {
            return None;
        }
        let n = usize::try_from(r.varint()?).ok()?;
        if n != columns.len() || n > MAX_ACCS {
            return None;
        }
        for (num, column) in nums.iter_mut().zip(columns.iter()).take(n) {
            *num = r.num()?;
            if !fits(column, num) {
                return None;
            }
        }
        (r.at == encoded.len()).then_some(())
    })();
    if read.is_none() {
        return false;
    }
    for ((d, column), num) in aggs.iter().zip(columns.iter_mut()).zip(nums) {
        column.merge_acc(d, row, &num.into());
    }
    true
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn push_signed(out: &mut Vec<u8>, v: i64) {
    push_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Appends the encoding postcard gives a [`SliceParts`] of one part tagged `first_end` whose
/// accumulators are row `row` of `columns`, if they are counts, sums and averages; `false`,
/// with nothing appended, otherwise.
pub(super) fn encode(columns: &[AccColumn], row: u32, first_end: i64, out: &mut Vec<u8>) -> bool {
    let (r, start) = (row as usize, out.len());
    push_varint(out, 1);
    push_signed(out, first_end);
    push_varint(out, columns.len() as u64);
    for c in columns {
        match c {
            AccColumn::Count(n) => {
                push_varint(out, COUNT);
                push_signed(out, n[r]);
            }
            AccColumn::SumInt(s, any) => {
                push_varint(out, SUM_INT);
                push_signed(out, s[r]);
                out.push(any[r] as u8);
            }
            AccColumn::SumFloat(s, any) => {
                push_varint(out, SUM_FLOAT);
                out.extend_from_slice(&s[r].to_le_bytes());
                out.push(any[r] as u8);
            }
            AccColumn::Avg(s, n) => {
                push_varint(out, AVG);
                out.extend_from_slice(&s[r].to_le_bytes());
                push_signed(out, n[r]);
            }
            AccColumn::Any { .. } => {
                out.truncate(start);
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::slices::SliceColumns;
    use arrow::datatypes::{DataType, Field, Schema};
    use freshet_engine::state::PaneColumns;
    use smallvec::smallvec;

    fn aggs(texts: &[&str]) -> Vec<AggDef> {
        let schema = Schema::new(vec![
            Field::new("i", DataType::Int64, true),
            Field::new("f", DataType::Float64, true),
        ]);
        texts
            .iter()
            .map(|t| AggDef::compile(t, &schema).unwrap())
            .collect()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Integers of every width, both signs.
        fn int(&mut self) -> i64 {
            let bits = self.next() % 64;
            let v = (self.next() >> (63 - bits)) as i64;
            if self.next().is_multiple_of(2) {
                v
            } else {
                v.wrapping_neg()
            }
        }
    }

    /// A random accumulator of the kind `d` starts as.
    fn acc(d: &AggDef, rng: &mut Rng) -> Acc {
        match d.new_acc() {
            Acc::Count(_) => Acc::Count((rng.next() >> 24) as i64),
            Acc::SumInt(..) => Acc::SumInt(rng.int(), rng.next().is_multiple_of(2)),
            Acc::SumFloat(..) => {
                Acc::SumFloat(rng.int() as f64 / 7.0, rng.next().is_multiple_of(2))
            }
            Acc::Avg(..) => Acc::Avg(rng.int() as f64 / 3.0, (rng.next() >> 24) as i64),
            other => other,
        }
    }

    /// What a slice's row holds after merging `encoded` `times` times (the second into a row
    /// that holds something already), encoded to compare floats by their bits: through this
    /// reader if it reads it (`None` if it declines), and through serde (`None` if serde
    /// cannot decode it).
    fn both(
        defs: &[AggDef],
        ns: i64,
        encoded: &[u8],
        times: usize,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let empty = SliceColumns::new(defs, 10);
        let bytes = |v: SliceParts| postcard::to_allocvec(&v).unwrap();
        let decoded: Option<SliceParts> = postcard::from_bytes(encoded).ok();
        let by_serde = decoded.map(|v| {
            let mut c = empty.clone();
            c.resize(1);
            for _ in 0..times {
                c.merge_value(ns, 0, v.clone());
            }
            bytes(c.value(ns, 0))
        });
        let mut c = empty;
        c.resize(1);
        let read = (0..times).all(|_| c.merge_encoded(ns, 0, encoded));
        (read.then(|| bytes(c.value(ns, 0))), by_serde)
    }

    /// Counts alone; counts, sums and an average (the common shape); and a minimum, which
    /// this module declines.
    fn aggregate_sets() -> [Vec<AggDef>; 3] {
        [
            aggs(&["count(*) AS n"]),
            aggs(&["count(*) AS n", "sum(i) AS s", "sum(f) AS t", "avg(f) AS a"]),
            aggs(&["count(*) AS n", "min(i) AS m"]),
        ]
    }

    /// Rows of slice columns, encoded here when they have the common shape, encode as postcard
    /// encodes their values; rows with late parts or other accumulators are declined.
    #[test]
    fn writes_the_common_shape_as_postcard_does_and_declines_the_rest() {
        let sets = aggregate_sets();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let ns = -1_714_557_600_000;
        let (mut written, mut declined) = (0, 0);
        for defs in &sets {
            let mut c = SliceColumns::new(defs, 10);
            c.resize(3000);
            let mut late = vec![false; 3000];
            for row in 0..3000u32 {
                let accs = |rng: &mut Rng| defs.iter().map(|d| acc(d, rng)).collect();
                // mostly the common shape; some rows with late parts only, some with both
                let parts: SliceParts = match rng.next() % 4 {
                    0 => smallvec![(ns + 20, accs(&mut rng))],
                    1 => smallvec![(ns + 10, accs(&mut rng)), (ns + 30, accs(&mut rng))],
                    _ => smallvec![(ns + 10, accs(&mut rng))],
                };
                late[row as usize] = parts.iter().any(|(end, _)| *end != ns + 10);
                c.merge_value(ns, row, parts);
            }
            let common = !defs.iter().any(|d| matches!(d.new_acc(), Acc::Min(_)));
            for row in 0..3000u32 {
                let mut out = vec![7u8];
                let expected = postcard::to_allocvec(&c.value(ns, row)).unwrap();
                if c.encode(ns, row, &mut out) {
                    assert_eq!(out[1..], expected[..], "row {row}");
                    written += 1;
                } else {
                    assert_eq!(out, [7], "nothing appended when declined");
                    declined += 1;
                }
                assert_eq!(out.len() > 1, common && !late[row as usize], "row {row}");
            }
        }
        assert!(
            written > 2000 && declined > 3000,
            "{written} written, {declined} declined"
        );
    }

    #[test]
    fn reads_the_common_shape_as_serde_does_and_declines_the_rest() {
        let sets = aggregate_sets();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let ns = 1_714_557_600_000;
        let (mut read, mut declined) = (0, 0);
        for round in 0..20_000 {
            let defs = &sets[round % sets.len()];
            let accs = |rng: &mut Rng| defs.iter().map(|d| acc(d, rng)).collect();
            // mostly the common shape; some late parts, some several parts
            let parts: SliceParts = match rng.next() % 4 {
                0 => smallvec![(ns + 20, accs(&mut rng))],
                1 => smallvec![(ns + 10, accs(&mut rng)), (ns + 30, accs(&mut rng))],
                _ => smallvec![(ns + 10, accs(&mut rng))],
            };
            let encoded = postcard::to_allocvec(&parts).unwrap();
            let (fast, serde) = both(defs, ns, &encoded, 2);
            assert!(serde.is_some());
            let common = parts.len() == 1
                && parts[0].0 == ns + 10
                && !defs.iter().any(|d| matches!(d.new_acc(), Acc::Min(_)));
            assert_eq!(fast.is_some(), common, "{parts:?}");
            match fast {
                Some(fast) => {
                    assert_eq!(fast, serde.unwrap());
                    read += 1;
                }
                None => declined += 1,
            }
            // damaged: cut, a byte changed, a byte added. What this reader reads, serde reads
            // alike; it may decline more.
            let mut damaged = encoded.clone();
            let at = (rng.next() as usize) % damaged.len();
            match rng.next() % 3 {
                0 => damaged.truncate(at),
                1 => damaged[at] = rng.next() as u8,
                _ => damaged.insert(at, rng.next() as u8),
            }
            if let (Some(fast), serde) = both(defs, ns, &damaged, 1) {
                assert_eq!(Some(fast), serde, "{damaged:?}");
            }
        }
        assert!(
            read > 5_000 && declined > 5_000,
            "{read} read, {declined} declined"
        );
    }
}
