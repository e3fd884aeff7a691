//! The coordinator of one synchronous commit, from the PREPARE on its own node to what its
//! client hears: the one place where mmts decides whether a transaction commits, and when.
//!
//! [`Coordinator`] tallies the participants' votes into a [`Decision`]. [`Coordination`] is
//! the whole life around it, advanced by [`Event`]s and asked with [`Coordination::poll`] for
//! the next [`Action`] to carry out (no clock, no I/O: the caller feeds the time):
//!
//! ```text
//! voting ──all yes──▶ accepting ──majority accepted──▶ committing ──▶ finishing ──▶ done
//!    │                    │  (own acceptor refused, or no
//!    │ no, silence,       │   majority in time: done, the
//!    │ lost peer, cancel  │   outcome left to the resolvers)
//!    ▼                    ▼
//! rolling back ───────▶ finishing ──▶ done
//! ```
//!
//! - **Voting.** Every participant prepared the transaction and votes (see the participant's
//!   rules in `participant`); a no, the deadline, a participant lost before its vote, or a cancel
//!   roll it back everywhere. The application's own `PREPARE TRANSACTION` ends here: it is
//!   left prepared for its `COMMIT PREPARED`.
//! - **Accepting** ("precommit"). All voted yes: the commit timestamp is the largest proposal.
//!   This node's acceptor record takes "commit at ts" under ballot 0 (refused if a resolver
//!   promised a higher ballot: then nothing accepted a commit and it rolls back), and a
//!   majority of the cluster must accept it too (`indoubt`): from then on the cluster commits
//!   it even if this node is lost. No majority in time: the client hears that the outcome is
//!   unknown (08007) and the transaction stays prepared for the resolvers.
//! - **Committing / rolling back** here, then **finishing**: the client hears once every
//!   participant still reachable has finished the same way (for a commit, with this node a
//!   majority of the cluster: see [`Coordinator::all_finished`]), or after `finish_timeout`.

use std::collections::BTreeSet;

use crate::indoubt::majority;
use crate::twopc::{Vote, NO_MAJORITY, SERIALIZATION_FAILURE};
use crate::wire::Timestamp;
use crate::NodeId;

/// Why a transaction was rolled back everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortReason {
    /// The node whose vote (or silence) decided it; `None` for this node.
    pub node: Option<NodeId>,
    pub sqlstate: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Commit everywhere; every node records `ts` (the largest proposal) as commit timestamp.
    Commit {
        ts: Timestamp,
    },
    Abort(AbortReason),
}

/// One transaction's coordinator.
#[derive(Debug, Clone)]
pub struct Coordinator {
    cluster_size: usize,
    /// Peers taking part (live at prepare time, not lost since).
    participants: BTreeSet<NodeId>,
    /// Participants whose vote has not come.
    awaiting_votes: BTreeSet<NodeId>,
    /// Participants that have not said they finished.
    awaiting_finish: BTreeSet<NodeId>,
    /// Participants that said they finished (also once lost: a returning peer says it late).
    finished: BTreeSet<NodeId>,
    max_proposal: Timestamp,
    deadline: Timestamp,
    decision: Option<Decision>,
}

impl Coordinator {
    /// A transaction prepared here, proposing `proposal`, with `participants` (live peers)
    /// to vote before `deadline`, in a cluster of `cluster_size` nodes.
    pub fn new(
        cluster_size: usize,
        participants: impl IntoIterator<Item = NodeId>,
        proposal: Timestamp,
        deadline: Timestamp,
    ) -> Coordinator {
        let participants: BTreeSet<NodeId> = participants.into_iter().collect();
        let mut c = Coordinator {
            cluster_size,
            awaiting_votes: participants.clone(),
            awaiting_finish: participants.clone(),
            finished: BTreeSet::new(),
            participants,
            max_proposal: proposal,
            deadline,
            decision: None,
        };
        c.check_majority();
        c
    }

    pub fn participants(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.participants.iter().copied()
    }

    fn has_majority(&self) -> bool {
        (self.participants.len() + 1) * 2 > self.cluster_size
    }

