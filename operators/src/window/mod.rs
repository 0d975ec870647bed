//! Event-time windows per key: tumbling, sliding and session, with allowed lateness.
//!
//! **State.** Tumbling and sliding windows keep one accumulator set per *(slice, key)* in a
//! [`PaneTable`], where a slice is one `slide` of event time (tumbling: slide = size). A window
//! is the merge of the `size / slide` slices it covers, computed when it fires; so a record
//! updates one slice, not every window it belongs to. A record that is too late for the earliest
//! windows of its slice but not for the later ones is kept apart in the slice, tagged with the
//! first window it counts for, so it never reaches a window it was too late for, whatever the
//! order of arrival. Session windows keep a key's open sessions (an accumulator set each) in
//! one value of a keyed table: a batch reads the sessions of its keys that memory lacks with
//! one batched lookup, merges each key's rows into them (merging sessions a record bridges)
//! and writes the set back; one timer per session end (a merged or extended session's are
//! deleted), whose firings read their keys' sessions a batch at a time too.
//!
//! **Firing.** A window `[start, end)` fires when the watermark reaches `end - 1`; its row is
//! `key columns, window_start, window_end, aggregates`, with event time `end - 1`. Sliced
//! windows fire in order of their end, each for every key of the slices it covers, in the order
//! of the keys' rows, [`FIRE_BATCH`] keys per call, from slices read [`READ_AHEAD`] keys ahead
//! (read again once an update reached them). A snapshot records how far the subtask fired
//! (mid-window: up to which key), and a restore at any parallelism applies each former subtask's
//! mark to the key groups it owned, so no window fires twice for a key, or not at all.
//!
//! **Lateness.** A record that arrives after its window fired for its key (also while the window
//! is still firing for later keys) but before the watermark reaches `end - 1 + allowed_lateness`
//! updates the window, and the window's row is emitted again with the new values: rows are
//! upserts keyed by *(key, window_start, window_end)*. A record too late
//! for every window it belongs to goes to the `late` side output (port 1) and is counted. Whether a
//! record is late is judged against the watermark of the input it arrived on (after a restore,
//! at least the one its key group had fired up to).
//!
//! **Cleanup.** A slice is dropped when the watermark passes the lateness bound of the last
//! window that covers it; a session when it passes its own. Nothing else is kept.
pub mod aggregate;
mod encoded;
mod sessions;
mod slices;

use arrow::array::{ArrayRef, AsArray, Int64Array, TimestampMillisecondArray, UInt32Array};
use arrow::compute::{filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::collections::HashSet;
use std::sync::Arc;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::element::{Selection, selected_rows};
use freshet_engine::keys::{EncodedKeys, KeyColumns};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{MAIN_PORT, Operator, OperatorContext, Output};
use freshet_engine::state::panes::{key_group_of_order, key_of_order, key_order};
use freshet_engine::state::timers::FIRE_BATCH;
use freshet_engine::state::{
    KeyedBackend, KeyedTable, Merged, PaneTable, StateKey, TableDrain, Timers,
};
use freshet_engine::{KeyGroupRange, Result, TIME_COLUMN, Watermark};
use smallvec::SmallVec;

use crate::expr::{Expr, ExprError, timestamp_type};
use aggregate::{Acc, AccColumn, Accs, AggDef, AggInputs};
use sessions::{Session, SessionSet, Sessions};
use slices::{BatchInputs, SliceColumns, SliceParts};

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
            panes: PaneTable::new(
                "window-slices",
                SliceColumns::new(
                    &self.aggs,
                    match self.kind {
                        WindowKind::Sliced { slide, .. } => slide,
                        WindowKind::Session { .. } => 1,
                    },
                ),
            ),
            fired_through: i64::MIN,
            floors: None,
            firing: None,
            max_parallelism: 1,
            key_groups: KeyGroupRange { start: 0, end: 0 },
            sessions: KeyedTable::one_value("window-session-sets", None),
            fire: Timers::new("fire"),
            cleanup: Timers::new("cleanup"),
            draining: None,
            more: false,
            chunks: Vec::new(),
            read_for: None,
            read_ahead: READ_AHEAD,
            keys: EncodedKeys::default(),
            same_slots: Vec::new(),
        }
    }
}

/// The table of session windows' earlier layout, a row per (key, session start), moved into
/// the current one when a snapshot of it is restored.
const SESSION_ROWS: &str = "window-sessions";

