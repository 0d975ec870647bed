//! Wall-clock jumps on every process of a cluster (an NTP step, a resumed virtual machine, a
//! wrong manual setting): hours forward on the standby JobManager, back on the leader, and
//! different jumps on each TaskManager, in the middle of a checkpointed job. The lease and the
//! heartbeats are measured on monotonic clocks, so nothing may change: the standby does not
//! take over, the leader keeps its epoch, checkpoints keep completing. Then the leader is
//! killed; the standby, its clock two hours ahead, takes over, resumes the job from its latest
//! checkpoint, and the output equals the reference model's.
//!
//! The jumps are made with libfaketime (`LD_PRELOAD`, Debian's `libfaketime`, which `.ci/run`
//! installs): each process reads its offset from a file of its own, re-read on every call, and
//! only the wall clock (`CLOCK_REALTIME`) moves, as in the real events; the monotonic clock
//! stays true (`FAKETIME_DONT_FAKE_MONOTONIC`).
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Proc, check_output, free_port, submit, wait_until_ended};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// One process's wall clock: an offset in a file.
struct Clock(PathBuf);

impl Clock {
    fn new(dir: &Path, name: &str) -> Clock {
        let c = Clock(dir.join(format!("clock-{name}")));
        c.set("+0");
        c
    }

    /// Moves the wall clock to `offset` from the true time (`+2h`, `-45m`, `+1d`).
    fn set(&self, offset: &str) {
        let tmp = self.0.with_extension("new");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", LIBFAKETIME.into()),
            ("FAKETIME_TIMESTAMP_FILE", self.0.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }

    fn start(&self, args: &[String]) -> Proc {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Proc::start_env(args, &env)
    }
}

fn completed(p: &Proc) -> usize {
    p.log().matches("checkpoint completed").count()
}

#[test]
fn wall_clock_jumps_neither_move_the_lease_nor_change_the_output() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: apt-get install libfaketime (.ci/run does)"
    );
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let ha = work.path().join("ha");
    let state = work.path().join("state");
    let address = format!("127.0.0.1:{}", free_port());
    let clocks: Vec<Clock> = ["leader", "standby", "tm-0", "tm-1", "tm-2"]
        .iter()
        .map(|n| Clock::new(work.path(), n))
        .collect();
    let jm_args: Vec<String> = [
        "jobmanager",
        "--listen",
        &address,
        "--ha-dir",
        &ha.display().to_string(),
        "--lease",
        "2s",
        "--heartbeat-interval",
        "500ms",
        "--heartbeat-timeout",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut leader = clocks[0].start(&jm_args);
    leader.wait_for("JobManager listening on");
    // the standby listens on the same address once it leads, so the TaskManagers find it
    let standby = clocks[1].start(&jm_args);
    standby.wait_for("another JobManager holds the lease");
    let tms: Vec<Proc> = (0..3)
        .map(|i| {
            let p = clocks[2 + i].start(&[
                "taskmanager".into(),
                "--jobmanager".into(),
                address.clone(),
                "--slots".into(),
                "2".into(),
                "--id".into(),
                format!("tm-{i}"),
                "--state-dir".into(),
                state.display().to_string(),
            ]);
            p.wait_for("listening on");
            p
        })
        .collect();
    let id = submit(
        "orders-paid",
        &address,
        &out,
        &work.path().join("checkpoints"),
        14.0,
    );
    leader.wait_for("checkpoint completed");
    let before = completed(&leader);
    for (clock, offset) in clocks.iter().zip(["-1h", "+2h", "+30m", "-45m", "+1d"]) {
        clock.set(offset);
    }
    // two leases and more
    std::thread::sleep(Duration::from_secs(5));
    let logs = |procs: &[&Proc]| {
        procs
            .iter()
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let all = [&leader, &standby, &tms[0], &tms[1], &tms[2]];
    assert!(
        !standby.log().contains("JobManager listening on"),
        "the standby took the lease while the leader renewed it:\n{}",
        logs(&all)
    );
    assert!(
        !leader.log().contains("lost leadership") && !leader.log().contains("TaskManager lost"),
        "a wall-clock jump cost the leader its lease or a TaskManager:\n{}",
        logs(&all)
    );
    let after = completed(&leader);
    assert!(
        after >= before + 2,
        "checkpoints stopped completing after the jump ({before} before, {after} after):\n{}",
        logs(&all)
    );
    assert_eq!(
        common::job_state(&address, &id).map(|s| s.0).as_deref(),
        Some("running"),
        "the job ended before the failover; slow it down"
    );

    // the leader dies; the standby, two hours ahead, takes over and resumes the job
    leader.kill();
    standby.wait_for("JobManager listening on");
    standby.wait_for("resuming");
    // its log's timestamps prove the jump was in effect
    let ahead: Vec<String> = [0, 60]
        .iter()
        .map(|back| {
            (chrono::Utc::now() + chrono::Duration::hours(2) - chrono::Duration::seconds(*back))
                .format("%Y-%m-%dT%H")
                .to_string()
        })
        .collect();
    assert!(
        standby
            .log()
            .lines()
            .any(|l| ahead.iter().any(|a| l.starts_with(a.as_str()))),
        "the standby's wall clock did not move ({ahead:?}):\n{}",
        standby.log()
    );
    let procs: Vec<&Proc> = tms.iter().chain([&standby]).collect();
    let (state_name, _) = wait_until_ended(&address, &id, &procs);
    assert_eq!(state_name, "finished", "{}", logs(&procs));
    assert!(
        standby.log().contains("leader epoch 2"),
        "{}",
        standby.log()
    );
    common::assert_restored_from_checkpoint(&standby, "after the failover");
    check_output("orders-paid", &out, "with wall clocks hours apart");
    let text = logs(&procs) + &leader.log();
    assert!(!text.contains("panicked"), "{text}");
}
