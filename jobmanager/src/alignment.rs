//! Watermark alignment. Sources that name the same alignment group (`watermark.alignment` in
//! the job) read on only while their watermark is at most the group's drift ahead of the
//! slowest *other* source subtask of the group: a source catching up on a backlog, or simply
//! faster, would otherwise fill the state of the joins and windows downstream with rows that
//! wait for the slower one's watermark.
//!
//! A thread of the attempt reads the subtasks' latest counters every [`UPDATE`] (live for
//! TaskManagers in the JobManager's process, as of their last heartbeat, every second, for the
//! others) and sends each member of a group the highest watermark it may have emitted and
//! still read on (`SubtaskCommand::Align`), when that changed. A member reads one batch before
//! its first bound arrives. A subtask bounds itself by the others alone,
//! so the slowest one is never held back by its own watermark; members that are idle (every
//! split past its idle timeout) or have ended hold no one back, and with no other member
//! holding it, a member is unbounded. A member that has not reported yet, or has emitted no
//! watermark yet, holds the others at the start of event time plus the drift, as it holds back
//! the job's watermark.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use freshet_control::messages::SubtaskStatus;
use freshet_control::{JobId, TaskManagerGateway};
use freshet_engine::checkpoint::SubtaskCommand;
use freshet_plan::{Plan, Recipe};

use crate::splits::{Deliver, Running};

/// How often the bounds are computed again. A group whose members are all ahead moves on by
/// at most its drift per update (per heartbeat for TaskManagers in other processes).
pub const UPDATE: Duration = Duration::from_millis(50);

/// One alignment group of a plan.
#[derive(Debug)]
struct Group {
    name: String,
    /// Milliseconds of event time a member may run ahead of the slowest other.
    drift: i64,
    /// Its source subtasks, as (vertex, subtask).
    members: Vec<(usize, u32)>,
}

/// The alignment of one attempt's sources.
pub struct Aligner {
    groups: Vec<Group>,
    send: Deliver,
    /// The bound each member was last sent.
    sent: HashMap<(usize, u32), i64>,
    /// Members that have reported counters: one absent since has ended.
    seen: HashSet<(usize, u32)>,
}

impl Aligner {
    /// The aligner of `plan`'s sources, sending through `send`; `None` if no source names an
    /// alignment group.
    pub fn new(plan: &Plan, send: Deliver) -> Option<Self> {
        let mut groups: Vec<Group> = Vec::new();
        for (v, vertex) in plan.vertices.iter().enumerate() {
            let Some(Recipe::Source { spec, .. }) = plan.head_recipe(v) else {
                continue;
            };
            let Some(a) = &spec.watermark.alignment else {
                continue;
            };
            let drift = a.max_drift.millis();
            let members = (0..vertex.parallelism).map(|i| (v, i));
            match groups.iter_mut().find(|g| g.name == a.group) {
                // sources of one group may give different drifts: the smallest holds
                Some(g) => {
                    g.drift = g.drift.min(drift);
                    g.members.extend(members);
                }
                None => groups.push(Group {
                    name: a.group.clone(),
                    drift,
                    members: members.collect(),
                }),
            }
        }
        (!groups.is_empty()).then(|| Aligner {
            groups,
            send,
            sent: HashMap::new(),
            seen: HashSet::new(),
        })
    }

    /// Updates the bounds every [`UPDATE`] from a thread of its own, from the counters of
    /// `job`'s subtasks on `taskmanagers`, until the attempt drops `running`. Without that
    /// thread the aligned sources would wait after their first batch: an error here must keep
    /// the attempt from starting.
    pub fn start(
        mut self,
        job: JobId,
        taskmanagers: Vec<Arc<dyn TaskManagerGateway>>,
        running: &Running,
    ) -> std::io::Result<()> {
        let running = Arc::downgrade(running);
        if freshet_engine::failpoint::fails("spawn-watermark-alignment") {
            return Err(std::io::Error::other("failpoint spawn-watermark-alignment"));
        }
        std::thread::Builder::new()
            .name("watermark-alignment".into())
            .spawn(move || {
                while running.strong_count() > 0 {
                    let statuses: Vec<SubtaskStatus> =
                        taskmanagers.iter().flat_map(|t| t.metrics(&job)).collect();
                    self.update(&statuses);
                    std::thread::sleep(UPDATE);
                }
            })
            .map(drop)
    }

    /// Sends each member whose bound changed its new bound, from the subtasks' latest
    /// counters `statuses`. A member not reported yet (still starting) holds the others at the
    /// start of event time; one reported before and absent now has ended.
    pub fn update(&mut self, statuses: &[SubtaskStatus]) {
        let by_subtask: HashMap<(usize, u32), &SubtaskStatus> = statuses
            .iter()
            .map(|s| ((s.vertex, s.subtask), s))
            .collect();
        for g in &self.groups {
            let mut holding: Vec<((usize, u32), i64)> = Vec::new();
            for m in &g.members {
                match by_subtask.get(m) {
                    Some(s) => {
                        self.seen.insert(*m);
                        if !s.metrics.idle {
                            holding.push((*m, s.metrics.watermark));
                        }
                    }
                    None if !self.seen.contains(m) => holding.push((*m, i64::MIN)),
                    None => {}
                }
            }
            for (member, bound) in bounds(&g.members, g.drift, &holding) {
                if self.sent.get(&member) == Some(&bound) {
                    continue;
                }
                if (self.send)(member.0, member.1, SubtaskCommand::Align(bound)) {
                    self.sent.insert(member, bound);
                }
            }
        }
    }
}

