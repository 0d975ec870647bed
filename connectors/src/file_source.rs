//! File source: JSON Lines or CSV, read line by line, bounded or followed as the file grows.
//!
//! Splits are whole files: a path naming a directory reads every regular file in it in name
//! order, and subtask `i` of `p` reads files `i, i + p, ...`; a subtask with no file finishes at
//! once (so it does not hold back watermarks). A line that cannot be decoded goes to the
//! `dead_letter` output with the file, line number and reason; the job goes on. In follow mode the
//! source never finishes: at the end of the file it waits for more, and an incomplete last line
//! is held until its newline arrives. CSV records are one per line (quoted newlines are not
//! supported). In a followed directory the source's enumerator, run by the JobManager, lists
//! the directory every second and sends each new file to one subtask (by a hash of its name);
//! the file before it in that subtask counts as complete, as with rotated logs.
//!
//! Snapshots record, per file, the byte offset and line number after the last emitted line (or
//! that the file is done), so a restored source resumes exactly there, also at another parallelism.
use arrow::record_batch::RecordBatch;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use freshet_engine::checkpoint::{SnapshotContext, StateContext};
use freshet_engine::operator::{OperatorContext, Source, SourceOutput, SourceStatus};
use freshet_engine::{EngineError, Result};
use freshet_job::{FieldType, Problems};
use freshet_operators::dead_letter::DeadLetters;

use crate::decode::RowDecoder;
use crate::event_time::EventTime;
use crate::registry::{SourceConnector, SourceContext};
use crate::{SourcePlan, SplitEnumerator, resolve};
use std::sync::Arc;

/// File record formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values.
    Csv,
}

/// CSV options.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// The first line names the columns (matched to the schema by name).
    #[serde(default = "default_true")]
    pub header: bool,
    /// Field delimiter, one character.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            header: true,
            delimiter: ',',
        }
    }
}
fn default_true() -> bool {
    true
}
fn default_delimiter() -> char {
    ','
}

/// Files of JSON Lines or CSV. Bounded, or followed as they grow.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// File path; relative paths are resolved against the job file's directory. A directory
    /// reads every file in it, in name order, each as one split.
    pub path: String,
    /// Record format.
    pub format: FileFormat,
    /// Keep reading as the file grows instead of stopping at its end.
    #[serde(default)]
    pub follow: bool,
    /// CSV options.
    #[serde(default)]
    pub csv: CsvOptions,
    /// Upper bound on records read per second by each subtask (unlimited if unset): replay
    /// recorded input at a controlled pace.
    #[serde(default)]
    pub rows_per_second: Option<f64>,
}

/// The `file` source connector.
pub struct FileConnector;

impl SourceConnector for FileConnector {
    type Config = FileSettings;

    fn kind(&self) -> &'static str {
        "file"
    }

    fn plan(
        &self,
        ctx: &SourceContext<'_>,
        c: FileSettings,
    ) -> std::result::Result<SourcePlan, Problems> {
        let fields = ctx.fields("file", "{id: string, ts: timestamp}")?;
        let full = resolve(ctx.base, &c.path);
        let listed = match ctx.splits {
            Some(files) => Ok(files.iter().map(PathBuf::from).collect()),
            None => list_files(&full),
        };
        let files = match listed {
            Ok(files) if !files.is_empty() => files,
            Ok(_) => {
                return Err(ctx.problem(
                    "connector.path",
                    format!("{} contains no files", full.display()),
                ));
            }
            Err(_) => {
                return Err(ctx.problem(
                    "connector.path",
                    format!("{} does not exist", full.display()),
                ));
            }
        };
        if !c.csv.delimiter.is_ascii() {
            return Err(ctx.problem(
                "connector.csv.delimiter",
                "must be a single ASCII character",
            ));
        }
        let decoded = crate::decode::schema_of(&fields);
        let event_time = EventTime::compile(ctx.spec.event_time.as_deref(), &decoded)
            .map_err(|e| ctx.problem("event_time", e.message))?;
        let is_dir = full.is_dir();
        let config = FileSourceConfig {
            name: ctx.name.to_string(),
            path: full,
            files: files.clone(),
            display_path: c.path.clone(),
            format: c.format,
            follow: c.follow,
            header: c.csv.header,
            delimiter: c.csv.delimiter as u8,
            fields,
            event_time: event_time.clone(),
            batch_size: ctx.batch_size,
            rows_per_second: c.rows_per_second,
            followed_dir: c.follow && is_dir,
        };
        let enumerator: Option<Arc<dyn SplitEnumerator>> = config
            .followed_dir
            .then(|| Arc::new(FileEnumerator(config.clone())) as Arc<dyn SplitEnumerator>);
        let mut plan = SourcePlan::new(
            ctx,
            event_time.output_schema(),
            !c.follow,
            std::sync::Arc::new(move |info: &freshet_engine::operator::SubtaskInfo| {
                Ok(Box::new(FileSource::new(
                    config.clone(),
                    info.index,
                    info.parallelism,
                )?) as Box<dyn Source>)
            }),
        );
        // a followed directory gets new files: any subtask may have some later
        if !c.follow || !is_dir {
            plan.max_parallelism = Some(files.len() as u32);
        }
        let mut names = Vec::with_capacity(files.len());
        for f in files {
            match f.into_os_string().into_string() {
                Ok(name) => names.push(name),
                Err(name) => {
                    return Err(ctx.problem(
                        "connector.path",
                        format!("{} is not a UTF-8 file name", name.display()),
                    ));
                }
            }
        }
        plan.splits = Some(names);
        plan.enumerator = enumerator;
        Ok(plan)
    }
}

