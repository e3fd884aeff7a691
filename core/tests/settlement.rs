//! Deterministic simulation of how transactions in doubt are settled (`mmts_core::indoubt`):
//! coordinators precommit and commit, nodes crash and restart (losing their in-memory
//! records, as mmts's shared memory does, except those kept on disk: `indoubt::durable`),
//! a node's table of records (`mmts_core::records`, the code mmts runs) is as large as the
//! transactions or smaller (so records, outcomes too, are given up for others),
//! messages are lost, duplicated and reordered, and
//! any node may try to settle a transaction it holds prepared. Checked: no transaction is
//! committed on one node and rolled back on another; every acknowledged commit is committed
//! everywhere; once faults stop, every transaction ends on every node.
//!
//! `cargo test -p mmts-core --test settlement`; replay one seed with
//! `SETTLEMENT_SEED=<seed> cargo test -p mmts-core --test settlement -- --nocapture`.

use std::collections::BTreeMap;

use mmts_core::coordinator::{Action, Coordination, Coordinator, Event};
use mmts_core::indoubt::{self, Acceptor, Answer, Ballot, Memory, Outcome, Request, Step};
use mmts_core::records::{Logged, Records};
use mmts_core::twopc::Vote;
use mmts_core::NodeId;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Precommit {
        txn: usize,
        ts: i64,
    },
    Promise {
        txn: usize,
        ballot: Ballot,
        since: i64,
    },
    Accept {
        txn: usize,
        ballot: Ballot,
        since: i64,
        outcome: Outcome,
    },
    /// An answer to the request of `phase` (0: a precommit) under `ballot`.
    Answer {
        txn: usize,
        from: usize,
        answer: Answer,
        phase: u8,
        ballot: Ballot,
    },
    Decided {
        txn: usize,
        outcome: Outcome,
    },
}

/// A resolver's attempt in progress on one node (`mmts_core::indoubt::Attempt`, the code mmts
/// runs), and when it started.
struct Attempt {
    attempt: indoubt::Attempt,
    started: u64,
}

#[derive(Default)]
struct Node<const N: usize> {
    up: bool,
    started_at: i64,
    /// In memory: lost on a crash, and given up for others when the table is full.
    records: Records<N>,
    /// On disk (`indoubt::durable`): what a restart reads back.
    durable: BTreeMap<usize, Acceptor>,
    /// The log of record changes (`records::Logged`), read back after a restart; a crash of
    /// the machine may lose its end after `synced` (it is not synced before answers leave).
    log: Vec<Logged>,
    synced: usize,
    /// Durable: how each transaction ended here (None: still prepared).
    ended: BTreeMap<usize, Outcome>,
    /// Coordinator side, in memory: the coordinations of its transactions being committed
    /// (`mmts_core::coordinator`, the code mmts runs).
    precommits: BTreeMap<usize, Coordination>,
    attempts: BTreeMap<usize, Attempt>,
    resolver: indoubt::Resolver,
}

struct Txn {
    coordinator: usize,
    since: i64,
    acknowledged: bool,
}

/// A cluster whose nodes keep `N` records each.
struct Sim<const N: usize> {
    rng: Rng,
    size: usize,
    nodes: Vec<Node<N>>,
    txns: Vec<Txn>,
    /// (deliver at, to, message)
    net: Vec<(u64, usize, Msg)>,
    now: u64,
    faults: bool,
    /// Links cut (a, b), both ways.
    cut: Vec<(usize, usize)>,
}

fn node_id(n: usize) -> NodeId {
    NodeId(n as u32 + 1)
}

/// How far apart a restart and a transaction's start must be for a node to answer about it
/// without a record (the shell's clock margin, here in simulated time).
const MARGIN: i64 = 5;

/// A transaction's key in the records: its coordinator and its index as xid.
fn key<const N: usize>(sim: &Sim<N>, txn: usize) -> (NodeId, u32) {
    (node_id(sim.txns[txn].coordinator), txn as u32)
}

