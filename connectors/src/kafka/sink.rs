//! The Kafka sink: rows as records of one topic, with `exactly_once`, `at_least_once` or
//! `none` delivery.
//!
//! **Exactly once** is a write-ahead design. The records a subtask receives between two
//! barriers are kept, encoded, in its snapshot (as commit data of the sink commit protocol,
//! [`freshet_engine::commit`]). When the checkpoint completes, the subtask writes them in one
//! Kafka transaction that also commits a *marker* — the checkpoint id as the offset of the
//! consumer group `<prefix>-<subtask>` on partition 0 of the topic, with the subtask's session
//! as metadata — so the records and the marker become visible together or not at all. After a
//! restore, the subtask first calls `init_transactions` with the transactional id
//! `<prefix>-<subtask>` (which fences a previous incarnation and aborts a transaction it left
//! open, or waits for one it was committing), then reads the marker: a pending checkpoint the
//! marker shows is already in Kafka is dropped; one it does not show is written again. So a
//! kill at any moment — also after the checkpoint completed and before the commit reached the
//! broker — neither loses nor duplicates a record, and no commit depends on resuming another
//! producer's transaction. Data waits in checkpoints, not in open transactions, so a
//! transaction is open only while it is being written; the transaction timeout bounds how long
//! a commit may take, and a commit it aborts is written again after the restart.
//!
//! **At least once** sends records as they arrive and waits, at every barrier, until the
//! brokers acknowledged all of them; a failed delivery fails the subtask, and the restart
//! resends from the last checkpoint. **None** sends and never waits.
use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use indexmap::IndexMap;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};

use freshet_engine::checkpoint::{CheckpointId, SnapshotContext, StateContext};
use freshet_engine::commit::PendingCommits;
use freshet_engine::metrics::SubtaskMetrics;
use freshet_engine::operator::{Operator, OperatorContext, Output};
use freshet_engine::{EngineError, Result};
use freshet_job::{DurationSpec, Problems};
use freshet_operators::json::RowWriter;

use super::source::ValueFormat;
use super::{REQUEST_TIMEOUT, client_config, error};
use crate::SinkPlan;
use crate::avro::{AvroEncoder, record_name, schema_for};
use crate::registry::{SinkConnector, SinkContext};
use crate::schema_registry::{RegistrySettings, SchemaRegistry};

/// What the sink promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every row exactly once, visible to `read_committed` readers when the checkpoint that
    /// covers it completes (needs checkpoints).
    ExactlyOnce,
    /// Every row at least once; a restart may write rows again.
    #[default]
    AtLeastOnce,
    /// Fire and forget: a failure may lose rows.
    None,
}

fn default_transaction_timeout() -> DurationSpec {
    DurationSpec(Duration::from_secs(60))
}

/// Rows into a Kafka topic.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkSettings {
    /// Brokers to connect to first, `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// The topic written (it must exist).
    pub topic: String,
    /// How a row becomes the record's value: `json` (an object of all columns), `string`
    /// (the one string column that is not key, partition or header) or `avro` (a record of all
    /// columns in the Confluent wire format, its schema registered in `schema_registry`).
    #[serde(default = "default_format")]
    pub format: ValueFormat,
    /// With `format: avro`: the schema registry the values' schema is registered in.
    #[serde(default)]
    pub schema_registry: Option<RegistrySettings>,
    /// With `format: avro`: the subject the schema is registered under; `<topic>-value` if
    /// unset.
    #[serde(default)]
    pub subject: Option<String>,
    /// With `format: avro`: the full name of the record schema; the sink's name (with
    /// characters Avro names cannot hold as `_`) if unset.
    #[serde(default)]
    pub record_name: Option<String>,
    /// Columns forming the record key: one string column as its text, otherwise a JSON object
    /// of the columns. Records with equal keys go to the same partition (the partitioner is
    /// Kafka's usual murmur2, like Java clients).
    #[serde(default)]
    pub key: Vec<String>,
    /// An `int` column naming the partition explicitly (instead of the key's).
    #[serde(default)]
    pub partition: Option<String>,
    /// Record headers: header name to column; the value is the column's text.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Delivery guarantee.
    #[serde(default)]
    pub delivery: Delivery,
    /// Prefix of the transactional ids (`<prefix>-<subtask>`) and marker groups;
    /// `freshet-<job>-<sink>` if unset. Two jobs writing with the same prefix fence each other.
    #[serde(default)]
    pub transactional_id_prefix: Option<String>,
    /// The longest a transaction may stay open (`transaction.timeout.ms`): must not exceed
    /// the brokers' `transaction.max.timeout.ms`.
    #[serde(default = "default_transaction_timeout")]
    pub transaction_timeout: DurationSpec,
    /// Further librdkafka client properties (`security.protocol`, `compression.type`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_format() -> ValueFormat {
    ValueFormat::Json
}

