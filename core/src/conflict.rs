//! Resolving concurrent writes of the same row on different nodes (asynchronous mode):
//! last writer wins, by (commit timestamp, node id). Every node compares the same two versions
//! the same way, so all nodes keep the same one.

use crate::NodeId;

/// One committed version of a row: when and where it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Commit timestamp (microseconds since 2000-01-01); 0 when unknown (frozen, too old).
    pub commit_time: i64,
    pub node: NodeId,
}

/// Whether an incoming version replaces the local one.
pub fn remote_wins(remote: Version, local: Version) -> bool {
    remote > local
}

/// Whether the node that wrote an incoming version had the local one already: it wrote over
/// it, in the normal course of events, and overwriting it here loses nothing (not a conflict).
/// `seen` is, per node, the commit time of the last of that node's transactions the writer had
/// applied when it wrote (it applies each node's transactions in their commit order, so it had
/// every one committed up to then). A version of unknown time counts as not seen.
pub fn writer_had_seen(local: Version, writer: NodeId, seen: &[(NodeId, i64)]) -> bool {
    local.node == writer
        || (local.commit_time != 0 && seen.iter().any(|&(node, time)| node == local.node && time >= local.commit_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(commit_time: i64, node: u32) -> Version {
        Version { commit_time, node: NodeId(node) }
    }

    #[test]
    fn a_writer_had_seen_what_it_had_applied() {
        let seen = [(NodeId(1), 100), (NodeId(3), 50)];
        assert!(writer_had_seen(v(100, 1), NodeId(2), &seen));
        assert!(!writer_had_seen(v(101, 1), NodeId(2), &seen), "committed after the last one applied");
        assert!(writer_had_seen(v(20, 3), NodeId(2), &seen));
        assert!(!writer_had_seen(v(20, 4), NodeId(2), &seen), "nothing applied of node 4");
        assert!(writer_had_seen(v(999, 2), NodeId(2), &[]), "its own version");
        assert!(!writer_had_seen(v(0, 1), NodeId(2), &seen), "unknown time");
    }

    #[test]
    fn later_commit_wins_then_higher_node() {
        assert!(remote_wins(v(2, 1), v(1, 3)));
        assert!(!remote_wins(v(1, 3), v(2, 1)));
        assert!(remote_wins(v(5, 2), v(5, 1)));
        assert!(!remote_wins(v(5, 1), v(5, 2)));
        // Both sides of a conflict decide alike: exactly one of the two versions wins.
        for (a, b) in [(v(1, 1), v(2, 2)), (v(7, 3), v(7, 2)), (v(0, 1), v(0, 2))] {
            assert_ne!(remote_wins(a, b), remote_wins(b, a));
        }
    }
}
