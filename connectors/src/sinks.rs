//! Sinks: JSON Lines file (append), file-backed upsert table, stdout, and a counting blackhole.
//!
//! With checkpoints, the file and table sinks are exactly-once (two-phase: staged, committed when
//! the checkpoint completes) and the blackhole's totals are part of the snapshot; stdout is
//! at-least-once (a restart may print rows again).
//!
//! Sinks are operators without outputs. Rows are written without the time column; timestamps as
//! RFC 3339 text.
use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use arrow::record_batch::RecordBatch;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::commit::PendingCommits;
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{Operator, OperatorContext, Output};
use freshet_engine::{EngineError, Result, Watermark};
use freshet_operators::expr::Expr;
use freshet_operators::json;
use freshet_operators::values::{ColumnReader, Scalar};

use crate::SinkPlan;
use crate::registry::{SinkConnector, SinkContext};
use crate::resolve;
use freshet_job::{Problem, Problems};
use std::sync::Arc;

/// Appends every row to a JSON Lines file (a changelog, for upsert streams).
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSinkSettings {
    /// Output path (relative: to the job file's directory).
    pub path: String,
}

/// The `file` sink connector.
pub struct FileSinkConnector;

impl SinkConnector for FileSinkConnector {
    type Config = FileSinkSettings;
    fn kind(&self) -> &'static str {
        "file"
    }
    fn single_writer(&self) -> bool {
        true
    }
    fn plan(
        &self,
        ctx: &SinkContext<'_>,
        c: FileSinkSettings,
    ) -> std::result::Result<SinkPlan, Problems> {
        let full = resolve(ctx.base, &c.path);
        Ok(SinkPlan {
            factory: Arc::new(move |_| Box::new(FileSink::new(full.clone(), true))),
        })
    }
}

/// A file-backed table: rows are upserted (and deleted) by key; the file holds the current
/// table as JSON Lines, sorted by key, replaced atomically.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableSettings {
    /// Output path.
    pub path: String,
    /// Key columns (default: the stream's upsert key, e.g. window key + window bounds).
    #[serde(default)]
    pub key: Option<Vec<String>>,
    /// SQL predicate: rows for which it is true delete their key instead of upserting it.
    #[serde(default)]
    pub delete_when: Option<String>,
}

/// The `table` sink connector.
pub struct TableConnector;

impl SinkConnector for TableConnector {
    type Config = TableSettings;
    fn kind(&self) -> &'static str {
        "table"
    }
    fn single_writer(&self) -> bool {
        true
    }
    fn plan(
        &self,
        ctx: &SinkContext<'_>,
        c: TableSettings,
    ) -> std::result::Result<SinkPlan, Problems> {
        let key: Vec<String> = match (c.key, ctx.upsert_key) {
            (Some(k), _) if k.is_empty() => {
                return Err(ctx.problem("key", "needs at least one key column"));
            }
            (Some(k), _) => k,
            (None, Some(k)) => k.to_vec(),
            (None, None) => {
                return Err(Problems(vec![
                    Problem::new(
                        format!("{}.key", ctx.path),
                        "the input is not an upsert stream, so the table needs a key",
                    )
                    .hint("add key: [column, ...]"),
                ]));
            }
        };
        let mut cols = Vec::new();
        for (i, k) in key.iter().enumerate() {
            cols.push(
                ctx.input.index_of(k).map_err(|_| {
                    ctx.problem(&format!("key[{i}]"), format!("unknown column '{k}'"))
                })?,
            );
        }
        let delete = c
            .delete_when
            .as_deref()
            .map(|d| Expr::compile(d, ctx.input))
            .transpose()
            .map_err(|e| ctx.problem("delete_when", e.message))?;
        let full = resolve(ctx.base, &c.path);
        Ok(SinkPlan {
            factory: Arc::new(move |_| {
                Box::new(TableSink::new(full.clone(), cols.clone(), delete.clone()))
            }),
        })
    }
}

/// Prints rows as JSON Lines on standard output.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSettings {}

/// The `stdout` sink connector.
pub struct StdoutConnector;