/// Settings shared by the subtasks of one file source.
#[derive(Clone)]
pub struct FileSourceConfig {
    /// Source name (origin of dead letters).
    pub name: String,
    /// The file or directory.
    pub path: PathBuf,
    /// The files to read, in order (the source's splits): subtask `i` of `p` reads files `i`,
    /// `i + p`, ….
    pub files: Vec<PathBuf>,
    /// The path as written in the job (positions in dead letters use it, so they do not depend
    /// on where the job runs).
    pub display_path: String,
    /// Record format.
    pub format: FileFormat,
    /// Keep reading as files grow.
    pub follow: bool,
    /// CSV: first line is a header.
    pub header: bool,
    /// CSV: delimiter.
    pub delimiter: u8,
    /// Declared fields.
    pub fields: Vec<(String, FieldType)>,
    /// Event time assignment.
    pub event_time: EventTime,
    /// Largest batch.
    pub batch_size: usize,
    /// Records per second per subtask, unlimited if `None`.
    pub rows_per_second: Option<f64>,
    /// A followed directory: the JobManager lists it for new files and assigns them.
    pub followed_dir: bool,
}

/// How often a followed directory is listed for new files.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Lists a followed directory for the JobManager; a new file goes to a subtask by a hash of
/// its name.
struct FileEnumerator(FileSourceConfig);

impl SplitEnumerator for FileEnumerator {
    fn interval(&self) -> Duration {
        DISCOVERY_INTERVAL
    }

    fn discover(&self) -> Result<Vec<String>> {
        Ok(list_files(&self.0.path)?
            .into_iter()
            .filter_map(|p| p.into_os_string().into_string().ok())
            .collect())
    }

    fn assign(&self, split: &str, parallelism: u32) -> u32 {
        let name = name_of(&self.0, Path::new(split));
        (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) % u64::from(parallelism.max(1))) as u32
    }
}

/// How positions and dead letters name a file of `config`'s source.
fn name_of(config: &FileSourceConfig, path: &Path) -> String {
    if config.path.is_dir() {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{}/{file}", config.display_path.trim_end_matches('/'))
    } else {
        config.display_path.clone()
    }
}

/// The files a path names, in order.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| EngineError::io(format!("file source {}", path.display()), e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| EngineError::io(format!("file source {}", path.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

struct OpenFile {
    path: PathBuf,
    /// How positions name this file.
    name: String,
    reader: BufReader<File>,
    /// Bytes read from the file so far.
    consumed: u64,
    line_no: u64,
    /// The start of a line whose newline has not been read yet (raw bytes: a line is checked
    /// for UTF-8 only once it is whole).
    partial: Vec<u8>,
    /// CSV: position of each declared field in a record.
    columns: Option<Vec<Option<usize>>>,
}

