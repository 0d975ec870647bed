//! `freshet`: run a job locally, run a cluster's JobManager and TaskManagers, submit and manage
//! jobs, check a job, explain its plan, benchmark the engine.
mod bench;
mod client;
mod cluster;
mod health;
mod operator;
mod run;
mod security;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The system allocator, with large blocks on huge pages (see the type).
#[global_allocator]
static ALLOCATOR: freshet_engine::state::heap::Allocator = freshet_engine::state::heap::Allocator;

/// Freshet: event-time stream processing.
#[derive(Parser)]
#[command(name = "freshet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job in this process (a JobManager and TaskManagers on local threads) until its
    /// sources end, or until Ctrl-C for unbounded sources.
    Run {
        /// The job file.
        job: PathBuf,
        /// Override any field of the job: `--set sources.clicks.connector.path=/data/clicks.jsonl`.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// Default parallelism (same as `--set parallelism=N`).
        #[arg(long)]
        parallelism: Option<u32>,
        /// Number of TaskManagers to spread the slots over.
        #[arg(long, default_value_t = 1)]
        taskmanagers: u32,
        /// Run the JobManager and each TaskManager as processes of their own on loopback,
        /// exchanging data over the network (the distributed path, on one machine).
        #[arg(long)]
        processes: bool,
        #[command(flatten)]
        start: StartArgs,
        /// Address of the JobManager's control plane (`freshet savepoint`, `stop`,
        /// `checkpoints`, `list` talk to it); `off` to serve none.
        #[arg(long, default_value = client::DEFAULT_JOBMANAGER)]
        listen: String,
        /// Address of the web UI and the HTTP API (JSON, with `/metrics`); `off` for none.
        #[arg(long, default_value = "127.0.0.1:8081")]
        http: String,
    },
    /// Run a JobManager: accepts jobs and TaskManagers, schedules, checkpoints, restarts.
    Jobmanager(cluster::JobManagerArgs),
    /// Run a TaskManager: offers slots to a JobManager and runs the subtasks it deploys.
    Taskmanager(cluster::TaskManagerArgs),
    /// Submit a job to a running JobManager; prints its id.
    Submit {
        /// The job file (relative paths in it must resolve on the cluster's machines).
        job: PathBuf,
        /// Overrides, as for `run`.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// Default parallelism.
        #[arg(long)]
        parallelism: Option<u32>,
        #[command(flatten)]
        start: StartArgs,
        /// Follow the job until it ends; exit with its outcome.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// Print a job's state and counters per vertex as JSON.
    Status {
        /// Job id or name.
        job: String,
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// Cancel a running job without a savepoint.
    Cancel {
        /// Job id or name.
        job: String,
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// Take a savepoint of a running job; prints its location.
    Savepoint {
        /// Job id or name.
        job: String,
        /// Directory to create the savepoint in (default: the job's
        /// `checkpointing.savepoint_dir`).
        #[arg(long)]
        dir: Option<String>,
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// Stop a running job: with `--savepoint`, after taking one (prints its location).
    Stop {
        /// Job id or name.
        job: String,
        /// Take a savepoint, then stop exactly there.
        #[arg(long)]
        savepoint: bool,
        /// Directory to create the savepoint in.
        #[arg(long, requires = "savepoint")]
        dir: Option<String>,
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// Show a job's checkpoints and savepoints: id, status, timing, full and uploaded size.
    Checkpoints {
        /// Job id or name.
        job: String,
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// List the jobs of a JobManager.
    List {
        #[command(flatten)]
        jobmanager: client::Target,
    },
    /// Check a job file (format, references, expressions, types) without running it.
    Validate {
        /// The job file.
        job: PathBuf,
        /// Overrides, as for `run`.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
    },
    /// Print the planned graph: vertices (operator chains), parallelism, edges and schemas.
    Explain {
        /// The job file.
        job: PathBuf,
        /// Overrides, as for `run`.
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
        /// Default parallelism.
        #[arg(long)]
        parallelism: Option<u32>,
    },
    /// Make a CA, a certificate for a cluster's JobManager and TaskManagers, and a bearer
    /// token (for clusters outside Kubernetes; the operator makes its own).
    Certs(security::CertsArgs),
    /// Print the JSON Schema of job files.
    Schema,
    /// Print the StreamJob CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Run the Kubernetes operator: reconciles StreamJob resources (in a cluster, or with the
    /// kubeconfig of this machine).
    Operator(operator::OperatorArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

/// Where a job starts from.
#[derive(clap::Args)]
struct StartArgs {
    /// Start from this checkpoint (`.../chk-N`) or savepoint directory. Without it, a job
    /// with checkpointing resumes from the latest completed checkpoint in its checkpoint
    /// directory.
    #[arg(long, value_name = "PATH")]
    restore: Option<String>,
    /// Start with empty state even if completed checkpoints exist.
    #[arg(long, conflicts_with = "restore")]
    fresh: bool,
    /// Restore even if the snapshot has state of operators the job no longer has (that
    /// state is dropped).
    #[arg(long)]
    allow_non_restored_state: bool,
}

impl StartArgs {
    fn options(self) -> freshet_jobmanager::SubmitOptions {
        freshet_jobmanager::SubmitOptions {
            restore: self.restore,
            ignore_checkpoints: self.fresh,
            allow_non_restored_state: self.allow_non_restored_state,
            trace: None,
        }
    }
}

static TELEMETRY: std::sync::OnceLock<freshet_telemetry::Telemetry> = std::sync::OnceLock::new();

/// This process's telemetry (started first thing in `main`).
pub fn telemetry() -> &'static freshet_telemetry::Telemetry {
    TELEMETRY.get().expect("telemetry is started in main")
}

/// The service name a command's telemetry reports as.
fn service(command: &Command) -> &'static str {
    match command {
        Command::Run { .. } => "freshet",
        Command::Jobmanager(_) => "freshet-jobmanager",
        Command::Taskmanager(_) => "freshet-taskmanager",
        Command::Operator(_) => "freshet-operator",
        _ => "freshet-cli",
    }
}

fn main() {
    freshet_security::install_crypto_provider();
    let cli = Cli::parse();
    match freshet_telemetry::init(service(&cli.command)) {
        Ok(t) => {
            let _ = TELEMETRY.set(t);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    telemetry().shutdown();
    std::process::exit(code);
}

fn overrides(set: Vec<String>, parallelism: Option<u32>) -> Vec<String> {
    let mut all = set;
    if let Some(p) = parallelism {
        all.push(format!("parallelism={p}"));
    }
    all
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run {
            job,
            set,
            parallelism,
            taskmanagers,
            processes,
            start,
            listen,
            http,
        } => {
            let options = start.options();
            let overrides = overrides(set, parallelism);
            if processes {
                cluster::run_processes(&job, &overrides, taskmanagers, options)
            } else {
                run::run(&job, &overrides, taskmanagers, options, &listen, &http)
            }
        }
        Command::Jobmanager(args) => cluster::jobmanager(args),
        Command::Taskmanager(args) => cluster::taskmanager(args),
        Command::Submit {
            job,
            set,
            parallelism,
            start,
            wait,
            jobmanager,
        } => cluster::submit(
            &jobmanager,
            &job,
            &overrides(set, parallelism),
            start.options(),
            wait,
        ),
        Command::Cancel { job, jobmanager } => client::cancel(&jobmanager, &job),
        Command::Status { job, jobmanager } => client::status(&jobmanager, &job),
        Command::Savepoint {
            job,
            dir,
            jobmanager,
        } => client::savepoint(&jobmanager, &job, dir),
        Command::Stop {
            job,
            savepoint,
            dir,
            jobmanager,
        } => client::stop(&jobmanager, &job, savepoint, dir),
        Command::Checkpoints { job, jobmanager } => client::checkpoints(&jobmanager, &job),
        Command::List { jobmanager } => client::list(&jobmanager),
        Command::Validate { job, set } => run::validate(&job, &set),
        Command::Explain {
            job,
            set,
            parallelism,
        } => run::explain(&job, &overrides(set, parallelism)),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&freshet_connectors::job_format().schema())?
            );
            Ok(0)
        }
        Command::Crd => {
            print!("{}", freshet_crds::crd_yaml());
            Ok(0)
        }
        Command::Operator(args) => operator::run(args),
        Command::Certs(args) => security::certs(args),
        Command::Bench { which } => bench::run(which),
    }
}
