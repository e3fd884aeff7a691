//! Forwarding: how a node catching up gets the transactions of a peer that is down from a
//! peer that is up.
//!
//! A node that comes back needs every transaction the members committed without it. Those of
//! node B reach it in B's own stream; if B is down meanwhile, a node catching up would wait
//! in recovery until B is back, because the transactions of the others depend on B's
//! (`Signal::Coordinated::after`). So a peer A that streams to a node catching up also
//! *forwards* what it ended of the other nodes' transactions: each commit of one of B's
//! transactions applied on A, with its changes, and each rollback, at the place in A's stream
//! where A ended it. Everything of B's that A ended before coordinating a transaction of its
//! own therefore comes ahead of that transaction in A's stream.
//!
//! The node catching up then has each of B's transactions up to twice: forwarded by A, and
//! from B's stream when B is back. [`on_forwarded`] says what a forwarded end does given how
//! the transaction stands here, and the origin's stream skips what is already ended here;
//! [`waits_for`] says which streams a transaction waits for.
//!
//! `core/tests/catch_up.rs` runs these rules in a simulation where node 2 goes down and comes
//! back while node 3 catches up, and checks that node 3 catches up with node 2 down, applies
//! every transaction once, in an order consistent with every stream.

use crate::membership::{bit, Mask};
use crate::NodeId;

/// How a transaction of another node stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Here {
    /// Neither prepared nor ended here.
    Absent,
    Prepared,
    Committed,
    RolledBack,
}

/// What the forwarding peer did with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Committed,
    RolledBack,
}

/// What a node does with a forwarded end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Apply the forwarded changes and commit them (once what the transaction depends on is
    /// applied here: see [`waits_for`]).
    Apply,
    /// Commit, or roll back, the copy prepared here from the origin's stream.
    Finish { commit: bool },
    /// Record that it was rolled back, so that the origin's stream, if it brings the
    /// transaction later, does not prepare it.
    Remember,
    /// Ended here already.
    Skip,
}

/// The forwarded end disagrees with how the transaction ended here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("forwarded as {ended:?} but {here:?} here")]
pub struct Diverged {
    pub here: Here,
    pub ended: Ended,
}

pub fn on_forwarded(here: Here, ended: Ended) -> Result<Action, Diverged> {
    match (here, ended) {
        (Here::Absent, Ended::Committed) => Ok(Action::Apply),
        (Here::Absent, Ended::RolledBack) => Ok(Action::Remember),
        (Here::Prepared, Ended::Committed) => Ok(Action::Finish { commit: true }),
        (Here::Prepared, Ended::RolledBack) => Ok(Action::Finish { commit: false }),
        (Here::Committed, Ended::Committed) | (Here::RolledBack, Ended::RolledBack) => Ok(Action::Skip),
        (Here::Committed, Ended::RolledBack) | (Here::RolledBack, Ended::Committed) => Err(Diverged { here, ended }),
    }
}

/// What a node does with a peer's forward of another node's committed transaction: each ends
/// it here (the peer's `Signal::Ended` counts on that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnForwardedCommit {
    /// Commit the copy prepared here.
    Finish,
    /// It ended here already.
    Skip,
    /// Wait for the origin's stream, which is read now, to bring it (or for the origin's
    /// receiver to finish preparing it), then look again.
    Wait,
    /// Apply it here.
    Apply,
}

/// The origin's stream, as this node reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginStream {
    /// Not read (the origin is out of reach).
    Cut,
    /// Read, and moving on.
    Moving,
    /// Read, but it has not moved for a while: it may wait for the very stream that forwards
    /// (for a lock held by a transaction whose end comes further on in it).
    Stalled,
}

/// How another node's transaction stands here when a peer forwards its commit: `prepared`
/// here; `ended` here already (the origin's stream passed its PREPARE here, or an earlier
/// forward applied it); `claimed` by the origin's receiver, which is preparing it right now;
/// `origin`: how this node reads the origin's stream.
pub fn forwarded_commit(prepared: bool, ended: bool, claimed: bool, origin: OriginStream) -> OnForwardedCommit {
    if prepared {
        return OnForwardedCommit::Finish;
    }
    if ended {
        return OnForwardedCommit::Skip;
    }
    if claimed {
        // Prepared here in a moment: then committed from this forward. Skipping it would leave
        // it prepared, holding its rows, until the origin's stream ends it, which may come
        // only after what waits for this stream. The origin's receiver needs nothing further
        // on in this stream to prepare it: the peer ended all it depends on before this commit.
        return OnForwardedCommit::Wait;
    }
    if origin == OriginStream::Moving {
        // The origin's stream brings it soon (it is not past its PREPARE yet): applied by the
        // receiver whose stream it is, not by both in turn while a node catches up with every
        // peer up. Once that stream stalls this one goes on: it may hold the end of what the
        // other waits for.
        return OnForwardedCommit::Wait;
    }
    OnForwardedCommit::Apply
}

