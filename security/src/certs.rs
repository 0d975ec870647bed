//! TLS material for a cluster that has none of its own: a CA and one certificate signed by it
//! for every process (server and client use, naming [`INTERNAL_NAME`] and the given names),
//! laid out as a cert-manager Secret (`ca.crt`, `tls.crt`, `tls.key`), and random tokens.
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ring::rand::SecureRandom;
use std::path::Path;

use crate::{Error, INTERNAL_NAME, Result, TlsFiles};

/// File names of a Secret of type `kubernetes.io/tls` with its CA, as cert-manager writes them.
pub const CA_FILE: &str = "ca.crt";
/// The certificate.
pub const CERT_FILE: &str = "tls.crt";
/// Its private key.
pub const KEY_FILE: &str = "tls.key";

/// Generated material, PEM encoded. The CA's key is not kept: a new certificate means a new CA.
#[derive(Clone)]
pub struct Generated {
    /// The CA certificate.
    pub ca: String,
    /// The certificate of the cluster's processes.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generated { .. }")
    }
}

fn err(e: rcgen::Error) -> Error {
    Error(format!("generating certificates: {e}"))
}

/// A new CA and a certificate for [`INTERNAL_NAME`] and `names` (DNS names or IP addresses),
/// valid for `days` days.
pub fn generate(names: &[String], days: u32) -> Result<Generated> {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now + time::Duration::days(days.into());

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Freshet cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let mut sans = vec![INTERNAL_NAME.to_string()];
    sans.extend(names.iter().filter(|n| *n != INTERNAL_NAME).cloned());
    let mut leaf = CertificateParams::new(sans).map_err(err)?;
    leaf.distinguished_name
        .push(DnType::CommonName, INTERNAL_NAME);
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let leaf_key = KeyPair::generate().map_err(err)?;
    let issuer = Issuer::new(ca, ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(err)?;
    Ok(Generated {
        ca: ca_cert.pem(),
        cert: leaf_cert.pem(),
        key: leaf_key.serialize_pem(),
    })
}

impl Generated {
    /// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (the key readable by its owner
    /// only); returns where they are.
    pub fn write(&self, dir: &Path) -> Result<TlsFiles> {
        use std::os::unix::fs::OpenOptionsExt;
        let io =
            |e: std::io::Error| Error(format!("writing certificates to {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        for (name, text, mode) in [
            (CA_FILE, &self.ca, 0o644),
            (CERT_FILE, &self.cert, 0o644),
            (KEY_FILE, &self.key, 0o600),
        ] {
            // a new file then a rename: a process reloading never sees half of one
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io)?;
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
            std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
        }
        Ok(files_in(dir))
    }
}

/// The files of a cert-manager style directory (a mounted `kubernetes.io/tls` Secret).
pub fn files_in(dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: Some(dir.join(CERT_FILE)),
        key: Some(dir.join(KEY_FILE)),
        ca: dir.join(CA_FILE),
    }
}

/// A random bearer token: 32 bytes from the system's secure generator, hex encoded.
pub fn token() -> Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error("no secure random numbers available".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