/// The `kafka` sink connector.
pub struct KafkaSinkConnector;

impl SinkConnector for KafkaSinkConnector {
    type Config = KafkaSinkSettings;

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn plan(
        &self,
        ctx: &SinkContext<'_>,
        c: KafkaSinkSettings,
    ) -> std::result::Result<SinkPlan, Problems> {
        let schema = ctx.input.clone();
        let index_of = |field: &str, column: &str| -> std::result::Result<usize, Problems> {
            schema.index_of(column).map_err(|_| {
                ctx.problem(field, format!("'{column}' is not a column of the stream"))
            })
        };
        let key = c
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| index_of(&format!("key[{i}]"), k))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let partition = match &c.partition {
            Some(p) => {
                let i = index_of("partition", p)?;
                if schema.field(i).data_type() != &DataType::Int64 {
                    return Err(ctx.problem("partition", format!("'{p}' must be an int column")));
                }
                Some(i)
            }
            None => None,
        };
        let headers = c
            .headers
            .iter()
            .map(|(h, col)| Ok((h.clone(), index_of(&format!("headers.{h}"), col)?)))
            .collect::<std::result::Result<Vec<_>, Problems>>()?;
        let value_column = if c.format == ValueFormat::String {
            let used: Vec<usize> = key
                .iter()
                .copied()
                .chain(partition)
                .chain(headers.iter().map(|(_, i)| *i))
                .collect();
            let rest: Vec<usize> = (0..schema.fields().len())
                .filter(|i| {
                    !used.contains(i) && schema.field(*i).name() != freshet_engine::TIME_COLUMN
                })
                .collect();
            match rest.as_slice() {
                [i] if schema.field(*i).data_type() == &DataType::Utf8 => Some(*i),
                _ => {
                    return Err(ctx.problem(
                        "format",
                        "format: string writes one string column as the value; the stream has \
                         other columns besides key, partition and headers",
                    ));
                }
            }
        } else {
            None
        };
        let avro = match (c.format, &c.schema_registry) {
            (ValueFormat::Avro, Some(r)) => {
                let name = c
                    .record_name
                    .clone()
                    .unwrap_or_else(|| record_name(ctx.name));
                let field = if c.record_name.is_some() {
                    "record_name"
                } else {
                    "format"
                };
                let schema = schema_for(&schema, &name).map_err(|e| ctx.problem(field, e))?;
                Some(AvroPlan {
                    registry: Arc::new(SchemaRegistry::new(r)),
                    subject: c
                        .subject
                        .clone()
                        .unwrap_or_else(|| format!("{}-value", c.topic)),
                    schema,
                })
            }
            (ValueFormat::Avro, None) => {
                return Err(ctx.problem(
                    "schema_registry",
                    "format: avro registers the values' schema in a schema registry: give its url",
                ));
            }
            (_, Some(_)) => {
                return Err(ctx.problem("schema_registry", "only used with format: avro"));
            }
            (_, None) => None,
        };
        if c.format != ValueFormat::Avro && (c.subject.is_some() || c.record_name.is_some()) {
            return Err(ctx.problem(
                if c.subject.is_some() {
                    "subject"
                } else {
                    "record_name"
                },
                "only used with format: avro",
            ));
        }
        if c.transaction_timeout.0 < Duration::from_secs(1) {
            return Err(ctx.problem("transaction_timeout", "must be at least 1s"));
        }
        let config = Arc::new(SinkConfig {
            name: ctx.name.to_string(),
            settings: c,
            key,
            partition,
            headers,
            value_column,
            avro,
        });
        Ok(SinkPlan {
            factory: Arc::new(move |_| Box::new(KafkaSink::new(config.clone()))),
        })
    }
}

