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
//! holding it, a member is unbounded. A member that has emitted no watermark yet holds the
//! others at the start of event time plus the drift, as it holds back the job's watermark.
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

use freshet_control::messages::SubtaskStatus;
use freshet_control::{JobId, TaskManagerGateway};
use freshet_engine::checkpoint::SubtaskCommand;
use freshet_plan::{Plan, Recipe};

use crate::splits::{Deliver, Running};

/// How often the bounds are computed again. A group whose members are all ahead moves on by
/// at most its drift per update (per heartbeat for TaskManagers in other processes).
pub const UPDATE: Duration = Duration::from_millis(50);

/// One alignment group of a plan.
#[derive(Debug, Clone, PartialEq)]
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
    sent: Mutex<HashMap<(usize, u32), i64>>,
}

impl Aligner {
    /// The aligner of `plan`'s sources, sending through `send`; `None` if no source names an
    /// alignment group.
    pub fn new(plan: &Plan, send: Deliver) -> Option<Self> {
        let mut groups: Vec<Group> = Vec::new();
        for (v, vertex) in plan.vertices.iter().enumerate() {
            let Some(Recipe::Source { spec, .. }) = vertex
                .nodes
                .first()
                .and_then(|id| plan.nodes.get(*id))
                .map(|n| &n.recipe)
            else {
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
            sent: Mutex::new(HashMap::new()),
        })
    }

    /// Updates the bounds every [`UPDATE`] from a thread of its own, from the counters of
    /// `job`'s subtasks on `taskmanagers`, until the attempt drops `running`.
    pub fn start(
        self,
        job: JobId,
        taskmanagers: Vec<Arc<dyn TaskManagerGateway>>,
        running: &Running,
    ) {
        let running = Arc::downgrade(running);
        let spawned = std::thread::Builder::new()
            .name("watermark-alignment".into())
            .spawn(move || {
                while running.strong_count() > 0 {
                    let statuses: Vec<SubtaskStatus> =
                        taskmanagers.iter().flat_map(|t| t.metrics(&job)).collect();
                    self.update(&statuses);
                    std::thread::sleep(UPDATE);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start watermark alignment: aligned sources will not read past their first batch");
        }
    }

    /// Sends each member whose bound changed its new bound, from the subtasks' latest
    /// counters `statuses` (those of subtasks that ended are absent).
    pub fn update(&self, statuses: &[SubtaskStatus]) {
        let by_subtask: HashMap<(usize, u32), &SubtaskStatus> = statuses
            .iter()
            .map(|s| ((s.vertex, s.subtask), s))
            .collect();
        let mut sent = self.sent.lock();
        for g in &self.groups {
            let holding: Vec<((usize, u32), i64)> = g
                .members
                .iter()
                .filter_map(|m| {
                    let s = by_subtask.get(m)?;
                    (!s.metrics.idle).then_some((*m, s.metrics.watermark))
                })
                .collect();
            for (member, bound) in bounds(&g.members, g.drift, &holding) {
                if sent.get(&member) == Some(&bound) {
                    continue;
                }
                if (self.send)(member.0, member.1, SubtaskCommand::Align(bound)) {
                    sent.insert(member, bound);
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
