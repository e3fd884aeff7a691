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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(commit_time: i64, node: u32) -> Version {
        Version { commit_time, node: NodeId(node) }
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
