//! The job definition types.
//!
//! Sources, transforms and sinks are maps keyed by name, so every field has a stable path
//! (`sources.clicks.connector.path`) for error messages and `--set` overrides. Transforms and
//! sinks name their input by the name of a source or transform; a side output is named
//! `<transform>.<port>`, e.g. `visitors.late` or `clicks.dead_letter`.
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::connector::{SinkConnectorSpec, SourceConnectorSpec};
use crate::{DurationSpec, SignedDurationSpec};

/// The only version of the job format this release reads.
pub const JOB_FORMAT_VERSION: u32 = 1;

/// A streaming job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Version of the job format; must be 1.
    pub version: u32,
    /// Job name: lowercase letters, digits and dashes.
    pub name: String,
    /// Default parallelism of every source, transform and sink.
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
    /// Number of key groups: the upper bound on any keyed operator's parallelism. Changing it
    /// makes existing keyed state unusable, so pick it once (a power of two well above the
    /// largest parallelism you expect).
    #[serde(default = "default_max_parallelism")]
    pub max_parallelism: u32,
    /// Data-plane tuning.
    #[serde(default)]
    pub pipeline: PipelineSpec,
    /// Periodic checkpoints; without this section the job takes none (and a failure loses its
    /// progress). With it, sinks commit output only when a checkpoint completes (exactly once).
    #[serde(default)]
    pub checkpointing: Option<CheckpointingSpec>,
    /// Keyed state (RocksDB) settings.
    #[serde(default)]
    pub state: StateSpec,
    /// What happens when a subtask fails or a TaskManager is lost. Default: with checkpointing,
    /// three restarts one second apart from the latest completed checkpoint; without it, none
    /// (a restart would start from scratch and repeat output).
    #[serde(default)]
    pub restart: Option<RestartSpec>,
    /// Named sources.
    pub sources: IndexMap<String, SourceSpec>,
    /// Named transforms, in any order; the graph is given by their inputs.
    #[serde(default)]
    pub transforms: IndexMap<String, TransformSpec>,
    /// Named sinks.
    pub sinks: IndexMap<String, SinkSpec>,
    /// Where records that cannot be processed go (malformed input, bad fields, unmatched join
    /// rows) when the job does not route a `dead_letter` output itself. Defaults to the JSON
    /// Lines file `dead-letter.jsonl` beside the job file, created on the first such record.
    #[serde(default)]
    pub dead_letter: Option<SinkConnectorSpec>,
}

fn default_parallelism() -> u32 {
    1
}
fn default_max_parallelism() -> u32 {
    128
}

/// Data-plane settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Largest number of records a source puts in one batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Batches buffered per channel between two subtasks before the sender blocks.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
}

impl Default for PipelineSpec {
    fn default() -> Self {
        PipelineSpec {
            batch_size: default_batch_size(),
            channel_capacity: default_channel_capacity(),
        }
    }
}
fn default_batch_size() -> usize {
    4096
}
fn default_channel_capacity() -> usize {
    8
}

/// Checkpoint settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointingSpec {
    /// Time between two checkpoint triggers.
    pub interval: DurationSpec,
    /// A checkpoint not complete after this long is aborted.
    #[serde(default = "default_cp_timeout")]
    pub timeout: DurationSpec,
    /// Least time between the end of one checkpoint and the start of the next.
    #[serde(default)]
    pub min_pause: DurationSpec,
    /// Most checkpoints in progress at once.
    #[serde(default = "default_one")]
    pub max_concurrent: u32,
    /// Completed checkpoints kept; older ones are deleted with the files only they use.
    #[serde(default = "default_retain")]
    pub retain: u32,
    /// Checkpoints that may fail in a row (declined, timed out, or not written); one more fails
    /// the attempt, and the restart strategy starts it again from the latest completed
    /// checkpoint. Savepoints do not count.
    #[serde(default = "default_tolerable_failures")]
    pub tolerable_failures: u32,
    /// Where checkpoints go: a directory (relative to the job file) or `s3://bucket/prefix`.
    /// The job's checkpoints live in `<dir>/<job name>/`.
    #[serde(default = "default_cp_dir")]
    pub dir: String,
    /// Default directory for savepoints (`freshet savepoint` without `--dir`).
    #[serde(default = "default_sp_dir")]
    pub savepoint_dir: String,
    /// S3 connection settings; each overrides the matching `AWS_*` environment variable.
    #[serde(default)]
    pub s3: S3Spec,
}