/// The window operator of one subtask. See the module documentation.
pub struct WindowOperator {
    plan: WindowPlan,
    /// Per (slice start, key): accumulators tagged with the end of the first window they count
    /// for (one entry unless late records arrived), sorted by that end.
    panes: PaneTable<SliceColumns>,
    /// Sliced windows: the end of the last window fired (every earlier one fired too).
    fired_through: i64,
    /// After a restore: the end of the last window fired per key group, as the subtask that
    /// owned the key group before recorded it (see [`Floors`]).
    floors: Option<Floors>,
    /// The window being fired, in chunks of [`FIRE_BATCH`] keys: its end, and the order of the
    /// last key fired.
    firing: Option<(i64, Option<StateKey>)>,
    /// The job's number of key groups, and the ones this subtask owns.
    max_parallelism: u32,
    key_groups: KeyGroupRange,
    /// Session windows (sliced windows keep no per-key timers).
    sessions: KeyedTable<SessionSet>,
    fire: Timers,
    cleanup: Timers,
    /// Every session firing by one pass over the table ([`WindowOperator::drain_sessions`]).
    draining: Option<TableDrain>,
    keys: EncodedKeys,
    /// The last `on_watermark` fired a full batch of windows and may have more.
    more: bool,
    /// The slices of the window being fired, read ahead of what was fired, into buffers kept
    /// from one read to the next.
    chunks: Vec<Chunk>,
    /// What `chunks` hold: the end of the window, and the pane table's
    /// [`changes`](PaneTable::changes) when they were read (once it moves, they may be stale).
    read_for: Option<(i64, u64)>,
    /// Keys to read ahead, over all slices ([`READ_AHEAD`]; tests make it small).
    read_ahead: usize,
    /// A non-keyed window's batch: its one slot, once per row.
    same_slots: Vec<u32>,
}

/// Keys a window being fired reads ahead of what it fires, over all its slices: firing reads
/// each slice's generations from the key it stopped at, and a read costs a seek per
/// generation and a block decoded up to that key, whatever its length.
const READ_AHEAD: usize = 1 << 16;

/// The keys of one slice of the window being fired, read ahead.
struct Chunk {
    ns: i64,
    /// Keys after the last fired, with their values merged.
    keys: Merged<SliceColumns>,
    /// The slice has keys after these.
    cut: bool,
    /// How many of `keys` were fired.
    at: usize,
}

/// What a batch gives the window, computed once per batch: event times, keys, aggregate
/// arguments, all indexed by the batch's rows, and which of its rows to process.
struct Rows<'a> {
    select: Option<&'a [u32]>,
    keys: &'a EncodedKeys,
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

/// Window results before they become a batch, as columns: keys (encoded, in one buffer), the
/// windows' bounds, and an accumulator column per aggregate.
struct Results {
    keys: Vec<u8>,
    key_ends: Vec<u32>,
    starts: Vec<i64>,
    ends: Vec<i64>,
    accs: Vec<AccColumn>,
}

impl Results {
    fn new(aggs: &[AggDef]) -> Self {
        Results {
            keys: Vec::new(),
            key_ends: Vec::new(),
            starts: Vec::new(),
            ends: Vec::new(),
            accs: aggs.iter().map(AccColumn::new).collect(),
        }
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Adds a result with empty accumulators; returns its row.
    fn push(&mut self, key: &[u8], start: i64, end: i64) -> u32 {
        let row = self.starts.len() as u32;
        self.keys.extend_from_slice(key);
        self.key_ends.push(self.keys.len() as u32);
        self.starts.push(start);
        self.ends.push(end);
        for c in &mut self.accs {
            c.resize(row as usize + 1);
        }
        row
    }

    /// Drops the last result.
    fn pop(&mut self) {
        let Some(rows) = self.starts.len().checked_sub(1) else {
            return;
        };
        self.key_ends.pop();
        self.keys
            .truncate(self.key_ends.last().copied().unwrap_or(0) as usize);
        self.starts.truncate(rows);
        self.ends.truncate(rows);
        for c in &mut self.accs {
            c.truncate(rows);
        }
    }

    fn key(&self, row: usize) -> &[u8] {
        let start = row.checked_sub(1).map_or(0, |r| self.key_ends[r] as usize);
        &self.keys[start..self.key_ends[row] as usize]
    }
}

/// Name of the operator state recording how far each subtask fired its sliced windows.
const FIRED: &str = "window-fired";

/// How far a subtask had fired its windows when a snapshot was taken: the end of the last
/// window fired, and the window it was firing, up to the key order it reached.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FiredMark {
    key_groups: (u32, u32),
    fired_through: i64,
    firing: Option<(i64, Option<Vec<u8>>)>,
}

/// After a restore: the marks of the former subtasks whose key groups this one now owns, so a
/// key fires no window its former subtask fired, and misses none, at any change of
/// parallelism.
#[derive(Debug)]
struct Floors {
    marks: Vec<FiredMark>,
    /// The highest end fired: once the subtask has fired it, the floors are done.
    max: i64,
}

impl Floors {
    /// The end of the last window fired for the key whose row order is `order`.
    fn fired(&self, order: &[u8]) -> i64 {
        let kg = key_group_of_order(order);
        let Some(m) = self
            .marks
            .iter()
            .find(|m| m.key_groups.0 <= kg && kg <= m.key_groups.1)
        else {
            return i64::MIN;
        };
        match &m.firing {
            Some((end, cursor)) if cursor.as_deref().is_some_and(|c| order <= c) => *end,
            _ => m.fired_through,
        }
    }
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

impl WindowOperator {
    /// How far this subtask fired, as its snapshot records it.
    fn mark(&self) -> FiredMark {
        FiredMark {
            key_groups: (self.key_groups.start, self.key_groups.end),
            fired_through: self.fired_through,
            firing: self
                .firing
                .as_ref()
                .map(|(end, at)| (*end, at.as_ref().map(|o| o.to_vec()))),
        }
    }

