//! The engine's error type. Every error names where it happened and whether retrying can help.
use thiserror::Error;

/// Result alias for engine operations.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What went wrong inside a running subtask.
#[derive(Debug, Error)]
pub enum EngineError {
    /// An Arrow kernel failed (type mismatch, overflow, ...): a bug or an unchecked plan.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Reading or writing an external system failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (file path, connector).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A downstream subtask went away (it failed or the job is being cancelled).
    #[error("downstream channel closed")]
    ChannelClosed,
    /// An upstream subtask went away without finishing its output (it failed or the job is
    /// being cancelled): a consequence of that subtask's failure, never a cause of its own.
    #[error("an upstream subtask stopped without finishing its output")]
    UpstreamClosed,
    /// The job was cancelled while this subtask was running.
    #[error("cancelled")]
    Cancelled,
    /// An operator rejected its input or configuration.
    #[error("{0}")]
    Operator(String),
    /// Keyed state or a snapshot could not be read or written.
    #[error("state: {0}")]
    State(String),
    /// The keyed-state store (RocksDB) failed: a disk error or a damaged working file, which a
    /// restart on a fresh working directory may get past, or a misuse, which it cannot.
    #[error("state store: {message}")]
    StateStore {
        /// What was being done, and the store's message.
        message: String,
        /// Whether a restart may help.
        retryable: bool,
    },
    /// Object storage (checkpoints, savepoints) failed.
    #[error("object storage: {0}")]
    Storage(String),
    /// An external system a connector talks to (a Kafka broker) failed or refused.
    #[error("{message}")]
    External {
        /// What was being done, with whom, and the system's message.
        message: String,
        /// Whether a restart may help (an unreachable broker) or not (a missing topic, a
        /// refused authorization).
        retryable: bool,
    },
    /// A file of a checkpoint or savepoint is missing or not what the snapshot recorded.
    #[error("{location} is corrupt: {what}")]
    Corrupt {
        /// The object.
        location: String,
        /// How it differs from what was recorded.
        what: String,
    },
}

impl EngineError {
    /// An I/O error with the context it happened in.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when this subtask failed only because a peer went away: the peer's own error is the
    /// one to report.
    pub fn is_consequence(&self) -> bool {
        matches!(
            self,
            EngineError::ChannelClosed | EngineError::UpstreamClosed
        )
    }

    /// True when restarting the task may succeed (external systems), false for deterministic
    /// failures that would repeat (type errors, invalid operator configuration).
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Io { .. }
            | EngineError::ChannelClosed
            | EngineError::UpstreamClosed
            | EngineError::Storage(_) => true,
            EngineError::StateStore { retryable, .. } | EngineError::External { retryable, .. } => {
                *retryable
            }
            EngineError::Arrow(_)
            | EngineError::Cancelled
            | EngineError::Operator(_)
            | EngineError::State(_)
            | EngineError::Corrupt { .. } => false,
        }
    }
}