fn default_cp_timeout() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(600))
}
fn default_one() -> u32 {
    1
}
fn default_retain() -> u32 {
    3
}
fn default_tolerable_failures() -> u32 {
    3
}
fn default_cp_dir() -> String {
    "checkpoints".into()
}
fn default_sp_dir() -> String {
    "savepoints".into()
}

/// Restart strategy. Restarts redeploy the whole job from its latest completed checkpoint.
/// Failures that would repeat (a bad expression, an operator rejecting its configuration) fail
/// the job without restarting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "strategy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RestartSpec {
    /// Fail the job at the first failure.
    None,
    /// Restart after a fixed delay, at most `attempts` times over the job's life.
    FixedDelay {
        /// Most restarts over the job's life.
        attempts: u32,
        /// Wait before each restart.
        #[serde(default = "default_restart_delay")]
        delay: DurationSpec,
    },
    /// Restart after a delay that grows by `multiplier` with each restart, up to `max_delay`.
    /// An attempt that ran `reset_after` before failing starts the count (and the delay) over,
    /// so a long-running job is not failed by a few failures months apart.
    ExponentialBackoff {
        /// Most restarts in a row (without an attempt that ran `reset_after`).
        attempts: u32,
        /// Wait before the first restart.
        #[serde(default = "default_restart_delay")]
        initial_delay: DurationSpec,
        /// Longest wait.
        #[serde(default = "default_max_restart_delay")]
        max_delay: DurationSpec,
        /// Growth of the wait per restart.
        #[serde(default = "default_multiplier")]
        multiplier: f64,
        /// An attempt that ran this long before failing resets the count and the delay.
        #[serde(default = "default_reset_after")]
        reset_after: DurationSpec,
    },
    /// Restart after `delay` unless more than `max_failures` failures happened within the
    /// last `interval`.
    FailureRate {
        /// Most failures within `interval` that are still restarted.
        max_failures: u32,
        /// The window failures are counted in.
        interval: DurationSpec,
        /// Wait before each restart.
        #[serde(default = "default_restart_delay")]
        delay: DurationSpec,
    },
}

/// What a job's restart strategy remembers of its failures.
#[derive(Debug, Clone, Default)]
pub struct RestartHistory {
    /// Restarts counted against the strategy's `attempts` (since the last reset).
    counted: u32,
    /// When the failures within the failure-rate interval happened.
    failures: std::collections::VecDeque<std::time::Instant>,
}

impl RestartSpec {
    /// The strategy a job uses when it names none.
    pub fn default_for(checkpointing: bool) -> RestartSpec {
        if checkpointing {
            RestartSpec::ExponentialBackoff {
                attempts: 10,
                initial_delay: default_restart_delay(),
                max_delay: default_max_restart_delay(),
                multiplier: default_multiplier(),
                reset_after: default_reset_after(),
            }
        } else {
            RestartSpec::None
        }
    }

    /// Records a failure at `now` of an attempt that had run for `ran_for`, and returns the wait
    /// before the restart, or `None` when the strategy allows no more restarts.
    pub fn next_restart(
        &self,
        history: &mut RestartHistory,
        now: std::time::Instant,
        ran_for: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let delay = match self {
            RestartSpec::None => None,
            RestartSpec::FixedDelay { attempts, delay } => {
                (history.counted < *attempts).then_some(delay.0)
            }
            RestartSpec::ExponentialBackoff {
                attempts,
                initial_delay,
                max_delay,
                multiplier,
                reset_after,
            } => {
                if ran_for >= reset_after.0 {
                    history.counted = 0;
                }
                (history.counted < *attempts).then(|| {
                    let d = initial_delay.0.as_secs_f64()
                        * multiplier.max(1.0).powi(history.counted as i32);
                    std::time::Duration::from_secs_f64(d.min(max_delay.0.as_secs_f64()))
                })
            }
            RestartSpec::FailureRate {
                max_failures,
                interval,
                delay,
            } => {
                history.failures.push_back(now);
                while history
                    .failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > interval.0)
                {
                    history.failures.pop_front();
                }
                (history.failures.len() <= *max_failures as usize).then_some(delay.0)
            }
        };
        if delay.is_some() {
            history.counted += 1;
        }
        delay
    }

    /// The restart number `history` has reached, as the strategy counts it (`n of m`).
    pub fn progress(&self, history: &RestartHistory) -> String {
        match self {
            RestartSpec::None => "no restarts".into(),
            RestartSpec::FixedDelay { attempts, .. }
            | RestartSpec::ExponentialBackoff { attempts, .. } => {
                format!("{} of {attempts}", history.counted)
            }
            RestartSpec::FailureRate {
                max_failures,
                interval,
                ..
            } => format!(
                "failure {} of at most {max_failures} within {}",
                history.failures.len(),
                humantime::format_duration(interval.0)
            ),
        }
    }

    /// Why no restart is left, for the job's failure message.
    pub fn exhausted(&self, history: &RestartHistory) -> Option<String> {
        match self {
            RestartSpec::None => None,
            RestartSpec::FixedDelay { .. } | RestartSpec::ExponentialBackoff { .. } => {
                Some(format!(
                    "after {} restart(s), the most the restart strategy allows",
                    history.counted
                ))
            }
            RestartSpec::FailureRate {
                max_failures,
                interval,
                ..
            } => Some(format!(
                "more than {max_failures} failure(s) within {}, the most the restart strategy allows",
                humantime::format_duration(interval.0)
            )),
        }
    }
}

