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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Adds what `other`, an earlier or other copy of this record, knows: the higher promise,
    /// the acceptance under the higher ballot, an outcome carried out.
    pub fn merge(&mut self, other: &Acceptor) {
        self.promised = self.promised.max(other.promised);
        if other.accepted.map(|(b, _)| b) > self.accepted.map(|(b, _)| b) {
            self.accepted = other.accepted;
        }
        self.decided = self.decided.or(other.decided);
    }
}

/// A request to one node's acceptor about one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The coordinator's precommit: accept "commit at `ts`" under its ballot 0.
    Precommit { coordinator: NodeId, ts: Timestamp },
    /// A resolver's phase 1.
    Promise(Ballot),
    /// A resolver's phase 2.
    Accept(Ballot, Outcome),
}

/// How far apart the nodes' clocks may be for [`forgotten`] (as NTP keeps them), in
/// microseconds.
pub const CLOCK_MARGIN_US: Timestamp = 100_000;

/// What a node remembers, besides its records, to tell whether it may have known a
/// transaction and forgotten it (see [`forgotten`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// It has a record of the transaction.
    pub has_record: bool,
    /// It has prepared the transaction since it started (its receiver registered it).
    pub prepared_here: bool,
    /// When it started (records live in memory).
    pub started_at: Timestamp,
    /// The latest time at which a record was made that could have been this transaction's
    /// and has been given up since, whatever it held (`records::Records::memory`), if any.
    pub evicted_at: Option<Timestamp>,
}

/// Whether a node may have known a transaction that began at `since` and forgotten it: it has
/// no record of it, and either it started after the transaction began and has not prepared it
/// since, or a record that could have been its (made after it began) has been given up. Such
/// a node takes no part in settling it ([`Answer::Unknown`]): a promise, an acceptance or an
/// outcome it had would be lost. `margin` is how far apart the clocks of the node that says `since` and this one
/// may be.
pub fn forgotten(memory: Memory, since: Timestamp, margin: Timestamp) -> bool {
    let after = |t: Timestamp| t > since - margin;
    !memory.has_record && ((after(memory.started_at) && !memory.prepared_here) || memory.evicted_at.is_some_and(after))
}

/// Whether a node that remembers `memory` takes no part in `request` (see [`forgotten`]).
///
/// A resolver's requests are refused by a node that may have forgotten. The coordinator's
/// precommit is not: a node catching up after a restart holds transactions prepared before it,
/// and the other nodes count a precommit's position in the stream as the end of its
/// transaction (they commit on it in clusters of three nodes or fewer); refusing it there left
/// the restarted node waiting forever on transactions of two streams that each depended on the
/// other (`tests/tests/failures.rs`, a node killed again and again). It is safe because what a
/// resolver was promised or had accepted is kept on disk ([`durable`]): a node that restarted
/// after promising a higher ballot refuses the precommit (`core/tests/settlement.rs`,
/// `a_promise_forgotten_in_a_restart_would_let_both_outcomes_be_chosen`).
pub fn takes_no_part(memory: Memory, request: Request, since: Timestamp, margin: Timestamp) -> bool {
    !matches!(request, Request::Precommit { .. }) && forgotten(memory, since, margin)
}

/// Whether the record `request` changed must be on disk before the answer leaves: a promise
/// or an acceptance given to a resolver. A node that forgot one after a restart could accept
/// the coordinator's precommit (see [`takes_no_part`]) and help choose both outcomes; with it
/// kept, the restarted node refuses the precommit as a lower ballot. (The coordinator's own
/// ballot needs no disk: a node that forgot accepting it takes no part in settling.)
pub fn durable(request: Request) -> bool {
    matches!(request, Request::Promise(_) | Request::Accept(..))
}

/// A record as kept on disk.
pub fn encode_record(record: &Acceptor) -> Vec<u8> {
    bincode::serde::encode_to_vec(record, bincode::config::standard()).expect("a record encodes")
}

/// A record read back from disk (`None`: damaged).
pub fn decode_record(bytes: &[u8]) -> Option<Acceptor> {
    let (record, read) = bincode::serde::decode_from_slice::<Acceptor, _>(bytes, bincode::config::standard()).ok()?;
    (read == bytes.len()).then_some(record)
}

/// This node's answer to `request` about a transaction that began at `since` (by the clock of
/// the node asking), given its record and what it remembers.
pub fn answer(record: &mut Acceptor, memory: Memory, request: Request, since: Timestamp, margin: Timestamp) -> Answer {
    if takes_no_part(memory, request, since, margin) {
        return Answer::Unknown;
    }
    match request {
        Request::Precommit { coordinator, ts } => {
            record.accept(Ballot::coordinator(coordinator), Outcome::Commit { ts })
        }
        Request::Promise(ballot) => record.promise(ballot),
        Request::Accept(ballot, outcome) => record.accept(ballot, outcome),
    }
}

