//! Settling transactions whose coordinator is gone: one outcome on every node.
//!
//! A coordinator that has every member's yes does not commit at once: it first asks the
//! members to *accept* "commit at ts" (the precommit), and commits only once a majority of the
//! cluster (itself included) has accepted. A transaction acknowledged to a client was
//! therefore accepted by a majority.
//!
//! When the coordinator is lost with the transaction prepared on the survivors, a survivor
//! settles it with single-decree Paxos over the members' records ([`Acceptor`]): it asks a
//! majority to *promise* a ballot higher than any before, takes the outcome accepted under the
//! highest ballot among their answers (abort when none accepted any), has a majority accept
//! it, and then carries it out. The coordinator's precommit is ballot 0 of the same instance,
//! so a resolver never aborts what the coordinator may have committed, and two resolvers never
//! choose differently. A node that already carried out an outcome answers with it.

use serde::{Deserialize, Serialize};

use crate::wire::Timestamp;
use crate::NodeId;

/// Orders attempts to settle one transaction: the coordinator's precommit is `(0, its id)`;
/// resolvers use rounds from 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u32,
    pub node: u32,
}

impl Ballot {
    /// The ballot of a coordinator's own precommit.
    pub fn coordinator(node: NodeId) -> Ballot {
        Ballot { round: 0, node: node.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Commit { ts: Timestamp },
    Abort,
}

/// One node's record of one transaction being settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acceptor {
    pub promised: Ballot,
    pub accepted: Option<(Ballot, Outcome)>,
    /// Carried out here.
    pub decided: Option<Outcome>,
}

/// A node's answer to a resolver's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The outcome is carried out here.
    Decided(Outcome),
    /// Promised the ballot; what it accepted before, if anything.
    Promised(Option<(Ballot, Outcome)>),
    /// Accepted the proposal.
    Accepted,
    /// Bound to a higher ballot already.
    Refused(Ballot),
    /// It has no record of the transaction and may have lost one (it restarted since the
    /// transaction began): it takes no part.
    Unknown,
}

impl Acceptor {
    /// Phase 1: promise `ballot` (ignore lower ones from now on).
    pub fn promise(&mut self, ballot: Ballot) -> Answer {
        if let Some(o) = self.decided {
            return Answer::Decided(o);
        }
        if ballot <= self.promised && self.promised != Ballot::default() {
            return Answer::Refused(self.promised);
        }
        self.promised = ballot;
        Answer::Promised(self.accepted)
    }

    /// Phase 2 (and the coordinator's precommit): accept `outcome` under `ballot`.
    pub fn accept(&mut self, ballot: Ballot, outcome: Outcome) -> Answer {
        if let Some(o) = self.decided {
            return Answer::Decided(o);
        }
        if ballot < self.promised {
            return Answer::Refused(self.promised);
        }
        self.promised = ballot;
        self.accepted = Some((ballot, outcome));
        Answer::Accepted
    }

    pub fn decide(&mut self, outcome: Outcome) {
        self.decided = Some(outcome);
    }
}

/// Whether `count` of a cluster of `size` nodes are a majority (of acceptors, here).
pub fn majority(size: usize, count: usize) -> bool {
    count * 2 > size
}

/// What a resolver does after asking for promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Some node carried out this outcome: do the same.
    Decided(Outcome),
    /// A majority promised: have them accept this.
    Propose(Outcome),
    /// Not enough promises: try again later with a round above `above`.
    Retry { above: u32 },
}

/// Phase 1's result from the `answers` of a cluster of `size` nodes.
pub fn after_promises(size: usize, answers: &[(NodeId, Answer)]) -> Next {
    if let Some(o) = answers.iter().find_map(|(_, a)| if let Answer::Decided(o) = a { Some(*o) } else { None }) {
        return Next::Decided(o);
    }
    // A node that answers `Unknown` counts as one that did not answer.
    let promised: Vec<Option<(Ballot, Outcome)>> =
        answers.iter().filter_map(|(_, a)| if let Answer::Promised(p) = a { Some(*p) } else { None }).collect();
    if !majority(size, promised.len()) {
        let above = answers
            .iter()
            .filter_map(|(_, a)| if let Answer::Refused(b) = a { Some(b.round) } else { None })
            .max()
            .unwrap_or(0);
        return Next::Retry { above };
    }
    let highest = promised.into_iter().flatten().max_by_key(|(b, _)| *b);
    Next::Propose(highest.map_or(Outcome::Abort, |(_, o)| o))
}

