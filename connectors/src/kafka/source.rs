//! The Kafka source: partitions of topics (listed or matched by a pattern) as splits.
//!
//! Planning asks the brokers for the partitions, so a wrong address or a missing topic is a
//! problem of the job, not a crash loop. Subtask `i` reads the partitions [`super::owner`] gives
//! it. Unbounded, the source's enumerator (run by the JobManager) looks for new partitions (and,
//! with a pattern, new topics) every `partition_discovery` and sends each to the subtask the same
//! rule names; a partition found while running starts at its beginning. Every partition is a
//! split with its own watermark.
//!
//! Read positions live in checkpoints: a snapshot records, per partition, the offset after the
//! last emitted record (and, bounded, where to stop), and a restored source resumes exactly
//! there, at any parallelism. When a checkpoint completes, its positions are also committed to
//! the consumer group, so the usual lag tools see the job; the group's offsets are never read
//! back except by `start: group_offsets` on a fresh start.
//!
//! A record whose value does not decode goes to the dead-letter output with its topic,
//! partition and offset (`orders/3@1042`); the job goes on.
use arrow::record_batch::RecordBatch;
use indexmap::IndexMap;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

use freshet_engine::checkpoint::{CheckpointId, SnapshotContext, StateContext};
use freshet_engine::operator::{OperatorContext, Source, SourceOutput, SourceStatus, SubtaskInfo};
use freshet_engine::{EngineError, Result};
use freshet_job::{DurationSpec, FieldType, Problems};
use freshet_operators::dead_letter::DeadLetters;

use super::{REQUEST_TIMEOUT, client_config, error, owner, parse_split, split_name};
use crate::avro::{AvroDecoder, DecodeError};
use crate::decode::{RowDecoder, parse_timestamp};
use crate::event_time::EventTime;
use crate::registry::{SourceConnector, SourceContext};
use crate::schema_registry::{RegistrySettings, SchemaRegistry};
use crate::{SourcePlan, SplitEnumerator};

/// How a record's value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// A JSON object whose fields are the schema's (the same rules as JSON Lines files).
    Json,
    /// The value as UTF-8 text, into the schema's one string field that is not metadata.
    String,
    /// Avro in the Confluent wire format, its writer schema from `schema_registry`; the
    /// record's fields are matched to the schema's by name (the JSON rules).
    Avro,
}

/// Where reading starts when there is no checkpoint to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The oldest record each partition still has.
    #[default]
    Earliest,
    /// Only records written after the job started.
    Latest,
    /// The consumer group's committed offsets; partitions without one start at the earliest.
    GroupOffsets,
    /// The first record at or after `start_timestamp` in each partition.
    Timestamp,
}

/// Isolation of the records read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Only records of committed transactions (and non-transactional ones).
    #[default]
    ReadCommitted,
    /// Also records of open and aborted transactions.
    ReadUncommitted,
}

/// A property of the Kafka record, as a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Metadata {
    /// The record key as UTF-8 text (a `string` column; null without a key).
    Key,
    /// The topic (`string`).
    Topic,
    /// The partition (`int`).
    Partition,
    /// The offset (`int`).
    Offset,
    /// The record's Kafka timestamp (`timestamp`): event time can be taken from it.
    Timestamp,
    /// The headers as a JSON object of UTF-8 text values (`json`).
    Headers,
}

impl Metadata {
    fn field_type(self) -> FieldType {
        match self {
            Metadata::Key | Metadata::Topic => FieldType::String,
            Metadata::Partition | Metadata::Offset => FieldType::Int,
            Metadata::Timestamp => FieldType::Timestamp,
            Metadata::Headers => FieldType::Json,
        }
    }
}

fn default_discovery() -> DurationSpec {
    DurationSpec(Duration::from_secs(30))
}

/// Records of Kafka topics.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceSettings {
    /// Brokers to connect to first, `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// Topics to read.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regular expression: every topic whose whole name matches is read, also topics created
    /// while the job runs.
    #[serde(default)]
    pub topic_pattern: Option<String>,
    /// How values are read.
    pub format: ValueFormat,
    /// With `format: avro`: the schema registry holding the writers' schemas.
    #[serde(default)]
    pub schema_registry: Option<RegistrySettings>,
    /// Where a fresh start begins (a restore resumes where the checkpoint was).
    #[serde(default)]
    pub start: StartFrom,
    /// With `start: timestamp`: RFC 3339 time or epoch milliseconds.
    #[serde(default)]
    pub start_timestamp: Option<Value>,
    /// Stop at the offsets the partitions had when the job started (a backfill), instead of
    /// reading on.
    #[serde(default)]
    pub bounded: bool,
    /// The consumer group the job's positions are committed to (for lag tools, and for
    /// `start: group_offsets`); `freshet-<job>-<source>` if unset.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Which records are visible.
    #[serde(default)]
    pub isolation_level: Isolation,
    /// Schema columns filled from the record instead of its value, e.g. `{ts: timestamp}`.
    #[serde(default)]
    pub metadata: IndexMap<String, Metadata>,
    /// How often the JobManager looks for new partitions and topics.
    #[serde(default = "default_discovery")]
    pub partition_discovery: DurationSpec,
    /// Further librdkafka client properties (`security.protocol`, `sasl.mechanism`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// The `kafka` source connector.