struct SinkConfig {
    name: String,
    settings: KafkaSinkSettings,
    key: Vec<usize>,
    partition: Option<usize>,
    headers: Vec<(String, usize)>,
    value_column: Option<usize>,
    avro: Option<AvroPlan>,
}

/// How an `avro` sink writes: the schema derived from its input, and where it is registered.
struct AvroPlan {
    registry: Arc<SchemaRegistry>,
    subject: String,
    schema: apache_avro::Schema,
}

/// One encoded record.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    partition: Option<i32>,
    headers: Vec<(String, Vec<u8>)>,
}

/// The commit data of one checkpoint of one subtask (exactly once).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Commit {
    /// The subtask whose transactional id and marker commit it.
    owner: u32,
    /// The checkpoint it belongs to: the marker's offset.
    checkpoint: u64,
    /// The writing incarnation: the marker's metadata, so a marker of another lineage never
    /// passes for this one.
    session: String,
    records: Vec<Record>,
}

/// Operator state of the exactly-once sink.
const COMMITS: &str = "kafka-sink-commits";

/// Remembers the first failed delivery.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut f = self.failed.lock();
            if f.is_none() {
                *f = Some(e.to_string());
            }
        }
    }
}

type Client = BaseProducer<Deliveries>;

/// One subtask of a Kafka sink.
pub struct KafkaSink {
    config: Arc<SinkConfig>,
    prefix: String,
    index: u32,
    session: String,
    producer: Option<Client>,
    /// Exactly once after a rescale: producers of former subtasks' transactional ids.
    others: HashMap<u32, Client>,
    /// Exactly once: consumers of the marker groups, by owner.
    markers: HashMap<u32, BaseConsumer>,
    /// Exactly once: the records since the last barrier, and the pending checkpoints.
    buffer: Vec<Record>,
    commits: Option<PendingCommits<Commit>>,
    last_checkpoint: u64,
    /// With `format: avro`: the encoder of the registered schema (set on open).
    avro: Option<AvroEncoder>,
}

impl KafkaSink {
    fn new(config: Arc<SinkConfig>) -> Self {
        KafkaSink {
            config,
            prefix: String::new(),
            index: 0,
            session: String::new(),
            producer: None,
            others: HashMap::new(),
            markers: HashMap::new(),
            buffer: Vec::new(),
            commits: None,
            last_checkpoint: 0,
            avro: None,
        }
    }

    fn bootstrap(&self) -> &str {
        &self.config.settings.bootstrap_servers
    }

    fn exactly_once(&self) -> bool {
        self.config.settings.delivery == Delivery::ExactlyOnce
    }

    fn fail(&self, what: &str, e: &KafkaError) -> EngineError {
        error(
            &format!(
                "{what} (sink '{}', topic '{}')",
                self.config.name, self.config.settings.topic
            ),
            self.bootstrap(),
            e,
        )
    }

    /// A producer; transactional with id `<prefix>-<owner>` for exactly once (then its
    /// `init_transactions` has fenced earlier producers of that id).
    fn producer(&self, owner: Option<u32>) -> Result<Client> {
        let s = &self.config.settings;
        let mut c = client_config(&s.bootstrap_servers, &BTreeMap::new());
        c.set("partitioner", "murmur2_random")
            .set("client.id", format!("{}-{}", self.prefix, self.index));
        match s.delivery {
            Delivery::ExactlyOnce => {
                c.set(
                    "transactional.id",
                    format!("{}-{}", self.prefix, owner.unwrap_or(self.index)),
                )
                .set(
                    "transaction.timeout.ms",
                    s.transaction_timeout.0.as_millis().to_string(),
                );
            }
            Delivery::AtLeastOnce => {
                c.set("enable.idempotence", "true").set("acks", "all");
            }
            Delivery::None => {}
        }
        for (k, v) in &s.properties {
            c.set(k, v);
        }
        let p: Client = c
            .create_with_context(Deliveries::default())
            .map_err(|e| self.fail("creating a producer", &e))?;
        let metadata = p
            .client()
            .fetch_metadata(Some(&s.topic), REQUEST_TIMEOUT)
            .map_err(|e| self.fail("reading the topic's metadata", &e))?;
        let missing = metadata
            .topics()
            .iter()
            .find(|t| t.name() == s.topic)
            .is_none_or(|t| t.error().is_some() || t.partitions().is_empty());
        if missing {
            return Err(EngineError::External {
                message: format!(
                    "Kafka at {}: topic '{}' of sink '{}' does not exist",
                    s.bootstrap_servers, s.topic, self.config.name
                ),
                retryable: false,
            });
        }
        if s.delivery == Delivery::ExactlyOnce {
            p.init_transactions(s.transaction_timeout.0)
                .map_err(|e| self.fail("initializing transactions", &e))?;
        }
        Ok(p)
    }