/// One subtask of a file source.
pub struct FileSource {
    config: FileSourceConfig,
    files: Vec<PathBuf>,
    next_file: usize,
    open: Option<OpenFile>,
    decoder: RowDecoder,
    positions: Vec<u64>,
    dead: DeadLetters,
    csv: csv::ReaderBuilder,
    /// Restored positions by file name.
    resume: HashMap<String, FilePosition>,
    /// Rate limit: when reading started and records read since.
    paced: Option<(std::time::Instant, u64)>,
    /// Files read to their end (or found done in the restored positions) that the runtime has
    /// not been told of yet.
    ended: Vec<String>,
    /// A followed directory: the files this subtask reads or was sent.
    known: std::collections::HashSet<PathBuf>,
    /// Files the JobManager assigned that the runtime has not been told of yet.
    announce: Vec<String>,
    /// A followed directory's subtask that starts without a file says so once, so it does not
    /// hold the watermark back.
    reported_empty: bool,
}

/// Where reading of one file stands.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct FilePosition {
    file: String,
    /// Byte offset after the last emitted line.
    offset: u64,
    /// Lines read up to there.
    line: u64,
    /// Read to the end (bounded).
    done: bool,
}

const POSITIONS: &str = "files";

impl FileSource {
    /// The subtask `index` of `parallelism`.
    pub fn new(config: FileSourceConfig, index: u32, parallelism: u32) -> Result<Self> {
        let files = config
            .files
            .iter()
            .cloned()
            .enumerate()
            .filter(|(i, _)| *i as u32 % parallelism == index)
            .map(|(_, f)| f)
            .collect();
        let config_files = config.files.iter().cloned().collect();
        let mut csv = csv::ReaderBuilder::new();
        csv.has_headers(false)
            .delimiter(config.delimiter)
            .flexible(true);
        Ok(FileSource {
            decoder: RowDecoder::new(config.fields.clone()),
            config,
            files,
            next_file: 0,
            open: None,
            positions: Vec::new(),
            dead: DeadLetters::default(),
            csv,
            resume: HashMap::new(),
            paced: None,
            ended: Vec::new(),
            known: config_files,
            announce: Vec::new(),
            reported_empty: false,
        })
    }

    /// How positions and dead letters name a file.
    fn name_of(&self, path: &Path) -> String {
        name_of(&self.config, path)
    }

