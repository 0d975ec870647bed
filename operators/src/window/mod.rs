//! Event-time windows per key: tumbling, sliding and session, with allowed lateness.
//!
//! **State.** Tumbling and sliding windows keep one accumulator set per *(key, slice)*, where a
//! slice is one `slide` of event time (tumbling: slide = size). A window is the merge of the
//! `size / slide` slices it covers, computed when it fires; so a record updates one slice, not
//! every window it belongs to. A record that is too late for the earliest windows of its slice
//! but not for the later ones is kept apart in the slice, tagged with the first window it counts
//! for, so it never reaches a window it was too late for, whatever the order of arrival. Session windows keep one accumulator set per *(key, session)*,
//! merging sessions a record bridges. State lives in the keyed-state interface.
//!
//! **Firing.** A window `[start, end)` fires when the watermark reaches `end - 1`; its row is
//! `key columns, window_start, window_end, aggregates`, with event time `end - 1`.
//!
//! **Lateness.** A record that arrives after its window fired but before the watermark reaches
//! `end - 1 + allowed_lateness` updates the window, and the window's row is emitted again with
//! the new values: rows are upserts keyed by *(key, window_start, window_end)*. A record too late
//! for every window it belongs to goes to the `late` side output (port 1) and is counted. Whether a
//! record is late is judged against the watermark of the input it arrived on.
//!
//! **Cleanup.** A slice is deleted when the watermark passes the lateness bound of the last
//! window that covers it; a session when it passes its own. Nothing else is kept.
pub mod aggregate;

use arrow::array::{ArrayRef, AsArray, Int64Array, TimestampMillisecondArray, UInt32Array};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::collections::HashSet;
use std::sync::Arc;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::keys::{EncodedKeys, KeyColumns};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::state::timers::FIRE_BATCH;
use freshet_engine::state::{KeyedTable, StateKey, Timers};
use freshet_engine::{Result, TIME_COLUMN, Watermark};
use smallvec::SmallVec;

use crate::expr::{Expr, ExprError, timestamp_type};
use aggregate::{Acc, Accs, AggDef, AggInputs};

/// Side output port of records too late for every window.
pub const LATE_PORT: usize = 1;

/// The shape of the windows, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Tumbling (`slide == size`) or sliding windows; `size` is a multiple of `slide`.
    Sliced {
        /// Window length.
        size: i64,
        /// Distance between window starts.
        slide: i64,
    },
    /// Session windows with an inactivity gap.
    Session {
        /// The gap.
        gap: i64,
    },
}

/// A compiled window transform, shared by all its subtasks.
#[derive(Debug, Clone)]
pub struct WindowPlan {
    kind: WindowKind,
    lateness: i64,
    keys: KeyColumns,
    aggs: Vec<AggDef>,
    having: Option<Expr>,
    output: SchemaRef,
}

/// Where a compile problem is: the key column, aggregate or `having` at an index.
#[derive(Debug)]
pub enum WindowError {
    /// A key column.
    Key(usize, String),
    /// An aggregate.
    Aggregate(usize, ExprError),
    /// The `having` clause.
    Having(ExprError),
}

impl WindowPlan {
    /// Compiles a window over `input`.
    pub fn compile(
        input: &Schema,
        key_by: &[String],
        kind: WindowKind,
        lateness: i64,
        aggregates: &[String],
        having: Option<&str>,
    ) -> Result<WindowPlan, WindowError> {
        let keys = KeyColumns::resolve(input, key_by).map_err(|(i, m)| WindowError::Key(i, m))?;
        let aggs: Vec<AggDef> = aggregates
            .iter()
            .enumerate()
            .map(|(i, a)| AggDef::compile(a, input).map_err(|e| WindowError::Aggregate(i, e)))
            .collect::<Result<_, _>>()?;
        let mut fields: Vec<Field> = key_by
            .iter()
            .zip(keys.encoder().key_types())
            .map(|(name, t)| Field::new(name, t.data_type(), true))
            .collect();
        fields.push(Field::new("window_start", timestamp_type(), false));
        fields.push(Field::new("window_end", timestamp_type(), false));
        for a in &aggs {
            if fields.iter().any(|f| f.name() == &a.name) {
                return Err(WindowError::Aggregate(
                    0,
                    ExprError {
                        message: format!(
                            "output column '{}' appears twice; name aggregates with AS",
                            a.name
                        ),
                    },
                ));
            }
            fields.push(Field::new(&a.name, a.output_type.clone(), true));
        }
        fields.push(Field::new(TIME_COLUMN, DataType::Int64, false));
        let output = Arc::new(Schema::new(fields));
        let having = having
            .map(|h| {
                let e = Expr::compile(h, &output).map_err(WindowError::Having)?;
                if e.data_type() != &DataType::Boolean {
                    return Err(WindowError::Having(ExprError {
                        message: "having must be a BOOLEAN condition".into(),
                    }));
                }
                Ok(e)
            })
            .transpose()?;
        Ok(WindowPlan {
            kind,
            lateness,
            keys,
            aggs,
            having,
            output,
        })
    }