/// Whether a participant that holds `record` may commit the coordinator's transaction on its
/// precommit at `ts`, without waiting for the COMMIT PREPARED: it accepted the precommit, and
/// the coordinator (which accepts before it sends one) and it are a majority of a cluster of
/// `size` nodes (three or fewer).
pub fn chosen_on_precommit(record: &Acceptor, coordinator: NodeId, ts: Timestamp, size: usize) -> bool {
    majority(size, 2)
        && record.decided.is_none()
        && record.accepted == Some((Ballot::coordinator(coordinator), Outcome::Commit { ts }))
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

/// A resolver: settles transactions of one cluster from one node, with rounds above any it
/// has seen refused.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    round: u32,
}

/// One attempt of a [`Resolver`] to settle one transaction: ask for promises under a new
/// ballot, then for acceptances of the outcome they allow, then carry it out. Advanced by the
/// answers (`step`), asked what to do next (`next`); no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    ballot: Ballot,
    size: usize,
    phase: Phase,
    answers: Vec<(NodeId, Answer)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Promise,
    Accept(Outcome),
    Done(Option<Outcome>),
}

/// What an [`Attempt`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send this request to every node (this one too) and [`Attempt::step`] their answers.
    Ask(Request),
    /// Waiting for answers.
    Wait,
    /// Chosen: carry it out here and tell every node.
    Settled(Outcome),
    /// Not settled this time (not enough answers, or a higher ballot): try again later.
    GiveUp,
}

impl Resolver {
    /// A new attempt by node `me` in a cluster of `size` nodes, and its first request.
    pub fn attempt(&mut self, me: NodeId, size: usize) -> (Attempt, Request) {
        self.round += 1;
        let ballot = Ballot { round: self.round, node: me.0 };
        (Attempt { ballot, size, phase: Phase::Promise, answers: Vec::new() }, Request::Promise(ballot))
    }

    /// What `attempt` learned: later attempts use a round above any ballot it was refused for.
    pub fn learn(&mut self, attempt: &Attempt) {
        let refused = attempt.answers.iter().filter_map(|(_, a)| match a {
            Answer::Refused(b) => Some(b.round),
            _ => None,
        });
        self.round = refused.fold(self.round, u32::max);
    }
}

impl Attempt {
    pub fn ballot(&self) -> Ballot {
        self.ballot
    }

    /// The request whose answers it takes now (`None` once done).
    pub fn request(&self) -> Option<Request> {
        match self.phase {
            Phase::Promise => Some(Request::Promise(self.ballot)),
            Phase::Accept(o) => Some(Request::Accept(self.ballot, o)),
            Phase::Done(_) => None,
        }
    }

    /// An answer from `from` to the current request (repeated ones count once).
    pub fn step(&mut self, from: NodeId, answer: Answer) {
        if !matches!(self.phase, Phase::Done(_)) && !self.answers.iter().any(|(n, _)| *n == from) {
            self.answers.push((from, answer));
        }
    }

    /// What to do now; `all_in`: every node asked has answered or will not (the caller's
    /// timeout), so a phase without its majority ends.
    pub fn next(&mut self, all_in: bool) -> Step {
        match self.phase {
            Phase::Done(Some(o)) => Step::Settled(o),
            Phase::Done(None) => Step::GiveUp,
            Phase::Promise => match after_promises(self.size, &self.answers) {
                Next::Decided(o) => self.done(Some(o)),
                Next::Propose(o) => {
                    self.phase = Phase::Accept(o);
                    self.answers.clear();
                    Step::Ask(Request::Accept(self.ballot, o))
                }
                Next::Retry { .. } if all_in => self.done(None),
                Next::Retry { .. } => Step::Wait,
            },
            Phase::Accept(o) => match after_accepts(self.size, o, &self.answers) {
                Some(chosen) => self.done(Some(chosen)),
                None if all_in => self.done(None),
                None => Step::Wait,
            },
        }
    }