fn default_restart_delay() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(1))
}
fn default_max_restart_delay() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(60))
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_reset_after() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(600))
}

/// S3 connection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Spec {
    /// Endpoint of an S3-compatible server (`http://127.0.0.1:9000`); `AWS_ENDPOINT_URL`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region; `AWS_REGION`.
    #[serde(default)]
    pub region: Option<String>,
    /// Where the access key id is (`env:NAME` or `file:/path`); default `AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id: Option<crate::SecretRef>,
    /// Where the secret access key is (`env:NAME` or `file:/path`); default
    /// `AWS_SECRET_ACCESS_KEY`. The key itself is never written into a job.
    #[serde(default)]
    pub secret_access_key: Option<crate::SecretRef>,
}

/// Keyed-state settings. Every stateful operator subtask has its own RocksDB instance; the
/// instances of a job in one process share one memory budget, `memory_mb` per task slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    /// Working directory of the RocksDB instances (default: the system temporary directory).
    #[serde(default)]
    pub local_dir: Option<String>,
    /// Memory keyed state may use per task slot, MiB: a quarter for RocksDB (block cache, index
    /// and filter partitions and memtables, shared by the slot's instances), three quarters for
    /// the caches of decoded keys in front of it.
    #[serde(default = "default_memory")]
    pub memory_mb: usize,
    /// An optional cap on the keys per state table kept decoded in memory, besides the byte
    /// budget.
    #[serde(default)]
    pub cache_keys: Option<usize>,
    /// Size at which a RocksDB memtable is flushed, MiB; by default 16, or an eighth of
    /// `memory_mb` when that is less (see [`StateSpec::write_buffer_mb`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_buffer_mb: Option<usize>,
}

impl StateSpec {
    /// The memtable size in effect, MiB: the one set, else 16 MiB within the memtables' share
    /// of `memory_mb` (an eighth: half of RocksDB's quarter).
    pub fn write_buffer_mb(&self) -> usize {
        self.write_buffer_mb
            .unwrap_or_else(|| (self.memory_mb / 8).clamp(1, DEFAULT_WRITE_BUFFER_MB))
    }
}

impl Default for StateSpec {
    fn default() -> Self {
        StateSpec {
            local_dir: None,
            memory_mb: default_memory(),
            cache_keys: None,
            write_buffer_mb: None,
        }
    }
}
fn default_memory() -> usize {
    256
}
/// The memtable size when the job sets none and its memory allows, MiB.
const DEFAULT_WRITE_BUFFER_MB: usize = 16;

/// A named source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Where the records come from.
    pub connector: SourceConnectorSpec,
    /// Fields of each record and their types, in order (file sources; the generators have a
    /// fixed or declared schema).
    #[serde(default)]
    pub schema: IndexMap<String, FieldType>,
    /// SQL expression giving each record's event time (a `timestamp` field, or an integer of
    /// epoch milliseconds). Without it, records carry event time 0 and windows are meaningless.
    #[serde(default)]
    pub event_time: Option<String>,
    /// Watermark generation.
    #[serde(default)]
    pub watermark: WatermarkSpec,
    /// Parallelism of this source (defaults to the job's).
    #[serde(default)]
    pub parallelism: Option<u32>,
}

/// The type of a record field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// UTF-8 text.
    String,
    /// 64-bit signed integer.
    Int,
    /// 64-bit float.
    Float,
    /// true / false.
    Bool,
    /// A point in time: RFC 3339 text (`2024-05-01T10:00:00Z`) or epoch milliseconds.
    Timestamp,
    /// Any JSON value, kept as its JSON text and written back as JSON (nested objects, arrays).
    Json,
}