impl<const N: usize> Sim<N> {
    fn new(seed: u64, size: usize, txns: usize) -> Sim<N> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let nodes = (0..size).map(|_| Node { up: true, started_at: -1000, ..Node::default() }).collect();
        let txns = (0..txns)
            .map(|i| Txn { coordinator: rng.below(size as u64) as usize, since: (i as i64) * 3, acknowledged: false })
            .collect();
        Sim { rng, size, nodes, txns, net: Vec::new(), now: 0, faults: true, cut: Vec::new() }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if from == to {
            self.receive(to, msg);
            return;
        }
        if self.faults && (self.rng.chance(10) || self.cut.contains(&(from.min(to), from.max(to)))) {
            return; // lost
        }
        let copies = if self.faults && self.rng.chance(5) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if self.faults { 20 } else { 3 });
            self.net.push((self.now + delay, to, msg.clone()));
        }
    }

    fn broadcast(&mut self, from: usize, msg: Msg) {
        for to in 0..self.size {
            self.send(from, to, msg.clone());
        }
    }

    /// The answer node `n` gives to a request about `txn` made at `since` (the rules mmts
    /// runs: `indoubt::answer`).
    fn acceptor_answer(&mut self, n: usize, txn: usize, since: i64, request: Request) -> Answer {
        let ((origin, xid), now) = (key(self, txn), self.now as i64);
        let node = &mut self.nodes[n];
        let memory = node.records.memory(origin, xid, || false, node.started_at);
        if indoubt::takes_no_part(memory, request, since, MARGIN) {
            return Answer::Unknown;
        }
        let record = node.records.make(origin, xid, now);
        let before = *record;
        let answer = indoubt::answer(&mut record.acceptor, memory, request, since, MARGIN);
        let after = *record;
        if indoubt::durable(request) {
            node.durable.insert(txn, after.acceptor);
        }
        if after != before {
            node.log.push(after.logged());
        }
        answer
    }

    fn end(&mut self, n: usize, txn: usize, outcome: Outcome) {
        let ((origin, xid), now) = (key(self, txn), self.now as i64);
        let node = &mut self.nodes[n];
        if let Some(previous) = node.ended.get(&txn) {
            assert_eq!(*previous, outcome, "txn {txn} ended twice differently on node {n}");
            return;
        }
        node.ended.insert(txn, outcome);
        let record = node.records.make(origin, xid, now);
        record.acceptor.decide(outcome);
        let logged = record.logged();
        node.log.push(logged);
        // A record on disk is removed once its transaction is carried out, after the log is
        // synced.
        if node.durable.remove(&txn).is_some() {
            node.synced = node.log.len();
        }
        node.precommits.remove(&txn);
        node.attempts.remove(&txn);
    }

    fn receive(&mut self, n: usize, msg: Msg) {
        if !self.nodes[n].up {
            return;
        }
        match msg {
            Msg::Precommit { txn, ts } => {
                let (since, c) = (self.txns[txn].since, self.txns[txn].coordinator);
                let request = Request::Precommit { coordinator: node_id(c), ts };
                let answer = self.acceptor_answer(n, txn, since, request);
                self.send(
                    n,
                    c,
                    Msg::Answer { txn, from: n, answer, phase: 0, ballot: Ballot::coordinator(node_id(c)) },
                );
            }
            Msg::Promise { txn, ballot, since } => {
                let answer = self.acceptor_answer(n, txn, since, Request::Promise(ballot));
                self.send(n, ballot.node as usize - 1, Msg::Answer { txn, from: n, answer, phase: 1, ballot });
            }
            Msg::Accept { txn, ballot, since, outcome } => {
                let answer = self.acceptor_answer(n, txn, since, Request::Accept(ballot, outcome));
                self.send(n, ballot.node as usize - 1, Msg::Answer { txn, from: n, answer, phase: 2, ballot });
            }
            Msg::Decided { txn, outcome } => self.end(n, txn, outcome),
            Msg::Answer { txn, from, answer, phase: 0, .. } => {
                let Some(coordination) = self.nodes[n].precommits.get_mut(&txn) else { return };
                if answer == Answer::Accepted {
                    coordination.step(Event::Accepted(node_id(from)));
                }
                self.coordinate(n, txn);
            }
            Msg::Answer { txn, from, answer, phase, ballot } => {
                let Some(a) = self.nodes[n].attempts.get_mut(&txn) else { return };
                let current = match a.attempt.request() {
                    Some(Request::Promise(_)) => 1,
                    Some(Request::Accept(..)) => 2,
                    _ => return,
                };
                // Only answers to this attempt's own request count (mmts gets each answer as
                // the reply to the request it sent: one ballot, one phase).
                if current != phase || ballot != a.attempt.ballot() {
                    return;
                }
                a.attempt.step(node_id(from), answer);
                match a.attempt.next(false) {
                    Step::Wait => {}
                    Step::Settled(o) => self.settled(n, txn, o),
                    Step::GiveUp => {}
                    Step::Ask(Request::Accept(ballot, outcome)) => {
                        let since = self.txns[txn].since;
                        self.broadcast(n, Msg::Accept { txn, ballot, since, outcome });
                    }
                    Step::Ask(_) => unreachable!("promises are asked first"),
                }
            }
        }
    }

    /// Carries out what the coordination of `txn` on node `n` asks for, until it waits.
    fn coordinate(&mut self, n: usize, txn: usize) {
        loop {
            let now = self.now as i64;
            let Some(coordination) = self.nodes[n].precommits.get_mut(&txn) else { return };
            match coordination.poll(now) {
                Action::Wait => return,
                Action::Precommit { ts } => {
                    let since = self.txns[txn].since;
                    let request = Request::Precommit { coordinator: node_id(n), ts };
                    let took = self.acceptor_answer(n, txn, since, request) == Answer::Accepted;
                    self.nodes[n].precommits.get_mut(&txn).expect("coordinating").step(Event::OwnAcceptance(took));
                    if took {
                        self.broadcast_others(n, Msg::Precommit { txn, ts });
                    }
                }
                Action::CommitPrepared { ts } => {
                    let outcome = Outcome::Commit { ts };
                    self.end(n, txn, outcome);
                    self.txns[txn].acknowledged = true;
                    self.broadcast(n, Msg::Decided { txn, outcome });
                    // What follows (waiting for "finished") is not modelled here.
                    self.nodes[n].precommits.remove(&txn);
                }
                Action::RollbackPrepared => {
                    self.settled(n, txn, Outcome::Abort);
                    self.nodes[n].precommits.remove(&txn);
                }
                Action::Reply(_) => {
                    self.nodes[n].precommits.remove(&txn);
                }
            }
        }
    }

    fn broadcast_others(&mut self, from: usize, msg: Msg) {
        for to in (0..self.size).filter(|&to| to != from) {
            self.send(from, to, msg.clone());
        }
    }

    fn settled(&mut self, n: usize, txn: usize, outcome: Outcome) {
        self.end(n, txn, outcome);
        self.broadcast(n, Msg::Decided { txn, outcome });
    }

    /// Node `n` starts (or restarts) settling `txn`.
    fn resolve(&mut self, n: usize, txn: usize) {
        let size = self.size;
        let node = &mut self.nodes[n];
        if let Some(earlier) = node.attempts.remove(&txn) {
            node.resolver.learn(&earlier.attempt);
        }
        let (attempt, request) = node.resolver.attempt(node_id(n), size);
        node.attempts.insert(txn, Attempt { attempt, started: self.now });
        let Request::Promise(ballot) = request else { unreachable!("an attempt starts with promises") };
        let since = self.txns[txn].since;
        self.broadcast(n, Msg::Promise { txn, ballot, since });
    }

    fn step(&mut self) {
        self.now += 1;
        // Deliver what is due, in a random order among equals.
        let mut due = Vec::new();
        self.net.retain(|(at, to, m)| {
            if *at <= self.now {
                due.push((*to, m.clone()));
                false
            } else {
                true
            }
        });
        while !due.is_empty() {
            let i = self.rng.below(due.len() as u64) as usize;
            let (to, m) = due.swap_remove(i);
            self.receive(to, m);
        }
        // Coordinators start their transactions (a coordinator may instead roll back).
        for txn in 0..self.txns.len() {
            let (c, since) = (self.txns[txn].coordinator, self.txns[txn].since);
            if since == self.now as i64 && self.nodes[c].up {
                if self.rng.chance(15) {
                    self.settled(c, txn, Outcome::Abort);
                } else {
                    // Every other node prepared it and voted yes (voting is modelled in
                    // `simulation.rs`); the acceptances are waited for until they come.
                    let ts = since * 10 + 1;
                    let peers: Vec<NodeId> = (0..self.size).filter(|&p| p != c).map(node_id).collect();
                    let votes = Coordinator::new(self.size, peers.iter().copied(), ts, i64::MAX / 4);
                    let mut coordination = Coordination::new(votes, false, i64::MAX / 4);
                    for node in peers {
                        coordination.step(Event::Vote { node, vote: Vote::Yes { proposal: ts } });
                    }
                    self.nodes[c].precommits.insert(txn, coordination);
                    self.coordinate(c, txn);
                }
            }
        }
        // Nodes settle what they hold prepared for a while (any node, any time: the worst case).
        for n in 0..self.size {
            if !self.nodes[n].up {
                continue;
            }
            for txn in 0..self.txns.len() {
                let started = self.txns[txn].since;
                let stale = self.nodes[n].attempts.get(&txn).is_none_or(|a| self.now - a.started > 30);
                if started + 10 < self.now as i64
                    && !self.nodes[n].ended.contains_key(&txn)
                    && stale
                    && self.rng.chance(if self.faults { 5 } else { 20 })
                {
                    self.resolve(n, txn);
                }
            }
        }
        if !self.faults {
            return;
        }
        // Faults: crash, restart, cut and heal links.
        let n = self.rng.below(self.size as u64) as usize;
        if self.rng.chance(2) && self.nodes[n].up {
            let now = self.now as i64;
            let keys: BTreeMap<usize, (NodeId, u32)> =
                self.nodes[n].durable.keys().map(|&t| (t, key(self, t))).collect();
            // Half the crashes are the machine's: the log loses what was not synced yet.
            let lost = if self.rng.chance(50) { self.rng.below(4) as usize } else { 0 };
            let node = &mut self.nodes[n];
            node.up = false;
            node.log.truncate(node.log.len().saturating_sub(lost).max(node.synced));
            node.records = Records::default();
            node.records.replay(node.log.iter().copied());
            for (txn, acceptor) in &node.durable {
                let (origin, xid) = keys[txn];
                node.records.make(origin, xid, now).acceptor.merge(acceptor);
            }
            node.precommits.clear();
            node.attempts.clear();
        } else if self.rng.chance(10) && !self.nodes[n].up {
            self.nodes[n].up = true;
            self.nodes[n].started_at = self.now as i64;
        }
        if self.rng.chance(2) {
            let a = self.rng.below(self.size as u64) as usize;
            let b = self.rng.below(self.size as u64) as usize;
            if a != b {
                self.cut.push((a.min(b), a.max(b)));
            }
        }
        if self.rng.chance(5) {
            self.cut.clear();
        }
    }

    fn check_agreement(&self) {
        if let Some(broken) = self.disagreement() {
            panic!("{broken}");
        }
    }

    /// The first transaction that ended differently on two nodes, or was acknowledged and rolled
    /// back somewhere.
    fn disagreement(&self) -> Option<String> {
        for txn in 0..self.txns.len() {
            let outcomes: Vec<Outcome> = self.nodes.iter().filter_map(|n| n.ended.get(&txn).copied()).collect();
            let commits = outcomes.iter().filter(|o| matches!(o, Outcome::Commit { .. })).count();
            if commits != 0 && commits != outcomes.len() {
                return Some(format!("txn {txn}: outcomes differ across nodes: {outcomes:?}"));
            }
            if self.txns[txn].acknowledged && commits != outcomes.len() {
                return Some(format!("txn {txn}: acknowledged but rolled back somewhere"));
            }
        }
        None
    }
}

