//! Command-line settings for TLS and bearer tokens (`--tls-*`, `--auth-token-file`,
//! `--token-file`), shared by the JobManager, TaskManager and client commands, and
//! `freshet certs`, which makes a CA, a certificate and a token for a cluster.
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::sync::Arc;

use freshet_security::{Security, Tls, TlsFiles, Tokens};

/// TLS files of a process.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain of this process. JobManagers and TaskManagers given
    /// `--tls-cert`, `--tls-key` and `--tls-ca` use TLS on every connection, and mutual TLS
    /// among themselves. The files are read again when they change.
    #[arg(long, env = "FRESHET_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "FRESHET_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate(s) of the CA that signs the cluster's certificates.
    #[arg(long, env = "FRESHET_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS material of a server (JobManager, TaskManager): all three files or none.
    fn server(&self) -> Result<Option<Arc<Tls>>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Tls::from_files(TlsFiles {
                cert: Some(cert.clone()),
                key: Some(key.clone()),
                ca: ca.clone(),
            })?)),
            _ => bail!("TLS needs all of --tls-cert, --tls-key and --tls-ca"),
        }
    }

    /// The TLS material of a client: a CA to verify the server by, and optionally a
    /// certificate to present.
    fn client(&self) -> Result<Option<Arc<Tls>>> {
        match &self.tls_ca {
            None if self.tls_cert.is_some() || self.tls_key.is_some() => {
                bail!("a client certificate needs --tls-ca to verify the JobManager by")
            }
            None => Ok(None),
            Some(ca) => Ok(Some(Tls::from_files(TlsFiles {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                ca: ca.clone(),
            })?)),
        }
    }

    /// The security of a TaskManager: TLS only (it serves no clients).
    pub fn taskmanager(&self) -> Result<Security> {
        Ok(Security {
            tls: self.server()?,
            tokens: None,
        })
    }
}

/// Security of a JobManager.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    /// File of the bearer tokens clients must send (one per line; read again when it
    /// changes). Required for the HTTP API under TLS.
    #[arg(long, env = "FRESHET_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl ServerArgs {
    pub fn security(&self) -> Result<Security> {
        let security = Security {
            tls: self.tls.server()?,
            tokens: self
                .auth_token_file
                .as_ref()
                .map(Tokens::from_file)
                .transpose()?,
        };
        if security.tls.is_none() {
            eprintln!(
                "warning: no TLS (--tls-cert, --tls-key, --tls-ca): the control plane, data plane and HTTP API are unencrypted{}",
                if security.tokens.is_some() {
                    ", and tokens travel in the clear"
                } else {
                    " and unauthenticated"
                }
            );
        }
        Ok(security)
    }
}

/// The JobManager a client command talks to, and how.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The JobManager (`host:port`).
    #[arg(long, env = "FRESHET_JOBMANAGER", default_value = crate::client::DEFAULT_JOBMANAGER)]
    pub jobmanager: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The name the JobManager's certificate must carry (default: the host dialled).
    #[arg(long, env = "FRESHET_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// File holding the bearer token to send (its first line).
    #[arg(long, env = "FRESHET_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl Target {
    /// The JobManager at `addr`, without TLS or token (processes this command started).
    pub fn plain(addr: &str) -> Target {
        Target {
            jobmanager: addr.to_string(),
            tls: TlsArgs::default(),
            tls_server_name: None,
            token_file: None,
        }
    }

    pub fn dialer(&self) -> Result<freshet_security::net::Dialer> {
        Ok(freshet_security::net::Dialer::new(
            self.tls.client()?,
            self.tls_server_name.clone(),
        ))
    }

    pub fn token(&self) -> Result<freshet_security::ClientToken> {
        let token = self
            .token_file
            .as_deref()
            .map(freshet_security::read_token)
            .transpose()?;
        Ok(freshet_security::ClientToken::new(token.as_deref())?)
    }
}

/// `freshet certs`.
#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Directory to write `ca.crt`, `tls.crt`, `tls.key` and `token` into.
    #[arg(long, default_value = "freshet-tls")]
    out: PathBuf,
    /// Further names (DNS names or IP addresses) the certificate is valid for, beside
    /// `freshet-internal`, `localhost` and `127.0.0.1`.
    #[arg(long = "name")]
    names: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// Writes a new CA, a certificate for every process of a cluster, and a bearer token.
pub fn certs(args: CertsArgs) -> Result<i32> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(args.names);
    let generated = freshet_security::certs::generate(&names, args.days)?;
    generated.write(&args.out)?;
    let token = args.out.join("token");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&token)
            .with_context(|| format!("writing {}", token.display()))?;
        writeln!(f, "{}", freshet_security::certs::token()?)?;
    }
    let d = args.out.display();
    eprintln!(
        "wrote {d}/ca.crt, {d}/tls.crt, {d}/tls.key and {d}/token\n\
         JobManager:  --tls-cert {d}/tls.crt --tls-key {d}/tls.key --tls-ca {d}/ca.crt --auth-token-file {d}/token\n\
         TaskManager: --tls-cert {d}/tls.crt --tls-key {d}/tls.key --tls-ca {d}/ca.crt\n\
         clients:     --tls-ca {d}/ca.crt --token-file {d}/token"
    );
    Ok(0)
}
