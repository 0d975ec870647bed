//! Chaos: one JobManager (with a high-availability directory) and three TaskManagers run the
//! windowed revenue example with 1-second checkpoints while processes are SIGKILLed at random
//! every few seconds, 30 times or more: TaskManagers (replaced at once by a new process) and
//! the JobManager (restarted on the same address and directory, taking over the lease). Once
//! the kills stop the job must finish, and its committed output must equal the expected output
//! of the independent reference model. The seed is printed (`FRESHET_TEST_SEED` replays it).
mod common;

use std::time::{Duration, Instant};

use common::{
    Cluster, Rng, args, check_output, job_state, jobmanager, run_submit, taskmanager,
    wait_until_ended,
};

const KILLS: u32 = 30;

#[test]
fn a_windowed_job_survives_thirty_random_kills() {
    let name = "revenue-per-store";
    let mut rng = Rng::new();
    let mut c = Cluster::start(3);
    let mut next_tm = c.tms.len();
    // the input takes 60 s to read undisturbed (its 21 rows a row every 2.9 s), and each
    // restart starts the pace again from the restored position: rows flow while the kills go
    // on (about 3 s apart with the new process started), and the job outlasts them however
    // fast it recovers; restarts come often and quickly
    let id = submit_with_restarts(name, &c, 60.0);
    c.jm.wait_for("checkpoint completed");
    let mut kills = (0, 0); // (TaskManagers, JobManagers)
    let started = Instant::now();
    while kills.0 + kills.1 < KILLS {
        std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
        if job_state(&c.address, &id).is_some_and(|(s, _)| s == "finished") {
            // whatever the reason, what it committed must be exact
            check_output(
                name,
                &c.out,
                &format!("{name} finished after {kills:?} kills"),
            );
            panic!(
                "the job finished after {kills:?} (TaskManager, JobManager) kills, {:?} after \
                 the first checkpoint; give it more input\n{}",
                started.elapsed(),
                c.jm.log()
            );
        }
        if rng.below(5) == 0 {
            c.jm.kill();
            c.jm = jobmanager(&c.address, &c.ha);
            kills.1 += 1;
        } else {
            let victim = rng.below(c.tms.len() as u64) as usize;
            c.tms[victim].kill();
            c.tms[victim] = taskmanager(&c.address, &format!("tm-{next_tm}"), &c.state);
            next_tm += 1;
            kills.0 += 1;
        }
    }
    eprintln!(
        "{} TaskManager and {} JobManager kills in {:?}",
        kills.0,
        kills.1,
        started.elapsed()
    );
    let (state_name, _) = wait_until_ended(&c.address, &id, &c.procs());
    assert_eq!(state_name, "finished", "{}", c.jm.log());
    check_output(name, &c.out, &format!("{name} after {KILLS} random kills"));
}

/// Submits `name` at parallelism 4 (so a job that lost a TaskManager still fits while its
/// replacement starts) with a restart strategy that allows the chaos, its input paced to take
/// `seconds`.
fn submit_with_restarts(name: &str, c: &Cluster, seconds: f64) -> String {
    let mut a = args(
        name,
        4,
        &c.out,
        &c.checkpoints().display().to_string(),
        seconds,
    );
    a[0] = "submit".into();
    for set in [
        "checkpointing.interval=1s",
        "restart={strategy: fixed-delay, attempts: 10000, delay: 200ms}",
    ] {
        a.extend(["--set".into(), set.into()]);
    }
    a.extend(["--jobmanager".into(), c.address.clone()]);
    run_submit(&a)
}