    /// Takes the marks of the former subtasks that owned this subtask's key groups.
    fn restore_marks(&mut self, marks: Vec<FiredMark>) {
        let mine = self.key_groups;
        let marks: Vec<FiredMark> = marks
            .into_iter()
            .filter(|m| m.key_groups.0 <= mine.end && mine.start <= m.key_groups.1)
            .collect();
        let Some(lowest) = marks.iter().map(|m| m.fired_through).min() else {
            return;
        };
        let max = marks
            .iter()
            .map(|m| match &m.firing {
                Some((end, _)) => (*end).max(m.fired_through),
                None => m.fired_through,
            })
            .max()
            .unwrap_or(i64::MIN);
        // windows after the lowest mark fire again, each key's only if its group had not
        self.fired_through = lowest;
        self.floors = Some(Floors { marks, max });
    }

    /// Moves the state of a snapshot taken before sliced windows kept panes (one keyed row per
    /// (key, slice) and a timer per (key, window)) into the pane table. Windows before the
    /// earliest pending timer had fired for every key; in a snapshot taken while a batch of that
    /// window fired, the keys without a timer left had fired it too.
    fn move_from_keyed_layout(
        &mut self,
        backend: &Arc<KeyedBackend>,
        size: i64,
        slide: i64,
    ) -> Result<()> {
        let mut slices: KeyedTable<SliceParts> = KeyedTable::new("window-slices", None);
        slices.attach(backend)?;
        let mut rows = slices.take_all()?;
        let mut pending: Vec<(i64, StateKey)> = Vec::new();
        for name in ["fire", "cleanup"] {
            let mut timers = Timers::new(name);
            timers.attach(backend)?;
            loop {
                let due = timers.due(Watermark(i64::MAX), FIRE_BATCH)?;
                if due.is_empty() {
                    break;
                }
                if name == "fire" {
                    pending.extend(due);
                }
            }
        }
        self.fired_through = match pending.first() {
            Some((t, _)) => t + 1 - slide,
            None => rows
                .iter()
                .map(|(_, ns, _)| ns + size)
                .max()
                .unwrap_or(i64::MIN),
        };
        if let Some(&(t, _)) = pending.first()
            && self.plan.lateness == 0
        {
            let end = t + 1;
            let waiting: HashSet<&[u8]> = pending
                .iter()
                .filter(|(at, _)| *at == t)
                .map(|(_, k)| k.as_slice())
                .collect();
            for (key, ns, parts) in rows.iter_mut() {
                if *ns >= end - size && *ns < end && !waiting.contains(key.as_slice()) {
                    for (first_end, _) in parts.iter_mut() {
                        *first_end = (*first_end).max(end + slide);
                    }
                }
            }
        }
        self.panes
            .import(rows.into_iter().map(|(key, ns, parts)| (ns, key, parts)))
    }

    fn new_accs(&self) -> Accs {
        self.plan.aggs.iter().map(AggDef::new_acc).collect()
    }

    /// Merges the slices' partial accumulators that count for the window ending at `end`.
    fn merge_parts<'p>(
        aggs: &[AggDef],
        end: i64,
        partials: impl IntoIterator<Item = &'p SliceParts>,
    ) -> Option<Accs> {
        let mut out: Option<Accs> = None;
        for parts in partials {
            for (_, accs) in parts.iter().filter(|(first_end, _)| *first_end <= end) {
                merge_into(aggs, &mut out, accs);
            }
        }
        out
    }

    /// The merged accumulators of window `[start, end)` for `key` (sliced windows).
    fn window_accs(&mut self, key: &[u8], start: i64, end: i64) -> Result<Option<Accs>> {
        let slices = self.panes.get(key, start..end)?;
        Ok(Self::merge_parts(
            &self.plan.aggs,
            end,
            slices.iter().flat_map(|(_, p)| p.iter()),
        ))
    }

    /// The end of the last window fired for the key whose row order is `order`: the subtask's,
    /// or after a restore what the key's former subtask had fired, if more.
    fn fired_for(&self, order: &[u8]) -> i64 {
        match &self.floors {
            Some(f) => self.fired_through.max(f.fired(order)),
            None => self.fired_through,
        }
    }