    fn open_next(&mut self) -> Result<bool> {
        loop {
            let Some(path) = self.files.get(self.next_file).cloned() else {
                return Ok(false);
            };
            self.next_file += 1;
            let name = self.name_of(&path);
            let resume = self.resume.get(&name).cloned();
            if resume.as_ref().is_some_and(|r| r.done) {
                self.ended.push(name);
                continue;
            }
            let f = File::open(&path)
                .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))?;
            self.open = Some(OpenFile {
                path: path.clone(),
                name,
                reader: BufReader::with_capacity(1 << 16, f),
                consumed: 0,
                line_no: 0,
                partial: Vec::new(),
                columns: None,
            });
            if let Some(r) = resume.filter(|r| r.offset > 0) {
                self.seek(&path, &r)?;
            }
            return Ok(true);
        }
    }

    /// Moves the open file to a restored position (a CSV header is read first, for the columns).
    fn seek(&mut self, path: &Path, r: &FilePosition) -> Result<()> {
        let len = std::fs::metadata(path)
            .map_err(|e| EngineError::io(format!("opening {}", path.display()), e))?
            .len();
        if len < r.offset {
            return Err(EngineError::Operator(format!(
                "{}: the file is shorter ({len} bytes) than the restored position ({} bytes); it was changed since the snapshot",
                path.display(),
                r.offset
            )));
        }
        if matches!(self.config.format, FileFormat::Csv) && self.config.header {
            let mut first = Vec::new();
            let open = self.open.as_mut().expect("just opened");
            open.reader
                .read_until(b'\n', &mut first)
                .map_err(|e| EngineError::io(format!("reading {}", path.display()), e))?;
            self.decode_bytes(&first, 1)?;
        }
        let open = self.open.as_mut().expect("just opened");
        open.reader
            .seek(SeekFrom::Start(r.offset))
            .map_err(|e| EngineError::io(format!("seeking in {}", path.display()), e))?;
        open.consumed = r.offset;
        open.line_no = r.line;
        Ok(())
    }

    /// Where reading of each of this subtask's files stands. A file not reached yet keeps the
    /// position it was restored with: a snapshot taken before the first poll after a restore
    /// must not send the source back to the start of its files.
    fn positions_now(&self) -> Vec<FilePosition> {
        let mut positions = Vec::new();
        for (i, path) in self.files.iter().enumerate() {
            let file = self.name_of(path);
            let position = match &self.open {
                Some(o) if o.path == *path => FilePosition {
                    file,
                    // a partial line was not emitted: it is read again after a restore
                    offset: o.consumed - o.partial.len() as u64,
                    line: o.line_no,
                    done: false,
                },
                _ if i < self.next_file => FilePosition {
                    file,
                    offset: 0,
                    line: 0,
                    done: true,
                },
                _ => match self.resume.get(&file) {
                    Some(restored) => restored.clone(),
                    None => continue,
                },
            };
            positions.push(position);
        }
        positions
    }

    fn split_csv(&self, line: &str) -> std::result::Result<Vec<String>, String> {
        let mut r = self.csv.from_reader(line.as_bytes());
        let mut rec = csv::StringRecord::new();
        match r.read_record(&mut rec) {
            Ok(true) => Ok(rec.iter().map(str::to_string).collect()),
            Ok(false) => Ok(Vec::new()),
            Err(e) => Err(format!("malformed CSV: {e}")),
        }
    }

    /// Decodes one whole line as read from the file. A line that is not valid UTF-8 goes to the
    /// dead-letter output with its position (the invalid bytes shown as U+FFFD); a CSV header
    /// that is not fails the source, since no later line could be read right without it.
    fn decode_bytes(&mut self, line: &[u8], line_no: u64) -> Result<()> {
        match std::str::from_utf8(line) {
            Ok(text) => self.decode_line(text, line_no),
            Err(_)
                if matches!(self.config.format, FileFormat::Csv)
                    && self.config.header
                    && self.open.as_ref().is_some_and(|o| o.columns.is_none()) =>
            {
                let path = self
                    .open
                    .as_ref()
                    .map(|o| o.path.display().to_string())
                    .unwrap_or_default();
                Err(EngineError::Operator(format!(
                    "{path}: header: the line is not valid UTF-8"
                )))
            }
            Err(e) => {
                let text = String::from_utf8_lossy(line);
                let text = text.trim_end_matches(['\n', '\r']).to_string();
                self.dead_letter(
                    line_no,
                    format!("not valid UTF-8 (at byte {})", e.valid_up_to() + 1),
                    text,
                );
                Ok(())
            }
        }
    }

    fn dead_letter(&mut self, line_no: u64, reason: String, text: String) {
        let name = self
            .open
            .as_ref()
            .map(|o| o.name.clone())
            .unwrap_or_default();
        self.dead.push(
            &self.config.name,
            Some(format!("{name}:{line_no}")),
            reason,
            Some(text),
            0,
        );
    }

    /// Decodes one complete line.
    fn decode_line(&mut self, line: &str, line_no: u64) -> Result<()> {
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            return Ok(());
        }
        let result = match self.config.format {
            FileFormat::Jsonl => self.decoder.push_json(text),
            FileFormat::Csv => {
                if self.open.as_ref().is_some_and(|o| o.columns.is_none()) {
                    let names: Vec<String> = if self.config.header {
                        match self.split_csv(text) {
                            Ok(h) => h.into_iter().map(|s| s.trim().to_string()).collect(),
                            Err(e) => {
                                let path = self
                                    .open
                                    .as_ref()
                                    .map(|o| o.path.display().to_string())
                                    .unwrap_or_default();
                                return Err(EngineError::Operator(format!("{path}: header: {e}")));
                            }
                        }
                    } else {
                        self.config.fields.iter().map(|(n, _)| n.clone()).collect()
                    };
                    let open = self.open.as_mut().expect("a file is open");
                    open.columns = Some(
                        self.config
                            .fields
                            .iter()
                            .map(|(n, _)| names.iter().position(|h| h == n))
                            .collect(),
                    );
                    if self.config.header {
                        return Ok(());
                    }
                }
                match self.split_csv(text) {
                    Err(e) => Err(e),
                    Ok(cells) => {
                        let cols = self
                            .open
                            .as_ref()
                            .and_then(|o| o.columns.clone())
                            .expect("set above");
                        let picked: Vec<Option<&str>> = cols
                            .iter()
                            .map(|c| c.and_then(|i| cells.get(i).map(String::as_str)))
                            .collect();
                        self.decoder.push_text(&picked)
                    }
                }
            }
        };
        match result {
            Ok(()) => self.positions.push(line_no),
            Err(reason) => self.dead_letter(line_no, reason, text.to_string()),
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut dyn SourceOutput) -> Result<()> {
        if self.decoder.rows() > 0 {
            let rows = self.decoder.rows();
            let cols = self.decoder.finish();
            let (batch, null_time): (RecordBatch, Vec<usize>) =
                self.config.event_time.apply(cols, rows)?;
            let name = self
                .open
                .as_ref()
                .map(|o| o.name.clone())
                .unwrap_or_default();
            for i in null_time {
                self.dead.push(
                    &self.config.name,
                    Some(format!("{name}:{}", self.positions[i])),
                    "event time is null".into(),
                    None,
                    0,
                );
            }
            out.emit_split(&name, batch);
        }
        self.positions.clear();
        if !self.dead.is_empty() {
            out.emit_side(1, self.dead.take_batch());
        }
        for name in self.ended.drain(..) {
            out.split_finished(&name);
        }
        Ok(())
    }
}