    fn check_majority(&mut self) {
        if self.decision.is_none() && !self.has_majority() {
            self.decision = Some(Decision::Abort(AbortReason {
                node: None,
                sqlstate: NO_MAJORITY.into(),
                message: format!(
                    "this node sees {} of {} nodes, not a majority",
                    self.participants.len() + 1,
                    self.cluster_size
                ),
            }));
        }
    }

    /// A participant voted (votes from others, or repeated, change nothing).
    pub fn on_vote(&mut self, node: NodeId, vote: Vote) {
        if self.decision.is_some() || !self.awaiting_votes.remove(&node) {
            return;
        }
        match vote {
            Vote::Yes { proposal } => self.max_proposal = self.max_proposal.max(proposal),
            Vote::No { sqlstate, message } => {
                self.decision = Some(Decision::Abort(AbortReason { node: Some(node), sqlstate, message }))
            }
        }
    }

    /// A participant became unreachable. Before its vote came, the transaction is rolled back
    /// (it may have refused it, and cannot say so). After a yes, its vote stands: it has the
    /// transaction prepared and finishes it from its slot when it returns; it is no longer
    /// waited for.
    pub fn on_peer_lost(&mut self, node: NodeId) {
        if !self.participants.contains(&node) {
            return;
        }
        self.awaiting_finish.remove(&node);
        if self.decision.is_none() && self.awaiting_votes.contains(&node) {
            self.decision = Some(Decision::Abort(AbortReason {
                node: Some(node),
                sqlstate: SERIALIZATION_FAILURE.into(),
                message: "became unreachable before it voted".into(),
            }));
        }
    }

    /// A participant finished the transaction the way it was decided.
    pub fn on_finished(&mut self, node: NodeId) {
        self.awaiting_finish.remove(&node);
        if self.participants.contains(&node) {
            self.finished.insert(node);
        }
    }

    /// The decision, once there is one: every vote in, a no, a lost majority, or `now`
    /// past the deadline.
    pub fn decide(&mut self, now: Timestamp) -> Option<&Decision> {
        if self.decision.is_none() {
            if self.awaiting_votes.is_empty() {
                self.decision = Some(Decision::Commit { ts: self.max_proposal });
            } else if now >= self.deadline {
                let missing: Vec<String> = self.awaiting_votes.iter().map(|n| n.to_string()).collect();
                self.decision = Some(Decision::Abort(AbortReason {
                    node: self.awaiting_votes.iter().next().copied(),
                    sqlstate: SERIALIZATION_FAILURE.into(),
                    message: format!("no vote from node {} in time", missing.join(", ")),
                }));
            }
        }
        self.decision.as_ref()
    }

    /// Every participant still reachable has finished the decided transaction; for a commit,
    /// they are also, with this node, a majority of the cluster: whichever majority commits
    /// next has a node that saw this commit timestamp, so its own is larger.
    pub fn all_finished(&self) -> bool {
        match &self.decision {
            None => false,
            Some(Decision::Abort(_)) => self.awaiting_finish.is_empty(),
            Some(Decision::Commit { .. }) => {
                self.awaiting_finish.is_empty() && (self.finished.len() + 1) * 2 > self.cluster_size
            }
        }
    }

    /// Participants that have not finished yet (waited for, or lost).
    pub fn unfinished(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.participants.iter().copied().filter(|n| !self.finished.contains(n))
    }

    /// Whether some participant that has not finished is still waited for.
    pub fn awaiting_finish(&self) -> bool {
        !self.awaiting_finish.is_empty()
    }
}

/// What reaches a coordinating backend about its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Vote(Vote),
    Finished,
    Accepted,
}

/// What a coordinating backend waits for, so that it is woken only when the next step of its
/// [`Coordination`] may be possible (and otherwise looks every few milliseconds): every
/// participant's vote (or a no), a majority's acceptance of its precommit, or every
/// participant's "finished".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wake {
    /// The peers taking part (none: wake on everything).
    pub participants: u64,
    /// The number of nodes of the cluster.
    pub size: u32,
}

