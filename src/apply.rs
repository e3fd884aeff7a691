//! Applying a peer's transactions at the executor level, the way PostgreSQL's own logical
//! replication worker does: rows are built from the peer's text values with the local input
//! functions, found by replica identity (index, or whole-row comparison for REPLICA IDENTITY
//! FULL) and written with `ExecSimpleRelationInsert/Update/Delete`, so constraints, indexes and
//! replica triggers behave as for any replicated change. Commits carry the peer's replication
//! origin, end LSN and commit time.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, CString};

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mmts_core::conflict::{remote_wins, writer_had_seen, Version};
use mmts_core::indoubt::Outcome;
use mmts_core::membership::{bit, format_mask, Mask, State};
use mmts_core::replication::format_lsn;
use mmts_core::twopc::{
    dependencies_met, on_conflict, Key, OnConflict, Signal, Vote, SERIALIZATION_FAILURE, SIGNAL_PREFIX,
};
use mmts_core::wire::{Message, Value};
use mmts_core::NodeId;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::logging::log;
use crate::twophase::{HolderKind, LockHolder};
use crate::{gucs, twophase};
use mmts_core::config::Mode;

/// A table as the peer described it.
#[derive(Clone)]
struct RemoteRelation {
    schema: String,
    name: String,
    columns: Vec<String>,
}

/// A transaction that is now committed (or prepared, or finished) here.
pub struct Applied {
    pub commit_time: pg_sys::TimestampTz,
}

pub struct Applier {
    peer: u32,
    /// This node's id.
    me: u32,
    relations: HashMap<u32, RemoteRelation>,
    in_transaction: bool,
    /// Commit (or prepare) time of the peer's transaction being applied.
    remote_time: pg_sys::TimestampTz,
    /// Replication origins of other nodes, as found so far.
    origins: HashMap<pg_sys::RepOriginId, u32>,
    conflict_insert: Option<pgrx::spi::OwnedPreparedStatement>,
    /// The peer's transaction being prepared: its changes are applied all at once when its
    /// PREPARE arrives, so that the attempt can be repeated after a lock conflict.
    preparing: Option<Preparing>,
    /// The transaction being applied is committed synchronously (no last-writer-wins).
    synchronous: bool,
    /// Peer's transactions this node (a member) could not prepare yet for a lock (held by a
    /// younger transaction, or one that is not being committed) or for what they depend on:
    /// set aside while what follows in the stream is applied, and tried again later. They are
    /// not voted on yet: if they are lost (a restart), their coordinator rolls them back.
    waiting: Vec<Waiting>,
    outbox: Vec<Signal>,
    /// What the writer of the transaction being applied had applied of the other nodes
    /// (`Signal::Seen`, asynchronous mode).
    seen: Vec<(NodeId, i64)>,
    /// The peer's transactions whose PREPARE this process received, until they end.
    received: HashSet<u32>,
    /// The peer's transactions committed here on their precommit, until their COMMIT
    /// PREPARED arrives (see [`Applier::commit_early`]).
    committed_early: HashSet<u32>,
}

#[derive(Default)]
struct Preparing {
    /// Its changes, schema changes and descriptions of tables, in order.
    changes: Vec<Message>,
    /// Tables described again in it, with their description before it.
    described: Vec<(u32, Option<RemoteRelation>)>,
    /// Set when the peer coordinates it synchronously: this node must vote.
    key: Option<Key>,
    /// The members its coordinator counted, and how far it had applied the other nodes.
    members: Mask,
    after: Vec<(NodeId, u64)>,
    first_attempt: Option<Instant>,
    /// A long wait was logged.
    reported: bool,
    /// Local transactions it wounded.
    wounded: Vec<u32>,
}

/// A peer's transaction set aside until the transactions holding a lock it needs end.
///
/// Applying it after transactions that follow it in the peer's stream is safe: it is prepared
/// on the peer, holding its rows there, until this node votes, so nothing after it in the
/// stream can write those rows.
struct Waiting {
    xid: u32,
    end_lsn: u64,
    prepare_time: i64,
    preparing: Preparing,
    /// Xids of the lock holders it waits for.
    holders: Vec<u32>,
    /// When to look again even if they have not ended.
    recheck: Instant,
}

thread_local! {
    /// The peer's transactions whose ROLLBACK PREPARED this receiver has received but not yet
    /// applied (see [`rolled_back_ahead`]), and whether they were rolled back here already.
    static ROLLED_BACK_AHEAD: std::cell::RefCell<HashMap<u32, bool>> = Default::default();
}

/// The receiver has received, further on in the stream, the rollback of the peer's
/// transaction `xid`: it is not prepared here any more, and one prepared already is rolled
/// back as soon as the receiver waits (see [`Applier::pause`]).
pub fn rolled_back_ahead(xid: u32) {
    ROLLED_BACK_AHEAD.with(|r| {
        r.borrow_mut().entry(xid).or_insert(false);
    });
}

fn doomed(xid: u32) -> bool {
    ROLLED_BACK_AHEAD.with(|r| r.borrow().contains_key(&xid))
}

/// While a transaction is applied, every this many changes the receiver reads what arrived
/// and sends its heartbeat.
const KEEP_UP_EVERY: usize = 1000;

/// How often a set-aside transaction is tried again while its lock holders run.
const RECHECK: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, PartialEq)]
enum Change {
    Insert,
    Update,
    Delete,
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).expect("NULs removed")
}

impl Applier {
    pub fn new(peer: u32, me: u32) -> Applier {
        Applier {
            peer,
            me,
            relations: HashMap::new(),
            in_transaction: false,
            remote_time: 0,
            origins: HashMap::new(),
            conflict_insert: None,
            preparing: None,
            synchronous: false,
            waiting: Vec::new(),
            outbox: Vec::new(),
            seen: Vec::new(),
            received: HashSet::new(),
            committed_early: HashSet::new(),
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// A new connection to the peer: what was half received is sent again; the transactions
    /// set aside stay (the stream resumes after them).
    pub fn reset_stream(&mut self) {
        // SAFETY: the receiver's main thread, between messages: a transaction left open by the
        // old stream may be aborted.
        unsafe {
            if pg_sys::IsTransactionState() {
                pg_sys::AbortCurrentTransaction();
            }
        }
        self.relations.clear();
        self.in_transaction = false;
        self.preparing = None;
        ROLLED_BACK_AHEAD.with(|r| r.borrow_mut().clear());
    }

    /// Whether transactions are set aside for locks.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Tries again the set-aside transactions whose lock holders ended (or that are due for a
    /// look); returns those now prepared or refused.
    pub fn retry_waiting(&mut self, keep_up: &mut dyn FnMut()) -> Vec<Applied> {
        let now = Instant::now();
        let due = |w: &Waiting| {
            now >= w.recheck
                || w.holders
                    .iter()
                    .all(|&x| unsafe { !pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(x)) })
        };
        let (ready, still): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.waiting).into_iter().partition(due);
        if ready.is_empty() {
            self.waiting = still;
            return Vec::new();
        }
        self.waiting = still;
        ready.into_iter().filter_map(|w| self.prepare(w.xid, w.end_lsn, w.prepare_time, w.preparing, keep_up)).collect()
    }

    /// The local name of the peer's prepared transaction `xid`.
    fn gid(&self, xid: u32) -> CString {
        cstring(&format!("mtm_{}_{}", self.peer, xid))
    }