    /// Output schema of the main output.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// Creates the operator for one subtask.
    pub fn instantiate(&self) -> WindowOperator {
        WindowOperator {
            plan: self.clone(),
            slices: KeyedTable::new("window-slices", None),
            sessions: KeyedTable::new("window-sessions", None),
            fire: Timers::new("fire"),
            cleanup: Timers::new("cleanup"),
            more: false,
            keys: EncodedKeys::default(),
        }
    }
}

/// The accumulators of one (key, slice), tagged with the end of the first window they count for;
/// one entry unless records arrived too late for some of the slice's windows.
type SliceParts = SmallVec<[(i64, Accs); 1]>;

/// Accumulators of one session.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Session {
    end: i64,
    accs: Accs,
}

/// The window operator of one subtask. See the module documentation.
pub struct WindowOperator {
    plan: WindowPlan,
    /// Per (key, slice start): accumulators tagged with the end of the first window they count
    /// for (one entry unless late records arrived), sorted by that end.
    slices: KeyedTable<SliceParts>,
    sessions: KeyedTable<Session>,
    fire: Timers,
    cleanup: Timers,
    keys: EncodedKeys,
    /// The last `on_watermark` fired a full batch of windows and may have more.
    more: bool,
}

/// What a batch gives the window, computed once per batch: event times, aggregate arguments.
struct Rows<'a> {
    times: &'a [i64],
    inputs: &'a AggInputs,
    readers: &'a [Option<crate::values::ColumnReader<'a>>],
}

/// A window result before it becomes a row.
struct Fired {
    key: StateKey,
    start: i64,
    end: i64,
    accs: Accs,
}

fn merge_into(aggs: &[AggDef], out: &mut Option<Accs>, accs: &[Acc]) {
    match out {
        None => *out = Some(accs.iter().cloned().collect()),
        Some(o) => {
            for ((d, a), b) in aggs.iter().zip(o.iter_mut()).zip(accs) {
                aggregate::merge(d, a, b);
            }
        }
    }
}

/// The rows of a batch grouped by (key, slice, first window), groups in order of first
/// appearance and rows in batch order within a group.
struct SliceGroups {
    /// Per group: its first row, slice start and first window end.
    heads: Vec<(u32, i64, i64)>,
    /// Row numbers, grouped: group `g` is `order[offsets[g]..offsets[g + 1]]`.
    order: Vec<u32>,
    offsets: Vec<u32>,
}

type GroupKey<'k> = (&'k [u8], i64, i64);

impl SliceGroups {
    /// Groups rows `0..n` by what `tag` says of each (`None`: the row is left out). Each distinct
    /// key is hashed once per run of rows that share it.
    fn of<'k>(n: usize, mut tag: impl FnMut(usize) -> Option<GroupKey<'k>>) -> SliceGroups {
        const NONE: u32 = u32::MAX;
        let mut index: hashbrown::HashMap<GroupKey<'k>, u32, foldhash::fast::FixedState> =
            hashbrown::HashMap::default();
        let mut heads = Vec::new();
        let mut group_of = Vec::with_capacity(n);
        let mut counts: Vec<u32> = Vec::new();
        let mut last: Option<(GroupKey<'k>, u32)> = None;
        for row in 0..n {
            let Some(k) = tag(row) else {
                group_of.push(NONE);
                continue;
            };
            let g = match last {
                Some((prev, g)) if prev == k => g,
                _ => *index.entry(k).or_insert_with(|| {
                    heads.push((row as u32, k.1, k.2));
                    counts.push(0);
                    (heads.len() - 1) as u32
                }),
            };
            last = Some((k, g));
            counts[g as usize] += 1;
            group_of.push(g);
        }
        // counting sort of the rows by group, stable
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        let mut at = 0u32;
        offsets.push(0);
        for c in &counts {
            at += c;
            offsets.push(at);
        }
        let mut next: Vec<u32> = offsets[..counts.len()].to_vec();
        let mut order = vec![0u32; at as usize];
        for (row, &g) in group_of.iter().enumerate() {
            if g != NONE {
                order[next[g as usize] as usize] = row as u32;
                next[g as usize] += 1;
            }
        }
        SliceGroups {
            heads,
            order,
            offsets,
        }
    }

    /// The rows of group `g`, in batch order.
    fn rows(&self, g: usize) -> &[u32] {
        &self.order[self.offsets[g] as usize..self.offsets[g + 1] as usize]
    }
}

