//! Exactly-once recovery: a job is run as a `freshet` process with 100 ms checkpoints, killed
//! with SIGKILL at random moments several times, and restarted each time (it resumes from its
//! latest completed checkpoint). Once it finishes, its committed output must equal the expected
//! output computed independently by `examples/reference.py` (`examples/<name>/expected/`): no
//! record lost, none duplicated. Each case runs with checkpoints in a local directory and in a
//! real S3-compatible server (moto, installed by `.ci/run`, started here on loopback).
//!
//! Also here: checkpoints damaged after the fact (an emptied file, one changed byte) give way
//! to the one before them, and an object store that refuses every request for a while, then
//! answers slowly, neither fails the job nor loses data (a proxy in front of moto); checkpoints
//! failing in a row restart the job; a full state disk fails attempts until space returns, then
//! the job recovers; a snapshot file larger than one upload part goes to S3 in parts and comes
//! back verified.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Rng, S3Server, args, check_output, freshet, with_s3};

/// Runs the example with the job fields `set` overrides, killing it several times at random
/// moments, then lets it finish.
fn kill_and_restart(
    name: &str,
    set: &[&str],
    parallelism: u32,
    s3: Option<&S3Server>,
    rng: &mut Rng,
) {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let checkpoints = match s3 {
        Some(_) => format!("s3://freshet/{name}-{parallelism}"),
        None => work.path().join("checkpoints").display().to_string(),
    };
    let mut a = args(name, parallelism, &out, &checkpoints, 3.0);
    for s in set {
        a.extend(["--set".to_string(), s.to_string()]);
    }
    let context = format!(
        "{name} at parallelism {parallelism} with {} checkpoints",
        if s3.is_some() { "S3" } else { "local" }
    );
    let command = || {
        let mut c = freshet();
        c.args(&a)
            .args(["--listen", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        with_s3(&mut c, s3);
        c
    };
    let mut kills = 0;
    let mut restored = 0;
    // three kills, and up to three more (each later) until a killed run has restored: on a
    // loaded machine a run can be killed before its first checkpoint completes
    for attempt in 0..6u64 {
        if attempt >= 3 && restored > 0 {
            break;
        }
        let mut child = command().spawn().unwrap();
        let later = attempt.saturating_sub(2) * 1000;
        let after = Duration::from_millis(300 + later + rng.below(1500));
        std::thread::sleep(after);
        if child.try_wait().unwrap().is_some() {
            // it finished before the kill: the remaining runs restore and finish at once
            let o = child.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "{context}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            break;
        }
        child.kill().unwrap(); // SIGKILL
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        restored += stderr.contains("restoring from") as u32;
        kills += 1;
    }
    let o = command().output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{context}: final run failed:\n{stderr}");
    restored += stderr.contains("restoring from") as u32;
    eprintln!("{context}: killed {kills} times, {restored} runs restored from a checkpoint");
    assert!(
        kills > 0,
        "{context}: the job ended before the first kill; slow it down"
    );
    assert!(restored > 0, "{context}: no run restored from a checkpoint");
    check_output(name, &out, &context);
    if s3.is_none() {
        check_retention(&work.path().join("checkpoints").join(name), &context);
    }
}

/// At most `retain` (3) completed checkpoints are left, every file they reference exists, and
/// every shared file is referenced by one of them (files of subsumed checkpoints were deleted).
fn check_retention(root: &std::path::Path, context: &str) {
    let mut referenced = std::collections::HashSet::new();
    let mut kept = 0;
    for e in std::fs::read_dir(root).unwrap() {
        let dir = e.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        // a directory without metadata is an unfinished checkpoint whose upload was still
        // running when the job ended; the next start removes it
        if !name.starts_with("chk-") || !dir.join("_metadata").exists() {
            continue;
        }
        kept += 1;
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("_metadata")).unwrap()).unwrap();
        for snaps in m["operators"].as_object().unwrap().values() {
            for snap in snaps.as_array().unwrap() {
                for f in snap["files"].as_array().unwrap() {
                    let path = f["path"].as_str().unwrap().to_string();
                    assert!(
                        root.join(&path).exists(),
                        "{context}: {path} is referenced but missing"
                    );
                    referenced.insert(path);
                }
            }
        }
    }
    assert!(
        (1..=3).contains(&kept),
        "{context}: {kept} checkpoints kept, retain is 3"
    );
    let shared = root.join("shared");
    let mut stack = vec![shared.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().contains('#') {
                // (`name#n` is the local store's temporary file of a write a kill interrupted)
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                assert!(
                    referenced.contains(&rel),
                    "{context}: {rel} is kept but unreferenced"
                );
            }
        }
    }
}

