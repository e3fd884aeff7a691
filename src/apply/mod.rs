//! Applying a peer's transactions at the executor level, the way PostgreSQL's own logical
//! replication worker does: rows are built from the peer's text values with the local input
//! functions, found by replica identity (index, or whole-row comparison for REPLICA IDENTITY
//! FULL) and written with `ExecSimpleRelationInsert/Update/Delete`, so constraints, indexes and
//! replica triggers behave as for any replicated change. Commits carry the peer's replication
//! origin, end LSN and commit time.
//!
//! The files: this one (the applier's state, and [`Applier::apply`], which hands each message
//! of the stream to its handler), `handlers` (one handler per message, as PostgreSQL's
//! `worker.c` has `apply_handle_*`, and outcomes that arrive as signals), `prepare` (a peer's
//! transaction prepared here and this node's vote), `changes` (rows inserted, updated, deleted
//! and truncated at the executor level, and conflicts), `locks` (what a waiting apply waits for).

mod changes;
mod forwarded;
mod handlers;
mod locks;
mod prepare;

use std::collections::{HashMap, HashSet};

use std::ffi::{c_char, CString};

use std::panic::AssertUnwindSafe;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use std::time::{Duration, Instant};

use mmts_core::conflict::{remote_wins, writer_had_seen, Version};

use mmts_core::indoubt::Outcome;

use mmts_core::membership::{bit, Mask};

use mmts_core::replication::format_lsn;

use mmts_core::twopc::{dependencies_met, Key, Signal, Vote, SIGNAL_PREFIX};

use mmts_core::wire::{Message, Value};

use mmts_core::NodeId;

use pgrx::pg_sys;

use pgrx::pg_sys::panic::ErrorReport;

use pgrx::prelude::*;

pub use forwarded::{forget_forwards_before, out_of_reach, table_exists as forwarding_table_exists};

use crate::backend::cstring;
use crate::logging::log;

use crate::twophase::LockHolder;

use crate::{gucs, twophase};

use mmts_core::config::Mode;
use mmts_core::forward::Forwards;

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
    /// Large transactions the peer sends while they run, until they are prepared, committed or
    /// rolled back there (see `Message::StreamStart`).
    streamed: HashMap<u32, Streamed>,
    /// The streamed transaction whose block is being received.
    block: Option<u32>,
    /// The peer forwards what left this node out, whole (see `forwarded`).
    forwarding: bool,
    /// The peer sends notices of what left this node out (see `forwarded`).
    noticing: bool,
    /// Notices received and not yet taken by the receiver: (origin, xid there, end of its
    /// PREPARE in the origin's stream).
    notices: Vec<(NodeId, u32, u64)>,
    /// Why the stream must be read again at once, with whole forwards (see `forwarded`).
    reread: Option<String>,
    /// The transaction being applied carries a mark: the schema changes it runs are written
    /// again (see `forwarded`).
    marking: bool,
    /// Why the stream must be read again from this node's position (see `forwarded`).
    give_way: Option<String>,
}