impl WindowOperator {
    fn new_accs(&self) -> Accs {
        self.plan.aggs.iter().map(AggDef::new_acc).collect()
    }

    /// The merged accumulators of window `[start, end)` for `key` (sliced windows).
    fn window_accs(&mut self, key: &[u8], start: i64, end: i64) -> Result<Option<Accs>> {
        let mut out: Option<Accs> = None;
        let aggs = &self.plan.aggs;
        let parts = self
            .slices
            .range(key, start..end, Watermark::MIN)?
            .flat_map(|(_, parts)| parts.iter());
        for (_, accs) in parts.filter(|(first_end, _)| *first_end <= end) {
            merge_into(aggs, &mut out, accs);
        }
        Ok(out)
    }

    /// Fires window `[end - size, end)` of `key`. Without lateness, the window's first slice is
    /// covered by no later window, so it is taken out of state instead of copied.
    fn fire_sliced(&mut self, key: &[u8], size: i64, slide: i64, end: i64) -> Result<Option<Accs>> {
        let start = end - size;
        if self.plan.lateness > 0 {
            return self.window_accs(key, start, end);
        }
        let first = self.slices.remove(key, start)?;
        let mut out = if size > slide {
            self.window_accs(key, start + slide, end)?
        } else {
            None
        };
        for (_, accs) in first.into_iter().flatten() {
            match &mut out {
                None => out = Some(accs),
                Some(o) => {
                    for ((d, a), b) in self.plan.aggs.iter().zip(o.iter_mut()).zip(&accs) {
                        aggregate::merge(d, a, b);
                    }
                }
            }
        }
        Ok(out)
    }