/// What the origin's receiver does with a PREPARE of a transaction that left this node out:
/// wait while a forwarding receiver applies it (`claimed`), skip it once a forward applied it
/// (`applied`), else prepare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtPrepare {
    Wait,
    Skip,
    Prepare,
}

pub fn at_prepare(claimed: bool, applied: bool) -> AtPrepare {
    match (claimed, applied) {
        (true, _) => AtPrepare::Wait,
        (false, true) => AtPrepare::Skip,
        (false, false) => AtPrepare::Prepare,
    }
}

/// Whether node `me`, applying a transaction of node `origin` that came in node `stream`'s
/// stream (its own, or forwarded by it), waits for node `n`'s stream to have ended what the
/// coordinator had ended of it. Never for its own stream, the transaction's origin (applied
/// in its order) or the stream it came in; and not for a node it does not reach (`reachable`)
/// when `stream` forwards: that stream brought what the node had ended ahead of the
/// transaction. `member`: `me` voted on the transaction; a member waits only for nodes of its
/// `partition` (what the others committed is settled with their prepared transactions).
pub fn waits_for(
    n: NodeId,
    me: NodeId,
    origin: NodeId,
    stream: NodeId,
    forwarding: bool,
    reachable: Mask,
    member: Option<Mask>,
) -> bool {
    if n == me || n == origin || n == stream {
        return false;
    }
    if let Some(partition) = member {
        return partition & bit(n) != 0;
    }
    !forwarding || reachable & bit(n) != 0
}

/// What a receiver asks of its peer's walsender in synchronous mode (see [`Notices`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwards {
    /// Whole forwards: the marked transactions that left this node out, with their changes.
    /// Asked while a node this one must catch up with is out of reach.
    Whole,
    /// Notices only: each such transaction's mark, without its changes. This node then reads
    /// the origin's own stream for it, and the peer's stream does not wait for that one.
    Notices,
}

/// Which forwards to ask for: whole ones once some other node has been out of reach for a
/// while (`out_of_reach`, this stream's peer and this node excluded), else notices.
pub fn forwards_wanted(out_of_reach: Mask) -> Forwards {
    if out_of_reach != 0 {
        Forwards::Whole
    } else {
        Forwards::Notices
    }
}

/// The notices a receiver holds: transactions of other nodes that its peer committed without
/// this node, not yet passed in their origin's stream here. While it holds one, the receiver
/// confirms its peer's stream only up to where that notice began ([`Notices::hold`]), so that
/// the peer's slot keeps it: if the origin goes out of reach before its stream brings the
/// transaction, the receiver reads its peer's stream again from there, asking for whole
/// forwards, and gets the transaction from the peer. The peer's slot is on disk, so this holds
/// across restarts of either node.
#[derive(Debug, Clone, Default)]
pub struct Notices {
    held: std::collections::VecDeque<Notice>,
}

#[derive(Debug, Clone)]
struct Notice {
    /// Where the notice began in the peer's stream.
    at: u64,
    origin: NodeId,
    /// The transaction's xid on its origin, and the end of its PREPARE in the origin's stream.
    xid: u32,
    prepared_at: u64,
    /// Once it ended here: how far this node's WAL reached then. The notice is dropped once
    /// this node's WAL is flushed that far (the end may be an asynchronous commit).
    ended_by: Option<u64>,
}

impl Notices {
    /// A notice of `origin`'s transaction `xid`, prepared at `prepared_at` in the origin's
    /// stream, which began at `at` in the peer's stream.
    pub fn push(&mut self, at: u64, origin: NodeId, xid: u32, prepared_at: u64) {
        self.held.push_back(Notice { at, origin, xid, prepared_at, ended_by: None });
    }

    /// Drops the notices of transactions that ended here durably: `ended(origin, xid,
    /// prepared_at)` says that the origin's stream passed its PREPARE here and that it is no
    /// longer prepared here; this node's WAL reaches `local_end` now and is flushed up to
    /// `local_flushed`.
    ///
    /// Only the oldest notices are looked at, up to the first whose transaction has not ended:
    /// the stream is held back to the oldest anyway, and a node catching up may hold thousands.
    pub fn drop_ended(&mut self, ended: impl Fn(NodeId, u32, u64) -> bool, local_end: u64, local_flushed: u64) {
        for n in self.held.iter_mut().filter(|n| n.ended_by.is_none()) {
            if !ended(n.origin, n.xid, n.prepared_at) {
                break;
            }
            n.ended_by = Some(local_end);
        }
        while self.held.front().is_some_and(|n| n.ended_by.is_some_and(|by| by <= local_flushed)) {
            self.held.pop_front();
        }
    }

    /// How far the peer's stream may be confirmed: up to the oldest notice still held.
    pub fn hold(&self) -> Option<u64> {
        self.held.front().map(|n| n.at)
    }