impl SinkConnector for StdoutConnector {
    type Config = StdoutSettings;
    fn kind(&self) -> &'static str {
        "stdout"
    }
    fn single_writer(&self) -> bool {
        true
    }
    fn plan(
        &self,
        _: &SinkContext<'_>,
        _: StdoutSettings,
    ) -> std::result::Result<SinkPlan, Problems> {
        Ok(SinkPlan {
            factory: Arc::new(|_| Box::new(StdoutSink)),
        })
    }
}

/// Discards rows, counting them and summing the given SQL expressions (wrapping 64-bit).
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlackholeSettings {
    /// Expressions whose wrapping sums are reported (checksums).
    #[serde(default)]
    pub checksums: Vec<String>,
    /// Most rows per second each subtask takes (a slow destination, for testing
    /// backpressure); unlimited if unset.
    #[serde(default)]
    pub rows_per_second: Option<f64>,
    /// SQL expression (BIGINT, microseconds since the Unix epoch, e.g. a generator's
    /// `ingestion_time` column): the time from it to a row's arrival is recorded per row and
    /// reported as a histogram, `<sink>.latency_us.le_<bound>` = rows at most that late.
    #[serde(default)]
    pub latency_of: Option<String>,
}

/// The `blackhole` sink connector.
pub struct BlackholeConnector;

impl SinkConnector for BlackholeConnector {
    type Config = BlackholeSettings;
    fn kind(&self) -> &'static str {
        "blackhole"
    }
    fn plan(
        &self,
        ctx: &SinkContext<'_>,
        c: BlackholeSettings,
    ) -> std::result::Result<SinkPlan, Problems> {
        if c.rows_per_second.is_some_and(|r| r.is_nan() || r <= 0.0) {
            return Err(ctx.problem("rows_per_second", "must be positive"));
        }
        let rate = c.rows_per_second;
        let mut compiled = Vec::new();
        for (i, sum) in c.checksums.iter().enumerate() {
            let e = Expr::compile(sum, ctx.input)
                .map_err(|e| ctx.problem(&format!("checksums[{i}]"), e.message))?;
            check_checksum(&e).map_err(|m| ctx.problem(&format!("checksums[{i}]"), m))?;
            compiled.push((sum.clone(), e));
        }
        let latency = match &c.latency_of {
            Some(l) => {
                let e = Expr::compile(l, ctx.input)
                    .map_err(|e| ctx.problem("latency_of", e.message))?;
                if e.data_type() != &DataType::Int64 {
                    return Err(ctx.problem(
                        "latency_of",
                        "must be BIGINT (microseconds since the Unix epoch)",
                    ));
                }
                Some(e)
            }
            None => None,
        };
        let name = ctx.name.to_string();
        Ok(SinkPlan {
            factory: Arc::new(move |_| {
                Box::new(BlackholeSink::new(
                    name.clone(),
                    compiled.clone(),
                    rate,
                    latency.clone(),
                ))
            }),
        })
    }
}

const FLUSH_EVERY: Duration = Duration::from_secs(1);

fn create(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
    }
    File::create(path).map_err(|e| EngineError::io(format!("creating {}", path.display()), e))
}

/// Appends rows to a JSON Lines file. Streams with updates (window results with lateness) are
/// written as a changelog: a later row with the same key replaces an earlier one.
///
/// **Exactly once** (when the job takes checkpoints): rows are staged in
/// `.<file>.staging/<subtask>-<run>-<n>.part` beside the file; a barrier closes the staged part of its
/// checkpoint, and when that checkpoint completes the part is appended to the file and deleted.
/// The snapshot records the file's committed length and the parts awaiting commit, so a restore
/// finishes the commits of the restored checkpoint (a part already appended is recognised by
/// the file's length), cuts off anything written after it, and discards newer staged parts.
pub struct FileSink {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    create_if_empty: bool,
    buf: Vec<u8>,
    last_flush: Instant,
    /// Two-phase mode and its bookkeeping.
    staging: Option<Staging>,
}

struct Staging {
    dir: PathBuf,
    subtask: u32,
    /// Unique to this run of the subtask, so a part of an earlier run that a restored checkpoint
    /// names is never confused with a part this run writes.
    run: String,
    /// Sequence number of the next part.
    next_part: u64,
    /// The part being written: file name and bytes so far.
    current: Option<(String, u64)>,
    /// Closed parts awaiting their checkpoints: the sink's commit data.
    commits: PendingCommits<StagedPart>,
    /// Length of the file with every commit so far applied.
    committed_len: u64,
}

