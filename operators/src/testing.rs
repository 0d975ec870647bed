//! Test fixtures: drive one operator by hand with batches and watermarks.
use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use std::sync::Arc;

use freshet_engine::element::Selection;
use freshet_engine::keys::{EncodedKeys, KeyColumns, hash_key};
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{Operator, OperatorContext, Output, SubtaskInfo};
use freshet_engine::state::{KeyedBackend, StateConfig};
use freshet_engine::{TIME_COLUMN, Watermark};

/// Collected output of an operator.
#[derive(Default)]
pub struct Sink(pub Vec<(usize, RecordBatch)>);

impl Output for Sink {
    fn emit(&mut self, port: usize, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.0.push((port, batch));
        }
    }
}

/// Drives an operator: every batch is judged against the watermark last given.
pub struct Harness<O: Operator> {
    pub op: O,
    pub info: SubtaskInfo,
    pub metrics: Arc<SubtaskMetrics>,
    pub wm: Watermark,
    pub out: Sink,
}

impl<O: Operator> Harness<O> {
    pub fn new(op: O) -> Self {
        Harness {
            op,
            info: SubtaskInfo {
                job: "test".into(),
                vertex: "v".into(),
                index: 0,
                parallelism: 1,
                max_parallelism: 128,
            },
            metrics: Arc::new(SubtaskMetrics::default()),
            wm: Watermark::MIN,
            out: Sink::default(),
        }
    }

    pub fn push(&mut self, input: usize, batch: RecordBatch) {
        let ctx = OperatorContext {
            subtask: &self.info,
            record_watermark: self.wm,
            current_watermark: self.wm,
            metrics: &self.metrics,
        };
        self.op
            .process_batch(input, batch, &ctx, &mut self.out)
            .unwrap();
    }

    /// Pushes rows of a shared batch, as a hash edge within a process sends them.
    pub fn push_selection(&mut self, input: usize, rows: Selection) {
        let ctx = OperatorContext {
            subtask: &self.info,
            record_watermark: self.wm,
            current_watermark: self.wm,
            metrics: &self.metrics,
        };
        self.op
            .process_selection(input, rows, &ctx, &mut self.out)
            .unwrap();
    }

    pub fn watermark(&mut self, wm: i64) {
        self.wm = Watermark(wm);
        let ctx = OperatorContext {
            subtask: &self.info,
            record_watermark: self.wm,
            current_watermark: self.wm,
            metrics: &self.metrics,
        };
        // as the runtime does: again while the operator held output back
        loop {
            self.op.on_watermark(self.wm, &ctx, &mut self.out).unwrap();
            if !self.op.has_more_output() {
                break;
            }
        }
    }

    /// Everything emitted on `port` so far, as JSON lines, and clears it.
    pub fn take(&mut self, port: usize) -> Vec<String> {
        let mut lines = Vec::new();
        let mut keep = Vec::new();
        for (p, b) in std::mem::take(&mut self.out.0) {
            if p == port {
                let mut buf = Vec::new();
                crate::json::write_rows(&b, &mut buf).unwrap();
                lines.extend(String::from_utf8(buf).unwrap().lines().map(str::to_string));
            } else {
                keep.push((p, b));
            }
        }
        self.out.0 = keep;
        lines
    }
}

/// A schema with the given fields plus the time column.
pub fn schema(fields: Vec<Field>) -> SchemaRef {
    let mut fields = fields;
    fields.push(Field::new(
        TIME_COLUMN,
        arrow::datatypes::DataType::Int64,
        false,
    ));
    Arc::new(Schema::new(fields))
}

/// A batch of `columns` plus the time column from `times`.
pub fn batch(schema: &SchemaRef, mut columns: Vec<ArrayRef>, times: &[i64]) -> RecordBatch {
    columns.push(Arc::new(Int64Array::from(times.to_vec())));
    RecordBatch::try_new(schema.clone(), columns).unwrap()
}

/// A batch of a text column and an integer column with the time column, from (text, integer,
/// time) rows.
pub fn text_int_rows(schema: &SchemaRef, rows: &[(&str, i64, i64)]) -> RecordBatch {
    batch(
        schema,
        vec![
            Arc::new(arrow::array::StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ],
        &rows.iter().map(|r| r.2).collect::<Vec<_>>(),
    )
}

/// Pseudo-random numbers below `m` (xorshift), the same sequence for the same seed.
pub fn random(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed;
    move |m| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    }
}

/// A RocksDB instance in `dir` owning every key group, whose tables cache at most `cache_keys`
/// keys each, so that tests read state back.
pub fn capped_backend(dir: &std::path::Path, cache_keys: usize) -> Arc<KeyedBackend> {
    let config = StateConfig {
        local_dir: dir.to_path_buf(),
        cache_keys: Some(cache_keys),
        ..Default::default()
    };
    let range = freshet_engine::KeyGroupRange::for_subtask(128, 1, 0);
    Arc::new(KeyedBackend::open(&dir.join("db"), &config, range, 128).unwrap())
}

/// `batch` as a hash edge within a process would send it to two subtasks: split by the hash of
/// column `split_by`, each part with the batch and keys encoded by column `keyed_by`.
pub fn selections(batch: &RecordBatch, split_by: &str, keyed_by: &str) -> [Selection; 2] {
    let encode = |by: &str| {
        let columns = KeyColumns::resolve(&batch.schema(), &[by.into()]).unwrap();
        let mut keys = EncodedKeys::default();
        columns.encode(batch, &mut keys).unwrap();
        (Arc::new(keys), Arc::new(columns))
    };
    let (split, _) = encode(split_by);
    let (keys, key_columns) = encode(keyed_by);
    std::array::from_fn(|half| Selection {
        batch: batch.clone(),
        rows: (0..batch.num_rows() as u32)
            .filter(|r| hash_key(split.row(*r as usize)) % 2 == half as u64)
            .collect(),
        keys: keys.clone(),
        key_columns: key_columns.clone(),
    })
}
