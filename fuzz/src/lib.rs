//! Fuzz targets: each feeds arbitrary bytes to one of Freshet's decoders or compilers and
//! checks that it answers (an error is fine; a panic, a hang or an allocation sized by a length
//! field is a bug). `fuzz_targets/` wraps them for libFuzzer (`fuzz/run.sh`), and the test
//! suite replays the committed corpus through them (`tests/tests/fuzz_corpus.rs`).
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use freshet_connectors::decode::RowDecoder;
use freshet_job::FieldType;

/// A fuzz target: takes any bytes, returns if the code under test answered.
pub type Target = fn(&[u8]);

/// Every target, by name: what `run.sh` builds and the replay test walks.
pub const TARGETS: &[(&str, Target)] = &[
    ("json_lines", json_lines),
    ("csv_lines", csv_lines),
    ("job_file", job_file),
    ("sql_expr", sql_expr),
    ("data_frames", data_frames),
    ("checkpoint_metadata", checkpoint_metadata),
];

fn fields() -> Vec<(String, FieldType)> {
    [
        ("s", FieldType::String),
        ("i", FieldType::Int),
        ("f", FieldType::Float),
        ("b", FieldType::Bool),
        ("t", FieldType::Timestamp),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect()
}

/// Checks the decoder's rows and columns agree after `accepted` rows.
fn check_columns(d: &mut RowDecoder, accepted: usize) {
    assert_eq!(d.rows(), accepted);
    for c in d.finish() {
        assert_eq!(
            c.len(),
            accepted,
            "a column of another length than the rows"
        );
    }
}

/// JSON Lines records decoded into the five field types.
pub fn json_lines(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut d = RowDecoder::new(fields());
    let accepted = text.lines().filter(|l| d.push_json(l).is_ok()).count();
    check_columns(&mut d, accepted);
}

/// CSV records (the first byte is the delimiter), split as the file source splits them and
/// decoded into the five field types.
pub fn csv_lines(data: &[u8]) {
    let Some((delimiter, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut builder = csv::ReaderBuilder::new();
    builder
        .has_headers(false)
        .delimiter(*delimiter)
        .flexible(true);
    let mut d = RowDecoder::new(fields());
    let mut accepted = 0;
    for line in text.lines() {
        let mut record = csv::StringRecord::new();
        if let Ok(true) = builder
            .from_reader(line.as_bytes())
            .read_record(&mut record)
        {
            let cells: Vec<Option<&str>> = (0..5).map(|i| record.get(i)).collect();
            accepted += usize::from(d.push_text(&cells).is_ok());
        }
    }
    check_columns(&mut d, accepted);
}

/// A job file, then after a NUL byte `--set` overrides one per line: parsed, checked
/// against the schema, typed and validated.
pub fn job_file(data: &[u8]) {
    let (text, overrides) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let overrides: Vec<String> = String::from_utf8_lossy(overrides)
        .lines()
        .map(str::to_string)
        .collect();
    let _ = freshet_connectors::job_format().parse(&text, "fuzz.yaml", &overrides);
}

fn batch() -> RecordBatch {
    let ts = freshet_operators::expr::timestamp_type();
    let schema = Schema::new(vec![
        Field::new("s", arrow::datatypes::DataType::Utf8, true),
        Field::new("i", arrow::datatypes::DataType::Int64, true),
        Field::new("f", arrow::datatypes::DataType::Float64, true),
        Field::new("b", arrow::datatypes::DataType::Boolean, true),
        Field::new("t", ts.clone(), true),
    ]);
    let t = arrow::array::make_array(
        arrow::array::Array::to_data(&Int64Array::from(vec![
            Some(0),
            Some(i64::MAX),
            None,
            Some(i64::MIN),
            Some(1_714_557_600_000),
        ]))
        .into_builder()
        .data_type(ts)
        .build()
        .expect("timestamps"),
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![
            Some(""),
            Some("ä€𝄞"),
            None,
            Some("%_\\"),
            Some("42"),
        ])),
        Arc::new(Int64Array::from(vec![
            Some(0),
            Some(i64::MAX),
            None,
            Some(i64::MIN),
            Some(-1),
        ])),
        Arc::new(Float64Array::from(vec![
            Some(0.0),
            Some(f64::NAN),
            None,
            Some(f64::INFINITY),
            Some(-0.0),
        ])),
        Arc::new(BooleanArray::from(vec![
            Some(true),
            Some(false),
            None,
            Some(true),
            Some(false),
        ])),
        t,
    ];
    RecordBatch::try_new(Arc::new(schema), columns).expect("a batch")
}

/// A SQL expression compiled against columns of every type and evaluated over rows holding
/// extremes and nulls.
pub fn sql_expr(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let batch = batch();
    if let Ok(e) = freshet_operators::expr::Expr::compile(&text, &batch.schema()) {
        if let Ok(a) = e.evaluate(&batch) {
            assert_eq!(a.len(), batch.num_rows());
        }
        let _ = e.evaluate_predicate(&batch);
    }
}

/// Bytes arriving on a data-plane connection: frames, channel opens, Arrow IPC streams,
/// watermarks and barriers.
///
/// The Arrow IPC reader panics on some malformed messages instead of returning an error; the
/// decoder checks for the known ones and turns any other panic of the reader into a
/// malformed-frame error. A panic it catches is therefore not a finding, but the fuzzer's own
/// panic hook would abort on it: a silent hook leaves the fuzzer's abort to panics that escape
/// the decoder (replay such an input with `fuzz_corpus` on stable to see its message).
pub fn data_frames(data: &[u8]) {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = freshet_taskmanager::network::decode_stream(data);
}

/// A checkpoint's `_metadata` file, read as a restore reads it (from a local checkpoint
/// directory of this process).
pub fn checkpoint_metadata(data: &[u8]) {
    use std::sync::OnceLock;
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"));
    let chk = dir.path().join("chk-1");
    std::fs::create_dir_all(&chk).expect("a checkpoint directory");
    std::fs::write(chk.join("_metadata"), data).expect("writing _metadata");
    let _ = freshet_engine::checkpoint::RestoreSource::load(
        &chk.display().to_string(),
        dir.path(),
        &Default::default(),
    );
}