    fn emit_rows(&self, rows: Vec<Fired>, out: &mut dyn Output) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut cols: Vec<ArrayRef> = self
            .plan
            .keys
            .encoder()
            .decode(rows.iter().map(|r| r.key.as_ref()))?;
        cols.push(Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.start),
        )));
        cols.push(Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.end),
        )));
        for (i, d) in self.plan.aggs.iter().enumerate() {
            let accs: Vec<&Acc> = rows.iter().map(|r| &r.accs[i]).collect();
            cols.push(aggregate::output_column(d, &accs)?);
        }
        cols.push(Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.end - 1),
        )));
        let batch = RecordBatch::try_new(self.plan.output.clone(), cols)?;
        let batch = match &self.plan.having {
            Some(h) => filter_record_batch(&batch, &h.evaluate_predicate(&batch)?)?,
            None => batch,
        };
        out.emit(MAIN_PORT, batch);
        Ok(())
    }

    /// Sliced windows, a batch at a time: rows are grouped by (key, slice, first window), each
    /// group is added to its slice with one state access, and aggregates run as loops over the
    /// group's rows (in their order, so results do not depend on how input is batched).
    fn process_sliced(
        &mut self,
        size: i64,
        slide: i64,
        rows: Rows<'_>,
        ctx: &OperatorContext<'_>,
    ) -> Result<(Vec<u32>, Vec<Fired>)> {
        let lateness = self.plan.lateness;
        let (rw, w) = (ctx.record_watermark.0, ctx.current_watermark.0);
        let Rows {
            times,
            inputs,
            readers,
        } = rows;
        let aggs = &self.plan.aggs;
        let keys = &self.keys;
        let mut late = Vec::new();
        let groups = SliceGroups::of(times.len(), |row| {
            let t = times[row];
            let slice = t - t.rem_euclid(slide);
            let last_end = slice + size;
            if rw >= (last_end - 1).saturating_add(lateness) {
                late.push(row as u32);
                return None;
            }
            if !inputs.any_selected(row) && !aggs.is_empty() {
                return None;
            }
            // the first window of this slice the record is not too late for
            let mut first_end = slice + slide;
            while rw >= (first_end - 1).saturating_add(lateness) {
                first_end += slide;
            }
            Some((keys.row(row), slice, first_end))
        });
        let mut updated: HashSet<(StateKey, i64)> = HashSet::new();
        for (g, &(first, slice, first_end)) in groups.heads.iter().enumerate() {
            let members = groups.rows(g);
            let key = keys.row(first as usize);
            // as the rows one by one would have touched it: with the latest of their times
            let touched = members.iter().map(|r| times[*r as usize]).max();
            let touched = touched.expect("a group has rows");
            let mut created = false;
            self.slices.update(
                key,
                slice,
                touched,
                Watermark::MIN,
                SmallVec::new,
                |parts| {
                    let i = match parts.binary_search_by_key(&first_end, |(e, _)| *e) {
                        Ok(i) => i,
                        Err(i) => {
                            created = true;
                            parts
                                .insert(i, (first_end, aggs.iter().map(AggDef::new_acc).collect()));
                            i
                        }
                    };
                    aggregate::update_rows(aggs, &mut parts[i].1, inputs, readers, members);
                },
            )?;
            let last_end = slice + size;
            let mut end = first_end;
            while end <= last_end {
                if w >= end - 1 {
                    // the window already fired: emit it again with these records
                    updated.insert((key.into(), end));
                } else if created {
                    self.fire.register(end - 1, key)?;
                }
                end += slide;
            }
            // without lateness a slice is released when its last window fires
            if created && lateness > 0 {
                self.cleanup
                    .register((last_end - 1).saturating_add(lateness), key)?;
            }
        }
        let mut updated: Vec<(StateKey, i64)> = updated.into_iter().collect();
        updated.sort_unstable();
        let mut fired = Vec::with_capacity(updated.len());
        for (key, end) in updated {
            if let Some(accs) = self.window_accs(&key, end - size, end)? {
                fired.push(Fired {
                    key,
                    start: end - size,
                    end,
                    accs,
                });
            }
        }
        Ok((late, fired))
    }

    fn process_sessions(
        &mut self,
        gap: i64,
        rows: Rows<'_>,
        ctx: &OperatorContext<'_>,
    ) -> Result<(Vec<u32>, Vec<Fired>)> {
        let lateness = self.plan.lateness;
        let (rw, w) = (ctx.record_watermark.0, ctx.current_watermark.0);
        let Rows {
            times,
            inputs,
            readers,
        } = rows;
        let mut late = Vec::new();
        let mut updated: Vec<(StateKey, i64)> = Vec::new();
        for (row, &t) in times.iter().enumerate() {
            if rw >= (t + gap - 1).saturating_add(lateness) {
                late.push(row as u32);
                continue;
            }
            let key: StateKey = self.keys.row(row).into();
            // Sessions this record touches: start < t + gap and end > t.
            let touching: Vec<i64> = self
                .sessions
                .range(&key, ..t + gap, Watermark::MIN)?
                .filter(|(_, s)| s.end > t)
                .map(|(start, _)| start)
                .collect();
            let mut start = t;
            let mut session = Session {
                end: t + gap,
                accs: self.new_accs(),
            };
            aggregate::update(&self.plan.aggs, &mut session.accs, inputs, readers, row);
            for s in touching {
                let old = self.sessions.remove(&key, s)?.expect("listed above");
                start = start.min(s);
                session.end = session.end.max(old.end);
                for ((d, a), b) in self
                    .plan
                    .aggs
                    .iter()
                    .zip(session.accs.iter_mut())
                    .zip(&old.accs)
                {
                    aggregate::merge(d, a, b);
                }
            }
            let end = session.end;
            self.sessions
                .update(&key, start, t, Watermark::MIN, || session, |_| ())?;
            if w >= end - 1 {
                updated.push((key.clone(), start));
            } else {
                self.fire.register(end - 1, &key)?;
            }
            self.cleanup
                .register((end - 1).saturating_add(lateness), &key)?;
        }
        updated.sort_unstable();
        updated.dedup();
        let mut fired = Vec::with_capacity(updated.len());
        for (key, start) in updated {
            if let Some(s) = self.sessions.get(&key, start, Watermark::MIN)? {
                let s = s.clone();
                fired.push(Fired {
                    key,
                    start,
                    end: s.end,
                    accs: s.accs,
                });
            }
        }
        Ok((late, fired))
    }
}