impl Source for FileSource {
    /// Every file is a split, named as positions name it (so a restore at another parallelism
    /// finds each file's watermark).
    fn splits(&self) -> Vec<String> {
        self.files.iter().map(|f| self.name_of(f)).collect()
    }

    fn poll(
        &mut self,
        _: &OperatorContext<'_>,
        out: &mut dyn SourceOutput,
    ) -> Result<SourceStatus> {
        if self.config.followed_dir {
            if !std::mem::replace(&mut self.reported_empty, true) && self.files.is_empty() {
                out.split_finished(freshet_engine::splits::WHOLE);
            }
            for name in self.announce.drain(..) {
                out.split_added(&name);
            }
            if self.open.is_none() && !self.open_next()? {
                // a followed directory never ends: wait for a file
                self.flush(out)?;
                return Ok(SourceStatus::Pending(Duration::from_millis(100)));
            }
        }
        if self.open.is_none() && !self.open_next()? {
            return Ok(SourceStatus::Finished);
        }
        let mut limit = self.config.batch_size;
        if let Some(rate) = self.config.rows_per_second {
            let (since, read) = *self.paced.get_or_insert((std::time::Instant::now(), 0));
            let allowed = (since.elapsed().as_secs_f64() * rate) as u64;
            if allowed <= read {
                let wait = ((read + 1) as f64 / rate - since.elapsed().as_secs_f64()).max(0.001);
                return Ok(SourceStatus::Pending(Duration::from_secs_f64(wait)));
            }
            limit = limit.min((allowed - read) as usize);
        }
        let mut line = Vec::new();
        let mut lines = 0;
        while self.decoder.rows() < self.config.batch_size && lines < limit {
            line.clear();
            let open = self.open.as_mut().expect("opened above");
            let n = open
                .reader
                .read_until(b'\n', &mut line)
                .map_err(|e| EngineError::io(format!("reading {}", open.path.display()), e))?;
            open.consumed += n as u64;
            if n == 0 {
                // the end of the file as it is now
                if self.config.follow && self.next_file >= self.files.len() {
                    self.flush(out)?;
                    return Ok(SourceStatus::Pending(Duration::from_millis(100)));
                }
                // bounded: an unterminated last line is still a line
                if !open.partial.is_empty() {
                    let text = std::mem::take(&mut open.partial);
                    open.line_no += 1;
                    let no = open.line_no;
                    self.decode_bytes(&text, no)?;
                }
                if let Some(open) = &self.open {
                    self.ended.push(open.name.clone());
                }
                self.flush(out)?;
                self.open = None;
                return Ok(if self.open_next()? {
                    SourceStatus::Ready
                } else {
                    SourceStatus::Finished
                });
            }
            if line.last() != Some(&b'\n') {
                // incomplete: keep it until the rest arrives or the file ends
                open.partial.extend_from_slice(&line);
                continue;
            }
            let full = if open.partial.is_empty() {
                std::mem::take(&mut line)
            } else {
                let mut p = std::mem::take(&mut open.partial);
                p.extend_from_slice(&line);
                p
            };
            open.line_no += 1;
            let no = open.line_no;
            self.decode_bytes(&full, no)?;
            lines += 1;
            if let Some((_, read)) = self.paced.as_mut() {
                *read += 1;
            }
        }
        self.flush(out)?;
        Ok(SourceStatus::Ready)
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        for (_, _, data) in state.operator_state(POSITIONS) {
            let positions: Vec<FilePosition> = serde_json::from_slice(data)
                .map_err(|e| EngineError::State(format!("file source positions: {e}")))?;
            for p in positions {
                self.resume.insert(p.file.clone(), p);
            }
        }
        Ok(())
    }

