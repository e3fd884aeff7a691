//! Deterministic simulation of a node catching up after a crash, with dependencies across
//! streams (`Signal::Coordinated::after`), built on `mmts_core::replication::{Progress,
//! resume_point}` and `mmts_core::twopc::dependencies_met`.
//!
//! # The model
//!
//! Three nodes. Each node's WAL, as its peers' receivers see it, is a list of records with
//! increasing positions: `Prepare { tx, after }`, `Precommit`, `CommitPrepared`,
//! `RollbackPrepared` and `Other` (records of other origins, keepalives). Coordinators on nodes
//! 1 and 2 (and 3 while it is online) run up to three transactions at a time: a PREPARE whose
//! `after` is how far the coordinator has ended the other nodes' transactions, then a precommit
//! and later a COMMIT PREPARED, interleaved with everything else; some roll back instead.
//!
//! Every node has a receiver per peer that handles the peer's stream in order. Each keeps
//! `ended` (volatile), a [`Progress`] and the replication origin in memory. A Prepare is applied
//! (prepared here) at once by a member of the transaction; a node that is not one (node 3
//! catching up) waits in place until `dependencies_met(after, ended, skip)`. A member may
//! refuse (vote no): the coordinator then rolls the transaction back. Every node accepts the
//! precommit it receives and ends the transaction there (committing it early when prepared
//! here); a COMMIT PREPARED or ROLLBACK PREPARED ends it in any case.
//!
//! Node 3 alone crashes and restarts, repeatedly. Its local WAL holds what its receivers commit:
//! a prepare, and a COMMIT/ROLLBACK PREPARED of a transaction prepared here, carry the origin
//! position; an early commit does not, and positions that need no local commit (a COMMIT
//! PREPARED of a transaction committed early, a rollback of one never prepared here, `Other`)
//! move the origin in memory only. The WAL is flushed now and then; a crash loses what is not
//! flushed, every receiver's state, and the origins moved in memory. Now and then a receiver
//! reports `progress.flushed(local flushed)` to its peer, whose slot keeps the largest
//! position reported (its confirmed position). On a restart each peer resends its stream from
//! past `max(origin on disk, confirmed)` (decoding never sends again what a slot confirmed),
//! and the receiver starts with `ended` (and its `Progress`) at a position given by the rule
//! under test: the origin on disk (an earlier rule of mmts), or [`resume_point`]. Node 3 is online
//! (a member of new transactions) once it has received both streams to their end.
//!
//! Once the load stops every open transaction ends, node 3 restarts if it is down, and every
//! receiver runs until none can move. Checked: node 3 received both streams to their end (else
//! it is stuck, and the report says what each stream's head waits for); it committed every
//! transaction committed by nodes 1 and 2 and holds none of the others prepared; it ended each
//! stream's transactions in that stream's order; and before it applied (while catching up) a
//! transaction, it had ended every transaction the coordinator had ended when it prepared it.
//!
//! # With a peer down: forwarding
//!
//! In `a_node_catches_up_while_a_peer_is_down`, node 2 also goes down (once node 1 has ended
//! its open transactions and received its whole stream) and comes back, now and then. While it
//! is down it writes nothing, nobody receives its stream, and node 1 coordinates only while
//! node 3 is online (a majority). Nodes 1 and 2 *forward*: when one ends a transaction of the
//! other (at its precommit or rollback), it writes `Forward { tx, commit }` to its own WAL. Node
//! 3 handles a forwarded end by `mmts_core::forward::on_forwarded` (apply the changes and
//! commit, finish the copy prepared here, remember a rollback, or skip), applying changes only
//! once `mmts_core::forward::waits_for` says what it depends on is applied, and not at all
//! while the origin is up and its stream, which has yet to bring the PREPARE, moves on: it
//! waits for that stream then, and applies the forward once that stream waits itself
//! (`mmts_core::forward::forwarded_commit`, as the extension does); a transaction of
//! node 1 waits for node 2's stream only while node 2 is up. A Prepare of a transaction already
//! ended here is not prepared again. A record that commits nothing because another stream's
//! receiver ended its transaction here is confirmed to its peer only once everything committed
//! here so far is flushed: else a crash loses that commit while the peer never sends the record
//! again (the simulation found this). Node 3 is online once it has received the stream of every
//! node that is up to its end. At the end of the load the checks run with node 2 still down,
//! then again once it is back; they also check that node 3 applied no transaction twice.
//!
//! In `a_node_catches_up_on_notices_while_a_peer_is_up`, node 3's receivers ask for notices
//! while the other peer is up (`mmts_core::forward::Notices`): a forward is then only noted,
//! and held, its stream confirmed no further than just before it, until the transaction
//! ended here and that end is flushed. Once the other peer is down and a notice held is of
//! it, or the stream's head waits for it, the receiver reads its stream again with whole
//! forwards from where the slot confirmed it, the peer's own records up to the receiver's
//! origin left out (`mmts_own_from`); once that peer is back, now and then, with notices again.
//! A restarted receiver reads from where the slot confirmed its stream in both forwarding
//! variants, and confirms nothing before the local WAL is flushed past what was committed
//! (`Progress::resumed`).
//!
//! # Not modelled
//!
//! Row data, locks and set-aside transactions; votes and their timing (a coordinator
//! precommits whenever, and knows up front whether node 3 refuses); resolvers (a node that
//! promised one would not accept the coordinator's precommit); crashes of nodes 1 and 2 (node
//! 3's own open transactions end in its stream when it crashes); checkpoints, which also save
//! the origins moved in memory (the model takes the worst case: no checkpoint); the membership
//! protocol (node 3 is a member of what is prepared while it is online).
//!
//! `cargo test -p mmts-core --test catch_up`; `CATCH_UP_SEED=<seed> cargo test -p mmts-core
//! --test catch_up -- --nocapture` prints the whole run of one seed under both rules.

