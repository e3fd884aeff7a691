//! Who is in the cluster now: which nodes may write, and what this node is.
//!
//! Every node tells its peers, each heartbeat, a [`Report`]: the peers it hears from, the
//! members it counts, and whether it is caught up. From its own row and the fresh reports a
//! node computes a [`View`]: the *partition* — the largest set of nodes that all hear each
//! other (ties: the set with the lowest node ids), if it is a majority of the configured
//! nodes — and the *members*: the nodes of the partition that are caught up. Only members
//! write; every transaction is prepared on exactly the members its coordinator counted, and a
//! peer that counts other members votes no, so two different memberships never both commit.
//! Every node computes the same partition from the same reports, so the minority side and a
//! node cut off from one member (not from the others) both learn that they are out.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// A set of nodes: bit `n - 1` for node `n`.
pub type Mask = u64;

pub fn bit(node: NodeId) -> Mask {
    1 << (node.0 - 1)
}

/// The nodes of `mask`, in id order.
pub fn nodes(mask: Mask) -> impl Iterator<Item = NodeId> {
    (0..64).filter(move |i| mask & (1 << i) != 0).map(|i| NodeId(i + 1))
}

/// `{1,3}` for a mask of nodes 1 and 3.
pub fn format_mask(mask: Mask) -> String {
    let list: Vec<String> = nodes(mask).map(|n| n.to_string()).collect();
    format!("{{{}}}", list.join(","))
}

/// What a node says of itself in its heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The peers it hears from (itself included).
    pub sees: Mask,
    /// Its partition and the members it counts.
    pub partition: Mask,
    pub members: Mask,
    /// It has applied what its peers that are caught up had to send when it connected.
    pub ready: bool,
    /// Its WAL flushed up to here when it sent the report: a receiver has caught up with it
    /// once it has received as far.
    pub wal_end: u64,
    /// Catching up: how many bytes of its peers' WAL, as far as they last reported it, it has
    /// yet to apply, and how far it has applied them (a sum of positions); 0 for a member. See
    /// [`crate::flow`].
    pub behind: u64,
    pub applied: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A member: takes writes.
    Online,
    /// In the majority partition, catching up with the members.
    Recovery,
    /// Not in the majority partition (or none exists): refuses writes.
    Isolated,
    /// Removed from the cluster (`mtm.drop_node`): refuses writes for good.
    Dropped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Online => "online",
            State::Recovery => "recovery",
            State::Isolated => "isolated",
            State::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The majority partition (0: there is none that this node knows of).
    pub partition: Mask,
    /// The nodes that write now.
    pub members: Mask,
    pub state: State,
    /// The member whose report excluded this node, when that is why it is isolated.
    pub excluded_by: Option<NodeId>,
}

/// The view of node `me` in a cluster of the `configured` nodes, which hears from `sees` (its
/// own bit is added), is caught up when `ready`, and has the fresh `reports` of its peers
/// (index `node - 1`; `None` for a peer not heard from lately). Nodes outside `configured`
/// (dropped ones) count for nothing, whatever they report.
pub fn view(me: NodeId, configured: Mask, sees: Mask, ready: bool, reports: &[Option<Report>]) -> View {
    let size = configured.count_ones() as usize;
    let report = |id: NodeId| -> Option<Report> {
        if configured & bit(id) == 0 {
            return None;
        }
        reports.get(id.0 as usize - 1).copied().flatten()
    };
    let row = |n: usize| -> Mask {
        let id = NodeId(n as u32 + 1);
        if configured & bit(id) == 0 {
            0
        } else if id == me {
            (sees | bit(me)) & configured
        } else {
            (report(id).map_or(0, |r| r.sees) | bit(id)) & configured
        }
    };
    let top = 64 - configured.leading_zeros() as usize;
    let rows: Vec<Mask> = (0..top).map(row).collect();
    // Nodes that hear each other both ways.
    let adjacent: Vec<Mask> = (0..top)
        .map(|a| (0..top).filter(|&b| rows[a] & (1 << b) != 0 && rows[b] & (1 << a) != 0).fold(0, |m, b| m | 1 << b))
        .collect();
    let mut best = 0;
    largest_clique(&adjacent, 0, configured, &mut best);
    let majority = |m: Mask| (m & configured).count_ones() as usize * 2 > size;
    let partition = if majority(best) { best } else { 0 };
    let is_ready = |id: NodeId| if id == me { ready } else { report(id).is_some_and(|r| r.ready) };
    let members = nodes(partition).filter(|&n| is_ready(n)).fold(0, |m, n| m | bit(n));
    // A member that counts others without this node: it is out, whatever it computed itself.
    let excluded_by = nodes(partition & !bit(me)).find(|&n| {
        report(n).is_some_and(|r| r.members & bit(n) != 0 && r.members & bit(me) == 0 && r.ready)
            && members & bit(n) != 0
            && report(n).is_some_and(|r| majority(r.members))
    });
    // Left out of a member's partition: out; only not counted yet: still catching up.
    let left_out = excluded_by.is_some_and(|n| report(n).is_some_and(|r| r.partition & bit(me) == 0));
    let state = if partition & bit(me) == 0 || left_out {
        State::Isolated
    } else if excluded_by.is_some() {
        State::Recovery
    } else if members & bit(me) != 0 && majority(members) {
        State::Online
    } else {
        State::Recovery
    };
    View { partition, members: if state == State::Online { members } else { 0 }, state, excluded_by }
}