/// Transactions per run.
const TXNS: usize = 12;

fn run(seed: u64) {
    // Every other run keeps fewer records than there are transactions.
    if seed % 2 == 0 {
        run_with::<TXNS>(seed)
    } else {
        run_with::<4>(seed)
    }
}

fn run_with<const N: usize>(seed: u64) {
    let size = if seed % 3 == 0 { 5 } else { 3 };
    let mut sim = Sim::<N>::new(seed, size, TXNS);
    for _ in 0..400 {
        sim.step();
        sim.check_agreement();
    }
    // Faults stop: everything comes back, and every transaction ends everywhere.
    sim.faults = false;
    sim.cut.clear();
    for n in 0..size {
        if !sim.nodes[n].up {
            sim.nodes[n].up = true;
            sim.nodes[n].started_at = sim.now as i64;
        }
    }
    // A node that restarted after a transaction began, or gave up a record that may have been
    // its, may have forgotten accepting it, and takes no part: a transaction ends for sure only
    // while a majority never forgot it, or some node remembers how it ended.
    let open = |sim: &Sim<N>| {
        let mut open = Vec::new();
        for t in 0..sim.txns.len() {
            let ((origin, xid), since) = (key(sim, t), sim.txns[t].since);
            let remember = sim
                .nodes
                .iter()
                .filter(|n| !indoubt::forgotten(n.records.memory(origin, xid, || false, n.started_at), since, MARGIN));
            let ended =
                sim.nodes.iter().any(|n| n.records.get(origin, xid).is_some_and(|r| r.acceptor.decided.is_some()));
            if ended || remember.count() * 2 > size {
                open.extend((0..size).filter(|&n| !sim.nodes[n].ended.contains_key(&t)).map(|n| (n, t)));
            }
        }
        open
    };
    for _ in 0..2000 {
        sim.step();
        sim.check_agreement();
        if open(&sim).is_empty() {
            return;
        }
    }
    let mut open = open(&sim);
    open.truncate(10);
    panic!("seed {seed}: transactions still in doubt after the faults stopped (node, txn): {open:?}");
}