/// A closed part awaiting its checkpoint's completion (the commit data of a checkpoint).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StagedPart {
    file: String,
    len: u64,
}

/// Where the commit data goes in the snapshot.
const SINK_COMMITS: &str = "file-sink-commits";
/// The file's committed length in the snapshot (8 bytes, big-endian).
const SINK_LENGTH: &str = "file-sink-length";

/// The snapshot of a file sink in the earlier format (one record, read on restore).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LegacyFileSinkState {
    committed_len: u64,
    pending: Vec<LegacyPart>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LegacyPart {
    checkpoint: u64,
    file: String,
    len: u64,
}

const LEGACY_SINK_STATE: &str = "file-sink";

fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> EngineError {
    move |e| EngineError::io(context.to_string(), e)
}

impl FileSink {
    /// A sink writing `path`; with `create_if_empty` false the file is only created once a row
    /// arrives (used for dead letters).
    pub fn new(path: PathBuf, create_if_empty: bool) -> Self {
        FileSink {
            path,
            writer: None,
            create_if_empty,
            buf: Vec::new(),
            last_flush: Instant::now(),
            staging: None,
        }
    }

    fn writer(&mut self) -> Result<&mut BufWriter<File>> {
        if self.writer.is_none() {
            let file = match self.staging.as_mut() {
                Some(st) => {
                    let name = format!("{}-{}-{}.part", st.subtask, st.run, st.next_part);
                    st.next_part += 1;
                    st.current = Some((name.clone(), 0));
                    create(&st.dir.join(name))?
                }
                None => create(&self.path)?,
            };
            self.writer = Some(BufWriter::with_capacity(1 << 16, file));
        }
        Ok(self.writer.as_mut().expect("just opened"))
    }