fn cases(name: &str, set: &[&str]) {
    let mut rng = Rng::new();
    for parallelism in [1, 4] {
        kill_and_restart(name, set, parallelism, None, &mut rng);
    }
    let s3 = S3Server::start();
    for parallelism in [1, 4] {
        kill_and_restart(name, set, parallelism, Some(&s3), &mut rng);
    }
}

#[test]
fn windowed_revenue_survives_kills() {
    cases("revenue-per-store", &[]);
}

/// Sliding windows with a count threshold and no deduplication in front: a replayed record
/// would be counted twice.
#[test]
fn sliding_windows_survive_kills() {
    cases("failed-logins", &[]);
}

/// Session windows, with a cache of two keys so their state lives in RocksDB: at the end of
/// the input every session fires by one pass over the table, which a kill may interrupt.
#[test]
fn session_windows_survive_kills() {
    cases("user-sessions", &["state.cache_keys=2"]);
}

#[test]
fn dedup_into_a_table_survives_kills() {
    cases("cdc-dedup", &[]);
}

#[test]
fn interval_join_survives_kills() {
    cases("orders-paid", &[]);
}

/// The completed checkpoints under `root`, oldest first, with their metadata.
fn completed(root: &std::path::Path) -> Vec<(String, serde_json::Value)> {
    let mut out: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chk-") && root.join(n).join("_metadata").exists())
        .map(|n| {
            let m =
                serde_json::from_slice(&std::fs::read(root.join(&n).join("_metadata")).unwrap())
                    .unwrap();
            (n, m)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn referenced_files(m: &serde_json::Value) -> Vec<String> {
    let mut files = Vec::new();
    for snaps in m["operators"].as_object().unwrap().values() {
        for snap in snaps.as_array().unwrap() {
            for f in snap["files"].as_array().unwrap() {
                files.push(f["path"].as_str().unwrap().to_string());
            }
        }
    }
    files
}

/// A job killed once two of its checkpoints hold keyed state, with a file that only the newest
/// checkpoint references picked out for damage.
struct Killed {
    work: tempfile::TempDir,
    a: Vec<String>,
    root: std::path::PathBuf,
    newest: String,
    older: String,
    victim: String,
}

impl Killed {
    fn new(name: &str) -> Killed {
        let mut rng = Rng::new();
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let checkpoints = work.path().join("checkpoints");
        let root = checkpoints.join(name);
        let mut a = args(name, 1, &out, &checkpoints.display().to_string(), 4.0);
        a.extend(["--set".into(), "checkpointing.retain=5".into()]);
        a.extend(["--listen".into(), "off".into()]);
        let mut child = freshet()
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(200 + rng.below(200)));
            let done = std::fs::read_dir(&root).is_ok()
                && completed(&root)
                    .iter()
                    .filter(|(_, m)| referenced_files(m).iter().any(|f| f.ends_with(".sst")))
                    .count()
                    >= 2;
            if done {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no two checkpoints with state"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the job ended too soon"
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let all = completed(&root);
        let (newest, m) = all.last().unwrap().clone();
        let (older, older_m) = all[all.len() - 2].clone();
        // an SST only the newest references, else its own MANIFEST
        let older_files = referenced_files(&older_m);
        let files = referenced_files(&m);
        let victim = files
            .iter()
            .find(|f| f.ends_with(".sst") && !older_files.contains(f))
            .or_else(|| {
                files
                    .iter()
                    .find(|f| f.starts_with(newest.as_str()) && f.contains("/MANIFEST-"))
            })
            .unwrap()
            .clone();
        eprintln!("damaging {victim} of {newest}; {older} is the one before it");
        Killed {
            work,
            a,
            root,
            newest,
            older,
            victim,
        }
    }

    fn command(&self) -> std::process::Command {
        let mut c = freshet();
        c.args(&self.a);
        c
    }

    /// Runs the job again: it must restore from the checkpoint before the damaged one and
    /// finish with exactly the expected output. Returns its stderr.
    fn recovers(&self, name: &str) -> String {
        let o = self.command().env("FRESHET_LOG", "info").output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{stderr}");
        // the first attempt says "restoring from", a restart says where it was deployed from
        let older = self.root.join(&self.older).display().to_string();
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&older)
                    && (l.contains("restoring from") || l.contains("deploying"))),
            "not restored from {}:\n{stderr}",
            self.older
        );
        check_output(
            name,
            &self.work.path().join("out"),
            "after a damaged checkpoint",
        );
        stderr
    }
}

