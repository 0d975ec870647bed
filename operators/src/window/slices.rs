//! The columns of a window slice in a pane table: per aggregate one array over the slice's
//! keys, so adding a batch to a slice is a loop per aggregate over the batch's rows, a few
//! bytes touched per record.
//!
//! A slice's records count for every window over the slice, except records that arrived too
//! late for its earliest windows: those are kept apart per key, tagged with the end of the
//! first window they count for (rare, so they stay out of the columns). A row's value, as
//! written to RocksDB and merged when windows fire, is a [`SliceParts`]: the accumulators of
//! the records counting from the slice's first window (if any), then the late ones, by tag.
use std::collections::BTreeMap;
use std::sync::Arc;

use freshet_engine::state::PaneColumns;
use smallvec::SmallVec;

use super::aggregate::{self, Acc, AccColumn, Accs, AggDef, AggInputs};
use crate::values::ColumnReader;

/// The accumulators of one (key, slice), tagged with the end of the first window they count
/// for, sorted by it; one entry unless records arrived too late for some of the slice's
/// windows.
pub type SliceParts = SmallVec<[(i64, Accs); 1]>;

/// A slice's accumulators per key (row). See the module documentation.
#[derive(Debug, Clone)]
pub struct SliceColumns {
    aggs: Arc<[AggDef]>,
    /// A slice's first window ends one slide after the slice starts.
    slide: i64,
    /// Per aggregate, per row: the records counting from the slice's first window.
    columns: Vec<AccColumn>,
    /// One bit per row: the row has such records.
    present: Vec<u64>,
    /// Records too late for the slice's first windows, per (row, end of the first window they
    /// count for).
    late: BTreeMap<(u32, i64), Accs>,
}

/// What a batch gives the aggregates: evaluated arguments, filters and readers.
pub struct BatchInputs<'a> {
    /// Arguments and filters.
    pub inputs: &'a AggInputs,
    /// Readers over the arguments.
    pub readers: &'a [Option<ColumnReader<'a>>],
}

impl SliceColumns {
    /// Empty columns for `aggs` over slices `slide` long.
    pub fn new(aggs: &[AggDef], slide: i64) -> Self {
        SliceColumns {
            aggs: aggs.into(),
            slide,
            columns: aggs.iter().map(AccColumn::new).collect(),
            present: Vec::new(),
            late: BTreeMap::new(),
        }
    }

    /// Adds batch rows `rows[j]` to row `slots[j]`, counting from the window ending at
    /// `first_end` (`slice + slide` unless the records were late for the slice's first windows).
    pub fn add(
        &mut self,
        slice: i64,
        first_end: i64,
        batch: &BatchInputs<'_>,
        rows: &[u32],
        slots: &[u32],
    ) {
        if first_end == slice + self.slide {
            for (i, (d, c)) in self.aggs.iter().zip(self.columns.iter_mut()).enumerate() {
                aggregate::update_column(d, c, i, batch.inputs, batch.readers, rows, slots);
            }
            if let Some(s) = aggregate::one_slot(slots) {
                self.set_present(s);
                return;
            }
            let mut last = u32::MAX;
            for &s in slots {
                if s != last {
                    self.set_present(s);
                    last = s;
                }
            }
            return;
        }
        for (r, s) in rows.iter().zip(slots) {
            let accs = self
                .late
                .entry((*s, first_end))
                .or_insert_with(|| self.aggs.iter().map(AggDef::new_acc).collect());
            aggregate::update(&self.aggs, accs, batch.inputs, batch.readers, *r as usize);
        }
    }

    fn is_present(&self, row: u32) -> bool {
        self.present[row as usize / 64] & (1 << (row % 64)) != 0
    }

    fn set_present(&mut self, row: u32) {
        self.present[row as usize / 64] |= 1 << (row % 64);
    }

    /// Merges `accs` into the late records of row `row` counting from the window ending at
    /// `end`.
    fn merge_late(&mut self, row: u32, end: i64, accs: &[Acc]) {
        match self.late.get_mut(&(row, end)) {
            Some(into) => {
                for ((d, a), b) in self.aggs.iter().zip(into.iter_mut()).zip(accs) {
                    aggregate::merge(d, a, b);
                }
            }
            None => {
                self.late.insert((row, end), accs.iter().cloned().collect());
            }
        }
    }