/// The largest clique in `candidates` extending `chosen` (ties: lowest mask), into `best`.
fn largest_clique(adjacent: &[Mask], chosen: Mask, candidates: Mask, best: &mut Mask) {
    let better = |a: Mask, b: Mask| a.count_ones() > b.count_ones() || (a.count_ones() == b.count_ones() && a < b);
    if candidates == 0 {
        if better(chosen, *best) {
            *best = chosen;
        }
        return;
    }
    if chosen.count_ones() + candidates.count_ones() < best.count_ones() {
        return;
    }
    let v = candidates.trailing_zeros() as usize;
    // With v, then without it: lower ids first, so the first of equal size found is the lowest.
    largest_clique(adjacent, chosen | 1 << v, candidates & adjacent[v] & !(1 << v), best);
    largest_clique(adjacent, chosen, candidates & !(1 << v), best);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ids: &[u32]) -> Mask {
        ids.iter().fold(0, |m, &i| m | bit(NodeId(i)))
    }

    /// Nodes 1 to `n`.
    fn first(n: u32) -> Mask {
        (1 << n) - 1
    }

    fn report(sees: &[u32], partition: &[u32], members: &[u32], ready: bool) -> Option<Report> {
        Some(Report {
            sees: m(sees),
            partition: m(partition),
            members: m(members),
            ready,
            wal_end: 0,
            behind: 0,
            applied: 0,
        })
    }

    #[test]
    fn all_connected_all_online() {
        let all = &[1, 2, 3];
        let reports = [None, report(all, all, all, true), report(all, all, all, true)];
        let v = view(NodeId(1), first(3), m(all), true, &reports);
        assert_eq!(v, View { partition: m(all), members: m(all), state: State::Online, excluded_by: None });
    }

    #[test]
    fn minority_is_isolated_majority_goes_on() {
        // Node 3 cut off from both others.
        let v3 = view(NodeId(3), first(3), m(&[3]), true, &[None, None, None]);
        assert_eq!(v3.state, State::Isolated);
        assert_eq!(v3.partition, 0);
        let v1 = view(NodeId(1), first(3), m(&[1, 2]), true, &[None, report(&[1, 2], &[1, 2], &[1, 2], true), None]);
        assert_eq!((v1.state, v1.members), (State::Online, m(&[1, 2])));
    }

    #[test]
    fn one_cut_link_leaves_out_the_higher_node() {
        // Link 1-2 cut; node 3 hears both.
        let r1 = report(&[1, 3], &[1, 3], &[1, 3], true);
        let r2 = report(&[2, 3], &[2, 3], &[2, 3], true);
        let r3 = report(&[1, 2, 3], &[1, 3], &[1, 3], true);
        let v3 = view(NodeId(3), first(3), m(&[1, 2, 3]), true, &[r1, r2, None]);
        assert_eq!((v3.partition, v3.state), (m(&[1, 3]), State::Online));
        let v1 = view(NodeId(1), first(3), m(&[1, 3]), true, &[None, None, r3]);
        assert_eq!(v1.state, State::Online);
        // Node 2 does not hear node 1's report, computes {2,3}, but node 3 counts {1,3}.
        let v2 = view(NodeId(2), first(3), m(&[2, 3]), true, &[None, None, r3]);
        assert_eq!((v2.state, v2.excluded_by), (State::Isolated, Some(NodeId(3))));
    }

    #[test]
    fn returning_node_recovers_before_it_counts() {
        let all = &[1, 2, 3];
        // Node 3 is back, not caught up yet.
        let reports = [None, report(all, all, &[1, 2], true), report(all, all, &[], false)];
        let v1 = view(NodeId(1), first(3), m(all), true, &reports);
        assert_eq!((v1.partition, v1.members, v1.state), (m(all), m(&[1, 2]), State::Online));
        let v3 = view(
            NodeId(3),
            first(3),
            m(all),
            false,
            &[report(all, all, &[1, 2], true), report(all, all, &[1, 2], true), None],
        );
        assert_eq!(v3.state, State::Recovery);
        // Caught up: it writes once the members count it too.
        let v3 = view(
            NodeId(3),
            first(3),
            m(all),
            true,
            &[report(all, all, &[1, 2], true), report(all, all, &[1, 2], true), None],
        );
        assert_eq!(v3.state, State::Recovery, "members still count {{1,2}}: wait for them");
        let reports = [None, report(all, all, &[1, 2], true), report(all, all, all, true)];
        assert_eq!(view(NodeId(1), first(3), m(all), true, &reports).members, m(all));
    }

    #[test]
    fn two_nodes_stop_on_partition() {
        let v = view(NodeId(1), first(2), m(&[1]), true, &[None, None]);
        assert_eq!(v.state, State::Isolated);
        let v = view(NodeId(1), first(2), m(&[1, 2]), true, &[None, report(&[1, 2], &[1, 2], &[1, 2], true)]);
        assert_eq!(v.state, State::Online);
    }

    #[test]
    fn everyone_computes_the_same_partition() {
        // Five nodes, links 1-2 and 4-5 cut: {1,3,4}, {1,3,5}, {2,3,4}, {2,3,5} are all
        // cliques of three; every node that knows all rows picks {1,3,4}.
        let full = [0b11111u64; 5];
        let mut rows = full;
        for (a, b) in [(1, 2), (4, 5)] {
            rows[a - 1] &= !bit(NodeId(b as u32));
            rows[b - 1] &= !bit(NodeId(a as u32));
        }
        for me in 1..=5u32 {
            let reports: Vec<Option<Report>> = (1..=5u32)
                .map(|n| {
                    (n != me).then_some(Report {
                        sees: rows[n as usize - 1],
                        partition: 0,
                        members: 0,
                        ready: true,
                        wal_end: 0,
                        behind: 0,
                        applied: 0,
                    })
                })
                .collect();
            let v = view(NodeId(me), first(5), rows[me as usize - 1], true, &reports);
            assert_eq!(v.partition, m(&[1, 3, 4]), "node {me}");
        }
    }

    #[test]
    fn dropped_nodes_count_for_nothing() {
        // Nodes 4 and 5 of five dropped: nodes 1 and 2 are a majority of the three left,
        // whatever the dropped ones report.
        let left = m(&[1, 2, 3]);
        let reports = [
            None,
            report(&[1, 2], &[1, 2], &[1, 2], true),
            None,
            report(&[4, 5], &[4, 5], &[4, 5], true),
            report(&[4, 5], &[4, 5], &[4, 5], true),
        ];
        let v = view(NodeId(1), left, m(&[1, 2, 4, 5]), true, &reports);
        assert_eq!((v.partition, v.members, v.state), (m(&[1, 2]), m(&[1, 2]), State::Online));
        // Before the drop the same reports leave no majority of five.
        assert_eq!(view(NodeId(1), first(5), m(&[1, 2]), true, &reports).state, State::Isolated);
        // A dropped node that still runs (and has not heard of its drop) finds no majority.
        let r1 = report(&[1, 2, 4], &[1, 2], &[1, 2], true);
        let v4 = view(NodeId(4), first(5), m(&[1, 4, 5]), true, &[r1, None, None, None, reports[4]]);
        assert_eq!(v4.state, State::Isolated);
    }

    #[test]
    fn mask_helpers() {
        assert_eq!(format_mask(m(&[1, 3])), "{1,3}");
        assert_eq!(nodes(m(&[2, 64])).collect::<Vec<_>>(), vec![NodeId(2), NodeId(64)]);
    }
}