/// A file of the newest checkpoint is emptied after a kill (as a failing disk or a bad copy
/// would leave it). An explicit restore of that checkpoint is refused with the file named and
/// a usable checkpoint proposed; a plain restart verifies the checkpoint, reports it, restores
/// from the one before it, and the output is still exactly the expected one.
#[test]
fn a_damaged_checkpoint_gives_way_to_the_one_before_it() {
    let name = "orders-paid";
    let k = Killed::new(name);
    std::fs::write(k.root.join(&k.victim), b"").unwrap();
    let o = k
        .command()
        .args(["--restore", &k.root.join(&k.newest).display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a damaged checkpoint was restored:\n{stderr}"
    );
    assert!(
        stderr.contains(&k.victim) && stderr.contains("recorded") && stderr.contains(&k.older),
        "the refusal does not name the file and a usable checkpoint:\n{stderr}"
    );
    let stderr = k.recovers(name);
    assert!(
        stderr.contains("cannot be restored") && stderr.contains(&k.victim),
        "the damaged checkpoint was not reported:\n{stderr}"
    );
}

/// One byte of a file of the newest checkpoint is changed (its size stays): the checksum finds
/// it while the file is downloaded, the attempt fails, and the restart uses the checkpoint
/// before it; the output is exactly the expected one.
#[test]
fn a_changed_byte_is_found_on_restore_and_the_one_before_is_used() {
    let name = "orders-paid";
    let k = Killed::new(name);
    let path = k.root.join(&k.victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let stderr = k.recovers(name);
    assert!(
        stderr.contains("is corrupt: its checksum") && stderr.contains("restarts will not use it"),
        "the damaged file was not reported:\n{stderr}"
    );
}

/// A TCP proxy in front of the S3 server that can refuse every request with `503 Service
/// Unavailable` or delay every connection, to stand for an object store that fails or slows.
struct FlakyProxy {
    endpoint: String,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// Requests answered with 503.
    refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

const PASS: u8 = 0;
const FAIL: u8 = 1;
const SLOW: u8 = 2;

impl FlakyProxy {
    fn start(upstream: &str) -> FlakyProxy {
        use std::sync::atomic::Ordering;
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, r) = (mode.clone(), refused.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let upstream = upstream.clone();
                let mode = m.load(Ordering::Relaxed);
                let refused = r.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut client = client;
                    if mode == FAIL {
                        let mut buf = [0u8; 4096];
                        let _ = client.read(&mut buf);
                        let _ = client.write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                        refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if mode == SLOW {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                        return;
                    };
                    let (mut c2, mut s2) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut server, mut client) = (server, client);
                    let _ = std::io::copy(&mut server, &mut client);
                    let _ = client.shutdown(std::net::Shutdown::Write);
                    let _ = up.join();
                });
            }
        });
        FlakyProxy {
            endpoint,
            mode,
            refused,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
    }
}

