//! Sinks: JSON Lines file (append), file-backed upsert table, stdout, and a counting blackhole.
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

use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{Operator, OperatorContext, Output};
use freshet_engine::{EngineError, Result, Watermark};
use freshet_operators::expr::Expr;
use freshet_operators::json;
use freshet_operators::values::{ColumnReader, Scalar};

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
pub struct FileSink {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    create_if_empty: bool,
    buf: Vec<u8>,
    last_flush: Instant,
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
        }
    }

    fn writer(&mut self) -> Result<&mut BufWriter<File>> {
        if self.writer.is_none() {
            self.writer = Some(BufWriter::with_capacity(1 << 16, create(&self.path)?));
        }
        Ok(self.writer.as_mut().expect("just opened"))
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
}

impl Operator for FileSink {
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
        self.buf = buf;
        Ok(())
    }

    fn on_watermark(
        &mut self,
        _: Watermark,
        _: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()
        } else {
            Ok(())
        }
    }

    fn on_idle(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        self.flush()
    }

    fn on_end_of_input(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        if self.create_if_empty {
            self.writer()?;
        }
        self.flush()
    }
}

/// A file-backed table: upserts and deletes by key; the file holds the current rows as JSON
/// Lines sorted by key, replaced atomically (write, then rename) at most once a second while
/// input flows, when input goes quiet, and at the end.
pub struct TableSink {
    path: PathBuf,
    key_columns: Vec<usize>,
    delete_when: Option<Expr>,
    rows: BTreeMap<Vec<Option<Scalar>>, String>,
    dirty: bool,
    last_write: Instant,
}

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
        }
    }

    fn write(&mut self) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut w = BufWriter::new(create(&tmp)?);
        let io = |e| EngineError::io(format!("writing {}", tmp.display()), e);
        for line in self.rows.values() {
            w.write_all(line.as_bytes()).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
        }
        w.flush().map_err(io)?;
        drop(w);
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| EngineError::io(format!("replacing {}", self.path.display()), e))?;
        self.dirty = false;
        self.last_write = Instant::now();
        Ok(())
    }
}

impl Operator for TableSink {
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
        Ok(())
    }

    fn on_watermark(
        &mut self,
        _: Watermark,
        _: &OperatorContext<'_>,
        _: &mut dyn Output,
    ) -> Result<()> {
        if self.dirty && self.last_write.elapsed() >= FLUSH_EVERY {
            self.write()
        } else {
            Ok(())
        }
    }

    fn on_idle(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        if self.dirty { self.write() } else { Ok(()) }
    }

    fn on_end_of_input(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
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
}

impl BlackholeSink {
    /// A blackhole reporting as `name`.
    pub fn new(name: String, checksums: Vec<(String, Expr)>) -> Self {
        let n = checksums.len();
        BlackholeSink {
            name,
            checksums,
            rows: 0,
            sums: vec![0; n],
        }
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
        SubtaskMetrics::add(&ctx.metrics.records_written, batch.num_rows() as u64);
        self.rows += batch.num_rows() as i64;
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

    fn accumulators(&self) -> Vec<(String, i64)> {
        let mut out = vec![(format!("{}.rows", self.name), self.rows)];
        for (i, s) in self.sums.iter().enumerate() {
            out.push((format!("{}.sum{}", self.name, i + 1), *s));
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