/// How a source derives watermarks from event time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSpec {
    /// How far out of order records may arrive: watermark = max event time seen - this - 1ms.
    #[serde(default)]
    pub max_out_of_orderness: DurationSpec,
    /// A watermark is emitted when it has advanced by at least this much event time.
    #[serde(default = "default_wm_interval")]
    pub interval: DurationSpec,
    /// After this long without records (wall-clock), the source stops holding back watermarks
    /// downstream until it produces again. Unset: never idle.
    #[serde(default)]
    pub idle_timeout: Option<DurationSpec>,
    /// Watermark alignment: this source stops reading while its watermark is more than
    /// `max_drift` ahead of another source of the same group, so that a source catching up
    /// (or simply faster) does not fill the state of joins and windows downstream with rows
    /// waiting for the slower one. Unset: never paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment: Option<AlignmentSpec>,
}

/// A source's watermark alignment group (see [`WatermarkSpec::alignment`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlignmentSpec {
    /// Sources naming the same group are aligned with each other.
    pub group: String,
    /// How far (event time) a source's watermark may run ahead of the slowest other source of
    /// its group before it pauses. The JobManager updates the bounds every 50 ms (from the
    /// heartbeats, every second, of TaskManagers in other processes), so a group whose sources
    /// are all faster than that moves on by at most this much per update: choose a drift well
    /// above the event time a source reads in one update.
    pub max_drift: DurationSpec,
}

impl Default for WatermarkSpec {
    fn default() -> Self {
        WatermarkSpec {
            max_out_of_orderness: DurationSpec::default(),
            interval: default_wm_interval(),
            idle_timeout: None,
            alignment: None,
        }
    }
}
fn default_wm_interval() -> DurationSpec {
    DurationSpec(std::time::Duration::from_millis(200))
}

/// A named transform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TransformSpec {
    /// Keeps the records for which a SQL predicate is true.
    Filter {
        /// Input stream.
        input: String,
        /// SQL predicate.
        #[serde(rename = "where")]
        predicate: String,
        /// Parallelism (defaults to the job's).
        #[serde(default)]
        parallelism: Option<u32>,
    },
    /// Computes new columns: each entry is `expression [AS name]`.
    #[serde(alias = "map")]
    Project {
        /// Input stream.
        input: String,
        /// Output columns, as SQL select items (`price * quantity AS revenue`, `*`).
        select: Vec<String>,
        /// Parallelism.
        #[serde(default)]
        parallelism: Option<u32>,
    },
    /// Repartitions the stream by key (hash into key groups).
    KeyBy {
        /// Input stream.
        input: String,
        /// Key columns.
        key: Vec<String>,
        /// Parallelism.
        #[serde(default)]
        parallelism: Option<u32>,
    },
    /// Spreads batches round-robin over the next operator's subtasks (to even out skew).
    Rebalance {
        /// Input stream.
        input: String,
        /// Parallelism.
        #[serde(default)]
        parallelism: Option<u32>,
    },
    /// Sends every record to every subtask of the next operator.
    Broadcast {
        /// Input stream.
        input: String,
        /// Parallelism.
        #[serde(default)]
        parallelism: Option<u32>,
    },
    /// Event-time windows per key with aggregates.
    Window(WindowTransform),
    /// Drops records whose key was already seen (within a TTL), or keeps the newest per key.
    Deduplicate(DeduplicateTransform),
    /// Event-time interval join of two streams.
    IntervalJoin(IntervalJoinTransform),
    /// Emits a row when N records matching a predicate arrive for a key within a time span.
    Pattern(PatternTransform),
}

/// Window transform settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowTransform {
    /// Input stream.
    pub input: String,
    /// Key columns; empty for one global window (which then runs at parallelism 1).
    #[serde(default)]
    pub key_by: Vec<String>,
    /// Window shape.
    pub window: WindowSpec,
    /// Aggregates as SQL: `count(*) AS n`, `count(DISTINCT user_id) AS visitors`,
    /// `sum(price * quantity) AS revenue`, `min(x)`, `max(x)`, `avg(x)`, `top_n(x, 3)`;
    /// `FILTER (WHERE ...)` restricts an aggregate to some rows.
    pub aggregates: Vec<String>,
    /// How long after a window fired late records still update it (each update is emitted as a
    /// new version of the same row). Later records go to the `late` output.
    #[serde(default)]
    pub allowed_lateness: DurationSpec,
    /// SQL predicate over the output row; rows for which it is false are not emitted.
    #[serde(default)]
    pub having: Option<String>,
    /// Parallelism.
    #[serde(default)]
    pub parallelism: Option<u32>,
}