    fn flush_if_due(&mut self) -> Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()
        } else {
            Ok(())
        }
    }

    fn flush(&mut self) -> Result<()> {
        let path = self.path.display().to_string();
        if let Some(w) = self.writer.as_mut() {
            w.flush()
                .map_err(|e| EngineError::io(format!("writing {path}"), e))?;
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Closes the part being written (durably); returns it, if one was open.
    fn close_part(&mut self) -> Result<Option<StagedPart>> {
        let Some(w) = self.writer.take() else {
            return Ok(None);
        };
        let st = self.staging.as_mut().expect("two-phase");
        let (name, len) = st.current.take().expect("a part is open");
        let file = w
            .into_inner()
            .map_err(|e| EngineError::io(format!("writing {name}"), e.into_error()))?;
        file.sync_data().map_err(io(format!("syncing {name}")))?;
        Ok(Some(StagedPart { file: name, len }))
    }

    /// Appends `parts` to the file, in order (each at most once).
    fn commit(&mut self, parts: Vec<StagedPart>) -> Result<()> {
        let st = self.staging.as_mut().expect("two-phase");
        for part in parts {
            append_part(&self.path, &st.dir, &part, st.committed_len)?;
            st.committed_len += part.len;
        }
        Ok(())
    }
}

/// Makes the file `committed_len + part.len` long with the part's bytes at the end: appends the
/// part unless an earlier attempt already did (the part is deleted only after a durable append).
fn append_part(path: &Path, dir: &Path, part: &StagedPart, committed_len: u64) -> Result<()> {
    let staged = dir.join(&part.file);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let len = out
        .metadata()
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    if !staged.exists() {
        if len < committed_len + part.len {
            return Err(EngineError::State(format!(
                "{} is {len} bytes but the checkpoint says {} were committed, and part {} is gone; the file was changed outside the job",
                path.display(),
                committed_len + part.len,
                part.file
            )));
        }
        return Ok(());
    }
    if len < committed_len {
        return Err(EngineError::State(format!(
            "{} is {len} bytes, shorter than the {committed_len} committed bytes; the file was changed outside the job",
            path.display()
        )));
    }
    out.set_len(committed_len)
        .map_err(io(format!("truncating {}", path.display())))?;
    let mut input = File::open(&staged).map_err(io(format!("opening {}", staged.display())))?;
    std::io::copy(&mut input, &mut out).map_err(io(format!("appending to {}", path.display())))?;
    out.sync_data()
        .map_err(io(format!("syncing {}", path.display())))?;
    std::fs::remove_file(&staged).map_err(io(format!("removing {}", staged.display())))?;
    Ok(())
}

impl Operator for FileSink {
    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        if !state.checkpointing() {
            return Ok(());
        }
        let file = self
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let dir = self
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .join(format!(".{file}.staging"));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let subtask = state.subtask().index;
        let (commits, mut restored) = PendingCommits::open(state, SINK_COMMITS)?;
        let own = |name| {
            state
                .operator_state(name)
                .into_iter()
                .find(|(i, _, _)| *i == subtask)
                .map(|(_, _, data)| data)
        };
        let mut restored_len = own(SINK_LENGTH)
            .map(|d| {
                <[u8; 8]>::try_from(d)
                    .map(u64::from_be_bytes)
                    .map_err(|_| EngineError::State("file sink length: not 8 bytes".into()))
            })
            .transpose()?;
        if let Some(data) = own(LEGACY_SINK_STATE) {
            let legacy: LegacyFileSinkState = postcard::from_bytes(data)
                .map_err(|e| EngineError::State(format!("file sink state: {e}")))?;
            restored_len = Some(legacy.committed_len);
            restored.extend(legacy.pending.into_iter().map(|p| StagedPart {
                file: p.file,
                len: p.len,
            }));
        }
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.staging = Some(Staging {
            dir: dir.clone(),
            subtask,
            run: format!("{:x}{started:x}", std::process::id()),
            next_part: 0,
            current: None,
            commits,
            committed_len: restored_len.unwrap_or(0),
        });
        match restored_len {
            Some(committed_len) => {
                // the restored checkpoint completed: finish its commits, then cut off the rest
                self.commit(restored)?;
                let committed_len = self
                    .staging
                    .as_ref()
                    .map_or(committed_len, |st| st.committed_len);
                if self.path.exists() {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&self.path)
                        .map_err(io(format!("opening {}", self.path.display())))?;
                    let len = f
                        .metadata()
                        .map_err(io(format!("reading {}", self.path.display())))?
                        .len();
                    if len < committed_len {
                        return Err(EngineError::State(format!(
                            "{} is {len} bytes, shorter than the {committed_len} committed bytes; the file was changed outside the job",
                            self.path.display(),
                        )));
                    }
                    f.set_len(committed_len)
                        .map_err(io(format!("truncating {}", self.path.display())))?;
                }
            }
            None => {
                if self.create_if_empty || self.path.exists() {
                    create(&self.path)?;
                }
            }
        }
        // parts of this subtask not covered by the restored checkpoint are discarded
        let prefix = format!("{subtask}-");
        for entry in std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".part") {
                std::fs::remove_file(entry.path())
                    .map_err(io(format!("removing {}", entry.path().display())))?;
            }
        }
        Ok(())
    }

    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        SubtaskMetrics::add(&ctx.metrics.records_written, batch.num_rows() as u64);
        self.buf.clear();
        json::write_rows(&batch, &mut self.buf)?;
        let buf = std::mem::take(&mut self.buf);
        let path = self.path.display().to_string();
        self.writer()?
            .write_all(&buf)
            .map_err(|e| EngineError::io(format!("writing {path}"), e))?;
        if let Some((_, len)) = self.staging.as_mut().and_then(|s| s.current.as_mut()) {
            *len += buf.len() as u64;
        }
        self.buf = buf;
        // input that never pauses and carries no watermarks (the dead-letter path) is still
        // flushed every second
        self.flush_if_due()
    }

    fn on_watermark(
        &mut self,
        _: Watermark,
        _: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        self.flush_if_due()
    }

    fn on_idle(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        self.flush()
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        if self.staging.is_none() {
            return Ok(());
        }
        let closed = self.close_part()?;
        let st = self.staging.as_mut().expect("two-phase");
        st.commits.snapshot(snap, closed)?;
        snap.put(SINK_LENGTH, st.committed_len.to_be_bytes().to_vec());
        Ok(())
    }

    fn checkpoint_complete(&mut self, id: u64) -> Result<()> {
        if let Some(st) = self.staging.as_mut() {
            let parts = st.commits.complete(id);
            self.commit(parts)?;
        }
        Ok(())
    }

    fn on_end_of_input(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        if self.staging.is_some() {
            // with checkpoints, the input ends only after the final checkpoint completed, so
            // whatever is staged is covered by it
            let closed = self.close_part()?;
            let st = self.staging.as_mut().expect("two-phase");
            let mut parts = st.commits.complete(u64::MAX);
            parts.extend(closed);
            self.commit(parts)?;
            if self.create_if_empty && !self.path.exists() {
                create(&self.path)?;
            }
            // the staging directory goes once no subtask has anything left in it
            if let Some(st) = &self.staging {
                let _ = std::fs::remove_dir(&st.dir);
            }
            return Ok(());
        }
        if self.create_if_empty {
            self.writer()?;
        }
        self.flush()
    }
}

