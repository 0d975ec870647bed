//! Freshet's container image, built from `deploy/Dockerfile` with podman, and containers of it.
//!
//! The image is built with `BINARY=prebuilt`: the `freshet` binary of this build (its debug
//! information stripped) and the RocksDB library it links go into the image as they are, on a
//! Debian bookworm base that `testenv/base-image.sh` makes with debootstrap (no registry is
//! reachable here). Containers run with runc on the host's network, as processes of a pod would
//! reach each other on loopback.
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{copy_dir, repo};

/// Limits every container gets: the defaults podman asks for are above what this sandbox may
/// grant (runc then fails with "error setting rlimits").
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=16384:16384",
    "--ulimit",
    "nproc=16384:16384",
];

/// `podman --runtime runc ARGS` (crun fails on these machines' mixed cgroup mounts).
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .expect("running podman (apt-get install podman runc debootstrap)")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image, built once per test binary run (podman reuses the layers below the binary):
/// its name.
pub fn freshet_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = Command::new(repo().join("testenv/base-image.sh"))
            .output()
            .expect("running testenv/base-image.sh");
        assert!(
            out.status.success(),
            "testenv/base-image.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let base = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let context = tempfile::tempdir().unwrap();
        let binary = context.path().join("freshet");
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(env!("CARGO_BIN_EXE_freshet"))
            .arg(&binary)
            .status()
            .expect("running objcopy");
        assert!(stripped.success(), "objcopy --strip-debug failed");
        copy_dir(&repo().join("examples"), &context.path().join("examples"));
        // the prebuilt RocksDB the binary links, where its run path finds it (target/rocksdb,
        // see scripts/rocksdb-env); empty when this build compiled RocksDB in
        let rocksdb = Path::new(env!("CARGO_BIN_EXE_freshet"))
            .parent()
            .and_then(Path::parent)
            .map(|target| target.join("rocksdb"))
            .filter(|dir| dir.join("librocksdb.so").exists());
        match rocksdb {
            Some(dir) => copy_dir(&dir, &context.path().join("rocksdb")),
            None => std::fs::create_dir(context.path().join("rocksdb")).unwrap(),
        }
        let image = "localhost/freshet:test".to_string();
        let dockerfile = repo().join("deploy/Dockerfile");
        let mut args = vec!["build"];
        args.extend(ULIMITS);
        args.extend([
            "-f",
            dockerfile.to_str().unwrap(),
            "--build-arg",
            "BINARY=prebuilt",
            "--build-arg",
        ]);
        let base_arg = format!("BASE={base}");
        args.extend([
            base_arg.as_str(),
            "-t",
            &image,
            context.path().to_str().unwrap(),
        ]);
        podman_ok(&args);
        // the image this one replaced under the tag
        let _ = podman(&["image", "prune", "-f"]);
        image
    })
}

/// A container of the image, removed when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    /// Starts `freshet ARGS` in a container named `name`, on the host's network, with `shared`
    /// mounted at the same path (the job's storage).
    pub fn run(name: &str, shared: &Path, args: &[&str]) -> Container {
        let _ = podman(&["rm", "-f", name]);
        let mount = format!("{0}:{0}", shared.display());
        let mut a = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "-e",
            "FRESHET_LOG=info",
        ];
        a.extend(ULIMITS);
        a.extend(["-v", &mount, freshet_image()]);
        a.extend(args);
        podman_ok(&a);
        Container { name: name.into() }
    }

    /// What the container printed.
    pub fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until the container printed `what` (at most 60 s).
    pub fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.logs().contains(what) {
            assert!(
                Instant::now() < deadline,
                "{} never printed {what:?}:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `podman kill` (SIGKILL).
    pub fn kill(&self) {
        podman_ok(&["kill", &self.name]);
    }

    /// `podman start` again, as a kubelet restarts a pod's container.
    pub fn start(&self) {
        podman_ok(&["start", &self.name]);
    }

    /// `State.Status` (`running`, `exited`).
    pub fn status(&self) -> String {
        podman_ok(&["inspect", "-f", "{{.State.Status}}", &self.name])
            .trim()
            .to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.name]);
    }
}