/// Window shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowSpec {
    /// Fixed, non-overlapping windows aligned to the epoch.
    Tumbling {
        /// Window length.
        size: DurationSpec,
    },
    /// Windows of `size` starting every `slide` (hopping).
    Sliding {
        /// Window length.
        size: DurationSpec,
        /// Distance between window starts.
        slide: DurationSpec,
    },
    /// Per-key windows that close after `gap` without records.
    Session {
        /// Inactivity gap.
        gap: DurationSpec,
    },
}

/// Deduplication settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeduplicateTransform {
    /// Input stream.
    pub input: String,
    /// Key columns that identify duplicates.
    pub key: Vec<String>,
    /// Which record of a key to keep.
    #[serde(default)]
    pub keep: DedupKeep,
    /// With `keep: latest`: SQL expression ordering versions of a key (a sequence number, an
    /// LSN); a record is emitted only if it is newer than every earlier one.
    #[serde(default)]
    pub order_by: Option<String>,
    /// How long (event time, from the key's last record) a key is remembered. Unset: forever.
    #[serde(default)]
    pub ttl: Option<DurationSpec>,
    /// Parallelism.
    #[serde(default)]
    pub parallelism: Option<u32>,
}

/// Which record of a key deduplication keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DedupKeep {
    /// The first record of each key; later ones are dropped.
    #[default]
    First,
    /// The newest record by `order_by`; older or equal ones are dropped.
    Latest,
}

/// Interval join settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IntervalJoinTransform {
    /// Left input stream.
    pub left: String,
    /// Right input stream.
    pub right: String,
    /// Key columns of the left input.
    pub left_key: Vec<String>,
    /// Key columns of the right input (same count and types as `left_key`).
    pub right_key: Vec<String>,
    /// A pair matches when `left.time + lower_bound <= right.time <= left.time + upper_bound`.
    pub lower_bound: SignedDurationSpec,
    /// See `lower_bound`.
    pub upper_bound: SignedDurationSpec,
    /// Extra SQL condition a matching pair must satisfy (columns qualified by input name).
    #[serde(default, rename = "where")]
    pub predicate: Option<String>,
    /// Output columns over the pair, e.g. `orders.order_id`, `payments.amount AS paid`.
    pub select: Vec<String>,
    /// Parallelism.
    #[serde(default)]
    pub parallelism: Option<u32>,
}

/// Pattern settings: "`count` records matching `where` for a key within `within`".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatternTransform {
    /// Input stream.
    pub input: String,
    /// Key columns.
    pub key_by: Vec<String>,
    /// SQL predicate selecting the records that count.
    #[serde(rename = "where")]
    pub predicate: String,
    /// How many matching records make a match.
    pub count: u32,
    /// The span (event time) the matching records must fall within.
    pub within: DurationSpec,
    /// Per-key state is dropped after this long without records (event time). Defaults to `within`.
    #[serde(default)]
    pub ttl: Option<DurationSpec>,
    /// Parallelism.
    #[serde(default)]
    pub parallelism: Option<u32>,
}

/// A named sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// The stream to write: a source or transform name, or `<name>.<side output>`.
    pub input: String,
    /// Where it goes.
    pub connector: SinkConnectorSpec,
    /// Parallelism (defaults to 1 for file, table and stdout sinks, else the job's).
    #[serde(default)]
    pub parallelism: Option<u32>,
}

impl TransformSpec {
    /// The names of the streams this transform reads, with the field each comes from.
    pub fn inputs(&self) -> Vec<(&'static str, &str)> {
        match self {
            TransformSpec::Filter { input, .. }
            | TransformSpec::Project { input, .. }
            | TransformSpec::KeyBy { input, .. }
            | TransformSpec::Rebalance { input, .. }
            | TransformSpec::Broadcast { input, .. } => vec![("input", input)],
            TransformSpec::Window(w) => vec![("input", &w.input)],
            TransformSpec::Deduplicate(d) => vec![("input", &d.input)],
            TransformSpec::Pattern(p) => vec![("input", &p.input)],
            TransformSpec::IntervalJoin(j) => vec![("left", &j.left), ("right", &j.right)],
        }
    }