pub struct KafkaSourceConnector;

impl SourceConnector for KafkaSourceConnector {
    type Config = KafkaSourceSettings;

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn plan(
        &self,
        ctx: &SourceContext<'_>,
        c: KafkaSourceSettings,
    ) -> std::result::Result<SourcePlan, Problems> {
        let fields = ctx.fields("Kafka", "{store: string, amount: float}")?;
        let mut metadata = Vec::new();
        for (column, m) in &c.metadata {
            let Some(i) = fields.iter().position(|(n, _)| n == column) else {
                return Err(ctx.problem(
                    &format!("connector.metadata.{column}"),
                    format!("'{column}' is not a field of the schema"),
                ));
            };
            if fields[i].1 != m.field_type() {
                return Err(ctx.problem(
                    &format!("connector.metadata.{column}"),
                    format!(
                        "the record's {} is {}, so '{column}' must be declared {}, not {}",
                        format!("{m:?}").to_lowercase(),
                        type_name(m.field_type()),
                        type_name(m.field_type()),
                        type_name(fields[i].1)
                    ),
                ));
            }
            metadata.push((column.clone(), *m));
        }
        let value_fields: Vec<&(String, FieldType)> = fields
            .iter()
            .filter(|(n, _)| !c.metadata.contains_key(n))
            .collect();
        if c.format == ValueFormat::String
            && !matches!(value_fields.as_slice(), [(_, FieldType::String)])
        {
            return Err(ctx.problem(
                "connector.format",
                "format: string reads the value into one string field; the schema must have \
                 exactly one field besides the metadata columns, of type string",
            ));
        }
        let avro = match (c.format, &c.schema_registry) {
            (ValueFormat::Avro, Some(r)) => {
                let registry = Arc::new(SchemaRegistry::new(r));
                if ctx.splits.is_none() {
                    // a first planning: say now when the registry cannot be reached
                    registry
                        .check()
                        .map_err(|e| ctx.problem("connector.schema_registry.url", e.to_string()))?;
                }
                Some(registry)
            }
            (ValueFormat::Avro, None) => {
                return Err(ctx.problem(
                    "connector.schema_registry",
                    "format: avro reads the writers' schemas from a schema registry: give its url",
                ));
            }
            (_, Some(_)) => {
                return Err(ctx.problem("connector.schema_registry", "only used with format: avro"));
            }
            (_, None) => None,
        };
        let start_ms = match (c.start, &c.start_timestamp) {
            (StartFrom::Timestamp, Some(Value::Number(n))) => n.as_i64(),
            (StartFrom::Timestamp, Some(Value::String(s))) => parse_timestamp(s),
            (StartFrom::Timestamp, _) => None,
            (_, None) => Some(0),
            (_, Some(_)) => {
                return Err(ctx.problem(
                    "connector.start_timestamp",
                    "only used with start: timestamp",
                ));
            }
        };
        let Some(start_ms) = start_ms else {
            return Err(ctx.problem(
                "connector.start_timestamp",
                "start: timestamp needs an RFC 3339 time or epoch milliseconds here",
            ));
        };
        let pattern = match &c.topic_pattern {
            Some(p) => Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                ctx.problem(
                    "connector.topic_pattern",
                    format!("not a regular expression: {e}"),
                )
            })?),
            None => None,
        };
        if c.topics.is_empty() == pattern.is_none() {
            return Err(ctx.problem(
                "connector",
                "name the topics to read with either `topics` or `topic_pattern`",
            ));
        }
        let decoded = crate::decode::schema_of(&fields);
        let event_time = EventTime::compile(ctx.spec.event_time.as_deref(), &decoded)
            .map_err(|e| ctx.problem("event_time", e.message))?;
        let splits = match ctx.splits {
            Some(s) => s.to_vec(),
            None => {
                let found = Discovery {
                    bootstrap: c.bootstrap_servers.clone(),
                    topics: c.topics.clone(),
                    pattern: pattern.clone(),
                }
                .partitions(&client_config(&c.bootstrap_servers, &c.properties));
                match found {
                    Ok(p) => p,
                    Err(e) => {
                        let field = if matches!(e, Found::Missing(_)) {
                            "connector.topics"
                        } else {
                            "connector.bootstrap_servers"
                        };
                        return Err(ctx.problem(field, e.to_string()));
                    }
                }
            }
        };
        let config = Arc::new(KafkaSourceConfig {
            name: ctx.name.to_string(),
            settings: c.clone(),
            fields,
            metadata,
            event_time: event_time.clone(),
            batch_size: ctx.batch_size,
            start_ms,
            splits: splits.clone(),
            avro: avro.map(AvroDecoder::new),
        });
        let mut plan = SourcePlan::new(
            ctx,
            event_time.output_schema(),
            c.bounded,
            Arc::new(move |info: &SubtaskInfo| {
                Ok(Box::new(KafkaSource::new(config.clone(), info)) as Box<dyn Source>)
            }),
        );
        plan.splits = Some(splits);
        if !c.bounded {
            plan.enumerator = Some(Arc::new(KafkaEnumerator {
                discovery: Discovery {
                    bootstrap: c.bootstrap_servers.clone(),
                    topics: c.topics.clone(),
                    pattern,
                },
                client: client_config(&c.bootstrap_servers, &c.properties),
                interval: c.partition_discovery.0,
            }));
        }
        Ok(plan)
    }
}