impl Wake {
    /// Whether `what` is worth waking the backend for; `before` and `after`: the masks of
    /// peers that voted yes, accepted and finished around its delivery.
    pub fn due(&self, what: &Delivery, before: (u64, u64, u64), after: (u64, u64, u64)) -> bool {
        let all = |mask: u64| self.participants == 0 || mask & self.participants == self.participants;
        // The acceptances of the peers, and the coordinator's own.
        let majority = |mask: u64| majority(self.size as usize, mask.count_ones() as usize + 1);
        match what {
            Delivery::Vote(Vote::No { .. }) => true,
            Delivery::Vote(Vote::Yes { .. }) => all(after.0) && !all(before.0),
            Delivery::Accepted => majority(after.1) && !majority(before.1),
            Delivery::Finished => all(after.2) && !all(before.2),
        }
    }
}

/// What happens to one transaction, and what its client hears.
#[derive(Debug, Clone)]
pub struct Coordination {
    votes: Coordinator,
    phase: Phase,
    /// The application's own PREPARE TRANSACTION: only the votes are awaited.
    application: bool,
    /// How long the precommit's acceptances and the participants' "finished" are waited for.
    finish_timeout: Timestamp,
    /// The nodes of the cluster now (acceptances need a majority of them).
    cluster_size: usize,
    /// Peers that accepted the precommit.
    accepted: BTreeSet<NodeId>,
    /// The backend was canceled or is being terminated.
    interrupted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Voting,
    /// Asked this node's acceptor to take "commit at `ts`" (`own`: its answer, once given);
    /// waiting for a majority's acceptance until `deadline` (set at the first poll).
    Accepting {
        ts: Timestamp,
        own: Option<bool>,
        deadline: Option<Timestamp>,
    },
    Committing {
        ts: Timestamp,
    },
    /// Rolling back here; then `reply`, after waiting for the participants if `wait`.
    RollingBack {
        reply: Reply,
        wait: bool,
    },
    /// Done here; waiting for the participants until `deadline` (set at the first poll).
    Finishing {
        reply: Reply,
        deadline: Option<Timestamp>,
    },
    /// The client is to hear `reply` at the next poll.
    Replying(Reply),
    Done,
}

/// What the coordinator learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Vote {
        node: NodeId,
        vote: Vote,
    },
    /// A participant is unreachable or no longer a member.
    PeerLost(NodeId),
    /// A peer accepted the precommit.
    Accepted(NodeId),
    /// A participant finished the transaction the way it was decided.
    Finished(NodeId),
    /// The cluster has this many nodes now.
    ClusterSize(usize),
    /// The client canceled, or the backend is being terminated.
    Interrupted,
    /// After [`Action::Precommit`]: whether this node's acceptor took it.
    OwnAcceptance(bool),
    /// After [`Action::CommitPrepared`].
    CommittedHere,
    /// After [`Action::RollbackPrepared`].
    RolledBackHere,
}

/// What the caller carries out next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing until more events (or time) come.
    Wait,
    /// Record "commit at `ts`" under ballot 0 in this node's acceptor record and, if it took
    /// it, ask the peers to accept it too; then [`Event::OwnAcceptance`].
    Precommit { ts: Timestamp },
    /// COMMIT PREPARED here recording `ts`; then [`Event::CommittedHere`].
    CommitPrepared { ts: Timestamp },
    /// ROLLBACK PREPARED here; then [`Event::RolledBackHere`].
    RollbackPrepared,
    /// Tell the client; the coordination is over.
    Reply(Reply),
}

/// What the client hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Committed everywhere; `late`: participants that had not confirmed it in time.
    Committed {
        late: Vec<NodeId>,
    },
    /// The application's PREPARE TRANSACTION: every vote is yes, it stays prepared.
    Prepared,
    RolledBack(AbortReason),
    /// Rolled back: canceled (or terminated) while waiting for the votes.
    Canceled,
    /// Rolled back: a resolver was settling it (this node seemed lost) before this node's
    /// precommit, so nothing had accepted a commit.
    SettledElsewhere,
    /// No majority accepted the precommit in time: it stays prepared, and the cluster commits
    /// or rolls it back on every node alike once a majority can talk.
    Unconfirmed,
}