use std::collections::BTreeMap;

use mmts_core::forward::{
    forwarded_commit, forwards_wanted, on_forwarded, waits_for, Action, Ended, Forwards, Here, Notices,
    OnForwardedCommit, OriginStream,
};
use mmts_core::membership::{bit, Mask};
use mmts_core::replication::{resume_point, Progress};
use mmts_core::twopc::dependencies_met;
use mmts_core::NodeId;

mod common;
use common::Rng;

type Lsn = u64;

/// What nodes forward: nothing, whole forwards always, or notices while every node is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    Whole,
    Notices,
}

/// Where a restarted receiver's `ended` starts, from its origin on disk and its slot's
/// confirmed position.
type Rule = fn(Lsn, Lsn) -> Lsn;

const OLD_RULE: Rule = |origin, _confirmed| origin;
const NEW_RULE: Rule = |origin, confirmed| resume_point(origin, Some(confirmed));

const STEPS: usize = 600;
const SEEDS: u64 = 2000;

/// How many seeds each test runs: `CATCH_UP_SEEDS`, or [`SEEDS`].
fn seeds() -> u64 {
    std::env::var("CATCH_UP_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS)
}

#[derive(Debug, Clone)]
enum Rec {
    Prepare {
        tx: usize,
        after: Vec<(NodeId, Lsn)>,
    },
    Precommit {
        tx: usize,
    },
    CommitPrepared {
        tx: usize,
    },
    RollbackPrepared {
        tx: usize,
    },
    /// Written by a node that ended another node's transaction: forwarded to node 3.
    Forward {
        tx: usize,
        commit: bool,
    },
    Other,
}

struct Tx {
    origin: usize,
    /// Position of its PREPARE in its origin's WAL.
    prepared_at: Lsn,
    /// Node 3 was online when it was prepared.
    member3: bool,
    /// Node 3, a member, votes no.
    refused: bool,
    /// Position of its precommit or rollback: where its coordinator and members end it.
    ended_at: Option<Lsn>,
    committed: bool,
}

#[derive(Default)]
struct Receiver {
    /// Index in the peer's WAL of the next record to handle.
    next: usize,
    ended: Lsn,
    /// The replication origin, in memory.
    origin: Lsn,
    progress: Progress,
    /// Node 3's receivers: what the peer forwards to it (`None`: nothing).
    forwards: Option<Forwards>,
    /// The notices held (with `Forwards::Notices`).
    notices: Notices,
    /// The peer's own records up to here are not sent again (`mmts_own_from`).
    own_from: Lsn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Prepared,
    Committed,
    RolledBack,
}

/// A record of node 3's local WAL written by a receiver.
struct Local {
    lsn: Lsn,
    tx: usize,
    state: State,
    /// Position in the transaction's origin stream of the record applied.
    at: Lsn,
    /// It carries the origin position `at`.
    origin: bool,
    /// The stream whose receiver wrote it (the transaction's origin, or one forwarding it).
    stream: usize,
    /// It applied the transaction's changes (a prepare, or a forwarded commit).
    applies: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node3 {
    Down,
    CatchingUp,
    Online,
}

#[derive(Default, Debug)]
struct Stats {
    crashes: usize,
    /// Restarts where a slot had confirmed more than the origin on disk said.
    slot_ahead: usize,
    /// Times node 3's receiver found its stream's head waiting for another stream.
    waits: usize,
    /// Times node 2 went down, and times node 3 got online while it was.
    downs: usize,
    online_while_down: usize,
    /// Forwarded ends node 3 applied, finished, remembered and skipped.
    forwarded: [usize; 4],
    /// Notices node 3 received, and times a receiver read its stream again with other forwards.
    notices: usize,
    rereads: usize,
}

struct Sim {
    rng: Rng,
    rule: Rule,
    /// Per node (1..=3), its WAL: (position, record).
    wal: [Vec<(Lsn, Rec)>; 4],
    txs: Vec<Tx>,
    /// Per coordinator, its transactions not ended yet.
    open: [Vec<usize>; 4],
    /// `recv[n][k]`: node n's receiver of node k's stream.
    recv: [[Receiver; 4]; 4],
    node3: Node3,
    log: Vec<Local>,
    local: BTreeMap<usize, State>,
    local_lsn: Lsn,
    local_flushed: Lsn,
    /// Confirmed position of node k's slot for node 3.
    confirmed: [Lsn; 4],
    stats: Stats,
    trace: Option<Vec<String>>,
    /// The trace says that node 3 waits in a cycle (since its last restart).
    noted_cycle: bool,
    /// Nodes 1 and 2 forward what they end of each other's transactions, and node 2 goes
    /// down and comes back.
    forwarding: bool,
    /// Node 3's receivers ask for notices while the other peer is up (see
    /// `mmts_core::forward::Notices`), and whole forwards once it is down.
    noticing: bool,
    down: [bool; 4],
}

impl Sim {
    fn new(seed: u64, rule: Rule, trace: bool) -> Sim {
        Sim::with(seed, rule, trace, Variant::Plain)
    }

    fn with(seed: u64, rule: Rule, trace: bool, variant: Variant) -> Sim {
        Sim {
            rng: Rng::new(seed),
            rule,
            wal: Default::default(),
            txs: Vec::new(),
            open: Default::default(),
            recv: Default::default(),
            node3: Node3::Online,
            log: Vec::new(),
            local: BTreeMap::new(),
            local_lsn: 0,
            local_flushed: 0,
            confirmed: [0; 4],
            stats: Stats::default(),
            trace: trace.then(Vec::new),
            noted_cycle: false,
            forwarding: variant != Variant::Plain,
            noticing: variant == Variant::Notices,
            down: [false; 4],
        }
    }

    fn note(&mut self, line: impl FnOnce(&Sim) -> String) {
        let Some(mut trace) = self.trace.take() else { return };
        trace.push(line(self));
        self.trace = Some(trace);
    }

    fn write(&mut self, n: usize, rec: Rec) -> Lsn {
        let pos = self.wal[n].len() as Lsn + 1;
        self.note(|_| format!("node {n} writes {pos}: {rec:?}"));
        self.wal[n].push((pos, rec));
        pos
    }

    /// Coordinator `n` starts a transaction or takes one of its open ones a step further.
    fn coordinate(&mut self, n: usize) {
        if self.open[n].len() < 3 && (self.open[n].is_empty() || self.rng.chance(40)) {
            let after = (1..=3).filter(|&m| m != n).map(|m| (NodeId(m as u32), self.recv[n][m].ended)).collect();
            let member3 = n == 3 || self.node3 == Node3::Online;
            let refused = member3 && n != 3 && self.rng.chance(5);
            let tx = self.txs.len();
            let prepared_at = self.wal[n].len() as Lsn + 1;
            self.txs.push(Tx { origin: n, prepared_at, member3, refused, ended_at: None, committed: false });
            self.open[n].push(tx);
            self.write(n, Rec::Prepare { tx, after });
        } else {
            let tx = self.open[n][self.rng.below(self.open[n].len())];
            self.advance(tx);
        }
    }

    fn advance(&mut self, tx: usize) {
        let n = self.txs[tx].origin;
        if self.txs[tx].committed {
            self.write(n, Rec::CommitPrepared { tx });
            self.open[n].retain(|&t| t != tx);
        } else if self.txs[tx].refused || self.rng.chance(10) {
            self.txs[tx].ended_at = Some(self.write(n, Rec::RollbackPrepared { tx }));
            self.open[n].retain(|&t| t != tx);
        } else {
            self.txs[tx].ended_at = Some(self.write(n, Rec::Precommit { tx }));
            self.txs[tx].committed = true;
        }
    }

    /// The nodes up.
    fn reachable(&self) -> Mask {
        (1..=3).filter(|&m| !self.down[m]).fold(0, |mask, m| mask | bit(NodeId(m as u32)))
    }

    /// What of `after` node `n` has not ended yet, for a transaction of node `k`.
    fn unmet(&self, n: usize, k: usize, after: &[(NodeId, Lsn)]) -> Option<(usize, Lsn)> {
        self.unmet_in(n, k, k, after)
    }

    /// What of `after` node `n` has not ended yet, for a transaction of node `origin` that came
    /// in `stream`'s stream.
    fn unmet_in(&self, n: usize, origin: usize, stream: usize, after: &[(NodeId, Lsn)]) -> Option<(usize, Lsn)> {
        let node = |i: usize| NodeId(i as u32);
        let forwarding = n == 3 && self.recv[n][stream].forwards == Some(Forwards::Whole);
        let reachable = self.reachable();
        let skip = |m: NodeId| !waits_for(m, node(n), node(origin), node(stream), forwarding, reachable, None);
        let ended = |m: NodeId| self.recv[n][m.0 as usize].ended;
        if dependencies_met(after, ended, skip) {
            return None;
        }
        after.iter().find(|&&(m, lsn)| !skip(m) && ended(m) < lsn).map(|&(m, lsn)| (m.0 as usize, lsn))
    }

    /// Whether node `n`'s receiver of node `k`'s stream waits at its next record (for what a
    /// transaction there depends on).
    fn head_waits(&self, n: usize, k: usize) -> bool {
        match self.wal[k].get(self.recv[n][k].next) {
            Some((_, Rec::Prepare { tx, after })) => {
                let member = n != 3 || self.txs[*tx].member3;
                !member && self.unmet(n, k, after).is_some()
            }
            _ => false,
        }
    }

    /// Node `n` handles the next record of node `k`'s stream; false if there is none yet or it
    /// must wait.
    fn receive(&mut self, n: usize, k: usize) -> bool {
        if self.down[n] || self.down[k] {
            return false;
        }
        let Some((pos, rec)) = self.wal[k].get(self.recv[n][k].next).cloned() else { return false };
        if n == 3 && !matches!(rec, Rec::Forward { .. }) && pos <= self.recv[3][k].own_from {
            // Not sent: node 3 has it (`mmts_own_from`).
            let r = &mut self.recv[3][k];
            r.next += 1;
            r.progress.received(pos);
            r.progress.caught_up();
            return true;
        }
        // What this commits here: (transaction, its new state, carries the origin position,
        // applies its changes).
        let mut commit = None;
        let mut applies = false;
        // Nothing committed, on the strength of what is committed here already (by another
        // stream's receiver, maybe not flushed yet).
        match &rec {
            Rec::Prepare { tx, after } => {
                let member = n != 3 || self.txs[*tx].member3;
                if !member && self.unmet(n, k, after).is_some() {
                    self.stats.waits += 1;
                    return false;
                }
                if n == 3 && !self.txs[*tx].refused && !self.local.contains_key(tx) {
                    commit = Some((*tx, State::Prepared, true));
                    applies = true;
                }
            }
            Rec::Forward { tx, .. }
                if n == 3 && self.txs[*tx].origin != 3 && self.recv[3][k].forwards == Some(Forwards::Notices) =>
            {
                // A notice, held from just before it (see `forward::Notices`).
                let t = &self.txs[*tx];
                let (origin, prepared_at) = (NodeId(t.origin as u32), t.prepared_at);
                self.recv[3][k].notices.push(pos - 1, origin, *tx as u32, prepared_at);
                self.stats.notices += 1;
            }
            Rec::Forward { tx, commit: committed } if n == 3 && self.txs[*tx].origin != 3 => {
                let here = match self.local.get(tx) {
                    None => Here::Absent,
                    Some(State::Prepared) => Here::Prepared,
                    Some(State::Committed) => Here::Committed,
                    Some(State::RolledBack) => Here::RolledBack,
                };
                let ended = if *committed { Ended::Committed } else { Ended::RolledBack };
                let mut action = on_forwarded(here, ended).unwrap_or_else(|e| panic!("tx {tx}: {e}"));
                let t = &self.txs[*tx];
                if action == Action::Apply {
                    // A commit the origin's stream will bring while node 3 reads it: waited for
                    // (see `forward::forwarded_commit`), as the extension does.
                    let passed = self.recv[3][t.origin].next as Lsn >= t.prepared_at;
                    let origin = if self.down[t.origin] {
                        OriginStream::Cut
                    } else if self.head_waits(3, t.origin) {
                        OriginStream::Stalled
                    } else {
                        OriginStream::Moving
                    };
                    match forwarded_commit(false, passed, false, origin) {
                        OnForwardedCommit::Wait => {
                            self.stats.waits += 1;
                            return false;
                        }
                        OnForwardedCommit::Skip => action = Action::Skip,
                        _ => {}
                    }
                }
                match action {
                    Action::Apply => {
                        let Rec::Prepare { after, .. } = &self.wal[t.origin][t.prepared_at as usize - 1].1 else {
                            unreachable!("a transaction's first record is its prepare")
                        };
                        if self.unmet_in(3, t.origin, k, after).is_some() {
                            self.stats.waits += 1;
                            return false;
                        }
                        commit = Some((*tx, State::Committed, true));
                        applies = true;
                    }
                    Action::Finish { commit: true } => commit = Some((*tx, State::Committed, true)),
                    Action::Finish { commit: false } | Action::Remember => {
                        commit = Some((*tx, State::RolledBack, true))
                    }
                    Action::Skip => {}
                }
                self.stats.forwarded[match action {
                    Action::Apply => 0,
                    Action::Finish { .. } => 1,
                    Action::Remember => 2,
                    Action::Skip => 3,
                }] += 1;
            }
            Rec::Forward { .. } => {}
            Rec::Precommit { tx } | Rec::CommitPrepared { tx } | Rec::RollbackPrepared { tx } => {
                self.recv[n][k].ended = self.recv[n][k].ended.max(pos);
                // A node that ends another's transaction forwards that end (node 3's own are
                // not forwarded to it).
                let first_end = !matches!(rec, Rec::CommitPrepared { .. });
                if self.forwarding && n != 3 && k != 3 && first_end {
                    let commit = matches!(rec, Rec::Precommit { .. });
                    self.write(n, Rec::Forward { tx: *tx, commit });
                }
                if n == 3 && self.local.get(tx) == Some(&State::Prepared) {
                    commit = Some(match rec {
                        Rec::Precommit { .. } => (*tx, State::Committed, false),
                        Rec::CommitPrepared { .. } => (*tx, State::Committed, true),
                        _ => (*tx, State::RolledBack, true),
                    });
                }
            }
            Rec::Other => {}
        }
        self.recv[n][k].next += 1;
        if n != 3 {
            return true;
        }
        // A record that commits nothing here because another stream's receiver ended its
        // transaction here already relies on that commit, which may not be flushed yet.
        let relies_on = match &rec {
            Rec::Prepare { tx, .. }
            | Rec::Precommit { tx }
            | Rec::CommitPrepared { tx }
            | Rec::RollbackPrepared { tx }
            | Rec::Forward { tx, .. } => (commit.is_none()
                && self.log.iter().rev().find(|l| l.tx == *tx).is_some_and(|l| l.stream != k))
            .then_some(*tx),
            Rec::Other => None,
        };
        let r = &mut self.recv[3][k];
        r.origin = pos;
        r.progress.received(pos);
        if let Some((tx, state, origin)) = commit {
            self.local_lsn += 1;
            self.log.push(Local { lsn: self.local_lsn, tx, state, at: pos, origin, stream: k, applies });
            self.local.insert(tx, state);
            r.progress.committed(self.local_lsn);
        } else if relies_on.is_some() {
            // Confirmed to the peer only once that is flushed: else a crash could lose both.
            r.progress.committed(self.local_lsn);
        }
        r.progress.caught_up();
        self.drop_notices(k);
        self.note(|s| {
            let here = commit
                .map_or("-".into(), |(tx, state, o)| format!("tx {tx} {state:?}{}", ["", " +origin"][o as usize]));
            format!("node 3 applies {k}@{pos} {rec:?}: {here}, ended {}", s.recv[3][k].ended)
        });
        self.maybe_online();
        true
    }

    /// Node 3 is online once it has received every stream of a node up to its end.
    fn maybe_online(&mut self) {
        if self.node3 == Node3::CatchingUp
            && [1, 2].iter().all(|&p| self.down[p] || self.recv[3][p].next == self.wal[p].len())
        {
            self.node3 = Node3::Online;
            self.stats.online_while_down += self.down[2] as usize;
            self.note(|_| "node 3 is online".into());
        }
    }

    /// Node 3's receiver of node `k` drops the notices of transactions ended here, and holds
    /// its stream back to the oldest one left, as the extension does.
    fn drop_notices(&mut self, k: usize) {
        let mut notices = std::mem::take(&mut self.recv[3][k].notices);
        let (recv, local) = (&self.recv, &self.local);
        let ended = |origin: NodeId, tx: u32, prepared_at: Lsn| {
            recv[3][origin.0 as usize].ended >= prepared_at && local.get(&(tx as usize)) != Some(&State::Prepared)
        };
        notices.drop_ended(ended, self.local_lsn, self.local_flushed);
        let r = &mut self.recv[3][k];
        r.progress.hold(notices.hold());
        r.notices = notices;
    }

    /// Node 3's receiver of node `k` reads its stream again with other forwards when the
    /// extension would: whole ones once the other peer is down and a notice held is of it, or
    /// the head waits for it; notices once it is back.
    fn switch_forwards(&mut self, k: usize) {
        let other = 3 - k;
        let r = &self.recv[3][k];
        let wanted = match r.forwards {
            Some(Forwards::Notices)
                if self.down[other]
                    && (r.notices.origins() & bit(NodeId(other as u32)) != 0 || self.head_waits(3, k)) =>
            {
                Forwards::Whole
            }
            Some(Forwards::Whole) if !self.down[other] && self.noticing && self.rng.chance(10) => Forwards::Notices,
            _ => return,
        };
        // As after a reconnect: from where the slot confirmed, own records from the origin on.
        let (from, own_from) = (self.confirmed[k], self.recv[3][k].origin.max(self.confirmed[k]));
        let local_end = self.local_lsn;
        let r = &mut self.recv[3][k];
        r.next = from as usize;
        r.own_from = own_from;
        r.progress = Progress::resumed(from, own_from, local_end);
        r.notices = Notices::default();
        r.forwards = Some(wanted);
        self.stats.rereads += 1;
        self.note(|_| {
            format!("node 3 reads stream {k} again from {from} with {wanted:?}, own records from {own_from}")
        });
    }

    fn report(&mut self, k: usize) {
        self.drop_notices(k);
        let flushed = self.recv[3][k].progress.flushed(self.local_flushed);
        self.confirmed[k] = self.confirmed[k].max(flushed);
        self.note(|s| format!("node 3 reports {flushed} to node {k}: slot at {}", s.confirmed[k]));
    }

    fn origin_on_disk(&self, k: usize) -> Lsn {
        self.log.iter().filter(|l| l.origin && l.stream == k).map(|l| l.at).max().unwrap_or(0)
    }

    fn crash(&mut self) {
        self.stats.crashes += 1;
        let flushed = self.local_flushed;
        self.log.retain(|l| l.lsn <= flushed);
        self.local_lsn = flushed;
        self.local = self.log.iter().map(|l| (l.tx, l.state)).collect();
        self.node3 = Node3::Down;
        self.note(|s| {
            let streams = [1, 2].map(|k| {
                let (origin, memory, slot) = (s.origin_on_disk(k), s.recv[3][k].origin, s.confirmed[k]);
                format!("stream {k} origin on disk {origin}, in memory {memory}, slot {slot}")
            });
            format!("node 3 crashes: {}", streams.join("; "))
        });
        // Its transactions end as the others settle them: committed if it precommitted.
        for tx in std::mem::take(&mut self.open[3]) {
            if self.txs[tx].committed {
                self.write(3, Rec::CommitPrepared { tx });
            } else {
                self.txs[tx].ended_at = Some(self.write(3, Rec::RollbackPrepared { tx }));
            }
        }
    }

    fn restart(&mut self) {
        for k in [1, 2] {
            let (origin, confirmed) = (self.origin_on_disk(k), self.confirmed[k]);
            self.stats.slot_ahead += (confirmed > origin) as usize;
            // The walsender's rule, whatever the receiver asks.
            let from = origin.max(confirmed);
            let start = (self.rule)(origin, confirmed);
            let mut r = Receiver {
                next: from as usize,
                ended: start,
                origin,
                progress: Progress::new(start),
                ..Receiver::default()
            };
            if self.forwarding {
                // Read from where the slot confirmed it (which notices held keep back), with
                // the peer's own records from `start` on (see `receiver::stream`).
                let other = 3 - k;
                let out_of_reach = if self.down[other] { bit(NodeId(other as u32)) } else { 0 };
                r.forwards = Some(if self.noticing { forwards_wanted(out_of_reach) } else { Forwards::Whole });
                r.next = confirmed as usize;
                r.own_from = start;
                r.progress = Progress::resumed(confirmed, start, self.local_lsn);
            }
            self.recv[3][k] = r;
            self.note(|s| {
                let r = &s.recv[3][k];
                format!("node 3 restarts stream {k} from {}, ended {start}, {:?}", r.next, r.forwards)
            });
        }
        self.node3 = Node3::CatchingUp;
        self.noted_cycle = false;
    }

    /// Node 2 goes down (once the others have ended its open transactions and received its
    /// whole stream), or comes back.
    fn node2_goes_or_comes(&mut self) {
        if !self.down[2] && self.rng.chance(2) {
            while let Some(&tx) = self.open[2].first() {
                self.advance(tx);
            }
            while self.receive(1, 2) {}
            self.down[2] = true;
            self.stats.downs += 1;
            self.note(|_| "node 2 goes down".into());
            self.maybe_online();
        } else if self.down[2] && self.rng.chance(3) {
            self.down[2] = false;
            self.note(|_| "node 2 is back".into());
        }
    }

    fn step(&mut self) {
        if self.forwarding {
            self.node2_goes_or_comes();
        }
        let up = self.node3 != Node3::Down;
        // n: node 1 or 2; k: a peer of node 3; coin: node 3 or its stream rather than another.
        let (n, k, coin) = (1 + self.rng.below(2), 1 + self.rng.below(2), self.rng.chance(40));
        match self.rng.below(100) {
            0..=19 => {
                let c = if self.node3 == Node3::Online && coin { 3 } else { n };
                // A coordinator that is down, or without a majority of members, does not write.
                if !self.down[c] && (!self.down[2] || self.node3 == Node3::Online) {
                    self.coordinate(c);
                }
            }
            20..=23 if !self.down[n] => _ = self.write(n, Rec::Other),
            24..=53 => _ = self.receive(n, if coin { 3 } else { 3 - n }),
            54..=79 if up => {
                self.switch_forwards(k);
                self.receive(3, k);
            }
            80..=87 if up && !self.down[k] => self.report(k),
            88..=94 if up => self.local_flushed = self.local_lsn,
            95..=99 if !up => self.restart(),
            95..=99 if self.rng.chance(20) => self.crash(),
            _ => {}
        }
        if self.trace.is_some() && self.node3 != Node3::Down && !self.noted_cycle && self.waiting_heads() == 2 {
            self.noted_cycle = true;
            self.note(|s| format!("{} (a cycle)", s.stuck()));
        }
    }

    /// The load, then the end of it: every transaction ends and every receiver runs until none
    /// can move.
    fn run(&mut self) -> Result<(), String> {
        for _ in 0..STEPS {
            self.step();
        }
        self.note(|_| "the load stops".into());
        if self.node3 == Node3::Down {
            self.restart();
        }
        for n in 1..=3 {
            while let Some(&tx) = self.open[n].first() {
                self.advance(tx);
            }
        }
        self.drain();
        self.check()?;
        if self.down[2] {
            self.down[2] = false;
            self.note(|_| "node 2 is back".into());
            self.drain();
            self.check()?;
        }
        Ok(())
    }

    /// Every receiver runs until none can move.
    fn drain(&mut self) {
        let receivers = [(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2)];
        while receivers.iter().fold(false, |moved, &(n, k)| {
            if n == 3 && self.node3 != Node3::Down {
                self.switch_forwards(k);
            }
            self.receive(n, k) | moved
        }) {}
    }

    /// How many of node 3's stream heads wait for another stream.
    fn waiting_heads(&self) -> usize {
        [1, 2]
            .iter()
            .filter(|&&k| match self.wal[k].get(self.recv[3][k].next) {
                Some((_, Rec::Prepare { after, .. })) => self.unmet(3, k, after).is_some(),
                _ => false,
            })
            .count()
    }

    fn stuck(&self) -> String {
        let heads = [1, 2].map(|k| {
            let r = &self.recv[3][k];
            match self.wal[k].get(r.next) {
                None => format!("stream {k} received to its end (ended {})", r.ended),
                Some((_, Rec::Prepare { tx, after })) if self.unmet(3, k, after).is_some() => {
                    let (m, need) = self.unmet(3, k, after).expect("unmet");
                    let ended = self.recv[3][m].ended;
                    format!("head of stream {k} tx {tx} waits for stream {m} >= {need} (ended {ended})")
                }
                Some((pos, rec)) => format!("head of stream {k} is {rec:?} at {pos}"),
            }
        });
        format!("node 3 stuck: {}", heads.join("; "))
    }

    fn check(&self) -> Result<(), String> {
        if [1, 2].iter().any(|&k| !self.down[k] && self.recv[3][k].next < self.wal[k].len()) {
            return Err(self.stuck());
        }
        let mut applied = BTreeMap::new();
        for l in self.log.iter().filter(|l| l.applies) {
            if let Some(stream) = applied.insert(l.tx, l.stream) {
                return Err(format!(
                    "node 3 applied tx {} of node {} twice: from stream {stream}, then from stream {}",
                    l.tx, self.txs[l.tx].origin, l.stream
                ));
            }
        }
        for (tx, t) in self.txs.iter().enumerate().filter(|(_, t)| t.origin != 3) {
            let here = self.local.get(&tx).copied();
            let ok = if t.committed { here == Some(State::Committed) } else { here != Some(State::Prepared) };
            if !ok {
                return Err(format!("tx {tx} of node {} (committed: {}) is {here:?} on node 3", t.origin, t.committed));
            }
        }
        let mut state: BTreeMap<usize, State> = BTreeMap::new();
        // Per transaction origin and stream it came in: the last end position seen.
        let mut last_end = [[0; 4]; 4];
        for l in &self.log {
            let k = self.txs[l.tx].origin;
            if l.state != State::Prepared {
                // Ends that came in the origin's stream are in its order; forwarded ones in the
                // order of the transactions' ends there.
                let at = if l.stream == k { l.at } else { self.txs[l.tx].ended_at.expect("forwarded: ended") };
                let last = &mut last_end[k][l.stream];
                if at <= *last {
                    return Err(format!("tx {} ended at {k}@{at} after {k}@{last} on node 3", l.tx));
                }
                *last = at;
            }
            // Changes applied by node 3 while it was not a member, or forwarded.
            let catching_up = l.applies && (!self.txs[l.tx].member3 || l.stream != k);
            let prepare = &self.wal[k][self.txs[l.tx].prepared_at as usize - 1].1;
            if let (true, Rec::Prepare { after, .. }) = (catching_up, prepare) {
                for &(m, need) in after.iter().filter(|(m, _)| m.0 != 3) {
                    let j = m.0 as usize;
                    for (x, t) in self.txs.iter().enumerate() {
                        if t.origin != j || t.ended_at.is_none_or(|e| e > need) {
                            continue;
                        }
                        let here = state.get(&x).copied();
                        if if t.committed { here != Some(State::Committed) } else { here == Some(State::Prepared) } {
                            return Err(format!(
                                "node 3 applied tx {} of node {k} while tx {x} of node {j} was {here:?} there, \
                                 which its coordinator had ended ({j}@{:?} <= {need})",
                                l.tx, t.ended_at
                            ));
                        }
                    }
                }
            }
            state.insert(l.tx, l.state);
        }
        Ok(())
    }
}

/// The failure of `seed` under `rule` with a short trace: node 3's events from its last crash
/// before it first waited in a cycle up to then (or to the end).
fn failure(seed: u64, rule: Rule, variant: Variant, message: &str) -> String {
    let mut sim = Sim::with(seed, rule, true, variant);
    let _ = sim.run();
    let trace = sim.trace.unwrap_or_default();
    let end = trace.iter().position(|l| l.ends_with("(a cycle)")).map_or(trace.len(), |i| i + 1);
    let crash = trace[..end].iter().rposition(|l| l.starts_with("node 3 crashes")).unwrap_or(0);
    let lines: Vec<&str> = (trace[crash..end].iter().map(String::as_str))
        .filter(|l| (l.starts_with("node 3") && !l.starts_with("node 3 writes")) || l.starts_with("node 2 "))
        .collect();
    format!(
        "seed {seed}: {message} (CATCH_UP_SEED={seed} prints the run); node 3 from its crash:\n  {}",
        lines[lines.len().saturating_sub(30)..].join("\n  ")
    )
}

/// Replays one seed under both rules with its whole trace; `false` if none is asked for.
fn replay() -> bool {
    let Some(seed) = std::env::var("CATCH_UP_SEED").ok().and_then(|s| s.parse().ok()) else { return false };
    for (name, rule, variant) in [
        ("old rule", OLD_RULE, Variant::Plain),
        ("new rule", NEW_RULE, Variant::Plain),
        ("whole forwards", NEW_RULE, Variant::Whole),
        ("notices", NEW_RULE, Variant::Notices),
    ] {
        let mut sim = Sim::with(seed, rule, true, variant);
        let outcome = sim.run();
        println!("{name}, seed {seed}:\n  {}\n{outcome:?}", sim.trace.unwrap_or_default().join("\n  "));
    }
    true
}

/// Runs every seed under the rule mmts uses (with forwarding or without), failing at the first
/// that breaks a check; returns the runs' statistics summed.
fn every_seed_holds(variant: Variant) -> Stats {
    let mut total = Stats::default();
    for seed in 0..seeds() {
        let mut sim = Sim::with(seed, NEW_RULE, false, variant);
        if let Err(message) = sim.run() {
            panic!("{}", failure(seed, NEW_RULE, variant, &message));
        }
        let s = &sim.stats;
        total.crashes += s.crashes;
        total.slot_ahead += s.slot_ahead;
        total.waits += s.waits;
        total.downs += s.downs;
        total.online_while_down += s.online_while_down;
        total.notices += s.notices;
        total.rereads += s.rereads;
        for (t, n) in total.forwarded.iter_mut().zip(s.forwarded) {
            *t += n;
        }
    }
    total
}

/// A restarted node resumes each stream, and counts it ended, where the peer's slot confirmed
/// if that is beyond its origin on disk: it never waits in a cycle, applies everything the
/// others committed, in an order consistent with every stream.
#[test]
fn a_restarted_node_catches_up() {
    if replay() {
        return;
    }
    let total = every_seed_holds(Variant::Plain);
    println!("a_restarted_node_catches_up: {total:?}");
    assert!(total.crashes > 0 && total.slot_ahead > 0 && total.waits > 0, "{total:?}");
}

/// The rule mmts had before `resume_point`: a receiver restarted with `ended` at its origin on
/// disk counts positions its slot confirmed (which are never sent again) as not ended; a
/// transaction at the head of one stream can then wait for those in the other stream, whose
/// head waits for the first: a cycle. Everything else holds under that rule.
///
/// 19 of the 2000 seeds get stuck, each in a cycle; the first is seed 45, where node 3 crashed
/// with stream 1's origin on disk at 18 and its slot at 21, stream 2's at 18 and 24: "head of
/// stream 1 tx 16 waits for stream 2 >= 22 (ended 18); head of stream 2 tx 18 waits for stream
/// 1 >= 25 (ended 22)". Position 22 of stream 2 was confirmed, so it never comes again.
#[test]
fn resuming_at_the_origin_on_disk_can_deadlock() {
    if replay() {
        return;
    }
    let (mut stuck, mut cycles, mut first) = (0, 0, None);
    for seed in 0..seeds() {
        let mut sim = Sim::new(seed, OLD_RULE, false);
        let Err(message) = sim.run() else { continue };
        assert!(message.starts_with("node 3 stuck"), "{}", failure(seed, OLD_RULE, Variant::Plain, &message));
        stuck += 1;
        if sim.waiting_heads() == 2 {
            cycles += 1;
            first.get_or_insert_with(|| failure(seed, OLD_RULE, Variant::Plain, &message));
        }
    }
    println!("old rule: {stuck} of {} seeds stuck, {cycles} of them in a cycle; the first cycle:", seeds());
    println!("{}", first.as_deref().expect("the old rule deadlocks on some seed"));
}

/// Node 2 goes down and comes back while node 3 crashes, restarts and catches up; nodes 1
/// and 2 forward what they end of each other's transactions (see `mmts_core::forward`). Node
/// 3 gets online with node 2 down (from node 1's stream alone), applies every transaction
/// once whichever way it came, and in an order consistent with every stream.
#[test]
fn a_node_catches_up_while_a_peer_is_down() {
    if replay() {
        return;
    }
    let total = every_seed_holds(Variant::Whole);
    println!("a_node_catches_up_while_a_peer_is_down: {total:?}");
    assert!(total.crashes > 0 && total.downs > 0 && total.online_while_down > 0, "{total:?}");
    assert!(total.forwarded.iter().all(|&n| n > 0), "every forwarded action happens: {total:?}");
}

/// As above, with node 3's receivers asking for notices while node 2 is up and reading their
/// stream again, from where the slot confirmed it (held back by the notices), with whole
/// forwards once it is down (see `mmts_core::forward::Notices`): the same checks hold.
#[test]
fn a_node_catches_up_on_notices_while_a_peer_is_up() {
    if replay() {
        return;
    }
    let total = every_seed_holds(Variant::Notices);
    println!("a_node_catches_up_on_notices_while_a_peer_is_up: {total:?}");
    assert!(total.crashes > 0 && total.downs > 0 && total.online_while_down > 0, "{total:?}");
    assert!(total.notices > 0 && total.rereads > 0, "{total:?}");
    assert!(total.forwarded.iter().all(|&n| n > 0), "every forwarded action happens: {total:?}");
}