    fn marker_group(&self, owner: u32) -> String {
        format!("{}-{owner}", self.prefix)
    }

    /// Makes sure there is a consumer of the marker group of `owner` (for its group metadata
    /// and committed offsets) and, for a former subtask's id, a producer that has fenced it.
    fn prepare(&mut self, owner: u32) -> Result<()> {
        if owner != self.index && !self.others.contains_key(&owner) {
            let p = self.producer(Some(owner))?;
            self.others.insert(owner, p);
        }
        if !self.markers.contains_key(&owner) {
            let s = &self.config.settings;
            let mut c = client_config(&s.bootstrap_servers, &s.properties);
            c.set("group.id", self.marker_group(owner))
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed");
            let consumer = c
                .create()
                .map_err(|e| self.fail("creating the marker consumer", &e))?;
            self.markers.insert(owner, consumer);
        }
        Ok(())
    }

    fn marker_consumer(&self, owner: u32) -> &BaseConsumer {
        &self.markers[&owner]
    }

    /// Whether `commit` is already in Kafka: its owner's marker shows its checkpoint in its
    /// session. Only asked after the owner's transactional id was fenced, so a commit of an
    /// earlier incarnation is either complete or never will be.
    fn committed(&self, commit: &Commit) -> Result<bool> {
        let consumer = self.marker_consumer(commit.owner);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.config.settings.topic, 0);
        let got = consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| self.fail("reading the commit marker", &e))?;
        Ok(got.elements().first().is_some_and(|e| {
            matches!(e.offset(), Offset::Offset(o) if o >= commit.checkpoint as i64)
                && e.metadata() == commit.session
        }))
    }

    /// Writes `commit` in one transaction with its marker.
    fn write_commit(&self, producer: &Client, commit: &Commit) -> Result<()> {
        let timeout = self.config.settings.transaction_timeout.0;
        producer
            .begin_transaction()
            .map_err(|e| self.fail("beginning a transaction", &e))?;
        for r in &commit.records {
            self.send(producer, r)?;
        }
        let group = self
            .marker_consumer(commit.owner)
            .group_metadata()
            .ok_or_else(|| EngineError::External {
                message: "Kafka: the marker consumer has no group metadata".into(),
                retryable: true,
            })?;
        let mut tpl = TopicPartitionList::new();
        let mut e = tpl.add_partition(&self.config.settings.topic, 0);
        e.set_offset(Offset::Offset(commit.checkpoint as i64))
            .map_err(|e| self.fail("preparing the commit marker", &e))?;
        e.set_metadata(commit.session.clone());
        let result = producer
            .send_offsets_to_transaction(&tpl, &group, timeout)
            .and_then(|_| producer.commit_transaction(timeout));
        if let Err(e) = result {
            // the restart aborts what is left open and writes the checkpoint again
            let _ = producer.abort_transaction(REQUEST_TIMEOUT);
            return Err(self.fail(
                &format!(
                    "committing the transaction of checkpoint {}",
                    commit.checkpoint
                ),
                &e,
            ));
        }
        debug!(
            checkpoint = commit.checkpoint,
            records = commit.records.len(),
            "Kafka transaction committed"
        );
        Ok(())
    }

    /// Commits pending data: own checkpoints with the own producer, a former subtask's (after a
    /// rescale) with a producer of its id, first fencing it. With `check`, data whose marker is
    /// already in Kafka is skipped.
    fn commit_all(&mut self, commits: Vec<Commit>, check: bool) -> Result<()> {
        for c in commits {
            if c.records.is_empty() {
                continue;
            }
            self.prepare(c.owner)?;
            if check && self.committed(&c)? {
                info!(
                    checkpoint = c.checkpoint,
                    owner = c.owner,
                    "Kafka commit was already done before the restart"
                );
                continue;
            }
            // a crash here: the checkpoint completed, its records are not in Kafka yet
            freshet_engine::failpoint::hit("kafka-sink-before-commit");
            let p = if c.owner == self.index {
                self.producer.as_ref().expect("opened")
            } else {
                &self.others[&c.owner]
            };
            self.write_commit(p, &c)?;
            // a crash here: the records are in Kafka, the checkpoint still lists them as pending
            freshet_engine::failpoint::hit("kafka-sink-after-commit");
        }
        Ok(())
    }

    /// Sends one record, waiting while the client's queue is full.
    fn send(&self, producer: &Client, r: &Record) -> Result<()> {
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = BaseRecord::to(&self.config.settings.topic)
            .payload(&r.value)
            .headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(self.fail("sending a record", &e)),
            }
        }
    }

    /// Turns a batch into records.
    fn encode(&self, batch: &RecordBatch) -> Result<Vec<Record>> {
        let rows = batch.num_rows();
        let options = FormatOptions::default();
        let text = |col: &ArrayRef, row: usize| -> Result<Option<Vec<u8>>> {
            if col.is_null(row) {
                return Ok(None);
            }
            if let Some(s) = col.as_string_opt::<i32>() {
                return Ok(Some(s.value(row).as_bytes().to_vec()));
            }
            let f = ArrayFormatter::try_new(col.as_ref(), &options)?;
            Ok(Some(f.value(row).to_string().into_bytes()))
        };
        let key_batch = match self.config.key.as_slice() {
            [] | [_] => None,
            many => Some(batch.project(many)?),
        };
        let key_writer = key_batch.as_ref().map(RowWriter::new);
        let writer = RowWriter::new(batch);
        let mut avro_values = match &self.avro {
            Some(enc) if self.config.value_column.is_none() => Some(enc.rows(batch)?),
            _ => None,
        };
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            let key = match (self.config.key.as_slice(), &key_writer) {
                ([], _) => None,
                ([k], _) => text(batch.column(*k), row)?,
                (_, Some(w)) => {
                    let mut k = Vec::new();
                    w.write(row, &mut k)?;
                    Some(k)
                }
                (_, None) => None,
            };
            let value = match (self.config.value_column, &mut avro_values) {
                (Some(i), _) => text(batch.column(i), row)?.unwrap_or_default(),
                (None, Some(values)) => std::mem::take(&mut values[row]),
                (None, None) => {
                    let mut v = Vec::new();
                    writer.write(row, &mut v)?;
                    v
                }
            };
            let partition = match self.config.partition {
                Some(i) => {
                    let c = batch
                        .column(i)
                        .as_primitive::<arrow::datatypes::Int64Type>();
                    if c.is_null(row) {
                        None
                    } else {
                        Some(i32::try_from(c.value(row)).map_err(|_| {
                            EngineError::Operator(format!(
                                "sink '{}': partition {} is out of range",
                                self.config.name,
                                c.value(row)
                            ))
                        })?)
                    }
                }
                None => None,
            };
            let mut headers = Vec::with_capacity(self.config.headers.len());
            for (h, i) in &self.config.headers {
                if let Some(v) = text(batch.column(*i), row)? {
                    headers.push((h.clone(), v));
                }
            }
            out.push(Record {
                key,
                value,
                partition,
                headers,
            });
        }
        Ok(out)
    }

    /// Waits until every sent record is acknowledged; a failed delivery fails the subtask.
    fn flush(&self) -> Result<()> {
        let Some(p) = &self.producer else {
            return Ok(());
        };
        p.flush(self.config.settings.transaction_timeout.0)
            .map_err(|e| self.fail("waiting for acknowledgements", &e))?;
        if let Some(failed) = p.context().failed.lock().take() {
            return Err(EngineError::External {
                message: format!(
                    "Kafka at {}: a record of sink '{}' was not delivered: {failed}",
                    self.bootstrap(),
                    self.config.name
                ),
                retryable: true,
            });
        }
        Ok(())
    }
}