    fn done(&mut self, outcome: Option<Outcome>) -> Step {
        self.phase = Phase::Done(outcome);
        self.next(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(has_record: bool, prepared_here: bool, started_at: Timestamp, evicted_at: Option<Timestamp>) -> Memory {
        Memory { has_record, prepared_here, started_at, evicted_at }
    }

    #[test]
    fn an_attempt_promises_then_accepts_then_settles() {
        let mut resolver = Resolver::default();
        let (mut attempt, first) = resolver.attempt(NodeId(3), 3);
        let ballot = Ballot { round: 1, node: 3 };
        assert_eq!(first, Request::Promise(ballot));
        attempt.step(NodeId(3), Answer::Promised(None));
        assert_eq!(attempt.next(false), Step::Wait, "one promise of three");
        let accepted = (Ballot::coordinator(NodeId(1)), Outcome::Commit { ts: 9 });
        attempt.step(NodeId(2), Answer::Promised(Some(accepted)));
        // The value accepted under the highest ballot: the coordinator's precommit.
        assert_eq!(attempt.next(false), Step::Ask(Request::Accept(ballot, Outcome::Commit { ts: 9 })));
        attempt.step(NodeId(3), Answer::Accepted);
        attempt.step(NodeId(3), Answer::Accepted);
        assert_eq!(attempt.next(false), Step::Wait, "a repeated answer counts once");
        attempt.step(NodeId(2), Answer::Accepted);
        assert_eq!(attempt.next(false), Step::Settled(Outcome::Commit { ts: 9 }));
    }

    #[test]
    fn a_refused_attempt_gives_up_and_the_next_one_goes_higher() {
        let mut resolver = Resolver::default();
        let (mut attempt, _) = resolver.attempt(NodeId(3), 3);
        attempt.step(NodeId(3), Answer::Promised(None));
        attempt.step(NodeId(2), Answer::Refused(Ballot { round: 7, node: 2 }));
        assert_eq!(attempt.next(false), Step::Wait);
        assert_eq!(attempt.next(true), Step::GiveUp);
        resolver.learn(&attempt);
        let (attempt, request) = resolver.attempt(NodeId(3), 3);
        assert_eq!(request, Request::Promise(Ballot { round: 8, node: 3 }));
        assert_eq!(attempt.ballot().round, 8);
        // Nobody promised anything: abort.
        let (mut attempt, _) = resolver.attempt(NodeId(3), 3);
        attempt.step(NodeId(1), Answer::Promised(None));
        attempt.step(NodeId(3), Answer::Promised(None));
        assert!(matches!(attempt.next(false), Step::Ask(Request::Accept(_, Outcome::Abort))));
        // A node that carried it out already tells.
        let (mut attempt, _) = resolver.attempt(NodeId(3), 3);
        attempt.step(NodeId(1), Answer::Decided(Outcome::Abort));
        assert_eq!(attempt.next(false), Step::Settled(Outcome::Abort));
    }

    #[test]
    fn a_node_that_may_have_forgotten_takes_no_part() {
        let margin = 10;
        // Began at 1000. Started long before, no eviction since: it knows.
        assert!(!forgotten(memory(false, false, 0, None), 1000, margin));
        // Restarted after it began (or within the clock margin), not prepared since: unknown.
        assert!(forgotten(memory(false, false, 995, None), 1000, margin));
        assert!(forgotten(memory(false, false, 2000, None), 1000, margin));
        // ... unless it prepared it again, or has its record.
        assert!(!forgotten(memory(false, true, 2000, None), 1000, margin));
        assert!(!forgotten(memory(true, false, 2000, None), 1000, margin));
        // A record evicted since it began may have been its.
        assert!(forgotten(memory(false, true, 0, Some(1500)), 1000, margin));
        assert!(!forgotten(memory(false, true, 0, Some(500)), 1000, margin));
        // A resolver's requests get Unknown from a forgetful node, its record untouched; the
        // coordinator's precommit is accepted (see `takes_no_part`).
        let mut record = Acceptor::default();
        for request in [
            Request::Promise(Ballot { round: 1, node: 2 }),
            Request::Accept(Ballot { round: 1, node: 2 }, Outcome::Abort),
        ] {
            assert_eq!(answer(&mut record, memory(false, false, 2000, None), request, 1000, margin), Answer::Unknown);
        }
        assert_eq!(record, Acceptor::default());
        let precommit = Request::Precommit { coordinator: NodeId(1), ts: 5 };
        assert_eq!(answer(&mut record, memory(false, false, 2000, None), precommit, 1000, margin), Answer::Accepted);
    }

    #[test]
    fn a_precommit_is_refused_after_a_higher_promise_and_chosen_only_in_small_clusters() {
        let known = memory(true, true, 0, None);
        let mut record = Acceptor::default();
        let resolver = Ballot { round: 1, node: 3 };
        assert!(matches!(answer(&mut record, known, Request::Promise(resolver), 1000, 0), Answer::Promised(None)));
        let precommit = Request::Precommit { coordinator: NodeId(1), ts: 7 };
        assert_eq!(answer(&mut record, known, precommit, 1000, 0), Answer::Refused(resolver));
        assert!(!chosen_on_precommit(&record, NodeId(1), 7, 3));

        let mut record = Acceptor::default();
        assert_eq!(answer(&mut record, known, precommit, 1000, 0), Answer::Accepted);
        assert!(chosen_on_precommit(&record, NodeId(1), 7, 3), "coordinator and this node: 2 of 3");
        assert!(!chosen_on_precommit(&record, NodeId(1), 7, 5), "2 of 5 is no majority");
        assert!(!chosen_on_precommit(&record, NodeId(1), 8, 3), "another timestamp");
        record.decide(Outcome::Abort);
        assert!(!chosen_on_precommit(&record, NodeId(1), 7, 3), "decided already");
    }

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
