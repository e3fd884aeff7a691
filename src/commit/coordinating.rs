//! The coordinator's side of a synchronous commit in the client's backend: just before
//! PREPARE, the transaction's key, its coordination and the signal that asks the peers to
//! vote; after it, carrying out what `mmts_core::coordinator` asks for until the client may
//! hear the outcome.

use std::ffi::CString;
use std::time::Duration;

use mmts_core::config::Mode;
use mmts_core::coordinator::{Action, Coordination, Coordinator, Event, Reply};
use mmts_core::indoubt::{Answer, Ballot, Outcome};
use mmts_core::membership::{self, bit, Mask};
use mmts_core::twopc::{Key, Signal, Vote, SERIALIZATION_FAILURE};
use mmts_core::NodeId;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::marking::wounded_error;
use super::{refuse_unless_online, session};
use crate::backend::now;
use crate::{gucs, status, twophase};

/// A prepared transaction to finish before the client hears of it.
pub(super) struct Pending {
    gid: CString,
    xid: u32,
    slot: usize,
    coordination: Coordination,
    /// The members it is prepared on.
    members: Mask,
    /// Its priority in conflicts (its key's timestamp).
    priority: i64,
    /// When it was prepared, by this node's physical clock (no promise about it can be older).
    since: i64,
}

impl Pending {
    /// Forgets it: its transaction was rolled back before it was finished.
    pub(super) fn abandon(self) {
        twophase::unregister(self.slot, self.xid);
    }
}

/// How soon a retry must come to keep the priority of the transaction it retries.
const RETRY_WINDOW: Duration = Duration::from_secs(2);

/// Just before PREPARE: the transaction's key, its coordinator, and the signal for the peers.
pub(super) fn start_two_phase(gid: CString, application: bool) {
    let Mode::Multimaster(config) = gucs::mode() else { return };
    wait_for_turn();
    let members = refuse_unless_online();
    let since = now();
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    let ts = twophase::clock_next();
    let priority = session(|s| s.retry.take())
        .filter(|(_, at)| at.elapsed() < RETRY_WINDOW)
        .map_or(ts, |(earlier, _)| earlier.min(ts));
    let key = Key { ts: priority, node: config.node_id };
    let others = status::configured(config) & !bit(config.node_id);
    let after = membership::nodes(others).map(|n| (n, status::applied(n.0))).collect();
    twophase::emit(&Signal::Coordinated { key, members, after }, true);
    let procno = crate::pg_internals::my_proc_number();
    let size = status::configured(config).count_ones();
    let wake = mmts_core::coordinator::Wake { participants: members & !bit(config.node_id), size };
    let slot = match twophase::register(xid, key, procno, wake) {
        Ok(slot) => slot,
        Err(twophase::Refused::Wounded(by)) => wounded_error(by),
        Err(twophase::Refused::Full) => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "mmts: too many transactions in two-phase commit at once",
                "mmts",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        }
    };
    let live = membership::nodes(members).filter(|&id| id != config.node_id);
    // Peers apply a large transaction for about as long as it ran here.
    let ran = now() - unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let deadline = ts + gucs::vote_timeout_us(ran);
    let finish_timeout = gucs::TWOPC_MIN_TIMEOUT.get() as i64 * 1000;
    let coordination =
        Coordination::new(Coordinator::new(size as usize, live, ts, deadline), application, finish_timeout);
    session(|s| s.pending = Some(Pending { gid, xid, slot, coordination, members, priority, since }));
}

/// While a node catches up without gaining on the members, this member's write commits go
/// ahead one per spacing (`status::throttle_commits`), in the order they ask.
fn wait_for_turn() {
    if status::commit_interval() == 0 {
        return;
    }
    let start = status::next_commit(now());
    while now() < start {
        crate::backend::nap(((start - now()) / 1000).clamp(1, 100));
        pgrx::check_for_interrupts!();
    }
}

fn interrupted() -> bool {
    // SAFETY: plain flags of this backend, set by its signal handlers: read volatile, as
    // CHECK_FOR_INTERRUPTS reads them, on the main thread.
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::InterruptPending) != 0
            && (std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
                || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0)
    }
}

fn wait_a_little() {
    crate::backend::nap(10);
}

/// Feeds what arrived, what the receivers see, and the backend's interrupts into the
/// coordination.
fn update(p: &mut Pending) {
    let votes = twophase::votes(p.slot, p.xid);
    let c = &mut p.coordination;
    for node in votes.yes {
        c.step(Event::Vote { node, vote: Vote::Yes { proposal: votes.max_proposal } });
    }
    if let Some((node, sqlstate, message)) = votes.no {
        c.step(Event::Vote { node, vote: Vote::No { sqlstate, message } });
    }
    for node in votes.accepted {
        c.step(Event::Accepted(node));
    }
    for node in votes.finished {
        c.step(Event::Finished(node));
    }
    // A participant no longer reachable, or no longer a member, will not vote. Once decided,
    // one is waited for until it is no longer a member: until then it may answer reads (see
    // `mmts_core::lease`), even if this node's receiver lost it.
    let (members, size) = match gucs::mode() {
        Mode::Multimaster(config) => (status::current(config).view.members, status::configured(config).count_ones()),
        Mode::Standalone => (0, 0),
    };
    c.step(Event::ClusterSize(size as usize));
    let decided = c.decision().is_some();
    let lost: Vec<NodeId> =
        c.participants().filter(|&n| members & bit(n) == 0 || (!decided && !status::connected(n.0))).collect();
    for node in lost {
        c.step(Event::PeerLost(node));
    }
    if interrupted() {
        c.step(Event::Interrupted);
    }
}