/// Finds partitions (and, with a pattern, topics) created while the job runs, for the
/// JobManager; a partition goes to the subtask [`owner`] names.
struct KafkaEnumerator {
    discovery: Discovery,
    client: rdkafka::ClientConfig,
    interval: Duration,
}

impl SplitEnumerator for KafkaEnumerator {
    fn interval(&self) -> Duration {
        self.interval
    }

    fn discover(&self) -> Result<Vec<String>> {
        self.discovery
            .partitions(&self.client)
            .map_err(|e| EngineError::External {
                message: e.to_string(),
                retryable: true,
            })
    }

    fn assign(&self, split: &str, parallelism: u32) -> u32 {
        parse_split(split).map_or(0, |(topic, partition)| owner(topic, partition, parallelism))
    }
}

fn type_name(t: FieldType) -> String {
    format!("{t:?}").to_lowercase()
}

/// What asking the brokers for partitions found wrong.
#[derive(Debug)]
enum Found {
    /// The brokers did not answer.
    Unreachable(String),
    /// A listed topic does not exist (or a pattern matches none).
    Missing(String),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Unreachable(m) | Found::Missing(m) => f.write_str(m),
        }
    }
}

/// Finds the partitions of the topics a source reads.
struct Discovery {
    bootstrap: String,
    topics: Vec<String>,
    pattern: Option<regex::Regex>,
}

impl Discovery {
    /// Split names of every partition, sorted.
    fn partitions(
        &self,
        config: &rdkafka::ClientConfig,
    ) -> std::result::Result<Vec<String>, Found> {
        let consumer: BaseConsumer = config
            .create()
            .map_err(|e| Found::Unreachable(format!("Kafka client for {}: {e}", self.bootstrap)))?;
        self.partitions_with(&consumer)
    }

    fn partitions_with<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
    ) -> std::result::Result<Vec<String>, Found> {
        let metadata = consumer
            .fetch_metadata(None, REQUEST_TIMEOUT)
            .map_err(|e| {
                Found::Unreachable(format!(
                    "cannot reach Kafka at {} (within {}s): {e}",
                    self.bootstrap,
                    REQUEST_TIMEOUT.as_secs()
                ))
            })?;
        let mut splits = Vec::new();
        let mut seen = BTreeSet::new();
        for t in metadata.topics() {
            let wanted = self.topics.iter().any(|n| n == t.name())
                || self.pattern.as_ref().is_some_and(|p| p.is_match(t.name()));
            if !wanted || t.error().is_some() || t.name().starts_with("__") {
                continue;
            }
            seen.insert(t.name().to_string());
            splits.extend(t.partitions().iter().map(|p| split_name(t.name(), p.id())));
        }
        if let Some(missing) = self.topics.iter().find(|t| !seen.contains(*t)) {
            return Err(Found::Missing(format!(
                "topic '{missing}' does not exist on the Kafka cluster at {}",
                self.bootstrap
            )));
        }
        if let (Some(p), true) = (&self.pattern, seen.is_empty()) {
            return Err(Found::Missing(format!(
                "no topic on the Kafka cluster at {} matches '{}'",
                self.bootstrap,
                p.as_str()
            )));
        }
        splits.sort();
        Ok(splits)
    }
}

/// The consumer's context: receives the client's statistics, with each partition's end offsets
/// (high watermark and last stable offset), for the lag metric.
#[derive(Default)]
pub struct Ends {
    offsets: parking_lot::Mutex<BTreeMap<(String, i32), (i64, i64)>>,
}

impl ClientContext for Ends {
    fn stats(&self, statistics: Statistics) {
        let mut o = self.offsets.lock();
        for (name, topic) in statistics.topics {
            for (p, part) in topic.partitions {
                // partition -1 is the client's internal "unassigned" entry
                if p >= 0 && part.hi_offset >= 0 {
                    o.insert((name.clone(), p), (part.hi_offset, part.ls_offset));
                }
            }
        }
    }
}

impl ConsumerContext for Ends {}

type KafkaConsumer = BaseConsumer<Ends>;

/// How often the client reports statistics (the lag metric's resolution).
const STATISTICS_INTERVAL_MS: &str = "5000";

/// Settings shared by the subtasks of one Kafka source.
pub struct KafkaSourceConfig {
    name: String,
    settings: KafkaSourceSettings,
    /// Every schema field: value fields and metadata columns.
    fields: Vec<(String, FieldType)>,
    metadata: Vec<(String, Metadata)>,
    event_time: EventTime,
    batch_size: usize,
    start_ms: i64,
    /// The partitions found when the job was planned.
    splits: Vec<String>,
    /// With `format: avro`: the decoder and its registry client (shared by the subtasks, so a
    /// schema is fetched once per process).
    avro: Option<AvroDecoder>,
}

/// Where a partition is read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Position {
    split: String,
    /// The offset of the next record to read.
    next: i64,
    /// Bounded: the offset to stop at.
    stop: Option<i64>,
}