/// Each member's bound: the lowest watermark of the *other* members in `holding` (those that
/// hold the group back, with their watermarks) plus `drift`; `i64::MAX` when no other member
/// holds it.
fn bounds(
    members: &[(usize, u32)],
    drift: i64,
    holding: &[((usize, u32), i64)],
) -> Vec<((usize, u32), i64)> {
    // the two lowest watermarks: a member's bound comes from the lowest one that is not its own
    let mut lowest: [Option<((usize, u32), i64)>; 2] = [None, None];
    for &(m, wm) in holding {
        match lowest {
            [None, _] => lowest[0] = Some((m, wm)),
            [Some((_, a)), _] if wm < a => lowest = [Some((m, wm)), lowest[0]],
            [Some(_), None] => lowest[1] = Some((m, wm)),
            [Some(_), Some((_, b))] if wm < b => lowest[1] = Some((m, wm)),
            _ => {}
        }
    }
    members
        .iter()
        .map(|&m| {
            let other = lowest.iter().flatten().find(|(o, _)| *o != m);
            let bound = other.map_or(i64::MAX, |(_, wm)| wm.saturating_add(drift));
            (m, bound)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_engine::metrics::MetricsSnapshot;

    fn status(vertex: usize, watermark: i64, idle: bool) -> SubtaskStatus {
        SubtaskStatus {
            vertex,
            subtask: 0,
            metrics: MetricsSnapshot {
                watermark,
                idle,
                ..Default::default()
            },
        }
    }

    /// What the aligner of three one-subtask sources sends, round by round.
    #[test]
    fn bounds_follow_the_members_that_hold_the_group() {
        let sent: Arc<parking_lot::Mutex<Vec<(usize, i64)>>> = Arc::default();
        let log = sent.clone();
        let mut a = Aligner {
            groups: vec![Group {
                name: "g".into(),
                drift: 100,
                members: vec![(0, 0), (1, 0), (2, 0)],
            }],
            send: Arc::new(move |v, _, cmd| match cmd {
                SubtaskCommand::Align(b) => {
                    log.lock().push((v, b));
                    true
                }
                _ => false,
            }),
            sent: HashMap::new(),
            seen: HashSet::new(),
        };
        let mut round = |statuses: &[SubtaskStatus]| {
            a.update(statuses);
            let mut out = std::mem::take(&mut *sent.lock());
            out.sort();
            out
        };
        // source 2 has not reported yet: it holds the others at the start of event time
        let start = i64::MIN + 100;
        assert_eq!(
            round(&[status(0, 1_000, false), status(1, 2_000, false)]),
            vec![(0, start), (1, start), (2, 1_100)]
        );
        // nothing changed: nothing is sent again
        assert_eq!(
            round(&[status(0, 1_000, false), status(1, 2_000, false)]),
            vec![]
        );
        // source 2 reports; then it goes idle and holds no one back
        assert_eq!(
            round(&[
                status(0, 1_000, false),
                status(1, 2_000, false),
                status(2, 5_000, false)
            ]),
            vec![(0, 2_100), (1, 1_100)]
        );
        assert_eq!(
            round(&[
                status(0, 1_500, false),
                status(1, 2_000, false),
                status(2, 5_000, true)
            ]),
            vec![(1, 1_600), (2, 1_600)]
        );
        // source 0 ended (reported before, absent now): the others are bounded by each other
        assert_eq!(
            round(&[status(1, 2_000, false), status(2, 5_000, false)]),
            vec![(1, 5_100), (2, 2_100)]
        );
    }

    #[test]
    fn a_member_is_bounded_by_the_slowest_other_one() {
        let members = [(0, 0), (0, 1), (1, 0)];
        let holding = [((0, 0), 5_000), ((0, 1), 1_000), ((1, 0), 3_000)];
        assert_eq!(
            bounds(&members, 10_000, &holding),
            vec![((0, 0), 11_000), ((0, 1), 13_000), ((1, 0), 11_000)],
            "the slowest is bounded by the next slowest, not by itself"
        );
        // an idle or ended member holds no one back; alone, a member is unbounded
        let holding = [((0, 0), 5_000), ((1, 0), 3_000)];
        assert_eq!(
            bounds(&members, 10_000, &holding),
            vec![((0, 0), 13_000), ((0, 1), 13_000), ((1, 0), 15_000)]
        );
        assert_eq!(
            bounds(&members, 10_000, &[((1, 0), 3_000)]),
            vec![((0, 0), 13_000), ((0, 1), 13_000), ((1, 0), i64::MAX)]
        );
        assert_eq!(bounds(&members, 10_000, &[])[0], ((0, 0), i64::MAX));
        // a member with no watermark yet holds the others near the start of event time
        let holding = [((0, 0), 5_000), ((0, 1), i64::MIN)];
        assert_eq!(
            bounds(&members, 10_000, &holding),
            vec![
                ((0, 0), i64::MIN + 10_000),
                ((0, 1), 15_000),
                ((1, 0), i64::MIN + 10_000)
            ]
        );
        // equal watermarks: each is bounded by the other's
        let holding = [((0, 0), 7), ((0, 1), 7)];
        assert_eq!(bounds(&members[..2], 1, &holding)[1], ((0, 1), 8));
        // a finished member's watermark is the end of time: no overflow
        let holding = [((0, 0), i64::MAX), ((0, 1), i64::MAX)];
        assert_eq!(bounds(&members[..2], 1, &holding)[0], ((0, 0), i64::MAX));
    }
}