impl Coordination {
    /// A transaction prepared here: see [`Coordinator::new`]; `finish_timeout` bounds the
    /// waits after the decision.
    pub fn new(votes: Coordinator, application: bool, finish_timeout: Timestamp) -> Coordination {
        Coordination {
            cluster_size: votes.cluster_size,
            votes,
            phase: Phase::Voting,
            application,
            finish_timeout,
            accepted: BTreeSet::new(),
            interrupted: false,
        }
    }

    /// The participants (peers it was prepared on, not lost since).
    pub fn participants(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.votes.participants()
    }

    /// The votes' verdict, once there is one.
    pub fn decision(&self) -> Option<&Decision> {
        self.votes.decision.as_ref()
    }

    /// Whether this node committed it (or must: it is decided and accepted by a majority).
    pub fn committed(&self) -> bool {
        matches!(self.phase, Phase::Committing { .. })
            || matches!(self.phase, Phase::Finishing { reply: Reply::Committed { .. }, .. })
    }

    pub fn step(&mut self, event: Event) {
        match event {
            Event::Vote { node, vote } => self.votes.on_vote(node, vote),
            Event::PeerLost(node) => self.votes.on_peer_lost(node),
            Event::Accepted(node) => {
                self.accepted.insert(node);
            }
            Event::Finished(node) => self.votes.on_finished(node),
            Event::ClusterSize(size) => self.cluster_size = size,
            Event::Interrupted => self.interrupted = true,
            Event::OwnAcceptance(took) => {
                if let Phase::Accepting { own, .. } = &mut self.phase {
                    *own = Some(took);
                }
            }
            Event::CommittedHere => {
                if matches!(self.phase, Phase::Committing { .. }) {
                    self.phase = Phase::Finishing { reply: Reply::Committed { late: Vec::new() }, deadline: None };
                }
            }
            Event::RolledBackHere => {
                if let Phase::RollingBack { reply, wait } = &self.phase {
                    self.phase = match wait {
                        true => Phase::Finishing { reply: reply.clone(), deadline: None },
                        false => Phase::Replying(reply.clone()),
                    };
                }
            }
        }
    }

    /// The next thing to do at time `now`. After [`Action::Reply`] it is always
    /// [`Action::Wait`].
    pub fn poll(&mut self, now: Timestamp) -> Action {
        match &mut self.phase {
            Phase::Voting => {
                if self.interrupted {
                    self.phase = Phase::RollingBack { reply: Reply::Canceled, wait: false };
                    return Action::RollbackPrepared;
                }
                match self.votes.decide(now).cloned() {
                    None => Action::Wait,
                    Some(Decision::Commit { .. }) if self.application => self.reply(Reply::Prepared),
                    Some(Decision::Commit { ts }) => {
                        self.phase = Phase::Accepting { ts, own: None, deadline: None };
                        Action::Precommit { ts }
                    }
                    Some(Decision::Abort(reason)) => {
                        self.phase = Phase::RollingBack { reply: Reply::RolledBack(reason), wait: true };
                        Action::RollbackPrepared
                    }
                }
            }
            Phase::Accepting { own: None, .. } => Action::Wait,
            Phase::Accepting { own: Some(false), .. } => {
                self.phase = Phase::RollingBack { reply: Reply::SettledElsewhere, wait: false };
                Action::RollbackPrepared
            }
            Phase::Accepting { ts, own: Some(true), deadline } => {
                let ts = *ts;
                let deadline = *deadline.get_or_insert(now + self.finish_timeout);
                if majority(self.cluster_size, self.accepted.len() + 1) {
                    self.phase = Phase::Committing { ts };
                    Action::CommitPrepared { ts }
                } else if now >= deadline || self.interrupted {
                    self.reply(Reply::Unconfirmed)
                } else {
                    Action::Wait
                }
            }
            Phase::Committing { .. } | Phase::RollingBack { .. } | Phase::Done => Action::Wait,
            Phase::Finishing { reply, deadline } => {
                let deadline = *deadline.get_or_insert(now + self.finish_timeout);
                // A commit is confirmed to the client only once every participant committed it
                // or was lost (no longer a member: it answers no reads since, see
                // `crate::lease`), however long that takes: a member that had not committed it
                // could still answer a read after the client heard of the commit. A rollback
                // is not waited for past the deadline.
                let committed = matches!(reply, Reply::Committed { .. });
                let waited = now >= deadline && (!committed || !self.votes.awaiting_finish());
                if self.votes.all_finished() || waited || self.interrupted {
                    let reply = match reply {
                        Reply::Committed { .. } => Reply::Committed { late: self.votes.unfinished().collect() },
                        other => other.clone(),
                    };
                    self.reply(reply)
                } else {
                    Action::Wait
                }
            }
            Phase::Replying(reply) => {
                let reply = reply.clone();
                self.reply(reply)
            }
        }
    }

