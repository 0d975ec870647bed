//! Who may talk to a Freshet process, and how the bytes travel: TLS for the gRPC control plane,
//! the data plane and the HTTP API (mutual TLS between the JobManager and TaskManagers), and
//! bearer tokens for clients.
//!
//! - [`Tls`]: a process's certificate, key and cluster CA, from PEM files that are read again
//!   when they change (a renewed certificate applies to new connections without a restart).
//! - [`net`]: TLS over tokio streams, for tonic servers and channels and for axum.
//! - [`blocking`]: TLS over a blocking socket whose reading and writing run on two threads
//!   (the data plane).
//! - [`Tokens`] and [`Guard`]: the bearer tokens a server accepts and the check of each call.
//! - [`certs`]: a CA and a certificate for a cluster, and random tokens (`freshet certs`, and
//!   the operator when a StreamJob names no Secret of its own).
pub mod blocking;
pub mod certs;
pub mod net;
mod tls;
mod token;

pub use tls::{INTERNAL_NAME, Tls, TlsFiles};
pub use token::{ClientToken, Guard, Peer, Tokens, read_token, traceparent};

/// A security setting that cannot work as given (a missing or unreadable file, a certificate
/// that does not parse): fixing the configuration is the only remedy, retrying is not.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

/// The result of this crate's fallible calls.
pub type Result<T> = std::result::Result<T, Error>;

/// Makes ring the process's default crypto provider, for TLS clients built without an explicit
/// one (the Kubernetes client, the S3 client). Call it first thing in `main`: when a build links
/// a second provider (a dependency's default features can add aws-lc-rs), rustls cannot choose
/// one by itself and the first TLS connection panics. Calling it again does nothing.
pub fn install_crypto_provider() {
    // an error only says a provider is installed already
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A process's security settings: its TLS material (none: plain TCP) and the bearer tokens it
/// accepts (none: clients need a certificate under TLS, nothing without).
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Certificates, for serving and for dialling the cluster's other processes.
    pub tls: Option<std::sync::Arc<Tls>>,
    /// Tokens accepted from clients.
    pub tokens: Option<std::sync::Arc<Tokens>>,
}

impl Security {
    /// The check of incoming calls.
    pub fn guard(&self) -> Guard {
        Guard::new(self.tls.is_some(), self.tokens.clone())
    }

    /// A dialer for the cluster's other processes: they must show a certificate of the
    /// cluster's CA naming [`INTERNAL_NAME`].
    pub fn internal_dialer(&self) -> net::Dialer {
        net::Dialer::new(self.tls.clone(), Some(INTERNAL_NAME.to_string()))
    }

    /// The connections a server accepts on `listener`, asking for client certificates as
    /// `auth` says (call inside a tokio runtime).
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
        auth: net::ClientAuth,
    ) -> std::io::Result<net::Incoming> {
        net::Incoming::new(listener, self.tls.clone().map(|t| (t, auth)))
    }
}
