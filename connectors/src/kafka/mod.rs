//! Apache Kafka: the `kafka` source ([`source`]) and sink ([`sink`]).
//!
//! Both talk to brokers through librdkafka. What they share lives here: the client settings
//! every connection takes, how a partition is named as a split (`topic/partition`), which
//! subtask reads a partition, and how a client error becomes an engine error that says whether
//! a restart can help.
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::collections::BTreeMap;
use std::time::Duration;

use freshet_engine::EngineError;

pub mod sink;
pub mod source;

/// How long a metadata or offset request to the brokers may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client configuration for `bootstrap` with the job's extra properties; `properties` win
/// over what Freshet sets, so anything librdkafka knows (TLS, SASL) can be configured.
pub fn client_config(bootstrap: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    // librdkafka logs through its own callback; errors also reach the calls that fail
    c.set("log_level", "3");
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// The split name of a partition.
pub fn split_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// A split name taken apart into topic and partition.
pub fn parse_split(split: &str) -> Option<(&str, i32)> {
    let (topic, p) = split.rsplit_once('/')?;
    Some((topic, p.parse().ok()?))
}

/// The subtask (of `parallelism`) that reads `partition` of `topic`: a topic's partitions go
/// round-robin from a start that depends on the topic's name, so several topics spread evenly
/// and a partition's reader depends only on the topic, the partition and the parallelism.
/// Every subtask computes it alike, so a partition found while running is read exactly once.
pub fn owner(topic: &str, partition: i32, parallelism: u32) -> u32 {
    let p = u64::from(parallelism.max(1));
    let start = xxhash_rust::xxh3::xxh3_64(topic.as_bytes()) % p;
    ((start + partition.max(0) as u64) % p) as u32
}

/// An engine error for a failed Kafka call: `what` was being done with the brokers at
/// `bootstrap`. Errors a restart cannot fix (authorization, a missing topic, an invalid
/// configuration) are not retryable; the rest (the broker is down, a timeout) are.
pub fn error(what: &str, bootstrap: &str, e: &KafkaError) -> EngineError {
    let retryable = !matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::InvalidConfig
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
        )
    ) && !matches!(
        e,
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_)
    );
    EngineError::External {
        message: format!("Kafka at {bootstrap}: {what}: {e}"),
        retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_round_trip() {
        assert_eq!(
            parse_split(&split_name("orders.v2-x", 11)),
            Some(("orders.v2-x", 11))
        );
        assert_eq!(parse_split("nope"), None);
        assert_eq!(parse_split("t/x"), None);
    }

    /// Each partition has exactly one reader, and a topic's partitions are spread evenly.
    #[test]
    fn partitions_spread_over_subtasks() {
        for p in 1..6u32 {
            for topic in ["a", "orders", "clicks"] {
                let mut count = vec![0; p as usize];
                for part in 0..(3 * p as i32) {
                    count[owner(topic, part, p) as usize] += 1;
                }
                assert!(count.iter().all(|c| *c == 3), "{topic} at {p}: {count:?}");
            }
        }
    }
}