/// Phase 2's result: `Some` when the outcome is chosen (a majority accepted, or a node had
/// carried out one already).
pub fn after_accepts(size: usize, proposed: Outcome, answers: &[(NodeId, Answer)]) -> Option<Outcome> {
    if let Some(o) = answers.iter().find_map(|(_, a)| if let Answer::Decided(o) = a { Some(*o) } else { None }) {
        return Some(o);
    }
    let accepted = answers.iter().filter(|(_, a)| *a == Answer::Accepted).count();
    majority(size, accepted).then_some(proposed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: Outcome = Outcome::Commit { ts: 42 };

    fn b(round: u32, node: u32) -> Ballot {
        Ballot { round, node }
    }

    #[test]
    fn precommitted_on_a_majority_is_committed_by_any_resolver() {
        // Coordinator 1 precommitted on itself and node 2, then died; node 3 resolves with 2, 3.
        let mut n2 = Acceptor::default();
        let mut n3 = Acceptor::default();
        assert_eq!(n2.accept(Ballot::coordinator(NodeId(1)), COMMIT), Answer::Accepted);
        let answers = [(NodeId(2), n2.promise(b(1, 3))), (NodeId(3), n3.promise(b(1, 3)))];
        assert_eq!(after_promises(3, &answers), Next::Propose(COMMIT));
        let acks = [(NodeId(2), n2.accept(b(1, 3), COMMIT)), (NodeId(3), n3.accept(b(1, 3), COMMIT))];
        assert_eq!(after_accepts(3, COMMIT, &acks), Some(COMMIT));
    }

    #[test]
    fn without_any_precommit_the_resolver_aborts_and_a_late_precommit_is_refused() {
        let mut n2 = Acceptor::default();
        let mut n3 = Acceptor::default();
        let answers = [(NodeId(2), n2.promise(b(1, 3))), (NodeId(3), n3.promise(b(1, 3)))];
        assert_eq!(after_promises(3, &answers), Next::Propose(Outcome::Abort));
        // The coordinator's precommit arrives late: refused, it cannot commit.
        assert_eq!(n2.accept(Ballot::coordinator(NodeId(1)), COMMIT), Answer::Refused(b(1, 3)));
    }

    #[test]
    fn a_minority_of_answers_retries_higher() {
        let mut n2 = Acceptor::default();
        n2.promise(b(4, 2));
        let answers = [(NodeId(2), n2.promise(b(1, 3)))];
        assert_eq!(after_promises(3, &answers), Next::Retry { above: 4 });
    }

    #[test]
    fn a_node_that_forgot_takes_no_part() {
        // Node 2 accepted the precommit, then restarted: it answers Unknown, and node 3 alone
        // is no majority, so nothing is chosen until the coordinator or node 2's memory helps.
        let mut n3 = Acceptor::default();
        let answers = [(NodeId(2), Answer::Unknown), (NodeId(3), n3.promise(b(1, 3)))];
        assert_eq!(after_promises(3, &answers), Next::Retry { above: 0 });
    }

    #[test]
    fn a_carried_out_outcome_wins() {
        let mut n2 = Acceptor::default();
        n2.decide(Outcome::Abort);
        let answers = [(NodeId(2), n2.promise(b(1, 3)))];
        assert_eq!(after_promises(3, &answers), Next::Decided(Outcome::Abort));
        assert_eq!(after_accepts(3, COMMIT, &[(NodeId(2), n2.accept(b(1, 3), COMMIT))]), Some(Outcome::Abort));
    }

    #[test]
    fn the_highest_accepted_ballot_wins() {
        // A resolver (round 1) had node 2 accept abort; the coordinator's precommit reached 3.
        let mut n2 = Acceptor::default();
        let mut n3 = Acceptor::default();
        n3.accept(Ballot::coordinator(NodeId(1)), COMMIT);
        n2.promise(b(1, 2));
        n2.accept(b(1, 2), Outcome::Abort);
        let answers = [(NodeId(2), n2.promise(b(2, 3))), (NodeId(3), n3.promise(b(2, 3)))];
        assert_eq!(after_promises(3, &answers), Next::Propose(Outcome::Abort));
    }
}