#[test]
fn settlement_is_safe_and_ends_under_faults() {
    if let Some(seed) = std::env::var("SETTLEMENT_SEED").ok().and_then(|s| s.parse().ok()) {
        run(seed);
        return;
    }
    let seeds: u64 = std::env::var("SETTLEMENT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    for seed in 1..=seeds {
        let outcome = std::panic::catch_unwind(|| run(seed));
        if let Err(e) = outcome {
            let message = e.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("seed {seed} failed (replay: SETTLEMENT_SEED={seed}): {message}");
        }
    }
}

/// The hole `indoubt::durable` closes, step by step (3 nodes: node 1 coordinates, node 3
/// resolves, node 2 restarts in between): node 2 promises the resolver's ballot and restarts.
/// Had it forgotten the promise, it would accept the coordinator's precommit (a node catching
/// up takes it, see `indoubt::takes_no_part`): the coordinator, with its own acceptance, has a
/// majority for the commit, while the resolver, with node 2's promise and its own, proposes a
/// rollback that it and node 1 (bound only to its own ballot 0) accept. With
/// the promise kept, node 2 refuses the precommit and the rollback is the only outcome.
#[test]
fn a_promise_forgotten_in_a_restart_would_let_both_outcomes_be_chosen() {
    let (since, ts) = (1_000, 2_000);
    let resolver = Ballot { round: 1, node: 3 };
    let precommit = Request::Precommit { coordinator: NodeId(1), ts };
    let before = Memory { has_record: false, prepared_here: true, started_at: 0, evicted_at: None };
    let split = |kept_on_disk: bool| -> bool {
        let mut node2 = Acceptor::default();
        let promised = indoubt::answer(&mut node2, before, Request::Promise(resolver), since, MARGIN);
        assert_eq!(promised, Answer::Promised(None));
        assert!(indoubt::durable(Request::Promise(resolver)));
        // Node 2 restarts, after the transaction began.
        let after =
            Memory { has_record: kept_on_disk, prepared_here: false, started_at: since + 100, evicted_at: None };
        if !kept_on_disk {
            node2 = Acceptor::default();
        }
        // The coordinator accepted its own precommit, and node 2 takes it.
        let mut node1 = Acceptor::default();
        assert_eq!(indoubt::answer(&mut node1, before, precommit, since, MARGIN), Answer::Accepted);
        let took_precommit = indoubt::answer(&mut node2, after, precommit, since, MARGIN) == Answer::Accepted;
        // The resolver had node 2's promise and its own, neither with a value: it proposes the
        // rollback, which it and node 1 (bound only to its own ballot 0) accept.
        let mut node3 = Acceptor::default();
        indoubt::answer(&mut node3, before, Request::Promise(resolver), since, MARGIN);
        let accept = Request::Accept(resolver, Outcome::Abort);
        let rolled_back = indoubt::answer(&mut node3, before, accept, since, MARGIN) == Answer::Accepted
            && indoubt::answer(&mut node1, before, accept, since, MARGIN) == Answer::Accepted;
        // The coordinator (its own acceptance and node 2's) commits; the resolver rolls back.
        took_precommit && rolled_back
    };
    assert!(split(false), "forgotten: both outcomes");
    assert!(!split(true), "kept: one outcome");
}