    /// Merges what row `row` of slice `ns` holds for the window ending at `end` into row
    /// `out_row` of `out` (a column per aggregate); whether it held anything for it.
    pub fn merge_into_window(
        &self,
        ns: i64,
        row: u32,
        end: i64,
        out: &mut [AccColumn],
        out_row: u32,
    ) -> bool {
        let mut any = false;
        if self.is_present(row) && ns + self.slide <= end {
            for ((d, o), c) in self.aggs.iter().zip(out.iter_mut()).zip(&self.columns) {
                o.merge_row(d, out_row, c, row);
            }
            any = true;
        }
        if self.late.is_empty() {
            return any;
        }
        for ((_, first_end), accs) in self.late.range((row, i64::MIN)..=(row, end)) {
            debug_assert!(*first_end <= end);
            for ((d, o), a) in self.aggs.iter().zip(out.iter_mut()).zip(accs) {
                o.merge_acc(d, out_row, a);
            }
            any = true;
        }
        any
    }
}

impl PaneColumns for SliceColumns {
    type Value = SliceParts;

    fn resize(&mut self, rows: usize) {
        for c in &mut self.columns {
            c.resize(rows);
        }
        self.present.resize(rows.div_ceil(64), 0);
    }

    fn reserve(&mut self, rows: usize) {
        for c in &mut self.columns {
            c.reserve(rows);
        }
        self.present
            .reserve(rows.div_ceil(64).saturating_sub(self.present.len()));
    }

    fn value(&self, ns: i64, row: u32) -> SliceParts {
        let mut parts = SliceParts::new();
        if self.is_present(row) {
            let accs: Accs = self.columns.iter().map(|c| c.get(row)).collect();
            parts.push((ns + self.slide, accs));
        }
        for ((_, end), accs) in self.late.range((row, i64::MIN)..=(row, i64::MAX)) {
            parts.push((*end, accs.clone()));
        }
        parts
    }

    fn prefetch(&self, row: u32) {
        if let Some(word) = self.present.get(row as usize / 64) {
            freshet_engine::state::prefetch(word);
        }
        for c in &self.columns {
            c.prefetch(row);
        }
    }

    fn clear(&mut self) {
        self.columns.iter_mut().for_each(|c| c.truncate(0));
        self.present.clear();
        self.late.clear();
    }

    fn merge_value(&mut self, ns: i64, row: u32, value: SliceParts) {
        for (first_end, accs) in value {
            if first_end == ns + self.slide {
                for ((d, c), a) in self.aggs.iter().zip(&mut self.columns).zip(&accs) {
                    c.merge_acc(d, row, a);
                }
                self.set_present(row);
            } else {
                self.merge_late(row, first_end, &accs);
            }
        }
    }

    fn encode(&self, ns: i64, row: u32, out: &mut Vec<u8>) -> bool {
        let late = !self.late.is_empty()
            && self
                .late
                .range((row, i64::MIN)..=(row, i64::MAX))
                .next()
                .is_some();
        self.is_present(row)
            && !late
            && super::encoded::encode(&self.columns, row, ns + self.slide, out)
    }

    fn merge_encoded(&mut self, ns: i64, row: u32, encoded: &[u8]) -> bool {
        if !super::encoded::merge(&self.aggs, &mut self.columns, row, ns + self.slide, encoded) {
            return false;
        }
        self.set_present(row);
        true
    }

    fn merge_row(&mut self, _: i64, row: u32, from: &Self, from_row: u32) {
        if from.is_present(from_row) {
            for ((d, c), f) in self.aggs.iter().zip(&mut self.columns).zip(&from.columns) {
                c.merge_row(d, row, f, from_row);
            }
            self.set_present(row);
        }
        for ((_, end), accs) in from.late.range((from_row, i64::MIN)..=(from_row, i64::MAX)) {
            self.merge_late(row, *end, accs);
        }
    }

    fn bytes(&self) -> usize {
        let late = self.late.len() * (size_of::<((u32, i64), Accs)>() + 16);
        self.columns.iter().map(AccColumn::bytes).sum::<usize>()
            + self.present.capacity() * 8
            + late
    }
}