    /// The nodes whose transactions the notices held are of.
    pub fn origins(&self) -> Mask {
        self.held.iter().fold(0, |m, n| m | bit(n.origin))
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_forwarded_end_does_what_is_left_to_do() {
        use Action::*;
        let cases = [
            (Here::Absent, Ended::Committed, Ok(Apply)),
            (Here::Absent, Ended::RolledBack, Ok(Remember)),
            (Here::Prepared, Ended::Committed, Ok(Finish { commit: true })),
            (Here::Prepared, Ended::RolledBack, Ok(Finish { commit: false })),
            (Here::Committed, Ended::Committed, Ok(Skip)),
            (Here::RolledBack, Ended::RolledBack, Ok(Skip)),
        ];
        for (here, ended, action) in cases {
            assert_eq!(on_forwarded(here, ended), action, "{here:?} {ended:?}");
        }
        assert_eq!(
            on_forwarded(Here::Committed, Ended::RolledBack),
            Err(Diverged { here: Here::Committed, ended: Ended::RolledBack })
        );
        assert!(on_forwarded(Here::RolledBack, Ended::Committed).is_err());
    }

    #[test]
    fn a_forwarded_commit_is_applied_once() {
        use OnForwardedCommit::*;
        for origin in [OriginStream::Cut, OriginStream::Moving, OriginStream::Stalled] {
            assert_eq!(forwarded_commit(true, false, false, origin), Finish);
            assert_eq!(forwarded_commit(true, false, true, origin), Finish);
            assert_eq!(forwarded_commit(false, true, false, origin), Skip);
            assert_eq!(forwarded_commit(false, true, true, origin), Skip);
            assert_eq!(forwarded_commit(false, false, true, origin), Wait, "the origin's receiver prepares it");
        }
        assert_eq!(forwarded_commit(false, false, false, OriginStream::Moving), Wait);
        assert_eq!(forwarded_commit(false, false, false, OriginStream::Stalled), Apply);
        assert_eq!(forwarded_commit(false, false, false, OriginStream::Cut), Apply);
        assert_eq!(at_prepare(true, false), AtPrepare::Wait);
        assert_eq!(at_prepare(true, true), AtPrepare::Wait);
        assert_eq!(at_prepare(false, true), AtPrepare::Skip);
        assert_eq!(at_prepare(false, false), AtPrepare::Prepare);
    }

    #[test]
    fn which_streams_a_transaction_waits_for() {
        let n = |i| NodeId(i);
        let all = 0b11111;
        // Node 3 catching up, a transaction of node 1 in node 1's stream.
        assert!(!waits_for(n(3), n(3), n(1), n(1), false, all, None), "its own stream");
        assert!(!waits_for(n(1), n(3), n(1), n(1), false, all, None), "the transaction's stream");
        assert!(waits_for(n(2), n(3), n(1), n(1), false, all, None));
        // Node 2 unreachable: only a forwarding stream lets it go.
        assert!(waits_for(n(2), n(3), n(1), n(1), false, 0b101, None));
        assert!(!waits_for(n(2), n(3), n(1), n(1), true, 0b101, None));
        assert!(waits_for(n(2), n(3), n(1), n(1), true, all, None), "reachable: waits");
        // Node 2's transaction forwarded by node 1: neither 1 nor 2, but node 4.
        assert!(!waits_for(n(1), n(3), n(2), n(1), true, all, None));
        assert!(!waits_for(n(2), n(3), n(2), n(1), true, all, None));
        assert!(waits_for(n(4), n(3), n(2), n(1), true, all, None));
        // A member waits for the nodes of its partition only.
        assert!(waits_for(n(2), n(3), n(1), n(1), true, 0b101, Some(0b111)));
        assert!(!waits_for(n(4), n(3), n(1), n(1), false, all, Some(0b111)));
    }

    #[test]
    fn notices_hold_the_stream_until_their_transactions_end_here() {
        let mut notices = Notices::default();
        assert_eq!(notices.hold(), None);
        notices.push(100, NodeId(2), 7, 50);
        notices.push(200, NodeId(2), 8, 80);
        notices.push(300, NodeId(4), 9, 10);
        assert_eq!(notices.hold(), Some(100));
        assert_eq!(notices.origins(), bit(NodeId(2)) | bit(NodeId(4)));
        // Transaction 7 ended here, its end not flushed yet (the WAL reaches 1000).
        let seven = |_: NodeId, xid: u32, _: u64| xid == 7;
        notices.drop_ended(seven, 1000, 900);
        assert_eq!(notices.hold(), Some(100), "held until the end is flushed");
        notices.drop_ended(|_, _, _| false, 1100, 1000);
        assert_eq!(notices.hold(), Some(200));
        // Transaction 9 ended, 8 not: held back to 8 still.
        notices.drop_ended(|_, xid, _| xid == 9, 1200, 1200);
        assert_eq!((notices.hold(), notices.len()), (Some(200), 2));
        notices.drop_ended(|_, _, _| true, 1300, 1300);
        assert!(notices.is_empty());
        assert_eq!(forwards_wanted(0), Forwards::Notices);
        assert_eq!(forwards_wanted(0b100), Forwards::Whole);
    }
}
