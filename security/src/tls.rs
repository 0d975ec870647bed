//! A process's TLS material (certificate chain, private key, the CA that signs its peers) and
//! the rustls configurations built from it, rebuilt when the files change.
use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};

use crate::{Error, Result};

/// The name every certificate of a Freshet cluster carries, by which the cluster's processes
/// verify each other: TaskManagers are dialled by IP address, so the address cannot be it.
pub const INTERNAL_NAME: &str = "freshet-internal";

/// How often at most the files are looked at again.
const RECHECK: Duration = Duration::from_secs(1);

/// Where a process's TLS material lives: PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The process's certificate chain (leaf first). Servers need it; a client without it
    /// presents no certificate.
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    pub key: Option<PathBuf>,
    /// The CA certificates that sign the peers (and, for a client, the server).
    pub ca: PathBuf,
}

/// PEM text of the material, from files or from memory (a Kubernetes Secret).
#[derive(Clone)]
struct Pem {
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    ca: Vec<u8>,
}

enum Source {
    Files(TlsFiles),
    Memory,
}

/// The configurations built from one version of the material.
struct Built {
    /// What the files looked like when read (`None` for material from memory).
    stamp: Option<Vec<FileStamp>>,
    /// Client certificates required (TaskManager services, the data plane).
    mutual: Option<Arc<ServerConfig>>,
    /// Client certificates verified when presented (the JobManager: clients may use a token).
    optional: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
}

/// A file's modification time, length and inode: a Kubernetes Secret volume replaces its files
/// by renaming a directory, which changes all three.
type FileStamp = Option<(SystemTime, u64, u64)>;

/// A process's TLS material. Cheap to share; every new connection uses the newest readable
/// version of the files.
pub struct Tls {
    source: Source,
    built: Mutex<(Arc<Built>, Instant)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Source::Files(p) => write!(f, "Tls({})", p.ca.display()),
            Source::Memory => write!(f, "Tls(in memory)"),
        }
    }
}

/// Client certificates a server asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A connection without a certificate of the cluster's CA is refused.
    Required,
    /// A certificate is verified when presented; without one the caller needs a token.
    Optional,
}

impl Tls {
    /// Material from files, read now (so a mistake is reported at start) and again whenever
    /// they change.
    pub fn from_files(files: TlsFiles) -> Result<Arc<Tls>> {
        if files.cert.is_some() != files.key.is_some() {
            return Err(Error(
                "a TLS certificate needs its key, and a key its certificate".into(),
            ));
        }
        let (pem, stamp) = read_files(&files)?;
        let built = build(&pem, Some(stamp))?;
        Ok(Arc::new(Tls {
            source: Source::Files(files),
            built: Mutex::new((Arc::new(built), Instant::now())),
        }))
    }

    /// Material held in memory: a CA and, for a client that presents one, a certificate and key.
    pub fn from_pem(ca: &[u8], cert_and_key: Option<(&[u8], &[u8])>) -> Result<Arc<Tls>> {
        let pem = Pem {
            cert: cert_and_key.map(|(c, _)| c.to_vec()),
            key: cert_and_key.map(|(_, k)| k.to_vec()),
            ca: ca.to_vec(),
        };
        let built = build(&pem, None)?;
        Ok(Arc::new(Tls {
            source: Source::Memory,
            built: Mutex::new((Arc::new(built), Instant::now())),
        }))
    }

    /// The configuration of a server asking for client certificates as `auth` says.
    pub fn server_config(&self, auth: ClientAuth) -> std::io::Result<Arc<ServerConfig>> {
        let built = self.current();
        match auth {
            ClientAuth::Required => built.mutual.clone(),
            ClientAuth::Optional => built.optional.clone(),
        }
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a TLS server needs a certificate and key",
            )
        })
    }

    /// The configuration of a client: it trusts the CA and presents its certificate if it has one.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// The newest configurations: the files are looked at again at most once a second, and a
    /// version that does not load (a file half written) leaves the previous one in use.
    fn current(&self) -> Arc<Built> {
        let Source::Files(files) = &self.source else {
            return self.built.lock().0.clone();
        };
        let mut guard = self.built.lock();
        if guard.1.elapsed() < RECHECK {
            return guard.0.clone();
        }
        guard.1 = Instant::now();
        let stamp = stamps(files);
        if guard.0.stamp.as_ref() == Some(&stamp) {
            return guard.0.clone();
        }
        match read_files(files).and_then(|(pem, stamp)| build(&pem, Some(stamp))) {
            Ok(built) => {
                info!(ca = %files.ca.display(), "TLS certificates changed; new connections use them");
                guard.0 = Arc::new(built);
            }
            Err(e) => {
                warn!(error = %e, "TLS certificates changed but do not load; keeping the previous ones");
                // not again until the files change once more
                guard.0 = Arc::new(Built {
                    stamp: Some(stamp),
                    mutual: guard.0.mutual.clone(),
                    optional: guard.0.optional.clone(),
                    client: guard.0.client.clone(),
                });
            }
        }
        guard.0.clone()
    }
}

fn stamps(files: &TlsFiles) -> Vec<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    [files.cert.as_ref(), files.key.as_ref(), Some(&files.ca)]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

fn read_files(files: &TlsFiles) -> Result<(Pem, Vec<FileStamp>)> {
    let stamp = stamps(files);
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| Error(format!("TLS {what} {}: {e}", p.display())))
    };
    let pem = Pem {
        cert: files
            .cert
            .as_ref()
            .map(|p| read(p, "certificate"))
            .transpose()?,
        key: files.key.as_ref().map(|p| read(p, "key")).transpose()?,
        ca: read(&files.ca, "CA")?,
    };
    Ok((pem, stamp))
}

/// The crypto used everywhere (one provider, whatever else the build links).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error(format!("TLS {what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error(format!("TLS {what}: no PEM certificate in it")));
    }
    Ok(certs)
}

fn bad(what: &str) -> impl Fn(rustls::Error) -> Error + '_ {
    move |e| Error(format!("TLS {what}: {e}"))
}

fn build(pem: &Pem, stamp: Option<Vec<FileStamp>>) -> Result<Built> {
    let mut roots = RootCertStore::empty();
    for c in certificates(&pem.ca, "CA")? {
        roots
            .add(c)
            .map_err(|e| Error(format!("TLS CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let identity = match (&pem.cert, &pem.key) {
        (Some(c), Some(k)) => {
            let chain = certificates(c, "certificate")?;
            let key =
                PrivateKeyDer::from_pem_slice(k).map_err(|e| Error(format!("TLS key: {e}")))?;
            Some((chain, key))
        }
        _ => None,
    };
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(bad("client"))?
        .with_root_certificates(roots.clone());
    let mut client = match &identity {
        Some((chain, key)) => client
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(bad("client certificate"))?,
        None => client.with_no_client_auth(),
    };
    client.alpn_protocols = vec![b"h2".to_vec()];
    let server = |auth: ClientAuth| -> Result<Option<Arc<ServerConfig>>> {
        let Some((chain, key)) = &identity else {
            return Ok(None);
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        let verifier = match auth {
            ClientAuth::Required => verifier.build(),
            ClientAuth::Optional => verifier.allow_unauthenticated().build(),
        }
        .map_err(|e| Error(format!("TLS CA: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(bad("server"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(bad("certificate and key"))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    };
    Ok(Built {
        stamp,
        mutual: server(ClientAuth::Required)?,
        optional: server(ClientAuth::Optional)?,
        client: Arc::new(client),
    })
}
