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

use super::aggregate::{self, AccColumn, Accs, AggDef, AggInputs};
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
            let mut last = u32::MAX;
            for &s in slots {
                if s != last {
                    self.present[s as usize / 64] |= 1 << (s % 64);
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

    fn bytes(&self) -> usize {
        let late = self.late.len() * (size_of::<((u32, i64), Accs)>() + 16);
        self.columns.iter().map(AccColumn::bytes).sum::<usize>()
            + self.present.capacity() * 8
            + late
    }
}