/// What the peer sent of a large transaction while it runs.
#[derive(Default)]
struct Streamed {
    /// Its messages, in order.
    messages: Vec<Message>,
    /// Where each of its subtransactions' messages start in `messages` (what follows belongs
    /// to that subtransaction or to ones it started: a rollback of it drops all of it).
    subtransactions: HashMap<u32, usize>,
    /// The subtransaction the messages received last belong to.
    current: u32,
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
    /// Forwarded by the peer: whose transaction it is (see `forwarded`).
    forwarded: Option<forwarded::Mark>,
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
            streamed: HashMap::new(),
            block: None,
            forwarding: false,
            noticing: false,
            notices: Vec::new(),
            reread: None,
            marking: false,
            give_way: None,
        }
    }

    /// What the peer forwards of what left this node out, from this connection on.
    pub fn set_forwards(&mut self, forwards: Option<Forwards>) {
        self.forwarding = forwards == Some(Forwards::Whole);
        self.noticing = forwards == Some(Forwards::Notices);
    }

    /// Why the stream must be read again from this node's position, if it must.
    pub fn take_give_way(&mut self) -> Option<String> {
        self.give_way.take()
    }

    /// The notices received since the last call (see `forwarded`).
    pub fn take_notices(&mut self) -> Vec<(NodeId, u32, u64)> {
        std::mem::take(&mut self.notices)
    }

    /// Why the stream must be read again at once with whole forwards, if it must.
    pub fn take_reread(&mut self) -> Option<String> {
        self.reread.take()
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// A new connection to the peer: what was half received is sent again; the transactions
    /// set aside stay (the stream resumes after them). So do the tables' descriptions: those
    /// transactions may need them (they were described before, in the old connection), and
    /// the peer describes each table again before its first change in the new one.
    pub fn reset_stream(&mut self) {
        // SAFETY: the receiver's main thread, between messages: a transaction left open by the
        // old stream may be aborted.
        unsafe {
            if pg_sys::IsTransactionState() {
                pg_sys::AbortCurrentTransaction();
            }
        }
        self.in_transaction = false;
        self.preparing = None;
        self.streamed.clear();
        self.block = None;
        self.marking = false;
        self.give_way = None;
        self.reread = None;
        self.notices.clear();
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
        cstring(&mmts_core::twopc::gid(NodeId(self.peer), xid))
    }

    /// Applies one message; returns what finished when a transaction ends.
    /// A transaction set aside for a lock is not finished yet: see [`Applier::retry_waiting`].
    /// `keep_up` is called now and then while a large transaction is applied.
    pub fn apply(&mut self, message: Message, keep_up: &mut dyn FnMut()) -> Option<Applied> {
        if let Some(xid) = self.block {
            let streamed = self.streamed.entry(xid).or_default();
            match message {
                Message::StreamStop => {
                    self.block = None;
                    return None;
                }
                Message::StreamSubtransaction { subxid } => {
                    streamed.current = subxid;
                    return None;
                }
                Message::Relation(_)
                | Message::Insert { .. }
                | Message::Update { .. }
                | Message::Delete { .. }
                | Message::Truncate { .. }
                | Message::LogicalMessage { transactional: true, .. } => {
                    let at = streamed.messages.len();
                    streamed.subtransactions.entry(streamed.current).or_insert(at);
                    streamed.messages.push(message);
                    return None;
                }
                _ => {}
            }
        }
        match message {
            Message::StreamStart { xid } => return self.handle_stream_start(xid),
            Message::StreamAbort { xid, subxid } => return self.handle_stream_abort(xid, subxid),
            Message::StreamPrepare { origin, xid, gid, prepare_lsn, end_lsn, prepare_time } => {
                let begin = Message::BeginPrepare { origin, xid, gid: gid.clone(), prepare_lsn, end_lsn, prepare_time };
                let end = Message::Prepare { origin, xid, gid, prepare_lsn, end_lsn, prepare_time };
                return self.handle_stream_end(xid, begin, end, keep_up);
            }
            Message::StreamCommit { origin, xid, commit_lsn, end_lsn, commit_time } => {
                let begin = Message::Begin { origin, xid, final_lsn: commit_lsn, commit_time };
                let end = Message::Commit { origin, xid, commit_lsn, end_lsn, commit_time };
                return self.handle_stream_end(xid, begin, end, keep_up);
            }
            _ => {}
        }
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
            Message::Begin { commit_time, .. } => self.handle_begin(commit_time),
            Message::BeginPrepare { prepare_time, .. } => self.handle_begin_prepare(prepare_time),
            Message::Relation(r) => self.handle_relation(&r),
            Message::Insert { relation, new } => self.handle_insert(relation, &new),
            Message::Update { relation, old, new } => self.handle_update(relation, old.as_deref(), &new),
            Message::Delete { relation, old } => self.handle_delete(relation, &old),
            Message::Truncate { relations, cascade, restart_identity } => {
                self.handle_truncate(&relations, cascade, restart_identity)
            }
            Message::Commit { end_lsn, commit_time, .. } => self.handle_commit(end_lsn, commit_time, keep_up),
            Message::Prepare { xid, end_lsn, prepare_time, .. } => {
                self.handle_prepare(xid, end_lsn, prepare_time, keep_up)
            }
            Message::CommitPrepared { xid, end_lsn, commit_time, .. } => {
                self.handle_commit_prepared(xid, end_lsn, commit_time, keep_up)
            }
            Message::RollbackPrepared { xid, end_lsn, prepare_time, rollback_time, .. } => {
                self.handle_rollback_prepared(xid, end_lsn, prepare_time, rollback_time)
            }
            Message::LogicalMessage { transactional: true, prefix, content, .. } if prefix == SIGNAL_PREFIX => {
                self.handle_transactional_signal(&content)
            }
            Message::LogicalMessage { transactional: false, prefix, content, lsn } if prefix == SIGNAL_PREFIX => {
                self.handle_signal(&content, lsn, keep_up)
            }
            Message::LogicalMessage { .. } | Message::Keepalive { .. } | Message::Hello { .. } => None,
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamSubtransaction { .. }
            | Message::StreamAbort { .. }
            | Message::StreamPrepare { .. }
            | Message::StreamCommit { .. } => None,
        }
    }

    /// The peer's transactions have ended here as far as `end` in its stream. Recorded just
    /// before the commit releases their row locks: a local transaction that waited for one of
    /// those locks then counts it among what it depends on (see `Signal::Coordinated`).
    fn ended(&self, end: u64) {
        crate::status::update(self.peer, |p| p.ended_lsn = p.ended_lsn.max(end));
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

    fn finished(&mut self, commit_time: pg_sys::TimestampTz) -> Applied {
        self.in_transaction = false;
        Applied { commit_time }
    }
}

/// COMMIT (or ROLLBACK) PREPARED `gid` as the peer's stream says at `end_lsn`, recording `time`
/// (the commit timestamp); `false` when `gid` is not prepared here (or another process is
/// finishing it).
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
    // Another process is finishing it right now ("is busy").
    .catch_when(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, |_| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        false
    })
    .execute()
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

/// What the next local commit records as its origin's position and commit time.
unsafe fn set_origin_position(end_lsn: u64, time: pg_sys::TimestampTz) {
    // SAFETY: main thread; plain globals of this session, read by its next commit.
    unsafe {
        pg_sys::replorigin_session_origin_lsn = end_lsn;
        pg_sys::replorigin_session_origin_timestamp = time;
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