/// orders-paid at parallelism 2 (about 10 s of input), checkpointing every 300 ms into a moto
/// S3 server reached through a [`FlakyProxy`].
struct ProxiedRun {
    s3: S3Server,
    proxy: FlakyProxy,
    out: std::path::PathBuf,
    args: Vec<String>,
    _work: tempfile::TempDir,
}

impl ProxiedRun {
    const NAME: &str = "orders-paid";

    /// Checkpoints go to `s3://freshet/<prefix>`.
    fn new(prefix: &str) -> ProxiedRun {
        let s3 = S3Server::start();
        let proxy = FlakyProxy::start(&s3.endpoint);
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let args = args(Self::NAME, 2, &out, &format!("s3://freshet/{prefix}"), 10.0);
        ProxiedRun {
            s3,
            proxy,
            out,
            args,
            _work: work,
        }
    }

    /// A run of the job with further `--set` overrides; its stderr is piped.
    fn command(&self, sets: &[&str]) -> std::process::Command {
        let mut c = freshet();
        c.args(&self.args)
            .args(["--listen", "off"])
            .args(["--set", "checkpointing.interval=300ms"]);
        for s in sets {
            c.args(["--set", s]);
        }
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        with_s3(&mut c, Some(&self.s3));
        c.env("AWS_ENDPOINT_URL", &self.proxy.endpoint);
        c
    }
}

/// Checkpoints go to S3 through a proxy that refuses every request for 3 s, then delays every
/// connection for 2 s: the job keeps running through it (uploads are retried, a checkpoint that
/// cannot complete is abandoned, never half-used). It is then killed and restarted, and its
/// output is exactly the expected one.
#[test]
fn a_failing_then_slow_object_store_neither_fails_the_job_nor_loses_data() {
    let run = ProxiedRun::new("flaky");
    let (name, proxy, out) = (ProxiedRun::NAME, &run.proxy, &run.out);
    let command = || run.command(&[]);
    let mut child = command().spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    proxy.set(FAIL);
    std::thread::sleep(Duration::from_secs(3));
    proxy.set(SLOW);
    std::thread::sleep(Duration::from_secs(2));
    proxy.set(PASS);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended during or right after the outage: {}",
        {
            let o = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&o.stderr).into_owned()
        }
    );
    child.kill().unwrap();
    let o = child.wait_with_output().unwrap();
    let first = String::from_utf8_lossy(&o.stderr).into_owned();
    let refused = proxy.refused.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        refused > 0,
        "the job sent nothing to the store during the outage"
    );
    eprintln!("{refused} object store requests were refused");
    let o = command().output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{first}\n----\n{stderr}");
    assert!(
        stderr.contains("restoring from s3://freshet/flaky"),
        "the second run did not restore:\n{stderr}"
    );
    check_output(name, out, "after an object store outage");
}