/// A file-backed table: upserts and deletes by key; the file holds the current rows as JSON
/// Lines sorted by key, replaced atomically (write, then rename) at most once a second while
/// input flows, when input goes quiet, and at the end.
///
/// **Exactly once** (when the job takes checkpoints): the table is written to
/// `<file>.<checkpoint>.staged` at each barrier and renamed over the file when that checkpoint
/// completes; the rows are part of the snapshot, and a restore finishes a pending rename.
pub struct TableSink {
    path: PathBuf,
    key_columns: Vec<usize>,
    delete_when: Option<Expr>,
    rows: BTreeMap<Vec<Option<Scalar>>, String>,
    dirty: bool,
    last_write: Instant,
    /// Two-phase: staged tables (file names beside the table) awaiting their checkpoint (the
    /// sink's commit data); `None` without checkpoints.
    staged: Option<PendingCommits<String>>,
}

/// The snapshot of a table sink: its rows (and, in the earlier format, its staged tables).
#[derive(serde::Serialize, serde::Deserialize)]
struct TableSinkState {
    rows: Vec<(Vec<Option<Scalar>>, String)>,
    staged: Vec<(u64, String)>,
}

const TABLE_STATE: &str = "table-sink";
/// Where the commit data goes in the snapshot.
const TABLE_COMMITS: &str = "table-sink-commits";

impl TableSink {
    /// A table at `path` keyed by the given input columns.
    pub fn new(path: PathBuf, key_columns: Vec<usize>, delete_when: Option<Expr>) -> Self {
        TableSink {
            path,
            key_columns,
            delete_when,
            rows: BTreeMap::new(),
            dirty: true,
            last_write: Instant::now(),
            staged: None,
        }
    }

    fn write_if_due(&mut self) -> Result<()> {
        if self.staged.is_none() && self.dirty && self.last_write.elapsed() >= FLUSH_EVERY {
            self.write()
        } else {
            Ok(())
        }
    }

    fn write(&mut self) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        self.write_to(&tmp)?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| EngineError::io(format!("replacing {}", self.path.display()), e))?;
        self.dirty = false;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Commits staged tables, oldest first: the newest replaces the table, older ones are
    /// superseded. Committing again what was committed finds nothing to rename.
    fn commit(&mut self, staged: Vec<String>) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if let Some((newest, older)) = staged.split_last() {
            for older in older {
                let _ = std::fs::remove_file(dir.join(older));
            }
            let newest = dir.join(newest);
            if newest.exists() {
                std::fs::rename(&newest, &self.path).map_err(|e| {
                    EngineError::io(format!("replacing {}", self.path.display()), e)
                })?;
            }
        }
        Ok(())
    }

    fn write_to(&self, tmp: &Path) -> Result<()> {
        let mut w = BufWriter::new(create(tmp)?);
        let io = |e| EngineError::io(format!("writing {}", tmp.display()), e);
        for line in self.rows.values() {
            w.write_all(line.as_bytes()).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
        }
        w.flush().map_err(io)?;
        w.get_ref().sync_data().map_err(io)?;
        Ok(())
    }
}

