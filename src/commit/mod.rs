//! Synchronous commit of client transactions (`multimaster.mode = sync`).
//!
//! PostgreSQL 15 has no hook that can turn a COMMIT into a two-phase commit, so mmts does it
//! in three steps, in the client's backend:
//!
//! 1. **Spot writes.** `ExecutorStart` notes DML on a replicated table (including DML run by
//!    functions and triggers), `ProcessUtility` notes COPY FROM and TRUNCATE of one.
//! 2. **Mark the transaction for PREPARE.** An implicit transaction (an autocommit statement, a
//!    multi-statement simple query, an extended-protocol batch up to Sync) is marked as soon as
//!    a top-level statement that wrote has run: `BeginImplicitTransactionBlock()` +
//!    `PrepareTransactionBlock(gid)`, so that PostgreSQL's own end of statement (or Sync)
//!    prepares it instead of committing (the "no transaction in progress" WARNING this raises is
//!    hidden). In an explicit block, the COMMIT statement itself becomes
//!    `PrepareTransactionBlock(gid)`. The gid is `mtm_<node>_<xid>`. Just before the PREPARE
//!    record is written (`XACT_EVENT_PRE_PREPARE`) the transaction gets its [`Key`], a
//!    coordinator, and a transactional signal telling the peers to vote.
//! 3. **Finish before the client hears.** Every message to the client goes through
//!    `PqCommMethods->putmessage`; mmts wraps it. The first CommandComplete ('C') or
//!    ReadyForQuery ('Z') after the PREPARE, with no transaction open, waits for the peers'
//!    votes (delivered by the receivers), then runs COMMIT PREPARED (or ROLLBACK PREPARED) and
//!    waits until every live peer has finished too. A rollback reaches the client as an ERROR
//!    in place of that message, as a deferred constraint failing at commit would.
//!
//! A write transaction that would still commit without PREPARE (a procedure that COMMITs
//! inside, a portal suspended before Sync) is refused at `XACT_EVENT_PRE_COMMIT`, so no write
//! ever escapes the two-phase commit.
//!
//! The files, in the order a commit goes through them: `hooks` (the executor, utility, log
//! and transaction hooks that spot writes and transaction statements), `marking` (turning the
//! end of a writing transaction into PREPARE TRANSACTION, and refusing what cannot be
//! prepared), `coordinating` (just before PREPARE: the key and the coordination; after it:
//! carrying out what `mmts_core::coordinator` decides), `client_output` (holding the client's
//! CommandComplete / ReadyForQuery until the commit is finished everywhere).

mod client_output;
mod coordinating;
pub mod ddl;
mod hooks;
mod marking;

use std::cell::RefCell;
use std::ffi::CString;

use mmts_core::config::Mode;
use mmts_core::membership::{self, bit};
use mmts_core::twopc::Signal;
use pgrx::pg_sys;

use crate::{gucs, status, twophase};

use client_output::install_pqcomm;
use coordinating::Pending;
pub(crate) use hooks::executor_run;
pub use hooks::install;
pub use marking::refuse_if_wounded;
use marking::refuse_unless_online;

#[derive(Default)]
struct Session {
    /// The transaction wrote a replicated table.
    wrote: bool,
    /// The transaction is an explicit block (BEGIN).
    explicit: bool,
    /// Its end was turned into PREPARE TRANSACTION (`gid`).
    gid: Option<CString>,
    /// The application ran PREPARE TRANSACTION.
    application_prepare: bool,
    /// Executor and utility calls under way (0: at top level).
    nesting: u32,
    pending: Option<Pending>,
    /// Hide the "there is no transaction in progress" WARNING while marking.
    quiet: bool,
    /// The priority of this session's last transaction, rolled back for a conflict, and when:
    /// a retry soon after keeps it, so that it is not always the youngest and does not lose
    /// every conflict (a schema change under a steady write load, a hot row).
    retry: Option<(i64, std::time::Instant)>,
}

thread_local! {
    static SESSION: RefCell<Session> = RefCell::new(Session::default());
}

fn session<R>(f: impl FnOnce(&mut Session) -> R) -> R {
    SESSION.with(|s| f(&mut s.borrow_mut()))
}

/// Client backends only: workers apply what they get under a replication origin.
fn is_client() -> bool {
    // SAFETY: a plain global, set when the process starts; read on the backend's main thread.
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND }
}

fn active() -> bool {
    gucs::synchronous() && is_client() && gucs::in_replicated_database()
}

/// Refuses the first write of a transaction while this node does not accept writes.
pub fn refuse_unless_writable() {
    if active() && !session(|s| s.wrote) {
        refuse_unless_online();
    }
}

/// Notes that the current transaction writes a replicated table.
pub fn note_write() {
    if active() {
        if !session(|s| s.wrote) {
            refuse_unless_online();
        }
        session(|s| s.wrote = true);
        install_pqcomm();
    } else if is_client() && !gucs::synchronous() && gucs::in_replicated_database() {
        note_async_write();
    }
}

/// In asynchronous mode, the first write of a transaction tells the peers which of the other
/// nodes' transactions this node had applied (`Signal::Seen`), before its changes: a peer then
/// records as a conflict only an overwrite of a version this node had not seen.
fn note_async_write() {
    thread_local! {
        /// The local transaction that has told it already.
        static TOLD: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
    }
    let Mode::Multimaster(config) = gucs::mode() else { return };
    // SAFETY: a client backend (the caller checks `is_client`) has its PGPROC in MyProc from
    // InitProcess on; its lxid is written only by this backend, on its main thread.
    let lxid = unsafe { crate::pg_internals::proc_local_xid(pg_sys::MyProc) };
    if TOLD.with(|t| t.replace(Some(lxid))) == Some(lxid) {
        return;
    }
    let others = status::configured(config) & !bit(config.node_id);
    let applied = membership::nodes(others).map(|n| (n, status::applied_commit_time(n.0))).collect();
    twophase::emit(&Signal::Seen { applied }, true);
}
