//! `freshet`: run a job locally, check it, explain its plan, benchmark the engine.
mod bench;
mod run;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    /// Print the JSON Schema of job files.
    Schema,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FRESHET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
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
        } => run::run(&job, &overrides(set, parallelism), taskmanagers),
        Command::Validate { job, set } => run::validate(&job, &set),
        Command::Explain {
            job,
            set,
            parallelism,
        } => run::explain(&job, &overrides(set, parallelism)),
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&freshet_job::schema())?);
            Ok(0)
        }
        Command::Bench { which } => bench::run(which),
    }
}