/// Deletes every staged table of `path` (`<stem>.<checkpoint>.staged` beside it).
fn remove_staged(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", stem.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let staged = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".staged"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if staged && let Err(e) = std::fs::remove_file(e.path()) {
            tracing::warn!(file = %name, error = %e, "cannot delete a stale staged table");
        }
    }
}

impl Operator for TableSink {
    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        if !state.checkpointing() {
            return Ok(());
        }
        let me = state.subtask().index;
        let (commits, mut restored) = PendingCommits::open(state, TABLE_COMMITS)?;
        if let Some((_, _, data)) = state
            .operator_state(TABLE_STATE)
            .into_iter()
            .find(|(i, _, _)| *i == me)
        {
            let r: TableSinkState = postcard::from_bytes(data)
                .map_err(|e| EngineError::State(format!("table sink state: {e}")))?;
            self.rows = r.rows.into_iter().collect();
            // (staged tables recorded here are of the earlier format)
            restored.splice(0..0, r.staged.into_iter().map(|(_, f)| f));
        }
        self.staged = Some(commits);
        // the restored checkpoint completed: finish its pending rename
        self.commit(restored)?;
        // tables staged for checkpoints after the restored one never complete
        remove_staged(&self.path);
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        if self.staged.is_none() {
            return Ok(());
        }
        let file = self.path.with_extension(format!("{}.staged", snap.id()));
        self.write_to(&file)?;
        let name = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let state = TableSinkState {
            rows: self
                .rows
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            staged: Vec::new(),
        };
        snap.put(
            TABLE_STATE,
            postcard::to_allocvec(&state).map_err(|e| EngineError::State(e.to_string()))?,
        );
        if let Some(commits) = self.staged.as_mut() {
            commits.snapshot(snap, Some(name))?;
        }
        Ok(())
    }

    fn checkpoint_complete(&mut self, id: u64) -> Result<()> {
        if let Some(commits) = self.staged.as_mut() {
            let ready = commits.complete(id);
            self.commit(ready)?;
        }
        Ok(())
    }

    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        SubtaskMetrics::add(&ctx.metrics.records_written, batch.num_rows() as u64);
        let keys: Vec<ArrayRef> = self
            .key_columns
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        let readers: Vec<ColumnReader<'_>> =
            keys.iter().map(ColumnReader::new).collect::<Result<_>>()?;
        let deletes = self
            .delete_when
            .as_ref()
            .map(|d| d.evaluate_predicate(&batch))
            .transpose()?;
        let mut buf = Vec::new();
        json::write_rows(&batch, &mut buf)?;
        let text = String::from_utf8(buf).map_err(|e| EngineError::Operator(e.to_string()))?;
        for (row, line) in text.lines().enumerate() {
            let key: Vec<Option<Scalar>> = readers.iter().map(|r| r.get(row)).collect();
            if deletes.as_ref().is_some_and(|d| d.value(row)) {
                self.rows.remove(&key);
            } else {
                self.rows.insert(key, line.to_string());
            }
        }
        self.dirty = true;
        // written every second also while input never pauses and carries no watermarks
        self.write_if_due()
    }

    fn on_watermark(
        &mut self,
        _: Watermark,
        _: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        self.write_if_due()
    }

    fn on_idle(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        if self.staged.is_none() && self.dirty {
            self.write()
        } else {
            Ok(())
        }
    }

    fn on_end_of_input(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        // with checkpoints, the input ends only after the final checkpoint completed
        if let Some(commits) = self.staged.as_mut() {
            let ready = commits.complete(u64::MAX);
            self.commit(ready)?;
        }
        self.write()
    }
}

/// Prints rows as JSON Lines on standard output.
pub struct StdoutSink;

impl Operator for StdoutSink {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        SubtaskMetrics::add(&ctx.metrics.records_written, batch.num_rows() as u64);
        let mut buf = Vec::new();
        json::write_rows(&batch, &mut buf)?;
        std::io::stdout()
            .lock()
            .write_all(&buf)
            .map_err(|e| EngineError::io("writing stdout", e))
    }
}