fn finish_prepared(gid: &CString, commit: bool) {
    // SAFETY: the backend's main thread, with no transaction open (`finish` runs once the
    // client's transaction is prepared and over); the one started here is committed.
    unsafe {
        pg_sys::StartTransactionCommand();
        twophase::finish_prepared(gid, commit);
        pg_sys::CommitTransactionCommand();
    }
}

/// For tests (`multimaster.failpoint`): the backend stops here for good, as if the node died
/// at this point (the test then kills the node).
fn failpoint(name: &str) {
    let set = gucs::FAILPOINT.get();
    if set.as_deref().and_then(|s| s.to_str().ok()) == Some(name) {
        crate::logging::log(format!("mmts: failpoint {name} reached"));
        loop {
            crate::backend::nap(100);
        }
    }
}

/// Carries out what the transaction's coordination (`mmts_core::coordinator`) asks for until
/// the client is to hear the outcome; a rollback or an unknown outcome reaches it as an ERROR.
pub(super) fn finish(mut p: Pending) {
    let me = match gucs::mode() {
        Mode::Multimaster(config) => config.node_id,
        Mode::Standalone => NodeId(0),
    };
    let reply = loop {
        update(&mut p);
        match p.coordination.poll(now()) {
            Action::Wait => wait_a_little(),
            Action::Precommit { ts } => {
                // Every node records `ts` as the commit timestamp; this node's clock passes it
                // first (a wait only as long as clock skew), so that what it commits later, or
                // what its client does after COMMIT, gets a later timestamp.
                let limit = now() + 1_000_000;
                while now() < ts.min(limit) {
                    std::thread::sleep(Duration::from_micros((ts - now()).clamp(1, 1000) as u64));
                }
                failpoint("before_precommit");
                let commit = Outcome::Commit { ts };
                let took = twophase::with_acceptor(me, p.xid, |a| a.accept(Ballot::coordinator(me), commit))
                    == Answer::Accepted;
                if took {
                    twophase::emit(&Signal::Precommit { origin: me, xid: p.xid, ts, since: p.since }, false);
                }
                p.coordination.step(Event::OwnAcceptance(took));
            }
            Action::CommitPrepared { ts } => {
                failpoint("before_commit");
                // Recording `ts` itself: a peer may commit at `ts` before this node does.
                crate::commit_origin::commit_prepared_at(&p.gid, ts);
                twophase::with_acceptor(me, p.xid, |a| a.decide(Outcome::Commit { ts }));
                // SAFETY: a plain global of this backend (the end of its last commit record), read
                // on its main thread.
                twophase::committed_without(p.members, me, unsafe { pg_sys::XactLastCommitEnd });
                twophase::clock_observe(now());
                p.coordination.step(Event::CommittedHere);
            }
            Action::RollbackPrepared => {
                finish_prepared(&p.gid, false);
                twophase::with_acceptor(me, p.xid, |a| a.decide(Outcome::Abort));
                p.coordination.step(Event::RolledBackHere);
            }
            Action::Reply(reply) => break reply,
        }
    };
    // Left prepared after an unknown outcome: this node's receivers settle it with the other
    // nodes (`settle_orphans`).
    twophase::unregister(p.slot, p.xid);
    let rolled_back = |sqlstate: PgSqlErrorCode, message: String| {
        ErrorReport::new(sqlstate, message, "mmts")
            .set_hint("The transaction made no change on any node; retry it.")
            .report(PgLogLevel::ERROR)
    };
    match reply {
        // The application commits it with COMMIT PREPARED when it chooses.
        Reply::Prepared => {}
        Reply::Committed { late } => {
            if !late.is_empty() {
                let late: Vec<String> = late.iter().map(|n| n.to_string()).collect();
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_WARNING,
                    format!("mmts: node {} has not confirmed the commit yet", late.join(", ")),
                    "mmts",
                )
                .set_detail("The transaction is committed; that node applies it as soon as it can, so a read there may not see it yet.")
                .report(PgLogLevel::WARNING);
            }
        }
        Reply::RolledBack(reason) => {
            if reason.sqlstate == SERIALIZATION_FAILURE {
                session(|s| s.retry = Some((p.priority, std::time::Instant::now())));
            }
            let message = match reason.node {
                Some(node) => format!("mmts: transaction rolled back on all nodes: node {node}: {}", reason.message),
                None => format!("mmts: transaction rolled back on all nodes: {}", reason.message),
            };
            rolled_back(twophase::sqlstate_code(&reason.sqlstate), message);
        }
        Reply::Canceled => {
            pgrx::check_for_interrupts!();
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                "mmts: transaction rolled back on all nodes: canceled while waiting for the votes",
                "mmts",
            )
            .report(PgLogLevel::ERROR);
        }
        Reply::SettledElsewhere => rolled_back(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "mmts: transaction rolled back on all nodes: the cluster settled it while this node was out of reach".into(),
        ),
        Reply::Unconfirmed => ErrorReport::new(
            PgSqlErrorCode::ERRCODE_TRANSACTION_RESOLUTION_UNKNOWN,
            "mmts: the commit of this transaction was not confirmed by a majority of the cluster in time",
            "mmts",
        )
        .set_detail("Every node voted to commit it; it is committed or rolled back on every node alike as soon as a majority of nodes reach each other.")
        .set_hint("Check whether its changes are there before retrying it.")
        .report(PgLogLevel::ERROR),
    }
}