impl Operator for KafkaSink {
    fn open(&mut self, state: &mut StateContext<'_>) -> Result<()> {
        let me = state.subtask().clone();
        self.index = me.index;
        self.prefix = self
            .config
            .settings
            .transactional_id_prefix
            .clone()
            .unwrap_or_else(|| format!("freshet-{}-{}", me.job, self.config.name));
        // a fresh identity per incarnation: markers of other lineages never match
        self.session = format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(
                format!(
                    "{}-{}-{:?}",
                    std::process::id(),
                    me.index,
                    std::time::SystemTime::now()
                )
                .as_bytes()
            )
        );
        if self.exactly_once() && !state.checkpointing() {
            return Err(EngineError::Operator(format!(
                "sink '{}': delivery exactly_once commits with checkpoints; enable them \
                 (checkpoints.interval) or choose at_least_once",
                self.config.name
            )));
        }
        if let Some(a) = &self.config.avro {
            let id =
                a.registry
                    .register(&a.subject, &a.schema)
                    .map_err(|e| EngineError::External {
                        retryable: e.retryable(),
                        message: format!(
                            "sink '{}': registering the values' schema under '{}': {e}",
                            self.config.name, a.subject
                        ),
                    })?;
            self.avro = Some(AvroEncoder::new(a.schema.clone(), id));
        }
        self.producer = Some(self.producer(None)?);
        if self.exactly_once() {
            let (commits, restored) = PendingCommits::open(state, COMMITS)?;
            self.commits = Some(commits);
            self.commit_all(restored, true)?;
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
        let records = self.encode(&batch)?;
        if self.exactly_once() {
            self.buffer.extend(records);
            return Ok(());
        }
        let p = self.producer.as_ref().expect("opened");
        for r in &records {
            self.send(p, r)?;
        }
        p.poll(Duration::ZERO);
        Ok(())
    }