    /// The next chunk of the window being fired, or of the next window due at `wm`: results
    /// of up to `limit` keys added to `results`; whether a window was due.
    fn fire_sliced(
        &mut self,
        size: i64,
        slide: i64,
        wm: Watermark,
        limit: usize,
        results: &mut Results,
    ) -> Result<bool> {
        if self.firing.is_none() {
            // the first window after the last fired that a slice holds values for
            let from = self.fired_through.saturating_sub(size).saturating_add(1);
            let Some(first) = self.panes.first_namespace_from(from) else {
                return Ok(false);
            };
            let end = first
                .saturating_add(slide)
                .max(self.fired_through.saturating_add(slide));
            if wm.0 < end - 1 {
                return Ok(false);
            }
            self.firing = Some((end, None));
        }
        let (end, after) = self.firing.take().expect("set above");
        let start = end - size;
        // every slice of the window, read ahead in row order, each key's partials merged: what
        // an earlier call read is still good while no update reached the panes
        let mut chunks = std::mem::take(&mut self.chunks);
        if self.read_for != Some((end, self.panes.changes())) {
            self.read_ahead(&mut chunks, start, end, slide, after.as_deref(), limit)?;
        }
        // the `limit` smallest key orders of all slices, merged from the slices' sorted chunks:
        // while each chunk cut short still has keys, the smallest head is below all it left
        // out, so no key of a slice is skipped; else the slices are read again after the last
        // key fired
        let mut taken = 0;
        let mut last: Option<(usize, usize)> = None;
        let mut last_read = after;
        while taken < limit {
            if chunks.iter().any(|c| c.cut && c.at == c.keys.len()) {
                if let Some((m, row)) = last.take() {
                    last_read = Some(StateKey::from_slice(chunks[m].keys.order(row)));
                }
                self.read_ahead(&mut chunks, start, end, slide, last_read.as_deref(), limit)?;
            }
            let Some((m, order)) = chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.at < c.keys.len())
                .map(|(i, c)| (i, c.keys.order(c.at)))
                .min_by(|a, b| a.1.cmp(b.1))
            else {
                break;
            };
            taken += 1;
            last = Some((m, chunks[m].at));
            let fired = self.floors.is_some() && self.fired_for(order) >= end;
            let row = (!fired).then(|| results.push(key_of_order(order), start, end));
            let mut any = false;
            let mut holding: SmallVec<[usize; 8]> = SmallVec::new();
            for (i, c) in chunks.iter().enumerate() {
                if c.at < c.keys.len() && c.keys.order(c.at) == order {
                    holding.push(i);
                    if let Some(row) = row {
                        any |= c.keys.columns().merge_into_window(
                            c.ns,
                            c.at as u32,
                            end,
                            &mut results.accs,
                            row,
                        );
                    }
                }
            }
            for i in holding {
                chunks[i].at += 1;
            }
            if row.is_some() && !any {
                results.pop();
            }
        }
        let full = taken == limit;
        let last = match last {
            Some((m, row)) => Some(StateKey::from_slice(chunks[m].keys.order(row))),
            None => last_read,
        };
        self.chunks = chunks;
        if full {
            self.firing = Some((end, last));
        } else {
            self.fired_through = end;
            self.read_for = None;
        }
        Ok(true)
    }

    /// Reads the keys after `after` of every slice of window `[start, end)` into `chunks`:
    /// [`READ_AHEAD`] keys in all, at least `limit` per slice.
    fn read_ahead(
        &mut self,
        chunks: &mut Vec<Chunk>,
        start: i64,
        end: i64,
        slide: i64,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<()> {
        let slices: Vec<i64> = self
            .panes
            .namespaces()
            .into_iter()
            .filter(|ns| (start..end).contains(ns))
            .collect();
        let ahead = (self.read_ahead / slices.len().max(1)).max(limit);
        chunks.truncate(slices.len());
        for (n, ns) in slices.into_iter().enumerate() {
            if chunks.len() == n {
                let empty = SliceColumns::new(&self.plan.aggs, slide);
                chunks.push(Chunk {
                    ns,
                    keys: Merged::new(empty),
                    cut: false,
                    at: 0,
                });
            }
            let c = &mut chunks[n];
            self.panes.read_merged(ns, after, ahead, &mut c.keys)?;
            c.ns = ns;
            c.cut = c.keys.len() == ahead;
            c.at = 0;
        }
        self.read_for = Some((end, self.panes.changes()));
        Ok(())
    }

    /// Emits window results of sessions and of windows updated by late records.
    fn emit_rows(&self, rows: Vec<Fired>, out: &mut dyn Output) -> Result<()> {
        let mut results = Results::new(&self.plan.aggs);
        for r in rows {
            let row = results.push(&r.key, r.start, r.end);
            for ((d, c), a) in self.plan.aggs.iter().zip(&mut results.accs).zip(&r.accs) {
                c.merge_acc(d, row, a);
            }
        }
        self.emit(&results, out)
    }

    fn emit(&self, results: &Results, out: &mut dyn Output) -> Result<()> {
        if results.len() == 0 {
            return Ok(());
        }
        let mut cols: Vec<ArrayRef> = self
            .plan
            .keys
            .encoder()
            .decode((0..results.len()).map(|r| results.key(r)))?;
        cols.push(Arc::new(TimestampMillisecondArray::from(
            results.starts.clone(),
        )));
        cols.push(Arc::new(TimestampMillisecondArray::from(
            results.ends.clone(),
        )));
        for (d, c) in self.plan.aggs.iter().zip(&results.accs) {
            cols.push(aggregate::output_of_column(d, c)?);
        }
        cols.push(Arc::new(Int64Array::from_iter_values(
            results.ends.iter().map(|e| e - 1),
        )));
        let batch = RecordBatch::try_new(self.plan.output.clone(), cols)?;
        let batch = match &self.plan.having {
            Some(h) => filter_record_batch(&batch, &h.evaluate_predicate(&batch)?)?,
            None => batch,
        };
        out.emit(MAIN_PORT, batch);
        Ok(())
    }

    /// Adds rows of `batch` (the `select`ed ones, or all) to their windows, with their keys
    /// as the edge encoded them or encoded here.
    fn process_rows(
        &mut self,
        batch: &RecordBatch,
        select: Option<&[u32]>,
        encoded: Option<&EncodedKeys>,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        // the buffer is lent out while the rows are processed
        let mut own = std::mem::take(&mut self.keys);
        let keys = self.plan.keys.keys_of(batch, encoded, &mut own)?;
        let times = batch
            .column(batch.num_columns() - 1)
            .as_primitive::<Int64Type>()
            .values();
        let inputs = AggInputs::evaluate(&self.plan.aggs, batch)?;
        let readers = inputs.readers()?;
        let rows = Rows {
            select,
            keys,
            times,
            inputs: &inputs,
            readers: &readers,
        };
        let processed = match self.plan.kind {
            WindowKind::Sliced { size, slide } => self.process_sliced(size, slide, rows, ctx),
            WindowKind::Session { gap } => self.process_sessions(gap, rows, ctx),
        };
        self.keys = own;
        let (late, fired) = processed?;
        if !late.is_empty() {
            SubtaskMetrics::add(&ctx.metrics.late_records, late.len() as u64);
            out.emit(
                LATE_PORT,
                take_record_batch(batch, &UInt32Array::from(late))?,
            );
        }
        self.emit_rows(fired, out)
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
        let rw = ctx.record_watermark.0;
        let Rows {
            select,
            keys,
            times,
            inputs,
            readers,
        } = rows;
        // after a restore, a key group counts as far as its former subtask had fired
        let floors = self.floors.as_ref().filter(|f| f.max > self.fired_through);
        let mp = self.max_parallelism;
        let fired_through = self.fired_through;
        // a window firing a chunk at a time has fired for the keys up to the last one it fired
        let firing = match &self.firing {
            Some((end, Some(at))) => Some((*end, at)),
            _ => None,
        };
        let fired_for = |key: &[u8]| {
            let order = (floors.is_some() || firing.is_some()).then(|| key_order(key, mp));
            let floor = match (floors, &order) {
                (Some(f), Some(o)) => f.fired(o),
                _ => i64::MIN,
            };
            let firing = match (firing, &order) {
                (Some((end, at)), Some(o)) if o.as_slice() <= at.as_slice() => end,
                _ => i64::MIN,
            };
            fired_through.max(floor).max(firing)
        };
        let mut late = Vec::new();
        // the rows of each (slice, first window they count for), in batch order: a batch
        // usually spans one or two slices
        let mut groups: Vec<((i64, i64), Vec<u32>)> = Vec::new();
        let mut index: hashbrown::HashMap<(i64, i64), usize> = hashbrown::HashMap::new();
        let mut at = 0usize;
        let mut slice = i64::MIN;
        // rows no aggregate counts are skipped (unless there are no aggregates)
        let every = self.plan.aggs.is_empty() || inputs.one_selects_all();
        let n = select.map_or(times.len(), <[u32]>::len);
        let row_at = |i: usize| select.map_or(i, |s| s[i] as usize);
        let mut i = 0;
        while i < n {
            let row = row_at(i);
            let t = times[row];
            // rows of a batch mostly fall into the slice of the row before
            if t < slice || t.checked_sub(slice).is_none_or(|d| d >= slide) {
                slice = t - t.rem_euclid(slide);
            }
            // the rows from here on in the same slice are judged alike, unless a restore left
            // each key group its own watermark
            let mut end = i + 1;
            if floors.is_none() {
                let in_slice =
                    |t: i64| t >= slice && t.checked_sub(slice).is_some_and(|d| d < slide);
                end += match select {
                    Some(s) => s[end..]
                        .iter()
                        .take_while(|r| in_slice(times[**r as usize]))
                        .count(),
                    None => times[end..].iter().take_while(|t| in_slice(**t)).count(),
                };
            }
            let run = i..end;
            i = end;
            let last_end = slice + size;
            // the watermark the record is judged against: its input's, or after a restore the
            // one its key group had reached (it fired up to that window)
            let rw = match floors {
                Some(_) => rw.max(fired_for(keys.row(row)).saturating_sub(1)),
                None => rw,
            };
            if rw >= (last_end - 1).saturating_add(lateness) {
                late.extend(run.map(|i| row_at(i) as u32));
                continue;
            }
            // the first window of this slice the records are not too late for
            let mut first_end = slice + slide;
            while rw >= (first_end - 1).saturating_add(lateness) {
                first_end += slide;
            }
            let tag = (slice, first_end);
            // looked up only when the tag changes (a batch spread over many slices stays linear)
            if groups.get(at).is_none_or(|(g, _)| *g != tag) {
                at = *index.entry(tag).or_insert_with(|| {
                    groups.push((tag, Vec::new()));
                    groups.len() - 1
                });
            }
            let group = &mut groups[at].1;
            match select {
                _ if !every => group.extend(
                    run.map(row_at)
                        .filter(|r| inputs.any_selected(*r))
                        .map(|r| r as u32),
                ),
                Some(s) => group.extend_from_slice(&s[run]),
                None => group.extend(run.start as u32..run.end as u32),
            }
        }
        let batch = BatchInputs { inputs, readers };
        // windows that already fired are emitted again with these records
        let fired_max = floors
            .map_or(fired_through, |f| f.max.max(fired_through))
            .max(firing.map_or(i64::MIN, |(end, _)| end));
        let mut updated: HashSet<(StateKey, i64)> = HashSet::new();
        let keyless = self.plan.keys.is_empty();
        for ((slice, first_end), rows) in &groups {
            let (slice, first_end) = (*slice, *first_end);
            // a non-keyed window's rows all have the empty key: it is located once, for the
            // first row, and its slot given to every row. (One call for both, so that the
            // update is compiled once, with its lookups inlined.)
            let located = if keyless {
                &rows[..rows.len().min(1)]
            } else {
                rows
            };
            let same = &mut self.same_slots;
            self.panes.update(
                slice,
                located.iter().map(|r| keys.row(*r as usize)),
                |columns, slots| {
                    let slots = match slots {
                        [one] if keyless => {
                            same.clear();
                            same.resize(rows.len(), *one);
                            &same[..]
                        }
                        _ => slots,
                    };
                    columns.add(slice, first_end, &batch, rows, slots)
                },
            )?;
            if first_end > fired_max {
                continue;
            }
            for r in rows {
                let key = keys.row(*r as usize);
                let fired = fired_for(key);
                let mut end = first_end;
                while end <= slice + size && end <= fired {
                    updated.insert((key.into(), end));
                    end += slide;
                }
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

    /// Session windows, a batch at a time: rows are grouped by key, each key's sessions that its
    /// rows can touch are read once and its rows merged into them in batch order, as if they had
    /// come one at a time; then only the sessions that changed are written, with their timers.
    /// A session's fire and cleanup timers are deleted when a record merges it into another or
    /// moves its end, so each session has one of each (none for cleanup without lateness: the
    /// firing drops it).
    fn process_sessions(
        &mut self,
        gap: i64,
        rows: Rows<'_>,
        ctx: &OperatorContext<'_>,
    ) -> Result<(Vec<u32>, Vec<Fired>)> {
        let lateness = self.plan.lateness;
        let (rw, w) = (ctx.record_watermark.0, ctx.current_watermark.0);
        let Rows {
            select,
            keys,
            times,
            inputs,
            readers,
        } = rows;
        let mut late = Vec::new();
        let on_time = selected_rows(select, times.len()).filter(|&row| {
            let t = times[row];
            let late_row = rw >= (t + gap - 1).saturating_add(lateness);
            if late_row {
                late.push(row as u32);
            }
            !late_row
        });
        let groups = keys.group_rows(on_time);
        // the keys whose sessions memory lacks, read with one batched lookup
        self.sessions
            .prefetch(groups.iter().map(|rows| keys.row(rows[0] as usize)))?;
        let mut fired = Vec::new();
        for rows in groups.iter() {
            let key = keys.row(rows[0] as usize);
            let hi = rows.iter().map(|r| times[*r as usize]).max().unwrap_or(0);
            // the key's sessions as stored: (start, session, changed)
            let mut list: SmallVec<[(i64, Session, bool); 2]> =
                match self.sessions.get(key, 0, Watermark::MIN)? {
                    Some(set) => set
                        .decode()?
                        .into_iter()
                        .map(|(s, v)| (s, v, false))
                        .collect(),
                    None => SmallVec::new(),
                };
            let stored: SmallVec<[(i64, i64); 2]> =
                list.iter().map(|(start, s, _)| (*start, s.end)).collect();
            for &row in rows {
                let t = times[row as usize];
                let mut start = t;
                let mut session = Session {
                    end: t + gap,
                    accs: self.new_accs(),
                };
                aggregate::update(
                    &self.plan.aggs,
                    &mut session.accs,
                    inputs,
                    readers,
                    row as usize,
                );
                // the sessions the record touches merge into its own, in start order
                list.retain(|(s, old, _)| {
                    let touches = *s < t + gap && old.end > t;
                    if touches {
                        start = start.min(*s);
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
                    !touches
                });
                let at = list.partition_point(|(s, _, _)| *s < start);
                list.insert(at, (start, session, true));
            }
            // stored sessions merged away or whose end moved give up their timers
            for &(start, end) in &stored {
                let kept = list
                    .iter()
                    .any(|(s, session, changed)| *s == start && (!changed || session.end == end));
                if !kept {
                    self.fire.delete(end - 1, key)?;
                    if lateness > 0 {
                        self.cleanup
                            .delete((end - 1).saturating_add(lateness), key)?;
                    }
                }
            }
            // the set is rewritten whole (a record always changes one of its sessions)
            let mut set = Sessions::new();
            for (start, session, changed) in list {
                if changed {
                    let end = session.end;
                    let new = !stored.contains(&(start, end));
                    if lateness > 0 && new {
                        self.cleanup
                            .register((end - 1).saturating_add(lateness), key)?;
                    }
                    if w >= end - 1 {
                        // already due: fires now, and without lateness goes, as firing drops it
                        fired.push(Fired {
                            key: key.into(),
                            start,
                            end,
                            accs: session.accs.clone(),
                        });
                        if lateness == 0 {
                            continue;
                        }
                    } else if new {
                        self.fire.register(end - 1, key)?;
                    }
                }
                set.push((start, session));
            }
            if set.is_empty() {
                self.sessions.remove(key, 0)?;
            } else {
                let set = SessionSet::encode(&set)?;
                self.sessions
                    .update(key, 0, hi, Watermark::MIN, SessionSet::default, |s| {
                        *s = set
                    })?;
            }
        }
        fired.sort_unstable_by(|a, b| (&a.key, a.start).cmp(&(&b.key, b.start)));
        Ok((late, fired))
    }

    /// Takes the session of `key` that ends at `end` out of its set if `drop`, else copies it;
    /// the key's row goes when its last session does.
    fn take_session(&mut self, key: &[u8], end: i64, drop: bool) -> Result<Option<(i64, Accs)>> {
        let Some(set) = self.sessions.get(key, 0, Watermark::MIN)? else {
            return Ok(None);
        };
        let mut set = set.decode()?;
        // state of an earlier version may still hold timers of sessions merged into longer ones
        let Some(at) = set.iter().position(|(_, s)| s.end == end) else {
            return Ok(None);
        };
        if !drop {
            return Ok(Some((set[at].0, set[at].1.accs.clone())));
        }
        let (start, session) = set.remove(at);
        self.put_sessions(key, set)?;
        Ok(Some((start, session.accs)))
    }

    /// Drops the sessions of `key` that `done` picks; the key's row goes when its last does.
    fn drop_sessions(&mut self, key: &[u8], mut done: impl FnMut(&Session) -> bool) -> Result<()> {
        let Some(set) = self.sessions.get(key, 0, Watermark::MIN)? else {
            return Ok(());
        };
        let mut set = set.decode()?;
        let before = set.len();
        set.retain(|(_, s)| !done(s));
        if set.len() < before {
            self.put_sessions(key, set)?;
        }
        Ok(())
    }

    /// Writes back the sessions a firing or a cleanup left of a stored key's set (keeping its
    /// row's time), or removes its row if none are left.
    fn put_sessions(&mut self, key: &[u8], set: Sessions) -> Result<()> {
        if set.is_empty() {
            self.sessions.remove(key, 0)?;
            return Ok(());
        }
        let mut set = Some(SessionSet::encode(&set)?);
        self.sessions.modify(key, 0..=0, |_, s| {
            if let Some(set) = set.take() {
                *s = set;
            }
            true
        })
    }

    /// Fires every session by one pass over their table in row order, a batch of keys per
    /// call, when every fire timer is due (the end of a bounded input, a watermark that jumped)
    /// and RocksDB holds sessions memory lacks: reading the table in order reads each block
    /// once, where firing timer by timer reads a block per key. Without lateness a session
    /// goes once it fired and each stored one has a fire timer, so every session is due and
    /// the timers are deleted once the pass ends; one that is not (a broken invariant) is put
    /// back with its timer. A snapshot between calls holds the sessions not yet fired and
    /// their timers; a restore begins the pass again over those.
    fn drain_sessions(&mut self, wm: Watermark, out: &mut dyn Output) -> Result<()> {
        let mut drain = match self.draining.take() {
            Some(d) => d,
            None => self.sessions.drain()?,
        };
        let (mut rows, mut later) = (Vec::new(), Vec::new());
        let more = self
            .sessions
            .drain_next(&mut drain, FIRE_BATCH, |key, _, set| {
                let mut kept = Sessions::new();
                for (start, session) in set.decode()? {
                    if session.end - 1 <= wm.0 {
                        rows.push(Fired {
                            key: key.clone(),
                            start,
                            end: session.end,
                            accs: session.accs,
                        });
                    } else {
                        kept.push((start, session));
                    }
                }
                if !kept.is_empty() {
                    later.push((key, kept));
                }
                Ok(())
            })?;
        for (key, set) in later {
            for (_, session) in &set {
                self.fire.register(session.end - 1, &key)?;
            }
            let set = SessionSet::encode(&set)?;
            self.sessions.update(
                &key,
                0,
                i64::MIN,
                Watermark::MIN,
                SessionSet::default,
                |s| *s = set,
            )?;
        }
        self.emit_rows(rows, out)?;
        self.more = more;
        if more {
            self.draining = Some(drain);
        } else {
            self.fire.clear_through(wm.0)?;
        }
        Ok(())
    }

    /// Moves session windows of the earlier layout (a row per (key, session start), restored
    /// from a snapshot taken before sets per key) into the table of sets, a key at a time.
    fn move_session_rows(&mut self, backend: &Arc<KeyedBackend>) -> Result<()> {
        let mut rows: KeyedTable<Session> = KeyedTable::new(SESSION_ROWS, None);
        rows.attach(backend)?;
        let mut current: Option<(StateKey, Sessions)> = None;
        let sessions = &mut self.sessions;
        let mut put = |key: StateKey, set: Sessions| {
            let set = SessionSet::encode(&set)?;
            sessions.update(
                &key,
                0,
                i64::MIN,
                Watermark::MIN,
                SessionSet::default,
                |s| *s = set,
            )
        };
        rows.drain_each(|key, start, session| {
            match &mut current {
                Some((k, set)) if *k == key => set.push((start, session)),
                _ => {
                    if let Some((k, set)) =
                        current.replace((key, smallvec::smallvec![(start, session)]))
                    {
                        put(k, set)?;
                    }
                }
            }
            Ok(())
        })?;
        if let Some((k, set)) = current {
            put(k, set)?;
        }
        Ok(())
    }
}

impl Operator for WindowOperator {
    fn has_more_output(&self) -> bool {
        self.more
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        self.max_parallelism = state.subtask().max_parallelism;
        self.key_groups = state.subtask().key_groups();
        match self.plan.kind {
            WindowKind::Sliced { size, slide } => {
                let backend = state.keyed()?;
                self.panes.attach(&backend)?;
                let marks: Vec<FiredMark> = state
                    .operator_state(FIRED)
                    .into_iter()
                    .map(|(_, _, data)| {
                        postcard::from_bytes::<FiredMark>(data).map_err(|e| {
                            freshet_engine::EngineError::State(format!(
                                "reading how far the window fired: {e}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?;
                if state.is_restored() && marks.is_empty() {
                    self.move_from_keyed_layout(&backend, size, slide)?;
                } else {
                    self.restore_marks(marks);
                }
            }
            WindowKind::Session { .. } => {
                state.attach(&mut self.sessions)?;
                if state.is_restored() {
                    self.move_session_rows(&state.keyed()?)?;
                }
                self.fire = state.timers("fire")?;
                self.cleanup = state.timers("cleanup")?;
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        match self.plan.kind {
            WindowKind::Sliced { .. } => {
                snap.flush_panes(&mut self.panes)?;
                let data = postcard::to_allocvec(&self.mark()).map_err(|e| {
                    freshet_engine::EngineError::State(format!(
                        "writing how far the window fired: {e}"
                    ))
                })?;
                snap.put(FIRED, data);
                Ok(())
            }
            WindowKind::Session { .. } => {
                snap.flush(&mut self.sessions)?;
                snap.flush_timers(&mut self.fire)?;
                snap.flush_timers(&mut self.cleanup)
            }
        }
    }

    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        self.process_rows(&batch, None, None, ctx, out)
    }

    fn process_selection(
        &mut self,
        _: usize,
        rows: Selection,
        ctx: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        let keys = rows.keys_by(&self.plan.keys);
        self.process_rows(&rows.batch, Some(&rows.rows), keys, ctx, out)
    }

    fn on_watermark(
        &mut self,
        wm: Watermark,
        _: &OperatorContext<'_>,
        out: &mut dyn Output,
    ) -> Result<()> {
        if let WindowKind::Sliced { size, slide } = self.plan.kind {
            // a batch of rows per call (see `has_more_output`); slices are dropped once every
            // window over them is done
            let mut results = Results::new(&self.plan.aggs);
            self.more = false;
            loop {
                let limit = FIRE_BATCH - results.len();
                if !self.fire_sliced(size, slide, wm, limit, &mut results)? {
                    break;
                }
                if results.len() >= FIRE_BATCH {
                    self.more = true;
                    break;
                }
            }
            self.emit(&results, out)?;
            if !self.more {
                if self
                    .floors
                    .as_ref()
                    .is_some_and(|f| f.max <= self.fired_through)
                {
                    self.floors = None;
                }
                let last =
                    wm.0.saturating_sub(self.plan.lateness)
                        .saturating_add(1)
                        .saturating_sub(size);
                self.panes.drop_through(last)?;
            }
            return Ok(());
        }
        let lateness = self.plan.lateness;
        if self.draining.is_some()
            || (lateness == 0
                && self.fire.latest().is_some_and(|l| l <= wm.0)
                && self.sessions.spills())
        {
            return self.drain_sessions(wm, out);
        }
        // sessions: one batch of windows per call; sessions are cleaned up once every window
        // due has fired
        let due = self.fire.due(wm, FIRE_BATCH)?;
        self.more = due.len() == FIRE_BATCH;
        let mut rows = Vec::with_capacity(due.len());
        self.sessions
            .prefetch(due.iter().map(|(_, k)| k.as_slice()))?;
        for (t, key) in due {
            let end = t + 1;
            // without lateness no record can reach the session once it fired: it goes now
            if let Some((start, accs)) = self.take_session(&key, end, lateness == 0)? {
                rows.push(Fired {
                    key,
                    start,
                    end,
                    accs,
                });
            }
        }
        self.emit_rows(rows, out)?;
        if self.more {
            return Ok(());
        }
        loop {
            let due = self.cleanup.due(wm, FIRE_BATCH)?;
            if due.is_empty() {
                break;
            }
            self.sessions
                .prefetch(due.iter().map(|(_, k)| k.as_slice()))?;
            for (t, key) in due {
                self.drop_sessions(&key, |s| (s.end - 1).saturating_add(lateness) <= t)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