    /// Applies one message; returns what finished when a transaction ends.
    /// A transaction set aside for a lock is not finished yet: see [`Applier::retry_waiting`].
    /// `keep_up` is called now and then while a large transaction is applied.
    pub fn apply(&mut self, message: Message, keep_up: &mut dyn FnMut()) -> Option<Applied> {
        if let Some(preparing) = &mut self.preparing {
            match &message {
                Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. } | Message::Truncate { .. } => {
                    preparing.changes.push(message);
                    return None;
                }
                Message::LogicalMessage { .. } if ddl_signal(self.peer, &message).is_some() => {
                    preparing.changes.push(message);
                    return None;
                }
                Message::Relation(r) => {
                    // Described now for the transactions that follow, and again where it
                    // stands in this one when it is applied (its changes before a schema
                    // change use the description from before).
                    if !preparing.described.iter().any(|(id, _)| *id == r.id) {
                        preparing.described.push((r.id, self.relations.get(&r.id).cloned()));
                    }
                    preparing.changes.push(message.clone());
                }
                _ => {}
            }
        }
        match message {
            Message::Begin { commit_time: time, .. } => {
                // The local transaction starts with the first change (an empty one costs nothing).
                self.in_transaction = true;
                self.remote_time = time;
                self.seen.clear();
                None
            }
            Message::BeginPrepare { prepare_time, .. } => {
                self.in_transaction = true;
                self.remote_time = prepare_time;
                self.preparing = Some(Preparing::default());
                None
            }
            Message::Relation(r) => {
                self.describe(&r);
                None
            }
            Message::Insert { relation, new } => {
                self.change(relation, Change::Insert, None, Some(&new));
                None
            }
            Message::Update { relation, old, new } => {
                self.change(relation, Change::Update, old.as_deref(), Some(&new));
                None
            }
            Message::Delete { relation, old } => {
                self.change(relation, Change::Delete, Some(&old), None);
                None
            }
            Message::Truncate { relations, cascade, restart_identity } => {
                self.truncate(&relations, cascade, restart_identity);
                None
            }
            Message::Commit { end_lsn, commit_time, .. } => {
                self.ended(end_lsn);
                // SAFETY: the receiver's main thread, which set up its session's replication
                // origin at start (as replorigin_session_advance requires).
                unsafe {
                    if pg_sys::IsTransactionState() {
                        set_origin_position(end_lsn, commit_time);
                        pg_sys::CommitTransactionCommand();
                        // Local transactions that see its rows from now on say so (`Signal::Seen`).
                        crate::status::update(self.peer, |p| p.applied_commit_time = commit_time);
                    } else {
                        // Nothing to apply (e.g. only catalog changes): applied as far as here
                        // all the same, also after a restart (transactions of other nodes that
                        // depend on this stream wait for that).
                        pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64);
                    }
                }
                twophase::clock_observe(commit_time);
                Some(self.finished(commit_time))
            }
            Message::Prepare { xid, end_lsn, prepare_time, .. } => {
                self.received.insert(xid);
                let preparing = self.preparing.take().unwrap_or_default();
                self.in_transaction = false;
                let catching_up = preparing.key.is_some() && preparing.members & bit(NodeId(self.me)) == 0;
                let done = self.prepare(xid, end_lsn, prepare_time, preparing, keep_up);
                if done.is_none() && catching_up {
                    // Not set aside for long: see `Applier::prepare`.
                    self.prepare_set_aside(xid, keep_up);
                    return Some(self.finished(prepare_time));
                }
                done
            }
            Message::CommitPrepared { xid, end_lsn, commit_time, .. } => {
                self.prepare_set_aside(xid, keep_up);
                self.ended(end_lsn);
                let received = self.received.remove(&xid);
                let early = self.committed_early.remove(&xid);
                let members = twophase::applied_members(self.peer, xid);
                let found = !early && finish_at(&self.gid(xid), true, end_lsn, commit_time);
                if let (true, Some(members)) = (found || early, members) {
                    twophase::committed_without(members, NodeId(self.peer), end_lsn);
                }
                if found {
                    twophase::with_acceptor(NodeId(self.peer), xid, |a| a.decide(Outcome::Commit { ts: commit_time }));
                } else {
                    // Applied as far as here all the same.
                    unsafe { pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64) };
                    if received && twophase::decided(NodeId(self.peer), xid).is_none() {
                        // Committed without this node's yes: it was not asked (it was out of
                        // reach when the transaction was prepared) and could not prepare it
                        // when it came. (Settled here already, or committed on its precommit,
                        // it is decided.)
                        ereport!(
                            PgLogLevel::WARNING,
                            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                            format!(
                                "mmts: node {} committed its transaction {xid}, which this node did not prepare; this node lacks its changes",
                                self.peer
                            )
                        );
                    }
                }
                twophase::unregister_applied(self.peer, Some(xid));
                twophase::clock_observe(commit_time);
                if early {
                    // Said "finished" when it committed.
                    return None;
                }
                // The coordinator returns COMMIT to its client once every peer said this.
                self.signal_finished(xid, true);
                Some(self.finished(commit_time))
            }
            Message::RollbackPrepared { xid, end_lsn, prepare_time, rollback_time, .. } => {
                // Decided without this node's vote (a no from another node, or its deadline).
                self.received.remove(&xid);
                self.waiting.retain(|w| w.xid != xid);
                ROLLED_BACK_AHEAD.with(|r| r.borrow_mut().remove(&xid));
                self.ended(end_lsn);
                let gid = self.gid(xid);
                // SAFETY: the receiver's main thread, its replication origin set up; `gid`
                // outlives the block.
                unsafe {
                    start_transaction();
                    // The prepare may have been skipped (e.g. it touched nothing replicated).
                    if twophase::lookup_prepared(&gid, end_lsn, prepare_time) {
                        set_origin_position(end_lsn, rollback_time);
                        twophase::finish_prepared(&gid, false);
                    } else {
                        // Applied as far as here all the same (transactions that depend on
                        // the peer's stream wait for that: see `wait_for_dependencies`).
                        pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64);
                    }
                    pg_sys::CommitTransactionCommand();
                }
                twophase::unregister_applied(self.peer, Some(xid));
                twophase::with_acceptor(NodeId(self.peer), xid, |a| a.decide(Outcome::Abort));
                if gucs::synchronous() {
                    // The coordinator reports the rollback once no node holds the rows any more
                    // (a retry at once would otherwise lose to the leftover).
                    self.signal_finished(xid, false);
                }
                Some(self.finished(rollback_time))
            }
            Message::LogicalMessage { transactional: true, prefix, content, .. } if prefix == SIGNAL_PREFIX => {
                match (crate::provenance::admit(self.peer, &content), &mut self.preparing) {
                    (Some(Signal::Coordinated { key, members, after }), Some(p)) => {
                        twophase::clock_observe(key.ts);
                        p.key = Some(key);
                        p.members = members;
                        p.after = after;
                    }
                    (Some(Signal::Ddl { role, search_path, statement }), None) => {
                        unsafe { start_transaction() };
                        crate::ddl::run(&role, &search_path, &statement);
                    }
                    (Some(Signal::Seen { applied }), None) => self.seen = applied,
                    _ => {}
                }
                None
            }
            Message::LogicalMessage { transactional: false, prefix, content, lsn } if prefix == SIGNAL_PREFIX => {
                match crate::provenance::admit(self.peer, &content) {
                    Some(Signal::Resolved { origin, xid, outcome }) => {
                        self.carry_out(origin, xid, outcome, lsn, keep_up);
                        None
                    }
                    Some(Signal::Precommit { xid, ts, .. }) => self.commit_early(xid, ts, lsn, keep_up),
                    _ => None,
                }
            }
            Message::LogicalMessage { .. } | Message::Keepalive { .. } | Message::Hello { .. } => None,
        }
    }

    /// The peer's transactions have ended here as far as `end` in its stream. Recorded just
    /// before the commit releases their row locks: a local transaction that waited for one of
    /// those locks then counts it among what it depends on (see `Signal::Coordinated`).
    fn ended(&self, end: u64) {
        crate::status::update(self.peer, |p| p.ended_lsn = p.ended_lsn.max(end));
    }

    /// Prepares the peer's transaction `xid` now if it is set aside: its outcome has come (or
    /// this node is catching up). Dropped instead if its rollback is further on in the stream.
    fn prepare_set_aside(&mut self, xid: u32, keep_up: &mut dyn FnMut()) {
        while let Some(i) = self.waiting.iter().position(|w| w.xid == xid) {
            let w = self.waiting.swap_remove(i);
            if doomed(xid) {
                break;
            }
            if self.prepare(w.xid, w.end_lsn, w.prepare_time, w.preparing, keep_up).is_none() {
                self.pause(keep_up);
            }
        }
    }

    /// A pause while the stream waits: reads what arrives, and rolls back the transactions
    /// prepared here whose rollback is further on in the stream. A node catching up prepares
    /// every transaction that comes, including those the members then roll back (for a
    /// conflict, say): one of those may hold rows the awaited transaction needs, while its
    /// rollback waits behind it in the stream.
    fn pause(&mut self, keep_up: &mut dyn FnMut()) {
        keep_up();
        let due: Vec<u32> = ROLLED_BACK_AHEAD.with(|r| {
            r.borrow_mut()
                .iter_mut()
                .filter(|(_, done)| !**done)
                .map(|(xid, done)| {
                    *done = true;
                    *xid
                })
                .collect()
        });
        for xid in due {
            // Not moving the stream's position: the rollback is applied again in its turn.
            finish_at(&self.gid(xid), false, 0, unsafe { pg_sys::GetCurrentTimestamp() });
        }
        nap(1);
    }

    /// Carries out the outcome a resolver settled for transaction `xid` of node `origin` (this
    /// receiver's peer or another node), at position `lsn` of this peer's stream.
    fn carry_out(&mut self, origin: NodeId, xid: u32, outcome: Outcome, lsn: u64, keep_up: &mut dyn FnMut()) {
        if origin.0 == self.me && twophase::is_coordinated(xid) {
            // Its backend still runs, and ends it the way it was settled.
            return;
        }
        if origin.0 == self.peer {
            self.prepare_set_aside(xid, keep_up);
        }
        self.ended(lsn);
        let gid = cstring(&format!("mtm_{origin}_{xid}"));
        let (commit, time) = match outcome {
            Outcome::Commit { ts } => (true, ts),
            Outcome::Abort => (false, unsafe { pg_sys::GetCurrentTimestamp() }),
        };
        // The commit records the settled timestamp, as on every node.
        let done = finish_at(&gid, commit, lsn, time);
        twophase::settled(origin, xid, outcome);
        if done {
            if commit {
                // Announced in the peer's stream: everyone must have applied that far to write.
                twophase::committed_without(0, NodeId(self.peer), lsn);
            }
            twophase::unregister_applied(origin.0, Some(xid));
            log(format!(
                "mmts: {} transaction {xid} of node {origin} as the cluster settled it",
                if commit { "committed" } else { "rolled back" }
            ));
        }
    }

    /// Commits the peer's transaction `xid` at `ts` on its precommit (at `lsn` in the stream)
    /// when that is already the outcome: this node accepted the precommit (see
    /// `twophase::answer`), its coordinator accepted it before sending it, and the two are a
    /// majority of the cluster (three nodes or fewer). The coordinator commits meanwhile, at
    /// the same timestamp (see `commit_origin`), and hears "finished" one step sooner.
    fn commit_early(&mut self, xid: u32, ts: i64, lsn: u64, keep_up: &mut dyn FnMut()) -> Option<Applied> {
        let Mode::Multimaster(config) = gucs::mode() else { return None };
        let commit = Outcome::Commit { ts };
        let peer = NodeId(self.peer);
        let size = crate::status::configured(config).count_ones() as usize;
        let chosen = twophase::with_acceptor(peer, xid, |a| mmts_core::indoubt::chosen_on_precommit(a, peer, ts, size));
        if !chosen {
            return None;
        }
        self.prepare_set_aside(xid, keep_up);
        self.ended(lsn);
        // Not moving the stream's position: it moves with the COMMIT PREPARED further on.
        let done = finish_at(&self.gid(xid), true, 0, ts);
        // The outcome, also when it is not prepared here (received again after a restart).
        twophase::with_acceptor(peer, xid, |a| a.decide(commit));
        if !done {
            return None;
        }
        self.committed_early.insert(xid);
        twophase::clock_observe(ts);
        self.signal_finished(xid, true);
        Some(self.finished(ts))
    }

    /// Why the coordinator may have written over rows older than this node's: it had not
    /// applied all this node committed while it was not a member (it was catching up).
    fn stale(&self, preparing: &Preparing) -> Option<String> {
        let need = twophase::must_have_applied(NodeId(self.peer));
        let seen = |p: u32| preparing.after.iter().find(|(n, _)| n.0 == p).map_or(0, |(_, lsn)| *lsn);
        // A dropped node's stream is not counted (see `nodes::drop_node`).
        let dropped = crate::status::dropped();
        let behind = (1..=need.len() as u32)
            .find(|&p| p != self.peer && dropped & bit(NodeId(p)) == 0 && seen(p) < need[p as usize - 1])?;
        Some(format!(
            "node {} had not yet applied all of node {behind}'s transactions that node {} committed while it was catching up",
            self.peer, self.me
        ))
    }

    /// Why this node cannot vote yes on a transaction whose coordinator counted `members`.
    fn membership_differs(&self, members: Mask) -> Option<String> {
        let Mode::Multimaster(config) = gucs::mode() else { return None };
        let view = crate::status::current(config).view;
        if view.state != State::Online {
            Some(format!("node {} is {}, not online", self.me, view.state.name()))
        } else if view.members != members {
            Some(format!(
                "node {} counts members {}, node {} counted {}",
                self.me,
                format_mask(view.members),
                self.peer,
                format_mask(members)
            ))
        } else {
            None
        }
    }

    /// Votes and "finished" for the peer, sent by the receiver (see [`Applier::take_signals`]).
    fn signal(&mut self, signal: Signal) {
        self.outbox.push(signal);
    }

    /// Tells the peer this node has finished its transaction `xid` as decided.
    fn signal_finished(&mut self, xid: u32, committed: bool) {
        self.signal(Signal::Finished { origin: NodeId(self.peer), xid, voter: NodeId(self.me), committed });
    }

    /// The signals for the peer since the last call.
    pub fn take_signals(&mut self) -> Vec<Signal> {
        std::mem::take(&mut self.outbox)
    }

    /// Applies and prepares the peer's transaction `xid`; when the peer coordinates it, votes.
    /// `None` when it is set aside for a lock.
    fn prepare(
        &mut self,
        xid: u32,
        end_lsn: u64,
        prepare_time: i64,
        mut preparing: Preparing,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        let first_attempt = *preparing.first_attempt.get_or_insert_with(Instant::now);
        let key = preparing.key;
        if key.is_some() && doomed(xid) {
            // Its rollback has been received already.
            return Some(self.finished(prepare_time));
        }
        let settled = twophase::decided(NodeId(self.peer), xid);
        if settled == Some(Outcome::Abort) {
            // Rolled back by the cluster before it reached this node.
            return Some(self.finished(prepare_time));
        }
        // A member votes; a node that is not (catching up) must apply it whatever it takes.
        let member = preparing.members & bit(NodeId(self.me)) != 0;
        if key.is_some() && member {
            if let Some(message) = self.membership_differs(preparing.members).or_else(|| self.stale(&preparing)) {
                let vote = Vote::No { sqlstate: SERIALIZATION_FAILURE.into(), message };
                self.signal(Signal::Vote { origin: NodeId(self.peer), xid, voter: NodeId(self.me), vote });
                return Some(self.finished(prepare_time));
            }
        }
        // What the coordinator had applied of the other streams must be applied here first,
        // so that the transaction's changes land over the rows it saw. A member sets it aside
        // until then (its own stream goes on) and gives up after half the coordinator's
        // shortest wait; it need not wait for nodes out of its partition: it prepared every
        // transaction they committed, which holds its rows until it ends. A node catching up
        // waits here, as long as it takes, for every stream: it may not have received those
        // transactions at all, and one set aside would be lost in a crash once the stream's
        // position moved past it (the members commit it without this node). It does not wait
        // for a transaction whose rollback it has received already.
        let partition = match gucs::mode() {
            Mode::Multimaster(config) => crate::status::current(config).view.partition,
            Mode::Standalone => 0,
        };
        let (me, peer) = (self.me, self.peer);
        let skip = |n: NodeId| n.0 == me || n.0 == peer || (member && partition & bit(n) == 0);
        let met = || dependencies_met(&preparing.after, |n| crate::status::applied_through(n.0), skip);
        if key.is_some() && !member {
            // Shown in mtm.get_nodes_state() and logged once it lasts a few heartbeats, then
            // logged again every WAIT_LOG_EVERY while it lasts.
            let shown = WaitShown(self.peer);
            let report_after = Duration::from_millis(5 * gucs::HEARTBEAT_SEND_TIMEOUT.get() as u64);
            let mut logged: Option<Instant> = None;
            while !met() {
                if doomed(xid) {
                    return Some(self.finished(prepare_time));
                }
                let waited = first_attempt.elapsed();
                if waited >= report_after && logged.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                    logged = Some(Instant::now());
                    let unmet: Vec<(NodeId, u64)> = preparing
                        .after
                        .iter()
                        .copied()
                        .filter(|(n, lsn)| !skip(*n) && crate::status::applied_through(n.0) < *lsn)
                        .collect();
                    if let Some(&(node, lsn)) = unmet.first() {
                        let since = unsafe { pg_sys::GetCurrentTimestamp() } - waited.as_micros() as i64;
                        shown.set(crate::status::Wait { since, xid, node: node.0, lsn });
                    }
                    let unmet: Vec<String> = unmet
                        .iter()
                        .map(|(n, lsn)| {
                            format!(
                                "node {n} as far as {} (applied here: {})",
                                format_lsn(*lsn),
                                format_lsn(crate::status::applied_through(n.0))
                            )
                        })
                        .collect();
                    log(format!(
                        "mmts: transaction {xid} of node {} has waited {:.1} s for this node to apply what it depends on: {}",
                        self.peer,
                        waited.as_secs_f64(),
                        unmet.join(", ")
                    ));
                }
                if pgrx::bgworkers::BackgroundWorker::sigterm_received() {
                    ereport!(
                        PgLogLevel::FATAL,
                        PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
                        format!("mmts: replication from node {} stopped while catching up", self.peer)
                    );
                }
                self.pause(keep_up);
            }
        } else if key.is_some() && !met() {
            let waited = first_attempt.elapsed();
            if waited.as_millis() as i64 >= gucs::TWOPC_MIN_TIMEOUT.get() as i64 / 2 {
                let vote = Vote::No {
                    sqlstate: SERIALIZATION_FAILURE.into(),
                    message: format!("node {} has not yet applied what the transaction depends on", self.me),
                };
                self.signal(Signal::Vote { origin: NodeId(self.peer), xid, voter: NodeId(self.me), vote });
                return Some(self.finished(prepare_time));
            }
            if waited >= Duration::from_secs(1) && !preparing.reported {
                preparing.reported = true;
                log(format!(
                    "mmts: transaction {xid} of node {} has waited {} ms for this node to apply what it depends on",
                    self.peer,
                    waited.as_millis()
                ));
            }
            self.waiting.push(Waiting {
                xid,
                end_lsn,
                prepare_time,
                preparing,
                holders: Vec::new(),
                recheck: Instant::now(),
            });
            return None;
        }
        let gid = self.gid(xid);
        self.synchronous = key.is_some();
        if key.is_some() {
            twophase::set_applying(self.peer, key);
        }
        AWAITED.clear();
        // Tables described again inside the transaction start from their earlier description;
        // the latest ones are put back afterwards.
        let latest = (!preparing.described.is_empty()).then(|| self.relations.clone());
        for (id, before) in &preparing.described {
            match before {
                Some(r) => self.relations.insert(*id, r.clone()),
                None => self.relations.remove(id),
            };
        }
        let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
            // A synchronous transaction does not wait long for a lock without looking at who
            // holds it (see `on_lock_wait_timer`).
            lock_wait_timer(self.synchronous);
            for (i, change) in preparing.changes.iter().enumerate() {
                if i % KEEP_UP_EVERY == KEEP_UP_EVERY - 1 {
                    keep_up();
                }
                self.apply_change(change);
            }
            lock_wait_timer(false);
            // SAFETY: main thread, inside the transaction the changes were applied in; this is
            // xact.c's sequence for PREPARE TRANSACTION, and `gid` outlives the block.
            unsafe {
                start_transaction();
                let local_xid = pg_sys::GetTopTransactionId().into_inner();
                pg_sys::BeginTransactionBlock();
                pg_sys::CommitTransactionCommand();
                set_origin_position(end_lsn, prepare_time);
                pg_sys::PrepareTransactionBlock(gid.as_ptr());
                pg_sys::CommitTransactionCommand();
                Ok(local_xid)
            }
        }))
        .catch_others(|e| {
            lock_wait_timer(false);
            let awaited = AWAITED.take();
            unsafe { pg_sys::AbortCurrentTransaction() };
            let (code, message) = match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
                | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    (r.sql_error_code(), r.message().to_string())
                }
            };
            Err((code, message, awaited))
        })
        .execute();
        if let Some(latest) = latest {
            self.relations = latest;
        }
        self.synchronous = false;
        // A cancel raised by the timer for a lock wait that ended before it was acted on (or
        // one raised again as the wait was being canceled) must not stop the receiver at its
        // next interrupt check: cancels only ever concern the apply attempt just made.
        AWAITED.clear();
        // SAFETY: main thread, timer disarmed; a `sig_atomic_t` PostgreSQL's handlers only set.
        unsafe { pg_sys::QueryCancelPending = 0 };
        let Some(key) = key else {
            // Not coordinated (asynchronous mode): an error stops the receiver, as for a commit.
            if let Err((code, message, _)) = outcome {
                ErrorReport::new(code, message, "mmts").report(PgLogLevel::ERROR);
            }
            return Some(self.finished(prepare_time));
        };
        twophase::set_applying(self.peer, None);
        let vote = match outcome {
            Ok(local_xid) => {
                twophase::register_applied(local_xid, key, self.peer, xid, preparing.members);
                Vote::Yes { proposal: twophase::clock_next() }
            }
            Err((code, _, Some((tag, mode)))) if code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED => {
                let waited = first_attempt.elapsed().as_millis() as i64;
                let holders = unsafe { lock_holders(&tag, mode) };
                let mut older = None;
                let mut kinds = Vec::new();
                for holder in &holders {
                    let kind = twophase::classify_holder(holder, key.node);
                    match kind {
                        HolderKind::Committing(h) if on_conflict(key, Some(h)) == OnConflict::Die => older = Some(h),
                        HolderKind::Wounded if !preparing.wounded.contains(&holder.xid) => {
                            preparing.wounded.push(holder.xid)
                        }
                        _ => {}
                    }
                    kinds.push(match kind {
                        HolderKind::Committing(h) => {
                            format!("transaction {} of node {} being committed", holder.xid, h.node)
                        }
                        HolderKind::Wounded => format!("local transaction {} of node {}", holder.xid, self.me),
                        HolderKind::Other => format!("transaction {} of node {}", holder.xid, self.me),
                    });
                }
                if older.is_none() && waited >= 1000 && !preparing.reported {
                    preparing.reported = true;
                    log(format!(
                        "mmts: transaction {xid} of node {} ({key:?}) has waited {waited} ms for a lock held by {}",
                        self.peer,
                        kinds.join(", ")
                    ));
                }
                match older {
                    Some(h) if member => Vote::No {
                        sqlstate: SERIALIZATION_FAILURE.into(),
                        message: format!(
                            "could not serialize access due to a concurrent transaction of node {} being committed",
                            h.node
                        ),
                    },
                    // A member sets it aside for half the coordinator's shortest wait (the
                    // reason reaches it in time); a node catching up tries again in place
                    // until the holder ends, or its own rollback arrives (the members may have
                    // rolled it back for this very conflict).
                    _ if !member || waited < gucs::TWOPC_MIN_TIMEOUT.get() as i64 / 2 => {
                        self.waiting.push(Waiting {
                            xid,
                            end_lsn,
                            prepare_time,
                            preparing,
                            holders: holders.iter().map(|h| h.xid).filter(|&x| x != 0).collect(),
                            recheck: Instant::now() + RECHECK,
                        });
                        return None;
                    }
                    _ => {
                        // A wounded transaction that stayed idle all along keeps its rows.
                        for &x in &preparing.wounded {
                            twophase::heal(x, key.node);
                        }
                        Vote::No {
                            sqlstate: SERIALIZATION_FAILURE.into(),
                            message: format!(
                                "could not serialize access: waited {waited} ms for a row lock held by {}",
                                kinds.join(", ")
                            ),
                        }
                    }
                }
            }
            Err((code, message, _)) if !member => {
                // Not this node's to refuse: the members decide. It tries again in place until
                // the outcome arrives: rolled back (the members refused it too, for this very
                // error, say), it is dropped; committed, this node must apply it, and it says
                // why it cannot (mtm.get_nodes_state().apply_error) while it keeps trying.
                let text = format!(
                    "cannot apply transaction {xid} of node {}: {message} (SQLSTATE {})",
                    self.peer,
                    twophase::sqlstate_text(code)
                );
                crate::status::set_apply_error(self.peer, &text);
                if !preparing.reported {
                    preparing.reported = true;
                    log(format!("mmts: {text}; trying again until its outcome arrives"));
                }
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until && !doomed(xid) {
                    self.pause(keep_up);
                }
                self.waiting.push(Waiting {
                    xid,
                    end_lsn,
                    prepare_time,
                    preparing,
                    holders: Vec::new(),
                    recheck: Instant::now(),
                });
                return None;
            }
            Err((code, message, _)) => Vote::No { sqlstate: twophase::sqlstate_text(code), message },
        };
        let prepared = matches!(vote, Vote::Yes { .. });
        self.signal(Signal::Vote { origin: NodeId(self.peer), xid, voter: NodeId(self.me), vote });
        if let (true, Some(outcome)) = (prepared, settled) {
            // Committed by the cluster before it reached this node.
            self.carry_out(NodeId(self.peer), xid, outcome, end_lsn, keep_up);
        }
        Some(self.finished(prepare_time))
    }

    fn apply_change(&mut self, message: &Message) {
        if let Some(Signal::Ddl { role, search_path, statement }) = ddl_signal(self.peer, message) {
            unsafe { start_transaction() };
            crate::ddl::run(&role, &search_path, &statement);
            return;
        }
        match message {
            Message::Relation(r) => self.describe(r),
            Message::Insert { relation, new } => self.change(*relation, Change::Insert, None, Some(new)),
            Message::Update { relation, old, new } => self.change(*relation, Change::Update, old.as_deref(), Some(new)),
            Message::Delete { relation, old } => self.change(*relation, Change::Delete, Some(old), None),
            Message::Truncate { relations, cascade, restart_identity } => {
                self.truncate(relations, *cascade, *restart_identity)
            }
            _ => {}
        }
    }

    fn describe(&mut self, r: &mmts_core::wire::Relation) {
        let columns = r.columns.iter().map(|c| c.name.clone()).collect();
        self.relations.insert(r.id, RemoteRelation { schema: r.schema.clone(), name: r.name.clone(), columns });
    }

    fn finished(&mut self, commit_time: pg_sys::TimestampTz) -> Applied {
        self.in_transaction = false;
        Applied { commit_time }
    }

    fn remote(&self, relation: u32) -> &RemoteRelation {
        self.relations.get(&relation).unwrap_or_else(|| {
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
                format!("mmts: node {} sent a change to relation {relation} before describing it", self.peer)
            );
            unreachable!()
        })
    }

    /// Opens the local table for the peer's relation (locked until the end of the transaction).
    unsafe fn open(&self, relation: u32, lock: u32) -> pg_sys::Relation {
        let remote = self.remote(relation);
        let (schema, name) = (cstring(&remote.schema), cstring(&remote.name));
        // SAFETY: inside the applied transaction (the caller's). `rv` keeps pointers to
        // `schema` and `name`, which outlive it; table_open returns an open relation or raises.
        unsafe {
            let rv = pg_sys::makeRangeVar(schema.as_ptr().cast_mut(), name.as_ptr().cast_mut(), -1);
            let relid = pg_sys::RangeVarGetRelidExtended(
                rv,
                lock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            );
            if relid == pg_sys::InvalidOid {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    format!(
                        "mmts: table \"{}\".\"{}\" replicated from node {} does not exist here",
                        remote.schema, remote.name, self.peer
                    ),
                    "mmts",
                )
                .set_hint("Create the table on every node with the same definition.")
                .report(PgLogLevel::ERROR);
            }
            let rel = pg_sys::table_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
            if (*(*rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as c_char {
                ereport!(
                    PgLogLevel::ERROR,
                    PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                    format!("mmts: \"{}\".\"{}\" is not a plain table here", remote.schema, remote.name)
                );
            }
            rel
        }
    }

    fn change(&mut self, relation: u32, kind: Change, old: Option<&[Value]>, new: Option<&[Value]>) {
        // SAFETY: main thread, inside the applied transaction. `rel` stays open and locked until
        // table_close below, and `desc` is its descriptor (attrs indexed below `natts`). The
        // executor state, range table entry, result relation and slots are palloc'd in the
        // transaction and made as ExecInitRangeTable/InitResultRelInfo expect (zeroed, tagged);
        // `epq` is zeroed, then initialised by EvalPlanQualInit and ended before it goes.
        unsafe {
            start_transaction();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let rel = self.open(relation, pg_sys::RowExclusiveLock);
            let remote = self.remote(relation);
            let lists_local_tables = remote.schema == "mtm" && remote.name == "local_tables";
            let desc = (*rel).rd_att;
            let natts = (*desc).natts as usize;
            // For each local column, the position of the peer's column of the same name.
            let map: Vec<Option<usize>> = (0..natts)
                .map(|i| {
                    let att = &*(*desc).attrs.as_ptr().add(i);
                    if att.attisdropped || att.attgenerated != 0 {
                        return None;
                    }
                    let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy();
                    remote.columns.iter().position(|c| *c == name)
                })
                .collect();

            let estate = pg_sys::CreateExecutorState();
            let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()) as *mut pg_sys::RangeTblEntry;
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = (*rel).rd_id;
            (*rte).relkind = (*(*rel).rd_rel).relkind;
            (*rte).rellockmode = pg_sys::AccessShareLock as i32;
            pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(std::ptr::null_mut(), rte.cast()));
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()) as *mut pg_sys::ResultRelInfo;
            (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_opened_result_relations = pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::AfterTriggerBeginQuery();
            let tuple_memory = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
            let remoteslot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
            pg_sys::ExecOpenIndices(rri, false);

            // The row this change is about: the new row for an insert (to detect that the key
            // exists already), else the old key if the peer sent one, else the new row's key.
            let search = if kind == Change::Insert { new } else { old.or(new) }.expect("a change has a row");
            let previous = pg_sys::MemoryContextSwitchTo(tuple_memory);
            store_values(remoteslot, desc, &map, search, None);
            pg_sys::MemoryContextSwitchTo(previous);
            let localslot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
            let mut index = pg_sys::RelationGetReplicaIndex(rel);
            if index == pg_sys::InvalidOid {
                index = pg_sys::RelationGetPrimaryKeyIndex(rel);
            }
            let found = if index != pg_sys::InvalidOid {
                pg_sys::RelationFindReplTupleByIndex(
                    rel,
                    index,
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    remoteslot,
                    localslot,
                )
            } else if kind == Change::Insert {
                false // without a key, an insert never collides
            } else {
                pg_sys::RelationFindReplTupleSeq(rel, pg_sys::LockTupleMode::LockTupleExclusive, remoteslot, localslot)
            };
            let remote = Version { commit_time: self.remote_time, node: NodeId(self.peer) };
            let mut epq: pg_sys::EPQState = std::mem::zeroed();
            pg_sys::EvalPlanQualInit(&mut epq, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
            // A synchronously committed change was made over exactly the version this node has
            // (the two-phase commit holds the rows everywhere): apply it as it is; a row that
            // exists or is missing here is a real disagreement, and this node votes no.
            let synchronous = self.synchronous;
            match (kind, found) {
                (Change::Insert, false) => pg_sys::ExecSimpleRelationInsert(rri, estate, remoteslot),
                (Change::Insert, true) if synchronous => {
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                        format!("duplicate key: the row inserted on node {} already exists here", self.peer)
                    );
                }
                (Change::Update, true) if synchronous => {
                    let previous = pg_sys::MemoryContextSwitchTo(tuple_memory);
                    store_values(remoteslot, desc, &map, new.expect("a new row"), Some(localslot));
                    pg_sys::MemoryContextSwitchTo(previous);
                    epq.origslot = remoteslot;
                    pg_sys::ExecSimpleRelationUpdate(rri, estate, &mut epq, localslot, remoteslot);
                }
                (Change::Update, false) if synchronous => {
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        format!("the row updated on node {} does not exist here", self.peer)
                    );
                }
                (Change::Insert | Change::Update, true) => {
                    let local = self.version(localslot);
                    // Over a version written by the same peer this is the normal course of
                    // events; over another node's version, last writer wins.
                    let wins = local.node.0 == self.peer || remote_wins(remote, local);
                    // A version the writer had seen is simply overwritten; one it had not is
                    // a conflict, and so is every write that loses.
                    if !wins || !writer_had_seen(local, NodeId(self.peer), &self.seen) {
                        let what = if kind == Change::Insert { "insert_exists" } else { "update_update" };
                        self.record_conflict(rel, what, remote, Some(local), wins, new.expect("a new row"));
                    }
                    if wins {
                        let previous = pg_sys::MemoryContextSwitchTo(tuple_memory);
                        store_values(remoteslot, desc, &map, new.expect("a new row"), Some(localslot));
                        pg_sys::MemoryContextSwitchTo(previous);
                        epq.origslot = remoteslot;
                        pg_sys::ExecSimpleRelationUpdate(rri, estate, &mut epq, localslot, remoteslot);
                    }
                }
                (Change::Update, false) => {
                    // Deleted here concurrently: the delete wins (it wins on every node).
                    self.record_conflict(rel, "update_missing", remote, None, false, new.expect("a new row"));
                }
                (Change::Delete, true) => {
                    epq.origslot = localslot;
                    pg_sys::ExecSimpleRelationDelete(rri, estate, &mut epq, localslot);
                }
                (Change::Delete, false) => {} // already gone here
            }
            pg_sys::EvalPlanQualEnd(&mut epq);
            if lists_local_tables {
                // Which tables are local changed: this node's walsenders must look again.
                invalidate_named_table(old.or(new).expect("a change has a row"));
            }
            pg_sys::ExecCloseIndices(rri);
            pg_sys::AfterTriggerEndQuery(estate);
            pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(estate);
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
    }

    /// When and where the local version in `slot` was committed.
    unsafe fn version(&mut self, slot: *mut pg_sys::TupleTableSlot) -> Version {
        // SAFETY: `slot` holds the local row just found (the caller's part); the heap tuple
        // fetched from it has a valid header.
        unsafe {
            let mut should_free = false;
            let tuple = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
            let xmin = (*(*tuple).t_data).t_choice.t_heap.t_xmin;
            let mut time: pg_sys::TimestampTz = 0;
            let mut origin: pg_sys::RepOriginId = 0;
            let known = xmin.into_inner() >= pg_sys::FirstNormalTransactionId.into_inner()
                && pg_sys::TransactionIdGetCommitTsData(xmin, &mut time, &mut origin);
            if !known {
                return Version { commit_time: 0, node: NodeId(self.me) };
            }
            Version { commit_time: time, node: NodeId(self.node_of_origin(origin)) }
        }
    }

    /// The node whose changes carry replication origin `origin` here (0 for unknown origins).
    fn node_of_origin(&mut self, origin: pg_sys::RepOriginId) -> u32 {
        if origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId || crate::commit_origin::is_commit_origin(origin)
        {
            return self.me;
        }
        if let Some(node) = self.origins.get(&origin) {
            return *node;
        }
        let Mode::Multimaster(config) = gucs::mode() else { return 0 };
        let node = crate::status::known(config)
            .into_iter()
            .find(|n| {
                let name = cstring(&crate::receiver::origin_name(n.id.0));
                unsafe { pg_sys::replorigin_by_name(name.as_ptr(), true) == origin }
            })
            .map(|n| n.id.0);
        if let Some(node) = node {
            self.origins.insert(origin, node); // origins are never renumbered
        }
        node.unwrap_or(0)
    }

    /// Writes a conflict to `mtm.conflicts`, or to the log when the extension is not created here.
    fn record_conflict(
        &mut self,
        rel: pg_sys::Relation,
        kind: &str,
        remote: Version,
        local: Option<Version>,
        remote_won: bool,
        row: &[Value],
    ) {
        // SAFETY: `rel` is open (see `change`); its schema exists while it is, so
        // get_namespace_name does not return NULL; relname is a NUL-terminated NameData.
        let table = unsafe {
            let r = &*(*rel).rd_rel;
            let schema = std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(r.relnamespace)).to_string_lossy();
            let name = std::ffi::CStr::from_ptr(r.relname.data.as_ptr()).to_string_lossy();
            format!("{schema}.{name}")
        };
        let row_text = row
            .iter()
            .map(|v| match v {
                Value::Null => "NULL".to_string(),
                Value::Unchanged => "(unchanged)".to_string(),
                Value::Text(t) => t.clone(),
                Value::Binary(b) => format!("({} bytes)", b.len()),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let kept = if remote_won { "remote" } else { "local" };
        // SAFETY: catalog lookups with static C strings, inside the applied transaction.
        let exists = unsafe {
            let ns = pg_sys::get_namespace_oid(c"mtm".as_ptr(), true);
            ns != pg_sys::InvalidOid && pg_sys::get_relname_relid(c"conflicts".as_ptr(), ns) != pg_sys::InvalidOid
        };
        if !exists {
            // Without the extension here, the server log is the record.
            ereport!(
                PgLogLevel::LOG,
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                format!(
                    "mmts: {kind} conflict on {table}: kept the {kept} version (remote from node {}, row ({row_text}))",
                    remote.node
                )
            );
        } else {
            let to_ts = |t: i64| {
                // SAFETY: a timestamptz is passed by value: the datum is the i64, no pointer.
                (t != 0)
                    .then(|| unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(t), false) })
                    .flatten()
            };
            let local_node = local.map(|l| l.node.0 as i32);
            let local_time = local.and_then(|l| to_ts(l.commit_time));
            let args = [
                table.as_str().into(),
                kind.into(),
                (remote.node.0 as i32).into(),
                to_ts(remote.commit_time).into(),
                local_node.into(),
                local_time.into(),
                kept.into(),
                row_text.as_str().into(),
            ];
            // Planned once per receiver: conflicts can come with every applied transaction.
            let plan = self.conflict_insert.get_or_insert_with(|| {
                use pgrx::pg_sys::BuiltinOid::{INT4OID, TEXTOID, TIMESTAMPTZOID};
                let types = [TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID, INT4OID, TIMESTAMPTZOID, TEXTOID, TEXTOID]
                    .map(pgrx::PgOid::BuiltIn);
                Spi::connect(|client| {
                    client
                        .prepare_mut(
                            "INSERT INTO mtm.conflicts(relation, kind, remote_node, remote_commit_time, local_node, local_commit_time, kept, remote_row)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                            &types,
                        )
                        .map(|p| p.keep())
                })
                .expect("plan the conflict record")
            });
            Spi::connect_mut(|client| client.update(&*plan, None, &args).map(|_| ())).expect("record the conflict");
        }
    }

    fn truncate(&mut self, relations: &[u32], cascade: bool, restart_identity: bool) {
        // SAFETY: main thread, inside the applied transaction; each relation opened is in `rels`
        // (one per entry of `relations`, so list_nth stays in bounds) and is closed below.
        unsafe {
            start_transaction();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let mut rels: *mut pg_sys::List = std::ptr::null_mut();
            let mut relids: *mut pg_sys::List = std::ptr::null_mut();
            for r in relations {
                let rel = self.open(*r, pg_sys::AccessExclusiveLock);
                rels = pg_sys::lappend(rels, rel.cast());
                relids = pg_sys::lappend_oid(relids, (*rel).rd_id);
            }
            let behavior =
                if cascade { pg_sys::DropBehavior::DROP_CASCADE } else { pg_sys::DropBehavior::DROP_RESTRICT };
            pg_sys::ExecuteTruncateGuts(rels, relids, relids, behavior, restart_identity);
            for i in 0..relations.len() {
                let rel = pg_sys::list_nth(rels, i as i32) as pg_sys::Relation;
                pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
    }
}

/// Invalidates the relcache entry of the table a row of mtm.local_tables names, if it exists.
unsafe fn invalidate_named_table(row: &[Value]) {
    let (Some(Value::Text(schema)), Some(Value::Text(name))) = (row.first(), row.get(1)) else { return };
    let (schema, name) = (cstring(schema), cstring(name));
    // SAFETY: inside the applied transaction; `rv` points into `schema` and `name`, which
    // outlive it.
    unsafe {
        let rv = pg_sys::makeRangeVar(schema.as_ptr().cast_mut(), name.as_ptr().cast_mut(), -1);
        let relid = crate::executor_hook::relation_id(rv);
        if relid != pg_sys::InvalidOid {
            pg_sys::CacheInvalidateRelcacheByRelid(relid);
        }
    }
}

/// COMMIT (or ROLLBACK) PREPARED `gid` as the peer's stream says at `end_lsn`, recording `time`
/// (the commit timestamp); `false` when `gid` is not prepared here.
fn finish_at(gid: &CString, commit: bool, end_lsn: u64, time: pg_sys::TimestampTz) -> bool {
    // SAFETY: the receiver's main thread, outside a subtransaction; `gid` is borrowed for the
    // call. An error is caught below, where the transaction is aborted.
    PgTryBuilder::new(|| unsafe {
        start_transaction();
        set_origin_position(end_lsn, time);
        twophase::finish_prepared(gid, commit);
        pg_sys::CommitTransactionCommand();
        true
    })
    .catch_when(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, |_| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        false
    })
    .execute()
}