/// The first wait after the registry could not give a record's schema.
const STALL_BACKOFF: Duration = Duration::from_secs(1);

/// Operator state of the source: every partition's [`Position`].
const OFFSETS: &str = "kafka-offsets";

struct Partition {
    topic: String,
    partition: i32,
    /// `None` until the start offset is resolved (on open, or when found while running).
    next: Option<i64>,
    stop: Option<i64>,
    finished: bool,
    /// Whether the consumer is assigned the partition.
    assigned: bool,
    decoder: RowDecoder,
    /// Offsets of the rows in `decoder`, for dead letters.
    offsets: Vec<i64>,
}

/// (topic, partition, next offset) of the partitions a snapshot saw.
type Offsets = Vec<(String, i32, i64)>;

/// One subtask of a Kafka source.
pub struct KafkaSource {
    config: Arc<KafkaSourceConfig>,
    index: u32,
    parallelism: u32,
    group: String,
    client_id: String,
    consumer: Option<KafkaConsumer>,
    partitions: BTreeMap<String, Partition>,
    /// Splits read to their stop offset but not yet reported.
    ended: Vec<String>,
    /// Splits not yet reported to the runtime: restored ones the plan did not list, and those
    /// the JobManager assigned while running.
    announce: Vec<String>,
    dead: DeadLetters,
    /// Positions of taken snapshots, for the group commit when they complete.
    snapshots: Vec<(CheckpointId, Offsets)>,
    /// When the lag metric was last updated.
    lag_reported: Instant,
    /// A subtask that reads nothing says so once, so it does not hold the watermark back.
    reported_empty: bool,
    /// A record whose schema the registry could not give: (partition, its offset, why). The
    /// partition is sought back to it and reading waits until `stalled_until`.
    stalled: Option<(String, i64, crate::schema_registry::RegistryError)>,
    stalled_until: Option<Instant>,
    /// The next wait after a stall: doubles up to 30 s while the registry stays away.
    stall_backoff: Duration,
}

impl KafkaSource {
    fn new(config: Arc<KafkaSourceConfig>, info: &SubtaskInfo) -> Self {
        let group = config
            .settings
            .group_id
            .clone()
            .unwrap_or_else(|| format!("freshet-{}-{}", info.job, config.name));
        let mut s = KafkaSource {
            client_id: format!("freshet-{}-{}-{}", info.job, config.name, info.index),
            index: info.index,
            parallelism: info.parallelism,
            group,
            consumer: None,
            partitions: BTreeMap::new(),
            ended: Vec::new(),
            announce: Vec::new(),
            dead: DeadLetters::default(),
            snapshots: Vec::new(),
            lag_reported: Instant::now(),
            reported_empty: false,
            stalled: None,
            stalled_until: None,
            stall_backoff: STALL_BACKOFF,
            config,
        };
        for split in s.config.splits.clone() {
            s.take(&split);
        }
        s
    }

    /// Adds `split` if this subtask reads it; returns whether it was new.
    fn take(&mut self, split: &str) -> bool {
        parse_split(split).is_some_and(|(topic, partition)| {
            owner(topic, partition, self.parallelism) == self.index
        }) && self.insert(split)
    }

    /// Adds a partition to read (its position still unresolved); false if it is read already.
    fn insert(&mut self, split: &str) -> bool {
        let Some((topic, partition)) = parse_split(split) else {
            return false;
        };
        if self.partitions.contains_key(split) {
            return false;
        }
        self.partitions.insert(
            split.to_string(),
            Partition {
                topic: topic.to_string(),
                partition,
                next: None,
                stop: None,
                finished: false,
                assigned: false,
                decoder: RowDecoder::new(self.config.fields.clone()),
                offsets: Vec::new(),
            },
        );
        true
    }

    fn bootstrap(&self) -> &str {
        &self.config.settings.bootstrap_servers
    }

    fn connect(&self) -> Result<KafkaConsumer> {
        let s = &self.config.settings;
        let mut c = client_config(&s.bootstrap_servers, &s.properties);
        c.set("group.id", &self.group)
            .set("client.id", &self.client_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "isolation.level",
                match s.isolation_level {
                    Isolation::ReadCommitted => "read_committed",
                    Isolation::ReadUncommitted => "read_uncommitted",
                },
            )
            // a position that no longer exists (retention deleted it) restarts at the oldest
            // record still there rather than skipping to the end
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        for (k, v) in &s.properties {
            c.set(k, v);
        }
        c.create_with_context(Ends::default())
            .map_err(|e| error("creating a consumer", self.bootstrap(), &e))
    }

