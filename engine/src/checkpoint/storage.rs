//! Object storage for checkpoints and savepoints: a local directory (the default) or S3.
//!
//! [`Storage`] is a directory-like view (a store plus a prefix) with blocking methods, so subtask
//! threads and the checkpoint coordinator can call it directly; the calls run on a small shared
//! async runtime. Locations are `/`-separated paths relative to the view.
//!
//! A location is given as a path (`/var/lib/freshet/checkpoints`, `checkpoints`) or a URL
//! (`file:///...`, `s3://bucket/prefix`). For S3, credentials, region and endpoint come from the
//! standard `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`), overridden by [`S3Options`].
//! [`Storage::put_if_absent`] is a conditional write (`If-None-Match: *` on S3, a hard link on a
//! local disk): of two writers of the same location, exactly one succeeds.
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::{EngineError, Result};

/// S3 settings given in a job (each overrides the matching `AWS_*` variable). Its `Debug`
/// output leaves the credentials out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible server, e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let given = |v: &Option<String>| if v.is_some() { "(given)" } else { "(none)" };
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &given(&self.access_key_id))
            .field("secret_access_key", &given(&self.secret_access_key))
            .finish()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("freshet-storage")
            .enable_all()
            .build()
            .expect("starting the storage runtime")
    })
}

/// Runs `fut` on the storage runtime and waits for it. A thread that is itself driving an async
/// runtime (an HTTP or gRPC handler) cannot wait with `block_on` (tokio refuses with a panic), so
/// from such a thread the wait happens on a short-lived thread of its own.
fn block_on<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime().block_on(fut);
    }
    std::thread::scope(|s| {
        s.spawn(|| runtime().block_on(fut))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The length and checksum ([`super::checksum`]) of a local file, read in pieces.
fn checksum_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, format!("{:016x}", hasher.digest())))
}

/// Bytes of a part of an upload to S3 (which wants at least 5 MiB for all parts but the last),
/// and the size above which a file goes up in parts.
pub const UPLOAD_PART: usize = 8 << 20;

/// Why moving a file to or from the store failed: the local file, or the store.
enum Failed {
    Local(std::io::Error),
    Store(object_store::Error),
}

fn err(context: impl std::fmt::Display, e: impl std::fmt::Display) -> EngineError {
    EngineError::Storage(format!("{context}: {e}"))
}

