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
    /// The job was cancelled while this subtask was running.
    #[error("cancelled")]
    Cancelled,
    /// An operator rejected its input or configuration.
    #[error("{0}")]
    Operator(String),
    /// Keyed state or a snapshot could not be read or written.
    #[error("state: {0}")]
    State(String),
    /// Object storage (checkpoints, savepoints) failed.
    #[error("object storage: {0}")]
    Storage(String),
}

impl EngineError {
    /// An I/O error with the context it happened in.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when restarting the task may succeed (external systems), false for deterministic
    /// failures that would repeat (type errors, invalid operator configuration).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EngineError::Io { .. } | EngineError::ChannelClosed | EngineError::Storage(_)
        )
    }
}