    fn on_idle(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        if let Some(p) = &self.producer {
            p.poll(Duration::ZERO);
        }
        Ok(())
    }

    fn snapshot(&mut self, snap: &mut SnapshotContext<'_>) -> Result<()> {
        match self.config.settings.delivery {
            Delivery::ExactlyOnce => {
                let records = std::mem::take(&mut self.buffer);
                let closed = (!records.is_empty()).then(|| Commit {
                    owner: self.index,
                    checkpoint: snap.id(),
                    session: self.session.clone(),
                    records,
                });
                self.last_checkpoint = snap.id();
                self.commits
                    .as_mut()
                    .expect("opened with checkpoints")
                    .snapshot(snap, closed)
            }
            Delivery::AtLeastOnce => self.flush(),
            Delivery::None => Ok(()),
        }
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        if let Some(commits) = self.commits.as_mut() {
            let ready = commits.complete(id);
            self.commit_all(ready, false)?;
        }
        Ok(())
    }

    fn on_end_of_input(&mut self, _: &OperatorContext<'_>, _: &mut dyn Output) -> Result<()> {
        if let Some(commits) = self.commits.as_mut() {
            // with checkpoints, the input ends only after the final checkpoint completed, so
            // whatever is pending is covered by it
            let mut ready = commits.complete(u64::MAX);
            let rest = std::mem::take(&mut self.buffer);
            if !rest.is_empty() {
                ready.push(Commit {
                    owner: self.index,
                    checkpoint: self.last_checkpoint + 1,
                    session: self.session.clone(),
                    records: rest,
                });
            }
            return self.commit_all(ready, false);
        }
        if self.config.settings.delivery == Delivery::AtLeastOnce {
            return self.flush();
        }
        if let Some(p) = &self.producer {
            let _ = p.flush(REQUEST_TIMEOUT);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("store", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("amount", DataType::Float64, true),
            Field::new(freshet_engine::TIME_COLUMN, DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("s1"), None])),
                Arc::new(Int64Array::from(vec![Some(3), Some(7)])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                Arc::new(Int64Array::from(vec![0, 0])),
            ],
        )
        .unwrap()
    }

    fn sink(settings: serde_json::Value) -> std::result::Result<Arc<SinkConfig>, String> {
        let mut s = serde_json::json!({"bootstrap_servers": "b:9092", "topic": "t"});
        s.as_object_mut()
            .unwrap()
            .extend(settings.as_object().unwrap().clone());
        let settings: KafkaSinkSettings = serde_json::from_value(s).unwrap();
        let input = batch().schema();
        let ctx = SinkContext {
            name: "out",
            path: "sinks.out.connector",
            input: &input,
            upsert_key: None,
            base: std::path::Path::new("/"),
        };
        KafkaSinkConnector
            .plan(&ctx, settings.clone())
            .map_err(|p| p.0[0].to_string())?;
        // the same checks the plan made, for a configuration the test can encode with
        let index = |c: &str| input.index_of(c).unwrap();
        Ok(Arc::new(SinkConfig {
            name: "out".into(),
            key: settings.key.iter().map(|k| index(k)).collect(),
            partition: settings.partition.as_deref().map(index),
            headers: settings
                .headers
                .iter()
                .map(|(h, c)| (h.clone(), index(c)))
                .collect(),
            value_column: (settings.format == ValueFormat::String).then(|| index("store")),
            avro: None,
            settings,
        }))
    }

    fn text(b: &Option<Vec<u8>>) -> Option<&str> {
        b.as_deref().map(|b| std::str::from_utf8(b).unwrap())
    }

    /// Values are JSON objects without the time column; one key column is its text, several a
    /// JSON object; headers carry a column's text; an explicit partition column is used.
    #[test]
    fn rows_become_records() {
        let s = KafkaSink::new(
            sink(
                serde_json::json!({"key": ["store"], "headers": {"h": "amount"},
                                     "partition": "n"}),
            )
            .unwrap(),
        );
        let r = s.encode(&batch()).unwrap();
        assert_eq!(text(&r[0].key), Some("s1"));
        assert_eq!(r[1].key, None, "a null key column: no key");
        assert_eq!(
            std::str::from_utf8(&r[0].value).unwrap(),
            r#"{"store":"s1","n":3,"amount":1.5}"#
        );
        assert_eq!(r[0].headers, vec![("h".to_string(), b"1.5".to_vec())]);
        assert!(r[1].headers.is_empty(), "a null header column: no header");
        assert_eq!((r[0].partition, r[1].partition), (Some(3), Some(7)));

        let s = KafkaSink::new(sink(serde_json::json!({"key": ["store", "n"]})).unwrap());
        let r = s.encode(&batch()).unwrap();
        assert_eq!(text(&r[0].key), Some(r#"{"store":"s1","n":3}"#));
        let s = KafkaSink::new(sink(serde_json::json!({"key": ["n"]})).unwrap());
        assert_eq!(text(&s.encode(&batch()).unwrap()[1].key), Some("7"));
    }

    #[test]
    fn settings_are_checked_against_the_stream() {
        let p = sink(serde_json::json!({"key": ["nope"]})).err().unwrap();
        assert!(
            p.starts_with("sinks.out.connector.key[0]: 'nope' is not a column"),
            "{p}"
        );
        let p = sink(serde_json::json!({"partition": "store"}))
            .err()
            .unwrap();
        assert!(
            p.starts_with("sinks.out.connector.partition: 'store' must be an int column"),
            "{p}"
        );
        let p = sink(serde_json::json!({"format": "string"})).err().unwrap();
        assert!(
            p.starts_with("sinks.out.connector.format: format: string writes"),
            "{p}"
        );
        let s =
            sink(serde_json::json!({"format": "string", "key": ["n"], "headers": {"a": "amount"}}))
                .unwrap();
        let r = KafkaSink::new(s).encode(&batch()).unwrap();
        assert_eq!(std::str::from_utf8(&r[0].value).unwrap(), "s1");
        assert!(r[1].value.is_empty(), "a null value column: an empty value");
        let p = sink(serde_json::json!({"format": "avro"})).err().unwrap();
        assert!(
            p.starts_with("sinks.out.connector.schema_registry: format: avro registers"),
            "{p}"
        );
        let p = sink(serde_json::json!({"subject": "x"})).err().unwrap();
        assert!(
            p.starts_with("sinks.out.connector.subject: only used with format: avro"),
            "{p}"
        );
        let p = sink(serde_json::json!({"format": "avro", "record_name": "a-b",
                                        "schema_registry": {"url": "http://r"}}))
        .err()
        .unwrap();
        assert!(
            p.starts_with("sinks.out.connector.record_name: 'a-b' is not an Avro record name"),
            "{p}"
        );
        sink(serde_json::json!({"format": "avro", "schema_registry": {"url": "http://r"}}))
            .unwrap();
    }
}