impl Operator for WindowOperator {
    fn has_more_output(&self) -> bool {
        self.more
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        state.attach(&mut self.slices)?;
        state.attach(&mut self.sessions)?;
        self.fire = state.timers("fire")?;
        self.cleanup = state.timers("cleanup")?;
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        snap.flush(&mut self.slices)?;
        snap.flush(&mut self.sessions)?;
        snap.flush_timers(&mut self.fire)?;
        snap.flush_timers(&mut self.cleanup)
    }

    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        self.plan.keys.encode(&batch, &mut self.keys)?;
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<Int64Type>()
            .values();
        let inputs = AggInputs::evaluate(&self.plan.aggs, &batch)?;
        let readers = inputs.readers()?;
        let rows = Rows {
            times,
            inputs: &inputs,
            readers: &readers,
        };
        let (late, fired) = match self.plan.kind {
            WindowKind::Sliced { size, slide } => self.process_sliced(size, slide, rows, ctx)?,
            WindowKind::Session { gap } => self.process_sessions(gap, rows, ctx)?,
        };
        if !late.is_empty() {
            SubtaskMetrics::add(&ctx.metrics.late_records, late.len() as u64);
            out.emit(
                LATE_PORT,
                take_record_batch(&batch, &UInt32Array::from(late))?,
            );
        }
        self.emit_rows(fired, out)
    }

    fn on_watermark(
        &mut self,
        wm: Watermark,
        _: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        // one batch of windows per call (see `has_more_output`); slices are cleaned up once
        // every window due has fired
        let due = self.fire.due(wm, FIRE_BATCH)?;
        self.more = due.len() == FIRE_BATCH;
        if let WindowKind::Sliced { size, .. } = self.plan.kind
            && self.plan.lateness == 0
        {
            // the first slice of each window is taken out as it fires: read the slices of the
            // keys due at one time together, in the order timers give them (their rows' order)
            for run in due.chunk_by(|a, b| a.0 == b.0) {
                let start = run[0].0 + 1 - size;
                self.slices
                    .prefetch(run.iter().map(|(_, k)| k.as_slice()), start)?;
            }
        }
        {
            let mut rows = Vec::with_capacity(due.len());
            for (t, key) in due {
                let end = t + 1;
                match self.plan.kind {
                    WindowKind::Sliced { size, slide } => {
                        if let Some(accs) = self.fire_sliced(&key, size, slide, end)? {
                            rows.push(Fired {
                                key,
                                start: end - size,
                                end,
                                accs,
                            });
                        }
                    }
                    WindowKind::Session { .. } => {
                        // the session that ends here, if it was not merged into a longer one
                        let hit = self
                            .sessions
                            .range(&key, .., Watermark::MIN)?
                            .find(|(_, s)| s.end == end)
                            .map(|(st, s)| (st, s.accs.clone()));
                        if let Some((start, accs)) = hit {
                            rows.push(Fired {
                                key,
                                start,
                                end,
                                accs,
                            });
                        }
                    }
                }
            }
            self.emit_rows(rows, out)?;
        }
        if self.more {
            return Ok(());
        }
        let lateness = self.plan.lateness;
        loop {
            let due = self.cleanup.due(wm, FIRE_BATCH)?;
            if due.is_empty() {
                break;
            }
            for (t, key) in due {
                match self.plan.kind {
                    WindowKind::Sliced { size, .. } => {
                        // slices whose last window's lateness bound is t: start <= t + 1 - lateness - size
                        let last_start = (t + 1).saturating_sub(lateness) - size;
                        self.slices.drain_range(&key, ..=last_start)?;
                    }
                    WindowKind::Session { .. } => {
                        let done: Vec<i64> = self
                            .sessions
                            .range(&key, .., Watermark::MIN)?
                            .filter(|(_, s)| (s.end - 1).saturating_add(lateness) <= t)
                            .map(|(st, _)| st)
                            .collect();
                        for st in done {
                            self.sessions.remove(&key, st)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