/// Discards rows, counting them and summing 64-bit checksum expressions (wrapping). Reports the
/// accumulators `<sink>.rows` and `<sink>.sum1`, `<sink>.sum2`, ... in the order of the checksums.
pub struct BlackholeSink {
    name: String,
    checksums: Vec<(String, Expr)>,
    rows: i64,
    sums: Vec<i64>,
    /// Rows per second it takes at most, and the pacing clock.
    pace: Option<(f64, std::time::Instant, u64)>,
    /// The ingestion time rows are measured against, and the histogram of their latencies.
    latency: Option<(Expr, Latencies)>,
}

impl BlackholeSink {
    /// A blackhole reporting as `name`, taking at most `rows_per_second` if given, and
    /// recording each row's latency from `latency_of` (microseconds since the Unix epoch).
    pub fn new(
        name: String,
        checksums: Vec<(String, Expr)>,
        rows_per_second: Option<f64>,
        latency_of: Option<Expr>,
    ) -> Self {
        let n = checksums.len();
        BlackholeSink {
            name,
            checksums,
            rows: 0,
            sums: vec![0; n],
            pace: rows_per_second.map(|r| (r, std::time::Instant::now(), 0)),
            latency: latency_of.map(|e| (e, Latencies::default())),
        }
    }
}

/// A histogram of latencies in microseconds: eight buckets per power of two (each bound at most
/// an eighth above the values in it), so histograms of several subtasks add up bucket by bucket.
#[derive(Debug, Default)]
pub struct Latencies {
    counts: Vec<u64>,
}

impl Latencies {
    /// The bucket of `us` microseconds (negative values, from clocks apart, count as 0).
    fn bucket(us: i64) -> usize {
        let v = us.max(0) as u64 + 1;
        let octave = 63 - v.leading_zeros() as usize;
        if octave < 3 {
            return v as usize - 1;
        }
        let sub = ((v >> (octave - 3)) & 7) as usize;
        octave * 8 + sub - 16
    }

    /// The largest latency in bucket `b`, microseconds.
    pub fn upper_bound(b: usize) -> u64 {
        if b < 8 {
            return b as u64;
        }
        let octave = (b + 16) / 8;
        let sub = ((b + 16) % 8) as u64;
        ((8 + sub + 1) << (octave - 3)) - 2
    }

    /// Records one latency.
    pub fn record(&mut self, us: i64) {
        let b = Self::bucket(us);
        if b >= self.counts.len() {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
    }

    /// (upper bound in microseconds, rows) of every non-empty bucket, in order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(b, c)| (Self::upper_bound(b), *c))
    }
}