    /// Resolves the start (and, bounded, stop) offsets of the partitions that have none, from
    /// the start mode; partitions found while running start at their beginning.
    fn resolve(&mut self, consumer: &KafkaConsumer, found_later: bool) -> Result<()> {
        let bootstrap = self.config.settings.bootstrap_servers.clone();
        let todo: Vec<String> = self
            .partitions
            .iter()
            .filter(|(_, p)| p.next.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let start = if found_later {
            StartFrom::Earliest
        } else {
            self.config.settings.start
        };
        let mut committed = BTreeMap::new();
        let mut by_time = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for k in &todo {
            let p = &self.partitions[k];
            let at = if start == StartFrom::Timestamp {
                Offset::Offset(self.config.start_ms)
            } else {
                Offset::Invalid
            };
            tpl.add_partition_offset(&p.topic, p.partition, at)
                .map_err(|e| error("listing partitions", &bootstrap, &e))?;
        }
        match start {
            StartFrom::GroupOffsets => {
                let got = consumer
                    .committed_offsets(tpl, REQUEST_TIMEOUT)
                    .map_err(|e| error("reading the group's offsets", &bootstrap, &e))?;
                for e in got.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        committed.insert(split_name(e.topic(), e.partition()), o);
                    }
                }
            }
            StartFrom::Timestamp => {
                let got = consumer
                    .offsets_for_times(tpl, REQUEST_TIMEOUT)
                    .map_err(|e| error("looking up offsets by time", &bootstrap, &e))?;
                for e in got.elements() {
                    by_time.insert(split_name(e.topic(), e.partition()), e.offset());
                }
            }
            StartFrom::Earliest | StartFrom::Latest => {}
        }
        for k in todo {
            let p = self.partitions.get_mut(&k).expect("listed above");
            let (low, high) = consumer
                .fetch_watermarks(&p.topic, p.partition, REQUEST_TIMEOUT)
                .map_err(|e| error(&format!("reading the offsets of {k}"), &bootstrap, &e))?;
            let next = match start {
                StartFrom::Earliest => low,
                StartFrom::Latest => high,
                StartFrom::GroupOffsets => committed.get(&k).copied().unwrap_or(low),
                StartFrom::Timestamp => match by_time.get(&k) {
                    Some(Offset::Offset(o)) => *o,
                    // no record at or after the time
                    _ => high,
                },
            };
            p.next = Some(next.max(low));
            if self.config.settings.bounded && p.stop.is_none() {
                p.stop = Some(high);
            }
            debug!(split = %k, next = ?p.next, stop = ?p.stop, "partition start resolved");
        }
        Ok(())
    }

    /// Assigns `splits` to the consumer at their positions (bounded: those not at their stop).
    fn assign(&mut self, consumer: &KafkaConsumer, splits: &[String]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for k in splits {
            let Some(p) = self.partitions.get_mut(k) else {
                continue;
            };
            if p.finished || p.assigned || p.stop.is_some_and(|s| p.next.unwrap_or(0) >= s) {
                continue;
            }
            p.assigned = true;
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next.unwrap_or(0)))
                .map_err(|e| {
                    error(
                        "assigning partitions",
                        &self.config.settings.bootstrap_servers,
                        &e,
                    )
                })?;
        }
        consumer
            .incremental_assign(&tpl)
            .map_err(|e| error("assigning partitions", self.bootstrap(), &e))
    }

    /// Decodes one record into its partition's rows (or a dead letter). Returns false for a
    /// record at or past its partition's stop offset (bounded), which is left out. A record
    /// whose schema the registry cannot give now is not dropped: its position stays at it and
    /// the source stalls (see [`KafkaSource::stall`]).
    fn decode(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Result<bool> {
        let split = split_name(m.topic(), m.partition());
        let Some(p) = self.partitions.get_mut(&split) else {
            return Ok(true);
        };
        if p.stop.is_some_and(|stop| m.offset() >= stop) {
            return Ok(false);
        }
        p.next = Some(m.offset() + 1);
        let position = || format!("{split}@{}", m.offset());
        let payload = m.payload().unwrap_or_default();
        let mut obj = match self.config.settings.format {
            ValueFormat::Avro => {
                let decoder = self.config.avro.as_ref().expect("planned with a registry");
                match decoder.decode(payload) {
                    Ok(o) => o,
                    Err(DecodeError::Registry(e)) => {
                        p.next = Some(m.offset());
                        self.stalled = Some((split, m.offset(), e));
                        return Ok(true);
                    }
                    Err(DecodeError::Bad(reason)) => {
                        self.dead.push(
                            &self.config.name,
                            Some(position()),
                            reason,
                            Some(String::from_utf8_lossy(payload).into_owned()),
                            0,
                        );
                        return Ok(true);
                    }
                }
            }
            ValueFormat::Json => match serde_json::from_slice::<Value>(payload) {
                Ok(Value::Object(o)) => o,
                Ok(_) => {
                    self.dead.push(
                        &self.config.name,
                        Some(position()),
                        "a JSON object was expected".into(),
                        Some(String::from_utf8_lossy(payload).into_owned()),
                        0,
                    );
                    return Ok(true);
                }
                Err(e) => {
                    let reason = if m.payload().is_none() {
                        "the record has no value".to_string()
                    } else {
                        format!("malformed JSON: {e}")
                    };
                    self.dead.push(
                        &self.config.name,
                        Some(position()),
                        reason,
                        Some(String::from_utf8_lossy(payload).into_owned()),
                        0,
                    );
                    return Ok(true);
                }
            },
            ValueFormat::String => match std::str::from_utf8(payload) {
                Ok(text) => {
                    let mut o = Map::new();
                    let value_field = self
                        .config
                        .fields
                        .iter()
                        .find(|(n, _)| !self.config.metadata.iter().any(|(c, _)| c == n));
                    if let Some((n, _)) = value_field {
                        o.insert(n.clone(), Value::String(text.to_string()));
                    }
                    o
                }
                Err(e) => {
                    self.dead.push(
                        &self.config.name,
                        Some(position()),
                        format!("the value is not UTF-8 text: {e}"),
                        Some(String::from_utf8_lossy(payload).into_owned()),
                        0,
                    );
                    return Ok(true);
                }
            },
        };
        for (column, meta) in &self.config.metadata {
            let v = match meta {
                Metadata::Key => m
                    .key()
                    .map_or(Value::Null, |k| String::from_utf8_lossy(k).into()),
                Metadata::Topic => m.topic().into(),
                Metadata::Partition => m.partition().into(),
                Metadata::Offset => m.offset().into(),
                Metadata::Timestamp => m.timestamp().to_millis().map_or(Value::Null, Into::into),
                Metadata::Headers => {
                    let mut h = Map::new();
                    if let Some(headers) = m.headers() {
                        for x in headers.iter() {
                            let v = x
                                .value
                                .map_or(Value::Null, |v| String::from_utf8_lossy(v).into());
                            h.insert(x.key.to_string(), v);
                        }
                    }
                    Value::Object(h)
                }
            };
            obj.insert(column.clone(), v);
        }
        match p.decoder.push_object(&obj) {
            Ok(()) => p.offsets.push(m.offset()),
            Err(reason) => self.dead.push(
                &self.config.name,
                Some(position()),
                reason,
                Some(String::from_utf8_lossy(payload).into_owned()),
                0,
            ),
        }
        Ok(true)
    }

    /// After a record whose schema the registry could not give: seeks its partition back to it
    /// (records of the partition fetched after it are dropped by the client and fetched again)
    /// and waits before reading on, longer each time the registry is still away. Checkpoints
    /// go on meanwhile and record the partition at that record.
    fn stall(&mut self) -> Result<()> {
        let Some((split, offset, e)) = self.stalled.take() else {
            return Ok(());
        };
        let (topic, partition) = parse_split(&split).expect("a partition's split name");
        if let Some(c) = &self.consumer {
            c.seek(topic, partition, Offset::Offset(offset), REQUEST_TIMEOUT)
                .map_err(|k| {
                    error(
                        &format!("seeking {split} back to {offset}"),
                        self.bootstrap(),
                        &k,
                    )
                })?;
        }
        warn!(
            source = %self.config.name,
            "{e}; {split} waits at offset {offset} for {:?}",
            self.stall_backoff
        );
        self.stalled_until = Some(Instant::now() + self.stall_backoff);
        self.stall_backoff = (self.stall_backoff * 2).min(Duration::from_secs(30));
        Ok(())
    }

    /// Emits what was decoded, partition by partition.
    fn flush(&mut self, out: &mut dyn SourceOutput) -> Result<()> {
        for (split, p) in self.partitions.iter_mut() {
            let rows = p.decoder.rows();
            if rows == 0 {
                continue;
            }
            let cols = p.decoder.finish();
            let (batch, null_time): (RecordBatch, Vec<usize>) =
                self.config.event_time.apply(cols, rows)?;
            for i in null_time {
                self.dead.push(
                    &self.config.name,
                    Some(format!("{split}@{}", p.offsets[i])),
                    "event time is null".into(),
                    None,
                    0,
                );
            }
            p.offsets.clear();
            out.emit_split(split, batch);
        }
        if !self.dead.is_empty() {
            out.emit_side(1, self.dead.take_batch());
        }
        for s in self.ended.drain(..) {
            out.split_finished(&s);
        }
        Ok(())
    }

    /// Publishes each partition's lag (records between the position and the end the client
    /// last reported: the last stable offset when reading committed records, else the high
    /// watermark).
    fn report_lag(&mut self, ctx: &OperatorContext<'_>) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        if self.lag_reported.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.lag_reported = Instant::now();
        let ends = consumer.context().offsets.lock();
        let committed = self.config.settings.isolation_level == Isolation::ReadCommitted;
        for (split, p) in &self.partitions {
            let lag = if p.finished {
                None
            } else {
                ends.get(&(p.topic.clone(), p.partition))
                    .zip(p.next)
                    .map(|((hi, ls), next)| {
                        let end = if committed && *ls >= 0 { *ls } else { *hi };
                        end - next
                    })
            };
            ctx.metrics.set_split_lag(split, lag);
        }
    }

    /// Bounded: partitions whose position reached their stop offset are done. Returns whether
    /// every partition is.
    fn check_ends(&mut self) -> Result<bool> {
        let Some(consumer) = &self.consumer else {
            return Ok(false);
        };
        let positions = consumer
            .position()
            .map_err(|e| error("reading positions", self.bootstrap(), &e))?;
        let mut done = TopicPartitionList::new();
        for (split, p) in self.partitions.iter_mut() {
            let Some(stop) = p.stop else { continue };
            if p.finished {
                continue;
            }
            let at = positions
                .find_partition(&p.topic, p.partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let reached = p.next.unwrap_or(0).max(at.unwrap_or(0)) >= stop;
            if reached {
                p.finished = true;
                self.ended.push(split.clone());
                if std::mem::take(&mut p.assigned) {
                    done.add_partition(&p.topic, p.partition);
                }
            }
        }
        if done.count() > 0 {
            consumer
                .incremental_unassign(&done)
                .map_err(|e| error("unassigning partitions", self.bootstrap(), &e))?;
        }
        Ok(self.config.settings.bounded && self.partitions.values().all(|p| p.finished))
    }
}

impl Source for KafkaSource {
    fn splits(&self) -> Vec<String> {
        self.partitions.keys().cloned().collect()
    }

    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        for (_, _, data) in state.operator_state(OFFSETS) {
            let saved: Vec<Position> = serde_json::from_slice(data)
                .map_err(|e| EngineError::State(format!("Kafka source positions: {e}")))?;
            for pos in saved {
                // a partition found while running before the checkpoint is this subtask's if
                // the rule gives it here; the runtime learns of it at the first poll
                if self.take(&pos.split) {
                    self.announce.push(pos.split.clone());
                }
                if let Some(p) = self.partitions.get_mut(&pos.split) {
                    p.next = Some(pos.next);
                    p.stop = pos.stop;
                    p.finished = pos.stop.is_some_and(|s| pos.next >= s);
                }
            }
        }
        let consumer = self.connect()?;
        self.resolve(&consumer, false)?;
        let all: Vec<String> = self.partitions.keys().cloned().collect();
        self.assign(&consumer, &all)?;
        for (split, p) in &self.partitions {
            if p.finished {
                self.ended.push(split.clone());
            }
        }
        self.consumer = Some(consumer);
        Ok(())
    }

    fn poll(
        &mut self,
        ctx: &OperatorContext<'_>,
        out: &mut dyn SourceOutput,
    ) -> Result<SourceStatus> {
        if self.consumer.is_none() {
            // not opened: the runtime always opens first; be safe anyway
            let consumer = self.connect()?;
            self.resolve(&consumer, false)?;
            let all: Vec<String> = self.partitions.keys().cloned().collect();
            self.assign(&consumer, &all)?;
            self.consumer = Some(consumer);
        }
        for s in self.announce.drain(..) {
            out.split_added(&s);
        }
        if !self.reported_empty {
            self.reported_empty = true;
            if self.partitions.is_empty() {
                out.split_finished(freshet_engine::splits::WHOLE);
            }
        }
        if let Some(until) = self.stalled_until {
            let now = Instant::now();
            if now < until {
                return Ok(SourceStatus::Pending(
                    (until - now).min(Duration::from_millis(100)),
                ));
            }
            self.stalled_until = None;
        }
        let mut read = 0;
        // bounded: a record past a partition's stop offset was polled
        let mut crossed = false;
        let consumer = self.consumer.take().expect("connected above");
        let mut failed = None;
        while read < self.config.batch_size {
            let Some(polled) = consumer.poll(Duration::ZERO) else {
                break;
            };
            match polled {
                Ok(m) => {
                    read += 1;
                    match self.decode(&m) {
                        Ok(inside) => crossed |= !inside,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    if self.stalled.is_some() {
                        break;
                    }
                }
                Err(e) => {
                    let err = error("reading", self.bootstrap(), &e);
                    if !err.is_retryable() {
                        failed = Some(err);
                    } else {
                        // the client reconnects by itself; a broker away for long shows as no
                        // data
                        warn!(error = %e, "Kafka consumer error");
                    }
                    break;
                }
            }
        }
        self.consumer = Some(consumer);
        if let Some(err) = failed {
            return Err(err);
        }
        if self.stalled.is_some() {
            self.stall()?;
        } else if read > 0 {
            self.stall_backoff = STALL_BACKOFF;
        }
        self.report_lag(ctx);
        self.flush(out)?;
        if read > 0 && !crossed {
            return Ok(SourceStatus::Ready);
        }
        if self
            .partitions
            .values()
            .any(|p| p.stop.is_some() && !p.finished)
        {
            let all_done = self.check_ends()?;
            self.flush(out)?;
            if all_done {
                return Ok(SourceStatus::Finished);
            }
        } else if self.config.settings.bounded {
            return Ok(SourceStatus::Finished);
        }
        Ok(if read > 0 {
            SourceStatus::Ready
        } else {
            SourceStatus::Pending(Duration::from_millis(10))
        })
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        let positions: Vec<Position> = self
            .partitions
            .iter()
            .filter_map(|(split, p)| {
                Some(Position {
                    split: split.clone(),
                    next: p.next?,
                    stop: p.stop,
                })
            })
            .collect();
        let data = serde_json::to_vec(&positions)
            .map_err(|e| EngineError::State(format!("Kafka source positions: {e}")))?;
        snap.put(OFFSETS, data);
        let commit = self
            .partitions
            .values()
            .filter_map(|p| Some((p.topic.clone(), p.partition, p.next?)))
            .collect();
        self.snapshots.push((snap.id(), commit));
        // a checkpoint that never completes leaves its entry: keep only the recent ones
        if self.snapshots.len() > 16 {
            self.snapshots.remove(0);
        }
        Ok(())
    }

    /// Partitions the JobManager found while the job runs: read from their beginning.
    fn add_splits(&mut self, splits: Vec<String>) -> Result<()> {
        let new: Vec<String> = splits.into_iter().filter(|s| self.insert(s)).collect();
        if new.is_empty() {
            return Ok(());
        }
        debug!(?new, "partitions assigned");
        self.announce.extend(new.iter().cloned());
        // not connected yet: opening resolves and assigns every partition
        let Some(consumer) = self.consumer.take() else {
            return Ok(());
        };
        let r = self
            .resolve(&consumer, true)
            .and_then(|_| self.assign(&consumer, &new));
        self.consumer = Some(consumer);
        r
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        let Some(i) = self.snapshots.iter().rposition(|(c, _)| *c <= id) else {
            return Ok(());
        };
        let (_, offsets) = self.snapshots.remove(i);
        self.snapshots.drain(..i);
        let (Some(consumer), false) = (&self.consumer, offsets.is_empty()) else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in &offsets {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        // for lag tools only: a failure is logged, recovery never reads these
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            warn!(error = %e, group = %self.group, "committing offsets to the consumer group failed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::registry;
    use crate::registry::SourceContext;
    use freshet_job::SourceSpec;
    use std::path::Path;

    /// The first problem of planning a Kafka source with `connector` settings and `schema`
    /// (with the partitions given, so no broker is asked).
    fn problem(connector: serde_json::Value, schema: serde_json::Value) -> String {
        let mut c = serde_json::json!({"type": "kafka", "bootstrap_servers": "b:9092",
                                        "format": "json"});
        c.as_object_mut()
            .unwrap()
            .extend(connector.as_object().unwrap().clone());
        let spec: SourceSpec =
            serde_json::from_value(serde_json::json!({"connector": c, "schema": schema})).unwrap();
        let splits = vec!["t/0".to_string()];
        let ctx = SourceContext {
            name: "s",
            spec: &spec,
            base: Path::new("/"),
            batch_size: 8,
            splits: Some(&splits),
        };
        match registry().plan_source(&ctx) {
            Ok(_) => "planned".into(),
            Err(p) => p.0[0].to_string(),
        }
    }

    #[test]
    fn settings_are_checked_against_the_schema() {
        let n = serde_json::json!({"n": "int", "ts": "timestamp", "v": "string"});
        assert_eq!(
            problem(serde_json::json!({"topics": ["t"]}), n.clone()),
            "planned"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "metadata": {"k": "key"}}),
            n.clone(),
        );
        assert!(
            p.starts_with("sources.s.connector.metadata.k: 'k' is not a field"),
            "{p}"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "metadata": {"n": "timestamp"}}),
            n.clone(),
        );
        assert!(
            p.starts_with("sources.s.connector.metadata.n: the record's timestamp is timestamp, so 'n' must be declared timestamp, not int"),
            "{p}"
        );
        assert_eq!(
            problem(
                serde_json::json!({"topics": ["t"], "metadata": {"ts": "timestamp"}}),
                n.clone()
            ),
            "planned"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "format": "string"}),
            n.clone(),
        );
        assert!(
            p.starts_with("sources.s.connector.format: format: string reads"),
            "{p}"
        );
        assert_eq!(
            problem(
                serde_json::json!({"topics": ["t"], "format": "string",
                                   "metadata": {"n": "offset", "ts": "timestamp"}}),
                n.clone()
            ),
            "planned"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "topic_pattern": "t.*"}),
            n.clone(),
        );
        assert!(p.starts_with("sources.s.connector: name the topics"), "{p}");
        let p = problem(serde_json::json!({}), n.clone());
        assert!(p.starts_with("sources.s.connector: name the topics"), "{p}");
        let p = problem(
            serde_json::json!({"topics": ["t"], "format": "avro"}),
            n.clone(),
        );
        assert!(
            p.starts_with("sources.s.connector.schema_registry: format: avro reads"),
            "{p}"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "schema_registry": {"url": "http://r:8081"}}),
            n.clone(),
        );
        assert!(
            p.starts_with("sources.s.connector.schema_registry: only used with format: avro"),
            "{p}"
        );
        // planned again with its splits (a restore): the registry is not asked
        assert_eq!(
            problem(
                serde_json::json!({"topics": ["t"], "format": "avro",
                                   "schema_registry": {"url": "http://127.0.0.1:1"}}),
                n.clone()
            ),
            "planned"
        );
        let p = problem(serde_json::json!({"topic_pattern": "("}), n.clone());
        assert!(
            p.starts_with("sources.s.connector.topic_pattern: not a regular expression"),
            "{p}"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "start": "timestamp"}),
            n.clone(),
        );
        assert!(
            p.starts_with("sources.s.connector.start_timestamp: start: timestamp needs"),
            "{p}"
        );
        assert_eq!(
            problem(
                serde_json::json!({"topics": ["t"], "start": "timestamp",
                                   "start_timestamp": "2024-05-01T00:00:00Z"}),
                n.clone()
            ),
            "planned"
        );
        let p = problem(
            serde_json::json!({"topics": ["t"], "start_timestamp": 5}),
            n,
        );
        assert!(
            p.starts_with("sources.s.connector.start_timestamp: only used with"),
            "{p}"
        );
    }
}