/// Sleeps `ms` milliseconds on the latch.
pub fn nap(ms: i64) {
    // SAFETY: main thread; `MyLatch` is this process's latch, set up before any mmts code runs.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// How often a receiver that cannot go on logs that it still waits.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// A wait of the receiver from `self.0` shown in `mtm.get_nodes_state()` until it ends.
struct WaitShown(u32);

impl WaitShown {
    fn set(&self, wait: crate::status::Wait) {
        crate::status::update(self.0, |p| p.wait = wait);
    }
}

impl Drop for WaitShown {
    fn drop(&mut self) {
        self.set(crate::status::Wait::default());
    }
}

unsafe fn start_transaction() {
    // SAFETY: main thread, at the top level (no transaction, or the one being applied).
    unsafe {
        if !pg_sys::IsTransactionState() {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
        }
    }
}

/// While a synchronous transaction is applied, every this often the timer looks whether it
/// waits for a lock; if so, the apply stops waiting and looks at the holder.
const LOCK_WAIT_MS: i32 = 1;

/// The lock (and mode) the apply was waiting for when the timer stopped it.
static AWAITED: Awaited = Awaited::new();

/// The id PostgreSQL gave the lock-wait timeout (-1: not registered yet in this process).
/// Only the main thread uses it; an atomic is simply the safe way to keep a global.
static LOCK_WAIT_TIMEOUT: AtomicI32 = AtomicI32::new(-1);

/// A cell for [`AWAITED`]. The SIGALRM handler writes it ([`on_lock_wait_timer`]), so it is
/// made of std's atomics, which are lock-free and therefore async-signal-safe (a `Mutex` or a
/// lazily initialised `thread_local!` is not). The main thread reads and clears it only while
/// the timer is disarmed, so it never sees the handler's writes half done.
struct Awaited {
    /// Set (Release) once the fields below are written; taken (Acquire) before they are read.
    set: AtomicBool,
    /// `locktag_field1` to `locktag_field3`.
    fields: [AtomicU32; 3],
    /// `locktag_field4`, `locktag_type` and `locktag_lockmethodid`, packed.
    rest: AtomicU32,
    mode: AtomicI32,
}

impl Awaited {
    const fn new() -> Awaited {
        Awaited {
            set: AtomicBool::new(false),
            fields: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            rest: AtomicU32::new(0),
            mode: AtomicI32::new(0),
        }
    }

    /// Records `tag` and `mode` (in the signal handler: atomics only).
    fn put(&self, tag: &pg_sys::LOCKTAG, mode: pg_sys::LOCKMODE) {
        self.set.store(false, Ordering::Relaxed);
        self.fields[0].store(tag.locktag_field1, Ordering::Relaxed);
        self.fields[1].store(tag.locktag_field2, Ordering::Relaxed);
        self.fields[2].store(tag.locktag_field3, Ordering::Relaxed);
        let rest = u32::from(tag.locktag_field4)
            | u32::from(tag.locktag_type) << 16
            | u32::from(tag.locktag_lockmethodid) << 24;
        self.rest.store(rest, Ordering::Relaxed);
        self.mode.store(mode, Ordering::Relaxed);
        self.set.store(true, Ordering::Release);
    }

    /// What was recorded since the last `take` or `clear`, if anything (timer disarmed).
    fn take(&self) -> Option<(pg_sys::LOCKTAG, pg_sys::LOCKMODE)> {
        if !self.set.swap(false, Ordering::Acquire) {
            return None;
        }
        let rest = self.rest.load(Ordering::Relaxed);
        let tag = pg_sys::LOCKTAG {
            locktag_field1: self.fields[0].load(Ordering::Relaxed),
            locktag_field2: self.fields[1].load(Ordering::Relaxed),
            locktag_field3: self.fields[2].load(Ordering::Relaxed),
            locktag_field4: rest as u16,
            locktag_type: (rest >> 16) as u8,
            locktag_lockmethodid: (rest >> 24) as u8,
        };
        Some((tag, self.mode.load(Ordering::Relaxed)))
    }

    fn clear(&self) {
        self.set.store(false, Ordering::Release);
    }
}

/// Arms (or disarms) the lock-wait timer, periodic while the changes are applied.
fn lock_wait_timer(on: bool) {
    use crate::pg_internals::{disable_timeout, enable_timeout_every, register_timeout, USER_TIMEOUT};
    let mut id = LOCK_WAIT_TIMEOUT.load(Ordering::Relaxed);
    // SAFETY: PostgreSQL's timeout functions, through pgrx's guard, on the main thread (they
    // are not thread-safe); `id` is the one RegisterTimeout gave.
    unsafe {
        if id < 0 {
            id = pg_sys::ffi::pg_guard_ffi_boundary(|| register_timeout(USER_TIMEOUT, Some(on_lock_wait_timer)));
            LOCK_WAIT_TIMEOUT.store(id, Ordering::Relaxed);
        }
        if on {
            let first = pg_sys::GetCurrentTimestamp() + LOCK_WAIT_MS as i64 * 1000;
            pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_every(id, first, LOCK_WAIT_MS));
        } else {
            pg_sys::ffi::pg_guard_ffi_boundary(|| disable_timeout(id, false));
        }
    }
}