impl Operator for BlackholeSink {
    fn process_batch(
        &mut self,
        _: usize,
        batch: RecordBatch,
        ctx: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        if let Some((rate, start, taken)) = &mut self.pace {
            // a slow destination: hold the subtask until the batch is due
            *taken += batch.num_rows() as u64;
            let due = std::time::Duration::from_secs_f64(*taken as f64 / *rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        SubtaskMetrics::add(&ctx.metrics.records_written, batch.num_rows() as u64);
        self.rows += batch.num_rows() as i64;
        if let Some((e, hist)) = &mut self.latency {
            let now = crate::generator::now_us();
            let a = e.evaluate(&batch)?;
            for t in a.as_primitive::<Int64Type>().iter().flatten() {
                hist.record(now.saturating_sub(t));
            }
        }
        for ((_, e), sum) in self.checksums.iter().zip(self.sums.iter_mut()) {
            let a = e.evaluate(&batch)?;
            let v = a.as_primitive::<Int64Type>();
            let total = if v.null_count() == 0 {
                v.values().iter().fold(0i64, |acc, x| acc.wrapping_add(*x))
            } else {
                v.iter().flatten().fold(0i64, |acc, x| acc.wrapping_add(x))
            };
            *sum = sum.wrapping_add(total);
        }
        Ok(())
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        // the totals of every former subtask go to subtask 0, so the job's sums stay right at
        // any parallelism
        if state.subtask().index != 0 {
            return Ok(());
        }
        for (_, _, data) in state.operator_state("totals") {
            let totals: Vec<i64> = postcard::from_bytes(data)
                .map_err(|e| EngineError::State(format!("blackhole totals: {e}")))?;
            if totals.len() != self.sums.len() + 1 {
                return Err(EngineError::State(
                    "blackhole totals do not match its checksums".into(),
                ));
            }
            self.rows = self.rows.wrapping_add(totals[0]);
            for (s, t) in self.sums.iter_mut().zip(&totals[1..]) {
                *s = s.wrapping_add(*t);
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        let mut totals = vec![self.rows];
        totals.extend(&self.sums);
        snap.put(
            "totals",
            postcard::to_allocvec(&totals).map_err(|e| EngineError::State(e.to_string()))?,
        );
        Ok(())
    }

    fn accumulators(&self) -> Vec<(String, i64)> {
        let mut out = vec![(format!("{}.rows", self.name), self.rows)];
        for (i, s) in self.sums.iter().enumerate() {
            out.push((format!("{}.sum{}", self.name, i + 1), *s));
        }
        if let Some((_, hist)) = &self.latency {
            for (bound, rows) in hist.buckets() {
                out.push((format!("{}.latency_us.le_{bound}", self.name), rows as i64));
            }
        }
        out
    }
}

/// Checksum expressions must be BIGINT.
pub fn check_checksum(e: &Expr) -> std::result::Result<(), String> {
    if e.data_type() == &DataType::Int64 {
        Ok(())
    } else {
        Err(format!(
            "a checksum must be BIGINT, got {}; CAST it",
            freshet_operators::expr::type_name(e.data_type())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every latency falls in a bucket whose bound is at least it and at most an eighth above
    /// it, and buckets are in order of their bounds.
    #[test]
    fn latency_buckets_bound_their_values_within_an_eighth() {
        let mut last = None;
        for us in (0..5000i64).chain((12..40).map(|s| (1i64 << s) + 12345)) {
            let b = Latencies::bucket(us);
            let bound = Latencies::upper_bound(b);
            assert!(bound >= us as u64, "{us} in bucket {b} bounded by {bound}");
            assert!(
                bound as f64 <= us as f64 * 1.125 + 1.0,
                "{us} in bucket {b} bounded by {bound}"
            );
            if let Some((lb, lbound)) = last {
                assert!(b >= lb && (b > lb || bound == lbound));
            }
            last = Some((b, bound));
        }
        assert_eq!(Latencies::bucket(-5), 0, "clock skew counts as no latency");
    }

    #[test]
    fn stale_staged_tables_are_deleted_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("revenue.jsonl");
        let keep = [
            "revenue.jsonl",
            "revenue.x.staged",
            "revenue.7.staging",
            "other.7.staged",
            "revenue..staged",
        ];
        let gone = ["revenue.7.staged", "revenue.123456.staged"];
        for f in keep.iter().chain(&gone) {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        remove_staged(&table);
        for f in keep {
            assert!(dir.path().join(f).exists(), "{f} was deleted");
        }
        for f in gone {
            assert!(!dir.path().join(f).exists(), "{f} stayed");
        }
    }

    /// A file sink whose input never pauses and carries no watermarks (as on the dead-letter
    /// path) still makes what it wrote visible every second.
    #[test]
    fn a_file_sink_flushes_while_batches_keep_coming() {
        use arrow::array::Int64Array;
        use arrow::datatypes::{Field, Schema};
        struct Nowhere;
        impl Output for Nowhere {
            fn emit(&mut self, _: usize, _: RecordBatch) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut sink = FileSink::new(path.clone(), false);
        let info = freshet_engine::operator::SubtaskInfo {
            job: "t".into(),
            vertex: "v".into(),
            index: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let metrics = Arc::new(SubtaskMetrics::default());
        let ctx = OperatorContext {
            subtask: &info,
            record_watermark: Watermark::MIN,
            current_watermark: Watermark::MIN,
            metrics: &metrics,
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, false),
            Field::new(freshet_engine::TIME_COLUMN, DataType::Int64, false),
        ]));
        let batch = |v: i64| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(vec![v])),
                    Arc::new(Int64Array::from(vec![0])),
                ],
            )
            .unwrap()
        };
        sink.process_batch(0, batch(1), &ctx, &mut Nowhere).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "",
            "buffered at first"
        );
        std::thread::sleep(FLUSH_EVERY + Duration::from_millis(50));
        sink.process_batch(0, batch(2), &ctx, &mut Nowhere).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"v\":1}\n{\"v\":2}\n"
        );
    }
}