/// Checkpoints that keep failing (the object store refuses every request for 8 s, and a
/// checkpoint times out after 1 s) fail the attempt once more than `tolerable_failures` fail in
/// a row; the restart strategy starts it again, and once the store answers the job restores
/// and finishes with exactly the expected output.
#[test]
fn checkpoints_failing_in_a_row_restart_the_job_which_then_finishes_exactly() {
    let run = ProxiedRun::new("failing");
    let proxy = &run.proxy;
    let child = run
        .command(&[
            "checkpointing.timeout=1s",
            "checkpointing.tolerable_failures=1",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    proxy.set(FAIL);
    std::thread::sleep(Duration::from_secs(8));
    proxy.set(PASS);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 checkpoints failed in a row (checkpointing.tolerable_failures is 1)"),
        "the attempt was not failed for its failing checkpoints:\n{stderr}"
    );
    assert!(
        stderr.contains("attempt failed; restarting"),
        "the job was not restarted:\n{stderr}"
    );
    check_output(
        ProxiedRun::NAME,
        &run.out,
        "after checkpoints failed in a row",
    );
}

/// A small tmpfs mounted for one test (the tests run as root, as `.ci/run` does), unmounted
/// when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The state directory's disk fills up while the job runs: RocksDB fails with "no space", the
/// failure goes to the restart strategy (not a panic, not a final failure), restarts fail while
/// the disk stays full, and once space is freed the job recovers from its checkpoint and its
/// output is exactly the expected one.
#[test]
fn a_full_state_disk_fails_attempts_until_space_returns_then_the_job_recovers() {
    let name = "revenue-per-store";
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let disk = SmallDisk::mount(&work.path().join("state"), "32m");
    let checkpoints = work.path().join("checkpoints").display().to_string();
    let mut a = args(name, 2, &out, &checkpoints, 8.0);
    for set in [
        format!("state.local_dir={}", disk.0.display()),
        "checkpointing.interval=300ms".into(),
        "restart={strategy: fixed-delay, attempts: 1000, delay: 300ms}".into(),
    ] {
        a.extend(["--set".into(), set]);
    }
    let mut child = freshet()
        .args(&a)
        .args(["--listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let filler = disk.fill();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended while the disk was full"
    );
    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("No space left on device") && stderr.contains("restarting"),
        "the full disk was not met (or not restarted from):\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    check_output(name, &out, "after the state disk was full");
}

/// A snapshot file larger than one part goes to the S3 server in parts (never held in memory
/// whole) and comes back byte for byte, verified as it streams in; a download whose checksum
/// is not the recorded one is refused as corrupt and leaves no file behind.
#[test]
fn a_large_snapshot_file_goes_to_s3_in_parts_and_comes_back_verified() {
    use freshet_engine::checkpoint::storage::UPLOAD_PART;
    use freshet_engine::checkpoint::{FileRef, S3Options, Storage, checksum};
    let s3 = S3Server::start();
    let opts = S3Options {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    };
    let store = Storage::open("s3://freshet/parts", Path::new("."), &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("000007.sst");
    // two and a half parts
    let data: Vec<u8> = (0..(UPLOAD_PART * 5 / 2) as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let (len, sum) = store.put_file("shared/op/000007.sst", &file).unwrap();
    assert_eq!(len, data.len() as u64);
    assert_eq!(sum, checksum(&data));
    let listed = store.list_sized("shared").unwrap();
    assert_eq!(listed, vec![("shared/op/000007.sst".to_string(), len)]);
    // S3 gives an object uploaded in N parts the ETag "<md5 of the parts' md5s>-N"
    let etag = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import urllib.request as u; print(u.urlopen(u.Request('{}/freshet/parts/shared/op/000007.sst', method='HEAD')).headers['ETag'])",
                s3.endpoint
            ),
        ])
        .output()
        .unwrap();
    let etag = String::from_utf8_lossy(&etag.stdout);
    assert!(etag.trim().trim_matches('"').ends_with("-3"), "ETag {etag}");
    let f = FileRef {
        name: "000007.sst".into(),
        path: "shared/op/000007.sst".into(),
        size: len,
        checksum: Some(sum),
    };
    let back = dir.path().join("back.sst");
    store.get_file(&f, &back).unwrap();
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the bytes came back changed"
    );
    let wrong = FileRef {
        checksum: Some("0123456789abcdef".into()),
        ..f
    };
    let bad = dir.path().join("bad.sst");
    let err = store.get_file(&wrong, &bad).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(
        !bad.exists(),
        "a file that failed its check was left behind"
    );
}