    fn reply(&mut self, reply: Reply) -> Action {
        self.phase = Phase::Done;
        Action::Reply(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u32) -> NodeId {
        NodeId(i)
    }

    fn yes(p: Timestamp) -> Vote {
        Vote::Yes { proposal: p }
    }

    #[test]
    fn all_yes_commits_with_the_largest_proposal() {
        let mut c = Coordinator::new(3, [n(2), n(3)], 100, 1000);
        assert_eq!(c.decide(10), None);
        c.on_vote(n(2), yes(150));
        assert_eq!(c.decide(10), None);
        c.on_vote(n(3), yes(120));
        assert_eq!(c.decide(10), Some(&Decision::Commit { ts: 150 }));
        assert!(!c.all_finished());
        c.on_finished(n(3));
        c.on_finished(n(2));
        assert!(c.all_finished());
    }

    #[test]
    fn one_no_aborts_with_that_nodes_reason() {
        let mut c = Coordinator::new(3, [n(2), n(3)], 100, 1000);
        c.on_vote(n(2), yes(150));
        c.on_vote(n(3), Vote::No { sqlstate: "23505".into(), message: "duplicate key".into() });
        // A later yes does not undo it.
        c.on_vote(n(3), yes(1));
        assert_eq!(
            c.decide(10),
            Some(&Decision::Abort(AbortReason {
                node: Some(n(3)),
                sqlstate: "23505".into(),
                message: "duplicate key".into()
            }))
        );
    }

    #[test]
    fn silence_until_the_deadline_aborts() {
        let mut c = Coordinator::new(3, [n(2), n(3)], 100, 1000);
        c.on_vote(n(2), yes(150));
        assert_eq!(c.decide(999), None);
        match c.decide(1000) {
            Some(Decision::Abort(r)) => {
                assert_eq!(r.node, Some(n(3)));
                assert_eq!(r.sqlstate, SERIALIZATION_FAILURE);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_peer_lost_before_its_vote_aborts_after_a_yes_it_stands() {
        let mut c = Coordinator::new(3, [n(2), n(3)], 100, 1000);
        c.on_vote(n(2), yes(150));
        c.on_peer_lost(n(3));
        match c.decide(10) {
            Some(Decision::Abort(r)) => {
                assert_eq!(r.node, Some(n(3)));
                assert_eq!(r.sqlstate, SERIALIZATION_FAILURE);
            }
            other => panic!("{other:?}"),
        }

        let mut c = Coordinator::new(3, [n(2), n(3)], 100, 1000);
        c.on_vote(n(3), yes(170));
        c.on_peer_lost(n(3));
        assert_eq!(c.decide(10), None, "node 3 prepared it: its yes counts");
        c.on_vote(n(2), yes(150));
        assert_eq!(c.decide(10), Some(&Decision::Commit { ts: 170 }));
        c.on_finished(n(2));
        assert!(c.all_finished(), "node 3 is not waited for, 2 of 3 finished");
    }

    #[test]
    fn minority_refuses_at_once_and_unknown_voters_are_ignored() {
        let mut c = Coordinator::new(3, [], 100, 1000);
        assert!(matches!(c.decide(0), Some(Decision::Abort(r)) if r.sqlstate == NO_MAJORITY));
        assert!(c.all_finished(), "nobody to wait for");
        let mut c = Coordinator::new(1, [], 100, 1000);
        assert_eq!(c.decide(0), Some(&Decision::Commit { ts: 100 }));
        let mut c = Coordinator::new(3, [n(2)], 100, 1000);
        c.on_vote(n(3), Vote::No { sqlstate: "X".into(), message: "not a participant".into() });
        c.on_vote(n(2), yes(90));
        assert_eq!(c.decide(0), Some(&Decision::Commit { ts: 100 }));
    }

    #[test]
    fn lost_after_the_decision_is_not_waited_for_but_a_majority_must_finish() {
        let mut c = Coordinator::new(3, [n(2), n(3)], 100, 1000);
        c.on_vote(n(2), yes(1));
        c.on_vote(n(3), yes(2));
        assert!(matches!(c.decide(0), Some(Decision::Commit { .. })));
        c.on_finished(n(2));
        assert_eq!(c.unfinished().collect::<Vec<_>>(), vec![n(3)]);
        c.on_peer_lost(n(3));
        assert!(c.all_finished());

        let mut c = Coordinator::new(5, [n(2), n(3), n(4), n(5)], 100, 1000);
        for i in 2..=5 {
            c.on_vote(n(i), yes(1));
        }
        assert!(matches!(c.decide(0), Some(Decision::Commit { .. })));
        c.on_finished(n(2));
        for i in 3..=5 {
            c.on_peer_lost(n(i));
        }
        assert!(!c.all_finished(), "2 of 5 know the commit: not a majority");
    }

    /// A coordination of node 1 over peers 2 and 3, deadline 1000, finish timeout 100.
    fn three(application: bool) -> Coordination {
        Coordination::new(Coordinator::new(3, [n(2), n(3)], 100, 1000), application, 100)
    }

    #[test]
    fn a_commit_is_accepted_by_a_majority_before_it_is_committed_then_awaited() {
        let mut c = three(false);
        assert_eq!(c.poll(10), Action::Wait);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Vote { node: n(3), vote: yes(120) });
        assert_eq!(c.poll(10), Action::Precommit { ts: 150 });
        assert_eq!(c.poll(11), Action::Wait, "until this node's acceptor answered");
        c.step(Event::OwnAcceptance(true));
        assert_eq!(c.poll(12), Action::Wait, "one acceptance of three is no majority");
        c.step(Event::Accepted(n(3)));
        assert_eq!(c.poll(13), Action::CommitPrepared { ts: 150 });
        assert!(c.committed());
        c.step(Event::CommittedHere);
        c.step(Event::Finished(n(2)));
        assert_eq!(c.poll(14), Action::Wait, "node 3 has not finished");
        c.step(Event::Finished(n(3)));
        assert_eq!(c.poll(15), Action::Reply(Reply::Committed { late: vec![] }));
        assert_eq!(c.poll(16), Action::Wait);
    }

    #[test]
    fn a_commit_is_confirmed_once_every_participant_committed_or_was_lost() {
        let mut c = three(false);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Vote { node: n(3), vote: yes(120) });
        assert_eq!(c.poll(10), Action::Precommit { ts: 150 });
        c.step(Event::OwnAcceptance(true));
        c.step(Event::Accepted(n(2)));
        assert_eq!(c.poll(10), Action::CommitPrepared { ts: 150 });
        c.step(Event::CommittedHere);
        c.step(Event::Finished(n(2)));
        assert_eq!(c.poll(20), Action::Wait);
        assert_eq!(c.poll(119), Action::Wait);
        // Past the finish timeout, node 3 is still a member: still waited for.
        assert_eq!(c.poll(500), Action::Wait);
        c.step(Event::PeerLost(n(3)));
        assert_eq!(c.poll(501), Action::Reply(Reply::Committed { late: vec![n(3)] }));
    }

    #[test]
    fn without_a_majority_of_acceptances_the_outcome_is_left_to_the_cluster() {
        let mut c = three(false);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Vote { node: n(3), vote: yes(120) });
        assert_eq!(c.poll(10), Action::Precommit { ts: 150 });
        c.step(Event::OwnAcceptance(true));
        assert_eq!(c.poll(10), Action::Wait);
        assert_eq!(c.poll(110), Action::Reply(Reply::Unconfirmed), "neither committed nor rolled back here");
        assert!(!c.committed());
    }

    #[test]
    fn a_cluster_grown_meanwhile_needs_the_larger_majority() {
        let mut c = three(false);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Vote { node: n(3), vote: yes(120) });
        assert_eq!(c.poll(10), Action::Precommit { ts: 150 });
        c.step(Event::OwnAcceptance(true));
        c.step(Event::ClusterSize(4));
        c.step(Event::Accepted(n(2)));
        assert_eq!(c.poll(10), Action::Wait, "2 of 4 is no majority");
        c.step(Event::Accepted(n(3)));
        assert_eq!(c.poll(10), Action::CommitPrepared { ts: 150 });
    }

