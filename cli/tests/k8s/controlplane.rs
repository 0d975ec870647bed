//! A real Kubernetes control plane for the tests, started the way envtest starts one: etcd,
//! kube-apiserver (client-certificate authentication, RBAC, service-account tokens),
//! kube-controller-manager (garbage collection, Deployments → ReplicaSets → Pods, service
//! accounts) and kube-scheduler, all on loopback. `testenv/build.sh` builds the binaries from
//! the Go module proxy at pinned versions, or finds them in its cache.
//!
//! Stand-ins: there is no kubelet. KWOK (also built by `testenv/build.sh`) keeps one fake node,
//! [`FAKE_NODE`], alive: the scheduler binds pods to it and KWOK reports them running and
//! ready, but no container runs for them. The processes they describe are started by the tests
//! themselves, on loopback, as plain processes or as containers of the Freshet image.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::common::repo;

/// A running control plane and the admin's credentials for it.
pub struct ControlPlane {
    /// Its files: certificates, kubeconfigs, logs, etcd's data.
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The cluster CA, which signed the API server's certificate and the client certificates.
    pub ca: PathBuf,
    /// An admin kubeconfig (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// The running components: name, binary and arguments (to restart it), process.
    procs: Mutex<Vec<Component>>,
}

struct Component {
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    child: Child,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for c in self.procs.get_mut().unwrap().iter_mut() {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The control plane shared by the tests of this binary (each test works in namespaces of its
/// own). Its processes die with the test process.
pub fn shared() -> &'static ControlPlane {
    // a control plane that failed to start is reported to every test, not started again
    static CP: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    let cp = CP.get_or_init(|| {
        // The processes are killed when the thread that started them ends
        // (PR_SET_PDEATHSIG), so they are started on one that lives as long as the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.send(ControlPlane::start()).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().unwrap()
    });
    match cp {
        Ok(cp) => cp,
        Err(e) => panic!("{e}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The directory of the control plane's binaries, built if missing.
fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("FRESHET_TESTENV_BIN") {
        return dir.into();
    }
    let out = Command::new(repo().join("testenv/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running testenv/build.sh");
    assert!(out.status.success(), "testenv/build.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The node KWOK keeps: pods are scheduled onto it and reported running.
pub const FAKE_NODE: &str = "kwok-node-0";

/// What KWOK does to the objects it manages: a node becomes ready, a pod bound to the node
/// starts running with every container ready, a pod being deleted goes.
const KWOK_STAGES: &str = r#"
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: node-ready
spec:
  resourceRef: {apiGroup: v1, kind: Node}
  selector:
    matchExpressions:
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: NotIn
      values: ["True"]
  next:
    statusTemplate: |
      conditions:
      - type: Ready
        status: "True"
        reason: KubeletReady
        message: kept by kwok
        lastHeartbeatTime: {{ Now | Quote }}
        lastTransitionTime: {{ Now | Quote }}
      phase: Running
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-running
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: DoesNotExist
    - key: .status.phase
      operator: In
      values: [Pending]
  next:
    statusTemplate: |
      conditions:
      - type: Initialized
        status: "True"
        lastTransitionTime: {{ Now | Quote }}
      - type: ContainersReady
        status: "True"
        lastTransitionTime: {{ Now | Quote }}
      - type: Ready
        status: "True"
        lastTransitionTime: {{ Now | Quote }}
      containerStatuses:
      {{ range .spec.containers }}
      - name: {{ .name | Quote }}
        image: {{ .image | Quote }}
        ready: true
        started: true
        restartCount: 0
        state:
          running:
            startedAt: {{ Now | Quote }}
      {{ end }}
      phase: Running
      startTime: {{ Now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-deleted
spec:
  resourceRef: {apiGroup: v1, kind: Pod}
  selector:
    matchExpressions:
    - key: .metadata.deletionTimestamp
      operator: Exists
  next:
    delete: true
"#;

/// The KWOK version `testenv/kwok/go.mod` pins (`testenv/build.sh` names the binary with it).
fn kwok_version() -> String {
    let pins = std::fs::read_to_string(repo().join("testenv/kwok/go.mod")).unwrap();
    pins.lines()
        .find_map(|l| l.trim().strip_prefix("sigs.k8s.io/kwok "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("testenv/kwok/go.mod pins sigs.k8s.io/kwok")
        .to_string()
}

/// A Node for KWOK to manage (its annotation), with room for every test's pods.
fn fake_node(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok"
            }
        },
        "status": {
            "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "250"},
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "250"},
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                         "kubeletVersion": "fake", "kubeProxyVersion": "fake",
                         "bootID": "", "machineID": "", "systemUUID": "", "osImage": "",
                         "kernelVersion": "", "containerRuntimeVersion": ""},
            "phase": "Running"
        }
    })
}

/// `kubectl`: `FRESHET_KUBECTL`, `target/tools/bin/kubectl` (installed by `.ci/run`), or the
/// PATH.
pub fn kubectl_binary() -> PathBuf {
    tool("FRESHET_KUBECTL", "kubectl")
}

/// `helm`, found like [`kubectl_binary`].
pub fn helm_binary() -> PathBuf {
    tool("FRESHET_HELM", "helm")
}

fn tool(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let local = repo().join("target/tools/bin").join(name);
    if local.exists() { local } else { name.into() }
}

struct Certs {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Certs {
    fn new() -> Certs {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test cluster CA");
        let key = KeyPair::generate().unwrap();
        Certs {
            ca: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `names` (subject alternative names) with common name `cn` and
    /// organization `org` (Kubernetes reads them as the user and its group); PEM cert and key.
    fn issue(&self, cn: &str, org: Option<&str>, names: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A kubeconfig for `server` trusting `ca`, with `user` (YAML lines under `user:`).
pub fn kubeconfig(path: &Path, server: &str, ca: &Path, user: &str) {
    write(
        path,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n{user}\ncontexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n",
            ca.display()
        ),
    );
}

impl ControlPlane {
    /// A control plane of its own, stopped when dropped; for tests that disturb it (such as
    /// restarting the API server). Must be dropped on the thread that started it or later:
    /// its processes die with that thread.
    pub fn start() -> Result<ControlPlane, String> {
        let bin = binaries();
        // under the target directory: etcd preallocates its write-ahead log, and the shared
        // control plane is never dropped, so its files go with `target/` rather than /tmp
        let dir = tempfile::Builder::new()
            .prefix("k8s-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        let certs = Certs::new();
        let ca = dir.join("ca.crt");
        write(&ca, &certs.ca_pem());
        let (cert, key) = certs.issue(
            "kube-apiserver",
            None,
            &[
                "127.0.0.1",
                "10.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        );
        write(&dir.join("apiserver.crt"), &cert);
        write(&dir.join("apiserver.key"), &key);
        let (cert, key) = certs.issue("admin", Some("system:masters"), &[]);
        write(&dir.join("admin.crt"), &cert);
        write(&dir.join("admin.key"), &key);
        // service-account tokens are signed with this key (ECDSA P-256, PKCS#8); the API
        // server verifies them with its public half
        let sa = KeyPair::generate().unwrap();
        write(&dir.join("sa.key"), &sa.serialize_pem());
        write(&dir.join("sa.pub"), &sa.public_key_pem());

        let etcd_port = free_port();
        let peer_port = free_port();
        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("admin.kubeconfig");
        crate::controlplane::kubeconfig(
            &kubeconfig,
            &server,
            &ca,
            &format!(
                "    client-certificate: {}\n    client-key: {}",
                dir.join("admin.crt").display(),
                dir.join("admin.key").display()
            ),
        );
        let cp = ControlPlane {
            dir: dir.clone(),
            server,
            ca: ca.clone(),
            kubeconfig: kubeconfig.clone(),
            procs: Mutex::new(Vec::new()),
        };
        let p = |f: &str| dir.join(f).display().to_string();
        cp.spawn(
            &bin.join("etcd"),
            "etcd",
            &[
                "--name=test".into(),
                format!("--data-dir={}", p("etcd")),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=test=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        );
        cp.spawn(
            &bin.join("kube-apiserver"),
            "kube-apiserver",
            &[
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".into(),
                // loopback is refused as the address of the `kubernetes` Service's endpoints,
                // which nothing here uses: no endpoint reconciler
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", p("apiserver")),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        );
        cp.wait_ready(&["get", "--raw", "/readyz"], Duration::from_secs(120))?;
        for (name, extra) in [
            (
                "kube-controller-manager",
                vec![
                    format!("--service-account-private-key-file={}", p("sa.key")),
                    format!("--root-ca-file={}", p("ca.crt")),
                    format!("--cert-dir={}", p("controller-manager")),
                    format!("--authentication-kubeconfig={}", kubeconfig.display()),
                    format!("--authorization-kubeconfig={}", kubeconfig.display()),
                ],
            ),
            (
                "kube-scheduler",
                vec![format!("--cert-dir={}", p("scheduler"))],
            ),
        ] {
            let mut args = vec![
                format!("--kubeconfig={}", kubeconfig.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
                "--v=1".into(),
            ];
            args.extend(extra);
            cp.spawn(&bin.join(name), name, &args);
        }
        // the service-account controller has run when `default` exists in a namespace
        cp.wait_ready(
            &["-n", "default", "get", "serviceaccount", "default"],
            Duration::from_secs(60),
        )?;
        // KWOK keeps the fake node alive (its lease renewed) and plays the kubelet for the
        // pods bound to it: they are marked running and ready (no container runs)
        let stages = cp.dir.join("kwok.yaml");
        write(&stages, KWOK_STAGES);
        cp.spawn(
            &bin.join(format!("kwok-{}", kwok_version())),
            "kwok",
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--config={}", stages.display()),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                "--node-lease-duration-seconds=40".into(),
                "--cidr=10.244.0.1/24".into(),
                "--node-ip=10.244.0.1".into(),
                format!("--server-address=127.0.0.1:{}", free_port()),
            ],
        );
        let node = cp.dir.join("node.json");
        write(&node, &fake_node(FAKE_NODE).to_string());
        cp.wait_ready(
            &["apply", "-f", node.to_str().unwrap()],
            Duration::from_secs(30),
        )?;
        cp.wait_ready(
            &[
                "wait",
                "--for=condition=Ready",
                &format!("node/{FAKE_NODE}"),
                "--timeout=5s",
            ],
            Duration::from_secs(60),
        )?;
        Ok(cp)
    }

    fn spawn(&self, binary: &Path, name: &str, args: &[String]) {
        let child = self.launch(binary, name, args);
        self.procs.lock().unwrap().push(Component {
            name: name.into(),
            binary: binary.into(),
            args: args.to_vec(),
            child,
        });
    }

    fn launch(&self, binary: &Path, name: &str, args: &[String]) -> Child {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .unwrap();
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()))
    }

    /// Kills component `name` (SIGKILL), starts it again with the same arguments, and waits
    /// until the API server answers again.
    pub fn restart(&self, name: &str) {
        {
            let mut procs = self.procs.lock().unwrap();
            let c = procs
                .iter_mut()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no component {name}"));
            c.child.kill().unwrap();
            c.child.wait().unwrap();
            c.child = self.launch(&c.binary, &c.name, &c.args);
        }
        self.wait_ready(&["get", "--raw", "/readyz"], Duration::from_secs(120))
            .unwrap();
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_ready(&self, args: &[&str], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl(args);
            if out.status.success() {
                return Ok(());
            }
            for c in self.procs.lock().unwrap().iter_mut() {
                if let Ok(Some(status)) = c.child.try_wait() {
                    return Err(format!(
                        "{} exited ({status}):\n{}",
                        c.name,
                        self.log_tail(&c.name)
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the control plane did not become ready ({}):\n{}\nkube-apiserver:\n{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail("kube-apiserver")
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `kubectl ARGS` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl (run .ci/run to install it)")
    }

    /// `kubectl ARGS` as the admin, which must succeed: its standard output.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `helm ARGS` as the admin, which must succeed: its standard output.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        let out = Command::new(helm_binary())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running helm (run .ci/run to install it)");
        assert!(
            out.status.success(),
            "helm {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}