    /// The explicit parallelism, if any.
    pub fn parallelism(&self) -> Option<u32> {
        match self {
            TransformSpec::Filter { parallelism, .. }
            | TransformSpec::Project { parallelism, .. }
            | TransformSpec::KeyBy { parallelism, .. }
            | TransformSpec::Rebalance { parallelism, .. }
            | TransformSpec::Broadcast { parallelism, .. } => *parallelism,
            TransformSpec::Window(w) => w.parallelism,
            TransformSpec::Deduplicate(d) => d.parallelism,
            TransformSpec::Pattern(p) => p.parallelism,
            TransformSpec::IntervalJoin(j) => j.parallelism,
        }
    }

    /// The transform's type as written in the job file.
    pub fn kind(&self) -> &'static str {
        match self {
            TransformSpec::Filter { .. } => "filter",
            TransformSpec::Project { .. } => "project",
            TransformSpec::KeyBy { .. } => "key_by",
            TransformSpec::Rebalance { .. } => "rebalance",
            TransformSpec::Broadcast { .. } => "broadcast",
            TransformSpec::Window(_) => "window",
            TransformSpec::Deduplicate(_) => "deduplicate",
            TransformSpec::IntervalJoin(_) => "interval_join",
            TransformSpec::Pattern(_) => "pattern",
        }
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn secs(s: u64) -> DurationSpec {
        DurationSpec(Duration::from_secs(s))
    }

    #[test]
    fn fixed_delay_counts_over_the_jobs_life() {
        let spec = RestartSpec::FixedDelay {
            attempts: 2,
            delay: secs(3),
        };
        let mut h = RestartHistory::default();
        let now = Instant::now();
        // however long each attempt ran
        assert_eq!(
            spec.next_restart(&mut h, now, secs(9999).0),
            Some(secs(3).0)
        );
        assert_eq!(
            spec.next_restart(&mut h, now, secs(9999).0),
            Some(secs(3).0)
        );
        assert_eq!(spec.next_restart(&mut h, now, secs(9999).0), None);
        assert_eq!(spec.progress(&h), "2 of 2");
    }

    #[test]
    fn exponential_backoff_grows_and_resets_after_a_stable_attempt() {
        let spec = RestartSpec::ExponentialBackoff {
            attempts: 3,
            initial_delay: secs(1),
            max_delay: secs(3),
            multiplier: 2.0,
            reset_after: secs(60),
        };
        let mut h = RestartHistory::default();
        let now = Instant::now();
        let quick = Duration::from_secs(5);
        assert_eq!(spec.next_restart(&mut h, now, quick), Some(secs(1).0));
        assert_eq!(spec.next_restart(&mut h, now, quick), Some(secs(2).0));
        // capped at max_delay
        assert_eq!(spec.next_restart(&mut h, now, quick), Some(secs(3).0));
        assert_eq!(spec.next_restart(&mut h, now, quick), None);
        // an attempt that ran a minute starts over, delay included
        let mut h = RestartHistory::default();
        for _ in 0..3 {
            spec.next_restart(&mut h, now, quick).unwrap();
        }
        assert_eq!(spec.next_restart(&mut h, now, secs(60).0), Some(secs(1).0));
        assert_eq!(spec.progress(&h), "1 of 3");
    }

    #[test]
    fn failure_rate_counts_failures_within_the_interval() {
        let spec = RestartSpec::FailureRate {
            max_failures: 2,
            interval: secs(60),
            delay: secs(1),
        };
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ran = Duration::ZERO;
        assert!(spec.next_restart(&mut h, at(0), ran).is_some());
        assert!(spec.next_restart(&mut h, at(30), ran).is_some());
        // a third failure within a minute of the first: no more
        assert!(spec.next_restart(&mut h, at(50), ran).is_none());
        let mut h = RestartHistory::default();
        assert!(spec.next_restart(&mut h, at(0), ran).is_some());
        assert!(spec.next_restart(&mut h, at(30), ran).is_some());
        // the first has left the window by now
        assert!(spec.next_restart(&mut h, at(61), ran).is_some());
        assert!(spec.next_restart(&mut h, at(200), ran).is_some());
        assert!(
            spec.exhausted(&h)
                .unwrap()
                .contains("more than 2 failure(s) within 1m")
        );
    }

    #[test]
    fn none_never_restarts() {
        let mut h = RestartHistory::default();
        assert_eq!(
            RestartSpec::None.next_restart(&mut h, Instant::now(), Duration::ZERO),
            None
        );
        assert!(RestartSpec::None.exhausted(&h).is_none());
    }
}