    #[test]
    fn a_refused_precommit_rolls_back_without_waiting() {
        let mut c = three(false);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Vote { node: n(3), vote: yes(120) });
        assert_eq!(c.poll(10), Action::Precommit { ts: 150 });
        c.step(Event::OwnAcceptance(false));
        assert_eq!(c.poll(10), Action::RollbackPrepared);
        c.step(Event::RolledBackHere);
        assert_eq!(c.poll(10), Action::Reply(Reply::SettledElsewhere));
    }

    #[test]
    fn a_no_rolls_back_everywhere_and_waits_for_the_participants() {
        let mut c = three(false);
        c.step(Event::Vote { node: n(2), vote: Vote::No { sqlstate: "23505".into(), message: "dup".into() } });
        assert_eq!(c.poll(10), Action::RollbackPrepared);
        assert_eq!(c.poll(10), Action::Wait, "until rolled back here");
        c.step(Event::RolledBackHere);
        assert_eq!(c.poll(10), Action::Wait, "until the participants rolled back");
        c.step(Event::Finished(n(2)));
        c.step(Event::PeerLost(n(3)));
        let reason = AbortReason { node: Some(n(2)), sqlstate: "23505".into(), message: "dup".into() };
        assert_eq!(c.poll(10), Action::Reply(Reply::RolledBack(reason)));
    }

    #[test]
    fn a_cancel_while_voting_rolls_back_and_says_so() {
        let mut c = three(false);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Interrupted);
        assert_eq!(c.poll(10), Action::RollbackPrepared);
        c.step(Event::RolledBackHere);
        assert_eq!(c.poll(10), Action::Reply(Reply::Canceled));
    }

    #[test]
    fn the_backend_is_woken_when_its_next_step_may_be_possible() {
        // Peers 2 and 3 (bits 1 and 2) of a 3-node cluster.
        let wake = Wake { participants: 0b110, size: 3 };
        let yes = Delivery::Vote(yes(1));
        assert!(!wake.due(&yes, (0, 0, 0), (0b010, 0, 0)), "one vote of two");
        assert!(wake.due(&yes, (0b010, 0, 0), (0b110, 0, 0)), "the last vote");
        assert!(wake.due(
            &Delivery::Vote(Vote::No { sqlstate: "40001".into(), message: String::new() }),
            (0, 0, 0),
            (0, 0, 0)
        ));
        assert!(wake.due(&Delivery::Accepted, (0, 0, 0), (0, 0b100, 0)), "one peer and the coordinator: a majority");
        assert!(!wake.due(&Delivery::Accepted, (0, 0b100, 0), (0, 0b110, 0)), "a majority already");
        assert!(!wake.due(&Delivery::Finished, (0, 0, 0), (0, 0, 0b010)));
        assert!(wake.due(&Delivery::Finished, (0, 0, 0b010), (0, 0, 0b110)));
    }

    #[test]
    fn the_applications_prepare_ends_with_the_votes() {
        let mut c = three(true);
        c.step(Event::Vote { node: n(2), vote: yes(150) });
        c.step(Event::Vote { node: n(3), vote: yes(120) });
        assert_eq!(c.poll(10), Action::Reply(Reply::Prepared));
    }
}