/// Runs in the SIGALRM handler: only reads this process's lock wait and raises a cancel,
/// which the lock manager's wait loop turns into an ERROR the applier catches.
unsafe extern "C-unwind" fn on_lock_wait_timer() {
    // SAFETY: in a signal handler of this single-threaded process, which it interrupts.
    // `MyProc` is this backend's PGPROC for its whole life; the LOCK its `waitLock` points to
    // stays in shared memory while this process waits on it or holds it (a wait that ends
    // meanwhile is harmless: see `prepare`). Only async-signal-safe things are done: atomics,
    // stores to PostgreSQL's `sig_atomic_t` flags, and SetLatch (made for signal handlers; pgrx's
    // guard around it only checks the thread and sets the error jump target, then restores it).
    unsafe {
        let lock = (*pg_sys::MyProc).waitLock;
        if lock.is_null() {
            return; // not waiting: look again next time
        }
        // Locks held for an instant inside an operation (extending a table, a page) are no
        // conflict between transactions: wait them out.
        let kind = (*lock).tag.locktag_type as u32;
        if kind == pg_sys::LockTagType::LOCKTAG_RELATION_EXTEND as u32
            || kind == pg_sys::LockTagType::LOCKTAG_PAGE as u32
        {
            return;
        }
        AWAITED.put(&(*lock).tag, (*pg_sys::MyProc).waitLockMode);
        pg_sys::InterruptPending = 1;
        pg_sys::QueryCancelPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

unsafe extern "C-unwind" {
    // storage/sinvaladt.h and access/twophase.h, not in pgrx's bindings.
    fn BackendIdGetProc(backend_id: std::ffi::c_int) -> *mut pg_sys::PGPROC;
    fn TwoPhaseGetXidByVirtualXID(vxid: pg_sys::VirtualTransactionId, have_more: *mut bool) -> pg_sys::TransactionId;
}

/// The transactions holding `tag` in a mode that conflicts with `mode`.
unsafe fn lock_holders(tag: &pg_sys::LOCKTAG, mode: pg_sys::LOCKMODE) -> Vec<LockHolder> {
    // SAFETY: main thread. GetLockConflicts returns `count` entries, palloc'd outside hot
    // standby (an applier never runs in recovery), so pfree'd here. BackendIdGetProc gives a
    // PGPROC in shared memory (or NULL); its fields are read without a lock, as PostgreSQL
    // does, and checked against the vxid.
    unsafe {
        let mut count = 0;
        let vxids = pg_sys::GetLockConflicts(tag, mode, &mut count);
        let holders = (0..count as usize)
            .filter_map(|i| {
                let vxid = *vxids.add(i);
                if vxid.backendId == pg_sys::InvalidBackendId {
                    // A prepared transaction recovered at start-up: its "local" id is its xid.
                    return Some(LockHolder { xid: vxid.localTransactionId, proc_: None });
                }
                // A prepared transaction keeps the virtual id of the backend that prepared it.
                let mut more = false;
                let prepared = TwoPhaseGetXidByVirtualXID(vxid, &mut more).into_inner();
                if prepared != 0 {
                    return Some(LockHolder { xid: prepared, proc_: None });
                }
                let proc_ = BackendIdGetProc(vxid.backendId);
                // Only while that backend still runs the same transaction.
                (!proc_.is_null() && (*proc_).lxid == vxid.localTransactionId)
                    .then(|| LockHolder { xid: (*proc_).xid.into_inner(), proc_: Some(proc_) })
            })
            .collect();
        pg_sys::pfree(vxids.cast());
        holders
    }
}

/// What the next local commit records as its origin's position and commit time.
unsafe fn set_origin_position(end_lsn: u64, time: pg_sys::TimestampTz) {
    // SAFETY: main thread; plain globals of this session, read by its next commit.
    unsafe {
        pg_sys::replorigin_session_origin_lsn = end_lsn;
        pg_sys::replorigin_session_origin_timestamp = time;
    }
}

/// Fills `slot` with `values` (the peer's columns, mapped to local ones by `map`). With
/// `base`, columns the peer did not send, or sent as unchanged, keep `base`'s values.
unsafe fn store_values(
    slot: *mut pg_sys::TupleTableSlot,
    desc: pg_sys::TupleDesc,
    map: &[Option<usize>],
    values: &[Value],
    base: Option<*mut pg_sys::TupleTableSlot>,
) {
    // SAFETY: `slot` (and `base`) were made for `desc` (the caller's part), so their value and
    // null arrays have `map.len()` entries, and they are distinct slots; `base` is deformed by
    // slot_getallattrs before it is read. `text` outlives the input function, which copies it.
    unsafe {
        pg_sys::ExecClearTuple(slot);
        let natts = map.len();
        let datums = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        if let Some(base) = base {
            pg_sys::slot_getallattrs(base);
            datums.copy_from_slice(std::slice::from_raw_parts((*base).tts_values, natts));
            nulls.copy_from_slice(std::slice::from_raw_parts((*base).tts_isnull, natts));
        } else {
            nulls.fill(true);
        }
        for (i, remote) in map.iter().enumerate() {
            let Some(value) = remote.and_then(|r| values.get(r)) else { continue };
            match value {
                Value::Null => {
                    datums[i] = pg_sys::Datum::from(0);
                    nulls[i] = true;
                }
                Value::Text(text) => {
                    let att = &*(*desc).attrs.as_ptr().add(i);
                    let mut input = pg_sys::InvalidOid;
                    let mut ioparam = pg_sys::InvalidOid;
                    pg_sys::getTypeInputInfo(att.atttypid, &mut input, &mut ioparam);
                    let text = cstring(text);
                    datums[i] = pg_sys::OidInputFunctionCall(input, text.as_ptr().cast_mut(), ioparam, att.atttypmod);
                    nulls[i] = false;
                }
                Value::Binary(_) => {
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        "mmts: binary column values are not supported by this node"
                    );
                }
                Value::Unchanged => {} // keeps the base value (or NULL without one)
            }
        }
        pg_sys::ExecStoreVirtualTuple(slot);
    }
}

/// The schema change a transactional message of the peer carries, if it is one.
fn ddl_signal(peer: u32, message: &Message) -> Option<Signal> {
    match message {
        Message::LogicalMessage { transactional: true, prefix, content, .. } if prefix == SIGNAL_PREFIX => {
            crate::provenance::admit(peer, content).filter(|s| matches!(s, Signal::Ddl { .. }))
        }
        _ => None,
    }
}