    /// Files the JobManager found in the followed directory. A file is complete once a newer
    /// one is there (the next file is opened when the current one has no more lines), as with
    /// rotated logs.
    fn add_splits(&mut self, splits: Vec<String>) -> Result<()> {
        for split in splits {
            let path = PathBuf::from(split);
            if self.known.insert(path.clone()) {
                let name = self.name_of(&path);
                tracing::debug!(file = %name, "new file in the followed directory");
                self.announce.push(name);
                self.files.push(path);
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        let positions = self.positions_now();
        let data = serde_json::to_vec(&positions)
            .map_err(|e| EngineError::State(format!("file source positions: {e}")))?;
        snap.put(POSITIONS, data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path, files: &[(&str, &str)], index: u32, parallelism: u32) -> FileSource {
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let fields = vec![("n".to_string(), FieldType::Int)];
        let decoded = crate::decode::schema_of(&fields);
        let config = FileSourceConfig {
            name: "numbers".into(),
            path: dir.to_path_buf(),
            files: list_files(dir).unwrap(),
            display_path: "numbers".into(),
            format: FileFormat::Jsonl,
            follow: false,
            header: false,
            delimiter: b',',
            fields,
            event_time: EventTime::compile(None, &decoded).unwrap(),
            batch_size: 16,
            rows_per_second: None,
            followed_dir: false,
        };
        FileSource::new(config, index, parallelism).unwrap()
    }

    /// What a source emitted, as text.
    #[derive(Default)]
    struct Events(Vec<String>);

    impl SourceOutput for Events {
        fn emit_split(&mut self, split: &str, batch: RecordBatch) {
            self.0.push(format!("{split}: {} rows", batch.num_rows()));
        }
        fn split_finished(&mut self, split: &str) {
            self.0.push(format!("finished {split}"));
        }
        fn split_added(&mut self, split: &str) {
            self.0.push(format!("added {split}"));
        }
        fn emit_side(&mut self, _: usize, _: RecordBatch) {}
    }

    /// Polls `s` `n` times; returns what it emitted and its last status.
    fn polls(s: &mut FileSource, n: usize) -> (Vec<String>, SourceStatus) {
        let info = freshet_engine::operator::SubtaskInfo {
            job: "t".into(),
            vertex: "numbers".into(),
            index: 0,
            parallelism: 1,
            max_parallelism: 128,
        };
        let metrics = std::sync::Arc::new(freshet_engine::metrics::SubtaskMetrics::default());
        let ctx = OperatorContext {
            subtask: &info,
            record_watermark: freshet_engine::Watermark::MIN,
            current_watermark: freshet_engine::Watermark::MIN,
            metrics: &metrics,
        };
        let mut out = Events::default();
        let mut status = SourceStatus::Ready;
        for _ in 0..n {
            status = s.poll(&ctx, &mut out).unwrap();
        }
        (out.0, status)
    }

    /// A followed directory: a file that appears is found (by the enumerator the JobManager
    /// runs), read by exactly the subtask it is assigned to, and completes the file before it;
    /// a subtask without a file waits instead of finishing.
    #[test]
    fn a_followed_directory_reads_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let follow = |index| {
            let mut s = source(
                dir.path(),
                &[("a.jsonl", "{\"n\":1}\n{\"n\":2}\n")],
                index,
                2,
            );
            s.config.follow = true;
            s.config.followed_dir = true;
            s
        };
        let (mut s0, mut s1) = (follow(0), follow(1));
        let (events, status) = polls(&mut s0, 3);
        assert_eq!(events, ["numbers/a.jsonl: 2 rows"]);
        assert!(matches!(status, SourceStatus::Pending(_)));
        let (events, status) = polls(&mut s1, 2);
        assert_eq!(events, ["finished "], "no file: the implicit split is done");
        assert!(matches!(status, SourceStatus::Pending(_)), "and it waits");

        let enumerator = FileEnumerator(s0.config.clone());
        let planned = enumerator.discover().unwrap();
        for name in ["b.jsonl", "c.jsonl", "d.jsonl"] {
            std::fs::write(dir.path().join(name), "{\"n\":3}\n").unwrap();
        }
        let found = enumerator.discover().unwrap();
        assert_eq!(found.len(), 4, "{found:?}");
        for split in found.into_iter().filter(|s| !planned.contains(s)) {
            let target = match enumerator.assign(&split, 2) {
                0 => &mut s0,
                _ => &mut s1,
            };
            target.add_splits(vec![split.clone()]).unwrap();
            // sent again (a later round, another attempt): still read once
            target.add_splits(vec![split]).unwrap();
        }
        let (e0, _) = polls(&mut s0, 6);
        let (e1, _) = polls(&mut s1, 6);
        for name in ["b", "c", "d"] {
            let added = format!("added numbers/{name}.jsonl");
            let read = format!("numbers/{name}.jsonl: 1 rows");
            let (mine, other) = if e0.contains(&added) {
                (&e0, &e1)
            } else {
                (&e1, &e0)
            };
            assert!(
                mine.contains(&added) && mine.contains(&read),
                "{e0:?} {e1:?}"
            );
            assert!(
                !other.contains(&added) && !other.contains(&read),
                "{e0:?} {e1:?}"
            );
        }
        if e0.iter().any(|e| e.starts_with("added")) {
            assert!(
                e0.contains(&"finished numbers/a.jsonl".to_string()),
                "{e0:?}"
            );
        }
    }

    fn position(file: &str, offset: u64, line: u64, done: bool) -> FilePosition {
        FilePosition {
            file: file.into(),
            offset,
            line,
            done,
        }
    }

    fn summary(p: &[FilePosition]) -> Vec<(String, u64, u64, bool)> {
        p.iter()
            .map(|p| (p.file.clone(), p.offset, p.line, p.done))
            .collect()
    }

    /// A snapshot taken after a restore but before the source read anything keeps the restored
    /// positions (it once recorded none, so a restore from it read every file again).
    #[test]
    fn restored_positions_survive_a_snapshot_before_the_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let text = "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n";
        let mut s = source(dir.path(), &[("a.jsonl", text), ("b.jsonl", text)], 0, 1);
        for p in [
            position("numbers/a.jsonl", 0, 0, true),
            position("numbers/b.jsonl", 8, 1, false),
        ] {
            s.resume.insert(p.file.clone(), p);
        }
        assert_eq!(
            summary(&s.positions_now()),
            vec![
                ("numbers/a.jsonl".into(), 0, 0, true),
                ("numbers/b.jsonl".into(), 8, 1, false)
            ]
        );
        // reaching b (a is skipped as done) continues from its restored position
        assert!(s.open_next().unwrap());
        assert_eq!(
            summary(&s.positions_now()),
            vec![
                ("numbers/a.jsonl".into(), 0, 0, true),
                ("numbers/b.jsonl".into(), 8, 1, false)
            ]
        );
    }

    /// A line that is not UTF-8 is dead-lettered; a CSV header that is not fails the source
    /// (taking the next line as the header would misread every record).
    #[test]
    fn invalid_utf8_is_dead_lettered_but_a_bad_csv_header_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = source(dir.path(), &[("a.jsonl", "{\"n\":1}\n")], 0, 1);
        assert!(s.open_next().unwrap());
        s.decode_bytes(b"{\"n\": \"\xff\xfe\"}\n", 2).unwrap();
        assert!(!s.dead.is_empty(), "the line was not dead-lettered");
        assert_eq!(s.decoder.rows(), 0);

        let dir = tempfile::tempdir().unwrap();
        let mut s = source(dir.path(), &[("b.csv", "n\n1\n")], 0, 1);
        s.config.format = FileFormat::Csv;
        s.config.header = true;
        assert!(s.open_next().unwrap());
        let err = s.decode_bytes(b"\xffn\n", 1).unwrap_err().to_string();
        assert!(err.contains("header") && err.contains("UTF-8"), "{err}");
    }

    /// A subtask records only its own files, also after a restore that holds the positions of
    /// every former subtask (a rescale).
    #[test]
    fn a_subtask_records_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = "{\"n\":1}\n";
        let mut s = source(dir.path(), &[("a.jsonl", text), ("b.jsonl", text)], 1, 2);
        for p in [
            position("numbers/a.jsonl", 8, 1, false),
            position("numbers/b.jsonl", 0, 0, true),
        ] {
            s.resume.insert(p.file.clone(), p);
        }
        assert_eq!(
            summary(&s.positions_now()),
            vec![("numbers/b.jsonl".into(), 0, 0, true)]
        );
    }
}
