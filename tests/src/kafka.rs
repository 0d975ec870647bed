//! A real Apache Kafka broker for tests: one combined KRaft node (broker and controller) on
//! loopback, run with the machine's Java from the jars `testenv/kafka.sh` resolves from Maven
//! Central. It can be stopped and started again on the same ports and data (a broker outage),
//! and has helpers to create topics, produce, and read a topic the way a `read_committed`
//! consumer sees it.
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) broker.
pub struct Broker {
    dir: tempfile::TempDir,
    libs: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The directory holding the broker's jars (resolved once per machine).
fn libs() -> PathBuf {
    let out = Command::new(crate::repo().join("testenv/kafka.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("testenv/kafka.sh runs");
    assert!(out.status.success(), "testenv/kafka.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("libs")
}

impl Broker {
    /// Formats a fresh data directory and starts the broker; returns once it answers.
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, controller) = (free_port(), free_port());
        let data = dir.path().join("data");
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=2\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=2\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             transaction.max.timeout.ms=900000\n",
            data.display()
        );
        std::fs::write(dir.path().join("server.properties"), props).expect("write properties");
        std::fs::write(
            dir.path().join("log4j2.properties"),
            format!(
                "appender.f.type=File\nappender.f.name=F\nappender.f.fileName={}\n\
                 appender.f.layout.type=PatternLayout\n\
                 appender.f.layout.pattern=[%d] %p %m (%c)%n\n\
                 rootLogger.level=INFO\nrootLogger.appenderRef.f.ref=F\n",
                dir.path().join("server.log").display()
            ),
        )
        .expect("write log4j config");
        let mut b = Broker {
            libs: libs(),
            dir,
            port,
            child: None,
        };
        let status = b
            .java("kafka.tools.StorageTool")
            .args(["format", "-t", "MkU3OEVBNTcwNTJENDM2Qg", "-c"])
            .arg(b.dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .status()
            .expect("java runs");
        assert!(status.success(), "formatting the broker's storage failed");
        b.resume();
        b
    }

    fn java(&self, main: &str) -> Command {
        let mut c = Command::new("java");
        c.arg("-Xmx512m")
            .arg("-XX:+UseSerialGC")
            .arg("-XX:TieredStopAtLevel=1")
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.path().join("log4j2.properties").display()
            ))
            .arg(main);
        c
    }

    /// `host:port` to bootstrap from.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Starts the broker process on its ports and data; returns once it answers metadata
    /// requests.
    pub fn resume(&mut self) {
        let child = self
            .java("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("stderr.log")).expect("stderr log"),
            ))
            .spawn()
            .expect("java runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let consumer: BaseConsumer = self.config().create().expect("client");
            if consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok_and(|m| !m.brokers().is_empty())
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the Kafka broker exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not answer within 120 s; see {}",
                self.log().display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kills the broker (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A client configuration for this broker.
    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap())
            .set("log_level", "3");
        c
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().expect("admin");
        let rt = futures::executor::block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ));
        for r in rt.expect("create topics") {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        // wait until the topic's partitions have leaders
        let consumer: BaseConsumer = self.config().create().expect("client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == topic
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "topic {topic} has no leaders");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Produces `(key, value, partition)` records (acknowledged by the broker on return); values
    /// are text or bytes.
    pub fn produce<V: AsRef<[u8]> + ?Sized>(
        &self,
        topic: &str,
        records: &[(Option<&str>, &V, Option<i32>)],
    ) {
        let producer: BaseProducer = self
            .config()
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        for (key, value, partition) in records {
            let mut r = BaseRecord::<str, [u8]>::to(topic).payload(value.as_ref());
            if let Some(k) = key {
                r = r.key(*k);
            }
            if let Some(p) = partition {
                r = r.partition(*p);
            }
            let mut r = r;
            loop {
                match producer.send(r) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        r = back;
                        producer.poll(Duration::from_millis(20));
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(30))
            .expect("records acknowledged");
    }

    /// Every record of `topic` a `read_committed` consumer sees now, as (partition, offset,
    /// key, value), in partition and offset order. Reads up to the end each partition has
    /// when called (its last stable offset).
    pub fn read_committed(&self, topic: &str) -> Vec<(i32, i64, Option<String>, String)> {
        self.read_committed_raw(topic)
            .into_iter()
            .map(|(p, o, k, v)| (p, o, k, String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    /// [`Broker::read_committed`] with values as bytes.
    pub fn read_committed_raw(&self, topic: &str) -> Vec<(i32, i64, Option<String>, Vec<u8>)> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", "freshet-test-reader")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let mut ended = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ended.len() < partitions.len() {
            assert!(Instant::now() < deadline, "reading {topic} timed out");
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(m)) => out.push((
                    m.partition(),
                    m.offset(),
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    m.payload().unwrap_or_default().to_vec(),
                )),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    ended.insert(p);
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
            }
        }
        out.sort_by_key(|(p, o, _, _)| (*p, *o));
        out
    }

    /// The data directory, for tests that look at the broker's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