/// A directory-like view of an object store.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    /// The directory the store keeps its objects in, when it is a local one.
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Storage {
    /// Opens `location`: a URL (`s3://bucket/prefix`, `file:///dir`) or a path, resolved against
    /// `base` when relative.
    pub fn open(location: &str, base: &Path, s3: &S3Options) -> Result<Storage> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(EngineError::Storage(format!(
                    "{location}: an S3 location needs a bucket: s3://BUCKET/PREFIX"
                )));
            }
            let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if let Some(e) = s3
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            {
                b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            if let Some(k) = &s3.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                b = b.with_secret_access_key(k);
            }
            // the HTTP client's TLS takes the process's crypto provider: ring, as everywhere
            // else (an error only says one is installed already)
            let _ = rustls::crypto::ring::default_provider().install_default();
            let store = b.build().map_err(|e| err(location, e))?;
            return Ok(Storage {
                store: Arc::new(store),
                prefix: prefix.trim_matches('/').to_string(),
                url: location.trim_end_matches('/').to_string(),
                local_root: None,
            });
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        let dir: PathBuf = if Path::new(path).is_absolute() {
            PathBuf::from(path)
        } else {
            base.join(path)
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| EngineError::io(format!("resolving {}", dir.display()), e))?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| err(dir.display(), e))?
            .with_automatic_cleanup(true);
        Ok(Storage {
            store: Arc::new(store),
            prefix: String::new(),
            url: dir.display().to_string(),
            local_root: Some(dir),
        })
    }

    /// The view of the sub-directory `dir`.
    pub fn child(&self, dir: &str) -> Storage {
        let dir = dir.trim_matches('/');
        Storage {
            store: self.store.clone(),
            prefix: self.join(dir),
            url: format!("{}/{dir}", self.url),
            local_root: self.local_root.clone(),
        }
    }

    /// Where the view points, as a path or URL a user can pass back to [`Storage::open`].
    pub fn url(&self) -> &str {
        &self.url
    }

    fn join(&self, rel: &str) -> String {
        let rel = rel.trim_matches('/');
        match (self.prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{rel}", self.prefix),
        }
    }

    fn path(&self, rel: &str) -> ObjectPath {
        ObjectPath::from(self.join(rel))
    }

    /// Writes `data` at `rel`, replacing what was there.
    pub fn put(&self, rel: &str, data: Bytes) -> Result<()> {
        let p = self.path(rel);
        block_on(self.store.put(&p, PutPayload::from(data)))
            .map_err(|e| err(format!("writing {}/{rel}", self.url), e))?;
        Ok(())
    }

    /// Writes `data` at `rel` only if nothing is there; false if something was.
    pub fn put_if_absent(&self, rel: &str, data: Bytes) -> Result<bool> {
        let p = self.path(rel);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match block_on(self.store.put_opts(&p, PutPayload::from(data), opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(err(format!("writing {}/{rel}", self.url), e)),
        }
    }

    /// Uploads the local file `file` to `rel`; returns its size and
    /// [`checksum`](super::checksum). The file is never held in memory whole: into a local
    /// directory it is hard-linked (files a snapshot uploads never change once written) or,
    /// across file systems, copied by the kernel, under a temporary name renamed into place;
    /// to S3 a file larger than one part goes up in parts of [`UPLOAD_PART`], at most two in
    /// flight.
    pub fn put_file(&self, rel: &str, file: &Path) -> Result<(u64, String)> {
        let reading = |e| EngineError::io(format!("reading {}", file.display()), e);
        if let Some(root) = &self.local_root {
            let (len, sum) = checksum_file(file).map_err(reading)?;
            let dest = root.join(self.join(rel));
            let writing = |e| EngineError::io(format!("writing {}", dest.display()), e);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(writing)?;
            }
            // unique to this call: two checkpoints may upload the same file at once
            static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let tmp = dest.with_file_name(format!(
                ".{}.{}-{}.tmp",
                dest.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id(),
                CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(file, &tmp).is_err() {
                std::fs::copy(file, &tmp).map_err(writing)?;
            }
            if let Err(e) = std::fs::rename(&tmp, &dest) {
                let _ = std::fs::remove_file(&tmp);
                return Err(writing(e));
            }
            return Ok((len, sum));
        }
        let len = std::fs::metadata(file).map_err(reading)?.len();
        if len <= UPLOAD_PART as u64 {
            let data = std::fs::read(file).map_err(reading)?;
            let sum = super::checksum(&data);
            self.put(rel, Bytes::from(data))?;
            return Ok((len, sum));
        }
        let mut f = std::fs::File::open(file).map_err(reading)?;
        block_on(self.put_parts(&self.path(rel), &mut f)).map_err(|e| match e {
            Failed::Local(e) => reading(e),
            Failed::Store(e) => err(format!("writing {}/{rel}", self.url), e),
        })
    }

    /// Uploads what `f` holds to `p` in parts of [`UPLOAD_PART`]; returns its length and
    /// [`checksum`](super::checksum). A failure abandons the parts sent.
    async fn put_parts(
        &self,
        p: &ObjectPath,
        f: &mut std::fs::File,
    ) -> std::result::Result<(u64, String), Failed> {
        use std::io::Read;
        let upload = self.store.put_multipart(p).await.map_err(Failed::Store)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART);
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(Failed::Local(e));
                }
            };
            hasher.update(&buf[..n]);
            len += n as u64;
            if let Err(e) = w.wait_for_capacity(2).await {
                let _ = w.abort().await;
                return Err(Failed::Store(e));
            }
            w.write(&buf[..n]);
        }
        w.finish().await.map_err(Failed::Store)?;
        Ok((len, format!("{:016x}", hasher.digest())))
    }

    /// Reads `rel`; `None` if it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Bytes>> {
        let p = self.path(rel);
        block_on(async {
            match self.store.get(&p).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| err(format!("reading {}/{rel}", self.url), e))
    }

    /// Reads `rel`, which must exist and, where they are given, have the recorded size and
    /// [`checksum`](super::checksum): a snapshot file that does not is corrupt
    /// ([`EngineError::Corrupt`]); reading it again cannot help, an older snapshot may.
    pub fn get_verified(&self, rel: &str, size: u64, sum: Option<&str>) -> Result<Bytes> {
        let data = self.get(rel)?.ok_or_else(|| EngineError::Corrupt {
            location: format!("{}/{rel}", self.url),
            what: "it does not exist".into(),
        })?;
        self.verify(
            rel,
            data.len() as u64,
            size,
            sum.map(|s| (s, super::checksum(&data))),
        )?;
        Ok(data)
    }

    /// Checks an object's size and, when the snapshot recorded one, its checksum (`(recorded,
    /// actual)`).
    fn verify(&self, rel: &str, len: u64, size: u64, sums: Option<(&str, String)>) -> Result<()> {
        let corrupt = |what: String| EngineError::Corrupt {
            location: format!("{}/{rel}", self.url),
            what,
        };
        if len != size {
            return Err(corrupt(format!(
                "it has {len} bytes, the snapshot recorded {size}"
            )));
        }
        if let Some((expected, actual)) = sums
            && actual != expected
        {
            return Err(corrupt(format!(
                "its checksum is {actual}, the snapshot recorded {expected}"
            )));
        }
        Ok(())
    }

    /// Downloads the snapshot file `f` into the local file `file` a piece at a time, verifying
    /// it as [`Storage::get_verified`] does (a file that fails is removed). From a local
    /// directory an SST file is verified where it is
    /// and hard-linked instead of copied: SST files never change once written, so a snapshot and
    /// the instance restored from it can share them. Where no link can be made (another file
    /// system), the file is copied by the kernel.
    pub fn get_file(&self, f: &super::FileRef, file: &Path) -> Result<()> {
        if f.name.ends_with(".sst")
            && let Some(root) = &self.local_root
        {
            let src = root.join(self.join(&f.path));
            if let Ok((len, sum)) = checksum_file(&src) {
                let sums = f.checksum.as_deref().map(|s| (s, sum));
                self.verify(&f.path, len, f.size, sums)?;
                if std::fs::hard_link(&src, file).is_ok() || std::fs::copy(&src, file).is_ok() {
                    return Ok(());
                }
            }
        }
        let writing = |e| EngineError::io(format!("writing {}", file.display()), e);
        let mut out = std::fs::File::create(file).map_err(writing)?;
        let p = self.path(&f.path);
        let got = block_on(async {
            use std::io::Write;
            let mut stream = match self.store.get(&p).await {
                Ok(r) => r.into_stream(),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(Failed::Store(e)),
            };
            let mut hasher = xxhash_rust::xxh3::Xxh3::new();
            let mut len = 0u64;
            while let Some(piece) = stream.try_next().await.map_err(Failed::Store)? {
                hasher.update(&piece);
                len += piece.len() as u64;
                out.write_all(&piece).map_err(Failed::Local)?;
            }
            Ok(Some((len, format!("{:016x}", hasher.digest()))))
        });
        let checked = match got {
            Ok(Some((len, sum))) => {
                let sums = f.checksum.as_deref().map(|s| (s, sum));
                self.verify(&f.path, len, f.size, sums)
            }
            Ok(None) => Err(EngineError::Corrupt {
                location: format!("{}/{}", self.url, f.path),
                what: "it does not exist".into(),
            }),
            Err(Failed::Local(e)) => Err(writing(e)),
            Err(Failed::Store(e)) => Err(err(format!("reading {}/{}", self.url, f.path), e)),
        };
        if checked.is_err() {
            let _ = std::fs::remove_file(file);
        }
        checked
    }

    /// Every object under `rel`, as paths relative to this view.
    pub fn list(&self, rel: &str) -> Result<Vec<String>> {
        Ok(self.list_sized(rel)?.into_iter().map(|(p, _)| p).collect())
    }

    /// Every object under `rel` with its size, as paths relative to this view, sorted.
    pub fn list_sized(&self, rel: &str) -> Result<Vec<(String, u64)>> {
        let p = self.path(rel);
        let items: Vec<_> = block_on(self.store.list(Some(&p)).try_collect())
            .map_err(|e| err(format!("listing {}/{rel}", self.url), e))?;
        let base = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out: Vec<(String, u64)> = items
            .into_iter()
            .map(|m| {
                let s = m.location.to_string();
                (s.strip_prefix(&base).unwrap_or(&s).to_string(), m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes `rel`; deleting what does not exist is not an error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let p = self.path(rel);
        match block_on(self.store.delete(&p)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(err(format!("deleting {}/{rel}", self.url), e)),
        }
    }

    /// Deletes everything under `rel`.
    pub fn delete_dir(&self, rel: &str) -> Result<()> {
        for item in self.list(rel)? {
            self.delete(&item)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{FileRef, checksum};
    use std::os::unix::fs::MetadataExt;

    /// Into a local directory a file goes as a hard link (no copy, nothing held in memory),
    /// replacing what a failed attempt left there, and comes back verified.
    #[test]
    fn a_local_upload_links_the_file_and_a_download_verifies_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open("store", dir.path(), &S3Options::default()).unwrap();
        let file = dir.path().join("000042.sst");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&file, &data).unwrap();
        let dest = dir.path().join("store/shared/op/000042.sst");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, b"left by an attempt that failed").unwrap();
        let (len, sum) = store.put_file("shared/op/000042.sst", &file).unwrap();
        assert_eq!(
            (len, sum.as_str()),
            (data.len() as u64, checksum(&data).as_str())
        );
        assert_eq!(
            std::fs::metadata(&dest).unwrap().ino(),
            std::fs::metadata(&file).unwrap().ino(),
            "linked, not copied"
        );
        let f = FileRef {
            name: "000042.sst".into(),
            path: "shared/op/000042.sst".into(),
            size: len,
            checksum: Some(sum),
        };
        let back = dir.path().join("back.sst");
        store.get_file(&f, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        // a file whose checksum is not the recorded one is refused as corrupt
        let wrong = FileRef {
            checksum: Some("0000000000000000".into()),
            ..f
        };
        let err = store
            .get_file(&wrong, &dir.path().join("bad.sst"))
            .unwrap_err();
        assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");
        assert!(!dir.path().join("bad.sst").exists());
    }
}
